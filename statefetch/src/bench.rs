//! `zzctl bench statefetch`: checkpoint cost, verified fetch throughput and
//! time to first read, each reported as one machine-readable line.
//!
//! [`run`] builds a local state of `state_mib` MiB in a temporary sled store
//! and starts a peer *process* ([`PeerCommand`], which must end up calling
//! [`serve_main`]) that builds the same base state, changes some pages,
//! checkpoints and serves it over loopback TCP. Then:
//!
//! - `checkpoint`: `dirty_pages` random pages are written and
//!   [`PageStore::checkpoint`] is timed (median of 9 rounds after 2 warm-up
//!   rounds, once the setup's disk writeback has drained);
//! - `fetch`: every page of the peer's checkpoint is fetched over loopback.
//!   *verified*: leaf hashes fetched and verified against the root, then each
//!   page checked against its leaf; *raw*: the same page requests over the
//!   same kind of connection, bytes not checked. Best of two runs each;
//! - `first_read`: a [`RecoveryView`] is opened on the (stale) local store
//!   with the peer as source, and the time until the first read of a
//!   missing page returns is measured (median of 25, fresh client each).

use crate::net::{ClientConfig, Endpoint, FetchClient, FetchServer, ServerConfig};
use crate::proto::{self, FetchError, Request, Response};
use crate::recovery::{Certificate, RecoveryConfig, RecoveryError, RecoveryView};
use crate::source::PageSource;
use crate::store::{PageStore, StoreConfig, StoreError};
use crate::PAGE_SIZE;
use std::collections::HashSet;
use std::ffi::OsString;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::task::JoinSet;
use zz_wire::Digest;

/// The checkpoint sequence number the peer serves.
const PEER_SEQ: u64 = 1000;
const SEED: u64 = 0x5eed_2011;
/// Pages per request in the fetch benchmark (1 MiB).
const FETCH_BATCH: usize = 256;
/// Requests in flight in the fetch benchmark.
const FETCH_CONCURRENCY: usize = 4;
const WARMUP_ROUNDS: u64 = 2;
const TIMED_ROUNDS: u64 = 9;
const FIRST_READ_TRIALS: usize = 25;

/// Errors of the benchmark.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Fetch(#[from] FetchError),
    #[error(transparent)]
    Recovery(#[from] RecoveryError),
    #[error("i/o error: {0}")]
    Io(#[from] std::io::Error),
    #[error("peer process: {0}")]
    Peer(String),
    #[error("usage: {0}")]
    Usage(String),
    #[error("benchmark check failed: {0}")]
    Check(String),
}

/// How to start the serving peer process: `program args_prefix... --state-mib N ...`.
/// zzctl passes its own executable and its hidden `__statefetch-serve` subcommand.
#[derive(Clone, Debug)]
pub struct PeerCommand {
    pub program: PathBuf,
    pub args_prefix: Vec<OsString>,
}

impl PeerCommand {
    pub fn new(program: impl Into<PathBuf>, args_prefix: &[&str]) -> Self {
        PeerCommand {
            program: program.into(),
            args_prefix: args_prefix.iter().map(OsString::from).collect(),
        }
    }

    /// This executable with the given leading arguments.
    pub fn current_exe(args_prefix: &[&str]) -> std::io::Result<Self> {
        Ok(Self::new(std::env::current_exe()?, args_prefix))
    }
}

/// splitmix64: a tiny deterministic generator for benchmark contents.
struct SplitMix(u64);

impl SplitMix {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
}

/// Deterministic contents of page `index` at `version`.
pub fn page_contents(seed: u64, index: u64, version: u64) -> Vec<u8> {
    let mut r =
        SplitMix(seed ^ index.wrapping_mul(0xA24B_AED4_963E_E407) ^ version.rotate_left(40));
    let mut page = vec![0u8; PAGE_SIZE];
    for c in page.chunks_exact_mut(8) {
        c.copy_from_slice(&r.next().to_le_bytes());
    }
    page
}

/// `k` distinct page indices below `n`, sorted, determined by `seed`.
pub fn distinct_indices(seed: u64, n: u64, k: u64) -> Vec<u64> {
    let k = k.min(n);
    let mut r = SplitMix(seed);
    let mut set = HashSet::with_capacity(k as usize);
    while (set.len() as u64) < k {
        set.insert(r.next() % n);
    }
    let mut v: Vec<u64> = set.into_iter().collect();
    v.sort_unstable();
    v
}

/// Pages the peer changes after building the common base state.
fn peer_changed(n: u64) -> Vec<u64> {
    distinct_indices(SEED ^ 0xC4A1, n, (n / 64).clamp(8, 4096))
}

/// Writes pages `0..n` at version 0, in large batches.
fn build_base(store: &PageStore, n: u64) -> Result<(), StoreError> {
    const BATCH: u64 = 1024;
    let mut start = 0;
    while start < n {
        let end = (start + BATCH).min(n);
        let pages: Vec<Vec<u8>> = (start..end).map(|i| page_contents(SEED, i, 0)).collect();
        store.write_pages((start..end).zip(pages.iter().map(|p| p.as_slice())))?;
        start = end;
    }
    Ok(())
}

/// The executor's store configuration, but 3 checkpoints. The sled cache
/// stays at the default (256 MiB) even for a 1 GiB state: with a cache as
/// large as the state, sled left 9-16 MiB to write at a checkpoint's flush in
/// 3 of 4 runs (checkpoint 25-48 ms), against 1.6-4.8 MiB and 3.8-13.6 ms
/// with the default, in the same interleaved runs.
fn bench_store_config() -> StoreConfig {
    StoreConfig {
        max_checkpoints: 3,
        ..StoreConfig::default()
    }
}

/// A temporary directory removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> std::io::Result<TempDir> {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let p = std::env::temp_dir().join(format!(
            "zz-statefetch-{tag}-{}-{nanos}",
            std::process::id()
        ));
        std::fs::create_dir_all(&p)?;
        Ok(TempDir(p))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The peer child; closing its stdin tells it to exit.
struct PeerChild(Child);

impl Drop for PeerChild {
    fn drop(&mut self) {
        drop(self.0.stdin.take());
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.0.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Bytes this process has caused to be written to storage so far
/// (`write_bytes` of `/proc/self/io`), where the kernel reports it.
fn disk_bytes_written() -> Option<u64> {
    let io = std::fs::read_to_string("/proc/self/io").ok()?;
    io.lines()
        .find_map(|l| l.strip_prefix("write_bytes:"))
        .and_then(|v| v.trim().parse().ok())
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// Runs the three benchmarks; returns exactly four lines:
///
/// ```text
/// bench=checkpoint_parts state_mib=N tree_ms=.. apply_ms=.. flush_ms=.. compact_ms=.. written_kib=..
/// bench=checkpoint state_mib=N dirty_pages=D checkpoint_ms=X
/// bench=fetch state_mib=N verified_mib_per_s=Y raw_mib_per_s=Z
/// bench=first_read state_mib=N first_read_ms=T
/// ```
///
/// Blocking; safe to call from inside or outside a tokio runtime (it uses
/// its own runtime on its own thread).
pub fn run(
    state_mib: u64,
    dirty_pages: u64,
    peer: &PeerCommand,
) -> Result<Vec<String>, BenchError> {
    if state_mib == 0 || dirty_pages == 0 {
        return Err(BenchError::Usage(
            "state_mib and dirty_pages must be positive".into(),
        ));
    }
    let peer = peer.clone();
    std::thread::spawn(move || run_inner(state_mib, dirty_pages, &peer))
        .join()
        .map_err(|_| BenchError::Check("benchmark thread panicked".into()))?
}

struct Ready {
    endpoint: Endpoint,
    info: proto::CheckpointInfo,
}

fn parse_ready(line: &str) -> Result<Ready, BenchError> {
    let mut endpoint = None;
    let (mut seq, mut root, mut n) = (None, None, None);
    for field in line.split_whitespace().skip(1) {
        let Some((k, v)) = field.split_once('=') else {
            continue;
        };
        match k {
            "endpoint" => endpoint = v.parse::<Endpoint>().ok(),
            "seq" => seq = v.parse().ok(),
            "num_pages" => n = v.parse().ok(),
            "root" => {
                root = hex::decode(v)
                    .ok()
                    .and_then(|b| <[u8; 32]>::try_from(b).ok())
                    .map(Digest)
            }
            _ => {}
        }
    }
    match (endpoint, seq, root, n) {
        (Some(endpoint), Some(seq), Some(root), Some(num_pages)) => Ok(Ready {
            endpoint,
            info: proto::CheckpointInfo {
                seq,
                root,
                num_pages,
            },
        }),
        _ => Err(BenchError::Peer(format!("bad READY line: {line:?}"))),
    }
}

fn run_inner(
    state_mib: u64,
    dirty_pages: u64,
    peer: &PeerCommand,
) -> Result<Vec<String>, BenchError> {
    let n = state_mib * (1 << 20) / PAGE_SIZE as u64;
    let dirty_pages = dirty_pages.min(n);

    // Start the peer first: it builds its state while we build ours.
    let mut child = Command::new(&peer.program)
        .args(&peer.args_prefix)
        .arg("--state-mib")
        .arg(state_mib.to_string())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .map_err(|e| BenchError::Peer(format!("cannot start {}: {e}", peer.program.display())))?;
    let stdout = child
        .stdout
        .take()
        .ok_or_else(|| BenchError::Peer("no stdout".into()))?;
    let child = PeerChild(child);

    let dir = TempDir::new("bench")?;
    let store = PageStore::open(dir.0.join("local"), bench_store_config())?;
    build_base(&store, n)?;
    store.checkpoint(1)?;

    let mut line = String::new();
    BufReader::new(stdout).read_line(&mut line)?;
    let ready = parse_ready(line.trim())?;
    if ready.info.num_pages != n {
        return Err(BenchError::Peer("peer state size differs".into()));
    }

    // Let the bulk load's writeback drain first (both stores together are
    // twice the state): we measure checkpoints, not the kernel flushing
    // gigabytes of setup data behind them.
    store.flush()?;
    let _ = Command::new("sync").status();

    // Checkpoint cost with `dirty_pages` dirty pages.
    let mut times = Vec::new();
    let mut parts: Vec<(crate::CheckpointTiming, Option<u64>)> = Vec::new();
    for round in 0..(WARMUP_ROUNDS + TIMED_ROUNDS) {
        let idx = distinct_indices(SEED ^ ((round + 1) * 7919), n, dirty_pages);
        let pages: Vec<Vec<u8>> = idx
            .iter()
            .map(|&i| page_contents(SEED, i, 100 + round))
            .collect();
        store.write_pages(idx.iter().copied().zip(pages.iter().map(|p| p.as_slice())))?;
        let written = disk_bytes_written();
        let t = Instant::now();
        store.checkpoint(2 + round)?;
        if round >= WARMUP_ROUNDS {
            times.push(t.elapsed().as_secs_f64() * 1000.0);
            let written = written.zip(disk_bytes_written()).map(|(a, b)| b - a);
            parts.push((store.last_checkpoint_timing(), written));
        }
    }
    let checkpoint_ms = median(times);
    let part_ms = |f: fn(&crate::CheckpointTiming) -> u64| {
        median(parts.iter().map(|(t, _)| f(t) as f64 / 1000.0).collect())
    };
    let written_kib = parts
        .iter()
        .map(|(_, w)| w.map(|b| b as f64 / 1024.0))
        .collect::<Option<Vec<f64>>>()
        .map_or_else(|| "unknown".to_string(), |v| format!("{:.0}", median(v)));
    let parts_line = format!(
        "bench=checkpoint_parts state_mib={state_mib} tree_ms={:.2} apply_ms={:.2} flush_ms={:.2} compact_ms={:.2} written_kib={written_kib}",
        part_ms(|t| t.tree_us),
        part_ms(|t| t.apply_us),
        part_ms(|t| t.flush_us),
        part_ms(|t| t.compact_us),
    );

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let (verified, raw, first_read_ms) = rt.block_on(async {
        // Best (shortest) of two runs each, alternating.
        let mut verified = f64::INFINITY;
        let mut raw = f64::INFINITY;
        for _ in 0..2 {
            raw = raw.min(fetch_all(&ready, false).await?);
            verified = verified.min(fetch_all(&ready, true).await?);
        }
        let first = first_reads(&store, &ready).await?;
        Ok::<_, BenchError>((verified, raw, first))
    })?;
    drop(child);
    let mib = state_mib as f64;
    Ok(vec![
        parts_line,
        format!(
            "bench=checkpoint state_mib={state_mib} dirty_pages={dirty_pages} checkpoint_ms={checkpoint_ms:.2}"
        ),
        format!(
            "bench=fetch state_mib={state_mib} verified_mib_per_s={:.1} raw_mib_per_s={:.1}",
            mib / verified,
            mib / raw
        ),
        format!("bench=first_read state_mib={state_mib} first_read_ms={first_read_ms:.3}"),
    ])
}

/// Fetches every page of the peer's checkpoint; returns the seconds taken.
async fn fetch_all(ready: &Ready, verify: bool) -> Result<f64, BenchError> {
    let client = Arc::new(FetchClient::new(
        ready.endpoint.clone(),
        ClientConfig::default(),
    ));
    let proto::CheckpointInfo {
        seq,
        root,
        num_pages: n,
    } = ready.info;
    let t = Instant::now();
    let leaves: Arc<Vec<Digest>> = if verify {
        let mut tasks = JoinSet::new();
        let step = 1u64 << 16;
        for start in (0..n).step_by(step as usize) {
            let count = (n - start).min(step) as u32;
            let client = client.clone();
            tasks.spawn(async move {
                let resp = client
                    .request(&Request::Nodes {
                        seq,
                        root,
                        level: 0,
                        start,
                        count,
                    })
                    .await?;
                let range = proto::check_nodes(seq, root, Some(n), (0, start, count), resp)?;
                Ok::<_, FetchError>((start, range.nodes))
            });
        }
        let mut leaves = vec![Digest::ZERO; n as usize];
        while let Some(r) = tasks.join_next().await {
            let (start, nodes) = r.map_err(|e| BenchError::Check(e.to_string()))??;
            leaves[start as usize..start as usize + nodes.len()].copy_from_slice(&nodes);
        }
        Arc::new(leaves)
    } else {
        Arc::new(Vec::new())
    };
    let mut tasks = JoinSet::new();
    let mut next = 0u64;
    let mut bytes = 0u64;
    loop {
        while tasks.len() < FETCH_CONCURRENCY && next < n {
            let indices: Vec<u64> = (next..(next + FETCH_BATCH as u64).min(n)).collect();
            next += indices.len() as u64;
            let (client, leaves) = (client.clone(), leaves.clone());
            tasks.spawn(async move {
                let resp = client
                    .request(&Request::Pages {
                        seq,
                        root,
                        indices: indices.clone(),
                        proofs: false,
                    })
                    .await?;
                if verify {
                    let reply = proto::check_pages(seq, root, Some(n), &indices, resp)?;
                    let want: Vec<Digest> = indices.iter().map(|&i| leaves[i as usize]).collect();
                    proto::verify_with_leaves(&reply, &want)?;
                    Ok::<u64, FetchError>(reply.pages.len() as u64 * PAGE_SIZE as u64)
                } else {
                    match resp {
                        Response::Pages(r) => Ok(r.pages.iter().map(|p| p.data.len() as u64).sum()),
                        _ => Err(FetchError::UnexpectedResponse),
                    }
                }
            });
        }
        match tasks.join_next().await {
            Some(r) => bytes += r.map_err(|e| BenchError::Check(e.to_string()))??,
            None => break,
        }
    }
    let secs = t.elapsed().as_secs_f64();
    if bytes != n * PAGE_SIZE as u64 {
        return Err(BenchError::Check(format!(
            "fetched {bytes} bytes of {}",
            n * PAGE_SIZE as u64
        )));
    }
    Ok(secs)
}

/// Median time from opening a recovery view on the stale local store to the
/// first read of a missing page returning, in milliseconds.
async fn first_reads(store: &PageStore, ready: &Ready) -> Result<f64, BenchError> {
    let changed = peer_changed(ready.info.num_pages);
    let cert = Certificate {
        seq: ready.info.seq,
        root: ready.info.root,
    };
    let mut times = Vec::new();
    for trial in 0..FIRST_READ_TRIALS {
        let page = changed[(trial * changed.len() / FIRST_READ_TRIALS).min(changed.len() - 1)];
        let client: Arc<dyn PageSource> = Arc::new(FetchClient::new(
            ready.endpoint.clone(),
            ClientConfig::default(),
        ));
        let t = Instant::now();
        let view = RecoveryView::open(store.clone(), cert, vec![client], RecoveryConfig::default())
            .await?;
        let data = view.read(page).await?;
        times.push(t.elapsed().as_secs_f64() * 1000.0);
        drop(view);
        if data != page_contents(SEED, page, 1) {
            return Err(BenchError::Check(format!("page {page} has wrong contents")));
        }
    }
    Ok(median(times))
}

/// The peer process: `[--state-mib N] [--dir PATH] [--unix]`.
///
/// Builds the base state of N MiB, changes some pages, takes checkpoint
/// 1000, serves it, prints one line
/// `READY endpoint=... seq=... root=HEX num_pages=...` on stdout, and exits
/// when its stdin closes. Blocking; uses its own runtime thread.
pub fn serve_main<I: IntoIterator<Item = String>>(args: I) -> Result<(), BenchError> {
    let mut state_mib = 16u64;
    let mut dir: Option<PathBuf> = None;
    let mut unix = false;
    let mut args = args.into_iter();
    while let Some(a) = args.next() {
        match a.as_str() {
            "--state-mib" => {
                state_mib = args
                    .next()
                    .and_then(|v| v.parse().ok())
                    .ok_or_else(|| BenchError::Usage("--state-mib N".into()))?;
            }
            "--dir" => {
                dir = Some(
                    args.next()
                        .ok_or_else(|| BenchError::Usage("--dir PATH".into()))?
                        .into(),
                )
            }
            "--unix" => unix = true,
            other => return Err(BenchError::Usage(format!("unknown argument {other:?}"))),
        }
    }
    std::thread::spawn(move || serve_inner(state_mib, dir, unix))
        .join()
        .map_err(|_| BenchError::Check("peer thread panicked".into()))?
}

fn serve_inner(state_mib: u64, dir: Option<PathBuf>, unix: bool) -> Result<(), BenchError> {
    let n = state_mib * (1 << 20) / PAGE_SIZE as u64;
    let tmp = match dir {
        Some(_) => None,
        None => Some(TempDir::new("peer")?),
    };
    let base: &Path = dir
        .as_deref()
        .unwrap_or_else(|| &tmp.as_ref().expect("temp dir").0);
    let store = PageStore::open(base.join("peer"), bench_store_config())?;
    if store.checkpoint_info(PEER_SEQ).is_err() {
        build_base(&store, n)?;
        let changed = peer_changed(n);
        let pages: Vec<Vec<u8>> = changed.iter().map(|&i| page_contents(SEED, i, 1)).collect();
        store.write_pages(
            changed
                .iter()
                .copied()
                .zip(pages.iter().map(|p| p.as_slice())),
        )?;
        store.checkpoint(PEER_SEQ)?;
    }
    let info = store.checkpoint_info(PEER_SEQ)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(async {
        let endpoint = if unix {
            Endpoint::Unix(base.join("peer.sock"))
        } else {
            Endpoint::Tcp(([127, 0, 0, 1], 0).into())
        };
        let server = FetchServer::bind(store, &endpoint, ServerConfig::default()).await?;
        println!(
            "READY endpoint={} seq={} root={} num_pages={}",
            server.endpoint(),
            info.seq,
            info.root,
            info.num_pages
        );
        use std::io::Write;
        std::io::stdout().flush()?;
        // Serve until the parent closes our stdin.
        tokio::task::spawn_blocking(|| {
            let mut sink = Vec::new();
            let _ = std::io::stdin().read_to_end(&mut sink);
        })
        .await
        .map_err(|e| BenchError::Peer(e.to_string()))?;
        drop(server);
        Ok::<(), BenchError>(())
    })?;
    drop(rt);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_line_round_trip() {
        let line = format!(
            "READY endpoint=tcp:127.0.0.1:9 seq=3 root={} num_pages=7",
            Digest::of(b"x")
        );
        let r = parse_ready(&line).unwrap();
        assert_eq!(r.info.seq, 3);
        assert_eq!(r.info.root, Digest::of(b"x"));
        assert_eq!(r.info.num_pages, 7);
        assert!(parse_ready("READY seq=1").is_err());
    }

    #[test]
    fn contents_and_indices_are_deterministic() {
        assert_eq!(page_contents(1, 2, 3), page_contents(1, 2, 3));
        assert_ne!(page_contents(1, 2, 3), page_contents(1, 2, 4));
        let v = distinct_indices(9, 100, 40);
        assert_eq!(v.len(), 40);
        assert!(v.windows(2).all(|w| w[0] < w[1]));
        assert_eq!(distinct_indices(9, 10, 40).len(), 10);
    }
}
