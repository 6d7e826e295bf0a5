//! Service configuration: a TOML file with the spec's sections plus `[server]`.
//!
//! Every key has a default, so an empty file (or none) is a valid configuration; an unknown
//! section or key is an error naming it. Keys of the spec that later parts of the server use
//! (GPU, thresholds, model management) are read and checked now so a config written today
//! keeps working.
#![forbid(unsafe_code)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

/// Why the configuration could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ConfigLoadError {
    /// The file could not be read.
    #[error("cannot read config {}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// The TOML is invalid, or has an unknown key (the message names it).
    #[error("invalid config {}: {source}", path.display())]
    Parse {
        /// The file.
        path: PathBuf,
        /// The error, naming the key and its position.
        source: Box<toml::de::Error>,
    },
    /// A value is out of its range.
    #[error("invalid config: {key} = {value}: {why}")]
    Invalid {
        /// The key, `section.key`.
        key: &'static str,
        /// The value given.
        value: String,
        /// What is allowed.
        why: &'static str,
    },
}

/// The whole configuration.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServiceConfig {
    /// tie's own settings: endpoint, repository, threads.
    pub server: ServerSection,
    /// The spec's `[tensorrt_inference_engine]`.
    pub tensorrt_inference_engine: EngineSection,
    /// The spec's `[model_deployment]`.
    pub model_deployment: ModelDeploymentSection,
    /// The spec's `[batch_processing]`.
    pub batch_processing: BatchProcessingSection,
    /// The spec's `[performance_thresholds]`.
    pub performance_thresholds: PerformanceThresholdsSection,
    /// The spec's `[gpu_config]`.
    pub gpu_config: GpuConfigSection,
    /// tie's `[monitoring]`: monitor interval, interval logs, alert webhook.
    pub monitoring: MonitoringSection,
    /// tie's `[journal]`: where answered requests of models with `journal = true` are
    /// recorded.
    pub journal: JournalSection,
    /// tie's `[clickhouse]`: the monitor's figures (and optionally the journal's rows) pushed
    /// to ClickHouse.
    pub clickhouse: ClickHouseSection,
    /// tie's `[registry]`: models served from MLflow's Model Registry.
    pub registry: RegistrySection,
    /// tie's `[model_cache]`: where models from an object store or a registry are kept.
    pub model_cache: ModelCacheSection,
    /// tie's `[object_store]`: options of the object store client (`endpoint`, `region`,
    /// `allow_http`, … as the `object_store` crate names them), over the standard
    /// credential chain (`AWS_*`, `GOOGLE_*`, `AZURE_*` variables, instance metadata).
    pub object_store: std::collections::BTreeMap<String, String>,
}

/// Which model registry `[registry]` names.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RegistryKind {
    /// MLflow's Model Registry, through its REST API.
    Mlflow,
}

/// `[registry]`: registered models to serve, resolved and fetched through the model cache.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RegistrySection {
    /// The registry; unset: none (models come from `server.model_repository`).
    pub kind: Option<RegistryKind>,
    /// The tracking server, `http://host:5000`.
    pub uri: Option<String>,
    /// The models: `"name@alias"`, `"name/3"`, or `"name"` (its highest version). A model
    /// named more than once serves each version; the first is its default, aliases are
    /// labels.
    pub models: Vec<String>,
    /// Seconds between checks of the aliases (a moved alias reloads its model); 0: only on
    /// reload.
    pub poll_interval_sec: u64,
    /// A file holding a bearer token for the registry (first line); unset:
    /// `MLFLOW_TRACKING_TOKEN`, else none.
    pub token_file: Option<PathBuf>,
    /// Seconds a registry request may take to connect or to answer.
    pub timeout_sec: u64,
}

impl Default for RegistrySection {
    fn default() -> Self {
        Self {
            kind: None,
            uri: None,
            models: Vec::new(),
            poll_interval_sec: 30,
            token_file: None,
            timeout_sec: 30,
        }
    }
}

/// `[model_cache]`: the local cache of models fetched from an object store or a registry.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ModelCacheSection {
    /// The directory (made 0700; it must belong to the server's user and be writable by no
    /// one else; one server per directory).
    pub dir: PathBuf,
    /// Most megabytes of cached model files not in use; past it, the least recently used
    /// go.
    pub max_size_mb: u64,
}

impl Default for ModelCacheSection {
    fn default() -> Self {
        Self {
            dir: "model-cache".into(),
            max_size_mb: 10_240,
        }
    }
}

/// `[clickhouse]`: metric history in ClickHouse, through its HTTP interface (see
/// `monitor::clickhouse`).
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClickHouseSection {
    /// The HTTP interface, `http://host:8123`; unset: nothing is pushed.
    pub url: Option<String>,
    /// The database the tables are in (it must exist).
    pub database: String,
    /// The user; unset: ClickHouse's `default`.
    pub user: Option<String>,
    /// A file holding the user's password (first line), readable by the server's user only.
    pub password_file: Option<PathBuf>,
    /// The table of per-interval figures (made if absent).
    pub metrics_table: String,
    /// The table of journal rows (made if absent).
    pub journal_table: String,
    /// Also push the journal's rows (the models with `journal = true`).
    pub journal: bool,
    /// The name the rows carry in their `host` column; unset: the host's name.
    pub host: Option<String>,
    /// Rows held per table while ClickHouse is slow or away: past it, new rows are dropped
    /// and counted.
    pub buffer_rows: usize,
    /// Most rows per insert.
    pub batch_rows: usize,
    /// Milliseconds between two inserts of a table that has rows (sooner once
    /// `batch_rows` wait).
    pub flush_ms: u64,
    /// Milliseconds an insert may take.
    pub timeout_ms: u64,
}

impl Default for ClickHouseSection {
    fn default() -> Self {
        Self {
            url: None,
            database: "default".into(),
            user: None,
            password_file: None,
            metrics_table: "tie_metrics".into(),
            journal_table: "tie_journal".into(),
            journal: false,
            host: None,
            buffer_rows: 100_000,
            batch_rows: 10_000,
            flush_ms: 1000,
            timeout_ms: 10_000,
        }
    }
}

/// A ClickHouse identifier tie writes into its SQL: letters, digits and `_`, not starting
/// with a digit.
fn is_identifier(s: &str) -> bool {
    !s.is_empty()
        && !s.starts_with(|c: char| c.is_ascii_digit())
        && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// `[journal]`: the prediction journal's files (see the `journal` module).
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct JournalSection {
    /// Directory of the journal's Parquet files; unset: no journal (a model's
    /// `journal = true` is then refused at load).
    pub dir: Option<PathBuf>,
    /// A file is closed (and becomes readable) once it holds this many MiB...
    pub rotate_mb: u64,
    /// ...or once it has been open this many seconds: a crash loses at most the rows of the
    /// file being written, so at most this long of traffic.
    pub rotate_seconds: u64,
    /// Closed files older than this many hours are deleted; 0: kept whatever their age.
    pub retain_hours: u64,
    /// The oldest closed files are deleted while all of them together hold more than this
    /// many MiB; 0: no limit.
    pub retain_mb: u64,
    /// Rows waiting for the writer, at most (in chunks of 256): past it, rows are dropped
    /// and counted, never waited for.
    pub queue_rows: usize,
    /// Cores the writer thread runs on (a housekeeping core); empty: the process's CPUs but
    /// the pollers' cores and their SMT siblings (while other CPUs remain).
    pub writer_cores: Vec<usize>,
}

impl Default for JournalSection {
    fn default() -> Self {
        Self {
            dir: None,
            rotate_mb: 64,
            rotate_seconds: 60,
            retain_hours: 0,
            retain_mb: 0,
            queue_rows: 65_536,
            writer_cores: Vec::new(),
        }
    }
}

/// `[monitoring]`: the performance monitor's settings.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MonitoringSection {
    /// Milliseconds between two monitor ticks: rates, the latency EMA and alerts are
    /// evaluated, and an interval is written to the `.hlog` files.
    pub interval_ms: u64,
    /// Directory for HdrHistogram interval logs (`<name>.v<version>.hlog`); unset: none.
    pub hlog_dir: Option<PathBuf>,
    /// URL (`http://`) that alert transitions are POSTed to as JSON; unset: none.
    pub alert_webhook: Option<String>,
}

impl Default for MonitoringSection {
    fn default() -> Self {
        Self {
            interval_ms: 1000,
            hlog_dir: None,
            alert_webhook: None,
        }
    }
}

/// How an idle poller waits for work.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum IdleStrategy {
    /// Spin forever: lowest latency, one core per poller.
    #[default]
    Spin,
    /// Spin for `idle_spin_us`, then yield between scans.
    SpinYield,
    /// Spin for `idle_spin_us`, then sleep `idle_park_us` between scans.
    SpinPark,
}

/// Log output format.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// `[server]`: tie's own settings.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerSection {
    /// Endpoint name; the socket is `<socket_dir>/<endpoint>.sock`.
    pub endpoint: String,
    /// Socket directory; unset: `$TIE_SOCKET_DIR`, else `$XDG_RUNTIME_DIR/tie`, else
    /// `/run/tie`. It must belong to the server's user and be writable by no one else (the
    /// server creates it 0700, or 0750 with `allowed_gid`), or the server refuses to start.
    pub socket_dir: Option<PathBuf>,
    /// Model repository (`<name>/<version>/model.onnx`, optional `<name>/config.toml`).
    pub model_repository: PathBuf,
    /// Directory of feature layout files named by model configs.
    pub layouts_dir: PathBuf,
    /// HTTP control-plane address; unset: 127.0.0.1 and `[tensorrt_inference_engine].port`.
    pub http_addr: Option<SocketAddr>,
    /// The Open Inference Protocol's gRPC service (KServe v2); unset: off. Port 0 picks a free
    /// port (logged).
    pub grpc_addr: Option<SocketAddr>,
    /// Cores to pin poller threads to, one thread per core; empty: one unpinned poller.
    pub poller_cores: Vec<usize>,
    /// How an idle poller waits.
    pub idle: IdleStrategy,
    /// Microseconds an idle poller spins before yielding or parking.
    pub idle_spin_us: u64,
    /// Microseconds a parked poller sleeps between scans.
    pub idle_park_us: u64,
    /// Most sessions open at once.
    pub max_sessions: u32,
    /// The largest segment (both rings) one session may ask for, in MiB: bounds what a client
    /// can make the server commit (at most `max_sessions` times this).
    pub max_segment_mb: u32,
    /// A group whose members may connect besides the server's own user.
    pub allowed_gid: Option<u32>,
    /// Log format.
    pub log_format: LogFormat,
    /// Lock all of the server's memory, present and future (`mlockall`), so no page of a ring,
    /// a staging buffer or the code is ever paged out; start-up fails if it cannot.
    pub lock_memory: bool,
    /// Allow faults to be injected into models through the HTTP API (drills and tests; never
    /// on a production server).
    pub fault_injection: bool,
    /// Place session segments on 2 MB huge pages (hugetlbfs): no TLB misses on the rings. Needs
    /// one free huge page per session (`vm.nr_hugepages`); start-up fails if none is free, and a
    /// session that finds none later gets ordinary pages (logged).
    pub huge_pages: bool,
    /// A file holding a bearer token: the state-changing HTTP endpoints (load, unload,
    /// reload, fault injection) need `Authorization: Bearer <token>`. Unset: they are refused,
    /// unless `http_admin_without_token` is set.
    pub api_token_file: Option<PathBuf>,
    /// Let the state-changing HTTP endpoints run without a token when no `api_token_file` is
    /// set: any local user who reaches the HTTP listener may then load, unload and reload.
    pub http_admin_without_token: bool,
    /// Require the token on every HTTP endpoint (predict, metrics and health included), not
    /// only the state-changing ones. Needs `api_token_file`.
    pub http_token_everywhere: bool,
    /// Serve HTTP on the Unix socket `<socket_dir>/<endpoint>.http.sock` instead of TCP:
    /// reachable by the users the ring socket admits (same mode, same peer check).
    pub http_unix_socket: bool,
    /// Most HTTP connections open at once; more are closed at once (counted in the log).
    pub http_max_connections: u32,
    /// Rows per second HTTP `predict` and `batch-predict` may run together (beyond it: 429
    /// `QueueFull`), so the control plane cannot crowd out ring clients. 0: no cap.
    pub http_max_rows_per_sec: u32,
}

impl Default for ServerSection {
    fn default() -> Self {
        Self {
            endpoint: "tie".into(),
            socket_dir: None,
            model_repository: "models".into(),
            layouts_dir: "layouts/features".into(),
            http_addr: None,
            grpc_addr: None,
            poller_cores: Vec::new(),
            idle: IdleStrategy::Spin,
            idle_spin_us: 100,
            idle_park_us: 50,
            max_sessions: 1024,
            max_segment_mb: 64,
            allowed_gid: None,
            log_format: LogFormat::Text,
            lock_memory: false,
            fault_injection: false,
            huge_pages: false,
            api_token_file: None,
            http_admin_without_token: false,
            http_token_everywhere: false,
            http_unix_socket: false,
            http_max_connections: 256,
            http_max_rows_per_sec: 100_000,
        }
    }
}

/// `[tensorrt_inference_engine]`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EngineSection {
    /// Service name, in logs.
    pub service_name: String,
    /// HTTP port when `server.http_addr` is unset.
    pub port: u16,
    /// Threads of the HTTP runtime.
    pub worker_threads: u32,
    /// Most HTTP requests in progress at once.
    pub max_concurrent_requests: u32,
}

impl Default for EngineSection {
    fn default() -> Self {
        Self {
            service_name: "tie".into(),
            port: 8087,
            worker_threads: 4,
            max_concurrent_requests: 1000,
        }
    }
}

/// `[model_deployment]`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ModelDeploymentSection {
    /// Most models per GPU.
    pub max_models_per_gpu: u32,
    /// Fraction of a GPU's memory one model may use.
    pub memory_fraction_per_model: f32,
    /// Inferences run on each model at load, before it serves.
    pub warmup_requests: u32,
    /// Hours without a request after which a model version is unloaded (unless its config
    /// has `keep_loaded = true` or a session is connected to it); it loads again on the next
    /// request for it. 0: never.
    pub auto_unload_unused_hours: u32,
    /// The same in seconds, for drills and tests; overrides the hours when set.
    pub auto_unload_unused_sec: Option<u64>,
    /// Seconds between health checks.
    pub health_check_interval_sec: u32,
    /// Timed runs per batch size when a model is profiled at load; 0 skips profiling.
    pub profile_iterations: u32,
    /// Whether a model that fails to load at start stops the server (Triton's default). False:
    /// the others are served, and the failed one is listed as unavailable, with why, in
    /// `models/loaded` and `/health/ready` (which then says not ready).
    pub exit_on_error: bool,
    /// A request (ring hello or HTTP) naming a version that is in the repository or the
    /// registry but not loaded loads it (the hello is answered "loading" meanwhile, as after
    /// an idle unload).
    pub load_on_demand: bool,
}

impl Default for ModelDeploymentSection {
    fn default() -> Self {
        Self {
            max_models_per_gpu: 4,
            memory_fraction_per_model: 0.25,
            warmup_requests: 10,
            auto_unload_unused_hours: 24,
            auto_unload_unused_sec: None,
            health_check_interval_sec: 30,
            profile_iterations: 20,
            exit_on_error: true,
            load_on_demand: false,
        }
    }
}

impl ModelDeploymentSection {
    /// How long a version may go without a request before it is unloaded (`None`: never).
    pub fn unload_after(&self) -> Option<std::time::Duration> {
        let secs = self
            .auto_unload_unused_sec
            .unwrap_or(u64::from(self.auto_unload_unused_hours) * 3600);
        (secs > 0).then(|| std::time::Duration::from_secs(secs))
    }
}

/// `[batch_processing]`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BatchProcessingSection {
    /// Most requests in one batch.
    pub max_batch_size: u32,
    /// The spec's batch timeout in milliseconds (superseded by `batch_timeout_us`).
    pub batch_timeout_ms: Option<u64>,
    /// Longest a request waits for its batch to fill, in microseconds.
    pub batch_timeout_us: Option<u64>,
    /// Fewest requests worth a batch before the timeout.
    pub min_batch_size: u32,
    /// Size batches by queue pressure.
    pub enable_dynamic_batching: bool,
    /// Serve higher priorities first.
    pub priority_based_batching: bool,
    /// Batch sizes the backend runs; a batch is padded up to the next one. Empty: any size.
    pub allowed_batch_sizes: Vec<u32>,
    /// Most requests queued per priority and model; more get `QueueFull`.
    pub max_queue_size: u32,
    /// A waiting request gains one priority level per this many microseconds.
    pub aging_us: u64,
}

impl Default for BatchProcessingSection {
    fn default() -> Self {
        Self {
            max_batch_size: 64,
            batch_timeout_ms: None,
            batch_timeout_us: None,
            min_batch_size: 4,
            enable_dynamic_batching: true,
            priority_based_batching: true,
            allowed_batch_sizes: Vec::new(),
            max_queue_size: 1024,
            aging_us: 1000,
        }
    }
}

/// `[performance_thresholds]`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PerformanceThresholdsSection {
    /// Latency above which an alert fires (ms).
    pub max_latency_ms: f32,
    /// Error rate above which an alert fires.
    pub max_error_rate: f32,
    /// Throughput of an interval with traffic below which an alert fires (0, the default:
    /// off).
    pub min_throughput_rps: f32,
    /// Memory above which an alert fires (MB).
    pub max_memory_usage_mb: f32,
    /// GPU utilisation below which an alert fires.
    pub min_gpu_utilization: f32,
}

impl Default for PerformanceThresholdsSection {
    fn default() -> Self {
        Self {
            max_latency_ms: 20.0,
            max_error_rate: 0.01,
            // Off: trading traffic comes and goes, and an idle model is not a slow one.
            min_throughput_rps: 0.0,
            max_memory_usage_mb: 4096.0,
            min_gpu_utilization: 0.7,
        }
    }
}

/// `[gpu_config]`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GpuConfigSection {
    /// GPUs to use.
    pub device_ids: Vec<u32>,
    /// Device memory pool (MB).
    pub memory_pool_size_mb: u32,
    /// Capture executions as CUDA graphs.
    pub enable_cuda_graphs: bool,
    /// The spec's engine profiling switch.
    pub enable_tensorrt_profiling: bool,
}

impl Default for GpuConfigSection {
    fn default() -> Self {
        Self {
            device_ids: vec![0],
            memory_pool_size_mb: 8192,
            enable_cuda_graphs: true,
            enable_tensorrt_profiling: false,
        }
    }
}

impl ServiceConfig {
    /// Reads `path`, or the defaults when `None`.
    ///
    /// # Errors
    /// [`ConfigLoadError`] for an unreadable file, invalid TOML, an unknown key or a value out
    /// of range.
    pub fn load(path: Option<&Path>) -> Result<Self, ConfigLoadError> {
        let config = Self::read(path)?;
        config.validate()?;
        Ok(config)
    }

    /// Reads and parses `path`, or the defaults when `None`, without checking the values'
    /// ranges ([`ServiceConfig::validate`]).
    ///
    /// # Errors
    /// [`ConfigLoadError::Io`] or [`ConfigLoadError::Parse`].
    pub fn read(path: Option<&Path>) -> Result<Self, ConfigLoadError> {
        let Some(path) = path else {
            return Ok(Self::default());
        };
        let text = std::fs::read_to_string(path).map_err(|source| ConfigLoadError::Io {
            path: path.into(),
            source,
        })?;
        Self::parse(&text).map_err(|source| ConfigLoadError::Parse {
            path: path.into(),
            source: Box::new(source),
        })
    }

    /// Parses TOML text (no validation of ranges).
    ///
    /// # Errors
    /// The TOML error, naming an unknown key.
    pub fn parse(text: &str) -> Result<Self, toml::de::Error> {
        toml::from_str(text)
    }

    /// Checks the values' ranges.
    ///
    /// # Errors
    /// [`ConfigLoadError::Invalid`] naming the first key out of range.
    pub fn validate(&self) -> Result<(), ConfigLoadError> {
        let (b, server, deployment) =
            (&self.batch_processing, &self.server, &self.model_deployment);
        require(
            (1..=65_536).contains(&b.max_batch_size),
            "batch_processing.max_batch_size",
            b.max_batch_size,
            "must be in 1..=65536",
        )?;
        require(
            server.max_segment_mb > 0,
            "server.max_segment_mb",
            0,
            "must be at least 1",
        )?;
        require(
            server.max_sessions > 0,
            "server.max_sessions",
            0,
            "must be at least 1",
        )?;
        require(
            (1..=65_536).contains(&server.http_max_connections),
            "server.http_max_connections",
            server.http_max_connections,
            "must be in 1..=65536",
        )?;
        require(
            !server.http_token_everywhere || server.api_token_file.is_some(),
            "server.http_token_everywhere",
            true,
            "needs server.api_token_file (the token to require)",
        )?;
        require(
            (1..=1 << 20).contains(&b.max_queue_size),
            "batch_processing.max_queue_size",
            b.max_queue_size,
            "must be in 1..=1048576",
        )?;
        if let Some(&bad) = b
            .allowed_batch_sizes
            .iter()
            .find(|&&s| s == 0 || s > b.max_batch_size)
        {
            require(
                false,
                "batch_processing.allowed_batch_sizes",
                bad,
                "every size must be in 1..=max_batch_size",
            )?;
        }
        let online = online_cores();
        for (key, cores) in [
            ("server.poller_cores", &server.poller_cores),
            ("journal.writer_cores", &self.journal.writer_cores),
        ] {
            if let Some(&core) = cores.iter().find(|c| !online.contains(c)) {
                require(false, key, core, "no such core on this host")?;
            }
        }
        require(
            self.monitoring.interval_ms >= 10,
            "monitoring.interval_ms",
            self.monitoring.interval_ms,
            "must be at least 10",
        )?;
        if let Some(url) = &self.monitoring.alert_webhook {
            require(
                url.starts_with("http://"),
                "monitoring.alert_webhook",
                url,
                "must be an http:// URL (this build has no TLS)",
            )?;
        }
        require(
            deployment.health_check_interval_sec > 0,
            "model_deployment.health_check_interval_sec",
            0,
            "must be at least 1",
        )?;
        let engine = &self.tensorrt_inference_engine;
        require(
            engine.max_concurrent_requests > 0 && engine.worker_threads > 0,
            "tensorrt_inference_engine.max_concurrent_requests",
            0,
            "max_concurrent_requests and worker_threads must be at least 1",
        )?;
        let journal = &self.journal;
        require(
            (1..=1 << 20).contains(&journal.rotate_mb),
            "journal.rotate_mb",
            journal.rotate_mb,
            "must be in 1..=1048576",
        )?;
        require(
            journal.rotate_seconds > 0,
            "journal.rotate_seconds",
            journal.rotate_seconds,
            "must be at least 1",
        )?;
        require(
            journal.retain_hours <= 1_000_000,
            "journal.retain_hours",
            journal.retain_hours,
            "must be at most 1000000",
        )?;
        require(
            journal.retain_mb <= 1 << 40,
            "journal.retain_mb",
            journal.retain_mb,
            "must be at most 2^40",
        )?;
        require(
            (256..=1 << 24).contains(&journal.queue_rows),
            "journal.queue_rows",
            journal.queue_rows,
            "must be in 256..=16777216",
        )?;
        let ch = &self.clickhouse;
        if let Some(url) = &ch.url {
            require(
                url.starts_with("http://"),
                "clickhouse.url",
                url,
                "must be an http:// URL (ClickHouse's HTTP interface; TLS is not offered)",
            )?;
            // The URL is logged: credentials go in `user` and `password_file`.
            require(
                !url.contains('@') && !url.contains('?'),
                "clickhouse.url",
                "(not shown: it may hold a password)",
                "must hold no user, password or query: set clickhouse.user and clickhouse.password_file",
            )?;
        }
        for (key, name) in [
            ("clickhouse.database", &ch.database),
            ("clickhouse.metrics_table", &ch.metrics_table),
            ("clickhouse.journal_table", &ch.journal_table),
        ] {
            require(
                is_identifier(name),
                key,
                name,
                "must be letters, digits and _, not starting with a digit",
            )?;
        }
        require(
            !ch.journal || self.journal.dir.is_some(),
            "clickhouse.journal",
            ch.journal,
            "the journal's rows need a journal: set [journal] dir",
        )?;
        require(
            (1..=1 << 24).contains(&ch.buffer_rows),
            "clickhouse.buffer_rows",
            ch.buffer_rows,
            "must be in 1..=16777216",
        )?;
        require(
            (1..=1 << 20).contains(&ch.batch_rows),
            "clickhouse.batch_rows",
            ch.batch_rows,
            "must be in 1..=1048576",
        )?;
        require(
            (10..=3_600_000).contains(&ch.flush_ms),
            "clickhouse.flush_ms",
            ch.flush_ms,
            "must be in 10..=3600000",
        )?;
        require(
            (100..=600_000).contains(&ch.timeout_ms),
            "clickhouse.timeout_ms",
            ch.timeout_ms,
            "must be in 100..=600000",
        )?;
        let f = deployment.memory_fraction_per_model;
        require(
            f > 0.0 && f <= 1.0,
            "model_deployment.memory_fraction_per_model",
            f,
            "must be in (0, 1]",
        )
    }

    /// The GPUs to open and the memory rules for models on them (`[gpu_config]` and
    /// `[model_deployment]`).
    pub fn gpu_options(&self) -> tie_engine::devices::GpuOptions {
        tie_engine::devices::GpuOptions {
            device_ids: self.gpu_config.device_ids.clone(),
            cuda_graphs: self.gpu_config.enable_cuda_graphs,
            memory_pool_mb: self.gpu_config.memory_pool_size_mb,
            memory_fraction_per_model: self.model_deployment.memory_fraction_per_model,
            max_models_per_gpu: self.model_deployment.max_models_per_gpu,
        }
    }

    /// The HTTP address: `server.http_addr`, else 127.0.0.1 on the engine's port.
    pub fn http_addr(&self) -> SocketAddr {
        self.server.http_addr.unwrap_or_else(|| {
            SocketAddr::from(([127, 0, 0, 1], self.tensorrt_inference_engine.port))
        })
    }
}

/// `Ok` when `ok`, else the invalid key with the value given and why.
fn require(
    ok: bool,
    key: &'static str,
    value: impl ToString,
    why: &'static str,
) -> Result<(), ConfigLoadError> {
    if ok {
        Ok(())
    } else {
        Err(ConfigLoadError::Invalid {
            key,
            value: value.to_string(),
            why,
        })
    }
}

/// The host's online CPUs, not this process's affinity: cores isolated with isolcpus are
/// outside a shell's affinity and are exactly where pollers belong.
fn online_cores() -> Vec<usize> {
    std::fs::read_to_string("/sys/devices/system/cpu/online")
        .map(|l| crate::host::parse_cpu_list(&l))
        .unwrap_or_else(|_| {
            core_affinity::get_core_ids()
                .unwrap_or_default()
                .iter()
                .map(|c| c.id)
                .collect()
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_config_has_the_spec_defaults() {
        let c = ServiceConfig::parse("").unwrap();
        assert_eq!(c.batch_processing.max_batch_size, 64);
        assert_eq!(c.tensorrt_inference_engine.port, 8087);
        assert_eq!(c.http_addr().to_string(), "127.0.0.1:8087");
        c.validate().unwrap();
    }

    #[test]
    fn the_deployment_example_parses() {
        let c = ServiceConfig::parse(include_str!("../deploy/tie.example.toml")).unwrap();
        assert_eq!(
            c.monitoring.hlog_dir.as_deref(),
            Some(Path::new("/var/log/tie"))
        );
        assert_eq!(c.server.poller_cores, [2, 3]);
    }

    #[test]
    fn the_spec_example_parses() {
        let text = r#"
[tensorrt_inference_engine]
service_name = "tensorrt-inference-engine"
port = 8087
worker_threads = 4
max_concurrent_requests = 1000

[model_deployment]
max_models_per_gpu = 4
memory_fraction_per_model = 0.25
warmup_requests = 10
auto_unload_unused_hours = 24
health_check_interval_sec = 30

[batch_processing]
max_batch_size = 64
batch_timeout_ms = 50
min_batch_size = 4
enable_dynamic_batching = true
priority_based_batching = true

[performance_thresholds]
max_latency_ms = 20.0
max_error_rate = 0.01
min_throughput_rps = 100.0
max_memory_usage_mb = 4096.0
min_gpu_utilization = 0.7

[gpu_config]
device_ids = [0, 1]
memory_pool_size_mb = 8192
enable_cuda_graphs = true
enable_tensorrt_profiling = false
"#;
        let c = ServiceConfig::parse(text).unwrap();
        assert_eq!(c.gpu_config.device_ids, vec![0, 1]);
        assert_eq!(c.batch_processing.batch_timeout_ms, Some(50));
    }

    #[test]
    fn unknown_keys_are_named() {
        let e = ServiceConfig::parse("[batch_processing]\nmax_batch_sise = 3\n").unwrap_err();
        assert!(e.to_string().contains("max_batch_sise"), "{e}");
        let e = ServiceConfig::parse("[nonsense]\n").unwrap_err();
        assert!(e.to_string().contains("nonsense"), "{e}");
    }

    #[test]
    fn out_of_range_values_are_refused() {
        let c = ServiceConfig::parse("[batch_processing]\nmax_batch_size = 0\n").unwrap();
        assert!(c.validate().is_err());
        let c = ServiceConfig::parse("[server]\npoller_cores = [100000]\n").unwrap();
        assert!(c.validate().is_err());
    }
}
