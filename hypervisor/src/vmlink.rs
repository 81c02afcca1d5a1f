//! The host side of a VM's virtio-serial stream: how the host agent
//! connects to the unix socket libvirt binds for a guest's port and knows
//! when the guest is listening (the guest side and the protocol are in
//! `zz_executor::guest`).
//!
//! After connecting, the host sends a ping (a control frame with a fresh
//! nonce) every [`PING_EVERY`] until the guest answers `ready` with the same
//! nonce; everything the guest sent before that answer is discarded (the tail
//! of a frame from a previous connection), and only then may the host send
//! frames: bytes sent before the guest opened its port would be lost. The
//! same handshake follows a restore (libvirt recreates the socket) and any
//! reconnect, so the stream is always in step at a frame boundary.

use std::hash::{BuildHasher, Hasher};
use std::path::Path;
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use zz_executor::guest::{control_frame, CONTROL_SIZE, PING, READY};
use zz_wire::exec::ExecId;

/// How often an unanswered ping is repeated.
pub const PING_EVERY: Duration = Duration::from_millis(200);

/// A nonce whose every byte has its high bit set, so no 4 bytes of a ping
/// cut short read as a plausible frame length (see `zz_executor::guest`).
pub fn nonce() -> u64 {
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0),
    );
    h.finish() | 0x8080_8080_8080_8080
}

/// Connects to a guest's port socket and completes the handshake. Returns
/// the stream and the bytes the guest sent after its `ready`. Fails if the
/// socket cannot be connected or closes before the guest answers (the VM
/// stopped); the caller retries.
pub async fn connect(path: &Path) -> std::io::Result<(UnixStream, BytesMut)> {
    let mut stream = UnixStream::connect(path).await?;
    let nonce = nonce();
    let ping = control_frame(PING, nonce);
    let ready = control_frame(READY, nonce);
    let mut buf = BytesMut::with_capacity(64 * 1024);
    loop {
        stream.write_all(&ping).await?;
        let deadline = tokio::time::Instant::now() + PING_EVERY;
        loop {
            let read = tokio::time::timeout_at(deadline, stream.read_buf(&mut buf)).await;
            match read {
                Err(_) => break, // ping again
                Ok(Ok(0)) => {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::UnexpectedEof,
                        "the guest's port closed before it answered",
                    ))
                }
                Ok(Ok(_)) => {}
                Ok(Err(e)) => return Err(e),
            }
            if let Some(at) = find(&buf, &ready) {
                let _ = buf.split_to(at + CONTROL_SIZE);
                return Ok((stream, buf));
            }
            // Keep only what could be the start of the answer.
            if buf.len() > CONTROL_SIZE {
                let _ = buf.split_to(buf.len() - (CONTROL_SIZE - 1));
            }
        }
    }
}

/// Counts completed handshakes per replica, so the host agent can wait
/// until a (re)booted guest is up before putting it to sleep.
#[derive(Default)]
pub struct GuestReady {
    counts: std::sync::Mutex<std::collections::HashMap<ExecId, u64>>,
    changed: tokio::sync::Notify,
}

impl GuestReady {
    /// Records a completed handshake of `exec`.
    pub fn announce(&self, exec: ExecId) {
        *self
            .counts
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(exec)
            .or_default() += 1;
        self.changed.notify_waiters();
    }

    /// Handshakes of `exec` so far.
    pub fn count(&self, exec: ExecId) -> u64 {
        self.counts
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&exec)
            .copied()
            .unwrap_or(0)
    }

    /// Waits until `exec` has completed more than `seen` handshakes; false
    /// on timeout.
    pub async fn wait_above(&self, exec: ExecId, seen: u64, timeout: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let notified = self.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.count(exec) > seen {
                return true;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return self.count(exec) > seen;
            }
        }
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nonces_cannot_read_as_a_small_length() {
        for _ in 0..100 {
            let n = nonce().to_be_bytes();
            assert!(n.iter().all(|b| b & 0x80 != 0));
        }
    }

    #[tokio::test]
    async fn the_handshake_discards_stale_bytes_and_keeps_what_follows() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("port.sock");
        let listener = tokio::net::UnixListener::bind(&path).unwrap();
        let guest = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            // Stale tail of an old frame, then ignore the first ping (the
            // guest was not listening yet), answer the second.
            s.write_all(b"\x00\x00stale-tail").await.unwrap();
            let mut ping = [0u8; CONTROL_SIZE];
            s.read_exact(&mut ping).await.unwrap();
            s.read_exact(&mut ping).await.unwrap();
            let nonce = u64::from_be_bytes(ping[8..].try_into().unwrap());
            let mut answer = control_frame(READY, nonce).to_vec();
            answer.extend_from_slice(b"\x00\x00\x00\x02hi");
            s.write_all(&answer).await.unwrap();
            s
        });
        let (_s, rest) = connect(&path).await.unwrap();
        assert_eq!(&rest[..], b"\x00\x00\x00\x02hi");
        drop(guest.await.unwrap());
    }
}
