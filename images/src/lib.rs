//! Builds zz's guest image (DESIGN §6): what every execution-replica VM of
//! the libvirt backend boots. `zzctl image build` calls [`build`].
//!
//! The image is two files in the output folder (default
//! `target/zz-image/`):
//!
//! - `vmlinuz`: the kernel of Debian's cloud kernel package
//!   (`linux-image-cloud-amd64` names the current one), fetched with
//!   `apt-get download` into `cache/` and unpacked with `dpkg-deb -x`, never
//!   installed;
//! - `initrd.cpio`: an uncompressed newc initramfs (written with `cpio`)
//!   holding `/init`, the statically linked `zz-executor`, and the virtio
//!   modules it loads itself (`/lib/modules/*.ko`, see `zz_executor::guest`).
//!
//! The executor is built with `cargo build --release --target
//! x86_64-unknown-linux-gnu` and `RUSTFLAGS='-C target-feature=+crt-static'`
//! into its own target folder (`target/guest`), so the flags never
//! invalidate the workspace's normal build cache.
//!
//! A rebuild with nothing changed does nothing: cargo's own check is a
//! no-op, the kernel package stays in the cache, and the initramfs is only
//! rewritten when the hash of its inputs (recorded in `initrd.stamp`)
//! changes. Files in the initramfs get mtime 0 and owner root, so the same
//! inputs give the same bytes.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::SystemTime;

/// The Debian meta-package naming the current cloud kernel.
pub const KERNEL_META_PACKAGE: &str = "linux-image-cloud-amd64";
/// The Rust target of the guest executor.
pub const GUEST_TARGET: &str = "x86_64-unknown-linux-gnu";
/// Modules the guest loads (as `zz_executor::guest::MODULES`).
pub const MODULES: &[&str] = &[
    "virtio_ring",
    "virtio",
    "virtio_pci_legacy_dev",
    "virtio_pci_modern_dev",
    "virtio_pci",
    "virtio_console",
    "virtio_blk",
];
/// Bumped when the layout of the initramfs changes.
const FORMAT: &str = "zz-initramfs-1";

/// Why the image could not be built; each names what to do.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("`{cmd}` failed: {detail}")]
    Command { cmd: String, detail: String },
    #[error(
        "no kernel package: `apt-cache depends {KERNEL_META_PACKAGE}` names none; \
         run `apt-get update` (Debian with the main archive is required)"
    )]
    NoKernelPackage,
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{0} not found in the kernel package; is it a Debian cloud kernel?")]
    MissingInPackage(String),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> ImageError + '_ {
    move |source| ImageError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// What [`build`] needs.
#[derive(Clone, Debug)]
pub struct BuildOptions {
    /// The workspace root (holds `Cargo.toml` and `target/`).
    pub workspace: PathBuf,
    /// Where the image goes.
    pub out: PathBuf,
    /// The cargo program.
    pub cargo: PathBuf,
    /// A kernel package to use instead of the one the meta-package names.
    pub kernel_package: Option<String>,
}

impl BuildOptions {
    /// Defaults: output in `<workspace>/target/zz-image`, `$CARGO` or `cargo`.
    pub fn new(workspace: impl Into<PathBuf>) -> Self {
        let workspace = workspace.into();
        BuildOptions {
            out: default_image_dir(&workspace),
            cargo: std::env::var_os("CARGO")
                .map(PathBuf::from)
                .unwrap_or_else(|| PathBuf::from("cargo")),
            workspace,
            kernel_package: None,
        }
    }
}

/// The default image folder of a workspace.
pub fn default_image_dir(workspace: &Path) -> PathBuf {
    workspace.join("target").join("zz-image")
}

/// The built image.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Image {
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    pub kernel_package: String,
    /// False when everything was up to date.
    pub changed: bool,
}

fn run(cmd: &mut Command) -> Result<String, ImageError> {
    let shown = format!("{cmd:?}");
    let out = cmd
        .stderr(Stdio::piped())
        .stdout(Stdio::piped())
        .output()
        .map_err(|e| ImageError::Command {
            cmd: shown.clone(),
            detail: e.to_string(),
        })?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        let tail: Vec<&str> = err.lines().rev().take(15).collect();
        return Err(ImageError::Command {
            cmd: shown,
            detail: format!(
                "{}\n{}",
                out.status,
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            ),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Builds (or confirms up to date) the guest image, reporting each step.
pub fn build(opts: &BuildOptions, progress: &mut dyn FnMut(&str)) -> Result<Image, ImageError> {
    fs::create_dir_all(&opts.out).map_err(io(&opts.out))?;
    progress("building the static zz-executor (cargo, target/guest)");
    let executor = build_executor(opts)?;

    let package = match &opts.kernel_package {
        Some(p) => p.clone(),
        None => kernel_package()?,
    };
    let cache = opts.out.join("cache");
    fs::create_dir_all(&cache).map_err(io(&cache))?;
    let root = cache.join(&package);
    if !root.join(".unpacked").is_file() {
        progress(&format!("downloading {package} (apt-get download)"));
        let deb = download(&cache, &package)?;
        progress(&format!("unpacking {}", deb.display()));
        let _ = fs::remove_dir_all(&root);
        run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&root))?;
        fs::write(root.join(".unpacked"), b"").map_err(io(&root))?;
        let _ = fs::remove_file(&deb);
    } else {
        progress(&format!("kernel package {package}: cached"));
    }
    let vmlinuz = find_file(&root.join("boot"), |n| n.starts_with("vmlinuz-"))?
        .ok_or_else(|| ImageError::MissingInPackage("boot/vmlinuz-*".into()))?;
    let modules_root = root.join("lib").join("modules");
    let mut modules = Vec::new();
    for m in MODULES {
        let name = format!("{m}.ko");
        let p = find_recursive(&modules_root, &name)?
            .ok_or_else(|| ImageError::MissingInPackage(name.clone()))?;
        modules.push((name, p));
    }

    let kernel = opts.out.join("vmlinuz");
    let initrd = opts.out.join("initrd.cpio");
    let stamp_path = opts.out.join("initrd.stamp");
    let mut hasher = blake3::Hasher::new();
    hasher.update(FORMAT.as_bytes());
    hasher.update(package.as_bytes());
    let mut hash_file = |p: &Path| -> Result<(), ImageError> {
        hasher.update(&fs::read(p).map_err(io(p))?);
        Ok(())
    };
    hash_file(&executor)?;
    for (_, p) in &modules {
        hash_file(p)?;
    }
    let stamp = hex::encode(hasher.finalize().as_bytes());
    let mut changed = false;
    if !same_file(&vmlinuz, &kernel) {
        progress(&format!("copying the kernel to {}", kernel.display()));
        copy_atomic(&vmlinuz, &kernel)?;
        changed = true;
    }
    let current = fs::read_to_string(&stamp_path).unwrap_or_default();
    if current.trim() != stamp || !initrd.is_file() {
        progress(&format!("writing the initramfs {}", initrd.display()));
        write_initramfs(&opts.out, &executor, &modules, &initrd)?;
        fs::write(&stamp_path, format!("{stamp}\n")).map_err(io(&stamp_path))?;
        changed = true;
    }
    progress(if changed {
        "guest image built"
    } else {
        "guest image up to date; nothing to do"
    });
    Ok(Image {
        kernel,
        initrd,
        kernel_package: package,
        changed,
    })
}

fn build_executor(opts: &BuildOptions) -> Result<PathBuf, ImageError> {
    let target_dir = opts.workspace.join("target").join("guest");
    let mut cmd = Command::new(&opts.cargo);
    cmd.current_dir(&opts.workspace)
        .args([
            "build",
            "--release",
            "-p",
            "zz-executor",
            "--bin",
            "zz-executor",
            "--target",
            GUEST_TARGET,
        ])
        .arg("--target-dir")
        .arg(&target_dir)
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .env(
            "RUSTFLAGS",
            "-C target-feature=+crt-static -C strip=debuginfo",
        )
        .stdin(Stdio::null());
    run(&mut cmd)?;
    let exe = target_dir
        .join(GUEST_TARGET)
        .join("release")
        .join("zz-executor");
    if !exe.is_file() {
        return Err(ImageError::Io {
            path: exe,
            source: std::io::Error::new(std::io::ErrorKind::NotFound, "cargo built no binary"),
        });
    }
    Ok(exe)
}

/// The kernel package the meta-package currently depends on.
fn kernel_package() -> Result<String, ImageError> {
    let out = run(Command::new("apt-cache").args(["depends", KERNEL_META_PACKAGE]))?;
    out.lines()
        .filter_map(|l| l.trim().strip_prefix("Depends:"))
        .map(|p| p.trim().to_string())
        .find(|p| p.starts_with("linux-image-") && p.ends_with("-cloud-amd64"))
        .ok_or(ImageError::NoKernelPackage)
}

fn download(cache: &Path, package: &str) -> Result<PathBuf, ImageError> {
    run(Command::new("apt-get")
        .args(["download", "-q", package])
        .current_dir(cache))?;
    find_file(cache, |n| {
        n.starts_with(&format!("{package}_")) && n.ends_with(".deb")
    })?
    .ok_or_else(|| ImageError::Command {
        cmd: format!("apt-get download {package}"),
        detail: "no .deb was written".into(),
    })
}

fn find_file(dir: &Path, pred: impl Fn(&str) -> bool) -> Result<Option<PathBuf>, ImageError> {
    let mut hits: Vec<PathBuf> = fs::read_dir(dir)
        .map_err(io(dir))?
        .flatten()
        .filter(|e| pred(&e.file_name().to_string_lossy()))
        .map(|e| e.path())
        .collect();
    hits.sort();
    Ok(hits.pop())
}

fn find_recursive(dir: &Path, name: &str) -> Result<Option<PathBuf>, ImageError> {
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d).map_err(io(&d))?.flatten() {
            let ft = e.file_type().map_err(io(&e.path()))?;
            if ft.is_dir() {
                stack.push(e.path());
            } else if e.file_name() == name {
                return Ok(Some(e.path()));
            }
        }
    }
    Ok(None)
}

fn same_file(a: &Path, b: &Path) -> bool {
    match (fs::read(a), fs::read(b)) {
        (Ok(x), Ok(y)) => x == y,
        _ => false,
    }
}

fn copy_atomic(from: &Path, to: &Path) -> Result<(), ImageError> {
    let tmp = to.with_extension("tmp");
    fs::copy(from, &tmp).map_err(io(&tmp))?;
    fs::rename(&tmp, to).map_err(io(to))
}

/// Stages the initramfs tree and archives it with `cpio -o -H newc`.
fn write_initramfs(
    out: &Path,
    executor: &Path,
    modules: &[(String, PathBuf)],
    initrd: &Path,
) -> Result<(), ImageError> {
    use std::os::unix::fs::PermissionsExt;
    let stage = out.join(".initramfs");
    let _ = fs::remove_dir_all(&stage);
    let mut entries = Vec::new();
    for d in ["dev", "lib", "lib/modules", "proc", "state", "sys"] {
        let p = stage.join(d);
        fs::create_dir_all(&p).map_err(io(&p))?;
        entries.push(d.to_string());
    }
    let init = stage.join("init");
    fs::copy(executor, &init).map_err(io(&init))?;
    fs::set_permissions(&init, fs::Permissions::from_mode(0o755)).map_err(io(&init))?;
    entries.push("init".into());
    for (name, p) in modules {
        let dst = stage.join("lib/modules").join(name);
        fs::copy(p, &dst).map_err(io(&dst))?;
        fs::set_permissions(&dst, fs::Permissions::from_mode(0o644)).map_err(io(&dst))?;
        entries.push(format!("lib/modules/{name}"));
    }
    entries.sort();
    // Same bytes for the same inputs: every mtime is the epoch.
    for e in entries.iter().rev() {
        let p = stage.join(e);
        let f = fs::File::open(&p).map_err(io(&p))?;
        f.set_modified(SystemTime::UNIX_EPOCH).map_err(io(&p))?;
    }
    let tmp = initrd.with_extension("tmp");
    let archive = fs::File::create(&tmp).map_err(io(&tmp))?;
    let mut child = Command::new("cpio")
        .args(["-o", "-H", "newc", "--quiet", "--reproducible", "-R", "0:0"])
        .current_dir(&stage)
        .stdin(Stdio::piped())
        .stdout(archive)
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| ImageError::Command {
            cmd: "cpio".into(),
            detail: format!(
                "{e}; install it (apt-get install cpio, or bash scripts/setup-libvirt)"
            ),
        })?;
    {
        let mut stdin = child.stdin.take().expect("piped");
        let list: String = entries.iter().map(|e| format!("{e}\n")).collect();
        stdin
            .write_all(list.as_bytes())
            .map_err(io(Path::new("cpio stdin")))?;
    }
    let out = child.wait_with_output().map_err(io(Path::new("cpio")))?;
    if !out.status.success() {
        return Err(ImageError::Command {
            cmd: "cpio -o -H newc".into(),
            detail: String::from_utf8_lossy(&out.stderr).into_owned(),
        });
    }
    fs::rename(&tmp, initrd).map_err(io(initrd))?;
    let _ = fs::remove_dir_all(&stage);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn files_are_found_by_predicate_and_recursively() {
        let d = tempfile::tempdir().unwrap();
        fs::create_dir_all(d.path().join("a/b")).unwrap();
        fs::write(d.path().join("a/b/virtio.ko"), b"x").unwrap();
        fs::write(d.path().join("vmlinuz-6.1"), b"k").unwrap();
        assert_eq!(
            find_recursive(d.path(), "virtio.ko").unwrap(),
            Some(d.path().join("a/b/virtio.ko"))
        );
        assert_eq!(find_recursive(d.path(), "nope.ko").unwrap(), None);
        assert_eq!(
            find_file(d.path(), |n| n.starts_with("vmlinuz-")).unwrap(),
            Some(d.path().join("vmlinuz-6.1"))
        );
    }

    #[test]
    fn the_module_list_matches_the_guest() {
        // virtio_console carries the port, virtio_blk the state disk.
        assert!(MODULES.contains(&"virtio_console") && MODULES.contains(&"virtio_blk"));
        assert_eq!(MODULES.first(), Some(&"virtio_ring"));
    }
}
