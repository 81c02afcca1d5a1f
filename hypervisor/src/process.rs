//! The process backend: each execution replica is a plain child process of the
//! host agent (DESIGN §6), the default on a laptop and for fast tests.
//!
//! - **start** spawns the configured program with the backend's arguments,
//!   then the replica's ([`ReplicaSpec::args`], placeholders expanded), the
//!   `ZZ_*` environment, and the state folder as working directory. The child
//!   leads its own process group, so every signal below reaches whatever it
//!   forks too, and a terminal's Ctrl-C does not reach it.
//! - **pause** is `SIGSTOP` to the child, then, once the kernel reports it
//!   stopped (`waitid` with `WSTOPPED | WNOWAIT`, polled with backoff up to
//!   [`ProcessConfig::stop_timeout`]), `SIGSTOP` to the rest of its group. A
//!   stop is delivered asynchronously and "paused" must mean "executes
//!   nothing more", hence the wait; the leader goes first because a group
//!   stop can deadlock a leader inside `vfork` (see `Replica::stop`).
//!   **resume** is `SIGCONT` to the group; `SIGCONT` wakes a stopped task
//!   inside the `kill` call itself, so it needs no wait.
//! - **save** cannot be honest for a process: nothing swaps a process image
//!   to disk and brings it back. A saved process replica is therefore a
//!   paused one (`SIGSTOP`, memory still held) plus a marker file
//!   [`SAVED_MARKER`] in its state folder, so the two dormant modes stay
//!   distinct states with the same transitions as under libvirt; **restore**
//!   is `SIGCONT` and removes the marker. Killing the process and restarting
//!   it from its state folder would free memory, but unlike a managed save it
//!   is visible to the executor (it loses everything since its last
//!   checkpoint), so it would test a different recovery path than a VM's
//!   save and restore; `reimage` already covers that path.
//! - **destroy** is `SIGKILL` to the group, then the child is reaped.
//!   **reimage** is destroy, wipe the state folder, start afresh.
//! - **state** notices a child that died on its own: `waitid(WEXITED |
//!   WNOHANG | WNOWAIT)` peeks without reaping, so the dead leader keeps its
//!   pid and group id reserved while the rest of its group is killed; only
//!   then is it reaped. No signal is ever sent to a pid this backend reaped.
//! - Dropping the backend kills and reaps every child.
//!
//! Limits: the backend must be the only one reaping the host agent's children
//! (no `waitpid(-1)` elsewhere in the process). Children do not die if the
//! host agent is killed with SIGKILL (its `Drop` cannot run); `PR_SET_PDEATHSIG`
//! is not used because it fires when the spawning *thread* exits, and the
//! host agent spawns from short-lived `spawn_blocking` threads; an executor
//! should instead exit when its socket to the host agent closes.

use std::collections::BTreeMap;
use std::fs;
use std::io;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::signal::{kill, killpg, Signal};
use nix::sys::wait::{waitid, waitpid, Id, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use zz_wire::exec::ExecId;

use crate::lifecycle::{LifecycleError, ReplicaLifecycle, ReplicaSpec, ReplicaState};

const BACKEND: &str = "process";

/// File that marks a folder as a zz state folder: only such a folder is ever
/// wiped by a reimage.
pub const STATE_DIR_MARKER: &str = ".zz-state-dir";

/// File present in the state folder of a replica in the `saved` dormant mode.
pub const SAVED_MARKER: &str = ".zz-saved";

/// Host-wide settings of the process backend.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProcessConfig {
    /// The executor program (`zz-executor`, or anything in tests).
    pub program: PathBuf,
    /// Arguments before each replica's own; placeholders are expanded.
    pub args: Vec<String>,
    /// Environment for every replica, before each replica's own. The host
    /// agent's environment is inherited.
    pub env: Vec<(String, String)>,
    /// How long `pause` and `save` wait for the kernel to report the stop.
    pub stop_timeout: Duration,
}

impl ProcessConfig {
    /// Runs `program` with no extra arguments; stops must complete in 5 s.
    pub fn new(program: impl Into<PathBuf>) -> Self {
        ProcessConfig {
            program: program.into(),
            args: Vec::new(),
            env: Vec::new(),
            stop_timeout: Duration::from_secs(5),
        }
    }

    /// Adds arguments for every replica.
    pub fn args<I, S>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.args.extend(args.into_iter().map(Into::into));
        self
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Status {
    Defined,
    Running(Pid),
    Paused(Pid),
    Saved(Pid),
    Destroyed,
    Exited(i32),
    Crashed(i32),
}

/// Who a signal goes to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Target {
    /// The replica's own process.
    Leader,
    /// The replica's process group: the replica and whatever it forked.
    Group,
}

#[derive(Debug)]
struct Replica {
    spec: ReplicaSpec,
    status: Status,
}

/// Execution replicas as child processes of this process.
#[derive(Debug)]
pub struct ProcessBackend {
    config: ProcessConfig,
    replicas: BTreeMap<ExecId, Replica>,
}

impl ProcessBackend {
    pub fn new(config: ProcessConfig) -> Self {
        ProcessBackend {
            config,
            replicas: BTreeMap::new(),
        }
    }

    pub fn config(&self) -> &ProcessConfig {
        &self.config
    }

    /// The replica's process id while it is live (running, paused or saved).
    /// It is also the id of the replica's process group.
    pub fn pid(&self, exec: ExecId) -> Option<i32> {
        self.replicas
            .get(&exec)
            .and_then(|r| r.live_pid())
            .map(Pid::as_raw)
    }

    /// The replica's definition.
    pub fn spec(&self, exec: ExecId) -> Option<&ReplicaSpec> {
        self.replicas.get(&exec).map(|r| &r.spec)
    }

    fn get(&mut self, exec: ExecId) -> Result<&mut Replica, LifecycleError> {
        let r = self
            .replicas
            .get_mut(&exec)
            .ok_or(LifecycleError::UnknownReplica(exec))?;
        r.refresh()?;
        Ok(r)
    }
}

impl Drop for ProcessBackend {
    fn drop(&mut self) {
        for r in self.replicas.values_mut() {
            if let Err(e) = r.kill_and_reap() {
                tracing::warn!(exec = %r.spec.exec, error = %e, "could not kill replica on drop");
            }
        }
    }
}

fn invalid(
    exec: ExecId,
    op: &'static str,
    state: ReplicaState,
    hint: &'static str,
) -> LifecycleError {
    LifecycleError::InvalidTransition {
        exec,
        op,
        state,
        hint,
    }
}

impl Replica {
    fn live_pid(&self) -> Option<Pid> {
        match self.status {
            Status::Running(p) | Status::Paused(p) | Status::Saved(p) => Some(p),
            _ => None,
        }
    }

    fn state(&self) -> ReplicaState {
        match self.status {
            Status::Defined => ReplicaState::Defined,
            Status::Running(_) => ReplicaState::Running,
            Status::Paused(_) => ReplicaState::Paused,
            Status::Saved(_) => ReplicaState::Saved,
            Status::Destroyed => ReplicaState::Destroyed,
            Status::Exited(code) => ReplicaState::Exited { code },
            Status::Crashed(signal) => ReplicaState::Crashed { signal },
        }
    }

    fn exec(&self) -> ExecId {
        self.spec.exec
    }

    /// Notices a child that died on its own (peeking, so its pid stays
    /// reserved until its group is cleaned up and it is reaped).
    fn refresh(&mut self) -> Result<(), LifecycleError> {
        let Some(pid) = self.live_pid() else {
            return Ok(());
        };
        let flags = WaitPidFlag::WEXITED | WaitPidFlag::WNOHANG | WaitPidFlag::WNOWAIT;
        match retry_eintr(|| waitid(Id::Pid(pid), flags)) {
            Ok(WaitStatus::Exited(..)) | Ok(WaitStatus::Signaled(..)) => {
                self.bury(pid)?;
                Ok(())
            }
            Ok(_) => Ok(()),
            Err(source) => {
                // Someone else reaped our child: we can no longer tell how it ended.
                self.status = Status::Exited(-1);
                Err(LifecycleError::Wait {
                    exec: self.exec(),
                    pid: pid.as_raw(),
                    source,
                })
            }
        }
    }

    /// For a leader known to be dead (a zombie): kills what is left of its
    /// group, reaps it and records how it ended.
    fn bury(&mut self, pid: Pid) -> Result<ReplicaState, LifecycleError> {
        // The zombie leader keeps the group id reserved, so this cannot hit a
        // stranger; ESRCH just means nothing is left.
        let _ = killpg(pid, Signal::SIGKILL);
        let status = retry_eintr(|| waitpid(pid, None)).map_err(|source| LifecycleError::Wait {
            exec: self.exec(),
            pid: pid.as_raw(),
            source,
        })?;
        self.status = match status {
            WaitStatus::Exited(_, code) => Status::Exited(code),
            WaitStatus::Signaled(_, sig, _) => Status::Crashed(sig as i32),
            other => {
                return Err(LifecycleError::Backend {
                    backend: BACKEND,
                    exec: self.exec(),
                    message: format!("unexpected wait status {other:?} for a dead child"),
                })
            }
        };
        tracing::info!(exec = %self.exec(), state = %self.state(), "replica process ended");
        let _ = remove_if_present(&self.spec.state_dir.join(SAVED_MARKER));
        Ok(self.state())
    }

    /// Sends `sig` to the replica's leader or its whole process group; a
    /// child found dead instead is buried and reported as [`LifecycleError::Died`].
    fn signal(&mut self, op: &'static str, sig: Signal, to: Target) -> Result<(), LifecycleError> {
        let Some(pid) = self.live_pid() else {
            return Ok(());
        };
        let sent = match to {
            Target::Leader => kill(pid, sig),
            Target::Group => killpg(pid, sig),
        };
        match sent {
            Ok(()) => Ok(()),
            Err(source) => {
                self.refresh()?;
                if self.live_pid().is_none() {
                    return Err(LifecycleError::Died {
                        exec: self.exec(),
                        op,
                        state: self.state(),
                    });
                }
                Err(LifecycleError::Signal {
                    exec: self.exec(),
                    pid: pid.as_raw(),
                    signal: sig.as_str(),
                    source,
                })
            }
        }
    }

    /// Stops the replica: SIGSTOP to the leader, wait until the kernel
    /// reports it stopped, then SIGSTOP to the rest of its group.
    ///
    /// Why not the whole group at once: a leader inside `vfork` (shells and
    /// `posix_spawn` use it) waits for its child's exec in an uninterruptible
    /// sleep that a stop signal does not end; if the child, being in the
    /// group, stops before its exec, the leader never stops (seen with dash
    /// on the counter test). Signalled alone, the leader stops as soon as its
    /// vfork child has exec'd.
    ///
    /// On timeout the stop is cancelled with SIGCONT (a pending stop would
    /// otherwise land later, unannounced).
    fn stop(&mut self, op: &'static str, timeout: Duration) -> Result<(), LifecycleError> {
        let Some(pid) = self.live_pid() else {
            return Ok(());
        };
        self.signal(op, Signal::SIGSTOP, Target::Leader)?;
        let start = Instant::now();
        let flags = WaitPidFlag::WSTOPPED
            | WaitPidFlag::WEXITED
            | WaitPidFlag::WNOHANG
            | WaitPidFlag::WNOWAIT;
        let mut backoff = Backoff::new();
        loop {
            match retry_eintr(|| waitid(Id::Pid(pid), flags)) {
                Ok(WaitStatus::Stopped(..)) => break,
                Ok(WaitStatus::Exited(..)) | Ok(WaitStatus::Signaled(..)) => {
                    let state = self.bury(pid)?;
                    return Err(LifecycleError::Died {
                        exec: self.exec(),
                        op,
                        state,
                    });
                }
                Ok(_) => {}
                Err(source) => {
                    return Err(LifecycleError::Wait {
                        exec: self.exec(),
                        pid: pid.as_raw(),
                        source,
                    })
                }
            }
            if start.elapsed() >= timeout {
                self.signal(op, Signal::SIGCONT, Target::Group)?;
                return Err(LifecycleError::StopTimeout {
                    exec: self.exec(),
                    waited_ms: start.elapsed().as_millis() as u64,
                });
            }
            backoff.wait();
        }
        // The leader makes no progress now; stop whatever it forked too.
        self.signal(op, Signal::SIGSTOP, Target::Group)
    }

    /// SIGKILL to the group and reap; a no-op for a replica with no process.
    fn kill_and_reap(&mut self) -> Result<(), LifecycleError> {
        let Some(pid) = self.live_pid() else {
            return Ok(());
        };
        // Not yet reaped, so the pid and group id are still ours.
        let _ = killpg(pid, Signal::SIGKILL);
        let _ = kill(pid, Signal::SIGKILL);
        retry_eintr(|| waitpid(pid, None)).map_err(|source| LifecycleError::Wait {
            exec: self.exec(),
            pid: pid.as_raw(),
            source,
        })?;
        self.status = Status::Destroyed;
        remove_if_present(&self.spec.state_dir.join(SAVED_MARKER)).map_err(|source| {
            LifecycleError::StateDir {
                exec: self.exec(),
                path: self.spec.state_dir.clone(),
                source,
            }
        })
    }

    fn spawn(&mut self, config: &ProcessConfig) -> Result<(), LifecycleError> {
        let spec = &self.spec;
        let exec = spec.exec;
        let state_dir_err = |source| LifecycleError::StateDir {
            exec,
            path: spec.state_dir.clone(),
            source,
        };
        remove_if_present(&spec.state_dir.join(SAVED_MARKER)).map_err(state_dir_err)?;
        let (stdout, stderr) = match &spec.log {
            None => (Stdio::null(), Stdio::null()),
            Some(path) => {
                let log_err = |source| LifecycleError::Log {
                    exec,
                    path: path.clone(),
                    source,
                };
                let f = fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)
                    .map_err(log_err)?;
                let g = f.try_clone().map_err(log_err)?;
                (Stdio::from(f), Stdio::from(g))
            }
        };
        let mut cmd = Command::new(&config.program);
        cmd.args(config.args.iter().map(|a| spec.expand(a)))
            .args(spec.args.iter().map(|a| spec.expand(a)))
            .envs(config.env.iter().map(|(k, v)| (k, v)))
            .envs(spec.env.iter().map(|(k, v)| (k, v)))
            .envs(spec.zz_env())
            .current_dir(&spec.state_dir)
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr)
            // Own process group: signals reach the child's own children too.
            .process_group(0);
        let child = cmd.spawn().map_err(|source| LifecycleError::Spawn {
            exec,
            program: config.program.display().to_string(),
            source,
        })?;
        let pid = Pid::from_raw(child.id() as i32);
        // From here on the pid is managed with waitid/waitpid directly;
        // dropping `Child` neither waits for nor kills the process.
        drop(child);
        self.status = Status::Running(pid);
        tracing::info!(%exec, pid = pid.as_raw(), "replica process started");
        Ok(())
    }

    /// Removes everything in the state folder but its marker; refuses a
    /// folder without the marker.
    fn wipe(&self) -> Result<(), LifecycleError> {
        let dir = &self.spec.state_dir;
        let err = |source| LifecycleError::StateDir {
            exec: self.exec(),
            path: dir.clone(),
            source,
        };
        if !dir.join(STATE_DIR_MARKER).is_file() {
            return Err(LifecycleError::StateDirNotOurs {
                exec: self.exec(),
                path: dir.clone(),
            });
        }
        for entry in fs::read_dir(dir).map_err(err)? {
            let entry = entry.map_err(err)?;
            if entry.file_name() == STATE_DIR_MARKER {
                continue;
            }
            // file_type does not follow symlinks: a link is removed, never its target.
            let path = entry.path();
            if entry.file_type().map_err(err)?.is_dir() {
                fs::remove_dir_all(&path).map_err(err)?;
            } else {
                fs::remove_file(&path).map_err(err)?;
            }
        }
        Ok(())
    }
}

/// Creates the state folder if needed and claims it with the marker; an
/// existing non-empty folder without the marker is refused.
fn prepare_state_dir(exec: ExecId, dir: &Path) -> Result<(), LifecycleError> {
    let err = |source| LifecycleError::StateDir {
        exec,
        path: dir.to_path_buf(),
        source,
    };
    fs::create_dir_all(dir).map_err(err)?;
    let marker = dir.join(STATE_DIR_MARKER);
    if marker.is_file() {
        return Ok(());
    }
    if fs::read_dir(dir).map_err(err)?.next().is_some() {
        return Err(LifecycleError::StateDirNotOurs {
            exec,
            path: dir.to_path_buf(),
        });
    }
    fs::write(&marker, format!("zz state folder of {exec}\n")).map_err(err)
}

fn remove_if_present(path: &Path) -> io::Result<()> {
    match fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

fn retry_eintr<T>(mut f: impl FnMut() -> nix::Result<T>) -> nix::Result<T> {
    loop {
        match f() {
            Err(Errno::EINTR) => continue,
            r => return r,
        }
    }
}

/// Polling schedule while waiting for a stop: yield a few times (a stop
/// usually lands within microseconds), then sleep 20 µs doubling to 1 ms.
struct Backoff {
    round: u32,
}

impl Backoff {
    fn new() -> Self {
        Backoff { round: 0 }
    }

    fn wait(&mut self) {
        if self.round < 8 {
            std::thread::yield_now();
        } else {
            let us = (20u64 << (self.round - 8).min(6)).min(1000);
            std::thread::sleep(Duration::from_micros(us));
        }
        self.round += 1;
    }
}

impl ReplicaLifecycle for ProcessBackend {
    fn backend(&self) -> &'static str {
        BACKEND
    }

    fn define(&mut self, spec: ReplicaSpec) -> Result<(), LifecycleError> {
        if self.replicas.contains_key(&spec.exec) {
            return Err(LifecycleError::AlreadyDefined(spec.exec));
        }
        prepare_state_dir(spec.exec, &spec.state_dir)?;
        self.replicas.insert(
            spec.exec,
            Replica {
                spec,
                status: Status::Defined,
            },
        );
        Ok(())
    }

    fn undefine(&mut self, exec: ExecId) -> Result<(), LifecycleError> {
        let r = self.get(exec)?;
        if r.live_pid().is_some() {
            return Err(invalid(exec, "undefine", r.state(), "destroy it first"));
        }
        self.replicas.remove(&exec);
        Ok(())
    }

    fn start(&mut self, exec: ExecId) -> Result<(), LifecycleError> {
        let config = self.config.clone();
        let r = self.get(exec)?;
        match r.status {
            Status::Running(_) => Ok(()),
            Status::Paused(_) => Err(invalid(exec, "start", r.state(), "resume it instead")),
            Status::Saved(_) => Err(invalid(exec, "start", r.state(), "restore it instead")),
            Status::Defined | Status::Destroyed | Status::Exited(_) | Status::Crashed(_) => {
                r.spawn(&config)
            }
        }
    }

    fn pause(&mut self, exec: ExecId) -> Result<(), LifecycleError> {
        let timeout = self.config.stop_timeout;
        let r = self.get(exec)?;
        match r.status {
            Status::Paused(_) => Ok(()),
            Status::Running(pid) => {
                r.stop("paused", timeout)?;
                r.status = Status::Paused(pid);
                Ok(())
            }
            Status::Saved(_) => Err(invalid(
                exec,
                "pause",
                r.state(),
                "it is already dormant; restore it first",
            )),
            _ => Err(invalid(
                exec,
                "pause",
                r.state(),
                "it is not running; start it first",
            )),
        }
    }

    fn resume(&mut self, exec: ExecId) -> Result<(), LifecycleError> {
        let r = self.get(exec)?;
        match r.status {
            Status::Running(_) => Ok(()),
            Status::Paused(pid) => {
                r.signal("resumed", Signal::SIGCONT, Target::Group)?;
                r.status = Status::Running(pid);
                Ok(())
            }
            Status::Saved(_) => Err(invalid(exec, "resume", r.state(), "restore it instead")),
            _ => Err(invalid(
                exec,
                "resume",
                r.state(),
                "it is not paused; start it instead",
            )),
        }
    }

    fn save(&mut self, exec: ExecId) -> Result<(), LifecycleError> {
        let timeout = self.config.stop_timeout;
        let r = self.get(exec)?;
        let pid = match r.status {
            Status::Saved(_) => return Ok(()),
            Status::Running(pid) => {
                r.stop("saved", timeout)?;
                r.status = Status::Paused(pid);
                pid
            }
            Status::Paused(pid) => pid,
            _ => {
                return Err(invalid(
                    exec,
                    "save",
                    r.state(),
                    "only a live replica can be saved; start it first",
                ))
            }
        };
        let marker = r.spec.state_dir.join(SAVED_MARKER);
        fs::write(&marker, format!("pid {}\n", pid.as_raw())).map_err(|source| {
            LifecycleError::StateDir {
                exec,
                path: r.spec.state_dir.clone(),
                source,
            }
        })?;
        r.status = Status::Saved(pid);
        Ok(())
    }

    fn restore(&mut self, exec: ExecId) -> Result<(), LifecycleError> {
        let r = self.get(exec)?;
        match r.status {
            Status::Running(_) => Ok(()),
            Status::Saved(pid) => {
                r.signal("restored", Signal::SIGCONT, Target::Group)?;
                r.status = Status::Running(pid);
                remove_if_present(&r.spec.state_dir.join(SAVED_MARKER)).map_err(|source| {
                    LifecycleError::StateDir {
                        exec,
                        path: r.spec.state_dir.clone(),
                        source,
                    }
                })
            }
            Status::Paused(_) => Err(invalid(exec, "restore", r.state(), "resume it instead")),
            _ => Err(invalid(
                exec,
                "restore",
                r.state(),
                "it is not saved; start it instead",
            )),
        }
    }

    fn destroy(&mut self, exec: ExecId) -> Result<(), LifecycleError> {
        let r = self.get(exec)?;
        r.kill_and_reap()?;
        r.status = Status::Destroyed;
        Ok(())
    }

    fn reimage(&mut self, exec: ExecId) -> Result<(), LifecycleError> {
        let config = self.config.clone();
        let r = self.get(exec)?;
        r.kill_and_reap()?;
        r.status = Status::Destroyed;
        r.wipe()?;
        r.spawn(&config)?;
        tracing::info!(%exec, "replica reimaged");
        Ok(())
    }

    fn state(&mut self, exec: ExecId) -> Result<ReplicaState, LifecycleError> {
        Ok(self.get(exec)?.state())
    }

    fn replicas(&self) -> Vec<ExecId> {
        self.replicas.keys().copied().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn exec(i: u32) -> ExecId {
        ExecId { app: 1, index: i }
    }

    #[test]
    fn define_claims_an_empty_folder_and_refuses_a_foreign_one() {
        let tmp = tempfile::tempdir().unwrap();
        let mut b = ProcessBackend::new(ProcessConfig::new("/bin/true"));
        let dir = tmp.path().join("r0");
        b.define(ReplicaSpec::new(exec(0), &dir, tmp.path().join("r0.sock")))
            .unwrap();
        assert!(dir.join(STATE_DIR_MARKER).is_file());
        assert!(matches!(
            b.define(ReplicaSpec::new(exec(0), &dir, "x")),
            Err(LifecycleError::AlreadyDefined(_))
        ));

        let foreign = tmp.path().join("foreign");
        fs::create_dir(&foreign).unwrap();
        fs::write(foreign.join("precious"), b"do not wipe").unwrap();
        let err = b
            .define(ReplicaSpec::new(exec(1), &foreign, "x"))
            .unwrap_err();
        assert!(
            matches!(err, LifecycleError::StateDirNotOurs { .. }),
            "{err}"
        );
        assert!(foreign.join("precious").is_file());
        assert_eq!(b.replicas(), vec![exec(0)]);
    }

    #[test]
    fn transitions_from_defined_are_checked() {
        let tmp = tempfile::tempdir().unwrap();
        let mut b = ProcessBackend::new(ProcessConfig::new("/bin/true"));
        b.define(ReplicaSpec::new(exec(0), tmp.path().join("r"), "s"))
            .unwrap();
        assert_eq!(b.state(exec(0)).unwrap(), ReplicaState::Defined);
        for r in [
            b.pause(exec(0)),
            b.resume(exec(0)),
            b.save(exec(0)),
            b.restore(exec(0)),
        ] {
            assert!(matches!(r, Err(LifecycleError::InvalidTransition { .. })));
        }
        assert!(matches!(
            b.start(exec(9)),
            Err(LifecycleError::UnknownReplica(_))
        ));
        b.destroy(exec(0)).unwrap();
        assert_eq!(b.state(exec(0)).unwrap(), ReplicaState::Destroyed);
        b.undefine(exec(0)).unwrap();
        assert!(b.replicas().is_empty());
    }

    #[test]
    fn a_backend_moves_to_a_blocking_thread_as_a_trait_object() {
        // How the host agent uses it: Box<dyn ReplicaLifecycle> in spawn_blocking.
        let b: Box<dyn ReplicaLifecycle> =
            Box::new(ProcessBackend::new(ProcessConfig::new("/bin/true")));
        let name = std::thread::spawn(move || b.backend()).join().unwrap();
        assert_eq!(name, "process");
    }

    #[test]
    fn a_missing_program_is_a_spawn_error_naming_it() {
        let tmp = tempfile::tempdir().unwrap();
        let mut b = ProcessBackend::new(ProcessConfig::new("/nonexistent/zz-executor"));
        b.define(ReplicaSpec::new(exec(0), tmp.path().join("r"), "s"))
            .unwrap();
        let err = b.start(exec(0)).unwrap_err();
        assert!(
            err.to_string().contains("/nonexistent/zz-executor"),
            "{err}"
        );
        assert_eq!(b.state(exec(0)).unwrap(), ReplicaState::Defined);
    }

    #[test]
    fn wipe_keeps_only_the_marker_and_never_follows_links() {
        let tmp = tempfile::tempdir().unwrap();
        let outside = tmp.path().join("outside");
        fs::create_dir(&outside).unwrap();
        fs::write(outside.join("keep"), b"x").unwrap();
        let dir = tmp.path().join("r");
        let mut b = ProcessBackend::new(ProcessConfig::new("/bin/true"));
        b.define(ReplicaSpec::new(exec(0), &dir, "s")).unwrap();
        fs::create_dir_all(dir.join("db/sub")).unwrap();
        fs::write(dir.join("db/sub/page"), b"p").unwrap();
        fs::write(dir.join("file"), b"f").unwrap();
        std::os::unix::fs::symlink(&outside, dir.join("link")).unwrap();
        b.replicas[&exec(0)].wipe().unwrap();
        let left: Vec<_> = fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(left, vec![std::ffi::OsString::from(STATE_DIR_MARKER)]);
        assert!(outside.join("keep").is_file());
    }
}
