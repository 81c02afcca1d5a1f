//! The prepared-certificate journal: the one durable write on a batch's
//! critical path (a replica's commit promises its prepared certificate is on
//! disk), so it is kept out of sled in a file built for exactly that write.
//!
//! Why not sled: on this machine kind a sled insert + flush costs about as much
//! as an `fdatasync` at the median but ten times more at the 90th percentile
//! (sled writes its own log segments and metadata); a round waits for the
//! slowest of a quorum's flushes, so the tail is what throughput sees.
//!
//! Layout: two files, `prepared.0` and `prepared.1`, zero-filled to their
//! capacity when created or grown, so an append overwrites blocks that are
//! already allocated and `fdatasync` writes data only, never file metadata.
//! Block 0 of a file is its header (magic, generation, checksum); records
//! follow back to back:
//!
//! ```text
//! magic u32 | len u32 | generation u64 | seq u64 | payload[len] | checksum [8]
//! ```
//!
//! The checksum (blake3 over everything before it) and the generation make a
//! torn append or a leftover record of an older generation end the scan: the
//! log is the longest valid prefix. Records of one sequence number replace
//! earlier ones (a later view's certificate).
//!
//! Compaction writes the live records into the other file under the next
//! generation, syncs, then writes that file's header and syncs again: until
//! the header is written the old file stays the newest valid one, so a crash
//! mid-compaction loses nothing.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use zz_wire::Seq;

const FILE_MAGIC: &[u8; 4] = b"ZZPJ";
const RECORD_MAGIC: u32 = 0x5a5a_5052;
const HEADER_SIZE: u64 = 4096;
const RECORD_OVERHEAD: u64 = 4 + 4 + 8 + 8 + 8;
/// Capacity of a new journal file; it grows (doubling) when the live records
/// do not fit in half of it.
const INITIAL_CAPACITY: u64 = 4 << 20;
static ZEROS: [u8; 64 * 1024] = [0; 64 * 1024];

/// Live records by sequence number (payloads).
pub type Records = BTreeMap<Seq, Vec<u8>>;

#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    #[error("journal {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
}

/// One journal file: its handle, capacity and (if valid) generation.
struct JournalFile {
    path: PathBuf,
    file: File,
    capacity: u64,
}

impl JournalFile {
    fn err(&self) -> impl Fn(io::Error) -> JournalError + '_ {
        move |source| JournalError::Io {
            path: self.path.clone(),
            source,
        }
    }

    fn open(path: PathBuf) -> Result<Option<JournalFile>, JournalError> {
        match OpenOptions::new().read(true).write(true).open(&path) {
            Ok(file) => {
                let capacity = file
                    .metadata()
                    .map_err(|source| JournalError::Io {
                        path: path.clone(),
                        source,
                    })?
                    .len();
                Ok(Some(JournalFile {
                    path,
                    file,
                    capacity,
                }))
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(JournalError::Io { path, source }),
        }
    }

    /// Creates (or truncates) the file, zero-filled to `capacity`, with no
    /// valid header, and makes its directory entry durable.
    fn create(path: PathBuf, capacity: u64) -> Result<JournalFile, JournalError> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .map_err(|source| JournalError::Io {
                path: path.clone(),
                source,
            })?;
        let mut f = JournalFile {
            path,
            file,
            capacity: 0,
        };
        f.grow_to(capacity)?;
        if let Some(dir) = f.path.parent() {
            File::open(dir)
                .and_then(|d| d.sync_all())
                .map_err(f.err())?;
        }
        Ok(f)
    }

    /// Zero-fills up to `capacity` and syncs, so later appends need no
    /// metadata writes.
    fn grow_to(&mut self, capacity: u64) -> Result<(), JournalError> {
        let mut at = self.capacity;
        while at < capacity {
            let n = (capacity - at).min(ZEROS.len() as u64);
            self.file
                .write_all_at(&ZEROS[..n as usize], at)
                .map_err(self.err())?;
            at += n;
        }
        self.file.sync_all().map_err(self.err())?;
        self.capacity = self.capacity.max(capacity);
        Ok(())
    }

    fn header(generation: u64) -> [u8; 24] {
        let mut h = [0u8; 24];
        h[..4].copy_from_slice(FILE_MAGIC);
        h[4..8].copy_from_slice(&1u32.to_le_bytes());
        h[8..16].copy_from_slice(&generation.to_le_bytes());
        let sum = blake3::hash(&h[..16]);
        h[16..24].copy_from_slice(&sum.as_bytes()[..8]);
        h
    }

    /// The generation in a valid header, or `None`.
    fn generation(&self) -> Result<Option<u64>, JournalError> {
        if self.capacity < HEADER_SIZE {
            return Ok(None);
        }
        let mut h = [0u8; 24];
        self.file.read_exact_at(&mut h, 0).map_err(self.err())?;
        let generation = u64::from_le_bytes(h[8..16].try_into().expect("8 bytes"));
        Ok((h == Self::header(generation) && generation > 0).then_some(generation))
    }

    /// The valid records of `generation`, in order, and where the next goes.
    fn scan(&self, generation: u64) -> Result<(Records, u64), JournalError> {
        let mut records = Records::new();
        let mut at = HEADER_SIZE;
        let mut head = [0u8; 24];
        while at + RECORD_OVERHEAD <= self.capacity {
            self.file.read_exact_at(&mut head, at).map_err(self.err())?;
            let magic = u32::from_le_bytes(head[0..4].try_into().expect("4 bytes"));
            let len = u64::from(u32::from_le_bytes(head[4..8].try_into().expect("4 bytes")));
            let gen = u64::from_le_bytes(head[8..16].try_into().expect("8 bytes"));
            let seq = u64::from_le_bytes(head[16..24].try_into().expect("8 bytes"));
            if magic != RECORD_MAGIC
                || gen != generation
                || at + RECORD_OVERHEAD + len > self.capacity
            {
                break;
            }
            let mut body = vec![0u8; (24 + len + 8) as usize];
            self.file.read_exact_at(&mut body, at).map_err(self.err())?;
            let (covered, sum) = body.split_at(24 + len as usize);
            if blake3::hash(covered).as_bytes()[..8] != *sum {
                break;
            }
            records.insert(seq, covered[24..].to_vec());
            at += RECORD_OVERHEAD + len;
        }
        Ok((records, at))
    }
}

fn encode_record(out: &mut Vec<u8>, generation: u64, seq: Seq, payload: &[u8]) {
    let start = out.len();
    out.extend_from_slice(&RECORD_MAGIC.to_le_bytes());
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    out.extend_from_slice(&generation.to_le_bytes());
    out.extend_from_slice(&seq.to_le_bytes());
    out.extend_from_slice(payload);
    let sum = blake3::hash(&out[start..]);
    out.extend_from_slice(&sum.as_bytes()[..8]);
}

/// The journal of one replica: live records (by sequence number) in memory,
/// appends buffered until [`PreparedJournal::sync`].
pub struct PreparedJournal {
    dir: PathBuf,
    files: [Option<JournalFile>; 2],
    active: usize,
    generation: u64,
    write_at: u64,
    live: BTreeMap<Seq, Vec<u8>>,
    live_bytes: u64,
    pending: Vec<u8>,
}

impl PreparedJournal {
    fn path(dir: &Path, i: usize) -> PathBuf {
        dir.join(format!("prepared.{i}"))
    }

    /// Opens the journal in `dir`, creating it if absent; returns it with the
    /// payloads of its live records.
    pub fn open(dir: &Path) -> Result<(Self, Records), JournalError> {
        let mut files = [
            JournalFile::open(Self::path(dir, 0))?,
            JournalFile::open(Self::path(dir, 1))?,
        ];
        let mut newest: Option<(usize, u64)> = None;
        for (i, f) in files.iter().enumerate() {
            if let Some(g) = f.as_ref().map(|f| f.generation()).transpose()?.flatten() {
                if newest.is_none_or(|(_, n)| g > n) {
                    newest = Some((i, g));
                }
            }
        }
        let (active, generation, live, write_at) = match newest {
            Some((i, g)) => {
                let f = files[i].as_ref().expect("has a header");
                let (records, at) = f.scan(g)?;
                (i, g, records, at)
            }
            None => {
                let f = JournalFile::create(Self::path(dir, 0), INITIAL_CAPACITY)?;
                let header = JournalFile::header(1);
                f.file.write_all_at(&header, 0).map_err(f.err())?;
                f.file.sync_data().map_err(f.err())?;
                files[0] = Some(f);
                (0, 1, BTreeMap::new(), HEADER_SIZE)
            }
        };
        let live_bytes = live
            .values()
            .map(|p| p.len() as u64 + RECORD_OVERHEAD)
            .sum();
        let journal = PreparedJournal {
            dir: dir.to_path_buf(),
            files,
            active,
            generation,
            write_at,
            live: live.clone(),
            live_bytes,
            pending: Vec::new(),
        };
        Ok((journal, live))
    }

    /// Records `payload` for `seq` (replacing an earlier one); durable after
    /// the next [`PreparedJournal::sync`].
    pub fn append(&mut self, seq: Seq, payload: Vec<u8>) {
        encode_record(&mut self.pending, self.generation, seq, &payload);
        self.live_bytes += payload.len() as u64 + RECORD_OVERHEAD;
        if let Some(old) = self.live.insert(seq, payload) {
            self.live_bytes -= old.len() as u64 + RECORD_OVERHEAD;
        }
    }

    /// Drops the records at or below `seq` (a stable checkpoint covers them);
    /// compacts at the next sync if the file is more than half used.
    pub fn forget_upto(&mut self, seq: Seq) {
        let keep = self.live.split_off(&(seq + 1));
        for p in self.live.values() {
            self.live_bytes -= p.len() as u64 + RECORD_OVERHEAD;
        }
        self.live = keep;
    }

    fn capacity(&self) -> u64 {
        self.files[self.active].as_ref().map_or(0, |f| f.capacity)
    }

    /// Makes every append so far durable.
    pub fn sync(&mut self) -> Result<(), JournalError> {
        let end = self.write_at + self.pending.len() as u64;
        if end > self.capacity()
            || (self.write_at > self.capacity() / 2
                && self.live_bytes < (self.write_at - HEADER_SIZE) / 2)
        {
            return self.compact();
        }
        if self.pending.is_empty() {
            return Ok(());
        }
        let f = self.files[self.active].as_ref().expect("active file");
        f.file
            .write_all_at(&self.pending, self.write_at)
            .map_err(f.err())?;
        f.file.sync_data().map_err(f.err())?;
        self.write_at = end;
        self.pending.clear();
        Ok(())
    }

    /// Rewrites the live records into the other file under the next
    /// generation (see the module doc for why this is crash safe).
    fn compact(&mut self) -> Result<(), JournalError> {
        let next = 1 - self.active;
        let generation = self.generation + 1;
        let mut body = Vec::with_capacity(self.live_bytes as usize);
        for (seq, payload) in &self.live {
            encode_record(&mut body, generation, *seq, payload);
        }
        let needed = HEADER_SIZE + body.len() as u64;
        let mut capacity = self.capacity().max(INITIAL_CAPACITY);
        while needed > capacity / 2 {
            capacity *= 2;
        }
        let path = Self::path(&self.dir, next);
        let mut f = match self.files[next].take() {
            Some(f) => f,
            None => JournalFile::create(path, capacity)?,
        };
        if f.capacity < capacity {
            f.grow_to(capacity)?;
        }
        f.file.write_all_at(&body, HEADER_SIZE).map_err(f.err())?;
        f.file.sync_data().map_err(f.err())?;
        f.file
            .write_all_at(&JournalFile::header(generation), 0)
            .map_err(f.err())?;
        f.file.sync_data().map_err(f.err())?;
        self.files[next] = Some(f);
        self.active = next;
        self.generation = generation;
        self.write_at = needed;
        self.pending.clear();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn payload(seq: Seq, len: usize) -> Vec<u8> {
        (0..len).map(|i| (seq as usize + i) as u8).collect()
    }

    #[test]
    fn records_survive_reopen_and_later_ones_replace_earlier() {
        let dir = tempfile::tempdir().unwrap();
        {
            let (mut j, live) = PreparedJournal::open(dir.path()).unwrap();
            assert!(live.is_empty());
            j.append(1, payload(1, 100));
            j.append(2, payload(2, 100));
            j.sync().unwrap();
            j.append(2, payload(7, 50));
            j.sync().unwrap();
        }
        let (_, live) = PreparedJournal::open(dir.path()).unwrap();
        assert_eq!(live.len(), 2);
        assert_eq!(live[&1], payload(1, 100));
        assert_eq!(live[&2], payload(7, 50));
    }

    #[test]
    fn appends_not_synced_are_not_durable_and_a_torn_tail_ends_the_log() {
        let dir = tempfile::tempdir().unwrap();
        let (mut j, _) = PreparedJournal::open(dir.path()).unwrap();
        j.append(1, payload(1, 300));
        j.sync().unwrap();
        let torn_at = j.write_at;
        j.append(2, payload(2, 300));
        j.sync().unwrap();
        j.append(3, payload(3, 300));
        drop(j);
        // Tear record 2: keep its head, zero its last bytes.
        let f = OpenOptions::new()
            .write(true)
            .open(dir.path().join("prepared.0"))
            .unwrap();
        f.write_all_at(&[0u8; 20], torn_at + 300).unwrap();
        let (j, live) = PreparedJournal::open(dir.path()).unwrap();
        assert_eq!(live.keys().copied().collect::<Vec<_>>(), vec![1]);
        assert_eq!(
            j.write_at, torn_at,
            "the next append overwrites the torn record"
        );
    }

    #[test]
    fn compaction_keeps_exactly_the_live_records_across_generations_and_growth() {
        let dir = tempfile::tempdir().unwrap();
        let (mut j, _) = PreparedJournal::open(dir.path()).unwrap();
        let mut model = BTreeMap::new();
        // Far more than the initial capacity, with a sliding stable point and
        // some records bigger than a whole initial file.
        for seq in 1..=3000u64 {
            let len = if seq % 997 == 0 {
                5 << 20
            } else {
                1000 + (seq as usize % 3000)
            };
            j.append(seq, payload(seq, len));
            model.insert(seq, payload(seq, len));
            if seq % 64 == 0 {
                let stable = seq.saturating_sub(100);
                j.forget_upto(stable);
                model.retain(|k, _| *k > stable);
            }
            j.sync().unwrap();
        }
        assert!(j.generation > 2, "compacted several times");
        let (_, live) = PreparedJournal::open(dir.path()).unwrap();
        // Reopening returns what was live, possibly with records the stable
        // point already covered (the storage filters those by its stable seq).
        let reopened: BTreeMap<_, _> = live
            .into_iter()
            .filter(|(k, _)| model.contains_key(k))
            .collect();
        assert_eq!(reopened, model);
    }

    #[test]
    fn a_compaction_cut_before_its_header_leaves_the_old_generation() {
        let dir = tempfile::tempdir().unwrap();
        let (mut j, _) = PreparedJournal::open(dir.path()).unwrap();
        j.append(5, payload(5, 64));
        j.sync().unwrap();
        // What a compaction writes before its header: records of the next
        // generation in the other file.
        let mut body = Vec::new();
        encode_record(&mut body, 2, 9, &payload(9, 64));
        let other = JournalFile::create(dir.path().join("prepared.1"), INITIAL_CAPACITY).unwrap();
        other.file.write_all_at(&body, HEADER_SIZE).unwrap();
        drop((j, other));
        let (j, live) = PreparedJournal::open(dir.path()).unwrap();
        assert_eq!(j.generation, 1);
        assert_eq!(live.keys().copied().collect::<Vec<_>>(), vec![5]);
    }

    #[test]
    fn garbage_files_give_an_empty_journal_not_a_panic() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("prepared.0"), b"not a journal").unwrap();
        std::fs::write(dir.path().join("prepared.1"), vec![0xff; 9000]).unwrap();
        let (mut j, live) = PreparedJournal::open(dir.path()).unwrap();
        assert!(live.is_empty());
        j.append(1, payload(1, 10));
        j.sync().unwrap();
        let (_, live) = PreparedJournal::open(dir.path()).unwrap();
        assert_eq!(live.len(), 1);
    }
}
