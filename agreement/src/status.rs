//! What an agreement replica reports about itself to operators: the JSON
//! document served at `GET /status` on the replica's metrics port (next to
//! `GET /metrics`), which `zzctl status` reads from every replica.
//!
//! The per-app part is the replica's copy of the replicated
//! [`ExecTable`](crate::execution::ExecTable): epoch, active set, whether the
//! app is recovering (every replica woken, waiting for the verdict) and the
//! replicas the last verdict found faulty. Replicas in different places of
//! the log may report different epochs; `zzctl` shows the highest one f+1
//! replicas reached.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use zz_wire::exec::{AppSeq, Epoch, ExecIndex, HostAction};
use zz_wire::{AppId, ReplicaId};

use crate::execution::AppExecState;

/// Path of the status document on the metrics port.
pub const STATUS_PATH: &str = "/status";

/// One replica's status document.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplicaStatus {
    pub replica: ReplicaId,
    pub view: u64,
    pub view_active: bool,
    pub primary: ReplicaId,
    /// Last sequence number executed (committed and applied in order).
    pub last_executed: u64,
    /// Sequence number of the latest stable checkpoint.
    pub stable_seq: u64,
    pub pending_requests: usize,
    pub requests_executed: u64,
    /// Client requests committed in the log, for any app.
    pub requests_ordered: u64,
    pub batches_committed: u64,
    pub view_changes: u64,
    pub suspicions: u64,
    pub reconfigurations: u64,
    /// Apps run by execution replicas.
    pub apps: BTreeMap<AppId, AppStatus>,
}

/// One remote app, as this replica's replicated table has it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AppStatus {
    pub epoch: Epoch,
    /// The next `app_seq` to be ordered (so `next_app_seq - 1` were ordered).
    pub next_app_seq: AppSeq,
    pub active: Vec<ExecIndex>,
    pub recovering: bool,
    pub faulty: Vec<ExecIndex>,
    /// Replicas woken at this epoch (they start from the stable checkpoint).
    pub woken: Vec<ExecIndex>,
    /// Replicas the reconfiguration that began this epoch has reimaged.
    pub reimaged: Vec<ExecIndex>,
}

impl AppStatus {
    pub fn from_state(st: &AppExecState) -> Self {
        AppStatus {
            epoch: st.epoch,
            next_app_seq: st.next_app_seq,
            active: st.active.iter().copied().collect(),
            recovering: st.recovering,
            faulty: st.faulty.iter().copied().collect(),
            woken: st.woken.clone(),
            reimaged: st
                .commands
                .iter()
                .filter(|(_, a)| *a == HostAction::Reimage)
                .map(|(i, _)| *i)
                .collect(),
        }
    }
}

impl ReplicaStatus {
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_round_trips_through_json() {
        let mut s = ReplicaStatus {
            replica: 2,
            view: 3,
            last_executed: 40,
            ..Default::default()
        };
        s.apps.insert(
            1,
            AppStatus {
                epoch: 2,
                active: vec![0, 1],
                faulty: vec![2],
                ..Default::default()
            },
        );
        let back: ReplicaStatus = serde_json::from_str(&s.to_json()).unwrap();
        assert_eq!(back, s);
    }
}
