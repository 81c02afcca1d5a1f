//! The whole system with execution replicas in real VMs (libvirt, QEMU):
//! 4 `zz-agreement` daemons (f = 1), one `zz-hostd` on the libvirt backend
//! running the 3 execution replicas of a `kv` app as VMs booting the guest
//! image (0 and 1 running, 2 dormant), and a client needing f+1 matching
//! replies from distinct execution replicas. The approach is that of
//! `zz_processes.rs` (same fault drill), with VMs instead of processes.
//!
//! For each dormant mode (`paused`, `saved`): replica 0 answers wrongly from
//! app_seq 7 on; the dormant VM is woken (resumed, or restored from its
//! managed save) and recovers by fetching the checkpoint's pages on demand
//! through the host agent; VM 0 is destroyed and rebuilt (and put to sleep
//! once booted); every read returns the last acknowledged write;
//! `virsh list --all` shows exactly the deployment's three domains in the
//! expected states; stopping the host agent leaves no domain behind.
//!
//! Needs libvirt running (`bash scripts/setup-libvirt`) and the guest image
//! (`cargo run -p zzctl -- image build`); `scripts/test` does both first.
//! Without them the tests fail with one line saying so: they never skip.

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
const URI: &str = "qemu:///system";
/// Generous: boots under TCG on a loaded 2-core machine have long tails.
const BOOT: Duration = Duration::from_secs(600);

/// Fails at once, in one line, if this machine cannot run the VMs.
fn require_vms() -> PathBuf {
    let image =
        zz_hypervisor::hostd_vm::default_image_dir_for(Path::new(env!("CARGO_BIN_EXE_zz-hostd")));
    let sock = Path::new("/run/libvirt/libvirt-sock");
    assert!(
        sock.exists(),
        "cannot run VMs: libvirtd is not running ({} missing); run `bash scripts/setup-libvirt`",
        sock.display()
    );
    assert!(
        image.join("vmlinuz").is_file() && image.join("initrd.cpio").is_file(),
        "cannot run VMs: no guest image in {}; run `cargo run -p zzctl -- image build`",
        image.display()
    );
    image
}

/// The zz-agreement binary of this build profile (built if needed).
fn agreement_bin() -> PathBuf {
    let hostd = PathBuf::from(env!("CARGO_BIN_EXE_zz-hostd"));
    let dir = hostd.parent().expect("bin dir").to_path_buf();
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.args(["build", "-p", "zz-agreement", "--bins"]);
    if dir.file_name().is_some_and(|n| n == "release") {
        cmd.arg("--release");
    }
    let status = cmd
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .status()
        .expect("running cargo build");
    assert!(status.success(), "building zz-agreement");
    dir.join("zz-agreement")
}

/// A temporary folder QEMU (user libvirt-qemu) can reach; kept and printed
/// if `ZZ_KEEP_TEST_DIR` is set.
fn test_dir() -> tempfile::TempDir {
    use std::os::unix::fs::PermissionsExt;
    let mut d = tempfile::Builder::new().prefix("zzv").tempdir().unwrap();
    std::fs::set_permissions(d.path(), std::fs::Permissions::from_mode(0o711)).unwrap();
    if std::env::var_os("ZZ_KEEP_TEST_DIR").is_some() {
        eprintln!("test folder: {}", d.path().display());
        d.disable_cleanup(true);
    }
    d
}

fn deployment(dir: &Path, dormant: &str) -> Deployment {
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
        backend: "libvirt".into(),
        libvirt_uri: Some(URI.into()),
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
    cfg.execution.checkpoint_interval = 4;
    // A VM under TCG answers more slowly than a process, more so on a
    // loaded machine: a short floor makes timeouts wake replica 2 before
    // the wrong replies this drill is about.
    cfg.execution.timeout_min_ms = 5000;
    cfg.execution.allow_fault_injection = true;
    // Per app (the deployment default stays `paused`).
    cfg.execution
        .dormant_apps
        .insert("kv".into(), dormant.into());
    cfg.validate().expect("valid config");
    cfg.save(&d.config_path).unwrap();
    Deployment::load(&d.config_path).unwrap()
}

struct System {
    dep: Deployment,
    cluster: LocalCluster,
    hostd: Option<Child>,
    hostd_log: PathBuf,
    /// Domain names of replicas 0, 1, 2.
    domains: Vec<String>,
}

impl System {
    fn start(dir: &Path, dormant: &str, faults: &[&str]) -> System {
        let image = require_vms();
        let agreement = agreement_bin();
        let dep = deployment(dir, dormant);
        let log_dir = dir.join("logs");
        std::fs::create_dir_all(&log_dir).unwrap();
        let hostd_log = log_dir.join("hostd.log");
        let log = std::fs::File::create(&hostd_log).unwrap();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_zz-hostd"));
        cmd.arg("--config")
            .arg(&dep.config_path)
            .args(["--host", "h0", "--image"])
            .arg(&image);
        for f in faults {
            cmd.args(["--fault", f]);
        }
        let hostd = cmd
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("starting zz-hostd");
        let ns = zz_hypervisor::hostd_vm::namespace(&dep.config, "h0");
        let domains = (0..3).map(|i| format!("zz-{ns}-a{KV}e{i}")).collect();
        let mut sys = System {
            dep: dep.clone(),
            cluster: LocalCluster::new(&agreement, dep.clone(), vec![]),
            hostd: Some(hostd),
            hostd_log,
            domains,
        };
        // hostd listens once every VM booted and the dormant one sleeps.
        let addr = sys.dep.config.hosts[0].addr;
        let start = Instant::now();
        while TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_err() {
            if let Some(Ok(Some(s))) = sys.hostd.as_mut().map(|c| c.try_wait()) {
                panic!("zz-hostd exited ({s}):\n{}", sys.diagnostics());
            }
            assert!(
                start.elapsed() < BOOT,
                "zz-hostd did not listen:\n{}",
                sys.diagnostics()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        sys.cluster
            .start_all(Duration::from_secs(30))
            .expect("starting the agreement replicas");
        sys
    }

    fn hostd_log(&self) -> String {
        std::fs::read_to_string(&self.hostd_log).unwrap_or_default()
    }

    /// The host agent's log and the end of each guest's console log (where
    /// a guest's executor writes why it stopped), for failure messages.
    fn diagnostics(&self) -> String {
        let mut out = format!("hostd log:\n{}", self.hostd_log());
        for index in 0..3 {
            let log = self.executor_log(index);
            let lines: Vec<&str> = log.lines().collect();
            let tail = lines[lines.len().saturating_sub(40)..].join("\n");
            out.push_str(&format!(
                "\nconsole of exec {index} (last 40 lines):\n{tail}"
            ));
        }
        out
    }

    fn executor_log(&self, index: u32) -> String {
        let p = self
            .dep
            .dir
            .join(format!("data/host-h0/logs/exec-a{KV}-e{index}.log"));
        std::fs::read_to_string(p).unwrap_or_default()
    }

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
            if start.elapsed() > Duration::from_secs(120) {
                let _ = child.kill();
                return child.wait().ok();
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for System {
    fn drop(&mut self) {
        self.stop_hostd();
        self.cluster.stop_all(Duration::from_secs(5));
        // Whatever happened, leave no domain of this test behind.
        for d in &self.domains {
            let _ = virsh(&["destroy", d]);
            let _ = virsh(&["undefine", "--managed-save", d]);
        }
    }
}

fn virsh(args: &[&str]) -> String {
    let out = Command::new("virsh")
        .args(["-c", URI])
        .args(args)
        .output()
        .expect("running virsh");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `virsh list --all` (with managed saves shown as `saved`): the states of
/// every domain whose name starts with `prefix`.
fn domains_with_prefix(prefix: &str) -> BTreeMap<String, String> {
    let out = virsh(&["list", "--all", "--managed-save"]);
    out.lines()
        .skip(2)
        .filter_map(|l| {
            let mut w = l.split_whitespace();
            let _id = w.next()?;
            let name = w.next()?;
            let state: Vec<&str> = w.collect();
            name.starts_with(prefix)
                .then(|| (name.to_string(), state.join(" ")))
        })
        .collect()
}

/// Waits until `virsh list --all` shows exactly `want` for the deployment.
fn expect_domains(sys: &System, want: &[(usize, &str)]) {
    let prefix = sys.domains[0].trim_end_matches("a1e0");
    let want: BTreeMap<String, String> = want
        .iter()
        .map(|(i, s)| (sys.domains[*i].clone(), s.to_string()))
        .collect();
    let deadline = Instant::now() + BOOT;
    loop {
        let got = domains_with_prefix(prefix);
        if got == want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "virsh list --all: expected {want:?}, got {got:?}\n{}",
            sys.diagnostics()
        );
        std::thread::sleep(Duration::from_millis(250));
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
        retransmit_after: Duration::from_millis(1000),
        op_timeout: Duration::from_secs(180),
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

/// Puts then gets of `keys` (the client accepts a result only on f+1
/// matching replies); every get must return the last acknowledged put.
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

fn fault_drill(dormant: &str) {
    let dir = test_dir();
    let mut sys = System::start(dir.path(), dormant, &["1/0:wrong_replies_from=7"]);
    let asleep = if dormant == "saved" {
        "saved"
    } else {
        "paused"
    };
    expect_domains(&sys, &[(0, "running"), (1, "running"), (2, asleep)]);

    let rt = tokio::runtime::Runtime::new().unwrap();
    let mut c = client(&sys.dep, &rt);
    let mut model = BTreeMap::new();
    rt.block_on(async {
        // 12 app_seqs: checkpoints 4 and 8, wrong replies from 7 on.
        for round in 0..3 {
            workload(&mut c, &mut model, round, 2).await;
        }
    });
    let deadline = Instant::now() + BOOT;
    loop {
        let log = sys.hostd_log();
        let done = |exec: &str, action: &str| {
            log.lines()
                .any(|l| l.contains("host command done") && l.contains(exec) && l.contains(action))
        };
        if done("app1/exec2", "Wake") && done("app1/exec0", "Reimage") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "expected Wake of exec2 and Reimage of exec0\n{}",
            sys.diagnostics()
        );
        std::thread::sleep(Duration::from_millis(250));
    }
    // The new active set serves reads and writes correctly.
    rt.block_on(async {
        for round in 3..5 {
            workload(&mut c, &mut model, round, 2).await;
        }
    });
    let log2 = sys.executor_log(2);
    assert!(
        log2.contains("stable checkpoint ahead of our state") && log2.contains("recover"),
        "the woken VM recovers from the stable checkpoint by fetching pages:\n{log2}"
    );
    // VM 0 was destroyed, rebuilt from a fresh disk, booted, and put to sleep.
    expect_domains(&sys, &[(0, asleep), (1, "running"), (2, "running")]);
    let log0 = sys.executor_log(0);
    assert!(
        log0.matches("guest booted").count() >= 2,
        "VM 0 booted twice:\n{log0}"
    );

    let status = sys.stop_hostd().expect("hostd ran");
    assert!(status.success(), "zz-hostd exit: {status}");
    let prefix = sys.domains[0].trim_end_matches("a1e0").to_string();
    let left = domains_with_prefix(&prefix);
    assert!(left.is_empty(), "teardown left domains: {left:?}");
}

#[test]
fn paused_vm_wakes_and_faulty_vm_is_rebuilt() {
    fault_drill("paused");
}

#[test]
fn saved_vm_wakes_and_faulty_vm_is_rebuilt() {
    fault_drill("saved");
}

/// libvirtd down, a domain removed behind the backend's back, and a missing
/// guest image each give one error naming cause and fix, never a panic.
#[test]
fn libvirt_errors_name_cause_and_fix() {
    use zz_hypervisor::libvirt::{GuestImage, LibvirtBackend, LibvirtConfig};
    use zz_hypervisor::{ReplicaLifecycle, ReplicaSpec, ReplicaState};
    use zz_wire::exec::ExecId;
    let image = require_vms();
    let dir = test_dir();

    // Daemon down: a socket nobody listens on.
    let down = LibvirtConfig::new(
        format!("qemu:///system?socket={}/none.sock", dir.path().display()),
        "errs",
        GuestImage::in_dir(&image),
    );
    let e = LibvirtBackend::new(down).err().expect("no daemon there");
    let msg = e.to_string();
    assert!(
        msg.contains("is libvirtd running") && msg.contains("scripts/setup-libvirt"),
        "{msg}"
    );

    // Image missing.
    let e = LibvirtBackend::new(LibvirtConfig::new(
        URI,
        "errs",
        GuestImage::in_dir(&dir.path().join("no-image")),
    ))
    .err()
    .expect("no image there");
    let msg = e.to_string();
    assert!(
        msg.contains("vmlinuz") && msg.contains("zzctl -- image build"),
        "{msg}"
    );

    // Domain missing: undefined with virsh behind the backend's back.
    let ns = format!("errs{}", std::process::id());
    let mut b = LibvirtBackend::new(LibvirtConfig::new(URI, &ns, GuestImage::in_dir(&image)))
        .expect("libvirt backend");
    let exec = ExecId { app: 9, index: 0 };
    let spec = ReplicaSpec::new(exec, dir.path().join("state"), dir.path().join("a9e0.sock"));
    b.define(spec).expect("define");
    assert_eq!(b.state(exec).unwrap(), ReplicaState::Defined);
    let name = b.domain_name(exec);
    virsh(&["undefine", &name]);
    let e = b.state(exec).expect_err("the domain is gone");
    let msg = e.to_string();
    assert!(
        msg.contains(&name) && msg.contains("gone from libvirt") && msg.contains("redefined"),
        "{msg}"
    );
    // It was redefined: the next call works.
    assert_eq!(b.state(exec).unwrap(), ReplicaState::Defined);
    drop(b);
    assert!(
        domains_with_prefix(&format!("zz-{ns}-")).is_empty(),
        "dropping the backend removes its domains"
    );
}
