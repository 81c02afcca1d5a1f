//! Seeded simulation of the agreement cluster under network faults and
//! Byzantine replicas. Each test runs many seeds of one (f, behaviour) pair;
//! a failure prints `ZZ_SEED=<n>`, and setting that variable replays exactly
//! that seed.

use zz_tests::byzantine::Behaviour;
use zz_tests::sim::{run_seed, SimConfig};

/// Seeds per (f, behaviour) test; CI runs 6 behaviours x 2 values of f.
fn seeds_per_test() -> u64 {
    std::env::var("ZZ_SIM_SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(170)
}

fn run_many(f: usize, behaviour: Behaviour, base: u64) {
    let seeds: Vec<u64> = match std::env::var("ZZ_SEED") {
        Ok(s) => vec![s.parse().expect("ZZ_SEED must be a number")],
        Err(_) => (base..base + seeds_per_test()).collect(),
    };
    let mut views = 0;
    let mut acked = 0;
    for seed in seeds {
        match run_seed(SimConfig::new(f, seed, behaviour)) {
            Ok(o) => {
                views += o.max_view;
                acked += o.acked;
            }
            Err(v) => panic!(
                "{v}\nreplay: ZZ_SEED={seed} cargo nextest run -p zz-tests --test simulation -- {}",
                test_name(f, behaviour)
            ),
        }
    }
    eprintln!("f={f} behaviour={behaviour:?} acked={acked} total_max_view={views}");
    assert!(acked > 0);
}

fn test_name(f: usize, b: Behaviour) -> String {
    format!("f{f}_{b:?}").to_lowercase()
}

macro_rules! sim_tests {
    ($($name:ident: $f:expr, $b:expr, $base:expr;)*) => {$(
        #[test]
        fn $name() {
            run_many($f, $b, $base);
        }
    )*};
}

sim_tests! {
    f1_none: 1, Behaviour::None, 0;
    f1_crashrestart: 1, Behaviour::CrashRestart, 10_000;
    f1_equivocatingprimary: 1, Behaviour::EquivocatingPrimary, 20_000;
    f1_silentprimary: 1, Behaviour::SilentPrimary, 30_000;
    f1_forger: 1, Behaviour::Forger, 40_000;
    f1_viewchangeliar: 1, Behaviour::ViewChangeLiar, 50_000;
    f2_none: 2, Behaviour::None, 100_000;
    f2_crashrestart: 2, Behaviour::CrashRestart, 110_000;
    f2_equivocatingprimary: 2, Behaviour::EquivocatingPrimary, 120_000;
    f2_silentprimary: 2, Behaviour::SilentPrimary, 130_000;
    f2_forger: 2, Behaviour::Forger, 140_000;
    f2_viewchangeliar: 2, Behaviour::ViewChangeLiar, 150_000;
}

/// A seed is a complete description of a run: replaying it gives the same run.
#[test]
fn a_seed_replays_exactly() {
    for b in [
        Behaviour::EquivocatingPrimary,
        Behaviour::CrashRestart,
        Behaviour::Forger,
    ] {
        let a = run_seed(SimConfig::new(1, 77, b)).expect("seed 77 passes");
        let again = run_seed(SimConfig::new(1, 77, b)).expect("seed 77 passes");
        assert_eq!(a, again);
        assert!(a.messages_delivered > 0);
    }
}
