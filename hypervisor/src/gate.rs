//! The host agent's command gate (DESIGN §3), sans-IO.
//!
//! Agreement replicas executing an ordered reconfiguration each sign
//! [`HostCommand`]s. Up to f of them may be Byzantine, so a host agent must
//! never act on fewer than f+1 of them: the gate lets an action through only
//! when f+1 *distinct* agreement replicas sent the same
//! `(app, epoch, exec, action)`, each validly signed with that replica's key.
//!
//! Rules:
//! - a command whose signer is not an agreement replica, whose signature is
//!   wrong, or that names an executor this host does not hold is
//!   [`Rejected`] (a driver counts these; they are faults or misconfigurations);
//! - a second vote from one signer for the same command counts once;
//! - each `(app, epoch, exec, action)` fires at most once;
//! - once an action fired for a replica at epoch `e`, every command for that
//!   replica at an epoch below `e` is stale and ignored (and pending votes for
//!   such epochs are dropped): a delayed `Wake` of an old epoch cannot undo a
//!   newer `Sleep`.
//!
//! Memory is bounded by `n × hosted executors × MAX_PENDING_PER_SIGNER`
//! pending votes plus, per executor, the epoch last acted on and the actions
//! fired at it. A signer's pending votes for one executor are capped: when
//! full, its lowest-epoch vote is evicted (correct replicas only move to
//! higher epochs), so a Byzantine signer flooding future epochs can only
//! evict its own votes, never anyone else's.
//!
//! Cheap checks (signer, executor, staleness) run before the signature check,
//! so a flood of junk costs no ed25519 verification; nothing is recorded
//! before the signature is verified.

use std::collections::{BTreeMap, BTreeSet};

use ed25519_dalek::VerifyingKey;
use zz_wire::exec::{Epoch, ExecId, HostAction, HostCommand};
use zz_wire::message::Signed;
use zz_wire::ReplicaId;

/// Pending (not yet fired) votes kept per signer and executor.
pub const MAX_PENDING_PER_SIGNER: usize = 8;

/// An action the host agent must now carry out (see [`crate::lifecycle::carry_out`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Fire {
    pub exec: ExecId,
    pub epoch: Epoch,
    pub action: HostAction,
    /// The f+1 (or more) distinct replicas whose signed commands authorized it.
    pub signers: usize,
}

/// What the gate made of an authentic command.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// This vote completed f+1: carry the action out now. Reported once.
    Fire(Fire),
    /// Counted; `votes` distinct replicas so far, `needed` = f+1.
    Counted { votes: usize, needed: usize },
    /// Not counted, and no fault either (duplicates and late arrivals are
    /// normal on an asynchronous network).
    Ignored(Ignored),
}

/// Why an authentic command was not counted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ignored {
    /// This signer's vote for this command was already counted.
    DuplicateSigner,
    /// This exact command already fired.
    AlreadyFired,
    /// The host already acted on this replica at a newer epoch.
    StaleEpoch { acted: Epoch },
    /// The signer's pending votes for this replica are full of newer epochs.
    SignerBacklogFull,
}

/// Why a command was refused before counting; drivers count these.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Rejected {
    #[error("command signed as replica {0}, which is not an agreement replica of this cluster")]
    UnknownReplica(ReplicaId),
    #[error("command claims to be from replica {0} but its signature does not verify")]
    BadSignature(ReplicaId),
    #[error("command for executor {0}, which this host does not hold")]
    UnknownExecutor(ExecId),
}

/// Why a gate could not be built.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum GateConfigError {
    #[error(
        "{n} agreement replica keys for f={f}: tolerating f faults needs at least 3f+1 = {} \
         replicas; fix the cluster config",
        3 * f + 1
    )]
    TooFewReplicas { n: usize, f: usize },
}

/// A command without its signer: what f+1 replicas must agree on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Key {
    epoch: Epoch,
    action: u8,
}

fn action_code(a: HostAction) -> u8 {
    match a {
        HostAction::Wake => 0,
        HostAction::Sleep => 1,
        HostAction::Reimage => 2,
    }
}

/// What the gate remembers about one hosted executor.
#[derive(Debug, Default)]
struct ExecVotes {
    /// Highest epoch at which something fired, and the actions fired at it.
    acted: Option<(Epoch, BTreeSet<u8>)>,
    /// Pending votes: command -> distinct signers.
    votes: BTreeMap<Key, BTreeSet<ReplicaId>>,
    /// Per signer, its pending votes (to cap them).
    by_signer: BTreeMap<ReplicaId, BTreeSet<Key>>,
}

impl ExecVotes {
    fn remove_vote(&mut self, signer: ReplicaId, key: Key) {
        if let Some(set) = self.votes.get_mut(&key) {
            set.remove(&signer);
            if set.is_empty() {
                self.votes.remove(&key);
            }
        }
        if let Some(keys) = self.by_signer.get_mut(&signer) {
            keys.remove(&key);
            if keys.is_empty() {
                self.by_signer.remove(&signer);
            }
        }
    }

    /// Drops every pending vote for an epoch below `epoch`, and the fired command's.
    fn prune(&mut self, epoch: Epoch, fired: Key) {
        let stale: Vec<(Key, ReplicaId)> = self
            .votes
            .iter()
            .filter(|(k, _)| k.epoch < epoch || **k == fired)
            .flat_map(|(k, signers)| signers.iter().map(move |s| (*k, *s)))
            .collect();
        for (k, s) in stale {
            self.remove_vote(s, k);
        }
    }

    fn pending(&self) -> usize {
        self.votes.values().map(BTreeSet::len).sum()
    }
}

/// The host agent's f+1 rule for host commands.
#[derive(Debug)]
pub struct CommandGate {
    f: usize,
    replica_keys: Vec<VerifyingKey>,
    execs: BTreeMap<ExecId, ExecVotes>,
}

impl CommandGate {
    /// A gate for a cluster tolerating `f` faulty agreement replicas;
    /// `replica_keys[i]` is agreement replica i's key; `hosted` are the
    /// executors this host holds.
    pub fn new(
        f: usize,
        replica_keys: Vec<VerifyingKey>,
        hosted: impl IntoIterator<Item = ExecId>,
    ) -> Result<Self, GateConfigError> {
        if replica_keys.len() < 3 * f + 1 {
            return Err(GateConfigError::TooFewReplicas {
                n: replica_keys.len(),
                f,
            });
        }
        Ok(CommandGate {
            f,
            replica_keys,
            execs: hosted
                .into_iter()
                .map(|e| (e, ExecVotes::default()))
                .collect(),
        })
    }

    /// f+1: the number of distinct signers an action needs.
    pub fn quorum(&self) -> usize {
        self.f + 1
    }

    /// Starts accepting commands for `exec` (a replica newly placed on this host).
    pub fn add_executor(&mut self, exec: ExecId) {
        self.execs.entry(exec).or_default();
    }

    /// Forgets `exec` and everything pending for it.
    pub fn remove_executor(&mut self, exec: ExecId) {
        self.execs.remove(&exec);
    }

    /// The executors this gate accepts commands for.
    pub fn executors(&self) -> impl Iterator<Item = ExecId> + '_ {
        self.execs.keys().copied()
    }

    /// The newest epoch at which an action fired for `exec`.
    pub fn acted_epoch(&self, exec: ExecId) -> Option<Epoch> {
        self.execs.get(&exec)?.acted.as_ref().map(|(e, _)| *e)
    }

    /// Pending (counted, not yet fired) votes across all executors.
    pub fn pending_votes(&self) -> usize {
        self.execs.values().map(ExecVotes::pending).sum()
    }

    /// Takes one signed command; returns whether to act now.
    pub fn on_command(&mut self, cmd: &Signed<HostCommand>) -> Result<Verdict, Rejected> {
        let body = &cmd.body;
        let signer = body.replica;
        if signer as usize >= self.replica_keys.len() {
            return Err(Rejected::UnknownReplica(signer));
        }
        let exec = ExecId {
            app: body.app,
            index: body.exec,
        };
        let Some(ev) = self.execs.get(&exec) else {
            return Err(Rejected::UnknownExecutor(exec));
        };
        let key = Key {
            epoch: body.epoch,
            action: action_code(body.action),
        };
        if let Some((acted, fired)) = &ev.acted {
            if body.epoch < *acted {
                return Ok(Verdict::Ignored(Ignored::StaleEpoch { acted: *acted }));
            }
            if body.epoch == *acted && fired.contains(&key.action) {
                return Ok(Verdict::Ignored(Ignored::AlreadyFired));
            }
        }
        if ev.votes.get(&key).is_some_and(|s| s.contains(&signer)) {
            return Ok(Verdict::Ignored(Ignored::DuplicateSigner));
        }
        if !cmd.verify(&self.replica_keys) {
            return Err(Rejected::BadSignature(signer));
        }

        let needed = self.quorum();
        let ev = self.execs.get_mut(&exec).expect("checked above");
        let mine = ev.by_signer.entry(signer).or_default();
        if mine.len() >= MAX_PENDING_PER_SIGNER {
            let lowest = *mine.first().expect("non-empty");
            if key <= lowest {
                return Ok(Verdict::Ignored(Ignored::SignerBacklogFull));
            }
            ev.remove_vote(signer, lowest);
        }
        ev.by_signer.entry(signer).or_default().insert(key);
        let signers = ev.votes.entry(key).or_default();
        signers.insert(signer);
        let votes = signers.len();
        if votes < needed {
            return Ok(Verdict::Counted { votes, needed });
        }

        match &mut ev.acted {
            Some((e, fired)) if *e == body.epoch => {
                fired.insert(key.action);
            }
            acted => *acted = Some((body.epoch, BTreeSet::from([key.action]))),
        }
        ev.prune(body.epoch, key);
        let fire = Fire {
            exec,
            epoch: body.epoch,
            action: body.action,
            signers: votes,
        };
        tracing::info!(%exec, epoch = body.epoch, action = ?body.action, "host command authorized by f+1 replicas");
        Ok(Verdict::Fire(fire))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use zz_wire::crypto::KeyPair;

    struct Cluster {
        f: usize,
        keys: Vec<KeyPair>,
    }

    impl Cluster {
        fn new(f: usize) -> Self {
            let keys = (0..3 * f + 1)
                .map(|i| KeyPair::from_seed([i as u8 + 1; 32]))
                .collect();
            Cluster { f, keys }
        }

        fn gate(&self) -> CommandGate {
            CommandGate::new(
                self.f,
                self.keys.iter().map(KeyPair::public).collect(),
                [exec(0), exec(1), exec(2)],
            )
            .unwrap()
        }

        fn cmd(
            &self,
            from: ReplicaId,
            epoch: Epoch,
            e: u32,
            action: HostAction,
        ) -> Signed<HostCommand> {
            self.signed_by(from as usize, from, epoch, e, action)
        }

        /// Signed with `key`'s key but claiming to be from `claims`.
        fn signed_by(
            &self,
            key: usize,
            claims: ReplicaId,
            epoch: Epoch,
            e: u32,
            action: HostAction,
        ) -> Signed<HostCommand> {
            Signed::sign(
                HostCommand {
                    app: 1,
                    epoch,
                    exec: e,
                    action,
                    replica: claims,
                },
                &self.keys[key],
            )
        }
    }

    fn exec(i: u32) -> ExecId {
        ExecId { app: 1, index: i }
    }

    fn fires(v: Result<Verdict, Rejected>) -> bool {
        matches!(v, Ok(Verdict::Fire(_)))
    }

    #[test]
    fn one_byzantine_replica_alone_changes_nothing() {
        for f in [1, 2] {
            let c = Cluster::new(f);
            let mut g = c.gate();
            for action in [HostAction::Wake, HostAction::Reimage, HostAction::Sleep] {
                for epoch in 0..20 {
                    for _ in 0..3 {
                        let v = g.on_command(&c.cmd(3, epoch, 0, action));
                        assert!(!fires(v), "f={f}: {v:?}");
                    }
                }
            }
            // Impersonating the others with its own key is caught.
            for claims in 0..3 {
                assert_eq!(
                    g.on_command(&c.signed_by(3, claims, 5, 0, HostAction::Wake)),
                    Err(Rejected::BadSignature(claims))
                );
            }
            assert_eq!(g.acted_epoch(exec(0)), None);
        }
    }

    #[test]
    fn f_forged_plus_one_real_do_not_fire_but_f_plus_one_real_fire_once() {
        for f in [1, 2] {
            let c = Cluster::new(f);
            let mut g = c.gate();
            let n = 3 * f + 1;
            // Replica n-1 is Byzantine and forges commands for replicas 0..f.
            for claims in 0..f as u32 {
                assert_eq!(
                    g.on_command(&c.signed_by(n - 1, claims, 1, 0, HostAction::Reimage)),
                    Err(Rejected::BadSignature(claims))
                );
            }
            assert_eq!(
                g.on_command(&c.cmd(f as u32, 1, 0, HostAction::Reimage)),
                Ok(Verdict::Counted {
                    votes: 1,
                    needed: f + 1
                })
            );
            // The real ones arrive: firing exactly at the (f+1)th distinct replica.
            let mut fired = 0;
            for r in 0..n as u32 {
                if r == f as u32 {
                    continue;
                }
                let v = g.on_command(&c.cmd(r, 1, 0, HostAction::Reimage)).unwrap();
                match v {
                    Verdict::Fire(fire) => {
                        fired += 1;
                        assert_eq!(fire.signers, f + 1);
                        assert_eq!(fire.exec, exec(0));
                        assert_eq!(r, f as u32 - 1, "fires at the (f+1)th distinct signer");
                    }
                    Verdict::Counted { .. } => assert_eq!(fired, 0),
                    Verdict::Ignored(i) => assert_eq!(i, Ignored::AlreadyFired),
                }
            }
            assert_eq!(fired, 1, "f={f}");
            // Re-sending everything never fires again.
            for r in 0..n as u32 {
                assert_eq!(
                    g.on_command(&c.cmd(r, 1, 0, HostAction::Reimage)),
                    Ok(Verdict::Ignored(Ignored::AlreadyFired))
                );
            }
            assert_eq!(g.pending_votes(), 0);
        }
    }

    #[test]
    fn duplicate_signers_count_once() {
        let c = Cluster::new(2);
        let mut g = c.gate();
        assert!(matches!(
            g.on_command(&c.cmd(0, 1, 0, HostAction::Wake)),
            Ok(Verdict::Counted { votes: 1, .. })
        ));
        for _ in 0..5 {
            assert_eq!(
                g.on_command(&c.cmd(0, 1, 0, HostAction::Wake)),
                Ok(Verdict::Ignored(Ignored::DuplicateSigner))
            );
        }
        assert!(matches!(
            g.on_command(&c.cmd(1, 1, 0, HostAction::Wake)),
            Ok(Verdict::Counted { votes: 2, .. })
        ));
        assert!(fires(g.on_command(&c.cmd(2, 1, 0, HostAction::Wake))));
    }

    #[test]
    fn votes_must_match_in_every_field() {
        let c = Cluster::new(1);
        let mut g = c.gate();
        // Two replicas, but for different epochs, actions or executors: no quorum.
        assert!(!fires(g.on_command(&c.cmd(0, 1, 0, HostAction::Wake))));
        assert!(!fires(g.on_command(&c.cmd(1, 2, 0, HostAction::Wake))));
        assert!(!fires(g.on_command(&c.cmd(1, 1, 0, HostAction::Sleep))));
        assert!(!fires(g.on_command(&c.cmd(1, 1, 1, HostAction::Wake))));
        assert!(fires(g.on_command(&c.cmd(1, 1, 0, HostAction::Wake))));
    }

    #[test]
    fn older_epochs_are_ignored_once_a_newer_one_acted() {
        let c = Cluster::new(1);
        let mut g = c.gate();
        // A vote for epoch 3 is pending when epoch 5 fires: it is dropped.
        g.on_command(&c.cmd(0, 3, 0, HostAction::Wake)).unwrap();
        g.on_command(&c.cmd(0, 5, 0, HostAction::Sleep)).unwrap();
        assert!(fires(g.on_command(&c.cmd(1, 5, 0, HostAction::Sleep))));
        assert_eq!(g.acted_epoch(exec(0)), Some(5));
        assert_eq!(g.pending_votes(), 0);
        for r in 0..4 {
            assert_eq!(
                g.on_command(&c.cmd(r, 3, 0, HostAction::Wake)),
                Ok(Verdict::Ignored(Ignored::StaleEpoch { acted: 5 }))
            );
        }
        // Another action in the same epoch still can fire, once.
        g.on_command(&c.cmd(2, 5, 0, HostAction::Wake)).unwrap();
        assert!(fires(g.on_command(&c.cmd(3, 5, 0, HostAction::Wake))));
        assert_eq!(
            g.on_command(&c.cmd(0, 5, 0, HostAction::Wake)),
            Ok(Verdict::Ignored(Ignored::AlreadyFired))
        );
        // Epochs are per executor: executor 1 is unaffected.
        g.on_command(&c.cmd(0, 3, 1, HostAction::Wake)).unwrap();
        assert!(fires(g.on_command(&c.cmd(1, 3, 1, HostAction::Wake))));
    }

    #[test]
    fn typed_rejections() {
        let c = Cluster::new(1);
        let mut g = c.gate();
        assert_eq!(
            g.on_command(&c.signed_by(0, 4, 1, 0, HostAction::Wake)),
            Err(Rejected::UnknownReplica(4))
        );
        assert_eq!(
            g.on_command(&c.cmd(0, 1, 7, HostAction::Wake)),
            Err(Rejected::UnknownExecutor(exec(7)))
        );
        let mut tampered = c.cmd(0, 1, 0, HostAction::Wake);
        tampered.body.action = HostAction::Reimage;
        assert_eq!(g.on_command(&tampered), Err(Rejected::BadSignature(0)));
        assert_eq!(g.pending_votes(), 0);
        g.remove_executor(exec(0));
        assert_eq!(
            g.on_command(&c.cmd(0, 1, 0, HostAction::Wake)),
            Err(Rejected::UnknownExecutor(exec(0)))
        );
        g.add_executor(exec(7));
        assert!(g.on_command(&c.cmd(0, 1, 7, HostAction::Wake)).is_ok());
        assert!(
            CommandGate::new(1, c.keys[..3].iter().map(KeyPair::public).collect(), []).is_err()
        );
    }

    #[test]
    fn a_flooding_signer_cannot_grow_memory_or_evict_others() {
        let c = Cluster::new(1);
        let mut g = c.gate();
        // Replica 0 votes for epoch 10; Byzantine replica 3 floods future epochs.
        g.on_command(&c.cmd(0, 10, 0, HostAction::Wake)).unwrap();
        for epoch in 100..10_000 {
            let _ = g.on_command(&c.cmd(3, epoch, 0, HostAction::Reimage));
        }
        assert!(g.pending_votes() <= 1 + MAX_PENDING_PER_SIGNER);
        // Replica 0's vote survived: one more real vote fires.
        assert!(fires(g.on_command(&c.cmd(1, 10, 0, HostAction::Wake))));
        // A full backlog refuses only older votes from that same signer.
        assert_eq!(
            g.on_command(&c.cmd(3, 50, 0, HostAction::Wake)),
            Ok(Verdict::Ignored(Ignored::SignerBacklogFull))
        );
    }
}
