//! A hash map stored in pages: the storage engine of the `kv` app and of the
//! executor's reply table.
//!
//! Everything, including the table's own metadata, lives in the [`Pages`] it
//! is opened on; nothing survives in memory between calls, so the map works
//! unchanged over a state that is being fetched on demand, and a checkpoint
//! of the pages is a checkpoint of the map.
//!
//! # Page layout (all integers little-endian; page numbers are page indices
//! within the map's [`Pages`]; 0 never names anything but the header)
//!
//! **Header, page 0**
//!
//! | bytes | field |
//! |---|---|
//! | 0..8 | magic `zzPMAP01` |
//! | 8..16 | `level` (linear hashing) |
//! | 16..24 | `split`: next bucket to split; there are `2^level + split` buckets |
//! | 24..32 | entries |
//! | 32..40 | bytes of entries in bucket pages (drives splitting) |
//! | 40..48 | head of the free-page list (0 = empty) |
//! | 48..56 | next never-used page (bump allocator) |
//! | 56..64 | pages on the free list |
//! | 64..448 | 48 bucket-extent starts |
//!
//! **Buckets.** Bucket `b` is one page, plus a chain of overflow pages.
//! Buckets live in extents of doubling size: extent 0 holds bucket 0, extent
//! `k >= 1` holds buckets `[2^(k-1), 2^k)`, contiguously from the page in
//! slot `k` of the header. A key with hash `h` is in bucket `h mod 2^level`,
//! or `h mod 2^(level+1)` if that is below `split` (linear hashing: the table
//! grows one bucket at a time, so no request pays for rehashing everything).
//! A bucket is split when entry bytes exceed 3 KiB per bucket on average.
//!
//! **Bucket page**: `0..8` next overflow page (0 = none), `8..10` entry count,
//! `10..12` bytes used, `16..` entries packed back to back:
//!
//! | bytes | field |
//! |---|---|
//! | 0..8 | key hash (blake3, derive-key `zz pagedmap key v1`, first 8 bytes) |
//! | 8..12 | key length |
//! | 12..16 | value length |
//! | 16 | flags: bit 0 key in a blob, bit 1 value in a blob |
//! | 17.. | key bytes, or its blob's first page (8 bytes) if longer than 128 |
//! | .. | value bytes, or its blob's first page (8 bytes) if longer than 1 KiB |
//!
//! **Blob**: a chain of pages, each `0..8` next page (0 = last), `8..4096`
//! data; a blob of `n` bytes spans `ceil(n / 4088)` pages.
//!
//! **Free list**: freed blob and overflow pages, each `0..8` next free page,
//! the rest zero. Allocation takes the head of the list, else the bump
//! pointer (growing the pages).
//!
//! Every check of the stored structure returns [`MapError::Corrupt`] on
//! failure; walking chains is bounded by the page count, so a corrupted
//! state can neither panic nor loop.

use crate::pages::{PageError, Pages};
use std::collections::VecDeque;
use zz_statefetch::PAGE_SIZE;

const MAGIC: &[u8; 8] = b"zzPMAP01";
const H_LEVEL: usize = 8;
const H_SPLIT: usize = 16;
const H_ENTRIES: usize = 24;
const H_BYTES: usize = 32;
const H_FREE: usize = 40;
const H_NEXT: usize = 48;
const H_FREE_COUNT: usize = 56;
const H_EXT: usize = 64;
const BUCKET_EXTENTS: usize = 48;
const MAX_LEVEL: u64 = 47;

const B_COUNT: usize = 8;
const B_USED: usize = 10;
const B_DATA: usize = 16;
const B_CAP: usize = PAGE_SIZE - B_DATA;

const E_HDR: usize = 17;
const KEY_INLINE_MAX: usize = 128;
const VAL_INLINE_MAX: usize = 1024;
const BLOB_DATA: usize = PAGE_SIZE - 8;
/// Average bytes of entries per bucket above which a bucket is split.
const SPLIT_BYTES: u64 = 3072;

/// Longest key or value the engine stores.
pub const MAX_LEN: usize = 16 << 20;

const _: () = assert!(H_EXT + 8 * BUCKET_EXTENTS <= PAGE_SIZE);
const _: () = assert!(E_HDR + KEY_INLINE_MAX + VAL_INLINE_MAX <= B_CAP);

/// Errors of the paged map.
#[derive(Debug, thiserror::Error)]
pub enum MapError {
    /// The pages could not be read or written (a local failure).
    #[error(transparent)]
    Page(#[from] PageError),
    /// The stored structure is inconsistent (only a fault or a bug does this).
    #[error("corrupt map: {0}")]
    Corrupt(String),
    /// A key or value longer than [`MAX_LEN`].
    #[error("{0} bytes exceeds the limit")]
    TooLarge(usize),
}

fn corrupt<T>(what: impl Into<String>) -> Result<T, MapError> {
    Err(MapError::Corrupt(what.into()))
}

fn get_u64(b: &[u8], off: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[off..off + 8]);
    u64::from_le_bytes(a)
}

fn put_u64(b: &mut [u8], off: usize, v: u64) {
    b[off..off + 8].copy_from_slice(&v.to_le_bytes());
}

fn get_u32(b: &[u8], off: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[off..off + 4]);
    u32::from_le_bytes(a)
}

fn get_u16(b: &[u8], off: usize) -> u16 {
    u16::from_le_bytes([b[off], b[off + 1]])
}

fn put_u16(b: &mut [u8], off: usize, v: u16) {
    b[off..off + 2].copy_from_slice(&v.to_le_bytes());
}

/// The hash that places a key.
pub fn key_hash(key: &[u8]) -> u64 {
    let mut h = blake3::Hasher::new_derive_key("zz pagedmap key v1");
    h.update(key);
    let d = h.finalize();
    get_u64(d.as_bytes(), 0)
}

fn ext_index(b: u64) -> usize {
    (64 - b.leading_zeros()) as usize
}

fn ext_start(k: usize) -> u64 {
    if k == 0 {
        0
    } else {
        1 << (k - 1)
    }
}

fn ext_size(k: usize) -> u64 {
    if k == 0 {
        1
    } else {
        1 << (k - 1)
    }
}

fn blob_pages(len: usize) -> usize {
    len.div_ceil(BLOB_DATA)
}

#[derive(Clone, Debug)]
struct Header {
    level: u64,
    split: u64,
    entries: u64,
    bytes: u64,
    free_head: u64,
    next_page: u64,
    free_count: u64,
    ext: [u64; BUCKET_EXTENTS],
}

impl Header {
    fn fresh() -> Header {
        let mut ext = [0; BUCKET_EXTENTS];
        ext[0] = 1;
        Header {
            level: 0,
            split: 0,
            entries: 0,
            bytes: 0,
            free_head: 0,
            next_page: 2,
            free_count: 0,
            ext,
        }
    }

    fn decode(b: &[u8], num_pages: u64) -> Result<Header, MapError> {
        if b.len() != PAGE_SIZE || &b[..8] != MAGIC {
            return corrupt("bad header magic");
        }
        let mut ext = [0; BUCKET_EXTENTS];
        for (k, e) in ext.iter_mut().enumerate() {
            *e = get_u64(b, H_EXT + 8 * k);
        }
        let h = Header {
            level: get_u64(b, H_LEVEL),
            split: get_u64(b, H_SPLIT),
            entries: get_u64(b, H_ENTRIES),
            bytes: get_u64(b, H_BYTES),
            free_head: get_u64(b, H_FREE),
            next_page: get_u64(b, H_NEXT),
            free_count: get_u64(b, H_FREE_COUNT),
            ext,
        };
        if h.level > MAX_LEVEL
            || h.split >= 1 << h.level
            || h.next_page > num_pages
            || h.next_page < 2
            || h.free_head >= h.next_page
        {
            return corrupt("bad header fields");
        }
        for (k, &e) in h.ext.iter().enumerate() {
            if e != 0
                && e.checked_add(ext_size(k))
                    .is_none_or(|end| end > h.next_page)
            {
                return corrupt("bucket extent outside the map");
            }
        }
        Ok(h)
    }

    fn encode(&self) -> Vec<u8> {
        let mut b = vec![0u8; PAGE_SIZE];
        b[..8].copy_from_slice(MAGIC);
        put_u64(&mut b, H_LEVEL, self.level);
        put_u64(&mut b, H_SPLIT, self.split);
        put_u64(&mut b, H_ENTRIES, self.entries);
        put_u64(&mut b, H_BYTES, self.bytes);
        put_u64(&mut b, H_FREE, self.free_head);
        put_u64(&mut b, H_NEXT, self.next_page);
        put_u64(&mut b, H_FREE_COUNT, self.free_count);
        for (k, e) in self.ext.iter().enumerate() {
            put_u64(&mut b, H_EXT + 8 * k, *e);
        }
        b
    }

    fn buckets(&self) -> u64 {
        (1 << self.level) + self.split
    }

    fn bucket_of(&self, h: u64) -> u64 {
        let b = h & ((1 << self.level) - 1);
        if b < self.split {
            h & ((1 << (self.level + 1)) - 1)
        } else {
            b
        }
    }
}

/// An entry parsed out of a bucket page.
#[derive(Clone, Copy, Debug)]
struct Entry {
    off: usize,
    size: usize,
    hash: u64,
    key_len: usize,
    val_len: usize,
    key_blob: bool,
    val_blob: bool,
}

impl Entry {
    fn key_off(&self) -> usize {
        self.off + E_HDR
    }

    fn val_off(&self) -> usize {
        self.key_off() + if self.key_blob { 8 } else { self.key_len }
    }
}

/// Size of an entry and where its key and value go.
fn entry_shape(key_len: usize, val_len: usize) -> (usize, bool, bool) {
    let kb = key_len > KEY_INLINE_MAX;
    let vb = val_len > VAL_INLINE_MAX;
    let size = E_HDR + if kb { 8 } else { key_len } + if vb { 8 } else { val_len };
    (size, kb, vb)
}

/// A bucket page: its overflow link and entries.
struct BucketPage {
    data: Vec<u8>,
    overflow: u64,
    entries: Vec<Entry>,
    used: usize,
}

fn parse_bucket(data: Vec<u8>) -> Result<BucketPage, MapError> {
    if data.len() != PAGE_SIZE {
        return corrupt("bad bucket page size");
    }
    let overflow = get_u64(&data, 0);
    let count = get_u16(&data, B_COUNT) as usize;
    let used = get_u16(&data, B_USED) as usize;
    if used > B_CAP {
        return corrupt("bucket page overfull");
    }
    let end = B_DATA + used;
    let mut off = B_DATA;
    let mut entries = Vec::with_capacity(count);
    for _ in 0..count {
        if off + E_HDR > end {
            return corrupt("bucket entry past its page");
        }
        let hash = get_u64(&data, off);
        let key_len = get_u32(&data, off + 8) as usize;
        let val_len = get_u32(&data, off + 12) as usize;
        let flags = data[off + 16];
        if key_len > MAX_LEN || val_len > MAX_LEN {
            return corrupt("bucket entry too long");
        }
        let (size, kb, vb) = entry_shape(key_len, val_len);
        if flags != u8::from(kb) | (u8::from(vb) << 1) || off + size > end {
            return corrupt("bad bucket entry");
        }
        entries.push(Entry {
            off,
            size,
            hash,
            key_len,
            val_len,
            key_blob: kb,
            val_blob: vb,
        });
        off += size;
    }
    if off != end {
        return corrupt("bucket entry bytes do not add up");
    }
    Ok(BucketPage {
        data,
        overflow,
        entries,
        used,
    })
}

fn build_bucket(overflow: u64, entries: &[&[u8]]) -> Vec<u8> {
    let mut b = vec![0u8; PAGE_SIZE];
    put_u64(&mut b, 0, overflow);
    let mut off = B_DATA;
    for e in entries {
        b[off..off + e.len()].copy_from_slice(e);
        off += e.len();
    }
    put_u16(&mut b, B_COUNT, entries.len() as u16);
    put_u16(&mut b, B_USED, (off - B_DATA) as u16);
    b
}

/// Where a key was found.
struct Found {
    page: u64,
    prev: Option<u64>,
    bucket: BucketPage,
    entry: Entry,
}

/// A hash map over a [`Pages`]; see the module docs for the layout.
///
/// Opening reads the header; every mutation writes what it changed before it
/// returns, so dropping the map loses nothing.
pub struct PagedMap<'p> {
    pages: &'p mut dyn Pages,
    hdr: Header,
    /// Whether the pages hold a map yet (an empty state holds none).
    init: bool,
}

impl<'p> PagedMap<'p> {
    /// Opens the map stored in `pages` (an empty `pages` is an empty map).
    pub fn open(pages: &'p mut dyn Pages) -> Result<PagedMap<'p>, MapError> {
        let n = pages.num_pages()?;
        if n == 0 {
            return Ok(PagedMap {
                pages,
                hdr: Header::fresh(),
                init: false,
            });
        }
        let hdr = Header::decode(&pages.read_page(0)?, n)?;
        Ok(PagedMap {
            pages,
            hdr,
            init: true,
        })
    }

    /// Number of entries.
    pub fn len(&self) -> u64 {
        self.hdr.entries
    }

    pub fn is_empty(&self) -> bool {
        self.hdr.entries == 0
    }

    /// Pages on the free list.
    pub fn free_pages(&self) -> u64 {
        self.hdr.free_count
    }

    /// The value stored under `key`.
    pub fn get(&mut self, key: &[u8]) -> Result<Option<Vec<u8>>, MapError> {
        if !self.init {
            return Ok(None);
        }
        let Some(f) = self.find(key)? else {
            return Ok(None);
        };
        Ok(Some(self.value_of(&f.bucket, &f.entry)?))
    }

    /// Stores `value` under `key`; returns whether a value was replaced.
    pub fn put(&mut self, key: &[u8], value: &[u8]) -> Result<bool, MapError> {
        for len in [key.len(), value.len()] {
            if len > MAX_LEN {
                return Err(MapError::TooLarge(len));
            }
        }
        self.ensure_init()?;
        let existed = self.remove(key)?;
        let (size, kb, vb) = entry_shape(key.len(), value.len());
        let mut e = Vec::with_capacity(size);
        e.extend_from_slice(&key_hash(key).to_le_bytes());
        e.extend_from_slice(&(key.len() as u32).to_le_bytes());
        e.extend_from_slice(&(value.len() as u32).to_le_bytes());
        e.push(u8::from(kb) | (u8::from(vb) << 1));
        if kb {
            let p = self.write_blob(key)?;
            e.extend_from_slice(&p.to_le_bytes());
        } else {
            e.extend_from_slice(key);
        }
        if vb {
            let p = self.write_blob(value)?;
            e.extend_from_slice(&p.to_le_bytes());
        } else {
            e.extend_from_slice(value);
        }
        debug_assert_eq!(e.len(), size);
        let b = self.hdr.bucket_of(key_hash(key));
        self.insert_entry(b, &e)?;
        self.hdr.entries = self.hdr.entries.saturating_add(1);
        self.hdr.bytes = self.hdr.bytes.saturating_add(size as u64);
        if self.hdr.bytes > self.hdr.buckets().saturating_mul(SPLIT_BYTES) {
            self.split()?;
        }
        self.save_header()?;
        Ok(existed)
    }

    /// Removes `key`; returns whether it was present.
    pub fn delete(&mut self, key: &[u8]) -> Result<bool, MapError> {
        if !self.init {
            return Ok(false);
        }
        let existed = self.remove(key)?;
        if existed {
            self.save_header()?;
        }
        Ok(existed)
    }

    fn ensure_init(&mut self) -> Result<(), MapError> {
        if !self.init {
            self.pages.grow(self.hdr.next_page)?;
            self.init = true;
            self.save_header()?;
        }
        Ok(())
    }

    fn save_header(&mut self) -> Result<(), MapError> {
        Ok(self.pages.write_page(0, &self.hdr.encode())?)
    }

    fn num_pages(&self) -> Result<u64, MapError> {
        Ok(self.pages.num_pages()?)
    }

    /// Checks a stored page link.
    fn check_link(&self, p: u64) -> Result<u64, MapError> {
        if p == 0 || p >= self.hdr.next_page {
            return corrupt(format!("bad page link {p}"));
        }
        Ok(p)
    }

    fn bucket_page(&self, b: u64) -> Result<u64, MapError> {
        let k = ext_index(b);
        if k >= BUCKET_EXTENTS || self.hdr.ext[k] == 0 {
            return corrupt(format!("bucket {b} has no extent"));
        }
        self.check_link(self.hdr.ext[k] + (b - ext_start(k)))
    }

    fn read_bucket(&mut self, p: u64) -> Result<BucketPage, MapError> {
        parse_bucket(self.pages.read_page(p)?)
    }

    fn find(&mut self, key: &[u8]) -> Result<Option<Found>, MapError> {
        let h = key_hash(key);
        let mut p = self.bucket_page(self.hdr.bucket_of(h))?;
        let mut prev = None;
        let limit = self.num_pages()?;
        for _ in 0..=limit {
            let bucket = self.read_bucket(p)?;
            for e in bucket.entries.iter().copied() {
                if e.hash == h && e.key_len == key.len() && self.key_eq(&bucket, &e, key)? {
                    return Ok(Some(Found {
                        page: p,
                        prev,
                        bucket,
                        entry: e,
                    }));
                }
            }
            if bucket.overflow == 0 {
                return Ok(None);
            }
            prev = Some(p);
            p = self.check_link(bucket.overflow)?;
        }
        corrupt("bucket chain loops")
    }

    fn key_eq(&mut self, b: &BucketPage, e: &Entry, key: &[u8]) -> Result<bool, MapError> {
        let o = e.key_off();
        if e.key_blob {
            let first = get_u64(&b.data, o);
            Ok(self.read_blob(first, e.key_len)? == key)
        } else {
            Ok(&b.data[o..o + e.key_len] == key)
        }
    }

    fn value_of(&mut self, b: &BucketPage, e: &Entry) -> Result<Vec<u8>, MapError> {
        let o = e.val_off();
        if e.val_blob {
            self.read_blob(get_u64(&b.data, o), e.val_len)
        } else {
            Ok(b.data[o..o + e.val_len].to_vec())
        }
    }

    /// Removes the entry of `key` if present, freeing its blobs (header
    /// counters updated, header not written).
    fn remove(&mut self, key: &[u8]) -> Result<bool, MapError> {
        let Some(f) = self.find(key)? else {
            return Ok(false);
        };
        let e = f.entry;
        if e.key_blob {
            self.free_blob(get_u64(&f.bucket.data, e.key_off()), e.key_len)?;
        }
        if e.val_blob {
            self.free_blob(get_u64(&f.bucket.data, e.val_off()), e.val_len)?;
        }
        let rest: Vec<&[u8]> = f
            .bucket
            .entries
            .iter()
            .filter(|x| x.off != e.off)
            .map(|x| &f.bucket.data[x.off..x.off + x.size])
            .collect();
        match f.prev {
            Some(prev) if rest.is_empty() => {
                // An emptied overflow page leaves the chain.
                let mut pb = self.read_bucket(prev)?;
                put_u64(&mut pb.data, 0, f.bucket.overflow);
                self.pages.write_page(prev, &pb.data)?;
                self.free_page(f.page)?;
            }
            _ => {
                let page = build_bucket(f.bucket.overflow, &rest);
                self.pages.write_page(f.page, &page)?;
            }
        }
        self.hdr.entries = self.hdr.entries.saturating_sub(1);
        self.hdr.bytes = self.hdr.bytes.saturating_sub(e.size as u64);
        Ok(true)
    }

    /// Appends an encoded entry to bucket `b`, in the first page of its
    /// chain with room, else in a new overflow page.
    fn insert_entry(&mut self, b: u64, entry: &[u8]) -> Result<(), MapError> {
        let mut p = self.bucket_page(b)?;
        let limit = self.num_pages()?;
        for _ in 0..=limit {
            let mut bucket = self.read_bucket(p)?;
            if B_CAP - bucket.used >= entry.len() {
                let off = B_DATA + bucket.used;
                bucket.data[off..off + entry.len()].copy_from_slice(entry);
                put_u16(&mut bucket.data, B_COUNT, bucket.entries.len() as u16 + 1);
                put_u16(&mut bucket.data, B_USED, (bucket.used + entry.len()) as u16);
                self.pages.write_page(p, &bucket.data)?;
                return Ok(());
            }
            if bucket.overflow == 0 {
                let q = self.alloc()?;
                self.pages.write_page(q, &build_bucket(0, &[entry]))?;
                put_u64(&mut bucket.data, 0, q);
                self.pages.write_page(p, &bucket.data)?;
                return Ok(());
            }
            p = self.check_link(bucket.overflow)?;
        }
        corrupt("bucket chain loops")
    }

    /// Splits bucket `split` into itself and bucket `2^level + split`.
    fn split(&mut self) -> Result<(), MapError> {
        let old = self.hdr.split;
        let new = (1u64 << self.hdr.level) + old;
        let k = ext_index(new);
        if k >= BUCKET_EXTENTS {
            return Ok(()); // the table is as large as it gets; chains grow instead
        }
        if self.hdr.ext[k] == 0 {
            if new != ext_start(k) {
                return corrupt("bucket extent missing");
            }
            self.hdr.ext[k] = self.hdr.next_page;
            self.hdr.next_page += ext_size(k);
            self.pages.grow(self.hdr.next_page)?;
        }
        // Gather the old bucket's chain.
        let first = self.bucket_page(old)?;
        let mut chain = vec![first];
        let mut stay: Vec<Vec<u8>> = Vec::new();
        let mut go: Vec<Vec<u8>> = Vec::new();
        let limit = self.num_pages()?;
        let mut p = first;
        loop {
            if chain.len() as u64 > limit + 1 {
                return corrupt("bucket chain loops");
            }
            let bucket = self.read_bucket(p)?;
            for e in &bucket.entries {
                let raw = bucket.data[e.off..e.off + e.size].to_vec();
                if (e.hash >> self.hdr.level) & 1 == 0 {
                    stay.push(raw);
                } else {
                    go.push(raw);
                }
            }
            if bucket.overflow == 0 {
                break;
            }
            p = self.check_link(bucket.overflow)?;
            chain.push(p);
        }
        let mut spare: VecDeque<u64> = chain[1..].iter().copied().collect();
        self.write_chain(first, &stay, &mut spare)?;
        for p in spare {
            self.free_page(p)?;
        }
        let new_page = self.bucket_page(new)?;
        self.write_chain(new_page, &go, &mut VecDeque::new())?;
        self.hdr.split += 1;
        if self.hdr.split == 1 << self.hdr.level {
            self.hdr.level += 1;
            self.hdr.split = 0;
        }
        Ok(())
    }

    /// Writes `entries` packed into a chain starting at page `first`,
    /// taking further pages from `spare`, then from the allocator.
    fn write_chain(
        &mut self,
        first: u64,
        entries: &[Vec<u8>],
        spare: &mut VecDeque<u64>,
    ) -> Result<(), MapError> {
        let mut groups: Vec<Vec<&[u8]>> = vec![Vec::new()];
        let mut used = 0;
        for e in entries {
            if used + e.len() > B_CAP {
                groups.push(Vec::new());
                used = 0;
            }
            used += e.len();
            groups.last_mut().expect("never empty").push(e);
        }
        let mut pages = vec![first];
        for _ in 1..groups.len() {
            let p = match spare.pop_front() {
                Some(p) => p,
                None => self.alloc()?,
            };
            pages.push(p);
        }
        for (i, g) in groups.iter().enumerate() {
            let next = pages.get(i + 1).copied().unwrap_or(0);
            self.pages.write_page(pages[i], &build_bucket(next, g))?;
        }
        Ok(())
    }

    /// A page for the caller to overwrite entirely.
    fn alloc(&mut self) -> Result<u64, MapError> {
        if self.hdr.free_head != 0 {
            let p = self.check_link(self.hdr.free_head)?;
            let page = self.pages.read_page(p)?;
            let next = get_u64(&page, 0);
            if next != 0 {
                self.check_link(next)?;
            }
            self.hdr.free_head = next;
            self.hdr.free_count = self.hdr.free_count.saturating_sub(1);
            return Ok(p);
        }
        let p = self.hdr.next_page;
        self.hdr.next_page = p
            .checked_add(1)
            .ok_or_else(|| MapError::Corrupt("page space exhausted".into()))?;
        self.pages.grow(self.hdr.next_page)?;
        Ok(p)
    }

    fn free_page(&mut self, p: u64) -> Result<(), MapError> {
        let mut page = vec![0u8; PAGE_SIZE];
        put_u64(&mut page, 0, self.hdr.free_head);
        self.pages.write_page(p, &page)?;
        self.hdr.free_head = p;
        self.hdr.free_count = self.hdr.free_count.saturating_add(1);
        Ok(())
    }

    fn write_blob(&mut self, data: &[u8]) -> Result<u64, MapError> {
        let n = blob_pages(data.len()).max(1);
        let mut pages = Vec::with_capacity(n);
        for _ in 0..n {
            pages.push(self.alloc()?);
        }
        for (i, chunk) in data.chunks(BLOB_DATA).enumerate() {
            let mut page = vec![0u8; PAGE_SIZE];
            put_u64(&mut page, 0, pages.get(i + 1).copied().unwrap_or(0));
            page[8..8 + chunk.len()].copy_from_slice(chunk);
            self.pages.write_page(pages[i], &page)?;
        }
        Ok(pages[0])
    }

    /// The pages of a blob of `len` bytes starting at `first`.
    fn blob_chain(&mut self, first: u64, len: usize) -> Result<Vec<(u64, Vec<u8>)>, MapError> {
        let n = blob_pages(len).max(1);
        let mut out = Vec::with_capacity(n);
        let mut p = self.check_link(first)?;
        for i in 0..n {
            let page = self.pages.read_page(p)?;
            let next = get_u64(&page, 0);
            out.push((p, page));
            if i + 1 < n {
                p = self.check_link(next)?;
            } else if next != 0 {
                return corrupt("blob longer than its length");
            }
        }
        Ok(out)
    }

    fn read_blob(&mut self, first: u64, len: usize) -> Result<Vec<u8>, MapError> {
        let mut out = Vec::with_capacity(len);
        for (_, page) in self.blob_chain(first, len)? {
            let take = (len - out.len()).min(BLOB_DATA);
            out.extend_from_slice(&page[8..8 + take]);
        }
        Ok(out)
    }

    fn free_blob(&mut self, first: u64, len: usize) -> Result<(), MapError> {
        for (p, _) in self.blob_chain(first, len)? {
            self.free_page(p)?;
        }
        Ok(())
    }
}
