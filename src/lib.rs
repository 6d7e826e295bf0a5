//! tie: a low-latency inference server for trading processes on the same host.
//!
//! A request crosses the planes in this order:
//! - [`dataplane`]: the listener opens sessions (sealed shared-memory rings) for clients
//!   (`tie-client`); pollers read their frames, validate them, batch them per model
//!   ([`dataplane::batch`]) and run each batch on the model's backend (`tie_engine`), then
//!   write the predictions back.
//! - [`models`]: what is served: the repository, the loaded versions ([`models::ModelSet`]),
//!   the manager that changes them while serving, health checks and routing.
//! - [`monitor`]: per-model latency histograms and counters, alerts, Prometheus text and
//!   interval logs.
//! - [`journal`]: answered requests of the models that ask for it, handed off the hot path to
//!   a writer of Parquet files; read back and replayed by `tie journal` and `tie replay`; and
//!   shadow models, whose answers to a primary's rows are compared off the hot path.
//! - [`http`]: the control plane: the JSON API (predictions through the same rings, model
//!   management, health, metrics) and its OpenAPI document.
//! - the `tie` binary's commands (`src/cli/`) wire these together; [`config`] the service's TOML file; [`host`] what the host's
//!   CPUs are; [`logging`] the log format; [`memory`] the allocator's settings.
//!
//! The engines are the `tie-engine` crate, the interval-log codec `tie-hlog`, the load
//! generator and its charts `tie-loadgen`; the shared-memory ABI is `tie-layouts`.
#![deny(unsafe_op_in_unsafe_fn)]
#![warn(missing_docs)]

pub mod config;
pub mod dataplane;
pub mod host;
pub mod http;
pub mod journal;
pub mod logging;
pub mod memory;
pub mod models;
pub mod monitor;
mod sync;
