//! The performance monitor: per model, HdrHistograms of each stage of a request and counters of
//! its outcomes, the spec's `ModelPerformanceMetrics`, threshold alerts, Prometheus text and
//! HdrHistogram interval logs.
//!
//! # How figures get here without slowing the pollers
//!
//! A poller records into its own [`Sample`] per model (a histogram record is a few
//! nanoseconds, with no lock and no shared cache line). Every [`FLUSH_NS`], and when it goes
//! idle, it swaps the sample for an empty one from its [`Exchange`] with `try_lock` only: it
//! never waits, never allocates, and keeps recording into the same sample when the monitor
//! holds a lock. The monitor merges what was handed over into the model's totals ([`collect`])
//! before every read and on every tick, empties the samples and hands them back.
//!
//! # Stages (nanoseconds)
//!
//! | stage | per | from | to |
//! |---|---|---|---|
//! | `queue` | request | frame accepted | its batch starts |
//! | `compute` | request | its batch starts | its batch's outputs are ready |
//! | `total` | request | frame accepted | its response is written (server side) |
//! | `end_to_end` | request | client submit | client read the response (reported by the client in its next frame) |
//! | `gather` | batch | batch starts | rows copied into the backend's staging (pinned memory on a GPU: the host side of H2D) |
//! | `execute` | batch | rows staged | outputs back in host memory (H2D, kernels and D2H on a GPU) |
//!
//! Only requests that were executed are in `queue`, `compute` and `total`; every response is
//! counted by its status.
//!
//! [`collect`]: Monitor::collect
#![forbid(unsafe_code)]

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use chrono::{DateTime, Utc};
use hdrhistogram::Histogram;
use serde::Serialize;
use tie_layouts::abi::Status;

use crate::config::{MonitoringSection, PerformanceThresholdsSection};

/// Largest value a histogram holds (60 s in ns); larger ones are recorded as this.
pub const MAX_NS: u64 = 60_000_000_000;
/// Significant digits of every histogram: values within 1% (a histogram is 30 KB, a
/// [`Sample`] 180 KB; a poller holds at most three samples per model).
pub const SIGFIG: u8 = 2;
/// How often a busy poller hands its samples over.
pub const FLUSH_NS: u64 = 50_000_000;
/// Status codes counted one by one (0..=10); others are counted as the last.
pub const STATUS_SLOTS: usize = 12;

/// A stage of a request (see the module docs).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stage {
    /// Accepted to batch start.
    Queue = 0,
    /// Batch start to outputs ready.
    Compute = 1,
    /// Accepted to response written.
    Total = 2,
    /// Client submit to client read.
    EndToEnd = 3,
    /// Copying a batch's rows into staging.
    Gather = 4,
    /// Running a staged batch.
    Execute = 5,
}

/// Number of stages.
pub const STAGES: usize = 6;

impl Stage {
    /// Every stage, in index order.
    pub const ALL: [Stage; STAGES] = [
        Stage::Queue,
        Stage::Compute,
        Stage::Total,
        Stage::EndToEnd,
        Stage::Gather,
        Stage::Execute,
    ];

    /// Name in metrics, logs and `.hlog` tags.
    pub fn name(self) -> &'static str {
        match self {
            Stage::Queue => "queue",
            Stage::Compute => "compute",
            Stage::Total => "total",
            Stage::EndToEnd => "end_to_end",
            Stage::Gather => "gather",
            Stage::Execute => "execute",
        }
    }
}

fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, MAX_NS, SIGFIG).expect("valid histogram bounds")
}

/// Figures of one model over some time: stage histograms and outcome counters.
#[derive(Clone, Debug)]
pub struct Sample {
    /// Per [`Stage`].
    pub hist: [Histogram<u64>; STAGES],
    /// Responses by status code (see [`STATUS_SLOTS`]).
    pub responses: [u64; STATUS_SLOTS],
    /// Frames accepted.
    pub requests: u64,
    /// Batches run.
    pub batches: u64,
    /// Rows run (padding excluded).
    pub rows: u64,
    /// Values recorded with [`later`](Self::later) and not yet in `hist`: (value, count,
    /// stage).
    pending: Vec<(u64, u32, u8)>,
}

/// Values a sample keeps for later before it records them itself (a poller settles them after
/// publishing once half are taken, so this is a last resort).
const PENDING: usize = 2048;

impl Default for Sample {
    fn default() -> Self {
        Self {
            hist: std::array::from_fn(|_| histogram()),
            responses: [0; STATUS_SLOTS],
            requests: 0,
            batches: 0,
            rows: 0,
            pending: Vec::with_capacity(PENDING),
        }
    }
}

impl Sample {
    /// Records `ns` once in `stage`.
    #[inline]
    pub fn record(&mut self, stage: Stage, ns: u64) {
        // Cannot fail: the value is clamped into the histogram's range.
        let _ = self.hist[stage as usize].record(ns.clamp(1, MAX_NS));
    }

    /// Records `ns` `n` times in `stage`.
    #[inline]
    pub fn record_n(&mut self, stage: Stage, ns: u64, n: u64) {
        let _ = self.hist[stage as usize].record_n(ns.clamp(1, MAX_NS), n);
    }

    /// Keeps `ns` (`n` times) for `stage`, to be recorded by [`settle`](Self::settle): a
    /// store now, the histogram's work when the poller is idle. Never allocates.
    #[inline]
    pub fn later(&mut self, stage: Stage, ns: u64, n: u32) {
        if self.pending.len() == PENDING {
            self.settle();
        }
        self.pending.push((ns, n, stage as u8));
    }

    /// Whether half the room for kept values is taken.
    #[inline]
    pub fn half_full(&self) -> bool {
        self.pending.len() >= PENDING / 2
    }

    /// Records the values kept by [`later`](Self::later).
    pub fn settle(&mut self) {
        for (ns, n, stage) in self.pending.drain(..) {
            let _ = self.hist[usize::from(stage)].record_n(ns.clamp(1, MAX_NS), u64::from(n));
        }
    }

    /// Counts one response with `status`.
    #[inline]
    pub fn respond(&mut self, status: Status) {
        self.respond_n(status, 1);
    }

    /// Counts `n` responses with `status`.
    #[inline]
    pub fn respond_n(&mut self, status: Status, n: u64) {
        self.responses[(status.0 as usize).min(STATUS_SLOTS - 1)] += n;
    }

    /// Whether nothing was recorded.
    pub fn is_empty(&self) -> bool {
        self.requests == 0
            && self.batches == 0
            && self.responses.iter().all(|&r| r == 0)
            && self.hist.iter().all(|h| h.is_empty())
            && self.pending.is_empty()
    }

    fn add(&mut self, other: &Sample) {
        debug_assert!(
            other.pending.is_empty(),
            "a sample is settled before it is merged"
        );
        for (h, o) in self.hist.iter_mut().zip(&other.hist) {
            // Same bounds on both sides: cannot fail.
            let _ = h.add(o);
        }
        for (r, o) in self.responses.iter_mut().zip(&other.responses) {
            *r += o;
        }
        self.requests += other.requests;
        self.batches += other.batches;
        self.rows += other.rows;
    }

    /// Responses with an error status.
    pub fn failures(&self) -> u64 {
        self.responses[1..].iter().sum()
    }

    /// All responses.
    pub fn total_responses(&self) -> u64 {
        self.responses.iter().sum()
    }
}

/// Where one poller hands one model's samples to the monitor.
///
/// Samples are boxed so a hand-over moves a pointer, not the sample.
#[derive(Debug)]
#[allow(clippy::vec_box)]
pub struct Exchange {
    model: usize,
    filled: Mutex<Vec<Box<Sample>>>,
    spare: Mutex<Vec<Box<Sample>>>,
    /// Its recorder finished (its lane is gone): dropped once emptied.
    done: std::sync::atomic::AtomicBool,
}

/// A poller's recorder for one model.
#[derive(Debug)]
pub struct Recorder {
    sample: Box<Sample>,
    /// An empty sample taken from the spares whose hand-over failed; used next time.
    reserve: Option<Box<Sample>>,
    exchange: Arc<Exchange>,
    flushed_ns: u64,
    /// Something was recorded since the last hand-over.
    dirty: bool,
}

impl Recorder {
    /// The sample to record into.
    #[inline]
    pub fn sample(&mut self) -> &mut Sample {
        self.dirty = true;
        &mut self.sample
    }

    /// Whether something was recorded and not handed over yet.
    #[inline]
    pub fn is_dirty(&self) -> bool {
        self.dirty
    }

    /// Hands the sample to the monitor when something was recorded and the last hand-over is
    /// at least `min_age_ns` old. Never blocks and never allocates; when the monitor holds a
    /// lock or has no empty sample to give, recording goes on in the same sample and a later
    /// call hands it over.
    pub fn flush(&mut self, now_ns: u64, min_age_ns: u64) {
        if !self.dirty || now_ns.saturating_sub(self.flushed_ns) < min_age_ns {
            return;
        }
        self.sample.settle();
        let fresh = match self.reserve.take() {
            Some(f) => f,
            None => match self.exchange.spare.try_lock() {
                Ok(mut spare) => match spare.pop() {
                    Some(f) => f,
                    None => return,
                },
                Err(_) => return,
            },
        };
        let full = std::mem::replace(&mut self.sample, fresh);
        match self.exchange.filled.try_lock() {
            // (see `finish` for the hand-over that waits)
            // The vector has room for every sample of this exchange: no allocation.
            Ok(mut filled) => {
                filled.push(full);
                self.flushed_ns = now_ns;
                self.dirty = false;
            }
            Err(_) => {
                // The monitor holds it: keep recording into the full sample.
                let fresh = std::mem::replace(&mut self.sample, full);
                self.reserve = Some(fresh);
            }
        }
    }
}

impl Recorder {
    /// Hands what is left to the monitor, waiting for its locks: for a poller that stops or
    /// drops the lane. The monitor lets go of the exchange once it merged the rest.
    pub fn finish(&mut self) {
        if self.dirty {
            self.sample.settle();
            let full = std::mem::take(&mut self.sample);
            lock(&self.exchange.filled).push(full);
            self.dirty = false;
        }
        self.exchange.done.store(true, Ordering::Release);
    }
}

/// Samples per exchange: the poller's, one in the monitor's hands and one spare.
const SAMPLES_PER_EXCHANGE: usize = 3;

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

const ALERT_KINDS: [AlertKind; 5] = [
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
    fn of(h: &Histogram<u64>) -> Self {
        let ms = |ns: u64| ns as f64 / 1e6;
        if h.is_empty() {
            return Self::default();
        }
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

/// The spec's `ModelPerformanceMetrics`, with more percentiles, the stages and the alerts.
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
    /// Server-side total latency, EMA with weight 0.1 per request (the spec's rule; applied
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
    /// `failed_requests / total_requests` (the spec's, since start).
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
    /// Per stage (see the monitor's docs).
    pub stages: BTreeMap<String, StageSummary>,
    /// Alerts in effect.
    pub alerts: Vec<Alert>,
    /// When the figures were last merged.
    pub last_updated: DateTime<Utc>,
}

/// What the monitor knows of a model besides its figures.
#[derive(Clone, Debug)]
pub struct ModelEntry {
    /// `name:version`.
    pub key: String,
    /// Device memory (bytes), when on a GPU.
    pub device_memory_bytes: Option<u64>,
    /// PCI bus ids of its GPUs.
    pub pci_bus_ids: Vec<String>,
}

#[derive(Debug)]
struct ModelState {
    entry: ModelEntry,
    /// Per alert kind: monitor intervals in a row without a measurement.
    unmeasured: [u32; 5],
    total: Sample,
    interval: Sample,
    ema_ms: Option<f64>,
    throughput_rps: f32,
    recent_error_rate: Option<f32>,
    gpu_utilization: Option<f32>,
    alerts: [Option<Alert>; 5],
    last_updated: DateTime<Utc>,
    /// Last time a request was accepted (for idle models).
    last_request: Option<DateTime<Utc>>,
    /// Unloaded: no longer exposed, ticked or logged.
    retired: bool,
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

/// Counts of control-plane errors by kind, each counted once where its response is made.
#[derive(Debug, Default)]
pub struct HttpCounters {
    by_kind: Mutex<BTreeMap<&'static str, u64>>,
    by_route: Mutex<BTreeMap<(String, u16), u64>>,
}

impl HttpCounters {
    /// Counts one error of `kind`.
    pub fn error(&self, kind: &'static str) {
        *lock(&self.by_kind).entry(kind).or_default() += 1;
    }

    /// Counts one HTTP response.
    pub fn response(&self, route: &str, code: u16) {
        *lock(&self.by_route)
            .entry((route.to_string(), code))
            .or_default() += 1;
    }

    /// Prometheus text of the counters.
    pub fn prometheus(&self, out: &mut String) {
        let _ = writeln!(
            out,
            "# HELP tie_http_responses_total HTTP responses by route and code.\n# TYPE tie_http_responses_total counter"
        );
        for ((route, code), n) in lock(&self.by_route).iter() {
            let _ = writeln!(
                out,
                "tie_http_responses_total{{route=\"{route}\",code=\"{code}\"}} {n}"
            );
        }
        let _ = writeln!(
            out,
            "# HELP tie_http_errors_total HTTP error responses by kind.\n# TYPE tie_http_errors_total counter"
        );
        for (kind, n) in lock(&self.by_kind).iter() {
            let _ = writeln!(out, "tie_http_errors_total{{kind=\"{kind}\"}} {n}");
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The performance monitor of a server.
#[derive(Debug)]
pub struct Monitor {
    /// By slot of the server's model set; append-only (an unloaded model is retired).
    models: std::sync::RwLock<Vec<Arc<Mutex<ModelState>>>>,
    exchanges: Mutex<Vec<Arc<Exchange>>>,
    thresholds: PerformanceThresholdsSection,
    settings: MonitoringSection,
    started: SystemTime,
    /// Alert transitions so far (raised and cleared).
    alert_events: AtomicU64,
}

impl Monitor {
    /// A monitor for `models` (indexed like the server's model set; more are added with
    /// [`Monitor::add`]).
    pub fn new(
        models: Vec<ModelEntry>,
        thresholds: PerformanceThresholdsSection,
        settings: MonitoringSection,
    ) -> Self {
        let monitor = Self {
            models: Default::default(),
            exchanges: Mutex::new(Vec::new()),
            thresholds,
            settings,
            started: SystemTime::now(),
            alert_events: AtomicU64::new(0),
        };
        for entry in models {
            monitor.add(entry);
        }
        monitor
    }

    /// Adds a model; returns its index (the next slot).
    pub fn add(&self, entry: ModelEntry) -> usize {
        let state = ModelState {
            entry,
            unmeasured: [0; 5],
            total: Sample::default(),
            interval: Sample::default(),
            ema_ms: None,
            throughput_rps: 0.0,
            recent_error_rate: None,
            gpu_utilization: None,
            alerts: Default::default(),
            last_updated: Utc::now(),
            last_request: None,
            retired: false,
        };
        let mut models = self.models.write().unwrap_or_else(|e| e.into_inner());
        models.push(Arc::new(Mutex::new(state)));
        models.len() - 1
    }

    /// Records `rows` answers of one request served outside the pollers (an ensemble's, by the
    /// control plane): its end-to-end server time, when it succeeded, and its status.
    pub fn record_request(&self, index: usize, total_ns: u64, status: Status, rows: u64) {
        let model = self.model(index);
        let mut state = lock(&model);
        let s = &mut *state;
        for sample in [&mut s.total, &mut s.interval] {
            sample.requests += rows;
            sample.respond_n(status, rows);
            if status == Status::OK {
                sample.record_n(Stage::Total, total_ns, rows);
            }
        }
        s.last_request = Some(Utc::now());
        s.last_updated = Utc::now();
    }

    /// Takes model `index` out of the exposition and the ticks (it was unloaded). Its alerts
    /// end with it.
    pub fn retire(&self, index: usize) {
        self.collect();
        lock(&self.model(index)).retired = true;
    }

    fn model(&self, index: usize) -> Arc<Mutex<ModelState>> {
        self.models.read().unwrap_or_else(|e| e.into_inner())[index].clone()
    }

    fn all(&self) -> Vec<Arc<Mutex<ModelState>>> {
        self.models
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// A recorder for model `model` of a new poller.
    pub fn recorder(&self, model: usize) -> Recorder {
        let exchange = Arc::new(Exchange {
            model,
            filled: Mutex::new(Vec::with_capacity(SAMPLES_PER_EXCHANGE)),
            spare: Mutex::new(
                (1..SAMPLES_PER_EXCHANGE)
                    .map(|_| Box::<Sample>::default())
                    .collect(),
            ),
            done: std::sync::atomic::AtomicBool::new(false),
        });
        lock(&self.exchanges).push(exchange.clone());
        Recorder {
            sample: Box::default(),
            reserve: None,
            exchange,
            flushed_ns: 0,
            dirty: false,
        }
    }

    /// Merges every sample the pollers handed over into the models' figures.
    pub fn collect(&self) {
        let exchanges = lock(&self.exchanges).clone();
        let mut taken = Vec::new();
        for ex in exchanges {
            taken.extend(lock(&ex.filled).drain(..));
            if taken.is_empty() {
                continue;
            }
            {
                let model = self.model(ex.model);
                let mut state = lock(&model);
                for s in &taken {
                    state.total.add(s);
                    state.interval.add(s);
                    if s.requests > 0 {
                        state.last_request = Some(Utc::now());
                    }
                }
                state.last_updated = Utc::now();
            }
            for mut s in taken.drain(..) {
                s.reset_in_place();
                lock(&ex.spare).push(s);
            }
        }
        // Exchanges of lanes that are gone, once merged (`done` is set after the last push).
        lock(&self.exchanges)
            .retain(|ex| !ex.done.load(Ordering::Acquire) || !lock(&ex.filled).is_empty());
    }

    /// Number of models.
    pub fn len(&self) -> usize {
        self.models.read().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// Whether there is no model.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Alert transitions so far.
    pub fn alert_events(&self) -> u64 {
        self.alert_events.load(Ordering::Relaxed)
    }

    /// The figures of model `index` (after merging what the pollers handed over).
    pub fn metrics(&self, index: usize) -> ModelPerformanceMetrics {
        self.collect();
        let model = self.model(index);
        let state = lock(&model);
        metrics_of(&state)
    }

    /// Seconds since the monitor started.
    fn uptime(&self) -> Duration {
        self.started.elapsed().unwrap_or_default()
    }

    /// Ends an interval of `elapsed`: updates rates and the EMA, evaluates the thresholds,
    /// and passes each model's interval histograms to `log` before emptying them. Returns the
    /// alert transitions.
    pub fn tick(
        &self,
        elapsed: Duration,
        gpus: Option<&[crate::gpu::GpuFigures]>,
        log: &mut dyn FnMut(usize, &Sample),
    ) -> Vec<AlertEvent> {
        self.collect();
        let mut events = Vec::new();
        let secs = elapsed.as_secs_f64().max(1e-9);
        for (index, m) in self.all().iter().enumerate() {
            let mut state = lock(m);
            let s = &mut *state;
            if s.retired {
                continue;
            }
            let answered = s.interval.total_responses();
            let ok = s.interval.responses[0];
            s.throughput_rps = (ok as f64 / secs) as f32;
            if answered > 0 {
                s.recent_error_rate = Some(s.interval.failures() as f32 / answered as f32);
            }
            let total = &s.interval.hist[Stage::Total as usize];
            if !total.is_empty() {
                // The spec's EMA (weight 0.1 per request), as if each request of the interval
                // had the interval's mean.
                let keep = 0.9f64.powf(total.len() as f64);
                let mean_ms = total.mean() / 1e6;
                s.ema_ms = Some(match s.ema_ms {
                    Some(ema) => ema * keep + mean_ms * (1.0 - keep),
                    None => mean_ms,
                });
            }
            s.gpu_utilization = gpus.and_then(|g| gpu_utilization(&s.entry.pci_bus_ids, g));
            let busy = s.interval.requests > 0;
            let t = &self.thresholds;
            // A value is measured only in an interval that had what it is about; the EMA is
            // a latency only while requests complete.
            let values = [
                (
                    s.ema_ms.map(|v| v as f32).filter(|_| !total.is_empty()),
                    t.max_latency_ms,
                    true,
                ),
                (
                    s.recent_error_rate.filter(|_| answered > 0),
                    t.max_error_rate,
                    true,
                ),
                (
                    busy.then_some(s.throughput_rps),
                    t.min_throughput_rps,
                    false,
                ),
                (
                    s.entry
                        .device_memory_bytes
                        .map(|b| (b as f64 / 1048576.0) as f32),
                    t.max_memory_usage_mb,
                    true,
                ),
                (
                    s.gpu_utilization.filter(|_| busy),
                    t.min_gpu_utilization,
                    false,
                ),
            ];
            let now = Utc::now();
            for (i, (value, threshold, upper)) in values.into_iter().enumerate() {
                let active = s.alerts[i].is_some();
                s.unmeasured[i] = if value.is_some() {
                    0
                } else {
                    s.unmeasured[i].saturating_add(1)
                };
                // An alert whose value goes unmeasured (no traffic) for a while is over: a
                // quiet model is not a slow one.
                let stale = active && s.unmeasured[i] >= STALE_INTERVALS;
                let next = !stale && alert_state(active, value, threshold, upper);
                let kind = ALERT_KINDS[i];
                if next != active {
                    let event = AlertEvent {
                        model_key: s.entry.key.clone(),
                        state: if next { "raised" } else { "cleared" },
                        kind,
                        value: value.unwrap_or_default(),
                        threshold,
                        timestamp: now,
                        note: stale.then_some("no measurement for a while"),
                    };
                    events.push(event);
                }
                if stale && kind == AlertKind::Latency {
                    // The EMA of a burst long past says nothing of the next request.
                    s.ema_ms = None;
                }
                if next {
                    let since = s.alerts[i].as_ref().map_or(now, |a| a.since);
                    s.alerts[i] = Some(Alert {
                        kind,
                        value: value
                            .unwrap_or_else(|| s.alerts[i].as_ref().map_or(0.0, |a| a.value)),
                        threshold,
                        since,
                    });
                } else {
                    s.alerts[i] = None;
                }
            }
            log(index, &s.interval);
            s.interval.reset_in_place();
        }
        self.alert_events
            .fetch_add(events.len() as u64, Ordering::Relaxed);
        events
    }

    /// Prometheus text exposition of the figures of the models `ready` knows (`ready(i)`: model
    /// `i`'s readiness; `None`: not served now, left out) and the control-plane counters.
    pub fn prometheus(&self, ready: &dyn Fn(usize) -> Option<bool>, out: &mut String) {
        self.collect();
        let all = self.all();
        // Unloaded models leave the exposition (their counters end with them).
        let (indices, states): (Vec<usize>, Vec<_>) = all
            .iter()
            .enumerate()
            .map(|(i, m)| (i, lock(m)))
            .filter(|(i, s)| !s.retired && ready(*i).is_some())
            .unzip();
        let family = |out: &mut String, name: &str, kind: &str, help: &str| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        };
        family(out, "tie_up", "gauge", "1 while the server runs.");
        let _ = writeln!(out, "tie_up 1");
        family(
            out,
            "tie_uptime_seconds",
            "gauge",
            "Seconds since the server started.",
        );
        let _ = writeln!(out, "tie_uptime_seconds {:.3}", self.uptime().as_secs_f64());
        family(
            out,
            "tie_model_ready",
            "gauge",
            "1 when the model passed its last health check.",
        );
        for (&i, s) in indices.iter().zip(&states) {
            let _ = writeln!(
                out,
                "tie_model_ready{{model=\"{}\"}} {}",
                label(&s.entry.key),
                u8::from(ready(i) == Some(true))
            );
        }
        family(out, "tie_requests_total", "counter", "Frames accepted.");
        for s in &states {
            let _ = writeln!(
                out,
                "tie_requests_total{{model=\"{}\"}} {}",
                label(&s.entry.key),
                s.total.requests
            );
        }
        family(
            out,
            "tie_responses_total",
            "counter",
            "Responses sent, by status.",
        );
        for s in &states {
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
        family(out, "tie_batches_total", "counter", "Batches run.");
        for s in &states {
            let _ = writeln!(
                out,
                "tie_batches_total{{model=\"{}\"}} {}",
                label(&s.entry.key),
                s.total.batches
            );
        }
        family(
            out,
            "tie_batch_rows_total",
            "counter",
            "Rows run in batches (padding excluded).",
        );
        for s in &states {
            let _ = writeln!(
                out,
                "tie_batch_rows_total{{model=\"{}\"}} {}",
                label(&s.entry.key),
                s.total.rows
            );
        }
        family(
            out,
            "tie_latency_seconds",
            "summary",
            "Latency by stage since start (see the README's Monitoring section).",
        );
        for s in &states {
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
        family(
            out,
            "tie_latency_avg_seconds",
            "gauge",
            "The spec's EMA of server-side latency.",
        );
        for s in &states {
            if let Some(ema) = s.ema_ms {
                let _ = writeln!(
                    out,
                    "tie_latency_avg_seconds{{model=\"{}\"}} {}",
                    label(&s.entry.key),
                    ema / 1e3
                );
            }
        }
        family(
            out,
            "tie_throughput_rps",
            "gauge",
            "Predictions per second, last interval.",
        );
        for s in &states {
            let _ = writeln!(
                out,
                "tie_throughput_rps{{model=\"{}\"}} {}",
                label(&s.entry.key),
                s.throughput_rps
            );
        }
        family(
            out,
            "tie_error_rate",
            "gauge",
            "Errors over responses, last interval with traffic.",
        );
        for s in &states {
            if let Some(r) = s.recent_error_rate {
                let _ = writeln!(
                    out,
                    "tie_error_rate{{model=\"{}\"}} {r}",
                    label(&s.entry.key)
                );
            }
        }
        family(
            out,
            "tie_model_memory_bytes",
            "gauge",
            "Device memory the model holds.",
        );
        for s in &states {
            if let Some(b) = s.entry.device_memory_bytes {
                let _ = writeln!(
                    out,
                    "tie_model_memory_bytes{{model=\"{}\"}} {b}",
                    label(&s.entry.key)
                );
            }
        }
        family(
            out,
            "tie_model_gpu_utilization_ratio",
            "gauge",
            "NVML utilisation of the model's GPUs.",
        );
        for s in &states {
            if let Some(u) = s.gpu_utilization {
                let _ = writeln!(
                    out,
                    "tie_model_gpu_utilization_ratio{{model=\"{}\"}} {u}",
                    label(&s.entry.key)
                );
            }
        }
        family(
            out,
            "tie_alert",
            "gauge",
            "1 while a performance alert is in effect.",
        );
        for s in &states {
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
        drop(states);
        family(
            out,
            "tie_alert_events_total",
            "counter",
            "Alert transitions (raised or cleared).",
        );
        let _ = writeln!(out, "tie_alert_events_total {}", self.alert_events());
    }

    /// The monitor's settings.
    pub fn settings(&self) -> &MonitoringSection {
        &self.settings
    }

    /// The model entries, indexed like the server's models.
    pub fn entries(&self) -> Vec<ModelEntry> {
        self.all().iter().map(|m| lock(m).entry.clone()).collect()
    }

    /// NVML utilisation (0..1) of model `index`'s GPUs at the last tick.
    pub fn gpu_utilization(&self, index: usize) -> Option<f32> {
        lock(&self.model(index)).gpu_utilization
    }

    /// When model `index` last accepted a request.
    pub fn last_request(&self, index: usize) -> Option<DateTime<Utc>> {
        self.collect();
        lock(&self.model(index)).last_request
    }
}

impl Sample {
    /// Empties the sample, keeping its allocations.
    pub fn reset_in_place(&mut self) {
        self.pending.clear();
        for h in &mut self.hist {
            h.reset();
        }
        self.responses = [0; STATUS_SLOTS];
        self.requests = 0;
        self.batches = 0;
        self.rows = 0;
    }
}

fn metrics_of(s: &ModelState) -> ModelPerformanceMetrics {
    let t = &s.total;
    let total = &t.hist[Stage::Total as usize];
    let q = |p: f64| (!total.is_empty()).then(|| total.value_at_quantile(p) as f32 / 1e6);
    let answered = t.total_responses();
    let errors_by_kind = t
        .responses
        .iter()
        .enumerate()
        .skip(1)
        .filter(|(_, &n)| n > 0)
        .map(|(code, &n)| (Status(code as u32).name().unwrap_or("Other").to_string(), n))
        .collect();
    ModelPerformanceMetrics {
        model_key: s.entry.key.clone(),
        accepted_requests: t.requests,
        total_requests: answered,
        successful_requests: t.responses[0],
        failed_requests: t.failures(),
        timeouts: t.responses[Status::TIMEOUT.0 as usize],
        rejections: t.responses[Status::QUEUE_FULL.0 as usize]
            + t.responses[Status::REJECTED.0 as usize],
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
            .map(|st| {
                (
                    st.name().to_string(),
                    StageSummary::of(&t.hist[*st as usize]),
                )
            })
            .collect(),
        alerts: s.alerts.iter().flatten().cloned().collect(),
        last_updated: s.last_updated,
    }
}

/// A Prometheus label value: backslash, quote and newline escaped.
fn label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// `domain:bus:device.function` as numbers, for comparing NVML's and CUDA's spellings.
fn pci_key(id: &str) -> Option<(u32, u32, u32, u32)> {
    let mut parts = id.trim().rsplitn(3, ':');
    let dev_fn = parts.next()?;
    let bus = u32::from_str_radix(parts.next()?, 16).ok()?;
    let domain = u32::from_str_radix(parts.next().unwrap_or("0"), 16).ok()?;
    let (dev, func) = dev_fn.split_once('.')?;
    Some((
        domain,
        bus,
        u32::from_str_radix(dev, 16).ok()?,
        u32::from_str_radix(func, 16).ok()?,
    ))
}

/// Mean NVML utilisation (0..1) of the GPUs with these bus ids; `None` when none is known.
fn gpu_utilization(bus_ids: &[String], gpus: &[crate::gpu::GpuFigures]) -> Option<f32> {
    let values: Vec<f32> = bus_ids
        .iter()
        .filter_map(|id| {
            let key = pci_key(id)?;
            gpus.iter()
                .find(|g| g.pci_bus_id.as_deref().and_then(pci_key) == Some(key))?
                .utilization_pct
                .map(|u| u as f32 / 100.0)
        })
        .collect();
    (!values.is_empty()).then(|| values.iter().sum::<f32>() / values.len() as f32)
}

/// Interval logs: one `.hlog` per model key, one tagged histogram per stage and interval. A
/// model loaded again (after an unload) goes on in the same file.
pub struct HlogFiles {
    dir: PathBuf,
    files: BTreeMap<String, std::io::BufWriter<std::fs::File>>,
    base: SystemTime,
}

impl HlogFiles {
    /// Creates `<dir>/<name>.v<version>.hlog` for each model (keys `name:version`), with the
    /// standard header.
    ///
    /// # Errors
    /// The directory or a file cannot be created.
    pub fn create(dir: &std::path::Path, keys: &[String]) -> std::io::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let mut files = Self {
            dir: dir.into(),
            files: BTreeMap::new(),
            base: SystemTime::now(),
        };
        for key in keys {
            files.open(key)?;
        }
        Ok(files)
    }

    /// The file of `key`, created with its header the first time.
    fn open(&mut self, key: &str) -> std::io::Result<&mut std::io::BufWriter<std::fs::File>> {
        use std::collections::btree_map::Entry;
        use std::io::Write;
        match self.files.entry(key.to_string()) {
            Entry::Occupied(f) => Ok(f.into_mut()),
            Entry::Vacant(slot) => {
                let path = hlog_path(&self.dir, key);
                let mut f = std::io::BufWriter::new(std::fs::File::create(&path)?);
                let secs = self
                    .base
                    .duration_since(SystemTime::UNIX_EPOCH)
                    .unwrap_or_default()
                    .as_secs_f64();
                let comment = format!(
                    "Logged by tie {} for model {key}; values in nanoseconds",
                    env!("CARGO_PKG_VERSION")
                );
                crate::report::write_hlog_header(&mut f, &comment, secs)?;
                f.flush()?;
                Ok(slot.insert(f))
            }
        }
    }

    /// Appends model `key`'s interval that ended now and lasted `length`: one line per stage
    /// that recorded something.
    ///
    /// # Errors
    /// Writing failed.
    pub fn write(&mut self, key: &str, sample: &Sample, length: Duration) -> std::io::Result<()> {
        use std::io::Write;
        let end = SystemTime::now()
            .duration_since(self.base)
            .unwrap_or_default();
        let start = end.saturating_sub(length);
        let f = self.open(key)?;
        for stage in Stage::ALL {
            let h = &sample.hist[stage as usize];
            if h.is_empty() {
                continue;
            }
            crate::report::write_hlog_interval(
                f,
                stage.name(),
                start.as_secs_f64(),
                length.as_secs_f64(),
                h,
            )?;
        }
        f.flush()
    }
}

/// The `.hlog` file of model `key` in `dir`.
pub fn hlog_path(dir: &std::path::Path, key: &str) -> PathBuf {
    dir.join(format!("{}.hlog", key.replace(':', ".v")))
}

/// Runs the monitor's ticks every `monitoring.interval_ms` until `stop`: rates, alerts (logged,
/// and posted to `monitoring.alert_webhook`), interval logs.
pub fn monitor_task(monitor: Arc<Monitor>, stop: Arc<std::sync::atomic::AtomicBool>) {
    let settings = monitor.settings().clone();
    let interval = Duration::from_millis(settings.interval_ms.max(10));
    let keys: Vec<String> = monitor.entries().into_iter().map(|e| e.key).collect();
    let mut hlog = settings.hlog_dir.as_ref().and_then(|dir| {
        HlogFiles::create(dir, &keys)
            .inspect_err(
                |e| tracing::error!(dir = %dir.display(), error = %e, "cannot write interval logs"),
            )
            .ok()
    });
    let webhook = settings.alert_webhook.clone().and_then(webhook_sender);
    let mut last = Instant::now();
    loop {
        let stopping = stop.load(Ordering::Relaxed);
        if !stopping {
            std::thread::sleep(Duration::from_millis(10).min(interval));
            if last.elapsed() < interval {
                continue;
            }
        }
        // A stopping server's last interval (the pollers have stopped) is ticked too.
        let elapsed = last.elapsed();
        last = Instant::now();
        // Models come and go: the entries are read again each interval.
        let entries = monitor.entries();
        let on_gpu = entries.iter().any(|e| !e.pci_bus_ids.is_empty());
        let gpus = if on_gpu {
            crate::gpu::figures().ok()
        } else {
            None
        };
        let events = monitor.tick(elapsed, gpus.as_deref(), &mut |i, sample| {
            if let Some(h) = hlog.as_mut() {
                let Some(entry) = entries.get(i) else {
                    return;
                };
                if let Err(e) = h.write(&entry.key, sample, elapsed) {
                    tracing::error!(error = %e, "interval log write failed");
                }
            }
        });
        for e in events {
            if e.state == "raised" {
                tracing::warn!(
                    model = %e.model_key,
                    alert = e.kind.name(),
                    value = e.value,
                    threshold = e.threshold,
                    "performance alert raised"
                );
            } else {
                tracing::info!(
                    model = %e.model_key,
                    alert = e.kind.name(),
                    value = e.value,
                    threshold = e.threshold,
                    "performance alert cleared"
                );
            }
            if let Some((tx, _)) = &webhook {
                match tx.try_send(e) {
                    Ok(()) => {}
                    Err(std::sync::mpsc::TrySendError::Full(_)) => {
                        tracing::warn!("alert webhook backlog full: an alert event was not posted")
                    }
                    Err(std::sync::mpsc::TrySendError::Disconnected(_)) => {
                        tracing::warn!("alert webhook thread gone: an alert event was not posted")
                    }
                }
            }
        }
        if stopping {
            break;
        }
    }
    // The last events are posted before the server exits (for at most 2 s).
    if let Some((tx, handle)) = webhook {
        drop(tx);
        let until = Instant::now() + Duration::from_secs(2);
        while !handle.is_finished() && Instant::now() < until {
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

/// A thread that POSTs alert transitions as JSON to `url`, in order, so a slow receiver holds
/// up nothing else; failures are logged. `None` (logged) when the thread cannot start.
fn webhook_sender(
    url: String,
) -> Option<(
    std::sync::mpsc::SyncSender<AlertEvent>,
    std::thread::JoinHandle<()>,
)> {
    let (tx, rx) = std::sync::mpsc::sync_channel::<AlertEvent>(256);
    let spawned = std::thread::Builder::new()
        .name("tie-webhook".into())
        .spawn(move || {
            let agent: ureq::Agent = ureq::Agent::config_builder()
                .timeout_global(Some(Duration::from_secs(5)))
                .build()
                .into();
            for event in rx {
                let body = serde_json::to_vec(&event).unwrap_or_default();
                let sent = agent
                    .post(&url)
                    .header("content-type", "application/json")
                    .send(&body[..]);
                if let Err(e) = sent {
                    tracing::warn!(url = %url, error = %e, "alert webhook failed");
                }
            }
        });
    match spawned {
        Ok(handle) => Some((tx, handle)),
        Err(e) => {
            tracing::error!(error = %e, "cannot start the alert webhook thread");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alerts_rise_once_and_clear_past_the_hysteresis() {
        // Upper threshold 10: raised above 10, kept down to 9, cleared below.
        let mut active = false;
        let mut transitions = 0;
        for v in [5.0, 11.0, 10.5, 9.5, 9.1, 12.0, 8.9, 9.5, 10.0] {
            let next = alert_state(active, Some(v), 10.0, true);
            transitions += usize::from(next != active);
            active = next;
        }
        assert_eq!(transitions, 2);
        assert!(!active);
        // Lower threshold 100: raised below, cleared above 110; unmeasured keeps the state.
        assert!(alert_state(false, Some(99.0), 100.0, false));
        assert!(alert_state(true, Some(105.0), 100.0, false));
        assert!(!alert_state(true, Some(111.0), 100.0, false));
        assert!(alert_state(true, None, 100.0, false));
    }

    #[test]
    fn samples_handed_over_are_merged_once_and_reused() {
        let monitor = Monitor::new(
            vec![ModelEntry {
                key: "m:1".into(),
                device_memory_bytes: None,
                pci_bus_ids: Vec::new(),
            }],
            PerformanceThresholdsSection::default(),
            MonitoringSection::default(),
        );
        let mut r = monitor.recorder(0);
        for round in 0..10u64 {
            let s = r.sample();
            s.requests += 2;
            s.respond(Status::OK);
            s.respond(Status::TIMEOUT);
            s.record(Stage::Total, 1_000 * (round + 1));
            r.flush(round * FLUSH_NS, FLUSH_NS);
            monitor.collect();
        }
        r.flush(u64::MAX, 0);
        let m = monitor.metrics(0);
        assert_eq!(m.total_requests, 20);
        assert_eq!(m.successful_requests, 10);
        assert_eq!(m.timeouts, 10);
        assert_eq!(m.errors_by_kind.get("Timeout"), Some(&10));
        assert_eq!(m.stages["total"].count, 10);
        assert!(
            (m.max_latency_ms.unwrap() - 0.010).abs() < 1e-4,
            "{:?}",
            m.max_latency_ms
        );
    }

    #[test]
    fn pci_ids_match_across_spellings() {
        assert_eq!(pci_key("00000000:19:00.0"), pci_key("0000:19:00.0"));
        assert_ne!(pci_key("0000:19:00.0"), pci_key("0000:1a:00.0"));
        assert_eq!(pci_key("19:00.0"), Some((0, 0x19, 0, 0)));
    }
}
