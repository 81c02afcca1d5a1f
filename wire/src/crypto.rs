//! Authentication primitives.
//!
//! - MACs: blake3 in keyed mode, truncated to 16 bytes. Used for every
//!   normal-case message: client requests (an [`Authenticator`], one MAC per
//!   replica), replies, and the envelope of every replica-to-replica frame.
//! - Signatures: ed25519, for whatever must convince a third party
//!   (pre-prepares and prepares that form prepared certificates, checkpoints,
//!   view changes, new views).
//! - Pairwise MAC keys are derived, never distributed: each principal's
//!   ed25519 key doubles as an X25519 key, and both ends of a pair compute the
//!   same Diffie-Hellman secret, so config files only carry public keys.

use crate::{ids::Digest, WireError};
use ed25519_dalek::{Signer, SigningKey, Verifier, VerifyingKey};
use serde::{Deserialize, Serialize};

/// A truncated blake3 MAC.
pub type Mac = [u8; 16];

/// An ed25519 signature (64 bytes), serializable.
#[derive(Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Signature(#[serde(with = "sig_bytes")] pub [u8; 64]);

impl std::fmt::Debug for Signature {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Sig({})", &hex::encode(self.0)[..8])
    }
}

mod sig_bytes {
    use serde::{de::Error, Deserialize, Deserializer, Serializer};
    pub fn serialize<S: Serializer>(v: &[u8; 64], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(v)
    }
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<[u8; 64], D::Error> {
        let v: Vec<u8> = Deserialize::deserialize(d)?;
        v.try_into()
            .map_err(|_| D::Error::custom("signature must be 64 bytes"))
    }
}

/// A 32-byte symmetric MAC key shared by two principals.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct MacKey(pub [u8; 32]);

impl std::fmt::Debug for MacKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MacKey(..)")
    }
}

impl MacKey {
    pub fn mac(&self, data: &[u8]) -> Mac {
        let h = blake3::keyed_hash(&self.0, data);
        let mut out = [0u8; 16];
        out.copy_from_slice(&h.as_bytes()[..16]);
        out
    }

    /// The MAC of the concatenation of `parts`, without copying them together.
    pub fn mac_parts(&self, parts: &[&[u8]]) -> Mac {
        let mut h = blake3::Hasher::new_keyed(&self.0);
        for p in parts {
            h.update(p);
        }
        let mut out = [0u8; 16];
        out.copy_from_slice(&h.finalize().as_bytes()[..16]);
        out
    }

    /// Constant-time check of `mac` over `data`.
    pub fn verify(&self, data: &[u8], mac: &Mac) -> bool {
        macs_equal(&self.mac(data), mac)
    }

    /// Constant-time check of `mac` over the concatenation of `parts`.
    pub fn verify_parts(&self, parts: &[&[u8]], mac: &Mac) -> bool {
        macs_equal(&self.mac_parts(parts), mac)
    }
}

fn macs_equal(a: &Mac, b: &Mac) -> bool {
    a.iter()
        .zip(b.iter())
        .fold(0u8, |acc, (x, y)| acc | (x ^ y))
        == 0
}

/// One MAC per agreement replica, indexed by replica id: lets a client (or a
/// replica) authenticate one message to all replicas at once.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Authenticator(pub Vec<Mac>);

impl Authenticator {
    pub fn new(keys: &[MacKey], data: &[u8]) -> Self {
        Authenticator(keys.iter().map(|k| k.mac(data)).collect())
    }

    /// Verifies the entry for replica `index` with the key it shares with the sender.
    pub fn verify(&self, index: usize, key: &MacKey, data: &[u8]) -> bool {
        self.0.get(index).is_some_and(|m| key.verify(data, m))
    }
}

/// A principal's long-term key pair.
#[derive(Clone)]
pub struct KeyPair {
    signing: SigningKey,
}

impl std::fmt::Debug for KeyPair {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "KeyPair({})", hex::encode(self.public().as_bytes()))
    }
}

impl KeyPair {
    pub fn generate() -> Self {
        KeyPair {
            signing: SigningKey::generate(&mut rand::rngs::OsRng),
        }
    }

    /// A deterministic key pair, for simulations and tests.
    pub fn from_seed(seed: [u8; 32]) -> Self {
        KeyPair {
            signing: SigningKey::from_bytes(&seed),
        }
    }

    pub fn seed(&self) -> [u8; 32] {
        self.signing.to_bytes()
    }

    pub fn public(&self) -> VerifyingKey {
        self.signing.verifying_key()
    }

    /// Signs `bytes` under a domain tag, so a signature for one message kind
    /// can never be replayed as another.
    pub fn sign(&self, domain: &str, bytes: &[u8]) -> Signature {
        let msg = Digest::of_parts(domain, &[bytes]);
        Signature(self.signing.sign(&msg.0).to_bytes())
    }

    /// The MAC key this principal shares with the holder of `peer`.
    pub fn shared_mac_key(&self, peer: &VerifyingKey) -> MacKey {
        let scalar = self.signing.to_scalar_bytes();
        let shared = peer.to_montgomery().mul_clamped(scalar);
        let (a, b) = {
            let me = self.public().to_bytes();
            let them = peer.to_bytes();
            if me <= them {
                (me, them)
            } else {
                (them, me)
            }
        };
        let mut h = blake3::Hasher::new_derive_key("zz pairwise mac key v1");
        h.update(shared.as_bytes());
        h.update(&a);
        h.update(&b);
        MacKey(*h.finalize().as_bytes())
    }
}

/// Verifies a domain-tagged signature.
pub fn verify_signature(key: &VerifyingKey, domain: &str, bytes: &[u8], sig: &Signature) -> bool {
    let msg = Digest::of_parts(domain, &[bytes]);
    let sig = ed25519_dalek::Signature::from_bytes(&sig.0);
    key.verify(&msg.0, &sig).is_ok()
}

/// Parses a hex-encoded ed25519 public key.
pub fn parse_public_key(hex_str: &str) -> Result<VerifyingKey, WireError> {
    let bytes = hex::decode(hex_str.trim())
        .map_err(|e| WireError::Malformed(format!("public key is not hex: {e}")))?;
    let arr: [u8; 32] = bytes
        .try_into()
        .map_err(|_| WireError::Malformed("public key must be 32 bytes".into()))?;
    VerifyingKey::from_bytes(&arr)
        .map_err(|e| WireError::Malformed(format!("invalid ed25519 public key: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pairwise_keys_agree_and_differ_per_pair() {
        let a = KeyPair::from_seed([1; 32]);
        let b = KeyPair::from_seed([2; 32]);
        let c = KeyPair::from_seed([3; 32]);
        assert_eq!(a.shared_mac_key(&b.public()), b.shared_mac_key(&a.public()));
        assert_ne!(a.shared_mac_key(&b.public()), a.shared_mac_key(&c.public()));
    }

    #[test]
    fn mac_and_signature_reject_tampering() {
        let a = KeyPair::from_seed([1; 32]);
        let b = KeyPair::from_seed([2; 32]);
        let k = a.shared_mac_key(&b.public());
        let m = k.mac(b"data");
        assert!(k.verify(b"data", &m));
        assert!(!k.verify(b"datA", &m));
        let s = a.sign("zz test", b"data");
        assert!(verify_signature(&a.public(), "zz test", b"data", &s));
        assert!(!verify_signature(&a.public(), "zz other", b"data", &s));
        assert!(!verify_signature(&b.public(), "zz test", b"data", &s));
    }
}
