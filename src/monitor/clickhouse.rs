//! Metric history in ClickHouse (`[clickhouse]`): the monitor's per-interval figures of every
//! model version, and optionally the journal's rows, pushed through ClickHouse's HTTP
//! interface (`INSERT … FORMAT JSONEachRow`, which every ClickHouse since 1.1 reads).
//!
//! - Serving never waits on it. The monitor's thread and the journal's writer append rows
//!   (JSON lines) to a bounded buffer per table; one thread (`tie-clickhouse`) sends them in
//!   batches. When a table's buffer is full, new rows are dropped and counted.
//! - An insert that fails is tried again with backoff (0.25 s doubling to 30 s); its rows stay
//!   buffered meanwhile, however long ClickHouse is away or failing. Only a batch ClickHouse
//!   refuses for its data ([`is_data_error`]: a row it cannot parse or convert) three times in
//!   a row is dropped, counted and logged with ClickHouse's message, so one bad row does not
//!   stop the rest.
//! - The tables are made if absent ([`METRICS_TABLE`], [`JOURNAL_TABLE`]), again after any
//!   failed insert (a server started afresh). A `CREATE` that fails (a user allowed to insert
//!   only) is logged and the insert tried anyway. The tables are `ReplacingMergeTree`s keyed by
//!   what makes a row unique: an insert that landed but whose answer was lost, sent again,
//!   collapses at merge (`SELECT … FINAL` counts exactly).
//! - At shutdown the thread sends what is buffered for up to `timeout_ms` (an insert under way
//!   then may take up to `timeout_ms` more); what is left is counted dropped and logged.
#![forbid(unsafe_code)]

use std::collections::VecDeque;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use crate::config::ClickHouseSection;
use crate::sync::Locked;

/// The per-interval figures' table; `{table}` is `clickhouse.metrics_table`.
pub const METRICS_TABLE: &str = "CREATE TABLE IF NOT EXISTS {table} (
    time DateTime,
    time_ms UInt64,
    interval_ms UInt32,
    host String,
    model String,
    version String,
    requests UInt64,
    responses UInt64,
    successes UInt64,
    errors UInt64,
    timeouts UInt64,
    rejections UInt64,
    error_kinds Array(String),
    error_counts Array(UInt64),
    p50_ms Nullable(Float64),
    p95_ms Nullable(Float64),
    p99_ms Nullable(Float64),
    p999_ms Nullable(Float64),
    max_ms Nullable(Float64),
    rows_per_second Float64,
    batches UInt64,
    rows UInt64,
    mean_batch_size Nullable(Float64),
    gpu_utilization Nullable(Float32),
    device_memory_bytes Nullable(UInt64)
) ENGINE = ReplacingMergeTree() PARTITION BY toYYYYMM(time) ORDER BY (host, model, version, time_ms)";

/// The journal's table; `{table}` is `clickhouse.journal_table`.
pub const JOURNAL_TABLE: &str = "CREATE TABLE IF NOT EXISTS {table} (
    time DateTime,
    time_ns Int64,
    host String,
    model String,
    version UInt32,
    request_id UInt64,
    session_id UInt64,
    pid UInt32,
    process String,
    source String,
    engine String,
    priority String,
    status String,
    sent_ns Nullable(Int64),
    read_ns Int64,
    features Array(Float32),
    outputs Array(Float32),
    confidence Nullable(Float32)
) ENGINE = ReplacingMergeTree() PARTITION BY toYYYYMMDD(time) ORDER BY (host, model, version, time_ns, session_id, request_id)";

/// Inserts refused for their data this many times in a row are dropped.
const REJECTED_AFTER: u32 = 3;

/// ClickHouse's exception codes for data it cannot read: a batch refused with one of these
/// fails the same way every time. (Others, such as a memory limit or too many parts, pass.)
const DATA_ERRORS: [u32; 12] = [
    6,   // CANNOT_PARSE_TEXT
    16,  // NO_SUCH_COLUMN_IN_TABLE
    26,  // CANNOT_PARSE_QUOTED_STRING
    27,  // CANNOT_PARSE_INPUT_ASSERTION_FAILED
    38,  // CANNOT_PARSE_DATE
    41,  // CANNOT_PARSE_DATETIME
    53,  // TYPE_MISMATCH
    69,  // ARGUMENT_OUT_OF_BOUND
    70,  // CANNOT_CONVERT_TYPE
    72,  // CANNOT_PARSE_NUMBER
    117, // INCORRECT_DATA
    349, // CANNOT_INSERT_NULL_IN_ORDINARY_COLUMN
];

/// Whether ClickHouse's error text (`Code: 27, e.displayText() = …` in ClickHouse 18,
/// `Code: 27. DB::Exception: …` since) names one of the data errors: parse and conversion
/// failures, a row it cannot read.
pub fn is_data_error(text: &str) -> bool {
    text.split("Code: ")
        .nth(1)
        .and_then(|rest| {
            let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
            digits.parse::<u32>().ok()
        })
        .is_some_and(|code| DATA_ERRORS.contains(&code))
}
const BACKOFF_FIRST: Duration = Duration::from_millis(250);
const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// A failing ClickHouse is logged at most this often.
const WARN_EVERY: Duration = Duration::from_secs(10);

/// One table's rows and counters.
#[derive(Debug, Default)]
pub struct TableCounters {
    /// Rows ClickHouse took.
    pub sent: AtomicU64,
    /// Rows dropped: the buffer was full.
    pub dropped_full: AtomicU64,
    /// Rows dropped: ClickHouse refused their insert three times in a row.
    pub dropped_rejected: AtomicU64,
    /// Rows dropped: still buffered when the server stopped.
    pub dropped_shutdown: AtomicU64,
    /// Rows buffered now.
    pub buffered: AtomicU64,
}

/// Which table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Table {
    /// Per-interval figures.
    Metrics = 0,
    /// Journal rows.
    Journal = 1,
}

impl Table {
    /// Both, in index order.
    pub const ALL: [Table; 2] = [Table::Metrics, Table::Journal];

    /// Its label in metrics and logs.
    pub fn name(self) -> &'static str {
        match self {
            Table::Metrics => "metrics",
            Table::Journal => "journal",
        }
    }
}

/// A secret that `Debug` does not show.
struct Secret(String);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("(secret)")
    }
}

/// The sink: buffers, counters and the sending thread.
#[derive(Debug)]
pub struct ClickHouse {
    config: ClickHouseSection,
    password: Option<Secret>,
    /// The `host` column's value.
    host: String,
    buffers: Mutex<[VecDeque<String>; 2]>,
    wake: Condvar,
    counters: [TableCounters; 2],
    /// Inserts (and table creations) that failed.
    pub errors: AtomicU64,
    stopping: AtomicBool,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
}

/// Why the sink could not start.
#[derive(Debug, thiserror::Error)]
pub enum ClickHouseStartError {
    /// The password file.
    #[error("clickhouse.password_file {}: {source}", path.display())]
    Password {
        /// The file.
        path: std::path::PathBuf,
        /// What is wrong.
        source: std::io::Error,
    },
    /// The thread.
    #[error("cannot start the ClickHouse thread: {0}")]
    Thread(std::io::Error),
}

impl ClickHouse {
    /// Starts the sink when `clickhouse.url` is set.
    ///
    /// # Errors
    /// The password file cannot be read (or others may read it), or the thread cannot start.
    pub fn start(config: &ClickHouseSection) -> Result<Option<Arc<Self>>, ClickHouseStartError> {
        let Some(url) = &config.url else {
            return Ok(None);
        };
        let password = config
            .password_file
            .as_ref()
            .map(|path| {
                read_secret(path)
                    .map(Secret)
                    .map_err(|source| ClickHouseStartError::Password {
                        path: path.clone(),
                        source,
                    })
            })
            .transpose()?;
        let host = config.host.clone().unwrap_or_else(|| {
            std::fs::read_to_string("/proc/sys/kernel/hostname")
                .map(|h| h.trim().to_string())
                .unwrap_or_default()
        });
        let sink = Arc::new(Self {
            config: config.clone(),
            password,
            host,
            buffers: Mutex::default(),
            wake: Condvar::new(),
            counters: Default::default(),
            errors: AtomicU64::new(0),
            stopping: AtomicBool::new(false),
            thread: Mutex::new(None),
        });
        let s = sink.clone();
        let handle = std::thread::Builder::new()
            .name("tie-clickhouse".into())
            .spawn(move || s.run())
            .map_err(ClickHouseStartError::Thread)?;
        *sink.thread.locked() = Some(handle);
        tracing::info!(url = %url, database = %config.database, journal = config.journal,
            "pushing metric history to ClickHouse");
        Ok(Some(sink))
    }

    /// Whether the journal's rows are pushed too.
    pub fn wants_journal(&self) -> bool {
        self.config.journal
    }

    /// The `host` column's value.
    pub fn host(&self) -> &str {
        &self.host
    }

    /// A table's counters.
    pub fn counters(&self, table: Table) -> &TableCounters {
        &self.counters[table as usize]
    }

    /// Whether `table`'s buffer is full: rows pushed now would be dropped.
    pub fn is_full(&self, table: Table) -> bool {
        self.buffers.locked()[table as usize].len() >= self.config.buffer_rows
    }

    /// Counts `rows` dropped for want of room (see [`ClickHouse::is_full`]), without making
    /// them.
    pub fn count_dropped(&self, table: Table, rows: u64) {
        self.counters[table as usize]
            .dropped_full
            .fetch_add(rows, Ordering::Relaxed);
    }

    /// Appends rows (JSON lines) to `table`'s buffer; those past `buffer_rows` are dropped
    /// and counted. Never waits on ClickHouse.
    pub fn push(&self, table: Table, rows: impl IntoIterator<Item = String>) {
        let c = &self.counters[table as usize];
        let mut buffers = self.buffers.locked();
        let buffer = &mut buffers[table as usize];
        let mut dropped = 0;
        for row in rows {
            if buffer.len() < self.config.buffer_rows {
                buffer.push_back(row);
            } else {
                dropped += 1;
            }
        }
        c.buffered.store(buffer.len() as u64, Ordering::Relaxed);
        let full = buffer.len() >= self.config.batch_rows;
        drop(buffers);
        if dropped > 0 {
            c.dropped_full.fetch_add(dropped, Ordering::Relaxed);
        }
        if full {
            self.wake.notify_one();
        }
    }

    /// Sends what is buffered (for at most `timeout_ms`), counts the rest dropped and stops
    /// the thread. Call after the last rows were pushed.
    pub fn finish(&self) {
        {
            // Under the lock: the thread checks `stopping` under it before it waits.
            let _buffers = self.buffers.locked();
            self.stopping.store(true, Ordering::SeqCst);
            self.wake.notify_one();
        }
        if let Some(h) = self.thread.locked().take() {
            if h.join().is_err() {
                tracing::error!("the ClickHouse thread panicked");
            }
        }
    }

    /// The sending thread.
    fn run(&self) {
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .timeout_global(Some(Duration::from_millis(self.config.timeout_ms)))
            .http_status_as_error(false)
            .build()
            .into();
        let mut s = Sender {
            agent,
            tables_made: false,
            backoff: BACKOFF_FIRST,
            retry_at: None,
            refused: [0; 2],
            last_warning: None,
            last_table: [Instant::now(), Instant::now()],
        };
        let flush = Duration::from_millis(self.config.flush_ms);
        let mut stop_by: Option<Instant> = None;
        loop {
            let stopping = self.stopping.load(Ordering::SeqCst);
            if stopping && stop_by.is_none() {
                stop_by = Some(Instant::now() + Duration::from_millis(self.config.timeout_ms));
            }
            let now = Instant::now();
            // A stopping server does not wait out a backoff: it tries until `stop_by`.
            let waiting = !stopping && s.retry_at.is_some_and(|t| now < t);
            let mut sent_any = false;
            if !waiting {
                for table in Table::ALL {
                    let i = table as usize;
                    let len = self.buffered(table);
                    let due = len >= self.config.batch_rows
                        || (len > 0 && (stopping || now - s.last_table[i] >= flush));
                    if !due {
                        continue;
                    }
                    match self.send_batch(&mut s, table) {
                        Ok(()) => {
                            s.last_table[i] = Instant::now();
                            sent_any = true;
                        }
                        Err(()) => break,
                    }
                }
            }
            let empty = Table::ALL.iter().all(|&t| self.buffered(t) == 0);
            if stopping && (empty || stop_by.is_some_and(|t| Instant::now() >= t)) {
                break;
            }
            if !sent_any {
                let buffers = self.buffers.locked();
                let mut wait = match s.retry_at {
                    Some(t) => t.saturating_duration_since(Instant::now()),
                    None => flush.min(Duration::from_millis(100)),
                };
                if let Some(t) = stop_by {
                    // Stopping: a short pause between tries, never past `stop_by`.
                    wait = wait
                        .min(BACKOFF_FIRST)
                        .min(t.saturating_duration_since(Instant::now()));
                }
                if self.stopping.load(Ordering::SeqCst) == stopping {
                    let _ = self
                        .wake
                        .wait_timeout(buffers, wait.max(Duration::from_millis(1)));
                }
            }
        }
        for table in Table::ALL {
            let mut buffers = self.buffers.locked();
            let left = buffers[table as usize].len() as u64;
            buffers[table as usize].clear();
            drop(buffers);
            let c = &self.counters[table as usize];
            c.buffered.store(0, Ordering::Relaxed);
            if left > 0 {
                c.dropped_shutdown.fetch_add(left, Ordering::Relaxed);
                tracing::warn!(
                    table = table.name(),
                    rows = left,
                    "rows not sent to ClickHouse before the server stopped"
                );
            }
        }
    }

    /// Rows buffered for `table`.
    fn buffered(&self, table: Table) -> usize {
        self.buffers.locked()[table as usize].len()
    }

    /// Sends one batch of `table`: its oldest rows, removed once ClickHouse took them (or
    /// refused them [`REJECTED_AFTER`] times). `Err` when it failed (the backoff is set).
    fn send_batch(&self, s: &mut Sender, table: Table) -> Result<(), ()> {
        let i = table as usize;
        let (body, rows) = {
            let buffers = self.buffers.locked();
            let take = buffers[i].len().min(self.config.batch_rows);
            let mut body = String::new();
            for row in buffers[i].iter().take(take) {
                body.push_str(row);
                body.push('\n');
            }
            (body, take)
        };
        if rows == 0 {
            return Ok(());
        }
        self.make_tables(s);
        let name = self.table_name(table);
        let outcome = self.query(
            &s.agent,
            &format!("INSERT INTO {name} FORMAT JSONEachRow"),
            body.into_bytes(),
        );
        let c = &self.counters[i];
        let done = match outcome {
            Ok(()) => {
                c.sent.fetch_add(rows as u64, Ordering::Relaxed);
                s.refused[i] = 0;
                true
            }
            Err(failure) => {
                self.errors.fetch_add(1, Ordering::Relaxed);
                // The tables are made again before the next try (a server started afresh).
                s.tables_made = false;
                let refused = matches!(&failure, Failure::Refused(text) if is_data_error(text));
                if refused {
                    s.refused[i] += 1;
                } else {
                    s.refused[i] = 0;
                }
                s.warn(table, &failure, rows);
                if refused && s.refused[i] >= REJECTED_AFTER {
                    c.dropped_rejected.fetch_add(rows as u64, Ordering::Relaxed);
                    tracing::error!(table = table.name(), rows, error = %failure,
                        "ClickHouse refused these rows for their data {REJECTED_AFTER} times: dropped");
                    s.refused[i] = 0;
                    true
                } else {
                    s.retry_at = Some(Instant::now() + s.backoff);
                    s.backoff = (s.backoff * 2).min(BACKOFF_MAX);
                    false
                }
            }
        };
        if !done {
            return Err(());
        }
        s.backoff = BACKOFF_FIRST;
        s.retry_at = None;
        let mut buffers = self.buffers.locked();
        let buffer = &mut buffers[i];
        buffer.drain(..rows.min(buffer.len()));
        c.buffered.store(buffer.len() as u64, Ordering::Relaxed);
        Ok(())
    }

    /// `database.table` of `table`.
    fn table_name(&self, table: Table) -> String {
        let name = match table {
            Table::Metrics => &self.config.metrics_table,
            Table::Journal => &self.config.journal_table,
        };
        format!("{}.{name}", self.config.database)
    }

    /// Makes the tables if absent: before the first insert, and again after an insert
    /// failed. A `CREATE` refused (a user allowed to insert only) is logged, and not tried
    /// again until an insert fails; one that reaches no server is tried again next time.
    fn make_tables(&self, s: &mut Sender) {
        if s.tables_made {
            return;
        }
        let mut ddl = vec![METRICS_TABLE.replace("{table}", &self.table_name(Table::Metrics))];
        if self.config.journal {
            ddl.push(JOURNAL_TABLE.replace("{table}", &self.table_name(Table::Journal)));
        }
        for q in ddl {
            match self.query(&s.agent, &q, Vec::new()) {
                Ok(()) => {}
                Err(Failure::Unreachable(_)) => return,
                Err(e @ Failure::Refused(_)) => {
                    tracing::warn!(error = %e, "cannot make a ClickHouse table (if it exists, inserts still work)");
                }
            }
        }
        s.tables_made = true;
    }

    /// Runs `query` with `body` as its data.
    fn query(&self, agent: &ureq::Agent, query: &str, body: Vec<u8>) -> Result<(), Failure> {
        let url = self.config.url.as_deref().expect("started with a url");
        let mut request = agent.post(url).query("query", query);
        if let Some(user) = &self.config.user {
            request = request.header("X-ClickHouse-User", user);
        }
        if let Some(password) = &self.password {
            request = request.header("X-ClickHouse-Key", &password.0);
        }
        let mut response = request
            .send(&body[..])
            .map_err(|e| Failure::Unreachable(e.to_string()))?;
        if response.status().is_success() {
            return Ok(());
        }
        let code = response.status().as_u16();
        let text = response
            .body_mut()
            .read_to_string()
            .unwrap_or_default()
            .trim()
            .chars()
            .take(500)
            .collect::<String>();
        Err(Failure::Refused(format!("HTTP {code}: {text}")))
    }
}

/// Finishes a sink when dropped, unless disarmed: a server that fails to start after its sink
/// did stops the sink's thread.
pub struct FinishOnDrop(pub Option<Arc<ClickHouse>>);

impl Drop for FinishOnDrop {
    fn drop(&mut self) {
        if let Some(ch) = self.0.take() {
            ch.finish();
        }
    }
}

/// How an insert failed.
#[derive(Debug)]
enum Failure {
    /// No answer: connection refused, reset, timed out.
    Unreachable(String),
    /// ClickHouse answered with an error.
    Refused(String),
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Failure::Unreachable(e) => write!(f, "ClickHouse unreachable: {e}"),
            Failure::Refused(e) => write!(f, "ClickHouse refused: {e}"),
        }
    }
}

/// The sending thread's state.
struct Sender {
    agent: ureq::Agent,
    tables_made: bool,
    backoff: Duration,
    /// No insert before this (backing off).
    retry_at: Option<Instant>,
    /// Per table: refusals of its oldest batch in a row.
    refused: [u32; 2],
    last_warning: Option<Instant>,
    /// Per table: when it was last sent.
    last_table: [Instant; 2],
}

impl Sender {
    fn warn(&mut self, table: Table, failure: &Failure, rows: usize) {
        let now = Instant::now();
        if self.last_warning.is_none_or(|t| now - t >= WARN_EVERY) {
            self.last_warning = Some(now);
            tracing::warn!(table = table.name(), rows, retry_in_ms = self.backoff.as_millis() as u64,
                error = %failure, "ClickHouse insert failed: rows kept and tried again");
        }
    }
}

/// The first line of a secret file that only its owner may read.
fn read_secret(path: &std::path::Path) -> std::io::Result<String> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(path)?;
    if meta.mode() & 0o077 != 0 {
        return Err(std::io::Error::new(
            std::io::ErrorKind::PermissionDenied,
            "others may read it: chmod 600",
        ));
    }
    let text = std::fs::read_to_string(path)?;
    Ok(text.lines().next().unwrap_or_default().to_string())
}

/// A float as ClickHouse's JSON reads it back exactly: plain decimal digits (ClickHouse 18's
/// parser rounds numbers with an exponent, `4.0525916e-5`, to a neighbouring value), or
/// `"nan"`, `"inf"`, `"-inf"` quoted.
pub(crate) fn float(out: &mut String, v: f64) {
    if v.is_finite() {
        // Rust's `Display`: the shortest digits that read back as `v`, never an exponent.
        let _ = write!(out, "{v}");
    } else if v.is_nan() {
        out.push_str("\"nan\"");
    } else if v > 0.0 {
        out.push_str("\"inf\"");
    } else {
        out.push_str("\"-inf\"");
    }
}

/// An f32 as [`float`] writes it, in the shortest digits that read back as the same f32.
pub(crate) fn float32(out: &mut String, v: f32) {
    if v.is_finite() {
        let _ = write!(out, "{v}");
    } else {
        float(out, f64::from(v));
    }
}

/// `values` as a JSON array of floats (see [`float32`]).
pub(crate) fn floats(out: &mut String, values: &[f32]) {
    out.push('[');
    for (i, &v) in values.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        float32(out, v);
    }
    out.push(']');
}

/// A chunk of journal rows as rows of the journal table.
pub fn journal_rows(host: &str, c: &crate::journal::Chunk) -> Vec<String> {
    use tie_layouts::abi::Status;
    let mut rows = Vec::with_capacity(c.len());
    let (iw, ow) = (c.input_width, c.output_width);
    let (mut features, mut outputs) = (0, 0);
    for i in 0..c.len() {
        let session = &c.sessions[c.session[i] as usize];
        let time_ns = c.wall_ns(c.answered_ns[i]);
        let mut o = String::with_capacity(256 + 12 * (iw + ow));
        let _ = write!(
            o,
            "{{\"time\":{},\"time_ns\":{time_ns}",
            time_ns.div_euclid(1_000_000_000)
        );
        o.push_str(",\"host\":");
        string(&mut o, host);
        o.push_str(",\"model\":");
        string(&mut o, &c.model);
        let _ = write!(
            o,
            ",\"version\":{},\"request_id\":{},\"session_id\":{},\"pid\":{}",
            c.version, c.request_id[i], session.id, session.pid
        );
        o.push_str(",\"process\":");
        string(&mut o, &session.process);
        let _ = write!(o, ",\"source\":\"{}\",\"engine\":", session.source);
        string(
            &mut o,
            c.engines
                .get(usize::from(c.engine[i]))
                .copied()
                .unwrap_or(""),
        );
        let priority = crate::journal::writer::PRIORITIES[usize::from(c.priority[i].min(3))];
        let status = Status(c.status[i]).name().unwrap_or("Unknown");
        let _ = write!(o, ",\"priority\":\"{priority}\",\"status\":\"{status}\"");
        match c.sent_ns[i] {
            0 => o.push_str(",\"sent_ns\":null"),
            t => {
                let _ = write!(o, ",\"sent_ns\":{}", c.wall_ns(t));
            }
        }
        let _ = write!(o, ",\"read_ns\":{}", c.wall_ns(c.read_ns[i]));
        o.push_str(",\"features\":");
        if c.has_features[i] {
            floats(&mut o, &c.features[features * iw..(features + 1) * iw]);
            features += 1;
        } else {
            o.push_str("[]");
        }
        o.push_str(",\"outputs\":");
        if c.has_outputs[i] {
            floats(&mut o, &c.outputs[outputs * ow..(outputs + 1) * ow]);
            o.push_str(",\"confidence\":");
            float32(&mut o, c.confidence[outputs]);
            outputs += 1;
        } else {
            o.push_str("[],\"confidence\":null");
        }
        o.push('}');
        rows.push(o);
    }
    rows
}

/// A JSON string.
pub(crate) fn string(out: &mut String, s: &str) {
    out.push_str(&serde_json::Value::from(s).to_string());
}

/// One row of the metrics table: model `key` over an interval of `interval` ending at
/// `end` (Unix ms).
pub fn metrics_row(
    host: &str,
    key: &str,
    sample: &super::Sample,
    interval: Duration,
    end_ms: i64,
    gpu_utilization: Option<f32>,
    device_memory_bytes: Option<u64>,
) -> String {
    use super::Stage;
    let (model, version) = key.rsplit_once(':').unwrap_or((key, ""));
    let total = &sample.hist[Stage::Total as usize];
    let q = |p: f64| (!total.is_empty()).then(|| total.value_at_quantile(p) as f64 / 1e6);
    let responses = sample.total_responses();
    let (kinds, counts): (Vec<&str>, Vec<u64>) = sample.errors_by_kind().unzip();
    let secs = interval.as_secs_f64().max(1e-9);
    let mut o = String::with_capacity(512);
    let _ = write!(
        o,
        "{{\"time\":{},\"time_ms\":{end_ms}",
        end_ms.div_euclid(1000)
    );
    let _ = write!(o, ",\"interval_ms\":{}", interval.as_millis());
    o.push_str(",\"host\":");
    string(&mut o, host);
    o.push_str(",\"model\":");
    string(&mut o, model);
    o.push_str(",\"version\":");
    string(&mut o, version);
    let _ = write!(
        o,
        ",\"requests\":{},\"responses\":{responses},\"successes\":{},\"errors\":{}",
        sample.requests,
        sample.responses[0],
        sample.failures()
    );
    let _ = write!(
        o,
        ",\"timeouts\":{},\"rejections\":{}",
        sample.timeouts(),
        sample.rejections()
    );
    o.push_str(",\"error_kinds\":");
    o.push_str(&serde_json::to_string(&kinds).unwrap_or_default());
    o.push_str(",\"error_counts\":");
    o.push_str(&serde_json::to_string(&counts).unwrap_or_default());
    for (name, v) in [
        ("p50_ms", q(0.5)),
        ("p95_ms", q(0.95)),
        ("p99_ms", q(0.99)),
        ("p999_ms", q(0.999)),
        (
            "max_ms",
            (!total.is_empty()).then(|| total.max() as f64 / 1e6),
        ),
        (
            "mean_batch_size",
            (sample.batches > 0).then(|| sample.rows as f64 / sample.batches as f64),
        ),
        ("gpu_utilization", gpu_utilization.map(f64::from)),
    ] {
        let _ = write!(o, ",\"{name}\":");
        match v {
            Some(v) => float(&mut o, v),
            None => o.push_str("null"),
        }
    }
    o.push_str(",\"rows_per_second\":");
    float(&mut o, sample.responses[0] as f64 / secs);
    let _ = write!(
        o,
        ",\"batches\":{},\"rows\":{}",
        sample.batches, sample.rows
    );
    match device_memory_bytes {
        Some(b) => {
            let _ = write!(o, ",\"device_memory_bytes\":{b}}}");
        }
        None => o.push_str(",\"device_memory_bytes\":null}"),
    }
    o
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_metrics_row_is_one_json_object_with_every_column() {
        let mut s = crate::monitor::Sample {
            requests: 10,
            batches: 4,
            rows: 8,
            ..Default::default()
        };
        s.responses[0] = 8;
        s.responses[tie_layouts::abi::Status::TIMEOUT.0 as usize] = 2;
        s.record_n(crate::monitor::Stage::Total, 2_000_000, 8);
        let row = metrics_row(
            "h",
            "m:3",
            &s,
            Duration::from_millis(500),
            1_765_000_000_123,
            None,
            Some(7),
        );
        let v: serde_json::Value = serde_json::from_str(&row).unwrap();
        assert_eq!(v["time"], 1_765_000_000);
        assert_eq!(v["time_ms"], 1_765_000_000_123i64);
        assert_eq!(
            (v["model"].as_str(), v["version"].as_str()),
            (Some("m"), Some("3"))
        );
        assert_eq!(
            (v["responses"].as_u64(), v["errors"].as_u64()),
            (Some(10), Some(2))
        );
        assert_eq!(v["error_kinds"], serde_json::json!(["Timeout"]));
        assert_eq!(v["error_counts"], serde_json::json!([2]));
        assert_eq!(v["mean_batch_size"], 2.0);
        assert_eq!(v["rows_per_second"], 16.0);
        assert!((v["p50_ms"].as_f64().unwrap() - 2.0).abs() < 0.03);
        assert_eq!(v["gpu_utilization"], serde_json::Value::Null);
        assert_eq!(v["device_memory_bytes"], 7);
        let columns = METRICS_TABLE
            .lines()
            .filter(|l| l.starts_with("    "))
            .count();
        assert_eq!(v.as_object().unwrap().len(), columns, "{row}");
    }

    #[test]
    fn only_errors_in_the_data_drop_a_batch() {
        // ClickHouse 18's form, and the newer one.
        assert!(is_data_error(
            "HTTP 500: Code: 27, e.displayText() = DB::Exception: Cannot parse input"
        ));
        assert!(is_data_error(
            "HTTP 400: Code: 117. DB::Exception: Incorrect data"
        ));
        // A memory limit, too many parts, a missing table, no code at all: tried again.
        assert!(!is_data_error(
            "HTTP 500: Code: 241, e.displayText() = Memory limit"
        ));
        assert!(!is_data_error(
            "HTTP 500: Code: 252. DB::Exception: Too many parts"
        ));
        assert!(!is_data_error(
            "HTTP 404: Code: 60, e.displayText() = Table doesn't exist"
        ));
        assert!(!is_data_error("HTTP 503: Service Unavailable"));
    }

    #[test]
    fn non_finite_floats_are_quoted_as_clickhouse_reads_them() {
        let mut o = String::new();
        floats(
            &mut o,
            &[1.5, f32::NAN, f32::INFINITY, f32::NEG_INFINITY, 1e-7],
        );
        assert_eq!(o, "[1.5,\"nan\",\"inf\",\"-inf\",0.0000001]");
    }
}
