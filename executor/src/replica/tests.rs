//! Tests of the execution core: quorum rule, order, de-duplication, MACs,
//! checkpoints, stable certificates, faults, envelopes, restart and
//! recovery by on-demand state fetch.

use super::*;
use crate::fault::CorruptPage;
use crate::kv::{KvApp, KvOp, KvResult};
use crate::pages::RecoveringState;
use std::path::Path;
use std::sync::Arc;
use zz_statefetch::{Certificate, LocalSource, PageSource, PageStore, RecoveryConfig};
use zz_wire::message::Request;

const APP: AppId = 1;

/// Keys of a test deployment: 3f+1 agreement replicas, 2f+1 execution
/// replicas, three clients.
struct Keys {
    f: usize,
    agreement: Vec<KeyPair>,
    execs: Vec<KeyPair>,
    clients: Vec<(ClientId, KeyPair)>,
}

impl Keys {
    fn new(f: usize) -> Keys {
        let kp = |tag: u8, i: usize| KeyPair::from_seed([tag.wrapping_add(i as u8); 32]);
        Keys {
            f,
            agreement: (0..3 * f + 1).map(|i| kp(10, i)).collect(),
            execs: (0..2 * f + 1).map(|i| kp(60, i)).collect(),
            clients: (0..3).map(|i| (100 + i as ClientId, kp(120, i))).collect(),
        }
    }

    fn params(&self, index: ExecIndex, k: u64) -> ExecParams {
        let me = &self.execs[index as usize];
        let mut p = ExecParams::new(
            APP,
            index,
            self.f,
            me.clone(),
            self.execs.iter().map(|e| e.public()).collect(),
            self.agreement
                .iter()
                .map(|a| me.shared_mac_key(&a.public()))
                .collect(),
            self.clients
                .iter()
                .map(|(id, c)| (*id, me.shared_mac_key(&c.public())))
                .collect(),
        );
        p.checkpoint_interval = k;
        p
    }

    /// The key client `c` uses to check replies of execution replica `index`.
    fn client_key(&self, c: ClientId, index: ExecIndex) -> MacKey {
        let (_, kp) = self.clients.iter().find(|(id, _)| *id == c).unwrap();
        kp.shared_mac_key(&self.execs[index as usize].public())
    }
}

fn open_store(dir: &Path) -> PageStore {
    crate::testutil::open_store(dir)
}

fn core_at(keys: &Keys, index: ExecIndex, k: u64, dir: &Path, faults: FaultPlan) -> ExecutionCore {
    let mut p = keys.params(index, k);
    p.faults = faults;
    ExecutionCore::new(p, Box::new(KvApp), Box::new(open_store(dir))).unwrap()
}

fn put(client: ClientId, req_id: u64, key: &str, value: &[u8]) -> Request {
    Request {
        client,
        req_id,
        app: APP,
        op: KvOp::Put {
            key: key.as_bytes().to_vec(),
            value: value.to_vec(),
        }
        .encode(),
        read_only: false,
    }
}

fn get(client: ClientId, req_id: u64, key: &str) -> Request {
    Request {
        client,
        req_id,
        app: APP,
        op: KvOp::Get {
            key: key.as_bytes().to_vec(),
        }
        .encode(),
        read_only: true,
    }
}

fn order(app_seq: AppSeq, requests: Vec<Request>) -> Order {
    Order {
        app: APP,
        app_seq,
        seq: 1000 + app_seq,
        requests,
    }
}

/// Sends `o` from agreement replicas `from`.
fn feed(core: &mut ExecutionCore, from: impl IntoIterator<Item = ReplicaId>, o: &Order) {
    for r in from {
        core.on_order(r, o.clone()).unwrap();
    }
}

fn executed(ready: &Ready) -> Vec<&Executed> {
    ready
        .messages
        .iter()
        .filter_map(|m| match m {
            ExecMessage::Executed(e) => Some(e),
            _ => None,
        })
        .collect()
}

fn checkpoints(ready: &Ready) -> Vec<(ExecCheckpoint, zz_wire::crypto::Signature)> {
    ready
        .messages
        .iter()
        .filter_map(|m| match m {
            ExecMessage::Checkpoint(c, s) => Some((*c, *s)),
            _ => None,
        })
        .collect()
}

fn result(e: &Executed, i: usize) -> KvResult {
    KvResult::decode(&e.replies[i].result).unwrap()
}

/// A varied workload: app_seq `s` of `n`.
fn workload(s: AppSeq) -> Order {
    let c = 100 + s % 3;
    let mut reqs = vec![put(
        c,
        s * 10,
        &format!("k{}", s % 5),
        &vec![s as u8; (s as usize * 300) % 5000],
    )];
    reqs.push(get(
        100 + (s + 1) % 3,
        s * 10 + 1,
        &format!("k{}", (s + 2) % 5),
    ));
    if s > 12 {
        // New keys with large values: the state grows past the checkpoint
        // a replica recovers (8) before its view is persisted.
        reqs.push(put(
            200 + s % 3,
            s * 10 + 2,
            &format!("grown{s}"),
            &vec![s as u8; 60_000],
        ));
    }
    order(s, reqs)
}

fn cert_from(
    app_seq: AppSeq,
    cks: &[(ExecCheckpoint, zz_wire::crypto::Signature)],
) -> ExecCheckpointCert {
    ExecCheckpointCert {
        app: APP,
        app_seq,
        root: cks[0].0.root,
        proofs: cks.iter().map(|(c, s)| (c.exec, *s)).collect(),
    }
}

#[test]
fn executes_only_with_f_plus_one_matching_orders() {
    for f in [1usize, 2] {
        let keys = Keys::new(f);
        let dir = tempfile::tempdir().unwrap();
        let mut core = core_at(&keys, 0, 128, dir.path(), FaultPlan::default());
        let a = order(1, vec![put(100, 1, "x", b"a")]);
        let b = order(1, vec![put(100, 1, "x", b"b")]);
        assert_ne!(a.digest(), b.digest());
        // f matching orders, and f conflicting ones: nothing executes.
        let f_ids = f as ReplicaId;
        feed(&mut core, 0..f_ids, &a);
        feed(&mut core, f_ids..2 * f_ids, &b);
        assert!(core.ready().unwrap().is_empty());
        // Repeats by the same replicas do not count twice.
        feed(&mut core, 0..f_ids, &a);
        assert_eq!(
            core.on_order(0, b.clone()),
            Err(Rejected::Conflicting {
                replica: 0,
                app_seq: 1
            })
        );
        assert!(core.ready().unwrap().is_empty());
        assert_eq!(core.executed(), 0);
        // The (f+1)-th distinct replica agreeing with `a` executes it.
        feed(&mut core, [2 * f_ids], &a);
        let ready = core.ready().unwrap();
        let ex = executed(&ready);
        assert_eq!(ex.len(), 1, "f={f}");
        assert_eq!(ex[0].app_seq, 1);
        assert_eq!(result(ex[0], 0), KvResult::Stored { replaced: false });
        assert_eq!(core.executed(), 1);
        // `b` can never execute now, even with every other replica behind it.
        assert!(matches!(
            core.on_order(3 * f_ids, b.clone()),
            Err(Rejected::Stale { .. })
        ));
        core.inspect_app(|pages| {
            let r = KvApp::run(
                &ExecContext {
                    app: APP,
                    app_seq: 2,
                    seq: 0,
                    client: 0,
                    req_id: 0,
                    read_only: true,
                },
                pages,
                &KvOp::Get { key: b"x".to_vec() }.encode(),
            )
            .unwrap();
            assert_eq!(r, KvResult::Value(Some(b"a".to_vec())));
        })
        .unwrap();
    }
}

#[test]
fn orders_from_unknown_replicas_or_other_apps_are_rejected() {
    let keys = Keys::new(1);
    let dir = tempfile::tempdir().unwrap();
    let mut core = core_at(&keys, 0, 128, dir.path(), FaultPlan::default());
    let o = order(1, vec![]);
    assert_eq!(
        core.on_order(4, o.clone()),
        Err(Rejected::UnknownReplica(4))
    );
    let mut other = o.clone();
    other.app = 2;
    assert_eq!(core.on_order(0, other), Err(Rejected::WrongApp(2)));
    assert_eq!(core.metrics().inputs_rejected, 2);
}

#[test]
fn executes_in_order_and_once() {
    let keys = Keys::new(1);
    let dir = tempfile::tempdir().unwrap();
    let mut core = core_at(&keys, 0, 128, dir.path(), FaultPlan::default());
    let o1 = order(1, vec![put(100, 1, "k", b"1")]);
    let o2 = order(2, vec![put(101, 1, "k", b"2"), get(100, 2, "k")]);
    feed(&mut core, [0, 1], &o2);
    assert!(core.ready().unwrap().is_empty(), "2 waits for 1");
    feed(&mut core, [2, 3], &o1);
    let ready = core.ready().unwrap();
    let ex = executed(&ready);
    assert_eq!(ex.iter().map(|e| e.app_seq).collect::<Vec<_>>(), vec![1, 2]);
    assert_eq!(result(ex[1], 1), KvResult::Value(Some(b"2".to_vec())));
    // Once: late orders for executed app_seqs are not executed again (they
    // are answered from the result cache, see
    // `repeated_orders_are_answered_from_the_result_cache`).
    core.on_order(1, o1).unwrap();
    core.on_order(3, o2).unwrap();
    let again = core.ready().unwrap();
    assert!(again.messages.is_empty());
    assert_eq!(again.direct.len(), 2);
    assert_eq!(core.metrics().requests_executed, 3);
    assert_eq!(core.metrics().batches_executed, 2);
}

#[test]
fn replies_verify_with_client_keys_and_duplicates_are_answered_from_the_table() {
    let keys = Keys::new(1);
    let dir = tempfile::tempdir().unwrap();
    let mut core = core_at(&keys, 1, 128, dir.path(), FaultPlan::default());
    let first = put(100, 5, "a", b"v1");
    feed(&mut core, [0, 1], &order(1, vec![first.clone()]));
    // The same request ordered again (client retransmission), an older one,
    // and a new request of another client that overwrites the key.
    let stale = put(100, 4, "a", b"old");
    let other = put(101, 1, "a", b"v2");
    feed(
        &mut core,
        [0, 1],
        &order(2, vec![first.clone(), stale, other]),
    );
    let ready = core.ready().unwrap();
    let ex = executed(&ready);
    assert_eq!(ex.len(), 2);
    let r1 = &ex[0].replies[0];
    assert_eq!((r1.client, r1.req_id, r1.replica), (100, 5, 1));
    assert!(r1.verify(&keys.client_key(100, 1)));
    assert!(!r1.verify(&keys.client_key(100, 0)));
    assert!(!r1.verify(&keys.client_key(101, 1)));
    // Batch 2: the cached reply (same result, not re-executed: "replaced"
    // would be true otherwise), no reply for the stale one, then the new one.
    assert_eq!(ex[1].replies.len(), 2);
    assert_eq!(ex[1].replies[0].result, r1.result);
    assert_eq!(result(ex[1], 0), KvResult::Stored { replaced: false });
    assert_eq!(result(ex[1], 1), KvResult::Stored { replaced: true });
    for r in &ex[1].replies {
        assert!(r.verify(&keys.client_key(r.client, 1)));
    }
    let want = results_digest(&[
        (100, 5, r1.result.as_slice()),
        (101, 1, ex[1].replies[1].result.as_slice()),
    ]);
    assert_eq!(ex[1].digest, want);
    assert_eq!(core.metrics().replies_cached, 1);
    assert_eq!(core.metrics().requests_stale, 1);
}

#[test]
fn replicas_fed_the_same_orders_agree_on_digests_and_checkpoint_roots() {
    let keys = Keys::new(1);
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let mut cores: Vec<_> = (0..3)
        .map(|i| core_at(&keys, i, 4, dirs[i as usize].path(), FaultPlan::default()))
        .collect();
    let mut outs: Vec<Vec<ExecMessage>> = vec![Vec::new(); 3];
    for s in 1..=9 {
        let o = workload(s);
        for (c, out) in cores.iter_mut().zip(&mut outs) {
            // Different agreement replicas may form the quorum at each replica.
            feed(c, [(s % 4) as ReplicaId, ((s + 1) % 4) as ReplicaId], &o);
            out.extend(c.ready().unwrap().messages);
        }
    }
    let digests = |out: &[ExecMessage]| -> Vec<(AppSeq, Digest)> {
        out.iter()
            .filter_map(|m| match m {
                ExecMessage::Executed(e) => Some((e.app_seq, e.digest)),
                _ => None,
            })
            .collect()
    };
    assert_eq!(digests(&outs[0]).len(), 9);
    assert_eq!(digests(&outs[0]), digests(&outs[1]));
    assert_eq!(digests(&outs[0]), digests(&outs[2]));
    let cks: Vec<Vec<_>> = outs
        .iter()
        .map(|o| {
            checkpoints(&Ready {
                messages: o.clone(),
                ..Ready::default()
            })
        })
        .collect();
    assert_eq!(
        cks[0].iter().map(|c| c.0.app_seq).collect::<Vec<_>>(),
        vec![4, 8]
    );
    let roots = |c: &[(ExecCheckpoint, _)]| c.iter().map(|c| c.0.root).collect::<Vec<_>>();
    assert_eq!(roots(&cks[0]), roots(&cks[1]));
    assert_eq!(roots(&cks[0]), roots(&cks[2]));
    assert_ne!(cks[0][0].0.root, cks[0][1].0.root);
    // f+1 signatures form a certificate every replica accepts.
    let cert = cert_from(8, &[cks[0][1], cks[2][1]]);
    let exec_keys: Vec<_> = keys.execs.iter().map(|k| k.public()).collect();
    assert!(cert.verify(1, &exec_keys));
    for c in &mut cores {
        c.on_stable(cert.clone()).unwrap();
        let ready = c.ready().unwrap();
        assert!(ready.diverged.is_none() && ready.stable_ahead.is_none());
        assert_eq!(c.stable().map(|s| s.app_seq), Some(8));
    }
    // f signatures, or a forged one, are not a certificate.
    let mut weak = cert_from(8, &[cks[0][1]]);
    assert_eq!(
        cores[1].on_stable(weak.clone()),
        Ok(()),
        "older than stable: ignored"
    );
    weak.app_seq = 12;
    assert_eq!(cores[1].on_stable(weak), Err(Rejected::BadCertificate));
}

#[test]
fn wrong_reply_fault_changes_the_digest() {
    let keys = Keys::new(1);
    let (d0, d1) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let mut good = core_at(&keys, 0, 128, d0.path(), FaultPlan::default());
    let faults = FaultPlan {
        wrong_replies_from: Some(2),
        ..FaultPlan::default()
    };
    let mut bad = core_at(&keys, 1, 128, d1.path(), faults);
    let mut got = Vec::new();
    for s in 1..=3 {
        let o = workload(s);
        feed(&mut good, [0, 1], &o);
        feed(&mut bad, [0, 1], &o);
        let (g, b) = (good.ready().unwrap(), bad.ready().unwrap());
        got.push((executed(&g)[0].digest, executed(&b)[0].digest));
        // The wrong replies are still MAC'd correctly: only f+1 matching
        // replies tell the client.
        for r in &executed(&b)[0].replies {
            assert!(r.verify(&keys.client_key(r.client, 1)));
        }
    }
    assert_eq!(got[0].0, got[0].1);
    assert_ne!(got[1].0, got[1].1);
    assert_ne!(got[2].0, got[2].1);
}

#[test]
fn corrupt_page_fault_changes_the_root_and_is_flagged_by_the_stable_certificate() {
    let keys = Keys::new(1);
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let faults = FaultPlan {
        // Right before the checkpoint: a corrupted page that a later batch
        // rewrites whole is healed, not detected, which is fine.
        corrupt_page: Some(CorruptPage {
            after: 4,
            page: None,
            persistent: false,
        }),
        ..FaultPlan::default()
    };
    let mut cores: Vec<_> = (0..3)
        .map(|i| {
            let fp = if i == 2 { faults } else { FaultPlan::default() };
            core_at(&keys, i, 4, dirs[i as usize].path(), fp)
        })
        .collect();
    let mut cks = Vec::new();
    for s in 1..=4 {
        for c in &mut cores {
            feed(c, [0, 1], &workload(s));
            cks.extend(checkpoints(&c.ready().unwrap()));
        }
    }
    assert_eq!(cks.len(), 3);
    assert_eq!(cks[0].0.root, cks[1].0.root);
    assert_ne!(cks[0].0.root, cks[2].0.root);
    let cert = cert_from(4, &cks[..2]);
    cores[2].on_stable(cert.clone()).unwrap();
    let ready = cores[2].ready().unwrap();
    assert_eq!(ready.diverged, Some(cert));
}

#[test]
fn slow_and_crash_faults_are_reported_to_the_driver() {
    let keys = Keys::new(1);
    let dir = tempfile::tempdir().unwrap();
    let faults = FaultPlan {
        slow_ms: 25,
        crash_after: Some(2),
        ..FaultPlan::default()
    };
    let mut core = core_at(&keys, 0, 128, dir.path(), faults);
    feed(&mut core, [0, 1], &workload(1));
    feed(&mut core, [0, 1], &workload(2));
    feed(&mut core, [0, 1], &workload(3));
    let ready = core.ready().unwrap();
    assert_eq!(executed(&ready).len(), 2, "nothing after the crash point");
    assert_eq!(ready.delay_ms, 50);
    assert!(ready.crash);
    assert!(core.is_crashed());
    assert_eq!(core.on_order(2, workload(3)), Err(Rejected::Crashed));
}

#[test]
fn state_and_reply_table_survive_a_restart() {
    let keys = Keys::new(1);
    let dir = tempfile::tempdir().unwrap();
    let first = {
        let mut core = core_at(&keys, 0, 2, dir.path(), FaultPlan::default());
        for s in 1..=3 {
            feed(&mut core, [0, 1], &workload(s));
        }
        let ready = core.ready().unwrap();
        executed(&ready)[2].replies[0].clone()
    };
    let mut core = core_at(&keys, 0, 2, dir.path(), FaultPlan::default());
    assert_eq!(core.executed(), 3);
    // The last request of that client, ordered again: answered from the table.
    let again = workload(3).requests[0].clone();
    feed(
        &mut core,
        [2, 3],
        &order(4, vec![again, get(101, 1000, "k3")]),
    );
    let ready = core.ready().unwrap();
    let ex = executed(&ready);
    assert_eq!(ex[0].replies[0].result, first.result);
    assert_eq!(core.metrics().replies_cached, 1);
    assert_eq!(result(ex[0], 1), KvResult::Value(Some(vec![3u8; 900])));
    assert_eq!(checkpoints(&ready).len(), 1);
}

#[test]
fn envelopes_are_authenticated_and_routed() {
    let keys = Keys::new(1);
    let dir = tempfile::tempdir().unwrap();
    let mut core = core_at(&keys, 2, 128, dir.path(), FaultPlan::default());
    let me = core.id();
    let o = ExecMessage::Order(workload(1));
    let seal = |from: ReplicaId, to: ExecId, key: &KeyPair| {
        let k = key.shared_mac_key(&keys.execs[to.index as usize].public());
        ExecEnvelope::seal(ExecRoute::ToExecutor { from, to }, &o, &k)
    };
    // A forged MAC (replica 3's key claiming to be replica 0), a misrouted
    // frame, and garbage are rejected.
    let forged = seal(0, me, &keys.agreement[3]);
    assert!(matches!(
        core.on_envelope(&forged),
        Err(Rejected::Envelope(_))
    ));
    let other = ExecId { app: APP, index: 1 };
    let misrouted = seal(0, other, &keys.agreement[0]);
    assert!(matches!(
        core.on_envelope(&misrouted),
        Err(Rejected::Envelope(_))
    ));
    assert!(matches!(
        core.on_frame(b"\x01\x02garbage"),
        Err(Rejected::Envelope(_))
    ));
    assert!(core.ready().unwrap().is_empty());
    // Two genuine frames from the byte stream execute the order.
    for from in [0, 3] {
        let env = seal(from, me, &keys.agreement[from as usize]);
        core.on_frame(&zz_wire::codec::encode(&env)).unwrap();
    }
    let ready = core.ready().unwrap();
    assert_eq!(executed(&ready).len(), 1);
    // Outputs seal for each agreement replica, who can open them.
    let envs = core.seal(&ready.messages[0]);
    assert_eq!(envs.len(), 4);
    for (i, env) in envs.iter().enumerate() {
        let k = keys.agreement[i].shared_mac_key(&keys.execs[2].public());
        assert_eq!(env.open(&k).unwrap(), ready.messages[0]);
        assert_eq!(
            env.route,
            ExecRoute::ToAgreement {
                from: me,
                to: i as ReplicaId
            }
        );
    }
    assert_eq!(core.metrics().inputs_rejected, 3);
}

#[test]
fn window_bounds_buffered_orders() {
    let keys = Keys::new(1);
    let dir = tempfile::tempdir().unwrap();
    let mut p = keys.params(0, 4);
    p.window = 8;
    let mut core =
        ExecutionCore::new(p, Box::new(KvApp), Box::new(open_store(dir.path()))).unwrap();
    assert_eq!(core.on_order(0, order(8, vec![])), Ok(()));
    assert_eq!(
        core.on_order(0, order(9, vec![]).clone()),
        Err(Rejected::OutsideWindow(9))
    );
}

#[test]
fn null_app_with_cpu_cost_runs_through_the_core() {
    let keys = Keys::new(1);
    let dir = tempfile::tempdir().unwrap();
    let spec: crate::AppSpec = "null+cpu=50".parse().unwrap();
    let mut core = ExecutionCore::new(
        keys.params(0, 2),
        spec.build(),
        Box::new(open_store(dir.path())),
    )
    .unwrap();
    feed(&mut core, [0, 1], &workload(1));
    feed(&mut core, [0, 1], &workload(2));
    let ready = core.ready().unwrap();
    let ex = executed(&ready);
    assert!(ex
        .iter()
        .all(|e| e.replies.iter().all(|r| r.result.is_empty())));
    assert_eq!(checkpoints(&ready).len(), 1);
}

/// A page source whose background comparison requests (after the first,
/// which a view makes when opening) are held back, so that everything the
/// executor reads in the meantime is fetched on demand.
struct SlowCompare {
    inner: LocalSource,
    nodes_calls: std::sync::atomic::AtomicUsize,
    delay: std::time::Duration,
}

impl PageSource for SlowCompare {
    fn name(&self) -> String {
        "slow-compare".into()
    }

    fn call(&self, request: zz_statefetch::Request) -> zz_statefetch::source::SourceFuture<'_> {
        Box::pin(async move {
            if matches!(request, zz_statefetch::Request::Nodes { .. })
                && self
                    .nodes_calls
                    .fetch_add(1, std::sync::atomic::Ordering::SeqCst)
                    > 0
            {
                tokio::time::sleep(self.delay).await;
            }
            self.inner.call(request).await
        })
    }
}

/// A woken replica with an empty store recovers stable checkpoint C by
/// on-demand fetch: it answers the next orders at once, identically to a
/// replica that executed everything, skips the checkpoint it cannot yet
/// certify, and certifies the same root as the others once its fetch is
/// complete.
#[test]
fn recovering_replica_executes_at_once_and_matches() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let keys = Keys::new(1);
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let stores: Vec<PageStore> = dirs.iter().map(|d| open_store(d.path())).collect();
    let core_on = |i: usize| {
        ExecutionCore::new(
            keys.params(i as ExecIndex, 4),
            Box::new(KvApp),
            Box::new(stores[i].clone()),
        )
        .unwrap()
    };
    let mut a = core_on(0);
    let mut b = core_on(1);
    let mut cks = Vec::new();
    for s in 1..=8 {
        for c in [&mut a, &mut b] {
            feed(c, [0, 1], &workload(s));
            cks.extend(checkpoints(&c.ready().unwrap()));
        }
    }
    let at8: Vec<_> = cks.iter().copied().filter(|c| c.0.app_seq == 8).collect();
    let cert = cert_from(8, &at8);

    // Replica 2 was dormant from the start: it learns of C, sees it is
    // behind, and opens a recovery view fetching from replica 0's store.
    let mut d = core_on(2);
    d.on_stable(cert.clone()).unwrap();
    let ready = d.ready().unwrap();
    assert_eq!(ready.stable_ahead, Some(cert.clone()));
    // Orders above C are buffered while the driver sets up the fetch.
    feed(&mut d, [0, 1], &workload(9));
    let source = SlowCompare {
        inner: LocalSource::new(stores[0].clone(), "exec0"),
        nodes_calls: Default::default(),
        delay: std::time::Duration::from_secs(2),
    };
    let sources: Vec<Arc<dyn PageSource>> = vec![Arc::new(source)];
    let rec = rt
        .block_on(RecoveringState::open(
            stores[2].clone(),
            Certificate {
                seq: cert.app_seq,
                root: cert.root,
            },
            sources,
            RecoveryConfig::default(),
        ))
        .unwrap();
    let view = rec.view().clone();
    d.install_state(Box::new(rec), &cert).unwrap();
    assert_eq!(d.executed(), 8);

    let mut outs: Vec<Vec<ExecMessage>> = vec![Vec::new(); 2];
    for s in 9..=16 {
        if s == 13 {
            // Until here everything was fetched on demand; the comparison
            // has not even run. Now let the background finish.
            let p = view.progress();
            assert!(
                !p.compared && p.fetched > 0 && p.present < p.num_pages,
                "{p:?}"
            );
            assert_eq!(d.metrics().checkpoints_skipped, 1);
            rt.block_on(view.wait_complete()).unwrap();
        }
        feed(&mut a, [0, 1], &workload(s));
        outs[0].extend(a.ready().unwrap().messages);
        if s > 9 {
            feed(&mut d, [0, 1], &workload(s));
        }
        outs[1].extend(d.ready().unwrap().messages);
    }
    let strip = |out: &[ExecMessage]| -> Vec<(AppSeq, Digest, Vec<Vec<u8>>)> {
        out.iter()
            .filter_map(|m| match m {
                ExecMessage::Executed(e) => Some((
                    e.app_seq,
                    e.digest,
                    e.replies.iter().map(|r| r.result.clone()).collect(),
                )),
                _ => None,
            })
            .collect()
    };
    assert_eq!(strip(&outs[0]).len(), 8);
    assert_eq!(strip(&outs[0]), strip(&outs[1]));
    let ck = |out: &[ExecMessage]| {
        checkpoints(&Ready {
            messages: out.to_vec(),
            ..Ready::default()
        })
        .iter()
        .map(|c| (c.0.app_seq, c.0.root))
        .collect::<Vec<_>>()
    };
    assert_eq!(
        ck(&outs[0]).iter().map(|c| c.0).collect::<Vec<_>>(),
        vec![12, 16]
    );
    assert_eq!(ck(&outs[1]), ck(&outs[0])[1..].to_vec());
    // Once complete, the plain store can take over from the view.
    d.swap_state(Box::new(stores[2].clone())).unwrap();
    stores[2].verify_integrity().unwrap();
}

mod model {
    //! The whole core (reply table, regions, per-batch buffer, kv) against a
    //! `BTreeMap` model, with retransmissions and a restart.
    use super::*;
    use proptest::prelude::*;

    #[derive(Clone, Debug)]
    enum Gen {
        Get(u8),
        Put(u8, usize, u8),
        Delete(u8),
        Cas(u8, Option<u8>, Option<(usize, u8)>),
        Retransmit,
    }

    fn gen() -> impl Strategy<Value = Gen> {
        let len = prop_oneof![4 => 0usize..40, 2 => 900usize..1200, 1 => 3000usize..9000, 1 => Just(65536usize)];
        prop_oneof![
            3 => (0u8..8).prop_map(Gen::Get),
            4 => (0u8..8, len.clone(), 0u8..3).prop_map(|(k, n, s)| Gen::Put(k, n, s)),
            1 => (0u8..8).prop_map(Gen::Delete),
            2 => (0u8..8, proptest::option::of(0u8..3), proptest::option::of((len, 0u8..3)))
                .prop_map(|(k, e, n)| Gen::Cas(k, e, n)),
            1 => Just(Gen::Retransmit),
        ]
    }

    /// A client's next req_id, and its last request with the expected result.
    type ClientModel = (u64, Option<(Request, Vec<u8>)>);

    fn val(n: usize, s: u8) -> Vec<u8> {
        vec![s; n]
    }

    proptest! {
        #![proptest_config(ProptestConfig {
            cases: std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(16),
            ..ProptestConfig::default()
        })]

        #[test]
        fn core_matches_model(
            batches in proptest::collection::vec(
                proptest::collection::vec((100u64..103, gen()), 0..5), 1..24),
            restart_at in 0usize..24,
        ) {
            let keys = Keys::new(1);
            let dir = tempfile::tempdir().unwrap();
            let mut core = core_at(&keys, 0, 4, dir.path(), FaultPlan::default());
            let mut m: BTreeMap<Vec<u8>, Vec<u8>> = BTreeMap::new();
            // Per client: next req_id, and the last request with its result.
            let mut clients: BTreeMap<ClientId, ClientModel> = BTreeMap::new();
            for (i, batch) in batches.iter().enumerate() {
                if i == restart_at {
                    drop(core);
                    core = core_at(&keys, 0, 4, dir.path(), FaultPlan::default());
                }
                let mut reqs = Vec::new();
                let mut want = Vec::new();
                for (c, g) in batch {
                    let entry = clients.entry(*c).or_insert((1, None));
                    let key = |k: &u8| vec![b'k', *k];
                    let op = match g {
                        Gen::Retransmit => {
                            if let Some((r, res)) = &entry.1 {
                                reqs.push(r.clone());
                                want.push(res.clone());
                            }
                            continue;
                        }
                        Gen::Get(k) => KvOp::Get { key: key(k) },
                        Gen::Put(k, n, s) => KvOp::Put { key: key(k), value: val(*n, *s) },
                        Gen::Delete(k) => KvOp::Delete { key: key(k) },
                        Gen::Cas(k, e, n) => KvOp::Cas {
                            key: key(k),
                            expected: e.map(|s| val(3, s)),
                            new: n.map(|(n, s)| val(n, s)),
                        },
                    };
                    let expect = match op.clone() {
                        KvOp::Get { key } => KvResult::Value(m.get(&key).cloned()),
                        KvOp::Put { key, value } => KvResult::Stored { replaced: m.insert(key, value).is_some() },
                        KvOp::Delete { key } => KvResult::Deleted { existed: m.remove(&key).is_some() },
                        KvOp::Cas { key, expected, new } => {
                            let current = m.get(&key).cloned();
                            let swapped = current == expected;
                            if swapped {
                                match new {
                                    Some(v) => { m.insert(key, v); }
                                    None => { m.remove(&key); }
                                }
                            }
                            KvResult::Cas { swapped, current }
                        }
                    }
                    .encode();
                    let r = Request { client: *c, req_id: entry.0, app: APP, op: op.encode(), read_only: false };
                    entry.0 += 1;
                    entry.1 = Some((r.clone(), expect.clone()));
                    reqs.push(r);
                    want.push(expect);
                }
                let s = i as AppSeq + 1;
                feed(&mut core, [0, 1], &order(s, reqs));
                let ready = core.ready().unwrap();
                let ex = executed(&ready);
                prop_assert_eq!(ex.len(), 1);
                let got: Vec<Vec<u8>> = ex[0].replies.iter().map(|r| r.result.clone()).collect();
                prop_assert_eq!(got, want);
            }
        }
    }
}

#[test]
fn repeated_orders_are_answered_from_the_result_cache() {
    let keys = Keys::new(1);
    let dir = tempfile::tempdir().unwrap();
    let k = 4;
    let mut core = core_at(&keys, 0, k, dir.path(), FaultPlan::default());
    // Client 100 writes at every app_seq; client 102 only at app_seq 2.
    let orders: Vec<Order> = (1..=6)
        .map(|s| {
            let mut requests = vec![put(100, s, "k", &[s as u8])];
            if s == 2 {
                requests.push(put(102, 1, "m", b"once"));
            }
            order(s, requests)
        })
        .collect();
    let mut first = BTreeMap::new();
    let mut cks = Vec::new();
    for o in &orders {
        feed(&mut core, [0, 1], o);
        let ready = core.ready().unwrap();
        for e in executed(&ready) {
            first.insert(e.app_seq, e.clone());
        }
        cks.extend(checkpoints(&ready));
    }
    assert_eq!(core.executed(), 6);
    let before = core.metrics().requests_executed;

    // Replica 3 (which never sent it) and replica 0 repeat app_seq 2: each
    // gets the same Executed again, addressed to it alone, and nothing is
    // re-executed. Client 100's reply there was superseded by its later
    // ones and is not sent again; client 102's is still its newest.
    let mut again = first[&2].clone();
    assert_eq!(again.replies.len(), 2);
    again.replies.retain(|r| r.client == 102);
    core.on_order(3, orders[1].clone()).unwrap();
    core.on_order(0, orders[1].clone()).unwrap();
    let ready = core.ready().unwrap();
    assert!(ready.messages.is_empty(), "nothing for every replica");
    assert_eq!(ready.direct.len(), 2);
    for ((to, m), want) in ready.direct.iter().zip([3, 0]) {
        assert_eq!(*to, want);
        assert_eq!(m, &ExecMessage::Executed(again.clone()));
        let env = core.seal_to(*to, m).unwrap();
        let key = keys.agreement[*to as usize].shared_mac_key(&keys.execs[0].public());
        assert_eq!(&env.open(&key).unwrap(), m);
    }
    assert!(core.seal_to(9, &ready.direct[0].1).is_none());
    assert_eq!(core.metrics().requests_executed, before);
    assert_eq!(core.metrics().orders_repeated, 2);

    // The newest reply of client 100 (app_seq 6) is sent again in full.
    core.on_order(2, orders[5].clone()).unwrap();
    let ready = core.ready().unwrap();
    assert_eq!(
        ready.direct,
        vec![(2, ExecMessage::Executed(first[&6].clone()))]
    );

    // Another order at an executed app_seq is stale, not answered.
    let other = order(2, vec![put(101, 1, "x", b"y")]);
    assert!(matches!(
        core.on_order(1, other),
        Err(Rejected::Stale { app_seq: 2, .. })
    ));
    assert!(core.ready().unwrap().is_empty());

    // Checkpoint 4 becomes stable: results up to it are dropped, later ones kept.
    let cert = ExecCheckpointCert {
        app: APP,
        app_seq: 4,
        root: cks[0].0.root,
        proofs: vec![
            (0, cks[0].1),
            (
                1,
                sign_exec_checkpoint(
                    &ExecCheckpoint {
                        exec: 1,
                        ..cks[0].0
                    },
                    &keys.execs[1],
                ),
            ),
        ],
    };
    assert_eq!(cks[0].0.app_seq, 4);
    core.on_stable(cert).unwrap();
    assert!(core.ready().unwrap().is_empty());
    assert!(matches!(
        core.on_order(2, orders[3].clone()),
        Err(Rejected::Stale { app_seq: 4, .. })
    ));
    core.on_order(2, orders[4].clone()).unwrap();
    let ready = core.ready().unwrap();
    let superseded = Executed {
        replies: Vec::new(),
        ..first[&5].clone()
    };
    assert_eq!(ready.direct, vec![(2, ExecMessage::Executed(superseded))]);
}
