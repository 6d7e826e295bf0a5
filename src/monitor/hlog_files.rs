//! Interval logs: one `.hlog` per model in `[monitoring] hlog_dir`.
#![forbid(unsafe_code)]

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use super::*;

/// How long after a file could not be opened or written it is tried again.
pub const HLOG_RETRY: Duration = Duration::from_secs(60);

/// Interval logs: one `.hlog` per model key, one tagged histogram per stage and interval. A
/// model loaded again (after an unload) goes on in the same file. A file that cannot be opened
/// or written is logged and tried again after [`HLOG_RETRY`]; the other models' go on.
pub struct HlogFiles {
    pub(super) dir: PathBuf,
    pub(super) files: BTreeMap<String, std::io::BufWriter<std::fs::File>>,
    pub(super) base: SystemTime,
    /// When each failing file last failed.
    failed: BTreeMap<String, std::time::Instant>,
    /// Files written to before (opened again after a failure, they are appended to).
    started: std::collections::BTreeSet<String>,
}

impl HlogFiles {
    /// Creates `dir` and `<dir>/<name>.v<version>.hlog` for each model (keys `name:version`),
    /// with the standard header; a file that cannot be created is logged and tried again
    /// later.
    ///
    /// # Errors
    /// The directory cannot be created.
    pub fn create(dir: &std::path::Path, keys: &[String]) -> std::io::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let mut files = Self {
            dir: dir.into(),
            files: BTreeMap::new(),
            base: SystemTime::now(),
            failed: BTreeMap::new(),
            started: Default::default(),
        };
        for key in keys {
            files.file(key);
        }
        Ok(files)
    }

    /// The file of `key`, opened (and its header written) the first time; `None` while it
    /// cannot be (logged once per attempt, attempts [`HLOG_RETRY`] apart).
    fn file(&mut self, key: &str) -> Option<&mut std::io::BufWriter<std::fs::File>> {
        if !self.files.contains_key(key) {
            if self
                .failed
                .get(key)
                .is_some_and(|t| t.elapsed() < HLOG_RETRY)
            {
                return None;
            }
            let again = self.started.contains(key);
            match self.open(key, again) {
                Ok(f) => {
                    self.started.insert(key.to_string());
                    self.failed.remove(key);
                    self.files.insert(key.to_string(), f);
                }
                Err(e) => {
                    self.failed(key, &e);
                    return None;
                }
            }
        }
        self.files.get_mut(key)
    }

    fn failed(&mut self, key: &str, e: &std::io::Error) {
        tracing::error!(
            file = %hlog_path(&self.dir, key).display(),
            error = %e,
            retry_s = HLOG_RETRY.as_secs(),
            "cannot write this model's interval log; the others go on"
        );
        self.files.remove(key);
        self.failed
            .insert(key.to_string(), std::time::Instant::now());
    }

    /// Opens `key`'s file: never through a symlink, never a FIFO or device (non-blocking
    /// open, then a regular file with one link is required), mode 0640, and only if it is
    /// this user's own. The first time it is truncated and given its header; `again` (after
    /// a failure) appends to what is there.
    pub(super) fn open(
        &self,
        key: &str,
        again: bool,
    ) -> std::io::Result<std::io::BufWriter<std::fs::File>> {
        use std::io::Write;
        use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
        let path = hlog_path(&self.dir, key);
        let flags = rustix::fs::OFlags::NOFOLLOW | rustix::fs::OFlags::NONBLOCK;
        let file = std::fs::OpenOptions::new()
            .write(true)
            .append(again)
            .create(true)
            .truncate(false)
            .mode(0o640)
            .custom_flags(flags.bits() as i32)
            .open(&path)?;
        let meta = file.metadata()?;
        let own = rustix::process::geteuid().as_raw();
        let refuse = |why: String| {
            Err(std::io::Error::new(
                std::io::ErrorKind::PermissionDenied,
                why,
            ))
        };
        if !meta.is_file() || meta.nlink() != 1 {
            return refuse(format!(
                "not a regular file with one link ({} links)",
                meta.nlink()
            ));
        }
        if meta.uid() != own {
            return refuse(format!(
                "the file belongs to uid {}, not to this server's uid {own}",
                meta.uid()
            ));
        }
        let mut f = std::io::BufWriter::new(file);
        if again {
            return Ok(f);
        }
        f.get_ref().set_len(0)?;
        let secs = self
            .base
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs_f64();
        let comment = format!(
            "Logged by tie {} for model {key}; values in nanoseconds",
            env!("CARGO_PKG_VERSION")
        );
        tie_hlog::write_hlog_header(&mut f, &comment, secs)?;
        f.flush()?;
        Ok(f)
    }

    /// Appends model `key`'s interval that ended now and lasted `length`: one line per stage
    /// that recorded something. A file that cannot be opened or written is logged and tried
    /// again after [`HLOG_RETRY`] (this interval of it is lost).
    pub fn write(&mut self, key: &str, sample: &Sample, length: Duration) {
        let end = SystemTime::now()
            .duration_since(self.base)
            .unwrap_or_default();
        let start = end.saturating_sub(length);
        let Some(f) = self.file(key) else {
            return;
        };
        if let Err(e) = write_interval(f, sample, start, length) {
            self.failed(key, &e);
        }
    }
}

/// Writes one line per stage that recorded something, and flushes.
fn write_interval(
    f: &mut std::io::BufWriter<std::fs::File>,
    sample: &Sample,
    start: Duration,
    length: Duration,
) -> std::io::Result<()> {
    use std::io::Write;
    for stage in Stage::ALL {
        let h = &sample.hist[stage as usize];
        if h.is_empty() {
            continue;
        }
        tie_hlog::write_hlog_interval(
            f,
            stage.name(),
            start.as_secs_f64(),
            length.as_secs_f64(),
            h,
        )?;
    }
    f.flush()
}

/// The `.hlog` file of model `key` in `dir`.
pub fn hlog_path(dir: &std::path::Path, key: &str) -> PathBuf {
    dir.join(format!("{}.hlog", key.replace(':', ".v")))
}
