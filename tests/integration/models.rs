//! Model management on a real `tie serve`: reload under load, a broken or corrupt version
//! leaving the old one serving, version policies, labels, unload, and the bearer token of
//! the state-changing endpoints.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::common::{fixture, get, post, post_empty, rel_err, scratch_dir, Fixture, TestServer};
use crate::conformance::{compare, Tolerance};
use serde_json::{json, Value};
use tie_client::{Client, ConnectOptions, Priority, Status};

pub(crate) const API: &str = "api/v1/internal/inference";

/// Copies version `version` of example model `model` into `repo` as version `as_version`.
fn add(repo: &Path, model: &str, version: u32, as_version: u32) -> PathBuf {
    crate::common::add_version(repo, model, version, model, as_version)
}

/// Whether `outputs` are the fixture's outputs for row `row`.
pub(crate) fn matches(f: &Fixture, row: usize, outputs: &[f32]) -> bool {
    let expected = &f.outputs[row % f.outputs.len()];
    outputs.len() == expected.len()
        && outputs
            .iter()
            .zip(expected)
            .all(|(a, b)| rel_err(*a, *b) < 1e-4)
}

/// Runs `tie ARGS --http-addr` against `server`'s control plane; its printed report.
fn control(server: &TestServer, api: &str, args: &[&str]) -> Value {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_tie"))
        .args(args)
        .arg("--http-addr")
        .arg(api.split('/').nth(2).unwrap())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "tie {args:?}: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        server.log()
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

pub(crate) fn loaded(api: &str) -> Vec<Value> {
    let (code, list) = get(&format!("{api}/models/loaded"));
    assert_eq!(code, 200, "{list}");
    list.as_array().unwrap().clone()
}

pub(crate) fn keys(api: &str) -> Vec<String> {
    loaded(api)
        .iter()
        .map(|m| m["model_key"].as_str().unwrap().to_string())
        .collect()
}

/// What one client thread saw.
#[derive(Debug, Default)]
pub(crate) struct Seen {
    pub(crate) submitted: u64,
    pub(crate) ok: u64,
    /// Responses of each version, in the order the versions answered.
    pub(crate) runs: Vec<(u32, u64)>,
    /// Version 2's answer to each fixture row (checked against a version 2 session after).
    v2_answers: std::collections::BTreeMap<usize, Vec<f32>>,
    pub(crate) failures: Vec<String>,
}

impl Seen {
    fn fail(&mut self, what: String) {
        // The first few say what went wrong.
        if self.failures.len() < 10 {
            self.failures.push(what);
        }
    }
}

/// Sends multi version 1's fixture rows, pipelined 8 deep, until `stop`; checks that answers
/// come in order, version 1's against the fixture, version 2's for consistency (each row the
/// same answer).
pub(crate) fn client_loop(mut client: Client, stop: Arc<AtomicBool>) -> Seen {
    let f = fixture("multi_v1");
    let mut seen = Seen::default();
    let mut sent = std::collections::VecDeque::new();
    let mut row = 0usize;
    let mut idle_since = Instant::now();
    loop {
        let stopping = stop.load(Ordering::Relaxed);
        while !stopping && client.in_flight() < 8 {
            let features = &f.inputs[row % f.inputs.len()];
            match client.submit(features, Priority::Normal, None) {
                Ok(id) => {
                    sent.push_back((id, row));
                    seen.submitted += 1;
                    row += 1;
                }
                Err(e) => {
                    seen.fail(format!("submit: {e}"));
                    return seen;
                }
            }
        }
        match client.poll() {
            Some(r) => {
                idle_since = Instant::now();
                let (id, row) = sent.pop_front().expect("an answer to a request sent");
                if r.request_id != id {
                    seen.fail(format!("answer to {:?} where {id:?} was due", r.request_id));
                }
                if r.status != Status::OK {
                    seen.fail(format!("status {:?}", r.status));
                    continue;
                }
                let key = row % f.inputs.len();
                let right = match r.model_version {
                    1 => matches(&f, row, r.outputs()),
                    2 => {
                        seen.v2_answers
                            .entry(key)
                            .or_insert_with(|| r.outputs().to_vec())
                            .as_slice()
                            == r.outputs()
                    }
                    _ => false,
                };
                if !right {
                    seen.fail(format!(
                        "row {row}: {:?} from version {} is not that version's answer",
                        r.outputs(),
                        r.model_version
                    ));
                }
                seen.ok += 1;
                match seen.runs.last_mut() {
                    Some((v, n)) if *v == r.model_version => *n += 1,
                    _ => seen.runs.push((r.model_version, 1)),
                }
            }
            None if stopping && sent.is_empty() => return seen,
            None => {
                if idle_since.elapsed() > Duration::from_secs(20) {
                    seen.fail("no answer for 20 s".into());
                    return seen;
                }
                std::thread::yield_now();
            }
        }
    }
}

fn connect(server: &TestServer, model: &str, version: Option<u32>) -> Client {
    Client::connect(
        &server.endpoint,
        model,
        ConnectOptions {
            version,
            ..server.options()
        },
    )
    .unwrap()
}

#[test]
fn a_reload_under_load_switches_each_session_once_and_loses_nothing() {
    let repo = scratch_dir("repo");
    add(&repo, "multi", 1, 1);
    // The latest version only: a reload to version 2 also unloads version 1.
    std::fs::write(
        repo.join("multi/config.toml"),
        "versions = { latest = 1 }\n",
    )
    .unwrap();
    let server = TestServer::start_with(crate::common::TEST_CONFIG, &repo);
    let api = format!("{}/{API}", server.http());
    assert_eq!(keys(&api), ["multi:1"]);

    // Four sessions following the default, sending all along.
    let stop = Arc::new(AtomicBool::new(false));
    let threads: Vec<_> = (0..4)
        .map(|_| {
            let client = connect(&server, "multi", None);
            let stop = stop.clone();
            std::thread::spawn(move || client_loop(client, stop))
        })
        .collect();
    // A session pinned to version 1, idle: it is closed when version 1 goes.
    let mut pinned = connect(&server, "multi", Some(1));
    assert_eq!(
        pinned
            .predict(&fixture("multi_v1").inputs[0])
            .unwrap()
            .response
            .model_version,
        1
    );
    std::thread::sleep(Duration::from_millis(300));

    // `tie reload multi` once version 2 is in the repository.
    add(&repo, "multi", 2, 2);
    let report = control(&server, &api, &["reload", "multi"]);
    assert_eq!(report["loaded"][0]["model_key"], "multi:2", "{report}");
    assert!(report["loaded"][0]["load_time_ms"].as_f64().unwrap() > 0.0);
    assert_eq!(report["loaded"][0]["checksum"].as_str().unwrap().len(), 64);
    assert_eq!(report["unloaded"], json!(["multi:1"]), "{report}");
    assert_eq!(report["defaults"], json!({"multi": 2}));
    assert_eq!(
        report["still_draining"],
        json!([]),
        "version 1 freed: {report}"
    );

    // Every session reaches version 2, then a little more traffic.
    std::thread::sleep(Duration::from_millis(500));
    stop.store(true, Ordering::Relaxed);
    // Version 2's answers to the rows sent, from a session pinned to it: not version 1's.
    let mut v2 = connect(&server, "multi", Some(2));
    let f1 = fixture("multi_v1");
    let v2_expected: Vec<Vec<f32>> = f1
        .inputs
        .iter()
        .map(|row| v2.predict(row).unwrap().outputs().to_vec())
        .collect();
    for (i, out) in v2_expected.iter().enumerate() {
        assert!(!matches(&f1, i, out), "the versions differ on row {i}");
    }
    // Version 2's answers, within fp32's tolerance of the pinned session's: not bitwise, since
    // a GPU engine's summation order depends on the batch size a row lands in.
    let close = |a: &[f32], b: &[f32]| compare(a, b, Tolerance::Elementwise(1e-4)).is_ok();
    for t in threads {
        let seen = t.join().unwrap();
        for (row, out) in &seen.v2_answers {
            assert!(
                close(out, &v2_expected[*row]),
                "version 2's answer to row {row}: {out:?}, alone {:?}",
                v2_expected[*row]
            );
        }
        assert!(seen.failures.is_empty(), "{seen:?}");
        assert_eq!(seen.ok, seen.submitted, "every request answered: {seen:?}");
        let versions: Vec<u32> = seen.runs.iter().map(|(v, _)| *v).collect();
        assert_eq!(
            versions,
            [1, 2],
            "one switch per session, in order: {seen:?}"
        );
    }
    assert_eq!(keys(&api), ["multi:2"]);

    // The pinned session was closed once version 1 went: its client sees it.
    let err = pinned.predict(&fixture("multi_v1").inputs[0]).unwrap_err();
    assert!(err.to_string().contains("isconnected"), "{err}");
    // New sessions get version 2; version 1 is not served any more.
    let mut fresh = connect(&server, "multi", None);
    let p = fresh.predict(&fixture("multi_v2").inputs[1]).unwrap();
    assert_eq!(p.response.model_version, 2);
    assert!(matches(&fixture("multi_v2"), 1, p.outputs()));
    let refused = Client::connect(
        &server.endpoint,
        "multi",
        ConnectOptions {
            version: Some(1),
            ..server.options()
        },
    )
    .unwrap_err();
    assert!(refused.to_string().contains("not served"), "{refused}");
    let log = server.log();
    assert_eq!(
        log.matches("session moved to the new default version")
            .count(),
        4,
        "{log}"
    );
    assert!(
        log.contains("multi:1") && log.contains("unloaded and freed"),
        "{log}"
    );
    let _ = std::fs::remove_dir_all(&repo);
}

#[test]
fn a_broken_corrupt_or_layout_changing_version_leaves_the_old_one_serving() {
    let repo = scratch_dir("repo");
    add(&repo, "mlp64", 1, 1);
    std::fs::write(repo.join("mlp64/config.toml"), "layout = \"mlp64\"\n").unwrap();
    let dir = scratch_dir("token");
    let token_file = dir.join("token");
    std::fs::write(&token_file, "s3cret\n").unwrap();
    let config = crate::common::TEST_CONFIG.replacen(
        "[server]\n",
        &format!("[server]\napi_token_file = {token_file:?}\n"),
        1,
    );
    let server = TestServer::start_with(&config, &repo);
    let api = format!("{}/{API}", server.http());
    let mut client = connect(&server, "mlp64", None);
    let row = fixture("mlp64_v1").inputs[0].clone();
    let before = client.predict(&row).unwrap();
    let load = format!("{api}/models/mlp64/load");

    // State-changing endpoints need the token.
    let (code, body) = post_empty(&load, None);
    assert_eq!(
        (code, body["error"]["kind"].as_str()),
        (401, Some("Unauthorized")),
        "{body}"
    );
    let (code, body) = post_empty(&load, Some("wrong"));
    assert_eq!(code, 401, "{body}");
    let (code, body) = post_empty(&format!("{api}/models/mlp64:1/unload"), None);
    assert_eq!(code, 401, "{body}");
    assert!(server.log().contains("bearer token"));

    // A truncated file: refused, nothing changed.
    let file = add(&repo, "mlp64", 1, 2);
    let bytes = std::fs::read(&file).unwrap();
    std::fs::write(&file, &bytes[..bytes.len() / 2]).unwrap();
    let (code, body) = post_empty(&load, Some("s3cret"));
    assert_eq!(
        (code, body["error"]["kind"].as_str()),
        (422, Some("LoadFailed")),
        "{body}"
    );
    assert!(
        body["message"].as_str().unwrap().contains("version 2"),
        "{body}"
    );

    // A whole file whose checksum file names another digest: refused.
    std::fs::write(&file, &bytes).unwrap();
    std::fs::write(
        file.with_extension("onnx.sha256"),
        format!("{}  model.onnx\n", "0".repeat(64)),
    )
    .unwrap();
    let (code, body) = post_empty(&load, Some("s3cret"));
    assert_eq!(code, 422, "{body}");
    assert!(
        body["message"].as_str().unwrap().contains("SHA-256"),
        "{body}"
    );

    // A new default reading another layout than the sessions following the old one: refused.
    std::fs::remove_file(file.with_extension("onnx.sha256")).unwrap();
    std::fs::write(
        repo.join("mlp64/config.toml"),
        "layout = \"mlp64_reordered\"\n",
    )
    .unwrap();
    let (code, body) = post_empty(&load, Some("s3cret"));
    assert_eq!(
        (code, body["error"]["kind"].as_str()),
        (409, Some("Conflict")),
        "{body}"
    );
    assert!(
        body["message"].as_str().unwrap().contains("layout"),
        "{body}"
    );

    // Through all of it, version 1 served on, the same session and the same answers.
    assert_eq!(keys(&api), ["mlp64:1"]);
    for _ in 0..3 {
        let p = client.predict(&row).unwrap();
        assert_eq!(
            (p.response.model_version, p.outputs()),
            (1, before.outputs())
        );
    }
    // The good version with the old layout loads; the session moves to it.
    std::fs::write(repo.join("mlp64/config.toml"), "layout = \"mlp64\"\n").unwrap();
    let (code, body) = post_empty(&load, Some("s3cret"));
    assert_eq!(code, 200, "{body}");
    assert_eq!(body["loaded"][0]["model_key"], "mlp64:2", "{body}");
    assert_eq!(body["unloaded"], json!([]), "every version is kept: {body}");
    // The same file, loaded again: on a GPU the engine chosen for a batch size may sum in
    // another order, so the answer is the same within fp32's tolerance, not bitwise.
    let p = client.predict(&row).unwrap();
    assert_eq!(p.response.model_version, 2);
    if let Err(why) = compare(p.outputs(), before.outputs(), Tolerance::Elementwise(1e-4)) {
        panic!("version 2 loaded again: {why}");
    }
    let _ = std::fs::remove_dir_all(&repo);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn labels_pins_and_unload() {
    let repo = scratch_dir("repo");
    add(&repo, "multi", 1, 1);
    add(&repo, "multi", 2, 2);
    add(&repo, "identity", 1, 1);
    std::fs::write(
        repo.join("multi/config.toml"),
        "default_version = 1\nlabels = { stable = 1, canary = 2 }\n",
    )
    .unwrap();
    let server = TestServer::start_with(crate::common::TEST_CONFIG, &repo);
    let api = format!("{}/{API}", server.http());
    let predict = |version: Option<&str>| {
        post(
            &format!("{api}/predict"),
            &crate::common::inference_request(
                "r",
                "multi",
                version,
                &fixture("multi_v1").inputs[..1],
                Value::Null,
            ),
        )
    };
    let version_of = |v: (u16, Value)| {
        assert_eq!(v.0, 200, "{}", v.1);
        v.1["model_metadata"]["model_version"]
            .as_str()
            .unwrap()
            .to_string()
    };
    assert_eq!(version_of(predict(None)), "1");
    assert_eq!(version_of(predict(Some("stable"))), "1");
    assert_eq!(version_of(predict(Some("canary"))), "2");
    assert_eq!(version_of(predict(Some("2"))), "2");
    let (code, body) = predict(Some("nightly"));
    assert_eq!(code, 404, "{body}");
    assert!(
        body["message"].as_str().unwrap().contains("label"),
        "{body}"
    );
    let info = loaded(&api);
    let multi2 = info.iter().find(|m| m["model_key"] == "multi:2").unwrap();
    assert_eq!(multi2["labels"], json!(["canary"]));
    assert_eq!(multi2["is_default"], false);

    // Sessions: one following the default, one pinned to 2.
    let mut follower = connect(&server, "multi", None);
    let mut pinned = connect(&server, "multi", Some(2));
    let row = &fixture("multi_v1").inputs[0];
    assert_eq!(follower.predict(row).unwrap().response.model_version, 1);
    assert_eq!(pinned.predict(row).unwrap().response.model_version, 2);

    // Unloading the default (by its label) moves the follower to the next default.
    let (code, body) = post_empty(&format!("{api}/models/multi:stable/unload"), None);
    assert_eq!(code, 200, "{body}");
    assert_eq!(body["unloaded"], json!(["multi:1"]));
    assert_eq!(body["defaults"]["multi"], 2);
    assert_eq!(follower.predict(row).unwrap().response.model_version, 2);
    assert_eq!(pinned.predict(row).unwrap().response.model_version, 2);
    assert_eq!(version_of(predict(Some("canary"))), "2");
    let (code, _) = predict(Some("stable"));
    assert_eq!(code, 404, "the label's version is gone");
    let (code, body) = post_empty(&format!("{api}/models/multi:1/unload"), None);
    assert_eq!(
        (code, body["error"]["kind"].as_str()),
        (404, Some("ModelNotFound"))
    );

    // `tie unload multi`: every version; both sessions close, other models serve on.
    let report = control(&server, &api, &["unload", "multi"]);
    assert_eq!(report["unloaded"], json!(["multi:2"]), "{report}");
    assert!(follower.predict(row).is_err());
    assert!(pinned.predict(row).is_err());
    assert_eq!(keys(&api), ["identity:1"]);
    let (code, _) = predict(None);
    assert_eq!(code, 404);
    let metrics = crate::common::send("GET", &format!("{}/metrics", server.http()), None).1;
    assert!(
        !metrics.contains("model=\"multi\""),
        "unloaded models leave /metrics:\n{metrics}"
    );
    assert!(metrics.contains("model=\"identity\",version=\"1\""));

    // Reloading the repository brings multi back (a new model for the server).
    let (code, body) = post_empty(&format!("{api}/models/reload"), None);
    assert_eq!(code, 200, "{body}");
    assert_eq!(keys(&api), ["identity:1", "multi:1", "multi:2"]);
    assert_eq!(version_of(predict(None)), "1");
    let (code, body) = post_empty(&format!("{api}/models/nosuch/load"), None);
    assert_eq!(
        (code, body["error"]["kind"].as_str()),
        (404, Some("ModelNotFound")),
        "{body}"
    );
    let _ = std::fs::remove_dir_all(&repo);
}

#[test]
fn unused_versions_unload_and_load_again_on_the_next_request() {
    let repo = scratch_dir("repo");
    add(&repo, "multi", 1, 1);
    add(&repo, "multi", 2, 2);
    add(&repo, "identity", 1, 1);
    std::fs::write(repo.join("identity/config.toml"), "keep_loaded = true\n").unwrap();
    let config = format!("{}auto_unload_unused_sec = 1\n", crate::common::TEST_CONFIG);
    let server = TestServer::start_with(&config, &repo);
    let api = format!("{}/{API}", server.http());
    let (f1, f2) = (fixture("multi_v1"), fixture("multi_v2"));

    // Connected sessions keep their versions loaded, however quiet.
    let mut pinned = connect(&server, "multi", Some(1));
    assert_eq!(
        pinned
            .predict(&f1.inputs[0])
            .unwrap()
            .response
            .model_version,
        1
    );
    let mut client = connect(&server, "multi", None);
    assert_eq!(
        client
            .predict(&f2.inputs[0])
            .unwrap()
            .response
            .model_version,
        2
    );
    std::thread::sleep(Duration::from_millis(2500));
    assert_eq!(keys(&api), ["identity:1", "multi:1", "multi:2"]);
    drop(client);
    // Without one, a second without requests unloads the default; `keep_loaded` stays, and the
    // version left does not become the default.
    let unloaded = || keys(&api) == ["identity:1", "multi:1"];
    assert!(
        crate::common::eventually(Duration::from_secs(20), unloaded),
        "{}",
        server.log()
    );
    assert!(server.log().contains("unloading: unused"));
    let multi1 = loaded(&api)
        .into_iter()
        .find(|m| m["model_key"] == "multi:1")
        .unwrap();
    assert_eq!(multi1["is_default"], false, "{multi1}");

    // The next HTTP request for the model loads it again and says how long that took.
    let request =
        crate::common::inference_request("r", "multi", None, &f2.inputs[..1], Value::Null);
    let (code, body) = post(&format!("{api}/predict"), &request);
    assert_eq!(code, 200, "{body}\n{}", server.log());
    assert_eq!(body["model_metadata"]["model_version"], "2");
    assert!(
        body["performance_metrics"]["model_load_time_ms"]
            .as_f64()
            .unwrap()
            > 0.0,
        "{body}"
    );
    let got: Vec<f32> = body["predictions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["value"].as_f64().unwrap() as f32)
        .collect();
    assert!(matches(&f2, 0, &got), "{body}");
    let (code, body) = post(&format!("{api}/predict"), &request);
    assert_eq!(code, 200);
    assert_eq!(
        body["performance_metrics"]["model_load_time_ms"],
        Value::Null,
        "loaded now"
    );

    // Unused again (the control plane's own sessions close when idle); a ring client asking
    // for it waits while it loads (within its connect timeout) and is served.
    assert!(
        crate::common::eventually(Duration::from_secs(30), unloaded),
        "{}",
        server.log()
    );
    let mut client = connect(&server, "multi", None);
    let p = client.predict(&f2.inputs[1]).unwrap();
    assert_eq!(p.response.model_version, 2);
    assert!(matches(&f2, 1, p.outputs()));
    assert!(
        server.log().contains("loaded again for a session"),
        "{}",
        server.log()
    );
    // The pinned session went on all along.
    let p = pinned.predict(&f1.inputs[2]).unwrap();
    assert_eq!(p.response.model_version, 1);
    assert!(matches(&f1, 2, p.outputs()));

    // Unused again, and its file replaced meanwhile: refused (it loads only as it was), over
    // HTTP and on the ring, and the reason is given.
    drop(client);
    assert!(
        crate::common::eventually(Duration::from_secs(30), unloaded),
        "{}",
        server.log()
    );
    add(&repo, "multi", 1, 2);
    let (code, body) = post(&format!("{api}/predict"), &request);
    assert_eq!(
        (code, body["error"]["kind"].as_str()),
        (422, Some("LoadFailed")),
        "{body}"
    );
    assert!(
        body["message"].as_str().unwrap().contains("changed since"),
        "{body}"
    );
    let err = Client::connect(&server.endpoint, "multi", server.options()).unwrap_err();
    assert!(
        err.to_string().contains("could not be loaded again"),
        "{err}"
    );
    assert_eq!(
        pinned
            .predict(&f1.inputs[0])
            .unwrap()
            .response
            .model_version,
        1
    );
    let _ = std::fs::remove_dir_all(&repo);
}
