//! Simulated execution replicas and host agent, for checking the agreement
//! side of the ZZ protocol (orders, the execution monitor, suspects, ordered
//! reconfiguration, host commands) deterministically.
//!
//! A simulated execution replica runs the same deterministic counter service
//! as the reference checker. Its "state fetch" copies a peer's checkpoint
//! snapshot and accepts it only if it hashes to the certified root: the
//! Merkle-verified page fetch itself is tested in `statefetch/`.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use zz_agreement::app::{new_app, Service};
use zz_wire::crypto::{KeyPair, MacKey};
use zz_wire::exec::{
    results_digest, sign_exec_checkpoint, AppSeq, ExecCheckpoint, ExecCheckpointCert, ExecId,
    ExecIndex, ExecMessage, Executed, HostAction, HostCommand, Order,
};
use zz_wire::message::{Reply, Signed};
use zz_wire::{ClientId, Digest, ReplicaId};

/// Faults an execution replica can have.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExecFault {
    None,
    /// Returns wrong results (and so a wrong digest).
    WrongReplies,
    /// Stops answering at all.
    Crashed,
}

pub const EXEC_CHECKPOINT_INTERVAL: AppSeq = 4;

pub struct SimExecutor {
    pub id: ExecId,
    key: KeyPair,
    f: usize,
    pub awake: bool,
    pub fault: ExecFault,
    pub agreement_mac: Vec<MacKey>,
    client_mac: HashMap<ClientId, MacKey>,
    service: Service,
    pub executed: AppSeq,
    votes: BTreeMap<AppSeq, BTreeMap<ReplicaId, Order>>,
    pub snapshots: BTreeMap<AppSeq, Vec<u8>>,
    /// Results since the stable checkpoint, re-sent when an order is repeated.
    results: BTreeMap<AppSeq, (Digest, Executed)>,
    /// A certified checkpoint this replica must fetch before it can go on.
    pub wants_state: Option<ExecCheckpointCert>,
    pub reimaged: u32,
}

fn counter_service() -> Service {
    Service::new(vec![(0, new_app("counter").expect("built-in"))])
}

/// The root the simulated executor certifies: a hash of its snapshot.
pub fn sim_root(snapshot: &[u8]) -> Digest {
    Digest::of_parts("zz sim exec root", &[snapshot])
}

impl SimExecutor {
    pub fn new(
        id: ExecId,
        key: KeyPair,
        f: usize,
        agreement_mac: Vec<MacKey>,
        client_mac: HashMap<ClientId, MacKey>,
        awake: bool,
    ) -> Self {
        let mut snapshots = BTreeMap::new();
        snapshots.insert(0, counter_service().snapshot());
        SimExecutor {
            id,
            key,
            f,
            awake,
            fault: ExecFault::None,
            agreement_mac,
            client_mac,
            service: counter_service(),
            executed: 0,
            votes: BTreeMap::new(),
            snapshots,
            results: BTreeMap::new(),
            wants_state: None,
            reimaged: 0,
        }
    }

    /// Destroyed and rebuilt from a clean image: empty state, dormant, correct.
    pub fn reimage(&mut self) {
        self.service = counter_service();
        self.executed = 0;
        self.votes.clear();
        self.snapshots = BTreeMap::from([(0, counter_service().snapshot())]);
        self.wants_state = None;
        self.results.clear();
        self.awake = false;
        self.fault = ExecFault::None;
        self.reimaged += 1;
    }

    /// Handles a message from agreement replica `from`; returns messages for
    /// agreement replicas (to all of them).
    pub fn on_message(
        &mut self,
        from: ReplicaId,
        msg: ExecMessage,
        exec_keys: &[ed25519_dalek::VerifyingKey],
    ) -> Vec<ExecMessage> {
        if !self.awake || self.fault == ExecFault::Crashed {
            return vec![];
        }
        match msg {
            ExecMessage::Order(o) => {
                if o.app != self.id.app || o.app_seq > self.executed + 256 {
                    return vec![];
                }
                if o.app_seq <= self.executed {
                    // A repeated order: answer again from the result cache,
                    // less the replies a later reply to the same client
                    // superseded (as `ExecutionCore` does).
                    return match self.results.get(&o.app_seq) {
                        Some((d, e)) if *d == o.digest() => {
                            let later: BTreeSet<ClientId> = self
                                .results
                                .range(o.app_seq + 1..)
                                .flat_map(|(_, (_, x))| x.replies.iter().map(|r| r.client))
                                .collect();
                            let mut e = e.clone();
                            e.replies.retain(|r| !later.contains(&r.client));
                            vec![ExecMessage::Executed(e)]
                        }
                        _ => vec![],
                    };
                }
                self.votes
                    .entry(o.app_seq)
                    .or_default()
                    .entry(from)
                    .or_insert(o);
                self.try_execute()
            }
            ExecMessage::Stable(cert) => {
                if cert.app != self.id.app || !cert.verify(self.f, exec_keys) {
                    return vec![];
                }
                if cert.app_seq > self.executed {
                    self.wants_state = Some(cert.clone());
                }
                self.results = self.results.split_off(&(cert.app_seq + 1));
                // Keep the stable checkpoint's state (peers may fetch it) and later ones.
                self.snapshots.retain(|s, _| *s >= cert.app_seq);
                vec![]
            }
            _ => vec![],
        }
    }

    /// Installs a peer's snapshot if it matches the certificate we want.
    pub fn offer_state(&mut self, app_seq: AppSeq, snapshot: &[u8]) -> Vec<ExecMessage> {
        let Some(cert) = &self.wants_state else {
            return vec![];
        };
        if cert.app_seq != app_seq || sim_root(snapshot) != cert.root {
            return vec![];
        }
        if self.service.restore(snapshot).is_err() {
            return vec![];
        }
        self.executed = app_seq;
        self.snapshots.insert(app_seq, snapshot.to_vec());
        self.wants_state = None;
        self.votes = self.votes.split_off(&(app_seq + 1));
        // As the executor does: a replica that jumps to a stable checkpoint
        // votes for its root.
        let ck = ExecCheckpoint {
            app: self.id.app,
            app_seq,
            root: sim_root(snapshot),
            exec: self.id.index,
        };
        let mut out = vec![ExecMessage::Checkpoint(
            ck,
            sign_exec_checkpoint(&ck, &self.key),
        )];
        out.extend(self.try_execute());
        out
    }

    fn try_execute(&mut self) -> Vec<ExecMessage> {
        let mut out = Vec::new();
        loop {
            if self.wants_state.is_some() {
                return out;
            }
            let next = self.executed + 1;
            let Some(votes) = self.votes.get(&next) else {
                return out;
            };
            let mut by_digest: BTreeMap<Digest, (usize, &Order)> = BTreeMap::new();
            for o in votes.values() {
                by_digest.entry(o.digest()).or_insert((0, o)).0 += 1;
            }
            let Some((_, (_, order))) = by_digest.iter().find(|(_, (c, _))| *c > self.f) else {
                return out;
            };
            let order = (*order).clone();
            self.votes.remove(&next);
            let mut results = Vec::new();
            for r in &order.requests {
                let Some(mut res) = self.service.execute(r.client, r.req_id, r.app, &r.op) else {
                    continue;
                };
                if self.fault == ExecFault::WrongReplies {
                    res.push(0xBA);
                }
                results.push((r.client, r.req_id, res));
            }
            let digest = results_digest(
                &results
                    .iter()
                    .map(|(c, i, r)| (*c, *i, r.as_slice()))
                    .collect::<Vec<_>>(),
            );
            let replies = results
                .into_iter()
                .filter_map(|(c, id, res)| {
                    let key = self.client_mac.get(&c)?;
                    Some(Reply::new(0, self.id.index, c, id, res, key))
                })
                .collect();
            self.executed = next;
            let executed = Executed {
                app: self.id.app,
                app_seq: next,
                exec: self.id.index,
                digest,
                replies,
            };
            self.results
                .insert(next, (order.digest(), executed.clone()));
            out.push(ExecMessage::Executed(executed));
            if next.is_multiple_of(EXEC_CHECKPOINT_INTERVAL) {
                let snap = self.service.snapshot();
                let ck = ExecCheckpoint {
                    app: self.id.app,
                    app_seq: next,
                    root: sim_root(&snap),
                    exec: self.id.index,
                };
                self.snapshots.insert(next, snap);
                out.push(ExecMessage::Checkpoint(
                    ck,
                    sign_exec_checkpoint(&ck, &self.key),
                ));
            }
        }
    }
}

/// The host agent's rule: act on f+1 matching signed commands from distinct
/// agreement replicas, once per (app, epoch, exec, action).
#[derive(Default)]
pub struct SimHost {
    votes: BTreeMap<(u32, u64, ExecIndex, HostActionKey), BTreeSet<ReplicaId>>,
    fired: BTreeSet<(u32, u64, ExecIndex, HostActionKey)>,
    pub log: Vec<(ExecIndex, HostAction)>,
}

type HostActionKey = u8;

fn action_key(a: HostAction) -> HostActionKey {
    match a {
        HostAction::Wake => 0,
        HostAction::Sleep => 1,
        HostAction::Reimage => 2,
    }
}

impl SimHost {
    pub fn on_command(
        &mut self,
        cmd: &Signed<HostCommand>,
        f: usize,
        replica_keys: &[ed25519_dalek::VerifyingKey],
    ) -> Option<(ExecId, HostAction)> {
        if !cmd.verify(replica_keys) {
            return None;
        }
        let b = cmd.body;
        let k = (b.app, b.epoch, b.exec, action_key(b.action));
        if self.fired.contains(&k) {
            return None;
        }
        let v = self.votes.entry(k).or_default();
        v.insert(b.replica);
        if v.len() > f {
            self.fired.insert(k);
            self.log.push((b.exec, b.action));
            return Some((
                ExecId {
                    app: b.app,
                    index: b.exec,
                },
                b.action,
            ));
        }
        None
    }
}
