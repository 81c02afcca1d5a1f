//! `zzctl`: the operator CLI of zz.
//!
//! ```text
//! zzctl bench agreement --replicas 4 --clients 32 --duration 10 --payload 0
//! zzctl bench statefetch --state-mib 1024 --dirty-pages 1000
//! zzctl bench recovery --state-mib 256
//! zzctl bench tenants --apps 4 --f 1 --mode zz|full
//! zzctl init --dir DIR [--f 1] [--apps kv1,kv2] [--hosts local,...] [--allow-fault-injection]
//! zzctl up|down|status [--json] --dir DIR
//! zzctl kv put|get|del --dir DIR APP KEY [VALUE]
//! zzctl activate --dir DIR APP REPLICA
//! zzctl fault --dir DIR APP REPLICA [PLAN]
//! zzctl demo
//! zzctl completions bash|zsh|fish
//! ```
//!
//! Exit codes: 0 success, 1 the operation failed, 2 bad command line,
//! 3 invalid config or keys (nothing started), 4 deployment not running,
//! 5 refused by the deployment (see `zzctl::ops`).

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};
use zz_wire::config::AgreementTuning;
use zzctl::bench::{run_agreement, AgreementBench};
use zzctl::bench_zz::{run_recovery, run_tenants, Programs, RecoveryBench, TenantsBench};
use zzctl::find_daemon;

#[derive(Parser, Debug)]
#[command(
    name = "zzctl",
    version,
    about = "Operate a zz BFT deployment",
    after_help = zzctl::ops::EXIT_CODES_HELP
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Benchmarks; each prints one machine-readable line last.
    #[command(subcommand)]
    Bench(Bench),
    #[command(flatten)]
    Ops(zzctl::ops::OpsCommand),
    /// The guest VM image of the libvirt backend.
    #[command(subcommand)]
    Image(zzctl::image::ImageCommand),
    /// The page-serving peer process of `bench statefetch` (internal).
    #[command(name = "__statefetch-serve", hide = true)]
    StatefetchServe {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
}

#[derive(Subcommand, Debug)]
enum Bench {
    /// Throughput and latency of the agreement cluster alone (null app).
    Agreement(AgreementArgs),
    /// Checkpoint cost, verified fetch throughput and time to first read
    /// of paged state (statefetch), against a peer process on loopback.
    Statefetch(StatefetchArgs),
    /// Repair of a wrong-reply fault on a process deployment: time to
    /// detect, wake, first correct reply and full state of the woken replica.
    Recovery(RecoveryArgs),
    /// Several CPU-costly kv apps under closed-loop load, with f+1 (zz) or
    /// 2f+1 (full) execution replicas active.
    Tenants(TenantsArgs),
}

/// The daemons of a process deployment.
#[derive(Args, Debug)]
struct ProgramArgs {
    /// The zz-agreement executable (default: next to zzctl, or $ZZ_AGREEMENT_BIN).
    #[arg(long)]
    agreement_bin: Option<PathBuf>,
    /// The zz-hostd executable (default: next to zzctl, or $ZZ_HOSTD_BIN).
    #[arg(long)]
    hostd_bin: Option<PathBuf>,
    /// The zz-executor executable (default: next to zzctl, or $ZZ_EXECUTOR_BIN).
    #[arg(long)]
    executor_bin: Option<PathBuf>,
    /// Keep the deployment (config, keys, logs, data) in this directory.
    #[arg(long)]
    keep_dir: Option<PathBuf>,
}

impl ProgramArgs {
    fn programs(&self) -> Result<Programs> {
        // One cargo build for every missing daemon (under `cargo run`).
        let unnamed: Vec<&str> = [
            ("zz-agreement", &self.agreement_bin),
            ("zz-hostd", &self.hostd_bin),
            ("zz-executor", &self.executor_bin),
        ]
        .into_iter()
        .filter(|(name, explicit)| {
            explicit.is_none() && std::env::var_os(zzctl::daemon_env_var(name)).is_none()
        })
        .map(|(name, _)| name)
        .collect();
        zzctl::build_missing_daemons(&unnamed)?;
        Ok(Programs {
            agreement: find_daemon(
                "zz-agreement",
                self.agreement_bin.clone(),
                "ZZ_AGREEMENT_BIN",
            )?,
            hostd: find_daemon("zz-hostd", self.hostd_bin.clone(), "ZZ_HOSTD_BIN")?,
            executor: find_daemon("zz-executor", self.executor_bin.clone(), "ZZ_EXECUTOR_BIN")?,
        })
    }
}

#[derive(Args, Debug)]
struct RecoveryArgs {
    /// Application state to preload, in MiB.
    #[arg(long, default_value_t = 16)]
    state_mib: u64,
    /// Bytes of each preloaded value (at most 65536).
    #[arg(long, default_value_t = 65536)]
    value_bytes: usize,
    /// Clients writing the preload in parallel.
    #[arg(long, default_value_t = 8)]
    preload_clients: usize,
    /// App sequence numbers between execution checkpoints (the preload is
    /// padded to a multiple of it; the load stays below the next one).
    #[arg(long, default_value_t = 4096)]
    checkpoint_interval: u64,
    /// Requests of the measuring client before the fault.
    #[arg(long, default_value_t = 200)]
    pre_fault_ops: u64,
    /// Longest wait, in seconds, for the woken replica's full state.
    #[arg(long, default_value_t = 600.0)]
    max_wait: f64,
    /// Where execution replicas run: `process` or `libvirt` (VMs booting
    /// the image of `zzctl image build`).
    #[arg(long, default_value = "process")]
    backend: String,
    /// libvirt: how the dormant replica waits, `paused` or `saved`.
    #[arg(long, default_value = "paused")]
    dormant: String,
    /// libvirt: memory of each VM in MiB.
    #[arg(long, default_value_t = 1024)]
    vm_memory: u32,
    /// libvirt: virtual CPUs of each VM.
    #[arg(long, default_value_t = 1)]
    vm_vcpus: u32,
    #[command(flatten)]
    programs: ProgramArgs,
}

#[derive(Args, Debug)]
struct TenantsArgs {
    /// Number of kv apps.
    #[arg(long, default_value_t = 4)]
    apps: u32,
    /// Faults tolerated (3f+1 agreement, 2f+1 execution replicas per app).
    #[arg(long, default_value_t = 1)]
    f: usize,
    /// zz: f+1 active execution replicas per app; full: all 2f+1.
    #[arg(long, default_value = "zz", value_parser = ["zz", "full"])]
    mode: String,
    /// blake3 rounds over 4 KiB per request (`kv+cpu=N`).
    #[arg(long, default_value_t = 200)]
    cpu_rounds: u32,
    /// Closed-loop clients per app.
    #[arg(long, default_value_t = 4)]
    clients_per_app: usize,
    /// Measured seconds.
    #[arg(long, default_value_t = 10.0)]
    duration: f64,
    /// Seconds of warm-up before measuring.
    #[arg(long, default_value_t = 2.0)]
    warmup: f64,
    #[command(flatten)]
    programs: ProgramArgs,
}

#[derive(Args, Debug)]
struct StatefetchArgs {
    /// Size of the application state.
    #[arg(long, default_value_t = 1024)]
    state_mib: u64,
    /// Pages changed between the two checkpoints measured.
    #[arg(long, default_value_t = 1000)]
    dirty_pages: u64,
}

#[derive(Args, Debug)]
struct AgreementArgs {
    /// Agreement replicas (3f+1).
    #[arg(long, default_value_t = 4)]
    replicas: usize,
    /// Closed-loop clients, each with one operation in flight.
    #[arg(long, default_value_t = 32)]
    clients: usize,
    /// Measured seconds.
    #[arg(long, default_value_t = 10.0)]
    duration: f64,
    /// Seconds of warm-up before measuring.
    #[arg(long, default_value_t = 1.0)]
    warmup: f64,
    /// Bytes per operation.
    #[arg(long, default_value_t = 0)]
    payload: usize,
    /// The zz-agreement executable (default: next to zzctl, or $ZZ_AGREEMENT_BIN).
    #[arg(long)]
    agreement_bin: Option<PathBuf>,
    /// Keep the deployment (config, keys, logs, data) in this directory.
    #[arg(long)]
    keep_dir: Option<PathBuf>,
    /// Client-side runtime threads (1: a single-threaded runtime).
    #[arg(long, default_value_t = 1)]
    client_threads: usize,
    /// Runtime threads of each daemon (its default: 1).
    #[arg(long)]
    daemon_threads: Option<usize>,
    /// The primary's limit of batches in flight.
    #[arg(long)]
    max_inflight_batches: Option<u64>,
    /// Most requests per batch.
    #[arg(long)]
    batch_max_requests: Option<usize>,
}

fn main() {
    let cli = Cli::parse();
    init_logging();
    if let Err(e) = run(cli) {
        eprintln!("zzctl: error: {e:#}");
        std::process::exit(zzctl::ops::exit_code(&e));
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Bench(Bench::Agreement(a)) => {
            let agreement_bin = find_daemon("zz-agreement", a.agreement_bin, "ZZ_AGREEMENT_BIN")?;
            let mut daemon_args = Vec::new();
            if let Some(t) = a.daemon_threads {
                daemon_args.extend(["--threads".to_string(), t.to_string()]);
            }
            if let Some(m) = a.max_inflight_batches {
                daemon_args.extend(["--max-inflight-batches".to_string(), m.to_string()]);
            }
            let mut tuning = AgreementTuning::default();
            if let Some(b) = a.batch_max_requests {
                tuning.batch_max_requests = b;
            }
            let bench = AgreementBench {
                replicas: a.replicas,
                clients: a.clients,
                duration: secs(a.duration, "duration")?,
                warmup: secs(a.warmup, "warmup")?,
                payload: a.payload,
                agreement_bin,
                daemon_args,
                client_threads: a.client_threads,
                tuning,
                keep_dir: a.keep_dir,
            };
            let report = run_agreement(&bench)?;
            eprintln!(
                "zzctl bench: {} ops in {:.1} s, {} errors",
                report.ops, report.seconds, report.errors
            );
            println!("{}", report.line());
            Ok(())
        }
        Command::Bench(Bench::Statefetch(a)) => {
            let exe = std::env::current_exe().context("locating the zzctl executable")?;
            let peer = zz_statefetch::bench::PeerCommand::new(exe, &["__statefetch-serve"]);
            let lines = zz_statefetch::bench::run(a.state_mib, a.dirty_pages, &peer)
                .context("running the statefetch benchmark")?;
            for line in lines {
                println!("{line}");
            }
            Ok(())
        }
        Command::Bench(Bench::Recovery(a)) => {
            if a.value_bytes > 65536 {
                anyhow::bail!("--value-bytes must be at most 65536 (the kv app's limit)");
            }
            let bench = RecoveryBench {
                state_mib: a.state_mib,
                value_bytes: a.value_bytes,
                preload_clients: a.preload_clients,
                checkpoint_interval: a.checkpoint_interval,
                pre_fault_ops: a.pre_fault_ops,
                max_wait: secs(a.max_wait, "max-wait")?,
                programs: a.programs.programs()?,
                keep_dir: a.programs.keep_dir.clone(),
                vm: match a.backend.as_str() {
                    "process" => None,
                    "libvirt" => Some(zzctl::bench_vm::VmSpec {
                        memory_mib: a.vm_memory,
                        vcpus: a.vm_vcpus,
                        ..zzctl::bench_vm::VmSpec::new(&a.dormant)?
                    }),
                    other => anyhow::bail!("--backend {other}: use process or libvirt"),
                },
            };
            let report = run_recovery(&bench)?;
            println!("{}", report.line());
            Ok(())
        }
        Command::Bench(Bench::Tenants(a)) => {
            let bench = TenantsBench {
                apps: a.apps,
                f: a.f,
                full: a.mode == "full",
                cpu_rounds: a.cpu_rounds,
                clients_per_app: a.clients_per_app,
                duration: secs(a.duration, "duration")?,
                warmup: secs(a.warmup, "warmup")?,
                programs: a.programs.programs()?,
                keep_dir: a.programs.keep_dir.clone(),
            };
            println!("{}", run_tenants(&bench)?);
            Ok(())
        }
        Command::Image(c) => zzctl::image::run(c),
        Command::StatefetchServe { args } => {
            zz_statefetch::bench::serve_main(args).context("serving pages for the benchmark")
        }
        Command::Ops(op) => {
            use clap::CommandFactory;
            zzctl::ops::run(op, &mut Cli::command())
        }
    }
}

/// `s` seconds, checked to be a non-negative finite number.
fn secs(s: f64, what: &str) -> Result<Duration> {
    if s.is_finite() && s >= 0.0 {
        Ok(Duration::from_secs_f64(s))
    } else {
        anyhow::bail!("--{what} must be a non-negative number of seconds")
    }
}

fn init_logging() {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .init();
}
