//! The operator commands of `zzctl`: everything that creates, runs, inspects
//! or drills a deployment (the benchmarks live in [`crate::bench`] and
//! [`crate::bench_zz`]).
//!
//! - [`init`]: keys and config (`zzctl init`), with executor placement over hosts;
//! - [`daemons`]: `zzctl up` / `zzctl down`: the deployment's daemons as
//!   detached processes with pid and log files under the deployment folder;
//! - [`status`]: `zzctl status [--json]`, merged from every daemon's `/status`;
//! - [`kv`]: `zzctl kv put|get|del` through the client library;
//! - [`operator`]: `zzctl activate` and `zzctl fault`, signed with the operator key;
//! - [`crate::demo`]: `zzctl demo`.
//!
//! # Exit codes
//!
//! | code | meaning |
//! |---|---|
//! | 0 | success |
//! | 1 | the operation failed (a daemon exited, a request timed out, a check of the demo failed) |
//! | 2 | bad command line (clap's usage errors) |
//! | 3 | invalid config or missing keys: nothing was started |
//! | 4 | the deployment is not running or not reachable |
//! | 5 | the deployment refused the command (e.g. fault injection not allowed) |

pub mod daemons;
pub mod init;
pub mod kv;
pub mod operator;
pub mod status;

use std::path::{Path, PathBuf};

use clap::{Args, Subcommand};
use zz_wire::config::{ClusterConfig, ConfigError};

/// The name of the config file inside a deployment folder.
pub const CONFIG_FILE: &str = "cluster.toml";

/// Exit codes of `zzctl` (see the module documentation).
pub mod exit {
    pub const FAILED: i32 = 1;
    pub const USAGE: i32 = 2;
    pub const BAD_CONFIG: i32 = 3;
    pub const NOT_RUNNING: i32 = 4;
    pub const REFUSED: i32 = 5;
}

/// The exit codes, as `zzctl --help` shows them.
pub const EXIT_CODES_HELP: &str =
    "Exit codes: 0 success; 1 the operation failed; 2 bad command line; \
3 invalid config or missing keys (nothing was started); 4 the deployment is not running or not \
reachable; 5 the deployment refused the command.";

/// An error that decides `zzctl`'s exit code. Anything else exits 1.
#[derive(Debug, thiserror::Error)]
pub enum OpsError {
    #[error("{0}")]
    BadConfig(String),
    #[error("{0}")]
    NotRunning(String),
    #[error("{0}")]
    Refused(String),
    #[error("{0}")]
    Usage(String),
}

impl OpsError {
    pub fn code(&self) -> i32 {
        match self {
            OpsError::BadConfig(_) => exit::BAD_CONFIG,
            OpsError::NotRunning(_) => exit::NOT_RUNNING,
            OpsError::Refused(_) => exit::REFUSED,
            OpsError::Usage(_) => exit::USAGE,
        }
    }
}

/// The exit code for an error returned by a command.
pub fn exit_code(e: &anyhow::Error) -> i32 {
    for cause in e.chain() {
        if let Some(o) = cause.downcast_ref::<OpsError>() {
            return o.code();
        }
        if cause.downcast_ref::<ConfigError>().is_some() {
            return exit::BAD_CONFIG;
        }
    }
    exit::FAILED
}

/// Loads and validates the config of the deployment in `dir`, with every
/// key file present; a problem is a [`OpsError::BadConfig`] naming the field.
pub fn load_config(dir: &Path) -> anyhow::Result<ClusterConfig> {
    let path = dir.join(CONFIG_FILE);
    if !path.is_file() {
        return Err(OpsError::BadConfig(format!(
            "no deployment in {}: {} does not exist; create one with `zzctl init --dir {}`",
            dir.display(),
            path.display(),
            dir.display()
        ))
        .into());
    }
    let cfg = ClusterConfig::load(&path).map_err(|e| {
        OpsError::BadConfig(format!(
            "{e} (fix {} or run `zzctl init` again)",
            path.display()
        ))
    })?;
    cfg.check_key_files()
        .map_err(|e| OpsError::BadConfig(e.to_string()))?;
    Ok(cfg)
}

/// The deployment folder argument shared by the commands.
#[derive(Args, Debug, Clone)]
pub struct DirArg {
    /// The deployment folder (written by `zzctl init`).
    #[arg(long, default_value = "zz-deploy")]
    pub dir: PathBuf,
}

/// `zzctl` operator subcommands (flattened into the top-level command).
#[derive(Subcommand, Debug)]
pub enum OpsCommand {
    /// Write keys and config of a deployment.
    Init(init::InitArgs),
    /// Start the deployment's daemons on this machine (idempotent).
    Up(daemons::UpArgs),
    /// Stop every daemon of the deployment (idempotent).
    Down(daemons::DownArgs),
    /// Show the agreement cluster and every execution replica.
    Status(status::StatusArgs),
    /// Read and write a kv app.
    #[command(subcommand)]
    Kv(kv::KvCommand),
    /// Ask for a dormant execution replica to be woken (operator-signed,
    /// through the same f+1 path as a suspicion).
    Activate(operator::ActivateArgs),
    /// Inject a fault into an execution replica, for drills (only where the
    /// config sets execution.allow_fault_injection).
    Fault(operator::FaultArgs),
    /// Run the demo: a local f=1 deployment with two kv apps, a fault, its
    /// detection and repair, then a summary.
    Demo(crate::demo::DemoArgs),
    /// Print a shell completion script.
    Completions {
        /// bash, zsh, fish, elvish or powershell.
        shell: clap_complete::Shell,
    },
}

/// Runs an operator subcommand; `cmd` is the whole CLI (for completions).
pub fn run(op: OpsCommand, cmd: &mut clap::Command) -> anyhow::Result<()> {
    match op {
        OpsCommand::Init(a) => init::run(&a),
        OpsCommand::Up(a) => daemons::up(&a),
        OpsCommand::Down(a) => daemons::down(&a),
        OpsCommand::Status(a) => status::run(&a),
        OpsCommand::Kv(k) => kv::run(&k),
        OpsCommand::Activate(a) => operator::activate(&a),
        OpsCommand::Fault(a) => operator::fault(&a),
        OpsCommand::Demo(a) => crate::demo::run(&a),
        OpsCommand::Completions { shell } => {
            let name = cmd.get_name().to_string();
            clap_complete::generate(shell, cmd, name, &mut std::io::stdout());
            Ok(())
        }
    }
}

/// A current-thread tokio runtime for one command.
pub fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?)
}
