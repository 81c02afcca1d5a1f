//! `zzctl activate` and `zzctl fault`: commands signed with the operator key
//! (`operator_key_file` in the config; see `zz_wire::operator`).
//!
//! `activate APP REPLICA` sends an `Activate` naming the app's current epoch
//! (read from the agreement replicas' `/status`) to every agreement replica
//! and prints each one's answer. Replicas that accept sign a suspect with
//! operator evidence; f+1 of them make the primary order a reconfiguration
//! that wakes the app's dormant replicas, exactly as for a detected fault.
//! It then waits (unless `--no-wait`) until the replica runs and is active.
//!
//! `fault APP REPLICA [PLAN]` sends a `Fault` to the host agent of that
//! replica, which installs the plan and restarts the replica (see
//! `zz_hypervisor::hostd_ops`). PLAN is `key=value,...` with the fields of
//! `zz_executor::FaultPlan` (`wrong_replies_from=N`, `slow_ms=N`,
//! `crash_after=N`), or `clear`; the default, `wrong_replies_from=1`, makes
//! every later reply of the replica wrong.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use clap::Args;
use zz_wire::codec;
use zz_wire::config::{read_key_file, ClusterConfig};
use zz_wire::exec::ExecId;
use zz_wire::message::Frame;
use zz_wire::operator::{OperatorAck, OperatorAction, OperatorCommand, OperatorSigned};

use super::{load_config, status, DirArg, OpsError};

#[derive(Args, Debug, Clone)]
pub struct ActivateArgs {
    #[command(flatten)]
    pub dir: DirArg,
    /// The app, by name or id.
    pub app: String,
    /// The execution replica's index (0..2f+1).
    pub replica: u32,
    /// Return once the command is accepted, without waiting for the wake.
    #[arg(long)]
    pub no_wait: bool,
    /// Seconds to wait for the replica to become active.
    #[arg(long, default_value_t = 30)]
    pub timeout: u64,
}

#[derive(Args, Debug, Clone)]
pub struct FaultArgs {
    #[command(flatten)]
    pub dir: DirArg,
    /// The app, by name or id.
    pub app: String,
    /// The execution replica's index (0..2f+1).
    pub replica: u32,
    /// The fault plan: key=value,... (wrong_replies_from, slow_ms,
    /// crash_after) or `clear`.
    #[arg(default_value = "wrong_replies_from=1")]
    pub plan: String,
}

/// Finds an app by name or id; it must have execution replicas.
pub fn resolve_app(cfg: &ClusterConfig, app: &str, replica: u32) -> Result<ExecId> {
    let found = cfg
        .apps
        .iter()
        .find(|a| a.name == app || a.id.to_string() == app)
        .ok_or_else(|| {
            let names: Vec<&str> = cfg.apps.iter().map(|a| a.name.as_str()).collect();
            OpsError::Usage(format!(
                "no app `{app}`; the apps are: {}",
                names.join(", ")
            ))
        })?;
    let per_app = 2 * cfg.f as u32 + 1;
    if !cfg.executors.iter().any(|e| e.app == found.id) {
        return Err(OpsError::Usage(format!("app `{app}` has no execution replicas")).into());
    }
    if replica >= per_app {
        return Err(OpsError::Usage(format!(
            "app `{app}` has execution replicas 0..{per_app}; there is no replica {replica}"
        ))
        .into());
    }
    Ok(ExecId {
        app: found.id,
        index: replica,
    })
}

/// Signs `action` with the deployment's operator key.
pub fn signed(cfg: &ClusterConfig, action: OperatorAction) -> Result<OperatorSigned> {
    let file = cfg.operator_key_file.as_ref().ok_or_else(|| {
        OpsError::BadConfig(
            "config field `operator_key_file` is missing: this deployment has no operator key; \
             run `zzctl init` again to create one"
                .into(),
        )
    })?;
    let key = read_key_file(&cfg.resolve(file)).map_err(|e| OpsError::BadConfig(e.to_string()))?;
    if cfg.operator_key() != Some(key.public()) {
        return Err(OpsError::BadConfig(
            "config field `operator_public_key` does not match operator_key_file".into(),
        )
        .into());
    }
    let now = SystemTime::now().duration_since(UNIX_EPOCH)?;
    let body = OperatorCommand {
        action,
        issued_ms: now.as_millis() as u64,
        nonce: rand::random(),
    };
    Ok(OperatorSigned::sign(body, &key))
}

/// Sends one operator command to `addr` and reads the answer.
pub fn send(addr: SocketAddr, cmd: &OperatorSigned, timeout: Duration) -> Result<OperatorAck> {
    let mut s = TcpStream::connect_timeout(&addr, timeout)
        .with_context(|| format!("connecting to {addr}"))?;
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))?;
    s.write_all(&zz_wire::frame::frame(&codec::encode(&Frame::Operator(
        cmd.clone(),
    ))))?;
    let mut len = [0u8; 4];
    s.read_exact(&mut len)
        .with_context(|| format!("no answer from {addr}"))?;
    let len = u32::from_be_bytes(len) as usize;
    if len > 1 << 20 {
        bail!("{addr} answered with a frame of {len} bytes");
    }
    let mut body = vec![0u8; len];
    s.read_exact(&mut body)?;
    match codec::decode::<Frame>(&body) {
        Ok(Frame::OperatorAck(a)) => Ok(a),
        _ => bail!("{addr} answered with something other than an operator acknowledgement"),
    }
}

/// `zzctl activate`.
pub fn activate(a: &ActivateArgs) -> Result<()> {
    let cfg = load_config(&a.dir.dir)?;
    let exec = resolve_app(&cfg, &a.app, a.replica)?;
    let st = status::collect(&cfg);
    if st.agreement.up == 0 {
        return Err(OpsError::NotRunning(format!(
            "no agreement replica answers; start the deployment with `zzctl up --dir {}`",
            a.dir.dir.display()
        ))
        .into());
    }
    let app = st
        .apps
        .iter()
        .find(|x| x.id == exec.app)
        .cloned()
        .unwrap_or_default();
    if app.active.contains(&exec.index) {
        println!(
            "{exec} is already active at epoch {}; nothing to do",
            app.epoch
        );
        return Ok(());
    }
    let cmd = signed(
        &cfg,
        OperatorAction::Activate {
            exec,
            epoch: app.epoch,
        },
    )?;
    let mut accepted = 0;
    let mut refusals = Vec::new();
    for r in &cfg.replicas {
        match send(r.addr, &cmd, Duration::from_secs(3)) {
            Ok(OperatorAck::Accepted(what)) => {
                accepted += 1;
                println!("replica {}: {what}", r.id);
            }
            Ok(OperatorAck::Refused(why)) => {
                println!("replica {}: refused: {why}", r.id);
                refusals.push(why);
            }
            Err(e) => println!("replica {}: no answer: {e:#}", r.id),
        }
    }
    if accepted <= cfg.f {
        return Err(OpsError::Refused(format!(
            "only {accepted} agreement replicas accepted the activation; f+1 = {} are needed{}",
            cfg.f + 1,
            refusals
                .first()
                .map(|w| format!(" (first refusal: {w})"))
                .unwrap_or_default()
        ))
        .into());
    }
    if a.no_wait {
        println!("{exec}: activation requested at epoch {}", app.epoch);
        return Ok(());
    }
    // Woken: its host agent carried out a Wake at a later epoch. (Once all
    // replicas agree, a verdict may put it back to sleep: the lowest f+1
    // correct replicas stay active.)
    let start = Instant::now();
    loop {
        let st = status::collect(&cfg);
        let app_now = st.apps.iter().find(|x| x.id == exec.app);
        if let Some(e) = app_now.and_then(|x| x.executors.iter().find(|e| e.index == exec.index)) {
            let woke_at = (e.last_host_command.as_deref() == Some("Wake"))
                .then_some(e.last_host_command_epoch)
                .flatten()
                .filter(|ep| *ep > app.epoch);
            let active_now =
                app_now.is_some_and(|x| x.epoch > app.epoch && x.active.contains(&exec.index));
            if let Some(ep) = woke_at.or(active_now.then_some(e.epoch)) {
                println!(
                    "{exec} woken at epoch {ep}; now {} ({:.1} s)",
                    e.state,
                    start.elapsed().as_secs_f64()
                );
                return Ok(());
            }
        }
        if start.elapsed() > Duration::from_secs(a.timeout) {
            bail!(
                "{exec} was not woken within {} s; see `zzctl status` and the logs in {}/logs",
                a.timeout,
                a.dir.dir.display()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Turns `key=value,...` (or `clear`) into the TOML form of a fault plan.
pub fn plan_toml(plan: &str) -> Result<String> {
    if plan.trim() == "clear" {
        return Ok(String::new());
    }
    let mut out = String::new();
    for kv in plan.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let (k, v) = kv.split_once('=').ok_or_else(|| {
            OpsError::Usage(format!("fault plan item `{kv}`: expected key=value"))
        })?;
        let k = k.trim().replace('-', "_");
        if !["wrong_replies_from", "slow_ms", "crash_after"].contains(&k.as_str()) {
            return Err(OpsError::Usage(format!(
                "fault plan: unknown key `{k}`; use wrong_replies_from, slow_ms or crash_after"
            ))
            .into());
        }
        let v: u64 = v.trim().parse().map_err(|_| {
            OpsError::Usage(format!("fault plan: `{k}` needs a whole number, not `{v}`"))
        })?;
        out.push_str(&format!("{k} = {v}\n"));
    }
    if out.is_empty() {
        return Err(
            OpsError::Usage("fault plan is empty; give key=value or `clear`".into()).into(),
        );
    }
    Ok(out)
}

/// `zzctl fault`.
pub fn fault(a: &FaultArgs) -> Result<()> {
    let cfg = load_config(&a.dir.dir)?;
    let exec = resolve_app(&cfg, &a.app, a.replica)?;
    let toml = plan_toml(&a.plan)?;
    if !cfg.execution.allow_fault_injection {
        return Err(OpsError::Refused(
            "fault injection is not allowed in this deployment (execution.allow_fault_injection \
             is off); create a drill deployment with `zzctl init --allow-fault-injection`"
                .into(),
        )
        .into());
    }
    let e = cfg
        .executors
        .iter()
        .find(|e| e.app == exec.app && e.index == exec.index)
        .context("executor not in the config")?;
    let host = cfg
        .hosts
        .iter()
        .find(|h| h.name == e.host)
        .context("host not in the config")?;
    let cmd = signed(
        &cfg,
        OperatorAction::Fault {
            exec,
            plan_toml: toml,
        },
    )?;
    match send(host.addr, &cmd, Duration::from_secs(15)) {
        Ok(OperatorAck::Accepted(what)) => {
            println!("host {}: {what}", host.name);
            Ok(())
        }
        Ok(OperatorAck::Refused(why)) => {
            Err(OpsError::Refused(format!("host {} refused: {why}", host.name)).into())
        }
        Err(err) => Err(OpsError::NotRunning(format!(
            "host agent {} at {} did not answer ({err:#}); is the deployment up?",
            host.name, host.addr
        ))
        .into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fault_plans_parse_and_bad_ones_say_why() {
        assert_eq!(
            plan_toml("wrong-replies-from=3,slow_ms=5").unwrap(),
            "wrong_replies_from = 3\nslow_ms = 5\n"
        );
        assert_eq!(plan_toml("clear").unwrap(), "");
        assert!(plan_toml("bogus=1")
            .unwrap_err()
            .to_string()
            .contains("unknown key"));
        assert!(plan_toml("slow_ms=x")
            .unwrap_err()
            .to_string()
            .contains("whole number"));
    }
}
