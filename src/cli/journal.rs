//! `tie journal`: the journal's files (time range, rows, models) and their rows as JSON lines.
#![forbid(unsafe_code)]

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;

use tie::journal::read::{expand, for_each_row, summary, Filter};

/// `tie journal`.
#[derive(Debug, clap::Args)]
pub struct JournalArgs {
    /// Journal files, or directories (the server's `[journal] dir`): their closed files.
    #[arg(required = true)]
    pub paths: Vec<PathBuf>,
    /// Print the rows, one JSON object per line, instead of the list of files (implied by
    /// any filter).
    #[arg(long)]
    pub rows: bool,
    /// Only rows of this model.
    #[arg(long)]
    pub model: Option<String>,
    /// Only rows of this version.
    #[arg(long)]
    pub version: Option<u32>,
    #[command(flatten)]
    pub times: TimeRange,
    /// Only the answer to this request id.
    #[arg(long)]
    pub request_id: Option<u64>,
}

/// The journal commands' time range.
#[derive(Debug, clap::Args)]
pub struct TimeRange {
    /// Only answers at or after this time (RFC 3339, e.g. 2026-12-04T14:30:00Z).
    #[arg(long)]
    pub since: Option<String>,
    /// Only answers before this time (RFC 3339).
    #[arg(long)]
    pub until: Option<String>,
}

impl TimeRange {
    /// Whether either end is given.
    pub fn is_set(&self) -> bool {
        self.since.is_some() || self.until.is_some()
    }

    /// `since` and `until` in nanoseconds since the epoch.
    pub fn ns(&self) -> anyhow::Result<(Option<i64>, Option<i64>)> {
        let ns = |flag: &str, t: &Option<String>| {
            t.as_deref()
                .map(|t| {
                    chrono::DateTime::parse_from_rfc3339(t)
                        .ok()
                        .and_then(|t| t.timestamp_nanos_opt())
                        .with_context(|| {
                            format!("--{flag} {t}: not an RFC 3339 time (2026-12-04T14:30:00Z)")
                        })
                })
                .transpose()
        };
        Ok((ns("since", &self.since)?, ns("until", &self.until)?))
    }
}

pub(super) fn journal(args: JournalArgs) -> anyhow::Result<ExitCode> {
    let (since_ns, until_ns) = args.times.ns()?;
    let filter = Filter {
        model: args.model.clone(),
        version: args.version,
        since_ns,
        until_ns,
        request_id: args.request_id,
    };
    let rows = args.rows
        || args.model.is_some()
        || args.version.is_some()
        || args.times.is_set()
        || args.request_id.is_some();
    let files = expand(&args.paths)?;
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    if !rows {
        let (mut total, mut n) = (0i64, 0usize);
        for f in &files {
            let s = summary(f)?;
            total = total.saturating_add(s.rows);
            n += 1;
            writeln!(
                out,
                "{}  {} rows  {} .. {}  {}",
                s.file.display(),
                s.rows,
                s.first.as_deref().unwrap_or("?"),
                s.last.as_deref().unwrap_or("?"),
                s.models.join(",")
            )?;
        }
        writeln!(out, "{n} files, {total} rows")?;
        out.flush()?;
        return Ok(ExitCode::SUCCESS);
    }
    for f in &files {
        if !filter.may_keep(&summary(f)?) {
            continue;
        }
        let mut failed = None;
        for_each_row(f, &filter, &mut |row| {
            if failed.is_none() {
                if let Err(e) = serde_json::to_writer(&mut out, &row)
                    .map_err(std::io::Error::from)
                    .and_then(|()| out.write_all(b"\n"))
                {
                    failed = Some(e);
                }
            }
        })?;
        if let Some(e) = failed {
            // A closed pipe (`| head`) ends the listing quietly.
            if e.kind() == std::io::ErrorKind::BrokenPipe {
                return Ok(ExitCode::SUCCESS);
            }
            return Err(e.into());
        }
    }
    match out.flush() {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(ExitCode::SUCCESS),
        r => Ok(r.map(|()| ExitCode::SUCCESS)?),
    }
}
