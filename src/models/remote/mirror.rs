//! The mirror: a local repository (`<name>/<version>/model.onnx`, `<name>/config.toml`,
//! `routing.toml`) written from what a remote source holds, which the server loads and reloads
//! as it does any repository. Each model file is a hard link to its blob in the cache, with a
//! `.sha256` beside it that loading checks; files are replaced by rename, never rewritten in
//! place. The mirror is also the last known good copy: a server whose source is unreachable at
//! start serves what it holds.
#![forbid(unsafe_code)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use super::cache::{sync_dir, ArtifactCache};
use crate::models::repository::MODEL_FILES;

/// One model file wanted in the mirror.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WantedFile {
    /// Its name in the version directory (one of [`MODEL_FILES`]).
    pub file_name: &'static str,
    /// Its blob.
    pub sha256: String,
}

/// One model wanted in the mirror.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct WantedModel {
    /// Its `config.toml`, if any.
    pub config: Option<Vec<u8>>,
    /// Its versions.
    pub versions: BTreeMap<u32, WantedFile>,
}

/// What the mirror should hold.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Wanted {
    /// The models by name.
    pub models: BTreeMap<String, WantedModel>,
    /// `routing.toml`, if any.
    pub routing: Option<Vec<u8>>,
}

/// The mirror directory (see the module's docs).
pub struct Mirror {
    dir: PathBuf,
}

/// Writes `bytes` to `path` through a temporary file and a rename, unless it holds them.
/// Returns whether it changed.
fn put(path: &Path, bytes: &[u8]) -> std::io::Result<bool> {
    if std::fs::read(path).is_ok_and(|b| b == bytes) {
        return Ok(false);
    }
    let tmp = hidden(path);
    std::fs::write(&tmp, bytes)?;
    std::fs::rename(&tmp, path)?;
    Ok(true)
}

/// A temporary name beside `path` that the repository's readers skip (a dot file).
fn hidden(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    path.with_file_name(format!(".{name}.tmp"))
}

/// Removes `path` (a file), if there.
fn remove(path: &Path) -> std::io::Result<bool> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(e),
    }
}

impl Mirror {
    /// The mirror in `dir` (made if absent).
    ///
    /// # Errors
    /// It cannot be made.
    pub fn open(dir: PathBuf) -> std::io::Result<Self> {
        std::fs::create_dir_all(&dir)?;
        Ok(Self { dir })
    }

    /// Its directory: the repository the server loads.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The source whose copy the mirror holds (`.source`), if any.
    pub fn source(&self) -> Option<String> {
        std::fs::read_to_string(self.dir.join(".source")).ok()
    }

    /// Records the source whose copy the mirror holds, and when it was last read.
    pub fn set_source(&self, source: &str) -> std::io::Result<()> {
        put(&self.dir.join(".source"), source.as_bytes())?;
        put(
            &self.dir.join(".synced"),
            chrono::Utc::now().to_rfc3339().as_bytes(),
        )?;
        Ok(())
    }

    /// When the mirror was last written from its source (RFC 3339), if ever.
    pub fn synced_at(&self) -> Option<String> {
        std::fs::read_to_string(self.dir.join(".synced")).ok()
    }

    /// What the mirror holds now, read back.
    pub fn current(&self) -> Wanted {
        let mut wanted = Wanted {
            routing: std::fs::read(self.dir.join("routing.toml")).ok(),
            ..Wanted::default()
        };
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return wanted;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
                continue;
            };
            if name.starts_with('.') || !path.is_dir() {
                continue;
            }
            let mut model = WantedModel {
                config: std::fs::read(path.join("config.toml")).ok(),
                ..WantedModel::default()
            };
            for v in std::fs::read_dir(&path).into_iter().flatten().flatten() {
                let Some(version) = v.file_name().to_str().and_then(|n| n.parse::<u32>().ok())
                else {
                    continue;
                };
                for file_name in MODEL_FILES {
                    let sum = v.path().join(format!("{file_name}.sha256"));
                    if let (true, Ok(sha)) = (
                        v.path().join(file_name).is_file(),
                        std::fs::read_to_string(sum),
                    ) {
                        model.versions.insert(
                            version,
                            WantedFile {
                                file_name,
                                sha256: sha.trim().to_string(),
                            },
                        );
                    }
                }
            }
            wanted.models.insert(name.to_string(), model);
        }
        wanted
    }

    /// Makes the mirror hold `wanted`, its model files linked from `cache`. Returns the models
    /// that changed (added, removed, a version or the config changed) and whether
    /// `routing.toml` did.
    ///
    /// # Errors
    /// A file could not be written (what was written stays: the next apply finishes it).
    pub fn apply(
        &self,
        wanted: &Wanted,
        cache: &ArtifactCache,
    ) -> std::io::Result<(Vec<String>, bool)> {
        let current = self.current();
        let mut changed = Vec::new();
        for (name, model) in &wanted.models {
            if current.models.get(name) == Some(model) {
                continue;
            }
            self.write_model(name, model, cache)?;
            changed.push(name.clone());
        }
        for name in current.models.keys() {
            if !wanted.models.contains_key(name) {
                std::fs::remove_dir_all(self.dir.join(name))?;
                changed.push(name.clone());
            }
        }
        let routing = self.dir.join("routing.toml");
        let routing_changed = match &wanted.routing {
            Some(bytes) => put(&routing, bytes)?,
            None => remove(&routing)?,
        };
        sync_dir(&self.dir);
        Ok((changed, routing_changed))
    }

    fn write_model(
        &self,
        name: &str,
        model: &WantedModel,
        cache: &ArtifactCache,
    ) -> std::io::Result<()> {
        let dir = self.dir.join(name);
        std::fs::create_dir_all(&dir)?;
        for (version, file) in &model.versions {
            let vdir = dir.join(version.to_string());
            std::fs::create_dir_all(&vdir)?;
            let target = vdir.join(file.file_name);
            let sum = vdir.join(format!("{}.sha256", file.file_name));
            let same = std::fs::read_to_string(&sum).is_ok_and(|s| s.trim() == file.sha256)
                && target.is_file();
            if !same {
                // The file first, then its digest: a load between the two refuses the version
                // (a digest mismatch), never loads a file under another's digest.
                let tmp = hidden(&target);
                let _ = remove(&tmp);
                let blob = cache.blob(&file.sha256);
                if std::fs::hard_link(&blob, &tmp).is_err() {
                    // Another file system: a copy.
                    std::fs::copy(&blob, &tmp)?;
                }
                std::fs::rename(&tmp, &target)?;
                put(&sum, format!("{}\n", file.sha256).as_bytes())?;
            }
            for other in MODEL_FILES.iter().filter(|f| **f != file.file_name) {
                remove(&vdir.join(other))?;
                remove(&vdir.join(format!("{other}.sha256")))?;
            }
            sync_dir(&vdir);
        }
        for entry in std::fs::read_dir(&dir)?.flatten() {
            let stale = entry
                .file_name()
                .to_str()
                .and_then(|n| n.parse::<u32>().ok())
                .is_some_and(|v| !model.versions.contains_key(&v));
            if stale {
                std::fs::remove_dir_all(entry.path())?;
            }
        }
        let config = dir.join("config.toml");
        match &model.config {
            Some(bytes) => {
                put(&config, bytes)?;
            }
            None => {
                remove(&config)?;
            }
        }
        sync_dir(&dir);
        Ok(())
    }
}
