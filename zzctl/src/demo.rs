//! `zzctl demo`: the first thing a new user runs.
//!
//! 1. `init` a deployment in a temporary folder: f=1 (4 agreement replicas),
//!    two kv apps with 3 execution replicas each (2 active, 1 dormant), one
//!    local host agent on the process backend, fault injection allowed;
//! 2. `up` the daemons and run closed-loop clients on both apps, printing
//!    requests/s; every result a client accepts is checked against a model;
//! 3. once a stable execution checkpoint exists, inject a wrong-reply fault
//!    into replica 0 of `kv1` through the same operator-signed path as
//!    `zzctl fault`, and print what happens as `zzctl status` sees it:
//!    detection, the wake of the dormant replica, its recovery (pages
//!    missing and fetched), the verdict, the reimage of the faulty replica,
//!    and the return to f+1 active replicas;
//! 4. print a summary table with the timings (from the daemons' log
//!    timestamps, all on this machine's clock, relative to the fault), stop
//!    everything and check that nothing of the deployment is left running.
//!
//! It exits 0 only if every step happened and no client accepted a wrong
//! result; otherwise it says which step did not happen, keeps the folder
//! and names its logs.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use clap::Args;
use zz_client::{executor_mac_keys, ClientOptions, Cluster};
use zz_executor::{KvOp, KvResult};
use zz_wire::config::{ClientKeys, ClusterConfig};
use zz_wire::operator::{OperatorAck, OperatorAction};

use crate::bench_zz::line_time_us;
use crate::ops::{daemons, init, operator, status};

#[derive(Args, Debug, Clone)]
pub struct DemoArgs {
    /// Keep the deployment in this folder instead of a temporary one.
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// Seconds of load before the fault.
    #[arg(long, default_value_t = 4.0)]
    pub warmup: f64,
    /// Longest wait, in seconds, for the repair to complete.
    #[arg(long, default_value_t = 90.0)]
    pub max_wait: f64,
    /// `process` (the default: plain processes) or `libvirt` (the execution
    /// replicas as QEMU VMs; needs `scripts/setup-libvirt` and `zzctl image build`).
    #[arg(long, default_value = "process", value_parser = ["process", "libvirt"])]
    pub backend: String,
}

/// The app the fault goes to, and the replica.
const FAULTY_APP: u32 = 1;

fn now_us() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or(0)
}

/// Keys each client writes (with [`VALUE_BYTES`] each, the state of an
/// app spans a few hundred pages: something for a woken replica to fetch).
const KEYS_PER_CLIENT: u64 = 128;
const VALUE_BYTES: usize = 1500;

/// The value a client writes at its operation `i`.
fn value(i: u64, client: u64) -> Vec<u8> {
    let mut v = format!("value {i} of {client} ").into_bytes();
    v.resize(VALUE_BYTES, b'.');
    v
}

/// What the load clients share with the demo.
#[derive(Default)]
struct Load {
    stop: AtomicBool,
    ops: [AtomicU64; 2],
    wrong: AtomicU64,
    errors: AtomicU64,
    /// Set by the demo: the fault's time (µs since the epoch), 0 before.
    fault_us: AtomicI64,
    /// The first acceptance of a request to the faulty app issued after the fault.
    first_after_fault_us: AtomicI64,
}

async fn client_loop(
    cfg: Arc<ClusterConfig>,
    cluster: Arc<Cluster>,
    id: u64,
    app: u32,
    load: Arc<Load>,
) -> Result<()> {
    let keys = ClientKeys::load(&cfg, id)?;
    let mut c = cluster.client(keys)?;
    for (a, k) in executor_mac_keys(&cfg, id)? {
        c.set_executor_keys(a, k);
    }
    let mut model: BTreeMap<u64, u64> = BTreeMap::new();
    let mut i = 0u64;
    while !load.stop.load(Ordering::Relaxed) {
        i += 1;
        let k = i % KEYS_PER_CLIENT;
        let key = format!("c{id}-{k}").into_bytes();
        let (op, expect) = if i.is_multiple_of(3) {
            let want = model.get(&k).map(|v| value(*v, id));
            (KvOp::Get { key }, KvResult::Value(want))
        } else {
            let replaced = model.insert(k, i).is_some();
            let value = value(i, id);
            (KvOp::Put { key, value }, KvResult::Stored { replaced })
        };
        let issued = now_us();
        match c.invoke(app, op.encode()).await {
            Ok(r) => {
                let got = KvResult::decode(&r).ok();
                if got.as_ref() != Some(&expect) {
                    load.wrong.fetch_add(1, Ordering::Relaxed);
                    bail!("client {id} accepted a wrong result on app {app}: {got:?}, expected {expect:?}");
                }
                load.ops[(app - 1) as usize].fetch_add(1, Ordering::Relaxed);
                let f = load.fault_us.load(Ordering::Relaxed);
                if app == FAULTY_APP && f > 0 && issued >= f {
                    let _ = load.first_after_fault_us.compare_exchange(
                        0,
                        now_us(),
                        Ordering::Relaxed,
                        Ordering::Relaxed,
                    );
                }
            }
            Err(e) => {
                if load.stop.load(Ordering::Relaxed) {
                    break;
                }
                load.errors.fetch_add(1, Ordering::Relaxed);
                bail!("client {id} on app {app}: {e}");
            }
        }
    }
    Ok(())
}

/// The earliest time (µs) of a line of `path` containing every needle, at or after `after`.
fn log_time(path: &Path, needles: &[&str], after: i64) -> Option<i64> {
    let text = std::fs::read_to_string(path).ok()?;
    text.lines()
        .filter(|l| needles.iter().all(|n| l.contains(n)))
        .filter_map(line_time_us)
        .filter(|t| *t >= after)
        .min()
}

fn ms(t: Option<i64>, fault: i64) -> String {
    t.map(|t| format!("{:>9.1} ms", (t - fault) as f64 / 1000.0))
        .unwrap_or_else(|| "        n/a".into())
}

/// `zzctl demo`.
pub fn run(a: &DemoArgs) -> Result<()> {
    let (dir, tmp) = match &a.dir {
        Some(d) => (d.clone(), None),
        None => {
            let t = tempfile::Builder::new()
                .prefix("zz-demo-")
                .tempdir()
                .context("creating a temporary folder")?;
            (t.path().to_path_buf(), Some(t))
        }
    };
    // The daemons run in their own sessions: on Ctrl-C or SIGTERM, stop
    // them before leaving.
    {
        let dir = dir.clone();
        let temporary = tmp.is_some();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build();
            let Ok(rt) = rt else { return };
            let sig = rt.block_on(async {
                use tokio::signal::unix::{signal, SignalKind};
                let (Ok(mut int), Ok(mut term)) = (
                    signal(SignalKind::interrupt()),
                    signal(SignalKind::terminate()),
                ) else {
                    return None;
                };
                tokio::select! {
                    _ = int.recv() => Some(130),
                    _ = term.recv() => Some(143),
                }
            });
            if let Some(code) = sig {
                eprintln!("\nzzctl demo: interrupted; stopping the deployment");
                let _ = daemons::stop(&dir, Duration::from_secs(20));
                if temporary {
                    let _ = std::fs::remove_dir_all(&dir);
                }
                std::process::exit(code);
            }
        });
    }
    let result = demo(&dir, a);
    let stopped = daemons::stop(&dir, Duration::from_secs(20));
    match (&result, &stopped) {
        (Ok(()), Ok(n)) => {
            println!("\nstopped {n} processes; nothing of the demo is left running");
        }
        _ => {
            if let Err(e) = &stopped {
                eprintln!("zzctl demo: stopping the deployment: {e:#}");
            }
            if let Some(t) = tmp {
                let kept = t.keep();
                eprintln!(
                    "zzctl demo: the deployment is kept in {} (logs in {}/logs and {}/data/host-h0/logs)",
                    kept.display(),
                    kept.display(),
                    kept.display()
                );
            }
        }
    }
    result.and(stopped.map(|_| ()))
}

fn demo(dir: &Path, a: &DemoArgs) -> Result<()> {
    println!(
        "zz demo: f=1, two kv apps, {} backend, in {}\n",
        a.backend,
        dir.display()
    );
    let init_args = init::InitArgs {
        dir: dir.to_path_buf(),
        f: 1,
        apps: vec!["kv1".into(), "kv2".into()],
        backend: a.backend.clone(),
        hosts: vec![],
        allow_fault_injection: true,
        clients: 4,
        listen: "127.0.0.1".parse()?,
        log_level: "info".into(),
        dormant: "paused".into(),
        checkpoint_interval: 64,
        // A replica that is merely slow on a busy laptop should not be
        // suspected; the injected fault is caught by its wrong replies.
        exec_timeout_ms: Some(if a.backend == "libvirt" { 2000 } else { 500 }),
    };
    init::write(&init_args)?;
    let cfg = Arc::new(crate::ops::load_config(dir)?);
    println!(
        "1. init: 4 agreement replicas, host h0, apps kv1 and kv2 with execution replicas 0,1 active and 2 dormant"
    );
    let up = daemons::start(dir, Duration::from_secs(180))?;
    println!(
        "   up: {} daemons started (pid files in {}/run)",
        up.started.len(),
        dir.display()
    );

    // Load.
    let load = Arc::new(Load::default());
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let cluster = rt.block_on(async {
        let opts = ClientOptions {
            op_timeout: Duration::from_secs(120),
            retransmit_after: Duration::from_millis(500),
            ..ClientOptions::default()
        };
        let cluster = Arc::new(Cluster::from_config(&cfg, opts)?);
        if !cluster
            .wait_connected(cluster.n(), Duration::from_secs(10))
            .await
        {
            bail!("could not connect to every agreement replica within 10 s");
        }
        Ok::<_, anyhow::Error>(cluster)
    })?;
    let mut tasks = Vec::new();
    for (n, c) in cfg.clients.iter().enumerate() {
        let app = 1 + (n as u32 % 2);
        let (cfg, cluster, load, id) = (cfg.clone(), cluster.clone(), load.clone(), c.id);
        tasks.push(rt.spawn(async move {
            let r = client_loop(cfg, cluster, id, app, load).await;
            if let Err(e) = &r {
                eprintln!("   client {id}: {e:#}");
            }
            r
        }));
    }
    println!(
        "2. load: {} closed-loop clients (put/get, every result checked)",
        tasks.len()
    );
    let t0 = Instant::now();
    let mut last = (Instant::now(), [0u64; 2]);
    let mut rate = |load: &Load, label: &str| {
        let now = [
            load.ops[0].load(Ordering::Relaxed),
            load.ops[1].load(Ordering::Relaxed),
        ];
        let dt = last.0.elapsed().as_secs_f64().max(1e-3);
        let r = [
            (now[0] - last.1[0]) as f64 / dt,
            (now[1] - last.1[1]) as f64 / dt,
        ];
        last = (Instant::now(), now);
        println!(
            "   {:>5.1} s  kv1 {:>6.0} req/s  kv2 {:>6.0} req/s  {label}",
            t0.elapsed().as_secs_f64(),
            r[0],
            r[1]
        );
        r
    };
    let check_clients = |tasks: &Vec<tokio::task::JoinHandle<Result<()>>>| -> Result<()> {
        if load.wrong.load(Ordering::Relaxed) > 0 || load.errors.load(Ordering::Relaxed) > 0 {
            let done = tasks.iter().filter(|t| t.is_finished()).count();
            bail!(
                "{done} client(s) failed (wrong results: {}); the demo stops",
                load.wrong.load(Ordering::Relaxed)
            );
        }
        Ok(())
    };
    // Warm up until the faulty app has a stable execution checkpoint.
    let mut before_rates = Vec::new();
    let warm = Duration::from_secs_f64(a.warmup.max(1.0));
    while t0.elapsed() < warm
        || load.ops[0].load(Ordering::Relaxed) < 2 * cfg.execution.checkpoint_interval
    {
        std::thread::sleep(Duration::from_millis(1000));
        before_rates.push(rate(&load, ""));
        check_clients(&tasks)?;
        if t0.elapsed() > Duration::from_secs(60) {
            bail!("the load did not reach two execution checkpoints in 60 s");
        }
    }

    // The fault.
    // The fault goes to the lowest active replica; the dormant one repairs.
    // (Under heavy load a slow replica may already have been replaced.)
    let settle = Instant::now();
    let suspicions = |st: &status::DeploymentStatus| -> u64 {
        st.agreement
            .replicas
            .iter()
            .filter_map(|r| r.suspicions)
            .sum()
    };
    let (base, base_suspicions) = loop {
        let st = status::collect(&cfg);
        if let Some(app) = st.apps.iter().find(|x| x.id == FAULTY_APP) {
            let asleep = app
                .executors
                .iter()
                .find(|e| !app.active.contains(&e.index) && e.state.starts_with("dormant"));
            if !app.recovering && app.active.len() == cfg.f + 1 && asleep.is_some() {
                break (app.clone(), suspicions(&st));
            }
        }
        if settle.elapsed() > Duration::from_secs(30) {
            bail!("kv1 did not settle with f+1 active replicas and a dormant one");
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let faulty_replica = base.active[0];
    let dormant_replica = base
        .executors
        .iter()
        .find(|e| !base.active.contains(&e.index) && e.state.starts_with("dormant"))
        .map(|e| e.index)
        .context("no dormant replica")?;
    let exec = operator::resolve_app(&cfg, "kv1", faulty_replica)?;
    let base_recovery = base
        .executors
        .iter()
        .find(|e| e.index == dormant_replica)
        .and_then(|e| e.recovery.clone());
    let host = &cfg.hosts[0];
    let fault_us = now_us();
    load.fault_us.store(fault_us, Ordering::Relaxed);
    let plan = operator::plan_toml("wrong_replies_from=1")?;
    let cmd = crate::ops::operator::signed(
        &cfg,
        OperatorAction::Fault {
            exec,
            plan_toml: plan,
        },
    )?;
    match operator::send(host.addr, &cmd, Duration::from_secs(15))? {
        OperatorAck::Accepted(_) => println!(
            "3. fault: kv1 replica {faulty_replica} now answers every request wrongly \
             (operator-signed drill; its host agent restarted it with the fault plan)"
        ),
        OperatorAck::Refused(why) => bail!("the host agent refused the fault: {why}"),
    }

    // Watch the repair.
    let fault_at = Instant::now();
    let mut seen: Vec<&'static str> = Vec::new();
    let mut max_missing = None;
    let mut last_rate = Instant::now();
    let mut after_rates = Vec::new();
    let settled = loop {
        std::thread::sleep(Duration::from_millis(50));
        check_clients(&tasks)?;
        let st = status::collect(&cfg);
        let Some(app) = st.apps.iter().find(|x| x.id == FAULTY_APP) else {
            bail!("status lacks app kv1");
        };
        let e = |i: u32| app.executors.iter().find(|e| e.index == i);
        let state = |i: u32| e(i).map(|e| e.state.clone()).unwrap_or_default();
        let elapsed = fault_at.elapsed().as_millis();
        let mut event = |name: &'static str, text: String| {
            if !seen.contains(&name) {
                seen.push(name);
                println!("   +{elapsed:>6} ms  {text}");
            }
        };
        if suspicions(&st) > base_suspicions || app.epoch > base.epoch {
            event(
                "detect",
                "detected: agreement replicas suspect kv1's active set".into(),
            );
        }
        if app.epoch > base.epoch && app.active.contains(&dormant_replica) {
            event(
                "wake",
                format!(
                    "wake ordered (epoch {}): replica {dormant_replica} is {}",
                    app.epoch,
                    state(dormant_replica)
                ),
            );
        }
        if state(dormant_replica) == "recovering" {
            let d = e(dormant_replica).cloned().unwrap_or_default();
            if let Some(m) = d.missing_pages {
                max_missing = Some(max_missing.unwrap_or(0).max(m));
            }
            event(
                "recovering",
                match d.missing_pages {
                    Some(m) => format!(
                        "replica {dormant_replica} recovering: {m} pages missing, {} fetched",
                        d.pages_fetched
                    ),
                    None => format!(
                        "replica {dormant_replica} recovering: serving while it compares its pages \
                         with the checkpoint's; {} fetched so far",
                        d.pages_fetched
                    ),
                },
            );
        }
        if let Some(r) = e(dormant_replica).and_then(|d| d.recovery.clone()) {
            if r.complete && app.epoch > base.epoch && Some(&r) != base_recovery.as_ref() {
                event("recovered", format!(
                    "replica {dormant_replica} recovered: {} of {} pages fetched and verified in {:.0} ms",
                    r.fetched,
                    r.pages.map(|p| p.to_string()).unwrap_or_else(|| "?".into()),
                    r.seconds.unwrap_or(0.0) * 1000.0
                ));
            }
        }
        if app.faulty.contains(&faulty_replica) {
            event(
                "verdict",
                format!(
                    "verdict: replica {faulty_replica} is faulty; state {}",
                    state(faulty_replica)
                ),
            );
        }
        if state(faulty_replica) == "reimaging" {
            event(
                "reimaging",
                format!("replica {faulty_replica} is being reimaged"),
            );
        }
        let back = app.faulty.contains(&faulty_replica)
            && !app.recovering
            && app.active.len() == cfg.f + 1
            && !app.active.contains(&faulty_replica)
            && state(faulty_replica).starts_with("dormant");
        if back {
            event(
                "back",
                format!(
                    "back to f+1: active {:?}, replica {faulty_replica} rebuilt and {}",
                    app.active,
                    state(faulty_replica)
                ),
            );
            break true;
        }
        if last_rate.elapsed() >= Duration::from_secs(1) {
            last_rate = Instant::now();
            after_rates.push(rate(&load, ""));
        }
        if fault_at.elapsed() > Duration::from_secs_f64(a.max_wait) {
            break false;
        }
    };
    // A little load after the repair.
    std::thread::sleep(Duration::from_millis(1500));
    let final_rate = rate(&load, "after the repair");
    load.stop.store(true, Ordering::Relaxed);
    let mut client_errors = Vec::new();
    for t in tasks {
        match rt.block_on(t) {
            Ok(Ok(())) => {}
            Ok(Err(e)) => client_errors.push(format!("{e:#}")),
            Err(e) => client_errors.push(e.to_string()),
        }
    }
    drop(cluster);
    drop(rt);
    if !client_errors.is_empty() {
        bail!("clients failed: {}", client_errors.join("; "));
    }
    if !settled {
        bail!(
            "the repair did not complete within {} s; steps seen: {:?}",
            a.max_wait,
            seen
        );
    }

    // Timings from the daemons' logs.
    let logs = dir.join("logs");
    let hostd_log = logs.join(format!("hostd-{}.log", host.name));
    let exec_log = |i: u32| {
        dir.join(format!(
            "data/host-{}/logs/exec-a{FAULTY_APP}-e{i}.log",
            host.name
        ))
    };
    let detect = (0..cfg.n())
        .filter_map(|i| {
            log_time(
                &logs.join(format!("replica-{i}.log")),
                &["suspecting execution replicas", "app=1"],
                fault_us,
            )
        })
        .min();
    let wake = log_time(
        &hostd_log,
        &[
            "host command done",
            &format!("app{FAULTY_APP}/exec{dormant_replica}"),
            "Wake",
        ],
        fault_us,
    );
    let rec_start = log_time(
        &exec_log(dormant_replica),
        &["recovering: executing from the stable checkpoint"],
        fault_us,
    );
    let rec_done = log_time(&exec_log(dormant_replica), &["recovery complete"], fault_us);
    let reimage = log_time(
        &hostd_log,
        &[
            "host command done",
            &format!("app{FAULTY_APP}/exec{faulty_replica}"),
            "Reimage",
        ],
        fault_us,
    );
    let first = match load.first_after_fault_us.load(Ordering::Relaxed) {
        0 => None,
        t => Some(t),
    };
    let st = status::collect(&cfg);
    let rec = st
        .apps
        .iter()
        .find(|x| x.id == FAULTY_APP)
        .and_then(|x| x.executors.iter().find(|e| e.index == dormant_replica))
        .and_then(|e| e.recovery.clone())
        .unwrap_or_default();
    let avg = |v: &[[f64; 2]]| {
        if v.is_empty() {
            [0.0, 0.0]
        } else {
            let n = v.len() as f64;
            [
                v.iter().map(|r| r[0]).sum::<f64>() / n,
                v.iter().map(|r| r[1]).sum::<f64>() / n,
            ]
        }
    };
    let before = avg(&before_rates[before_rates.len().min(1)..]);
    println!("\nsummary (times relative to the fault, from the daemons' logs)");
    println!("  {:<44} time", "step");
    let rows = [
        (
            format!("fault injected into kv1 replica {faulty_replica}"),
            Some(fault_us),
        ),
        ("detected (first suspicion)".to_string(), detect),
        (
            format!("dormant replica {dormant_replica} woken (host agent)"),
            wake,
        ),
        (
            format!("replica {dormant_replica} recovering from the checkpoint"),
            rec_start,
        ),
        (
            "first correct reply accepted after the fault".to_string(),
            first,
        ),
        (
            format!("replica {dormant_replica} has its whole state"),
            rec_done,
        ),
        (
            format!("faulty replica {faulty_replica} reimaged; f+1 active again"),
            reimage,
        ),
    ];
    for (what, t) in rows {
        println!("  {what:<44} {}", ms(t, fault_us));
    }
    println!(
        "  {:<44} {:>9} (fetched {} of {} pages{})",
        "pages",
        "",
        rec.fetched,
        rec.pages
            .map(|p| p.to_string())
            .unwrap_or_else(|| "?".into()),
        max_missing
            .map(|m| format!(", {m} missing when seen"))
            .unwrap_or_default()
    );
    println!(
        "  {:<44} kv1 {:.0}, kv2 {:.0} req/s before; kv1 {:.0}, kv2 {:.0} req/s after",
        "throughput", before[0], before[1], final_rate[0], final_rate[1]
    );
    println!(
        "  {:<44} {} requests, {} wrong results accepted",
        "clients",
        load.ops[0].load(Ordering::Relaxed) + load.ops[1].load(Ordering::Relaxed),
        load.wrong.load(Ordering::Relaxed)
    );
    for (what, t) in [
        ("detection", detect),
        ("wake", wake),
        ("reimage", reimage),
        ("first correct reply", first),
    ] {
        if t.is_none() {
            bail!("the demo did not see the {what}");
        }
    }
    println!("\ndemo: OK");
    Ok(())
}
