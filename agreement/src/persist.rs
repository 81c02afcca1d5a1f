//! What an agreement replica must remember across a crash, as a sequence of
//! [`PersistOp`]s the sans-IO core emits and a driver stores (in sled, or in
//! memory for simulation) before sending any message of the same `Ready`.
//!
//! Remembered: the view (so the replica never goes back); a vote floor, the
//! highest sequence number it may have pre-prepared or prepared in that view
//! (after a restart it abstains up to the floor in that view, so it never
//! prepares two batches at one view and sequence number, nor, as primary,
//! reuses a sequence number); its prepared certificates (so its view changes
//! stay truthful); and the latest stable checkpoint with its state.
//!
//! The floor is the high watermark of the window, so it changes only when a
//! checkpoint becomes stable or the view changes: on the critical path of a
//! batch, the only disk flush is the one for its prepared certificate.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::Path;
use zz_wire::codec::{decode, encode};
use zz_wire::message::{CheckpointCert, PreparedCert};
use zz_wire::{Seq, View};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum PersistOp {
    /// The replica is in `view`; `active` is false while it changes to it.
    View {
        view: View,
        active: bool,
    },
    /// In `view`, the replica may have voted for sequence numbers up to `floor`.
    VoteFloor {
        view: View,
        floor: Seq,
    },
    Prepared(PreparedCert),
    Stable {
        cert: CheckpointCert,
        #[serde(with = "serde_bytes")]
        snapshot: Vec<u8>,
    },
}

/// The durable state, rebuilt by applying ops in order.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct PersistentState {
    pub view: View,
    pub view_active: bool,
    pub vote_floor: Option<(View, Seq)>,
    pub stable: Option<(CheckpointCert, Vec<u8>)>,
    pub prepared: BTreeMap<Seq, PreparedCert>,
}

impl PersistentState {
    pub fn apply(&mut self, op: &PersistOp) {
        match op {
            PersistOp::View { view, active } => {
                self.view = *view;
                self.view_active = *active;
            }
            PersistOp::VoteFloor { view, floor } => self.vote_floor = Some((*view, *floor)),
            PersistOp::Prepared(cert) => {
                self.prepared
                    .insert(cert.pre_prepare.body.seq, cert.clone());
            }
            PersistOp::Stable { cert, snapshot } => {
                let s = cert.seq;
                self.prepared.retain(|k, _| *k > s);
                self.stable = Some((cert.clone(), snapshot.clone()));
            }
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("storage at {path}: {source}")]
    Sled { path: String, source: sled::Error },
    #[error("storage holds a corrupt record under `{0}`; move the data directory away to rejoin from peers")]
    Corrupt(String),
}

/// sled-backed durable state of one replica.
pub struct SledStorage {
    path: String,
    meta: sled::Tree,
    prepared: sled::Tree,
    db: sled::Db,
}

impl SledStorage {
    pub fn open(path: &Path) -> Result<Self, StorageError> {
        let p = path.display().to_string();
        let err = |source| StorageError::Sled {
            path: p.clone(),
            source,
        };
        let db = sled::open(path).map_err(err)?;
        Ok(SledStorage {
            meta: db.open_tree("meta").map_err(err)?,
            prepared: db.open_tree("prepared").map_err(err)?,
            db,
            path: p,
        })
    }

    fn err(&self, source: sled::Error) -> StorageError {
        StorageError::Sled {
            path: self.path.clone(),
            source,
        }
    }

    /// Applies ops; they are durable once [`SledStorage::flush`] returns.
    pub fn apply(&self, ops: &[PersistOp]) -> Result<(), StorageError> {
        for op in ops {
            match op {
                PersistOp::View { view, active } => {
                    self.meta
                        .insert("view", encode(&(*view, *active)))
                        .map_err(|e| self.err(e))?;
                }
                PersistOp::VoteFloor { view, floor } => {
                    self.meta
                        .insert("vote_floor", encode(&(*view, *floor)))
                        .map_err(|e| self.err(e))?;
                }
                PersistOp::Prepared(cert) => {
                    self.prepared
                        .insert(cert.pre_prepare.body.seq.to_be_bytes(), encode(cert))
                        .map_err(|e| self.err(e))?;
                }
                PersistOp::Stable { cert, snapshot } => {
                    self.meta
                        .insert("stable", encode(&(cert, serde_bytes::Bytes::new(snapshot))))
                        .map_err(|e| self.err(e))?;
                    let upto = (cert.seq + 1).to_be_bytes();
                    for k in self.prepared.range(..upto).keys() {
                        self.prepared
                            .remove(k.map_err(|e| self.err(e))?)
                            .map_err(|e| self.err(e))?;
                    }
                }
            }
        }
        Ok(())
    }

    pub fn flush(&self) -> Result<(), StorageError> {
        self.db.flush().map_err(|e| self.err(e))?;
        Ok(())
    }

    pub fn load(&self) -> Result<PersistentState, StorageError> {
        let mut st = PersistentState::default();
        if let Some(v) = self.meta.get("view").map_err(|e| self.err(e))? {
            let (view, active): (View, bool) =
                decode(&v).map_err(|_| StorageError::Corrupt("meta/view".into()))?;
            st.view = view;
            st.view_active = active;
        } else {
            st.view_active = true;
        }
        if let Some(v) = self.meta.get("vote_floor").map_err(|e| self.err(e))? {
            let floor: (View, Seq) =
                decode(&v).map_err(|_| StorageError::Corrupt("meta/vote_floor".into()))?;
            st.vote_floor = Some(floor);
        }
        if let Some(v) = self.meta.get("stable").map_err(|e| self.err(e))? {
            let (cert, snap): (CheckpointCert, serde_bytes::ByteBuf) =
                decode(&v).map_err(|_| StorageError::Corrupt("meta/stable".into()))?;
            st.stable = Some((cert, snap.into_vec()));
        }
        for kv in self.prepared.iter() {
            let (k, v) = kv.map_err(|e| self.err(e))?;
            let cert: PreparedCert =
                decode(&v).map_err(|_| StorageError::Corrupt(format!("prepared/{k:?}")))?;
            st.prepared.insert(cert.pre_prepare.body.seq, cert);
        }
        Ok(st)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use zz_wire::crypto::KeyPair;
    use zz_wire::message::{Batch, PrePrepare, Signed};
    use zz_wire::Digest;

    #[test]
    fn sled_round_trip_matches_in_memory_state() {
        let dir = tempfile::tempdir().unwrap();
        let key = KeyPair::from_seed([9; 32]);
        let cert = |seq| PreparedCert {
            pre_prepare: Signed::sign(
                PrePrepare {
                    view: 1,
                    seq,
                    digest: Digest::ZERO,
                    primary: 1,
                },
                &key,
            ),
            batch: Batch::default(),
            prepares: vec![],
        };
        let ops = vec![
            PersistOp::View {
                view: 1,
                active: true,
            },
            PersistOp::VoteFloor {
                view: 1,
                floor: 256,
            },
            PersistOp::Prepared(cert(3)),
            PersistOp::Prepared(cert(9)),
            PersistOp::Stable {
                cert: CheckpointCert {
                    seq: 4,
                    state: Digest::ZERO,
                    proofs: vec![],
                },
                snapshot: vec![1, 2, 3],
            },
        ];
        let mut mem = PersistentState {
            view_active: true,
            ..Default::default()
        };
        ops.iter().for_each(|o| mem.apply(o));
        {
            let s = SledStorage::open(dir.path()).unwrap();
            s.apply(&ops).unwrap();
            s.flush().unwrap();
        }
        let s = SledStorage::open(dir.path()).unwrap();
        assert_eq!(s.load().unwrap(), mem);
        assert_eq!(mem.prepared.keys().copied().collect::<Vec<_>>(), vec![9]);
        assert_eq!(mem.vote_floor, Some((1, 256)));
    }
}
