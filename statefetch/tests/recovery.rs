//! Recovery against lying and failing sources: every kind of bad reply is
//! rejected, reported, and the page is then obtained from an honest source.

mod common;

use common::{setup, truth, HonestAfterLiar, Liar, Lie};
use std::sync::Arc;
use zz_statefetch::proto::FetchError;
use zz_statefetch::recovery::Progress;
use zz_statefetch::{
    LocalSource, PageSource, RecoveryConfig, RecoveryError, RecoveryEvent, RecoveryView,
};

const LIES: [Lie; 8] = [
    Lie::CorruptPage,
    Lie::PageOfOtherIndex,
    Lie::Relabel,
    Lie::WrongProof,
    Lie::Stale,
    Lie::ShortPage,
    Lie::EverySecondPage,
    Lie::WrongLeaves,
];

fn expected_error(lie: Lie, e: &FetchError) -> bool {
    match lie {
        Lie::CorruptPage | Lie::PageOfOtherIndex | Lie::EverySecondPage => {
            matches!(
                e,
                FetchError::BadPage { .. } | FetchError::BadPageProof { .. }
            )
        }
        Lie::Relabel => matches!(e, FetchError::WrongIndex { .. }),
        Lie::WrongProof => matches!(e, FetchError::BadProof(_) | FetchError::BadPageProof { .. }),
        Lie::Stale => matches!(e, FetchError::StaleCheckpoint { .. }),
        Lie::ShortPage => matches!(e, FetchError::BadPageLength { .. }),
        Lie::WrongLeaves => matches!(e, FetchError::BadProof(_)),
    }
}

fn config() -> RecoveryConfig {
    RecoveryConfig {
        batch_pages: 8,
        chunk_level: 4,
        max_in_flight: 3,
        ..Default::default()
    }
}

fn liar_faults(events: &[RecoveryEvent], lie: Lie) -> Vec<&FetchError> {
    events
        .iter()
        .filter_map(|e| match e {
            RecoveryEvent::SourceFault {
                source,
                error,
                excluded,
            } if source.starts_with("liar") => {
                assert!(*excluded, "a proven lie must exclude the source: {error}");
                assert!(expected_error(lie, error), "{lie:?} reported as {error}");
                Some(error)
            }
            _ => None,
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_lie_is_rejected_then_the_honest_source_serves_the_page() {
    for lie in LIES {
        let s = setup(96, 3, 5);
        let liar = Arc::new(Liar::new(s.honest.clone(), lie));
        let honest: Arc<dyn PageSource> =
            Arc::new(HonestAfterLiar::new(s.honest.clone(), liar.clone()));
        let liar: Arc<dyn PageSource> = liar;
        let view = RecoveryView::open(s.local.clone(), s.cert, vec![liar, honest], config())
            .await
            .unwrap();
        assert_eq!(view.num_pages(), s.n);
        for &i in &s.changed {
            let got = match view.read(i).await {
                Ok(d) => d,
                Err(e) => panic!("{lie:?} page {i}: {e}; events {:?}", view.take_events()),
            };
            assert_eq!(got, truth(&s, i), "{lie:?} page {i}");
        }
        let progress = view.wait_complete().await.unwrap();
        assert!(progress.finished && progress.compared);
        assert_eq!(progress.present, s.n);
        let events = view.take_events();
        let faults = liar_faults(&events, lie);
        assert!(!faults.is_empty(), "{lie:?}: liar was never caught");
        for i in 0..s.n {
            assert_eq!(
                s.local.read_page(i).unwrap(),
                truth(&s, i),
                "{lie:?} page {i}"
            );
        }
        assert_eq!(view.finish().await.unwrap(), s.cert.root);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lone_liar_never_gets_a_bad_page_accepted() {
    for lie in LIES {
        let s = setup(40, 2, 0);
        let liar: Arc<dyn PageSource> = Arc::new(Liar::new(s.honest.clone(), lie));
        let view = match RecoveryView::open(s.local.clone(), s.cert, vec![liar], config()).await {
            Ok(v) => v,
            Err(RecoveryError::NoHonestSource) => {
                assert!(
                    matches!(lie, Lie::Stale | Lie::WrongProof | Lie::WrongLeaves),
                    "{lie:?}"
                );
                continue;
            }
            Err(e) => panic!("{lie:?}: {e}"),
        };
        let mut failed = false;
        for &i in &s.changed {
            match view.read(i).await {
                Ok(data) => assert_eq!(data, truth(&s, i), "{lie:?}: unverified page returned"),
                Err(RecoveryError::NoHonestSource) => failed = true,
                Err(e) => panic!("{lie:?}: unexpected {e}"),
            }
        }
        assert!(failed, "{lie:?}: the liar was never caught");
        assert!(!liar_faults(&view.take_events(), lie).is_empty());
        // Nothing unverified reached the store either.
        for i in 0..s.n {
            let local = s.local.read_page(i).unwrap();
            assert!(
                local == truth(&s, i) || local == common::page(i, 0),
                "page {i} corrupted"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_second_page_liar_is_caught_and_pages_come_from_honest_peer() {
    let s = setup(64, 1, 0); // every page differs
    let liar = Arc::new(Liar::new(s.honest.clone(), Lie::EverySecondPage));
    let sources: Vec<Arc<dyn PageSource>> = vec![
        liar.clone(),
        Arc::new(HonestAfterLiar::new(s.honest.clone(), liar.clone())),
    ];
    let view = RecoveryView::open(s.local.clone(), s.cert, sources, config())
        .await
        .unwrap();
    for i in 0..s.n {
        assert_eq!(view.read(i).await.unwrap(), truth(&s, i));
    }
    view.wait_complete().await.unwrap();
    let events = view.take_events();
    // Excluded at its first proven lie: only requests already in flight to
    // it then (at most `max_in_flight`) can fail as well.
    let faults = liar_faults(&events, Lie::EverySecondPage).len();
    assert!(
        (1..=config().max_in_flight).contains(&faults),
        "excluded after first lie, got {faults} faults"
    );
    assert!(liar.pages_served.load(std::sync::atomic::Ordering::SeqCst) >= 2);
    assert_eq!(view.finish().await.unwrap(), s.cert.root);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_differing_pages_are_fetched() {
    let s = setup(2048, 97, 0);
    let honest: Arc<dyn PageSource> = Arc::new(LocalSource::new(s.honest.clone(), "honest"));
    let view = RecoveryView::open(
        s.local.clone(),
        s.cert,
        vec![honest],
        RecoveryConfig::default(),
    )
    .await
    .unwrap();
    let Progress {
        fetched, present, ..
    } = view.wait_complete().await.unwrap();
    assert_eq!(fetched, s.changed.len() as u64);
    assert_eq!(present, s.n);
    assert_eq!(view.finish().await.unwrap(), s.cert.root);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blocking_reads_writes_and_fresh_replica() {
    // A rebuilt replica with an empty store recovers everything.
    let s = setup(50, 5, 3);
    let dir = tempfile::tempdir().unwrap();
    let empty = common::open(dir.path());
    let honest: Arc<dyn PageSource> = Arc::new(LocalSource::new(s.honest.clone(), "honest"));
    let view = Arc::new(
        RecoveryView::open(empty.clone(), s.cert, vec![honest], config())
            .await
            .unwrap(),
    );
    let v = view.clone();
    let want: Vec<Vec<u8>> = (0..s.n).map(|i| truth(&s, i)).collect();
    let got = tokio::task::spawn_blocking(move || {
        (0..v.num_pages())
            .rev()
            .map(|i| v.read_blocking(i).unwrap())
            .collect::<Vec<_>>()
    })
    .await
    .unwrap();
    assert_eq!(got.into_iter().rev().collect::<Vec<_>>(), want);
    // An executor write wins over the checkpoint contents.
    view.write(3, &common::page(3, 77)).unwrap();
    view.wait_complete().await.unwrap();
    assert_eq!(view.read(3).await.unwrap(), common::page(3, 77));
    assert!(matches!(
        view.read(s.n).await,
        Err(RecoveryError::OutOfRange { .. })
    ));
    let view = Arc::into_inner(view).unwrap();
    assert!(matches!(
        view.finish().await,
        Err(RecoveryError::Modified(5))
    ));
}

/// A peer that has died without closing its connection: it answers each
/// request only after an hour (real sources time out long before).
struct Unresponsive(LocalSource);

impl PageSource for Unresponsive {
    fn name(&self) -> String {
        "unresponsive".into()
    }

    fn call(
        &self,
        request: zz_statefetch::proto::Request,
    ) -> zz_statefetch::source::SourceFuture<'_> {
        Box::pin(async move {
            tokio::time::sleep(std::time::Duration::from_secs(3600)).await;
            self.0.call(request).await
        })
    }
}

/// Reads are hedged: with one source silent, every read is served by the
/// other after `hedge_after`, neither waiting for the silent source nor
/// for background batches stuck behind it. Virtual time (paused clock), so
/// the bound checked is the protocol's, not the machine's speed.
#[tokio::test(start_paused = true)]
async fn a_silent_source_delays_reads_only_by_the_hedge() {
    let s = setup(96, 3, 5);
    let honest: Arc<dyn PageSource> = Arc::new(LocalSource::new(s.honest.clone(), "honest"));
    let silent: Arc<dyn PageSource> =
        Arc::new(Unresponsive(LocalSource::new(s.honest.clone(), "silent")));
    // The honest source first: opening asks one source without hedging.
    let view = RecoveryView::open(s.local.clone(), s.cert, vec![honest, silent], config())
        .await
        .unwrap();
    let t0 = tokio::time::Instant::now();
    for &i in &s.changed {
        assert_eq!(view.read(i).await.unwrap(), truth(&s, i), "page {i}");
    }
    let waited = t0.elapsed();
    let bound = config().hedge_after * (s.changed.len() as u32 + 1);
    assert!(
        waited <= bound,
        "reads took {waited:?} of virtual time, more than one hedge delay each ({bound:?})"
    );
}

/// Serves the opening request, then answers nothing (a transient failure,
/// not a fault) for `outage`, then serves again.
struct Outage {
    inner: LocalSource,
    outage: std::time::Duration,
    calls: std::sync::atomic::AtomicU64,
    down_since: std::sync::Mutex<Option<std::time::Instant>>,
}

impl Outage {
    fn new(inner: LocalSource, outage: std::time::Duration) -> Outage {
        Outage {
            inner,
            outage,
            calls: Default::default(),
            down_since: Default::default(),
        }
    }
}

impl PageSource for Outage {
    fn name(&self) -> String {
        "outage".into()
    }

    fn call(&self, request: zz_statefetch::Request) -> zz_statefetch::source::SourceFuture<'_> {
        Box::pin(async move {
            if self.calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst) > 0 {
                let now = std::time::Instant::now();
                let since = *self.down_since.lock().unwrap().get_or_insert(now);
                if now < since + self.outage {
                    return Err(FetchError::Timeout);
                }
            }
            self.inner.call(request).await
        })
    }
}

/// The background keeps asking while its only source is unreachable and
/// completes once it is back; it fails only after `give_up_after`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_background_outlasts_a_source_outage_and_gives_up_only_later() {
    use std::time::{Duration, Instant};
    let patient = RecoveryConfig {
        give_up_after: Duration::from_secs(5),
        retry_backoff: Duration::from_millis(20),
        ..config()
    };
    let s = setup(96, 3, 5);
    let source = Arc::new(Outage::new(
        LocalSource::new(s.honest.clone(), "honest"),
        Duration::from_millis(600),
    ));
    let t0 = Instant::now();
    let view = RecoveryView::open(
        s.local.clone(),
        s.cert,
        vec![source as Arc<dyn PageSource>],
        patient.clone(),
    )
    .await
    .unwrap();
    let progress = view.wait_complete().await.unwrap();
    assert!(t0.elapsed() >= Duration::from_millis(600));
    assert_eq!(progress.present, s.n);
    assert_eq!(view.finish().await.unwrap(), s.cert.root);

    // Down for good: the recovery fails, and not before `give_up_after`.
    let s = setup(96, 3, 5);
    let source = Arc::new(Outage::new(
        LocalSource::new(s.honest.clone(), "honest"),
        Duration::from_secs(3600),
    ));
    let view = RecoveryView::open(
        s.local.clone(),
        s.cert,
        vec![source as Arc<dyn PageSource>],
        RecoveryConfig {
            give_up_after: Duration::from_millis(400),
            ..patient
        },
    )
    .await
    .unwrap();
    let t0 = Instant::now();
    let e = view.wait_complete().await.unwrap_err();
    assert!(
        t0.elapsed() >= Duration::from_millis(400),
        "gave up early: {e}"
    );
    assert!(e.to_string().contains("no source answered"), "{e}");
}

/// Executor writes during recovery are written behind: reads see them at
/// once, the store gets them in batches (when many are pending, or when the
/// caller persists the view), never older fetched contents over them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_during_recovery_are_read_back_and_reach_the_store_later() {
    let s = setup(50, 5, 3);
    let dir = tempfile::tempdir().unwrap();
    let empty = common::open(dir.path());
    let honest: Arc<dyn PageSource> = Arc::new(LocalSource::new(s.honest.clone(), "honest"));
    let view = RecoveryView::open(empty.clone(), s.cert, vec![honest], config())
        .await
        .unwrap();
    // Page 10 is written before it was ever fetched, page 0 after a read.
    assert_eq!(view.read(0).await.unwrap(), truth(&s, 0));
    view.write_pages(&[(10, &common::page(10, 77)), (0, &common::page(0, 78))])
        .unwrap();
    assert_eq!(view.read(10).await.unwrap(), common::page(10, 77));
    assert_eq!(view.read(0).await.unwrap(), common::page(0, 78));
    view.wait_complete().await.unwrap();
    // Complete: the store holds every page, our writes over the fetched ones.
    assert_eq!(empty.read_page(10).unwrap(), common::page(10, 77));
    assert_eq!(empty.read_page(0).unwrap(), common::page(0, 78));
    for i in (1..s.n).filter(|i| *i != 10) {
        assert_eq!(empty.read_page(i).unwrap(), truth(&s, i), "page {i}");
    }
    // Pages past the checkpoint's count are written behind too: read back
    // from the view at once, in the store only once the view persists.
    view.write(s.n + 2, &common::page(99, 1)).unwrap();
    assert_eq!(view.read_grown(s.n + 2).unwrap(), common::page(99, 1));
    assert_eq!(empty.num_pages().unwrap(), s.n, "not yet in the store");
    assert_eq!(view.grown_end(), s.n + 3);
    view.write(s.n + 2, &common::page(99, 2)).unwrap();
    assert_eq!(view.read_grown(s.n + 2).unwrap(), common::page(99, 2));
    view.persist_staged().unwrap();
    assert_eq!(empty.num_pages().unwrap(), s.n + 3);
    assert_eq!(empty.read_page(s.n + 2).unwrap(), common::page(99, 2));
    assert_eq!(view.read_grown(s.n + 2).unwrap(), common::page(99, 2));
    // A page of C read through `read_grown` is the verified page.
    assert_eq!(view.read_grown(0).unwrap(), common::page(0, 78));
}
