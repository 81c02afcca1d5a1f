//! The `zz-agreement` daemon refuses a bad config or key with a clear
//! message and a nonzero exit code, and exits 0 on SIGTERM.

use std::process::Command;
use std::time::Duration;

use zz_client::deploy::{write_local, DeployOptions, LocalCluster};
use zz_wire::config::write_key_file;
use zz_wire::crypto::KeyPair;

fn daemon() -> Command {
    Command::new(env!("CARGO_BIN_EXE_zz-agreement"))
}

fn fails_with(cmd: &mut Command, needle: &str) {
    let out = cmd.output().expect("run zz-agreement");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "stderr: {err}");
    assert!(err.contains(needle), "expected `{needle}` in: {err}");
}

#[test]
fn missing_config_is_reported() {
    fails_with(
        daemon().args(["--config", "/nonexistent/cluster.toml", "--id", "0"]),
        "/nonexistent/cluster.toml",
    );
}

#[test]
fn bad_id_and_bad_key_are_reported() {
    let dir = tempfile::tempdir().unwrap();
    let d = write_local(dir.path(), &DeployOptions::default()).unwrap();
    fails_with(
        daemon()
            .arg("--config")
            .arg(&d.config_path)
            .args(["--id", "7"]),
        "not a replica of this cluster",
    );
    // Replica 1's key file holding some other key.
    let key_path = d.config.resolve(&d.config.replicas[1].key_file);
    write_key_file(&key_path, &KeyPair::generate()).unwrap();
    fails_with(
        daemon()
            .arg("--config")
            .arg(&d.config_path)
            .args(["--id", "1"]),
        "does not match replicas[1].public_key",
    );
    std::fs::write(&key_path, "not hex").unwrap();
    fails_with(
        daemon()
            .arg("--config")
            .arg(&d.config_path)
            .args(["--id", "1"]),
        "not hex",
    );
}

#[test]
fn invalid_config_is_reported() {
    let dir = tempfile::tempdir().unwrap();
    let d = write_local(dir.path(), &DeployOptions::default()).unwrap();
    let text = std::fs::read_to_string(&d.config_path).unwrap();
    std::fs::write(&d.config_path, text.replacen("f = 1", "f = 2", 1)).unwrap();
    fails_with(
        daemon()
            .arg("--config")
            .arg(&d.config_path)
            .args(["--id", "0"]),
        "3f+1",
    );
}

#[test]
fn sigterm_flushes_and_exits_zero() {
    let dir = tempfile::tempdir().unwrap();
    let d = write_local(dir.path(), &DeployOptions::default()).unwrap();
    let mut c = LocalCluster::new(
        std::path::Path::new(env!("CARGO_BIN_EXE_zz-agreement")),
        d,
        vec![],
    );
    c.start(0, Duration::from_secs(20)).unwrap();
    let status = c.stop(0, Duration::from_secs(10)).expect("was running");
    assert!(status.success(), "exit status {status}");
    let log = std::fs::read_to_string(c.log_path(0)).unwrap();
    assert!(log.contains("storage flushed"), "{log}");
}
