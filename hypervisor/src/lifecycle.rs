//! The replica lifecycle trait (DESIGN §6) and what every backend shares:
//! the replica's description ([`ReplicaSpec`]), its states ([`ReplicaState`]),
//! typed errors ([`LifecycleError`]) and the mapping from a host command to
//! lifecycle calls ([`carry_out`]).
//!
//! ```text
//!            define            start
//!   (none) ─────────▶ defined ───────▶ running ◀──── resume ──── paused
//!                                      │  ▲  │                    ▲
//!                                      │  │  └────── pause ───────┘
//!                                      │  └── restore ── saved ◀── save (running or paused)
//!          destroy (from any state) ───┴──▶ destroyed ── start ──▶ running
//!   a process that dies on its own ──▶ exited / crashed ── start ──▶ running
//!   reimage (from any state) = destroy + wipe the state folder + start
//! ```

use std::fmt;
use std::path::PathBuf;

use zz_wire::exec::{ExecId, HostAction};

/// Environment variables every backend gives the executor (as process
/// environment, or on a VM's kernel command line), so the executor has one
/// way to learn who it is and where to talk.
pub const ENV_APP: &str = "ZZ_APP";
/// The executor's index within its app (`0..2f+1`).
pub const ENV_EXEC_INDEX: &str = "ZZ_EXEC_INDEX";
/// The replica's own state folder (the executor's page store lives there).
pub const ENV_STATE_DIR: &str = "ZZ_STATE_DIR";
/// The host-side unix socket of the executor's framed byte stream.
pub const ENV_SOCKET: &str = "ZZ_SOCKET";

/// What a backend needs to define one execution replica.
///
/// Host-wide settings (which executor binary, which guest image, which
/// libvirt URI) belong to the backend's own configuration; this holds only
/// what differs from one replica to the next.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReplicaSpec {
    pub exec: ExecId,
    /// Per-replica folder owned by zz: the executor's state for the process
    /// backend, the disk image and managed-save file for a VM backend.
    /// Reimaging wipes it, so it must not be shared with anything else.
    pub state_dir: PathBuf,
    /// Host-side unix socket carrying the executor's frames (for a VM, the
    /// virtio-serial port's backing socket). The host agent owns it.
    pub socket: PathBuf,
    /// Extra executor arguments, after the backend's own. `{app}`, `{exec}`,
    /// `{state_dir}` and `{socket}` are replaced by the replica's values.
    pub args: Vec<String>,
    /// Extra environment, on top of the `ZZ_*` variables above.
    pub env: Vec<(String, String)>,
    /// Where the executor's output (console, for a VM) is appended; `None`
    /// discards it. Keep it outside `state_dir` to survive a reimage.
    pub log: Option<PathBuf>,
    /// Guest memory; ignored by the process backend.
    pub memory_mib: u32,
    /// Guest virtual CPUs; ignored by the process backend.
    pub vcpus: u32,
}

impl ReplicaSpec {
    /// A spec with no extra arguments or environment, no log, 256 MiB and 1 vCPU.
    pub fn new(exec: ExecId, state_dir: impl Into<PathBuf>, socket: impl Into<PathBuf>) -> Self {
        ReplicaSpec {
            exec,
            state_dir: state_dir.into(),
            socket: socket.into(),
            args: Vec::new(),
            env: Vec::new(),
            log: None,
            memory_mib: 256,
            vcpus: 1,
        }
    }

    /// Replaces the `{app}`, `{exec}`, `{state_dir}` and `{socket}` placeholders in `arg`.
    pub fn expand(&self, arg: &str) -> String {
        arg.replace("{app}", &self.exec.app.to_string())
            .replace("{exec}", &self.exec.index.to_string())
            .replace("{state_dir}", &self.state_dir.to_string_lossy())
            .replace("{socket}", &self.socket.to_string_lossy())
    }

    /// The `ZZ_*` variables for this replica.
    pub fn zz_env(&self) -> Vec<(&'static str, String)> {
        vec![
            (ENV_APP, self.exec.app.to_string()),
            (ENV_EXEC_INDEX, self.exec.index.to_string()),
            (ENV_STATE_DIR, self.state_dir.to_string_lossy().into_owned()),
            (ENV_SOCKET, self.socket.to_string_lossy().into_owned()),
        ]
    }
}

/// Where a replica is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ReplicaState {
    /// Known to the backend, never started.
    Defined,
    /// Executing.
    Running,
    /// Dormant in memory: resumes in milliseconds, keeps its memory.
    Paused,
    /// Dormant "on disk": for a VM, a managed save that frees memory and costs
    /// seconds; for a process, see [`crate::process`] (it cannot really be).
    Saved,
    /// Stopped by [`ReplicaLifecycle::destroy`]; its state folder is intact.
    Destroyed,
    /// The replica stopped on its own with this exit code.
    Exited { code: i32 },
    /// The replica was killed by this signal number, not by the backend.
    Crashed { signal: i32 },
}

impl ReplicaState {
    /// Paused or saved: a replica the host can wake.
    pub fn is_dormant(self) -> bool {
        matches!(self, ReplicaState::Paused | ReplicaState::Saved)
    }

    /// Holds a live process or VM (running or dormant).
    pub fn is_live(self) -> bool {
        matches!(
            self,
            ReplicaState::Running | ReplicaState::Paused | ReplicaState::Saved
        )
    }

    /// Died without being asked to.
    pub fn is_dead(self) -> bool {
        matches!(
            self,
            ReplicaState::Exited { .. } | ReplicaState::Crashed { .. }
        )
    }
}

impl fmt::Display for ReplicaState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ReplicaState::Defined => f.write_str("defined"),
            ReplicaState::Running => f.write_str("running"),
            ReplicaState::Paused => f.write_str("paused"),
            ReplicaState::Saved => f.write_str("saved"),
            ReplicaState::Destroyed => f.write_str("destroyed"),
            ReplicaState::Exited { code } => write!(f, "exited with code {code}"),
            ReplicaState::Crashed { signal } => match nix::sys::signal::Signal::try_from(*signal) {
                Ok(s) => write!(f, "crashed ({s})"),
                Err(_) => write!(f, "crashed (signal {signal})"),
            },
        }
    }
}

/// How a host agent makes a replica dormant on `Sleep` (DESIGN §6: both are measured).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum DormantMode {
    /// Pause in memory: wakes in milliseconds, costs memory.
    #[default]
    Paused,
    /// Save to disk: wakes in seconds, frees memory (VM backends only; the
    /// process backend can only pretend, see [`crate::process`]).
    Saved,
}

impl DormantMode {
    /// `saved` is [`DormantMode::Saved`]; anything else (the config only
    /// allows `paused`) is [`DormantMode::Paused`].
    pub fn parse(s: &str) -> DormantMode {
        if s == "saved" {
            DormantMode::Saved
        } else {
            DormantMode::Paused
        }
    }
}

/// The dormant mode of each app of a deployment
/// (`execution.dormant_apps`, else `execution.dormant`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DormantModes {
    pub default: DormantMode,
    pub per_app: std::collections::HashMap<zz_wire::AppId, DormantMode>,
}

impl DormantModes {
    /// The modes a cluster config gives its apps.
    pub fn from_config(cfg: &zz_wire::config::ClusterConfig) -> DormantModes {
        DormantModes {
            default: DormantMode::parse(&cfg.execution.dormant),
            per_app: cfg
                .apps
                .iter()
                .map(|a| (a.id, DormantMode::parse(cfg.dormant_of(a.id))))
                .collect(),
        }
    }

    /// The mode of `app`.
    pub fn of(&self, app: zz_wire::AppId) -> DormantMode {
        self.per_app.get(&app).copied().unwrap_or(self.default)
    }
}

/// Why a lifecycle operation failed. Every message names the cause and what
/// to do about it.
#[derive(Debug, thiserror::Error)]
pub enum LifecycleError {
    #[error(
        "replica {0} is not defined on this host; define it first \
         (does the host agent's config list it?)"
    )]
    UnknownReplica(ExecId),

    #[error("replica {0} is already defined; undefine it first or use the existing definition")]
    AlreadyDefined(ExecId),

    #[error("cannot {op} replica {exec} while it is {state}: {hint}")]
    InvalidTransition {
        exec: ExecId,
        op: &'static str,
        state: ReplicaState,
        hint: &'static str,
    },

    #[error("replica {exec} {state} while being {op}; start or reimage it")]
    Died {
        exec: ExecId,
        op: &'static str,
        state: ReplicaState,
    },

    #[error(
        "could not start `{program}` for replica {exec}: {source}; check that the \
         executor path in the host config exists and is executable"
    )]
    Spawn {
        exec: ExecId,
        program: String,
        #[source]
        source: std::io::Error,
    },

    #[error(
        "could not send {signal} to replica {exec} (pid {pid}): {source}; the host agent \
         must run as the user that started the replica"
    )]
    Signal {
        exec: ExecId,
        pid: i32,
        signal: &'static str,
        #[source]
        source: nix::errno::Errno,
    },

    #[error(
        "replica {exec} did not stop within {waited_ms} ms of SIGSTOP (stuck in \
         uninterruptible I/O?); the stop was cancelled and it is still running: \
         retry, or destroy it"
    )]
    StopTimeout { exec: ExecId, waited_ms: u64 },

    #[error("waiting for replica {exec} (pid {pid}) failed: {source}; is something else reaping the host agent's children (waitpid(-1))?")]
    Wait {
        exec: ExecId,
        pid: i32,
        #[source]
        source: nix::errno::Errno,
    },

    #[error(
        "state folder {path} of replica {exec}: {source}; check that the host agent can \
         create and write it"
    )]
    StateDir {
        exec: ExecId,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error(
        "state folder {path} of replica {exec} is not empty and was not created by zz, so \
         it will not be used (reimaging wipes it); point state_dir at an empty or \
         zz-created folder"
    )]
    StateDirNotOurs { exec: ExecId, path: PathBuf },

    #[error("cannot open log {path} of replica {exec}: {source}; fix the log path in the spec")]
    Log {
        exec: ExecId,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("the {backend} backend cannot {op}: {why}")]
    Unsupported {
        backend: &'static str,
        op: &'static str,
        why: &'static str,
    },

    #[error("{backend} backend error for replica {exec}: {message}")]
    Backend {
        backend: &'static str,
        exec: ExecId,
        message: String,
    },
}

/// One trait for an execution replica's life, whatever holds it: a child
/// process ([`crate::process::ProcessBackend`]) or a libvirt domain (crate
/// `virt`, a later backend). One value manages every replica of one host
/// (for libvirt: one connection URI), keyed by [`ExecId`].
///
/// # Why it is synchronous
///
/// Every backend call blocks: libvirt's C API is synchronous (the `virt` crate
/// wraps it as such) and a managed save takes seconds; the process backend
/// waits until the kernel confirms a stop, and reaps children. An async trait
/// would only hide that blocking inside futures, or need a second thread pool
/// anyway. So the trait is plain and `Send`; the host agent owns the backend
/// behind a `std::sync::Mutex` and calls it inside
/// `tokio::task::spawn_blocking`. The mutex also serializes operations on one
/// host, so a pause can never race a destroy of the same replica;
/// reconfigurations are rare, so the serialization costs nothing. It also lets
/// tests drive a backend without a runtime.
///
/// # Rules every backend follows
///
/// - An operation whose target state already holds is a successful no-op
///   (`pause` of a paused replica, `destroy` of a destroyed one), so a host
///   agent can retry safely. Any other impossible transition is
///   [`LifecycleError::InvalidTransition`], naming the operation to use.
/// - Every operation first notices a replica that died on its own; it then
///   reports [`ReplicaState::Exited`] or [`ReplicaState::Crashed`].
/// - `destroy` and `reimage` work from every state.
/// - When a backend value is dropped, none of its replicas is left running.
pub trait ReplicaLifecycle: Send {
    /// The backend's name, for logs and errors (`"process"`, `"libvirt"`).
    fn backend(&self) -> &'static str;

    /// Makes a replica known, creating its state folder; it is then `Defined`.
    fn define(&mut self, spec: ReplicaSpec) -> Result<(), LifecycleError>;

    /// Forgets a replica that is not live; its state folder is kept.
    fn undefine(&mut self, exec: ExecId) -> Result<(), LifecycleError>;

    /// Boots a replica that is defined, destroyed, exited or crashed, from its
    /// current state folder.
    fn start(&mut self, exec: ExecId) -> Result<(), LifecycleError>;

    /// Running to paused; returns once the replica no longer executes.
    fn pause(&mut self, exec: ExecId) -> Result<(), LifecycleError>;

    /// Paused to running.
    fn resume(&mut self, exec: ExecId) -> Result<(), LifecycleError>;

    /// Running or paused to saved (the slow, memory-freeing dormant mode).
    fn save(&mut self, exec: ExecId) -> Result<(), LifecycleError>;

    /// Saved to running.
    fn restore(&mut self, exec: ExecId) -> Result<(), LifecycleError>;

    /// Stops the replica at once, whatever it is doing; it is then
    /// `Destroyed`. The state folder is kept.
    fn destroy(&mut self, exec: ExecId) -> Result<(), LifecycleError>;

    /// Destroys the replica, wipes its state folder and starts it afresh from
    /// a clean image: what a host does to a replica shown faulty.
    fn reimage(&mut self, exec: ExecId) -> Result<(), LifecycleError>;

    /// The replica's current state, noticing one that died on its own.
    fn state(&mut self, exec: ExecId) -> Result<ReplicaState, LifecycleError>;

    /// Every defined replica.
    fn replicas(&self) -> Vec<ExecId>;
}

/// Carries out an authorized host command on one replica: `Wake` resumes,
/// restores or (re)starts it; `Sleep` makes a running replica dormant in
/// `sleep_mode` (a dormant or dead replica is left as it is); `Reimage`
/// rebuilds it from a clean state and starts it. Returns the resulting state.
///
/// Call it only for commands a [`crate::gate::CommandGate`] let through.
pub fn carry_out<B: ReplicaLifecycle + ?Sized>(
    backend: &mut B,
    exec: ExecId,
    action: HostAction,
    sleep_mode: DormantMode,
) -> Result<ReplicaState, LifecycleError> {
    let before = backend.state(exec)?;
    match action {
        HostAction::Wake => match before {
            ReplicaState::Running => {}
            ReplicaState::Paused => backend.resume(exec)?,
            ReplicaState::Saved => backend.restore(exec)?,
            ReplicaState::Defined
            | ReplicaState::Destroyed
            | ReplicaState::Exited { .. }
            | ReplicaState::Crashed { .. } => backend.start(exec)?,
        },
        HostAction::Sleep => match (before, sleep_mode) {
            (ReplicaState::Running, DormantMode::Paused) => backend.pause(exec)?,
            (ReplicaState::Running | ReplicaState::Paused, DormantMode::Saved) => {
                backend.save(exec)?
            }
            // Already dormant, or not running at all: nothing to put to sleep.
            _ => {}
        },
        HostAction::Reimage => backend.reimage(exec)?,
    }
    let after = backend.state(exec)?;
    tracing::info!(%exec, ?action, %before, %after, backend = backend.backend(), "host command carried out");
    Ok(after)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placeholders_expand_to_the_replicas_values() {
        let spec = ReplicaSpec::new(
            ExecId { app: 7, index: 2 },
            "/var/zz/a7e2",
            "/run/zz/a7e2.sock",
        );
        assert_eq!(
            spec.expand("--app={app} --index={exec} {state_dir}/x {socket}"),
            "--app=7 --index=2 /var/zz/a7e2/x /run/zz/a7e2.sock"
        );
        let env = spec.zz_env();
        assert!(env.contains(&(ENV_EXEC_INDEX, "2".to_string())));
        assert!(env.contains(&(ENV_SOCKET, "/run/zz/a7e2.sock".to_string())));
    }

    #[test]
    fn state_classes_and_display() {
        assert!(ReplicaState::Paused.is_dormant() && ReplicaState::Saved.is_dormant());
        assert!(!ReplicaState::Running.is_dormant());
        assert!(ReplicaState::Saved.is_live() && !ReplicaState::Destroyed.is_live());
        assert!(ReplicaState::Exited { code: 1 }.is_dead());
        assert_eq!(
            ReplicaState::Crashed { signal: 9 }.to_string(),
            "crashed (SIGKILL)"
        );
        assert_eq!(
            ReplicaState::Exited { code: 3 }.to_string(),
            "exited with code 3"
        );
    }

    #[test]
    fn dormant_mode_per_app_overrides_the_deployment_default() {
        use zz_wire::config::AppEntry;
        let dir = tempfile::tempdir().unwrap();
        let opts = zz_client::deploy::DeployOptions {
            apps: vec![],
            ..Default::default()
        };
        let d = zz_client::deploy::write_local(dir.path(), &opts).unwrap();
        let mut cfg = d.config.clone();
        for (id, name) in [(1, "kv"), (2, "cache"), (3, "other")] {
            cfg.apps.push(AppEntry {
                id,
                name: name.into(),
                kind: "counter".into(),
            });
        }
        cfg.execution.dormant = "paused".into();
        cfg.execution.dormant_apps = [("kv", "saved"), ("2", "saved")]
            .into_iter()
            .map(|(a, m)| (a.to_string(), m.to_string()))
            .collect();
        cfg.validate().unwrap();
        let modes = DormantModes::from_config(&cfg);
        assert_eq!(modes.of(1), DormantMode::Saved);
        assert_eq!(modes.of(2), DormantMode::Saved);
        assert_eq!(modes.of(3), DormantMode::Paused);
        cfg.execution
            .dormant_apps
            .insert("nope".into(), "saved".into());
        assert!(cfg.validate().is_err(), "an unknown app is refused");
        cfg.execution.dormant_apps.remove("nope");
        cfg.execution
            .dormant_apps
            .insert("kv".into(), "asleep".into());
        assert!(cfg.validate().is_err(), "an unknown mode is refused");
    }

    #[test]
    fn errors_name_cause_and_fix() {
        let e = LifecycleError::InvalidTransition {
            exec: ExecId { app: 1, index: 0 },
            op: "resume",
            state: ReplicaState::Saved,
            hint: "restore it instead",
        };
        assert_eq!(
            e.to_string(),
            "cannot resume replica app1/exec0 while it is saved: restore it instead"
        );
    }
}
