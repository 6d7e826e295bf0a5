//! The model repository: `<repo>/<name>/<version>/model.onnx`, an optional
//! `<repo>/<name>/config.toml`, and loading of what it holds.
#![forbid(unsafe_code)]

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use serde::Deserialize;
use tie_layouts::abi::{MAX_FEATURES, MAX_OUTPUTS};
use tie_layouts::FeatureLayout;

use crate::backend::{self, Backend, BackendLoadError, CpuEngine, Precision};
use crate::batch::BatchConfig;
use crate::config::BatchProcessingSection;
use crate::gpu::Gpus;
use crate::profile::ModelProfile;

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
}

impl ModelConfig {
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

impl VersionPolicy {
    /// The versions of `present` (ascending) this policy picks.
    fn pick(&self, present: &[u32]) -> Result<Vec<u32>, String> {
        match self {
            Self::All => Ok(present.to_vec()),
            Self::Latest(0) => Err("versions = { latest = 0 } loads nothing".into()),
            Self::Latest(n) => Ok(present[present.len().saturating_sub(*n as usize)..].to_vec()),
            Self::Specific(wanted) => {
                let mut picked = Vec::new();
                for v in wanted {
                    if !present.contains(v) {
                        return Err(format!(
                            "versions = {{ specific = {wanted:?} }} names version {v}, which is not in the repository"
                        ));
                    }
                    if !picked.contains(v) {
                        picked.push(*v);
                    }
                }
                picked.sort_unstable();
                if picked.is_empty() {
                    return Err("versions = { specific = [] } loads nothing".into());
                }
                Ok(picked)
            }
        }
    }
}

/// Why the repository or a model could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum RepositoryLoadError {
    /// A directory or file could not be read.
    #[error("cannot read {}: {source}", path.display())]
    Io {
        /// The path.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// A model's config is invalid.
    #[error("invalid model config {}: {source}", path.display())]
    Config {
        /// The file.
        path: PathBuf,
        /// The error, naming an unknown key.
        source: Box<toml::de::Error>,
    },
    /// A model's layout could not be read.
    #[error("model {model}: layout {layout:?}: {source}")]
    Layout {
        /// The model.
        model: String,
        /// The layout named.
        layout: String,
        /// The error.
        source: tie_layouts::LayoutError,
    },
    /// The layout's feature count differs from the model's input width.
    #[error("model {model}: layout {layout:?} has {layout_features} features, the model reads {input_width}")]
    LayoutWidth {
        /// The model.
        model: String,
        /// The layout.
        layout: String,
        /// Its count.
        layout_features: usize,
        /// The model's width.
        input_width: usize,
    },
    /// The backend could not load the model.
    #[error("model {model} version {version}: {source}")]
    Backend {
        /// The model.
        model: String,
        /// Its version.
        version: u32,
        /// The error.
        source: BackendLoadError,
    },
    /// The model produces more values per row than a response frame carries.
    #[error("model {model} version {version} outputs {outputs} values per row; a response carries 1 to {MAX_OUTPUTS}")]
    TooManyOutputs {
        /// The model.
        model: String,
        /// Its version.
        version: u32,
        /// Its width.
        outputs: usize,
    },
    /// The config asks for something this build cannot do.
    #[error("model {model}: {why}")]
    Unsupported {
        /// The model.
        model: String,
        /// What and why.
        why: String,
    },
    /// No GPU has room for the model (the spec's `OutOfMemory`); the server serves the others.
    #[error(
        "model {model} version {version}: GPU out of memory: requested {requested_mb}MB ({why})"
    )]
    OutOfMemory {
        /// The model.
        model: String,
        /// Its version.
        version: u32,
        /// Device memory one instance needs.
        requested_mb: usize,
        /// The limit it hit.
        why: String,
    },
    /// The repository holds no model.
    #[error("no model in repository {}", path.display())]
    Empty {
        /// The repository.
        path: PathBuf,
    },
    /// The repository has no model of that name (or none with a `<version>/model.onnx`).
    #[error("no model {model} in repository {}", path.display())]
    UnknownModel {
        /// The model.
        model: String,
        /// The repository.
        path: PathBuf,
    },
    /// The model file is not the one its checksum file names, or changed while loading.
    #[error("model {model} version {version}: {}: {why}", path.display())]
    Integrity {
        /// The model.
        model: String,
        /// Its version.
        version: u32,
        /// The file.
        path: PathBuf,
        /// What differs.
        why: String,
    },
}

/// A model version loaded and warmed up.
pub struct LoadedModel {
    /// Model name.
    pub name: String,
    /// Version.
    pub version: u32,
    /// Whether its config made it the model's default when it was loaded (the default in
    /// effect is the server's model set's: see [`crate::manager::ModelSet::is_default`]).
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
    /// Its readiness and canary (see [`crate::health`]).
    pub health: Arc<crate::health::ModelHealth>,
    /// The switch of its injected fault, when `server.fault_injection` is on.
    pub fault: Option<Arc<crate::health::FaultSwitch>>,
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

/// What loading needs besides the repository path.
#[derive(Clone, Debug)]
pub struct LoadOptions {
    /// Directory of layout files.
    pub layouts_dir: PathBuf,
    /// Batching defaults.
    pub batching: BatchProcessingSection,
    /// Warmup inferences per model.
    pub warmup_requests: u32,
    /// Timed runs per batch size when profiling; 0 skips profiling.
    pub profile_iterations: u32,
    /// The GPUs models may run on.
    pub gpus: Gpus,
    /// Put a [`crate::health::FaultSwitch`] in front of every backend.
    pub fault_injection: bool,
}

impl LoadOptions {
    /// The options a service config asks for, with its GPUs opened (see [`Gpus::probe`]).
    pub fn from_config(config: &crate::config::ServiceConfig) -> Self {
        Self::from_config_with(config, Gpus::probe(config))
    }

    /// The options a service config asks for, with `gpus`.
    pub fn from_config_with(config: &crate::config::ServiceConfig, gpus: Gpus) -> Self {
        Self {
            gpus,
            layouts_dir: config.server.layouts_dir.clone(),
            batching: config.batch_processing.clone(),
            warmup_requests: config.model_deployment.warmup_requests,
            profile_iterations: config.model_deployment.profile_iterations,
            fault_injection: config.server.fault_injection,
        }
    }
}

fn read_dir(path: &Path) -> Result<Vec<PathBuf>, RepositoryLoadError> {
    let io = |source| RepositoryLoadError::Io {
        path: path.into(),
        source,
    };
    let mut entries: Vec<PathBuf> = std::fs::read_dir(path)
        .map_err(io)?
        .map(|e| e.map(|e| e.path()))
        .collect::<Result<_, _>>()
        .map_err(io)?;
    entries.sort();
    Ok(entries)
}

/// What the repository holds of one model and which of its versions its config asks for.
#[derive(Clone, Debug)]
pub struct ModelPlan {
    /// The model's name (its directory).
    pub name: String,
    /// Its config (`config.toml`, or the defaults).
    pub config: ModelConfig,
    /// The versions to load, ascending, with their files.
    pub versions: Vec<(u32, PathBuf)>,
    /// The version served to clients that name none.
    pub default_version: u32,
}

impl ModelPlan {
    /// The file of `version`, when the plan loads it.
    pub fn file(&self, version: u32) -> Option<&Path> {
        self.versions
            .iter()
            .find(|(v, _)| *v == version)
            .map(|(_, f)| f.as_path())
    }
}

/// Reads model `name` of `repo`: its versions, its config, which versions it loads.
///
/// # Errors
/// [`RepositoryLoadError::UnknownModel`] when the repository has no version of it; an invalid
/// config or version policy.
pub fn plan_model(repo: &Path, name: &str) -> Result<ModelPlan, RepositoryLoadError> {
    let unknown = || RepositoryLoadError::UnknownModel {
        model: name.into(),
        path: repo.into(),
    };
    // A name is one directory of the repository, never a path.
    if name.is_empty() || name.starts_with('.') || name.contains(['/', '\\', '\0']) {
        return Err(unknown());
    }
    let dir = repo.join(name);
    if !dir.is_dir() {
        return Err(unknown());
    }
    let mut present: Vec<(u32, PathBuf)> = read_dir(&dir)?
        .into_iter()
        .filter_map(|p| {
            let v = p.file_name()?.to_str()?.parse::<u32>().ok()?;
            let file = p.join("model.onnx");
            (v > 0 && file.is_file()).then_some((v, file))
        })
        .collect();
    if present.is_empty() {
        return Err(unknown());
    }
    present.sort();
    let config = read_model_config(&dir)?;
    let unsupported = |why: String| RepositoryLoadError::Unsupported {
        model: name.into(),
        why,
    };
    let numbers: Vec<u32> = present.iter().map(|(v, _)| *v).collect();
    let picked = config.versions.pick(&numbers).map_err(unsupported)?;
    let versions: Vec<(u32, PathBuf)> = present
        .into_iter()
        .filter(|(v, _)| picked.contains(v))
        .collect();
    let default_version = config
        .default_version
        .unwrap_or_else(|| versions.last().expect("a policy picks one at least").0);
    if !versions.iter().any(|(v, _)| *v == default_version) {
        return Err(unsupported(format!(
            "default_version {default_version} is not among the versions loaded ({picked:?})"
        )));
    }
    for (label, v) in &config.labels {
        if !versions.iter().any(|(loaded, _)| loaded == v) {
            return Err(unsupported(format!(
                "label {label:?} names version {v}, which is not among the versions loaded ({picked:?})"
            )));
        }
    }
    Ok(ModelPlan {
        name: name.into(),
        config,
        versions,
        default_version,
    })
}

/// The plans of every model of `repo` (directories with at least one `<version>/model.onnx`).
///
/// # Errors
/// The repository cannot be read, or a model's config is invalid.
pub fn plan_repository(repo: &Path) -> Result<Vec<ModelPlan>, RepositoryLoadError> {
    let mut plans = Vec::new();
    for dir in read_dir(repo)? {
        if !dir.is_dir() {
            continue;
        }
        let Some(name) = dir.file_name().and_then(|n| n.to_str()) else {
            continue;
        };
        match plan_model(repo, name) {
            Ok(plan) => plans.push(plan),
            Err(RepositoryLoadError::UnknownModel { .. }) => {
                tracing::debug!(dir = %dir.display(), "no <version>/model.onnx, skipped");
            }
            Err(e) => return Err(e),
        }
    }
    Ok(plans)
}

/// Loads every version of every model in `repo` that its version policy picks.
///
/// # Errors
/// [`RepositoryLoadError`] for the first model that cannot be loaded, or an empty repository.
pub fn load_repository(
    repo: &Path,
    options: &LoadOptions,
) -> Result<Vec<LoadedModel>, RepositoryLoadError> {
    let mut models = Vec::new();
    let mut refused = None;
    for plan in plan_repository(repo)? {
        for (version, _) in &plan.versions {
            match load_version(&plan, *version, options) {
                Ok(m) => models.push(m),
                // A model that does not fit is refused; the others are served.
                Err(e @ RepositoryLoadError::OutOfMemory { .. }) => {
                    tracing::error!(error = %e, "model refused");
                    refused = Some(e);
                }
                Err(e) => return Err(e),
            }
        }
    }
    if models.is_empty() {
        // Every model refused: say why rather than "empty".
        return Err(refused.unwrap_or_else(|| RepositoryLoadError::Empty { path: repo.into() }));
    }
    Ok(models)
}

/// Loads version `version` of `plan`: checked against its checksum file when it has one,
/// built, warmed up, its canary recorded and, when configured, profiled. Nothing is shared
/// with a version already serving, so a failure leaves that one as it was.
///
/// # Errors
/// [`RepositoryLoadError`]: a version the plan does not load, a corrupt or changed file, a
/// backend or warmup failure.
pub fn load_version(
    plan: &ModelPlan,
    version: u32,
    options: &LoadOptions,
) -> Result<LoadedModel, RepositoryLoadError> {
    let Some(file) = plan.file(version) else {
        return Err(RepositoryLoadError::Unsupported {
            model: plan.name.clone(),
            why: format!(
                "version {version} is not one the model's version policy loads ({:?})",
                plan.versions.iter().map(|(v, _)| *v).collect::<Vec<_>>()
            ),
        });
    };
    let integrity = |why: String| RepositoryLoadError::Integrity {
        model: plan.name.clone(),
        version,
        path: file.into(),
        why,
    };
    let checksum = sha256_file(file)?;
    let sum_file = file.with_extension("onnx.sha256");
    if sum_file.exists() {
        let text =
            std::fs::read_to_string(&sum_file).map_err(|source| RepositoryLoadError::Io {
                path: sum_file.clone(),
                source,
            })?;
        // `sha256sum`'s format: the hex digest, then optionally the file name.
        let expected = text
            .split_whitespace()
            .next()
            .unwrap_or_default()
            .to_ascii_lowercase();
        if expected != checksum {
            return Err(integrity(format!(
                "SHA-256 {checksum} differs from {expected} in {} (a truncated or corrupt file)",
                sum_file.display()
            )));
        }
    }
    let mut model = load_model(
        &plan.name,
        version,
        file,
        &plan.config,
        version == plan.default_version,
        options,
    )?;
    // The file read at the start is the one that was built.
    let after = sha256_file(file)?;
    if after != checksum {
        return Err(integrity(
            "the file changed while it was loading; load it again once it is written".into(),
        ));
    }
    model.checksum = checksum;
    Ok(model)
}

/// SHA-256 of a file, hex.
pub(crate) fn sha256_file(path: &Path) -> Result<String, RepositoryLoadError> {
    use sha2::Digest;
    let bytes = std::fs::read(path).map_err(|source| RepositoryLoadError::Io {
        path: path.into(),
        source,
    })?;
    let digest = sha2::Sha256::digest(&bytes);
    Ok(digest.iter().map(|b| format!("{b:02x}")).collect())
}

fn read_model_config(dir: &Path) -> Result<ModelConfig, RepositoryLoadError> {
    let path = dir.join("config.toml");
    if !path.exists() {
        return Ok(ModelConfig::default());
    }
    let text = std::fs::read_to_string(&path).map_err(|source| RepositoryLoadError::Io {
        path: path.clone(),
        source,
    })?;
    toml::from_str(&text).map_err(|source| RepositoryLoadError::Config {
        path,
        source: Box::new(source),
    })
}

fn load_model(
    name: &str,
    version: u32,
    file: &Path,
    config: &ModelConfig,
    is_default: bool,
    options: &LoadOptions,
) -> Result<LoadedModel, RepositoryLoadError> {
    let started = Instant::now();
    let progress = Progress::new(name, version);
    progress.show("loading", None);
    let batch = BatchConfig::resolve(&options.batching, config).map_err(|why| {
        RepositoryLoadError::Unsupported {
            model: name.into(),
            why,
        }
    })?;
    let cpu = || {
        backend::load_cpu(file, config.cpu_engine).map_err(|source| RepositoryLoadError::Backend {
            model: name.into(),
            version,
            source,
        })
    };
    let backend = match (config.backend, options.gpus.unavailable()) {
        (BackendChoice::Cpu, _) => cpu()?,
        (BackendChoice::Cuda, Some(why)) => {
            return Err(RepositoryLoadError::Unsupported {
                model: name.into(),
                why: format!("backend = \"cuda\" but no GPU is usable: {why}"),
            })
        }
        (BackendChoice::Auto, Some(_)) => cpu()?,
        (choice, None) => match load_gpu(name, version, file, config, &batch, options) {
            Ok(b) => b,
            Err(e) if choice == BackendChoice::Auto => {
                tracing::info!(model = name, version, reason = %e, "served on the CPU");
                cpu()?
            }
            Err(e) => return Err(e),
        },
    };
    let io = backend.info().io.clone();
    if io.input_width > MAX_FEATURES as usize {
        return Err(RepositoryLoadError::Unsupported {
            model: name.into(),
            why: format!(
                "the model reads {} features; a request frame carries at most {MAX_FEATURES}",
                io.input_width
            ),
        });
    }
    if let Some(k) = config.uncertainty_output {
        if k >= io.output_width || io.output_width < 2 {
            return Err(RepositoryLoadError::Unsupported {
                model: name.into(),
                why: format!(
                    "uncertainty_output = {k}, but the model has {} outputs (columns 0..{}; one besides the uncertainty)",
                    io.output_width, io.output_width
                ),
            });
        }
    }
    if io.output_width == 0 || io.output_width > MAX_OUTPUTS {
        return Err(RepositoryLoadError::TooManyOutputs {
            model: name.into(),
            version,
            outputs: io.output_width,
        });
    }
    let layout = match &config.layout {
        Some(layout) => {
            let path = options.layouts_dir.join(format!("{layout}.toml"));
            let l =
                FeatureLayout::from_file(&path).map_err(|source| RepositoryLoadError::Layout {
                    model: name.into(),
                    layout: layout.clone(),
                    source,
                })?;
            if l.features.len() != io.input_width {
                return Err(RepositoryLoadError::LayoutWidth {
                    model: name.into(),
                    layout: layout.clone(),
                    layout_features: l.features.len(),
                    input_width: io.input_width,
                });
            }
            l
        }
        None => FeatureLayout::positional(name, io.input_width as u32),
    };
    progress.show("warming up", None);
    warmup(backend.as_ref(), options.warmup_requests).map_err(|e| {
        RepositoryLoadError::Backend {
            model: name.into(),
            version,
            source: BackendLoadError::Tract(format!("warmup failed: {e}")),
        }
    })?;
    let canary = crate::health::Canary::record(backend.as_ref()).map_err(|e| {
        RepositoryLoadError::Backend {
            model: name.into(),
            version,
            source: BackendLoadError::Tract(format!("canary inference failed: {e}")),
        }
    })?;
    let profile = match options.profile_iterations {
        0 => None,
        n => Some(
            ModelProfile::measure_with_progress(backend.as_ref(), &batch, n, &mut |done, of| {
                progress.show("profiling batch sizes", Some((done, of)))
            })
            .map_err(|e| RepositoryLoadError::Backend {
                model: name.into(),
                version,
                source: BackendLoadError::Tract(format!("profiling failed: {e}")),
            })?,
        ),
    };
    progress.finish();
    tracing::info!(
        model = name,
        version,
        engine = backend.info().engine,
        inputs = io.input_width,
        outputs = io.output_width,
        layout = %layout.name,
        default = is_default,
        optimal_batch_size = profile.as_ref().map(|p| p.optimal_batch_size),
        load_ms = started.elapsed().as_secs_f64() * 1e3,
        "model loaded"
    );
    let (backend, fault) = if options.fault_injection {
        let (b, switch) = crate::health::Faulty::wrap(backend);
        (b, Some(switch))
    } else {
        (backend, None)
    };
    Ok(LoadedModel {
        name: name.into(),
        version,
        is_default,
        layout_hash: layout.hash(),
        layout,
        batch,
        profile,
        backend,
        path: file.into(),
        health: Arc::new(crate::health::ModelHealth::new(canary)),
        fault,
        loaded_at: chrono::Utc::now(),
        load_time: started.elapsed(),
        checksum: String::new(),
        config: config.clone(),
        monitor_index: usize::MAX,
        sessions: Default::default(),
        unloading: Default::default(),
    })
}

/// The model on the GPUs of `options`; errors say why it cannot run there.
#[cfg(feature = "cuda")]
fn load_gpu(
    name: &str,
    version: u32,
    file: &Path,
    config: &ModelConfig,
    batch: &BatchConfig,
    options: &LoadOptions,
) -> Result<Arc<dyn Backend>, RepositoryLoadError> {
    use backend::cuda::{CudaBackend, CudaLoadError};
    let Gpus::Available(runtime) = &options.gpus else {
        unreachable!("called only with GPUs");
    };
    let backend_err = |source| RepositoryLoadError::Backend {
        model: name.into(),
        version,
        source,
    };
    let (io, plan) = backend::read_mlp(file).map_err(backend_err)?;
    let plan = plan.map_err(|e| RepositoryLoadError::Unsupported {
        model: name.into(),
        why: format!("the GPU backend runs MLP-shaped graphs only: {e}"),
    })?;
    if plan.layers.is_empty() {
        return Err(RepositoryLoadError::Unsupported {
            model: name.into(),
            why: "the graph has no layer: nothing for a GPU to compute".into(),
        });
    }
    match CudaBackend::load(runtime, io, &plan, config.precision, &batch.run_sizes()) {
        Ok(b) => {
            tracing::info!(
                model = name,
                version,
                devices = %b.info().device,
                precision = b.precision().name(),
                engines = ?b
                    .engines()
                    .iter()
                    .map(|(s, e, ns)| format!("{s}:{e}@{:.1}us", *ns as f64 / 1e3))
                    .collect::<Vec<_>>(),
                "model built on the GPU"
            );
            Ok(Arc::new(b))
        }
        Err(CudaLoadError::OutOfMemory(e)) => Err(RepositoryLoadError::OutOfMemory {
            model: name.into(),
            version,
            requested_mb: e.requested_mb,
            why: e.why,
        }),
        Err(CudaLoadError::Cuda(message)) => Err(RepositoryLoadError::Unsupported {
            model: name.into(),
            why: format!("GPU: {message}"),
        }),
    }
}

#[cfg(not(feature = "cuda"))]
fn load_gpu(
    _: &str,
    _: u32,
    _: &Path,
    _: &ModelConfig,
    _: &BatchConfig,
    _: &LoadOptions,
) -> Result<Arc<dyn Backend>, RepositoryLoadError> {
    unreachable!("without the `cuda` feature no GPU is ever available")
}

/// Load progress of one model: a bar redrawn in place on a terminal, log lines otherwise (one
/// per stage, none per step).
struct Progress {
    label: String,
    terminal: bool,
}

impl Progress {
    fn new(name: &str, version: u32) -> Self {
        use std::io::IsTerminal;
        Self {
            label: format!("{name}:{version}"),
            terminal: std::io::stderr().is_terminal(),
        }
    }

    fn show(&self, stage: &str, step: Option<(usize, usize)>) {
        if self.terminal {
            use std::io::Write;
            let (done, of) = step.unwrap_or((0, 1));
            let filled = 20 * done / of.max(1);
            let bar: String = (0..20)
                .map(|i| if i < filled { '#' } else { '.' })
                .collect();
            let mut err = std::io::stderr().lock();
            let _ = write!(err, "\r\x1b[2K{} [{bar}] {stage} {done}/{of}", self.label);
            let _ = err.flush();
        } else if step.is_none_or(|(done, _)| done == 0) {
            tracing::info!(model = %self.label, "{stage}");
        }
    }

    fn finish(&self) {
        if self.terminal {
            use std::io::Write;
            let _ = write!(std::io::stderr().lock(), "\r\x1b[2K");
        }
    }
}

fn warmup(backend: &dyn Backend, requests: u32) -> Result<(), backend::BackendError> {
    let io = &backend.info().io;
    let input = vec![0.0f32; io.input_width];
    let mut output = vec![0.0f32; io.output_width];
    for _ in 0..requests {
        backend.run_batch(&input, 1, &mut output)?;
    }
    Ok(())
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
