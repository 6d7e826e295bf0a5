//! [`ModelProfile`]: a model's batch timings, measured at load (the spec's
//! `profile_model_performance`), and the optimal batch size the batcher uses.
#![forbid(unsafe_code)]

use std::time::Instant;

use crate::{Backend, BackendError};

/// A batch size's timed runs stop early once they have taken this long together...
pub const SIZE_BUDGET: std::time::Duration = std::time::Duration::from_millis(250);
/// ...and there are at least this many (so a large model profiles in seconds, not minutes).
pub const MIN_RUNS: u32 = 3;

/// Timings of one batch size.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BatchTiming {
    /// Rows.
    pub batch_size: usize,
    /// Median compute time.
    pub p50_ns: u64,
    /// 95th percentile.
    pub p95_ns: u64,
    /// 99th percentile.
    pub p99_ns: u64,
}

impl BatchTiming {
    /// Rows per second at the median.
    pub fn throughput(&self) -> f64 {
        self.batch_size as f64 * 1e9 / self.p50_ns.max(1) as f64
    }
}

/// A model's measured batch timings.
#[derive(Clone, Debug, PartialEq)]
pub struct ModelProfile {
    /// One entry per profiled size, ascending.
    pub timings: Vec<BatchTiming>,
    /// The smallest batch size whose throughput is within 5% of the best one: larger batches
    /// add latency for (almost) nothing.
    pub optimal_batch_size: usize,
}

impl ModelProfile {
    /// Runs each batch size in `sizes` (ascending: the sizes the batcher will run, the allowed
    /// sizes or powers of two up to the largest batch) `iterations` times on fixed non-zero
    /// inputs, after one run not timed, and keeps the percentiles. A size stops early, after
    /// [`MIN_RUNS`] runs or more, once its runs have taken [`SIZE_BUDGET`]; a first run that
    /// alone takes the budget is kept as a sample.
    ///
    /// # Errors
    /// The backend's error, if a run fails.
    pub fn measure(
        backend: &dyn Backend,
        sizes: &[usize],
        iterations: u32,
    ) -> Result<Self, BackendError> {
        Self::measure_with_progress(backend, sizes, iterations, &mut |_, _| {})
    }

    /// [`measure`](Self::measure), calling `progress(done, of)` before each batch size.
    ///
    /// # Errors
    /// The backend's error, if a run fails.
    pub fn measure_with_progress(
        backend: &dyn Backend,
        sizes: &[usize],
        iterations: u32,
        progress: &mut dyn FnMut(usize, usize),
    ) -> Result<Self, BackendError> {
        let largest = sizes.iter().copied().max().unwrap_or(0);
        let io = &backend.info().io;
        // Not zeros: they can run faster than real data.
        let input: Vec<f32> = (0..largest * io.input_width)
            .map(|i| ((i * 7919 % 1000) as f32 - 500.0) / 500.0)
            .collect();
        let mut output = vec![0.0f32; largest * io.output_width];
        let mut timings = Vec::with_capacity(sizes.len());
        let mut samples = Vec::with_capacity(iterations as usize);
        for (done, &rows) in sizes.iter().enumerate() {
            progress(done, sizes.len());
            let (input, output) = (
                &input[..rows * io.input_width],
                &mut output[..rows * io.output_width],
            );
            samples.clear();
            let mut spent = 0;
            // One run not timed (caches, first touches), unless it alone takes the size's
            // budget: a model that large gains nothing from it, and its run is a sample.
            let t = Instant::now();
            backend.run_batch(input, rows, output)?;
            let first = t.elapsed().as_nanos() as u64;
            if first >= SIZE_BUDGET.as_nanos() as u64 {
                samples.push(first);
                spent = first;
            }
            while samples.len() < iterations.max(1) as usize {
                if samples.len() >= MIN_RUNS as usize && spent >= SIZE_BUDGET.as_nanos() as u64 {
                    break;
                }
                let t = Instant::now();
                backend.run_batch(input, rows, output)?;
                let ns = t.elapsed().as_nanos() as u64;
                samples.push(ns);
                spent += ns;
            }
            samples.sort_unstable();
            let at = |q: f64| samples[((samples.len() - 1) as f64 * q).round() as usize];
            timings.push(BatchTiming {
                batch_size: rows,
                p50_ns: at(0.5),
                p95_ns: at(0.95),
                p99_ns: at(0.99),
            });
        }
        let best = timings
            .iter()
            .map(BatchTiming::throughput)
            .fold(0.0, f64::max);
        let optimal_batch_size = timings
            .iter()
            .find(|t| t.throughput() >= 0.95 * best)
            .map_or(1, |t| t.batch_size);
        Ok(Self {
            timings,
            optimal_batch_size,
        })
    }

    /// Estimated compute time of a batch of `rows` (p99 of the smallest profiled size that
    /// holds it, or of the largest).
    pub fn compute_ns(&self, rows: usize) -> u64 {
        self.timings
            .iter()
            .find(|t| t.batch_size >= rows)
            .or(self.timings.last())
            .map_or(0, |t| t.p99_ns)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU32, Ordering};

    use super::*;
    use crate::BackendInfo;

    /// Takes `ns` per run and counts the runs.
    struct Slow {
        info: BackendInfo,
        ns: u64,
        runs: AtomicU32,
    }

    impl Backend for Slow {
        fn info(&self) -> &BackendInfo {
            &self.info
        }

        fn run_batch(&self, _: &[f32], _: usize, _: &mut [f32]) -> Result<(), BackendError> {
            self.runs.fetch_add(1, Ordering::Relaxed);
            std::thread::sleep(std::time::Duration::from_nanos(self.ns));
            Ok(())
        }
    }

    fn slow(ns: u64) -> Slow {
        Slow {
            info: BackendInfo::cpu(crate::fixtures::io(1, 1), "test", "test"),
            ns,
            runs: AtomicU32::new(0),
        }
    }

    #[test]
    fn a_slow_size_stops_after_its_budget_and_a_fast_one_runs_every_iteration() {
        let b = slow(100_000_000);
        let p = ModelProfile::measure(&b, &[1, 2], 20).unwrap();
        // One run not timed, then 3: 300 ms is past the budget.
        assert_eq!(b.runs.load(Ordering::Relaxed), 2 * (1 + MIN_RUNS));
        assert_eq!(p.timings.len(), 2);
        // A first run that alone takes the budget is a sample.
        let b = slow(300_000_000);
        ModelProfile::measure(&b, &[1], 20).unwrap();
        assert_eq!(b.runs.load(Ordering::Relaxed), MIN_RUNS);
        let b = slow(1_000);
        ModelProfile::measure(&b, &[1], 20).unwrap();
        assert_eq!(b.runs.load(Ordering::Relaxed), 1 + 20);
    }
}
