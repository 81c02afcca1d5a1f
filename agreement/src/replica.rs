//! The sans-IO PBFT replica.
//!
//! Inputs: [`Replica::step`] (an authenticated peer message),
//! [`Replica::on_request`] (a client request), [`Replica::tick`] (time).
//! Outputs: [`Replica::ready`] returns a [`Ready`] with messages to send, ops to
//! persist (durably, *before* those messages leave), replies for clients, and
//! the batches committed in sequence order (the seam where Orders to
//! execution replicas will go).
//!
//! The replica never reads a clock, a socket or a disk, so a simulator can run
//! many of them in one process, deterministically.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};

use zz_wire::config::{AgreementTuning, ReplicaKeys};
use zz_wire::message::{
    Batch, Checkpoint, CheckpointCert, ClientRequest, Commit, CommittedEntry, NewView, PeerMessage,
    PrePrepare, Prepare, PreparedCert, Reply, Signed, StateTransfer, Status, ViewChange,
};
use zz_wire::{ClientId, Digest, ReplicaId, Seq, View};

use crate::app::{state_digest, Service};
use crate::execution::{verify_reconfigure, ExecTable, Monitor};
use crate::persist::{PersistOp, PersistentState};
use crate::viewchange::{
    compute_new_view_log, primary_of, verify_checkpoint_cert, verify_view_change, InvalidEvidence,
};
use ed25519_dalek::VerifyingKey;
use zz_wire::exec::{Evidence, ExecId, ExecMessage, HostCommand, Order, Reconfigure, Suspect};
use zz_wire::AppId;

/// Why an input was rejected. Rejections are counted by the driver and never
/// change the replica's state.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Rejected {
    #[error("sender {from} claims to be replica {claimed}")]
    WrongSender { from: ReplicaId, claimed: ReplicaId },
    #[error("unknown replica {0}")]
    UnknownReplica(ReplicaId),
    #[error("bad signature on {0}")]
    BadSignature(&'static str),
    #[error("{0} for view {1}, not the current view")]
    WrongView(&'static str, View),
    #[error("sequence number {0} is outside the window")]
    OutOfWindow(Seq),
    #[error("pre-prepare from a replica that is not the primary")]
    NotPrimary,
    #[error("batch does not match its digest")]
    DigestMismatch,
    #[error("request from client {0} fails authentication")]
    BadRequestAuth(ClientId),
    #[error("conflicting pre-prepare for seq {0}")]
    Equivocation(Seq),
    #[error("invalid evidence: {0}")]
    Evidence(#[from] InvalidEvidence),
    #[error("new view does not match the view changes it carries")]
    BadNewView,
    #[error("state snapshot does not match its certificate")]
    BadSnapshot,
    #[error("checkpoint at {0} is not a multiple of the checkpoint interval")]
    BadCheckpointSeq(Seq),
    #[error("reconfiguration: {0}")]
    BadReconfigure(#[from] crate::execution::BadReconfigure),
    #[error("message from execution replica {0} is not valid for it")]
    BadExecMessage(ExecId),
    #[error("execution checkpoint: {0}")]
    BadExecCheckpoint(#[from] crate::execution::CheckpointError),
}

/// Where a peer message goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Target {
    /// Every other replica.
    All,
    Replica(ReplicaId),
}

/// A batch committed at `seq`, handed out in sequence order.
#[derive(Clone, Debug, PartialEq)]
pub struct CommittedBatch {
    pub seq: Seq,
    pub digest: Digest,
    pub batch: Batch,
}

/// The outputs accumulated since the last call to [`Replica::ready`].
#[derive(Debug, Default)]
pub struct Ready {
    /// Must be durable before any message below is sent.
    pub persist: Vec<PersistOp>,
    pub messages: Vec<(Target, PeerMessage)>,
    pub replies: Vec<Reply>,
    pub committed: Vec<CommittedBatch>,
    /// Orders and stable checkpoints for execution replicas.
    pub exec: Vec<(ExecId, ExecMessage)>,
    /// Signed commands for the host agents of execution replicas.
    pub host_commands: Vec<Signed<HostCommand>>,
}

impl Ready {
    pub fn is_empty(&self) -> bool {
        self.persist.is_empty()
            && self.messages.is_empty()
            && self.replies.is_empty()
            && self.committed.is_empty()
            && self.exec.is_empty()
            && self.host_commands.is_empty()
    }
}

/// Counters exported as metrics.
#[derive(Clone, Debug, Default)]
pub struct ReplicaMetrics {
    pub requests_accepted: u64,
    pub requests_executed: u64,
    /// Client requests committed in the log (for any app, local or remote).
    pub requests_ordered: u64,
    pub batches_committed: u64,
    pub view_changes: u64,
    pub new_views: u64,
    pub state_transfers: u64,
    pub checkpoints_stable: u64,
    pub rejected: u64,
    pub orders_sent: u64,
    pub suspicions: u64,
    pub reconfigurations: u64,
}

/// Everything a replica is configured with.
#[derive(Clone, Debug)]
pub struct ReplicaOptions {
    pub n: usize,
    pub f: usize,
    pub tuning: AgreementTuning,
    /// Batches in flight (pre-prepared, not yet executed) before the primary
    /// waits to fill the next batch; larger batches amortize signatures.
    pub max_inflight_batches: u64,
    /// Apps run by execution replicas, with each replica's public key
    /// (index `i` is execution replica `i`, `0..2f+1`).
    pub remote_apps: BTreeMap<AppId, Vec<VerifyingKey>>,
    /// Floor of the adaptive execution timeout.
    pub exec_timeout_min_ms: u64,
    /// Every app starts with all 2f+1 execution replicas active
    /// (`execution.all_active`), instead of f+1.
    pub exec_all_active: bool,
}

impl ReplicaOptions {
    pub fn new(n: usize, f: usize, tuning: AgreementTuning) -> Self {
        ReplicaOptions {
            n,
            f,
            tuning,
            max_inflight_batches: 4,
            remote_apps: BTreeMap::new(),
            exec_timeout_min_ms: 200,
            exec_all_active: false,
        }
    }
}

#[derive(Debug, Default)]
struct Slot {
    pre_prepare: Option<(Signed<PrePrepare>, Batch)>,
    prepares: BTreeMap<ReplicaId, Signed<Prepare>>,
    commits: BTreeMap<ReplicaId, Digest>,
    prepared: bool,
    committed: bool,
    created_ms: u64,
}

/// Catch-up votes for one sequence number: which replica vouched for which batch.
#[derive(Debug, Default)]
struct CatchUpVotes {
    votes: BTreeMap<ReplicaId, Digest>,
    batches: HashMap<Digest, Batch>,
}

pub struct Replica {
    id: ReplicaId,
    n: usize,
    f: usize,
    opts: ReplicaOptions,
    keys: ReplicaKeys,
    commit_quorum: usize,

    view: View,
    view_active: bool,
    now_ms: u64,

    slots: BTreeMap<Seq, Slot>,
    next_seq: Seq,
    last_executed: Seq,
    /// Executed batches above the stable checkpoint: replayed to lagging peers.
    executed: BTreeMap<Seq, (Digest, Batch)>,
    prepared_certs: BTreeMap<Seq, PreparedCert>,

    stable: CheckpointCert,
    stable_snapshot: Vec<u8>,
    own_checkpoints: BTreeMap<Seq, (Digest, Vec<u8>)>,
    checkpoint_votes: BTreeMap<Seq, BTreeMap<ReplicaId, Signed<Checkpoint>>>,

    /// At most one request per client (clients issue one at a time), so a
    /// faulty client cannot grow this without bound.
    pending: HashMap<ClientId, ClientRequest>,
    /// Requests the primary has not yet put in a batch, with arrival time.
    unproposed: VecDeque<((ClientId, u64), u64)>,
    progress_deadline: Option<u64>,

    view_changes: BTreeMap<View, BTreeMap<ReplicaId, Signed<ViewChange>>>,
    last_new_view: Option<Signed<NewView>>,
    vc_deadline: Option<u64>,
    vc_attempts: u32,

    catch_up: BTreeMap<Seq, CatchUpVotes>,
    from_peers: BTreeMap<Seq, Batch>,
    last_status_ms: u64,

    service: Service,
    monitors: BTreeMap<AppId, Monitor>,
    /// The durable (view, floor): in `view` we may have voted up to `floor`.
    vote_floor: Option<(View, Seq)>,
    /// After a restart: in this view, no votes up to this sequence number.
    abstain: Option<(View, Seq)>,
    /// Reconfigurations this primary already put in a batch in this view.
    proposed_reconfigs: BTreeSet<(AppId, u64)>,
    /// Per app, the epoch this replica last signed an operator wake for: a
    /// replayed `activate` costs a signature check, never a new suspect.
    operator_wakes: BTreeMap<AppId, u64>,
    ready: Ready,
    metrics: ReplicaMetrics,
}

impl Replica {
    /// A replica starting from the initial state.
    pub fn new(opts: ReplicaOptions, keys: ReplicaKeys, service: Service) -> Self {
        Self::restore(
            opts,
            keys,
            service,
            PersistentState {
                view_active: true,
                ..Default::default()
            },
        )
    }

    /// A replica resuming from durable state after a restart.
    pub fn restore(
        opts: ReplicaOptions,
        keys: ReplicaKeys,
        mut service: Service,
        persisted: PersistentState,
    ) -> Self {
        let remote: Vec<AppId> = opts.remote_apps.keys().copied().collect();
        service.exec = ExecTable::new(&remote, opts.f);
        if opts.exec_all_active {
            service.exec.activate_all();
        }
        let (stable, stable_snapshot) = match persisted.stable {
            Some((cert, snap)) if service.restore(&snap).is_ok() => (cert, snap),
            _ => (
                CheckpointCert {
                    seq: 0,
                    state: Digest::ZERO,
                    proofs: vec![],
                },
                service.snapshot(),
            ),
        };
        let mut r = Replica {
            id: keys.me,
            n: opts.n,
            f: opts.f,
            commit_quorum: 2 * opts.f + 1,
            keys,
            view: persisted.view,
            view_active: persisted.view_active,
            now_ms: 0,
            slots: BTreeMap::new(),
            next_seq: stable.seq + 1,
            last_executed: stable.seq,
            executed: BTreeMap::new(),
            prepared_certs: persisted
                .prepared
                .into_iter()
                .filter(|(s, _)| *s > stable.seq)
                .collect(),
            own_checkpoints: BTreeMap::from([(
                stable.seq,
                (stable.state, stable_snapshot.clone()),
            )]),
            stable,
            stable_snapshot,
            checkpoint_votes: BTreeMap::new(),
            pending: HashMap::new(),
            unproposed: VecDeque::new(),
            progress_deadline: None,
            view_changes: BTreeMap::new(),
            last_new_view: None,
            vc_deadline: None,
            vc_attempts: 0,
            catch_up: BTreeMap::new(),
            from_peers: BTreeMap::new(),
            last_status_ms: 0,
            service,
            monitors: remote.iter().map(|a| (*a, Monitor::default())).collect(),
            proposed_reconfigs: BTreeSet::new(),
            operator_wakes: BTreeMap::new(),
            vote_floor: None,
            abstain: None,
            ready: Ready::default(),
            metrics: ReplicaMetrics::default(),
            opts,
        };
        if r.stable.seq == 0 {
            // The genesis state needs no certificate; its digest is computed locally.
            r.stable.state = state_digest(&r.stable_snapshot);
            r.own_checkpoints = BTreeMap::from([(0, (r.stable.state, r.stable_snapshot.clone()))]);
        }
        if let Some((view, floor)) = persisted.vote_floor {
            if view == r.view {
                // We may have voted up to `floor` in this view and forgotten
                // what: abstain there, and never reuse those numbers as primary.
                r.abstain = Some((view, floor));
                r.next_seq = r.next_seq.max(floor + 1);
            }
            r.vote_floor = Some((view, floor));
        }
        if !r.view_active {
            r.vc_deadline = Some(0);
        }
        r
    }

    pub fn id(&self) -> ReplicaId {
        self.id
    }
    pub fn view(&self) -> View {
        self.view
    }
    pub fn view_active(&self) -> bool {
        self.view_active
    }
    pub fn primary(&self) -> ReplicaId {
        primary_of(self.view, self.n)
    }
    pub fn is_primary(&self) -> bool {
        self.primary() == self.id
    }
    pub fn last_executed(&self) -> Seq {
        self.last_executed
    }
    pub fn stable_seq(&self) -> Seq {
        self.stable.seq
    }
    pub fn metrics(&self) -> &ReplicaMetrics {
        &self.metrics
    }
    /// Diagnostics of the execution monitor of a remote app.
    pub fn monitor_summary(&self, app: AppId) -> Option<String> {
        self.monitors.get(&app).map(Monitor::summary)
    }

    /// The replicated execution state of a remote app.
    pub fn exec_state(&self, app: AppId) -> Option<&crate::execution::AppExecState> {
        self.service.exec.apps.get(&app)
    }
    /// The replicated execution table (every remote app).
    pub fn exec_table(&self) -> &crate::execution::ExecTable {
        &self.service.exec
    }
    pub fn pending_requests(&self) -> usize {
        self.pending.len()
    }
    /// Digest of the current service state (for tests comparing replicas).
    pub fn state_digest(&self) -> Digest {
        state_digest(&self.service.snapshot())
    }

    /// Test-only: commit on `quorum` matching commits instead of 2f+1, to show
    /// that the simulator catches a broken rule.
    #[cfg(feature = "testing")]
    pub fn break_commit_quorum(&mut self, quorum: usize) {
        self.commit_quorum = quorum;
    }

    fn quorum(&self) -> usize {
        2 * self.f + 1
    }

    fn high_watermark(&self) -> Seq {
        self.stable.seq + self.opts.tuning.window
    }

    fn in_window(&self, seq: Seq) -> bool {
        seq > self.stable.seq && seq <= self.high_watermark()
    }

    fn send(&mut self, to: Target, msg: PeerMessage) {
        self.ready.messages.push((to, msg));
    }

    fn persist(&mut self, op: PersistOp) {
        self.ready.persist.push(op);
    }

    fn timeout_ms(&self) -> u64 {
        self.opts.tuning.view_change_timeout_ms
    }

    /// Takes the outputs accumulated so far. The primary cuts batches here, so
    /// everything that arrived since the last call can share one batch.
    pub fn ready(&mut self) -> Ready {
        self.propose_batches();
        std::mem::take(&mut self.ready)
    }

    // ---------------------------------------------------------------- clients

    /// A request received directly from a client.
    pub fn on_request(&mut self, req: ClientRequest) -> Result<(), Rejected> {
        let r = &req.request;
        let key = self
            .keys
            .client_mac
            .get(&r.client)
            .ok_or(Rejected::BadRequestAuth(r.client))?;
        if !req.verify_for(self.id, key) {
            return Err(Rejected::BadRequestAuth(r.client));
        }
        if let Some(last) = self.service.replies.get(&r.client) {
            if r.req_id == last.req_id {
                // A retransmission: the client missed our reply.
                let reply = Reply::new(
                    self.view,
                    self.id,
                    r.client,
                    r.req_id,
                    last.result.clone(),
                    key,
                );
                self.ready.replies.push(reply);
                return Ok(());
            }
            if r.req_id < last.req_id {
                return Ok(());
            }
        }
        if let Some(p) = self.pending.get(&r.client) {
            if p.request.req_id >= r.req_id {
                return Ok(()); // a duplicate, or older than what the client waits for
            }
        }
        let k = (r.client, r.req_id);
        self.metrics.requests_accepted += 1;
        self.pending.insert(r.client, req);
        self.unproposed.push_back((k, self.now_ms));
        if self.progress_deadline.is_none() {
            self.progress_deadline = Some(self.now_ms + self.timeout_ms());
        }
        Ok(())
    }

    fn propose_batches(&mut self) {
        if !self.view_active || !self.is_primary() {
            return;
        }
        let t = &self.opts.tuning;
        let (max_reqs, max_bytes) = (t.batch_max_requests, t.batch_max_bytes);
        let delay = t.batch_delay_ms;
        loop {
            let reconfigs = self.unproposed_reconfigs();
            let oldest = match self.unproposed.front() {
                Some((_, at)) => *at,
                None if !reconfigs.is_empty() => 0,
                None => break,
            };
            if self.next_seq > self.high_watermark() {
                break;
            }
            // Cut a batch when it is full, when the pipeline has room, or when
            // its oldest request has waited long enough. Reconfigurations
            // never wait.
            let inflight = (self.next_seq - 1).saturating_sub(self.last_executed);
            let full = self.unproposed.len() >= max_reqs;
            let waited = self.now_ms >= oldest + delay;
            if inflight >= self.opts.max_inflight_batches && !full && !waited {
                break;
            }
            let mut batch = Batch::default();
            for r in reconfigs {
                self.proposed_reconfigs.insert((r.app, r.epoch));
                batch.reconfigs.push(r);
            }
            let mut bytes = 0;
            while let Some(((c, id), _)) = self.unproposed.pop_front() {
                let Some(req) = self.pending.get(&c).filter(|p| p.request.req_id == id) else {
                    continue;
                };
                bytes += req.request.op.len();
                batch.requests.push(req.clone());
                if batch.requests.len() >= max_reqs || bytes >= max_bytes {
                    break;
                }
            }
            if batch.requests.is_empty() && batch.reconfigs.is_empty() {
                break;
            }
            let seq = self.next_seq;
            self.next_seq += 1;
            let pp = Signed::sign(
                PrePrepare {
                    view: self.view,
                    seq,
                    digest: batch.digest(),
                    primary: self.id,
                },
                &self.keys.key,
            );
            self.raise_vote_floor();
            self.send(
                Target::All,
                PeerMessage::PrePrepare(pp.clone(), batch.clone()),
            );
            let now = self.now_ms;
            let slot = self.slots.entry(seq).or_default();
            slot.created_ms = now;
            slot.pre_prepare = Some((pp, batch));
            self.check_prepared(seq);
        }
    }

    /// Reconfigurations ready to order that this primary has not proposed yet.
    fn unproposed_reconfigs(&self) -> Vec<Reconfigure> {
        self.monitors
            .values()
            .flat_map(|m| m.ready_reconfigs.values())
            .filter(|r| !self.proposed_reconfigs.contains(&(r.app, r.epoch)))
            .cloned()
            .collect()
    }

    fn has_pending_reconfigs(&self) -> bool {
        self.monitors
            .values()
            .any(|m| !m.ready_reconfigs.is_empty())
    }

    // ------------------------------------------------------------------- time

    pub fn tick(&mut self, now_ms: u64) {
        self.now_ms = now_ms;
        if now_ms >= self.last_status_ms + self.opts.tuning.status_interval_ms {
            self.last_status_ms = now_ms;
            let st = Status {
                replica: self.id,
                view: self.view,
                view_active: self.view_active,
                last_executed: self.last_executed,
                stable: self.stable.seq,
            };
            self.send(Target::All, PeerMessage::Status(st));
        }
        let apps: Vec<AppId> = self.monitors.keys().copied().collect();
        for app in apps {
            self.evaluate_app(app);
        }
        if self.view_active {
            if let Some(d) = self.progress_deadline {
                // The primary times out too: a stuck primary (say, one that
                // cannot gather a commit quorum) also needs a new view.
                if now_ms >= d {
                    tracing::info!(
                        replica = self.id,
                        view = self.view,
                        "request timed out; changing view"
                    );
                    self.start_view_change(self.view + 1);
                }
            }
        } else if let Some(d) = self.vc_deadline {
            if now_ms >= d {
                let next = if self.vc_attempts == 0 {
                    self.view
                } else {
                    self.view + 1
                };
                self.start_view_change(next.max(self.view));
            }
        }
    }

    // ---------------------------------------------------------------- network

    /// A message from replica `from`, whose envelope MAC was already checked.
    pub fn step(&mut self, from: ReplicaId, msg: PeerMessage) -> Result<(), Rejected> {
        if from as usize >= self.n || from == self.id {
            return Err(Rejected::UnknownReplica(from));
        }
        let res = match msg {
            PeerMessage::PrePrepare(pp, batch) => self.on_pre_prepare(from, pp, batch),
            PeerMessage::Prepare(p) => self.on_prepare(from, p),
            PeerMessage::Commit(c) => self.on_commit(from, c),
            PeerMessage::Checkpoint(c) => self.on_checkpoint(c),
            PeerMessage::ViewChange(vc) => self.on_view_change(from, vc),
            PeerMessage::NewView(nv) => self.on_new_view(from, nv),
            PeerMessage::Status(st) => self.on_status(from, st),
            PeerMessage::StateTransfer(st) => self.on_state_transfer(st),
            PeerMessage::Committed(c) => self.on_committed(from, c),
            PeerMessage::Suspect(s) => self.on_suspect(from, s),
        };
        if res.is_err() {
            self.metrics.rejected += 1;
        }
        res
    }

    fn check_normal_case(&self, what: &'static str, view: View, seq: Seq) -> Result<(), Rejected> {
        if !self.view_active || view != self.view {
            return Err(Rejected::WrongView(what, view));
        }
        if !self.in_window(seq) {
            return Err(Rejected::OutOfWindow(seq));
        }
        Ok(())
    }

    fn verify_batch_requests(&self, batch: &Batch) -> Result<(), Rejected> {
        for req in &batch.requests {
            let c = req.request.client;
            if self.pending.get(&c) == Some(req) {
                continue; // verified when it arrived from the client
            }
            let key = self
                .keys
                .client_mac
                .get(&c)
                .ok_or(Rejected::BadRequestAuth(c))?;
            if !req.verify_for(self.id, key) {
                return Err(Rejected::BadRequestAuth(c));
            }
        }
        for r in &batch.reconfigs {
            verify_reconfigure(r, self.f, &self.keys.replica_public)?;
        }
        Ok(())
    }

    fn on_pre_prepare(
        &mut self,
        from: ReplicaId,
        pp: Signed<PrePrepare>,
        batch: Batch,
    ) -> Result<(), Rejected> {
        let b = pp.body;
        self.check_normal_case("pre-prepare", b.view, b.seq)?;
        if from != self.primary() || b.primary != from {
            return Err(Rejected::NotPrimary);
        }
        if let Some((existing, _)) = self.slots.get(&b.seq).and_then(|s| s.pre_prepare.as_ref()) {
            return if existing.body.digest == b.digest {
                Ok(())
            } else {
                Err(Rejected::Equivocation(b.seq))
            };
        }
        if batch.digest() != b.digest {
            return Err(Rejected::DigestMismatch);
        }
        if !pp.verify(&self.keys.replica_public) {
            return Err(Rejected::BadSignature("pre-prepare"));
        }
        self.verify_batch_requests(&batch)?;
        if self
            .abstain
            .is_some_and(|(v, floor)| v == b.view && b.seq <= floor)
        {
            // Restarted: we may have prepared something else here before.
            return Ok(());
        }
        self.accept_pre_prepare(pp, batch);
        Ok(())
    }

    /// Makes sure the durable vote floor covers the window before we vote in
    /// it; changes (and costs a flush) only when the window or view moves.
    fn raise_vote_floor(&mut self) {
        let want = (self.view, self.high_watermark());
        if self.vote_floor.is_none_or(|f| f < want) {
            self.vote_floor = Some(want);
            self.persist(PersistOp::VoteFloor {
                view: want.0,
                floor: want.1,
            });
        }
    }

    /// Records a pre-prepare for the current view and, as a backup, prepares it.
    fn accept_pre_prepare(&mut self, pp: Signed<PrePrepare>, batch: Batch) {
        let b = pp.body;
        self.raise_vote_floor();
        let now = self.now_ms;
        let slot = self.slots.entry(b.seq).or_default();
        slot.created_ms = now;
        slot.pre_prepare = Some((pp, batch));
        if b.primary != self.id {
            let prep = Signed::sign(
                Prepare {
                    view: b.view,
                    seq: b.seq,
                    digest: b.digest,
                    replica: self.id,
                },
                &self.keys.key,
            );
            self.slots
                .get_mut(&b.seq)
                .expect("inserted above")
                .prepares
                .insert(self.id, prep.clone());
            self.send(Target::All, PeerMessage::Prepare(prep));
        }
        self.check_prepared(b.seq);
    }

    fn on_prepare(&mut self, from: ReplicaId, p: Signed<Prepare>) -> Result<(), Rejected> {
        let b = p.body;
        if b.replica != from {
            return Err(Rejected::WrongSender {
                from,
                claimed: b.replica,
            });
        }
        self.check_normal_case("prepare", b.view, b.seq)?;
        if from == self.primary() {
            return Err(Rejected::NotPrimary);
        }
        // A duplicate, or a prepare for a slot whose certificate is already
        // complete (slots are cleared on a view change), adds nothing: skip
        // the signature check, a third of a backup's verifications per batch.
        if self
            .slots
            .get(&b.seq)
            .is_some_and(|s| s.prepared || s.prepares.contains_key(&from))
        {
            return Ok(());
        }
        if !p.verify(&self.keys.replica_public) {
            return Err(Rejected::BadSignature("prepare"));
        }
        let now = self.now_ms;
        let slot = self.slots.entry(b.seq).or_insert_with(|| Slot {
            created_ms: now,
            ..Default::default()
        });
        slot.prepares.insert(from, p);
        self.check_prepared(b.seq);
        Ok(())
    }

    fn check_prepared(&mut self, seq: Seq) {
        let quorum = 2 * self.f;
        let Some(slot) = self.slots.get_mut(&seq) else {
            return;
        };
        if slot.prepared {
            return;
        }
        let Some((pp, batch)) = &slot.pre_prepare else {
            return;
        };
        let d = pp.body.digest;
        let matching: Vec<_> = slot
            .prepares
            .values()
            .filter(|p| p.body.digest == d)
            .take(quorum)
            .cloned()
            .collect();
        if matching.len() < quorum {
            return;
        }
        slot.prepared = true;
        let cert = PreparedCert {
            pre_prepare: pp.clone(),
            batch: batch.clone(),
            prepares: matching,
        };
        slot.commits.insert(self.id, d);
        let view = pp.body.view;
        self.prepared_certs.insert(seq, cert.clone());
        self.persist(PersistOp::Prepared(cert));
        let commit = Commit {
            view,
            seq,
            digest: d,
            replica: self.id,
        };
        self.send(Target::All, PeerMessage::Commit(commit));
        self.check_committed(seq);
    }

    fn on_commit(&mut self, from: ReplicaId, c: Commit) -> Result<(), Rejected> {
        if c.replica != from {
            return Err(Rejected::WrongSender {
                from,
                claimed: c.replica,
            });
        }
        self.check_normal_case("commit", c.view, c.seq)?;
        let now = self.now_ms;
        let slot = self.slots.entry(c.seq).or_insert_with(|| Slot {
            created_ms: now,
            ..Default::default()
        });
        slot.commits.entry(from).or_insert(c.digest);
        self.check_committed(c.seq);
        Ok(())
    }

    fn check_committed(&mut self, seq: Seq) {
        let quorum = self.commit_quorum;
        let Some(slot) = self.slots.get_mut(&seq) else {
            return;
        };
        if slot.committed || !slot.prepared {
            return;
        }
        let Some((pp, _)) = &slot.pre_prepare else {
            return;
        };
        let d = pp.body.digest;
        if slot.commits.values().filter(|x| **x == d).count() >= quorum {
            slot.committed = true;
            self.try_execute();
        }
    }

    // -------------------------------------------------------------- execution

    fn try_execute(&mut self) {
        loop {
            let seq = self.last_executed + 1;
            let batch = match self.slots.get(&seq) {
                Some(Slot {
                    committed: true,
                    pre_prepare: Some((_, b)),
                    ..
                }) => b.clone(),
                _ => match self.from_peers.remove(&seq) {
                    Some(b) => b,
                    None => break,
                },
            };
            self.execute(seq, batch);
        }
    }

    fn execute(&mut self, seq: Seq, batch: Batch) {
        let digest = batch.digest();
        for r in &batch.reconfigs {
            self.apply_reconfigure(r);
        }
        let mut orders: BTreeMap<AppId, Vec<zz_wire::message::Request>> = BTreeMap::new();
        for req in &batch.requests {
            let r = &req.request;
            if self
                .pending
                .get(&r.client)
                .is_some_and(|p| p.request.req_id <= r.req_id)
            {
                self.pending.remove(&r.client);
            }
            if self.service.exec.is_remote(r.app) {
                orders.entry(r.app).or_default().push(r.clone());
                continue;
            }
            let Some(result) = self.service.execute(r.client, r.req_id, r.app, &r.op) else {
                continue;
            };
            self.metrics.requests_executed += 1;
            if let Some(key) = self.keys.client_mac.get(&r.client) {
                let reply = Reply::new(self.view, self.id, r.client, r.req_id, result, key);
                self.ready.replies.push(reply);
            }
        }
        for (app, requests) in orders {
            self.send_order(app, seq, requests);
        }
        self.last_executed = seq;
        self.metrics.batches_committed += 1;
        self.metrics.requests_ordered += batch.requests.len() as u64;
        self.executed.insert(seq, (digest, batch.clone()));
        self.ready
            .committed
            .push(CommittedBatch { seq, digest, batch });
        self.progress_deadline = if self.pending.is_empty() && !self.has_pending_reconfigs() {
            None
        } else {
            Some(self.now_ms + self.timeout_ms())
        };
        self.catch_up.remove(&seq);
        if seq.is_multiple_of(self.opts.tuning.checkpoint_interval) {
            self.take_checkpoint(seq);
        }
    }

    // ------------------------------------------------- execution replicas

    /// Assigns the app's next `app_seq` and orders it at the active set.
    fn send_order(&mut self, app: AppId, seq: Seq, requests: Vec<zz_wire::message::Request>) {
        let Some(app_seq) = self.service.exec.next_app_seq(app) else {
            return;
        };
        let order = Order {
            app,
            app_seq,
            seq,
            requests,
        };
        let active = self.service.exec.apps[&app].active.clone();
        for index in active {
            self.metrics.orders_sent += 1;
            self.ready
                .exec
                .push((ExecId { app, index }, ExecMessage::Order(order.clone())));
        }
        if let Some(m) = self.monitors.get_mut(&app) {
            m.order_sent(order, self.now_ms);
        }
    }

    /// Executes an ordered reconfiguration: the same at every correct replica.
    fn apply_reconfigure(&mut self, r: &Reconfigure) {
        if self.service.exec.apply(r) {
            self.metrics.reconfigurations += 1;
            self.enter_exec_epoch(r.app);
        }
    }

    /// Acts on the app's current epoch of the replicated table, reached by
    /// executing a reconfiguration or by state transfer: sends the host
    /// commands, re-watches and re-sends every order since the stable
    /// checkpoint to the active set, and gives woken replicas the checkpoint.
    fn enter_exec_epoch(&mut self, app: AppId) {
        let Some(st) = self.service.exec.apps.get(&app) else {
            return;
        };
        let (epoch, active, woken) = (st.epoch, st.active.clone(), st.woken.clone());
        let after_verdict = !st.recovering;
        tracing::info!(replica = self.id, app, epoch, commands = ?st.commands, ?active, "execution replicas reconfigured");
        self.send_host_commands(app);
        let now = self.now_ms;
        let f = self.f;
        let Some(m) = self.monitors.get_mut(&app) else {
            return;
        };
        m.epoch_seen = epoch;
        m.epoch_changed(epoch, f);
        m.rewatch_all(now);
        m.note_woken(&woken, now);
        if after_verdict {
            m.verdict_applied();
        }
        // Woken replicas get the stable checkpoint; every active replica gets
        // every order since it (those that executed them answer from cache),
        // so the new active set's digests can be compared.
        for index in active {
            let to = ExecId { app, index };
            if woken.contains(&index) {
                if let Some(cert) = &m.stable {
                    self.ready
                        .exec
                        .push((to, ExecMessage::Stable(cert.clone())));
                }
            }
            for order in m.orders.values() {
                self.ready
                    .exec
                    .push((to, ExecMessage::Order(order.clone())));
            }
        }
    }

    /// Signs and sends the current epoch's host commands. Re-sent
    /// periodically: a host acts once on f+1 of them and ignores the rest.
    fn send_host_commands(&mut self, app: AppId) {
        let Some(st) = self.service.exec.apps.get(&app) else {
            return;
        };
        for (exec, action) in &st.commands {
            let cmd = HostCommand {
                app,
                epoch: st.epoch,
                exec: *exec,
                action: *action,
                replica: self.id,
            };
            self.ready
                .host_commands
                .push(Signed::sign(cmd, &self.keys.key));
        }
        if let Some(m) = self.monitors.get_mut(&app) {
            m.commands_sent_ms = self.now_ms;
        }
    }

    /// A message from an execution replica, whose envelope MAC was already checked.
    pub fn on_exec(&mut self, from: ExecId, msg: ExecMessage) -> Result<(), Rejected> {
        let res = self.on_exec_inner(from, msg);
        if res.is_err() {
            self.metrics.rejected += 1;
        }
        res
    }

    fn on_exec_inner(&mut self, from: ExecId, msg: ExecMessage) -> Result<(), Rejected> {
        let bad = Rejected::BadExecMessage(from);
        let Some(state) = self.service.exec.apps.get(&from.app) else {
            return Err(bad);
        };
        if from.index >= self.service.exec.replicas_per_app {
            return Err(bad);
        }
        let (epoch, active) = (state.epoch, state.active.clone());
        let m = self.monitors.get_mut(&from.app).ok_or(bad.clone())?;
        match msg {
            ExecMessage::Executed(e) => {
                if e.exec != from.index || e.app != from.app {
                    return Err(bad);
                }
                if e.replies.len() > self.opts.tuning.batch_max_requests {
                    return Err(bad);
                }
                m.record(e.app_seq, e.exec, e.digest);
                // Replies are MAC'd end to end for their clients; we only relay.
                for reply in e.replies {
                    if reply.replica == from.index {
                        self.ready.replies.push(reply);
                    }
                }
                self.evaluate_app(from.app);
            }
            ExecMessage::Checkpoint(ck, sig) => {
                if ck.exec != from.index || ck.app != from.app {
                    return Err(bad);
                }
                let keys = &self.opts.remote_apps[&from.app];
                let stable = m.add_checkpoint(ck, sig, keys, self.f, self.now_ms)?;
                if let Some(conflict) = m.checkpoint_conflict(ck.app_seq, &active) {
                    let ev = Evidence::Mismatch { digests: conflict };
                    self.suspect(from.app, epoch, ck.app_seq, ev);
                }
                if let Some(cert) = stable {
                    tracing::info!(
                        replica = self.id,
                        app = from.app,
                        app_seq = cert.app_seq,
                        "execution checkpoint stable"
                    );
                    for index in active {
                        let to = ExecId {
                            app: from.app,
                            index,
                        };
                        self.ready
                            .exec
                            .push((to, ExecMessage::Stable(cert.clone())));
                    }
                }
            }
            ExecMessage::Order(_) | ExecMessage::Stable(_) => return Err(bad),
        }
        Ok(())
    }

    fn evaluate_app(&mut self, app: AppId) {
        let Some(st) = self.service.exec.apps.get(&app) else {
            return;
        };
        let (epoch, active, recovering) = (st.epoch, st.active.clone(), st.recovering);
        let now = self.now_ms;
        let min = self.opts.exec_timeout_min_ms;
        let f = self.f;
        let Some(m) = self.monitors.get_mut(&app) else {
            return;
        };
        if now >= m.commands_sent_ms + 5 * self.opts.tuning.status_interval_ms {
            self.send_host_commands(app);
            return;
        }
        let Some(m) = self.monitors.get_mut(&app) else {
            return;
        };
        if let Some(own) = m.resend_own(epoch, self.id, now, min) {
            self.send(Target::All, PeerMessage::Suspect(own));
            return;
        }
        let resends = m.retransmissions(&active, now, min);
        if let Some(cert) = &m.stable {
            for &index in &resends.stable_to {
                self.ready
                    .exec
                    .push((ExecId { app, index }, ExecMessage::Stable(cert.clone())));
            }
        }
        for (index, order) in resends.orders {
            self.ready
                .exec
                .push((ExecId { app, index }, ExecMessage::Order(order)));
        }
        if let Some(c) = m.evaluate(epoch, &active, recovering, f, now, min) {
            self.suspect(app, epoch, c.app_seq, c.evidence);
        }
    }

    /// Signs and broadcasts a suspect (or verdict) for the app's epoch.
    fn suspect(&mut self, app: AppId, epoch: u64, app_seq: u64, evidence: Evidence) {
        tracing::warn!(
            replica = self.id,
            app,
            epoch,
            app_seq,
            ?evidence,
            "suspecting execution replicas"
        );
        self.metrics.suspicions += 1;
        let s = Signed::sign(
            Suspect {
                app,
                epoch,
                app_seq,
                replica: self.id,
                evidence,
            },
            &self.keys.key,
        );
        self.send(Target::All, PeerMessage::Suspect(s.clone()));
        if let Some(m) = self.monitors.get_mut(&app) {
            m.mark_suspected(epoch);
            m.add_suspect(s, epoch, self.f);
        }
        self.arm_progress_timer();
    }

    /// An operator command whose signature the driver verified against the
    /// config's operator key. `Activate` of a dormant replica makes this
    /// replica sign a suspect with [`Evidence::Operator`] for the app's
    /// current epoch: the wake then needs f+1 such suspects, like any other.
    /// Returns what happened, or why nothing did, for the operator.
    pub fn on_operator(
        &mut self,
        action: &zz_wire::operator::OperatorAction,
    ) -> Result<String, String> {
        use zz_wire::operator::OperatorAction;
        let OperatorAction::Activate { exec, epoch } = action else {
            return Err("agreement replicas only take `activate` commands".into());
        };
        let Some(st) = self.service.exec.apps.get(&exec.app) else {
            return Err(format!(
                "app {} is not run by execution replicas here",
                exec.app
            ));
        };
        if exec.index >= self.service.exec.replicas_per_app {
            return Err(format!(
                "app {} has execution replicas 0..{}; there is no replica {}",
                exec.app, self.service.exec.replicas_per_app, exec.index
            ));
        }
        if *epoch != st.epoch {
            return Err(format!(
                "app {} is at epoch {}, the command is for epoch {epoch}; check `zzctl status` and retry",
                exec.app, st.epoch
            ));
        }
        if st.active.contains(&exec.index) {
            return Ok(format!("{exec} is already active at epoch {epoch}"));
        }
        if self.operator_wakes.get(&exec.app) == Some(epoch) {
            return Ok(format!(
                "replica {} already asked to wake app {} at epoch {epoch}",
                self.id, exec.app
            ));
        }
        self.operator_wakes.insert(exec.app, *epoch);
        let app_seq = st.next_app_seq.saturating_sub(1);
        self.suspect(
            exec.app,
            *epoch,
            app_seq,
            Evidence::Operator { exec: exec.index },
        );
        Ok(format!(
            "replica {} signed a wake request for {exec} at epoch {epoch}",
            self.id
        ))
    }

    fn on_suspect(&mut self, from: ReplicaId, s: Signed<Suspect>) -> Result<(), Rejected> {
        if s.body.replica != from {
            return Err(Rejected::WrongSender {
                from,
                claimed: s.body.replica,
            });
        }
        let Some(st) = self.service.exec.apps.get(&s.body.app) else {
            return Err(crate::execution::BadReconfigure::UnknownApp(s.body.app).into());
        };
        if s.body.epoch < st.epoch {
            return Ok(()); // stale
        }
        if !s.verify(&self.keys.replica_public) {
            return Err(Rejected::BadSignature("suspect"));
        }
        let epoch = st.epoch;
        if let Some(m) = self.monitors.get_mut(&s.body.app) {
            m.add_suspect(s, epoch, self.f);
        }
        self.arm_progress_timer();
        Ok(())
    }

    /// Work is waiting to be ordered: if it is not, a view change follows.
    fn arm_progress_timer(&mut self) {
        if self.progress_deadline.is_none() && self.has_pending_reconfigs() {
            self.progress_deadline = Some(self.now_ms + self.timeout_ms());
        }
    }

    fn take_checkpoint(&mut self, seq: Seq) {
        let snapshot = self.service.snapshot();
        let state = state_digest(&snapshot);
        self.own_checkpoints.insert(seq, (state, snapshot));
        let ck = Signed::sign(
            Checkpoint {
                seq,
                state,
                replica: self.id,
            },
            &self.keys.key,
        );
        self.send(Target::All, PeerMessage::Checkpoint(ck.clone()));
        self.record_checkpoint(ck);
    }

    // ------------------------------------------------------------ checkpoints

    /// Checkpoints are accepted from any sender: the signature is what counts,
    /// so peers can relay the proofs of a stable checkpoint.
    fn on_checkpoint(&mut self, c: Signed<Checkpoint>) -> Result<(), Rejected> {
        let b = c.body;
        if b.replica as usize >= self.n {
            return Err(Rejected::UnknownReplica(b.replica));
        }
        if !b.seq.is_multiple_of(self.opts.tuning.checkpoint_interval) {
            return Err(Rejected::BadCheckpointSeq(b.seq));
        }
        if b.seq <= self.stable.seq {
            return Ok(());
        }
        if b.seq > self.stable.seq + 4 * self.opts.tuning.window {
            return Err(Rejected::OutOfWindow(b.seq));
        }
        if self
            .checkpoint_votes
            .get(&b.seq)
            .is_some_and(|v| v.contains_key(&b.replica))
        {
            return Ok(());
        }
        if !c.verify(&self.keys.replica_public) {
            return Err(Rejected::BadSignature("checkpoint"));
        }
        self.record_checkpoint(c);
        Ok(())
    }

    fn record_checkpoint(&mut self, c: Signed<Checkpoint>) {
        let seq = c.body.seq;
        let state = c.body.state;
        let votes = self.checkpoint_votes.entry(seq).or_default();
        votes.insert(c.body.replica, c);
        let matching: Vec<_> = votes
            .values()
            .filter(|v| v.body.state == state)
            .cloned()
            .collect();
        if matching.len() >= self.quorum() {
            let cert = CheckpointCert {
                seq,
                state,
                proofs: matching,
            };
            self.on_stable_cert(cert);
        }
    }

    /// A verified certificate for a checkpoint above ours.
    fn on_stable_cert(&mut self, cert: CheckpointCert) {
        if cert.seq <= self.stable.seq {
            return;
        }
        match self.own_checkpoints.get(&cert.seq) {
            Some((d, snap)) if *d == cert.state => {
                let snap = snap.clone();
                self.install_stable(cert, snap);
            }
            Some(_) => {
                tracing::error!(
                    replica = self.id,
                    seq = cert.seq,
                    "our state diverged from a stable checkpoint; awaiting state transfer"
                );
            }
            None => {
                // We have not executed that far: peers will send the state
                // when our status shows we are behind their stable checkpoint.
            }
        }
    }

    fn install_stable(&mut self, cert: CheckpointCert, snapshot: Vec<u8>) {
        let s = cert.seq;
        self.metrics.checkpoints_stable += 1;
        self.persist(PersistOp::Stable {
            cert: cert.clone(),
            snapshot: snapshot.clone(),
        });
        self.stable = cert;
        self.stable_snapshot = snapshot;
        self.slots = self.slots.split_off(&(s + 1));
        self.executed = self.executed.split_off(&(s + 1));
        self.prepared_certs = self.prepared_certs.split_off(&(s + 1));
        self.own_checkpoints = self.own_checkpoints.split_off(&s);
        self.checkpoint_votes = self.checkpoint_votes.split_off(&(s + 1));
        self.catch_up = self.catch_up.split_off(&(s + 1));
        self.from_peers = self.from_peers.split_off(&(s + 1));
        if self.next_seq <= s {
            self.next_seq = s + 1;
        }
    }

    // ------------------------------------------------------------- catch-up

    fn on_status(&mut self, from: ReplicaId, st: Status) -> Result<(), Rejected> {
        if st.replica != from {
            return Err(Rejected::WrongSender {
                from,
                claimed: st.replica,
            });
        }
        let to = Target::Replica(from);
        let peer_behind = st.view < self.view || (st.view == self.view && !st.view_active);
        if peer_behind && self.view_active {
            // The peer missed the new view we are in.
            if let Some(nv) = self.last_new_view.clone() {
                self.send(to, PeerMessage::NewView(nv));
            }
        }
        if !self.view_active && st.view <= self.view {
            // Help a peer that missed our view change.
            if let Some(vc) = self
                .view_changes
                .get(&self.view)
                .and_then(|m| m.get(&self.id))
                .cloned()
            {
                self.send(to, PeerMessage::ViewChange(vc));
            }
        }
        if st.stable < self.stable.seq && self.stable.seq > 0 {
            if st.last_executed < self.stable.seq {
                let xfer = StateTransfer {
                    cert: self.stable.clone(),
                    snapshot: self.stable_snapshot.clone(),
                };
                self.send(to, PeerMessage::StateTransfer(xfer));
            } else {
                for p in self.stable.proofs.clone() {
                    self.send(to, PeerMessage::Checkpoint(p));
                }
            }
        }
        if st.last_executed < self.last_executed {
            let start = st.last_executed.max(self.stable.seq) + 1;
            let end = self.last_executed.min(start + 63);
            if start <= end {
                for (seq, (_, batch)) in self.executed.range(start..=end) {
                    let entry = CommittedEntry {
                        seq: *seq,
                        batch: batch.clone(),
                    };
                    self.ready
                        .messages
                        .push((to, PeerMessage::Committed(entry)));
                }
            }
        }
        if st.view == self.view && self.view_active {
            // Retransmit our part of slots that have been stuck for a while.
            let stale = self
                .now_ms
                .saturating_sub(self.opts.tuning.status_interval_ms);
            let mut out = Vec::new();
            for (seq, slot) in self.slots.range(st.last_executed.saturating_add(1)..) {
                if slot.created_ms > stale {
                    continue;
                }
                if let Some((pp, batch)) = &slot.pre_prepare {
                    if pp.body.primary == self.id {
                        out.push(PeerMessage::PrePrepare(pp.clone(), batch.clone()));
                    }
                }
                if let Some(p) = slot.prepares.get(&self.id) {
                    out.push(PeerMessage::Prepare(p.clone()));
                }
                if let Some(d) = slot.commits.get(&self.id) {
                    out.push(PeerMessage::Commit(Commit {
                        view: self.view,
                        seq: *seq,
                        digest: *d,
                        replica: self.id,
                    }));
                }
            }
            for m in out {
                self.send(to, m);
            }
        }
        Ok(())
    }

    fn on_committed(&mut self, from: ReplicaId, c: CommittedEntry) -> Result<(), Rejected> {
        let seq = c.seq;
        if seq <= self.last_executed {
            return Ok(());
        }
        if seq > self.last_executed + 2 * self.opts.tuning.window {
            return Err(Rejected::OutOfWindow(seq));
        }
        let d = c.batch.digest();
        let need = self.f + 1;
        let votes = self.catch_up.entry(seq).or_default();
        if votes.votes.contains_key(&from) {
            return Ok(());
        }
        votes.votes.insert(from, d);
        votes.batches.entry(d).or_insert(c.batch);
        if votes.votes.values().filter(|x| **x == d).count() >= need {
            let batch = votes.batches.remove(&d).expect("inserted above");
            self.catch_up.remove(&seq);
            self.from_peers.insert(seq, batch);
            self.try_execute();
        }
        Ok(())
    }

    fn on_state_transfer(&mut self, st: StateTransfer) -> Result<(), Rejected> {
        let cert = &st.cert;
        if cert.seq <= self.stable.seq {
            return Ok(());
        }
        let diverged = self
            .own_checkpoints
            .get(&cert.seq)
            .is_some_and(|(d, _)| *d != cert.state);
        if cert.seq <= self.last_executed && !diverged {
            return Ok(());
        }
        verify_checkpoint_cert(cert, self.quorum(), &self.keys.replica_public)?;
        if state_digest(&st.snapshot) != cert.state {
            return Err(Rejected::BadSnapshot);
        }
        if self.service.restore(&st.snapshot).is_err() {
            return Err(Rejected::BadSnapshot);
        }
        tracing::info!(
            replica = self.id,
            seq = cert.seq,
            "state transfer installed"
        );
        self.metrics.state_transfers += 1;
        self.last_executed = cert.seq;
        self.own_checkpoints
            .insert(cert.seq, (cert.state, st.snapshot.clone()));
        self.install_stable(st.cert, st.snapshot);
        // The transferred state may hold reconfigurations we never executed.
        let moved: Vec<AppId> = self
            .monitors
            .iter()
            .filter(|(a, m)| {
                self.service
                    .exec
                    .apps
                    .get(a)
                    .is_some_and(|st| st.epoch != m.epoch_seen)
            })
            .map(|(a, _)| *a)
            .collect();
        for app in moved {
            self.enter_exec_epoch(app);
        }
        // Requests executed in the transferred state are no longer pending.
        let replies = &self.service.replies;
        self.pending
            .retain(|c, p| replies.get(c).is_none_or(|l| l.req_id < p.request.req_id));
        self.try_execute();
        Ok(())
    }

    // ------------------------------------------------------------ view change

    fn start_view_change(&mut self, new_view: View) {
        if new_view < self.view || (new_view == self.view && self.view_active) {
            return;
        }
        self.metrics.view_changes += 1;
        self.view = new_view;
        self.view_active = false;
        self.vc_attempts += 1;
        // The timer starts only once 2f+1 replicas want this view (PBFT's
        // rule): a replica alone must not race ahead through views that no
        // quorum will ever join.
        self.vc_deadline = None;
        self.progress_deadline = None;
        self.persist(PersistOp::View {
            view: new_view,
            active: false,
        });
        let prepared: Vec<PreparedCert> = self
            .prepared_certs
            .range(self.stable.seq + 1..=self.high_watermark())
            .map(|(_, c)| c.clone())
            .collect();
        let vc = Signed::sign(
            ViewChange {
                new_view,
                replica: self.id,
                stable: self.stable.clone(),
                prepared,
            },
            &self.keys.key,
        );
        self.slots.clear();
        self.view_changes
            .entry(new_view)
            .or_default()
            .insert(self.id, vc.clone());
        self.send(Target::All, PeerMessage::ViewChange(vc));
        self.arm_view_change_timer();
        self.try_new_view();
    }

    fn arm_view_change_timer(&mut self) {
        if self.view_active || self.vc_deadline.is_some() {
            return;
        }
        if self.view_changes.get(&self.view).map_or(0, |m| m.len()) >= self.quorum() {
            let backoff = 1u64 << self.vc_attempts.min(6);
            self.vc_deadline = Some(self.now_ms + self.timeout_ms() * backoff);
        }
    }

    fn on_view_change(&mut self, from: ReplicaId, vc: Signed<ViewChange>) -> Result<(), Rejected> {
        let v = vc.body.new_view;
        if vc.body.replica != from {
            return Err(Rejected::WrongSender {
                from,
                claimed: vc.body.replica,
            });
        }
        if v < self.view || (v == self.view && self.view_active) {
            return Ok(()); // stale
        }
        if v > self.view + 1000 {
            return Err(Rejected::WrongView("view change", v));
        }
        if self
            .view_changes
            .get(&v)
            .is_some_and(|m| m.contains_key(&from))
        {
            return Ok(());
        }
        verify_view_change(
            &vc,
            v,
            self.f,
            self.opts.tuning.window,
            &self.keys.replica_public,
        )?;
        // Keep only the newest view change per replica: bounds memory.
        for m in self.view_changes.values_mut() {
            m.remove(&from);
        }
        self.view_changes.retain(|_, m| !m.is_empty());
        self.view_changes.entry(v).or_default().insert(from, vc);

        // f+1 replicas want a higher view: at least one is correct, so join
        // the smallest such view rather than wait for our own timer.
        let mut wanting: Vec<(View, ReplicaId)> = self
            .view_changes
            .range(self.view + 1..)
            .flat_map(|(v, m)| m.keys().map(move |r| (*v, *r)))
            .collect();
        wanting.sort();
        let distinct: BTreeSet<ReplicaId> = wanting.iter().map(|(_, r)| *r).collect();
        if distinct.len() > self.f {
            // The smallest view such that f+1 replicas want at least it.
            let mut by_view: Vec<View> = wanting.iter().map(|(v, _)| *v).collect();
            by_view.sort_unstable_by(|a, b| b.cmp(a));
            let target = by_view[self.f];
            self.start_view_change(target.max(self.view + 1));
        }
        self.arm_view_change_timer();
        self.try_new_view();
        Ok(())
    }

    /// As the primary of a view we are changing to, send the new view once
    /// 2f+1 view changes are in.
    fn try_new_view(&mut self) {
        if self.view_active || primary_of(self.view, self.n) != self.id {
            return;
        }
        let Some(vcs) = self.view_changes.get(&self.view) else {
            return;
        };
        if vcs.len() < self.quorum() {
            return;
        }
        let vcs: Vec<_> = vcs.values().cloned().collect();
        let Some(log) = compute_new_view_log(&vcs) else {
            return;
        };
        let view = self.view;
        let pre_prepares: Vec<_> = log
            .entries
            .iter()
            .map(|(seq, digest, batch)| {
                let pp = Signed::sign(
                    PrePrepare {
                        view,
                        seq: *seq,
                        digest: *digest,
                        primary: self.id,
                    },
                    &self.keys.key,
                );
                (pp, batch.clone())
            })
            .collect();
        let nv = Signed::sign(
            NewView {
                view,
                primary: self.id,
                view_changes: vcs,
                pre_prepares,
            },
            &self.keys.key,
        );
        self.send(Target::All, PeerMessage::NewView(nv.clone()));
        self.enter_view(nv, log.stable);
    }

    fn on_new_view(&mut self, from: ReplicaId, nv: Signed<NewView>) -> Result<(), Rejected> {
        let b = &nv.body;
        let v = b.view;
        if v < self.view || (v == self.view && self.view_active) {
            return Ok(());
        }
        if b.primary != primary_of(v, self.n) || from != b.primary {
            return Err(Rejected::NotPrimary);
        }
        if !nv.verify(&self.keys.replica_public) {
            return Err(Rejected::BadSignature("new-view"));
        }
        let mut signers = BTreeSet::new();
        for vc in &b.view_changes {
            if !signers.insert(vc.body.replica) {
                return Err(Rejected::BadNewView);
            }
            verify_view_change(
                vc,
                v,
                self.f,
                self.opts.tuning.window,
                &self.keys.replica_public,
            )?;
        }
        if signers.len() < self.quorum() {
            return Err(Rejected::BadNewView);
        }
        let log = compute_new_view_log(&b.view_changes).ok_or(Rejected::BadNewView)?;
        if log.entries.len() != b.pre_prepares.len() {
            return Err(Rejected::BadNewView);
        }
        for ((seq, digest, _), (pp, batch)) in log.entries.iter().zip(&b.pre_prepares) {
            let p = &pp.body;
            if p.view != v || p.seq != *seq || p.digest != *digest || p.primary != b.primary {
                return Err(Rejected::BadNewView);
            }
            if batch.digest() != *digest {
                return Err(Rejected::DigestMismatch);
            }
            if !pp.verify(&self.keys.replica_public) {
                return Err(Rejected::BadSignature("new-view pre-prepare"));
            }
        }
        let stable = log.stable;
        self.view = v;
        self.enter_view(nv, stable);
        Ok(())
    }

    fn enter_view(&mut self, nv: Signed<NewView>, stable: CheckpointCert) {
        let v = nv.body.view;
        tracing::info!(replica = self.id, view = v, "entering view");
        self.metrics.new_views += 1;
        self.view = v;
        self.view_active = true;
        self.vc_attempts = 0;
        self.vc_deadline = None;
        self.persist(PersistOp::View {
            view: v,
            active: true,
        });
        self.view_changes = self.view_changes.split_off(&(v + 1));
        self.on_stable_cert(stable.clone());
        self.slots.clear();
        let mut max_s = stable.seq.max(self.stable.seq);
        let mut in_log = HashSet::new();
        for (pp, batch) in nv.body.pre_prepares.iter().cloned() {
            let seq = pp.body.seq;
            max_s = max_s.max(seq);
            if seq <= self.stable.seq {
                continue;
            }
            for r in &batch.requests {
                in_log.insert((r.request.client, r.request.req_id));
            }
            self.accept_pre_prepare(pp, batch);
        }
        self.next_seq = max_s + 1;
        let now = self.now_ms;
        let mut keys: Vec<(ClientId, u64)> = self
            .pending
            .values()
            .map(|p| (p.request.client, p.request.req_id))
            .filter(|k| !in_log.contains(k))
            .collect();
        // A fixed order keeps replicas deterministic.
        keys.sort_unstable();
        self.unproposed = keys.into_iter().map(|k| (k, now)).collect();
        self.proposed_reconfigs.clear();
        self.progress_deadline = if self.pending.is_empty() && !self.has_pending_reconfigs() {
            None
        } else {
            Some(self.now_ms + self.timeout_ms())
        };
        self.last_new_view = Some(nv);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::app::new_app;
    use zz_wire::crypto::KeyPair;
    use zz_wire::message::Request;

    fn cluster(n: usize, f: usize) -> (Vec<Replica>, zz_wire::config::ClientKeys) {
        let keys: Vec<KeyPair> = (0..n)
            .map(|i| KeyPair::from_seed([i as u8 + 1; 32]))
            .collect();
        let pubs: Vec<_> = keys.iter().map(|k| k.public()).collect();
        let client = KeyPair::from_seed([100; 32]);
        let clients = HashMap::from([(1u64, client.public())]);
        let replicas = keys
            .iter()
            .enumerate()
            .map(|(i, k)| {
                let rk = ReplicaKeys::derive(i as ReplicaId, k.clone(), pubs.clone(), &clients);
                let svc = Service::new(vec![(0, new_app("counter").unwrap())]);
                Replica::new(
                    ReplicaOptions::new(n, f, AgreementTuning::default()),
                    rk,
                    svc,
                )
            })
            .collect();
        (
            replicas,
            zz_wire::config::ClientKeys::derive(1, &client, &pubs),
        )
    }

    /// Delivers every message until quiet; returns replies.
    fn run(replicas: &mut [Replica]) -> Vec<Reply> {
        let mut replies = Vec::new();
        loop {
            let mut msgs = Vec::new();
            for r in replicas.iter_mut() {
                let rd = r.ready();
                replies.extend(rd.replies);
                for (t, m) in rd.messages {
                    msgs.push((r.id(), t, m));
                }
            }
            if msgs.is_empty() {
                return replies;
            }
            for (from, t, m) in msgs {
                for r in replicas.iter_mut() {
                    let to_me = match t {
                        Target::All => r.id() != from,
                        Target::Replica(x) => x == r.id(),
                    };
                    if to_me {
                        let _ = r.step(from, m.clone());
                    }
                }
            }
        }
    }

    #[test]
    fn normal_case_commits_and_replies() {
        let (mut rs, ck) = cluster(4, 1);
        let mut replies = Vec::new();
        for id in 1..=3 {
            let req = ClientRequest::new(
                Request {
                    client: 1,
                    req_id: id,
                    app: 0,
                    op: vec![],
                    read_only: false,
                },
                &ck.replica_mac,
            );
            for r in rs.iter_mut() {
                r.on_request(req.clone()).unwrap();
            }
            replies.extend(run(&mut rs));
        }
        assert!(rs.iter().all(|r| r.last_executed() >= 1));
        let d = rs[0].state_digest();
        assert!(rs.iter().all(|r| r.state_digest() == d));
        let last: Vec<_> = replies.iter().filter(|r| r.req_id == 3).collect();
        assert_eq!(last.len(), 4);
        assert!(last.iter().all(
            |r| r.result == 3u64.to_le_bytes() && r.verify(&ck.replica_mac[r.replica as usize])
        ));
    }

    #[test]
    fn forged_request_is_rejected() {
        let (mut rs, ck) = cluster(4, 1);
        let mut req = ClientRequest::new(
            Request {
                client: 1,
                req_id: 1,
                app: 0,
                op: vec![],
                read_only: false,
            },
            &ck.replica_mac,
        );
        req.request.op = b"tampered".to_vec();
        assert_eq!(rs[0].on_request(req), Err(Rejected::BadRequestAuth(1)));
    }
}
