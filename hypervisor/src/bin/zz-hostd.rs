//! `zz-hostd`: the host agent of one physical server.
//!
//! ```text
//! zz-hostd --config cluster.toml --host h0 [--executor PATH] [--dir DIR]
//!          [--fault APP/INDEX:KEY=VALUE,...]
//! ```
//!
//! Runs the execution replicas the config places on host `h0` (see
//! `zz_hypervisor::hostd`), listens on the host's `addr` for agreement
//! replicas, and serves until SIGTERM or SIGINT, when it destroys its
//! replicas and exits 0. `--fault 1/0:wrong_replies_from=1` gives replica 0
//! of app 1 a fault plan (fields of `zz_executor::FaultPlan`), only if the
//! config sets `execution.allow_fault_injection`; at run time, `zzctl fault`
//! sends an operator-signed drill instead. With a `metrics_addr` for the host,
//! it serves `GET /metrics` and `GET /status` there (see
//! `zz_hypervisor::hostd_ops`). The log level is the config's `log_level`, or
//! `RUST_LOG` when set.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Parser;
use zz_executor::FaultPlan;
use zz_hypervisor::hostd::{self, HostdOptions};
use zz_wire::config::ClusterConfig;
use zz_wire::exec::ExecId;

/// The zz host agent.
#[derive(Parser, Debug)]
#[command(name = "zz-hostd", version, about)]
struct Args {
    /// The cluster configuration (TOML).
    #[arg(long)]
    config: PathBuf,
    /// This host's name, as listed in the config's [[hosts]].
    #[arg(long)]
    host: String,
    /// The executor program (default: zz-executor beside this binary).
    #[arg(long)]
    executor: Option<PathBuf>,
    /// Folder for state, sockets and logs (default: <data_dir>/host-<name>).
    #[arg(long)]
    dir: Option<PathBuf>,
    /// A fault-injection drill: APP/INDEX:KEY=VALUE[,KEY=VALUE...], e.g.
    /// `1/0:wrong_replies_from=1`. Repeatable.
    #[arg(long)]
    fault: Vec<String>,
    /// libvirt hosts: the guest image folder (default: $ZZ_IMAGE_DIR, else
    /// target/zz-image beside this binary's folder).
    #[arg(long)]
    image: Option<PathBuf>,
    /// libvirt hosts: memory of each replica VM in MiB (at least 80).
    #[arg(long, default_value_t = 256)]
    vm_memory: u32,
    /// libvirt hosts: virtual CPUs of each replica VM.
    #[arg(long, default_value_t = 1)]
    vm_vcpus: u32,
    /// libvirt hosts: `auto` (KVM if the CPU shows vmx/svm, else TCG), `kvm` or `tcg`.
    #[arg(long, default_value = "auto")]
    accel: String,
}

fn main() {
    let args = Args::parse();
    if let Err(e) = real_main(args) {
        eprintln!("zz-hostd: error: {e:#}");
        std::process::exit(1);
    }
}

/// Parses `APP/INDEX:KEY=VALUE,...` into a replica and its fault plan.
fn parse_fault(s: &str) -> Result<(ExecId, FaultPlan)> {
    let (who, plan) = s
        .split_once(':')
        .with_context(|| format!("--fault {s:?}: expected APP/INDEX:KEY=VALUE,..."))?;
    let (app, index) = who
        .split_once('/')
        .with_context(|| format!("--fault {s:?}: expected APP/INDEX before the colon"))?;
    let exec = ExecId {
        app: app.trim().parse().context("--fault: bad app id")?,
        index: index.trim().parse().context("--fault: bad replica index")?,
    };
    // Commas inside `{...}` belong to an inline table (`corrupt_page={after=8,persistent=true}`).
    let mut toml_text = String::new();
    let mut depth = 0usize;
    for ch in plan.chars() {
        match ch {
            '{' => depth += 1,
            '}' => depth = depth.saturating_sub(1),
            ',' if depth == 0 => {
                toml_text.push('\n');
                continue;
            }
            _ => {}
        }
        toml_text.push(ch);
    }
    let plan: FaultPlan =
        toml::from_str(&toml_text).with_context(|| format!("--fault {s:?}: not a fault plan"))?;
    Ok((exec, plan))
}

fn real_main(args: Args) -> Result<()> {
    let cfg = ClusterConfig::load(&args.config)
        .with_context(|| format!("loading config {}", args.config.display()))?;
    init_logging(cfg.log_level.as_deref());
    if !cfg.hosts.iter().any(|h| h.name == args.host) {
        let names: Vec<&str> = cfg.hosts.iter().map(|h| h.name.as_str()).collect();
        bail!(
            "--host {} is not in the config; its hosts are: {}",
            args.host,
            names.join(", ")
        );
    }
    let mut opts = HostdOptions::new(cfg, args.config.clone(), args.host);
    if let Some(e) = args.executor {
        opts.executor = e;
    }
    if let Some(d) = args.dir {
        opts.dir = d;
    }
    for f in &args.fault {
        opts.faults.push(parse_fault(f)?);
    }
    opts.vm.image_dir = args.image;
    opts.vm.memory_mib = args.vm_memory;
    if args.vm_vcpus == 0 {
        anyhow::bail!("--vm-vcpus must be at least 1");
    }
    opts.vm.vcpus = args.vm_vcpus;
    opts.vm.accel = Some(
        zz_hypervisor::libvirt::Accel::parse(&args.accel)
            .with_context(|| format!("--accel {}: use auto, kvm or tcg", args.accel))?,
    );
    let on_vms = opts
        .config
        .hosts
        .iter()
        .any(|h| h.name == opts.host && h.backend == "libvirt");
    if !on_vms && !opts.executor.is_file() {
        bail!(
            "executor program {} not found (build zz-executor, or pass --executor)",
            opts.executor.display()
        );
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .thread_name("zz-hostd")
        .build()
        .context("starting the tokio runtime")?;
    rt.block_on(async move {
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = signal(SignalKind::terminate()).context("watching SIGTERM")?;
        let mut int = signal(SignalKind::interrupt()).context("watching SIGINT")?;
        let agent = hostd::start(opts)
            .await
            .context("starting the host agent")?;
        let stop = async move {
            tokio::select! {
                _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
                _ = int.recv() => tracing::info!("SIGINT: shutting down"),
            }
        };
        agent.run_until(stop).await.context("host agent failed")?;
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fault_flags_parse() {
        let (e, p) = parse_fault("1/0:wrong_replies_from=3,slow_ms=5").unwrap();
        assert_eq!(e, ExecId { app: 1, index: 0 });
        assert_eq!(p.wrong_replies_from, Some(3));
        assert_eq!(p.slow_ms, 5);
        let (_, p) = parse_fault("2/1:corrupt_page={after=8,persistent=true},slow_ms=1").unwrap();
        let c = p.corrupt_page.unwrap();
        assert_eq!(
            (c.after, c.page, c.persistent, p.slow_ms),
            (8, None, true, 1)
        );
        assert!(parse_fault("1:wrong_replies_from=3").is_err());
        assert!(parse_fault("1/0:nonsense=3").is_err() || parse_fault("1/0:x").is_err());
    }
}
