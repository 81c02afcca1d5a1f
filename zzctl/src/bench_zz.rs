//! Benchmarks of the whole system as processes: `zz-agreement` daemons, one
//! `zz-hostd` on 127.0.0.1 (process backend) running the `zz-executor`s of
//! one or more `kv` apps, and closed-loop clients.
//!
//! `bench recovery` measures how fast a wrong-reply fault is repaired:
//!
//! 1. deploy f=1: 4 agreement replicas, one kv app with 3 execution replicas
//!    (0 and 1 active, 2 dormant), agreement batches of **one request**, so
//!    the k-th request the cluster orders for the app gets `app_seq` k;
//! 2. hostd starts replica 0 with the fault plan
//!    `wrong_replies_from = N + pre_fault_ops + 1` where N is the number of
//!    preload puts;
//! 3. preload: N puts of 64 KiB values by several clients in parallel (app
//!    seqs 1..=N; N is a multiple of the execution checkpoint interval, so a
//!    checkpoint covers the whole preload), then a pause for that checkpoint to
//!    become stable;
//! 4. one closed-loop client alternates reads of preloaded keys (checked) and
//!    small writes. Its request number `pre_fault_ops + 1` is the first one
//!    replica 0 answers wrongly: the instant it is issued is the **fault**
//!    time `t0` (replica 0 executes it as soon as it is ordered);
//! 5. it keeps running until the woken replica has fetched its whole state.
//!
//! Measured, all relative to `t0` (daemon log lines carry UTC timestamps
//! from the same clock):
//! - `detect_ms`: the first `suspecting execution replicas` line of any
//!   agreement replica (its `app_seq` is checked against the fault's; a
//!   suspicion logged before the fault fails the run, which then measured
//!   something else);
//! - `wake_ms`: hostd's `host command done` line for the `Wake` of replica 2
//!   (SIGCONT done);
//! - `first_correct_reply_ms`: the client accepting the first request issued
//!   at or after `t0` (that request needs the woken replica's reply: replica 0
//!   answers wrongly and f+1 = 2 matching replies are needed);
//! - `full_state_ms`: replica 2's `recovery complete; state is local again`
//!   line (every page of the checkpoint fetched and verified).
//!
//! `bench tenants` runs several `kv+cpu=N` apps on one host under closed-loop
//! load, with f+1 (`zz`) or all 2f+1 (`full`) execution replicas active
//! (`full` sets `execution.all_active`, which the agreement replicas and the
//! host agent read).

use std::collections::BTreeMap;
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use zz_client::deploy::{
    free_addrs_avoiding, write_local, DeployOptions, Deployment, LocalCluster,
};
use zz_client::{executor_mac_keys, Client, ClientOptions, Cluster};
use zz_executor::{KvOp, KvResult};
use zz_wire::config::{
    write_key_file, AgreementTuning, AppEntry, ClusterConfig, ExecutorEntry, HostEntry,
};
use zz_wire::crypto::KeyPair;
use zz_wire::AppId;

/// The three programs a process deployment runs.
#[derive(Clone, Debug)]
pub struct Programs {
    pub agreement: PathBuf,
    pub hostd: PathBuf,
    pub executor: PathBuf,
}

/// What a process deployment looks like.
#[derive(Clone, Debug)]
pub struct SystemSpec {
    pub f: usize,
    /// The kv apps, with ids 1..=apps.
    pub apps: u32,
    pub clients: usize,
    pub checkpoint_interval: u64,
    pub timeout_min_ms: u64,
    pub tuning: AgreementTuning,
    /// `--fault` arguments for hostd.
    pub faults: Vec<String>,
    /// Extra environment for hostd (inherited by the executors it starts).
    pub hostd_env: Vec<(String, String)>,
    /// Start every execution replica active (`execution.all_active`).
    pub all_active: bool,
    /// Run the execution replicas as VMs (libvirt backend) instead of processes.
    pub vm: Option<crate::bench_vm::VmSpec>,
}

/// A running process deployment: hostd and the agreement daemons. Dropping
/// it stops everything (hostd first: it destroys its executors).
pub struct System {
    pub dep: Deployment,
    cluster: LocalCluster,
    hostd: Option<Child>,
    pub hostd_log: PathBuf,
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Writes the deployment of `spec` into `dir`: 3f+1 agreement replicas, one
/// host `h0` on the process backend, 2f+1 execution replicas per app.
pub fn write_deployment(dir: &Path, spec: &SystemSpec) -> Result<Deployment> {
    let opts = DeployOptions {
        f: spec.f,
        clients: spec.clients,
        metrics: true,
        apps: vec![],
        tuning: spec.tuning.clone(),
        log_level: Some("info".into()),
        ..DeployOptions::default()
    };
    let d = write_local(dir, &opts).context("writing the deployment")?;
    let mut cfg: ClusterConfig = d.config.clone();
    let host_addr = free_addrs_avoiding("127.0.0.1".parse()?, 1, &cfg.listen_addrs())?[0];
    cfg.hosts.push(HostEntry {
        name: "h0".into(),
        addr: host_addr,
        backend: "process".into(),
        libvirt_uri: None,
        metrics_addr: None,
    });
    for app in 1..=spec.apps {
        cfg.apps.push(AppEntry {
            id: app,
            name: format!("kv{app}"),
            kind: "kv".into(),
        });
        for index in 0..(2 * spec.f + 1) as u32 {
            let key = KeyPair::generate();
            let key_file = PathBuf::from(format!("keys/exec-{app}-{index}.key"));
            write_key_file(&dir.join(&key_file), &key)?;
            cfg.executors.push(ExecutorEntry {
                app,
                index,
                host: "h0".into(),
                public_key: hex(key.public().as_bytes()),
                key_file,
            });
        }
    }
    cfg.execution.checkpoint_interval = spec.checkpoint_interval;
    cfg.execution.timeout_min_ms = spec.timeout_min_ms;
    cfg.execution.allow_fault_injection = !spec.faults.is_empty();
    cfg.execution.all_active = spec.all_active;
    if let Some(vm) = &spec.vm {
        vm.apply(&mut cfg);
    }
    cfg.validate().context("validating the deployment")?;
    cfg.save(&d.config_path)?;
    Ok(Deployment::load(&d.config_path)?)
}

impl System {
    /// Writes and starts a deployment: hostd (waits until it listens), then
    /// the agreement daemons.
    pub fn start(dir: &Path, spec: &SystemSpec, progs: &Programs) -> Result<System> {
        let dep = write_deployment(dir, spec)?;
        let log_dir = dir.join("logs");
        std::fs::create_dir_all(&log_dir)?;
        let hostd_log = log_dir.join("hostd.log");
        let log = std::fs::File::create(&hostd_log)?;
        let mut cmd = Command::new(&progs.hostd);
        cmd.arg("--config")
            .arg(&dep.config_path)
            .args(["--host", "h0", "--executor"])
            .arg(&progs.executor);
        for f in &spec.faults {
            cmd.args(["--fault", f]);
        }
        for (k, v) in &spec.hostd_env {
            cmd.env(k, v);
        }
        let mut listen_wait = Duration::from_secs(30);
        if let Some(vm) = &spec.vm {
            vm.prepare(dir, &mut cmd)?;
            listen_wait = vm.boot_timeout;
        }
        let hostd = cmd
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {}", progs.hostd.display()))?;
        let cluster = LocalCluster::new(&progs.agreement, dep.clone(), vec![]);
        let mut sys = System {
            dep,
            cluster,
            hostd: Some(hostd),
            hostd_log,
        };
        let addr = sys.dep.config.hosts[0].addr;
        let start = Instant::now();
        while TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_err() {
            if let Some(Ok(Some(s))) = sys.hostd.as_mut().map(|c| c.try_wait()) {
                bail!("zz-hostd exited ({s}); see {}", sys.hostd_log.display());
            }
            if start.elapsed() > listen_wait {
                bail!("zz-hostd did not listen; see {}", sys.hostd_log.display());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        sys.cluster
            .start_all(Duration::from_secs(30))
            .context("starting the agreement replicas")?;
        Ok(sys)
    }

    /// The log of execution replica `index` of `app`.
    pub fn executor_log(&self, app: AppId, index: u32) -> PathBuf {
        self.dep
            .dir
            .join(format!("data/host-h0/logs/exec-a{app}-e{index}.log"))
    }

    /// The log of agreement replica `id`.
    pub fn agreement_log(&self, id: u32) -> PathBuf {
        self.cluster.log_path(id)
    }

    /// A client with id `id`, knowing every app's execution replica keys.
    pub fn client(&self, cluster: &Cluster, id: zz_wire::ClientId) -> Result<Client> {
        let mut c = cluster.client(self.dep.client_keys(id)?)?;
        for (app, keys) in executor_mac_keys(&self.dep.config, id)? {
            c.set_executor_keys(app, keys);
        }
        Ok(c)
    }

    /// Stops hostd (SIGTERM, then SIGKILL after 15 s) and the agreement
    /// daemons. Idempotent.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.hostd.take() {
            // SAFETY: kill(2) on a child we spawned and have not reaped.
            unsafe {
                libc::kill(child.id() as libc::pid_t, libc::SIGTERM);
            }
            let start = Instant::now();
            loop {
                if let Ok(Some(_)) = child.try_wait() {
                    break;
                }
                if start.elapsed() > Duration::from_secs(15) {
                    let _ = child.kill();
                    let _ = child.wait();
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        self.cluster.stop_all(Duration::from_secs(10));
    }
}

impl Drop for System {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A temporary folder, or `keep` (created) when given.
fn bench_dir(keep: &Option<PathBuf>) -> Result<(PathBuf, Option<tempfile::TempDir>)> {
    match keep {
        Some(d) => {
            std::fs::create_dir_all(d)?;
            Ok((d.clone(), None))
        }
        None => {
            let t = tempfile::Builder::new()
                .prefix("zz-bench-")
                .tempdir()
                .context("creating a temporary directory")?;
            Ok((t.path().to_path_buf(), Some(t)))
        }
    }
}

// ------------------------------------------------------------ timestamps

/// Days since 1970-01-01 of a proleptic Gregorian date.
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = if y >= 0 { y } else { y - 399 } / 400;
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// Microseconds since the Unix epoch of a log line's leading
/// `YYYY-MM-DDTHH:MM:SS[.frac]Z` timestamp (tracing's default format).
pub fn line_time_us(line: &str) -> Option<i64> {
    let ts = line.split_whitespace().next()?;
    let ts = ts.strip_suffix('Z')?;
    let (date, time) = ts.split_once('T')?;
    let mut d = date.splitn(3, '-').map(|x| x.parse::<i64>().ok());
    let (y, mo, da) = (d.next()??, d.next()??, d.next()??);
    let (hms, frac) = time.split_once('.').unwrap_or((time, ""));
    let mut t = hms.splitn(3, ':').map(|x| x.parse::<i64>().ok());
    let (h, mi, s) = (t.next()??, t.next()??, t.next()??);
    let mut us = 0i64;
    for (i, c) in frac.chars().take(6).enumerate() {
        us += (c.to_digit(10)? as i64) * 10i64.pow(5 - i as u32);
    }
    let secs = days_from_civil(y, mo, da) * 86_400 + h * 3600 + mi * 60 + s;
    Some(secs * 1_000_000 + us)
}

fn now_us() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or(0)
}

/// The earliest time of a line of `path` containing every one of `needles`.
fn first_line_time(path: &Path, needles: &[&str]) -> Option<(i64, String)> {
    let text = std::fs::read_to_string(path).ok()?;
    text.lines()
        .filter(|l| needles.iter().all(|n| l.contains(n)))
        .filter_map(|l| line_time_us(l).map(|t| (t, l.to_string())))
        .min_by_key(|(t, _)| *t)
}

// ------------------------------------------------------------- recovery

/// What `bench recovery` runs.
#[derive(Clone, Debug)]
pub struct RecoveryBench {
    pub state_mib: u64,
    pub value_bytes: usize,
    pub preload_clients: usize,
    pub checkpoint_interval: u64,
    /// Requests of the measuring client before the fault.
    pub pre_fault_ops: u64,
    /// Longest wait for the full state after the fault.
    pub max_wait: Duration,
    pub programs: Programs,
    pub keep_dir: Option<PathBuf>,
    /// Execution replicas in VMs (libvirt) instead of processes.
    pub vm: Option<crate::bench_vm::VmSpec>,
}

/// The outcome of `bench recovery`.
#[derive(Clone, Debug)]
pub struct RecoveryReport {
    /// `process` or `libvirt`.
    pub backend: &'static str,
    pub state_mib: u64,
    pub detect_ms: f64,
    pub wake_ms: f64,
    pub first_correct_reply_ms: f64,
    pub full_state_ms: f64,
}

impl RecoveryReport {
    /// The machine-readable summary line.
    pub fn line(&self) -> String {
        format!(
            "bench=recovery backend={} state_mib={} detect_ms={:.1} wake_ms={:.1} \
             first_correct_reply_ms={:.1} full_state_ms={:.1}",
            self.backend,
            self.state_mib,
            self.detect_ms,
            self.wake_ms,
            self.first_correct_reply_ms,
            self.full_state_ms
        )
    }
}

const KV: AppId = 1;

/// The deterministic 64 KiB-ish value of preloaded key `i`.
fn preload_value(i: u64, len: usize) -> Vec<u8> {
    let mut v = Vec::with_capacity(len + 8);
    let mut x = i.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    while v.len() < len {
        // xorshift: cheap, different per key and per position.
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.extend_from_slice(&x.to_le_bytes());
    }
    v.truncate(len);
    v
}

fn preload_key(i: u64) -> Vec<u8> {
    format!("p{i}").into_bytes()
}

/// Runs `bench recovery`.
pub fn run_recovery(b: &RecoveryBench) -> Result<RecoveryReport> {
    if b.state_mib == 0 || b.value_bytes == 0 || b.preload_clients == 0 {
        bail!("--state-mib, the value size and the preload clients must be positive");
    }
    let k = b.checkpoint_interval.max(1);
    let big = (b.state_mib * 1024 * 1024).div_ceil(b.value_bytes as u64);
    // A multiple of the checkpoint interval (padded with small puts): the
    // checkpoint at `preload` covers all of it, and the next one is `k`
    // app_seqs later.
    let preload = big.div_ceil(k) * k;
    if b.pre_fault_ops + 64 >= k {
        bail!("--checkpoint-interval must exceed --pre-fault-ops by more than 64");
    }
    let fault_seq = preload + b.pre_fault_ops + 1;
    let (dir, _tmp) = bench_dir(&b.keep_dir)?;
    eprintln!("zzctl bench: deployment in {}", dir.display());
    let tuning = AgreementTuning {
        batch_max_requests: 1,
        ..AgreementTuning::default()
    };
    let spec = SystemSpec {
        f: 1,
        apps: 1,
        clients: b.preload_clients + 1,
        checkpoint_interval: k,
        // The fault is a wrong reply, detected by the mismatch when both
        // replies are in, not by this timeout; below about a second, a
        // preload of 64 KiB puts on a busy machine can trip it first, and
        // the run is void.
        timeout_min_ms: 1000,
        tuning,
        faults: vec![format!("{KV}/0:wrong_replies_from={fault_seq}")],
        hostd_env: vec![],
        all_active: false,
        vm: b.vm.clone(),
    };
    let mut sys = System::start(&dir, &spec, &b.programs)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let ids = sys.dep.client_ids();
    let plan = Plan {
        big,
        preload,
        fault_seq,
        // Stay below the next checkpoint: see `recovery_clients`.
        last_seq: preload + k - 32,
    };
    let result = rt.block_on(recovery_clients(&sys, b, &ids, &plan));
    let outcome = match result {
        Ok(t) => evaluate_recovery(&sys, b, t, fault_seq),
        Err(e) => Err(e),
    };
    sys.stop();
    if outcome.is_err() {
        eprintln!("zzctl bench: logs are in {}/logs", dir.display());
    }
    outcome
}

/// The app_seqs of a recovery run.
struct Plan {
    /// Preloaded keys with large values: `0..big`.
    big: u64,
    /// Puts of the preload (large ones, then small padding ones).
    preload: u64,
    /// The first app_seq replica 0 answers wrongly.
    fault_seq: u64,
    /// The measuring client stops issuing requests after this app_seq.
    last_seq: u64,
}

/// What the measuring client saw, in microseconds since the Unix epoch.
struct ClientTimes {
    fault_us: i64,
    first_correct_us: i64,
}

async fn recovery_clients(
    sys: &System,
    b: &RecoveryBench,
    ids: &[zz_wire::ClientId],
    plan: &Plan,
) -> Result<ClientTimes> {
    let (big, preload, fault_seq) = (plan.big, plan.preload, plan.fault_seq);
    let preload_opts = ClientOptions {
        retransmit_after: Duration::from_secs(20),
        op_timeout: Duration::from_secs(120),
        ..ClientOptions::default()
    };
    let cluster = Cluster::from_config(&sys.dep.config, preload_opts)?;
    if !cluster
        .wait_connected(cluster.n(), Duration::from_secs(10))
        .await
    {
        bail!("could not connect to every agreement replica within 10 s");
    }
    // Preload: app_seqs 1..=preload, in parallel.
    let t = Instant::now();
    let next = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for &id in &ids[..b.preload_clients] {
        let mut c = sys.client(&cluster, id)?;
        let next = next.clone();
        let len = b.value_bytes;
        tasks.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= preload {
                    return Ok::<_, anyhow::Error>(());
                }
                let value = if i < big {
                    preload_value(i, len)
                } else {
                    i.to_le_bytes().to_vec()
                };
                let op = KvOp::Put {
                    key: preload_key(i),
                    value,
                }
                .encode();
                let r = c.invoke(KV, op).await.context("preload put")?;
                match KvResult::decode(&r) {
                    Ok(KvResult::Stored { .. }) => {}
                    other => bail!("preload put {i}: unexpected result {other:?}"),
                }
            }
        }));
    }
    for t in tasks {
        t.await.context("preload task panicked")??;
    }
    let secs = t.elapsed().as_secs_f64();
    eprintln!(
        "zzctl bench: preloaded {big} values of {} bytes ({:.0} MiB) and {} small ones in {secs:.1} s ({:.0} puts/s)",
        b.value_bytes,
        (big * b.value_bytes as u64) as f64 / (1024.0 * 1024.0),
        preload - big,
        preload as f64 / secs
    );
    // Let the checkpoint at `preload` become stable.
    tokio::time::sleep(Duration::from_secs(2)).await;
    // Let the preload's disk writeback drain (three replicas just wrote the
    // state each, up to 3 GiB): the fault is measured, not the kernel
    // flushing setup data behind it (`bench statefetch` does the same).
    let synced = Instant::now();
    let _ = tokio::process::Command::new("sync").status().await;
    eprintln!(
        "zzctl bench: disk writeback of the preload drained in {:.1} s",
        synced.elapsed().as_secs_f64()
    );

    let load_opts = ClientOptions {
        retransmit_after: Duration::from_secs(2),
        op_timeout: Duration::from_secs(300),
        ..ClientOptions::default()
    };
    let cluster2 = Cluster::from_config(&sys.dep.config, load_opts)?;
    if !cluster2
        .wait_connected(cluster2.n(), Duration::from_secs(10))
        .await
    {
        bail!("could not connect to every agreement replica within 10 s");
    }
    let mut c = sys.client(&cluster2, ids[b.preload_clients])?;
    let full_marker = sys.executor_log(KV, 2);
    let mut fault_us = 0i64;
    let mut first_correct_us = 0i64;
    let mut lat_before = Vec::new();
    let mut seq = preload;
    let mut small = 0u64;
    let start_wait = Instant::now();
    let mut done_at: Option<Instant> = None;
    loop {
        if seq >= plan.last_seq {
            // The load stops short of the next checkpoint, so every run
            // measures the same work: the fetch of the checkpoint stable at
            // the fault. (A newer stable checkpoint would not break the
            // recovery: peers keep a checkpoint that is being fetched.)
            eprintln!(
                "zzctl bench: load paused at app_seq {seq}, before the next checkpoint; waiting for the full state"
            );
            while first_line_time(&full_marker, &["recovery complete"]).is_none()
                && start_wait.elapsed() <= b.max_wait
            {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            break;
        }
        seq += 1;
        let is_fault = seq == fault_seq;
        let (op, expect) = if seq % 2 == 0 {
            let i = (seq.wrapping_mul(2_654_435_761)) % big;
            (
                KvOp::Get {
                    key: preload_key(i),
                }
                .encode(),
                Some(KvResult::Value(Some(preload_value(i, b.value_bytes)))),
            )
        } else {
            small += 1;
            let op = KvOp::Put {
                key: format!("s{small}").into_bytes(),
                value: small.to_le_bytes().to_vec(),
            }
            .encode();
            (op, Some(KvResult::Stored { replaced: false }))
        };
        let issued = now_us();
        let t0 = Instant::now();
        if is_fault {
            fault_us = issued;
            eprintln!("zzctl bench: fault: request for app_seq {seq} issued");
        }
        let r = c.invoke(KV, op).await.context("load operation")?;
        let accepted = now_us();
        let got = KvResult::decode(&r).map_err(|e| anyhow::anyhow!("bad kv result: {e:?}"))?;
        if let Some(e) = expect {
            if got != e {
                bail!("wrong result accepted at app_seq {seq}: {got:?}");
            }
        }
        if seq < fault_seq {
            lat_before.push(t0.elapsed().as_micros() as f64 / 1000.0);
        }
        if is_fault {
            first_correct_us = accepted;
            eprintln!(
                "zzctl bench: first request issued after the fault accepted after {:.1} ms",
                (accepted - issued) as f64 / 1000.0
            );
        }
        if seq > fault_seq {
            if done_at.is_none() && first_line_time(&full_marker, &["recovery complete"]).is_some()
            {
                done_at = Some(Instant::now());
            }
            // A little load after the state is complete, then stop.
            if done_at.is_some_and(|d| d.elapsed() > Duration::from_millis(500)) {
                break;
            }
            if start_wait.elapsed() > b.max_wait {
                eprintln!("zzctl bench: gave up waiting for the full state");
                break;
            }
        }
    }
    lat_before.sort_by(f64::total_cmp);
    if !lat_before.is_empty() {
        eprintln!(
            "zzctl bench: before the fault: {} ops, p50 {:.2} ms",
            lat_before.len(),
            lat_before[lat_before.len() / 2]
        );
    }
    eprintln!(
        "zzctl bench: {} requests after the fault",
        seq.saturating_sub(fault_seq)
    );
    Ok(ClientTimes {
        fault_us,
        first_correct_us,
    })
}

fn evaluate_recovery(
    sys: &System,
    b: &RecoveryBench,
    t: ClientTimes,
    fault_seq: u64,
) -> Result<RecoveryReport> {
    let ms = |at: i64| (at - t.fault_us) as f64 / 1000.0;
    // A suspicion before the fault means the run measured something else (a
    // replica suspected while the state was being loaded): refuse to report
    // it. So every time measured below (a wake follows a suspicion) is after
    // the fault.
    let mut detect: Option<(i64, String)> = None;
    for id in 0..sys.dep.config.n() as u32 {
        if let Some((at, line)) =
            first_line_time(&sys.agreement_log(id), &["suspecting execution replicas"])
        {
            if at < t.fault_us {
                bail!(
                    "agreement replica {id} suspected the execution replicas {:.1} ms before \
                     the fault was injected, so this run does not measure the fault: {}",
                    -ms(at),
                    line.trim()
                );
            }
            if detect.as_ref().is_none_or(|(d, _)| at < *d) {
                detect = Some((at, line));
            }
        }
    }
    let (detect_at, line) =
        detect.context("no agreement replica suspected the execution replicas")?;
    let expected = format!("app_seq={fault_seq}");
    if !line.contains(&expected) {
        eprintln!("zzctl bench: warning: the first suspicion is not about {expected}: {line}");
    }
    let (wake_at, _) =
        first_line_time(&sys.hostd_log, &["host command done", "app1/exec2", "Wake"])
            .context("hostd did not wake replica 2")?;
    let exec2 = sys.executor_log(KV, 2);
    let (full_at, full_line) =
        first_line_time(&exec2, &["recovery complete"]).with_context(|| {
            format!(
                "replica 2 did not complete its recovery within {:?}",
                b.max_wait
            )
        })?;
    eprintln!("zzctl bench: {}", full_line.trim());
    if let Some((_, l)) = first_line_time(&exec2, &["recovery: pages compared"]) {
        eprintln!("zzctl bench: {}", l.trim());
    }
    if let Some((at, _)) = first_line_time(
        &sys.hostd_log,
        &["host command done", "app1/exec0", "Reimage"],
    ) {
        eprintln!("zzctl bench: replica 0 reimaged at +{:.1} ms", ms(at));
    }
    Ok(RecoveryReport {
        backend: if b.vm.is_some() { "libvirt" } else { "process" },
        state_mib: b.state_mib,
        detect_ms: ms(detect_at),
        wake_ms: ms(wake_at),
        first_correct_reply_ms: ms(t.first_correct_us),
        full_state_ms: ms(full_at),
    })
}

// -------------------------------------------------------------- tenants

/// What `bench tenants` runs.
#[derive(Clone, Debug)]
pub struct TenantsBench {
    pub apps: u32,
    pub f: usize,
    /// `true`: all 2f+1 execution replicas active ("full"); else f+1 ("zz").
    pub full: bool,
    pub cpu_rounds: u32,
    pub clients_per_app: usize,
    pub duration: Duration,
    pub warmup: Duration,
    pub programs: Programs,
    pub keep_dir: Option<PathBuf>,
}

/// Runs `bench tenants`; returns its line.
pub fn run_tenants(b: &TenantsBench) -> Result<String> {
    if b.apps == 0 || b.clients_per_app == 0 {
        bail!("--apps and --clients-per-app must be positive");
    }
    let (dir, _tmp) = bench_dir(&b.keep_dir)?;
    eprintln!("zzctl bench: deployment in {}", dir.display());
    let spec = SystemSpec {
        f: b.f,
        apps: b.apps,
        clients: b.apps as usize * b.clients_per_app,
        checkpoint_interval: 128,
        timeout_min_ms: 2000,
        tuning: AgreementTuning::default(),
        faults: vec![],
        hostd_env: vec![(
            zz_executor::setup::ENV_APP_SPEC.to_string(),
            format!("kv+cpu={}", b.cpu_rounds),
        )],
        all_active: b.full,
        vm: None,
    };
    let mut sys = System::start(&dir, &spec, &b.programs)?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let result = rt.block_on(tenant_clients(&sys, b));
    // Reconfigurations would distort the comparison: report them.
    let log = std::fs::read_to_string(&sys.hostd_log).unwrap_or_default();
    let cmds = log
        .lines()
        .filter(|l| l.contains("host command done"))
        .count();
    if cmds > 0 {
        eprintln!("zzctl bench: warning: {cmds} host commands were carried out during the run");
    }
    sys.stop();
    let (ops, mut lat) = result?;
    lat.sort_unstable();
    let q = |p: f64| {
        if lat.is_empty() {
            0.0
        } else {
            lat[((lat.len() - 1) as f64 * p).round() as usize] as f64 / 1000.0
        }
    };
    Ok(format!(
        "bench=tenants mode={} apps={} ops_per_s={:.0} p50_ms={:.3} p99_ms={:.3}",
        if b.full { "full" } else { "zz" },
        b.apps,
        ops as f64 / b.duration.as_secs_f64(),
        q(0.5),
        q(0.99)
    ))
}

async fn tenant_clients(sys: &System, b: &TenantsBench) -> Result<(u64, Vec<u32>)> {
    let opts = ClientOptions {
        op_timeout: Duration::from_secs(60),
        ..ClientOptions::default()
    };
    let cluster = Cluster::from_config(&sys.dep.config, opts)?;
    if !cluster
        .wait_connected(cluster.n(), Duration::from_secs(10))
        .await
    {
        bail!("could not connect to every agreement replica within 10 s");
    }
    let start = Instant::now() + Duration::from_millis(50);
    let measure_from = start + b.warmup;
    let end = measure_from + b.duration;
    let mut tasks = Vec::new();
    for (n, id) in sys.dep.client_ids().into_iter().enumerate() {
        let app = 1 + (n as u32 % b.apps);
        let mut c = sys.client(&cluster, id)?;
        tasks.push(tokio::spawn(async move {
            tokio::time::sleep_until(start.into()).await;
            let mut lat = Vec::new();
            let mut ops = 0u64;
            let mut i = 0u64;
            let mut model: BTreeMap<u64, u64> = BTreeMap::new();
            while Instant::now() < end {
                i += 1;
                let key = i % 64;
                let op = KvOp::Put {
                    key: format!("c{id}-{key}").into_bytes(),
                    value: i.to_le_bytes().to_vec(),
                }
                .encode();
                let t0 = Instant::now();
                let r = c.invoke(app, op).await.context("tenant put")?;
                let t1 = Instant::now();
                let replaced = model.insert(key, i).is_some();
                if KvResult::decode(&r).ok() != Some(KvResult::Stored { replaced }) {
                    bail!("app {app}: wrong result for put {i}");
                }
                if t1 >= measure_from && t1 <= end {
                    ops += 1;
                    lat.push((t1 - t0).as_micros().min(u32::MAX as u128) as u32);
                }
            }
            Ok::<_, anyhow::Error>((ops, lat))
        }));
    }
    let (mut ops, mut lat) = (0, Vec::new());
    for t in tasks {
        let (o, l) = t.await.context("client task panicked")??;
        ops += o;
        lat.extend(l);
    }
    Ok((ops, lat))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_timestamps_parse() {
        let l = "2024-03-01T00:00:01.250000Z  INFO zz: hello";
        // 2024-03-01 is day 19783 since the epoch.
        assert_eq!(
            line_time_us(l),
            Some((19_783 * 86_400 + 1) * 1_000_000 + 250_000)
        );
        assert_eq!(line_time_us("1970-01-01T00:00:00Z x"), Some(0));
        assert_eq!(line_time_us("garbage"), None);
    }

    #[test]
    fn first_line_is_the_earliest_by_timestamp() {
        let dir = std::env::temp_dir().join(format!("zz-bench-lines-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let log = dir.join("a.log");
        std::fs::write(
            &log,
            "1970-01-01T00:00:03Z  WARN suspecting execution replicas app_seq=9\n\
             1970-01-01T00:00:01Z  WARN suspecting execution replicas app_seq=1\n\
             1970-01-01T00:00:00Z  INFO other\n",
        )
        .unwrap();
        let needle = ["suspecting execution replicas"];
        let (at, line) = first_line_time(&log, &needle).unwrap();
        assert_eq!(at, 1_000_000);
        assert!(line.contains("app_seq=1"));
        assert!(first_line_time(&log, &["absent"]).is_none());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn preload_values_differ_and_have_their_length() {
        assert_eq!(preload_value(3, 65_536).len(), 65_536);
        assert_ne!(preload_value(3, 64), preload_value(4, 64));
        assert_eq!(preload_value(3, 64), preload_value(3, 64));
    }
}
