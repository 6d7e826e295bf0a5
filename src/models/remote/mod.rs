//! Models from elsewhere: a repository in object storage (`server.model_repository =
//! "s3://bucket/prefix"`) or MLflow's Model Registry (`[registry] kind = "mlflow"`), fetched
//! through a local artifact cache ([`cache`]) into a mirror ([`mirror`]): a local repository
//! that the server loads, reloads and unloads as it does any other.
//!
//! - A sync reads the source (lists the store; resolves the registry's aliases), downloads
//!   what the cache lacks, and makes the mirror hold it. The model manager syncs before every
//!   reload, so `tie reload` picks up new versions; a registry is also polled, and an alias
//!   that moved reloads its model (the new version fetched, verified, warmed and switched to;
//!   the old one drains).
//! - A sync that fails changes nothing: the mirror keeps what it held, and a reload after it
//!   fails with the source's error. A reload that fails after a sync puts the mirror back as it
//!   was, so the mirror always holds what serves: at start, a source that cannot be reached
//!   leaves the server serving the mirror (its last known good copy), and it says so.
//! - With `model_deployment.load_on_demand`, a version asked for that the mirror lacks is
//!   fetched and kept in it until unloaded ([`Remote::fetch_on_demand`]).

pub mod cache;
pub mod mirror;
pub mod mlflow;
pub mod store;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use cache::{ArtifactCache, CacheError};
use mirror::{Mirror, Wanted, WantedFile};
use mlflow::{Ask, Entry, Mlflow};
use store::StoreRepository;

use crate::config::{RegistryKind, ServiceConfig};
use crate::sync::Locked;

/// Why a remote source could not be read.
#[derive(Debug, thiserror::Error)]
pub enum RemoteError {
    /// The configuration names something tie cannot use.
    #[error("{0}")]
    Config(String),
    /// The source cannot be reached now (network, a server error): worth trying again.
    #[error("unreachable: {0}")]
    Unreachable(String),
    /// The registry refused (no such model, alias or version).
    #[error("{0}")]
    Registry(String),
    /// An artifact is unusable: a digest mismatch, no model file, two.
    #[error("{0}")]
    Artifact(String),
    /// The cache or the mirror could not be written.
    #[error("{0}")]
    Local(String),
}

impl RemoteError {
    fn from_cache(e: CacheError, source: &str) -> Self {
        match e {
            CacheError::Download(why) => RemoteError::Unreachable(format!("{source}: {why}")),
            CacheError::Mismatch { .. } | CacheError::Refused(_) => {
                RemoteError::Artifact(e.to_string())
            }
            CacheError::Io { .. } => RemoteError::Local(e.to_string()),
        }
    }
}

/// Where the models come from.
enum Source {
    Store(StoreRepository),
    Mlflow {
        client: Mlflow,
        entries: Vec<Entry>,
        /// The local repository: `<name>/config.toml` and `routing.toml` for the registry's
        /// models.
        local: PathBuf,
    },
}

/// How the server started from its source.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Started {
    /// The source was read.
    Fresh,
    /// The source could not be reached: the mirror's copy, written at that time, serves.
    FromCache {
        /// Why the source could not be read.
        why: String,
        /// When the mirror was last written from it.
        synced_at: String,
    },
}

/// A remote source, its cache and its mirror (see the module's docs).
pub struct Remote {
    source: Source,
    cache: ArtifactCache,
    mirror: Mirror,
    /// What the mirror held before the latest sync, for putting back when the reload after it
    /// fails.
    before: Mutex<Option<Wanted>>,
    /// Versions fetched on demand (kept in the mirror until unloaded).
    on_demand: Mutex<BTreeSet<(String, u32)>>,
    /// How often the registry is polled (`None`: only on reload).
    pub poll_interval: Option<Duration>,
    _lock: std::fs::File,
}

impl Remote {
    /// Whether `config` names a remote source (a registry, or an object store as the model
    /// repository), which [`Remote::open`] opens, rather than a local repository.
    #[must_use]
    pub fn configured(config: &ServiceConfig) -> bool {
        config.registry.kind.is_some()
            || store::is_store_url(&config.server.model_repository.to_string_lossy())
    }

    /// The remote source `config` names, with its cache opened: `None` for a local
    /// repository and no registry.
    ///
    /// # Errors
    /// [`RemoteError::Config`]: an unusable setting, or a cache directory that another user
    /// can write to or another server holds.
    pub fn open(config: &ServiceConfig) -> Result<Option<Self>, RemoteError> {
        let repository = config
            .server
            .model_repository
            .to_string_lossy()
            .into_owned();
        let registry = &config.registry;
        if Self::configured(config) {
            // reqwest's TLS (object stores over https) needs a crypto provider chosen before
            // its first client: ring's (aws-lc-rs, which adds post-quantum key exchange, needs
            // a C toolchain with cmake to build).
            #[allow(deprecated)]
            let _ = rustls::crypto::ring::default_provider().install_default();
        }
        let source = match (registry.kind, store::is_store_url(&repository)) {
            (Some(RegistryKind::Mlflow), true) => {
                return Err(RemoteError::Config(
                    "[registry] and an object-store model_repository together: the registry's models come from the registry, and model_repository is then a local directory of their configs".into(),
                ))
            }
            (Some(RegistryKind::Mlflow), false) => {
                let uri = registry.uri.clone().ok_or_else(|| {
                    RemoteError::Config("[registry] kind = \"mlflow\" needs uri (the tracking server, http://host:5000)".into())
                })?;
                if registry.models.is_empty() {
                    return Err(RemoteError::Config(
                        "[registry] models is empty: name the registered models to serve (\"name@alias\", \"name/3\" or \"name\" for the highest version)".into(),
                    ));
                }
                let entries = registry
                    .models
                    .iter()
                    .map(|m| m.parse::<Entry>())
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|e| RemoteError::Config(format!("[registry] models: {e}")))?;
                let token = registry
                    .token_file
                    .as_deref()
                    .map(read_token)
                    .transpose()?
                    .or_else(|| std::env::var("MLFLOW_TRACKING_TOKEN").ok());
                Source::Mlflow {
                    client: Mlflow::new(
                        &uri,
                        token,
                        Duration::from_secs(registry.timeout_sec.max(1)),
                        config.object_store.clone(),
                    ),
                    entries,
                    local: config.server.model_repository.clone(),
                }
            }
            (None, true) => Source::Store(StoreRepository::open(&repository, &config.object_store)?),
            (None, false) => {
                if !config.object_store.is_empty() {
                    tracing::warn!("[object_store] is set but model_repository is a local directory: the options are not used");
                }
                return Ok(None);
            }
        };
        let dir = &config.model_cache.dir;
        let lock = crate::host::private_dir(
            dir,
            "another tie server uses this model cache (its .lock is held): give each server a model_cache.dir of its own",
        )
        .map_err(|e| RemoteError::Config(format!("model_cache.dir {}: {e}", dir.display())))?;
        let cache =
            ArtifactCache::open(dir, config.model_cache.max_size_mb.saturating_mul(1 << 20))
                .map_err(|e| RemoteError::Local(e.to_string()))?;
        let mirror = Mirror::open(dir.join("mirror"))
            .map_err(|e| RemoteError::Local(format!("model cache mirror: {e}")))?;
        Ok(Some(Self {
            source,
            cache,
            mirror,
            before: Mutex::new(None),
            on_demand: Mutex::new(BTreeSet::new()),
            poll_interval: (registry.kind.is_some() && registry.poll_interval_sec > 0)
                .then(|| Duration::from_secs(registry.poll_interval_sec)),
            _lock: lock,
        }))
    }

    /// Whether the source is a registry (which resolves versions and aliases itself).
    pub fn is_registry(&self) -> bool {
        matches!(self.source, Source::Mlflow { .. })
    }

    /// The mirror's directory: the repository the server loads.
    pub fn mirror_dir(&self) -> &Path {
        self.mirror.dir()
    }

    /// Downloads in progress (`name:version` → bytes, size, rate).
    pub fn downloads(&self) -> BTreeMap<String, cache::Download> {
        self.cache.downloads.now()
    }

    /// What the source is, for logs and the mirror's `.source`.
    pub fn describe(&self) -> String {
        match &self.source {
            Source::Store(s) => s.url().to_string(),
            Source::Mlflow {
                client, entries, ..
            } => format!(
                "mlflow {} {}",
                client.uri(),
                entries
                    .iter()
                    .map(|e| format!("{}{}", e.name, e.ask))
                    .collect::<Vec<_>>()
                    .join(" ")
            ),
        }
    }

    /// The first sync, at start: from the source, or (when it cannot be reached) from the
    /// mirror the last run left, when it is a copy of the same source. The caller
    /// [`Remote::commit`]s once the models loaded, or [`Remote::roll_back`]s.
    ///
    /// # Errors
    /// The source cannot be read and the mirror holds no copy of it; or an artifact is
    /// unusable.
    pub fn start(&self) -> Result<Started, RemoteError> {
        match self.sync() {
            Ok(_) => Ok(Started::Fresh),
            Err(RemoteError::Unreachable(why)) => {
                let ours = self.mirror.source().as_deref() == Some(self.describe().as_str());
                if ours && !self.mirror.current().models.is_empty() {
                    let synced_at = self.mirror.synced_at().unwrap_or_default();
                    tracing::warn!(
                        source = %self.describe(),
                        error = %why,
                        synced_at = %synced_at,
                        "the model source is unreachable: serving the model cache's last known good copy"
                    );
                    Ok(Started::FromCache { why, synced_at })
                } else {
                    Err(RemoteError::Unreachable(format!(
                        "{why} (and the model cache holds no copy of {} to start from)",
                        self.describe()
                    )))
                }
            }
            Err(e) => Err(e),
        }
    }

    /// What the source holds now, fetched into the cache.
    fn wanted(&self) -> Result<Wanted, RemoteError> {
        match &self.source {
            Source::Store(s) => s.wanted(&self.cache),
            Source::Mlflow {
                client,
                entries,
                local,
            } => {
                let mut resolved: Vec<(String, u32, Option<String>)> = Vec::new();
                for e in entries {
                    let v = client.resolve(&e.name, &e.ask)?;
                    let label = match &e.ask {
                        Ask::Alias(a) => Some(a.clone()),
                        _ => None,
                    };
                    resolved.push((e.name.clone(), v, label));
                }
                for (name, v) in self.on_demand.locked().iter() {
                    resolved.push((name.clone(), *v, None));
                }
                self.registry_wanted(client, local, &resolved)
            }
        }
    }

    /// The mirror's contents for the registry's resolved versions `(name, version, alias)`;
    /// each model's default is its first entry's version, its aliases its labels.
    fn registry_wanted(
        &self,
        client: &Mlflow,
        local: &Path,
        resolved: &[(String, u32, Option<String>)],
    ) -> Result<Wanted, RemoteError> {
        let mut wanted = Wanted {
            routing: std::fs::read(local.join("routing.toml")).ok(),
            ..Wanted::default()
        };
        let mut configs: BTreeMap<String, Option<Vec<u8>>> = BTreeMap::new();
        let mut defaults: BTreeMap<String, u32> = BTreeMap::new();
        let mut labels: BTreeMap<String, BTreeMap<String, u32>> = BTreeMap::new();
        for (name, v, label) in resolved {
            let files = client.fetch(name, *v, &self.cache)?;
            let model = wanted.models.entry(name.clone()).or_default();
            model.versions.insert(
                *v,
                WantedFile {
                    file_name: files.file_name,
                    sha256: files.sha256,
                },
            );
            defaults.entry(name.clone()).or_insert(*v);
            if let Some(l) = label {
                labels
                    .entry(name.clone())
                    .or_default()
                    .insert(l.clone(), *v);
            }
            // The local repository's config wins; else the first version's own.
            let slot = configs.entry(name.clone()).or_insert(None);
            if slot.is_none() {
                *slot = files.config;
            }
        }
        for (name, model) in wanted.models.iter_mut() {
            let local_config = std::fs::read(local.join(name).join("config.toml")).ok();
            let base = local_config.or_else(|| configs.remove(name).flatten());
            model.config = Some(registry_config(
                name,
                base.as_deref(),
                defaults[name],
                labels.remove(name).unwrap_or_default(),
            )?);
        }
        Ok(wanted)
    }

    /// Reads the source and makes the mirror hold it (what it held is kept, for
    /// [`Remote::roll_back`]). Returns the models that changed and whether the routing did.
    ///
    /// # Errors
    /// [`RemoteError`]: the mirror is left as it was.
    pub fn sync(&self) -> Result<(Vec<String>, bool), RemoteError> {
        let wanted = self.wanted()?;
        let before = self.mirror.current();
        let changed = match self.mirror.apply(&wanted, &self.cache) {
            Ok(changed) => changed,
            Err(e) => {
                // Half written: put back what it held.
                if let Err(e) = self.mirror.apply(&before, &self.cache) {
                    tracing::error!(error = %e, "cannot put the model cache mirror back as it was");
                }
                return Err(RemoteError::Local(format!("model cache mirror: {e}")));
            }
        };
        *self.before.locked() = Some(before);
        if let Err(e) = self.mirror.set_source(&self.describe()) {
            tracing::warn!(error = %e, "cannot record the model cache mirror's source");
        }
        if !changed.0.is_empty() {
            tracing::info!(source = %self.describe(), models = ?changed.0, "model source read: models changed");
        }
        Ok(changed)
    }

    /// The reload after the latest sync succeeded: what the mirror holds now serves. Files
    /// no longer linked may go (not before: a roll-back needs them).
    pub fn commit(&self) {
        *self.before.locked() = None;
        self.cache.evict();
    }

    /// The reload after the latest sync failed: the mirror is put back as it was (so it holds
    /// what serves, and a restart serves that).
    pub fn roll_back(&self) {
        if let Some(before) = self.before.locked().take() {
            if let Err(e) = self.mirror.apply(&before, &self.cache) {
                tracing::error!(error = %e, "cannot put the model cache mirror back as it was");
            }
        }
    }

    /// Whether the registry's entries name other versions than the mirror serves (a version
    /// it lacks, another default, an alias on another version): a cheap check for the
    /// poller, with no download.
    ///
    /// # Errors
    /// The registry cannot be read.
    pub fn moved(&self) -> Result<bool, RemoteError> {
        let Source::Mlflow {
            client, entries, ..
        } = &self.source
        else {
            return Ok(false);
        };
        let current = self.mirror.current();
        let mut defaults: BTreeMap<&str, u32> = BTreeMap::new();
        for e in entries {
            let v = client.resolve(&e.name, &e.ask)?;
            let Some(model) = current.models.get(&e.name) else {
                return Ok(true);
            };
            let config: Option<crate::models::ModelConfig> = model
                .config
                .as_deref()
                .and_then(|c| toml::from_str(&String::from_utf8_lossy(c)).ok());
            let default = *defaults.entry(&e.name).or_insert(v);
            let labelled = match &e.ask {
                Ask::Alias(a) => config.as_ref().is_some_and(|c| c.labels.get(a) == Some(&v)),
                _ => true,
            };
            if !model.versions.contains_key(&v)
                || config.as_ref().and_then(|c| c.default_version) != Some(default)
                || !labelled
            {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// Whether `name` is a registry model the config names (only those load on demand from a
    /// registry: a request cannot pull in any model the registry holds).
    pub fn names(&self, name: &str) -> bool {
        match &self.source {
            Source::Mlflow { entries, .. } => entries.iter().any(|e| e.name == name),
            Source::Store(_) => false,
        }
    }

    /// For `load_on_demand`: version `version` (a number, `latest` or an alias) of `name` at
    /// the registry, added to the mirror (nothing else of the mirror changes) and kept there
    /// until [`Remote::drop_on_demand`]. Returns the version number; `None` when the source
    /// has no such version, or is an object store (whose every version the mirror holds since
    /// the last sync: `tie reload` reads new ones).
    ///
    /// # Errors
    /// [`RemoteError`]: the registry cannot be read, or the artifact is unusable.
    pub fn fetch_on_demand(&self, name: &str, version: &str) -> Result<Option<u32>, RemoteError> {
        let Source::Mlflow { client, local, .. } = &self.source else {
            return Ok(None);
        };
        let ask = match version {
            "latest" => Ask::Latest,
            v => match v.parse::<u32>() {
                Ok(n) => Ask::Version(n),
                Err(_) => Ask::Alias(v.to_string()),
            },
        };
        let v = match client.resolve(name, &ask) {
            Ok(v) => v,
            Err(RemoteError::Registry(why)) => {
                tracing::info!(model = name, version, reason = %why, "not loaded on demand: the registry has no such version");
                return Ok(None);
            }
            Err(e) => return Err(e),
        };
        let alias = match &ask {
            Ask::Alias(a) => Some(a.clone()),
            _ => None,
        };
        let mut wanted = self.mirror.current();
        let present = wanted
            .models
            .get(name)
            .is_some_and(|m| m.versions.contains_key(&v));
        let labelled = alias.as_ref().is_none_or(|a| {
            wanted
                .models
                .get(name)
                .and_then(|m| m.config.as_deref())
                .and_then(|c| {
                    toml::from_str::<crate::models::ModelConfig>(&String::from_utf8_lossy(c)).ok()
                })
                .is_some_and(|c| c.labels.get(a) == Some(&v))
        });
        if present && labelled {
            return Ok(Some(v));
        }
        let files = if present {
            None
        } else {
            match client.fetch(name, v, &self.cache) {
                Ok(files) => Some(files),
                Err(RemoteError::Registry(why)) => {
                    tracing::info!(model = name, version, reason = %why, "not loaded on demand: the registry has no such version");
                    return Ok(None);
                }
                Err(e) => return Err(e),
            }
        };
        let model = wanted.models.entry(name.to_string()).or_default();
        let aliases: BTreeMap<String, u32> = alias.into_iter().map(|a| (a, v)).collect();
        match &model.config {
            None => {
                // A model with no version in the mirror: its own config, this version the
                // default.
                let local_config = std::fs::read(local.join(name).join("config.toml")).ok();
                let base = local_config.or(files.as_ref().and_then(|f| f.config.clone()));
                model.config = Some(registry_config(name, base.as_deref(), v, aliases)?);
            }
            Some(config) if !aliases.is_empty() => {
                // The alias asked for names this version: a label of it.
                model.config = Some(with_labels(name, config, aliases)?);
            }
            Some(_) => {}
        }
        if let Some(files) = files {
            model.versions.insert(
                v,
                WantedFile {
                    file_name: files.file_name,
                    sha256: files.sha256,
                },
            );
        }
        self.mirror
            .apply(&wanted, &self.cache)
            .map_err(|e| RemoteError::Local(format!("model cache mirror: {e}")))?;
        if !present {
            self.on_demand.locked().insert((name.to_string(), v));
        }
        Ok(Some(v))
    }

    /// Version `version` of `name`, fetched on demand, is no longer wanted (it failed to load,
    /// or was unloaded): it leaves the mirror, unless the registry's entries name it.
    pub fn drop_on_demand(&self, name: &str, version: u32) {
        if !self.on_demand.locked().remove(&(name.to_string(), version)) {
            return;
        }
        let mut wanted = self.mirror.current();
        let named = match &self.source {
            Source::Mlflow { entries, .. } => entries.iter().any(|e| e.name == name),
            Source::Store(_) => true,
        };
        if let Some(m) = wanted.models.get_mut(name) {
            m.versions.remove(&version);
            if m.versions.is_empty() && !named {
                wanted.models.remove(name);
            }
        }
        if let Err(e) = self.mirror.apply(&wanted, &self.cache) {
            tracing::warn!(error = %e, "cannot take a version loaded on demand out of the model cache mirror");
        }
    }
}

/// A registered model's config in the mirror: `base` (the local repository's or the
/// artifact's `config.toml`, else the defaults) with the registry's choices over it: every
/// version the mirror holds loads, the first entry's is the default, aliases are labels
/// (beside the config's own).
fn registry_config(
    name: &str,
    base: Option<&[u8]>,
    default: u32,
    aliases: BTreeMap<String, u32>,
) -> Result<Vec<u8>, RemoteError> {
    let text = base
        .map(|b| String::from_utf8_lossy(b).into_owned())
        .unwrap_or_default();
    let mut table: toml::Table = text.parse().map_err(|e| {
        RemoteError::Artifact(format!("model {name}: its config.toml is not TOML: {e}"))
    })?;
    table.insert("versions".into(), toml::Value::String("all".into()));
    table.insert(
        "default_version".into(),
        toml::Value::Integer(default.into()),
    );
    let labels = table
        .entry("labels")
        .or_insert_with(|| toml::Value::Table(toml::Table::new()));
    if let toml::Value::Table(labels) = labels {
        // A config's label for a version the registry does not serve would fail the load.
        labels.retain(|_, v| v.as_integer() == Some(i64::from(default)));
        for (alias, v) in aliases {
            labels.insert(alias, toml::Value::Integer(v.into()));
        }
    }
    Ok(toml::to_string(&table)
        .map_err(|e| RemoteError::Local(e.to_string()))?
        .into_bytes())
}

/// Config `config` of model `name` with `labels` added.
fn with_labels(
    name: &str,
    config: &[u8],
    labels: BTreeMap<String, u32>,
) -> Result<Vec<u8>, RemoteError> {
    let mut table: toml::Table = String::from_utf8_lossy(config)
        .parse()
        .map_err(|e| RemoteError::Local(format!("model {name}: mirror config: {e}")))?;
    let entry = table
        .entry("labels")
        .or_insert_with(|| toml::Value::Table(toml::Table::new()));
    if let toml::Value::Table(entry) = entry {
        for (l, v) in labels {
            entry.insert(l, toml::Value::Integer(v.into()));
        }
    }
    Ok(toml::to_string(&table)
        .map_err(|e| RemoteError::Local(e.to_string()))?
        .into_bytes())
}

fn read_token(path: &Path) -> Result<String, RemoteError> {
    std::fs::read_to_string(path)
        .map(|t| t.lines().next().unwrap_or_default().trim().to_string())
        .map_err(|e| RemoteError::Config(format!("[registry] token_file {}: {e}", path.display())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_registry_config_keeps_the_base_and_sets_versions_default_and_aliases() {
        let base = b"layout = \"f4\"\nversions = { latest = 2 }\n[labels]\nstable = 1\nold = 9\n";
        let out = registry_config(
            "m",
            Some(base),
            1,
            BTreeMap::from([("champion".to_string(), 1), ("challenger".to_string(), 2)]),
        )
        .unwrap();
        let parsed: crate::models::ModelConfig =
            toml::from_str(std::str::from_utf8(&out).unwrap()).unwrap();
        assert_eq!(parsed.layout.as_deref(), Some("f4"));
        assert_eq!(parsed.versions, crate::models::VersionPolicy::All);
        assert_eq!(parsed.default_version, Some(1));
        assert_eq!(
            parsed.labels,
            BTreeMap::from([
                ("champion".to_string(), 1),
                ("challenger".to_string(), 2),
                ("stable".to_string(), 1)
            ])
        );
        assert!(registry_config("m", Some(b"not = [toml"), 1, BTreeMap::new()).is_err());
    }
}
