//! Execution-replica faults on real processes, with f = 1 and f = 2:
//! `zz-agreement` daemons (3f+1), one `zz-hostd` running 2f+1 `zz-executor`s
//! per kv app (f+1 active, f dormant), and several clients doing puts, gets,
//! compare-and-swaps and deletes on shared keys while faults are injected.
//!
//! Each scenario checks, end to end:
//! - every faulty executor is reimaged by the host agent, and each app ends
//!   with f+1 active replicas, none of them a faulty one (from the agreement
//!   replicas' reconfiguration log);
//! - the clients' history, which ends with every key read back, is
//!   linearizable against a sequential kv: clients only accepted correct
//!   results, and no acknowledged write was lost or applied twice.
//!
//! Scenarios (f=1 and f=2): wrong replies, a crash, a corrupted page (caught at a
//! checkpoint), a slow executor, f faulty executors of one app at once, and
//! faults in two apps at once. The single-Byzantine-agreement-replica case
//! is `host_commands.rs`. Also: a Byzantine page server excluded by the
//! woken replica (`f2_byzantine_page_server_is_excluded`, ignored until it is
//! reliable; statefetch's tests cover lying sources), and a recovery
//! that outlasts newer stable checkpoints
//! (`f2_recovery_outlasts_newer_stable_checkpoints`).

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use zz_client::deploy::{
    free_addrs_avoiding, write_local, DeployOptions, Deployment, LocalCluster,
};
use zz_client::{executor_mac_keys, ClientOptions, Cluster};
use zz_executor::{KvOp, KvResult};
use zz_wire::config::{write_key_file, AppEntry, ClusterConfig, ExecutorEntry, HostEntry};
use zz_wire::crypto::KeyPair;

/// The folder of this build's binaries, with zz-agreement and zz-executor built.
fn binaries() -> PathBuf {
    let hostd = PathBuf::from(env!("CARGO_BIN_EXE_zz-hostd"));
    let dir = hostd.parent().expect("bin dir").to_path_buf();
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.args(["build", "-p", "zz-agreement", "-p", "zz-executor", "--bins"]);
    if dir.file_name().is_some_and(|n| n == "release") {
        cmd.arg("--release");
    }
    let status = cmd
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .status()
        .expect("running cargo build");
    assert!(status.success(), "building zz-agreement and zz-executor");
    dir
}

fn test_dir() -> tempfile::TempDir {
    let mut d = tempfile::Builder::new().prefix("zzf").tempdir().unwrap();
    if std::env::var_os("ZZ_KEEP_TEST_DIR").is_some() {
        eprintln!("test folder: {}", d.path().display());
        d.disable_cleanup(true);
    }
    d
}

/// What one scenario runs.
struct Scenario {
    f: usize,
    apps: Vec<u32>,
    /// `APP/INDEX:KEY=VALUE,...` fault plans for zz-hostd.
    faults: Vec<String>,
    /// The executors the faults make faulty: each must be reimaged.
    faulty: Vec<(u32, u32)>,
    clients: usize,
    ops_per_client: usize,
    /// 64 KiB values written to every app before the load (and the faults'
    /// app_seqs count from after them), so that recovery has state to fetch.
    preload_values: u64,
    /// Host agents `h0..`; execution replica `i` of each app runs on host
    /// `i % hosts`.
    hosts: usize,
}

fn host_of(s: &Scenario, index: u32) -> String {
    format!("h{}", index as usize % s.hosts)
}

fn deployment(dir: &Path, s: &Scenario) -> Deployment {
    let opts = DeployOptions {
        f: s.f,
        clients: s.clients,
        metrics: false,
        apps: vec![],
        log_level: Some("info".into()),
        ..DeployOptions::default()
    };
    let d = write_local(dir, &opts).expect("writing the deployment");
    let mut cfg: ClusterConfig = d.config.clone();
    let host_addrs =
        free_addrs_avoiding("127.0.0.1".parse().unwrap(), s.hosts, &cfg.listen_addrs()).unwrap();
    for (h, addr) in host_addrs.into_iter().enumerate() {
        cfg.hosts.push(HostEntry {
            name: format!("h{h}"),
            addr,
            backend: "process".into(),
            libvirt_uri: None,
            metrics_addr: None,
        });
    }
    for &app in &s.apps {
        cfg.apps.push(AppEntry {
            id: app,
            name: format!("kv{app}"),
            kind: "kv".into(),
        });
        for index in 0..(2 * s.f + 1) as u32 {
            let key = KeyPair::generate();
            let key_file = PathBuf::from(format!("keys/exec-{app}-{index}.key"));
            write_key_file(&dir.join(&key_file), &key).unwrap();
            cfg.executors.push(ExecutorEntry {
                app,
                index,
                host: host_of(s, index),
                public_key: hex::encode(key.public().as_bytes()),
                key_file,
            });
        }
    }
    cfg.execution.checkpoint_interval = 4;
    cfg.execution.timeout_min_ms = 300;
    cfg.execution.allow_fault_injection = true;
    cfg.validate().expect("valid config");
    cfg.save(&d.config_path).unwrap();
    Deployment::load(&d.config_path).unwrap()
}

/// A running deployment; everything is stopped when dropped.
struct System {
    dep: Deployment,
    cluster: LocalCluster,
    /// One host agent per host, in host order.
    hostds: Vec<Child>,
    hostd_logs: Vec<PathBuf>,
    /// Host of each execution replica index.
    hosts: usize,
}

impl System {
    fn start(dir: &Path, s: &Scenario) -> System {
        let bins = binaries();
        let dep = deployment(dir, s);
        let log_dir = dir.join("logs");
        std::fs::create_dir_all(&log_dir).unwrap();
        let mut hostds = Vec::new();
        let mut hostd_logs = Vec::new();
        for (h, entry) in dep.config.hosts.iter().enumerate() {
            let hostd_log = log_dir.join(format!("hostd-{}.log", entry.name));
            let log = std::fs::File::create(&hostd_log).unwrap();
            let mut cmd = Command::new(env!("CARGO_BIN_EXE_zz-hostd"));
            cmd.arg("--config")
                .arg(&dep.config_path)
                .args(["--host", &entry.name, "--executor"])
                .arg(bins.join("zz-executor"));
            // Each host agent gets the fault plans of its own replicas.
            for plan in &s.faults {
                // `APP/INDEX:...`
                let index: u32 = plan
                    .split(['/', ':'])
                    .nth(1)
                    .and_then(|i| i.parse().ok())
                    .expect("fault plan names APP/INDEX");
                if index as usize % s.hosts == h {
                    cmd.args(["--fault", plan]);
                }
            }
            let hostd = cmd
                .stdin(Stdio::null())
                .stdout(log.try_clone().unwrap())
                .stderr(log)
                .spawn()
                .expect("starting zz-hostd");
            hostds.push(hostd);
            hostd_logs.push(hostd_log);
        }
        for (entry, log) in dep.config.hosts.iter().zip(&hostd_logs) {
            let start = Instant::now();
            while TcpStream::connect_timeout(&entry.addr, Duration::from_millis(200)).is_err() {
                assert!(
                    start.elapsed() < Duration::from_secs(60),
                    "zz-hostd did not listen; see {}",
                    log.display()
                );
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        let mut cluster = LocalCluster::new(&bins.join("zz-agreement"), dep.clone(), vec![]);
        cluster
            .start_all(Duration::from_secs(60))
            .expect("starting the agreement replicas");
        System {
            dep,
            cluster,
            hostds,
            hostd_logs,
            hosts: s.hosts,
        }
    }

    /// The logs of every host agent, one after the other.
    fn hostd_log(&self) -> String {
        self.hostd_logs
            .iter()
            .map(|p| std::fs::read_to_string(p).unwrap_or_default())
            .collect::<Vec<_>>()
            .join("\n")
    }

    fn replica_log(&self, id: u32) -> String {
        std::fs::read_to_string(self.cluster.log_path(id)).unwrap_or_default()
    }

    fn executor_log(&self, app: u32, index: u32) -> String {
        let p = self.dep.dir.join(format!(
            "data/host-h{}/logs/exec-a{app}-e{index}.log",
            index as usize % self.hosts
        ));
        std::fs::read_to_string(p).unwrap_or_default()
    }

    /// The active set of `app` after the last reconfiguration replica `id`
    /// logged (`None` if it logged none).
    fn last_active_set(&self, id: u32, app: u32) -> Option<BTreeSet<u32>> {
        let log = self.replica_log(id);
        let needle = format!(" app={app} ");
        let line = log
            .lines()
            .rfind(|l| l.contains("execution replicas reconfigured") && l.contains(&needle))?;
        let set = line.split("active={").nth(1)?.split('}').next()?;
        Some(
            set.split(',')
                .filter_map(|x| x.trim().parse().ok())
                .collect(),
        )
    }
}

impl Drop for System {
    fn drop(&mut self) {
        for mut child in self.hostds.drain(..) {
            let _ = Command::new("kill")
                .args(["-TERM", &child.id().to_string()])
                .status();
            let start = Instant::now();
            while !matches!(child.try_wait(), Ok(Some(_))) {
                if start.elapsed() > Duration::from_secs(15) {
                    let _ = child.kill();
                    let _ = child.wait();
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        self.cluster.stop_all(Duration::from_secs(5));
    }
}

/// A small deterministic generator (xorshift64*), so a scenario's workload
/// is the same on every run.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// One completed operation of the history.
#[derive(Clone, Debug)]
struct Event {
    client: usize,
    app: u32,
    key: Vec<u8>,
    op: KvOp,
    result: KvResult,
    invoked: Instant,
    returned: Instant,
}

const KEYS: u64 = 4;

fn key_of(k: u64) -> Vec<u8> {
    format!("key{k}").into_bytes()
}

fn client(dep: &Deployment, index: usize) -> zz_client::Client {
    let opts = ClientOptions {
        retransmit_after: Duration::from_millis(500),
        op_timeout: Duration::from_secs(120),
        ..ClientOptions::default()
    };
    let cluster = Cluster::from_config(&dep.config, opts).unwrap();
    let id = dep.client_ids()[index];
    let mut c = cluster.client(dep.client_keys(id).unwrap()).unwrap();
    for (app, keys) in executor_mac_keys(&dep.config, id).unwrap() {
        c.set_executor_keys(app, keys);
    }
    c
}

/// One client's closed loop of random operations over the apps' shared keys.
async fn client_loop(
    mut c: zz_client::Client,
    index: usize,
    apps: Vec<u32>,
    ops: usize,
) -> Vec<Event> {
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15 ^ (index as u64 + 1));
    let mut seen: BTreeMap<(u32, u64), Option<Vec<u8>>> = BTreeMap::new();
    let mut history = Vec::with_capacity(ops);
    for i in 0..ops {
        let app = apps[i % apps.len()];
        let k = rng.below(KEYS);
        let key = key_of(k);
        let fresh = format!("c{index}-{i}").into_bytes();
        let op = match rng.below(10) {
            0..=3 => KvOp::Put {
                key: key.clone(),
                value: fresh,
            },
            4..=6 => KvOp::Get { key: key.clone() },
            7..=8 => KvOp::Cas {
                key: key.clone(),
                expected: seen.get(&(app, k)).cloned().flatten(),
                new: Some(fresh),
            },
            _ => KvOp::Delete { key: key.clone() },
        };
        let invoked = Instant::now();
        let bytes = c
            .invoke(app, op.encode())
            .await
            .unwrap_or_else(|e| panic!("client {index} op {i} on app {app}: {e}"));
        let returned = Instant::now();
        let result = KvResult::decode(&bytes).expect("a kv result");
        match &result {
            KvResult::Value(v) => {
                seen.insert((app, k), v.clone());
            }
            KvResult::Cas { current, .. } => {
                seen.insert((app, k), current.clone());
            }
            _ => {}
        }
        history.push(Event {
            client: index,
            app,
            key,
            op,
            result,
            invoked,
            returned,
        });
    }
    history
}

/// The sequential kv's answer to `op` on a key holding `state`, and the new state.
fn apply(state: &Option<Vec<u8>>, op: &KvOp) -> (KvResult, Option<Vec<u8>>) {
    match op {
        KvOp::Get { .. } => (KvResult::Value(state.clone()), state.clone()),
        KvOp::Put { value, .. } => (
            KvResult::Stored {
                replaced: state.is_some(),
            },
            Some(value.clone()),
        ),
        KvOp::Delete { .. } => (
            KvResult::Deleted {
                existed: state.is_some(),
            },
            None,
        ),
        KvOp::Cas { expected, new, .. } => {
            if state == expected {
                (
                    KvResult::Cas {
                        swapped: true,
                        current: state.clone(),
                    },
                    new.clone(),
                )
            } else {
                (
                    KvResult::Cas {
                        swapped: false,
                        current: state.clone(),
                    },
                    state.clone(),
                )
            }
        }
    }
}

/// Whether the operations on one key (at most 128) have a linearization:
/// an order consistent with real time in which each result is what the
/// sequential kv returns. Depth-first search over which pending operation
/// takes effect next, memoised on (operations done, state).
fn linearizable(ops: &[Event]) -> bool {
    assert!(ops.len() <= 128, "history too long for the checker");
    fn search(
        ops: &[Event],
        done: u128,
        state: &Option<Vec<u8>>,
        seen: &mut HashSet<(u128, Option<Vec<u8>>)>,
    ) -> bool {
        let all = if ops.len() == 128 {
            u128::MAX
        } else {
            (1u128 << ops.len()) - 1
        };
        if done == all {
            return true;
        }
        if !seen.insert((done, state.clone())) {
            return false;
        }
        // An operation can go next only if no other pending operation
        // returned before it was invoked.
        let first_return = (0..ops.len())
            .filter(|i| done & (1 << i) == 0)
            .map(|i| ops[i].returned)
            .min()
            .expect("pending operations");
        for i in 0..ops.len() {
            if done & (1 << i) != 0 || ops[i].invoked > first_return {
                continue;
            }
            let (result, next) = apply(state, &ops[i].op);
            if result == ops[i].result && search(ops, done | (1 << i), &next, seen) {
                return true;
            }
        }
        false
    }
    search(ops, 0, &None, &mut HashSet::new())
}

fn check_history(history: &[Event]) {
    let mut by_key: BTreeMap<(u32, Vec<u8>), Vec<Event>> = BTreeMap::new();
    for e in history {
        by_key
            .entry((e.app, e.key.clone()))
            .or_default()
            .push(e.clone());
    }
    for ((app, key), ops) in by_key {
        assert!(
            linearizable(&ops),
            "history of app {app} key {} is not linearizable:\n{}",
            String::from_utf8_lossy(&key),
            ops.iter()
                .map(|e| format!("  client {} {:?} -> {:?}", e.client, e.op, e.result))
                .collect::<Vec<_>>()
                .join("\n")
        );
    }
}

/// Runs a scenario: load with faults, then waits for the repair, then reads
/// every key back and checks the whole history.
fn run(s: Scenario) {
    run_then(s, |_| {});
}

/// [`run`], then `check` on the still running system.
fn run_then(s: Scenario, check: impl FnOnce(&System)) {
    let dir = test_dir();
    let sys = System::start(dir.path(), &s);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let mut history: Vec<Event> = rt.block_on(async {
        if s.preload_values > 0 {
            let mut c = {
                let _g = rt.enter();
                client(&sys.dep, 0)
            };
            for &app in &s.apps {
                for i in 0..s.preload_values {
                    let op = KvOp::Put {
                        key: format!("big{i}").into_bytes(),
                        value: vec![(i % 251) as u8; 64 * 1024],
                    };
                    c.invoke(app, op.encode()).await.expect("preload");
                }
            }
        }
        let mut tasks = Vec::new();
        for i in 0..s.clients {
            let c = {
                let _g = rt.enter();
                client(&sys.dep, i)
            };
            tasks.push(tokio::spawn(client_loop(
                c,
                i,
                s.apps.clone(),
                s.ops_per_client,
            )));
        }
        let mut all = Vec::new();
        for t in tasks {
            all.extend(t.await.expect("client task"));
        }
        all
    });

    // Every faulty executor is reimaged and each app is back to f+1 active
    // replicas, none of them faulty, at every agreement replica.
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let log = sys.hostd_log();
        let reimaged = s.faulty.iter().all(|(app, index)| {
            let who = format!("app{app}/exec{index}");
            log.lines().any(|l| {
                l.contains("host command done") && l.contains(&who) && l.contains("Reimage")
            })
        });
        let settled = s.apps.iter().all(|&app| {
            (0..(3 * s.f + 1) as u32).all(|r| {
                // A reimaged replica is rebuilt clean (its fault plan lives
                // in the wiped state folder) and may be woken again.
                sys.last_active_set(r, app)
                    .is_some_and(|set| set.len() == s.f + 1)
            })
        });
        if reimaged && settled {
            break;
        }
        if Instant::now() > deadline {
            let actives: Vec<_> = s
                .apps
                .iter()
                .map(|&a| (a, sys.last_active_set(0, a)))
                .collect();
            panic!(
                "repair incomplete: reimaged={reimaged} active sets at replica 0 {actives:?}\nhostd log:\n{log}"
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }

    // Read every key of every app back, as part of the checked history.
    let tail: Vec<Event> = rt.block_on(async {
        let mut c = {
            let _g = rt.enter();
            client(&sys.dep, 0)
        };
        let mut out = Vec::new();
        for &app in &s.apps {
            for k in 0..KEYS {
                let op = KvOp::Get { key: key_of(k) };
                let invoked = Instant::now();
                let bytes = c.invoke(app, op.encode()).await.expect("read back");
                out.push(Event {
                    client: 0,
                    app,
                    key: key_of(k),
                    op,
                    result: KvResult::decode(&bytes).unwrap(),
                    invoked,
                    returned: Instant::now(),
                });
            }
        }
        out
    });
    history.extend(tail);
    check_history(&history);
    for (app, index) in &s.faulty {
        let healthy = (0..(2 * s.f + 1) as u32).find(|i| !s.faulty.contains(&(*app, *i)));
        if let Some(h) = healthy {
            assert!(
                sys.executor_log(*app, h)
                    .contains("connected to the host agent"),
                "executor {app}/{h} never ran (faulty {app}/{index})"
            );
        }
    }
    check(&sys);
}

fn scenario(f: usize, faults: &[(u32, u32, &str)]) -> Scenario {
    let mut apps: Vec<u32> = faults.iter().map(|(a, _, _)| *a).collect();
    apps.sort();
    apps.dedup();
    Scenario {
        f,
        apps,
        faults: faults
            .iter()
            .map(|(a, i, plan)| format!("{a}/{i}:{plan}"))
            .collect(),
        faulty: faults.iter().map(|(a, i, _)| (*a, *i)).collect(),
        clients: 3,
        ops_per_client: 40,
        preload_values: 0,
        hosts: 1,
    }
}

#[test]
fn f1_wrong_replies() {
    run(scenario(1, &[(1, 0, "wrong_replies_from=10")]));
}

#[test]
fn f1_crashed_executor() {
    run(scenario(1, &[(1, 1, "crash_after=10")]));
}

#[test]
fn f1_corrupted_state_caught_at_a_checkpoint() {
    run(scenario(
        1,
        &[(1, 0, "corrupt_page={after=12,persistent=true}")],
    ));
}

#[test]
fn f1_slow_executor() {
    run(scenario(1, &[(1, 1, "slow_ms=1500")]));
}

#[test]
fn f1_faults_in_two_apps_at_once() {
    run(scenario(
        1,
        &[(1, 0, "wrong_replies_from=10"), (2, 1, "crash_after=10")],
    ));
}

#[test]
fn f2_wrong_replies() {
    run(scenario(2, &[(1, 0, "wrong_replies_from=10")]));
}

#[test]
fn f2_two_faulty_executors_of_one_app() {
    run(scenario(
        2,
        &[(1, 0, "wrong_replies_from=10"), (1, 2, "crash_after=10")],
    ));
}

#[test]
fn f2_crashed_and_corrupted_in_two_apps() {
    run(scenario(
        2,
        &[
            (1, 1, "crash_after=10"),
            (2, 0, "corrupt_page={after=12,persistent=true}"),
        ],
    ));
}

#[test]
fn linearizability_checker_rejects_a_lost_write() {
    // The checker itself: a write acknowledged, then a later read that does
    // not see it, must be rejected; the same read seeing it is accepted.
    let t = Instant::now();
    let at = |ms: u64| t + Duration::from_millis(ms);
    let put = Event {
        client: 0,
        app: 1,
        key: b"k".to_vec(),
        op: KvOp::Put {
            key: b"k".to_vec(),
            value: b"v".to_vec(),
        },
        result: KvResult::Stored { replaced: false },
        invoked: at(0),
        returned: at(1),
    };
    let read = |v: Option<&[u8]>| Event {
        client: 1,
        app: 1,
        key: b"k".to_vec(),
        op: KvOp::Get { key: b"k".to_vec() },
        result: KvResult::Value(v.map(|v| v.to_vec())),
        invoked: at(2),
        returned: at(3),
    };
    assert!(!linearizable(&[put.clone(), read(None)]));
    assert!(linearizable(&[put.clone(), read(Some(b"v"))]));
    // Overlapping in time, either order is allowed.
    let mut early = read(None);
    early.invoked = at(0);
    assert!(linearizable(&[put.clone(), early]));
    // A put applied twice shows up as `replaced: true` on a fresh key.
    let mut twice = put.clone();
    twice.result = KvResult::Stored { replaced: true };
    assert!(!linearizable(&[twice]));
}

#[test]
fn f2_byzantine_page_server_is_excluded() {
    // Two Byzantine executors (f = 2): replica 0 answers wrongly, replica 1
    // serves corrupted pages. Woken replica 3 must exclude 1 and fetch from
    // the others.
    let mut s = scenario(
        2,
        &[(1, 0, "wrong_replies_from=42"), (1, 1, "lie_pages=true")],
    );
    // Replica 1 executes correctly; only its page serving lies, which the
    // agreement cannot see: the recovering replica must see through it.
    s.faulty = vec![(1, 0)];
    // Enough state (2 MiB) that the fetch takes many page requests, which
    // rotate over both peers: the liar is surely asked.
    s.preload_values = 32;
    run_then(s, |sys| {
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut log = sys.executor_log(1, 3);
        while !log.contains("recovery complete") && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(100));
            log = sys.executor_log(1, 3);
        }
        assert!(
            log.lines().any(|l| l.contains("source failed")
                && l.contains("app1/exec1")
                && l.contains("excluded=true")),
            "the woken replica must exclude the lying page server:\n{log}"
        );
        assert!(
            log.contains("recovery complete"),
            "the woken replica completes recovery from the honest peer:\n{log}"
        );
    });
}

#[test]
fn f1_recovery_fetches_from_peers_on_other_hosts() {
    // Three host agents, one execution replica each: the woken replica 2
    // (host h2) has no peer on its own host, so every page it fetches comes
    // through the link between host agents.
    let mut s = scenario(1, &[(1, 0, "wrong_replies_from=20")]);
    s.hosts = 3;
    s.preload_values = 16;
    run_then(s, |sys| {
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut log = sys.executor_log(1, 2);
        while !log.contains("recovery complete") && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(100));
            log = sys.executor_log(1, 2);
        }
        let line = log
            .lines()
            .find(|l| l.contains("recovery complete"))
            .unwrap_or_else(|| panic!("the woken replica completes its recovery:\n{log}"));
        let fetched: u64 = line
            .split("fetched=")
            .nth(1)
            .and_then(|v| v.split(' ').next())
            .and_then(|v| v.parse().ok())
            .expect("the recovery line counts fetched pages");
        assert!(
            fetched > 0,
            "the woken replica fetched pages from another host: {line}"
        );
        let hostd = sys.hostd_log();
        assert!(
            hostd.contains("linked to host agent") && hostd.contains("host agent linked"),
            "host agents link to each other:\n{hostd}"
        );
    });
}

#[test]
fn f2_recovery_outlasts_newer_stable_checkpoints() {
    // 24 MiB to fetch while the load goes on with a checkpoint every 4
    // app_seqs; the peers serve pages 20 ms late, so the fetch takes
    // seconds. Replica 0 answers wrongly from app_seq 399 (after the 384
    // preloaded values) but its state, and so its checkpoints, stay correct.
    // Replica 4, one of the two woken, is slow (200 ms per batch): the
    // verdict waits for it (a woken replica gets 10 timeouts), so the
    // recovering epoch lasts seconds, during which the clients go on with
    // replicas 1, 2 and 3 and replicas 0-2 keep making checkpoints stable,
    // newer than the one replica 3 fetches. Its peers must keep serving
    // that one. Whether a newer one becomes stable before the fetch ends
    // still depends on timing: up to 3 attempts, and it must happen once.
    let exercised = std::cell::Cell::new(false);
    for attempt in 1..=3 {
        let mut s = scenario(
            2,
            &[
                (1, 0, "wrong_replies_from=399,serve_delay_ms=20"),
                (1, 1, "serve_delay_ms=20"),
                (1, 2, "serve_delay_ms=20"),
                (1, 4, "slow_ms=200"),
            ],
        );
        s.faulty = vec![(1, 0), (1, 4)];
        s.preload_values = 384;
        s.ops_per_client = 150;
        run_then(s, |sys| {
            let deadline = Instant::now() + Duration::from_secs(120);
            let mut log = sys.executor_log(1, 3);
            while !log.contains("recovery complete") {
                assert!(
                    Instant::now() < deadline,
                    "the woken replica completes its recovery:\n{log}"
                );
                std::thread::sleep(Duration::from_millis(200));
                log = sys.executor_log(1, 3);
            }
            let hostd = sys.hostd_log();
            assert!(
                !hostd.lines().any(|l| l.contains("host command done")
                    && l.contains("app1/exec3")
                    && l.contains("Reimage")),
                "the recovering replica is not condemned:\n{hostd}"
            );
            // The last recovery, and whether a checkpoint newer than the one
            // it fetched became stable (replica 0 logs them) before it ended.
            let start_line = log
                .lines()
                .rfind(|l| l.contains("recovering: executing from the stable checkpoint"))
                .expect("recovery start logged");
            let field = |l: &str| {
                l.split("app_seq=")
                    .nth(1)
                    .and_then(|v| v.split_whitespace().next())
                    .and_then(|v| v.parse::<u64>().ok())
            };
            let started = field(start_line).expect("app_seq of the recovery");
            let done_at = log
                .lines()
                .rfind(|l| l.contains("recovery complete"))
                .and_then(|l| l.split_whitespace().next())
                .expect("timestamped line")
                .to_string();
            let newer = sys.replica_log(0).lines().any(|l| {
                l.contains("execution checkpoint stable")
                    && l.split_whitespace()
                        .next()
                        .is_some_and(|t| t < done_at.as_str())
                    && field(l).is_some_and(|s| s > started)
            });
            exercised.set(newer);
        });
        if exercised.get() {
            break;
        }
        eprintln!("attempt {attempt}: no newer checkpoint became stable during the recovery");
    }
    assert!(
        exercised.get(),
        "in 3 attempts no newer checkpoint became stable during the recovery"
    );
}

#[test]
fn f2_slow_executor() {
    run(scenario(2, &[(1, 2, "slow_ms=1500")]));
}
