//! The model manager: the set of model versions the server serves, changed while it serves.
//!
//! [`Models`] holds the current [`ModelSet`] (an immutable snapshot: slots of loaded versions,
//! each model's default version and labels). Readers (the listener, the pollers, the control
//! plane, the health monitor) take a snapshot; a change publishes a new one and bumps a
//! generation number that pollers check between rounds.
//!
//! Slots are never reused: a version loaded again gets a new slot, so a slot number names one
//! loaded instance for its whole life (the monitor's figures, a poller's lane, a session's
//! binding).
//!
//! [`ModelManager`] changes the set from the repository:
//! - **reload** (`tie reload`, `POST …/models/reload`, `POST …/models/{name}/load`): reads the
//!   model's directory and config again, builds and warms every version its policy wants that
//!   is not loaded (or whose file changed), then switches in one step: new slots in, each
//!   model's default and labels set, versions the policy no longer wants out. If any version
//!   fails to load, nothing changes and the error is returned: the versions serving go on.
//! - **unload** (`POST …/models/{key}/unload`): takes a version (or every version of a model)
//!   out of the set.
//!
//! Sessions that named no version follow their model's default: a poller moves such a session
//! to the new default once every request it accepted for the old one is answered (it reads
//! nothing more from that session meanwhile), so each session's responses switch version at
//! one point, in order. A new default must be [`compatible`] with the one it replaces (layout,
//! feature and output counts, non-finite rule, uncertainty column). Sessions pinned to a version that goes away have their accepted
//! requests answered, then are closed (their clients see `Disconnected`); a version whose file
//! was replaced keeps its pinned sessions. An instance is freed when the last holder lets it
//! go: the poller lanes (once their queue is empty and no session is bound), the pollers' and
//! the control plane's snapshots; the manager waits for that (bounded) before it answers.
#![forbid(unsafe_code)]

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use serde::Serialize;

use super::loaded::LoadedModel;
use super::remote::Remote;
use super::repository::{self, LoadOptions, ModelPlan, RepositoryLoadError};
use super::routing::{Routing, RoutingError};
use super::set::{compatible, describe, Missing, ModelSet, Models};
use crate::monitor::ModelEntry;
use crate::sync::{Locked, RwLocked};

/// After a failed attempt to load again a model unloaded as unused, requests for it get the same
/// error for this long before another attempt.
pub const RESTORE_RETRY: Duration = Duration::from_secs(10);

/// A version unloaded for going unused, as it was loaded (it loads again from the same file,
/// with the same config).
#[derive(Clone, Debug)]
struct Unused {
    version: u32,
    path: PathBuf,
    checksum: String,
    config: super::config::ModelConfig,
    was_default: bool,
    /// The model's labels that named it.
    labels: Vec<String>,
}

/// Which of `idle`'s versions a request for `version` (a number or a label; `None`: the
/// default) would load again.
fn select(idle: &Idle, version: Option<&str>) -> Vec<usize> {
    idle.versions
        .iter()
        .enumerate()
        .filter(|(_, u)| match version {
            None => u.was_default,
            Some(v) => u.version.to_string() == v || u.labels.iter().any(|l| l == v),
        })
        .map(|(i, _)| i)
        .collect()
}

/// A model with versions unloaded for going unused.
#[derive(Debug)]
struct Idle {
    versions: Vec<Unused>,
    /// How long the last one had gone unused.
    idle: Duration,
    /// The last failed attempt to load them again, and why.
    failed: Option<(Instant, String)>,
}

/// How long the manager waits for a replaced or unloaded instance to be let go by the pollers
/// before it answers (the instance is still freed when they do).
const DRAIN_WAIT: Duration = Duration::from_secs(5);

/// What a reload or unload did.
#[derive(Clone, Debug, Default, Serialize, utoipa::ToSchema)]
pub struct ChangeReport {
    /// Versions loaded (`name:version`), with their load times in milliseconds.
    pub loaded: Vec<LoadedVersion>,
    /// Versions taken out (`name:version`).
    pub unloaded: Vec<String>,
    /// Per model: its default version after the change.
    pub defaults: BTreeMap<String, u32>,
    /// Versions taken out whose instance was still held (by a poller lane answering its last
    /// requests, or a snapshot in use) when the answer was written; freed once let go.
    pub still_draining: Vec<String>,
}

/// A version a change loaded.
#[derive(Clone, Debug, Serialize, utoipa::ToSchema)]
pub struct LoadedVersion {
    /// `name:version`.
    pub model_key: String,
    /// Build, warmup, canary and profile.
    pub load_time_ms: f64,
    /// SHA-256 of its file.
    pub checksum: String,
}

/// Why a change was refused (nothing changed).
#[derive(Debug, thiserror::Error)]
pub enum ChangeError {
    /// The repository or a version could not be read or loaded.
    #[error(transparent)]
    Load(#[from] RepositoryLoadError),
    /// `routing.toml` is invalid.
    #[error(transparent)]
    Routing(#[from] RoutingError),
    /// Loading again a model unloaded as unused failed a moment ago.
    #[error("{0} (failed a moment ago; tried again {retry}s after the failure)", retry = RESTORE_RETRY.as_secs())]
    Restore(String),
    /// No such loaded model or version.
    #[error("{0} is not loaded")]
    NotLoaded(String),
    /// The object store or registry could not be read (nothing changed).
    #[error("the model source: {0}")]
    Remote(#[from] super::remote::RemoteError),
    /// The new default is not compatible with the one it replaces (see [`compatible`]), which
    /// connected sessions were set up for.
    #[error("model {model}: version {new} ({new_layout}, {new_hash:#018x}) cannot replace version {old} ({old_layout}, {old_hash:#018x}) as the default: sessions set up for one would be sent to the other (layout, feature or output count, non-finite rule or uncertainty column differ). Serve it under a new model name, or unload {model} first")]
    LayoutChange {
        /// The model.
        model: String,
        /// The default being replaced.
        old: u32,
        /// Its layout.
        old_layout: String,
        /// Its hash.
        old_hash: u64,
        /// The new default.
        new: u32,
        /// Its layout.
        new_layout: String,
        /// Its hash.
        new_hash: u64,
    },
}

/// Loads, reloads and unloads models of the repository into [`Models`].
pub struct ModelManager {
    models: Arc<Models>,
    repository: PathBuf,
    options: LoadOptions,
    /// One change at a time.
    changing: Mutex<()>,
    /// Models with versions unloaded for going unused (`auto_unload_unused_hours`): loaded
    /// again on the next request for them.
    idle: Mutex<BTreeMap<String, Idle>>,
    /// Models being loaded again now ([`ModelManager::restore`]: one caller at a time).
    restoring: Mutex<std::collections::BTreeSet<String>>,
    /// The repository's `routing.toml`.
    routing: RwLock<Arc<Routing>>,
    /// Monitor indices of the named ensembles.
    ensembles: Mutex<BTreeMap<String, usize>>,
    /// The versions the repository's configs asked for at the last load or reload of each
    /// model: one of them not served is reported missing ([`ModelManager::missing_versions`]).
    planned: Mutex<std::collections::BTreeSet<(String, u32)>>,
    /// Models and versions that failed to load at start (`exit_on_error = false`) or in a
    /// later load, by key; dropped once the version serves.
    failed: Mutex<BTreeMap<String, repository::FailedVersion>>,
    /// The object store or registry the repository mirrors, if any: read before each reload.
    remote: std::sync::OnceLock<Arc<Remote>>,
    /// `model_deployment.load_on_demand`.
    load_on_demand: std::sync::atomic::AtomicBool,
    /// Versions that failed to load on demand (`name:version`), when and why: requests for
    /// them get the same error for [`RESTORE_RETRY`].
    on_demand_failed: Mutex<BTreeMap<String, (Instant, String)>>,
}

/// What a load on demand is remembered by: `name:version`, `name:default`.
fn on_demand_key(name: &str, version: Option<&str>) -> String {
    format!("{name}:{}", version.unwrap_or("default"))
}

/// The `(name, version)` pairs of `plans`.
fn planned_versions(plans: &[ModelPlan]) -> impl Iterator<Item = (String, u32)> + '_ {
    plans
        .iter()
        .flat_map(|p| p.versions.iter().map(|(v, _)| (p.name.clone(), *v)))
}

impl ModelManager {
    /// A manager of `models` from `repository`, loading with `options`. Sessions asking for a
    /// model unloaded for going unused make it load again (see [`Models::missing`]).
    pub fn new(models: Arc<Models>, repository: PathBuf, options: LoadOptions) -> Arc<Self> {
        let manager = Arc::new(Self {
            models: models.clone(),
            repository,
            options,
            changing: Mutex::new(()),
            idle: Mutex::new(BTreeMap::new()),
            restoring: Mutex::new(Default::default()),
            routing: RwLock::new(Arc::default()),
            ensembles: Mutex::new(BTreeMap::new()),
            planned: Mutex::new(Default::default()),
            failed: Mutex::new(BTreeMap::new()),
            remote: std::sync::OnceLock::new(),
            load_on_demand: std::sync::atomic::AtomicBool::new(false),
            on_demand_failed: Mutex::new(BTreeMap::new()),
        });
        // What the repository asked for when it was loaded (versions refused then included).
        match repository::plan_each(&manager.repository, repository::Skipped::Quiet) {
            Ok(each) => {
                let plans: Vec<ModelPlan> = each.into_iter().filter_map(|(_, p)| p.ok()).collect();
                *manager.planned.locked() = planned_versions(&plans).collect();
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the repository's plan: readiness lists only what is loaded")
            }
        }
        let weak = Arc::downgrade(&manager);
        let _ = models.missing.set(Box::new(move |name, version| {
            weak.upgrade()?.wake(name, version)
        }));
        let weak = Arc::downgrade(&manager);
        let _ = models.latest.set(Box::new(move |name| {
            weak.upgrade()?.latest_in_repository(name)
        }));
        manager
    }

    /// The object store or registry whose mirror is the repository: read before every
    /// reload (see [`super::remote`]).
    pub fn set_remote(&self, remote: Arc<Remote>) {
        let _ = self.remote.set(remote);
    }

    /// The object store or registry whose mirror is the repository, if any.
    pub fn remote(&self) -> Option<&Arc<Remote>> {
        self.remote.get()
    }

    /// `model_deployment.load_on_demand`: a request naming a version that is in the
    /// repository (or the registry) but not loaded loads it.
    pub fn set_load_on_demand(&self, on: bool) {
        self.load_on_demand.store(on, Ordering::Relaxed);
    }

    /// Runs `change` after reading the remote source into the mirror (when there is one);
    /// when the change fails, the mirror is put back as it was.
    fn with_remote_synced<T>(
        &self,
        change: impl FnOnce() -> Result<T, ChangeError>,
    ) -> Result<T, ChangeError> {
        let Some(remote) = self.remote.get() else {
            return change();
        };
        remote.sync()?;
        let result = change();
        match &result {
            Ok(_) => remote.commit(),
            Err(_) => remote.roll_back(),
        }
        result
    }

    /// Checks the registry every `interval` until `stop`: an alias that names another version
    /// than the one served reloads the models (the new version fetched, verified, warmed and
    /// switched to; the old one drains). A failure is logged, and tried again next time.
    pub fn poll_remote_task(&self, interval: Duration, stop: &std::sync::atomic::AtomicBool) {
        let Some(remote) = self.remote.get() else {
            return;
        };
        let mut last_error: Option<String> = None;
        loop {
            let started = Instant::now();
            while started.elapsed() < interval {
                if stop.load(Ordering::Relaxed) {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50).min(interval));
            }
            let outcome = match remote.moved() {
                Ok(false) => Ok(None),
                Ok(true) => self.reload_all().map(Some),
                Err(e) => Err(ChangeError::Remote(e)),
            };
            match outcome {
                Ok(Some(report)) => {
                    last_error = None;
                    tracing::info!(
                        loaded = ?report.loaded.iter().map(|l| &l.model_key).collect::<Vec<_>>(),
                        unloaded = ?report.unloaded,
                        "the registry's aliases moved: models reloaded"
                    );
                }
                Ok(None) => last_error = None,
                Err(e) => {
                    let e = e.to_string();
                    // Said once per distinct failure, not every interval.
                    if last_error.as_ref() != Some(&e) {
                        tracing::error!(error = %e, "the registry's versions could not be read or served: the versions serving go on");
                        last_error = Some(e);
                    }
                }
            }
        }
    }

    /// The routing rules in effect.
    pub fn routing(&self) -> Arc<Routing> {
        self.routing.read_locked().clone()
    }

    /// The monitor index of named ensemble `name`.
    pub fn ensemble_index(&self, name: &str) -> Option<usize> {
        self.ensembles.locked().get(name).copied()
    }

    /// Reads the repository's `routing.toml` (at start; a reload of the whole repository reads
    /// it again).
    ///
    /// # Errors
    /// [`RoutingError`]: the rules in effect stay.
    pub fn load_routing(&self) -> Result<(), RoutingError> {
        let routing = Routing::load(&self.repository)?;
        self.set_routing(routing);
        Ok(())
    }

    fn set_routing(&self, routing: Routing) {
        let set = self.models.snapshot();
        for name in routing.ensembles.keys() {
            if set.resolve(name, None).is_some() {
                tracing::warn!(
                    ensemble = %name,
                    "an ensemble has the name of a model: requests for that name go to the ensemble"
                );
            }
        }
        drop(set);
        {
            let mut ensembles = self.ensembles.locked();
            for (name, index) in ensembles.iter() {
                if !routing.ensembles.contains_key(name) {
                    self.models.monitor.retire(*index);
                }
            }
            ensembles.retain(|name, _| routing.ensembles.contains_key(name));
            for name in routing.ensembles.keys() {
                ensembles.entry(name.clone()).or_insert_with(|| {
                    self.models.monitor.add(ModelEntry {
                        key: format!("{name}:ensemble"),
                        device_memory_bytes: None,
                        pci_bus_ids: Vec::new(),
                    })
                });
            }
        }
        tracing::info!(
            strategies = ?routing.strategies.keys().collect::<Vec<_>>(),
            ensembles = ?routing.ensembles.keys().collect::<Vec<_>>(),
            "routing rules in effect"
        );
        if let Some(shadows) = self.models.monitor().shadows.get() {
            shadows.set_rules(routing.shadows.clone());
        }
        *self.routing.write_locked() = Arc::new(routing);
    }

    /// For a session asking for `name` (`version`): starts loading it again in the background
    /// when it was unloaded for going unused; says so, or why it cannot be now.
    fn wake(self: Arc<Self>, name: &str, version: Option<&str>) -> Option<Missing> {
        let (idle, failed) = {
            let all = self.idle.locked();
            let Some(entry) = all.get(name).filter(|e| !select(e, version).is_empty()) else {
                drop(all);
                return self.wake_on_demand(name, version);
            };
            let failed = entry
                .failed
                .as_ref()
                .filter(|(at, _)| at.elapsed() < RESTORE_RETRY)
                .map(|(_, why)| why.clone());
            (entry.idle, failed)
        };
        if let Some(why) = failed {
            return Some(Missing::Failed(format!(
                "model {name} was unloaded as unused and could not be loaded again: {why}"
            )));
        }
        let message = format!(
            "model {name} was unloaded after {}s without a request; it is loading again: retry in a moment",
            idle.as_secs()
        );
        if self.restoring.locked().contains(name) {
            return Some(Missing::Loading(message));
        }
        self.restore_in_background(
            name,
            version,
            Some("loaded again for a session"),
            "cannot load again a model unloaded as unused",
        );
        Some(Missing::Loading(message))
    }

    /// Runs [`ModelManager::restore`] on a thread of its own (a session's hello does not wait
    /// for it), logging `loaded` (when given) or `failed` with the outcome.
    fn restore_in_background(
        self: Arc<Self>,
        name: &str,
        version: Option<&str>,
        loaded: Option<&'static str>,
        failed: &'static str,
    ) {
        let (owned, version) = (name.to_string(), version.map(str::to_string));
        let spawned = std::thread::Builder::new()
            .name("tie-model-load".into())
            .spawn(move || match self.restore(&owned, version.as_deref()) {
                Ok(Some(ms)) => {
                    if let Some(loaded) = loaded {
                        tracing::info!(model = %owned, load_ms = super::repository::log_ms(ms), "{loaded}");
                    }
                }
                Ok(None) => {}
                Err(e) => tracing::error!(model = %owned, error = %e, "{failed}"),
            });
        if let Err(e) = spawned {
            tracing::error!(error = %e, "cannot start a thread to load a model");
        }
    }

    /// Whether a request for `name` (`version`: a number or label; `None`: the default) would
    /// load a version unloaded for going unused, or (`load_on_demand`) one the repository or
    /// registry holds ([`ModelManager::restore`]).
    pub fn can_restore(&self, name: &str, version: Option<&str>) -> bool {
        self.idle
            .locked()
            .get(name)
            .is_some_and(|e| !select(e, version).is_empty())
            || self.on_demand_candidate(name, version)
    }

    /// With `load_on_demand`, the highest version of `name` the repository (the mirror, for a
    /// registry or an object store) holds.
    fn latest_in_repository(&self, name: &str) -> Option<u32> {
        if !self.load_on_demand.load(Ordering::Relaxed) || !repository::is_model_name(name) {
            return None;
        }
        repository::present_versions(&self.repository.join(name), repository::Skipped::Quiet)
            .ok()?
            .last()
            .map(|(v, _)| *v)
    }

    /// Whether a request for `name` (`version`) that found nothing loaded would load a
    /// version on demand: with `load_on_demand`, a version the repository holds (a number,
    /// `latest`, or the default when nothing of the model is loaded), or for a registry any
    /// version or alias (the registry says whether it has it).
    fn on_demand_candidate(&self, name: &str, version: Option<&str>) -> bool {
        if !self.load_on_demand.load(Ordering::Relaxed) || !repository::is_model_name(name) {
            return false;
        }
        if self.remote.get().is_some_and(|r| r.names(name)) && version.is_some() {
            return true;
        }
        let present =
            repository::present_versions(&self.repository.join(name), repository::Skipped::Quiet)
                .unwrap_or_default();
        match version {
            None => !present.is_empty() && self.models.snapshot().highest(name).is_none(),
            Some(super::set::LATEST) => !present.is_empty(),
            Some(v) => v
                .parse::<u32>()
                .is_ok_and(|v| present.iter().any(|(p, _)| *p == v)),
        }
    }

    /// [`ModelManager::wake`] for a version not unloaded as unused: with `load_on_demand`,
    /// starts loading it in the background.
    fn wake_on_demand(self: Arc<Self>, name: &str, version: Option<&str>) -> Option<Missing> {
        if !self.on_demand_candidate(name, version) {
            return None;
        }
        let key = on_demand_key(name, version);
        if let Some(why) = self.recent_on_demand_failure(&key) {
            return Some(Missing::Failed(format!(
                "model {key} could not be loaded on demand: {why}"
            )));
        }
        let message =
            format!("model {key} is not loaded; it is loading on demand: retry in a moment");
        if self.restoring.locked().contains(name) {
            return Some(Missing::Loading(message));
        }
        // Its load logs "loaded on demand" itself.
        self.restore_in_background(name, version, None, "cannot load a model on demand");
        Some(Missing::Loading(message))
    }

    /// Why the load on demand of `key` ([`on_demand_key`]) failed, when it failed less than
    /// [`RESTORE_RETRY`] ago.
    fn recent_on_demand_failure(&self, key: &str) -> Option<String> {
        self.on_demand_failed
            .locked()
            .get(key)
            .filter(|(at, _)| at.elapsed() < RESTORE_RETRY)
            .map(|(_, why)| why.clone())
    }

    /// Loads on demand the version of `name` that `version` names (see
    /// [`ModelManager::on_demand_candidate`]); a failure is remembered for
    /// [`RESTORE_RETRY`]. `None`: nothing to load (off, already loaded, or a label the
    /// repository cannot name).
    fn load_on_demand_locked(
        &self,
        name: &str,
        version: Option<&str>,
    ) -> Result<Option<f64>, ChangeError> {
        if !self.on_demand_candidate(name, version) {
            return Ok(None);
        }
        let key = on_demand_key(name, version);
        if let Some(why) = self.recent_on_demand_failure(&key) {
            return Err(ChangeError::Restore(why));
        }
        let result = self.load_on_demand_inner(name, version);
        match &result {
            Err(e) => {
                let mut failed = self.on_demand_failed.locked();
                failed.retain(|_, (at, _)| at.elapsed() < RESTORE_RETRY);
                failed.insert(key, (Instant::now(), e.to_string()));
            }
            Ok(_) => {
                self.on_demand_failed.locked().remove(&key);
            }
        }
        result
    }

    fn load_on_demand_inner(
        &self,
        name: &str,
        version: Option<&str>,
    ) -> Result<Option<f64>, ChangeError> {
        let remote = self.remote.get();
        let fetched = match (remote, version) {
            (Some(r), Some(v)) if r.names(name) => r.fetch_on_demand(name, v)?,
            _ => None,
        };
        let result = self.load_fetched(name, version, fetched);
        if let (Err(_), Some(r), Some(v)) = (&result, remote, fetched) {
            // Not served after all: out of the mirror again.
            r.drop_on_demand(name, v);
        }
        result
    }

    /// [`ModelManager::load_on_demand_inner`] once the version is in the repository (when
    /// `fetched` from a registry, that version).
    fn load_fetched(
        &self,
        name: &str,
        version: Option<&str>,
        fetched: Option<u32>,
    ) -> Result<Option<f64>, ChangeError> {
        let dir = self.repository.join(name);
        let present = repository::present_versions(&dir, repository::Skipped::Quiet)?;
        let config = repository::read_model_config(&dir)?;
        let wanted = match (fetched, version) {
            (Some(v), _) => Some(v),
            // The model's default as its config names it, else its highest.
            (None, None) => config
                .default_version
                .filter(|d| present.iter().any(|(p, _)| p == d))
                .or_else(|| present.last().map(|(v, _)| *v)),
            (None, Some(super::set::LATEST)) => present.last().map(|(v, _)| *v),
            (None, Some(v)) => v.parse::<u32>().ok(),
        };
        let Some(v) = wanted else {
            return Ok(None);
        };
        let current = self.models.snapshot();
        if current.resolve(name, Some(v)).is_some() {
            // Loaded already; a registry alias asked for names it from now on.
            if let Some(label) = version.filter(|l| config.labels.get(*l) == Some(&v)) {
                self.models.publish(|_, set| {
                    set.labels
                        .entry(name.to_string())
                        .or_default()
                        .insert(label.to_string(), v);
                });
            }
            return Ok(None);
        }
        let Some((_, file)) = present.iter().find(|(p, _)| *p == v) else {
            return Err(ChangeError::NotLoaded(format!(
                "{name}:{v} (nor is it in the repository)"
            )));
        };
        let was_default = current.resolve(name, None).is_none();
        drop(current);
        let plan = ModelPlan {
            name: name.into(),
            config,
            versions: vec![(v, file.clone())],
            default_version: v,
        };
        let m = repository::load_version(&plan, v, &self.options)?;
        let ms = m.load_time.as_secs_f64() * 1e3;
        self.publish_loaded(name, vec![(m, was_default)]);
        tracing::info!(
            model = name,
            version = v,
            load_ms = super::repository::log_ms(ms),
            "loaded on demand"
        );
        Ok(Some(ms))
    }

    /// Puts `fresh` versions of `name` in the set (each a default when marked), with the
    /// labels of their configs that name a loaded version.
    fn publish_loaded(&self, name: &str, fresh: Vec<(LoadedModel, bool)>) {
        self.models.publish(|models, set| {
            for (m, was_default) in fresh {
                let labels = m.config.labels.clone();
                let slot = models.add_slot(set, m);
                if was_default {
                    set.defaults.insert(name.to_string(), slot);
                }
                let loaded: Vec<u32> = set
                    .slots
                    .iter()
                    .flatten()
                    .filter(|s| s.name == name)
                    .map(|s| s.version)
                    .collect();
                let entry = set.labels.entry(name.to_string()).or_default();
                for (label, v) in labels {
                    if loaded.contains(&v) {
                        entry.insert(label, v);
                    }
                }
            }
        });
    }

    /// Whether model `name` is being loaded again (by [`ModelManager::restore`]) now.
    pub fn is_restoring(&self, name: &str) -> bool {
        self.restoring.locked().contains(name)
    }

    /// The versions the repository's configs asked for at the last load or reload that are
    /// neither served nor loaded again on the next request for them (unloaded, or refused at
    /// load), as `name:version` with why. Versions added to the repository since are not
    /// counted until a reload asks for them.
    pub fn missing_versions(&self) -> Vec<(String, String)> {
        let set = self.models.snapshot();
        let planned = self.planned.locked().clone();
        let failed = self.failures();
        let mut missing: Vec<(String, String)> = planned
            .into_iter()
            .filter(|(name, version)| {
                set.resolve(name, Some(*version)).is_none()
                    && !self.can_restore(name, Some(&version.to_string()))
            })
            .map(|(name, version)| {
                let key = format!("{name}:{version}");
                let why = failed
                    .iter()
                    .find(|f| f.key() == key)
                    .map_or_else(
                        || "asked for by the repository but not served (unloaded, or refused at load): POST …/models/reload loads it".into(),
                        |f| format!("failed to load: {}", f.reason),
                    );
                (key, why)
            })
            .collect();
        // Models that failed before any version was planned (an invalid config).
        for f in failed.iter().filter(|f| f.version.is_none()) {
            missing.push((f.key(), format!("failed to load: {}", f.reason)));
        }
        missing
    }

    /// Records models and versions that failed to load while the server went on.
    pub fn record_failures(&self, failures: Vec<repository::FailedVersion>) {
        let mut failed = self.failed.locked();
        for f in failures {
            failed.insert(f.key(), f);
        }
    }

    /// The failures recorded that still stand: versions not served now, and models none of
    /// whose versions is served, whose directory is still in the repository.
    pub fn failures(&self) -> Vec<repository::FailedVersion> {
        let set = self.models.snapshot();
        let mut failed = self.failed.locked();
        failed.retain(|_, f| {
            let unserved = match f.version {
                Some(v) => set.resolve(&f.name, Some(v)).is_none(),
                None => set.resolve(&f.name, None).is_none(),
            };
            unserved && self.repository.join(&f.name).is_dir()
        });
        failed.values().cloned().collect()
    }

    /// Whether some model was unloaded for going unused (and loads on the next request).
    pub fn has_unused_unloaded(&self) -> bool {
        !self.idle.locked().is_empty()
    }

    /// Loads again the version of `name` a request asks for (`version`: a number or label;
    /// `None`: the default), when it was unloaded for going unused: from the file and with the
    /// config it had (a file changed since is refused before anything is built: reload it
    /// explicitly). A default is the default again. Nothing else of the model is loaded.
    /// Returns the load time in milliseconds; `None` when another caller is loading the model
    /// or there is nothing to load. After a failure, callers get the same error for
    /// [`RESTORE_RETRY`] without a new attempt.
    ///
    /// # Errors
    /// [`ChangeError`]: it could not be loaded (nothing changed).
    pub fn restore(&self, name: &str, version: Option<&str>) -> Result<Option<f64>, ChangeError> {
        if !self.restoring.locked().insert(name.to_string()) {
            return Ok(None);
        }
        let result = self.restore_locked(name, version);
        self.restoring.locked().remove(name);
        result
    }

    fn restore_locked(
        &self,
        name: &str,
        version: Option<&str>,
    ) -> Result<Option<f64>, ChangeError> {
        let _one = self.changing.locked();
        let wanted: Vec<Unused> = match self.idle.locked().get(name) {
            None => return self.load_on_demand_locked(name, version),
            Some(Idle {
                failed: Some((at, why)),
                ..
            }) if at.elapsed() < RESTORE_RETRY => {
                return Err(ChangeError::Restore(why.clone()));
            }
            Some(idle) => select(idle, version)
                .into_iter()
                .map(|i| idle.versions[i].clone())
                .collect(),
        };
        if wanted.is_empty() {
            return self.load_on_demand_locked(name, version);
        }
        let fail = |e: RepositoryLoadError| {
            if let Some(idle) = self.idle.locked().get_mut(name) {
                idle.failed = Some((Instant::now(), e.to_string()));
            }
            ChangeError::from(e)
        };
        let fresh = self.load_unused(name, &wanted).map_err(fail)?;
        let ms: f64 = fresh
            .iter()
            .map(|(m, _)| m.load_time.as_secs_f64() * 1e3)
            .sum();
        self.publish_loaded(name, fresh);
        self.forget_unused(name, &wanted);
        tracing::info!(
            model = name,
            versions = ?wanted.iter().map(|u| u.version).collect::<Vec<_>>(),
            load_ms = super::repository::log_ms(ms),
            "loaded again after going unused"
        );
        Ok(Some(ms))
    }

    /// Loads the versions `wanted` of `name` from their files as they were unloaded, each
    /// file's checksum checked before anything is built; with whether each was the default.
    fn load_unused(
        &self,
        name: &str,
        wanted: &[Unused],
    ) -> Result<Vec<(LoadedModel, bool)>, RepositoryLoadError> {
        let mut fresh = Vec::new();
        for u in wanted {
            let now = repository::sha256_file(&u.path)?;
            if now != u.checksum {
                return Err(RepositoryLoadError::Integrity {
                    model: name.into(),
                    version: u.version,
                    path: u.path.clone(),
                    why: "the file changed since the version was unloaded as unused: load it with tie reload".into(),
                });
            }
            let plan = ModelPlan {
                name: name.into(),
                config: u.config.clone(),
                versions: vec![(u.version, u.path.clone())],
                default_version: u.version,
            };
            let m = repository::load_version(&plan, u.version, &self.options)?;
            fresh.push((m, u.was_default));
        }
        Ok(fresh)
    }

    /// `name`'s versions `loaded` are served again: no longer known as unused.
    fn forget_unused(&self, name: &str, loaded: &[Unused]) {
        let mut all = self.idle.locked();
        if let Some(idle) = all.get_mut(name) {
            idle.versions
                .retain(|u| !loaded.iter().any(|w| w.version == u.version));
            idle.failed = None;
            if idle.versions.is_empty() {
                all.remove(name);
            }
        }
    }

    /// Unloads every version that has had no request for `after` (nor since it loaded), has no
    /// session and is not `keep_loaded`, every `after / 4` (at most a minute) until `stop`. A
    /// default version unloaded this way leaves its model without a default (no other
    /// version takes its place), so the next request for the model loads it again.
    pub fn unload_unused_task(&self, after: Duration, stop: &std::sync::atomic::AtomicBool) {
        let every = (after / 4).clamp(Duration::from_millis(100), Duration::from_secs(60));
        let mut next = Instant::now() + every;
        while !stop.load(Ordering::Relaxed) {
            std::thread::sleep(Duration::from_millis(50).min(every));
            if Instant::now() < next {
                continue;
            }
            next = Instant::now() + every;
            let candidates: Vec<usize> = self
                .models
                .snapshot()
                .loaded()
                .into_iter()
                .filter(|(_, m)| self.unused_for(m, after).is_some())
                .map(|(_, m)| m.monitor_index)
                .collect();
            for index in candidates {
                // A load in progress is waited for only while the server is not stopping.
                let Some(_one) = self.lock_changes_unless(stop) else {
                    return;
                };
                self.unload_if_unused(index, after);
            }
        }
    }

    /// The lock of changes to the set, waited for until `stop` is set (then `None`).
    fn lock_changes_unless(
        &self,
        stop: &std::sync::atomic::AtomicBool,
    ) -> Option<std::sync::MutexGuard<'_, ()>> {
        loop {
            if stop.load(Ordering::Relaxed) {
                return None;
            }
            match self.changing.try_lock() {
                Ok(guard) => return Some(guard),
                Err(std::sync::TryLockError::Poisoned(p)) => return Some(p.into_inner()),
                Err(std::sync::TryLockError::WouldBlock) => {
                    std::thread::sleep(Duration::from_millis(10));
                }
            }
        }
    }

    /// Unloads the instance with monitor index `index` if it is still unused for `after`
    /// (checked again under the change lock, on the same instance: a request, a session or a
    /// reload may have come since it was a candidate), remembering it as unused.
    fn unload_if_unused(&self, index: usize, after: Duration) {
        let current = self.models.snapshot();
        let Some((slot, m)) = current
            .loaded()
            .into_iter()
            .find(|(_, m)| m.monitor_index == index)
            .map(|(s, m)| (s, m.clone()))
        else {
            return;
        };
        let Some(idle) = self.unused_for(&m, after) else {
            return;
        };
        // Against a session being set up on it right now: the listener counts a session, then
        // looks at this flag; here the flag is set, then the count looked at. One of the two
        // sees the other (both sequentially consistent).
        // SYNC(unloading): SeqCst pairs with the listener's `sessions` increment and
        // `unloading` load (dataplane/session.rs `register`).
        m.unloading.store(true, Ordering::SeqCst);
        // SYNC(unloading): the other half of the pair above.
        if m.sessions.load(Ordering::SeqCst) > 0 {
            m.unloading.store(false, Ordering::SeqCst);
            return;
        }
        let key = m.key();
        tracing::info!(model = %key, idle_s = idle.as_secs(), "unloading: unused");
        // Known as unused before it leaves the set: a request that misses it from then on
        // loads it again.
        {
            let mut all = self.idle.locked();
            let entry = all.entry(m.name.clone()).or_insert_with(|| Idle {
                versions: Vec::new(),
                idle,
                failed: None,
            });
            entry.idle = idle;
            entry.failed = None;
            entry.versions.push(Unused {
                version: m.version,
                path: m.path.clone(),
                checksum: m.checksum.clone(),
                config: m.config.clone(),
                was_default: current.is_default(slot),
                labels: current.labels_of(&m.name, m.version),
            });
        }
        drop((current, m));
        match self.unload_slots(&[slot], false) {
            Ok(report) => tracing::info!(unloaded = ?report.unloaded, "unloaded: unused"),
            Err(e) => {
                tracing::warn!(model = %key, error = %e, "not unloaded");
                if let Some(m) = self.models.snapshot().get(slot) {
                    m.unloading.store(false, Ordering::SeqCst);
                }
            }
        }
    }

    /// How long `m` has gone unused, when it may be unloaded for it: no request for `after`
    /// (nor since it loaded), no session, not `keep_loaded`.
    fn unused_for(&self, m: &LoadedModel, after: Duration) -> Option<Duration> {
        if m.config.keep_loaded || m.sessions.load(Ordering::Acquire) > 0 {
            return None;
        }
        let last = self
            .models
            .monitor
            .last_request(m.monitor_index)
            .map_or(m.loaded_at, |t| t.max(m.loaded_at));
        let idle = (chrono::Utc::now() - last).to_std().ok()?;
        (idle >= after).then_some(idle)
    }

    /// The versions served.
    pub fn models(&self) -> &Arc<Models> {
        &self.models
    }

    /// Reloads every model of the repository (see the module's docs); models whose directory
    /// is gone are unloaded, new ones loaded.
    ///
    /// # Errors
    /// [`ChangeError`]: nothing changed.
    pub fn reload_all(&self) -> Result<ChangeReport, ChangeError> {
        let _one = self.changing.locked();
        self.with_remote_synced(|| self.reload_all_locked())
    }

    fn reload_all_locked(&self) -> Result<ChangeReport, ChangeError> {
        let plans = repository::plan_repository(&self.repository, repository::Skipped::Warn)?;
        let routing = Routing::load(&self.repository)?;
        // Models whose directory is gone (not one caught between two files of a deploy).
        let mut gone: Vec<String> = self
            .models
            .snapshot()
            .loaded()
            .into_iter()
            .map(|(_, m)| m.name.clone())
            .filter(|n| !self.repository.join(n).exists())
            .collect();
        gone.dedup();
        let plans: Vec<ModelPlan> = plans
            .into_iter()
            .filter(|p| !gone.contains(&p.name))
            .collect();
        // Models unloaded as unused whose directory is gone are gone too.
        self.idle
            .locked()
            .retain(|name, _| self.repository.join(name).exists());
        let planned: std::collections::BTreeSet<(String, u32)> = planned_versions(&plans).collect();
        let report = self.apply(plans, &gone)?;
        *self.planned.locked() = planned;
        self.set_routing(routing);
        Ok(report)
    }

    /// Reloads model `name` from the repository; with `version`, loads that version too (it
    /// must be one the model's version policy allows).
    ///
    /// # Errors
    /// [`ChangeError`]: nothing changed.
    pub fn reload(&self, name: &str, version: Option<u32>) -> Result<ChangeReport, ChangeError> {
        let _one = self.changing.locked();
        if self.remote.get().is_some() {
            // The mirror holds the whole source as read now: every model that changed in it
            // reloads, so that the mirror stays what serves.
            let mut report = self.with_remote_synced(|| self.reload_all_locked())?;
            let one = self.reload_locked(name, version)?;
            report.loaded.extend(one.loaded);
            report.unloaded.extend(one.unloaded);
            report.defaults = one.defaults;
            return Ok(report);
        }
        self.reload_locked(name, version)
    }

    fn reload_locked(&self, name: &str, version: Option<u32>) -> Result<ChangeReport, ChangeError> {
        let plan = repository::plan_model(&self.repository, name)?;
        if let Some(v) = version {
            if plan.file(v).is_none() {
                return Err(RepositoryLoadError::Unsupported {
                    model: name.into(),
                    why: format!(
                        "version {v} is not in the repository or not picked by the model's version policy ({:?})",
                        plan.versions.iter().map(|(v, _)| *v).collect::<Vec<_>>()
                    ),
                }
                .into());
            }
        }
        let versions: Vec<(String, u32)> = planned_versions(std::slice::from_ref(&plan)).collect();
        let report = self.apply(vec![plan], &[])?;
        let mut planned = self.planned.locked();
        planned.retain(|(n, _)| n != name);
        planned.extend(versions);
        Ok(report)
    }

    /// Unloads `key`: `name:version` (a label is accepted) or `name` (every version).
    ///
    /// # Errors
    /// [`ChangeError::NotLoaded`].
    pub fn unload(&self, key: &str) -> Result<ChangeReport, ChangeError> {
        let _one = self.changing.locked();
        let current = self.models.snapshot();
        let slots: Vec<usize> = match key.rsplit_once(':') {
            Some(_) => current.by_key(key).into_iter().collect(),
            None => current
                .loaded()
                .into_iter()
                .filter(|(_, m)| m.name == key)
                .map(|(i, _)| i)
                .collect(),
        };
        drop(current);
        // Unloaded on purpose: a version unloaded as unused does not come back either.
        let forgotten = {
            let mut idle = self.idle.locked();
            let (name, version) = match key.rsplit_once(':') {
                Some((n, v)) => (n, Some(v)),
                None => (key, None),
            };
            let mut forgotten = Vec::new();
            if let Some(entry) = idle.get_mut(name) {
                entry.versions.retain(|u| {
                    let gone = version.is_none_or(|v| {
                        v == u.version.to_string() || u.labels.iter().any(|l| l == v)
                    });
                    if gone {
                        forgotten.push(format!("{name}:{}", u.version));
                    }
                    !gone
                });
                if entry.versions.is_empty() {
                    idle.remove(name);
                }
            }
            forgotten
        };
        if slots.is_empty() && forgotten.is_empty() {
            return Err(ChangeError::NotLoaded(key.into()));
        }
        if let Some(remote) = self.remote.get() {
            // A version fetched on demand leaves the mirror with it.
            let set = self.models.snapshot();
            for m in slots.iter().filter_map(|s| set.get(*s)) {
                remote.drop_on_demand(&m.name, m.version);
            }
        }
        let mut report = self.unload_slots(&slots, true)?;
        report.unloaded.extend(forgotten);
        Ok(report)
    }

    /// Takes `slots` out of the set. A model whose default leaves gets another compatible
    /// version as default when `promote`, else none.
    fn unload_slots(&self, slots: &[usize], promote: bool) -> Result<ChangeReport, ChangeError> {
        let mut report = ChangeReport::default();
        let removed = self.models.publish(|_, set| {
            let mut removed = Vec::new();
            for &slot in slots {
                if let Some(m) = set.slots[slot].take() {
                    removed.push((slot, m));
                }
            }
            fix_defaults(set, &removed, promote);
            removed
        });
        self.finish(removed, &mut report);
        report.defaults = defaults_of(&self.models.snapshot());
        Ok(report)
    }

    /// Loads what `plans` want and is not loaded, then switches in one step; unloads the
    /// models named in `gone`.
    fn apply(&self, plans: Vec<ModelPlan>, gone: &[String]) -> Result<ChangeReport, ChangeError> {
        let current = self.models.snapshot();
        // Build and warm every new version first: any failure leaves the set as it is.
        let fresh = self.build_fresh(&current, &plans)?;
        check_defaults(&current, &plans, &fresh)?;
        let mut report = ChangeReport::default();
        for plan in &plans {
            self.idle.locked().remove(&plan.name);
        }
        for (_, m) in &fresh {
            report.loaded.push(LoadedVersion {
                model_key: m.key(),
                load_time_ms: m.load_time.as_secs_f64() * 1e3,
                checksum: m.checksum.clone(),
            });
        }
        let removed = self.models.publish(|models, set| {
            let mut removed = Vec::new();
            // Replaced files and versions the policies no longer want leave.
            for slot in 0..set.slots.len() {
                let Some(m) = set.slots[slot].as_ref() else {
                    continue;
                };
                let replaced = fresh
                    .iter()
                    .any(|(_, f)| f.name == m.name && f.version == m.version);
                let unwanted = plans
                    .iter()
                    .find(|p| p.name == m.name)
                    .is_some_and(|p| p.file(m.version).is_none());
                if replaced || unwanted || gone.contains(&m.name) {
                    removed.push((slot, set.slots[slot].take().expect("checked")));
                }
            }
            for (_, m) in fresh {
                models.add_slot(set, m);
            }
            for plan in &plans {
                let slot = set
                    .resolve(&plan.name, Some(plan.default_version))
                    .expect("loaded above");
                set.defaults.insert(plan.name.clone(), slot);
                set.labels
                    .insert(plan.name.clone(), plan.config.labels.clone());
            }
            fix_defaults(set, &removed, true);
            removed
        });
        drop(current);
        for plan in &plans {
            tracing::info!(
                model = %plan.name,
                default = plan.default_version,
                versions = ?plan.versions.iter().map(|(v, _)| *v).collect::<Vec<_>>(),
                "model reloaded"
            );
        }
        self.finish(removed, &mut report);
        report.defaults = defaults_of(&self.models.snapshot());
        Ok(report)
    }

    /// Builds and warms every version of `plans` that is not loaded as it is (by plan index):
    /// the same file built the same way is kept; a file replaced in place, or a config that
    /// builds it differently, is loaded again.
    fn build_fresh(
        &self,
        current: &ModelSet,
        plans: &[ModelPlan],
    ) -> Result<Vec<(usize, LoadedModel)>, ChangeError> {
        let mut fresh = Vec::new();
        for (p, plan) in plans.iter().enumerate() {
            for (version, file) in &plan.versions {
                let loaded = current.resolve(&plan.name, Some(*version));
                if let Some(slot) = loaded {
                    let m = current.get(slot).expect("resolved");
                    if m.path == *file
                        && m.config.builds_like(&plan.config)
                        && file_checksum(file).as_deref() == Some(&m.checksum)
                    {
                        continue;
                    }
                }
                let model = repository::load_version(plan, *version, &self.options)?;
                fresh.push((p, model));
            }
        }
        Ok(fresh)
    }

    /// Retires `removed` from the monitor and waits (bounded) until the pollers let them go.
    fn finish(&self, removed: Vec<(usize, Arc<LoadedModel>)>, report: &mut ChangeReport) {
        for (_, m) in &removed {
            self.models.monitor.retire(m.monitor_index);
        }
        let started = Instant::now();
        for (_, m) in removed {
            let key = m.key();
            report.unloaded.push(key.clone());
            // Held by poller lanes and sessions until their requests are answered.
            while Arc::strong_count(&m) > 1 && started.elapsed() < DRAIN_WAIT {
                std::thread::sleep(Duration::from_millis(5));
            }
            if Arc::strong_count(&m) > 1 {
                tracing::warn!(model = %key, "unloaded; still answering its last requests");
                report.still_draining.push(key);
            } else {
                tracing::info!(model = %key, "unloaded and freed");
            }
        }
    }
}
/// A new default must read the layout the sessions following the old one write.
fn check_defaults(
    current: &ModelSet,
    plans: &[ModelPlan],
    fresh: &[(usize, LoadedModel)],
) -> Result<(), ChangeError> {
    for plan in plans {
        let Some(old_slot) = current.resolve(&plan.name, None) else {
            continue;
        };
        let old = current.get(old_slot).expect("resolved");
        let new: &LoadedModel = match fresh
            .iter()
            .find(|(_, m)| m.name == plan.name && m.version == plan.default_version)
        {
            Some((_, m)) => m,
            None => {
                let slot = current
                    .resolve(&plan.name, Some(plan.default_version))
                    .expect("the plan's versions are loaded or fresh");
                current.get(slot).expect("resolved")
            }
        };
        if !compatible(old, new) {
            return Err(ChangeError::LayoutChange {
                model: plan.name.clone(),
                old: old.version,
                old_layout: describe(old),
                old_hash: old.layout_hash,
                new: plan.default_version,
                new_layout: describe(new),
                new_hash: new.layout_hash,
            });
        }
    }
    Ok(())
}

/// A model whose default left the set gets as default its highest remaining version that
/// sessions following the old default can use unchanged (see [`compatible`]); with none, it
/// has no default (requests must name a version) and loses its labels when no version is
/// left.
fn fix_defaults(set: &mut ModelSet, removed: &[(usize, Arc<LoadedModel>)], promote: bool) {
    for (slot, m) in removed {
        if set.defaults.get(&m.name) != Some(slot) {
            continue;
        }
        let next = promote
            .then(|| {
                set.slots
                    .iter()
                    .enumerate()
                    .filter_map(|(i, s)| Some((i, s.as_ref()?)))
                    .filter(|(_, s)| s.name == m.name && compatible(m, s))
                    .max_by_key(|(_, s)| s.version)
                    .map(|(i, _)| i)
            })
            .flatten();
        match next {
            Some(i) => {
                set.defaults.insert(m.name.clone(), i);
            }
            None => {
                set.defaults.remove(&m.name);
                if !set.slots.iter().flatten().any(|s| s.name == m.name) {
                    set.labels.remove(&m.name);
                }
            }
        }
    }
    // Labels name loaded versions only.
    for (name, labels) in set.labels.iter_mut() {
        let loaded: Vec<u32> = set
            .slots
            .iter()
            .flatten()
            .filter(|m| &m.name == name)
            .map(|m| m.version)
            .collect();
        labels.retain(|_, v| loaded.contains(v));
    }
}

fn defaults_of(set: &ModelSet) -> BTreeMap<String, u32> {
    set.defaults
        .iter()
        .filter_map(|(name, &slot)| Some((name.clone(), set.get(slot)?.version)))
        .collect()
}

fn file_checksum(path: &std::path::Path) -> Option<String> {
    repository::sha256_file(path).ok()
}
