//! Models as scikit-learn, LightGBM and XGBoost export them (the fixtures of
//! `models/generate_exported.py`): tree regressors and classifiers (2 and 5 classes, with and
//! without ZipMap) and the libraries' own files on the tree engine, scaler pipelines on the
//! MLP path, linear classifiers and preprocessing pipelines (Imputer, Normalizer, Binarizer,
//! ArrayFeatureExtractor) on tract, compared with onnxruntime's answers (Booster.predict's for the native files, and
//! the library's own predict) through the ring client, `tie predict` and HTTP; and window
//! models as PyTorch exports them (`models/generate_sequence.py`: GRU, LSTM and RNN, unrolled
//! for tract; Conv1d with LayerNormalization; attention), compared with onnxruntime.

use serde_json::Value;
use tie_client::{Client, ConnectOptions, Priority};

use crate::common::{get, inference_request, post, root, TestServer, TEST_CONFIG};

/// A fixture: rows (`None` for NaN) with the oracle's and the library's answers.
pub(crate) struct Fixture {
    pub model: String,
    pub inputs: Vec<Vec<f32>>,
    /// `onnxruntime`, or `Booster.predict` for a native file.
    pub oracle: String,
    pub expected: Vec<Vec<f32>>,
    library: Vec<Option<Vec<f32>>>,
}

fn number(v: &Value) -> f32 {
    v.as_f64().map_or(f32::NAN, |x| x as f32)
}

pub(crate) fn fixtures() -> Vec<Fixture> {
    let all = fixtures_in("exported");
    assert!(all.len() >= 16, "{}", all.len());
    all
}

/// The fixtures of `tests/fixtures/<set>`.
fn fixtures_in(set: &str) -> Vec<Fixture> {
    let dir = root().join("tests/fixtures").join(set);
    let mut names: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .filter_map(|e| {
            let p = e.unwrap().path();
            (p.extension()? == "json").then(|| p.file_stem().unwrap().to_string_lossy().into())
        })
        .collect();
    names.sort();
    names
        .into_iter()
        .map(|name| {
            let v: Value = serde_json::from_str(
                &std::fs::read_to_string(dir.join(format!("{name}.json"))).unwrap(),
            )
            .unwrap();
            let rows = |key: &str| -> Vec<Vec<f32>> {
                v[key]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|r| r.as_array().unwrap().iter().map(number).collect())
                    .collect()
            };
            Fixture {
                model: v["model"].as_str().unwrap().to_string(),
                inputs: rows("inputs"),
                oracle: v["oracle"].as_str().unwrap().to_string(),
                expected: rows("expected"),
                library: v["library"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|r| r.as_array().map(|r| r.iter().map(number).collect()))
                    .collect(),
            }
        })
        .collect()
}

/// The `models/loaded` entry of `model`.
fn loaded_entry<'a>(loaded: &'a Value, model: &str) -> &'a Value {
    loaded
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["model_name"] == model)
        .unwrap_or_else(|| panic!("{model} not loaded: {loaded}"))
}

/// The values of an HTTP predict answer, in order.
fn predicted(body: &Value) -> Vec<f32> {
    body["predictions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["value"].as_f64().unwrap() as f32)
        .collect()
}

fn close(got: f32, want: f32, tolerance: f32) -> bool {
    if !want.is_finite() {
        // NaN in, NaN out (the layout allows non-finite values), or an overflow.
        return got.is_nan() == want.is_nan() && (want.is_nan() || got == want);
    }
    (got - want).abs() <= tolerance * want.abs().max(1.0)
}

#[test]
fn exported_models_answer_as_onnxruntime_does_through_the_ring_and_http() {
    let server = TestServer::start_with(TEST_CONFIG, &root().join("tests/fixtures/exported"));
    let base = server.http();
    let (_, loaded) = get(&format!("{base}/api/v1/internal/inference/models/loaded"));
    for f in fixtures() {
        let entry = loaded_entry(&loaded, &f.model);
        // Pipelines are MLP-shaped: the MLP path on the CPU, or the GPU where one is usable.
        // Linear classifiers and other preprocessing run on tract, rewritten into ONNX's ops.
        let engines: &[&str] = if f.model.starts_with("pipe_") {
            &["cpu-mlp", "cuda"]
        } else if ["lin_", "svc_", "prep_"]
            .iter()
            .any(|p| f.model.starts_with(p))
        {
            &["cpu-tract"]
        } else {
            &["cpu-trees"]
        };
        assert!(
            engines.iter().any(|e| entry["engine"] == *e),
            "{} on {}: {entry}",
            f.model,
            entry["engine"]
        );
        let options = ConnectOptions {
            response_capacity: 32,
            request_capacity: 32,
            ..server.options()
        };
        let mut client = Client::connect("test", &f.model, options).unwrap();
        // One row at a time: NaN (missing), ±1e30 and rows on split thresholds included.
        // Classifiers serve their probabilities, native files the library's answer, and
        // their output's description says so.
        let spec = &entry["output_specs"][0];
        let said = match (f.model.contains("_native"), f.model.contains("_c")) {
            (true, _) => Some("as Booster.predict answers"),
            (false, true) => Some("class probabilities"),
            (false, false) => None,
        };
        if let Some(said) = said {
            assert!(
                spec["description"]
                    .as_str()
                    .is_some_and(|d| d.contains(said)),
                "{}: {spec}",
                f.model
            );
            assert_eq!(spec["shape"][1], f.expected[0].len(), "{}: {spec}", f.model);
        }
        for (i, (row, want)) in f.inputs.iter().zip(&f.expected).enumerate() {
            let got = client.predict(row).unwrap();
            assert_eq!(got.outputs().len(), want.len(), "{} row {i}", f.model);
            for (j, (g, w)) in got.outputs().iter().zip(want).enumerate() {
                assert!(
                    close(*g, *w, 1e-5),
                    "{} row {i} output {j}: {g} against {}'s {w} (row {row:?})",
                    f.model,
                    f.oracle
                );
            }
            if let Some(lib) = f.library[i].as_ref().filter(|_| i < 16) {
                for (g, l) in got.outputs().iter().zip(lib) {
                    assert!(
                        close(*g, *l, 1e-4),
                        "{} row {i}: {g} against the library's {l}",
                        f.model
                    );
                }
            }
        }
        // `tie predict` on the row with NaN in some features (row 16).
        let out = server.predict_cli(&f.model, &f.inputs[16]);
        assert!(
            out.status.success(),
            "{}: {}",
            f.model,
            String::from_utf8_lossy(&out.stderr)
        );
        let json: Value = serde_json::from_slice(&out.stdout).unwrap();
        let values: Vec<f32> = json["predictions"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| number(&p["value"]))
            .collect();
        assert_eq!(values.len(), f.expected[16].len(), "{}: {json}", f.model);
        for (g, w) in values.iter().zip(&f.expected[16]) {
            assert!(
                close(*g, *w, 1e-5),
                "{} by tie predict: {g} against {w}",
                f.model
            );
        }
        // All rows in flight at once: the server batches them (sizes as they come).
        let ids: Vec<u64> = f
            .inputs
            .iter()
            .map(|row| client.submit(row, Priority::Normal, None).unwrap())
            .collect();
        let mut answered = 0;
        while answered < ids.len() {
            if let Some(r) = client.poll() {
                let i = ids.iter().position(|&id| id == r.request_id).unwrap();
                assert!(r.status.is_ok(), "{} row {i}: {:?}", f.model, r.status);
                for (g, w) in r.outputs().iter().zip(&f.expected[i]) {
                    assert!(
                        close(*g, *w, 1e-5),
                        "{} batched row {i}: {g} against {w}",
                        f.model
                    );
                }
                answered += 1;
            }
        }
        // Over HTTP, the finite rows in one request.
        let finite: Vec<Vec<f32>> = f.inputs[..16].to_vec();
        let request = inference_request("trees", &f.model, None, &finite, Value::Null);
        let (code, body) = post(
            &format!("{base}/api/v1/internal/inference/predict"),
            &request,
        );
        assert_eq!(code, 200, "{body}");
        let width = f.expected[0].len();
        let values = predicted(&body);
        let want: Vec<f32> = f.expected[..16].iter().flatten().copied().collect();
        assert_eq!(values.len(), 16 * width, "{body}");
        for (g, w) in values.iter().zip(&want) {
            assert!(
                close(*g, *w, 1e-5),
                "{} over HTTP: {g} against {w}",
                f.model
            );
        }
    }
}

#[test]
fn sequence_models_answer_as_onnxruntime_does_through_the_ring_and_http() {
    let server = TestServer::start_with(TEST_CONFIG, &root().join("tests/fixtures/sequence"));
    let base = server.http();
    let (_, loaded) = get(&format!("{base}/api/v1/internal/inference/models/loaded"));
    let fixtures = fixtures_in("sequence");
    let mut names: Vec<&str> = fixtures.iter().map(|f| f.model.as_str()).collect();
    names.sort();
    assert_eq!(
        names,
        ["attention", "conv_ln", "gru", "gru_bi", "lstm", "rnn"]
    );
    for f in &fixtures {
        let entry = loaded_entry(&loaded, &f.model);
        assert_eq!(entry["engine"], "cpu-tract", "{}: {entry}", f.model);
        let mut client = Client::connect("test", &f.model, server.options()).unwrap();
        for (i, (row, want)) in f.inputs.iter().zip(&f.expected).enumerate() {
            let got = client.predict(row).unwrap();
            assert_eq!(got.outputs().len(), want.len(), "{} row {i}", f.model);
            for (g, w) in got.outputs().iter().zip(want) {
                assert!(
                    close(*g, *w, 1e-4),
                    "{} row {i}: {g} against onnxruntime's {w}",
                    f.model
                );
            }
            if let Some(lib) = &f.library[i] {
                for (g, l) in got.outputs().iter().zip(lib) {
                    assert!(
                        close(*g, *l, 1e-4),
                        "{} row {i}: {g} against PyTorch's {l}",
                        f.model
                    );
                }
            }
        }
        // All rows in one HTTP request: one batch of 19.
        let request = inference_request("sequence", &f.model, None, &f.inputs, Value::Null);
        let (code, body) = post(
            &format!("{base}/api/v1/internal/inference/predict"),
            &request,
        );
        assert_eq!(code, 200, "{body}");
        let values = predicted(&body);
        let want: Vec<f32> = f.expected.iter().flatten().copied().collect();
        assert_eq!(values.len(), want.len(), "{body}");
        for (g, w) in values.iter().zip(&want) {
            assert!(
                close(*g, *w, 1e-4),
                "{} over HTTP: {g} against {w}",
                f.model
            );
        }
    }
}
