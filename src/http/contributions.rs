//! Feature contributions: weight × input × central difference through the answering version.
#![forbid(unsafe_code)]

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use tie_client::Priority;

use crate::http::api::InferenceError;

use super::{pool::*, predict::*};

/// Most feature values a feature-contribution request may add (two rows per row and feature
/// asked for): 16 MB of rows.
pub(super) const MAX_CONTRIBUTION_VALUES: usize = 1 << 22;

/// Per row and output: weight × input × ∂output/∂input for each wanted feature, keyed by
/// feature name. The derivative is a central difference through the model itself, with a
/// step of 1e-3 × max(|input|, 1).
#[allow(clippy::too_many_arguments)]
pub(super) async fn contributions(
    serving: &Arc<Serving>,
    target: &Target,
    features: &[f32],
    rows: usize,
    wanted: &[(usize, f32)],
    responses: &[tie_client::Response],
    prio: Priority,
    wait_until: Instant,
) -> Result<Vec<Vec<HashMap<String, f32>>>, InferenceError> {
    let model = &target.model;
    let width = model.input_width();
    let step = |x: f32| 1e-3 * x.abs().max(1.0);
    let mut perturbed = Vec::with_capacity(2 * wanted.len() * rows * width);
    for r in 0..rows {
        let row = &features[r * width..(r + 1) * width];
        for &(i, _) in wanted {
            for sign in [1.0f32, -1.0] {
                let at = perturbed.len();
                perturbed.extend_from_slice(row);
                perturbed[at + i] += sign * step(row[i]);
            }
        }
    }
    let n = 2 * wanted.len() * rows;
    let answers = run_rows(serving, target, perturbed, n, prio, None, wait_until).await?;
    let names = &model.layout.features;
    let mut out = Vec::with_capacity(rows);
    for (r, response) in responses.iter().enumerate() {
        let row = &features[r * width..(r + 1) * width];
        let outputs = response.outputs().len();
        let mut per_output = vec![HashMap::with_capacity(wanted.len()); outputs];
        for (k, &(i, weight)) in wanted.iter().enumerate() {
            let plus = answers[(r * wanted.len() + k) * 2].outputs();
            let minus = answers[(r * wanted.len() + k) * 2 + 1].outputs();
            // The step as the model saw it (x + h rounded to f32).
            let h = ((row[i] + step(row[i])) - (row[i] - step(row[i]))) / 2.0;
            for (o, map) in per_output.iter_mut().enumerate() {
                let gradient = (plus[o] - minus[o]) / (2.0 * h);
                map.insert(names[i].clone(), weight * row[i] * gradient);
            }
        }
        out.push(per_output);
    }
    Ok(out)
}
