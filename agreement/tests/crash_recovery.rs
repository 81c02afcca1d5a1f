//! Process-level crash tests: real `zz-agreement` daemons on 127.0.0.1.
//!
//! A replica is SIGKILLed under client load and restarted from its sled
//! state. The load must complete, the restarted replica must catch up to the
//! others' last executed sequence number, and it must take part again: with
//! another replica then stopped, the cluster can only make progress with it.

mod common;

use std::time::Duration;

use common::Harness;

fn kill_restart_and_rejoin(victim: u32) {
    let mut h = Harness::start(4);
    h.run_ops(4, 5);

    let load = h.start_load(4);
    std::thread::sleep(Duration::from_millis(500));
    h.cluster.kill(victim).expect("victim was running");
    // The others go on; after a view change if the victim was the primary.
    std::thread::sleep(Duration::from_millis(1500));
    h.cluster
        .start(victim, Duration::from_secs(30))
        .expect("restart the victim");
    std::thread::sleep(Duration::from_millis(1000));
    let ops = load.finish(&h);
    assert!(ops > 0, "no operation completed under load");

    let others: Vec<u32> = (0..4).filter(|i| *i != victim).collect();
    let view = h.metric(others[0], "zz_view");
    if victim == 0 {
        assert!(
            view >= 1.0,
            "killing the primary of view 0 should have changed the view"
        );
    }
    let target = h.max_executed(&others);
    let caught_up = h.wait_metric(victim, "zz_last_executed", Duration::from_secs(30), |v| {
        v >= target
    });
    eprintln!(
        "replica {victim} caught up to seq {caught_up} (others at {target}, view {view}), {ops} ops under load"
    );
    h.wait_metric(victim, "zz_view", Duration::from_secs(30), |v| v == view);

    // Stop another replica that is not the primary: from now on every
    // quorum of 2f+1 = 3 includes the restarted replica.
    let primary = h.metric(others[0], "zz_primary") as u32;
    let other = (0..4)
        .find(|i| *i != victim && *i != primary)
        .expect("a third replica");
    h.cluster.kill(other).expect("was running");
    let before = h.metric(victim, "zz_last_executed");
    h.run_ops(4, 5);
    h.wait_metric(victim, "zz_last_executed", Duration::from_secs(10), |v| {
        v > before
    });

    for (id, s) in h
        .cluster
        .stop_all(Duration::from_secs(10))
        .into_iter()
        .enumerate()
    {
        if let Some(s) = s {
            assert!(s.success(), "replica {id} exited with {s} after SIGTERM");
        }
    }
}

#[test]
fn killed_backup_restarts_catches_up_and_takes_part() {
    kill_restart_and_rejoin(2);
}

#[test]
fn killed_primary_restarts_catches_up_and_takes_part() {
    kill_restart_and_rejoin(0);
}
