//! Messages between the agreement cluster, execution replicas and host agents
//! (DESIGN §2-3).
//!
//! - Agreement replicas send [`Order`]s; an execution replica executes an
//!   `app_seq` once f+1 distinct agreement replicas sent the same order.
//! - Execution replicas answer with [`Executed`] (the client replies, MAC'd end
//!   to end, and a digest the execution monitor compares) and signed
//!   [`ExecCheckpoint`]s; f+1 matching checkpoints form an [`ExecCheckpointCert`].
//! - Agreement replicas that suspect an app's active set sign [`Suspect`]s;
//!   executing an ordered reconfiguration, each signs [`HostCommand`]s, and a
//!   host agent acts only on f+1 matching commands from distinct replicas.

use crate::crypto::{Mac, MacKey};
use crate::ids::{AppId, ClientId, Digest, ReplicaId, Seq};
use crate::message::{Reply, Request, Signable, Signed};
use serde::{Deserialize, Serialize};

/// Index of an execution replica within its app, `0..2f+1`.
pub type ExecIndex = u32;

/// An app's sequence number: dense, one per ordered batch that holds requests for the app.
pub type AppSeq = u64;

/// Reconfiguration epoch of one app; it increments at every reconfiguration.
pub type Epoch = u64;

/// An execution replica of an app.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ExecId {
    pub app: AppId,
    pub index: ExecIndex,
}

impl std::fmt::Display for ExecId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "app{}/exec{}", self.app, self.index)
    }
}

/// What an agreement replica tells an execution replica to execute.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Order {
    pub app: AppId,
    pub app_seq: AppSeq,
    /// The agreement sequence number the batch committed at; deterministic
    /// input (apps needing a clock use it, never the wall clock).
    pub seq: Seq,
    pub requests: Vec<Request>,
}

impl Order {
    /// What f+1 agreement replicas must agree on.
    pub fn digest(&self) -> Digest {
        Digest::of_parts("zz order v1", &[&crate::codec::encode(self)])
    }
}

/// An execution replica's output for one `app_seq`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Executed {
    pub app: AppId,
    pub app_seq: AppSeq,
    pub exec: ExecIndex,
    /// Digest over every (client, req_id, result) of the batch, in order:
    /// what the execution monitor compares across the active set.
    pub digest: Digest,
    /// One reply per request, each MAC'd for its client; `Reply::replica` is
    /// the execution replica's index.
    pub replies: Vec<Reply>,
}

/// Digest of a batch's results, as carried in [`Executed::digest`].
pub fn results_digest(results: &[(ClientId, u64, &[u8])]) -> Digest {
    let mut h = blake3::Hasher::new_derive_key("zz results v1");
    for (c, id, r) in results {
        h.update(&c.to_le_bytes());
        h.update(&id.to_le_bytes());
        h.update(&(r.len() as u64).to_le_bytes());
        h.update(r);
    }
    Digest(*h.finalize().as_bytes())
}

/// An execution replica's signed claim about its state root after `app_seq`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecCheckpoint {
    pub app: AppId,
    pub app_seq: AppSeq,
    pub root: Digest,
    pub exec: ExecIndex,
}

/// f+1 matching execution checkpoints from distinct execution replicas:
/// proof, checkable by anyone with the executors' public keys, that the app's
/// state after `app_seq` has Merkle root `root`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecCheckpointCert {
    pub app: AppId,
    pub app_seq: AppSeq,
    pub root: Digest,
    pub proofs: Vec<(ExecIndex, crate::crypto::Signature)>,
}

pub const EXEC_CHECKPOINT_DOMAIN: &str = "zz exec checkpoint v1";

impl ExecCheckpointCert {
    /// Checks f+1 distinct valid signatures; `keys[i]` is execution replica i's key.
    pub fn verify(&self, f: usize, keys: &[ed25519_dalek::VerifyingKey]) -> bool {
        let mut seen = std::collections::BTreeSet::new();
        for (i, sig) in &self.proofs {
            let Some(k) = keys.get(*i as usize) else {
                return false;
            };
            let body = ExecCheckpoint {
                app: self.app,
                app_seq: self.app_seq,
                root: self.root,
                exec: *i,
            };
            let bytes = crate::codec::encode(&body);
            if !crate::crypto::verify_signature(k, EXEC_CHECKPOINT_DOMAIN, &bytes, sig) {
                return false;
            }
            seen.insert(*i);
        }
        seen.len() > f
    }
}

/// Why an agreement replica suspects an app's active execution replicas.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Evidence {
    /// Active replicas returned different digests for one `app_seq`.
    Mismatch { digests: Vec<(ExecIndex, Digest)> },
    /// Some active replicas did not answer within the timeout.
    Timeout {
        missing: Vec<ExecIndex>,
        waited_ms: u64,
    },
    /// The operator asked for this replica to be activated (`zzctl activate`).
    Operator { exec: ExecIndex },
    /// After waking every replica: these replicas disagreed with f+1 matching
    /// replies, or stayed silent, and are faulty.
    Verdict { faulty: Vec<ExecIndex> },
}

impl Evidence {
    /// Suspicions that wake the dormant replicas, as opposed to a verdict.
    pub fn is_verdict(&self) -> bool {
        matches!(self, Evidence::Verdict { .. })
    }
}

/// An ordered reconfiguration of one app's execution replicas, justified by
/// f+1 suspects for the same (app, epoch) from distinct agreement replicas
/// (all verdicts naming the same faulty set, or all non-verdicts).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reconfigure {
    pub app: AppId,
    pub epoch: Epoch,
    pub proofs: Vec<Signed<Suspect>>,
}

/// A signed suspicion; f+1 of them for one (app, epoch) justify a reconfiguration.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Suspect {
    pub app: AppId,
    pub epoch: Epoch,
    pub app_seq: AppSeq,
    pub replica: ReplicaId,
    pub evidence: Evidence,
}

impl Signable for Suspect {
    const DOMAIN: &'static str = "zz suspect v1";
    fn signer(&self) -> ReplicaId {
        self.replica
    }
}

/// What a host agent does to one execution replica.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum HostAction {
    /// Resume (paused) or restore (saved) a dormant replica.
    Wake,
    /// Make an active replica dormant again.
    Sleep,
    /// Destroy a replica shown faulty and rebuild it from a clean image.
    Reimage,
}

/// A command to a host agent, signed by one agreement replica. The host acts
/// once f+1 distinct agreement replicas sent the same (app, epoch, exec, action).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostCommand {
    pub app: AppId,
    pub epoch: Epoch,
    pub exec: ExecIndex,
    pub action: HostAction,
    pub replica: ReplicaId,
}

impl Signable for HostCommand {
    const DOMAIN: &'static str = "zz host command v1";
    fn signer(&self) -> ReplicaId {
        self.replica
    }
}

/// Frames between an agreement replica and an execution replica, relayed by
/// host agents; MAC'd end to end with the pair's key so a host cannot forge them.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ExecMessage {
    Order(Order),
    /// The latest stable execution checkpoint (for recovery and release).
    Stable(ExecCheckpointCert),
    Executed(Executed),
    Checkpoint(ExecCheckpoint, crate::crypto::Signature),
}

/// Direction and endpoints of an [`ExecEnvelope`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ExecRoute {
    ToExecutor { from: ReplicaId, to: ExecId },
    ToAgreement { from: ExecId, to: ReplicaId },
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecEnvelope {
    pub route: ExecRoute,
    #[serde(with = "serde_bytes")]
    pub payload: Vec<u8>,
    pub mac: Mac,
}

/// An [`ExecEnvelope`] decoded in place: its payload is a slice of the
/// bytes it was decoded from. Host agents check an envelope's route with it
/// and forward the bytes they received, without copying the payload.
#[derive(Debug, Deserialize)]
pub struct ExecEnvelopeRef<'a> {
    pub route: ExecRoute,
    #[serde(borrow)]
    pub payload: &'a [u8],
    pub mac: Mac,
}

impl<'a> ExecEnvelopeRef<'a> {
    /// Decodes a whole envelope encoding (trailing bytes are an error).
    pub fn decode(bytes: &'a [u8]) -> Result<Self, crate::WireError> {
        crate::codec::decode_borrowed(bytes)
    }
}

impl ExecEnvelope {
    /// What the MAC covers ahead of the payload: the route's encoding (the
    /// payload is hashed in place, not copied behind it: an order's payload
    /// can be megabytes).
    fn mac_header(route: &ExecRoute) -> Vec<u8> {
        crate::codec::encode(route)
    }

    pub fn seal(route: ExecRoute, msg: &ExecMessage, key: &MacKey) -> Self {
        let payload = crate::codec::encode(msg);
        let mac = key.mac_parts(&[&Self::mac_header(&route), &payload]);
        ExecEnvelope {
            route,
            payload,
            mac,
        }
    }

    pub fn open(&self, key: &MacKey) -> Result<ExecMessage, crate::WireError> {
        if !key.verify_parts(&[&Self::mac_header(&self.route), &self.payload], &self.mac) {
            return Err(crate::WireError::BadMac(format!("{:?}", self.route)));
        }
        crate::codec::decode(&self.payload)
    }
}

/// Signs an execution checkpoint.
pub fn sign_exec_checkpoint(
    ck: &ExecCheckpoint,
    key: &crate::crypto::KeyPair,
) -> crate::crypto::Signature {
    key.sign(EXEC_CHECKPOINT_DOMAIN, &crate::codec::encode(ck))
}

/// A signed host command, as carried to host agents.
pub type SignedHostCommand = Signed<HostCommand>;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::KeyPair;

    #[test]
    fn exec_checkpoint_cert_needs_f_plus_one_valid_signatures() {
        let keys: Vec<KeyPair> = (0..3u8).map(|i| KeyPair::from_seed([i + 40; 32])).collect();
        let pubs: Vec<_> = keys.iter().map(|k| k.public()).collect();
        let ck = |i| ExecCheckpoint {
            app: 1,
            app_seq: 128,
            root: Digest::ZERO,
            exec: i,
        };
        let sig = |i: u32| (i, sign_exec_checkpoint(&ck(i), &keys[i as usize]));
        let good = ExecCheckpointCert {
            app: 1,
            app_seq: 128,
            root: Digest::ZERO,
            proofs: vec![sig(0), sig(2)],
        };
        assert!(good.verify(1, &pubs));
        let one = ExecCheckpointCert {
            proofs: vec![sig(0)],
            ..good.clone()
        };
        assert!(!one.verify(1, &pubs));
        let dup = ExecCheckpointCert {
            proofs: vec![sig(0), sig(0)],
            ..good.clone()
        };
        assert!(!dup.verify(1, &pubs));
        let wrong_root = ExecCheckpointCert {
            root: Digest::of(b"x"),
            ..good
        };
        assert!(!wrong_root.verify(1, &pubs));
    }

    #[test]
    fn exec_envelope_is_bound_to_its_route() {
        let a = KeyPair::from_seed([1; 32]);
        let b = KeyPair::from_seed([2; 32]);
        let k = a.shared_mac_key(&b.public());
        let msg = ExecMessage::Order(Order {
            app: 1,
            app_seq: 1,
            seq: 9,
            requests: vec![],
        });
        let route = ExecRoute::ToExecutor {
            from: 0,
            to: ExecId { app: 1, index: 0 },
        };
        let env = ExecEnvelope::seal(route, &msg, &k);
        assert_eq!(env.open(&k).unwrap(), msg);
        let mut rerouted = env.clone();
        rerouted.route = ExecRoute::ToExecutor {
            from: 0,
            to: ExecId { app: 1, index: 1 },
        };
        assert!(rerouted.open(&k).is_err());
    }
}
