//! The spec's JSON types, as the CLI and the HTTP API (see [`crate::http`]) read and print them.
#![forbid(unsafe_code)]

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

/// The answer to an `InferenceRequest`.
#[derive(Clone, Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct InferenceResponse {
    /// The request's id.
    pub request_id: String,
    /// One prediction per output value, row-major.
    pub predictions: Vec<Prediction>,
    /// What answered.
    pub model_metadata: ModelInferenceMetadata,
    /// Timings.
    pub performance_metrics: InferenceMetrics,
    /// The error, when the request failed.
    pub error: Option<InferenceError>,
}

/// One value of the answer: output `output` of row `row`. A response lists them row by row,
/// and within a row output by output (an uncertainty output left out, the others keeping the
/// model's numbers).
#[derive(Clone, Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Prediction {
    /// The value.
    pub value: f32,
    /// The request's row (0-based).
    pub row: u32,
    /// The model's output column (0-based, as numbered in the model: with an uncertainty
    /// output left out, the columns after it keep their numbers).
    pub output: u32,
    /// With an uncertainty output (`uncertainty_output` in the model's config):
    /// `1 - min(|uncertainty|, 1)`; without: `1 / (1 + e^-|value|)`.
    pub confidence: f32,
    /// When the response was read.
    pub timestamp: DateTime<Utc>,
    /// Per-feature contributions, when asked for with `strategy_context.feature_weights`.
    pub feature_contributions: Option<std::collections::HashMap<String, f32>>,
}

/// What answered a request.
#[derive(Clone, Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ModelInferenceMetadata {
    /// Model name.
    pub model_name: String,
    /// Version that answered; for a request that named none and whose rows were answered
    /// across a reload, both versions in order (`"1,2"`); `"ensemble"` for an ensemble.
    pub model_version: String,
    /// `mlp` or `onnx-graph`.
    pub architecture: String,
    /// `[batch, features]` of this request.
    pub input_shape: Vec<u32>,
    /// `[batch, outputs]` of this request.
    pub output_shape: Vec<u32>,
    /// `cpu`.
    pub inference_device: String,
    /// Rows in this request.
    pub batch_size_used: usize,
}

/// Timings of one request. A figure that was not measured is absent (`null`), never made
/// up.
#[derive(Clone, Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct InferenceMetrics {
    /// Server time from accepting the frame to its batch starting (validation and queueing).
    pub preprocessing_time_ms: Option<f32>,
    /// Compute time of the batch that held the request.
    pub inference_time_ms: Option<f32>,
    /// Not measured separately (response writing is part of the round trip).
    pub postprocessing_time_ms: Option<f32>,
    /// Round trip measured by the client.
    pub total_time_ms: f32,
    /// GPU utilisation from NVML; absent on the CPU backend.
    pub gpu_utilization: Option<f32>,
    /// Device memory of the model; absent on the CPU backend.
    pub memory_used_mb: Option<f32>,
    /// 1 / round trip, for this single request.
    pub throughput_samples_per_sec: f32,
    /// Time spent loading the model for this request: it had been unloaded for going unused
    /// (`auto_unload_unused_hours`). Absent when it was loaded.
    #[serde(default)]
    pub model_load_time_ms: Option<f32>,
}

/// The kinds of error, each with its HTTP status.
#[derive(Clone, Debug, Serialize, Deserialize, thiserror::Error, utoipa::ToSchema)]
#[serde(tag = "kind")]
pub enum InferenceError {
    /// Unknown model.
    #[error("Model not found: {model_name}{}", served_list(served))]
    ModelNotFound {
        /// The model.
        model_name: String,
        /// The models served, where the server knows them (`name:version`).
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        served: Vec<String>,
    },
    /// Wrong feature count.
    #[error("Invalid input shape: expected {expected}, got {actual}")]
    InvalidInputShape {
        /// The layout's count.
        expected: usize,
        /// Given.
        actual: usize,
    },
    /// The backend failed, or the model's output was NaN or infinite.
    #[error("Execution failed for model: {model_name}{}", reason.as_ref().map_or(String::new(), |r| format!(" ({r})")))]
    ExecutionFailed {
        /// The model.
        model_name: String,
        /// What failed, when known (an output NaN or infinite).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        reason: Option<String>,
    },
    /// Out of device memory.
    #[error("GPU out of memory: requested {requested_mb}MB")]
    OutOfMemory {
        /// Requested.
        requested_mb: usize,
    },
    /// Batching failed.
    #[error("Batch processing error: {operation}")]
    BatchProcessingError {
        /// What.
        operation: String,
    },
    /// The engine failed (`TensorRTError` in the API's JSON, as the spec names it).
    #[error("Backend engine error: {error}")]
    #[serde(rename = "TensorRTError")]
    EngineError {
        /// What.
        error: String,
    },
    /// The deadline passed before execution.
    #[error("Timeout: {message}")]
    Timeout {
        /// Details.
        message: String,
    },
    /// The queue was full.
    #[error("Queue full: {message}")]
    QueueFull {
        /// Details.
        message: String,
    },
    /// The request was malformed.
    #[error("Rejected: {message}")]
    Rejected {
        /// Details.
        message: String,
    },
    /// The server went away.
    #[error("Disconnected: {message}")]
    Disconnected {
        /// Details.
        message: String,
    },
    /// The model is loading, or failed its last health check.
    #[error("Model not ready: {model_name}: {reason}")]
    NotReady {
        /// The model (empty while the server is still loading).
        model_name: String,
        /// Why.
        reason: String,
    },
    /// The HTTP request is malformed (bad JSON, a wrong type, a missing field, a bad value).
    #[error("Invalid request: {message}")]
    InvalidRequest {
        /// What is wrong.
        message: String,
    },
    /// The request is too large.
    #[error("Payload too large: {message}")]
    PayloadTooLarge {
        /// The limit.
        message: String,
    },
    /// A body that does not say it is JSON (`Content-Type: application/json`).
    #[error("Unsupported media type: {message}")]
    UnsupportedMediaType {
        /// What was wrong.
        message: String,
    },
    /// The operation is disabled on this server.
    #[error("Forbidden: {message}")]
    Forbidden {
        /// Why.
        message: String,
    },
    /// A model version could not be loaded from the repository (the versions serving go on).
    #[error("Model load failed: {model_name}: {message}")]
    LoadFailed {
        /// The model.
        model_name: String,
        /// Why.
        message: String,
    },
    /// The endpoint needs the server's bearer token (`server.api_token_file`).
    #[error("Unauthorized: {message}")]
    Unauthorized {
        /// Why.
        message: String,
    },
    /// The change conflicts with what is serving (the versions serving go on).
    #[error("Conflict: {message}")]
    Conflict {
        /// Why.
        message: String,
    },
}

impl InferenceError {
    /// The error of a response's status: `model` is the model the error names,
    /// `not_ready_reason` says why it is not ready (for `NotReady`).
    pub fn from_server(
        e: &tie_client::ServerError,
        model: &str,
        not_ready_reason: impl FnOnce() -> String,
    ) -> Self {
        use tie_client::Status;
        let message = e.to_string();
        match e.status {
            Status::MODEL_NOT_FOUND => Self::ModelNotFound {
                model_name: model.into(),
                served: Vec::new(),
            },
            Status::INVALID_INPUT_SHAPE => Self::InvalidInputShape {
                expected: e.detail_a as usize,
                actual: e.detail_b as usize,
            },
            Status::EXECUTION_FAILED
                if e.detail_a == tie_client::layouts::abi::EXECUTION_FAILED_NON_FINITE =>
            {
                Self::ExecutionFailed {
                    model_name: model.into(),
                    reason: Some(format!("output {} is NaN or infinite", e.detail_b)),
                }
            }
            Status::EXECUTION_FAILED => Self::ExecutionFailed {
                model_name: model.into(),
                reason: None,
            },
            Status::OUT_OF_MEMORY => Self::OutOfMemory {
                requested_mb: e.detail_a as usize,
            },
            Status::BATCH_PROCESSING_ERROR => Self::BatchProcessingError { operation: message },
            Status::BACKEND_ERROR => Self::EngineError { error: message },
            Status::TIMEOUT => Self::Timeout { message },
            Status::QUEUE_FULL => Self::QueueFull { message },
            Status::NOT_READY => Self::NotReady {
                model_name: model.into(),
                reason: not_ready_reason(),
            },
            Status::DISCONNECTED => Self::Disconnected { message },
            _ => Self::Rejected { message },
        }
    }

    /// The response status the error is counted as in figures kept outside the pollers (an
    /// ensemble's); execution errors of any kind count as `EXECUTION_FAILED`.
    pub fn status(&self) -> tie_client::Status {
        use tie_client::Status;
        match self {
            Self::ModelNotFound { .. } => Status::MODEL_NOT_FOUND,
            Self::InvalidInputShape { .. } => Status::INVALID_INPUT_SHAPE,
            Self::Timeout { .. } => Status::TIMEOUT,
            Self::QueueFull { .. } => Status::QUEUE_FULL,
            Self::NotReady { .. } | Self::LoadFailed { .. } => Status::NOT_READY,
            Self::OutOfMemory { .. } => Status::OUT_OF_MEMORY,
            Self::ExecutionFailed { .. }
            | Self::BatchProcessingError { .. }
            | Self::EngineError { .. } => Status::EXECUTION_FAILED,
            Self::Disconnected { .. } => Status::DISCONNECTED,
            Self::Rejected { .. }
            | Self::InvalidRequest { .. }
            | Self::PayloadTooLarge { .. }
            | Self::Forbidden { .. }
            | Self::Unauthorized { .. }
            | Self::Conflict { .. }
            | Self::UnsupportedMediaType { .. } => Status::REJECTED,
        }
    }

    /// The kind's name (the `kind` field of its JSON).
    pub fn kind(&self) -> &'static str {
        match self {
            Self::ModelNotFound { .. } => "ModelNotFound",
            Self::InvalidInputShape { .. } => "InvalidInputShape",
            Self::ExecutionFailed { .. } => "ExecutionFailed",
            Self::OutOfMemory { .. } => "OutOfMemory",
            Self::BatchProcessingError { .. } => "BatchProcessingError",
            Self::EngineError { .. } => "TensorRTError",
            Self::Timeout { .. } => "Timeout",
            Self::QueueFull { .. } => "QueueFull",
            Self::Rejected { .. } => "Rejected",
            Self::Disconnected { .. } => "Disconnected",
            Self::NotReady { .. } => "NotReady",
            Self::InvalidRequest { .. } => "InvalidRequest",
            Self::PayloadTooLarge { .. } => "PayloadTooLarge",
            Self::Forbidden { .. } => "Forbidden",
            Self::LoadFailed { .. } => "LoadFailed",
            Self::Conflict { .. } => "Conflict",
            Self::Unauthorized { .. } => "Unauthorized",
            Self::UnsupportedMediaType { .. } => "UnsupportedMediaType",
        }
    }

    /// The HTTP status the control plane answers it with.
    pub fn http_status(&self) -> u16 {
        match self {
            Self::InvalidInputShape { .. }
            | Self::Rejected { .. }
            | Self::InvalidRequest { .. } => 400,
            Self::Unauthorized { .. } => 401,
            Self::Forbidden { .. } => 403,
            Self::ModelNotFound { .. } => 404,
            Self::Conflict { .. } => 409,
            Self::LoadFailed { .. } => 422,
            Self::PayloadTooLarge { .. } => 413,
            Self::UnsupportedMediaType { .. } => 415,
            Self::QueueFull { .. } => 429,
            Self::NotReady { .. } | Self::Disconnected { .. } => 503,
            Self::Timeout { .. } => 504,
            Self::ExecutionFailed { .. }
            | Self::OutOfMemory { .. }
            | Self::BatchProcessingError { .. }
            | Self::EngineError { .. } => 500,
        }
    }
}

/// A request's priority in the batcher.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub enum RequestPriority {
    /// Batched last.
    Low,
    /// The default.
    #[default]
    Normal,
    /// Before Normal.
    High,
    /// First; never waits for a batch to fill.
    Critical,
}

/// Routing, ensembles and feature contributions (see [`crate::models::routing`]).
#[derive(Clone, Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct StrategyContext {
    /// A strategy of `routing.toml`: it picks the model and version (the request then names
    /// no version; a `model_name` keeps the strategy's targets of that model). Empty: no
    /// routing, the request's model is used.
    pub strategy_name: String,
    /// One of the strategy's targets (`model`, `model:version` or `model:label`), instead of
    /// the weighted split.
    pub model_routing_hint: Option<String>,
    /// Asks for `feature_contributions`: per feature named here (every feature when empty),
    /// weight × input × ∂output/∂input (the derivative by central differences through the
    /// model itself; see the README).
    pub feature_weights: Option<std::collections::HashMap<String, f32>>,
    /// Runs these models on the features and combines their outputs, value by value.
    pub ensemble_config: Option<crate::models::routing::EnsembleConfig>,
}

/// A prediction request: `batch_size` rows of features, row-major.
#[derive(Clone, Debug, Serialize, Deserialize, utoipa::ToSchema)]
#[schema(example = json!({
    "request_id": "order-42",
    "model_name": "multi",
    "model_version": "2",
    "input_features": [0.1, -0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 1.1, 1.2, 1.3, 1.4, 1.5, -1.6],
    "batch_size": 1,
    "timeout_ms": 5
}))]
pub struct InferenceRequest {
    /// Echoed in the response.
    pub request_id: String,
    /// The model.
    pub model_name: String,
    /// A version number or one of the model's labels; `None`: the model's default version.
    pub model_version: Option<String>,
    /// `batch_size × features` values, row-major, in the layout's order.
    pub input_features: Vec<f32>,
    /// The layout's feature names, to check the order; empty: not checked.
    #[serde(default)]
    pub feature_names: Vec<String>,
    /// Rows (1 to 4096).
    #[schema(minimum = 1, maximum = 4096)]
    pub batch_size: usize,
    /// Accepted, but HTTP requests always run at `Low` in the batcher,
    /// behind every ring client's work.
    #[serde(default)]
    pub priority: RequestPriority,
    /// The answer is useless after this long: the server answers `Timeout` (504) instead of
    /// executing it late. `None`: no deadline (the wait is bounded by the server's 1 s).
    pub timeout_ms: Option<u64>,
    /// Routing, ensembles and feature contributions.
    pub strategy_context: Option<StrategyContext>,
}

/// A tensor a loaded model reads or writes.
#[derive(Clone, Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct TensorSpec {
    /// The graph's tensor name.
    pub name: String,
    /// What the tensor is, where its name does not say it (a classifier's class
    /// probabilities served in place of its ZipMap, a native tree file's answer).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub description: Option<String>,
    /// `Float32`.
    pub data_type: String,
    /// `[-1, width]`: any batch size.
    pub shape: Vec<i32>,
    /// Whether the batch dimension is dynamic (always).
    pub is_dynamic: bool,
    /// `[1, width]`.
    pub min_shape: Option<Vec<i32>>,
    /// `[largest batch, width]`.
    pub max_shape: Option<Vec<i32>>,
}

/// A model's performance measured at load (batch 1 percentiles, best throughput over the
/// batch sizes profiled). A figure not measured is absent.
#[derive(Clone, Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ModelPerformanceProfile {
    /// Not measured by the profiler (it keeps percentiles): absent.
    pub avg_inference_time_ms: Option<f32>,
    /// Batch 1, median.
    pub p50_inference_time_ms: Option<f32>,
    /// Batch 1, 95th percentile.
    pub p95_inference_time_ms: Option<f32>,
    /// Batch 1, 99th percentile.
    pub p99_inference_time_ms: Option<f32>,
    /// Largest batch the batcher forms.
    pub max_batch_size: u32,
    /// Smallest batch within 5% of the best throughput.
    pub optimal_batch_size: Option<u32>,
    /// Device memory the model holds; absent on the CPU.
    pub memory_usage_mb: Option<f32>,
    /// NVML utilisation of its GPUs at the last monitor tick; absent on the CPU or without
    /// NVML.
    pub gpu_utilization: Option<f32>,
    /// Best rows per second over the batch sizes profiled.
    pub throughput_samples_per_sec: Option<f32>,
}

/// Where `backend = "auto"` runs a model's batches, from both engines' median latency per
/// batch size measured at load: small batches on the CPU, larger ones on the GPU, or all on
/// one of them.
#[derive(Clone, Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ModelPlacement {
    /// The rule in words, with the figures at the crossover.
    pub rule: String,
    /// Batches of up to this many rows run on the CPU (0: none; the largest batch: all).
    pub cpu_up_to_batch_size: u32,
    /// The CPU engine (`cpu-mlp`).
    pub cpu_engine: String,
    /// The GPU engine (`cuda`).
    pub gpu_engine: String,
    /// Both engines' medians at each batch size timed: ascending, up to the first size the
    /// CPU does not win (larger ones go to the GPU untimed).
    pub measured: Vec<PlacementTiming>,
}

/// One batch size's median latency on both engines, measured at load.
#[derive(Clone, Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct PlacementTiming {
    /// Rows.
    pub batch_size: u32,
    /// On the CPU, microseconds.
    pub cpu_p50_us: f64,
    /// On the GPU (copies and synchronisation included), microseconds.
    pub gpu_p50_us: f64,
}

/// One loaded model, as `GET /api/v1/internal/inference/models/loaded` lists it.
#[derive(Clone, Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct LoadedModelInfo {
    /// `name:version`.
    pub model_key: String,
    /// Name.
    pub model_name: String,
    /// Version.
    pub version: String,
    /// Whether requests that name no version get this one.
    pub is_default: bool,
    /// `mlp` or `onnx-graph`.
    pub architecture: String,
    /// `cpu` or `cuda:N[,cuda:M]`.
    pub inference_device: String,
    /// Backend engine (`cpu-mlp`, `cpu-tract`, `cuda`).
    pub engine: String,
    /// The input.
    pub input_specs: Vec<TensorSpec>,
    /// The output.
    pub output_specs: Vec<TensorSpec>,
    /// The feature layout clients write.
    pub layout: String,
    /// Its hash (hex), as clients check it.
    pub layout_hash: String,
    /// Its feature names, in order.
    pub feature_names: Vec<String>,
    /// Measured at load.
    pub performance_profile: ModelPerformanceProfile,
    /// Where `backend = "auto"` put its batches, when both the CPU and a GPU can run it;
    /// absent otherwise.
    pub placement: Option<ModelPlacement>,
    /// When it finished loading.
    pub load_timestamp: DateTime<Utc>,
    /// When it last accepted a request (absent: never).
    pub last_used: Option<DateTime<Utc>>,
    /// Requests accepted.
    pub usage_count: u64,
    /// Whether it loaded: false for a model or version that failed to load while the server
    /// went on (`exit_on_error = false`); `not_ready_reason` says why.
    pub available: bool,
    /// Whether it passed its last health check.
    pub ready: bool,
    /// Why not, when not ready.
    pub not_ready_reason: Option<String>,
    /// Health checks run and failed.
    pub health_checks: u64,
    /// Of which failed.
    pub health_check_failures: u64,
    /// The model's labels that name this version.
    pub labels: Vec<String>,
    /// SHA-256 of the file it was loaded from (hex).
    pub checksum: String,
    /// How long loading took (build, warmup, canary, profile), in milliseconds.
    pub load_time_ms: f64,
    /// For a version still downloading from an object store or a registry: how far along
    /// (`available` is false meanwhile); absent otherwise.
    pub download: Option<DownloadProgress>,
}

/// A model file downloading into the model cache.
#[derive(Clone, Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct DownloadProgress {
    /// Bytes so far.
    pub bytes: u64,
    /// The file's size, when the source says.
    pub total_bytes: Option<u64>,
    /// Bytes per second since it started.
    pub bytes_per_sec: f64,
}

/// An error answer of the control plane.
#[derive(Clone, Debug, Serialize, Deserialize, utoipa::ToSchema)]
#[schema(example = json!({
    "error": {"kind": "ModelNotFound", "model_name": "mlp65", "served": ["mlp64", "multi"]},
    "message": "model mlp65 not found; served: mlp64, multi"
}))]
pub struct ErrorBody {
    /// The error, tagged by `kind`.
    pub error: InferenceError,
    /// Its message.
    pub message: String,
}

/// `; served: a, b` for a not-found error's list of served models (nothing when empty).
fn served_list(served: &[String]) -> String {
    if served.is_empty() {
        String::new()
    } else {
        format!("; served: {}", served.join(", "))
    }
}
