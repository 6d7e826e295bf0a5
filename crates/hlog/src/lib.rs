//! The HdrHistogram interval-log (`.hlog`) codec shared by the server's monitor, the load
//! generator and `tie report`: [`write_hlog_header`] and [`write_hlog_interval`] write the
//! standard format, [`read_hlog`] adds a log's intervals up per tag ([`HlogSummary`]).
//!
//! ```
//! let mut h = hdrhistogram::Histogram::<u64>::new(3).unwrap();
//! h.record(1_500).unwrap();
//! let mut log = Vec::new();
//! tie_hlog::write_hlog_header(&mut log, "example", 0.0).unwrap();
//! tie_hlog::write_hlog_interval(&mut log, "total", 0.0, 1.0, &h).unwrap();
//! let summary = tie_hlog::read_hlog(&log).unwrap();
//! assert_eq!(summary.tags["total"].histogram.len(), 1);
//! ```
#![forbid(unsafe_code)]
#![warn(missing_docs)]

use std::collections::BTreeMap;
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

impl HlogSummary {
    /// Adds `h` to `tag`'s histogram (made on first use, resizing as values need), counting
    /// `intervals` more and keeping the longer span.
    fn add(
        &mut self,
        tag: &str,
        h: &Histogram<u64>,
        intervals: usize,
        span: Duration,
    ) -> Result<(), HistogramDecodeError> {
        let t = self.tags.entry(tag.to_string()).or_insert_with(|| {
            let mut histogram = Histogram::new_from(h);
            histogram.auto(true);
            TagSummary {
                histogram,
                intervals: 0,
                span: Duration::ZERO,
            }
        });
        t.histogram
            .add(h)
            .map_err(|e| HistogramDecodeError::Add(format!("{e:?}")))?;
        t.intervals += intervals;
        t.span = t.span.max(span);
        Ok(())
    }

    /// Adds `other`'s tags to these (logs of one run written side by side, a load generator's
    /// workers): histograms added, intervals counted, the longer span kept.
    ///
    /// # Errors
    /// A histogram of `other` does not fit one of these.
    pub fn merge(&mut self, other: &HlogSummary) -> Result<(), HistogramDecodeError> {
        for (tag, t) in &other.tags {
            self.add(tag, &t.histogram, t.intervals, t.span)?;
        }
        Ok(())
    }
}

/// Why a log could not be read.
#[derive(Debug, thiserror::Error)]
pub enum HlogReadError {
    /// A line is neither a comment, a header nor an interval.
    #[error("unreadable line at byte {0}")]
    Parse(usize),
    /// An interval's histogram is not valid base64 or not a valid encoded histogram.
    #[error("interval {index}: {error}")]
    Histogram {
        /// Its position among the intervals.
        index: usize,
        /// What is wrong.
        error: HistogramDecodeError,
    },
    /// No interval in the log.
    #[error("no interval in the log")]
    Empty,
}

/// Reads an interval log.
///
/// # Errors
/// [`HlogReadError`] for a malformed line or histogram, or a log without intervals.
pub fn read_hlog(bytes: &[u8]) -> Result<HlogSummary, HlogReadError> {
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
                HlogReadError::Parse(offset)
            }
        })?;
        let LogEntry::Interval(interval) = entry else {
            continue;
        };
        let bad = |error| HlogReadError::Histogram { index, error };
        let h = decode_histogram(interval.encoded_histogram()).map_err(bad)?;
        let tag = interval.tag().map_or("", |t| t.as_str()).to_string();
        let start = interval.start_timestamp();
        let end = start + interval.duration();
        let span = spans.entry(tag.clone()).or_insert((start, end));
        span.0 = span.0.min(start);
        span.1 = span.1.max(end);
        summary.add(&tag, &h, 1, Duration::ZERO).map_err(bad)?;
        index += 1;
    }
    if index == 0 {
        return Err(HlogReadError::Empty);
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

/// Why an interval's histogram could not be decoded.
#[derive(Debug, thiserror::Error)]
pub enum HistogramDecodeError {
    /// The field is not base64.
    #[error("base64: {0}")]
    Base64(base64::DecodeError),
    /// The bytes are not an encoded histogram (hdrhistogram's reason).
    #[error("not an encoded histogram: {0}")]
    Encoding(String),
    /// The histogram cannot be added to the tag's earlier ones (hdrhistogram's reason).
    #[error("cannot add: {0}")]
    Add(String),
}

/// The histogram of an interval log line's last field (see [`encode_histogram`]).
///
/// # Errors
/// Not base64, or not an encoded histogram.
pub fn decode_histogram(text: &str) -> Result<Histogram<u64>, HistogramDecodeError> {
    let raw = base64::engine::general_purpose::STANDARD
        .decode(text)
        .map_err(HistogramDecodeError::Base64)?;
    Deserializer::new()
        .deserialize(&mut &raw[..])
        .map_err(|e| HistogramDecodeError::Encoding(format!("{e:?}")))
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
