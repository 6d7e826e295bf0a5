//! [`Chunk`]: up to [`CHUNK_ROWS`] journaled answers of one model version, held as columns
//! and reused (cleared, never freed) so that a poller filling one allocates nothing once its
//! buffers have grown.

use std::sync::Arc;

/// Rows in one chunk.
pub const CHUNK_ROWS: usize = 256;

/// Who sent the rows: one entry per session met in the chunk.
#[derive(Clone, Debug)]
pub struct SessionInfo {
    /// The server's session id.
    pub id: u64,
    /// The client's process id (the server's own for HTTP and gRPC predictions).
    pub pid: u32,
    /// The client's process name (`/proc/PID/comm`).
    pub process: Arc<str>,
    /// `ring`, or `http` for the control plane's own sessions.
    pub source: &'static str,
}

/// Journaled answers of one model version, column by column.
#[derive(Debug, Default)]
pub struct Chunk {
    /// The model's name.
    pub model: String,
    /// Its version.
    pub version: u32,
    /// Features per row.
    pub input_width: usize,
    /// Outputs per row.
    pub output_width: usize,
    /// CLOCK_REALTIME − CLOCK_MONOTONIC (ns) when the first row was added: turns the rows'
    /// monotonic stamps into wall-clock time.
    pub clock_offset_ns: i64,
    /// The engines that ran rows (a model split by batch size has two).
    pub engines: Vec<&'static str>,
    /// The sessions that sent rows.
    pub sessions: Vec<SessionInfo>,
    /// Per row: its session (index into `sessions`).
    pub session: Vec<u32>,
    /// Per row: its engine (index into `engines`).
    pub engine: Vec<u8>,
    /// Per row: the client's request id.
    pub request_id: Vec<u64>,
    /// Per row: priority, 0 Low ..= 3 Critical.
    pub priority: Vec<u8>,
    /// Per row: the status answered.
    pub status: Vec<u32>,
    /// Per row: CLOCK_MONOTONIC when the client sent it (0: not stamped).
    pub sent_ns: Vec<u64>,
    /// Per row: CLOCK_MONOTONIC when the server read it.
    pub read_ns: Vec<u64>,
    /// Per row: CLOCK_MONOTONIC when its answer was ready.
    pub answered_ns: Vec<u64>,
    /// Per row: whether its features are in `features`.
    pub has_features: Vec<bool>,
    /// `input_width` values per row with features, in row order.
    pub features: Vec<f32>,
    /// Per row: whether its outputs (and confidence) are in `outputs` (it ran).
    pub has_outputs: Vec<bool>,
    /// `output_width` values per row that ran, in row order.
    pub outputs: Vec<f32>,
    /// Per row that ran: its confidence.
    pub confidence: Vec<f32>,
}

impl Chunk {
    /// Rows held.
    pub fn len(&self) -> usize {
        self.request_id.len()
    }

    /// No rows held.
    pub fn is_empty(&self) -> bool {
        self.request_id.is_empty()
    }

    /// A CLOCK_MONOTONIC stamp of its rows as wall-clock time (ns since the epoch).
    pub fn wall_ns(&self, monotonic_ns: u64) -> i64 {
        (monotonic_ns as i64).saturating_add(self.clock_offset_ns)
    }

    /// Full: hand it to the writer.
    pub fn is_full(&self) -> bool {
        self.len() >= CHUNK_ROWS
    }

    /// Empties it for another use, keeping its buffers.
    pub fn clear(&mut self) {
        self.model.clear();
        self.engines.clear();
        self.sessions.clear();
        self.session.clear();
        self.engine.clear();
        self.request_id.clear();
        self.priority.clear();
        self.status.clear();
        self.sent_ns.clear();
        self.read_ns.clear();
        self.answered_ns.clear();
        self.has_features.clear();
        self.features.clear();
        self.has_outputs.clear();
        self.outputs.clear();
        self.confidence.clear();
    }

    /// The index of `session` in the chunk's table, added if new (the last one is checked
    /// first: rows of one session tend to follow each other).
    pub fn session_index(&mut self, session: &SessionInfo) -> u32 {
        if let Some(last) = self.sessions.last() {
            if last.id == session.id {
                return (self.sessions.len() - 1) as u32;
            }
        }
        match self.sessions.iter().position(|s| s.id == session.id) {
            Some(i) => i as u32,
            None => {
                self.sessions.push(session.clone());
                (self.sessions.len() - 1) as u32
            }
        }
    }

    /// The index of `engine` in the chunk's table, added if new.
    pub fn engine_index(&mut self, engine: &'static str) -> u8 {
        match self.engines.iter().position(|e| *e == engine) {
            Some(i) => i as u8,
            None => {
                self.engines.push(engine);
                (self.engines.len() - 1) as u8
            }
        }
    }
}

/// Wall-clock nanoseconds since the epoch as RFC 3339 (UTC, to the nanosecond).
pub fn rfc3339(wall_ns: i64) -> String {
    chrono::DateTime::from_timestamp_nanos(wall_ns)
        .to_rfc3339_opts(chrono::SecondsFormat::Nanos, true)
}

/// CLOCK_REALTIME − CLOCK_MONOTONIC now, in nanoseconds.
pub fn clock_offset_ns() -> i64 {
    let real = rustix::time::clock_gettime(rustix::time::ClockId::Realtime);
    let mono = tie_client::monotonic_ns() as i64;
    (real.tv_sec * 1_000_000_000 + real.tv_nsec) - mono
}
