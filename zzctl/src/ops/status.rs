//! `zzctl status`: one view of a deployment, merged from every daemon's
//! `GET /status` (agreement replicas: `zz_agreement::status`; host agents:
//! `zz_hypervisor::hostd_ops`, read here through the mirror types below so
//! `zzctl` does not link the hypervisor backends).
//!
//! The cluster figures (view, primary, last committed and stable sequence
//! numbers) and each app's replicated table (epoch, active set, recovering,
//! faulty) come from the most advanced agreement replica that answered
//! (highest `last_executed`). Each execution replica's state combines that
//! table with what its host agent reports:
//!
//! | state | when |
//! |---|---|
//! | `reimaging` | its host agent is carrying out a `Reimage` |
//! | `faulty` | the last verdict named it and its host has not yet reimaged it |
//! | `dormant-paused` / `dormant-saved` | paused in memory / saved to disk |
//! | `recovering` | running, active, and its latest recovery has not completed (with the missing-page count) |
//! | `active` | running and in the active set |
//! | `running` | running but not in the active set (about to be put to sleep) |
//! | `stopped`, `crashed`, `exited`, `defined` | not running |
//! | `unknown` | its host agent did not answer |
//!
//! `--json` prints [`DeploymentStatus`]; its fields are the contract for
//! scripts.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use anyhow::Result;
use clap::Args;
use serde::{Deserialize, Serialize};
use zz_agreement::status::ReplicaStatus;
use zz_wire::config::ClusterConfig;

use super::{load_config, DirArg, OpsError};

#[derive(Args, Debug, Clone)]
pub struct StatusArgs {
    #[command(flatten)]
    pub dir: DirArg,
    /// Print JSON for scripts instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// Mirror of the host agent's status document.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default)]
pub struct HostStatusDoc {
    pub host: String,
    pub backend: String,
    pub executors: Vec<HostExecDoc>,
}

/// Mirror of one replica in the host agent's status document.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default)]
pub struct HostExecDoc {
    pub app: u32,
    pub index: u32,
    pub state: String,
    pub busy: Option<String>,
    pub last_command: Option<String>,
    pub last_command_epoch: Option<u64>,
    pub pages_fetched: u64,
    pub recovery: Option<RecoveryDoc>,
}

/// Mirror of a replica's recovery progress.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct RecoveryDoc {
    pub pages: Option<u64>,
    pub missing_at_start: Option<u64>,
    pub missing: Option<u64>,
    pub fetched: u64,
    pub complete: bool,
    pub seconds: Option<f64>,
}

/// `zzctl status --json`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct DeploymentStatus {
    pub f: usize,
    pub agreement: AgreementStatus,
    pub hosts: Vec<HostSummary>,
    pub apps: Vec<AppSummary>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct AgreementStatus {
    /// Replicas that answered.
    pub up: usize,
    pub view: u64,
    pub primary: u32,
    pub last_committed: u64,
    pub stable_seq: u64,
    pub replicas: Vec<ReplicaSummary>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ReplicaSummary {
    pub id: u32,
    pub addr: String,
    pub up: bool,
    pub view: Option<u64>,
    pub last_executed: Option<u64>,
    pub stable_seq: Option<u64>,
    /// Suspects this replica signed against execution replicas.
    pub suspicions: Option<u64>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct HostSummary {
    pub name: String,
    pub addr: String,
    pub backend: String,
    pub up: bool,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct AppSummary {
    pub id: u32,
    pub name: String,
    pub kind: String,
    pub epoch: u64,
    /// App sequence numbers ordered so far.
    pub ordered: u64,
    pub recovering: bool,
    pub active: Vec<u32>,
    pub faulty: Vec<u32>,
    pub executors: Vec<ExecutorSummary>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ExecutorSummary {
    pub index: u32,
    pub host: String,
    pub epoch: u64,
    /// See the module documentation.
    pub state: String,
    /// The backend's lifecycle state (`running`, `paused`, ...), or `unknown`.
    pub lifecycle: String,
    pub missing_pages: Option<u64>,
    pub pages_fetched: u64,
    pub recovery: Option<RecoveryDoc>,
    /// The last host command its host agent carried out (`Wake`, `Sleep`,
    /// `Reimage`, with ` (failed)` if it failed), and that command's epoch.
    pub last_host_command: Option<String>,
    pub last_host_command_epoch: Option<u64>,
}

/// `GET path` from a daemon's HTTP port; the body of a 200 answer.
pub fn http_get(addr: SocketAddr, path: &str, timeout: Duration) -> std::io::Result<String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect_timeout(&addr, timeout)?;
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: zz\r\nConnection: close\r\n\r\n"
    )?;
    let mut resp = String::new();
    s.read_to_string(&mut resp)?;
    let (head, body) = resp.split_once("\r\n\r\n").unwrap_or((&resp, ""));
    if !head.starts_with("HTTP/1.1 200") {
        return Err(std::io::Error::other(format!(
            "{addr}{path} answered: {}",
            head.lines().next().unwrap_or("")
        )));
    }
    Ok(body.to_string())
}

fn fetch<T: for<'de> Deserialize<'de>>(addr: Option<SocketAddr>) -> Option<T> {
    let body = http_get(addr?, "/status", Duration::from_secs(2)).ok()?;
    serde_json::from_str(&body).ok()
}

/// Derives an execution replica's state (see the module documentation).
fn exec_state(
    index: u32,
    app: &zz_agreement::status::AppStatus,
    host: Option<&HostExecDoc>,
) -> (String, Option<u64>) {
    let Some(h) = host else {
        return ("unknown".into(), None);
    };
    if h.busy.as_deref() == Some("Reimage") {
        return ("reimaging".into(), None);
    }
    let reimage_done =
        h.last_command.as_deref() == Some("Reimage") && h.last_command_epoch == Some(app.epoch);
    if app.faulty.contains(&index) && app.reimaged.contains(&index) && !reimage_done {
        return ("faulty".into(), None);
    }
    match h.state.as_str() {
        "paused" => ("dormant-paused".into(), None),
        "saved" => ("dormant-saved".into(), None),
        "running" => {
            if !app.active.contains(&index) {
                return ("running".into(), None);
            }
            match &h.recovery {
                Some(r) if !r.complete => ("recovering".into(), r.missing),
                _ => ("active".into(), None),
            }
        }
        "destroyed" => ("stopped".into(), None),
        other => (other.split(':').next().unwrap_or(other).to_string(), None),
    }
}

/// Collects the status of the deployment `cfg` describes.
pub fn collect(cfg: &ClusterConfig) -> DeploymentStatus {
    let mut out = DeploymentStatus {
        f: cfg.f,
        ..Default::default()
    };
    let mut best: Option<ReplicaStatus> = None;
    for r in &cfg.replicas {
        let st: Option<ReplicaStatus> = fetch(r.metrics_addr);
        out.agreement.replicas.push(ReplicaSummary {
            id: r.id,
            addr: r.addr.to_string(),
            up: st.is_some(),
            view: st.as_ref().map(|s| s.view),
            last_executed: st.as_ref().map(|s| s.last_executed),
            stable_seq: st.as_ref().map(|s| s.stable_seq),
            suspicions: st.as_ref().map(|s| s.suspicions),
        });
        if let Some(s) = st {
            out.agreement.up += 1;
            let better = best
                .as_ref()
                .is_none_or(|b| (s.last_executed, s.view) > (b.last_executed, b.view));
            if better {
                best = Some(s);
            }
        }
    }
    if let Some(b) = &best {
        out.agreement.view = b.view;
        out.agreement.primary = b.primary;
        out.agreement.last_committed = b.last_executed;
        out.agreement.stable_seq = b.stable_seq;
    }
    let mut host_docs: BTreeMap<String, HostStatusDoc> = BTreeMap::new();
    for h in &cfg.hosts {
        let doc: Option<HostStatusDoc> = fetch(h.metrics_addr);
        out.hosts.push(HostSummary {
            name: h.name.clone(),
            addr: h.addr.to_string(),
            backend: h.backend.clone(),
            up: doc.is_some(),
        });
        if let Some(d) = doc {
            host_docs.insert(h.name.clone(), d);
        }
    }
    for app in &cfg.apps {
        let mut execs: Vec<_> = cfg.executors.iter().filter(|e| e.app == app.id).collect();
        if execs.is_empty() {
            continue;
        }
        execs.sort_by_key(|e| e.index);
        let table = best
            .as_ref()
            .and_then(|b| b.apps.get(&app.id).cloned())
            .unwrap_or_default();
        let mut summary = AppSummary {
            id: app.id,
            name: app.name.clone(),
            kind: app.kind.clone(),
            epoch: table.epoch,
            ordered: table.next_app_seq.saturating_sub(1),
            recovering: table.recovering,
            active: table.active.clone(),
            faulty: table.faulty.clone(),
            executors: vec![],
        };
        for e in execs {
            let h = host_docs.get(&e.host).and_then(|d| {
                d.executors
                    .iter()
                    .find(|x| x.app == app.id && x.index == e.index)
            });
            let (state, missing) = if best.is_some() {
                exec_state(e.index, &table, h)
            } else {
                ("unknown".into(), None)
            };
            summary.executors.push(ExecutorSummary {
                index: e.index,
                host: e.host.clone(),
                epoch: table.epoch,
                state,
                lifecycle: h
                    .map(|x| x.state.clone())
                    .unwrap_or_else(|| "unknown".into()),
                missing_pages: missing,
                pages_fetched: h.map(|x| x.pages_fetched).unwrap_or(0),
                recovery: h.and_then(|x| x.recovery.clone()),
                last_host_command: h.and_then(|x| x.last_command.clone()),
                last_host_command_epoch: h.and_then(|x| x.last_command_epoch),
            });
        }
        out.apps.push(summary);
    }
    out
}

/// The human-readable table.
pub fn render(s: &DeploymentStatus, dir: &Path) -> String {
    use std::fmt::Write;
    let a = &s.agreement;
    let mut o = String::new();
    let _ = writeln!(o, "deployment {}  (f={})", dir.display(), s.f);
    let _ = writeln!(
        o,
        "agreement: view {}, primary {}, last committed seq {}, stable seq {}  ({}/{} replicas up)",
        a.view,
        a.primary,
        a.last_committed,
        a.stable_seq,
        a.up,
        a.replicas.len()
    );
    let _ = writeln!(
        o,
        "  {:<8} {:<22} {:<5} {:>5} {:>10} {:>8}",
        "replica", "addr", "up", "view", "last", "stable"
    );
    let opt = |v: Option<u64>| v.map(|x| x.to_string()).unwrap_or_else(|| "-".into());
    for r in &a.replicas {
        let _ = writeln!(
            o,
            "  {:<8} {:<22} {:<5} {:>5} {:>10} {:>8}",
            r.id,
            r.addr,
            if r.up { "yes" } else { "NO" },
            opt(r.view),
            opt(r.last_executed),
            opt(r.stable_seq)
        );
    }
    let hosts: Vec<String> = s
        .hosts
        .iter()
        .map(|h| {
            format!(
                "{} ({}, {})",
                h.name,
                h.backend,
                if h.up { "up" } else { "DOWN" }
            )
        })
        .collect();
    let _ = writeln!(o, "hosts: {}", hosts.join(", "));
    for app in &s.apps {
        let _ = writeln!(
            o,
            "app {} (id {}, {}): epoch {}, {} ordered, active {:?}{}{}",
            app.name,
            app.id,
            app.kind,
            app.epoch,
            app.ordered,
            app.active,
            if app.recovering { ", recovering" } else { "" },
            if app.faulty.is_empty() {
                String::new()
            } else {
                format!(", last verdict faulty {:?}", app.faulty)
            }
        );
        let _ = writeln!(
            o,
            "  {:<8} {:<6} {:>6}  {:<16} detail",
            "replica", "host", "epoch", "state"
        );
        for e in &app.executors {
            let detail = match (e.state.as_str(), e.missing_pages) {
                ("recovering", Some(m)) => {
                    format!("{m} pages missing, {} fetched", e.pages_fetched)
                }
                ("recovering", None) => format!("comparing pages, {} fetched", e.pages_fetched),
                _ if e.pages_fetched > 0 => format!("{} pages fetched", e.pages_fetched),
                _ => String::new(),
            };
            let _ = writeln!(
                o,
                "  {:<8} {:<6} {:>6}  {:<16} {}",
                e.index, e.host, e.epoch, e.state, detail
            );
        }
    }
    o
}

/// `zzctl status`.
pub fn run(a: &StatusArgs) -> Result<()> {
    let cfg = load_config(&a.dir.dir)?;
    let s = collect(&cfg);
    if s.agreement.up == 0 && s.hosts.iter().all(|h| !h.up) {
        return Err(OpsError::NotRunning(format!(
            "no daemon of the deployment in {} answers; start it with `zzctl up --dir {}`",
            a.dir.dir.display(),
            a.dir.dir.display()
        ))
        .into());
    }
    if a.json {
        println!("{}", serde_json::to_string_pretty(&s)?);
    } else {
        print!("{}", render(&s, &a.dir.dir));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use zz_agreement::status::AppStatus;

    fn host(state: &str) -> HostExecDoc {
        HostExecDoc {
            state: state.into(),
            ..Default::default()
        }
    }

    #[test]
    fn executor_states_follow_the_table_and_the_host() {
        let app = AppStatus {
            epoch: 2,
            active: vec![0, 1],
            faulty: vec![2],
            reimaged: vec![2],
            ..Default::default()
        };
        assert_eq!(exec_state(0, &app, Some(&host("running"))).0, "active");
        assert_eq!(exec_state(0, &app, None).0, "unknown");
        assert_eq!(exec_state(2, &app, Some(&host("running"))).0, "faulty");
        let mut busy = host("running");
        busy.busy = Some("Reimage".into());
        assert_eq!(exec_state(2, &app, Some(&busy)).0, "reimaging");
        let mut done = host("paused");
        done.last_command = Some("Reimage".into());
        done.last_command_epoch = Some(2);
        assert_eq!(exec_state(2, &app, Some(&done)).0, "dormant-paused");
        let mut rec = host("running");
        rec.recovery = Some(RecoveryDoc {
            missing: Some(7),
            ..Default::default()
        });
        assert_eq!(
            exec_state(1, &app, Some(&rec)),
            ("recovering".into(), Some(7))
        );
        assert_eq!(exec_state(1, &app, Some(&host("saved"))).0, "dormant-saved");
    }
}
