//! [`TreeBackend`]: a [`TreeEnsemble`] behind the [`Backend`] contract.

use super::TreeEnsemble;
use crate::{Backend, BackendError, BackendInfo, ModelIo};

/// A tree ensemble on the CPU.
pub struct TreeBackend {
    info: BackendInfo,
    ensemble: TreeEnsemble,
}

impl TreeBackend {
    /// Serves `ensemble` with `io` (its output width set to the ensemble's).
    pub fn new(mut io: ModelIo, ensemble: TreeEnsemble) -> Self {
        io.output_width = ensemble.outputs();
        Self {
            info: BackendInfo::cpu(
                io,
                format!("tree-ensemble ({} trees)", ensemble.trees()),
                "cpu-trees",
            ),
            ensemble,
        }
    }
}

impl Backend for TreeBackend {
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
        self.ensemble.run(input, rows, output);
        Ok(())
    }
}
