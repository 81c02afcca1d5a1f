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
    /// What the reconfiguration that started this epoch asks of host agents.
    /// Replicated, so a replica that skipped the reconfiguration by state
    /// transfer still sends (and re-sends) the same commands.
    pub commands: Vec<(ExecIndex, HostAction)>,
    /// Replicas that became active at this epoch and start from the stable checkpoint.
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
                        commands: Vec::new(),
                        woken: Vec::new(),
                    };
                    (*a, st)
                })
                .collect(),
            replicas_per_app: 2 * f as u32 + 1,
            f: f as u32,
        }
    }

    /// Makes all 2f+1 replicas of every app active (no dormant ones): the
    /// initial state of a deployment with `execution.all_active`.
    pub fn activate_all(&mut self) {
        let all: BTreeSet<ExecIndex> = (0..self.replicas_per_app).collect();
        for st in self.apps.values_mut() {
            st.active = all.clone();
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

    /// Applies an ordered reconfiguration whose proofs were already verified;
    /// returns whether it took effect. A stale one (for an older epoch)
    /// changes nothing: it was overtaken.
    pub fn apply(&mut self, r: &Reconfigure) -> bool {
        let per_app = self.replicas_per_app;
        let keep = self.f as usize + 1;
        let Some(st) = self.apps.get_mut(&r.app) else {
            return false;
        };
        let Some(first) = r.proofs.first() else {
            return false;
        };
        if r.epoch != st.epoch {
            return false;
        }
        let verdict = match &first.body.evidence {
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
        st.commands = commands;
        st.woken = woken;
        true
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

/// What [`Monitor::retransmissions`] asks to re-send.
#[derive(Debug, Default)]
pub struct Resends {
    pub orders: Vec<(ExecIndex, Order)>,
    /// Replicas to send the stable checkpoint certificate again.
    pub stable_to: BTreeSet<ExecIndex>,
}

/// Most orders re-sent to one execution replica at once.
pub const RESEND_WINDOW: usize = 64;
/// The wait between re-sends to a replica that does not progress doubles
/// this many times at most (from half the timeout). Once only: a woken
/// replica must answer within its allowance even if re-sends are lost, or
/// it is convicted for being slow.
pub const RESEND_MAX_BACKOFF: u32 = 1;

/// Re-send pacing for one execution replica (see [`Monitor::retransmissions`]).
#[derive(Debug, Clone, Copy)]
struct Resend {
    /// Its count of answered orders when last looked at.
    answered: u64,
    /// No re-send before this.
    next_ms: u64,
    /// Doublings of the wait so far.
    backoff: u32,
}

/// An agreement replica's local view of one remote app's execution replicas.
#[derive(Debug, Default)]
pub struct Monitor {
    /// Orders since the last stable execution checkpoint, for replay.
    pub orders: BTreeMap<AppSeq, Order>,
    returned: BTreeMap<AppSeq, Returned>,
    /// Orders each execution replica has answered: its progress.
    answered: BTreeMap<ExecIndex, u64>,
    /// Re-send pacing per execution replica.
    resend: BTreeMap<ExecIndex, Resend>,
    /// Smoothed time for the whole active set to answer.
    latency_ewma_ms: f64,
    /// The epoch we already signed a suspect (or verdict) for.
    suspected_epoch: Option<Epoch>,
    /// Our latest verdict: its epoch, app_seq and faulty set.
    own_verdict: Option<(Epoch, AppSeq, Vec<ExecIndex>)>,
    suspects: BTreeMap<Epoch, BTreeMap<ReplicaId, Signed<Suspect>>>,
    checkpoints: BTreeMap<AppSeq, BTreeMap<ExecIndex, (Digest, Signature)>>,
    pub stable: Option<ExecCheckpointCert>,
    /// Reconfigurations ready to be ordered.
    pub ready_reconfigs: BTreeMap<Epoch, Reconfigure>,
    /// When our own suspect was last re-sent.
    own_resent_ms: u64,
    /// Roots every execution replica reported for the stable checkpoint,
    /// and when it became stable: evidence for verdicts when no order is
    /// left to compare.
    stable_votes: BTreeMap<ExecIndex, Digest>,
    stable_ms: u64,
    /// When the current epoch's watch began.
    rewatch_ms: u64,
    /// Replicas seen returning a digest other than one f+1 agreed on, for
    /// an order since dropped from `returned` (a checkpoint became stable
    /// after it), with that `app_seq`: evidence the verdict must not lose.
    disagreed: BTreeMap<ExecIndex, AppSeq>,
    /// When each execution replica was last woken or rebuilt: while it
    /// recovers state it gets a longer timeout (see [`Monitor::allowance`]).
    woken_ms: BTreeMap<ExecIndex, u64>,
    /// The epoch of the replicated table this monitor last acted on.
    pub epoch_seen: Epoch,
    /// When this replica last sent the current epoch's host commands.
    pub commands_sent_ms: u64,
}

/// A conclusion of the monitor that this replica should sign.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Conclusion {
    pub app_seq: AppSeq,
    pub evidence: Evidence,
}

/// A replica woken less than this long ago is still recovering state.
pub const RECOVERY_GRACE_MS: u64 = 60_000;
/// How many timeouts a recovering replica gets to answer: it may fetch the
/// pages each order reads, and replays the log since the stable checkpoint.
/// Being slow while recovering is expected, not evidence of a fault; a
/// silent Byzantine replica only delays its verdict by this factor.
pub const RECOVERING_TIMEOUT_FACTOR: u64 = 10;

impl Monitor {
    pub fn timeout_ms(&self, min_ms: u64) -> u64 {
        min_ms.max((4.0 * self.latency_ewma_ms) as u64)
    }

    /// A verdict took effect: the evidence gathered for it is spent.
    pub fn verdict_applied(&mut self) {
        self.disagreed.clear();
    }

    /// Records that `woken` replicas were just woken (or rebuilt).
    pub fn note_woken(&mut self, woken: &[ExecIndex], now_ms: u64) {
        for i in woken {
            self.woken_ms.insert(*i, now_ms);
        }
    }

    /// How long replica `i` may take to answer: `timeout`, or a multiple
    /// of it while `i` is recovering after a wake.
    pub fn allowance(&self, i: ExecIndex, timeout: u64, now_ms: u64) -> u64 {
        match self.woken_ms.get(&i) {
            Some(t) if now_ms.saturating_sub(*t) < RECOVERY_GRACE_MS => {
                timeout.saturating_mul(RECOVERING_TIMEOUT_FACTOR)
            }
            _ => timeout,
        }
    }

    pub fn order_sent(&mut self, order: Order, now_ms: u64) {
        // A replica that orders late may already hold an execution checkpoint
        // certificate past this order (f+1 executors signed it): the order
        // is covered, cannot be replayed from it, and executors past it need
        // not answer it again, so watching it would hold the verdict forever.
        if self
            .stable
            .as_ref()
            .is_some_and(|s| order.app_seq <= s.app_seq)
        {
            return;
        }
        self.returned.insert(
            order.app_seq,
            Returned {
                sent_ms: now_ms,
                ..Default::default()
            },
        );
        self.orders.insert(order.app_seq, order);
    }

    /// After a reconfiguration every order since the stable checkpoint is
    /// sent again to the whole active set (replicas answer repeated orders
    /// from their result cache), so all of them are watched again, keeping
    /// the digests already seen and restarting the clock.
    pub fn rewatch_all(&mut self, now_ms: u64) {
        self.rewatch_ms = now_ms;
        for s in self.orders.keys() {
            let r = self.returned.entry(*s).or_default();
            r.sent_ms = now_ms;
        }
        // Everything was just sent again: re-sends wait for the new clock.
        self.resend.clear();
        // Orders below the stable checkpoint cannot be replayed: stop watching them.
        let orders = &self.orders;
        self.returned.retain(|s, _| orders.contains_key(s));
    }

    /// Orders to re-send (messages get lost: a host agent drops what it
    /// cannot hold for a replica that is not connected, an executor drops
    /// envelopes beyond its queue). Paced per execution replica, because
    /// re-sending everything a slow replica has not answered is what makes
    /// it slower: a replica that answered something new since the last
    /// look is making progress and gets nothing; one that did not, once
    /// half the timeout has passed since it last progressed or got a
    /// re-send, gets the [`RESEND_WINDOW`] lowest orders it has not
    /// answered (it executes in order), and the wait before the next
    /// re-send doubles (at most [`RESEND_MAX_BACKOFF`] times) until it
    /// progresses again. A replica that gets orders again, or that has not
    /// voted for the stable checkpoint (for [`RECOVERY_GRACE_MS`] after it
    /// became stable), also gets the stable certificate: it may have missed
    /// the checkpoint it must start from (a woken replica whose orders were
    /// all covered by a checkpoint that became stable while it slept has no
    /// order left to be re-sent, only that).
    pub fn retransmissions(
        &mut self,
        active: &BTreeSet<ExecIndex>,
        now_ms: u64,
        min_timeout_ms: u64,
    ) -> Resends {
        let half = self.timeout_ms(min_timeout_ms) / 2;
        let mut out = Resends::default();
        let stable_since = self
            .stable
            .as_ref()
            .map(|_| now_ms.saturating_sub(self.stable_ms));
        for &i in active {
            let answered = self.answered.get(&i).copied().unwrap_or(0);
            let pace = self.resend.entry(i).or_insert(Resend {
                answered,
                next_ms: now_ms + half,
                backoff: 0,
            });
            if pace.answered != answered {
                *pace = Resend {
                    answered,
                    next_ms: now_ms + half,
                    backoff: 0,
                };
                continue;
            }
            if now_ms < pace.next_ms {
                continue;
            }
            let before = out.orders.len();
            for (seq, r) in &self.returned {
                if out.orders.len() - before >= RESEND_WINDOW {
                    break;
                }
                if r.digests.contains_key(&i) || now_ms.saturating_sub(r.sent_ms) < half {
                    continue;
                }
                if let Some(order) = self.orders.get(seq) {
                    out.orders.push((i, order.clone()));
                }
            }
            let unvoted = stable_since.is_some_and(|since| {
                (half..RECOVERY_GRACE_MS).contains(&since) && !self.stable_votes.contains_key(&i)
            });
            if out.orders.len() > before || unvoted {
                if self.stable.is_some() {
                    out.stable_to.insert(i);
                }
                pace.backoff = (pace.backoff + 1).min(RESEND_MAX_BACKOFF);
                pace.next_ms = now_ms + (half << pace.backoff);
            } else {
                pace.next_ms = now_ms + half;
            }
        }
        out
    }

    pub fn record(&mut self, app_seq: AppSeq, exec: ExecIndex, digest: Digest) {
        if let Some(r) = self.returned.get_mut(&app_seq) {
            if let std::collections::btree_map::Entry::Vacant(e) = r.digests.entry(exec) {
                e.insert(digest);
                *self.answered.entry(exec).or_default() += 1;
            }
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
        let timeout = self.timeout_ms(min_timeout_ms);
        if recovering {
            // A verdict reached early in the recovery epoch rests on the
            // orders answered so far, and replicas reach it at different
            // moments: their verdicts can name different faulty sets, none
            // with f+1 signers (seen in the simulator: [1,2], [2], [], [0,2]
            // from seven replicas). So while the epoch lasts, a replica signs
            // again when a verdict over later orders names another set;
            // peers count each replica's latest (`add_suspect`).
            let c = self.verdict(active, f, now_ms, timeout)?;
            let Evidence::Verdict { faulty } = &c.evidence else {
                return None;
            };
            if let Some((e, seq, set)) = &self.own_verdict {
                if *e == epoch && (set == faulty || c.app_seq <= *seq) {
                    return None;
                }
            }
            self.own_verdict = Some((epoch, c.app_seq, faulty.clone()));
            self.suspected_epoch = Some(epoch);
            return Some(c);
        }
        if self.suspected_epoch == Some(epoch) {
            return None;
        }
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
                let missing: Vec<ExecIndex> = active
                    .iter()
                    .filter(|i| !r.digests.contains_key(i))
                    .filter(|i| waited >= self.allowance(**i, timeout, now_ms))
                    .copied()
                    .collect();
                if missing.is_empty() {
                    // Only recovering replicas are late, and within their allowance.
                    continue;
                }
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

    /// With every replica awake: once every watched order has a digest f+1
    /// replicas agree on and every active replica answered it (or the timeout
    /// passed), the replicas that ever disagreed or stayed silent are faulty.
    fn verdict(
        &self,
        active: &BTreeSet<ExecIndex>,
        f: usize,
        now_ms: u64,
        timeout: u64,
    ) -> Option<Conclusion> {
        let mut faulty = BTreeSet::new();
        let mut last = None;
        // A checkpoint that became stable in this epoch: replicas that did
        // not reach its root in time are faulty too.
        if let Some(stable) = self
            .stable
            .as_ref()
            .filter(|_| self.stable_ms >= self.rewatch_ms)
        {
            let since = now_ms.saturating_sub(self.stable_ms);
            let all_in = active.iter().all(|i| {
                self.stable_votes.contains_key(i) || since >= self.allowance(*i, timeout, now_ms)
            });
            if all_in {
                faulty.extend(
                    active
                        .iter()
                        .filter(|i| self.stable_votes.get(i) != Some(&stable.root)),
                );
                last = Some(stable.app_seq);
            } else if self.returned.is_empty() {
                return None;
            }
        }
        for (seq, r) in &self.returned {
            let mut counts: BTreeMap<Digest, usize> = BTreeMap::new();
            for (i, d) in &r.digests {
                if active.contains(i) {
                    *counts.entry(*d).or_default() += 1;
                }
            }
            let good = counts.iter().find(|(_, c)| **c > f).map(|(d, _)| *d)?;
            let waited = now_ms.saturating_sub(r.sent_ms);
            let all_in = active.iter().all(|i| {
                r.digests.contains_key(i) || waited >= self.allowance(*i, timeout, now_ms)
            });
            if !all_in {
                return None;
            }
            faulty.extend(active.iter().filter(|i| r.digests.get(i) != Some(&good)));
            last = Some(*seq);
        }
        for (i, seq) in &self.disagreed {
            if active.contains(i) {
                faulty.insert(*i);
                last = Some(last.map_or(*seq, |l| l.max(*seq)));
            }
        }
        // More than f "faulty" means a correct replica is merely slow: wait.
        if faulty.len() > f {
            return None;
        }
        Some(Conclusion {
            app_seq: last?,
            evidence: Evidence::Verdict {
                faulty: faulty.into_iter().collect(),
            },
        })
    }

    /// Records a verified suspect; returns a reconfiguration once f+1
    /// consistent ones for the current epoch are in.
    pub fn add_suspect(&mut self, s: Signed<Suspect>, current_epoch: Epoch, f: usize) {
        let e = s.body.epoch;
        // Suspects for the next epochs are kept: a peer may execute the
        // reconfiguration before we do.
        if e < current_epoch || e > current_epoch + 2 {
            return;
        }
        // Each replica's latest suspect counts (a verdict may be signed
        // again over later orders, see `evaluate`).
        let by_replica = self.suspects.entry(e).or_default();
        match by_replica.get(&s.body.replica) {
            Some(old) if old.body.app_seq >= s.body.app_seq => {}
            _ => {
                by_replica.insert(s.body.replica, s);
            }
        }
        self.collect(current_epoch, f);
    }

    /// Forms a reconfiguration once f+1 consistent suspects for the current
    /// epoch are in: all wake requests, or verdicts naming the same faulty set.
    fn collect(&mut self, epoch: Epoch, f: usize) {
        let Some(by_replica) = self.suspects.get(&epoch) else {
            return;
        };
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
            self.ready_reconfigs.entry(epoch).or_insert(Reconfigure {
                app,
                epoch,
                proofs: proofs.into_iter().take(f + 1).collect(),
            });
        }
    }

    /// Our own suspect for `epoch`, re-sent every `every_ms` while the
    /// reconfiguration it asks for has not executed (suspects can be lost).
    pub fn resend_own(
        &mut self,
        epoch: Epoch,
        me: ReplicaId,
        now_ms: u64,
        every_ms: u64,
    ) -> Option<Signed<Suspect>> {
        let own = self.suspects.get(&epoch)?.get(&me)?.clone();
        if now_ms < self.own_resent_ms + every_ms {
            return None;
        }
        self.own_resent_ms = now_ms;
        Some(own)
    }

    /// A reconfiguration for `epoch` executed: forget what belonged to older epochs.
    pub fn epoch_changed(&mut self, new_epoch: Epoch, f: usize) {
        self.suspects = self.suspects.split_off(&new_epoch);
        self.ready_reconfigs = self.ready_reconfigs.split_off(&new_epoch);
        self.collect(new_epoch, f);
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
        now_ms: u64,
    ) -> Result<Option<ExecCheckpointCert>, CheckpointError> {
        let key = exec_keys
            .get(ck.exec as usize)
            .ok_or(CheckpointError::UnknownReplica)?;
        let bytes = zz_wire::codec::encode(&ck);
        if !zz_wire::crypto::verify_signature(key, EXEC_CHECKPOINT_DOMAIN, &bytes, &sig) {
            return Err(CheckpointError::BadSignature);
        }
        if let Some(stable) = &self.stable {
            if stable.app_seq == ck.app_seq {
                self.stable_votes.entry(ck.exec).or_insert(ck.root);
            }
            if stable.app_seq >= ck.app_seq {
                return Ok(None);
            }
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
            self.stable_votes = votes.iter().map(|(i, (r, _))| (*i, *r)).collect();
            self.stable_ms = now_ms;
            self.orders = self.orders.split_off(&(ck.app_seq + 1));
            self.checkpoints = self.checkpoints.split_off(&(ck.app_seq + 1));
            // f+1 replicas reached the same state there: what happened
            // before it can neither be replayed nor needs watching; but a
            // replica that answered one of those orders wrongly stays
            // suspect for this epoch's verdict (a wrong reply leaves the
            // state, and so the checkpoint, correct).
            let kept = self.returned.split_off(&(ck.app_seq + 1));
            let dropped = std::mem::replace(&mut self.returned, kept);
            for (seq, r) in dropped {
                let mut counts: BTreeMap<Digest, usize> = BTreeMap::new();
                for d in r.digests.values() {
                    *counts.entry(*d).or_default() += 1;
                }
                if let Some((good, _)) = counts.iter().find(|(_, c)| **c > f) {
                    for (i, d) in &r.digests {
                        if d != good {
                            self.disagreed.entry(*i).or_insert(seq);
                        }
                    }
                }
            }
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

    /// A one-line account of what is being watched, for diagnostics.
    pub fn summary(&self) -> String {
        let watched: Vec<String> = self
            .returned
            .iter()
            .map(|(s, r)| format!("{s}@{}:{:?}", r.sent_ms, r.digests))
            .collect();
        format!(
            "orders={:?} stable={:?} suspected={:?} suspects={:?} ready={:?} watched=[{}]",
            self.orders.keys().collect::<Vec<_>>(),
            self.stable.as_ref().map(|c| c.app_seq),
            self.suspected_epoch,
            self.suspects
                .iter()
                .map(|(e, m)| {
                    let evidence: Vec<String> = m
                        .iter()
                        .map(|(r, s)| match &s.body.evidence {
                            Evidence::Verdict { faulty } => {
                                format!("{r}:verdict{faulty:?}@{}", s.body.app_seq)
                            }
                            _ => format!("{r}:wake@{}", s.body.app_seq),
                        })
                        .collect();
                    (*e, evidence)
                })
                .collect::<Vec<_>>(),
            self.ready_reconfigs.keys().collect::<Vec<_>>(),
            watched.join(" ")
        )
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

#[cfg(test)]
mod tests {
    use super::*;
    use zz_wire::crypto::KeyPair;
    use zz_wire::exec::sign_exec_checkpoint;

    fn checkpoint(
        m: &mut Monitor,
        keys: &[KeyPair],
        exec: ExecIndex,
        app_seq: AppSeq,
        root: Digest,
    ) -> Option<ExecCheckpointCert> {
        let ck = ExecCheckpoint {
            app: 1,
            app_seq,
            root,
            exec,
        };
        let sig = sign_exec_checkpoint(&ck, &keys[exec as usize]);
        let public: Vec<VerifyingKey> = keys.iter().map(|k| k.public()).collect();
        m.add_checkpoint(ck, sig, &public, 1, 1_000).unwrap()
    }

    fn order(app_seq: AppSeq) -> Order {
        Order {
            app: 1,
            app_seq,
            seq: app_seq,
            requests: vec![],
        }
    }

    fn verdict_by(
        key: &KeyPair,
        replica: ReplicaId,
        app_seq: AppSeq,
        faulty: Vec<ExecIndex>,
    ) -> Signed<Suspect> {
        Signed::sign(
            Suspect {
                app: 1,
                epoch: 1,
                app_seq,
                replica,
                evidence: Evidence::Verdict { faulty },
            },
            key,
        )
    }

    /// A verdict reached on the orders answered so far is signed again when
    /// later orders name another faulty set (never twice for one set); peers
    /// count each replica's latest verdict, so f+1 latest verdicts naming
    /// one set form the reconfiguration even though earlier ones differed.
    #[test]
    fn verdicts_follow_new_evidence_and_the_latest_per_replica_counts() {
        let (f, epoch, timeout) = (1, 1, 200);
        let active: BTreeSet<ExecIndex> = (0..3).collect();
        let mut m = Monitor::default();
        m.order_sent(order(1), 0);
        m.order_sent(order(2), 0);
        // Seq 1: replica 2 silent past the timeout; seq 2 not answered by 2 either.
        m.record(1, 0, Digest([1; 32]));
        m.record(1, 1, Digest([1; 32]));
        m.record(2, 0, Digest([2; 32]));
        m.record(2, 1, Digest([2; 32]));
        let first = m.evaluate(epoch, &active, true, f, 300, timeout).unwrap();
        assert_eq!(first.evidence, Evidence::Verdict { faulty: vec![2] });
        assert_eq!(first.app_seq, 2);
        assert!(
            m.evaluate(epoch, &active, true, f, 310, timeout).is_none(),
            "same evidence"
        );
        // Replica 2 was only late; replica 0's answer to seq 3 is the wrong one.
        m.record(1, 2, Digest([1; 32]));
        m.record(2, 2, Digest([2; 32]));
        m.order_sent(order(3), 320);
        m.record(3, 0, Digest([9; 32]));
        m.record(3, 1, Digest([3; 32]));
        m.record(3, 2, Digest([3; 32]));
        let second = m.evaluate(epoch, &active, true, f, 330, timeout).unwrap();
        assert_eq!(second.evidence, Evidence::Verdict { faulty: vec![0] });
        assert_eq!(second.app_seq, 3);
        assert!(m.evaluate(epoch, &active, true, f, 340, timeout).is_none());

        // Peers: replica 0's first verdict, then its second; replica 1's.
        let keys: Vec<KeyPair> = (0..4).map(|i| KeyPair::from_seed([40 + i; 32])).collect();
        let mut peer = Monitor::default();
        peer.add_suspect(verdict_by(&keys[0], 0, 2, vec![2]), epoch, f);
        peer.add_suspect(verdict_by(&keys[1], 1, 3, vec![0]), epoch, f);
        assert!(
            peer.ready_reconfigs.is_empty(),
            "no set has f+1 signers yet"
        );
        peer.add_suspect(verdict_by(&keys[0], 0, 3, vec![0]), epoch, f);
        let r = peer
            .ready_reconfigs
            .get(&epoch)
            .expect("f+1 latest verdicts agree");
        let signers: BTreeSet<ReplicaId> = r.proofs.iter().map(|p| p.body.replica).collect();
        assert_eq!(signers, BTreeSet::from([0, 1]));
        assert!(r
            .proofs
            .iter()
            .all(|p| p.body.evidence == Evidence::Verdict { faulty: vec![0] }));
        // An older verdict arriving late does not replace a newer one.
        let mut late = Monitor::default();
        late.add_suspect(verdict_by(&keys[2], 2, 3, vec![0]), epoch, f);
        late.add_suspect(verdict_by(&keys[2], 2, 2, vec![2]), epoch, f);
        late.add_suspect(verdict_by(&keys[3], 3, 3, vec![0]), epoch, f);
        assert!(late.ready_reconfigs.contains_key(&epoch));
    }

    fn resent_to(out: &Resends, i: ExecIndex) -> Vec<AppSeq> {
        out.orders
            .iter()
            .filter(|(e, _)| *e == i)
            .map(|(_, o)| o.app_seq)
            .collect()
    }

    /// A replica that answers nothing gets the lowest window of what it has
    /// not answered, then waits twice as long each time; one that makes
    /// progress gets nothing; progress resets the wait.
    #[test]
    fn resends_are_windowed_backed_off_and_skip_progressing_replicas() {
        let mut m = Monitor::default();
        let active: BTreeSet<ExecIndex> = (0..2).collect();
        let total = RESEND_WINDOW as u64 * 3;
        for s in 1..=total {
            m.order_sent(order(s), 0);
        }
        // Replica 1 answers everything, replica 0 nothing.
        for s in 1..=total {
            m.record(s, 1, Digest([1; 32]));
        }
        let min = 200; // timeout 200 ms, half 100
        let none = |r: Resends| r.orders.is_empty() && r.stable_to.is_empty();
        assert!(none(m.retransmissions(&active, 50, min)), "first look");
        let out = m.retransmissions(&active, 150, min);
        assert_eq!(
            resent_to(&out, 0),
            (1..=RESEND_WINDOW as u64).collect::<Vec<_>>()
        );
        assert!(resent_to(&out, 1).is_empty(), "replica 1 answered all");
        // Backoff: the next re-sends to a silent replica wait 200 (the cap).
        assert!(none(m.retransmissions(&active, 300, min)));
        assert_eq!(
            resent_to(&m.retransmissions(&active, 350, min), 0).len(),
            RESEND_WINDOW
        );
        assert!(none(m.retransmissions(&active, 500, min)));
        assert_eq!(
            resent_to(&m.retransmissions(&active, 550, min), 0).len(),
            RESEND_WINDOW
        );
        // Replica 0 progresses: nothing for it at its next look, and the
        // wait starts again from half the timeout.
        for s in 1..=10 {
            m.record(s, 0, Digest([1; 32]));
        }
        assert!(none(m.retransmissions(&active, 2_000, min)));
        let out = m.retransmissions(&active, 2_100, min);
        assert_eq!(
            resent_to(&out, 0).first(),
            Some(&11),
            "lowest unanswered first"
        );
        assert_eq!(resent_to(&out, 0).len(), RESEND_WINDOW);
    }

    /// A wrong reply leaves the state correct: the faulty replica's checkpoint
    /// matches, the checkpoint becomes stable, and the orders before it are
    /// dropped. The verdict must still name the replica that answered wrongly.
    #[test]
    fn a_wrong_digest_before_a_stable_checkpoint_still_convicts() {
        let keys: Vec<KeyPair> = (0..3).map(|_| KeyPair::generate()).collect();
        let mut m = Monitor::default();
        let active: BTreeSet<ExecIndex> = (0..3).collect();
        m.rewatch_all(0);
        m.order_sent(
            Order {
                app: 1,
                app_seq: 7,
                seq: 7,
                requests: vec![],
            },
            0,
        );
        let (good, bad) = (Digest([1; 32]), Digest([2; 32]));
        m.record(7, 0, bad);
        m.record(7, 1, good);
        m.record(7, 2, good);
        let root = Digest([9; 32]);
        assert!(checkpoint(&mut m, &keys, 1, 8, root).is_none());
        assert!(
            checkpoint(&mut m, &keys, 2, 8, root).is_some(),
            "stable at 8"
        );
        // Replica 0's state is right: its checkpoint vote matches.
        assert!(checkpoint(&mut m, &keys, 0, 8, root).is_none());
        let c = m
            .evaluate(1, &active, true, 1, 5_000, 200)
            .expect("a verdict");
        assert_eq!(c.evidence, Evidence::Verdict { faulty: vec![0] });
        // Once a verdict took effect, that evidence is spent.
        m.verdict_applied();
        m.rewatch_all(6_000);
        assert!(m.disagreed.is_empty());
    }
}
