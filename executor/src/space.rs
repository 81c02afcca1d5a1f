//! The executor's page space: a superblock and two growable regions.
//!
//! The certified state of an execution replica holds two things that both
//! grow: the executor's own metadata (the reply table, so that
//! de-duplication survives state transfer) and the app's pages. They share
//! one physical page vector, split into **regions**:
//!
//! | physical page | content |
//! |---|---|
//! | 0 | superblock |
//! | 1.. | extents of the regions, allocated in the order regions grow |
//!
//! Region `r`'s virtual page `v` lives in extent `k(v)`: extent 0 holds
//! virtual pages `[0, 16)`, extent `k >= 1` holds `[16·2^(k-1), 16·2^k)`.
//! Extents double, so a region of `n` pages has `O(log n)` extents, whose
//! physical starts fit in the superblock, and address translation is
//! arithmetic. Physical pages are handed out by a bump pointer; the
//! physical state is grown only as far as pages are actually used, so the
//! region that grew last (normally the app) costs no unused pages.
//!
//! Superblock layout (little-endian):
//!
//! | bytes | field |
//! |---|---|
//! | 0..8 | magic `zzEXEC01` |
//! | 8..16 | last executed `app_seq` |
//! | 16..24 | next free physical page (bump pointer) |
//! | 24.. | per region: pages (u64), then [`MAX_EXTENTS`] extent starts (u64, 0 = none) |
//!
//! The superblock is rewritten by every batch (its `app_seq` changes), in the
//! same atomic store batch as the batch's pages, so after a crash the stored
//! pages are always exactly the state after the recorded `app_seq`.

use crate::pages::{PageError, Pages};
use zz_statefetch::PAGE_SIZE;

const MAGIC: &[u8; 8] = b"zzEXEC01";
/// Virtual pages in extent 0 (and 1).
pub const EXTENT_BASE: u64 = 16;
/// Extent slots per region: enough for `16·2^39` pages.
pub const MAX_EXTENTS: usize = 40;
/// Largest region, in pages.
pub const MAX_REGION_PAGES: u64 = 1 << 40;
/// Number of regions.
pub const NUM_REGIONS: usize = 2;
/// Region of the executor's reply table.
pub const REGION_REPLIES: usize = 0;
/// Region of the app's pages.
pub const REGION_APP: usize = 1;

const REGION_BYTES: usize = 8 + 8 * MAX_EXTENTS;
const _: () = assert!(24 + NUM_REGIONS * REGION_BYTES <= PAGE_SIZE);

fn get_u64(b: &[u8], off: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[off..off + 8]);
    u64::from_le_bytes(a)
}

fn put_u64(b: &mut [u8], off: usize, v: u64) {
    b[off..off + 8].copy_from_slice(&v.to_le_bytes());
}

/// Extent index and offset of virtual page `v`.
fn extent_of(v: u64) -> (usize, u64) {
    if v < EXTENT_BASE {
        (0, v)
    } else {
        let k = (64 - (v / EXTENT_BASE).leading_zeros()) as usize;
        (k, v - extent_start(k))
    }
}

fn extent_start(k: usize) -> u64 {
    if k == 0 {
        0
    } else {
        EXTENT_BASE << (k - 1)
    }
}

fn extent_size(k: usize) -> u64 {
    if k == 0 {
        EXTENT_BASE
    } else {
        EXTENT_BASE << (k - 1)
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct RegionInfo {
    num_pages: u64,
    extents: [u64; MAX_EXTENTS],
}

/// The decoded superblock; see the module docs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Superblock {
    /// Last `app_seq` whose batch is reflected in the pages.
    pub app_seq: u64,
    phys_next: u64,
    regions: [RegionInfo; NUM_REGIONS],
}

impl Superblock {
    fn fresh() -> Superblock {
        Superblock {
            app_seq: 0,
            phys_next: 1,
            regions: std::array::from_fn(|_| RegionInfo {
                num_pages: 0,
                extents: [0; MAX_EXTENTS],
            }),
        }
    }

    /// Reads the superblock; an empty state is a fresh one at `app_seq` 0.
    pub fn load(pages: &mut dyn Pages) -> Result<Superblock, PageError> {
        if pages.num_pages()? == 0 {
            return Ok(Superblock::fresh());
        }
        let b = pages.read_page(0)?;
        Superblock::decode(&b)
    }

    fn decode(b: &[u8]) -> Result<Superblock, PageError> {
        let corrupt = |m: &str| PageError::Corrupt(format!("superblock: {m}"));
        if b.len() != PAGE_SIZE {
            return Err(corrupt("bad page size"));
        }
        if &b[..8] != MAGIC {
            return Err(corrupt("bad magic"));
        }
        let mut sb = Superblock::fresh();
        sb.app_seq = get_u64(b, 8);
        sb.phys_next = get_u64(b, 16);
        if sb.phys_next == 0 {
            return Err(corrupt("bad allocation pointer"));
        }
        for (r, info) in sb.regions.iter_mut().enumerate() {
            let base = 24 + r * REGION_BYTES;
            info.num_pages = get_u64(b, base);
            if info.num_pages > MAX_REGION_PAGES {
                return Err(corrupt("region too large"));
            }
            for (k, e) in info.extents.iter_mut().enumerate() {
                *e = get_u64(b, base + 8 + 8 * k);
                let end = e.checked_add(extent_size(k));
                if *e != 0 && end.is_none_or(|end| end > sb.phys_next) {
                    return Err(corrupt("extent outside the allocated space"));
                }
            }
            if info.num_pages > 0 {
                let (last, _) = extent_of(info.num_pages - 1);
                if info.extents[..=last].contains(&0) {
                    return Err(corrupt("region pages without an extent"));
                }
            }
        }
        Ok(sb)
    }

    fn encode(&self) -> Vec<u8> {
        let mut b = vec![0u8; PAGE_SIZE];
        b[..8].copy_from_slice(MAGIC);
        put_u64(&mut b, 8, self.app_seq);
        put_u64(&mut b, 16, self.phys_next);
        for (r, info) in self.regions.iter().enumerate() {
            let base = 24 + r * REGION_BYTES;
            put_u64(&mut b, base, info.num_pages);
            for (k, e) in info.extents.iter().enumerate() {
                put_u64(&mut b, base + 8 + 8 * k, *e);
            }
        }
        b
    }

    /// Writes the superblock to physical page 0.
    pub fn store(&self, pages: &mut dyn Pages) -> Result<(), PageError> {
        pages.write_page(0, &self.encode())
    }

    /// Pages of region `r`.
    pub fn region_pages(&self, r: usize) -> u64 {
        self.regions.get(r).map_or(0, |i| i.num_pages)
    }

    /// Physical page of region `r`'s virtual page `v` (which must be inside the region).
    fn physical(&self, r: usize, v: u64) -> Result<u64, PageError> {
        let info = &self.regions[r];
        if v >= info.num_pages {
            return Err(PageError::OutOfRange {
                index: v,
                num_pages: info.num_pages,
            });
        }
        let (k, off) = extent_of(v);
        match info.extents[k] {
            0 => Err(PageError::Corrupt(format!("region {r} page {v} unmapped"))),
            start => Ok(start + off),
        }
    }

    /// Grows region `r` to `n` pages, allocating extents; returns the
    /// physical page count needed to hold its last page.
    fn grow_region(&mut self, r: usize, n: u64) -> Result<Option<u64>, PageError> {
        if n <= self.regions[r].num_pages {
            return Ok(None);
        }
        if n > MAX_REGION_PAGES {
            return Err(PageError::TooLarge(n));
        }
        let (last, _) = extent_of(n - 1);
        for k in 0..=last {
            if self.regions[r].extents[k] == 0 {
                let start = self.phys_next;
                self.phys_next = start
                    .checked_add(extent_size(k))
                    .ok_or(PageError::TooLarge(u64::MAX))?;
                self.regions[r].extents[k] = start;
            }
        }
        self.regions[r].num_pages = n;
        Ok(Some(self.physical(r, n - 1)? + 1))
    }
}

/// One region of the page space, seen as a [`Pages`] of its own.
pub struct Region<'s> {
    phys: &'s mut dyn Pages,
    sb: &'s mut Superblock,
    region: usize,
}

impl<'s> Region<'s> {
    /// Region `region` (one of [`REGION_REPLIES`], [`REGION_APP`]).
    pub fn new(phys: &'s mut dyn Pages, sb: &'s mut Superblock, region: usize) -> Region<'s> {
        assert!(region < NUM_REGIONS, "region index out of range");
        Region { phys, sb, region }
    }
}

impl Pages for Region<'_> {
    fn num_pages(&self) -> Result<u64, PageError> {
        Ok(self.sb.regions[self.region].num_pages)
    }

    fn read_page(&mut self, index: u64) -> Result<Vec<u8>, PageError> {
        let p = self.sb.physical(self.region, index)?;
        if p >= self.phys.num_pages()? {
            // Allocated but never used: zeros.
            return Ok(vec![0; PAGE_SIZE]);
        }
        self.phys.read_page(p)
    }

    fn write_page(&mut self, index: u64, data: &[u8]) -> Result<(), PageError> {
        if data.len() != PAGE_SIZE {
            return Err(PageError::PageSize(data.len()));
        }
        let end = index.checked_add(1).ok_or(PageError::TooLarge(index))?;
        self.grow(end)?;
        let p = self.sb.physical(self.region, index)?;
        self.phys.write_page(p, data)
    }

    fn grow(&mut self, num_pages: u64) -> Result<(), PageError> {
        if let Some(needed) = self.sb.grow_region(self.region, num_pages)? {
            self.phys.grow(needed)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A plain in-memory page vector, for testing the layout only.
    struct Vecs(Vec<Vec<u8>>);

    impl Pages for Vecs {
        fn num_pages(&self) -> Result<u64, PageError> {
            Ok(self.0.len() as u64)
        }
        fn read_page(&mut self, index: u64) -> Result<Vec<u8>, PageError> {
            self.0
                .get(index as usize)
                .cloned()
                .ok_or(PageError::OutOfRange {
                    index,
                    num_pages: self.0.len() as u64,
                })
        }
        fn write_page(&mut self, index: u64, data: &[u8]) -> Result<(), PageError> {
            self.grow(index + 1)?;
            self.0[index as usize] = data.to_vec();
            Ok(())
        }
        fn grow(&mut self, n: u64) -> Result<(), PageError> {
            while (self.0.len() as u64) < n {
                self.0.push(vec![0; PAGE_SIZE]);
            }
            Ok(())
        }
    }

    #[test]
    fn extents_double_and_cover_every_page() {
        let mut expect_start = 0;
        for k in 0..10 {
            assert_eq!(extent_start(k), expect_start);
            for v in extent_start(k)..extent_start(k) + extent_size(k) {
                assert_eq!(extent_of(v), (k, v - extent_start(k)));
            }
            expect_start += extent_size(k);
        }
    }

    #[test]
    fn regions_are_disjoint_and_survive_reencoding() {
        let mut phys = Vecs(Vec::new());
        let mut sb = Superblock::load(&mut phys).unwrap();
        let page = |r: u8, v: u64| {
            let mut p = vec![r; PAGE_SIZE];
            p[..8].copy_from_slice(&v.to_le_bytes());
            p
        };
        // Interleaved growth of both regions.
        for round in 0..6u64 {
            for r in 0..NUM_REGIONS {
                let n = (round + 1) * (7 + 20 * r as u64);
                let mut reg = Region::new(&mut phys, &mut sb, r);
                for v in reg.num_pages().unwrap()..n {
                    reg.write_page(v, &page(r as u8, v)).unwrap();
                }
            }
        }
        sb.app_seq = 42;
        sb.store(&mut phys).unwrap();
        let mut sb2 = Superblock::load(&mut phys).unwrap();
        assert_eq!(sb2, sb);
        assert_eq!(sb2.app_seq, 42);
        for r in 0..NUM_REGIONS {
            let mut reg = Region::new(&mut phys, &mut sb2, r);
            let n = reg.num_pages().unwrap();
            assert_eq!(n, 6 * (7 + 20 * r as u64));
            for v in 0..n {
                assert_eq!(reg.read_page(v).unwrap(), page(r as u8, v));
            }
            assert!(reg.read_page(n).is_err());
        }
    }

    #[test]
    fn corrupt_superblock_is_an_error_not_a_panic() {
        let mut b = Superblock::fresh().encode();
        assert!(Superblock::decode(&b).is_ok());
        b[0] ^= 1;
        assert!(Superblock::decode(&b).is_err());
        let mut sb = Superblock::fresh();
        sb.grow_region(1, 100).unwrap();
        let mut b = sb.encode();
        put_u64(&mut b, 16, 3); // allocation pointer below the extents
        assert!(Superblock::decode(&b).is_err());
        let mut b = sb.encode();
        put_u64(&mut b, 24 + REGION_BYTES + 8 + 8, 0); // a hole in the extents
        assert!(Superblock::decode(&b).is_err());
    }
}
