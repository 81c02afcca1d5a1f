//! Commands signed by the operator key (`zzctl activate`, `zzctl fault`).
//!
//! The operator is a principal of its own: one ed25519 key whose public half
//! the config lists as `operator_public_key`. Its commands are signed, never
//! MAC'd, because every receiver checks them on its own:
//!
//! - [`OperatorAction::Activate`] goes to every agreement replica. A replica
//!   that verifies it signs a `Suspect` with `Evidence::Operator` for the
//!   app's current epoch, so the wake enters the same f+1 path as any
//!   suspicion: f+1 suspects, an ordered `Reconfigure`, f+1 host commands.
//!   The command names the epoch it is meant for, so replaying it later does
//!   nothing.
//! - [`OperatorAction::Fault`] goes to the host agent of the replica and is
//!   carried out only where the config sets `execution.allow_fault_injection`
//!   (drills). A host agent is trusted like its hypervisor, so the operator's
//!   signature alone is enough; `issued_ms` and `nonce` bound replays.

use crate::codec::encode;
use crate::crypto::{verify_signature, KeyPair, Signature};
use crate::exec::{Epoch, ExecId};
use ed25519_dalek::VerifyingKey;
use serde::{Deserialize, Serialize};

/// Signature domain of operator commands.
pub const OPERATOR_DOMAIN: &str = "zz operator command v1";

/// Longest age, in milliseconds, of a fault command a host agent accepts.
pub const MAX_COMMAND_AGE_MS: u64 = 60_000;

/// What the operator asks for.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum OperatorAction {
    /// Wake `exec` (with the app's other dormant replicas) at `epoch`.
    Activate { exec: ExecId, epoch: Epoch },
    /// Give `exec` this fault plan (the TOML form of the executor's
    /// `FaultPlan`) and restart it so it takes effect; an empty plan clears it.
    Fault { exec: ExecId, plan_toml: String },
}

/// One operator command.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct OperatorCommand {
    pub action: OperatorAction,
    /// Wall-clock time of issue (Unix milliseconds), for replay bounds.
    pub issued_ms: u64,
    /// Random, so two commands issued in one millisecond differ.
    pub nonce: u64,
}

/// An operator command with the operator's signature.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct OperatorSigned {
    pub body: OperatorCommand,
    pub sig: Signature,
}

impl OperatorSigned {
    pub fn sign(body: OperatorCommand, key: &KeyPair) -> Self {
        let sig = key.sign(OPERATOR_DOMAIN, &encode(&body));
        OperatorSigned { body, sig }
    }

    /// Whether the operator key `key` signed this command.
    pub fn verify(&self, key: &VerifyingKey) -> bool {
        verify_signature(key, OPERATOR_DOMAIN, &encode(&self.body), &self.sig)
    }
}

/// What a daemon answers to an operator command, on the same connection.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum OperatorAck {
    /// Accepted; the string says what follows.
    Accepted(String),
    /// Refused, and why.
    Refused(String),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn operator_signature_binds_the_command() {
        let op = KeyPair::from_seed([9; 32]);
        let other = KeyPair::from_seed([8; 32]);
        let cmd = OperatorCommand {
            action: OperatorAction::Activate {
                exec: ExecId { app: 1, index: 2 },
                epoch: 0,
            },
            issued_ms: 5,
            nonce: 7,
        };
        let s = OperatorSigned::sign(cmd, &op);
        assert!(s.verify(&op.public()));
        assert!(!s.verify(&other.public()));
        let mut changed = s.clone();
        changed.body.action = OperatorAction::Activate {
            exec: ExecId { app: 1, index: 1 },
            epoch: 0,
        };
        assert!(!changed.verify(&op.public()));
    }
}
