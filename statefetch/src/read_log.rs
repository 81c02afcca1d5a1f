//! Which pages the current state has read since each retained checkpoint.
//!
//! A replica woken to recover from checkpoint C replays the orders after C,
//! and those orders read the same pages on every correct replica (execution
//! is deterministic). Its peers executed them already, so they know that
//! set: a recovering replica asks for it ([`crate::Request::ReadHint`]) and
//! prefetches those pages of C in a few large requests before its replay
//! needs them, instead of fetching them one read at a time.
//!
//! The log is a hint, never trusted: every page is still verified against
//! the certified root, so a wrong hint costs fetches, not correctness. It is
//! kept in memory only, bounded per interval and in the number of intervals.

use std::collections::{HashSet, VecDeque};
use zz_wire::Seq;

/// Distinct pages recorded per interval between checkpoints.
pub const MAX_INTERVAL_PAGES: usize = 16 * 1024;
/// Intervals kept (the newest), besides the current one.
pub const MAX_INTERVALS: usize = 8;

/// Pages read per checkpoint interval, each in the order of first read.
#[derive(Debug, Default)]
pub struct ReadLog {
    /// The checkpoint the current interval follows (`None`: before any).
    since: Option<Seq>,
    current: Vec<u64>,
    seen: HashSet<u64>,
    /// Closed intervals `(checkpoint they follow, pages)`, oldest first.
    closed: VecDeque<(Seq, Vec<u64>)>,
}

impl ReadLog {
    /// A log whose current interval follows checkpoint `since`.
    pub fn new(since: Option<Seq>) -> ReadLog {
        ReadLog {
            since,
            ..ReadLog::default()
        }
    }

    /// Notes a read of page `index`.
    pub fn record(&mut self, index: u64) {
        if self.current.len() < MAX_INTERVAL_PAGES && self.seen.insert(index) {
            self.current.push(index);
        }
    }

    /// Checkpoint `seq` was taken: the current interval closes.
    pub fn checkpoint(&mut self, seq: Seq) {
        if let Some(since) = self.since {
            self.closed
                .push_back((since, std::mem::take(&mut self.current)));
            if self.closed.len() > MAX_INTERVALS {
                self.closed.pop_front();
            }
        } else {
            self.current.clear();
        }
        self.seen.clear();
        self.since = Some(seq);
    }

    /// The pages read since checkpoint `seq`, in order of first read, at
    /// most `max`; `None` if the log does not reach back to `seq` (no
    /// interval starts there).
    pub fn since(&self, seq: Seq, max: usize) -> Option<Vec<u64>> {
        let first = match self.closed.iter().position(|(s, _)| *s == seq) {
            Some(i) => i,
            None if self.since == Some(seq) => self.closed.len(),
            None => return None,
        };
        let mut seen = HashSet::new();
        let pages = self
            .closed
            .iter()
            .skip(first)
            .flat_map(|(_, pages)| pages.iter())
            .chain(self.current.iter())
            .copied()
            .filter(|p| seen.insert(*p))
            .take(max)
            .collect();
        Some(pages)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_since_a_checkpoint_span_its_later_intervals_in_first_read_order() {
        let mut log = ReadLog::new(None);
        log.record(9);
        assert_eq!(log.since(1, 10), None, "no checkpoint yet");
        log.checkpoint(1);
        log.record(3);
        log.record(1);
        log.record(3);
        log.checkpoint(2);
        log.record(1);
        log.record(7);
        assert_eq!(log.since(1, 10), Some(vec![3, 1, 7]));
        assert_eq!(log.since(2, 10), Some(vec![1, 7]));
        assert_eq!(log.since(1, 2), Some(vec![3, 1]));
        assert_eq!(log.since(5, 10), None, "unknown checkpoint");
        log.checkpoint(3);
        assert_eq!(log.since(3, 10), Some(vec![]));
    }

    #[test]
    fn memory_is_bounded() {
        let mut log = ReadLog::new(Some(0));
        for c in 1..=(MAX_INTERVALS as u64 + 3) {
            for p in 0..(MAX_INTERVAL_PAGES as u64 + 10) {
                log.record(p);
            }
            log.checkpoint(c);
        }
        assert_eq!(log.closed.len(), MAX_INTERVALS);
        assert!(log
            .closed
            .iter()
            .all(|(_, pages)| pages.len() == MAX_INTERVAL_PAGES));
        assert_eq!(log.since(0, usize::MAX), None, "oldest interval dropped");
        assert!(log.since(4, usize::MAX).is_some());
    }
}
