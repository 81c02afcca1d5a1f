//! Safety and linearizability checks for simulated runs.
//!
//! - Agreement, checked at every commit: no two correct replicas commit
//!   different batches at one sequence number.
//! - Acknowledgement, checked at every accepted reply: a request a client
//!   accepted is in the committed log.
//! - Linearizability, checked at the end: replaying the committed log through
//!   a reference service gives exactly the results clients accepted, and the
//!   log order respects real time (an op that completed before another was
//!   invoked comes first).

use std::collections::{BTreeMap, HashMap};

use zz_agreement::app::{new_app, Service};
use zz_wire::message::Batch;
use zz_wire::{ClientId, Digest, ReplicaId, Seq};

/// A property the run violated; its message names the seed.
#[derive(Debug, Clone)]
pub struct Violation {
    pub seed: u64,
    pub message: String,
}

impl std::fmt::Display for Violation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ZZ_SEED={} violation: {}", self.seed, self.message)
    }
}

/// A result a client accepted.
#[derive(Debug, Clone)]
pub struct Ack {
    pub client: ClientId,
    pub req_id: u64,
    pub op: Vec<u8>,
    pub result: Vec<u8>,
    pub invoked_ms: u64,
    pub completed_ms: u64,
}

/// A request's result and its position (seq, index in batch) in the log.
type Expected = (Vec<u8>, (Seq, usize));

pub struct Checker {
    seed: u64,
    /// seq -> (digest, first replica to commit it, batch)
    log: BTreeMap<Seq, (Digest, ReplicaId, Batch)>,
    /// (client, req_id) -> first seq whose batch holds it
    index: HashMap<(ClientId, u64), Seq>,
    acks: Vec<Ack>,
}

impl Checker {
    pub fn new(seed: u64) -> Self {
        Checker {
            seed,
            log: BTreeMap::new(),
            index: HashMap::new(),
            acks: Vec::new(),
        }
    }

    pub fn violation(&self, message: String) -> Violation {
        Violation {
            seed: self.seed,
            message,
        }
    }

    pub fn acked(&self) -> usize {
        self.acks.len()
    }

    pub fn committed_len(&self) -> u64 {
        self.log.len() as u64
    }

    /// A correct replica committed `batch` at `seq`.
    pub fn committed(
        &mut self,
        r: ReplicaId,
        seq: Seq,
        digest: Digest,
        batch: Batch,
    ) -> Result<(), Violation> {
        if let Some((d, first, _)) = self.log.get(&seq) {
            if *d != digest {
                return Err(self.violation(format!(
                    "agreement: replica {first} committed {d:?} at seq {seq} but replica {r} committed {digest:?}"
                )));
            }
            return Ok(());
        }
        for req in &batch.requests {
            self.index
                .entry((req.request.client, req.request.req_id))
                .or_insert(seq);
        }
        self.log.insert(seq, (digest, r, batch));
        Ok(())
    }

    pub fn acknowledged(&mut self, ack: Ack) -> Result<(), Violation> {
        if !self.index.contains_key(&(ack.client, ack.req_id)) {
            return Err(self.violation(format!(
                "client {} accepted a reply to request {} that no correct replica committed",
                ack.client, ack.req_id
            )));
        }
        self.acks.push(ack);
        Ok(())
    }

    /// Replays the committed log and checks every accepted result and the
    /// real-time order of accepted operations.
    pub fn final_check(&self) -> Result<(), Violation> {
        // (client, req_id) -> (result, position in the log)
        let mut expected: HashMap<(ClientId, u64), Expected> = HashMap::new();
        let mut svc = Service::new(vec![(0, new_app("counter").expect("built-in"))]);
        let mut prev = 0;
        for (seq, (_, _, batch)) in &self.log {
            if *seq != prev + 1 {
                return Err(self.violation(format!("committed log has a gap before seq {seq}")));
            }
            prev = *seq;
            for (i, req) in batch.requests.iter().enumerate() {
                let r = &req.request;
                if let Some(res) = svc.execute(r.client, r.req_id, r.app, &r.op) {
                    expected
                        .entry((r.client, r.req_id))
                        .or_insert((res, (*seq, i)));
                }
            }
        }
        for a in &self.acks {
            let Some((res, _)) = expected.get(&(a.client, a.req_id)) else {
                return Err(self.violation(format!(
                    "accepted request {}/{} never executed",
                    a.client, a.req_id
                )));
            };
            if *res != a.result {
                return Err(self.violation(format!(
                    "client {} accepted result {:?} for request {} but the committed log gives {:?}",
                    a.client, a.result, a.req_id, res
                )));
            }
        }
        // Real-time order: sort by completion; any op invoked after another
        // completed must sit later in the log.
        let mut by_completion: Vec<&Ack> = self.acks.iter().collect();
        by_completion.sort_by_key(|a| a.completed_ms);
        for a in &self.acks {
            let pa = expected[&(a.client, a.req_id)].1;
            for b in &by_completion {
                if b.completed_ms >= a.invoked_ms {
                    break;
                }
                let pb = expected[&(b.client, b.req_id)].1;
                if pb >= pa {
                    return Err(self.violation(format!(
                        "linearizability: {}/{} completed before {}/{} was invoked but is ordered after it",
                        b.client, b.req_id, a.client, a.req_id
                    )));
                }
            }
        }
        Ok(())
    }
}
