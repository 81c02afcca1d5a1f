//! zz's hypervisor layer: how a host agent (`zz-hostd`) holds execution
//! replicas and when it may touch them (DESIGN §3, §6).
//!
//! - [`lifecycle`]: the [`ReplicaLifecycle`] trait every backend implements
//!   (define, start, pause, resume, save, restore, destroy, reimage, state),
//!   replica states, typed errors, and [`carry_out`], which maps an
//!   authorized `Wake`/`Sleep`/`Reimage` to lifecycle calls.
//! - [`process`]: the process backend, each replica a child process paused
//!   with SIGSTOP/SIGCONT; the default on a laptop and for tests.
//! - [`libvirt`]: the libvirt backend, each replica a QEMU VM booting the
//!   guest image (crate `zz-images`); [`vmlink`]: the host side of a VM's
//!   virtio-serial stream; [`hostbackend`]: either backend behind one type.
//! - [`gate`]: the sans-IO [`CommandGate`]: a host command is carried out only
//!   once f+1 distinct agreement replicas sent it, validly signed, so f
//!   Byzantine agreement replicas can neither wake, pause nor destroy anything.
//! - [`mod@bench`]: latency measurement of the process backend's operations.
//! - [`hostd`]: the host agent daemon (`zz-hostd`): runs this host's
//!   execution replicas, relays their frames to and from agreement replicas
//!   and between each other, and carries out authorized host commands;
//!   [`hostpeer`]: its links to the other host agents, which carry state
//!   fetch between replicas on different hosts; [`relay`]: how it forwards
//!   frames by their route without decoding or copying them.
//! - [`hostd_ops`]: the host agent's operator side: `/metrics` and `/status`
//!   over HTTP, and operator-signed fault drills.
//!
//! A host agent wires them together: decode a `Signed<HostCommand>`, feed it
//! to [`CommandGate::on_command`], and for each [`gate::Verdict::Fire`] call
//! [`carry_out`] on its backend inside `spawn_blocking`.

pub mod bench;
pub mod gate;
pub mod hostbackend;
pub mod hostd;
pub mod hostd_ops;
pub mod hostd_vm;
pub mod hostpeer;
pub mod libvirt;
pub mod lifecycle;
pub mod process;
pub mod relay;
pub mod vmlink;

pub use gate::{CommandGate, Fire, Ignored, Rejected, Verdict};
pub use lifecycle::{
    carry_out, DormantMode, LifecycleError, ReplicaLifecycle, ReplicaSpec, ReplicaState,
};
pub use process::{ProcessBackend, ProcessConfig};
