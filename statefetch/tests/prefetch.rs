//! Prefetch by read hint: a recovering view asks a peer which pages its
//! state read since the checkpoint and fetches those first, in that order,
//! so that a replay reading them finds them present.

mod common;

use common::{setup, truth};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use zz_statefetch::proto::{Request, Response};
use zz_statefetch::recovery::PREFETCH_FIRST_BATCH;
use zz_statefetch::source::SourceFuture;
use zz_statefetch::{LocalSource, PageSource, RecoveryConfig, RecoveryView};

/// Records the page requests that carry proofs (demand reads and prefetch;
/// background batches carry none), and holds back leaf comparisons so the
/// background cannot fetch anything before the prefetch has started.
struct Recording {
    inner: LocalSource,
    proof_requests: Mutex<Vec<Vec<u64>>>,
    hint: Option<Vec<u64>>,
}

impl PageSource for Recording {
    fn name(&self) -> String {
        "recording".into()
    }

    fn call(&self, request: Request) -> SourceFuture<'_> {
        Box::pin(async move {
            match &request {
                Request::Pages {
                    indices,
                    proofs: true,
                    ..
                } => self.proof_requests.lock().unwrap().push(indices.clone()),
                Request::Nodes { count, .. } if *count > 1 => {
                    tokio::time::sleep(Duration::from_millis(300)).await;
                }
                _ => {}
            }
            let mut resp = self.inner.call(request).await?;
            // A lying peer's hint: pages not read at all.
            if let (Response::ReadHint(h), Some(lie)) = (&mut resp, &self.hint) {
                h.pages = lie.clone();
            }
            Ok(resp)
        })
    }
}

fn config() -> RecoveryConfig {
    RecoveryConfig {
        batch_pages: 8,
        chunk_level: 4,
        ..Default::default()
    }
}

/// Pages the honest peer's state reads after checkpoint 5, in order.
fn replay_reads(n: u64) -> Vec<u64> {
    (0..40).map(|k| (k * 37 + 11) % n).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_pages_read_since_the_checkpoint_are_fetched_first_in_order() {
    let s = setup(200, 1, 0); // every page differs from the stale copy
    let reads = replay_reads(s.n);
    for &i in &reads {
        s.honest.read_page(i).unwrap();
    }
    assert_eq!(s.honest.reads_since(s.cert.seq, 1000), Some(reads.clone()));
    let source = Arc::new(Recording {
        inner: LocalSource::new(s.honest.clone(), "honest"),
        proof_requests: Mutex::new(Vec::new()),
        hint: None,
    });
    let view = RecoveryView::open(
        s.local.clone(),
        s.cert,
        vec![source.clone() as Arc<dyn PageSource>],
        config(),
    )
    .await
    .unwrap();
    // Before any read: the prefetch alone brings the hinted pages in.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while view.progress().fetched < reads.len() as u64 {
        assert!(tokio::time::Instant::now() < deadline, "prefetch stalled");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // Two requests in flight at once, so they may reach the source in
    // either order.
    let mut requests = source.proof_requests.lock().unwrap().clone();
    requests.sort_by_key(|r| r.len());
    let first = PREFETCH_FIRST_BATCH;
    assert_eq!(
        requests,
        vec![reads[..first].to_vec(), reads[first..].to_vec()],
        "one small request, then the rest, in the order they were read"
    );
    // The replay's reads then wait for nothing.
    for &i in &reads {
        assert_eq!(view.read(i).await.unwrap(), truth(&s, i), "page {i}");
    }
    assert_eq!(view.progress().demand_reads, 0);
    assert_eq!(view.finish().await.unwrap(), s.cert.root);
    assert_eq!(source.proof_requests.lock().unwrap().len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_false_hint_costs_fetches_only() {
    let s = setup(200, 1, 0);
    // The peer claims reads of pages past the checkpoint (ignored) and of
    // pages nobody read: they are fetched and verified like any other.
    let lie: Vec<u64> = vec![10_000, 3, 5, 199, 1 << 40];
    let source = Arc::new(Recording {
        inner: LocalSource::new(s.honest.clone(), "liar"),
        proof_requests: Mutex::new(Vec::new()),
        hint: Some(lie),
    });
    let view = RecoveryView::open(
        s.local.clone(),
        s.cert,
        vec![source.clone() as Arc<dyn PageSource>],
        config(),
    )
    .await
    .unwrap();
    let progress = view.wait_complete().await.unwrap();
    assert_eq!(progress.present, s.n);
    assert_eq!(progress.faults, 0, "an unverifiable hint proves nothing");
    assert_eq!(
        source.proof_requests.lock().unwrap().first(),
        Some(&vec![3, 5, 199])
    );
    for i in 0..s.n {
        assert_eq!(s.local.read_page(i).unwrap(), truth(&s, i), "page {i}");
    }
    assert_eq!(view.finish().await.unwrap(), s.cert.root);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_without_a_read_log_is_no_fault() {
    let s = setup(64, 2, 0);
    // The peer went on to checkpoint 6 and restarted: it still serves
    // checkpoint 5 but has no record of the reads since.
    s.honest.write_page(0, &common::page(0, 7)).unwrap();
    s.honest.checkpoint(6).unwrap();
    let dir = s._dir.path().join("honest");
    drop(s.honest);
    let honest = common::open(&dir);
    assert_eq!(honest.reads_since(6, 10), Some(vec![]));
    assert_eq!(honest.reads_since(5, 10), None);
    let view = RecoveryView::open(
        s.local.clone(),
        s.cert,
        vec![Arc::new(LocalSource::new(honest.clone(), "honest")) as Arc<dyn PageSource>],
        config(),
    )
    .await
    .unwrap();
    let progress = view.wait_complete().await.unwrap();
    assert_eq!(progress.faults, 0);
    assert_eq!(view.finish().await.unwrap(), s.cert.root);
}
