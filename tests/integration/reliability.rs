//! Faults, hostile clients and load: clients killed at every point of the protocol, a server
//! killed and restarted, a backend failing mid-batch, a client that stops reading, sealed and
//! private segments, forged request ids, floods of connections, peer credentials, hostile HTTP
//! input, arbitrary bytes in a segment (a property test) and a soak with kills and a reload.
//! Every request is accounted for: answered once, or refused at submit.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::process::Child;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::common::Need;
use crate::common::{
    eventually, fixture, get, inference_request, post, rel_err, responses, root, send, spawn_child,
    TestServer, TEST_CONFIG,
};
use tie_client::layouts::abi::{RequestHeader, Status, INDEX_SPACING, REQUEST_HEADER_WORDS};
use tie_client::layouts::hello::{Hello, HelloStatus, HELLO_MAGIC};
use tie_client::{
    Backoff, Client, ConnectError, ConnectOptions, PredictError, Priority, SubmitError,
};

fn connect(server: &TestServer, model: &str) -> Client {
    Client::connect(&server.endpoint, model, server.options()).unwrap()
}

/// Sessions the server holds, as its listener lists them to an inspector (asked again if the
/// server is still serving earlier inspectors).
fn sessions(server: &TestServer) -> usize {
    let mut tries = 0;
    loop {
        match tie_client::inspect::inspect(
            &server.endpoint,
            Some(&server.dir),
            Duration::from_secs(5),
        ) {
            Ok(s) => return s.len(),
            Err(e) if tries < 50 => {
                tries += 1;
                let _ = e;
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) => panic!("inspect: {e}"),
        }
    }
}

/// Open file descriptors of the server process.
fn fds(server: &TestServer) -> usize {
    std::fs::read_dir(format!("/proc/{}/fd", server.pid()))
        .map(|d| d.count())
        .unwrap_or(0)
}

/// Mappings of session segments in the server process.
fn segment_maps(server: &TestServer) -> usize {
    std::fs::read_to_string(format!("/proc/{}/maps", server.pid()))
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains("tie-session"))
        .count()
}

/// Resident memory of a process in KiB.
fn rss_kib(pid: i32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// A well-formed request frame for `client`'s next slot, under any `request_id`.
fn raw_frame(client: &Client, request_id: u64, features: &[f32]) -> Vec<u64> {
    let header = RequestHeader {
        seq: client.next_seq(),
        request_id,
        priority: 1,
        feature_count: client.feature_count(),
        ..RequestHeader::default()
    };
    crate::common::raw_frame(client, header, features)
}

/// Waits for a child to print a line containing `mark` (libtest prints the test's name first,
/// on the same line).
fn wait_for_line(child: &mut Child, mark: &str) {
    let out = child.stdout.take().expect("piped stdout");
    let mut lines = BufReader::new(out).lines();
    let found = lines.any(|l| l.is_ok_and(|l| l.contains(mark)));
    assert!(found, "child ended before printing {mark:?}");
}

/// The points of the protocol at which `clients_killed_at_every_point…` kills a client.
const KILL_POINTS: [&str; 5] = ["hello", "connected", "mid-frame", "in-flight", "streaming"];

#[test]
fn clients_killed_at_every_point_of_the_protocol_leave_nothing_behind() {
    let kills: usize = crate::common::env_or("TIE_KILLS", 1000);
    const AT_ONCE: usize = 5;
    let server = TestServer::start();
    let f = fixture("identity_v1");
    let mut steady = connect(&server, "identity");
    let dir = server.dir.to_string_lossy().into_owned();
    let round = |point: &str| {
        let mut children: Vec<Child> = (0..AT_ONCE)
            .map(|_| {
                spawn_child(
                    "reliability::child",
                    point,
                    &[("TIE_SOCKET_DIR", dir.clone())],
                )
            })
            .collect();
        for c in &mut children {
            wait_for_line(c, &format!("at {point}"));
        }
        for mut c in children {
            c.kill().unwrap();
            c.wait().unwrap();
        }
    };
    // One round of each point first: whatever the server sets up once (a lane, a buffer) is
    // in place before counting.
    for point in KILL_POINTS {
        round(point);
    }
    // Each segment is one fd and one mapping of the server: the resources, timed. The session
    // list is asked of an inspector only once they are back, since the server's inspector
    // thread holds a read-only copy of each segment's fd while it sends them.
    let released = |s: &TestServer, n: usize| s.segment_fds() == n && segment_maps(s) == n;
    let settled = |s: &TestServer, n: usize| released(s, n) && sessions(s) == n;
    assert!(eventually(Duration::from_secs(5), || settled(&server, 1)));
    // The server's steady fd count: the least of a few readings (an inspector's thread holds
    // a socket and segment copies for a moment after it answered).
    let fds_before = (0..5)
        .map(|_| {
            std::thread::sleep(Duration::from_millis(20));
            fds(&server)
        })
        .min()
        .unwrap();
    let mut slowest = Duration::ZERO;
    let mut killed = 0;
    let mut i = 0;
    while killed < kills {
        let point = KILL_POINTS[i % KILL_POINTS.len()];
        i += 1;
        round(point);
        killed += AT_ONCE;
        // Reclaimed within a second: sessions, segment fds and mappings.
        let started = Instant::now();
        let reclaimed = eventually(Duration::from_secs(1), || released(&server, 1));
        slowest = slowest.max(started.elapsed());
        let reclaimed = reclaimed && eventually(Duration::from_secs(1), || sessions(&server) == 1);
        assert!(
            reclaimed,
            "after killing {AT_ONCE} clients at {point}: {} sessions, {} segment fds, {} maps; log:\n{}",
            sessions(&server),
            server.segment_fds(),
            segment_maps(&server),
            server.log()
        );
        // The other session is undisturbed.
        let row = &f.inputs[i % f.inputs.len()];
        let p = steady.predict(row).unwrap();
        assert_eq!(p.outputs(), &row[..]);
    }
    assert!(
        eventually(Duration::from_secs(2), || fds(&server) == fds_before),
        "{} fds before {killed} kills, {} after",
        fds_before,
        fds(&server)
    );
    assert!(!server.log().contains("panicked"), "{}", server.log());
    println!(
        "{killed} clients killed: fds {fds_before} before and after, {} session(s), slowest reclaim {slowest:?}",
        sessions(&server)
    );
}

#[test]
fn a_restarted_server_is_found_again_and_nothing_is_answered_twice() {
    #[derive(Default)]
    struct Counts {
        ok: AtomicU64,
        disconnected: AtomicU64,
        in_flight: AtomicU64,
        reconnects: AtomicU64,
    }
    let mut server = TestServer::start();
    let stop = Arc::new(AtomicBool::new(false));
    let counts: Vec<Arc<Counts>> = (0..3).map(|_| Arc::default()).collect();
    let options = ConnectOptions {
        reconnect: Some(Backoff {
            initial: Duration::from_millis(5),
            max: Duration::from_millis(200),
        }),
        timeout: Duration::from_secs(2),
        ..server.options()
    };
    let threads: Vec<_> = counts
        .iter()
        .enumerate()
        .map(|(t, counts)| {
            let (counts, stop, options) = (counts.clone(), stop.clone(), options.clone());
            std::thread::spawn(move || {
                let mut client = Client::connect("test", "identity", options).unwrap();
                // Requests in flight in order: id and features (the identity model answers
                // its features, so an answer to another request or session shows).
                let mut sent: std::collections::VecDeque<(u64, [f32; 4])> = Default::default();
                let (mut submitted, mut refused, mut answered) = (0u64, 0u64, 0u64);
                let mut last_id = 0;
                while !stop.load(Ordering::Relaxed) || !sent.is_empty() {
                    if !stop.load(Ordering::Relaxed) && sent.len() < 8 {
                        let n = submitted + refused;
                        let features = [t as f32, (n % 1000) as f32, (n / 1000) as f32, 0.5];
                        match client.submit(&features, Priority::Normal, None) {
                            Ok(id) => {
                                assert!(id > last_id, "request id {id} reused");
                                last_id = id;
                                submitted += 1;
                                sent.push_back((id, features));
                            }
                            Err(SubmitError::Disconnected | SubmitError::QueueFull { .. }) => {
                                refused += 1;
                                std::thread::sleep(Duration::from_millis(1));
                            }
                            Err(e) => panic!("{e}"),
                        }
                    }
                    counts.in_flight.store(sent.len() as u64, Ordering::Relaxed);
                    counts
                        .reconnects
                        .store(client.reconnects(), Ordering::Relaxed);
                    let Some(r) = client.poll() else {
                        std::thread::yield_now();
                        continue;
                    };
                    let (id, features) = sent.pop_front().expect("an answer to a request");
                    assert_eq!(r.request_id, id, "answers out of order or twice");
                    answered += 1;
                    match r.status {
                        Status::OK => {
                            assert_eq!(r.outputs(), &features[..], "another request's answer");
                            counts.ok.fetch_add(1, Ordering::Relaxed);
                        }
                        Status::DISCONNECTED => {
                            counts.disconnected.fetch_add(1, Ordering::Relaxed);
                        }
                        other => panic!("status {other:?}"),
                    }
                }
                assert_eq!(client.poll(), None, "an extra answer");
                (submitted, answered, refused)
            })
        })
        .collect();
    let all = |f: &dyn Fn(&Counts) -> bool| counts.iter().all(|c| f(c));
    assert!(eventually(Duration::from_secs(20), || all(&|c| c
        .ok
        .load(Ordering::Relaxed)
        >= 200)));
    server.signal(9);
    server.child.wait().unwrap();
    // Each client sees its requests in flight answered Disconnected, within its timeout.
    assert!(
        eventually(Duration::from_secs(2), || all(&|c| c
            .disconnected
            .load(Ordering::Relaxed)
            > 0
            && c.in_flight.load(Ordering::Relaxed) == 0)),
        "requests still pending after the server died"
    );
    let ok_before: Vec<u64> = counts
        .iter()
        .map(|c| c.ok.load(Ordering::Relaxed))
        .collect();
    std::thread::sleep(Duration::from_millis(300)); // clients back off meanwhile
    server.restart();
    let back = eventually(Duration::from_secs(20), || {
        counts.iter().zip(&ok_before).all(|(c, before)| {
            c.reconnects.load(Ordering::Relaxed) >= 1
                && c.ok.load(Ordering::Relaxed) >= before + 200
        })
    });
    stop.store(true, Ordering::Relaxed);
    let totals: Vec<(u64, u64, u64)> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    assert!(back, "clients did not reconnect; log:\n{}", server.log());
    for ((submitted, answered, _), c) in totals.iter().zip(&counts) {
        assert_eq!(submitted, answered);
        assert_eq!(
            *answered,
            c.ok.load(Ordering::Relaxed) + c.disconnected.load(Ordering::Relaxed)
        );
    }
    println!("per client (submitted, answered, refused at submit): {totals:?}");
}

/// `[server]` with fault injection on, and the test config's other sections.
fn config_with(server_extra: &str, rest: &str) -> String {
    TEST_CONFIG.replacen("[server]\n", &format!("[server]\n{server_extra}\n"), 1) + rest
}

#[test]
fn a_backend_failing_mid_batch_fails_that_batch_and_only_its_model() {
    let config = config_with(
        "fault_injection = true",
        "health_check_interval_sec = 3600\n[batch_processing]\nmax_batch_size = 64\nbatch_timeout_us = 0\n",
    )
    // `[model_deployment]` is already in the test config: the key goes there.
    .replacen(
        "health_check_interval_sec = 3600\n[batch_processing]",
        "[batch_processing]",
        1,
    )
    .replacen(
        "[model_deployment]\n",
        "[model_deployment]\nhealth_check_interval_sec = 3600\n",
        1,
    );
    let server = TestServer::start_with(&config, &root().join("models"));
    let base = server.http();
    let api = format!("{base}/api/v1/internal/inference");
    let f = fixture("identity_v1");
    let m = fixture("mlp64_v1");
    let mut failing = connect(&server, "identity");
    let mut other = connect(&server, "mlp64");
    failing.predict(&f.inputs[0]).unwrap();
    let fault = format!("{api}/models/identity:1/fault");
    assert_eq!(post(&fault, &serde_json::json!({"mode": "fail"})).0, 200);

    server.pause();
    let ids: Vec<u64> = (0..16)
        .map(|i| {
            failing
                .submit(&f.inputs[i % f.inputs.len()], Priority::Normal, None)
                .unwrap()
        })
        .collect();
    server.signal(18);
    let got = responses(&mut failing, ids.len());
    let statuses: Vec<Status> = got.iter().map(|r| r.status).collect();
    assert_eq!(got.iter().map(|r| r.request_id).collect::<Vec<_>>(), ids);
    let failed = crate::common::failed_then_not_ready(&statuses);
    let log = server.log();
    let rows_failed: usize = log
        .lines()
        .filter(|l| l.contains("batch failed") && l.contains("identity"))
        .filter_map(|l| {
            l.split("rows=")
                .nth(1)?
                .split_whitespace()
                .next()?
                .parse::<usize>()
                .ok()
        })
        .sum();
    assert_eq!(rows_failed, failed, "{log}");

    // The model is marked unhealthy at once; the other model serves on.
    let (code, body) = get(&format!("{base}/health/ready"));
    assert_eq!(code, 503, "{body}");
    // "a batch failed: …", or the recheck's "canary inference failed: …" once it ran.
    assert!(body.to_string().contains("injected fault"), "{body}");
    match failing.predict(&f.inputs[0]) {
        Err(PredictError::Server(e)) => assert_eq!(e.status, Status::NOT_READY),
        other => panic!("{other:?}"),
    }
    for (row, expected) in m.inputs.iter().zip(&m.outputs) {
        let p = other.predict(row).unwrap();
        assert!(rel_err(p.outputs()[0], expected[0]) <= 1e-5);
    }

    // Cleared: the recheck (every second, though the interval is an hour) makes it ready.
    assert_eq!(post(&fault, &serde_json::json!({"mode": "none"})).0, 200);
    assert!(eventually(Duration::from_secs(10), || get(&format!(
        "{base}/health/ready"
    ))
    .0 == 200));
    let p = failing.predict(&f.inputs[1]).unwrap();
    assert_eq!(p.outputs(), &f.inputs[1][..]);
}

#[test]
fn a_client_that_stops_reading_holds_up_no_one_and_gets_no_more_than_its_credits() {
    let server = TestServer::start();
    let f = fixture("identity_v1");
    let m = fixture("mlp64_v1");
    let mut stalled = Client::connect(
        "test",
        "identity",
        ConnectOptions {
            request_capacity: 64,
            response_capacity: 8,
            ..server.options()
        },
    )
    .unwrap();
    let ids: Vec<u64> = (0..8)
        .map(|i| {
            stalled
                .submit(&f.inputs[i % 8], Priority::Normal, None)
                .unwrap()
        })
        .collect();
    assert!(matches!(
        stalled.submit(&f.inputs[0], Priority::Normal, None),
        Err(SubmitError::QueueFull { in_flight: 8 })
    ));
    // A client that ignores its credits: 16 more frames written straight into the next
    // slots, stamp (the sequence number, first word) last.
    let segment = stalled.segment().clone();
    let geometry = *segment.geometry();
    let slot_words = geometry.request_slot_size / 8;
    let slots = (geometry.request_offset + tie_client::layouts::abi::RING_INDEX_SIZE) / 8;
    for k in 0..16u64 {
        let seq = 8 + k;
        let words = raw_frame(&stalled, 1000 + k, &f.inputs[0]);
        let at = slots + (seq as usize % 64) * slot_words;
        for (j, w) in words.iter().enumerate().skip(1) {
            segment.words()[at + j].store(*w, Ordering::Relaxed);
        }
        segment.words()[at].store(seq, Ordering::Release);
    }
    let head =
        || segment.words()[geometry.request_offset / 8 + INDEX_SPACING / 8].load(Ordering::Acquire);
    // The server answers the 8 it may and reads nothing more, while it serves another session.
    // Generous limits: the tests run beside others that build (the Python wheel) and load
    // the machine; a limit is a bound on failure, not a timing.
    assert!(eventually(Duration::from_secs(30), || head() == 8));
    let mut busy = connect(&server, "mlp64");
    for _ in 0..20 {
        for (row, expected) in m.inputs.iter().zip(&m.outputs) {
            let p = busy.predict(row).unwrap();
            assert!(rel_err(p.outputs()[0], expected[0]) <= 1e-5);
        }
    }
    assert_eq!(head(), 8, "the server read past the client's credits");
    // Once the client reads its answers, the server takes as many frames as it has room for.
    let got = responses(&mut stalled, 8);
    assert_eq!(got.iter().map(|r| r.request_id).collect::<Vec<_>>(), ids);
    assert!(got.iter().all(|r| r.status == Status::OK));
    assert!(
        eventually(Duration::from_secs(30), || head() == 16),
        "head {} (16 expected: 8 answered and read, 8 more credits)\n{}",
        head(),
        server.log()
    );
    assert!(!server.log().contains("faulted"), "{}", server.log());
}

#[test]
fn segments_are_sealed_and_private_and_the_socket_is_owner_only() {
    use rustix::fs::{fcntl_add_seals, fcntl_get_seals, fstat, ftruncate, SealFlags};
    let server = TestServer::start();
    let mut client = connect(&server, "identity");
    let segment = client.segment().clone();
    let fd = segment.fd();
    let size = segment.geometry().segment_size as u64;
    // Neither shrunk, nor grown, nor unsealed.
    assert_eq!(ftruncate(&fd, size / 2), Err(rustix::io::Errno::PERM));
    assert_eq!(ftruncate(&fd, size * 2), Err(rustix::io::Errno::PERM));
    assert_eq!(ftruncate(&fd, 0), Err(rustix::io::Errno::PERM));
    assert_eq!(
        rustix::fs::fallocate(&fd, rustix::fs::FallocateFlags::empty(), size, 4096),
        Err(rustix::io::Errno::PERM)
    );
    assert_eq!(
        fcntl_add_seals(&fd, SealFlags::WRITE),
        Err(rustix::io::Errno::PERM)
    );
    let seals = fcntl_get_seals(&fd).unwrap();
    assert!(seals.contains(SealFlags::SHRINK | SealFlags::GROW | SealFlags::SEAL));
    let stat = fstat(&fd).unwrap();
    assert_eq!(stat.st_mode & 0o777, 0o600);
    assert_eq!(stat.st_size as u64, size);
    let f = fixture("identity_v1");
    assert_eq!(
        client.predict(&f.inputs[0]).unwrap().outputs(),
        &f.inputs[0][..]
    );
    // The socket: the server's user only (no group configured).
    let mode = std::fs::metadata(server.dir.join("test.sock")).unwrap();
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&mode.permissions()) & 0o777,
        0o600
    );
    // A client refuses a segment that is not sealed.
    let memfd = rustix::fs::memfd_create("unsealed", rustix::fs::MemfdFlags::CLOEXEC).unwrap();
    ftruncate(&memfd, 1 << 16).unwrap();
    let err = tie_client::segment::Segment::open(memfd, 1 << 16).unwrap_err();
    assert!(err.to_string().contains("sealed"), "{err}");
}

#[test]
fn forged_and_duplicate_request_ids_reach_only_the_forger() {
    let server = TestServer::start();
    let mut honest = connect(&server, "identity");
    let mut forger = connect(&server, "identity");
    server.pause();
    let ids: Vec<u64> = (0..8)
        .map(|i| {
            honest
                .submit(&[1.0, i as f32, 0.0, 0.0], Priority::Normal, None)
                .unwrap()
        })
        .collect();
    // The forger sends frames under the honest session's ids, one of them twice.
    let forged: Vec<u64> = ids.iter().copied().chain([ids[0]]).collect();
    for (k, id) in forged.iter().enumerate() {
        let words = raw_frame(&forger, *id, &[2.0, k as f32, 0.0, 0.0]);
        forger.submit_raw(&words, *id).unwrap();
    }
    server.signal(18);
    for (i, r) in responses(&mut honest, ids.len()).iter().enumerate() {
        assert_eq!((r.request_id, r.status), (ids[i], Status::OK));
        assert_eq!(r.outputs(), &[1.0, i as f32, 0.0, 0.0]);
    }
    for (k, r) in responses(&mut forger, forged.len()).iter().enumerate() {
        assert_eq!((r.request_id, r.status), (forged[k], Status::OK));
        assert_eq!(r.outputs(), &[2.0, k as f32, 0.0, 0.0]);
    }
}

#[test]
fn a_flood_of_connections_and_hellos_is_contained() {
    let config = config_with("max_sessions = 6", "");
    let server = TestServer::start_with(&config, &root().join("models"));
    let socket = server.dir.join("test.sock");
    let stop = Arc::new(AtomicBool::new(false));
    let served = Arc::new(AtomicU64::new(0));
    let streamer = {
        let (stop, served) = (stop.clone(), served.clone());
        let mut client = connect(&server, "identity");
        std::thread::spawn(move || {
            let mut n = 0u32;
            while !stop.load(Ordering::Relaxed) {
                let row = [n as f32, 1.0, 2.0, 3.0];
                let p = client.predict(&row).unwrap();
                assert_eq!(p.outputs(), &row[..]);
                served.fetch_add(1, Ordering::Relaxed);
                n += 1;
            }
        })
    };
    // Connections that never send a hello, far more than the handshakes the server keeps.
    let silent: Vec<UnixStream> = (0..300)
        .map(|_| UnixStream::connect(&socket).unwrap())
        .collect();
    // Garbage hellos: refused as bad requests.
    for _ in 0..100 {
        let mut s = UnixStream::connect(&socket).unwrap();
        s.write_all(&[0x5A; 256]).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut reply = [0u8; 256];
        s.read_exact(&mut reply).unwrap();
        let reply: tie_client::layouts::HelloReply = bytemuck::pod_read_unaligned(&reply);
        assert_eq!(reply.status, HelloStatus::BadRequest.code());
    }
    // Well-formed hellos for a model that is not served, and sessions up to the limit.
    for _ in 0..100 {
        match Client::connect("test", "no-such-model", server.options()) {
            Err(ConnectError::Refused { status, .. }) => {
                assert_eq!(status, HelloStatus::ModelNotFound)
            }
            other => panic!("{other:?}"),
        }
    }
    let extra: Vec<Client> = (0..5).map(|_| connect(&server, "identity")).collect();
    match Client::connect("test", "identity", server.options()) {
        Err(ConnectError::Refused { status, message }) => {
            assert_eq!(status, HelloStatus::TooManySessions, "{message}")
        }
        other => panic!("{other:?}"),
    }
    drop(extra);
    // With the silent connections still open, and more arriving all the time, a client that
    // says hello at once gets in.
    let served_before = served.load(Ordering::Relaxed);
    let flooding = Arc::new(AtomicBool::new(true));
    let flooder = {
        let (flooding, socket) = (flooding.clone(), socket.clone());
        std::thread::spawn(move || {
            let mut held = std::collections::VecDeque::new();
            let mut opened = 0u64;
            while flooding.load(Ordering::Relaxed) {
                if let Ok(s) = UnixStream::connect(&socket) {
                    held.push_back(s);
                    opened += 1;
                }
                if held.len() > 500 {
                    held.pop_front();
                }
            }
            opened
        })
    };
    std::thread::sleep(Duration::from_millis(100));
    for _ in 0..5 {
        let started = Instant::now();
        let joined = Client::connect("test", "identity", server.options());
        assert!(
            joined.is_ok(),
            "refused during a flood after {:?}: {:?}",
            started.elapsed(),
            joined.err()
        );
    }
    flooding.store(false, Ordering::Relaxed);
    let opened = flooder.join().unwrap();
    assert!(opened > 100, "the flood opened only {opened} connections");
    assert!(eventually(Duration::from_secs(5), || served
        .load(Ordering::Relaxed)
        > served_before));
    drop(silent);
    stop.store(true, Ordering::Relaxed);
    streamer.join().unwrap();
    let log = server.log();
    assert!(
        log.contains("connections closed without a complete hello"),
        "{log}"
    );
    assert!(!log.contains("panicked"), "{log}");
}

#[test]
fn peer_credentials_decide_who_may_connect() {
    use std::os::unix::fs::PermissionsExt;
    if !rustix::process::geteuid().is_root() {
        crate::common::skip(Need::Root, "running a client as another user needs root");
        return;
    }
    const GROUP: u32 = 4242;
    const NOBODY: u32 = 65534;
    let config = config_with(&format!("allowed_gid = {GROUP}"), "");
    let server = TestServer::start_with(&config, &root().join("models"));
    let socket = server.dir.join("test.sock");
    let meta = std::fs::metadata(&socket).unwrap();
    assert_eq!(meta.permissions().mode() & 0o777, 0o660);
    assert_eq!(std::os::unix::fs::MetadataExt::gid(&meta), GROUP);
    let peer = |gid: u32| {
        let mut cmd = std::process::Command::new(std::env::current_exe().unwrap());
        cmd.args([
            "--exact",
            "reliability::child",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("TIE_CHILD_ROLE", "peer")
        .env("TIE_SOCKET_DIR", &server.dir);
        std::os::unix::process::CommandExt::uid(&mut cmd, NOBODY);
        std::os::unix::process::CommandExt::gid(&mut cmd, gid);
        let out = cmd.output().ok()?;
        Some(String::from_utf8_lossy(&out.stdout).into_owned())
    };
    // The test binary must be runnable by that user (a checkout under a private home is not).
    let Some(member) = peer(GROUP).filter(|out| out.contains("peer ")) else {
        crate::common::skip(
            Need::Root,
            &format!("the test binary cannot be run as uid {NOBODY}"),
        );
        return;
    };
    let peer = |gid: u32| peer(gid).expect("ran once");
    assert!(member.contains("peer predicted"), "{member}");
    // Not in the group: the socket's mode keeps it out.
    let outsider = peer(NOBODY);
    assert!(
        outsider.contains("peer refused: permission denied") && outsider.contains("os error 13"),
        "{outsider}"
    );
    // With the socket opened to everyone, the server's own check refuses it, and logs it.
    std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o666)).unwrap();
    let outsider = peer(NOBODY);
    assert!(
        outsider.contains("peer refused: permission denied")
            && outsider.contains("this user may not connect to the server"),
        "{outsider}"
    );
    let log = server.log();
    assert!(
        log.lines().any(
            |l| l.contains("connection refused: credentials not allowed")
                && l.contains(&format!("uid={NOBODY}"))
        ),
        "{log}"
    );
}

#[test]
fn hostile_http_input_gets_clear_4xx_and_memory_stays_bounded() {
    let server = TestServer::start();
    let base = server.http();
    let predict = format!("{base}/api/v1/internal/inference/predict");
    let batch = format!("{base}/api/v1/internal/inference/batch-predict");
    let kind = |(code, body): (u16, String)| {
        let v: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
        (code, v["error"]["kind"].as_str().unwrap_or("").to_string())
    };
    let mut one = inference_request(
        "hostile",
        "identity",
        None,
        &[vec![1.0, 2.0, 3.0, 4.0]],
        serde_json::Value::Null,
    );
    let cases: Vec<(serde_json::Value, u16, &str)> = vec![
        // Wrong types.
        (
            {
                one["input_features"] = serde_json::json!(["1", "2", "3", "4"]);
                one.clone()
            },
            400,
            "InvalidRequest",
        ),
        (
            {
                one["input_features"] = serde_json::json!([1.0, 2.0, 3.0, 4.0]);
                one["batch_size"] = serde_json::json!({"n": 1});
                one.clone()
            },
            400,
            "InvalidRequest",
        ),
        // A number beyond f32: infinite once read.
        (
            {
                one["batch_size"] = serde_json::json!(1);
                one["input_features"] = serde_json::json!([1e39, 2.0, 3.0, 4.0]);
                one.clone()
            },
            400,
            "Rejected",
        ),
        // A huge batch_size with few features.
        (
            {
                one["input_features"] = serde_json::json!([1.0, 2.0, 3.0, 4.0]);
                one["batch_size"] = serde_json::json!(u64::MAX);
                one.clone()
            },
            400,
            "InvalidRequest",
        ),
    ];
    for (body, code, expected) in cases {
        let got = kind(send("POST", &predict, Some(body.to_string().as_bytes())));
        assert_eq!(got, (code, expected.to_string()), "{body}");
    }
    // Nesting far deeper than any request: refused by the parser, not a stack overflow.
    let deep = "[".repeat(100_000);
    assert_eq!(kind(send("POST", &predict, Some(deep.as_bytes()))).0, 400);
    // More batch items than allowed.
    let item = inference_request(
        "item",
        "identity",
        None,
        &[vec![1.0, 2.0, 3.0, 4.0]],
        serde_json::Value::Null,
    );
    let many = serde_json::json!(vec![item; 1025]);
    let got = kind(send("POST", &batch, Some(many.to_string().as_bytes())));
    assert_eq!(got.0, 400, "{got:?}");

    // Oversized bodies, announced or streamed (chunked, no length), again and again: each is
    // refused with 413 and the server's memory stays bounded.
    let rss_before = rss_kib(server.pid());
    let addr = base.trim_start_matches("http://").to_string();
    let chunk = vec![b'1'; 1 << 20];
    for i in 0..20 {
        let mut s = std::net::TcpStream::connect(&addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let head = if i % 2 == 0 {
            "Transfer-Encoding: chunked\r\n".to_string()
        } else {
            format!("Content-Length: {}\r\n", 64 << 20)
        };
        write!(
            s,
            "POST /api/v1/internal/inference/predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n{head}\r\n"
        )
        .unwrap();
        // Write until the server answers and closes (it need not read it all).
        for _ in 0..16 {
            let sent = if i % 2 == 0 {
                write!(s, "{:x}\r\n", chunk.len())
                    .and_then(|()| s.write_all(&chunk))
                    .and_then(|()| s.write_all(b"\r\n"))
            } else {
                s.write_all(&chunk)
            };
            if sent.is_err() {
                break;
            }
        }
        let mut answer = String::new();
        let _ = s.read_to_string(&mut answer);
        assert!(
            answer.starts_with("HTTP/1.1 413"),
            "{}",
            &answer[..answer.len().min(200)]
        );
    }
    let rss_after = rss_kib(server.pid());
    println!("server RSS {rss_before} KiB before 20 oversized bodies, {rss_after} KiB after");
    assert!(
        rss_after < rss_before + 256 * 1024,
        "RSS grew from {rss_before} to {rss_after} KiB"
    );
    // Still serving.
    let (code, body) = post(
        &predict,
        &inference_request(
            "after",
            "identity",
            None,
            &[vec![1.0; 4]],
            serde_json::Value::Null,
        ),
    );
    assert_eq!(code, 200, "{body}");
}

mod arbitrary_bytes {
    //! Whatever a client writes into its segment, the server answers with valid responses or
    //! error statuses, or faults that session alone; it never panics and never answers
    //! another session.
    use super::*;
    use proptest::prelude::*;

    #[derive(Clone, Debug)]
    enum Write {
        /// A word anywhere in the segment (header, indices, slots).
        Word { at: usize, value: u64 },
        /// A frame through the client's ring with an arbitrary header and features.
        Frame {
            seq_delta: i8,
            model_slot: u32,
            priority: u32,
            feature_count: u32,
            features: Vec<u32>,
            request_id: u64,
        },
    }

    fn write() -> impl Strategy<Value = Write> {
        let value = prop_oneof![
            any::<u64>(),
            Just(0u64),
            Just(u64::MAX),
            (0u64..256),
            (0u64..64).prop_map(|v| 1u64 << v),
        ];
        prop_oneof![
            (any::<usize>(), value).prop_map(|(at, value)| Write::Word { at, value }),
            (
                -2i8..3,
                prop_oneof![Just(0u32), any::<u32>()],
                prop_oneof![0u32..4, any::<u32>()],
                prop_oneof![Just(4u32), any::<u32>()],
                proptest::collection::vec(any::<u32>(), 4),
                any::<u64>(),
            )
                .prop_map(
                    |(seq_delta, model_slot, priority, feature_count, features, request_id)| {
                        Write::Frame {
                            seq_delta,
                            model_slot,
                            priority,
                            feature_count,
                            features,
                            request_id,
                        }
                    }
                ),
        ]
    }

    #[test]
    fn any_bytes_in_a_segment_disturb_no_one_else() {
        let mut server = TestServer::start();
        let honest = std::cell::RefCell::new(connect(&server, "identity"));
        let case = std::cell::Cell::new(0u32);
        let config = ProptestConfig {
            cases: 64,
            failure_persistence: None,
            ..ProptestConfig::default()
        };
        proptest!(config, |(writes in proptest::collection::vec(write(), 1..24))| {
            case.set(case.get() + 1);
            let mut hostile = connect(&server, "identity");
            let segment = hostile.segment().clone();
            let words = segment.words();
            for w in &writes {
                match w {
                    Write::Word { at, value } => {
                        words[at % words.len()].store(*value, Ordering::Release);
                    }
                    Write::Frame { seq_delta, model_slot, priority, feature_count, features, request_id } => {
                        let floats: Vec<f32> = features.iter().map(|b| f32::from_bits(*b)).collect();
                        let mut frame = raw_frame(&hostile, *request_id, &floats);
                        let mut header: RequestHeader = bytemuck::pod_read_unaligned(
                            bytemuck::cast_slice(&frame[..REQUEST_HEADER_WORDS]),
                        );
                        header.seq = hostile.next_seq().wrapping_add_signed(i64::from(*seq_delta));
                        header.model_slot = *model_slot;
                        header.priority = *priority;
                        header.feature_count = *feature_count;
                        frame[..REQUEST_HEADER_WORDS]
                            .copy_from_slice(bytemuck::cast_slice(bytemuck::bytes_of(&header)));
                        let _ = hostile.submit_raw(&frame, *request_id);
                    }
                }
            }
            // Whatever comes back on the hostile session is a response frame with a known
            // status (or the session ends).
            let started = Instant::now();
            while hostile.in_flight() > 0 && started.elapsed() < Duration::from_secs(5) {
                match hostile.poll() {
                    Some(r) => prop_assert!(r.status.name().is_some(), "status {:?}", r.status),
                    None => std::thread::yield_now(),
                }
            }
            drop(hostile);
            // The honest session gets its own answer, and nothing else.
            let row = [case.get() as f32, -1.0, 0.25, 8.0];
            let mut honest = honest.borrow_mut();
            let p = honest.predict(&row);
            prop_assert!(p.is_ok(), "{p:?}\n{}", server.log());
            let p = p.unwrap();
            prop_assert_eq!(p.outputs(), &row[..]);
            prop_assert_eq!(honest.poll(), None);
        });
        let log = server.log();
        assert!(!log.contains("panicked"), "{log}");
        assert!(matches!(server.child.try_wait(), Ok(None)), "{log}");
    }
}

/// Child processes, run by the tests above through `spawn_child`.
#[test]
#[ignore = "run as a child process by other tests"]
fn child() {
    let Ok(role) = std::env::var("TIE_CHILD_ROLE") else {
        return;
    };
    let dir: std::path::PathBuf = std::env::var_os("TIE_SOCKET_DIR").unwrap().into();
    let options = ConnectOptions {
        socket_dir: Some(dir.clone()),
        timeout: Duration::from_secs(10),
        wait: tie_client::WaitStrategy::SpinThenYield {
            spin: Duration::from_micros(20),
        },
        ..ConnectOptions::default()
    };
    let wait_for_kill = || std::thread::sleep(Duration::from_secs(60));
    match role.as_str() {
        "hello" => {
            // Half a hello.
            let mut hello: Hello = bytemuck::Zeroable::zeroed();
            hello.magic = HELLO_MAGIC;
            let mut s = UnixStream::connect(dir.join("test.sock")).unwrap();
            s.write_all(&bytemuck::bytes_of(&hello)[..40]).unwrap();
            println!("at hello");
            wait_for_kill();
        }
        "connected" => {
            let _client = Client::connect("test", "identity", options).unwrap();
            println!("at connected");
            wait_for_kill();
        }
        "mid-frame" => {
            // A frame written but for its stamp (the first word, written last).
            let client = Client::connect("test", "identity", options).unwrap();
            let frame = raw_frame(&client, 1, &[1.0, 2.0, 3.0, 4.0]);
            let geometry = *client.segment().geometry();
            let slot0 = (geometry.request_offset + tie_client::layouts::abi::RING_INDEX_SIZE) / 8;
            for (k, w) in frame.iter().enumerate().skip(1) {
                client.segment().words()[slot0 + k].store(*w, Ordering::Relaxed);
            }
            println!("at mid-frame");
            wait_for_kill();
        }
        "in-flight" => {
            let mut client = Client::connect("test", "identity", options).unwrap();
            for i in 0..16 {
                client
                    .submit(&[i as f32, 0.0, 0.0, 0.0], Priority::Normal, None)
                    .unwrap();
            }
            println!("at in-flight");
            wait_for_kill();
        }
        "streaming" => {
            let mut client = Client::connect("test", "identity", options).unwrap();
            client.predict(&[1.0, 2.0, 3.0, 4.0]).unwrap();
            println!("at streaming");
            let started = Instant::now();
            while started.elapsed() < Duration::from_secs(60) {
                let _ = client.submit(&[1.0, 2.0, 3.0, 4.0], Priority::Normal, None);
                while client.poll().is_some() {}
            }
        }
        "peer" => match Client::connect("test", "identity", options) {
            Ok(mut client) => {
                let p = client.predict(&[1.0, 2.0, 3.0, 4.0]).unwrap();
                assert_eq!(p.outputs(), &[1.0, 2.0, 3.0, 4.0]);
                println!("peer predicted");
            }
            Err(e @ ConnectError::PermissionDenied { .. }) => {
                let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
                let ids: Vec<&str> = status
                    .lines()
                    .filter(|l| {
                        l.starts_with("Uid") || l.starts_with("Gid") || l.starts_with("Groups")
                    })
                    .collect();
                println!("peer refused: permission denied ({e}; {ids:?})")
            }
            Err(ConnectError::Refused { status, message }) => {
                println!("peer refused: {status:?} {message}")
            }
            Err(e) => println!("peer failed: {e}"),
        },
        "soak" => soak_client(options),
        other => panic!("unknown role {other}"),
    }
}

/// A soak client: submits as fast as its window allows until `TIE_SOAK_UNTIL` (a file) exists,
/// checks every answer (the identity model answers its features), then prints its account.
fn soak_client(options: ConnectOptions) {
    let index: f32 = std::env::var("TIE_CHILD_INDEX").unwrap().parse().unwrap();
    let until: std::path::PathBuf = std::env::var_os("TIE_SOAK_UNTIL").unwrap().into();
    let mut client = Client::connect("test", "identity", options).unwrap();
    println!("at soak session {}", client.session_id());
    let mut sent: std::collections::VecDeque<(u64, [f32; 4])> = Default::default();
    let (mut submitted, mut refused, mut ok, mut other) = (0u64, 0u64, 0u64, 0u64);
    let mut versions = std::collections::BTreeSet::new();
    let mut stopping = false;
    let mut n = 0u64;
    loop {
        if !stopping && n.is_multiple_of(1024) && until.exists() {
            stopping = true;
        }
        if stopping && sent.is_empty() {
            break;
        }
        if !stopping && sent.len() < 16 {
            n += 1;
            let features = [index, (n % 4096) as f32, (n / 4096) as f32, 1.0];
            match client.submit(&features, Priority::Normal, None) {
                Ok(id) => {
                    submitted += 1;
                    sent.push_back((id, features));
                }
                Err(_) => refused += 1,
            }
        }
        if let Some(r) = client.poll() {
            let (id, features) = sent.pop_front().expect("an answer to a request in flight");
            assert_eq!(r.request_id, id, "out of order or answered twice");
            if r.status == Status::OK {
                assert_eq!(r.outputs(), &features[..], "another request's answer");
                versions.insert(r.model_version);
                ok += 1;
            } else {
                other += 1;
            }
        }
    }
    assert_eq!(client.poll(), None, "an extra answer");
    println!(
        "soak account: submitted={submitted} answered={} ok={ok} other={other} refused_at_submit={refused} versions={versions:?}",
        ok + other
    );
}

#[test]
fn soak_with_kills_and_a_reload_conserves_every_request() {
    let secs: u64 = crate::common::env_or("TIE_SOAK_SECS", 4);
    let clients: usize = crate::common::env_or("TIE_SOAK_CLIENTS", 4);
    let repo = crate::common::scratch_dir("soak-repo");
    crate::common::add_version(&repo, "identity", 1, "identity", 1);
    let server = TestServer::start_with(TEST_CONFIG, &repo);
    let base = server.http();
    let until = server.dir.join("soak-stop");
    let dir = server.dir.to_string_lossy().into_owned();
    let spawn = |i: usize| {
        let mut c = spawn_child(
            "reliability::child",
            "soak",
            &[
                ("TIE_SOCKET_DIR", dir.clone()),
                ("TIE_CHILD_INDEX", i.to_string()),
                ("TIE_SOAK_UNTIL", until.to_string_lossy().into_owned()),
            ],
        );
        let out = c.stdout.take().unwrap();
        let mut lines = BufReader::new(out).lines();
        assert!(lines.any(|l| l.is_ok_and(|l| l.contains("at soak session"))));
        (c, lines)
    };
    let mut live: Vec<_> = (0..clients).map(spawn).collect();
    let mut next_index = clients;
    let mut rng = 0x9E37_79B9_7F4A_7C15u64;
    let mut random = move |n: usize| {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        (rng % n as u64) as usize
    };
    let started = Instant::now();
    let mut rss = vec![(0.0f64, rss_kib(server.pid()))];
    let (mut killed, mut reloaded) = (0, false);
    let mut next_sample = Duration::from_millis(250);
    while started.elapsed() < Duration::from_secs(secs) {
        std::thread::sleep(Duration::from_millis(50 + random(200) as u64));
        // A random client killed and replaced.
        let victim = random(live.len());
        let (mut c, _) = live.swap_remove(victim);
        c.kill().unwrap();
        c.wait().unwrap();
        killed += 1;
        live.push(spawn(next_index));
        next_index += 1;
        // Halfway: a new version, loaded under load; sessions move to it.
        if !reloaded && started.elapsed() >= Duration::from_secs(secs) / 2 {
            crate::common::add_version(&repo, "identity", 1, "identity", 2);
            let (code, body) = crate::common::post_empty(
                &format!("{base}/api/v1/internal/inference/models/reload"),
                None,
            );
            assert_eq!(code, 200, "{body}");
            reloaded = true;
        }
        if started.elapsed() >= next_sample {
            rss.push((started.elapsed().as_secs_f64(), rss_kib(server.pid())));
            next_sample += Duration::from_millis(250);
        }
    }
    std::fs::write(&until, b"").unwrap();
    let mut total = (0u64, 0u64, 0u64);
    for (c, mut lines) in live {
        let account = lines
            .find_map(|l| l.ok().filter(|l| l.contains("soak account")))
            .expect("a soak client's account");
        let out = c.wait_with_output().unwrap();
        assert!(out.status.success(), "{account}");
        let field = |name: &str| -> u64 {
            account
                .split_whitespace()
                .find_map(|w| w.strip_prefix(&format!("{name}=")))
                .unwrap()
                .parse()
                .unwrap()
        };
        assert_eq!(field("submitted"), field("answered"), "{account}");
        total.0 += field("submitted");
        total.1 += field("answered");
        total.2 += field("refused_at_submit");
    }
    rss.push((started.elapsed().as_secs_f64(), rss_kib(server.pid())));
    assert!(reloaded && killed > 0);
    assert!(
        eventually(Duration::from_secs(2), || sessions(&server) == 0
            && server.segment_fds() == 0),
        "sessions left after every client ended: {}",
        sessions(&server)
    );
    let log = server.log();
    assert!(
        !log.contains("panicked") && !log.contains("faulted"),
        "{log}"
    );
    // At most about 20 readings printed, the last included.
    let step = rss.len().div_ceil(20).max(1);
    let series: Vec<String> = rss
        .iter()
        .enumerate()
        .filter(|(i, _)| i % step == 0 || *i == rss.len() - 1)
        .map(|(_, (t, kib))| format!("{t:.1}s {:.1} MiB", *kib as f64 / 1024.0))
        .collect();
    println!(
        "soak {secs} s, {clients} clients, {killed} killed, reload at half time: finishing clients submitted {} = answered {}, refused at submit {}; server RSS {}",
        total.0,
        total.1,
        total.2,
        series.join(", ")
    );
    // Memory stable: the last reading within 64 MiB of the first taken under load.
    let first = rss.get(1).map_or(rss[0].1, |r| r.1);
    let last = rss.last().unwrap().1;
    assert!(
        last < first + 64 * 1024,
        "RSS grew from {first} to {last} KiB: {series:?}"
    );
}

#[test]
fn sessions_left_idle_are_served_when_they_send_again_and_reclaimed_when_they_go() {
    let server = TestServer::start();
    let f = fixture("mlp64_v1");
    let mut clients: Vec<Client> = (0..40).map(|_| connect(&server, "mlp64")).collect();
    for c in &mut clients {
        c.predict(&f.inputs[0]).unwrap();
    }
    let maps = segment_maps(&server);
    for round in 0..3 {
        // Quiet for longer than a session takes to go cold (1 ms, checked every 1024 poller
        // rounds): then each sends again, one at a time, then all at once.
        std::thread::sleep(Duration::from_millis(100));
        for (i, c) in clients.iter_mut().enumerate() {
            let row = (i + round) % f.inputs.len();
            let p = c.predict(&f.inputs[row]).unwrap();
            assert!(rel_err(p.outputs()[0], f.outputs[row][0]) <= 1e-5);
        }
        std::thread::sleep(Duration::from_millis(100));
        let ids: Vec<u64> = clients
            .iter_mut()
            .map(|c| c.submit(&f.inputs[round], Priority::Normal, None).unwrap())
            .collect();
        for (c, id) in clients.iter_mut().zip(ids) {
            let r = responses(c, 1)[0];
            assert_eq!((r.request_id, r.status), (id, Status::OK));
        }
    }
    // Half of them hang up while cold: the poller still notices and unmaps their segments.
    std::thread::sleep(Duration::from_millis(100));
    clients.truncate(20);
    assert!(
        eventually(Duration::from_secs(10), || segment_maps(&server) + 20
            <= maps),
        "{} session segments still mapped, {maps} before 20 hung up",
        segment_maps(&server)
    );
    for c in &mut clients {
        c.predict(&f.inputs[1]).unwrap();
    }
}
