//! Apps run by execution replicas (DESIGN §2-4), seen from an agreement replica.
//!
//! Two halves:
//! - [`ExecTable`]: replicated state, part of the checkpointed service state
//!   and changed only by executing the ordered log: each remote app's epoch,
//!   next `app_seq` and active set. Every correct agreement replica therefore
//!   switches active sets at the same point.
//! - [`Monitor`]: local, per replica: the orders sent since the app's last
//!   stable execution checkpoint (for replay to woken replicas), the digests
//!   each execution replica returned, suspicion, verdicts, and execution
//!   checkpoint certificates. Its conclusions only take effect once f+1
//!   replicas' signed [`Suspect`]s are ordered as a [`Reconfigure`].

use std::collections::{BTreeMap, BTreeSet};

use ed25519_dalek::VerifyingKey;
use serde::{Deserialize, Serialize};
use zz_wire::crypto::Signature;
use zz_wire::exec::{
    AppSeq, Epoch, Evidence, ExecCheckpoint, ExecCheckpointCert, ExecIndex, HostAction, Order,
    Reconfigure, Suspect, EXEC_CHECKPOINT_DOMAIN,
};
use zz_wire::message::Signed;
use zz_wire::{AppId, Digest, ReplicaId};

/// Replicated execution state of one remote app.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AppExecState {
    pub epoch: Epoch,
    pub next_app_seq: AppSeq,
    pub active: BTreeSet<ExecIndex>,
    /// True between waking every replica and the verdict that settles it.
    pub recovering: bool,
    /// Replicas found faulty at the last verdict (reimaged).
    pub faulty: BTreeSet<ExecIndex>,
}

/// What executing a reconfiguration asks of host agents.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Transition {
    pub app: AppId,
    /// The epoch the commands carry (the new one).
    pub epoch: Epoch,
    pub commands: Vec<(ExecIndex, HostAction)>,
    /// Replicas that became active and need the stable checkpoint and replay.
    pub woken: Vec<ExecIndex>,
}

/// The replicated table of every remote app.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecTable {
    pub apps: BTreeMap<AppId, AppExecState>,
    /// Execution replicas per app: 2f+1.
    pub replicas_per_app: u32,
    pub f: u32,
}

impl ExecTable {
    /// Every app starts with the f+1 lowest-numbered replicas active.
    pub fn new(apps: &[AppId], f: usize) -> Self {
        let active: BTreeSet<ExecIndex> = (0..=f as ExecIndex).collect();
        ExecTable {
            apps: apps
                .iter()
                .map(|a| {
                    let st = AppExecState {
                        epoch: 0,
                        next_app_seq: 1,
                        active: active.clone(),
                        recovering: false,
                        faulty: BTreeSet::new(),
                    };
                    (*a, st)
                })
                .collect(),
            replicas_per_app: 2 * f as u32 + 1,
            f: f as u32,
        }
    }

    pub fn is_remote(&self, app: AppId) -> bool {
        self.apps.contains_key(&app)
    }

    /// Assigns the next `app_seq` of `app`.
    pub fn next_app_seq(&mut self, app: AppId) -> Option<AppSeq> {
        let st = self.apps.get_mut(&app)?;
        let s = st.next_app_seq;
        st.next_app_seq += 1;
        Some(s)
    }

    /// Applies an ordered reconfiguration whose proofs were already verified.
    /// A stale one (for an older epoch) changes nothing: it was overtaken.
    pub fn apply(&mut self, r: &Reconfigure) -> Option<Transition> {
        let per_app = self.replicas_per_app;
        let keep = self.f as usize + 1;
        let st = self.apps.get_mut(&r.app)?;
        if r.epoch != st.epoch {
            return None;
        }
        let verdict = match &r.proofs.first()?.body.evidence {
            Evidence::Verdict { faulty } => Some(faulty.iter().copied().collect::<BTreeSet<_>>()),
            _ => None,
        };
        st.epoch += 1;
        let mut commands = Vec::new();
        let mut woken = Vec::new();
        match verdict {
            None => {
                // Wake every dormant replica: 2f+1 then execute, so f+1
                // correct replies exist whatever the f faulty do.
                for i in 0..per_app {
                    if !st.active.contains(&i) {
                        commands.push((i, HostAction::Wake));
                        woken.push(i);
                    }
                }
                st.active = (0..per_app).collect();
                st.recovering = true;
            }
            Some(faulty) => {
                let correct: Vec<ExecIndex> =
                    (0..per_app).filter(|i| !faulty.contains(i)).collect();
                let new_active: BTreeSet<ExecIndex> = correct.iter().take(keep).copied().collect();
                for i in &faulty {
                    commands.push((*i, HostAction::Reimage));
                }
                for i in &correct {
                    if !new_active.contains(i) && st.active.contains(i) {
                        commands.push((*i, HostAction::Sleep));
                    }
                }
                for i in &new_active {
                    if !st.active.contains(i) {
                        commands.push((*i, HostAction::Wake));
                        woken.push(*i);
                    }
                }
                st.active = new_active;
                st.recovering = false;
                st.faulty = faulty;
            }
        }
        Some(Transition {
            app: r.app,
            epoch: st.epoch,
            commands,
            woken,
        })
    }
}

/// Why a reconfiguration or suspect was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BadReconfigure {
    #[error("app {0} is not run by execution replicas")]
    UnknownApp(AppId),
    #[error("fewer than f+1 distinct valid suspects")]
    TooFewProofs,
    #[error("suspects disagree on app, epoch or verdict")]
    Inconsistent,
    #[error("bad suspect signature")]
    BadSignature,
}

/// Checks that `r` carries f+1 valid, consistent suspects from distinct replicas.
pub fn verify_reconfigure(
    r: &Reconfigure,
    f: usize,
    replica_keys: &[VerifyingKey],
) -> Result<(), BadReconfigure> {
    let first = r.proofs.first().ok_or(BadReconfigure::TooFewProofs)?;
    let mut signers = BTreeSet::new();
    for p in &r.proofs {
        let b = &p.body;
        let consistent = b.app == r.app
            && b.epoch == r.epoch
            && b.evidence.is_verdict() == first.body.evidence.is_verdict()
            && (!b.evidence.is_verdict() || b.evidence == first.body.evidence);
        if !consistent {
            return Err(BadReconfigure::Inconsistent);
        }
        if !p.verify(replica_keys) {
            return Err(BadReconfigure::BadSignature);
        }
        signers.insert(b.replica);
    }
    if signers.len() <= f {
        return Err(BadReconfigure::TooFewProofs);
    }
    Ok(())
}

/// Digests returned for one `app_seq`.
#[derive(Debug, Default)]
struct Returned {
    sent_ms: u64,
    digests: BTreeMap<ExecIndex, Digest>,
}

/// An agreement replica's local view of one remote app's execution replicas.
#[derive(Debug, Default)]
pub struct Monitor {
    /// Orders since the last stable execution checkpoint, for replay.
    pub orders: BTreeMap<AppSeq, Order>,
    returned: BTreeMap<AppSeq, Returned>,
    /// Smoothed time for the whole active set to answer.
    latency_ewma_ms: f64,
    /// The epoch we already signed a suspect (or verdict) for.
    suspected_epoch: Option<Epoch>,
    suspects: BTreeMap<Epoch, BTreeMap<ReplicaId, Signed<Suspect>>>,
    checkpoints: BTreeMap<AppSeq, BTreeMap<ExecIndex, (Digest, Signature)>>,
    pub stable: Option<ExecCheckpointCert>,
    /// Reconfigurations ready to be ordered.
    pub ready_reconfigs: BTreeMap<Epoch, Reconfigure>,
    /// When this replica last saw a suspicion take effect (for metrics).
    pub last_detect_ms: Option<u64>,
}

/// A conclusion of the monitor that this replica should sign.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Conclusion {
    pub app_seq: AppSeq,
    pub evidence: Evidence,
}

impl Monitor {
    pub fn timeout_ms(&self, min_ms: u64) -> u64 {
        min_ms.max((4.0 * self.latency_ewma_ms) as u64)
    }

    pub fn order_sent(&mut self, order: Order, now_ms: u64) {
        self.returned.insert(
            order.app_seq,
            Returned {
                sent_ms: now_ms,
                digests: BTreeMap::new(),
            },
        );
        self.orders.insert(order.app_seq, order);
    }

    /// After waking replicas: every order since the stable checkpoint is
    /// replayed, so all of them are watched again, keeping digests already seen.
    pub fn rewatch_all(&mut self, now_ms: u64) {
        for s in self.orders.keys() {
            self.returned.entry(*s).or_default().sent_ms = now_ms;
        }
    }

    pub fn record(&mut self, app_seq: AppSeq, exec: ExecIndex, digest: Digest) {
        if let Some(r) = self.returned.get_mut(&app_seq) {
            r.digests.entry(exec).or_insert(digest);
        }
    }

    /// Compares what the active set returned. `epoch` and `recovering` come
    /// from the replicated table.
    pub fn evaluate(
        &mut self,
        epoch: Epoch,
        active: &BTreeSet<ExecIndex>,
        recovering: bool,
        f: usize,
        now_ms: u64,
        min_timeout_ms: u64,
    ) -> Option<Conclusion> {
        if self.suspected_epoch == Some(epoch) {
            return None;
        }
        let timeout = self.timeout_ms(min_timeout_ms);
        let mut done = Vec::new();
        let mut conclusion = None;
        for (seq, r) in &self.returned {
            let waited = now_ms.saturating_sub(r.sent_ms);
            let from_active: Vec<(ExecIndex, Digest)> = r
                .digests
                .iter()
                .filter(|(i, _)| active.contains(i))
                .map(|(i, d)| (*i, *d))
                .collect();
            if recovering {
                // Find the digest f+1 replicas agree on; everyone else is
                // faulty once they answered differently or the timeout passed.
                let mut counts: BTreeMap<Digest, usize> = BTreeMap::new();
                for (_, d) in &from_active {
                    *counts.entry(*d).or_default() += 1;
                }
                let Some((good, _)) = counts.iter().find(|(_, c)| **c > f) else {
                    continue;
                };
                let all_answered = from_active.len() == active.len();
                if !all_answered && waited < timeout {
                    continue;
                }
                let faulty: Vec<ExecIndex> = active
                    .iter()
                    .filter(|i| r.digests.get(i) != Some(good))
                    .copied()
                    .collect();
                conclusion = Some(Conclusion {
                    app_seq: *seq,
                    evidence: Evidence::Verdict { faulty },
                });
                break;
            }
            let distinct: BTreeSet<Digest> = from_active.iter().map(|(_, d)| *d).collect();
            if distinct.len() > 1 {
                conclusion = Some(Conclusion {
                    app_seq: *seq,
                    evidence: Evidence::Mismatch {
                        digests: from_active,
                    },
                });
                break;
            }
            if from_active.len() == active.len() {
                let sample = waited as f64;
                self.latency_ewma_ms = if self.latency_ewma_ms == 0.0 {
                    sample
                } else {
                    0.9 * self.latency_ewma_ms + 0.1 * sample
                };
                done.push(*seq);
            } else if waited >= timeout {
                let missing = active
                    .iter()
                    .filter(|i| !r.digests.contains_key(i))
                    .copied()
                    .collect();
                conclusion = Some(Conclusion {
                    app_seq: *seq,
                    evidence: Evidence::Timeout {
                        missing,
                        waited_ms: waited,
                    },
                });
                break;
            }
        }
        for s in done {
            self.returned.remove(&s);
        }
        if conclusion.is_some() {
            self.suspected_epoch = Some(epoch);
        }
        conclusion
    }

    /// Records a verified suspect; returns a reconfiguration once f+1
    /// consistent ones for the current epoch are in.
    pub fn add_suspect(&mut self, s: Signed<Suspect>, current_epoch: Epoch, f: usize) {
        let e = s.body.epoch;
        if e != current_epoch {
            return;
        }
        let by_replica = self.suspects.entry(e).or_default();
        by_replica.entry(s.body.replica).or_insert(s);
        // Group consistent suspects: all wake requests, or verdicts naming
        // the same faulty set.
        let mut groups: BTreeMap<Option<Vec<ExecIndex>>, Vec<Signed<Suspect>>> = BTreeMap::new();
        for p in by_replica.values() {
            let key = match &p.body.evidence {
                Evidence::Verdict { faulty } => Some(faulty.clone()),
                _ => None,
            };
            groups.entry(key).or_default().push(p.clone());
        }
        if let Some(proofs) = groups.into_values().find(|g| g.len() > f) {
            let app = proofs[0].body.app;
            self.ready_reconfigs.entry(e).or_insert(Reconfigure {
                app,
                epoch: e,
                proofs: proofs.into_iter().take(f + 1).collect(),
            });
        }
    }

    /// A reconfiguration for `epoch` executed: forget what belonged to older epochs.
    pub fn epoch_changed(&mut self, new_epoch: Epoch) {
        self.suspects = self.suspects.split_off(&new_epoch);
        self.ready_reconfigs = self.ready_reconfigs.split_off(&new_epoch);
    }

    /// Records a signed execution checkpoint from an execution replica;
    /// returns a new stable certificate once f+1 distinct replicas agree,
    /// or a conflicting pair as evidence of a fault.
    pub fn add_checkpoint(
        &mut self,
        ck: ExecCheckpoint,
        sig: Signature,
        exec_keys: &[VerifyingKey],
        f: usize,
    ) -> Result<Option<ExecCheckpointCert>, CheckpointError> {
        let key = exec_keys
            .get(ck.exec as usize)
            .ok_or(CheckpointError::UnknownReplica)?;
        let bytes = zz_wire::codec::encode(&ck);
        if !zz_wire::crypto::verify_signature(key, EXEC_CHECKPOINT_DOMAIN, &bytes, &sig) {
            return Err(CheckpointError::BadSignature);
        }
        if self
            .stable
            .as_ref()
            .is_some_and(|s| s.app_seq >= ck.app_seq)
        {
            return Ok(None);
        }
        let votes = self.checkpoints.entry(ck.app_seq).or_default();
        votes.entry(ck.exec).or_insert((ck.root, sig));
        let matching: Vec<(ExecIndex, Signature)> = votes
            .iter()
            .filter(|(_, (r, _))| *r == ck.root)
            .map(|(i, (_, s))| (*i, *s))
            .collect();
        if matching.len() > f {
            let cert = ExecCheckpointCert {
                app: ck.app,
                app_seq: ck.app_seq,
                root: ck.root,
                proofs: matching,
            };
            self.orders = self.orders.split_off(&(ck.app_seq + 1));
            self.checkpoints = self.checkpoints.split_off(&(ck.app_seq + 1));
            self.stable = Some(cert.clone());
            return Ok(Some(cert));
        }
        Ok(None)
    }

    /// Roots that active replicas reported for one checkpoint but disagree on.
    pub fn checkpoint_conflict(
        &self,
        app_seq: AppSeq,
        active: &BTreeSet<ExecIndex>,
    ) -> Option<Vec<(ExecIndex, Digest)>> {
        let votes = self.checkpoints.get(&app_seq)?;
        let from_active: Vec<(ExecIndex, Digest)> = votes
            .iter()
            .filter(|(i, _)| active.contains(i))
            .map(|(i, (r, _))| (*i, *r))
            .collect();
        let distinct: BTreeSet<Digest> = from_active.iter().map(|(_, r)| *r).collect();
        (distinct.len() > 1).then_some(from_active)
    }

    /// Records that this replica signed a suspect for `epoch`.
    pub fn mark_suspected(&mut self, epoch: Epoch) {
        self.suspected_epoch = Some(epoch);
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CheckpointError {
    #[error("checkpoint from an unknown execution replica")]
    UnknownReplica,
    #[error("bad execution checkpoint signature")]
    BadSignature,
}
