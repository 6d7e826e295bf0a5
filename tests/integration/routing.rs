//! The router on a real `tie serve`: strategy rules and hints, a deterministic weighted split,
//! ensembles against their members computed separately, feature contributions against finite
//! differences, confidence from an uncertainty output.

use crate::common::{
    add_version, fixture, get, inference_request as request, post, post_empty, rel_err,
    scratch_dir, TestServer,
};
use serde_json::{json, Value};
use tie::models::routing::{split, RouteTarget};
use tie_client::{Client, ConnectOptions};

const API: &str = "api/v1/internal/inference";

const ROUTING: &str = r#"
[strategies.momentum]
targets = [
    { model = "multi", version = "stable", weight = 80 },
    { model = "multi", version = "canary", weight = 20 },
]
[strategies.mixed]
targets = [{ model = "identity" }, { model = "multi", version = "2", weight = 0 }]

[ensembles.blend]
members = [
    { model = "multi", version = "1", weight = 3 },
    { model = "multi", version = "2", weight = 1 },
]
[ensembles.mid]
combine = "median"
members = [{ model = "multi", version = "1" }, { model = "multi", version = "2" }, { model = "multi", version = "2" }]
[ensembles.odd]
members = [{ model = "multi" }, { model = "multi_u" }]
"#;

fn repository() -> std::path::PathBuf {
    let repo = scratch_dir("repo");
    add_version(&repo, "multi", 1, "multi", 1);
    add_version(&repo, "multi", 2, "multi", 2);
    add_version(&repo, "multi", 1, "multi_u", 1);
    add_version(&repo, "multi", 1, "multi_u0", 1);
    add_version(&repo, "identity", 1, "identity", 1);
    add_version(&repo, "mlp64", 1, "mlp64", 1);
    std::fs::write(
        repo.join("multi/config.toml"),
        "default_version = 1\nlabels = { stable = 1, canary = 2 }\n",
    )
    .unwrap();
    std::fs::write(repo.join("multi_u/config.toml"), "uncertainty_output = 3\n").unwrap();
    std::fs::write(
        repo.join("multi_u0/config.toml"),
        "uncertainty_output = 0\n",
    )
    .unwrap();
    std::fs::write(repo.join("mlp64/config.toml"), "layout = \"mlp64\"\n").unwrap();
    std::fs::write(repo.join("routing.toml"), ROUTING).unwrap();
    repo
}

fn strategy(name: &str, hint: Option<&str>) -> Value {
    json!({"strategy_name": name, "model_routing_hint": hint, "feature_weights": null, "ensemble_config": null})
}

fn values(body: &Value) -> Vec<f32> {
    body["predictions"]
        .as_array()
        .unwrap_or_else(|| panic!("{body}"))
        .iter()
        .map(|p| p["value"].as_f64().unwrap() as f32)
        .collect()
}

fn close(a: &[f32], b: &[f32], tolerance: f32) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| rel_err(*x, *y) < tolerance)
}

#[test]
fn strategies_split_by_weight_deterministically_and_follow_hints() {
    let repo = repository();
    let server = TestServer::start_with(crate::common::TEST_CONFIG, &repo);
    let api = format!("{}/{API}", server.http());
    let row = fixture("multi_v1").inputs[..1].to_vec();
    let targets = [
        RouteTarget {
            model: "multi".into(),
            version: Some("stable".into()),
            weight: 80.0,
        },
        RouteTarget {
            model: "multi".into(),
            version: Some("canary".into()),
            weight: 20.0,
        },
    ];
    let batch: Vec<Value> = (0..1000)
        .map(|i| {
            request(
                &format!("order-{i}"),
                "",
                None,
                &row,
                strategy("momentum", None),
            )
        })
        .collect();
    let versions = |batch: &[Value]| -> Vec<String> {
        let (code, body) = post(&format!("{api}/batch-predict"), &json!(batch));
        assert_eq!(code, 200, "{body}");
        body.as_array()
            .unwrap()
            .iter()
            .map(|r| {
                assert!(r["error"].is_null(), "{r}");
                r["model_metadata"]["model_version"]
                    .as_str()
                    .unwrap()
                    .to_string()
            })
            .collect()
    };
    let first = versions(&batch);
    // Each request id goes where the documented split puts it, and again on a replay.
    for (i, v) in first.iter().enumerate() {
        let expected = split(&targets, &format!("order-{i}"));
        let want = if expected.version.as_deref() == Some("stable") {
            "1"
        } else {
            "2"
        };
        assert_eq!(v, want, "order-{i}");
    }
    assert_eq!(versions(&batch), first, "a replay routes the same way");
    // Binomial(1000, 0.2): sd ~12.6; 5 sd either side.
    let canary = first.iter().filter(|v| *v == "2").count() as i64;
    assert!((200 - canary).abs() < 64, "{canary} of 1000 to the canary");

    // A hint picks a target, by key or by what it resolves to; a non-target is refused.
    let one = |body: Value| {
        let (code, body) = post(&format!("{api}/predict"), &body);
        assert_eq!(code, 200, "{body}");
        body["model_metadata"]["model_version"]
            .as_str()
            .unwrap()
            .to_string()
    };
    for (hint, want) in [
        ("multi:canary", "2"),
        ("multi:2", "2"),
        ("multi:stable", "1"),
    ] {
        let r = request("o", "", None, &row, strategy("momentum", Some(hint)));
        assert_eq!(one(r), want, "{hint}");
    }
    let refuse = |body: Value, words: &str| {
        let (code, body) = post(&format!("{api}/predict"), &body);
        assert_eq!(
            (code, body["error"]["kind"].as_str()),
            (400, Some("InvalidRequest")),
            "{body}"
        );
        assert!(body["message"].as_str().unwrap().contains(words), "{body}");
    };
    refuse(
        request("o", "", None, &row, strategy("momentum", Some("identity"))),
        "not a target",
    );
    refuse(
        request("o", "", None, &row, strategy("nosuch", None)),
        "no routing rule",
    );
    refuse(
        request("o", "multi", Some("1"), &row, strategy("momentum", None)),
        "picks the version",
    );
    // A strategy across models: a model_name keeps its targets; a zero weight gets no share.
    let ident = fixture("identity_v1").inputs[..1].to_vec();
    let (code, body) = post(
        &format!("{api}/predict"),
        &request("o", "", None, &ident, strategy("mixed", None)),
    );
    assert_eq!(code, 200, "{body}");
    assert_eq!(body["model_metadata"]["model_name"], "identity");
    refuse(
        request("o", "multi", None, &row, strategy("mixed", None)),
        "no target of model",
    );
    let r = request("o", "multi", None, &row, strategy("mixed", Some("multi:2")));
    assert_eq!(one(r), "2");

    // A broken routing.toml at reload changes nothing.
    std::fs::write(
        repo.join("routing.toml"),
        "[strategies.momentum]\ntargets = []\n",
    )
    .unwrap();
    let (code, body) = post_empty(&format!("{api}/models/reload"), None);
    assert_eq!(
        (code, body["error"]["kind"].as_str()),
        (422, Some("LoadFailed")),
        "{body}"
    );
    assert!(
        body["message"].as_str().unwrap().contains("no target"),
        "{body}"
    );
    assert_eq!(versions(&batch[..10]), first[..10]);
    let _ = std::fs::remove_dir_all(&repo);
}

#[test]
fn ensembles_combine_their_members_computed_separately() {
    let repo = repository();
    let server = TestServer::start_with(crate::common::TEST_CONFIG, &repo);
    let api = format!("{}/{API}", server.http());
    let rows = fixture("multi_v1").inputs[..3].to_vec();
    let predict = |body: Value| {
        let (code, body) = post(&format!("{api}/predict"), &body);
        assert_eq!(code, 200, "{body}");
        body
    };
    let v1 = values(&predict(request(
        "a",
        "multi",
        Some("1"),
        &rows,
        Value::Null,
    )));
    let v2 = values(&predict(request(
        "b",
        "multi",
        Some("2"),
        &rows,
        Value::Null,
    )));
    assert_eq!(v1.len(), 12);

    let blend = predict(request("c", "blend", None, &rows, Value::Null));
    let want: Vec<f32> = v1
        .iter()
        .zip(&v2)
        .map(|(a, b)| (3.0 * a + b) / 4.0)
        .collect();
    assert!(close(&values(&blend), &want, 1e-5), "{blend}");
    assert_eq!(blend["model_metadata"]["model_name"], "blend");
    assert_eq!(blend["model_metadata"]["model_version"], "ensemble");
    assert!(blend["model_metadata"]["architecture"]
        .as_str()
        .unwrap()
        .contains("multi:1, multi:2"));
    let mid = predict(request("d", "mid", None, &rows, Value::Null));
    assert!(
        close(&values(&mid), &v2, 1e-6),
        "median of (v1, v2, v2) is v2: {mid}"
    );
    // An ensemble given with the request: the median of two is their mean.
    let adhoc = json!({
        "strategy_name": "",
        "model_routing_hint": null,
        "feature_weights": null,
        "ensemble_config": {
            "combine": "median",
            "members": [{"model": "multi", "version": "1"}, {"model": "multi", "version": "canary"}],
        },
    });
    let body = predict(request("e", "", None, &rows, adhoc));
    let want: Vec<f32> = v1.iter().zip(&v2).map(|(a, b)| (a + b) / 2.0).collect();
    assert!(close(&values(&body), &want, 1e-5), "{body}");

    // Members that disagree in shape, or that fail: a clear error.
    let (code, body) = post(
        &format!("{api}/predict"),
        &request("f", "odd", None, &rows, Value::Null),
    );
    assert_eq!(code, 400, "{body}");
    assert!(
        body["message"].as_str().unwrap().contains("gives 9 values"),
        "{body}"
    );
    let bad = json!({
        "strategy_name": "",
        "model_routing_hint": null,
        "feature_weights": null,
        "ensemble_config": {"members": [{"model": "multi"}, {"model": "nosuch"}]},
    });
    let (code, body) = post(
        &format!("{api}/predict"),
        &request("g", "", None, &rows, bad),
    );
    assert_eq!(
        (code, body["error"]["kind"].as_str()),
        (404, Some("ModelNotFound")),
        "{body}"
    );

    // The named ensemble has figures of its own.
    let (code, perf) = get(&format!("{api}/performance/blend"));
    assert_eq!(code, 200, "{perf}");
    assert_eq!(perf["model_key"], "blend:ensemble", "{perf}");
    assert_eq!(perf["total_requests"], 3, "three rows: {perf}");
    let (_, odd) = get(&format!("{api}/performance/odd:ensemble"));
    assert_eq!(odd["failed_requests"], 3, "{odd}");
    let metrics = crate::common::send("GET", &format!("{}/metrics", server.http()), None).1;
    assert!(
        metrics.contains("tie_model_ready{model=\"blend\",version=\"ensemble\"} 1"),
        "{metrics}"
    );
    let _ = std::fs::remove_dir_all(&repo);
}

#[test]
fn contributions_match_finite_differences_and_confidence_follows_the_uncertainty_output() {
    let repo = repository();
    let server = TestServer::start_with(crate::common::TEST_CONFIG, &repo);
    let api = format!("{}/{API}", server.http());
    let predict = |body: Value| {
        let (code, body) = post(&format!("{api}/predict"), &body);
        assert_eq!(code, 200, "{body}");
        body
    };
    let contributions = |weights: Value| json!({"strategy_name": "", "model_routing_hint": null, "feature_weights": weights, "ensemble_config": null});

    // The identity: output o's contribution of feature i is x_i when i = o, else 0.
    let x = fixture("identity_v1").inputs[..2].to_vec();
    let body = predict(request("i", "identity", None, &x, contributions(json!({}))));
    let predictions = body["predictions"].as_array().unwrap();
    assert_eq!(predictions.len(), 8);
    for (p, prediction) in predictions.iter().enumerate() {
        let (row, o) = (p / 4, p % 4);
        let map = prediction["feature_contributions"].as_object().unwrap();
        assert_eq!(map.len(), 4, "{prediction}");
        for i in 0..4 {
            let got = map[&format!("f{i}")].as_f64().unwrap() as f32;
            let want = if i == o { x[row][i] } else { 0.0 };
            assert!(
                (got - want).abs() < 1e-3,
                "row {row} output {o} feature f{i}: {got}"
            );
        }
    }

    // mlp64: weight × x × ∂y/∂x against the test's own central differences (another step).
    let features: Vec<String> = get(&format!("{api}/models/loaded"))
        .1
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["model_key"] == "mlp64:1")
        .unwrap()["feature_names"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f.as_str().unwrap().to_string())
        .collect();
    let row = fixture("mlp64_v1").inputs[0].clone();
    let (a, b) = (features[3].clone(), features[40].clone());
    let body = predict(request(
        "m",
        "mlp64",
        None,
        std::slice::from_ref(&row),
        contributions(json!({ a.clone(): 2.0, b.clone(): 1.0 })),
    ));
    let map = body["predictions"][0]["feature_contributions"]
        .as_object()
        .unwrap()
        .clone();
    assert_eq!(map.len(), 2, "only the features asked for");
    let y = |x: &[f32]| {
        values(&predict(request(
            "y",
            "mlp64",
            None,
            &[x.to_vec()],
            Value::Null,
        )))[0]
    };
    for (name, index, weight) in [(&a, 3, 2.0f32), (&b, 40, 1.0)] {
        let h = 1e-2 * row[index].abs().max(1.0);
        let (mut up, mut down) = (row.clone(), row.clone());
        up[index] += h;
        down[index] -= h;
        let want = weight * row[index] * (y(&up) - y(&down)) / (up[index] - down[index]);
        let got = map[name].as_f64().unwrap() as f32;
        assert!(
            (got - want).abs() <= 2e-3 * want.abs().max(0.1),
            "{name}: {got} against {want}"
        );
    }
    let (code, body) = post(
        &format!("{api}/predict"),
        &request(
            "n",
            "mlp64",
            None,
            &[row],
            contributions(json!({"nosuch": 1.0})),
        ),
    );
    assert_eq!(code, 400, "{body}");
    let (code, body) = post(
        &format!("{api}/predict"),
        &request(
            "n",
            "blend",
            None,
            &fixture("multi_v1").inputs[..1],
            contributions(json!({})),
        ),
    );
    assert_eq!(code, 400, "{body}");

    // Confidence from the uncertainty column (leaving it out of the predictions), over HTTP and
    // on the ring; without one, the spec's formula on each value.
    let f = fixture("multi_v1");
    let body = predict(request("u", "multi_u", None, &f.inputs[..1], Value::Null));
    let preds = body["predictions"].as_array().unwrap();
    assert_eq!(preds.len(), 3);
    let outputs: Vec<_> = preds
        .iter()
        .map(|p| p["output"].as_u64().unwrap())
        .collect();
    assert_eq!(
        outputs,
        [0, 1, 2],
        "the model's columns, the uncertainty left out"
    );
    // With the uncertainty first, the other columns keep the model's numbers.
    let body = predict(request("u0", "multi_u0", None, &f.inputs[..2], Value::Null));
    let places: Vec<_> = body["predictions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| (p["row"].as_u64().unwrap(), p["output"].as_u64().unwrap()))
        .collect();
    assert_eq!(
        places,
        [(0, 1), (0, 2), (0, 3), (1, 1), (1, 2), (1, 3)],
        "{body}"
    );
    let values: Vec<f32> = body["predictions"].as_array().unwrap()[..3]
        .iter()
        .map(|p| p["value"].as_f64().unwrap() as f32)
        .collect();
    for (got, want) in values.iter().zip(&f.outputs[0][1..]) {
        assert!((got - want).abs() <= 1e-5 * want.abs().max(1.0), "{body}");
    }
    let want = 1.0 - f.outputs[0][3].abs().min(1.0);
    for p in preds {
        assert!(
            (p["confidence"].as_f64().unwrap() as f32 - want).abs() < 1e-5,
            "{p}"
        );
    }
    let mut client = Client::connect(
        &server.endpoint,
        "multi_u",
        ConnectOptions { ..server.options() },
    )
    .unwrap();
    let p = client.predict(&f.inputs[0]).unwrap();
    assert!((p.response.confidence - want).abs() < 1e-5);
    assert_eq!(p.outputs().len(), 4, "the ring carries every column");
    let body = predict(request(
        "v",
        "multi",
        Some("1"),
        &f.inputs[..1],
        Value::Null,
    ));
    for (p, v) in body["predictions"]
        .as_array()
        .unwrap()
        .iter()
        .zip(&f.outputs[0])
    {
        let want = 1.0 / (1.0 + (-v.abs()).exp());
        assert!(
            (p["confidence"].as_f64().unwrap() as f32 - want).abs() < 1e-5,
            "{p}"
        );
    }
    let _ = std::fs::remove_dir_all(&repo);
}
