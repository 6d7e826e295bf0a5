//! `tie doctor`: this host checked against the deployment guide.

use std::path::PathBuf;
use std::process::ExitCode;

use tie::config::ServiceConfig;

/// `tie doctor`.
#[derive(Debug, clap::Args)]
pub struct DoctorArgs {
    /// Service config (TOML): the poller cores and GPUs to check.
    #[arg(long, env = "TIE_CONFIG")]
    pub config: Option<PathBuf>,
    /// Print the checks as JSON.
    #[arg(long)]
    pub json: bool,
}

pub(super) fn doctor(args: DoctorArgs) -> anyhow::Result<ExitCode> {
    let config = ServiceConfig::load(args.config.as_deref())?;
    let checks = super::host_checks::run(&config);
    if args.json {
        println!("{}", serde_json::to_string_pretty(&checks)?);
    } else {
        for c in &checks {
            let verdict = match c.verdict {
                super::host_checks::Verdict::Ok => "ok",
                super::host_checks::Verdict::Warn => "WARN",
                super::host_checks::Verdict::Unknown => "??",
            };
            println!("{verdict:<5} {:<30} {}", c.name, c.value);
            if !c.fix.is_empty() {
                println!("      fix: {}", c.fix);
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
