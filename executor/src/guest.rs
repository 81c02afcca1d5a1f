//! `zz-executor` as PID 1 of a guest VM (DESIGN §6): what the static
//! executor does before and around the ordinary executor when it is the
//! `/init` of the initramfs `zzctl image build` makes.
//!
//! 1. Mount `/proc`, `/sys` and `/dev` (devtmpfs): nobody else will.
//! 2. Load the virtio modules from `/lib/modules` with `finit_module`, in
//!    dependency order ([`MODULES`]); the Debian cloud kernel builds virtio
//!    as modules.
//! 3. Mount the state disk (`/dev/vda`, ext4, prepared by the host) on
//!    `/state`; it holds the cluster config and key under `seed/`, an
//!    optional fault plan, and the page store.
//! 4. Find the virtio-serial port named `zz.0` under
//!    `/sys/class/virtio-ports` and open `/dev/vportNpM` once, read-write.
//! 5. Run the ordinary executor (its environment, `ZZ_*`, comes from the
//!    kernel command line) on one end of a socket pair; two bridge threads
//!    copy frames between the other end and the port ([`bridge`]).
//! 6. When the executor ends: sync and power off (PID 1 must never exit;
//!    the domain is then destroyed by libvirt).
//!
//! # The port protocol
//!
//! The stream carries the same length-prefixed [`crate::link::LinkFrame`]s as
//! the process backend's unix socket, plus one control frame of 16 bytes,
//! [`CONTROL_LEN`] = `0xFFFF_FFFF` (never a valid length), 4 kind bytes and an
//! 8-byte nonce:
//!
//! - `zzpg` (ping), host to guest: the host sends one every few hundred ms
//!   after it connects, until answered;
//! - `zzok` (ready), guest to host, with the ping's nonce, written at a frame
//!   boundary, once per nonce (the host uses one nonce per connection and
//!   stops pinging when answered): the guest's port is open and reading, and
//!   what the host sends from now on is read in order.
//!
//! - `zztm` (time), host to guest, sent after the handshake and then every
//!   second: the host's clock in microseconds since the Unix epoch, which the
//!   guest sets as its own (an emulated guest's clock drifts by seconds per
//!   minute on a loaded host, and its logs are compared with the host's).
//!
//! This handles the port's quirks measured on this machine kind: bytes the
//! host sends before the guest opens the port are lost (so the host sends
//! frames only after a `zzok`), a host that reconnects after a restore may go
//! unnoticed by the guest (the ping resynchronizes), and the host discards
//! whatever precedes the `zzok` with its nonce (the tail of a frame the guest
//! was writing when the previous connection ended). A guest read returns 0
//! while no host is connected: the guest then drops any partial frame and
//! waits. One guest write is capped at 32 KiB and one read returns at most
//! 4 KiB, so frames are reassembled on both sides.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Modules loaded at boot, in dependency order.
pub const MODULES: &[&str] = &[
    "virtio_ring",
    "virtio",
    "virtio_pci_legacy_dev",
    "virtio_pci_modern_dev",
    "virtio_pci",
    "virtio_console",
    "virtio_blk",
];
/// Where the initramfs keeps the modules (flat).
pub const MODULE_DIR: &str = "/lib/modules";
/// The virtio-serial port's name (the domain XML's channel target).
pub const PORT_NAME: &str = "zz.0";
/// The state disk.
pub const STATE_DEVICE: &str = "/dev/vda";
/// Where it is mounted (the executor's `ZZ_STATE_DIR`).
pub const STATE_MOUNT: &str = "/state";
/// The length field of a control frame.
pub const CONTROL_LEN: u32 = 0xFFFF_FFFF;
/// Bytes of a control frame: length, kind, nonce.
pub const CONTROL_SIZE: usize = 16;
/// Kind of the host's ping.
pub const PING: &[u8; 4] = b"zzpg";
/// Kind of the guest's answer.
pub const READY: &[u8; 4] = b"zzok";
/// Kind of the host's clock, host to guest: microseconds since the Unix epoch.
pub const TIME: &[u8; 4] = b"zztm";

/// A control frame of `kind` with `nonce`.
pub fn control_frame(kind: &[u8; 4], nonce: u64) -> [u8; CONTROL_SIZE] {
    let mut f = [0u8; CONTROL_SIZE];
    f[..4].copy_from_slice(&CONTROL_LEN.to_be_bytes());
    f[4..8].copy_from_slice(kind);
    f[8..].copy_from_slice(&nonce.to_be_bytes());
    f
}

/// Why the guest cannot start its executor.
#[derive(Debug, thiserror::Error)]
pub enum GuestError {
    #[error("mounting {what} on {target}: {source}")]
    Mount {
        what: &'static str,
        target: &'static str,
        source: nix::errno::Errno,
    },
    #[error("loading module {name}: {source}")]
    Module {
        name: String,
        source: nix::errno::Errno,
    },
    #[error("{what}: {source}")]
    Io { what: String, source: io::Error },
    #[error("{0} did not appear within {1:?}; does the domain define it?")]
    Missing(String, Duration),
}

fn io_err(what: impl Into<String>) -> impl FnOnce(io::Error) -> GuestError {
    let what = what.into();
    move |source| GuestError::Io { what, source }
}

/// Mounts the pseudo file systems and the state disk, loads the modules,
/// and opens the port. Returns the port.
pub fn boot() -> Result<File, GuestError> {
    use nix::mount::{mount, MsFlags};
    for (what, target, fstype) in [
        ("proc", "/proc", "proc"),
        ("sysfs", "/sys", "sysfs"),
        ("devtmpfs", "/dev", "devtmpfs"),
    ] {
        let _ = fs::create_dir_all(target);
        match mount(
            Some(what),
            target,
            Some(fstype),
            MsFlags::empty(),
            None::<&str>,
        ) {
            Ok(()) | Err(nix::errno::Errno::EBUSY) => {}
            Err(source) => {
                return Err(GuestError::Mount {
                    what,
                    target,
                    source,
                })
            }
        }
    }
    // The kernel found no /dev/console in the initramfs: give stdio the
    // serial console now that devtmpfs is there (the host logs it).
    if let Ok(console) = OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/console")
    {
        use std::os::fd::AsRawFd;
        for fd in 0..3 {
            // SAFETY: dup2 onto the standard descriptors, which this
            // process owns; `console` stays open until the loop ends.
            unsafe { nix::libc::dup2(console.as_raw_fd(), fd) };
        }
    }
    for name in MODULES {
        load_module(&Path::new(MODULE_DIR).join(format!("{name}.ko")))?;
    }
    let wait = Duration::from_secs(30);
    wait_for(Path::new(STATE_DEVICE), wait)?;
    let _ = fs::create_dir_all(STATE_MOUNT);
    mount(
        Some(STATE_DEVICE),
        STATE_MOUNT,
        Some("ext4"),
        MsFlags::MS_NOATIME,
        None::<&str>,
    )
    .map_err(|source| GuestError::Mount {
        what: "the state disk",
        target: STATE_MOUNT,
        source,
    })?;
    let port = find_port(PORT_NAME, wait)?;
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&port)
        .map_err(io_err(format!("opening {}", port.display())))?;
    tracing::info!(port = %port.display(), "guest booted: modules loaded, state disk mounted");
    Ok(file)
}

fn load_module(path: &Path) -> Result<(), GuestError> {
    let name = path.display().to_string();
    let f = File::open(path).map_err(io_err(format!("opening {name}")))?;
    match nix::kmod::finit_module(&f, c"", nix::kmod::ModuleInitFlags::empty()) {
        Ok(()) | Err(nix::errno::Errno::EEXIST) => Ok(()),
        Err(source) => Err(GuestError::Module { name, source }),
    }
}

fn wait_for(path: &Path, timeout: Duration) -> Result<(), GuestError> {
    let start = Instant::now();
    while !path.exists() {
        if start.elapsed() > timeout {
            return Err(GuestError::Missing(path.display().to_string(), timeout));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    Ok(())
}

/// The `/dev` node of the virtio-serial port named `name`.
fn find_port(name: &str, timeout: Duration) -> Result<PathBuf, GuestError> {
    let start = Instant::now();
    loop {
        if let Ok(dir) = fs::read_dir("/sys/class/virtio-ports") {
            for e in dir.flatten() {
                let n = fs::read_to_string(e.path().join("name")).unwrap_or_default();
                if n.trim() == name {
                    let dev = Path::new("/dev").join(e.file_name());
                    wait_for(&dev, timeout)?;
                    return Ok(dev);
                }
            }
        }
        if start.elapsed() > timeout {
            return Err(GuestError::Missing(
                format!("virtio-serial port {name}"),
                timeout,
            ));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Flushes the disks and powers the VM off (PID 1 never returns).
pub fn power_off() -> ! {
    nix::unistd::sync();
    let _ = nix::sys::reboot::reboot(nix::sys::reboot::RebootMode::RB_POWER_OFF);
    loop {
        std::thread::sleep(Duration::from_secs(1));
    }
}

/// Connects `port` to a new socket pair and returns the executor's end.
/// Two threads copy frames: port to executor (answering pings, dropping
/// partial frames when the host goes away) and executor to port (whole
/// frames, interleaved with ready answers under one write lock).
pub fn bridge(port: File) -> io::Result<UnixStream> {
    let (exec_end, bridge_end) = UnixStream::pair()?;
    let port_w = Arc::new(Mutex::new(port.try_clone()?));
    let to_exec = bridge_end.try_clone()?;
    {
        let port_w = port_w.clone();
        std::thread::Builder::new()
            .name("port-in".into())
            .spawn(move || port_to_executor(port, to_exec, &port_w))?;
    }
    std::thread::Builder::new()
        .name("port-out".into())
        .spawn(move || executor_to_port(bridge_end, &port_w))?;
    Ok(exec_end)
}

fn lock(m: &Mutex<File>) -> std::sync::MutexGuard<'_, File> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// What a host-to-guest byte stream holds, frame by frame.
#[derive(Debug, PartialEq, Eq)]
pub enum Inbound {
    /// A whole frame (length prefix included) for the executor.
    Frame(Vec<u8>),
    /// A ping with its nonce.
    Ping(u64),
    /// The host's clock, microseconds since the Unix epoch.
    Time(u64),
}

/// Splits the host-to-guest stream into frames and pings. Bytes that cannot
/// start a frame (a length over `max`) are skipped up to the next ping.
#[derive(Debug)]
pub struct InboundParser {
    buf: Vec<u8>,
    max: usize,
}

impl InboundParser {
    pub fn new(max: usize) -> Self {
        InboundParser {
            buf: Vec::new(),
            max,
        }
    }

    /// Forgets a partial frame (the host went away).
    pub fn reset(&mut self) {
        self.buf.clear();
    }

    /// Feeds a chunk read from the port.
    pub fn push(&mut self, chunk: &[u8]) {
        // A ping at the start of a read while a frame is incomplete means
        // the host reconnected unnoticed: the partial frame will never end.
        if !self.buf.is_empty() && chunk.len() >= 8 && is_ping_head(chunk) {
            self.buf.clear();
        }
        self.buf.extend_from_slice(chunk);
    }

    /// The next complete item, if any.
    pub fn next_item(&mut self) -> Option<Inbound> {
        loop {
            if self.buf.len() < 4 {
                return None;
            }
            let len = u32::from_be_bytes(self.buf[..4].try_into().expect("4 bytes"));
            if len == CONTROL_LEN {
                if self.buf.len() < CONTROL_SIZE {
                    return None;
                }
                let item: Vec<u8> = self.buf.drain(..CONTROL_SIZE).collect();
                let value = u64::from_be_bytes(item[8..16].try_into().expect("8 bytes"));
                if &item[4..8] == PING {
                    return Some(Inbound::Ping(value));
                }
                if &item[4..8] == TIME {
                    return Some(Inbound::Time(value));
                }
                continue;
            }
            let len = len as usize;
            if len > self.max {
                // Out of step: skip to the next ping (or keep the last bytes
                // that could begin one).
                match find_ping(&self.buf[1..]) {
                    Some(i) => {
                        self.buf.drain(..i + 1);
                    }
                    None => {
                        let keep = self.buf.len().min(7);
                        let cut = self.buf.len() - keep;
                        self.buf.drain(..cut);
                        return None;
                    }
                }
                continue;
            }
            if self.buf.len() < 4 + len {
                return None;
            }
            return Some(Inbound::Frame(self.buf.drain(..4 + len).collect()));
        }
    }
}

fn is_ping_head(b: &[u8]) -> bool {
    b.len() >= 8 && b[..4] == CONTROL_LEN.to_be_bytes() && &b[4..8] == PING
}

fn find_ping(b: &[u8]) -> Option<usize> {
    (0..b.len().saturating_sub(7)).find(|&i| is_ping_head(&b[i..]))
}

fn port_to_executor(mut port: File, mut exec: UnixStream, port_w: &Mutex<File>) {
    let mut parser = InboundParser::new(crate::link::MAX_LINK_FRAME);
    let mut chunk = vec![0u8; 64 * 1024];
    // A host repeats its ping (one nonce per connection) until answered;
    // one answer per nonce, or the extra ones would land among frames.
    let mut answered: Option<u64> = None;
    loop {
        let n = match port.read(&mut chunk) {
            Ok(0) => {
                // No host connected: a partial frame will never complete.
                parser.reset();
                std::thread::sleep(Duration::from_millis(10));
                continue;
            }
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                tracing::warn!(error = %e, "reading the port failed");
                std::thread::sleep(Duration::from_millis(10));
                continue;
            }
        };
        parser.push(&chunk[..n]);
        while let Some(item) = parser.next_item() {
            match item {
                Inbound::Frame(f) => {
                    if exec.write_all(&f).is_err() {
                        return;
                    }
                }
                Inbound::Time(micros) => set_clock(micros),
                Inbound::Ping(nonce) if answered == Some(nonce) => {}
                Inbound::Ping(nonce) => {
                    answered = Some(nonce);
                    let mut w = lock(port_w);
                    if let Err(e) = w.write_all(&control_frame(READY, nonce)) {
                        tracing::warn!(error = %e, "answering a ping failed");
                    }
                }
            }
        }
    }
}

/// Sets the guest's clock to the host's; logs the first correction, and any
/// jump of more than 2 s (frames queued while the VM was paused arrive
/// together, each a second ahead of the last: not worth a line each).
fn set_clock(micros: u64) {
    static SET: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    let before = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or(0);
    let ts = nix::sys::time::TimeSpec::new(
        (micros / 1_000_000) as i64,
        ((micros % 1_000_000) * 1000) as i64,
    );
    match nix::time::clock_settime(nix::time::ClockId::CLOCK_REALTIME, ts) {
        Ok(()) => {
            let jump_ms = (micros as i64 - before) / 1000;
            if !SET.swap(true, std::sync::atomic::Ordering::Relaxed) || jump_ms.abs() > 2000 {
                tracing::info!(jump_ms, "guest clock set from the host's");
            }
        }
        Err(e) => tracing::warn!(error = %e, "setting the guest clock failed"),
    }
}

fn executor_to_port(mut exec: UnixStream, port_w: &Mutex<File>) {
    let mut buf: Vec<u8> = Vec::with_capacity(64 * 1024);
    let mut chunk = vec![0u8; 64 * 1024];
    loop {
        let n = match exec.read(&mut chunk) {
            Ok(0) => return,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => return,
        };
        buf.extend_from_slice(&chunk[..n]);
        // Write whole frames only, so a ready answer never lands inside one.
        let mut end = 0;
        while buf.len() >= end + 4 {
            let len = u32::from_be_bytes(buf[end..end + 4].try_into().expect("4 bytes")) as usize;
            if buf.len() < end + 4 + len {
                break;
            }
            end += 4 + len;
        }
        if end > 0 {
            let mut w = lock(port_w);
            if let Err(e) = w.write_all(&buf[..end]) {
                tracing::warn!(error = %e, "writing the port failed");
            }
            drop(w);
            buf.drain(..end);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(body: &[u8]) -> Vec<u8> {
        let mut f = (body.len() as u32).to_be_bytes().to_vec();
        f.extend_from_slice(body);
        f
    }

    #[test]
    fn frames_and_pings_are_split_whatever_the_chunking() {
        let mut stream = frame(b"hello");
        stream.extend_from_slice(&control_frame(PING, 42));
        stream.extend_from_slice(&control_frame(TIME, 1_700_000_000_000_000));
        stream.extend_from_slice(&frame(&[7u8; 5000]));
        for chunk in [1, 3, 16, 4096] {
            let mut p = InboundParser::new(1 << 20);
            let mut got = Vec::new();
            for c in stream.chunks(chunk) {
                p.push(c);
                while let Some(i) = p.next_item() {
                    got.push(i);
                }
            }
            assert_eq!(
                got,
                vec![
                    Inbound::Frame(frame(b"hello")),
                    Inbound::Ping(42),
                    Inbound::Time(1_700_000_000_000_000),
                    Inbound::Frame(frame(&[7u8; 5000])),
                ],
                "chunk {chunk}"
            );
        }
    }

    #[test]
    fn a_ping_after_an_unfinished_frame_resynchronizes() {
        let mut p = InboundParser::new(1 << 20);
        // The host went away in the middle of a 100-byte frame.
        let f = frame(&[1u8; 100]);
        p.push(&f[..40]);
        assert_eq!(p.next_item(), None);
        p.push(&control_frame(PING, 7));
        assert_eq!(p.next_item(), Some(Inbound::Ping(7)));
        p.push(&frame(b"x"));
        assert_eq!(p.next_item(), Some(Inbound::Frame(frame(b"x"))));
    }

    #[test]
    fn garbage_is_skipped_up_to_the_next_ping() {
        let mut p = InboundParser::new(1024);
        let mut s = vec![0x7f, 0, 0, 0, 1, 2, 3];
        s.extend_from_slice(&control_frame(PING, 9));
        s.extend_from_slice(&frame(b"ok"));
        p.push(&s[..3]);
        p.push(&s[3..]);
        assert_eq!(p.next_item(), Some(Inbound::Ping(9)));
        assert_eq!(p.next_item(), Some(Inbound::Frame(frame(b"ok"))));
        assert_eq!(p.next_item(), None);
    }
}
