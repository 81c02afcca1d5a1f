//! Recovery by on-demand state fetch (DESIGN §5): a [`RecoveryView`] over
//! the local [`PageStore`] of a woken or rebuilt replica.
//!
//! Given a certified checkpoint `(seq C, root R)` and untrusted
//! [`PageSource`]s:
//!
//! - Opening learns the page count bound by `R` (one verified node) and
//!   returns at once; nothing proportional to the state size is waited for.
//! - In the background, the tree nodes covering chunks of `2^chunk_level`
//!   pages are fetched and verified against `R`, and compared with the local
//!   tree. Only differing chunks get their leaf hashes fetched (verified
//!   against `R`) and compared with the local pages' leaves; a differing
//!   page is **missing**. Missing pages are fetched in batches, each page
//!   checked against its verified leaf, with at most `max_in_flight`
//!   requests outstanding, and written to the local store.
//! - [`RecoveryView::read`] of a page not yet known good fetches that page
//!   with its Merkle proof at once (it does not wait for the comparison),
//!   together with up to `readahead_pages` following pages not yet present
//!   (values spanning pages are read in order), and blocks until it is
//!   verified. A page is never returned unverified. While such a read is
//!   waiting, and for `demand_quiet` after, the background issues at most
//!   one request, so the executor's reads do not queue behind background
//!   batches; the page is handed to the reader before it is written to the
//!   local store, and background batches are written outside the view lock.
//! - A read's fetch not answered within `hedge_after` is also sent to the
//!   next source; the first verified reply wins.
//! - A source whose reply fails verification is reported
//!   ([`RecoveryEvent::SourceFault`]) and excluded, and the request goes to
//!   another source. Transport failures are reported and retried elsewhere
//!   without exclusion.
//!
//! Writes by the executor go through [`RecoveryView::write`], which marks the
//! page as present so a later background fetch does not overwrite it.

use crate::merkle;
use crate::proto::{self, FetchError, Request};
use crate::source::PageSource;
use crate::store::{PageStore, StoreError};
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};
use tokio::sync::{oneshot, watch};
use tokio::task::JoinSet;
use zz_wire::{Digest, Seq};

/// A checkpoint certified by f+1 replicas (signatures checked by the caller).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Certificate {
    pub seq: Seq,
    pub root: Digest,
}

/// Tuning of a [`RecoveryView`].
#[derive(Clone, Debug)]
pub struct RecoveryConfig {
    /// Background requests outstanding at once.
    pub max_in_flight: usize,
    /// Pages per background request.
    pub batch_pages: usize,
    /// Comparison granularity: a chunk covers `2^chunk_level` pages.
    pub chunk_level: u32,
    /// Passes over all sources before a request is given up.
    pub max_rounds: usize,
    /// Pause between passes (multiplied by the pass number).
    pub retry_backoff: Duration,
    /// A read's fetch that has no answer after this long is also sent to
    /// the next source (a hedged request): the first verified reply wins, so
    /// a slow, dying or silent source delays a read by this much, not by the
    /// source's timeout.
    pub hedge_after: Duration,
    /// A read that must fetch its page also fetches up to this many
    /// following pages not yet present, in the same request: values that
    /// span pages are read in order, so one round trip serves the whole read.
    pub readahead_pages: usize,
    /// For this long after a read had to fetch, the background keeps at
    /// most one request in flight, so the executor's next demand read does
    /// not queue behind background batches at the sources.
    pub demand_quiet: Duration,
    /// Pages of a peer's read hint (the pages its state read since the
    /// checkpoint, which the replay will read too) to prefetch, in that
    /// order, before reads ask for them; 0: no prefetch.
    pub prefetch_pages: u32,
    /// Prefetch requests outstanding at once.
    pub prefetch_in_flight: usize,
    /// Pages in the largest prefetch request; the first has
    /// [`PREFETCH_FIRST_BATCH`] (the replay's first read waits for it), each
    /// next one twice as many up to this.
    pub prefetch_batch: usize,
    /// [`Self::hedge_after`] for background requests (larger batches, and
    /// nobody waits on them; but a source lost mid-request, e.g. reimaged,
    /// must not hold the fetch for a whole timeout).
    pub background_hedge_after: Duration,
    /// How long the background keeps asking while no source answers at all
    /// before the recovery fails (a proven-faulty source is excluded at
    /// once; this is for peers that are busy, restarting or unreachable).
    pub give_up_after: Duration,
}

impl Default for RecoveryConfig {
    fn default() -> Self {
        RecoveryConfig {
            max_in_flight: 4,
            batch_pages: 64,
            chunk_level: 10,
            max_rounds: 3,
            retry_backoff: Duration::from_millis(100),
            demand_quiet: Duration::from_millis(50),
            readahead_pages: 15,
            hedge_after: Duration::from_millis(20),
            prefetch_pages: 8192,
            prefetch_in_flight: 2,
            prefetch_batch: 256,
            background_hedge_after: Duration::from_millis(250),
            give_up_after: Duration::from_secs(30),
        }
    }
}

/// Pages the executor may have written through the view before they are
/// written to the store (32 MiB), see [`RecoveryView::write_pages`].
const WRITE_BEHIND_PAGES: usize = 8192;

/// Fetched pages written to the store in one batch. The store holds its
/// lock for a batch; an executor reading a stored page (or the page count)
/// meanwhile waits, and a replay reads thousands. 32 pages keep that wait
/// around a tenth of a millisecond.
const STORE_CHUNK_PAGES: usize = 32;

/// Pages in the first prefetch request.
pub const PREFETCH_FIRST_BATCH: usize = 16;
/// How long one source may take to give its read hint before the next is
/// asked (a hint arriving later than this is worth little: the replay has
/// fetched its first pages itself by then).
const HINT_TIMEOUT: Duration = Duration::from_millis(500);

/// Pages per background request while reads fetch on demand.
const DEMAND_TIME_BATCH: usize = 32;
/// Most pages asked in one request (the servers' default limit).
const MAX_BATCH: usize = 1024;
/// Largest node range asked in one request (2 MiB of hashes).
const MAX_NODES: u64 = 1 << 16;
/// Events kept until [`RecoveryView::take_events`]; later faults are only counted.
const MAX_EVENTS: usize = 4096;

/// Errors of a recovery view.
#[derive(Debug, thiserror::Error)]
pub enum RecoveryError {
    #[error("page {index} is outside the certified state of {num_pages} pages")]
    OutOfRange { index: u64, num_pages: u64 },
    #[error("local state has {local} pages, more than the certified {certified}")]
    LocalLarger { local: u64, certified: u64 },
    #[error("no source left: every source was excluded as faulty")]
    NoHonestSource,
    #[error("no source answered after {rounds} rounds; last error: {last}")]
    Unavailable { rounds: usize, last: String },
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("pages were written during recovery; checkpoint {0} cannot be re-taken locally")]
    Modified(Seq),
    #[error("recovered state has root {got}, certified {expected}")]
    RootMismatch { expected: Digest, got: Digest },
    #[error("background fetch failed: {0}")]
    Background(String),
}

/// Something a caller may want to log or count.
#[derive(Debug)]
pub enum RecoveryEvent {
    /// A source failed a request; `excluded` if the reply proved it faulty.
    SourceFault {
        source: String,
        error: FetchError,
        excluded: bool,
    },
    /// The comparison finished; this many pages were missing.
    Compared { missing: u64 },
    /// Every page is present, or the background gave up (`error`).
    Finished { fetched: u64, error: Option<String> },
}

/// Snapshot of a view's progress.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Progress {
    pub num_pages: u64,
    /// Pages known to match checkpoint C locally.
    pub present: u64,
    /// Pages known to differ and not yet fetched.
    pub missing: u64,
    /// Pages fetched and verified so far.
    pub fetched: u64,
    /// Source failures reported.
    pub faults: u64,
    pub compared: bool,
    pub finished: bool,
    /// Reads that had to fetch their page (or wait for one in flight).
    pub demand_reads: u64,
    /// Total time readers spent blocked on fetches, in microseconds.
    pub demand_wait_us: u64,
    /// Blocking reads ([`RecoveryView::read_blocking`]) and the total time
    /// spent in them, fetched or not, in microseconds.
    pub reads: u64,
    pub read_us: u64,
    /// Total time spent in [`RecoveryView::write_pages`] (waits included).
    pub write_us: u64,
}

const UNKNOWN: u8 = 0;
// A page whose flags were never set reads as UNKNOWN (see `PageFlags`).
const _: () = assert!(UNKNOWN == 0);
const MISSING: u8 = 1;
const PRESENT: u8 = 2;
const STATE_MASK: u8 = 3;
const IN_FLIGHT: u8 = 4;
/// A fetched page being written to the store outside the view lock; an
/// executor write to it stays staged until then, so the fetched copy cannot
/// land over it.
const STORING: u8 = 8;
/// In a background batch. A reader does not wait for it (the batch may sit
/// behind a slow source): it fetches the page itself.
const BG_FLIGHT: u8 = 16;

/// Status bits of every page of C, in blocks allocated on first write: a
/// flat vector would cost a view on a large state time in its open, before
/// the first read can fetch (zeroing 262,144 bytes for a 1 GiB state took
/// 50-300 µs there, against 5-10 µs for 16 MiB).
struct PageFlags {
    blocks: Vec<Option<Box<[u8]>>>,
}

/// Pages per [`PageFlags`] block.
const FLAG_BLOCK: u64 = 4096;

impl PageFlags {
    fn new(num_pages: u64) -> PageFlags {
        PageFlags {
            blocks: (0..num_pages.div_ceil(FLAG_BLOCK)).map(|_| None).collect(),
        }
    }

    /// The bits of page `i` (all clear until first set).
    fn get(&self, i: u64) -> u8 {
        self.blocks[(i / FLAG_BLOCK) as usize]
            .as_ref()
            .map_or(0, |b| b[(i % FLAG_BLOCK) as usize])
    }

    fn get_mut(&mut self, i: u64) -> &mut u8 {
        let block = self.blocks[(i / FLAG_BLOCK) as usize]
            .get_or_insert_with(|| vec![0; FLAG_BLOCK as usize].into_boxed_slice());
        &mut block[(i % FLAG_BLOCK) as usize]
    }
}

struct ViewState {
    status: PageFlags,
    /// Verified leaf hashes of missing pages.
    leaf: HashMap<u64, Digest>,
    /// Verified pages handed to readers but not yet in the store.
    staged: HashMap<u64, Arc<Vec<u8>>>,
    /// Executor writes past C's pages (the app grew its state), not yet in
    /// the store; written behind with `staged`.
    grown: HashMap<u64, Arc<Vec<u8>>>,
    /// One past the highest page written past C (0: none).
    grown_end: u64,
    excluded: Vec<bool>,
    events: Vec<RecoveryEvent>,
    present: u64,
    missing: u64,
    fetched: u64,
    faults: u64,
    compared: bool,
    outcome: Option<Result<(), String>>,
    written: bool,
    /// Pages being written to the store outside the lock (`STORING`).
    storing_pages: usize,
    demand_reads: u64,
    demand_wait_us: u64,
}

impl ViewState {
    /// Accounts one read that blocked on a fetch since `since`.
    fn count_demand(&mut self, since: Instant) {
        self.demand_reads += 1;
        self.demand_wait_us += since.elapsed().as_micros() as u64;
    }

    fn state(&self, i: u64) -> u8 {
        self.status.get(i) & STATE_MASK
    }

    fn in_flight(&self, i: u64) -> bool {
        self.status.get(i) & IN_FLIGHT != 0
    }

    fn set_in_flight(&mut self, i: u64, on: bool) {
        let s = self.status.get_mut(i);
        *s = if on { *s | IN_FLIGHT } else { *s & !IN_FLIGHT };
    }

    fn bg_flight(&self, i: u64) -> bool {
        self.status.get(i) & BG_FLIGHT != 0
    }

    fn set_bg_flight(&mut self, i: u64, on: bool) {
        let s = self.status.get_mut(i);
        *s = if on { *s | BG_FLIGHT } else { *s & !BG_FLIGHT };
    }

    fn storing(&self, i: u64) -> bool {
        self.status.get(i) & STORING != 0
    }

    fn set_storing(&mut self, i: u64, on: bool) {
        let s = self.status.get_mut(i);
        let was = *s & STORING != 0;
        *s = if on { *s | STORING } else { *s & !STORING };
        match (was, on) {
            (false, true) => self.storing_pages += 1,
            (true, false) => self.storing_pages -= 1,
            _ => {}
        }
    }

    fn set_state(&mut self, i: u64, new: u8) {
        let old = self.state(i);
        if old == new {
            return;
        }
        match old {
            PRESENT => self.present -= 1,
            MISSING => self.missing -= 1,
            _ => {}
        }
        match new {
            PRESENT => self.present += 1,
            MISSING => self.missing += 1,
            _ => {}
        }
        let s = self.status.get_mut(i);
        *s = (*s & !STATE_MASK) | new;
        if new == PRESENT {
            self.leaf.remove(&i);
        }
    }
}

struct Shared {
    store: PageStore,
    cert: Certificate,
    num_pages: u64,
    /// Local page count when the view opened; pages past it have no local copy.
    local_pages: u64,
    config: RecoveryConfig,
    sources: Vec<Arc<dyn PageSource>>,
    next_source: AtomicUsize,
    /// Reads waiting on a fetch; the background holds back while non-zero.
    demand: AtomicUsize,
    /// When the view opened; `last_demand_us` counts from it.
    opened: Instant,
    /// When a read last had to fetch (microseconds since `opened`, 0: never).
    last_demand_us: AtomicU64,
    /// Executor runs in progress (see [`RecoveryView::executing`]): the
    /// background sends no new request meanwhile.
    executing: AtomicUsize,
    /// See [`Progress::reads`], [`Progress::read_us`], [`Progress::write_us`].
    reads: AtomicU64,
    read_us: AtomicU64,
    write_us: AtomicU64,
    st: Mutex<ViewState>,
    cond: Condvar,
    changed: watch::Sender<u64>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, ViewState> {
        // A panic while holding the lock leaves only counters possibly stale;
        // page data lives in the store, so carry on.
        self.st.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn notify(&self) {
        self.changed.send_modify(|v| *v = v.wrapping_add(1));
        self.cond.notify_all();
    }

    fn report(&self, source: usize, error: FetchError) {
        let excluded = error.is_fault();
        let name = self.sources[source].name();
        tracing::warn!(source = %name, excluded, "statefetch source failed: {error}");
        let mut st = self.lock();
        if excluded {
            st.excluded[source] = true;
        }
        st.faults += 1;
        // Bounded: a source failing over and over must not grow memory.
        if st.events.len() < MAX_EVENTS {
            st.events.push(RecoveryEvent::SourceFault {
                source: name,
                error,
                excluded,
            });
        }
    }

    /// The sources not excluded, starting from the next in rotation (which
    /// spreads load over honest peers).
    fn sources_in_turn(&self) -> Vec<usize> {
        let k = self.sources.len();
        let first = self.next_source.fetch_add(1, Ordering::Relaxed);
        let st = self.lock();
        (0..k)
            .map(|j| (first + j) % k)
            .filter(|i| !st.excluded[*i])
            .collect()
    }

    /// Sends `request` to one source after another until a reply passes
    /// `check`; faulty sources are excluded, failing ones skipped this pass.
    async fn ask<T>(
        &self,
        request: Request,
        check: impl Fn(proto::Response) -> Result<T, FetchError>,
    ) -> Result<T, RecoveryError> {
        let k = self.sources.len();
        let mut last = String::from("no source");
        let rounds = self.config.max_rounds.max(1);
        for round in 0..rounds {
            if round > 0 {
                tokio::time::sleep(self.config.retry_backoff * round as u32).await;
            }
            // Rotate the starting source to spread load over honest peers.
            let first = self.next_source.fetch_add(1, Ordering::Relaxed);
            let mut any = false;
            for j in 0..k {
                let i = (first + j) % k;
                if self.lock().excluded[i] {
                    continue;
                }
                any = true;
                match self.sources[i].call(request.clone()).await.and_then(&check) {
                    Ok(v) => return Ok(v),
                    Err(e) => {
                        last = e.to_string();
                        self.report(i, e);
                    }
                }
            }
            if !any {
                return Err(RecoveryError::NoHonestSource);
            }
        }
        if self.lock().excluded.iter().all(|e| *e) {
            return Err(RecoveryError::NoHonestSource);
        }
        Err(RecoveryError::Unavailable { rounds, last })
    }

    /// [`ask`](Self::ask) for a reader: sources are asked one after another,
    /// the next one also when the previous has not answered within
    /// `hedge_after`; the first reply passing `check` is returned. If every
    /// source fails, falls back to `ask` (retry passes with backoff).
    async fn ask_hedged<T>(
        &self,
        hedge_after: Duration,
        request: Request,
        check: impl Fn(proto::Response) -> Result<T, FetchError>,
    ) -> Result<T, RecoveryError> {
        let order = self.sources_in_turn();
        if order.is_empty() {
            return Err(RecoveryError::NoHonestSource);
        }
        // Dropping the set (on return) cancels the calls still pending.
        let mut calls: JoinSet<(usize, Result<proto::Response, FetchError>)> = JoinSet::new();
        let launch = |calls: &mut JoinSet<_>, i: usize| {
            let source = self.sources[i].clone();
            let request = request.clone();
            calls.spawn(async move { (i, source.call(request).await) });
        };
        launch(&mut calls, order[0]);
        let mut next = 1;
        loop {
            let hedge = tokio::time::sleep(hedge_after);
            tokio::select! {
                joined = calls.join_next() => {
                    let Some(joined) = joined else { break };
                    let Ok((i, reply)) = joined else { continue };
                    match reply.and_then(&check) {
                        Ok(v) => return Ok(v),
                        Err(e) => {
                            self.report(i, e);
                            if next < order.len() {
                                launch(&mut calls, order[next]);
                                next += 1;
                            }
                        }
                    }
                }
                () = hedge, if next < order.len() => {
                    launch(&mut calls, order[next]);
                    next += 1;
                }
            }
        }
        self.ask(request, check).await
    }

    /// [`ask_hedged`](Self::ask_hedged) for the background: while no
    /// source answers (all busy, restarting or unreachable, none proven
    /// faulty), keeps asking for [`RecoveryConfig::give_up_after`] before
    /// failing the recovery.
    async fn ask_patiently<T>(
        &self,
        request: Request,
        check: impl Fn(proto::Response) -> Result<T, FetchError>,
    ) -> Result<T, RecoveryError> {
        let started = Instant::now();
        loop {
            match self
                .ask_hedged(self.config.background_hedge_after, request.clone(), &check)
                .await
            {
                Err(RecoveryError::Unavailable { .. })
                    if started.elapsed() < self.config.give_up_after =>
                {
                    tokio::time::sleep(self.config.retry_backoff).await;
                }
                r => return r,
            }
        }
    }

    /// How many background requests may be in flight now: one while the
    /// executor has recently had to fetch (it is likely replaying orders and
    /// will read again soon), else the configured bound.
    fn background_limit(&self) -> usize {
        let last = self.last_demand_us.load(Ordering::Relaxed);
        let now = self.opened.elapsed().as_micros() as u64;
        if last != 0 && now.saturating_sub(last) < self.config.demand_quiet.as_micros() as u64 {
            1
        } else {
            self.config.max_in_flight.max(1)
        }
    }

    /// Waits while reads are waiting on fetches.
    async fn yield_to_demand(&self) {
        loop {
            let mut changes = self.changed.subscribe();
            if self.demand.load(Ordering::SeqCst) == 0 && self.executing.load(Ordering::SeqCst) == 0
            {
                return;
            }
            let _ = changes.changed().await;
        }
    }

    fn progress(&self, st: &ViewState) -> Progress {
        Progress {
            num_pages: self.num_pages,
            present: st.present,
            missing: st.missing,
            fetched: st.fetched,
            faults: st.faults,
            compared: st.compared,
            finished: st.outcome.is_some(),
            demand_reads: st.demand_reads,
            demand_wait_us: st.demand_wait_us,
            reads: self.reads.load(Ordering::Relaxed),
            read_us: self.read_us.load(Ordering::Relaxed),
            write_us: self.write_us.load(Ordering::Relaxed),
        }
    }

    /// Writes staged pages to the store (normally done by the fetch that
    /// staged them, right after handing the page to its reader).
    fn persist_staged(&self) -> Result<(), RecoveryError> {
        let mut st = self.lock();
        // A fetch still writing staged pages outside the lock must finish
        // first: once this returns the caller may write the store directly,
        // and that late write would overwrite newer contents.
        while st.storing_pages > 0 {
            st = self.cond.wait(st).unwrap_or_else(|e| e.into_inner());
        }
        self.persist_locked(&mut st)
    }

    /// Writes the staged pages to the store, the view lock held; pages a
    /// fetch is storing (an older copy, written outside the lock) stay
    /// staged, so that ours is written after it.
    fn persist_locked(&self, st: &mut ViewState) -> Result<(), RecoveryError> {
        let indices: Vec<u64> = st
            .staged
            .keys()
            .copied()
            .filter(|i| !st.storing(*i))
            .collect();
        let staged: Vec<(u64, Arc<Vec<u8>>)> = indices
            .iter()
            .filter_map(|i| st.staged.remove(i).map(|d| (*i, d)))
            .collect();
        // Pages past C are never fetched, so none is being stored.
        let grown: Vec<(u64, Arc<Vec<u8>>)> = st.grown.drain().collect();
        let r = self.store.write_pages(
            staged
                .iter()
                .chain(grown.iter())
                .map(|(i, d)| (*i, d.as_slice())),
        );
        if r.is_err() {
            st.staged.extend(staged);
            st.grown.extend(grown);
        }
        Ok(r?)
    }
}

/// Clears the in-flight marks of pages when dropped, so that a cancelled
/// fetch (view dropped, background stopped) never leaves readers waiting.
struct InFlight {
    sh: Arc<Shared>,
    pages: Vec<u64>,
    /// A background batch (its pages carry `BG_FLIGHT`, not `IN_FLIGHT`).
    background: bool,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        if self.pages.is_empty() {
            return;
        }
        {
            let mut st = self.sh.lock();
            for &p in &self.pages {
                if self.background {
                    st.set_bg_flight(p, false);
                } else {
                    st.set_in_flight(p, false);
                }
            }
        }
        self.sh.notify();
    }
}

/// One read waiting on a fetch (see [`Shared::demand`]).
struct Demand(Arc<Shared>);

impl Demand {
    fn new(sh: Arc<Shared>) -> Demand {
        sh.demand.fetch_add(1, Ordering::SeqCst);
        let now = (sh.opened.elapsed().as_micros() as u64).max(1);
        sh.last_demand_us.store(now, Ordering::Relaxed);
        Demand(sh)
    }
}

impl Drop for Demand {
    fn drop(&mut self) {
        self.0.demand.fetch_sub(1, Ordering::SeqCst);
        self.0.notify();
    }
}

/// Runs `f`, adding the time it took to `total_us`.
fn timed<T>(total_us: &AtomicU64, f: impl FnOnce() -> T) -> T {
    let t0 = Instant::now();
    let r = f();
    total_us.fetch_add(t0.elapsed().as_micros() as u64, Ordering::Relaxed);
    r
}

/// See [`RecoveryView::executing`].
pub struct Executing(Arc<Shared>);

impl Drop for Executing {
    fn drop(&mut self) {
        self.0.executing.fetch_sub(1, Ordering::SeqCst);
        self.0.notify();
    }
}

/// What a demand fetch tells its reader: the verified page, or `None` if the
/// page became present meanwhile (read it again).
type Delivery = Result<Option<Vec<u8>>, RecoveryError>;

/// Fetches `indices` (the reader's page first, then readahead; or a
/// prefetch, with no reader) with their proofs and verifies each against
/// the root; hands the reader's page to it through `deliver`, then writes
/// the pages to the store.
async fn fetch_one(
    mut guard: InFlight,
    demand: Demand,
    indices: Vec<u64>,
    deliver: Option<oneshot::Sender<Delivery>>,
) {
    let sh = guard.sh.clone();
    let (seq, root, n) = (sh.cert.seq, sh.cert.root, sh.num_pages);
    let request = Request::Pages {
        seq,
        root,
        indices: indices.clone(),
        proofs: true,
    };
    let t_ask = Instant::now();
    let fetched = sh
        .ask_hedged(sh.config.hedge_after, request, |resp| {
            let reply = proto::check_pages(seq, root, Some(n), &indices, resp)?;
            proto::verify_with_proofs(&root, &reply)?;
            Ok(reply)
        })
        .await;
    let pages: Vec<(u64, Arc<Vec<u8>>)> = match fetched {
        Ok(reply) => reply
            .pages
            .into_iter()
            .map(|p| (p.index, Arc::new(p.data)))
            .collect(),
        Err(e) => {
            drop(guard);
            drop(demand);
            match deliver {
                Some(deliver) => {
                    let _ = deliver.send(Err(e));
                }
                None => tracing::debug!("statefetch prefetch failed: {e}"),
            }
            return;
        }
    };
    tracing::debug!(
        pages = indices.len(),
        first = indices[0],
        reader = deliver.is_some(),
        ms = t_ask.elapsed().as_secs_f64() * 1e3,
        "statefetch: fetched"
    );
    // check_pages returned the pages in the order asked: the reader's first.
    let mine = pages[0].1.clone();
    let staged: Vec<(u64, Arc<Vec<u8>>)> = {
        let mut st = sh.lock();
        guard.pages.clear();
        let mut staged = Vec::with_capacity(pages.len());
        for (index, data) in pages {
            st.set_in_flight(index, false);
            if st.state(index) != PRESENT {
                st.set_state(index, PRESENT);
                st.staged.insert(index, data.clone());
                st.fetched += 1;
                staged.push((index, data));
            }
        }
        staged
    };
    let reader_staged = staged.first().is_some_and(|(i, _)| *i == indices[0]);
    drop(demand);
    if let Some(deliver) = deliver {
        let _ = deliver.send(Ok(reader_staged.then(|| mine.as_ref().clone())));
    }
    if !staged.is_empty() {
        // Persist after the reader has its page. Only pages still staged:
        // an executor write since then replaced the staged copy, and must
        // not be overwritten. The store write happens outside the view lock
        // (readers keep reading, from the staged copies); an executor write
        // meanwhile is staged and persisted after it (STORING), as for
        // background batches.
        let still: Vec<(u64, Arc<Vec<u8>>)> = {
            let mut st = sh.lock();
            let still: Vec<(u64, Arc<Vec<u8>>)> = staged
                .into_iter()
                .filter(|(i, d)| st.staged.get(i).is_some_and(|s| Arc::ptr_eq(s, d)))
                .collect();
            for (i, _) in &still {
                st.set_storing(*i, true);
            }
            still
        };
        let stored = store_off_runtime(&sh, still, |st, pages, stored| {
            for (i, d) in pages {
                st.set_storing(*i, false);
                if stored && st.staged.get(i).is_some_and(|s| Arc::ptr_eq(s, d)) {
                    st.staged.remove(i);
                }
            }
        })
        .await;
        if let Err(e) = stored {
            tracing::error!("statefetch: storing fetched pages: {e}");
        }
    }
}

/// Fetches a batch of missing pages (`guard.pages`, marked in flight by the
/// caller) and verifies each against its verified leaf hash (`leaves`, taken
/// by the caller under the same lock as the pages: a reader may fetch one of
/// them and drop its leaf before this task runs, and a missing leaf would
/// wrongly convict an honest source).
async fn fetch_batch(mut guard: InFlight, leaves: Vec<Digest>) -> Result<(), RecoveryError> {
    let sh = guard.sh.clone();
    let pages = guard.pages.clone();
    let (seq, root, n) = (sh.cert.seq, sh.cert.root, sh.num_pages);
    let request = Request::Pages {
        seq,
        root,
        indices: pages.clone(),
        proofs: false,
    };
    let fetched = sh
        .ask_patiently(request, |resp| {
            let reply = proto::check_pages(seq, root, Some(n), &pages, resp)?;
            proto::verify_with_leaves(&reply, &leaves)?;
            Ok(reply)
        })
        .await;
    let fresh: Vec<proto::PageData> = {
        let mut st = sh.lock();
        for &p in &pages {
            st.set_bg_flight(p, false);
        }
        guard.pages.clear();
        match fetched {
            Ok(reply) => {
                // Claimed under the view lock and written outside it: an
                // executor write to a page being stored is staged and only
                // persisted once this write is done (STORING), and reads are
                // not held up by the store write.
                let fresh: Vec<proto::PageData> = reply
                    .pages
                    .into_iter()
                    .filter(|p| st.state(p.index) != PRESENT)
                    .collect();
                for p in &fresh {
                    st.set_in_flight(p.index, true);
                    st.set_storing(p.index, true);
                }
                fresh
            }
            Err(e) => {
                drop(st);
                sh.notify();
                return Err(e);
            }
        }
    };
    let fresh: Vec<(u64, Arc<Vec<u8>>)> = fresh
        .into_iter()
        .map(|p| (p.index, Arc::new(p.data)))
        .collect();
    store_off_runtime(&sh, fresh, |st, pages, stored| {
        for (i, _) in pages {
            st.set_storing(*i, false);
            st.set_in_flight(*i, false);
        }
        if stored {
            for (i, _) in pages {
                st.set_state(*i, PRESENT);
            }
            st.fetched += pages.len() as u64;
        }
    })
    .await
}

/// Pages to store, and what to do under the view lock once they are
/// stored (or not): clear their storing marks and so on.
struct StoreJob<F: FnOnce(&mut ViewState, &[(u64, Arc<Vec<u8>>)], bool)> {
    sh: Arc<Shared>,
    pages: Vec<(u64, Arc<Vec<u8>>)>,
    stored: bool,
    finish: Option<F>,
}

impl<F: FnOnce(&mut ViewState, &[(u64, Arc<Vec<u8>>)], bool)> Drop for StoreJob<F> {
    // Runs whether or not the job ran (a runtime shutting down drops it
    // unrun), so no page is left marked as being stored: `persist_staged`
    // waits for those marks to clear.
    fn drop(&mut self) {
        if let Some(finish) = self.finish.take() {
            finish(&mut self.sh.lock(), &self.pages, self.stored);
            self.sh.notify();
        }
    }
}

/// Writes fetched pages to the store on the blocking pool, then runs
/// `finish` under the view lock, on that same thread. A batch is up to a
/// megabyte of sled inserts; on the runtime it stalled the thread that also
/// reads the link (a replica runs one), so the next responses, the
/// executor's demand reads among them, waited behind it. `finish` does not
/// wait for the runtime either: a view dropped on a runtime thread waits
/// for the storing marks to clear.
async fn store_off_runtime<F>(
    sh: &Arc<Shared>,
    pages: Vec<(u64, Arc<Vec<u8>>)>,
    finish: F,
) -> Result<(), RecoveryError>
where
    F: FnOnce(&mut ViewState, &[(u64, Arc<Vec<u8>>)], bool) + Send + 'static,
{
    let mut job = StoreJob {
        sh: sh.clone(),
        pages,
        stored: false,
        finish: Some(finish),
    };
    tokio::task::spawn_blocking(move || {
        // In small batches: the store holds its lock for a whole batch, and
        // the executor's reads of stored pages wait for it meanwhile.
        let result = job.pages.chunks(STORE_CHUNK_PAGES).try_for_each(|chunk| {
            job.sh
                .store
                .write_pages(chunk.iter().map(|(i, d)| (*i, d.as_slice())))
        });
        job.stored = result.is_ok();
        drop(job);
        result
    })
    .await
    .map_err(|e| RecoveryError::Background(format!("page store task: {e}")))?
    .map_err(RecoveryError::from)
}

/// Asks the sources, one after another, which pages their state read since
/// the checkpoint (see [`crate::read_log`]); `None` if none can say. A
/// refusal is no fault (a peer restarted since, or its log is bounded).
async fn read_hint(sh: &Shared) -> Option<Vec<u64>> {
    let (seq, root, max) = (sh.cert.seq, sh.cert.root, sh.config.prefetch_pages);
    for i in sh.sources_in_turn() {
        let request = Request::ReadHint { seq, root, max };
        let reply = tokio::time::timeout(HINT_TIMEOUT, sh.sources[i].call(request))
            .await
            .unwrap_or(Err(FetchError::Timeout));
        match reply.and_then(|resp| proto::check_read_hint(seq, root, max, resp)) {
            Ok(pages) => return Some(pages),
            Err(e) if e.is_fault() => sh.report(i, e),
            Err(e) => tracing::debug!(source = %sh.sources[i].name(), "no read hint: {e}"),
        }
    }
    None
}

/// Prefetches, in order, the pages a peer's read hint names that are not
/// present yet: the replay of the orders after the checkpoint reads them,
/// so it finds them fetched (or on their way) instead of fetching each on
/// its read. The first request is small so the first read waits little;
/// the background steps aside meanwhile (each request counts as demand).
async fn prefetch_hinted(sh: Arc<Shared>) {
    if sh.config.prefetch_pages == 0 || sh.num_pages == 0 {
        return;
    }
    let Some(hint) = read_hint(&sh).await else {
        return;
    };
    // Pages past C's count were added after it: nothing to fetch.
    let hint: Vec<u64> = hint.into_iter().filter(|p| *p < sh.num_pages).collect();
    let in_flight = sh.config.prefetch_in_flight.max(1);
    let largest = sh.config.prefetch_batch.clamp(1, MAX_BATCH);
    let mut batch = PREFETCH_FIRST_BATCH.min(largest);
    let mut next = 0;
    let mut tasks = JoinSet::new();
    let mut requested = 0usize;
    while next < hint.len() || !tasks.is_empty() {
        while tasks.len() < in_flight && next < hint.len() {
            let pages: Vec<u64> = {
                let mut st = sh.lock();
                let mut pages = Vec::with_capacity(batch);
                while pages.len() < batch && next < hint.len() {
                    let p = hint[next];
                    next += 1;
                    if st.state(p) != PRESENT && !st.in_flight(p) && !st.bg_flight(p) {
                        st.set_in_flight(p, true);
                        pages.push(p);
                    }
                }
                pages
            };
            if pages.is_empty() {
                continue;
            }
            requested += pages.len();
            let guard = InFlight {
                sh: sh.clone(),
                pages: pages.clone(),
                background: false,
            };
            let demand = Demand::new(sh.clone());
            tasks.spawn(fetch_one(guard, demand, pages, None));
            batch = (batch * 2).min(largest);
        }
        if tasks.join_next().await.is_none() {
            break;
        }
    }
    tracing::debug!(
        hinted = hint.len(),
        requested,
        "statefetch: prefetched the pages read since the checkpoint"
    );
}

/// Compares pages `[a, b)` with the verified leaves of C; returns the pages
/// found missing.
async fn compare_chunk(sh: Arc<Shared>, a: u64, b: u64) -> Result<Vec<u64>, RecoveryError> {
    let (seq, root, n) = (sh.cert.seq, sh.cert.root, sh.num_pages);
    let mut remote = Vec::with_capacity((b - a) as usize);
    let mut start = a;
    while start < b {
        let count = (b - start).min(MAX_NODES) as u32;
        let request = Request::Nodes {
            seq,
            root,
            level: 0,
            start,
            count,
        };
        let range = sh
            .ask_patiently(request, |resp| {
                proto::check_nodes(seq, root, Some(n), (0, start, count), resp)
            })
            .await?;
        remote.extend(range.nodes);
        start += u64::from(count);
    }
    let local_end = b.min(sh.local_pages);
    let local = if a < local_end {
        let store = sh.store.clone();
        tokio::task::spawn_blocking(move || store.current_leaves(a, local_end))
            .await
            .map_err(|e| RecoveryError::Background(e.to_string()))??
    } else {
        Vec::new()
    };
    let mut missing = Vec::new();
    {
        let mut st = sh.lock();
        for i in a..b {
            if st.state(i) != UNKNOWN {
                continue;
            }
            let k = (i - a) as usize;
            if i < local_end && local[k] == remote[k] {
                st.set_state(i, PRESENT);
            } else {
                st.leaf.insert(i, remote[k]);
                st.set_state(i, MISSING);
                missing.push(i);
            }
        }
    }
    sh.notify();
    Ok(missing)
}

enum Work {
    Compared(Vec<u64>),
    Fetched,
}

fn mark_compared(sh: &Shared) {
    let mut st = sh.lock();
    if !st.compared {
        st.compared = true;
        let missing = st.missing;
        st.events.push(RecoveryEvent::Compared { missing });
    }
}

async fn run_background(sh: Arc<Shared>) -> Result<(), RecoveryError> {
    let (seq, root, n) = (sh.cert.seq, sh.cert.root, sh.num_pages);
    if n == 0 {
        mark_compared(&sh);
        return Ok(());
    }
    // 1. Compare at chunk granularity: equal chunk nodes mean equal pages.
    let level = sh.config.chunk_level.min(merkle::depth(n));
    let chunks = merkle::level_len(level, n);
    let mut todo: VecDeque<(u64, u64)> = VecDeque::new();
    let mut start = 0;
    while start < chunks {
        sh.yield_to_demand().await;
        let count = (chunks - start).min(MAX_NODES) as u32;
        let request = Request::Nodes {
            seq,
            root,
            level: level as u8,
            start,
            count,
        };
        let range = sh
            .ask_patiently(request, |resp| {
                proto::check_nodes(seq, root, Some(n), (level as u8, start, count), resp)
            })
            .await?;
        for (k, remote) in range.nodes.iter().enumerate() {
            let c = start + k as u64;
            let (a, b) = (c << level, ((c + 1) << level).min(n));
            if sh.store.clean_node(level, c)? == Some(*remote) {
                let mut st = sh.lock();
                for i in a..b {
                    if st.state(i) == UNKNOWN {
                        st.set_state(i, PRESENT);
                    }
                }
            } else {
                todo.push_back((a, b));
            }
        }
        start += u64::from(count);
    }
    sh.notify();

    // 2. Compare differing chunks leaf by leaf and fetch what is missing,
    // with bounded concurrency; comparisons and fetches share the bound.
    let max = sh.config.max_in_flight.max(1);
    let batch = sh.config.batch_pages.max(1);
    let mut queue: VecDeque<u64> = VecDeque::new();
    let mut tasks: JoinSet<Result<Work, RecoveryError>> = JoinSet::new();
    let mut comparing = 0usize;
    loop {
        if tasks.len() < max {
            sh.yield_to_demand().await;
        }
        while tasks.len() < sh.background_limit().min(max) {
            let want_fetch = queue.len() >= batch || (todo.is_empty() && !queue.is_empty());
            if want_fetch {
                // Small batches while the executor reads on demand: its
                // next fetch waits behind at most this one.
                let batch = if sh.background_limit() == 1 {
                    batch.min(DEMAND_TIME_BATCH)
                } else {
                    batch
                };
                let (pages, leaves) = {
                    let mut st = sh.lock();
                    let mut pages = Vec::with_capacity(batch);
                    let mut leaves = Vec::with_capacity(batch);
                    while pages.len() < batch {
                        let Some(p) = queue.pop_front() else { break };
                        if st.state(p) != MISSING || st.in_flight(p) || st.bg_flight(p) {
                            continue;
                        }
                        // A page is marked MISSING together with its leaf.
                        let Some(leaf) = st.leaf.get(&p).copied() else {
                            return Err(RecoveryError::Background(format!(
                                "page {p} is missing without its verified leaf"
                            )));
                        };
                        st.set_bg_flight(p, true);
                        pages.push(p);
                        leaves.push(leaf);
                    }
                    (pages, leaves)
                };
                if !pages.is_empty() {
                    // The guard travels with the task: if the task is
                    // aborted, even before it first runs, the marks clear.
                    let guard = InFlight {
                        sh: sh.clone(),
                        pages,
                        background: true,
                    };
                    tasks.spawn(
                        async move { fetch_batch(guard, leaves).await.map(|()| Work::Fetched) },
                    );
                }
            } else if let Some((a, b)) = todo.pop_front() {
                comparing += 1;
                let sh = sh.clone();
                tasks.spawn(async move { compare_chunk(sh, a, b).await.map(Work::Compared) });
            } else {
                break;
            }
        }
        if tasks.is_empty() {
            // Sweep for pages left behind (a failed demand fetch, or one
            // still in flight for a reader).
            let mut changes = sh.changed.subscribe();
            let (left, busy) = {
                let st = sh.lock();
                let mut left = Vec::new();
                let mut busy = false;
                for i in 0..n {
                    match (st.state(i), st.in_flight(i) || st.bg_flight(i)) {
                        (PRESENT, _) => {}
                        (_, true) => busy = true,
                        (MISSING, false) => left.push(i),
                        _ => {
                            return Err(RecoveryError::Background(format!(
                                "page {i} was never compared"
                            )))
                        }
                    }
                }
                (left, busy)
            };
            if !left.is_empty() {
                queue.extend(left);
                continue;
            }
            if busy {
                let _ = changes.changed().await;
                continue;
            }
            break;
        }
        match tasks.join_next().await {
            Some(Ok(Ok(Work::Compared(missing)))) => {
                comparing -= 1;
                queue.extend(missing);
                if comparing == 0 && todo.is_empty() {
                    mark_compared(&sh);
                }
            }
            Some(Ok(Ok(Work::Fetched))) | None => {}
            Some(Ok(Err(e))) => return Err(e),
            Some(Err(e)) => return Err(RecoveryError::Background(e.to_string())),
        }
    }
    mark_compared(&sh);
    Ok(())
}

/// The state of checkpoint C, fetched on demand into the local store.
///
/// Dropping the view stops the background fetch (pages already stored stay).
pub struct RecoveryView {
    shared: Arc<Shared>,
    runtime: tokio::runtime::Handle,
    task: tokio::task::JoinHandle<()>,
    prefetch: tokio::task::JoinHandle<()>,
}

enum Claim {
    /// Present: the staged copy if not yet in the store.
    Present(Option<Arc<Vec<u8>>>),
    /// Fetch these pages (the reader's first), now marked in flight.
    Fetch(Vec<u64>),
    Wait,
}

impl RecoveryView {
    /// Opens a view of certified checkpoint `cert` over `store`, fetching
    /// from `sources`. Must be called inside a tokio runtime; costs one
    /// verified round trip (to learn the page count bound by the root).
    pub async fn open(
        store: PageStore,
        cert: Certificate,
        sources: Vec<Arc<dyn PageSource>>,
        config: RecoveryConfig,
    ) -> Result<RecoveryView, RecoveryError> {
        let mut shared = Shared {
            store,
            cert,
            num_pages: 0,
            local_pages: 0,
            config,
            next_source: AtomicUsize::new(0),
            demand: AtomicUsize::new(0),
            opened: Instant::now(),
            last_demand_us: AtomicU64::new(0),
            executing: AtomicUsize::new(0),
            reads: AtomicU64::new(0),
            read_us: AtomicU64::new(0),
            write_us: AtomicU64::new(0),
            st: Mutex::new(ViewState {
                status: PageFlags::new(0),
                leaf: HashMap::new(),
                staged: HashMap::new(),
                grown: HashMap::new(),
                grown_end: 0,
                excluded: vec![false; sources.len()],
                events: Vec::new(),
                present: 0,
                missing: 0,
                fetched: 0,
                faults: 0,
                compared: false,
                outcome: None,
                written: false,
                storing_pages: 0,
                demand_reads: 0,
                demand_wait_us: 0,
            }),
            sources,
            cond: Condvar::new(),
            changed: watch::channel(0).0,
        };
        let (seq, root) = (cert.seq, cert.root);
        // The root binds the page count, so any verified node settles it.
        let n = if root == merkle::empty_root() {
            0
        } else {
            let request = Request::Nodes {
                seq,
                root,
                level: 0,
                start: 0,
                count: 1,
            };
            // Hedged like a demand read: the executor waits for the open.
            shared
                .ask_hedged(shared.config.hedge_after, request, |resp| {
                    proto::check_nodes(seq, root, None, (0, 0, 1), resp)
                })
                .await?
                .num_pages
        };
        let local = shared.store.num_pages()?;
        if local > n {
            return Err(RecoveryError::LocalLarger {
                local,
                certified: n,
            });
        }
        shared.store.grow(n)?;
        shared.num_pages = n;
        shared.local_pages = local;
        shared
            .st
            .get_mut()
            .unwrap_or_else(|e| e.into_inner())
            .status = PageFlags::new(n);
        let shared = Arc::new(shared);
        let sh = shared.clone();
        let prefetch = tokio::spawn(prefetch_hinted(shared.clone()));
        let task = tokio::spawn(async move {
            let result = run_background(sh.clone()).await;
            {
                let mut st = sh.lock();
                let fetched = st.fetched;
                let error = result.as_ref().err().map(|e| e.to_string());
                if let Some(e) = &error {
                    tracing::warn!("statefetch background fetch stopped: {e}");
                }
                st.events.push(RecoveryEvent::Finished {
                    fetched,
                    error: error.clone(),
                });
                st.outcome = Some(match error {
                    None => Ok(()),
                    Some(e) => Err(e),
                });
            }
            sh.notify();
        });
        Ok(RecoveryView {
            shared,
            runtime: tokio::runtime::Handle::current(),
            task,
            prefetch,
        })
    }

    /// Pages in checkpoint C.
    pub fn num_pages(&self) -> u64 {
        self.shared.num_pages
    }

    pub fn certificate(&self) -> Certificate {
        self.shared.cert
    }

    fn check_index(&self, index: u64) -> Result<(), RecoveryError> {
        if index >= self.shared.num_pages {
            return Err(RecoveryError::OutOfRange {
                index,
                num_pages: self.shared.num_pages,
            });
        }
        Ok(())
    }

    fn claim(&self, st: &mut ViewState, index: u64) -> Claim {
        if st.state(index) == PRESENT {
            Claim::Present(st.staged.get(&index).cloned())
        } else if st.in_flight(index) {
            Claim::Wait
        } else {
            st.set_in_flight(index, true);
            let mut pages = vec![index];
            let end = index
                .saturating_add(1 + self.shared.config.readahead_pages as u64)
                .min(self.shared.num_pages);
            for j in index + 1..end {
                if st.state(j) == PRESENT || st.in_flight(j) {
                    break;
                }
                st.set_in_flight(j, true);
                pages.push(j);
            }
            Claim::Fetch(pages)
        }
    }

    /// Starts a demand fetch of `index` (claimed by the caller) on the runtime.
    fn start_fetch(&self, pages: Vec<u64>) -> oneshot::Receiver<Delivery> {
        let guard = InFlight {
            sh: self.shared.clone(),
            pages: pages.clone(),
            background: false,
        };
        let demand = Demand::new(self.shared.clone());
        let (tx, rx) = oneshot::channel();
        // A separate task, so that a caller giving up on the read cannot
        // leave the page marked in flight.
        self.runtime
            .spawn(fetch_one(guard, demand, pages, Some(tx)));
        rx
    }

    fn present(&self, index: u64, staged: Option<Arc<Vec<u8>>>) -> Result<Vec<u8>, RecoveryError> {
        match staged {
            Some(d) => Ok(d.as_ref().clone()),
            None => Ok(self.shared.store.read_page(index)?),
        }
    }

    /// Reads page `index`, fetching and verifying it first if it is not
    /// known to be present.
    pub async fn read(&self, index: u64) -> Result<Vec<u8>, RecoveryError> {
        self.check_index(index)?;
        loop {
            let mut changes = self.shared.changed.subscribe();
            let claim = self.claim(&mut self.shared.lock(), index);
            match claim {
                Claim::Present(staged) => return self.present(index, staged),
                Claim::Fetch(pages) => {
                    let delivered = self.start_fetch(pages).await.map_err(|_| {
                        RecoveryError::Background("fetch task ended early".into())
                    })??;
                    if let Some(page) = delivered {
                        return Ok(page);
                    }
                }
                Claim::Wait => {
                    let _ = changes.changed().await;
                }
            }
        }
    }

    /// [`read`](Self::read) for a thread outside the async runtime (for
    /// example a synchronous executor). Do not call it on a runtime thread.
    pub fn read_blocking(&self, index: u64) -> Result<Vec<u8>, RecoveryError> {
        self.shared.reads.fetch_add(1, Ordering::Relaxed);
        timed(&self.shared.read_us, || self.read_blocking_inner(index))
    }

    fn read_blocking_inner(&self, index: u64) -> Result<Vec<u8>, RecoveryError> {
        self.check_index(index)?;
        let mut st = self.shared.lock();
        let mut blocked_since = None;
        loop {
            match self.claim(&mut st, index) {
                Claim::Present(staged) => {
                    if let Some(t0) = blocked_since {
                        st.count_demand(t0);
                    }
                    drop(st);
                    return self.present(index, staged);
                }
                Claim::Wait => {
                    blocked_since.get_or_insert_with(Instant::now);
                    st = self.shared.cond.wait(st).unwrap_or_else(|e| e.into_inner());
                }
                Claim::Fetch(pages) => {
                    let t0 = *blocked_since.get_or_insert_with(Instant::now);
                    drop(st);
                    let delivered = self.start_fetch(pages).blocking_recv().map_err(|_| {
                        RecoveryError::Background("fetch task ended early".into())
                    })??;
                    st = self.shared.lock();
                    if let Some(page) = delivered {
                        st.count_demand(t0);
                        return Ok(page);
                    }
                }
            }
        }
    }

    /// Writes page `index` (executor writes during recovery); the page no
    /// longer needs fetching. Indices past C's pages grow the state.
    pub fn write(&self, index: u64, data: &[u8]) -> Result<(), RecoveryError> {
        self.write_pages(&[(index, data)])
    }

    /// Writes several pages as one store batch (see [`Self::write`]).
    pub fn write_pages(&self, pages: &[(u64, &[u8])]) -> Result<(), RecoveryError> {
        timed(&self.shared.write_us, || self.write_pages_inner(pages))
    }

    /// Pages are written behind: pages of C join the staged pages, pages
    /// past C's count (the app grew its state) join the grown ones, and
    /// reads see them there. They reach the store together, in one batch
    /// once more than [`WRITE_BEHIND_PAGES`] are held, or when the view
    /// completes ([`Self::persist_staged`], which a caller must run before
    /// using the store directly). During recovery nothing needs them
    /// durable: the replica cannot checkpoint before the view is complete,
    /// and a replica that restarts mid-recovery is recovered again. A woken
    /// replica's replay so never waits on the store for its writes (a
    /// write-through could wait milliseconds behind the background's
    /// batches of fetched pages).
    fn write_pages_inner(&self, pages: &[(u64, &[u8])]) -> Result<(), RecoveryError> {
        let n = self.shared.num_pages;
        {
            // No wait for a fetched copy of one of these pages being stored
            // (STORING): ours is staged, so it reaches the store after that.
            let mut st = self.shared.lock();
            st.written = true;
            for (index, data) in pages {
                let data = Arc::new(data.to_vec());
                if *index < n {
                    st.staged.insert(*index, data);
                    st.set_state(*index, PRESENT);
                } else {
                    st.grown.insert(*index, data);
                    st.grown_end = st.grown_end.max(index + 1);
                }
            }
            if st.staged.len() + st.grown.len() > WRITE_BEHIND_PAGES {
                self.shared.persist_locked(&mut st)?;
            }
        }
        self.shared.notify();
        Ok(())
    }

    /// One past the highest page written past C's pages through the view
    /// (0 if none): the state has grown at least that far, even while those
    /// pages are only held by the view.
    pub fn grown_end(&self) -> u64 {
        self.shared.lock().grown_end
    }

    /// Reads page `index` past C's pages (grown by the executor while
    /// recovering): the copy written behind if any, else the store's. A page
    /// of C is read as by [`Self::read_blocking`], whose caveat applies.
    pub fn read_grown(&self, index: u64) -> Result<Vec<u8>, RecoveryError> {
        if index < self.shared.num_pages {
            return self.read_blocking(index);
        }
        let held = self.shared.lock().grown.get(&index).cloned();
        match held {
            Some(d) => Ok(d.as_ref().clone()),
            None => Ok(self.shared.store.read_page(index)?),
        }
    }

    pub fn progress(&self) -> Progress {
        self.shared.progress(&self.shared.lock())
    }

    /// Marks a run of execution (e.g. a woken replica replaying the orders
    /// since the checkpoint) until the guard is dropped: the background
    /// sends no new request meanwhile (those in flight finish), leaving the
    /// machine and the peers to the run and the fetches its reads need.
    /// Between runs it goes on at full speed.
    pub fn executing(&self) -> Executing {
        self.shared.executing.fetch_add(1, Ordering::SeqCst);
        Executing(self.shared.clone())
    }

    /// Takes the events recorded so far.
    pub fn take_events(&self) -> Vec<RecoveryEvent> {
        std::mem::take(&mut self.shared.lock().events)
    }

    /// Writes to the store any verified page still staged for an on-demand
    /// reader. Once the view is complete, call this before using the store
    /// directly: "present" pages may otherwise still be in memory only.
    pub fn persist_staged(&self) -> Result<(), RecoveryError> {
        self.shared.persist_staged()
    }

    /// Waits until every page is present (or the background gave up).
    pub async fn wait_complete(&self) -> Result<Progress, RecoveryError> {
        loop {
            let mut changes = self.shared.changed.subscribe();
            let outcome = self.shared.lock().outcome.clone();
            match outcome {
                Some(Ok(())) => break,
                Some(Err(e)) => return Err(RecoveryError::Background(e)),
                None => {
                    let _ = changes.changed().await;
                }
            }
        }
        // Complete means the store itself holds every page: pages handed to
        // on-demand readers may still be staged in memory.
        self.shared.persist_staged()?;
        Ok(self.shared.progress(&self.shared.lock()))
    }

    /// Waits for completion, then takes checkpoint C on the local store and
    /// checks that its root is the certified one. Only valid if nothing was
    /// written through the view.
    pub async fn finish(self) -> Result<Digest, RecoveryError> {
        self.wait_complete().await?;
        let cert = self.shared.cert;
        if self.shared.lock().written {
            return Err(RecoveryError::Modified(cert.seq));
        }
        let sh = self.shared.clone();
        let root = tokio::task::spawn_blocking(move || {
            sh.persist_staged()?;
            Ok::<_, RecoveryError>(sh.store.checkpoint(cert.seq)?)
        })
        .await
        .map_err(|e| RecoveryError::Background(e.to_string()))??;
        if root != cert.root {
            return Err(RecoveryError::RootMismatch {
                expected: cert.root,
                got: root,
            });
        }
        Ok(root)
    }
}

impl Drop for RecoveryView {
    fn drop(&mut self) {
        self.task.abort();
        self.prefetch.abort();
        // Pages handed to readers but not yet stored are verified: keep them.
        if let Err(e) = self.shared.persist_staged() {
            tracing::error!("statefetch: storing fetched pages: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_flags_start_clear_and_keep_each_page_apart() {
        let n = 3 * FLAG_BLOCK + 5;
        let mut flags = PageFlags::new(n);
        assert_eq!(
            flags.blocks.len(),
            4,
            "one block per 4,096 pages, rounded up"
        );
        assert!(
            flags.blocks.iter().all(Option::is_none),
            "nothing allocated at open"
        );
        for i in [0, FLAG_BLOCK - 1, FLAG_BLOCK, 2 * FLAG_BLOCK + 7, n - 1] {
            assert_eq!(flags.get(i), UNKNOWN);
        }
        // Set pages on both sides of a block boundary and the last page.
        *flags.get_mut(FLAG_BLOCK - 1) = PRESENT | IN_FLIGHT;
        *flags.get_mut(FLAG_BLOCK) = MISSING;
        *flags.get_mut(n - 1) = BG_FLIGHT;
        assert_eq!(flags.get(FLAG_BLOCK - 1), PRESENT | IN_FLIGHT);
        assert_eq!(flags.get(FLAG_BLOCK), MISSING);
        assert_eq!(flags.get(n - 1), BG_FLIGHT);
        assert_eq!(flags.get(FLAG_BLOCK - 2), UNKNOWN);
        assert_eq!(flags.get(FLAG_BLOCK + 1), UNKNOWN);
        assert!(
            flags.blocks[2].is_none(),
            "an untouched block stays unallocated"
        );
    }
}
