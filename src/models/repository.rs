//! The model repository: `<repo>/<name>/<version>/model.onnx` (or LightGBM's `model.txt`,
//! XGBoost's `model.json`), an optional
//! `<repo>/<name>/config.toml`, and loading of what it holds.
#![forbid(unsafe_code)]

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use tie_layouts::abi::{MAX_FEATURES, MAX_OUTPUTS};
use tie_layouts::FeatureLayout;

use tie_engine::devices::Gpus;
use tie_engine::profile::{self, ModelProfile};
use tie_engine::{time_in_rounds, Backend, BackendLoadError, Crossover, SplitBackend};

use super::config::{BackendChoice, ModelConfig};
use super::fault::FaultSwitch;
use super::health::Canary;
use super::loaded::{LoadedModel, Placement};
use super::BatchConfig;
use crate::config::BatchProcessingSection;

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
    /// A batching setting is out of range.
    #[error("model {model}: {error}")]
    Batching {
        /// The model.
        model: String,
        /// The setting.
        error: super::BatchConfigError,
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
    /// The repository has no model of that name (or none with a `<version>/` model file).
    #[error("no model {model} in repository {}", path.display())]
    UnknownModel {
        /// The model.
        model: String,
        /// The repository.
        path: PathBuf,
    },
    /// A model directory of the repository with no version directory holding a model file.
    #[error("model {model}: no version directory of {} holds a model file (<version>/model.onnx, model.txt or model.json){found}", dir.display())]
    NoVersion {
        /// The model.
        model: String,
        /// Its directory.
        dir: PathBuf,
        /// What the directory holds instead (`; it holds: 1/model.onx, v2/`), or nothing.
        found: String,
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
    /// Put a [`crate::models::fault::FaultSwitch`] in front of every backend.
    pub fault_injection: bool,
    /// The server keeps a journal (`[journal] dir` is set): models may ask for `journal`.
    pub journal: bool,
}

impl LoadOptions {
    /// The options a service config asks for, with its GPUs opened (see [`Gpus::probe`]).
    pub fn from_config(config: &crate::config::ServiceConfig) -> Self {
        Self::from_config_with(config, Gpus::probe(&config.gpu_options()))
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
            journal: config.journal.dir.is_some(),
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

/// Whether [`plan_model`] and [`plan_repository`] warn about the entries they skip.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Skipped {
    /// Each entry skipped gets a WARN naming it and why (loading and reloading).
    Warn,
    /// Nothing is logged (readiness checks, which read the repository often).
    Quiet,
}

/// The version number a version directory's name stands for: canonical decimal from 1
/// (`1`, `12`; not `01`, `+1`, `0` or past `u32`), else why not.
pub(crate) fn version_number(name: &str) -> Result<u32, &'static str> {
    let canonical = name.bytes().all(|b| b.is_ascii_digit()) && !name.starts_with('0');
    match name.parse::<u32>() {
        Ok(v) if canonical && v > 0 => Ok(v),
        _ if name.bytes().all(|b| b.is_ascii_digit()) && !name.is_empty() && name.trim_start_matches('0').is_empty() => {
            Err("version 0 does not exist: versions count from 1")
        }
        _ if canonical && !name.is_empty() => Err("a version number past 4294967295"),
        _ => Err("not a version number (a version directory is named 1, 2, …, with no sign or leading zero)"),
    }
}

/// The files a version directory may hold its model in: ONNX, LightGBM's text model,
/// XGBoost's JSON model.
pub const MODEL_FILES: [&str; 3] = ["model.onnx", "model.txt", "model.json"];

/// The versions of model directory `dir` with one model file ([`MODEL_FILES`]); every other
/// entry is skipped (with a WARN naming it and why, unless `skipped` is quiet).
pub(crate) fn present_versions(
    dir: &Path,
    skipped: Skipped,
) -> Result<Vec<(u32, PathBuf)>, RepositoryLoadError> {
    let skip = |entry: &Path, why: &str| {
        if skipped == Skipped::Warn {
            tracing::warn!(entry = %entry.display(), "skipped: {why}");
        }
    };
    let mut present = Vec::new();
    for p in read_dir(dir)? {
        let Some(name) = p.file_name().and_then(|n| n.to_str()) else {
            skip(&p, "the name is not UTF-8");
            continue;
        };
        if name == "config.toml" || name.ends_with(".sha256") || name.starts_with('.') {
            continue;
        }
        let version = match version_number(name) {
            Ok(v) => v,
            Err(why) => {
                skip(&p, why);
                continue;
            }
        };
        let files: Vec<PathBuf> = MODEL_FILES
            .iter()
            .map(|f| p.join(f))
            .filter(|f| f.exists())
            .collect();
        match files.as_slice() {
            [file] if file.is_file() => present.push((version, file.clone())),
            _ if !p.is_dir() => skip(&p, "not a directory"),
            [file] => skip(file, "the model file is not a file"),
            [] => skip(
                &p,
                "no model file in it (model.onnx, or LightGBM's model.txt, or XGBoost's model.json)",
            ),
            _ => skip(
                &p,
                "more than one model file in it (one of model.onnx, model.txt, model.json)",
            ),
        }
    }
    present.sort();
    Ok(present)
}

/// Whether `name` can be a model's name: one directory of the repository, never a path.
pub(crate) fn is_model_name(name: &str) -> bool {
    !(name.is_empty() || name.starts_with('.') || name.contains(['/', '\\', '\0']))
}

/// Reads model `name` of `repo`: its versions, its config, which versions it loads.
///
/// # Errors
/// [`RepositoryLoadError::UnknownModel`] when the repository has no version of it; an invalid
/// config or version policy.
pub fn plan_model(repo: &Path, name: &str) -> Result<ModelPlan, RepositoryLoadError> {
    plan_model_with(repo, name, Skipped::Warn)
}

fn plan_model_with(
    repo: &Path,
    name: &str,
    skipped: Skipped,
) -> Result<ModelPlan, RepositoryLoadError> {
    let unknown = || RepositoryLoadError::UnknownModel {
        model: name.into(),
        path: repo.into(),
    };
    if !is_model_name(name) {
        return Err(unknown());
    }
    let dir = repo.join(name);
    if !dir.is_dir() {
        return Err(unknown());
    }
    let present = present_versions(&dir, skipped)?;
    if present.is_empty() {
        return Err(unknown());
    }
    if name.len() >= tie_layouts::hello::MODEL_NAME_LEN {
        return Err(RepositoryLoadError::Unsupported {
            model: name.into(),
            why: format!(
                "the name is {} bytes; clients can name at most {} (rename its directory)",
                name.len(),
                tie_layouts::hello::MODEL_NAME_LEN - 1
            ),
        });
    }
    let config = read_model_config(&dir)?;
    let unsupported = |why: String| RepositoryLoadError::Unsupported {
        model: name.into(),
        why,
    };
    let numbers: Vec<u32> = present.iter().map(|(v, _)| *v).collect();
    let picked = config
        .versions
        .pick(&numbers)
        .map_err(|e| unsupported(e.to_string()))?;
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

/// The plans of every model of `repo` (directories with at least one `<version>/` model file).
///
/// # Errors
/// The repository cannot be read, or a model's config is invalid.
pub fn plan_repository(
    repo: &Path,
    skipped: Skipped,
) -> Result<Vec<ModelPlan>, RepositoryLoadError> {
    plan_each(repo, skipped)?
        .into_iter()
        // A directory with nothing to load was said (and is listed unavailable at start).
        .filter(|(_, planned)| !matches!(planned, Err(RepositoryLoadError::NoVersion { .. })))
        .map(|(_, planned)| planned)
        .collect()
}

/// What model directory `dir` holds, two levels down (`; it holds: 1/model.onx, v2/`), for
/// saying why none of it loads; nothing for an empty directory.
fn holds(dir: &Path) -> String {
    const MOST: usize = 6;
    let mut found = Vec::new();
    for entry in read_dir(dir).unwrap_or_default() {
        let Some(name) = entry.file_name().map(|n| n.to_string_lossy().into_owned()) else {
            continue;
        };
        if name == "config.toml" || name.starts_with('.') {
            continue;
        }
        match read_dir(&entry) {
            Ok(inner) if inner.is_empty() => found.push(format!("{name}/")),
            Ok(inner) => found.extend(inner.iter().map(|f| {
                let leaf = f
                    .file_name()
                    .map_or_else(String::new, |n| n.to_string_lossy().into_owned());
                let dangling = f.symlink_metadata().is_ok() && !f.exists();
                format!(
                    "{name}/{leaf}{}",
                    if dangling {
                        " (a symlink to nothing)"
                    } else {
                        ""
                    }
                )
            })),
            Err(_) => found.push(name),
        }
    }
    if found.is_empty() {
        return String::new();
    }
    let more = found.len().saturating_sub(MOST);
    found.truncate(MOST);
    format!(
        "; it holds: {}{}",
        found.join(", "),
        if more > 0 {
            format!(" and {more} more")
        } else {
            String::new()
        }
    )
}

/// The layout file a model's config names (`layout`), read from `layouts_dir`.
///
/// # Errors
/// [`RepositoryLoadError::Layout`]: it cannot be read or is not a valid layout.
pub fn read_layout(
    layouts_dir: &Path,
    model: &str,
    layout: &str,
) -> Result<FeatureLayout, RepositoryLoadError> {
    FeatureLayout::from_file(&layouts_dir.join(format!("{layout}.toml"))).map_err(|source| {
        RepositoryLoadError::Layout {
            model: model.into(),
            layout: layout.into(),
            source,
        }
    })
}

/// A model's name and its plan, or why it has none.
pub type Planned = (String, Result<ModelPlan, RepositoryLoadError>);

/// The plan of every model of `repo` by name, or why that model has none (an invalid config
/// or version policy), in the repository's order.
///
/// # Errors
/// The repository cannot be read.
pub fn plan_each(repo: &Path, skipped: Skipped) -> Result<Vec<Planned>, RepositoryLoadError> {
    let mut plans = Vec::new();
    for dir in read_dir(repo)? {
        let Some(name) = dir.file_name().and_then(|n| n.to_str()) else {
            if skipped == Skipped::Warn {
                tracing::warn!(entry = %dir.display(), "skipped: the name is not UTF-8");
            }
            continue;
        };
        if name.starts_with('.') || !dir.is_dir() {
            // Other files (routing.toml, scripts, notes) are the repository's own; a model file
            // out of place is said.
            let lower = name.to_ascii_lowercase();
            if skipped == Skipped::Warn && (lower.ends_with(".onnx") || lower.ends_with(".onx")) {
                tracing::warn!(entry = %dir.display(), "skipped: a model file belongs at <name>/<version>/model.onnx");
            }
            continue;
        }
        if name.len() >= tie_layouts::hello::MODEL_NAME_LEN {
            // One such directory must not stop the others from loading.
            if skipped == Skipped::Warn {
                tracing::warn!(
                    dir = %dir.display(),
                    "skipped: the name is {} bytes; clients can name at most {} (rename the directory)",
                    name.len(),
                    tie_layouts::hello::MODEL_NAME_LEN - 1
                );
            }
            continue;
        }
        match plan_model_with(repo, name, skipped) {
            Err(RepositoryLoadError::UnknownModel { .. }) => {
                // Listed as unavailable, with what the directory holds, by the caller.
                let e = RepositoryLoadError::NoVersion {
                    model: name.to_string(),
                    dir: dir.clone(),
                    found: holds(&dir),
                };
                if skipped == Skipped::Warn {
                    tracing::warn!(dir = %dir.display(), "skipped: {e}");
                }
                plans.push((name.to_string(), Err(e)));
            }
            planned => plans.push((name.to_string(), planned)),
        }
    }
    Ok(plans)
}

/// A model, or one version of it, that failed to load while the server went on
/// (`model_deployment.exit_on_error = false`).
#[derive(Clone, Debug)]
pub struct FailedVersion {
    /// The model.
    pub name: String,
    /// The version (`None`: the model's config or version policy failed, no version loaded).
    pub version: Option<u32>,
    /// Why.
    pub reason: String,
    /// When.
    pub at: chrono::DateTime<chrono::Utc>,
}

impl FailedVersion {
    /// `name:version`, or `name`.
    pub fn key(&self) -> String {
        match self.version {
            Some(v) => format!("{}:{v}", self.name),
            None => self.name.clone(),
        }
    }
}

/// Loads every version of every model in `repo` that its version policy picks.
///
/// # Errors
/// [`RepositoryLoadError`] for the first model that cannot be loaded, or an empty repository.
pub fn load_repository(
    repo: &Path,
    options: &LoadOptions,
) -> Result<Vec<LoadedModel>, RepositoryLoadError> {
    load_repository_with(repo, options, true).map(|(models, _)| models)
}

/// [`load_repository`]; with `exit_on_error` false, a model or version that fails to load is
/// logged and returned among the failures while the others load (a model that does not fit
/// the GPU is refused that way in either case).
///
/// # Errors
/// The repository cannot be read; with `exit_on_error`, the first model that cannot be
/// loaded; nothing loaded at all (naming why, when something failed).
pub fn load_repository_with(
    repo: &Path,
    options: &LoadOptions,
    exit_on_error: bool,
) -> Result<(Vec<LoadedModel>, Vec<FailedVersion>), RepositoryLoadError> {
    let mut models = Vec::new();
    let mut failures = Vec::new();
    let mut first_error = None;
    let mut fail = |name: String, version, e: RepositoryLoadError| {
        tracing::error!(model = %name, version, error = %e, "model not served");
        failures.push(FailedVersion {
            name,
            version,
            reason: e.to_string(),
            at: chrono::Utc::now(),
        });
        first_error.get_or_insert(e);
    };
    for (name, planned) in plan_each(repo, Skipped::Warn)? {
        let plan = match planned {
            Ok(plan) => plan,
            // Nothing of it could load: listed unavailable, whatever `exit_on_error` says.
            Err(e @ RepositoryLoadError::NoVersion { .. }) => {
                fail(name, None, e);
                continue;
            }
            Err(e) if !exit_on_error => {
                fail(name, None, e);
                continue;
            }
            Err(e) => return Err(e),
        };
        for (version, _) in &plan.versions {
            match load_version(&plan, *version, options) {
                Ok(m) => models.push(m),
                // A model that does not fit is refused; the others are served.
                Err(e @ RepositoryLoadError::OutOfMemory { .. }) => {
                    fail(plan.name.clone(), Some(*version), e)
                }
                Err(e) if !exit_on_error => fail(plan.name.clone(), Some(*version), e),
                Err(e) => return Err(e),
            }
        }
    }
    if models.is_empty() {
        // Everything failed: say why rather than "empty".
        return Err(first_error.unwrap_or_else(|| RepositoryLoadError::Empty { path: repo.into() }));
    }
    Ok((models, failures))
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
    let mut sum_name = file.file_name().unwrap_or_default().to_os_string();
    sum_name.push(".sha256");
    let sum_file = file.with_file_name(sum_name);
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
    let mut model = catch_load_panic(&plan.name, version, file, || {
        load_model(
            &plan.name,
            version,
            file,
            &plan.config,
            version == plan.default_version,
            options,
        )
    })?;
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

pub(crate) fn read_model_config(dir: &Path) -> Result<ModelConfig, RepositoryLoadError> {
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

/// One version being loaded: what [`load_model`]'s steps share.
struct Loading<'a> {
    name: &'a str,
    version: u32,
    file: &'a Path,
    config: &'a ModelConfig,
    options: &'a LoadOptions,
}

impl Loading<'_> {
    fn unsupported(&self, why: String) -> RepositoryLoadError {
        RepositoryLoadError::Unsupported {
            model: self.name.into(),
            why,
        }
    }

    fn backend_error(&self, source: BackendLoadError) -> RepositoryLoadError {
        RepositoryLoadError::Backend {
            model: self.name.into(),
            version: self.version,
            source,
        }
    }

    /// The backend the config asks for: the CPU, a GPU, or (`auto`) a GPU when one is usable
    /// and the graph runs there, else the CPU.
    fn backend(&self, batch: &BatchConfig) -> Result<Arc<dyn Backend>, RepositoryLoadError> {
        let (name, version, file, config, options) = (
            self.name,
            self.version,
            self.file,
            self.config,
            self.options,
        );
        let cpu = || {
            tie_engine::load_cpu_with(file, config.cpu_engine, config.max_tensor_bytes())
                .map_err(|e| self.backend_error(e))
        };
        match (config.backend, options.gpus.unavailable()) {
            (BackendChoice::Cpu, _) => cpu(),
            (BackendChoice::Cuda, Some(why)) => {
                Err(self.unsupported(format!("backend = \"cuda\" but no GPU is usable: {why}")))
            }
            (BackendChoice::Auto, Some(_)) => cpu(),
            (choice, None) => match load_gpu(name, version, file, config, batch, options) {
                Ok(b) => Ok(b),
                Err(e) if choice == BackendChoice::Auto => {
                    tracing::info!(model = name, version, reason = %e, "served on the CPU");
                    cpu()
                }
                Err(e) => Err(e),
            },
        }
    }

    /// `auto` with a model on the GPU: also builds it on the CPU, times both engines at each
    /// batch size the batcher runs (up to the first the CPU does not win), and keeps the
    /// faster one per size (a [`SplitBackend`] where each wins some sizes). Not with `deterministic = true` (the two
    /// engines' bits differ), nor for a model the CPU cannot build.
    fn place(
        &self,
        gpu: Arc<dyn Backend>,
        batch: &BatchConfig,
        progress: &Progress,
        fault: Option<&Arc<FaultSwitch>>,
    ) -> Result<(Arc<dyn Backend>, Option<Placement>), RepositoryLoadError> {
        let (name, version) = (self.name, self.version);
        if self.config.backend != BackendChoice::Auto || gpu.info().device == "cpu" {
            return Ok((gpu, None));
        }
        if self.config.deterministic {
            tracing::info!(
                model = name,
                version,
                "every batch on the GPU: deterministic = true keeps a model on one engine"
            );
            return Ok((gpu, None));
        }
        let gpu_only = |why: String| {
            tracing::info!(model = name, version, reason = %why, "every batch on the GPU");
            Ok((gpu.clone(), None))
        };
        let cpu = match tie_engine::load_cpu_with(
            self.file,
            self.config.cpu_engine,
            self.config.max_tensor_bytes(),
        ) {
            Ok(cpu) => cpu,
            Err(e) => return gpu_only(format!("the CPU engine could not build the model: {e}")),
        };
        if cpu.info().io != gpu.info().io {
            return gpu_only(format!(
                "the CPU engine reads the model's I/O otherwise ({:?} against {:?})",
                cpu.info().io,
                gpu.info().io
            ));
        }
        progress.show("timing the CPU and the GPU per batch size", None);
        let warm = self.options.warmup_requests.max(PLACEMENT_WARMUP);
        if let Err(e) = warmup(cpu.as_ref(), warm) {
            return gpu_only(format!("the CPU engine failed its warm-up: {e}"));
        }
        let gpu_failed = |e: tie_engine::BackendError| {
            self.backend_error(BackendLoadError::Tract(format!(
                "timing the GPU per batch size failed: {e}"
            )))
        };
        warmup(gpu.as_ref(), warm).map_err(gpu_failed)?;
        let p50 = |b: &dyn Backend, size: usize| {
            ModelProfile::measure(b, &[size], PLACEMENT_ITERATIONS).map(|p| p.timings[0].p50_ns)
        };
        enum Failed {
            Cpu(tie_engine::BackendError),
            Gpu(tie_engine::BackendError),
        }
        // Sizes in ascending order, up to the first the CPU does not win: the larger ones go
        // to the GPU whatever their times (a large model is timed on the CPU at batch 1 only).
        // Each size in rounds, each engine keeping its best (see `time_in_rounds`).
        let sizes = batch.run_sizes();
        let mut measured = Vec::new();
        for &size in &sizes {
            let timed = time_in_rounds(
                PLACEMENT_ROUNDS,
                PLACEMENT_ROUND_GAP,
                profile::SIZE_BUDGET,
                || p50(cpu.as_ref(), size).map_err(Failed::Cpu),
                || p50(gpu.as_ref(), size).map_err(Failed::Gpu),
            );
            let (on_cpu, on_gpu) = match timed {
                Ok(both) => both,
                Err(Failed::Cpu(e)) => {
                    return gpu_only(format!("the CPU engine failed a timed batch: {e}"))
                }
                Err(Failed::Gpu(e)) => return Err(gpu_failed(e)),
            };
            measured.push((size, on_cpu, on_gpu));
            if Crossover::decided(&measured) {
                break;
            }
        }
        let crossover =
            Crossover::from_timings(&measured, sizes.last().copied().unwrap_or_default());
        let placement = Placement {
            crossover,
            cpu_engine: cpu.info().engine,
            gpu_engine: gpu.info().engine,
            gpu_device: gpu.info().device.clone(),
            measured,
        };
        tracing::info!(
            model = name,
            version,
            rule = %placement.rule(),
            cpu_up_to = placement.cpu_up_to(),
            measured_us = ?placement
                .measured
                .iter()
                .map(|(size, c, g)| format!("{size}:cpu {:.1}/gpu {:.1}", *c as f64 / 1e3, *g as f64 / 1e3))
                .collect::<Vec<_>>(),
            "batches placed by size"
        );
        let backend: Arc<dyn Backend> = match crossover {
            Crossover::LargeOnly => gpu,
            Crossover::SmallOnly => cpu,
            Crossover::UpTo(n) => {
                // With fault injection each engine is wrapped, behind one switch: a wrapper
                // around the split would not see the batches the poller runs on the CPU.
                let wrap = |b: Arc<dyn Backend>| match fault {
                    Some(switch) => super::fault::Faulty::with_switch(b, switch.clone()),
                    None => b,
                };
                Arc::new(SplitBackend::new(wrap(cpu), wrap(gpu), n))
            }
        };
        Ok((backend, Some(placement)))
    }

    /// The model's I/O against what a frame carries and the uncertainty column.
    fn check_io(&self, io: &tie_engine::ModelIo) -> Result<(), RepositoryLoadError> {
        if io.input_width > MAX_FEATURES as usize {
            return Err(self.unsupported(format!(
                "the model reads {} features; a request frame carries at most {MAX_FEATURES}",
                io.input_width
            )));
        }
        if let Some(k) = self.config.uncertainty_output {
            if k >= io.output_width || io.output_width < 2 {
                return Err(self.unsupported(format!(
                    "uncertainty_output = {k}, but the model has {} outputs (columns 0..{}; one besides the uncertainty)",
                    io.output_width, io.output_width
                )));
            }
        }
        if self.config.pipeline_depth > super::config::MAX_PIPELINE_DEPTH {
            return Err(self.unsupported(format!(
                "pipeline_depth = {}: at most {} batches can be kept in flight",
                self.config.pipeline_depth,
                super::config::MAX_PIPELINE_DEPTH
            )));
        }
        if self.config.pollers == Some(0) {
            return Err(
                self.unsupported("pollers = 0: a model's sessions need at least one poller".into())
            );
        }
        if io.output_width == 0 || io.output_width > MAX_OUTPUTS {
            return Err(RepositoryLoadError::TooManyOutputs {
                model: self.name.into(),
                version: self.version,
                outputs: io.output_width,
            });
        }
        Ok(())
    }

    /// The layout the config names (its width checked), or positional names.
    fn layout(&self, input_width: usize) -> Result<FeatureLayout, RepositoryLoadError> {
        let Some(layout) = &self.config.layout else {
            return Ok(FeatureLayout::positional(self.name, input_width as u32));
        };
        let l = read_layout(&self.options.layouts_dir, self.name, layout)?;
        if l.features.len() != input_width {
            return Err(RepositoryLoadError::LayoutWidth {
                model: self.name.into(),
                layout: layout.clone(),
                layout_features: l.features.len(),
                input_width,
            });
        }
        Ok(l)
    }

    /// Warms the backend up, records its canary and, when asked, profiles its batch sizes.
    fn prepare(
        &self,
        backend: &dyn Backend,
        batch: &BatchConfig,
        progress: &Progress,
    ) -> Result<(Canary, Option<ModelProfile>), RepositoryLoadError> {
        let failed = |what: &str, e: tie_engine::BackendError| {
            self.backend_error(BackendLoadError::Tract(format!("{what} failed: {e}")))
        };
        progress.show("warming up", None);
        warmup(backend, self.options.warmup_requests).map_err(|e| failed("warmup", e))?;
        if self.config.deterministic {
            progress.show("checking that answers do not depend on the batch", None);
            check_deterministic(backend, &determinism_sizes(&batch.run_sizes()))
                .map_err(|e| failed("the determinism check", e))?
                .map_or(Ok(()), |why| Err(self.unsupported(why)))?;
        }
        let canary = Canary::record(backend).map_err(|e| failed("canary inference", e))?;
        let profile = match self.options.profile_iterations {
            0 => None,
            n => Some(
                ModelProfile::measure_with_progress(
                    backend,
                    &batch.run_sizes(),
                    n,
                    &mut |done, of| progress.show("profiling batch sizes", Some((done, of))),
                )
                .map_err(|e| failed("profiling", e))?,
            ),
        };
        Ok((canary, profile))
    }
}

/// Runs `load`, with a panic anywhere in it (tract's, a driver's) caught and reported as the
/// load error of version `version` of `name`, naming its file: it never takes the server down.
fn catch_load_panic<T>(
    name: &str,
    version: u32,
    file: &Path,
    load: impl FnOnce() -> Result<T, RepositoryLoadError>,
) -> Result<T, RepositoryLoadError> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(load)).unwrap_or_else(|payload| {
        let message = payload
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| payload.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "a panic without a message".into());
        tracing::error!(model = name, version, file = %file.display(), panic = %message, "loading the model panicked; the panic was caught");
        Err(RepositoryLoadError::Backend {
            model: name.into(),
            version,
            source: BackendLoadError::Tract(format!(
                "loading {} panicked: {message}",
                file.display()
            )),
        })
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
    let loading = Loading {
        name,
        version,
        file,
        config,
        options,
    };
    if config.journal && !options.journal {
        return Err(loading.unsupported(
            "journal = true, but the server keeps no journal: set [journal] dir in its config"
                .into(),
        ));
    }
    let progress = Progress::new(name, version);
    progress.show("loading", None);
    let batch = BatchConfig::resolve(&options.batching, config).map_err(|error| {
        RepositoryLoadError::Batching {
            model: name.into(),
            error,
        }
    })?;
    let backend = loading.backend(&batch)?;
    let io = backend.info().io.clone();
    loading.check_io(&io)?;
    let layout = loading.layout(io.input_width)?;
    let fault = options
        .fault_injection
        .then(|| Arc::new(super::fault::FaultSwitch::default()));
    let (backend, placement) = loading.place(backend, &batch, &progress, fault.as_ref())?;
    let (canary, profile) = loading.prepare(backend.as_ref(), &batch, &progress)?;
    if let Some(i) = canary.expected.iter().position(|v| !v.is_finite()) {
        if !layout.allow_non_finite {
            return Err(loading.unsupported(format!(
                "its answer to the canary input is not finite (output {i} is {}): a model whose outputs are NaN or infinite is refused (allow_non_finite = true in its layout serves them)",
                canary.expected[i]
            )));
        }
    }
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
        deterministic = config.deterministic,
        load_ms = log_ms(started.elapsed().as_secs_f64() * 1e3),
        "model loaded"
    );
    let split = placement
        .as_ref()
        .is_some_and(|p| matches!(p.crossover, Crossover::UpTo(_)));
    let backend = match &fault {
        // A split model's engines are each behind the switch already.
        Some(switch) if !split => super::fault::Faulty::with_switch(backend, switch.clone()),
        _ => backend,
    };
    Ok(LoadedModel {
        name: name.into(),
        version,
        is_default,
        layout_hash: layout.hash(),
        layout,
        batch,
        profile,
        placement,
        backend,
        path: file.into(),
        health: Arc::new(super::health::ModelHealth::new(canary)),
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
    use tie_engine::cuda::{CudaBackend, CudaLoadError};
    let Gpus::Available(runtime) = &options.gpus else {
        unreachable!("called only with GPUs");
    };
    let backend_err = |source| RepositoryLoadError::Backend {
        model: name.into(),
        version,
        source,
    };
    let (io, plan) = tie_engine::read_mlp(file).map_err(backend_err)?;
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
    // Deterministic: the fused kernels only (each row summed in one fixed order, whatever the
    // batch); cuBLASLt picks algorithms per batch size.
    let allow = |e: tie_engine::cuda::Engine| {
        !config.deterministic || !matches!(e, tie_engine::cuda::Engine::Blaslt)
    };
    let loaded = CudaBackend::load_with_engines(
        runtime,
        io,
        &plan,
        config.precision,
        &batch.run_sizes(),
        &allow,
    );
    match loaded {
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
        Err(CudaLoadError::Cuda(message)) if config.deterministic => {
            Err(RepositoryLoadError::Unsupported {
                model: name.into(),
                why: format!("GPU: {message}; deterministic = true runs only the fused kernel on the GPU, which needs every layer to fit its shared memory (or serve it on the CPU: backend = \"cpu\")"),
            })
        }
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

fn warmup(backend: &dyn Backend, requests: u32) -> Result<(), tie_engine::BackendError> {
    let io = &backend.info().io;
    let input = vec![0.0f32; io.input_width];
    let mut output = vec![0.0f32; io.output_width];
    for _ in 0..requests {
        backend.run_batch(&input, 1, &mut output)?;
    }
    Ok(())
}

/// The batch sizes the determinism check runs: every size from 1 to 20, each size the batcher
/// pads batches to (`run_sizes`), and the largest less one (on the CPU a batch runs unpadded,
/// at any size).
fn determinism_sizes(run_sizes: &[usize]) -> Vec<usize> {
    let largest = run_sizes.iter().copied().max().unwrap_or(1);
    let mut sizes: Vec<usize> = (1..=largest.min(20))
        .chain(run_sizes.iter().copied())
        .chain([largest - 1])
        .filter(|&n| n > 0)
        .collect();
    sizes.sort_unstable();
    sizes.dedup();
    sizes
}

/// Rows the determinism check runs alone and inside batches.
const DETERMINISM_ROWS: usize = 8;

/// Timed runs per batch size and engine when `auto` places a model's batches.
const PLACEMENT_ITERATIONS: u32 = 30;
/// Runs of one row on each engine before they are timed.
const PLACEMENT_WARMUP: u32 = 20;
/// Rounds in which each batch size is timed on both engines (each keeping its best).
const PLACEMENT_ROUNDS: u32 = 3;
/// Pause between two rounds of timing one batch size on both engines, so that a burst of
/// other work on the host is less likely to cover every round.
const PLACEMENT_ROUND_GAP: std::time::Duration = std::time::Duration::from_millis(10);

/// For `deterministic = true`: runs [`DETERMINISM_ROWS`] varied rows alone, then batches of
/// every size in `sizes` made of those rows in turn, and compares every row's bits with its
/// answer alone. `Ok(Some(why))` names the first difference.
fn check_deterministic(
    backend: &dyn Backend,
    sizes: &[usize],
) -> Result<Option<String>, tie_engine::BackendError> {
    let io = &backend.info().io;
    let (iw, ow) = (io.input_width, io.output_width);
    let rows: Vec<f32> = (0..DETERMINISM_ROWS * iw)
        .map(|i| ((i * 7919 % 1999) as f32 - 999.0) / 333.0)
        .collect();
    let mut alone = vec![0.0f32; DETERMINISM_ROWS * ow];
    for r in 0..DETERMINISM_ROWS {
        backend.run_batch(
            &rows[r * iw..(r + 1) * iw],
            1,
            &mut alone[r * ow..(r + 1) * ow],
        )?;
    }
    for &n in sizes {
        let input: Vec<f32> = (0..n)
            .flat_map(|r| rows[(r % DETERMINISM_ROWS) * iw..][..iw].iter().copied())
            .collect();
        let mut output = vec![0.0f32; n * ow];
        backend.run_batch(&input, n, &mut output)?;
        for r in 0..n {
            let want = &alone[(r % DETERMINISM_ROWS) * ow..][..ow];
            let got = &output[r * ow..][..ow];
            if got
                .iter()
                .zip(want)
                .any(|(a, b)| a.to_bits() != b.to_bits())
            {
                return Ok(Some(format!(
                    "deterministic = true, but the {} engine answers row {r} of a batch of {n} with {got:?}, and the same row alone with {want:?}",
                    backend.info().engine
                )));
            }
        }
    }
    Ok(None)
}

/// Milliseconds rounded to two decimals, as logs give them (`load_ms=1.19`).
pub(crate) fn log_ms(ms: f64) -> f64 {
    (ms * 100.0).round() / 100.0
}

#[cfg(test)]
mod tests {
    use super::*;
    use tie_engine::{BackendError, BackendInfo, ModelIo};

    /// Sums each row's two inputs, plus `drift` times the batch's row count.
    struct Sum {
        info: BackendInfo,
        drift: f32,
    }

    impl Backend for Sum {
        fn info(&self) -> &BackendInfo {
            &self.info
        }

        fn run_batch(
            &self,
            input: &[f32],
            rows: usize,
            output: &mut [f32],
        ) -> Result<(), BackendError> {
            for r in 0..rows {
                output[r] = input[2 * r] + input[2 * r + 1] + self.drift * rows as f32;
            }
            Ok(())
        }
    }

    fn sum(drift: f32) -> Sum {
        Sum {
            info: BackendInfo::cpu(
                ModelIo {
                    input_name: "x".into(),
                    input_width: 2,
                    output_name: "y".into(),
                    output_width: 1,
                    output_note: None,
                },
                "test",
                "test",
            ),
            drift,
        }
    }

    #[test]
    fn the_determinism_check_runs_small_sizes_padded_sizes_and_the_largest_less_one() {
        let sizes = determinism_sizes(&[1, 2, 4, 8, 16, 32, 64]);
        let want: Vec<usize> = (1..=20).chain([32, 63, 64]).collect();
        assert_eq!(sizes, want);
        assert_eq!(determinism_sizes(&[1]), [1]);
    }

    #[test]
    fn the_determinism_check_passes_row_wise_engines_and_names_the_first_difference() {
        assert_eq!(
            check_deterministic(&sum(0.0), &[1, 2, 4, 64]).unwrap(),
            None
        );
        let why = check_deterministic(&sum(1e-3), &[1, 2, 4])
            .unwrap()
            .expect("a batch of 2 differs");
        assert!(
            why.contains("row 0 of a batch of 2") && why.contains("test engine"),
            "{why}"
        );
    }
}
