//! The Merkle tree over page hashes, and proofs against its root (sans-IO).
//!
//! Shape: a binary tree whose leaves are `leaf_hash(index, page)` for every
//! page `0..num_pages`. Level 0 holds the leaves; level `l` holds
//! `ceil(num_pages / 2^l)` nodes; the top level (`depth(num_pages)`) holds
//! one node. A child position past the end of its level is filled with the
//! hash of an empty subtree of that height, so the tree behaves as if padded
//! to a power of two without storing the padding. The root binds the page
//! count: `root = H_root(num_pages, top)`, so a peer cannot claim a different
//! state size for the same root.
//!
//! Every hash is keyed blake3 with a distinct key per role (page, leaf, node,
//! root, empty), so a leaf can never be confused with an inner node. The leaf
//! commits to the page index, so pages cannot be swapped.
//!
//! [`MerkleTree::update`] recomputes only the ancestors of changed leaves:
//! cost `O(changed × depth)` hashes, independent of the state size.
//! [`prove_range`] / [`range_root`] give and check a proof for a contiguous
//! run of nodes at any level (a single page is the run of one leaf).

use std::sync::OnceLock;
use zz_wire::Digest;

/// Largest supported depth: `num_pages` is a `u64`.
pub const MAX_DEPTH: u32 = 64;

struct Keys {
    page: [u8; 32],
    leaf: [u8; 32],
    node: [u8; 32],
    /// `node` as blake3's key words (for [`node_hashes`]).
    node_words: [u32; 8],
    root: [u8; 32],
    empty: Vec<Digest>,
}

fn keys() -> &'static Keys {
    static KEYS: OnceLock<Keys> = OnceLock::new();
    KEYS.get_or_init(|| {
        let node = blake3::derive_key("zz statefetch v1 merkle node", b"");
        let mut empty = Vec::with_capacity(MAX_DEPTH as usize + 1);
        let e0 = Digest(
            *blake3::keyed_hash(&blake3::derive_key("zz statefetch v1 empty", b""), b"").as_bytes(),
        );
        empty.push(e0);
        for l in 1..=MAX_DEPTH as usize {
            let below = empty[l - 1];
            empty.push(hash_pair(&node, &below, &below));
        }
        let mut node_words = [0u32; 8];
        for (w, b) in node_words.iter_mut().zip(node.chunks_exact(4)) {
            *w = u32::from_le_bytes(b.try_into().expect("4 bytes"));
        }
        Keys {
            page: blake3::derive_key("zz statefetch v1 page", b""),
            leaf: blake3::derive_key("zz statefetch v1 leaf", b""),
            node,
            node_words,
            root: blake3::derive_key("zz statefetch v1 root", b""),
            empty,
        }
    })
}

fn hash_pair(key: &[u8; 32], left: &Digest, right: &Digest) -> Digest {
    // Exactly one 64-byte blake3 block: cheaper than a prefixed encoding.
    Digest(*blake3::keyed_hash(key, &node_block(left, right)).as_bytes())
}

/// Leaf hash of page `index` with contents `page`.
///
/// The page bytes are hashed on their own first (one aligned input, which
/// blake3 hashes with SIMD), then bound to the index.
pub fn leaf_hash(index: u64, page: &[u8]) -> Digest {
    let k = keys();
    let page_digest = blake3::keyed_hash(&k.page, page);
    let mut buf = [0u8; 40];
    buf[..8].copy_from_slice(&index.to_le_bytes());
    buf[8..].copy_from_slice(page_digest.as_bytes());
    Digest(*blake3::keyed_hash(&k.leaf, &buf).as_bytes())
}

/// Hash of an inner node from its two children.
pub fn node_hash(left: &Digest, right: &Digest) -> Digest {
    hash_pair(&keys().node, left, right)
}

/// The input block of an inner node: its left child, then its right.
fn node_block(left: &Digest, right: &Digest) -> [u8; 64] {
    let mut block = [0u8; 64];
    block[..32].copy_from_slice(&left.0);
    block[32..].copy_from_slice(&right.0);
    block
}

// blake3's domain flags (BLAKE3 specification, table 3).
const CHUNK_START: u8 = 1;
const CHUNK_END: u8 = 2;
const ROOT: u8 = 8;
const KEYED_HASH: u8 = 16;

/// Appends to `out` the [`node_hash`] of every block (see [`node_block`]),
/// many at a time: blake3's SIMD path for independent inputs hashes 8 or 16
/// blocks per pass, about 6x the throughput of one call per node (9.7 ns
/// against 61-67 ns per node with AVX-512 on this machine kind).
///
/// That path is `blake3::platform::hash_many`, which blake3 exports for
/// benchmarks without a stability promise (hence the exact version pin in
/// the workspace manifest); hashing a one-block input as a keyed root chunk
/// gives exactly `keyed_hash`, which `node_hashes_equal_node_hash` checks.
fn node_hashes(blocks: &[[u8; 64]], out: &mut Vec<Digest>) {
    static PLATFORM: OnceLock<blake3::platform::Platform> = OnceLock::new();
    let platform = PLATFORM.get_or_init(blake3::platform::Platform::detect);
    let inputs: Vec<&[u8; 64]> = blocks.iter().collect();
    let mut bytes = vec![0u8; 32 * blocks.len()];
    platform.hash_many(
        &inputs,
        &keys().node_words,
        0,
        blake3::IncrementCounter::No,
        KEYED_HASH,
        CHUNK_START,
        CHUNK_END | ROOT,
        &mut bytes,
    );
    out.extend(
        bytes
            .chunks_exact(32)
            .map(|c| Digest(c.try_into().expect("32 bytes"))),
    );
}

/// Hash of an empty subtree whose top is at `level` (level 0: a missing leaf).
pub fn empty_hash(level: u32) -> Digest {
    keys().empty[level.min(MAX_DEPTH) as usize]
}

/// The root of a tree with `num_pages` leaves whose top node is `top`.
pub fn root_hash(num_pages: u64, top: &Digest) -> Digest {
    let mut buf = [0u8; 40];
    buf[..8].copy_from_slice(&num_pages.to_le_bytes());
    buf[8..].copy_from_slice(&top.0);
    Digest(*blake3::keyed_hash(&keys().root, &buf).as_bytes())
}

/// Root of the empty state (no pages).
pub fn empty_root() -> Digest {
    root_hash(0, &empty_hash(0))
}

/// Number of levels above the leaves.
pub fn depth(num_pages: u64) -> u32 {
    if num_pages <= 1 {
        0
    } else {
        64 - (num_pages - 1).leading_zeros()
    }
}

/// Number of nodes stored at `level` of a tree with `num_pages` leaves.
pub fn level_len(level: u32, num_pages: u64) -> u64 {
    if level >= 64 {
        u64::from(num_pages > 0)
    } else {
        num_pages.div_ceil(1u64 << level)
    }
}

/// Why a proof or a tree update was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProofError {
    #[error(
        "range level {level} start {start} count {count} is outside a tree of {num_pages} pages"
    )]
    OutOfRange {
        num_pages: u64,
        level: u32,
        start: u64,
        count: u64,
    },
    #[error("proof has too few sibling hashes")]
    TooShort,
    #[error("proof has too many sibling hashes")]
    TooLong,
    #[error("proof does not lead to the expected root")]
    RootMismatch,
}

/// Checks that `[start, start+count)` is a non-empty run of nodes of `level`.
pub fn check_range(num_pages: u64, level: u32, start: u64, count: u64) -> Result<(), ProofError> {
    let bad = ProofError::OutOfRange {
        num_pages,
        level,
        start,
        count,
    };
    if num_pages == 0 || count == 0 || level > depth(num_pages) {
        return Err(bad);
    }
    match start.checked_add(count) {
        Some(end) if end <= level_len(level, num_pages) => Ok(()),
        _ => Err(bad),
    }
}

/// The sibling hashes proving nodes `[start, start+count)` of `level`.
///
/// `get(level, index)` returns a stored node; it is only asked for nodes
/// inside the tree. Order: level by level upwards, at each level the left
/// boundary sibling (if needed) before the right one.
pub fn prove_range(
    get: impl Fn(u32, u64) -> Digest,
    num_pages: u64,
    level: u32,
    start: u64,
    count: u64,
) -> Result<Vec<Digest>, ProofError> {
    check_range(num_pages, level, start, count)?;
    let mut siblings = Vec::new();
    let (mut s, mut e) = (start, start + count);
    for l in level..depth(num_pages) {
        let len = level_len(l, num_pages);
        if s % 2 == 1 {
            siblings.push(get(l, s - 1));
        }
        if e % 2 == 1 && e < len {
            siblings.push(get(l, e));
        }
        s /= 2;
        e = e.div_ceil(2);
    }
    Ok(siblings)
}

/// Recomputes the root from a run of nodes and its proof.
///
/// Compare the result with the trusted root; [`verify_range`] does both.
pub fn range_root(
    num_pages: u64,
    level: u32,
    start: u64,
    nodes: &[Digest],
    siblings: &[Digest],
) -> Result<Digest, ProofError> {
    check_range(num_pages, level, start, nodes.len() as u64)?;
    let mut sib = siblings.iter();
    let mut row: Vec<Digest> = Vec::with_capacity(nodes.len() + 2);
    let mut s = start;
    if s % 2 == 1 && level < depth(num_pages) {
        row.push(*sib.next().ok_or(ProofError::TooShort)?);
        s -= 1;
    }
    row.extend_from_slice(nodes);
    for l in level..depth(num_pages) {
        if l > level && s % 2 == 1 {
            row.insert(0, *sib.next().ok_or(ProofError::TooShort)?);
            s -= 1;
        }
        let e = s + row.len() as u64;
        if e % 2 == 1 {
            if e < level_len(l, num_pages) {
                row.push(*sib.next().ok_or(ProofError::TooShort)?);
            } else {
                row.push(empty_hash(l));
            }
        }
        let blocks: Vec<[u8; 64]> = row
            .chunks_exact(2)
            .map(|c| node_block(&c[0], &c[1]))
            .collect();
        row.clear();
        node_hashes(&blocks, &mut row);
        s /= 2;
    }
    if sib.next().is_some() {
        return Err(ProofError::TooLong);
    }
    debug_assert_eq!(row.len(), 1);
    Ok(root_hash(num_pages, &row[0]))
}

/// Verifies a run of nodes against a trusted root.
pub fn verify_range(
    root: &Digest,
    num_pages: u64,
    level: u32,
    start: u64,
    nodes: &[Digest],
    siblings: &[Digest],
) -> Result<(), ProofError> {
    if range_root(num_pages, level, start, nodes, siblings)? == *root {
        Ok(())
    } else {
        Err(ProofError::RootMismatch)
    }
}

/// Verifies one page against a trusted root.
pub fn verify_page(
    root: &Digest,
    num_pages: u64,
    index: u64,
    page: &[u8],
    siblings: &[Digest],
) -> Result<(), ProofError> {
    verify_range(
        root,
        num_pages,
        0,
        index,
        &[leaf_hash(index, page)],
        siblings,
    )
}

/// An in-memory Merkle tree: every level, leaves included.
///
/// Memory is about `2 × 32 × num_pages` bytes (16 MiB for 1 GiB of state).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MerkleTree {
    num_pages: u64,
    /// `levels[l]` has `level_len(l, num_pages)` nodes; `levels.len() == depth + 1`.
    levels: Vec<Vec<Digest>>,
}

impl Default for MerkleTree {
    fn default() -> Self {
        MerkleTree {
            num_pages: 0,
            levels: vec![Vec::new()],
        }
    }
}

impl MerkleTree {
    /// The tree of an empty state.
    pub fn new() -> Self {
        Self::default()
    }

    /// Builds the whole tree from its leaves (`O(n)` hashes).
    pub fn from_leaves(leaves: Vec<Digest>) -> Self {
        let num_pages = leaves.len() as u64;
        let d = depth(num_pages);
        let mut levels = Vec::with_capacity(d as usize + 1);
        levels.push(leaves);
        let mut blocks = Vec::new();
        for l in 1..=d {
            let below = &levels[l as usize - 1];
            let mut row = Vec::with_capacity(level_len(l, num_pages) as usize);
            // In slices, so the blocks stay in cache between their copy and
            // their hash.
            for part in below.chunks(2 * 1024) {
                blocks.clear();
                blocks.extend(part.chunks(2).map(|pair| {
                    let right = pair.get(1).copied().unwrap_or_else(|| empty_hash(l - 1));
                    node_block(&pair[0], &right)
                }));
                node_hashes(&blocks, &mut row);
            }
            levels.push(row);
        }
        MerkleTree { num_pages, levels }
    }

    /// Builds the tree of a list of pages (tests and integrity checks).
    pub fn from_pages<P: AsRef<[u8]>>(pages: &[P]) -> Self {
        Self::from_leaves(
            pages
                .iter()
                .enumerate()
                .map(|(i, p)| leaf_hash(i as u64, p.as_ref()))
                .collect(),
        )
    }

    pub fn num_pages(&self) -> u64 {
        self.num_pages
    }

    pub fn depth(&self) -> u32 {
        depth(self.num_pages)
    }

    /// The node at `(level, index)`; positions past the end are empty subtrees.
    pub fn node(&self, level: u32, index: u64) -> Digest {
        self.levels
            .get(level as usize)
            .and_then(|row| row.get(index as usize))
            .copied()
            .unwrap_or_else(|| empty_hash(level))
    }

    /// The leaf hashes.
    pub fn leaves(&self) -> &[Digest] {
        &self.levels[0]
    }

    /// The top node (before binding the page count).
    pub fn top(&self) -> Digest {
        self.node(self.depth(), 0)
    }

    pub fn root(&self) -> Digest {
        root_hash(self.num_pages, &self.top())
    }

    /// Proof for a run of nodes of this tree.
    pub fn prove_range(
        &self,
        level: u32,
        start: u64,
        count: u64,
    ) -> Result<Vec<Digest>, ProofError> {
        prove_range(|l, i| self.node(l, i), self.num_pages, level, start, count)
    }

    /// Sets changed leaves and grows to `new_num_pages`, rehashing only the
    /// ancestors of what changed.
    ///
    /// `leaves` must be sorted by index without duplicates, every index below
    /// `new_num_pages`, and must include every new index
    /// (`self.num_pages()..new_num_pages`). `on_change(level, index, old)` is
    /// called for every node whose value changes, with its previous value
    /// (`None` for a node that did not exist): that is what a copy-on-write
    /// checkpoint keeps.
    pub fn update(
        &mut self,
        new_num_pages: u64,
        leaves: &[(u64, Digest)],
        mut on_change: impl FnMut(u32, u64, Option<Digest>),
    ) -> Result<(), TreeUpdateError> {
        let old_n = self.num_pages;
        if new_num_pages < old_n {
            return Err(TreeUpdateError::Shrink {
                from: old_n,
                to: new_num_pages,
            });
        }
        let mut prev = None;
        let mut new_count = 0u64;
        for &(i, _) in leaves {
            if prev.is_some_and(|p| p >= i) {
                return Err(TreeUpdateError::Unsorted);
            }
            if i >= new_num_pages {
                return Err(TreeUpdateError::OutOfRange {
                    index: i,
                    num_pages: new_num_pages,
                });
            }
            if i >= old_n {
                new_count += 1;
            }
            prev = Some(i);
        }
        if new_count != new_num_pages - old_n {
            return Err(TreeUpdateError::MissingNewLeaves);
        }

        let new_depth = depth(new_num_pages);
        let old_lens: Vec<u64> = (0..=new_depth)
            .map(|l| self.levels.get(l as usize).map_or(0, |r| r.len() as u64))
            .collect();
        while self.levels.len() <= new_depth as usize {
            self.levels.push(Vec::new());
        }
        for l in 0..=new_depth {
            // Every new position is an ancestor of a new leaf, so it is
            // overwritten below; the placeholder is never observed.
            self.levels[l as usize].resize(level_len(l, new_num_pages) as usize, Digest::ZERO);
        }
        self.num_pages = new_num_pages;

        let mut changed: Vec<u64> = Vec::with_capacity(leaves.len());
        for &(i, h) in leaves {
            let old = (i < old_lens[0]).then(|| self.levels[0][i as usize]);
            if old != Some(h) {
                self.levels[0][i as usize] = h;
                on_change(0, i, old);
                changed.push(i);
            }
        }
        // With two threads, the halves below the top climb at once and the
        // top node is left for the single climb below.
        let mut first = 1;
        if changed.len() >= PARALLEL_MIN_LEAVES
            && new_num_pages >= PARALLEL_MIN_PAGES
            && parallelism() >= 2
        {
            self.climb_halves(new_depth, &old_lens, &mut changed, &mut on_change);
            first = new_depth;
        }
        let mut rows: Vec<&mut [Digest]> =
            self.levels.iter_mut().map(|r| r.as_mut_slice()).collect();
        let base = vec![0u64; rows.len()];
        climb(
            &mut rows,
            &base,
            &old_lens,
            first..=new_depth,
            &mut changed,
            &mut on_change,
        );
        Ok(())
    }

    /// [`climb`] of levels `1..depth` (all but the top) over the tree's two
    /// halves, one per thread: their nodes are disjoint. `changed` goes in
    /// as changed leaves and comes out as the changed nodes of level
    /// `depth - 1`. The changes are recorded and replayed to `on_change`
    /// here (the callback need not be `Send`).
    fn climb_halves(
        &mut self,
        depth: u32,
        old_lens: &[u64],
        changed: &mut Vec<u64>,
        on_change: &mut impl FnMut(u32, u64, Option<Digest>),
    ) {
        let below_top = depth - 1;
        let mut left_rows = Vec::with_capacity(depth as usize);
        let mut right_rows = Vec::with_capacity(depth as usize);
        let mut right_base = Vec::with_capacity(depth as usize);
        for (l, row) in self.levels[..depth as usize].iter_mut().enumerate() {
            // Level l of the left half: the first 2^(below_top - l) nodes.
            let half = 1usize << (below_top as usize - l);
            let len = row.len();
            let (a, b) = row.split_at_mut(half.min(len));
            left_rows.push(a);
            right_rows.push(b);
            right_base.push(half as u64);
        }
        let left_base = vec![0u64; depth as usize];
        let mut right = changed.split_off(changed.partition_point(|&i| i < right_base[0]));
        let (left_log, right_log) = std::thread::scope(|scope| {
            let other = scope.spawn(|| {
                let mut log = Vec::new();
                let record = &mut |l, i, old| log.push((l, i, old));
                climb(
                    &mut right_rows,
                    &right_base,
                    old_lens,
                    1..=below_top,
                    &mut right,
                    record,
                );
                log
            });
            let mut log = Vec::new();
            let record = &mut |l, i, old| log.push((l, i, old));
            climb(
                &mut left_rows,
                &left_base,
                old_lens,
                1..=below_top,
                changed,
                record,
            );
            (log, other.join().expect("a tree-hashing thread panicked"))
        });
        for (l, i, old) in left_log.into_iter().chain(right_log) {
            on_change(l, i, old);
        }
        changed.extend(right);
    }
}

/// Changed leaves from which a tree update hashes the two halves of the
/// tree on two threads (below it, starting a thread costs more than it
/// saves).
const PARALLEL_MIN_LEAVES: usize = 256;
/// Pages from which a tree update may use two threads. The update of a
/// large tree waits on cache misses, which two cores overlap (1 GiB, 1,000
/// changed leaves, measured when each node was hashed on its own: 1.3-1.4
/// ms against 1.8; with [`node_hashes`] the update is mostly those misses,
/// 0.5-0.8 ms either way on a noisy day); a small tree's whole update takes
/// well under a millisecond, and a thread only adds to it (16 MiB: 0.51-0.56
/// ms against 0.39-0.45).
const PARALLEL_MIN_PAGES: u64 = 1 << 16;

/// Cores available (read once: on Linux each query reads cgroup files).
fn parallelism() -> usize {
    static CORES: OnceLock<usize> = OnceLock::new();
    *CORES.get_or_init(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
}

/// Rehashes, level by level over `levels`, the parents of the nodes in
/// `changed` (indices at the level below the first), leaving in `changed`
/// the indices that changed at the last level. `rows[l]` holds level `l`'s
/// nodes from index `base[l]` on; a child past a row's end is an empty
/// subtree. `old_lens[l]` is level `l`'s length before the update (nodes at
/// or past it are new: `on_change` gets `None` as their old value).
fn climb(
    rows: &mut [&mut [Digest]],
    base: &[u64],
    old_lens: &[u64],
    levels: std::ops::RangeInclusive<u32>,
    changed: &mut Vec<u64>,
    on_change: &mut impl FnMut(u32, u64, Option<Digest>),
) {
    // Level by level: first gather the children and the parents' old
    // values (loads independent of each other, so on a large tree their
    // cache misses overlap), then hash the level's nodes all at once (see
    // `node_hashes`), then store. One pass in which every hash waited for
    // its own cache miss is measurably slower on a 1 GiB state.
    let mut parents: Vec<u64> = Vec::with_capacity(changed.len());
    let mut children: Vec<[u8; 64]> = Vec::with_capacity(changed.len());
    let mut olds: Vec<Digest> = Vec::with_capacity(changed.len());
    let mut hashes: Vec<Digest> = Vec::with_capacity(changed.len());
    for l in levels {
        let below = l as usize - 1;
        parents.clear();
        parents.extend(changed.iter().map(|c| c / 2));
        parents.dedup();
        children.clear();
        {
            let row = &rows[below];
            let child = |i: u64| {
                row.get((i - base[below]) as usize)
                    .copied()
                    .unwrap_or_else(|| empty_hash(l - 1))
            };
            children.extend(
                parents
                    .iter()
                    .map(|&p| node_block(&child(2 * p), &child(2 * p + 1))),
            );
        }
        let (old_len, b) = (old_lens[l as usize], base[l as usize]);
        let row = &mut rows[l as usize];
        olds.clear();
        olds.extend(parents.iter().map(|&p| row[(p - b) as usize]));
        hashes.clear();
        node_hashes(&children, &mut hashes);
        changed.clear();
        for ((&p, &h), &value) in parents.iter().zip(&hashes).zip(&olds) {
            let old = (p < old_len).then_some(value);
            if old != Some(h) {
                row[(p - b) as usize] = h;
                on_change(l, p, old);
                changed.push(p);
            }
        }
    }
}

/// A tree update whose arguments break [`MerkleTree::update`]'s contract.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TreeUpdateError {
    #[error("tree cannot shrink from {from} to {to} pages")]
    Shrink { from: u64, to: u64 },
    #[error("changed leaves are not sorted and unique")]
    Unsorted,
    #[error("leaf {index} is outside a tree of {num_pages} pages")]
    OutOfRange { index: u64, num_pages: u64 },
    #[error("every new page needs a leaf")]
    MissingNewLeaves,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_hashes_equal_node_hash() {
        // Counts around the SIMD widths (8, 16) and their remainders.
        for count in [0usize, 1, 2, 7, 8, 9, 15, 16, 17, 33, 100] {
            let pairs: Vec<(Digest, Digest)> = (0..count as u64)
                .map(|i| (leaf_hash(i, b"left"), leaf_hash(i + 1000, b"right")))
                .collect();
            let blocks: Vec<[u8; 64]> = pairs.iter().map(|(l, r)| node_block(l, r)).collect();
            let mut out = vec![Digest::ZERO];
            node_hashes(&blocks, &mut out);
            assert_eq!(out.len(), count + 1, "appends one hash per block");
            assert_eq!(out[0], Digest::ZERO, "keeps what was there");
            for (k, (l, r)) in pairs.iter().enumerate() {
                assert_eq!(out[k + 1], node_hash(l, r), "block {k} of {count}");
            }
        }
    }

    fn page(i: u64, v: u8) -> Vec<u8> {
        let mut p = vec![v; crate::PAGE_SIZE];
        p[..8].copy_from_slice(&i.to_le_bytes());
        p
    }

    #[test]
    fn depth_and_level_len() {
        assert_eq!(depth(0), 0);
        assert_eq!(depth(1), 0);
        assert_eq!(depth(2), 1);
        assert_eq!(depth(3), 2);
        assert_eq!(depth(4), 2);
        assert_eq!(depth(5), 3);
        assert_eq!(depth(u64::MAX), 64);
        assert_eq!(level_len(0, 5), 5);
        assert_eq!(level_len(1, 5), 3);
        assert_eq!(level_len(3, 5), 1);
        assert_eq!(level_len(64, u64::MAX), 1);
    }

    #[test]
    fn leaf_binds_index() {
        let p = page(0, 1);
        assert_ne!(leaf_hash(0, &p), leaf_hash(1, &p));
    }

    #[test]
    fn incremental_update_matches_rebuild_with_growth() {
        let mut pages: Vec<Vec<u8>> = Vec::new();
        let mut tree = MerkleTree::new();
        assert_eq!(tree.root(), empty_root());
        for round in 0..40u64 {
            let old = pages.len() as u64;
            let grow = round % 3;
            for i in old..old + grow {
                pages.push(page(i, 0));
            }
            let mut changed: Vec<u64> = (old..old + grow).collect();
            if !pages.is_empty() {
                let j = (round * 7) % pages.len() as u64;
                pages[j as usize] = page(j, round as u8 + 1);
                changed.push(j);
            }
            changed.sort_unstable();
            changed.dedup();
            let leaves: Vec<_> = changed
                .iter()
                .map(|&i| (i, leaf_hash(i, &pages[i as usize])))
                .collect();
            tree.update(pages.len() as u64, &leaves, |_, _, _| {})
                .unwrap();
            let full = MerkleTree::from_pages(&pages);
            assert_eq!(tree, full, "round {round}");
        }
    }

    #[test]
    fn large_updates_with_growth_match_rebuild() {
        // Many scattered changes, with growth across a power of two and
        // into a new level.
        let leaf = |i: u64, v: u64| Digest::of(&[i.to_le_bytes(), v.to_le_bytes()].concat());
        // Small trees, and trees large enough for the two-thread path
        // ([`PARALLEL_MIN_PAGES`]) with changes in both halves or in one.
        let cases = [
            (3000u64, 3000u64, 0..3000u64),
            (3000, 5000, 0..3000),
            (4096, 4097, 0..4096),
            (1500, 2100, 0..1500),
            (70_000, 70_000, 0..70_000),
            (70_000, 90_000, 0..70_000),
            (65_536, 65_537, 0..65_536),
            (131_072, 131_072, 0..65_536),
            (131_072, 131_072, 65_536..131_072),
            (100_000, 100_000, 80_000..100_000),
        ];
        for (n0, n1, range) in cases {
            let mut leaves: Vec<Digest> = (0..n0).map(|i| leaf(i, 0)).collect();
            let mut tree = MerkleTree::from_leaves(leaves.clone());
            let before = tree.clone();
            let mut changes: Vec<(u64, Digest)> =
                range.step_by(3).map(|i| (i, leaf(i, 1))).collect();
            changes.extend((n0..n1).map(|i| (i, leaf(i, 1))));
            for &(i, h) in &changes {
                if i < n0 {
                    leaves[i as usize] = h;
                } else {
                    leaves.push(h);
                }
            }
            let mut seen = Vec::new();
            tree.update(n1, &changes, |l, i, old| seen.push((l, i, old)))
                .unwrap();
            let full = MerkleTree::from_leaves(leaves);
            assert_eq!(tree, full, "{n0} -> {n1}");
            // Every node that changed was reported, exactly once.
            let reported: std::collections::HashSet<(u32, u64)> =
                seen.iter().map(|&(l, i, _)| (l, i)).collect();
            assert_eq!(reported.len(), seen.len(), "a node reported twice");
            for l in 0..=depth(n1) {
                for i in 0..level_len(l, n1) {
                    let existed = l <= depth(n0) && i < level_len(l, n0);
                    if !existed || before.node(l, i) != full.node(l, i) {
                        assert!(
                            reported.contains(&(l, i)),
                            "{n0}->{n1}: ({l}, {i}) not reported"
                        );
                    }
                }
            }
            for (l, i, old) in seen {
                match old {
                    Some(o) => assert_eq!(o, before.node(l, i)),
                    None => assert!(l > depth(n0) || i >= level_len(l, n0), "{n0}->{n1} {l} {i}"),
                }
            }
        }
    }

    #[test]
    fn update_reports_old_values() {
        let pages: Vec<_> = (0..8).map(|i| page(i, 0)).collect();
        let mut tree = MerkleTree::from_pages(&pages);
        let before = tree.clone();
        let mut seen = Vec::new();
        tree.update(8, &[(5, leaf_hash(5, &page(5, 9)))], |l, i, old| {
            seen.push((l, i, old))
        })
        .unwrap();
        assert_eq!(seen.len(), 4);
        for (l, i, old) in seen {
            assert_eq!(old, Some(before.node(l, i)));
        }
    }

    #[test]
    fn update_rejects_bad_arguments() {
        let mut t = MerkleTree::from_pages(&[page(0, 0), page(1, 0)]);
        let h = leaf_hash(0, &page(0, 0));
        assert_eq!(
            t.update(1, &[], |_, _, _| {}),
            Err(TreeUpdateError::Shrink { from: 2, to: 1 })
        );
        assert_eq!(
            t.update(3, &[], |_, _, _| {}),
            Err(TreeUpdateError::MissingNewLeaves)
        );
        assert_eq!(
            t.update(2, &[(1, h), (0, h)], |_, _, _| {}),
            Err(TreeUpdateError::Unsorted)
        );
        assert!(matches!(
            t.update(2, &[(2, h)], |_, _, _| {}),
            Err(TreeUpdateError::OutOfRange { .. })
        ));
    }

    #[test]
    fn every_range_proof_verifies_and_tampering_fails() {
        for n in 1..=19u64 {
            let pages: Vec<_> = (0..n).map(|i| page(i, 3)).collect();
            let tree = MerkleTree::from_pages(&pages);
            let root = tree.root();
            for level in 0..=tree.depth() {
                let len = level_len(level, n);
                for start in 0..len {
                    for count in 1..=len - start {
                        let nodes: Vec<_> = (start..start + count)
                            .map(|i| tree.node(level, i))
                            .collect();
                        let proof = tree.prove_range(level, start, count).unwrap();
                        verify_range(&root, n, level, start, &nodes, &proof).unwrap();
                        if !proof.is_empty() {
                            let mut bad = proof.clone();
                            bad[0].0[0] ^= 1;
                            assert!(verify_range(&root, n, level, start, &nodes, &bad).is_err());
                            let short = &proof[..proof.len() - 1];
                            assert!(verify_range(&root, n, level, start, &nodes, short).is_err());
                        }
                        let mut long = proof.clone();
                        long.push(Digest::ZERO);
                        assert_eq!(
                            verify_range(&root, n, level, start, &nodes, &long),
                            Err(ProofError::TooLong)
                        );
                        let mut bad_nodes = nodes.clone();
                        bad_nodes[0].0[5] ^= 1;
                        assert!(verify_range(&root, n, level, start, &bad_nodes, &proof).is_err());
                    }
                }
            }
        }
    }

    #[test]
    fn page_proofs_reject_swaps_and_wrong_sizes() {
        let pages: Vec<_> = (0..6).map(|i| page(i, 1)).collect();
        let tree = MerkleTree::from_pages(&pages);
        let root = tree.root();
        let proof = tree.prove_range(0, 2, 1).unwrap();
        verify_page(&root, 6, 2, &pages[2], &proof).unwrap();
        assert!(verify_page(&root, 6, 2, &pages[3], &proof).is_err());
        assert!(verify_page(&root, 6, 3, &pages[2], &proof).is_err());
        assert!(verify_page(&root, 7, 2, &pages[2], &proof).is_err());
        assert!(verify_page(&root, 6, 6, &pages[2], &proof).is_err());
        assert!(verify_page(&root, 0, 0, &pages[2], &proof).is_err());
    }
}
