//! Process-level tests of hostile input: malformed, oversized and
//! unauthenticated frames sent to a live `zz-agreement` daemon are dropped
//! and counted in its metrics, and the daemon keeps serving clients.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use common::{Harness, APP};
use zz_wire::codec::encode;
use zz_wire::config::{read_key_file, ClientKeys};
use zz_wire::crypto::{KeyPair, MacKey};
use zz_wire::frame::frame;
use zz_wire::message::{ClientRequest, Commit, Frame, PeerEnvelope, PeerMessage, Request};
use zz_wire::Digest;

const TARGET: u32 = 0;

fn connect(h: &Harness) -> TcpStream {
    let addr = h.cluster.deployment().config.replicas[TARGET as usize].addr;
    let s = TcpStream::connect(addr).expect("connect to replica");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s
}

/// Replica `TARGET` is still running and still executes requests.
fn assert_still_serving(h: &mut Harness) {
    let before = h.metric(TARGET, "zz_requests_executed_total");
    h.run_ops(1, 3);
    h.wait_metric(
        TARGET,
        "zz_requests_executed_total",
        Duration::from_secs(10),
        |v| v >= before + 3.0,
    );
    assert!(h.cluster.is_running(TARGET), "the replica died");
}

fn commit_from(replica: u32) -> PeerMessage {
    PeerMessage::Commit(Commit {
        view: 0,
        seq: 1,
        digest: Digest::of(b"x"),
        replica,
    })
}

#[test]
fn malformed_frames_are_dropped_and_counted() {
    let mut h = Harness::start(1);
    let before = h.metric(TARGET, "zz_frames_malformed_total");
    let mut s = connect(&h);
    // An unknown frame kind.
    s.write_all(&frame(&[0xff, 0xff, 0xff, 0xff, 1, 2, 3]))
        .unwrap();
    // An empty frame.
    s.write_all(&frame(&[])).unwrap();
    // A client request cut short.
    let cfg = h.cluster.deployment().config.clone();
    let keys = h
        .cluster
        .deployment()
        .client_keys(cfg.clients[0].id)
        .unwrap();
    let req = ClientRequest::new(
        Request {
            client: keys.me,
            req_id: 1,
            app: APP,
            op: vec![1; 40],
            read_only: false,
        },
        &keys.replica_mac,
    );
    let body = encode(&Frame::Request(req));
    s.write_all(&frame(&body[..body.len() - 5])).unwrap();
    // A peer envelope with a valid MAC whose payload does not decode.
    let k1 = read_key_file(&cfg.resolve(&cfg.replicas[1].key_file)).unwrap();
    let mac_key = k1.shared_mac_key(&cfg.replica_public_keys()[TARGET as usize]);
    let mut env = PeerEnvelope::seal(1, TARGET, &commit_from(1), &mac_key);
    env.payload.truncate(3);
    let resealed = reseal(env, &mac_key);
    s.write_all(&frame(&encode(&Frame::Peer(resealed))))
        .unwrap();
    s.flush().unwrap();

    h.wait_metric(
        TARGET,
        "zz_frames_malformed_total",
        Duration::from_secs(10),
        |v| v >= before + 4.0,
    );
    assert_still_serving(&mut h);
}

/// Recomputes an envelope's MAC over its (possibly altered) payload.
fn reseal(env: PeerEnvelope, key: &MacKey) -> PeerEnvelope {
    let mut input = Vec::new();
    input.extend_from_slice(&env.from.to_le_bytes());
    input.extend_from_slice(&env.to.to_le_bytes());
    input.extend_from_slice(&env.payload);
    PeerEnvelope {
        mac: key.mac(&input),
        ..env
    }
}

#[test]
fn oversized_frame_closes_the_connection_and_is_counted() {
    let mut h = Harness::start(1);
    let before = h.metric(TARGET, "zz_frames_oversized_total");
    let mut s = connect(&h);
    // A 1 GiB length prefix: refused before any of it is buffered.
    s.write_all(&(1u32 << 30).to_be_bytes()).unwrap();
    s.write_all(&[0u8; 4096]).unwrap();
    let mut buf = [0u8; 16];
    match s.read(&mut buf) {
        Ok(0) | Err(_) => {}
        Ok(n) => panic!("the replica answered an oversized frame with {n} bytes"),
    }
    h.wait_metric(
        TARGET,
        "zz_frames_oversized_total",
        Duration::from_secs(10),
        |v| v >= before + 1.0,
    );
    assert_still_serving(&mut h);
}

#[test]
fn unauthenticated_frames_are_dropped_and_counted() {
    let mut h = Harness::start(1);
    let cfg = h.cluster.deployment().config.clone();
    let publics = cfg.replica_public_keys();
    let before = h.metric(TARGET, "zz_frames_unauthenticated_total");
    let accepted_before = h.metric(TARGET, "zz_requests_accepted_total");
    let mut s = connect(&h);
    let msg = commit_from(1);

    // A peer envelope with a wrong MAC.
    let bad_mac = PeerEnvelope::seal(1, TARGET, &msg, &MacKey([7; 32]));
    // A forged envelope: an outsider with its own key claims to be replica 1.
    let outsider = KeyPair::generate();
    let forged = PeerEnvelope::seal(
        1,
        TARGET,
        &msg,
        &outsider.shared_mac_key(&publics[TARGET as usize]),
    );
    // A sender that is not a replica, and an envelope for another replica.
    let unknown = PeerEnvelope::seal(9, TARGET, &msg, &MacKey([1; 32]));
    let k1 = read_key_file(&cfg.resolve(&cfg.replicas[1].key_file)).unwrap();
    let misaddressed = PeerEnvelope::seal(1, 2, &msg, &k1.shared_mac_key(&publics[2]));
    // A client request forged by an outsider in the name of a real client.
    let fake_keys = ClientKeys::derive(cfg.clients[0].id, &outsider, &publics);
    let forged_req = ClientRequest::new(
        Request {
            client: cfg.clients[0].id,
            req_id: u64::MAX - 1,
            app: APP,
            op: vec![],
            read_only: false,
        },
        &fake_keys.replica_mac,
    );
    for f in [
        Frame::Peer(bad_mac),
        Frame::Peer(forged),
        Frame::Peer(unknown),
        Frame::Peer(misaddressed),
        Frame::Request(forged_req),
    ] {
        s.write_all(&frame(&encode(&f))).unwrap();
    }
    s.flush().unwrap();

    h.wait_metric(
        TARGET,
        "zz_frames_unauthenticated_total",
        Duration::from_secs(10),
        |v| v >= before + 5.0,
    );
    assert_eq!(
        h.metric(TARGET, "zz_requests_accepted_total"),
        accepted_before,
        "the forged request was accepted"
    );
    // The forged request must not have hijacked the client's replies either.
    assert_still_serving(&mut h);
}
