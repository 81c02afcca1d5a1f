//! Where a recovering replica gets state from: the [`PageSource`] trait.
//!
//! A source answers protocol [`Request`]s; it is not trusted. The network
//! client [`crate::FetchClient`] is one implementation; [`LocalSource`]
//! answers from a [`PageStore`] in the same process (tests, simulation).
//! Tests wrap sources to make them lie.

use crate::proto::{self, FetchError, Limits, Request, Response};
use crate::store::PageStore;
use std::future::Future;
use std::pin::Pin;

/// The future a [`PageSource`] returns.
pub type SourceFuture<'a> = Pin<Box<dyn Future<Output = Result<Response, FetchError>> + Send + 'a>>;

/// A peer that may serve checkpoint pages. Object-safe, so a recovery view
/// can hold sources of different kinds.
pub trait PageSource: Send + Sync {
    /// A name for reports (e.g. the peer's address).
    fn name(&self) -> String;
    /// Sends one request and returns the (unverified) response.
    fn call(&self, request: Request) -> SourceFuture<'_>;
}

/// Serves requests from a store in this process.
#[derive(Clone, Debug)]
pub struct LocalSource {
    store: PageStore,
    limits: Limits,
    name: String,
}

impl LocalSource {
    pub fn new(store: PageStore, name: impl Into<String>) -> Self {
        LocalSource {
            store,
            limits: Limits::default(),
            name: name.into(),
        }
    }
}

impl PageSource for LocalSource {
    fn name(&self) -> String {
        self.name.clone()
    }

    fn call(&self, request: Request) -> SourceFuture<'_> {
        Box::pin(async move { Ok(proto::handle(&self.store, &self.limits, request)) })
    }
}
