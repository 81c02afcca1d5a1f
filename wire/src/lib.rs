//! zz wire format: everything that crosses a process boundary.
//!
//! - [`ids`]: identifiers and the 32-byte [`ids::Digest`].
//! - [`codec`]: serde encoding with a size limit enforced while decoding.
//! - [`frame`]: length-prefixed framing; the size limit is checked before any allocation.
//! - [`crypto`]: blake3-keyed MACs, MAC authenticators, ed25519 signatures and
//!   pairwise MAC keys derived by Diffie-Hellman over each principal's key.
//! - [`message`]: protocol messages between clients and agreement replicas.
//! - [`config`]: the TOML cluster configuration and key files.
//! - [`operator`]: commands signed by the operator key (`zzctl activate`, `zzctl fault`).
//!
//! Decoding arbitrary bytes never panics: every decoder returns a typed [`WireError`].

pub mod codec;
pub mod config;
pub mod crypto;
pub mod exec;
pub mod frame;
pub mod ids;
pub mod message;
pub mod operator;

pub use ids::{AppId, ClientId, Digest, ReplicaId, Seq, View};

/// Errors from decoding or authenticating wire data.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error("frame of {len} bytes exceeds the limit of {limit} bytes")]
    Oversized { len: usize, limit: usize },
    #[error("malformed message: {0}")]
    Malformed(String),
    #[error("bad MAC from {0}")]
    BadMac(String),
    #[error("bad signature from replica {0}")]
    BadSignature(ReplicaId),
    #[error("unknown principal {0}")]
    UnknownPrincipal(String),
    #[error("i/o error: {0}")]
    Io(#[from] std::io::Error),
}
