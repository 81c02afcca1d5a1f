//! A write-back page buffer for one batch.
//!
//! The execution core runs every request of one `app_seq` against a [`Tx`]:
//! pages read are cached, pages written are kept in memory, and
//! [`Tx::commit`] hands every written page to the backend in one
//! [`StateBackend::write_pages`] call (one atomic store batch). So a batch is
//! applied whole or not at all, and a page written by many requests of a
//! batch (a table header, say) reaches the store once. Growth travels in
//! the same call: a crash cannot leave the state grown but not written.
//!
//! The buffer lives only for one batch: it is a cache of pages, never a
//! second copy of the application's state.

use crate::pages::{PageError, Pages, StateBackend};
use std::collections::BTreeMap;
use zz_statefetch::PAGE_SIZE;

struct Cached {
    data: Vec<u8>,
    dirty: bool,
}

/// Buffered page access over a [`StateBackend`]; see the module docs.
pub struct Tx<'a> {
    backend: &'a mut dyn StateBackend,
    cache: BTreeMap<u64, Cached>,
    /// Pages the backend holds.
    base_pages: u64,
    /// Pages including growth in this batch.
    num_pages: u64,
}

impl<'a> Tx<'a> {
    pub fn new(backend: &'a mut dyn StateBackend) -> Result<Tx<'a>, PageError> {
        let n = backend.num_pages()?;
        Ok(Tx {
            backend,
            cache: BTreeMap::new(),
            base_pages: n,
            num_pages: n,
        })
    }

    /// Pages written since the last commit.
    pub fn dirty_pages(&self) -> usize {
        self.cache.values().filter(|c| c.dirty).count()
    }

    /// Applies the batch to the backend: every written page in one call,
    /// growth included (the new last page is written, as zeros if nothing
    /// else wrote it, so the store grows in the same atomic batch). The
    /// cache is emptied.
    pub fn commit(&mut self) -> Result<(), PageError> {
        if self.num_pages > self.base_pages {
            let last = self.num_pages - 1;
            if !self.cache.get(&last).is_some_and(|c| c.dirty) {
                // Past the backend's end, so it is zeros.
                self.cache.insert(
                    last,
                    Cached {
                        data: vec![0; PAGE_SIZE],
                        dirty: true,
                    },
                );
            }
        }
        let cache = std::mem::take(&mut self.cache);
        let dirty: Vec<(u64, &[u8])> = cache
            .iter()
            .filter(|(_, c)| c.dirty)
            .map(|(i, c)| (*i, c.data.as_slice()))
            .collect();
        if !dirty.is_empty() {
            self.backend.write_pages(&dirty)?;
        }
        self.base_pages = self.num_pages;
        Ok(())
    }
}

impl Pages for Tx<'_> {
    fn num_pages(&self) -> Result<u64, PageError> {
        Ok(self.num_pages)
    }

    fn read_page(&mut self, index: u64) -> Result<Vec<u8>, PageError> {
        if index >= self.num_pages {
            return Err(PageError::OutOfRange {
                index,
                num_pages: self.num_pages,
            });
        }
        if let Some(c) = self.cache.get(&index) {
            return Ok(c.data.clone());
        }
        let data = if index >= self.base_pages {
            vec![0; PAGE_SIZE]
        } else {
            let d = self.backend.read_page(index)?;
            if d.len() != PAGE_SIZE {
                return Err(PageError::PageSize(d.len()));
            }
            d
        };
        self.cache.insert(
            index,
            Cached {
                data: data.clone(),
                dirty: false,
            },
        );
        Ok(data)
    }

    fn write_page(&mut self, index: u64, data: &[u8]) -> Result<(), PageError> {
        if data.len() != PAGE_SIZE {
            return Err(PageError::PageSize(data.len()));
        }
        let end = index.checked_add(1).ok_or(PageError::TooLarge(u64::MAX))?;
        self.num_pages = self.num_pages.max(end);
        self.cache.insert(
            index,
            Cached {
                data: data.to_vec(),
                dirty: true,
            },
        );
        Ok(())
    }

    fn grow(&mut self, num_pages: u64) -> Result<(), PageError> {
        self.num_pages = self.num_pages.max(num_pages);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn page(b: u8) -> Vec<u8> {
        vec![b; PAGE_SIZE]
    }

    #[test]
    fn writes_reach_the_store_only_at_commit_with_growth() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = crate::testutil::open_store(dir.path());
        store.write_page(0, &page(1)).unwrap();
        {
            let mut tx = Tx::new(&mut store).unwrap();
            tx.write_page(0, &page(2)).unwrap();
            tx.grow(5).unwrap();
            assert_eq!(tx.read_page(0).unwrap(), page(2));
            assert_eq!(tx.read_page(4).unwrap(), page(0));
            assert!(tx.read_page(5).is_err());
            assert!(tx.write_page(1, &[0; 7]).is_err());
            assert_eq!(tx.num_pages().unwrap(), 5);
            assert_eq!(tx.dirty_pages(), 1);
            // Dropped without commit: nothing happened.
        }
        assert_eq!(store.num_pages().unwrap(), 1);
        assert_eq!(store.read_page(0).unwrap(), page(1));
        let mut tx = Tx::new(&mut store).unwrap();
        tx.write_page(0, &page(2)).unwrap();
        tx.grow(5).unwrap();
        tx.write_page(2, &page(3)).unwrap();
        tx.commit().unwrap();
        drop(tx);
        assert_eq!(store.num_pages().unwrap(), 5);
        assert_eq!(store.read_page(0).unwrap(), page(2));
        assert_eq!(store.read_page(2).unwrap(), page(3));
        assert_eq!(store.read_page(4).unwrap(), page(0));
    }
}
