//! `zzctl kv put|get|del`: one operation on a kv app through the client
//! library (f+1 matching replies from distinct execution replicas).

use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use zz_client::{executor_mac_keys, ClientOptions, Cluster};
use zz_executor::{KvOp, KvResult};
use zz_wire::config::{ClientKeys, ClusterConfig};

use super::{load_config, DirArg, OpsError};

#[derive(Args, Debug, Clone)]
pub struct KvTarget {
    #[command(flatten)]
    pub dir: DirArg,
    /// The kv app, by name or id.
    pub app: String,
    /// The key (UTF-8).
    pub key: String,
    /// Client id to use (default: the first client of the config).
    #[arg(long)]
    pub client: Option<u64>,
    /// Seconds before giving up.
    #[arg(long, default_value_t = 30)]
    pub timeout: u64,
}

#[derive(Subcommand, Debug, Clone)]
pub enum KvCommand {
    /// Store VALUE under KEY.
    Put {
        #[command(flatten)]
        target: KvTarget,
        /// The value (UTF-8).
        value: String,
    },
    /// Print the value under KEY (exit 1 if there is none).
    Get {
        #[command(flatten)]
        target: KvTarget,
    },
    /// Delete KEY.
    Del {
        #[command(flatten)]
        target: KvTarget,
    },
}

/// Runs one kv operation; returns its result.
pub fn invoke(cfg: &ClusterConfig, t: &KvTarget, op: KvOp) -> Result<KvResult> {
    let app = cfg
        .apps
        .iter()
        .find(|a| a.name == t.app || a.id.to_string() == t.app)
        .ok_or_else(|| {
            let names: Vec<&str> = cfg.apps.iter().map(|a| a.name.as_str()).collect();
            OpsError::Usage(format!(
                "no app `{}`; the apps are: {}",
                t.app,
                names.join(", ")
            ))
        })?;
    if app.kind != "kv" {
        return Err(OpsError::Usage(format!(
            "app `{}` is a `{}` app, not kv",
            app.name, app.kind
        ))
        .into());
    }
    let id = match t.client {
        Some(c) => c,
        None => cfg
            .clients
            .first()
            .map(|c| c.id)
            .ok_or_else(|| OpsError::BadConfig("the config lists no clients".into()))?,
    };
    let keys = ClientKeys::load(cfg, id).map_err(|e| OpsError::BadConfig(e.to_string()))?;
    let rt = super::runtime()?;
    rt.block_on(async {
        let opts = ClientOptions {
            op_timeout: Duration::from_secs(t.timeout.max(1)),
            ..ClientOptions::default()
        };
        let cluster = Cluster::from_config(cfg, opts)?;
        if !cluster
            .wait_connected(cfg.f + 1, Duration::from_secs(5))
            .await
        {
            return Err(OpsError::NotRunning(format!(
                "fewer than f+1 = {} agreement replicas accept connections; is the deployment up (`zzctl up`)?",
                cfg.f + 1
            ))
            .into());
        }
        let mut c = cluster.client(keys)?;
        for (a, k) in executor_mac_keys(cfg, id)? {
            c.set_executor_keys(a, k);
        }
        let r = c
            .invoke(app.id, op.encode())
            .await
            .with_context(|| format!("kv operation on `{}`", app.name))?;
        KvResult::decode(&r).map_err(|e| anyhow::anyhow!("the kv app answered something undecodable: {e:?}"))
    })
}

/// `zzctl kv ...`.
pub fn run(k: &KvCommand) -> Result<()> {
    let (t, op) = match k {
        KvCommand::Put { target, value } => (
            target,
            KvOp::Put {
                key: target.key.clone().into_bytes(),
                value: value.clone().into_bytes(),
            },
        ),
        KvCommand::Get { target } => (
            target,
            KvOp::Get {
                key: target.key.clone().into_bytes(),
            },
        ),
        KvCommand::Del { target } => (
            target,
            KvOp::Delete {
                key: target.key.clone().into_bytes(),
            },
        ),
    };
    let cfg = load_config(&t.dir.dir)?;
    match invoke(&cfg, t, op)? {
        KvResult::Stored { replaced } => {
            println!("stored{}", if replaced { " (replaced)" } else { "" })
        }
        KvResult::Value(Some(v)) => println!("{}", String::from_utf8_lossy(&v)),
        KvResult::Value(None) => anyhow::bail!("no value under `{}`", t.key),
        KvResult::Deleted { existed } => {
            println!("{}", if existed { "deleted" } else { "not found" })
        }
        other => anyhow::bail!("unexpected kv result: {other:?}"),
    }
    Ok(())
}
