//! Backend conformance: every CPU engine that can load an example model gives the committed
//! onnxruntime outputs, one row at a time and as a batch.

mod common;

use common::{fixtures, rel_err, root};
use tie::backend::{load_cpu, Backend, CpuEngine};

fn check(backend: &dyn Backend, inputs: &[Vec<f32>], outputs: &[Vec<f32>], what: &str) {
    let io = &backend.info().io;
    let (iw, ow) = (io.input_width, io.output_width);
    assert_eq!(ow, outputs[0].len(), "{what}: output width");
    let flat: Vec<f32> = inputs.concat();
    let mut out = vec![0.0f32; inputs.len() * ow];
    backend.run_batch(&flat, inputs.len(), &mut out).unwrap();
    for (got, expected) in out.chunks(ow).zip(outputs) {
        for (a, b) in got.iter().zip(expected) {
            assert!(rel_err(*a, *b) <= 1e-5, "{what} batched: {a} vs {b}");
        }
    }
    // An odd count: a block of four rows and a single one.
    let mut out5 = vec![0.0f32; 5 * ow];
    backend.run_batch(&flat[..5 * iw], 5, &mut out5).unwrap();
    assert_eq!(&out5[..], &out[..5 * ow], "{what}: 5 rows differ from 8");
    for (row, expected) in inputs.iter().zip(outputs) {
        let mut out = vec![0.0f32; ow];
        backend.run_batch(row, 1, &mut out).unwrap();
        for (a, b) in out.iter().zip(expected) {
            assert!(rel_err(*a, *b) <= 1e-5, "{what} row: {a} vs {b}");
        }
    }
    // Wrong shapes are errors, not panics.
    assert!(backend.run_batch(&flat[..iw - 1], 1, &mut out).is_err());
}

#[test]
fn every_engine_matches_onnxruntime_on_every_example_model() {
    for f in fixtures() {
        let path = root().join(format!("models/{}/{}/model.onnx", f.model, f.version));
        let tract = load_cpu(&path, CpuEngine::Tract).unwrap();
        assert_eq!(tract.info().engine, "cpu-tract");
        check(
            tract.as_ref(),
            &f.inputs,
            &f.outputs,
            &format!("{} tract", f.model),
        );
        match load_cpu(&path, CpuEngine::Mlp) {
            Ok(mlp) => {
                assert_eq!(mlp.info().engine, "cpu-mlp");
                check(
                    mlp.as_ref(),
                    &f.inputs,
                    &f.outputs,
                    &format!("{} mlp", f.model),
                );
            }
            Err(e) => assert_eq!(f.model, "softmax3", "{}: {e}", f.model),
        }
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
fn a_graph_outside_the_mlp_set_names_the_op() {
    let path = root().join("models/softmax3/1/model.onnx");
    let err = load_cpu(&path, CpuEngine::Mlp).err().unwrap().to_string();
    assert!(err.contains("Softmax"), "{err}");
}

#[test]
fn a_missing_or_corrupt_file_is_a_clear_error() {
    let dir = common::scratch_dir("corrupt");
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
