//! zz application state: pages, Merkle tree, checkpoints and verified state fetch.
//!
//! An executor's state is a growable vector of 4 KiB pages ([`PAGE_SIZE`]).
//!
//! - [`merkle`]: the blake3 Merkle tree over page hashes, updated from dirty
//!   pages only, and range/page proofs against its root (sans-IO).
//! - [`store`]: [`PageStore`], pages in sled with copy-on-write checkpoints;
//!   a checkpoint's pages stay readable (and provable) until it is released.
//! - [`read_log`]: which pages the state read since each retained checkpoint,
//!   the hint a recovering peer prefetches by.
//! - [`proto`]: the fetch protocol's request/response types and the
//!   server-side handler (sans-IO), plus the checks a client applies to a reply.
//! - [`source`]: the [`PageSource`] trait a recovering replica fetches from, and
//!   an in-process implementation.
//! - [`net`]: the fetch server and client over `zz-wire` framing (TCP or unix socket).
//! - [`recovery`]: [`RecoveryView`], on-demand state fetch against a certified
//!   `(seq, root)`: reads of missing pages block until the page is fetched and
//!   verified; the rest is fetched in the background.
//! - [`mod@bench`]: the `bench statefetch` measurements and the peer-process entry point.

pub mod bench;
pub mod merkle;
pub mod net;
pub mod proto;
pub mod read_log;
pub mod recovery;
pub mod source;
pub mod store;

pub use merkle::MerkleTree;
pub use net::{Endpoint, FetchClient, FetchServer};
pub use proto::{CheckpointInfo, FetchError, NodeRange, PagesReply, Request, Response};
pub use recovery::{
    Certificate, Progress, RecoveryConfig, RecoveryError, RecoveryEvent, RecoveryView,
};
pub use source::{LocalSource, PageSource};
pub use store::{CheckpointTiming, PageStore, StoreConfig, StoreError};

/// Size of one page of application state.
pub const PAGE_SIZE: usize = 4096;
