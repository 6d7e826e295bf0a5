//! [`BatchQueue`]: one model's waiting requests and the rules that turn them into batches.
//!
//! A plain struct: no threads, no clock (every call takes `now_ns`). The poller drives it:
//! [`BatchQueue::push`] what it reads from the rings, [`BatchQueue::take_resolved`] answers
//! that need no batch, [`BatchQueue::decide`] whether to run a batch now, and
//! [`BatchQueue::take`] the batch.
//!
//! # Rules
//! - **Order per session.** Each session's requests form a FIFO; only its head is ever taken,
//!   so responses go back in submission order. A session's effective priority is the highest
//!   priority it has queued (a Critical request behind Low ones lifts them: priority
//!   inheritance), so a Critical request still overtakes other sessions' backlogs.
//! - **Priority.** A batch is filled from the session with the highest effective priority,
//!   oldest head first among equals. With `priority_based_batching` off, oldest head first.
//! - **Aging (starvation bound).** A head gains one priority level per `aging_ns` of waiting,
//!   up to Critical. A Low request therefore competes as Critical after at most `3 × aging_ns`
//!   and, being older than every request that arrives after it, is taken by the first batch
//!   formed after that, unless requests that are older than it still wait for rows of that
//!   batch. Under sustained High load a Low request waits at most `3 × aging_ns` plus one batch.
//! - **When to run.** Now, when any of: the executable requests fill a batch; one of them is
//!   Critical (Critical never waits for a timeout); the oldest has waited `batch_timeout_ns`;
//!   waiting longer would make the earliest deadline late (given the caller's estimate of a
//!   batch's compute time); the timeout is 0 (greedy: whatever is queued runs as soon as the
//!   poller gets to it, so batches grow with load and a lone request never waits).
//! - **Held.** While the caller says enough of this queue's batches are still in flight to keep
//!   its device busy (`held`), the timeout alone does not start a batch: it waits, and grows,
//!   until fewer are in flight. Every other reason above still starts it, and a queued request
//!   with a deadline turns the hold off (a batch started at its latest start would still wait
//!   behind those in flight).
//! - **Size.** Up to the full size: the model's optimal batch size once profiled (with
//!   `enable_dynamic_batching`), else `max_batch_size`, never above the largest allowed size. The
//!   spec's heuristic (`calculate_optimal_batch_size`) takes `min(queued, max_batch_size)` for
//!   every queue length, so it adds nothing to that rule.
//! - **Buckets.** A batch of `n` rows runs as the next allowed size up; padded rows are zeros and
//!   their outputs are never answered.
//! - **Deadlines.** A request whose deadline has passed when it reaches the head is answered
//!   `Timeout` and not executed.
//! - **Admission.** A request over its priority's `max_queue_size` is refused
//!   ([`QueueFull`]); the caller queues its `QueueFull` answer in its place.
#![forbid(unsafe_code)]

use std::collections::VecDeque;

use crate::models::{BatchConfig, CRITICAL, PRIORITIES};

/// A request refused because its priority's queue is at its limit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct QueueFull {
    /// The limit.
    pub limit: usize,
}

/// What the queue knows of a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Request<T> {
    /// The caller's data, handed back when the request is taken.
    pub item: T,
    /// Session slot (small integer, stable while the session lives).
    pub session: usize,
    /// 0 Low ..= 3 Critical.
    pub priority: u8,
    /// When it was accepted.
    pub arrival_ns: u64,
    /// When its answer stops being useful; 0 for never.
    pub deadline_ns: u64,
}

/// What became of a request taken from the queue.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Runs in the batch at this row.
    Execute {
        /// Row of the batch input.
        row: usize,
    },
    /// Was answered when queued (an error status in the caller's item).
    Resolved,
    /// Its deadline passed before it ran.
    TimedOut {
        /// Nanoseconds past the deadline.
        late_ns: u64,
    },
}

/// A request leaving the queue, in the order responses must be written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Taken<T> {
    /// The request.
    pub request: Request<T>,
    /// What to answer.
    pub outcome: Outcome,
}

/// Whether to run a batch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Nothing executable is queued.
    Idle,
    /// Run a batch now.
    Run,
    /// Wait; decide again by this time.
    WaitUntil(u64),
    /// Wait for the batches in flight: the batch starts once the caller no longer holds it,
    /// or once it is full (see [`BatchQueue::decide`]'s `held`).
    Hold,
}

/// Counters for monitoring, per priority.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BatchStats {
    /// Requests that timed out in the queue.
    pub timeouts: [u64; PRIORITIES],
    /// Requests refused at admission.
    pub rejections: [u64; PRIORITIES],
    /// Requests executed.
    pub executed: [u64; PRIORITIES],
    /// Total queueing time of executed requests (arrival to batch start).
    pub queue_ns: [u64; PRIORITIES],
    /// Batches run.
    pub batches: u64,
    /// Rows run, padding included.
    pub padded_rows: u64,
}

/// A row of a queue's feature arena taken by [`BatchQueue::reserve_row`]: queued with its
/// request or given back, never both.
#[derive(Debug)]
pub struct ArenaRow(u32);

struct Queued<T> {
    request: Request<T>,
    /// Row in the feature arena; `None` for a resolved request.
    row: Option<u32>,
}

struct SessionFifo<T> {
    queue: VecDeque<Queued<T>>,
    /// Executable requests queued, per priority.
    counts: [u32; PRIORITIES],
    /// Its place in `BatchQueue::waiting` while it holds requests.
    place: usize,
}

impl<T> Default for SessionFifo<T> {
    fn default() -> Self {
        Self {
            queue: VecDeque::new(),
            counts: [0; PRIORITIES],
            place: usize::MAX,
        }
    }
}

/// One model's waiting requests.
pub struct BatchQueue<T> {
    config: BatchConfig,
    width: usize,
    /// Features of queued executable requests: a row of `row_words` words per request, its
    /// first `width` `f32`s the features. Words, so that a frame's features are read from its
    /// ring straight into a row ([`BatchQueue::reserve_row`]).
    arena: Vec<u64>,
    row_words: usize,
    free_rows: Vec<u32>,
    sessions: Vec<SessionFifo<T>>,
    /// The sessions holding requests, in no order: what every scan of the sessions walks, so
    /// that sessions with nothing queued cost nothing.
    waiting: Vec<usize>,
    /// Executable requests queued, per priority.
    queued: [usize; PRIORITIES],
    /// Resolved requests queued.
    resolved: usize,
    /// Executable requests queued with a deadline (`decide` looks at every one only then).
    with_deadline: usize,
    /// The model's optimal batch size, once profiled.
    optimal_batch_size: Option<usize>,
    stats: BatchStats,
}

impl<T: Copy> BatchQueue<T> {
    /// Features per request.
    pub fn width(&self) -> usize {
        self.width
    }

    /// An empty queue for rows of `width` features.
    pub fn new(config: BatchConfig, width: usize) -> Self {
        let rows: usize = config.max_queue_size.iter().sum();
        Self {
            arena: vec![0; rows * width.div_ceil(2)],
            row_words: width.div_ceil(2),
            free_rows: (0..rows as u32).rev().collect(),
            config,
            width,
            sessions: Vec::new(),
            waiting: Vec::new(),
            queued: [0; PRIORITIES],
            resolved: 0,
            with_deadline: 0,
            optimal_batch_size: None,
            stats: BatchStats::default(),
        }
    }

    /// The policy.
    pub fn config(&self) -> &BatchConfig {
        &self.config
    }

    /// Counters so far.
    pub fn stats(&self) -> &BatchStats {
        &self.stats
    }

    /// Executable requests queued.
    pub fn executable(&self) -> usize {
        self.queued.iter().sum()
    }

    /// Whether nothing at all is queued.
    pub fn is_empty(&self) -> bool {
        self.executable() == 0 && self.resolved == 0
    }

    /// Sets the profiled optimal batch size (used with `enable_dynamic_batching`).
    pub fn set_optimal_batch_size(&mut self, size: usize) {
        self.optimal_batch_size = Some(size.max(1));
    }

    /// Rows a batch is filled up to.
    pub fn full_size(&self) -> usize {
        let full = match (self.config.enable_dynamic_batching, self.optimal_batch_size) {
            (true, Some(optimal)) => optimal,
            _ => self.config.max_batch_size,
        };
        full.min(self.config.largest_batch()).max(1)
    }

    /// Appends to a session's FIFO, listing the session as waiting if it held nothing.
    fn push_queued(&mut self, session: usize, queued: Queued<T>) {
        if self.sessions.len() <= session {
            self.sessions.resize_with(session + 1, SessionFifo::default);
        }
        let fifo = &mut self.sessions[session];
        if fifo.queue.is_empty() {
            fifo.place = self.waiting.len();
            self.waiting.push(session);
        }
        fifo.queue.push_back(queued);
    }

    /// Whether a request of `priority` would be queued now (else [`BatchQueue::push`] refuses
    /// it with [`BatchQueue::limit`]).
    #[inline]
    pub fn has_room(&self, priority: u8) -> bool {
        let p = usize::from(priority.min(3));
        self.queued[p] < self.config.max_queue_size[p] && !self.free_rows.is_empty()
    }

    /// The most requests of `priority` queued at once.
    pub fn limit(&self, priority: u8) -> usize {
        self.config.max_queue_size[usize::from(priority.min(3))]
    }

    /// Counts a request of `priority` refused for a full queue without being offered to
    /// [`BatchQueue::push`] (its features were never read).
    pub fn count_rejection(&mut self, priority: u8) {
        self.stats.rejections[usize::from(priority.min(3))] += 1;
    }

    /// Queues an executable request with its features.
    ///
    /// # Errors
    /// [`QueueFull`] when its priority's queue is at `max_queue_size` (counted as a rejection);
    /// the caller answers it, normally by queueing a resolved request in its place.
    ///
    /// # Panics
    /// When `features` is not `width` long or the priority is above Critical.
    pub fn push(&mut self, request: Request<T>, features: &[f32]) -> Result<(), QueueFull> {
        assert_eq!(features.len(), self.width);
        if !self.has_room(request.priority) {
            self.count_rejection(request.priority);
            return Err(QueueFull {
                limit: self.limit(request.priority),
            });
        }
        let (row, _) = self.reserve_row();
        let w = self.width;
        self.row_mut(&row)[..w].copy_from_slice(features);
        self.push_reserved(request, row);
        Ok(())
    }

    /// Takes a free row of the arena for a request's features, to be written in place: the
    /// row and its words (`width` features, the last word's upper half spare when `width` is
    /// odd). The row goes back with [`BatchQueue::release_row`] or is queued with
    /// [`BatchQueue::push_reserved`].
    ///
    /// # Panics
    /// When no row is free (checked by [`BatchQueue::has_room`]).
    pub fn reserve_row(&mut self) -> (ArenaRow, &mut [u64]) {
        let row = self
            .free_rows
            .pop()
            .expect("reserved with room: a free row");
        let words = self.row_words;
        let start = row as usize * words;
        (ArenaRow(row), &mut self.arena[start..start + words])
    }

    /// The features in `row`, as far as `words` of it were written (at most `width`).
    pub fn row_features(&self, row: &ArenaRow, words: usize) -> &[f32] {
        let start = row.0 as usize * self.row_words;
        let written = &self.arena[start..start + words.min(self.row_words)];
        let values: &[f32] = bytemuck::cast_slice(written);
        &values[..values.len().min(self.width)]
    }

    fn row_mut(&mut self, row: &ArenaRow) -> &mut [f32] {
        let start = row.0 as usize * self.row_words;
        bytemuck::cast_slice_mut(&mut self.arena[start..start + self.row_words])
    }

    /// Gives back a row taken by [`BatchQueue::reserve_row`] for a request not queued.
    pub fn release_row(&mut self, row: ArenaRow) {
        self.free_rows.push(row.0);
    }

    /// Queues an executable request whose features were written into `row`; the room was
    /// checked by [`BatchQueue::has_room`] before the row was taken.
    ///
    /// # Panics
    /// When the priority is above Critical.
    pub fn push_reserved(&mut self, request: Request<T>, row: ArenaRow) {
        let p = request.priority as usize;
        debug_assert!(self.queued[p] < self.config.max_queue_size[p]);
        self.queued[p] += 1;
        self.with_deadline += usize::from(request.deadline_ns != 0);
        self.push_queued(
            request.session,
            Queued {
                request,
                row: Some(row.0),
            },
        );
        self.sessions[request.session].counts[p] += 1;
    }

    /// Queues a request already answered (an error found when it was read), so its answer
    /// goes out in its session's order.
    pub fn push_resolved(&mut self, request: Request<T>) {
        self.resolved += 1;
        self.push_queued(request.session, Queued { request, row: None });
    }

    /// Takes every session's leading requests that need no batch: resolved ones, and ones
    /// whose deadline has passed. Appends them to `out` in the order to answer them.
    ///
    /// Sessions for which `held` is true are skipped: the caller still owes them answers to
    /// requests taken earlier (a batch in flight), which must go out first.
    pub fn take_resolved(
        &mut self,
        now_ns: u64,
        out: &mut Vec<Taken<T>>,
        held: impl Fn(usize) -> bool,
    ) {
        if self.resolved == 0 && !self.any_deadlines() {
            return;
        }
        let mut i = 0;
        while i < self.waiting.len() {
            let s = self.waiting[i];
            if !held(s) {
                while let Some(taken) = self.take_head_without_batch(s, now_ns) {
                    out.push(taken);
                }
            }
            // A session left with nothing is no longer listed: another took its place.
            if self.waiting.get(i) == Some(&s) {
                i += 1;
            }
        }
    }

    /// Takes a session's head if it needs no batch (resolved or late), counting timeouts.
    fn take_head_without_batch(&mut self, s: usize, now_ns: u64) -> Option<Taken<T>> {
        let outcome = self.head_outcome_without_batch(s, now_ns)?;
        let q = self.pop_head(s);
        if let Outcome::TimedOut { .. } = outcome {
            self.stats.timeouts[q.request.priority as usize] += 1;
        }
        Some(Taken {
            request: q.request,
            outcome,
        })
    }

    fn any_deadlines(&self) -> bool {
        // Deadlines are checked at the heads only; cheap enough to look whenever requests wait.
        self.executable() > 0
    }

    /// What a session's head gets if it needs no batch (resolved or late), else `None`.
    fn head_outcome_without_batch(&self, s: usize, now_ns: u64) -> Option<Outcome> {
        let head = self.sessions[s].queue.front()?;
        if head.row.is_none() {
            return Some(Outcome::Resolved);
        }
        let d = head.request.deadline_ns;
        (d != 0 && now_ns > d).then(|| Outcome::TimedOut {
            late_ns: now_ns - d,
        })
    }

    fn pop_head(&mut self, s: usize) -> Queued<T> {
        let q = self.sessions[s].queue.pop_front().expect("a head");
        if self.sessions[s].queue.is_empty() {
            let place = self.sessions[s].place;
            self.waiting.swap_remove(place);
            if let Some(&moved) = self.waiting.get(place) {
                self.sessions[moved].place = place;
            }
            self.sessions[s].place = usize::MAX;
        }
        match q.row {
            None => self.resolved -= 1,
            Some(row) => {
                let p = q.request.priority as usize;
                self.queued[p] -= 1;
                self.with_deadline -= usize::from(q.request.deadline_ns != 0);
                self.sessions[s].counts[p] -= 1;
                self.free_rows.push(row);
            }
        }
        q
    }

    /// A session's effective priority (inheritance and aging; see the module's rules).
    fn effective_priority(&self, s: usize, now_ns: u64) -> u8 {
        if !self.config.priority_based_batching {
            return 0;
        }
        let fifo = &self.sessions[s];
        let inherited = (0..PRIORITIES)
            .rev()
            .find(|&p| fifo.counts[p] > 0)
            .unwrap_or(0) as u8;
        let aged = fifo.queue.front().map_or(0, |h| {
            let levels = now_ns.saturating_sub(h.request.arrival_ns) / self.config.aging_ns;
            (u64::from(h.request.priority) + levels).min(u64::from(CRITICAL)) as u8
        });
        inherited.max(aged)
    }

    /// Whether to run a batch now. `batch_compute_ns` is the caller's estimate of how long a
    /// full batch computes (for deadlines).
    ///
    /// `held`: earlier batches of this queue are still running (on a pipeline), enough to keep
    /// its device busy. A batch that is not full then waits for them past its timeout
    /// ([`Decision::Hold`]): it goes on growing while the device is busy, so under load
    /// batches grow with it instead of many small ones queueing on the device. A full batch, a
    /// critical request and a zero timeout still start it as when not held; while any queued
    /// request has a deadline it is not held at all.
    pub fn decide(&self, now_ns: u64, batch_compute_ns: u64, held: bool) -> Decision {
        let n = self.executable();
        if n == 0 {
            return Decision::Idle;
        }
        if n >= self.full_size() || self.config.batch_timeout_ns == 0 {
            return Decision::Run;
        }
        if self.config.priority_based_batching && self.queued[CRITICAL as usize] > 0 {
            return Decision::Run;
        }
        let mut oldest = u64::MAX;
        let mut earliest_deadline = u64::MAX;
        for &s in &self.waiting {
            let mut executable = self.sessions[s].queue.iter().filter(|q| q.row.is_some());
            // A session's requests arrived in its order: its first executable one is its oldest.
            let Some(first) = executable.next() else {
                continue;
            };
            oldest = oldest.min(first.request.arrival_ns);
            // Every one, but only while some have deadlines (a walk over all that is queued).
            if self.with_deadline > 0 {
                for q in std::iter::once(first).chain(executable) {
                    if q.request.deadline_ns != 0 {
                        earliest_deadline = earliest_deadline.min(q.request.deadline_ns);
                    }
                }
            }
        }
        let timeout_at = oldest.saturating_add(self.config.batch_timeout_ns);
        let latest_start = earliest_deadline.saturating_sub(batch_compute_ns);
        // With a deadline queued the hold is off: started at its latest start, the batch would
        // still wait behind those in flight and answer late.
        if held && earliest_deadline == u64::MAX {
            return Decision::Hold;
        }
        let start_by = timeout_at.min(latest_start);
        if now_ns >= start_by {
            Decision::Run
        } else {
            Decision::WaitUntil(start_by)
        }
    }

    /// Takes a batch: fills `input` (at least `largest_batch() * width` long) with up to
    /// [`BatchQueue::full_size`] rows, zero-padded to the next allowed size, and appends every
    /// request taken to `out` in answer order (resolved and late heads met on the way too).
    /// Returns `(rows, padded_rows)`.
    pub fn take(
        &mut self,
        now_ns: u64,
        input: &mut [f32],
        out: &mut Vec<Taken<T>>,
    ) -> (usize, usize) {
        let cap = self.full_size();
        let w = self.width;
        let mut rows = 0;
        while rows < cap {
            // The session to serve: highest effective priority, oldest head among equals (the
            // lowest session slot among those).
            let best = self
                .waiting
                .iter()
                .map(|&s| {
                    let head = self.sessions[s]
                        .queue
                        .front()
                        .expect("waiting sessions hold");
                    (
                        self.effective_priority(s, now_ns),
                        std::cmp::Reverse(head.request.arrival_ns),
                        std::cmp::Reverse(s),
                    )
                })
                .max();
            let Some((_, _, std::cmp::Reverse(s))) = best else {
                break;
            };
            if let Some(taken) = self.take_head_without_batch(s, now_ns) {
                out.push(taken);
                continue;
            }
            let q = self.pop_head(s);
            let row = ArenaRow(q.row.expect("executable"));
            input[rows * w..(rows + 1) * w]
                .copy_from_slice(self.row_features(&row, self.row_words));
            let p = q.request.priority as usize;
            self.stats.executed[p] += 1;
            self.stats.queue_ns[p] += now_ns.saturating_sub(q.request.arrival_ns);
            out.push(Taken {
                request: q.request,
                outcome: Outcome::Execute { row: rows },
            });
            rows += 1;
        }
        let padded = self.config.padded_rows(rows);
        input[rows * w..padded * w].fill(0.0);
        if rows > 0 {
            self.stats.batches += 1;
            self.stats.padded_rows += padded as u64;
        }
        (rows, padded)
    }

    /// Drops every request of a session that went away; returns how many.
    pub fn remove_session(&mut self, session: usize) -> usize {
        let mut n = 0;
        while session < self.sessions.len() && !self.sessions[session].queue.is_empty() {
            self.pop_head(session);
            n += 1;
        }
        n
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const US: u64 = 1_000;

    fn config() -> BatchConfig {
        BatchConfig {
            max_batch_size: 4,
            batch_timeout_ns: 100 * US,
            min_batch_size: 1,
            enable_dynamic_batching: true,
            priority_based_batching: true,
            allowed_batch_sizes: Vec::new(),
            max_queue_size: [8; PRIORITIES],
            aging_ns: 1_000 * US,
        }
    }

    fn req(item: u32, session: usize, priority: u8, arrival_ns: u64) -> Request<u32> {
        Request {
            item,
            session,
            priority,
            arrival_ns,
            deadline_ns: 0,
        }
    }

    fn push(q: &mut BatchQueue<u32>, r: Request<u32>) {
        q.push(r, &[r.item as f32]).unwrap();
    }

    /// Takes a batch; returns (items executed in row order, all items in answer order).
    fn take(q: &mut BatchQueue<u32>, now: u64) -> (Vec<u32>, Vec<(u32, Outcome)>) {
        let mut input = vec![-1.0; q.config().largest_batch()];
        let mut out = Vec::new();
        let (rows, _) = q.take(now, &mut input, &mut out);
        let executed: Vec<u32> = input[..rows].iter().map(|&v| v as u32).collect();
        (
            executed,
            out.iter().map(|t| (t.request.item, t.outcome)).collect(),
        )
    }

    #[test]
    fn waits_for_the_timeout_then_runs() {
        let mut q = BatchQueue::new(config(), 1);
        assert_eq!(q.decide(0, 0, false), Decision::Idle);
        push(&mut q, req(1, 0, 1, 10 * US));
        assert_eq!(q.decide(20 * US, 0, false), Decision::WaitUntil(110 * US));
        assert_eq!(q.decide(110 * US, 0, false), Decision::Run);
    }

    #[test]
    fn a_batch_in_flight_holds_a_partial_one_past_its_timeout_but_not_a_full_one() {
        let mut q = BatchQueue::new(config(), 1);
        push(&mut q, req(1, 0, 1, 10 * US));
        // Past the timeout: it runs alone, and waits while an earlier batch runs.
        assert_eq!(q.decide(110 * US, 0, false), Decision::Run);
        assert_eq!(q.decide(110 * US, 0, true), Decision::Hold);
        assert_eq!(q.decide(5_000 * US, 0, true), Decision::Hold);
        // Before the timeout it waits either way.
        assert_eq!(q.decide(20 * US, 0, true), Decision::Hold);
        for i in 2..5 {
            push(&mut q, req(i, i as usize, 1, 20 * US));
        }
        assert_eq!(q.decide(20 * US, 0, true), Decision::Run);
    }

    #[test]
    fn a_batch_in_flight_holds_neither_critical_nor_a_deadline() {
        let mut q = BatchQueue::new(config(), 1);
        push(&mut q, req(1, 0, 3, 0));
        assert_eq!(q.decide(1, 0, true), Decision::Run);

        // A deadline turns the hold off: the timeout (100 us from 0) starts the batch even
        // though its latest start (1,000 - 30 us) is later.
        let mut q = BatchQueue::new(config(), 1);
        let mut r = req(1, 0, 1, 0);
        r.deadline_ns = 1_000 * US;
        push(&mut q, r);
        assert_eq!(
            q.decide(10 * US, 30 * US, true),
            Decision::WaitUntil(100 * US)
        );
        assert_eq!(q.decide(100 * US, 30 * US, true), Decision::Run);
    }

    #[test]
    fn a_full_batch_runs_at_once() {
        let mut q = BatchQueue::new(config(), 1);
        for i in 0..4 {
            push(&mut q, req(i, i as usize, 1, 0));
        }
        assert_eq!(q.decide(1, 0, false), Decision::Run);
        let (executed, _) = take(&mut q, 1);
        assert_eq!(executed, [0, 1, 2, 3]);
    }

    #[test]
    fn a_zero_timeout_never_waits() {
        let mut q = BatchQueue::new(
            BatchConfig {
                batch_timeout_ns: 0,
                ..config()
            },
            1,
        );
        push(&mut q, req(1, 0, 0, 0));
        assert_eq!(q.decide(0, 0, false), Decision::Run);
        // Nor for batches in flight.
        assert_eq!(q.decide(0, 0, true), Decision::Run);
    }

    #[test]
    fn critical_never_waits_for_the_timeout() {
        let mut q = BatchQueue::new(config(), 1);
        push(&mut q, req(1, 0, 1, 0));
        push(&mut q, req(2, 1, 3, 0));
        assert_eq!(q.decide(1, 0, false), Decision::Run);
    }

    #[test]
    fn higher_priorities_fill_the_batch_first() {
        let mut q = BatchQueue::new(config(), 1);
        for i in 0..4 {
            push(&mut q, req(i, i as usize, 0, i as u64));
        }
        push(&mut q, req(10, 5, 2, 10));
        push(&mut q, req(11, 6, 3, 11));
        let (executed, _) = take(&mut q, 12);
        assert_eq!(executed, [11, 10, 0, 1]);
    }

    #[test]
    fn without_priorities_the_oldest_goes_first() {
        let cfg = BatchConfig {
            priority_based_batching: false,
            ..config()
        };
        let mut q = BatchQueue::new(cfg, 1);
        push(&mut q, req(1, 0, 0, 5));
        push(&mut q, req(2, 1, 3, 6));
        push(&mut q, req(3, 2, 0, 1));
        let (executed, _) = take(&mut q, 10);
        assert_eq!(executed, [3, 1, 2]);
    }

    #[test]
    fn a_session_keeps_its_order_and_inherits_its_highest_priority() {
        let mut q = BatchQueue::new(
            BatchConfig {
                max_batch_size: 2,
                ..config()
            },
            1,
        );
        // Session 0: Low, Low, Critical. Session 1: High, older than all of them.
        push(&mut q, req(20, 1, 2, 0));
        push(&mut q, req(1, 0, 0, 1));
        push(&mut q, req(2, 0, 0, 2));
        push(&mut q, req(3, 0, 3, 3));
        let (first, _) = take(&mut q, 4);
        assert_eq!(
            first,
            [1, 2],
            "session 0 runs Critical-first, in its own order"
        );
        let (second, _) = take(&mut q, 4);
        assert_eq!(second, [3, 20]);
    }

    #[test]
    fn low_is_not_starved_under_sustained_high_load() {
        // Batches of one; a High request arrives before every batch. The Low request must run
        // within 3 aging periods (plus one batch), as the module documents.
        let cfg = BatchConfig {
            max_batch_size: 1,
            batch_timeout_ns: 0,
            aging_ns: 100 * US,
            max_queue_size: [1024; PRIORITIES],
            ..config()
        };
        let mut q = BatchQueue::new(cfg, 1);
        push(&mut q, req(0, 0, 0, 0));
        let mut now = 0;
        let mut next = 1;
        loop {
            push(&mut q, req(next, 1 + (next as usize % 4), 2, now));
            next += 1;
            let (executed, _) = take(&mut q, now);
            if executed == [0] {
                break;
            }
            now += 10 * US;
            assert!(now <= 3 * 100 * US + 10 * US, "Low starved past the bound");
        }
        assert!(
            now >= 2 * 100 * US,
            "Low should wait while High is younger than 2 periods"
        );
    }

    #[test]
    fn late_requests_time_out_and_are_not_executed() {
        let mut q = BatchQueue::new(config(), 1);
        let mut r = req(1, 0, 1, 0);
        r.deadline_ns = 50 * US;
        push(&mut q, r);
        push(&mut q, req(2, 0, 1, 1));
        let mut out = Vec::new();
        q.take_resolved(60 * US, &mut out, |_| false);
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].outcome, Outcome::TimedOut { late_ns: 10 * US });
        assert_eq!(q.stats().timeouts[1], 1);
        let (executed, _) = take(&mut q, 60 * US);
        assert_eq!(executed, [2]);
    }

    #[test]
    fn a_held_session_keeps_its_resolved_and_late_heads() {
        let mut q = BatchQueue::new(config(), 1);
        let mut late = req(1, 0, 1, 0);
        late.deadline_ns = 5 * US;
        push(&mut q, late);
        q.push_resolved(req(2, 1, 1, 0));
        let mut out = Vec::new();
        q.take_resolved(10 * US, &mut out, |s| s == 0);
        let items: Vec<u32> = out.iter().map(|t| t.request.item).collect();
        assert_eq!(items, [2], "session 0 is held: its late head waits");
        out.clear();
        q.take_resolved(10 * US, &mut out, |_| false);
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].outcome, Outcome::TimedOut { late_ns: 5 * US });
    }

    #[test]
    fn requests_before_their_deadline_run() {
        let mut q = BatchQueue::new(config(), 1);
        let mut r = req(1, 0, 1, 0);
        r.deadline_ns = u64::MAX;
        push(&mut q, r);
        let mut out = Vec::new();
        q.take_resolved(10 * US, &mut out, |_| false);
        assert!(out.is_empty());
        assert_eq!(take(&mut q, 10 * US).0, [1]);
    }

    #[test]
    fn waiting_stops_when_it_would_make_a_deadline_late() {
        let mut q = BatchQueue::new(
            BatchConfig {
                batch_timeout_ns: 1_000 * US,
                ..config()
            },
            1,
        );
        let mut r = req(1, 0, 1, 0);
        r.deadline_ns = 100 * US;
        push(&mut q, r);
        // A batch takes 30 us: it must start by 70 us.
        assert_eq!(
            q.decide(10 * US, 30 * US, false),
            Decision::WaitUntil(70 * US)
        );
        assert_eq!(q.decide(70 * US, 30 * US, false), Decision::Run);
    }

    #[test]
    fn a_deadline_behind_a_session_head_bounds_the_wait_until_its_request_is_taken() {
        let mut q = BatchQueue::new(
            BatchConfig {
                batch_timeout_ns: 1_000 * US,
                ..config()
            },
            1,
        );
        push(&mut q, req(1, 0, 1, 0));
        let mut r = req(2, 0, 1, 5 * US);
        r.deadline_ns = 100 * US;
        push(&mut q, r);
        push(&mut q, req(3, 1, 1, 2 * US));
        assert_eq!(
            q.decide(10 * US, 30 * US, false),
            Decision::WaitUntil(70 * US)
        );
        let (mut input, mut out) = (vec![0.0; 4], Vec::new());
        assert_eq!(q.take(10 * US, &mut input, &mut out).0, 3);
        // Only the timeout bounds the next wait, from the oldest request still queued.
        push(&mut q, req(4, 1, 1, 20 * US));
        push(&mut q, req(5, 0, 1, 25 * US));
        assert_eq!(
            q.decide(30 * US, 30 * US, false),
            Decision::WaitUntil(1_020 * US)
        );
    }

    #[test]
    fn batches_are_padded_to_the_next_allowed_size() {
        let cfg = BatchConfig {
            max_batch_size: 8,
            allowed_batch_sizes: vec![1, 4, 8],
            ..config()
        };
        let mut q = BatchQueue::new(cfg, 1);
        for i in 0..3 {
            push(&mut q, req(i + 1, i as usize, 1, 0));
        }
        let mut input = vec![-1.0; 8];
        let mut out = Vec::new();
        assert_eq!(q.take(0, &mut input, &mut out), (3, 4));
        assert_eq!(&input[..4], &[1.0, 2.0, 3.0, 0.0], "padding rows are zero");
        assert_eq!(out.len(), 3, "padded rows are never answered");
        assert_eq!(q.stats().padded_rows, 4);
    }

    #[test]
    fn the_largest_allowed_size_caps_a_batch() {
        let cfg = BatchConfig {
            max_batch_size: 8,
            allowed_batch_sizes: vec![2, 4],
            ..config()
        };
        let mut q = BatchQueue::new(cfg, 1);
        for i in 0..6 {
            push(&mut q, req(i, i as usize, 1, 0));
        }
        assert_eq!(q.full_size(), 4);
        let (executed, _) = take(&mut q, 0);
        assert_eq!(executed.len(), 4);
    }

    #[test]
    fn the_profiled_optimal_size_sets_the_batch_size() {
        let mut q = BatchQueue::new(
            BatchConfig {
                max_batch_size: 8,
                ..config()
            },
            1,
        );
        q.set_optimal_batch_size(2);
        for i in 0..3 {
            push(&mut q, req(i, i as usize, 1, 0));
        }
        assert_eq!(q.decide(0, 0, false), Decision::Run);
        assert_eq!(take(&mut q, 0).0.len(), 2);
    }

    #[test]
    fn queue_limits_are_per_priority() {
        let cfg = BatchConfig {
            max_queue_size: [1, 2, 2, 2],
            ..config()
        };
        let mut q = BatchQueue::new(cfg, 1);
        q.push(req(1, 0, 0, 0), &[1.0]).unwrap();
        assert_eq!(q.push(req(2, 0, 0, 0), &[2.0]), Err(QueueFull { limit: 1 }));
        q.push(req(3, 0, 1, 0), &[3.0]).unwrap();
        assert_eq!(q.stats().rejections, [1, 0, 0, 0]);
        // The refusal is answered in the session's order.
        q.push_resolved(req(2, 0, 0, 0));
        let mut out = Vec::new();
        q.take_resolved(0, &mut out, |_| false);
        assert!(
            out.is_empty(),
            "a resolved request waits behind its session's earlier ones"
        );
        let (_, answers) = take(&mut q, 0);
        let items: Vec<u32> = answers.iter().map(|a| a.0).collect();
        assert_eq!(items, [1, 3, 2]);
    }

    #[test]
    fn a_removed_session_frees_its_rows() {
        let cfg = BatchConfig {
            max_queue_size: [1; PRIORITIES],
            ..config()
        };
        let mut q = BatchQueue::new(cfg, 1);
        push(&mut q, req(1, 3, 0, 0));
        q.push_resolved(req(2, 3, 0, 0));
        assert_eq!(q.remove_session(3), 2);
        assert!(q.is_empty());
        push(&mut q, req(3, 0, 0, 0));
    }

    #[test]
    fn features_written_into_a_reserved_row_are_what_the_batch_takes() {
        let cfg = BatchConfig {
            max_queue_size: [1, 1, 0, 0],
            ..config()
        };
        // Three features: two words a row, the second's upper half spare.
        let mut q = BatchQueue::new(cfg, 3);
        let (row, words) = q.reserve_row();
        assert_eq!(words.len(), 2);
        let values = [1.5f32, -2.0, 3.25, 99.0];
        words.copy_from_slice(bytemuck::cast_slice(&values));
        assert_eq!(q.row_features(&row, 2), &values[..3]);
        // What was read of a short frame only.
        assert_eq!(q.row_features(&row, 1), &values[..2]);
        q.push_reserved(req(7, 0, 1, 0), row);
        assert!(!q.has_room(1), "Normal is at its limit");
        // A row given back is free again: Low still has room for one.
        let (row, _) = q.reserve_row();
        q.release_row(row);
        assert!(q.has_room(0));
        let mut input = vec![0.0f32; 4 * 3];
        let mut out = Vec::new();
        assert_eq!(q.take(0, &mut input, &mut out), (1, 1));
        assert_eq!(out[0].request.item, 7);
        assert_eq!(&input[..3], &values[..3]);
    }
}
