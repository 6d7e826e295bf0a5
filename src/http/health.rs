//! Liveness, readiness and Prometheus metrics.
#![forbid(unsafe_code)]

use std::collections::HashMap;
use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;

use super::app::*;
use crate::monitor;

/// Liveness: the process answers.
#[utoipa::path(
    get,
    path = "/health/live",
    tag = "health",
    responses((status = 200, description = "Alive", body = Liveness, example = json!({"status": "live"})))
)]
pub(super) async fn live() -> Response {
    Json(Liveness { status: "live" }).into_response()
}

/// The answer of the liveness probe.
#[derive(Clone, Debug, serde::Serialize, utoipa::ToSchema)]
pub struct Liveness {
    /// Always `live`.
    pub status: &'static str,
}

/// Readiness of one model.
#[derive(Clone, Debug, serde::Serialize, utoipa::ToSchema)]
pub struct ModelReadiness {
    /// `name:version`.
    pub model_key: String,
    /// Whether it passed its last health check.
    pub ready: bool,
    /// Why not.
    pub reason: Option<String>,
}

/// The readiness report.
#[derive(Clone, Debug, serde::Serialize, utoipa::ToSchema)]
pub struct ReadyReport {
    /// Every model loaded, warmed up and passing its health check.
    pub ready: bool,
    /// Still loading.
    pub loading: bool,
    /// Per model.
    pub models: Vec<ModelReadiness>,
}

/// Readiness of the server and of each model.
///
/// 200 when every version the repository's configs asked for at the last load or reload is
/// loaded, warmed up and passes its health check (or was unloaded as unused and
/// loads on demand); 503 otherwise, with the reasons (a version missing is listed with why).
#[utoipa::path(
    get,
    path = "/health/ready",
    tag = "health",
    responses(
        (status = 200, description = "Ready", body = ReadyReport),
        (status = 503, description = "Loading, or a model failed its health check", body = ReadyReport)
    )
)]
pub(super) async fn ready(State(state): State<Arc<HttpState>>) -> Response {
    let report = ready_report(&state).await;
    let code = if report.ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (code, Json(report)).into_response()
}

/// The server's readiness and each model's (see [`ready`]).
pub(super) async fn ready_report(state: &HttpState) -> ReadyReport {
    match state.serving.get() {
        None => ReadyReport {
            ready: false,
            loading: true,
            models: Vec::new(),
        },
        Some(s) => {
            let manager = s.manager.clone();
            let missing = tokio::task::spawn_blocking(move || manager.missing_versions())
                .await
                .unwrap_or_else(|e| {
                    vec![(
                        "?".into(),
                        format!("the readiness check of the repository failed: {e}"),
                    )]
                });
            let mut models: Vec<ModelReadiness> = s
                .models
                .snapshot()
                .loaded()
                .into_iter()
                .map(|(_, m)| ModelReadiness {
                    model_key: m.key(),
                    ready: m.health.is_ready(),
                    reason: m.health.reason(),
                })
                .collect();
            models.extend(missing.into_iter().map(|(key, why)| ModelReadiness {
                model_key: key,
                ready: false,
                reason: Some(why),
            }));
            ReadyReport {
                // Nothing loaded and nothing to load on demand (every model unloaded on
                // purpose) is not ready to serve.
                ready: (!models.is_empty() || s.manager.has_unused_unloaded())
                    && models.iter().all(|m| m.ready),
                loading: false,
                models,
            }
        }
    }
}

/// Prometheus text exposition.
#[utoipa::path(
    get,
    path = "/metrics",
    tag = "monitoring",
    responses((status = 200, description = "Prometheus text format 0.0.4", content_type = "text/plain"))
)]
pub(super) async fn metrics(State(state): State<Arc<HttpState>>) -> Response {
    let mut registry = prometheus_client::registry::Registry::default();
    if let Some(s) = state.serving.get() {
        let set = s.models.snapshot();
        // The versions served now (one unloaded a moment ago may still have an entry) and the
        // named ensembles (ready when all their members are served and ready).
        let mut ready: HashMap<usize, bool> = set
            .loaded()
            .into_iter()
            .map(|(_, m)| (m.monitor_index, m.health.is_ready()))
            .collect();
        for (name, e) in &s.manager.routing().ensembles {
            if let Some(i) = s.manager.ensemble_index(name) {
                let members_ready = e
                    .members
                    .iter()
                    .all(|m| s.by_key(&m.key()).is_ok_and(|t| t.model.health.is_ready()));
                ready.insert(i, members_ready);
            }
        }
        s.monitor
            .register(&|i| ready.get(&i).copied(), &mut registry);
    }
    state.counters.register(&mut registry);
    registry.register_collector(Box::new(monitor::ProcessFamilies));
    (
        [(header::CONTENT_TYPE, monitor::CONTENT_TYPE)],
        monitor::prometheus::encode(&registry),
    )
        .into_response()
}
