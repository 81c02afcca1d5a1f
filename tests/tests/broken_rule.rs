//! Shows that the simulator catches a deliberately broken protocol rule:
//! correct replicas commit on 2f matching commits instead of 2f+1 (a test-only
//! switch in the core). A commit quorum of 2f no longer intersects every
//! view-change quorum in a correct replica, so a batch committed in one view
//! can be replaced in the next; the agreement check must see it.

use zz_tests::byzantine::Behaviour;
use zz_tests::sim::{run_seed, SimConfig};

fn config(seed: u64, broken: bool) -> SimConfig {
    let behaviour = [
        Behaviour::ViewChangeLiar,
        Behaviour::Forger,
        Behaviour::None,
    ][seed as usize % 3];
    let mut cfg = SimConfig::new(1, seed, behaviour);
    if broken {
        cfg.broken_commit_quorum = Some(2);
        // Liveness is not the point here; stop early.
        cfg.max_ms = 20_000;
    }
    cfg
}

#[test]
fn commit_quorum_of_2f_is_caught() {
    let seeds = 900_000..903_000u64;
    let caught = seeds
        .clone()
        .find_map(|seed| match run_seed(config(seed, true)) {
            Err(v) if !v.message.starts_with("liveness") => Some(v),
            _ => None,
        });
    let v = caught.unwrap_or_else(|| {
        panic!("no safety violation in seeds {seeds:?} with a 2f commit quorum")
    });
    eprintln!("caught: {v}");
    // The same seed under the correct rule satisfies every property.
    if let Err(e) = run_seed(config(v.seed, false)) {
        panic!("the correct rule fails the same seed: {e}");
    }
}
