//! The host agent (`zz-hostd`): runs the execution replicas placed on one
//! host, relays their frames, and carries out authorized host commands
//! (DESIGN §3, §6).
//!
//! ```text
//!  agreement replicas ══TCP══► hostd ◄══unix socket══► zz-executor (one per replica)
//!       Hello, then Frame::Exec (orders, stable)   ─►  LinkFrame::Exec
//!       Frame::HostCommand ─► CommandGate ─► carry_out (blocking pool)
//!       Frame::Exec (executed, checkpoints)   ◄─   LinkFrame::Exec
//!                                    LinkFrame::Fetch ◄─► between local executors
//!  other host agents ══TCP══► hostd     Frame::Fetch ◄─► executors on other hosts
//! ```
//!
//! - **Replicas.** At start every execution replica of the config placed on
//!   this host is defined with the process backend (its executor program is
//!   `zz-executor` beside this binary unless overridden), and started;
//!   indices `0..=f` stay active, the rest are put to sleep at once
//!   (dormant, in the configured mode). Each has a state folder
//!   `<data_dir>/host-<name>/exec-a<app>-e<index>` (wiped by a reimage), a
//!   log `<…>/logs/exec-a<app>-e<index>.log`, and a unix socket
//!   `<…>/sock/a<app>e<index>.sock` the host agent listens on and passes in
//!   `ZZ_SOCKET`; the socket identifies the replica, so nothing an executor
//!   sends can claim to be another.
//!   On a host with `backend = "libvirt"` each replica is a VM instead
//!   ([`crate::libvirt`], [`crate::hostd_vm`]): libvirt binds that socket
//!   for the VM's virtio-serial port and the host agent connects to it
//!   ([`crate::vmlink`]); dormant VMs are put to sleep once booted. The
//!   dormant mode is per app (`execution.dormant_apps`, else
//!   `execution.dormant`).
//! - **Agreement links.** The host agent listens on its `addr`. An agreement
//!   replica's connection starts with a signed
//!   [`Hello`](zz_agreement::hostlink::Hello) naming this host; executor
//!   output routed `ToAgreement { to }` goes to every open connection whose
//!   hello named `to` (a replayed hello only earns copies of MAC'd frames).
//!   Envelopes routed `ToExecutor { to }` go to executor `to`'s stream; while
//!   it is not connected (a woken replica connects a moment after its first
//!   orders arrive) they wait in a bounded backlog, delivered first when it
//!   connects. The host agent cannot open or forge envelopes; it only routes.
//! - **Host commands** go to the [`CommandGate`]; each action that f+1
//!   distinct agreement replicas signed is carried out once, in order, on the
//!   blocking pool: `Wake` resumes (or restores, or restarts), `Sleep` makes
//!   dormant, `Reimage` destroys, wipes and restarts the replica, then puts it
//!   to sleep: a rebuilt replica is dormant until woken.
//! - **State fetch** frames are relayed by target [`ExecId`]: to the
//!   target's stream if it runs here, else over the link to the host agent
//!   of the host it is placed on ([`crate::hostpeer`]). A request that cannot
//!   be delivered (target not connected, peer host unreachable) is answered
//!   at once with a refusal so the fetcher asks another peer. A connection
//!   that starts with [`Frame::HostPeer`] is such a link from another host
//!   agent: its fetch frames are delivered here if the placement agrees.
//! - **Shutdown** on SIGTERM or SIGINT: every replica is destroyed and the
//!   sockets are removed.
//!
//! Network input never panics the host agent: malformed, oversized,
//! unauthenticated or misrouted frames are dropped and counted in
//! [`HostStats`] (an oversized frame closes its connection).

use std::collections::HashMap;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufWriter};
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::{mpsc, watch};
use zz_agreement::hostlink::Hello;
use zz_executor::link::{FetchHead, LinkFrame, MAX_LINK_FRAME};
use zz_executor::FaultPlan;
use zz_wire::codec;
use zz_wire::config::{ClusterConfig, HostEntry};
use zz_wire::exec::{ExecId, ExecRoute, HostAction};
use zz_wire::frame::{FrameDecoder, DEFAULT_MAX_FRAME};
use zz_wire::message::Frame;
use zz_wire::ReplicaId;

use crate::gate::{CommandGate, Fire, Verdict};
use crate::hostbackend::HostBackend;
use crate::hostpeer::HostPeers;
use crate::lifecycle::{carry_out, LifecycleError, ReplicaLifecycle, ReplicaSpec};
use crate::process::{ProcessBackend, ProcessConfig};
use crate::relay::{self, FromExecutor, Outgoing};
use crate::vmlink::GuestReady;

/// Most bytes queued for one connection before frames to it are dropped.
const MAX_QUEUED_BYTES: usize = 64 * 1024 * 1024;
/// Most agreement connections open at once; more are refused.
pub const MAX_AGREEMENT_CONNECTIONS: usize = 256;
const READ_CHUNK: usize = 64 * 1024;
/// Longest unix socket path (`sun_path` holds 108 bytes with the NUL).
const MAX_SOCKET_PATH: usize = 107;

/// Why the host agent cannot start or stopped.
#[derive(Debug, thiserror::Error)]
pub enum HostdError {
    #[error("host `{0}` is not in the config's [[hosts]]")]
    UnknownHost(String),
    #[error(
        "host `{host}` uses the `{backend}` backend, which this host agent does not \
         support yet; use backend = \"process\""
    )]
    Backend { host: String, backend: String },
    #[error(transparent)]
    Libvirt(#[from] crate::libvirt::LibvirtError),
    #[error(
        "guest {path} did not announce itself within {secs} s after booting (see its \
         console log {log}); the machine may be overloaded or the image broken \
         (rebuild it with `cargo run -p zzctl -- image build`)"
    )]
    GuestTimeout {
        path: PathBuf,
        log: PathBuf,
        secs: u64,
    },
    #[error("fault plans are given, but the config does not set execution.allow_fault_injection")]
    FaultsNotAllowed,
    #[error("a fault plan names {0}, which is not placed on this host")]
    FaultForeign(ExecId),
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "socket path {0} is too long for a unix socket (at most {MAX_SOCKET_PATH} bytes); \
         use a shorter data_dir"
    )]
    SocketPath(PathBuf),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
    #[error(transparent)]
    Lifecycle(#[from] LifecycleError),
    #[error(transparent)]
    Gate(#[from] crate::gate::GateConfigError),
    #[error("internal error: {0}")]
    Internal(String),
}

/// What a host agent runs with.
#[derive(Clone, Debug)]
pub struct HostdOptions {
    pub config: ClusterConfig,
    /// The config file, passed to executors (`--config`); made absolute.
    pub config_path: PathBuf,
    /// This host's name in the config.
    pub host: String,
    /// The executor program.
    pub executor: PathBuf,
    /// Where state folders, sockets and logs go (default
    /// `<data_dir>/host-<name>`).
    pub dir: PathBuf,
    /// Fault plans for drills, written into the replicas' state folders
    /// before they start (allowed only with `execution.allow_fault_injection`).
    pub faults: Vec<(ExecId, FaultPlan)>,
    /// Settings of a host on the libvirt backend.
    pub vm: crate::hostd_vm::VmOptions,
}

impl HostdOptions {
    /// Options with the executor beside the current executable and the
    /// default folder.
    pub fn new(config: ClusterConfig, config_path: PathBuf, host: String) -> Self {
        let executor = std::env::current_exe()
            .ok()
            .and_then(|p| p.parent().map(|d| d.join("zz-executor")))
            .unwrap_or_else(|| PathBuf::from("zz-executor"));
        let dir = config
            .resolve(&config.data_dir)
            .join(format!("host-{host}"));
        HostdOptions {
            config,
            config_path,
            host,
            executor,
            dir,
            faults: Vec::new(),
            vm: crate::hostd_vm::VmOptions::default(),
        }
    }
}

/// Counters of a running host agent.
#[derive(Debug, Default)]
pub struct HostStats {
    pub agreement_connections: AtomicU64,
    pub connections_refused: AtomicU64,
    pub hellos_rejected: AtomicU64,
    pub frames_in: AtomicU64,
    /// Frames that did not decode, or of a kind not expected on that link.
    pub frames_malformed: AtomicU64,
    pub frames_oversized: AtomicU64,
    /// Frames whose route or sender does not fit the link they came on.
    pub frames_misrouted: AtomicU64,
    /// Frames dropped: destination not connected, or its queue full.
    pub frames_dropped: AtomicU64,
    pub envelopes_to_executors: AtomicU64,
    pub envelopes_to_agreement: AtomicU64,
    pub fetch_relayed: AtomicU64,
    /// Fetch frames sent to, and received from, other host agents.
    pub fetch_to_hosts: AtomicU64,
    pub fetch_from_hosts: AtomicU64,
    pub commands_rejected: AtomicU64,
    pub commands_fired: AtomicU64,
    pub commands_failed: AtomicU64,
    /// Per-replica events and counters for operators (`crate::hostd_ops`).
    pub ops: crate::hostd_ops::OpsState,
}

fn inc(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

/// The sending side of one connection.
#[derive(Clone)]
struct Conn {
    id: u64,
    tx: mpsc::UnboundedSender<Outgoing>,
    queued: Arc<AtomicUsize>,
}

impl Conn {
    fn new(id: u64) -> (Conn, mpsc::UnboundedReceiver<Outgoing>) {
        let (tx, rx) = mpsc::unbounded_channel();
        (
            Conn {
                id,
                tx,
                queued: Arc::new(AtomicUsize::new(0)),
            },
            rx,
        )
    }

    fn send(&self, out: Outgoing, stats: &HostStats) -> bool {
        let len = out.len();
        if self.queued.load(Ordering::Relaxed) + len > MAX_QUEUED_BYTES {
            inc(&stats.frames_dropped);
            return false;
        }
        self.queued.fetch_add(len, Ordering::Relaxed);
        if self.tx.send(out).is_err() {
            self.queued.fetch_sub(len, Ordering::Relaxed);
            inc(&stats.frames_dropped);
            return false;
        }
        true
    }
}

/// Writes a connection's queue until it closes or a write fails.
async fn write_queued<W: tokio::io::AsyncWrite + Unpin>(
    w: W,
    mut rx: mpsc::UnboundedReceiver<Outgoing>,
    queued: Arc<AtomicUsize>,
) {
    let mut w = BufWriter::with_capacity(64 * 1024, w);
    while let Some(o) = rx.recv().await {
        queued.fetch_sub(o.len(), Ordering::Relaxed);
        if o.write_to(&mut w).await.is_err() {
            return;
        }
        while let Ok(o) = rx.try_recv() {
            queued.fetch_sub(o.len(), Ordering::Relaxed);
            if o.write_to(&mut w).await.is_err() {
                return;
            }
        }
        if w.flush().await.is_err() {
            return;
        }
    }
}

/// Most bytes kept for an executor that is not connected (a woken replica
/// connects a few milliseconds after the orders and checkpoint meant for it
/// arrive); beyond that the oldest frames are dropped.
const MAX_BACKLOG_BYTES: usize = 8 * 1024 * 1024;

/// Who is connected: executors by id, agreement replicas by connection.
#[derive(Default)]
struct Routes {
    executors: HashMap<ExecId, Conn>,
    /// Frames for hosted executors that are not connected right now.
    backlog: HashMap<ExecId, (usize, std::collections::VecDeque<Outgoing>)>,
    agreement: HashMap<u64, (ReplicaId, Conn)>,
}

struct Shared {
    me: String,
    stats: Arc<HostStats>,
    routes: Mutex<Routes>,
    replica_keys: Vec<ed25519_dalek::VerifyingKey>,
    gate: Mutex<CommandGate>,
    commands: mpsc::UnboundedSender<Fire>,
    next_conn: AtomicU64,
    /// Operator commands and status (set once the replicas are started).
    ops: std::sync::OnceLock<Arc<crate::hostd_ops::Ops>>,
    /// Placement of every replica, and the links to the other host agents.
    peers: Arc<HostPeers>,
}

impl Shared {
    fn routes(&self) -> std::sync::MutexGuard<'_, Routes> {
        self.routes.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues `frame` for a hosted executor: on its stream, or in its
    /// backlog while it is not connected. False for an executor not hosted here.
    fn to_executor(&self, to: ExecId, out: Outgoing) -> bool {
        let mut routes = self.routes();
        if let Some(c) = routes.executors.get(&to) {
            return c.send(out, &self.stats);
        }
        let Some((size, queue)) = routes.backlog.get_mut(&to) else {
            inc(&self.stats.frames_dropped);
            return false;
        };
        *size += out.len();
        queue.push_back(out);
        while *size > MAX_BACKLOG_BYTES {
            match queue.pop_front() {
                Some(old) => {
                    *size -= old.len();
                    inc(&self.stats.frames_dropped);
                }
                None => break,
            }
        }
        true
    }

    /// Whether `exec` is connected now (fetch requests to others are refused).
    fn connected(&self, exec: ExecId) -> bool {
        self.routes().executors.contains_key(&exec)
    }

    fn to_agreement(&self, to: ReplicaId, out: Outgoing) {
        let conns: Vec<Conn> = self
            .routes()
            .agreement
            .values()
            .filter(|(r, _)| *r == to)
            .map(|(_, c)| c.clone())
            .collect();
        if conns.is_empty() {
            inc(&self.stats.frames_dropped);
            return;
        }
        for c in conns {
            if c.send(out.clone(), &self.stats) {
                inc(&self.stats.envelopes_to_agreement);
            }
        }
    }
}

/// One replica placed on this host.
#[derive(Clone, Debug)]
struct Placed {
    exec: ExecId,
    state_dir: PathBuf,
    socket: PathBuf,
    log: PathBuf,
}

fn io_err<'a>(
    what: &'static str,
    path: &'a Path,
) -> impl FnOnce(std::io::Error) -> HostdError + 'a {
    move |source| HostdError::Io {
        what,
        path: path.to_path_buf(),
        source,
    }
}

/// A running host agent.
pub struct Hostd {
    pub stats: Arc<HostStats>,
    pub addr: std::net::SocketAddr,
    backend: Arc<Mutex<HostBackend>>,
    placed: Vec<Placed>,
    shutdown: watch::Sender<bool>,
}

impl Hostd {
    /// The replicas this host runs.
    pub fn executors(&self) -> Vec<ExecId> {
        self.placed.iter().map(|p| p.exec).collect()
    }

    /// Process id of a live replica (tests and diagnostics).
    pub fn pid(&self, exec: ExecId) -> Option<i32> {
        lock(&self.backend).pid(exec)
    }

    /// Runs until `stop` completes, then destroys every replica.
    pub async fn run_until(self, stop: impl Future<Output = ()>) -> Result<(), HostdError> {
        stop.await;
        self.shutdown().await
    }

    /// Destroys every replica, removes the sockets and stops every task.
    pub async fn shutdown(self) -> Result<(), HostdError> {
        let _ = self.shutdown.send(true);
        let backend = self.backend.clone();
        let execs = self.executors();
        tokio::task::spawn_blocking(move || {
            let mut b = lock(&backend);
            for e in execs {
                if let Err(err) = b.destroy(e) {
                    tracing::warn!(exec = %e, error = %err, "destroy at shutdown failed");
                }
            }
            if let HostBackend::Libvirt(l) = &mut *b {
                l.remove_all();
            }
        })
        .await
        .map_err(|e| HostdError::Internal(e.to_string()))?;
        for p in &self.placed {
            let _ = std::fs::remove_file(&p.socket);
        }
        let s = &self.stats;
        let ld = |c: &AtomicU64| c.load(Ordering::Relaxed);
        tracing::info!(
            frames_in = ld(&s.frames_in),
            hellos_rejected = ld(&s.hellos_rejected),
            oversized = ld(&s.frames_oversized),
            malformed = ld(&s.frames_malformed),
            misrouted = ld(&s.frames_misrouted),
            dropped = ld(&s.frames_dropped),
            to_executors = ld(&s.envelopes_to_executors),
            to_agreement = ld(&s.envelopes_to_agreement),
            fetch_relayed = ld(&s.fetch_relayed),
            fetch_to_hosts = ld(&s.fetch_to_hosts),
            fetch_from_hosts = ld(&s.fetch_from_hosts),
            commands_fired = ld(&s.commands_fired),
            "host agent stopped; replicas destroyed"
        );
        Ok(())
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Starts the host agent: binds its sockets, starts its replicas (dormant
/// beyond index f) and every task. Must be called inside a tokio runtime.
pub async fn start(opts: HostdOptions) -> Result<Hostd, HostdError> {
    let cfg = &opts.config;
    let host: HostEntry = cfg
        .hosts
        .iter()
        .find(|h| h.name == opts.host)
        .cloned()
        .ok_or_else(|| HostdError::UnknownHost(opts.host.clone()))?;
    let on_vms = host.backend == "libvirt";
    if !on_vms && host.backend != "process" {
        return Err(HostdError::Backend {
            host: host.name,
            backend: host.backend,
        });
    }
    if !opts.faults.is_empty() && !cfg.execution.allow_fault_injection {
        return Err(HostdError::FaultsNotAllowed);
    }
    let modes = Arc::new(crate::lifecycle::DormantModes::from_config(cfg));
    let mode = modes.default;
    let dir = &opts.dir;
    let sock_dir = dir.join("sock");
    let log_dir = dir.join("logs");
    for d in [dir, &sock_dir, &log_dir] {
        std::fs::create_dir_all(d).map_err(io_err("cannot create", d))?;
    }
    // Only this user may connect to the executors' sockets.
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&sock_dir, std::fs::Permissions::from_mode(0o700))
            .map_err(io_err("cannot restrict", &sock_dir))?;
    }
    let mut placed = Vec::new();
    for e in cfg.executors.iter().filter(|e| e.host == host.name) {
        let exec = ExecId {
            app: e.app,
            index: e.index,
        };
        let socket = sock_dir.join(format!("a{}e{}.sock", e.app, e.index));
        if socket.as_os_str().len() > MAX_SOCKET_PATH {
            return Err(HostdError::SocketPath(socket));
        }
        placed.push(Placed {
            exec,
            state_dir: dir.join(format!("exec-a{}-e{}", e.app, e.index)),
            socket,
            log: log_dir.join(format!("exec-a{}-e{}.log", e.app, e.index)),
        });
    }
    for (exec, _) in &opts.faults {
        if !placed.iter().any(|p| p.exec == *exec) {
            return Err(HostdError::FaultForeign(*exec));
        }
    }

    let stats = Arc::new(HostStats::default());
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let gate = CommandGate::new(
        cfg.f,
        cfg.replica_public_keys(),
        placed.iter().map(|p| p.exec),
    )?;
    let (cmd_tx, cmd_rx) = mpsc::unbounded_channel();
    let routes = Routes {
        backlog: placed
            .iter()
            .map(|p| (p.exec, (0, Default::default())))
            .collect(),
        ..Routes::default()
    };
    let shared = Arc::new(Shared {
        me: host.name.clone(),
        stats: stats.clone(),
        routes: Mutex::new(routes),
        replica_keys: cfg.replica_public_keys(),
        gate: Mutex::new(gate),
        commands: cmd_tx,
        next_conn: AtomicU64::new(1),
        ops: std::sync::OnceLock::new(),
        peers: HostPeers::start(cfg, &host.name, shutdown_rx.clone()),
    });

    // Listen on every replica's socket before starting it; for a VM,
    // libvirt binds it and the host agent connects (crate::vmlink).
    let guest_ready = Arc::new(GuestReady::default());
    for p in placed.iter().filter(|_| on_vms) {
        tokio::spawn(vm_link(
            p.exec,
            p.socket.clone(),
            shared.clone(),
            shutdown_rx.clone(),
            guest_ready.clone(),
        ));
    }
    for p in placed.iter().filter(|_| !on_vms) {
        let _ = std::fs::remove_file(&p.socket);
        let l = UnixListener::bind(&p.socket).map_err(io_err("cannot listen on", &p.socket))?;
        tokio::spawn(executor_accept(
            l,
            p.exec,
            shared.clone(),
            shutdown_rx.clone(),
        ));
    }

    let config_path =
        std::path::absolute(&opts.config_path).unwrap_or_else(|_| opts.config_path.clone());
    let pcfg = ProcessConfig::new(&opts.executor).args([
        "--config".to_string(),
        config_path.to_string_lossy().into_owned(),
    ]);
    let backend = Arc::new(Mutex::new(if on_vms {
        crate::hostd_vm::libvirt_backend(&opts, &host).await?
    } else {
        HostBackend::Process(ProcessBackend::new(pcfg))
    }));
    let vm_spec = on_vms.then(|| crate::hostd_vm::SpecFiles::new(&opts, &config_path));
    {
        let backend = backend.clone();
        let placed = placed.clone();
        let faults = opts.faults.clone();
        let f = cfg.f as u32;
        let all_active = cfg.execution.all_active;
        let logs: HashMap<ExecId, PathBuf> =
            placed.iter().map(|p| (p.exec, p.log.clone())).collect();
        let sleeper = backend.clone();
        let modes_start = modes.clone();
        let started = tokio::task::spawn_blocking(move || -> Result<Vec<ExecId>, HostdError> {
            let mut b = lock(&backend);
            let mut to_sleep = Vec::new();
            for p in &placed {
                let mut spec = ReplicaSpec::new(p.exec, &p.state_dir, &p.socket);
                spec.log = Some(p.log.clone());
                if let Some(files) = &vm_spec {
                    files.apply(&mut spec)?;
                }
                b.define(spec)?;
                if let Some((_, plan)) = faults.iter().find(|(e, _)| *e == p.exec) {
                    let path = p.state_dir.join(zz_executor::setup::FAULTS_FILE);
                    zz_executor::setup::write_fault_plan(&path, plan)
                        .map_err(io_err("cannot write", &path))?;
                    tracing::warn!(exec = %p.exec, ?plan, "fault plan installed for a drill");
                }
                b.start(p.exec)?;
                if p.exec.index > f && !all_active {
                    if vm_spec.is_some() {
                        // A VM sleeps once booted, so waking it costs no boot.
                        to_sleep.push(p.exec);
                    } else {
                        carry_out(
                            &mut *b,
                            p.exec,
                            HostAction::Sleep,
                            modes_start.of(p.exec.app),
                        )?;
                    }
                }
                tracing::info!(exec = %p.exec, state = %b.state(p.exec)?, "replica started");
            }
            Ok(to_sleep)
        })
        .await
        .map_err(|e| HostdError::Internal(e.to_string()))??;
        if on_vms {
            crate::hostd_vm::wait_booted(&sleeper, &guest_ready, &modes, &opts.vm, &logs).await?;
        }
        crate::hostd_vm::sleep_when_ready(&sleeper, started, &guest_ready, &modes, &opts.vm, &logs)
            .await?;
    }
    tokio::spawn(command_worker(
        cmd_rx,
        backend.clone(),
        on_vms.then(|| guest_ready.clone()),
        modes.clone(),
        stats.clone(),
        shutdown_rx.clone(),
    ));
    tokio::spawn(watchdog(
        backend.clone(),
        placed.iter().map(|p| p.exec).collect(),
        shutdown_rx.clone(),
    ));

    let ops = Arc::new(crate::hostd_ops::Ops::new(
        host.name.clone(),
        cfg.clone(),
        backend.clone(),
        placed
            .iter()
            .map(|p| crate::hostd_ops::PlacedReplica {
                exec: p.exec,
                state_dir: p.state_dir.clone(),
                log: p.log.clone(),
            })
            .collect(),
        stats.clone(),
        mode,
    ));
    let _ = shared.ops.set(ops.clone());
    if let Some(maddr) = host.metrics_addr {
        let l = TcpListener::bind(maddr)
            .await
            .map_err(|source| HostdError::Bind {
                addr: maddr,
                source,
            })?;
        tokio::spawn(crate::hostd_ops::serve_http(l, ops, shutdown_rx.clone()));
    }
    let listener = TcpListener::bind(host.addr)
        .await
        .map_err(|source| HostdError::Bind {
            addr: host.addr,
            source,
        })?;
    let addr = listener.local_addr().unwrap_or(host.addr);
    tokio::spawn(agreement_accept(listener, shared.clone(), shutdown_rx));
    tracing::info!(host = %host.name, %addr, replicas = placed.len(), "host agent listening");
    Ok(Hostd {
        stats,
        addr,
        backend,
        placed,
        shutdown: shutdown_tx,
    })
}

/// Carries out authorized commands one at a time, in the order they fired.
async fn command_worker(
    mut rx: mpsc::UnboundedReceiver<Fire>,
    backend: Arc<Mutex<HostBackend>>,
    guest_ready: Option<Arc<GuestReady>>,
    modes: Arc<crate::lifecycle::DormantModes>,
    stats: Arc<HostStats>,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        let fire = tokio::select! {
            f = rx.recv() => f,
            _ = shutdown.changed() => return,
        };
        let Some(fire) = fire else { return };
        let b = backend.clone();
        stats.ops.command_begins(fire.exec, fire.action);
        let booted = guest_ready.as_ref().map(|r| r.count(fire.exec));
        let mode = modes.of(fire.exec.app);
        let done = tokio::task::spawn_blocking(move || {
            let mut b = lock(&b);
            let state = carry_out(&mut *b, fire.exec, fire.action, mode)?;
            if fire.action == HostAction::Reimage && booted.is_some() {
                // A rebuilt VM is put to sleep once it has booted (below).
                return Ok(state);
            }
            if fire.action == HostAction::Reimage {
                // A rebuilt replica is dormant until a Wake names it.
                return carry_out(&mut *b, fire.exec, HostAction::Sleep, mode);
            }
            Ok::<_, LifecycleError>(state)
        })
        .await;
        let done = match (done, &guest_ready, booted) {
            (Ok(Ok(_)), Some(ready), Some(n)) if fire.action == HostAction::Reimage => {
                crate::hostd_vm::sleep_after_boot(&backend, fire.exec, ready, n, mode).await
            }
            (d, _, _) => d,
        };
        match done {
            Ok(Ok(state)) => {
                inc(&stats.commands_fired);
                stats
                    .ops
                    .command_ends(fire.exec, fire.action, fire.epoch, true);
                tracing::info!(exec = %fire.exec, epoch = fire.epoch, action = ?fire.action, %state, "host command done");
            }
            Ok(Err(e)) => {
                inc(&stats.commands_failed);
                stats
                    .ops
                    .command_ends(fire.exec, fire.action, fire.epoch, false);
                tracing::error!(exec = %fire.exec, epoch = fire.epoch, action = ?fire.action, error = %e, "host command failed");
            }
            Err(e) => {
                inc(&stats.commands_failed);
                stats
                    .ops
                    .command_ends(fire.exec, fire.action, fire.epoch, false);
                tracing::error!(error = %e, "host command task failed");
            }
        }
    }
}

/// Logs replicas that die on their own (they stay dead until woken or reimaged).
async fn watchdog(
    backend: Arc<Mutex<HostBackend>>,
    execs: Vec<ExecId>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut known: HashMap<ExecId, String> = HashMap::new();
    loop {
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            _ = shutdown.changed() => return,
        }
        let b = backend.clone();
        let execs = execs.clone();
        let Ok(states) = tokio::task::spawn_blocking(move || {
            let mut b = lock(&b);
            execs
                .iter()
                .map(|e| (*e, b.state(*e).map(|s| (s.is_dead(), s.to_string()))))
                .collect::<Vec<_>>()
        })
        .await
        else {
            continue;
        };
        for (e, st) in states {
            if let Ok((dead, s)) = st {
                if known.get(&e) != Some(&s) {
                    if dead {
                        tracing::warn!(exec = %e, state = %s, "replica is not running");
                    }
                    known.insert(e, s);
                }
            }
        }
    }
}

/// Accepts the connections of one executor; a new one replaces the old.
async fn executor_accept(
    listener: UnixListener,
    exec: ExecId,
    shared: Arc<Shared>,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = shutdown.changed() => return,
        };
        let stream = match accepted {
            Ok((s, _)) => {
                zz_executor::link::widen_send_buffer(&s);
                s
            }
            Err(e) => {
                tracing::warn!(%exec, error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        attach_executor(&shared, exec, stream, BytesMut::new(), &shutdown);
    }
}

/// Keeps a VM replica's port connected: connect to the socket libvirt
/// binds, complete the handshake ([`crate::vmlink`]), relay until the stream
/// closes (the VM stopped or was saved), and start over.
async fn vm_link(
    exec: ExecId,
    socket: PathBuf,
    shared: Arc<Shared>,
    mut shutdown: watch::Receiver<bool>,
    ready: Arc<GuestReady>,
) {
    let mut wait = Duration::from_millis(5);
    loop {
        let attempt = tokio::select! {
            a = crate::vmlink::connect(&socket) => a,
            _ = shutdown.changed() => return,
        };
        match attempt {
            Ok((stream, rest)) => {
                wait = Duration::from_millis(5);
                ready.announce(exec);
                let reader = attach_executor(&shared, exec, stream, rest, &shutdown);
                // The guest's clock follows ours while connected.
                let clock = tokio::spawn(send_clock(shared.clone(), exec));
                let _ = reader.await;
                clock.abort();
            }
            Err(_) => {
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    _ = shutdown.changed() => return,
                }
                wait = (wait * 2).min(Duration::from_millis(50));
            }
        }
        if *shutdown.borrow() {
            return;
        }
    }
}

/// Sends the host's clock to a VM now and every second (see
/// `zz_executor::guest`), on its current connection.
async fn send_clock(shared: Arc<Shared>, exec: ExecId) {
    use zz_executor::guest::{control_frame, TIME};
    loop {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_micros() as u64)
            .unwrap_or(0);
        let conn = shared.routes().executors.get(&exec).cloned();
        // A dormant VM does not read: once its socket is full and frames
        // queue here, it gets no more clock frames (what waits is bounded
        // by the socket buffer).
        if let Some(c) = conn.filter(|c| c.queued.load(Ordering::Relaxed) == 0) {
            c.send(
                Outgoing::framed(Bytes::copy_from_slice(&control_frame(TIME, now))),
                &shared.stats,
            );
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// Makes `stream` the executor's connection (frames kept while it was away
/// go first) and relays what it sends, starting with `rest`; the returned
/// task ends when the stream closes.
fn attach_executor(
    shared: &Arc<Shared>,
    exec: ExecId,
    stream: tokio::net::UnixStream,
    rest: BytesMut,
    shutdown: &watch::Receiver<bool>,
) -> tokio::task::JoinHandle<()> {
    {
        let id = shared.next_conn.fetch_add(1, Ordering::Relaxed);
        let (conn, rx) = Conn::new(id);
        let (rd, wr) = stream.into_split();
        tokio::spawn(write_queued(wr, rx, conn.queued.clone()));
        let backlog = {
            let mut r = shared.routes();
            let backlog = r
                .backlog
                .get_mut(&exec)
                .map(|(size, q)| {
                    *size = 0;
                    std::mem::take(q)
                })
                .unwrap_or_default();
            // Frames kept while it was away go first.
            for b in &backlog {
                conn.send(b.clone(), &shared.stats);
            }
            r.executors.insert(exec, conn);
            backlog.len()
        };
        tracing::info!(%exec, backlog, "executor connected");
        let sh = shared.clone();
        let sd = shutdown.clone();
        tokio::spawn(async move {
            executor_read(rd, rest, exec, &sh, sd).await;
            let mut r = sh.routes();
            if r.executors.get(&exec).is_some_and(|c| c.id == id) {
                r.executors.remove(&exec);
                drop(r);
                tracing::info!(%exec, "executor disconnected");
            }
        })
    }
}

/// Relays what one executor sends.
async fn executor_read(
    mut rd: tokio::net::unix::OwnedReadHalf,
    mut buf: BytesMut,
    exec: ExecId,
    shared: &Shared,
    mut shutdown: watch::Receiver<bool>,
) {
    let stats = &shared.stats;
    let decoder = FrameDecoder::new(MAX_LINK_FRAME);
    loop {
        if buf.capacity() - buf.len() < READ_CHUNK / 4 {
            buf.reserve(READ_CHUNK);
        }
        let read = tokio::select! {
            r = rd.read_buf(&mut buf) => r,
            _ = shutdown.changed() => return,
        };
        match read {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        loop {
            let body = match decoder.decode(&mut buf) {
                Ok(Some(b)) => b,
                Ok(None) => break,
                Err(e) => {
                    tracing::warn!(%exec, error = %e, "oversized frame from executor; closing");
                    inc(&stats.frames_oversized);
                    return;
                }
            };
            inc(&stats.frames_in);
            match relay::from_executor(body) {
                Ok(FromExecutor::Exec { route, envelope }) => match route {
                    ExecRoute::ToAgreement { from, to } if from == exec => {
                        shared.to_agreement(to, Outgoing::retagged(Some(Frame::EXEC_TAG), envelope))
                    }
                    _ => inc(&stats.frames_misrouted),
                },
                Ok(FromExecutor::Fetch { head, .. })
                    if head.from != exec || head.to.app != exec.app =>
                {
                    inc(&stats.frames_misrouted)
                }
                Ok(FromExecutor::Fetch { head, frame }) => relay_fetch(shared, exec, head, frame),
                Err(e) => {
                    tracing::debug!(%exec, error = %e, "malformed frame from executor");
                    inc(&stats.frames_malformed);
                }
            }
        }
    }
}

/// Relays a fetch frame from `exec` (its link frame body `frame`) to its
/// target, here or on another host; a request that cannot be delivered is
/// answered with a refusal.
fn relay_fetch(shared: &Shared, exec: ExecId, head: FetchHead, frame: Bytes) {
    let to = head.to;
    let refusal = head.unreachable("not connected to its host agent");
    let pages = head.pages();
    let delivered = if shared.peers.is_local(to) {
        shared.connected(to) && shared.to_executor(to, Outgoing::retagged(None, frame))
    } else {
        let sent = shared.peers.send(to, Outgoing::to_host(frame));
        if sent {
            inc(&shared.stats.fetch_to_hosts);
        }
        sent
    };
    if delivered {
        inc(&shared.stats.fetch_relayed);
        if pages > 0 {
            shared.stats.ops.pages_relayed(to, pages);
        }
    } else if let Some(r) = refusal {
        shared.to_executor(exec, Outgoing::fetch_to_executor(r));
    }
}

/// A frame on a link from the host agent of `host`: a fetch frame for a
/// replica here, delivered if the placement agrees; a request that cannot be
/// delivered is refused over this agent's own link to `host`.
fn relay_from_host(shared: &Shared, host: &str, body: &Bytes) {
    let Ok((head, frame)) = relay::fetch_from_host(body) else {
        return inc(&shared.stats.frames_malformed);
    };
    if !shared.peers.accepts_from(host, &head) {
        return inc(&shared.stats.frames_misrouted);
    }
    inc(&shared.stats.fetch_from_hosts);
    let to = head.to;
    let refusal = head.unreachable("not connected to its host agent");
    if shared.connected(to) && shared.to_executor(to, Outgoing::retagged(None, frame)) {
        inc(&shared.stats.fetch_relayed);
    } else if let Some(r) = refusal {
        shared.peers.send(r.to, Outgoing::fetch_to_host(r));
    }
}

async fn agreement_accept(
    listener: TcpListener,
    shared: Arc<Shared>,
    mut shutdown: watch::Receiver<bool>,
) {
    let open = Arc::new(AtomicUsize::new(0));
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = shutdown.changed() => return,
        };
        let (stream, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        if open.load(Ordering::Relaxed) >= MAX_AGREEMENT_CONNECTIONS {
            inc(&shared.stats.connections_refused);
            continue;
        }
        open.fetch_add(1, Ordering::Relaxed);
        inc(&shared.stats.agreement_connections);
        let _ = stream.set_nodelay(true);
        let (sh, sd, open) = (shared.clone(), shutdown.clone(), open.clone());
        tokio::spawn(async move {
            let id = sh.next_conn.fetch_add(1, Ordering::Relaxed);
            agreement_conn(stream, id, &sh, sd).await;
            sh.routes().agreement.remove(&id);
            open.fetch_sub(1, Ordering::Relaxed);
            tracing::debug!(%peer, "agreement connection closed");
        });
    }
}

/// One agreement replica's connection: a signed hello, then frames.
async fn agreement_conn(
    stream: tokio::net::TcpStream,
    id: u64,
    shared: &Shared,
    mut shutdown: watch::Receiver<bool>,
) {
    let stats = &shared.stats;
    let (mut rd, wr) = stream.into_split();
    let decoder = FrameDecoder::new(DEFAULT_MAX_FRAME);
    let mut buf = BytesMut::with_capacity(READ_CHUNK);
    let mut replica: Option<ReplicaId> = None;
    let mut peer_host: Option<String> = None;
    let mut writer = Some(wr);
    loop {
        if buf.capacity() - buf.len() < READ_CHUNK / 4 {
            buf.reserve(READ_CHUNK);
        }
        let read = tokio::select! {
            r = rd.read_buf(&mut buf) => r,
            _ = shutdown.changed() => return,
        };
        match read {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        loop {
            let body = match decoder.decode(&mut buf) {
                Ok(Some(b)) => b,
                Ok(None) => break,
                Err(e) => {
                    tracing::debug!(error = %e, "oversized frame from an agreement link; closing");
                    inc(&stats.frames_oversized);
                    return;
                }
            };
            inc(&stats.frames_in);
            if let Some(host) = &peer_host {
                relay_from_host(shared, host, &body);
                continue;
            }
            let Some(from) = replica else {
                // The first frame must be a valid hello for this host.
                let Some(r) = Hello::check(&body, &shared.me, &shared.replica_keys) else {
                    // Or the start of a link from another host agent.
                    if let Ok(Frame::HostPeer { host }) = codec::decode::<Frame>(&body) {
                        if shared.peers.is_peer(&host) {
                            tracing::info!(%host, "host agent linked");
                            peer_host = Some(host);
                            continue;
                        }
                    }
                    // Or an operator's command (`zzctl fault`), answered and closed.
                    if let (Some(cmd), Some(ops), Some(wr)) = (
                        crate::hostd_ops::as_operator(&body),
                        shared.ops.get(),
                        writer.take(),
                    ) {
                        crate::hostd_ops::answer_operator(ops.clone(), cmd, wr).await;
                        return;
                    }
                    tracing::debug!("bad hello on an agreement link; closing");
                    inc(&stats.hellos_rejected);
                    return;
                };
                replica = Some(r);
                let (conn, rx) = Conn::new(id);
                if let Some(wr) = writer.take() {
                    tokio::spawn(write_queued(wr, rx, conn.queued.clone()));
                }
                shared.routes().agreement.insert(id, (r, conn));
                tracing::info!(replica = r, "agreement replica connected");
                continue;
            };
            match relay::exec_from_agreement(&body) {
                Some(Ok((ExecRoute::ToExecutor { from: f, to }, envelope))) if f == from => {
                    let out = Outgoing::retagged(Some(LinkFrame::EXEC_TAG), envelope);
                    if shared.to_executor(to, out) {
                        inc(&stats.envelopes_to_executors);
                    }
                    continue;
                }
                Some(Ok(_)) => {
                    inc(&stats.frames_misrouted);
                    continue;
                }
                Some(Err(e)) => {
                    tracing::debug!(replica = from, error = %e, "malformed envelope");
                    inc(&stats.frames_malformed);
                    continue;
                }
                None => {}
            }
            match codec::decode::<Frame>(&body) {
                Ok(Frame::HostCommand(cmd)) => {
                    let verdict = lock(&shared.gate).on_command(&cmd);
                    match verdict {
                        Ok(Verdict::Fire(fire)) => {
                            let _ = shared.commands.send(fire);
                        }
                        Ok(_) => {}
                        Err(e) => {
                            tracing::debug!(error = %e, "host command rejected");
                            inc(&stats.commands_rejected);
                        }
                    }
                }
                Ok(_) => inc(&stats.frames_malformed),
                Err(e) => {
                    tracing::debug!(replica = from, error = %e, "malformed frame");
                    inc(&stats.frames_malformed);
                }
            }
        }
    }
}
