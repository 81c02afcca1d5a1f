//! The runtime of one execution replica process (the `zz-executor` binary):
//! it connects the sans-IO [`ExecutionCore`] to the replica's one byte stream
//! to its host agent (see [`crate::link`]).
//!
//! ```text
//!  socket ──► reader task ──(bounded queue)──► core thread ──► writer task ──► socket
//!              │  fetch requests: served from the local store (blocking pool)
//!              └─ fetch responses: handed to the waiting PageSource call
//! ```
//!
//! - The **core thread** owns the [`ExecutionCore`]. Storage access is
//!   synchronous and a [`RecoveringState`] blocks on page fetches, so the core
//!   runs on a thread of its own, never on a runtime worker. It drains every
//!   envelope available, calls [`ExecutionCore::ready`], and sends what it
//!   returns: messages for every agreement replica, answers to repeated orders
//!   for one replica, after an injected delay if any.
//! - **Recovery** (DESIGN §5): when the core reports a verified stable
//!   checkpoint above its state (`stable_ahead`), the core thread opens a
//!   [`RecoveringState`] of it whose page sources are the app's other
//!   execution replicas, reached through the host agent, and installs it at
//!   once: execution resumes after the checkpoint while pages are fetched on
//!   demand (a read of a missing page blocks until it is fetched and
//!   verified against the certificate) and in the background. Once every
//!   page is present the plain store replaces the recovering view. A failed
//!   attempt (no peer answered) is retried every [`ExecutorConfig::retry`].
//!   While a recovery is under way a mark file ([`RECOVERY_MARK`]) sits in
//!   the state folder; a replica that starts and finds it (it stopped
//!   mid-recovery, over a store mixing fetched, old and replayed pages)
//!   removes its store and starts empty, to recover again.
//!   A recovery whose background fetch gives up (no peer has served the
//!   checkpoint for 30 s, or every peer proved faulty) ends the replica with
//!   [`DriverError::RecoveryFailed`]: it cannot execute on, and the
//!   agreement replicas time it out and reimage it like a crashed one.
//! - The **reader task** decodes frames. Envelopes go to the core through a
//!   bounded queue (when it is full, frames are dropped and counted: the
//!   agreement replicas retransmit). Fetch requests from peers are answered
//!   from this replica's retained checkpoints on the blocking pool, a few at
//!   a time. Fetch responses complete the pending request with their id.
//! - The **writer task** writes queued frames.
//!
//! The process exits when its stream closes (its host agent went away), on
//! an injected crash, or on a local failure (storage). Malformed or
//! misaddressed input is dropped and counted, never a panic.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc as std_mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use tokio::sync::{mpsc, oneshot, Semaphore};
use zz_statefetch::proto::{self, FetchError, Limits};
use zz_statefetch::recovery::RecoveryEvent;
use zz_statefetch::source::SourceFuture;
use zz_statefetch::{
    Certificate, PageSource, PageStore, RecoveryConfig, RecoveryView, Request, Response,
    StoreConfig, StoreError,
};
use zz_wire::exec::{ExecCheckpointCert, ExecEnvelope, ExecId};
use zz_wire::frame::FrameDecoder;

use crate::app::AppSpec;
use crate::link::{FetchBody, FetchCheck, FetchKeys, LinkFrame, MAX_LINK_FRAME};
use crate::pages::{RecoveringState, StateBackend};
use crate::replica::{CoreError, ExecParams, ExecutionCore, Ready};

/// Envelopes waiting for the core; more are dropped (and retransmitted).
const CORE_QUEUE: usize = 8192;
/// Fetch requests from peers served at once.
const SERVE_CONCURRENCY: usize = 4;
const READ_CHUNK: usize = 64 * 1024;

/// Everything one execution replica process needs.
#[derive(Debug)]
pub struct ExecutorConfig {
    pub params: ExecParams,
    pub app: AppSpec,
    /// Directory of the replica's page store.
    pub store_dir: PathBuf,
    /// The host agent's unix socket for this replica.
    pub socket: PathBuf,
    /// Indices of the app's other execution replicas (page sources).
    pub peers: Vec<u32>,
    pub recovery: RecoveryConfig,
    /// Deadline of one fetch request to a peer.
    pub fetch_timeout: Duration,
    /// How long to keep trying to connect to the socket.
    pub connect_timeout: Duration,
    /// Pause between recovery attempts that found no peer.
    pub retry: Duration,
    /// The core thread wakes at least this often (recovery progress).
    pub tick: Duration,
    /// An already connected stream to use instead of connecting to
    /// `socket` (a guest's bridge to its virtio-serial port, see
    /// [`crate::guest`]).
    pub stream: Option<std::os::unix::net::UnixStream>,
}

impl ExecutorConfig {
    /// A configuration with default timings; peers are every other index.
    pub fn new(params: ExecParams, app: AppSpec, store_dir: PathBuf, socket: PathBuf) -> Self {
        let n = params.exec_keys.len() as u32;
        let me = params.index;
        ExecutorConfig {
            params,
            app,
            store_dir,
            socket,
            peers: (0..n).filter(|i| *i != me).collect(),
            recovery: RecoveryConfig::default(),
            fetch_timeout: Duration::from_secs(2),
            connect_timeout: Duration::from_secs(30),
            retry: Duration::from_secs(1),
            tick: Duration::from_millis(100),
            stream: None,
        }
    }
}

/// Why the executor stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum DriverError {
    #[error("cannot connect to the host agent's socket {path}: {source}")]
    Connect {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("page store {path}: {source}")]
    Store { path: PathBuf, source: StoreError },
    #[error(transparent)]
    Core(#[from] CoreError),
    #[error("the core thread stopped unexpectedly: {0}")]
    Internal(String),
    /// The state of stable checkpoint `app_seq` could not be fetched: no
    /// peer still serves it. The replica stops; the agreement replicas then
    /// time it out and reimage it like a crashed one, and a later wake
    /// starts over from a newer stable checkpoint.
    #[error("recovery from stable checkpoint {app_seq} failed: {reason}")]
    RecoveryFailed { app_seq: u64, reason: String },
}

/// How the executor ended without an error.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Exit {
    /// The host agent closed the stream.
    StreamClosed,
    /// An injected crash ([`crate::FaultPlan::crash_after`]).
    Crashed,
}

/// Counters of a running executor.
#[derive(Debug, Default)]
pub struct ExecutorStats {
    pub frames_in: AtomicU64,
    /// Frames that did not decode or were misaddressed.
    pub frames_bad: AtomicU64,
    /// Envelopes dropped because the core's queue was full.
    pub frames_dropped: AtomicU64,
    pub envelopes_rejected: AtomicU64,
    pub fetch_served: AtomicU64,
    pub fetch_requested: AtomicU64,
    /// Fetch frames dropped for a missing or wrong MAC, or from a replica
    /// that is not a peer.
    pub fetch_forged: AtomicU64,
    pub recoveries: AtomicU64,
}

fn inc(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

type Waiters = Mutex<HashMap<u64, (ExecId, oneshot::Sender<Response>)>>;

/// What the reader, the writer, the core and the page sources share.
struct Link {
    /// Seals our fetch frames and checks those we receive.
    fetch_keys: FetchKeys,
    out: mpsc::UnboundedSender<Vec<u8>>,
    waiting: Waiters,
    next_id: AtomicU64,
    stats: Arc<ExecutorStats>,
}

impl Link {
    fn send(&self, frame: &LinkFrame) -> bool {
        self.out.send(frame.to_bytes()).is_ok()
    }

    /// Sends a fetch frame to `to`, MAC'd for it; false if the stream is
    /// closed or `to` is no peer of ours.
    fn send_fetch(&self, to: ExecId, id: u64, body: FetchBody) -> bool {
        match self.fetch_keys.seal(to, id, body) {
            Some(ff) => self.send(&LinkFrame::Fetch(ff)),
            None => false,
        }
    }

    fn waiters(
        &self,
    ) -> std::sync::MutexGuard<'_, HashMap<u64, (ExecId, oneshot::Sender<Response>)>> {
        self.waiting.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A peer execution replica reached through the host agent: a
/// [`PageSource`] for recovery. Untrusted like any source.
struct PeerSource {
    peer: ExecId,
    link: Arc<Link>,
    timeout: Duration,
}

/// Forgets a pending request however its call ends.
struct Waiting<'a> {
    link: &'a Link,
    id: u64,
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.link.waiters().remove(&self.id);
    }
}

impl PageSource for PeerSource {
    fn name(&self) -> String {
        format!("{} (via host agent)", self.peer)
    }

    fn call(&self, request: Request) -> SourceFuture<'_> {
        Box::pin(async move {
            let link = &*self.link;
            let id = link.next_id.fetch_add(1, Ordering::Relaxed);
            let (tx, rx) = oneshot::channel();
            link.waiters().insert(id, (self.peer, tx));
            let _guard = Waiting { link, id };
            inc(&link.stats.fetch_requested);
            if !link.send_fetch(self.peer, id, FetchBody::Request(request)) {
                return Err(FetchError::Closed);
            }
            match tokio::time::timeout(self.timeout, rx).await {
                Ok(Ok(resp)) => Ok(resp),
                Ok(Err(_)) => Err(FetchError::Closed),
                Err(_) => Err(FetchError::Timeout),
            }
        })
    }
}

enum CoreInput {
    Envelope(ExecEnvelope),
    Stop,
}

/// Runs one execution replica until its stream closes. Must be called
/// within a multi-threaded tokio runtime (the core thread blocks on it).
pub async fn run(cfg: ExecutorConfig) -> Result<Exit, DriverError> {
    run_with_stats(cfg, Arc::new(ExecutorStats::default())).await
}

/// [`run`], reporting into `stats`.
pub async fn run_with_stats(
    mut cfg: ExecutorConfig,
    stats: Arc<ExecutorStats>,
) -> Result<Exit, DriverError> {
    let store_dir = cfg.store_dir.clone();
    let store = tokio::task::spawn_blocking(move || {
        if clear_interrupted_recovery(&store_dir)? {
            tracing::warn!(
                dir = %store_dir.display(),
                "a recovery was interrupted: the state mixes fetched and old pages; starting empty, to recover again"
            );
        }
        PageStore::open(
            &store_dir,
            StoreConfig {
                cache_capacity: 64 << 20,
                ..StoreConfig::default()
            },
        )
    })
    .await
    .map_err(|e| DriverError::Internal(e.to_string()))?
    .map_err(|source| DriverError::Store {
        path: cfg.store_dir.clone(),
        source,
    })?;
    let me = ExecId {
        app: cfg.params.app,
        index: cfg.params.index,
    };
    let core = ExecutionCore::new(cfg.params.clone(), cfg.app.build(), Box::new(store.clone()))?;
    tracing::info!(exec = %me, app = %cfg.app, executed = core.executed(), "state opened");

    let stream = match cfg.stream.take() {
        Some(s) => s
            .set_nonblocking(true)
            .and_then(|()| UnixStream::from_std(s))
            .map_err(|source| DriverError::Connect {
                path: cfg.socket.clone(),
                source,
            })?,
        None => connect(&cfg.socket, cfg.connect_timeout).await?,
    };
    tracing::info!(exec = %me, socket = %cfg.socket.display(), "connected to the host agent");
    let (rd, mut wr) = stream.into_split();
    let (out_tx, mut out_rx) = mpsc::unbounded_channel::<Vec<u8>>();
    let writer = tokio::spawn(async move {
        while let Some(b) = out_rx.recv().await {
            if wr.write_all(&b).await.is_err() {
                return;
            }
            while let Ok(b) = out_rx.try_recv() {
                if wr.write_all(&b).await.is_err() {
                    return;
                }
            }
            if wr.flush().await.is_err() {
                return;
            }
        }
    });
    let link = Arc::new(Link {
        fetch_keys: FetchKeys::new(me, &cfg.params.key, &cfg.params.exec_keys),
        out: out_tx,
        waiting: Mutex::new(HashMap::new()),
        next_id: AtomicU64::new(1),
        stats: stats.clone(),
    });

    let (core_tx, core_rx) = std_mpsc::sync_channel::<CoreInput>(CORE_QUEUE);
    let (done_tx, mut done_rx) = oneshot::channel();
    let sources: Vec<Arc<dyn PageSource>> = cfg
        .peers
        .iter()
        .map(|&index| {
            Arc::new(PeerSource {
                peer: ExecId { app: me.app, index },
                link: link.clone(),
                timeout: cfg.fetch_timeout,
            }) as Arc<dyn PageSource>
        })
        .collect();
    let ctx = CoreCtx {
        link: link.clone(),
        store: store.clone(),
        store_dir: cfg.store_dir.clone(),
        sources,
        recovery: cfg.recovery.clone(),
        retry: cfg.retry,
        tick: cfg.tick,
        runtime: tokio::runtime::Handle::current(),
        stats: stats.clone(),
    };
    std::thread::Builder::new()
        .name("zz-exec-core".into())
        .spawn(move || {
            let r = core_loop(core, core_rx, ctx);
            let _ = done_tx.send(r);
        })
        .map_err(|e| DriverError::Internal(format!("cannot start the core thread: {e}")))?;

    let lie_pages = cfg.params.faults.lie_pages;
    if lie_pages {
        tracing::warn!("fault injection: serving corrupted pages to recovering peers");
    }
    let serve_delay = Duration::from_millis(cfg.params.faults.serve_delay_ms);
    let reader = read_loop(
        rd,
        core_tx.clone(),
        link.clone(),
        store,
        lie_pages,
        serve_delay,
    );
    let result = tokio::select! {
        () = reader => {
            tracing::info!(exec = %me, "the host agent closed the stream; stopping");
            // The queue may be full: a blocking send would wait for the core.
            let tx = core_tx.clone();
            let _ = tokio::task::spawn_blocking(move || tx.send(CoreInput::Stop)).await;
            match tokio::time::timeout(Duration::from_secs(5), &mut done_rx).await {
                Ok(Ok(Err(e))) => Err(e),
                _ => Ok(Exit::StreamClosed),
            }
        }
        r = &mut done_rx => match r {
            Ok(r) => r,
            Err(_) => Err(DriverError::Internal("the core thread panicked".into())),
        },
    };
    drop(core_tx);
    drop(link);
    // Let the writer send what the core queued last (an injected crash
    // sends its outputs first, like a real one mid-flight would not; a
    // stream that is gone ends the writer at once).
    let _ = tokio::time::timeout(Duration::from_millis(500), writer).await;
    tracing::info!(
        exec = %me,
        frames_in = stats.frames_in.load(Ordering::Relaxed),
        frames_bad = stats.frames_bad.load(Ordering::Relaxed),
        rejected = stats.envelopes_rejected.load(Ordering::Relaxed),
        served = stats.fetch_served.load(Ordering::Relaxed),
        fetch_forged = stats.fetch_forged.load(Ordering::Relaxed),
        recoveries = stats.recoveries.load(Ordering::Relaxed),
        "executor stopped"
    );
    result
}

async fn connect(path: &std::path::Path, timeout: Duration) -> Result<UnixStream, DriverError> {
    let deadline = Instant::now() + timeout;
    let mut wait = Duration::from_millis(10);
    loop {
        match UnixStream::connect(path).await {
            Ok(s) => {
                crate::link::widen_send_buffer(&s);
                return Ok(s);
            }
            Err(e) if Instant::now() >= deadline => {
                return Err(DriverError::Connect {
                    path: path.to_path_buf(),
                    source: e,
                })
            }
            Err(_) => {
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(Duration::from_millis(500));
            }
        }
    }
}

/// Reads frames until the stream closes or its framing breaks.
async fn read_loop(
    mut rd: tokio::net::unix::OwnedReadHalf,
    core: std_mpsc::SyncSender<CoreInput>,
    link: Arc<Link>,
    store: PageStore,
    lie_pages: bool,
    serve_delay: Duration,
) {
    let decoder = FrameDecoder::new(MAX_LINK_FRAME);
    let mut buf = BytesMut::with_capacity(READ_CHUNK);
    let serving = Arc::new(Semaphore::new(SERVE_CONCURRENCY));
    let stats = link.stats.clone();
    loop {
        if buf.capacity() - buf.len() < READ_CHUNK / 4 {
            buf.reserve(READ_CHUNK);
        }
        match rd.read_buf(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        loop {
            let body = match decoder.decode(&mut buf) {
                Ok(Some(b)) => b,
                Ok(None) => break,
                Err(e) => {
                    tracing::warn!(error = %e, "oversized frame from the host agent; closing");
                    inc(&stats.frames_bad);
                    return;
                }
            };
            inc(&stats.frames_in);
            let frame = match LinkFrame::decode(&body) {
                Ok(f) => f,
                Err(e) => {
                    tracing::debug!(error = %e, "malformed frame");
                    inc(&stats.frames_bad);
                    continue;
                }
            };
            match frame {
                LinkFrame::Exec(env) => match core.try_send(CoreInput::Envelope(env)) {
                    Ok(()) => {}
                    Err(std_mpsc::TrySendError::Full(_)) => inc(&stats.frames_dropped),
                    Err(std_mpsc::TrySendError::Disconnected(_)) => return,
                },
                LinkFrame::Fetch(ff) => match link.fetch_keys.check(&ff) {
                    FetchCheck::Forged(why) => {
                        // Forged or altered on the way: never served, and
                        // never held against the replica it names (the fetch
                        // times out or is hedged to another peer).
                        tracing::debug!(from = %ff.from, to = %ff.to, why, "fetch frame dropped");
                        inc(&stats.fetch_forged);
                    }
                    FetchCheck::HostRefusal => {
                        deliver_response(&link, &stats, ff.from, ff.id, ff.body)
                    }
                    FetchCheck::Authentic => match ff.body {
                        FetchBody::Request(req) => serve_fetch(
                            &link,
                            &serving,
                            &store,
                            (ff.from, ff.id, req),
                            lie_pages,
                            serve_delay,
                        ),
                        body => deliver_response(&link, &stats, ff.from, ff.id, body),
                    },
                },
            }
        }
    }
}

/// Serves a peer's authentic fetch request `(from, id, req)` from `store`,
/// at most [`SERVE_CONCURRENCY`] at once (refusing more).
fn serve_fetch(
    link: &Arc<Link>,
    serving: &Arc<Semaphore>,
    store: &PageStore,
    (from, id, req): (ExecId, u64, Request),
    lie_pages: bool,
    serve_delay: Duration,
) {
    let Ok(permit) = serving.clone().try_acquire_owned() else {
        // Busy: refuse rather than queue without bound.
        link.send_fetch(
            from,
            id,
            FetchBody::Response(Response::Refused {
                kind: proto::RefusalKind::Internal,
                detail: "busy".into(),
            }),
        );
        return;
    };
    let (store, link) = (store.clone(), link.clone());
    tokio::spawn(async move {
        let link2 = link.clone();
        // Reading the pages and sealing up to a megabyte of them are both
        // kept off the runtime's threads.
        let queued = Instant::now();
        let sealed = tokio::task::spawn_blocking(move || {
            let started = Instant::now();
            let pages = match &req {
                proto::Request::Pages { indices, .. } => indices.len(),
                _ => 0,
            };
            let mut resp = proto::handle(&store, &Limits::default(), req);
            tracing::debug!(
                %from,
                id,
                pages,
                queued_ms = (started - queued).as_secs_f64() * 1e3,
                handle_ms = started.elapsed().as_secs_f64() * 1e3,
                "served a fetch request"
            );
            if lie_pages {
                crate::fault::corrupt_served_pages(&mut resp);
            }
            link2.fetch_keys.seal(from, id, FetchBody::Response(resp))
        })
        .await
        .unwrap_or_else(|e| {
            link.fetch_keys.seal(
                from,
                id,
                FetchBody::Response(Response::Refused {
                    kind: proto::RefusalKind::Internal,
                    detail: e.to_string(),
                }),
            )
        });
        if !serve_delay.is_zero() {
            tokio::time::sleep(serve_delay).await;
        }
        drop(permit);
        inc(&link.stats.fetch_served);
        if let Some(ff) = sealed {
            link.send(&LinkFrame::Fetch(ff));
        }
    });
}

/// Hands a checked fetch response to the request waiting for it.
fn deliver_response(link: &Link, stats: &ExecutorStats, from: ExecId, id: u64, body: FetchBody) {
    let FetchBody::Response(resp) = body else {
        // A request that passed as a host refusal cannot exist; be safe.
        inc(&stats.frames_bad);
        return;
    };
    let mut w = link.waiters();
    match w.get(&id) {
        Some((peer, _)) if *peer == from => {
            if let Some((_, tx)) = w.remove(&id) {
                let _ = tx.send(resp);
            }
        }
        _ => {
            drop(w);
            tracing::debug!(%from, id, "unexpected fetch response");
            inc(&stats.frames_bad);
        }
    }
}

/// What the core thread needs besides the core.
struct CoreCtx {
    link: Arc<Link>,
    store: PageStore,
    /// Where the recovery mark lives (see [`RECOVERY_MARK`]).
    store_dir: PathBuf,
    sources: Vec<Arc<dyn PageSource>>,
    recovery: RecoveryConfig,
    retry: Duration,
    tick: Duration,
    runtime: tokio::runtime::Handle,
    stats: Arc<ExecutorStats>,
}

/// A recovery in progress: the view the core's state reads through.
struct Recovering {
    view: Arc<RecoveryView>,
    cert: ExecCheckpointCert,
    started: Instant,
}

fn core_loop(
    mut core: ExecutionCore,
    inputs: std_mpsc::Receiver<CoreInput>,
    ctx: CoreCtx,
) -> Result<Exit, DriverError> {
    let mut wanted: Option<ExecCheckpointCert> = None;
    let mut retry_at = Instant::now();
    let mut recovering: Option<Recovering> = None;
    loop {
        let first = match inputs.recv_timeout(ctx.tick) {
            Ok(i) => Some(i),
            Err(std_mpsc::RecvTimeoutError::Timeout) => None,
            Err(std_mpsc::RecvTimeoutError::Disconnected) => return Ok(Exit::StreamClosed),
        };
        let mut next = first;
        while let Some(input) = next {
            match input {
                CoreInput::Stop => return Ok(Exit::StreamClosed),
                CoreInput::Envelope(env) => {
                    if let Err(e) = core.on_envelope(&env) {
                        tracing::debug!(error = %e, "envelope rejected");
                        inc(&ctx.stats.envelopes_rejected);
                    }
                }
            }
            next = inputs.try_recv().ok();
        }
        let Some(ready) = execute(&mut core, &ctx, recovering.as_ref())? else {
            return Ok(Exit::Crashed);
        };
        if let Some(c) = ready.stable_ahead {
            tracing::info!(
                app_seq = c.app_seq,
                executed = core.executed(),
                "stable checkpoint ahead of our state"
            );
            wanted = Some(c);
            retry_at = Instant::now();
        }
        if wanted
            .as_ref()
            .is_some_and(|c| c.app_seq <= core.executed())
        {
            wanted = None;
        }
        if let Some(cert) = wanted.clone() {
            if Instant::now() >= retry_at {
                match start_recovery(&mut core, &ctx, &cert) {
                    Ok(r) => {
                        wanted = None;
                        // Orders buffered above the checkpoint execute now.
                        if execute(&mut core, &ctx, Some(&r))?.is_none() {
                            return Ok(Exit::Crashed);
                        }
                        recovering = Some(r);
                    }
                    Err(e) => {
                        tracing::warn!(app_seq = cert.app_seq, error = %e, "recovery could not start; retrying");
                        retry_at = Instant::now() + ctx.retry;
                    }
                }
            }
        }
        if let Some(r) = &recovering {
            for ev in r.view.take_events() {
                match ev {
                    RecoveryEvent::SourceFault {
                        source,
                        error,
                        excluded,
                    } => tracing::warn!(%source, %error, excluded, "page source failed"),
                    RecoveryEvent::Compared { missing } => {
                        tracing::info!(missing, "recovery: pages compared")
                    }
                    RecoveryEvent::Finished {
                        fetched,
                        error: Some(reason),
                    } => {
                        tracing::error!(fetched, %reason, "recovery: the state cannot be fetched");
                        return Err(DriverError::RecoveryFailed {
                            app_seq: r.cert.app_seq,
                            reason,
                        });
                    }
                    RecoveryEvent::Finished {
                        fetched,
                        error: None,
                    } => {
                        tracing::info!(fetched, "recovery: background fetch finished")
                    }
                }
            }
            let p = r.view.progress();
            if p.finished && p.missing == 0 && p.present == p.num_pages {
                // The plain store must hold every page before it replaces the view.
                let stored = r.view.persist_staged();
                if let Err(e) = &stored {
                    tracing::warn!(error = %e, "recovery complete but staged pages not yet stored");
                }
                match stored.map_err(|e| e.to_string()).and_then(|()| {
                    core.swap_state(Box::new(ctx.store.clone()))
                        .map_err(|e| e.to_string())
                }) {
                    Ok(old) => {
                        drop(old);
                        // Durable first: only then is the state whole on disk.
                        if let Err(e) =
                            ctx.store.flush().map_err(|e| e.to_string()).and_then(|()| {
                                clear_recovery_mark(&ctx.store_dir).map_err(|e| e.to_string())
                            })
                        {
                            tracing::warn!(error = %e, "recovery complete but its mark not cleared");
                        }
                        let r = recovering.take().expect("checked");
                        tracing::info!(
                            app_seq = r.cert.app_seq,
                            fetched = p.fetched,
                            pages = p.num_pages,
                            secs = r.started.elapsed().as_secs_f64(),
                            "recovery complete; state is local again"
                        );
                    }
                    Err(e) => {
                        tracing::debug!(error = %e, "recovery complete but not yet swappable")
                    }
                }
            }
        }
    }
}

/// A file in the state folder that exists while a recovery is under way:
/// the store then mixes pages of the checkpoint being fetched, older local
/// pages and replayed writes, and is no state to execute from. A replica
/// that starts and finds it starts empty, and recovers again.
pub const RECOVERY_MARK: &str = "RECOVERING";

fn set_recovery_mark(store_dir: &Path, app_seq: u64) -> std::io::Result<()> {
    std::fs::create_dir_all(store_dir)?;
    let path = store_dir.join(RECOVERY_MARK);
    let mut f = std::fs::File::create(&path)?;
    std::io::Write::write_all(&mut f, format!("{app_seq}\n").as_bytes())?;
    f.sync_all()?;
    std::fs::File::open(store_dir)?.sync_all()
}

fn clear_recovery_mark(store_dir: &Path) -> std::io::Result<()> {
    match std::fs::remove_file(store_dir.join(RECOVERY_MARK)) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    std::fs::File::open(store_dir)?.sync_all()
}

/// If a recovery was under way when the replica last stopped, removes the
/// page store and the mark; returns whether it did.
fn clear_interrupted_recovery(store_dir: &Path) -> Result<bool, StoreError> {
    if !store_dir.join(RECOVERY_MARK).exists() {
        return Ok(false);
    }
    PageStore::destroy(store_dir)?;
    clear_recovery_mark(store_dir)?;
    Ok(true)
}

/// Executes what the core can and sends its output. During a recovery the
/// run is marked to the view (its background fetch steps aside meanwhile)
/// and logged. `None`: the replica must now crash (fault injection).
fn execute(
    core: &mut ExecutionCore,
    ctx: &CoreCtx,
    recovering: Option<&Recovering>,
) -> Result<Option<Ready>, DriverError> {
    let before = core.executed();
    let executing = recovering.map(|r| r.view.executing());
    let (wall, cpu) = (Instant::now(), thread_cpu_time());
    let ready = core.ready()?;
    let run = RunTime {
        wall: wall.elapsed(),
        cpu: thread_cpu_time()
            .zip(cpu)
            .map(|(after, before)| after.saturating_sub(before)),
    };
    drop(executing);
    if send_ready(core, ctx, &ready) {
        return Ok(None);
    }
    if let Some(r) = recovering {
        log_replay(r, before, core.executed(), run);
    }
    Ok(Some(ready))
}

/// How long one run of execution took, and how much of it this thread
/// spent on a CPU (the rest it waited: for fetches, locks, the disk, or a
/// core busy with other processes).
#[derive(Clone, Copy)]
struct RunTime {
    wall: Duration,
    cpu: Option<Duration>,
}

/// CPU time of the calling thread so far, where the system reports it.
fn thread_cpu_time() -> Option<Duration> {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_THREAD_CPUTIME_ID)
        .ok()
        .map(Duration::from)
}

/// Logs what executing orders during recovery cost in page fetches.
fn log_replay(r: &Recovering, before: u64, executed: u64, run: RunTime) {
    if executed <= before {
        return;
    }
    let p = r.view.progress();
    tracing::info!(
        executed,
        orders = executed - before,
        run_ms = run.wall.as_millis() as u64,
        run_cpu_ms = run.cpu.map(|c| c.as_millis() as u64),
        demand_reads = p.demand_reads,
        demand_wait_ms = p.demand_wait_us / 1000,
        reads = p.reads,
        read_ms = p.read_us / 1000,
        write_ms = p.write_us / 1000,
        fetched = p.fetched,
        ms = r.started.elapsed().as_millis() as u64,
        "recovering: executed orders"
    );
}

/// Sends a `Ready`'s messages; true if the replica must now crash.
fn send_ready(core: &ExecutionCore, ctx: &CoreCtx, ready: &Ready) -> bool {
    if ready.delay_ms > 0 {
        std::thread::sleep(Duration::from_millis(ready.delay_ms));
    }
    for m in &ready.messages {
        for env in core.seal(m) {
            ctx.link.send(&LinkFrame::Exec(env));
        }
    }
    for (to, m) in &ready.direct {
        if let Some(env) = core.seal_to(*to, m) {
            ctx.link.send(&LinkFrame::Exec(env));
        }
    }
    if let Some(c) = &ready.diverged {
        tracing::error!(
            app_seq = c.app_seq,
            "our checkpoint differs from the stable one: this replica's state is wrong"
        );
    }
    if ready.crash {
        tracing::warn!("fault injection: crashing");
    }
    ready.crash
}

/// Opens a recovery of `cert` and installs it as the core's state.
fn start_recovery(
    core: &mut ExecutionCore,
    ctx: &CoreCtx,
    cert: &ExecCheckpointCert,
) -> Result<Recovering, String> {
    let started = Instant::now();
    // Before the first fetched page reaches the store.
    set_recovery_mark(&ctx.store_dir, cert.app_seq).map_err(|e| e.to_string())?;
    let view = ctx
        .runtime
        .block_on(RecoveryView::open(
            ctx.store.clone(),
            Certificate {
                seq: cert.app_seq,
                root: cert.root,
            },
            ctx.sources.clone(),
            ctx.recovery.clone(),
        ))
        .map_err(|e| {
            // Opening fetched nothing into the store: the state is intact.
            if let Err(c) = clear_recovery_mark(&ctx.store_dir) {
                tracing::warn!(error = %c, "clearing the recovery mark");
            }
            e.to_string()
        })?;
    let view = Arc::new(view);
    let state = RecoveringState::new(view.clone(), ctx.store.clone()).map_err(|e| e.to_string())?;
    let state: Box<dyn StateBackend> = Box::new(state);
    let old = core.install_state(state, cert).map_err(|e| e.to_string())?;
    drop(old);
    inc(&ctx.stats.recoveries);
    tracing::info!(
        app_seq = cert.app_seq,
        pages = view.num_pages(),
        open_ms = started.elapsed().as_millis() as u64,
        "recovering: executing from the stable checkpoint while its pages are fetched"
    );
    Ok(Recovering {
        view,
        cert: cert.clone(),
        started,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::app::{AppKind, AppSpec};
    use std::io::{Read, Write};
    use zz_wire::crypto::KeyPair;
    use zz_wire::frame::FrameDecoder;

    /// The next fetch frame the executor writes on `host`'s end of its
    /// stream, or `None` if none comes within `wait`.
    fn next_fetch(
        host: &mut std::os::unix::net::UnixStream,
        buf: &mut bytes::BytesMut,
        wait: Duration,
    ) -> Option<crate::link::FetchFrame> {
        let dec = FrameDecoder::new(MAX_LINK_FRAME);
        let end = std::time::Instant::now() + wait;
        loop {
            while let Some(body) = dec.decode(buf).unwrap() {
                if let LinkFrame::Fetch(ff) = LinkFrame::decode(&body).unwrap() {
                    return Some(ff);
                }
            }
            let left = end.checked_duration_since(std::time::Instant::now())?;
            host.set_read_timeout(Some(left.max(Duration::from_millis(1))))
                .unwrap();
            let mut chunk = [0u8; 65536];
            match host.read(&mut chunk) {
                Ok(0) => return None,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
                Err(_) => return None,
            }
        }
    }

    #[test]
    fn fetch_frames_without_a_peers_mac_are_dropped_and_counted() {
        let dir = tempfile::tempdir().unwrap();
        let execs: Vec<KeyPair> = (0..3).map(|_| KeyPair::generate()).collect();
        let agreement: Vec<KeyPair> = (0..4).map(|_| KeyPair::generate()).collect();
        let exec_keys: Vec<_> = execs.iter().map(|k| k.public()).collect();
        let me = ExecId { app: 1, index: 0 };
        let params = ExecParams::new(
            1,
            0,
            1,
            execs[0].clone(),
            exec_keys.clone(),
            agreement
                .iter()
                .map(|a| execs[0].shared_mac_key(&a.public()))
                .collect(),
            Default::default(),
        );
        let (mut host, theirs) = std::os::unix::net::UnixStream::pair().unwrap();
        let mut cfg = ExecutorConfig::new(
            params,
            AppSpec {
                kind: AppKind::Kv,
                cpu_rounds: 0,
            },
            dir.path().join("state"),
            dir.path().join("unused.sock"),
        );
        cfg.stream = Some(theirs);
        let stats = Arc::new(ExecutorStats::default());
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let running = rt.spawn(run_with_stats(cfg, stats.clone()));

        // Replica 1 of the app, as a peer and as a forger.
        let peer = FetchKeys::new(ExecId { app: 1, index: 1 }, &execs[1], &exec_keys);
        let send = |host: &mut std::os::unix::net::UnixStream, ff| {
            host.write_all(&LinkFrame::Fetch(ff).to_bytes()).unwrap();
        };
        let mut buf = bytes::BytesMut::new();
        // A request with a MAC made with another key, one without a MAC,
        // and one from a replica of another app: none is answered.
        let outsider = FetchKeys::new(
            ExecId { app: 1, index: 1 },
            &KeyPair::generate(),
            &exec_keys,
        );
        let wrong_key = outsider
            .seal(me, 1, FetchBody::Request(Request::Info))
            .unwrap();
        let mut no_mac = wrong_key.clone();
        no_mac.id = 2;
        no_mac.mac = None;
        let mut other_app = peer.seal(me, 3, FetchBody::Request(Request::Info)).unwrap();
        other_app.from = ExecId { app: 2, index: 1 };
        // An unMAC'd response that would blame a peer, for no request.
        let blame = crate::link::FetchFrame {
            from: ExecId { app: 1, index: 2 },
            to: me,
            id: 4,
            body: FetchBody::Response(Response::Refused {
                kind: proto::RefusalKind::RootMismatch,
                detail: "forged".into(),
            }),
            mac: None,
        };
        for ff in [wrong_key, no_mac, other_app, blame] {
            send(&mut host, ff);
        }
        assert_eq!(
            next_fetch(&mut host, &mut buf, Duration::from_millis(500)),
            None,
            "a forged request was answered"
        );
        assert_eq!(stats.fetch_forged.load(Ordering::Relaxed), 4);
        assert_eq!(stats.fetch_served.load(Ordering::Relaxed), 0);

        // The peer's own request is served, and the answer is MAC'd for it.
        send(
            &mut host,
            peer.seal(me, 5, FetchBody::Request(Request::Info)).unwrap(),
        );
        let answer = next_fetch(&mut host, &mut buf, Duration::from_secs(10))
            .expect("the peer's request is answered");
        let peer_id = ExecId { app: 1, index: 1 };
        assert_eq!((answer.from, answer.to, answer.id), (me, peer_id, 5));
        assert!(matches!(
            answer.body,
            FetchBody::Response(Response::Info(_))
        ));
        assert_eq!(peer.check(&answer), crate::link::FetchCheck::Authentic);
        assert_eq!(stats.fetch_forged.load(Ordering::Relaxed), 4);

        drop(host);
        let exit = rt
            .block_on(async { tokio::time::timeout(Duration::from_secs(10), running).await })
            .expect("the executor stops when its stream closes")
            .unwrap();
        assert!(matches!(exit, Ok(Exit::StreamClosed)), "{exit:?}");
    }

    #[test]
    fn an_interrupted_recovery_leaves_a_mark_that_empties_the_store_at_start() {
        let dir = tempfile::tempdir().unwrap();
        let store_dir = dir.path().join("state");
        let page = vec![7u8; zz_statefetch::PAGE_SIZE];
        {
            let store = PageStore::open(&store_dir, StoreConfig::default()).unwrap();
            store.write_page(3, &page).unwrap();
            store.flush().unwrap();
        }
        std::fs::write(store_dir.join("fault.toml"), "kept").unwrap();
        // No mark: the store is kept.
        assert!(!clear_interrupted_recovery(&store_dir).unwrap());
        let store = PageStore::open(&store_dir, StoreConfig::default()).unwrap();
        assert_eq!(store.read_page(3).unwrap(), page);
        drop(store);
        // A recovery starts, and the replica stops before it completes.
        set_recovery_mark(&store_dir, 42).unwrap();
        assert!(clear_interrupted_recovery(&store_dir).unwrap());
        assert!(!store_dir.join(RECOVERY_MARK).exists());
        assert_eq!(
            std::fs::read_to_string(store_dir.join("fault.toml")).unwrap(),
            "kept"
        );
        let store = PageStore::open(&store_dir, StoreConfig::default()).unwrap();
        assert_eq!(store.num_pages().unwrap(), 0, "the mixed state is gone");
        drop(store);
        // A completed recovery clears its mark: nothing is removed.
        set_recovery_mark(&store_dir, 43).unwrap();
        clear_recovery_mark(&store_dir).unwrap();
        clear_recovery_mark(&store_dir).unwrap();
        assert!(!clear_interrupted_recovery(&store_dir).unwrap());
    }
}
