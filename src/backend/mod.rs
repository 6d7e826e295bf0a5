//! Backends: what runs a batch of feature rows through a model.
//!
//! A [`Backend`] describes the model's I/O, runs a batch and reports its health; the server
//! holds each as `Arc<dyn Backend>`. This build has the CPU backends: [`MlpBackend`], a
//! specialised path for MLP-shaped ONNX graphs ([`MlpPlan`], lowered by [`lower_mlp`]), and
//! [`TractBackend`], which runs any graph tract can. [`load_cpu`] picks between them.

mod lower;
mod mlp;
mod tract;

use std::path::Path;
use std::sync::Arc;

pub use lower::{lower_mlp, LowerError};
pub use mlp::{Activation, Dense, MlpBackend, MlpPlan};
pub use tract::TractBackend;

/// The I/O of a model: one f32 input of `[batch, input_width]`, one f32 output of
/// `[batch, output_width]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ModelIo {
    /// Name of the graph's input.
    pub input_name: String,
    /// Features per row.
    pub input_width: usize,
    /// Name of the graph's output.
    pub output_name: String,
    /// Values per row.
    pub output_width: usize,
}

/// What a loaded backend is.
#[derive(Clone, Debug)]
pub struct BackendInfo {
    /// The model's I/O.
    pub io: ModelIo,
    /// Architecture, as reported to users (`mlp`, `onnx-graph`).
    pub architecture: String,
    /// Where it runs (`cpu`).
    pub device: String,
    /// Backend name (`cpu-mlp`, `cpu-tract`).
    pub engine: &'static str,
}

/// Health of a backend.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BackendHealth {
    /// Serving.
    Healthy,
    /// Not serving, with the reason.
    Unhealthy(String),
}

/// Why a batch failed.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    /// The input is not `rows * input_width` values or the output buffer is too small.
    #[error("batch shape mismatch: {0}")]
    Shape(String),
    /// The engine failed.
    #[error("execution failed: {0}")]
    Execution(String),
}

/// Runs batches of one model.
///
/// `run_batch` may be called from several threads at once; implementations keep their scratch
/// state behind their own synchronisation.
pub trait Backend: Send + Sync {
    /// What this backend is and the model's I/O.
    fn info(&self) -> &BackendInfo;

    /// Runs `rows` rows: `input` is `rows * input_width` values row-major, `output` receives
    /// `rows * output_width` values row-major.
    ///
    /// # Errors
    /// [`BackendError`] when the shapes are wrong or the engine fails.
    fn run_batch(&self, input: &[f32], rows: usize, output: &mut [f32])
        -> Result<(), BackendError>;

    /// Whether the backend can serve.
    fn health(&self) -> BackendHealth {
        BackendHealth::Healthy
    }
}

/// Which CPU engine a model asks for.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CpuEngine {
    /// The MLP path when the graph is an MLP, else tract.
    #[default]
    Auto,
    /// tract, whatever the graph.
    Tract,
    /// The MLP path; loading fails if the graph is not an MLP.
    Mlp,
}

/// Why a model could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum BackendLoadError {
    /// The file could not be read or parsed as ONNX.
    #[error("cannot read ONNX model {}: {message}", path.display())]
    Read {
        /// The file.
        path: std::path::PathBuf,
        /// What went wrong.
        message: String,
    },
    /// The graph's I/O is not one f32 `[batch, n]` input and one f32 `[batch, m]` output.
    #[error("unsupported model I/O: {0}")]
    UnsupportedIo(String),
    /// The MLP path was asked for and the graph is not an MLP.
    #[error("not an MLP graph: {0}")]
    NotMlp(#[from] LowerError),
    /// tract could not build the model.
    #[error("tract cannot run the model: {0}")]
    Tract(String),
}

/// Loads an ONNX file on the CPU with the engine asked for.
///
/// # Errors
/// [`BackendLoadError`] when the file cannot be read, its I/O is unsupported, or the engine
/// cannot run it.
pub fn load_cpu(path: &Path, engine: CpuEngine) -> Result<Arc<dyn Backend>, BackendLoadError> {
    use tract_onnx::prelude::Framework;
    let proto =
        tract_onnx::onnx()
            .proto_model_for_path(path)
            .map_err(|e| BackendLoadError::Read {
                path: path.to_path_buf(),
                message: format!("{e:#}"),
            })?;
    let io = lower::model_io(&proto)?;
    let mlp = match engine {
        CpuEngine::Tract => None,
        CpuEngine::Mlp => Some(lower_mlp(&proto, &io)?),
        CpuEngine::Auto => match lower_mlp(&proto, &io) {
            Ok(plan) => Some(plan),
            Err(e) => {
                tracing::info!(model = %path.display(), reason = %e, "not an MLP graph, serving it with tract");
                None
            }
        },
    };
    Ok(match mlp {
        Some(plan) => {
            let mut io = io;
            io.output_width = plan.output_width();
            Arc::new(MlpBackend::new(io, plan))
        }
        None => Arc::new(TractBackend::new(&proto, io)?),
    })
}
