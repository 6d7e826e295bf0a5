//! [`BatchConfig`]: the batching policy of one model, resolved from `[batch_processing]` and
//! the model's own config.
#![forbid(unsafe_code)]

use crate::config::BatchProcessingSection;
use crate::models::ModelConfig;

/// Number of priorities (Low, Normal, High, Critical).
pub const PRIORITIES: usize = 4;
/// The Critical priority.
pub const CRITICAL: u8 = 3;

/// A batching setting out of range (the model's config or `[batch_processing]`).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum BatchConfigError {
    /// `max_batch_size` outside 1..=65536.
    #[error("max_batch_size = {0}: must be in 1..=65536")]
    MaxBatchSize(u32),
    /// A batch timeout over 60 s.
    #[error("batch timeout {timeout_us} us: must be at most 60 s")]
    Timeout {
        /// The timeout asked for.
        timeout_us: u64,
    },
    /// An allowed batch size outside 1..=`max_batch_size`.
    #[error("allowed_batch_sizes holds {size}: every size must be in 1..={max_batch_size}")]
    AllowedSize {
        /// The size.
        size: u32,
        /// The largest batch.
        max_batch_size: usize,
    },
    /// `max_queue_size` outside 1..=1048576.
    #[error("max_queue_size = {0}: must be in 1..=1048576")]
    MaxQueueSize(u32),
}

/// How one model's requests are batched. Times in nanoseconds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BatchConfig {
    /// Most requests in one batch.
    pub max_batch_size: usize,
    /// Longest the oldest request waits for its batch to fill; 0: never wait.
    pub batch_timeout_ns: u64,
    /// Requests worth a batch under the spec's sizing heuristic.
    pub min_batch_size: usize,
    /// Size batches by the model's profile (its optimal batch size) once it has one.
    pub enable_dynamic_batching: bool,
    /// Serve higher priorities first (with aging); off: oldest first.
    pub priority_based_batching: bool,
    /// Batch sizes the backend runs (sorted); a batch is padded up to the next one. Empty: any.
    pub allowed_batch_sizes: Vec<usize>,
    /// Most requests queued per priority (Low, Normal, High, Critical); more get `QueueFull`.
    pub max_queue_size: [usize; PRIORITIES],
    /// A waiting request gains one priority level per this many nanoseconds (starvation bound).
    pub aging_ns: u64,
}

impl Default for BatchConfig {
    fn default() -> Self {
        Self::resolve(&BatchProcessingSection::default(), &ModelConfig::default())
            .expect("the defaults are in range")
    }
}

impl BatchConfig {
    /// The model's policy: its overrides over the service's defaults.
    ///
    /// # Errors
    /// [`BatchConfigError`] naming the key when a value is out of range: `max_batch_size` in
    /// 1..=65536, `max_queue_size` in 1..=1048576, every allowed batch size in
    /// 1..=`max_batch_size`, the batch timeout at most 60 s.
    pub fn resolve(
        defaults: &BatchProcessingSection,
        model: &ModelConfig,
    ) -> Result<Self, BatchConfigError> {
        let max_batch_size = model.max_batch_size.unwrap_or(defaults.max_batch_size);
        if !(1..=65_536).contains(&max_batch_size) {
            return Err(BatchConfigError::MaxBatchSize(max_batch_size));
        }
        let max_batch_size = max_batch_size as usize;
        let timeout_us = model
            .batch_timeout_us
            .or(defaults.batch_timeout_us)
            .or(defaults.batch_timeout_ms.map(|ms| ms.saturating_mul(1000)))
            .unwrap_or(DEFAULT_BATCH_TIMEOUT_US);
        if timeout_us > 60_000_000 {
            return Err(BatchConfigError::Timeout { timeout_us });
        }
        let mut allowed: Vec<usize> = Vec::new();
        for size in model
            .allowed_batch_sizes
            .clone()
            .unwrap_or_else(|| defaults.allowed_batch_sizes.clone())
        {
            if size == 0 || size as usize > max_batch_size {
                return Err(BatchConfigError::AllowedSize {
                    size,
                    max_batch_size,
                });
            }
            allowed.push(size as usize);
        }
        allowed.sort_unstable();
        allowed.dedup();
        let per_priority = model.max_queue_size.unwrap_or(defaults.max_queue_size);
        if !(1..=1 << 20).contains(&per_priority) {
            return Err(BatchConfigError::MaxQueueSize(per_priority));
        }
        Ok(Self {
            max_batch_size,
            batch_timeout_ns: timeout_us * 1000,
            min_batch_size: (defaults.min_batch_size.max(1) as usize).min(max_batch_size),
            enable_dynamic_batching: defaults.enable_dynamic_batching,
            priority_based_batching: defaults.priority_based_batching,
            allowed_batch_sizes: allowed,
            max_queue_size: [per_priority as usize; PRIORITIES],
            aging_ns: defaults.aging_us.clamp(1, 3_600_000_000) * 1000,
        })
    }

    /// The batch sizes a backend is given, ascending: the allowed sizes, or powers of two up to
    /// the largest batch and the largest batch itself.
    pub fn run_sizes(&self) -> Vec<usize> {
        let largest = self.largest_batch();
        // With allowed sizes, only those ever run (batches are padded up to them).
        let mut sizes: Vec<usize> = if self.allowed_batch_sizes.is_empty() {
            std::iter::successors(Some(1usize), |s| Some(s * 2))
                .take_while(|&s| s <= largest)
                .chain([largest])
                .collect()
        } else {
            self.allowed_batch_sizes.clone()
        };
        sizes.sort_unstable();
        sizes.dedup();
        sizes
    }

    /// The largest batch this policy forms: `max_batch_size`, or the largest allowed size.
    pub fn largest_batch(&self) -> usize {
        self.allowed_batch_sizes
            .last()
            .copied()
            .unwrap_or(self.max_batch_size)
            .min(self.max_batch_size)
    }

    /// Rows the backend runs for a batch of `rows` requests: the next allowed size up.
    pub fn padded_rows(&self, rows: usize) -> usize {
        self.allowed_batch_sizes
            .iter()
            .copied()
            .find(|&s| s >= rows)
            .unwrap_or(rows)
    }
}

/// Batch timeout when the config names none, in microseconds: 0, greedy batching (whatever
/// is queued runs as soon as the poller gets to it, so a lone request never waits and batches
/// grow with the load).
pub const DEFAULT_BATCH_TIMEOUT_US: u64 = 0;
