//! `tie replay`: the journal's recorded features run through a model version (built here, or
//! served by a running server), its answers compared with the recorded ones.
#![forbid(unsafe_code)]

use std::collections::VecDeque;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context};

use tie::config::ServiceConfig;
use tie::journal::compare::Divergence;
use tie::journal::read::{expand, for_each_row, summary, Filter, JournalRow};
use tie::models::{load_version, plan_model, LoadOptions};
use tie_client::{Client, ConnectOptions, Priority, Status, WaitStrategy};

/// `tie replay`.
#[derive(Debug, clap::Args)]
pub struct ReplayArgs {
    /// Journal files, or directories (the server's `[journal] dir`).
    #[arg(required = true)]
    pub paths: Vec<PathBuf>,
    /// The model version to replay through: `name:version`, or `name` for the repository's
    /// default version (the server's, with `--endpoint`).
    #[arg(long)]
    pub model: String,
    /// Which journaled rows: `name` or `name:version` (default: every version of the
    /// replayed model's name). Rows that did not run, or were journaled without features,
    /// are skipped (counted).
    #[arg(long)]
    pub from: Option<String>,
    #[command(flatten)]
    pub times: super::journal::TimeRange,
    /// Service config (TOML) for the build: layouts directory, GPUs, batching.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Model repository (overrides the config's `server.model_repository`).
    #[arg(long)]
    pub model_repository: Option<PathBuf>,
    /// Replay against this running server's endpoint instead of building the model here.
    #[arg(long)]
    pub endpoint: Option<String>,
    /// The server's socket directory (with `--endpoint`).
    #[arg(long)]
    pub socket_dir: Option<PathBuf>,
    /// An output within `tolerance × max(1, |recorded|)` of the recorded one counts as within
    /// tolerance; beyond, as different.
    #[arg(long, default_value_t = 1e-6)]
    pub tolerance: f64,
    /// Exit with status 3 when the share of different rows is above this (0: any); an
    /// error exits with 1.
    #[arg(long, default_value_t = 0.0)]
    pub max_different_share: f64,
    /// Rows listed among those that differ most.
    #[arg(long, default_value_t = 10)]
    pub top: usize,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
}

/// `name` or `name:version`.
fn model_key(key: &str) -> anyhow::Result<(String, Option<u32>)> {
    match key.rsplit_once(':') {
        None => Ok((key.to_string(), None)),
        Some((name, v)) => Ok((
            name.to_string(),
            Some(
                v.parse()
                    .with_context(|| format!("{key}: the version must be a number"))?,
            ),
        )),
    }
}

/// Replays rows through a model version and compares.
trait Replayer {
    /// The version replayed through, as `name:version`.
    fn key(&self) -> String;
    /// Outputs per row.
    fn output_width(&self) -> usize;
    /// Features per row.
    fn input_width(&self) -> usize;
    /// Runs `rows` (each with features) and calls `each` with each row and its outputs, in
    /// order.
    fn run(
        &mut self,
        rows: &[JournalRow],
        each: &mut dyn FnMut(&JournalRow, &[f32]),
    ) -> anyhow::Result<()>;
}

/// The model built in this process.
struct InProcess {
    model: tie::models::LoadedModel,
    input: Vec<f32>,
    output: Vec<f32>,
}

impl Replayer for InProcess {
    fn key(&self) -> String {
        self.model.key()
    }
    fn output_width(&self) -> usize {
        self.model.output_width()
    }
    fn input_width(&self) -> usize {
        self.model.input_width()
    }
    fn run(
        &mut self,
        rows: &[JournalRow],
        each: &mut dyn FnMut(&JournalRow, &[f32]),
    ) -> anyhow::Result<()> {
        let (iw, ow) = (self.input_width(), self.output_width());
        for batch in rows.chunks(self.model.batch.largest_batch().max(1)) {
            self.input.clear();
            for r in batch {
                self.input
                    .extend_from_slice(r.features.as_deref().unwrap_or_default());
            }
            self.output.resize(batch.len() * ow, 0.0);
            self.model
                .backend
                .run_batch(&self.input, batch.len(), &mut self.output)
                .with_context(|| format!("{} failed a batch", self.key()))?;
            debug_assert_eq!(self.input.len(), batch.len() * iw);
            for (i, r) in batch.iter().enumerate() {
                each(r, &self.output[i * ow..(i + 1) * ow]);
            }
        }
        Ok(())
    }
}

/// A running server, through the shared-memory client.
struct Served {
    client: Client,
    name: String,
}

impl Replayer for Served {
    fn key(&self) -> String {
        format!("{}:{}", self.name, self.client.model_version())
    }
    fn output_width(&self) -> usize {
        self.client.output_count() as usize
    }
    fn input_width(&self) -> usize {
        self.client.feature_count() as usize
    }
    fn run(
        &mut self,
        rows: &[JournalRow],
        each: &mut dyn FnMut(&JournalRow, &[f32]),
    ) -> anyhow::Result<()> {
        let mut sent = VecDeque::new();
        let mut next = 0;
        while next < rows.len() || !sent.is_empty() {
            while next < rows.len() && sent.len() < 32 {
                let features = rows[next].features.as_deref().unwrap_or_default();
                let id = self
                    .client
                    .submit(features, Priority::Low, None)
                    .map_err(|e| anyhow::anyhow!("submit: {e}"))?;
                sent.push_back((id, next));
                next += 1;
            }
            let started = std::time::Instant::now();
            let Some(r) = self.client.poll_within(started) else {
                bail!("{} did not answer in time", self.key());
            };
            let (id, i) = sent.pop_front().expect("an answer per request");
            if r.request_id != id {
                bail!("answers out of order");
            }
            if r.status != Status::OK {
                bail!(
                    "{} answered request {} with {:?}",
                    self.key(),
                    rows[i].request_id,
                    r.status.name()
                );
            }
            each(&rows[i], r.outputs());
        }
        Ok(())
    }
}

fn replayer(args: &ReplayArgs) -> anyhow::Result<Box<dyn Replayer>> {
    let (name, version) = model_key(&args.model)?;
    if let Some(endpoint) = &args.endpoint {
        let options = ConnectOptions {
            version,
            socket_dir: args.socket_dir.clone(),
            timeout: Duration::from_secs(10),
            wait: WaitStrategy::SpinThenYield {
                spin: Duration::from_micros(50),
            },
            request_capacity: 64,
            response_capacity: 64,
            ..ConnectOptions::default()
        };
        let client = Client::connect(endpoint, &name, options)
            .with_context(|| format!("connect to {endpoint} for {}", args.model))?;
        return Ok(Box::new(Served { client, name }));
    }
    let mut config = ServiceConfig::load(args.config.as_deref())?;
    if let Some(r) = &args.model_repository {
        config.server.model_repository = r.clone();
    }
    let plan = plan_model(&config.server.model_repository, &name)?;
    let version = version.unwrap_or(plan.default_version);
    let options = LoadOptions {
        profile_iterations: 0,
        journal: true,
        ..LoadOptions::from_config(&config)
    };
    let model = load_version(&plan, version, &options)?;
    Ok(Box::new(InProcess {
        model,
        input: Vec::new(),
        output: Vec::new(),
    }))
}

pub(super) fn replay(args: ReplayArgs) -> anyhow::Result<ExitCode> {
    let (from_name, from_version) = model_key(args.from.as_deref().unwrap_or(&args.model))?;
    let (since_ns, until_ns) = args.times.ns()?;
    let filter = Filter {
        model: Some(from_name),
        version: if args.from.is_some() {
            from_version
        } else {
            None
        },
        since_ns,
        until_ns,
        request_id: None,
    };
    let files = expand(&args.paths)?;
    if files.is_empty() {
        bail!("no journal files in {:?}", args.paths);
    }
    let mut target = replayer(&args)?;
    let (iw, ow) = (target.input_width(), target.output_width());
    let mut divergence = Divergence::new(args.tolerance, args.top);
    let (mut skipped, mut mismatched, mut files_read) = (0u64, 0u64, 0usize);
    let mut pending = Vec::new();
    let mut failed = None;
    for f in &files {
        if !filter.may_keep(&summary(f)?) {
            continue;
        }
        files_read += 1;
        for_each_row(f, &filter, &mut |row| {
            let (Some(features), Some(outputs)) = (&row.features, &row.outputs) else {
                skipped += 1;
                return;
            };
            if row.status != "Ok" {
                skipped += 1;
            } else if features.len() != iw || outputs.len() != ow {
                mismatched += 1;
            } else {
                pending.push(row);
            }
        })?;
        // A file's rows at a time: memory stays bounded by the largest file.
        if let Err(e) = target.run(&pending, &mut |row, out| {
            divergence.add(row.outputs.as_deref().unwrap_or_default(), out, || {
                (row.request_id, row.session_id, row.time.clone())
            });
        }) {
            failed = Some(e);
            break;
        }
        pending.clear();
    }
    if let Some(e) = failed {
        return Err(e);
    }
    // Nothing compared is no evidence: a gate must not pass on it.
    if mismatched > 0 {
        bail!(
            "{mismatched} journaled rows do not fit {} ({iw} features, {ow} outputs): replay them through a version that reads the same",
            target.key()
        );
    }
    if divergence.rows == 0 {
        bail!(
            "no journaled row to compare ({skipped} skipped: not run, or without features); check --from and the time range"
        );
    }
    let report = serde_json::json!({
        "model": target.key(),
        "files": files_read,
        "skipped": skipped,
        "divergence": divergence,
    });
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        let d = &divergence;
        println!(
            "replayed {} rows of {} file(s) through {} ({} skipped: not run, or without features)",
            d.rows,
            files_read,
            target.key(),
            skipped
        );
        println!(
            "identical {}, within tolerance {} ({:e}), different {} ({:.4}%)",
            d.identical,
            d.within_tolerance,
            d.tolerance,
            d.different,
            100.0 * d.different_share()
        );
        for (i, o) in d.outputs.iter().enumerate() {
            println!(
                "output {i}: max |diff| {:.6e}, mean |diff| {:.6e}, over tolerance {}, same sign {}",
                o.max_abs_diff, o.mean_abs_diff, o.over_tolerance, o.same_sign
            );
        }
        for w in &d.worst {
            println!(
                "  request {} (session {}, {}): |diff| {:.6e}, recorded {:?}, now {:?}",
                w.request_id, w.session_id, w.time, w.max_abs_diff, w.recorded, w.replayed
            );
        }
    }
    Ok(if divergence.different_share() > args.max_different_share {
        ExitCode::from(3)
    } else {
        ExitCode::SUCCESS
    })
}
