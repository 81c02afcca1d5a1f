//! End-to-end tests of the `zzctl` binary.

use std::path::PathBuf;
use std::process::Command;

use zz_wire::config::{ClientKeys, ClusterConfig, ReplicaKeys};

fn zzctl() -> Command {
    Command::new(env!("CARGO_BIN_EXE_zzctl"))
}

#[test]
fn init_writes_a_loadable_deployment_with_private_keys() {
    let dir = tempfile::tempdir().unwrap();
    let target = dir.path().join("cluster");
    let out = zzctl()
        .args(["init", "--dir"])
        .arg(&target)
        .args(["--clients", "2"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let path = PathBuf::from(String::from_utf8(out.stdout).unwrap().trim());
    let cfg = ClusterConfig::load(&path).unwrap();
    assert_eq!((cfg.f, cfg.n(), cfg.clients.len()), (1, 4, 2));
    for i in 0..4 {
        ReplicaKeys::load(&cfg, i).unwrap();
    }
    ClientKeys::load(&cfg, cfg.clients[1].id).unwrap();
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        for e in std::fs::read_dir(target.join("keys")).unwrap() {
            let mode = e.unwrap().metadata().unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
    }
}

#[test]
fn bench_without_the_daemon_binary_fails_with_a_hint() {
    let out = zzctl()
        .args(["bench", "agreement", "--duration", "1"])
        .env("ZZ_AGREEMENT_BIN", "/nonexistent/zz-agreement")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("zz-agreement binary not found at /nonexistent/zz-agreement"),
        "{err}"
    );
}

#[test]
fn bench_rejects_too_few_replicas() {
    let out = zzctl()
        .args(["bench", "agreement", "--replicas", "3", "--agreement-bin"])
        .arg(env!("CARGO_BIN_EXE_zzctl")) // any existing file: the check comes first
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--replicas must be at least 4"));
}

/// Runs a short benchmark when the daemon was built next to zzctl (as
/// `cargo test --workspace` or `cargo build -p zz-agreement` do).
#[test]
fn short_bench_prints_one_summary_line_last() {
    let exe = PathBuf::from(env!("CARGO_BIN_EXE_zzctl"));
    let daemon = exe.with_file_name("zz-agreement");
    if !daemon.is_file() {
        eprintln!(
            "skipped: {} is not built (cargo build -p zz-agreement)",
            daemon.display()
        );
        return;
    }
    let out = zzctl()
        .args([
            "bench",
            "agreement",
            "--clients",
            "4",
            "--duration",
            "1",
            "--warmup",
            "0.2",
        ])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let stdout = String::from_utf8(out.stdout).unwrap();
    let last = stdout.lines().last().expect("a summary line");
    let fields: Vec<&str> = last.split(' ').collect();
    let keys: Vec<&str> = fields
        .iter()
        .map(|f| f.split('=').next().unwrap())
        .collect();
    assert_eq!(
        keys,
        [
            "bench",
            "f",
            "clients",
            "payload",
            "ops_per_s",
            "p50_ms",
            "p99_ms"
        ],
        "{last}"
    );
    assert!(
        last.starts_with("bench=agreement f=1 clients=4 payload=0 ops_per_s="),
        "{last}"
    );
    let ops: f64 = fields[4].trim_start_matches("ops_per_s=").parse().unwrap();
    assert!(ops > 0.0, "{last}\n{stderr}");
}
