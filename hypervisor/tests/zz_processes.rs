//! The whole system as real processes on 127.0.0.1: 4 `zz-agreement`
//! daemons (f = 1), one `zz-hostd` that runs the 2f+1 = 3 `zz-executor`s of
//! a `kv` app (0 and 1 active, 2 dormant), and a client that needs f+1
//! matching replies from distinct execution replicas.
//!
//! - `kv_through_execution_replicas`: puts and gets return the right values.
//! - `wrong_replies_wake_the_dormant_replica_and_reimage_the_faulty_one`:
//!   replica 0 answers wrongly from app_seq 7 on (after a stable execution
//!   checkpoint); the dormant replica is woken (it recovers by fetching the
//!   checkpoint's pages from its peers through the host agent), replica 0 is
//!   reimaged, and every read still returns the right value.
//!
//! The `zz-agreement` and `zz-executor` binaries of the same build profile
//! are built first with `cargo build` (a no-op when up to date).

use std::collections::BTreeMap;
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

const KV: u32 = 1;

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
    for b in ["zz-agreement", "zz-executor"] {
        assert!(dir.join(b).is_file(), "{} missing", dir.join(b).display());
    }
    dir
}

/// A temporary folder, kept (and printed) if `ZZ_KEEP_TEST_DIR` is set.
fn test_dir() -> tempfile::TempDir {
    let mut d = tempfile::Builder::new().prefix("zzp").tempdir().unwrap();
    if std::env::var_os("ZZ_KEEP_TEST_DIR").is_some() {
        eprintln!("test folder: {}", d.path().display());
        d.disable_cleanup(true);
    }
    d
}

/// Writes a deployment: 4 agreement replicas, one client, one host `h0`,
/// a `kv` app with 3 execution replicas on it.
fn deployment(dir: &Path, checkpoint_interval: u64) -> Deployment {
    let opts = DeployOptions {
        metrics: false,
        apps: vec![],
        log_level: Some("info".into()),
        ..DeployOptions::default()
    };
    let d = write_local(dir, &opts).expect("writing the deployment");
    let mut cfg: ClusterConfig = d.config.clone();
    let host_addr =
        free_addrs_avoiding("127.0.0.1".parse().unwrap(), 1, &cfg.listen_addrs()).unwrap()[0];
    cfg.apps.push(AppEntry {
        id: KV,
        name: "kv".into(),
        kind: "kv".into(),
    });
    cfg.hosts.push(HostEntry {
        name: "h0".into(),
        addr: host_addr,
        backend: "process".into(),
        libvirt_uri: None,
        metrics_addr: None,
    });
    for index in 0..3u32 {
        let key = KeyPair::generate();
        let key_file = PathBuf::from(format!("keys/exec-{KV}-{index}.key"));
        write_key_file(&dir.join(&key_file), &key).unwrap();
        cfg.executors.push(ExecutorEntry {
            app: KV,
            index,
            host: "h0".into(),
            public_key: hex::encode(key.public().as_bytes()),
            key_file,
        });
    }
    cfg.execution.checkpoint_interval = checkpoint_interval;
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
    hostd: Option<Child>,
    hostd_log: PathBuf,
}

impl System {
    fn start(dir: &Path, checkpoint_interval: u64, faults: &[&str]) -> System {
        let bins = binaries();
        let dep = deployment(dir, checkpoint_interval);
        let log_dir = dir.join("logs");
        std::fs::create_dir_all(&log_dir).unwrap();
        let hostd_log = log_dir.join("hostd.log");
        let log = std::fs::File::create(&hostd_log).unwrap();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_zz-hostd"));
        cmd.arg("--config")
            .arg(&dep.config_path)
            .args(["--host", "h0", "--executor"])
            .arg(bins.join("zz-executor"));
        for f in faults {
            cmd.args(["--fault", f]);
        }
        let hostd = cmd
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("starting zz-hostd");
        let addr = dep.config.hosts[0].addr;
        let start = Instant::now();
        while TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_err() {
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "zz-hostd did not listen; see {}",
                hostd_log.display()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        let mut cluster = LocalCluster::new(&bins.join("zz-agreement"), dep.clone(), vec![]);
        cluster
            .start_all(Duration::from_secs(30))
            .expect("starting the agreement replicas");
        System {
            dep,
            cluster,
            hostd: Some(hostd),
            hostd_log,
        }
    }

    fn hostd_log(&self) -> String {
        std::fs::read_to_string(&self.hostd_log).unwrap_or_default()
    }

    fn executor_log(&self, index: u32) -> String {
        let p = self
            .dep
            .dir
            .join(format!("data/host-h0/logs/exec-a{KV}-e{index}.log"));
        std::fs::read_to_string(p).unwrap_or_default()
    }

    /// Stops hostd with SIGTERM; returns its exit status.
    fn stop_hostd(&mut self) -> Option<std::process::ExitStatus> {
        let mut child = self.hostd.take()?;
        let _ = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status();
        let start = Instant::now();
        loop {
            if let Ok(Some(s)) = child.try_wait() {
                return Some(s);
            }
            if start.elapsed() > Duration::from_secs(15) {
                let _ = child.kill();
                return child.wait().ok();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for System {
    fn drop(&mut self) {
        self.stop_hostd();
        self.cluster.stop_all(Duration::from_secs(5));
    }
}

/// Junk for the host agent's agreement port: each connection must be
/// closed by it without harm to anything else.
fn hostile_input(dep: &Deployment) {
    use std::io::{Read, Write};
    let addr = dep.config.hosts[0].addr;
    let key0 = zz_wire::config::read_key_file(&dep.dir.join("keys/replica-0.key")).unwrap();
    let wrong_host = zz_agreement::hostlink::Hello::frame(0, "elsewhere", &key0);
    let mut oversized = (u32::MAX).to_be_bytes().to_vec();
    oversized.extend_from_slice(&[0; 16]);
    let garbage = zz_wire::frame::frame(b"not a hello at all");
    for junk in [garbage, wrong_host, oversized] {
        let mut s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s.write_all(&junk).unwrap();
        let mut buf = [0u8; 16];
        // The host agent closes the connection.
        assert!(matches!(s.read(&mut buf), Ok(0) | Err(_)));
    }
}

fn put(key: &str, value: &str) -> Vec<u8> {
    KvOp::Put {
        key: key.as_bytes().to_vec(),
        value: value.as_bytes().to_vec(),
    }
    .encode()
}

fn get(key: &str) -> Vec<u8> {
    KvOp::Get {
        key: key.as_bytes().to_vec(),
    }
    .encode()
}

fn client(dep: &Deployment, rt: &tokio::runtime::Runtime) -> zz_client::Client {
    let _g = rt.enter();
    let opts = ClientOptions {
        retransmit_after: Duration::from_millis(500),
        op_timeout: Duration::from_secs(60),
        ..ClientOptions::default()
    };
    let cluster = Cluster::from_config(&dep.config, opts).unwrap();
    let id = dep.client_ids()[0];
    let mut c = cluster.client(dep.client_keys(id).unwrap()).unwrap();
    for (app, keys) in executor_mac_keys(&dep.config, id).unwrap() {
        c.set_executor_keys(app, keys);
    }
    c
}

/// Runs puts then gets of `keys` (in rounds) and checks every result.
async fn workload(
    c: &mut zz_client::Client,
    model: &mut BTreeMap<String, String>,
    round: u32,
    keys: u32,
) {
    for k in 0..keys {
        let key = format!("k{k}");
        let value = format!("v{round}-{k}");
        let r = c.invoke(KV, put(&key, &value)).await.expect("put");
        let replaced = model.insert(key.clone(), value).is_some();
        assert_eq!(
            KvResult::decode(&r).unwrap(),
            KvResult::Stored { replaced },
            "put {key} round {round}"
        );
    }
    for k in 0..keys {
        let key = format!("k{k}");
        let r = c.invoke_with(KV, get(&key), true).await.expect("get");
        assert_eq!(
            KvResult::decode(&r).unwrap(),
            KvResult::Value(model.get(&key).map(|v| v.as_bytes().to_vec())),
            "get {key} round {round}"
        );
    }
}

#[test]
fn kv_through_execution_replicas() {
    let dir = test_dir();
    let mut sys = System::start(dir.path(), 8, &[]);
    let rt = tokio::runtime::Runtime::new().unwrap();
    hostile_input(&sys.dep);
    let mut c = client(&sys.dep, &rt);
    let mut model = BTreeMap::new();
    rt.block_on(async {
        let missing = c.invoke_with(KV, get("nothing"), true).await.unwrap();
        assert_eq!(KvResult::decode(&missing).unwrap(), KvResult::Value(None));
        for round in 0..3 {
            workload(&mut c, &mut model, round, 5).await;
        }
    });
    let log = sys.hostd_log();
    assert!(
        !log.contains("host command done"),
        "no reconfiguration expected:\n{log}"
    );
    assert!(sys.executor_log(0).contains("connected to the host agent"));
    let status = sys.stop_hostd().unwrap();
    assert!(status.success(), "zz-hostd exit: {status}");
    let log = sys.hostd_log();
    assert!(log.contains("replicas destroyed"), "{log}");
    assert!(log.contains("hellos_rejected=2 oversized=1"), "{log}");
}

#[test]
fn wrong_replies_wake_the_dormant_replica_and_reimage_the_faulty_one() {
    let dir = test_dir();
    let sys = System::start(dir.path(), 4, &["1/0:wrong_replies_from=7"]);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let mut c = client(&sys.dep, &rt);
    let mut model = BTreeMap::new();
    rt.block_on(async {
        // 12 app_seqs: checkpoints 4 and 8, wrong replies from 7 on.
        for round in 0..3 {
            workload(&mut c, &mut model, round, 2).await;
        }
    });
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let log = sys.hostd_log();
        let woke = log.lines().any(|l| {
            l.contains("host command done") && l.contains("app1/exec2") && l.contains("Wake")
        });
        let reimaged = log.lines().any(|l| {
            l.contains("host command done") && l.contains("app1/exec0") && l.contains("Reimage")
        });
        if woke && reimaged {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "expected Wake of exec2 and Reimage of exec0; hostd log:\n{log}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    // Reads and writes still return the right values with the new active set.
    rt.block_on(async {
        for round in 3..5 {
            workload(&mut c, &mut model, round, 2).await;
        }
    });
    let log2 = sys.executor_log(2);
    assert!(
        log2.contains("recovering"),
        "the woken replica recovers from the stable checkpoint:\n{log2}"
    );
}
