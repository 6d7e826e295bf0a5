//! Interval logs: one `.hlog` per model in `[monitoring] hlog_dir`.
#![forbid(unsafe_code)]

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use super::*;

/// Interval logs: one `.hlog` per model key, one tagged histogram per stage and interval. A
/// model loaded again (after an unload) goes on in the same file.
pub struct HlogFiles {
    pub(super) dir: PathBuf,
    pub(super) files: BTreeMap<String, std::io::BufWriter<std::fs::File>>,
    pub(super) base: SystemTime,
}

impl HlogFiles {
    /// Creates `<dir>/<name>.v<version>.hlog` for each model (keys `name:version`), with the
    /// standard header.
    ///
    /// # Errors
    /// The directory or a file cannot be created.
    pub fn create(dir: &std::path::Path, keys: &[String]) -> std::io::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let mut files = Self {
            dir: dir.into(),
            files: BTreeMap::new(),
            base: SystemTime::now(),
        };
        for key in keys {
            files.open(key)?;
        }
        Ok(files)
    }

    /// The file of `key`, created with its header the first time.
    pub(super) fn open(
        &mut self,
        key: &str,
    ) -> std::io::Result<&mut std::io::BufWriter<std::fs::File>> {
        use std::collections::btree_map::Entry;
        use std::io::Write;
        match self.files.entry(key.to_string()) {
            Entry::Occupied(f) => Ok(f.into_mut()),
            Entry::Vacant(slot) => {
                let path = hlog_path(&self.dir, key);
                let mut f = std::io::BufWriter::new(std::fs::File::create(&path)?);
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
                Ok(slot.insert(f))
            }
        }
    }

    /// Appends model `key`'s interval that ended now and lasted `length`: one line per stage
    /// that recorded something.
    ///
    /// # Errors
    /// Writing failed.
    pub fn write(&mut self, key: &str, sample: &Sample, length: Duration) -> std::io::Result<()> {
        use std::io::Write;
        let end = SystemTime::now()
            .duration_since(self.base)
            .unwrap_or_default();
        let start = end.saturating_sub(length);
        let f = self.open(key)?;
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
}

/// The `.hlog` file of model `key` in `dir`.
pub fn hlog_path(dir: &std::path::Path, key: &str) -> PathBuf {
    dir.join(format!("{}.hlog", key.replace(':', ".v")))
}
