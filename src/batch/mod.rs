//! Batching: per-model queues of waiting requests and the policy that turns them into batches.
//!
//! [`BatchConfig`] is one model's policy (from `[batch_processing]` and the model's config);
//! [`BatchQueue`] holds the model's waiting requests and applies the rules documented in
//! [`queue`]. Both are plain structs, with the time passed in; the poller drives them.

pub mod config;
pub mod queue;

pub use config::{BatchConfig, CRITICAL, PRIORITIES};
pub use queue::{BatchQueue, BatchStats, Decision, Outcome, QueueFull, Request, Taken};
