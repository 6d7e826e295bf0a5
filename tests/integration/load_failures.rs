//! A model whose load fails, or panics inside a dependency, never takes the server down: it
//! stops start-up by default (`exit_on_error`), or is listed as unavailable while the others
//! serve.

use std::process::Command;

use tie_client::Client;

use crate::common::onnx;
use crate::common::{add_version, fails_within, get, root, scratch_dir, TestServer, TEST_CONFIG};

/// A graph that makes tract 0.23 panic while typing it: `Range` with a step of 0 (its shape
/// inference divides by the step, `attempt to divide by zero`).
fn range_step_zero() -> Vec<u8> {
    let mut cast = onnx::node("Cast", &["positions"], "offsets");
    cast.attribute.push(onnx::int_attribute("to", 1));
    onnx::model(
        vec![
            onnx::node("Range", &["start", "limit", "delta"], "positions"),
            cast,
            onnx::node("Add", &["x", "offsets"], "y"),
        ],
        vec![
            onnx::ints("start", &[], &[0]),
            onnx::ints("limit", &[], &[4]),
            onnx::ints("delta", &[], &[0]),
        ],
        4,
        4,
    )
}

/// A repository with the identity model, a graph that makes tract panic, a model whose
/// config is invalid, and one with an ONNX-ML op no engine runs.
fn repository() -> std::path::PathBuf {
    let repo = scratch_dir("load-failures");
    add_version(&repo, "identity", 1, "identity", 1);
    onnx::install(&repo, "panics", &range_step_zero());
    add_version(&repo, "identity", 1, "badconfig", 1);
    std::fs::write(repo.join("badconfig/config.toml"), "layuot = \"x\"\n").unwrap();
    // An ONNX-ML op no engine runs.
    let mut svm = onnx::node("SVMRegressor", &["x"], "y");
    svm.domain = "ai.onnx.ml".into();
    onnx::install(&repo, "svm", &onnx::model(vec![svm], vec![], 4, 4));
    repo
}

#[test]
fn a_model_that_panics_while_loading_stops_start_up_by_default_with_its_file_named() {
    let repo = repository();
    std::fs::remove_dir_all(repo.join("badconfig")).unwrap();
    std::fs::remove_dir_all(repo.join("svm")).unwrap();
    let dir = scratch_dir("exit-on-error");
    // The config says go on; the flag, given last, says stop.
    std::fs::write(
        dir.join("tie.toml"),
        TEST_CONFIG.replacen(
            "[model_deployment]\n",
            "[model_deployment]\nexit_on_error = false\n",
            1,
        ),
    )
    .unwrap();
    let (status, stderr) = fails_within(
        Command::new(env!("CARGO_BIN_EXE_tie"))
            .current_dir(root())
            .args(["serve", "--config"])
            .arg(dir.join("tie.toml"))
            .arg("--model-repository")
            .arg(&repo)
            .args([
                "--http-addr",
                "127.0.0.1:0",
                "--exit-on-error",
                "true",
                "--socket-dir",
            ])
            .arg(&dir),
    );
    assert_eq!(status.code(), Some(1), "{stderr}");
    let file = repo.join("panics/1/model.onnx");
    assert!(
        stderr.contains("error: model panics version 1")
            && stderr.contains(&format!("loading {} panicked", file.display())),
        "{stderr}"
    );
}

#[test]
fn with_exit_on_error_off_the_others_serve_and_the_failed_ones_are_listed() {
    let config = TEST_CONFIG.replacen(
        "[model_deployment]\n",
        "[model_deployment]\nexit_on_error = false\n",
        1,
    );
    let server = TestServer::start_with(&config, &repository());
    let mut client = Client::connect("test", "identity", server.options()).unwrap();
    assert_eq!(
        client.predict(&[1.0, 2.0, 3.0, 4.0]).unwrap().outputs(),
        [1.0, 2.0, 3.0, 4.0]
    );
    let base = server.http();
    let (code, loaded) = get(&format!("{base}/api/v1/internal/inference/models/loaded"));
    assert_eq!(code, 200);
    let entry = |key: &str| {
        loaded
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["model_key"] == key)
            .unwrap_or_else(|| panic!("{key} not listed: {loaded}"))
            .clone()
    };
    assert_eq!(entry("identity:1")["available"], true);
    let panics = entry("panics:1");
    assert_eq!(panics["available"], false, "{panics}");
    assert!(
        panics["not_ready_reason"]
            .as_str()
            .is_some_and(|r| r.contains("panicked") && r.contains("panics/1/model.onnx")),
        "{panics}"
    );
    let bad = entry("badconfig");
    assert!(
        bad["not_ready_reason"]
            .as_str()
            .is_some_and(|r| r.contains("layuot")),
        "{bad}"
    );
    let svm = entry("svm:1");
    assert!(
        svm["not_ready_reason"]
            .as_str()
            .is_some_and(|r| r.contains("op SVMRegressor of domain ai.onnx.ml")),
        "{svm}"
    );
    let (code, ready) = get(&format!("{base}/health/ready"));
    assert_eq!(code, 503, "{ready}");
    let listed: Vec<&str> = ready["models"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|m| m["ready"] == false)
        .filter_map(|m| m["model_key"].as_str())
        .collect();
    assert!(
        listed.contains(&"panics:1") && listed.contains(&"badconfig"),
        "{ready}"
    );
    // Nothing of the server went down with the panic.
    assert!(server.log().contains("the panic was caught"));
    assert!(client.predict(&[4.0, 3.0, 2.0, 1.0]).is_ok());
}

#[test]
fn a_model_directory_with_nothing_to_load_is_listed_unavailable_saying_what_it_holds() {
    let repo = scratch_dir("nothing-to-load");
    add_version(&repo, "identity", 1, "identity", 1);
    // A misnamed file, a version directory that is no number, a dangling symlink, and a
    // model.onnx that is a directory.
    std::fs::create_dir_all(repo.join("misnamed/1")).unwrap();
    std::fs::write(repo.join("misnamed/1/model.onx"), b"x").unwrap();
    std::fs::create_dir_all(repo.join("lettered/v1")).unwrap();
    std::fs::copy(
        root().join("models/identity/1/model.onnx"),
        repo.join("lettered/v1/model.onnx"),
    )
    .unwrap();
    std::fs::create_dir_all(repo.join("dangling/1")).unwrap();
    std::os::unix::fs::symlink(
        repo.join("nowhere.onnx"),
        repo.join("dangling/1/model.onnx"),
    )
    .unwrap();
    std::fs::create_dir_all(repo.join("folder/1/model.onnx")).unwrap();
    // The default: the server starts (the others serve), and is not ready.
    let server = TestServer::start_with(TEST_CONFIG, &repo);
    let mut client = Client::connect("test", "identity", server.options()).unwrap();
    assert!(client.predict(&[1.0, 2.0, 3.0, 4.0]).is_ok());
    let base = server.http();
    let (_, loaded) = get(&format!("{base}/api/v1/internal/inference/models/loaded"));
    let reason = |key: &str| -> String {
        let entry = loaded
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["model_key"] == key)
            .unwrap_or_else(|| panic!("{key} not listed: {loaded}"));
        assert_eq!(entry["available"], false, "{entry}");
        entry["not_ready_reason"].as_str().unwrap_or("").to_string()
    };
    for (key, holds) in [
        ("misnamed", "1/model.onx"),
        ("lettered", "v1/model.onnx"),
        ("dangling", "1/model.onnx (a symlink to nothing)"),
        ("folder", "1/model.onnx"),
    ] {
        let why = reason(key);
        assert!(
            why.contains("no version directory") && why.contains(holds),
            "{key}: {why}"
        );
    }
    let (code, ready) = get(&format!("{base}/health/ready"));
    assert_eq!(code, 503, "{ready}");
    let log = server.log();
    assert!(
        log.lines()
            .any(|l| l.contains("WARN") && l.contains("misnamed") && l.contains("model.onx")),
        "{log}"
    );
    // Once the directories are fixed or gone, readiness follows.
    for dir in ["misnamed", "lettered", "dangling", "folder"] {
        std::fs::remove_dir_all(repo.join(dir)).unwrap();
    }
    let (code, ready) = get(&format!("{base}/health/ready"));
    assert_eq!(code, 200, "{ready}");
}
