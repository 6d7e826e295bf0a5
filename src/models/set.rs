//! The versions served: [`ModelSet`], one immutable snapshot (slots of loaded versions, each
//! model's default and labels), and [`Models`], which holds the current snapshot and publishes
//! the next (see [`super::manager`] for how the set changes).
#![forbid(unsafe_code)]

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use super::loaded::LoadedModel;
use crate::monitor::{ModelEntry, Monitor};
use crate::sync::RwLocked;

/// Whether a session set up for `old` (its layout, feature count, output count, non-finite
/// rule, uncertainty column) can be served by `new` unchanged.
pub fn compatible(old: &LoadedModel, new: &LoadedModel) -> bool {
    old.layout_hash == new.layout_hash
        && old.input_width() == new.input_width()
        && old.output_width() == new.output_width()
        && old.layout.allow_non_finite == new.layout.allow_non_finite
        && old.config.uncertainty_output == new.config.uncertainty_output
}

/// What [`compatible`] compares, for messages.
pub(super) fn describe(m: &LoadedModel) -> String {
    format!(
        "layout {:?}, {} in, {} out, non-finite {}, uncertainty column {:?}",
        m.layout.name,
        m.input_width(),
        m.output_width(),
        if m.layout.allow_non_finite {
            "allowed"
        } else {
            "refused"
        },
        m.config.uncertainty_output
    )
}

/// One snapshot of the versions served.
#[derive(Clone, Debug, Default)]
pub struct ModelSet {
    /// By slot; `None`: unloaded.
    pub(super) slots: Vec<Option<Arc<LoadedModel>>>,
    /// Per model name: the slot of its default version.
    pub(super) defaults: BTreeMap<String, usize>,
    /// Per model name: its labels (`stable` → version).
    pub(super) labels: BTreeMap<String, BTreeMap<String, u32>>,
}

impl ModelSet {
    /// The model in `slot`, when loaded.
    pub fn get(&self, slot: usize) -> Option<&Arc<LoadedModel>> {
        self.slots.get(slot).and_then(Option::as_ref)
    }

    /// Number of slots ever used (loaded or not).
    pub fn slots(&self) -> usize {
        self.slots.len()
    }

    /// The loaded models with their slots, by name then version.
    pub fn loaded(&self) -> Vec<(usize, &Arc<LoadedModel>)> {
        let mut all: Vec<(usize, &Arc<LoadedModel>)> = self
            .slots
            .iter()
            .enumerate()
            .filter_map(|(i, m)| Some((i, m.as_ref()?)))
            .collect();
        all.sort_by(|a, b| (&a.1.name, a.1.version).cmp(&(&b.1.name, b.1.version)));
        all
    }

    /// The loaded versions of model `name`, lowest first.
    pub fn versions_of(&self, name: &str) -> Vec<&Arc<LoadedModel>> {
        self.loaded()
            .into_iter()
            .filter(|(_, m)| m.name == name)
            .map(|(_, m)| m)
            .collect()
    }

    /// Whether nothing is loaded.
    pub fn is_empty(&self) -> bool {
        self.slots.iter().all(Option::is_none)
    }

    /// The slot of `name`'s `version`, or of its default when `version` is `None`.
    pub fn resolve(&self, name: &str, version: Option<u32>) -> Option<usize> {
        match version {
            None => self.defaults.get(name).copied(),
            Some(v) => self
                .slots
                .iter()
                .position(|m| m.as_ref().is_some_and(|m| m.name == name && m.version == v)),
        }
    }

    /// The highest version of `name` loaded.
    pub fn highest(&self, name: &str) -> Option<u32> {
        self.slots
            .iter()
            .flatten()
            .filter(|m| m.name == name)
            .map(|m| m.version)
            .max()
    }

    /// The version a request's `model_version` names: a number, `latest` (the highest
    /// loaded; see [`Models::latest`] for the repository's), or one of the model's labels.
    pub fn version_named(&self, name: &str, version: &str) -> Option<u32> {
        if version == LATEST {
            return self.highest(name);
        }
        version.parse::<u32>().ok().or_else(|| {
            self.labels
                .get(name)
                .and_then(|labels| labels.get(version))
                .copied()
        })
    }

    /// The slot of a `name:version` key (the version may be a label).
    pub fn by_key(&self, key: &str) -> Option<usize> {
        let (name, version) = key.rsplit_once(':')?;
        self.resolve(name, Some(self.version_named(name, version)?))
    }

    /// Whether `slot` is its model's default version.
    pub fn is_default(&self, slot: usize) -> bool {
        self.get(slot)
            .is_some_and(|m| self.defaults.get(&m.name) == Some(&slot))
    }

    /// The labels of model `name`.
    pub fn labels(&self, name: &str) -> BTreeMap<String, u32> {
        self.labels.get(name).cloned().unwrap_or_default()
    }

    /// The labels of model `name` that name `version`.
    pub fn labels_of(&self, name: &str, version: u32) -> Vec<String> {
        self.labels.get(name).map_or_else(Vec::new, |labels| {
            labels
                .iter()
                .filter(|(_, v)| **v == version)
                .map(|(l, _)| l.clone())
                .collect()
        })
    }

    /// Keys of every loaded version.
    pub fn keys(&self) -> Vec<String> {
        self.loaded().into_iter().map(|(_, m)| m.key()).collect()
    }
}

/// The version name that stands for a model's highest version (HTTP, CLI; the hello's
/// [`tie_layouts::hello::VERSION_LATEST`]).
pub const LATEST: &str = "latest";

/// The highest version of a model the repository holds, when versions not loaded count
/// (`load_on_demand`).
pub(super) type LatestHook = Box<dyn Fn(&str) -> Option<u32> + Send + Sync>;

/// What the listener is told of a model (and version; `None`: its default) it cannot find.
pub(super) type MissingHook = Box<dyn Fn(&str, Option<&str>) -> Option<Missing> + Send + Sync>;

/// A model a session asked for that is not loaded now, but was unloaded for going unused.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Missing {
    /// It is loading again: retry shortly (the message says so).
    Loading(String),
    /// Loading it again failed a moment ago (the message says why): not worth retrying now.
    Failed(String),
}

/// The versions served, as they change (see the module's docs).
pub struct Models {
    pub(super) set: RwLock<Arc<ModelSet>>,
    pub(super) generation: AtomicU64,
    pub(super) monitor: Arc<Monitor>,
    pub(super) missing: std::sync::OnceLock<MissingHook>,
    pub(super) latest: std::sync::OnceLock<LatestHook>,
}

impl std::fmt::Debug for Models {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Models")
            .field("generation", &self.generation())
            .finish_non_exhaustive()
    }
}

impl Models {
    /// A set of `models`, each model's default being the version loaded as its default (else
    /// its highest). Their slots are their positions; each gets an entry in `monitor`.
    pub fn new(models: Vec<LoadedModel>, monitor: Arc<Monitor>) -> Self {
        let this = Self {
            set: RwLock::new(Arc::new(ModelSet::default())),
            generation: AtomicU64::new(0),
            monitor,
            missing: std::sync::OnceLock::new(),
            latest: std::sync::OnceLock::new(),
        };
        let mut set = ModelSet::default();
        for m in models {
            let is_default = m.is_default;
            let name = m.name.clone();
            let labels = m.config.labels.clone();
            let slot = this.add_slot(&mut set, m);
            if is_default {
                set.defaults.insert(name.clone(), slot);
            }
            set.labels.insert(name, labels);
        }
        // A model whose configured default was refused (out of memory): its highest version.
        let loaded: Vec<(usize, String, u32)> = set
            .loaded()
            .into_iter()
            .map(|(i, m)| (i, m.name.clone(), m.version))
            .collect();
        for (slot, name, _) in loaded.iter().rev() {
            set.defaults.entry(name.clone()).or_insert(*slot);
        }
        for (name, labels) in set.labels.iter_mut() {
            labels.retain(|_, v| loaded.iter().any(|(_, n, lv)| n == name && lv == v));
        }
        *this.set.write_locked() = Arc::new(set);
        this
    }

    /// The monitor of the models' figures.
    pub fn monitor(&self) -> &Arc<Monitor> {
        &self.monitor
    }

    /// The current set.
    pub fn snapshot(&self) -> Arc<ModelSet> {
        self.set.read_locked().clone()
    }

    /// A session asked for model `name` (`version`; `None`: its default), which is not loaded:
    /// when it was unloaded for going unused, it starts loading again and the answer says so.
    pub fn missing(&self, name: &str, version: Option<&str>) -> Option<Missing> {
        self.missing.get().and_then(|hook| hook(name, version))
    }

    /// The version `latest` names for model `name`: the highest the repository holds when
    /// versions not loaded can load on demand, else the highest loaded.
    pub fn latest(&self, name: &str) -> Option<u32> {
        self.latest
            .get()
            .and_then(|hook| hook(name))
            .or_else(|| self.snapshot().highest(name))
    }

    /// Bumped by every change (pollers compare it between rounds).
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// Puts `model` in the next slot of `set`, with its monitor entry.
    pub(super) fn add_slot(&self, set: &mut ModelSet, mut model: LoadedModel) -> usize {
        model.monitor_index = self.monitor.add(ModelEntry {
            key: model.key(),
            device_memory_bytes: model.backend.info().device_memory_bytes,
            pci_bus_ids: model.backend.info().pci_bus_ids.clone(),
        });
        set.slots.push(Some(Arc::new(model)));
        set.slots.len() - 1
    }

    /// Applies `change` to a copy of the current set and publishes it.
    pub(super) fn publish<R>(&self, change: impl FnOnce(&Self, &mut ModelSet) -> R) -> R {
        let mut guard = self.set.write_locked();
        let mut next = ModelSet::clone(&guard);
        let r = change(self, &mut next);
        *guard = Arc::new(next);
        // Bumped under the write lock: whoever reads a generation and then a snapshot sees a
        // set at least that new (a poller adopting a session relies on it).
        self.generation.fetch_add(1, Ordering::AcqRel);
        r
    }
}
