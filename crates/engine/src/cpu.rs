//! Loading a model file on the CPU: [`load_cpu`] picks the tree engine
//! ([`crate::trees::TreeBackend`]) for a tree ensemble (ONNX-ML, or LightGBM's and XGBoost's
//! own files), the MLP path ([`MlpBackend`]) when the graph lowers to an [`MlpPlan`], else
//! tract ([`TractBackend`]).

use std::path::Path;
use std::sync::Arc;

use tract_onnx::pb::ModelProto;

use crate::lower::{self, lower_mlp, LowerError};
use crate::{Backend, MlpBackend, MlpPlan, ModelIo, TractBackend};

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
    /// An operator (or an attribute of one) no engine of this build runs.
    #[error("unsupported model: {0}")]
    UnsupportedOp(String),
    /// The graph would make a tensor over the size limit (see [`crate::bounds`]).
    #[error("the model is refused: {0}")]
    TooLarge(String),
    /// tract could not build the model.
    #[error("tract cannot run the model: {0}")]
    Tract(String),
}

fn read_proto(path: &Path) -> Result<tract_onnx::pb::ModelProto, BackendLoadError> {
    use tract_onnx::prelude::Framework;
    tract_onnx::onnx()
        .proto_model_for_path(path)
        .map_err(|e| BackendLoadError::Read {
            path: path.to_path_buf(),
            message: format!("{e:#}"),
        })
}

/// The graph as served and its I/O: a classifier serves its probabilities (its label output
/// and ZipMap dropped, the output's note saying so).
fn served(proto: ModelProto) -> Result<(ModelProto, ModelIo), BackendLoadError> {
    let (proto, note) = match crate::rewrite::onnx_ml::serve_probabilities(&proto) {
        Some((proto, note)) => (proto, Some(note)),
        None => (proto, None),
    };
    let mut io = lower::model_io(&proto)?;
    io.output_note = note;
    Ok((proto, io))
}

/// Reads an ONNX file: its I/O and, when it is MLP-shaped, its [`MlpPlan`] (else why not).
///
/// # Errors
/// [`BackendLoadError`] when the file cannot be read or its I/O is unsupported.
pub fn read_mlp(path: &Path) -> Result<(ModelIo, Result<MlpPlan, LowerError>), BackendLoadError> {
    if crate::trees::is_native(path) {
        return Err(BackendLoadError::UnsupportedIo(
            "a LightGBM or XGBoost file runs on the CPU tree engine".into(),
        ));
    }
    let (proto, mut io) = served(read_proto(path)?)?;
    let plan = lower_mlp(&proto, &io);
    if let Ok(plan) = &plan {
        io.output_width = plan.output_width();
    }
    Ok((io, plan))
}

/// Loads an ONNX file on the CPU with the engine asked for.
///
/// # Errors
/// [`BackendLoadError`] when the file cannot be read, its I/O is unsupported, or the engine
/// cannot run it.
pub fn load_cpu(path: &Path, engine: CpuEngine) -> Result<Arc<dyn Backend>, BackendLoadError> {
    load_cpu_with(path, engine, crate::bounds::DEFAULT_MAX_TENSOR_BYTES)
}

/// [`load_cpu`] with a limit on the tensors the graph may make (`max_tensor_bytes`, see
/// [`crate::bounds`]).
///
/// # Errors
/// As [`load_cpu`], and [`BackendLoadError::TooLarge`] for a graph over the limit.
pub fn load_cpu_with(
    path: &Path,
    engine: CpuEngine,
    max_tensor_bytes: u64,
) -> Result<Arc<dyn Backend>, BackendLoadError> {
    // A tree ensemble runs on the tree engine whatever the engine asked for (the others
    // cannot run it).
    let trees = |(io, ensemble)| -> Arc<dyn Backend> {
        Arc::new(crate::trees::TreeBackend::new(io, ensemble))
    };
    if let Some(native) = crate::trees::load_native(path) {
        return native.map(trees);
    }
    load_proto(read_proto(path)?, path, engine, max_tensor_bytes)
}

/// [`load_cpu_with`] for an ONNX graph read from `path`.
pub(crate) fn load_proto(
    proto: ModelProto,
    path: &Path,
    engine: CpuEngine,
    max_tensor_bytes: u64,
) -> Result<Arc<dyn Backend>, BackendLoadError> {
    if let Some((io, ensemble)) = crate::trees::plan(&proto)? {
        return Ok(Arc::new(crate::trees::TreeBackend::new(io, ensemble)));
    }
    let (proto, mut io) = served(proto)?;
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
            io.output_width = plan.output_width();
            Arc::new(MlpBackend::new(io, plan))
        }
        None => {
            // ONNX-ML preprocessing and linear ops as ONNX's own; any other ONNX-ML op is
            // refused by name rather than left to tract; recurrent ops unrolled.
            let proto = crate::rewrite::onnx_ml::rewrite(&proto, io.input_width)?.unwrap_or(proto);
            crate::trees::refuse_foreign_ops(&proto)?;
            let proto =
                crate::rewrite::recurrent::unroll(&proto, io.input_width, max_tensor_bytes)?
                    .unwrap_or(proto);
            Arc::new(TractBackend::new(&proto, io, max_tensor_bytes)?)
        }
    })
}
