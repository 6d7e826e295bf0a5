//! The `Backend` conformance suite, written once and run over every backend: the CPU MLP path
//! and tract (`backends`), CUDA in every precision (`gpu`), and the fault switch in front of
//! each (`backends`). [`check_rows`] is the one output oracle: a backend's rows against
//! onnxruntime's (or a reference backend's) within a [`Tolerance`].

use tie_engine::{Backend, BackendHealth};

use crate::common::{rel_err, Fixture};

/// How close a backend's outputs must be to the reference.
#[derive(Clone, Copy, Debug)]
pub enum Tolerance {
    /// Every value: |a − b| / max(|b|, 1) at most this (the CPU engines, CUDA in fp32).
    Elementwise(f32),
    /// Over a batch: ‖got − reference‖ / max(‖reference‖, √n) at most this, n values
    /// (reduced precisions). The floor is [`Tolerance::Elementwise`]'s: outputs of magnitude
    /// below 1 are held to an absolute error, so a batch of one small output is not judged
    /// by its relative rounding.
    RelNorm(f64),
}

/// ‖got − reference‖ / ‖reference‖.
pub fn rel_norm(got: &[f32], reference: &[f32]) -> f64 {
    let (num, den) = norms(got, reference);
    (num / den.max(1e-30)).sqrt()
}

/// ‖got − reference‖², ‖reference‖².
fn norms(got: &[f32], reference: &[f32]) -> (f64, f64) {
    let (mut num, mut den) = (0.0f64, 0.0f64);
    for (g, r) in got.iter().zip(reference) {
        num += (f64::from(*g) - f64::from(*r)).powi(2);
        den += f64::from(*r).powi(2);
    }
    (num, den)
}

/// Whether `got` is within `tol` of `reference`, and if not, why.
pub fn compare(got: &[f32], reference: &[f32], tol: Tolerance) -> Result<(), String> {
    if got.len() != reference.len() {
        return Err(format!(
            "{} values, expected {}",
            got.len(),
            reference.len()
        ));
    }
    if let Some(i) = got.iter().position(|v| !v.is_finite()) {
        return Err(format!("value {i} is {} (unwritten or non-finite)", got[i]));
    }
    match tol {
        Tolerance::Elementwise(t) => match got
            .iter()
            .zip(reference)
            .position(|(a, b)| rel_err(*a, *b) > t)
        {
            Some(i) => Err(format!("value {i}: {} vs {}", got[i], reference[i])),
            None => Ok(()),
        },
        Tolerance::RelNorm(t) => {
            let (num, den) = norms(got, reference);
            let err = (num / den.max(reference.len() as f64)).sqrt();
            if err <= t {
                Ok(())
            } else {
                Err(format!("relative error {err:e} > {t:e}"))
            }
        }
    }
}

/// Features and outputs per row of `backend`.
fn widths(backend: &dyn Backend) -> (usize, usize) {
    let io = &backend.info().io;
    (io.input_width, io.output_width)
}

/// Runs the first `rows` rows of `input` on `backend` into a NaN-poisoned buffer and checks
/// every value was written and is within `tol` of `reference`.
pub fn check_rows(
    backend: &dyn Backend,
    input: &[f32],
    rows: usize,
    reference: &[f32],
    tol: Tolerance,
    what: &str,
) {
    let (iw, ow) = widths(backend);
    let mut out = vec![f32::NAN; rows * ow];
    backend
        .run_batch(&input[..rows * iw], rows, &mut out)
        .unwrap_or_else(|e| panic!("{what}: {rows} rows: {e}"));
    if let Err(why) = compare(&out, &reference[..rows * ow], tol) {
        panic!("{what}: {rows} rows: {why}");
    }
}

/// The whole contract on one example model: shapes, every row alone, odd and full batch sizes,
/// gathered batches, an output buffer with room to spare, refused shapes, and health.
pub fn conformance(backend: &dyn Backend, f: &Fixture, tol: Tolerance, what: &str) {
    let (iw, ow) = widths(backend);
    assert_eq!(iw, f.inputs[0].len(), "{what}: input width");
    assert_eq!(ow, f.outputs[0].len(), "{what}: output width");
    assert_eq!(backend.health(), BackendHealth::Healthy, "{what}: health");
    let input = f.inputs.concat();
    let reference = f.outputs.concat();
    let n = f.inputs.len();
    for rows in [1, 2, 3, 5, 7, n].into_iter().filter(|&r| r <= n) {
        check_rows(backend, &input, rows, &reference, tol, what);
    }
    for (i, row) in f.inputs.iter().enumerate() {
        check_rows(
            backend,
            row,
            1,
            &f.outputs[i],
            tol,
            &format!("{what}: row {i} alone"),
        );
    }
    gathered(backend, &input, n, &reference, tol, what);
    room_to_spare(backend, &input, n, what);
    refused_shapes(backend, &input, what);
}

/// `run_gathered` writes the rows the gather gives, as `run_batch` would.
fn gathered(
    backend: &dyn Backend,
    input: &[f32],
    rows: usize,
    reference: &[f32],
    tol: Tolerance,
    what: &str,
) {
    let (iw, ow) = widths(backend);
    let mut scratch = vec![0.0f32; rows * iw];
    let mut out = vec![f32::NAN; rows * ow];
    let mut gather = |staging: &mut [f32]| {
        assert!(staging.len() >= rows * iw, "{what}: staging too small");
        staging[..rows * iw].copy_from_slice(&input[..rows * iw]);
        rows
    };
    let ran = backend
        .run_gathered(&mut gather, &mut scratch, &mut out)
        .unwrap_or_else(|e| panic!("{what}: gathered: {e}"));
    assert_eq!(ran, rows, "{what}: gathered row count");
    if let Err(why) = compare(&out, &reference[..rows * ow], tol) {
        panic!("{what}: gathered: {why}");
    }
}

/// An output buffer longer than the batch needs: the batch's values are written, the rest
/// left alone.
fn room_to_spare(backend: &dyn Backend, input: &[f32], rows: usize, what: &str) {
    let (iw, ow) = widths(backend);
    let sentinel = -12345.5f32;
    let mut out = vec![sentinel; (rows + 3) * ow];
    let take = rows.min(3);
    backend
        .run_batch(&input[..take * iw], take, &mut out)
        .unwrap_or_else(|e| panic!("{what}: {take} rows into a longer buffer: {e}"));
    assert!(
        out[..take * ow].iter().all(|v| *v != sentinel),
        "{what}: the batch's values were not all written"
    );
    assert!(
        out[take * ow..].iter().all(|v| *v == sentinel),
        "{what}: values past the batch's were written"
    );
}

/// Input of the wrong length, or an output buffer too small: errors, not panics.
fn refused_shapes(backend: &dyn Backend, input: &[f32], what: &str) {
    let (iw, ow) = widths(backend);
    let mut out = vec![0.0f32; 2 * ow];
    assert!(
        backend.run_batch(&input[..iw - 1], 1, &mut out).is_err(),
        "{what}: a short row was run"
    );
    assert!(
        backend
            .run_batch(&input[..2 * iw], 2, &mut out[..ow])
            .is_err(),
        "{what}: two rows ran into room for one"
    );
}
