//! The tree engine: gradient-boosted and random-forest ensembles run natively on the CPU.
//!
//! - [`onnx`]: the ONNX-ML tree operators (`TreeEnsembleRegressor`, `TreeEnsembleClassifier`,
//!   `TreeEnsemble`) as scikit-learn, LightGBM and XGBoost export them;
//! - [`lightgbm`] and [`xgboost`]: the libraries' own files (`model.txt`, `model.json`),
//!   answering as their `predict` does;
//! - [`TreeEnsemble`]: the compiled form all of them build (flat arrays, a batch walked tree
//!   by tree over its rows), served by [`TreeBackend`].
//!
//! ```no_run
//! use tie_engine::{load_cpu, CpuEngine};
//!
//! // A LightGBM model saved with `booster.save_model("model.txt")`.
//! let backend = load_cpu("models/lgbm/1/model.txt".as_ref(), CpuEngine::Auto)?;
//! assert_eq!(backend.info().engine, "cpu-trees");
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

mod backend;
mod ensemble;
pub mod lightgbm;
pub mod onnx;
pub mod xgboost;

pub use backend::TreeBackend;
pub use ensemble::TreeEnsemble;
pub use onnx::{plan, refuse_foreign_ops, ML_DOMAIN};

use crate::BackendLoadError;

pub(crate) fn unsupported(why: impl Into<String>) -> BackendLoadError {
    BackendLoadError::UnsupportedOp(why.into())
}

/// The I/O of a native tree file's ensemble: `features` in, the ensemble's outputs out, and
/// `note` (what the output is, as the library's predict answers) as the output's description.
fn native_io(features: usize, ensemble: &TreeEnsemble, note: String) -> crate::ModelIo {
    crate::ModelIo {
        input_name: "input".into(),
        input_width: features,
        output_name: "output".into(),
        output_width: ensemble.outputs(),
        output_note: Some(note),
    }
}

/// Whether `path` names a native tree file (`model.txt`, `model.json`).
pub fn is_native(path: &std::path::Path) -> bool {
    path.file_name()
        .is_some_and(|n| n == "model.txt" || n == "model.json")
}

/// The native tree file at `path` (`model.txt`: LightGBM; `model.json`: XGBoost), or `None`
/// for any other name.
///
/// # Errors
/// The file cannot be read, is malformed, or uses what the engine does not support.
pub fn load_native(
    path: &std::path::Path,
) -> Option<Result<(crate::ModelIo, TreeEnsemble), BackendLoadError>> {
    let read = || {
        std::fs::read_to_string(path).map_err(|e| BackendLoadError::Read {
            path: path.to_path_buf(),
            message: e.to_string(),
        })
    };
    match path.file_name()?.to_str()? {
        "model.txt" => Some(read().and_then(|text| lightgbm::parse(&text))),
        "model.json" => Some(read().and_then(|text| xgboost::parse(&text))),
        _ => None,
    }
}
