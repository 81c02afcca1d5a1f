//! Property tests: any sequence of writes, growth, checkpoints, releases,
//! rollbacks and reopens gives the roots, pages and proofs that a from-scratch
//! computation over a plain in-memory model gives.

mod common;

use proptest::prelude::*;
use std::collections::BTreeMap;
use zz_statefetch::{merkle, MerkleTree, PageStore, StoreConfig, PAGE_SIZE};

#[derive(Clone, Debug)]
enum Op {
    Write(u64, u64),
    Grow(u64),
    Checkpoint,
    Release(usize),
    Rollback,
    Reopen,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        8 => (0..40u64, 0..1000u64).prop_map(|(i, v)| Op::Write(i, v)),
        1 => (0..6u64).prop_map(Op::Grow),
        3 => Just(Op::Checkpoint),
        1 => (0..4usize).prop_map(Op::Release),
        1 => Just(Op::Rollback),
        1 => Just(Op::Reopen),
    ]
}

const MAX_CKPTS: usize = 3;

fn open(dir: &std::path::Path) -> PageStore {
    PageStore::open(
        dir,
        StoreConfig {
            max_checkpoints: MAX_CKPTS,
            ..Default::default()
        },
    )
    .unwrap()
}

proptest! {
    // 48 cases keep the suite fast; set PROPTEST_CASES for a longer search.
    #![proptest_config(ProptestConfig::with_cases(
        std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(48)
    ))]

    #[test]
    fn store_matches_from_scratch_model(ops in proptest::collection::vec(op(), 1..40)) {
        let dir = tempfile::tempdir().unwrap();
        let mut store = open(dir.path());
        let mut pages: Vec<Vec<u8>> = Vec::new();
        let mut ckpts: BTreeMap<u64, Vec<Vec<u8>>> = BTreeMap::new();
        let mut seq = 0u64;
        for op in ops {
            match op {
                Op::Write(i, v) => {
                    let p = common::page(i, v);
                    store.write_page(i, &p).unwrap();
                    if pages.len() as u64 <= i {
                        pages.resize(i as usize + 1, vec![0; PAGE_SIZE]);
                    }
                    pages[i as usize] = p;
                }
                Op::Grow(k) => {
                    let n = pages.len() as u64 + k;
                    store.grow(n).unwrap();
                    pages.resize(n as usize, vec![0; PAGE_SIZE]);
                }
                Op::Checkpoint => {
                    seq += 1 + seq % 3;
                    let root = store.checkpoint(seq).unwrap();
                    prop_assert_eq!(root, MerkleTree::from_pages(&pages).root());
                    ckpts.insert(seq, pages.clone());
                    while ckpts.len() > MAX_CKPTS {
                        ckpts.pop_first();
                    }
                }
                Op::Release(k) => {
                    let candidates: Vec<u64> = ckpts.keys().rev().skip(1).copied().collect();
                    if let Some(&s) = candidates.get(k) {
                        store.release(s).unwrap();
                        ckpts.remove(&s);
                    }
                }
                Op::Rollback => {
                    if let Some((_, snap)) = ckpts.last_key_value() {
                        store.rollback_to_latest().unwrap();
                        pages = snap.clone();
                    }
                }
                Op::Reopen => {
                    drop(store);
                    store = open(dir.path());
                }
            }
            prop_assert_eq!(store.num_pages().unwrap(), pages.len() as u64);
        }
        let retained: Vec<u64> = store.checkpoints().unwrap().iter().map(|c| c.seq).collect();
        prop_assert_eq!(retained, ckpts.keys().copied().collect::<Vec<_>>());
        for (&s, snap) in &ckpts {
            let tree = MerkleTree::from_pages(snap);
            let info = store.checkpoint_info(s).unwrap();
            prop_assert_eq!(info.root, tree.root());
            let n = snap.len() as u64;
            prop_assert_eq!(info.num_pages, n);
            if n == 0 {
                continue;
            }
            let idx: Vec<u64> = (0..n).collect();
            let (_, got) = store.read_pages_at(s, &idx, true).unwrap();
            for p in got {
                prop_assert_eq!(&p.data, &snap[p.index as usize]);
                merkle::verify_page(&info.root, n, p.index, &p.data, &p.proof.unwrap()).unwrap();
            }
            for level in 0..=merkle::depth(n) {
                let len = merkle::level_len(level, n);
                let (_, nodes, sib) = store.node_range(s, level, len / 3, len - len / 3).unwrap();
                merkle::verify_range(&info.root, n, level, len / 3, &nodes, &sib).unwrap();
            }
        }
        for (i, p) in pages.iter().enumerate() {
            prop_assert_eq!(&store.read_page(i as u64).unwrap(), p);
        }
        store.verify_integrity().unwrap();
    }
}
