//! `zzctl image build`: builds the guest VM image of the libvirt backend
//! (kernel and initramfs, see `zz_images`), printing each step.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Subcommand;

/// `zzctl image ...`
#[derive(Subcommand, Debug)]
pub enum ImageCommand {
    /// Build the guest image (kernel + initramfs with the static
    /// zz-executor as /init); does nothing when it is up to date.
    Build {
        /// Output folder (default: target/zz-image in the workspace).
        #[arg(long)]
        out: Option<PathBuf>,
        /// The workspace to build zz-executor from (default: this zzctl's).
        #[arg(long)]
        workspace: Option<PathBuf>,
    },
}

/// The workspace this zzctl was built from.
pub fn workspace_root() -> PathBuf {
    let manifest = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    manifest.parent().map(PathBuf::from).unwrap_or(manifest)
}

/// Runs an image command.
pub fn run(cmd: ImageCommand) -> Result<()> {
    match cmd {
        ImageCommand::Build { out, workspace } => {
            let mut opts = zz_images::BuildOptions::new(workspace.unwrap_or_else(workspace_root));
            if let Some(o) = out {
                opts.out = o;
            }
            let start = std::time::Instant::now();
            let image = zz_images::build(&opts, &mut |step| {
                eprintln!("[{:6.1}s] {step}", start.elapsed().as_secs_f64())
            })
            .context("building the guest image")?;
            println!(
                "kernel={} initrd={} package={} changed={}",
                image.kernel.display(),
                image.initrd.display(),
                image.kernel_package,
                image.changed
            );
            Ok(())
        }
    }
}
