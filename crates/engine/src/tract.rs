//! The generic CPU path: any ONNX graph tract can run, with a symbolic batch dimension.

use std::sync::Mutex;

use tract_onnx::pb::ModelProto;
use tract_onnx::prelude::*;
use tract_onnx::tract_core::plan::SimpleState;

use crate::{Backend, BackendError, BackendInfo, BackendLoadError, ModelIo};

/// A tract error as a load error.
fn tract_err(e: TractError) -> BackendLoadError {
    BackendLoadError::Tract(format!("{e:#}"))
}

/// `proto` as tract's inference model, its input `[N, input_width]` with the batch `N`
/// symbolic.
pub(crate) fn inference_model(
    proto: &ModelProto,
    input_width: usize,
) -> Result<InferenceModel, BackendLoadError> {
    let mut model = tract_onnx::onnx()
        .model_for_proto_model(proto)
        .map_err(tract_err)?;
    let batch = model.symbols.sym("N");
    model
        .set_input_fact(
            0,
            InferenceFact::dt_shape(
                f32::datum_type(),
                tvec!(batch.to_dim(), input_width.to_dim()),
            ),
        )
        .map_err(tract_err)?;
    Ok(model)
}

/// Runs an ONNX graph with tract.
pub struct TractBackend {
    info: BackendInfo,
    /// Reused between batches (tract keeps per-run buffers in it).
    state: Mutex<TypedSimpleState>,
}

impl TractBackend {
    /// Builds and optimises the graph for `[N, input_width]` inputs; no tensor of it may be
    /// over `max_tensor_bytes` (checked before tract folds constants, and on the typed graph).
    ///
    /// # Errors
    /// [`BackendLoadError::Tract`] when tract cannot build, type or optimise the graph;
    /// [`BackendLoadError::UnsupportedIo`] when its output is not `[N, m]`;
    /// [`BackendLoadError::TooLarge`] for a tensor over the limit.
    pub fn new(
        proto: &ModelProto,
        mut io: ModelIo,
        max_tensor_bytes: u64,
    ) -> Result<Self, BackendLoadError> {
        crate::bounds::check_proto(proto, max_tensor_bytes)?;
        let model = inference_model(proto, io.input_width)?;
        let typed = model.into_typed().map_err(tract_err)?;
        crate::bounds::check_typed(&typed, max_tensor_bytes)?;
        let typed = typed.into_optimized().map_err(tract_err)?;
        crate::bounds::check_typed(&typed, max_tensor_bytes)?;
        let out = typed.output_fact(0).map_err(tract_err)?.clone();
        let width = match out.shape.as_concrete() {
            Some([_, w]) => Some(*w),
            _ => match out.shape.dims() {
                [_, w] => tract_onnx::tract_core::internal::DimLike::to_usize(w).ok(),
                _ => None,
            },
        };
        let width = width.ok_or_else(|| {
            BackendLoadError::UnsupportedIo(format!("output shape {:?} is not [N, m]", out.shape))
        })?;
        if io.output_width != 0 && io.output_width != width {
            return Err(BackendLoadError::UnsupportedIo(format!(
                "output declares width {}, the graph computes {width}",
                io.output_width
            )));
        }
        io.output_width = width;
        let plan = typed.into_runnable().map_err(tract_err)?;
        let state = SimpleState::new(&plan).map_err(tract_err)?;
        Ok(Self {
            info: BackendInfo::cpu(io, "onnx-graph", "cpu-tract"),
            state: Mutex::new(state),
        })
    }
}

impl Backend for TractBackend {
    fn info(&self) -> &BackendInfo {
        &self.info
    }

    fn run_batch(
        &self,
        input: &[f32],
        rows: usize,
        output: &mut [f32],
    ) -> Result<(), BackendError> {
        let (iw, ow) = (self.info.io.input_width, self.info.io.output_width);
        crate::check_shape(input, rows, output, iw, ow)?;
        let exec = |e: TractError| BackendError::Execution(format!("{e:#}"));
        let tensor = Tensor::from_shape(&[rows, iw], input).map_err(exec)?;
        let mut state = self
            .state
            .lock()
            .map_err(|_| BackendError::Execution("state lock poisoned".into()))?;
        let result = state.run(tvec!(tensor.into())).map_err(exec)?;
        let view = result[0].try_as_plain_ram().map_err(exec)?;
        let values = view.as_slice::<f32>().map_err(exec)?;
        if values.len() != rows * ow {
            return Err(BackendError::Execution(format!(
                "the graph returned {} values for {rows} rows of {ow}",
                values.len()
            )));
        }
        output[..values.len()].copy_from_slice(values);
        Ok(())
    }
}
