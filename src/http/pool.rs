//! [`Serving`]: the control plane's pooled ring sessions per model, and how a request is routed to a version and run through them.
#![forbid(unsafe_code)]

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tie_client::{Client, ConnectOptions, Priority, Status, SubmitError};

use crate::http::api::{
    InferenceError, InferenceRequest, InferenceResponse, RequestPriority, StrategyContext,
};
use crate::models::routing::{RouteTarget, Routing};
use crate::models::LoadedModel;
use crate::models::{ModelManager, Models};
use crate::monitor::Monitor;
use crate::sync::Locked;

use super::{app::*, ensemble::*, error::*, predict::*};

/// Ring size of those sessions: rows of one request in flight at once.
pub(super) const SESSION_RING: u32 = 256;

/// Longest a request waits for another request's load of its model (unloaded as unused).
pub(super) const RESTORE_WAIT: Duration = Duration::from_secs(60);

/// A pooled session idle this long is closed.
pub const POOL_IDLE: Duration = Duration::from_secs(5);

/// What the control plane serves once the models are loaded.
pub struct Serving {
    pub(super) models: Arc<Models>,
    pub(super) manager: Arc<ModelManager>,
    pub(super) monitor: Arc<Monitor>,
    /// Per model name and pinned version (`None`: sessions that follow the default version):
    /// idle sessions, and [`SESSIONS_PER_MODEL`] permits for sessions in use.
    pub(super) pools: Mutex<HashMap<PoolKey, Pool>>,
    pub(super) endpoint: String,
    pub(super) socket_dir: Option<std::path::PathBuf>,
    /// `server.http_max_rows_per_sec`, taken by each valid request's rows.
    pub(super) row_budget: Option<Arc<RowBudget>>,
}

/// A pool's model name and pinned version.
pub(super) type PoolKey = (String, Option<u32>);

/// Sessions of one model (and version) for HTTP requests.
pub(super) struct Pool {
    /// With when each was given back.
    pub(super) idle: Vec<(Client, Instant)>,
    pub(super) permits: Arc<tokio::sync::Semaphore>,
}

/// A request's target: its model as resolved now, and the pool its rows go through.
#[derive(Clone)]
pub(super) struct Target {
    pub(super) model: Arc<LoadedModel>,
    pub(super) pool: PoolKey,
}

/// The ring priority of an HTTP request: always `Low`, whatever it asks, so the control
/// plane's work never goes ahead of a trading client's (the spec's `priority` field is
/// accepted and otherwise ignored).
pub(super) fn priority(_asked: RequestPriority) -> Priority {
    Priority::Low
}

impl Serving {
    /// Takes a valid request's `rows` from the HTTP row budget, or `QueueFull`.
    pub(super) fn take_rows(&self, rows: usize) -> Result<(), InferenceError> {
        self.row_budget.as_ref().map_or(Ok(()), |b| b.take(rows))
    }

    /// The model a name and optional version (a number or a label) name.
    pub(super) fn resolve(
        &self,
        name: &str,
        version: Option<&str>,
    ) -> Result<Target, InferenceError> {
        let set = self.models.snapshot();
        let not_found = || InferenceError::ModelNotFound {
            model_name: match version {
                Some(v) => format!("{name}:{v}"),
                None => name.to_string(),
            },
            served: set.keys(),
        };
        let pinned = match version {
            None => None,
            // The repository's highest with `load_on_demand` (loaded first when it is not).
            Some(v) if v.trim() == crate::models::set::LATEST => {
                Some(self.models.latest(name).ok_or_else(not_found)?)
            }
            Some(v) => Some(set.version_named(name, v.trim()).ok_or_else(|| {
                if v.trim().chars().all(|c| c.is_ascii_digit()) {
                    not_found()
                } else {
                    InferenceError::ModelNotFound {
                        model_name: format!(
                            "{name}:{v} (neither a version number nor a label of {name})"
                        ),
                        served: set.keys(),
                    }
                }
            })?),
        };
        let slot = set.resolve(name, pinned).ok_or_else(not_found)?;
        Ok(Target {
            model: set.get(slot).expect("resolved").clone(),
            pool: (name.to_string(), pinned),
        })
    }

    /// A model by key `name:version` (or label), or `name` for its default version.
    pub(super) fn by_key(&self, key: &str) -> Result<Target, InferenceError> {
        match key.rsplit_once(':') {
            Some((name, version)) => self.resolve(name, Some(version)),
            None => self.resolve(key, None),
        }
    }

    pub(super) fn permits(&self, key: &PoolKey) -> Arc<tokio::sync::Semaphore> {
        let mut pools = self.pools.locked();
        pools
            .entry(key.clone())
            .or_insert_with(|| Pool {
                idle: Vec::new(),
                permits: Arc::new(tokio::sync::Semaphore::new(SESSIONS_PER_MODEL)),
            })
            .permits
            .clone()
    }

    pub(super) fn take_client(&self, target: &Target) -> Result<Client, InferenceError> {
        // Pooled sessions the server closed meanwhile are dropped.
        loop {
            let pooled = self
                .pools
                .locked()
                .get_mut(&target.pool)
                .and_then(|p| p.idle.pop())
                .map(|(c, _)| c);
            match pooled {
                Some(c) if c.is_connected() => return Ok(c),
                Some(_) => {}
                None => break,
            }
        }
        let (name, version) = &target.pool;
        let options = ConnectOptions {
            version: *version,
            socket_dir: self.socket_dir.clone(),
            request_capacity: SESSION_RING,
            response_capacity: SESSION_RING,
            connect_timeout: Duration::from_secs(1),
            // The pool replaces a closed session itself (a fresh one holds a fresh permit).
            reconnect: None,
            ..ConnectOptions::default()
        };
        Client::connect(&self.endpoint, name, options).map_err(|e| match e {
            // Unloaded since the request was resolved.
            tie_client::ConnectError::Refused {
                status: tie_client::layouts::hello::HelloStatus::ModelNotFound,
                ..
            } => InferenceError::ModelNotFound {
                model_name: target.model.key(),
                served: Vec::new(),
            },
            e => InferenceError::NotReady {
                model_name: target.model.key(),
                reason: format!("cannot open a session: {e}"),
            },
        })
    }

    /// Closes sessions idle for [`POOL_IDLE`]: a model used over HTTP once is not held in use
    /// (see `auto_unload_unused_hours`) by the control plane's own sessions.
    pub(super) fn close_idle_sessions(&self) {
        let mut pools = self.pools.locked();
        for pool in pools.values_mut() {
            pool.idle.retain(|(_, since)| since.elapsed() < POOL_IDLE);
        }
    }

    pub(super) fn give_back(&self, key: &PoolKey, client: Client) {
        let mut pools = self.pools.locked();
        if let Some(pool) = pools.get_mut(key) {
            if client.in_flight() == 0 && pool.idle.len() < SESSIONS_PER_MODEL {
                pool.idle.push((client, Instant::now()));
            }
        }
    }

    /// Runs `rows` rows through model `index`'s rings; returns one response per row, in
    /// order. Blocking.
    pub(super) fn execute(
        &self,
        target: &Target,
        features: &[f32],
        rows: usize,
        priority: Priority,
        deadline_ns: Option<u64>,
        wait_until: Instant,
    ) -> Result<Vec<tie_client::Response>, InferenceError> {
        let mut client = self.take_client(target)?;
        let sent = RowsToSend {
            features,
            rows,
            priority,
            deadline_ns,
        };
        let mut responses = Vec::with_capacity(rows.min(SESSION_RING as usize));
        let mut next = 0;
        let mut idle_polls = 0u32;
        while responses.len() < rows {
            let unanswered = responses.is_empty();
            self.submit_rows(&mut client, target, &sent, &mut next, unanswered)?;
            match client.poll() {
                Some(r) => {
                    if r.status == Status::DISCONNECTED {
                        // Not pooled again: the session is gone.
                        return Ok(finish_without(responses, r, rows));
                    }
                    responses.push(r);
                    idle_polls = 0;
                }
                None => {
                    idle_polls += 1;
                    if idle_polls.is_multiple_of(64) && Instant::now() >= wait_until {
                        // Answers still due would reach the next user of the session: it
                        // closes with this client.
                        return Err(InferenceError::Timeout {
                            message: format!(
                                "{} of {rows} rows unanswered in time",
                                rows - responses.len()
                            ),
                        });
                    }
                    // A short spin for a fast answer, then sleeps: HTTP is not the latency path
                    // and these threads must not take CPU from the pollers.
                    if idle_polls > 256 {
                        std::thread::sleep(Duration::from_micros(50));
                    } else {
                        std::hint::spin_loop();
                    }
                }
            }
        }
        self.give_back(&target.pool, client);
        Ok(responses)
    }

    /// Submits rows from `next` on until the session's ring is full or every row is sent.
    /// A pooled session the server closed is replaced once, when nothing of the request was
    /// sent on it (`unanswered` and `next == 0`).
    fn submit_rows(
        &self,
        client: &mut Client,
        target: &Target,
        sent: &RowsToSend<'_>,
        next: &mut usize,
        unanswered: bool,
    ) -> Result<(), InferenceError> {
        let RowsToSend {
            features,
            rows,
            priority,
            deadline_ns,
        } = *sent;
        let width = client.feature_count() as usize;
        let closed = || InferenceError::Disconnected {
            message: "the session closed (is the server stopping?)".into(),
        };
        while *next < rows {
            let row = &features[*next * width..(*next + 1) * width];
            match client.submit(row, priority, deadline_ns) {
                Ok(_) => *next += 1,
                Err(SubmitError::QueueFull { .. }) => break,
                Err(SubmitError::Disconnected) if *next == 0 && unanswered => {
                    *client = self.take_client(target)?;
                    client
                        .submit(&features[..width], priority, deadline_ns)
                        .map_err(|_| closed())?;
                    *next = 1;
                }
                Err(SubmitError::Disconnected) => return Err(closed()),
                // Checked before: a client-side refusal is the caller's error.
                Err(e) => {
                    return Err(InferenceError::InvalidRequest {
                        message: format!("row {}: {e}", *next),
                    })
                }
            }
        }
        Ok(())
    }
}

/// The answers of a request whose session went away at `gone`: what came, then `gone`'s
/// status for the rest (the caller reports the first error).
pub(super) fn finish_without(
    mut responses: Vec<tie_client::Response>,
    gone: tie_client::Response,
    rows: usize,
) -> Vec<tie_client::Response> {
    responses.resize(rows, gone);
    responses
}

/// Resolves a request's model; a version unloaded for going unused is loaded again first (its
/// load time returned, in milliseconds). A request that finds it loading (for another request
/// or a ring client) waits for that load without holding a thread, up to a minute (then 503).
pub(super) async fn resolve_loading(
    serving: &Arc<Serving>,
    name: &str,
    version: Option<&str>,
) -> Result<(Target, Option<f32>), InferenceError> {
    let manager = &serving.manager;
    let mut loaded = None;
    let deadline = Instant::now() + RESTORE_WAIT;
    loop {
        match serving.resolve(name, version) {
            Err(InferenceError::ModelNotFound { .. }) if manager.can_restore(name, version) => {
                if manager.is_restoring(name) {
                    if Instant::now() >= deadline {
                        return Err(InferenceError::NotReady {
                            model_name: name.into(),
                            reason: "loading (on demand, or again after going unused) for longer than a minute"
                                .into(),
                        });
                    }
                    tokio::time::sleep(Duration::from_millis(2)).await;
                    continue;
                }
                let (m, owned, v) = (
                    manager.clone(),
                    name.to_string(),
                    version.map(str::to_string),
                );
                // `None`: another caller started that load first; the loop waits for it. A
                // failure (fresh, or one a moment ago) is this request's answer.
                let fresh = tokio::task::spawn_blocking(move || m.restore(&owned, v.as_deref()))
                    .await
                    .map_err(|e| InferenceError::BatchProcessingError {
                        operation: format!("model load task failed: {e}"),
                    })?
                    .map_err(|e| change_error(e, name))?;
                if fresh.is_none() && !manager.is_restoring(name) {
                    // Loaded by another caller between the two looks, or nothing to load: the
                    // request's answer either way (never another round).
                    return Ok((
                        serving.resolve(name, version)?,
                        loaded.map(|ms: f64| ms as f32),
                    ));
                }
                loaded = fresh.or(loaded);
            }
            other => return Ok((other?, loaded.map(|ms| ms as f32))),
        }
    }
}

/// Runs one request end to end: an ensemble (named, or given in `strategy_context`), a
/// strategy's target, or the model it names.
pub(super) async fn run_request(
    serving: Arc<Serving>,
    mut request: InferenceRequest,
) -> Result<InferenceResponse, InferenceError> {
    let context = request.strategy_context.take();
    let routing = serving.manager.routing();
    if let Some(config) = context.as_ref().and_then(|c| c.ensemble_config.clone()) {
        if context
            .as_ref()
            .is_some_and(|c| !c.strategy_name.is_empty())
        {
            return Err(InferenceError::InvalidRequest {
                message: "strategy_context: an ensemble_config runs its own members; leave strategy_name empty".into(),
            });
        }
        return run_ensemble(serving, request, None, config, context).await;
    }
    if let Some(c) = context.as_ref().filter(|c| !c.strategy_name.is_empty()) {
        route(&serving, &routing, c, &mut request)?;
    }
    // A named ensemble (possibly a strategy's target); it takes precedence over a model of the
    // same name.
    if let Some(config) = routing.ensembles.get(&request.model_name) {
        if let Some(v) = &request.model_version {
            return Err(InferenceError::InvalidRequest {
                message: format!(
                    "{} is an ensemble: it has no version {v:?} (its members name theirs)",
                    request.model_name
                ),
            });
        }
        let name = request.model_name.clone();
        return run_ensemble(serving, request, Some(name), config.clone(), context).await;
    }
    let weights = context.and_then(|c| c.feature_weights);
    run_model(serving, request, weights).await
}

/// Points `request` at the target its strategy's rule gives it.
pub(super) fn route(
    serving: &Serving,
    routing: &Routing,
    context: &StrategyContext,
    request: &mut InferenceRequest,
) -> Result<(), InferenceError> {
    let name = &context.strategy_name;
    let rule = routing
        .strategies
        .get(name)
        .ok_or_else(|| InferenceError::InvalidRequest {
            message: format!(
                "no routing rule for strategy {name:?} (routing.toml has {:?}); an empty strategy_name routes nothing",
                routing.strategies.keys().collect::<Vec<_>>()
            ),
        })?;
    if request.model_version.is_some() {
        return Err(InferenceError::InvalidRequest {
            message: format!(
                "strategy {name:?} picks the version: leave model_version out, or name one of its targets in model_routing_hint"
            ),
        });
    }
    // A model_name keeps the targets of that model.
    let targets: Vec<RouteTarget> = rule
        .targets
        .iter()
        .filter(|t| request.model_name.is_empty() || t.model == request.model_name)
        .cloned()
        .collect();
    let keys = || {
        rule.targets
            .iter()
            .map(RouteTarget::key)
            .collect::<Vec<_>>()
    };
    if targets.iter().all(|t| t.weight == 0.0) && context.model_routing_hint.is_none() {
        return Err(InferenceError::InvalidRequest {
            message: format!(
                "strategy {name:?} has no target of model {:?} with a weight (targets {:?})",
                request.model_name,
                keys()
            ),
        });
    }
    let target = match &context.model_routing_hint {
        Some(hint) => {
            // The hint names a target by its key, or by what it resolves to (`multi:2` for
            // `multi:canary`).
            let resolved = |key: &str| serving.by_key(key).ok().map(|t| t.model.key());
            let wanted = resolved(hint);
            targets
                .iter()
                .find(|t| t.key() == *hint || (wanted.is_some() && resolved(&t.key()) == wanted))
                .ok_or_else(|| InferenceError::InvalidRequest {
                    message: format!(
                        "model_routing_hint {hint:?} is not a target of strategy {name:?} (targets {:?})",
                        keys()
                    ),
                })?
                .clone()
        }
        None => crate::models::routing::split(&targets, &request.request_id).clone(),
    };
    request.model_name = target.model;
    request.model_version = target.version;
    Ok(())
}

/// The rows of one request, as [`Serving::execute`] sends them.
#[derive(Clone, Copy)]
pub(super) struct RowsToSend<'a> {
    pub(super) features: &'a [f32],
    pub(super) rows: usize,
    pub(super) priority: Priority,
    pub(super) deadline_ns: Option<u64>,
}
