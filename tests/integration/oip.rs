//! The Open Inference Protocol (KServe v2) REST API, driven by Triton's own Python client
//! (`tritonclient[http]` from PyPI, installed by the test) against a live `tie serve`.

use std::process::Command;

use serde_json::Value;

use crate::common::{fixture, python_tools, root, scratch_dir, send, TestServer};

/// `tritonclient` as pinned here.
const TRITONCLIENT: &str = "tritonclient[http]==2.73.0";
const TRITONCLIENT_GRPC: &str = "tritonclient[grpc]==2.73.0";

/// Runs `tests/python/<script>` (with `requirement` installed) with `args` and the path of
/// the JSON it writes, which it must write; returns that JSON.
fn run_client(server: &TestServer, requirement: &str, script: &str, args: &[&str]) -> Value {
    let out = scratch_dir("oip-client").join("seen.json");
    let python = python_tools(&[requirement]).join("python");
    let run = Command::new(python)
        .arg(root().join("tests/python").join(script))
        .args(args)
        .arg(&out)
        .output()
        .unwrap();
    assert!(
        run.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&run.stderr),
        server.log()
    );
    serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap()
}

/// The fixture `tests/python` scripts send: mlp64's rows, with onnxruntime's answers.
const FIXTURE: &str = "tests/fixtures/expected/mlp64_v1.json";

/// Asserts `got` (rows of outputs) are the fixture's first `rows` answers.
fn answers_match_the_fixture(got: &Value, rows: usize) {
    let want = fixture("mlp64_v1").outputs;
    let got: Vec<Vec<f32>> = serde_json::from_value(got.clone()).unwrap();
    assert_eq!(got.len(), rows);
    for (g, w) in got.iter().zip(&want) {
        for (a, b) in g.iter().zip(w) {
            assert!((a - b).abs() <= 1e-4 * b.abs().max(1.0), "{a} vs {b}");
        }
    }
}

/// Asserts the client saw, at `key`, an error of `status` whose message says `says`.
fn error(seen: &Value, key: &str, status: &str, says: &str) {
    let e = &seen[key];
    assert_eq!(e["status"], status, "{key}: {e}");
    assert!(e["message"].as_str().unwrap().contains(says), "{key}: {e}");
}

#[test]
fn tritonclient_over_http_infers_with_json_and_binary_tensors() {
    let dir = scratch_dir("oip");
    let token_file = dir.join("token");
    std::fs::write(&token_file, "s3cret\n").unwrap();
    let config = crate::common::TEST_CONFIG.replacen(
        "[server]\n",
        &format!("[server]\napi_token_file = {token_file:?}\n"),
        1,
    );
    let server = TestServer::start_with(&config, &root().join("models"));
    let url = server.http().trim_start_matches("http://").to_string();
    let f = fixture("mlp64_v1");
    let seen = run_client(
        &server,
        TRITONCLIENT,
        "oip_http.py",
        &[
            &url,
            "mlp64",
            &root().join(FIXTURE).to_string_lossy(),
            "s3cret",
        ],
    );
    for key in [
        "live",
        "ready",
        "model_ready",
        "version_ready",
        "ready_after_load",
    ] {
        assert_eq!(seen[key], true, "{key}: {seen}");
    }
    assert_eq!(seen["server"]["name"], "tie");
    let meta = &seen["metadata"];
    assert_eq!(meta["name"], "mlp64");
    assert_eq!(meta["versions"], serde_json::json!(["1"]));
    assert_eq!(meta["inputs"][0]["datatype"], "FP32");
    assert_eq!(meta["inputs"][0]["shape"], serde_json::json!([-1, 64]));
    assert_eq!(meta["outputs"][0]["shape"], serde_json::json!([-1, 1]));
    // Binary and JSON tensors give the fixture's answers (onnxruntime's).
    for binary in ["binary_True", "binary_False"] {
        answers_match_the_fixture(&seen[binary]["outputs"], f.inputs.len());
        let response = &seen[binary]["response"];
        assert_eq!(response["model_name"], "mlp64", "{response}");
        assert_eq!(response["model_version"], "1", "{response}");
        assert_eq!(response["outputs"][0]["shape"], serde_json::json!([8, 1]));
    }
    assert_eq!(seen["binary_True"]["response"]["id"], "binary-True");
    assert!(
        seen["binary_True"]["response"]["outputs"][0]["parameters"]["binary_data_size"]
            .as_u64()
            .is_some_and(|n| n == 8 * 4)
    );
    assert!(seen["binary_False"]["response"]["outputs"][0]["data"].is_array());
    answers_match_the_fixture(&seen["default_outputs"], 1);
    answers_match_the_fixture(&seen["timeout_0"], 1);
    // No outputs named: every output, as bytes (tritonclient's binary_data_output).
    let default = &seen["default_response"]["outputs"][0];
    assert_eq!(default["name"], "score", "{default}");
    assert_eq!(default["parameters"]["binary_data_size"], 4, "{default}");
    let all = seen["all_stats"]["model_stats"].as_array().unwrap();
    assert!(
        all.len() >= 7 && all.iter().any(|m| m["name"] == "mlp64"),
        "{all:?}"
    );
    // Errors in the protocol's form, with tie's statuses.
    error(&seen, "unknown_model", "404", "no-such-model");
    error(&seen, "wrong_shape", "400", "reads [rows, 64]");
    error(
        &seen,
        "wrong_input",
        "400",
        "has no input \"not-the-input\"",
    );
    error(&seen, "load_without_token", "401", "bearer token");
    // Statistics from the monitor: the two 8-row requests at least (the last one's figures
    // may still be with its poller).
    let stats = &seen["stats"]["model_stats"][0];
    assert_eq!(stats["name"], "mlp64");
    assert!(stats["inference_count"].as_u64().unwrap() >= 16, "{stats}");
    assert!(
        stats["inference_stats"]["success"]["ns"].as_u64().unwrap() > 0,
        "{stats}"
    );
    assert!(
        stats["last_inference"].as_u64().unwrap() > 1_700_000_000_000,
        "{stats}"
    );
    let index = seen["index"].as_array().unwrap();
    assert!(
        index
            .iter()
            .any(|m| m["name"] == "mlp64" && m["version"] == "1" && m["state"] == "READY"),
        "{index:?}"
    );
}

#[test]
fn the_protocols_json_form_reads_nested_data_and_refuses_what_does_not_fit() {
    let server = TestServer::start_with(crate::common::TEST_CONFIG, &root().join("models"));
    let base = server.http();
    let f = fixture("mlp64_v1");
    let infer = |body: &Value, extra: &[(&str, &str)]| {
        let agent = crate::common::agent();
        let mut request = agent.post(&format!("{base}/v2/models/mlp64/infer"));
        for (k, v) in extra {
            request = request.header(*k, *v);
        }
        let mut response = request.send(body.to_string().as_bytes()).unwrap();
        let status = response.status().as_u16();
        (status, response.body_mut().read_to_string().unwrap())
    };
    // Nested rows, as a user writes them by hand.
    let body = serde_json::json!({
        "inputs": [{"name": "features", "shape": [2, 64], "datatype": "FP32", "data": [f.inputs[0], f.inputs[1]]}]
    });
    let (code, text) = infer(&body, &[]);
    assert_eq!(code, 200, "{text}");
    let answer: Value = serde_json::from_str(&text).unwrap();
    let data: Vec<f32> = serde_json::from_value(answer["outputs"][0]["data"].clone()).unwrap();
    assert_eq!(data.len(), 2);
    assert!((data[1] - f.outputs[1][0]).abs() <= 1e-4 * f.outputs[1][0].abs().max(1.0));
    // Refused, each with the protocol's error form.
    for (body, says) in [
        (
            serde_json::json!({"inputs": [{"name": "features", "shape": [1, 64], "datatype": "FP64", "data": f.inputs[0]}]}),
            "is FP64; tie's models read FP32",
        ),
        (
            serde_json::json!({"inputs": [{"name": "features", "shape": [2, 64], "datatype": "FP32", "data": f.inputs[0]}]}),
            "expected 128",
        ),
        (
            serde_json::json!({"inputs": [{"name": "features", "shape": [1, 64], "datatype": "FP32", "data": ["x"]}]}),
            "not a number",
        ),
        (serde_json::json!({"inputs": []}), "reads one input"),
        (
            serde_json::json!({"inputs": [{"name": "features", "shape": [1, 64], "datatype": "FP32", "data": f.inputs[0]}], "outputs": [{"name": "nope"}]}),
            "asks for [\"nope\"]",
        ),
    ] {
        let (code, text) = infer(&body, &[]);
        assert_eq!(code, 400, "{text}");
        let e: Value = serde_json::from_str(&text).unwrap();
        assert!(e["error"].as_str().unwrap().contains(says), "{text}");
    }
    // A header length past the body.
    let (code, text) = infer(&body, &[("Inference-Header-Content-Length", "100000")]);
    assert_eq!(code, 400, "{text}");
    assert!(text.contains("inference-header-content-length"), "{text}");
    // Metadata of a version that is not loaded, and readiness.
    assert_eq!(
        send("GET", &format!("{base}/v2/models/mlp64/versions/7"), None).0,
        404
    );
    assert_eq!(
        send(
            "GET",
            &format!("{base}/v2/models/mlp64/versions/1/ready"),
            None
        )
        .0,
        200
    );
    assert_eq!(send("GET", &format!("{base}/v2/health/live"), None).0, 200);
    // A route tie does not serve answers in the protocol's form too.
    let (code, text) = send("GET", &format!("{base}/v2/models/mlp64/config"), None);
    assert_eq!(code, 404, "{text}");
    let e: Value = serde_json::from_str(&text).unwrap();
    assert!(
        e["error"].as_str().is_some_and(|m| m.contains("no route")),
        "{text}"
    );
}

#[test]
fn tritonclient_over_grpc_infers_with_raw_tensors() {
    let config = crate::common::TEST_CONFIG.replacen(
        "[server]\n",
        "[server]\ngrpc_addr = \"127.0.0.1:0\"\n",
        1,
    );
    let server = TestServer::start_with(&config, &root().join("models"));
    let seen = run_client(
        &server,
        TRITONCLIENT_GRPC,
        "oip_grpc.py",
        &[
            &server.grpc(),
            "mlp64",
            &root().join(FIXTURE).to_string_lossy(),
        ],
    );
    for key in ["live", "ready", "model_ready", "version_ready"] {
        assert_eq!(seen[key], true, "{key}: {seen}");
    }
    assert_eq!(seen["server"]["name"], "tie");
    assert_eq!(
        seen["metadata"]["inputs"][0]["shape"],
        serde_json::json!(["-1", "64"])
    );
    answers_match_the_fixture(&seen["outputs"], 8);
    answers_match_the_fixture(&seen["one_row"], 1);
    let response = &seen["response"];
    assert_eq!(response["model_name"], "mlp64", "{response}");
    assert_eq!(response["model_version"], "1", "{response}");
    assert_eq!(response["id"], "grpc-1", "{response}");
    // Errors as gRPC statuses, with tie's messages.
    error(
        &seen,
        "unknown_model",
        "StatusCode.NOT_FOUND",
        "no-such-model",
    );
    error(
        &seen,
        "unknown_model_ready",
        "StatusCode.NOT_FOUND",
        "no-such-model",
    );
    error(
        &seen,
        "wrong_shape",
        "StatusCode.INVALID_ARGUMENT",
        "reads [rows, 64]",
    );
    // Counted under their gRPC paths.
    let (_, metrics) = send("GET", &format!("{}/metrics", server.http()), None);
    assert!(
        metrics.contains(
            "tie_http_responses_total{route=\"/inference.GRPCInferenceService/ModelInfer\",code=\"200\"} 2"
        ),
        "{metrics}"
    );
}

#[test]
fn with_the_token_everywhere_grpc_needs_it_too() {
    let dir = scratch_dir("oip-grpc-token");
    let token_file = dir.join("token");
    std::fs::write(&token_file, "s3cret\n").unwrap();
    let config = crate::common::TEST_CONFIG.replacen(
        "[server]\n",
        &format!(
            "[server]\ngrpc_addr = \"127.0.0.1:0\"\napi_token_file = {token_file:?}\nhttp_token_everywhere = true\n"
        ),
        1,
    );
    let server = TestServer::start_with(&config, &root().join("models"));
    let python = python_tools(&[TRITONCLIENT_GRPC]).join("python");
    let script = r#"
import sys
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException
client = grpcclient.InferenceServerClient(url=sys.argv[1])
try:
    client.is_server_live()
    print("live without the token")
except InferenceServerException as e:
    print(e.status())
print(client.is_server_live(headers={"authorization": "Bearer s3cret"}))
"#;
    let run = Command::new(python)
        .args(["-c", script, server.grpc().as_str()])
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&run.stdout);
    assert!(
        run.status.success(),
        "{out}{}",
        String::from_utf8_lossy(&run.stderr)
    );
    assert_eq!(
        out.lines().collect::<Vec<_>>(),
        ["StatusCode.UNAUTHENTICATED", "True"],
        "{out}"
    );
}
