//! `tie-loadgen`: open-loop (or closed-loop) load from client processes against a running tie
//! server, with latency histograms free of coordinated omission. See the `tie_loadgen` library.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use tie_loadgen::{self as loadgen, RunSpec, WorkerSpec};

/// Load generator for tie.
#[derive(Debug, Parser)]
#[command(name = "tie-loadgen", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// One run at a fixed rate (open loop) or concurrency (closed loop).
    Run(Load),
    /// Open-loop runs at rising rates until p99 crosses a bound: the highest sustained rate.
    Sweep {
        #[command(flatten)]
        load: Load,
        /// Rates to try, in order (requests per second, all workers together).
        #[arg(long, value_delimiter = ',', required = true)]
        rates: Vec<f64>,
        /// The p99 bound, µs.
        #[arg(long)]
        p99_bound_us: f64,
    },
    /// (internal) One worker process; its spec comes in TIE_LOADGEN_WORKER.
    #[command(hide = true)]
    Worker,
}

#[derive(Clone, Debug, clap::Args)]
struct Load {
    /// Server endpoint.
    #[arg(long, default_value = "tie")]
    endpoint: String,
    /// Socket directory (default: $TIE_SOCKET_DIR, else $XDG_RUNTIME_DIR/tie then /run/tie).
    #[arg(long)]
    socket_dir: Option<PathBuf>,
    /// Model.
    #[arg(long)]
    model: String,
    /// Model version (default: the server's default).
    #[arg(long)]
    version: Option<u32>,
    /// Requests per second, all workers together (open loop).
    #[arg(long, conflicts_with = "concurrency")]
    rate: Option<f64>,
    /// Requests in flight per worker (closed loop).
    #[arg(long)]
    concurrency: Option<u32>,
    /// Worker processes.
    #[arg(long, default_value_t = 1)]
    workers: usize,
    /// Cores to pin the workers to, in turn (e.g. 4,5,6).
    #[arg(long, value_delimiter = ',')]
    cores: Vec<usize>,
    /// Seconds of load.
    #[arg(long, default_value_t = 10.0)]
    duration: f64,
    /// Seconds at the start not recorded.
    #[arg(long, default_value_t = 1.0)]
    warmup: f64,
    /// Weights of the priorities Low,Normal,High,Critical (e.g. 1,8,1,0).
    #[arg(long, value_delimiter = ',', default_value = "0,1,0,0")]
    priorities: Vec<u32>,
    /// Deadline of each request after its scheduled send, µs.
    #[arg(long)]
    deadline_us: Option<u64>,
    /// Feature rows to send in turn (CSV, one row per line); default: random rows.
    #[arg(long)]
    features: Option<PathBuf>,
    /// Output directory (interval logs, summary.json).
    #[arg(long, default_value = "loadgen-out")]
    out: PathBuf,
    /// Seed of the random rows.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Ring slots of each worker's session (default: 2 s of its rate, or its concurrency);
    /// fewer make sends wait for answers, still timed from their schedule.
    #[arg(long, hide = true)]
    capacity: Option<u32>,
}

impl Load {
    fn spec(&self) -> anyhow::Result<RunSpec> {
        anyhow::ensure!(
            self.rate.is_some() != self.concurrency.is_some(),
            "give --rate (open loop) or --concurrency (closed loop)"
        );
        anyhow::ensure!(self.workers >= 1, "--workers must be at least 1");
        anyhow::ensure!(
            self.concurrency != Some(0),
            "--concurrency must be at least 1"
        );
        anyhow::ensure!(self.rate.is_none_or(|r| r > 0.0), "--rate must be positive");
        anyhow::ensure!(
            self.duration > self.warmup,
            "--duration must exceed --warmup"
        );
        let priorities: [u32; 4] = self.priorities.clone().try_into().map_err(|_| {
            anyhow::anyhow!("--priorities takes 4 weights: Low,Normal,High,Critical")
        })?;
        Ok(RunSpec {
            worker: WorkerSpec {
                index: 0,
                endpoint: self.endpoint.clone(),
                socket_dir: self.socket_dir.clone(),
                model: self.model.clone(),
                version: self.version,
                rate: None,
                concurrency: self.concurrency.unwrap_or(1),
                start_ns: 0,
                duration_s: self.duration,
                warmup_s: self.warmup,
                core: None,
                priorities,
                deadline_us: self.deadline_us,
                features_file: self.features.clone(),
                out_dir: self.out.clone(),
                seed: self.seed,
                capacity: self.capacity,
            },
            workers: self.workers,
            cores: self.cores.clone(),
            total_rate: self.rate,
        })
    }
}

fn main() -> ExitCode {
    match run() {
        Ok(code) => code,
        Err(e) => {
            eprintln!("tie-loadgen: {}", tie_client::each_cause_once(e.as_ref()));
            ExitCode::FAILURE
        }
    }
}

fn run() -> anyhow::Result<ExitCode> {
    let exe = std::env::current_exe()?;
    match Cli::parse().command {
        Command::Worker => {
            let spec: WorkerSpec = serde_json::from_str(&std::env::var("TIE_LOADGEN_WORKER")?)?;
            let result = loadgen::run_worker(&spec)?;
            println!("{}", serde_json::to_string(&result)?);
        }
        Command::Run(load) => {
            let s = loadgen::run(&exe, &load.spec()?)?;
            println!(
                "{} {} workers: offered {:.0}/s, sent {:.0}/s, achieved {:.0}/s; p50 {:.2} p90 {:.2} p99 {:.2} p99.9 {:.2} p99.99 {:.2} max {:.2} µs; errors {:?}, unsent {}, unanswered {}; send lag p99 {:.2} max {:.2} µs",
                s.mode, s.workers, s.offered_rps, s.sent_rps, s.achieved_rps, s.p50_us, s.p90_us,
                s.p99_us, s.p99_9_us, s.p99_99_us, s.max_us, s.errors, s.unsent, s.unanswered,
                s.send_lag_p99_us, s.max_send_lag_us
            );
            println!("{}", load.out.join("summary.json").display());
        }
        Command::Sweep {
            load,
            rates,
            p99_bound_us,
        } => {
            anyhow::ensure!(
                load.concurrency.is_none(),
                "a sweep is open loop: no --concurrency"
            );
            let mut spec = load.spec_open()?;
            spec.total_rate = None;
            let report = loadgen::sweep(&exe, &spec, &rates, p99_bound_us)?;
            for p in &report.points {
                println!(
                    "offered {:>10.0}/s achieved {:>10.0}/s p50 {:>9.2} p99 {:>9.2} p99.9 {:>9.2} µs failures {:>6} {}",
                    p.offered_rps, p.achieved_rps, p.p50_us, p.p99_us, p.p99_9_us, p.failures,
                    if p.sustained { "ok" } else { "NOT sustained" }
                );
            }
            match report.knee_rps {
                Some(r) if report.crossed => {
                    println!("highest rate with p99 <= {p99_bound_us} µs: {r:.0}/s")
                }
                Some(r) => {
                    println!("every rate kept p99 <= {p99_bound_us} µs: the knee is above {r:.0}/s")
                }
                None => println!("no rate kept p99 <= {p99_bound_us} µs"),
            }
            println!("{}", load.out.join("sweep.json").display());
        }
    }
    Ok(ExitCode::SUCCESS)
}

impl Load {
    /// The spec of a sweep's runs (their rates come from the sweep).
    fn spec_open(&self) -> anyhow::Result<RunSpec> {
        Load {
            rate: Some(1.0),
            concurrency: None,
            ..self.clone()
        }
        .spec()
    }
}
