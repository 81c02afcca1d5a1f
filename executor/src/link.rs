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
//!   request id; the host agent relays it to the target's stream, through
//!   other host agents when the target is on another server. A recovering
//!   replica verifies every page and tree node against the certified root
//!   (`zz-statefetch` does this), so no relay and no lying peer can make it
//!   accept a wrong page. Each frame also carries a MAC with the two
//!   replicas' pairwise key ([`FetchKeys`]), so that a wrong page is blamed on
//!   the replica that sent it and never on one whose answer a relay forged or
//!   altered, and so that a replica serves its state only to its app's peers.
//!   A host agent that cannot reach the target answers a request itself with
//!   an unMAC'd [`RefusalKind::Internal`] refusal, so the fetcher moves on to
//!   another peer at once; that is the only frame accepted without a MAC, and
//!   it never counts against a peer.

use ed25519_dalek::VerifyingKey;
use serde::{Deserialize, Serialize};
use zz_statefetch::proto::RefusalKind;
use zz_statefetch::{Request, Response};
use zz_wire::crypto::{KeyPair, Mac, MacKey};
use zz_wire::exec::{ExecEnvelope, ExecId};

/// Largest frame on an executor's stream: a batch of pages with proofs, or
/// an order of a large batch, fits well below it.
pub const MAX_LINK_FRAME: usize = zz_wire::frame::DEFAULT_MAX_FRAME;

/// Send buffer asked for on a unix-socket link (the kernel caps it at
/// `net.core.wmem_max`). With the default (about 208 KiB) a 1 MiB page batch
/// crosses each hop in five or more writer/reader hand-offs, and on a busy
/// host each hand-off can wait for the scheduler; with a larger buffer the
/// writer hands over a whole frame at once.
pub const LINK_SOCKET_SEND_BUFFER: usize = 4 << 20;

/// Asks for a [`LINK_SOCKET_SEND_BUFFER`]-byte send buffer on a link socket.
/// Failure only costs speed, so it is logged, not returned.
pub fn widen_send_buffer<S: std::os::fd::AsFd>(socket: &S) {
    use nix::sys::socket::{setsockopt, sockopt::SndBuf};
    if let Err(e) = setsockopt(socket, SndBuf, &LINK_SOCKET_SEND_BUFFER) {
        tracing::debug!(error = %e, "cannot widen the link's send buffer");
    }
}

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
    /// MAC of the other fields with the pairwise key of `from` and `to`
    /// (see [`FetchKeys`]); `None` only in a host agent's refusal.
    pub mac: Option<Mac>,
}

/// Separates fetch-frame MACs from any other use of the pairwise keys.
const FETCH_MAC_DOMAIN: &[u8] = b"zz fetch frame v1\0";

/// What a fetch frame's MAC covers.
#[derive(Serialize)]
struct MacInput<'a> {
    from: ExecId,
    to: ExecId,
    id: u64,
    body: &'a FetchBody,
}

/// The payload of a [`FetchFrame`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum FetchBody {
    Request(Request),
    Response(Response),
}

impl FetchFrame {
    fn mac_with(&self, key: &MacKey) -> Mac {
        key.mac_parts(&[FETCH_MAC_DOMAIN, &mac_input(self)])
    }

    /// A host agent's refusal: the one frame that carries no MAC.
    fn is_host_refusal(&self) -> bool {
        matches!(
            self.body,
            FetchBody::Response(Response::Refused {
                kind: RefusalKind::Internal,
                ..
            })
        )
    }
}

/// The MAC keys one execution replica shares with each replica of its app,
/// for sealing and checking fetch frames end to end.
pub struct FetchKeys {
    me: ExecId,
    /// By replica index; `None` at our own.
    peers: Vec<Option<MacKey>>,
}

impl std::fmt::Debug for FetchKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FetchKeys")
            .field("me", &self.me)
            .finish_non_exhaustive()
    }
}

/// What [`FetchKeys::check`] found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FetchCheck {
    /// Sent by `from`, unaltered.
    Authentic,
    /// A host agent's refusal of our request: move on to another peer, and
    /// hold nothing against the one named.
    HostRefusal,
    /// Not from the replica it names, altered, or not ours: drop it.
    Forged(&'static str),
}

impl FetchKeys {
    /// Derives the pairwise keys of replica `me` (whose key pair is `key`)
    /// with each of its app's replicas (`exec_keys`, by index).
    pub fn new(me: ExecId, key: &KeyPair, exec_keys: &[VerifyingKey]) -> FetchKeys {
        let peers = exec_keys
            .iter()
            .enumerate()
            .map(|(i, k)| (i as u32 != me.index).then(|| key.shared_mac_key(k)))
            .collect();
        FetchKeys { me, peers }
    }

    fn key(&self, peer: ExecId) -> Option<&MacKey> {
        if peer.app != self.me.app {
            return None;
        }
        self.peers.get(peer.index as usize).and_then(Option::as_ref)
    }

    /// A frame from us to `to`, MAC'd with our key for it (`None` if `to` is
    /// not another replica of our app).
    pub fn seal(&self, to: ExecId, id: u64, body: FetchBody) -> Option<FetchFrame> {
        let key = self.key(to)?;
        let mut ff = FetchFrame {
            from: self.me,
            to,
            id,
            body,
            mac: None,
        };
        ff.mac = Some(ff.mac_with(key));
        Some(ff)
    }

    /// Whether `ff`, received on our stream, may be used.
    pub fn check(&self, ff: &FetchFrame) -> FetchCheck {
        if ff.to != self.me {
            return FetchCheck::Forged("addressed to another replica");
        }
        if ff.mac.is_none() && ff.is_host_refusal() {
            return FetchCheck::HostRefusal;
        }
        let Some(key) = self.key(ff.from) else {
            return FetchCheck::Forged("not from a replica of this app");
        };
        match &ff.mac {
            None => FetchCheck::Forged("no MAC"),
            Some(mac) if key.verify_parts(&[FETCH_MAC_DOMAIN, &mac_input(ff)], mac) => {
                FetchCheck::Authentic
            }
            Some(_) => FetchCheck::Forged("wrong MAC"),
        }
    }
}

/// The leading fields of a [`FetchFrame`]'s encoding: what a host agent
/// routes on. It relays the frame's bytes as they came and leaves the body
/// and the MAC to the recipient, which checks both.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
pub struct FetchHead {
    pub from: ExecId,
    pub to: ExecId,
    pub id: u64,
    pub body: FetchBodyHead,
}

/// The leading fields of a [`FetchBody`]; variants in the same order.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
pub enum FetchBodyHead {
    Request,
    Response(ResponseHead),
}

/// The leading fields of a [`Response`]; variants in the same order.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
pub enum ResponseHead {
    Info,
    Pages {
        seq: zz_wire::ids::Seq,
        root: zz_wire::ids::Digest,
        num_pages: u64,
        /// How many pages the reply carries.
        pages: u64,
    },
    Nodes,
    ReadHint,
    Refused,
}

impl FetchHead {
    /// The head of an encoded fetch frame (the link frame body after
    /// [`LinkFrame::FETCH_TAG`]).
    pub fn decode(frame: &[u8]) -> Result<FetchHead, zz_wire::WireError> {
        zz_wire::codec::decode_prefix(frame)
    }

    /// Pages carried, for a page reply.
    pub fn pages(&self) -> u64 {
        match self.body {
            FetchBodyHead::Response(ResponseHead::Pages { pages, .. }) => pages,
            _ => 0,
        }
    }

    /// The refusal a host agent sends back in place of the response to a
    /// request it cannot deliver; `None` for a response.
    pub fn unreachable(&self, why: &str) -> Option<FetchFrame> {
        match self.body {
            FetchBodyHead::Request => Some(FetchFrame {
                from: self.to,
                to: self.from,
                id: self.id,
                body: FetchBody::Response(Response::Refused {
                    kind: RefusalKind::Internal,
                    detail: format!("{} unreachable: {why}", self.to),
                }),
                mac: None,
            }),
            FetchBodyHead::Response(_) => None,
        }
    }
}

/// The encoding a fetch frame's MAC covers. Hashed as one buffer: feeding
/// blake3 the encoding as it is produced (page by page, each behind a few
/// header bytes) loses its many-chunks-at-once speed, and measured slower
/// than this copy (16 MiB recovery: full state 650-840 ms against 530-640).
fn mac_input(ff: &FetchFrame) -> Vec<u8> {
    zz_wire::codec::encode(&MacInput {
        from: ff.from,
        to: ff.to,
        id: ff.id,
        body: &ff.body,
    })
}

impl LinkFrame {
    /// The first four bytes of an encoded [`LinkFrame::Exec`] (its variant
    /// index); the rest is the envelope's encoding.
    pub const EXEC_TAG: [u8; 4] = 0u32.to_le_bytes();
    /// The first four bytes of an encoded [`LinkFrame::Fetch`].
    pub const FETCH_TAG: [u8; 4] = 1u32.to_le_bytes();

    /// The frame's bytes on the stream: length prefix and encoded body.
    pub fn to_bytes(&self) -> Vec<u8> {
        zz_wire::codec::encode_framed(self)
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
            mac: Some([1; 16]),
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
        let refusal = head_of(&req).unreachable("not connected").unwrap();
        assert_eq!((refusal.from, refusal.to, refusal.id), (b, a, 7));
        assert!(matches!(
            refusal.body,
            FetchBody::Response(Response::Refused { .. })
        ));
        assert!(head_of(&refusal).unreachable("x").is_none());
    }

    /// The head a host agent reads from `ff` on the stream.
    fn head_of(ff: &FetchFrame) -> FetchHead {
        let bytes = zz_wire::codec::encode(&LinkFrame::Fetch(ff.clone()));
        FetchHead::decode(&bytes[4..]).unwrap()
    }

    #[test]
    fn the_head_of_every_fetch_frame_matches_the_frame() {
        use zz_statefetch::proto::{CheckpointInfo, NodeRange, PageData, PagesReply, ReadHint};
        let pages = PagesReply {
            seq: 4,
            root: zz_wire::Digest([3; 32]),
            num_pages: 99,
            pages: (0..3)
                .map(|i| PageData {
                    index: i,
                    data: vec![i as u8; 4096],
                    proof: Some(vec![zz_wire::Digest([1; 32])]),
                })
                .collect(),
        };
        let bodies = [
            (FetchBody::Request(Request::Info), FetchBodyHead::Request),
            (
                FetchBody::Response(Response::Info(vec![CheckpointInfo {
                    seq: 1,
                    root: zz_wire::Digest([0; 32]),
                    num_pages: 2,
                }])),
                FetchBodyHead::Response(ResponseHead::Info),
            ),
            (
                FetchBody::Response(Response::Pages(pages)),
                FetchBodyHead::Response(ResponseHead::Pages {
                    seq: 4,
                    root: zz_wire::Digest([3; 32]),
                    num_pages: 99,
                    pages: 3,
                }),
            ),
            (
                FetchBody::Response(Response::Nodes(NodeRange {
                    seq: 1,
                    root: zz_wire::Digest([0; 32]),
                    num_pages: 1,
                    level: 0,
                    start: 0,
                    nodes: vec![],
                    siblings: vec![],
                })),
                FetchBodyHead::Response(ResponseHead::Nodes),
            ),
            (
                FetchBody::Response(Response::ReadHint(ReadHint {
                    seq: 1,
                    root: zz_wire::Digest([0; 32]),
                    pages: vec![5],
                })),
                FetchBodyHead::Response(ResponseHead::ReadHint),
            ),
            (
                pages_response(),
                FetchBodyHead::Response(ResponseHead::Refused),
            ),
        ];
        for (body, want) in bodies {
            let ff = FetchFrame {
                from: id(0),
                to: id(2),
                id: 77,
                body,
                mac: Some([5; 16]),
            };
            let bytes = zz_wire::codec::encode(&LinkFrame::Fetch(ff.clone()));
            assert_eq!(bytes[..4], LinkFrame::FETCH_TAG);
            let head = FetchHead::decode(&bytes[4..]).unwrap();
            assert_eq!(
                head,
                FetchHead {
                    from: id(0),
                    to: id(2),
                    id: 77,
                    body: want
                }
            );
            // Only a request gets a refusal.
            assert_eq!(
                head.unreachable("x").is_some(),
                matches!(ff.body, FetchBody::Request(_))
            );
        }
        let env = zz_wire::codec::encode(&LinkFrame::Exec(ExecEnvelope {
            route: zz_wire::exec::ExecRoute::ToAgreement { from: id(0), to: 1 },
            payload: vec![],
            mac: [0; 16],
        }));
        assert_eq!(env[..4], LinkFrame::EXEC_TAG);
        assert!(FetchHead::decode(&[1, 2, 3]).is_err());
    }

    /// Key pairs of three replicas of app 1, and each one's fetch keys.
    fn three_replicas() -> Vec<FetchKeys> {
        let pairs: Vec<KeyPair> = (0..3).map(|_| KeyPair::generate()).collect();
        let publics: Vec<VerifyingKey> = pairs.iter().map(|k| k.public()).collect();
        pairs
            .iter()
            .enumerate()
            .map(|(i, k)| {
                FetchKeys::new(
                    ExecId {
                        app: 1,
                        index: i as u32,
                    },
                    k,
                    &publics,
                )
            })
            .collect()
    }

    fn id(index: u32) -> ExecId {
        ExecId { app: 1, index }
    }

    fn pages_response() -> FetchBody {
        FetchBody::Response(Response::Refused {
            kind: RefusalKind::RootMismatch,
            detail: "a response a peer would be blamed for".into(),
        })
    }

    #[test]
    fn sealed_frames_check_at_their_target_only() {
        let keys = three_replicas();
        let req = keys[0]
            .seal(id(2), 5, FetchBody::Request(Request::Info))
            .unwrap();
        assert_eq!(keys[2].check(&req), FetchCheck::Authentic);
        // The frame survives the stream encoding with its MAC.
        let LinkFrame::Fetch(back) =
            LinkFrame::decode(&zz_wire::codec::encode(&LinkFrame::Fetch(req.clone()))).unwrap()
        else {
            panic!("not a fetch frame")
        };
        assert_eq!(keys[2].check(&back), FetchCheck::Authentic);
        // Replica 1 is not its target.
        assert!(matches!(keys[1].check(&req), FetchCheck::Forged(_)));
        // No frame to ourselves, to another app, or to an unknown index.
        assert!(keys[0].seal(id(0), 1, pages_response()).is_none());
        assert!(keys[0]
            .seal(ExecId { app: 2, index: 1 }, 1, pages_response())
            .is_none());
        assert!(keys[0].seal(id(3), 1, pages_response()).is_none());
    }

    #[test]
    fn altered_or_forged_frames_are_refused() {
        let keys = three_replicas();
        let resp = keys[1].seal(id(0), 9, pages_response()).unwrap();
        assert_eq!(keys[0].check(&resp), FetchCheck::Authentic);
        // A relay changes the body, the id, or who it claims sent it.
        let mut body = resp.clone();
        body.body = FetchBody::Response(Response::Refused {
            kind: RefusalKind::RootMismatch,
            detail: "altered".into(),
        });
        let mut renumbered = resp.clone();
        renumbered.id = 10;
        let mut resent = resp.clone();
        resent.from = id(2);
        let mut unmacd = resp.clone();
        unmacd.mac = None;
        let mut other_app = resp.clone();
        other_app.from = ExecId { app: 2, index: 1 };
        for forged in [body, renumbered, resent, unmacd, other_app] {
            assert!(
                matches!(keys[0].check(&forged), FetchCheck::Forged(_)),
                "{forged:?}"
            );
        }
        // Sealed by replica 2 but claiming to come from replica 1.
        let mut by_two = keys[2].seal(id(0), 9, pages_response()).unwrap();
        by_two.from = id(1);
        assert!(matches!(keys[0].check(&by_two), FetchCheck::Forged(_)));
    }

    #[test]
    fn only_an_internal_refusal_passes_without_a_mac() {
        let keys = three_replicas();
        let req = keys[0]
            .seal(id(1), 3, FetchBody::Request(Request::Info))
            .unwrap();
        let refusal = head_of(&req).unreachable("not connected").unwrap();
        assert_eq!(refusal.mac, None);
        assert_eq!(keys[0].check(&refusal), FetchCheck::HostRefusal);
        // Without a MAC, a refusal that would count against the peer, a
        // request, or pages are all refused.
        let unmacd = |body| FetchFrame {
            from: id(1),
            to: id(0),
            id: 3,
            body,
            mac: None,
        };
        for body in [
            pages_response(),
            FetchBody::Request(Request::Info),
            FetchBody::Response(Response::Refused {
                kind: RefusalKind::UnknownCheckpoint,
                detail: String::new(),
            }),
        ] {
            let f = unmacd(body);
            assert!(matches!(keys[0].check(&f), FetchCheck::Forged(_)), "{f:?}");
        }
    }
}
