//! The CPU engines against onnxruntime through the conformance suite, the engine `auto`
//! picks, the fault switch in front of them, and load errors.

use std::sync::Arc;

use tie::models::fault::{FaultMode, Faulty};
use tie_engine::{load_cpu, Backend, CpuEngine};

use crate::common::{fixtures, root};
use crate::conformance::{conformance, Tolerance};

/// The CPU engines agree with onnxruntime to f32 rounding.
const CPU: Tolerance = Tolerance::Elementwise(1e-5);

/// A batch's rows are bitwise those of the same rows in a larger batch.
fn batch_invariant(backend: &dyn Backend, inputs: &[Vec<f32>], what: &str) {
    let ow = backend.info().io.output_width;
    let flat = inputs.concat();
    let mut all = vec![0.0f32; inputs.len() * ow];
    backend.run_batch(&flat, inputs.len(), &mut all).unwrap();
    let iw = inputs[0].len();
    for rows in 1..inputs.len() {
        let mut part = vec![0.0f32; rows * ow];
        backend
            .run_batch(&flat[..rows * iw], rows, &mut part)
            .unwrap();
        assert_eq!(
            part,
            all[..rows * ow],
            "{what}: {rows} rows differ from {}",
            inputs.len()
        );
    }
}

#[test]
fn every_cpu_engine_conforms_on_every_example_model() {
    for f in fixtures() {
        let path = root().join(format!("models/{}/{}/model.onnx", f.model, f.version));
        let tract = load_cpu(&path, CpuEngine::Tract).unwrap();
        assert_eq!(tract.info().engine, "cpu-tract");
        let what = format!("{} tract", f.model);
        conformance(tract.as_ref(), &f, CPU, &what);
        batch_invariant(tract.as_ref(), &f.inputs, &what);
        match load_cpu(&path, CpuEngine::Mlp) {
            Ok(mlp) => {
                assert_eq!(mlp.info().engine, "cpu-mlp");
                let what = format!("{} mlp", f.model);
                conformance(mlp.as_ref(), &f, CPU, &what);
                batch_invariant(mlp.as_ref(), &f.inputs, &what);
            }
            Err(e) => assert_eq!(f.model, "softmax3", "{}: {e}", f.model),
        }
    }
}

#[test]
fn auto_picks_the_mlp_path_for_mlp_graphs_and_tract_for_the_rest() {
    for f in fixtures() {
        let path = root().join(format!("models/{}/{}/model.onnx", f.model, f.version));
        let auto = load_cpu(&path, CpuEngine::Auto).unwrap();
        let expected = if f.model == "softmax3" {
            "cpu-tract"
        } else {
            "cpu-mlp"
        };
        assert_eq!(auto.info().engine, expected, "{}", f.model);
    }
}

#[test]
fn the_fault_switch_conforms_when_off_and_fails_or_corrupts_when_set() {
    for f in fixtures() {
        let path = root().join(format!("models/{}/{}/model.onnx", f.model, f.version));
        let inner: Arc<dyn Backend> = load_cpu(&path, CpuEngine::Auto).unwrap();
        let (faulty, switch) = Faulty::wrap(inner);
        let what = format!("{} behind the fault switch", f.model);
        conformance(faulty.as_ref(), &f, CPU, &what);
        let (iw, ow) = (f.inputs[0].len(), f.outputs[0].len());
        let mut out = vec![0.0f32; ow];
        switch.set(FaultMode::Fail);
        assert!(
            faulty.run_batch(&f.inputs[0][..iw], 1, &mut out).is_err(),
            "{what}: Fail"
        );
        switch.set(FaultMode::Corrupt);
        faulty.run_batch(&f.inputs[0], 1, &mut out).unwrap();
        assert!(
            out.iter()
                .zip(&f.outputs[0])
                .all(|(a, b)| (a - b - 1.0).abs() < 1e-3),
            "{what}: Corrupt shifts every output by 1: {out:?} vs {:?}",
            f.outputs[0]
        );
    }
}

#[test]
fn a_graph_outside_the_mlp_set_names_the_op() {
    let path = root().join("models/softmax3/1/model.onnx");
    let err = load_cpu(&path, CpuEngine::Mlp).err().unwrap().to_string();
    assert!(err.contains("Softmax"), "{err}");
}

#[test]
fn a_missing_or_corrupt_file_is_a_clear_error() {
    let dir = crate::common::scratch_dir("corrupt");
    let missing = dir.join("none.onnx");
    assert!(load_cpu(&missing, CpuEngine::Auto)
        .err()
        .unwrap()
        .to_string()
        .contains("none.onnx"));
    let bytes = std::fs::read(root().join("models/mlp64/1/model.onnx")).unwrap();
    let truncated = dir.join("truncated.onnx");
    std::fs::write(&truncated, &bytes[..bytes.len() / 2]).unwrap();
    assert!(load_cpu(&truncated, CpuEngine::Auto).is_err());
}
