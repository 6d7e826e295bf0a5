//! `tie report`: percentile tables and distributions from HdrHistogram interval logs.
//!
//! Reads the standard `.hlog` format (as the server's `[monitoring] hlog_dir` writes, or any
//! HdrHistogram log writer), adds up each tag's intervals, and prints per tag a percentile
//! table and the classic percentile distribution (value, percentile, count, 1/(1-p)) with a
//! bar per line.
#![forbid(unsafe_code)]

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::Duration;

use base64::Engine as _;
use hdrhistogram::serialization::interval_log::{IntervalLogIterator, LogEntry};
use hdrhistogram::serialization::Deserializer;
use hdrhistogram::Histogram;

/// One tag's intervals, added up.
#[derive(Debug)]
pub struct TagSummary {
    /// The intervals' histograms added up.
    pub histogram: Histogram<u64>,
    /// Intervals read.
    pub intervals: usize,
    /// From the first interval's start to the last one's end.
    pub span: Duration,
}

/// An interval log, by tag (untagged intervals under `""`).
#[derive(Debug, Default)]
pub struct HlogSummary {
    /// Per tag.
    pub tags: BTreeMap<String, TagSummary>,
}

/// Why a log could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    /// A line is neither a comment, a header nor an interval.
    #[error("unreadable line at byte {0}")]
    Parse(usize),
    /// An interval's histogram is not valid base64 or not a valid encoded histogram.
    #[error("interval {index}: {why}")]
    Histogram {
        /// Its position among the intervals.
        index: usize,
        /// What is wrong.
        why: String,
    },
    /// No interval in the log.
    #[error("no interval in the log")]
    Empty,
}

/// Reads an interval log.
///
/// # Errors
/// [`ReportError`] for a malformed line or histogram, or a log without intervals.
pub fn read_hlog(bytes: &[u8]) -> Result<HlogSummary, ReportError> {
    // A log being written may end in a partial line: it is left for the next read.
    let bytes = match bytes.iter().rposition(|&b| b == b'\n') {
        Some(end) => &bytes[..=end],
        None => &bytes[..0],
    };
    let mut summary = HlogSummary::default();
    let mut spans: BTreeMap<String, (Duration, Duration)> = BTreeMap::new();
    let mut index = 0;
    for entry in IntervalLogIterator::new(bytes) {
        let entry = entry.map_err(|e| match e {
            hdrhistogram::serialization::interval_log::LogIteratorError::ParseError { offset } => {
                ReportError::Parse(offset)
            }
        })?;
        let LogEntry::Interval(interval) = entry else {
            continue;
        };
        let bad = |why: String| ReportError::Histogram { index, why };
        let h = decode_histogram(interval.encoded_histogram()).map_err(bad)?;
        let tag = interval.tag().map_or("", |t| t.as_str()).to_string();
        let start = interval.start_timestamp();
        let end = start + interval.duration();
        let span = spans.entry(tag.clone()).or_insert((start, end));
        span.0 = span.0.min(start);
        span.1 = span.1.max(end);
        match summary.tags.get_mut(&tag) {
            Some(t) => {
                t.histogram
                    .add(&h)
                    .map_err(|e| bad(format!("cannot add: {e:?}")))?;
                t.intervals += 1;
            }
            None => {
                let mut total = Histogram::new_from(&h);
                total.auto(true);
                total
                    .add(&h)
                    .map_err(|e| bad(format!("cannot add: {e:?}")))?;
                summary.tags.insert(
                    tag.clone(),
                    TagSummary {
                        histogram: total,
                        intervals: 1,
                        span: Duration::ZERO,
                    },
                );
            }
        }
        index += 1;
    }
    if index == 0 {
        return Err(ReportError::Empty);
    }
    for (tag, (start, end)) in spans {
        if let Some(t) = summary.tags.get_mut(&tag) {
            t.span = end.saturating_sub(start);
        }
    }
    Ok(summary)
}

/// A histogram as an interval log line holds it: V2 with deflate, then base64.
pub fn encode_histogram(h: &Histogram<u64>) -> String {
    use hdrhistogram::serialization::Serializer as _;
    let mut buf = Vec::new();
    hdrhistogram::serialization::V2DeflateSerializer::new()
        .serialize(h, &mut buf)
        .expect("serialising into memory");
    base64::engine::general_purpose::STANDARD.encode(buf)
}

/// The histogram of an interval log line's last field (see [`encode_histogram`]).
///
/// # Errors
/// Not base64, or not an encoded histogram.
pub fn decode_histogram(text: &str) -> Result<Histogram<u64>, String> {
    let raw = base64::engine::general_purpose::STANDARD
        .decode(text)
        .map_err(|e| format!("base64: {e}"))?;
    Deserializer::new()
        .deserialize(&mut &raw[..])
        .map_err(|e| format!("{e:?}"))
}

/// Writes the standard header of an interval log: `comment`, the start and base time
/// (seconds since the epoch: interval start times count from it), the format version and
/// the legend.
///
/// # Errors
/// Writing failed.
pub fn write_hlog_header(
    w: &mut impl std::io::Write,
    comment: &str,
    base_secs: f64,
) -> std::io::Result<()> {
    writeln!(w, "#[{comment}]")?;
    writeln!(w, "#[StartTime: {base_secs:.3} (seconds since epoch)]")?;
    writeln!(w, "#[BaseTime: {base_secs:.3} (seconds since epoch)]")?;
    writeln!(w, "#[Histogram log format version 1.3]")?;
    writeln!(
        w,
        "\"StartTimestamp\",\"Interval_Length\",\"Interval_Max\",\"Interval_Compressed_Histogram\""
    )
}

/// Writes one interval of an interval log: `h`, tagged `tag`, starting `start_secs` after the
/// base time and lasting `length_secs`.
///
/// # Errors
/// Writing failed.
pub fn write_hlog_interval(
    w: &mut impl std::io::Write,
    tag: &str,
    start_secs: f64,
    length_secs: f64,
    h: &Histogram<u64>,
) -> std::io::Result<()> {
    writeln!(
        w,
        "Tag={tag},{start_secs:.3},{length_secs:.3},{:.3},{}",
        h.max() as f64,
        encode_histogram(h)
    )
}

/// Percentiles of the percentile table.
pub const TABLE_PERCENTILES: [f64; 7] = [50.0, 90.0, 99.0, 99.9, 99.99, 99.999, 100.0];

/// Appends the report of one log to `out`: a percentile table per tag (values in µs) and,
/// with `distribution`, the percentile distribution.
pub fn write_report(
    out: &mut String,
    name: &str,
    log: &HlogSummary,
    units_per_us: f64,
    distribution: bool,
) {
    let us = |v: u64| v as f64 / units_per_us;
    let _ = writeln!(out, "{name}");
    let _ = writeln!(
        out,
        "  {:<12} {:>10} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9}   (µs)",
        "tag", "count", "rate/s", "p50", "p90", "p99", "p99.9", "p99.99", "p99.999", "max"
    );
    for (tag, t) in &log.tags {
        let h = &t.histogram;
        let rate = h.len() as f64 / t.span.as_secs_f64().max(1e-9);
        let _ = write!(
            out,
            "  {:<12} {:>10} {:>9.0}",
            if tag.is_empty() { "-" } else { tag },
            h.len(),
            rate
        );
        for p in TABLE_PERCENTILES {
            let _ = write!(out, " {:>9.2}", us(h.value_at_percentile(p)));
        }
        let _ = writeln!(out);
    }
    if !distribution {
        return;
    }
    for (tag, t) in &log.tags {
        let h = &t.histogram;
        let _ = writeln!(
            out,
            "\n  {} percentile distribution ({} values in {} intervals over {:.1} s)",
            if tag.is_empty() { "untagged" } else { tag },
            h.len(),
            t.intervals,
            t.span.as_secs_f64()
        );
        let _ = writeln!(
            out,
            "  {:>12} {:>14} {:>10} {:>12}",
            "Value (µs)", "Percentile", "TotalCount", "1/(1-p)"
        );
        let max = us(h.max()).max(1e-9);
        for v in h.iter_quantiles(1) {
            let q = v.quantile_iterated_to();
            let value = us(v.value_iterated_to());
            let inverse = if q < 1.0 {
                format!("{:.2}", 1.0 / (1.0 - q))
            } else {
                "inf".into()
            };
            let bar = "#".repeat(((value / max) * 40.0).round() as usize);
            let _ = writeln!(
                out,
                "  {:>12.3} {:>14.12} {:>10} {:>12} {bar}",
                value,
                q,
                v.count_since_last_iteration(),
                inverse
            );
            if q >= 1.0 {
                break;
            }
        }
        let _ = writeln!(
            out,
            "  #[Mean = {:.3}, StdDeviation = {:.3}]\n  #[Max = {:.3}, Total count = {}]",
            h.mean() / units_per_us,
            h.stdev() / units_per_us,
            us(h.max()),
            h.len()
        );
    }
}

/// A sweep's points, as `tie-loadgen sweep` writes them (`sweep.json`).
pub type Sweep = crate::loadgen::SweepReport;

/// Appends a sweep's table to `out`.
pub fn write_sweep(out: &mut String, name: &str, sweep: &Sweep) {
    let _ = writeln!(out, "{name} (p99 bound {} µs)", sweep.p99_bound_us);
    let _ = writeln!(
        out,
        "  {:>12} {:>12} {:>10} {:>10} {:>10} {:>9}",
        "offered/s", "achieved/s", "p50 µs", "p99 µs", "p99.9 µs", "failures"
    );
    for p in &sweep.points {
        let _ = writeln!(
            out,
            "  {:>12.0} {:>12.0} {:>10.2} {:>10.2} {:>10.2} {:>9} {}",
            p.offered_rps,
            p.achieved_rps,
            p.p50_us,
            p.p99_us,
            p.p99_9_us,
            p.failures,
            if p.sustained { "" } else { "over the bound" }
        );
    }
    let _ = match sweep.knee_rps {
        Some(r) if sweep.crossed => writeln!(out, "  highest sustained rate: {r:.0}/s"),
        Some(r) => writeln!(out, "  every rate sustained: the knee is above {r:.0}/s"),
        None => writeln!(out, "  no rate sustained"),
    };
}

/// Appends a run summary's line to `out`.
pub fn write_summary(out: &mut String, name: &str, s: &crate::loadgen::Summary) {
    let _ = writeln!(
        out,
        "{name}: {} loop, {} workers, offered {:.0}/s, sent {:.0}/s, achieved {:.0}/s, {} latencies: p50 {:.2} p90 {:.2} p99 {:.2} p99.9 {:.2} p99.99 {:.2} max {:.2} µs; errors {:?}, unsent {}, unanswered {}, send lag p99 {:.2} max {:.2} µs",
        s.mode, s.workers, s.offered_rps, s.sent_rps, s.achieved_rps, s.count, s.p50_us, s.p90_us,
        s.p99_us, s.p99_9_us, s.p99_99_us, s.max_us, s.errors, s.unsent, s.unanswered,
        s.send_lag_p99_us, s.max_send_lag_us
    );
}

/// The legend of a chart, in its upper left corner.
fn draw_legend<'a, DB: plotters::prelude::DrawingBackend + 'a>(
    chart: &mut plotters::prelude::ChartContext<
        'a,
        DB,
        plotters::prelude::Cartesian2d<
            plotters::coord::types::RangedCoordf64,
            plotters::coord::types::RangedCoordf64,
        >,
    >,
) -> Result<(), plotters::drawing::DrawingAreaErrorKind<DB::ErrorType>> {
    use plotters::prelude::*;
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .label_font(("sans-serif", 16))
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
}

/// The font charts are drawn with (DejaVu Sans Mono; its licence is beside it).
static FONT: &[u8] = include_bytes!("../assets/fonts/DejaVuSansMono.ttf");

/// Draws a PNG of `width`×`height` at `path`: latency by percentile of every (log, tag)
/// (percentile axis in nines, as HdrHistogram's plots), and below it latency against
/// throughput for each sweep.
///
/// # Errors
/// Drawing or writing the file failed.
pub fn draw_chart(
    path: &std::path::Path,
    logs: &[(String, HlogSummary)],
    sweeps: &[(String, Sweep)],
    units_per_us: f64,
) -> anyhow::Result<()> {
    use plotters::prelude::*;
    use plotters::style::FontStyle;
    static REGISTERED: std::sync::Once = std::sync::Once::new();
    REGISTERED.call_once(|| {
        let _ = plotters::style::register_font("sans-serif", FontStyle::Normal, FONT);
    });
    anyhow::ensure!(
        !logs.is_empty() || !sweeps.is_empty(),
        "nothing to draw: give .hlog files or a sweep.json"
    );
    // A panel for the percentiles when there are logs, one for the sweeps when there are any.
    let height = match (logs.is_empty(), sweeps.is_empty()) {
        (false, false) => 1100,
        _ => 560,
    };
    let root = BitMapBackend::new(path, (1200, height)).into_drawing_area();
    let err = |e: &dyn std::fmt::Display| anyhow::anyhow!("drawing {}: {e}", path.display());
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let (top, bottom) = match (logs.is_empty(), sweeps.is_empty()) {
        (false, true) => (Some(root.clone()), None),
        (true, false) => (None, Some(root.clone())),
        _ => {
            let (a, b) = root.split_vertically(560);
            (Some(a), Some(b))
        }
    };
    const NINES: f64 = 5.0;
    // Series are named by the last two parts of their path (directory and file).
    let short = |name: &str| {
        let parts: Vec<&str> = name.rsplit('/').take(2).collect();
        parts.into_iter().rev().collect::<Vec<_>>().join("/")
    };
    if let Some(top) = &top {
        // Percentile axis: x = log10(1 / (1 - q)), 0 (p0) to 5 (p99.999).
        let series: Vec<(String, &Histogram<u64>)> = logs
            .iter()
            .flat_map(|(name, log)| {
                log.tags.iter().map(move |(tag, t)| {
                    let name = short(name);
                    let label = if tag.is_empty() {
                        name
                    } else {
                        format!("{name} {tag}")
                    };
                    (label, &t.histogram)
                })
            })
            .collect();
        let y_max = series
            .iter()
            .map(|(_, h)| h.value_at_quantile(1.0 - 10f64.powf(-NINES)) as f64 / units_per_us)
            .fold(1e-3, f64::max);
        let mut chart = ChartBuilder::on(top)
            .caption("Latency by percentile", ("sans-serif", 24))
            .margin(20)
            .x_label_area_size(45)
            .y_label_area_size(80)
            .build_cartesian_2d(0.0..NINES, 0.0..y_max * 1.1)
            .map_err(|e| err(&e))?;
        chart
            .configure_mesh()
            .x_desc("percentile")
            .y_desc("latency (µs)")
            .x_labels(6)
            .x_label_formatter(&|x| {
                let q = 100.0 * (1.0 - 10f64.powf(-x));
                match x.round() as i32 {
                    0 => "0%".into(),
                    n => format!("{q:.*}%", (n - 2).max(0) as usize),
                }
            })
            .label_style(("sans-serif", 16))
            .draw()
            .map_err(|e| err(&e))?;
        for (i, (label, h)) in series.iter().enumerate() {
            let color = Palette99::pick(i).to_rgba();
            let points: Vec<(f64, f64)> = (0..=500)
                .map(|k| {
                    let x = NINES * k as f64 / 500.0;
                    let q = 1.0 - 10f64.powf(-x);
                    (x, h.value_at_quantile(q) as f64 / units_per_us)
                })
                .collect();
            chart
                .draw_series(LineSeries::new(points, color.stroke_width(2)))
                .map_err(|e| err(&e))?
                .label(label.clone())
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
                });
        }
        draw_legend(&mut chart).map_err(|e| err(&e))?;
    }
    if let Some(bottom) = bottom {
        let x_max = sweeps
            .iter()
            .flat_map(|(_, s)| s.points.iter().map(|p| p.offered_rps.max(p.achieved_rps)))
            .fold(1.0, f64::max);
        let p99_max = sweeps
            .iter()
            .flat_map(|(_, s)| s.points.iter().map(|p| p.p99_us))
            .fold(1e-3, f64::max);
        // The bound is drawn when it is near the curves (a loose one would flatten them).
        let y_max = sweeps
            .iter()
            .map(|(_, s)| s.p99_bound_us)
            .filter(|&b| b <= 2.0 * p99_max)
            .fold(p99_max, f64::max);
        let mut chart = ChartBuilder::on(&bottom)
            .caption("Latency against throughput (sweep)", ("sans-serif", 24))
            .margin(20)
            .x_label_area_size(45)
            .y_label_area_size(80)
            .build_cartesian_2d(0.0..x_max * 1.05, 0.0..y_max * 1.1)
            .map_err(|e| err(&e))?;
        chart
            .configure_mesh()
            .x_desc("achieved requests per second")
            .y_desc("latency (µs)")
            .label_style(("sans-serif", 16))
            .draw()
            .map_err(|e| err(&e))?;
        for (i, (name, s)) in sweeps.iter().enumerate() {
            for (j, (what, pick)) in [("p50", 0usize), ("p99", 1)].into_iter().enumerate() {
                let color = Palette99::pick(2 * i + j).to_rgba();
                let points: Vec<(f64, f64)> = s
                    .points
                    .iter()
                    .map(|p| (p.achieved_rps, if pick == 0 { p.p50_us } else { p.p99_us }))
                    .collect();
                chart
                    .draw_series(LineSeries::new(points.clone(), color.stroke_width(2)))
                    .map_err(|e| err(&e))?
                    .label(format!("{} {what}", short(name)))
                    .legend(move |(x, y)| {
                        PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
                    });
                chart
                    .draw_series(
                        points
                            .into_iter()
                            .map(|p| Circle::new(p, 4, color.filled())),
                    )
                    .map_err(|e| err(&e))?;
            }
            let bound = s.p99_bound_us;
            if bound > y_max {
                continue;
            }
            chart
                .draw_series(LineSeries::new(
                    [(0.0, bound), (x_max * 1.05, bound)],
                    RED.mix(0.5).stroke_width(1),
                ))
                .map_err(|e| err(&e))?
                .label(format!("{} p99 bound", short(name)))
                .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], RED.mix(0.5)));
        }
        draw_legend(&mut chart).map_err(|e| err(&e))?;
    }
    root.present().map_err(|e| err(&e))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::monitor::{HlogFiles, Sample, Stage};

    #[test]
    fn a_written_log_reads_back_with_its_counts_and_percentiles() {
        let dir = std::env::temp_dir().join(format!("tie-report-{}", std::process::id()));
        let mut files = HlogFiles::create(&dir, &["m:1".to_string()]).unwrap();
        let mut sample = Sample::default();
        for i in 1..=1000u64 {
            sample.record(Stage::Total, i * 1000);
        }
        files.write("m:1", &sample, Duration::from_secs(1)).unwrap();
        sample.reset_in_place();
        sample.record_n(Stage::Total, 5_000_000, 10);
        sample.record(Stage::Queue, 42);
        files.write("m:1", &sample, Duration::from_secs(1)).unwrap();
        drop(files);
        let bytes = std::fs::read(crate::monitor::hlog_path(&dir, "m:1")).unwrap();
        let log = read_hlog(&bytes).unwrap();
        let total = &log.tags["total"];
        assert_eq!(total.intervals, 2);
        assert_eq!(total.histogram.len(), 1010);
        assert_eq!(
            total.histogram.max(),
            total.histogram.highest_equivalent(5_000_000)
        );
        assert!(total.histogram.value_at_percentile(50.0).abs_diff(505_000) < 1_000);
        assert_eq!(log.tags["queue"].histogram.len(), 1);
        let mut out = String::new();
        write_report(&mut out, "m", &log, 1000.0, true);
        assert!(
            out.contains("total") && out.contains("percentile distribution"),
            "{out}"
        );
        assert!(matches!(
            read_hlog(b"#only a comment\n"),
            Err(ReportError::Empty)
        ));
        assert!(read_hlog(b"garbage,line\n").is_err());
        let _ = std::fs::remove_dir_all(dir);
    }
}
