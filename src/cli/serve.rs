//! `tie serve`: the server, its HTTP control plane and its shutdown.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;

use tie::config::ServiceConfig;
use tie::dataplane::Server;
use tie::models::{load_repository_with, LoadOptions};

/// `tie serve`.
#[derive(Debug, clap::Args)]
pub struct ServeArgs {
    /// Service config (TOML); every key has a default.
    #[arg(long, env = "TIE_CONFIG")]
    pub config: Option<PathBuf>,
    /// Model repository (overrides `server.model_repository`).
    #[arg(long)]
    pub model_repository: Option<PathBuf>,
    /// Endpoint name (overrides `server.endpoint`).
    #[arg(long)]
    pub endpoint: Option<String>,
    /// HTTP control-plane address (overrides `server.http_addr`; port 0 picks a free one, logged).
    #[arg(long, env = "TIE_HTTP_ADDR")]
    pub http_addr: Option<std::net::SocketAddr>,
    /// Socket directory (overrides `server.socket_dir`).
    #[arg(long)]
    pub socket_dir: Option<PathBuf>,
    /// Whether a model that fails to load stops the server (overrides
    /// `model_deployment.exit_on_error`; false serves the others and lists the failed one as
    /// unavailable).
    #[arg(long, value_name = "BOOL")]
    pub exit_on_error: Option<bool>,
    /// Log format (overrides `server.log_format`; also for an error before the config is read).
    #[arg(long, env = "TIE_LOG_FORMAT", value_enum)]
    pub log_format: Option<tie::config::LogFormat>,
}

/// Warns about poller cores on another NUMA node than a GPU in use.
pub(super) fn warn_far_pollers(config: &ServiceConfig, gpus: &tie_engine::devices::Gpus) {
    #[cfg(feature = "cuda")]
    if let tie_engine::devices::Gpus::Available(rt) = gpus {
        for d in rt.devices() {
            let Some(gpu_node) = d.numa_node() else {
                continue;
            };
            for &core in &config.server.poller_cores {
                if let Some(node) = tie::host::cpu_numa_node(core) {
                    if node != gpu_node {
                        tracing::warn!(
                            core,
                            core_node = node,
                            gpu = d.ordinal(),
                            gpu_node,
                            "poller core is on another NUMA node than the GPU: pick cores of the GPU's node"
                        );
                    }
                }
            }
        }
    }
    #[cfg(not(feature = "cuda"))]
    let _ = (config, gpus);
}

/// Moves this thread, and so every thread it starts, off the poller cores (see
/// [`tie::dataplane::move_off_poller_cores`]), saying where it cannot.
fn keep_off_poller_cores(cores: &[usize]) {
    use tie::dataplane::OffPollerCores;
    match tie::dataplane::move_off_poller_cores(cores) {
        Ok(OffPollerCores::Moved) => {
            tracing::info!(poller_cores = ?cores, "the server's other threads run off the poller cores (and their SMT siblings)")
        }
        Ok(OffPollerCores::AlreadyOff) => {}
        Ok(OffPollerCores::OnSiblings) => tracing::warn!(
            poller_cores = ?cores,
            "the server's other threads run on SMT siblings of the poller cores, sharing their pipelines: the process may run on no other CPU (widen its CPU affinity, e.g. CPUAffinity= in the unit, or turn SMT off)"
        ),
        Ok(OffPollerCores::NoOtherCpu) => tracing::warn!(
            poller_cores = ?cores,
            "the server's other threads share the poller cores: the process may run on no other CPU (widen its CPU affinity, e.g. CPUAffinity= in the unit)"
        ),
        Err(e) => tracing::warn!(
            error = %e,
            poller_cores = ?cores,
            "the server's other threads may run on the poller cores: cannot set their CPUs"
        ),
    }
}

pub(super) fn serve(args: ServeArgs) -> anyhow::Result<ExitCode> {
    if let Some(f) = args.log_format {
        tie::logging::announce(f);
    }
    let mut config = ServiceConfig::read(args.config.as_deref())?;
    // A config that parses says how the process logs, its own values' errors included.
    if args.log_format.is_none() {
        tie::logging::announce(config.server.log_format);
    }
    config.validate()?;
    if let Some(f) = args.log_format {
        config.server.log_format = f;
    }
    if let Some(r) = args.model_repository {
        config.server.model_repository = r;
    }
    if let Some(e) = args.endpoint {
        config.server.endpoint = e;
    }
    if let Some(a) = args.http_addr {
        config.server.http_addr = Some(a);
    }
    if let Some(d) = args.socket_dir {
        config.server.socket_dir = Some(d);
    }
    if let Some(e) = args.exit_on_error {
        config.model_deployment.exit_on_error = e;
    }
    tie::logging::init(config.server.log_format);
    // Before any thread starts: freeing memory must not interrupt the spinning pollers, and
    // no thread but a poller may run on a poller's core (every thread inherits this one's
    // CPUs; the pollers pin themselves).
    tie::memory::keep_freed_memory();
    keep_off_poller_cores(&config.server.poller_cores);
    let stop = Arc::new(AtomicBool::new(false));
    for signal in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(signal, stop.clone()).context("installing signal handlers")?;
    }
    if config.server.lock_memory {
        use rustix::mm::{mlockall, MlockAllFlags};
        // Every later mapping would fail mid-service under a finite limit: refuse to start.
        if let Some(bytes) = tie::memory::lock_memory_refused_under() {
            anyhow::bail!(
                "server.lock_memory = true needs an unlimited locked-memory limit, this one is {} MB \
                 (LimitMEMLOCK=infinity in the unit, or ulimit -l unlimited)",
                bytes >> 20
            );
        }
        mlockall(MlockAllFlags::CURRENT | MlockAllFlags::FUTURE).with_context(|| {
            "server.lock_memory = true but mlockall failed: raise the locked-memory limit \
             (LimitMEMLOCK=infinity in the unit, or ulimit -l unlimited)"
        })?;
        tracing::info!("all memory locked (mlockall)");
    }
    // A socket directory the server cannot use is said before the models load, as is a token
    // file it cannot read.
    tie::dataplane::check_socket_dir(&config)?;
    let api_token =
        tie::http::read_api_token(&config).context("cannot read the control plane's API token")?;
    // An object store or registry is read into the model cache's mirror, which is then the
    // repository (at start: from the cache when the source cannot be reached).
    let remote = tie::models::remote::Remote::open(&config)
        .context("cannot use the model source")?
        .map(Arc::new);
    if let Some(remote) = &remote {
        tracing::info!(source = %remote.describe(), cache = %config.model_cache.dir.display(), "reading the model source");
        match remote.start().context("cannot read the model source")? {
            tie::models::remote::Started::Fresh => {}
            tie::models::remote::Started::FromCache { why, synced_at } => tracing::warn!(
                reason = %why,
                synced_at = %synced_at,
                "started from the model cache: the source is unreachable; models are as they were when last read"
            ),
        }
        config.server.model_repository = remote.mirror_dir().to_path_buf();
    }
    // So is a model repository it cannot read.
    std::fs::read_dir(&config.server.model_repository).with_context(|| {
        format!(
            "cannot read the model repository {} (set server.model_repository or --model-repository)",
            config.server.model_repository.display()
        )
    })?;
    // The control plane first: /health/live answers while the models load.
    // Each listener's error names its setting.
    let http = tie::http::HttpServer::start(&config, api_token)
        .context("cannot serve the control plane")?;
    let options = LoadOptions::from_config(&config);
    options.gpus.log();
    warn_far_pollers(&config, &options.gpus);
    let loaded = load_repository_with(
        &config.server.model_repository,
        &options,
        config.model_deployment.exit_on_error,
    );
    if let Some(remote) = &remote {
        // The mirror holds what serves, for the next start: what this one read, or (when it
        // cannot serve) what the last one left.
        match &loaded {
            Ok(_) => remote.commit(),
            Err(_) => remote.roll_back(),
        }
    }
    let (models, failures) = loaded?;
    let server = Server::start(&config, models)?;
    let manager = tie::models::ModelManager::new(
        server.models().clone(),
        config.server.model_repository.clone(),
        options,
    );
    manager.record_failures(failures);
    manager.set_load_on_demand(config.model_deployment.load_on_demand);
    let poller = match &remote {
        Some(remote) => {
            manager.set_remote(remote.clone());
            remote.poll_interval.map(|interval| {
                let (manager, stop) = (manager.clone(), stop.clone());
                std::thread::Builder::new()
                    .name("tie-registry-poll".into())
                    .spawn(move || manager.poll_remote_task(interval, &stop))
                    .context("cannot start the registry poller")
            })
        }
        None => None,
    }
    .transpose()?;
    manager.load_routing()?;
    http.serve(manager.clone());
    // Said once both planes serve the models (scripts and tests wait for it).
    tracing::info!(socket = %server.socket_path().display(), pollers = server.pollers(), "serving");
    // Versions unused for `auto_unload_unused_hours` are unloaded (and load again on demand).
    let unloader = config.model_deployment.unload_after().map(|after| {
        let (manager, stop) = (manager.clone(), stop.clone());
        std::thread::Builder::new()
            .name("tie-unload-unused".into())
            .spawn(move || manager.unload_unused_task(after, &stop))
            .context("cannot start the unused-model unloader")
    });
    let unloader = unloader.transpose()?;
    while !stop.load(Ordering::SeqCst) {
        std::thread::sleep(Duration::from_millis(20));
    }
    tracing::info!("shutting down");
    // No model change once stopping (the unloader ends with a change in progress).
    if let Some(u) = unloader {
        let _ = u.join();
    }
    if let Some(p) = poller {
        let _ = p.join();
    }
    // No new HTTP request, and its sessions close, before the data plane stops.
    http.shutdown();
    server.shutdown();
    Ok(ExitCode::SUCCESS)
}
