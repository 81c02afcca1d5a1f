//! How a host agent relays frames without copying them.
//!
//! Every relayed frame is a MAC'd envelope or fetch frame that only its
//! recipient can verify; the host agent needs just its route. So a frame is
//! not decoded into owned values and encoded again (for a 1 MiB page batch
//! that was three fresh megabyte buffers and three copies per hop, and the
//! fresh memory cost the host agent more in page faults than the copies):
//! the agent reads the route from the frame's leading bytes and forwards the
//! body it received (a slice of its read buffer, or a copy if it is short)
//! behind a new length prefix and, where the two framings number their
//! variants differently, a new variant tag.
//!
//! - executor → agreement: `LinkFrame::Exec` becomes `Frame::Exec`; the
//!   envelope is checked whole (its route, and that it decodes), in place.
//! - agreement → executor: the reverse.
//! - executor → executor: a `LinkFrame::Fetch` is routed on its
//!   [`FetchHead`] and forwarded as is; through another host agent it travels
//!   inside a `Frame::Fetch`. Its body and MAC are checked by the recipient,
//!   which drops and counts what does not decode.

use bytes::Bytes;
use tokio::io::{AsyncWrite, AsyncWriteExt, BufWriter};
use zz_executor::link::{FetchFrame, FetchHead, LinkFrame};
use zz_wire::exec::{ExecEnvelopeRef, ExecRoute};
use zz_wire::message::Frame;
use zz_wire::WireError;

/// Largest head: a length prefix, a variant tag and an inner length.
const MAX_HEAD: usize = 16;

/// Bodies shorter than this are copied out of the read buffer rather than
/// shared with it. A queued slice keeps its whole buffer alive, and a small
/// frame for a replica that does not read (paused, or slow) would otherwise
/// pin a read buffer of [`crate::hostd`]'s 64 KiB chunks per frame; a body
/// at least this long shares a buffer no more than about twice its size.
const SHARE_AT_LEAST: usize = 64 * 1024;

/// `body`, or a copy of it if short (see [`SHARE_AT_LEAST`]).
fn detached(body: Bytes) -> Bytes {
    if body.len() < SHARE_AT_LEAST {
        Bytes::copy_from_slice(&body)
    } else {
        body
    }
}

/// One frame queued for a stream: a short head, then a body that may be
/// shared with the buffer it was read into.
#[derive(Clone, Debug)]
pub struct Outgoing {
    head: [u8; MAX_HEAD],
    head_len: u8,
    body: Bytes,
}

impl Outgoing {
    /// A frame already encoded with its length prefix.
    pub fn framed(frame: impl Into<Bytes>) -> Outgoing {
        Outgoing {
            head: [0; MAX_HEAD],
            head_len: 0,
            body: frame.into(),
        }
    }

    /// `body` behind a length prefix and, if given, a variant tag.
    pub fn retagged(tag: Option<[u8; 4]>, body: Bytes) -> Outgoing {
        let tag_len = if tag.is_some() { 4 } else { 0 };
        let mut head = [0; MAX_HEAD];
        head[..4].copy_from_slice(&((tag_len + body.len()) as u32).to_be_bytes());
        if let Some(t) = tag {
            head[4..8].copy_from_slice(&t);
        }
        Outgoing {
            head,
            head_len: 4 + tag_len as u8,
            body: detached(body),
        }
    }

    /// An executor link frame's `body` inside a [`Frame::Fetch`], for a
    /// link to another host agent.
    pub fn to_host(body: Bytes) -> Outgoing {
        let mut head = [0; MAX_HEAD];
        head[..4].copy_from_slice(&((12 + body.len()) as u32).to_be_bytes());
        head[4..8].copy_from_slice(&Frame::FETCH_TAG);
        head[8..16].copy_from_slice(&(body.len() as u64).to_le_bytes());
        Outgoing {
            head,
            head_len: 16,
            body: detached(body),
        }
    }

    /// A host agent's own fetch frame (a refusal) for an executor's stream.
    pub fn fetch_to_executor(ff: FetchFrame) -> Outgoing {
        Outgoing::framed(LinkFrame::Fetch(ff).to_bytes())
    }

    /// A host agent's own fetch frame (a refusal) for another host agent.
    pub fn fetch_to_host(ff: FetchFrame) -> Outgoing {
        Outgoing::to_host(Bytes::from(zz_wire::codec::encode(&LinkFrame::Fetch(ff))))
    }

    fn head(&self) -> &[u8] {
        &self.head[..self.head_len as usize]
    }

    /// Bytes on the stream.
    pub(crate) fn len(&self) -> usize {
        self.head_len as usize + self.body.len()
    }

    /// Writes the frame (the caller flushes).
    pub(crate) async fn write_to<W: AsyncWrite + Unpin>(
        &self,
        w: &mut BufWriter<W>,
    ) -> std::io::Result<()> {
        w.write_all(self.head()).await?;
        w.write_all(&self.body).await
    }

    /// The frame as one buffer.
    #[cfg(test)]
    fn to_vec(&self) -> Vec<u8> {
        [self.head(), &self.body].concat()
    }
}

/// What an executor's link frame asks the host agent to relay.
#[derive(Debug)]
pub enum FromExecutor {
    /// An envelope (checked whole) and its encoding.
    Exec { route: ExecRoute, envelope: Bytes },
    /// A fetch frame's head and the whole link frame body.
    Fetch { head: FetchHead, frame: Bytes },
}

/// Reads the route of one link frame body from an executor.
pub fn from_executor(body: Bytes) -> Result<FromExecutor, WireError> {
    let tag = tag_of(&body)?;
    if tag == LinkFrame::EXEC_TAG {
        let envelope = body.slice(4..);
        let route = ExecEnvelopeRef::decode(&envelope)?.route;
        Ok(FromExecutor::Exec { route, envelope })
    } else if tag == LinkFrame::FETCH_TAG {
        let head = FetchHead::decode(&body[4..])?;
        Ok(FromExecutor::Fetch { head, frame: body })
    } else {
        Err(WireError::Malformed(format!(
            "unknown link frame tag {tag:?}"
        )))
    }
}

/// The envelope in a [`Frame::Exec`] body from an agreement replica, checked
/// whole, with its route; `None` for any other frame (decoded by the caller).
pub fn exec_from_agreement(body: &Bytes) -> Option<Result<(ExecRoute, Bytes), WireError>> {
    if body.get(..4)? != Frame::EXEC_TAG {
        return None;
    }
    let envelope = body.slice(4..);
    Some(ExecEnvelopeRef::decode(&envelope).map(|e| (e.route, envelope.clone())))
}

/// The executor link frame in a [`Frame::Fetch`] body from another host
/// agent, with its head.
pub fn fetch_from_host(body: &Bytes) -> Result<(FetchHead, Bytes), WireError> {
    if tag_of(body)? != Frame::FETCH_TAG || body.len() < 12 {
        return Err(WireError::Malformed("not a fetch frame".into()));
    }
    let inner_len = u64::from_le_bytes(body[4..12].try_into().expect("8 bytes"));
    if inner_len != (body.len() - 12) as u64 {
        return Err(WireError::Malformed("fetch frame length mismatch".into()));
    }
    let frame = body.slice(12..);
    match from_executor(frame)? {
        FromExecutor::Fetch { head, frame } => Ok((head, frame)),
        FromExecutor::Exec { .. } => Err(WireError::Malformed("not a fetch frame".into())),
    }
}

fn tag_of(body: &[u8]) -> Result<[u8; 4], WireError> {
    body.get(..4)
        .map(|t| t.try_into().expect("4 bytes"))
        .ok_or_else(|| WireError::Malformed("frame shorter than its tag".into()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::BytesMut;
    use zz_executor::link::FetchBody;
    use zz_statefetch::proto::{PageData, PagesReply};
    use zz_statefetch::{Request, Response};
    use zz_wire::exec::{ExecEnvelope, ExecId};
    use zz_wire::frame::FrameDecoder;

    fn exec(index: u32) -> ExecId {
        ExecId { app: 1, index }
    }

    fn envelope(route: ExecRoute) -> ExecEnvelope {
        ExecEnvelope {
            route,
            payload: vec![42; 3000],
            mac: [9; 16],
        }
    }

    fn pages_frame() -> FetchFrame {
        FetchFrame {
            from: exec(1),
            to: exec(2),
            id: 5,
            body: FetchBody::Response(Response::Pages(PagesReply {
                seq: 3,
                root: zz_wire::Digest([1; 32]),
                num_pages: 10,
                pages: (0..4)
                    .map(|i| PageData {
                        index: i,
                        data: vec![i as u8; 4096],
                        proof: None,
                    })
                    .collect(),
            })),
            mac: Some([3; 16]),
        }
    }

    /// The body of the one frame in `out`'s bytes.
    fn unframe(out: &Outgoing) -> Bytes {
        let mut buf = BytesMut::from(&out.to_vec()[..]);
        let body = FrameDecoder::default().decode(&mut buf).unwrap().unwrap();
        assert!(buf.is_empty(), "one frame, nothing after it");
        body
    }

    #[test]
    fn an_executors_envelope_reaches_agreement_as_the_frame_it_would_encode() {
        let env = envelope(ExecRoute::ToAgreement {
            from: exec(0),
            to: 2,
        });
        let body = Bytes::from(zz_wire::codec::encode(&LinkFrame::Exec(env.clone())));
        let FromExecutor::Exec { route, envelope } = from_executor(body).unwrap() else {
            panic!("not an envelope")
        };
        assert_eq!(route, env.route);
        let out = Outgoing::retagged(Some(Frame::EXEC_TAG), envelope);
        assert_eq!(
            out.to_vec(),
            zz_wire::codec::encode_framed(&Frame::Exec(env))
        );
    }

    #[test]
    fn an_agreement_envelope_reaches_the_executor_as_the_link_frame_it_would_encode() {
        let env = envelope(ExecRoute::ToExecutor {
            from: 1,
            to: exec(2),
        });
        let body = Bytes::from(zz_wire::codec::encode(&Frame::Exec(env.clone())));
        let (route, envelope) = exec_from_agreement(&body).unwrap().unwrap();
        assert_eq!(route, env.route);
        let out = Outgoing::retagged(Some(LinkFrame::EXEC_TAG), envelope);
        assert_eq!(
            LinkFrame::decode(&unframe(&out)).unwrap(),
            LinkFrame::Exec(env)
        );
        // Other frames are left to the caller.
        let hello = Bytes::from(zz_wire::codec::encode(&Frame::HostPeer {
            host: "h".into(),
        }));
        assert!(exec_from_agreement(&hello).is_none());
    }

    #[test]
    fn a_fetch_frame_crosses_hosts_unchanged() {
        let ff = pages_frame();
        let body = Bytes::from(zz_wire::codec::encode(&LinkFrame::Fetch(ff.clone())));
        let FromExecutor::Fetch { head, frame } = from_executor(body).unwrap() else {
            panic!("not a fetch frame")
        };
        assert_eq!(
            (head.from, head.to, head.id, head.pages()),
            (ff.from, ff.to, ff.id, 4)
        );
        // To another host agent, as the Frame::Fetch it would encode.
        let out = Outgoing::to_host(frame.clone());
        let on_link = unframe(&out);
        assert_eq!(
            zz_wire::codec::decode::<Frame>(&on_link).unwrap(),
            Frame::Fetch(zz_wire::codec::encode(&LinkFrame::Fetch(ff.clone())))
        );
        // There, to the target executor, as the link frame it was.
        let (head2, frame2) = fetch_from_host(&on_link).unwrap();
        assert_eq!(head2, head);
        let delivered = unframe(&Outgoing::retagged(None, frame2));
        assert_eq!(
            LinkFrame::decode(&delivered).unwrap(),
            LinkFrame::Fetch(ff.clone())
        );
        // A refusal built by the agent travels the same way.
        let req = FetchFrame {
            body: FetchBody::Request(Request::Info),
            ..ff
        };
        let FromExecutor::Fetch { head: req_head, .. } =
            from_executor(Bytes::from(zz_wire::codec::encode(&LinkFrame::Fetch(req)))).unwrap()
        else {
            panic!("not a fetch frame")
        };
        let refusal = req_head.unreachable("gone").unwrap();
        let (rh, _) = fetch_from_host(&unframe(&Outgoing::fetch_to_host(refusal.clone()))).unwrap();
        assert_eq!(
            (rh.from, rh.to, rh.id),
            (refusal.from, refusal.to, refusal.id)
        );
        assert_eq!(
            LinkFrame::decode(&unframe(&Outgoing::fetch_to_executor(refusal.clone()))).unwrap(),
            LinkFrame::Fetch(refusal)
        );
    }

    #[test]
    fn a_short_body_is_copied_and_a_long_one_shared() {
        let buffer = Bytes::from(vec![1u8; 4 * SHARE_AT_LEAST]);
        let short = buffer.slice(10..110);
        let long = buffer.slice(10..10 + SHARE_AT_LEAST);
        let out = Outgoing::retagged(None, short.clone());
        assert_eq!(out.body, short);
        assert_ne!(
            out.body.as_ptr(),
            short.as_ptr(),
            "copied out of the buffer"
        );
        let out = Outgoing::to_host(long.clone());
        assert_eq!(out.body.as_ptr(), long.as_ptr(), "shared");
    }

    #[test]
    fn malformed_frames_are_errors_not_panics() {
        let env = envelope(ExecRoute::ToAgreement {
            from: exec(0),
            to: 2,
        });
        let whole = zz_wire::codec::encode(&LinkFrame::Exec(env));
        // A truncated envelope, trailing garbage, an unknown tag, a stub.
        let mut trailing = whole.clone();
        trailing.push(0);
        for bad in [
            whole[..whole.len() - 1].to_vec(),
            trailing,
            vec![7, 0, 0, 0, 1],
            vec![1, 0],
            vec![],
        ] {
            assert!(from_executor(Bytes::from(bad)).is_err());
        }
        let link = zz_wire::codec::encode(&LinkFrame::Fetch(pages_frame()));
        let mut wrong_len = zz_wire::codec::encode(&Frame::Fetch(link));
        wrong_len[4] ^= 1;
        assert!(fetch_from_host(&Bytes::from(wrong_len)).is_err());
        assert!(fetch_from_host(&Bytes::from_static(b"\x08\0\0\0")).is_err());
    }

    #[test]
    fn arbitrary_bytes_never_panic() {
        let mut rng = 0x1234_5678_9abc_def0u64;
        for len in 0..600 {
            let bytes: Vec<u8> = (0..len)
                .map(|_| {
                    rng ^= rng << 13;
                    rng ^= rng >> 7;
                    rng ^= rng << 17;
                    (rng % 4) as u8
                })
                .collect();
            let b = Bytes::from(bytes);
            let _ = from_executor(b.clone());
            let _ = exec_from_agreement(&b);
            let _ = fetch_from_host(&b);
        }
    }
}
