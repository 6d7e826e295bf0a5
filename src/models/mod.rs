//! Model management: what the server serves, and how that changes while it serves.
//!
//! - [`config`]: a model's `config.toml` ([`ModelConfig`]); [`batching`]: its resolved batching
//!   policy ([`BatchConfig`]).
//! - [`repository`]: the Triton-style directory (`<repo>/<name>/<version>/model.onnx`),
//!   planned ([`ModelPlan`]) and loaded into [`LoadedModel`]s (built on a backend, warmed,
//!   canaried and profiled).
//! - [`set`]: [`ModelSet`], one immutable snapshot of the versions served (slots, defaults,
//!   labels), and [`Models`], which holds the current one for the data plane to read.
//! - [`manager`]: [`ModelManager`], which changes the set from the repository (reload, unload,
//!   unloading unused versions and loading them again on demand) and holds the routing.
//! - [`health`]: each version's readiness and the health monitor's canary checks;
//!   [`fault`]: injected faults for drills.
//! - [`remote`]: repositories in object storage and MLflow's Model Registry, fetched through
//!   a local artifact cache into a mirror the manager loads from.
//! - [`routing`]: strategies (weighted splits, hints) and ensembles over versions.

pub mod batching;
pub mod config;
pub mod fault;
pub mod health;
mod loaded;
pub mod manager;
pub mod remote;
pub mod repository;
pub mod routing;
pub mod set;

pub use batching::{BatchConfig, BatchConfigError, CRITICAL, PRIORITIES};
pub use config::{BackendChoice, ModelConfig, VersionPickError, VersionPolicy};
pub use loaded::{LoadedModel, Placement};
pub use manager::{ChangeError, ChangeReport, LoadedVersion, ModelManager, RESTORE_RETRY};
pub use repository::{
    load_repository, load_repository_with, load_version, plan_each, plan_model, plan_repository,
    read_layout, FailedVersion, LoadOptions, ModelPlan, Planned, RepositoryLoadError,
};
pub use set::{compatible, Missing, ModelSet, Models};
