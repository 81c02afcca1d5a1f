//! The zz agreement cluster: 3f+1 replicas that order client requests with PBFT.
//!
//! - [`replica`]: the sans-IO PBFT state machine (normal case with batching and
//!   a watermark window, checkpoints and log truncation, view change, catch-up,
//!   request de-duplication). No I/O, no clock: inputs in, [`replica::Ready`] out.
//! - [`viewchange`]: pure validation of certificates and the new-view computation.
//! - [`persist`]: what must survive a restart, and its on-disk store (sled for
//!   the rarely written parts, [`journal`] for prepared certificates).
//! - [`journal`]: the prepared-certificate journal, the flush on a batch's
//!   critical path.
//! - [`app`]: deterministic in-memory apps executed in sequence order, until
//!   execution moves to separate execution replicas.
//! - [`driver`]: the tokio driver that owns sockets, disk and timers; the
//!   `zz-agreement` daemon is a thin wrapper around it.
//! - [`hostlink`]: the links to host agents that carry orders, stable
//!   checkpoints and host commands to execution replicas, and their answers back.
//! - [`status`]: the JSON status document an operator reads (`GET /status`).

pub mod app;
pub mod driver;
pub mod execution;
pub mod hostlink;
pub mod journal;
pub mod persist;
pub mod replica;
pub mod status;
pub mod viewchange;

pub use replica::{Ready, Rejected, Replica, ReplicaOptions, Target};
