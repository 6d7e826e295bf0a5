//! The axum application: its state, the router and the middleware that counts and limits requests, and the server that runs it.
#![forbid(unsafe_code)]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use axum::extract::{MatchedPath, Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use utoipa::OpenApi;

use crate::config::ServiceConfig;
use crate::http::api::{ErrorBody, InferenceError};
use crate::models::{ChangeReport, ModelManager};
use crate::monitor::HttpCounters;

use super::{admin::*, error::*, health::*, pool::*, predict::*};

/// Base path of the spec's API.
pub const API: &str = "/api/v1/internal/inference";

/// Most requests in one `batch-predict`.
pub const MAX_BATCH_REQUESTS: usize = 1024;

/// Largest request body (bytes).
pub const MAX_BODY_BYTES: usize = 8 << 20;

/// How long a request with no `timeout_ms` may wait for its answer.
pub const DEFAULT_WAIT: Duration = Duration::from_secs(1);

/// Largest `timeout_ms` accepted.
pub const MAX_TIMEOUT_MS: u64 = 60_000;

/// Most rows in one request.
pub const MAX_ROWS: usize = 4096;

/// Sessions the control plane opens per model at most (they count against
/// `server.max_sessions`, which trading clients share); a request waits for a free one.
pub const SESSIONS_PER_MODEL: usize = 4;

/// The control plane's state.
pub struct HttpState {
    pub(super) serving: OnceLock<Arc<Serving>>,
    pub(super) limit: Arc<tokio::sync::Semaphore>,
    pub(super) counters: HttpCounters,
    pub(super) fault_injection: bool,
    pub(super) endpoint: String,
    pub(super) socket_dir: Option<std::path::PathBuf>,
    /// `server.api_token_file`'s token.
    pub(super) api_token: Option<String>,
}

impl HttpState {
    /// Whether `headers` carry the bearer token the state-changing endpoints need (always,
    /// when no token is configured).
    pub(super) fn authorize(&self, headers: &axum::http::HeaderMap) -> Result<(), InferenceError> {
        let Some(token) = &self.api_token else {
            return Ok(());
        };
        let given = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or_default();
        // Compared in time independent of where they differ.
        let same = given.len() == token.len()
            && given
                .bytes()
                .zip(token.bytes())
                .fold(0u8, |acc, (a, b)| acc | (a ^ b))
                == 0;
        if same {
            Ok(())
        } else {
            tracing::warn!("state-changing request refused: missing or wrong bearer token");
            Err(InferenceError::Unauthorized {
                message: "this endpoint needs the server's bearer token (Authorization: Bearer …)"
                    .into(),
            })
        }
    }

    /// A permit of `max_concurrent_requests`, or `QueueFull`.
    pub(super) fn limit_permit(&self) -> Result<tokio::sync::OwnedSemaphorePermit, InferenceError> {
        self.limit
            .clone()
            .try_acquire_owned()
            .map_err(|_| InferenceError::QueueFull {
                message: "too many HTTP requests in progress (max_concurrent_requests)".into(),
            })
    }

    pub(super) fn serving(&self) -> Result<&Arc<Serving>, ApiError> {
        self.serving.get().ok_or_else(|| {
            ApiError(InferenceError::NotReady {
                model_name: String::new(),
                reason: "the server is loading its models".into(),
            })
        })
    }
}

/// A running control plane.
pub struct HttpServer {
    pub(super) state: Arc<HttpState>,
    pub(super) addr: SocketAddr,
    pub(super) runtime: Option<tokio::runtime::Runtime>,
    pub(super) shutdown: Option<tokio::sync::oneshot::Sender<()>>,
}

impl HttpServer {
    /// Binds `config.http_addr()` and serves the control plane on a runtime of
    /// `tensorrt_inference_engine.worker_threads` threads.
    ///
    /// # Errors
    /// The address cannot be bound, or the runtime cannot start.
    pub fn start(config: &ServiceConfig) -> std::io::Result<Self> {
        let engine = &config.tensorrt_inference_engine;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(engine.worker_threads as usize)
            .thread_name("tie-http")
            .enable_all()
            .build()?;
        let api_token = match &config.server.api_token_file {
            None => None,
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|e| {
                    std::io::Error::new(
                        e.kind(),
                        format!("server.api_token_file {}: {e}", path.display()),
                    )
                })?;
                let token = text.trim().to_string();
                if token.is_empty() {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::InvalidData,
                        format!("server.api_token_file {} is empty", path.display()),
                    ));
                }
                Some(token)
            }
        };
        let listener = std::net::TcpListener::bind(config.http_addr())?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let state = Arc::new(HttpState {
            serving: OnceLock::new(),
            limit: Arc::new(tokio::sync::Semaphore::new(
                engine.max_concurrent_requests as usize,
            )),
            counters: HttpCounters::default(),
            fault_injection: config.server.fault_injection,
            endpoint: config.server.endpoint.clone(),
            socket_dir: config.server.socket_dir.clone(),
            api_token,
        });
        let app = router(state.clone());
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let listener = {
            let _guard = runtime.enter();
            tokio::net::TcpListener::from_std(listener)?
        };
        runtime.spawn(async move {
            let served = axum::serve(listener, app)
                .with_graceful_shutdown(async {
                    let _ = rx.await;
                })
                .await;
            if let Err(e) = served {
                tracing::error!(error = %e, "HTTP control plane failed");
            }
        });
        tracing::info!(%addr, "HTTP control plane listening");
        Ok(Self {
            state,
            addr,
            runtime: Some(runtime),
            shutdown: Some(tx),
        })
    }

    /// The bound address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Starts serving the models of `manager` (the server's).
    pub fn serve(&self, manager: Arc<ModelManager>) {
        let models = manager.models().clone();
        let serving = self.state.serving.get_or_init(|| {
            Arc::new(Serving {
                monitor: models.monitor().clone(),
                models,
                manager,
                pools: Mutex::new(HashMap::new()),
                endpoint: self.state.endpoint.clone(),
                socket_dir: self.state.socket_dir.clone(),
            })
        });
        let serving = Arc::downgrade(serving);
        if let Some(rt) = &self.runtime {
            rt.spawn(async move {
                let mut every = tokio::time::interval(POOL_IDLE / 4);
                loop {
                    every.tick().await;
                    match serving.upgrade() {
                        Some(s) => s.close_idle_sessions(),
                        None => break,
                    }
                }
            });
        }
    }

    /// Stops accepting, lets requests in progress finish (up to a second), and closes.
    pub fn shutdown(mut self) {
        self.stop();
    }

    pub(super) fn stop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_timeout(Duration::from_secs(1));
        }
    }
}

impl Drop for HttpServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The OpenAPI document of the control plane.
#[derive(OpenApi)]
#[openapi(
    info(
        title = "tie control plane",
        description = "The spec's inference API, health and metrics."
    ),
    paths(
        predict,
        batch_predict,
        loaded_models,
        model_performance,
        reload_models,
        load_model,
        unload_model,
        inject_fault,
        openapi_json,
        live,
        ready,
        metrics
    ),
    components(schemas(ErrorBody, FaultRequest, ReadyReport, ModelReadiness, ChangeReport))
)]
pub struct ApiDoc;

pub(super) fn router(state: Arc<HttpState>) -> Router {
    Router::new()
        .route(&format!("{API}/predict"), post(predict))
        .route(&format!("{API}/batch-predict"), post(batch_predict))
        .route(&format!("{API}/models/loaded"), get(loaded_models))
        .route(
            &format!("{API}/performance/{{model_key}}"),
            get(model_performance),
        )
        .route(
            &format!("{API}/models/{{model_key}}/fault"),
            post(inject_fault),
        )
        .route(&format!("{API}/models/reload"), post(reload_models))
        .route(
            &format!("{API}/models/{{model_name}}/load"),
            post(load_model),
        )
        .route(
            &format!("{API}/models/{{model_key}}/unload"),
            post(unload_model),
        )
        .route(&format!("{API}/openapi.json"), get(openapi_json))
        .route("/health/live", get(live))
        .route("/health/ready", get(ready))
        .route("/metrics", get(metrics))
        .fallback(no_route)
        .method_not_allowed_fallback(wrong_method)
        .layer(axum::extract::DefaultBodyLimit::max(MAX_BODY_BYTES))
        .layer(axum::middleware::from_fn(refuse_large_bodies))
        .layer(axum::middleware::from_fn_with_state(state.clone(), count))
        .with_state(state)
}

/// Counts every response by route and code, and every error response by kind (once).
pub(super) async fn count(
    State(state): State<Arc<HttpState>>,
    matched: Option<MatchedPath>,
    req: Request,
    next: Next,
) -> Response {
    let route = matched.map_or_else(|| "unmatched".to_string(), |m| m.as_str().to_string());
    let response = next.run(req).await;
    state.counters.response(&route, response.status().as_u16());
    if let Some(kind) = response.extensions().get::<CountedKind>() {
        state.counters.error(kind.0);
    }
    response
}

/// Refuses a body announced larger than [`MAX_BODY_BYTES`] before reading any of it (bodies
/// without a length are cut at the limit while read).
pub(super) async fn refuse_large_bodies(req: Request, next: Next) -> Response {
    let announced = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    match announced {
        Some(n) if n > MAX_BODY_BYTES as u64 => ApiError(InferenceError::PayloadTooLarge {
            message: format!("the body is {n} bytes; the limit is {MAX_BODY_BYTES}"),
        })
        .into_response(),
        _ => next.run(req).await,
    }
}

/// The error kind of a response, set where the error response is made.
#[derive(Clone, Copy, Debug)]
pub(super) struct CountedKind(pub(super) &'static str);

pub(super) async fn no_route(req: Request) -> Response {
    let body = serde_json::json!({
        "error": {"kind": "NotFound"},
        "message": format!("no route {} {}", req.method(), req.uri().path()),
    });
    let mut response = (StatusCode::NOT_FOUND, Json(body)).into_response();
    response.extensions_mut().insert(CountedKind("NotFound"));
    response
}

pub(super) async fn wrong_method(req: Request) -> Response {
    let body = serde_json::json!({
        "error": {"kind": "MethodNotAllowed"},
        "message": format!("{} is not allowed on {}", req.method(), req.uri().path()),
    });
    let mut response = (StatusCode::METHOD_NOT_ALLOWED, Json(body)).into_response();
    response
        .extensions_mut()
        .insert(CountedKind("MethodNotAllowed"));
    response
}
