//! `poller_task`: drains request rings into per-model batch queues, runs the batches the
//! policy asks for, writes responses.
//!
//! One loop does everything for its sessions, with no hand-off between threads on the hot
//! path: scan every session's request ring and validate each frame (a bad one is queued as an
//! answered request, so responses stay in order), ask each model's [`BatchQueue`] for answers
//! that need no batch and for a batch to run, run it, write the responses and publish each
//! touched ring once.
//!
//! A model with `pipeline_depth > 0` has its batches launched on a [`Pipeline`] (the GPU's
//! streams, or a batch thread) instead: the loop goes on while they run and answers each, in
//! launch order, once it is done (`Flight`s). A session with requests in a batch in flight
//! has its later resolved answers held back until that batch is answered, and keeps its slot
//! (even once dead) until then.
//!
//! Credits: a session may have at most as many requests accepted and not yet consumed as its
//! response ring holds. A client that stops reading responses stops being read from; its
//! frames wait in its request ring and no other session is held up.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use tie_client::clock::monotonic_ns;
use tie_client::segment::{RingEnds, Segment, Side};
use tie_layouts::abi::{
    self, FaultReason, ResponseFrame, ServerState, Status, MAX_OUTPUTS, RESPONSE_WORDS,
};
use tie_layouts::check::read_header;
use tie_layouts::ring::PushError;

use super::SessionLink;
use crate::config::{IdleStrategy, ServerSection};
use crate::dataplane::batch::{
    ArenaRow, BatchQueue, BatchStats, Decision, Outcome, Request, Taken,
};
use crate::journal::{Journal, LaneJournal, Taps};
use crate::models::LoadedModel;
use crate::models::{ModelSet, Models};
use crate::monitor::{Monitor, Recorder, Stage};
use tie_engine::{BackendError, Pipeline};

/// A session handed from the listener to a poller.
pub(crate) struct NewSession {
    pub link: Arc<SessionLink>,
    pub segment: Arc<Segment>,
    /// The slot of the version its hello was answered for.
    pub model: usize,
    /// That version, as the hello reply described it (layout, widths).
    pub described: Arc<LoadedModel>,
    /// The client named no version: the session follows its model's default.
    pub follows_default: bool,
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

    /// Waits once; never sleeps past `wake_ns` (a batch waiting for its timeout).
    fn pause(&self, idle_since: Instant, wake_ns: Option<u64>) {
        match self.strategy {
            // No PAUSE: it costs tens of nanoseconds of reaction time on recent x86 cores.
            IdleStrategy::Spin => {}
            _ if idle_since.elapsed() < self.spin => std::hint::spin_loop(),
            IdleStrategy::SpinYield => std::thread::yield_now(),
            IdleStrategy::SpinPark => {
                let park = match wake_ns {
                    Some(t) => {
                        Duration::from_nanos(t.saturating_sub(monotonic_ns())).min(self.park)
                    }
                    None => self.park,
                };
                // A sleep lasts at least the timer slack (~50 us): a shorter wait (for a batch
                // that must start soon) is spun, so the batch does not start late.
                if wake_ns.is_none() || park >= SLEEP_FLOOR {
                    std::thread::sleep(park);
                } else {
                    std::hint::spin_loop();
                }
            }
        }
    }
}

/// How long a poller stays idle before it hands its figures to the monitor.
const IDLE_FLUSH: Duration = Duration::from_millis(1);

/// One batch in this many has its gather and execute stages timed.
pub const GATHER_SAMPLING: u64 = 8;

/// How long a stopping poller waits for clients to make room for the answers to frames they
/// sent before the stop.
const STOP_GRACE: Duration = Duration::from_secs(1);

/// Shortest wait for a batch that a parked poller sleeps for (shorter ones are spun).
const SLEEP_FLOOR: Duration = Duration::from_micros(60);

/// A session that sent nothing for this long, and is owed nothing, goes cold (see `scan`).
const COLD_AFTER_NS: u64 = 1_000_000;

/// Cold sessions looked at per round (see `scan`).
const COLD_PER_ROUND: usize = 8;

/// Rounds between two looks for hot sessions that went quiet.
const COOLING_ROUNDS: u32 = 1024;

/// Counters of one poller, reported when it stops.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WorkerStats {
    /// Frames accepted.
    pub requests: u64,
    /// Responses written.
    pub responses: u64,
    /// Batches run.
    pub batches: u64,
    /// Rows executed in those batches (padding excluded).
    pub rows: u64,
}

/// A poller's counters as others can read them while it runs (stored once per busy round;
/// the per-model batch counters every 256 busy rounds and when the poller goes idle).
#[derive(Debug, Default)]
pub struct SharedStats {
    requests: std::sync::atomic::AtomicU64,
    responses: std::sync::atomic::AtomicU64,
    batches: std::sync::atomic::AtomicU64,
    rows: std::sync::atomic::AtomicU64,
    /// Per model (index in the server's model list): batch counters.
    batch: std::sync::Mutex<Vec<BatchStats>>,
}

impl SharedStats {
    fn store(&self, s: &WorkerStats) {
        // Relaxed: independent counters for observers; nothing is ordered by them.
        self.requests.store(s.requests, Ordering::Relaxed);
        self.responses.store(s.responses, Ordering::Relaxed);
        self.batches.store(s.batches, Ordering::Relaxed);
        self.rows.store(s.rows, Ordering::Relaxed);
    }

    /// Copies the lanes' batch counters, unless a reader holds them (then next time).
    fn store_batch(&self, lanes: &[Option<ModelLane>]) {
        if let Ok(mut stats) = self.batch.try_lock() {
            stats.clear();
            stats.extend(lanes.iter().map(|l| {
                l.as_ref()
                    .map(|l| l.queue.stats().clone())
                    .unwrap_or_default()
            }));
        }
    }

    /// Per-model batch counters as last stored (indexed like the server's models).
    pub fn load_batch(&self) -> Vec<BatchStats> {
        self.batch.lock().map(|s| s.clone()).unwrap_or_default()
    }

    /// The counters as last stored.
    pub fn load(&self) -> WorkerStats {
        WorkerStats {
            requests: self.requests.load(Ordering::Relaxed),
            responses: self.responses.load(Ordering::Relaxed),
            batches: self.batches.load(Ordering::Relaxed),
            rows: self.rows.load(Ordering::Relaxed),
        }
    }
}

pub(super) struct PollerContext {
    pub index: usize,
    pub core: Option<usize>,
    /// Every poller's core (kept free of batch threads).
    pub poller_cores: Vec<usize>,
    /// Its sessions' hang-ups, counted by the listener.
    pub hangups: Arc<std::sync::atomic::AtomicU64>,
    pub models: Arc<Models>,
    pub new_sessions: mpsc::Receiver<NewSession>,
    pub stopping: Arc<AtomicBool>,
    pub idle: IdlePolicy,
    pub shared: Arc<SharedStats>,
    pub monitor: Arc<Monitor>,
    /// The server's journal, if it keeps one.
    pub journal: Option<Arc<Journal>>,
}

struct WorkerSession {
    link: Arc<SessionLink>,
    rings: RingEnds,
    /// The slot of the version its frames go to.
    model: usize,
    /// It follows its model's default version (the client named none).
    follows_default: bool,
    /// Where it goes once every request it sent to `model` is answered: the model set changed.
    switch: Option<Switch>,
    /// Responses written.
    responded: u64,
    slot_words: usize,
    feature_count: usize,
    response_capacity: u64,
    expected_seq: u64,
    /// Frames accepted (each owes one response).
    accepted: u64,
    /// Responses the client had consumed when last loaded.
    consumed: u64,
    /// Responses pushed and not yet published (its slot is then in the poller's `touched`).
    unpublished: bool,
    /// When it last sent a frame (or was adopted).
    last_frame_ns: u64,
    /// It is cold (see `Poller::scan`).
    cold: bool,
    /// Responses sent with an error status (mirrored into the segment for observers).
    errors: u64,
    /// Requests taken into batches in flight and not yet answered: its later answers wait for
    /// them, and its slot is not reused before they are answered.
    in_flight: u32,
    /// Once the server stops: frames popped plus those the tail showed then. Nothing past it
    /// is read, so a client that keeps sending cannot hold the shutdown up.
    stop_at: Option<u64>,
}

/// A cold session (see [`Poller::scan`]).
struct Cold {
    slot: usize,
    /// Its request ring's tail when it went cold.
    tail: u64,
    watch: tie_client::segment::TailWatch,
}

/// Where a session goes when its model leaves the set or its default changes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Switch {
    /// To the version in this slot (same layout).
    To(usize),
    /// Nowhere: the session closes (its version was unloaded, or the new default reads
    /// another layout).
    Close,
}

/// What the poller keeps of a queued request.
#[derive(Clone, Copy, Debug)]
struct Item {
    /// Session slot.
    session: usize,
    request_id: u64,
    seq: u64,
    /// OK, or the error it was answered with when read.
    status: Status,
    detail_a: u32,
    detail_b: u32,
    /// The client's send stamp (for the journal).
    sent_ns: u64,
}

/// Batches of a lane in flight on its pipeline at which a batch that is not full waits for
/// them, past its timeout ([`BatchQueue::decide`]'s `held`): one running and one queued behind
/// it keep the device busy, and the rows that arrive meanwhile join the next batch instead of
/// queueing on the device in small ones. Measured against never holding and holding behind
/// one (BENCHMARKS.md, seventh session): behind one left the device idle between batches.
const HOLD_BEHIND: usize = 2;

/// A batch launched on a lane's pipeline and not yet answered.
struct Flight {
    /// Every request it answers, in answer order (its rows, and the resolved or late heads
    /// met while gathering them).
    taken: Vec<Taken<Item>>,
    /// Rows launched; 0: nothing was launched (only resolved or late heads were taken).
    rows: usize,
    started_ns: u64,
    /// When its rows were gathered, on a batch whose stages are timed; else 0.
    gathered_ns: u64,
    /// Its rows' features, kept for the journal (empty when the model keeps none).
    features: Vec<f32>,
}

/// Per-model state of a poller.
struct ModelLane {
    /// The version it runs (held until the lane is dropped).
    model: Arc<LoadedModel>,
    queue: BatchQueue<Item>,
    input: Vec<f32>,
    output: Vec<f32>,
    /// Estimated compute time of a full batch (for deadlines): profiled, then measured.
    batch_compute_ns: u64,
    /// This poller's figures of the model, for the performance monitor.
    rec: Recorder,
    /// Batches run, for sampling the gather and execute stages.
    batches_run: u64,
    /// Batches run on the GPU without waiting for them, where the backend can.
    pipeline: Option<Box<dyn Pipeline>>,
    /// Batches launched on the pipeline (or taken with no row to launch) and not yet
    /// answered, oldest first: answered in this order.
    flights: VecDeque<Flight>,
    /// Answered flights' lists (taken requests, features), reused.
    spare: Vec<(Vec<Taken<Item>>, Vec<f32>)>,
    /// When the last flight answered was found done.
    last_done_ns: u64,
    /// Where its answers are journaled (`journal = true`) and handed to its shadow (a rule in
    /// `routing.toml`).
    taps: Taps,
    /// The features of the batch run last (not on the pipeline), kept for the journal when
    /// it keeps them (else empty).
    features: Vec<f32>,
}

impl ModelLane {
    fn new(
        model: Arc<LoadedModel>,
        rec: Recorder,
        poller_cores: &[usize],
        journal: Option<&Arc<Journal>>,
    ) -> Self {
        let largest = model.batch.largest_batch();
        let mut queue = BatchQueue::new(model.batch.clone(), model.input_width());
        if let Some(p) = &model.profile {
            queue.set_optimal_batch_size(p.optimal_batch_size);
        }
        let batch_compute_ns = model
            .profile
            .as_ref()
            .map_or(0, |p| p.compute_ns(queue.full_size()));
        let pipeline = pipeline_for(&model, largest, poller_cores);
        let taps = Taps {
            journal: LaneJournal::for_model(journal, &model),
            shadow: None,
        };
        Self {
            input: vec![0.0; largest * model.input_width()],
            output: vec![0.0; largest * model.output_width()],
            model,
            queue,
            batch_compute_ns,
            rec,
            batches_run: 0,
            pipeline,
            flights: VecDeque::new(),
            spare: Vec::new(),
            last_done_ns: 0,
            taps,
            features: Vec::new(),
        }
    }
}

/// The pipeline a lane of `model` keeps its batches in flight in (`pipeline_depth`): the
/// backend's own (the GPU's streams), else a batch thread of the lane's own, which runs on the
/// process's CPUs but the pollers' (`poller_cores`); `None` at depth 0, or when neither can be
/// had (logged: the poller then waits for each batch).
///
/// Built on the poller's thread, once per model and poller (on the GPU, graph captures: a few
/// milliseconds, logged).
fn pipeline_for(
    model: &Arc<LoadedModel>,
    largest: usize,
    poller_cores: &[usize],
) -> Option<Box<dyn Pipeline>> {
    let depth = model.config.pipeline_depth;
    if depth == 0 {
        return None;
    }
    if let Some(p) = model.backend.pipeline(depth) {
        return Some(p);
    }
    match tie_engine::ThreadPipeline::new(
        model.backend.clone(),
        depth,
        largest,
        format!("tie-batch-{}", model.name),
        off_poller_cores(poller_cores.to_vec()),
    ) {
        Ok(p) => {
            tracing::info!(model = %model.key(), depth, "batches computed on a batch thread");
            Some(Box::new(p))
        }
        Err(e) => {
            tracing::warn!(model = %model.key(), error = %e, "no batch thread: the poller waits for each batch");
            None
        }
    }
}

/// Moves the thread that runs it off the pollers' cores: onto the CPUs the process's main
/// thread may run on, but `poller_cores` and their SMT siblings (a thread started by a pinned
/// poller inherits its one core). Where that leaves none it stays where it is, and says so.
pub(crate) fn off_poller_cores(poller_cores: Vec<usize>) -> Box<dyn FnOnce() + Send> {
    Box::new(move || match move_off_poller_cores(&poller_cores) {
        // `tie serve` said so at start, for its main thread: every later thread is placed alike.
        Ok(OffPollerCores::Moved | OffPollerCores::AlreadyOff | OffPollerCores::OnSiblings) => {}
        Ok(OffPollerCores::NoOtherCpu) => tracing::warn!(
            poller_cores = ?poller_cores,
            "a thread stays on a poller's core: the process may run on no other CPU"
        ),
        Err(e) => tracing::warn!(error = %e, "a thread stays on its poller's core"),
    })
}

/// What [`move_off_poller_cores`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OffPollerCores {
    /// The thread now runs off the poller cores and their SMT siblings.
    Moved,
    /// It did already (isolated cores, for one, are outside the process's CPUs).
    AlreadyOff,
    /// It runs off the poller cores, but on SMT siblings of theirs: the process may run on no
    /// other CPU.
    OnSiblings,
    /// Every CPU the process may run on is a poller core: the thread stays where it is.
    NoOtherCpu,
}

/// Moves the calling thread off `poller_cores` and their SMT siblings: onto the CPUs the
/// process's main thread may run on, but those (where none remains but siblings, onto the
/// siblings). Threads it starts afterwards inherit that, so `tie serve` calls it before it
/// starts any: its control plane, monitor, listener, model loading, batch threads and journal
/// writer then never run on a core where a poller spins, nor on the other hardware thread of
/// one. (A thread woken onto a poller's core takes it from the poller for as long as it runs,
/// and the scheduler puts a woken thread there when the cores it would rather use are busy; a
/// busy sibling shares the core's pipeline and caches with the poller.) The pollers pin
/// themselves to their cores.
///
/// # Errors
/// The kernel's refusal to read or set the affinity.
pub fn move_off_poller_cores(poller_cores: &[usize]) -> rustix::io::Result<OffPollerCores> {
    use rustix::thread::{sched_getaffinity, sched_setaffinity, CpuSet};
    let allowed = sched_getaffinity(Some(rustix::process::getpid()))?;
    let allowed: Vec<usize> = (0..CpuSet::MAX_CPU)
        .filter(|&c| allowed.is_set(c))
        .collect();
    let Some((cpus, on_siblings)) =
        cpus_off_pollers(&allowed, poller_cores, crate::host::smt_siblings_cached)
    else {
        return Ok(OffPollerCores::NoOtherCpu);
    };
    let mut set = CpuSet::new();
    for &c in &cpus {
        set.set(c);
    }
    let done = if on_siblings {
        OffPollerCores::OnSiblings
    } else if sched_getaffinity(None)? == set {
        return Ok(OffPollerCores::AlreadyOff);
    } else {
        OffPollerCores::Moved
    };
    sched_setaffinity(None, &set)?;
    Ok(done)
}

/// The CPUs of `allowed` for the threads that are not pollers: those neither in `pollers` nor
/// a sibling of one (`siblings` gives a CPU's), else, where that leaves none, those not in
/// `pollers`, with `true` (siblings used); `None` when every allowed CPU is a poller's.
fn cpus_off_pollers(
    allowed: &[usize],
    pollers: &[usize],
    siblings: impl Fn(usize) -> Vec<usize>,
) -> Option<(Vec<usize>, bool)> {
    let off: Vec<usize> = allowed
        .iter()
        .copied()
        .filter(|c| !pollers.contains(c))
        .collect();
    if off.is_empty() {
        return None;
    }
    let near: Vec<usize> = pollers.iter().flat_map(|&p| siblings(p)).collect();
    let apart: Vec<usize> = off.iter().copied().filter(|c| !near.contains(c)).collect();
    Some(if apart.is_empty() {
        (off, true)
    } else {
        (apart, false)
    })
}

/// The deadline estimate (a lane's `batch_compute_ns`) follows what batches really take (EMA,
/// 1/8 weight).
fn observe_compute(estimate: &mut u64, compute_ns: u64) {
    *estimate = *estimate - *estimate / 8 + compute_ns / 8;
}

/// Counts a batch about to be gathered; whether its gather and execute stages are timed: on
/// one batch in [`GATHER_SAMPLING`] (a clock read each), the other stages being timed on every
/// request.
fn timed_batch(batches_run: &mut u64) -> bool {
    *batches_run = batches_run.wrapping_add(1);
    batches_run.is_multiple_of(GATHER_SAMPLING)
}

/// Takes a batch from `queue` into `staging` (a backend's or a pipeline's), appending what it
/// answers to `taken`. Returns the rows taken, when they were (if `timed`, else 0), and the
/// rows to run (padding included; 0 when no row was taken).
fn gather(
    queue: &mut BatchQueue<Item>,
    started_ns: u64,
    staging: &mut [f32],
    taken: &mut Vec<Taken<Item>>,
    timed: bool,
    keep: Option<&mut Vec<f32>>,
) -> (usize, u64, usize) {
    let (rows, padded) = queue.take(started_ns, staging, taken);
    if let Some(keep) = keep {
        // The journal's copy of the rows' features.
        keep.clear();
        keep.extend_from_slice(&staging[..rows * queue.width()]);
    }
    let at = if timed { monotonic_ns() } else { 0 };
    (rows, at, if rows == 0 { 0 } else { padded })
}

/// The engine name the journal records for a batch `backend` ran (empty, and not asked for,
/// when the lane keeps no journal).
fn journaled_engine(journaled: bool, backend: &dyn tie_engine::Backend) -> &'static str {
    if journaled {
        backend.info().engine
    } else {
        ""
    }
}

/// Counts a batch of `rows` run: the poller's figures and the model's.
fn count_batch(stats: &mut WorkerStats, rec: &mut Recorder, rows: usize) {
    stats.batches += 1;
    stats.rows += rows as u64;
    let sample = rec.sample();
    sample.batches += 1;
    sample.rows += rows as u64;
}

/// The spec's confidence for a prediction with no uncertainty output: `1 / (1 + e^-|v|)`.
pub fn confidence(value: f32) -> f32 {
    1.0 / (1.0 + (-value.abs()).exp())
}

/// The spec's confidence from an uncertainty output: `1 - min(|u|, 1)`.
pub fn confidence_from_uncertainty(uncertainty: f32) -> f32 {
    1.0 - uncertainty.abs().min(1.0)
}

/// The confidence of a row's answer: from the model's uncertainty column when it has one,
/// else from its first value.
pub fn row_confidence(outputs: &[f32], uncertainty_output: Option<usize>) -> f32 {
    match uncertainty_output {
        Some(k) => confidence_from_uncertainty(outputs[k]),
        None => confidence(outputs[0]),
    }
}

pub(super) fn poller_task(ctx: PollerContext) -> WorkerStats {
    if let Some(core) = ctx.core {
        if !core_affinity::set_for_current(core_affinity::CoreId { id: core }) {
            tracing::warn!(poller = ctx.index, core, "cannot pin poller to its core");
        }
    }
    let mut p = Poller {
        poller_cores: ctx.poller_cores.clone(),
        hangups: ctx.hangups.clone(),
        hangups_seen: 0,
        lanes: Vec::new(),
        // The generation first: a change in between is then seen at the first refresh.
        generation: ctx.models.generation(),
        set: ctx.models.snapshot(),
        models: ctx.models.clone(),
        monitor: ctx.monitor.clone(),
        retiring: false,
        sessions: Vec::new(),
        frame: Vec::new(),
        taken: Vec::new(),
        stats: WorkerStats::default(),
        hot: Vec::new(),
        cold: Vec::new(),
        cold_next: 0,
        touched: Vec::new(),
        journal: ctx.journal.clone(),
        shadow_generation: u64::MAX,
    };
    let mut rounds = Rounds::default();
    loop {
        let stopping = ctx.stopping.load(Ordering::Relaxed);
        // New sessions are picked up every 64 rounds (a few microseconds when spinning),
        // keeping the channel off the polling path, and on every round of a poller that yields
        // or parks when idle. A stopping poller takes them all first, so that what their
        // clients already sent is answered.
        let parked = ctx.idle.strategy != IdleStrategy::Spin && rounds.idle;
        if stopping || parked || rounds.round.is_multiple_of(64) {
            p.pick_up(&ctx.new_sessions);
        }
        rounds.round = rounds.round.wrapping_add(1);
        if stopping {
            p.fix_stop_points();
        }
        let accepted = p.scan();
        let (answered, wake_ns, flying) = p.run_lanes(stopping);
        p.reap();
        if rounds.round.is_multiple_of(COOLING_ROUNDS) && !stopping {
            p.cool();
        }
        if accepted > 0 || answered > 0 || flying {
            ctx.shared.store(&p.stats);
            if rounds.round.is_multiple_of(256) {
                ctx.shared.store_batch(&p.lanes);
                p.flush_metrics(crate::monitor::FLUSH_NS);
            }
            rounds.idle_rounds = 0;
            rounds.idle = false;
            rounds.idle_since = None;
            continue;
        }
        p.idle_round(&ctx, &mut rounds);
        if stopping
            && p.lanes
                .iter()
                .flatten()
                .all(|l| l.queue.is_empty() && l.flights.is_empty())
            && (!p.frames_before_stop_unread()
                || rounds
                    .stop_started
                    .get_or_insert_with(Instant::now)
                    .elapsed()
                    >= STOP_GRACE)
        {
            // Every frame submitted before the stop is answered, or its client has not read
            // its responses (no credit to read more) for the whole grace period.
            break;
        }
        // A spinning poller does not wait, so it reads no clock here: under load it goes idle
        // between most frames, and a clock read each time would be a share of every request.
        if ctx.idle.strategy != IdleStrategy::Spin {
            ctx.idle
                .pause(*rounds.idle_since.get_or_insert_with(Instant::now), wake_ns);
        }
    }
    for s in p.sessions.iter().flatten() {
        s.rings.segment().set_server_state(ServerState::Closing, 0);
    }
    // The last figures reach the monitor, waiting for its locks if need be.
    for lane in p.lanes.iter_mut().flatten() {
        lane.rec.finish();
    }
    p.stats
}

/// A poller's count of its rounds and of how long it has been idle.
#[derive(Default)]
struct Rounds {
    round: u32,
    /// Rounds in a row with nothing accepted or answered.
    idle_rounds: u32,
    /// Since when nothing was accepted or answered, as read at the first look after the
    /// poller went idle (`None`: busy, or idle and not looked yet).
    idle_since: Option<Instant>,
    /// Whether the last round was idle.
    idle: bool,
    /// When the stop found frames its clients had not read the answers of.
    stop_started: Option<Instant>,
}

impl Poller {
    /// Applies a change of the model set (load, reload, unload: it moves or closes sessions)
    /// or of the shadow rules, and adopts the sessions the listener handed over.
    fn pick_up(&mut self, new_sessions: &mpsc::Receiver<NewSession>) {
        self.refresh();
        // A change of the shadow rules (they change before the reload that made it answers).
        let shadows = self.monitor.shadows.get().map(|s| s.generation());
        if shadows.is_some_and(|g| g != self.shadow_generation) {
            self.tap_shadows();
        }
        while let Ok(new) = new_sessions.try_recv() {
            self.adopt(new);
        }
        if self.retiring {
            self.retire_lanes();
        }
    }

    /// A round with nothing accepted or answered: the figures of a poller going idle, or idle
    /// for a while, reach the readers and the monitor.
    fn idle_round(&mut self, ctx: &PollerContext, rounds: &mut Rounds) {
        if !rounds.idle {
            rounds.idle = true;
            // Going idle: the batch counters are current for readers, and the latencies
            // kept during the busy rounds go into their histograms (off the path of the
            // requests just answered).
            ctx.shared.store_batch(&self.lanes);
            for lane in self.lanes.iter_mut().flatten() {
                if lane.rec.is_dirty() {
                    lane.rec.sample().settle();
                }
            }
        }
        // Idle for a while (checked on one idle round in 256, so a request arriving between
        // two of a client's finds no clock read in its way): the figures reach the monitor.
        rounds.idle_rounds = rounds.idle_rounds.wrapping_add(1);
        // (A poller that yields or sleeps checks every round: the clock costs nothing next to
        // the wait.)
        if (ctx.idle.strategy != IdleStrategy::Spin || rounds.idle_rounds.is_multiple_of(256))
            && rounds.idle_since.get_or_insert_with(Instant::now).elapsed() >= IDLE_FLUSH
            && self
                .lanes
                .iter()
                .flatten()
                .any(|l| l.rec.is_dirty() || l.taps.pending())
        {
            self.flush_metrics(0);
        }
    }
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
            for s in self.sessions.iter_mut().flatten() {
                s.link.dead.store(true, Ordering::SeqCst);
                s.rings.segment().set_server_state(ServerState::Faulted, 0);
            }
        }
    }
}

struct Poller {
    /// Every poller's core (kept free of batch threads).
    poller_cores: Vec<usize>,
    /// Its sessions' hang-ups, counted by the listener, and the count last seen.
    hangups: Arc<std::sync::atomic::AtomicU64>,
    hangups_seen: u64,
    models: Arc<Models>,
    /// The model set as this poller last read it.
    set: Arc<ModelSet>,
    /// Its generation.
    generation: u64,
    monitor: Arc<Monitor>,
    /// By slot; created when a session is bound to the slot, dropped once the slot left the
    /// set and nothing is queued or bound there.
    lanes: Vec<Option<ModelLane>>,
    /// Some lane's slot left the set: see `retire_lanes`.
    retiring: bool,
    /// Sessions by slot; a slot is reused once its session is gone.
    sessions: Vec<Option<WorkerSession>>,
    /// One request slot of the largest session, reused for every frame.
    frame: Vec<u64>,
    /// Requests leaving a queue, reused.
    taken: Vec<Taken<Item>>,
    stats: WorkerStats,
    /// Slots of the sessions read every round (see [`Poller::scan`]).
    hot: Vec<usize>,
    /// The cold sessions, looked at [`COLD_PER_ROUND`] a round, in turn.
    cold: Vec<Cold>,
    /// The cold session the next round looks at first.
    cold_next: usize,
    /// Slots of the sessions with responses not yet published this round.
    touched: Vec<usize>,
    journal: Option<Arc<Journal>>,
    /// The shadow rules' generation the lanes' taps follow.
    shadow_generation: u64,
}

impl Poller {
    /// Hands each model's figures to the monitor (see [`Recorder::flush`]).
    fn flush_metrics(&mut self, min_age_ns: u64) {
        let now = monotonic_ns();
        for lane in self.lanes.iter_mut().flatten() {
            lane.rec.flush(now, min_age_ns);
            lane.taps
                .flush(now, min_age_ns.min(crate::journal::CHUNK_AGE_NS));
        }
    }

    /// Gives each lane the shadow tap the rules in effect ask for (none, the same, or another
    /// rule's): after a change of the rules or of the model set.
    fn tap_shadows(&mut self) {
        let Some(shadows) = self.monitor.shadows.get() else {
            return;
        };
        self.shadow_generation = shadows.generation();
        for (slot, lane) in self.lanes.iter_mut().enumerate() {
            if let Some(lane) = lane.as_mut() {
                // The old tap, dropped, hands its rows over.
                lane.taps.shadow = shadows.tap(&self.set, slot);
            }
        }
    }

    /// Reads the model set again when it changed, and decides where each session goes.
    fn refresh(&mut self) {
        let generation = self.models.generation();
        if generation == self.generation {
            return;
        }
        self.generation = generation;
        self.set = self.models.snapshot();
        for slot in 0..self.sessions.len() {
            let switch = match self.sessions[slot].as_ref() {
                Some(s) => self.switch_of(s),
                None => continue,
            };
            self.sessions[slot].as_mut().expect("checked").switch = switch;
        }
        // Sessions to move or close are hot: moved or closed at once, not when they next send.
        let (sessions, hot) = (&mut self.sessions, &mut self.hot);
        self.cold.retain(|c| {
            let s = sessions[c.slot].as_mut().expect("cold sessions live");
            if s.switch.is_none() {
                return true;
            }
            s.cold = false;
            hot.push(c.slot);
            false
        });
        self.retiring = true;
        self.tap_shadows();
    }

    /// Where session `s` must go in the current set, if anywhere.
    fn switch_of(&self, s: &WorkerSession) -> Option<Switch> {
        let bound = self.lanes.get(s.model)?.as_ref()?;
        match self.place(&bound.model, s.model, s.follows_default) {
            Some(slot) if slot == s.model => None,
            Some(slot) => Some(Switch::To(slot)),
            None => Some(Switch::Close),
        }
    }

    /// Where a session set up for `model` (in `slot`) belongs in the current set: its model's
    /// default when it follows it, else its version (in a new slot when its file was
    /// replaced); `None` when that is gone or no longer compatible with what the session was
    /// set up for.
    fn place(&self, model: &LoadedModel, slot: usize, follows_default: bool) -> Option<usize> {
        let target = if follows_default {
            self.set.resolve(&model.name, None)?
        } else if self.set.get(slot).is_some() {
            slot
        } else {
            self.set.resolve(&model.name, Some(model.version))?
        };
        let next = self.set.get(target)?;
        crate::models::compatible(model, next).then_some(target)
    }

    /// The lane of `slot`, created for `model` when there is none.
    fn ensure_lane(&mut self, slot: usize, model: &Arc<LoadedModel>) {
        if self.lanes.len() <= slot {
            self.lanes.resize_with(slot + 1, || None);
        }
        if self.lanes[slot].is_none() {
            let rec = self.monitor.recorder(model.monitor_index);
            let mut lane = ModelLane::new(
                model.clone(),
                rec,
                &self.poller_cores,
                self.journal.as_ref(),
            );
            if let Some(shadows) = self.monitor.shadows.get() {
                lane.taps.shadow = shadows.tap(&self.set, slot);
            }
            self.lanes[slot] = Some(lane);
        }
    }

    /// Drops the lanes of slots that left the set once nothing is queued or bound there; the
    /// instance is freed when the last holder lets go.
    fn retire_lanes(&mut self) {
        let mut waiting = false;
        for slot in 0..self.lanes.len() {
            let Some(lane) = self.lanes[slot].as_mut() else {
                continue;
            };
            if self.set.get(slot).is_some() {
                continue;
            }
            let bound = self.sessions.iter().flatten().any(|s| s.model == slot);
            if bound || !lane.queue.is_empty() || !lane.flights.is_empty() {
                waiting = true;
                continue;
            }
            lane.rec.finish();
            self.lanes[slot] = None;
        }
        self.retiring = waiting;
    }

    fn adopt(&mut self, new: NewSession) {
        // The listener read the set before it sent the session: this poller's is as new. The
        // set may have changed since the hello was answered: nothing is accepted yet, so the
        // session goes straight where it belongs now.
        self.refresh();
        let Some(slot) = self.place(&new.described, new.model, new.follows_default) else {
            // Its version went (or its default changed layout) meanwhile: the client sees the
            // session close; whatever it submitted comes back Disconnected.
            tracing::info!(
                session = new.link.id,
                "session closed at once: the model it was set up for changed meanwhile"
            );
            new.described.sessions.fetch_sub(1, Ordering::AcqRel);
            new.segment.set_server_state(ServerState::Closing, 0);
            new.link.dead.store(true, Ordering::SeqCst);
            return;
        };
        let model = self.set.get(slot).cloned().expect("placed");
        self.ensure_lane(slot, &model);
        // The listener counted the session on the version it described (the new one counted
        // first, so a version in use never reads 0 sessions in between).
        if !Arc::ptr_eq(&model, &new.described) {
            model.sessions.fetch_add(1, Ordering::SeqCst);
            new.described.sessions.fetch_sub(1, Ordering::SeqCst);
        }
        let info = *new.segment.info();
        let slot_words = info.request_slot_size as usize / 8;
        if self.frame.len() < slot_words {
            self.frame.resize(slot_words, 0);
        }
        let session = WorkerSession {
            link: new.link,
            rings: RingEnds::new(new.segment, Side::Server),
            model: slot,
            follows_default: new.follows_default,
            switch: None,
            responded: 0,
            slot_words,
            feature_count: info.feature_count as usize,
            response_capacity: u64::from(info.response_capacity),
            expected_seq: 0,
            accepted: 0,
            consumed: 0,
            unpublished: false,
            last_frame_ns: monotonic_ns(),
            cold: false,
            errors: 0,
            in_flight: 0,
            stop_at: None,
        };
        let slot = match self.sessions.iter().position(Option::is_none) {
            Some(slot) => {
                self.sessions[slot] = Some(session);
                slot
            }
            None => {
                self.sessions.push(Some(session));
                self.sessions.len() - 1
            }
        };
        self.hot.push(slot);
    }

    /// Moves session `slot` where the model set sends it, once every request it sent to its
    /// current version is answered. Returns whether it may be read now.
    fn settle_switch(&mut self, slot: usize) -> bool {
        let Some(s) = self.sessions[slot].as_mut() else {
            return false;
        };
        let Some(switch) = s.switch else {
            return true;
        };
        // Nothing more is read from it until its requests to the old version are answered:
        // its responses stay in order and switch version at one point.
        if s.accepted != s.responded {
            return false;
        }
        s.switch = None;
        match switch {
            Switch::To(next) => {
                tracing::info!(
                    session = s.link.id,
                    from = s.model,
                    to = next,
                    "session moved to the new default version"
                );
                let from = s.model;
                s.model = next;
                let model = self
                    .set
                    .get(next)
                    .cloned()
                    .expect("switches name loaded slots");
                model.sessions.fetch_add(1, Ordering::SeqCst);
                if let Some(old) = self.lanes[from].as_ref() {
                    old.model.sessions.fetch_sub(1, Ordering::SeqCst);
                }
                self.ensure_lane(next, &model);
                true
            }
            Switch::Close => {
                tracing::info!(
                    session = s.link.id,
                    "session closed: its model version was unloaded, or its new default reads another layout or writes another output count"
                );
                s.rings.segment().set_server_state(ServerState::Closing, 0);
                s.link.dead.store(true, Ordering::SeqCst);
                false
            }
        }
    }

    /// Bounds what each session may still send once the server stops (see `stop_at`).
    fn fix_stop_points(&mut self) {
        // Every session is read every round until the stop.
        while let Some(c) = self.cold.pop() {
            self.sessions[c.slot]
                .as_mut()
                .expect("cold sessions live")
                .cold = false;
            self.hot.push(c.slot);
        }
        for s in self
            .sessions
            .iter_mut()
            .flatten()
            .filter(|s| s.stop_at.is_none())
        {
            // A corrupt tail leaves nothing more to read.
            let ready = s.rings.available().unwrap_or(0);
            s.stop_at = Some(s.rings.popped() + ready);
        }
    }

    /// Whether a live session still holds frames sent before the stop (see `stop_at`).
    fn frames_before_stop_unread(&self) -> bool {
        self.sessions.iter().flatten().any(|s| {
            !s.link.dead.load(Ordering::Relaxed)
                && s.stop_at.is_some_and(|end| s.rings.popped() < end)
        })
    }

    /// Reads frames from the sessions into the queues; returns how many were accepted.
    ///
    /// Hot sessions are read every round. A session that sent nothing for [`COLD_AFTER_NS`]
    /// and is owed nothing goes cold ([`Poller::cool`]): cold ones are looked at
    /// [`COLD_PER_ROUND`] a round, in turn, by their request ring's tail alone (one cache line
    /// that stays in this core's cache while the client sends nothing); one whose tail moved is
    /// hot again and read at once. One whose client hung up is made hot when the listener's
    /// count of hang-ups moves, to be reaped. So a round costs the hot sessions and a few cold
    /// tails, however many sessions sit idle; a cold session's first frame waits for its turn
    /// (at most `cold sessions / COLD_PER_ROUND` rounds).
    fn scan(&mut self) -> usize {
        let mut accepted = 0;
        // The round's arrival time: read once, at the first frame.
        let mut now = 0;
        for i in 0..self.hot.len() {
            accepted += self.drain_session(self.hot[i], &mut now);
        }
        for _ in 0..self.cold.len().min(COLD_PER_ROUND) {
            if self.cold_next >= self.cold.len() {
                self.cold_next = 0;
            }
            let c = &self.cold[self.cold_next];
            if c.watch.load() == c.tail {
                self.cold_next += 1;
                continue;
            }
            let slot = self.cold.swap_remove(self.cold_next).slot;
            self.sessions[slot]
                .as_mut()
                .expect("cold sessions live")
                .cold = false;
            self.hot.push(slot);
            accepted += self.drain_session(slot, &mut now);
        }
        if !self.cold.is_empty() {
            // SYNC(hangups): Acquire pairs with `SessionLink::hang_up`'s Release: the flags of
            // the sessions counted are seen set.
            let hangups = self.hangups.load(Ordering::Acquire);
            if hangups != self.hangups_seen {
                self.hangups_seen = hangups;
                self.warm_dead();
            }
        }
        accepted
    }

    /// Makes the cold sessions whose client hung up hot, so that they are reaped.
    fn warm_dead(&mut self) {
        let mut i = 0;
        while i < self.cold.len() {
            let slot = self.cold[i].slot;
            let s = self.sessions[slot].as_mut().expect("cold sessions live");
            if s.link.dead.load(Ordering::Relaxed) {
                s.cold = false;
                self.cold.swap_remove(i);
                self.hot.push(slot);
            } else {
                i += 1;
            }
        }
    }

    /// Moves the hot sessions that went quiet (nothing sent for [`COLD_AFTER_NS`], nothing
    /// owed, in use or pending, no frame left in the ring: not one published and unread, as
    /// when the client has no credits, nor one stamped and not yet published) to the cold ones
    /// (see [`Poller::scan`]).
    fn cool(&mut self) {
        let now = monotonic_ns();
        let mut i = 0;
        while i < self.hot.len() {
            let slot = self.hot[i];
            let s = self.sessions[slot].as_mut().expect("hot sessions live");
            let quiet = now.saturating_sub(s.last_frame_ns) > COLD_AFTER_NS
                && s.accepted == s.responded
                && s.in_flight == 0
                && s.switch.is_none()
                && s.stop_at.is_none()
                && !s.unpublished
                && !s.link.dead.load(Ordering::Relaxed)
                && s.rings.peer_tail() == s.rings.popped()
                && !s.rings.stamped(s.expected_seq);
            if quiet {
                s.cold = true;
                // The tail it was just seen at (equal to what was popped), not the tail read
                // again now: a frame published in between would then never wake it.
                self.cold.push(Cold {
                    slot,
                    tail: s.rings.popped(),
                    watch: s.rings.peer_tail_watch(),
                });
                self.hot.swap_remove(i);
            } else {
                i += 1;
            }
        }
    }

    /// Reads the frames of session `slot` its credits allow, checks each and queues it for its
    /// batch (or its answer). `now` is the round's arrival time: read at the round's first
    /// frame, shared by every session read in the round. Returns the frames read.
    fn drain_session(&mut self, slot: usize, now: &mut u64) -> usize {
        if !self.settle_switch(slot) {
            return 0;
        }
        let Some(s) = self.sessions[slot].as_mut() else {
            return 0;
        };
        if s.link.dead.load(Ordering::Relaxed) {
            return 0;
        }
        let Some(mut credits) = credits(s) else {
            return 0;
        };
        let lane = self.lanes[s.model]
            .as_mut()
            .expect("a bound session has a lane");
        let allow_non_finite = lane.model.layout.allow_non_finite;
        let ready = lane.model.health.is_ready();
        let mut taken = 0;
        let frame = &mut self.frame[..s.slot_words];
        let (head, body) = frame.split_at_mut(abi::REQUEST_HEADER_WORDS.min(frame.len()));
        while credits > 0 {
            // The next frame's first word is its sequence number: take it by its stamp. Its
            // features are read only if its priority's queue has room, straight into a row of
            // the queue: under overload a refusal costs one cache line of the ring, not the
            // whole frame. A model not ready reads its frames whole, to check them first.
            let queue = &mut lane.queue;
            let mut read = Read::Header;
            let words = match s.rings.try_pop_stamped_with(s.expected_seq, head, |h| {
                if !ready {
                    read = Read::Frame;
                    return Some(&mut *body);
                }
                if !queue.has_room(priority_of(&read_header(h))) {
                    return None;
                }
                let (row, words) = queue.reserve_row();
                read = Read::Row(row);
                Some(words)
            }) {
                Ok(0) => break,
                Ok(words) => words,
                // Found before a frame is read: no row was taken.
                Err(_) => {
                    fault(s, FaultReason::RequestIndexCorrupt);
                    return taken;
                }
            };
            if *now == 0 {
                *now = monotonic_ns();
            }
            let now = *now;
            let body_words = words.saturating_sub(head.len());
            let reported_ns = match read {
                Read::Header => {
                    let (mut request, reported_ns) = validate_header(s, head, slot, now);
                    if request.item.status == Status::OK {
                        refuse_full(&mut lane.queue, &mut request);
                    }
                    lane.queue.push_resolved(request);
                    reported_ns
                }
                Read::Frame => {
                    let features = bytemuck::cast_slice(&body[..body_words]);
                    let (mut request, reported_ns) =
                        validate(s, (head, words), features, slot, now, allow_non_finite);
                    if request.item.status == Status::OK {
                        // A model that failed its health check executes nothing until it
                        // passes.
                        request.item.status = Status::NOT_READY;
                    }
                    lane.queue.push_resolved(request);
                    reported_ns
                }
                Read::Row(row) => {
                    let features = lane.queue.row_features(&row, body_words);
                    let (request, reported_ns) =
                        validate(s, (head, words), features, slot, now, allow_non_finite);
                    if request.item.status == Status::OK {
                        lane.queue.push_reserved(request, row);
                    } else {
                        lane.queue.release_row(row);
                        lane.queue.push_resolved(request);
                    }
                    reported_ns
                }
            };
            let sample = lane.rec.sample();
            sample.requests += 1;
            if reported_ns > 0 {
                sample.later(Stage::EndToEnd, u64::from(reported_ns), 1);
            }
            s.accepted += 1;
            credits -= 1;
            taken += 1;
        }
        if taken > 0 {
            s.rings.release();
            s.last_frame_ns = *now;
            self.stats.requests += taken as u64;
        }
        taken
    }

    /// Answers what needs no batch and runs the batches the policy asks for. Returns the
    /// responses written, the earliest time a waiting batch must be looked at again, and
    /// whether batches are in flight (the poller then stays busy: it looks again at once).
    fn run_lanes(&mut self, stopping: bool) -> (usize, Option<u64>, bool) {
        let mut answered = 0;
        let mut wake: Option<u64> = None;
        let mut flying = false;
        for m in 0..self.lanes.len() {
            let Some(lane) = self.lanes[m].as_mut() else {
                continue;
            };
            if !lane.flights.is_empty() {
                answered += self.collect(m);
            }
            let lane = self.lanes[m].as_mut().expect("checked");
            if lane.queue.is_empty() {
                flying |= !lane.flights.is_empty();
                continue;
            }
            let now = monotonic_ns();
            self.taken.clear();
            let sessions = &self.sessions;
            lane.queue.take_resolved(now, &mut self.taken, |s| {
                sessions[s].as_ref().is_some_and(|s| s.in_flight > 0)
            });
            // Answers without a batch (errors, timeouts): no features, no outputs.
            let engine = journaled_engine(lane.taps.is_on(), lane.model.backend.as_ref());
            answered += self.respond(m, now, 0, now, engine);
            let lane = self.lanes[m].as_mut().expect("checked");
            // With every pipeline slot in flight the batch waits (and grows) until one frees;
            // with `HOLD_BEHIND` in flight, a batch that is not full waits too.
            let room = lane.pipeline.as_ref().is_none_or(|p| p.has_room());
            // A stopping server does not hold batches back either.
            let held = !stopping
                && lane
                    .pipeline
                    .as_ref()
                    .is_some_and(|p| p.in_flight() >= HOLD_BEHIND);
            match lane.queue.decide(now, lane.batch_compute_ns, held) {
                // The poller stays busy while batches are in flight: it looks again at once.
                Decision::Idle | Decision::Hold => {}
                // A stopping server does not wait for batches to fill.
                Decision::WaitUntil(t) if !stopping => wake = Some(wake.map_or(t, |w| w.min(t))),
                Decision::WaitUntil(_) | Decision::Run if room => {
                    answered += self.run_batch(m, now);
                }
                Decision::WaitUntil(_) | Decision::Run => {}
            }
            flying |= !self.lanes[m].as_ref().expect("checked").flights.is_empty();
        }
        for slot in self.touched.drain(..) {
            if let Some(s) = self.sessions[slot].as_mut() {
                s.rings.publish();
                s.unpublished = false;
            }
        }
        // Under sustained load the poller never goes idle: kept latencies are recorded here,
        // after the answers are published.
        for lane in self.lanes.iter_mut().flatten() {
            if lane.rec.is_dirty() && lane.rec.sample().half_full() {
                lane.rec.sample().settle();
            }
        }
        (answered, wake, flying)
    }

    fn run_batch(&mut self, m: usize, started_ns: u64) -> usize {
        let lane = self.lanes[m].as_mut().expect("run for a lane");
        // A model split by batch size runs a small batch on its CPU engine, here and now,
        // unless batches are in flight on its pipeline (its answers would overtake theirs).
        let rows_next = lane.queue.executable().min(lane.queue.full_size());
        let faster = lane.model.backend.faster_engine_for(rows_next).is_some();
        if lane.pipeline.is_some() && (!faster || !lane.flights.is_empty()) {
            return self.launch_batch(m, started_ns);
        }
        self.taken.clear();
        let ModelLane {
            model,
            queue,
            input,
            output,
            batches_run,
            taps,
            features,
            ..
        } = lane;
        let journaled = taps.is_on();
        let mut keep = taps.wants_features().then_some(features);
        let backend = model
            .backend
            .faster_engine_for(rows_next)
            .unwrap_or(model.backend.as_ref());
        let taken = &mut self.taken;
        let mut rows = 0;
        let mut gathered = false;
        let time_stages = timed_batch(batches_run);
        let mut gathered_ns = 0;
        // The batch is gathered straight into the backend's staging memory (pinned, on a GPU).
        let result = backend.run_gathered(
            &mut |staging| {
                gathered = true;
                let (r, at, run) = gather(
                    queue,
                    started_ns,
                    staging,
                    taken,
                    time_stages,
                    keep.as_deref_mut(),
                );
                (rows, gathered_ns) = (r, at);
                run
            },
            input,
            output,
        );
        let engine = journaled_engine(journaled, backend);
        if result.is_err() && !gathered {
            // The backend failed before taking the batch: take it here, to answer it.
            rows = gather(queue, started_ns, input, taken, false, keep).0;
        }
        let mut compute_ns = 0;
        let mut done_ns = started_ns;
        if rows > 0 {
            done_ns = monotonic_ns();
            compute_ns = done_ns - started_ns;
            count_batch(&mut self.stats, &mut lane.rec, rows);
            let sample = lane.rec.sample();
            if gathered && time_stages {
                sample.later(Stage::Gather, gathered_ns.saturating_sub(started_ns), 1);
                if result.is_ok() {
                    sample.later(Stage::Execute, done_ns.saturating_sub(gathered_ns), 1);
                }
            }
            // The deadline estimate follows the model's own engine: a split model's small
            // batches, run on its faster engine, would pull it below what a full batch takes.
            if !faster {
                observe_compute(&mut lane.batch_compute_ns, compute_ns);
            }
            if let Err(e) = result {
                batch_failed(model, &mut self.taken, rows, &e);
            }
        }
        self.respond(m, started_ns, compute_ns, done_ns, engine)
    }

    /// Gathers a batch into a free slot of the lane's pipeline and launches it; its answers
    /// are written once it is done (see [`Poller::collect`]). Returns the responses written
    /// now: those of earlier batches done meanwhile, or of this one when it took only resolved
    /// or late requests.
    fn launch_batch(&mut self, m: usize, started_ns: u64) -> usize {
        let lane = self.lanes[m].as_mut().expect("run for a lane");
        let (mut taken, mut features) = lane.spare.pop().unwrap_or_default();
        taken.clear();
        let keep = lane.taps.wants_features();
        let time_stages = timed_batch(&mut lane.batches_run);
        let mut gathered_ns = 0;
        let mut rows = 0;
        let ModelLane {
            queue, pipeline, ..
        } = lane;
        let pipeline = pipeline.as_mut().expect("a lane with a pipeline");
        pipeline.launch(&mut |staging| {
            let (r, at, run) = gather(
                queue,
                started_ns,
                staging,
                &mut taken,
                time_stages,
                keep.then_some(&mut features),
            );
            (rows, gathered_ns) = (r, at);
            run
        });
        if taken.is_empty() {
            lane.spare.push((taken, features));
            return 0;
        }
        if rows > 0 {
            count_batch(&mut self.stats, &mut lane.rec, rows);
        }
        for t in &taken {
            if let Some(s) = self.sessions[t.request.session].as_mut() {
                s.in_flight += 1;
            }
        }
        lane.flights.push_back(Flight {
            taken,
            rows,
            started_ns,
            gathered_ns,
            features,
        });
        self.collect(m)
    }

    /// Answers the lane's flights that are done, oldest first; stops at the first still on
    /// the GPU. Returns the responses written.
    fn collect(&mut self, m: usize) -> usize {
        let Some(lane) = self.lanes[m].as_mut() else {
            return 0;
        };
        let mut written = 0;
        let engine = journaled_engine(lane.taps.is_on(), lane.model.backend.as_ref());
        while let Some(front) = lane.flights.front() {
            let launched = front.rows > 0;
            let outcome = if launched {
                match lane
                    .pipeline
                    .as_mut()
                    .expect("launched on the pipeline")
                    .ready()
                {
                    None => break,
                    Some(outcome) => Some(outcome),
                }
            } else {
                None
            };
            let mut flight = lane.flights.pop_front().expect("a front");
            let done_ns = monotonic_ns();
            // Its own compute time: from its launch, or from when the batch before it was
            // done, if it waited behind that one.
            let compute_ns = done_ns.saturating_sub(flight.started_ns.max(lane.last_done_ns));
            if launched {
                lane.last_done_ns = done_ns;
                observe_compute(&mut lane.batch_compute_ns, compute_ns);
            }
            let output: &[f32] = match outcome {
                None => &[],
                Some(Ok(output)) => {
                    if flight.gathered_ns != 0 {
                        let sample = lane.rec.sample();
                        let gather = flight.gathered_ns.saturating_sub(flight.started_ns);
                        sample.later(Stage::Gather, gather, 1);
                        sample.later(Stage::Execute, compute_ns, 1);
                    }
                    output
                }
                Some(Err(e)) => {
                    batch_failed(&lane.model, &mut flight.taken, flight.rows, &e);
                    &[]
                }
            };
            written += respond(
                &mut self.sessions,
                &mut self.touched,
                &mut self.stats,
                &lane.model,
                &mut lane.rec,
                &mut lane.taps,
                Answers {
                    taken: &flight.taken,
                    output,
                    started_ns: flight.started_ns,
                    compute_ns: if launched { compute_ns } else { 0 },
                    now_ns: done_ns,
                    in_flight: true,
                    features: &flight.features,
                    engine,
                },
            );
            if launched {
                lane.pipeline.as_mut().expect("launched").retire();
            }
            lane.spare.push((flight.taken, flight.features));
        }
        written
    }

    /// Writes a response for every request in `self.taken`, in order; `now_ns` is when their
    /// outputs (or errors) were ready.
    fn respond(
        &mut self,
        m: usize,
        started_ns: u64,
        compute_ns: u64,
        now_ns: u64,
        engine: &'static str,
    ) -> usize {
        if self.taken.is_empty() {
            return 0;
        }
        let lane = self.lanes[m].as_mut().expect("answered from a lane");
        respond(
            &mut self.sessions,
            &mut self.touched,
            &mut self.stats,
            &lane.model,
            &mut lane.rec,
            &mut lane.taps,
            Answers {
                taken: &self.taken,
                output: &lane.output,
                started_ns,
                compute_ns,
                now_ns,
                in_flight: false,
                features: &lane.features,
                engine,
            },
        )
    }

    /// Drops sessions that are dead (hung up or faulted) with their queued requests; their
    /// segments unmap here.
    ///
    /// Hot sessions only: a cold one that hangs up is made hot by [`Poller::scan`] first.
    fn reap(&mut self) {
        let mut i = 0;
        while i < self.hot.len() {
            let slot = self.hot[i];
            // A session with answers still owed by a batch in flight keeps its slot until they
            // are written (skipped): a new session there must not get them.
            let dead = self.sessions[slot]
                .as_ref()
                .is_some_and(|s| s.link.dead.load(Ordering::Relaxed) && s.in_flight == 0);
            if !dead {
                i += 1;
                continue;
            }
            self.hot.swap_remove(i);
            let s = self.sessions[slot].take().expect("checked");
            if let Some(lane) = self.lanes[s.model].as_mut() {
                lane.queue.remove_session(slot);
                lane.model.sessions.fetch_sub(1, Ordering::Relaxed);
            }
            self.retiring = true;
        }
    }
}
/// What [`respond`] answers: the requests taken, in answer order, and the batch's outputs.
struct Answers<'a> {
    taken: &'a [Taken<Item>],
    /// The batch's outputs, `output_width` per row (empty when nothing ran).
    output: &'a [f32],
    started_ns: u64,
    compute_ns: u64,
    /// When the outputs (or errors) were ready.
    now_ns: u64,
    /// They were counted in their sessions' `in_flight` (a pipeline's batch).
    in_flight: bool,
    /// The batch's features, `input_width` per row, when the journal keeps them (else
    /// empty).
    features: &'a [f32],
    /// The engine that ran the batch.
    engine: &'static str,
}

/// Writes a response for every request in `a.taken`, in order, into its session's ring.
/// Returns the responses written.
fn respond(
    sessions: &mut [Option<WorkerSession>],
    touched: &mut Vec<usize>,
    stats: &mut WorkerStats,
    model: &LoadedModel,
    rec: &mut Recorder,
    taps: &mut Taps,
    a: Answers<'_>,
) -> usize {
    let Answers {
        taken,
        output,
        started_ns,
        compute_ns,
        now_ns,
        in_flight,
        features,
        engine,
    } = a;
    let iw = model.input_width();
    let sample = rec.sample();
    let mut executed = 0;
    let ow = model.output_width();
    let response_words = abi::response_words(ow as u32);
    let mut written = 0;
    for t in taken {
        let item = &t.request.item;
        let Some(s) = sessions[item.session].as_mut() else {
            continue;
        };
        if in_flight {
            s.in_flight -= 1;
        }
        if s.link.dead.load(Ordering::Relaxed) {
            continue;
        }
        let frame = response_frame(t, model, output, started_ns, compute_ns);
        let words: [u64; RESPONSE_WORDS] = bytemuck::cast(frame);
        // Only the header and the outputs: for up to 4 outputs, one cache line.
        match s.rings.try_push(&words[..response_words]) {
            Ok(()) => {
                if !s.unpublished {
                    s.unpublished = true;
                    touched.push(item.session);
                }
                s.responded += 1;
                written += 1;
                sample.respond(Status(frame.status));
                // Stages of answers that reached their session only, as the counts.
                if let Outcome::Execute { .. } = t.outcome {
                    let arrival = t.request.arrival_ns;
                    sample.later(Stage::Queue, started_ns.saturating_sub(arrival), 1);
                    sample.later(Stage::Total, now_ns.saturating_sub(arrival), 1);
                    executed += 1;
                }
                if frame.status != Status::OK.0 {
                    s.errors += 1;
                    s.rings.segment().set_server_errors(s.errors);
                }
                if taps.is_on() {
                    let row = match t.outcome {
                        Outcome::Execute { row } => Some(row),
                        _ => None,
                    };
                    taps.record(crate::journal::Row {
                        session: &s.link.client,
                        engine,
                        request_id: item.request_id,
                        priority: t.request.priority,
                        status: frame.status,
                        sent_ns: item.sent_ns,
                        read_ns: t.request.arrival_ns,
                        answered_ns: now_ns,
                        features: row.and_then(|r| features.get(r * iw..(r + 1) * iw)),
                        outputs: row
                            .filter(|_| frame.status == Status::OK.0)
                            .map(|r| (&output[r * ow..(r + 1) * ow], frame.confidence)),
                    });
                }
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
    if executed > 0 {
        sample.later(Stage::Compute, compute_ns, executed);
    }
    stats.responses += written as u64;
    written
}

/// A batch failed: logged, counted against the model's health, and its rows answered
/// `ExecutionFailed`.
fn batch_failed(model: &LoadedModel, taken: &mut [Taken<Item>], rows: usize, e: &BackendError) {
    tracing::error!(model = %model.key(), rows, error = %e, "batch failed");
    model.health.batch_failed(&model.key(), e);
    for t in taken.iter_mut() {
        if let Outcome::Execute { .. } = t.outcome {
            t.outcome = Outcome::Resolved;
            t.request.item.status = Status::EXECUTION_FAILED;
        }
    }
}

/// The responses `s` may be sent now: its client's free response slots (the client's head
/// reloaded only when the cached one leaves none, so an idle scan does not pull the client's
/// cache line), and once the server stops, no more than the frames before the stop. `None`
/// when the head is corrupt (the session is faulted).
#[inline]
fn credits(s: &mut WorkerSession) -> Option<u64> {
    if s.accepted - s.consumed >= s.response_capacity {
        match s.rings.peer_consumed() {
            Ok(c) => s.consumed = c,
            Err(_) => {
                fault(s, FaultReason::ResponseIndexCorrupt);
                return None;
            }
        }
    }
    // Invariant: accepted - consumed in 0..=response_capacity (consumed <= pushed <= accepted).
    let credits = s.response_capacity - (s.accepted - s.consumed);
    Some(match s.stop_at {
        Some(end) => credits.min(end - s.rings.popped()),
        None => credits,
    })
}

/// How much of a frame the poller read, and where its features went.
enum Read {
    /// Its header only: its queue had no room.
    Header,
    /// Whole, into the poller's frame buffer: its model is not ready.
    Frame,
    /// Its features straight into a row of its model's queue.
    Row(ArenaRow),
}

/// Answers `request` `QueueFull` with its priority's limit (its features were not read: the
/// queue had no room), counted as the queue's rejection.
fn refuse_full(queue: &mut BatchQueue<Item>, request: &mut Request<Item>) {
    queue.count_rejection(request.priority);
    request.item.status = Status::QUEUE_FULL;
    request.item.detail_a = queue.limit(request.priority).min(u32::MAX as usize) as u32;
}

/// A header's priority as the queue takes it (a bad one is refused by the header's checks).
#[inline]
fn priority_of(header: &abi::RequestHeader) -> u8 {
    header.priority.min(3) as u8
}

/// The response to one taken request: its outputs (from `output`, the batch's) and figures
/// when it ran, its timeout when it missed its deadline, else the status it was read with.
#[inline]
fn response_frame(
    t: &Taken<Item>,
    model: &LoadedModel,
    output: &[f32],
    started_ns: u64,
    compute_ns: u64,
) -> ResponseFrame {
    let item = &t.request.item;
    let ow = model.output_width();
    let mut frame = ResponseFrame {
        request_id: item.request_id,
        seq: item.seq,
        status: item.status.0,
        model_version: model.version,
        detail_a: item.detail_a,
        detail_b: item.detail_b,
        queue_ns: saturate_u32(started_ns.saturating_sub(t.request.arrival_ns)),
        ..ResponseFrame::default()
    };
    match t.outcome {
        Outcome::Execute { row } => {
            let out = &output[row * ow..(row + 1) * ow];
            // A NaN or infinite output is no prediction: answered as a failure, unless the
            // model's layout allows non-finite values.
            if !model.layout.allow_non_finite {
                if let Some(i) = out.iter().position(|v| !v.is_finite()) {
                    frame.status = Status::EXECUTION_FAILED.0;
                    frame.detail_a = tie_layouts::abi::EXECUTION_FAILED_NON_FINITE;
                    frame.detail_b = i as u32;
                    return frame;
                }
            }
            frame.output_count = ow as u32;
            frame.outputs[..ow.min(MAX_OUTPUTS)].copy_from_slice(&out[..ow.min(MAX_OUTPUTS)]);
            frame.confidence = row_confidence(out, model.config.uncertainty_output);
            frame.compute_ns = saturate_u32(compute_ns);
        }
        Outcome::TimedOut { late_ns } => {
            frame.status = Status::TIMEOUT.0;
            frame.detail_a = saturate_u32(late_ns);
        }
        Outcome::Resolved => {}
    }
    frame
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

/// Checks a frame read in two parts: its header (`head`, of the `words` read in all) and
/// `features`, what was read after it. The request, answered `OK` when it is to be executed,
/// else with the error it is answered with; and the round trip the client reported in the
/// frame (0: none). The same checks as [`tie_layouts::check::decode_request`].
fn validate(
    s: &mut WorkerSession,
    (head, words): (&[u64], usize),
    features: &[f32],
    slot: usize,
    now: u64,
    allow_non_finite: bool,
) -> (Request<Item>, u32) {
    let (mut request, reported_ns) = validate_header(s, head, slot, now);
    if request.item.status != Status::OK {
        return (request, reported_ns);
    }
    let checked =
        tie_layouts::check::check_body(words, features, s.feature_count, allow_non_finite);
    if let Err(refusal) = checked {
        refused(&mut request, refusal);
    }
    (request, reported_ns)
}

/// As [`validate`], for a frame whose header only was read: the request with the error its
/// header earns, or `OK` when the header passes (the caller answers it).
fn validate_header(
    s: &mut WorkerSession,
    head: &[u64],
    slot: usize,
    now: u64,
) -> (Request<Item>, u32) {
    let expected_seq = next_seq(s);
    let header = read_header(head);
    let mut request = request_of(&header, slot, now);
    if let Err(refusal) = tie_layouts::check::check_header(&header, expected_seq, s.feature_count) {
        refused(&mut request, refusal);
    }
    (request, header.reported_round_trip_ns)
}

/// The sequence number the session's next frame must carry; counts the frame.
fn next_seq(s: &mut WorkerSession) -> u64 {
    let expected_seq = s.expected_seq;
    // The expected number counts frames: a client's bad number is not adopted, so it cannot
    // steer the stamp the next frame is taken by.
    s.expected_seq = expected_seq.wrapping_add(1);
    expected_seq
}

/// The request a frame with `header` makes, answered `OK` unless refused.
fn request_of(header: &abi::RequestHeader, slot: usize, now: u64) -> Request<Item> {
    Request {
        item: Item {
            session: slot,
            request_id: header.request_id,
            seq: header.seq,
            status: Status::OK,
            detail_a: 0,
            detail_b: 0,
            sent_ns: header.send_ts_ns,
        },
        session: slot,
        priority: priority_of(header),
        arrival_ns: now,
        deadline_ns: header.deadline_ns,
    }
}

/// Marks `request` refused with `(status, detail_a, detail_b)`.
fn refused(request: &mut Request<Item>, (status, a, b): (Status, u32, u32)) {
    request.item.status = status;
    request.item.detail_a = a;
    request.item.detail_b = b;
}

fn saturate_u32(ns: u64) -> u32 {
    ns.min(u64::from(u32::MAX)) as u32
}

#[cfg(test)]
mod tests {
    use super::cpus_off_pollers;

    /// Hardware threads paired as on a host with SMT: CPU n and n + 4 share a core.
    fn pairs(cpu: usize) -> Vec<usize> {
        vec![(cpu + 4) % 8]
    }

    #[test]
    fn other_threads_keep_off_the_pollers_siblings_while_other_cpus_remain() {
        let all: Vec<usize> = (0..8).collect();
        assert_eq!(
            cpus_off_pollers(&all, &[2, 3], pairs),
            Some((vec![0, 1, 4, 5], false))
        );
        // No sibling known (SMT off, or a virtual machine's flat topology): every other CPU.
        assert_eq!(
            cpus_off_pollers(&all, &[2, 3], |_| Vec::new()),
            Some((vec![0, 1, 4, 5, 6, 7], false))
        );
        // Only the siblings remain: used, and said.
        assert_eq!(
            cpus_off_pollers(&[2, 3, 6], &[2, 3], pairs),
            Some((vec![6], true))
        );
        // Only poller cores: nowhere to go.
        assert_eq!(cpus_off_pollers(&[2, 3], &[2, 3], pairs), None);
        // Pollers on isolated cores, outside the process's CPUs: their siblings still kept off.
        assert_eq!(
            cpus_off_pollers(&[0, 1, 4, 5, 6, 7], &[2, 3], pairs),
            Some((vec![0, 1, 4, 5], false))
        );
        // Pollers that are each other's siblings.
        assert_eq!(
            cpus_off_pollers(&all, &[1, 5], pairs),
            Some((vec![0, 2, 3, 4, 6, 7], false))
        );
    }
}
