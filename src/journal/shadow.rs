//! Shadow models: `[shadows."name:version"]` in `routing.toml` sends the rows a primary
//! version answers (or a share of them) to a shadow version too, and measures how the two
//! answers differ.
//!
//! - Only the primary answers. A poller records a row for the shadow after the primary's
//!   answer is written, as it records journal rows: into a reused chunk of its lane, handed to
//!   the runner through a bounded lock-free [`Pipe`]. When the runner is behind, no empty chunk
//!   is free and the row is dropped and counted: the poller never waits.
//! - The runner is one thread at the lowest priority (nice 19), off the pollers' cores and
//!   their SMT siblings. It runs each chunk's rows through the shadow version's engine, in
//!   batches, compares the outputs ([`Divergence`]) and, when the primary keeps a journal,
//!   journals the shadow's answers beside the primary's (source `shadow`, the same request
//!   ids).
//! - Figures per primary: in `performance/{model_key}` ([`ShadowReport`]) and `/metrics`
//!   (`tie_shadow_*`).

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use serde::Serialize;

use super::compare::Divergence;
use super::{CountersByKey, Journal, LaneJournal, Pipe, SessionInfo, CHUNK_AGE_NS};
use crate::models::routing::ShadowRule;
use crate::models::{LoadedModel, ModelSet, Models};
use crate::sync::{Locked, RwLocked};

/// Chunks of rows waiting for the runner, beyond those the lanes fill: 16 × 256 rows.
const QUEUED_CHUNKS: usize = 16;
/// Chunks the lanes may be filling at once (one per shadowed version and poller).
const FILLING_CHUNKS: usize = 32;
/// Rows kept among those that differ most.
const WORST_ROWS: usize = 5;
/// How long the runner sleeps when nothing is queued (rules in effect / none).
const IDLE_SLEEP: Duration = Duration::from_millis(5);
const IDLE_SLEEP_NO_RULES: Duration = Duration::from_millis(100);
/// A shadow that cannot run is logged at most this often per primary.
const WARN_EVERY: Duration = Duration::from_secs(10);

/// The rows of one primary version its shadow ran, and how they compared.
#[derive(Debug)]
struct Evaluation {
    /// The shadow version compared (`name:version`), or the rule's `shadow` while it has
    /// not run.
    shadow: String,
    rule: ShadowRule,
    divergence: Divergence,
    /// Rows not run: the shadow version is not loaded, or reads or answers another shape.
    unavailable: u64,
    /// Rows whose shadow batch failed.
    failed: u64,
    /// The primary's dropped rows when it started (its figures count those since).
    dropped_base: u64,
    last_warning: Option<Instant>,
}

impl Evaluation {
    fn new(rule: &ShadowRule, dropped_base: u64) -> Self {
        Self {
            shadow: rule.shadow.clone(),
            rule: rule.clone(),
            divergence: Divergence::new(rule.tolerance, WORST_ROWS),
            unavailable: 0,
            failed: 0,
            dropped_base,
            last_warning: None,
        }
    }

    /// Logs `why` unless it logged within [`WARN_EVERY`].
    fn warn(&mut self, primary: &str, why: &str) {
        let now = Instant::now();
        if self.last_warning.is_none_or(|t| now - t >= WARN_EVERY) {
            self.last_warning = Some(now);
            tracing::warn!(primary, shadow = %self.rule.shadow, "shadow not run: {why}");
        }
    }
}

/// The shadow rules in effect, the pipe from the pollers, and the runner's figures.
#[derive(Debug)]
pub struct Shadows {
    pipe: Arc<Pipe>,
    models: Arc<Models>,
    journal: Option<Arc<Journal>>,
    /// By primary key as written in `routing.toml`.
    rules: RwLock<Arc<BTreeMap<String, ShadowRule>>>,
    /// Bumped by every change of the rules (pollers compare it).
    generation: AtomicU64,
    /// Rows dropped by the lanes, per primary `name:version`.
    counters: CountersByKey,
    /// Per primary `name:version`.
    evaluations: Mutex<BTreeMap<String, Evaluation>>,
    stopping: AtomicBool,
    runner: Mutex<Option<std::thread::JoinHandle<()>>>,
}

/// One output column of a shadow's comparison.
#[derive(Clone, Debug, Serialize, utoipa::ToSchema)]
pub struct ShadowOutput {
    /// The largest |primary − shadow|.
    pub max_abs_diff: f64,
    /// The mean |primary − shadow|.
    pub mean_abs_diff: f64,
    /// The share of rows over the tolerance on this output.
    pub over_tolerance_share: f64,
    /// The share of rows where both have the same sign.
    pub sign_agreement: f64,
}

/// A row among those whose shadow answer differs most.
#[derive(Clone, Debug, Serialize, utoipa::ToSchema)]
pub struct ShadowRow {
    /// The request's id.
    pub request_id: u64,
    /// Its session.
    pub session_id: u64,
    /// When the primary answered it (RFC 3339).
    pub time: String,
    /// Its largest |primary − shadow|.
    pub max_abs_diff: f64,
    /// The primary's answer.
    pub primary: Vec<f32>,
    /// The shadow's.
    pub shadow: Vec<f32>,
}

/// How a primary version's shadow answers its rows, since the rule took effect (or the
/// shadow version changed).
#[derive(Clone, Debug, Serialize, utoipa::ToSchema)]
pub struct ShadowReport {
    /// The shadow version (`name:version`).
    pub shadow: String,
    /// The share of rows shadowed.
    pub sample_rate: f64,
    /// |a − b| ≤ tolerance × max(1, |a|) counts as within.
    pub tolerance: f64,
    /// Rows both answered.
    pub rows: u64,
    /// Rows with the same bits.
    pub identical: u64,
    /// Rows not identical but within the tolerance on every output.
    pub within_tolerance: u64,
    /// Rows over the tolerance on some output.
    pub different: u64,
    /// Rows not shadowed because the runner was behind (no room queued).
    pub dropped: u64,
    /// Rows not run: the shadow version is not loaded, or reads or answers another shape.
    pub unavailable: u64,
    /// Rows whose shadow batch failed.
    pub failed: u64,
    /// Per output column.
    pub outputs: Vec<ShadowOutput>,
    /// The rows that differ most, largest first.
    pub worst: Vec<ShadowRow>,
}

impl Shadows {
    /// The shadows of `models`' versions, journaling shadow answers into `journal`; its
    /// runner starts on the process's CPUs but `poller_cores` and their SMT siblings, with no
    /// rule until [`Shadows::set_rules`].
    ///
    /// # Errors
    /// The runner thread cannot start.
    pub fn start(
        models: Arc<Models>,
        journal: Option<Arc<Journal>>,
        poller_cores: &[usize],
    ) -> std::io::Result<Arc<Self>> {
        let shadows = Arc::new(Self {
            pipe: Arc::new(Pipe::new(QUEUED_CHUNKS + FILLING_CHUNKS)),
            models,
            journal,
            rules: RwLock::default(),
            generation: AtomicU64::new(0),
            counters: CountersByKey::default(),
            evaluations: Mutex::default(),
            stopping: AtomicBool::new(false),
            runner: Mutex::new(None),
        });
        let (s, place) = (
            shadows.clone(),
            crate::dataplane::poller::off_poller_cores(poller_cores.to_vec()),
        );
        let handle = std::thread::Builder::new()
            .name("tie-shadow".into())
            .spawn(move || {
                place();
                lowest_priority();
                s.run();
            })?;
        *shadows.runner.locked() = Some(handle);
        Ok(shadows)
    }

    /// Puts `rules` in effect (the lanes pick them up within a monitor flush).
    pub fn set_rules(&self, rules: BTreeMap<String, ShadowRule>) {
        if **self.rules.read_locked() == rules {
            return;
        }
        if !rules.is_empty() {
            tracing::info!(
                shadows = ?rules.iter().map(|(p, r)| format!("{p} -> {}", r.shadow)).collect::<Vec<_>>(),
                "shadow rules in effect"
            );
        }
        *self.rules.write_locked() = Arc::new(rules);
        self.generation.fetch_add(1, Ordering::Release);
    }

    /// Bumped by every change of the rules.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// The tap a poller's lane of `slot` in `set` records rows into for its shadow, when a
    /// rule names that version.
    pub(crate) fn tap(&self, set: &ModelSet, slot: usize) -> Option<LaneJournal> {
        let rules = self.rules.read_locked().clone();
        let (_, rule) = rule_of(&rules, set, slot)?;
        let model = set.get(slot)?;
        Some(LaneJournal::new(
            self.pipe.clone(),
            self.counters.of(&model.key()),
            rule.sample_rate,
            true,
            model,
        ))
    }

    /// The figures of primary `key` (`name:version`), when a rule shadows it.
    pub fn report(&self, key: &str) -> Option<ShadowReport> {
        let set = self.models.snapshot();
        let slot = set.by_key(key)?;
        let rules = self.rules.read_locked().clone();
        let (_, rule) = rule_of(&rules, &set, slot)?;
        let dropped = self
            .counters
            .get(key)
            .map_or(0, |c| c.dropped.load(Ordering::Relaxed));
        let evaluations = self.evaluations.locked();
        let fresh;
        let e = match evaluations.get(key) {
            Some(e) => e,
            None => {
                fresh = Evaluation::new(rule, 0);
                &fresh
            }
        };
        Some(report_of(e, rule, dropped))
    }

    /// Every shadowed primary's figures, by primary key.
    pub fn reports(&self) -> Vec<(String, ShadowReport)> {
        let set = self.models.snapshot();
        set.loaded()
            .into_iter()
            .filter_map(|(_, m)| Some((m.key(), self.report(&m.key())?)))
            .collect()
    }

    /// Runs what is queued and stops the runner; its journal rows are handed over. Call once
    /// the pollers have stopped, before the journal finishes.
    pub fn finish(&self) {
        self.stopping.store(true, Ordering::SeqCst);
        if let Some(h) = self.runner.locked().take() {
            if h.join().is_err() {
                tracing::error!("the shadow runner panicked");
            }
        }
    }

    /// The runner's loop.
    fn run(&self) {
        let mut runner = Runner::default();
        loop {
            let stopping = self.stopping.load(Ordering::SeqCst);
            let mut ran = false;
            while let Some(chunk) = self.pipe.take_filled() {
                self.evaluate(&chunk, &mut runner);
                self.pipe.give_back(chunk);
                ran = true;
            }
            let now = tie_client::monotonic_ns();
            for j in runner.journals.values_mut() {
                j.flush(now, CHUNK_AGE_NS);
            }
            if stopping {
                break;
            }
            if !ran {
                let idle = if self.rules.read_locked().is_empty() {
                    IDLE_SLEEP_NO_RULES
                } else {
                    IDLE_SLEEP
                };
                std::thread::sleep(idle);
            }
        }
        // Dropping the runner hands its journal rows over.
    }

    /// Runs one chunk of a primary's rows through its shadow and compares. The figures' lock
    /// is held only to count and compare, never while the shadow runs (readers of the figures
    /// would wait on a slow shadow).
    fn evaluate(&self, chunk: &super::Chunk, runner: &mut Runner) {
        let set = self.models.snapshot();
        let primary_key = format!("{}:{}", chunk.model, chunk.version);
        // The primary gone, or no longer shadowed: its last rows are not run (not counted:
        // nothing reports on a rule that is gone).
        let Some(slot) = set.resolve(&chunk.model, Some(chunk.version)) else {
            return;
        };
        let rules = self.rules.read_locked().clone();
        let Some((_, rule)) = rule_of(&rules, &set, slot) else {
            return;
        };
        let primary = set.get(slot).expect("resolved").clone();
        let shadow = target(&set, &rule.shadow);
        let rows = chunk.len();
        let (iw, ow) = (chunk.input_width, chunk.output_width);
        let dropped_now = self
            .counters
            .of(&primary_key)
            .dropped
            .load(Ordering::Relaxed);
        {
            let mut evaluations = self.evaluations.locked();
            let e = evaluations
                .entry(primary_key.clone())
                .or_insert_with(|| Evaluation::new(rule, dropped_now));
            // A new rule or a new shadow version starts the comparison again.
            let shadow_key = shadow.as_ref().map(|s| s.key());
            if e.rule != *rule || shadow_key.as_ref().is_some_and(|k| *k != e.shadow) {
                *e = Evaluation::new(rule, dropped_now);
                if let Some(k) = shadow_key {
                    e.shadow = k;
                }
            }
            let why = match &shadow {
                None => Some("the shadow version is not loaded".to_string()),
                Some(s) if s.input_width() != iw || s.output_width() != ow => Some(format!(
                    "{} reads {} features and answers {} values; {primary_key} {iw} and {ow}",
                    s.key(),
                    s.input_width(),
                    s.output_width(),
                )),
                Some(_) => None,
            };
            if let Some(why) = why {
                e.unavailable += rows as u64;
                e.warn(&primary_key, &why);
                return;
            }
        }
        let shadow = shadow.expect("checked");
        // Run every row, batch by batch, with no lock held.
        let largest = shadow.batch.largest_batch().max(1);
        runner.output.resize(rows * ow, 0.0);
        runner.answered_ns.clear();
        let mut failures: Vec<(usize, usize, String)> = Vec::new();
        let mut engine = "";
        let mut start = 0;
        while start < rows {
            let n = (rows - start).min(largest);
            let backend = shadow
                .backend
                .faster_engine_for(n)
                .unwrap_or(shadow.backend.as_ref());
            engine = backend.info().engine;
            let input = &chunk.features[start * iw..(start + n) * iw];
            let output = &mut runner.output[start * ow..(start + n) * ow];
            let done = backend.run_batch(input, n, output);
            let now = tie_client::monotonic_ns();
            match done {
                Ok(()) => runner.answered_ns.extend(std::iter::repeat_n(now, n)),
                Err(err) => {
                    runner.answered_ns.extend(std::iter::repeat_n(0, n));
                    failures.push((start, n, err.to_string()));
                }
            }
            start += n;
        }
        let ran = |row: usize| runner.answered_ns[row] != 0;
        // The shadow's answers journaled beside the primary's, when it keeps a journal.
        if let Some(j) = self.journal.as_ref().filter(|_| primary.config.journal) {
            let features = primary.config.journal_features();
            let tap = runner
                .journals
                .entry((shadow.key(), iw, ow, features))
                .or_insert_with(|| {
                    LaneJournal::new(
                        j.pipe.clone(),
                        j.counters(&shadow.key()),
                        1.0,
                        features,
                        &shadow,
                    )
                });
            let sessions: Vec<SessionInfo> = chunk
                .sessions
                .iter()
                .map(|s| SessionInfo {
                    source: "shadow",
                    ..s.clone()
                })
                .collect();
            for row in (0..rows).filter(|&r| ran(r)) {
                let outputs = &runner.output[row * ow..(row + 1) * ow];
                tap.record(super::Row {
                    session: &sessions[chunk.session[row] as usize],
                    engine,
                    request_id: chunk.request_id[row],
                    priority: chunk.priority[row],
                    status: 0,
                    sent_ns: chunk.sent_ns[row],
                    read_ns: chunk.read_ns[row],
                    answered_ns: runner.answered_ns[row],
                    features: Some(&chunk.features[row * iw..(row + 1) * iw]),
                    outputs: Some((
                        outputs,
                        crate::dataplane::poller::row_confidence(
                            outputs,
                            shadow.config.uncertainty_output,
                        ),
                    )),
                });
            }
        }
        let mut evaluations = self.evaluations.locked();
        let Some(e) = evaluations.get_mut(&primary_key) else {
            return;
        };
        for (_, n, err) in &failures {
            e.failed += *n as u64;
            e.warn(&primary_key, &format!("its batch failed: {err}"));
        }
        for row in (0..rows).filter(|&r| ran(r)) {
            let recorded = &chunk.outputs[row * ow..(row + 1) * ow];
            let replayed = &runner.output[row * ow..(row + 1) * ow];
            e.divergence.add(recorded, replayed, || {
                (
                    chunk.request_id[row],
                    chunk.sessions[chunk.session[row] as usize].id,
                    super::chunk::rfc3339(chunk.wall_ns(chunk.answered_ns[row])),
                )
            });
        }
    }
}

impl Drop for Shadows {
    fn drop(&mut self) {
        self.stopping.store(true, Ordering::SeqCst);
    }
}

/// The runner's reused buffers and its journal taps (per shadow version, shape and whether
/// features are kept).
#[derive(Default)]
struct Runner {
    /// A chunk's shadow answers.
    output: Vec<f32>,
    /// Per row of the chunk: when its shadow batch was done (0: it failed).
    answered_ns: Vec<u64>,
    journals: HashMap<(String, usize, usize, bool), LaneJournal>,
}

/// The rule that shadows the version in `slot`: one naming its version (number or label)
/// first, else one naming its model when it is the model's default.
fn rule_of<'r>(
    rules: &'r BTreeMap<String, ShadowRule>,
    set: &ModelSet,
    slot: usize,
) -> Option<(&'r String, &'r ShadowRule)> {
    rules
        .iter()
        .find(|(k, _)| k.contains(':') && set.by_key(k) == Some(slot))
        .or_else(|| {
            rules
                .iter()
                .find(|(k, _)| !k.contains(':') && set.resolve(k, None) == Some(slot))
        })
}

/// The version `spec` names (`name:version` or `name` for its default), when loaded.
fn target(set: &ModelSet, spec: &str) -> Option<Arc<LoadedModel>> {
    let slot = if spec.contains(':') {
        set.by_key(spec)?
    } else {
        set.resolve(spec, None)?
    };
    set.get(slot).cloned()
}

fn report_of(e: &Evaluation, rule: &ShadowRule, dropped: u64) -> ShadowReport {
    let d = &e.divergence;
    let share = |n: u64| {
        if d.rows == 0 {
            0.0
        } else {
            n as f64 / d.rows as f64
        }
    };
    ShadowReport {
        shadow: e.shadow.clone(),
        sample_rate: rule.sample_rate,
        tolerance: rule.tolerance,
        rows: d.rows,
        identical: d.identical,
        within_tolerance: d.within_tolerance,
        different: d.different,
        dropped: dropped.saturating_sub(e.dropped_base),
        unavailable: e.unavailable,
        failed: e.failed,
        outputs: d
            .outputs
            .iter()
            .map(|o| ShadowOutput {
                max_abs_diff: o.max_abs_diff,
                mean_abs_diff: o.mean_abs_diff,
                over_tolerance_share: share(o.over_tolerance),
                sign_agreement: share(o.same_sign),
            })
            .collect(),
        worst: d
            .worst
            .iter()
            .map(|w| ShadowRow {
                request_id: w.request_id,
                session_id: w.session_id,
                time: w.time.clone(),
                max_abs_diff: w.max_abs_diff,
                primary: w.recorded.clone(),
                shadow: w.replayed.clone(),
            })
            .collect(),
    }
}

/// The calling thread at the lowest priority (nice 19): it runs when nothing else wants the
/// CPU.
fn lowest_priority() {
    let tid = rustix::thread::gettid();
    if let Err(e) = rustix::process::setpriority_process(Some(tid), 19) {
        tracing::warn!(error = %e, "the shadow runner keeps its priority");
    }
}
