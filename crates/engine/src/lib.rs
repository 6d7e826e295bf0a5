//! tie's engines: what runs a batch of feature rows through a model.
//!
//! A [`Backend`] describes the model's I/O ([`ModelIo`]), runs a batch and reports its health;
//! the server holds each as `Arc<dyn Backend>`. The engines:
//! - [`MlpBackend`]: a specialised CPU path for MLP-shaped ONNX graphs ([`MlpPlan`], lowered by
//!   [`lower_mlp`]);
//! - [`TractBackend`]: any graph tract can run, on the CPU;
//! - `cuda::CudaBackend` (feature `cuda`): MLP plans as CUDA-graph executions on the GPUs that
//!   [`devices::Gpus`] opened.
//!
//! [`load_cpu`] picks a CPU engine for an ONNX file; [`profile::ModelProfile`] measures a
//! loaded backend's batch timings.
//!
//! ```no_run
//! use tie_engine::{load_cpu, CpuEngine};
//!
//! let backend = load_cpu("models/mlp64/1/model.onnx".as_ref(), CpuEngine::Auto)?;
//! let io = &backend.info().io;
//! let input = vec![0.5f32; io.input_width];
//! let mut output = vec![0.0f32; io.output_width];
//! backend.run_batch(&input, 1, &mut output)?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
#![deny(unsafe_op_in_unsafe_fn)]
#![warn(missing_docs)]

mod attributes;
mod backend;
pub mod bounds;
mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod devices;
mod lower;
mod mlp;
mod pipeline;
pub mod profile;
mod rewrite;
mod split;
mod tract;
pub mod trees;

pub use backend::{
    check_shape, Backend, BackendError, BackendHealth, BackendInfo, ModelIo, Pipeline, Precision,
};
pub use cpu::{load_cpu, load_cpu_with, read_mlp, BackendLoadError, CpuEngine};
pub use lower::{lower_mlp, LowerError};
pub use mlp::{Activation, Dense, MlpBackend, MlpPlan};
pub use pipeline::ThreadPipeline;
pub use split::{time_in_rounds, Crossover, SplitBackend};
pub use tract::TractBackend;

/// Helpers of the unit tests that read the fixtures under `tests/fixtures`.
#[cfg(test)]
mod fixtures {
    /// The I/O of a test model: `i` features named `x`, `o` outputs named `y`.
    pub(crate) fn io(i: usize, o: usize) -> crate::ModelIo {
        crate::ModelIo {
            input_name: "x".into(),
            input_width: i,
            output_name: "y".into(),
            output_width: o,
            output_note: None,
        }
    }

    /// `tests/fixtures/<file>`, parsed as JSON.
    pub(crate) fn json<T: serde::de::DeserializeOwned>(file: &str) -> T {
        let path = format!("{}/../../tests/fixtures/{file}", env!("CARGO_MANIFEST_DIR"));
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap()
    }

    /// Rows of a fixture as one batch, `None` (JSON's null) as NaN.
    pub(crate) fn rows(rows: &[Vec<Option<f32>>]) -> Vec<f32> {
        rows.iter()
            .flatten()
            .map(|v| v.unwrap_or(f32::NAN))
            .collect()
    }

    /// A model stored in a fixture as base64.
    pub(crate) fn model(base64: &str) -> tract_onnx::pb::ModelProto {
        use base64::Engine as _;
        use tract_onnx::prelude::Framework as _;
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(base64)
            .unwrap();
        tract_onnx::onnx()
            .proto_model_for_read(&mut bytes.as_slice())
            .unwrap()
    }
}
