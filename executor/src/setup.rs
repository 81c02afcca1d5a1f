//! What the `zz-executor` process learns at start, and how it becomes an
//! [`ExecutorConfig`].
//!
//! The host agent starts each execution replica with:
//!
//! | variable | meaning |
//! |---|---|
//! | `ZZ_APP` | the app id |
//! | `ZZ_EXEC_INDEX` | the replica's index within the app, `0..2f+1` |
//! | `ZZ_STATE_DIR` | the replica's own folder (page store, fault plan); a reimage wipes it |
//! | `ZZ_SOCKET` | the host agent's unix socket for this replica's stream |
//! | `ZZ_CONFIG` | the cluster config (or `--config`) |
//! | `ZZ_KEY_FILE` | optional: the replica's private key (or `--key-file`); default: the `key_file` of its `[[executors]]` entry |
//! | `ZZ_APP_SPEC` | optional: overrides the app kind, e.g. `kv+cpu=100` |
//!
//! A fault plan for drills is read from `$ZZ_STATE_DIR/faults.toml`
//! ([`FAULTS_FILE`], the TOML form of [`FaultPlan`]), and only if the config
//! sets `execution.allow_fault_injection`. Living in the state folder, it is
//! wiped with the rest of the replica when the replica is reimaged.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use zz_wire::config::{read_key_file, ClusterConfig, ConfigError};
use zz_wire::AppId;

use crate::app::AppSpec;
use crate::driver::ExecutorConfig;
use crate::fault::FaultPlan;
use crate::replica::ExecParams;

/// The app id (same name as `zz_hypervisor::lifecycle::ENV_APP`).
pub const ENV_APP: &str = "ZZ_APP";
/// The replica's index within its app.
pub const ENV_EXEC_INDEX: &str = "ZZ_EXEC_INDEX";
/// The replica's state folder.
pub const ENV_STATE_DIR: &str = "ZZ_STATE_DIR";
/// The host agent's socket.
pub const ENV_SOCKET: &str = "ZZ_SOCKET";
/// The cluster config file.
pub const ENV_CONFIG: &str = "ZZ_CONFIG";
/// The replica's private key file.
pub const ENV_KEY_FILE: &str = "ZZ_KEY_FILE";
/// Overrides the app kind of the config (`kv`, `null`, `kv+cpu=N`).
pub const ENV_APP_SPEC: &str = "ZZ_APP_SPEC";
/// The fault plan's file name inside the state folder.
pub const FAULTS_FILE: &str = "faults.toml";
/// The page store's folder inside the state folder.
pub const STORE_DIR: &str = "store";

/// Why an executor cannot start. Each names what to fix.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    #[error("environment variable {0} is not set (the host agent sets it)")]
    MissingEnv(&'static str),
    #[error("environment variable {name}={value:?} is not valid: {why}")]
    BadEnv {
        name: &'static str,
        value: String,
        why: String,
    },
    #[error("no cluster config given: pass --config or set ZZ_CONFIG")]
    NoConfig,
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("the config lists no execution replica {index} of app {app}")]
    NotInConfig { app: AppId, index: u32 },
    #[error("key file {0} does not hold this replica's key (it does not match its public_key in the config)")]
    WrongKey(PathBuf),
    #[error("app {app}: {why}")]
    App { app: AppId, why: String },
    #[error("fault plan {path}: {why}")]
    Faults { path: PathBuf, why: String },
}

/// Who this executor is and where things are, as given by its host agent.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Identity {
    pub app: AppId,
    pub index: u32,
    pub state_dir: PathBuf,
    pub socket: PathBuf,
    pub config: PathBuf,
    pub key_file: Option<PathBuf>,
    pub app_spec: Option<String>,
}

fn env_var(name: &'static str) -> Result<String, SetupError> {
    std::env::var(name).map_err(|_| SetupError::MissingEnv(name))
}

fn parse_env<T: std::str::FromStr>(name: &'static str) -> Result<T, SetupError>
where
    T::Err: std::fmt::Display,
{
    let value = env_var(name)?;
    value
        .trim()
        .parse()
        .map_err(|e: T::Err| SetupError::BadEnv {
            name,
            value: value.clone(),
            why: e.to_string(),
        })
}

impl Identity {
    /// Reads the `ZZ_*` environment; `config` and `key_file` (command-line
    /// arguments) take precedence over `ZZ_CONFIG` and `ZZ_KEY_FILE`.
    pub fn from_env(
        config: Option<PathBuf>,
        key_file: Option<PathBuf>,
    ) -> Result<Identity, SetupError> {
        let config = config
            .or_else(|| std::env::var_os(ENV_CONFIG).map(PathBuf::from))
            .ok_or(SetupError::NoConfig)?;
        Ok(Identity {
            app: parse_env(ENV_APP)?,
            index: parse_env(ENV_EXEC_INDEX)?,
            state_dir: PathBuf::from(env_var(ENV_STATE_DIR)?),
            socket: PathBuf::from(env_var(ENV_SOCKET)?),
            config,
            key_file: key_file.or_else(|| std::env::var_os(ENV_KEY_FILE).map(PathBuf::from)),
            app_spec: std::env::var(ENV_APP_SPEC).ok().filter(|s| !s.is_empty()),
        })
    }
}

/// Reads a fault plan file; `None` if there is none.
pub fn read_fault_plan(path: &Path) -> Result<Option<FaultPlan>, SetupError> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => {
            return Err(SetupError::Faults {
                path: path.to_path_buf(),
                why: e.to_string(),
            })
        }
    };
    toml::from_str(&text)
        .map(Some)
        .map_err(|e| SetupError::Faults {
            path: path.to_path_buf(),
            why: e.to_string(),
        })
}

/// Writes a fault plan file (what a host agent does for a drill).
pub fn write_fault_plan(path: &Path, plan: &FaultPlan) -> std::io::Result<()> {
    let text = toml::to_string(plan).map_err(std::io::Error::other)?;
    std::fs::write(path, text)
}

/// Builds the executor's configuration from its identity and the cluster
/// config: keys, MAC keys with every agreement replica and client, the app,
/// the checkpoint interval, and the fault plan if the deployment allows it.
pub fn executor_config(id: &Identity) -> Result<ExecutorConfig, SetupError> {
    let cfg = ClusterConfig::load(&id.config)?;
    let entry = cfg
        .executors
        .iter()
        .find(|e| e.app == id.app && e.index == id.index)
        .ok_or(SetupError::NotInConfig {
            app: id.app,
            index: id.index,
        })?;
    let key_path = id
        .key_file
        .clone()
        .unwrap_or_else(|| cfg.resolve(&entry.key_file));
    let key = read_key_file(&key_path)?;
    let exec_keys = cfg.executor_public_keys(id.app);
    if exec_keys.get(id.index as usize) != Some(&key.public()) {
        return Err(SetupError::WrongKey(key_path));
    }
    let app_entry = cfg
        .apps
        .iter()
        .find(|a| a.id == id.app)
        .ok_or_else(|| SetupError::App {
            app: id.app,
            why: "not in the config's [[apps]]".into(),
        })?;
    let spec_text = id
        .app_spec
        .clone()
        .unwrap_or_else(|| app_entry.kind.clone());
    let spec: AppSpec =
        spec_text
            .parse()
            .map_err(|e: crate::app::AppSpecError| SetupError::App {
                app: id.app,
                why: e.to_string(),
            })?;
    let agreement_macs = cfg
        .replica_public_keys()
        .iter()
        .map(|p| key.shared_mac_key(p))
        .collect();
    let client_macs: BTreeMap<_, _> = cfg
        .client_public_keys()
        .iter()
        .map(|(c, p)| (*c, key.shared_mac_key(p)))
        .collect();
    let mut params = ExecParams::new(
        id.app,
        id.index,
        cfg.f,
        key,
        exec_keys,
        agreement_macs,
        client_macs,
    );
    let k = cfg.execution.checkpoint_interval.max(1);
    params.checkpoint_interval = k;
    params.window = (4 * k).max(64);
    let faults_path = id.state_dir.join(FAULTS_FILE);
    if let Some(plan) = read_fault_plan(&faults_path)? {
        if cfg.execution.allow_fault_injection {
            tracing::warn!(?plan, "fault injection enabled for this replica");
            params.faults = plan;
        } else {
            tracing::warn!(
                path = %faults_path.display(),
                "ignoring the fault plan: the config does not set execution.allow_fault_injection"
            );
        }
    }
    Ok(ExecutorConfig::new(
        params,
        spec,
        id.state_dir.join(STORE_DIR),
        id.socket.clone(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fault_plans_round_trip_through_their_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(FAULTS_FILE);
        assert_eq!(read_fault_plan(&path).unwrap(), None);
        let plan = FaultPlan {
            wrong_replies_from: Some(3),
            slow_ms: 5,
            ..FaultPlan::default()
        };
        write_fault_plan(&path, &plan).unwrap();
        assert_eq!(read_fault_plan(&path).unwrap(), Some(plan));
        std::fs::write(&path, "wrong_replies_from = \"x\"").unwrap();
        assert!(read_fault_plan(&path).is_err());
    }
}
