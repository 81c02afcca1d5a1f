//! Seeded simulation of the ZZ execution protocol: 2f+1 execution replicas per
//! app with f+1 active, faults injected into up to f of them. Checked: clients
//! only accept correct results (the committed-log replay of the checker), the
//! monitor suspects, the dormant replicas are woken and catch up from a
//! certified checkpoint, the faulty replicas are identified and reimaged, and
//! the app returns to f+1 active replicas. `ZZ_SEED=<n>` replays one seed.

use zz_tests::byzantine::Behaviour;
use zz_tests::exec_sim::ExecFault;
use zz_tests::sim::{run_seed, ExecScenario, SimConfig};

fn seeds() -> u64 {
    std::env::var("ZZ_SIM_SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(60)
}

fn run_many(f: usize, fault: ExecFault, faulty: Vec<u32>, base: u64, name: &str) {
    let list: Vec<u64> = match std::env::var("ZZ_SEED") {
        Ok(s) => vec![s.parse().expect("ZZ_SEED must be a number")],
        Err(_) => (base..base + seeds()).collect(),
    };
    for seed in list {
        let mut cfg = SimConfig::new(f, seed, Behaviour::None);
        cfg.ops_per_client = 10;
        cfg.exec = Some(ExecScenario {
            fault,
            faulty: faulty.clone(),
            at_ms: 200 + seed % 500,
        });
        if let Err(v) = run_seed(cfg) {
            panic!("{v}\nreplay: ZZ_SEED={seed} cargo nextest run -p zz-tests --test execution_sim -- {name}");
        }
    }
}

#[test]
fn f1_no_fault() {
    run_many(1, ExecFault::None, vec![], 200_000, "f1_no_fault");
}

#[test]
fn f1_wrong_replies() {
    run_many(
        1,
        ExecFault::WrongReplies,
        vec![0],
        210_000,
        "f1_wrong_replies",
    );
}

#[test]
fn f1_crashed() {
    run_many(1, ExecFault::Crashed, vec![1], 220_000, "f1_crashed");
}

#[test]
fn f2_wrong_replies_two_at_once() {
    run_many(
        2,
        ExecFault::WrongReplies,
        vec![0, 2],
        230_000,
        "f2_wrong_replies_two_at_once",
    );
}

#[test]
fn f2_crashed() {
    run_many(2, ExecFault::Crashed, vec![1], 240_000, "f2_crashed");
}
