//! Links between host agents, so a recovering replica can fetch state from
//! peers placed on other hosts (DESIGN §5).
//!
//! Every host agent keeps one outbound TCP connection to each other host
//! agent of the config (to the address it listens on for agreement
//! replicas), opened at start and re-opened with backoff when it drops. The
//! connection starts with [`Frame::HostPeer`] naming the sender's host, then
//! carries [`Frame::Fetch`] frames one way; answers come back on the other
//! agent's own outbound connection. A fetch frame for an execution replica
//! placed on another host goes to that host's link; the receiving agent
//! delivers it to the target if the target runs there and is connected, and
//! otherwise answers a request with a refusal, as it does for local fetches.
//!
//! The links are not authenticated, and need not be for safety: a recovering
//! replica verifies every page and tree node against the certified root, so a
//! forged frame can at worst make it exclude a source for that recovery
//! (slowing it), never accept a wrong page. Frames are checked against the
//! placement (sender on the announcing host, target on this one) before they
//! are delivered.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncWriteExt, BufWriter};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, watch};
use zz_executor::link::FetchHead;
use zz_wire::codec;
use zz_wire::config::ClusterConfig;
use zz_wire::exec::ExecId;
use zz_wire::frame::write_frame;
use zz_wire::message::Frame;

use crate::relay::Outgoing;

/// Frames queued per peer host before new ones are refused.
const LINK_QUEUE: usize = 4096;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
const BACKOFF_MIN: Duration = Duration::from_millis(50);
const BACKOFF_MAX: Duration = Duration::from_secs(1);

/// One outbound link: its queue and whether it is connected.
struct PeerLink {
    tx: mpsc::Sender<Outgoing>,
    up: Arc<AtomicBool>,
}

/// The placement of every execution replica, and the links to other hosts.
pub struct HostPeers {
    me: String,
    placement: HashMap<ExecId, String>,
    links: HashMap<String, PeerLink>,
}

impl HostPeers {
    /// The placement of `cfg`, without links (for tests and single-host use).
    fn new(cfg: &ClusterConfig, me: &str) -> HostPeers {
        let placement = cfg
            .executors
            .iter()
            .map(|e| {
                (
                    ExecId {
                        app: e.app,
                        index: e.index,
                    },
                    e.host.clone(),
                )
            })
            .collect();
        HostPeers {
            me: me.to_string(),
            placement,
            links: HashMap::new(),
        }
    }

    /// Starts a link to every other host of `cfg`. Must run inside a tokio
    /// runtime; the links end when `shutdown` changes.
    pub fn start(cfg: &ClusterConfig, me: &str, shutdown: watch::Receiver<bool>) -> Arc<HostPeers> {
        let mut peers = HostPeers::new(cfg, me);
        for h in cfg.hosts.iter().filter(|h| h.name != me) {
            let (tx, rx) = mpsc::channel(LINK_QUEUE);
            let up = Arc::new(AtomicBool::new(false));
            tokio::spawn(link_task(
                me.to_string(),
                h.name.clone(),
                h.addr,
                rx,
                up.clone(),
                shutdown.clone(),
            ));
            peers.links.insert(h.name.clone(), PeerLink { tx, up });
        }
        Arc::new(peers)
    }

    /// The host `exec` is placed on.
    pub fn host_of(&self, exec: ExecId) -> Option<&str> {
        self.placement.get(&exec).map(String::as_str)
    }

    /// Whether `exec` is placed on this host (or unknown, so handled here).
    pub fn is_local(&self, exec: ExecId) -> bool {
        self.host_of(exec).is_none_or(|h| h == self.me)
    }

    /// Whether `host` is another host of the config.
    pub fn is_peer(&self, host: &str) -> bool {
        self.links.contains_key(host)
    }

    /// Whether a frame that arrived from `host` may be delivered here: its
    /// sender runs on `host`, its target on this host.
    pub fn accepts_from(&self, host: &str, ff: &FetchHead) -> bool {
        self.host_of(ff.from) == Some(host) && self.host_of(ff.to) == Some(self.me.as_str())
    }

    /// Queues `frame` (a [`Frame::Fetch`], see [`Outgoing::to_host`]) for
    /// the host `to` is placed on. False when that host has no link, its
    /// link is down, or its queue is full: the caller then refuses the
    /// request so the fetcher asks another peer.
    pub fn send(&self, to: ExecId, frame: Outgoing) -> bool {
        let Some(link) = self.host_of(to).and_then(|h| self.links.get(h)) else {
            return false;
        };
        if !link.up.load(Ordering::Relaxed) {
            return false;
        }
        link.tx.try_send(frame).is_ok()
    }
}

/// Keeps the link to `host` connected and writes its queue.
async fn link_task(
    me: String,
    host: String,
    addr: SocketAddr,
    mut rx: mpsc::Receiver<Outgoing>,
    up: Arc<AtomicBool>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut hello = BytesMut::new();
    write_frame(&mut hello, &codec::encode(&Frame::HostPeer { host: me }));
    let mut backoff = BACKOFF_MIN;
    let mut was_up = false;
    loop {
        let connect = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(addr));
        let stream = tokio::select! {
            c = connect => c,
            _ = shutdown.changed() => return,
        };
        let stream = match stream {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                if was_up {
                    tracing::warn!(%host, %addr, error = %e, "cannot reach the host agent; retrying");
                    was_up = false;
                }
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = shutdown.changed() => return,
                }
                backoff = (backoff * 2).min(BACKOFF_MAX);
                continue;
            }
            Err(_) => continue,
        };
        let _ = stream.set_nodelay(true);
        let mut w = BufWriter::new(stream);
        if w.write_all(&hello).await.is_err() || w.flush().await.is_err() {
            continue;
        }
        // Frames queued while the link was down are stale (their fetchers
        // were refused or gave up): drop them.
        while rx.try_recv().is_ok() {}
        up.store(true, Ordering::Relaxed);
        was_up = true;
        backoff = BACKOFF_MIN;
        tracing::info!(%host, %addr, "linked to host agent");
        let ended = loop {
            let frame = tokio::select! {
                f = rx.recv() => f,
                _ = shutdown.changed() => None,
            };
            let Some(frame) = frame else {
                break true;
            };
            if frame.write_to(&mut w).await.is_err() {
                break false;
            }
            // Write what else is queued, then flush once.
            let mut failed = false;
            while let Ok(more) = rx.try_recv() {
                if more.write_to(&mut w).await.is_err() {
                    failed = true;
                    break;
                }
            }
            if failed || w.flush().await.is_err() {
                break false;
            }
        };
        up.store(false, Ordering::Relaxed);
        if ended {
            return;
        }
        tracing::warn!(%host, %addr, "link to host agent lost; reconnecting");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use zz_executor::link::FetchBodyHead;
    use zz_wire::config::{ExecutorEntry, HostEntry};

    fn config() -> ClusterConfig {
        let mut cfg = ClusterConfig {
            f: 1,
            data_dir: "data".into(),
            log_level: None,
            agreement: Default::default(),
            replicas: vec![],
            clients: vec![],
            apps: vec![],
            hosts: vec![],
            executors: vec![],
            execution: Default::default(),
            operator_public_key: None,
            operator_key_file: None,
            base_dir: Default::default(),
        };
        cfg.hosts = ["h0", "h1"]
            .iter()
            .enumerate()
            .map(|(i, n)| HostEntry {
                name: n.to_string(),
                addr: format!("127.0.0.1:{}", 1 + i).parse().unwrap(),
                backend: "process".into(),
                libvirt_uri: None,
                metrics_addr: None,
            })
            .collect();
        cfg.executors = (0..3)
            .map(|index| ExecutorEntry {
                app: 1,
                index,
                host: if index == 2 { "h1" } else { "h0" }.into(),
                public_key: String::new(),
                key_file: "k".into(),
            })
            .collect();
        cfg
    }

    fn frame(from: u32, to: u32) -> FetchHead {
        FetchHead {
            from: ExecId {
                app: 1,
                index: from,
            },
            to: ExecId { app: 1, index: to },
            id: 1,
            body: FetchBodyHead::Request,
        }
    }

    #[test]
    fn frames_are_accepted_only_from_their_senders_host_for_this_host() {
        let p = HostPeers::new(&config(), "h0");
        assert!(p.is_local(ExecId { app: 1, index: 0 }));
        assert!(!p.is_local(ExecId { app: 1, index: 2 }));
        assert!(p.accepts_from("h1", &frame(2, 0)));
        // A sender not on the announcing host, or a target elsewhere.
        assert!(!p.accepts_from("h1", &frame(1, 0)));
        assert!(!p.accepts_from("h1", &frame(2, 2)));
        assert!(!p.accepts_from("h9", &frame(2, 0)));
    }

    #[tokio::test]
    async fn a_frame_for_a_host_whose_link_is_down_is_not_queued() {
        let mut cfg = config();
        // Nothing listens on port 1 of loopback.
        cfg.hosts[1].addr = "127.0.0.1:1".parse().unwrap();
        let (_tx, rx) = watch::channel(false);
        let p = HostPeers::start(&cfg, "h0", rx);
        assert!(p.is_peer("h1") && !p.is_peer("h0"));
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(
            !p.send(
                ExecId { app: 1, index: 2 },
                Outgoing::fetch_to_host(frame(2, 0).unreachable("x").unwrap())
            ),
            "refused at once, so the fetcher moves on"
        );
    }
}
