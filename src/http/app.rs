//! The axum application: its state, the router and the middleware that counts and limits requests, and the server that runs it.
#![forbid(unsafe_code)]

use std::collections::HashMap;
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

use super::listen::{HttpEndpoint, Listener};
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

/// Sessions the control plane opens per model at most (they do not count against
/// `server.max_sessions`, which is the trading clients'); a request waits for a free one.
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
    /// `server.http_admin_without_token`.
    pub(super) admin_without_token: bool,
    /// `server.http_token_everywhere`.
    pub(super) token_everywhere: bool,
    /// `server.http_max_rows_per_sec` (`None`: no cap), handed to [`Serving`].
    pub(super) row_budget: Option<Arc<RowBudget>>,
}

/// The cap on rows per second that HTTP predictions take together.
pub(super) struct RowBudget {
    limiter: governor::DefaultDirectRateLimiter,
    /// `server.http_max_rows_per_sec`.
    rate: std::num::NonZeroU32,
}

impl RowBudget {
    /// Takes `rows` from the budget, or `QueueFull`.
    pub(super) fn take(&self, rows: usize) -> Result<(), InferenceError> {
        let n = std::num::NonZeroU32::new(rows.clamp(1, u32::MAX as usize) as u32)
            .expect("at least one");
        match self.limiter.check_n(n) {
            Ok(Ok(())) => Ok(()),
            Ok(Err(_)) | Err(_) => Err(InferenceError::QueueFull {
                message: format!(
                    "HTTP predictions are over their row budget (server.http_max_rows_per_sec = {}): retry later, or use the ring client",
                    self.rate
                ),
            }),
        }
    }

    /// `rate` rows per second, with a burst of one second's worth (and of at least one
    /// request of [`MAX_ROWS`]).
    pub(super) fn new(rate: u32) -> Option<Self> {
        let rate = std::num::NonZeroU32::new(rate)?;
        let burst = rate.max(std::num::NonZeroU32::new(MAX_ROWS as u32).expect("positive"));
        Some(Self {
            limiter: governor::RateLimiter::direct(
                governor::Quota::per_second(rate).allow_burst(burst),
            ),
            rate,
        })
    }
}

impl HttpState {
    /// Whether `headers` carry the server's bearer token, which the state-changing endpoints
    /// need (and every endpoint with `server.http_token_everywhere`). Without a configured
    /// token these are refused, unless `server.http_admin_without_token` lets them run.
    pub(super) fn authorize(&self, headers: &axum::http::HeaderMap) -> Result<(), InferenceError> {
        let Some(token) = &self.api_token else {
            if self.admin_without_token {
                return Ok(());
            }
            tracing::warn!("state-changing request refused: no api token is configured");
            return Err(InferenceError::Unauthorized {
                message: "this endpoint changes the server and no token is configured: set server.api_token_file (then send Authorization: Bearer <token>), or server.http_admin_without_token = true to let any local user who reaches the listener do this".into(),
            });
        };
        if bearer_token_matches(headers, token) {
            Ok(())
        } else {
            tracing::warn!("request refused: missing or wrong bearer token");
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

/// Whether `headers` carry `Authorization: Bearer <token>` (the scheme in any case, RFC 7235),
/// compared in constant time.
pub(super) fn bearer_token_matches(headers: &axum::http::HeaderMap, token: &str) -> bool {
    use subtle::ConstantTimeEq;
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map_or("", |(_, t)| t.trim());
    bool::from(given.as_bytes().ct_eq(token.as_bytes()))
}

/// With `server.http_token_everywhere`, every request needs the token.
pub(super) async fn require_token(
    State(state): State<Arc<HttpState>>,
    req: Request,
    next: Next,
) -> Response {
    if state.token_everywhere {
        if let Err(e) = state.authorize(req.headers()) {
            return super::v2::error_response(req.uri().path(), e);
        }
    }
    next.run(req).await
}

/// A running control plane.
pub struct HttpServer {
    pub(super) state: Arc<HttpState>,
    pub(super) endpoint: HttpEndpoint,
    pub(super) runtime: Option<tokio::runtime::Runtime>,
    pub(super) shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    /// Where the gRPC service listens, when it does.
    pub(super) grpc_addr: Option<std::net::SocketAddr>,
    pub(super) grpc_shutdown: Option<tokio::sync::oneshot::Sender<()>>,
}

/// The control plane's bearer token: `server.api_token_file`'s contents, trimmed (`None` when
/// no file is set).
///
/// # Errors
/// The file cannot be read, or holds only white space; the message names the setting and the
/// file.
pub fn read_api_token(config: &ServiceConfig) -> std::io::Result<Option<String>> {
    let Some(path) = &config.server.api_token_file else {
        return Ok(None);
    };
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
    Ok(Some(token))
}

impl HttpServer {
    /// Binds `config.http_addr()` and serves the control plane on a runtime of
    /// `tensorrt_inference_engine.worker_threads` threads, the state-changing endpoints behind
    /// `api_token` (see [`read_api_token`]).
    ///
    /// # Errors
    /// The HTTP listener (or the gRPC one, with `server.grpc_addr`) cannot be bound, the error
    /// naming its setting; or the runtime cannot start.
    pub fn start(config: &ServiceConfig, api_token: Option<String>) -> std::io::Result<Self> {
        let engine = &config.tensorrt_inference_engine;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(engine.worker_threads as usize)
            .thread_name("tie-http")
            .enable_all()
            .build()?;
        let (listener, endpoint) = {
            let _guard = runtime.enter();
            bind(config)?
        };
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
            admin_without_token: config.server.http_admin_without_token,
            token_everywhere: config.server.http_token_everywhere,
            row_budget: RowBudget::new(config.server.http_max_rows_per_sec).map(Arc::new),
        });
        if state.api_token.is_none() && state.admin_without_token {
            tracing::warn!("server.http_admin_without_token = true: any local user who reaches the HTTP listener may load, unload and reload models");
        }
        let app = router(state.clone());
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let max_connections = config.server.http_max_connections as usize;
        runtime.spawn(super::listen::serve(listener, app, max_connections, rx));
        tracing::info!(addr = %endpoint, "HTTP control plane listening");
        let grpc = match config.server.grpc_addr {
            None => None,
            Some(addr) => {
                let listener = std::net::TcpListener::bind(addr).map_err(|e| {
                    std::io::Error::new(e.kind(), format!("server.grpc_addr {addr}: {e}"))
                })?;
                listener.set_nonblocking(true)?;
                let addr = listener.local_addr()?;
                let listener = {
                    let _guard = runtime.enter();
                    tokio::net::TcpListener::from_std(listener)?
                };
                let (tx, rx) = tokio::sync::oneshot::channel::<()>();
                runtime.spawn(super::grpc::serve(listener, state.clone(), rx));
                tracing::info!(%addr, "gRPC inference service (Open Inference Protocol) listening");
                Some((addr, tx))
            }
        };
        Ok(Self {
            state,
            endpoint,
            grpc_addr: grpc.as_ref().map(|g| g.0),
            runtime: Some(runtime),
            shutdown: Some(tx),
            grpc_shutdown: grpc.map(|g| g.1),
        })
    }

    /// Where it listens.
    pub fn endpoint(&self) -> &HttpEndpoint {
        &self.endpoint
    }

    /// Where the gRPC service listens (`server.grpc_addr`), when it does.
    pub fn grpc_addr(&self) -> Option<std::net::SocketAddr> {
        self.grpc_addr
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
                row_budget: self.state.row_budget.clone(),
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
        if let Some(tx) = self.grpc_shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_timeout(Duration::from_secs(1));
        }
    }
}

/// Binds the control plane's listener: `server.http_addr` over TCP, or with
/// `server.http_unix_socket` the socket `<socket_dir>/<endpoint>.http.sock` (set up as the ring
/// socket is). Within a runtime.
fn bind(config: &ServiceConfig) -> std::io::Result<(Listener, HttpEndpoint)> {
    if config.server.http_unix_socket {
        let path = tie_client::endpoint::socket_path(
            config.server.socket_dir.as_deref(),
            &format!("{}.http", config.server.endpoint),
        )
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e.to_string()))?;
        let (listener, file) = crate::dataplane::bind_socket(&path, config.server.allowed_gid)
            .map_err(|e| {
                std::io::Error::other(format!("server.http_unix_socket {}: {e}", path.display()))
            })?;
        let listener = tokio::net::UnixListener::from_std(listener)?;
        return Ok((
            Listener::Unix {
                listener,
                allowed_gid: config.server.allowed_gid,
                file,
            },
            HttpEndpoint::Unix(path),
        ));
    }
    let addr = config.http_addr();
    let listener = std::net::TcpListener::bind(addr).map_err(|e| {
        std::io::Error::new(
            e.kind(),
            format!("server.http_addr {addr} (or --http-addr): {e}"),
        )
    })?;
    listener.set_nonblocking(true)?;
    let addr = listener.local_addr()?;
    Ok((
        Listener::Tcp(tokio::net::TcpListener::from_std(listener)?),
        HttpEndpoint::Tcp(addr),
    ))
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
        description = "Predictions over HTTP, model management, health and metrics of a tie server. \
            State-changing endpoints need the bearer token of `server.api_token_file` (unless \
            `server.http_admin_without_token` is set); with `server.http_token_everywhere` \
            every endpoint does."
    ),
    tags(
        (name = "inference", description = "Predictions, through the same batcher and backends as the shared-memory rings"),
        (name = "models", description = "Loading, reloading and unloading models; fault injection"),
        (name = "monitoring", description = "Performance figures, Prometheus metrics and this document"),
        (name = "health", description = "Liveness and readiness probes"),
        (name = "open-inference-protocol", description = "The Open Inference Protocol (KServe v2) REST API, with the binary tensor data extension and Triton's statistics and model repository extensions: tritonclient and KServe clients work unchanged")
    ),
    modifiers(&BearerToken),
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
        metrics,
        super::v2::server_metadata,
        super::v2::live,
        super::v2::ready,
        super::v2::model_metadata,
        super::v2::model_ready,
        super::v2::infer,
        super::v2::model_stats,
        super::v2::repository_index,
        super::v2::repository_load,
        super::v2::repository_unload
    ),
    components(schemas(ErrorBody, FaultRequest, ReadyReport, ModelReadiness, ChangeReport, Liveness))
)]
pub struct ApiDoc;

/// Adds the bearer-token scheme the state-changing endpoints name.
struct BearerToken;

impl utoipa::Modify for BearerToken {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some(
                        "The token in `server.api_token_file` (`Authorization: Bearer <token>`)",
                    ))
                    .build(),
            ),
        );
    }
}

/// The Open Inference Protocol's REST routes (see [`super::v2`]); a model's routes also take
/// `/versions/{version}` after its name.
fn open_inference_protocol() -> Router<Arc<HttpState>> {
    use super::v2;
    let mut router = Router::new()
        .route("/v2", get(v2::server_metadata))
        .route("/v2/health/live", get(v2::live))
        .route("/v2/health/ready", get(v2::ready))
        .route("/v2/models/stats", get(v2::model_stats))
        .route("/v2/repository/index", post(v2::repository_index))
        .route(
            "/v2/repository/models/{name}/load",
            post(v2::repository_load),
        )
        .route(
            "/v2/repository/models/{name}/unload",
            post(v2::repository_unload),
        );
    for model in ["/v2/models/{name}", "/v2/models/{name}/versions/{version}"] {
        router = router
            .route(model, get(v2::model_metadata))
            .route(&format!("{model}/ready"), get(v2::model_ready))
            .route(&format!("{model}/infer"), post(v2::infer))
            .route(&format!("{model}/stats"), get(v2::model_stats));
    }
    router
}

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
        .merge(open_inference_protocol())
        .fallback(no_route)
        .method_not_allowed_fallback(wrong_method)
        .layer(axum::extract::DefaultBodyLimit::max(MAX_BODY_BYTES))
        .layer(axum::middleware::from_fn(read_body_in_time))
        .layer(axum::middleware::from_fn(refuse_large_bodies))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            require_token,
        ))
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

/// How long a request's body may take to arrive once its headers have.
pub const BODY_TIMEOUT: Duration = Duration::from_secs(10);

/// Reads the body (at most [`MAX_BODY_BYTES`]) within [`BODY_TIMEOUT`], so a client that
/// sends its headers and then trickles the body cannot hold a connection for ever.
pub(super) async fn read_body_in_time(req: Request, next: Next) -> Response {
    let (parts, body) = req.into_parts();
    let read = tokio::time::timeout(BODY_TIMEOUT, axum::body::to_bytes(body, MAX_BODY_BYTES));
    match read.await {
        Ok(Ok(bytes)) => {
            next.run(Request::from_parts(parts, axum::body::Body::from(bytes)))
                .await
        }
        Ok(Err(_)) => ApiError(InferenceError::PayloadTooLarge {
            message: format!("the body is over the limit of {MAX_BODY_BYTES} bytes, or broke off"),
        })
        .into_response(),
        Err(_) => ApiError(InferenceError::InvalidRequest {
            message: format!(
                "the request body did not arrive within {} s",
                BODY_TIMEOUT.as_secs()
            ),
        })
        .into_response(),
    }
}

/// The error kind of a response, set where the error response is made.
#[derive(Clone, Copy, Debug)]
pub(super) struct CountedKind(pub(super) &'static str);

/// The body of a route-level error: the Open Inference Protocol's form under `/v2`, tie's
/// elsewhere.
fn route_error(path: &str, kind: &str, message: String) -> serde_json::Value {
    if path.starts_with("/v2") {
        serde_json::json!({ "error": message })
    } else {
        serde_json::json!({ "error": {"kind": kind}, "message": message })
    }
}

pub(super) async fn no_route(req: Request) -> Response {
    let path = req.uri().path();
    let body = route_error(
        path,
        "NotFound",
        format!("no route {} {path}", req.method()),
    );
    let mut response = (StatusCode::NOT_FOUND, Json(body)).into_response();
    response.extensions_mut().insert(CountedKind("NotFound"));
    response
}

pub(super) async fn wrong_method(req: Request) -> Response {
    let path = req.uri().path();
    let body = route_error(
        path,
        "MethodNotAllowed",
        format!("{} is not allowed on {path}", req.method()),
    );
    let mut response = (StatusCode::METHOD_NOT_ALLOWED, Json(body)).into_response();
    response
        .extensions_mut()
        .insert(CountedKind("MethodNotAllowed"));
    response
}
