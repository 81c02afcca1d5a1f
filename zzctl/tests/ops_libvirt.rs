//! The operator commands on the libvirt backend: `zzctl init --backend
//! libvirt`, `up` (three execution replicas as QEMU VMs, the dormant one a
//! paused domain), `kv`, a run-time `fault` drill (the plan is written into
//! the stopped VM's disk) that is detected and repaired, and `down`, after
//! which none of the deployment's domains is left.
//!
//! Needs libvirt (`bash scripts/setup-libvirt`), the guest image
//! (`cargo run -p zzctl -- image build`) and the daemons built beside
//! `zzctl`; like the other VM tests it fails, never skips, without them.

mod common;

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use common::*;
use zzctl::ops::daemons::{config_path, deployment_processes};

/// The domains of the deployment (named in the host agent's log) and their
/// states, as `virsh` lists them.
fn domains(log: &std::path::Path) -> Vec<(String, String)> {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let mut names: Vec<String> = text
        .split(|c: char| c.is_whitespace() || c == '"' || c == '=')
        .filter(|w| w.starts_with("zz-") && w.contains("-h0-a"))
        .map(str::to_string)
        .collect();
    names.sort();
    names.dedup();
    let out = Command::new("virsh")
        .args(["-c", "qemu:///system", "list", "--all"])
        .output()
        .expect("virsh runs (bash scripts/setup-libvirt installs it)");
    let list = String::from_utf8_lossy(&out.stdout).into_owned();
    names
        .into_iter()
        .filter_map(|n| {
            list.lines()
                .find(|l| l.split_whitespace().nth(1) == Some(n.as_str()))
                .map(|l| {
                    (
                        n.clone(),
                        l.split_whitespace().skip(2).collect::<Vec<_>>().join(" "),
                    )
                })
        })
        .collect()
}

#[test]
fn operator_commands_drive_a_deployment_of_vms() {
    require_daemons();
    let exe = PathBuf::from(env!("CARGO_BIN_EXE_zzctl"));
    let image = exe
        .parent()
        .and_then(|d| d.parent())
        .map(|t| t.join("zz-image/vmlinuz"))
        .unwrap();
    assert!(
        image.is_file(),
        "{} is missing: build the guest image with `cargo run -p zzctl -- image build`",
        image.display()
    );
    let t = tempfile::tempdir().unwrap();
    let dir = t.path().join("d");
    let d = dir.as_path();
    let o = zzctl()
        .args(["init", "--dir"])
        .arg(d)
        .args([
            "--backend",
            "libvirt",
            "--apps",
            "kv1",
            "--allow-fault-injection",
        ])
        .args(["--checkpoint-interval", "8", "--exec-timeout-ms", "2000"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{:?}", text(&o));
    let _guard = Down(dir.clone());
    let out = ok(d, &["up", "--timeout", "180"]);
    assert_eq!(out.matches(" started (pid ").count(), 5, "{out}");
    let hostd_log = d.join("logs/hostd-h0.log");

    let st = wait_status(
        d,
        "two running VMs and a paused one",
        Duration::from_secs(120),
        |st| {
            exec_state(st, "kv1", 0) == "active"
                && exec_state(st, "kv1", 1) == "active"
                && exec_state(st, "kv1", 2) == "dormant-paused"
        },
    );
    assert_eq!(st["hosts"][0]["backend"], "libvirt");
    let doms = domains(&hostd_log);
    assert_eq!(doms.len(), 3, "{doms:?}");
    assert_eq!(
        doms.iter().map(|(_, s)| s.as_str()).collect::<Vec<_>>(),
        ["running", "running", "paused"],
        "{doms:?}"
    );

    for i in 0..20 {
        let v = format!("v{i}");
        assert_eq!(
            ok(d, &["kv", "put", "kv1", &format!("k{i}"), &v]).trim(),
            "stored"
        );
    }
    let out = ok(d, &["fault", "kv1", "0"]);
    assert!(out.contains("installed on app1/exec0"), "{out}");
    assert_eq!(
        ok(d, &["kv", "put", "kv1", "after", "fault"]).trim(),
        "stored"
    );
    assert_eq!(ok(d, &["kv", "get", "kv1", "k7"]).trim(), "v7");
    let st = wait_status(d, "kv1 repaired", Duration::from_secs(180), |st| {
        let a = app(st, "kv1");
        a["faulty"] == serde_json::json!([0])
            && a["active"] == serde_json::json!([1, 2])
            && exec_state(st, "kv1", 0) == "dormant-paused"
    });
    assert!(app(&st, "kv1")["epoch"].as_u64().unwrap() >= 2, "{st}");
    let exec0 = std::fs::read_to_string(d.join("data/host-h0/logs/exec-a1-e0.log")).unwrap();
    assert!(
        exec0.contains("fault injection enabled"),
        "the guest did not read the plan"
    );
    assert_eq!(ok(d, &["kv", "get", "kv1", "after"]).trim(), "fault");

    let out = ok(d, &["down"]);
    assert!(
        out.contains("nothing of this deployment is running"),
        "{out}"
    );
    assert!(deployment_processes(&config_path(d)).is_empty());
    let left = domains(&hostd_log);
    assert!(
        left.iter().all(|(_, s)| s == "shut off"),
        "domains still running after down: {left:?}"
    );
}
