//! [`Monitor`]: every model's totals, the control-plane counters, ticks and alerts.
#![forbid(unsafe_code)]

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use tie_layouts::abi::Status;

use super::*;
use crate::config::{MonitoringSection, PerformanceThresholdsSection};
use crate::sync::{Locked, RwLocked};

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
pub(super) struct ModelState {
    pub(super) entry: ModelEntry,
    /// Per alert kind: monitor intervals in a row without a measurement.
    pub(super) unmeasured: [u32; 5],
    pub(super) total: Sample,
    pub(super) interval: Sample,
    pub(super) ema_ms: Option<f64>,
    pub(super) throughput_rps: f32,
    pub(super) recent_error_rate: Option<f32>,
    pub(super) gpu_utilization: Option<f32>,
    pub(super) alerts: [Option<Alert>; 5],
    pub(super) last_updated: DateTime<Utc>,
    /// Last time a request was accepted (for idle models).
    pub(super) last_request: Option<DateTime<Utc>>,
    /// Unloaded: no longer exposed, ticked or logged.
    pub(super) retired: bool,
}

/// Counts of control-plane errors by kind, each counted once where its response is made.
#[derive(Debug, Default)]
pub struct HttpCounters {
    pub(super) by_kind: Mutex<BTreeMap<&'static str, u64>>,
    pub(super) by_route: Mutex<BTreeMap<(String, u16), u64>>,
}

impl HttpCounters {
    /// Counts one error of `kind`.
    pub fn error(&self, kind: &'static str) {
        *self.by_kind.locked().entry(kind).or_default() += 1;
    }

    /// Counts one HTTP response.
    pub fn response(&self, route: &str, code: u16) {
        *self
            .by_route
            .locked()
            .entry((route.to_string(), code))
            .or_default() += 1;
    }
}

/// The performance monitor of a server.
#[derive(Debug)]
pub struct Monitor {
    /// By slot of the server's model set; append-only (an unloaded model is retired).
    pub(super) models: std::sync::RwLock<Vec<Arc<Mutex<ModelState>>>>,
    pub(super) exchanges: Mutex<Vec<Arc<Exchange>>>,
    pub(super) thresholds: PerformanceThresholdsSection,
    pub(super) settings: MonitoringSection,
    /// Alert transitions so far (raised and cleared).
    pub(super) alert_events: AtomicU64,
    /// The server's journal, for its counters.
    pub journal: std::sync::OnceLock<Arc<crate::journal::Journal>>,
    /// The server's shadow runner, for the rules' figures.
    pub shadows: std::sync::OnceLock<Arc<crate::journal::shadow::Shadows>>,
    /// Where each interval's figures are pushed, when `[clickhouse] url` is set.
    pub clickhouse: std::sync::OnceLock<Arc<super::clickhouse::ClickHouse>>,
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
            alert_events: AtomicU64::new(0),
            journal: std::sync::OnceLock::new(),
            shadows: std::sync::OnceLock::new(),
            clickhouse: std::sync::OnceLock::new(),
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
        let mut models = self.models.write_locked();
        models.push(Arc::new(Mutex::new(state)));
        models.len() - 1
    }

    /// Records `rows` answers of one request served outside the pollers (an ensemble's, by the
    /// control plane): its end-to-end server time, when it succeeded, and its status.
    pub fn record_request(&self, index: usize, total_ns: u64, status: Status, rows: u64) {
        let model = self.model(index);
        let mut state = model.locked();
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
        self.model(index).locked().retired = true;
    }

    pub(super) fn model(&self, index: usize) -> Arc<Mutex<ModelState>> {
        self.models.read_locked()[index].clone()
    }

    pub(super) fn all(&self) -> Vec<Arc<Mutex<ModelState>>> {
        self.models.read_locked().clone()
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
        self.exchanges.locked().push(exchange.clone());
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
        let exchanges = self.exchanges.locked().clone();
        let mut taken = Vec::new();
        for ex in exchanges {
            taken.extend(ex.filled.locked().drain(..));
            if taken.is_empty() {
                continue;
            }
            {
                let model = self.model(ex.model);
                let mut state = model.locked();
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
                ex.spare.locked().push(s);
            }
        }
        // Exchanges of lanes that are gone, once merged (`done` is set after the last push).
        self.exchanges
            .locked()
            .retain(|ex| !ex.done.load(Ordering::Acquire) || !ex.filled.locked().is_empty());
    }

    /// Number of models.
    pub fn len(&self) -> usize {
        self.models.read_locked().len()
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
        let mut metrics = metrics_of(&model.locked());
        metrics.shadow = self
            .shadows
            .get()
            .and_then(|s| s.report(&metrics.model_key));
        metrics
    }

    /// Ends an interval of `elapsed`: updates rates and the EMA, evaluates the thresholds,
    /// and passes each model's interval figures (and its GPUs' utilisation) to `log` before
    /// emptying them. Returns the alert transitions.
    pub fn tick(
        &self,
        elapsed: Duration,
        gpus: Option<&[tie_engine::devices::GpuUtilization]>,
        log: &mut dyn FnMut(usize, &Sample, Option<f32>),
    ) -> Vec<AlertEvent> {
        self.collect();
        let mut events = Vec::new();
        let secs = elapsed.as_secs_f64().max(1e-9);
        for (index, m) in self.all().iter().enumerate() {
            let mut state = m.locked();
            let s = &mut *state;
            if s.retired {
                continue;
            }
            s.update_rates(secs, gpus);
            s.update_alerts(&self.thresholds, &mut events);
            log(index, &s.interval, s.gpu_utilization);
            s.interval.reset_in_place();
        }
        self.alert_events
            .fetch_add(events.len() as u64, Ordering::Relaxed);
        events
    }

    /// The monitor's settings.
    pub fn settings(&self) -> &MonitoringSection {
        &self.settings
    }

    /// The model entries, indexed like the server's models.
    pub fn entries(&self) -> Vec<ModelEntry> {
        self.all()
            .iter()
            .map(|m| m.locked().entry.clone())
            .collect()
    }

    /// NVML utilisation (0..1) of model `index`'s GPUs at the last tick.
    pub fn gpu_utilization(&self, index: usize) -> Option<f32> {
        self.model(index).locked().gpu_utilization
    }

    /// When model `index` last accepted a request.
    pub fn last_request(&self, index: usize) -> Option<DateTime<Utc>> {
        self.collect();
        self.model(index).locked().last_request
    }
}

impl ModelState {
    /// Throughput, error rate, the EMA of latency and GPU utilisation from the interval's
    /// figures (`secs` long).
    pub(super) fn update_rates(
        &mut self,
        secs: f64,
        gpus: Option<&[tie_engine::devices::GpuUtilization]>,
    ) {
        let answered = self.interval.total_responses();
        let ok = self.interval.responses[0];
        self.throughput_rps = (ok as f64 / secs) as f32;
        if answered > 0 {
            self.recent_error_rate = Some(self.interval.failures() as f32 / answered as f32);
        }
        let total = &self.interval.hist[Stage::Total as usize];
        if !total.is_empty() {
            // The spec's EMA (weight 0.1 per request), as if each request of the interval
            // had the interval's mean.
            let keep = 0.9f64.powf(total.len() as f64);
            let mean_ms = total.mean() / 1e6;
            self.ema_ms = Some(match self.ema_ms {
                Some(ema) => ema * keep + mean_ms * (1.0 - keep),
                None => mean_ms,
            });
        }
        self.gpu_utilization = gpus.and_then(|g| gpu_utilization(&self.entry.pci_bus_ids, g));
    }

    /// Per alert kind (in [`ALERT_KINDS`] order): the value measured this interval (`None`:
    /// nothing to measure), its threshold, and whether the threshold is an upper bound.
    pub(super) fn measured(
        &self,
        t: &PerformanceThresholdsSection,
    ) -> [(Option<f32>, f32, bool); 5] {
        let busy = self.interval.requests > 0;
        let completed = !self.interval.hist[Stage::Total as usize].is_empty();
        let answered = self.interval.total_responses() > 0;
        // A value is measured only in an interval that had what it is about; the EMA is a
        // latency only while requests complete.
        [
            (
                self.ema_ms.map(|v| v as f32).filter(|_| completed),
                t.max_latency_ms,
                true,
            ),
            (
                self.recent_error_rate.filter(|_| answered),
                t.max_error_rate,
                true,
            ),
            (
                busy.then_some(self.throughput_rps),
                t.min_throughput_rps,
                false,
            ),
            (
                self.entry
                    .device_memory_bytes
                    .map(|b| (b as f64 / 1048576.0) as f32),
                t.max_memory_usage_mb,
                true,
            ),
            (
                self.gpu_utilization.filter(|_| busy),
                t.min_gpu_utilization,
                false,
            ),
        ]
    }

    /// Raises and clears alerts from this interval's values; each transition is pushed on
    /// `events`.
    pub(super) fn update_alerts(
        &mut self,
        t: &PerformanceThresholdsSection,
        events: &mut Vec<AlertEvent>,
    ) {
        let now = Utc::now();
        for (i, (value, threshold, upper)) in self.measured(t).into_iter().enumerate() {
            let active = self.alerts[i].is_some();
            self.unmeasured[i] = if value.is_some() {
                0
            } else {
                self.unmeasured[i].saturating_add(1)
            };
            // An alert whose value goes unmeasured (no traffic) for a while is over: a quiet
            // model is not a slow one.
            let stale = active && self.unmeasured[i] >= STALE_INTERVALS;
            let next = !stale && alert_state(active, value, threshold, upper);
            let kind = ALERT_KINDS[i];
            if next != active {
                events.push(AlertEvent {
                    model_key: self.entry.key.clone(),
                    state: if next { "raised" } else { "cleared" },
                    kind,
                    value: value.unwrap_or_default(),
                    threshold,
                    timestamp: now,
                    note: stale.then_some("no measurement for a while"),
                });
            }
            if stale && kind == AlertKind::Latency {
                // The EMA of a burst long past says nothing of the next request.
                self.ema_ms = None;
            }
            self.alerts[i] = next.then(|| Alert {
                kind,
                value: value.unwrap_or_else(|| self.alerts[i].as_ref().map_or(0.0, |a| a.value)),
                threshold,
                since: self.alerts[i].as_ref().map_or(now, |a| a.since),
            });
        }
    }
}

/// `domain:bus:device.function` as numbers, for comparing NVML's and CUDA's spellings.
pub(super) fn pci_key(id: &str) -> Option<(u32, u32, u32, u32)> {
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
pub(super) fn gpu_utilization(
    bus_ids: &[String],
    gpus: &[tie_engine::devices::GpuUtilization],
) -> Option<f32> {
    let values: Vec<f32> = bus_ids
        .iter()
        .filter_map(|id| {
            let key = pci_key(id)?;
            let gpu = gpus.iter().find(|g| pci_key(&g.pci_bus_id) == Some(key))?;
            Some(gpu.utilization_pct as f32 / 100.0)
        })
        .collect();
    (!values.is_empty()).then(|| values.iter().sum::<f32>() / values.len() as f32)
}
