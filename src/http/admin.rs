//! Model management endpoints: what is loaded, performance, reload, load, unload, injected faults, the OpenAPI document.
#![forbid(unsafe_code)]

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::response::{IntoResponse, Response};
use axum::Json;
use utoipa::OpenApi;

use crate::http::api::{
    ErrorBody, InferenceError, LoadedModelInfo, ModelPerformanceProfile, ModelPlacement,
    PlacementTiming, TensorSpec,
};
use crate::models::fault::FaultMode;
use crate::models::LoadedModel;
use crate::models::{ChangeError, ChangeReport, ModelManager, ModelSet};
use crate::monitor::ModelPerformanceMetrics;

use super::{app::*, error::*, pool::*};

/// The models loaded, with their specs, load profile and health.
#[utoipa::path(
    get,
    tag = "models",
    path = "/api/v1/internal/inference/models/loaded",
    responses(
        (status = 200, description = "Loaded models", body = Vec<LoadedModelInfo>),
        (status = 503, description = "The server is loading", body = ErrorBody)
    )
)]
pub(super) async fn loaded_models(State(state): State<Arc<HttpState>>) -> Response {
    answer(state.serving().map(|serving| Json(all_models(serving))))
}

/// Every version loaded, then every one that failed to load (unavailable, with why).
pub(super) fn all_models(serving: &Serving) -> Vec<LoadedModelInfo> {
    let set = serving.models.snapshot();
    let mut list: Vec<LoadedModelInfo> = set
        .loaded()
        .into_iter()
        .map(|(i, m)| model_info(serving, &set, i, m))
        .collect();
    list.extend(serving.manager.failures().iter().map(unavailable_info));
    if let Some(remote) = serving.manager.remote() {
        for (key, d) in remote.downloads() {
            let (name, version) = key.rsplit_once(':').unwrap_or((key.as_str(), ""));
            let mut info = pending_info(
                &key,
                name,
                version.to_string(),
                format!(
                    "downloading: {} of {} bytes, {:.1} MB/s",
                    d.bytes,
                    d.total.map_or_else(|| "?".to_string(), |t| t.to_string()),
                    d.bytes_per_sec / 1e6
                ),
                chrono::Utc::now(),
            );
            info.download = Some(crate::http::api::DownloadProgress {
                bytes: d.bytes,
                total_bytes: d.total,
                bytes_per_sec: d.bytes_per_sec,
            });
            list.push(info);
        }
    }
    list
}

/// The entry of a model or version that failed to load: not ready, `available` false, the
/// reason in `not_ready_reason`; the figures it never had are empty.
fn unavailable_info(f: &crate::models::FailedVersion) -> LoadedModelInfo {
    pending_info(
        &f.key(),
        &f.name,
        f.version.map_or_else(String::new, |v| v.to_string()),
        format!("failed to load: {}", f.reason),
        f.at,
    )
}

/// The entry of a version not loaded: not ready, `available` false, `why` in
/// `not_ready_reason`; the figures it does not have are empty.
fn pending_info(
    key: &str,
    name: &str,
    version: String,
    why: String,
    at: chrono::DateTime<chrono::Utc>,
) -> LoadedModelInfo {
    LoadedModelInfo {
        model_key: key.to_string(),
        model_name: name.to_string(),
        version,
        is_default: false,
        architecture: String::new(),
        inference_device: String::new(),
        engine: String::new(),
        input_specs: Vec::new(),
        output_specs: Vec::new(),
        layout: String::new(),
        layout_hash: String::new(),
        feature_names: Vec::new(),
        performance_profile: ModelPerformanceProfile {
            avg_inference_time_ms: None,
            p50_inference_time_ms: None,
            p95_inference_time_ms: None,
            p99_inference_time_ms: None,
            max_batch_size: 0,
            optimal_batch_size: None,
            memory_usage_mb: None,
            gpu_utilization: None,
            throughput_samples_per_sec: None,
        },
        placement: None,
        load_timestamp: at,
        last_used: None,
        usage_count: 0,
        available: false,
        ready: false,
        not_ready_reason: Some(why),
        health_checks: 0,
        health_check_failures: 0,
        labels: Vec::new(),
        checksum: String::new(),
        load_time_ms: 0.0,
        download: None,
    }
}

pub(super) fn model_info(
    serving: &Serving,
    set: &ModelSet,
    index: usize,
    m: &LoadedModel,
) -> LoadedModelInfo {
    let info = m.backend.info();
    let largest = m.batch.largest_batch() as i32;
    let spec = |name: &str, width: usize, description: Option<&String>| TensorSpec {
        name: name.to_string(),
        description: description.cloned(),
        data_type: "Float32".into(),
        shape: vec![-1, width as i32],
        is_dynamic: true,
        min_shape: Some(vec![1, width as i32]),
        max_shape: Some(vec![largest, width as i32]),
    };
    let batch1 = m
        .profile
        .as_ref()
        .and_then(|p| p.timings.iter().find(|t| t.batch_size == 1));
    let ms = |ns: u64| ns as f32 / 1e6;
    let metrics = serving.monitor.metrics(m.monitor_index);
    let (checks, failures) = m.health.counts();
    LoadedModelInfo {
        model_key: m.key(),
        model_name: m.name.clone(),
        version: m.version.to_string(),
        is_default: set.is_default(index),
        architecture: info.architecture.clone(),
        inference_device: info.device.clone(),
        engine: info.engine.to_string(),
        input_specs: vec![spec(&info.io.input_name, info.io.input_width, None)],
        output_specs: vec![spec(
            &info.io.output_name,
            info.io.output_width,
            info.io.output_note.as_ref(),
        )],
        layout: m.layout.name.clone(),
        layout_hash: format!("{:016x}", m.layout_hash),
        feature_names: m.layout.features.clone(),
        performance_profile: ModelPerformanceProfile {
            avg_inference_time_ms: None,
            p50_inference_time_ms: batch1.map(|t| ms(t.p50_ns)),
            p95_inference_time_ms: batch1.map(|t| ms(t.p95_ns)),
            p99_inference_time_ms: batch1.map(|t| ms(t.p99_ns)),
            max_batch_size: m.batch.largest_batch() as u32,
            optimal_batch_size: m.profile.as_ref().map(|p| p.optimal_batch_size as u32),
            memory_usage_mb: metrics.memory_usage_mb,
            gpu_utilization: metrics.gpu_utilization,
            throughput_samples_per_sec: m.profile.as_ref().and_then(|p| {
                p.timings
                    .iter()
                    .map(|t| t.throughput() as f32)
                    .reduce(f32::max)
            }),
        },
        placement: m.placement.as_ref().map(|p| ModelPlacement {
            rule: p.rule(),
            cpu_up_to_batch_size: p.cpu_up_to() as u32,
            cpu_engine: p.cpu_engine.into(),
            gpu_engine: p.gpu_engine.into(),
            measured: p
                .measured
                .iter()
                .map(|&(size, cpu, gpu)| PlacementTiming {
                    batch_size: size as u32,
                    cpu_p50_us: cpu as f64 / 1e3,
                    gpu_p50_us: gpu as f64 / 1e3,
                })
                .collect(),
        }),
        load_timestamp: m.loaded_at,
        last_used: serving.monitor.last_request(m.monitor_index),
        usage_count: metrics.total_requests,
        available: true,
        ready: m.health.is_ready(),
        not_ready_reason: m.health.reason(),
        health_checks: checks,
        health_check_failures: failures,
        labels: set.labels_of(&m.name, m.version),
        checksum: m.checksum.clone(),
        load_time_ms: m.load_time.as_secs_f64() * 1e3,
        download: None,
    }
}

/// A model's performance figures.
///
/// `model_key`: `name:version`, or `name` for its default version; a named ensemble by
/// `name` or `name:ensemble`.
#[utoipa::path(
    get,
    tag = "monitoring",
    path = "/api/v1/internal/inference/performance/{model_key}",
    params(("model_key" = String, Path, description = "name:version, or name for the default version")),
    responses(
        (status = 200, description = "Performance metrics", body = ModelPerformanceMetrics),
        (status = 404, description = "Unknown model", body = ErrorBody),
        (status = 503, description = "The server is loading", body = ErrorBody)
    )
)]
pub(super) async fn model_performance(
    State(state): State<Arc<HttpState>>,
    Path(model_key): Path<String>,
) -> Response {
    answer((|| {
        let serving = state.serving()?;
        // A named ensemble: `name` or `name:ensemble`.
        let ensemble = model_key.strip_suffix(":ensemble").unwrap_or(&model_key);
        if let Some(index) = serving.manager.ensemble_index(ensemble) {
            return Ok(Json(serving.monitor.metrics(index)));
        }
        let target = serving.by_key(&model_key)?;
        Ok(Json(serving.monitor.metrics(target.model.monitor_index)))
    })())
}

/// The fault to inject into a model.
#[derive(Clone, Copy, Debug, serde::Deserialize, serde::Serialize, utoipa::ToSchema)]
pub struct FaultRequest {
    /// `fail`, `corrupt` or `none`.
    pub mode: FaultMode,
}

/// Injects a fault into a model's backend.
///
/// Only with `server.fault_injection = true`: for drills and tests of alerts and health
/// checks.
#[utoipa::path(
    post,
    tag = "models",
    security(("bearer" = [])),
    path = "/api/v1/internal/inference/models/{model_key}/fault",
    params(("model_key" = String, Path, description = "name:version, or name for the default version")),
    request_body = FaultRequest,
    responses(
        (status = 200, description = "Fault set", body = FaultRequest),
        (status = 401, description = "Bearer token missing or wrong", body = ErrorBody),
        (status = 403, description = "Fault injection is disabled", body = ErrorBody),
        (status = 404, description = "Unknown model", body = ErrorBody)
    )
)]
pub(super) async fn inject_fault(
    State(state): State<Arc<HttpState>>,
    Path(model_key): Path<String>,
    headers: axum::http::HeaderMap,
    body: Result<ApiJson<FaultRequest>, ApiError>,
) -> Response {
    answer((|| {
        state.authorize(&headers)?;
        if !state.fault_injection {
            return Err(ApiError(InferenceError::Forbidden {
                message: "fault injection is disabled (server.fault_injection = false)".into(),
            }));
        }
        let ApiJson(fault) = body?;
        let serving = state.serving()?;
        let m = serving.by_key(&model_key)?.model;
        let switch = m.fault.as_ref().ok_or_else(|| InferenceError::Forbidden {
            message: format!("{} was loaded without fault injection", m.key()),
        })?;
        switch.set(fault.mode);
        tracing::warn!(model = %m.key(), mode = ?fault.mode, "fault injected");
        Ok(Json(fault))
    })())
}

/// Runs a change of the model set off the async threads (loading takes seconds).
pub(super) async fn change(
    state: &HttpState,
    headers: &axum::http::HeaderMap,
    model: &str,
    f: impl FnOnce(&ModelManager) -> Result<ChangeReport, ChangeError> + Send + 'static,
) -> Result<Json<ChangeReport>, ApiError> {
    state.authorize(headers)?;
    let manager = state.serving()?.manager.clone();
    let report = tokio::task::spawn_blocking(move || f(&manager))
        .await
        .map_err(|e| InferenceError::BatchProcessingError {
            operation: format!("model change task failed: {e}"),
        })?;
    match report {
        Ok(r) => Ok(Json(r)),
        Err(e) => {
            tracing::error!(model, error = %e, "model change refused; the versions serving go on");
            Err(ApiError(change_error(e, model)))
        }
    }
}

/// Reloads the whole repository.
///
/// Every model's versions as its config's policy asks (new ones built and warmed before
/// anything switches), new models loaded, models whose directory is gone unloaded. A failure
/// changes nothing.
#[utoipa::path(
    post,
    tag = "models",
    security(("bearer" = [])),
    path = "/api/v1/internal/inference/models/reload",
    responses(
        (status = 200, description = "Reloaded", body = ChangeReport),
        (status = 401, description = "Bearer token missing or wrong", body = ErrorBody),
        (status = 409, description = "A new default changes the layout of sessions following it", body = ErrorBody),
        (status = 422, description = "A version failed to load; nothing changed", body = ErrorBody)
    )
)]
pub(super) async fn reload_models(
    State(state): State<Arc<HttpState>>,
    headers: axum::http::HeaderMap,
) -> Response {
    answer(change(&state, &headers, "", |m| m.reload_all()).await)
}

/// A version the load must include.
#[derive(Clone, Copy, Debug, serde::Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct LoadQuery {
    /// Refused unless the model's version policy loads it; the load itself loads what the
    /// policy picks.
    pub version: Option<u32>,
}

/// Loads or reloads one model from the repository.
///
/// Its config is read again; the new versions are built and warmed before sessions switch to
/// them. A failure changes nothing.
#[utoipa::path(
    post,
    tag = "models",
    security(("bearer" = [])),
    path = "/api/v1/internal/inference/models/{model_name}/load",
    params(("model_name" = String, Path, description = "The model's directory in the repository"), LoadQuery),
    responses(
        (status = 200, description = "Loaded", body = ChangeReport),
        (status = 401, description = "Bearer token missing or wrong", body = ErrorBody),
        (status = 404, description = "No such model in the repository", body = ErrorBody),
        (status = 409, description = "The new default changes the layout of sessions following it", body = ErrorBody),
        (status = 422, description = "A version failed to load; nothing changed", body = ErrorBody)
    )
)]
pub(super) async fn load_model(
    State(state): State<Arc<HttpState>>,
    Path(model_name): Path<String>,
    headers: axum::http::HeaderMap,
    query: Result<axum::extract::Query<LoadQuery>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let version = match query {
        Ok(q) => q.version,
        Err(e) => {
            return answer::<Json<ChangeReport>>(Err(ApiError(InferenceError::InvalidRequest {
                message: e.body_text(),
            })))
        }
    };
    let name = model_name.clone();
    answer(
        change(&state, &headers, &model_name, move |m| {
            m.reload(&name, version)
        })
        .await,
    )
}

/// Unloads a version, or every version of a model.
///
/// `name:version` (a label accepted) unloads one version, `name` every version. Sessions
/// following the model's default move to its highest remaining compatible version
/// (the new default; with none, the model has no default and they close); sessions pinned to
/// it have their requests answered, then close.
#[utoipa::path(
    post,
    path = "/api/v1/internal/inference/models/{model_key}/unload",
    tag = "models",
    security(("bearer" = [])),
    params(("model_key" = String, Path, description = "name:version, or name for every version")),
    responses(
        (status = 200, description = "Unloaded", body = ChangeReport),
        (status = 401, description = "Bearer token missing or wrong", body = ErrorBody),
        (status = 404, description = "Not loaded", body = ErrorBody)
    )
)]
pub(super) async fn unload_model(
    State(state): State<Arc<HttpState>>,
    Path(model_key): Path<String>,
    headers: axum::http::HeaderMap,
) -> Response {
    let key = model_key.clone();
    answer(change(&state, &headers, &model_key, move |m| m.unload(&key)).await)
}

/// This document.
#[utoipa::path(
    get,
    tag = "monitoring",
    path = "/api/v1/internal/inference/openapi.json",
    responses((status = 200, description = "The OpenAPI document", content_type = "application/json"))
)]
pub(super) async fn openapi_json() -> Response {
    Json(ApiDoc::openapi()).into_response()
}
