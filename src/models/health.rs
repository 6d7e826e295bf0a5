//! The health monitor: every `health_check_interval_sec` each model runs a canary inference and
//! compares it with the answer it gave at load, and its backend reports its own health. A model
//! that fails is marked not ready: its requests are answered `NotReady` (status 10) and
//! `/health/ready` says so, until a check passes again. Changes are logged.
//!
//! A batch that fails marks its model not ready at once (its own requests are answered
//! `ExecutionFailed`); such a model is checked again every [`RECHECK_INTERVAL`], not only at
//! the next interval, so a passing fault takes it out for about that long. (A failure that
//! only the largest batches meet passes the one-row canary: such a model goes in and out.)
//!
//! [`super::fault`] makes a model's backend fail or corrupt its outputs on demand, for drills
//! and tests.
#![forbid(unsafe_code)]

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::sync::Locked;
use tie_engine::{Backend, BackendError, BackendHealth};

/// A model's readiness, as the pollers and the control plane read it.
#[derive(Debug)]
pub struct ModelHealth {
    ready: AtomicBool,
    /// Why the model is not ready (empty while ready).
    reason: Mutex<String>,
    /// Checks run and failed.
    checks: AtomicU64,
    failures: AtomicU64,
    /// Marked not ready by a failed batch: checked again every `RECHECK_INTERVAL`.
    recheck: AtomicBool,
    /// Failed batches: a check that passes marks the model ready only if none failed while
    /// it ran.
    batch_failures: AtomicU64,
    canary: Canary,
}

/// How often a model that a failed batch marked not ready is checked again.
pub const RECHECK_INTERVAL: Duration = Duration::from_millis(100);

/// Why a health check failed.
#[derive(Debug, thiserror::Error)]
enum CheckFailure {
    /// The backend reports itself unhealthy.
    #[error("backend unhealthy: {0}")]
    Unhealthy(String),
    /// The canary did not run.
    #[error("canary inference failed: {0}")]
    Inference(BackendError),
    /// The canary's answer is not the one at load.
    #[error("canary output {output} is {got}, it was {want} at load")]
    Differs {
        /// The output column.
        output: usize,
        /// Its value now.
        got: f32,
        /// Its value at load.
        want: f32,
    },
}

/// A fixed input and the output the model gave for it when it was loaded.
#[derive(Clone, Debug)]
pub struct Canary {
    /// One row of features.
    pub input: Vec<f32>,
    /// The model's output for it at load.
    pub expected: Vec<f32>,
    /// For a model split by batch size (whose one-row batches run on the CPU), the output of
    /// its other engine, the one its larger batches run on, at load.
    pub expected_large: Option<Vec<f32>>,
}

impl Canary {
    /// Runs the canary input through `backend` and records its answer.
    ///
    /// # Errors
    /// The backend's error.
    pub fn record(backend: &dyn Backend) -> Result<Self, BackendError> {
        let io = &backend.info().io;
        // Fixed, non-zero, varied values in -1..1 (a zero input hides a wrong weight).
        let input: Vec<f32> = (0..io.input_width)
            .map(|i| ((i as f32 * 0.618_034 + 0.1).fract() * 2.0 - 1.0) * 0.9)
            .collect();
        let mut expected = vec![0.0; io.output_width];
        backend.run_batch(&input, 1, &mut expected)?;
        let expected_large = match backend.faster_engine_for(1) {
            Some(_) => Some(run_large(backend, &input)?),
            None => None,
        };
        Ok(Self {
            input,
            expected,
            expected_large,
        })
    }

    /// Runs the canary again (on each engine of a split model); `Err` says how the answer
    /// differs.
    fn check(&self, backend: &dyn Backend) -> Result<(), CheckFailure> {
        let mut output = vec![0.0; self.expected.len()];
        backend
            .run_batch(&self.input, 1, &mut output)
            .map_err(CheckFailure::Inference)?;
        Self::compare(&output, &self.expected)?;
        if let Some(expected) = &self.expected_large {
            let output = run_large(backend, &self.input).map_err(CheckFailure::Inference)?;
            Self::compare(&output, expected)?;
        }
        Ok(())
    }

    fn compare(output: &[f32], expected: &[f32]) -> Result<(), CheckFailure> {
        for (i, (got, want)) in output.iter().zip(expected).enumerate() {
            // The same engine on the same input gives the same answer; the margin covers a
            // GPU engine re-chosen with another summation order.
            let same = if want.is_finite() {
                (got - want).abs() <= 1e-3 * want.abs().max(1.0)
            } else {
                // A model whose canary answer is NaN or infinite must keep giving it.
                got.to_bits() == want.to_bits() || (got.is_nan() && want.is_nan())
            };
            if !same {
                return Err(CheckFailure::Differs {
                    output: i,
                    got: *got,
                    want: *want,
                });
            }
        }
        Ok(())
    }
}

/// The canary row run on the engine of a split model's larger batches (a gathered batch of
/// one row goes there: see [`tie_engine::SplitBackend`]).
fn run_large(backend: &dyn Backend, input: &[f32]) -> Result<Vec<f32>, BackendError> {
    let io = &backend.info().io;
    let mut scratch = vec![0.0; io.input_width];
    let mut output = vec![0.0; io.output_width];
    backend.run_gathered(
        &mut |staging| {
            staging[..input.len()].copy_from_slice(input);
            1
        },
        &mut scratch,
        &mut output,
    )?;
    Ok(output)
}

impl ModelHealth {
    /// A ready model with its canary.
    pub fn new(canary: Canary) -> Self {
        Self {
            ready: AtomicBool::new(true),
            reason: Mutex::new(String::new()),
            checks: AtomicU64::new(0),
            failures: AtomicU64::new(0),
            recheck: AtomicBool::new(false),
            batch_failures: AtomicU64::new(0),
            canary,
        }
    }

    /// Whether the model serves requests.
    #[inline]
    pub fn is_ready(&self) -> bool {
        // Relaxed: a flag read once per session scan; a change is seen on a later scan.
        self.ready.load(Ordering::Relaxed)
    }

    /// Why it is not ready (`None` while ready).
    pub fn reason(&self) -> Option<String> {
        let reason = self.reason.locked();
        (!self.is_ready()).then(|| reason.clone())
    }

    /// Checks run, and how many failed.
    pub fn counts(&self) -> (u64, u64) {
        (
            self.checks.load(Ordering::Relaxed),
            self.failures.load(Ordering::Relaxed),
        )
    }

    /// The canary input and the output recorded at load.
    pub fn canary(&self) -> &Canary {
        &self.canary
    }

    /// Marks the model not ready after a batch of it failed with `error` (logged on a change).
    /// The health monitor checks it again within [`RECHECK_INTERVAL`].
    #[cold]
    pub fn batch_failed(&self, key: &str, error: &dyn std::fmt::Display) {
        let mut reason = self.reason.locked();
        self.batch_failures.fetch_add(1, Ordering::Relaxed);
        if self.ready.load(Ordering::Relaxed) {
            tracing::error!(model = key, %error, "a batch failed: model not ready until a health check passes");
            *reason = format!("a batch failed: {error}");
        }
        self.recheck.store(true, Ordering::Relaxed);
        self.ready.store(false, Ordering::Relaxed);
    }

    /// Whether a failed batch marked the model not ready and no check has passed since.
    fn needs_recheck(&self) -> bool {
        self.recheck.load(Ordering::Relaxed)
    }

    /// Runs one check of `backend` and updates readiness; logs a change. Returns readiness.
    pub fn check(&self, key: &str, backend: &dyn Backend) -> bool {
        self.checks.fetch_add(1, Ordering::Relaxed);
        let failures_before = self.batch_failures.load(Ordering::Relaxed);
        let verdict = match backend.health() {
            BackendHealth::Unhealthy(why) => Err(CheckFailure::Unhealthy(why)),
            BackendHealth::Healthy => self.canary.check(backend),
        }
        .map_err(|e| e.to_string());
        let mut reason = self.reason.locked();
        let was_ready = self.ready.load(Ordering::Relaxed);
        // A batch that failed while the canary ran keeps the model out until the next check.
        if self.batch_failures.load(Ordering::Relaxed) != failures_before {
            return false;
        }
        match verdict {
            Ok(()) => {
                if !was_ready {
                    tracing::info!(model = key, "health check passed: model ready again");
                }
                reason.clear();
                self.recheck.store(false, Ordering::Relaxed);
                self.ready.store(true, Ordering::Relaxed);
                true
            }
            Err(why) => {
                self.failures.fetch_add(1, Ordering::Relaxed);
                if was_ready || *reason != why {
                    tracing::error!(model = key, reason = %why, "health check failed: model not ready");
                }
                *reason = why;
                self.ready.store(false, Ordering::Relaxed);
                false
            }
        }
    }
}

/// Runs the health checks of `models` every `interval` until `stop` is set.
pub fn health_task(models: Arc<crate::models::Models>, interval: Duration, stop: Arc<AtomicBool>) {
    let mut next = std::time::Instant::now() + interval;
    let mut next_recheck = std::time::Instant::now() + RECHECK_INTERVAL;
    while !stop.load(Ordering::Relaxed) {
        // Short sleeps, so a stop is seen quickly.
        std::thread::sleep(Duration::from_millis(20).min(interval));
        let now = std::time::Instant::now();
        if now >= next_recheck {
            next_recheck = now + RECHECK_INTERVAL;
            for (_, m) in models.snapshot().loaded() {
                if m.health.needs_recheck() {
                    m.health.check(&m.key(), m.backend.as_ref());
                }
            }
        }
        if now < next {
            continue;
        }
        next += interval;
        // The models loaded now (a version loaded meanwhile is checked from its first interval).
        for (_, m) in models.snapshot().loaded() {
            m.health.check(&m.key(), m.backend.as_ref());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::models::fault::{FaultMode, Faulty};
    use tie_engine::BackendInfo;

    struct Double(BackendInfo);

    impl Backend for Double {
        fn info(&self) -> &BackendInfo {
            &self.0
        }
        fn run_batch(
            &self,
            input: &[f32],
            rows: usize,
            output: &mut [f32],
        ) -> Result<(), BackendError> {
            for r in 0..rows {
                output[r] = input[r * self.0.io.input_width] * 2.0;
            }
            Ok(())
        }
    }

    fn double() -> Arc<dyn Backend> {
        Arc::new(Double(BackendInfo::cpu(
            tie_engine::ModelIo {
                input_name: "x".into(),
                input_width: 3,
                output_name: "y".into(),
                output_width: 1,
                output_note: None,
            },
            "test",
            "test",
        )))
    }

    /// A backend whose every batch is accompanied by a failure of another batch.
    struct Overlap {
        inner: Arc<dyn Backend>,
        health: Arc<ModelHealth>,
    }

    impl Backend for Overlap {
        fn info(&self) -> &BackendInfo {
            self.inner.info()
        }
        fn run_batch(
            &self,
            input: &[f32],
            rows: usize,
            output: &mut [f32],
        ) -> Result<(), BackendError> {
            self.health.batch_failed("m:1", &"during the check");
            self.inner.run_batch(input, rows, output)
        }
    }

    #[test]
    fn a_failed_batch_keeps_the_model_out_until_a_check_with_no_failure_passes() {
        let inner = double();
        let health = Arc::new(ModelHealth::new(Canary::record(inner.as_ref()).unwrap()));
        health.batch_failed("m:1", &"boom");
        assert!(!health.is_ready() && health.needs_recheck());
        assert_eq!(health.reason().unwrap(), "a batch failed: boom");
        // A batch fails while the check's canary runs: the passing canary does not clear it.
        let overlap = Overlap {
            inner: inner.clone(),
            health: health.clone(),
        };
        assert!(!health.check("m:1", &overlap));
        assert!(!health.is_ready() && health.needs_recheck());
        assert!(health.check("m:1", inner.as_ref()));
        assert!(health.is_ready() && !health.needs_recheck());
    }

    #[test]
    fn a_canary_that_changes_or_fails_makes_the_model_not_ready_until_it_passes() {
        let (backend, switch) = Faulty::wrap(double());
        let health = ModelHealth::new(Canary::record(backend.as_ref()).unwrap());
        assert!(health.check("m:1", backend.as_ref()));
        switch.set(FaultMode::Corrupt);
        assert!(!health.check("m:1", backend.as_ref()));
        assert!(!health.is_ready());
        assert!(
            health.reason().unwrap().contains("canary output 0"),
            "{:?}",
            health.reason()
        );
        switch.set(FaultMode::Fail);
        assert!(!health.check("m:1", backend.as_ref()));
        assert!(health.reason().unwrap().contains("injected fault"));
        switch.set(FaultMode::None);
        assert!(health.check("m:1", backend.as_ref()));
        assert!(health.is_ready() && health.reason().is_none());
        assert_eq!(health.counts(), (4, 2));
    }

    #[test]
    fn a_split_model_s_canary_checks_the_engine_of_its_larger_batches_too() {
        // One-row batches run on the small engine; the large one is faulted alone.
        let (large, switch) = Faulty::wrap(double());
        let split = tie_engine::SplitBackend::new(double(), large, 4);
        let health = ModelHealth::new(Canary::record(&split).unwrap());
        assert!(health.canary().expected_large.is_some());
        assert!(health.check("m:1", &split));
        switch.set(FaultMode::Corrupt);
        assert!(!health.check("m:1", &split));
        switch.set(FaultMode::Fail);
        assert!(!health.check("m:1", &split));
        assert!(health.reason().unwrap().contains("injected fault"));
        switch.set(FaultMode::None);
        assert!(health.check("m:1", &split));
    }
}
