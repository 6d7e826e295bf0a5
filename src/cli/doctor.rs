//! `tie doctor`: this host checked against the deployment guide.

use std::path::PathBuf;
use std::process::ExitCode;

/// `tie doctor`.
#[derive(Debug, clap::Args)]
pub struct DoctorArgs {
    /// Service config (TOML): the poller cores and GPUs to check.
    #[arg(long, env = "TIE_CONFIG")]
    pub config: Option<PathBuf>,
    /// Print the checks as JSON.
    #[arg(long)]
    pub json: bool,
    /// Exit non-zero when a check warns, not only when one fails.
    #[arg(long)]
    pub strict: bool,
}

/// Runs every check, an invalid config included (reported as a failed check, the host then
/// checked against what could be read of it). Exit status 1 when a check failed, or with
/// `--strict` warned.
pub(super) fn doctor(args: DoctorArgs) -> anyhow::Result<ExitCode> {
    use super::host_checks::Verdict;
    let (config_check, config, read) = super::host_checks::config_check(args.config.as_deref());
    let mut checks = vec![config_check];
    checks.extend(super::host_checks::run(&config));
    checks.push(super::host_checks::model_repository(
        read.then_some(&config),
    ));
    if args.json {
        println!("{}", serde_json::to_string_pretty(&checks)?);
    } else {
        for c in &checks {
            let verdict = match c.verdict {
                super::host_checks::Verdict::Ok => "ok",
                super::host_checks::Verdict::Warn => "WARN",
                super::host_checks::Verdict::Unknown => "??",
                super::host_checks::Verdict::Fail => "FAIL",
            };
            println!("{verdict:<5} {:<30} {}", c.name, c.value);
            if !c.fix.is_empty() {
                println!("      fix: {}", c.fix);
            }
        }
    }
    let failed = checks
        .iter()
        .any(|c| c.verdict == Verdict::Fail || (args.strict && c.verdict == Verdict::Warn));
    Ok(if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}
