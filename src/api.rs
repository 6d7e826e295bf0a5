//! The spec's JSON types, as the CLI and (later) the HTTP API print them.
#![forbid(unsafe_code)]

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

/// The spec's `InferenceResponse`.
#[derive(Clone, Debug, Serialize, Deserialize)]
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

/// The spec's `Prediction`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Prediction {
    /// The value.
    pub value: f32,
    /// `1 / (1 + e^-|value|)`, the spec's rule for a model without an uncertainty output.
    pub confidence: f32,
    /// When the response was read.
    pub timestamp: DateTime<Utc>,
    /// Per-feature contributions, when asked for (not computed yet: always absent).
    pub feature_contributions: Option<std::collections::HashMap<String, f32>>,
}

/// The spec's `ModelInferenceMetadata`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ModelInferenceMetadata {
    /// Model name.
    pub model_name: String,
    /// Version that answered.
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

/// The spec's `InferenceMetrics`. A figure that was not measured is absent (`null`), never
/// made up.
#[derive(Clone, Debug, Serialize, Deserialize)]
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
}

/// The spec's `InferenceError` kinds, plus the data plane's own.
#[derive(Clone, Debug, Serialize, Deserialize, thiserror::Error)]
#[serde(tag = "kind")]
pub enum InferenceError {
    /// Unknown model.
    #[error("Model not found: {model_name}")]
    ModelNotFound {
        /// The model.
        model_name: String,
    },
    /// Wrong feature count.
    #[error("Invalid input shape: expected {expected}, got {actual}")]
    InvalidInputShape {
        /// The layout's count.
        expected: usize,
        /// Given.
        actual: usize,
    },
    /// The backend failed.
    #[error("Execution failed for model: {model_name}")]
    ExecutionFailed {
        /// The model.
        model_name: String,
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
    /// The engine failed.
    #[error("Backend engine error: {error}")]
    TensorRTError {
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
}
