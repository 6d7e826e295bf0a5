//! `poller_task`: drains request rings, batches per model, runs backends, writes responses.
//!
//! One loop does everything for its sessions, with no hand-off between threads on the hot
//! path: scan every session's request ring, validate each frame (a bad one becomes an error
//! entry of the batch, so responses stay in order), run each model's batch, write the
//! responses and publish each touched ring once.
//!
//! Credits: a session may have at most as many requests accepted and not yet consumed as its
//! response ring holds. A client that stops reading responses stops being read from; its
//! frames wait in its request ring and no other session is held up.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use tie_client::clock::monotonic_ns;
use tie_client::segment::{RingEnds, Segment, Side};
use tie_layouts::abi::{
    self, FaultReason, RejectReason, RequestHeader, ResponseFrame, ServerState, Status,
    MAX_OUTPUTS, REQUEST_HEADER_WORDS, RESPONSE_WORDS,
};
use tie_layouts::ring::PushError;

use super::SessionLink;
use crate::config::{IdleStrategy, ServerSection};
use crate::repository::LoadedModel;

/// A session handed from the listener to a poller.
pub(crate) struct NewSession {
    pub link: Arc<SessionLink>,
    pub segment: Arc<Segment>,
    pub model: usize,
}

/// How an idle poller waits.
#[derive(Clone, Copy, Debug)]
pub struct IdlePolicy {
    /// The strategy.
    pub strategy: IdleStrategy,
    /// Spin this long before yielding or parking.
    pub spin: Duration,
    /// Sleep this long when parking.
    pub park: Duration,
}

impl IdlePolicy {
    /// From `[server]`.
    pub fn from_config(s: &ServerSection) -> Self {
        Self {
            strategy: s.idle,
            spin: Duration::from_micros(s.idle_spin_us),
            park: Duration::from_micros(s.idle_park_us),
        }
    }

    fn pause(&self, idle_since: Instant) {
        match self.strategy {
            // No PAUSE: it costs tens of nanoseconds of reaction time on recent x86 cores.
            IdleStrategy::Spin => {}
            _ if idle_since.elapsed() < self.spin => std::hint::spin_loop(),
            IdleStrategy::SpinYield => std::thread::yield_now(),
            IdleStrategy::SpinPark => std::thread::sleep(self.park),
        }
    }
}

/// Counters of one poller, reported when it stops.
#[derive(Clone, Copy, Debug, Default)]
pub struct WorkerStats {
    /// Frames accepted.
    pub requests: u64,
    /// Responses written.
    pub responses: u64,
    /// Batches run.
    pub batches: u64,
}

pub(super) struct WorkerContext {
    pub index: usize,
    pub core: Option<usize>,
    pub models: Arc<[LoadedModel]>,
    pub new_sessions: mpsc::Receiver<NewSession>,
    pub stopping: Arc<AtomicBool>,
    pub idle: IdlePolicy,
}

struct WorkerSession {
    link: Arc<SessionLink>,
    rings: RingEnds,
    model: usize,
    slot_words: usize,
    feature_count: usize,
    response_capacity: u64,
    expected_seq: u64,
    /// Frames accepted (each owes one response).
    accepted: u64,
    /// Responses the client had consumed when last loaded.
    consumed: u64,
    /// Responses pushed and not yet published.
    unpublished: bool,
    /// Once the server stops: frames popped plus those the tail showed then. Nothing past it
    /// is read, so a client that keeps sending cannot hold the shutdown up.
    stop_at: Option<u64>,
}

/// One entry of a batch: a frame accepted, with its outcome so far.
struct Entry {
    session: usize,
    request_id: u64,
    seq: u64,
    deadline_ns: u64,
    accepted_ns: u64,
    status: Status,
    detail_a: u32,
    detail_b: u32,
    /// Row in the batch input (valid when the status is OK).
    row: usize,
}

struct Batch {
    entries: Vec<Entry>,
    input: Vec<f32>,
    output: Vec<f32>,
    rows: usize,
    max_rows: usize,
    width: usize,
    out_width: usize,
}

impl Batch {
    fn new(model: &LoadedModel) -> Self {
        let (w, o, n) = (
            model.input_width(),
            model.output_width(),
            model.max_batch_size,
        );
        Self {
            entries: Vec::with_capacity(n * 2),
            input: vec![0.0; n * w],
            output: vec![0.0; n * o],
            rows: 0,
            max_rows: n,
            width: w,
            out_width: o,
        }
    }

    fn full(&self) -> bool {
        self.rows >= self.max_rows
    }
}

/// The spec's confidence for a prediction with no uncertainty output: `1 / (1 + e^-|v|)`.
pub fn confidence(value: f32) -> f32 {
    1.0 / (1.0 + (-value.abs()).exp())
}

pub(super) fn poller_task(ctx: WorkerContext) -> WorkerStats {
    if let Some(core) = ctx.core {
        if !core_affinity::set_for_current(core_affinity::CoreId { id: core }) {
            tracing::warn!(poller = ctx.index, core, "cannot pin poller to its core");
        }
    }
    let mut p = Poller {
        batches: ctx.models.iter().map(Batch::new).collect(),
        models: ctx.models.clone(),
        sessions: Vec::new(),
        frame: Vec::new(),
        stats: WorkerStats::default(),
        start: 0,
    };
    let mut idle_since: Option<Instant> = None;
    let mut round = 0u32;
    loop {
        let stopping = ctx.stopping.load(Ordering::Relaxed);
        // New sessions are picked up every 64 rounds (a few microseconds when spinning),
        // keeping the channel off the polling path, and on every round of a poller that yields
        // or parks when idle. A stopping poller takes them all first, so that what their
        // clients already sent is answered.
        let parked = ctx.idle.strategy != IdleStrategy::Spin && idle_since.is_some();
        if stopping || parked || round.is_multiple_of(64) {
            while let Ok(new) = ctx.new_sessions.try_recv() {
                p.adopt(new);
            }
        }
        round = round.wrapping_add(1);
        if stopping {
            p.fix_stop_points();
        }
        let accepted = p.scan();
        p.run_batches();
        p.reap();
        if accepted > 0 {
            idle_since = None;
        } else if stopping {
            // Every frame submitted before the stop is answered: the rings are empty now.
            break;
        } else {
            ctx.idle.pause(*idle_since.get_or_insert_with(Instant::now));
        }
    }
    for s in &p.sessions {
        s.rings.segment().set_server_state(ServerState::Closing, 0);
    }
    p.stats
}

impl Drop for Poller {
    /// A poller that panics faults its sessions, so their clients see `Disconnected` at once
    /// instead of waiting on a server that will never answer.
    fn drop(&mut self) {
        if std::thread::panicking() {
            tracing::error!(
                sessions = self.sessions.len(),
                "poller panicked: faulting its sessions"
            );
            for s in &mut self.sessions {
                s.link.dead.store(true, Ordering::SeqCst);
                s.rings.segment().set_server_state(ServerState::Faulted, 0);
            }
        }
    }
}

struct Poller {
    models: Arc<[LoadedModel]>,
    batches: Vec<Batch>,
    sessions: Vec<WorkerSession>,
    /// One request slot of the largest session, reused for every frame.
    frame: Vec<u64>,
    stats: WorkerStats,
    /// Session the next scan starts at, for fairness when batches fill up.
    start: usize,
}

impl Poller {
    fn adopt(&mut self, new: NewSession) {
        let info = *new.segment.info();
        let slot_words = info.request_slot_size as usize / 8;
        if self.frame.len() < slot_words {
            self.frame.resize(slot_words, 0);
        }
        self.sessions.push(WorkerSession {
            link: new.link,
            rings: RingEnds::new(new.segment, Side::Server),
            model: new.model,
            slot_words,
            feature_count: info.feature_count as usize,
            response_capacity: u64::from(info.response_capacity),
            expected_seq: 0,
            accepted: 0,
            consumed: 0,
            unpublished: false,
            stop_at: None,
        });
    }

    /// Bounds what each session may still send once the server stops (see `stop_at`).
    fn fix_stop_points(&mut self) {
        for s in self.sessions.iter_mut().filter(|s| s.stop_at.is_none()) {
            // A corrupt tail leaves nothing more to read.
            let ready = s.rings.available().unwrap_or(0);
            s.stop_at = Some(s.rings.popped() + ready);
        }
    }

    /// Reads frames from every session into the batches; returns how many were accepted.
    fn scan(&mut self) -> usize {
        let n = self.sessions.len();
        let mut accepted = 0;
        for k in 0..n {
            let i = (self.start + k) % n;
            accepted += self.drain_session(i);
        }
        if n > 0 {
            self.start = (self.start + 1) % n;
        }
        accepted
    }

    fn drain_session(&mut self, i: usize) -> usize {
        let s = &mut self.sessions[i];
        if s.link.dead.load(Ordering::Relaxed) {
            return 0;
        }
        let batch = &mut self.batches[s.model];
        if batch.full() {
            return 0;
        }
        // The client's response head is reloaded only when the cached one leaves no credit, so
        // an idle scan does not pull the client's cache line.
        if s.accepted - s.consumed >= s.response_capacity {
            match s.rings.peer_consumed() {
                Ok(c) => s.consumed = c,
                Err(_) => {
                    fault(s, FaultReason::ResponseIndexCorrupt);
                    return 0;
                }
            }
        }
        // Invariant: accepted - consumed in 0..=response_capacity (consumed <= pushed <= accepted).
        let credits = s.response_capacity - (s.accepted - s.consumed);
        let mut taken = 0;
        let mut now = 0;
        let frame = &mut self.frame[..s.slot_words];
        let mut credits = match s.stop_at {
            Some(end) => credits.min(end - s.rings.popped()),
            None => credits,
        };
        while credits > 0 && !batch.full() {
            // The next frame's first word is its sequence number: take it by its stamp.
            match s.rings.try_pop_stamped(s.expected_seq, frame) {
                Ok(true) => {}
                Ok(false) => break,
                Err(_) => {
                    fault(s, FaultReason::RequestIndexCorrupt);
                    return taken;
                }
            }
            if now == 0 {
                now = monotonic_ns();
            }
            let entry = validate(
                s,
                frame,
                batch,
                i,
                now,
                self.models[s.model].layout.allow_non_finite,
            );
            batch.entries.push(entry);
            s.accepted += 1;
            credits -= 1;
            taken += 1;
        }
        if taken > 0 {
            s.rings.release();
            self.stats.requests += taken as u64;
        }
        taken
    }

    /// Runs every model's batch and writes the responses.
    fn run_batches(&mut self) {
        for m in 0..self.batches.len() {
            if self.batches[m].entries.is_empty() {
                continue;
            }
            self.run_batch(m);
        }
        for s in &mut self.sessions {
            if s.unpublished {
                s.rings.publish();
                s.unpublished = false;
            }
        }
    }

    fn run_batch(&mut self, m: usize) {
        let model = &self.models[m];
        let batch = &mut self.batches[m];
        let started_ns = monotonic_ns();
        // Deadlines: a request already late is answered Timeout and not executed.
        let mut late = 0;
        for e in &mut batch.entries {
            if e.status.is_ok() && e.deadline_ns != 0 && started_ns > e.deadline_ns {
                e.status = Status::TIMEOUT;
                e.detail_a = (started_ns - e.deadline_ns).min(u64::from(u32::MAX)) as u32;
                late += 1;
            }
        }
        if late > 0 {
            compact(batch);
        }
        let mut compute_ns = 0;
        if batch.rows > 0 {
            let rows = batch.rows;
            let result = model.backend.run_batch(
                &batch.input[..rows * batch.width],
                rows,
                &mut batch.output[..rows * batch.out_width],
            );
            compute_ns = monotonic_ns() - started_ns;
            self.stats.batches += 1;
            if let Err(e) = result {
                tracing::error!(model = %model.key(), rows, error = %e, "batch failed");
                for e in batch.entries.iter_mut().filter(|e| e.status.is_ok()) {
                    e.status = Status::EXECUTION_FAILED;
                }
            }
        }
        let ow = batch.out_width;
        let response_words = abi::response_words(ow as u32);
        for e in batch.entries.drain(..) {
            let mut frame = ResponseFrame {
                request_id: e.request_id,
                seq: e.seq,
                status: e.status.0,
                model_version: model.version,
                detail_a: e.detail_a,
                detail_b: e.detail_b,
                queue_ns: saturate_u32(started_ns.saturating_sub(e.accepted_ns)),
                compute_ns: saturate_u32(compute_ns),
                ..ResponseFrame::default()
            };
            if e.status.is_ok() {
                let out = &batch.output[e.row * ow..(e.row + 1) * ow];
                frame.output_count = ow as u32;
                frame.outputs[..ow.min(MAX_OUTPUTS)].copy_from_slice(&out[..ow.min(MAX_OUTPUTS)]);
                frame.confidence = confidence(out[0]);
            }
            let s = &mut self.sessions[e.session];
            if s.link.dead.load(Ordering::Relaxed) {
                continue;
            }
            let words: [u64; RESPONSE_WORDS] = bytemuck::cast(frame);
            // Only the header and the outputs: for up to 4 outputs, one cache line.
            match s.rings.try_push(&words[..response_words]) {
                Ok(()) => {
                    s.unpublished = true;
                    self.stats.responses += 1;
                }
                // Credits make this impossible for a client that follows the protocol.
                Err(PushError::Full) => {
                    tracing::warn!(
                        session = s.link.id,
                        "response ring full: client broke the credit rule"
                    );
                    fault(s, FaultReason::ResponseIndexCorrupt);
                }
                Err(PushError::Corrupt(_)) => fault(s, FaultReason::ResponseIndexCorrupt),
            }
        }
        batch.rows = 0;
    }

    /// Drops sessions that are dead (hung up or faulted); their segments unmap here.
    fn reap(&mut self) {
        let before = self.sessions.len();
        self.sessions
            .retain(|s| !s.link.dead.load(Ordering::Relaxed));
        if self.sessions.len() != before {
            self.start = 0;
        }
    }
}

fn fault(s: &mut WorkerSession, reason: FaultReason) {
    if !s.link.dead.swap(true, Ordering::SeqCst) {
        tracing::warn!(
            session = s.link.id,
            ?reason,
            "session faulted: protocol violation"
        );
        s.rings
            .segment()
            .set_server_state(ServerState::Faulted, reason.code());
    }
}

/// Checks a frame; an accepted one has its features copied into the batch.
fn validate(
    s: &mut WorkerSession,
    frame: &[u64],
    batch: &mut Batch,
    session: usize,
    now: u64,
    allow_non_finite: bool,
) -> Entry {
    let header: RequestHeader =
        bytemuck::pod_read_unaligned(bytemuck::cast_slice(&frame[..REQUEST_HEADER_WORDS]));
    let mut entry = Entry {
        session,
        request_id: header.request_id,
        seq: header.seq,
        deadline_ns: header.deadline_ns,
        accepted_ns: now,
        status: Status::OK,
        detail_a: 0,
        detail_b: 0,
        row: 0,
    };
    // The expected number counts frames: a client's bad number is not adopted, so it cannot
    // steer the stamp the next frame is taken by.
    let expected_seq = s.expected_seq;
    s.expected_seq = expected_seq.wrapping_add(1);
    let reject = |e: &mut Entry, status: Status, a: u32, b: u32| {
        e.status = status;
        e.detail_a = a;
        e.detail_b = b;
    };
    if header.seq != expected_seq {
        reject(
            &mut entry,
            Status::REJECTED,
            RejectReason::BadSequence as u32,
            expected_seq as u32,
        );
    } else if header.model_slot != 0 {
        reject(&mut entry, Status::MODEL_NOT_FOUND, header.model_slot, 0);
    } else if header.feature_count as usize != s.feature_count {
        reject(
            &mut entry,
            Status::INVALID_INPUT_SHAPE,
            s.feature_count as u32,
            header.feature_count,
        );
    } else if header.priority > 3 {
        reject(
            &mut entry,
            Status::REJECTED,
            RejectReason::BadPriority as u32,
            header.priority,
        );
    } else if header.flags != 0 {
        reject(
            &mut entry,
            Status::REJECTED,
            RejectReason::BadReserved as u32,
            0,
        );
    } else {
        let features: &[f32] = bytemuck::cast_slice(&frame[REQUEST_HEADER_WORDS..]);
        let features = &features[..s.feature_count];
        match features.iter().position(|f| !f.is_finite()) {
            Some(i) if !allow_non_finite => {
                reject(
                    &mut entry,
                    Status::REJECTED,
                    RejectReason::NonFinite as u32,
                    i as u32,
                );
            }
            _ => {
                let row = batch.rows;
                batch.input[row * batch.width..(row + 1) * batch.width].copy_from_slice(features);
                entry.row = row;
                batch.rows += 1;
            }
        }
    }
    entry
}

fn saturate_u32(ns: u64) -> u32 {
    ns.min(u64::from(u32::MAX)) as u32
}

/// Removes the rows of entries no longer OK, keeping the others in order.
fn compact(batch: &mut Batch) {
    let w = batch.width;
    let mut next = 0;
    for e in batch.entries.iter_mut().filter(|e| e.status.is_ok()) {
        if e.row != next {
            batch
                .input
                .copy_within(e.row * w..(e.row + 1) * w, next * w);
            e.row = next;
        }
        next += 1;
    }
    batch.rows = next;
}
