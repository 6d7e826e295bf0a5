//! Reading the journal: its closed files, their time ranges and row counts (from the Parquet
//! footer), and their rows.

use std::path::{Path, PathBuf};

use arrow_array::cast::AsArray;
use arrow_array::types::ArrowPrimitiveType;
use arrow_array::types::{
    Float32Type, TimestampNanosecondType, UInt16Type, UInt32Type, UInt64Type,
};
use arrow_array::{Array, PrimitiveArray, RecordBatch};
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use parquet::file::reader::{FileReader, SerializedFileReader};
use serde::Serialize;

use super::writer::{FILE_PREFIX, FILE_SUFFIX, META_FIRST, META_LAST, META_MODELS};

/// Why the journal could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    /// A file or directory could not be read.
    #[error("{}: {source}", path.display())]
    Io {
        /// The path.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// A file is not a journal file tie can read.
    #[error("{}: {why}", path.display())]
    Format {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        why: String,
    },
}

/// The closed journal files in `dir` (unsorted).
///
/// # Errors
/// The directory cannot be read.
pub fn list_files(dir: &Path) -> Result<Vec<PathBuf>, ReadError> {
    let io = |source| ReadError::Io {
        path: dir.into(),
        source,
    };
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(io)? {
        let path = entry.map_err(io)?.path();
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
        if name.starts_with(FILE_PREFIX) && name.ends_with(FILE_SUFFIX) {
            files.push(path);
        }
    }
    Ok(files)
}

/// The journal files a command names: files as given, directories as their closed files,
/// sorted by name (the time of their first row).
///
/// # Errors
/// A path cannot be read.
pub fn expand(paths: &[PathBuf]) -> Result<Vec<PathBuf>, ReadError> {
    let mut files = Vec::new();
    for p in paths {
        if p.is_dir() {
            let mut in_dir = list_files(p)?;
            in_dir.sort();
            files.extend(in_dir);
        } else {
            files.push(p.clone());
        }
    }
    Ok(files)
}

/// What a journal file holds, from its footer.
#[derive(Clone, Debug, Serialize)]
pub struct FileSummary {
    /// The file.
    pub file: PathBuf,
    /// Rows.
    pub rows: i64,
    /// Bytes.
    pub bytes: u64,
    /// The first answer's time (RFC 3339, UTC).
    pub first: Option<String>,
    /// The last answer's time.
    pub last: Option<String>,
    /// The model versions in it (`name:version`).
    pub models: Vec<String>,
}

/// The summary of journal file `path`.
///
/// # Errors
/// The file cannot be read or is not Parquet.
pub fn summary(path: &Path) -> Result<FileSummary, ReadError> {
    let file = std::fs::File::open(path).map_err(|source| ReadError::Io {
        path: path.into(),
        source,
    })?;
    let bytes = file.metadata().map(|m| m.len()).unwrap_or(0);
    let reader = SerializedFileReader::new(file).map_err(|e| ReadError::Format {
        path: path.into(),
        why: e.to_string(),
    })?;
    let meta = reader.metadata().file_metadata();
    let kv = |key: &str| {
        meta.key_value_metadata()
            .and_then(|kvs| kvs.iter().find(|kv| kv.key == key))
            .and_then(|kv| kv.value.clone())
    };
    Ok(FileSummary {
        file: path.into(),
        rows: meta.num_rows(),
        bytes,
        first: kv(META_FIRST),
        last: kv(META_LAST),
        models: kv(META_MODELS)
            .map(|m| m.split(',').map(str::to_string).collect())
            .unwrap_or_default(),
    })
}

/// One journaled answer.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct JournalRow {
    /// When the answer was ready (RFC 3339, UTC, ns).
    pub time: String,
    /// The same, in nanoseconds since the Unix epoch.
    pub time_ns: i64,
    /// The model.
    pub model: String,
    /// Its version.
    pub version: u32,
    /// The client's request id.
    pub request_id: u64,
    /// The server's session id.
    pub session_id: u64,
    /// The client's pid.
    pub pid: u32,
    /// The client's process name.
    pub process: String,
    /// `ring`, `http`, or `shadow` for a shadow's answers.
    pub source: String,
    /// The engine that ran its batch.
    pub engine: String,
    /// `low` ..= `critical`.
    pub priority: String,
    /// The status answered.
    pub status: String,
    /// The client's send stamp (ns since the epoch), when it sent one.
    pub sent_ns: Option<i64>,
    /// When the server read it (ns since the epoch).
    pub read_ns: i64,
    /// Its features, when kept.
    pub features: Option<Vec<f32>>,
    /// Its outputs, when it ran.
    pub outputs: Option<Vec<f32>>,
    /// Its confidence, when it ran.
    pub confidence: Option<f32>,
}

/// Which rows to read.
#[derive(Clone, Debug, Default)]
pub struct Filter {
    /// Only this model.
    pub model: Option<String>,
    /// Only this version.
    pub version: Option<u32>,
    /// Only answers at or after this time (ns since the epoch).
    pub since_ns: Option<i64>,
    /// Only answers before this time.
    pub until_ns: Option<i64>,
    /// Only this request id.
    pub request_id: Option<u64>,
}

impl Filter {
    fn keeps(&self, r: &JournalRow) -> bool {
        self.model.as_ref().is_none_or(|m| *m == r.model)
            && self.version.is_none_or(|v| v == r.version)
            && self.since_ns.is_none_or(|t| r.time_ns >= t)
            && self.until_ns.is_none_or(|t| r.time_ns < t)
            && self.request_id.is_none_or(|id| id == r.request_id)
    }

    /// Whether a file whose rows span `summary`'s times may hold a row it keeps.
    pub fn may_keep(&self, summary: &FileSummary) -> bool {
        let ns = |t: &Option<String>| {
            t.as_deref()
                .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
                .and_then(|t| t.timestamp_nanos_opt())
        };
        let after_since = match (self.since_ns, ns(&summary.last)) {
            (Some(s), Some(last)) => last >= s,
            _ => true,
        };
        let before_until = match (self.until_ns, ns(&summary.first)) {
            (Some(u), Some(first)) => first < u,
            _ => true,
        };
        let model = match &self.model {
            Some(m) if !summary.models.is_empty() => summary.models.iter().any(|k| {
                k.rsplit_once(':').is_some_and(|(name, v)| {
                    name == m && self.version.is_none_or(|want| v == want.to_string())
                })
            }),
            _ => true,
        };
        after_since && before_until && model
    }
}

/// Calls `each` with every row of journal file `path` that `filter` keeps, in file order.
///
/// # Errors
/// The file cannot be read or is not a journal file.
pub fn for_each_row(
    path: &Path,
    filter: &Filter,
    each: &mut dyn FnMut(JournalRow),
) -> Result<(), ReadError> {
    let format = |why: String| ReadError::Format {
        path: path.into(),
        why,
    };
    let file = std::fs::File::open(path).map_err(|source| ReadError::Io {
        path: path.into(),
        source,
    })?;
    let reader = ParquetRecordBatchReaderBuilder::try_new(file)
        .and_then(|b| b.with_batch_size(8192).build())
        .map_err(|e| format(e.to_string()))?;
    for batch in reader {
        let batch = batch.map_err(|e| format(e.to_string()))?;
        rows_of(&batch, filter, each).map_err(format)?;
    }
    Ok(())
}

/// A string column, plain or as a dictionary.
enum Strings<'a> {
    Plain(&'a arrow_array::StringArray),
    Dictionary(&'a arrow_array::UInt16Array, &'a arrow_array::StringArray),
}

impl Strings<'_> {
    /// Row `i`'s string; `None` for a null (or a key out of range: not tie's file).
    fn value(&self, i: usize) -> Option<String> {
        match self {
            Self::Plain(a) => a.is_valid(i).then(|| a.value(i).into()),
            Self::Dictionary(keys, values) => {
                let k = keys.is_valid(i).then(|| keys.value(i) as usize)?;
                (k < values.len() && values.is_valid(k)).then(|| values.value(k).into())
            }
        }
    }
}

fn rows_of(
    batch: &RecordBatch,
    filter: &Filter,
    each: &mut dyn FnMut(JournalRow),
) -> Result<(), String> {
    let column = |name: &str| {
        batch
            .column_by_name(name)
            .ok_or_else(|| format!("no column {name}: not a journal file"))
    };
    let wrong = |name: &str| format!("column {name} has another type: not a journal file");
    // A column of primitive type `T`, or why not.
    fn primitive<'b, T: ArrowPrimitiveType>(
        batch: &'b RecordBatch,
        name: &str,
    ) -> Result<&'b PrimitiveArray<T>, String> {
        batch
            .column_by_name(name)
            .ok_or_else(|| format!("no column {name}: not a journal file"))?
            .as_primitive_opt::<T>()
            .ok_or_else(|| format!("column {name} has another type: not a journal file"))
    }
    let ts = |name: &str| primitive::<TimestampNanosecondType>(batch, name);
    // Strings are written as dictionaries; plain strings (another writer's) are read too.
    let string = |name: &str| -> Result<Strings<'_>, String> {
        let c = column(name)?;
        if let Some(d) = c.as_dictionary_opt::<UInt16Type>() {
            let values = d
                .values()
                .as_string_opt::<i32>()
                .ok_or_else(|| wrong(name))?;
            Ok(Strings::Dictionary(d.keys(), values))
        } else {
            Ok(Strings::Plain(
                c.as_string_opt::<i32>().ok_or_else(|| wrong(name))?,
            ))
        }
    };
    let list = |name: &str| {
        column(name)?
            .as_list_opt::<i32>()
            .ok_or_else(|| wrong(name))
    };
    let (time, sent, read) = (ts("time")?, ts("sent_time")?, ts("read_time")?);
    let (model, process, source, engine, priority, status) = (
        string("model")?,
        string("process")?,
        string("source")?,
        string("engine")?,
        string("priority")?,
        string("status")?,
    );
    let version = primitive::<UInt32Type>(batch, "version")?;
    let pid = primitive::<UInt32Type>(batch, "pid")?;
    let request_id = primitive::<UInt64Type>(batch, "request_id")?;
    let session_id = primitive::<UInt64Type>(batch, "session_id")?;
    let confidence = primitive::<Float32Type>(batch, "confidence")?;
    let (features, outputs) = (list("features")?, list("outputs")?);
    for (name, l) in [("features", features), ("outputs", outputs)] {
        if l.values().as_primitive_opt::<Float32Type>().is_none() {
            return Err(wrong(name));
        }
    }
    let floats = |l: &arrow_array::ListArray, i: usize| -> Option<Vec<f32>> {
        (!l.is_null(i)).then(|| l.value(i).as_primitive::<Float32Type>().values().to_vec())
    };
    let null = |name: &str| format!("column {name} has a null: not a journal file");
    for i in 0..batch.num_rows() {
        let time_ns = time.value(i);
        let row = JournalRow {
            time: super::chunk::rfc3339(time_ns),
            time_ns,
            model: model.value(i).ok_or_else(|| null("model"))?,
            version: version.value(i),
            request_id: request_id.value(i),
            session_id: session_id.value(i),
            pid: pid.value(i),
            process: process.value(i).ok_or_else(|| null("process"))?,
            source: source.value(i).ok_or_else(|| null("source"))?,
            engine: engine.value(i).ok_or_else(|| null("engine"))?,
            priority: priority.value(i).ok_or_else(|| null("priority"))?,
            status: status.value(i).ok_or_else(|| null("status"))?,
            sent_ns: (!sent.is_null(i)).then(|| sent.value(i)),
            read_ns: read.value(i),
            features: floats(features, i),
            outputs: floats(outputs, i),
            confidence: (!confidence.is_null(i)).then(|| confidence.value(i)),
        };
        if filter.keeps(&row) {
            each(row);
        }
    }
    Ok(())
}
