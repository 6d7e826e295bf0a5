//! tie's Python package (`python/`, built from this tree with maturin) against a live
//! `tie serve`: its pytest suite, and one session across a server restart.

use std::process::Command;
use std::time::Duration;

use crate::common::{eventually, fixture, python_client, root, scratch_dir, TestServer};

#[test]
fn the_python_client_passes_its_suite_against_a_live_server() {
    let server = TestServer::start_with(crate::common::TEST_CONFIG, &root().join("models"));
    let bin = python_client();
    let run = Command::new(bin.join("python"))
        .args(["-m", "pytest", "-q", "-p", "no:cacheprovider"])
        .arg(root().join("tests/python/test_client.py"))
        .env("TIE_TEST_ENDPOINT", &server.endpoint)
        .env("TIE_TEST_SOCKET_DIR", &server.dir)
        .env("TIE_TEST_FIXTURES", root().join("tests/fixtures/expected"))
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&run.stdout);
    assert!(
        run.status.success(),
        "{out}{}\n{}",
        String::from_utf8_lossy(&run.stderr),
        server.log()
    );
    // Every fixture's model, and the other tests: none skipped.
    assert!(out.contains(" passed") && !out.contains("skipped"), "{out}");
}

#[test]
fn a_python_session_reconnects_after_the_server_restarts() {
    let mut server = TestServer::start_with(crate::common::TEST_CONFIG, &root().join("models"));
    let bin = python_client();
    let step = scratch_dir("python-reconnect");
    let row = step.join("row.json");
    std::fs::write(
        &row,
        serde_json::to_string(&fixture("mlp64_v1").inputs[0]).unwrap(),
    )
    .unwrap();
    let child = Command::new(bin.join("python"))
        .arg(root().join("tests/python/reconnect.py"))
        .arg(&server.endpoint)
        .arg(&server.dir)
        .arg(&row)
        .arg(&step)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    assert!(
        eventually(Duration::from_secs(30), || step.join("connected").exists()),
        "the client never connected"
    );
    server.restart();
    std::fs::write(step.join("restarted"), "").unwrap();
    let out = child.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let seen: serde_json::Value = serde_json::from_str(text.trim()).unwrap();
    assert_eq!(seen["same"], true, "{seen}");
    assert!(seen["reconnects"].as_u64().unwrap() >= 1, "{seen}");
}
