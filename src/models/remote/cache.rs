//! The artifact cache: model files downloaded from an object store or a registry, kept by
//! SHA-256 under `<cache>/blobs/`, so that a version fetched once is not fetched again and the
//! server can start from them when the source is unreachable.
//!
//! A download goes to a temporary file in the cache, is hashed as it is written, checked
//! against the digest its source gives (when it gives one), synced and renamed into place:
//! no half-written file is ever under a blob's name. `index.json` records which source
//! artifact (its identity at the source) has which digest. Blobs are evicted, least recently
//! used first, once the cache is over its size, except those the mirror links (the versions
//! the server serves or may load).
#![forbid(unsafe_code)]

use std::collections::BTreeMap;
use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime};

use serde::{Deserialize, Serialize};
use sha2::Digest;

use crate::sync::Locked;

/// What `index.json` records of one source artifact.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct Known {
    sha256: String,
    size: u64,
}

/// Downloads in progress, by what they fetch (`name:version`): bytes so far, the size when
/// known, and when each started.
#[derive(Debug, Default)]
pub struct Downloads(Mutex<BTreeMap<String, Download>>);

/// One download in progress.
#[derive(Clone, Debug, Serialize)]
pub struct Download {
    /// Bytes written so far.
    pub bytes: u64,
    /// The file's size, when the source says.
    pub total: Option<u64>,
    /// Bytes per second since it started.
    pub bytes_per_sec: f64,
    #[serde(skip)]
    started: Option<Instant>,
}

impl Downloads {
    /// The downloads in progress now.
    pub fn now(&self) -> BTreeMap<String, Download> {
        self.0.locked().clone()
    }

    fn update(&self, what: &str, bytes: u64, total: Option<u64>) {
        let mut all = self.0.locked();
        let d = all.entry(what.to_string()).or_insert(Download {
            bytes: 0,
            total,
            bytes_per_sec: 0.0,
            started: Some(Instant::now()),
        });
        d.bytes = bytes;
        let secs = d.started.map_or(0.0, |s| s.elapsed().as_secs_f64());
        d.bytes_per_sec = if secs > 0.0 { bytes as f64 / secs } else { 0.0 };
    }

    fn done(&self, what: &str) {
        self.0.locked().remove(what);
    }
}

/// Where a download writes: the temporary file, hashed and counted as it goes, with its
/// progress logged every few seconds and shown in [`Downloads`].
pub struct Sink<'a> {
    file: std::fs::File,
    hasher: sha2::Sha256,
    bytes: u64,
    total: Option<u64>,
    what: &'a str,
    downloads: &'a Downloads,
    started: Instant,
    logged: Instant,
}

/// How often a long download's progress is logged.
const PROGRESS_EVERY: Duration = Duration::from_secs(2);

impl Write for Sink<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.file.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.bytes += n as u64;
        self.downloads.update(self.what, self.bytes, self.total);
        if self.logged.elapsed() >= PROGRESS_EVERY {
            self.logged = Instant::now();
            let secs = self.started.elapsed().as_secs_f64();
            tracing::info!(
                model = self.what,
                bytes = self.bytes,
                total = self.total,
                mb_per_sec = format!("{:.1}", self.bytes as f64 / secs / 1e6),
                "downloading"
            );
        }
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.file.flush()
    }
}

/// Why an artifact could not be put in the cache.
#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    /// The cache's files could not be written or read.
    #[error("model cache {}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// The download failed (the source's error).
    #[error("{0}")]
    Download(String),
    /// Refused for its digest before (the same artifact and digest file): not downloaded
    /// again.
    #[error("{0} (refused before: not downloaded again)")]
    Refused(String),
    /// What arrived is not what the source said it is.
    #[error("{what}: SHA-256 {got} differs from {expected}, which the source gives: refused (a corrupt or tampered artifact)")]
    Mismatch {
        /// The artifact.
        what: String,
        /// The digest of what arrived.
        got: String,
        /// The digest the source gives.
        expected: String,
    },
}

/// The cache of downloaded model files (see the module's docs).
pub struct ArtifactCache {
    blobs: PathBuf,
    index_path: PathBuf,
    max_bytes: u64,
    index: Mutex<BTreeMap<String, Known>>,
    /// Artifacts refused for their digest, by key and the digest expected: not downloaded
    /// again (a new upload or version has another key).
    refused: Mutex<BTreeMap<(String, String), String>>,
    /// Downloads in progress.
    pub downloads: Downloads,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> CacheError + '_ {
    move |source| CacheError::Io {
        path: path.into(),
        source,
    }
}

/// SHA-256 as lowercase hex.
pub fn hex(digest: &[u8]) -> String {
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

impl ArtifactCache {
    /// The cache in `dir` (a directory only this user can write, checked by the caller),
    /// holding at most `max_bytes` of blobs the mirror does not link. Temporary files an
    /// interrupted download left are removed.
    ///
    /// # Errors
    /// The directory cannot be made or read.
    pub fn open(dir: &Path, max_bytes: u64) -> Result<Self, CacheError> {
        let blobs = dir.join("blobs");
        std::fs::create_dir_all(&blobs).map_err(io(&blobs))?;
        for entry in std::fs::read_dir(&blobs).map_err(io(&blobs))? {
            let path = entry.map_err(io(&blobs))?.path();
            if path
                .file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with('.'))
            {
                tracing::info!(file = %path.display(), "model cache: an interrupted download's file removed");
                let _ = std::fs::remove_file(&path);
            }
        }
        let index_path = dir.join("index.json");
        let index = match std::fs::read(&index_path) {
            Ok(bytes) => serde_json::from_slice(&bytes).unwrap_or_else(|e| {
                tracing::warn!(file = %index_path.display(), error = %e, "model cache index unreadable: started afresh (blobs are kept and found again by digest)");
                BTreeMap::new()
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => BTreeMap::new(),
            Err(e) => return Err(io(&index_path)(e)),
        };
        Ok(Self {
            blobs,
            index_path,
            max_bytes,
            index: Mutex::new(index),
            refused: Mutex::new(BTreeMap::new()),
            downloads: Downloads::default(),
        })
    }

    /// The file of blob `sha256`.
    pub fn blob(&self, sha256: &str) -> PathBuf {
        self.blobs.join(sha256)
    }

    /// The digest of the artifact known as `key` at its source, when its blob is in the cache
    /// (its use recorded for eviction).
    pub fn lookup(&self, key: &str) -> Option<String> {
        let known = self.index.locked().get(key).cloned()?;
        let blob = self.blob(&known.sha256);
        match std::fs::metadata(&blob) {
            Ok(m) if m.len() == known.size => {
                touch(&blob);
                Some(known.sha256)
            }
            _ => None,
        }
    }

    /// Downloads the artifact known as `key` (`what` names it in the log: `name:version`)
    /// through `fill`, which writes its bytes to the sink; checked against `expected` when the
    /// source gives a digest, then made a blob. Returns its digest.
    ///
    /// # Errors
    /// [`CacheError`]: the download failed, the digest differs, or the file could not be
    /// written; nothing is left behind.
    pub fn fetch(
        &self,
        key: &str,
        what: &str,
        total: Option<u64>,
        expected: Option<&str>,
        fill: impl FnOnce(&mut Sink<'_>) -> Result<(), String>,
    ) -> Result<String, CacheError> {
        if let Some(sha) = self.lookup(key) {
            if expected.is_none_or(|e| e == sha) {
                return Ok(sha);
            }
        }
        if let Some(e) = expected {
            if let Some(why) = self.refused.locked().get(&(key.to_string(), e.to_string())) {
                return Err(CacheError::Refused(why.clone()));
            }
        }
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let tmp = self.blobs.join(format!(
            ".download-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        ));
        let result = self.download(&tmp, key, what, total, expected, fill);
        self.downloads.done(what);
        if let Err(e) = &result {
            let _ = std::fs::remove_file(&tmp);
            if let (CacheError::Mismatch { .. }, Some(expected)) = (e, expected) {
                self.refused
                    .locked()
                    .insert((key.to_string(), expected.to_string()), e.to_string());
            }
        }
        result
    }

    fn download(
        &self,
        tmp: &Path,
        key: &str,
        what: &str,
        total: Option<u64>,
        expected: Option<&str>,
        fill: impl FnOnce(&mut Sink<'_>) -> Result<(), String>,
    ) -> Result<String, CacheError> {
        use std::os::unix::fs::OpenOptionsExt;
        let file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(tmp)
            .map_err(io(tmp))?;
        let started = Instant::now();
        let mut sink = Sink {
            file,
            hasher: sha2::Sha256::new(),
            bytes: 0,
            total,
            what,
            downloads: &self.downloads,
            started,
            logged: started,
        };
        fill(&mut sink)
            .map_err(|e| CacheError::Download(format!("{what}: download cut off: {e}")))?;
        let Sink {
            file,
            hasher,
            bytes,
            ..
        } = sink;
        let sha = hex(&hasher.finalize());
        if let Some(expected) = expected {
            if !expected.eq_ignore_ascii_case(&sha) {
                return Err(CacheError::Mismatch {
                    what: what.into(),
                    got: sha,
                    expected: expected.to_ascii_lowercase(),
                });
            }
        }
        if let Some(total) = total.filter(|t| *t != bytes) {
            return Err(CacheError::Download(format!(
                "{what}: {bytes} bytes arrived, the source said {total}: refused (a cut download)"
            )));
        }
        file.sync_all().map_err(io(tmp))?;
        drop(file);
        let blob = self.blob(&sha);
        std::fs::rename(tmp, &blob).map_err(io(&blob))?;
        sync_dir(&self.blobs);
        let secs = started.elapsed().as_secs_f64();
        tracing::info!(
            model = what,
            bytes,
            sha256 = %sha,
            mb_per_sec = format!("{:.1}", bytes as f64 / secs.max(1e-9) / 1e6),
            "downloaded into the model cache"
        );
        self.remember(key, &sha, bytes);
        Ok(sha)
    }

    /// Records that `key` is blob `sha256` (written to `index.json` through a temporary file).
    pub fn remember(&self, key: &str, sha256: &str, size: u64) {
        let mut index = self.index.locked();
        index.insert(
            key.to_string(),
            Known {
                sha256: sha256.into(),
                size,
            },
        );
        let tmp = self.index_path.with_extension("json.tmp");
        let written = serde_json::to_vec_pretty(&*index)
            .map_err(std::io::Error::other)
            .and_then(|bytes| std::fs::write(&tmp, bytes))
            .and_then(|()| std::fs::rename(&tmp, &self.index_path));
        if let Err(e) = written {
            tracing::warn!(file = %self.index_path.display(), error = %e, "cannot write the model cache index");
        }
    }

    /// Removes blobs the mirror does not link (one link: the cache's own), least recently used
    /// first, while the blobs take more than the cache's size. Returns the digests removed.
    pub fn evict(&self) -> Vec<String> {
        let mut blobs: Vec<(SystemTime, u64, bool, PathBuf)> = Vec::new();
        let Ok(entries) = std::fs::read_dir(&self.blobs) else {
            return Vec::new();
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if path
                .file_name()
                .and_then(|n| n.to_str())
                .is_none_or(|n| n.starts_with('.'))
            {
                continue;
            }
            if let Ok(m) = std::fs::symlink_metadata(&path) {
                let used = m.modified().unwrap_or(SystemTime::UNIX_EPOCH);
                blobs.push((used, m.len(), m.nlink() > 1, path));
            }
        }
        let mut total: u64 = blobs.iter().map(|b| b.1).sum();
        blobs.sort();
        let mut removed = Vec::new();
        for (_, size, linked, path) in &blobs {
            if total <= self.max_bytes {
                break;
            }
            if *linked {
                continue;
            }
            if std::fs::remove_file(path).is_ok() {
                total -= size;
                let sha = path
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default();
                tracing::info!(sha256 = %sha, bytes = size, "evicted from the model cache (least recently used)");
                removed.push(sha);
            }
        }
        if total > self.max_bytes {
            tracing::warn!(
                bytes = total,
                max_bytes = self.max_bytes,
                "the model cache is over its size with versions in use only: raise model_cache.max_size_mb"
            );
        }
        if !removed.is_empty() {
            self.index
                .locked()
                .retain(|_, k| !removed.contains(&k.sha256));
        }
        removed
    }
}

/// Marks `path` used now (eviction takes the least recently used first).
fn touch(path: &Path) {
    if let Ok(f) = std::fs::File::options().append(true).open(path) {
        let _ = f.set_modified(SystemTime::now());
    }
}

/// Makes a rename in `dir` durable.
pub fn sync_dir(dir: &Path) {
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cache(max: u64) -> (PathBuf, ArtifactCache) {
        let dir = std::env::temp_dir().join(format!(
            "tie-cache-unit-{}-{}",
            std::process::id(),
            rand_suffix()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        let c = ArtifactCache::open(&dir, max).unwrap();
        (dir, c)
    }

    fn rand_suffix() -> u64 {
        static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        N.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    }

    fn fill(bytes: &'static [u8]) -> impl FnOnce(&mut Sink<'_>) -> Result<(), String> {
        move |s| s.write_all(bytes).map_err(|e| e.to_string())
    }

    #[test]
    fn a_download_becomes_a_blob_named_by_its_digest() {
        let (dir, c) = cache(1 << 20);
        let sha = c.fetch("k", "m:1", Some(5), None, fill(b"hello")).unwrap();
        assert_eq!(sha, hex(&sha2::Sha256::digest(b"hello")));
        assert_eq!(std::fs::read(c.blob(&sha)).unwrap(), b"hello");
        // Known now: not fetched again.
        let again = c
            .fetch("k", "m:1", None, None, |_| Err("fetched twice".into()))
            .unwrap();
        assert_eq!(again, sha);
        // And after a restart, through the index.
        drop(c);
        let c = ArtifactCache::open(&dir, 1 << 20).unwrap();
        assert_eq!(c.lookup("k"), Some(sha));
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_download_in_progress_is_listed_with_its_bytes_and_size() {
        let (dir, c) = cache(1 << 20);
        let downloads = &c.downloads;
        c.fetch("k", "m:7", Some(8), None, |s| {
            s.write_all(b"abcd").map_err(|e| e.to_string())?;
            let now = downloads.now();
            let d = &now["m:7"];
            assert_eq!((d.bytes, d.total), (4, Some(8)));
            s.write_all(b"efgh").map_err(|e| e.to_string())
        })
        .unwrap();
        assert!(c.downloads.now().is_empty());
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_digest_mismatch_or_a_cut_download_leaves_nothing() {
        let (dir, c) = cache(1 << 20);
        let wrong = "0".repeat(64);
        let e = c
            .fetch("k", "m:1", None, Some(&wrong), fill(b"hello"))
            .unwrap_err();
        assert!(matches!(e, CacheError::Mismatch { .. }), "{e}");
        let e = c
            .fetch("k", "m:1", Some(10), None, fill(b"hello"))
            .unwrap_err();
        assert!(e.to_string().contains("cut download"), "{e}");
        let e = c
            .fetch("k", "m:1", None, None, |_| Err("connection reset".into()))
            .unwrap_err();
        assert!(e.to_string().contains("connection reset"), "{e}");
        assert_eq!(std::fs::read_dir(dir.join("blobs")).unwrap().count(), 0);
        assert_eq!(c.lookup("k"), None);
        // The refused artifact is not fetched again.
        let e = c
            .fetch("k", "m:1", None, Some(&wrong), |_| {
                Err("fetched again".into())
            })
            .unwrap_err();
        assert!(matches!(e, CacheError::Refused(_)), "{e}");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn eviction_takes_the_least_recently_used_unlinked_blobs() {
        let (dir, c) = cache(12);
        let a = c.fetch("a", "m:1", None, None, fill(b"aaaaaa")).unwrap();
        let b = c.fetch("b", "m:2", None, None, fill(b"bbbbbb")).unwrap();
        let d = c.fetch("d", "m:3", None, None, fill(b"dddddd")).unwrap();
        let old = SystemTime::now() - Duration::from_secs(100);
        for (sha, age) in [(&a, 1), (&b, 2), (&d, 3)] {
            let f = std::fs::File::options()
                .append(true)
                .open(c.blob(sha))
                .unwrap();
            f.set_modified(old + Duration::from_secs(age)).unwrap();
        }
        // `a` is linked (in use): it stays although oldest.
        std::fs::hard_link(c.blob(&a), dir.join("linked")).unwrap();
        let removed = c.evict();
        assert_eq!(removed, vec![b.clone()]);
        assert!(c.blob(&a).exists() && c.blob(&d).exists());
        assert_eq!(c.lookup("b"), None);
        std::fs::remove_dir_all(dir).unwrap();
    }
}
