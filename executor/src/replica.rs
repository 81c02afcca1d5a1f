//! [`ExecutionCore`]: one execution replica of one app, sans-IO (DESIGN §2, §4).
//!
//! Like the agreement replica, the core never touches a socket, clock or
//! thread. A driver feeds it inputs and acts on its outputs:
//!
//! - inputs: [`ExecutionCore::on_order`] and [`ExecutionCore::on_stable`],
//!   or [`ExecutionCore::on_envelope`] / [`ExecutionCore::on_frame`] for the
//!   MAC'd [`ExecEnvelope`] frames of the one byte stream an executor has
//!   (virtio-serial or a unix socket, relayed by its host agent);
//! - [`ExecutionCore::ready`] executes whatever has become executable and
//!   returns a [`Ready`]: messages for every agreement replica
//!   ([`ExecutionCore::seal`] turns one into envelopes), plus what the
//!   driver must do (a fault-injection delay or exit, a state transfer).
//!
//! Rules it enforces:
//! - `app_seq` is executed once the core holds f+1 orders with the same
//!   [`Order::digest`] from distinct agreement replicas and `app_seq - 1` is
//!   executed; each replica's first order per `app_seq` counts. Orders are
//!   buffered only within a window above the executed `app_seq` (and above
//!   a verified stable checkpoint ahead of it, for a woken replica).
//! - A repeated order (an `app_seq` already executed, with the same
//!   [`Order::digest`] as the order executed there) is answered by sending
//!   the [`Executed`] of that `app_seq` again, to the agreement replica that
//!   repeated it only ([`Ready::direct`]), from a result cache kept since
//!   the last stable checkpoint (bounded by the window), less the replies a
//!   later reply to the same client superseded. Agreement replicas
//!   rely on it: after a reconfiguration they re-send every order since the
//!   stable checkpoint to the whole active set, and they retransmit orders
//!   whose digests went missing. An executed `app_seq` with another digest,
//!   or one no longer cached, is [`Rejected::Stale`].
//! - Requests are de-duplicated per client by the reply table, kept in the
//!   pages (region [`REGION_REPLIES`]), so it is checkpointed and
//!   transferred with the app's state: a request with the client's last
//!   executed `req_id` gets the stored result again, an older one is
//!   skipped (no reply, not in the digest).
//! - A reply is not sent when a later request of the same client is already
//!   ordered: that client has accepted it and moved on (a woken replica
//!   replaying the log skips most replies this way).
//! - A batch is applied atomically (one store batch, with the superblock
//!   recording its `app_seq`), so after a crash the state is exactly that
//!   of the recorded `app_seq`.
//! - Every `checkpoint_interval` app_seqs the store takes a checkpoint; its
//!   root is signed and sent. A stable certificate releases older ones.
//!
//! Storage access is synchronous, and a [`crate::RecoveringState`] blocks
//! on fetches, so a driver runs the core on a thread of its own.

use crate::app::{App, ExecContext};
use crate::fault::{corrupt_result, FaultPlan};
use crate::pages::{PageError, Pages, StateBackend};
use crate::pmap::{MapError, PagedMap};
use crate::space::{Region, Superblock, REGION_APP, REGION_REPLIES};
use crate::tx::Tx;
use ed25519_dalek::VerifyingKey;
use std::collections::{BTreeMap, HashMap};
use zz_statefetch::PAGE_SIZE;
use zz_wire::crypto::{KeyPair, MacKey};
use zz_wire::exec::{
    results_digest, sign_exec_checkpoint, AppSeq, ExecCheckpoint, ExecCheckpointCert, ExecEnvelope,
    ExecId, ExecIndex, ExecMessage, ExecRoute, Executed, Order,
};
use zz_wire::message::Reply;
use zz_wire::{AppId, ClientId, Digest, ReplicaId};

/// Default checkpoint interval K.
pub const DEFAULT_CHECKPOINT_INTERVAL: u64 = 128;
/// Default window of buffered future `app_seq`s.
pub const DEFAULT_WINDOW: u64 = 4 * DEFAULT_CHECKPOINT_INTERVAL;
/// Longest result an app may return; a longer one is replaced by
/// [`RESULT_TOO_LARGE`].
pub const MAX_RESULT: usize = 1 << 20;
/// The result sent instead of one longer than [`MAX_RESULT`].
pub const RESULT_TOO_LARGE: &[u8] = b"error: result too large";

/// Configuration of one execution replica.
#[derive(Clone, Debug)]
pub struct ExecParams {
    pub app: AppId,
    /// This replica's index within the app, `0..2f+1`.
    pub index: ExecIndex,
    /// Faults tolerated, among agreement replicas and among this app's
    /// execution replicas alike.
    pub f: usize,
    /// K: a checkpoint every K app_seqs.
    pub checkpoint_interval: u64,
    /// How many app_seqs above the executed one are buffered.
    pub window: u64,
    /// This replica's signing key (checkpoints).
    pub key: KeyPair,
    /// Public keys of the app's execution replicas, by index (to check
    /// stable checkpoint certificates).
    pub exec_keys: Vec<VerifyingKey>,
    /// MAC keys shared with the agreement replicas, by replica id.
    pub agreement_macs: Vec<MacKey>,
    /// MAC keys shared with clients.
    pub client_macs: BTreeMap<ClientId, MacKey>,
    /// Faults to inject (none by default).
    pub faults: FaultPlan,
}

impl ExecParams {
    /// Parameters with the default interval, window and no faults.
    pub fn new(
        app: AppId,
        index: ExecIndex,
        f: usize,
        key: KeyPair,
        exec_keys: Vec<VerifyingKey>,
        agreement_macs: Vec<MacKey>,
        client_macs: BTreeMap<ClientId, MacKey>,
    ) -> Self {
        ExecParams {
            app,
            index,
            f,
            checkpoint_interval: DEFAULT_CHECKPOINT_INTERVAL,
            window: DEFAULT_WINDOW,
            key,
            exec_keys,
            agreement_macs,
            client_macs,
            faults: FaultPlan::default(),
        }
    }
}

/// Why an input was dropped. Drivers count these; none is fatal.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Rejected {
    #[error("message for app {0}")]
    WrongApp(AppId),
    #[error("unknown agreement replica {0}")]
    UnknownReplica(ReplicaId),
    #[error("app_seq {app_seq} is already executed (up to {executed})")]
    Stale { app_seq: AppSeq, executed: AppSeq },
    #[error("app_seq {0} is outside the window")]
    OutsideWindow(AppSeq),
    #[error("replica {replica} sent a second, different order for app_seq {app_seq}")]
    Conflicting { replica: ReplicaId, app_seq: AppSeq },
    #[error("checkpoint certificate does not verify")]
    BadCertificate,
    #[error("bad envelope: {0}")]
    Envelope(String),
    #[error("message kind not accepted by an executor")]
    Unexpected,
    #[error("replica has crashed (fault injection)")]
    Crashed,
}

/// Failures that stop the replica (the driver exits or restarts it).
#[derive(Debug, thiserror::Error)]
pub enum CoreError {
    #[error(transparent)]
    Page(#[from] PageError),
    #[error("invalid parameters: {0}")]
    Config(String),
    #[error("state is at app_seq {found}, expected {expected}")]
    StateMismatch { expected: AppSeq, found: AppSeq },
    #[error("checkpoint certificate does not verify")]
    BadCertificate,
}

fn map_err(e: MapError) -> CoreError {
    match e {
        MapError::Page(e) => CoreError::Page(e),
        MapError::Corrupt(s) => CoreError::Page(PageError::Corrupt(format!("reply table: {s}"))),
        MapError::TooLarge(n) => CoreError::Page(PageError::Corrupt(format!("reply of {n} bytes"))),
    }
}

/// What the driver must do after feeding inputs.
#[derive(Debug, Default)]
pub struct Ready {
    /// Messages for every agreement replica of the cluster, in order.
    pub messages: Vec<ExecMessage>,
    /// Messages for one agreement replica only (answers to repeated
    /// orders, from the result cache); [`ExecutionCore::seal_to`] seals one.
    pub direct: Vec<(ReplicaId, ExecMessage)>,
    /// Fault injection: wait this long before sending `messages`.
    pub delay_ms: u64,
    /// Fault injection: send `messages`, then exit.
    pub crash: bool,
    /// A verified stable checkpoint above the executed state, newly learned.
    /// A woken replica, or one that makes no progress, fetches it (e.g. a
    /// [`crate::RecoveringState`]) and calls [`ExecutionCore::install_state`].
    pub stable_ahead: Option<ExecCheckpointCert>,
    /// A stable checkpoint whose root differs from this replica's own
    /// checkpoint at the same app_seq: this replica's state is wrong.
    pub diverged: Option<ExecCheckpointCert>,
}

impl Ready {
    pub fn is_empty(&self) -> bool {
        self.messages.is_empty()
            && self.direct.is_empty()
            && self.delay_ms == 0
            && !self.crash
            && self.stable_ahead.is_none()
            && self.diverged.is_none()
    }
}

/// Counters for metrics.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Metrics {
    pub inputs_rejected: u64,
    pub orders_accepted: u64,
    pub batches_executed: u64,
    pub requests_executed: u64,
    /// Requests answered from the reply table (retransmissions).
    pub replies_cached: u64,
    /// Repeated orders answered from the result cache.
    pub orders_repeated: u64,
    /// Requests older than the client's last one: skipped.
    pub requests_stale: u64,
    /// Requests naming another app inside this app's order: skipped.
    pub requests_other_app: u64,
    /// Replies not sent because the client's MAC key is unknown.
    pub replies_unaddressed: u64,
    /// Replies not sent because a later request of the same client is
    /// already ordered (its client has accepted this one and moved on).
    pub replies_superseded: u64,
    pub checkpoints_taken: u64,
    /// Checkpoints not taken because the state is still being fetched.
    pub checkpoints_skipped: u64,
    pub stable_certs: u64,
}

/// Orders received for one app_seq.
#[derive(Default)]
struct Slot {
    voters: BTreeMap<ReplicaId, Digest>,
    orders: BTreeMap<Digest, (usize, Order)>,
}

/// One execution replica of one app; see the module docs.
pub struct ExecutionCore {
    p: ExecParams,
    app: Box<dyn App>,
    state: Box<dyn StateBackend>,
    executed: AppSeq,
    slots: BTreeMap<AppSeq, Slot>,
    /// What each app_seq executed since the last stable checkpoint produced,
    /// with the digest of its order: repeated orders are answered from it.
    results: BTreeMap<AppSeq, (Digest, Executed)>,
    /// The app_seq of each client's newest reply (kept after `results` is
    /// trimmed; an entry older than every cached app_seq matches none): a
    /// repeated order re-sends only replies that are still their client's
    /// newest. One entry per client with a MAC key (configured), so bounded.
    newest_reply: HashMap<ClientId, AppSeq>,
    /// Newest verified stable certificate.
    stable: Option<ExecCheckpointCert>,
    /// Highest stable app_seq already compared with our own checkpoint and
    /// released below.
    settled: AppSeq,
    ready: Ready,
    crashed: bool,
    metrics: Metrics,
}

impl std::fmt::Debug for ExecutionCore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ExecutionCore")
            .field("id", &self.id())
            .field("executed", &self.executed)
            .finish_non_exhaustive()
    }
}

/// Reads the superblock of a backend without changing it.
fn stored_app_seq(state: &mut dyn StateBackend) -> Result<AppSeq, CoreError> {
    let mut tx = Tx::new(state)?;
    Ok(Superblock::load(&mut tx)?.app_seq)
}

impl ExecutionCore {
    /// A replica of `app` over `state`; it resumes after the `app_seq`
    /// recorded in the state (0 for an empty state).
    pub fn new(
        params: ExecParams,
        app: Box<dyn App>,
        mut state: Box<dyn StateBackend>,
    ) -> Result<ExecutionCore, CoreError> {
        let f = params.f;
        if params.checkpoint_interval == 0 || params.window == 0 {
            return Err(CoreError::Config(
                "checkpoint interval and window must be positive".into(),
            ));
        }
        if params.agreement_macs.len() < 3 * f + 1 {
            return Err(CoreError::Config(format!(
                "{} agreement keys, need 3f+1 = {}",
                params.agreement_macs.len(),
                3 * f + 1
            )));
        }
        if params.exec_keys.len() < 2 * f + 1 || params.index as usize >= params.exec_keys.len() {
            return Err(CoreError::Config(format!(
                "{} execution replica keys for index {}, need 2f+1 = {}",
                params.exec_keys.len(),
                params.index,
                2 * f + 1
            )));
        }
        if params.exec_keys[params.index as usize] != params.key.public() {
            return Err(CoreError::Config(
                "own key does not match exec_keys[index]".into(),
            ));
        }
        let executed = stored_app_seq(&mut *state)?;
        Ok(ExecutionCore {
            p: params,
            app,
            state,
            executed,
            slots: BTreeMap::new(),
            results: BTreeMap::new(),
            newest_reply: HashMap::new(),
            stable: None,
            settled: 0,
            ready: Ready::default(),
            crashed: false,
            metrics: Metrics::default(),
        })
    }

    pub fn id(&self) -> ExecId {
        ExecId {
            app: self.p.app,
            index: self.p.index,
        }
    }

    /// Last executed app_seq.
    pub fn executed(&self) -> AppSeq {
        self.executed
    }

    /// Newest verified stable checkpoint certificate.
    pub fn stable(&self) -> Option<&ExecCheckpointCert> {
        self.stable.as_ref()
    }

    /// The newest stable certificate, if it is above the executed state.
    pub fn stable_ahead(&self) -> Option<&ExecCheckpointCert> {
        self.stable.as_ref().filter(|c| c.app_seq > self.executed)
    }

    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    pub fn params(&self) -> &ExecParams {
        &self.p
    }

    /// Whether an injected crash happened (the core accepts nothing more).
    pub fn is_crashed(&self) -> bool {
        self.crashed
    }

    fn count<T>(&mut self, r: Result<T, Rejected>) -> Result<T, Rejected> {
        if r.is_err() {
            self.metrics.inputs_rejected += 1;
        }
        r
    }

    /// An order from agreement replica `from` (already authenticated).
    pub fn on_order(&mut self, from: ReplicaId, order: Order) -> Result<(), Rejected> {
        let r = self.on_order_inner(from, order);
        self.count(r)
    }

    fn in_window(&self, app_seq: AppSeq) -> bool {
        let above = |base: AppSeq| app_seq > base && app_seq - base <= self.p.window;
        above(self.executed) || self.stable_ahead().is_some_and(|c| above(c.app_seq))
    }

    /// The [`Executed`] answering a repeated order: the cached one, less
    /// the replies a later reply to the same client superseded. After a
    /// reconfiguration every order since the stable checkpoint is repeated
    /// to every active replica; re-sending every cached reply (a read's
    /// runs to 64 KiB) to every agreement replica would flood the host
    /// agent and the agreement replicas with replies their clients took
    /// long ago, just while a woken replica fetches its state through the
    /// same host agent. A client retransmitting a request whose reply was
    /// lost is still answered, from the reply table.
    fn repeat_of(&self, e: &Executed) -> Executed {
        let newest = |client: &ClientId| self.newest_reply.get(client) == Some(&e.app_seq);
        Executed {
            app: e.app,
            app_seq: e.app_seq,
            exec: e.exec,
            digest: e.digest,
            replies: e
                .replies
                .iter()
                .filter(|r| newest(&r.client))
                .cloned()
                .collect(),
        }
    }

    fn on_order_inner(&mut self, from: ReplicaId, order: Order) -> Result<(), Rejected> {
        if self.crashed {
            return Err(Rejected::Crashed);
        }
        if order.app != self.p.app {
            return Err(Rejected::WrongApp(order.app));
        }
        if from as usize >= self.p.agreement_macs.len() {
            return Err(Rejected::UnknownReplica(from));
        }
        let app_seq = order.app_seq;
        if app_seq <= self.executed {
            if let Some((d, e)) = self.results.get(&app_seq) {
                if *d == order.digest() {
                    self.metrics.orders_repeated += 1;
                    let again = self.repeat_of(e);
                    self.ready.direct.push((from, ExecMessage::Executed(again)));
                    return Ok(());
                }
            }
            return Err(Rejected::Stale {
                app_seq,
                executed: self.executed,
            });
        }
        if !self.in_window(app_seq) {
            return Err(Rejected::OutsideWindow(app_seq));
        }
        let d = order.digest();
        let slot = self.slots.entry(app_seq).or_default();
        match slot.voters.get(&from) {
            Some(prev) if *prev == d => return Ok(()), // a retransmission
            Some(_) => {
                return Err(Rejected::Conflicting {
                    replica: from,
                    app_seq,
                })
            }
            None => {}
        }
        slot.voters.insert(from, d);
        slot.orders.entry(d).or_insert((0, order)).0 += 1;
        self.metrics.orders_accepted += 1;
        Ok(())
    }

    /// A stable checkpoint certificate from an agreement replica.
    pub fn on_stable(&mut self, cert: ExecCheckpointCert) -> Result<(), Rejected> {
        let r = self.on_stable_inner(cert);
        self.count(r)
    }

    fn on_stable_inner(&mut self, cert: ExecCheckpointCert) -> Result<(), Rejected> {
        if self.crashed {
            return Err(Rejected::Crashed);
        }
        if cert.app != self.p.app {
            return Err(Rejected::WrongApp(cert.app));
        }
        if self
            .stable
            .as_ref()
            .is_some_and(|s| s.app_seq >= cert.app_seq)
        {
            return Ok(()); // nothing new
        }
        if !cert.verify(self.p.f, &self.p.exec_keys) {
            return Err(Rejected::BadCertificate);
        }
        self.metrics.stable_certs += 1;
        if cert.app_seq > self.executed {
            self.ready.stable_ahead = Some(cert.clone());
            // Orders at or below it are of no use to a replica that jumps
            // there. It adopts the certified root and says so: the monitor
            // counts a replica that never votes for a checkpoint that became
            // stable in its epoch as one that failed to reach it.
            let ck = ExecCheckpoint {
                app: self.p.app,
                app_seq: cert.app_seq,
                root: cert.root,
                exec: self.p.index,
            };
            let sig = sign_exec_checkpoint(&ck, &self.p.key);
            self.ready.messages.push(ExecMessage::Checkpoint(ck, sig));
        }
        self.stable = Some(cert);
        Ok(())
    }

    /// One [`ExecEnvelope`] from the byte stream: checks route and MAC, then
    /// dispatches the order or certificate inside.
    pub fn on_envelope(&mut self, env: &ExecEnvelope) -> Result<(), Rejected> {
        let r = self.open_envelope(env);
        match self.count(r)? {
            (from, ExecMessage::Order(o)) => self.on_order(from, o),
            (_, ExecMessage::Stable(c)) => self.on_stable(c),
            _ => {
                let r = Err(Rejected::Unexpected);
                self.count(r)
            }
        }
    }

    fn open_envelope(&self, env: &ExecEnvelope) -> Result<(ReplicaId, ExecMessage), Rejected> {
        let ExecRoute::ToExecutor { from, to } = env.route else {
            return Err(Rejected::Envelope("not addressed to an executor".into()));
        };
        if to != self.id() {
            return Err(Rejected::Envelope(format!("addressed to {to}")));
        }
        let key = self
            .p
            .agreement_macs
            .get(from as usize)
            .ok_or(Rejected::UnknownReplica(from))?;
        let msg = env
            .open(key)
            .map_err(|e| Rejected::Envelope(e.to_string()))?;
        Ok((from, msg))
    }

    /// One frame body (an encoded [`ExecEnvelope`]) from the byte stream.
    pub fn on_frame(&mut self, body: &[u8]) -> Result<(), Rejected> {
        match zz_wire::codec::decode::<ExecEnvelope>(body) {
            Ok(env) => self.on_envelope(&env),
            Err(e) => {
                let r = Err(Rejected::Envelope(e.to_string()));
                self.count(r)
            }
        }
    }

    /// `msg` sealed for every agreement replica, in replica order.
    pub fn seal(&self, msg: &ExecMessage) -> Vec<ExecEnvelope> {
        self.p
            .agreement_macs
            .iter()
            .enumerate()
            .map(|(to, key)| {
                let route = ExecRoute::ToAgreement {
                    from: self.id(),
                    to: to as ReplicaId,
                };
                ExecEnvelope::seal(route, msg, key)
            })
            .collect()
    }

    /// `msg` sealed for agreement replica `to` alone (see [`Ready::direct`]);
    /// `None` for a replica id outside the cluster.
    pub fn seal_to(&self, to: ReplicaId, msg: &ExecMessage) -> Option<ExecEnvelope> {
        let key = self.p.agreement_macs.get(to as usize)?;
        let route = ExecRoute::ToAgreement {
            from: self.id(),
            to,
        };
        Some(ExecEnvelope::seal(route, msg, key))
    }

    /// Executes every app_seq that has become executable, settles the
    /// newest stable certificate, and returns what the driver must do.
    ///
    /// An `Err` is a local failure (storage, fetch, corrupt executor
    /// metadata); the replica must stop. Outputs produced before it are
    /// kept for the next call.
    pub fn ready(&mut self) -> Result<Ready, CoreError> {
        while !self.crashed {
            let Some(next) = self.executed.checked_add(1) else {
                break;
            };
            let quorum = self.slots.get(&next).and_then(|s| {
                s.orders
                    .iter()
                    .find(|(_, (votes, _))| *votes > self.p.f)
                    .map(|(d, _)| *d)
            });
            let Some(d) = quorum else { break };
            let Some(mut slot) = self.slots.remove(&next) else {
                break;
            };
            let Some((_, order)) = slot.orders.remove(&d) else {
                break;
            };
            let later = self.latest_ordered_requests();
            self.execute(order, &later)?;
        }
        self.settle_stable()?;
        Ok(std::mem::take(&mut self.ready))
    }

    /// Compares our checkpoint with the newest stable one once we are past
    /// it, and releases older checkpoints.
    fn settle_stable(&mut self) -> Result<(), CoreError> {
        let Some(cert) = &self.stable else {
            return Ok(());
        };
        if cert.app_seq <= self.settled || cert.app_seq > self.executed {
            return Ok(());
        }
        let cert = cert.clone();
        if let Some(root) = self.state.checkpoint_root(cert.app_seq)? {
            if root != cert.root {
                tracing::warn!(
                    app_seq = cert.app_seq,
                    "own checkpoint root differs from the stable one"
                );
                self.ready.diverged = Some(cert.clone());
            }
        }
        self.state.release_before(cert.app_seq)?;
        tracing::debug!(
            app_seq = cert.app_seq,
            "stable checkpoint settled; older ones released"
        );
        self.settled = cert.app_seq;
        self.results = self.results.split_off(&cert.app_seq.saturating_add(1));
        Ok(())
    }

    /// The newest request of each client in the orders buffered ahead of
    /// execution (a woken replica replaying the log has many). A client has
    /// one request pending at a time, so a client with a later request
    /// ordered has accepted every earlier one: replies to those are not sent.
    fn latest_ordered_requests(&self) -> HashMap<ClientId, u64> {
        let mut latest: HashMap<ClientId, u64> = HashMap::new();
        for slot in self.slots.values() {
            for (votes, order) in slot.orders.values() {
                if *votes <= self.p.f {
                    continue;
                }
                for r in &order.requests {
                    let e = latest.entry(r.client).or_insert(r.req_id);
                    *e = (*e).max(r.req_id);
                }
            }
        }
        latest
    }

    /// Executes one ordered batch; `later` is the newest request per client
    /// ordered after it (see [`Self::latest_ordered_requests`]).
    fn execute(&mut self, order: Order, later: &HashMap<ClientId, u64>) -> Result<(), CoreError> {
        let app_seq = order.app_seq;
        let order_digest = order.digest();
        let mut results: Vec<(ClientId, u64, Vec<u8>)> = Vec::with_capacity(order.requests.len());
        {
            let mut tx = Tx::new(&mut *self.state)?;
            let mut sb = Superblock::load(&mut tx)?;
            if sb.app_seq != self.executed {
                return Err(CoreError::StateMismatch {
                    expected: self.executed,
                    found: sb.app_seq,
                });
            }
            for r in &order.requests {
                if r.app != self.p.app {
                    self.metrics.requests_other_app += 1;
                    continue;
                }
                let key = r.client.to_le_bytes();
                let last = {
                    let mut reg = Region::new(&mut tx, &mut sb, REGION_REPLIES);
                    let mut table = PagedMap::open(&mut reg).map_err(map_err)?;
                    table.get(&key).map_err(map_err)?
                };
                let last = match last {
                    None => None,
                    Some(v) if v.len() >= 8 => {
                        let mut id = [0u8; 8];
                        id.copy_from_slice(&v[..8]);
                        Some((u64::from_le_bytes(id), v))
                    }
                    Some(_) => {
                        return Err(PageError::Corrupt("short reply-table entry".into()).into())
                    }
                };
                let result = match last {
                    Some((id, v)) if id == r.req_id => {
                        self.metrics.replies_cached += 1;
                        v[8..].to_vec()
                    }
                    Some((id, _)) if r.req_id < id => {
                        self.metrics.requests_stale += 1;
                        continue;
                    }
                    _ => {
                        let ctx = ExecContext {
                            app: self.p.app,
                            app_seq,
                            seq: order.seq,
                            client: r.client,
                            req_id: r.req_id,
                            read_only: r.read_only,
                        };
                        let mut result = {
                            let mut reg = Region::new(&mut tx, &mut sb, REGION_APP);
                            self.app.execute(&ctx, &mut reg, &r.op)?
                        };
                        if result.len() > MAX_RESULT {
                            result = RESULT_TOO_LARGE.to_vec();
                        }
                        let mut entry = Vec::with_capacity(8 + result.len());
                        entry.extend_from_slice(&r.req_id.to_le_bytes());
                        entry.extend_from_slice(&result);
                        let mut reg = Region::new(&mut tx, &mut sb, REGION_REPLIES);
                        let mut table = PagedMap::open(&mut reg).map_err(map_err)?;
                        table.put(&key, &entry).map_err(map_err)?;
                        self.metrics.requests_executed += 1;
                        result
                    }
                };
                results.push((r.client, r.req_id, result));
            }
            sb.app_seq = app_seq;
            sb.store(&mut tx)?;
            tx.commit()?;
        }
        self.executed = app_seq;
        self.metrics.batches_executed += 1;
        self.slots.retain(|s, _| *s > app_seq);

        let faults = self.p.faults;
        let interval = self.p.checkpoint_interval;
        if let Some(c) = faults.corrupt_page.filter(|c| {
            c.after == app_seq
                || (c.persistent && app_seq > c.after && app_seq.is_multiple_of(interval))
        }) {
            self.corrupt_page(c.page)?;
        }
        if faults.wrong_replies(app_seq) {
            for (_, _, res) in &mut results {
                corrupt_result(res);
            }
        }
        let digest = results_digest(
            &results
                .iter()
                .map(|(c, id, res)| (*c, *id, res.as_slice()))
                .collect::<Vec<_>>(),
        );
        let mut replies = Vec::with_capacity(results.len());
        for (client, req_id, result) in results {
            if later.get(&client).is_some_and(|l| *l > req_id) {
                self.metrics.replies_superseded += 1;
                continue;
            }
            match self.p.client_macs.get(&client) {
                Some(k) => replies.push(Reply::new(0, self.p.index, client, req_id, result, k)),
                None => self.metrics.replies_unaddressed += 1,
            }
        }
        let executed = Executed {
            app: self.p.app,
            app_seq,
            exec: self.p.index,
            digest,
            replies,
        };
        for r in &executed.replies {
            self.newest_reply.insert(r.client, app_seq);
        }
        self.results
            .insert(app_seq, (order_digest, executed.clone()));
        while self.results.len() as u64 > self.p.window {
            self.results.pop_first();
        }
        self.ready.messages.push(ExecMessage::Executed(executed));
        if app_seq.is_multiple_of(self.p.checkpoint_interval) {
            match self.state.checkpoint(app_seq)? {
                Some(root) => {
                    let ck = ExecCheckpoint {
                        app: self.p.app,
                        app_seq,
                        root,
                        exec: self.p.index,
                    };
                    let sig = sign_exec_checkpoint(&ck, &self.p.key);
                    self.ready.messages.push(ExecMessage::Checkpoint(ck, sig));
                    self.metrics.checkpoints_taken += 1;
                }
                None => self.metrics.checkpoints_skipped += 1,
            }
        }
        self.ready.delay_ms = self.ready.delay_ms.saturating_add(faults.slow_ms);
        if faults.crash_after == Some(app_seq) {
            self.crashed = true;
            self.ready.crash = true;
        }
        Ok(())
    }

    /// Fault injection: flips bits of one physical page.
    fn corrupt_page(&mut self, page: Option<u64>) -> Result<(), CoreError> {
        let n = self.state.num_pages()?;
        if n == 0 {
            return Ok(());
        }
        let index = page.unwrap_or(n - 1).min(n - 1);
        let mut data = self.state.read_page(index)?;
        if data.len() != PAGE_SIZE {
            return Err(PageError::PageSize(data.len()).into());
        }
        // A fixed pattern, not a bit flip: corrupting twice must not heal.
        let garbage = &mut data[PAGE_SIZE / 2..PAGE_SIZE / 2 + 16];
        if garbage.iter().all(|b| *b == 0xA5) {
            return Ok(());
        }
        garbage.fill(0xA5);
        tracing::warn!(page = index, "fault injection: corrupting a page of state");
        self.state.write_page(index, &data)?;
        Ok(())
    }

    /// Replaces the state with one holding stable checkpoint `cert` (for
    /// example a [`crate::RecoveringState`] of it) and resumes after
    /// `cert.app_seq`. Buffered orders above it are kept. Returns the
    /// previous backend.
    pub fn install_state(
        &mut self,
        mut state: Box<dyn StateBackend>,
        cert: &ExecCheckpointCert,
    ) -> Result<Box<dyn StateBackend>, CoreError> {
        if cert.app != self.p.app || !cert.verify(self.p.f, &self.p.exec_keys) {
            return Err(CoreError::BadCertificate);
        }
        let found = stored_app_seq(&mut *state)?;
        if found != cert.app_seq {
            return Err(CoreError::StateMismatch {
                expected: cert.app_seq,
                found,
            });
        }
        let old = std::mem::replace(&mut self.state, state);
        self.executed = cert.app_seq;
        self.settled = self.settled.max(cert.app_seq);
        self.slots.retain(|s, _| *s > cert.app_seq);
        self.results.clear();
        self.newest_reply.clear();
        if self
            .stable
            .as_ref()
            .is_none_or(|s| s.app_seq < cert.app_seq)
        {
            self.stable = Some(cert.clone());
        }
        Ok(old)
    }

    /// Replaces the backend by another holding the same state (for example
    /// the plain store once a recovery has fetched every page). Returns the
    /// previous backend.
    pub fn swap_state(
        &mut self,
        mut state: Box<dyn StateBackend>,
    ) -> Result<Box<dyn StateBackend>, CoreError> {
        let found = stored_app_seq(&mut *state)?;
        if found != self.executed {
            return Err(CoreError::StateMismatch {
                expected: self.executed,
                found,
            });
        }
        Ok(std::mem::replace(&mut self.state, state))
    }

    /// Runs `f` over the app's pages, read-only: whatever `f` writes is
    /// discarded. For inspection tools and tests.
    pub fn inspect_app<R>(&mut self, f: impl FnOnce(&mut dyn Pages) -> R) -> Result<R, CoreError> {
        let mut tx = Tx::new(&mut *self.state)?;
        let mut sb = Superblock::load(&mut tx)?;
        let mut reg = Region::new(&mut tx, &mut sb, REGION_APP);
        Ok(f(&mut reg))
    }
}

#[cfg(test)]
mod tests;
