//! zzctl, the operator CLI of zz, as a library: the binary is a thin clap
//! front end over these modules.
//!
//! - [`bench`](mod@bench): benchmarks that start a local deployment and print one
//!   machine-readable line.
//! - [`bench_zz`]: benchmarks of the whole system as processes (agreement
//!   daemons, a host agent and its execution replicas): recovery from a
//!   wrong-reply fault, and several tenants under load.
//! - [`ops`]: the operator commands (init, up, down, status, kv, activate,
//!   fault, completions) and their exit codes.
//! - [`demo`]: `zzctl demo`, a whole fault-and-repair cycle on this machine.
//! - [`bench_vm`]: `--backend libvirt` for those: execution replicas as VMs.
//! - [`image`]: `zzctl image build`, the guest VM image (crate `zz-images`).
//!
//! Local deployments (config, keys, daemon processes) are written and run by
//! [`zz_client::deploy`].

pub mod bench;
pub mod bench_vm;
pub mod bench_zz;
pub mod demo;
pub mod image;
pub mod ops;

use std::path::PathBuf;

use anyhow::{bail, Context, Result};

/// Finds a zz daemon executable: `explicit` if given, else `$env_var`, else
/// next to the running zzctl (where cargo puts every binary of the workspace).
pub fn find_daemon(name: &str, explicit: Option<PathBuf>, env_var: &str) -> Result<PathBuf> {
    if let Some(p) = explicit.or_else(|| std::env::var_os(env_var).map(PathBuf::from)) {
        if !p.is_file() {
            bail!(
                "{name} binary not found at {} (given by --{name}-bin or ${env_var})",
                p.display()
            );
        }
        return Ok(p);
    }
    let exe = std::env::current_exe().context("locating the zzctl executable")?;
    let dir = exe
        .parent()
        .context("zzctl executable has no parent directory")?;
    let p = dir.join(name);
    if !p.is_file() {
        let profile = if dir.ends_with("release") {
            " --release"
        } else {
            ""
        };
        bail!(
            "{name} binary not found at {}; build it first with `cargo build{profile} -p zz-agreement`, \
             or point ${env_var} at it",
            p.display()
        );
    }
    Ok(p)
}
