//! The prediction journal: answered requests of models with `journal = true`, recorded off
//! the hot path in Parquet files that pandas, polars, DuckDB and ClickHouse read directly.
//!
//! - A poller copies each journaled answer (ids, session, times, status, outputs and
//!   features) into a [`Chunk`] of its model's lane (`LaneJournal`): columns, cleared and
//!   reused, so nothing is allocated once warm.
//! - Full chunks, and chunks older than a few milliseconds, go to the writer thread through a
//!   bounded lock-free queue; emptied chunks come back through another. A poller that finds
//!   no empty chunk drops the row and counts it: it never waits for the writer. The writer
//!   logs drops at most once a second.
//! - The writer ([`writer`]) appends to a hidden `.partial` file and, once it holds
//!   `[journal] rotate_mb` or has been open `rotate_seconds`, finishes it, syncs it and
//!   renames it to `journal-<first answer, UTC>-<pid>-<n>.parquet`: a reader sees whole files
//!   only.
//!   A crash loses the rows of the file being written and those still queued.
//! - [`read`] lists the files and reads their rows (`tie journal`); [`compare`] measures how
//!   a replay's answers differ from the recorded ones (`tie replay`).
//! - [`shadow`]: shadow models. The same chunks, through a [`Pipe`] of their own, carry a
//!   primary version's answers to a runner that asks the shadow version too, off the hot
//!   path, and measures how they differ.
#![forbid(unsafe_code)]

pub mod chunk;
pub mod compare;
pub mod read;
pub mod shadow;
pub mod writer;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use crossbeam_queue::ArrayQueue;

pub use chunk::{Chunk, SessionInfo, CHUNK_ROWS};

use crate::config::JournalSection;
use crate::sync::Locked;

/// Chunks beyond `queue_rows`, for the lanes filling one each.
pub const FILLING_CHUNKS: usize = 64;

/// A lane's chunk is handed to the writer once its first row is this old, full or not.
pub const CHUNK_AGE_NS: u64 = 20_000_000;

/// Rows written and dropped for one model version.
#[derive(Debug, Default)]
pub struct ModelCounters {
    /// Rows written to files.
    pub written: AtomicU64,
    /// Rows dropped: the writer was behind (no empty chunk), or a file could not be written.
    pub dropped: AtomicU64,
}

/// Counters per model version (`name:version`), made on first use.
#[derive(Debug, Default)]
pub struct CountersByKey(Mutex<HashMap<String, Arc<ModelCounters>>>);

impl CountersByKey {
    /// The counters of `key`, made on first use.
    pub fn of(&self, key: &str) -> Arc<ModelCounters> {
        self.0.locked().entry(key.into()).or_default().clone()
    }

    /// The counters of `key`, if made.
    pub fn get(&self, key: &str) -> Option<Arc<ModelCounters>> {
        self.0.locked().get(key).cloned()
    }

    /// Every key's counters, by key.
    pub fn all(&self) -> Vec<(String, Arc<ModelCounters>)> {
        let mut all: Vec<_> = self
            .0
            .locked()
            .iter()
            .map(|(k, c)| (k.clone(), c.clone()))
            .collect();
        all.sort_by(|a, b| a.0.cmp(&b.0));
        all
    }
}

/// Chunks between the lanes that fill them and the one thread that empties them (the
/// journal's writer, or the shadow runner): two bounded lock-free queues, every chunk in one
/// of them or held by its user.
#[derive(Debug)]
pub struct Pipe {
    /// Empty chunks, for the lanes.
    free: ArrayQueue<Box<Chunk>>,
    /// Filled chunks, for the thread that empties them.
    filled: ArrayQueue<Box<Chunk>>,
}

impl Pipe {
    /// A pipe of `chunks` empty chunks.
    pub fn new(chunks: usize) -> Self {
        let pipe = Self {
            free: ArrayQueue::new(chunks),
            filled: ArrayQueue::new(chunks),
        };
        for _ in 0..chunks {
            let _ = pipe.free.push(Box::default());
        }
        pipe
    }

    /// The oldest filled chunk.
    pub fn take_filled(&self) -> Option<Box<Chunk>> {
        self.filled.pop()
    }

    /// Filled chunks waiting.
    pub fn filled(&self) -> usize {
        self.filled.len()
    }

    /// Clears a chunk and makes it free again.
    pub fn give_back(&self, mut chunk: Box<Chunk>) {
        chunk.clear();
        let _ = self.free.push(chunk);
    }
}

/// The journal shared by the pollers and its writer thread.
#[derive(Debug)]
pub struct Journal {
    config: JournalSection,
    /// Chunks from the pollers to the writer.
    pipe: Arc<Pipe>,
    /// Per model key (`name:version`).
    counters: CountersByKey,
    /// Files closed.
    pub files: AtomicU64,
    /// Files that could not be written (their rows are counted dropped).
    pub write_errors: AtomicU64,
    stopping: AtomicBool,
    writer: Mutex<Option<std::thread::JoinHandle<()>>>,
    /// The directory's lock, held while the journal lives.
    lock: Mutex<Option<std::fs::File>>,
    /// Where rows are pushed too, when `[clickhouse] journal = true`.
    pub clickhouse: std::sync::OnceLock<Arc<crate::monitor::clickhouse::ClickHouse>>,
}

/// Why the journal could not start.
#[derive(Debug, thiserror::Error)]
pub enum JournalStartError {
    /// Its directory could not be made or is not writable.
    #[error("journal directory {}: {source}", dir.display())]
    Dir {
        /// The directory.
        dir: std::path::PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// The writer thread could not start.
    #[error("cannot start the journal's writer thread: {0}")]
    Thread(std::io::Error),
}

impl Journal {
    /// Starts the journal's writer on `config.dir`, on `config.writer_cores` or else the
    /// process's CPUs but the pollers' cores and their SMT siblings (see
    /// [`crate::dataplane::move_off_poller_cores`]); `None` when no directory is set.
    ///
    /// # Errors
    /// The directory cannot be made or written, or the thread cannot start.
    pub fn start(
        config: &JournalSection,
        poller_cores: &[usize],
    ) -> Result<Option<Arc<Self>>, JournalStartError> {
        let Some(dir) = &config.dir else {
            return Ok(None);
        };
        let lock = writer::prepare_dir(dir).map_err(|source| JournalStartError::Dir {
            dir: dir.clone(),
            source,
        })?;
        // Queued rows, and the chunks lanes are filling (one per journaled model and poller).
        let chunks = (config.queue_rows / CHUNK_ROWS).max(1) + FILLING_CHUNKS;
        let journal = Self::with_chunks(config, chunks);
        *journal.lock.locked() = Some(lock);
        let w = journal.clone();
        let place = if config.writer_cores.is_empty() {
            crate::dataplane::poller::off_poller_cores(poller_cores.to_vec())
        } else {
            on_cores(config.writer_cores.clone())
        };
        let handle = std::thread::Builder::new()
            .name("tie-journal".into())
            .spawn(move || {
                place();
                writer::writer_task(&w)
            })
            .map_err(JournalStartError::Thread)?;
        *journal.writer.locked() = Some(handle);
        tracing::info!(dir = %dir.display(), rotate_mb = config.rotate_mb,
            rotate_seconds = config.rotate_seconds, chunks, "journal open");
        Ok(Some(journal))
    }

    /// A journal of `chunks` empty chunks, its writer not started.
    fn with_chunks(config: &JournalSection, chunks: usize) -> Arc<Self> {
        Arc::new(Self {
            config: config.clone(),
            pipe: Arc::new(Pipe::new(chunks)),
            counters: CountersByKey::default(),
            files: AtomicU64::new(0),
            write_errors: AtomicU64::new(0),
            stopping: AtomicBool::new(false),
            writer: Mutex::new(None),
            lock: Mutex::new(None),
            clickhouse: std::sync::OnceLock::new(),
        })
    }

    /// Its settings.
    pub fn config(&self) -> &JournalSection {
        &self.config
    }

    /// The counters of model version `key`, made on first use.
    pub fn counters(&self, key: &str) -> Arc<ModelCounters> {
        self.counters.of(key)
    }

    /// Every model version's counters, by key.
    pub fn all_counters(&self) -> Vec<(String, Arc<ModelCounters>)> {
        self.counters.all()
    }

    /// Writes what is queued, closes the file being written (it becomes readable) and stops
    /// the writer. Call once the pollers have stopped (their last chunks handed over).
    pub fn finish(&self) {
        self.stopping.store(true, Ordering::SeqCst);
        if let Some(h) = self.writer.locked().take() {
            if h.join().is_err() {
                tracing::error!("the journal's writer panicked");
            }
        }
        // The directory is free for the next server.
        self.lock.locked().take();
    }
}

/// Pins the thread that runs it to `cores` (logged if it cannot).
pub(crate) fn on_cores(cores: Vec<usize>) -> Box<dyn FnOnce() + Send> {
    Box::new(move || {
        use rustix::thread::{sched_setaffinity, CpuSet};
        let mut cpus = CpuSet::new();
        for &core in cores.iter().filter(|&&c| c < CpuSet::MAX_CPU) {
            cpus.set(core);
        }
        if let Err(e) = sched_setaffinity(None, &cpus) {
            tracing::warn!(error = %e, ?cores, "the journal's writer is not on journal.writer_cores");
        }
    })
}

/// Finishes a journal when dropped, unless disarmed: a server that fails to start after its
/// journal did stops the writer and frees the directory.
pub struct FinishOnDrop(pub Option<Arc<Journal>>);

impl Drop for FinishOnDrop {
    fn drop(&mut self) {
        if let Some(j) = self.0.take() {
            j.finish();
        }
    }
}

impl Drop for Journal {
    fn drop(&mut self) {
        self.stopping.store(true, Ordering::SeqCst);
    }
}

/// What a poller's lane records of its answers: rows for the journal (`journal = true`), and
/// for the shadow runner the rows a shadow model gets (those that ran).
#[derive(Default)]
pub(crate) struct Taps {
    pub journal: Option<LaneJournal>,
    pub shadow: Option<LaneJournal>,
}

impl Taps {
    /// Something is recorded.
    #[inline]
    pub fn is_on(&self) -> bool {
        self.journal.is_some() || self.shadow.is_some()
    }

    /// Whether the lane's batches should keep a copy of their features.
    pub fn wants_features(&self) -> bool {
        self.shadow.is_some() || self.journal.as_ref().is_some_and(|j| j.wants_features())
    }

    /// Records `row` where it goes: the journal's every answer, the shadow's those that ran.
    #[inline]
    pub fn record(&mut self, row: Row<'_>) {
        if let Some(j) = self.journal.as_mut() {
            j.record(row);
        }
        if let Some(s) = self.shadow.as_mut() {
            if row.status == 0 && row.features.is_some() && row.outputs.is_some() {
                s.record(row);
            }
        }
    }

    /// Hands over chunks whose first row is `min_age_ns` old.
    pub fn flush(&mut self, now_ns: u64, min_age_ns: u64) {
        for t in [&mut self.journal, &mut self.shadow].into_iter().flatten() {
            t.flush(now_ns, min_age_ns);
        }
    }

    /// Rows wait in a chunk being filled.
    pub fn pending(&self) -> bool {
        [&self.journal, &self.shadow]
            .into_iter()
            .flatten()
            .any(LaneJournal::pending)
    }
}

/// A lane's rows of one model version on their way through a [`Pipe`] (to the journal's
/// writer, or to the shadow runner): the chunk being filled, and how rows are picked.
pub(crate) struct LaneJournal {
    pipe: Arc<Pipe>,
    counters: Arc<ModelCounters>,
    chunk: Option<Box<Chunk>>,
    /// When the chunk got its first row.
    chunk_started_ns: u64,
    rate: f64,
    /// Rows owed to the sample: a row is journaled each time it reaches 1.
    owed: f64,
    features: bool,
    model: Arc<str>,
    version: u32,
    input_width: usize,
    output_width: usize,
}

/// One answer to journal (see [`LaneJournal::record`]).
#[derive(Clone, Copy)]
pub(crate) struct Row<'a> {
    pub session: &'a SessionInfo,
    pub engine: &'static str,
    pub request_id: u64,
    pub priority: u8,
    pub status: u32,
    pub sent_ns: u64,
    pub read_ns: u64,
    pub answered_ns: u64,
    /// Its features, when they were gathered into a batch.
    pub features: Option<&'a [f32]>,
    /// Its outputs and confidence, when it ran.
    pub outputs: Option<(&'a [f32], f32)>,
}

impl LaneJournal {
    /// The journal of `model` on a poller, when the model asks for one and the server keeps
    /// one.
    pub fn for_model(
        journal: Option<&Arc<Journal>>,
        model: &crate::models::LoadedModel,
    ) -> Option<Self> {
        let journal = journal?;
        if !model.config.journal {
            return None;
        }
        Some(Self::new(
            journal.pipe.clone(),
            journal.counters(&model.key()),
            model.config.journal_sample_rate.0,
            model.config.journal_features(),
            model,
        ))
    }

    /// Rows of `model` into `pipe`, a share `rate` of them, with their features or not;
    /// rows dropped for want of an empty chunk are counted in `counters`.
    pub fn new(
        pipe: Arc<Pipe>,
        counters: Arc<ModelCounters>,
        rate: f64,
        features: bool,
        model: &crate::models::LoadedModel,
    ) -> Self {
        Self {
            pipe,
            counters,
            chunk: None,
            chunk_started_ns: 0,
            rate,
            owed: 0.0,
            features,
            model: model.name.as_str().into(),
            version: model.version,
            input_width: model.input_width(),
            output_width: model.output_width(),
        }
    }

    /// Whether the lane's batches should keep a copy of their features.
    pub fn wants_features(&self) -> bool {
        self.features
    }

    /// Journals `row` if the sample picks it: into the chunk being filled, handed to the
    /// writer once full; dropped and counted when no empty chunk is to be had.
    #[inline]
    pub fn record(&mut self, row: Row<'_>) {
        if self.rate < 1.0 {
            self.owed += self.rate;
            if self.owed < 1.0 {
                return;
            }
            self.owed -= 1.0;
        }
        if self.chunk.is_none() {
            match self.pipe.free.pop() {
                Some(mut c) => {
                    c.model.push_str(&self.model);
                    c.version = self.version;
                    c.input_width = self.input_width;
                    c.output_width = self.output_width;
                    c.clock_offset_ns = chunk::clock_offset_ns();
                    self.chunk = Some(c);
                    self.chunk_started_ns = row.answered_ns;
                }
                None => {
                    self.counters.dropped.fetch_add(1, Ordering::Relaxed);
                    return;
                }
            }
        }
        let c = self.chunk.as_mut().expect("a chunk");
        let session = c.session_index(row.session);
        let engine = c.engine_index(row.engine);
        c.session.push(session);
        c.engine.push(engine);
        c.request_id.push(row.request_id);
        c.priority.push(row.priority);
        c.status.push(row.status);
        c.sent_ns.push(row.sent_ns);
        c.read_ns.push(row.read_ns);
        c.answered_ns.push(row.answered_ns);
        match row.features.filter(|_| self.features) {
            Some(f) => {
                c.has_features.push(true);
                c.features.extend_from_slice(f);
            }
            None => c.has_features.push(false),
        }
        match row.outputs {
            Some((o, confidence)) => {
                c.has_outputs.push(true);
                c.outputs.extend_from_slice(o);
                c.confidence.push(confidence);
            }
            None => c.has_outputs.push(false),
        }
        if c.is_full() {
            self.hand_over();
        }
    }

    /// Hands the chunk to the writer if it has rows and its first is `min_age_ns` old.
    pub fn flush(&mut self, now_ns: u64, min_age_ns: u64) {
        if self.chunk.as_ref().is_some_and(|c| !c.is_empty())
            && now_ns.saturating_sub(self.chunk_started_ns) >= min_age_ns
        {
            self.hand_over();
        }
    }

    /// Rows wait in the chunk being filled.
    pub fn pending(&self) -> bool {
        self.chunk.as_ref().is_some_and(|c| !c.is_empty())
    }

    fn hand_over(&mut self) {
        if let Some(c) = self.chunk.take() {
            if let Err(mut c) = self.pipe.filled.push(c) {
                // Both queues hold at most every chunk: not reached.
                self.counters
                    .dropped
                    .fetch_add(c.len() as u64, Ordering::Relaxed);
                c.clear();
                let _ = self.pipe.free.push(c);
            }
        }
    }
}

impl Drop for LaneJournal {
    /// A lane that goes (its model unloaded, its poller stopped) hands its rows over.
    fn drop(&mut self) {
        self.hand_over();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A journal of `chunks` chunks and no writer.
    fn journal(chunks: usize) -> Arc<Journal> {
        Journal::with_chunks(&JournalSection::default(), chunks)
    }

    fn lane(j: &Arc<Journal>, rate: f64) -> LaneJournal {
        LaneJournal {
            pipe: j.pipe.clone(),
            counters: j.counters("m:1"),
            chunk: None,
            chunk_started_ns: 0,
            rate,
            owed: 0.0,
            features: true,
            model: "m".into(),
            version: 1,
            input_width: 2,
            output_width: 1,
        }
    }

    fn record(l: &mut LaneJournal, i: u64, session: &SessionInfo) {
        l.record(Row {
            session,
            engine: "cpu-mlp",
            request_id: i,
            priority: 1,
            status: 0,
            sent_ns: 1,
            read_ns: 2,
            answered_ns: 3 + i,
            features: Some(&[i as f32, 0.5]),
            outputs: Some((&[i as f32 * 2.0], 0.9)),
        });
    }

    fn session() -> SessionInfo {
        SessionInfo {
            id: 7,
            pid: 1,
            process: "p".into(),
            source: "ring",
        }
    }

    #[test]
    fn a_writer_that_falls_behind_costs_rows_counted_never_a_wait() {
        let j = journal(2);
        let mut l = lane(&j, 1.0);
        let s = session();
        // Two chunks' worth fill both; nothing empties them (no writer): the rest is dropped.
        for i in 0..(2 * CHUNK_ROWS as u64 + 10) {
            record(&mut l, i, &s);
        }
        assert_eq!(j.pipe.filled.len(), 2);
        assert_eq!(l.counters.dropped.load(Ordering::Relaxed), 10);
        // A chunk handed back: rows are kept again, in a fresh chunk.
        let mut c = j.pipe.filled.pop().unwrap();
        assert_eq!(c.len(), CHUNK_ROWS);
        assert_eq!(c.request_id[5], 5);
        assert_eq!(&c.features[10..12], &[5.0, 0.5]);
        assert_eq!(c.outputs[5], 10.0);
        c.clear();
        j.pipe.free.push(c).unwrap();
        record(&mut l, 1000, &s);
        assert!(l.pending());
        // Handed over when old enough, and when the lane goes.
        l.flush(1003 + CHUNK_AGE_NS - 1, CHUNK_AGE_NS);
        assert!(l.pending());
        l.flush(1003 + CHUNK_AGE_NS, CHUNK_AGE_NS);
        assert!(!l.pending());
        assert_eq!(j.pipe.filled.len(), 2);
    }

    #[test]
    fn a_sample_rate_keeps_that_share_evenly() {
        let j = journal(4);
        let mut l = lane(&j, 0.25);
        let s = session();
        for i in 0..100 {
            record(&mut l, i, &s);
        }
        let c = l.chunk.as_ref().unwrap();
        assert_eq!(c.len(), 25);
        assert!(c.request_id.windows(2).all(|w| w[1] - w[0] == 4));
    }
}
