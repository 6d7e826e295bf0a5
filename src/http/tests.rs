//! The control plane's one error mapping, through the axum application without a socket
//! (`tower::ServiceExt::oneshot`): every error kind's status and JSON, the extractor's and the
//! router's refusals, and that each error response is counted once by kind.

use std::sync::{Arc, OnceLock};

use axum::body::Body;
use axum::http::{Method, Request, StatusCode};
use axum::response::IntoResponse;
use tower::ServiceExt;

use super::api::InferenceError;
use super::app::{router, HttpState, API};
use super::error::ApiError;
use crate::monitor::HttpCounters;

/// A control plane whose models are still loading, with `token` as its bearer token.
fn state(token: Option<&str>) -> Arc<HttpState> {
    state_with(token, false, false)
}

/// [`state`] with `server.http_admin_without_token` and `server.http_token_everywhere`.
fn state_with(token: Option<&str>, admin_without_token: bool, everywhere: bool) -> Arc<HttpState> {
    Arc::new(HttpState {
        serving: OnceLock::new(),
        limit: Arc::new(tokio::sync::Semaphore::new(4)),
        counters: HttpCounters::default(),
        fault_injection: false,
        endpoint: "test".into(),
        socket_dir: None,
        api_token: token.map(str::to_string),
        admin_without_token,
        token_everywhere: everywhere,
        row_budget: None,
    })
}

fn request(method: Method, uri: &str, authorization: Option<&str>) -> Request<Body> {
    let mut r = Request::builder().method(method).uri(uri);
    if let Some(a) = authorization {
        r = r.header("authorization", a);
    }
    r.body(Body::empty()).unwrap()
}

#[tokio::test]
async fn without_a_token_state_changing_endpoints_are_refused_unless_the_operator_opts_out() {
    let reload = format!("{API}/models/reload");
    let (status, body) = send(&state(None), request(Method::POST, &reload, None)).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
    let message = body["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("server.api_token_file") && message.contains("http_admin_without_token"),
        "{body}"
    );
    for path in ["models/m/unload", "models/m/load", "models/m/fault"] {
        let (status, body) = send(
            &state(None),
            request(Method::POST, &format!("{API}/{path}"), None),
        )
        .await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{path}: {body}");
    }
    // Opted out: past the check, the models are still loading.
    let open = state_with(None, true, false);
    let (status, body) = send(&open, request(Method::POST, &reload, None)).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
}

#[tokio::test]
async fn the_token_can_be_required_everywhere_and_its_scheme_is_case_insensitive() {
    let strict = state_with(Some("secret"), false, true);
    for uri in [
        "/metrics",
        "/health/live",
        "/health/ready",
        &format!("{API}/models/loaded"),
    ] {
        let (status, body) = send(&strict, request(Method::GET, uri, None)).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{uri}: {body}");
        let (status, body) = send(&strict, request(Method::GET, uri, Some("Bearer wrong"))).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{uri}: {body}");
    }
    for scheme in ["Bearer", "bearer", "BEARER"] {
        let auth = format!("{scheme} secret");
        let (status, body) = send(&strict, request(Method::GET, "/health/live", Some(&auth))).await;
        assert_eq!(status, StatusCode::OK, "{auth}: {body}");
    }
    // Predictions need it too.
    let (status, body) = send(
        &strict,
        post(&format!("{API}/predict"), "application/json", "{}"),
    )
    .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
    // Without the option, reading needs no token.
    let lax = state(Some("secret"));
    let (status, _) = send(&lax, request(Method::GET, "/health/live", None)).await;
    assert_eq!(status, StatusCode::OK);
}

#[test]
fn a_token_matches_only_whole_and_exact() {
    use super::app::bearer_token_matches;
    let with = |v: &str| {
        let mut h = axum::http::HeaderMap::new();
        h.insert("authorization", v.parse().unwrap());
        h
    };
    assert!(bearer_token_matches(&with("Bearer secret"), "secret"));
    assert!(bearer_token_matches(&with("bearer  secret "), "secret"));
    for wrong in [
        "Bearer secre",
        "Bearer secrets",
        "Basic secret",
        "secret",
        "Bearer ",
        "Bearersecret",
    ] {
        assert!(!bearer_token_matches(&with(wrong), "secret"), "{wrong}");
    }
    assert!(!bearer_token_matches(
        &axum::http::HeaderMap::new(),
        "secret"
    ));
}

/// The status and JSON body of `request` through the app.
async fn send(state: &Arc<HttpState>, request: Request<Body>) -> (StatusCode, serde_json::Value) {
    let response = router(state.clone()).oneshot(request).await.unwrap();
    let status = response.status();
    let bytes = axum::body::to_bytes(response.into_body(), 1 << 20)
        .await
        .unwrap();
    let body = serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null);
    (status, body)
}

fn post(path: &str, content_type: &str, body: &str) -> Request<Body> {
    Request::builder()
        .method(Method::POST)
        .uri(path)
        .header("content-type", content_type)
        .body(Body::from(body.to_string()))
        .unwrap()
}

fn errors_counted(state: &HttpState) -> String {
    let mut registry = prometheus_client::registry::Registry::default();
    state.counters.register(&mut registry);
    crate::monitor::prometheus::encode(&registry)
}

#[test]
fn every_error_kind_has_its_status_json_kind_and_message() {
    let m = || "m".to_string();
    let table = [
        (
            InferenceError::ModelNotFound {
                model_name: m(),
                served: Vec::new(),
            },
            404,
        ),
        (InferenceError::UnsupportedMediaType { message: m() }, 415),
        (
            InferenceError::InvalidInputShape {
                expected: 2,
                actual: 3,
            },
            400,
        ),
        (
            InferenceError::ExecutionFailed {
                model_name: m(),
                reason: None,
            },
            500,
        ),
        (InferenceError::OutOfMemory { requested_mb: 9 }, 500),
        (InferenceError::BatchProcessingError { operation: m() }, 500),
        (InferenceError::EngineError { error: m() }, 500),
        (InferenceError::Timeout { message: m() }, 504),
        (InferenceError::QueueFull { message: m() }, 429),
        (InferenceError::Rejected { message: m() }, 400),
        (InferenceError::Disconnected { message: m() }, 503),
        (
            InferenceError::NotReady {
                model_name: m(),
                reason: m(),
            },
            503,
        ),
        (InferenceError::InvalidRequest { message: m() }, 400),
        (InferenceError::PayloadTooLarge { message: m() }, 413),
        (InferenceError::Forbidden { message: m() }, 403),
        (
            InferenceError::LoadFailed {
                model_name: m(),
                message: m(),
            },
            422,
        ),
        (InferenceError::Conflict { message: m() }, 409),
        (InferenceError::Unauthorized { message: m() }, 401),
    ];
    for (error, code) in table {
        let kind = error.kind();
        let message = error.to_string();
        let response = ApiError(error).into_response();
        assert_eq!(response.status().as_u16(), code, "{kind}");
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let bytes = rt
            .block_on(axum::body::to_bytes(response.into_body(), 1 << 16))
            .unwrap();
        let body: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(body["error"]["kind"], kind, "{body}");
        assert_eq!(body["message"], message, "{body}");
    }
    // The engine's error keeps the spec's JSON name.
    let json = serde_json::to_value(InferenceError::EngineError { error: m() }).unwrap();
    assert_eq!(json["kind"], "TensorRTError");
}

#[tokio::test]
async fn malformed_json_is_an_invalid_request_counted_once() {
    let state = state(None);
    let (status, body) = send(
        &state,
        post(&format!("{API}/predict"), "application/json", "{"),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(body["error"]["kind"], "InvalidRequest", "{body}");
    let counted = errors_counted(&state);
    assert!(
        counted.contains("tie_http_errors_total{kind=\"invalid_request\"} 1"),
        "{counted}"
    );
}

#[tokio::test]
async fn a_body_announced_too_large_is_refused_unread() {
    let state = state(None);
    let request = Request::builder()
        .method(Method::POST)
        .uri(format!("{API}/predict"))
        .header("content-type", "application/json")
        .header("content-length", (64u64 << 20).to_string())
        .body(Body::empty())
        .unwrap();
    let (status, body) = send(&state, request).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(body["error"]["kind"], "PayloadTooLarge", "{body}");
}

#[tokio::test]
async fn unknown_routes_and_methods_are_404_and_405() {
    let state = state(None);
    let (status, body) = send(&state, post("/nowhere", "application/json", "{}")).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
    let get = Request::builder()
        .uri(format!("{API}/predict"))
        .body(Body::empty())
        .unwrap();
    let (status, body) = send(&state, get).await;
    assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED, "{body}");
}

#[tokio::test]
async fn predictions_while_loading_are_not_ready() {
    let state = state(None);
    let request = r#"{"request_id":"r","model_name":"m","input_features":[1.0],"batch_size":1}"#;
    let (status, body) = send(
        &state,
        post(&format!("{API}/predict"), "application/json", request),
    )
    .await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert_eq!(body["error"]["kind"], "NotReady", "{body}");
}

#[tokio::test]
async fn state_changing_endpoints_need_the_token_when_one_is_set() {
    let state = state(Some("secret"));
    let (status, body) = send(
        &state,
        post(&format!("{API}/models/reload"), "application/json", ""),
    )
    .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
    assert_eq!(body["error"]["kind"], "Unauthorized", "{body}");
    let with_token = Request::builder()
        .method(Method::POST)
        .uri(format!("{API}/models/reload"))
        .header("authorization", "Bearer secret")
        .body(Body::empty())
        .unwrap();
    // Past the token, the models are still loading.
    let (status, body) = send(&state, with_token).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
}
