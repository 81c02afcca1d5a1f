//! Fault injection for drills: a [`FaultPlan`] makes a replica misbehave in
//! ways the rest of the system must detect and repair (DESIGN §3).
//!
//! The plan is an explicit value handed to the execution core; a deployment
//! enables it only where its configuration allows fault injection. The
//! default plan injects nothing.
//!
//! State-changing faults are applied by the core itself (wrong replies,
//! corrupt page). The others are reported to the driver through
//! [`crate::replica::Ready`]: a delay to apply before sending (slow replica) and
//! a request to exit (crash).

use serde::{Deserialize, Serialize};
use zz_wire::exec::AppSeq;

/// Corrupts one page of state right after a batch is applied.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CorruptPage {
    /// After applying this `app_seq` (and before its checkpoint, if any).
    pub after: AppSeq,
    /// Physical page to flip bits in; `None`: the last page of the state.
    /// Page 0 is the executor's superblock: corrupting it stops the replica.
    #[serde(default)]
    pub page: Option<u64>,
    /// A bad sector rather than a one-off flip: the page (the last one,
    /// if `page` is `None`, at each time) is corrupted again before every
    /// later checkpoint, so writes that overwrite it do not heal the replica.
    #[serde(default)]
    pub persistent: bool,
}

/// Which faults to inject; `FaultPlan::default()` injects none.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FaultPlan {
    /// From this `app_seq` on, every reply's result is altered (so the
    /// batch digest is wrong too); the state itself stays correct.
    #[serde(default)]
    pub wrong_replies_from: Option<AppSeq>,
    /// Flip bits of one page of state once.
    #[serde(default)]
    pub corrupt_page: Option<CorruptPage>,
    /// Delay, in milliseconds, the driver applies per executed batch before
    /// sending its outputs.
    #[serde(default)]
    pub slow_ms: u64,
    /// After executing (and sending) this `app_seq`, the driver exits.
    #[serde(default)]
    pub crash_after: Option<AppSeq>,
    /// A Byzantine page server: every page this replica serves to a
    /// recovering peer has bytes altered (its own state stays correct).
    #[serde(default)]
    pub lie_pages: bool,
    /// A slow page server: each fetch request from a peer is answered this
    /// many milliseconds late.
    #[serde(default)]
    pub serve_delay_ms: u64,
}

impl FaultPlan {
    /// Whether the plan injects nothing.
    pub fn is_none(&self) -> bool {
        *self == FaultPlan::default()
    }

    /// Whether replies of `app_seq` are to be altered.
    pub fn wrong_replies(&self, app_seq: AppSeq) -> bool {
        self.wrong_replies_from.is_some_and(|s| app_seq >= s)
    }
}

/// What a lying page server does to a fetch response: alters the first
/// byte of every page (proofs and leaves are left as they were, so the
/// recipient's verification is what must catch it).
pub fn corrupt_served_pages(resp: &mut zz_statefetch::Response) {
    if let zz_statefetch::Response::Pages(reply) = resp {
        for p in &mut reply.pages {
            if let Some(b) = p.data.first_mut() {
                *b ^= 0xFF;
            }
        }
    }
}

/// How a wrong reply differs from the right one: a deterministic change
/// that can never leave the result equal.
pub fn corrupt_result(result: &mut Vec<u8>) {
    match result.first_mut() {
        Some(b) => *b ^= 0xA5,
        None => result.push(0xBA),
    }
}
