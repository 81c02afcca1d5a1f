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
