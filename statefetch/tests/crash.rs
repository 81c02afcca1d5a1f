//! Crash safety: a child process (this test binary, re-executed) writes and
//! checkpoints in a loop; the parent SIGKILLs it at random points inside
//! `checkpoint`. After each kill the store must open, every retained
//! checkpoint's pages must hash to its recorded root, and the last
//! checkpoint the child reported complete must be there with its root.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use zz_statefetch::bench::distinct_indices;
use zz_statefetch::{MerkleTree, PageStore, StoreConfig};

const CHILD_ENV: &str = "ZZ_STATEFETCH_CRASH_CHILD";
const PAGES: u64 = 1024;
const DIRTY: u64 = 500;

fn open(dir: &str) -> PageStore {
    PageStore::open(
        dir,
        StoreConfig {
            max_checkpoints: 3,
            ..Default::default()
        },
    )
    .unwrap()
}

/// The child's body; a no-op unless started by the parent test.
#[test]
fn crash_child() {
    let Ok(dir) = std::env::var(CHILD_ENV) else {
        return;
    };
    let store = open(&dir);
    let mut seq = store.latest_checkpoint().unwrap().map_or(0, |c| c.seq);
    if seq % 2 == 1 {
        // Sometimes restart from the checkpoint, as an executor replaying
        // the log would; otherwise carry on with the surviving writes.
        store.rollback_to_latest().unwrap();
    }
    if store.num_pages().unwrap() < PAGES {
        common::fill(&store, 0..PAGES, 0);
    }
    let mut out = std::io::stdout();
    loop {
        seq += 1;
        let idx = distinct_indices(seq, PAGES, DIRTY);
        let pages: Vec<Vec<u8>> = idx.iter().map(|&i| common::page(i, seq)).collect();
        store
            .write_pages(idx.iter().copied().zip(pages.iter().map(|p| p.as_slice())))
            .unwrap();
        writeln!(out, "BEGIN {seq}").unwrap();
        out.flush().unwrap();
        let t = Instant::now();
        let root = store.checkpoint(seq).unwrap();
        writeln!(out, "DONE {seq} {root} {}", t.elapsed().as_micros()).unwrap();
        out.flush().unwrap();
    }
}

#[test]
fn sigkill_during_checkpoint_leaves_a_consistent_store() {
    let dir = tempfile::tempdir().unwrap();
    let dir_s = dir.path().join("store").to_string_lossy().into_owned();
    let exe = std::env::current_exe().unwrap();
    let mut last_done: Option<(u64, String)> = None;
    let mut mid_checkpoint_kills = 0;
    let mut survived_unreported = 0;
    let mut rng = 0x1234_5678u64;
    // At least 8 rounds, and more (up to 40) until some kill has landed
    // inside a checkpoint: whether one does is a matter of timing.
    let mut rounds = 0u64;
    while rounds < 8 || (mid_checkpoint_kills == 0 && rounds < 40) {
        let round = rounds;
        rounds += 1;
        let mut child = Command::new(&exe)
            .args(["crash_child", "--exact", "--nocapture", "--test-threads=1"])
            .env(CHILD_ENV, &dir_s)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let target_done = 2 + round % 3;
        let mut dones = 0;
        let mut last_us = 2000u64;
        let mut killed_in = None;
        while let Some(Ok(line)) = lines.next() {
            let f: Vec<&str> = line.split_whitespace().collect();
            match f.as_slice() {
                ["DONE", seq, root, us] => {
                    last_done = Some((seq.parse().unwrap(), root.to_string()));
                    last_us = us.parse().unwrap();
                    dones += 1;
                }
                ["BEGIN", seq] if dones >= target_done => {
                    // Kill somewhere inside this checkpoint (its duration is
                    // about that of the previous one).
                    rng = rng
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    let delay = (rng >> 33) % last_us.max(1);
                    std::thread::sleep(Duration::from_micros(delay));
                    child.kill().unwrap(); // SIGKILL
                    killed_in = Some(seq.parse::<u64>().unwrap());
                    break;
                }
                _ => {}
            }
        }
        child.wait().unwrap();
        let killed_in = killed_in.expect("child ended before being killed");
        // Did the checkpoint finish before the kill landed?
        let finished = lines.any(|l| l.is_ok_and(|l| l.starts_with(&format!("DONE {killed_in} "))));
        if !finished {
            mid_checkpoint_kills += 1;
        }

        let store = open(&dir_s);
        store.verify_integrity().unwrap();
        let (done_seq, done_root) = last_done.clone().unwrap();
        let latest = store.latest_checkpoint().unwrap().unwrap();
        assert!(
            latest.seq == done_seq || latest.seq == killed_in,
            "latest {} done {done_seq}",
            latest.seq
        );
        if latest.seq == killed_in && !finished {
            survived_unreported += 1;
        }
        let info = store.checkpoint_info(done_seq).unwrap();
        assert_eq!(info.root.to_string(), done_root);
        let pages: Vec<Vec<u8>> = (0..info.num_pages)
            .map(|i| store.read_page_at(done_seq, i).unwrap())
            .collect();
        assert_eq!(MerkleTree::from_pages(&pages).root(), info.root);
        drop(store);
    }
    eprintln!(
        "{mid_checkpoint_kills} of {rounds} kills landed before the checkpoint returned; \
         {survived_unreported} of those left the new checkpoint complete on disk"
    );
    assert!(
        mid_checkpoint_kills >= 1,
        "no kill landed inside a checkpoint"
    );
}
