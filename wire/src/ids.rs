//! Identifiers shared by every component, and the 32-byte blake3 digest type.

use serde::{Deserialize, Serialize};
use std::fmt;

/// Index of an agreement replica, `0..n`.
pub type ReplicaId = u32;
/// A client, as listed in the cluster config.
pub type ClientId = u64;
/// A PBFT view number; the primary of view `v` is `v mod n`.
pub type View = u64;
/// A sequence number in the agreement log.
pub type Seq = u64;
/// An application hosted by the cluster.
pub type AppId = u32;

/// A blake3 digest.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, Default)]
pub struct Digest(pub [u8; 32]);

impl Digest {
    pub const ZERO: Digest = Digest([0; 32]);

    pub fn of(bytes: &[u8]) -> Digest {
        Digest(*blake3::hash(bytes).as_bytes())
    }

    /// Digest of several parts, unambiguous because each part is length-prefixed.
    pub fn of_parts(domain: &str, parts: &[&[u8]]) -> Digest {
        let mut h = blake3::Hasher::new_derive_key(domain);
        for p in parts {
            h.update(&(p.len() as u64).to_le_bytes());
            h.update(p);
        }
        Digest(*h.finalize().as_bytes())
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", &hex::encode(self.0)[..12])
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", hex::encode(self.0))
    }
}
