//! Length-prefixed framing: a 4-byte big-endian length, then that many bytes.
//!
//! The length is checked against the limit before a single byte of the body is
//! buffered, so an oversized or hostile prefix costs nothing but the 4 bytes.

use crate::WireError;
use bytes::{Buf, BufMut, Bytes, BytesMut};

/// Default largest frame body.
pub const DEFAULT_MAX_FRAME: usize = 32 * 1024 * 1024;

/// Appends one frame carrying `body` to `out`.
pub fn write_frame(out: &mut BytesMut, body: &[u8]) {
    out.reserve(4 + body.len());
    out.put_u32(body.len() as u32);
    out.put_slice(body);
}

/// Returns `body` as one frame.
pub fn frame(body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(4 + body.len());
    out.extend_from_slice(&(body.len() as u32).to_be_bytes());
    out.extend_from_slice(body);
    out
}

/// Incremental decoder over a byte buffer filled by a socket.
#[derive(Debug, Clone)]
pub struct FrameDecoder {
    max_frame: usize,
}

impl Default for FrameDecoder {
    fn default() -> Self {
        FrameDecoder {
            max_frame: DEFAULT_MAX_FRAME,
        }
    }
}

impl FrameDecoder {
    pub fn new(max_frame: usize) -> Self {
        FrameDecoder { max_frame }
    }

    /// Takes the next whole frame body out of `buf`, if one is buffered.
    ///
    /// An oversized length is an error; the caller should close the stream,
    /// since the framing can no longer be trusted.
    pub fn decode(&self, buf: &mut BytesMut) -> Result<Option<Bytes>, WireError> {
        if buf.len() < 4 {
            return Ok(None);
        }
        let len = u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
        if len > self.max_frame {
            return Err(WireError::Oversized {
                len,
                limit: self.max_frame,
            });
        }
        if buf.len() < 4 + len {
            // Reserve only what the checked length needs.
            buf.reserve(4 + len - buf.len());
            return Ok(None);
        }
        buf.advance(4);
        Ok(Some(buf.split_to(len).freeze()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_in_pieces() {
        let mut wire = BytesMut::new();
        write_frame(&mut wire, b"hello");
        write_frame(&mut wire, b"");
        write_frame(&mut wire, &[7u8; 1000]);
        let dec = FrameDecoder::default();
        let mut buf = BytesMut::new();
        let mut got = Vec::new();
        for chunk in wire.chunks(3) {
            buf.extend_from_slice(chunk);
            while let Some(f) = dec.decode(&mut buf).unwrap() {
                got.push(f);
            }
        }
        assert_eq!(got.len(), 3);
        assert_eq!(&got[0][..], b"hello");
        assert!(got[1].is_empty());
        assert_eq!(got[2].len(), 1000);
    }

    #[test]
    fn oversized_prefix_rejected_before_body_arrives() {
        let dec = FrameDecoder::new(1024);
        let mut buf = BytesMut::from(&(1_000_000u32).to_be_bytes()[..]);
        let err = dec.decode(&mut buf).unwrap_err();
        assert!(matches!(
            err,
            WireError::Oversized {
                len: 1_000_000,
                limit: 1024
            }
        ));
        assert!(buf.capacity() < 1_000_000);
    }
}
