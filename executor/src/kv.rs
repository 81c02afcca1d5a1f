//! The `kv` app: a key-value store in pages.
//!
//! Operations ([`KvOp`]) and results ([`KvResult`]) are serde enums encoded
//! with `zz_wire::codec` (bincode, fixed-width integers, little-endian).
//! Keys and values are at most 64 KiB each ([`MAX_KEY`], [`MAX_VALUE`]).
//! The data lives in a [`PagedMap`] over the app's pages; see [`crate::pmap`]
//! for the page layout.
//!
//! Every failure a client can cause is a [`KvResult::Error`], the same on
//! every correct replica: an operation that does not decode, an oversized
//! key or value, or a write in a request the client marked read-only. A
//! stored structure found inconsistent (only a fault does this) also yields
//! an error result, so the faulty replica's replies differ and it is caught.

use crate::app::{App, ExecContext};
use crate::pages::{PageError, Pages};
use crate::pmap::{MapError, PagedMap};
use serde::{Deserialize, Serialize};

/// Longest key.
pub const MAX_KEY: usize = 64 * 1024;
/// Longest value.
pub const MAX_VALUE: usize = 64 * 1024;

/// An operation of the `kv` app.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum KvOp {
    Get {
        #[serde(with = "serde_bytes")]
        key: Vec<u8>,
    },
    Put {
        #[serde(with = "serde_bytes")]
        key: Vec<u8>,
        #[serde(with = "serde_bytes")]
        value: Vec<u8>,
    },
    Delete {
        #[serde(with = "serde_bytes")]
        key: Vec<u8>,
    },
    /// Sets `key` to `new` (deletes it if `None`) if its current value is
    /// `expected` (`None`: absent).
    Cas {
        #[serde(with = "serde_bytes")]
        key: Vec<u8>,
        #[serde(with = "serde_bytes")]
        expected: Option<Vec<u8>>,
        #[serde(with = "serde_bytes")]
        new: Option<Vec<u8>>,
    },
}

impl KvOp {
    pub fn encode(&self) -> Vec<u8> {
        zz_wire::codec::encode(self)
    }

    fn is_write(&self) -> bool {
        !matches!(self, KvOp::Get { .. })
    }
}

/// Why a `kv` operation failed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum KvError {
    /// The operation did not decode.
    Malformed,
    KeyTooLarge {
        len: u64,
    },
    ValueTooLarge {
        len: u64,
    },
    /// A write in a request marked read-only.
    WriteInReadOnly,
    /// The replica's state is inconsistent (a faulty replica).
    CorruptState,
}

/// The result of a `kv` operation.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum KvResult {
    /// Answer to `Get`.
    Value(#[serde(with = "serde_bytes")] Option<Vec<u8>>),
    /// Answer to `Put`: whether a value was replaced.
    Stored {
        replaced: bool,
    },
    /// Answer to `Delete`: whether the key was present.
    Deleted {
        existed: bool,
    },
    /// Answer to `Cas`: whether it swapped, and the value before the operation.
    Cas {
        swapped: bool,
        #[serde(with = "serde_bytes")]
        current: Option<Vec<u8>>,
    },
    Error(KvError),
}

impl KvResult {
    pub fn encode(&self) -> Vec<u8> {
        zz_wire::codec::encode(self)
    }

    pub fn decode(bytes: &[u8]) -> Result<KvResult, zz_wire::WireError> {
        zz_wire::codec::decode(bytes)
    }
}

/// The `kv` app; stateless itself, everything is in the pages.
#[derive(Clone, Copy, Debug, Default)]
pub struct KvApp;

fn check(op: &KvOp) -> Result<(), KvError> {
    let (key, values): (&[u8], [Option<&Vec<u8>>; 2]) = match op {
        KvOp::Get { key } | KvOp::Delete { key } => (key, [None, None]),
        KvOp::Put { key, value } => (key, [Some(value), None]),
        KvOp::Cas { key, expected, new } => (key, [expected.as_ref(), new.as_ref()]),
    };
    if key.len() > MAX_KEY {
        return Err(KvError::KeyTooLarge {
            len: key.len() as u64,
        });
    }
    for v in values.into_iter().flatten() {
        if v.len() > MAX_VALUE {
            return Err(KvError::ValueTooLarge {
                len: v.len() as u64,
            });
        }
    }
    Ok(())
}

fn apply(map: &mut PagedMap<'_>, op: KvOp) -> Result<KvResult, MapError> {
    Ok(match op {
        KvOp::Get { key } => KvResult::Value(map.get(&key)?),
        KvOp::Put { key, value } => KvResult::Stored {
            replaced: map.put(&key, &value)?,
        },
        KvOp::Delete { key } => KvResult::Deleted {
            existed: map.delete(&key)?,
        },
        KvOp::Cas { key, expected, new } => {
            let current = map.get(&key)?;
            let swapped = current == expected;
            if swapped {
                match &new {
                    Some(v) => {
                        map.put(&key, v)?;
                    }
                    None => {
                        map.delete(&key)?;
                    }
                }
            }
            KvResult::Cas { swapped, current }
        }
    })
}

impl KvApp {
    /// Executes one operation; `Err` only for page-access failures.
    pub fn run(ctx: &ExecContext, pages: &mut dyn Pages, op: &[u8]) -> Result<KvResult, PageError> {
        let op: KvOp = match zz_wire::codec::decode(op) {
            Ok(op) => op,
            Err(_) => return Ok(KvResult::Error(KvError::Malformed)),
        };
        if let Err(e) = check(&op) {
            return Ok(KvResult::Error(e));
        }
        if ctx.read_only && op.is_write() {
            return Ok(KvResult::Error(KvError::WriteInReadOnly));
        }
        let result = PagedMap::open(pages).and_then(|mut map| apply(&mut map, op));
        match result {
            Ok(r) => Ok(r),
            Err(MapError::Page(e)) => Err(e),
            Err(MapError::Corrupt(what)) => {
                tracing::warn!("kv state is corrupt: {what}");
                Ok(KvResult::Error(KvError::CorruptState))
            }
            // Sizes were checked above; kept deterministic all the same.
            Err(MapError::TooLarge(len)) => {
                Ok(KvResult::Error(KvError::ValueTooLarge { len: len as u64 }))
            }
        }
    }
}

impl App for KvApp {
    fn name(&self) -> &'static str {
        "kv"
    }

    fn execute(
        &mut self,
        ctx: &ExecContext,
        pages: &mut dyn Pages,
        op: &[u8],
    ) -> Result<Vec<u8>, PageError> {
        Ok(KvApp::run(ctx, pages, op)?.encode())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeMap;
    use zz_statefetch::PageStore;

    fn ctx(read_only: bool) -> ExecContext {
        ExecContext {
            app: 1,
            app_seq: 1,
            seq: 1,
            client: 1,
            req_id: 1,
            read_only,
        }
    }

    fn open(dir: &std::path::Path) -> PageStore {
        crate::testutil::open_store(dir)
    }

    fn run(store: &mut PageStore, op: &KvOp) -> KvResult {
        KvApp::run(&ctx(false), store, &op.encode()).unwrap()
    }

    /// What the `kv` app must answer, computed on a `BTreeMap`.
    fn model(m: &mut BTreeMap<Vec<u8>, Vec<u8>>, op: &KvOp) -> KvResult {
        if let Err(e) = check(op) {
            return KvResult::Error(e);
        }
        match op.clone() {
            KvOp::Get { key } => KvResult::Value(m.get(&key).cloned()),
            KvOp::Put { key, value } => KvResult::Stored {
                replaced: m.insert(key, value).is_some(),
            },
            KvOp::Delete { key } => KvResult::Deleted {
                existed: m.remove(&key).is_some(),
            },
            KvOp::Cas { key, expected, new } => {
                let current = m.get(&key).cloned();
                let swapped = current == expected;
                if swapped {
                    match new {
                        Some(v) => m.insert(key, v),
                        None => m.remove(&key),
                    };
                }
                KvResult::Cas { swapped, current }
            }
        }
    }

    /// `len` bytes derived from `seed`, cheaply.
    fn filled(len: usize, seed: u8) -> Vec<u8> {
        (0..len)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
            .collect()
    }

    fn key() -> impl Strategy<Value = Vec<u8>> {
        prop_oneof![
            10 => (0u8..24).prop_map(|k| vec![b'k', k]),
            2 => proptest::collection::vec(any::<u8>(), 0..12),
            2 => (0u8..4, 120usize..300).prop_map(|(s, n)| filled(n, s)),
            1 => (0u8..2).prop_map(|s| filled(5000, s)),
            1 => Just(filled(MAX_KEY, 9)),
            1 => Just(filled(MAX_KEY + 1, 9)),
        ]
    }

    fn value() -> impl Strategy<Value = Vec<u8>> {
        prop_oneof![
            4 => (0u8..4).prop_map(|v| vec![v; 3]),
            6 => proptest::collection::vec(any::<u8>(), 0..64),
            3 => (900usize..1100, any::<u8>()).prop_map(|(n, s)| filled(n, s)),
            2 => (4000usize..MAX_VALUE + 1, any::<u8>()).prop_map(|(n, s)| filled(n, s)),
            1 => Just(filled(MAX_VALUE + 1, 1)),
        ]
    }

    #[derive(Clone, Debug)]
    enum Step {
        Op(KvOp),
        Reopen,
    }

    fn step() -> impl Strategy<Value = Step> {
        prop_oneof![
            3 => key().prop_map(|key| Step::Op(KvOp::Get { key })),
            6 => (key(), value()).prop_map(|(key, value)| Step::Op(KvOp::Put { key, value })),
            2 => key().prop_map(|key| Step::Op(KvOp::Delete { key })),
            3 => (key(), proptest::option::of(value()), proptest::option::of(value()))
                .prop_map(|(key, expected, new)| Step::Op(KvOp::Cas { key, expected, new })),
            1 => Just(Step::Reopen),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig {
            // Each case opens sled stores; PROPTEST_CASES=400 for a long run.
            cases: std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(32),
            ..ProptestConfig::default()
        })]

        /// The kv app answers exactly like a BTreeMap, across reopening its
        /// store, and two stores fed the same ops hold the same pages.
        #[test]
        fn kv_matches_btreemap_model(steps in proptest::collection::vec(step(), 1..160)) {
            let dir = tempfile::tempdir().unwrap();
            let twin_dir = tempfile::tempdir().unwrap();
            let mut store = open(dir.path());
            let mut twin = open(twin_dir.path());
            let mut m = BTreeMap::new();
            for s in &steps {
                match s {
                    Step::Reopen => {
                        drop(store);
                        store = open(dir.path());
                    }
                    Step::Op(op) => {
                        let want = model(&mut m, op);
                        prop_assert_eq!(run(&mut store, op), want.clone(), "op {:?}", op);
                        prop_assert_eq!(run(&mut twin, op), want);
                    }
                }
            }
            drop(store);
            let mut store = open(dir.path());
            for (k, v) in &m {
                let got = run(&mut store, &KvOp::Get { key: k.clone() });
                prop_assert_eq!(got, KvResult::Value(Some(v.clone())));
            }
            prop_assert_eq!(PagedMap::open(&mut store).unwrap().len(), m.len() as u64);
            prop_assert_eq!(store.checkpoint(1).unwrap(), twin.checkpoint(1).unwrap());
        }

        /// Arbitrary bytes as an op: an error result or a valid answer, never
        /// a panic, the same every time.
        #[test]
        fn malformed_ops_give_deterministic_errors(op in proptest::collection::vec(any::<u8>(), 0..256)) {
            let dir = tempfile::tempdir().unwrap();
            let mut store = open(dir.path());
            let a = KvApp::run(&ctx(false), &mut store, &op).unwrap();
            let dir2 = tempfile::tempdir().unwrap();
            let mut store2 = open(dir2.path());
            let b = KvApp::run(&ctx(false), &mut store2, &op).unwrap();
            prop_assert_eq!(a, b);
        }
    }

    #[test]
    fn many_keys_split_buckets_and_reuse_freed_pages() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = open(dir.path());
        let k = |i: u32| format!("key-{i}").into_bytes();
        let v = |i: u32| filled((i as usize * 37) % 1500, i as u8);
        for i in 0..3000 {
            assert_eq!(
                run(
                    &mut store,
                    &KvOp::Put {
                        key: k(i),
                        value: v(i)
                    }
                ),
                KvResult::Stored { replaced: false }
            );
        }
        for i in (0..3000).step_by(2) {
            assert_eq!(
                run(&mut store, &KvOp::Delete { key: k(i) }),
                KvResult::Deleted { existed: true }
            );
        }
        drop(store);
        let mut store = open(dir.path());
        for i in 0..3000 {
            let want = (i % 2 == 1).then(|| v(i));
            assert_eq!(
                run(&mut store, &KvOp::Get { key: k(i) }),
                KvResult::Value(want)
            );
        }
        // Freed blob pages are reused before the state grows.
        let pages_before = store.num_pages().unwrap();
        let free_before = PagedMap::open(&mut store).unwrap().free_pages();
        assert!(free_before > 0);
        for i in (0..200).step_by(2) {
            run(
                &mut store,
                &KvOp::Put {
                    key: k(i),
                    value: filled(1500, 3),
                },
            );
        }
        assert_eq!(store.num_pages().unwrap(), pages_before);
        assert!(PagedMap::open(&mut store).unwrap().free_pages() < free_before);
    }

    #[test]
    fn writes_in_read_only_requests_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = open(dir.path());
        let put = KvOp::Put {
            key: b"a".to_vec(),
            value: b"1".to_vec(),
        };
        let r = KvApp::run(&ctx(true), &mut store, &put.encode()).unwrap();
        assert_eq!(r, KvResult::Error(KvError::WriteInReadOnly));
        assert_eq!(store.num_pages().unwrap(), 0);
        let get = KvOp::Get { key: b"a".to_vec() };
        let r = KvApp::run(&ctx(true), &mut store, &get.encode()).unwrap();
        assert_eq!(r, KvResult::Value(None));
    }

    #[test]
    fn corrupt_pages_give_an_error_result_not_a_panic() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = open(dir.path());
        for i in 0..50u8 {
            run(
                &mut store,
                &KvOp::Put {
                    key: vec![i],
                    value: filled(700 + i as usize * 10, i),
                },
            );
        }
        let n = store.num_pages().unwrap();
        let mut corrupt_seen = false;
        for p in 0..n {
            let mut data = store.read_page(p).unwrap();
            for b in &mut data[..64] {
                *b ^= 0xFF;
            }
            let dir2 = tempfile::tempdir().unwrap();
            let mut copy = open(dir2.path());
            for q in 0..n {
                let page = if q == p {
                    data.clone()
                } else {
                    store.read_page(q).unwrap()
                };
                copy.write_page(q, &page).unwrap();
            }
            for i in 0..50u8 {
                // Any result is acceptable; a panic or an endless loop is not.
                let r = KvApp::run(&ctx(false), &mut copy, &KvOp::Get { key: vec![i] }.encode())
                    .unwrap();
                corrupt_seen |= r == KvResult::Error(KvError::CorruptState);
                let _ = KvApp::run(
                    &ctx(false),
                    &mut copy,
                    &KvOp::Put {
                        key: vec![i],
                        value: vec![1; 2000],
                    }
                    .encode(),
                )
                .unwrap();
            }
        }
        assert!(corrupt_seen);
    }
}
