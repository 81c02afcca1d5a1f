//! Serde encoding (bincode, fixed-width integers) with a hard limit on what a
//! decoder may allocate, so a hostile length field cannot exhaust memory.

use crate::WireError;
use bincode::Options;
use serde::{de::DeserializeOwned, Deserialize, Serialize};

/// Largest message any decoder accepts.
pub const MAX_MESSAGE: usize = 32 * 1024 * 1024;

/// The encoding, with a limit on what decoding may allocate.
fn base_options(limit: usize) -> impl Options {
    bincode::DefaultOptions::new()
        .with_fixint_encoding()
        .with_little_endian()
        .with_limit(limit as u64)
}

fn options(limit: usize) -> impl Options {
    base_options(limit).reject_trailing_bytes()
}

/// Encodes a value. Encoding our own in-memory types cannot fail except by
/// exceeding [`MAX_MESSAGE`], which callers treat as a bug in what they built.
pub fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    options(usize::MAX)
        .serialize(value)
        .expect("encoding an in-memory value cannot fail")
}

/// Encodes a value as one frame (see [`crate::frame`]): the 4-byte
/// big-endian length, then the encoding, written into one buffer sized
/// exactly, so a large message is neither copied nor reallocated on its way
/// to the socket.
pub fn encode_framed<T: Serialize>(value: &T) -> Vec<u8> {
    let len = options(usize::MAX)
        .serialized_size(value)
        .expect("sizing an in-memory value cannot fail") as usize;
    let mut out = Vec::with_capacity(4 + len);
    out.extend_from_slice(&(len as u32).to_be_bytes());
    options(usize::MAX)
        .serialize_into(&mut out, value)
        .expect("encoding an in-memory value cannot fail");
    out
}

/// Decodes a value that may borrow from `bytes` (a `&[u8]` field is a slice
/// of the input, not a copy), with the checks of [`decode`].
pub fn decode_borrowed<'a, T: Deserialize<'a>>(bytes: &'a [u8]) -> Result<T, WireError> {
    if bytes.len() > MAX_MESSAGE {
        return Err(WireError::Oversized {
            len: bytes.len(),
            limit: MAX_MESSAGE,
        });
    }
    options(MAX_MESSAGE)
        .deserialize(bytes)
        .map_err(|e| WireError::Malformed(e.to_string()))
}

/// Decodes the leading fields of an encoding and ignores the rest: `T`
/// mirrors the first fields of the encoded type. For relays that route on a
/// message's header and leave the body to its recipient.
pub fn decode_prefix<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, WireError> {
    base_options(MAX_MESSAGE)
        .allow_trailing_bytes()
        .deserialize(bytes)
        .map_err(|e| WireError::Malformed(e.to_string()))
}

/// Decodes a value, rejecting trailing bytes and anything over [`MAX_MESSAGE`].
pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, WireError> {
    decode_borrowed(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::Frame;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn decoding_arbitrary_bytes_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = decode::<Frame>(&bytes);
        }
    }

    #[test]
    fn a_framed_encoding_is_the_frame_of_the_encoding() {
        let v: (u64, Vec<u8>, String) = (7, vec![1, 2, 3], "zz".into());
        assert_eq!(encode_framed(&v), crate::frame::frame(&encode(&v)));
    }

    #[test]
    fn a_prefix_decodes_with_the_rest_ignored_and_borrowed_bytes_are_not_copied() {
        let bytes = encode(&(5u32, 9u64, vec![4u8; 10]));
        assert_eq!(decode_prefix::<(u32, u64)>(&bytes).unwrap(), (5, 9));
        assert!(decode::<(u32, u64)>(&bytes).is_err());
        #[derive(Deserialize)]
        struct View<'a> {
            a: u32,
            _b: u64,
            #[serde(borrow)]
            tail: &'a [u8],
        }
        let v: View = decode_borrowed(&bytes).unwrap();
        assert_eq!((v.a, v.tail), (5, &[4u8; 10][..]));
        assert_eq!(v.tail.as_ptr(), bytes[bytes.len() - 10..].as_ptr());
        assert!(decode_borrowed::<View>(&bytes[..bytes.len() - 1]).is_err());
    }

    #[test]
    fn huge_length_prefix_is_rejected_without_allocating() {
        // A Vec length of u64::MAX inside a frame: the limit stops it.
        let mut bytes = vec![2u8, 0, 0, 0];
        bytes.extend_from_slice(&u64::MAX.to_le_bytes());
        assert!(decode::<Frame>(&bytes).is_err());
    }
}
