//! The backend a host agent runs its replicas with, chosen per host by the
//! config's `hosts[].backend`: one type so the host agent's code is the same
//! for both.

use zz_wire::exec::ExecId;

use crate::libvirt::LibvirtBackend;
use crate::lifecycle::{LifecycleError, ReplicaLifecycle, ReplicaSpec, ReplicaState};
use crate::process::ProcessBackend;

/// Either backend, delegating every lifecycle call.
pub enum HostBackend {
    Process(ProcessBackend),
    Libvirt(Box<LibvirtBackend>),
}

impl HostBackend {
    /// Process id of a live process replica; `None` for a VM.
    pub fn pid(&self, exec: ExecId) -> Option<i32> {
        match self {
            HostBackend::Process(b) => b.pid(exec),
            HostBackend::Libvirt(_) => None,
        }
    }

    /// The libvirt domain name of a replica; `None` on the process backend.
    pub fn domain_name(&self, exec: ExecId) -> Option<String> {
        match self {
            HostBackend::Process(_) => None,
            HostBackend::Libvirt(b) => Some(b.domain_name(exec)),
        }
    }

    /// The end of a VM replica's console log (why its guest stopped, if it
    /// did); `None` on the process backend or without a log.
    pub fn console_tail(&self, exec: ExecId, lines: usize) -> Option<String> {
        let HostBackend::Libvirt(b) = self else {
            return None;
        };
        let text = std::fs::read_to_string(b.console_log(exec)?).ok()?;
        let all: Vec<&str> = text.lines().collect();
        Some(all[all.len().saturating_sub(lines)..].join("\n"))
    }

    fn inner(&mut self) -> &mut dyn ReplicaLifecycle {
        match self {
            HostBackend::Process(b) => b,
            HostBackend::Libvirt(b) => b.as_mut(),
        }
    }
}

impl ReplicaLifecycle for HostBackend {
    fn backend(&self) -> &'static str {
        match self {
            HostBackend::Process(b) => b.backend(),
            HostBackend::Libvirt(b) => b.backend(),
        }
    }
    fn define(&mut self, spec: ReplicaSpec) -> Result<(), LifecycleError> {
        self.inner().define(spec)
    }
    fn undefine(&mut self, exec: ExecId) -> Result<(), LifecycleError> {
        self.inner().undefine(exec)
    }
    fn start(&mut self, exec: ExecId) -> Result<(), LifecycleError> {
        self.inner().start(exec)
    }
    fn pause(&mut self, exec: ExecId) -> Result<(), LifecycleError> {
        self.inner().pause(exec)
    }
    fn resume(&mut self, exec: ExecId) -> Result<(), LifecycleError> {
        self.inner().resume(exec)
    }
    fn save(&mut self, exec: ExecId) -> Result<(), LifecycleError> {
        self.inner().save(exec)
    }
    fn restore(&mut self, exec: ExecId) -> Result<(), LifecycleError> {
        self.inner().restore(exec)
    }
    fn destroy(&mut self, exec: ExecId) -> Result<(), LifecycleError> {
        self.inner().destroy(exec)
    }
    fn reimage(&mut self, exec: ExecId) -> Result<(), LifecycleError> {
        self.inner().reimage(exec)
    }
    fn state(&mut self, exec: ExecId) -> Result<ReplicaState, LifecycleError> {
        self.inner().state(exec)
    }
    fn replicas(&self) -> Vec<ExecId> {
        match self {
            HostBackend::Process(b) => b.replicas(),
            HostBackend::Libvirt(b) => b.replicas(),
        }
    }
}
