//! Protocol messages.
//!
//! What travels between replicas is a [`PeerEnvelope`]: a MAC'd, addressed
//! payload holding one [`PeerMessage`]. Inside, messages that may later be
//! shown to a third party are [`Signed`]. Clients send [`ClientRequest`]s
//! (with one MAC per replica) and receive MAC'd [`Reply`]s.

use crate::codec::{decode, encode};
use crate::crypto::{verify_signature, Authenticator, KeyPair, Mac, MacKey, Signature};
use crate::ids::{AppId, ClientId, Digest, ReplicaId, Seq, View};
use crate::WireError;
use ed25519_dalek::VerifyingKey;
use serde::{de::DeserializeOwned, Deserialize, Serialize};

/// An operation submitted by a client.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Request {
    pub client: ClientId,
    /// Per-client, strictly increasing; used for de-duplication.
    pub req_id: u64,
    pub app: AppId,
    #[serde(with = "serde_bytes")]
    pub op: Vec<u8>,
    pub read_only: bool,
}

impl Request {
    pub fn digest(&self) -> Digest {
        Digest::of_parts("zz request v1", &[&encode(self)])
    }
}

/// A request with one MAC per agreement replica over its digest.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClientRequest {
    pub request: Request,
    pub auth: Authenticator,
}

impl ClientRequest {
    /// Builds the request's authenticator; `keys[i]` is shared with replica `i`.
    pub fn new(request: Request, keys: &[MacKey]) -> Self {
        let auth = Authenticator::new(keys, &request.digest().0);
        ClientRequest { request, auth }
    }

    /// Checks the MAC addressed to `replica`.
    pub fn verify_for(&self, replica: ReplicaId, key: &MacKey) -> bool {
        self.auth
            .verify(replica as usize, key, &self.request.digest().0)
    }
}

/// A replica's reply to a client, MAC'd with their pairwise key.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reply {
    pub view: View,
    pub replica: ReplicaId,
    pub client: ClientId,
    pub req_id: u64,
    #[serde(with = "serde_bytes")]
    pub result: Vec<u8>,
    pub mac: Mac,
}

impl Reply {
    /// What the MAC covers ahead of the result (hashed in place, not copied
    /// behind this header: results run to 64 KiB).
    fn mac_header(replica: ReplicaId, client: ClientId, req_id: u64) -> [u8; 20] {
        // Typed, so a change of an id's width fails to compile.
        let (r, c, q): ([u8; 4], [u8; 8], [u8; 8]) = (
            replica.to_le_bytes(),
            client.to_le_bytes(),
            req_id.to_le_bytes(),
        );
        let mut h = [0u8; 20];
        h[..4].copy_from_slice(&r);
        h[4..12].copy_from_slice(&c);
        h[12..].copy_from_slice(&q);
        h
    }

    pub fn new(
        view: View,
        replica: ReplicaId,
        client: ClientId,
        req_id: u64,
        result: Vec<u8>,
        key: &MacKey,
    ) -> Self {
        let mac = key.mac_parts(&[&Self::mac_header(replica, client, req_id), &result]);
        Reply {
            view,
            replica,
            client,
            req_id,
            result,
            mac,
        }
    }

    pub fn verify(&self, key: &MacKey) -> bool {
        key.verify_parts(
            &[
                &Self::mac_header(self.replica, self.client, self.req_id),
                &self.result,
            ],
            &self.mac,
        )
    }
}

/// An ordered group of requests; the unit PBFT agrees on. An empty batch is
/// the null request used to fill gaps after a view change.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Batch {
    pub requests: Vec<ClientRequest>,
    /// Reconfigurations of execution replicas, ordered like requests so every
    /// replica switches at the same point of the log.
    pub reconfigs: Vec<crate::exec::Reconfigure>,
}

impl Batch {
    pub fn digest(&self) -> Digest {
        Digest::of_parts("zz batch v1", &[&encode(self)])
    }
}

/// A message body that can be signed; the domain separates message kinds.
pub trait Signable: Serialize + DeserializeOwned {
    const DOMAIN: &'static str;
    /// The replica that must have signed this body.
    fn signer(&self) -> ReplicaId;
}

/// A body with its signer's ed25519 signature.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Signed<T> {
    pub body: T,
    pub sig: Signature,
}

impl<T: Signable> Signed<T> {
    pub fn sign(body: T, key: &KeyPair) -> Self {
        let sig = key.sign(T::DOMAIN, &encode(&body));
        Signed { body, sig }
    }

    /// Verifies against the signer named in the body; `keys[i]` is replica `i`'s key.
    pub fn verify(&self, keys: &[VerifyingKey]) -> bool {
        match keys.get(self.body.signer() as usize) {
            Some(k) => verify_signature(k, T::DOMAIN, &encode(&self.body), &self.sig),
            None => false,
        }
    }
}

/// The signed part of a pre-prepare: the batch travels beside it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PrePrepare {
    pub view: View,
    pub seq: Seq,
    pub digest: Digest,
    /// The primary of `view`; checked by receivers.
    pub primary: ReplicaId,
}

impl Signable for PrePrepare {
    const DOMAIN: &'static str = "zz pre-prepare v1";
    fn signer(&self) -> ReplicaId {
        self.primary
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Prepare {
    pub view: View,
    pub seq: Seq,
    pub digest: Digest,
    pub replica: ReplicaId,
}

impl Signable for Prepare {
    const DOMAIN: &'static str = "zz prepare v1";
    fn signer(&self) -> ReplicaId {
        self.replica
    }
}

/// Commits are authenticated by the envelope MAC only: they never need to be
/// shown to a third party.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Commit {
    pub view: View,
    pub seq: Seq,
    pub digest: Digest,
    pub replica: ReplicaId,
}

/// A replica's claim about the service state after executing `seq`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checkpoint {
    pub seq: Seq,
    pub state: Digest,
    pub replica: ReplicaId,
}

impl Signable for Checkpoint {
    const DOMAIN: &'static str = "zz checkpoint v1";
    fn signer(&self) -> ReplicaId {
        self.replica
    }
}

/// 2f+1 matching signed checkpoints: proof that the state after `seq` is `state`.
/// The genesis certificate (seq 0) is empty and needs no signatures.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckpointCert {
    pub seq: Seq,
    pub state: Digest,
    pub proofs: Vec<Signed<Checkpoint>>,
}

/// A pre-prepare, its batch, and 2f matching signed prepares from distinct backups.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PreparedCert {
    pub pre_prepare: Signed<PrePrepare>,
    pub batch: Batch,
    pub prepares: Vec<Signed<Prepare>>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ViewChange {
    pub new_view: View,
    pub replica: ReplicaId,
    pub stable: CheckpointCert,
    /// For each sequence number above `stable.seq` that this replica prepared,
    /// the certificate from the highest view in which it prepared.
    pub prepared: Vec<PreparedCert>,
}

impl Signable for ViewChange {
    const DOMAIN: &'static str = "zz view-change v1";
    fn signer(&self) -> ReplicaId {
        self.replica
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NewView {
    pub view: View,
    pub primary: ReplicaId,
    /// 2f+1 view changes for `view`, from distinct replicas.
    pub view_changes: Vec<Signed<ViewChange>>,
    /// Pre-prepares for every sequence number in (min-s, max-s], recomputable
    /// by every receiver from `view_changes`.
    pub pre_prepares: Vec<(Signed<PrePrepare>, Batch)>,
}

impl Signable for NewView {
    const DOMAIN: &'static str = "zz new-view v1";
    fn signer(&self) -> ReplicaId {
        self.primary
    }
}

/// Periodic progress report; peers that are ahead answer with what the
/// sender is missing.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Status {
    pub replica: ReplicaId,
    pub view: View,
    /// False while the sender is changing to `view`.
    pub view_active: bool,
    pub last_executed: Seq,
    pub stable: Seq,
}

/// A stable checkpoint's certificate and the state it certifies.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StateTransfer {
    pub cert: CheckpointCert,
    #[serde(with = "serde_bytes")]
    pub snapshot: Vec<u8>,
}

/// A committed log entry sent to a lagging replica; accepted once f+1
/// distinct replicas sent the same `(seq, batch digest)`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommittedEntry {
    pub seq: Seq,
    pub batch: Batch,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum PeerMessage {
    PrePrepare(Signed<PrePrepare>, Batch),
    Prepare(Signed<Prepare>),
    Commit(Commit),
    Checkpoint(Signed<Checkpoint>),
    ViewChange(Signed<ViewChange>),
    NewView(Signed<NewView>),
    Status(Status),
    StateTransfer(StateTransfer),
    Committed(CommittedEntry),
    Suspect(Signed<crate::exec::Suspect>),
}

impl PeerMessage {
    pub fn kind(&self) -> &'static str {
        match self {
            PeerMessage::PrePrepare(..) => "pre_prepare",
            PeerMessage::Prepare(_) => "prepare",
            PeerMessage::Commit(_) => "commit",
            PeerMessage::Checkpoint(_) => "checkpoint",
            PeerMessage::ViewChange(_) => "view_change",
            PeerMessage::NewView(_) => "new_view",
            PeerMessage::Status(_) => "status",
            PeerMessage::StateTransfer(_) => "state_transfer",
            PeerMessage::Committed(_) => "committed",
            PeerMessage::Suspect(_) => "suspect",
        }
    }
}

/// An addressed replica-to-replica frame, MAC'd with the pair's key.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerEnvelope {
    pub from: ReplicaId,
    pub to: ReplicaId,
    #[serde(with = "serde_bytes")]
    pub payload: Vec<u8>,
    pub mac: Mac,
}

impl PeerEnvelope {
    /// The envelope's MAC: over sender, receiver and payload, so a frame can
    /// be neither re-addressed nor attributed to another sender. Drivers that
    /// encode envelopes themselves use this to stay byte-compatible.
    pub fn compute_mac(from: ReplicaId, to: ReplicaId, payload: &[u8], key: &MacKey) -> Mac {
        key.mac_parts(&[&from.to_le_bytes(), &to.to_le_bytes(), payload])
    }

    pub fn seal(from: ReplicaId, to: ReplicaId, msg: &PeerMessage, key: &MacKey) -> Self {
        let payload = encode(msg);
        let mac = Self::compute_mac(from, to, &payload, key);
        PeerEnvelope {
            from,
            to,
            payload,
            mac,
        }
    }

    /// Checks the MAC (with the key shared with `from`) and decodes the payload.
    pub fn open(&self, key: &MacKey) -> Result<PeerMessage, WireError> {
        let parts: [&[u8]; 3] = [
            &self.from.to_le_bytes(),
            &self.to.to_le_bytes(),
            &self.payload,
        ];
        if !key.verify_parts(&parts, &self.mac) {
            return Err(WireError::BadMac(format!("replica {}", self.from)));
        }
        decode(&self.payload)
    }
}

/// Everything that travels on a zz TCP connection, one per frame.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Frame {
    Peer(PeerEnvelope),
    Request(ClientRequest),
    Reply(Reply),
    /// Between an agreement replica and an execution replica, through host agents.
    Exec(crate::exec::ExecEnvelope),
    /// From an agreement replica to a host agent.
    HostCommand(Signed<crate::exec::HostCommand>),
    /// From the operator (`zzctl`) to an agreement replica or a host agent.
    Operator(crate::operator::OperatorSigned),
    /// A daemon's answer to [`Frame::Operator`].
    OperatorAck(crate::operator::OperatorAck),
    /// First frame of a link from one host agent to another: the sender's
    /// host name. Unauthenticated: the link only carries [`Frame::Fetch`],
    /// whose contents the recipients verify themselves.
    HostPeer {
        host: String,
    },
    /// State-fetch traffic between execution replicas on different hosts,
    /// relayed by their host agents: an encoded executor link frame, opaque
    /// to this crate (its type lives in `zz-executor`).
    Fetch(#[serde(with = "serde_bytes")] Vec<u8>),
}

impl Frame {
    /// The first four bytes of an encoded [`Frame::Exec`]: its variant index.
    /// The rest is the envelope's own encoding, so a relay can re-tag an
    /// envelope for another framing without decoding or copying it.
    pub const EXEC_TAG: [u8; 4] = 3u32.to_le_bytes();
    /// The first four bytes of an encoded [`Frame::Fetch`]; then the inner
    /// frame's length (u64, little-endian) and its bytes.
    pub const FETCH_TAG: [u8; 4] = 8u32.to_le_bytes();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_tags_are_the_encodings_variant_indices() {
        let env = crate::exec::ExecEnvelope {
            route: crate::exec::ExecRoute::ToAgreement {
                from: crate::exec::ExecId { app: 1, index: 2 },
                to: 3,
            },
            payload: vec![9; 5],
            mac: [7; 16],
        };
        let bytes = crate::codec::encode(&Frame::Exec(env.clone()));
        assert_eq!(bytes[..4], Frame::EXEC_TAG);
        assert_eq!(bytes[4..], crate::codec::encode(&env)[..]);
        let view = crate::exec::ExecEnvelopeRef::decode(&bytes[4..]).unwrap();
        assert_eq!(
            (view.route, view.payload, view.mac),
            (env.route, &env.payload[..], env.mac)
        );
        let bytes = crate::codec::encode(&Frame::Fetch(vec![1, 2, 3]));
        assert_eq!(bytes[..4], Frame::FETCH_TAG);
        assert_eq!(bytes[4..12], 3u64.to_le_bytes());
        assert_eq!(bytes[12..], [1, 2, 3]);
    }

    #[test]
    fn envelope_rejects_forgery_and_corruption() {
        let a = KeyPair::from_seed([1; 32]);
        let b = KeyPair::from_seed([2; 32]);
        let c = KeyPair::from_seed([3; 32]);
        let k_ab = a.shared_mac_key(&b.public());
        let msg = PeerMessage::Status(Status {
            replica: 0,
            view: 1,
            view_active: true,
            last_executed: 2,
            stable: 0,
        });
        let env = PeerEnvelope::seal(0, 1, &msg, &k_ab);
        assert_eq!(env.open(&k_ab).unwrap(), msg);
        let forged = PeerEnvelope::seal(0, 1, &msg, &c.shared_mac_key(&b.public()));
        assert!(forged.open(&k_ab).is_err());
        let mut corrupt = env.clone();
        corrupt.payload[3] ^= 1;
        assert!(corrupt.open(&k_ab).is_err());
    }

    #[test]
    fn signed_body_binds_signer() {
        let keys: Vec<KeyPair> = (0..4u8).map(|i| KeyPair::from_seed([i + 1; 32])).collect();
        let pubs: Vec<_> = keys.iter().map(|k| k.public()).collect();
        let body = Prepare {
            view: 0,
            seq: 1,
            digest: Digest::ZERO,
            replica: 2,
        };
        let s = Signed::sign(body, &keys[2]);
        assert!(s.verify(&pubs));
        let impersonated = Signed::sign(body, &keys[3]);
        assert!(!impersonated.verify(&pubs));
        let mut altered = s.clone();
        altered.body.seq = 2;
        assert!(!altered.verify(&pubs));
    }
}
