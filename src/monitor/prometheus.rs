//! Prometheus text exposition of the monitor's figures.
#![forbid(unsafe_code)]

use std::fmt::Write as _;

use tie_layouts::abi::Status;

use super::*;
use crate::sync::Locked;

/// A family with one sample per model, labelled `model`.
pub(super) struct PerModel {
    pub(super) name: &'static str,
    pub(super) kind: &'static str,
    pub(super) help: &'static str,
    /// The model's value as written; `None` leaves the model out (not measured).
    pub(super) value: fn(&ModelState) -> Option<String>,
}

/// The per-model families with one value each, in exposition order.
pub(super) const PER_MODEL: [PerModel; 8] = [
    PerModel {
        name: "tie_requests_total",
        kind: "counter",
        help: "Frames accepted.",
        value: |s| Some(s.total.requests.to_string()),
    },
    PerModel {
        name: "tie_batches_total",
        kind: "counter",
        help: "Batches run.",
        value: |s| Some(s.total.batches.to_string()),
    },
    PerModel {
        name: "tie_batch_rows_total",
        kind: "counter",
        help: "Rows run in batches (padding excluded).",
        value: |s| Some(s.total.rows.to_string()),
    },
    PerModel {
        name: "tie_latency_avg_seconds",
        kind: "gauge",
        help: "The spec's EMA of server-side latency.",
        value: |s| s.ema_ms.map(|ema| (ema / 1e3).to_string()),
    },
    PerModel {
        name: "tie_throughput_rps",
        kind: "gauge",
        help: "Predictions per second, last interval.",
        value: |s| Some(s.throughput_rps.to_string()),
    },
    PerModel {
        name: "tie_error_rate",
        kind: "gauge",
        help: "Errors over responses, last interval with traffic.",
        value: |s| s.recent_error_rate.map(|r| r.to_string()),
    },
    PerModel {
        name: "tie_model_memory_bytes",
        kind: "gauge",
        help: "Device memory the model holds.",
        value: |s| s.entry.device_memory_bytes.map(|b| b.to_string()),
    },
    PerModel {
        name: "tie_model_gpu_utilization_ratio",
        kind: "gauge",
        help: "NVML utilisation of the model's GPUs.",
        value: |s| s.gpu_utilization.map(|u| u.to_string()),
    },
];

/// Writes a family's `# HELP` and `# TYPE` lines.
pub(super) fn family(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
}

impl Monitor {
    /// Prometheus text exposition of the figures of the models `ready` knows (`ready(i)`: model
    /// `i`'s readiness; `None`: not served now, left out) and the control-plane counters.
    pub fn prometheus(&self, ready: &dyn Fn(usize) -> Option<bool>, out: &mut String) {
        self.collect();
        let all = self.all();
        // Unloaded models leave the exposition (their counters end with them).
        let (indices, states): (Vec<usize>, Vec<_>) = all
            .iter()
            .enumerate()
            .map(|(i, m)| (i, m.locked()))
            .filter(|(i, s)| !s.retired && ready(*i).is_some())
            .unzip();
        let states: Vec<&ModelState> = states.iter().map(|s| &**s).collect();
        self.server_families(out);
        family(
            out,
            "tie_model_ready",
            "gauge",
            "1 when the model passed its last health check.",
        );
        for (&i, s) in indices.iter().zip(&states) {
            let ready = u8::from(ready(i) == Some(true));
            let _ = writeln!(
                out,
                "tie_model_ready{{model=\"{}\"}} {ready}",
                label(&s.entry.key)
            );
        }
        for f in &PER_MODEL {
            family(out, f.name, f.kind, f.help);
            for s in &states {
                if let Some(v) = (f.value)(s) {
                    let _ = writeln!(out, "{}{{model=\"{}\"}} {v}", f.name, label(&s.entry.key));
                }
            }
        }
        responses(out, &states);
        latency(out, &states);
        alerts(out, &states);
        family(
            out,
            "tie_alert_events_total",
            "counter",
            "Alert transitions (raised or cleared).",
        );
        let _ = writeln!(out, "tie_alert_events_total {}", self.alert_events());
    }

    /// The server's own families: up and uptime.
    pub(super) fn server_families(&self, out: &mut String) {
        family(out, "tie_up", "gauge", "1 while the server runs.");
        let _ = writeln!(out, "tie_up 1");
        family(
            out,
            "tie_uptime_seconds",
            "gauge",
            "Seconds since the server started.",
        );
        let _ = writeln!(out, "tie_uptime_seconds {:.3}", self.uptime().as_secs_f64());
    }
}

/// `tie_responses_total` by model and status (statuses never sent left out, but OK).
pub(super) fn responses(out: &mut String, states: &[&ModelState]) {
    family(
        out,
        "tie_responses_total",
        "counter",
        "Responses sent, by status.",
    );
    for s in states {
        for (code, &n) in s.total.responses.iter().enumerate() {
            if n > 0 || code == 0 {
                let name = Status(code as u32).name().unwrap_or("Other");
                let _ = writeln!(
                    out,
                    "tie_responses_total{{model=\"{}\",status=\"{name}\"}} {n}",
                    label(&s.entry.key)
                );
            }
        }
    }
}

/// `tie_latency_seconds`: a summary per model and stage, since start.
pub(super) fn latency(out: &mut String, states: &[&ModelState]) {
    family(
        out,
        "tie_latency_seconds",
        "summary",
        "Latency by stage since start (see the README's Monitoring section).",
    );
    for s in states {
        for stage in Stage::ALL {
            let h = &s.total.hist[stage as usize];
            let labels = format!(
                "model=\"{}\",stage=\"{}\"",
                label(&s.entry.key),
                stage.name()
            );
            for q in [0.5, 0.9, 0.99, 0.999] {
                let v = if h.is_empty() {
                    f64::NAN
                } else {
                    h.value_at_quantile(q) as f64 / 1e9
                };
                let _ = writeln!(out, "tie_latency_seconds{{{labels},quantile=\"{q}\"}} {v}");
            }
            let sum = h.mean() * h.len() as f64 / 1e9;
            let _ = writeln!(out, "tie_latency_seconds_sum{{{labels}}} {sum}");
            let _ = writeln!(out, "tie_latency_seconds_count{{{labels}}} {}", h.len());
        }
    }
}

/// `tie_alert`: 1 per model and alert kind while the alert is in effect.
pub(super) fn alerts(out: &mut String, states: &[&ModelState]) {
    family(
        out,
        "tie_alert",
        "gauge",
        "1 while a performance alert is in effect.",
    );
    for s in states {
        for (i, kind) in ALERT_KINDS.iter().enumerate() {
            let _ = writeln!(
                out,
                "tie_alert{{model=\"{}\",kind=\"{}\"}} {}",
                label(&s.entry.key),
                kind.name(),
                u8::from(s.alerts[i].is_some())
            );
        }
    }
}

/// A Prometheus label value: backslash, quote and newline escaped.
pub(super) fn label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}
