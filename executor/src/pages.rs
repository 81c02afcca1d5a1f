//! Page access: the one way an execution replica touches application state.
//!
//! All state lives in 4 KiB pages ([`PAGE_SIZE`]), so that it can be
//! checkpointed, Merkle-certified and fetched page by page (DESIGN §4-5).
//!
//! - [`Pages`]: read, write and grow a vector of pages. Apps are written
//!   against it only.
//! - [`StateBackend`]: [`Pages`] plus what the execution core needs from a
//!   store: atomic multi-page writes, checkpoints and their release.
//!
//! Two backends:
//! - [`PageStore`] (the sled store of `zz-statefetch`), for a replica whose
//!   state is complete;
//! - [`RecoveringState`], a [`RecoveryView`] over a [`PageStore`], for a
//!   replica fetching a certified checkpoint on demand: reading a page that
//!   is still missing blocks until it is fetched and verified, so an app runs
//!   unchanged while its state arrives.

use std::sync::Arc;
use zz_statefetch::recovery::Progress;
use zz_statefetch::{
    Certificate, PageSource, PageStore, RecoveryConfig, RecoveryError, RecoveryView, StoreError,
    PAGE_SIZE,
};
use zz_wire::{Digest, Seq};

/// Errors of page access. All of them are local failures (storage, fetch,
/// corrupt executor metadata), never the result of a malformed operation.
#[derive(Debug, thiserror::Error)]
pub enum PageError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Recovery(#[from] RecoveryError),
    #[error("page {index} is outside a state of {num_pages} pages")]
    OutOfRange { index: u64, num_pages: u64 },
    #[error("a page must be {PAGE_SIZE} bytes, got {0}")]
    PageSize(usize),
    #[error("state of {0} pages is too large")]
    TooLarge(u64),
    #[error("corrupt executor state: {0}")]
    Corrupt(String),
}

/// A growable vector of [`PAGE_SIZE`]-byte pages; new pages read as zeros.
///
/// Methods take `&mut self` so that implementations may buffer and cache.
pub trait Pages {
    /// Current number of pages.
    fn num_pages(&self) -> Result<u64, PageError>;

    /// Reads page `index`, which must be below [`num_pages`](Self::num_pages).
    fn read_page(&mut self, index: u64) -> Result<Vec<u8>, PageError>;

    /// Writes page `index` (`data` must be exactly [`PAGE_SIZE`] bytes). An
    /// index at or past the end grows the state to `index + 1` pages.
    fn write_page(&mut self, index: u64, data: &[u8]) -> Result<(), PageError>;

    /// Grows the state to at least `num_pages` pages (never shrinks).
    fn grow(&mut self, num_pages: u64) -> Result<(), PageError>;
}

/// What the execution core needs from the store under an app's pages.
pub trait StateBackend: Pages + Send {
    /// Writes several pages, atomically where the backend can (the store
    /// applies them as one batch, so a crash never leaves half a batch).
    fn write_pages(&mut self, pages: &[(u64, &[u8])]) -> Result<(), PageError> {
        for (i, p) in pages {
            self.write_page(*i, p)?;
        }
        Ok(())
    }

    /// Takes checkpoint `seq` of the current pages, durably, and returns its
    /// Merkle root; `None` if this backend cannot certify its state yet (a
    /// recovery that has not fetched every page).
    fn checkpoint(&mut self, seq: Seq) -> Result<Option<Digest>, PageError>;

    /// Root of a retained checkpoint.
    fn checkpoint_root(&self, seq: Seq) -> Result<Option<Digest>, PageError>;

    /// Releases retained checkpoints before `seq` (never the latest), the
    /// newest stable one, and keeps `seq` retained whatever the store's
    /// bound: recovering peers are told to fetch it.
    fn release_before(&mut self, seq: Seq) -> Result<(), PageError>;
}

fn check_size(data: &[u8]) -> Result<(), PageError> {
    if data.len() != PAGE_SIZE {
        return Err(PageError::PageSize(data.len()));
    }
    Ok(())
}

impl Pages for PageStore {
    fn num_pages(&self) -> Result<u64, PageError> {
        Ok(PageStore::num_pages(self)?)
    }

    fn read_page(&mut self, index: u64) -> Result<Vec<u8>, PageError> {
        Ok(PageStore::read_page(self, index)?)
    }

    fn write_page(&mut self, index: u64, data: &[u8]) -> Result<(), PageError> {
        check_size(data)?;
        Ok(PageStore::write_page(self, index, data)?)
    }

    fn grow(&mut self, num_pages: u64) -> Result<(), PageError> {
        if num_pages > PageStore::num_pages(self)? {
            PageStore::grow(self, num_pages)?;
        }
        Ok(())
    }
}

impl StateBackend for PageStore {
    fn write_pages(&mut self, pages: &[(u64, &[u8])]) -> Result<(), PageError> {
        for (_, p) in pages {
            check_size(p)?;
        }
        Ok(PageStore::write_pages(self, pages.iter().copied())?)
    }

    fn checkpoint(&mut self, seq: Seq) -> Result<Option<Digest>, PageError> {
        Ok(Some(PageStore::checkpoint(self, seq)?))
    }

    fn checkpoint_root(&self, seq: Seq) -> Result<Option<Digest>, PageError> {
        match self.checkpoint_info(seq) {
            Ok(info) => Ok(Some(info.root)),
            Err(StoreError::UnknownCheckpoint(_)) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    fn release_before(&mut self, seq: Seq) -> Result<(), PageError> {
        PageStore::pin(self, Some(seq))?;
        Ok(PageStore::release_before(self, seq)?)
    }
}

/// The state of a replica recovering a certified checkpoint C: a
/// [`RecoveryView`] over the local [`PageStore`].
///
/// - Pages of C are read through the view: a page not yet known good is
///   fetched and verified first (the read blocks meanwhile).
/// - Pages past C (the app grew its state while recovering) are local; the
///   view holds their writes until it writes its staged pages to the store.
/// - Writes go through the view, so a background fetch never overwrites them.
/// - [`StateBackend::checkpoint`] returns `None` until every page of C is
///   present: a replica cannot certify a state it does not fully hold. The
///   first checkpoint after the fetch completes is taken normally.
///
/// Reads block the calling thread, so the execution core must run on a
/// thread of its own, not on an async runtime's worker.
pub struct RecoveringState {
    view: Arc<RecoveryView>,
    store: PageStore,
    /// The store's page count, kept here: asking the store takes its lock,
    /// which the background holds while it stores fetched pages, and the
    /// execution core asks for every batch. Only this state grows the store
    /// during recovery (pages the view holds count in its `grown_end`).
    store_pages: u64,
}

impl std::fmt::Debug for RecoveringState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RecoveringState")
            .field("certificate", &self.view.certificate())
            .finish_non_exhaustive()
    }
}

impl RecoveringState {
    /// Opens a recovery of `cert` over `store`, fetching from `sources`.
    /// Must run inside a tokio runtime (the background fetch runs there).
    pub async fn open(
        store: PageStore,
        cert: Certificate,
        sources: Vec<Arc<dyn PageSource>>,
        config: RecoveryConfig,
    ) -> Result<RecoveringState, PageError> {
        let view = RecoveryView::open(store.clone(), cert, sources, config).await?;
        RecoveringState::new(Arc::new(view), store)
    }

    /// Wraps a view already opened over `store` (it must be the same store).
    pub fn new(view: Arc<RecoveryView>, store: PageStore) -> Result<RecoveringState, PageError> {
        let store_pages = store.num_pages()?;
        Ok(RecoveringState {
            view,
            store,
            store_pages,
        })
    }

    /// The view, e.g. to watch progress or wait for completion.
    pub fn view(&self) -> &Arc<RecoveryView> {
        &self.view
    }

    /// The local store under the view.
    pub fn store(&self) -> &PageStore {
        &self.store
    }

    /// Whether every page of the checkpoint is present locally.
    pub fn is_complete(&self) -> bool {
        complete(&self.view.progress())
    }
}

fn complete(p: &Progress) -> bool {
    p.finished && p.missing == 0 && p.present == p.num_pages
}

impl Pages for RecoveringState {
    fn num_pages(&self) -> Result<u64, PageError> {
        // Opening the view grew the store to C's size; growth since is local:
        // in the store (`grow`) or in pages the view still holds.
        Ok(self
            .store_pages
            .max(self.view.num_pages())
            .max(self.view.grown_end()))
    }

    fn read_page(&mut self, index: u64) -> Result<Vec<u8>, PageError> {
        if index < self.view.num_pages() {
            Ok(self.view.read_blocking(index)?)
        } else {
            Ok(self.view.read_grown(index)?)
        }
    }

    fn write_page(&mut self, index: u64, data: &[u8]) -> Result<(), PageError> {
        check_size(data)?;
        Ok(self.view.write(index, data)?)
    }

    fn grow(&mut self, num_pages: u64) -> Result<(), PageError> {
        if num_pages > self.store_pages {
            Pages::grow(&mut self.store, num_pages)?;
            self.store_pages = num_pages;
        }
        Ok(())
    }
}

impl StateBackend for RecoveringState {
    fn write_pages(&mut self, pages: &[(u64, &[u8])]) -> Result<(), PageError> {
        for (_, p) in pages {
            check_size(p)?;
        }
        Ok(self.view.write_pages(pages)?)
    }

    fn checkpoint(&mut self, seq: Seq) -> Result<Option<Digest>, PageError> {
        if !self.is_complete() {
            return Ok(None);
        }
        // Pages fetched for on-demand reads may still be staged in memory.
        self.view.persist_staged()?;
        Ok(Some(self.store.checkpoint(seq)?))
    }

    fn checkpoint_root(&self, seq: Seq) -> Result<Option<Digest>, PageError> {
        StateBackend::checkpoint_root(&self.store, seq)
    }

    fn release_before(&mut self, seq: Seq) -> Result<(), PageError> {
        self.store.pin(Some(seq))?;
        Ok(self.store.release_before(seq)?)
    }
}
