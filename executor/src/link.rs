//! The frames of an execution replica's one byte stream to its host agent
//! (DESIGN §6): a virtio-serial port for a VM, a unix socket for the process
//! backend; the executor has one code path for both.
//!
//! The stream uses `zz-wire` framing (a 4-byte big-endian length, then the
//! body, the length checked before allocation); each body is the
//! [`zz_wire::codec`] encoding of one [`LinkFrame`]:
//!
//! - [`LinkFrame::Exec`]: an [`ExecEnvelope`] between an agreement replica
//!   and this executor, MAC'd end to end with their pairwise key, so the host
//!   agent relays it without being able to forge it. Inbound envelopes are
//!   routed `ToExecutor { to }`, outbound ones `ToAgreement { from, to }`.
//! - [`LinkFrame::Fetch`]: state-fetch traffic (DESIGN §5) between two
//!   execution replicas of one app, addressed by [`ExecId`] and matched by a
//!   request id; the host agent relays it to the target's stream. Nothing in
//!   it is trusted: a recovering replica verifies every page and tree node
//!   against the certified root (`zz-statefetch` does this), so neither the
//!   host agent nor a lying peer can make it accept a wrong page. A host agent
//!   that cannot reach the target answers a request itself with a
//!   [`Response::Refused`], so the fetcher moves on to another peer at once.

use serde::{Deserialize, Serialize};
use zz_statefetch::proto::RefusalKind;
use zz_statefetch::{Request, Response};
use zz_wire::exec::{ExecEnvelope, ExecId};

/// Largest frame on an executor's stream: a batch of pages with proofs, or
/// an order of a large batch, fits well below it.
pub const MAX_LINK_FRAME: usize = zz_wire::frame::DEFAULT_MAX_FRAME;

/// One frame of the executor ↔ host agent stream.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum LinkFrame {
    /// Between an agreement replica and an execution replica.
    Exec(ExecEnvelope),
    /// State fetch between execution replicas, relayed by host agents.
    Fetch(FetchFrame),
}

/// A state-fetch request or response between two execution replicas.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FetchFrame {
    pub from: ExecId,
    pub to: ExecId,
    /// Chosen by the requester; the response carries the same id.
    pub id: u64,
    pub body: FetchBody,
}

/// The payload of a [`FetchFrame`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum FetchBody {
    Request(Request),
    Response(Response),
}

impl FetchFrame {
    /// The refusal a host agent sends back in place of the response to a
    /// request it cannot deliver.
    pub fn unreachable(&self, why: &str) -> Option<FetchFrame> {
        match self.body {
            FetchBody::Request(_) => Some(FetchFrame {
                from: self.to,
                to: self.from,
                id: self.id,
                body: FetchBody::Response(Response::Refused {
                    kind: RefusalKind::Internal,
                    detail: format!("{} unreachable: {why}", self.to),
                }),
            }),
            FetchBody::Response(_) => None,
        }
    }
}

impl LinkFrame {
    /// The frame's bytes on the stream: length prefix and encoded body.
    pub fn to_bytes(&self) -> Vec<u8> {
        zz_wire::frame::frame(&zz_wire::codec::encode(self))
    }

    /// Decodes one frame body (without its length prefix).
    pub fn decode(body: &[u8]) -> Result<LinkFrame, zz_wire::WireError> {
        zz_wire::codec::decode(body)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::BytesMut;
    use proptest::prelude::*;
    use zz_wire::exec::{ExecMessage, ExecRoute, Order};
    use zz_wire::frame::FrameDecoder;

    proptest! {
        #[test]
        fn decoding_arbitrary_bytes_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = LinkFrame::decode(&bytes);
        }
    }

    #[test]
    fn frames_round_trip_through_the_stream_framing() {
        let key = zz_wire::crypto::MacKey([3; 32]);
        let a = ExecId { app: 1, index: 0 };
        let b = ExecId { app: 1, index: 2 };
        let env = ExecEnvelope::seal(
            ExecRoute::ToExecutor { from: 2, to: a },
            &ExecMessage::Order(Order {
                app: 1,
                app_seq: 3,
                seq: 9,
                requests: vec![],
            }),
            &key,
        );
        let req = FetchFrame {
            from: a,
            to: b,
            id: 7,
            body: FetchBody::Request(Request::Info),
        };
        let frames = vec![LinkFrame::Exec(env), LinkFrame::Fetch(req.clone())];
        let mut wire = BytesMut::new();
        for f in &frames {
            wire.extend_from_slice(&f.to_bytes());
        }
        let dec = FrameDecoder::new(MAX_LINK_FRAME);
        let mut got = Vec::new();
        while let Some(body) = dec.decode(&mut wire).unwrap() {
            got.push(LinkFrame::decode(&body).unwrap());
        }
        assert_eq!(got, frames);
        let refusal = req.unreachable("not connected").unwrap();
        assert_eq!((refusal.from, refusal.to, refusal.id), (b, a, 7));
        assert!(matches!(
            refusal.body,
            FetchBody::Response(Response::Refused { .. })
        ));
        assert!(refusal.unreachable("x").is_none());
    }
}
