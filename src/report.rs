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
    let mut deserializer = Deserializer::new();
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
        let raw = base64::engine::general_purpose::STANDARD
            .decode(interval.encoded_histogram())
            .map_err(|e| bad(format!("base64: {e}")))?;
        let h: Histogram<u64> = deserializer
            .deserialize(&mut &raw[..])
            .map_err(|e| bad(format!("{e:?}")))?;
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
        files.write(0, &sample, Duration::from_secs(1)).unwrap();
        sample.reset_in_place();
        sample.record_n(Stage::Total, 5_000_000, 10);
        sample.record(Stage::Queue, 42);
        files.write(0, &sample, Duration::from_secs(1)).unwrap();
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
