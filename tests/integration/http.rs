//! The HTTP control plane of a real `tie serve`: the spec's endpoints, every error status,
//! Prometheus output, the OpenAPI document, alerts, interval logs and health checks.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::common::{eventually, fixture, get, post, root, send, TestServer};
use serde_json::{json, Value};
use tie_client::{Client, Status};

/// POSTs headers announcing a 9 MB body, and only its first bytes: the server answers at once
/// (a client that sent the whole body could see its connection reset before the answer).
fn oversized_post(url: &str) -> (u16, Value) {
    let rest = url.strip_prefix("http://").unwrap();
    let (host, path) = rest.split_at(rest.find('/').unwrap());
    let mut stream = std::net::TcpStream::connect(host).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    write!(
        stream,
        "POST {path} HTTP/1.1\r\nhost: {host}\r\ncontent-type: application/json\r\n\
         content-length: 9000000\r\nconnection: close\r\n\r\n[1.0,"
    )
    .unwrap();
    let mut response = String::new();
    let _ = stream.read_to_string(&mut response);
    let code = response.split_whitespace().nth(1).unwrap().parse().unwrap();
    let body = response.split_once("\r\n\r\n").unwrap().1;
    (
        code,
        serde_json::from_str(body).unwrap_or_else(|_| panic!("{response}")),
    )
}

fn request(model: &str, version: Option<&str>, rows: &[Vec<f32>]) -> Value {
    crate::common::inference_request(&format!("r-{model}"), model, version, rows, Value::Null)
}

fn metrics(base: &str) -> prometheus_parse::Scrape {
    let (code, text) = send("GET", &format!("{base}/metrics"), None);
    assert_eq!(code, 200);
    prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_string())))
        .unwrap_or_else(|e| panic!("unparsable metrics: {e}\n{text}"))
}

/// The value of the sample of `name` whose labels include `labels`.
fn sample(scrape: &prometheus_parse::Scrape, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    scrape
        .samples
        .iter()
        .find(|s| s.metric == name && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
        .map(|s| match s.value {
            prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Untyped(v) => v,
            _ => f64::NAN,
        })
}

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() <= 1e-4 * b.abs().max(1.0)
}

const BASE: &str = r#"
[server]
idle = "spin-park"
idle_spin_us = 50
idle_park_us = 20
"#;

const API: &str = "/api/v1/internal/inference";

#[test]
fn http_api_serves_predictions_and_maps_every_error() {
    let config = format!(
        "{BASE}fault_injection = true
[model_deployment]
warmup_requests = 2
profile_iterations = 3
health_check_interval_sec = 3600
[performance_thresholds]
min_throughput_rps = 0.0
"
    );
    let server = TestServer::start_with(&config, &root().join("models"));
    let base = server.http();
    let api = format!("{base}{API}");
    assert_eq!(get(&format!("{base}/health/live")).0, 200);
    assert!(
        eventually(Duration::from_secs(30), || get(&format!(
            "{base}/health/ready"
        ))
        .0 == 200),
        "never ready: {:?}\n{}",
        get(&format!("{base}/health/ready")),
        server.log()
    );
    let errors: std::cell::RefCell<BTreeMap<&str, f64>> = Default::default();
    let expect_error = |code: u16, kind: &'static str, (got, body): (u16, Value)| {
        assert_eq!(
            (got, body["error"]["kind"].as_str()),
            (code, Some(kind)),
            "{body}"
        );
        assert!(
            body["message"].as_str().is_some_and(|m| !m.is_empty()),
            "{body}"
        );
        *errors.borrow_mut().entry(kind).or_default() += 1.0;
        body
    };

    // Predictions match the committed fixtures, through the rings and the batcher.
    let mlp = fixture("mlp64_v1");
    let (code, body) = post(
        &format!("{api}/predict"),
        &request("mlp64", None, &mlp.inputs[..1]),
    );
    assert_eq!(code, 200, "{body}");
    assert_eq!(body["request_id"], "r-mlp64");
    assert!(close(
        body["predictions"][0]["value"].as_f64().unwrap(),
        f64::from(mlp.outputs[0][0])
    ));
    assert_eq!(body["model_metadata"]["model_version"], "1");
    assert_eq!(body["model_metadata"]["input_shape"], json!([1, 64]));
    assert!(body["performance_metrics"]["inference_time_ms"]
        .as_f64()
        .is_some());
    assert!(body["error"].is_null());
    let multi = fixture("multi_v2");
    let (code, body) = post(
        &format!("{api}/predict"),
        &request("multi", Some("2"), &multi.inputs[..3]),
    );
    assert_eq!(code, 200, "{body}");
    let values: Vec<f64> = body["predictions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["value"].as_f64().unwrap())
        .collect();
    let expected: Vec<f64> = multi.outputs[..3]
        .concat()
        .into_iter()
        .map(f64::from)
        .collect();
    assert_eq!(values.len(), expected.len());
    assert!(
        values.iter().zip(&expected).all(|(a, b)| close(*a, *b)),
        "{values:?} {expected:?}"
    );
    assert_eq!(body["model_metadata"]["output_shape"], json!([3, 4]));
    // Row by row, output by output, each numbered.
    let indices: Vec<(u64, u64)> = body["predictions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| (p["row"].as_u64().unwrap(), p["output"].as_u64().unwrap()))
        .collect();
    let expected: Vec<(u64, u64)> = (0..3).flat_map(|r| (0..4).map(move |o| (r, o))).collect();
    assert_eq!(indices, expected);
    let multi1 = fixture("multi_v1");
    let (code, body) = post(
        &format!("{api}/predict"),
        &request("multi", Some("1"), &multi1.inputs[..1]),
    );
    assert_eq!(code, 200, "{body}");
    assert!(close(
        body["predictions"][0]["value"].as_f64().unwrap(),
        f64::from(multi1.outputs[0][0])
    ));

    // batch-predict answers every request, failed ones with their error.
    let (code, body) = post(
        &format!("{api}/batch-predict"),
        &json!([
            request("mlp64", None, &mlp.inputs[1..2]),
            request("nope", None, &mlp.inputs[..1]),
            request("mlp64", None, &[vec![1.0, 2.0, 3.0]]),
        ]),
    );
    assert_eq!(code, 200, "{body}");
    let answers = body.as_array().unwrap();
    assert_eq!(answers.len(), 3);
    assert!(answers[0]["error"].is_null());
    assert!(close(
        answers[0]["predictions"][0]["value"].as_f64().unwrap(),
        f64::from(mlp.outputs[1][0])
    ));
    assert_eq!(answers[1]["error"]["kind"], "ModelNotFound");
    assert_eq!(answers[2]["error"]["kind"], "InvalidInputShape");
    *errors.borrow_mut().entry("ModelNotFound").or_default() += 1.0;
    *errors.borrow_mut().entry("InvalidInputShape").or_default() += 1.0;

    // Every error has its status and JSON body; an unknown model's lists those served.
    let predict = format!("{api}/predict");
    let body = expect_error(
        404,
        "ModelNotFound",
        post(&predict, &request("nope", None, &mlp.inputs[..1])),
    );
    assert!(
        body["error"]["served"]
            .as_array()
            .is_some_and(|s| s.iter().any(|m| m == "mlp64:1"))
            && body["message"]
                .as_str()
                .is_some_and(|m| m.contains("served: ") && m.contains("mlp64:1")),
        "{body}"
    );
    // A body that does not say it is JSON.
    let response = crate::common::agent()
        .post(&predict)
        .header("content-type", "text/plain")
        .send(serde_json::to_vec(&request("mlp64", None, &mlp.inputs[..1])).unwrap())
        .unwrap();
    assert_eq!(response.status().as_u16(), 415);
    let text = response.into_body().read_to_string().unwrap();
    let body: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(body["error"]["kind"], "UnsupportedMediaType", "{body}");
    *errors
        .borrow_mut()
        .entry("UnsupportedMediaType")
        .or_default() += 1.0;
    expect_error(
        404,
        "ModelNotFound",
        post(&predict, &request("mlp64", Some("99"), &mlp.inputs[..1])),
    );
    // Neither a version number nor one of the model's labels.
    expect_error(
        404,
        "ModelNotFound",
        post(&predict, &request("mlp64", Some("x"), &mlp.inputs[..1])),
    );
    let body = expect_error(
        400,
        "InvalidInputShape",
        post(&predict, &request("mlp64", None, &[vec![1.0; 3]])),
    );
    assert_eq!(
        (
            body["error"]["expected"].as_u64(),
            body["error"]["actual"].as_u64()
        ),
        (Some(64), Some(3))
    );
    let mut r = request("mlp64", None, &mlp.inputs[..1]);
    r["batch_size"] = json!(0);
    expect_error(400, "InvalidRequest", post(&predict, &r));
    r["batch_size"] = json!(1_000_000_000u64);
    expect_error(400, "InvalidRequest", post(&predict, &r));
    r["batch_size"] = json!(2);
    expect_error(400, "InvalidInputShape", post(&predict, &r));
    r["batch_size"] = json!("one");
    expect_error(400, "InvalidRequest", post(&predict, &r));
    r["batch_size"] = json!(5000);
    expect_error(400, "InvalidRequest", post(&predict, &r));
    let mut r = request("mlp64", None, &mlp.inputs[..1]);
    r["timeout_ms"] = json!(u64::MAX);
    expect_error(400, "InvalidRequest", post(&predict, &r));
    let (code, body) = get(&predict);
    assert_eq!(
        (code, body["error"]["kind"].as_str()),
        (405, Some("MethodNotAllowed"))
    );
    let mut r = request("mlp64", None, &mlp.inputs[..1]);
    r["feature_names"] = json!(["a"]);
    expect_error(400, "InvalidRequest", post(&predict, &r));
    let mut r = request("mlp64", None, &mlp.inputs[..1]);
    r["strategy_context"] = json!({"strategy_name": "s"});
    expect_error(400, "InvalidRequest", post(&predict, &r));
    let (code, text) = send(
        "POST",
        &predict,
        Some(br#"{"request_id": "x", "input_features": [NaN"#),
    );
    expect_error(
        400,
        "InvalidRequest",
        (code, serde_json::from_str(&text).unwrap()),
    );
    expect_error(413, "PayloadTooLarge", oversized_post(&predict));
    expect_error(
        404,
        "ModelNotFound",
        get(&format!("{api}/performance/nope:1")),
    );
    let (code, body) = get(&format!("{api}/no/such/route"));
    assert_eq!(
        (code, body["error"]["kind"].as_str()),
        (404, Some("NotFound"))
    );

    // An injected backend failure answers 500 and marks the model not ready; once the fault is
    // cleared, the next health check (within a second) makes it ready again.
    let fault = format!("{api}/models/identity:1/fault");
    assert_eq!(post(&fault, &json!({"mode": "fail"})).0, 200);
    let id = fixture("identity_v1");
    expect_error(
        500,
        "ExecutionFailed",
        post(&predict, &request("identity", None, &id.inputs[..1])),
    );
    expect_error(
        400,
        "InvalidRequest",
        post(&fault, &json!({"mode": "explode"})),
    );
    assert_eq!(post(&fault, &json!({"mode": "none"})).0, 200);
    assert!(eventually(Duration::from_secs(10), || get(&format!(
        "{base}/health/ready"
    ))
    .0 == 200));
    let (code, body) = post(&predict, &request("identity", None, &id.inputs[..2]));
    assert_eq!(code, 200, "{body}");

    // The figures: HTTP rows went through the model's lane; each error counted once.
    let (code, perf) = get(&format!("{api}/performance/mlp64:1"));
    assert_eq!(code, 200, "{perf}");
    assert!(eventually(Duration::from_secs(5), || get(&format!(
        "{api}/performance/mlp64"
    ))
    .1["successful_requests"]
        .as_u64()
        == Some(2)));
    let (_, perf) = get(&format!("{api}/performance/mlp64"));
    assert_eq!(perf["model_key"], "mlp64:1");
    assert_eq!(perf["stages"]["compute"]["count"], 2);
    // A model never asked: no stage measured, none reported (not a row of zeros).
    let (code, idle) = get(&format!("{api}/performance/bnorm:1"));
    assert_eq!(code, 200, "{idle}");
    assert_eq!(idle["stages"], json!({}), "{idle}");
    assert!(idle["p50_latency_ms"].is_null(), "{idle}");
    assert!(perf["p99_latency_ms"].as_f64().unwrap() > 0.0);
    // Device memory is the model's on a GPU, absent on the CPU (never a made-up figure).
    let (_, loaded) = get(&format!("{api}/models/loaded"));
    let device = loaded
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["model_key"] == "mlp64:1")
        .unwrap()["inference_device"]
        .as_str()
        .unwrap()
        .to_string();
    if device.starts_with("cuda") {
        assert!(perf["memory_usage_mb"].as_f64().unwrap() > 0.0, "{perf}");
    } else {
        assert!(perf["gpu_utilization"].is_null() && perf["memory_usage_mb"].is_null());
    }
    // The last requests were identity's: once they are in, so is everything before.
    let identity = || get(&format!("{api}/performance/identity:1")).1;
    assert!(
        eventually(Duration::from_secs(5), || identity()["successful_requests"]
            == 2),
        "{}",
        identity()
    );
    assert_eq!(identity()["errors_by_kind"]["ExecutionFailed"], 1);
    let scrape = metrics(&base);
    // Label values in snake_case: `ModelNotFound` is `model_not_found`.
    assert!(errors.borrow().contains_key("ModelNotFound"));
    for (kind, n) in errors.borrow().iter() {
        let label = heck::ToSnakeCase::to_snake_case(*kind);
        assert_eq!(
            sample(&scrape, "tie_http_errors_total", &[("kind", &label)]),
            Some(*n),
            "errors of kind {kind}"
        );
    }
    assert!(sample(
        &scrape,
        "tie_http_errors_total",
        &[("kind", "model_not_found")]
    )
    .is_some());
    // Model and version are labels of their own.
    let mlp = [("model", "mlp64"), ("version", "1")];
    assert_eq!(sample(&scrape, "tie_requests_total", &mlp), Some(2.0));
    assert_eq!(
        sample(
            &scrape,
            "tie_responses_total",
            &[
                ("model", "identity"),
                ("version", "1"),
                ("status", "execution_failed")
            ]
        ),
        Some(1.0)
    );
    assert_eq!(sample(&scrape, "tie_model_ready", &mlp), Some(1.0));
    // Latency is a histogram with buckets: cumulative, ending with every request at +Inf.
    let total = scrape
        .samples
        .iter()
        .find(|s| {
            s.metric == "tie_latency_seconds"
                && s.labels.get("model") == Some("mlp64")
                && s.labels.get("stage") == Some("total")
        })
        .expect("tie_latency_seconds of mlp64's total stage");
    let prometheus_parse::Value::Histogram(buckets) = &total.value else {
        panic!("tie_latency_seconds is not a histogram: {:?}", total.value)
    };
    assert!(buckets.len() > 20, "{buckets:?}");
    assert!(buckets
        .windows(2)
        .all(|w| w[0].less_than < w[1].less_than && w[0].count <= w[1].count));
    assert_eq!(buckets.first().unwrap().less_than, 5e-7);
    let last = buckets.last().unwrap();
    assert_eq!((last.less_than, last.count), (f64::INFINITY, 2.0));
    assert_eq!(
        sample(
            &scrape,
            "tie_latency_seconds_count",
            &[("model", "mlp64"), ("stage", "total")]
        ),
        Some(2.0)
    );
    // Rates are the counters' (`rate()`), `up` is Prometheus's own, and the process is
    // described by the standard `process_*` figures.
    for gone in [
        "tie_up",
        "tie_throughput_rps",
        "tie_error_rate",
        "tie_uptime_seconds",
    ] {
        assert!(
            !scrape.samples.iter().any(|s| s.metric == gone),
            "{gone} is still exposed"
        );
    }
    assert!(sample(&scrape, "process_resident_memory_bytes", &[]).is_some_and(|v| v > 1e6));
    assert!(sample(&scrape, "process_cpu_seconds_total", &[]).is_some_and(|v| v > 0.0));
    assert!(sample(&scrape, "process_start_time_seconds", &[]).is_some_and(|v| v > 1.7e9));
    assert!(sample(&scrape, "process_open_fds", &[]).is_some_and(|v| v > 2.0));
    assert_eq!(
        sample(
            &scrape,
            "tie_http_responses_total",
            &[
                ("route", "/api/v1/internal/inference/predict"),
                ("code", "200")
            ]
        ),
        Some(4.0)
    );

    // The loaded models, and the OpenAPI document with every route.
    let (code, loaded) = get(&format!("{api}/models/loaded"));
    assert_eq!(code, 200);
    let loaded = loaded.as_array().unwrap();
    let m = loaded.iter().find(|m| m["model_key"] == "mlp64:1").unwrap();
    assert_eq!(m["feature_names"].as_array().unwrap().len(), 64);
    assert_eq!(m["input_specs"][0]["shape"], json!([-1, 64]));
    assert_eq!(m["ready"], true);
    assert!(m["performance_profile"]["p50_inference_time_ms"]
        .as_f64()
        .is_some());
    assert!(loaded
        .iter()
        .any(|m| m["model_key"] == "multi:1" && m["is_default"] == false));
    let (code, text) = send("GET", &format!("{api}/openapi.json"), None);
    assert_eq!(code, 200);
    let doc: utoipa::openapi::OpenApi =
        serde_json::from_str(&text).expect("a valid OpenAPI document");
    for path in [
        "/api/v1/internal/inference/predict",
        "/api/v1/internal/inference/batch-predict",
        "/api/v1/internal/inference/models/loaded",
        "/api/v1/internal/inference/performance/{model_key}",
        "/api/v1/internal/inference/models/{model_key}/fault",
        "/api/v1/internal/inference/openapi.json",
        "/health/live",
        "/health/ready",
        "/metrics",
    ] {
        assert!(
            doc.paths.paths.contains_key(path),
            "{path} missing from the OpenAPI document"
        );
    }
    let schemas = &doc.components.as_ref().unwrap().schemas;
    for s in [
        "InferenceRequest",
        "InferenceResponse",
        "ModelPerformanceMetrics",
        "LoadedModelInfo",
        "ErrorBody",
    ] {
        assert!(schemas.contains_key(s), "schema {s} missing");
    }
    // A real validator accepts the document.
    let file = crate::common::scratch_dir("openapi").join("openapi.json");
    std::fs::write(&file, &text).unwrap();
    let validator = crate::common::python_tools(&["openapi-spec-validator==0.9.0"])
        .join("openapi-spec-validator");
    let out = std::process::Command::new(&validator)
        .arg(&file)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "openapi-spec-validator: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // Every operation is tagged, with a one-line summary; the state-changing ones name the
    // bearer scheme; `version` of a load is a query parameter; the request's batch size
    // starts at 1 and the request has an example; no text speaks of a spec the user has not.
    let raw: Value = serde_json::from_str(&text).unwrap();
    for (path, ops) in raw["paths"].as_object().unwrap() {
        for (method, op) in ops.as_object().unwrap() {
            assert!(
                op["tags"].as_array().is_some_and(|t| !t.is_empty()),
                "{method} {path}"
            );
            let summary = op["summary"].as_str().unwrap_or_default();
            assert!(
                !summary.is_empty() && !summary.contains('\n'),
                "{method} {path}: {summary:?}"
            );
            let protected = method == "post"
                && ["/load", "/unload", "/reload", "/fault"]
                    .iter()
                    .any(|end| path.ends_with(end));
            assert_eq!(
                op["security"] == json!([{"bearer": []}]),
                protected,
                "{method} {path}"
            );
        }
    }
    assert_eq!(
        raw["components"]["securitySchemes"]["bearer"]["scheme"],
        "bearer"
    );
    let load = &raw["paths"]["/api/v1/internal/inference/models/{model_name}/load"]["post"];
    let version = load["parameters"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "version");
    assert_eq!(version.unwrap()["in"], "query");
    let request = &raw["components"]["schemas"]["InferenceRequest"];
    assert_eq!(request["properties"]["batch_size"]["minimum"], 1);
    assert!(request["example"].is_object());
    assert!(
        !text.to_lowercase().contains("spec's"),
        "the document speaks of a spec"
    );
}

#[test]
fn deadlines_full_queues_and_disabled_faults_get_504_429_and_403() {
    let config = format!(
        "{BASE}
[model_deployment]
warmup_requests = 2
profile_iterations = 0
[batch_processing]
batch_timeout_us = 300000
max_queue_size = 4
"
    );
    let server = TestServer::start_with(&config, &root().join("models"));
    let api = format!("{}{API}", server.http());
    let id = fixture("identity_v1");
    let mut r = request("identity", None, &id.inputs[..1]);
    r["timeout_ms"] = json!(0);
    let (code, body) = post(&format!("{api}/predict"), &r);
    assert_eq!(
        (code, body["error"]["kind"].as_str()),
        (504, Some("Timeout")),
        "{body}"
    );
    let rows: Vec<Vec<f32>> = (0..16)
        .map(|i| id.inputs[i % id.inputs.len()].clone())
        .collect();
    let (code, body) = post(&format!("{api}/predict"), &request("identity", None, &rows));
    assert_eq!(
        (code, body["error"]["kind"].as_str()),
        (429, Some("QueueFull")),
        "{body}"
    );
    let (code, body) = post(
        &format!("{api}/models/identity/fault"),
        &json!({"mode": "fail"}),
    );
    assert_eq!(
        (code, body["error"]["kind"].as_str()),
        (403, Some("Forbidden")),
        "{body}"
    );
    let perf = || get(&format!("{api}/performance/identity")).1;
    assert!(
        eventually(Duration::from_secs(5), || {
            let p = perf();
            p["timeouts"] == 1 && p["rejections"] == 12 && p["successful_requests"] == 4
        }),
        "{}",
        perf()
    );
}

/// A one-shot HTTP receiver: the bodies of the POSTs it got.
fn webhook_receiver() -> (String, Arc<Mutex<Vec<String>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/alerts", listener.local_addr().unwrap());
    let bodies = Arc::new(Mutex::new(Vec::new()));
    let got = bodies.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut length = 0;
            loop {
                let mut line = String::new();
                if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                    break;
                }
                if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                    length = v.trim().parse().unwrap_or(0);
                }
            }
            let mut body = vec![0; length];
            let _ = reader.read_exact(&mut body);
            got.lock()
                .unwrap()
                .push(String::from_utf8_lossy(&body).into_owned());
            let _ = stream
                .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\nconnection: close\r\n\r\n");
        }
    });
    (url, bodies)
}

#[test]
fn alerts_interval_logs_and_canary_health_checks() {
    let (webhook, received) = webhook_receiver();
    let dir = crate::common::scratch_dir("hlog");
    let config = format!(
        "{BASE}fault_injection = true
[model_deployment]
warmup_requests = 2
profile_iterations = 0
health_check_interval_sec = 1
[monitoring]
interval_ms = 100
hlog_dir = \"{}\"
alert_webhook = \"{webhook}\"
[performance_thresholds]
max_latency_ms = 0.000001
max_error_rate = 1.0
min_throughput_rps = 0.0
min_gpu_utilization = 0.0
",
        dir.display()
    );
    let server = TestServer::start_with(&config, &root().join("models"));
    let base = server.http();
    let api = format!("{base}{API}");
    let mlp = fixture("mlp64_v1");
    // Traffic over several monitor intervals: the latency threshold (1 ns) is crossed once.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let traffic = {
        let (stop, inputs, options) = (stop.clone(), mlp.inputs.clone(), server.options());
        std::thread::spawn(move || {
            let mut client = Client::connect("test", "mlp64", options).unwrap();
            let mut sent = 0u64;
            while sent < 100 || !stop.load(std::sync::atomic::Ordering::Relaxed) {
                client
                    .predict(&inputs[sent as usize % inputs.len()])
                    .unwrap();
                sent += 1;
                std::thread::sleep(Duration::from_millis(3));
            }
            sent
        })
    };
    let events = |state: &str| {
        received
            .lock()
            .unwrap()
            .iter()
            .filter(|b| {
                b.contains(&format!("\"{state}\""))
                    && b.contains("\"latency\"")
                    && b.contains("mlp64:1")
            })
            .count()
    };
    assert!(
        eventually(Duration::from_secs(5), || events("raised") == 1),
        "webhook got {:?}\n{}",
        received.lock().unwrap(),
        server.log()
    );
    // While the traffic goes on, the alert stays raised: one event, one warning.
    std::thread::sleep(Duration::from_millis(300));
    let scrape = metrics(&base);
    assert_eq!(
        sample(
            &scrape,
            "tie_alert",
            &[("model", "mlp64"), ("kind", "latency")]
        ),
        Some(1.0)
    );
    assert_eq!(
        sample(
            &scrape,
            "tie_alert",
            &[("model", "mlp64"), ("kind", "error_rate")]
        ),
        Some(0.0)
    );
    let (_, perf) = get(&format!("{api}/performance/mlp64:1"));
    assert_eq!(perf["alerts"][0]["kind"], "latency", "{perf}");
    assert_eq!(
        received.lock().unwrap().len(),
        1,
        "{:?}",
        received.lock().unwrap()
    );
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let sent = traffic.join().unwrap();
    // Once the model is quiet for STALE_INTERVALS, the alert clears (a quiet model is not a
    // slow one).
    assert!(
        eventually(Duration::from_secs(5), || events("cleared") == 1),
        "webhook got {:?}",
        received.lock().unwrap()
    );
    assert_eq!(
        received.lock().unwrap().len(),
        2,
        "{:?}",
        received.lock().unwrap()
    );
    let log = server.log();
    assert_eq!(log.matches("performance alert raised").count(), 1, "{log}");
    assert_eq!(log.matches("performance alert cleared").count(), 1, "{log}");
    let scrape = metrics(&base);
    assert_eq!(
        sample(
            &scrape,
            "tie_alert",
            &[("model", "mlp64"), ("kind", "latency")]
        ),
        Some(0.0)
    );
    assert_eq!(
        sample(&scrape, "tie_requests_total", &[("model", "mlp64")]),
        Some(sent as f64)
    );
    // Each frame reports the round trip of the response before it.
    assert_eq!(
        sample(
            &scrape,
            "tie_latency_seconds_count",
            &[("model", "mlp64"), ("stage", "end_to_end")]
        ),
        Some(sent as f64 - 1.0)
    );
    let (_, perf) = get(&format!("{api}/performance/mlp64:1"));
    assert_eq!(perf["total_requests"], sent);
    assert_eq!(perf["accepted_requests"], sent);

    // The interval log holds every request, and `tie report` reads it.
    let hlog = dir.join("mlp64.v1.hlog");
    let report = || {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_tie"))
            .arg("report")
            .arg(&hlog)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        (
            out.status.success(),
            text + &String::from_utf8_lossy(&out.stderr),
        )
    };
    let count_of = |text: &str, tag: &str| -> Option<u64> {
        text.lines()
            .find(|l| l.split_whitespace().next() == Some(tag))?
            .split_whitespace()
            .nth(1)?
            .parse()
            .ok()
    };
    assert!(
        eventually(Duration::from_secs(5), || count_of(&report().1, "total")
            == Some(sent)),
        "{:?}",
        report()
    );
    let (ok, text) = report();
    assert!(ok, "{text}");
    assert_eq!(count_of(&text, "end_to_end"), Some(sent - 1), "{text}");
    assert!(text.contains("total percentile distribution"), "{text}");
    // Every model's log at once: the idle models' logs have no interval and are skipped with
    // a note, the rest reported.
    let all: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "hlog"))
        .collect();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_tie"))
        .arg("report")
        .args(&all)
        .arg("--summary")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains("no interval in the log") && stderr.contains("skipped"),
        "{stderr}"
    );
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("mlp64.v1.hlog"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );

    // A canary that no longer matches turns the model not ready, and back.
    let mut client = Client::connect("test", "mlp64", server.options()).unwrap();
    let ready = || get(&format!("{base}/health/ready"));
    assert_eq!(ready().0, 200);
    assert_eq!(
        post(
            &format!("{api}/models/mlp64/fault"),
            &json!({"mode": "corrupt"})
        )
        .0,
        200
    );
    assert!(
        eventually(Duration::from_secs(5), || ready().0 == 503),
        "{:?}",
        ready()
    );
    let (_, report) = ready();
    let m = report["models"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["model_key"] == "mlp64:1")
        .unwrap()
        .clone();
    assert_eq!(m["ready"], false);
    assert!(m["reason"].as_str().unwrap().contains("canary"), "{m}");
    let refused = client.predict(&mlp.inputs[0]).unwrap_err();
    assert!(
        matches!(&refused, tie_client::PredictError::Server(e) if e.status == Status::NOT_READY),
        "{refused:?}"
    );
    let (code, body) = post(
        &format!("{api}/predict"),
        &request("mlp64", None, &mlp.inputs[..1]),
    );
    assert_eq!(
        (code, body["error"]["kind"].as_str()),
        (503, Some("NotReady")),
        "{body}"
    );
    assert_eq!(
        sample(&metrics(&base), "tie_model_ready", &[("model", "mlp64")]),
        Some(0.0)
    );
    assert_eq!(
        post(
            &format!("{api}/models/mlp64/fault"),
            &json!({"mode": "none"})
        )
        .0,
        200
    );
    assert!(
        eventually(Duration::from_secs(5), || ready().0 == 200),
        "{:?}",
        ready()
    );
    let p = client.predict(&mlp.inputs[0]).unwrap();
    assert!(close(
        f64::from(p.outputs()[0]),
        f64::from(mlp.outputs[0][0])
    ));
    let log = server.log();
    assert_eq!(log.matches("health check failed").count(), 1, "{log}");
    assert_eq!(log.matches("model ready again").count(), 1, "{log}");
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn an_idle_server_raises_no_throughput_alert_and_logs_figures_as_written() {
    // Default thresholds but latency's, which every request crosses.
    let config = format!(
        "{}[monitoring]\ninterval_ms = 100\n[performance_thresholds]\nmax_latency_ms = 0.0001\n",
        crate::common::TEST_CONFIG
    );
    let server = TestServer::start_with(&config, &root().join("models"));
    let mlp = fixture("mlp64_v1");
    let mut client = Client::connect("test", "mlp64", server.options()).unwrap();
    for row in &mlp.inputs[..3] {
        client.predict(row).unwrap();
    }
    assert!(
        eventually(Duration::from_secs(5), || server
            .log()
            .contains("performance alert raised")),
        "{}",
        server.log()
    );
    // A few requests a second are no alert: throughput alerts are off unless configured.
    std::thread::sleep(Duration::from_millis(300));
    let log = server.log();
    assert!(!log.contains("alert=\"throughput\""), "{log}");
    // The threshold as configured (not the f32's 0.00009999999747378752), load times in
    // hundredths of a millisecond.
    assert!(
        log.split_whitespace().any(|t| t == "threshold=0.0001"),
        "{log}"
    );
    let loads: Vec<&str> = log
        .split("load_ms=")
        .skip(1)
        .map(|rest| rest.split_whitespace().next().unwrap())
        .collect();
    assert!(!loads.is_empty(), "{log}");
    for ms in loads {
        let decimals = ms.split('.').nth(1).map_or(0, str::len);
        assert!(decimals <= 2, "load_ms={ms}");
    }
}
