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

/// The daemon executables zzctl starts, with the package that builds each.
pub const DAEMON_PACKAGES: [(&str, &str); 3] = [
    ("zz-agreement", "zz-agreement"),
    ("zz-hostd", "zz-hypervisor"),
    ("zz-executor", "zz-executor"),
];

/// The environment variable that points at a daemon: `$ZZ_AGREEMENT_BIN`,
/// `$ZZ_HOSTD_BIN`, `$ZZ_EXECUTOR_BIN`.
pub fn daemon_env_var(name: &str) -> String {
    format!("ZZ_{}_BIN", name.trim_start_matches("zz-").to_uppercase())
}

/// Finds a zz daemon executable: `explicit` if given, else `$env_var`, else
/// next to the running zzctl (where cargo puts every binary of the workspace).
///
/// Under `cargo run` (which sets `$CARGO` and `$CARGO_MANIFEST_DIR`), a daemon
/// missing from beside zzctl is built first with zzctl's profile, so that
/// `cargo run --release -p zzctl -- bench ...` works on a fresh clone: cargo
/// builds only the binaries of the package it runs.
pub fn find_daemon(name: &str, explicit: Option<PathBuf>, env_var: &str) -> Result<PathBuf> {
    let explicit = explicit.or_else(|| std::env::var_os(env_var).map(PathBuf::from));
    if explicit.is_none() {
        build_missing_daemons(&[name])?;
    }
    locate_daemon(name, explicit, env_var)
}

/// Builds those of `names` that are not beside zzctl (and not given by their
/// environment variable), in one `cargo build`, when running under `cargo
/// run`. Outside cargo it does nothing: [`find_daemon`] then says what to build.
pub fn build_missing_daemons(names: &[&str]) -> Result<()> {
    let missing: Vec<(&str, &str)> = DAEMON_PACKAGES
        .iter()
        .copied()
        .filter(|(name, _)| names.contains(name))
        .filter(|(name, _)| locate_daemon(name, None, &daemon_env_var(name)).is_err())
        .collect();
    let (false, Some(cargo), Some(_)) = (
        missing.is_empty(),
        std::env::var_os("CARGO"),
        std::env::var_os("CARGO_MANIFEST_DIR"),
    ) else {
        return Ok(());
    };
    let exe = std::env::current_exe().context("locating the zzctl executable")?;
    let release = exe.parent().is_some_and(|d| d.ends_with("release"));
    let mut cmd = std::process::Command::new(cargo);
    cmd.arg("build").arg("--bins");
    if release {
        cmd.arg("--release");
    }
    for (_, pkg) in &missing {
        cmd.args(["-p", pkg]);
    }
    let list: Vec<&str> = missing.iter().map(|(n, _)| *n).collect();
    eprintln!(
        "zzctl: building the daemons first ({}); this happens once",
        list.join(", ")
    );
    let st = cmd
        .status()
        .context("running cargo build for the daemons")?;
    if !st.success() {
        let profile = if release { " --release" } else { "" };
        bail!("building the daemons failed ({st}); run `cargo build{profile} --bins` and retry");
    }
    Ok(())
}

/// Finds a daemon without building anything.
fn locate_daemon(name: &str, explicit: Option<PathBuf>, env_var: &str) -> Result<PathBuf> {
    if let Some(p) = explicit {
        if !p.is_file() {
            bail!(
                "{name} binary not found at {} (given by --{}-bin or ${env_var})",
                p.display(),
                name.trim_start_matches("zz-")
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
        let pkg = DAEMON_PACKAGES
            .iter()
            .find(|(n, _)| *n == name)
            .map_or(name, |(_, pkg)| *pkg);
        bail!(
            "{name} binary not found at {}; build it first with `cargo build{profile} -p {pkg}`, \
             or point ${env_var} at it",
            p.display()
        );
    }
    Ok(p)
}
