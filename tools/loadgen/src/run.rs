//! Worker processes, runs and sweeps (see the crate's overview).

use std::collections::{BTreeMap, VecDeque};
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context as _;
use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};
use tie_client::{monotonic_ns, Client, ConnectOptions, Priority, Status, SubmitError};

/// Largest latency recorded (60 s); larger ones are recorded as this.
const MAX_NS: u64 = 60_000_000_000;

/// What one worker process does.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct WorkerSpec {
    /// Its index (for its log file and core).
    pub index: usize,
    /// Server endpoint.
    pub endpoint: String,
    /// Socket directory (`None`: the client's default).
    pub socket_dir: Option<PathBuf>,
    /// Model.
    pub model: String,
    /// Version (`None`: the server's default).
    pub version: Option<u32>,
    /// Requests per second of this worker (open loop), or `None` for the closed loop.
    pub rate: Option<f64>,
    /// Requests in flight (closed loop).
    pub concurrency: u32,
    /// CLOCK_MONOTONIC ns at which every worker starts.
    pub start_ns: u64,
    /// Seconds of load.
    pub duration_s: f64,
    /// Seconds at the start whose answers are not recorded.
    pub warmup_s: f64,
    /// Core to pin to.
    pub core: Option<usize>,
    /// Weights of Low, Normal, High, Critical.
    pub priorities: [u32; 4],
    /// Deadline after the scheduled send time, µs (`None`: none).
    pub deadline_us: Option<u64>,
    /// Feature rows sent in turn (`None`: random rows of the model's width).
    pub features_file: Option<PathBuf>,
    /// Directory of the interval log.
    pub out_dir: PathBuf,
    /// Seed of the random rows.
    pub seed: u64,
    /// Ring slots of the session (`None`: room for 2 s of the rate, or the concurrency).
    pub capacity: Option<u32>,
}

/// What a worker reports.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct WorkerResult {
    /// Base64 of the V2-deflate latency histogram: every request scheduled after the warm-up,
    /// answered or not (see [`Summary`]).
    pub histogram: String,
    /// Base64 of the histogram of send lags: how late past its schedule each request went out.
    pub send_lag: String,
    /// Requests sent (all of them: in the warm-up, the load window, and late ones after it).
    pub sent: u64,
    /// Requests scheduled after the warm-up and sent by the end of the load (the send rate's).
    pub sent_in_window: u64,
    /// Answers (of any status) to requests scheduled in the warm-up: not recorded.
    pub warmup: u64,
    /// Predictions after the warm-up.
    pub ok: u64,
    /// Predictions read within the load window (after the warm-up, before the end).
    pub ok_in_window: u64,
    /// Error answers after the warm-up, by status name.
    pub errors: BTreeMap<String, u64>,
    /// Requests never sent (the session full, or the server gone, until the end).
    pub unsent: u64,
    /// Requests sent and never answered (5 s after the end, or the server gone).
    pub unanswered: u64,
    /// The server went away during the run.
    pub disconnected: bool,
    /// Seconds from the first schedule to the last answer.
    pub elapsed_s: f64,
}

/// Percentiles and counts of a run, as `summary.json` holds them (a field a summary written by
/// an earlier version lacks reads as its default).
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct Summary {
    /// `open` or `closed`.
    pub mode: String,
    /// Model.
    pub model: String,
    /// Worker processes.
    pub workers: usize,
    /// Requests per second asked for (open loop; absent in the closed loop, which offers no
    /// rate).
    pub offered_rps: Option<f64>,
    /// Requests sent per second of load: those scheduled after the warm-up and sent by the
    /// end, over the time after the warm-up (comparable with `achieved_rps`).
    pub sent_rps: f64,
    /// Predictions read per second within the load window (after the warm-up, before the
    /// end): a backlog drained after the end does not count.
    pub achieved_rps: f64,
    /// Seconds of load.
    pub duration_s: f64,
    /// Latencies recorded: every request scheduled after the warm-up, answered (prediction or
    /// error) from its schedule to its answer, unanswered or unsent as from its schedule to
    /// when the run gave up on it (a lower bound).
    pub count: u64,
    /// Median (µs).
    pub p50_us: f64,
    /// 90th percentile (µs).
    pub p90_us: f64,
    /// 99th percentile (µs).
    pub p99_us: f64,
    /// 99.9th percentile (µs).
    pub p99_9_us: f64,
    /// 99.99th percentile (µs).
    pub p99_99_us: f64,
    /// Largest (µs).
    pub max_us: f64,
    /// Mean (µs).
    pub mean_us: f64,
    /// Requests sent, every one accounted for: `sent = warmup + ok + Σ errors + unanswered`
    /// ([`Summary::failures`] are the last two and `unsent`).
    pub sent: u64,
    /// Answers (of any status) to requests scheduled in the warm-up: not recorded.
    pub warmup: u64,
    /// Predictions to requests scheduled after the warm-up (`ok_in_window` +
    /// `ok_after_window`).
    pub ok: u64,
    /// Predictions read within the load window (what `achieved_rps` counts).
    pub ok_in_window: u64,
    /// Predictions read after the load window (a backlog drained at the end).
    pub ok_after_window: u64,
    /// Error answers to requests scheduled after the warm-up, by kind.
    pub errors: BTreeMap<String, u64>,
    /// Requests never sent (see [`WorkerResult::unsent`]).
    pub unsent: u64,
    /// Requests sent and never answered (see [`WorkerResult::unanswered`]).
    pub unanswered: u64,
    /// A worker's server went away.
    pub disconnected: bool,
    /// 99th percentile of the sends' delay past their schedule (µs): the generator's own
    /// lateness, included in the latencies (they are timed from the schedule).
    pub send_lag_p99_us: f64,
    /// Largest delay of a send past its schedule (µs).
    pub max_send_lag_us: f64,
    /// The interval logs, one per worker.
    pub hlogs: Vec<PathBuf>,
}

/// Splits `weights` (Low, Normal, High, Critical) into a priority per request index,
/// deterministically.
fn priority_of(i: u64, weights: &[u32; 4]) -> Priority {
    let total: u64 = weights.iter().map(|&w| u64::from(w)).sum();
    if total == 0 {
        return Priority::Normal;
    }
    // A multiplicative hash spreads the mix evenly over any run length.
    let mut x = (i.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 11) % total;
    for (p, &w) in [
        Priority::Low,
        Priority::Normal,
        Priority::High,
        Priority::Critical,
    ]
    .iter()
    .zip(weights)
    {
        if x < u64::from(w) {
            return *p;
        }
        x -= u64::from(w);
    }
    Priority::Normal
}

/// Reads feature rows from a CSV file: one row per record, values separated by commas. A first
/// record of names (no field a number) is a header and is skipped; `#` starts a comment line.
///
/// # Errors
/// The file cannot be read or is not CSV, a value is not a finite number, a row's width (or
/// the header's) differs from `width`, or there is no row.
pub fn read_rows(path: &Path, width: usize) -> anyhow::Result<Vec<Vec<f32>>> {
    let mut reader = csv::ReaderBuilder::new()
        .has_headers(false)
        .flexible(true)
        .trim(csv::Trim::All)
        .comment(Some(b'#'))
        .from_path(path)
        .with_context(|| format!("cannot read {}", path.display()))?;
    let mut rows = Vec::new();
    let mut first = true;
    for record in reader.records() {
        let record = record.with_context(|| format!("{} is not CSV", path.display()))?;
        let at = format!(
            "{}:{}",
            path.display(),
            record.position().map_or(0, |p| p.line())
        );
        // A line of spaces is a record of one empty field: skipped like an empty line.
        if record.iter().all(str::is_empty) {
            continue;
        }
        let is_header = first && record.iter().all(|f| f.parse::<f32>().is_err());
        first = false;
        anyhow::ensure!(
            record.len() == width,
            "{at}: {} {}, the model reads {width}",
            record.len(),
            if is_header { "column names" } else { "values" }
        );
        if is_header {
            continue;
        }
        let row: Vec<f32> = record
            .iter()
            .enumerate()
            .map(|(i, v)| {
                v.parse::<f32>()
                    .ok()
                    .filter(|v| v.is_finite())
                    .with_context(|| {
                        format!("{at}: value {} ({v:?}) is not a finite number", i + 1)
                    })
            })
            .collect::<anyhow::Result<_>>()?;
        rows.push(row);
    }
    anyhow::ensure!(!rows.is_empty(), "{}: no rows", path.display());
    Ok(rows)
}

fn random_rows(width: usize, seed: u64) -> Vec<Vec<f32>> {
    let mut x = seed | 1;
    (0..1024)
        .map(|_| {
            (0..width)
                .map(|_| {
                    // xorshift64
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    (x >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
                })
                .collect()
        })
        .collect()
}

fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, MAX_NS, 3).expect("valid bounds")
}

fn decode(text: &str) -> anyhow::Result<Histogram<u64>> {
    tie_hlog::decode_histogram(text).map_err(|e| anyhow::anyhow!("bad histogram: {e}"))
}

/// The interval log of a worker: one `latency` interval a second.
struct IntervalLog {
    file: std::io::BufWriter<std::fs::File>,
    base_ns: u64,
    interval: Histogram<u64>,
    interval_start_ns: u64,
}

impl IntervalLog {
    fn create(path: &Path, base_ns: u64) -> anyhow::Result<Self> {
        let mut file = std::io::BufWriter::new(std::fs::File::create(path)?);
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs_f64();
        // The monotonic start maps to wall time through the current offset between the clocks.
        // (`base_ns` may still be ahead: the offset is signed.)
        let base = now - (monotonic_ns() as f64 - base_ns as f64) / 1e9;
        tie_hlog::write_hlog_header(
            &mut file,
            "Logged by tie-loadgen; latency from the scheduled send, ns",
            base,
        )?;
        Ok(Self {
            file,
            base_ns,
            interval: histogram(),
            interval_start_ns: base_ns,
        })
    }

    /// Writes the interval if it is a second old (or `force`), then starts the next.
    fn roll(&mut self, now_ns: u64, force: bool) -> anyhow::Result<()> {
        if !force && now_ns < self.interval_start_ns + 1_000_000_000 {
            return Ok(());
        }
        if !self.interval.is_empty() {
            let start = self.interval_start_ns.saturating_sub(self.base_ns) as f64 / 1e9;
            let length = now_ns.saturating_sub(self.interval_start_ns) as f64 / 1e9;
            tie_hlog::write_hlog_interval(
                &mut self.file,
                "latency",
                start,
                length,
                &self.interval,
            )?;
            // Whole intervals reach the file as they end (the parent's progress reads them).
            self.file.flush()?;
            self.interval.reset();
        }
        self.interval_start_ns = now_ns;
        Ok(())
    }
}

/// Runs one worker (in its own process); returns its result.
///
/// # Errors
/// The session cannot be opened, the features file is bad, or the log cannot be written.
pub fn run_worker(spec: &WorkerSpec) -> anyhow::Result<WorkerResult> {
    if let Some(core) = spec.core {
        // An unpinned worker would time the scheduler, not the server: no silent fallback.
        anyhow::ensure!(
            core_affinity::set_for_current(core_affinity::CoreId { id: core }),
            "worker {}: cannot pin to core {core} (is it in this process's CPU set?)",
            spec.index
        );
    }
    let mut capacity = spec.capacity.unwrap_or(match spec.rate {
        // Room for 2 s of load in flight (a stalled server), within the ring limit.
        Some(rate) => ((rate * 2.0) as u32).clamp(64, 1 << 16).next_power_of_two(),
        None => spec.concurrency.clamp(1, 1 << 16).next_power_of_two(),
    });
    let mut client = loop {
        let options = ConnectOptions {
            version: spec.version,
            socket_dir: spec.socket_dir.clone(),
            request_capacity: capacity,
            response_capacity: capacity,
            ..ConnectOptions::default()
        };
        match Client::connect(&spec.endpoint, &spec.model, options) {
            // Rings of the chosen size make a segment over the server's limit
            // (`server.max_segment_mb`): halve them, unless they were asked for.
            Err(tie_client::ConnectError::Refused { message, .. })
                if spec.capacity.is_none()
                    && capacity > 64
                    && message.contains("server.max_segment_mb") =>
            {
                capacity /= 2;
            }
            other => break other?,
        }
    };
    let width = client.feature_count() as usize;
    let rows = match &spec.features_file {
        Some(path) => read_rows(path, width)?,
        None => random_rows(
            width,
            spec.seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ (spec.index as u64 + 1),
        ),
    };
    let mut log = IntervalLog::create(
        &spec.out_dir.join(format!("worker-{}.hlog", spec.index)),
        spec.start_ns,
    )?;
    let mut total = histogram();
    let mut lag = histogram();
    let mut result = WorkerResult::default();
    let start = spec.start_ns;
    let end = start + (spec.duration_s * 1e9) as u64;
    let record_from = start + (spec.warmup_s * 1e9) as u64;
    let drain_until = end + 5_000_000_000;
    // Request id and schedule (open loop) or submit time (closed loop) of each one in flight;
    // answers come back in submission order.
    let mut in_flight: VecDeque<(u64, u64)> = VecDeque::new();
    let count = spec.rate.map(|r| (r * spec.duration_s).round() as u64);
    let scheduled_at = |i: u64| start + (i as f64 * 1e9 / spec.rate.unwrap_or(1.0)) as u64;
    let mut next: u64 = 0;
    if monotonic_ns() > start {
        eprintln!(
            "worker {}: ready after the common start: its first sends are late",
            spec.index
        );
    }
    while monotonic_ns() < start {
        std::hint::spin_loop();
    }
    let record = |h: &mut Histogram<u64>, ns: u64| {
        let _ = h.record(ns.clamp(1, MAX_NS));
    };
    loop {
        let now = monotonic_ns();
        // Send what is due.
        while !result.disconnected {
            let due = match count {
                Some(count) if next < count => Some(scheduled_at(next)).filter(|&at| at <= now),
                None if now < end && (in_flight.len() as u32) < spec.concurrency => Some(now),
                _ => None,
            };
            let Some(scheduled) = due else { break };
            let deadline = spec.deadline_us.map(|us| scheduled + us * 1000);
            let row = &rows[next as usize % rows.len()];
            match client.submit(row, priority_of(next, &spec.priorities), deadline) {
                Ok(id) => {
                    if scheduled >= record_from {
                        record(&mut lag, now.saturating_sub(scheduled));
                    }
                    in_flight.push_back((id, scheduled));
                    result.sent += 1;
                    if scheduled >= record_from && now <= end {
                        result.sent_in_window += 1;
                    }
                    next += 1;
                }
                // The session is full: sent when an answer makes room, still timed from its
                // schedule.
                Err(SubmitError::QueueFull { .. }) => break,
                // The server went away: the rest of the schedule is never sent.
                Err(SubmitError::Disconnected) => result.disconnected = true,
                Err(e) => anyhow::bail!("worker {}: submit failed: {e}", spec.index),
            }
        }
        // Take every answer there is.
        while let Some(r) = client.poll() {
            let read = monotonic_ns();
            let Some((id, sent_at)) = in_flight.pop_front() else {
                anyhow::bail!("worker {}: an answer with no request in flight", spec.index);
            };
            anyhow::ensure!(
                r.request_id == id,
                "worker {}: answer to {} where {id} was due",
                spec.index,
                r.request_id
            );
            if r.status == Status::DISCONNECTED {
                result.disconnected = true;
                in_flight.push_front((id, sent_at));
                break;
            }
            if sent_at < record_from {
                result.warmup += 1;
                continue;
            }
            let ns = read.saturating_sub(sent_at);
            record(&mut total, ns);
            record(&mut log.interval, ns);
            if r.status == Status::OK {
                result.ok += 1;
                if read <= end {
                    result.ok_in_window += 1;
                }
            } else {
                let name = r.status.name().unwrap_or("Unknown").to_string();
                *result.errors.entry(name).or_default() += 1;
            }
        }
        let now = monotonic_ns();
        log.roll(now, false)?;
        let all_sent = match count {
            Some(count) => next >= count,
            None => now >= end,
        };
        if (all_sent && in_flight.is_empty()) || result.disconnected || now >= drain_until {
            // What is left and was due is recorded from its schedule to now: a lower bound of
            // its latency, in the totals and the interval log alike (one set of latencies, one
            // definition). Requests not due yet (the server went away early) have none.
            let left = in_flight
                .iter()
                .map(|&(_, sent_at)| sent_at)
                .chain((next..count.unwrap_or(next)).map(scheduled_at));
            for at in left.filter(|&at| at >= record_from && at <= now) {
                record(&mut total, now.saturating_sub(at));
                record(&mut log.interval, now.saturating_sub(at));
            }
            result.unanswered = in_flight.len() as u64;
            result.unsent = count.map_or(0, |count| count - next);
            break;
        }
        // An unpinned worker sleeps when the next send is far; a pinned one spins (a late
        // wake-up would be charged to the server: latencies are timed from the schedule).
        if let (None, Some(count)) = (spec.core, count) {
            if next < count && in_flight.is_empty() {
                let at = scheduled_at(next);
                if at > now + 1_000_000 {
                    std::thread::sleep(Duration::from_nanos(at - now - 500_000));
                }
            }
        }
        std::hint::spin_loop();
    }
    log.roll(monotonic_ns(), true)?;
    log.file.flush()?;
    result.elapsed_s = monotonic_ns().saturating_sub(start) as f64 / 1e9;
    result.histogram = tie_hlog::encode_histogram(&total);
    result.send_lag = tie_hlog::encode_histogram(&lag);
    Ok(result)
}

/// Sessions to a run's model held open and silent while this lives (`--idle-sessions`): the
/// server then serves the workers among that many other connected sessions, as a host with
/// many strategy processes has.
pub struct IdleSessions(Vec<Client>);

impl IdleSessions {
    /// Connects `n` sessions to `worker`'s endpoint, model and version, with the client's
    /// default options otherwise.
    ///
    /// # Errors
    /// A session is refused (e.g. over the server's `max_sessions`) or cannot connect.
    pub fn connect(worker: &WorkerSpec, n: usize) -> anyhow::Result<Self> {
        let mut sessions = Vec::with_capacity(n);
        for i in 0..n {
            let options = ConnectOptions {
                version: worker.version,
                socket_dir: worker.socket_dir.clone(),
                ..ConnectOptions::default()
            };
            let client = Client::connect(&worker.endpoint, &worker.model, options)
                .with_context(|| format!("idle session {} of {n}", i + 1))?;
            sessions.push(client);
        }
        Ok(Self(sessions))
    }

    /// Sessions held.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether none is held.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// A run: its workers' specs without `index`, `core` and `start_ns`.
#[derive(Clone, Debug)]
pub struct RunSpec {
    /// The template of every worker.
    pub worker: WorkerSpec,
    /// Worker processes.
    pub workers: usize,
    /// Cores, one per worker in turn.
    pub cores: Vec<usize>,
    /// Total requests per second (open loop), split evenly among the workers.
    pub total_rate: Option<f64>,
    /// Print progress (elapsed, rate, p99 so far) to stderr once a second.
    pub progress: bool,
}

/// Prints a run's progress to stderr once a second until `done`, and once more then: elapsed
/// time, the rate answered since the warm-up and p99 so far, from the intervals the workers'
/// logs gained since the last look (each log read from where the last read stopped).
fn show_progress(spec: &RunSpec, start_ns: u64, done: &std::sync::atomic::AtomicBool) {
    use std::io::{Read as _, Seek as _};
    use std::sync::atomic::Ordering;
    let mut logs: Vec<(PathBuf, u64)> = (0..spec.workers)
        .map(|i| (spec.worker.out_dir.join(format!("worker-{i}.hlog")), 0))
        .collect();
    let recorded_from = start_ns + (spec.worker.warmup_s * 1e9) as u64;
    let mut merged = histogram();
    let mut last = monotonic_ns();
    loop {
        let finished = done.load(Ordering::Relaxed);
        let now = monotonic_ns();
        if !finished && now < last + 1_000_000_000 {
            std::thread::sleep(Duration::from_millis(50));
            continue;
        }
        last = now;
        for (path, offset) in &mut logs {
            let mut bytes = Vec::new();
            let Ok(mut file) = std::fs::File::open(&*path) else {
                continue;
            };
            if file.seek(std::io::SeekFrom::Start(*offset)).is_err()
                || file.read_to_end(&mut bytes).is_err()
            {
                continue;
            }
            // Whole lines only: a line being written is read next time.
            let Some(end) = bytes.iter().rposition(|&b| b == b'\n') else {
                continue;
            };
            *offset += end as u64 + 1;
            if let Ok(log) = tie_hlog::read_hlog(&bytes[..=end]) {
                if let Some(t) = log.tags.get("latency") {
                    let _ = merged.add(&t.histogram);
                }
            }
        }
        let loaded = now.saturating_sub(recorded_from) as f64 / 1e9;
        let rate = if loaded > 0.0 {
            format!("{:.0}/s", merged.len() as f64 / loaded)
        } else {
            "-".into()
        };
        let p99 = if merged.is_empty() {
            "-".to_string()
        } else {
            format!("{:.2} µs", merged.value_at_quantile(0.99) as f64 / 1e3)
        };
        eprint!(
            "\r{:>6.1} s of {:.1}: answered {rate:>10} since the warm-up, p99 so far {p99:<14}",
            now.saturating_sub(start_ns) as f64 / 1e9,
            spec.worker.duration_s
        );
        if finished {
            eprintln!();
            return;
        }
    }
}

/// Runs `spec`'s workers as processes of `exe` (this program, whose `worker` subcommand reads
/// a [`WorkerSpec`] from `TIE_LOADGEN_WORKER`), merges their results and writes
/// `summary.json` into the output directory.
///
/// # Errors
/// A worker fails, or the output cannot be written.
pub fn run(exe: &Path, spec: &RunSpec) -> anyhow::Result<Summary> {
    std::fs::create_dir_all(&spec.worker.out_dir)?;
    if !spec.cores.is_empty() {
        let usable: Vec<usize> = core_affinity::get_core_ids()
            .context("--cores: cannot read the cores this process may run on")?
            .iter()
            .map(|c| c.id)
            .collect();
        for core in &spec.cores {
            anyhow::ensure!(
                usable.contains(core),
                "--cores: core {core} is not one this process may run on (it may use {usable:?})"
            );
        }
    }
    // Time for every worker to start and connect before the common start.
    let start_ns = monotonic_ns() + 500_000_000 + 50_000_000 * spec.workers as u64;
    // Workers left running by an error are killed, not left loading the server.
    struct Children(Vec<std::process::Child>);
    impl Drop for Children {
        fn drop(&mut self) {
            for c in &mut self.0 {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }
    let mut children = Children(Vec::new());
    for index in 0..spec.workers {
        let mut w = spec.worker.clone();
        w.index = index;
        w.core = (!spec.cores.is_empty()).then(|| spec.cores[index % spec.cores.len()]);
        w.start_ns = start_ns;
        w.rate = spec.total_rate.map(|r| r / spec.workers as f64);
        let child = std::process::Command::new(exe)
            .arg("worker")
            .env("TIE_LOADGEN_WORKER", serde_json::to_string(&w)?)
            .stdout(std::process::Stdio::piped())
            .spawn()?;
        children.0.push(child);
    }
    let done = std::sync::atomic::AtomicBool::new(false);
    let results = std::thread::scope(|scope| {
        if spec.progress {
            scope.spawn(|| show_progress(spec, start_ns, &done));
        }
        let results = collect(&mut children.0);
        done.store(true, std::sync::atomic::Ordering::Relaxed);
        results
    })?;
    children.0.clear();
    let summary = summarise(spec, &results)?;
    std::fs::write(
        spec.worker.out_dir.join("summary.json"),
        serde_json::to_string_pretty(&summary)?,
    )?;
    Ok(summary)
}

/// Waits for every worker and reads its result.
fn collect(children: &mut [std::process::Child]) -> anyhow::Result<Vec<WorkerResult>> {
    let mut results = Vec::new();
    for (i, child) in children.iter_mut().enumerate() {
        let mut stdout = String::new();
        if let Some(mut out) = child.stdout.take() {
            std::io::Read::read_to_string(&mut out, &mut stdout)?;
        }
        let status = child.wait()?;
        anyhow::ensure!(status.success(), "worker {i} failed ({status})");
        let line = stdout.lines().last().unwrap_or_default();
        results.push(serde_json::from_str::<WorkerResult>(line)?);
    }
    Ok(results)
}

fn summarise(spec: &RunSpec, results: &[WorkerResult]) -> anyhow::Result<Summary> {
    let mut total = histogram();
    let mut lag = histogram();
    let mut s = Summary {
        mode: if spec.total_rate.is_some() {
            "open"
        } else {
            "closed"
        }
        .into(),
        model: spec.worker.model.clone(),
        workers: spec.workers,
        offered_rps: spec.total_rate,
        duration_s: spec.worker.duration_s,
        ..Summary::default()
    };
    let mut sent_in_window = 0;
    for r in results {
        let merge = |into: &mut Histogram<u64>, text: &str| -> anyhow::Result<()> {
            into.add(decode(text)?)
                .map_err(|e| anyhow::anyhow!("{e:?}"))
        };
        merge(&mut total, &r.histogram)?;
        merge(&mut lag, &r.send_lag)?;
        s.sent += r.sent;
        sent_in_window += r.sent_in_window;
        s.warmup += r.warmup;
        s.ok += r.ok;
        s.ok_in_window += r.ok_in_window;
        s.unsent += r.unsent;
        s.unanswered += r.unanswered;
        s.disconnected |= r.disconnected;
        for (k, n) in &r.errors {
            *s.errors.entry(k.clone()).or_default() += n;
        }
    }
    let us = |h: &Histogram<u64>, q: f64| h.value_at_quantile(q) as f64 / 1e3;
    let loaded = (spec.worker.duration_s - spec.worker.warmup_s).max(1e-9);
    s.ok_after_window = s.ok - s.ok_in_window;
    s.sent_rps = sent_in_window as f64 / loaded;
    s.achieved_rps = s.ok_in_window as f64 / loaded;
    s.count = total.len();
    if !total.is_empty() {
        s.p50_us = us(&total, 0.5);
        s.p90_us = us(&total, 0.9);
        s.p99_us = us(&total, 0.99);
        s.p99_9_us = us(&total, 0.999);
        s.p99_99_us = us(&total, 0.9999);
        s.max_us = total.max() as f64 / 1e3;
        s.mean_us = total.mean() / 1e3;
    }
    if !lag.is_empty() {
        s.send_lag_p99_us = us(&lag, 0.99);
        s.max_send_lag_us = lag.max() as f64 / 1e3;
    }
    s.hlogs = (0..spec.workers)
        .map(|i| spec.worker.out_dir.join(format!("worker-{i}.hlog")))
        .collect();
    Ok(s)
}

impl Summary {
    /// Requests that did not get a prediction after the warm-up: error answers, unanswered
    /// and unsent ones, and one for a server gone.
    pub fn failures(&self) -> u64 {
        self.errors.values().sum::<u64>()
            + self.unsent
            + self.unanswered
            + u64::from(self.disconnected)
    }
}

/// What keeps a run from being clean, one phrase each: error answers, requests unsent or
/// unanswered, a server gone, or (open loop) under 95% of the offered rate achieved. Empty:
/// nothing.
pub fn shortfalls(s: &Summary) -> Vec<String> {
    let mut out = Vec::new();
    let errors: u64 = s.errors.values().sum();
    if errors > 0 {
        out.push(format!("{errors} error answers {:?}", s.errors));
    }
    if s.unsent > 0 {
        out.push(format!("{} requests never sent", s.unsent));
    }
    if s.unanswered > 0 {
        out.push(format!("{} requests never answered", s.unanswered));
    }
    if s.disconnected {
        out.push("the server went away".into());
    }
    if let Some(offered) = s.offered_rps {
        if s.achieved_rps < 0.95 * offered {
            out.push(format!(
                "achieved {:.0}/s of the {offered:.0}/s offered (under 95%)",
                s.achieved_rps
            ));
        }
    }
    out
}

/// One rate of a sweep.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct SweepPoint {
    /// Offered requests per second.
    pub offered_rps: f64,
    /// Predictions per second.
    pub achieved_rps: f64,
    /// Median (µs).
    pub p50_us: f64,
    /// 99th percentile (µs).
    pub p99_us: f64,
    /// 99.9th percentile (µs).
    pub p99_9_us: f64,
    /// Error answers, unsent and unanswered requests.
    pub failures: u64,
    /// Within the bound: p99 ≤ bound, nothing failed, and at least 95% of the offered rate
    /// achieved.
    pub sustained: bool,
}

/// `sweep.json`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct SweepReport {
    /// The p99 bound (µs).
    pub p99_bound_us: f64,
    /// Every rate run, in order.
    pub points: Vec<SweepPoint>,
    /// The highest rate sustained before the first that was not (`None`: not even the first).
    pub knee_rps: Option<f64>,
    /// Whether a rate was not sustained (else the knee is only known to be above the last
    /// rate tried).
    pub crossed: bool,
}

/// Runs `spec` at each of `rates` in turn (each in a subdirectory `rate-<r>`) until one is not
/// sustained; writes `sweep.json`.
///
/// # Errors
/// As [`run`].
pub fn sweep(
    exe: &Path,
    spec: &RunSpec,
    rates: &[f64],
    p99_bound_us: f64,
) -> anyhow::Result<SweepReport> {
    anyhow::ensure!(
        rates.windows(2).all(|w| w[0] < w[1]) && rates.iter().all(|&r| r > 0.0),
        "sweep rates must be positive and ascending"
    );
    let mut report = SweepReport {
        p99_bound_us,
        points: Vec::new(),
        knee_rps: None,
        crossed: false,
    };
    for &rate in rates {
        let mut s = spec.clone();
        s.total_rate = Some(rate);
        s.worker.out_dir = spec.worker.out_dir.join(format!("rate-{rate}"));
        let summary = match run(exe, &s) {
            Ok(summary) => summary,
            // A run that fails (its workers could not connect) is the end of the sweep, and
            // the points so far are kept.
            Err(e) => {
                eprintln!(
                    "rate {rate}/s failed: {}",
                    tie_client::each_cause_once(e.as_ref())
                );
                report.crossed = true;
                report.points.push(SweepPoint {
                    offered_rps: rate,
                    achieved_rps: 0.0,
                    p50_us: 0.0,
                    p99_us: 0.0,
                    p99_9_us: 0.0,
                    failures: 1,
                    sustained: false,
                });
                break;
            }
        };
        let failures = summary.failures();
        let sustained =
            summary.count > 0 && summary.p99_us <= p99_bound_us && shortfalls(&summary).is_empty();
        report.points.push(SweepPoint {
            offered_rps: rate,
            achieved_rps: summary.achieved_rps,
            p50_us: summary.p50_us,
            p99_us: summary.p99_us,
            p99_9_us: summary.p99_9_us,
            failures,
            sustained,
        });
        if !sustained {
            report.crossed = true;
            break;
        }
        report.knee_rps = Some(rate);
    }
    std::fs::create_dir_all(&spec.worker.out_dir)?;
    std::fs::write(
        spec.worker.out_dir.join("sweep.json"),
        serde_json::to_string_pretty(&report)?,
    )?;
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_priority_mix_follows_the_weights() {
        let weights = [1, 6, 2, 1];
        let mut counts = [0u32; 4];
        for i in 0..10_000 {
            counts[priority_of(i, &weights) as usize] += 1;
        }
        for (c, w) in counts.iter().zip(weights) {
            let expected = 1000 * w;
            assert!(c.abs_diff(expected) < expected / 10 + 50, "{counts:?}");
        }
        assert_eq!(priority_of(5, &[0, 0, 0, 0]), Priority::Normal);
    }

    #[test]
    fn rows_files_are_checked() {
        let dir = std::env::temp_dir().join(format!("tie-loadgen-rows-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let good = dir.join("good.csv");
        std::fs::write(&good, "1,2,3\n\n   \n-1.5, 0, 2e3\n").unwrap();
        assert_eq!(
            read_rows(&good, 3).unwrap(),
            vec![vec![1.0, 2.0, 3.0], vec![-1.5, 0.0, 2000.0]]
        );
        assert!(read_rows(&good, 4)
            .unwrap_err()
            .to_string()
            .contains("the model reads 4"));
        let error = |text: &str, width| {
            let bad = dir.join("bad.csv");
            std::fs::write(&bad, text).unwrap();
            format!("{:#}", read_rows(&bad, width).unwrap_err())
        };
        assert!(error("1,x,3\n", 3).contains("bad.csv:1: value 2 (\"x\")"));
        assert!(error("1,2,3\n4,5,x\n", 3).contains("bad.csv:2"));
        assert!(error("1,2,3\n4,5,inf\n", 3).contains("not a finite number"));
        // A header is skipped once, and must name every column.
        let header = dir.join("header.csv");
        std::fs::write(&header, "a, b ,c\n# a comment\n1,2,3\n").unwrap();
        assert_eq!(read_rows(&header, 3).unwrap(), vec![vec![1.0, 2.0, 3.0]]);
        assert!(error("a,b\n1,2,3\n", 3).contains("2 column names, the model reads 3"));
        assert!(error("a,b,c\nd,e,f\n", 3).contains("bad.csv:2: value 1"));
        assert!(error("a,b,c\n", 3).contains("no rows"));
        let _ = std::fs::remove_dir_all(dir);
    }
}
