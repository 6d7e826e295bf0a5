//! [`Sample`]: one poller's figures of one model (stage histograms, outcome counters), and
//! the [`Exchange`] through which a [`Recorder`] hands samples to the monitor.
#![forbid(unsafe_code)]

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use hdrhistogram::Histogram;
use tie_layouts::abi::Status;

use crate::sync::Locked;

/// Largest value a histogram holds (60 s in ns); larger ones are recorded as this.
pub const MAX_NS: u64 = 60_000_000_000;
/// Significant digits of every histogram: values within 1% (a histogram is 30 KB, a
/// [`Sample`] 180 KB; a poller holds at most three samples per model).
pub const SIGFIG: u8 = 2;
/// How often a busy poller hands its samples over.
pub const FLUSH_NS: u64 = 50_000_000;
/// Status codes counted one by one (0..=10); others are counted as the last.
pub const STATUS_SLOTS: usize = 12;

/// A stage of a request (see the module docs).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stage {
    /// Accepted to batch start.
    Queue = 0,
    /// Batch start to outputs ready.
    Compute = 1,
    /// Accepted to response written.
    Total = 2,
    /// Client submit to client read.
    EndToEnd = 3,
    /// Copying a batch's rows into staging.
    Gather = 4,
    /// Running a staged batch.
    Execute = 5,
}

/// Number of stages.
pub const STAGES: usize = 6;

impl Stage {
    /// Every stage, in index order.
    pub const ALL: [Stage; STAGES] = [
        Stage::Queue,
        Stage::Compute,
        Stage::Total,
        Stage::EndToEnd,
        Stage::Gather,
        Stage::Execute,
    ];

    /// Name in metrics, logs and `.hlog` tags.
    pub fn name(self) -> &'static str {
        match self {
            Stage::Queue => "queue",
            Stage::Compute => "compute",
            Stage::Total => "total",
            Stage::EndToEnd => "end_to_end",
            Stage::Gather => "gather",
            Stage::Execute => "execute",
        }
    }
}

pub(super) fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, MAX_NS, SIGFIG).expect("valid histogram bounds")
}

/// Figures of one model over some time: stage histograms and outcome counters.
#[derive(Clone, Debug)]
pub struct Sample {
    /// Per [`Stage`].
    pub hist: [Histogram<u64>; STAGES],
    /// Responses by status code (see [`STATUS_SLOTS`]).
    pub responses: [u64; STATUS_SLOTS],
    /// Frames accepted.
    pub requests: u64,
    /// Batches run.
    pub batches: u64,
    /// Rows run (padding excluded).
    pub rows: u64,
    /// Values recorded with [`later`](Self::later) and not yet in `hist`: (value, count,
    /// stage).
    pub(super) pending: Vec<(u64, u32, u8)>,
}

/// Values a sample keeps for later before it records them itself (a poller settles them after
/// publishing once half are taken, so this is a last resort).
pub(super) const PENDING: usize = 2048;

impl Default for Sample {
    fn default() -> Self {
        Self {
            hist: std::array::from_fn(|_| histogram()),
            responses: [0; STATUS_SLOTS],
            requests: 0,
            batches: 0,
            rows: 0,
            pending: Vec::with_capacity(PENDING),
        }
    }
}

impl Sample {
    /// Records `ns` once in `stage`.
    #[inline]
    pub fn record(&mut self, stage: Stage, ns: u64) {
        // Cannot fail: the value is clamped into the histogram's range.
        let _ = self.hist[stage as usize].record(ns.clamp(1, MAX_NS));
    }

    /// Records `ns` `n` times in `stage`.
    #[inline]
    pub fn record_n(&mut self, stage: Stage, ns: u64, n: u64) {
        let _ = self.hist[stage as usize].record_n(ns.clamp(1, MAX_NS), n);
    }

    /// Keeps `ns` (`n` times) for `stage`, to be recorded by [`settle`](Self::settle): a
    /// store now, the histogram's work when the poller is idle. Never allocates.
    #[inline]
    pub fn later(&mut self, stage: Stage, ns: u64, n: u32) {
        if self.pending.len() == PENDING {
            self.settle();
        }
        self.pending.push((ns, n, stage as u8));
    }

    /// Whether half the room for kept values is taken.
    #[inline]
    pub fn half_full(&self) -> bool {
        self.pending.len() >= PENDING / 2
    }

    /// Records the values kept by [`later`](Self::later).
    pub fn settle(&mut self) {
        for (ns, n, stage) in self.pending.drain(..) {
            let _ = self.hist[usize::from(stage)].record_n(ns.clamp(1, MAX_NS), u64::from(n));
        }
    }

    /// Counts one response with `status`.
    #[inline]
    pub fn respond(&mut self, status: Status) {
        self.respond_n(status, 1);
    }

    /// Counts `n` responses with `status`.
    #[inline]
    pub fn respond_n(&mut self, status: Status, n: u64) {
        self.responses[(status.0 as usize).min(STATUS_SLOTS - 1)] += n;
    }

    /// Whether nothing was recorded.
    pub fn is_empty(&self) -> bool {
        self.requests == 0
            && self.batches == 0
            && self.responses.iter().all(|&r| r == 0)
            && self.hist.iter().all(|h| h.is_empty())
            && self.pending.is_empty()
    }

    pub(super) fn add(&mut self, other: &Sample) {
        debug_assert!(
            other.pending.is_empty(),
            "a sample is settled before it is merged"
        );
        for (h, o) in self.hist.iter_mut().zip(&other.hist) {
            // Same bounds on both sides: cannot fail.
            let _ = h.add(o);
        }
        for (r, o) in self.responses.iter_mut().zip(&other.responses) {
            *r += o;
        }
        self.requests += other.requests;
        self.batches += other.batches;
        self.rows += other.rows;
    }

    /// Responses with an error status.
    pub fn failures(&self) -> u64 {
        self.responses[1..].iter().sum()
    }

    /// All responses.
    pub fn total_responses(&self) -> u64 {
        self.responses.iter().sum()
    }

    /// Responses whose deadline passed before they ran.
    pub fn timeouts(&self) -> u64 {
        self.responses[Status::TIMEOUT.0 as usize]
    }

    /// Responses refused: queue full or malformed.
    pub fn rejections(&self) -> u64 {
        self.responses[Status::QUEUE_FULL.0 as usize] + self.responses[Status::REJECTED.0 as usize]
    }

    /// Error responses by kind (the ABI's status names; `Other` past them), kinds with none
    /// left out, in status order.
    pub fn errors_by_kind(&self) -> impl Iterator<Item = (&'static str, u64)> + '_ {
        self.responses
            .iter()
            .enumerate()
            .skip(1)
            .filter(|(_, &n)| n > 0)
            .map(|(code, &n)| (Status(code as u32).name().unwrap_or("Other"), n))
    }
}

/// Where one poller hands one model's samples to the monitor.
///
/// Samples are boxed so a hand-over moves a pointer, not the sample.
#[derive(Debug)]
#[allow(clippy::vec_box)]
pub struct Exchange {
    pub(super) model: usize,
    pub(super) filled: Mutex<Vec<Box<Sample>>>,
    pub(super) spare: Mutex<Vec<Box<Sample>>>,
    /// Its recorder finished (its lane is gone): dropped once emptied.
    pub(super) done: std::sync::atomic::AtomicBool,
}

/// A poller's recorder for one model.
#[derive(Debug)]
pub struct Recorder {
    pub(super) sample: Box<Sample>,
    /// An empty sample taken from the spares whose hand-over failed; used next time.
    pub(super) reserve: Option<Box<Sample>>,
    pub(super) exchange: Arc<Exchange>,
    pub(super) flushed_ns: u64,
    /// Something was recorded since the last hand-over.
    pub(super) dirty: bool,
}

impl Recorder {
    /// The sample to record into.
    #[inline]
    pub fn sample(&mut self) -> &mut Sample {
        self.dirty = true;
        &mut self.sample
    }

    /// Whether something was recorded and not handed over yet.
    #[inline]
    pub fn is_dirty(&self) -> bool {
        self.dirty
    }

    /// Hands the sample to the monitor when something was recorded and the last hand-over is
    /// at least `min_age_ns` old. Never blocks and never allocates; when the monitor holds a
    /// lock or has no empty sample to give, recording goes on in the same sample and a later
    /// call hands it over.
    pub fn flush(&mut self, now_ns: u64, min_age_ns: u64) {
        if !self.dirty || now_ns.saturating_sub(self.flushed_ns) < min_age_ns {
            return;
        }
        self.sample.settle();
        let fresh = match self.reserve.take() {
            Some(f) => f,
            None => match self.exchange.spare.try_lock() {
                Ok(mut spare) => match spare.pop() {
                    Some(f) => f,
                    None => return,
                },
                Err(_) => return,
            },
        };
        let full = std::mem::replace(&mut self.sample, fresh);
        match self.exchange.filled.try_lock() {
            // (see `finish` for the hand-over that waits)
            // The vector has room for every sample of this exchange: no allocation.
            Ok(mut filled) => {
                filled.push(full);
                self.flushed_ns = now_ns;
                self.dirty = false;
            }
            Err(_) => {
                // The monitor holds it: keep recording into the full sample.
                let fresh = std::mem::replace(&mut self.sample, full);
                self.reserve = Some(fresh);
            }
        }
    }
}

impl Recorder {
    /// Hands what is left to the monitor, waiting for its locks: for a poller that stops or
    /// drops the lane. The monitor lets go of the exchange once it merged the rest.
    pub fn finish(&mut self) {
        if self.dirty {
            self.sample.settle();
            let full = std::mem::take(&mut self.sample);
            self.exchange.filled.locked().push(full);
            self.dirty = false;
        }
        self.exchange.done.store(true, Ordering::Release);
    }
}

/// Samples per exchange: the poller's, one in the monitor's hands and one spare.
pub(super) const SAMPLES_PER_EXCHANGE: usize = 3;

impl Sample {
    /// Empties the sample, keeping its allocations.
    pub fn reset_in_place(&mut self) {
        self.pending.clear();
        for h in &mut self.hist {
            h.reset();
        }
        self.responses = [0; STATUS_SLOTS];
        self.requests = 0;
        self.batches = 0;
        self.rows = 0;
    }
}
