//! `tie report`: percentile tables, summaries and sweeps, and the chart.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;

/// `tie report`.
#[derive(Debug, clap::Args)]
pub struct ReportArgs {
    /// `.hlog` files (the server's `[monitoring] hlog_dir`, tie-loadgen's, or any HdrHistogram
    /// interval log), and tie-loadgen's `summary.json` and `sweep.json` files. A log with no
    /// interval yet (an idle model's) is skipped with a note; none with one is an error.
    #[arg(required = true)]
    pub files: Vec<PathBuf>,
    /// Values in the logs are in this unit per microsecond (1000 for nanoseconds).
    #[arg(long, default_value_t = 1000.0)]
    pub units_per_us: f64,
    /// Print only the percentile table, not the distribution.
    #[arg(long)]
    pub summary: bool,
    /// Add the logs up and report them as one (the workers of one tie-loadgen run: the
    /// figures are then those of its `summary.json`).
    #[arg(long)]
    pub merge: bool,
    /// Draw the latency percentile distributions (and the sweeps' latency against
    /// throughput) into this PNG.
    #[arg(long)]
    pub chart: Option<PathBuf>,
}

pub(super) fn report(args: ReportArgs) -> anyhow::Result<ExitCode> {
    let mut out = String::new();
    let mut logs = Vec::new();
    let mut sweeps = Vec::new();
    let mut skipped = 0;
    for file in &args.files {
        let text =
            std::fs::read(file).with_context(|| format!("cannot read {}", file.display()))?;
        let name = file.display().to_string();
        if file.extension().is_some_and(|e| e == "json") {
            // A tie-loadgen summary or sweep.
            if let Ok(sweep) = serde_json::from_slice::<tie_loadgen::report::Sweep>(&text) {
                tie_loadgen::report::write_sweep(&mut out, &name, &sweep);
                sweeps.push((name, sweep));
            } else {
                let summary: tie_loadgen::Summary =
                    serde_json::from_slice(&text).with_context(|| {
                        format!("{name} is neither a tie-loadgen summary nor a sweep")
                    })?;
                tie_loadgen::report::write_summary(&mut out, &name, &summary);
            }
            continue;
        }
        let log = match tie_hlog::read_hlog(&text) {
            Ok(log) => log,
            // The server writes a log for every model, idle ones too: its header, no interval.
            Err(tie_hlog::HlogReadError::Empty) if text.starts_with(b"#") => {
                eprintln!("note: {name}: no interval in the log (nothing recorded yet): skipped");
                skipped += 1;
                continue;
            }
            Err(e) => {
                return Err(anyhow::Error::new(e)
                    .context(format!("{name} is not an HdrHistogram interval log")))
            }
        };
        if !args.merge {
            tie_loadgen::report::write_report(
                &mut out,
                &name,
                &log,
                args.units_per_us,
                !args.summary,
            );
        }
        logs.push((name, log));
    }
    if skipped == args.files.len() {
        anyhow::bail!("nothing to report: no log has an interval");
    }
    if args.merge && !logs.is_empty() {
        let mut merged = tie_hlog::HlogSummary::default();
        for (name, log) in &logs {
            merged
                .merge(log)
                .with_context(|| format!("cannot add {name} to the others"))?;
        }
        let name = format!("{} logs added up", logs.len());
        tie_loadgen::report::write_report(
            &mut out,
            &name,
            &merged,
            args.units_per_us,
            !args.summary,
        );
        logs = vec![(name, merged)];
    }
    print!("{out}");
    if let Some(chart) = &args.chart {
        tie_loadgen::report::draw_chart(chart, &logs, &sweeps, args.units_per_us)?;
        println!("chart: {}", chart.display());
    }
    Ok(ExitCode::SUCCESS)
}
