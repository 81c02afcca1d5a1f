//! Latency of the process backend's lifecycle operations, measured rather
//! than asserted (timings depend on the machine and its load). Run
//! `cargo run -p zz-hypervisor --release --example lifecycle_bench`; each
//! scenario prints one `key=value` line.

use std::fmt;
use std::path::Path;
use std::time::{Duration, Instant};

use zz_wire::exec::ExecId;

use crate::lifecycle::{LifecycleError, ReplicaLifecycle, ReplicaSpec};
use crate::process::{ProcessBackend, ProcessConfig};

/// Which child the benchmark pauses and resumes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Workload {
    /// `/bin/sleep`: blocked in the kernel, must be woken to take the stop.
    Idle,
    /// A shell spinning on the CPU: must be preempted to take the stop.
    Busy,
}

impl Workload {
    fn config(self) -> ProcessConfig {
        match self {
            Workload::Idle => ProcessConfig::new("/bin/sleep").args(["3600"]),
            Workload::Busy => ProcessConfig::new("/bin/sh").args(["-c", "while :; do :; done"]),
        }
    }

    fn name(self) -> &'static str {
        match self {
            Workload::Idle => "idle",
            Workload::Busy => "busy",
        }
    }
}

/// Min, median, 99th percentile and max of a set of durations.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Latency {
    pub min: Duration,
    pub p50: Duration,
    pub p99: Duration,
    pub max: Duration,
}

impl Latency {
    pub fn of(mut samples: Vec<Duration>) -> Self {
        if samples.is_empty() {
            return Latency::default();
        }
        samples.sort();
        let at = |q: f64| samples[((samples.len() - 1) as f64 * q).round() as usize];
        Latency {
            min: samples[0],
            p50: at(0.5),
            p99: at(0.99),
            max: samples[samples.len() - 1],
        }
    }
}

/// One benchmark run's results.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Report {
    pub workload: Workload,
    pub iterations: usize,
    /// Spawn of a fresh replica.
    pub start: Latency,
    /// SIGSTOP until the kernel reports the stop.
    pub pause: Latency,
    /// SIGCONT.
    pub resume: Latency,
    /// SIGSTOP, confirmed, plus the marker file.
    pub save: Latency,
    /// SIGCONT plus removing the marker.
    pub restore: Latency,
    /// SIGKILL, reap, wipe the state folder, spawn.
    pub reimage: Latency,
}

impl fmt::Display for Report {
    /// One line: `bench=process_lifecycle workload=idle iterations=N pause_p50_us=...`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "bench=process_lifecycle workload={} iterations={}",
            self.workload.name(),
            self.iterations
        )?;
        for (name, l) in [
            ("start", self.start),
            ("pause", self.pause),
            ("resume", self.resume),
            ("save", self.save),
            ("restore", self.restore),
            ("reimage", self.reimage),
        ] {
            write!(
                f,
                " {name}_min_us={} {name}_p50_us={} {name}_p99_us={} {name}_max_us={}",
                l.min.as_micros(),
                l.p50.as_micros(),
                l.p99.as_micros(),
                l.max.as_micros()
            )?;
        }
        Ok(())
    }
}

fn timed(
    samples: &mut Vec<Duration>,
    op: impl FnOnce() -> Result<(), LifecycleError>,
) -> Result<(), LifecycleError> {
    let t = Instant::now();
    op()?;
    samples.push(t.elapsed());
    Ok(())
}

/// Runs `iterations` pause/resume and save/restore cycles, and a tenth as many
/// starts and reimages, on one replica with its state folder under `dir`.
pub fn run(dir: &Path, workload: Workload, iterations: usize) -> Result<Report, LifecycleError> {
    let exec = ExecId { app: 0, index: 0 };
    let mut b = ProcessBackend::new(workload.config());
    b.define(ReplicaSpec::new(
        exec,
        dir.join("bench-replica"),
        dir.join("bench.sock"),
    ))?;
    let (mut start, mut pause, mut resume, mut save, mut restore, mut reimage) =
        (vec![], vec![], vec![], vec![], vec![], vec![]);
    let slow = (iterations / 10).max(1);
    for i in 0..slow {
        timed(&mut start, || b.start(exec))?;
        if i + 1 < slow {
            b.destroy(exec)?;
        }
    }
    for _ in 0..slow {
        timed(&mut reimage, || b.reimage(exec))?;
    }
    for _ in 0..iterations {
        timed(&mut pause, || b.pause(exec))?;
        timed(&mut resume, || b.resume(exec))?;
    }
    for _ in 0..iterations {
        timed(&mut save, || b.save(exec))?;
        timed(&mut restore, || b.restore(exec))?;
    }
    b.destroy(exec)?;
    Ok(Report {
        workload,
        iterations,
        start: Latency::of(start),
        pause: Latency::of(pause),
        resume: Latency::of(resume),
        save: Latency::of(save),
        restore: Latency::of(restore),
        reimage: Latency::of(reimage),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn latency_percentiles() {
        let l = Latency::of((1..=100).map(Duration::from_micros).collect());
        assert_eq!(l.min, Duration::from_micros(1));
        assert_eq!(l.p50, Duration::from_micros(51));
        assert_eq!(l.p99, Duration::from_micros(99));
        assert_eq!(l.max, Duration::from_micros(100));
        assert_eq!(Latency::of(vec![]), Latency::default());
    }

    #[test]
    fn a_short_run_reports_every_key() {
        // Checks the harness works; timings are printed, never asserted.
        let tmp = tempfile::tempdir().unwrap();
        let r = run(tmp.path(), Workload::Idle, 5).unwrap();
        let line = r.to_string();
        for key in [
            "pause_p50_us=",
            "resume_p99_us=",
            "save_max_us=",
            "reimage_min_us=",
        ] {
            assert!(line.contains(key), "{line}");
        }
        assert!(!line.contains('\n'));
    }
}
