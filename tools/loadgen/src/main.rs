//! `tie-loadgen`: open-loop (or closed-loop) load from client processes against a running tie
//! server, with latency histograms free of coordinated omission. See the `tie_loadgen` library.

use std::io::IsTerminal as _;
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
    Run {
        #[command(flatten)]
        load: Load,
        /// Requests per second, all workers together (open loop).
        #[arg(
            long,
            conflicts_with = "concurrency",
            required_unless_present = "concurrency"
        )]
        rate: Option<f64>,
        /// Requests in flight per worker (closed loop).
        #[arg(long)]
        concurrency: Option<u32>,
    },
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

/// When to print progress.
#[derive(Clone, Copy, Debug, clap::ValueEnum)]
enum Progress {
    /// When stderr is a terminal.
    Auto,
    /// Always.
    Always,
    /// Never.
    Never,
}

/// What `run` and `sweep` share.
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
    /// Worker processes.
    #[arg(long, default_value_t = 1)]
    workers: usize,
    /// Cores to pin the workers to, in turn (e.g. 4,5,6); a core the process may not run on
    /// is an error.
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
    /// Feature rows to send in turn: a CSV file, one row per line, an optional header line of
    /// names; default: random rows.
    #[arg(long)]
    features: Option<PathBuf>,
    /// Output directory (interval logs, summary.json).
    #[arg(long, default_value = "loadgen-out")]
    out: PathBuf,
    /// Seed of the random rows.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Progress (elapsed, rate, p99 so far) on stderr once a second.
    #[arg(long, value_enum, default_value = "auto")]
    progress: Progress,
    /// Sessions to the model that this process holds open and silent through the run (or
    /// every rate of a sweep): the workers' sessions are then served among that many others.
    #[arg(long, default_value_t = 0)]
    idle_sessions: usize,
    /// Ring slots of each worker's session (default: 2 s of its rate, or its concurrency);
    /// fewer make sends wait for answers, still timed from their schedule.
    #[arg(long, hide = true)]
    capacity: Option<u32>,
}

impl Load {
    /// The idle sessions asked for, connected (none: `None`).
    fn idle(&self, spec: &RunSpec) -> anyhow::Result<Option<loadgen::IdleSessions>> {
        if self.idle_sessions == 0 {
            return Ok(None);
        }
        let idle = loadgen::IdleSessions::connect(&spec.worker, self.idle_sessions)?;
        eprintln!("tie-loadgen: {} idle sessions connected", idle.len());
        Ok(Some(idle))
    }

    /// The spec of a run at `rate` (open loop) or `concurrency` (closed loop).
    fn spec(&self, rate: Option<f64>, concurrency: Option<u32>) -> anyhow::Result<RunSpec> {
        anyhow::ensure!(self.workers >= 1, "--workers must be at least 1");
        anyhow::ensure!(concurrency != Some(0), "--concurrency must be at least 1");
        anyhow::ensure!(rate.is_none_or(|r| r > 0.0), "--rate must be positive");
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
                concurrency: concurrency.unwrap_or(1),
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
            total_rate: rate,
            progress: match self.progress {
                Progress::Auto => std::io::stderr().is_terminal(),
                Progress::Always => true,
                Progress::Never => false,
            },
        })
    }
}

/// Exit status of a run that ran but failed requests or fell short of its rate, and of a
/// sweep that sustained no rate.
const FELL_SHORT: u8 = 3;

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
        Command::Run {
            load,
            rate,
            concurrency,
        } => {
            let spec = load.spec(rate, concurrency)?;
            let _idle = load.idle(&spec)?;
            let s = loadgen::run(&exe, &spec)?;
            let mut line = String::new();
            loadgen::report::write_summary(&mut line, "run", &s);
            print!("{line}");
            println!("{}", load.out.join("summary.json").display());
            let shortfalls = loadgen::shortfalls(&s);
            if !shortfalls.is_empty() {
                eprintln!("tie-loadgen: {}", shortfalls.join("; "));
                return Ok(ExitCode::from(FELL_SHORT));
            }
        }
        Command::Sweep {
            load,
            rates,
            p99_bound_us,
        } => {
            let spec = load.spec(Some(1.0), None)?;
            let _idle = load.idle(&spec)?;
            let report = loadgen::sweep(&exe, &spec, &rates, p99_bound_us)?;
            let mut text = String::new();
            loadgen::report::write_sweep(&mut text, "sweep", &report);
            print!("{text}");
            println!("{}", load.out.join("sweep.json").display());
            if report.knee_rps.is_none() {
                eprintln!("tie-loadgen: no rate kept p99 <= {p99_bound_us} µs");
                return Ok(ExitCode::from(FELL_SHORT));
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
