//! The operator commands on real processes: `zzctl init`, `up`, `status`,
//! `kv`, `activate`, `fault` and `down` drive a local deployment (4
//! `zz-agreement`, one `zz-hostd` and its `zz-executor`s), each output is
//! checked, including the fields of `status --json`; every daemon's metrics
//! endpoint is scraped over HTTP; and bad configs are refused, each in one
//! message naming the field, with nothing started.
//!
//! The daemons must be built beside `zzctl` (`cargo build --bins`, as
//! `scripts/test` does); a missing one fails the test with that hint.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::*;
use zz_wire::config::ClusterConfig;
use zzctl::ops::daemons::{config_path, deployment_processes};

#[test]
fn operator_commands_drive_a_deployment_of_real_processes() {
    require_daemons();
    let t = tempfile::tempdir().unwrap();
    let dir = t.path().join("d");
    let d = dir.as_path();

    // init
    let o = zzctl()
        .args(["init", "--dir"])
        .arg(d)
        .args(["--f", "1", "--apps", "kv1,kv2", "--allow-fault-injection"])
        .args(["--checkpoint-interval", "8"])
        // Slow, not faulty, on a busy machine: only the drill should be suspected.
        .args(["--exec-timeout-ms", "1000"])
        .output()
        .unwrap();
    let (out, err) = text(&o);
    assert!(o.status.success(), "{err}");
    assert_eq!(PathBuf::from(out.trim()), d.join("cluster.toml"));
    assert!(err.contains("kv1: replicas 0@h0 1@h0 2@h0"), "{err}");
    let cfg = ClusterConfig::load(&d.join("cluster.toml")).unwrap();
    assert!(cfg.execution.allow_fault_injection);
    assert!(cfg.operator_public_key.is_some());
    {
        use std::os::unix::fs::PermissionsExt;
        for e in std::fs::read_dir(d.join("keys")).unwrap() {
            let m = e.unwrap().metadata().unwrap().permissions().mode();
            assert_eq!(m & 0o777, 0o600);
        }
    }

    // status before up: not running (exit 4)
    let o = run(d, &["status"]);
    assert_eq!(o.status.code(), Some(4), "{:?}", text(&o));
    assert!(text(&o).1.contains("zzctl up"), "{:?}", text(&o));

    // up, twice
    let _guard = Down(dir.clone());
    let out = ok(d, &["up"]);
    assert_eq!(out.matches(" started (pid ").count(), 5, "{out}");
    assert!(out.contains("hostd-h0"), "{out}");
    let out = ok(d, &["up"]);
    assert_eq!(out.matches("already running").count(), 5, "{out}");
    // init over a running deployment is refused
    let o = zzctl().args(["init", "--dir"]).arg(d).output().unwrap();
    assert_eq!(o.status.code(), Some(5), "{:?}", text(&o));
    assert!(text(&o).1.contains("zzctl down"), "{:?}", text(&o));
    for n in ["replica-0", "replica-3", "hostd-h0"] {
        assert!(d.join(format!("run/{n}.pid")).is_file());
        assert!(d.join(format!("logs/{n}.log")).is_file());
    }

    // status --json: the cluster fields and every executor's host, epoch, state
    let st = wait_status(
        d,
        "2 active and 1 dormant replica per app",
        Duration::from_secs(30),
        |st| {
            ["kv1", "kv2"].iter().all(|a| {
                exec_state(st, a, 0) == "active"
                    && exec_state(st, a, 1) == "active"
                    && exec_state(st, a, 2) == "dormant-paused"
            })
        },
    );
    assert_eq!(st["f"], 1);
    let ag = &st["agreement"];
    assert_eq!(ag["up"], 4);
    for f in ["view", "primary", "last_committed", "stable_seq"] {
        assert!(ag[f].is_u64(), "agreement.{f} missing in {st}");
    }
    assert_eq!(ag["replicas"].as_array().unwrap().len(), 4);
    assert_eq!(st["hosts"][0]["name"], "h0");
    assert_eq!(st["hosts"][0]["up"], true);
    for a in ["kv1", "kv2"] {
        let ap = app(&st, a);
        assert_eq!(ap["epoch"], 0);
        assert_eq!(ap["active"], serde_json::json!([0, 1]));
        let execs = ap["executors"].as_array().unwrap();
        assert_eq!(execs.len(), 3);
        for e in execs {
            assert_eq!(e["host"], "h0");
            assert_eq!(e["epoch"], 0);
            for f in ["index", "state", "lifecycle", "pages_fetched"] {
                assert!(!e[f].is_null(), "executor field {f} missing in {e}");
            }
        }
        assert_eq!(execs[2]["lifecycle"], "paused");
    }
    // the table for people
    let table = ok(d, &["status"]);
    assert!(table.contains("agreement: view 0, primary 0"), "{table}");
    assert!(table.contains("dormant-paused"), "{table}");

    // kv
    assert_eq!(
        ok(d, &["kv", "put", "kv1", "greeting", "hello"]).trim(),
        "stored"
    );
    assert_eq!(ok(d, &["kv", "get", "kv1", "greeting"]).trim(), "hello");
    assert_eq!(
        ok(d, &["kv", "put", "kv1", "greeting", "hi"]).trim(),
        "stored (replaced)"
    );
    assert_eq!(ok(d, &["kv", "del", "kv1", "greeting"]).trim(), "deleted");
    let o = run(d, &["kv", "get", "kv1", "greeting"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        text(&o).1.contains("no value under `greeting`"),
        "{:?}",
        text(&o)
    );
    let o = run(d, &["kv", "get", "nosuch", "k"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(text(&o).1.contains("no app `nosuch`"), "{:?}", text(&o));
    // enough writes for stable execution checkpoints (interval 8)
    for i in 0..20 {
        let v = format!("v{i}");
        ok(d, &["kv", "put", "kv1", &format!("k{i}"), &v]);
    }

    // activate: operator-signed wake of kv2's dormant replica
    let out = ok(d, &["activate", "kv2", "2", "--timeout", "60"]);
    assert!(
        out.matches("signed a wake request for app2/exec2 at epoch 0")
            .count()
            >= 2,
        "{out}"
    );
    assert!(out.contains("app2/exec2 woken at epoch 1"), "{out}");
    wait_status(d, "kv2 at epoch 1", Duration::from_secs(10), |st| {
        app(st, "kv2")["epoch"].as_u64().unwrap() >= 1
    });
    // an active replica needs no wake
    let out = ok(d, &["activate", "kv1", "1"]);
    assert!(out.contains("app1/exec1 is already active"), "{out}");
    // a replica that does not exist
    let o = run(d, &["activate", "kv2", "9"]);
    assert_eq!(o.status.code(), Some(2), "{:?}", text(&o));
    assert!(
        text(&o).1.contains("there is no replica 9"),
        "{:?}",
        text(&o)
    );

    // fault: replica 0 of kv1 answers wrongly from now on
    let out = ok(d, &["fault", "kv1", "0", "wrong_replies_from=1"]);
    assert!(out.contains("installed on app1/exec0"), "{out}");
    // clients still get correct results (f+1 matching replies)
    assert_eq!(
        ok(d, &["kv", "put", "kv1", "after", "fault"]).trim(),
        "stored"
    );
    assert_eq!(ok(d, &["kv", "get", "kv1", "k3"]).trim(), "v3");
    let st = wait_status(d, "kv1 repaired", Duration::from_secs(60), |st| {
        let a = app(st, "kv1");
        a["faulty"] == serde_json::json!([0])
            && a["recovering"] == false
            && a["active"] == serde_json::json!([1, 2])
            && exec_state(st, "kv1", 0) == "dormant-paused"
            // the woken replica serves at once and is `recovering` until its
            // background fetch of the rest of the state is done
            && exec_state(st, "kv1", 2) == "active"
    });
    let a = app(&st, "kv1");
    assert!(a["epoch"].as_u64().unwrap() >= 2, "{st}");
    assert_eq!(a["executors"][0]["last_host_command"], "Reimage");
    assert_eq!(ok(d, &["kv", "get", "kv1", "after"]).trim(), "fault");

    // bad frames to replica 0 and to the host agent are dropped and counted
    let garbage = |addr: std::net::SocketAddr| {
        use std::io::Write;
        let mut c = std::net::TcpStream::connect(addr).unwrap();
        c.write_all(&[0, 0, 0, 3, 0xff, 0xfe, 0xfd]).unwrap();
        c.flush().unwrap();
        std::thread::sleep(Duration::from_millis(200));
    };
    let before_r0 = scrape(cfg.replicas[0].metrics_addr.unwrap())["zz_frames_malformed_total"];
    let before_h = scrape(cfg.hosts[0].metrics_addr.unwrap())["zz_host_hellos_rejected_total"];
    garbage(cfg.replicas[0].addr);
    garbage(cfg.hosts[0].addr);
    let after_r0 = scrape(cfg.replicas[0].metrics_addr.unwrap())["zz_frames_malformed_total"];
    let after_h = scrape(cfg.hosts[0].metrics_addr.unwrap())["zz_host_hellos_rejected_total"];
    assert_eq!(after_r0, before_r0 + 1.0);
    assert_eq!(after_h, before_h + 1.0);

    // metrics of every daemon, over HTTP, in Prometheus text format
    for r in &cfg.replicas {
        let m = scrape(r.metrics_addr.unwrap());
        assert_has(
            &m,
            &[
                "zz_requests_ordered_total",
                "zz_batches_committed_total",
                "zz_view_changes_total",
                "zz_suspicions_total",
                "zz_wakes_ordered_total",
                "zz_reimages_ordered_total",
                "zz_frames_malformed_total",
                "zz_frames_unauthenticated_total",
                "zz_operator_commands_total",
            ],
            &format!("replica {}", r.id),
        );
        assert!(m["zz_requests_ordered_total"] >= 25.0, "{m:?}");
        assert!(m["zz_batches_committed_total"] >= 1.0, "{m:?}");
    }
    let total = |name: &str| -> f64 {
        cfg.replicas
            .iter()
            .map(|r| scrape(r.metrics_addr.unwrap())[name])
            .sum()
    };
    assert!(total("zz_suspicions_total") >= 2.0);
    assert!(total("zz_operator_commands_total") >= 4.0);
    let h = scrape(cfg.hosts[0].metrics_addr.unwrap());
    assert_has(
        &h,
        &[
            "zz_host_wakes_total",
            "zz_host_reimages_total",
            "zz_host_pages_fetched_total",
            "zz_host_frames_malformed_total",
            "zz_host_frames_dropped_total",
            "zz_host_recovery_seconds_sum",
            "zz_host_recovery_seconds_count",
            "zz_host_fault_drills_total",
            "zz_host_hellos_rejected_total",
        ],
        "host agent",
    );
    assert!(h["zz_host_wakes_total"] >= 2.0, "{h:?}");
    assert!(h["zz_host_reimages_total"] >= 1.0, "{h:?}");
    assert_eq!(h["zz_host_fault_drills_total"], 1.0, "{h:?}");
    // kv1's woken replica fetched the pages of a stable checkpoint
    assert!(h["zz_host_pages_fetched_total"] >= 1.0, "{h:?}");
    assert!(h["zz_host_recovery_seconds_count"] >= 1.0, "{h:?}");

    // down, twice; then nothing of the deployment runs
    let out = ok(d, &["down"]);
    assert!(
        out.contains("nothing of this deployment is running"),
        "{out}"
    );
    assert!(deployment_processes(&config_path(d)).is_empty());
    assert_eq!(ok(d, &["down"]).trim(), "nothing was running");
    let o = run(d, &["status"]);
    assert_eq!(o.status.code(), Some(4));
    // every daemon stopped cleanly on SIGTERM
    for r in 0..4 {
        let log = std::fs::read_to_string(d.join(format!("logs/replica-{r}.log"))).unwrap();
        assert!(log.contains("stopped cleanly"), "replica {r}:\n{log}");
    }
    let log = std::fs::read_to_string(d.join("logs/hostd-h0.log")).unwrap();
    assert!(log.contains("replicas destroyed"), "{log}");
}

/// Writes a deployment, breaks it with `edit`, and checks that `up` refuses
/// it with exit code 3 in one message naming `field`, starting nothing.
fn refused(edit: impl FnOnce(&Path, &mut ClusterConfig), field: &str) {
    let t = tempfile::tempdir().unwrap();
    let d = t.path().join("d");
    let o = zzctl()
        .args(["init", "--dir"])
        .arg(&d)
        .args(["--apps", "kv1"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{:?}", text(&o));
    let path = d.join("cluster.toml");
    let mut cfg = ClusterConfig::load(&path).unwrap();
    edit(&d, &mut cfg);
    cfg.save(&path).unwrap();
    let o = run(&d, &["up"]);
    let (out, err) = text(&o);
    assert_eq!(o.status.code(), Some(3), "stdout {out}\nstderr {err}");
    assert_eq!(err.trim().lines().count(), 1, "not one message: {err}");
    assert!(
        err.contains(&format!("`{field}`")),
        "{err} does not name {field}"
    );
    assert!(!d.join("run").exists() || std::fs::read_dir(d.join("run")).unwrap().count() == 0);
    assert!(deployment_processes(&config_path(&d)).is_empty());
}

#[test]
fn bad_configs_are_refused_naming_the_field_and_nothing_starts() {
    require_daemons();
    refused(
        |d, _| std::fs::remove_file(d.join("keys/replica-2.key")).unwrap(),
        "replicas[2].key_file",
    );
    refused(
        |d, _| {
            std::fs::copy(d.join("keys/replica-2.key"), d.join("keys/replica-1.key")).unwrap();
        },
        "replicas[1].key_file",
    );
    refused(
        |_, c| c.replicas[1].addr = c.replicas[0].addr,
        "replicas[1].addr",
    );
    refused(
        |_, c| c.hosts[0].metrics_addr = c.replicas[3].metrics_addr,
        "hosts[0].metrics_addr",
    );
    refused(|_, c| c.f = 2, "f");
    refused(|_, c| c.apps[0].kind = "nosuch".into(), "apps[0].kind");
    // An unknown app kind on the command line is a usage error.
    let t = tempfile::tempdir().unwrap();
    let o = zzctl()
        .args(["init", "--dir"])
        .arg(t.path())
        .args(["--apps", "x:nosuch"])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2));
    assert!(text(&o).1.contains("unknown app kind `nosuch`"));
}

#[test]
fn fault_needs_fault_injection_and_completions_are_generated() {
    let t = tempfile::tempdir().unwrap();
    let d = t.path().join("d");
    let o = zzctl().args(["init", "--dir"]).arg(&d).output().unwrap();
    assert!(o.status.success());
    let o = run(&d, &["fault", "kv1", "0"]);
    assert_eq!(o.status.code(), Some(5), "{:?}", text(&o));
    assert!(
        text(&o).1.contains("--allow-fault-injection"),
        "{:?}",
        text(&o)
    );
    for (shell, marker) in [
        ("bash", "complete -F"),
        ("zsh", "#compdef zzctl"),
        ("fish", "complete -c zzctl"),
    ] {
        let o = zzctl().args(["completions", shell]).output().unwrap();
        assert!(o.status.success());
        let s = String::from_utf8_lossy(&o.stdout);
        assert!(s.contains(marker) && s.contains("activate"), "{shell}: {s}");
    }
}

#[test]
fn three_local_hosts_run_each_apps_replicas_on_distinct_hosts() {
    require_daemons();
    let t = tempfile::tempdir().unwrap();
    let dir = t.path().join("d");
    let d = dir.as_path();
    let o = zzctl()
        .args(["init", "--dir"])
        .arg(d)
        .args(["--apps", "kv1,kv2", "--hosts", "local,local,local"])
        .args(["--exec-timeout-ms", "1000"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{:?}", text(&o));
    let _guard = Down(dir.clone());
    let out = ok(d, &["up"]);
    assert_eq!(out.matches(" started (pid ").count(), 7, "{out}");
    let st = wait_status(d, "every replica started", Duration::from_secs(30), |st| {
        ["kv1", "kv2"].iter().all(|a| {
            (0..3).all(|i| ["active", "dormant-paused"].contains(&exec_state(st, a, i).as_str()))
        })
    });
    let hosts: Vec<&str> = st["hosts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| {
            assert_eq!(h["up"], true, "{h}");
            h["name"].as_str().unwrap()
        })
        .collect();
    assert_eq!(hosts, ["h0", "h1", "h2"]);
    let mut first_hosts = Vec::new();
    for a in ["kv1", "kv2"] {
        let execs = app(&st, a)["executors"].as_array().unwrap().clone();
        let mut on: Vec<String> = execs
            .iter()
            .map(|e| e["host"].as_str().unwrap().to_string())
            .collect();
        first_hosts.push(on[0].clone());
        on.sort();
        on.dedup();
        assert_eq!(on.len(), 3, "{a}'s replicas share a host: {execs:?}");
    }
    assert_ne!(
        first_hosts[0], first_hosts[1],
        "both apps' replica 0 on one host"
    );
    assert_eq!(ok(d, &["kv", "put", "kv2", "k", "v"]).trim(), "stored");
    assert_eq!(ok(d, &["kv", "get", "kv2", "k"]).trim(), "v");
    let out = ok(d, &["down"]);
    assert!(
        out.contains("nothing of this deployment is running"),
        "{out}"
    );
    assert!(deployment_processes(&config_path(d)).is_empty());
}
