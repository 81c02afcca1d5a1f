//! Serde encoding (bincode, fixed-width integers) with a hard limit on what a
//! decoder may allocate, so a hostile length field cannot exhaust memory.

use crate::WireError;
use bincode::Options;
use serde::{de::DeserializeOwned, Serialize};

/// Largest message any decoder accepts.
pub const MAX_MESSAGE: usize = 32 * 1024 * 1024;

fn options(limit: usize) -> impl Options {
    bincode::DefaultOptions::new()
        .with_fixint_encoding()
        .with_little_endian()
        .with_limit(limit as u64)
        .reject_trailing_bytes()
}

/// Encodes a value. Encoding our own in-memory types cannot fail except by
/// exceeding [`MAX_MESSAGE`], which callers treat as a bug in what they built.
pub fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    options(usize::MAX)
        .serialize(value)
        .expect("encoding an in-memory value cannot fail")
}

/// Decodes a value, rejecting trailing bytes and anything over [`MAX_MESSAGE`].
pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, WireError> {
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
    fn huge_length_prefix_is_rejected_without_allocating() {
        // A Vec length of u64::MAX inside a frame: the limit stops it.
        let mut bytes = vec![2u8, 0, 0, 0];
        bytes.extend_from_slice(&u64::MAX.to_le_bytes());
        assert!(decode::<Frame>(&bytes).is_err());
    }
}
