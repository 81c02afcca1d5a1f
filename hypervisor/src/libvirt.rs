//! The libvirt backend: each execution replica is a QEMU virtual machine
//! managed through libvirt (crate `virt`), DESIGN §6.
//!
//! - **The guest** is the image `zzctl image build` makes (crate
//!   `zz-images`): a Debian cloud kernel and an initramfs whose `/init` is the
//!   static `zz-executor` (see `zz_executor::guest`). The domain has no
//!   network card; its only devices are a virtio disk holding the executor's
//!   state and a virtio-serial port (`zz.0`) whose host side is a unix
//!   socket libvirt binds at [`ReplicaSpec::socket`]; the host agent connects
//!   to it (see `crate::vmlink`). The serial console is appended to
//!   [`ReplicaSpec::log`].
//! - **Domain XML** comes from [`LibvirtConfig`] and the spec
//!   ([`domain_xml`]): memory, vCPUs, kernel, initrd, command line, the
//!   disk, the channel, `<memballoon model='none'/>`, `acpi` and `apic`
//!   (without them the guest falls back to a 250 Hz tick), a 16 MiB TCG
//!   translation cache, and `destroy` on poweroff, reboot and crash (a dying
//!   executor makes its domain stop). The domain type is `kvm` where the CPU
//!   has hardware virtualization and `qemu` (TCG) otherwise
//!   ([`Accel::detect`]).
//! - **Names** are `zz-<namespace>-a<app>e<index>`; the namespace is per
//!   deployment (and host), so two deployments never touch each other's
//!   domains.
//! - **The state disk** is a sparse raw file `disk.img` in the state folder,
//!   formatted ext4 on the host (`mkfs.ext4 -d`) with the files the guest
//!   needs: the cluster config and the replica's key (given as the
//!   `ZZ_CONFIG` and `ZZ_KEY_FILE` entries of [`ReplicaSpec::env`], copied
//!   into `seed/` on the disk and renamed in the guest's environment) and a
//!   fault plan if the state folder holds one. The rest of
//!   [`ReplicaSpec::env`] and the `ZZ_*` variables go on the kernel command
//!   line, which the kernel hands to `/init` as its environment. Reimage
//!   wipes the folder and makes a fresh disk.
//! - **Operations**: define (`virDomainDefineXML`; a stale domain of the same
//!   name is removed first), start (`virDomainCreate`, after discarding any
//!   managed save so a start is always a fresh boot), pause/resume
//!   (`virDomainSuspend`/`Resume`), save (managed save, restored running),
//!   restore (`virDomainCreate` from the managed save), destroy, undefine,
//!   reimage. Every call blocks (libvirt's API is synchronous), as the
//!   [`ReplicaLifecycle`] trait expects; the host agent runs them on its
//!   blocking pool.
//! - **Errors** name their cause and fix ([`LibvirtError`]): libvirtd not
//!   running, a domain that vanished, a missing guest image.
//! - Dropping the backend destroys and undefines every domain it defined,
//!   managed saves included.
//!
//! The connection is closed by hand, never by `virt`'s `Drop` (which panics
//! when closing fails); a connection that died (libvirtd restarted) is
//! reopened on the next operation.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::fs;
use std::mem::ManuallyDrop;
use std::path::{Path, PathBuf};
use std::process::Command;

use virt::connect::Connect;
use virt::domain::{Domain, DomainState};
use virt::enumutil::Enum;
use virt::error::ErrorNumber;
use zz_wire::exec::ExecId;

use crate::lifecycle::{LifecycleError, ReplicaLifecycle, ReplicaSpec, ReplicaState};
use crate::process::STATE_DIR_MARKER;

const BACKEND: &str = "libvirt";

/// Name of the virtio-serial port the executor opens in the guest.
pub const CHANNEL_NAME: &str = "zz.0";
/// The state disk's file name in the replica's state folder.
pub const DISK_FILE: &str = "disk.img";
/// Where the guest mounts its state disk; its `ZZ_STATE_DIR`.
pub const GUEST_STATE_DIR: &str = "/state";
/// Environment entries of a spec that name host files the guest needs; they
/// are copied onto the state disk.
pub const FILE_VARS: &[&str] = &["ZZ_CONFIG", "ZZ_KEY_FILE"];
/// The fault plan's name in a state folder (as `zz_executor::setup::FAULTS_FILE`).
const FAULTS_FILE: &str = "faults.toml";
/// Smallest guest memory this kernel boots in reliably.
pub const MIN_MEMORY_MIB: u32 = 80;

/// Why the libvirt backend failed. Every message names the cause and the fix.
#[derive(Debug, thiserror::Error)]
pub enum LibvirtError {
    #[error(
        "cannot connect to libvirt at {uri}: {message}; is libvirtd running? \
         Start it with `bash scripts/setup-libvirt` (or `libvirtd -d`)"
    )]
    Connect { uri: String, message: String },
    #[error(
        "guest {what} {path} not found; build the guest image with \
         `cargo run -p zzctl -- image build`"
    )]
    ImageMissing { what: &'static str, path: PathBuf },
    #[error(
        "domain {name} is gone from libvirt (undefined outside zz?); it has been \
         redefined, retry the operation or restart the host agent"
    )]
    DomainMissing { name: String },
    #[error("libvirt refused to {op} domain {name}: {message}")]
    Call {
        op: &'static str,
        name: String,
        message: String,
    },
    #[error(
        "cannot make the state disk {path}: {message}; is `mkfs.ext4` (e2fsprogs) \
         installed and the folder writable?"
    )]
    Disk { path: PathBuf, message: String },
    #[error("guest memory {0} MiB is below the {MIN_MEMORY_MIB} MiB the guest kernel needs")]
    Memory(u32),
}

/// Which QEMU accelerator domains use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Accel {
    /// Hardware virtualization (`<domain type='kvm'>`).
    Kvm,
    /// Software emulation, TCG (`<domain type='qemu'>`).
    Tcg,
}

impl Accel {
    /// KVM if `/proc/cpuinfo` shows `vmx` or `svm`, else TCG. A `/dev/kvm`
    /// without those flags is a software backend far slower than TCG.
    pub fn detect() -> Accel {
        let info = fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        if cpu_has_virtualization(&info) {
            Accel::Kvm
        } else {
            Accel::Tcg
        }
    }

    /// Parses `auto`, `kvm` or `tcg` (`qemu` is accepted for TCG).
    pub fn parse(s: &str) -> Option<Accel> {
        match s {
            "auto" | "" => Some(Accel::detect()),
            "kvm" => Some(Accel::Kvm),
            "tcg" | "qemu" => Some(Accel::Tcg),
            _ => None,
        }
    }

    fn domain_type(self) -> &'static str {
        match self {
            Accel::Kvm => "kvm",
            Accel::Tcg => "qemu",
        }
    }
}

/// Whether a `/proc/cpuinfo` text shows hardware virtualization.
pub fn cpu_has_virtualization(cpuinfo: &str) -> bool {
    cpuinfo
        .lines()
        .filter(|l| l.starts_with("flags"))
        .any(|l| l.split_whitespace().any(|f| f == "vmx" || f == "svm"))
}

/// The kernel and initramfs every replica boots.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GuestImage {
    pub kernel: PathBuf,
    pub initrd: PathBuf,
}

impl GuestImage {
    /// The image in `dir` as `zzctl image build` writes it.
    pub fn in_dir(dir: &Path) -> GuestImage {
        GuestImage {
            kernel: dir.join("vmlinuz"),
            initrd: dir.join("initrd.cpio"),
        }
    }

    /// Checks that both files exist.
    pub fn check(&self) -> Result<(), LibvirtError> {
        for (what, path) in [("kernel", &self.kernel), ("initramfs", &self.initrd)] {
            if !path.is_file() {
                return Err(LibvirtError::ImageMissing {
                    what,
                    path: path.clone(),
                });
            }
        }
        Ok(())
    }
}

/// Host-wide settings of the libvirt backend.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LibvirtConfig {
    /// Connection URI, e.g. `qemu:///system` or `qemu+ssh://host/system`.
    pub uri: String,
    /// Part of every domain name: one per deployment and host.
    pub namespace: String,
    pub image: GuestImage,
    pub accel: Accel,
    /// Kernel arguments before the replica's environment.
    pub cmdline: String,
    /// Size of each replica's (sparse) state disk.
    pub disk_mib: u32,
}

impl LibvirtConfig {
    /// Defaults for `qemu:///system`: accelerator detected, 2 GiB disks.
    pub fn new(uri: impl Into<String>, namespace: impl Into<String>, image: GuestImage) -> Self {
        LibvirtConfig {
            uri: uri.into(),
            namespace: namespace.into(),
            image,
            accel: Accel::detect(),
            cmdline: "console=ttyS0 panic=-1 quiet tsc=reliable nowatchdog nmi_watchdog=0 \
                      mitigations=off"
                .into(),
            disk_mib: 2048,
        }
    }

    /// The domain name of a replica.
    pub fn domain_name(&self, exec: ExecId) -> String {
        format!("zz-{}-a{}e{}", self.namespace, exec.app, exec.index)
    }
}

fn xml_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '\'' => out.push_str("&apos;"),
            '"' => out.push_str("&quot;"),
            c => out.push(c),
        }
    }
    out
}

/// The guest environment of a replica: the `ZZ_*` variables with the
/// guest's paths, and the spec's own entries (host files renamed to their
/// copies on the state disk). Values with spaces cannot be passed.
pub fn guest_env(spec: &ReplicaSpec) -> Vec<(String, String)> {
    let mut env = vec![
        ("ZZ_APP".to_string(), spec.exec.app.to_string()),
        ("ZZ_EXEC_INDEX".to_string(), spec.exec.index.to_string()),
        ("ZZ_STATE_DIR".to_string(), GUEST_STATE_DIR.to_string()),
        ("ZZ_SOCKET".to_string(), format!("virtio:{CHANNEL_NAME}")),
    ];
    for (k, v) in &spec.env {
        let v = if FILE_VARS.contains(&k.as_str()) {
            format!("{GUEST_STATE_DIR}/seed/{}", seed_name(k))
        } else {
            v.clone()
        };
        env.push((k.clone(), v));
    }
    env
}

/// The file name a host file passed in variable `var` gets on the disk.
fn seed_name(var: &str) -> String {
    var.trim_start_matches("ZZ_").to_ascii_lowercase()
}

/// The kernel command line of a replica.
pub fn cmdline(cfg: &LibvirtConfig, spec: &ReplicaSpec) -> String {
    let mut line = cfg.cmdline.clone();
    for (k, v) in guest_env(spec) {
        if v.is_empty() || v.contains(char::is_whitespace) {
            tracing::warn!(exec = %spec.exec, var = %k, "value with spaces not passed to the guest");
            continue;
        }
        let _ = write!(line, " {k}={v}");
    }
    line
}

/// The domain XML of a replica.
pub fn domain_xml(cfg: &LibvirtConfig, spec: &ReplicaSpec) -> String {
    let name = cfg.domain_name(spec.exec);
    let tcg = if cfg.accel == Accel::Tcg {
        "<tcg><tb-cache unit='MiB'>16</tb-cache></tcg>"
    } else {
        ""
    };
    let console = match &spec.log {
        Some(p) => format!(
            "<serial type='file'><source path='{}' append='on'/><target port='0'/></serial>",
            xml_escape(&p.to_string_lossy())
        ),
        None => "<serial type='null'><target port='0'/></serial>".to_string(),
    };
    let e = |p: &Path| xml_escape(&p.to_string_lossy());
    format!(
        "<domain type='{ty}'>\n\
         \x20 <name>{name}</name>\n\
         \x20 <description>zz execution replica {exec}</description>\n\
         \x20 <memory unit='MiB'>{mem}</memory>\n\
         \x20 <vcpu>{vcpus}</vcpu>\n\
         \x20 <os>\n\
         \x20   <type arch='x86_64'>hvm</type>\n\
         \x20   <kernel>{kernel}</kernel>\n\
         \x20   <initrd>{initrd}</initrd>\n\
         \x20   <cmdline>{cmdline}</cmdline>\n\
         \x20 </os>\n\
         \x20 <features><acpi/><apic/>{tcg}</features>\n\
         \x20 <clock offset='utc'/>\n\
         \x20 <on_poweroff>destroy</on_poweroff>\n\
         \x20 <on_reboot>destroy</on_reboot>\n\
         \x20 <on_crash>destroy</on_crash>\n\
         \x20 <devices>\n\
         \x20   <disk type='file' device='disk'>\n\
         \x20     <driver name='qemu' type='raw'/>\n\
         \x20     <source file='{disk}'/>\n\
         \x20     <target dev='vda' bus='virtio'/>\n\
         \x20   </disk>\n\
         \x20   <controller type='usb' model='none'/>\n\
         \x20   <channel type='unix'>\n\
         \x20     <source mode='bind' path='{socket}'/>\n\
         \x20     <target type='virtio' name='{chan}'/>\n\
         \x20   </channel>\n\
         \x20   {console}\n\
         \x20   <memballoon model='none'/>\n\
         \x20 </devices>\n\
         </domain>\n",
        ty = cfg.accel.domain_type(),
        exec = spec.exec,
        mem = spec.memory_mib,
        vcpus = spec.vcpus.max(1),
        kernel = e(&cfg.image.kernel),
        initrd = e(&cfg.image.initrd),
        cmdline = xml_escape(&cmdline(cfg, spec)),
        disk = e(&spec.state_dir.join(DISK_FILE)),
        socket = e(&spec.socket),
        chan = CHANNEL_NAME,
    )
}

/// A libvirt connection closed by hand (see the module doc).
struct Conn {
    inner: ManuallyDrop<Connect>,
}

impl Conn {
    fn open(uri: &str) -> Result<Conn, LibvirtError> {
        Connect::open(Some(uri))
            .map(|c| Conn {
                inner: ManuallyDrop::new(c),
            })
            .map_err(|e| LibvirtError::Connect {
                uri: uri.to_string(),
                message: e.message().to_string(),
            })
    }
}

impl Drop for Conn {
    fn drop(&mut self) {
        // SAFETY: the pointer is the one `Connect::open` returned and the
        // wrapper is never used again (ManuallyDrop: its own Drop never runs).
        let rc = unsafe { virt::sys::virConnectClose(self.inner.as_ptr()) };
        if rc < 0 {
            tracing::debug!("closing the libvirt connection failed (already closed?)");
        }
    }
}

fn lib_err(exec: ExecId, e: LibvirtError) -> LifecycleError {
    LifecycleError::Backend {
        backend: BACKEND,
        exec,
        message: e.to_string(),
    }
}

/// What the backend remembers of a replica.
struct Vm {
    spec: ReplicaSpec,
    name: String,
    xml: String,
    /// Started at least once since it was defined.
    started: bool,
    /// Stopped by `destroy`, not on its own.
    destroyed: bool,
    /// The domain handle, once looked up.
    dom: Option<Domain>,
}

/// The libvirt backend: every replica of one host (one URI).
pub struct LibvirtBackend {
    cfg: LibvirtConfig,
    conn: Option<Conn>,
    vms: BTreeMap<ExecId, Vm>,
}

impl LibvirtBackend {
    /// Connects to libvirt and checks the guest image.
    pub fn new(cfg: LibvirtConfig) -> Result<LibvirtBackend, LibvirtError> {
        cfg.image.check()?;
        // libvirt prints every error to stderr by default; ours are returned.
        virt::error::clear_error_callback();
        let conn = Conn::open(&cfg.uri)?;
        Ok(LibvirtBackend {
            cfg,
            conn: Some(conn),
            vms: BTreeMap::new(),
        })
    }

    /// The backend's settings.
    pub fn config(&self) -> &LibvirtConfig {
        &self.cfg
    }

    /// The domain name of a replica.
    pub fn domain_name(&self, exec: ExecId) -> String {
        self.cfg.domain_name(exec)
    }

    /// Where a replica's serial console is logged, if it is.
    pub fn console_log(&self, exec: ExecId) -> Option<PathBuf> {
        self.vms.get(&exec).and_then(|vm| vm.spec.log.clone())
    }

    fn conn(&mut self) -> Result<&Connect, LibvirtError> {
        let alive = self
            .conn
            .as_ref()
            .is_some_and(|c| c.inner.is_alive().unwrap_or(false));
        if !alive {
            self.conn = None;
            self.conn = Some(Conn::open(&self.cfg.uri)?);
        }
        Ok(&self.conn.as_ref().expect("just opened").inner)
    }

    fn vm(&self, exec: ExecId) -> Result<&Vm, LifecycleError> {
        self.vms
            .get(&exec)
            .ok_or(LifecycleError::UnknownReplica(exec))
    }

    /// The replica's domain; one that vanished is redefined and reported.
    /// The replica's domain handle (looked up once, then cached); one that
    /// vanished is redefined and reported.
    fn domain(&mut self, exec: ExecId) -> Result<Domain, LifecycleError> {
        if let Some(d) = &self.vm(exec)?.dom {
            return Ok(d.clone());
        }
        let name = self.vm(exec)?.name.clone();
        let conn = self.conn().map_err(|e| lib_err(exec, e))?;
        match conn.lookup_domain_by_name(&name) {
            Ok(d) => {
                if let Some(vm) = self.vms.get_mut(&exec) {
                    vm.dom = Some(d.clone());
                }
                Ok(d)
            }
            Err(e) if e.code() == Enum::Known(ErrorNumber::NoDomain) => Err(self.vanished(exec)),
            Err(e) => Err(self.call_err(exec, "look up", e)),
        }
    }

    /// Redefines a domain that vanished behind our back; the error to report.
    fn vanished(&mut self, exec: ExecId) -> LifecycleError {
        let Some(vm) = self.vms.get_mut(&exec) else {
            return LifecycleError::UnknownReplica(exec);
        };
        vm.dom = None;
        let (name, xml) = (vm.name.clone(), vm.xml.clone());
        tracing::warn!(%exec, domain = %name, "domain vanished; redefining it");
        if let Ok(conn) = self.conn() {
            let _ = conn.define_domain_xml(&xml);
        }
        lib_err(exec, LibvirtError::DomainMissing { name })
    }

    fn call_err(&self, exec: ExecId, op: &'static str, e: virt::error::Error) -> LifecycleError {
        let name = self.domain_name(exec);
        let e = if e.code() == Enum::Known(ErrorNumber::NoDomain) {
            LibvirtError::DomainMissing { name }
        } else if matches!(
            e.code(),
            Enum::Known(ErrorNumber::NoConnect | ErrorNumber::SystemError | ErrorNumber::Rpc)
        ) {
            LibvirtError::Connect {
                uri: self.cfg.uri.clone(),
                message: e.message().to_string(),
            }
        } else {
            LibvirtError::Call {
                op,
                name,
                message: e.message().to_string(),
            }
        };
        lib_err(exec, e)
    }

    /// The libvirt state of a domain: (active, paused, has managed save, shutoff reason is crash).
    /// The libvirt state of a domain (a managed save is looked for only
    /// when it is shut off).
    fn raw_state(d: &Domain) -> Result<RawState, virt::error::Error> {
        Ok(match d.info()?.state {
            Enum::Known(DomainState::Paused | DomainState::PMSuspended) => RawState::Paused,
            Enum::Known(DomainState::Shutoff | DomainState::Crashed) => {
                if d.has_managed_save(0)? {
                    RawState::Saved
                } else {
                    RawState::Off
                }
            }
            _ => RawState::Running,
        })
    }

    fn state_of(&mut self, exec: ExecId) -> Result<(Domain, ReplicaState), LifecycleError> {
        let d = self.domain(exec)?;
        let raw = match Self::raw_state(&d) {
            Ok(r) => r,
            Err(e) if e.code() == Enum::Known(ErrorNumber::NoDomain) => {
                return Err(self.vanished(exec))
            }
            Err(e) => {
                // A stale handle (libvirtd restarted): look it up again next time.
                if let Some(vm) = self.vms.get_mut(&exec) {
                    vm.dom = None;
                }
                return Err(self.call_err(exec, "query", e));
            }
        };
        let vm = self.vm(exec)?;
        let state = match raw {
            RawState::Running => ReplicaState::Running,
            RawState::Paused => ReplicaState::Paused,
            RawState::Saved => ReplicaState::Saved,
            RawState::Off if !vm.started => ReplicaState::Defined,
            RawState::Off if vm.destroyed => ReplicaState::Destroyed,
            // It stopped on its own: the executor (PID 1) ended, the guest
            // powered off or panicked (on_* = destroy).
            RawState::Off => ReplicaState::Exited { code: -1 },
        };
        Ok((d, state))
    }

    fn invalid(
        &self,
        exec: ExecId,
        op: &'static str,
        state: ReplicaState,
        hint: &'static str,
    ) -> LifecycleError {
        LifecycleError::InvalidTransition {
            exec,
            op,
            state,
            hint,
        }
    }

    /// Makes a fresh state disk unless one exists.
    fn ensure_disk(&self, exec: ExecId) -> Result<(), LifecycleError> {
        let spec = &self.vm(exec)?.spec;
        let disk = spec.state_dir.join(DISK_FILE);
        if disk.is_file() {
            return Ok(());
        }
        make_disk(spec, &disk, self.cfg.disk_mib).map_err(|e| lib_err(exec, e))
    }

    /// Wipes the state folder (only a zz-created one).
    fn wipe(&self, exec: ExecId) -> Result<(), LifecycleError> {
        let dir = &self.vm(exec)?.spec.state_dir;
        let err = |source| LifecycleError::StateDir {
            exec,
            path: dir.clone(),
            source,
        };
        if !dir.join(STATE_DIR_MARKER).is_file() {
            return Err(LifecycleError::StateDirNotOurs {
                exec,
                path: dir.clone(),
            });
        }
        for entry in fs::read_dir(dir).map_err(err)? {
            let entry = entry.map_err(err)?;
            if entry.file_name() == STATE_DIR_MARKER {
                continue;
            }
            let path = entry.path();
            if entry.file_type().map_err(err)?.is_dir() {
                fs::remove_dir_all(&path).map_err(err)?;
            } else {
                fs::remove_file(&path).map_err(err)?;
            }
        }
        Ok(())
    }

    /// Destroys (if active), drops any managed save and undefines a domain
    /// by name; a missing domain is fine.
    fn remove_domain(&mut self, name: &str) -> Result<(), LibvirtError> {
        let conn = self.conn()?;
        let d = match conn.lookup_domain_by_name(name) {
            Ok(d) => d,
            Err(e) if e.code() == Enum::Known(ErrorNumber::NoDomain) => return Ok(()),
            Err(e) => {
                return Err(LibvirtError::Call {
                    op: "look up",
                    name: name.into(),
                    message: e.message().to_string(),
                })
            }
        };
        if d.is_active().unwrap_or(false) {
            d.destroy().map_err(|e| LibvirtError::Call {
                op: "destroy",
                name: name.into(),
                message: e.message().to_string(),
            })?;
        }
        d.undefine_flags(
            virt::sys::VIR_DOMAIN_UNDEFINE_MANAGED_SAVE | virt::sys::VIR_DOMAIN_UNDEFINE_NVRAM,
        )
        .map_err(|e| LibvirtError::Call {
            op: "undefine",
            name: name.into(),
            message: e.message().to_string(),
        })
    }

    /// Destroys and undefines every domain of this backend.
    pub fn remove_all(&mut self) {
        let names: Vec<(ExecId, String)> =
            self.vms.iter().map(|(e, v)| (*e, v.name.clone())).collect();
        for (exec, name) in names {
            match self.remove_domain(&name) {
                Ok(()) => tracing::info!(%exec, domain = %name, "domain removed"),
                Err(e) => {
                    tracing::warn!(%exec, domain = %name, error = %e, "removing domain failed")
                }
            }
        }
        self.vms.clear();
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum RawState {
    Running,
    Paused,
    Saved,
    Off,
}

/// Creates a sparse raw ext4 disk holding the guest's files (see the module doc).
fn make_disk(spec: &ReplicaSpec, disk: &Path, mib: u32) -> Result<(), LibvirtError> {
    let err = |message: String| LibvirtError::Disk {
        path: disk.to_path_buf(),
        message,
    };
    let root = spec.state_dir.join(".disk-root");
    let _ = fs::remove_dir_all(&root);
    let seed = root.join("seed");
    fs::create_dir_all(&seed).map_err(|e| err(e.to_string()))?;
    for (k, v) in &spec.env {
        if FILE_VARS.contains(&k.as_str()) {
            fs::copy(v, seed.join(seed_name(k)))
                .map_err(|e| err(format!("copying {k}={v}: {e}")))?;
        }
    }
    let faults = spec.state_dir.join(FAULTS_FILE);
    if faults.is_file() {
        fs::copy(&faults, root.join(FAULTS_FILE)).map_err(|e| err(e.to_string()))?;
    }
    let tmp = disk.with_extension("tmp");
    let f = fs::File::create(&tmp).map_err(|e| err(e.to_string()))?;
    f.set_len(u64::from(mib) << 20)
        .map_err(|e| err(e.to_string()))?;
    drop(f);
    let out = Command::new("mkfs.ext4")
        .args(["-q", "-F", "-m", "0", "-E", "root_owner=0:0", "-d"])
        .arg(&root)
        .arg(&tmp)
        .output()
        .map_err(|e| err(format!("running mkfs.ext4: {e}")))?;
    let _ = fs::remove_dir_all(&root);
    if !out.status.success() {
        let _ = fs::remove_file(&tmp);
        return Err(err(format!(
            "mkfs.ext4 failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    fs::rename(&tmp, disk).map_err(|e| err(e.to_string()))
}

/// Creates the state folder if needed and claims it with the marker; an
/// existing non-empty folder without the marker is refused.
fn prepare_state_dir(exec: ExecId, dir: &Path) -> Result<(), LifecycleError> {
    let err = |source| LifecycleError::StateDir {
        exec,
        path: dir.to_path_buf(),
        source,
    };
    fs::create_dir_all(dir).map_err(err)?;
    let marker = dir.join(STATE_DIR_MARKER);
    if marker.is_file() {
        return Ok(());
    }
    if fs::read_dir(dir).map_err(err)?.next().is_some() {
        return Err(LifecycleError::StateDirNotOurs {
            exec,
            path: dir.to_path_buf(),
        });
    }
    fs::write(&marker, format!("zz state folder of {exec}\n")).map_err(err)
}

impl ReplicaLifecycle for LibvirtBackend {
    fn backend(&self) -> &'static str {
        BACKEND
    }

    fn define(&mut self, spec: ReplicaSpec) -> Result<(), LifecycleError> {
        let exec = spec.exec;
        if self.vms.contains_key(&exec) {
            return Err(LifecycleError::AlreadyDefined(exec));
        }
        if spec.memory_mib < MIN_MEMORY_MIB {
            return Err(lib_err(exec, LibvirtError::Memory(spec.memory_mib)));
        }
        self.cfg.image.check().map_err(|e| lib_err(exec, e))?;
        prepare_state_dir(exec, &spec.state_dir)?;
        let name = self.cfg.domain_name(exec);
        // A domain of the same name is a leftover of this deployment (a host
        // agent killed without cleanup): remove it.
        self.remove_domain(&name).map_err(|e| lib_err(exec, e))?;
        let xml = domain_xml(&self.cfg, &spec);
        let conn = self.conn().map_err(|e| lib_err(exec, e))?;
        if let Err(e) = conn.define_domain_xml(&xml) {
            return Err(self.call_err(exec, "define", e));
        }
        tracing::info!(%exec, domain = %name, accel = ?self.cfg.accel, "domain defined");
        self.vms.insert(
            exec,
            Vm {
                spec,
                name,
                xml,
                started: false,
                destroyed: false,
                dom: None,
            },
        );
        Ok(())
    }

    fn undefine(&mut self, exec: ExecId) -> Result<(), LifecycleError> {
        let Some(vm) = self.vms.get(&exec) else {
            return Ok(());
        };
        let name = vm.name.clone();
        let (_, state) = self.state_of(exec)?;
        if state.is_live() {
            return Err(self.invalid(exec, "undefine", state, "destroy it first"));
        }
        self.remove_domain(&name).map_err(|e| lib_err(exec, e))?;
        self.vms.remove(&exec);
        Ok(())
    }

    fn start(&mut self, exec: ExecId) -> Result<(), LifecycleError> {
        let (d, state) = self.state_of(exec)?;
        match state {
            ReplicaState::Running => return Ok(()),
            ReplicaState::Paused => {
                return Err(self.invalid(exec, "start", state, "resume it instead"))
            }
            ReplicaState::Saved => {
                return Err(self.invalid(exec, "start", state, "restore it instead"))
            }
            _ => {}
        }
        self.ensure_disk(exec)?;
        d.create().map_err(|e| self.call_err(exec, "start", e))?;
        let vm = self.vms.get_mut(&exec).expect("checked");
        vm.started = true;
        vm.destroyed = false;
        tracing::info!(%exec, "domain started");
        Ok(())
    }

    fn pause(&mut self, exec: ExecId) -> Result<(), LifecycleError> {
        let (d, state) = self.state_of(exec)?;
        match state {
            ReplicaState::Paused => Ok(()),
            ReplicaState::Running => d.suspend().map_err(|e| self.call_err(exec, "pause", e)),
            s if s.is_dead() => Err(LifecycleError::Died {
                exec,
                op: "paused",
                state: s,
            }),
            s => Err(self.invalid(exec, "pause", s, "only a running replica can be paused")),
        }
    }

    fn resume(&mut self, exec: ExecId) -> Result<(), LifecycleError> {
        let (d, state) = self.state_of(exec)?;
        match state {
            ReplicaState::Running => Ok(()),
            ReplicaState::Paused => d.resume().map_err(|e| self.call_err(exec, "resume", e)),
            ReplicaState::Saved => Err(self.invalid(exec, "resume", state, "restore it instead")),
            s if s.is_dead() => Err(LifecycleError::Died {
                exec,
                op: "resumed",
                state: s,
            }),
            s => Err(self.invalid(exec, "resume", s, "start it instead")),
        }
    }

    fn save(&mut self, exec: ExecId) -> Result<(), LifecycleError> {
        let (d, state) = self.state_of(exec)?;
        match state {
            ReplicaState::Saved => Ok(()),
            ReplicaState::Running | ReplicaState::Paused => d
                .managed_save(virt::sys::VIR_DOMAIN_SAVE_RUNNING)
                .map_err(|e| self.call_err(exec, "save", e)),
            s if s.is_dead() => Err(LifecycleError::Died {
                exec,
                op: "saved",
                state: s,
            }),
            s => Err(self.invalid(exec, "save", s, "start it first")),
        }
    }

    fn restore(&mut self, exec: ExecId) -> Result<(), LifecycleError> {
        let (d, state) = self.state_of(exec)?;
        match state {
            ReplicaState::Running => Ok(()),
            ReplicaState::Saved => d.create().map_err(|e| self.call_err(exec, "restore", e)),
            ReplicaState::Paused => Err(self.invalid(exec, "restore", state, "resume it instead")),
            s => Err(self.invalid(exec, "restore", s, "start it instead")),
        }
    }

    fn destroy(&mut self, exec: ExecId) -> Result<(), LifecycleError> {
        let (d, state) = self.state_of(exec)?;
        if d.is_active().unwrap_or(false) {
            d.destroy().map_err(|e| self.call_err(exec, "destroy", e))?;
        }
        if state == ReplicaState::Saved || d.has_managed_save(0).unwrap_or(false) {
            d.managed_save_remove(0)
                .map_err(|e| self.call_err(exec, "drop the managed save of", e))?;
        }
        let vm = self.vms.get_mut(&exec).expect("checked");
        if vm.started {
            vm.destroyed = true;
        }
        Ok(())
    }

    fn reimage(&mut self, exec: ExecId) -> Result<(), LifecycleError> {
        self.destroy(exec)?;
        self.wipe(exec)?;
        let vm = self.vms.get_mut(&exec).expect("checked");
        vm.started = false;
        vm.destroyed = false;
        self.start(exec)
    }

    fn state(&mut self, exec: ExecId) -> Result<ReplicaState, LifecycleError> {
        self.state_of(exec).map(|(_, s)| s)
    }

    fn replicas(&self) -> Vec<ExecId> {
        self.vms.keys().copied().collect()
    }
}

impl Drop for LibvirtBackend {
    fn drop(&mut self) {
        self.remove_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> LibvirtConfig {
        let mut c = LibvirtConfig::new(
            "qemu:///system",
            "d1-h0",
            GuestImage::in_dir(Path::new("/img")),
        );
        c.accel = Accel::Tcg;
        c
    }

    fn spec() -> ReplicaSpec {
        let mut s = ReplicaSpec::new(
            ExecId { app: 3, index: 1 },
            "/var/zz/e'1",
            "/run/zz/a3e1.sock",
        );
        s.memory_mib = 96;
        s.vcpus = 1;
        s.env = vec![
            ("ZZ_CONFIG".into(), "/etc/zz/cluster.toml".into()),
            ("RUST_LOG".into(), "debug".into()),
        ];
        s.log = Some("/var/log/zz/a3e1.log".into());
        s
    }

    #[test]
    fn domain_xml_has_the_required_devices_and_settings() {
        let xml = domain_xml(&cfg(), &spec());
        for needle in [
            "<domain type='qemu'>",
            "<name>zz-d1-h0-a3e1</name>",
            "<memory unit='MiB'>96</memory>",
            "<vcpu>1</vcpu>",
            "<kernel>/img/vmlinuz</kernel>",
            "<initrd>/img/initrd.cpio</initrd>",
            "<features><acpi/><apic/><tcg><tb-cache unit='MiB'>16</tb-cache></tcg></features>",
            "<on_poweroff>destroy</on_poweroff>",
            "<on_reboot>destroy</on_reboot>",
            "<on_crash>destroy</on_crash>",
            "<source mode='bind' path='/run/zz/a3e1.sock'/>",
            "<target type='virtio' name='zz.0'/>",
            "<memballoon model='none'/>",
            "<source file='/var/zz/e&apos;1/disk.img'/>",
            "<source path='/var/log/zz/a3e1.log' append='on'/>",
        ] {
            assert!(xml.contains(needle), "missing {needle} in\n{xml}");
        }
        assert!(!xml.contains("<interface"), "no network card");
        let mut kvm = cfg();
        kvm.accel = Accel::Kvm;
        let xml = domain_xml(&kvm, &spec());
        assert!(xml.contains("<domain type='kvm'>") && !xml.contains("tb-cache"));
    }

    #[test]
    fn the_guest_environment_goes_on_the_command_line_with_guest_paths() {
        let line = cmdline(&cfg(), &spec());
        assert!(line.starts_with("console=ttyS0 panic=-1"));
        for needle in [
            " ZZ_APP=3",
            " ZZ_EXEC_INDEX=1",
            " ZZ_STATE_DIR=/state",
            " ZZ_SOCKET=virtio:zz.0",
            " ZZ_CONFIG=/state/seed/config",
            " RUST_LOG=debug",
        ] {
            assert!(line.contains(needle), "missing {needle} in {line}");
        }
        assert!(!line.contains("/etc/zz"), "host paths stay on the host");
    }

    #[test]
    fn accelerator_follows_the_cpu_flags() {
        assert!(cpu_has_virtualization("flags\t\t: fpu vme vmx sse\n"));
        assert!(cpu_has_virtualization("flags\t\t: fpu svm\n"));
        assert!(!cpu_has_virtualization(
            "flags\t\t: fpu vme sse hypervisor\n"
        ));
        assert_eq!(Accel::parse("kvm"), Some(Accel::Kvm));
        assert_eq!(Accel::parse("tcg"), Some(Accel::Tcg));
        assert_eq!(Accel::parse("xen"), None);
    }

    #[test]
    fn errors_name_cause_and_fix() {
        let e = LibvirtError::Connect {
            uri: "qemu:///system".into(),
            message: "Failed to connect socket".into(),
        };
        assert!(e.to_string().contains("libvirtd running"));
        assert!(e.to_string().contains("scripts/setup-libvirt"));
        let e = LibvirtError::ImageMissing {
            what: "kernel",
            path: "/x/vmlinuz".into(),
        };
        assert!(e.to_string().contains("zzctl -- image build"));
        let e = LibvirtError::DomainMissing {
            name: "zz-x".into(),
        };
        assert!(e.to_string().contains("zz-x"));
    }

    #[test]
    fn a_missing_image_is_refused_before_connecting() {
        let err = LibvirtBackend::new(cfg()).err().expect("no image at /img");
        assert!(matches!(
            err,
            LibvirtError::ImageMissing { what: "kernel", .. }
        ));
    }
}
