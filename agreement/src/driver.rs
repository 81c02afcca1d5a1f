//! The tokio driver of one agreement replica: it owns the sockets, the disk
//! and the clock, and feeds the sans-IO [`Replica`] core.
//!
//! # Structure
//!
//! ```text
//!  TCP ──► reader tasks ──(bounded mpsc)──► core task ──► writer tasks ──► TCP
//!          (frames, decode,                (Replica; persist+flush;
//!           envelope MACs)                  seal, encode)
//! ```
//!
//! - **Reader tasks** (one per accepted connection) split the byte stream into
//!   frames, decode them and check peer envelope MACs, so the core only sees
//!   authenticated peer messages. Each read's worth of frames goes to the core
//!   as one channel message.
//! - The **core task** owns the [`Replica`] and its [`DiskStorage`]. It drains
//!   every input that is available before calling [`Replica::ready`], so
//!   whatever arrived meanwhile shares one batch (natural batching), and ticks
//!   the replica every [`DriverOptions::tick_interval`] with a monotonic
//!   clock. It applies each `Ready`'s
//!   [`PersistOp`](crate::persist::PersistOp)s and flushes sled *before* it
//!   queues any of that `Ready`'s messages or replies (DESIGN §8). While it
//!   waits for the disk, inputs pile up and the next `Ready` carries them all,
//!   so flushes are naturally grouped. Doing this on the core task rather
//!   than on a separate thread saves two thread hand-offs per `Ready`, which
//!   on a small machine cost more than the flush itself.
//! - The core seals every peer message once per destination (encoding the
//!   payload once for all), appends all frames for one destination to one
//!   buffer, and hands that buffer to the destination's **writer task**,
//!   which writes whatever is queued with one buffered write. Outbound peer
//!   links reconnect with exponential backoff; while a peer is unreachable
//!   its messages are dropped (the protocol retransmits through `Status`),
//!   and a slow peer's queue is bounded.
//!
//! The daemon runs all of this on a single-threaded runtime by default: the
//! core is sequential anyway, and on a machine shared by several replicas,
//! cross-thread wake-ups dominate. With more worker threads, decoding and
//! MAC checks in the readers run in parallel with the core.
//!
//! What the core addresses to execution replicas and host agents (Orders,
//! stable checkpoints, host commands) leaves through
//! [`DriverOptions::exec_out`], after the same flush; messages from execution
//! replicas enter through [`DriverHandle::exec_input`]. Carrying them over
//! the network is the job of whoever holds those ends.
//!
//! Replies go back over the connection on which the client's latest
//! authenticated request arrived.
//!
//! Malformed, oversized (the connection is closed: its framing can no longer
//! be trusted), unauthenticated and rejected input is dropped and counted in
//! [`DriverStats`], which a minimal HTTP/1.1 endpoint serves as Prometheus text
//! (`GET /metrics`) when the replica's `metrics_addr` is configured, next to
//! the JSON status document of [`crate::status`] (`GET /status`). Network
//! input never panics the driver.
//!
//! A `Frame::Operator` on any connection is checked against the config's
//! operator key by the reader and handed to [`Replica::on_operator`]; the
//! answer (`Frame::OperatorAck`) goes back on the same connection.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufWriter};
use tokio::net::tcp::OwnedWriteHalf;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot, watch};
use zz_wire::codec;
use zz_wire::config::{ClusterConfig, ReplicaKeys};
use zz_wire::crypto::MacKey;
use zz_wire::exec::{ExecId, ExecMessage, HostCommand};
use zz_wire::frame::{write_frame, FrameDecoder, DEFAULT_MAX_FRAME};
use zz_wire::message::{ClientRequest, Frame, PeerEnvelope, PeerMessage, Reply, Signed};
use zz_wire::{ClientId, ReplicaId, WireError};

use crate::app::Service;
use crate::persist::{DiskStorage, StorageError};
use crate::replica::{
    CommittedBatch, Ready, Rejected, Replica, ReplicaMetrics, ReplicaOptions, Target,
};

/// Most bytes queued for one connection before further frames to it are
/// dropped (and counted): a slow or stopped peer cannot exhaust our memory.
const MAX_QUEUED_BYTES: usize = 64 * 1024 * 1024;
/// Most input batches waiting for the core; readers wait beyond that, which
/// pushes back on the senders through TCP.
const INPUT_QUEUE: usize = 1024;
/// Most input batches the core handles before it checks its clock again.
const MAX_DRAIN: usize = 4096;
const READ_CHUNK: usize = 64 * 1024;
/// Most inbound connections open at once; more are closed on arrival.
pub const MAX_CONNECTIONS: u64 = 4096;
const WRITE_BUFFER: usize = 64 * 1024;
const BACKOFF_MIN: Duration = Duration::from_millis(20);
const BACKOFF_MAX: Duration = Duration::from_millis(1000);

/// Errors that stop the driver.
#[derive(Debug, thiserror::Error)]
pub enum DriverError {
    #[error("replica id {id} is not in the config (it lists {n} replicas)")]
    UnknownReplica { id: ReplicaId, n: usize },
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error(transparent)]
    Storage(#[from] StorageError),
    #[error("the driver stopped unexpectedly: {0}")]
    Internal(String),
}

/// Everything the driver needs to run one replica.
pub struct DriverOptions {
    pub config: ClusterConfig,
    pub keys: ReplicaKeys,
    /// The replicated service (the apps), in its initial state; restored from
    /// the latest stable checkpoint found on disk.
    pub service: Service,
    /// Where sled keeps this replica's durable state.
    pub data_dir: PathBuf,
    /// Overrides [`ReplicaOptions::max_inflight_batches`].
    pub max_inflight_batches: Option<u64>,
    /// Longest time between two calls of [`Replica::tick`] (the core is also
    /// ticked whenever it wakes for input and a millisecond has passed), and
    /// how often the metrics snapshot is refreshed.
    pub tick_interval: Duration,
    /// Largest inbound frame; larger ones close the connection.
    pub max_frame: usize,
    /// Receives every committed batch in sequence order, if set.
    pub committed: Option<mpsc::UnboundedSender<CommittedBatch>>,
    /// Receives what the core addresses to execution replicas and host
    /// agents, once it is durable. Dropped when unset.
    pub exec_out: Option<mpsc::UnboundedSender<ExecOutput>>,
}

/// An output of the core for the execution side, in the order emitted.
#[derive(Debug)]
pub enum ExecOutput {
    /// An Order or stable checkpoint for one execution replica.
    Message(ExecId, ExecMessage),
    /// A signed command for the host agents.
    HostCommand(Signed<HostCommand>),
}

impl DriverOptions {
    /// Options with defaults: data under `<data_dir>/replica-<id>`, a 10 ms tick.
    pub fn new(config: ClusterConfig, keys: ReplicaKeys, service: Service) -> Self {
        let data_dir = config
            .resolve(&config.data_dir)
            .join(format!("replica-{}", keys.me));
        DriverOptions {
            config,
            keys,
            service,
            data_dir,
            max_inflight_batches: None,
            tick_interval: Duration::from_millis(10),
            max_frame: DEFAULT_MAX_FRAME,
            committed: None,
            exec_out: None,
        }
    }
}

/// What the core last reported about itself.
#[derive(Clone, Debug, Default)]
pub struct CoreStatus {
    pub metrics: ReplicaMetrics,
    pub view: u64,
    pub view_active: bool,
    pub primary: ReplicaId,
    pub last_executed: u64,
    pub stable_seq: u64,
    pub pending_requests: usize,
    /// The replicated execution table: every remote app's epoch and sets.
    pub exec: std::collections::BTreeMap<zz_wire::AppId, crate::execution::AppExecState>,
}

/// Counters and gauges of one running replica, shared by all its tasks.
#[derive(Debug, Default)]
pub struct DriverStats {
    pub frames_in: AtomicU64,
    pub frames_malformed: AtomicU64,
    pub frames_oversized: AtomicU64,
    pub frames_unauthenticated: AtomicU64,
    pub messages_rejected: AtomicU64,
    /// Frames dropped because their connection was down or its queue full.
    pub frames_dropped: AtomicU64,
    pub storage_flushes: AtomicU64,
    /// Time spent applying and flushing storage, in microseconds.
    pub storage_micros: AtomicU64,
    pub client_connections: AtomicU64,
    /// Inbound connections open now (peers' and clients').
    pub connections: AtomicU64,
    /// Inbound connections refused because [`MAX_CONNECTIONS`] were open.
    pub connections_refused: AtomicU64,
    /// Operator commands with a valid signature.
    pub operator_commands: AtomicU64,
    /// Wakes and reimages of the reconfigurations this replica executed
    /// (counted when an app's epoch advances in the table).
    pub wakes_ordered: AtomicU64,
    pub reimages_ordered: AtomicU64,
    peer_connected: Vec<AtomicBool>,
    core: Mutex<CoreStatus>,
}

fn inc(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

impl DriverStats {
    fn new(n: usize) -> Self {
        DriverStats {
            peer_connected: (0..n).map(|_| AtomicBool::new(false)).collect(),
            ..Default::default()
        }
    }

    /// The core's latest report.
    pub fn core(&self) -> CoreStatus {
        self.core.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn set_core(&self, r: &Replica) {
        let st = CoreStatus {
            metrics: r.metrics().clone(),
            view: r.view(),
            view_active: r.view_active(),
            primary: r.primary(),
            last_executed: r.last_executed(),
            stable_seq: r.stable_seq(),
            pending_requests: r.pending_requests(),
            exec: r.exec_table().apps.clone(),
        };
        let mut core = self.core.lock().unwrap_or_else(|e| e.into_inner());
        for (app, new) in &st.exec {
            let advanced = core.exec.get(app).map(|old| old.epoch < new.epoch);
            // Only epochs reached while running count (not the restored one).
            if advanced == Some(true) {
                for (_, a) in &new.commands {
                    match a {
                        zz_wire::exec::HostAction::Wake => inc(&self.wakes_ordered),
                        zz_wire::exec::HostAction::Reimage => inc(&self.reimages_ordered),
                        zz_wire::exec::HostAction::Sleep => {}
                    }
                }
            }
        }
        *core = st;
    }

    /// The status document served at [`crate::status::STATUS_PATH`].
    pub fn status(&self, me: ReplicaId) -> crate::status::ReplicaStatus {
        let c = self.core();
        crate::status::ReplicaStatus {
            replica: me,
            view: c.view,
            view_active: c.view_active,
            primary: c.primary,
            last_executed: c.last_executed,
            stable_seq: c.stable_seq,
            pending_requests: c.pending_requests,
            requests_executed: c.metrics.requests_executed,
            requests_ordered: c.metrics.requests_ordered,
            batches_committed: c.metrics.batches_committed,
            view_changes: c.metrics.view_changes,
            suspicions: c.metrics.suspicions,
            reconfigurations: c.metrics.reconfigurations,
            apps: c
                .exec
                .iter()
                .map(|(a, st)| (*a, crate::status::AppStatus::from_state(st)))
                .collect(),
        }
    }

    /// The Prometheus text exposition of every counter.
    pub fn prometheus(&self, me: ReplicaId) -> String {
        use std::fmt::Write;
        let c = self.core();
        let m = &c.metrics;
        let ld = |a: &AtomicU64| a.load(Ordering::Relaxed).to_string();
        let (counter, gauge) = ("counter", "gauge");
        #[rustfmt::skip]
        let rows: Vec<(&str, &str, &str, String)> = vec![
            ("frames_in_total", counter, "Frames received.", ld(&self.frames_in)),
            ("frames_malformed_total", counter, "Frames that did not decode, dropped.", ld(&self.frames_malformed)),
            ("frames_oversized_total", counter, "Frames over the size limit; the connection was closed.", ld(&self.frames_oversized)),
            ("frames_unauthenticated_total", counter, "Frames with a bad MAC or an unknown sender, dropped.", ld(&self.frames_unauthenticated)),
            ("messages_rejected_total", counter, "Authenticated messages the protocol rejected.", ld(&self.messages_rejected)),
            ("frames_dropped_total", counter, "Outbound frames dropped: connection down or queue full.", ld(&self.frames_dropped)),
            ("storage_flushes_total", counter, "Durable flushes of the replica's storage.", ld(&self.storage_flushes)),
            ("storage_seconds_total", counter, "Time spent persisting and flushing storage.",
                format!("{:.6}", self.storage_micros.load(Ordering::Relaxed) as f64 / 1e6)),
            ("client_connections", gauge, "Open client connections.", ld(&self.client_connections)),
            ("connections", gauge, "Open inbound connections.", ld(&self.connections)),
            ("connections_refused_total", counter, "Inbound connections refused: too many open.", ld(&self.connections_refused)),
            ("requests_accepted_total", counter, "Client requests accepted.", m.requests_accepted.to_string()),
            ("requests_executed_total", counter, "Client requests executed.", m.requests_executed.to_string()),
            ("requests_ordered_total", counter, "Client requests committed in the log, for any app.", m.requests_ordered.to_string()),
            ("batches_committed_total", counter, "Batches committed and executed.", m.batches_committed.to_string()),
            ("view_changes_total", counter, "View changes started.", m.view_changes.to_string()),
            ("new_views_total", counter, "Views entered.", m.new_views.to_string()),
            ("state_transfers_total", counter, "Checkpoint states installed from peers.", m.state_transfers.to_string()),
            ("checkpoints_stable_total", counter, "Checkpoints that became stable.", m.checkpoints_stable.to_string()),
            ("core_rejected_total", counter, "Peer messages the core rejected.", m.rejected.to_string()),
            ("orders_sent_total", counter, "Orders sent to execution replicas.", m.orders_sent.to_string()),
            ("suspicions_total", counter, "Suspects this replica signed against execution replicas.", m.suspicions.to_string()),
            ("reconfigurations_total", counter, "Ordered reconfigurations of execution replicas executed.", m.reconfigurations.to_string()),
            ("wakes_ordered_total", counter, "Execution replicas woken by reconfigurations seen in the current table.", self.wakes_ordered.load(Ordering::Relaxed).to_string()),
            ("reimages_ordered_total", counter, "Execution replicas reimaged by reconfigurations seen in the current table.", self.reimages_ordered.load(Ordering::Relaxed).to_string()),
            ("operator_commands_total", counter, "Operator commands with a valid signature.", ld(&self.operator_commands)),
            ("view", gauge, "Current view.", c.view.to_string()),
            ("view_active", gauge, "1 if the current view is active.", (c.view_active as u8).to_string()),
            ("primary", gauge, "Primary of the current view.", c.primary.to_string()),
            ("last_executed", gauge, "Last executed sequence number.", c.last_executed.to_string()),
            ("stable_seq", gauge, "Sequence number of the stable checkpoint.", c.stable_seq.to_string()),
            ("pending_requests", gauge, "Requests accepted but not yet executed.", c.pending_requests.to_string()),
        ];
        let mut out = String::with_capacity(4096);
        for (name, kind, help, v) in rows {
            let _ = writeln!(out, "# HELP zz_{name} {help}");
            let _ = writeln!(out, "# TYPE zz_{name} {kind}");
            let _ = writeln!(out, "zz_{name}{{replica=\"{me}\"}} {v}");
        }
        let _ = writeln!(
            out,
            "# HELP zz_peer_connected 1 if the outbound link to the peer is up."
        );
        let _ = writeln!(out, "# TYPE zz_peer_connected gauge");
        for (p, up) in self.peer_connected.iter().enumerate() {
            if p as ReplicaId != me {
                let up = up.load(Ordering::Relaxed) as u8;
                let _ = writeln!(
                    out,
                    "zz_peer_connected{{replica=\"{me}\",peer=\"{p}\"}} {up}"
                );
            }
        }
        out
    }
}

/// The sending side of one connection: frames are queued for its writer task.
#[derive(Clone)]
struct ConnTx {
    id: u64,
    tx: mpsc::UnboundedSender<Bytes>,
    queued: Arc<AtomicUsize>,
}

impl ConnTx {
    fn new(id: u64) -> (ConnTx, mpsc::UnboundedReceiver<Bytes>) {
        let (tx, rx) = mpsc::unbounded_channel();
        (
            ConnTx {
                id,
                tx,
                queued: Arc::new(AtomicUsize::new(0)),
            },
            rx,
        )
    }

    /// Queues `bytes`; false if the connection is gone.
    fn send(&self, bytes: Bytes, stats: &DriverStats) -> bool {
        let len = bytes.len();
        if self.queued.load(Ordering::Relaxed) + len > MAX_QUEUED_BYTES {
            inc(&stats.frames_dropped);
            return !self.tx.is_closed();
        }
        self.queued.fetch_add(len, Ordering::Relaxed);
        if self.tx.send(bytes).is_err() {
            self.queued.fetch_sub(len, Ordering::Relaxed);
            inc(&stats.frames_dropped);
            return false;
        }
        true
    }
}

/// Inputs for the core, as decoded by one read of one connection.
enum Input {
    Peers(Vec<(ReplicaId, PeerMessage)>),
    Requests(ConnTx, Vec<ClientRequest>),
    Exec(ExecId, ExecMessage),
    /// An operator command whose signature was verified, and where to answer.
    Operator(ConnTx, zz_wire::operator::OperatorSigned),
}

/// Feeds the core messages from execution replicas.
#[derive(Clone)]
pub struct ExecInput(mpsc::Sender<Input>);

impl ExecInput {
    /// Hands the core a message from execution replica `from`, whose
    /// authenticity the caller has already checked. Fails once the replica stopped.
    pub async fn send(&self, from: ExecId, msg: ExecMessage) -> Result<(), DriverError> {
        self.0
            .send(Input::Exec(from, msg))
            .await
            .map_err(|_| DriverError::Internal("the replica has stopped".into()))
    }
}

/// A running replica.
pub struct DriverHandle {
    pub addr: SocketAddr,
    pub metrics_addr: Option<SocketAddr>,
    pub stats: Arc<DriverStats>,
    exec_in: ExecInput,
    shutdown: watch::Sender<bool>,
    done: oneshot::Receiver<Result<(), DriverError>>,
}

impl DriverHandle {
    /// Where messages from execution replicas enter the core.
    pub fn exec_input(&self) -> ExecInput {
        self.exec_in.clone()
    }

    /// Asks the replica to stop, and waits until its storage is flushed.
    pub async fn shutdown(self) -> Result<(), DriverError> {
        let _ = self.shutdown.send(true);
        self.done
            .await
            .unwrap_or_else(|_| Err(DriverError::Internal("core task vanished".into())))
    }

    /// Runs until `stop` completes (then shuts down cleanly) or a fatal error.
    pub async fn run_until(mut self, stop: impl Future<Output = ()>) -> Result<(), DriverError> {
        tokio::select! {
            r = &mut self.done => r.unwrap_or_else(|_| Err(DriverError::Internal("core task vanished".into()))),
            _ = stop => self.shutdown().await,
        }
    }
}

/// Opens storage, restores the replica, binds its sockets and starts every
/// task. Must be called inside a tokio runtime.
pub async fn start(opts: DriverOptions) -> Result<DriverHandle, DriverError> {
    let cfg = &opts.config;
    let me = opts.keys.me;
    let n = cfg.n();
    let entry = cfg
        .replicas
        .get(me as usize)
        .ok_or(DriverError::UnknownReplica { id: me, n })?
        .clone();

    std::fs::create_dir_all(&opts.data_dir).map_err(|e| {
        DriverError::Storage(StorageError::Corrupt(format!(
            "cannot create {}: {e}",
            opts.data_dir.display()
        )))
    })?;
    let mut storage = DiskStorage::open(&opts.data_dir)?;
    let persisted = storage.load()?;
    let mut ropts = ReplicaOptions::new(n, cfg.f, cfg.agreement.clone());
    // Apps with [[executors]] run on execution replicas.
    for app in &cfg.apps {
        let keys = cfg.executor_public_keys(app.id);
        if !keys.is_empty() {
            ropts.remote_apps.insert(app.id, keys);
        }
    }
    ropts.exec_timeout_min_ms = cfg.execution.timeout_min_ms;
    ropts.exec_all_active = cfg.execution.all_active;
    if let Some(m) = opts.max_inflight_batches {
        ropts.max_inflight_batches = m.max(1);
    }
    let replica = Replica::restore(ropts, opts.keys.clone(), opts.service, persisted);
    tracing::info!(
        replica = me,
        view = replica.view(),
        stable = replica.stable_seq(),
        data = %opts.data_dir.display(),
        "restored durable state"
    );

    let listener = TcpListener::bind(entry.addr)
        .await
        .map_err(|source| DriverError::Bind {
            addr: entry.addr,
            source,
        })?;
    let addr = listener.local_addr().unwrap_or(entry.addr);
    let stats = Arc::new(DriverStats::new(n));
    stats.set_core(&replica);

    let metrics_addr = match entry.metrics_addr {
        Some(maddr) => {
            let l = TcpListener::bind(maddr)
                .await
                .map_err(|source| DriverError::Bind {
                    addr: maddr,
                    source,
                })?;
            let bound = l.local_addr().unwrap_or(maddr);
            tokio::spawn(serve_metrics(l, stats.clone(), me));
            Some(bound)
        }
        None => None,
    };

    let (shutdown_tx, shutdown_rx) = watch::channel(false);

    // Outbound links to every peer.
    let mut peers: Vec<Option<ConnTx>> = Vec::with_capacity(n);
    for r in &cfg.replicas {
        if r.id == me {
            peers.push(None);
            continue;
        }
        let (conn, rx) = ConnTx::new(u64::MAX - r.id as u64);
        tokio::spawn(peer_link(
            r.id,
            r.addr,
            rx,
            conn.queued.clone(),
            stats.clone(),
            shutdown_rx.clone(),
        ));
        peers.push(Some(conn));
    }

    let (in_tx, in_rx) = mpsc::channel::<Input>(INPUT_QUEUE);
    let reader_ctx = Arc::new(ReaderCtx {
        me,
        n,
        peer_mac: opts.keys.peer_mac.clone(),
        max_frame: opts.max_frame,
        stats: stats.clone(),
        operator_key: cfg.operator_key(),
    });
    tokio::spawn(accept_loop(
        listener,
        reader_ctx,
        in_tx.clone(),
        shutdown_rx.clone(),
    ));

    let (done_tx, done_rx) = oneshot::channel();
    let core = Core {
        replica,
        inputs: in_rx,
        out: Outputs {
            me,
            keys: opts.keys.clone(),
            storage,
            peers,
            peer_bufs: (0..n).map(|_| BytesMut::new()).collect(),
            routes: HashMap::new(),
            reply_bufs: HashMap::new(),
            stats: stats.clone(),
            committed: opts.committed,
            exec_out: opts.exec_out,
        },
        stats: stats.clone(),
        tick: opts.tick_interval,
        shutdown: shutdown_rx,
        started: Instant::now(),
    };
    tokio::spawn(async move {
        let r = core.run().await;
        if let Err(e) = &r {
            tracing::error!(error = %e, "replica stopped");
        }
        let _ = done_tx.send(r);
    });

    tracing::info!(replica = me, %addr, metrics = ?metrics_addr, "replica listening");
    Ok(DriverHandle {
        exec_in: ExecInput(in_tx),
        addr,
        metrics_addr,
        stats,
        shutdown: shutdown_tx,
        done: done_rx,
    })
}

/// Starts the driver and runs it until `stop` completes.
pub async fn run(opts: DriverOptions, stop: impl Future<Output = ()>) -> Result<(), DriverError> {
    start(opts).await?.run_until(stop).await
}

// --------------------------------------------------------------------- core

struct Core {
    replica: Replica,
    inputs: mpsc::Receiver<Input>,
    out: Outputs,
    stats: Arc<DriverStats>,
    tick: Duration,
    shutdown: watch::Receiver<bool>,
    started: Instant,
}

impl Core {
    fn now_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    async fn run(mut self) -> Result<(), DriverError> {
        let mut interval = tokio::time::interval(self.tick);
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        let mut last_stats = Instant::now();
        let mut last_tick_ms = self.now_ms();
        self.replica.tick(last_tick_ms);
        loop {
            tokio::select! {
                _ = self.shutdown.changed() => break,
                first = self.inputs.recv() => {
                    let Some(first) = first else { break };
                    self.handle(first);
                    let mut drained = 1;
                    while drained < MAX_DRAIN {
                        match self.inputs.try_recv() {
                            Ok(i) => self.handle(i),
                            Err(_) => break,
                        }
                        drained += 1;
                    }
                }
                _ = interval.tick() => {}
            }
            // The core's clock advances in whole milliseconds; keeping it
            // current lets batch delays and timeouts fire on time, while the
            // interval above wakes the loop when there is no input.
            let now = self.now_ms();
            if now != last_tick_ms {
                last_tick_ms = now;
                self.replica.tick(now);
            }
            if last_stats.elapsed() >= self.tick {
                last_stats = Instant::now();
                self.stats.set_core(&self.replica);
            }
            let ready = self.replica.ready();
            if !ready.is_empty() {
                self.out.emit(ready)?;
            }
        }
        self.stats.set_core(&self.replica);
        self.out.storage.flush()?;
        tracing::info!(replica = self.out.me, "storage flushed; core stopped");
        Ok(())
    }

    fn handle(&mut self, input: Input) {
        match input {
            Input::Peers(msgs) => {
                for (from, msg) in msgs {
                    if let Err(e) = self.replica.step(from, msg) {
                        tracing::debug!(from, error = %e, "peer message rejected");
                        inc(&self.stats.messages_rejected);
                    }
                }
            }
            Input::Operator(conn, cmd) => {
                let ack = match self.replica.on_operator(&cmd.body.action) {
                    Ok(what) => {
                        tracing::info!(replica = self.out.me, action = ?cmd.body.action, %what, "operator command");
                        zz_wire::operator::OperatorAck::Accepted(what)
                    }
                    Err(why) => {
                        tracing::warn!(replica = self.out.me, action = ?cmd.body.action, %why, "operator command refused");
                        zz_wire::operator::OperatorAck::Refused(why)
                    }
                };
                send_ack(&conn, ack, &self.stats);
            }
            Input::Exec(from, msg) => {
                if let Err(e) = self.replica.on_exec(from, msg) {
                    tracing::debug!(%from, error = %e, "execution message rejected");
                    inc(&self.stats.messages_rejected);
                }
            }
            Input::Requests(conn, reqs) => {
                for req in reqs {
                    let client = req.request.client;
                    match self.replica.on_request(req) {
                        Ok(()) => {
                            // Only an authenticated request moves the client's route.
                            if self.out.routes.get(&client).map(|c| c.id) != Some(conn.id) {
                                self.out.routes.insert(client, conn.clone());
                            }
                        }
                        Err(Rejected::BadRequestAuth(c)) => {
                            tracing::debug!(client = c, "request fails authentication");
                            inc(&self.stats.frames_unauthenticated);
                        }
                        Err(e) => {
                            tracing::debug!(client, error = %e, "request rejected");
                            inc(&self.stats.messages_rejected);
                        }
                    }
                }
            }
        }
    }
}

// ------------------------------------------------------------------- output

/// Storage and every outbound queue, owned by the core task.
struct Outputs {
    me: ReplicaId,
    keys: ReplicaKeys,
    storage: DiskStorage,
    peers: Vec<Option<ConnTx>>,
    peer_bufs: Vec<BytesMut>,
    routes: HashMap<ClientId, ConnTx>,
    reply_bufs: HashMap<u64, (ConnTx, BytesMut)>,
    stats: Arc<DriverStats>,
    committed: Option<mpsc::UnboundedSender<CommittedBatch>>,
    exec_out: Option<mpsc::UnboundedSender<ExecOutput>>,
}

impl Outputs {
    /// Makes `ready`'s state durable, then queues its messages and replies.
    fn emit(&mut self, ready: Ready) -> Result<(), DriverError> {
        if !ready.persist.is_empty() {
            let t = Instant::now();
            self.storage.apply(&ready.persist)?;
            self.storage.flush()?;
            inc(&self.stats.storage_flushes);
            self.stats
                .storage_micros
                .fetch_add(t.elapsed().as_micros() as u64, Ordering::Relaxed);
        }
        for (target, msg) in &ready.messages {
            self.seal(*target, msg);
        }
        for reply in ready.replies {
            self.queue_reply(reply);
        }
        if let Some(c) = &self.committed {
            for b in ready.committed {
                let _ = c.send(b);
            }
        }
        if let Some(x) = &self.exec_out {
            for (to, m) in ready.exec {
                let _ = x.send(ExecOutput::Message(to, m));
            }
            for c in ready.host_commands {
                let _ = x.send(ExecOutput::HostCommand(c));
            }
        }
        for (p, buf) in self.peer_bufs.iter_mut().enumerate() {
            if !buf.is_empty() {
                let bytes = buf.split().freeze();
                if let Some(conn) = &self.peers[p] {
                    conn.send(bytes, &self.stats);
                }
            }
        }
        for (_, (conn, buf)) in self.reply_bufs.drain() {
            if !conn.send(buf.freeze(), &self.stats) {
                self.routes.retain(|_, c| c.id != conn.id);
            }
        }
        Ok(())
    }

    fn seal(&mut self, target: Target, msg: &PeerMessage) {
        let me = self.me;
        match target {
            Target::All => {
                let payload = codec::encode(msg);
                for (p, buf) in self.peer_bufs.iter_mut().enumerate() {
                    if p as ReplicaId != me {
                        seal_into(buf, me, p as ReplicaId, &payload, &self.keys.peer_mac[p]);
                    }
                }
            }
            Target::Replica(p) => {
                if p != me {
                    if let Some(buf) = self.peer_bufs.get_mut(p as usize) {
                        let payload = codec::encode(msg);
                        seal_into(buf, me, p, &payload, &self.keys.peer_mac[p as usize]);
                    }
                }
            }
        }
    }

    fn queue_reply(&mut self, reply: Reply) {
        let Some(conn) = self.routes.get(&reply.client) else {
            inc(&self.stats.frames_dropped);
            return;
        };
        let body = codec::encode(&Frame::Reply(reply));
        let (_, buf) = self
            .reply_bufs
            .entry(conn.id)
            .or_insert_with(|| (conn.clone(), BytesMut::new()));
        write_frame(buf, &body);
    }
}

/// Appends to `buf` the frame of a [`PeerEnvelope`] carrying the already
/// encoded `payload`, so a message for all peers is encoded only once.
fn seal_into(buf: &mut BytesMut, from: ReplicaId, to: ReplicaId, payload: &[u8], key: &MacKey) {
    let mac = PeerEnvelope::compute_mac(from, to, payload, key);
    let body = codec::encode(&FrameRef::Peer(PeerEnvelopeRef {
        from,
        to,
        payload,
        mac,
    }));
    write_frame(buf, &body);
}

/// Borrowing mirrors of [`Frame`] and [`PeerEnvelope`] with the same serde
/// shape: the envelope is encoded without copying the payload into an owned
/// envelope first. A unit test checks the bytes match the owned types'.
#[derive(serde::Serialize)]
enum FrameRef<'a> {
    Peer(PeerEnvelopeRef<'a>),
}

#[derive(serde::Serialize)]
struct PeerEnvelopeRef<'a> {
    from: ReplicaId,
    to: ReplicaId,
    #[serde(with = "serde_bytes")]
    payload: &'a [u8],
    mac: [u8; 16],
}

// ------------------------------------------------------------------ network

struct ReaderCtx {
    me: ReplicaId,
    n: usize,
    peer_mac: Vec<MacKey>,
    max_frame: usize,
    stats: Arc<DriverStats>,
    operator_key: Option<ed25519_dalek::VerifyingKey>,
}

async fn accept_loop(
    listener: TcpListener,
    ctx: Arc<ReaderCtx>,
    inputs: mpsc::Sender<Input>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut next_id = 0u64;
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = shutdown.changed() => return,
        };
        match accepted {
            Ok((stream, peer)) => {
                if ctx.stats.connections.load(Ordering::Relaxed) >= MAX_CONNECTIONS {
                    tracing::debug!(%peer, "too many connections; refusing");
                    inc(&ctx.stats.connections_refused);
                    continue;
                }
                ctx.stats.connections.fetch_add(1, Ordering::Relaxed);
                next_id += 1;
                let _ = stream.set_nodelay(true);
                tracing::debug!(%peer, conn = next_id, "connection accepted");
                tokio::spawn(serve_connection(
                    stream,
                    next_id,
                    ctx.clone(),
                    inputs.clone(),
                    shutdown.clone(),
                ));
            }
            Err(e) => {
                // Out of file descriptors and the like: wait, don't spin.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// Reads frames from one inbound connection (a peer's or a client's) and
/// writes the replies queued for it.
async fn serve_connection(
    stream: TcpStream,
    id: u64,
    ctx: Arc<ReaderCtx>,
    inputs: mpsc::Sender<Input>,
    mut shutdown: watch::Receiver<bool>,
) {
    let (mut rd, wr) = stream.into_split();
    let (conn, rx) = ConnTx::new(id);
    let queued = conn.queued.clone();
    let writer = tokio::spawn(async move {
        let mut w = BufWriter::with_capacity(WRITE_BUFFER, wr);
        let mut rx = rx;
        let _ = write_queued(&mut w, &mut rx, &queued).await;
    });
    let decoder = FrameDecoder::new(ctx.max_frame);
    let mut buf = BytesMut::with_capacity(READ_CHUNK);
    let mut is_client = false;
    'conn: loop {
        if buf.capacity() - buf.len() < READ_CHUNK / 4 {
            buf.reserve(READ_CHUNK);
        }
        let read = tokio::select! {
            r = rd.read_buf(&mut buf) => r,
            _ = shutdown.changed() => break,
        };
        match read {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
        let mut peers = Vec::new();
        let mut reqs = Vec::new();
        loop {
            match decoder.decode(&mut buf) {
                Ok(Some(body)) => {
                    inc(&ctx.stats.frames_in);
                    match codec::decode::<Frame>(&body) {
                        Ok(Frame::Peer(env)) => {
                            if let Some(m) = open_envelope(&ctx, env) {
                                peers.push(m);
                            }
                        }
                        Ok(Frame::Request(req)) => reqs.push(req),
                        Ok(Frame::Operator(cmd)) => {
                            if ctx.operator_key.is_some_and(|k| cmd.verify(&k)) {
                                inc(&ctx.stats.operator_commands);
                                if inputs
                                    .send(Input::Operator(conn.clone(), cmd))
                                    .await
                                    .is_err()
                                {
                                    break 'conn;
                                }
                            } else {
                                tracing::warn!(conn = id, "operator command with a bad signature, or no operator key configured");
                                inc(&ctx.stats.frames_unauthenticated);
                                let why = "the command is not signed by the config's operator key";
                                send_ack(
                                    &conn,
                                    zz_wire::operator::OperatorAck::Refused(why.into()),
                                    &ctx.stats,
                                );
                            }
                        }
                        Ok(Frame::Reply(_))
                        | Ok(Frame::HostCommand(_))
                        | Ok(Frame::Exec(_))
                        | Ok(Frame::OperatorAck(_))
                        | Ok(Frame::HostPeer { .. })
                        | Ok(Frame::Fetch(_)) => {
                            // Replicas never receive replies or host commands,
                            // execution traffic arrives on host-agent links,
                            // and host-to-host frames go between host agents.
                            inc(&ctx.stats.frames_malformed);
                        }
                        Err(e) => {
                            tracing::debug!(conn = id, error = %e, "malformed frame");
                            inc(&ctx.stats.frames_malformed);
                        }
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    tracing::debug!(conn = id, error = %e, "oversized frame; closing the connection");
                    inc(&ctx.stats.frames_oversized);
                    if !peers.is_empty() {
                        let _ = inputs.send(Input::Peers(peers)).await;
                    }
                    if !reqs.is_empty() {
                        let _ = inputs.send(Input::Requests(conn.clone(), reqs)).await;
                    }
                    break 'conn;
                }
            }
        }
        if !peers.is_empty() && inputs.send(Input::Peers(peers)).await.is_err() {
            break;
        }
        if !reqs.is_empty() {
            if !is_client {
                is_client = true;
                ctx.stats.client_connections.fetch_add(1, Ordering::Relaxed);
            }
            if inputs
                .send(Input::Requests(conn.clone(), reqs))
                .await
                .is_err()
            {
                break;
            }
        }
    }
    if is_client {
        ctx.stats.client_connections.fetch_sub(1, Ordering::Relaxed);
    }
    ctx.stats.connections.fetch_sub(1, Ordering::Relaxed);
    drop(conn);
    writer.abort();
}

/// Answers an operator command on its connection.
fn send_ack(conn: &ConnTx, ack: zz_wire::operator::OperatorAck, stats: &DriverStats) {
    let body = codec::encode(&Frame::OperatorAck(ack));
    conn.send(Bytes::from(zz_wire::frame::frame(&body)), stats);
}

/// Checks a peer envelope's addressing and MAC, and decodes its message.
fn open_envelope(ctx: &ReaderCtx, env: PeerEnvelope) -> Option<(ReplicaId, PeerMessage)> {
    let from = env.from;
    if env.to != ctx.me || from as usize >= ctx.n || from == ctx.me {
        tracing::debug!(
            from,
            to = env.to,
            "envelope from an unknown sender or for another replica"
        );
        inc(&ctx.stats.frames_unauthenticated);
        return None;
    }
    match env.open(&ctx.peer_mac[from as usize]) {
        Ok(msg) => Some((from, msg)),
        Err(WireError::BadMac(_)) => {
            tracing::debug!(from, "envelope with a bad MAC");
            inc(&ctx.stats.frames_unauthenticated);
            None
        }
        Err(e) => {
            // Authentic but undecodable: a faulty peer.
            tracing::debug!(from, error = %e, "malformed peer message");
            inc(&ctx.stats.frames_malformed);
            None
        }
    }
}

/// Writes everything queued, flushing whenever the queue runs dry. Returns
/// on a write error, or when the queue closes.
async fn write_queued(
    w: &mut BufWriter<OwnedWriteHalf>,
    rx: &mut mpsc::UnboundedReceiver<Bytes>,
    queued: &AtomicUsize,
) -> std::io::Result<()> {
    while let Some(b) = rx.recv().await {
        queued.fetch_sub(b.len(), Ordering::Relaxed);
        w.write_all(&b).await?;
        while let Ok(b) = rx.try_recv() {
            queued.fetch_sub(b.len(), Ordering::Relaxed);
            w.write_all(&b).await?;
        }
        w.flush().await?;
    }
    Ok(())
}

/// Keeps an outbound connection to peer `p` up, and writes its queue to it.
async fn peer_link(
    p: ReplicaId,
    addr: SocketAddr,
    mut rx: mpsc::UnboundedReceiver<Bytes>,
    queued: Arc<AtomicUsize>,
    stats: Arc<DriverStats>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut backoff = BACKOFF_MIN;
    loop {
        let connected = tokio::select! {
            c = tokio::time::timeout(Duration::from_secs(2), TcpStream::connect(addr)) => c,
            _ = shutdown.changed() => return,
        };
        if let Ok(Ok(stream)) = connected {
            let _ = stream.set_nodelay(true);
            tracing::info!(peer = p, %addr, "connected to peer");
            stats.peer_connected[p as usize].store(true, Ordering::Relaxed);
            backoff = BACKOFF_MIN;
            let (mut rd, wr) = stream.into_split();
            let mut w = BufWriter::with_capacity(WRITE_BUFFER, wr);
            let mut sink = [0u8; 1024];
            let closed = async {
                // Peers never write on our outbound link: a read returns only
                // when it closes.
                loop {
                    match rd.read(&mut sink).await {
                        Ok(0) | Err(_) => return,
                        Ok(_) => {}
                    }
                }
            };
            let stop = tokio::select! {
                r = write_queued(&mut w, &mut rx, &queued) => r.is_ok(),
                _ = closed => false,
                _ = shutdown.changed() => true,
            };
            stats.peer_connected[p as usize].store(false, Ordering::Relaxed);
            if stop {
                return;
            }
            tracing::info!(peer = p, %addr, "lost the connection to peer");
        }
        // Unreachable: drop what is queued meanwhile, then retry.
        let deadline = tokio::time::sleep(backoff);
        tokio::pin!(deadline);
        loop {
            tokio::select! {
                _ = &mut deadline => break,
                m = rx.recv() => match m {
                    Some(b) => {
                        queued.fetch_sub(b.len(), Ordering::Relaxed);
                        inc(&stats.frames_dropped);
                    }
                    None => return,
                },
                _ = shutdown.changed() => return,
            }
        }
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
}

// ------------------------------------------------------------------ metrics

/// A minimal HTTP/1.1 server: `GET /metrics` (or `/`) returns the Prometheus
/// text; anything else is a 404. One request per connection.
async fn serve_metrics(listener: TcpListener, stats: Arc<DriverStats>, me: ReplicaId) {
    loop {
        let Ok((mut stream, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let stats = stats.clone();
        tokio::spawn(async move {
            let mut req = Vec::with_capacity(1024);
            let mut chunk = [0u8; 1024];
            let read_head = async {
                while !req.windows(4).any(|w| w == b"\r\n\r\n") && req.len() < 8192 {
                    match stream.read(&mut chunk).await {
                        Ok(0) | Err(_) => return false,
                        Ok(k) => req.extend_from_slice(&chunk[..k]),
                    }
                }
                true
            };
            if !matches!(
                tokio::time::timeout(Duration::from_secs(5), read_head).await,
                Ok(true)
            ) {
                return;
            }
            let line = req.split(|b| *b == b'\r').next().unwrap_or_default();
            let line = String::from_utf8_lossy(line);
            let mut parts = line.split_whitespace();
            let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
            let (status, body) = if method == "GET" && (path == "/metrics" || path == "/") {
                ("200 OK", stats.prometheus(me))
            } else if method == "GET" && path == crate::status::STATUS_PATH {
                ("200 OK", stats.status(me).to_json())
            } else {
                ("404 Not Found", "not found\n".to_string())
            };
            let resp = format!(
                "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = stream.write_all(resp.as_bytes()).await;
            let _ = stream.shutdown().await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use zz_wire::crypto::KeyPair;
    use zz_wire::message::Commit;
    use zz_wire::Digest;

    #[test]
    fn borrowed_envelope_encodes_like_the_owned_one() {
        let a = KeyPair::from_seed([1; 32]);
        let b = KeyPair::from_seed([2; 32]);
        let key = a.shared_mac_key(&b.public());
        let msg = PeerMessage::Commit(Commit {
            view: 7,
            seq: 9,
            digest: Digest::of(b"x"),
            replica: 2,
        });
        let owned = zz_wire::frame::frame(&codec::encode(&Frame::Peer(PeerEnvelope::seal(
            2, 3, &msg, &key,
        ))));
        let mut buf = BytesMut::new();
        seal_into(&mut buf, 2, 3, &codec::encode(&msg), &key);
        assert_eq!(&buf[..], &owned[..]);
    }
}
