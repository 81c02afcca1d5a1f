//! Shared harness of the process-level tests: a real 4-replica deployment on
//! 127.0.0.1, its `zz-agreement` daemons as child processes, and clients.

#![allow(dead_code)]

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use zz_client::deploy::{write_local, DeployOptions, LocalCluster};
use zz_client::{Client, ClientOptions, Cluster};
use zz_wire::config::{AgreementTuning, AppEntry, ClientKeys};

pub const APP: u32 = 0;

pub struct Harness {
    pub cluster: LocalCluster,
    pub rt: tokio::runtime::Runtime,
    pub clients: Cluster,
    keys: Vec<ClientKeys>,
    // Last, so the daemons are stopped before their directory goes.
    _dir: tempfile::TempDir,
}

/// Tuning that makes failures show up quickly in tests.
pub fn test_tuning() -> AgreementTuning {
    AgreementTuning {
        view_change_timeout_ms: 1000,
        status_interval_ms: 100,
        checkpoint_interval: 16,
        window: 64,
        ..AgreementTuning::default()
    }
}

impl Harness {
    /// Deploys 4 replicas (f = 1) hosting one counter app, and `clients` clients.
    pub fn start(clients: usize) -> Harness {
        let dir = tempfile::Builder::new()
            .prefix("zz-it-")
            .tempdir()
            .expect("tempdir");
        let opts = DeployOptions {
            f: 1,
            clients,
            apps: vec![AppEntry {
                id: APP,
                name: "counter".into(),
                kind: "counter".into(),
            }],
            tuning: test_tuning(),
            log_level: Some("info,zz_agreement::driver=debug".into()),
            ..Default::default()
        };
        let deployment = write_local(dir.path(), &opts).expect("write deployment");
        let keys = deployment
            .client_ids()
            .into_iter()
            .map(|id| deployment.client_keys(id).expect("client keys"))
            .collect();
        let bin = std::path::Path::new(env!("CARGO_BIN_EXE_zz-agreement"));
        let mut cluster = LocalCluster::new(bin, deployment.clone(), vec![]);
        cluster
            .start_all(Duration::from_secs(30))
            .expect("start replicas");
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        let copts = ClientOptions {
            retransmit_after: Duration::from_millis(300),
            retransmit_max: Duration::from_secs(1),
            op_timeout: Duration::from_secs(40),
            ..ClientOptions::default()
        };
        let clients = rt.block_on(async {
            let c = Cluster::from_config(&deployment.config, copts).expect("cluster");
            assert!(
                c.wait_connected(4, Duration::from_secs(10)).await,
                "clients cannot connect"
            );
            c
        });
        Harness {
            cluster,
            rt,
            clients,
            keys,
            _dir: dir,
        }
    }

    pub fn client(&self, i: usize) -> Client {
        let _g = self.rt.enter();
        self.clients.client(self.keys[i].clone()).expect("client")
    }

    /// Replica `id`'s metric `name` (bare name, e.g. `zz_last_executed`).
    pub fn metric(&self, id: u32, name: &str) -> f64 {
        let m = self
            .cluster
            .metrics(id)
            .unwrap_or_else(|e| panic!("metrics of replica {id}: {e}"));
        *m.get(name)
            .unwrap_or_else(|| panic!("replica {id} exports no {name}"))
    }

    /// Waits until `pred` holds for replica `id`'s metric `name`; returns its value.
    pub fn wait_metric(
        &self,
        id: u32,
        name: &str,
        timeout: Duration,
        pred: impl Fn(f64) -> bool,
    ) -> f64 {
        let start = Instant::now();
        loop {
            let v = self
                .cluster
                .metrics(id)
                .ok()
                .and_then(|m| m.get(name).copied());
            if let Some(v) = v {
                if pred(v) {
                    return v;
                }
            }
            if start.elapsed() > timeout {
                panic!(
                    "replica {id}: {name} = {v:?} did not reach the expected value within {timeout:?}; \
                     last lines of its log {}:\n{}",
                    self.cluster.log_path(id).display(),
                    self.log_tail(id, 60)
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The last `lines` lines of replica `id`'s log, for failure messages
    /// (the log goes with the test's temporary directory).
    pub fn log_tail(&self, id: u32, lines: usize) -> String {
        match std::fs::read_to_string(self.cluster.log_path(id)) {
            Ok(log) => {
                let all: Vec<&str> = log.lines().collect();
                all[all.len().saturating_sub(lines)..].join("\n")
            }
            Err(e) => format!("(cannot read it: {e})"),
        }
    }

    /// Runs `ops` operations on each of the first `clients` clients, concurrently.
    pub fn run_ops(&self, clients: usize, ops: usize) {
        let tasks: Vec<_> = (0..clients)
            .map(|i| {
                let mut c = self.client(i);
                self.rt.spawn(async move {
                    for k in 0..ops {
                        c.invoke(APP, vec![])
                            .await
                            .map_err(|e| format!("client {i} op {k}: {e}"))?;
                    }
                    Ok::<(), String>(())
                })
            })
            .collect();
        self.rt.block_on(async {
            for t in tasks {
                t.await.expect("client task").expect("operation failed");
            }
        });
    }

    /// Starts `clients` clients looping operations until [`Load::finish`].
    pub fn start_load(&self, clients: usize) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let tasks = (0..clients)
            .map(|i| {
                let mut c = self.client(i);
                let stop = stop.clone();
                self.rt.spawn(async move {
                    let mut done = 0u64;
                    while !stop.load(Ordering::Relaxed) {
                        c.invoke(APP, vec![])
                            .await
                            .map_err(|e| format!("client {i} op {done}: {e}"))?;
                        done += 1;
                    }
                    Ok(done)
                })
            })
            .collect();
        Load { stop, tasks }
    }

    /// The highest `zz_last_executed` among the replicas in `ids`.
    pub fn max_executed(&self, ids: &[u32]) -> f64 {
        ids.iter()
            .map(|i| self.metric(*i, "zz_last_executed"))
            .fold(0.0, f64::max)
    }
}

pub struct Load {
    stop: Arc<AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<Result<u64, String>>>,
}

impl Load {
    /// Stops the load and waits for every operation in flight; panics if any
    /// operation failed. Returns the number of operations completed.
    pub fn finish(self, h: &Harness) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        h.rt.block_on(async {
            let mut total = 0;
            for t in self.tasks {
                total += t
                    .await
                    .expect("load task")
                    .expect("operation under load failed");
            }
            total
        })
    }
}
