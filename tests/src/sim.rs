//! A deterministic simulator: 3f+1 sans-IO replicas and closed-loop clients in
//! one process, over a simulated network that drops, delays, duplicates,
//! reorders and partitions, with up to f Byzantine replicas.
//!
//! Everything random comes from one seeded ChaCha generator and events are
//! ordered by (time, insertion number), so a seed replays exactly.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use zz_agreement::app::{new_app, Service};
use zz_agreement::persist::PersistentState;
use zz_agreement::replica::CommittedBatch;
use zz_agreement::{Replica, ReplicaOptions, Target};
use zz_wire::config::{AgreementTuning, ClientKeys, ReplicaKeys};
use zz_wire::crypto::KeyPair;
use zz_wire::message::{ClientRequest, PeerEnvelope, Reply, Request};
use zz_wire::{ClientId, ReplicaId};

use crate::byzantine::{Behaviour, Byzantine};
use crate::checker::{Ack, Checker, Violation};
use crate::exec_sim::{ExecFault, SimExecutor, SimHost};
use zz_wire::crypto::MacKey;
use zz_wire::exec::{
    ExecEnvelope, ExecId, ExecIndex, ExecMessage, ExecRoute, HostAction, HostCommand,
};
use zz_wire::message::Signed;

/// Parameters of one simulated run.
#[derive(Clone, Debug)]
pub struct SimConfig {
    pub f: usize,
    pub seed: u64,
    pub behaviour: Behaviour,
    pub clients: usize,
    pub ops_per_client: usize,
    /// Length of the faulty phase (drops, partitions); the network heals after.
    pub faulty_ms: u64,
    /// Give up (a liveness violation) if clients are not done by then.
    pub max_ms: u64,
    /// Test-only: correct replicas commit on this many commits instead of 2f+1.
    pub broken_commit_quorum: Option<usize>,
    /// Run the app on 2f+1 simulated execution replicas (f+1 active) with
    /// these faulty ones, instead of inside the agreement replicas.
    pub exec: Option<ExecScenario>,
}

/// Faulty execution replicas of a run, and how they fail.
#[derive(Clone, Debug)]
pub struct ExecScenario {
    pub fault: ExecFault,
    pub faulty: Vec<ExecIndex>,
    /// When the fault starts at the latest. It starts earlier, once half of
    /// the clients' operations have completed, if that comes first: a fault
    /// injected after the load ended is never exercised (no order reaches
    /// the faulty replica), so no run could detect it.
    pub at_ms: u64,
}

impl SimConfig {
    pub fn new(f: usize, seed: u64, behaviour: Behaviour) -> Self {
        SimConfig {
            f,
            seed,
            behaviour,
            clients: 3,
            ops_per_client: 6,
            faulty_ms: 2_000,
            max_ms: 120_000,
            broken_commit_quorum: None,
            exec: None,
        }
    }
}

/// What a finished run saw.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Outcome {
    pub acked: usize,
    pub max_view: u64,
    pub committed_seqs: u64,
    pub messages_delivered: u64,
    pub end_ms: u64,
    pub state_transfers: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Node {
    Replica(ReplicaId),
    Client(usize),
    Executor(ExecIndex),
    Host,
}

#[derive(Clone, Debug)]
pub enum Wire {
    Peer(PeerEnvelope),
    Request(ClientRequest),
    Reply(Reply),
    Exec(ExecEnvelope),
    HostCommand(Signed<HostCommand>),
}

#[derive(Debug)]
enum Event {
    Deliver { to: Node, wire: Wire },
    Tick(ReplicaId),
    ClientTimer { client: usize, req_id: u64 },
    Crash(ReplicaId),
    Restart(ReplicaId),
    ExecTick(ExecIndex),
    ExecFault,
}

struct NetParams {
    drop: f64,
    dup: f64,
    max_delay: u64,
}

struct SimClient {
    id: ClientId,
    keys: ClientKeys,
    next_req: u64,
    done: usize,
    outstanding: Option<(Request, u64)>,
    replies: BTreeMap<ReplicaId, Vec<u8>>,
    /// MAC keys shared with each execution replica.
    exec_mac: Vec<MacKey>,
}

pub struct ReplicaSlot {
    pub replica: Replica,
    pub persisted: PersistentState,
    pub crashed: bool,
    pub byzantine: Option<Byzantine>,
}

pub struct Sim {
    cfg: SimConfig,
    n: usize,
    rng: ChaCha8Rng,
    now: u64,
    counter: u64,
    events: BTreeMap<(u64, u64), Event>,
    net: NetParams,
    partition: Option<(BTreeSet<ReplicaId>, u64)>,
    pub replicas: Vec<ReplicaSlot>,
    replica_keys: Vec<ReplicaKeys>,
    clients: Vec<SimClient>,
    checker: Checker,
    outcome: Outcome,
    tuning: AgreementTuning,
    executors: Vec<SimExecutor>,
    host: SimHost,
    exec_pubs: Vec<ed25519_dalek::VerifyingKey>,
    replica_pubs: Vec<ed25519_dalek::VerifyingKey>,
    /// The execution fault has started (see [`ExecScenario::at_ms`]).
    exec_fault_started: bool,
}

/// Agreement replica options for a run.
fn options(
    n: usize,
    f: usize,
    tuning: &AgreementTuning,
    exec_pubs: &[ed25519_dalek::VerifyingKey],
) -> ReplicaOptions {
    let mut opts = ReplicaOptions::new(n, f, tuning.clone());
    opts.max_inflight_batches = 2;
    if !exec_pubs.is_empty() {
        opts.remote_apps.insert(0, exec_pubs.to_vec());
        opts.exec_timeout_min_ms = 300;
    }
    opts
}

pub const TICK_MS: u64 = 10;
const CLIENT_RETRY_MS: u64 = 400;

fn new_service() -> Service {
    Service::new(vec![(0, new_app("counter").expect("built-in app"))])
}

impl Sim {
    pub fn new(cfg: SimConfig) -> Self {
        let n = 3 * cfg.f + 1;
        let mut rng = ChaCha8Rng::seed_from_u64(cfg.seed);
        let keys: Vec<KeyPair> = (0..n)
            .map(|i| {
                let mut s = [0u8; 32];
                s[0] = i as u8;
                s[1] = 0xA5;
                KeyPair::from_seed(s)
            })
            .collect();
        let pubs: Vec<_> = keys.iter().map(|k| k.public()).collect();
        let client_pairs: Vec<(ClientId, KeyPair)> = (0..cfg.clients)
            .map(|i| {
                let mut s = [0u8; 32];
                s[0] = i as u8;
                s[1] = 0xC1;
                (1000 + i as ClientId, KeyPair::from_seed(s))
            })
            .collect();
        let client_pubs: HashMap<_, _> = client_pairs
            .iter()
            .map(|(id, k)| (*id, k.public()))
            .collect();
        let exec_keys: Vec<KeyPair> = if cfg.exec.is_some() {
            (0..2 * cfg.f + 1)
                .map(|i| {
                    let mut s = [0u8; 32];
                    s[0] = i as u8;
                    s[1] = 0xE7;
                    KeyPair::from_seed(s)
                })
                .collect()
        } else {
            vec![]
        };
        let exec_pubs: Vec<_> = exec_keys.iter().map(|k| k.public()).collect();
        let tuning = AgreementTuning {
            batch_max_requests: 4,
            window: 16,
            checkpoint_interval: 4,
            view_change_timeout_ms: 500,
            status_interval_ms: 100,
            ..AgreementTuning::default()
        };
        let replica_keys: Vec<ReplicaKeys> = keys
            .iter()
            .enumerate()
            .map(|(i, k)| {
                ReplicaKeys::derive(i as ReplicaId, k.clone(), pubs.clone(), &client_pubs)
            })
            .collect();
        let byz_ids = cfg.behaviour.byzantine_replicas(cfg.f, n);
        let replicas = replica_keys
            .iter()
            .enumerate()
            .map(|(i, rk)| {
                let opts = options(n, cfg.f, &tuning, &exec_pubs);
                let mut replica = Replica::new(opts, rk.clone(), new_service());
                let byzantine = if byz_ids.contains(&(i as ReplicaId)) {
                    Some(Byzantine::new(cfg.behaviour, rk.clone(), n))
                } else {
                    if let Some(q) = cfg.broken_commit_quorum {
                        replica.break_commit_quorum(q);
                    }
                    None
                };
                ReplicaSlot {
                    replica,
                    persisted: PersistentState {
                        view_active: true,
                        ..Default::default()
                    },
                    crashed: false,
                    byzantine,
                }
            })
            .collect();
        let clients = client_pairs
            .iter()
            .map(|(id, k)| SimClient {
                id: *id,
                keys: ClientKeys::derive(*id, k, &pubs),
                next_req: 1,
                done: 0,
                outstanding: None,
                replies: BTreeMap::new(),
                exec_mac: exec_pubs.iter().map(|p| k.shared_mac_key(p)).collect(),
            })
            .collect();
        let executors = exec_keys
            .iter()
            .enumerate()
            .map(|(i, k)| {
                let id = ExecId {
                    app: 0,
                    index: i as ExecIndex,
                };
                let agreement_mac = pubs.iter().map(|p| k.shared_mac_key(p)).collect();
                let client_mac = client_pubs
                    .iter()
                    .map(|(c, p)| (*c, k.shared_mac_key(p)))
                    .collect();
                SimExecutor::new(id, k.clone(), cfg.f, agreement_mac, client_mac, i <= cfg.f)
            })
            .collect();
        let net = NetParams {
            drop: rng.gen_range(0.0..0.15),
            dup: rng.gen_range(0.0..0.1),
            max_delay: rng.gen_range(2..40),
        };
        Sim {
            n,
            rng,
            now: 0,
            counter: 0,
            events: BTreeMap::new(),
            net,
            partition: None,
            replicas,
            replica_keys,
            clients,
            checker: Checker::new(cfg.seed),
            outcome: Outcome::default(),
            tuning,
            executors,
            host: SimHost::default(),
            exec_pubs,
            replica_pubs: pubs,
            cfg,
            exec_fault_started: false,
        }
    }

    fn schedule(&mut self, at: u64, ev: Event) {
        self.counter += 1;
        self.events.insert((at, self.counter), ev);
    }

    fn healed(&self) -> bool {
        self.now >= self.cfg.faulty_ms
    }

    fn partitioned(&self, a: Node, b: Node) -> bool {
        let Some((set, until)) = &self.partition else {
            return false;
        };
        if self.now >= *until {
            return false;
        }
        match (a, b) {
            (Node::Replica(x), Node::Replica(y)) => set.contains(&x) != set.contains(&y),
            _ => false,
        }
    }

    pub fn send(&mut self, from: Node, to: Node, wire: Wire) {
        if self.partitioned(from, to) {
            return;
        }
        let healed = self.healed();
        let (drop, dup, max_delay) = if healed {
            (0.0, 0.0, 5)
        } else {
            (self.net.drop, self.net.dup, self.net.max_delay)
        };
        if self.rng.gen_bool(drop) {
            return;
        }
        let copies = if self.rng.gen_bool(dup) { 2 } else { 1 };
        for _ in 0..copies {
            let delay = self.rng.gen_range(1..=max_delay);
            self.schedule(
                self.now + delay,
                Event::Deliver {
                    to,
                    wire: wire.clone(),
                },
            );
        }
    }

    /// Runs to completion; `Err` carries the first violated property.
    pub fn run(mut self) -> Result<Outcome, Violation> {
        for r in 0..self.n as ReplicaId {
            let t = self.rng.gen_range(0..TICK_MS);
            self.schedule(t, Event::Tick(r));
        }
        for c in 0..self.clients.len() {
            let t = self.rng.gen_range(0..50);
            self.schedule(
                t,
                Event::ClientTimer {
                    client: c,
                    req_id: 0,
                },
            );
        }
        if self.cfg.behaviour == Behaviour::CrashRestart {
            let victim = self.rng.gen_range(0..self.n as ReplicaId);
            let at = self.rng.gen_range(100..self.cfg.faulty_ms);
            self.schedule(at, Event::Crash(victim));
            let back = at + self.rng.gen_range(200..3_000);
            self.schedule(back, Event::Restart(victim));
        }
        if let Some(sc) = &self.cfg.exec {
            let at = sc.at_ms;
            self.schedule(at, Event::ExecFault);
            for i in 0..self.executors.len() as ExecIndex {
                self.schedule(i as u64, Event::ExecTick(i));
            }
        }
        while let Some(((at, _), ev)) = self.events.pop_first() {
            self.now = at;
            if self.now > self.cfg.max_ms {
                break;
            }
            self.maybe_partition();
            self.handle(ev)?;
            if !self.exec_fault_started && self.half_the_load_done() {
                self.start_exec_fault();
            }
            let done = self
                .clients
                .iter()
                .all(|c| c.done >= self.cfg.ops_per_client);
            if done && self.exec_settled() {
                break;
            }
        }
        if self.cfg.exec.is_some() && !self.exec_settled() {
            let states: Vec<_> = self
                .replicas
                .iter()
                .map(|r| r.replica.exec_state(0).cloned())
                .collect();
            return Err(self.checker.violation(format!(
                "execution replicas did not settle back to f+1 active with the faulty ones reimaged by {} ms; host log {:?}; states {states:?}",
                self.now, &self.host.log[self.host.log.len().saturating_sub(12)..],
            ) + &format!("; monitors: {:?}; executors executed {:?}",
                self.replicas.iter().map(|r| r.replica.monitor_summary(0)).collect::<Vec<_>>(),
                self.executors.iter().map(|e| (e.executed, e.awake, e.wants_state.as_ref().map(|c| c.app_seq))).collect::<Vec<_>>()
            )));
        }
        let incomplete: usize = self
            .clients
            .iter()
            .map(|c| self.cfg.ops_per_client - c.done.min(self.cfg.ops_per_client))
            .sum();
        if incomplete > 0 {
            let views: Vec<_> = self
                .replicas
                .iter()
                .map(|r| {
                    (
                        r.replica.view(),
                        r.replica.view_active(),
                        r.replica.last_executed(),
                    )
                })
                .collect();
            return Err(self.checker.violation(format!(
                "liveness: {incomplete} requests incomplete at {} ms, after the network healed at {} ms; replicas (view, active, last_executed): {views:?}",
                self.now, self.cfg.faulty_ms
            )));
        }
        self.checker.final_check()?;
        self.outcome.end_ms = self.now;
        self.outcome.acked = self.checker.acked();
        self.outcome.committed_seqs = self.checker.committed_len();
        self.outcome.max_view = self
            .replicas
            .iter()
            .map(|r| r.replica.view())
            .max()
            .unwrap_or(0);
        self.outcome.state_transfers = self
            .replicas
            .iter()
            .map(|r| r.replica.metrics().state_transfers)
            .sum();
        Ok(self.outcome)
    }

    /// Makes the scenario's faulty execution replicas faulty (once).
    fn start_exec_fault(&mut self) {
        if self.exec_fault_started {
            return;
        }
        self.exec_fault_started = true;
        if let Some(sc) = self.cfg.exec.clone() {
            for i in sc.faulty {
                self.executors[i as usize].fault = sc.fault;
            }
        }
    }

    /// Half of all client operations have completed (an execution
    /// scenario's fault must start while orders still flow).
    fn half_the_load_done(&self) -> bool {
        if self.cfg.exec.is_none() {
            return false;
        }
        let done: usize = self
            .clients
            .iter()
            .map(|c| c.done.min(self.cfg.ops_per_client))
            .sum();
        2 * done >= self.clients.len() * self.cfg.ops_per_client
    }

    /// With faulty execution replicas: every correct agreement replica is
    /// back to f+1 active replicas, none of them faulty, and the host agent
    /// reimaged each faulty replica.
    fn exec_settled(&self) -> bool {
        let Some(sc) = &self.cfg.exec else {
            return true;
        };
        let reimaged = sc
            .faulty
            .iter()
            .all(|i| self.executors[*i as usize].reimaged > 0);
        // A reimaged replica is correct again and may rejoin the active set.
        let tables_ok = self
            .replicas
            .iter()
            .filter(|r| r.byzantine.is_none())
            .all(|r| {
                r.replica.exec_state(0).is_some_and(|st| {
                    !st.recovering
                        && st.active.len() == self.cfg.f + 1
                        && st
                            .active
                            .iter()
                            .all(|i| self.executors[*i as usize].fault == ExecFault::None)
                })
            });
        reimaged && tables_ok
    }

    fn maybe_partition(&mut self) {
        if self.healed() {
            self.partition = None;
            return;
        }
        let active = self
            .partition
            .as_ref()
            .is_some_and(|(_, until)| self.now < *until);
        if !active && self.rng.gen_bool(0.002) {
            let size = self.rng.gen_range(1..=self.n / 2);
            let mut set = BTreeSet::new();
            while set.len() < size {
                set.insert(self.rng.gen_range(0..self.n as ReplicaId));
            }
            let until = self.now + self.rng.gen_range(50..800);
            self.partition = Some((set, until));
        }
    }

    fn handle(&mut self, ev: Event) -> Result<(), Violation> {
        match ev {
            Event::Tick(r) => {
                self.schedule(self.now + TICK_MS, Event::Tick(r));
                let now = self.now;
                let slot = &mut self.replicas[r as usize];
                if slot.crashed {
                    return Ok(());
                }
                slot.replica.tick(now);
                if let Some(b) = slot.byzantine.as_mut() {
                    let extra = b.on_tick(&mut self.rng, now, &slot.replica);
                    self.dispatch_raw(r, extra);
                }
                self.drain(r)
            }
            Event::Deliver {
                to: Node::Replica(r),
                wire,
            } => {
                self.outcome.messages_delivered += 1;
                let slot = &mut self.replicas[r as usize];
                if slot.crashed {
                    return Ok(());
                }
                match wire {
                    Wire::Peer(env) => {
                        if env.to != r || env.from as usize >= self.n {
                            return Ok(());
                        }
                        let Ok(msg) =
                            env.open(&self.replica_keys[r as usize].peer_mac[env.from as usize])
                        else {
                            return Ok(()); // forged or corrupted: dropped
                        };
                        let _ = slot.replica.step(env.from, msg);
                    }
                    Wire::Request(req) => {
                        let _ = slot.replica.on_request(req);
                    }
                    Wire::Exec(env) => {
                        let ExecRoute::ToAgreement { from, to } = env.route else {
                            return Ok(());
                        };
                        if to != r || from.app != 0 || from.index as usize >= self.executors.len() {
                            return Ok(());
                        }
                        let key = self.executors[from.index as usize].agreement_mac[r as usize];
                        let Ok(msg) = env.open(&key) else {
                            return Ok(());
                        };
                        let _ = slot.replica.on_exec(from, msg);
                    }
                    Wire::Reply(_) | Wire::HostCommand(_) => {}
                }
                self.drain(r)
            }
            Event::Deliver {
                to: Node::Client(c),
                wire: Wire::Reply(reply),
            } => {
                self.outcome.messages_delivered += 1;
                self.on_reply(c, reply)
            }
            Event::Deliver {
                to: Node::Executor(i),
                wire: Wire::Exec(env),
            } => {
                self.outcome.messages_delivered += 1;
                let ExecRoute::ToExecutor { from, to } = env.route else {
                    return Ok(());
                };
                let ex = &mut self.executors[i as usize];
                if to != ex.id || from as usize >= self.n {
                    return Ok(());
                }
                let Ok(msg) = env.open(&ex.agreement_mac[from as usize]) else {
                    return Ok(());
                };
                let out = ex.on_message(from, msg, &self.exec_pubs);
                self.exec_send(i, out);
                self.exec_fetch(i);
                Ok(())
            }
            Event::Deliver {
                to: Node::Host,
                wire: Wire::HostCommand(cmd),
            } => {
                if let Some((id, action)) =
                    self.host.on_command(&cmd, self.cfg.f, &self.replica_pubs)
                {
                    let ex = &mut self.executors[id.index as usize];
                    match action {
                        HostAction::Wake => ex.awake = true,
                        HostAction::Sleep => ex.awake = false,
                        HostAction::Reimage => ex.reimage(),
                    }
                }
                Ok(())
            }
            Event::Deliver { .. } => Ok(()),
            Event::ExecTick(i) => {
                self.schedule(self.now + 50, Event::ExecTick(i));
                self.exec_fetch(i);
                Ok(())
            }
            Event::ExecFault => {
                self.start_exec_fault();
                Ok(())
            }
            Event::ClientTimer { client, req_id } => {
                self.client_timer(client, req_id);
                Ok(())
            }
            Event::Crash(r) => {
                self.replicas[r as usize].crashed = true;
                Ok(())
            }
            Event::Restart(r) => {
                let n = self.n;
                let opts = options(n, self.cfg.f, &self.tuning, &self.exec_pubs);
                let slot = &mut self.replicas[r as usize];
                let mut replica = Replica::restore(
                    opts,
                    self.replica_keys[r as usize].clone(),
                    new_service(),
                    slot.persisted.clone(),
                );
                if let Some(q) = self.cfg.broken_commit_quorum {
                    replica.break_commit_quorum(q);
                }
                replica.tick(self.now);
                slot.replica = replica;
                slot.crashed = false;
                self.drain(r)
            }
        }
    }

    /// Takes a replica's outputs: persists, checks, and sends them.
    fn drain(&mut self, r: ReplicaId) -> Result<(), Violation> {
        loop {
            let slot = &mut self.replicas[r as usize];
            let ready = slot.replica.ready();
            if ready.is_empty() {
                return Ok(());
            }
            for op in &ready.persist {
                slot.persisted.apply(op);
            }
            if slot.byzantine.as_ref().is_some_and(|b| b.silent(self.now)) {
                continue;
            }
            for (to, msg) in &ready.exec {
                if (to.index as usize) < self.executors.len() {
                    let key = self.executors[to.index as usize].agreement_mac[r as usize];
                    let env =
                        ExecEnvelope::seal(ExecRoute::ToExecutor { from: r, to: *to }, msg, &key);
                    self.send(Node::Replica(r), Node::Executor(to.index), Wire::Exec(env));
                }
            }
            for cmd in &ready.host_commands {
                self.send(Node::Replica(r), Node::Host, Wire::HostCommand(cmd.clone()));
            }
            let slot = &mut self.replicas[r as usize];
            let (envs, replies) = match slot.byzantine.as_mut() {
                Some(b) => b.mutate(&mut self.rng, ready.messages, ready.replies),
                None => {
                    for CommittedBatch { seq, digest, batch } in ready.committed {
                        self.checker.committed(r, seq, digest, batch)?;
                    }
                    let keys = &self.replica_keys[r as usize];
                    let mut envs = Vec::new();
                    for (t, m) in ready.messages {
                        let tos: Vec<ReplicaId> = match t {
                            Target::All => (0..self.n as ReplicaId).filter(|x| *x != r).collect(),
                            Target::Replica(to) => vec![to],
                        };
                        for to in tos {
                            envs.push(PeerEnvelope::seal(r, to, &m, &keys.peer_mac[to as usize]));
                        }
                    }
                    (envs, ready.replies)
                }
            };
            self.dispatch_raw(r, envs);
            for reply in replies {
                let c = reply.client.saturating_sub(1000) as usize;
                if reply.client >= 1000 && c < self.clients.len() {
                    self.send(Node::Replica(r), Node::Client(c), Wire::Reply(reply));
                }
            }
        }
    }

    /// Sends an execution replica's outputs to every agreement replica.
    fn exec_send(&mut self, i: ExecIndex, out: Vec<ExecMessage>) {
        let id = self.executors[i as usize].id;
        for msg in out {
            for r in 0..self.n as ReplicaId {
                let key = self.executors[i as usize].agreement_mac[r as usize];
                let env =
                    ExecEnvelope::seal(ExecRoute::ToAgreement { from: id, to: r }, &msg, &key);
                self.send(Node::Executor(i), Node::Replica(r), Wire::Exec(env));
            }
        }
    }

    /// A replica waiting for certified state asks its peers for their copy of
    /// that checkpoint; it accepts only a copy matching the certified root.
    fn exec_fetch(&mut self, i: ExecIndex) {
        let Some(cert) = self.executors[i as usize].wants_state.clone() else {
            return;
        };
        let copies: Vec<Vec<u8>> = self
            .executors
            .iter()
            .enumerate()
            .filter(|(j, e)| *j != i as usize && e.fault != ExecFault::Crashed)
            .filter_map(|(_, e)| e.snapshots.get(&cert.app_seq).cloned())
            .collect();
        for snap in copies {
            let ex = &mut self.executors[i as usize];
            if ex.wants_state.is_none() {
                break;
            }
            let out = ex.offer_state(cert.app_seq, &snap);
            self.exec_send(i, out);
        }
    }

    fn dispatch_raw(&mut self, from: ReplicaId, envs: Vec<PeerEnvelope>) {
        for env in envs {
            let to = env.to;
            if (to as usize) < self.n {
                self.send(Node::Replica(from), Node::Replica(to), Wire::Peer(env));
            }
        }
    }

    fn client_timer(&mut self, c: usize, req_id: u64) {
        let cl = &mut self.clients[c];
        match &cl.outstanding {
            // A stale timer for a request that already completed.
            Some((req, _)) if req_id != 0 && req.req_id != req_id => return,
            None if req_id != 0 => return,
            _ => {}
        }
        if cl.outstanding.is_none() {
            if cl.done >= self.cfg.ops_per_client {
                return;
            }
            let id = cl.next_req;
            cl.next_req += 1;
            let delta = (self.rng.gen_range(1..100u64)).to_le_bytes().to_vec();
            let req = Request {
                client: cl.id,
                req_id: id,
                app: 0,
                op: delta,
                read_only: false,
            };
            cl.outstanding = Some((req, self.now));
            cl.replies.clear();
        }
        let cl = &self.clients[c];
        let (req, _) = cl.outstanding.clone().expect("set above");
        let creq = ClientRequest::new(req.clone(), &cl.keys.replica_mac);
        for r in 0..self.n as ReplicaId {
            self.send(
                Node::Client(c),
                Node::Replica(r),
                Wire::Request(creq.clone()),
            );
        }
        self.schedule(
            self.now + CLIENT_RETRY_MS,
            Event::ClientTimer {
                client: c,
                req_id: req.req_id,
            },
        );
    }

    fn on_reply(&mut self, c: usize, reply: Reply) -> Result<(), Violation> {
        let f = self.cfg.f;
        let cl = &mut self.clients[c];
        let Some((req, invoked)) = cl.outstanding.clone() else {
            return Ok(());
        };
        // Replies come from execution replicas when the app runs on them,
        // from agreement replicas otherwise: verify with the matching key.
        let keys = if self.cfg.exec.is_some() {
            &cl.exec_mac
        } else {
            &cl.keys.replica_mac
        };
        if reply.req_id != req.req_id
            || reply.client != cl.id
            || reply.replica as usize >= keys.len()
        {
            return Ok(());
        }
        if !reply.verify(&keys[reply.replica as usize]) {
            return Ok(());
        }
        cl.replies.insert(reply.replica, reply.result.clone());
        let matching = cl.replies.values().filter(|r| **r == reply.result).count();
        if matching > f {
            let ack = Ack {
                client: cl.id,
                req_id: req.req_id,
                op: req.op.clone(),
                result: reply.result,
                invoked_ms: invoked,
                completed_ms: self.now,
            };
            cl.outstanding = None;
            cl.done += 1;
            self.checker.acknowledged(ack)?;
            self.schedule(
                self.now + 1,
                Event::ClientTimer {
                    client: c,
                    req_id: 0,
                },
            );
        }
        Ok(())
    }
}

/// Runs one seed; the error string names the seed and how to replay it.
pub fn run_seed(cfg: SimConfig) -> Result<Outcome, Violation> {
    Sim::new(cfg).run()
}
