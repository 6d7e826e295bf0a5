//! `predict` and `batch-predict`: rows validated, run through the rings, answered.
#![forbid(unsafe_code)]

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::response::Response;
use axum::Json;
use chrono::Utc;
use tie_client::{monotonic_ns, Priority};

use crate::http::api::{
    ErrorBody, InferenceError, InferenceMetrics, InferenceRequest, InferenceResponse,
    ModelInferenceMetadata, Prediction,
};
use crate::models::LoadedModel;

use super::{app::*, contributions::*, error::*, pool::*};

/// Runs `rows` rows through `target`'s sessions, waiting for a session until `wait_until`;
/// returns one response per row, or the first error status as an [`InferenceError`].
pub(super) async fn run_rows(
    serving: &Arc<Serving>,
    target: &Target,
    features: Vec<f32>,
    rows: usize,
    prio: Priority,
    deadline_ns: Option<u64>,
    wait_until: Instant,
) -> Result<Vec<tie_client::Response>, InferenceError> {
    let model = &target.model;
    // A session of the model's budget, waited for until the request's own time is up.
    let permits = serving.permits(&target.pool);
    let session = tokio::time::timeout_at(wait_until.into(), permits.acquire_owned())
        .await
        .map_err(|_| InferenceError::QueueFull {
            message: format!(
                "all {SESSIONS_PER_MODEL} HTTP sessions of {} stayed busy",
                model.key()
            ),
        })?
        .map_err(|_| InferenceError::Disconnected {
            message: "the server is stopping".into(),
        })?;
    let s = serving.clone();
    let t = target.clone();
    let responses = tokio::task::spawn_blocking(move || {
        let _session = session;
        s.execute(&t, &features, rows, prio, deadline_ns, wait_until)
    })
    .await
    .map_err(|e| InferenceError::BatchProcessingError {
        operation: format!("request task failed: {e}"),
    })??;
    if let Some(bad) = responses.iter().find(|r| !r.status.is_ok()) {
        let error = bad.error().expect("an error status");
        return Err(InferenceError::from_server(&error, &model.key(), || {
            model
                .health
                .reason()
                .unwrap_or_else(|| "it failed its health check".into())
        }));
    }
    Ok(responses)
}

/// Runs a request on the model (and version) it names; with `weights`, adds each
/// prediction's feature contributions.
pub(super) async fn run_model(
    serving: Arc<Serving>,
    request: InferenceRequest,
    weights: Option<HashMap<String, f32>>,
) -> Result<InferenceResponse, InferenceError> {
    let started = Instant::now();
    let (target, model_load_time_ms) = resolve_loading(
        &serving,
        &request.model_name,
        request.model_version.as_deref(),
    )
    .await?;
    validate(&request, &target.model)?;
    let rows = request.batch_size;
    let wanted = wanted_contributions(weights.as_ref(), &target.model, rows)?;
    // Feature contributions run two perturbed rows per feature asked for and row.
    let perturbed = wanted.as_ref().map_or(0, |w| 2 * w.len() * rows);
    serving.take_rows(rows.saturating_add(perturbed))?;
    let (deadline_ns, wait_until) = timing(request.timeout_ms);
    let prio = priority(request.priority);
    let responses = run_rows(
        &serving,
        &target,
        request.input_features.clone(),
        rows,
        prio,
        deadline_ns,
        wait_until,
    )
    .await?;
    let (answered, versions) = answering_version(&serving, &target.model, &responses);
    let model = answered.clone().unwrap_or_else(|| target.model.clone());
    let contributions = match &wanted {
        Some(w) => {
            if versions.len() > 1 || answered.is_none() {
                return Err(InferenceError::Conflict {
                    message: "the model's default version changed during the request (the version that answered is gone); ask again for its contributions".into(),
                });
            }
            // The same version, pinned, for the perturbed rows.
            let pinned = Target {
                pool: (model.name.clone(), Some(model.version)),
                model: model.clone(),
            };
            let features = &request.input_features;
            Some(
                contributions(
                    &serving, &pinned, features, rows, w, &responses, prio, wait_until,
                )
                .await?,
            )
        }
        None => None,
    };
    let predictions = predictions(&model, &responses, contributions.as_deref());
    Ok(into_response(Answered {
        serving: &serving,
        request_id: request.request_id,
        model: &model,
        versions: &versions,
        responses: &responses,
        predictions,
        total_ms: started.elapsed().as_secs_f32() * 1e3,
        model_load_time_ms,
    }))
}

/// A request's deadline (monotonic ns) from its `timeout_ms`, and how long to wait for its
/// answers: the timeout (or [`DEFAULT_WAIT`]) and a grace for the answer to a passed deadline,
/// which the server makes itself, to come back.
pub(super) fn timing(timeout_ms: Option<u64>) -> (Option<u64>, Instant) {
    let wait = timeout_ms.map_or(DEFAULT_WAIT, Duration::from_millis);
    let deadline_ns =
        timeout_ms.map(|ms| monotonic_ns().saturating_add(ms.saturating_mul(1_000_000)));
    (
        deadline_ns,
        Instant::now() + wait + Duration::from_millis(100),
    )
}

/// Checks a request against the model it resolved to: the batch size, the timeout, the
/// feature count and names, and non-finite values (unless the layout allows them).
pub(super) fn validate(
    request: &InferenceRequest,
    model: &LoadedModel,
) -> Result<(), InferenceError> {
    let width = model.input_width();
    let rows = request.batch_size;
    if rows == 0 || rows > MAX_ROWS {
        return Err(InferenceError::InvalidRequest {
            message: format!("batch_size must be in 1..={MAX_ROWS}, not {rows}"),
        });
    }
    if request.timeout_ms.is_some_and(|ms| ms > MAX_TIMEOUT_MS) {
        return Err(InferenceError::InvalidRequest {
            message: format!("timeout_ms must be at most {MAX_TIMEOUT_MS}"),
        });
    }
    let expected = rows.saturating_mul(width);
    if request.input_features.len() != expected {
        return Err(InferenceError::InvalidInputShape {
            expected,
            actual: request.input_features.len(),
        });
    }
    if !request.feature_names.is_empty() && request.feature_names != model.layout.features {
        return Err(InferenceError::InvalidRequest {
            message: format!(
                "feature_names differ from layout {:?} of {} (expected {:?})",
                model.layout.name,
                model.key(),
                model.layout.features
            ),
        });
    }
    if !model.layout.allow_non_finite {
        if let Some(i) = request.input_features.iter().position(|f| !f.is_finite()) {
            return Err(InferenceError::Rejected {
                message: format!("feature {} of row {} is not finite", i % width, i / width),
            });
        }
    }
    Ok(())
}

/// The features whose contributions are asked for (by index, ascending), with their weights;
/// every feature with weight 1 for an empty map; refused past [`MAX_CONTRIBUTION_VALUES`].
fn wanted_contributions(
    weights: Option<&HashMap<String, f32>>,
    model: &LoadedModel,
    rows: usize,
) -> Result<Option<Vec<(usize, f32)>>, InferenceError> {
    let width = model.input_width();
    let wanted: Vec<(usize, f32)> = match weights {
        None => return Ok(None),
        Some(w) if w.is_empty() => (0..width).map(|i| (i, 1.0)).collect(),
        Some(w) => {
            let mut wanted = Vec::new();
            for (name, weight) in w {
                let Some(i) = model.layout.features.iter().position(|f| f == name) else {
                    return Err(InferenceError::InvalidRequest {
                        message: format!(
                            "feature_weights names {name:?}, not a feature of layout {:?}",
                            model.layout.name
                        ),
                    });
                };
                wanted.push((i, *weight));
            }
            wanted.sort_by_key(|&(i, _)| i);
            wanted
        }
    };
    let values = 2 * wanted.len() * rows * width;
    if values > MAX_CONTRIBUTION_VALUES {
        return Err(InferenceError::InvalidRequest {
            message: format!(
                "feature contributions of {} features over {rows} rows of {width} take {} rows ({values} values); at most {MAX_CONTRIBUTION_VALUES} values",
                wanted.len(),
                2 * wanted.len() * rows
            ),
        });
    }
    Ok(Some(wanted))
}

/// The version that answered, and every version that did in order: a request that named none
/// follows the default, which a reload may move between two of its rows (then the answering
/// instance is `None` when it is gone).
pub(super) fn answering_version(
    serving: &Serving,
    model: &Arc<LoadedModel>,
    responses: &[tie_client::Response],
) -> (Option<Arc<LoadedModel>>, Vec<u32>) {
    let mut versions: Vec<u32> = responses.iter().map(|r| r.model_version).collect();
    versions.dedup();
    let answered = match versions.as_slice() {
        [v] if *v != model.version => {
            let set = serving.models.snapshot();
            set.resolve(&model.name, Some(*v))
                .and_then(|slot| set.get(slot).cloned())
        }
        _ => Some(model.clone()),
    };
    (answered, versions)
}

/// The predictions of `responses`, row by row and output by output (the uncertainty column
/// left out), each with its confidence and, when asked for, its contributions.
fn predictions(
    model: &LoadedModel,
    responses: &[tie_client::Response],
    contributions: Option<&[Vec<HashMap<String, f32>>]>,
) -> Vec<Prediction> {
    let uncertainty = model.config.uncertainty_output;
    let now = Utc::now();
    let mut predictions = Vec::with_capacity(responses.len() * model.output_width());
    for (r, response) in responses.iter().enumerate() {
        let outputs = response.outputs();
        for (o, &value) in outputs.iter().enumerate() {
            if uncertainty == Some(o) {
                continue;
            }
            predictions.push(Prediction {
                value,
                row: r as u32,
                output: o as u32,
                confidence: match uncertainty {
                    Some(k) => crate::dataplane::confidence_from_uncertainty(outputs[k]),
                    None => crate::dataplane::confidence(value),
                },
                timestamp: now,
                feature_contributions: contributions.map(|c| c[r][o].clone()),
            });
        }
    }
    predictions
}

/// What [`into_response`] answers from.
struct Answered<'a> {
    pub(super) serving: &'a Serving,
    pub(super) request_id: String,
    pub(super) model: &'a LoadedModel,
    pub(super) versions: &'a [u32],
    pub(super) responses: &'a [tie_client::Response],
    pub(super) predictions: Vec<Prediction>,
    pub(super) total_ms: f32,
    pub(super) model_load_time_ms: Option<f32>,
}

/// The API's response: the predictions, the model's metadata and the request's figures.
fn into_response(a: Answered<'_>) -> InferenceResponse {
    let ms = |ns: u64| ns as f32 / 1e6;
    let model = a.model;
    let rows = a.responses.len();
    let info = model.backend.info();
    InferenceResponse {
        request_id: a.request_id,
        predictions: a.predictions,
        model_metadata: ModelInferenceMetadata {
            model_name: model.name.clone(),
            model_version: a
                .versions
                .iter()
                .map(u32::to_string)
                .collect::<Vec<_>>()
                .join(","),
            architecture: info.architecture.clone(),
            input_shape: vec![rows as u32, model.input_width() as u32],
            output_shape: vec![rows as u32, model.output_width() as u32],
            inference_device: info.device.clone(),
            batch_size_used: rows,
        },
        performance_metrics: InferenceMetrics {
            preprocessing_time_ms: a.responses.iter().map(|r| ms(r.queue_ns)).reduce(f32::max),
            inference_time_ms: a
                .responses
                .iter()
                .map(|r| ms(r.compute_ns))
                .reduce(f32::max),
            postprocessing_time_ms: None,
            total_time_ms: a.total_ms,
            gpu_utilization: a.serving.monitor.gpu_utilization(model.monitor_index),
            memory_used_mb: info
                .device_memory_bytes
                .map(|b| (b as f64 / 1048576.0) as f32),
            throughput_samples_per_sec: if a.total_ms > 0.0 {
                rows as f32 * 1e3 / a.total_ms
            } else {
                0.0
            },
            model_load_time_ms: a.model_load_time_ms,
        },
        error: None,
    }
}

/// Runs a prediction through the same batcher and backend as the rings.
#[utoipa::path(
    post,
    path = "/api/v1/internal/inference/predict",
    tag = "inference",
    request_body = InferenceRequest,
    responses(
        (status = 200, description = "Prediction completed", body = InferenceResponse),
        (status = 400, description = "Invalid request, wrong feature count, non-finite value", body = ErrorBody),
        (status = 404, description = "Unknown model or version", body = ErrorBody),
        (status = 413, description = "Body too large", body = ErrorBody),
        (status = 415, description = "The body is not said to be JSON (Content-Type)", body = ErrorBody),
        (status = 429, description = "Queue full or too many requests in progress", body = ErrorBody),
        (status = 500, description = "Inference error", body = ErrorBody),
        (status = 503, description = "Not ready (loading, or the model failed its health check)", body = ErrorBody),
        (status = 504, description = "Deadline passed", body = ErrorBody)
    )
)]
pub(super) async fn predict(
    State(state): State<Arc<HttpState>>,
    body: Result<ApiJson<InferenceRequest>, ApiError>,
) -> Response {
    answer(
        async {
            let ApiJson(request) = body?;
            let serving = state.serving()?.clone();
            let _permit = state.limit_permit()?;
            Ok(Json(run_request(serving, request).await?))
        }
        .await,
    )
}

/// Runs several predictions; each is answered, failed ones with their `error` set.
#[utoipa::path(
    post,
    path = "/api/v1/internal/inference/batch-predict",
    tag = "inference",
    request_body = Vec<InferenceRequest>,
    responses(
        (status = 200, description = "Batch prediction completed (each response carries its own error)", body = Vec<InferenceResponse>),
        (status = 400, description = "Not a list of requests, or more than 1024", body = ErrorBody),
        (status = 415, description = "The body is not said to be JSON (Content-Type)", body = ErrorBody),
        (status = 429, description = "Too many requests in progress", body = ErrorBody),
        (status = 503, description = "The server is loading", body = ErrorBody)
    )
)]
pub(super) async fn batch_predict(
    State(state): State<Arc<HttpState>>,
    body: Result<ApiJson<Vec<InferenceRequest>>, ApiError>,
) -> Response {
    answer(
        async {
            let ApiJson(requests) = body?;
            if requests.len() > MAX_BATCH_REQUESTS {
                return Err(ApiError(InferenceError::InvalidRequest {
                    message: format!(
                        "{} requests; a batch-predict takes at most {MAX_BATCH_REQUESTS}",
                        requests.len()
                    ),
                }));
            }
            let serving = state.serving()?.clone();
            // Each request of the batch holds a permit of max_concurrent_requests while it runs;
            // one that finds none is answered QueueFull.
            let tasks: Vec<_> = requests
                .into_iter()
                .map(|r| {
                    let serving = serving.clone();
                    let skeleton = failed_response(&serving, &r);
                    let limit = state.limit.clone();
                    let task = tokio::spawn(async move {
                        // Items of a batch wait their turn (up to the default wait) rather than
                        // failing while their own batch holds the permits.
                        let _permit = tokio::time::timeout(DEFAULT_WAIT, limit.acquire_owned())
                            .await
                            .map_err(|_| InferenceError::QueueFull {
                                message:
                                    "too many HTTP requests in progress (max_concurrent_requests)"
                                        .into(),
                            })?
                            .map_err(|_| InferenceError::Disconnected {
                                message: "the server is stopping".into(),
                            })?;
                        run_request(serving, r).await
                    });
                    (skeleton, task)
                })
                .collect();
            let mut out = Vec::with_capacity(tasks.len());
            for (mut skeleton, task) in tasks {
                let result = task.await.unwrap_or_else(|e| {
                    Err(InferenceError::BatchProcessingError {
                        operation: format!("request task failed: {e}"),
                    })
                });
                match result {
                    Ok(r) => out.push(r),
                    Err(e) => {
                        state.counters.error(e.kind());
                        skeleton.error = Some(e);
                        out.push(skeleton);
                    }
                }
            }
            Ok(Json(out))
        }
        .await,
    )
}

/// The answer to a failed request of a batch: its id and what is known of its model.
pub(super) fn failed_response(serving: &Serving, r: &InferenceRequest) -> InferenceResponse {
    let target = serving
        .resolve(&r.model_name, r.model_version.as_deref())
        .ok();
    let model = target.as_ref().map(|t| &t.model);
    InferenceResponse {
        request_id: r.request_id.clone(),
        predictions: Vec::new(),
        model_metadata: ModelInferenceMetadata {
            model_name: r.model_name.clone(),
            model_version: model.map_or_else(
                || r.model_version.clone().unwrap_or_default(),
                |m| m.version.to_string(),
            ),
            architecture: model.map_or_else(String::new, |m| m.backend.info().architecture.clone()),
            input_shape: Vec::new(),
            output_shape: Vec::new(),
            inference_device: model.map_or_else(String::new, |m| m.backend.info().device.clone()),
            batch_size_used: 0,
        },
        performance_metrics: InferenceMetrics {
            preprocessing_time_ms: None,
            inference_time_ms: None,
            postprocessing_time_ms: None,
            total_time_ms: 0.0,
            gpu_utilization: None,
            memory_used_mb: None,
            throughput_samples_per_sec: 0.0,
            model_load_time_ms: None,
        },
        error: None,
    }
}
