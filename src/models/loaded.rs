//! [`LoadedModel`]: one model version built, warmed and ready to join the model set.
#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::sync::Arc;

use tie_engine::profile::ModelProfile;
use tie_engine::{Backend, Crossover};
use tie_layouts::FeatureLayout;

use super::config::ModelConfig;
use super::BatchConfig;

/// A model version loaded and warmed up.
pub struct LoadedModel {
    /// Model name.
    pub name: String,
    /// Version.
    pub version: u32,
    /// Whether its config made it the model's default when it was loaded (the default in
    /// effect is the server's model set's: see [`crate::models::ModelSet::is_default`]).
    pub is_default: bool,
    /// The layout clients write.
    pub layout: FeatureLayout,
    /// Its hash.
    pub layout_hash: u64,
    /// How its requests are batched.
    pub batch: BatchConfig,
    /// Its measured batch timings, when profiled at load.
    pub profile: Option<ModelProfile>,
    /// Where `backend = "auto"` put its batches, when both the CPU and a GPU could run it.
    pub placement: Option<Placement>,
    /// What runs it.
    pub backend: Arc<dyn Backend>,
    /// The file it came from.
    pub path: PathBuf,
    /// Its readiness and canary (see [`crate::models::health`]).
    pub health: Arc<crate::models::health::ModelHealth>,
    /// The switch of its injected fault, when `server.fault_injection` is on.
    pub fault: Option<Arc<crate::models::fault::FaultSwitch>>,
    /// When it finished loading.
    pub loaded_at: chrono::DateTime<chrono::Utc>,
    /// How long loading took (build, warmup, canary, profile).
    pub load_time: std::time::Duration,
    /// SHA-256 of the file, as loaded (hex).
    pub checksum: String,
    /// The model config it was built with.
    pub config: ModelConfig,
    /// Its index in the performance monitor (set when it joins the server's model set).
    pub monitor_index: usize,
    /// Sessions bound to it now (counted by the listener from the hello reply, then by the
    /// pollers): a version with a session is in use.
    pub sessions: std::sync::atomic::AtomicUsize,
    /// Set while it is being unloaded for going unused: no session is set up on it then.
    pub unloading: std::sync::atomic::AtomicBool,
}

impl std::fmt::Debug for LoadedModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoadedModel")
            .field("name", &self.name)
            .field("version", &self.version)
            .field("engine", &self.backend.info().engine)
            .finish_non_exhaustive()
    }
}

impl LoadedModel {
    /// `name:version`, the key of the model in logs and metrics.
    pub fn key(&self) -> String {
        format!("{}:{}", self.name, self.version)
    }

    /// Features per row.
    pub fn input_width(&self) -> usize {
        self.backend.info().io.input_width
    }

    /// Values per row.
    pub fn output_width(&self) -> usize {
        self.backend.info().io.output_width
    }
}

/// Where `backend = "auto"` put a model that both the CPU and a GPU can run, from both
/// engines' median latency at each batch size the batcher runs, measured at load.
#[derive(Clone, Debug)]
pub struct Placement {
    /// The split.
    pub crossover: Crossover,
    /// The CPU engine (`cpu-mlp`).
    pub cpu_engine: &'static str,
    /// The GPU engine (`cuda`).
    pub gpu_engine: &'static str,
    /// Its devices (`cuda:0`).
    pub gpu_device: String,
    /// `(batch size, CPU median, GPU median)`, nanoseconds, ascending sizes, up to the first
    /// the CPU does not win (the larger ones are not timed).
    pub measured: Vec<(usize, u64, u64)>,
}

impl Placement {
    /// The rule in words, for the load log and `models/loaded`.
    pub fn rule(&self) -> String {
        let us = |ns: u64| ns as f64 / 1e3;
        let at = |size: usize| self.measured.iter().find(|m| m.0 == size).copied();
        let largest = self.measured.last().map_or(0, |m| m.0);
        match self.crossover {
            Crossover::UpTo(n) => {
                let next = self.measured.iter().find(|m| m.0 > n);
                format!(
                    "batches of up to {n} rows on the CPU ({}), larger ones on the GPU ({}, {}){}",
                    self.cpu_engine,
                    self.gpu_engine,
                    self.gpu_device,
                    next.map_or(String::new(), |&(size, cpu, gpu)| format!(
                        ": at {size} rows the GPU took {:.1} us, the CPU {:.1} us",
                        us(gpu),
                        us(cpu)
                    ))
                )
            }
            Crossover::LargeOnly => format!(
                "every batch on the GPU ({}, {}){}",
                self.gpu_engine,
                self.gpu_device,
                at(self.measured.first().map_or(1, |m| m.0)).map_or(
                    String::new(),
                    |(size, cpu, gpu)| format!(
                        ": at {size} rows it took {:.1} us, the CPU ({}) {:.1} us",
                        us(gpu),
                        self.cpu_engine,
                        us(cpu)
                    )
                )
            ),
            Crossover::SmallOnly => format!(
                "every batch on the CPU ({}): faster than the GPU ({}) at every batch size up to {largest}",
                self.cpu_engine, self.gpu_engine
            ),
        }
    }

    /// The largest batch run on the CPU (0: none).
    pub fn cpu_up_to(&self) -> usize {
        match self.crossover {
            Crossover::UpTo(n) => n,
            Crossover::LargeOnly => 0,
            Crossover::SmallOnly => self.measured.last().map_or(0, |m| m.0),
        }
    }
}
