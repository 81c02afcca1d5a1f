//! What an agreement replica must remember across a crash, as a sequence of
//! [`PersistOp`]s the sans-IO core emits and a driver stores (on disk with
//! [`DiskStorage`], or in memory for simulation) before sending any message of
//! the same `Ready`.
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
//! batch, the only disk flush is the one for its prepared certificate, and
//! that goes to the [`crate::journal`] rather than sled.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::Path;
use zz_wire::codec::{decode, encode};
use zz_wire::message::{CheckpointCert, PreparedCert};
use zz_wire::{Seq, View};

use crate::journal::PreparedJournal;

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
                // Below the stable checkpoint a certificate is never needed
                // again (view changes start from the checkpoint).
                let seq = cert.pre_prepare.body.seq;
                if self.stable.as_ref().is_none_or(|(c, _)| seq > c.seq) {
                    self.prepared.insert(seq, cert.clone());
                }
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
    #[error(transparent)]
    Journal(#[from] crate::journal::JournalError),
}

/// The durable state of one replica in its data directory: the view, vote
/// floor and stable checkpoint in sled (written a few times per checkpoint
/// interval), prepared certificates in the [`PreparedJournal`] (once per
/// batch).
pub struct DiskStorage {
    path: String,
    meta: sled::Tree,
    db: sled::Db,
    journal: PreparedJournal,
    /// Prepared certificates read at open, decoded by [`DiskStorage::load`].
    journaled: BTreeMap<Seq, Vec<u8>>,
    meta_dirty: bool,
}

impl DiskStorage {
    pub fn open(path: &Path) -> Result<Self, StorageError> {
        let p = path.display().to_string();
        let err = |source| StorageError::Sled {
            path: p.clone(),
            source,
        };
        let db = sled::open(path).map_err(err)?;
        let (journal, journaled) = PreparedJournal::open(path)?;
        let mut storage = DiskStorage {
            meta: db.open_tree("meta").map_err(err)?,
            db,
            path: p.clone(),
            journal,
            journaled,
            meta_dirty: false,
        };
        // Certificates from before the journal existed (sled's "prepared"
        // tree) move into it once, then the tree is dropped.
        let old = storage.db.open_tree("prepared").map_err(err)?;
        if !old.is_empty() {
            for kv in old.iter() {
                let (k, v) = kv.map_err(err)?;
                let seq = Seq::from_be_bytes(
                    k.as_ref()
                        .try_into()
                        .map_err(|_| StorageError::Corrupt(format!("prepared/{k:?}")))?,
                );
                storage.journal.append(seq, v.to_vec());
                storage.journaled.insert(seq, v.to_vec());
            }
            storage.journal.sync()?;
        }
        drop(old);
        let _ = storage.db.drop_tree("prepared");
        Ok(storage)
    }

    fn err(&self, source: sled::Error) -> StorageError {
        StorageError::Sled {
            path: self.path.clone(),
            source,
        }
    }

    /// Applies ops; they are durable once [`DiskStorage::flush`] returns.
    pub fn apply(&mut self, ops: &[PersistOp]) -> Result<(), StorageError> {
        for op in ops {
            self.meta_dirty |= !matches!(op, PersistOp::Prepared(_));
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
                    self.journal.append(cert.pre_prepare.body.seq, encode(cert));
                }
                PersistOp::Stable { cert, snapshot } => {
                    self.meta
                        .insert("stable", encode(&(cert, serde_bytes::Bytes::new(snapshot))))
                        .map_err(|e| self.err(e))?;
                    self.journal.forget_upto(cert.seq);
                }
            }
        }
        Ok(())
    }

    /// Makes every applied op durable: sled first if any op went there, then
    /// the journal. In that order because a journal sync may compact away
    /// certificates a new stable checkpoint covers; that checkpoint must be
    /// durable before they are gone.
    pub fn flush(&mut self) -> Result<(), StorageError> {
        if std::mem::take(&mut self.meta_dirty) {
            self.db.flush().map_err(|e| self.err(e))?;
        }
        self.journal.sync()?;
        Ok(())
    }

    /// What was durable when the storage was opened.
    pub fn load(&mut self) -> Result<PersistentState, StorageError> {
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
        let stable = st.stable.as_ref().map_or(0, |(c, _)| c.seq);
        self.journal.forget_upto(stable);
        for (seq, v) in std::mem::take(&mut self.journaled) {
            if seq <= stable {
                continue;
            }
            let cert: PreparedCert = decode(&v)
                .map_err(|_| StorageError::Corrupt(format!("prepared journal, seq {seq}")))?;
            st.prepared.insert(seq, cert);
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
            let mut s = DiskStorage::open(dir.path()).unwrap();
            s.apply(&ops).unwrap();
            s.flush().unwrap();
        }
        let mut s = DiskStorage::open(dir.path()).unwrap();
        assert_eq!(s.load().unwrap(), mem);
        assert_eq!(mem.prepared.keys().copied().collect::<Vec<_>>(), vec![9]);
        assert_eq!(mem.vote_floor, Some((1, 256)));
    }
}
