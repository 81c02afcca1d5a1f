//! Helpers shared by the `zzctl` integration tests: running `zzctl` against
//! a deployment folder and reading `status --json`.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use serde_json::Value;
use zzctl::ops::status::http_get;

pub fn zzctl() -> Command {
    Command::new(env!("CARGO_BIN_EXE_zzctl"))
}

pub fn require_daemons() {
    let exe = PathBuf::from(env!("CARGO_BIN_EXE_zzctl"));
    for d in ["zz-agreement", "zz-hostd", "zz-executor"] {
        let p = exe.with_file_name(d);
        assert!(
            p.is_file(),
            "{} is not built; run `cargo build --bins` (scripts/test does) first",
            p.display()
        );
    }
}

pub fn run(dir: &Path, args: &[&str]) -> Output {
    let mut c = zzctl();
    c.args(args).arg("--dir").arg(dir);
    c.output().unwrap()
}

pub fn text(o: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

/// Runs and requires success; returns stdout.
pub fn ok(dir: &Path, args: &[&str]) -> String {
    let o = run(dir, args);
    let (out, err) = text(&o);
    assert!(
        o.status.success(),
        "zzctl {args:?} failed ({:?}):\nstdout:\n{out}\nstderr:\n{err}",
        o.status.code()
    );
    out
}

pub fn status_json(dir: &Path) -> Value {
    let out = ok(dir, &["status", "--json"]);
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("status --json is not JSON ({e}): {out}"))
}

pub fn app<'a>(st: &'a Value, name: &str) -> &'a Value {
    st["apps"]
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["name"] == name)
        .unwrap_or_else(|| panic!("no app {name} in {st}"))
}

pub fn exec_state(st: &Value, name: &str, index: u64) -> String {
    app(st, name)["executors"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["index"] == index)
        .unwrap()["state"]
        .as_str()
        .unwrap()
        .to_string()
}

/// Polls `status --json` until `pred` holds; panics with the last status after `limit`.
pub fn wait_status(
    dir: &Path,
    what: &str,
    limit: Duration,
    pred: impl Fn(&Value) -> bool,
) -> Value {
    let start = Instant::now();
    loop {
        let st = status_json(dir);
        if pred(&st) {
            return st;
        }
        assert!(
            start.elapsed() < limit,
            "timed out waiting for {what}; last status:\n{st:#}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Scrapes `GET /metrics` and checks the Prometheus text format: every
/// sample line is `name{labels} value` with a `# TYPE` line for its family.
/// Returns samples by bare name (summed over label sets).
pub fn scrape(addr: std::net::SocketAddr) -> std::collections::BTreeMap<String, f64> {
    let body = http_get(addr, "/metrics", Duration::from_secs(5)).unwrap();
    let mut types = std::collections::BTreeSet::new();
    let mut out = std::collections::BTreeMap::new();
    for line in body.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut p = rest.split_whitespace();
            let name = p.next().unwrap();
            let kind = p.next().unwrap();
            assert!(
                ["counter", "gauge", "summary", "histogram"].contains(&kind),
                "bad type line {line}"
            );
            types.insert(name.to_string());
            continue;
        }
        if line.starts_with('#') || line.is_empty() {
            continue;
        }
        let (key, value) = line
            .rsplit_once(' ')
            .unwrap_or_else(|| panic!("bad sample {line}"));
        let v: f64 = value
            .parse()
            .unwrap_or_else(|_| panic!("bad value in {line}"));
        let name = key.split('{').next().unwrap();
        assert!(
            key == name || (key.contains("=\"") && key.ends_with('}')),
            "bad labels in {line}"
        );
        let family = name
            .strip_suffix("_sum")
            .or_else(|| name.strip_suffix("_count"))
            .filter(|f| types.contains(*f))
            .unwrap_or(name);
        assert!(types.contains(family), "sample {name} has no # TYPE line");
        *out.entry(name.to_string()).or_insert(0.0) += v;
    }
    out
}

pub fn assert_has(m: &std::collections::BTreeMap<String, f64>, names: &[&str], who: &str) {
    for n in names {
        assert!(m.contains_key(*n), "{who} metrics lack {n}: {m:?}");
    }
}

/// Stops the deployment if a test panics half-way.
pub struct Down(pub PathBuf);
impl Drop for Down {
    fn drop(&mut self) {
        let _ = run(&self.0, &["down"]);
    }
}
