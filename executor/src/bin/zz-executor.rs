//! `zz-executor`: one execution replica of one app.
//!
//! ```text
//! ZZ_APP=1 ZZ_EXEC_INDEX=0 ZZ_STATE_DIR=/var/zz/a1e0 ZZ_SOCKET=/run/zz/a1e0.sock \
//!     zz-executor --config cluster.toml [--key-file exec.key]
//! ```
//!
//! Started by its host agent (`zz-hostd`), which sets the `ZZ_*` environment
//! (see `zz_executor::setup`). It opens its page store in the state folder,
//! connects to the host agent's socket, and serves until that stream
//! closes. Exit codes: 0 when the stream closed, 3 after an injected crash,
//! 1 on any error (bad environment, config or key, storage failure).

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Parser;
use zz_executor::driver::{self, Exit};
use zz_executor::setup::{executor_config, Identity};

/// One zz execution replica.
#[derive(Parser, Debug)]
#[command(name = "zz-executor", version, about)]
struct Args {
    /// The cluster configuration (TOML); default: $ZZ_CONFIG.
    #[arg(long)]
    config: Option<PathBuf>,
    /// This replica's private key file; default: $ZZ_KEY_FILE, else the
    /// `key_file` of its `[[executors]]` entry in the config.
    #[arg(long)]
    key_file: Option<PathBuf>,
}

fn main() {
    if std::process::id() == 1 {
        // PID 1 of a guest VM (the initramfs's /init): see zz_executor::guest.
        init_logging();
        guest_main();
    }
    let args = Args::parse();
    init_logging();
    match real_main(args) {
        Ok(Exit::StreamClosed) => {}
        Ok(Exit::Crashed) => std::process::exit(3),
        Err(e) => {
            eprintln!("zz-executor: error: {e:#}");
            std::process::exit(1);
        }
    }
}

/// Boots the guest, runs the executor over its virtio-serial port, and
/// powers the VM off when it ends. The environment comes from the kernel
/// command line; arguments are ignored (the kernel passes stray words).
fn guest_main() -> ! {
    let run = || -> Result<Exit> {
        let port = zz_executor::guest::boot().context("booting the guest")?;
        let id = Identity::from_env(None, None)?;
        let mut cfg = executor_config(&id)
            .with_context(|| format!("setting up app {} replica {}", id.app, id.index))?;
        // Answering the host's handshake from here on means "ready".
        cfg.stream = Some(zz_executor::guest::bridge(port).context("bridging the port")?);
        run_executor(cfg)
    };
    match run() {
        Ok(exit) => tracing::info!(?exit, "executor ended; powering off"),
        Err(e) => eprintln!("zz-executor: error: {e:#}"),
    }
    zz_executor::guest::power_off()
}

fn real_main(args: Args) -> Result<Exit> {
    let id = Identity::from_env(args.config, args.key_file)?;
    let cfg = executor_config(&id)
        .with_context(|| format!("setting up app {} replica {}", id.app, id.index))?;
    run_executor(cfg)
}

fn run_executor(cfg: zz_executor::driver::ExecutorConfig) -> Result<Exit> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .max_blocking_threads(8)
        .enable_all()
        .thread_name("zz-executor")
        .build()
        .context("starting the tokio runtime")?;
    let exit = rt.block_on(driver::run(cfg))?;
    // Background fetch tasks of a recovery may still be pending: don't wait.
    rt.shutdown_timeout(std::time::Duration::from_millis(200));
    Ok(exit)
}

fn init_logging() {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(false)
        .with_writer(std::io::stderr)
        .init();
}
