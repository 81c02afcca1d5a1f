//! `zzctl bench`: throughput and latency of a local deployment.
//!
//! `bench agreement` writes a temporary deployment (3f+1 replicas on free
//! loopback ports, one `null` app), starts the `zz-agreement` daemons as child
//! processes, runs closed-loop clients (each with one operation in flight)
//! for a warm-up and then for the measured duration, stops the daemons
//! (SIGTERM, then SIGKILL), and reports one line:
//!
//! ```text
//! bench=agreement f=1 clients=32 payload=0 ops_per_s=<n> p50_ms=<x> p99_ms=<y>
//! ```

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use zz_client::deploy::{write_local, DeployOptions, LocalCluster};
use zz_client::{ClientOptions, Cluster};
use zz_wire::config::{AgreementTuning, AppEntry};

/// What `bench agreement` runs.
#[derive(Clone, Debug)]
pub struct AgreementBench {
    pub replicas: usize,
    pub clients: usize,
    pub duration: Duration,
    pub warmup: Duration,
    /// Bytes of each operation.
    pub payload: usize,
    /// The `zz-agreement` executable.
    pub agreement_bin: PathBuf,
    /// Extra arguments for every daemon.
    pub daemon_args: Vec<String>,
    /// Tokio worker threads of the client side.
    pub client_threads: usize,
    pub tuning: AgreementTuning,
    /// Keep the deployment (config, keys, logs) in this directory instead of
    /// a temporary one.
    pub keep_dir: Option<PathBuf>,
}

/// The outcome of a benchmark.
#[derive(Clone, Debug)]
pub struct BenchReport {
    pub f: usize,
    pub clients: usize,
    pub payload: usize,
    pub ops: u64,
    pub errors: u64,
    pub seconds: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
}

impl BenchReport {
    pub fn ops_per_s(&self) -> f64 {
        if self.seconds > 0.0 {
            self.ops as f64 / self.seconds
        } else {
            0.0
        }
    }

    /// The machine-readable summary line.
    pub fn line(&self) -> String {
        format!(
            "bench=agreement f={} clients={} payload={} ops_per_s={:.0} p50_ms={:.3} p99_ms={:.3}",
            self.f,
            self.clients,
            self.payload,
            self.ops_per_s(),
            self.p50_ms,
            self.p99_ms
        )
    }
}

/// The `q` quantile of sorted samples (microseconds), in milliseconds.
fn quantile_ms(sorted_us: &[u32], q: f64) -> f64 {
    if sorted_us.is_empty() {
        return 0.0;
    }
    let i = ((sorted_us.len() as f64 - 1.0) * q).round() as usize;
    sorted_us[i.min(sorted_us.len() - 1)] as f64 / 1000.0
}

/// Runs `bench agreement`.
pub fn run_agreement(b: &AgreementBench) -> Result<BenchReport> {
    if b.replicas < 4 {
        bail!(
            "--replicas must be at least 4 (3f+1 with f >= 1), got {}",
            b.replicas
        );
    }
    if b.clients == 0 {
        bail!("--clients must be at least 1");
    }
    let f = (b.replicas - 1) / 3;
    let tmp;
    let dir = match &b.keep_dir {
        Some(d) => d.clone(),
        None => {
            tmp = tempfile::Builder::new()
                .prefix("zz-bench-")
                .tempdir()
                .context("creating a temporary directory")?;
            tmp.path().to_path_buf()
        }
    };
    let opts = DeployOptions {
        f,
        replicas: Some(b.replicas),
        clients: b.clients,
        apps: vec![AppEntry {
            id: 0,
            name: "null".into(),
            kind: "null".into(),
        }],
        metrics: true,
        tuning: b.tuning.clone(),
        log_level: Some("info".into()),
        ..Default::default()
    };
    let deployment = write_local(&dir, &opts).context("writing the benchmark deployment")?;
    eprintln!("zzctl bench: deployment in {}", dir.display());
    let mut cluster =
        LocalCluster::new(&b.agreement_bin, deployment.clone(), b.daemon_args.clone());
    cluster
        .start_all(Duration::from_secs(20))
        .context("starting the agreement replicas")?;
    eprintln!(
        "zzctl bench: {} replicas up (f={f}); running {} clients",
        b.replicas, b.clients
    );

    let result = run_clients(b, &deployment);
    if let Ok(m) = cluster.metrics(0) {
        let get = |k: &str| m.get(k).copied().unwrap_or(0.0);
        let batches = get("zz_batches_committed_total");
        let reqs = get("zz_requests_executed_total");
        let flushes = get("zz_storage_flushes_total");
        eprintln!(
            "zzctl bench: replica 0: {reqs} requests in {batches} batches ({:.1} per batch), \
             {flushes} storage flushes ({:.0} us each), view {}",
            if batches > 0.0 { reqs / batches } else { 0.0 },
            if flushes > 0.0 {
                get("zz_storage_seconds_total") * 1e6 / flushes
            } else {
                0.0
            },
            get("zz_view"),
        );
    }
    let statuses = cluster.stop_all(Duration::from_secs(10));
    for (id, s) in statuses.iter().enumerate() {
        match s {
            Some(s) if s.success() => {}
            Some(s) => eprintln!(
                "zzctl bench: warning: replica {id} exited with {s}; see {}",
                cluster.log_path(id as u32).display()
            ),
            None => eprintln!("zzctl bench: warning: replica {id} was not running at the end"),
        }
    }
    let (ops, errors, mut lat) = result?;
    lat.sort_unstable();
    Ok(BenchReport {
        f,
        clients: b.clients,
        payload: b.payload,
        ops,
        errors,
        seconds: b.duration.as_secs_f64(),
        p50_ms: quantile_ms(&lat, 0.50),
        p99_ms: quantile_ms(&lat, 0.99),
    })
}

/// Runs the closed-loop clients; returns (ops in the window, errors, latencies in µs).
fn run_clients(
    b: &AgreementBench,
    deployment: &zz_client::deploy::Deployment,
) -> Result<(u64, u64, Vec<u32>)> {
    let mut builder = if b.client_threads <= 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut rb = tokio::runtime::Builder::new_multi_thread();
        rb.worker_threads(b.client_threads);
        rb
    };
    let rt = builder
        .enable_all()
        .build()
        .context("starting the client runtime")?;
    let keys = deployment
        .client_ids()
        .into_iter()
        .map(|id| deployment.client_keys(id))
        .collect::<Result<Vec<_>, _>>()
        .context("loading client keys")?;
    let cfg = deployment.config.clone();
    let (warmup, duration, payload) = (b.warmup, b.duration, b.payload);
    rt.block_on(async move {
        let copts = ClientOptions {
            op_timeout: Duration::from_secs(30),
            ..Default::default()
        };
        let cluster = Cluster::from_config(&cfg, copts)?;
        if !cluster
            .wait_connected(cluster.n(), Duration::from_secs(10))
            .await
        {
            bail!("could not connect to every replica within 10 s");
        }
        let start = Instant::now() + Duration::from_millis(50);
        let measure_from = start + warmup;
        let end = measure_from + duration;
        let op = Arc::new(vec![0xA5u8; payload]);
        let mut tasks = Vec::new();
        for k in keys {
            let mut client = cluster.client(k)?;
            let op = op.clone();
            tasks.push(tokio::spawn(async move {
                tokio::time::sleep_until(start.into()).await;
                let mut lat = Vec::with_capacity(1 << 16);
                let (mut ops, mut errors) = (0u64, 0u64);
                loop {
                    let t0 = Instant::now();
                    if t0 >= end {
                        break;
                    }
                    let r = client.invoke(0, op.to_vec()).await;
                    let t1 = Instant::now();
                    match r {
                        Ok(_) if t1 >= measure_from && t1 <= end => {
                            ops += 1;
                            lat.push((t1 - t0).as_micros().min(u32::MAX as u128) as u32);
                        }
                        Ok(_) => {}
                        Err(e) => {
                            errors += 1;
                            tracing::warn!(error = %e, "operation failed");
                        }
                    }
                }
                (ops, errors, lat)
            }));
        }
        let (mut ops, mut errors, mut lat) = (0, 0, Vec::new());
        for t in tasks {
            let (o, e, l) = t.await.context("client task panicked")?;
            ops += o;
            errors += e;
            lat.extend(l);
        }
        if errors > 0 {
            eprintln!("zzctl bench: {errors} operations failed");
        }
        Ok((ops, errors, lat))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_and_line_format() {
        let s: Vec<u32> = (1..=100).map(|x| x * 1000).collect();
        assert_eq!(quantile_ms(&s, 0.5), 51.0);
        assert_eq!(quantile_ms(&s, 0.99), 99.0);
        assert_eq!(quantile_ms(&[], 0.5), 0.0);
        let r = BenchReport {
            f: 1,
            clients: 32,
            payload: 0,
            ops: 1000,
            errors: 0,
            seconds: 2.0,
            p50_ms: 1.5,
            p99_ms: 3.25,
        };
        assert_eq!(
            r.line(),
            "bench=agreement f=1 clients=32 payload=0 ops_per_s=500 p50_ms=1.500 p99_ms=3.250"
        );
    }
}
