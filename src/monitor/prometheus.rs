//! Prometheus exposition (text format 0.0.4, encoded by `prometheus-client`) of the monitor's
//! figures, the control plane's counters and the process's own `process_*` figures.
//!
//! The figures live in the monitor (HdrHistograms and counters the pollers hand over); each
//! scrape copies what it exposes into a [`Collector`] of a fresh registry and encodes that.
#![forbid(unsafe_code)]

use std::fmt;

use heck::ToSnakeCase;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric, MetricEncoder};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;
use tie_layouts::abi::Status;

use super::*;
use crate::sync::Locked;

/// The `Content-Type` of the exposition.
pub const CONTENT_TYPE: &str = prometheus_client::encoding::prometheus_text::CONTENT_TYPE;

/// Upper bounds (seconds) of the `tie_latency_seconds` buckets: 1-2-5 steps from 500 ns to
/// 10 s (the `+Inf` bucket follows).
pub const LATENCY_BUCKETS: [f64; 23] = [
    5e-7, 1e-6, 2e-6, 5e-6, 1e-5, 2e-5, 5e-5, 1e-4, 2e-4, 5e-4, 1e-3, 2e-3, 5e-3, 1e-2, 2e-2, 5e-2,
    0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0,
];

/// Encodes `registry` as Prometheus text.
pub fn encode(registry: &Registry) -> String {
    let mut out = String::new();
    prometheus_client::encoding::prometheus_text::encode(&mut out, registry)
        .expect("writing to a String does not fail");
    out
}

/// A label value as exposed: `ModelNotFound` → `model_not_found`.
pub fn snake_label(name: &str) -> String {
    name.to_snake_case()
}

/// The labels `model` and `version` of a key `name:version` (an ensemble's version is
/// `ensemble`).
fn model_labels(key: &str) -> [(&'static str, String); 2] {
    let (name, version) = key.rsplit_once(':').unwrap_or((key, ""));
    [
        ("model", name.to_string()),
        ("version", version.to_string()),
    ]
}

/// One stage's histogram as exposed.
#[derive(Debug)]
struct StageBuckets {
    stage: &'static str,
    /// Seconds.
    sum: f64,
    count: u64,
    /// Per bound of [`LATENCY_BUCKETS`], the values in it (not cumulative).
    buckets: Vec<(f64, u64)>,
}

impl StageBuckets {
    fn of(stage: Stage, h: &hdrhistogram::Histogram<u64>) -> Self {
        let mut below = 0;
        let buckets = LATENCY_BUCKETS
            .iter()
            .map(|&bound| {
                // Values up to the bound, as precisely as the histogram keeps them (2
                // significant digits: a value within 1% above the bound may count in it).
                let upto = if h.is_empty() {
                    0
                } else {
                    h.count_between(0, (bound * 1e9) as u64)
                };
                let n = upto - below;
                below = upto;
                (bound, n)
            })
            .collect();
        Self {
            stage: stage.name(),
            sum: h.mean() * h.len() as f64 / 1e9,
            count: h.len(),
            buckets,
        }
    }
}

/// What a scrape exposes of one model (or named ensemble).
#[derive(Debug)]
struct ModelFigures {
    labels: [(&'static str, String); 2],
    ready: bool,
    requests: u64,
    batches: u64,
    rows: u64,
    ema_seconds: Option<f64>,
    memory_bytes: Option<u64>,
    gpu_utilization: Option<f64>,
    /// Status label and count; statuses never sent are left out, but `ok`.
    responses: Vec<(String, u64)>,
    latency: Vec<StageBuckets>,
    alerts: Vec<(&'static str, bool)>,
}

impl ModelFigures {
    fn of(s: &ModelState, ready: bool) -> Self {
        let t = &s.total;
        Self {
            labels: model_labels(&s.entry.key),
            ready,
            requests: t.requests,
            batches: t.batches,
            rows: t.rows,
            ema_seconds: s.ema_ms.map(|ms| ms / 1e3),
            memory_bytes: s.entry.device_memory_bytes,
            gpu_utilization: s.gpu_utilization.map(f64::from),
            responses: t
                .responses
                .iter()
                .enumerate()
                .filter(|&(code, &n)| n > 0 || code == 0)
                .map(|(code, &n)| {
                    let name = Status(code as u32).name().unwrap_or("Other");
                    (snake_label(name), n)
                })
                .collect(),
            latency: Stage::ALL
                .iter()
                .map(|&stage| StageBuckets::of(stage, &t.hist[stage as usize]))
                .collect(),
            alerts: ALERT_KINDS
                .iter()
                .enumerate()
                .map(|(i, kind)| (kind.name(), s.alerts[i].is_some()))
                .collect(),
        }
    }
}

/// The per-model families of one scrape.
#[derive(Debug)]
struct ModelFamilies {
    models: Vec<ModelFigures>,
    alert_events: u64,
}

/// Writes a family's descriptor, then one sample per item that `value` gives one for.
fn family<'a, T: 'a>(
    e: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    kind: MetricType,
    items: impl IntoIterator<Item = &'a T>,
    mut sample: impl FnMut(&'a T, &mut MetricEncoder) -> fmt::Result,
) -> fmt::Result {
    let mut m = e.encode_descriptor(name, help, None, kind)?;
    for item in items {
        sample(item, &mut m)?;
    }
    Ok(())
}

/// A counter sample.
fn counter(
    m: &mut MetricEncoder,
    labels: &impl prometheus_client::encoding::EncodeLabelSet,
    v: u64,
) -> fmt::Result {
    ConstCounter::new(v).encode(m.encode_family(labels)?)
}

/// A gauge sample.
fn gauge(
    m: &mut MetricEncoder,
    labels: &impl prometheus_client::encoding::EncodeLabelSet,
    v: f64,
) -> fmt::Result {
    ConstGauge::new(v).encode(m.encode_family(labels)?)
}

impl Collector for ModelFamilies {
    fn encode(&self, mut e: DescriptorEncoder) -> fmt::Result {
        let models = &self.models;
        // One sample per model: counters as integers, gauges where measured.
        let counters =
            |e: &mut DescriptorEncoder, name: &str, help: &str, value: fn(&ModelFigures) -> u64| {
                family(e, name, help, MetricType::Counter, models, |f, m| {
                    counter(m, &f.labels, value(f))
                })
            };
        let gauges = |e: &mut DescriptorEncoder,
                      name: &str,
                      help: &str,
                      value: fn(&ModelFigures) -> Option<f64>| {
            family(
                e,
                name,
                help,
                MetricType::Gauge,
                models,
                |f, m| match value(f) {
                    Some(v) => gauge(m, &f.labels, v),
                    None => Ok(()),
                },
            )
        };
        use MetricType::{Counter, Gauge};
        gauges(
            &mut e,
            "tie_model_ready",
            "1 when the model passed its last health check.",
            |f| Some(f64::from(u8::from(f.ready))),
        )?;
        counters(&mut e, "tie_requests", "Frames accepted.", |f| f.requests)?;
        counters(&mut e, "tie_batches", "Batches run.", |f| f.batches)?;
        counters(
            &mut e,
            "tie_batch_rows",
            "Rows run in batches (padding excluded).",
            |f| f.rows,
        )?;
        gauges(
            &mut e,
            "tie_latency_avg_seconds",
            "EMA of server-side total latency (weight 0.1 per request).",
            |f| f.ema_seconds,
        )?;
        gauges(
            &mut e,
            "tie_model_memory_bytes",
            "Device memory the model holds.",
            |f| f.memory_bytes.map(|b| b as f64),
        )?;
        gauges(
            &mut e,
            "tie_model_gpu_utilization_ratio",
            "NVML utilisation of the model's GPUs, last interval.",
            |f| f.gpu_utilization,
        )?;
        family(
            &mut e,
            "tie_responses",
            "Responses sent, by status.",
            Counter,
            models,
            |f, m| {
                for (status, n) in &f.responses {
                    counter(m, &(f.labels.clone(), [("status", status.as_str())]), *n)?;
                }
                Ok(())
            },
        )?;
        family(
            &mut e,
            "tie_latency_seconds",
            "Latency by stage since start (see the README's Monitoring section).",
            MetricType::Histogram,
            models,
            |f, m| {
                // Buckets as counted (the encoder adds them up, and adds `+Inf` as the count).
                for st in &f.latency {
                    let labels = (f.labels.clone(), [("stage", st.stage)]);
                    m.encode_family(&labels)?
                        .encode_histogram::<prometheus_client::encoding::NoLabelSet>(
                            st.sum,
                            st.count,
                            &st.buckets,
                            None,
                        )?;
                }
                Ok(())
            },
        )?;
        family(
            &mut e,
            "tie_alert",
            "1 while a performance alert is in effect.",
            Gauge,
            models,
            |f, m| {
                for (kind, on) in &f.alerts {
                    gauge(
                        m,
                        &(f.labels.clone(), [("kind", *kind)]),
                        f64::from(u8::from(*on)),
                    )?;
                }
                Ok(())
            },
        )?;
        let m = e.encode_descriptor(
            "tie_alert_events",
            "Alert transitions (raised or cleared).",
            None,
            Counter,
        )?;
        ConstCounter::new(self.alert_events).encode(m)
    }
}

impl Monitor {
    /// Registers the figures of the models `ready` knows (`ready(i)`: model `i`'s readiness;
    /// `None`: not served now, left out) for one scrape.
    pub fn register(&self, ready: &dyn Fn(usize) -> Option<bool>, registry: &mut Registry) {
        self.collect();
        // Unloaded models leave the exposition (their counters end with them).
        let models = self
            .all()
            .iter()
            .enumerate()
            .filter_map(|(i, m)| {
                let s = m.locked();
                let ready = ready(i)?;
                (!s.retired).then(|| ModelFigures::of(&s, ready))
            })
            .collect();
        registry.register_collector(Box::new(ModelFamilies {
            models,
            alert_events: self.alert_events(),
        }));
        if let Some(j) = self.journal.get() {
            register_journal(j, registry);
        }
        if let Some(ch) = self.clickhouse.get() {
            registry.register_collector(Box::new(ClickHouseFamilies::of(ch)));
        }
        if let Some(s) = self.shadows.get() {
            let reports = s.reports();
            if !reports.is_empty() {
                registry.register_collector(Box::new(ShadowFamilies { reports }));
            }
        }
    }
}

/// The ClickHouse sink's counters as of one scrape: per table, rows sent, dropped by reason
/// and buffered; inserts that failed.
#[derive(Debug)]
struct ClickHouseFamilies {
    tables: Vec<(&'static str, [u64; 5])>,
    errors: u64,
}

impl ClickHouseFamilies {
    fn of(ch: &super::clickhouse::ClickHouse) -> Self {
        use std::sync::atomic::Ordering::Relaxed;
        let tables = super::clickhouse::Table::ALL
            .iter()
            .map(|&t| {
                let c = ch.counters(t);
                (
                    t.name(),
                    [
                        c.sent.load(Relaxed),
                        c.dropped_full.load(Relaxed),
                        c.dropped_rejected.load(Relaxed),
                        c.dropped_shutdown.load(Relaxed),
                        c.buffered.load(Relaxed),
                    ],
                )
            })
            .collect();
        Self {
            tables,
            errors: ch.errors.load(Relaxed),
        }
    }
}

impl Collector for ClickHouseFamilies {
    fn encode(&self, mut e: DescriptorEncoder) -> fmt::Result {
        family(
            &mut e,
            "tie_clickhouse_rows",
            "Rows ClickHouse took, per table.",
            MetricType::Counter,
            &self.tables,
            |(table, c), m| counter(m, &[("table", *table)], c[0]),
        )?;
        let mut m = e.encode_descriptor(
            "tie_clickhouse_rows_dropped",
            "Rows not sent to ClickHouse, per table and reason: buffer_full, rejected (refused 3 times), shutdown.",
            None,
            MetricType::Counter,
        )?;
        for (table, c) in &self.tables {
            for (reason, n) in [
                ("buffer_full", c[1]),
                ("rejected", c[2]),
                ("shutdown", c[3]),
            ] {
                counter(&mut m, &[("table", *table), ("reason", reason)], n)?;
            }
        }
        family(
            &mut e,
            "tie_clickhouse_buffered_rows",
            "Rows waiting to be sent to ClickHouse, per table.",
            MetricType::Gauge,
            &self.tables,
            |(table, c), m| gauge(m, &[("table", *table)], c[4] as f64),
        )?;
        let m = e.encode_descriptor(
            "tie_clickhouse_insert_errors",
            "ClickHouse inserts (or table creations) that failed.",
            None,
            MetricType::Counter,
        )?;
        ConstCounter::new(self.errors).encode(m)
    }
}

/// The shadows' figures as of one scrape, by primary key.
#[derive(Debug)]
struct ShadowFamilies {
    reports: Vec<(String, crate::journal::shadow::ShadowReport)>,
}

impl ShadowFamilies {
    /// A primary's labels: its model and version, and its shadow.
    fn labels(key: &str, r: &crate::journal::shadow::ShadowReport) -> Vec<(&'static str, String)> {
        let [m, v] = model_labels(key);
        vec![m, v, ("shadow", r.shadow.clone())]
    }

    /// Per output: the labels with `output`, and `value` of that output.
    fn per_output(
        &self,
        value: fn(&crate::journal::shadow::ShadowOutput) -> f64,
    ) -> Vec<(Vec<(&'static str, String)>, f64)> {
        self.reports
            .iter()
            .flat_map(|(key, r)| {
                r.outputs.iter().enumerate().map(move |(i, o)| {
                    let mut labels = Self::labels(key, r);
                    labels.push(("output", i.to_string()));
                    (labels, value(o))
                })
            })
            .collect()
    }
}

impl Collector for ShadowFamilies {
    fn encode(&self, mut e: DescriptorEncoder) -> fmt::Result {
        type Count = fn(&crate::journal::shadow::ShadowReport) -> u64;
        let counts: [(&str, &str, Count); 6] = [
            (
                "tie_shadow_rows",
                "Rows both the primary and its shadow answered.",
                |r| r.rows,
            ),
            (
                "tie_shadow_rows_identical",
                "Shadowed rows answered with the same bits.",
                |r| r.identical,
            ),
            (
                "tie_shadow_rows_different",
                "Shadowed rows over the tolerance on some output.",
                |r| r.different,
            ),
            (
                "tie_shadow_rows_dropped",
                "Rows not shadowed: the shadow runner was behind.",
                |r| r.dropped,
            ),
            (
                "tie_shadow_rows_unavailable",
                "Rows not shadowed: the shadow version is not loaded or reads another shape.",
                |r| r.unavailable,
            ),
            (
                "tie_shadow_rows_failed",
                "Rows whose shadow batch failed.",
                |r| r.failed,
            ),
        ];
        for (name, help, count) in counts {
            family(
                &mut e,
                name,
                help,
                MetricType::Counter,
                &self.reports,
                |(key, r), m| counter(m, &Self::labels(key, r), count(r)),
            )?;
        }
        type PerOutput = fn(&crate::journal::shadow::ShadowOutput) -> f64;
        let gauges: [(&str, &str, PerOutput); 4] = [
            (
                "tie_shadow_abs_diff_max",
                "Largest |primary − shadow| per output.",
                |o| o.max_abs_diff,
            ),
            (
                "tie_shadow_abs_diff_mean",
                "Mean |primary − shadow| per output.",
                |o| o.mean_abs_diff,
            ),
            (
                "tie_shadow_over_tolerance_ratio",
                "Share of shadowed rows over the tolerance, per output.",
                |o| o.over_tolerance_share,
            ),
            (
                "tie_shadow_sign_agreement_ratio",
                "Share of shadowed rows where primary and shadow have the same sign, per output.",
                |o| o.sign_agreement,
            ),
        ];
        for (name, help, value) in gauges {
            let samples = self.per_output(value);
            family(
                &mut e,
                name,
                help,
                MetricType::Gauge,
                &samples,
                |(labels, v), m| gauge(m, labels, *v),
            )?;
        }
        Ok(())
    }
}

/// A model version's journal counters: its labels, rows written, rows dropped.
type JournalCounts = ([(&'static str, String); 2], u64, u64);

/// The journal's counters as of one scrape.
#[derive(Debug)]
struct JournalFamilies {
    models: Vec<JournalCounts>,
    files: u64,
    write_errors: u64,
}

impl Collector for JournalFamilies {
    fn encode(&self, mut e: DescriptorEncoder) -> fmt::Result {
        family(
            &mut e,
            "tie_journal_rows",
            "Answers written to the journal's files.",
            MetricType::Counter,
            &self.models,
            |(labels, written, _), m| counter(m, labels, *written),
        )?;
        family(
            &mut e,
            "tie_journal_rows_dropped",
            "Answers not journaled: the writer was behind, or a file could not be written.",
            MetricType::Counter,
            &self.models,
            |(labels, _, dropped), m| counter(m, labels, *dropped),
        )?;
        let m = e.encode_descriptor(
            "tie_journal_files",
            "Journal files closed.",
            None,
            MetricType::Counter,
        )?;
        ConstCounter::new(self.files).encode(m)?;
        let m = e.encode_descriptor(
            "tie_journal_write_errors",
            "Journal writes that failed (their rows are counted dropped).",
            None,
            MetricType::Counter,
        )?;
        ConstCounter::new(self.write_errors).encode(m)
    }
}

/// Registers the journal's counters for one scrape.
pub fn register_journal(journal: &crate::journal::Journal, registry: &mut Registry) {
    use std::sync::atomic::Ordering::Relaxed;
    registry.register_collector(Box::new(JournalFamilies {
        models: journal
            .all_counters()
            .into_iter()
            .map(|(key, c)| {
                (
                    model_labels(&key),
                    c.written.load(Relaxed),
                    c.dropped.load(Relaxed),
                )
            })
            .collect(),
        files: journal.files.load(Relaxed),
        write_errors: journal.write_errors.load(Relaxed),
    }));
}

/// The control plane's counters as of one scrape.
#[derive(Debug)]
struct HttpFamilies {
    by_route: Vec<((String, u16), u64)>,
    by_kind: Vec<(String, u64)>,
}

impl Collector for HttpFamilies {
    fn encode(&self, mut e: DescriptorEncoder) -> fmt::Result {
        family(
            &mut e,
            "tie_http_responses",
            "HTTP responses by route and code.",
            MetricType::Counter,
            &self.by_route,
            |((route, code), n), m| {
                counter(
                    m,
                    &[("route", route.clone()), ("code", code.to_string())],
                    *n,
                )
            },
        )?;
        family(
            &mut e,
            "tie_http_errors",
            "HTTP error responses by kind.",
            MetricType::Counter,
            &self.by_kind,
            |(kind, n), m| counter(m, &[("kind", kind.as_str())], *n),
        )
    }
}

impl HttpCounters {
    /// Registers the counters as they are now.
    pub fn register(&self, registry: &mut Registry) {
        registry.register_collector(Box::new(HttpFamilies {
            by_route: self
                .by_route
                .locked()
                .iter()
                .map(|(k, &n)| (k.clone(), n))
                .collect(),
            by_kind: self
                .by_kind
                .locked()
                .iter()
                .map(|(kind, &n)| (snake_label(kind), n))
                .collect(),
        }));
    }
}

/// The standard `process_*` figures of this process, read from `/proc` at each scrape.
#[derive(Debug)]
pub struct ProcessFamilies;

impl Collector for ProcessFamilies {
    fn encode(&self, mut e: DescriptorEncoder) -> fmt::Result {
        let p = metrics_process::collector::collect();
        let one = |e: &mut DescriptorEncoder, name: &str, help: &str, kind, v: Option<f64>| {
            let Some(v) = v else { return Ok(()) };
            let m = e.encode_descriptor(name, help, None, kind)?;
            match kind {
                MetricType::Counter => ConstCounter::new(v).encode(m),
                _ => ConstGauge::new(v).encode(m),
            }
        };
        let f = |v: Option<u64>| v.map(|v| v as f64);
        use MetricType::{Counter, Gauge};
        one(
            &mut e,
            "process_cpu_seconds",
            "Total user and system CPU time spent in seconds.",
            Counter,
            p.cpu_seconds_total,
        )?;
        one(
            &mut e,
            "process_open_fds",
            "Number of open file descriptors.",
            Gauge,
            f(p.open_fds),
        )?;
        one(
            &mut e,
            "process_max_fds",
            "Maximum number of open file descriptors (0: unlimited).",
            Gauge,
            f(p.max_fds),
        )?;
        one(
            &mut e,
            "process_virtual_memory_bytes",
            "Virtual memory size in bytes.",
            Gauge,
            f(p.virtual_memory_bytes),
        )?;
        one(
            &mut e,
            "process_resident_memory_bytes",
            "Resident memory size in bytes.",
            Gauge,
            f(p.resident_memory_bytes),
        )?;
        one(
            &mut e,
            "process_start_time_seconds",
            "Start time of the process since the Unix epoch in seconds.",
            Gauge,
            f(p.start_time_seconds),
        )?;
        one(
            &mut e,
            "process_threads",
            "Number of OS threads in the process.",
            Gauge,
            f(p.threads),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{MonitoringSection, PerformanceThresholdsSection};

    #[test]
    fn latency_buckets_count_each_value_once_up_to_its_bound() {
        let monitor = Monitor::new(
            vec![ModelEntry {
                key: "m:3".into(),
                device_memory_bytes: None,
                pci_bus_ids: Vec::new(),
            }],
            PerformanceThresholdsSection::default(),
            MonitoringSection::default(),
        );
        let mut r = monitor.recorder(0);
        let s = r.sample();
        s.record_n(Stage::Total, 1_000, 3);
        s.record_n(Stage::Total, 3_000, 2);
        s.record(Stage::Total, 20_000_000);
        s.record(Stage::Total, 30_000_000_000);
        s.respond(Status::MODEL_NOT_FOUND);
        r.flush(u64::MAX, 0);
        let mut registry = Registry::default();
        monitor.register(&|_| Some(true), &mut registry);
        let text = encode(&registry);
        let bucket = |le: &str| {
            let line = format!(
                "tie_latency_seconds_bucket{{model=\"m\",version=\"3\",stage=\"total\",le=\"{le}\"}} "
            );
            let at = text
                .find(&line)
                .unwrap_or_else(|| panic!("{line} in\n{text}"));
            let rest = &text[at + line.len()..];
            rest[..rest.find('\n').unwrap()].parse::<u64>().unwrap()
        };
        assert_eq!(bucket("5e-07"), 0);
        assert_eq!(bucket("1e-06"), 3);
        assert_eq!(bucket("2e-06"), 3);
        assert_eq!(bucket("5e-06"), 5);
        assert_eq!(bucket("0.01"), 5);
        assert_eq!(bucket("0.02"), 6);
        assert_eq!(bucket("10"), 6);
        assert_eq!(bucket("+Inf"), 7);
        assert!(text
            .contains("tie_latency_seconds_count{model=\"m\",version=\"3\",stage=\"total\"} 7\n"));
        // A stage never measured is a histogram of nothing.
        assert!(text
            .contains("tie_latency_seconds_count{model=\"m\",version=\"3\",stage=\"gather\"} 0\n"));
        assert!(text.contains(
            "tie_responses_total{model=\"m\",version=\"3\",status=\"model_not_found\"} 1\n"
        ));
        assert!(text.contains("tie_responses_total{model=\"m\",version=\"3\",status=\"ok\"} 0\n"));
        // Left out: a model not served now.
        let mut registry = Registry::default();
        monitor.register(&|_| None, &mut registry);
        assert!(!encode(&registry).contains("model=\"m\""));
    }
}
