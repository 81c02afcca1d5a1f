//! The [`App`] trait and the built-in apps other than `kv`.
//!
//! An app is a deterministic service: given the same pages and the same
//! operation it returns the same result and leaves the same pages, on every
//! replica. Hence:
//! - all of its state lives in the [`Pages`] it is handed, and it keeps
//!   nothing of its own between calls (the pages may be replaced under it by
//!   a state transfer);
//! - no wall clock and no unseeded randomness: the agreement sequence number
//!   in [`ExecContext::seq`] is the timestamp an app may use;
//! - a malformed operation yields an error *result*, deterministically; an
//!   `Err` is reserved for local failures of page access (storage, fetch),
//!   which stop the replica.
//!
//! Built in: [`NullApp`] (benchmarks), [`crate::kv::KvApp`], and
//! [`CpuCost`], a wrapper spending a configurable amount of deterministic
//! work per request to model CPU-heavy services.

use crate::pages::{PageError, Pages};
use serde::{Deserialize, Serialize};
use zz_wire::exec::AppSeq;
use zz_wire::{AppId, ClientId, Seq};

/// What an app may know about the request it executes; all of it is ordered
/// and identical on every replica.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ExecContext {
    pub app: AppId,
    pub app_seq: AppSeq,
    /// Agreement sequence number of the batch: the deterministic timestamp.
    pub seq: Seq,
    pub client: ClientId,
    pub req_id: u64,
    /// The client marked the request read-only.
    pub read_only: bool,
}

/// A deterministic service over pages; see the module docs.
pub trait App: Send {
    /// Short name, for logs and metrics.
    fn name(&self) -> &'static str;

    /// Executes `op` against `pages`; returns the result for the client.
    fn execute(
        &mut self,
        ctx: &ExecContext,
        pages: &mut dyn Pages,
        op: &[u8],
    ) -> Result<Vec<u8>, PageError>;
}

/// Does nothing, touches no page, returns an empty result.
#[derive(Clone, Copy, Debug, Default)]
pub struct NullApp;

impl App for NullApp {
    fn name(&self) -> &'static str {
        "null"
    }

    fn execute(
        &mut self,
        _ctx: &ExecContext,
        _pages: &mut dyn Pages,
        _op: &[u8],
    ) -> Result<Vec<u8>, PageError> {
        Ok(Vec::new())
    }
}

/// Bytes hashed by one round of [`CpuCost`].
pub const CPU_ROUND_BYTES: usize = 4096;

/// Spends `rounds` rounds of blake3 over a 4 KiB buffer ([`CPU_ROUND_BYTES`])
/// per request, then runs the inner app. The work depends only on the
/// request, so it is deterministic, and it does not change the result.
pub struct CpuCost<A> {
    inner: A,
    rounds: u32,
}

impl<A: App> CpuCost<A> {
    pub fn new(inner: A, rounds: u32) -> Self {
        CpuCost { inner, rounds }
    }

    pub fn rounds(&self) -> u32 {
        self.rounds
    }
}

/// The deterministic work of [`CpuCost`]: `rounds` chained blake3 hashes of
/// a 4 KiB buffer seeded by the request. Returns the final hash.
pub fn cpu_work(ctx: &ExecContext, op: &[u8], rounds: u32) -> [u8; 32] {
    let mut seed = blake3::Hasher::new_derive_key("zz cpu cost v1");
    seed.update(&ctx.client.to_le_bytes());
    seed.update(&ctx.req_id.to_le_bytes());
    seed.update(op);
    let mut buf = [0u8; CPU_ROUND_BYTES];
    seed.finalize_xof().fill(&mut buf);
    let mut h = [0u8; 32];
    for _ in 0..rounds {
        let mut x = blake3::Hasher::new();
        x.update(&h);
        x.update(&buf);
        h = *x.finalize().as_bytes();
        buf[..32].copy_from_slice(&h);
    }
    std::hint::black_box(h)
}

impl<A: App> App for CpuCost<A> {
    fn name(&self) -> &'static str {
        self.inner.name()
    }

    fn execute(
        &mut self,
        ctx: &ExecContext,
        pages: &mut dyn Pages,
        op: &[u8],
    ) -> Result<Vec<u8>, PageError> {
        cpu_work(ctx, op, self.rounds);
        self.inner.execute(ctx, pages, op)
    }
}

impl App for Box<dyn App> {
    fn name(&self) -> &'static str {
        (**self).name()
    }

    fn execute(
        &mut self,
        ctx: &ExecContext,
        pages: &mut dyn Pages,
        op: &[u8],
    ) -> Result<Vec<u8>, PageError> {
        (**self).execute(ctx, pages, op)
    }
}

/// Which built-in app.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AppKind {
    Null,
    Kv,
}

/// A built-in app as a deployment configures it (TOML-friendly), e.g.
/// `{ kind = "kv", cpu_rounds = 100 }`, or parsed from `kv`, `null`,
/// `kv+cpu=100`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AppSpec {
    pub kind: AppKind,
    /// Rounds of [`CpuCost`] per request; 0 for none.
    #[serde(default)]
    pub cpu_rounds: u32,
}

/// A malformed [`AppSpec`] string.
#[derive(Debug, thiserror::Error)]
#[error("bad app spec `{0}`: expected kv or null, optionally followed by +cpu=ROUNDS")]
pub struct AppSpecError(pub String);

impl AppSpec {
    /// Builds the app.
    pub fn build(&self) -> Box<dyn App> {
        let base: Box<dyn App> = match self.kind {
            AppKind::Null => Box::new(NullApp),
            AppKind::Kv => Box::new(crate::kv::KvApp),
        };
        if self.cpu_rounds > 0 {
            Box::new(CpuCost::new(base, self.cpu_rounds))
        } else {
            base
        }
    }
}

impl std::str::FromStr for AppSpec {
    type Err = AppSpecError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || AppSpecError(s.to_string());
        let (kind, rest) = match s.split_once('+') {
            Some((k, r)) => (k, Some(r)),
            None => (s, None),
        };
        let kind = match kind.trim() {
            "kv" => AppKind::Kv,
            "null" => AppKind::Null,
            _ => return Err(bad()),
        };
        let cpu_rounds = match rest {
            None => 0,
            Some(r) => r
                .trim()
                .strip_prefix("cpu=")
                .and_then(|n| n.parse().ok())
                .ok_or_else(bad)?,
        };
        Ok(AppSpec { kind, cpu_rounds })
    }
}

impl std::fmt::Display for AppSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let k = match self.kind {
            AppKind::Null => "null",
            AppKind::Kv => "kv",
        };
        if self.cpu_rounds > 0 {
            write!(f, "{k}+cpu={}", self.cpu_rounds)
        } else {
            f.write_str(k)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ctx() -> ExecContext {
        ExecContext {
            app: 1,
            app_seq: 1,
            seq: 1,
            client: 7,
            req_id: 1,
            read_only: false,
        }
    }

    #[test]
    fn cpu_work_is_deterministic_and_depends_on_rounds_and_request() {
        let a = cpu_work(&ctx(), b"op", 10);
        assert_eq!(a, cpu_work(&ctx(), b"op", 10));
        assert_ne!(a, cpu_work(&ctx(), b"op", 11));
        assert_ne!(a, cpu_work(&ctx(), b"oq", 10));
    }

    #[test]
    fn spec_parses_and_prints() {
        for s in ["kv", "null", "kv+cpu=100", "null+cpu=3"] {
            let spec: AppSpec = s.parse().unwrap();
            assert_eq!(spec.to_string(), s);
        }
        for s in ["", "kvx", "kv+cpu", "kv+cpu=x", "kv+mem=3"] {
            assert!(s.parse::<AppSpec>().is_err(), "{s}");
        }
        assert_eq!("kv+cpu=5".parse::<AppSpec>().unwrap().build().name(), "kv");
    }
}
