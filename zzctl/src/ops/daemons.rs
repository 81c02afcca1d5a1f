//! `zzctl up` and `zzctl down`: a deployment's daemons as detached processes.
//!
//! Layout under the deployment folder:
//!
//! ```text
//! run/replica-<i>.pid    run/hostd-<host>.pid     pid files
//! logs/replica-<i>.log   logs/hostd-<host>.log    daemon output (appended)
//! ```
//!
//! Each daemon is started in its own session (`setsid`), so it outlives
//! `zzctl` and a terminal's Ctrl-C, with `--config` the absolute path of the
//! deployment's config. That path identifies the deployment's processes:
//! a pid file is trusted only if the process still runs with it on its
//! command line (pids are reused), and `down` finally sweeps every process
//! of this user whose command line names it (execution replicas are started
//! by host agents with the same `--config`), so nothing is left running even
//! if a host agent was killed before it could stop its replicas.
//!
//! `up` checks the whole config, every key file, the programs and every
//! port before it starts anything, so a bad deployment never half-starts.
//! Host agents start first (agreement replicas connect to them), then the
//! agreement replicas; `up` returns once every daemon listens. Daemons that
//! already run are left alone, so `up` is idempotent, and so is `down`.
//! Only host agents whose address is on this machine are started; a remote
//! host's agent runs there (see the README's multi-host quick start).

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Args;
use zz_wire::config::ClusterConfig;

use super::{load_config, DirArg, OpsError, CONFIG_FILE};
use crate::{build_missing_daemons, daemon_env_var, find_daemon, DAEMON_PACKAGES};

#[derive(Args, Debug, Clone)]
pub struct UpArgs {
    #[command(flatten)]
    pub dir: DirArg,
    /// Seconds to wait for each daemon to listen.
    #[arg(long, default_value_t = 30)]
    pub timeout: u64,
}

#[derive(Args, Debug, Clone)]
pub struct DownArgs {
    #[command(flatten)]
    pub dir: DirArg,
    /// Seconds to wait after SIGTERM before SIGKILL.
    #[arg(long, default_value_t = 20)]
    pub grace: u64,
}

/// One daemon of a deployment.
#[derive(Clone, Debug)]
pub struct Daemon {
    /// `replica-<i>` or `hostd-<host>`.
    pub name: String,
    pub program: &'static str,
    pub args: Vec<String>,
    /// Where it listens (it is up once this accepts connections).
    pub addr: SocketAddr,
    /// Every address it binds, with the config field naming it.
    pub binds: Vec<(String, SocketAddr)>,
}

/// The three daemon programs, found beside `zzctl` (or through
/// `$ZZ_AGREEMENT_BIN`, `$ZZ_HOSTD_BIN`, `$ZZ_EXECUTOR_BIN`); under `cargo
/// run`, missing ones are built first (see [`crate::build_missing_daemons`]).
pub fn programs() -> Result<std::collections::HashMap<&'static str, PathBuf>> {
    let names = DAEMON_PACKAGES.map(|(name, _)| name);
    build_missing_daemons(&names)?;
    let mut out = std::collections::HashMap::new();
    for name in names {
        out.insert(name, find_daemon(name, None, &daemon_env_var(name))?);
    }
    Ok(out)
}

/// The absolute path of the deployment's config: how its processes are recognized.
pub fn config_path(dir: &Path) -> PathBuf {
    let p = dir.join(CONFIG_FILE);
    std::path::absolute(&p).unwrap_or(p)
}

fn is_local(addr: SocketAddr) -> bool {
    addr.ip().is_loopback() || TcpListener::bind(SocketAddr::new(addr.ip(), 0)).is_ok()
}

/// The daemons `up` runs on this machine, host agents first.
pub fn daemons(cfg: &ClusterConfig, config: &Path) -> Vec<Daemon> {
    let c = config.to_string_lossy().into_owned();
    let mut out = Vec::new();
    for (i, h) in cfg.hosts.iter().enumerate() {
        if !is_local(h.addr) {
            continue;
        }
        let mut binds = vec![(format!("hosts[{i}].addr"), h.addr)];
        if let Some(m) = h.metrics_addr {
            binds.push((format!("hosts[{i}].metrics_addr"), m));
        }
        out.push(Daemon {
            name: format!("hostd-{}", h.name),
            program: "zz-hostd",
            args: vec![
                "--config".into(),
                c.clone(),
                "--host".into(),
                h.name.clone(),
            ],
            addr: h.addr,
            binds,
        });
    }
    for (i, r) in cfg.replicas.iter().enumerate() {
        let mut binds = vec![(format!("replicas[{i}].addr"), r.addr)];
        if let Some(m) = r.metrics_addr {
            binds.push((format!("replicas[{i}].metrics_addr"), m));
        }
        out.push(Daemon {
            name: format!("replica-{}", r.id),
            program: "zz-agreement",
            args: vec![
                "--config".into(),
                c.clone(),
                "--id".into(),
                r.id.to_string(),
            ],
            addr: r.addr,
            binds,
        });
    }
    out
}

/// Whether `pid` runs (reaping it first if it is our exited child).
pub fn alive(pid: i32) -> bool {
    if pid <= 0 {
        return false;
    }
    // SAFETY: waitpid with WNOHANG on a pid: reaps it only if it is our child.
    unsafe {
        libc::waitpid(pid, std::ptr::null_mut(), libc::WNOHANG);
    }
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => {
            // The state follows the parenthesized command name.
            let state = stat.rsplit(')').next().unwrap_or("").trim_start();
            !state.starts_with('Z') && !state.starts_with('X')
        }
        Err(_) => false,
    }
}

fn cmdline(pid: i32) -> Vec<String> {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|b| {
            b.split(|c| *c == 0)
                .filter(|s| !s.is_empty())
                .map(|s| String::from_utf8_lossy(s).into_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// Every process of the deployment whose config is `config`.
pub fn deployment_processes(config: &Path) -> Vec<i32> {
    let c = config.to_string_lossy();
    let me = std::process::id() as i32;
    let Ok(rd) = std::fs::read_dir("/proc") else {
        return vec![];
    };
    rd.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| *pid != me)
        .filter(|pid| cmdline(*pid).iter().any(|a| a == c.as_ref()))
        .filter(|pid| alive(*pid))
        .collect()
}

fn pid_file(dir: &Path, name: &str) -> PathBuf {
    dir.join("run").join(format!("{name}.pid"))
}

/// The pid in `name`'s pid file, if that process still runs this deployment.
pub fn running_pid(dir: &Path, name: &str, config: &Path) -> Option<i32> {
    let pid: i32 = std::fs::read_to_string(pid_file(dir, name))
        .ok()?
        .trim()
        .parse()
        .ok()?;
    let c = config.to_string_lossy();
    (alive(pid) && cmdline(pid).iter().any(|a| a == c.as_ref())).then_some(pid)
}

fn log_tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

fn port_free(addr: SocketAddr) -> bool {
    TcpListener::bind(addr).is_ok()
}

fn spawn(dir: &Path, d: &Daemon, program: &Path, executor: Option<&Path>) -> Result<i32> {
    let logs = dir.join("logs");
    let run = dir.join("run");
    for p in [&logs, &run] {
        std::fs::create_dir_all(p).with_context(|| format!("creating {}", p.display()))?;
    }
    let log_path = logs.join(format!("{}.log", d.name));
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .with_context(|| format!("opening {}", log_path.display()))?;
    let mut cmd = Command::new(program);
    cmd.args(&d.args)
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log);
    if d.program == "zz-hostd" {
        // The executor it starts: the one found for this zzctl.
        if let Some(e) = executor {
            cmd.arg("--executor").arg(e);
        }
    }
    // SAFETY: setsid() is async-signal-safe; it detaches the daemon from
    // zzctl's session and terminal.
    unsafe {
        cmd.pre_exec(|| {
            libc::setsid();
            Ok(())
        });
    }
    let child = cmd
        .spawn()
        .with_context(|| format!("starting {}", program.display()))?;
    let pid = child.id() as i32;
    // Not waited on here: the daemon is detached (`down` stops it).
    std::mem::forget(child);
    std::fs::write(pid_file(dir, &d.name), format!("{pid}\n"))?;
    Ok(pid)
}

/// What `up` did.
#[derive(Debug, Default)]
pub struct UpReport {
    pub started: Vec<(String, i32)>,
    pub already: Vec<(String, i32)>,
}

/// Starts every daemon of the deployment in `dir` that is not running.
pub fn start(dir: &Path, timeout: Duration) -> Result<UpReport> {
    let cfg = load_config(dir)?;
    let config = config_path(dir);
    let all = daemons(&cfg, &config);
    let programs = programs()?;
    // Check everything before starting anything.
    let mut report = UpReport::default();
    let mut to_start = Vec::new();
    for d in &all {
        if let Some(pid) = running_pid(dir, &d.name, &config) {
            report.already.push((d.name.clone(), pid));
            continue;
        }
        for (field, a) in &d.binds {
            if !port_free(*a) {
                return Err(OpsError::BadConfig(format!(
                    "config field `{field}`: port {a} is in use by another program; \
                     stop it, or run `zzctl init` again to pick free ports (nothing was started)"
                ))
                .into());
            }
        }
        to_start.push(d.clone());
    }
    for d in &to_start {
        let executor = programs.get("zz-executor").map(PathBuf::as_path);
        let pid = spawn(dir, d, &programs[d.program], executor)?;
        wait_listening(dir, d, pid, timeout)?;
        report.started.push((d.name.clone(), pid));
    }
    Ok(report)
}

fn wait_listening(dir: &Path, d: &Daemon, pid: i32, timeout: Duration) -> Result<()> {
    let start = Instant::now();
    let log = dir.join("logs").join(format!("{}.log", d.name));
    loop {
        if !alive(pid) {
            bail!(
                "{} exited while starting; last lines of {}:\n{}\n\
                 fix the cause and run `zzctl up` again (daemons already started keep running; \
                 `zzctl down` stops them)",
                d.name,
                log.display(),
                log_tail(&log, 8)
            );
        }
        if TcpStream::connect_timeout(&d.addr, Duration::from_millis(200)).is_ok() {
            return Ok(());
        }
        if start.elapsed() > timeout {
            bail!(
                "{} (pid {pid}) did not listen on {} within {timeout:?}; see {}",
                d.name,
                d.addr,
                log.display()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn signal(pid: i32, sig: i32) {
    // SAFETY: kill(2) on a pid verified to run this deployment.
    unsafe {
        libc::kill(pid, sig);
    }
}

/// Stops every process of the deployment in `dir`: SIGTERM, then SIGKILL
/// after `grace`. Returns how many processes were stopped.
pub fn stop(dir: &Path, grace: Duration) -> Result<usize> {
    let config = config_path(dir);
    let mut pids = Vec::new();
    if let Ok(rd) = std::fs::read_dir(dir.join("run")) {
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if let Some(stem) = name.strip_suffix(".pid") {
                if let Some(pid) = running_pid(dir, stem, &config) {
                    pids.push(pid);
                }
            }
        }
    }
    // Host agents stop their replicas on SIGTERM; anything else of this
    // deployment (an orphaned replica) is swept after.
    for pid in &pids {
        signal(*pid, libc::SIGTERM);
    }
    let start = Instant::now();
    while pids.iter().any(|p| alive(*p)) && start.elapsed() < grace {
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut stopped = pids.len();
    for pid in pids.iter().filter(|p| alive(**p)) {
        eprintln!("zzctl: pid {pid} did not stop after SIGTERM within {grace:?}; killing it");
        signal(*pid, libc::SIGKILL);
    }
    for _ in 0..3 {
        let rest = deployment_processes(&config);
        if rest.is_empty() {
            break;
        }
        for pid in &rest {
            if !pids.contains(pid) {
                stopped += 1;
            }
            signal(*pid, libc::SIGKILL);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let rest = deployment_processes(&config);
    if !rest.is_empty() {
        bail!("processes {rest:?} of this deployment are still running after SIGKILL");
    }
    if let Ok(rd) = std::fs::read_dir(dir.join("run")) {
        for e in rd.flatten() {
            let _ = std::fs::remove_file(e.path());
        }
    }
    Ok(stopped)
}

/// `zzctl up`.
pub fn up(a: &UpArgs) -> Result<()> {
    let dir = &a.dir.dir;
    let r = start(dir, Duration::from_secs(a.timeout.max(1)))?;
    for (n, pid) in &r.already {
        println!("{n:<14} already running (pid {pid})");
    }
    for (n, pid) in &r.started {
        println!(
            "{n:<14} started (pid {pid}, log {})",
            dir.join("logs").join(format!("{n}.log")).display()
        );
    }
    println!(
        "deployment up: {} daemons ({} started); try `zzctl status --dir {}`",
        r.started.len() + r.already.len(),
        r.started.len(),
        dir.display()
    );
    Ok(())
}

/// `zzctl down`.
pub fn down(a: &DownArgs) -> Result<()> {
    let dir = &a.dir.dir;
    let n = stop(dir, Duration::from_secs(a.grace))?;
    if n == 0 {
        println!("nothing was running");
    } else {
        println!("stopped {n} processes; nothing of this deployment is running");
    }
    Ok(())
}
