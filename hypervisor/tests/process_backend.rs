//! The process backend against real child processes.

use std::fs;
use std::path::Path;
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use zz_hypervisor::lifecycle::{ENV_APP, ENV_EXEC_INDEX, ENV_SOCKET, ENV_STATE_DIR};
use zz_hypervisor::process::{SAVED_MARKER, STATE_DIR_MARKER};
use zz_hypervisor::{
    LifecycleError, ProcessBackend, ProcessConfig, ReplicaLifecycle, ReplicaSpec, ReplicaState,
};
use zz_wire::exec::ExecId;

/// Writes an increasing counter to `counter` in its working directory (the
/// state folder) every 10 ms, atomically (write then rename).
const COUNTER: &str = r#"i=0
while :; do
  i=$((i+1))
  echo $i > counter.tmp && mv counter.tmp counter
  sleep 0.01
done"#;

fn exec(i: u32) -> ExecId {
    ExecId { app: 3, index: i }
}

fn counter_backend() -> ProcessBackend {
    ProcessBackend::new(ProcessConfig::new("/bin/sh").args(["-c", COUNTER]))
}

fn define(b: &mut ProcessBackend, dir: &Path, i: u32) -> std::path::PathBuf {
    let state = dir.join(format!("exec{i}"));
    b.define(ReplicaSpec::new(
        exec(i),
        &state,
        dir.join(format!("exec{i}.sock")),
    ))
    .unwrap();
    state
}

fn read_counter(state: &Path) -> Option<u64> {
    fs::read_to_string(state.join("counter"))
        .ok()?
        .trim()
        .parse()
        .ok()
}

fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Alive and not a zombie (a zombie's reaper may be a PID 1 that never reaps).
fn alive(pid: i32) -> bool {
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => false,
        Ok(stat) => {
            let state = stat.rsplit(')').next().unwrap().trim_start();
            !state.starts_with('Z') && !state.starts_with('X')
        }
    }
}

fn proc_state(pid: i32) -> char {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    stat.rsplit(')')
        .next()
        .unwrap()
        .trim_start()
        .chars()
        .next()
        .unwrap()
}

/// Checks that the counter does not move for a while (after letting a write
/// already inside a syscall finish).
fn assert_frozen(state: &Path) -> u64 {
    std::thread::sleep(Duration::from_millis(50));
    let before = read_counter(state).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        read_counter(state).unwrap(),
        before,
        "counter moved while stopped"
    );
    before
}

#[test]
fn sigstop_stops_progress_and_sigcont_resumes_it() {
    let tmp = tempfile::tempdir().unwrap();
    let mut b = counter_backend();
    let state = define(&mut b, tmp.path(), 0);
    b.start(exec(0)).unwrap();
    assert_eq!(b.state(exec(0)).unwrap(), ReplicaState::Running);
    wait_until("the counter runs", || {
        read_counter(&state).is_some_and(|c| c >= 3)
    });

    b.pause(exec(0)).unwrap();
    assert_eq!(b.state(exec(0)).unwrap(), ReplicaState::Paused);
    let pid = b.pid(exec(0)).unwrap();
    assert_eq!(proc_state(pid), 'T', "the kernel reports it stopped");
    let frozen = assert_frozen(&state);
    b.pause(exec(0)).unwrap(); // idempotent

    b.resume(exec(0)).unwrap();
    assert_eq!(b.state(exec(0)).unwrap(), ReplicaState::Running);
    wait_until("the counter moves again", || {
        read_counter(&state).is_some_and(|c| c > frozen + 2)
    });
    b.resume(exec(0)).unwrap(); // idempotent
    assert_eq!(b.pid(exec(0)), Some(pid), "the same process, not a restart");
}

#[test]
fn save_is_a_marked_stop_and_restore_continues() {
    let tmp = tempfile::tempdir().unwrap();
    let mut b = counter_backend();
    let state = define(&mut b, tmp.path(), 0);
    b.start(exec(0)).unwrap();
    wait_until("the counter runs", || {
        read_counter(&state).is_some_and(|c| c >= 3)
    });

    b.save(exec(0)).unwrap();
    assert_eq!(b.state(exec(0)).unwrap(), ReplicaState::Saved);
    assert!(state.join(SAVED_MARKER).is_file());
    let frozen = assert_frozen(&state);
    // A saved replica is restored, not resumed or started.
    for r in [b.resume(exec(0)), b.start(exec(0)), b.pause(exec(0))] {
        assert!(
            matches!(r, Err(LifecycleError::InvalidTransition { .. })),
            "{r:?}"
        );
    }

    b.restore(exec(0)).unwrap();
    assert_eq!(b.state(exec(0)).unwrap(), ReplicaState::Running);
    assert!(!state.join(SAVED_MARKER).exists());
    wait_until("the counter moves again", || {
        read_counter(&state).is_some_and(|c| c > frozen + 2)
    });

    // Paused -> saved is allowed too.
    b.pause(exec(0)).unwrap();
    b.save(exec(0)).unwrap();
    assert_eq!(b.state(exec(0)).unwrap(), ReplicaState::Saved);
    b.destroy(exec(0)).unwrap();
    assert!(!state.join(SAVED_MARKER).exists());
}

#[test]
fn exits_and_crashes_are_noticed_and_the_replica_can_start_again() {
    let tmp = tempfile::tempdir().unwrap();
    let mut b = ProcessBackend::new(ProcessConfig::new("/bin/sh").args(["-c", "exit 3"]));
    define(&mut b, tmp.path(), 0);
    b.start(exec(0)).unwrap();
    wait_until("the exit is noticed", || {
        b.state(exec(0)).unwrap() == ReplicaState::Exited { code: 3 }
    });
    assert_eq!(b.pid(exec(0)), None);
    let err = b.pause(exec(0)).unwrap_err();
    assert!(err.to_string().contains("exited with code 3"), "{err}");

    let mut b = ProcessBackend::new(ProcessConfig::new("/bin/sleep").args(["3600"]));
    define(&mut b, tmp.path(), 1);
    b.start(exec(1)).unwrap();
    let pid = b.pid(exec(1)).unwrap();
    kill(Pid::from_raw(pid), Signal::SIGSEGV).unwrap();
    wait_until("the crash is noticed", || {
        b.state(exec(1)).unwrap()
            == ReplicaState::Crashed {
                signal: Signal::SIGSEGV as i32,
            }
    });
    assert!(!alive(pid));

    // Killed behind the backend's back while paused.
    b.start(exec(1)).unwrap();
    b.pause(exec(1)).unwrap();
    let pid = b.pid(exec(1)).unwrap();
    kill(Pid::from_raw(pid), Signal::SIGKILL).unwrap();
    wait_until("the kill is noticed", || {
        b.state(exec(1)).unwrap().is_dead()
    });
    assert!(matches!(
        b.resume(exec(1)),
        Err(LifecycleError::InvalidTransition { .. })
    ));
    b.start(exec(1)).unwrap();
    assert_eq!(b.state(exec(1)).unwrap(), ReplicaState::Running);
    assert_ne!(b.pid(exec(1)), Some(pid));
}

#[test]
fn destroy_kills_a_paused_replica_and_its_children() {
    let tmp = tempfile::tempdir().unwrap();
    // The replica forks a grandchild and records its pid.
    let script = "sleep 3600 & echo $! > child.pid; wait";
    let mut b = ProcessBackend::new(ProcessConfig::new("/bin/sh").args(["-c", script]));
    let state = define(&mut b, tmp.path(), 0);
    b.start(exec(0)).unwrap();
    wait_until("the grandchild is up", || state.join("child.pid").is_file());
    let leader = b.pid(exec(0)).unwrap();
    let grandchild: i32 = fs::read_to_string(state.join("child.pid"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    b.pause(exec(0)).unwrap();
    wait_until("the grandchild is stopped too", || {
        proc_state(grandchild) == 'T'
    });

    b.destroy(exec(0)).unwrap();
    assert_eq!(b.state(exec(0)).unwrap(), ReplicaState::Destroyed);
    assert!(!alive(leader));
    wait_until("the grandchild is gone", || !alive(grandchild));
    b.destroy(exec(0)).unwrap(); // idempotent
    assert!(
        state.join("child.pid").is_file(),
        "destroy keeps the state folder"
    );
    assert!(matches!(
        b.undefine(exec(9)),
        Err(LifecycleError::UnknownReplica(_))
    ));
    b.undefine(exec(0)).unwrap();
}

#[test]
fn reimage_restarts_from_a_clean_state_folder() {
    let tmp = tempfile::tempdir().unwrap();
    let mut b = counter_backend();
    let state = define(&mut b, tmp.path(), 0);
    b.start(exec(0)).unwrap();
    wait_until("the counter passes 20", || {
        read_counter(&state).is_some_and(|c| c >= 20)
    });
    fs::create_dir_all(state.join("db")).unwrap();
    fs::write(state.join("db/corrupted-page"), b"bad").unwrap();
    let old = b.pid(exec(0)).unwrap();
    b.pause(exec(0)).unwrap();

    b.reimage(exec(0)).unwrap();
    assert_eq!(b.state(exec(0)).unwrap(), ReplicaState::Running);
    let new = b.pid(exec(0)).unwrap();
    assert_ne!(old, new);
    assert!(!alive(old));
    assert!(!state.join("db").exists(), "state folder wiped");
    assert!(state.join(STATE_DIR_MARKER).is_file());
    wait_until("the fresh counter runs", || read_counter(&state).is_some());
    assert!(
        read_counter(&state).unwrap() < 20,
        "counting restarted from scratch"
    );
}

#[test]
fn environment_arguments_and_log_reach_the_executor() {
    let tmp = tempfile::tempdir().unwrap();
    let script = r#"echo "$ZZ_APP $ZZ_EXEC_INDEX $ZZ_SOCKET $ZZ_STATE_DIR $EXTRA $0 $1" > env.txt
echo hello-log; echo oops >&2; exec sleep 3600"#;
    let mut b = ProcessBackend::new(ProcessConfig::new("/bin/sh").args(["-c", script]));
    let state = tmp.path().join("exec2");
    let socket = tmp.path().join("exec2.sock");
    let log = tmp.path().join("exec2.log");
    let mut spec = ReplicaSpec::new(exec(2), &state, &socket);
    spec.args = vec!["--index={exec}".into(), "{socket}".into()];
    spec.env = vec![("EXTRA".into(), "x".into())];
    spec.log = Some(log.clone());
    b.define(spec).unwrap();
    b.start(exec(2)).unwrap();
    wait_until("the script wrote its environment", || {
        fs::read_to_string(state.join("env.txt")).is_ok_and(|s| s.ends_with('\n'))
    });
    let env = fs::read_to_string(state.join("env.txt")).unwrap();
    assert_eq!(
        env.trim(),
        format!(
            "3 2 {} {} x --index=2 {}",
            socket.display(),
            state.display(),
            socket.display()
        )
    );
    wait_until("the log has both streams", || {
        fs::read_to_string(&log).is_ok_and(|s| s.contains("hello-log") && s.contains("oops"))
    });
    // The script above relies on these names.
    assert_eq!(
        [ENV_APP, ENV_EXEC_INDEX, ENV_SOCKET, ENV_STATE_DIR],
        ["ZZ_APP", "ZZ_EXEC_INDEX", "ZZ_SOCKET", "ZZ_STATE_DIR"]
    );
}

#[test]
fn dropping_the_backend_leaves_no_child_behind() {
    let tmp = tempfile::tempdir().unwrap();
    let mut b = counter_backend();
    let mut pids = vec![];
    for i in 0..3 {
        define(&mut b, tmp.path(), i);
        b.start(exec(i)).unwrap();
        pids.push(b.pid(exec(i)).unwrap());
    }
    b.pause(exec(1)).unwrap();
    b.save(exec(2)).unwrap();
    let state0 = tmp.path().join("exec0");
    wait_until("replica 0 counts", || read_counter(&state0).is_some());
    drop(b);
    for pid in pids {
        assert!(!alive(pid), "pid {pid} survived the backend");
    }
    let c = read_counter(&state0).unwrap();
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(read_counter(&state0).unwrap(), c);
}

#[test]
fn pausing_a_leader_that_keeps_forking_never_deadlocks() {
    // dash runs `true` through vfork: a stop sent to the whole group at once
    // could catch the vfork child before its exec and leave the leader
    // unstoppable. The backend stops the leader first; this hammers that window.
    let tmp = tempfile::tempdir().unwrap();
    let mut b = ProcessBackend::new(
        ProcessConfig::new("/bin/sh").args(["-c", "while :; do /bin/true; done"]),
    );
    define(&mut b, tmp.path(), 0);
    b.start(exec(0)).unwrap();
    for _ in 0..200 {
        b.pause(exec(0)).unwrap();
        b.resume(exec(0)).unwrap();
    }
    for _ in 0..50 {
        b.save(exec(0)).unwrap();
        b.restore(exec(0)).unwrap();
    }
}
