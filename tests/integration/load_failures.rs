//! A model whose load fails, or panics inside a dependency, never takes the server down: it
//! stops start-up by default (`exit_on_error`), or is listed as unavailable while the others
//! serve.

use std::process::Command;

use tie_client::Client;

use crate::common::onnx;
use crate::common::{add_version, fails_within, get, root, scratch_dir, TestServer, TEST_CONFIG};

/// A GRU over a window of 8 steps of 4 features (`Reshape → Transpose → GRU → Squeeze →
/// Gemm`, batch dimension symbolic): tract 0.23 panics while building it
/// (`UndeterminedSymbol("N")`).
fn gru_window() -> Vec<u8> {
    let (steps, features, hidden) = (8i64, 4i64, 16i64);
    let zeros = |name: &str, dims: &[i64]| {
        let n: i64 = dims.iter().product();
        onnx::floats(name, dims, &vec![0.1; n as usize])
    };
    let mut gru = onnx::node("GRU", &["seq_t", "W", "R", "B"], "unused");
    gru.output = vec![String::new(), "h".into()];
    gru.attribute
        .push(onnx::int_attribute("hidden_size", hidden));
    let mut transpose = onnx::node("Transpose", &["seq"], "seq_t");
    transpose.attribute.push(tract_onnx::pb::AttributeProto {
        name: "perm".into(),
        r#type: tract_onnx::pb::attribute_proto::AttributeType::Ints as i32,
        ints: vec![1, 0, 2],
        ..Default::default()
    });
    let mut gemm = onnx::node("Gemm", &["last", "fc_w", "fc_b"], "y");
    gemm.attribute.push(onnx::int_attribute("transB", 1));
    onnx::model(
        vec![
            onnx::node("Reshape", &["x", "shape"], "seq"),
            transpose,
            gru,
            onnx::node("Squeeze", &["h", "axes"], "last"),
            gemm,
        ],
        vec![
            onnx::ints("shape", &[3], &[-1, steps, features]),
            zeros("W", &[1, 3 * hidden, features]),
            zeros("R", &[1, 3 * hidden, hidden]),
            zeros("B", &[1, 6 * hidden]),
            onnx::ints("axes", &[1], &[0]),
            zeros("fc_w", &[2, hidden]),
            zeros("fc_b", &[2]),
        ],
        steps * features,
        2,
    )
}

/// A repository with the identity model, the GRU that makes tract panic, and a model whose
/// config is invalid.
fn repository() -> std::path::PathBuf {
    let repo = scratch_dir("load-failures");
    add_version(&repo, "identity", 1, "identity", 1);
    onnx::install(&repo, "gru", &gru_window());
    add_version(&repo, "identity", 1, "badconfig", 1);
    std::fs::write(repo.join("badconfig/config.toml"), "layuot = \"x\"\n").unwrap();
    // An ONNX-ML op no engine runs.
    let mut normalizer = onnx::node("Normalizer", &["x"], "y");
    normalizer.domain = "ai.onnx.ml".into();
    onnx::install(
        &repo,
        "normalizer",
        &onnx::model(vec![normalizer], vec![], 4, 4),
    );
    repo
}

#[test]
fn a_model_that_panics_while_loading_stops_start_up_by_default_with_its_file_named() {
    let repo = repository();
    std::fs::remove_dir_all(repo.join("badconfig")).unwrap();
    std::fs::remove_dir_all(repo.join("normalizer")).unwrap();
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
    let file = repo.join("gru/1/model.onnx");
    assert!(
        stderr.contains("error: model gru version 1")
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
    let gru = entry("gru:1");
    assert_eq!(gru["available"], false, "{gru}");
    assert!(
        gru["not_ready_reason"]
            .as_str()
            .is_some_and(|r| r.contains("panicked") && r.contains("gru/1/model.onnx")),
        "{gru}"
    );
    let bad = entry("badconfig");
    assert!(
        bad["not_ready_reason"]
            .as_str()
            .is_some_and(|r| r.contains("layuot")),
        "{bad}"
    );
    let normalizer = entry("normalizer:1");
    assert!(
        normalizer["not_ready_reason"]
            .as_str()
            .is_some_and(|r| r.contains("op Normalizer of domain ai.onnx.ml")),
        "{normalizer}"
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
        listed.contains(&"gru:1") && listed.contains(&"badconfig"),
        "{ready}"
    );
    // Nothing of the server went down with the panic.
    assert!(server.log().contains("the panic was caught"));
    assert!(client.predict(&[4.0, 3.0, 2.0, 1.0]).is_ok());
}
