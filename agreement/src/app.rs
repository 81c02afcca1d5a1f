//! Deterministic in-memory applications executed by the agreement cluster
//! itself, until execution moves to separate execution replicas.
//!
//! The replica's service state is every app's snapshot plus the last reply
//! per client (so de-duplication survives state transfer). Its digest is the
//! blake3 hash of the canonical encoding, which is what checkpoints certify.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use zz_wire::codec::{decode, encode};
use zz_wire::{AppId, ClientId, Digest};

#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error("unknown app kind `{0}`")]
    UnknownKind(String),
    #[error("snapshot does not decode: {0}")]
    BadSnapshot(String),
}

/// A deterministic service: same ops in the same order give the same results.
pub trait StateMachine: Send {
    fn execute(&mut self, op: &[u8]) -> Vec<u8>;
    fn snapshot(&self) -> Vec<u8>;
    fn restore(&mut self, snapshot: &[u8]) -> Result<(), AppError>;
}

/// Does nothing and returns nothing: measures the protocol alone.
#[derive(Default)]
pub struct NullApp;

impl StateMachine for NullApp {
    fn execute(&mut self, _op: &[u8]) -> Vec<u8> {
        Vec::new()
    }
    fn snapshot(&self) -> Vec<u8> {
        Vec::new()
    }
    fn restore(&mut self, _snapshot: &[u8]) -> Result<(), AppError> {
        Ok(())
    }
}

/// Returns its operation.
#[derive(Default)]
pub struct EchoApp;

impl StateMachine for EchoApp {
    fn execute(&mut self, op: &[u8]) -> Vec<u8> {
        op.to_vec()
    }
    fn snapshot(&self) -> Vec<u8> {
        Vec::new()
    }
    fn restore(&mut self, _snapshot: &[u8]) -> Result<(), AppError> {
        Ok(())
    }
}

/// A counter: an 8-byte little-endian op adds that amount, anything else adds
/// one; the result is the new value. Lets tests see every op applied once.
#[derive(Default)]
pub struct CounterApp {
    value: u64,
}

impl StateMachine for CounterApp {
    fn execute(&mut self, op: &[u8]) -> Vec<u8> {
        let delta = op.try_into().map(u64::from_le_bytes).unwrap_or(1);
        self.value = self.value.wrapping_add(delta);
        self.value.to_le_bytes().to_vec()
    }
    fn snapshot(&self) -> Vec<u8> {
        self.value.to_le_bytes().to_vec()
    }
    fn restore(&mut self, snapshot: &[u8]) -> Result<(), AppError> {
        let bytes: [u8; 8] = snapshot
            .try_into()
            .map_err(|_| AppError::BadSnapshot("counter needs 8 bytes".into()))?;
        self.value = u64::from_le_bytes(bytes);
        Ok(())
    }
}

pub fn new_app(kind: &str) -> Result<Box<dyn StateMachine>, AppError> {
    match kind {
        "null" => Ok(Box::new(NullApp)),
        "echo" => Ok(Box::new(EchoApp)),
        "counter" => Ok(Box::new(CounterApp::default())),
        other => Err(AppError::UnknownKind(other.to_string())),
    }
}

/// The last reply sent to a client, kept to answer retransmissions.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LastReply {
    pub req_id: u64,
    #[serde(with = "serde_bytes")]
    pub result: Vec<u8>,
}

#[derive(Serialize, Deserialize)]
struct ServiceSnapshot {
    apps: Vec<(AppId, serde_bytes::ByteBuf)>,
    replies: Vec<(ClientId, LastReply)>,
    exec: crate::execution::ExecTable,
}

/// Result of an op naming an app the cluster does not host.
pub const UNKNOWN_APP_RESULT: &[u8] = b"error: unknown app";

/// All apps of the cluster plus the reply table: the replicated state.
pub struct Service {
    apps: BTreeMap<AppId, Box<dyn StateMachine>>,
    pub replies: BTreeMap<ClientId, LastReply>,
    /// Epochs, app sequence numbers and active sets of apps run by execution replicas.
    pub exec: crate::execution::ExecTable,
}

impl Service {
    pub fn new(apps: Vec<(AppId, Box<dyn StateMachine>)>) -> Self {
        Service {
            apps: apps.into_iter().collect(),
            replies: BTreeMap::new(),
            exec: Default::default(),
        }
    }

    /// Executes one request unless it is a duplicate; returns the result to
    /// send, or `None` for a stale request that is neither new nor the last.
    pub fn execute(
        &mut self,
        client: ClientId,
        req_id: u64,
        app: AppId,
        op: &[u8],
    ) -> Option<Vec<u8>> {
        if let Some(last) = self.replies.get(&client) {
            if req_id == last.req_id {
                return Some(last.result.clone());
            }
            if req_id < last.req_id {
                return None;
            }
        }
        let result = match self.apps.get_mut(&app) {
            Some(a) => a.execute(op),
            None => UNKNOWN_APP_RESULT.to_vec(),
        };
        self.replies.insert(
            client,
            LastReply {
                req_id,
                result: result.clone(),
            },
        );
        Some(result)
    }

    pub fn snapshot(&self) -> Vec<u8> {
        encode(&ServiceSnapshot {
            apps: self
                .apps
                .iter()
                .map(|(id, a)| (*id, serde_bytes::ByteBuf::from(a.snapshot())))
                .collect(),
            replies: self.replies.iter().map(|(c, r)| (*c, r.clone())).collect(),
            exec: self.exec.clone(),
        })
    }

    pub fn restore(&mut self, snapshot: &[u8]) -> Result<(), AppError> {
        let s: ServiceSnapshot =
            decode(snapshot).map_err(|e| AppError::BadSnapshot(e.to_string()))?;
        for (id, bytes) in &s.apps {
            if let Some(a) = self.apps.get_mut(id) {
                a.restore(bytes)?;
            }
        }
        self.replies = s.replies.into_iter().collect();
        self.exec = s.exec;
        Ok(())
    }
}

/// The digest checkpoints certify for a snapshot.
pub fn state_digest(snapshot: &[u8]) -> Digest {
    Digest::of_parts("zz service state v1", &[snapshot])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn duplicates_execute_once_and_snapshot_round_trips() {
        let mut s = Service::new(vec![(1, new_app("counter").unwrap())]);
        assert_eq!(s.execute(7, 1, 1, b""), Some(1u64.to_le_bytes().to_vec()));
        assert_eq!(s.execute(7, 1, 1, b""), Some(1u64.to_le_bytes().to_vec()));
        assert_eq!(s.execute(7, 0, 1, b""), None);
        assert_eq!(s.execute(7, 2, 1, b""), Some(2u64.to_le_bytes().to_vec()));
        let snap = s.snapshot();
        let mut t = Service::new(vec![(1, new_app("counter").unwrap())]);
        t.restore(&snap).unwrap();
        assert_eq!(t.snapshot(), snap);
        assert_eq!(t.execute(7, 3, 1, b""), Some(3u64.to_le_bytes().to_vec()));
        assert!(t.restore(b"garbage").is_err());
    }
}
