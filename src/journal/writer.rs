//! The journal's writer thread: chunks to Parquet row groups, files rotated by size and age,
//! published by rename, old files deleted by age and total size.
//!
//! The file's schema ([`schema`]), one row per answer:
//!
//! | column | type | |
//! |---|---|---|
//! | `time` | timestamp (ns, UTC) | when the answer was ready |
//! | `model`, `version` | string, uint32 | the version that answered |
//! | `request_id` | uint64 | the client's id |
//! | `session_id`, `pid`, `process` | uint64, uint32, string | who sent it |
//! | `source` | string | `ring`, or `http` for the control plane's own sessions |
//! | `engine` | string | the engine that ran its batch |
//! | `priority` | string | `low`, `normal`, `high`, `critical` |
//! | `status` | string | `Ok`, `Timeout`, `QueueFull`, ... (the ABI's names) |
//! | `sent_time` | timestamp (ns, UTC) | the client's send stamp (null if it sent none) |
//! | `read_time` | timestamp (ns, UTC) | when the server read it: the start of the poller's round that read it (the clock is read once a round, so it may precede `sent_time` by up to a round) |
//! | `features`, `outputs` | list of float32 | null when not kept (`journal_features = false`) or when it did not run |
//! | `confidence` | float32 | null when it did not run |

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use arrow_array::builder::{
    Float32Builder, ListBuilder, TimestampNanosecondBuilder, UInt32Builder, UInt64Builder,
};
use arrow_array::types::UInt16Type;
use arrow_array::{ArrayRef, RecordBatch};
use arrow_schema::{DataType, Field, Schema, SchemaRef, TimeUnit};
use parquet::arrow::ArrowWriter;
use parquet::basic::Compression;
use parquet::file::metadata::KeyValue;
use parquet::file::properties::WriterProperties;
use tie_layouts::abi::Status;

use super::{Chunk, Journal};

/// Rows per Parquet row group at most.
const ROW_GROUP_ROWS: usize = 65_536;

/// How long the writer sleeps when nothing is queued.
const IDLE_SLEEP: Duration = Duration::from_millis(2);

/// Closed files' names: `journal-<UTC time of the first row>-<n>.parquet`.
pub const FILE_PREFIX: &str = "journal-";
/// Closed files' extension.
pub const FILE_SUFFIX: &str = ".parquet";

/// Footer keys: the first and last answer's time (RFC 3339, UTC) and the models in the file.
pub const META_FIRST: &str = "tie.journal.first";
/// See [`META_FIRST`].
pub const META_LAST: &str = "tie.journal.last";
/// See [`META_FIRST`].
pub const META_MODELS: &str = "tie.journal.models";

/// How the files are written: Snappy; dictionary encoding for the string columns only (the
/// floats and stamps rarely repeat, and hashing each costs more than it saves). The feature and
/// output lists, most of a row, are stored uncompressed and without page statistics: on
/// market data Snappy saves about a sixth of their bytes for a third of the writer's time, and
/// a list's minimum and maximum select nothing (BENCHMARKS.md, the journal writer).
pub fn properties() -> WriterProperties {
    use parquet::file::properties::EnabledStatistics;
    use parquet::schema::types::ColumnPath;
    let mut b = WriterProperties::builder()
        .set_compression(Compression::SNAPPY)
        .set_max_row_group_row_count(Some(ROW_GROUP_ROWS))
        .set_dictionary_enabled(false)
        .set_created_by(format!("tie {}", env!("CARGO_PKG_VERSION")));
    for column in ["model", "process", "source", "engine", "priority", "status"] {
        b = b.set_column_dictionary_enabled(column.into(), true);
    }
    for list in ["features", "outputs"] {
        let values = ColumnPath::new(vec![list.into(), "list".into(), "item".into()]);
        b = b
            .set_column_compression(values.clone(), Compression::UNCOMPRESSED)
            .set_column_statistics_enabled(values, EnabledStatistics::None);
    }
    b.build()
}

/// The files' Arrow schema.
pub fn schema() -> SchemaRef {
    let ts = || DataType::Timestamp(TimeUnit::Nanosecond, Some("UTC".into()));
    let string = || DataType::Dictionary(Box::new(DataType::UInt16), Box::new(DataType::Utf8));
    let floats = || DataType::List(Arc::new(Field::new("item", DataType::Float32, true)));
    Arc::new(Schema::new(vec![
        Field::new("time", ts(), false),
        Field::new("model", string(), false),
        Field::new("version", DataType::UInt32, false),
        Field::new("request_id", DataType::UInt64, false),
        Field::new("session_id", DataType::UInt64, false),
        Field::new("pid", DataType::UInt32, false),
        Field::new("process", string(), false),
        Field::new("source", string(), false),
        Field::new("engine", string(), false),
        Field::new("priority", string(), false),
        Field::new("status", string(), false),
        Field::new("sent_time", ts(), true),
        Field::new("read_time", ts(), false),
        Field::new("features", floats(), true),
        Field::new("outputs", floats(), true),
        Field::new("confidence", DataType::Float32, true),
    ]))
}

/// Priorities' names in the journal, by value.
pub(crate) const PRIORITIES: [&str; 4] = ["low", "normal", "high", "critical"];

/// The status codes the ABI names (`Status::name`), in the order of the journal's status
/// dictionary; any other code is written `Unknown`, the dictionary's last value.
const STATUS_CODES: [u32; 12] = [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 100];

/// A status code's key in the journal's status dictionary.
fn status_key(code: u32) -> u16 {
    STATUS_CODES
        .iter()
        .position(|&c| c == code)
        .unwrap_or(STATUS_CODES.len()) as u16
}

/// The chunk's rows as a record batch of [`schema`].
pub fn to_batch(c: &Chunk, schema: &SchemaRef) -> RecordBatch {
    let n = c.len();
    let ts = |values: &mut dyn Iterator<Item = Option<i64>>| {
        let mut b = TimestampNanosecondBuilder::with_capacity(n).with_timezone("UTC");
        for v in values {
            b.append_option(v);
        }
        Arc::new(b.finish()) as ArrayRef
    };
    // Strings as dictionaries: each row a key into the chunk's few values.
    fn strings(values: &[&str], keys: impl Iterator<Item = u16>) -> ArrayRef {
        let keys = arrow_array::UInt16Array::from_iter_values(keys);
        let values = Arc::new(arrow_array::StringArray::from_iter_values(values));
        Arc::new(
            arrow_array::DictionaryArray::<UInt16Type>::try_new(keys, values)
                .expect("every key indexes a value"),
        )
    }
    let session = |i: usize| &c.sessions[c.session[i] as usize];
    let processes: Vec<&str> = c.sessions.iter().map(|s| &*s.process).collect();
    let sources: Vec<&str> = c.sessions.iter().map(|s| s.source).collect();
    let statuses: Vec<&str> = STATUS_CODES
        .iter()
        .map(|&code| Status(code).name().unwrap_or("Unknown"))
        .chain(["Unknown"])
        .collect();
    let mut version = UInt32Builder::with_capacity(n);
    let mut request_id = UInt64Builder::with_capacity(n);
    let mut session_id = UInt64Builder::with_capacity(n);
    let mut pid = UInt32Builder::with_capacity(n);
    for i in 0..n {
        version.append_value(c.version);
        request_id.append_value(c.request_id[i]);
        session_id.append_value(session(i).id);
        pid.append_value(session(i).pid);
    }
    let list = |has: &[bool], values: &[f32], width: usize| {
        let mut b = ListBuilder::with_capacity(Float32Builder::with_capacity(values.len()), n);
        let mut at = 0;
        for &h in has {
            if h {
                b.values().append_slice(&values[at..at + width]);
                at += width;
                b.append(true);
            } else {
                b.append_null();
            }
        }
        Arc::new(b.finish()) as ArrayRef
    };
    let mut confidence = Float32Builder::with_capacity(n);
    let mut ran = 0;
    for &h in &c.has_outputs {
        if h {
            confidence.append_value(c.confidence[ran]);
            ran += 1;
        } else {
            confidence.append_null();
        }
    }
    let columns: Vec<ArrayRef> = vec![
        ts(&mut c.answered_ns.iter().map(|&t| Some(c.wall_ns(t)))),
        strings(&[&c.model], std::iter::repeat_n(0, n)),
        Arc::new(version.finish()),
        Arc::new(request_id.finish()),
        Arc::new(session_id.finish()),
        Arc::new(pid.finish()),
        strings(&processes, c.session.iter().map(|&s| s as u16)),
        strings(&sources, c.session.iter().map(|&s| s as u16)),
        strings(&c.engines, c.engine.iter().map(|&e| u16::from(e))),
        strings(&PRIORITIES, c.priority.iter().map(|&p| u16::from(p.min(3)))),
        strings(&statuses, c.status.iter().map(|&s| status_key(s))),
        ts(&mut c.sent_ns.iter().map(|&t| (t != 0).then(|| c.wall_ns(t)))),
        ts(&mut c.read_ns.iter().map(|&t| Some(c.wall_ns(t)))),
        list(&c.has_features, &c.features, c.input_width),
        list(&c.has_outputs, &c.outputs, c.output_width),
        Arc::new(confidence.finish()),
    ];
    RecordBatch::try_new(schema.clone(), columns).expect("columns match the schema")
}

/// Makes the journal's directory (owner-only when made here), checks that only this user can
/// write there, takes its lock (`.lock`, held while the returned file is open: a second server
/// on the same directory is refused) and removes the unfinished files a crash left (their rows
/// were lost with it; logged).
pub fn prepare_dir(dir: &Path) -> std::io::Result<std::fs::File> {
    let lock = crate::host::private_dir(
        dir,
        "another tie server journals into it (its .lock is held): give each server a journal directory of its own",
    )?;
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
        if name.starts_with(&format!(".{FILE_PREFIX}")) && name.ends_with(".partial") {
            tracing::warn!(file = %path.display(),
                "journal file left unfinished by an earlier run (its rows were lost): removed");
            std::fs::remove_file(&path)?;
        }
    }
    Ok(lock)
}

/// The file being written.
struct Open {
    writer: ArrowWriter<std::fs::File>,
    partial: PathBuf,
    name: String,
    opened: Instant,
    first_ns: i64,
    last_ns: i64,
    /// Rows per model key (in key order, as the footer lists them), counted written once the
    /// file is closed.
    by_model: std::collections::BTreeMap<String, u64>,
}

/// The writer's state.
struct Writer<'a> {
    journal: &'a Journal,
    schema: SchemaRef,
    open: Option<Open>,
    /// Files closed by this writer, for unique names.
    sequence: u64,
    /// Dropped counts already logged, per model key.
    logged_drops: std::collections::HashMap<String, u64>,
    last_drop_log: Instant,
    last_error_log: Option<Instant>,
}

/// Runs the writer until the journal finishes: writes what the pollers hand over, rotates
/// and prunes files, logs drops.
pub fn writer_task(journal: &Arc<Journal>) {
    let mut w = Writer {
        journal,
        schema: schema(),
        open: None,
        sequence: 0,
        logged_drops: Default::default(),
        last_drop_log: Instant::now(),
        last_error_log: None,
    };
    w.prune();
    loop {
        let stopping = journal.stopping.load(Ordering::SeqCst);
        let mut wrote = false;
        // The chunks queued now, no more: under a load the writer cannot keep up with, the
        // queue never empties, and the file must still rotate and drops still be logged.
        for _ in 0..journal.pipe.filled() {
            let Some(chunk) = journal.pipe.take_filled() else {
                break;
            };
            w.write(&chunk);
            if let Some(ch) = journal.clickhouse.get() {
                use crate::monitor::clickhouse::{journal_rows, Table};
                if ch.is_full(Table::Journal) {
                    ch.count_dropped(Table::Journal, chunk.len() as u64);
                } else {
                    ch.push(Table::Journal, journal_rows(ch.host(), &chunk));
                }
            }
            journal.pipe.give_back(chunk);
            wrote = true;
            if w.due() {
                w.close();
            }
        }
        if w.due() {
            w.close();
        }
        w.log_drops();
        if stopping && journal.pipe.filled() == 0 {
            break;
        }
        if !wrote {
            std::thread::sleep(IDLE_SLEEP);
        }
    }
    w.close();
    w.log_drops();
}

impl Writer<'_> {
    /// The open file is due to close: it holds `rotate_mb` or is `rotate_seconds` old.
    fn due(&self) -> bool {
        let config = self.journal.config();
        self.open.as_ref().is_some_and(|o| {
            o.opened.elapsed() >= Duration::from_secs(config.rotate_seconds)
                || o.writer.bytes_written() + o.writer.in_progress_size()
                    >= (config.rotate_mb as usize) << 20
        })
    }

    fn write(&mut self, chunk: &Chunk) {
        let key = format!("{}:{}", chunk.model, chunk.version);
        let batch = to_batch(chunk, &self.schema);
        let first = chunk.wall_ns(chunk.answered_ns[0]);
        let last = chunk.wall_ns(chunk.answered_ns[chunk.len() - 1]);
        if self.open.is_none() {
            match self.create(first) {
                Ok(o) => self.open = Some(o),
                Err(e) => return self.lost(&key, chunk.len(), &e.to_string()),
            }
        }
        let o = self.open.as_mut().expect("a file");
        if let Err(e) = o.writer.write(&batch) {
            let e = e.to_string();
            return self.lost(&key, chunk.len(), &e);
        }
        o.first_ns = o.first_ns.min(first);
        o.last_ns = o.last_ns.max(last);
        *o.by_model.entry(key).or_default() += chunk.len() as u64;
    }

    fn create(&mut self, first_ns: i64) -> Result<Open, Box<dyn std::error::Error>> {
        use std::os::unix::fs::OpenOptionsExt;
        let dir = self
            .journal
            .config()
            .dir
            .as_ref()
            .expect("a journal has a directory");
        let time = chrono::DateTime::from_timestamp_nanos(first_ns).format("%Y%m%dT%H%M%S%.6fZ");
        // Unique within this run by the sequence, across runs by the time and the pid.
        self.sequence += 1;
        let name = format!(
            "{FILE_PREFIX}{time}-{}-{}{FILE_SUFFIX}",
            std::process::id(),
            self.sequence
        );
        let partial = dir.join(format!(".{name}.partial"));
        // Owner-only: rows hold the desk's features and predictions.
        let file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&partial)?;
        let props = properties();
        let writer = ArrowWriter::try_new(file, self.schema.clone(), Some(props))?;
        Ok(Open {
            writer,
            partial,
            name,
            opened: Instant::now(),
            first_ns: i64::MAX,
            last_ns: i64::MIN,
            by_model: Default::default(),
        })
    }

    /// Finishes the file being written, syncs it and publishes it by rename; then prunes.
    fn close(&mut self) {
        let Some(mut o) = self.open.take() else {
            return;
        };
        let rfc = super::chunk::rfc3339;
        o.writer
            .append_key_value_metadata(KeyValue::new(META_FIRST.into(), rfc(o.first_ns)));
        o.writer
            .append_key_value_metadata(KeyValue::new(META_LAST.into(), rfc(o.last_ns)));
        let models: Vec<&str> = o.by_model.keys().map(String::as_str).collect();
        o.writer
            .append_key_value_metadata(KeyValue::new(META_MODELS.into(), models.join(",")));
        let dir = self.journal.config().dir.clone().expect("a directory");
        let finished = o
            .writer
            .finish()
            .map_err(|e| e.to_string())
            .and_then(|_| o.writer.inner().sync_all().map_err(|e| e.to_string()))
            .and_then(|()| {
                std::fs::rename(&o.partial, dir.join(&o.name)).map_err(|e| e.to_string())
            });
        if finished.is_ok() {
            // The file is published; only the rename's durability is in doubt.
            if let Err(e) = std::fs::File::open(&dir).and_then(|d| d.sync_all()) {
                tracing::warn!(dir = %dir.display(), error = %e, "cannot sync the journal directory");
            }
        }
        match finished {
            Ok(()) => {
                self.journal.files.fetch_add(1, Ordering::Relaxed);
                for (key, rows) in &o.by_model {
                    self.journal
                        .counters(key)
                        .written
                        .fetch_add(*rows, Ordering::Relaxed);
                }
                tracing::debug!(file = %o.name, rows = o.by_model.values().sum::<u64>(), "journal file closed");
            }
            Err(e) => {
                self.open = Some(o);
                self.lost("", 0, &e);
            }
        }
        self.prune();
    }

    /// A write failed: `rows` of model `key` (none when `key` is empty) and the rows of the
    /// file being written are counted dropped, the file is abandoned (the next rows start a
    /// new one), and the error is logged, at most once a second.
    fn lost(&mut self, key: &str, rows: usize, error: &str) {
        self.journal.write_errors.fetch_add(1, Ordering::Relaxed);
        if !key.is_empty() {
            self.journal
                .counters(key)
                .dropped
                .fetch_add(rows as u64, Ordering::Relaxed);
        }
        if let Some(o) = self.open.take() {
            drop(o.writer);
            let _ = std::fs::remove_file(&o.partial);
            for (k, r) in &o.by_model {
                self.journal
                    .counters(k)
                    .dropped
                    .fetch_add(*r, Ordering::Relaxed);
            }
        }
        if self
            .last_error_log
            .is_none_or(|t| t.elapsed() >= Duration::from_secs(1))
        {
            self.last_error_log = Some(Instant::now());
            tracing::error!(
                error,
                total_errors = self.journal.write_errors.load(Ordering::Relaxed),
                "journal rows not written (counted dropped)"
            );
        }
    }

    /// Applies `retain_hours` and `retain_mb` (see [`prune`]).
    fn prune(&self) {
        let config = self.journal.config();
        let max_age =
            (config.retain_hours > 0).then(|| Duration::from_secs(config.retain_hours * 3600));
        let max_bytes = (config.retain_mb > 0).then_some(config.retain_mb << 20);
        if max_age.is_some() || max_bytes.is_some() {
            prune(
                config.dir.as_ref().expect("a directory"),
                max_age,
                max_bytes,
            );
        }
    }

    /// Logs, at most once a second, the rows dropped since the last log.
    fn log_drops(&mut self) {
        if self.last_drop_log.elapsed() < Duration::from_secs(1) {
            return;
        }
        self.last_drop_log = Instant::now();
        for (key, counters) in self.journal.all_counters() {
            let dropped = counters.dropped.load(Ordering::Relaxed);
            let logged = self.logged_drops.entry(key.clone()).or_default();
            if dropped > *logged {
                tracing::warn!(model = %key, rows = dropped - *logged, total = dropped,
                    "journal rows dropped (the writer fell behind, or a file could not be written)");
                *logged = dropped;
            }
        }
    }
}

/// Deletes the closed journal files in `dir` older than `max_age` (by modification time: when
/// they were closed) and, oldest first, while all of them hold more than `max_bytes`.
/// Returns the files deleted.
pub fn prune(dir: &Path, max_age: Option<Duration>, max_bytes: Option<u64>) -> Vec<PathBuf> {
    let Ok(mut files) = super::read::list_files(dir) else {
        return Vec::new();
    };
    // Oldest first: names sort by their first row's time.
    files.sort();
    let files: Vec<(PathBuf, u64, Option<std::time::SystemTime>)> = files
        .into_iter()
        .filter_map(|p| {
            let m = std::fs::metadata(&p).ok()?;
            Some((p, m.len(), m.modified().ok()))
        })
        .collect();
    let mut total: u64 = files.iter().map(|f| f.1).sum();
    let mut deleted = Vec::new();
    for (path, size, modified) in files {
        let old = max_age.is_some_and(|max| {
            modified
                .and_then(|m| m.elapsed().ok())
                .is_some_and(|age| age > max)
        });
        let over = max_bytes.is_some_and(|max| total > max);
        if !old && !over {
            continue;
        }
        match std::fs::remove_file(&path) {
            Ok(()) => {
                total -= size;
                tracing::info!(file = %path.display(),
                    why = if old { "retain_hours" } else { "retain_mb" }, "journal file deleted");
                deleted.push(path);
            }
            Err(e) => {
                tracing::warn!(file = %path.display(), error = %e, "cannot delete journal file")
            }
        }
    }
    deleted
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pruning_deletes_the_oldest_files_past_the_size_and_the_old_ones() {
        let dir = std::env::temp_dir().join(format!("tie-prune-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let names = [
            "journal-20261201T000000.000000Z-1-1.parquet",
            "journal-20261202T000000.000000Z-1-2.parquet",
            "journal-20261203T000000.000000Z-1-3.parquet",
        ];
        for n in names {
            std::fs::write(dir.join(n), [0u8; 1000]).unwrap();
        }
        // Not journal files: never touched.
        std::fs::write(dir.join("notes.txt"), [0u8; 5000]).unwrap();
        std::fs::write(dir.join(".journal-x.parquet.partial"), [0u8; 5000]).unwrap();
        assert!(prune(&dir, None, Some(3000)).is_empty());
        // Over 2,000 bytes: the oldest goes, then the total fits.
        assert_eq!(prune(&dir, None, Some(2000)), [dir.join(names[0])]);
        assert!(prune(&dir, Some(Duration::from_secs(3600)), None).is_empty());
        std::thread::sleep(Duration::from_millis(20));
        let mut gone = prune(&dir, Some(Duration::from_millis(10)), None);
        gone.sort();
        assert_eq!(gone, [dir.join(names[1]), dir.join(names[2])]);
        assert!(dir.join("notes.txt").exists());
        assert!(dir.join(".journal-x.parquet.partial").exists());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
