//! The prediction journal through its public interface: a model's `journal` keys, the
//! server's `[journal]` section, the Parquet files (read back by `tie journal`, and by pandas,
//! polars and DuckDB from PyPI), the Prometheus counters, and a crash.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::common::{
    eventually, fixture, inference_request, post, python_tools, root, scratch_dir, send,
    TestServer, TEST_CONFIG,
};
use serde_json::Value;
use tie_client::{Client, ConnectOptions, Priority, Status};

/// A repository of mlp64 (journaled, with `journal_keys`) and identity (not journaled).
pub(crate) fn repository(journal_keys: &str) -> PathBuf {
    let repo = scratch_dir("journal-repo");
    crate::common::add_version(&repo, "mlp64", 1, "mlp64", 1);
    crate::common::add_version(&repo, "identity", 1, "identity", 1);
    std::fs::write(
        repo.join("mlp64/config.toml"),
        format!("backend = \"cpu\"\njournal = true\n{journal_keys}"),
    )
    .unwrap();
    repo
}

/// A server journaling into `dir`, files closed every second.
fn server(dir: &Path, repo: &Path, journal: &str) -> TestServer {
    let config = format!("{TEST_CONFIG}\n[journal]\ndir = {dir:?}\nrotate_seconds = 1\n{journal}");
    TestServer::start_with(&config, repo)
}

/// `tie journal ARGS`: its standard output, which must succeed.
fn tie_journal(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_tie"))
        .arg("journal")
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "tie journal {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// The journal's rows as `tie journal DIR --rows` prints them.
fn rows(dir: &Path, filters: &[&str]) -> Vec<Value> {
    let mut args = vec![dir.to_str().unwrap(), "--rows"];
    args.extend_from_slice(filters);
    tie_journal(&args)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// Closed journal files in `dir`, and whatever else is there but the directory's lock.
fn closed_files(dir: &Path) -> (usize, Vec<String>) {
    let mut closed = 0;
    let mut other = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let name = e.unwrap().file_name().into_string().unwrap();
        if name.starts_with("journal-") && name.ends_with(".parquet") {
            closed += 1;
        } else if name != ".lock" {
            other.push(name);
        }
    }
    (closed, other)
}

/// A sample of the server's `/metrics`, by its line's start.
pub(crate) fn metric(server: &TestServer, line_start: &str) -> Option<f64> {
    let (code, text) = send("GET", &format!("{}/metrics", server.http()), None);
    assert_eq!(code, 200);
    text.lines()
        .find(|l| l.starts_with(line_start))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// What a client was answered: per request id, its first output and first feature.
type Answered = HashMap<u64, (f32, f32)>;

/// Streams `n` fixture rows from one client (up to 32 in flight), then one row whose
/// deadline has passed (answered `Timeout`); returns the client's session id and what it was
/// answered.
fn stream(server: &TestServer, c: usize, n: usize) -> (u64, Answered) {
    let f = fixture("mlp64_v1");
    let options = ConnectOptions {
        request_capacity: 64,
        response_capacity: 64,
        ..server.options()
    };
    let mut client = Client::connect(&server.endpoint, "mlp64", options).unwrap();
    let mut answered = Answered::new();
    let mut sent = HashMap::new();
    let (mut next, mut got) = (0, 0);
    while got < n {
        while next < n && client.in_flight() < 32 {
            let row = &f.inputs[(next + c) % f.inputs.len()];
            let id = client.submit(row, Priority::High, None).unwrap();
            sent.insert(id, row[0]);
            next += 1;
        }
        if let Some(r) = client.poll() {
            assert_eq!(r.status, Status::OK);
            answered.insert(r.request_id, (r.outputs()[0], sent[&r.request_id]));
            got += 1;
        }
    }
    let id = client
        .submit(&f.inputs[0], Priority::Normal, Some(1))
        .unwrap();
    let r = crate::common::next_response(&mut client);
    assert_eq!((r.request_id, r.status), (id, Status::TIMEOUT));
    (client.session_id(), answered)
}

#[test]
fn every_answer_is_journaled_once_and_read_back_by_tie_journal_pandas_polars_and_duckdb() {
    let dir = scratch_dir("journal").join("files");
    let mut server = server(&dir, &repository(""), "");
    let per_client = 400;
    let clients: Vec<(u64, Answered)> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..2)
            .map(|c| {
                let server = &server;
                s.spawn(move || stream(server, c, per_client))
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    // The identity model is not journaled.
    let mut other = Client::connect(&server.endpoint, "identity", server.options()).unwrap();
    other
        .predict(&[1.0; 8][..other.feature_count() as usize])
        .unwrap();
    // A prediction through HTTP is, as the control plane's own session's.
    let f = fixture("mlp64_v1");
    let request = inference_request("h-1", "mlp64", None, &f.inputs[..2], Value::Null);
    let (code, body) = post(
        &format!("{}/api/v1/internal/inference/predict", server.http()),
        &request,
    );
    assert_eq!(code, 200, "{body}");
    let total = 2 * (per_client + 1) + 2;
    // Files close every second while serving: the rows become readable without a stop.
    assert!(
        eventually(Duration::from_secs(10), || metric(
            &server,
            "tie_journal_rows_total{model=\"mlp64\",version=\"1\"}"
        ) == Some(total as f64)),
        "{}",
        server.log()
    );
    assert_eq!(
        metric(
            &server,
            "tie_journal_rows_dropped_total{model=\"mlp64\",version=\"1\"}"
        ),
        Some(0.0)
    );
    assert!(server.stop());
    let (closed, other_files) = closed_files(&dir);
    assert!(closed >= 1);
    assert!(other_files.is_empty(), "{other_files:?}");

    // tie journal: the list, then every row once, each as answered.
    let list = tie_journal(&[dir.to_str().unwrap()]);
    assert!(
        list.trim_end()
            .ends_with(&format!("{closed} files, {total} rows")),
        "{list}"
    );
    assert!(
        list.contains("mlp64:1") && !list.contains("identity"),
        "{list}"
    );
    let all = rows(&dir, &[]);
    assert_eq!(all.len(), total);
    let http: Vec<&Value> = all.iter().filter(|r| r["source"] == "http").collect();
    assert_eq!(http.len(), 2, "{http:?}");
    assert_eq!(http[0]["pid"], server.pid());
    for (r, row) in http.iter().zip(&f.inputs) {
        let features: Vec<f32> = serde_json::from_value(r["features"].clone()).unwrap();
        assert_eq!(&features, row);
    }
    for (session, answered) in &clients {
        let mine: Vec<&Value> = all.iter().filter(|r| r["session_id"] == *session).collect();
        assert_eq!(mine.len(), per_client + 1);
        for r in &mine {
            assert_eq!(r["model"], "mlp64");
            assert_eq!(r["version"], 1);
            assert_eq!(r["engine"], "cpu-mlp");
            assert_eq!(r["source"], "ring");
            assert_eq!(r["pid"], std::process::id());
            let id = r["request_id"].as_u64().unwrap();
            if r["status"] == "Timeout" {
                assert!(r["outputs"].is_null() && r["features"].is_null(), "{r}");
                assert!(r["confidence"].is_null());
                continue;
            }
            assert_eq!(r["status"], "Ok");
            assert_eq!(r["priority"], "high");
            let (output, feature) = answered[&id];
            // The bits the client was answered, and the features it sent.
            assert_eq!(r["outputs"][0].as_f64().unwrap() as f32, output, "{r}");
            let features: Vec<f32> = serde_json::from_value(r["features"].clone()).unwrap();
            assert_eq!(features.len(), 64);
            assert_eq!(features[0], feature);
            assert!(f.inputs.contains(&features), "{r}");
            // Stamps: sent and read (the start of the poller's round that read it, which
            // may be a little before the send), then answered.
            let (sent, read, time) = (
                r["sent_ns"].as_i64().unwrap(),
                r["read_ns"].as_i64().unwrap(),
                r["time_ns"].as_i64().unwrap(),
            );
            assert!(sent <= time && read <= time, "{r}");
            assert!((sent - read).abs() < 1_000_000_000, "{r}");
        }
    }
    // Filters: one request of one session; a time range past the last row holds none.
    let (session, answered) = &clients[0];
    let id = *answered.keys().next().unwrap();
    let one = rows(&dir, &["--model", "mlp64", "--request-id", &id.to_string()]);
    assert!(one.iter().any(|r| r["session_id"] == *session), "{one:?}");
    assert!(rows(&dir, &["--since", "2100-01-01T00:00:00Z"]).is_empty());
    assert!(rows(&dir, &["--model", "identity"]).is_empty());

    // The readers desks use.
    let out = scratch_dir("journal-readers").join("seen.json");
    let python = python_tools(&[
        "pandas==3.1.1",
        "pyarrow==26.0.1",
        "polars==2.1.0",
        "duckdb==2.0.1",
    ])
    .join("python");
    let run = Command::new(python)
        .arg(root().join("tests/python/journal_readers.py"))
        .arg(&dir)
        .arg(&out)
        .output()
        .unwrap();
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let seen: Value = serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap();
    let ok = 2 * per_client + 2;
    let sum: f64 = clients
        .iter()
        .flat_map(|(_, a)| a.values().map(|v| f64::from(v.0)))
        .chain(http.iter().map(|r| r["outputs"][0].as_f64().unwrap()))
        .sum();
    for reader in ["pandas", "polars", "duckdb"] {
        assert_eq!(seen[reader]["rows"], total, "{reader}: {seen}");
        assert_eq!(seen[reader]["ok"], ok, "{reader}: {seen}");
    }
    for reader in ["polars", "duckdb"] {
        let got = seen[reader]["sum_first_output"].as_f64().unwrap();
        assert!(
            (got - sum).abs() <= 1e-6 * sum.abs().max(1.0),
            "{reader}: {got} vs {sum}"
        );
    }
    let pandas = &seen["pandas"];
    assert_eq!(pandas["models"], serde_json::json!(["mlp64"]));
    assert_eq!(pandas["statuses"], serde_json::json!(["Ok", "Timeout"]));
    assert_eq!(pandas["time_tz"], "UTC");
    assert_eq!(pandas["errors_without_outputs"], 2);
    for (session, answered) in &clients {
        for (id, (output, feature)) in answered {
            let got = &pandas["answers"][format!("{session}/{id}")];
            assert_eq!(got[0].as_f64().unwrap() as f32, *output);
            assert_eq!(got[1].as_f64().unwrap() as f32, *feature);
        }
    }
}

#[test]
fn a_sample_without_features_journals_about_its_share() {
    let dir = scratch_dir("journal").join("files");
    let repo = repository("journal_sample_rate = 0.25\njournal_features = false\n");
    let mut server = server(&dir, &repo, "");
    let (_, answered) = stream(&server, 0, 400);
    assert_eq!(answered.len(), 400);
    assert!(server.stop());
    let all = rows(&dir, &[]);
    // One row in four, evenly: 401 answers give 100.
    assert_eq!(all.len(), 100, "{}", all.len());
    assert!(all.iter().all(|r| r["features"].is_null()));
    assert!(all
        .iter()
        .filter(|r| r["status"] == "Ok")
        .all(|r| r["outputs"].is_array()));
}

#[test]
fn a_crash_loses_only_the_file_being_written_and_the_restart_says_so() {
    let dir = scratch_dir("journal").join("files");
    let repo = repository("");
    let mut server = server(&dir, &repo, "");
    let (_, first) = stream(&server, 0, 100);
    assert_eq!(first.len(), 100);
    // Once the first rows are in a closed file, more rows go to a new one, then the server
    // is killed while that one is open.
    assert!(eventually(Duration::from_secs(10), || closed_files(&dir).0 >= 1));
    let closed_before: Vec<Value> = rows(&dir, &[]);
    assert_eq!(closed_before.len(), 101);
    // Rows that stay in the open file: the file is closed only after a second.
    let _ = stream(&server, 1, 50);
    assert!(eventually(Duration::from_secs(5), || {
        std::fs::read_dir(&dir).unwrap().any(|e| {
            e.unwrap()
                .file_name()
                .to_string_lossy()
                .ends_with(".partial")
        })
    }));
    server.signal(9);
    let (_, others) = closed_files(&dir);
    assert_eq!(others.len(), 1, "{others:?}");
    server.restart();
    assert!(
        server.log().contains("left unfinished by an earlier run"),
        "{}",
        server.log()
    );
    // A second server on the same directory is refused: it would take the first one's file
    // for a crash's.
    let other = scratch_dir("journal-second");
    std::fs::write(
        other.join("tie.toml"),
        format!("{TEST_CONFIG}\n[journal]\ndir = {dir:?}\n"),
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_tie"))
        .args(["serve", "--config"])
        .arg(other.join("tie.toml"))
        .arg("--model-repository")
        .arg(&repo)
        .args([
            "--endpoint",
            "second",
            "--http-addr",
            "127.0.0.1:0",
            "--socket-dir",
        ])
        .arg(&other)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("another tie server journals into it"), "{err}");
    let (closed, others) = closed_files(&dir);
    assert!(others.is_empty(), "{others:?}");
    assert!(closed >= 1);
    // What was closed before the crash is all there and readable.
    assert_eq!(rows(&dir, &[]), closed_before);
    assert!(server.stop());
}

/// `tie replay ARGS --json`: its exit code and report.
fn replay(args: &[&str]) -> (i32, Value) {
    let out = Command::new(env!("CARGO_BIN_EXE_tie"))
        .arg("replay")
        .args(args)
        .arg("--json")
        .output()
        .unwrap();
    let code = out.status.code().unwrap();
    assert!(
        code == 0 || code == 3,
        "tie replay {args:?}: {code}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    (code, serde_json::from_slice(&out.stdout).unwrap())
}

/// A server journaling into a fresh directory, serving versions 1 and 2 of `multi` on the CPU,
/// both journaled, with `routing` as the repository's `routing.toml` (none when empty).
/// Returns the journal's directory, the repository and the server.
fn multi_server(routing: &str) -> (PathBuf, PathBuf, TestServer) {
    let dir = scratch_dir("journal").join("files");
    let repo = scratch_dir("journal-repo");
    crate::common::add_version(&repo, "multi", 1, "multi", 1);
    crate::common::add_version(&repo, "multi", 2, "multi", 2);
    std::fs::write(
        repo.join("multi/config.toml"),
        "backend = \"cpu\"\njournal = true\n",
    )
    .unwrap();
    if !routing.is_empty() {
        std::fs::write(repo.join("routing.toml"), routing).unwrap();
    }
    let server = server(&dir, &repo, "");
    (dir, repo, server)
}

/// A client of `multi` version 1, and what it was answered to `n` rows sent one at a time
/// (`pause` after each): the fixture's rows scaled, every row a different one. The answers
/// are by request id.
fn send_scaled(server: &TestServer, n: usize, pause: Duration) -> (Client, HashMap<u64, Vec<f32>>) {
    let f = fixture("multi_v1");
    let options = ConnectOptions {
        version: Some(1),
        ..server.options()
    };
    let mut client = Client::connect(&server.endpoint, "multi", options).unwrap();
    let mut answered = HashMap::new();
    for i in 0..n {
        let row: Vec<f32> = f.inputs[i % f.inputs.len()]
            .iter()
            .map(|v| v * (1.0 + i as f32 / 100.0))
            .collect();
        let r = client.predict(&row).unwrap();
        answered.insert(r.response.request_id, r.outputs().to_vec());
        std::thread::sleep(pause);
    }
    (client, answered)
}

#[test]
fn a_replay_through_the_same_version_is_identical_and_through_another_is_reported_and_gated() {
    let (dir, repo, mut server) = multi_server("");
    let rows_sent = 200;
    drop(send_scaled(&server, rows_sent, Duration::ZERO));
    assert!(server.stop());
    let (dir_s, repo_s) = (dir.to_str().unwrap(), repo.to_str().unwrap());

    // The same version, built here: every row's bits again.
    let (code, same) = replay(&[dir_s, "--model", "multi:1", "--model-repository", repo_s]);
    assert_eq!(code, 0, "{same}");
    let d = &same["divergence"];
    assert_eq!(same["model"], "multi:1");
    assert_eq!(
        (d["rows"].as_u64(), d["identical"].as_u64()),
        (Some(rows_sent as u64), Some(rows_sent as u64)),
        "{same}"
    );
    assert_eq!(d["worst"], serde_json::json!([]));

    // Another version: reported, and the exit status gates on the share.
    let (code, other) = replay(&[
        dir_s,
        "--model",
        "multi:2",
        "--model-repository",
        repo_s,
        "--top",
        "3",
    ]);
    assert_eq!(code, 3, "{other}");
    let d = &other["divergence"];
    assert_eq!(d["rows"], rows_sent);
    assert!(d["different"].as_u64().unwrap() > 0, "{other}");
    assert_eq!(d["outputs"].as_array().unwrap().len(), 4);
    let worst = d["worst"].as_array().unwrap();
    assert_eq!(worst.len(), 3);
    assert!(worst[0]["max_abs_diff"].as_f64() >= worst[2]["max_abs_diff"].as_f64());
    assert!(worst[0]["request_id"]
        .as_u64()
        .is_some_and(|id| id >= 1 && id <= rows_sent as u64));
    let (code, _) = replay(&[
        dir_s,
        "--model",
        "multi:2",
        "--model-repository",
        repo_s,
        "--max-different-share",
        "1",
    ]);
    assert_eq!(code, 0);
    // Nothing to compare is an error, not a pass.
    let out = Command::new(env!("CARGO_BIN_EXE_tie"))
        .args(["replay", dir_s, "--model", "multi:2", "--from", "nosuch"])
        .args(["--model-repository", repo_s])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no journaled row to compare"), "{err}");

    // The same through a running server: the same report.
    server.restart();
    let socket_dir = server.options().socket_dir.unwrap();
    let (code, served) = replay(&[
        dir_s,
        "--model",
        "multi:2",
        "--from",
        "multi:1",
        "--endpoint",
        "test",
        "--socket-dir",
        socket_dir.to_str().unwrap(),
        "--top",
        "3",
    ]);
    assert_eq!(code, 3);
    assert_eq!(served["model"], "multi:2");
    assert_eq!(served["divergence"], other["divergence"]);
    assert!(server.stop());
}

#[test]
fn batches_in_flight_journal_each_answer_with_its_own_features() {
    // Batches computed on a batch thread while the poller reads on (pipeline_depth): each
    // answer is journaled with the features of its own row.
    let dir = scratch_dir("journal").join("files");
    let repo = repository("pipeline_depth = 2\nmax_batch_size = 8\n");
    let mut server = server(&dir, &repo, "");
    let (session, answered) = stream(&server, 3, 600);
    assert!(server.log().contains("batches computed on a batch thread"));
    assert!(server.stop());
    let all = rows(&dir, &["--model", "mlp64"]);
    assert_eq!(all.len(), 601);
    let f = fixture("mlp64_v1");
    for r in all.iter().filter(|r| r["status"] == "Ok") {
        assert_eq!(r["session_id"], session);
        let (output, feature) = answered[&r["request_id"].as_u64().unwrap()];
        let features: Vec<f32> = serde_json::from_value(r["features"].clone()).unwrap();
        assert_eq!(features[0], feature, "{r}");
        assert!(f.inputs.contains(&features), "{r}");
        assert_eq!(r["outputs"][0].as_f64().unwrap() as f32, output, "{r}");
    }
}

/// `performance/{key}`'s `shadow` object.
fn shadow_report(server: &TestServer, key: &str) -> Value {
    let url = format!(
        "{}/api/v1/internal/inference/performance/{key}",
        server.http()
    );
    let (code, text) = send("GET", &url, None);
    assert_eq!(code, 200, "{text}");
    let v: Value = serde_json::from_str(&text).unwrap();
    v["shadow"].clone()
}

#[test]
fn a_shadow_answers_nothing_and_its_divergence_and_answers_are_reported_and_journaled() {
    let (dir, repo, mut server) =
        multi_server("[shadows.\"multi:1\"]\nshadow = \"multi:2\"\ntolerance = 1e-6\n");
    let f = fixture("multi_v1");
    let rows_sent = 300u64;
    let (mut client, answered) = send_scaled(&server, rows_sent as usize, Duration::ZERO);
    // Only the primary answered: one answer per request, version 1's.
    assert_eq!(answered.len(), rows_sent as usize);
    assert!(client.poll().is_none());

    // Every row reaches the shadow; versions 1 and 2 differ.
    let mut report = Value::Null;
    assert!(
        eventually(Duration::from_secs(10), || {
            report = shadow_report(&server, "multi:1");
            report["rows"] == rows_sent
        }),
        "{report}"
    );
    assert_eq!(report["shadow"], "multi:2");
    assert_eq!(report["dropped"], 0);
    assert_eq!(report["unavailable"], 0);
    assert!(report["different"].as_u64().unwrap() > 0, "{report}");
    let outputs = report["outputs"].as_array().unwrap();
    assert_eq!(outputs.len(), 4);
    for o in outputs {
        let share = o["sign_agreement"].as_f64().unwrap();
        assert!((0.0..=1.0).contains(&share), "{report}");
        assert!(o["max_abs_diff"].as_f64() >= o["mean_abs_diff"].as_f64());
    }
    assert_eq!(
        report["worst"][0]["primary"].as_array().unwrap().len(),
        4,
        "{report}"
    );
    let worst_id = report["worst"][0]["request_id"].as_u64().unwrap();
    let primary: Vec<f32> = report["worst"][0]["primary"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap() as f32)
        .collect();
    assert_eq!(
        primary, answered[&worst_id],
        "the primary's answer is the one the client got"
    );
    // Version 2's own figures carry no shadow.
    assert_eq!(shadow_report(&server, "multi:2"), Value::Null);
    // And /metrics.
    let labels = "{model=\"multi\",version=\"1\",shadow=\"multi:2\"}";
    assert_eq!(
        metric(&server, &format!("tie_shadow_rows_total{labels}")),
        Some(rows_sent as f64)
    );
    assert_eq!(
        metric(&server, &format!("tie_shadow_rows_dropped_total{labels}")),
        Some(0.0)
    );
    assert!(metric(
        &server,
        "tie_shadow_sign_agreement_ratio{model=\"multi\",version=\"1\",shadow=\"multi:2\",output=\"0\"}"
    )
    .is_some());

    // A shadow that is not loaded: its rows are counted, the primary still answers.
    std::fs::write(
        repo.join("routing.toml"),
        "[shadows.multi]\nshadow = \"multi:9\"\n",
    )
    .unwrap();
    let (code, body) = crate::common::post_empty(
        &format!("{}/api/v1/internal/inference/models/reload", server.http()),
        None,
    );
    assert_eq!(code, 200, "{body}");
    // `multi` is version 2 (the default): version 1 is no longer shadowed.
    assert_eq!(shadow_report(&server, "multi:1"), Value::Null);
    let options = ConnectOptions {
        version: Some(2),
        ..server.options()
    };
    let mut client2 = Client::connect(&server.endpoint, "multi", options).unwrap();
    for row in &f.inputs {
        client2.predict(row).unwrap();
    }
    assert!(
        eventually(Duration::from_secs(10), || {
            report = shadow_report(&server, "multi:2");
            report["unavailable"] == f.inputs.len()
        }),
        "{report}"
    );
    assert_eq!(
        (report["rows"].as_u64(), report["shadow"].as_str()),
        (Some(0), Some("multi:9"))
    );
    drop((client, client2));
    assert!(server.stop());

    // The shadow's answers are journaled beside the primary's: version 2, source `shadow`,
    // the same request ids, and the answers `tie replay` gets from version 2 for those rows.
    let shadowed = rows(&dir, &["--model", "multi", "--version", "2"]);
    let shadowed: Vec<&Value> = shadowed
        .iter()
        .filter(|r| r["source"] == "shadow")
        .collect();
    assert_eq!(shadowed.len(), rows_sent as usize);
    let primary = rows(&dir, &["--model", "multi", "--version", "1"]);
    assert_eq!(primary.len(), rows_sent as usize);
    let ids = |rows: &[&Value]| {
        let mut ids: Vec<u64> = rows
            .iter()
            .map(|r| r["request_id"].as_u64().unwrap())
            .collect();
        ids.sort_unstable();
        ids
    };
    assert_eq!(ids(&shadowed), ids(&primary.iter().collect::<Vec<_>>()));
    let (dir_s, repo_s) = (dir.to_str().unwrap(), repo.to_str().unwrap());
    let (_, replayed) = replay(&[
        dir_s,
        "--model",
        "multi:2",
        "--from",
        "multi:1",
        "--model-repository",
        repo_s,
    ]);
    let d = &replayed["divergence"];
    assert_eq!(d["rows"], rows_sent);
    assert_eq!(d["different"], report_different(&dir));
}

/// Rows whose shadow answer (version 2, journaled) is over 1e-6 of the primary's (version 1),
/// counted from the journal.
fn report_different(dir: &Path) -> u64 {
    let by_id = |version: &str, source: &str| -> HashMap<u64, Vec<f64>> {
        rows(dir, &["--model", "multi", "--version", version])
            .into_iter()
            .filter(|r| r["source"] == source)
            .map(|r| {
                let outputs = r["outputs"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|v| v.as_f64().unwrap())
                    .collect();
                (r["request_id"].as_u64().unwrap(), outputs)
            })
            .collect()
    };
    let (primary, shadow) = (by_id("1", "ring"), by_id("2", "shadow"));
    primary
        .iter()
        .filter(|(id, a)| {
            a.iter()
                .zip(&shadow[id])
                .any(|(a, b)| (a - b).abs() > 1e-6 * a.abs().max(1.0))
        })
        .count() as u64
}

/// Pearson's correlation.
fn pearson(x: &[f64], y: &[f64]) -> f64 {
    let n = x.len() as f64;
    let (mx, my) = (x.iter().sum::<f64>() / n, y.iter().sum::<f64>() / n);
    let cov: f64 = x.iter().zip(y).map(|(a, b)| (a - mx) * (b - my)).sum();
    let vx: f64 = x.iter().map(|a| (a - mx) * (a - mx)).sum();
    let vy: f64 = y.iter().map(|b| (b - my) * (b - my)).sum();
    cov / (vx * vy).sqrt()
}

/// Average ranks (1-based; ties share the mean of their ranks).
fn ranks(x: &[f64]) -> Vec<f64> {
    let mut order: Vec<usize> = (0..x.len()).collect();
    order.sort_by(|&a, &b| x[a].total_cmp(&x[b]));
    let mut r = vec![0.0; x.len()];
    let mut i = 0;
    while i < order.len() {
        let mut j = i;
        while j + 1 < order.len() && x[order[j + 1]] == x[order[i]] {
            j += 1;
        }
        for &k in &order[i..=j] {
            r[k] = (i + j) as f64 / 2.0 + 1.0;
        }
        i = j + 1;
    }
    r
}

#[test]
fn the_outcomes_example_scores_each_version_by_request_id_and_by_time_with_duckdb_and_polars() {
    // Version 1 answers, version 2 shadows it: both are journaled with the same request ids.
    let (dir, _repo, mut server) = multi_server("[shadows.\"multi:1\"]\nshadow = \"multi:2\"\n");
    let n = 200;
    // Send stamps 20 µs apart or more: the as-of join by time is then exact.
    let (client, _) = send_scaled(&server, n, Duration::from_micros(20));
    let session = client.session_id();
    drop(client);
    let mut report = Value::Null;
    assert!(eventually(Duration::from_secs(10), || {
        report = shadow_report(&server, "multi:1");
        report["rows"] == n
    }));
    assert!(server.stop());

    // The realised outcomes, generated: half the primary's first output, plus noise.
    let journaled = rows(&dir, &["--model", "multi"]);
    let primary: Vec<&Value> = journaled.iter().filter(|r| r["version"] == 1).collect();
    assert_eq!(primary.len(), n);
    let first = |r: &Value| r["outputs"][0].as_f64().unwrap() as f32 as f64;
    let noise = |id: u64| (id.wrapping_mul(2_654_435_761) % 1000) as f64 / 1000.0 - 0.5;
    let mut outcome = HashMap::new();
    let mut by_request = String::from("pid,session_id,request_id,outcome\n");
    let mut by_time = String::from("time,outcome\n");
    for r in &primary {
        let id = r["request_id"].as_u64().unwrap();
        assert_eq!(r["session_id"], session);
        let o = 0.5 * first(r) + 0.05 * noise(id);
        outcome.insert(id, o);
        assert_eq!(r["pid"], std::process::id());
        by_request.push_str(&format!("{},{session},{id},{o}\n", std::process::id()));
        // 5 µs after the send stamp (the next request is sent 20 µs later or more): the first
        // outcome at or after it is its own.
        let sent_us = r["sent_ns"].as_i64().unwrap() / 1000;
        let time = chrono::DateTime::from_timestamp_micros(sent_us + 5)
            .unwrap()
            .to_rfc3339_opts(chrono::SecondsFormat::Micros, true);
        by_time.push_str(&format!("{time},{o}\n"));
    }
    let files = scratch_dir("outcomes");
    std::fs::write(files.join("by_request.csv"), by_request).unwrap();
    std::fs::write(files.join("by_time.csv"), by_time).unwrap();

    // What the example must print, computed here.
    let expected: Vec<(u32, [f64; 4])> = [1u32, 2]
        .iter()
        .map(|&v| {
            let rows: Vec<&Value> = journaled.iter().filter(|r| r["version"] == v).collect();
            assert_eq!(rows.len(), n, "version {v}");
            let p: Vec<f64> = rows.iter().map(|r| first(r)).collect();
            let o: Vec<f64> = rows
                .iter()
                .map(|r| outcome[&r["request_id"].as_u64().unwrap()])
                .collect();
            let d: Vec<f64> = p.iter().zip(&o).map(|(a, b)| a - b).collect();
            let mae = d.iter().map(|x| x.abs()).sum::<f64>() / n as f64;
            let rmse = (d.iter().map(|x| x * x).sum::<f64>() / n as f64).sqrt();
            (
                v,
                [mae, rmse, pearson(&p, &o), pearson(&ranks(&p), &ranks(&o))],
            )
        })
        .collect();
    // Version 1's outcome follows its own answers: its IC is high; version 2's differs.
    assert!(expected[0].1[2] > 0.9, "{expected:?}");
    assert_ne!(expected[0].1, expected[1].1);

    let python = python_tools(&["polars==2.1.0", "duckdb==2.0.1"]).join("python");
    for (on, file) in [("request", "by_request.csv"), ("time", "by_time.csv")] {
        let out = Command::new(&python)
            .arg(root().join("examples/journal_outcomes.py"))
            .arg(&dir)
            .arg(files.join(file))
            .args(["multi", "--on", on])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "--on {on}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let printed: Value = serde_json::from_slice(&out.stdout).unwrap();
        for engine in ["duckdb", "polars"] {
            let scores = printed[engine].as_array().unwrap();
            assert_eq!(scores.len(), 2, "--on {on} {engine}: {printed}");
            for (s, (v, want)) in scores.iter().zip(&expected) {
                assert_eq!(
                    (s["version"].as_u64(), s["rows"].as_u64()),
                    (Some(u64::from(*v)), Some(n as u64)),
                    "--on {on} {engine}: {printed}"
                );
                for (name, want) in ["mae", "rmse", "ic", "rank_ic"].iter().zip(want) {
                    let got = s[name].as_f64().unwrap();
                    assert!(
                        (got - want).abs() <= 1e-9 * want.abs().max(1.0),
                        "--on {on} {engine} version {v} {name}: {got} against {want}"
                    );
                }
            }
        }
    }
}
