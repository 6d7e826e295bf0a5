//! The spec's `ModelPerformanceMetrics`, computed from a model's totals.
#![forbid(unsafe_code)]

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use hdrhistogram::Histogram;
use serde::Serialize;

use super::*;

/// Percentiles of one stage (milliseconds).
#[derive(Clone, Debug, Default, Serialize, utoipa::ToSchema)]
pub struct StageSummary {
    /// Values recorded.
    pub count: u64,
    /// Mean.
    pub mean_ms: f64,
    /// Median.
    pub p50_ms: f64,
    /// 90th percentile.
    pub p90_ms: f64,
    /// 99th percentile.
    pub p99_ms: f64,
    /// 99.9th percentile.
    pub p99_9_ms: f64,
    /// Largest.
    pub max_ms: f64,
}

impl StageSummary {
    /// The summary of a histogram that holds a value.
    pub(super) fn of(h: &Histogram<u64>) -> Self {
        let ms = |ns: u64| ns as f64 / 1e6;
        Self {
            count: h.len(),
            mean_ms: h.mean() / 1e6,
            p50_ms: ms(h.value_at_quantile(0.5)),
            p90_ms: ms(h.value_at_quantile(0.9)),
            p99_ms: ms(h.value_at_quantile(0.99)),
            p99_9_ms: ms(h.value_at_quantile(0.999)),
            max_ms: ms(h.max()),
        }
    }
}

/// A model's performance figures: counts, latency percentiles, stages and alerts.
///
/// Percentiles are over everything since the server started; rates are of the last monitor
/// interval; a figure that is not measured on this host is absent.
#[derive(Clone, Debug, Serialize, utoipa::ToSchema)]
pub struct ModelPerformanceMetrics {
    /// `name:version`.
    pub model_key: String,
    /// Frames accepted (ring and HTTP rows).
    pub accepted_requests: u64,
    /// Responses written (every accepted request gets one while its client is there).
    pub total_requests: u64,
    /// Predictions.
    pub successful_requests: u64,
    /// Error responses (all kinds, timeouts and rejections included).
    pub failed_requests: u64,
    /// Requests whose deadline passed before execution.
    pub timeouts: u64,
    /// Requests refused: queue full or malformed.
    pub rejections: u64,
    /// Error responses by kind.
    pub errors_by_kind: BTreeMap<String, u64>,
    /// Server-side total latency, EMA with weight 0.1 per request (applied
    /// per monitor interval as if each request had the interval's mean). Absent until a
    /// request completed, as are the percentiles.
    pub avg_latency_ms: Option<f32>,
    /// Server-side total latency percentiles.
    pub p50_latency_ms: Option<f32>,
    /// 95th percentile.
    pub p95_latency_ms: Option<f32>,
    /// 99th percentile.
    pub p99_latency_ms: Option<f32>,
    /// 99.9th percentile.
    pub p99_9_latency_ms: Option<f32>,
    /// Largest.
    pub max_latency_ms: Option<f32>,
    /// Predictions per second in the last monitor interval.
    pub throughput_rps: f32,
    /// `failed_requests / total_requests`, since start.
    pub error_rate: f32,
    /// Error rate of the last monitor interval with traffic.
    pub recent_error_rate: Option<f32>,
    /// NVML utilisation (0..1) of the model's GPUs, last interval; absent on the CPU or
    /// without NVML.
    pub gpu_utilization: Option<f32>,
    /// Device memory the model holds (MB); absent on the CPU.
    pub memory_usage_mb: Option<f32>,
    /// Batches run and rows in them.
    pub batches: u64,
    /// Rows executed.
    pub rows: u64,
    /// Per stage measured so far (see the monitor's docs); a stage with no value yet (no
    /// request, `end_to_end` before a client reported one, `gather`/`execute` before a timed
    /// batch) is absent.
    pub stages: BTreeMap<String, StageSummary>,
    /// Alerts in effect.
    pub alerts: Vec<Alert>,
    /// When the figures were last merged.
    pub last_updated: DateTime<Utc>,
    /// How its shadow's answers differ from its own, when a rule in `routing.toml` shadows
    /// this version.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub shadow: Option<crate::journal::shadow::ShadowReport>,
}

pub(super) fn metrics_of(s: &ModelState) -> ModelPerformanceMetrics {
    let t = &s.total;
    let total = &t.hist[Stage::Total as usize];
    let q = |p: f64| (!total.is_empty()).then(|| total.value_at_quantile(p) as f32 / 1e6);
    let answered = t.total_responses();
    let errors_by_kind = t
        .errors_by_kind()
        .map(|(kind, n)| (kind.to_string(), n))
        .collect();
    ModelPerformanceMetrics {
        model_key: s.entry.key.clone(),
        accepted_requests: t.requests,
        total_requests: answered,
        successful_requests: t.responses[0],
        failed_requests: t.failures(),
        timeouts: t.timeouts(),
        rejections: t.rejections(),
        errors_by_kind,
        avg_latency_ms: s.ema_ms.map(|v| v as f32),
        p50_latency_ms: q(0.5),
        p95_latency_ms: q(0.95),
        p99_latency_ms: q(0.99),
        p99_9_latency_ms: q(0.999),
        max_latency_ms: (!total.is_empty()).then(|| total.max() as f32 / 1e6),
        throughput_rps: s.throughput_rps,
        error_rate: if answered == 0 {
            0.0
        } else {
            t.failures() as f32 / answered as f32
        },
        recent_error_rate: s.recent_error_rate,
        gpu_utilization: s.gpu_utilization,
        memory_usage_mb: s
            .entry
            .device_memory_bytes
            .map(|b| (b as f64 / 1048576.0) as f32),
        batches: t.batches,
        rows: t.rows,
        stages: Stage::ALL
            .iter()
            .filter(|st| !t.hist[**st as usize].is_empty())
            .map(|st| {
                (
                    st.name().to_string(),
                    StageSummary::of(&t.hist[*st as usize]),
                )
            })
            .collect(),
        alerts: s.alerts.iter().flatten().cloned().collect(),
        last_updated: s.last_updated,
        shadow: None,
    }
}
