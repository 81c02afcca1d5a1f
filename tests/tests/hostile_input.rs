//! A replica fed hostile but well-formed messages (extreme numbers, wrong
//! senders, forged certificates) rejects them without panicking and keeps
//! working afterwards.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::collections::HashMap;

use zz_agreement::app::{new_app, Service};
use zz_agreement::{Replica, ReplicaOptions};
use zz_wire::config::{AgreementTuning, ReplicaKeys};
use zz_wire::crypto::KeyPair;
use zz_wire::message::*;
use zz_wire::Digest;

fn extreme(rng: &mut ChaCha8Rng) -> u64 {
    match rng.gen_range(0..5) {
        0 => 0,
        1 => u64::MAX,
        2 => u64::MAX - rng.gen_range(0..1000),
        3 => rng.gen_range(0..300),
        _ => rng.gen(),
    }
}

fn hostile(rng: &mut ChaCha8Rng, byz: &KeyPair, me: u32) -> PeerMessage {
    let d = Digest::of(&rng.gen::<[u8; 8]>());
    let cert = CheckpointCert {
        seq: extreme(rng),
        state: d,
        proofs: vec![],
    };
    match rng.gen_range(0..9) {
        0 => {
            let batch = Batch::default();
            let pp = PrePrepare {
                view: extreme(rng),
                seq: extreme(rng),
                digest: batch.digest(),
                primary: me,
            };
            PeerMessage::PrePrepare(Signed::sign(pp, byz), batch)
        }
        1 => PeerMessage::Prepare(Signed::sign(
            Prepare {
                view: extreme(rng),
                seq: extreme(rng),
                digest: d,
                replica: me,
            },
            byz,
        )),
        2 => PeerMessage::Commit(Commit {
            view: extreme(rng),
            seq: extreme(rng),
            digest: d,
            replica: me,
        }),
        3 => PeerMessage::Checkpoint(Signed::sign(
            Checkpoint {
                seq: extreme(rng) & !127,
                state: d,
                replica: me,
            },
            byz,
        )),
        4 => PeerMessage::ViewChange(Signed::sign(
            ViewChange {
                new_view: extreme(rng),
                replica: me,
                stable: cert,
                prepared: vec![],
            },
            byz,
        )),
        5 => PeerMessage::NewView(Signed::sign(
            NewView {
                view: extreme(rng),
                primary: me,
                view_changes: vec![],
                pre_prepares: vec![],
            },
            byz,
        )),
        6 => PeerMessage::Status(Status {
            replica: me,
            view: extreme(rng),
            view_active: rng.gen(),
            last_executed: extreme(rng),
            stable: extreme(rng),
        }),
        7 => PeerMessage::StateTransfer(StateTransfer {
            cert,
            snapshot: vec![1, 2, 3],
        }),
        _ => PeerMessage::Committed(CommittedEntry {
            seq: extreme(rng),
            batch: Batch::default(),
        }),
    }
}

#[test]
fn hostile_messages_are_rejected_without_panic() {
    let keys: Vec<KeyPair> = (0..4u8).map(|i| KeyPair::from_seed([i + 7; 32])).collect();
    let pubs: Vec<_> = keys.iter().map(|k| k.public()).collect();
    let rk = ReplicaKeys::derive(0, keys[0].clone(), pubs, &HashMap::new());
    let svc = Service::new(vec![(0, new_app("counter").unwrap())]);
    let mut r = Replica::new(
        ReplicaOptions::new(4, 1, AgreementTuning::default()),
        rk,
        svc,
    );
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    let mut rejected = 0;
    for i in 0..20_000u64 {
        // One Byzantine replica (f = 1): usually it names itself, sometimes
        // it claims to be someone else.
        let from = 3;
        let claimed = if rng.gen_bool(0.8) {
            from
        } else {
            rng.gen_range(0..6)
        };
        let msg = hostile(&mut rng, &keys[from as usize], claimed);
        if r.step(from, msg).is_err() {
            rejected += 1;
        }
        r.tick(i);
        let _ = r.ready();
    }
    assert!(
        rejected > 10_000,
        "most hostile messages must be rejected, got {rejected}"
    );
    assert_eq!(r.metrics().rejected, rejected);
    assert_eq!(r.last_executed(), 0, "nothing hostile may execute");
}
