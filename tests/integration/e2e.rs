//! End to end: a real `tie serve` process, real client processes.

use std::io::{BufRead, BufReader};
use std::time::Duration;

use crate::common::{
    eventually, fixture, fixtures, next_response, raw_frame, rel_err, spawn_child, TestServer,
};
use tie_client::layouts::abi::{RejectReason, RequestHeader};
use tie_client::layouts::FeatureLayout;
use tie_client::{
    Client, ConnectError, ConnectOptions, PredictError, Priority, Status, SubmitError,
};

fn connect(server: &TestServer, model: &str, version: Option<u32>) -> Client {
    let options = ConnectOptions {
        version,
        ..server.options()
    };
    Client::connect(&server.endpoint, model, options).expect("connect")
}

#[test]
fn predictions_match_onnxruntime_one_by_one_and_batched() {
    let server = TestServer::start();
    for f in fixtures() {
        let mut client = connect(&server, &f.model, Some(f.version));
        for (input, expected) in f.inputs.iter().zip(&f.outputs) {
            let p = client.predict(input).unwrap();
            assert_eq!(p.outputs().len(), expected.len());
            for (a, b) in p.outputs().iter().zip(expected) {
                assert!(rel_err(*a, *b) <= 1e-5, "{}: {a} vs {b}", f.model);
            }
            assert_eq!(p.response.model_version, f.version);
        }
        // All rows at once: they share batches, and come back in order.
        let ids: Vec<u64> = f
            .inputs
            .iter()
            .map(|row| client.submit(row, Priority::Normal, None).unwrap())
            .collect();
        let mut got = Vec::new();
        while got.len() < ids.len() {
            if let Some(r) = client.poll() {
                got.push(r);
            }
        }
        for ((r, id), expected) in got.iter().zip(&ids).zip(&f.outputs) {
            assert_eq!(r.request_id, *id);
            assert_eq!(r.status, Status::OK);
            for (a, b) in r.outputs().iter().zip(expected) {
                assert!(rel_err(*a, *b) <= 1e-5, "{} batched: {a} vs {b}", f.model);
            }
        }
    }
}

#[test]
fn layout_mismatch_is_refused_naming_both_hashes() {
    let server = TestServer::start();
    let dir = crate::common::root().join("layouts/features");
    let good = FeatureLayout::from_file(&dir.join("mlp64.toml")).unwrap();
    let bad = FeatureLayout::from_file(&dir.join("mlp64_reordered.toml")).unwrap();
    let options = ConnectOptions {
        layout: Some(bad.clone()),
        ..server.options()
    };
    match Client::connect(&server.endpoint, "mlp64", options) {
        Err(e @ ConnectError::LayoutMismatch { ours, theirs }) => {
            assert_eq!(ours, bad.hash());
            assert_eq!(theirs, good.hash());
            let msg = e.to_string();
            assert!(
                msg.contains(&format!("{ours:#018x}")) && msg.contains(&format!("{theirs:#018x}")),
                "{msg}"
            );
        }
        other => panic!("expected a layout mismatch, got {other:?}"),
    }
    let options = ConnectOptions {
        layout: Some(good.clone()),
        ..server.options()
    };
    let client = Client::connect(&server.endpoint, "mlp64", options).unwrap();
    assert_eq!(client.layout_hash(), good.hash());
}

#[test]
fn unknown_models_versions_and_missing_servers_are_clear_errors() {
    let server = TestServer::start();
    match Client::connect(&server.endpoint, "nope", server.options()) {
        Err(ConnectError::Refused { message, .. }) => {
            assert!(
                message.contains("nope") && message.contains("mlp64:1"),
                "{message}"
            )
        }
        other => panic!("{other:?}"),
    }
    let options = ConnectOptions {
        version: Some(9),
        ..server.options()
    };
    assert!(matches!(
        Client::connect(&server.endpoint, "multi", options),
        Err(ConnectError::Refused { .. })
    ));
    match Client::connect("no-such-endpoint", "mlp64", server.options()) {
        Err(e @ ConnectError::ServerNotRunning { .. }) => {
            // What to do next is said.
            let text = e.to_string();
            assert!(
                text.contains("not running") && text.contains("start `tie serve`"),
                "{text}"
            )
        }
        other => panic!("{other:?}"),
    }
    // The default version is the highest.
    assert_eq!(connect(&server, "multi", None).model_version(), 2);
}

#[test]
fn client_checks_feature_count_and_non_finite_values() {
    let server = TestServer::start();
    let mut client = connect(&server, "mlp64", None);
    assert_eq!(
        client.submit(&[1.0; 3], Priority::Normal, None),
        Err(SubmitError::WrongFeatureCount {
            expected: 64,
            got: 3
        })
    );
    let mut row = vec![0.5f32; 64];
    row[7] = f32::NAN;
    assert_eq!(
        client.submit(&row, Priority::Normal, None),
        Err(SubmitError::NonFinite { index: 7 })
    );
    row[7] = f32::INFINITY;
    assert!(matches!(
        client.predict(&row),
        Err(PredictError::Submit(SubmitError::NonFinite { index: 7 }))
    ));
    assert_eq!(client.in_flight(), 0);
    row[7] = 0.0;
    client.predict(&row).unwrap();
}

/// A frame for `client`'s session: header fields as given, features from `features`.
#[test]
fn malformed_frames_get_error_statuses_and_the_session_goes_on() {
    let server = TestServer::start();
    let f = fixture("mlp64_v1");
    let mut client = connect(&server, "mlp64", None);
    let mut nan_row = f.inputs[0].clone();
    nan_row[5] = f32::NAN;
    let header = |client: &Client, id: u64| RequestHeader {
        seq: client.next_seq(),
        request_id: id,
        priority: 1,
        feature_count: 64,
        ..RequestHeader::default()
    };
    type Case = (
        Box<dyn Fn(&Client) -> RequestHeader>,
        Vec<f32>,
        Status,
        u32,
        u32,
    );
    let cases: Vec<Case> = vec![
        (
            Box::new(move |c| RequestHeader {
                feature_count: 63,
                ..header(c, 101)
            }),
            f.inputs[0].clone(),
            Status::INVALID_INPUT_SHAPE,
            64,
            63,
        ),
        (
            Box::new(move |c| RequestHeader {
                feature_count: u32::MAX,
                ..header(c, 102)
            }),
            f.inputs[0].clone(),
            Status::INVALID_INPUT_SHAPE,
            64,
            u32::MAX,
        ),
        (
            Box::new(move |c| header(c, 103)),
            nan_row,
            Status::REJECTED,
            RejectReason::NonFinite as u32,
            5,
        ),
        (
            Box::new(move |c| RequestHeader {
                model_slot: 7,
                ..header(c, 104)
            }),
            f.inputs[0].clone(),
            Status::MODEL_NOT_FOUND,
            7,
            0,
        ),
        (
            Box::new(move |c| RequestHeader {
                priority: 9,
                ..header(c, 105)
            }),
            f.inputs[0].clone(),
            Status::REJECTED,
            RejectReason::BadPriority as u32,
            9,
        ),
    ];
    for (make, features, status, a, b) in &cases {
        let h = make(&client);
        let id = h.request_id;
        let words = raw_frame(&client, h, features);
        client.submit_raw(&words, id).unwrap();
        let r = next_response(&mut client);
        assert_eq!(
            (r.request_id, r.status, r.detail_a, r.detail_b),
            (id, *status, *a, *b)
        );
        assert!(r.outputs().is_empty());
    }
    // A sequence number out of order is rejected; the server counts frames, so the next
    // frame is judged by its position, not by the bad number.
    let expected_seq = client.next_seq();
    let h = RequestHeader {
        seq: expected_seq + 5,
        ..header(&client, 107)
    };
    let words = raw_frame(&client, h, &f.inputs[0]);
    client.submit_raw(&words, 107).unwrap();
    let r = next_response(&mut client);
    assert_eq!(
        (r.status, r.detail_a, r.detail_b),
        (
            Status::REJECTED,
            RejectReason::BadSequence as u32,
            expected_seq as u32
        )
    );
    let h = RequestHeader {
        seq: expected_seq + 6,
        ..header(&client, 108)
    };
    let words = raw_frame(&client, h, &f.inputs[0]);
    client.submit_raw(&words, 108).unwrap();
    let r = next_response(&mut client);
    assert_eq!(r.status, Status::REJECTED);
    let h = header(&client, 109);
    let words = raw_frame(&client, h, &f.inputs[0]);
    client.submit_raw(&words, 109).unwrap();
    let r = next_response(&mut client);
    assert_eq!(r.status, Status::OK);
    assert!(rel_err(r.outputs()[0], f.outputs[0][0]) <= 1e-5);
}

#[test]
fn a_corrupt_ring_index_faults_only_that_session() {
    let server = TestServer::start();
    let f = fixture("mlp64_v1");
    let mut good = connect(&server, "mlp64", None);
    let mut bad = connect(&server, "mlp64", None);
    good.predict(&f.inputs[0]).unwrap();
    bad.predict(&f.inputs[0]).unwrap();
    // Write a tail far beyond the ring's capacity into the request ring's index. The server
    // takes frames by their stamps and looks at the tail every few empty polls: it faults the
    // session at its next look, and the client's calls turn `Disconnected`.
    let offset = bad.segment().geometry().request_offset / 8;
    bad.segment().words()[offset].store(1 << 40, std::sync::atomic::Ordering::Release);
    assert!(
        eventually(Duration::from_secs(10), || server
            .log()
            .contains("session faulted")),
        "{}",
        server.log()
    );
    assert!(matches!(
        bad.predict(&f.inputs[0]),
        Err(PredictError::Submit(SubmitError::Disconnected))
    ));
    assert!(server.log().contains("session faulted"), "{}", server.log());
    for row in &f.inputs {
        good.predict(row).unwrap();
    }
}

#[test]
fn a_killed_client_does_not_disturb_others_and_its_session_is_reclaimed() {
    let server = TestServer::start();
    let f = fixture("mlp64_v1");
    let mut other = connect(&server, "mlp64", None);
    let baseline = server.segment_fds();
    assert_eq!(baseline, 1);
    let mut child = spawn_child(
        "e2e::child_client",
        "stream",
        &[("TIE_SOCKET_DIR", server.dir.to_string_lossy().into_owned())],
    );
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    // libtest prints `test child_client ... ` before the child's own output, on the same line.
    let line = lines
        .find(|l| l.as_ref().is_ok_and(|l| l.contains("streaming session")))
        .unwrap()
        .unwrap();
    assert!(line.contains("streaming session"));
    assert!(eventually(Duration::from_secs(5), || server.segment_fds() == 2));
    for row in &f.inputs {
        other.predict(row).unwrap();
    }
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(
        eventually(Duration::from_secs(5), || server.segment_fds() == baseline),
        "session not reclaimed: {} segments; log:\n{}",
        server.segment_fds(),
        server.log()
    );
    for (row, expected) in f.inputs.iter().zip(&f.outputs) {
        let p = other.predict(row).unwrap();
        assert!(rel_err(p.outputs()[0], expected[0]) <= 1e-5);
    }
}

#[test]
fn a_killed_server_turns_pending_requests_into_disconnected() {
    let server = TestServer::start();
    let f = fixture("mlp64_v1");
    let mut client = connect(&server, "mlp64", None);
    client.predict(&f.inputs[0]).unwrap();
    server.pause(); // requests stay pending
    let ids: Vec<u64> = f
        .inputs
        .iter()
        .map(|r| client.submit(r, Priority::Normal, None).unwrap())
        .collect();
    server.signal(9);
    let mut answered = Vec::new();
    while answered.len() < ids.len() {
        let r = next_response(&mut client);
        assert_eq!(r.status, Status::DISCONNECTED);
        answered.push(r.request_id);
    }
    assert_eq!(answered, ids);
    assert!(matches!(
        client.predict(&f.inputs[0]),
        Err(PredictError::Submit(SubmitError::Disconnected))
    ));
    assert_eq!(client.poll(), None);
}

#[test]
fn a_stopped_server_answers_what_it_accepted_then_disconnects() {
    let mut server = TestServer::start();
    let f = fixture("mlp64_v1");
    let mut client = connect(&server, "mlp64", None);
    server.pause();
    let ids: Vec<u64> = f
        .inputs
        .iter()
        .map(|r| client.submit(r, Priority::Normal, None).unwrap())
        .collect();
    server.signal(15); // SIGTERM, handled once it runs again
    server.signal(18); // SIGCONT
    for (id, expected) in ids.iter().zip(&f.outputs) {
        let r = next_response(&mut client);
        assert_eq!(
            (r.request_id, r.status),
            (*id, Status::OK),
            "{}",
            server.log()
        );
        assert!(rel_err(r.outputs()[0], expected[0]) <= 1e-5);
    }
    assert!(server.child.wait().unwrap().success());
    assert!(matches!(
        client.predict(&f.inputs[0]),
        Err(PredictError::Submit(SubmitError::Disconnected))
    ));
    assert!(!server.dir.join("test.sock").exists());
}

#[test]
fn eight_client_processes_ten_thousand_requests_each_answered_exactly_once() {
    let server = TestServer::start();
    let children: Vec<_> = (0..8)
        .map(|i| {
            spawn_child(
                "e2e::child_client",
                "load",
                &[
                    ("TIE_SOCKET_DIR", server.dir.to_string_lossy().into_owned()),
                    ("TIE_CHILD_INDEX", i.to_string()),
                ],
            )
        })
        .collect();
    for child in children {
        let out = child.wait_with_output().unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "child failed: {stdout}");
        assert!(stdout.contains("answered 10000 of 10000"), "{stdout}");
    }
    assert!(!server.log().contains("faulted"), "{}", server.log());
}

#[test]
fn tie_predict_prints_the_inference_response() {
    let server = TestServer::start();
    let f = fixture("multi_v2");
    let out = server.predict_cli("multi", &f.inputs[0]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let predictions = json["predictions"].as_array().unwrap();
    assert_eq!(predictions.len(), 4);
    for (p, expected) in predictions.iter().zip(&f.outputs[0]) {
        assert!(rel_err(p["value"].as_f64().unwrap() as f32, *expected) <= 1e-5);
    }
    assert_eq!(json["model_metadata"]["model_version"], "2");
    assert_eq!(json["model_metadata"]["inference_device"], "cpu");
    assert!(json["error"].is_null());
    assert!(json["performance_metrics"]["gpu_utilization"].is_null());

    let out = std::process::Command::new(env!("CARGO_BIN_EXE_tie"))
        .args([
            "predict",
            "--endpoint",
            "test",
            "--model",
            "multi",
            "--features=-1,2",
        ])
        .arg("--socket-dir")
        .arg(&server.dir)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("expected 16, got 2"), "{stderr}");
}

/// Child client processes, run by the tests above through `spawn_child`.
#[test]
#[ignore = "run as a child process by other tests"]
fn child_client() {
    let Ok(role) = std::env::var("TIE_CHILD_ROLE") else {
        return;
    };
    let options = ConnectOptions {
        socket_dir: std::env::var_os("TIE_SOCKET_DIR").map(Into::into),
        timeout: Duration::from_secs(10),
        ..ConnectOptions::default()
    };
    let f = fixture("mlp64_v1");
    let mut client = Client::connect("test", "mlp64", options).unwrap();
    match role.as_str() {
        "stream" => {
            println!("streaming session {}", client.session_id());
            // Bounded, in case the test that kills this process fails first.
            let started = std::time::Instant::now();
            while started.elapsed() < Duration::from_secs(120) {
                let _ = client.submit(&f.inputs[0], Priority::Normal, None);
                while client.poll().is_some() {}
                std::thread::yield_now();
            }
        }
        "load" => {
            const TOTAL: usize = 10_000;
            const WINDOW: usize = 32;
            let index: usize = std::env::var("TIE_CHILD_INDEX").unwrap().parse().unwrap();
            let mut sent: Vec<(u64, usize)> = Vec::with_capacity(TOTAL);
            let mut answered = 0usize;
            let mut next_answer = 0usize;
            while answered < TOTAL {
                while sent.len() < TOTAL && sent.len() - answered < WINDOW {
                    let row = (sent.len() + index) % f.inputs.len();
                    let id = client
                        .submit(&f.inputs[row], Priority::Normal, None)
                        .unwrap();
                    sent.push((id, row));
                }
                match client.poll() {
                    Some(r) => {
                        let (id, row) = sent[next_answer];
                        assert_eq!(r.request_id, id, "answers out of order or duplicated");
                        assert_eq!(r.status, Status::OK, "{:?}", r.error());
                        assert!(rel_err(r.outputs()[0], f.outputs[row][0]) <= 1e-5);
                        next_answer += 1;
                        answered += 1;
                    }
                    None => std::thread::yield_now(),
                }
            }
            assert_eq!(client.poll(), None, "an extra response");
            println!("answered {answered} of {TOTAL}");
        }
        other => panic!("unknown role {other}"),
    }
}

#[test]
fn a_slow_or_silent_connection_does_not_hold_up_others() {
    use std::io::Write;
    let server = TestServer::start();
    let f = fixture("mlp64_v1");
    let socket = server.dir.join("test.sock");
    // One connection that never sends, one that trickles a byte, one with garbage.
    let _silent = std::os::unix::net::UnixStream::connect(&socket).unwrap();
    let mut trickle = std::os::unix::net::UnixStream::connect(&socket).unwrap();
    trickle.write_all(b"T").unwrap();
    let mut garbage = std::os::unix::net::UnixStream::connect(&socket).unwrap();
    garbage.write_all(&[0xAB; 128]).unwrap();
    let mut client = connect(&server, "mlp64", None);
    for (row, expected) in f.inputs.iter().zip(&f.outputs) {
        let p = client.predict(row).unwrap();
        assert!(rel_err(p.outputs()[0], expected[0]) <= 1e-5);
    }
    // The garbage hello was answered with a refusal and closed.
    let mut reply = [0u8; 256];
    let n = std::io::Read::read(&mut garbage, &mut reply).unwrap();
    assert_eq!(n, 256);
    let reply: tie_client::layouts::HelloReply = bytemuck::pod_read_unaligned(&reply);
    assert_eq!(
        reply.status,
        tie_client::layouts::HelloStatus::BadRequest.code()
    );
    assert!(reply.message().contains("magic"), "{}", reply.message());
}

#[test]
fn shutdown_completes_while_a_client_keeps_sending() {
    let mut server = TestServer::start();
    let mut child = spawn_child(
        "e2e::child_client",
        "stream",
        &[("TIE_SOCKET_DIR", server.dir.to_string_lossy().into_owned())],
    );
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    assert!(lines.any(|l| l.is_ok_and(|l| l.contains("streaming session"))));
    server.signal(15);
    let exited = eventually(Duration::from_secs(10), || {
        matches!(server.child.try_wait(), Ok(Some(_)))
    });
    let _ = child.kill();
    let _ = child.wait();
    assert!(
        exited,
        "server did not stop under load; log:\n{}",
        server.log()
    );
}
