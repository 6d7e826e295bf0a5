//! Batching: per-model queues of waiting requests and the policy that turns them into batches.
//!
//! [`BatchQueue`] holds one model's waiting requests and applies the rules documented in
//! [`queue`], under the model's policy ([`crate::models::BatchConfig`]). It is a plain struct,
//! with the time passed in; the poller drives it.

pub mod queue;

pub use queue::{ArenaRow, BatchQueue, BatchStats, Decision, Outcome, QueueFull, Request, Taken};
