//! `zzctl init`: writes a deployment's config and keys.
//!
//! The agreement replicas, clients and operator key come from
//! [`zz_client::deploy::write_local`]; this adds the hosts (one host agent
//! each), the apps and their 2f+1 execution replicas. Replica `i` of the
//! `a`-th app goes to host `(a + i) mod H`: with at least 2f+1 hosts every
//! app's replicas are on distinct hosts (one host failing takes at most one
//! replica of each app), and the active replicas of different apps are
//! spread over the hosts; with fewer hosts they are spread as evenly as
//! possible.
//!
//! Every daemon gets a free port on the listen address (and a metrics port)
//! at init time; the ports are fixed in the config from then on.

use std::net::{IpAddr, SocketAddr, ToSocketAddrs};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use clap::Args;
use zz_client::deploy::{free_addrs_avoiding, write_local, DeployOptions};
use zz_wire::config::{
    write_key_file, AppEntry, ClusterConfig, ExecutorEntry, HostEntry, KNOWN_APP_KINDS,
};
use zz_wire::crypto::KeyPair;

use super::{OpsError, CONFIG_FILE};

/// Port a remote host agent listens on for agreement replicas (its metrics
/// are on the next port).
pub const REMOTE_HOSTD_PORT: u16 = 7100;

#[derive(Args, Debug, Clone)]
pub struct InitArgs {
    /// Directory to write (created if needed; an existing deployment there is replaced).
    #[arg(long)]
    pub dir: PathBuf,
    /// Faults tolerated: 3f+1 agreement replicas, 2f+1 execution replicas per app.
    #[arg(long, default_value_t = 1)]
    pub f: usize,
    /// Apps, as `NAME[:KIND]` (KIND: kv, the default, or null).
    #[arg(long, value_delimiter = ',', default_value = "kv1,kv2")]
    pub apps: Vec<String>,
    /// Backend of the execution replicas.
    #[arg(long, default_value = "process", value_parser = ["process", "libvirt"])]
    pub backend: String,
    /// Hosts with a host agent each: `local` (this machine) or, with the
    /// libvirt backend, a libvirt URI (`qemu+ssh://server/system`). Default: one local host.
    #[arg(long, value_delimiter = ',')]
    pub hosts: Vec<String>,
    /// Allow `zzctl fault` drills in this deployment.
    #[arg(long)]
    pub allow_fault_injection: bool,
    /// Clients to create keys for.
    #[arg(long, default_value_t = 4)]
    pub clients: usize,
    /// Address the agreement replicas and local host agents listen on.
    #[arg(long, default_value = "127.0.0.1")]
    pub listen: IpAddr,
    /// Log level of every daemon (a tracing filter; $RUST_LOG overrides it).
    #[arg(long, default_value = "info")]
    pub log_level: String,
    /// Dormant replicas wait `paused` (in memory) or `saved` (on disk).
    #[arg(long, default_value = "paused", value_parser = ["paused", "saved"])]
    pub dormant: String,
    /// App sequence numbers between execution checkpoints.
    #[arg(long, default_value_t = 128)]
    pub checkpoint_interval: u64,
    /// Floor, in milliseconds, of the adaptive execution timeout after which
    /// silent execution replicas are suspected (config default: 200).
    #[arg(long)]
    pub exec_timeout_ms: Option<u64>,
}

/// One parsed `--apps` item.
fn parse_app(item: &str, id: u32) -> Result<AppEntry> {
    let (name, kind) = match item.split_once(':') {
        Some((n, k)) => (n.trim(), k.trim()),
        None => (item.trim(), "kv"),
    };
    if name.is_empty()
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
    {
        return Err(OpsError::Usage(format!(
            "--apps: app name {name:?} must be letters, digits, - or _"
        ))
        .into());
    }
    if !KNOWN_APP_KINDS.contains(&kind) {
        return Err(OpsError::Usage(format!(
            "--apps: unknown app kind `{kind}` for `{name}`; use one of: {}",
            KNOWN_APP_KINDS.join(", ")
        ))
        .into());
    }
    if !["kv", "null"].contains(&kind) {
        return Err(OpsError::Usage(format!(
            "--apps: `{kind}` apps run inside the agreement replicas and have no execution replicas; \
             zzctl deploys `kv` or `null` apps"
        ))
        .into());
    }
    Ok(AppEntry {
        id,
        name: name.to_string(),
        kind: kind.to_string(),
    })
}

/// The host agent address for a libvirt URI naming a remote server.
fn remote_addr(uri: &str) -> Result<Option<SocketAddr>> {
    let rest = uri.split_once("://").map(|(_, r)| r).unwrap_or("");
    let host = rest.split('/').next().unwrap_or("");
    let host = host.rsplit('@').next().unwrap_or(host);
    let host = host.split(':').next().unwrap_or(host);
    if host.is_empty() {
        return Ok(None);
    }
    let addr = (host, REMOTE_HOSTD_PORT)
        .to_socket_addrs()
        .with_context(|| format!("--hosts: cannot resolve `{host}` from {uri}"))?
        .next()
        .with_context(|| format!("--hosts: `{host}` has no address"))?;
    Ok(Some(addr))
}

/// Writes the deployment; returns the config path.
pub fn write(a: &InitArgs) -> Result<PathBuf> {
    if a.f == 0 {
        return Err(OpsError::Usage("--f must be at least 1".into()).into());
    }
    if a.apps.is_empty() {
        return Err(OpsError::Usage("--apps: give at least one app".into()).into());
    }
    let apps: Vec<AppEntry> = a
        .apps
        .iter()
        .enumerate()
        .map(|(i, s)| parse_app(s, i as u32 + 1))
        .collect::<Result<_>>()?;
    let mut names = std::collections::HashSet::new();
    for app in &apps {
        if !names.insert(app.name.clone()) {
            return Err(OpsError::Usage(format!("--apps: `{}` is listed twice", app.name)).into());
        }
    }
    let hosts_arg: Vec<String> = if a.hosts.is_empty() {
        vec!["local".into()]
    } else {
        a.hosts.clone()
    };
    let opts = DeployOptions {
        f: a.f,
        clients: a.clients.max(1),
        apps: vec![],
        host: a.listen,
        metrics: true,
        log_level: Some(a.log_level.clone()),
        ..DeployOptions::default()
    };
    let dir = &a.dir;
    let running = super::daemons::deployment_processes(&super::daemons::config_path(dir));
    if !running.is_empty() {
        return Err(OpsError::Refused(format!(
            "a deployment is running in {} (pids {running:?}); stop it with `zzctl down --dir {}` \
             before writing a new one there",
            dir.display(),
            dir.display()
        ))
        .into());
    }
    let d = write_local(dir, &opts)
        .with_context(|| format!("writing the deployment to {}", dir.display()))?;
    let mut cfg: ClusterConfig = d.config.clone();
    for (h, spec) in hosts_arg.iter().enumerate() {
        let name = format!("h{h}");
        let local = spec == "local" || spec.starts_with("qemu:///");
        if a.backend == "process" && spec != "local" {
            return Err(OpsError::Usage(format!(
                "--hosts: `{spec}`: the process backend runs replicas on this machine only; \
                 use `local` entries, or --backend libvirt with libvirt URIs"
            ))
            .into());
        }
        let (addr, metrics) = if local {
            let p = free_addrs_avoiding(a.listen, 2, &cfg.listen_addrs())?;
            (p[0], Some(p[1]))
        } else {
            let addr = remote_addr(spec)?.ok_or_else(|| {
                OpsError::Usage(format!(
                    "--hosts: `{spec}` is not a libvirt URI with a host"
                ))
            })?;
            (addr, Some(SocketAddr::new(addr.ip(), addr.port() + 1)))
        };
        cfg.hosts.push(HostEntry {
            name,
            addr,
            backend: a.backend.clone(),
            // A host agent runs on its server and drives the local libvirt
            // (its replicas' virtio-serial sockets are local files there);
            // the URI given names the server.
            libvirt_uri: (a.backend == "libvirt").then(|| {
                if spec == "local" || !local {
                    "qemu:///system".to_string()
                } else {
                    spec.clone()
                }
            }),
            metrics_addr: metrics,
        });
    }
    let per_app = 2 * a.f + 1;
    let nhosts = cfg.hosts.len();
    for (k, app) in apps.iter().enumerate() {
        cfg.apps.push(app.clone());
        for index in 0..per_app as u32 {
            let key = KeyPair::generate();
            let key_file = PathBuf::from(format!("keys/exec-{}-{index}.key", app.id));
            write_key_file(&dir.join(&key_file), &key)?;
            cfg.executors.push(ExecutorEntry {
                app: app.id,
                index,
                host: cfg.hosts[(k + index as usize) % nhosts].name.clone(),
                public_key: hex(key.public().as_bytes()),
                key_file,
            });
        }
    }
    cfg.execution.allow_fault_injection = a.allow_fault_injection;
    cfg.execution.dormant = a.dormant.clone();
    cfg.execution.checkpoint_interval = a.checkpoint_interval.max(1);
    if let Some(t) = a.exec_timeout_ms {
        cfg.execution.timeout_min_ms = t.max(1);
    }
    cfg.validate()
        .map_err(|e| OpsError::BadConfig(e.to_string()))?;
    let path = dir.join(CONFIG_FILE);
    cfg.save(&path)?;
    Ok(path)
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// `zzctl init`.
pub fn run(a: &InitArgs) -> Result<()> {
    let path = write(a)?;
    let cfg = super::load_config(Path::new(&a.dir))?;
    // The path alone on stdout (for scripts); the description on stderr.
    println!("{}", path.display());
    eprintln!(
        "  f={}  agreement replicas={}  hosts={}  apps={}  fault injection={}",
        cfg.f,
        cfg.n(),
        cfg.hosts.len(),
        cfg.apps
            .iter()
            .map(|a| format!("{}:{}", a.name, a.kind))
            .collect::<Vec<_>>()
            .join(","),
        if cfg.execution.allow_fault_injection {
            "allowed"
        } else {
            "off"
        }
    );
    for app in &cfg.apps {
        let mut placed: Vec<String> = cfg
            .executors
            .iter()
            .filter(|e| e.app == app.id)
            .map(|e| format!("{}@{}", e.index, e.host))
            .collect();
        placed.sort();
        eprintln!("  {}: replicas {}", app.name, placed.join(" "));
    }
    eprintln!("next: zzctl up --dir {}", a.dir.display());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(dir: &Path) -> InitArgs {
        InitArgs {
            dir: dir.to_path_buf(),
            f: 1,
            apps: vec!["a".into(), "b:kv".into()],
            backend: "process".into(),
            hosts: vec!["local".into(), "local".into(), "local".into()],
            allow_fault_injection: true,
            clients: 2,
            listen: "127.0.0.1".parse().unwrap(),
            log_level: "info".into(),
            dormant: "paused".into(),
            checkpoint_interval: 128,
            exec_timeout_ms: None,
        }
    }

    #[test]
    fn replicas_of_an_app_are_on_distinct_hosts() {
        let t = tempfile::tempdir().unwrap();
        let a = args(t.path());
        write(&a).unwrap();
        let cfg = super::super::load_config(t.path()).unwrap();
        assert_eq!(cfg.hosts.len(), 3);
        for app in &cfg.apps {
            let hosts: std::collections::HashSet<_> = cfg
                .executors
                .iter()
                .filter(|e| e.app == app.id)
                .map(|e| e.host.clone())
                .collect();
            assert_eq!(hosts.len(), 3, "app {} shares a host", app.name);
        }
        // Active replica 0 of the two apps lands on different hosts.
        let h0 = |app| {
            cfg.executors
                .iter()
                .find(|e| e.app == app && e.index == 0)
                .unwrap()
                .host
                .clone()
        };
        assert_ne!(h0(1), h0(2));
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            for e in std::fs::read_dir(t.path().join("keys")).unwrap() {
                let m = e.unwrap().metadata().unwrap().permissions().mode();
                assert_eq!(m & 0o777, 0o600);
            }
        }
    }

    #[test]
    fn unknown_app_kinds_and_remote_process_hosts_are_refused() {
        let t = tempfile::tempdir().unwrap();
        let mut a = args(t.path());
        a.apps = vec!["x:nosuch".into()];
        let e = write(&a).unwrap_err().to_string();
        assert!(e.contains("unknown app kind `nosuch`"), "{e}");
        let mut a = args(t.path());
        a.hosts = vec!["qemu+ssh://h/system".into()];
        let e = write(&a).unwrap_err().to_string();
        assert!(e.contains("process backend"), "{e}");
    }
}
