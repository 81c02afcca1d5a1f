//! The fetch server and client over real sockets: verified recovery over TCP
//! and unix sockets, truncated responses, and hostile input to the server.

mod common;

use common::{setup, truth};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use zz_statefetch::net::{ClientConfig, ServerConfig};
use zz_statefetch::proto::{self, FetchError, RefusalKind, Request, Response};
use zz_statefetch::{
    merkle, Endpoint, FetchClient, FetchServer, PageSource, RecoveryConfig, RecoveryEvent,
    RecoveryView,
};

async fn recover_over(endpoint: Endpoint) {
    let s = setup(300, 7, 4);
    let server = FetchServer::bind(s.honest.clone(), &endpoint, ServerConfig::default())
        .await
        .unwrap();
    let client = Arc::new(FetchClient::new(
        server.endpoint().clone(),
        ClientConfig::default(),
    ));

    let info = client.info().await.unwrap();
    assert_eq!(info.iter().map(|c| c.seq).collect::<Vec<_>>(), vec![1, 5]);

    // A page with its proof verifies against the root.
    let (seq, root) = (s.cert.seq, s.cert.root);
    let resp = client
        .request(&Request::Pages {
            seq,
            root,
            indices: vec![7, 8],
            proofs: true,
        })
        .await
        .unwrap();
    let reply = proto::check_pages(seq, root, Some(s.n), &[7, 8], resp).unwrap();
    proto::verify_with_proofs(&root, &reply).unwrap();
    assert_eq!(reply.pages[0].data, truth(&s, 7));

    // A range of leaves verifies against the root.
    let resp = client
        .request(&Request::Nodes {
            seq,
            root,
            level: 0,
            start: 10,
            count: 100,
        })
        .await
        .unwrap();
    let range = proto::check_nodes(seq, root, Some(s.n), (0, 10, 100), resp).unwrap();
    assert_eq!(range.nodes[0], merkle::leaf_hash(10, &truth(&s, 10)));

    let view = RecoveryView::open(
        s.local.clone(),
        s.cert,
        vec![client.clone() as Arc<dyn PageSource>],
        RecoveryConfig::default(),
    )
    .await
    .unwrap();
    assert_eq!(
        view.read(s.changed[3]).await.unwrap(),
        truth(&s, s.changed[3])
    );
    assert_eq!(view.finish().await.unwrap(), s.cert.root);
    assert!(server.stats().requests.load(Ordering::Relaxed) > 3);
    assert_eq!(server.stats().rejected.load(Ordering::Relaxed), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recovery_over_tcp() {
    recover_over(Endpoint::Tcp(([127, 0, 0, 1], 0).into())).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recovery_over_unix_socket() {
    let dir = tempfile::tempdir().unwrap();
    recover_over(Endpoint::Unix(dir.path().join("fetch.sock"))).await;
}

/// A server that reads one request, answers it honestly from `store`, but
/// sends only the first half of the response frame and hangs up.
async fn truncating_server(store: zz_statefetch::PageStore) -> Endpoint {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((mut sock, _)) = listener.accept().await else {
                return;
            };
            let store = store.clone();
            tokio::spawn(async move {
                let mut len = [0u8; 4];
                if sock.read_exact(&mut len).await.is_err() {
                    return;
                }
                let mut body = vec![0u8; u32::from_be_bytes(len) as usize];
                if sock.read_exact(&mut body).await.is_err() {
                    return;
                }
                let req: Request = zz_wire::codec::decode(&body).unwrap();
                let resp = proto::handle(&store, &proto::Limits::default(), req);
                let frame = zz_wire::frame::frame(&zz_wire::codec::encode(&resp));
                let _ = sock.write_all(&frame[..frame.len() / 2]).await;
                let _ = sock.shutdown().await;
            });
        }
    });
    Endpoint::Tcp(addr)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn truncated_response_is_an_error_and_another_source_is_asked() {
    let s = setup(120, 4, 0);
    let bad = truncating_server(s.honest.clone()).await;
    let bad_client = Arc::new(FetchClient::new(bad, ClientConfig::default()));
    let (seq, root) = (s.cert.seq, s.cert.root);
    let err = bad_client
        .request(&Request::Pages {
            seq,
            root,
            indices: vec![1],
            proofs: true,
        })
        .await
        .unwrap_err();
    assert!(matches!(err, FetchError::Truncated), "{err}");
    assert!(!err.is_fault());

    let good = FetchServer::bind(
        s.honest.clone(),
        &Endpoint::Tcp(([127, 0, 0, 1], 0).into()),
        ServerConfig::default(),
    )
    .await
    .unwrap();
    let good_client = Arc::new(FetchClient::new(
        good.endpoint().clone(),
        ClientConfig::default(),
    ));
    let sources: Vec<Arc<dyn PageSource>> = vec![bad_client, good_client];
    let view = RecoveryView::open(s.local.clone(), s.cert, sources, RecoveryConfig::default())
        .await
        .unwrap();
    for &i in &s.changed {
        assert_eq!(view.read(i).await.unwrap(), truth(&s, i));
    }
    view.wait_complete().await.unwrap();
    let truncations = view
        .take_events()
        .into_iter()
        .filter(|e| {
            matches!(
                e,
                RecoveryEvent::SourceFault {
                    error: FetchError::Truncated,
                    excluded: false,
                    ..
                }
            )
        })
        .count();
    assert!(truncations > 0);
    assert_eq!(view.finish().await.unwrap(), s.cert.root);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_refuses_unknown_or_mismatched_checkpoints() {
    let s = setup(20, 3, 0);
    let server = FetchServer::bind(
        s.honest.clone(),
        &Endpoint::Tcp(([127, 0, 0, 1], 0).into()),
        ServerConfig::default(),
    )
    .await
    .unwrap();
    let client = FetchClient::new(server.endpoint().clone(), ClientConfig::default());
    let root = s.cert.root;
    let resp = client
        .request(&Request::Pages {
            seq: 99,
            root,
            indices: vec![0],
            proofs: false,
        })
        .await
        .unwrap();
    let err = proto::check_pages(99, root, None, &[0], resp).unwrap_err();
    assert!(matches!(
        err,
        FetchError::Refused {
            kind: RefusalKind::UnknownCheckpoint,
            ..
        }
    ));
    assert!(!err.is_fault());
    let wrong = zz_wire::Digest::of(b"other");
    let resp = client
        .request(&Request::Nodes {
            seq: 5,
            root: wrong,
            level: 0,
            start: 0,
            count: 1,
        })
        .await
        .unwrap();
    let err = proto::check_nodes(5, wrong, None, (0, 0, 1), resp).unwrap_err();
    assert!(matches!(
        err,
        FetchError::Refused {
            kind: RefusalKind::RootMismatch,
            ..
        }
    ));
    assert!(err.is_fault());
    let resp = client
        .request(&Request::Pages {
            seq: 5,
            root,
            indices: vec![10_000],
            proofs: false,
        })
        .await
        .unwrap();
    assert!(matches!(
        resp,
        Response::Refused {
            kind: RefusalKind::OutOfRange,
            ..
        }
    ));
    let resp = client
        .request(&Request::Pages {
            seq: 5,
            root,
            indices: vec![0; 5000],
            proofs: false,
        })
        .await
        .unwrap();
    assert!(matches!(
        resp,
        Response::Refused {
            kind: RefusalKind::TooLarge,
            ..
        }
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_input_closes_the_connection_and_is_counted() {
    let s = setup(20, 3, 0);
    let server = FetchServer::bind(
        s.honest.clone(),
        &Endpoint::Tcp(([127, 0, 0, 1], 0).into()),
        ServerConfig::default(),
    )
    .await
    .unwrap();
    let Endpoint::Tcp(addr) = server.endpoint().clone() else {
        unreachable!()
    };

    async fn closed_after(addr: std::net::SocketAddr, bytes: &[u8]) -> bool {
        let mut sock = TcpStream::connect(addr).await.unwrap();
        sock.write_all(bytes).await.unwrap();
        let mut buf = [0u8; 16];
        matches!(
            tokio::time::timeout(Duration::from_secs(5), sock.read(&mut buf)).await,
            Ok(Ok(0)) | Ok(Err(_))
        )
    }
    // Garbage body in a well-formed frame.
    assert!(closed_after(addr, &zz_wire::frame::frame(&[0xff; 40])).await);
    // Length prefix far beyond the request limit: rejected before buffering.
    assert!(closed_after(addr, &u32::MAX.to_be_bytes()).await);
    // A request cut short, then the client hangs up: no answer, no crash.
    let mut sock = TcpStream::connect(addr).await.unwrap();
    sock.write_all(&[0, 0, 0, 50, 1, 2]).await.unwrap();
    drop(sock);

    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(server.stats().rejected.load(Ordering::Relaxed) >= 3);
    // The server still serves honest clients.
    let client = FetchClient::new(server.endpoint().clone(), ClientConfig::default());
    assert_eq!(client.info().await.unwrap().len(), 2);
}
