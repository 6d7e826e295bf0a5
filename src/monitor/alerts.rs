//! Threshold alerts of `[performance_thresholds]`: kinds, the hysteresis rule
//! ([`alert_state`]) and transitions ([`AlertEvent`]).
#![forbid(unsafe_code)]

use chrono::{DateTime, Utc};
use serde::Serialize;

/// An alert kind of `[performance_thresholds]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum AlertKind {
    /// `avg_latency_ms` (EMA of server-side total) above `max_latency_ms`.
    Latency,
    /// Error rate of the last interval above `max_error_rate`.
    ErrorRate,
    /// Throughput of the last interval (with traffic) below `min_throughput_rps`.
    Throughput,
    /// Device memory of the model above `max_memory_usage_mb`.
    Memory,
    /// NVML utilisation of the model's GPUs (in an interval with traffic) below
    /// `min_gpu_utilization`.
    GpuUtilization,
}

pub(super) const ALERT_KINDS: [AlertKind; 5] = [
    AlertKind::Latency,
    AlertKind::ErrorRate,
    AlertKind::Throughput,
    AlertKind::Memory,
    AlertKind::GpuUtilization,
];

impl AlertKind {
    /// Name in metrics and logs.
    pub fn name(self) -> &'static str {
        match self {
            AlertKind::Latency => "latency",
            AlertKind::ErrorRate => "error_rate",
            AlertKind::Throughput => "throughput",
            AlertKind::Memory => "memory",
            AlertKind::GpuUtilization => "gpu_utilization",
        }
    }
}

/// An alert in effect.
#[derive(Clone, Debug, Serialize, utoipa::ToSchema)]
pub struct Alert {
    /// What crossed its threshold.
    pub kind: AlertKind,
    /// The value when it was last evaluated.
    pub value: f32,
    /// The threshold.
    pub threshold: f32,
    /// When it was raised.
    pub since: DateTime<Utc>,
}

/// Monitor intervals without a measurement after which an alert clears.
pub const STALE_INTERVALS: u32 = 10;

/// Hysteresis of alerts: a raised alert clears once its value is back past the threshold by
/// this fraction of it.
pub const HYSTERESIS: f32 = 0.1;

/// Whether an alert is in effect after seeing `value` (`None`: not measured this time, the
/// state stays). `upper`: the alert is for values above `threshold`.
pub fn alert_state(active: bool, value: Option<f32>, threshold: f32, upper: bool) -> bool {
    let Some(v) = value else {
        return active;
    };
    if upper {
        if active {
            v > threshold * (1.0 - HYSTERESIS)
        } else {
            v > threshold
        }
    } else if active {
        v < threshold * (1.0 + HYSTERESIS)
    } else {
        v < threshold
    }
}

/// A transition of an alert, for the log and the webhook.
#[derive(Clone, Debug, Serialize)]
pub struct AlertEvent {
    /// The model.
    pub model_key: String,
    /// `raised` or `cleared`.
    pub state: &'static str,
    /// The alert.
    pub kind: AlertKind,
    /// Its value.
    pub value: f32,
    /// Its threshold.
    pub threshold: f32,
    /// When.
    pub timestamp: DateTime<Utc>,
    /// Why it cleared, when not by its value.
    pub note: Option<&'static str>,
}
