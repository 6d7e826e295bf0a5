//! The `tie` command line: `tie serve`, `tie predict`, `tie report`, `tie journal`,
//! `tie replay`, `tie devices` and `tie doctor`.
#![forbid(unsafe_code)]

mod control;
mod devices;
mod doctor;
mod host_checks;
mod journal;
mod predict;
mod replay;
mod report;
mod serve;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

use control::*;
use devices::*;
use doctor::*;
use journal::*;
use predict::*;
use replay::*;
use report::*;
use serve::*;

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
    /// List the prediction journal's files (time range, rows, models), or print their rows
    /// as JSON lines (filtered by model, version, time, request id).
    Journal(JournalArgs),
    /// Run the journal's recorded features through a model version (built here, or on a
    /// running server) and compare with the recorded answers: identical, within tolerance,
    /// different, per output, and the rows that differ most. Exits with 3 when the share of
    /// different rows is over `--max-different-share`.
    Replay(ReplayArgs),
    /// Reload models from the repository on a running server (through its HTTP control
    /// plane): new versions are built and warmed before sessions switch; a failure changes
    /// nothing. Prints what changed as JSON.
    Reload(ReloadArgs),
    /// Unload a model version (`name:version`) or every version of a model (`name`) on a
    /// running server.
    Unload(UnloadArgs),
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
        Command::Journal(args) => journal(args),
        Command::Replay(args) => replay(args),
    }
}
