//! The cluster configuration (TOML) and key files.
//!
//! One file describes a deployment: f, the agreement replicas (id, address,
//! public key, and the key file each daemon reads), the clients' public keys,
//! the apps, and protocol tuning. Paths are relative to the config file.
//! Validation names the offending field, so a bad config never half-starts.

use crate::crypto::{parse_public_key, KeyPair, MacKey};
use crate::ids::{AppId, ClientId, ReplicaId};
use ed25519_dalek::VerifyingKey;
use serde::{Deserialize, Serialize};
use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: invalid TOML: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("config field `{field}`: {message}")]
    Invalid { field: String, message: String },
    #[error("key file {path}: {message}")]
    Key { path: PathBuf, message: String },
}

fn invalid(field: impl Into<String>, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        field: field.into(),
        message: message.into(),
    }
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct ReplicaEntry {
    pub id: ReplicaId,
    pub addr: SocketAddr,
    pub public_key: String,
    /// Private key file, read only by this replica's daemon.
    pub key_file: PathBuf,
    #[serde(default)]
    pub metrics_addr: Option<SocketAddr>,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct ClientEntry {
    pub id: ClientId,
    pub public_key: String,
    #[serde(default)]
    pub key_file: Option<PathBuf>,
}

/// Kinds of built-in application.
pub const KNOWN_APP_KINDS: &[&str] = &["null", "echo", "counter", "kv"];

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct AppEntry {
    pub id: AppId,
    pub name: String,
    pub kind: String,
}

/// A physical server with a host agent (`zz-hostd`) that runs execution replicas.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct HostEntry {
    pub name: String,
    /// Where the host agent listens for agreement replicas.
    pub addr: SocketAddr,
    /// `process` (child processes) or `libvirt`.
    #[serde(default = "default_backend")]
    pub backend: String,
    /// libvirt connection URI (`qemu:///system`, `qemu+ssh://host/system`).
    #[serde(default)]
    pub libvirt_uri: Option<String>,
    #[serde(default)]
    pub metrics_addr: Option<SocketAddr>,
}

fn default_backend() -> String {
    "process".into()
}

/// One execution replica of an app, placed on a host.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct ExecutorEntry {
    pub app: AppId,
    /// `0..2f+1`; replicas `0..=f` start active, the rest dormant.
    pub index: u32,
    /// Name of the host (a `[[hosts]]` entry) that runs it.
    pub host: String,
    pub public_key: String,
    /// Private key file, given to the replica by its host agent.
    pub key_file: PathBuf,
}

/// Settings of execution replicas.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct ExecutionTuning {
    /// How dormant replicas wait: `paused` (in memory) or `saved` (on disk).
    pub dormant: String,
    /// App sequence numbers between execution checkpoints.
    pub checkpoint_interval: u64,
    /// Floor of the adaptive execution timeout.
    pub timeout_min_ms: u64,
    /// Allow `zzctl fault` drills (wrong replies, corrupt pages, crashes, slowness).
    pub allow_fault_injection: bool,
    /// Start all 2f+1 execution replicas of every app active, none dormant
    /// (classic BFT execution; a baseline for benchmarks). Default: f+1.
    pub all_active: bool,
    /// Per-app dormant mode overriding `dormant`: app name (or id, as a
    /// string) to `paused` or `saved`, e.g. `dormant_apps = { kv = "saved" }`.
    pub dormant_apps: std::collections::BTreeMap<String, String>,
}

impl Default for ExecutionTuning {
    fn default() -> Self {
        ExecutionTuning {
            dormant: "paused".into(),
            checkpoint_interval: 128,
            timeout_min_ms: 200,
            allow_fault_injection: false,
            all_active: false,
            dormant_apps: Default::default(),
        }
    }
}

/// Protocol tuning; every field has a sensible default.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct AgreementTuning {
    /// Most requests in one batch.
    pub batch_max_requests: usize,
    /// Most bytes of operations in one batch.
    pub batch_max_bytes: usize,
    /// Longest a request waits for its batch to fill while earlier batches are
    /// in flight; after that the batch is sent anyway.
    pub batch_delay_ms: u64,
    /// In-flight sequence numbers (high watermark minus low watermark).
    pub window: u64,
    /// Sequence numbers between checkpoints (K).
    pub checkpoint_interval: u64,
    /// Time a backup waits for a request it holds to commit before changing view.
    pub view_change_timeout_ms: u64,
    /// How often a replica reports its progress to peers, to catch up.
    pub status_interval_ms: u64,
}

impl Default for AgreementTuning {
    fn default() -> Self {
        AgreementTuning {
            batch_max_requests: 1024,
            batch_max_bytes: 1 << 20,
            batch_delay_ms: 5,
            window: 256,
            checkpoint_interval: 128,
            view_change_timeout_ms: 2000,
            status_interval_ms: 200,
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct ClusterConfig {
    pub f: usize,
    #[serde(default = "default_data_dir")]
    pub data_dir: PathBuf,
    #[serde(default)]
    pub log_level: Option<String>,
    #[serde(default)]
    pub agreement: AgreementTuning,
    pub replicas: Vec<ReplicaEntry>,
    #[serde(default)]
    pub clients: Vec<ClientEntry>,
    #[serde(default)]
    pub apps: Vec<AppEntry>,
    #[serde(default)]
    pub hosts: Vec<HostEntry>,
    #[serde(default)]
    pub executors: Vec<ExecutorEntry>,
    #[serde(default)]
    pub execution: ExecutionTuning,
    /// The operator's public key (hex): it signs `zzctl activate` and
    /// `zzctl fault` commands. Without it those commands are refused.
    #[serde(default)]
    pub operator_public_key: Option<String>,
    /// The operator's private key file (read only by `zzctl`).
    #[serde(default)]
    pub operator_key_file: Option<PathBuf>,
    /// Where relative paths are resolved; set when loading, not stored.
    #[serde(skip)]
    pub base_dir: PathBuf,
}

fn default_data_dir() -> PathBuf {
    PathBuf::from("data")
}

impl ClusterConfig {
    pub fn n(&self) -> usize {
        self.replicas.len()
    }

    /// The dormant mode (`paused` or `saved`) of `app`: its entry in
    /// `execution.dormant_apps` (by name, then id), else `execution.dormant`.
    pub fn dormant_of(&self, app: AppId) -> &str {
        let e = &self.execution;
        self.apps
            .iter()
            .find(|a| a.id == app)
            .and_then(|a| {
                e.dormant_apps
                    .get(&a.name)
                    .or_else(|| e.dormant_apps.get(&a.id.to_string()))
            })
            .unwrap_or(&e.dormant)
    }

    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let mut cfg: ClusterConfig = toml::from_str(&text).map_err(|e| ConfigError::Parse {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        cfg.base_dir = path.parent().map(Path::to_path_buf).unwrap_or_default();
        cfg.validate()?;
        Ok(cfg)
    }

    pub fn save(&self, path: &Path) -> Result<(), ConfigError> {
        let text = toml::to_string_pretty(self).map_err(|e| invalid("<config>", e.to_string()))?;
        std::fs::write(path, text).map_err(|source| ConfigError::Write {
            path: path.to_path_buf(),
            source,
        })
    }

    pub fn resolve(&self, p: &Path) -> PathBuf {
        if p.is_absolute() {
            p.to_path_buf()
        } else {
            self.base_dir.join(p)
        }
    }

    /// Every address some daemon of this deployment listens on: replica
    /// and host agent addresses and their metrics endpoints.
    pub fn listen_addrs(&self) -> Vec<SocketAddr> {
        let replicas = self
            .replicas
            .iter()
            .flat_map(|r| std::iter::once(r.addr).chain(r.metrics_addr));
        let hosts = self
            .hosts
            .iter()
            .flat_map(|h| std::iter::once(h.addr).chain(h.metrics_addr));
        replicas.chain(hosts).collect()
    }

    /// Checks everything that can be checked without touching the network.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.f == 0 {
            return Err(invalid("f", "must be at least 1"));
        }
        if self.replicas.len() < 3 * self.f + 1 {
            return Err(invalid(
                "f",
                format!(
                    "f = {} needs at least {} agreement replicas (3f+1), but {} are listed",
                    self.f,
                    3 * self.f + 1,
                    self.replicas.len()
                ),
            ));
        }
        let mut addrs = HashSet::new();
        for (i, r) in self.replicas.iter().enumerate() {
            let field = format!("replicas[{i}]");
            if r.id as usize != i {
                return Err(invalid(
                    format!("{field}.id"),
                    format!("must be {i}: ids are 0..n in order"),
                ));
            }
            if !addrs.insert(r.addr) {
                return Err(invalid(
                    format!("{field}.addr"),
                    format!("address {} is used twice", r.addr),
                ));
            }
            if let Some(m) = r.metrics_addr {
                if !addrs.insert(m) {
                    return Err(invalid(
                        format!("{field}.metrics_addr"),
                        format!("address {m} is used twice"),
                    ));
                }
            }
            parse_public_key(&r.public_key)
                .map_err(|e| invalid(format!("{field}.public_key"), e.to_string()))?;
        }
        for (i, h) in self.hosts.iter().enumerate() {
            for (what, a) in [("addr", Some(h.addr)), ("metrics_addr", h.metrics_addr)] {
                if let Some(a) = a {
                    if !addrs.insert(a) {
                        return Err(invalid(
                            format!("hosts[{i}].{what}"),
                            format!("address {a} is used twice"),
                        ));
                    }
                }
            }
        }
        if let Some(k) = &self.operator_public_key {
            parse_public_key(k).map_err(|e| invalid("operator_public_key", e.to_string()))?;
        }
        let mut ids = HashSet::new();
        for (i, c) in self.clients.iter().enumerate() {
            if !ids.insert(c.id) {
                return Err(invalid(
                    format!("clients[{i}].id"),
                    format!("client id {} is used twice", c.id),
                ));
            }
            parse_public_key(&c.public_key)
                .map_err(|e| invalid(format!("clients[{i}].public_key"), e.to_string()))?;
        }
        let mut app_ids = HashSet::new();
        for (i, a) in self.apps.iter().enumerate() {
            if !KNOWN_APP_KINDS.contains(&a.kind.as_str()) {
                return Err(invalid(
                    format!("apps[{i}].kind"),
                    format!(
                        "unknown app kind `{}`; known kinds: {}",
                        a.kind,
                        KNOWN_APP_KINDS.join(", ")
                    ),
                ));
            }
            if !app_ids.insert(a.id) {
                return Err(invalid(
                    format!("apps[{i}].id"),
                    format!("app id {} is used twice", a.id),
                ));
            }
        }
        self.validate_execution()?;
        let t = &self.agreement;
        if t.window == 0 || t.checkpoint_interval == 0 || t.window < t.checkpoint_interval {
            return Err(invalid(
                "agreement.window",
                "window and checkpoint_interval must be positive, with window >= checkpoint_interval",
            ));
        }
        if t.batch_max_requests == 0 {
            return Err(invalid("agreement.batch_max_requests", "must be positive"));
        }
        Ok(())
    }

    fn validate_execution(&self) -> Result<(), ConfigError> {
        let mut host_names = HashSet::new();
        for (i, h) in self.hosts.iter().enumerate() {
            if !host_names.insert(h.name.as_str()) {
                return Err(invalid(
                    format!("hosts[{i}].name"),
                    format!("host `{}` is listed twice", h.name),
                ));
            }
            if !["process", "libvirt"].contains(&h.backend.as_str()) {
                return Err(invalid(
                    format!("hosts[{i}].backend"),
                    format!(
                        "unknown backend `{}`; use `process` or `libvirt`",
                        h.backend
                    ),
                ));
            }
        }
        if !["paused", "saved"].contains(&self.execution.dormant.as_str()) {
            return Err(invalid("execution.dormant", "must be `paused` or `saved`"));
        }
        for (app, mode) in &self.execution.dormant_apps {
            let field = format!("execution.dormant_apps.{app}");
            if !["paused", "saved"].contains(&mode.as_str()) {
                return Err(invalid(field, "must be `paused` or `saved`"));
            }
            if !self
                .apps
                .iter()
                .any(|a| a.name == *app || a.id.to_string() == *app)
            {
                return Err(invalid(field, "names no app of [[apps]] (by name or id)"));
            }
        }
        let per_app = 2 * self.f + 1;
        let mut seen = HashSet::new();
        for (i, e) in self.executors.iter().enumerate() {
            let field = format!("executors[{i}]");
            if !self.apps.iter().any(|a| a.id == e.app) {
                return Err(invalid(
                    format!("{field}.app"),
                    format!("no app with id {}", e.app),
                ));
            }
            if e.index as usize >= per_app {
                return Err(invalid(
                    format!("{field}.index"),
                    format!("must be below 2f+1 = {per_app}"),
                ));
            }
            if !host_names.contains(e.host.as_str()) {
                return Err(invalid(
                    format!("{field}.host"),
                    format!("no host named `{}` in [[hosts]]", e.host),
                ));
            }
            if !seen.insert((e.app, e.index)) {
                return Err(invalid(
                    field,
                    format!("app {} replica {} is listed twice", e.app, e.index),
                ));
            }
            parse_public_key(&e.public_key)
                .map_err(|err| invalid(format!("{field}.public_key"), err.to_string()))?;
        }
        for (i, app) in self.apps.iter().enumerate() {
            let remote = self.executors.iter().any(|e| e.app == app.id);
            if app.kind == "kv" && !remote {
                return Err(invalid(
                    format!("apps[{i}].kind"),
                    "`kv` apps run on execution replicas: list 2f+1 [[executors]] for it (`zzctl init` does)",
                ));
            }
            if remote && !["kv", "null"].contains(&app.kind.as_str()) {
                return Err(invalid(
                    format!("apps[{i}].kind"),
                    format!(
                        "`{}` runs inside the agreement replicas and cannot have [[executors]]",
                        app.kind
                    ),
                ));
            }
        }
        for app in self
            .apps
            .iter()
            .filter(|a| self.executors.iter().any(|e| e.app == a.id))
        {
            let n = self.executors.iter().filter(|e| e.app == app.id).count();
            if n != per_app {
                return Err(invalid(
                    "executors",
                    format!(
                        "app `{}` has {n} execution replicas; it needs exactly 2f+1 = {per_app}",
                        app.name
                    ),
                ));
            }
        }
        Ok(())
    }

    /// Checks that every private key file the config names can be read, holds
    /// a key, and matches the public key listed beside it, naming the field of
    /// the first that does not. Daemons read only their own key; `zzctl up`
    /// calls this first so that a bad key stops the whole deployment before
    /// anything starts.
    pub fn check_key_files(&self) -> Result<(), ConfigError> {
        let mut files: Vec<(String, &Path, Option<&str>)> = Vec::new();
        for (i, r) in self.replicas.iter().enumerate() {
            files.push((
                format!("replicas[{i}].key_file"),
                &r.key_file,
                Some(&r.public_key),
            ));
        }
        for (i, c) in self.clients.iter().enumerate() {
            if let Some(k) = &c.key_file {
                files.push((format!("clients[{i}].key_file"), k, Some(&c.public_key)));
            }
        }
        for (i, e) in self.executors.iter().enumerate() {
            files.push((
                format!("executors[{i}].key_file"),
                &e.key_file,
                Some(&e.public_key),
            ));
        }
        if let Some(k) = &self.operator_key_file {
            let public = self.operator_public_key.as_deref();
            files.push(("operator_key_file".into(), k, public));
        }
        for (field, p, public) in files {
            let path = self.resolve(p);
            let key = match read_key_file(&path) {
                Ok(k) => k,
                Err(ConfigError::Key { message, .. }) => {
                    return Err(invalid(
                        field,
                        format!("key file {}: {message}", path.display()),
                    ))
                }
                Err(e) => return Err(invalid(field, e.to_string())),
            };
            let listed = public.and_then(|p| parse_public_key(p).ok());
            if listed.is_some_and(|l| l != key.public()) {
                return Err(invalid(
                    field,
                    format!(
                        "key file {} does not hold the private key of the public key listed \
                         beside it; restore the right file, or run `zzctl init` again",
                        path.display()
                    ),
                ));
            }
        }
        Ok(())
    }

    /// The operator's public key, if the config has one.
    pub fn operator_key(&self) -> Option<VerifyingKey> {
        self.operator_public_key
            .as_ref()
            .and_then(|k| parse_public_key(k).ok())
    }

    /// Public keys of an app's execution replicas, by index (empty if the
    /// app runs inside the agreement replicas).
    pub fn executor_public_keys(&self, app: AppId) -> Vec<VerifyingKey> {
        let mut es: Vec<&ExecutorEntry> = self.executors.iter().filter(|e| e.app == app).collect();
        es.sort_by_key(|e| e.index);
        es.iter()
            .map(|e| parse_public_key(&e.public_key).expect("validated"))
            .collect()
    }

    pub fn replica_public_keys(&self) -> Vec<VerifyingKey> {
        self.replicas
            .iter()
            .map(|r| parse_public_key(&r.public_key).expect("validated"))
            .collect()
    }

    pub fn client_public_keys(&self) -> HashMap<ClientId, VerifyingKey> {
        self.clients
            .iter()
            .map(|c| (c.id, parse_public_key(&c.public_key).expect("validated")))
            .collect()
    }
}

/// Writes a private key as hex, readable only by its owner.
pub fn write_key_file(path: &Path, key: &KeyPair) -> Result<(), ConfigError> {
    use std::io::Write;
    let err = |source| ConfigError::Write {
        path: path.to_path_buf(),
        source,
    };
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let mut f = opts.open(path).map_err(err)?;
    f.write_all(hex::encode(key.seed()).as_bytes())
        .map_err(err)?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(err)?;
    }
    Ok(())
}

pub fn read_key_file(path: &Path) -> Result<KeyPair, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|e| ConfigError::Key {
        path: path.to_path_buf(),
        message: format!("cannot read: {e} (run `zzctl init` to create keys)"),
    })?;
    let bytes = hex::decode(text.trim()).map_err(|e| ConfigError::Key {
        path: path.to_path_buf(),
        message: format!("not hex: {e}"),
    })?;
    let seed: [u8; 32] = bytes.try_into().map_err(|_| ConfigError::Key {
        path: path.to_path_buf(),
        message: "must hold 32 bytes".into(),
    })?;
    Ok(KeyPair::from_seed(seed))
}

/// The keys an agreement replica needs: its own pair, every replica's public
/// key, and the MAC keys it shares with each replica and client.
#[derive(Clone, Debug)]
pub struct ReplicaKeys {
    pub me: ReplicaId,
    pub key: KeyPair,
    pub replica_public: Vec<VerifyingKey>,
    /// `peer_mac[i]`: shared with replica `i`.
    pub peer_mac: Vec<MacKey>,
    pub client_mac: HashMap<ClientId, MacKey>,
}

impl ReplicaKeys {
    pub fn derive(
        me: ReplicaId,
        key: KeyPair,
        replica_public: Vec<VerifyingKey>,
        client_public: &HashMap<ClientId, VerifyingKey>,
    ) -> Self {
        let peer_mac = replica_public
            .iter()
            .map(|p| key.shared_mac_key(p))
            .collect();
        let client_mac = client_public
            .iter()
            .map(|(c, p)| (*c, key.shared_mac_key(p)))
            .collect();
        ReplicaKeys {
            me,
            key,
            replica_public,
            peer_mac,
            client_mac,
        }
    }

    /// Loads replica `me`'s keys as named by the config, checking that its
    /// private key matches the public key listed for it.
    pub fn load(cfg: &ClusterConfig, me: ReplicaId) -> Result<Self, ConfigError> {
        let entry = cfg
            .replicas
            .get(me as usize)
            .ok_or_else(|| invalid("replicas", format!("no replica with id {me}")))?;
        let path = cfg.resolve(&entry.key_file);
        let key = read_key_file(&path)?;
        let publics = cfg.replica_public_keys();
        if key.public() != publics[me as usize] {
            return Err(ConfigError::Key {
                path,
                message: format!("does not match replicas[{me}].public_key"),
            });
        }
        Ok(Self::derive(me, key, publics, &cfg.client_public_keys()))
    }
}

/// The keys a client needs: the MAC key it shares with each replica.
#[derive(Clone, Debug)]
pub struct ClientKeys {
    pub me: ClientId,
    pub replica_mac: Vec<MacKey>,
}

impl ClientKeys {
    pub fn derive(me: ClientId, key: &KeyPair, replica_public: &[VerifyingKey]) -> Self {
        ClientKeys {
            me,
            replica_mac: replica_public
                .iter()
                .map(|p| key.shared_mac_key(p))
                .collect(),
        }
    }

    pub fn load(cfg: &ClusterConfig, me: ClientId) -> Result<Self, ConfigError> {
        let (i, entry) = cfg
            .clients
            .iter()
            .enumerate()
            .find(|(_, c)| c.id == me)
            .ok_or_else(|| invalid("clients", format!("no client with id {me}")))?;
        let path = entry
            .key_file
            .as_ref()
            .map(|p| cfg.resolve(p))
            .ok_or_else(|| invalid(format!("clients[{i}].key_file"), "missing"))?;
        let key = read_key_file(&path)?;
        Ok(Self::derive(me, &key, &cfg.replica_public_keys()))
    }
}
