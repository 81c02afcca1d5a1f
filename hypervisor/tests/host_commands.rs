//! The host agent's path end to end, without networking: signed host commands
//! through the gate, authorized ones carried out on real child processes.

use std::fs;
use std::path::Path;

use zz_hypervisor::{
    carry_out, CommandGate, DormantMode, ProcessBackend, ProcessConfig, ReplicaLifecycle,
    ReplicaSpec, ReplicaState, Verdict,
};
use zz_wire::crypto::KeyPair;
use zz_wire::exec::{Epoch, ExecId, HostAction, HostCommand};
use zz_wire::message::Signed;
use zz_wire::ReplicaId;

const APP: u32 = 4;

struct Host {
    gate: CommandGate,
    backend: ProcessBackend,
    mode: DormantMode,
    fired: Vec<(ExecId, HostAction)>,
}

impl Host {
    /// What zz-hostd does with one received command.
    fn receive(&mut self, cmd: &Signed<HostCommand>) {
        if let Ok(Verdict::Fire(fire)) = self.gate.on_command(cmd) {
            carry_out(&mut self.backend, fire.exec, fire.action, self.mode).unwrap();
            self.fired.push((fire.exec, fire.action));
        }
    }
}

fn exec(i: u32) -> ExecId {
    ExecId { app: APP, index: i }
}

fn keys(f: usize) -> Vec<KeyPair> {
    (0..3 * f + 1)
        .map(|i| KeyPair::from_seed([i as u8 + 100; 32]))
        .collect()
}

fn cmd(
    keys: &[KeyPair],
    from: ReplicaId,
    epoch: Epoch,
    e: u32,
    action: HostAction,
) -> Signed<HostCommand> {
    Signed::sign(
        HostCommand {
            app: APP,
            epoch,
            exec: e,
            action,
            replica: from,
        },
        &keys[from as usize],
    )
}

/// 2f+1 replicas of the app on this host: f+1 running, f paused.
fn host(f: usize, keys: &[KeyPair], dir: &Path, mode: DormantMode) -> Host {
    let execs: Vec<ExecId> = (0..2 * f as u32 + 1).map(exec).collect();
    let mut backend = ProcessBackend::new(ProcessConfig::new("/bin/sleep").args(["3600"]));
    for &e in &execs {
        let spec = ReplicaSpec::new(e, dir.join(format!("{e}").replace('/', "-")), dir.join("s"));
        backend.define(spec).unwrap();
        backend.start(e).unwrap();
        if e.index as usize > f {
            backend.pause(e).unwrap();
        }
    }
    let gate = CommandGate::new(f, keys.iter().map(KeyPair::public).collect(), execs).unwrap();
    Host {
        gate,
        backend,
        mode,
        fired: vec![],
    }
}

fn states(h: &mut Host) -> Vec<ReplicaState> {
    let execs = h.backend.replicas();
    execs
        .into_iter()
        .map(|e| h.backend.state(e).unwrap())
        .collect()
}

#[test]
fn a_lone_byzantine_agreement_replica_can_neither_wake_nor_reimage() {
    for f in [1, 2] {
        let k = keys(f);
        let tmp = tempfile::tempdir().unwrap();
        let mut h = host(f, &k, tmp.path(), DormantMode::Paused);
        let before = states(&mut h);
        let pids: Vec<_> = h
            .backend
            .replicas()
            .iter()
            .map(|&e| h.backend.pid(e))
            .collect();
        let byz = 3 * f as u32;
        for epoch in 1..5 {
            for e in 0..2 * f as u32 + 1 {
                for action in [HostAction::Wake, HostAction::Reimage, HostAction::Sleep] {
                    h.receive(&cmd(&k, byz, epoch, e, action));
                    h.receive(&cmd(&k, byz, epoch, e, action));
                }
            }
        }
        assert!(h.fired.is_empty());
        assert_eq!(states(&mut h), before, "f={f}");
        let after: Vec<_> = h
            .backend
            .replicas()
            .iter()
            .map(|&e| h.backend.pid(e))
            .collect();
        assert_eq!(pids, after, "nothing was reimaged");
    }
}

#[test]
fn f_plus_one_wakes_wake_the_dormant_replicas_exactly_once() {
    for f in [1, 2] {
        let k = keys(f);
        let tmp = tempfile::tempdir().unwrap();
        let mut h = host(f, &k, tmp.path(), DormantMode::Paused);
        let dormant: Vec<u32> = (f as u32 + 1..2 * f as u32 + 1).collect();
        // Every agreement replica sends Wake for every dormant replica, twice.
        for round in 0..2 {
            for r in 0..3 * f as u32 + 1 {
                for &e in &dormant {
                    h.receive(&cmd(&k, r, 1, e, HostAction::Wake));
                }
            }
            assert_eq!(h.fired.len(), f, "f={f} round {round}");
        }
        assert!(states(&mut h).iter().all(|s| *s == ReplicaState::Running));

        // Then the extras go back to sleep, saved this time.
        h.mode = DormantMode::Saved;
        for r in 0..=f as u32 {
            for &e in &dormant {
                h.receive(&cmd(&k, r, 2, e, HostAction::Sleep));
            }
        }
        for &e in &dormant {
            assert_eq!(h.backend.state(exec(e)).unwrap(), ReplicaState::Saved);
        }
        // A delayed Wake of epoch 1 from a replica that had not sent it yet is stale.
        let late = 3 * f as u32;
        h.receive(&cmd(&k, late, 1, dormant[0], HostAction::Wake));
        assert_eq!(
            h.backend.state(exec(dormant[0])).unwrap(),
            ReplicaState::Saved
        );
    }
}

#[test]
fn f_plus_one_reimages_rebuild_the_replica_from_a_clean_state() {
    let f = 1;
    let k = keys(f);
    let tmp = tempfile::tempdir().unwrap();
    let mut h = host(f, &k, tmp.path(), DormantMode::Paused);
    let target = exec(0);
    let state_dir = h.backend.spec(target).unwrap().state_dir.clone();
    fs::write(state_dir.join("page"), b"corrupted").unwrap();
    let old = h.backend.pid(target).unwrap();

    // One forged vote plus one real one: no reimage.
    let mut forged = cmd(&k, 1, 7, 0, HostAction::Reimage);
    forged.sig = cmd(&k, 3, 7, 0, HostAction::Reimage).sig;
    h.receive(&forged);
    h.receive(&cmd(&k, 2, 7, 0, HostAction::Reimage));
    assert_eq!(h.backend.pid(target), Some(old));
    assert!(state_dir.join("page").exists());

    h.receive(&cmd(&k, 0, 7, 0, HostAction::Reimage));
    assert_eq!(h.fired, vec![(target, HostAction::Reimage)]);
    let new = h.backend.pid(target).unwrap();
    assert_ne!(new, old);
    assert!(!state_dir.join("page").exists());
    assert_eq!(h.backend.state(target).unwrap(), ReplicaState::Running);

    // The rest of the cluster's votes arrive late: nothing happens again.
    h.receive(&cmd(&k, 1, 7, 0, HostAction::Reimage));
    h.receive(&cmd(&k, 3, 7, 0, HostAction::Reimage));
    assert_eq!(h.fired.len(), 1);
    assert_eq!(h.backend.pid(target), Some(new));
}
