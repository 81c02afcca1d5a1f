//! The VM variant of the whole-system benchmarks (`--backend libvirt`):
//! what changes in the deployment and in how its host agent is started
//! when execution replicas are libvirt VMs instead of processes.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use zz_wire::config::ClusterConfig;

/// Floor of the execution timeout with VMs: under TCG a VM's first orders
/// (opening its store) take far longer than a process's, and a timeout
/// there would wake the dormant replica before the fault being measured.
pub const VM_TIMEOUT_MIN_MS: u64 = 3000;

/// Execution replicas as VMs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VmSpec {
    /// `paused` or `saved`.
    pub dormant: String,
    /// The guest image folder; default: the host agent's default
    /// (`target/zz-image`, as `zzctl image build` writes it).
    pub image: Option<PathBuf>,
    /// Memory of each VM.
    pub memory_mib: u32,
    /// Virtual CPUs of each VM.
    pub vcpus: u32,
    /// libvirt connection URI of the host.
    pub uri: String,
    /// Longest wait for the host agent to boot its VMs.
    pub boot_timeout: Duration,
}

impl VmSpec {
    /// VMs on the local libvirt with the given dormant mode.
    pub fn new(dormant: &str) -> Result<VmSpec> {
        if !["paused", "saved"].contains(&dormant) {
            bail!("--dormant {dormant}: use paused or saved");
        }
        Ok(VmSpec {
            dormant: dormant.into(),
            image: None,
            memory_mib: 1024,
            vcpus: 1,
            uri: "qemu:///system".into(),
            boot_timeout: Duration::from_secs(600),
        })
    }

    /// Puts every host on the libvirt backend with this dormant mode, and
    /// raises the execution timeout floor to [`VM_TIMEOUT_MIN_MS`].
    pub fn apply(&self, cfg: &mut ClusterConfig) {
        for h in &mut cfg.hosts {
            h.backend = "libvirt".into();
            h.libvirt_uri = Some(self.uri.clone());
        }
        cfg.execution.dormant = self.dormant.clone();
        cfg.execution.timeout_min_ms = cfg.execution.timeout_min_ms.max(VM_TIMEOUT_MIN_MS);
    }

    /// Makes the deployment folder reachable by QEMU (user libvirt-qemu
    /// opens the disks by path) and adds the host agent's VM flags.
    pub fn prepare(&self, dir: &Path, hostd: &mut Command) -> Result<()> {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o711))
            .with_context(|| format!("making {} searchable for QEMU", dir.display()))?;
        if let Some(image) = &self.image {
            hostd.arg("--image").arg(image);
        }
        hostd.arg("--vm-memory").arg(self.memory_mib.to_string());
        if self.vcpus == 0 {
            bail!("--vm-vcpus must be at least 1");
        }
        hostd.arg("--vm-vcpus").arg(self.vcpus.to_string());
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_known_dormant_modes() {
        assert!(VmSpec::new("paused").is_ok());
        assert!(VmSpec::new("saved").is_ok());
        assert!(VmSpec::new("asleep").is_err());
    }

    #[test]
    fn the_host_agent_gets_the_vm_size() {
        let dir = tempfile::tempdir().unwrap();
        let spec = VmSpec {
            memory_mib: 512,
            vcpus: 2,
            ..VmSpec::new("paused").unwrap()
        };
        let mut hostd = Command::new("zz-hostd");
        spec.prepare(dir.path(), &mut hostd).unwrap();
        let args: Vec<_> = hostd.get_args().map(|a| a.to_string_lossy()).collect();
        assert_eq!(args, ["--vm-memory", "512", "--vm-vcpus", "2"]);
    }
}
