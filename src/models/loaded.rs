//! [`LoadedModel`]: one model version built, warmed and ready to join the model set.
#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::sync::Arc;

use tie_engine::profile::ModelProfile;
use tie_engine::Backend;
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
