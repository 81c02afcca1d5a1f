//! The fetch server and client: [`crate::proto`] messages in `zz-wire`
//! frames over TCP or a unix socket (tokio).
//!
//! One request at a time per connection, answered in order; a client gets
//! concurrency from several connections (it keeps a small pool). The server
//! checks the frame length before buffering a body, decodes with the
//! `zz-wire` size limit, and closes a connection on any malformed input
//! (counted in [`ServerStats`]). Nothing a peer sends can make either side
//! panic; every failure is a typed [`FetchError`].

use crate::proto::{self, FetchError, Limits, Request, Response};
use crate::source::{PageSource, SourceFuture};
use crate::store::PageStore;
use bytes::{Bytes, BytesMut};
use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use zz_wire::frame::{FrameDecoder, DEFAULT_MAX_FRAME};

/// Where a fetch server listens.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Endpoint {
    Tcp(SocketAddr),
    Unix(PathBuf),
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Endpoint::Tcp(a) => write!(f, "tcp:{a}"),
            Endpoint::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

/// Error parsing an [`Endpoint`] (`tcp:HOST:PORT` or `unix:PATH`).
#[derive(Debug, thiserror::Error)]
#[error("bad endpoint {0:?}: expected tcp:ADDR:PORT or unix:PATH")]
pub struct EndpointParseError(String);

impl FromStr for Endpoint {
    type Err = EndpointParseError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if let Some(a) = s.strip_prefix("tcp:") {
            a.parse()
                .map(Endpoint::Tcp)
                .map_err(|_| EndpointParseError(s.into()))
        } else if let Some(p) = s.strip_prefix("unix:") {
            Ok(Endpoint::Unix(PathBuf::from(p)))
        } else {
            Err(EndpointParseError(s.into()))
        }
    }
}

trait Stream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Stream for T {}

/// Reads one frame body; `Ok(None)` on a clean close between frames.
async fn read_frame(
    stream: &mut (impl AsyncRead + Unpin + ?Sized),
    buf: &mut BytesMut,
    decoder: &FrameDecoder,
) -> Result<Option<Bytes>, FetchError> {
    loop {
        if let Some(body) = decoder.decode(buf)? {
            return Ok(Some(body));
        }
        if buf.capacity() - buf.len() < 4096 {
            buf.reserve(64 * 1024);
        }
        if stream.read_buf(buf).await? == 0 {
            return if buf.is_empty() {
                Ok(None)
            } else {
                Err(FetchError::Truncated)
            };
        }
    }
}

async fn write_message<T: serde::Serialize>(
    stream: &mut (impl AsyncWrite + Unpin + ?Sized),
    msg: &T,
) -> std::io::Result<()> {
    let body = zz_wire::codec::encode(msg);
    stream.write_all(&zz_wire::frame::frame(&body)).await?;
    stream.flush().await
}

/// Server tuning.
#[derive(Clone, Debug)]
pub struct ServerConfig {
    pub limits: Limits,
    /// Largest request frame accepted.
    pub max_request: usize,
    pub max_connections: usize,
    /// A connection idle this long is closed.
    pub idle_timeout: Duration,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            limits: Limits::default(),
            max_request: 64 * 1024,
            max_connections: 256,
            idle_timeout: Duration::from_secs(60),
        }
    }
}

/// Counters of a running server.
#[derive(Debug, Default)]
pub struct ServerStats {
    pub connections: AtomicU64,
    pub requests: AtomicU64,
    /// Connections closed for malformed, oversized or truncated input.
    pub rejected: AtomicU64,
}

enum Listener {
    Tcp(TcpListener),
    Unix(UnixListener),
}

/// A running fetch server; stops when dropped.
pub struct FetchServer {
    endpoint: Endpoint,
    stats: Arc<ServerStats>,
    task: tokio::task::JoinHandle<()>,
}

impl FetchServer {
    /// Binds `endpoint` (TCP port 0 picks a free port) and serves `store`'s
    /// retained checkpoints. Must be called inside a tokio runtime.
    pub async fn bind(
        store: PageStore,
        endpoint: &Endpoint,
        config: ServerConfig,
    ) -> std::io::Result<FetchServer> {
        let (listener, endpoint) = match endpoint {
            Endpoint::Tcp(a) => {
                let l = TcpListener::bind(a).await?;
                let a = l.local_addr()?;
                (Listener::Tcp(l), Endpoint::Tcp(a))
            }
            Endpoint::Unix(p) => {
                // A stale socket file from a dead server would block bind.
                let _ = std::fs::remove_file(p);
                (
                    Listener::Unix(UnixListener::bind(p)?),
                    Endpoint::Unix(p.clone()),
                )
            }
        };
        let stats = Arc::new(ServerStats::default());
        let task = tokio::spawn(accept_loop(
            listener,
            store,
            Arc::new(config),
            stats.clone(),
        ));
        Ok(FetchServer {
            endpoint,
            stats,
            task,
        })
    }

    /// The bound address.
    pub fn endpoint(&self) -> &Endpoint {
        &self.endpoint
    }

    pub fn stats(&self) -> &ServerStats {
        &self.stats
    }

    /// Stops accepting and closes every connection.
    pub fn shutdown(self) {}
}

impl Drop for FetchServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn accept_loop(
    listener: Listener,
    store: PageStore,
    config: Arc<ServerConfig>,
    stats: Arc<ServerStats>,
) {
    // Connections live in this set, so aborting the accept task aborts them.
    let mut conns = JoinSet::new();
    let permits = Arc::new(Semaphore::new(config.max_connections.max(1)));
    loop {
        while conns.try_join_next().is_some() {}
        let Ok(permit) = permits.clone().acquire_owned().await else {
            return;
        };
        let stream: Box<dyn Stream> = match &listener {
            Listener::Tcp(l) => match l.accept().await {
                Ok((s, _)) => {
                    let _ = s.set_nodelay(true);
                    Box::new(s)
                }
                Err(e) => {
                    tracing::warn!("statefetch accept: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            Listener::Unix(l) => match l.accept().await {
                Ok((s, _)) => Box::new(s),
                Err(e) => {
                    tracing::warn!("statefetch accept: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        stats.connections.fetch_add(1, Ordering::Relaxed);
        let (store, config, stats) = (store.clone(), config.clone(), stats.clone());
        conns.spawn(async move {
            serve_connection(stream, store, config, stats).await;
            drop(permit);
        });
    }
}

async fn serve_connection(
    mut stream: Box<dyn Stream>,
    store: PageStore,
    config: Arc<ServerConfig>,
    stats: Arc<ServerStats>,
) {
    let decoder = FrameDecoder::new(config.max_request);
    let mut buf = BytesMut::with_capacity(8 * 1024);
    loop {
        let body = match tokio::time::timeout(
            config.idle_timeout,
            read_frame(&mut stream, &mut buf, &decoder),
        )
        .await
        {
            Ok(Ok(Some(body))) => body,
            Ok(Ok(None)) | Err(_) => return,
            Ok(Err(e)) => {
                stats.rejected.fetch_add(1, Ordering::Relaxed);
                tracing::debug!("statefetch: dropping connection: {e}");
                return;
            }
        };
        let request: Request = match zz_wire::codec::decode(&body) {
            Ok(r) => r,
            Err(e) => {
                stats.rejected.fetch_add(1, Ordering::Relaxed);
                tracing::debug!("statefetch: malformed request: {e}");
                return;
            }
        };
        stats.requests.fetch_add(1, Ordering::Relaxed);
        let (s, cfg) = (store.clone(), config.clone());
        // sled reads may touch the disk: keep them off the async workers.
        let response = match tokio::task::spawn_blocking(move || {
            proto::handle(&s, &cfg.limits, request)
        })
        .await
        {
            Ok(r) => r,
            Err(_) => return,
        };
        if write_message(&mut stream, &response).await.is_err() {
            return;
        }
    }
}

/// Client tuning.
#[derive(Clone, Debug)]
pub struct ClientConfig {
    /// Deadline for one request, connecting included.
    pub timeout: Duration,
    /// Largest response frame accepted.
    pub max_response: usize,
    /// Idle connections kept for reuse.
    pub max_idle: usize,
}

impl Default for ClientConfig {
    fn default() -> Self {
        ClientConfig {
            timeout: Duration::from_secs(10),
            max_response: DEFAULT_MAX_FRAME,
            max_idle: 16,
        }
    }
}

struct Conn {
    stream: Box<dyn Stream>,
    buf: BytesMut,
}

/// A fetch client for one server. Concurrent requests use separate
/// connections, so a small urgent request never queues behind a large one.
pub struct FetchClient {
    endpoint: Endpoint,
    config: ClientConfig,
    idle: Mutex<Vec<Conn>>,
}

impl fmt::Debug for FetchClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FetchClient")
            .field("endpoint", &self.endpoint)
            .finish_non_exhaustive()
    }
}

impl FetchClient {
    /// A client; connections are opened on demand.
    pub fn new(endpoint: Endpoint, config: ClientConfig) -> Self {
        FetchClient {
            endpoint,
            config,
            idle: Mutex::new(Vec::new()),
        }
    }

    pub fn endpoint(&self) -> &Endpoint {
        &self.endpoint
    }

    async fn connect(&self) -> Result<Conn, FetchError> {
        let stream: Box<dyn Stream> = match &self.endpoint {
            Endpoint::Tcp(a) => {
                let s = TcpStream::connect(a).await?;
                s.set_nodelay(true)?;
                Box::new(s)
            }
            Endpoint::Unix(p) => Box::new(UnixStream::connect(p).await?),
        };
        Ok(Conn {
            stream,
            buf: BytesMut::with_capacity(64 * 1024),
        })
    }

    async fn round_trip(&self, conn: &mut Conn, request: &Request) -> Result<Response, FetchError> {
        write_message(&mut conn.stream, request).await?;
        let decoder = FrameDecoder::new(self.config.max_response);
        let body = read_frame(&mut conn.stream, &mut conn.buf, &decoder)
            .await?
            .ok_or(FetchError::Closed)?;
        Ok(zz_wire::codec::decode(&body)?)
    }

    async fn request_inner(&self, request: &Request) -> Result<Response, FetchError> {
        let pooled = self.idle.lock().ok().and_then(|mut v| v.pop());
        let (mut conn, reused) = match pooled {
            Some(c) => (c, true),
            None => (self.connect().await?, false),
        };
        let mut result = self.round_trip(&mut conn, request).await;
        if reused && matches!(result, Err(FetchError::Closed | FetchError::Io(_))) {
            // The server may have closed an idle pooled connection; requests
            // are idempotent reads, so retry once on a fresh one.
            conn = self.connect().await?;
            result = self.round_trip(&mut conn, request).await;
        }
        let response = result?;
        if conn.buf.is_empty() {
            if let Ok(mut idle) = self.idle.lock() {
                if idle.len() < self.config.max_idle {
                    idle.push(conn);
                }
            }
        }
        Ok(response)
    }

    /// Sends one request and returns the (unverified) response.
    pub async fn request(&self, request: &Request) -> Result<Response, FetchError> {
        tokio::time::timeout(self.config.timeout, self.request_inner(request))
            .await
            .map_err(|_| FetchError::Timeout)?
    }

    /// The checkpoints the server retains (unverified claims).
    pub async fn info(&self) -> Result<Vec<proto::CheckpointInfo>, FetchError> {
        match self.request(&Request::Info).await? {
            Response::Info(list) => Ok(list),
            Response::Refused { kind, detail } => Err(FetchError::Refused { kind, detail }),
            _ => Err(FetchError::UnexpectedResponse),
        }
    }
}

impl PageSource for FetchClient {
    fn name(&self) -> String {
        self.endpoint.to_string()
    }

    fn call(&self, request: Request) -> SourceFuture<'_> {
        Box::pin(async move { self.request(&request).await })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoint_parse_round_trip() {
        for s in ["tcp:127.0.0.1:80", "unix:/tmp/x.sock"] {
            assert_eq!(s.parse::<Endpoint>().unwrap().to_string(), s);
        }
        assert!("udp:1".parse::<Endpoint>().is_err());
        assert!("tcp:nope".parse::<Endpoint>().is_err());
    }
}
