//! The host agent's operator side: what `zzctl` reads from and sends to a
//! `zz-hostd`.
//!
//! - **HTTP** on the host's `metrics_addr`: `GET /metrics` is Prometheus text
//!   (frames, bad frames dropped, host commands by action, wakes, reimages,
//!   pages fetched by recovering replicas, recovery durations, fault drills);
//!   `GET /status` is a JSON [`HostStatus`]: every replica's lifecycle state,
//!   the host command it is carrying out, and its recovery progress.
//! - **Fault drills**: a [`Frame::Operator`] carrying
//!   [`OperatorAction::Fault`], sent as the first frame of a connection to
//!   the host agent's `addr` (where agreement replicas send their hello). It
//!   is carried out only if it verifies against the config's operator key,
//!   the config sets `execution.allow_fault_injection`, it is fresh (at most
//!   [`MAX_COMMAND_AGE_MS`] old, nonce not seen before) and names a replica
//!   of this host: the plan is written into the replica's state folder (for
//!   a VM, into its stopped disk image, with e2fsprogs, after replaying the
//!   journal) and a live replica is restarted so it reads it (its state is
//!   kept; a dormant one is put back to sleep). The answer is a
//!   [`Frame::OperatorAck`].
//!
//! Recovery progress comes from two places: the host agent counts the pages
//! it relays to each replica (every fetched page passes through it), and it
//! reads the replica's own log, which it writes, for the number of pages the
//! recovery found missing and for the duration of a completed recovery. A
//! replica's missing-page count is therefore exact when recovery starts and
//! when it completes, and an estimate (missing minus pages relayed since)
//! in between.

use std::collections::{HashMap, HashSet, VecDeque};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::watch;
use zz_wire::codec;
use zz_wire::config::ClusterConfig;
use zz_wire::exec::{Epoch, ExecId, HostAction};
use zz_wire::message::Frame;
use zz_wire::operator::{OperatorAck, OperatorAction, OperatorSigned, MAX_COMMAND_AGE_MS};

use crate::lifecycle::{carry_out, DormantMode, ReplicaLifecycle, ReplicaState};

/// Path of the status document on the metrics port.
pub const STATUS_PATH: &str = "/status";

/// What happened to one replica, as the host agent saw it.
#[derive(Clone, Debug, Default)]
struct ExecEvents {
    /// The host command being carried out now.
    busy: Option<HostAction>,
    /// The last host command carried out, and its epoch.
    last: Option<(HostAction, Epoch, bool)>,
    /// When the last host command ended.
    last_at: Option<std::time::Instant>,
    /// Pages relayed to this replica in answer to its fetches, ever.
    pages_total: u64,
    /// Pages relayed since it was last woken or reimaged.
    pages_since_wake: u64,
}

/// Counters and per-replica events the operator side reports; part of the
/// host agent's [`crate::hostd::HostStats`].
#[derive(Debug, Default)]
pub struct OpsState {
    pub wakes: AtomicU64,
    pub sleeps: AtomicU64,
    pub reimages: AtomicU64,
    pub pages_fetched: AtomicU64,
    pub fault_drills: AtomicU64,
    pub operator_rejected: AtomicU64,
    events: Mutex<HashMap<ExecId, ExecEvents>>,
}

impl OpsState {
    fn events(&self) -> std::sync::MutexGuard<'_, HashMap<ExecId, ExecEvents>> {
        self.events.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A host command on `exec` starts.
    pub fn command_begins(&self, exec: ExecId, action: HostAction) {
        let mut ev = self.events();
        let e = ev.entry(exec).or_default();
        e.busy = Some(action);
        if matches!(action, HostAction::Wake | HostAction::Reimage) {
            e.pages_since_wake = 0;
        }
    }

    /// A host command on `exec` ended (`ok`: carried out).
    pub fn command_ends(&self, exec: ExecId, action: HostAction, epoch: Epoch, ok: bool) {
        {
            let mut ev = self.events();
            let e = ev.entry(exec).or_default();
            e.busy = None;
            e.last = Some((action, epoch, ok));
            e.last_at = Some(std::time::Instant::now());
        }
        if ok {
            let c = match action {
                HostAction::Wake => &self.wakes,
                HostAction::Sleep => &self.sleeps,
                HostAction::Reimage => &self.reimages,
            };
            c.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// `pages` pages were relayed to `exec` in answer to its fetch.
    pub fn pages_relayed(&self, exec: ExecId, pages: u64) {
        self.pages_fetched.fetch_add(pages, Ordering::Relaxed);
        let mut ev = self.events();
        let e = ev.entry(exec).or_default();
        e.pages_total += pages;
        e.pages_since_wake += pages;
    }
}

/// One replica of this host, as `GET /status` reports it.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ExecStatus {
    pub app: u32,
    pub index: u32,
    /// Lifecycle state: `running`, `paused`, `saved`, `destroyed`,
    /// `defined`, `exited`, `crashed`, or `unknown: <why>`.
    pub state: String,
    /// The host command being carried out (`Wake`, `Sleep`, `Reimage`).
    pub busy: Option<String>,
    /// The last host command carried out, with its epoch and whether it succeeded.
    pub last_command: Option<String>,
    pub last_command_epoch: Option<Epoch>,
    pub pages_fetched: u64,
    pub recovery: Option<RecoveryStatus>,
}

/// The latest recovery of a replica, from its log and the relayed pages.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct RecoveryStatus {
    /// Pages of the certified checkpoint.
    pub pages: Option<u64>,
    /// Pages found missing when the recovery compared its state.
    pub missing_at_start: Option<u64>,
    /// Pages still missing (exact at start and completion, estimated between).
    pub missing: Option<u64>,
    pub fetched: u64,
    pub complete: bool,
    /// Duration of a completed recovery.
    pub seconds: Option<f64>,
}

/// A host agent's status document.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct HostStatus {
    pub host: String,
    pub backend: String,
    pub executors: Vec<ExecStatus>,
}

/// One replica placed on the host, as the operator side needs it.
#[derive(Clone, Debug)]
pub struct PlacedReplica {
    pub exec: ExecId,
    pub state_dir: PathBuf,
    pub log: PathBuf,
}

/// Everything the operator side of a host agent works with.
pub struct Ops {
    pub host: String,
    pub config: ClusterConfig,
    pub backend: Arc<Mutex<dyn ReplicaLifecycle>>,
    pub placed: Vec<PlacedReplica>,
    pub stats: Arc<crate::hostd::HostStats>,
    pub mode: DormantMode,
    seen: Mutex<(HashSet<u64>, VecDeque<u64>)>,
    scans: Mutex<HashMap<ExecId, LogScan>>,
    /// The backend's name and the replica states last read from it.
    last_states: Mutex<(String, HashMap<ExecId, String>, Option<std::time::Instant>)>,
}

/// Most fault-command nonces remembered (older ones are also too old).
const MAX_NONCES: usize = 4096;

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// The value of `key=` in a tracing log line (`key=12` or `key=1.5`).
fn field(line: &str, key: &str) -> Option<String> {
    let pat = format!("{key}=");
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(&pat))
        .map(|v| v.trim_matches(|c| c == '"' || c == ',').to_string())
}

/// What the host agent has read so far of one replica's log. The log is
/// read incrementally (from where the last read stopped), so a status or
/// metrics request costs only the lines written since.
#[derive(Clone, Debug, Default)]
struct LogScan {
    offset: u64,
    /// The start of a line not yet complete.
    partial: String,
    /// The latest recovery, as far as the log tells.
    latest: Option<RecoveryStatus>,
    /// Completed recoveries and their total duration.
    completed: u64,
    completed_secs: f64,
}

/// Most bytes of a log read per request (the rest is read by later requests).
const MAX_LOG_READ: u64 = 8 << 20;

impl LogScan {
    fn line(&mut self, line: &str) {
        if line.contains("recovering: executing from the stable checkpoint") {
            self.latest = Some(RecoveryStatus {
                pages: field(line, "pages").and_then(|v| v.parse().ok()),
                ..Default::default()
            });
        } else if line.contains("recovery: pages compared") {
            if let Some(r) = &mut self.latest {
                r.missing_at_start = field(line, "missing").and_then(|v| v.parse().ok());
            }
        } else if line.contains("recovery complete") {
            let secs = field(line, "secs").and_then(|v| v.parse::<f64>().ok());
            if let Some(r) = &mut self.latest {
                r.complete = true;
                r.seconds = secs;
                r.fetched = field(line, "fetched")
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(r.fetched);
            }
            self.completed += 1;
            self.completed_secs += secs.unwrap_or(0.0);
        }
    }

    fn feed(&mut self, text: &str) {
        let mut text = std::mem::take(&mut self.partial) + text;
        if !text.ends_with('\n') {
            let cut = text.rfind('\n').map(|i| i + 1).unwrap_or(0);
            self.partial = text.split_off(cut);
        }
        for line in text.lines() {
            self.line(line);
        }
    }

    /// Reads what was appended to `path` since the last call.
    fn update(&mut self, path: &std::path::Path) {
        use std::io::{Read, Seek, SeekFrom};
        let Ok(mut f) = std::fs::File::open(path) else {
            return;
        };
        let len = f.metadata().map(|m| m.len()).unwrap_or(0);
        if len < self.offset {
            *self = LogScan::default(); // truncated or replaced
        }
        if f.seek(SeekFrom::Start(self.offset)).is_err() {
            return;
        }
        let mut buf = Vec::new();
        let Ok(n) = f.take(MAX_LOG_READ).read_to_end(&mut buf) else {
            return;
        };
        self.offset += n as u64;
        self.feed(&String::from_utf8_lossy(&buf));
    }

    /// The latest recovery, with the pages relayed since the last wake.
    fn recovery(&self, pages_since_wake: u64) -> Option<RecoveryStatus> {
        let mut r = self.latest.clone()?;
        if !r.complete {
            r.fetched = pages_since_wake;
        }
        r.missing = if r.complete {
            Some(0)
        } else {
            r.missing_at_start
                .map(|m| m.saturating_sub(pages_since_wake))
        };
        Some(r)
    }
}

fn state_name(s: &ReplicaState) -> String {
    match s {
        ReplicaState::Defined => "defined",
        ReplicaState::Running => "running",
        ReplicaState::Paused => "paused",
        ReplicaState::Saved => "saved",
        ReplicaState::Destroyed => "destroyed",
        ReplicaState::Exited { .. } => "exited",
        ReplicaState::Crashed { .. } => "crashed",
    }
    .to_string()
}

impl Ops {
    pub fn new(
        host: String,
        config: ClusterConfig,
        backend: Arc<Mutex<dyn ReplicaLifecycle>>,
        placed: Vec<PlacedReplica>,
        stats: Arc<crate::hostd::HostStats>,
        mode: DormantMode,
    ) -> Self {
        Ops {
            host,
            config,
            backend,
            placed,
            stats,
            mode,
            seen: Mutex::new(Default::default()),
            scans: Mutex::new(HashMap::new()),
            last_states: Mutex::new(Default::default()),
        }
    }

    fn backend(&self) -> std::sync::MutexGuard<'_, dyn ReplicaLifecycle + 'static> {
        self.backend.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Every replica's log scan, brought up to date.
    fn scans(&self) -> HashMap<ExecId, LogScan> {
        let mut scans = self.scans.lock().unwrap_or_else(|e| e.into_inner());
        for p in &self.placed {
            scans.entry(p.exec).or_default().update(&p.log);
        }
        scans.clone()
    }

    /// The status document (blocks on the backend: call off the runtime).
    pub fn status(&self) -> HostStatus {
        // A host command (a managed save takes seconds) holds the backend:
        // then the states last read are reported rather than waiting.
        let mut cached = self.last_states.lock().unwrap_or_else(|e| e.into_inner());
        let states: Vec<(ExecId, String)> = match self.backend.try_lock() {
            Ok(mut b) => {
                let fresh: Vec<(ExecId, String)> = self
                    .placed
                    .iter()
                    .map(|p| {
                        let s = match b.state(p.exec) {
                            Ok(s) => state_name(&s),
                            Err(e) => format!("unknown: {e}"),
                        };
                        (p.exec, s)
                    })
                    .collect();
                cached.0 = b.backend().to_string();
                cached.1 = fresh.iter().cloned().collect();
                cached.2 = Some(std::time::Instant::now());
                fresh
            }
            Err(_) => {
                // What a command that ended since the last read left behind.
                let events = self.stats.ops.events();
                let dormant = match self.mode {
                    DormantMode::Paused => "paused",
                    DormantMode::Saved => "saved",
                };
                self.placed
                    .iter()
                    .map(|p| {
                        let ev = events.get(&p.exec);
                        let newer = ev
                            .and_then(|e| e.last_at)
                            .is_some_and(|at| cached.2.is_none_or(|read| at > read));
                        let after = match ev.and_then(|e| e.last) {
                            Some((HostAction::Wake, _, true)) if newer => Some("running"),
                            // A reimaged replica is put to sleep again.
                            Some((HostAction::Sleep | HostAction::Reimage, _, true)) if newer => {
                                Some(dormant)
                            }
                            _ => None,
                        };
                        let s = after
                            .map(str::to_string)
                            .or_else(|| cached.1.get(&p.exec).cloned());
                        (p.exec, s.unwrap_or_else(|| "unknown: busy".into()))
                    })
                    .collect()
            }
        };
        let backend = cached.0.clone();
        drop(cached);
        let events = self.stats.ops.events().clone();
        let scans = self.scans();
        let executors = self
            .placed
            .iter()
            .zip(states)
            .map(|(p, (_, state))| {
                let ev = events.get(&p.exec).cloned().unwrap_or_default();
                ExecStatus {
                    app: p.exec.app,
                    index: p.exec.index,
                    state,
                    busy: ev.busy.map(|a| format!("{a:?}")),
                    last_command: ev
                        .last
                        .map(|(a, _, ok)| format!("{a:?}{}", if ok { "" } else { " (failed)" })),
                    last_command_epoch: ev.last.map(|(_, e, _)| e),
                    pages_fetched: ev.pages_total,
                    recovery: scans
                        .get(&p.exec)
                        .and_then(|s| s.recovery(ev.pages_since_wake)),
                }
            })
            .collect();
        HostStatus {
            host: self.host.clone(),
            backend,
            executors,
        }
    }

    /// The Prometheus text of the host agent (blocks on reading logs).
    pub fn prometheus(&self) -> String {
        use std::fmt::Write;
        let s = &self.stats;
        let o = &s.ops;
        let ld = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let host = &self.host;
        let (mut rec_n, mut rec_sum) = (0u64, 0f64);
        for scan in self.scans().values() {
            rec_n += scan.completed;
            rec_sum += scan.completed_secs;
        }
        #[rustfmt::skip]
        let rows: Vec<(&str, &str, &str, String)> = vec![
            ("host_frames_in_total", "counter", "Frames received from agreement replicas and executors.", ld(&s.frames_in).to_string()),
            ("host_frames_malformed_total", "counter", "Frames that did not decode, dropped.", ld(&s.frames_malformed).to_string()),
            ("host_frames_oversized_total", "counter", "Frames over the size limit; the connection was closed.", ld(&s.frames_oversized).to_string()),
            ("host_frames_misrouted_total", "counter", "Frames whose route does not fit their link, dropped.", ld(&s.frames_misrouted).to_string()),
            ("host_frames_dropped_total", "counter", "Frames dropped: destination not connected or queue full.", ld(&s.frames_dropped).to_string()),
            ("host_hellos_rejected_total", "counter", "Agreement links closed for a bad hello.", ld(&s.hellos_rejected).to_string()),
            ("host_commands_rejected_total", "counter", "Host commands with a bad signature or for unknown replicas.", ld(&s.commands_rejected).to_string()),
            ("host_commands_fired_total", "counter", "Host commands carried out (f+1 signed).", ld(&s.commands_fired).to_string()),
            ("host_commands_failed_total", "counter", "Host commands that failed.", ld(&s.commands_failed).to_string()),
            ("host_wakes_total", "counter", "Replicas woken.", ld(&o.wakes).to_string()),
            ("host_sleeps_total", "counter", "Replicas put to sleep.", ld(&o.sleeps).to_string()),
            ("host_reimages_total", "counter", "Replicas reimaged.", ld(&o.reimages).to_string()),
            ("host_pages_fetched_total", "counter", "State pages relayed to recovering replicas.", ld(&o.pages_fetched).to_string()),
            ("host_fetch_relayed_total", "counter", "State fetch frames relayed between replicas.", ld(&s.fetch_relayed).to_string()),
            ("host_fetch_to_hosts_total", "counter", "State fetch frames sent to other host agents.", ld(&s.fetch_to_hosts).to_string()),
            ("host_fetch_from_hosts_total", "counter", "State fetch frames received from other host agents.", ld(&s.fetch_from_hosts).to_string()),
            ("host_fault_drills_total", "counter", "Operator fault drills carried out.", ld(&o.fault_drills).to_string()),
            ("host_operator_rejected_total", "counter", "Operator commands refused.", ld(&o.operator_rejected).to_string()),
        ];
        let mut out = String::with_capacity(4096);
        for (name, kind, help, v) in rows {
            let _ = writeln!(out, "# HELP zz_{name} {help}");
            let _ = writeln!(out, "# TYPE zz_{name} {kind}");
            let _ = writeln!(out, "zz_{name}{{host=\"{host}\"}} {v}");
        }
        let _ = writeln!(
            out,
            "# HELP zz_host_recovery_seconds Durations of completed recoveries of this host's replicas."
        );
        let _ = writeln!(out, "# TYPE zz_host_recovery_seconds summary");
        let _ = writeln!(
            out,
            "zz_host_recovery_seconds_sum{{host=\"{host}\"}} {rec_sum:.6}"
        );
        let _ = writeln!(
            out,
            "zz_host_recovery_seconds_count{{host=\"{host}\"}} {rec_n}"
        );
        out
    }

    /// Checks and carries out an operator command that arrived as the first
    /// frame of a connection. Blocks on the backend: call off the runtime.
    pub fn operator(&self, cmd: &OperatorSigned) -> OperatorAck {
        let ack = self.operator_inner(cmd);
        match &ack {
            OperatorAck::Accepted(what) => {
                tracing::warn!(action = ?cmd.body.action, %what, "operator command carried out")
            }
            OperatorAck::Refused(why) => {
                self.stats
                    .ops
                    .operator_rejected
                    .fetch_add(1, Ordering::Relaxed);
                tracing::warn!(action = ?cmd.body.action, %why, "operator command refused")
            }
        }
        ack
    }

    fn operator_inner(&self, cmd: &OperatorSigned) -> OperatorAck {
        let refuse = |s: String| OperatorAck::Refused(s);
        let Some(key) = self.config.operator_key() else {
            return refuse(
                "the config has no operator_public_key; run `zzctl init` to create one".into(),
            );
        };
        if !cmd.verify(&key) {
            return refuse("the command is not signed by the config's operator key".into());
        }
        let OperatorAction::Fault { exec, plan_toml } = &cmd.body.action else {
            return refuse(
                "host agents take only `fault` commands; `activate` goes to agreement replicas"
                    .into(),
            );
        };
        if !self.config.execution.allow_fault_injection {
            return refuse(
                "fault injection is not allowed: the config does not set execution.allow_fault_injection \
                 (use `zzctl init --allow-fault-injection` for drill deployments)"
                    .into(),
            );
        }
        let now = now_ms();
        if now.abs_diff(cmd.body.issued_ms) > MAX_COMMAND_AGE_MS {
            return refuse(format!(
                "the command was issued {} ms from this host's clock (limit {MAX_COMMAND_AGE_MS} ms); check the clocks and retry",
                now.abs_diff(cmd.body.issued_ms)
            ));
        }
        {
            let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
            if !seen.0.insert(cmd.body.nonce) {
                return refuse("this command was already carried out (replayed nonce)".into());
            }
            seen.1.push_back(cmd.body.nonce);
            if seen.1.len() > MAX_NONCES {
                if let Some(old) = seen.1.pop_front() {
                    seen.0.remove(&old);
                }
            }
        }
        let Some(p) = self.placed.iter().find(|p| p.exec == *exec) else {
            return refuse(format!("{exec} is not placed on host `{}`", self.host));
        };
        let plan: zz_executor::FaultPlan = match toml::from_str(plan_toml) {
            Ok(p) => p,
            Err(e) => return refuse(format!("not a fault plan: {e}")),
        };
        let path = p.state_dir.join(zz_executor::setup::FAULTS_FILE);
        let written = if plan.is_none() {
            match std::fs::remove_file(&path) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
                _ => Ok(()),
            }
        } else {
            zz_executor::setup::write_fault_plan(&path, &plan)
        };
        if let Err(e) = written {
            return refuse(format!("cannot write {}: {e}", path.display()));
        }
        let mut b = self.backend();
        let before = match b.state(*exec) {
            Ok(s) => s,
            Err(e) => return refuse(format!("{exec}: {e}")),
        };
        // The executor reads its plan when it starts: restart a live one.
        if before.is_live() {
            if let Err(e) = b.destroy(*exec) {
                return refuse(format!("plan written, but stopping {exec} failed: {e}"));
            }
        }
        // A VM reads its state folder from its disk image: put the plan there.
        let disk = p.state_dir.join(VM_DISK);
        if b.backend() == "libvirt" && disk.is_file() {
            let plan_file = (!plan.is_none()).then_some(path.as_path());
            if let Err(e) = put_plan_on_disk(&disk, plan_file) {
                return refuse(format!("cannot put the plan on {}: {e}", disk.display()));
            }
        }
        if before.is_live() {
            let restarted = b.start(*exec).and_then(|()| {
                if before.is_dormant() {
                    carry_out(&mut *b, *exec, HostAction::Sleep, self.mode).map(|_| ())
                } else {
                    Ok(())
                }
            });
            if let Err(e) = restarted {
                return refuse(format!("plan written, but restarting {exec} failed: {e}"));
            }
        }
        self.stats.ops.fault_drills.fetch_add(1, Ordering::Relaxed);
        OperatorAck::Accepted(if plan.is_none() {
            format!("fault plan of {exec} cleared; it was restarted")
        } else {
            format!("fault plan {plan:?} installed on {exec}; it was restarted")
        })
    }
}

/// The disk image of a VM replica in its state folder (libvirt backend).
const VM_DISK: &str = "disk.img";

/// Writes the fault plan file `plan` (or removes it, for `None`) at the root
/// of the ext4 image `disk` of a stopped VM, with e2fsprogs' `debugfs`, and
/// checks the result. The VM was stopped without unmounting, so the
/// journal is replayed first (`e2fsck`): otherwise the guest would replay it
/// at its next mount over what was written here.
fn put_plan_on_disk(disk: &std::path::Path, plan: Option<&std::path::Path>) -> Result<(), String> {
    let debugfs = |args: &[&str]| -> Result<String, String> {
        let out = std::process::Command::new("debugfs")
            .args(args)
            .arg(disk)
            .output()
            .map_err(|e| format!("running debugfs (install e2fsprogs): {e}"))?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    };
    let fsck = std::process::Command::new("e2fsck")
        .args(["-f", "-y"])
        .arg(disk)
        .output()
        .map_err(|e| format!("running e2fsck (install e2fsprogs): {e}"))?;
    // 0: clean, 1: errors corrected; anything else is a failure.
    if !matches!(fsck.status.code(), Some(0 | 1)) {
        return Err(format!(
            "e2fsck failed ({}): {}",
            fsck.status,
            String::from_utf8_lossy(&fsck.stderr).trim()
        ));
    }
    let name = zz_executor::setup::FAULTS_FILE;
    debugfs(&["-w", "-R", &format!("rm {name}")])?;
    let want = match plan {
        Some(src) => {
            let src_s = src.to_string_lossy();
            if src_s.contains(char::is_whitespace) {
                return Err(format!(
                    "path {src_s} has spaces, which debugfs cannot take"
                ));
            }
            debugfs(&["-w", "-R", &format!("write {src_s} {name}")])?;
            std::fs::read_to_string(src).map_err(|e| e.to_string())?
        }
        None => String::new(),
    };
    let got = debugfs(&["-R", &format!("cat {name}")])?;
    if got != want {
        return Err(format!("the disk holds {got:?} instead of the plan"));
    }
    Ok(())
}

/// Decodes `body` (the first frame of a connection that is not a hello) as
/// an operator command; `None` if it is not one.
pub fn as_operator(body: &[u8]) -> Option<OperatorSigned> {
    match codec::decode::<Frame>(body) {
        Ok(Frame::Operator(cmd)) => Some(cmd),
        _ => None,
    }
}

/// Answers an operator command on its connection and closes it.
pub async fn answer_operator(
    ops: Arc<Ops>,
    cmd: OperatorSigned,
    mut wr: tokio::net::tcp::OwnedWriteHalf,
) {
    let ack = match tokio::task::spawn_blocking(move || ops.operator(&cmd)).await {
        Ok(a) => a,
        Err(e) => OperatorAck::Refused(format!("internal error: {e}")),
    };
    let bytes = zz_wire::frame::frame(&codec::encode(&Frame::OperatorAck(ack)));
    let _ = wr.write_all(&bytes).await;
    let _ = wr.shutdown().await;
}

/// Serves `GET /metrics` and `GET /status` until shutdown. One request per
/// connection; anything else is a 404.
pub async fn serve_http(listener: TcpListener, ops: Arc<Ops>, mut shutdown: watch::Receiver<bool>) {
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = shutdown.changed() => return,
        };
        let Ok((mut stream, _)) = accepted else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let ops = ops.clone();
        tokio::spawn(async move {
            let mut req = Vec::with_capacity(1024);
            let mut chunk = [0u8; 1024];
            let read_head = async {
                while !req.windows(4).any(|w| w == b"\r\n\r\n") && req.len() < 8192 {
                    match stream.read(&mut chunk).await {
                        Ok(0) | Err(_) => return false,
                        Ok(k) => req.extend_from_slice(&chunk[..k]),
                    }
                }
                true
            };
            if !matches!(
                tokio::time::timeout(Duration::from_secs(5), read_head).await,
                Ok(true)
            ) {
                return;
            }
            let line = req.split(|b| *b == b'\r').next().unwrap_or_default();
            let line = String::from_utf8_lossy(line).into_owned();
            let mut parts = line.split_whitespace();
            let (method, path) = (
                parts.next().unwrap_or("").to_string(),
                parts.next().unwrap_or("").to_string(),
            );
            let answer = tokio::task::spawn_blocking(move || {
                if method != "GET" {
                    None
                } else if path == "/metrics" || path == "/" {
                    Some(("text/plain; version=0.0.4", ops.prometheus()))
                } else if path == STATUS_PATH {
                    let s = ops.status();
                    Some((
                        "application/json",
                        serde_json::to_string(&s)
                            .unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}")),
                    ))
                } else {
                    None
                }
            })
            .await
            .ok()
            .flatten();
            let (status, ctype, body) = match answer {
                Some((c, b)) => ("200 OK", c, b),
                None => ("404 Not Found", "text/plain", "not found\n".to_string()),
            };
            let resp = format!(
                "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = stream.write_all(resp.as_bytes()).await;
            let _ = stream.shutdown().await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recovery_progress_is_read_from_the_log() {
        let log = "\
2026-01-01T00:00:00Z  INFO zz_executor::driver: state opened
2026-01-01T00:00:01Z  INFO zz_executor::driver: recovering: executing from the stable checkpoint while its pages are fetched app_seq=128 pages=300 open_ms=2
2026-01-01T00:00:01Z  INFO zz_executor::driver: recovery: pages compared missing=40
";
        let mut scan = LogScan::default();
        assert_eq!(scan.recovery(0), None);
        // A line arriving in two pieces is read once whole.
        let (a, b) = log.split_at(150);
        scan.feed(a);
        scan.feed(b);
        let r = scan.recovery(15).unwrap();
        assert_eq!(r.pages, Some(300));
        assert_eq!(r.missing_at_start, Some(40));
        assert_eq!(r.missing, Some(25));
        assert_eq!(r.fetched, 15);
        assert!(!r.complete);
        scan.feed("2026-01-01T00:00:02Z  INFO zz_executor::driver: recovery complete; state is local again app_seq=128 fetched=40 pages=300 secs=0.25\n");
        let r = scan.recovery(15).unwrap();
        assert!(r.complete);
        assert_eq!(r.missing, Some(0));
        assert_eq!(r.fetched, 40);
        assert_eq!(r.seconds, Some(0.25));
        assert_eq!((scan.completed, scan.completed_secs), (1, 0.25));
    }

    #[test]
    fn log_scans_read_only_what_was_appended() {
        let t = tempfile::tempdir().unwrap();
        let p = t.path().join("x.log");
        let line = "recovery complete; state is local again fetched=3 pages=9 secs=0.5\n";
        std::fs::write(
            &p,
            format!("recovering: executing from the stable checkpoint pages=9\n{line}"),
        )
        .unwrap();
        let mut scan = LogScan::default();
        scan.update(&p);
        scan.update(&p);
        assert_eq!(scan.completed, 1);
        use std::io::Write;
        std::fs::OpenOptions::new()
            .append(true)
            .open(&p)
            .unwrap()
            .write_all(line.as_bytes())
            .unwrap();
        scan.update(&p);
        assert_eq!(scan.completed, 2);
        std::fs::write(&p, "").unwrap(); // truncated: start over
        scan.update(&p);
        assert_eq!(scan.completed, 0);
    }
}
