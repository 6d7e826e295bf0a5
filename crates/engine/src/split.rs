//! [`SplitBackend`]: one model on two engines, each batch on the one measured faster for its
//! size (`backend = "auto"` on a GPU host: small batches on the CPU, larger ones on the GPU),
//! and [`Crossover`], the rule that picks the split from both engines' timings per size.
#![forbid(unsafe_code)]

use std::sync::Arc;

use crate::{Backend, BackendError, BackendHealth, BackendInfo, Pipeline};

/// Where a model's batches run, from both engines' timings per batch size.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Crossover {
    /// The large-batch engine (the GPU) is as fast or faster already at the smallest size.
    LargeOnly,
    /// The small-batch engine (the CPU) is faster at every size measured.
    SmallOnly,
    /// Batches of up to this many rows run on the small-batch engine, larger ones on the other.
    UpTo(usize),
}

impl Crossover {
    /// The split from both engines' timings, `(batch size, small engine's median, large
    /// engine's median)` in ascending sizes, out of `largest`, the largest size the batcher
    /// runs: the small-batch engine keeps every size up to the first where its median is not
    /// below the other's. Sizes past that point stay on the large-batch engine even where the
    /// small one would be faster again (a batch's engine changes only once as batches grow),
    /// so they need not be timed (see [`Crossover::decided`]).
    pub fn from_timings(timings: &[(usize, u64, u64)], largest: usize) -> Self {
        let up_to = timings
            .iter()
            .take_while(|(_, small, large)| small < large)
            .last()
            .map_or(0, |t| t.0);
        match up_to {
            0 => Self::LargeOnly,
            n if n >= largest => Self::SmallOnly,
            n => Self::UpTo(n),
        }
    }

    /// Whether timings so far decide the split: the last size timed is one the small-batch
    /// engine does not win.
    pub fn decided(timings: &[(usize, u64, u64)]) -> bool {
        timings
            .last()
            .is_some_and(|(_, small, large)| small >= large)
    }
}

/// One batch size timed on both engines in up to `rounds` rounds, `gap` apart: each round times
/// the small-batch engine, then the large-batch one (`small()` and `large()` each give a median
/// in ns), and each engine keeps its lowest median. Other work on the host during one round
/// (another model loading, a burst of interrupts) then slows that round only, instead of moving
/// the model's batches to the slower engine for as long as it is loaded. The rounds stop once
/// they have taken `budget` per round together (gaps not counted): a model whose one round takes
/// that long is timed once, and a large model's load is not tripled, while a round that a burst
/// made slow still leaves time for the others.
///
/// Returns `(small, large)`, the lowest medians.
///
/// # Errors
/// The first error of either closure.
pub fn time_in_rounds<E>(
    rounds: u32,
    gap: std::time::Duration,
    budget: std::time::Duration,
    mut small: impl FnMut() -> Result<u64, E>,
    mut large: impl FnMut() -> Result<u64, E>,
) -> Result<(u64, u64), E> {
    let rounds = rounds.max(1);
    let total = budget.saturating_mul(rounds);
    let (mut on_small, mut on_large) = (u64::MAX, u64::MAX);
    let mut spent = std::time::Duration::ZERO;
    for round in 0..rounds {
        if round > 0 {
            std::thread::sleep(gap);
        }
        let started = std::time::Instant::now();
        on_small = on_small.min(small()?);
        on_large = on_large.min(large()?);
        spent += started.elapsed();
        if spent >= total {
            break;
        }
    }
    Ok((on_small, on_large))
}

/// A model loaded on two engines: batches of up to `up_to` rows run on `small`, larger ones on
/// `large`. What it reports ([`Backend::info`]), its pipeline and [`Backend::run_gathered`]
/// are the large-batch engine's; [`Backend::run_batch`] picks by the batch's rows, and a
/// caller that knows a batch's size before gathering it asks
/// [`Backend::faster_engine_for`] (the poller does).
pub struct SplitBackend {
    small: Arc<dyn Backend>,
    large: Arc<dyn Backend>,
    up_to: usize,
}

impl SplitBackend {
    /// Batches of up to `up_to` rows on `small`, larger ones on `large`.
    ///
    /// # Panics
    /// When the engines' I/O differ.
    pub fn new(small: Arc<dyn Backend>, large: Arc<dyn Backend>, up_to: usize) -> Self {
        assert_eq!(
            small.info().io,
            large.info().io,
            "one model on both engines"
        );
        Self {
            small,
            large,
            up_to,
        }
    }

    /// The engine of small batches.
    pub fn small(&self) -> &dyn Backend {
        self.small.as_ref()
    }

    /// The largest batch run on the small-batch engine.
    pub fn up_to(&self) -> usize {
        self.up_to
    }
}

impl Backend for SplitBackend {
    fn info(&self) -> &BackendInfo {
        self.large.info()
    }

    fn run_batch(
        &self,
        input: &[f32],
        rows: usize,
        output: &mut [f32],
    ) -> Result<(), BackendError> {
        match self.faster_engine_for(rows) {
            Some(small) => small.run_batch(input, rows, output),
            None => self.large.run_batch(input, rows, output),
        }
    }

    fn run_gathered(
        &self,
        gather: &mut dyn FnMut(&mut [f32]) -> usize,
        scratch: &mut [f32],
        output: &mut [f32],
    ) -> Result<usize, BackendError> {
        self.large.run_gathered(gather, scratch, output)
    }

    fn health(&self) -> BackendHealth {
        match self.large.health() {
            BackendHealth::Healthy => self.small.health(),
            unhealthy => unhealthy,
        }
    }

    fn pipeline(&self, depth: usize) -> Option<Box<dyn Pipeline>> {
        self.large.pipeline(depth)
    }

    fn faster_engine_for(&self, rows: usize) -> Option<&dyn Backend> {
        (rows <= self.up_to).then_some(self.small.as_ref())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_crossover_is_the_first_size_the_small_engine_does_not_win() {
        let timed = [(1, 2_000, 10_000), (2, 3_000, 10_000), (4, 6_000, 10_000)];
        assert!(!Crossover::decided(&timed));
        let lost_at_8 = [&timed[..], &[(8, 12_000, 10_000)]].concat();
        assert!(Crossover::decided(&lost_at_8));
        assert_eq!(Crossover::from_timings(&lost_at_8, 16), Crossover::UpTo(4));
        // Faster again at 16 (noise, or a better kernel): still after the crossover.
        let again = [&lost_at_8[..], &[(16, 9_000, 10_000)]].concat();
        assert_eq!(Crossover::from_timings(&again, 16), Crossover::UpTo(4));
        let tie = [(1, 10_000, 10_000)];
        assert!(Crossover::decided(&tie));
        assert_eq!(
            Crossover::from_timings(&tie, 16),
            Crossover::LargeOnly,
            "a tie goes to the large-batch engine"
        );
        let won_all = [&timed[..], &[(8, 1, 10_000), (16, 1, 10_000)]].concat();
        assert!(!Crossover::decided(&won_all));
        assert_eq!(Crossover::from_timings(&won_all, 16), Crossover::SmallOnly);
    }

    /// Rounds as `auto` placement times them.
    const ROUNDS: u32 = 3;

    #[test]
    fn each_engine_keeps_its_lowest_median_over_the_rounds() {
        use std::time::Duration;
        // The small-batch engine was slowed in the first round only (other work on the host):
        // it keeps the median of a quiet round.
        let mut cpu = [13_200u64, 1_100, 1_050].into_iter();
        let mut gpu = [9_600u64, 9_900, 9_700].into_iter();
        let mut rounds = 0;
        let timed = time_in_rounds(
            ROUNDS,
            Duration::ZERO,
            Duration::from_secs(60),
            || {
                rounds += 1;
                Ok::<_, ()>(cpu.next().unwrap())
            },
            || Ok(gpu.next().unwrap()),
        );
        assert_eq!(timed, Ok((1_050, 9_600)));
        assert_eq!(rounds, ROUNDS);
    }

    #[test]
    fn a_model_whose_round_takes_every_rounds_budget_is_timed_once() {
        use std::time::Duration;
        let mut rounds = 0;
        let timed = time_in_rounds(
            ROUNDS,
            Duration::ZERO,
            Duration::ZERO,
            || {
                rounds += 1;
                Ok::<_, ()>(191_800_000)
            },
            || Ok(288_000),
        );
        assert_eq!(timed, Ok((191_800_000, 288_000)));
        assert_eq!(rounds, 1);
    }

    #[test]
    fn a_round_slowed_past_its_budget_leaves_time_for_the_others() {
        use std::time::Duration;
        // The first round takes 110 ms (a burst), past one round's budget of 100 ms but not
        // past three's.
        let mut rounds = 0;
        time_in_rounds(
            ROUNDS,
            Duration::ZERO,
            Duration::from_millis(100),
            || {
                rounds += 1;
                if rounds == 1 {
                    std::thread::sleep(Duration::from_millis(110));
                }
                Ok::<_, ()>(1_000)
            },
            || Ok(10_000),
        )
        .unwrap();
        assert_eq!(rounds, ROUNDS);
    }

    #[test]
    fn an_error_ends_the_timing() {
        let failed = time_in_rounds(
            ROUNDS,
            std::time::Duration::ZERO,
            std::time::Duration::from_secs(60),
            || Ok(1),
            || Err("the GPU failed"),
        );
        assert_eq!(failed, Err("the GPU failed"));
    }

    /// Answers each row with its engine's mark.
    struct Marked {
        info: BackendInfo,
        mark: f32,
    }

    impl Backend for Marked {
        fn info(&self) -> &BackendInfo {
            &self.info
        }
        fn run_batch(
            &self,
            _input: &[f32],
            rows: usize,
            output: &mut [f32],
        ) -> Result<(), BackendError> {
            output[..rows].fill(self.mark);
            Ok(())
        }
    }

    #[test]
    fn batches_run_on_the_engine_of_their_size() {
        let io = crate::fixtures::io(1, 1);
        let marked = |mark| -> Arc<dyn Backend> {
            Arc::new(Marked {
                info: BackendInfo::cpu(io.clone(), "test", "test"),
                mark,
            })
        };
        let split = SplitBackend::new(marked(1.0), marked(2.0), 4);
        let mut out = [0.0f32; 8];
        for (rows, mark) in [(1, 1.0), (4, 1.0), (5, 2.0), (8, 2.0)] {
            split.run_batch(&[0.0; 8][..rows], rows, &mut out).unwrap();
            assert_eq!(out[rows - 1], mark, "{rows} rows");
            assert_eq!(split.faster_engine_for(rows).is_some(), mark == 1.0);
        }
        // Gathered batches are the large-batch engine's (the poller asks first).
        let mut scratch = [0.0f32; 8];
        split
            .run_gathered(&mut |_| 1, &mut scratch, &mut out)
            .unwrap();
        assert_eq!(out[0], 2.0);
    }
}
