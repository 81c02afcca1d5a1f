//! Writes the config and keys of a local deployment: 3f+1 agreement replicas
//! on free loopback ports, a set of clients and some apps. This is what
//! `zzctl init` and `zzctl bench` build on, and what process-level tests use.
//!
//! Layout of the directory:
//!
//! ```text
//! cluster.toml          the config (paths in it are relative to it)
//! keys/replica-<i>.key  private keys (hex), mode 0600, in a 0700 directory
//! keys/client-<id>.key
//! keys/operator.key     the operator's key (signs `zzctl activate` and `zzctl fault`)
//! data/                 the replicas' durable state, created by the daemons
//! logs/replica-<i>.log  daemon output, when started by [`LocalCluster`]
//! ```
//!
//! [`LocalCluster`] runs the `zz-agreement` daemons of such a deployment as
//! child processes: start, SIGTERM, SIGKILL and restart each one.

use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use zz_wire::config::{
    write_key_file, AgreementTuning, AppEntry, ClientEntry, ClientKeys, ClusterConfig, ConfigError,
    ReplicaEntry,
};
use zz_wire::crypto::KeyPair;
use zz_wire::ClientId;

/// Errors while writing a deployment.
#[derive(Debug, thiserror::Error)]
pub enum DeployError {
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot find free ports on {host}: {source}")]
    Ports {
        host: IpAddr,
        source: std::io::Error,
    },
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("cannot start {bin}: {source}")]
    Spawn {
        bin: PathBuf,
        source: std::io::Error,
    },
    #[error("replica {id} exited ({status}) before it was ready; see {log}")]
    Exited {
        id: u32,
        status: ExitStatus,
        log: PathBuf,
    },
    #[error("replica {id} did not listen on {addr} within {after:?}; see {log}")]
    NotReady {
        id: u32,
        addr: SocketAddr,
        after: Duration,
        log: PathBuf,
    },
}

/// What to deploy.
#[derive(Clone, Debug)]
pub struct DeployOptions {
    pub f: usize,
    /// Agreement replicas; at least 3f+1 (the default).
    pub replicas: Option<usize>,
    /// Number of clients, with ids `first_client_id..`.
    pub clients: usize,
    pub first_client_id: ClientId,
    pub apps: Vec<AppEntry>,
    /// Address every replica listens on, each on its own free port.
    pub host: IpAddr,
    /// Give every replica a Prometheus endpoint on a free port.
    pub metrics: bool,
    pub tuning: AgreementTuning,
    pub log_level: Option<String>,
}

impl Default for DeployOptions {
    fn default() -> Self {
        DeployOptions {
            f: 1,
            replicas: None,
            clients: 1,
            first_client_id: 1,
            apps: vec![AppEntry {
                id: 0,
                name: "null".into(),
                kind: "null".into(),
            }],
            host: IpAddr::V4(Ipv4Addr::LOCALHOST),
            metrics: true,
            tuning: AgreementTuning::default(),
            log_level: None,
        }
    }
}

/// A deployment on disk.
#[derive(Clone, Debug)]
pub struct Deployment {
    pub dir: PathBuf,
    pub config_path: PathBuf,
    pub config: ClusterConfig,
}

impl Deployment {
    /// Loads a deployment written earlier.
    pub fn load(config_path: &Path) -> Result<Self, DeployError> {
        let config = ClusterConfig::load(config_path)?;
        Ok(Deployment {
            dir: config.base_dir.clone(),
            config_path: config_path.to_path_buf(),
            config,
        })
    }

    pub fn client_ids(&self) -> Vec<ClientId> {
        self.config.clients.iter().map(|c| c.id).collect()
    }

    /// The MAC keys of client `id`, read from its key file.
    pub fn client_keys(&self, id: ClientId) -> Result<ClientKeys, DeployError> {
        Ok(ClientKeys::load(&self.config, id)?)
    }
}

/// Finds `count` distinct free TCP ports on `host`. The ports are free when
/// this returns; another process could still take one before it is bound.
///
/// Ports come from below the kernel's ephemeral range when there is room
/// there (see [`fixed_port_range`]): a port the kernel may hand out on its
/// own, as the source port of any outgoing connection or to a `bind(0)`,
/// can be taken while a daemon restarts, and the daemon then cannot listen
/// on its configured address again.
pub fn free_addrs(host: IpAddr, count: usize) -> Result<Vec<SocketAddr>, DeployError> {
    free_addrs_avoiding(host, count, &[])
}

/// As [`free_addrs`], but never one of `taken`: addresses already written
/// into a deployment whose daemons are not running yet are free to the
/// kernel, which could hand them out again.
pub fn free_addrs_avoiding(
    host: IpAddr,
    count: usize,
    taken: &[SocketAddr],
) -> Result<Vec<SocketAddr>, DeployError> {
    let ports = |source| DeployError::Ports { host, source };
    // Every listener stays open until all are chosen, so no port is chosen
    // twice; one in `taken` is skipped.
    let mut held = Vec::new();
    let mut chosen = Vec::with_capacity(count);
    if let Some((lo, hi)) = fixed_port_range() {
        let span = u32::from(hi - lo) + 1;
        // A random start, so concurrent deployments rarely probe the same
        // ports.
        let start = {
            use std::hash::{BuildHasher, Hasher};
            let mut h = std::collections::hash_map::RandomState::new().build_hasher();
            h.write_u32(std::process::id());
            (h.finish() % u64::from(span)) as u32
        };
        for k in 0..span {
            if chosen.len() == count {
                break;
            }
            let port = lo + ((start + k) % span) as u16;
            let a = SocketAddr::new(host, port);
            if taken.contains(&a) {
                continue;
            }
            if let Ok(l) = TcpListener::bind(a) {
                chosen.push(a);
                held.push(l);
            }
        }
        if chosen.len() == count {
            return Ok(chosen);
        }
    }
    // No room below the ephemeral range: let the kernel choose.
    while chosen.len() < count {
        if held.len() > count + taken.len() + 64 {
            return Err(ports(std::io::Error::new(
                std::io::ErrorKind::AddrNotAvailable,
                "the kernel keeps returning ports that are already taken",
            )));
        }
        let l = TcpListener::bind(SocketAddr::new(host, 0)).map_err(ports)?;
        let a = l.local_addr().map_err(ports)?;
        if !taken.contains(&a) && !chosen.contains(&a) {
            chosen.push(a);
        }
        held.push(l);
    }
    Ok(chosen)
}

/// The lowest port [`free_addrs`] hands out: above the well-known and most
/// registered service ports.
const FIXED_PORTS_FLOOR: u16 = 10_000;

/// Ports from [`FIXED_PORTS_FLOOR`] up to just below the kernel's ephemeral
/// range (`net.ipv4.ip_local_port_range`, 32768-60999 by default), or
/// `None` when that leaves fewer than 1,000 ports.
pub fn fixed_port_range() -> Option<(u16, u16)> {
    let text = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").ok()?;
    let ephemeral_lo: u16 = text.split_whitespace().next()?.parse().ok()?;
    let hi = ephemeral_lo.checked_sub(1)?;
    (hi >= FIXED_PORTS_FLOOR + 1000).then_some((FIXED_PORTS_FLOOR, hi))
}

fn create_dir(path: &Path, mode: u32) -> Result<(), DeployError> {
    let io = |source| DeployError::Io {
        what: "cannot create directory",
        path: path.to_path_buf(),
        source,
    };
    std::fs::create_dir_all(path).map_err(io)?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).map_err(io)?;
    }
    #[cfg(not(unix))]
    let _ = mode;
    Ok(())
}

/// Generates fresh keys and writes a deployment into `dir` (created if
/// needed). Existing key files there are overwritten.
pub fn write_local(dir: &Path, opts: &DeployOptions) -> Result<Deployment, DeployError> {
    let n = opts.replicas.unwrap_or(3 * opts.f + 1);
    create_dir(dir, 0o755)?;
    create_dir(&dir.join("keys"), 0o700)?;

    let ports = free_addrs(opts.host, if opts.metrics { 2 * n } else { n })?;
    let mut replicas = Vec::with_capacity(n);
    for i in 0..n {
        let key = KeyPair::generate();
        let key_file = PathBuf::from(format!("keys/replica-{i}.key"));
        write_key_file(&dir.join(&key_file), &key)?;
        replicas.push(ReplicaEntry {
            id: i as u32,
            addr: ports[i],
            public_key: hex_public(&key),
            key_file,
            metrics_addr: opts.metrics.then(|| ports[n + i]),
        });
    }
    let mut clients = Vec::with_capacity(opts.clients);
    for k in 0..opts.clients {
        let id = opts.first_client_id + k as ClientId;
        let key = KeyPair::generate();
        let key_file = PathBuf::from(format!("keys/client-{id}.key"));
        write_key_file(&dir.join(&key_file), &key)?;
        clients.push(ClientEntry {
            id,
            public_key: hex_public(&key),
            key_file: Some(key_file),
        });
    }
    let operator = KeyPair::generate();
    let operator_key_file = PathBuf::from("keys/operator.key");
    write_key_file(&dir.join(&operator_key_file), &operator)?;
    let config = ClusterConfig {
        f: opts.f,
        data_dir: PathBuf::from("data"),
        log_level: opts.log_level.clone(),
        agreement: opts.tuning.clone(),
        replicas,
        clients,
        apps: opts.apps.clone(),
        hosts: vec![],
        executors: vec![],
        execution: Default::default(),
        operator_public_key: Some(hex_public(&operator)),
        operator_key_file: Some(operator_key_file),
        base_dir: dir.to_path_buf(),
    };
    config.validate()?;
    let config_path = dir.join("cluster.toml");
    config.save(&config_path)?;
    // Read it back, so what we hand out is exactly what daemons will see.
    Deployment::load(&config_path)
}

/// The `zz-agreement` daemons of a [`Deployment`], as child processes.
/// Daemons still running when this is dropped are killed.
pub struct LocalCluster {
    bin: PathBuf,
    deployment: Deployment,
    extra_args: Vec<String>,
    children: Vec<Option<Child>>,
}

impl LocalCluster {
    /// Prepares to run `bin` (the `zz-agreement` executable) for every
    /// replica of `deployment`; `extra_args` are passed to each daemon.
    pub fn new(bin: &Path, deployment: Deployment, extra_args: Vec<String>) -> Self {
        let n = deployment.config.n();
        LocalCluster {
            bin: bin.to_path_buf(),
            deployment,
            extra_args,
            children: (0..n).map(|_| None).collect(),
        }
    }

    pub fn deployment(&self) -> &Deployment {
        &self.deployment
    }

    /// Where replica `id`'s output goes (appended to across restarts).
    pub fn log_path(&self, id: u32) -> PathBuf {
        self.deployment
            .dir
            .join("logs")
            .join(format!("replica-{id}.log"))
    }

    /// Starts every replica and waits until each listens.
    pub fn start_all(&mut self, timeout: Duration) -> Result<(), DeployError> {
        for id in 0..self.children.len() as u32 {
            self.spawn(id)?;
        }
        for id in 0..self.children.len() as u32 {
            self.wait_listening(id, timeout)?;
        }
        Ok(())
    }

    /// Starts replica `id` (if it is not running) and waits until it listens.
    pub fn start(&mut self, id: u32, timeout: Duration) -> Result<(), DeployError> {
        self.spawn(id)?;
        self.wait_listening(id, timeout)
    }

    fn spawn(&mut self, id: u32) -> Result<(), DeployError> {
        if self.is_running(id) {
            return Ok(());
        }
        let log_path = self.log_path(id);
        let io = |what, path: &Path| {
            let path = path.to_path_buf();
            move |source| DeployError::Io { what, path, source }
        };
        let logs = self.deployment.dir.join("logs");
        std::fs::create_dir_all(&logs).map_err(io("cannot create directory", &logs))?;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .map_err(io("cannot open log", &log_path))?;
        let log2 = log.try_clone().map_err(io("cannot open log", &log_path))?;
        let child = Command::new(&self.bin)
            .arg("--config")
            .arg(&self.deployment.config_path)
            .arg("--id")
            .arg(id.to_string())
            .args(&self.extra_args)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2)
            .spawn()
            .map_err(|source| DeployError::Spawn {
                bin: self.bin.clone(),
                source,
            })?;
        self.children[id as usize] = Some(child);
        Ok(())
    }

    /// Waits until replica `id` accepts connections.
    pub fn wait_listening(&mut self, id: u32, timeout: Duration) -> Result<(), DeployError> {
        let addr = self.deployment.config.replicas[id as usize].addr;
        let start = Instant::now();
        loop {
            if let Some(c) = self.children[id as usize].as_mut() {
                if let Ok(Some(status)) = c.try_wait() {
                    self.children[id as usize] = None;
                    return Err(DeployError::Exited {
                        id,
                        status,
                        log: self.log_path(id),
                    });
                }
            }
            if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
                return Ok(());
            }
            if start.elapsed() >= timeout {
                return Err(DeployError::NotReady {
                    id,
                    addr,
                    after: timeout,
                    log: self.log_path(id),
                });
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn is_running(&mut self, id: u32) -> bool {
        match self.children[id as usize].as_mut() {
            Some(c) => matches!(c.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// The OS process id of replica `id`, while it runs.
    pub fn pid(&self, id: u32) -> Option<u32> {
        self.children[id as usize].as_ref().map(|c| c.id())
    }

    /// SIGKILLs replica `id`: a crash, with no chance to flush.
    pub fn kill(&mut self, id: u32) -> Option<ExitStatus> {
        let mut c = self.children[id as usize].take()?;
        let _ = c.kill();
        c.wait().ok()
    }

    /// SIGTERMs replica `id` and waits up to `grace` for it to exit, then
    /// SIGKILLs it. Returns its exit status.
    pub fn stop(&mut self, id: u32, grace: Duration) -> Option<ExitStatus> {
        let mut c = self.children[id as usize].take()?;
        terminate(&c);
        let start = Instant::now();
        loop {
            match c.try_wait() {
                Ok(Some(s)) => return Some(s),
                Ok(None) if start.elapsed() < grace => {
                    std::thread::sleep(Duration::from_millis(10))
                }
                _ => {
                    tracing::warn!(replica = id, "did not exit after SIGTERM; killing it");
                    let _ = c.kill();
                    return c.wait().ok();
                }
            }
        }
    }

    /// Stops every replica (SIGTERM to all at once, then SIGKILL after
    /// `grace`). Returns each one's exit status, `None` if it was not running.
    pub fn stop_all(&mut self, grace: Duration) -> Vec<Option<ExitStatus>> {
        for c in self.children.iter().flatten() {
            terminate(c);
        }
        (0..self.children.len() as u32)
            .map(|id| self.stop(id, grace))
            .collect()
    }
}

impl LocalCluster {
    /// Scrapes replica `id`'s Prometheus endpoint (see [`scrape_metrics`]).
    pub fn metrics(&self, id: u32) -> std::io::Result<std::collections::BTreeMap<String, f64>> {
        let addr = self.deployment.config.replicas[id as usize]
            .metrics_addr
            .ok_or_else(|| {
                std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    format!("replica {id} has no metrics_addr"),
                )
            })?;
        scrape_metrics(addr, Duration::from_secs(5))
    }
}

/// Fetches `GET /metrics` from a replica's metrics endpoint and parses the
/// Prometheus text: each sample keyed by its name with labels, as written
/// (`zz_view{replica="0"}`), and also by its bare name (`zz_view`; the last
/// sample of that name wins).
pub fn scrape_metrics(
    addr: SocketAddr,
    timeout: Duration,
) -> std::io::Result<std::collections::BTreeMap<String, f64>> {
    use std::io::{Read, Write};
    let mut s = TcpStream::connect_timeout(&addr, timeout)?;
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))?;
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: zz\r\nConnection: close\r\n\r\n")?;
    let mut resp = String::new();
    s.read_to_string(&mut resp)?;
    let (head, body) = resp.split_once("\r\n\r\n").unwrap_or((&resp, ""));
    if !head.starts_with("HTTP/1.1 200") {
        return Err(std::io::Error::other(format!(
            "metrics endpoint answered: {}",
            head.lines().next().unwrap_or("")
        )));
    }
    let mut out = std::collections::BTreeMap::new();
    for line in body.lines().filter(|l| !l.starts_with('#')) {
        let Some((key, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let Ok(v) = value.trim().parse::<f64>() else {
            continue;
        };
        let bare = key.split('{').next().unwrap_or(key);
        out.insert(bare.to_string(), v);
        out.insert(key.to_string(), v);
    }
    Ok(out)
}

impl Drop for LocalCluster {
    fn drop(&mut self) {
        for c in self.children.iter_mut().flatten() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

#[cfg(unix)]
fn terminate(c: &Child) {
    // SAFETY: kill(2) with a pid we spawned and still own (not yet reaped).
    unsafe {
        libc::kill(c.id() as libc::pid_t, libc::SIGTERM);
    }
}

#[cfg(not(unix))]
fn terminate(_c: &Child) {}

fn hex_public(key: &KeyPair) -> String {
    key.public()
        .as_bytes()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use zz_wire::config::ReplicaKeys;

    #[test]
    fn free_addresses_are_distinct_and_avoid_the_taken_ones() {
        let host: IpAddr = "127.0.0.1".parse().unwrap();
        // Ports just released are the ones the kernel is most likely to
        // hand out again.
        let taken = free_addrs(host, 40).unwrap();
        for _ in 0..20 {
            let got = free_addrs_avoiding(host, 40, &taken).unwrap();
            let distinct: std::collections::HashSet<_> = got.iter().collect();
            assert_eq!(distinct.len(), 40, "{got:?}");
            assert!(got.iter().all(|a| !taken.contains(a)), "{got:?}");
        }
        // A deployment's own addresses are what later allocations avoid.
        let dir = tempfile::tempdir().unwrap();
        let d = write_local(dir.path(), &DeployOptions::default()).unwrap();
        let listen = d.config.listen_addrs();
        assert_eq!(listen.len(), 8, "4 replicas with metrics: {listen:?}");
        let more = free_addrs_avoiding(host, 8, &listen).unwrap();
        assert!(more.iter().all(|a| !listen.contains(a)));
        // Below the ephemeral range, where the kernel never picks a port.
        if let Some((lo, hi)) = fixed_port_range() {
            for a in listen.iter().chain(&more).chain(&taken) {
                assert!((lo..=hi).contains(&a.port()), "{a} is outside {lo}-{hi}");
            }
        }
    }

    #[test]
    fn written_deployment_loads_with_private_keys() {
        let dir = tempfile::tempdir().unwrap();
        let opts = DeployOptions {
            clients: 3,
            ..Default::default()
        };
        let d = write_local(dir.path(), &opts).unwrap();
        assert_eq!(d.config.n(), 4);
        assert_eq!(d.client_ids(), vec![1, 2, 3]);
        for i in 0..4 {
            ReplicaKeys::load(&d.config, i).unwrap();
        }
        let ck = d.client_keys(2).unwrap();
        assert_eq!(ck.replica_mac.len(), 4);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(dir.path().join("keys/replica-0.key"))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
        }
    }
}
