//! Ensembles: a request run through every member version and combined.
#![forbid(unsafe_code)]

use std::sync::Arc;
use std::time::Instant;

use chrono::Utc;
use tie_client::Status;

use crate::http::api::{
    InferenceError, InferenceMetrics, InferenceRequest, InferenceResponse, ModelInferenceMetadata,
    Prediction, StrategyContext,
};
use crate::models::routing::EnsembleConfig;

use super::{pool::*, predict::*};

/// Runs `request` on each member of an ensemble (concurrently) and combines their outputs
/// value by value.
pub(super) async fn run_ensemble(
    serving: Arc<Serving>,
    request: InferenceRequest,
    name: Option<String>,
    config: EnsembleConfig,
    context: Option<StrategyContext>,
) -> Result<InferenceResponse, InferenceError> {
    let started = Instant::now();
    let label = name.clone().unwrap_or_else(|| "ensemble".into());
    let index = name
        .as_deref()
        .and_then(|n| serving.manager.ensemble_index(n));
    // Counted once, with the request's final status, when the ensemble has figures.
    let record = |status: Status, rows: u64| {
        if let Some(i) = index {
            let ns = started.elapsed().as_nanos() as u64;
            serving.monitor.record_request(i, ns, status, rows);
        }
    };
    let rows = request.batch_size as u64;
    if let Err(e) = check(&serving, &label, &config, context.as_ref()) {
        record(Status::REJECTED, rows.max(1));
        return Err(e);
    }
    let answers = match run_members(&serving, &request, &config, &label).await {
        Ok(answers) => answers,
        Err(e) => {
            record(e.status(), rows);
            return Err(e);
        }
    };
    let total_ms = started.elapsed().as_nanos() as f32 / 1e6;
    record(Status::OK, rows);
    Ok(combined(&request, label, &config, &answers, total_ms))
}

/// What can be refused before any member runs: the members' count and weights, one layout
/// for all loaded members, and no feature contributions.
fn check(
    serving: &Serving,
    label: &str,
    config: &EnsembleConfig,
    context: Option<&StrategyContext>,
) -> Result<(), InferenceError> {
    let invalid = |message: String| InferenceError::InvalidRequest { message };
    crate::models::routing::check_ensemble(&format!("ensemble {label:?}"), config)
        .map_err(|e| invalid(e.to_string()))?;
    // Members read the same layout (those loaded now; one that is not is refused when it runs).
    let layouts: Vec<(String, u64)> = config
        .members
        .iter()
        .filter_map(|m| serving.by_key(&m.key()).ok())
        .map(|t| (t.model.key(), t.model.layout_hash))
        .collect();
    if let Some(other) = layouts.iter().find(|(_, h)| *h != layouts[0].1) {
        return Err(invalid(format!(
            "ensemble {label:?}: members {} and {} read different layouts",
            layouts[0].0, other.0
        )));
    }
    if context.is_some_and(|c| c.feature_weights.is_some()) {
        return Err(invalid("feature_weights: contributions are computed per model, not for an ensemble; ask each member".into()));
    }
    Ok(())
}

/// Every member's answer to `request`, run concurrently; the first failure, or a member whose
/// value count differs from the first's.
async fn run_members(
    serving: &Arc<Serving>,
    request: &InferenceRequest,
    config: &EnsembleConfig,
    label: &str,
) -> Result<Vec<InferenceResponse>, InferenceError> {
    let tasks: Vec<_> = config
        .members
        .iter()
        .map(|m| {
            let mut r = request.clone();
            r.model_name = m.model.clone();
            r.model_version = m.version.clone();
            tokio::spawn(run_model(serving.clone(), r, None))
        })
        .collect();
    let mut answers = Vec::with_capacity(tasks.len());
    let mut failed = None;
    for task in tasks {
        let answer = task.await.unwrap_or_else(|e| {
            Err(InferenceError::BatchProcessingError {
                operation: format!("ensemble member task failed: {e}"),
            })
        });
        match answer {
            Ok(a) => answers.push(a),
            Err(e) => failed = failed.or(Some(e)),
        }
    }
    if let Some(e) = failed {
        return Err(e);
    }
    // Values are combined place by place: every member must answer the same rows and outputs
    // (an uncertainty output left out elsewhere would shift them).
    let places = |a: &InferenceResponse| -> Vec<(u32, u32)> {
        a.predictions.iter().map(|p| (p.row, p.output)).collect()
    };
    let first = places(&answers[0]);
    if let Some(odd) = answers.iter().find(|a| places(a) != first) {
        return Err(InferenceError::InvalidRequest {
            message: format!(
                "ensemble {label:?}: member {}:{} gives {} values, {}:{} gives {} (or of other outputs)",
                odd.model_metadata.model_name,
                odd.model_metadata.model_version,
                odd.predictions.len(),
                answers[0].model_metadata.model_name,
                answers[0].model_metadata.model_version,
                first.len()
            ),
        });
    }
    Ok(answers)
}

/// The ensemble's response: each value combined over the members, and the members' figures.
fn combined(
    request: &InferenceRequest,
    label: String,
    config: &EnsembleConfig,
    answers: &[InferenceResponse],
    total_ms: f32,
) -> InferenceResponse {
    let now = Utc::now();
    let predictions = (0..answers[0].predictions.len())
        .map(|i| {
            let values: Vec<(f32, f32)> = answers
                .iter()
                .zip(&config.members)
                .map(|(a, m)| (a.predictions[i].value, m.weight))
                .collect();
            let value = crate::models::routing::combine(config.combine, &values);
            let first = &answers[0].predictions[i];
            Prediction {
                value,
                row: first.row,
                output: first.output,
                confidence: crate::dataplane::confidence(value),
                timestamp: now,
                feature_contributions: None,
            }
        })
        .collect();
    let members: Vec<String> = answers
        .iter()
        .map(|a| {
            format!(
                "{}:{}",
                a.model_metadata.model_name, a.model_metadata.model_version
            )
        })
        .collect();
    let mut devices: Vec<String> = answers
        .iter()
        .map(|a| a.model_metadata.inference_device.clone())
        .collect();
    devices.sort();
    devices.dedup();
    let first = &answers[0];
    let max = |f: &dyn Fn(&InferenceResponse) -> Option<f32>| {
        answers.iter().filter_map(f).reduce(f32::max)
    };
    InferenceResponse {
        request_id: request.request_id.clone(),
        predictions,
        model_metadata: ModelInferenceMetadata {
            model_name: label,
            model_version: "ensemble".into(),
            architecture: format!("ensemble ({:?} of {})", config.combine, members.join(", ")),
            input_shape: first.model_metadata.input_shape.clone(),
            output_shape: first.model_metadata.output_shape.clone(),
            inference_device: devices.join(","),
            batch_size_used: request.batch_size,
        },
        performance_metrics: InferenceMetrics {
            preprocessing_time_ms: max(&|a| a.performance_metrics.preprocessing_time_ms),
            inference_time_ms: max(&|a| a.performance_metrics.inference_time_ms),
            postprocessing_time_ms: None,
            total_time_ms: total_ms,
            gpu_utilization: max(&|a| a.performance_metrics.gpu_utilization),
            memory_used_mb: answers
                .iter()
                .map(|a| a.performance_metrics.memory_used_mb)
                .sum(),
            throughput_samples_per_sec: if total_ms > 0.0 {
                request.batch_size as f32 * 1e3 / total_ms
            } else {
                0.0
            },
            model_load_time_ms: answers
                .iter()
                .map(|a| a.performance_metrics.model_load_time_ms)
                .sum(),
        },
        error: None,
    }
}
