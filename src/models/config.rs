//! [`ModelConfig`]: a model's `<repo>/<name>/config.toml`, where it runs
//! ([`BackendChoice`]) and which of its versions are loaded ([`VersionPolicy`]).
#![forbid(unsafe_code)]

use serde::Deserialize;
use tie_engine::{CpuEngine, Precision};

/// Where a model runs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendChoice {
    /// A GPU when one is usable and the graph is supported there, else the CPU.
    #[default]
    Auto,
    /// The CPU.
    Cpu,
    /// A GPU (refused by builds without GPU support).
    Cuda,
}

/// `<repo>/<name>/config.toml`; every key optional.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ModelConfig {
    /// Layout file (without `.toml`) in the server's layouts directory; unset: features named
    /// `f0..fN` from the model's input width.
    pub layout: Option<String>,
    /// Where the model runs.
    pub backend: BackendChoice,
    /// Which CPU engine runs it.
    pub cpu_engine: CpuEngine,
    /// Arithmetic on the GPU (`fp32`, `tf32`, `fp16`, `bf16`); the CPU computes in f32.
    pub precision: Precision,
    /// Most requests in one batch (default: `[batch_processing].max_batch_size`).
    pub max_batch_size: Option<u32>,
    /// Batch timeout in microseconds (default: `[batch_processing]`'s).
    pub batch_timeout_us: Option<u64>,
    /// Batch sizes the backend runs (default: `[batch_processing]`'s).
    pub allowed_batch_sizes: Option<Vec<u32>>,
    /// Most requests queued per priority (default: `[batch_processing]`'s).
    pub max_queue_size: Option<u32>,
    /// Version served to clients that name none (default: the highest loaded).
    pub default_version: Option<u32>,
    /// Which versions of the repository are loaded (default: all).
    pub versions: VersionPolicy,
    /// Names for versions (`stable = 3`, `canary = 4`), accepted wherever a version is.
    pub labels: std::collections::BTreeMap<String, u32>,
    /// Never unloaded for being unused (`auto_unload_unused_hours`).
    pub keep_loaded: bool,
    /// The output column holding the model's uncertainty of its prediction: confidence is
    /// then `1 - min(|uncertainty|, 1)` (and HTTP predictions leave the column out). Unset:
    /// every value's confidence is `1 / (1 + e^-|value|)`.
    pub uncertainty_output: Option<usize>,
    /// The largest tensor the graph may make, in MiB (constants folded at load and
    /// intermediate results; the batch dimension counted as one row). A model over it is
    /// refused at load. Default: 1024.
    pub max_tensor_mb: Option<u32>,
    /// Batches each poller keeps in flight for this model without waiting for them (at most
    /// [`MAX_PIPELINE_DEPTH`]): on the GPU, in CUDA streams of its own; on the CPU, computed
    /// on a thread of its own. 0 (the default): the poller runs each batch and waits for it.
    pub pipeline_depth: usize,
    /// Pollers the model's sessions are spread over, each forming batches of its own sessions
    /// (with `pipeline_depth` ≥ 1, each with its own pipeline: on the GPU its own stream on
    /// the model's instance with the fewest; at 0 the pollers take turns on the instance, one
    /// batch at a time): for a model whose load one poller cannot read, batch and answer
    /// alone. Default 1 (one poller batches all of the model's sessions: the fullest batches).
    /// At most the server's poller count (`[server] poller_cores`); more is used as that many,
    /// logged. Each poller queues up to `max_queue_size` of the model's requests.
    pub pollers: Option<usize>,
    /// Every row's answer bitwise the same whatever batch it is in and whatever its place
    /// there, on the engine the model loaded on (and on any of its GPUs, which run the same
    /// kernels): on the GPU only the fused kernels (one fixed summation order per row) are
    /// used; at load, rows alone are checked against the same rows in batches of sizes 1 to 20,
    /// each padded size and the largest less one, and a model that differs is refused.
    pub deterministic: bool,
    /// Every answered request (or a sampled share) recorded in the server's journal
    /// (`[journal] dir`): ids, process, times, status, outputs and (with `journal_features`)
    /// features.
    pub journal: bool,
    /// The share of answered requests journaled, in (0, 1]; 1: every one.
    pub journal_sample_rate: SampleRate,
    /// Features journaled with each row (they are most of a row's size); default: true.
    pub journal_features: Option<bool>,
}

/// A share in (0, 1] (`journal_sample_rate`).
#[derive(Clone, Copy, Debug, PartialEq, Deserialize)]
#[serde(try_from = "f64")]
pub struct SampleRate(pub f64);

// Never NaN (refused when read), so equality is an equivalence.
impl Eq for SampleRate {}

impl Default for SampleRate {
    fn default() -> Self {
        Self(1.0)
    }
}

impl TryFrom<f64> for SampleRate {
    type Error = String;
    fn try_from(v: f64) -> Result<Self, String> {
        if v > 0.0 && v <= 1.0 {
            Ok(Self(v))
        } else {
            Err(format!("journal_sample_rate = {v}: must be in (0, 1]"))
        }
    }
}

/// The deepest `pipeline_depth`.
pub const MAX_PIPELINE_DEPTH: usize = 8;

impl ModelConfig {
    /// `pollers`, or its default (1).
    pub fn pollers(&self) -> usize {
        self.pollers.unwrap_or(1)
    }

    /// `journal_features`, or its default.
    pub fn journal_features(&self) -> bool {
        self.journal_features.unwrap_or(true)
    }

    /// `max_tensor_mb` in bytes, or the default.
    pub fn max_tensor_bytes(&self) -> u64 {
        self.max_tensor_mb
            .map_or(tie_engine::bounds::DEFAULT_MAX_TENSOR_BYTES, |mb| {
                u64::from(mb) << 20
            })
    }

    /// Whether a version built with `self` is built the same with `other`: the keys that shape
    /// the instance (layout, backend, engine, precision, batching) are equal; which versions
    /// are loaded, the default and labels do not matter.
    pub fn builds_like(&self, other: &Self) -> bool {
        let shape = |c: &Self| Self {
            default_version: None,
            versions: VersionPolicy::All,
            labels: Default::default(),
            keep_loaded: false,
            ..c.clone()
        };
        shape(self) == shape(other)
    }
}

/// Which versions of a model the server loads.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum VersionPolicy {
    /// Every version in the repository (`versions = "all"`).
    #[default]
    All,
    /// The N highest (`versions = { latest = 2 }`).
    Latest(u32),
    /// These (`versions = { specific = [3, 5] }`); each must be in the repository.
    Specific(Vec<u32>),
}

/// Why a [`VersionPolicy`] picks nothing from a model's versions.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum VersionPickError {
    /// `latest = 0`.
    #[error("versions = {{ latest = 0 }} loads nothing")]
    LatestZero,
    /// `specific = []`.
    #[error("versions = {{ specific = [] }} loads nothing")]
    SpecificEmpty,
    /// `specific` names a version the repository lacks.
    #[error("versions = {{ specific = {wanted:?} }} names version {missing}, which is not in the repository")]
    SpecificMissing {
        /// The versions named.
        wanted: Vec<u32>,
        /// The first one absent.
        missing: u32,
    },
}

impl VersionPolicy {
    /// The versions of `present` (ascending) this policy picks.
    pub(crate) fn pick(&self, present: &[u32]) -> Result<Vec<u32>, VersionPickError> {
        match self {
            Self::All => Ok(present.to_vec()),
            Self::Latest(0) => Err(VersionPickError::LatestZero),
            Self::Latest(n) => Ok(present[present.len().saturating_sub(*n as usize)..].to_vec()),
            Self::Specific(wanted) => {
                let mut picked = Vec::new();
                for v in wanted {
                    if !present.contains(v) {
                        return Err(VersionPickError::SpecificMissing {
                            wanted: wanted.clone(),
                            missing: *v,
                        });
                    }
                    if !picked.contains(v) {
                        picked.push(*v);
                    }
                }
                picked.sort_unstable();
                if picked.is_empty() {
                    return Err(VersionPickError::SpecificEmpty);
                }
                Ok(picked)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn version_policies_pick_what_they_say() {
        let present = [1, 2, 5, 7];
        assert_eq!(VersionPolicy::All.pick(&present).unwrap(), present);
        assert_eq!(VersionPolicy::Latest(2).pick(&present).unwrap(), [5, 7]);
        assert_eq!(VersionPolicy::Latest(9).pick(&present).unwrap(), present);
        assert_eq!(
            VersionPolicy::Specific(vec![7, 1, 7])
                .pick(&present)
                .unwrap(),
            [1, 7]
        );
        assert!(VersionPolicy::Specific(vec![3])
            .pick(&present)
            .unwrap_err()
            .to_string()
            .contains("version 3"));
        assert!(VersionPolicy::Latest(0).pick(&present).is_err());
        let config: ModelConfig =
            toml::from_str("versions = { latest = 2 }\nlabels = { stable = 5 }").unwrap();
        assert_eq!(config.versions, VersionPolicy::Latest(2));
        let config: ModelConfig = toml::from_str("versions = { specific = [1, 5] }").unwrap();
        assert_eq!(config.versions, VersionPolicy::Specific(vec![1, 5]));
        let config: ModelConfig = toml::from_str("versions = \"all\"").unwrap();
        assert!(config.builds_like(&ModelConfig {
            keep_loaded: true,
            default_version: Some(3),
            ..ModelConfig::default()
        }));
        assert!(!config.builds_like(&ModelConfig {
            layout: Some("other".into()),
            ..ModelConfig::default()
        }));
    }
}
