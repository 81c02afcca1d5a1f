//! The agreement side of the links to host agents (`zz-hostd`): how Orders,
//! stable checkpoints and host commands reach execution replicas, and how
//! their answers come back (DESIGN §2-3, §6).
//!
//! Each agreement replica keeps one TCP connection to every host agent of the
//! config, reconnecting with exponential backoff; while a host is unreachable
//! what is queued for it is dropped and counted (the execution monitor
//! retransmits orders, and host commands are re-sent periodically).
//!
//! On every connection:
//! 1. the replica sends a [`Hello`] first: its id and the host's name, signed
//!    with its key, so the host agent routes executor output for this replica
//!    to this connection (a replayed hello only earns its sender copies of
//!    messages MAC'd for someone else);
//! 2. then `zz-wire` frames, each body a [`Frame`]: the replica sends
//!    [`Frame::Exec`] envelopes routed `ToExecutor { from: me, to }`, MAC'd
//!    end to end with the key this replica shares with execution replica
//!    `to` (derived from its `public_key` in the config), and
//!    [`Frame::HostCommand`]s (signed; the host acts on f+1 of them);
//! 3. the host agent sends back [`Frame::Exec`] envelopes routed
//!    `ToAgreement { from, to: me }`. Each is checked: `from` must be an
//!    execution replica placed on that host, and the MAC must verify with
//!    the key shared with `from`; then its message goes to the core through
//!    [`ExecInput`]. Anything else is dropped and counted in
//!    [`HostLinkStats`]; nothing a host sends can panic the replica.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufWriter};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, watch};
use zz_wire::codec;
use zz_wire::config::{ClusterConfig, ReplicaKeys};
use zz_wire::crypto::{KeyPair, MacKey};
use zz_wire::exec::{ExecEnvelope, ExecId, ExecRoute};
use zz_wire::frame::{write_frame, FrameDecoder, DEFAULT_MAX_FRAME};
use zz_wire::message::{Frame, Signable, Signed};
use zz_wire::ReplicaId;

use crate::driver::{ExecInput, ExecOutput};

/// Most bytes queued for one host before further frames are dropped.
const MAX_QUEUED_BYTES: usize = 64 * 1024 * 1024;
const BACKOFF_MIN: Duration = Duration::from_millis(20);
const BACKOFF_MAX: Duration = Duration::from_millis(1000);
const READ_CHUNK: usize = 64 * 1024;

/// The first frame an agreement replica sends on a link to a host agent.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    pub replica: ReplicaId,
    /// The host's name in the config: a hello for one host is no use at another.
    pub host: String,
}

impl Signable for Hello {
    const DOMAIN: &'static str = "zz host link hello v1";
    fn signer(&self) -> ReplicaId {
        self.replica
    }
}

impl Hello {
    /// The signed hello's frame bytes (length prefix and body).
    pub fn frame(replica: ReplicaId, host: &str, key: &KeyPair) -> Vec<u8> {
        let signed = Signed::sign(
            Hello {
                replica,
                host: host.to_string(),
            },
            key,
        );
        zz_wire::frame::frame(&codec::encode(&signed))
    }

    /// Decodes and verifies a hello body for host `host`; `keys[i]` is
    /// agreement replica i's key. Returns the replica.
    pub fn check(
        body: &[u8],
        host: &str,
        keys: &[ed25519_dalek::VerifyingKey],
    ) -> Option<ReplicaId> {
        let signed: Signed<Hello> = codec::decode(body).ok()?;
        (signed.body.host == host && signed.verify(keys)).then_some(signed.body.replica)
    }
}

/// Counters of the host links of one replica.
#[derive(Debug, Default)]
pub struct HostLinkStats {
    pub frames_in: AtomicU64,
    pub frames_malformed: AtomicU64,
    /// Envelopes with a bad MAC, a bad route or an executor not on that host.
    pub frames_unauthenticated: AtomicU64,
    /// Outbound frames dropped: host unreachable or its queue full.
    pub frames_dropped: AtomicU64,
    /// Outputs naming an executor the config does not place on any host.
    pub unroutable: AtomicU64,
    pub connects: AtomicU64,
}

fn inc(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

/// The links of one replica; they stop when the handle is dropped or the
/// core's output channel closes.
pub struct HostLinks {
    pub stats: Arc<HostLinkStats>,
    connected: Vec<(String, Arc<AtomicBool>)>,
    _shutdown: watch::Sender<bool>,
}

impl HostLinks {
    /// Hosts whose link is up now.
    pub fn connected(&self) -> Vec<String> {
        self.connected
            .iter()
            .filter(|(_, up)| up.load(Ordering::Relaxed))
            .map(|(h, _)| h.clone())
            .collect()
    }
}

struct HostQueue {
    tx: mpsc::UnboundedSender<Bytes>,
    queued: Arc<AtomicUsize>,
}

impl HostQueue {
    fn send(&self, bytes: Bytes, stats: &HostLinkStats) {
        let len = bytes.len();
        if self.queued.load(Ordering::Relaxed) + len > MAX_QUEUED_BYTES {
            inc(&stats.frames_dropped);
            return;
        }
        self.queued.fetch_add(len, Ordering::Relaxed);
        if self.tx.send(bytes).is_err() {
            self.queued.fetch_sub(len, Ordering::Relaxed);
            inc(&stats.frames_dropped);
        }
    }
}

/// Where one execution replica is and the key this replica shares with it.
#[derive(Clone, Copy)]
struct Route {
    host: usize,
    mac: MacKey,
}

/// Starts a link to every host of `cfg` and a task that sends the core's
/// execution outputs (`outputs`, from [`crate::driver::DriverOptions::exec_out`])
/// over them; messages from execution replicas go to `input`. Must be called
/// inside a tokio runtime.
pub fn spawn(
    cfg: &ClusterConfig,
    keys: &ReplicaKeys,
    outputs: mpsc::UnboundedReceiver<ExecOutput>,
    input: ExecInput,
) -> HostLinks {
    let me = keys.me;
    let stats = Arc::new(HostLinkStats::default());
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let mut routes: HashMap<ExecId, Route> = HashMap::new();
    for e in &cfg.executors {
        let Some(host) = cfg.hosts.iter().position(|h| h.name == e.host) else {
            continue;
        };
        let Ok(public) = zz_wire::crypto::parse_public_key(&e.public_key) else {
            continue;
        };
        routes.insert(
            ExecId {
                app: e.app,
                index: e.index,
            },
            Route {
                host,
                mac: keys.key.shared_mac_key(&public),
            },
        );
    }
    let routes = Arc::new(routes);
    let mut queues = Vec::new();
    let mut connected = Vec::new();
    for (i, h) in cfg.hosts.iter().enumerate() {
        let (tx, rx) = mpsc::unbounded_channel();
        let queued = Arc::new(AtomicUsize::new(0));
        let up = Arc::new(AtomicBool::new(false));
        let link = Link {
            me,
            host: i,
            name: h.name.clone(),
            addr: h.addr,
            hello: Bytes::from(Hello::frame(me, &h.name, &keys.key)),
            routes: routes.clone(),
            input: input.clone(),
            stats: stats.clone(),
            queued: queued.clone(),
            up: up.clone(),
        };
        tokio::spawn(link.run(rx, shutdown_rx.clone()));
        queues.push(HostQueue { tx, queued });
        connected.push((h.name.clone(), up));
    }
    tokio::spawn(dispatch(
        me,
        outputs,
        queues,
        routes,
        stats.clone(),
        shutdown_rx,
    ));
    HostLinks {
        stats,
        connected,
        _shutdown: shutdown_tx,
    }
}

/// Seals the core's outputs and queues them for the right host.
async fn dispatch(
    me: ReplicaId,
    mut outputs: mpsc::UnboundedReceiver<ExecOutput>,
    queues: Vec<HostQueue>,
    routes: Arc<HashMap<ExecId, Route>>,
    stats: Arc<HostLinkStats>,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        let out = tokio::select! {
            o = outputs.recv() => o,
            _ = shutdown.changed() => return,
        };
        let Some(out) = out else { return };
        let mut pending: Vec<BytesMut> = queues.iter().map(|_| BytesMut::new()).collect();
        let mut handle = |out: ExecOutput| match out {
            ExecOutput::Message(to, msg) => {
                let Some(r) = routes.get(&to) else {
                    inc(&stats.unroutable);
                    return;
                };
                let env = ExecEnvelope::seal(ExecRoute::ToExecutor { from: me, to }, &msg, &r.mac);
                write_frame(&mut pending[r.host], &codec::encode(&Frame::Exec(env)));
            }
            ExecOutput::HostCommand(cmd) => {
                let to = ExecId {
                    app: cmd.body.app,
                    index: cmd.body.exec,
                };
                let Some(r) = routes.get(&to) else {
                    inc(&stats.unroutable);
                    return;
                };
                write_frame(
                    &mut pending[r.host],
                    &codec::encode(&Frame::HostCommand(cmd)),
                );
            }
        };
        handle(out);
        // Whatever else is ready goes out in the same writes.
        while let Ok(out) = outputs.try_recv() {
            handle(out);
        }
        for (q, buf) in queues.iter().zip(pending) {
            if !buf.is_empty() {
                q.send(buf.freeze(), &stats);
            }
        }
    }
}

/// The link to one host agent.
struct Link {
    me: ReplicaId,
    host: usize,
    name: String,
    addr: SocketAddr,
    hello: Bytes,
    routes: Arc<HashMap<ExecId, Route>>,
    input: ExecInput,
    stats: Arc<HostLinkStats>,
    queued: Arc<AtomicUsize>,
    up: Arc<AtomicBool>,
}

impl Link {
    async fn run(
        self,
        mut rx: mpsc::UnboundedReceiver<Bytes>,
        mut shutdown: watch::Receiver<bool>,
    ) {
        let mut backoff = BACKOFF_MIN;
        loop {
            let connected = tokio::select! {
                c = tokio::time::timeout(Duration::from_secs(2), TcpStream::connect(self.addr)) => c,
                _ = shutdown.changed() => return,
            };
            if let Ok(Ok(stream)) = connected {
                let _ = stream.set_nodelay(true);
                tracing::info!(host = %self.name, addr = %self.addr, "connected to host agent");
                inc(&self.stats.connects);
                self.up.store(true, Ordering::Relaxed);
                backoff = BACKOFF_MIN;
                let (rd, wr) = stream.into_split();
                let mut w = BufWriter::with_capacity(64 * 1024, wr);
                let stop = tokio::select! {
                    r = self.write_loop(&mut w, &mut rx) => r.is_ok(),
                    () = self.read_loop(rd) => false,
                    _ = shutdown.changed() => true,
                };
                self.up.store(false, Ordering::Relaxed);
                if stop {
                    return;
                }
                tracing::info!(host = %self.name, "lost the link to the host agent");
            }
            let deadline = tokio::time::sleep(backoff);
            tokio::pin!(deadline);
            loop {
                tokio::select! {
                    _ = &mut deadline => break,
                    m = rx.recv() => match m {
                        Some(b) => {
                            self.queued.fetch_sub(b.len(), Ordering::Relaxed);
                            inc(&self.stats.frames_dropped);
                        }
                        None => return,
                    },
                    _ = shutdown.changed() => return,
                }
            }
            backoff = (backoff * 2).min(BACKOFF_MAX);
        }
    }

    /// Sends the hello, then whatever is queued. `Ok` when the queue closed.
    async fn write_loop(
        &self,
        w: &mut BufWriter<tokio::net::tcp::OwnedWriteHalf>,
        rx: &mut mpsc::UnboundedReceiver<Bytes>,
    ) -> std::io::Result<()> {
        w.write_all(&self.hello).await?;
        w.flush().await?;
        while let Some(b) = rx.recv().await {
            self.queued.fetch_sub(b.len(), Ordering::Relaxed);
            w.write_all(&b).await?;
            while let Ok(b) = rx.try_recv() {
                self.queued.fetch_sub(b.len(), Ordering::Relaxed);
                w.write_all(&b).await?;
            }
            w.flush().await?;
        }
        Ok(())
    }

    /// Reads executor envelopes until the connection fails.
    async fn read_loop(&self, mut rd: tokio::net::tcp::OwnedReadHalf) {
        let decoder = FrameDecoder::new(DEFAULT_MAX_FRAME);
        let mut buf = BytesMut::with_capacity(READ_CHUNK);
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
                        tracing::warn!(host = %self.name, error = %e, "oversized frame from host agent; reconnecting");
                        inc(&self.stats.frames_malformed);
                        return;
                    }
                };
                inc(&self.stats.frames_in);
                let env = match codec::decode::<Frame>(&body) {
                    Ok(Frame::Exec(env)) => env,
                    Ok(_) => {
                        inc(&self.stats.frames_malformed);
                        continue;
                    }
                    Err(e) => {
                        tracing::debug!(host = %self.name, error = %e, "malformed frame");
                        inc(&self.stats.frames_malformed);
                        continue;
                    }
                };
                let ExecRoute::ToAgreement { from, to } = env.route else {
                    inc(&self.stats.frames_unauthenticated);
                    continue;
                };
                let route = match self.routes.get(&from) {
                    Some(r) if r.host == self.host && to == self.me => r,
                    _ => {
                        tracing::debug!(host = %self.name, %from, to, "envelope from an executor not on this host or for another replica");
                        inc(&self.stats.frames_unauthenticated);
                        continue;
                    }
                };
                match env.open(&route.mac) {
                    Ok(msg) => {
                        if self.input.send(from, msg).await.is_err() {
                            return;
                        }
                    }
                    Err(e) => {
                        tracing::debug!(host = %self.name, %from, error = %e, "bad executor envelope");
                        inc(&self.stats.frames_unauthenticated);
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hello_binds_replica_and_host() {
        let keys: Vec<KeyPair> = (0..4u8).map(|i| KeyPair::from_seed([i + 1; 32])).collect();
        let pubs: Vec<_> = keys.iter().map(|k| k.public()).collect();
        let frame = Hello::frame(2, "h0", &keys[2]);
        let body = &frame[4..];
        assert_eq!(Hello::check(body, "h0", &pubs), Some(2));
        assert_eq!(Hello::check(body, "h1", &pubs), None);
        let forged = Hello::frame(2, "h0", &keys[3]);
        assert_eq!(Hello::check(&forged[4..], "h0", &pubs), None);
        assert_eq!(Hello::check(b"junk", "h0", &pubs), None);
    }
}
