//! Prints the process backend's lifecycle latencies, one `key=value` line per
//! workload (idle child, busy child).
//!
//! `cargo run -p zz-hypervisor --release --example lifecycle_bench [ITERATIONS]`

use zz_hypervisor::bench::{run, Workload};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let iterations = match std::env::args().nth(1) {
        Some(n) => n.parse()?,
        None => 200,
    };
    let dir = tempfile::tempdir()?;
    for workload in [Workload::Idle, Workload::Busy] {
        println!("{}", run(dir.path(), workload, iterations)?);
    }
    Ok(())
}
