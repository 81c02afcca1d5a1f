//! Byzantine replicas for the simulator.
//!
//! A Byzantine replica runs a correct core (so it looks plausible) and rewrites
//! what it sends. It holds only its own keys: it can sign and MAC as itself,
//! never as anyone else, which is exactly the power the threat model grants.

use rand::Rng;
use rand_chacha::ChaCha8Rng;

use zz_agreement::{Replica, Target};
use zz_wire::config::ReplicaKeys;
use zz_wire::message::{
    Batch, CheckpointCert, PeerEnvelope, PeerMessage, PrePrepare, Prepare, Reply, Signed,
    ViewChange,
};
use zz_wire::{Digest, ReplicaId};

/// The faults a run injects.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Behaviour {
    /// All replicas correct; only the network misbehaves.
    None,
    /// A correct replica crashes and restarts from its durable state.
    CrashRestart,
    /// The primary (and, with f=2, the next one) sends different batches to
    /// different backups for one sequence number.
    EquivocatingPrimary,
    /// The primary (and, with f=2, the next one) goes silent.
    SilentPrimary,
    /// f replicas send forged, replayed, corrupted and conflicting messages
    /// and wrong replies.
    Forger,
    /// f replicas (including the next primary) lie in view changes and new views.
    ViewChangeLiar,
}

impl Behaviour {
    pub const ALL: [Behaviour; 6] = [
        Behaviour::None,
        Behaviour::CrashRestart,
        Behaviour::EquivocatingPrimary,
        Behaviour::SilentPrimary,
        Behaviour::Forger,
        Behaviour::ViewChangeLiar,
    ];

    pub fn byzantine_replicas(&self, f: usize, n: usize) -> Vec<ReplicaId> {
        match self {
            Behaviour::None | Behaviour::CrashRestart => vec![],
            Behaviour::EquivocatingPrimary | Behaviour::SilentPrimary => {
                (0..f as ReplicaId).collect()
            }
            Behaviour::Forger => ((n - f) as ReplicaId..n as ReplicaId).collect(),
            Behaviour::ViewChangeLiar => (1..=f as ReplicaId).collect(),
        }
    }
}

pub struct Byzantine {
    behaviour: Behaviour,
    keys: ReplicaKeys,
    n: usize,
    sent: Vec<PeerEnvelope>,
    last_spontaneous_ms: u64,
}

const SILENT_FROM_MS: u64 = 300;

impl Byzantine {
    pub fn new(behaviour: Behaviour, keys: ReplicaKeys, n: usize) -> Self {
        Byzantine {
            behaviour,
            keys,
            n,
            sent: Vec::new(),
            last_spontaneous_ms: 0,
        }
    }

    fn me(&self) -> ReplicaId {
        self.keys.me
    }

    fn seal(&self, to: ReplicaId, msg: &PeerMessage) -> PeerEnvelope {
        PeerEnvelope::seal(self.me(), to, msg, &self.keys.peer_mac[to as usize])
    }

    pub fn silent(&self, now: u64) -> bool {
        self.behaviour == Behaviour::SilentPrimary && now >= SILENT_FROM_MS
    }

    fn expand(&self, t: Target) -> Vec<ReplicaId> {
        match t {
            Target::All => (0..self.n as ReplicaId)
                .filter(|r| *r != self.me())
                .collect(),
            Target::Replica(r) => vec![r],
        }
    }

    /// Rewrites a batch of outgoing messages and replies.
    pub fn mutate(
        &mut self,
        rng: &mut ChaCha8Rng,
        out: Vec<(Target, PeerMessage)>,
        mut replies: Vec<Reply>,
    ) -> (Vec<PeerEnvelope>, Vec<Reply>) {
        let mut envs = Vec::new();
        for (t, msg) in out {
            for to in self.expand(t) {
                let m = match self.behaviour {
                    Behaviour::EquivocatingPrimary => self.equivocate(rng, &msg),
                    Behaviour::ViewChangeLiar => self.lie(rng, &msg),
                    _ => msg.clone(),
                };
                let env = self.seal(to, &m);
                if self.behaviour == Behaviour::Forger {
                    self.forge(rng, &env, &m, &mut envs);
                }
                envs.push(env);
            }
        }
        if self.behaviour == Behaviour::Forger {
            for r in replies.iter_mut() {
                if rng.gen_bool(0.5) {
                    let mut wrong = r.result.clone();
                    wrong.push(0xEE);
                    let key = self.keys.client_mac[&r.client];
                    *r = Reply::new(r.view, r.replica, r.client, r.req_id, wrong, &key);
                }
            }
        }
        if self.sent.len() < 512 {
            self.sent.extend(envs.iter().take(8).cloned());
        }
        (envs, replies)
    }

    fn equivocate(&self, rng: &mut ChaCha8Rng, msg: &PeerMessage) -> PeerMessage {
        let PeerMessage::PrePrepare(pp, batch) = msg else {
            return msg.clone();
        };
        if rng.gen_bool(0.5) {
            return msg.clone();
        }
        let mut other = batch.clone();
        if other.requests.len() >= 2 {
            other.requests.reverse();
        } else {
            other.requests.clear();
        }
        let body = PrePrepare {
            digest: other.digest(),
            ..pp.body
        };
        PeerMessage::PrePrepare(Signed::sign(body, &self.keys.key), other)
    }

    fn lie(&self, rng: &mut ChaCha8Rng, msg: &PeerMessage) -> PeerMessage {
        match msg {
            PeerMessage::ViewChange(vc) => {
                let mut body = vc.body.clone();
                match rng.gen_range(0..3) {
                    0 => {
                        // Lie by omission: forget every prepared batch.
                        body.prepared.clear();
                        body.stable = CheckpointCert {
                            seq: 0,
                            state: Digest::ZERO,
                            proofs: vec![],
                        };
                    }
                    1 => {
                        // Claim a different batch was prepared (bad certificate).
                        if let Some(c) = body.prepared.first_mut() {
                            c.batch.requests.clear();
                        }
                    }
                    _ => {}
                }
                PeerMessage::ViewChange(Signed::sign(body, &self.keys.key))
            }
            PeerMessage::NewView(nv) if rng.gen_bool(0.5) => {
                // Propose null batches where batches were prepared.
                let mut body = nv.body.clone();
                for (pp, batch) in body.pre_prepares.iter_mut() {
                    *batch = Batch::default();
                    *pp = Signed::sign(
                        PrePrepare {
                            digest: batch.digest(),
                            ..pp.body
                        },
                        &self.keys.key,
                    );
                }
                PeerMessage::NewView(Signed::sign(body, &self.keys.key))
            }
            _ => msg.clone(),
        }
    }

    fn forge(
        &mut self,
        rng: &mut ChaCha8Rng,
        env: &PeerEnvelope,
        msg: &PeerMessage,
        out: &mut Vec<PeerEnvelope>,
    ) {
        let to = env.to;
        match rng.gen_range(0..10) {
            0 => {
                // Impersonate another replica: the MAC is ours, so it fails.
                let victim = (self.me() + 1 + rng.gen_range(0..self.n as u32 - 1)) % self.n as u32;
                let mut f = env.clone();
                f.from = victim;
                if victim != to {
                    out.push(f);
                }
            }
            1 => {
                // Corrupt the payload but MAC it correctly as ourselves.
                let mut payload = env.payload.clone();
                if !payload.is_empty() {
                    let i = rng.gen_range(0..payload.len());
                    payload[i] ^= 1 << rng.gen_range(0..8);
                }
                let mut mac_input = Vec::new();
                mac_input.extend_from_slice(&self.me().to_le_bytes());
                mac_input.extend_from_slice(&to.to_le_bytes());
                mac_input.extend_from_slice(&payload);
                let mac = self.keys.peer_mac[to as usize].mac(&mac_input);
                out.push(PeerEnvelope {
                    from: self.me(),
                    to,
                    payload,
                    mac,
                });
            }
            2 if !self.sent.is_empty() => {
                // Replay an old message of ours.
                let old = self.sent[rng.gen_range(0..self.sent.len())].clone();
                out.push(old);
            }
            3 => {
                // Equivocate as a backup: prepare a different digest.
                if let PeerMessage::Prepare(p) = msg {
                    let body = Prepare {
                        digest: Digest::of(&rng.gen::<[u8; 8]>()),
                        ..p.body
                    };
                    out.push(self.seal(
                        to,
                        &PeerMessage::Prepare(Signed::sign(body, &self.keys.key)),
                    ));
                }
            }
            _ => {}
        }
    }

    /// Unprompted messages: spurious view changes from a liar.
    pub fn on_tick(
        &mut self,
        rng: &mut ChaCha8Rng,
        now: u64,
        replica: &Replica,
    ) -> Vec<PeerEnvelope> {
        if self.behaviour != Behaviour::ViewChangeLiar || now < self.last_spontaneous_ms + 300 {
            return vec![];
        }
        self.last_spontaneous_ms = now;
        if !rng.gen_bool(0.5) {
            return vec![];
        }
        let vc = ViewChange {
            new_view: replica.view() + 1,
            replica: self.me(),
            stable: CheckpointCert {
                seq: 0,
                state: Digest::ZERO,
                proofs: vec![],
            },
            prepared: vec![],
        };
        let msg = PeerMessage::ViewChange(Signed::sign(vc, &self.keys.key));
        (0..self.n as ReplicaId)
            .filter(|r| *r != self.me())
            .map(|to| self.seal(to, &msg))
            .collect()
    }
}
