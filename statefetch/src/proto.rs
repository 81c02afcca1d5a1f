//! The state-fetch protocol (sans-IO): request and response types, the
//! server-side handler, and the checks a client applies to every reply.
//!
//! Every request names the checkpoint it wants by `(seq, root)`, so a reply
//! for another checkpoint is recognisable as stale. Replies are data only;
//! nothing in them is trusted until checked here against the certified
//! root: a page against its Merkle proof or an already verified leaf hash, a
//! node range against the root. A reply that fails a check is a
//! [`FetchError`] whose [`FetchError::is_fault`] says whether it proves the
//! peer faulty (as opposed to a transport failure).

use crate::merkle::{self, ProofError};
use crate::store::{PageStore, StoreError};
use crate::PAGE_SIZE;
use serde::{Deserialize, Serialize};
use zz_wire::{Digest, Seq, WireError};

/// A checkpoint a peer can serve.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct CheckpointInfo {
    pub seq: Seq,
    pub root: Digest,
    pub num_pages: u64,
}

/// A request to a fetch server.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub enum Request {
    /// Which checkpoints do you retain?
    Info,
    /// Pages of checkpoint `(seq, root)`, in the order given, each with its
    /// Merkle proof if `proofs`.
    Pages {
        seq: Seq,
        root: Digest,
        indices: Vec<u64>,
        proofs: bool,
    },
    /// Nodes `[start, start+count)` of tree `level` (0 = leaf hashes) of
    /// checkpoint `(seq, root)`, with the siblings proving them.
    Nodes {
        seq: Seq,
        root: Digest,
        level: u8,
        start: u64,
        count: u32,
    },
    /// Which pages has your state read since checkpoint `(seq, root)`, in
    /// order of first read (at most `max`)? An unverifiable hint: a
    /// recovering replica prefetches those pages, since its replay of the
    /// orders after the checkpoint reads the same ones (see
    /// [`crate::read_log`]).
    ReadHint { seq: Seq, root: Digest, max: u32 },
}

/// Reply to [`Request::ReadHint`].
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct ReadHint {
    pub seq: Seq,
    pub root: Digest,
    pub pages: Vec<u64>,
}

/// One page in a reply.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct PageData {
    pub index: u64,
    #[serde(with = "serde_bytes")]
    pub data: Vec<u8>,
    /// Sibling hashes from the leaf up (see [`merkle::prove_range`]).
    pub proof: Option<Vec<Digest>>,
}

/// Reply to [`Request::Pages`].
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct PagesReply {
    pub seq: Seq,
    pub root: Digest,
    pub num_pages: u64,
    pub pages: Vec<PageData>,
}

/// Reply to [`Request::Nodes`].
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct NodeRange {
    pub seq: Seq,
    pub root: Digest,
    pub num_pages: u64,
    pub level: u8,
    pub start: u64,
    pub nodes: Vec<Digest>,
    pub siblings: Vec<Digest>,
}

/// Why a server refused a request.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub enum RefusalKind {
    /// The checkpoint is not (or no longer) retained.
    UnknownCheckpoint,
    /// The server's checkpoint `seq` has another root.
    RootMismatch,
    /// Index or range outside the checkpoint.
    OutOfRange,
    /// The request asks for more than the server's limits.
    TooLarge,
    /// The server failed internally.
    Internal,
}

/// A server's answer.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub enum Response {
    Info(Vec<CheckpointInfo>),
    Pages(PagesReply),
    Nodes(NodeRange),
    ReadHint(ReadHint),
    Refused { kind: RefusalKind, detail: String },
}

/// Per-request limits a server enforces.
#[derive(Clone, Debug)]
pub struct Limits {
    pub max_pages: usize,
    pub max_nodes: u32,
    pub max_hint_pages: u32,
}

impl Default for Limits {
    fn default() -> Self {
        // 1024 pages with proofs is about 5 MiB; 64 Ki nodes is 2 MiB; a
        // hint of 16 Ki pages is 128 KiB.
        Limits {
            max_pages: 1024,
            max_nodes: 1 << 16,
            max_hint_pages: 1 << 14,
        }
    }
}

fn refused(kind: RefusalKind, detail: impl Into<String>) -> Response {
    Response::Refused {
        kind,
        detail: detail.into(),
    }
}

fn from_store_error(e: StoreError) -> Response {
    match e {
        StoreError::UnknownCheckpoint(_) => refused(RefusalKind::UnknownCheckpoint, e.to_string()),
        StoreError::PageOutOfRange { .. } | StoreError::Proof(_) => {
            refused(RefusalKind::OutOfRange, e.to_string())
        }
        e => refused(RefusalKind::Internal, e.to_string()),
    }
}

/// Answers one request from a store's retained checkpoints.
pub fn handle(store: &PageStore, limits: &Limits, request: Request) -> Response {
    let check = |seq: Seq, root: Digest| -> Result<(), Response> {
        let info = store.checkpoint_info(seq).map_err(from_store_error)?;
        if info.root != root {
            return Err(refused(
                RefusalKind::RootMismatch,
                format!("checkpoint {seq} has root {}", info.root),
            ));
        }
        // A peer is fetching this checkpoint: keep it while it does.
        store.touch(seq);
        Ok(())
    };
    match request {
        Request::Info => match store.checkpoints() {
            Ok(list) => Response::Info(list),
            Err(e) => from_store_error(e),
        },
        Request::Pages {
            seq,
            root,
            indices,
            proofs,
        } => {
            if indices.len() > limits.max_pages {
                return refused(
                    RefusalKind::TooLarge,
                    format!("at most {} pages", limits.max_pages),
                );
            }
            if let Err(r) = check(seq, root) {
                return r;
            }
            match store.read_pages_at(seq, &indices, proofs) {
                Ok((info, pages)) => Response::Pages(PagesReply {
                    seq,
                    root,
                    num_pages: info.num_pages,
                    pages,
                }),
                Err(e) => from_store_error(e),
            }
        }
        Request::Nodes {
            seq,
            root,
            level,
            start,
            count,
        } => {
            if count > limits.max_nodes {
                return refused(
                    RefusalKind::TooLarge,
                    format!("at most {} nodes", limits.max_nodes),
                );
            }
            if let Err(r) = check(seq, root) {
                return r;
            }
            match store.node_range(seq, u32::from(level), start, u64::from(count)) {
                Ok((info, nodes, siblings)) => Response::Nodes(NodeRange {
                    seq,
                    root,
                    num_pages: info.num_pages,
                    level,
                    start,
                    nodes,
                    siblings,
                }),
                Err(e) => from_store_error(e),
            }
        }
        Request::ReadHint { seq, root, max } => {
            if let Err(r) = check(seq, root) {
                return r;
            }
            let max = max.min(limits.max_hint_pages) as usize;
            match store.reads_since(seq, max) {
                Some(pages) => Response::ReadHint(ReadHint { seq, root, pages }),
                None => refused(
                    RefusalKind::UnknownCheckpoint,
                    format!("no record of the pages read since checkpoint {seq}"),
                ),
            }
        }
    }
}

/// A failed fetch: a reply that fails verification, or a transport failure.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("reply is for checkpoint {got_seq}/{got_root:?}, asked for {seq}/{root:?}")]
    StaleCheckpoint {
        seq: Seq,
        root: Digest,
        got_seq: Seq,
        got_root: Digest,
    },
    #[error("reply claims {got} pages, the checkpoint has {expected}")]
    WrongNumPages { expected: u64, got: u64 },
    #[error("expected {expected} items, got {got}")]
    WrongCount { expected: usize, got: usize },
    #[error("asked for page {expected}, got page {got}")]
    WrongIndex { expected: u64, got: u64 },
    #[error("page {index} has {len} bytes")]
    BadPageLength { index: u64, len: usize },
    #[error("page {index} does not match its verified leaf hash")]
    BadPage { index: u64 },
    #[error("page {index}: proof rejected: {error}")]
    BadPageProof { index: u64, error: ProofError },
    #[error("page {0} has no proof")]
    MissingProof(u64),
    #[error("node range rejected: {0}")]
    BadProof(ProofError),
    #[error("reply does not answer the request")]
    UnexpectedResponse,
    #[error("peer refused ({kind:?}): {detail}")]
    Refused { kind: RefusalKind, detail: String },
    #[error("response truncated: connection closed mid-frame")]
    Truncated,
    #[error("connection closed")]
    Closed,
    #[error("timed out")]
    Timeout,
    #[error("malformed reply: {0}")]
    Wire(WireError),
    #[error("i/o error: {0}")]
    Io(#[from] std::io::Error),
}

impl From<WireError> for FetchError {
    fn from(e: WireError) -> Self {
        match e {
            WireError::Io(io) => FetchError::Io(io),
            e => FetchError::Wire(e),
        }
    }
}

impl FetchError {
    /// True when the reply proves the source faulty (it answered, and the
    /// answer is wrong); false for failures an honest source can have
    /// (timeouts, closed connections, a checkpoint it no longer holds).
    pub fn is_fault(&self) -> bool {
        match self {
            FetchError::Refused { kind, .. } => *kind == RefusalKind::RootMismatch,
            FetchError::Truncated
            | FetchError::Closed
            | FetchError::Timeout
            | FetchError::Io(_) => false,
            _ => true,
        }
    }
}

fn check_header(
    seq: Seq,
    root: Digest,
    num_pages: Option<u64>,
    got: (Seq, Digest, u64),
) -> Result<(), FetchError> {
    if got.0 != seq || got.1 != root {
        return Err(FetchError::StaleCheckpoint {
            seq,
            root,
            got_seq: got.0,
            got_root: got.1,
        });
    }
    match num_pages {
        Some(n) if n != got.2 => Err(FetchError::WrongNumPages {
            expected: n,
            got: got.2,
        }),
        _ => Ok(()),
    }
}

fn unwrap_refusal(resp: Response) -> FetchError {
    match resp {
        Response::Refused { kind, detail } => FetchError::Refused { kind, detail },
        _ => FetchError::UnexpectedResponse,
    }
}

/// Checks a reply to `ReadHint { seq, root, max }`: right checkpoint, at
/// most `max` pages. The pages themselves cannot be checked (they are a
/// hint, and every page fetched by it is verified as any other).
pub fn check_read_hint(
    seq: Seq,
    root: Digest,
    max: u32,
    resp: Response,
) -> Result<Vec<u64>, FetchError> {
    let hint = match resp {
        Response::ReadHint(h) => h,
        other => return Err(unwrap_refusal(other)),
    };
    check_header(seq, root, None, (hint.seq, hint.root, 0))?;
    if hint.pages.len() > max as usize {
        return Err(FetchError::WrongCount {
            expected: max as usize,
            got: hint.pages.len(),
        });
    }
    Ok(hint.pages)
}

/// Checks a reply to `Pages { seq, root, indices, .. }`: right checkpoint,
/// right page count (if known), exactly the pages asked for, each of
/// [`PAGE_SIZE`] bytes. Contents are checked by [`verify_with_proofs`] or
/// [`verify_with_leaves`].
pub fn check_pages(
    seq: Seq,
    root: Digest,
    num_pages: Option<u64>,
    indices: &[u64],
    resp: Response,
) -> Result<PagesReply, FetchError> {
    let reply = match resp {
        Response::Pages(r) => r,
        other => return Err(unwrap_refusal(other)),
    };
    check_header(
        seq,
        root,
        num_pages,
        (reply.seq, reply.root, reply.num_pages),
    )?;
    if reply.pages.len() != indices.len() {
        return Err(FetchError::WrongCount {
            expected: indices.len(),
            got: reply.pages.len(),
        });
    }
    for (p, &want) in reply.pages.iter().zip(indices) {
        if p.index != want {
            return Err(FetchError::WrongIndex {
                expected: want,
                got: p.index,
            });
        }
        if p.data.len() != PAGE_SIZE {
            return Err(FetchError::BadPageLength {
                index: p.index,
                len: p.data.len(),
            });
        }
    }
    Ok(reply)
}

/// Verifies every page of a checked reply by its Merkle proof against `root`.
pub fn verify_with_proofs(root: &Digest, reply: &PagesReply) -> Result<(), FetchError> {
    for p in &reply.pages {
        let proof = p.proof.as_ref().ok_or(FetchError::MissingProof(p.index))?;
        merkle::verify_page(root, reply.num_pages, p.index, &p.data, proof).map_err(|error| {
            FetchError::BadPageProof {
                index: p.index,
                error,
            }
        })?;
    }
    Ok(())
}

/// Verifies every page of a checked reply against leaf hashes already
/// verified against the root (`leaves[i]` for `reply.pages[i]`).
pub fn verify_with_leaves(reply: &PagesReply, leaves: &[Digest]) -> Result<(), FetchError> {
    if leaves.len() != reply.pages.len() {
        return Err(FetchError::WrongCount {
            expected: leaves.len(),
            got: reply.pages.len(),
        });
    }
    for (p, leaf) in reply.pages.iter().zip(leaves) {
        if merkle::leaf_hash(p.index, &p.data) != *leaf {
            return Err(FetchError::BadPage { index: p.index });
        }
    }
    Ok(())
}

/// Checks and verifies a reply to `Nodes { seq, root, level, start, count }`
/// against `root`.
pub fn check_nodes(
    seq: Seq,
    root: Digest,
    num_pages: Option<u64>,
    (level, start, count): (u8, u64, u32),
    resp: Response,
) -> Result<NodeRange, FetchError> {
    let range = match resp {
        Response::Nodes(r) => r,
        other => return Err(unwrap_refusal(other)),
    };
    check_header(
        seq,
        root,
        num_pages,
        (range.seq, range.root, range.num_pages),
    )?;
    if range.level != level || range.start != start {
        return Err(FetchError::UnexpectedResponse);
    }
    if range.nodes.len() != count as usize {
        return Err(FetchError::WrongCount {
            expected: count as usize,
            got: range.nodes.len(),
        });
    }
    merkle::verify_range(
        &root,
        range.num_pages,
        u32::from(level),
        start,
        &range.nodes,
        &range.siblings,
    )
    .map_err(FetchError::BadProof)?;
    Ok(range)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn decoding_arbitrary_bytes_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = zz_wire::codec::decode::<Response>(&bytes);
            let _ = zz_wire::codec::decode::<Request>(&bytes);
        }
    }

    #[test]
    fn round_trip_and_hostile_lengths() {
        let r = Response::Pages(PagesReply {
            seq: 1,
            root: Digest::ZERO,
            num_pages: 2,
            pages: vec![PageData {
                index: 1,
                data: vec![7; PAGE_SIZE],
                proof: Some(vec![]),
            }],
        });
        let bytes = zz_wire::codec::encode(&r);
        assert_eq!(zz_wire::codec::decode::<Response>(&bytes).unwrap(), r);
        // Truncated encodings are errors, not panics.
        for cut in [0, 1, 10, bytes.len() / 2, bytes.len() - 1] {
            assert!(zz_wire::codec::decode::<Response>(&bytes[..cut]).is_err());
        }
        // A page-vector length of u64::MAX is rejected by the size limit.
        let mut evil = vec![1u8, 0, 0, 0];
        evil.extend_from_slice(&[0; 8 + 32 + 8]);
        evil.extend_from_slice(&u64::MAX.to_le_bytes());
        assert!(zz_wire::codec::decode::<Response>(&evil).is_err());
    }
}
