//! The zz client library.
//!
//! A [`Cluster`] keeps one TCP connection to each agreement replica (and
//! reconnects, with backoff, to replicas that go down). Any number of logical
//! [`Client`]s, each with its own [`ClientId`] and MAC keys, share those
//! connections: replies are routed to the waiting request by
//! `(client, req_id)`.
//!
//! [`Client::invoke`] sends the request, with one MAC per replica, to *all*
//! replicas, and accepts a result once f+1 replies from distinct replicas
//! carry the same `(req_id, result)` and verify under the MAC key the client
//! shares with each of them: at most f replicas are faulty, so at least one
//! correct replica vouches for the result. Without such a quorum in time, the
//! request is retransmitted to all replicas, with the same `req_id` (the
//! replicas de-duplicate it), until the operation timeout.
//!
//! Apps run by execution replicas (those with `[[executors]]` in the config)
//! are answered by the execution replicas: `Reply::replica` is then the
//! execution replica's index, the MAC is made with the key the client shares
//! with that execution replica, and any agreement replica may relay it. For
//! such an app ([`Client::set_executor_keys`], keys from
//! [`executor_mac_keys`]) a result is accepted once f+1 distinct
//! *execution* replicas sent it, whichever connections their replies came on.
//!
//! [`deploy`] writes the config and keys of a local deployment.

pub mod deploy;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufWriter};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};
use zz_wire::codec;
use zz_wire::config::{ClientKeys, ClusterConfig, ConfigError};
use zz_wire::crypto::MacKey;
use zz_wire::frame::{write_frame, FrameDecoder, DEFAULT_MAX_FRAME};
use zz_wire::message::{ClientRequest, Frame, Reply, Request};
use zz_wire::{AppId, ClientId, ReplicaId};

/// Errors of the client library.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("request {req_id} of client {client}: no f+1 matching replies within {after:?}")]
    Timeout {
        client: ClientId,
        req_id: u64,
        after: Duration,
    },
    #[error("the cluster connections were closed")]
    Closed,
    #[error("client {client} has MAC keys for {keys} replicas, but the cluster has {n}")]
    KeyCount {
        client: ClientId,
        keys: usize,
        n: usize,
    },
    #[error("f = {f} needs at least 3f+1 = {} replicas, but {n} addresses were given", 3 * f + 1)]
    TooFewReplicas { f: usize, n: usize },
    #[error(transparent)]
    Config(#[from] ConfigError),
}

/// Timing of a [`Client`].
#[derive(Clone, Debug)]
pub struct ClientOptions {
    /// Wait this long for a quorum of replies before the first retransmission.
    pub retransmit_after: Duration,
    /// Retransmission intervals double up to this.
    pub retransmit_max: Duration,
    /// Give up on an operation after this long.
    pub op_timeout: Duration,
    /// Largest reply frame accepted.
    pub max_frame: usize,
}

impl Default for ClientOptions {
    fn default() -> Self {
        ClientOptions {
            retransmit_after: Duration::from_millis(1000),
            retransmit_max: Duration::from_secs(4),
            op_timeout: Duration::from_secs(60),
            max_frame: DEFAULT_MAX_FRAME,
        }
    }
}

const BACKOFF_MIN: Duration = Duration::from_millis(20);
const BACKOFF_MAX: Duration = Duration::from_millis(1000);
const READ_CHUNK: usize = 64 * 1024;

/// A request waiting for f+1 matching replies.
struct Pending {
    keys: Arc<[MacKey]>,
    /// For an app run by execution replicas: the keys shared with them, by index.
    exec_keys: Option<Arc<[MacKey]>>,
    votes: Vec<(ReplicaId, Vec<u8>)>,
    done: Option<oneshot::Sender<Vec<u8>>>,
}

/// Requests in flight, shared by every logical client and connection.
struct Table {
    quorum: usize,
    pending: Mutex<HashMap<(ClientId, u64), Pending>>,
}

impl Table {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<(ClientId, u64), Pending>> {
        self.pending.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A reply that arrived on the connection to replica `from`.
    fn on_reply(&self, from: ReplicaId, reply: Reply) {
        let key = (reply.client, reply.req_id);
        let mut table = self.lock();
        let Some(p) = table.get_mut(&key) else { return };
        // Who vouches for the result: the agreement replica on whose
        // connection it came, or, for an app run by execution replicas, the
        // execution replica that MAC'd it (any agreement replica relays).
        let (from, mac_key) = match &p.exec_keys {
            Some(keys) => (reply.replica, keys.get(reply.replica as usize).copied()),
            None => {
                if reply.replica != from {
                    tracing::debug!(from, claimed = reply.replica, "reply names another replica");
                    return;
                }
                (from, p.keys.get(from as usize).copied())
            }
        };
        if p.votes.iter().any(|(r, _)| *r == from) {
            return;
        }
        let Some(mac_key) = mac_key else {
            return;
        };
        if !reply.verify(&mac_key) {
            tracing::debug!(from, client = reply.client, "reply with a bad MAC");
            return;
        }
        let matching = 1 + p.votes.iter().filter(|(_, r)| *r == reply.result).count();
        if matching >= self.quorum {
            if let Some(done) = p.done.take() {
                table.remove(&key);
                drop(table);
                let _ = done.send(reply.result);
            }
        } else {
            p.votes.push((from, reply.result));
        }
    }
}

/// The sending side of the link to one replica.
struct Link {
    tx: mpsc::UnboundedSender<Bytes>,
    connected: Arc<AtomicBool>,
}

struct Shared {
    f: usize,
    links: Vec<Link>,
    table: Arc<Table>,
    opts: ClientOptions,
}

impl Shared {
    fn broadcast(&self, frame: &Bytes) -> Result<(), ClientError> {
        let mut open = false;
        for l in &self.links {
            open |= l.tx.send(frame.clone()).is_ok();
        }
        if open {
            Ok(())
        } else {
            Err(ClientError::Closed)
        }
    }
}

/// Connections to every agreement replica, shared by any number of
/// [`Client`]s. Cloning is cheap; the connections close when the last clone
/// and the last client are dropped.
#[derive(Clone)]
pub struct Cluster {
    shared: Arc<Shared>,
}

impl Cluster {
    /// Connects (in the background) to the replicas at `addrs`, replica `i`
    /// at `addrs[i]`. Must be called within a tokio runtime.
    pub fn connect(
        addrs: &[SocketAddr],
        f: usize,
        opts: ClientOptions,
    ) -> Result<Self, ClientError> {
        if addrs.len() < 3 * f + 1 || f == 0 {
            return Err(ClientError::TooFewReplicas { f, n: addrs.len() });
        }
        let table = Arc::new(Table {
            quorum: f + 1,
            pending: Mutex::new(HashMap::new()),
        });
        let links = addrs
            .iter()
            .enumerate()
            .map(|(i, addr)| {
                let (tx, rx) = mpsc::unbounded_channel();
                let connected = Arc::new(AtomicBool::new(false));
                tokio::spawn(link(
                    i as ReplicaId,
                    *addr,
                    rx,
                    table.clone(),
                    connected.clone(),
                    opts.max_frame,
                ));
                Link { tx, connected }
            })
            .collect();
        Ok(Cluster {
            shared: Arc::new(Shared {
                f,
                links,
                table,
                opts,
            }),
        })
    }

    /// Connects to the replicas listed in a cluster config.
    pub fn from_config(cfg: &ClusterConfig, opts: ClientOptions) -> Result<Self, ClientError> {
        let addrs: Vec<SocketAddr> = cfg.replicas.iter().map(|r| r.addr).collect();
        Self::connect(&addrs, cfg.f, opts)
    }

    pub fn f(&self) -> usize {
        self.shared.f
    }

    pub fn n(&self) -> usize {
        self.shared.links.len()
    }

    /// How many replica connections are up right now.
    pub fn connected(&self) -> usize {
        self.shared
            .links
            .iter()
            .filter(|l| l.connected.load(Ordering::Relaxed))
            .count()
    }

    /// Waits until at least `count` replica connections are up.
    pub async fn wait_connected(&self, count: usize, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while self.connected() < count {
            if Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        true
    }

    /// A logical client over these connections.
    pub fn client(&self, keys: ClientKeys) -> Result<Client, ClientError> {
        if keys.replica_mac.len() != self.n() {
            return Err(ClientError::KeyCount {
                client: keys.me,
                keys: keys.replica_mac.len(),
                n: self.n(),
            });
        }
        // Request ids only grow, even across restarts of the client process:
        // replicas ignore a request older than the last one they executed.
        let now_us = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_micros() as u64)
            .unwrap_or(1);
        Ok(Client {
            id: keys.me,
            keys: keys.replica_mac.into(),
            exec_keys: HashMap::new(),
            shared: self.shared.clone(),
            next_req_id: now_us.max(1),
        })
    }
}

/// One logical client: a [`ClientId`] with its MAC keys. It has at most one
/// operation in flight (request ids are used for de-duplication).
pub struct Client {
    id: ClientId,
    keys: Arc<[MacKey]>,
    exec_keys: HashMap<AppId, Arc<[MacKey]>>,
    shared: Arc<Shared>,
    next_req_id: u64,
}

/// Removes a request's table entry however its operation ends.
struct PendingGuard<'a> {
    table: &'a Table,
    key: (ClientId, u64),
}

impl Drop for PendingGuard<'_> {
    fn drop(&mut self) {
        self.table.lock().remove(&self.key);
    }
}

impl Client {
    pub fn id(&self) -> ClientId {
        self.id
    }

    /// Declares `app` as run by execution replicas: its replies are checked
    /// with `keys[i]`, the key this client shares with execution replica i,
    /// and need f+1 distinct execution replicas.
    pub fn set_executor_keys(&mut self, app: AppId, keys: Vec<MacKey>) {
        self.exec_keys.insert(app, keys.into());
    }

    /// Executes `op` on app `app` and returns its result, once f+1 replicas agree on it.
    pub async fn invoke(&mut self, app: AppId, op: Vec<u8>) -> Result<Vec<u8>, ClientError> {
        self.invoke_with(app, op, false).await
    }

    /// As [`Client::invoke`], marking the operation read-only or not.
    pub async fn invoke_with(
        &mut self,
        app: AppId,
        op: Vec<u8>,
        read_only: bool,
    ) -> Result<Vec<u8>, ClientError> {
        let req_id = self.next_req_id;
        self.next_req_id += 1;
        let request = Request {
            client: self.id,
            req_id,
            app,
            op,
            read_only,
        };
        let body = codec::encode(&Frame::Request(ClientRequest::new(request, &self.keys)));
        let mut buf = BytesMut::with_capacity(4 + body.len());
        write_frame(&mut buf, &body);
        let frame = buf.freeze();

        let shared = &*self.shared;
        let (tx, mut rx) = oneshot::channel();
        let key = (self.id, req_id);
        shared.table.lock().insert(
            key,
            Pending {
                keys: self.keys.clone(),
                exec_keys: self.exec_keys.get(&app).cloned(),
                votes: Vec::new(),
                done: Some(tx),
            },
        );
        let _guard = PendingGuard {
            table: &shared.table,
            key,
        };
        shared.broadcast(&frame)?;

        let opts = &shared.opts;
        let start = Instant::now();
        let mut wait = opts.retransmit_after;
        loop {
            let remaining = opts.op_timeout.saturating_sub(start.elapsed());
            if remaining.is_zero() {
                return Err(ClientError::Timeout {
                    client: self.id,
                    req_id,
                    after: opts.op_timeout,
                });
            }
            match tokio::time::timeout(wait.min(remaining), &mut rx).await {
                Ok(Ok(result)) => return Ok(result),
                Ok(Err(_)) => return Err(ClientError::Closed),
                Err(_) => {
                    tracing::debug!(
                        client = self.id,
                        req_id,
                        "no quorum of replies yet; retransmitting"
                    );
                    shared.broadcast(&frame)?;
                    wait = (wait * 2).min(opts.retransmit_max);
                }
            }
        }
    }
}

/// Keeps the connection to replica `idx` up: writes queued requests, routes
/// the replies it reads. Ends when the [`Cluster`] is dropped.
async fn link(
    idx: ReplicaId,
    addr: SocketAddr,
    mut rx: mpsc::UnboundedReceiver<Bytes>,
    table: Arc<Table>,
    connected: Arc<AtomicBool>,
    max_frame: usize,
) {
    let mut backoff = BACKOFF_MIN;
    loop {
        if let Ok(Ok(stream)) =
            tokio::time::timeout(Duration::from_secs(2), TcpStream::connect(addr)).await
        {
            let _ = stream.set_nodelay(true);
            tracing::debug!(replica = idx, %addr, "connected");
            connected.store(true, Ordering::Relaxed);
            backoff = BACKOFF_MIN;
            let (rd, wr) = stream.into_split();
            let closed = tokio::select! {
                r = write_loop(wr, &mut rx) => r.is_ok(),
                _ = read_loop(rd, idx, &table, max_frame) => false,
            };
            connected.store(false, Ordering::Relaxed);
            if closed {
                return;
            }
            tracing::debug!(replica = idx, %addr, "connection lost");
        }
        // Down: requests sent meanwhile are lost; retransmission covers them.
        let deadline = tokio::time::sleep(backoff);
        tokio::pin!(deadline);
        loop {
            tokio::select! {
                _ = &mut deadline => break,
                m = rx.recv() => if m.is_none() { return },
            }
        }
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
}

/// Returns `Ok` when the cluster is dropped, `Err` when the connection fails.
async fn write_loop(
    wr: OwnedWriteHalf,
    rx: &mut mpsc::UnboundedReceiver<Bytes>,
) -> std::io::Result<()> {
    let mut w = BufWriter::with_capacity(64 * 1024, wr);
    while let Some(b) = rx.recv().await {
        w.write_all(&b).await?;
        while let Ok(b) = rx.try_recv() {
            w.write_all(&b).await?;
        }
        w.flush().await?;
    }
    Ok(())
}

async fn read_loop(mut rd: OwnedReadHalf, idx: ReplicaId, table: &Table, max_frame: usize) {
    let decoder = FrameDecoder::new(max_frame);
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
            match decoder.decode(&mut buf) {
                Ok(Some(body)) => match codec::decode::<Frame>(&body) {
                    Ok(Frame::Reply(r)) => table.on_reply(idx, r),
                    Ok(_) => tracing::debug!(replica = idx, "unexpected frame from a replica"),
                    Err(e) => {
                        tracing::debug!(replica = idx, error = %e, "malformed frame from a replica")
                    }
                },
                Ok(None) => break,
                Err(e) => {
                    tracing::warn!(replica = idx, error = %e, "oversized frame; reconnecting");
                    return;
                }
            }
        }
    }
}

/// The MAC keys client `me` shares with the execution replicas of every app
/// the config runs on them (by app, then replica index), from the client's
/// key file; pass each to [`Client::set_executor_keys`].
pub fn executor_mac_keys(
    cfg: &ClusterConfig,
    me: ClientId,
) -> Result<HashMap<AppId, Vec<MacKey>>, ClientError> {
    let entry = cfg
        .clients
        .iter()
        .find(|c| c.id == me)
        .ok_or_else(|| ConfigError::Invalid {
            field: "clients".into(),
            message: format!("no client with id {me}"),
        })?;
    let path = entry
        .key_file
        .as_ref()
        .map(|p| cfg.resolve(p))
        .ok_or_else(|| ConfigError::Invalid {
            field: format!("clients[id={me}].key_file"),
            message: "missing".into(),
        })?;
    let key = zz_wire::config::read_key_file(&path)?;
    let mut out = HashMap::new();
    for app in &cfg.apps {
        let pubs = cfg.executor_public_keys(app.id);
        if !pubs.is_empty() {
            out.insert(app.id, pubs.iter().map(|p| key.shared_mac_key(p)).collect());
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use zz_wire::crypto::KeyPair;

    fn keys(n: usize) -> (Vec<KeyPair>, ClientKeys) {
        let rs: Vec<KeyPair> = (0..n)
            .map(|i| KeyPair::from_seed([i as u8 + 1; 32]))
            .collect();
        let pubs: Vec<_> = rs.iter().map(|k| k.public()).collect();
        let c = KeyPair::from_seed([99; 32]);
        (rs.clone(), ClientKeys::derive(7, &c, &pubs))
    }

    fn reply(rs: &[KeyPair], ck: &ClientKeys, from: usize, req_id: u64, result: &[u8]) -> Reply {
        let _ = rs;
        Reply::new(
            0,
            from as ReplicaId,
            ck.me,
            req_id,
            result.to_vec(),
            &ck.replica_mac[from],
        )
    }

    fn table_with(ck: &ClientKeys, req_id: u64) -> (Table, oneshot::Receiver<Vec<u8>>) {
        let t = Table {
            quorum: 2,
            pending: Mutex::new(HashMap::new()),
        };
        let (tx, rx) = oneshot::channel();
        t.lock().insert(
            (ck.me, req_id),
            Pending {
                keys: ck.replica_mac.clone().into(),
                exec_keys: None,
                votes: vec![],
                done: Some(tx),
            },
        );
        (t, rx)
    }

    #[test]
    fn needs_f_plus_one_matching_replies_from_distinct_replicas() {
        let (rs, ck) = keys(4);
        let (t, mut rx) = table_with(&ck, 5);
        t.on_reply(0, reply(&rs, &ck, 0, 5, b"a"));
        t.on_reply(0, reply(&rs, &ck, 0, 5, b"a")); // same replica twice
        assert!(rx.try_recv().is_err());
        t.on_reply(1, reply(&rs, &ck, 1, 5, b"b")); // disagrees
        assert!(rx.try_recv().is_err());
        t.on_reply(2, reply(&rs, &ck, 2, 5, b"a"));
        assert_eq!(rx.try_recv().unwrap(), b"a");
        assert!(t.lock().is_empty());
    }

    #[test]
    fn forged_or_misrouted_replies_do_not_count() {
        let (rs, ck) = keys(4);
        let (t, mut rx) = table_with(&ck, 5);
        let mut forged = reply(&rs, &ck, 1, 5, b"x");
        forged.mac[0] ^= 1;
        t.on_reply(1, forged);
        // A reply for replica 2 arriving on replica 3's connection.
        t.on_reply(3, reply(&rs, &ck, 2, 5, b"x"));
        t.on_reply(0, reply(&rs, &ck, 0, 5, b"x"));
        assert!(rx.try_recv().is_err());
        // Wrong request id: ignored.
        t.on_reply(1, reply(&rs, &ck, 1, 6, b"x"));
        assert!(rx.try_recv().is_err());
        t.on_reply(1, reply(&rs, &ck, 1, 5, b"x"));
        assert_eq!(rx.try_recv().unwrap(), b"x");
    }

    #[test]
    fn replies_of_execution_replicas_need_f_plus_one_distinct_executors() {
        let (rs, ck) = keys(4);
        let execs: Vec<KeyPair> = (0..3u8).map(|i| KeyPair::from_seed([i + 50; 32])).collect();
        let c = KeyPair::from_seed([99; 32]);
        let exec_keys: Vec<MacKey> = execs
            .iter()
            .map(|e| c.shared_mac_key(&e.public()))
            .collect();
        let _ = rs;
        let (t, mut rx) = table_with(&ck, 5);
        t.lock().get_mut(&(ck.me, 5)).unwrap().exec_keys = Some(exec_keys.clone().into());
        let from_exec = |i: usize, result: &[u8]| {
            Reply::new(0, i as ReplicaId, ck.me, 5, result.to_vec(), &exec_keys[i])
        };
        // Executor 0's reply relayed by two agreement replicas counts once.
        t.on_reply(0, from_exec(0, b"v"));
        t.on_reply(1, from_exec(0, b"v"));
        assert!(rx.try_recv().is_err());
        // A reply MAC'd with the agreement key (not the executor's) does not count.
        t.on_reply(1, reply(&rs, &ck, 1, 5, b"v"));
        assert!(rx.try_recv().is_err());
        // A different result from executor 2 does not complete it either.
        t.on_reply(2, from_exec(2, b"w"));
        assert!(rx.try_recv().is_err());
        // Executor 1, relayed by any agreement replica, makes f+1 = 2.
        t.on_reply(3, from_exec(1, b"v"));
        assert_eq!(rx.try_recv().unwrap(), b"v");
    }
}
