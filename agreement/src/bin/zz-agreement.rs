//! `zz-agreement`: the daemon of one agreement replica.
//!
//! ```text
//! zz-agreement --config cluster.toml --id 0
//! ```
//!
//! Reads the cluster config and this replica's key file, restores durable
//! state from `<data_dir>/replica-<id>`, keeps a link to every host agent of
//! the config (apps with `[[executors]]` run on execution replicas behind
//! them, see `zz_agreement::hostlink`), and serves until SIGTERM or SIGINT,
//! when it flushes its storage and exits 0. A bad config or key exits nonzero
//! with a message naming the problem. With a `metrics_addr`, it serves
//! `GET /metrics` (Prometheus text) and `GET /status` (JSON) there. The log
//! level is the config's `log_level`, or `RUST_LOG` when set.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::Parser;
use zz_agreement::app::{new_app, Service};
use zz_agreement::driver::{self, DriverOptions};
use zz_agreement::hostlink;
use zz_wire::config::{ClusterConfig, ReplicaKeys};
use zz_wire::ReplicaId;

/// One zz agreement replica.
#[derive(Parser, Debug)]
#[command(name = "zz-agreement", version, about)]
struct Args {
    /// The cluster configuration (TOML).
    #[arg(long)]
    config: PathBuf,
    /// This replica's id, as listed in the config.
    #[arg(long)]
    id: ReplicaId,
    /// Batches in flight before the primary waits to fill a bigger one.
    #[arg(long)]
    max_inflight_batches: Option<u64>,
    /// Runtime threads: 1 runs everything on one thread (best when several
    /// replicas share a small machine); more lets frames be decoded and
    /// MAC-checked in parallel with the protocol core.
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// Period of the protocol timer, in milliseconds.
    #[arg(long, default_value_t = 10)]
    tick_ms: u64,
    /// Directory for durable state (default: `<data_dir>/replica-<id>`).
    #[arg(long)]
    data_dir: Option<PathBuf>,
}

fn main() {
    let args = Args::parse();
    if let Err(e) = real_main(args) {
        eprintln!("zz-agreement: error: {e:#}");
        std::process::exit(1);
    }
}

fn real_main(args: Args) -> Result<()> {
    let cfg = ClusterConfig::load(&args.config)
        .with_context(|| format!("loading config {}", args.config.display()))?;
    init_logging(cfg.log_level.as_deref());
    if args.id as usize >= cfg.n() {
        bail!(
            "--id {} is not a replica of this cluster: the config lists ids 0..{}",
            args.id,
            cfg.n()
        );
    }
    let keys = ReplicaKeys::load(&cfg, args.id)
        .with_context(|| format!("loading the keys of replica {}", args.id))?;
    let mut apps = Vec::new();
    for a in &cfg.apps {
        if cfg.executors.iter().any(|e| e.app == a.id) {
            continue; // run by execution replicas, reached through host agents
        }
        let app = new_app(&a.kind).with_context(|| format!("app `{}` (id {})", a.name, a.id))?;
        apps.push((a.id, app));
    }
    let link_cfg = cfg.clone();
    let link_keys = keys.clone();
    let mut opts = DriverOptions::new(cfg, keys, Service::new(apps));
    let exec_rx = if link_cfg.executors.is_empty() {
        None
    } else {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        opts.exec_out = Some(tx);
        Some(rx)
    };
    opts.max_inflight_batches = args.max_inflight_batches;
    opts.tick_interval = Duration::from_millis(args.tick_ms.max(1));
    if let Some(d) = args.data_dir {
        opts.data_dir = d;
    }
    let mut builder = if args.threads <= 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut b = tokio::runtime::Builder::new_multi_thread();
        b.worker_threads(args.threads);
        b
    };
    let rt = builder
        .enable_all()
        .thread_name("zz-agreement")
        .build()
        .context("starting the tokio runtime")?;
    rt.block_on(async move {
        // Watch the signals before anything else, so that a SIGTERM arriving
        // while the replica starts also ends in a clean shutdown.
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = signal(SignalKind::terminate()).context("watching SIGTERM")?;
        let mut int = signal(SignalKind::interrupt()).context("watching SIGINT")?;
        let handle = driver::start(opts).await.context("starting the replica")?;
        let _links =
            exec_rx.map(|rx| hostlink::spawn(&link_cfg, &link_keys, rx, handle.exec_input()));
        let stop = async move {
            tokio::select! {
                _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
                _ = int.recv() => tracing::info!("SIGINT: shutting down"),
            }
        };
        handle.run_until(stop).await.context("replica failed")?;
        tracing::info!("stopped cleanly");
        Ok(())
    })
}

fn init_logging(level: Option<&str>) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(level.unwrap_or("info")))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .init();
}
