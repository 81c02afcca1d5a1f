//! The page store: application pages in sled, with copy-on-write checkpoints.
//!
//! Everything lives in one sled tree, so that every multi-key change is one
//! atomic batch:
//!
//! | key | value |
//! |---|---|
//! | `P` idx | current page (absent: all zeros) |
//! | `C` seq idx | page `idx` as it was at checkpoint `seq` (empty: zeros) |
//! | `K` seq | [`CheckpointInfo`] of a retained checkpoint |
//! | `S` chunk | leaf hashes `2048·chunk ..` of the snapshot checkpoint |
//! | `J` seq part | leaves changed by checkpoint `seq` (after the snapshot) |
//! | `Mn` | current number of pages |
//! | `Ml` | latest checkpoint |
//! | `Ms` | snapshot checkpoint and its page count |
//!
//! Indices and sequence numbers are big-endian so keys sort numerically.
//!
//! **Copy-on-write.** The first write to a page after the latest checkpoint
//! `L` saves the old bytes under `C L idx`, in the same batch as the write. So
//! the value of page `p` at a retained checkpoint `c` is the `C s p` entry of
//! the smallest retained `s >= c` that has one, else the current page: a page
//! with no saved copy at `c..` has not been written since `c`. The same rule,
//! kept in memory, gives the Merkle nodes of older checkpoints. The `C L *`
//! entries are also exactly the pages dirtied since `L`, so the dirty set
//! survives a crash without being stored separately.
//!
//! **Checkpoint.** Leaf hashes of written pages are computed when they are
//! written, so a checkpoint reads no page: it updates the in-memory tree
//! (`O(dirty × depth)` hashes) and commits, in one sled batch, the checkpoint
//! record, the changed leaves as one journal entry (written sequentially,
//! however scattered the pages), and the release of checkpoints beyond the
//! bound; then it flushes. A crash leaves the old or the new checkpoint,
//! never a mix. When the journal outgrows the leaf snapshot, the snapshot is
//! rewritten and the journal dropped, in one batch: amortised over the
//! checkpoints that grew the journal, `O(dirty)` each.
//!
//! **Release.** Dropping the oldest checkpoint deletes only its record; its
//! saved copies are unreachable from then on and are deleted a few at a time
//! by later writes (and found again after a restart), keeping that work off
//! the checkpoint path.
//!
//! Opening reads the leaf snapshot and journal and rebuilds the inner nodes
//! (no page is rehashed), and the node versions of older checkpoints from
//! their saved pages.

use crate::merkle::{self, MerkleTree};
use crate::proto::{CheckpointInfo, PageData};
use crate::read_log::ReadLog;
use crate::PAGE_SIZE;
use sled::IVec;
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::hash::{BuildHasherDefault, Hasher};
use std::path::Path;
use std::sync::{Arc, OnceLock, RwLock, RwLockReadGuard, RwLockWriteGuard};
use zz_wire::{Digest, Seq};

const TAG_PAGE: u8 = b'P';
const TAG_COW: u8 = b'C';
const TAG_CKPT: u8 = b'K';
const TAG_SNAP: u8 = b'S';
const TAG_JOURNAL: u8 = b'J';
const META_NUM_PAGES: &[u8] = b"Mn";
const META_LATEST: &[u8] = b"Ml";
const META_SNAPSHOT: &[u8] = b"Ms";
const SLED_DIR: &str = "sled";
/// Leaves per snapshot chunk (64 KiB values, below sled's blob threshold).
const SNAP_CHUNK: usize = 2048;
/// Leaf updates per journal value (80 KiB).
const JOURNAL_PART: usize = 2048;
/// Garbage keys deleted per write batch, at least.
const GC_PER_WRITE: usize = 64;

static ZERO_PAGE: [u8; PAGE_SIZE] = [0; PAGE_SIZE];

fn key1(tag: u8, a: u64) -> [u8; 9] {
    let mut k = [0u8; 9];
    k[0] = tag;
    k[1..].copy_from_slice(&a.to_be_bytes());
    k
}

fn key2(tag: u8, a: u64, b: u64) -> [u8; 17] {
    let mut k = [0u8; 17];
    k[0] = tag;
    k[1..9].copy_from_slice(&a.to_be_bytes());
    k[9..].copy_from_slice(&b.to_be_bytes());
    k
}

fn journal_key(seq: Seq, part: u32) -> [u8; 13] {
    let mut k = [0u8; 13];
    k[0] = TAG_JOURNAL;
    k[1..9].copy_from_slice(&seq.to_be_bytes());
    k[9..].copy_from_slice(&part.to_be_bytes());
    k
}

/// A cheap multiplicative hasher for the in-memory maps keyed by page index
/// or tree position (keys come from the local executor, not from peers).
#[derive(Default, Clone, Copy)]
struct FastHasher(u64);

impl Hasher for FastHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.write_u64(u64::from(b));
        }
    }
    fn write_u32(&mut self, i: u32) {
        self.write_u64(u64::from(i));
    }
    fn write_u64(&mut self, i: u64) {
        self.0 = (self.0.rotate_left(5) ^ i).wrapping_mul(0x517c_c1b7_2722_0a95);
    }
}

type FastMap<K, V> = HashMap<K, V, BuildHasherDefault<FastHasher>>;

fn be_u64(bytes: &[u8]) -> Result<u64, StoreError> {
    let arr: [u8; 8] = bytes
        .try_into()
        .map_err(|_| StoreError::Corrupt("bad integer value".into()))?;
    Ok(u64::from_be_bytes(arr))
}

/// Errors from the page store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("storage error: {0}")]
    Sled(#[from] sled::Error),
    #[error("i/o error: {0}")]
    Io(#[from] std::io::Error),
    #[error("a page must be {PAGE_SIZE} bytes, got {0}")]
    PageSize(usize),
    #[error("page {index} is outside a state of {num_pages} pages")]
    PageOutOfRange { index: u64, num_pages: u64 },
    #[error("state of {0} pages exceeds the configured maximum")]
    TooLarge(u64),
    #[error("checkpoint {0} is not retained")]
    UnknownCheckpoint(Seq),
    #[error("checkpoint {seq} must be after the latest checkpoint {latest}")]
    NotMonotonic { seq: Seq, latest: Seq },
    #[error("the latest checkpoint {0} cannot be released")]
    ReleaseLatest(Seq),
    #[error("no checkpoint has been taken")]
    NoCheckpoint,
    #[error("state cannot shrink from {from} to {to} pages")]
    Shrink { from: u64, to: u64 },
    #[error(transparent)]
    Proof(#[from] merkle::ProofError),
    #[error("corrupt store: {0}")]
    Corrupt(String),
    #[error("store unusable after an earlier failure")]
    Poisoned,
}

/// Tuning of a [`PageStore`].
#[derive(Clone, Debug)]
pub struct StoreConfig {
    /// Checkpoints retained; taking one more releases the oldest. At least 1.
    pub max_checkpoints: usize,
    /// Largest state, in pages (guards against a stray huge index).
    pub max_pages: u64,
    /// sled page-cache size in bytes.
    pub cache_capacity: u64,
    /// A checkpoint served to a peer (see [`PageStore::touch`]) is not
    /// released until it has gone this long without a request: a peer
    /// recovering from it can finish even after newer checkpoints became
    /// stable and the bound was reached.
    pub serve_lease: std::time::Duration,
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            max_checkpoints: 4,
            max_pages: 1 << 28,
            cache_capacity: 256 << 20,
            serve_lease: std::time::Duration::from_secs(10),
        }
    }
}

/// A retained checkpoint and the old versions it needs.
#[derive(Debug)]
struct Ckpt {
    info: CheckpointInfo,
    /// Pages with a saved copy `C seq idx` (written after this checkpoint
    /// while it was the latest).
    pages: BTreeSet<u64>,
    /// Tree nodes as they were at this checkpoint, for nodes changed by the
    /// next checkpoint.
    nodes: NodeVersions,
}

/// Old tree nodes of a checkpoint. Recorded as a plain list while the next
/// checkpoint is taken (cheap), indexed on the first lookup: most
/// checkpoints are never served after a newer one exists.
#[derive(Debug, Default)]
struct NodeVersions {
    list: Vec<((u32, u64), Digest)>,
    index: OnceLock<FastMap<(u32, u64), Digest>>,
}

impl NodeVersions {
    fn new(list: Vec<((u32, u64), Digest)>) -> NodeVersions {
        NodeVersions {
            list,
            index: OnceLock::new(),
        }
    }

    fn get(&self, level: u32, idx: u64) -> Option<Digest> {
        if self.list.is_empty() {
            return None;
        }
        let index = self
            .index
            .get_or_init(|| self.list.iter().copied().collect());
        index.get(&(level, idx)).copied()
    }

    /// Adds the versions of a released newer checkpoint that this one lacks.
    fn absorb(&mut self, newer: NodeVersions) {
        let mut map = std::mem::take(&mut self.index)
            .into_inner()
            .unwrap_or_else(|| self.list.iter().copied().collect());
        for (k, v) in newer.list {
            map.entry(k).or_insert(v);
        }
        self.list = map.iter().map(|(k, v)| (*k, *v)).collect();
        self.index = OnceLock::from(map);
    }
}

impl Ckpt {
    fn new(info: CheckpointInfo) -> Ckpt {
        Ckpt {
            info,
            pages: BTreeSet::new(),
            nodes: NodeVersions::default(),
        }
    }
}

#[derive(Debug)]
struct State {
    num_pages: u64,
    /// The tree of the latest checkpoint (empty before the first).
    tree: MerkleTree,
    latest: Option<Seq>,
    ckpts: BTreeMap<Seq, Ckpt>,
    /// Leaf hashes of pages written since the latest checkpoint, computed at
    /// write time (missing after a restart: then read and hashed).
    pending: FastMap<u64, Digest>,
    /// Journal keys written since the leaf snapshot, and their total size.
    journal: Vec<[u8; 13]>,
    journal_bytes: u64,
    /// Saved-copy keys of released checkpoints, still to delete.
    garbage: Vec<[u8; 17]>,
    /// A checkpoint exempt from the `max_checkpoints` bound (the executor's
    /// stable one, which recovering peers fetch; see [`PageStore::pin`]).
    pinned: Option<Seq>,
    poisoned: bool,
}

impl State {
    fn latest_ckpt(&self) -> Option<&Ckpt> {
        self.latest.and_then(|s| self.ckpts.get(&s))
    }

    /// Whether page `idx` may differ from its leaf in the latest tree.
    fn is_dirty(&self, idx: u64) -> bool {
        idx >= self.tree.num_pages()
            || match self.latest_ckpt() {
                None => true,
                Some(c) => c.pages.contains(&idx),
            }
    }

    fn ckpt(&self, seq: Seq) -> Result<&Ckpt, StoreError> {
        self.ckpts
            .get(&seq)
            .ok_or(StoreError::UnknownCheckpoint(seq))
    }

    /// Node `(level, idx)` of checkpoint `seq`, which must be inside its shape.
    fn node_at(&self, seq: Seq, level: u32, idx: u64) -> Digest {
        for c in self.ckpts.range(seq..).map(|(_, c)| c) {
            if let Some(d) = c.nodes.get(level, idx) {
                return d;
            }
        }
        self.tree.node(level, idx)
    }
}

struct Inner {
    db: sled::Db,
    kv: sled::Tree,
    state: RwLock<State>,
    config: StoreConfig,
    /// When each checkpoint last served a peer (see [`PageStore::touch`]).
    leases: std::sync::Mutex<HashMap<Seq, std::time::Instant>>,
    /// Pages read since each recent checkpoint (see [`PageStore::reads_since`]).
    reads: std::sync::Mutex<ReadLog>,
    /// Where the time of the last checkpoint went (see
    /// [`PageStore::last_checkpoint_timing`]).
    timing: std::sync::Mutex<CheckpointTiming>,
}

/// Where the time of one [`PageStore::checkpoint`] went, in microseconds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CheckpointTiming {
    /// Leaf hashes of the dirty pages and the Merkle tree update.
    pub tree_us: u64,
    /// Writing the journal entry and checkpoint record (one sled batch) and
    /// releasing checkpoints beyond the bound.
    pub apply_us: u64,
    /// `sled::Db::flush`: everything written since the last flush, durable.
    pub flush_us: u64,
    /// Rewriting the leaf snapshot, when the journal outgrew it.
    pub compact_us: u64,
    /// Dirty pages the checkpoint covered.
    pub dirty_pages: u64,
}

/// Application pages with copy-on-write checkpoints. Cheap to clone (shared).
///
/// Safe to use from many threads: the executor writes and checkpoints while
/// a fetch server reads retained checkpoints.
#[derive(Clone)]
pub struct PageStore {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for PageStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PageStore").finish_non_exhaustive()
    }
}

fn page_from(value: Option<IVec>) -> Result<Vec<u8>, StoreError> {
    match value {
        None => Ok(vec![0; PAGE_SIZE]),
        Some(v) if v.is_empty() => Ok(vec![0; PAGE_SIZE]),
        Some(v) if v.len() == PAGE_SIZE => Ok(v.to_vec()),
        Some(v) => Err(StoreError::Corrupt(format!(
            "stored page of {} bytes",
            v.len()
        ))),
    }
}

fn leaf_of_value(idx: u64, value: Option<&IVec>) -> Result<Digest, StoreError> {
    match value {
        None => Ok(merkle::leaf_hash(idx, &ZERO_PAGE)),
        Some(v) if v.is_empty() => Ok(merkle::leaf_hash(idx, &ZERO_PAGE)),
        Some(v) if v.len() == PAGE_SIZE => Ok(merkle::leaf_hash(idx, v)),
        Some(v) => Err(StoreError::Corrupt(format!(
            "stored page of {} bytes",
            v.len()
        ))),
    }
}

impl PageStore {
    /// Opens (or creates) a store in directory `path`.
    pub fn open(path: impl AsRef<Path>, config: StoreConfig) -> Result<PageStore, StoreError> {
        let path = path.as_ref();
        std::fs::create_dir_all(path)?;
        let sled_config = sled::Config::new()
            .path(path.join(SLED_DIR))
            .cache_capacity(config.cache_capacity)
            .mode(sled::Mode::HighThroughput);
        // sled releases its file lock from a background thread after the
        // last handle is dropped, so reopening at once in the same process
        // (a restart, a test) can briefly find it held: retry for a while.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        let db = loop {
            match sled_config.open() {
                Err(sled::Error::Io(e))
                    if e.to_string().contains("could not acquire lock")
                        && std::time::Instant::now() < deadline =>
                {
                    std::thread::sleep(std::time::Duration::from_millis(10));
                }
                r => break r?,
            }
        };
        let kv = db.open_tree("statefetch")?;
        let state = load(&kv)?;
        let reads = ReadLog::new(state.latest);
        Ok(PageStore {
            inner: Arc::new(Inner {
                db,
                kv,
                state: RwLock::new(state),
                config: StoreConfig {
                    max_checkpoints: config.max_checkpoints.max(1),
                    ..config
                },
                leases: std::sync::Mutex::new(HashMap::new()),
                reads: std::sync::Mutex::new(reads),
                timing: std::sync::Mutex::new(CheckpointTiming::default()),
            }),
        })
    }

    /// Removes the store kept in directory `path` (nothing if there is
    /// none); other files in `path` stay. The store must not be open.
    pub fn destroy(path: impl AsRef<Path>) -> Result<(), StoreError> {
        match std::fs::remove_dir_all(path.as_ref().join(SLED_DIR)) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e.into()),
            _ => Ok(()),
        }
    }

    fn read_state(&self) -> Result<RwLockReadGuard<'_, State>, StoreError> {
        let st = self.inner.state.read().map_err(|_| StoreError::Poisoned)?;
        if st.poisoned {
            return Err(StoreError::Poisoned);
        }
        Ok(st)
    }

    fn write_state(&self) -> Result<RwLockWriteGuard<'_, State>, StoreError> {
        let st = self.inner.state.write().map_err(|_| StoreError::Poisoned)?;
        if st.poisoned {
            return Err(StoreError::Poisoned);
        }
        Ok(st)
    }

    /// Current number of pages.
    pub fn num_pages(&self) -> Result<u64, StoreError> {
        Ok(self.read_state()?.num_pages)
    }

    /// Pages written (or added) since the latest checkpoint.
    pub fn dirty_pages(&self) -> Result<u64, StoreError> {
        let st = self.read_state()?;
        let cow = st.latest_ckpt().map_or(0, |c| c.pages.len() as u64);
        Ok(cow + (st.num_pages - st.tree.num_pages()))
    }

    /// Grows the state to `num_pages`; new pages are zero.
    pub fn grow(&self, num_pages: u64) -> Result<(), StoreError> {
        let mut st = self.write_state()?;
        if num_pages < st.num_pages {
            return Err(StoreError::Shrink {
                from: st.num_pages,
                to: num_pages,
            });
        }
        if num_pages > self.inner.config.max_pages {
            return Err(StoreError::TooLarge(num_pages));
        }
        if num_pages > st.num_pages {
            self.inner
                .kv
                .insert(META_NUM_PAGES, &num_pages.to_be_bytes())?;
            st.num_pages = num_pages;
        }
        Ok(())
    }

    /// Reads the current contents of page `index`.
    pub fn read_page(&self, index: u64) -> Result<Vec<u8>, StoreError> {
        let st = self.read_state()?;
        if index >= st.num_pages {
            return Err(StoreError::PageOutOfRange {
                index,
                num_pages: st.num_pages,
            });
        }
        self.reads().record(index);
        page_from(self.inner.kv.get(key1(TAG_PAGE, index))?)
    }

    fn reads(&self) -> std::sync::MutexGuard<'_, ReadLog> {
        // The log is a hint: a panic elsewhere leaves it usable.
        self.inner.reads.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The pages of the current state read since checkpoint `seq`, in order
    /// of first read, at most `max`; `None` if not known that far back
    /// (this process did not take checkpoint `seq`, or the bounded log has
    /// dropped it). A hint for a recovering peer's prefetch, see [`ReadLog`].
    pub fn reads_since(&self, seq: Seq, max: usize) -> Option<Vec<u64>> {
        self.reads().since(seq, max)
    }

    /// Writes one page; an index past the end grows the state.
    pub fn write_page(&self, index: u64, data: &[u8]) -> Result<(), StoreError> {
        self.write_pages([(index, data)])
    }

    /// Writes several pages in one atomic batch (use large batches for bulk loads).
    pub fn write_pages<'a>(
        &self,
        pages: impl IntoIterator<Item = (u64, &'a [u8])>,
    ) -> Result<(), StoreError> {
        // Hash before taking the lock: the next checkpoint needs these leaves.
        let pages: Vec<(u64, &[u8], Digest)> = pages
            .into_iter()
            .map(|(idx, data)| {
                if data.len() != PAGE_SIZE {
                    return Err(StoreError::PageSize(data.len()));
                }
                let end = idx.checked_add(1).ok_or(StoreError::TooLarge(u64::MAX))?;
                if end > self.inner.config.max_pages {
                    return Err(StoreError::TooLarge(end));
                }
                Ok((idx, data, merkle::leaf_hash(idx, data)))
            })
            .collect::<Result<_, _>>()?;
        let mut st = self.write_state()?;
        let n_latest = st.tree.num_pages();
        let latest = st.latest;
        let mut batch = sled::Batch::default();
        let mut saved: HashSet<u64> = HashSet::new();
        let mut new_n = st.num_pages;
        for &(idx, data, _) in &pages {
            if let Some(seq) = latest {
                let first_write = st.ckpts.get(&seq).is_some_and(|c| !c.pages.contains(&idx));
                if idx < n_latest && first_write && !saved.contains(&idx) {
                    // Copy-on-write: keep the checkpoint's version, atomically
                    // with the overwrite.
                    let old = self.inner.kv.get(key1(TAG_PAGE, idx))?.unwrap_or_default();
                    batch.insert(&key2(TAG_COW, seq, idx)[..], old);
                    saved.insert(idx);
                }
            }
            batch.insert(&key1(TAG_PAGE, idx)[..], data);
            new_n = new_n.max(idx + 1);
        }
        if new_n != st.num_pages {
            batch.insert(META_NUM_PAGES, &new_n.to_be_bytes());
        }
        // Pay off some deferred deletions of released saved copies.
        let gc = st.garbage.len().min(GC_PER_WRITE.max(2 * pages.len()));
        let gc_from = st.garbage.len() - gc;
        for key in &st.garbage[gc_from..] {
            batch.remove(&key[..]);
        }
        self.inner.kv.apply_batch(batch)?;
        st.garbage.truncate(gc_from);
        st.num_pages = new_n;
        if let Some(seq) = latest {
            if let Some(c) = st.ckpts.get_mut(&seq) {
                c.pages.extend(saved);
            }
        }
        for (idx, _, leaf) in pages {
            st.pending.insert(idx, leaf);
        }
        Ok(())
    }

    /// Takes checkpoint `seq` of the current pages and returns its root.
    ///
    /// Cost is proportional to the pages dirtied since the previous
    /// checkpoint times the tree depth; no page is read. The checkpoint is
    /// durable when this returns. Retaining more than `max_checkpoints`
    /// releases the oldest.
    pub fn checkpoint(&self, seq: Seq) -> Result<Digest, StoreError> {
        let started = std::time::Instant::now();
        let tree_done;
        let dirty_pages;
        let mut release_after = Vec::new();
        let root = {
            let mut st = self.write_state()?;
            if let Some(latest) = st.latest {
                if seq <= latest {
                    return Err(StoreError::NotMonotonic { seq, latest });
                }
            }
            let n = st.num_pages;
            let n_latest = st.tree.num_pages();
            let mut dirty: Vec<u64> = st
                .latest_ckpt()
                .map(|c| c.pages.iter().copied().collect())
                .unwrap_or_default();
            dirty.extend(n_latest..n);
            let leaves = self.leaves_of_current(&st, &dirty)?;
            dirty_pages = leaves.len() as u64;

            // Update the tree in place, keeping the old value of every changed
            // node: that is the previous checkpoint's copy-on-write version.
            let mut overlay: Vec<((u32, u64), Digest)> = Vec::new();
            let mut tree = std::mem::take(&mut st.tree);
            let updated = tree.update(n, &leaves, |l, i, old| {
                if let Some(old) = old {
                    overlay.push(((l, i), old));
                }
            });
            let info = CheckpointInfo {
                seq,
                root: tree.root(),
                num_pages: n,
            };
            st.tree = tree;
            tree_done = std::time::Instant::now();
            if let Err(e) = updated {
                st.poisoned = true;
                return Err(StoreError::Corrupt(format!("tree update: {e}")));
            }
            let mut batch = sled::Batch::default();
            // The changed leaves, as a journal entry of this checkpoint.
            let mut journal = Vec::new();
            for (part, chunk) in leaves.chunks(JOURNAL_PART).enumerate() {
                let key = journal_key(seq, part as u32);
                let mut value = Vec::with_capacity(chunk.len() * 40);
                for (idx, leaf) in chunk {
                    value.extend_from_slice(&idx.to_be_bytes());
                    value.extend_from_slice(&leaf.0);
                }
                journal.push((key, value.len() as u64));
                batch.insert(&key[..], value);
            }
            batch.insert(&key1(TAG_CKPT, seq)[..], zz_wire::codec::encode(&info));
            batch.insert(META_LATEST, &seq.to_be_bytes());
            // Release the oldest checkpoints beyond the bound in the same
            // batch; their saved copies become garbage, deleted later.
            // The pinned checkpoint does not count and is never released;
            // checkpoints newer than it are released afterwards (their
            // saved copies move to the next older one, see `release`).
            // Leased checkpoints (serving a recovering peer) likewise.
            let protected: Vec<Seq> = st
                .ckpts
                .keys()
                .filter(|s| st.pinned == Some(**s) || self.leased(**s))
                .copied()
                .collect();
            let unprotected = st.ckpts.len() - protected.len();
            let excess = (unprotected + 1).saturating_sub(self.inner.config.max_checkpoints);
            let evict: Vec<Seq> = st
                .ckpts
                .keys()
                .filter(|s| !protected.contains(s))
                .take(excess)
                .copied()
                .collect();
            let oldest_protected = protected.first().copied();
            let (released, later): (Vec<Seq>, Vec<Seq>) = evict
                .into_iter()
                .partition(|s| oldest_protected.is_none_or(|p| *s < p));
            release_after.extend(later);
            for s in &released {
                batch.remove(&key1(TAG_CKPT, *s)[..]);
            }
            if let Err(e) = self.inner.kv.apply_batch(batch) {
                // The in-memory tree is ahead of disk now: refuse further use
                // rather than serve a tree that storage does not back.
                st.poisoned = true;
                return Err(e.into());
            }
            for (key, len) in journal {
                st.journal.push(key);
                st.journal_bytes += len;
            }
            if let Some(prev) = st.latest {
                if let Some(c) = st.ckpts.get_mut(&prev) {
                    c.nodes = NodeVersions::new(overlay);
                }
            }
            st.ckpts.insert(seq, Ckpt::new(info));
            st.latest = Some(seq);
            st.pending.clear();
            self.reads().checkpoint(seq);
            for s in released {
                if let Some(c) = st.ckpts.remove(&s) {
                    st.garbage
                        .extend(c.pages.iter().map(|&p| key2(TAG_COW, s, p)));
                }
            }
            info.root
        };
        for s in release_after {
            self.release(s)?;
        }
        let applied = std::time::Instant::now();
        // Flush outside the lock: readers need not wait for the disk. The
        // caller may only announce the checkpoint after this returns.
        self.inner.db.flush()?;
        let flushed = std::time::Instant::now();
        self.maybe_compact()?;
        let us = |d: std::time::Duration| d.as_micros() as u64;
        if let Ok(mut t) = self.inner.timing.lock() {
            *t = CheckpointTiming {
                tree_us: us(tree_done - started),
                apply_us: us(applied - tree_done),
                flush_us: us(flushed - applied),
                compact_us: us(flushed.elapsed()),
                dirty_pages,
            };
        }
        Ok(root)
    }

    /// Rewrites the leaf snapshot from the latest tree and drops the journal,
    /// once the journal is larger than the snapshot (so each journal byte is
    /// rewritten about once: amortised `O(dirty)` per checkpoint). Not needed
    /// for durability, so not flushed here.
    fn maybe_compact(&self) -> Result<(), StoreError> {
        let mut st = self.write_state()?;
        let snapshot_bytes = st.tree.num_pages() * 32;
        if st.journal_bytes <= snapshot_bytes.max(64 << 10) {
            return Ok(());
        }
        let Some(latest) = st.latest else {
            return Ok(());
        };
        let mut batch = sled::Batch::default();
        let leaves = st.tree.leaves();
        let chunks = leaves.len().div_ceil(SNAP_CHUNK);
        for (c, chunk) in leaves.chunks(SNAP_CHUNK).enumerate() {
            let value: Vec<u8> = chunk.iter().flat_map(|d| d.0).collect();
            batch.insert(&key1(TAG_SNAP, c as u64)[..], value);
        }
        // Chunks of a larger old snapshot cannot exist: states only grow.
        let mut meta = [0u8; 16];
        meta[..8].copy_from_slice(&latest.to_be_bytes());
        meta[8..].copy_from_slice(&(leaves.len() as u64).to_be_bytes());
        batch.insert(META_SNAPSHOT, &meta[..]);
        for key in &st.journal {
            batch.remove(&key[..]);
        }
        self.inner.kv.apply_batch(batch)?;
        tracing::debug!(
            chunks,
            "statefetch: leaf snapshot rewritten at checkpoint {latest}"
        );
        st.journal.clear();
        st.journal_bytes = 0;
        Ok(())
    }

    /// Leaf hashes of the current versions of dirty pages `indices` (sorted):
    /// from `pending` where known, else read and hashed (in parallel when
    /// there are many, as after a restart).
    fn leaves_of_current(
        &self,
        st: &State,
        indices: &[u64],
    ) -> Result<Vec<(u64, Digest)>, StoreError> {
        let kv = &self.inner.kv;
        let work = |part: &[u64]| -> Result<Vec<(u64, Digest)>, StoreError> {
            part.iter()
                .map(|&i| match st.pending.get(&i) {
                    Some(d) => Ok((i, *d)),
                    None => Ok((i, leaf_of_value(i, kv.get(key1(TAG_PAGE, i))?.as_ref())?)),
                })
                .collect()
        };
        let unknown = indices
            .iter()
            .filter(|i| !st.pending.contains_key(i))
            .count();
        let threads = std::thread::available_parallelism()
            .map_or(1, |n| n.get())
            .min(8);
        if unknown < 4096 || threads < 2 {
            return work(indices);
        }
        let chunk = indices.len().div_ceil(threads);
        let parts: Vec<Result<Vec<(u64, Digest)>, StoreError>> = std::thread::scope(|s| {
            let handles: Vec<_> = indices
                .chunks(chunk)
                .map(|part| s.spawn(move || work(part)))
                .collect();
            handles
                .into_iter()
                .map(|h| {
                    h.join()
                        .unwrap_or_else(|_| Err(StoreError::Corrupt("hash thread panicked".into())))
                })
                .collect()
        });
        let mut out = Vec::with_capacity(indices.len());
        for p in parts {
            out.extend(p?);
        }
        Ok(out)
    }

    /// Retained checkpoints, oldest first.
    pub fn checkpoints(&self) -> Result<Vec<CheckpointInfo>, StoreError> {
        Ok(self.read_state()?.ckpts.values().map(|c| c.info).collect())
    }

    /// A retained checkpoint.
    pub fn checkpoint_info(&self, seq: Seq) -> Result<CheckpointInfo, StoreError> {
        Ok(self.read_state()?.ckpt(seq)?.info)
    }

    /// Where the time of the last completed [`PageStore::checkpoint`] went.
    pub fn last_checkpoint_timing(&self) -> CheckpointTiming {
        self.inner.timing.lock().map(|t| *t).unwrap_or_default()
    }

    /// The latest checkpoint, if any.
    pub fn latest_checkpoint(&self) -> Result<Option<CheckpointInfo>, StoreError> {
        Ok(self.read_state()?.latest_ckpt().map(|c| c.info))
    }

    /// Releases checkpoint `seq` (not the latest). Its saved versions are
    /// handed to the previous retained checkpoint where it still needs them.
    pub fn release(&self, seq: Seq) -> Result<(), StoreError> {
        let mut st = self.write_state()?;
        if st.latest == Some(seq) {
            return Err(StoreError::ReleaseLatest(seq));
        }
        let Some(ck) = st.ckpts.get(&seq) else {
            return Ok(());
        };
        let Some(prev) = st.ckpts.range(..seq).next_back().map(|(s, _)| *s) else {
            // The oldest: nothing older needs its copies; delete them later.
            self.inner.kv.remove(key1(TAG_CKPT, seq))?;
            let ck = st.ckpts.remove(&seq).expect("checked above");
            st.garbage
                .extend(ck.pages.iter().map(|&p| key2(TAG_COW, seq, p)));
            return Ok(());
        };
        let mut batch = sled::Batch::default();
        batch.remove(&key1(TAG_CKPT, seq)[..]);
        let mut moved = Vec::new();
        for &p in &ck.pages {
            let key = key2(TAG_COW, seq, p);
            let pc = &st.ckpts[&prev];
            if p < pc.info.num_pages && !pc.pages.contains(&p) {
                // The value at `prev` was this saved copy (page unchanged
                // between prev and seq), so prev must now keep it. (A page
                // that did not exist at `prev` needs no copy there.)
                let v = self.inner.kv.get(key)?.unwrap_or_default();
                batch.insert(&key2(TAG_COW, prev, p)[..], v);
                moved.push(p);
            }
            batch.remove(&key[..]);
        }
        self.inner.kv.apply_batch(batch)?;
        let ck = st.ckpts.remove(&seq).expect("checked above");
        let pc = st.ckpts.get_mut(&prev).expect("checked above");
        pc.pages.extend(moved);
        pc.nodes.absorb(ck.nodes);
        Ok(())
    }

    /// Exempts checkpoint `seq` (taken or still to be taken) from the
    /// `max_checkpoints` bound until another is pinned: an executor pins its
    /// latest stable checkpoint, the one a recovering peer is told to fetch,
    /// however many newer ones it takes while no newer one becomes stable.
    /// Not persistent: pin again after opening.
    ///
    /// The checkpoint pinned before stays for [`StoreConfig::serve_lease`]
    /// as if it had just served a peer: a replica woken a moment before a
    /// newer checkpoint became stable was told to fetch the older one, and
    /// its first request may arrive after the pin moved on.
    pub fn pin(&self, seq: Option<Seq>) -> Result<(), StoreError> {
        let before = std::mem::replace(&mut self.write_state()?.pinned, seq);
        if let (Some(old), Some(new)) = (before, seq) {
            if old != new {
                self.touch(old);
            }
        }
        Ok(())
    }

    /// Notes that checkpoint `seq` just served a peer: it is kept for
    /// [`StoreConfig::serve_lease`] more (the fetch server calls this).
    pub fn touch(&self, seq: Seq) {
        let mut leases = self.inner.leases.lock().unwrap_or_else(|e| e.into_inner());
        let lease = self.inner.config.serve_lease;
        leases.retain(|_, t| t.elapsed() < lease);
        leases.insert(seq, std::time::Instant::now());
    }

    fn leased(&self, seq: Seq) -> bool {
        let leases = self.inner.leases.lock().unwrap_or_else(|e| e.into_inner());
        leases
            .get(&seq)
            .is_some_and(|t| t.elapsed() < self.inner.config.serve_lease)
    }

    /// Releases every retained checkpoint before `seq` (except the latest,
    /// and those a peer fetched from within the lease).
    pub fn release_before(&self, seq: Seq) -> Result<(), StoreError> {
        let old: Vec<Seq> = {
            let st = self.read_state()?;
            st.ckpts
                .range(..seq)
                .map(|(s, _)| *s)
                .filter(|s| Some(*s) != st.latest && !self.leased(*s))
                .collect()
        };
        for s in old {
            self.release(s)?;
        }
        Ok(())
    }

    /// Reverts the current pages to the latest checkpoint (e.g. after a
    /// restart, before replaying the ordered log from there).
    pub fn rollback_to_latest(&self) -> Result<(), StoreError> {
        let mut st = self.write_state()?;
        let latest = st.latest.ok_or(StoreError::NoCheckpoint)?;
        let n_latest = st.tree.num_pages();
        let mut batch = sled::Batch::default();
        for &p in &st.ckpts[&latest].pages {
            let key = key2(TAG_COW, latest, p);
            match self.inner.kv.get(key)? {
                Some(v) if !v.is_empty() => batch.insert(&key1(TAG_PAGE, p)[..], v),
                _ => batch.remove(&key1(TAG_PAGE, p)[..]),
            }
            batch.remove(&key[..]);
        }
        for kv in self
            .inner
            .kv
            .range(key1(TAG_PAGE, n_latest)..=key1(TAG_PAGE, u64::MAX))
        {
            batch.remove(kv?.0);
        }
        if st.num_pages != n_latest {
            batch.insert(META_NUM_PAGES, &n_latest.to_be_bytes());
        }
        self.inner.kv.apply_batch(batch)?;
        st.num_pages = n_latest;
        st.pending.clear();
        if let Some(c) = st.ckpts.get_mut(&latest) {
            c.pages.clear();
        }
        Ok(())
    }

    fn page_at(&self, st: &State, seq: Seq, idx: u64) -> Result<Vec<u8>, StoreError> {
        let ck = st.ckpt(seq)?;
        if idx >= ck.info.num_pages {
            return Err(StoreError::PageOutOfRange {
                index: idx,
                num_pages: ck.info.num_pages,
            });
        }
        for (s, c) in st.ckpts.range(seq..) {
            if c.pages.contains(&idx) {
                return page_from(self.inner.kv.get(key2(TAG_COW, *s, idx))?);
            }
        }
        page_from(self.inner.kv.get(key1(TAG_PAGE, idx))?)
    }

    /// Page `index` as it was at retained checkpoint `seq`.
    pub fn read_page_at(&self, seq: Seq, index: u64) -> Result<Vec<u8>, StoreError> {
        let st = self.read_state()?;
        self.page_at(&st, seq, index)
    }

    /// Pages of checkpoint `seq`, each with its Merkle proof if asked.
    pub fn read_pages_at(
        &self,
        seq: Seq,
        indices: &[u64],
        with_proofs: bool,
    ) -> Result<(CheckpointInfo, Vec<PageData>), StoreError> {
        let st = self.read_state()?;
        let info = st.ckpt(seq)?.info;
        let mut out = Vec::with_capacity(indices.len());
        for &index in indices {
            let data = self.page_at(&st, seq, index)?;
            let proof = if with_proofs {
                let get = |l, i| st.node_at(seq, l, i);
                Some(merkle::prove_range(get, info.num_pages, 0, index, 1)?)
            } else {
                None
            };
            out.push(PageData { index, data, proof });
        }
        Ok((info, out))
    }

    /// Nodes `[start, start+count)` of `level` of checkpoint `seq`, with the
    /// sibling hashes proving them against its root.
    pub fn node_range(
        &self,
        seq: Seq,
        level: u32,
        start: u64,
        count: u64,
    ) -> Result<(CheckpointInfo, Vec<Digest>, Vec<Digest>), StoreError> {
        let st = self.read_state()?;
        let info = st.ckpt(seq)?.info;
        merkle::check_range(info.num_pages, level, start, count)?;
        let nodes = (start..start + count)
            .map(|i| st.node_at(seq, level, i))
            .collect();
        let get = |l, i| st.node_at(seq, l, i);
        let siblings = merkle::prove_range(get, info.num_pages, level, start, count)?;
        Ok((info, nodes, siblings))
    }

    /// Leaf hashes of the current pages `[start, end)`: from the latest tree
    /// for pages unchanged since, from write-time hashes or hashed otherwise.
    pub fn current_leaves(&self, start: u64, end: u64) -> Result<Vec<Digest>, StoreError> {
        let st = self.read_state()?;
        if end > st.num_pages || start > end {
            return Err(StoreError::PageOutOfRange {
                index: end,
                num_pages: st.num_pages,
            });
        }
        (start..end)
            .map(|i| {
                if !st.is_dirty(i) {
                    Ok(st.tree.node(0, i))
                } else if let Some(d) = st.pending.get(&i) {
                    Ok(*d)
                } else {
                    leaf_of_value(i, self.inner.kv.get(key1(TAG_PAGE, i))?.as_ref())
                }
            })
            .collect()
    }

    /// Node `(level, idx)` of the latest tree, if no page under it changed
    /// since (so it also describes the current pages); `None` otherwise.
    pub fn clean_node(&self, level: u32, idx: u64) -> Result<Option<Digest>, StoreError> {
        let st = self.read_state()?;
        let Some(ck) = st.latest_ckpt() else {
            return Ok(None);
        };
        let n_latest = st.tree.num_pages();
        if level > st.tree.depth() || level >= 64 {
            return Ok(None);
        }
        let a = idx.checked_shl(level).unwrap_or(u64::MAX);
        let b = (idx + 1).checked_shl(level).unwrap_or(u64::MAX);
        if a >= n_latest || (b > n_latest && st.num_pages > n_latest) {
            return Ok(None);
        }
        if ck.pages.range(a..b).next().is_some() {
            return Ok(None);
        }
        Ok(Some(st.tree.node(level, idx)))
    }

    /// Writes everything to disk.
    pub fn flush(&self) -> Result<(), StoreError> {
        self.inner.db.flush()?;
        Ok(())
    }

    /// Full consistency check (reads and hashes everything; for tests and
    /// repair tools): every retained checkpoint's pages hash to its root, and
    /// the leaf file and in-memory tree match the latest checkpoint's pages.
    pub fn verify_integrity(&self) -> Result<(), StoreError> {
        let st = self.read_state()?;
        for (&seq, ck) in &st.ckpts {
            let pages: Vec<Vec<u8>> = (0..ck.info.num_pages)
                .map(|i| self.page_at(&st, seq, i))
                .collect::<Result<_, _>>()?;
            let tree = MerkleTree::from_pages(&pages);
            if tree.root() != ck.info.root {
                return Err(StoreError::Corrupt(format!(
                    "checkpoint {seq}: pages hash to {}, recorded root {}",
                    tree.root(),
                    ck.info.root
                )));
            }
            if Some(seq) == st.latest && tree != st.tree {
                return Err(StoreError::Corrupt(
                    "in-memory tree differs from pages".into(),
                ));
            }
        }
        let stored = match st.latest {
            None => Vec::new(),
            Some(_) => load_leaves(&self.inner.kv, st.tree.num_pages())?.leaves,
        };
        if stored != st.tree.leaves() {
            return Err(StoreError::Corrupt(
                "stored leaves differ from the tree".into(),
            ));
        }
        for (&i, d) in &st.pending {
            if *d != leaf_of_value(i, self.inner.kv.get(key1(TAG_PAGE, i))?.as_ref())? {
                return Err(StoreError::Corrupt(format!(
                    "write-time hash of page {i} is stale"
                )));
            }
        }
        Ok(())
    }
}

/// The stored leaves of the latest checkpoint, and the journal behind them.
struct StoredLeaves {
    leaves: Vec<Digest>,
    journal: Vec<[u8; 13]>,
    journal_bytes: u64,
}

/// The latest checkpoint's `n` leaves: the snapshot with the journal
/// applied in checkpoint order.
fn load_leaves(kv: &sled::Tree, n: u64) -> Result<StoredLeaves, StoreError> {
    let corrupt = |what: &str| StoreError::Corrupt(format!("leaf {what}"));
    let (snap_seq, snap_n) = match kv.get(META_SNAPSHOT)? {
        None => (None, 0),
        Some(v) if v.len() == 16 => (Some(be_u64(&v[..8])?), be_u64(&v[8..])?),
        Some(_) => return Err(corrupt("snapshot marker")),
    };
    if snap_n > n {
        return Err(corrupt("snapshot larger than the checkpoint"));
    }
    let mut leaves = Vec::with_capacity(n as usize);
    for item in kv.scan_prefix([TAG_SNAP]) {
        let (k, v) = item?;
        let expected_len =
            (snap_n as usize - leaves.len().min(snap_n as usize)).min(SNAP_CHUNK) * 32;
        if k.len() != 9 || be_u64(&k[1..])? * SNAP_CHUNK as u64 != leaves.len() as u64 {
            return Err(corrupt("snapshot chunks out of order"));
        }
        if leaves.len() as u64 >= snap_n {
            break; // chunks past the snapshot size are never written
        }
        if v.len() != expected_len {
            return Err(corrupt("snapshot chunk size"));
        }
        leaves.extend(
            v.chunks_exact(32)
                .map(|c| Digest(c.try_into().expect("32 bytes"))),
        );
    }
    if leaves.len() as u64 != snap_n {
        return Err(corrupt("snapshot incomplete"));
    }
    let mut keys = Vec::new();
    let mut bytes = 0;
    for item in kv.scan_prefix([TAG_JOURNAL]) {
        let (k, v) = item?;
        let key: [u8; 13] = k.as_ref().try_into().map_err(|_| corrupt("journal key"))?;
        let seq = be_u64(&key[1..9])?;
        if snap_seq.is_some_and(|s| seq <= s) {
            return Err(corrupt("journal entry older than the snapshot"));
        }
        if v.len() % 40 != 0 {
            return Err(corrupt("journal entry size"));
        }
        for e in v.chunks_exact(40) {
            let idx = be_u64(&e[..8])?;
            let leaf = Digest(e[8..].try_into().expect("32 bytes"));
            match idx.cmp(&(leaves.len() as u64)) {
                std::cmp::Ordering::Less => leaves[idx as usize] = leaf,
                std::cmp::Ordering::Equal => leaves.push(leaf),
                // New pages are journaled in order, so the state grows one
                // page at a time.
                std::cmp::Ordering::Greater => return Err(corrupt("journal skips pages")),
            }
        }
        keys.push(key);
        bytes += v.len() as u64;
    }
    if leaves.len() as u64 != n {
        return Err(corrupt("count differs from the latest checkpoint"));
    }
    Ok(StoredLeaves {
        leaves,
        journal: keys,
        journal_bytes: bytes,
    })
}

/// Rebuilds the in-memory state from sled.
fn load(kv: &sled::Tree) -> Result<State, StoreError> {
    let num_pages = kv
        .get(META_NUM_PAGES)?
        .map(|v| be_u64(&v))
        .transpose()?
        .unwrap_or(0);
    let latest = kv.get(META_LATEST)?.map(|v| be_u64(&v)).transpose()?;
    let mut ckpts = BTreeMap::new();
    for item in kv.scan_prefix([TAG_CKPT]) {
        let (k, v) = item?;
        let info: CheckpointInfo = zz_wire::codec::decode(&v)
            .map_err(|e| StoreError::Corrupt(format!("checkpoint record: {e}")))?;
        if k.len() != 9 || be_u64(&k[1..])? != info.seq {
            return Err(StoreError::Corrupt("checkpoint key/record mismatch".into()));
        }
        ckpts.insert(info.seq, Ckpt::new(info));
    }
    if latest != ckpts.keys().next_back().copied() {
        return Err(StoreError::Corrupt(
            "latest checkpoint marker mismatch".into(),
        ));
    }
    let mut garbage = Vec::new();
    for item in kv.scan_prefix([TAG_COW]) {
        let (k, _) = item?;
        let key: [u8; 17] = k
            .as_ref()
            .try_into()
            .map_err(|_| StoreError::Corrupt("bad saved-page key".into()))?;
        let (seq, idx) = (be_u64(&key[1..9])?, be_u64(&key[9..])?);
        match ckpts.get_mut(&seq) {
            // A released checkpoint's copy, not yet deleted.
            None => garbage.push(key),
            Some(ck) if idx >= ck.info.num_pages => {
                return Err(StoreError::Corrupt(
                    "saved page outside its checkpoint".into(),
                ))
            }
            Some(ck) => {
                ck.pages.insert(idx);
            }
        }
    }

    let (tree, journal, journal_bytes) = match latest {
        None => (MerkleTree::new(), Vec::new(), 0),
        Some(seq) => {
            let ck = &ckpts[&seq];
            let n = ck.info.num_pages;
            if num_pages < n {
                return Err(StoreError::Corrupt(
                    "state smaller than its checkpoint".into(),
                ));
            }
            let StoredLeaves {
                leaves,
                journal,
                journal_bytes,
            } = load_leaves(kv, n)?;
            // Inner nodes are rebuilt from the leaves: 64-byte hashes only.
            let tree = MerkleTree::from_leaves(leaves);
            if tree.root() != ck.info.root {
                return Err(StoreError::Corrupt(format!(
                    "checkpoint {seq} root mismatch"
                )));
            }
            (tree, journal, journal_bytes)
        }
    };

    // Node versions of older checkpoints: rebuild each from the next newer
    // one, patched with the leaves of its saved pages, and keep the nodes
    // that differ.
    let seqs: Vec<Seq> = ckpts.keys().rev().copied().collect();
    let mut newer: Option<MerkleTree> = None;
    for &seq in seqs.iter().skip(1) {
        let next = newer.as_ref().unwrap_or(&tree);
        let ck = &ckpts[&seq];
        let n = ck.info.num_pages;
        if n > next.num_pages() {
            return Err(StoreError::Corrupt("checkpoint sizes decrease".into()));
        }
        let mut leaves = next.leaves()[..n as usize].to_vec();
        for &p in &ck.pages {
            leaves[p as usize] = leaf_of_value(p, kv.get(key2(TAG_COW, seq, p))?.as_ref())?;
        }
        let old = MerkleTree::from_leaves(leaves);
        if old.root() != ck.info.root {
            return Err(StoreError::Corrupt(format!(
                "checkpoint {seq} root mismatch"
            )));
        }
        let mut nodes = Vec::new();
        for l in 0..=old.depth() {
            for i in 0..merkle::level_len(l, n) {
                let v = old.node(l, i);
                if v != next.node(l, i) {
                    nodes.push(((l, i), v));
                }
            }
        }
        ckpts.get_mut(&seq).expect("present").nodes = NodeVersions::new(nodes);
        newer = Some(old);
    }
    Ok(State {
        num_pages,
        tree,
        latest,
        ckpts,
        pending: FastMap::default(),
        journal,
        journal_bytes,
        garbage,
        pinned: None,
        poisoned: false,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn page(v: u64) -> Vec<u8> {
        let mut p = vec![(v % 251) as u8; PAGE_SIZE];
        p[..8].copy_from_slice(&v.to_le_bytes());
        p
    }

    fn open(dir: &Path, max: usize) -> PageStore {
        PageStore::open(
            dir,
            StoreConfig {
                max_checkpoints: max,
                ..Default::default()
            },
        )
        .unwrap()
    }

    #[test]
    fn write_read_grow_and_zero_pages() {
        let dir = tempfile::tempdir().unwrap();
        let s = open(dir.path(), 4);
        assert_eq!(s.num_pages().unwrap(), 0);
        s.write_page(3, &page(7)).unwrap();
        assert_eq!(s.num_pages().unwrap(), 4);
        assert_eq!(s.read_page(0).unwrap(), vec![0; PAGE_SIZE]);
        assert_eq!(s.read_page(3).unwrap(), page(7));
        assert!(matches!(
            s.read_page(4),
            Err(StoreError::PageOutOfRange { .. })
        ));
        assert!(matches!(
            s.write_page(1, &[0; 10]),
            Err(StoreError::PageSize(10))
        ));
        s.grow(10).unwrap();
        assert!(matches!(s.grow(5), Err(StoreError::Shrink { .. })));
        assert_eq!(s.read_page(9).unwrap(), vec![0; PAGE_SIZE]);
    }

    #[test]
    fn a_pinned_checkpoint_outlives_the_bound() {
        let dir = tempfile::tempdir().unwrap();
        let s = open(dir.path(), 2);
        // Page 0 gets version v at checkpoint v; page 1 changes only at 1 and 4.
        s.write_page(1, &page(100)).unwrap();
        s.pin(Some(1)).unwrap();
        for v in 1..=5 {
            s.write_page(0, &page(v)).unwrap();
            if v == 4 {
                s.write_page(1, &page(104)).unwrap();
            }
            s.checkpoint(v).unwrap();
        }
        // Bound 2 (not counting the pinned one): 1 pinned, 4 and 5 kept.
        assert_eq!(s.read_page_at(1, 0).unwrap(), page(1));
        assert_eq!(s.read_page_at(1, 1).unwrap(), page(100));
        assert_eq!(s.read_page_at(4, 0).unwrap(), page(4));
        assert_eq!(s.read_page_at(4, 1).unwrap(), page(104));
        assert_eq!(s.read_page_at(5, 0).unwrap(), page(5));
        for gone in [2, 3] {
            assert!(matches!(
                s.read_page_at(gone, 0),
                Err(StoreError::UnknownCheckpoint(_))
            ));
        }
        // The pinned checkpoint's root still matches its pages.
        let at1: Vec<Vec<u8>> = (0..2).map(|i| s.read_page_at(1, i).unwrap()).collect();
        assert_eq!(
            s.checkpoint_info(1).unwrap().root,
            MerkleTree::from_pages(&at1).root()
        );
        // Unpinned, it is released by the next checkpoint like any other.
        s.pin(None).unwrap();
        s.checkpoint(6).unwrap();
        assert!(s.read_page_at(1, 0).is_err());
        assert_eq!(s.read_page_at(5, 0).unwrap(), page(5));
    }

    #[test]
    fn a_checkpoint_serving_a_peer_is_kept_for_the_lease() {
        let dir = tempfile::tempdir().unwrap();
        let lease = std::time::Duration::from_millis(300);
        let s = PageStore::open(
            dir.path(),
            StoreConfig {
                max_checkpoints: 2,
                serve_lease: lease,
                ..Default::default()
            },
        )
        .unwrap();
        s.write_page(0, &page(1)).unwrap();
        s.checkpoint(1).unwrap();
        // A recovering peer fetches checkpoint 1 ...
        s.touch(1);
        // ... while newer ones are taken and one becomes stable.
        for v in 2..=4 {
            s.write_page(0, &page(v)).unwrap();
            s.checkpoint(v).unwrap();
        }
        s.release_before(4).unwrap();
        assert_eq!(s.read_page_at(1, 0).unwrap(), page(1));
        assert!(s.read_page_at(2, 0).is_err(), "unleased ones go as usual");
        // Once the peer stops fetching, the next release lets it go.
        std::thread::sleep(lease + std::time::Duration::from_millis(50));
        s.release_before(4).unwrap();
        assert!(s.read_page_at(1, 0).is_err());
        assert_eq!(s.read_page_at(4, 0).unwrap(), page(4));
    }

    #[test]
    fn a_superseded_pinned_checkpoint_is_kept_for_the_lease() {
        let dir = tempfile::tempdir().unwrap();
        let lease = std::time::Duration::from_millis(300);
        let s = PageStore::open(
            dir.path(),
            StoreConfig {
                max_checkpoints: 2,
                serve_lease: lease,
                ..Default::default()
            },
        )
        .unwrap();
        s.write_page(0, &page(1)).unwrap();
        s.checkpoint(1).unwrap();
        // 1 is stable (a replica woken now is told to fetch it) ...
        s.pin(Some(1)).unwrap();
        s.release_before(1).unwrap();
        for v in 2..=3 {
            s.write_page(0, &page(v)).unwrap();
            s.checkpoint(v).unwrap();
        }
        // ... and 3 becomes stable a moment later: 1 stays for the lease.
        s.pin(Some(3)).unwrap();
        s.release_before(3).unwrap();
        assert_eq!(s.read_page_at(1, 0).unwrap(), page(1));
        assert!(s.read_page_at(2, 0).is_err(), "never pinned: released");
        std::thread::sleep(lease + std::time::Duration::from_millis(50));
        s.release_before(3).unwrap();
        assert!(s.read_page_at(1, 0).is_err());
    }

    #[test]
    fn checkpoints_keep_old_versions_until_released() {
        let dir = tempfile::tempdir().unwrap();
        let s = open(dir.path(), 8);
        s.write_pages(
            (0..5)
                .map(|i| (i, page(i)))
                .collect::<Vec<_>>()
                .iter()
                .map(|(i, p)| (*i, p.as_slice())),
        )
        .unwrap();
        let r1 = s.checkpoint(1).unwrap();
        assert_eq!(
            r1,
            MerkleTree::from_pages(&(0..5).map(page).collect::<Vec<_>>()).root()
        );
        s.write_page(2, &page(100)).unwrap();
        s.write_page(2, &page(101)).unwrap();
        s.write_page(6, &page(102)).unwrap();
        assert_eq!(s.read_page_at(1, 2).unwrap(), page(2));
        assert!(s.read_page_at(1, 6).is_err());
        let r2 = s.checkpoint(2).unwrap();
        s.write_page(2, &page(200)).unwrap();
        s.write_page(0, &page(201)).unwrap();
        let r3 = s.checkpoint(3).unwrap();
        assert_eq!(s.read_page_at(1, 2).unwrap(), page(2));
        assert_eq!(s.read_page_at(2, 2).unwrap(), page(101));
        assert_eq!(s.read_page_at(2, 0).unwrap(), page(0));
        assert_eq!(s.read_page_at(3, 2).unwrap(), page(200));
        s.verify_integrity().unwrap();
        // Release the middle one: checkpoint 1 must still read correctly.
        s.release(2).unwrap();
        assert_eq!(s.read_page_at(1, 2).unwrap(), page(2));
        assert_eq!(s.read_page_at(1, 0).unwrap(), page(0));
        assert!(matches!(
            s.read_page_at(2, 2),
            Err(StoreError::UnknownCheckpoint(2))
        ));
        assert!(matches!(s.release(3), Err(StoreError::ReleaseLatest(3))));
        s.verify_integrity().unwrap();
        assert_eq!(s.checkpoint_info(1).unwrap().root, r1);
        assert_eq!(s.checkpoint_info(3).unwrap().root, r3);
        assert_ne!(r2, r3);
        // Proofs of an old checkpoint verify against its root.
        let (info, pages) = s.read_pages_at(1, &[2, 4], true).unwrap();
        for p in pages {
            merkle::verify_page(
                &info.root,
                info.num_pages,
                p.index,
                &p.data,
                &p.proof.unwrap(),
            )
            .unwrap();
        }
        drop(s);
        let s = open(dir.path(), 8);
        s.verify_integrity().unwrap();
        assert_eq!(s.read_page_at(1, 2).unwrap(), page(2));
        assert_eq!(s.read_page_at(3, 0).unwrap(), page(201));
    }

    #[test]
    fn bounded_number_of_checkpoints() {
        let dir = tempfile::tempdir().unwrap();
        let s = open(dir.path(), 2);
        for seq in 1..=5 {
            s.write_page(seq % 3, &page(seq)).unwrap();
            s.checkpoint(seq).unwrap();
        }
        let seqs: Vec<_> = s.checkpoints().unwrap().iter().map(|c| c.seq).collect();
        assert_eq!(seqs, vec![4, 5]);
        assert!(matches!(
            s.checkpoint(5),
            Err(StoreError::NotMonotonic { .. })
        ));
        s.verify_integrity().unwrap();
    }

    #[test]
    fn rollback_and_reopen_recover_dirty_set() {
        let dir = tempfile::tempdir().unwrap();
        let s = open(dir.path(), 3);
        s.write_page(0, &page(1)).unwrap();
        s.write_page(1, &page(2)).unwrap();
        let r = s.checkpoint(10).unwrap();
        s.write_page(1, &page(3)).unwrap();
        s.write_page(4, &page(4)).unwrap();
        assert_eq!(s.dirty_pages().unwrap(), 4);
        drop(s);
        let s = open(dir.path(), 3);
        assert_eq!(s.dirty_pages().unwrap(), 4);
        assert_eq!(s.read_page(1).unwrap(), page(3));
        s.rollback_to_latest().unwrap();
        assert_eq!(s.num_pages().unwrap(), 2);
        assert_eq!(s.read_page(1).unwrap(), page(2));
        assert_eq!(s.dirty_pages().unwrap(), 0);
        s.write_page(2, &page(5)).unwrap();
        s.rollback_to_latest().unwrap();
        assert_eq!(s.checkpoint(11).unwrap(), r);
    }

    #[test]
    fn leaf_journal_and_snapshot_survive_reopen_and_compaction() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = open(dir.path(), 3);
        let mut roots = Vec::new();
        // About 600 pages: the snapshot is under the 64 KiB journal floor, so
        // a compaction comes every 16 checkpoints of 101 pages (4 KiB each).
        for seq in 1..=120u64 {
            let n = 500 + seq;
            let idx: Vec<u64> = (0..100)
                .map(|k| (seq * 37 + k * 13) % n)
                .chain([n - 1])
                .collect();
            let pages: Vec<_> = idx.iter().map(|&i| page(seq * 1000 + i)).collect();
            s.write_pages(idx.iter().copied().zip(pages.iter().map(|p| p.as_slice())))
                .unwrap();
            roots.push(s.checkpoint(seq).unwrap());
            if seq % 25 == 0 {
                drop(s);
                s = open(dir.path(), 3);
                s.verify_integrity().unwrap();
            }
        }
        assert!(
            s.inner.kv.get(META_SNAPSHOT).unwrap().is_some(),
            "never compacted"
        );
        drop(s);
        let s = open(dir.path(), 3);
        s.verify_integrity().unwrap();
        assert_eq!(s.latest_checkpoint().unwrap().unwrap().root, roots[119]);
        assert_eq!(s.checkpoint_info(118).unwrap().root, roots[117]);
    }

    #[test]
    fn released_copies_are_collected_by_later_writes() {
        let dir = tempfile::tempdir().unwrap();
        let s = open(dir.path(), 2);
        for seq in 1..=4u64 {
            for i in 0..10 {
                s.write_page(i, &page(seq * 100 + i)).unwrap();
            }
            s.checkpoint(seq).unwrap();
        }
        let saved = |s: &PageStore| s.inner.kv.scan_prefix([TAG_COW]).count();
        // Checkpoints 3 and 4 are retained; copies of 1 and 2 are garbage.
        assert_eq!(s.read_state().unwrap().garbage.len(), 10);
        assert_eq!(saved(&s), 20);
        drop(s);
        let s = open(dir.path(), 2);
        assert_eq!(s.read_state().unwrap().garbage.len(), 10);
        s.write_page(0, &page(999)).unwrap();
        assert!(s.read_state().unwrap().garbage.is_empty());
        assert_eq!(saved(&s), 11);
        s.verify_integrity().unwrap();
    }

    #[test]
    fn clean_nodes_and_current_leaves() {
        let dir = tempfile::tempdir().unwrap();
        let s = open(dir.path(), 3);
        let pages: Vec<_> = (0..8).map(page).collect();
        s.write_pages(
            pages
                .iter()
                .enumerate()
                .map(|(i, p)| (i as u64, p.as_slice())),
        )
        .unwrap();
        assert_eq!(s.clean_node(0, 0).unwrap(), None);
        s.checkpoint(1).unwrap();
        let tree = MerkleTree::from_pages(&pages);
        assert_eq!(s.clean_node(3, 0).unwrap(), Some(tree.node(3, 0)));
        s.write_page(5, &page(50)).unwrap();
        assert_eq!(s.clean_node(3, 0).unwrap(), None);
        assert_eq!(s.clean_node(2, 0).unwrap(), Some(tree.node(2, 0)));
        assert_eq!(s.clean_node(2, 1).unwrap(), None);
        let leaves = s.current_leaves(4, 8).unwrap();
        assert_eq!(leaves[0], tree.node(0, 4));
        assert_eq!(leaves[1], merkle::leaf_hash(5, &page(50)));
    }
}
