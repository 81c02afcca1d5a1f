//! Helpers shared by the integration tests: small states and lying sources.
#![allow(dead_code)]

use std::sync::atomic::{AtomicU64, Ordering};
use zz_statefetch::proto::{FetchError, Request, Response};
use zz_statefetch::source::{PageSource, SourceFuture};
use zz_statefetch::{Certificate, PageStore, StoreConfig, PAGE_SIZE};

pub fn page(i: u64, version: u64) -> Vec<u8> {
    zz_statefetch::bench::page_contents(42, i, version)
}

pub fn fill(store: &PageStore, range: std::ops::Range<u64>, version: u64) {
    let pages: Vec<Vec<u8>> = range.clone().map(|i| page(i, version)).collect();
    store
        .write_pages(range.zip(pages.iter().map(|p| p.as_slice())))
        .unwrap();
}

pub fn open(dir: &std::path::Path) -> PageStore {
    PageStore::open(dir, StoreConfig::default()).unwrap()
}

/// A state of `n` pages at checkpoint 1 (the stale replica's view), and a
/// peer that went on: `changed` pages rewritten and `grown` pages added,
/// checkpoint 5.
pub struct Setup {
    pub _dir: tempfile::TempDir,
    pub honest: PageStore,
    pub local: PageStore,
    pub cert: Certificate,
    pub changed: Vec<u64>,
    pub n: u64,
}

pub fn setup(n: u64, changed_every: u64, grown: u64) -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let honest = open(&dir.path().join("honest"));
    let local = open(&dir.path().join("local"));
    for s in [&honest, &local] {
        fill(s, 0..n, 0);
        s.checkpoint(1).unwrap();
    }
    let mut changed: Vec<u64> = (0..n).step_by(changed_every as usize).collect();
    for &i in &changed {
        honest.write_page(i, &page(i, 1)).unwrap();
    }
    fill(&honest, n..n + grown, 1);
    changed.extend(n..n + grown);
    let root = honest.checkpoint(5).unwrap();
    Setup {
        _dir: dir,
        honest,
        local,
        cert: Certificate { seq: 5, root },
        changed,
        n: n + grown,
    }
}

/// The true contents of page `i` at the honest checkpoint.
pub fn truth(s: &Setup, i: u64) -> Vec<u8> {
    s.honest.read_page_at(5, i).unwrap()
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Lie {
    /// Flip a byte in every page.
    CorruptPage,
    /// Send the contents of the next page under the asked index.
    PageOfOtherIndex,
    /// Label the page with another index.
    Relabel,
    /// Tamper with every Merkle proof (page proofs and node ranges).
    WrongProof,
    /// Answer from an older checkpoint (different seq and root).
    Stale,
    /// Cut every page short.
    ShortPage,
    /// Corrupt every second page served.
    EverySecondPage,
    /// Tamper with leaf hashes in node ranges.
    WrongLeaves,
}

pub struct Liar {
    pub inner: zz_statefetch::LocalSource,
    pub store: PageStore,
    pub lie: Lie,
    pub pages_served: AtomicU64,
    pub name: String,
}

impl Liar {
    pub fn new(store: PageStore, lie: Lie) -> Liar {
        Liar {
            inner: zz_statefetch::LocalSource::new(store.clone(), "liar-inner"),
            store,
            lie,
            pages_served: AtomicU64::new(0),
            name: format!("liar-{lie:?}"),
        }
    }
}

impl PageSource for Liar {
    fn name(&self) -> String {
        self.name.clone()
    }

    fn call(&self, request: Request) -> SourceFuture<'_> {
        Box::pin(async move {
            let request = match (self.lie, request) {
                (
                    Lie::Stale,
                    Request::Pages {
                        indices, proofs, ..
                    },
                ) => {
                    let info = self.store.checkpoint_info(1).unwrap();
                    Request::Pages {
                        seq: info.seq,
                        root: info.root,
                        indices,
                        proofs,
                    }
                }
                (
                    Lie::Stale,
                    Request::Nodes {
                        level,
                        start,
                        count,
                        ..
                    },
                ) => {
                    let info = self.store.checkpoint_info(1).unwrap();
                    Request::Nodes {
                        seq: info.seq,
                        root: info.root,
                        level,
                        start,
                        count,
                    }
                }
                (_, r) => r,
            };
            let mut resp = self.inner.call(request).await?;
            match &mut resp {
                Response::Pages(reply) => {
                    let n = reply.num_pages;
                    for p in &mut reply.pages {
                        let count = self.pages_served.fetch_add(1, Ordering::SeqCst);
                        match self.lie {
                            Lie::CorruptPage => p.data[100] ^= 0xff,
                            Lie::EverySecondPage if count % 2 == 1 => p.data[7] ^= 1,
                            Lie::PageOfOtherIndex => {
                                let other = (p.index + 1) % n;
                                p.data = self.store.read_page_at(reply.seq, other).unwrap();
                            }
                            Lie::Relabel => p.index = (p.index + 1) % n,
                            Lie::WrongProof => {
                                if let Some(proof) = &mut p.proof {
                                    if let Some(s) = proof.first_mut() {
                                        s.0[0] ^= 1;
                                    }
                                }
                            }
                            Lie::ShortPage => p.data.truncate(PAGE_SIZE / 2),
                            _ => {}
                        }
                    }
                }
                Response::Nodes(range) => match self.lie {
                    Lie::WrongProof => {
                        if let Some(s) = range.siblings.first_mut() {
                            s.0[0] ^= 1;
                        }
                    }
                    Lie::WrongLeaves => {
                        if let Some(d) = range.nodes.last_mut() {
                            d.0[3] ^= 1;
                        }
                    }
                    _ => {}
                },
                _ => {}
            }
            Ok::<Response, FetchError>(resp)
        })
    }
}

/// An honest source that turns away its first few page requests (with a
/// transient error, not a fault) until the liar has served pages: the
/// recovery view rotates requests over its sources, and without this a run
/// could fetch every page from the honest source and never meet the lie.
pub struct HonestAfterLiar {
    pub inner: zz_statefetch::LocalSource,
    pub liar: std::sync::Arc<Liar>,
    pub refusals_left: AtomicU64,
}

impl HonestAfterLiar {
    pub fn new(store: PageStore, liar: std::sync::Arc<Liar>) -> HonestAfterLiar {
        HonestAfterLiar {
            inner: zz_statefetch::LocalSource::new(store, "honest"),
            liar,
            // Bounded: a liar excluded before any page request (its lie is in
            // the Merkle nodes) must not keep the honest source away.
            refusals_left: AtomicU64::new(3),
        }
    }
}

impl PageSource for HonestAfterLiar {
    fn name(&self) -> String {
        "honest".into()
    }

    fn call(&self, request: Request) -> SourceFuture<'_> {
        Box::pin(async move {
            let turn_away = matches!(request, Request::Pages { .. })
                && self.liar.pages_served.load(Ordering::SeqCst) == 0
                && self
                    .refusals_left
                    .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                    .is_ok();
            if turn_away {
                return Err(FetchError::Timeout);
            }
            self.inner.call(request).await
        })
    }
}
