//! What the host agent does differently on a host whose backend is
//! libvirt: it opens the [`LibvirtBackend`] for the host's URI, gives each
//! replica's spec the files and memory a VM needs, and puts dormant VMs to
//! sleep only once their guest has booted and answered the port handshake
//! (so waking one never pays for a boot).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use zz_wire::config::{ClusterConfig, HostEntry};
use zz_wire::exec::{ExecId, HostAction};

use crate::hostbackend::HostBackend;
use crate::hostd::{HostdError, HostdOptions};
use crate::libvirt::{Accel, GuestImage, LibvirtBackend, LibvirtConfig};
use crate::lifecycle::{
    carry_out, DormantMode, LifecycleError, ReplicaLifecycle, ReplicaSpec, ReplicaState,
};
use crate::vmlink::GuestReady;

/// The default libvirt URI of a host that names none.
pub const DEFAULT_URI: &str = "qemu:///system";
/// Environment variable naming the guest image folder.
pub const ENV_IMAGE_DIR: &str = "ZZ_IMAGE_DIR";

/// Host agent settings for VMs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VmOptions {
    /// The guest image folder (`vmlinuz`, `initrd.cpio`); default
    /// [`default_image_dir`].
    pub image_dir: Option<PathBuf>,
    /// Guest memory per replica (at least 80 MiB; the executor's page
    /// cache and state fetch want more).
    pub memory_mib: u32,
    pub vcpus: u32,
    /// Accelerator; `None` detects it ([`Accel::detect`]).
    pub accel: Option<Accel>,
    /// Size of each replica's sparse state disk.
    pub disk_mib: u32,
    /// How long a booting guest may take to answer the handshake.
    pub boot_timeout: Duration,
}

impl Default for VmOptions {
    fn default() -> Self {
        VmOptions {
            image_dir: None,
            memory_mib: 256,
            vcpus: 1,
            accel: None,
            disk_mib: 2048,
            boot_timeout: Duration::from_secs(300),
        }
    }
}

/// `$ZZ_IMAGE_DIR`, else `zz-image` in the cargo target folder of the
/// running binary (`target/debug/zz-hostd` → `target/zz-image`), where
/// `zzctl image build` puts it.
pub fn default_image_dir() -> PathBuf {
    match std::env::current_exe() {
        Ok(exe) => default_image_dir_for(&exe),
        Err(_) => std::env::var_os(ENV_IMAGE_DIR)
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("target/zz-image")),
    }
}

/// [`default_image_dir`] for the binary `exe`.
pub fn default_image_dir_for(exe: &Path) -> PathBuf {
    if let Some(d) = std::env::var_os(ENV_IMAGE_DIR) {
        return PathBuf::from(d);
    }
    exe.parent()
        .and_then(|bin| bin.parent())
        .map(|target| target.join("zz-image"))
        .unwrap_or_else(|| PathBuf::from("target/zz-image"))
}

/// The domain-name namespace of a deployment's host: a hash of the
/// deployment's absolute data folder, and the host name.
pub fn namespace(cfg: &ClusterConfig, host: &str) -> String {
    let data = cfg.resolve(&cfg.data_dir);
    let data = std::path::absolute(&data).unwrap_or(data);
    let h = blake3::hash(data.to_string_lossy().as_bytes());
    format!("{}-{host}", &hex::encode(h.as_bytes())[..8])
}

/// Whether user `libvirt-qemu` (not root) can reach `path`: every folder
/// on the way must be searchable by others.
fn reachable_by_qemu(path: &Path) -> Result<(), PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let path = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
    for dir in path.ancestors().skip(1) {
        if let Ok(m) = std::fs::metadata(dir) {
            if m.permissions().mode() & 0o001 == 0 {
                return Err(dir.to_path_buf());
            }
        }
    }
    Ok(())
}

/// Opens the libvirt backend of `host` (blocking calls on the blocking pool).
pub async fn libvirt_backend(
    opts: &HostdOptions,
    host: &HostEntry,
) -> Result<HostBackend, HostdError> {
    let uri = host
        .libvirt_uri
        .clone()
        .unwrap_or_else(|| DEFAULT_URI.to_string());
    let image_dir = opts.vm.image_dir.clone().unwrap_or_else(default_image_dir);
    let mut cfg = LibvirtConfig::new(
        uri.clone(),
        namespace(&opts.config, &host.name),
        GuestImage::in_dir(&image_dir),
    );
    if let Some(a) = opts.vm.accel {
        cfg.accel = a;
    }
    cfg.disk_mib = opts.vm.disk_mib;
    if uri.starts_with("qemu:///system") {
        // QEMU runs as libvirt-qemu and opens the kernel, initramfs and disks by path.
        for p in [&image_dir, &opts.dir.join("x")] {
            if let Err(dir) = reachable_by_qemu(p) {
                return Err(HostdError::Io {
                    what: "QEMU (user libvirt-qemu) cannot reach files under",
                    path: dir.clone(),
                    source: std::io::Error::new(
                        std::io::ErrorKind::PermissionDenied,
                        format!("make it searchable: chmod o+x {}", dir.display()),
                    ),
                });
            }
        }
    }
    tracing::info!(%uri, namespace = %cfg.namespace, accel = ?cfg.accel, image = %image_dir.display(), "libvirt backend");
    let b = tokio::task::spawn_blocking(move || LibvirtBackend::new(cfg))
        .await
        .map_err(|e| HostdError::Internal(e.to_string()))??;
    Ok(HostBackend::Libvirt(Box::new(b)))
}

/// The host files and sizes each VM replica's spec gets.
pub struct SpecFiles {
    config: PathBuf,
    keys: HashMap<ExecId, PathBuf>,
    memory_mib: u32,
    vcpus: u32,
}

impl SpecFiles {
    pub fn new(opts: &HostdOptions, config_path: &Path) -> SpecFiles {
        let cfg = &opts.config;
        SpecFiles {
            config: config_path.to_path_buf(),
            keys: cfg
                .executors
                .iter()
                .map(|e| {
                    let k = cfg.resolve(&e.key_file);
                    (
                        ExecId {
                            app: e.app,
                            index: e.index,
                        },
                        std::path::absolute(&k).unwrap_or(k),
                    )
                })
                .collect(),
            memory_mib: opts.vm.memory_mib,
            vcpus: opts.vm.vcpus,
        }
    }

    /// Adds the config and key (copied onto the VM's disk) and the size.
    pub fn apply(&self, spec: &mut ReplicaSpec) -> Result<(), HostdError> {
        let key = self
            .keys
            .get(&spec.exec)
            .ok_or_else(|| HostdError::Internal(format!("no key for {}", spec.exec)))?;
        spec.env.push((
            "ZZ_CONFIG".into(),
            self.config.to_string_lossy().into_owned(),
        ));
        spec.env
            .push(("ZZ_KEY_FILE".into(), key.to_string_lossy().into_owned()));
        if let Ok(filter) = std::env::var("ZZ_GUEST_LOG") {
            spec.env.push(("RUST_LOG".into(), filter));
        }
        spec.memory_mib = self.memory_mib;
        spec.vcpus = self.vcpus;
        Ok(())
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// How many times in all a guest that stops before it answers is started
/// (at boot) or rebuilt (after a reimage) before the host agent gives up on
/// it.
const BOOT_ATTEMPTS: u32 = 3;

/// Waits for `exec`'s guest to answer the handshake (its count above
/// `seen`), at most `timeout` per attempt. A guest that stops before it
/// answers (its executor failed to start and powered the VM off) has the end
/// of its console log written to this log, and is started again with
/// `retry` (`Wake` restarts it with its state, `Reimage` rebuilds it), up to
/// [`BOOT_ATTEMPTS`] in all. Whether it answered.
pub async fn await_guest(
    backend: &Arc<Mutex<HostBackend>>,
    exec: ExecId,
    ready: &GuestReady,
    mut seen: u64,
    timeout: Duration,
    retry: HostAction,
    mode: DormantMode,
) -> Result<bool, HostdError> {
    let internal = |e: tokio::task::JoinError| HostdError::Internal(e.to_string());
    let mut attempt = 1;
    let mut deadline = tokio::time::Instant::now() + timeout;
    loop {
        if ready
            .wait_above(exec, seen, Duration::from_millis(500))
            .await
        {
            return Ok(true);
        }
        let b = backend.clone();
        let (state, console) = tokio::task::spawn_blocking(move || {
            let mut b = lock(&b);
            let state = b.state(exec);
            let console = b.console_tail(exec, 20);
            (state, console)
        })
        .await
        .map_err(internal)?;
        let stopped = matches!(
            state,
            Ok(ReplicaState::Exited { .. } | ReplicaState::Crashed { .. })
        );
        if stopped {
            tracing::warn!(%exec, state = ?state, attempt,
                console = console.as_deref().unwrap_or("(no console log)"),
                "guest stopped before it answered");
            if attempt >= BOOT_ATTEMPTS {
                return Ok(false);
            }
            attempt += 1;
            seen = ready.count(exec);
            let b = backend.clone();
            tokio::task::spawn_blocking(move || carry_out(&mut *lock(&b), exec, retry, mode))
                .await
                .map_err(internal)??;
            deadline = tokio::time::Instant::now() + timeout;
            continue;
        }
        if tokio::time::Instant::now() >= deadline {
            return Ok(false);
        }
    }
}

/// Waits until every VM of `logs` (all of this host's) has booted and
/// answered the handshake, so agreement replicas are accepted (the host
/// agent listens) only once every replica can execute: a first order sent
/// to a VM still booting would time out and wake a dormant replica for
/// nothing.
pub async fn wait_booted(
    backend: &Arc<Mutex<HostBackend>>,
    ready: &GuestReady,
    modes: &crate::lifecycle::DormantModes,
    vm: &VmOptions,
    logs: &HashMap<ExecId, PathBuf>,
) -> Result<(), HostdError> {
    for (exec, log) in logs {
        let mode = modes.of(exec.app);
        if !await_guest(
            backend,
            *exec,
            ready,
            0,
            vm.boot_timeout,
            HostAction::Wake,
            mode,
        )
        .await?
        {
            return Err(HostdError::GuestTimeout {
                path: PathBuf::from(exec.to_string()),
                log: log.clone(),
                secs: vm.boot_timeout.as_secs(),
            });
        }
    }
    tracing::info!(vms = logs.len(), "every VM booted");
    Ok(())
}

/// Waits for each of `execs` to boot, then puts it to sleep.
pub async fn sleep_when_ready(
    backend: &Arc<Mutex<HostBackend>>,
    execs: Vec<ExecId>,
    ready: &GuestReady,
    modes: &crate::lifecycle::DormantModes,
    vm: &VmOptions,
    logs: &HashMap<ExecId, PathBuf>,
) -> Result<(), HostdError> {
    for exec in execs {
        let mode = modes.of(exec.app);
        if !await_guest(
            backend,
            exec,
            ready,
            0,
            vm.boot_timeout,
            HostAction::Wake,
            mode,
        )
        .await?
        {
            return Err(HostdError::GuestTimeout {
                path: PathBuf::from(exec.to_string()),
                log: logs.get(&exec).cloned().unwrap_or_default(),
                secs: vm.boot_timeout.as_secs(),
            });
        }
        let b = backend.clone();
        let state = tokio::task::spawn_blocking(move || {
            carry_out(&mut *lock(&b), exec, HostAction::Sleep, mode)
        })
        .await
        .map_err(|e| HostdError::Internal(e.to_string()))??;
        tracing::info!(%exec, %state, "replica booted and put to sleep");
    }
    Ok(())
}

/// After a reimage: waits for the rebuilt guest's handshake (count above
/// `seen`; a guest that stops first is rebuilt again, see [`await_guest`]),
/// then puts it to sleep.
pub async fn sleep_after_boot(
    backend: &Arc<Mutex<HostBackend>>,
    exec: ExecId,
    ready: &GuestReady,
    seen: u64,
    mode: DormantMode,
) -> Result<Result<ReplicaState, LifecycleError>, tokio::task::JoinError> {
    let timeout = VmOptions::default().boot_timeout;
    match await_guest(
        backend,
        exec,
        ready,
        seen,
        timeout,
        HostAction::Reimage,
        mode,
    )
    .await
    {
        Ok(true) => {}
        Ok(false) => {
            tracing::warn!(%exec, "rebuilt guest did not answer; putting it to sleep anyway")
        }
        Err(e) => tracing::warn!(%exec, error = %e, "rebuilding the guest failed"),
    }
    let b = backend.clone();
    tokio::task::spawn_blocking(move || carry_out(&mut *lock(&b), exec, HostAction::Sleep, mode))
        .await
}
