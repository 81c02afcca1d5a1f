//! zz execution replicas (DESIGN §2, §4, §5): deterministic apps over
//! certified pages, and the sans-IO core of one execution replica.
//!
//! - [`pages`]: the [`Pages`] abstraction (4 KiB pages) and the
//!   [`StateBackend`]s under it: the sled [`zz_statefetch::PageStore`], and
//!   [`RecoveringState`], which fetches a certified checkpoint on demand.
//! - [`space`]: the executor's page space: a superblock (last executed
//!   `app_seq`) and two growable regions, the reply table and the app.
//! - [`tx`]: the per-batch write-back page buffer, committed atomically.
//! - [`pmap`]: a hash map stored in pages (linear hashing, chained blob
//!   pages, a free list): the `kv` app's engine and the reply table.
//! - [`app`]: the [`App`] trait, the `null` app, the CPU-cost wrapper and
//!   the [`AppSpec`] that names a built-in app.
//! - [`kv`]: the `kv` app: get, put, delete, compare-and-swap.
//! - [`fault`]: the [`FaultPlan`] of fault-injection drills.
//! - [`replica`]: [`ExecutionCore`], one execution replica of one app: orders
//!   in, executed batches (MAC'd client replies and a results digest) and
//!   signed checkpoints out. No I/O, no clock, no threads of its own.
//! - [`link`]: the frames of the executor's one byte stream to its host
//!   agent: MAC'd envelopes to and from agreement replicas, and state-fetch
//!   traffic between execution replicas.
//! - [`driver`]: the runtime of the `zz-executor` process: the core on a
//!   thread of its own, the stream, recovery through peers, page serving.
//! - [`setup`]: what the `zz-executor` binary reads (environment, config,
//!   keys, fault plan) turned into a [`driver::ExecutorConfig`].
//!
//! Malformed input never panics: orders and certificates are checked and
//! rejected with a typed [`replica::Rejected`]; malformed operations give an
//! app's error result.

pub mod app;
pub mod driver;
pub mod fault;
pub mod guest;
pub mod kv;
pub mod link;
pub mod pages;
pub mod pmap;
pub mod replica;
pub mod setup;
pub mod space;
pub mod tx;

pub use crate::app::{App, AppKind, AppSpec, CpuCost, ExecContext, NullApp};
pub use crate::fault::{CorruptPage, FaultPlan};
pub use crate::kv::{KvApp, KvError, KvOp, KvResult};
pub use crate::pages::{PageError, Pages, RecoveringState, StateBackend};
pub use crate::replica::{CoreError, ExecParams, ExecutionCore, Metrics, Ready, Rejected};
pub use zz_statefetch::PAGE_SIZE;

#[cfg(test)]
pub(crate) mod testutil {
    //! Helpers shared by the unit tests.
    use zz_statefetch::{PageStore, StoreConfig};

    /// Opens a store; retries while a just-dropped handle's background
    /// thread still holds sled's file lock.
    pub(crate) fn open_store(dir: &std::path::Path) -> PageStore {
        for _ in 0..500 {
            match PageStore::open(dir, StoreConfig::default()) {
                Ok(s) => return s,
                Err(e) if e.to_string().contains("could not acquire lock") => {
                    std::thread::sleep(std::time::Duration::from_millis(10))
                }
                Err(e) => panic!("opening the store: {e}"),
            }
        }
        panic!("store lock not released")
    }
}
