//! Validation of view-change material and the new-view computation.
//!
//! Everything here is a pure function of signed messages, so the new primary
//! and every backup compute the same new-view log from the same view changes,
//! and a backup can check a new view without trusting the primary.

use std::collections::{BTreeMap, BTreeSet};
use zz_wire::message::{Batch, CheckpointCert, PreparedCert, Signed, ViewChange};
use zz_wire::{Digest, ReplicaId, Seq, View};

use ed25519_dalek::VerifyingKey;

/// Why a piece of peer-supplied evidence was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidEvidence {
    #[error("checkpoint certificate: {0}")]
    CheckpointCert(&'static str),
    #[error("prepared certificate for seq {seq}: {reason}")]
    PreparedCert { seq: Seq, reason: &'static str },
    #[error("view change: {0}")]
    ViewChange(&'static str),
}

pub fn primary_of(view: View, n: usize) -> ReplicaId {
    (view % n as u64) as ReplicaId
}

/// A checkpoint certificate needs 2f+1 valid, matching signatures from
/// distinct replicas; the genesis certificate (seq 0) needs none.
pub fn verify_checkpoint_cert(
    cert: &CheckpointCert,
    quorum: usize,
    keys: &[VerifyingKey],
) -> Result<(), InvalidEvidence> {
    if cert.seq == 0 {
        return if cert.proofs.is_empty() {
            Ok(())
        } else {
            Err(InvalidEvidence::CheckpointCert(
                "genesis certificate carries proofs",
            ))
        };
    }
    let mut signers = BTreeSet::new();
    for p in &cert.proofs {
        if p.body.seq != cert.seq || p.body.state != cert.state {
            return Err(InvalidEvidence::CheckpointCert("proof does not match"));
        }
        if !signers.insert(p.body.replica) {
            return Err(InvalidEvidence::CheckpointCert("duplicate signer"));
        }
        if !p.verify(keys) {
            return Err(InvalidEvidence::CheckpointCert("bad signature"));
        }
    }
    if signers.len() < quorum {
        return Err(InvalidEvidence::CheckpointCert("fewer than 2f+1 proofs"));
    }
    Ok(())
}

/// A prepared certificate: a pre-prepare signed by the primary of its view,
/// the matching batch, and 2f matching prepares from distinct backups.
pub fn verify_prepared_cert(
    cert: &PreparedCert,
    f: usize,
    keys: &[VerifyingKey],
) -> Result<(), InvalidEvidence> {
    let pp = &cert.pre_prepare.body;
    let bad = |reason| {
        Err(InvalidEvidence::PreparedCert {
            seq: pp.seq,
            reason,
        })
    };
    let n = keys.len();
    if pp.primary != primary_of(pp.view, n) {
        return bad("pre-prepare not from the view's primary");
    }
    if cert.batch.digest() != pp.digest {
        return bad("batch does not match digest");
    }
    if !cert.pre_prepare.verify(keys) {
        return bad("bad pre-prepare signature");
    }
    let mut signers = BTreeSet::new();
    for p in &cert.prepares {
        let b = &p.body;
        if b.view != pp.view || b.seq != pp.seq || b.digest != pp.digest {
            return bad("prepare does not match pre-prepare");
        }
        if b.replica == pp.primary {
            return bad("prepare from the primary");
        }
        if !signers.insert(b.replica) {
            return bad("duplicate prepare");
        }
        if !p.verify(keys) {
            return bad("bad prepare signature");
        }
    }
    if signers.len() < 2 * f {
        return bad("fewer than 2f prepares");
    }
    Ok(())
}

/// Full validation of a view change for `view` from replica `from`.
pub fn verify_view_change(
    vc: &Signed<ViewChange>,
    view: View,
    f: usize,
    window: u64,
    keys: &[VerifyingKey],
) -> Result<(), InvalidEvidence> {
    let b = &vc.body;
    if b.new_view != view {
        return Err(InvalidEvidence::ViewChange("wrong view"));
    }
    if !vc.verify(keys) {
        return Err(InvalidEvidence::ViewChange("bad signature"));
    }
    verify_checkpoint_cert(&b.stable, 2 * f + 1, keys)?;
    let mut seqs = BTreeSet::new();
    for c in &b.prepared {
        let pp = &c.pre_prepare.body;
        if pp.seq <= b.stable.seq || pp.seq > b.stable.seq + window {
            return Err(InvalidEvidence::ViewChange(
                "prepared certificate outside the window",
            ));
        }
        if pp.view >= view {
            return Err(InvalidEvidence::ViewChange(
                "prepared certificate from a future view",
            ));
        }
        if !seqs.insert(pp.seq) {
            return Err(InvalidEvidence::ViewChange(
                "two certificates for one sequence number",
            ));
        }
        verify_prepared_cert(c, f, keys)?;
    }
    Ok(())
}

/// What the new view must re-propose: the highest stable checkpoint among the
/// view changes, and for every sequence number above it up to the highest
/// prepared one, the batch prepared in the highest view (or the null batch).
#[derive(Debug, Clone, PartialEq)]
pub struct NewViewLog {
    pub stable: CheckpointCert,
    pub entries: Vec<(Seq, Digest, Batch)>,
}

/// Computes the new-view log from view changes that were already verified.
pub fn compute_new_view_log(vcs: &[Signed<ViewChange>]) -> Option<NewViewLog> {
    let stable = vcs
        .iter()
        .map(|vc| &vc.body.stable)
        .max_by_key(|c| c.seq)?
        .clone();
    let mut best: BTreeMap<Seq, &PreparedCert> = BTreeMap::new();
    for vc in vcs {
        for c in &vc.body.prepared {
            let pp = &c.pre_prepare.body;
            if pp.seq <= stable.seq {
                continue;
            }
            match best.get(&pp.seq) {
                Some(cur) if cur.pre_prepare.body.view >= pp.view => {}
                _ => {
                    best.insert(pp.seq, c);
                }
            }
        }
    }
    let max_s = best.keys().next_back().copied().unwrap_or(stable.seq);
    let entries = (stable.seq + 1..=max_s)
        .map(|s| match best.get(&s) {
            Some(c) => (s, c.pre_prepare.body.digest, c.batch.clone()),
            None => {
                let null = Batch::default();
                (s, null.digest(), null)
            }
        })
        .collect();
    Some(NewViewLog { stable, entries })
}
