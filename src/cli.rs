//! The `tie` command line: `tie serve`, `tie predict`, `tie report`, `tie devices` and
//! `tie doctor`.
#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use tie_client::{Client, ConnectOptions, PredictError, Response, WaitStrategy};

use crate::api::{
    InferenceError, InferenceMetrics, InferenceResponse, ModelInferenceMetadata, Prediction,
};
use crate::config::ServiceConfig;
use crate::repository::{load_repository, LoadOptions};
use crate::server::Server;

/// tie: a low-latency inference server for trading processes on the same host.
#[derive(Debug, Parser)]
#[command(name = "tie", version, about)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the server.
    Serve(ServeArgs),
    /// Send one request through the shared-memory client and print the spec's
    /// InferenceResponse as JSON.
    Predict(PredictArgs),
    /// Say which GPUs the server would use (or why none), with NVML's figures, as JSON.
    Devices(DevicesArgs),
    /// Check this host against the deployment guide (deploy/README.md): what is fine, what is
    /// not, and the fix.
    Doctor(DoctorArgs),
    /// Print percentile tables and distributions from HdrHistogram interval logs (`.hlog`).
    Report(ReportArgs),
    /// Reload models from the repository on a running server (through its HTTP control
    /// plane): new versions are built and warmed before sessions switch; a failure changes
    /// nothing. Prints what changed as JSON.
    Reload(ReloadArgs),
    /// Unload a model version (`name:version`) or every version of a model (`name`) on a
    /// running server.
    Unload(UnloadArgs),
}

/// How to reach a running server's control plane.
#[derive(Debug, clap::Args)]
pub struct ControlArgs {
    /// The server's config (TOML): its `server.http_addr` and `server.api_token_file`.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// The control plane's address (overrides the config's).
    #[arg(long)]
    pub http_addr: Option<std::net::SocketAddr>,
}

/// `tie reload`.
#[derive(Debug, clap::Args)]
pub struct ReloadArgs {
    /// Only this model (default: the whole repository; new models load, removed ones unload).
    pub model: Option<String>,
    /// Check that this version is one the model's version policy loads (refused otherwise);
    /// the reload loads what the policy picks.
    #[arg(long, requires = "model")]
    pub version: Option<u32>,
    /// The server.
    #[command(flatten)]
    pub control: ControlArgs,
}

/// `tie unload`.
#[derive(Debug, clap::Args)]
pub struct UnloadArgs {
    /// `name:version` (a label accepted), or `name` for every version.
    pub key: String,
    /// The server.
    #[command(flatten)]
    pub control: ControlArgs,
}

/// `tie report`.
#[derive(Debug, clap::Args)]
pub struct ReportArgs {
    /// `.hlog` files (the server's `[monitoring] hlog_dir`, tie-loadgen's, or any HdrHistogram
    /// interval log), and tie-loadgen's `summary.json` and `sweep.json` files.
    #[arg(required = true)]
    pub files: Vec<PathBuf>,
    /// Values in the logs are in this unit per microsecond (1000 for nanoseconds).
    #[arg(long, default_value_t = 1000.0)]
    pub units_per_us: f64,
    /// Print only the percentile table, not the distribution.
    #[arg(long)]
    pub summary: bool,
    /// Draw the latency percentile distributions (and the sweeps' latency against
    /// throughput) into this PNG.
    #[arg(long)]
    pub chart: Option<PathBuf>,
}

/// `tie doctor`.
#[derive(Debug, clap::Args)]
pub struct DoctorArgs {
    /// Service config (TOML): the poller cores and GPUs to check.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Print the checks as JSON.
    #[arg(long)]
    pub json: bool,
}

/// `tie devices`.
#[derive(Debug, clap::Args)]
pub struct DevicesArgs {
    /// Service config (TOML), for `[gpu_config]`.
    #[arg(long)]
    pub config: Option<PathBuf>,
}

/// `tie serve`.
#[derive(Debug, clap::Args)]
pub struct ServeArgs {
    /// Service config (TOML); every key has a default.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Model repository (overrides `server.model_repository`).
    #[arg(long)]
    pub model_repository: Option<PathBuf>,
    /// Endpoint name (overrides `server.endpoint`).
    #[arg(long)]
    pub endpoint: Option<String>,
    /// HTTP control-plane address (overrides `server.http_addr`; port 0 picks a free one, logged).
    #[arg(long)]
    pub http_addr: Option<std::net::SocketAddr>,
    /// Socket directory (overrides `server.socket_dir`).
    #[arg(long)]
    pub socket_dir: Option<PathBuf>,
}

/// `tie predict`.
#[derive(Debug, clap::Args)]
pub struct PredictArgs {
    /// Endpoint name of the server.
    #[arg(long, default_value = "tie")]
    pub endpoint: String,
    /// Model name.
    #[arg(long)]
    pub model: String,
    /// Model version (default: the server's default for the model).
    #[arg(long)]
    pub version: Option<u32>,
    /// Comma-separated feature values, e.g. `0.1,-0.2,3`.
    #[arg(long, allow_hyphen_values = true)]
    pub features: String,
    /// Socket directory (default: `$TIE_SOCKET_DIR` or /tmp/tie).
    #[arg(long)]
    pub socket_dir: Option<PathBuf>,
    /// How long to wait for the answer, in milliseconds.
    #[arg(long, default_value_t = 5000)]
    pub timeout_ms: u64,
}

/// Parses the command line and runs it.
///
/// # Errors
/// Whatever stopped the command, for `main` to print.
pub fn run() -> anyhow::Result<ExitCode> {
    match Cli::parse().command {
        Command::Serve(args) => serve(args),
        Command::Reload(args) => {
            let path = match (&args.model, args.version) {
                (None, _) => "models/reload".to_string(),
                (Some(m), None) => format!("models/{m}/load"),
                (Some(m), Some(v)) => format!("models/{m}/load?version={v}"),
            };
            control(&args.control, &path)
        }
        Command::Unload(args) => control(&args.control, &format!("models/{}/unload", args.key)),
        Command::Predict(args) => predict(args),
        Command::Devices(args) => devices(args),
        Command::Doctor(args) => doctor(args),
        Command::Report(args) => report(args),
    }
}

fn report(args: ReportArgs) -> anyhow::Result<ExitCode> {
    let mut out = String::new();
    let mut logs = Vec::new();
    let mut sweeps = Vec::new();
    for file in &args.files {
        let text =
            std::fs::read(file).with_context(|| format!("cannot read {}", file.display()))?;
        let name = file.display().to_string();
        if file.extension().is_some_and(|e| e == "json") {
            // A tie-loadgen summary or sweep.
            if let Ok(sweep) = serde_json::from_slice::<crate::report::Sweep>(&text) {
                crate::report::write_sweep(&mut out, &name, &sweep);
                sweeps.push((name, sweep));
            } else {
                let summary: crate::loadgen::Summary =
                    serde_json::from_slice(&text).with_context(|| {
                        format!("{name} is neither a tie-loadgen summary nor a sweep")
                    })?;
                crate::report::write_summary(&mut out, &name, &summary);
            }
            continue;
        }
        let log = crate::report::read_hlog(&text)
            .with_context(|| format!("{name} is not an HdrHistogram interval log"))?;
        crate::report::write_report(&mut out, &name, &log, args.units_per_us, !args.summary);
        logs.push((name, log));
    }
    print!("{out}");
    if let Some(chart) = &args.chart {
        crate::report::draw_chart(chart, &logs, &sweeps, args.units_per_us)?;
        println!("chart: {}", chart.display());
    }
    Ok(ExitCode::SUCCESS)
}

/// Warns about poller cores on another NUMA node than a GPU in use.
fn warn_far_pollers(config: &ServiceConfig, gpus: &crate::gpu::Gpus) {
    #[cfg(feature = "cuda")]
    if let crate::gpu::Gpus::Available(rt) = gpus {
        for d in rt.devices() {
            let Some(gpu_node) = d.numa_node() else {
                continue;
            };
            for &core in &config.server.poller_cores {
                if let Some(node) = crate::doctor::cpu_numa_node(core) {
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

fn doctor(args: DoctorArgs) -> anyhow::Result<ExitCode> {
    let config = ServiceConfig::load(args.config.as_deref())?;
    let checks = crate::doctor::run(&config);
    if args.json {
        println!("{}", serde_json::to_string_pretty(&checks)?);
    } else {
        for c in &checks {
            let verdict = match c.verdict {
                crate::doctor::Verdict::Ok => "ok",
                crate::doctor::Verdict::Warn => "WARN",
                crate::doctor::Verdict::Unknown => "??",
            };
            println!("{verdict:<5} {:<30} {}", c.name, c.value);
            if !c.fix.is_empty() {
                println!("      fix: {}", c.fix);
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn devices(args: DevicesArgs) -> anyhow::Result<ExitCode> {
    let config = ServiceConfig::load(args.config.as_deref())?;
    let gpus = crate::gpu::Gpus::probe(&config);
    #[allow(unused_mut)]
    let mut devices = Vec::<serde_json::Value>::new();
    #[cfg(feature = "cuda")]
    if let crate::gpu::Gpus::Available(rt) = &gpus {
        for d in rt.devices() {
            devices.push(serde_json::json!({
                "ordinal": d.ordinal(),
                "name": d.name(),
                "arch": d.arch(),
                "memory_mb": d.total_bytes() >> 20,
            }));
        }
    }
    let (nvml, nvml_error) = match crate::gpu::figures() {
        Ok(f) => (Some(f), None),
        Err(e) => (None, Some(e)),
    };
    let report = serde_json::json!({
        "gpu_usable": gpus.unavailable().is_none(),
        "reason": gpus.unavailable(),
        "devices": devices,
        "nvml": nvml,
        "nvml_error": nvml_error,
    });
    println!("{}", serde_json::to_string_pretty(&report)?);
    Ok(ExitCode::SUCCESS)
}

fn serve(args: ServeArgs) -> anyhow::Result<ExitCode> {
    let mut config = ServiceConfig::load(args.config.as_deref())?;
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
    crate::logging::init(config.server.log_format);
    let stop = Arc::new(AtomicBool::new(false));
    for signal in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(signal, stop.clone()).context("installing signal handlers")?;
    }
    if config.server.lock_memory {
        use rustix::mm::{mlockall, MlockAllFlags};
        // Every later mapping (segments, stacks, GPU staging) counts against a finite limit and
        // would fail mid-service: refuse to start instead (root is exempt: CAP_IPC_LOCK).
        let limit = rustix::process::getrlimit(rustix::process::Resource::Memlock).current;
        if let (Some(bytes), false) = (limit, rustix::process::geteuid().is_root()) {
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
    // The control plane first: /health/live answers while the models load.
    let http = crate::http::HttpServer::start(&config).with_context(|| {
        format!(
            "cannot serve the HTTP control plane on {} (set server.http_addr or --http-addr)",
            config.http_addr()
        )
    })?;
    let options = LoadOptions::from_config(&config);
    options.gpus.log();
    warn_far_pollers(&config, &options.gpus);
    let models = load_repository(&config.server.model_repository, &options)?;
    let server = Server::start(&config, models)?;
    let manager = crate::manager::ModelManager::new(
        server.models().clone(),
        config.server.model_repository.clone(),
        options,
    );
    manager.load_routing()?;
    http.serve(manager.clone());
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
    // No new HTTP request, and its sessions close, before the data plane stops.
    http.shutdown();
    server.shutdown();
    Ok(ExitCode::SUCCESS)
}

/// POSTs to the control plane's `path` (under the API prefix) and prints the answer; a refusal
/// is printed and fails the command.
fn control(args: &ControlArgs, path: &str) -> anyhow::Result<ExitCode> {
    let mut config = ServiceConfig::load(args.config.as_deref())?;
    if let Some(a) = args.http_addr {
        config.server.http_addr = Some(a);
    }
    let url = format!(
        "http://{}/api/v1/internal/inference/{path}",
        config.http_addr()
    );
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        // Loading and warming up a model takes a while.
        .timeout_global(Some(Duration::from_secs(600)))
        .build()
        .into();
    let mut request = agent.post(&url);
    if let Some(file) = &config.server.api_token_file {
        let token = std::fs::read_to_string(file)
            .with_context(|| format!("server.api_token_file {}", file.display()))?;
        request = request.header("Authorization", &format!("Bearer {}", token.trim()));
    }
    let mut response = request
        .send_empty()
        .with_context(|| format!("cannot reach the server's control plane at {url}"))?;
    let code = response.status().as_u16();
    let body = response
        .body_mut()
        .read_to_string()
        .context("reading the control plane's answer")?;
    if code == 200 {
        println!("{body}");
        Ok(ExitCode::SUCCESS)
    } else {
        eprintln!("refused ({code}): {body}");
        Ok(ExitCode::FAILURE)
    }
}

/// Parses `0.1,-0.2,3` (spaces allowed around values).
fn parse_features(text: &str) -> anyhow::Result<Vec<f32>> {
    text.split(',')
        .enumerate()
        .map(|(i, v)| {
            v.trim()
                .parse::<f32>()
                .with_context(|| format!("feature {i} ({:?}) is not a number", v.trim()))
        })
        .collect()
}

fn predict(args: PredictArgs) -> anyhow::Result<ExitCode> {
    let features = parse_features(&args.features)?;
    let options = ConnectOptions {
        version: args.version,
        socket_dir: args.socket_dir,
        timeout: Duration::from_millis(args.timeout_ms),
        wait: WaitStrategy::SpinThenYield {
            spin: Duration::from_micros(100),
        },
        request_capacity: 1,
        response_capacity: 1,
        ..ConnectOptions::default()
    };
    let mut client = Client::connect(&args.endpoint, &args.model, options)?;
    let result = client.predict(&features);
    let (architecture, device) = {
        let mut parts = client.description().split_whitespace();
        (
            parts.next().unwrap_or_default().to_string(),
            parts.next().unwrap_or_default().to_string(),
        )
    };
    let metadata = |rows: usize| ModelInferenceMetadata {
        model_name: args.model.clone(),
        model_version: client.model_version().to_string(),
        architecture: architecture.clone(),
        input_shape: vec![rows as u32, client.feature_count()],
        output_shape: vec![rows as u32, client.output_count()],
        inference_device: device.clone(),
        batch_size_used: rows,
    };
    match result {
        Ok(p) => {
            let now = chrono::Utc::now();
            let total_ms = p.round_trip_ns as f32 / 1e6;
            let r: &Response = &p.response;
            let response = InferenceResponse {
                request_id: r.request_id.to_string(),
                predictions: p
                    .outputs()
                    .iter()
                    .map(|&value| Prediction {
                        value,
                        confidence: crate::server::confidence(value),
                        timestamp: now,
                        feature_contributions: None,
                    })
                    .collect(),
                model_metadata: metadata(1),
                performance_metrics: InferenceMetrics {
                    preprocessing_time_ms: Some(r.queue_ns as f32 / 1e6),
                    inference_time_ms: Some(r.compute_ns as f32 / 1e6),
                    postprocessing_time_ms: None,
                    total_time_ms: total_ms,
                    gpu_utilization: None,
                    memory_used_mb: None,
                    throughput_samples_per_sec: if total_ms > 0.0 { 1e3 / total_ms } else { 0.0 },
                    model_load_time_ms: None,
                },
                error: None,
            };
            println!("{}", serde_json::to_string_pretty(&response)?);
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => {
            let error = to_inference_error(&e, &args.model);
            eprintln!("error: {error}");
            Ok(ExitCode::FAILURE)
        }
    }
}

fn to_inference_error(e: &PredictError, model: &str) -> InferenceError {
    use tie_client::SubmitError;
    match e {
        PredictError::Submit(SubmitError::WrongFeatureCount { expected, got }) => {
            InferenceError::InvalidInputShape {
                expected: *expected as usize,
                actual: *got,
            }
        }
        PredictError::Submit(SubmitError::Disconnected) => InferenceError::Disconnected {
            message: e.to_string(),
        },
        PredictError::Submit(_) | PredictError::RequestsInFlight { .. } => {
            InferenceError::Rejected {
                message: e.to_string(),
            }
        }
        PredictError::Timeout { .. } => InferenceError::Timeout {
            message: e.to_string(),
        },
        PredictError::Server(s) => {
            InferenceError::from_server(s, model, || "it failed its last health check".into())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn negative_features_parse_with_or_without_equals() {
        for argv in [
            vec![
                "tie",
                "predict",
                "--model",
                "m",
                "--features",
                "-0.5,0.25,-3",
            ],
            vec!["tie", "predict", "--model", "m", "--features=-0.5,0.25,-3"],
        ] {
            let Command::Predict(p) = Cli::try_parse_from(argv).unwrap().command else {
                panic!("not predict");
            };
            assert_eq!(parse_features(&p.features).unwrap(), vec![-0.5, 0.25, -3.0]);
        }
        assert!(parse_features("1,x").is_err());
    }
}
