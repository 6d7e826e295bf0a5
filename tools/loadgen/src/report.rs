//! `tie report`: percentile tables and distributions from HdrHistogram interval logs.
//!
//! Reads the standard `.hlog` format (as the server's `[monitoring] hlog_dir` writes, or any
//! HdrHistogram log writer), adds up each tag's intervals, and prints per tag a percentile
//! table and the classic percentile distribution (value, percentile, count, 1/(1-p)) with a
//! bar per line.
#![forbid(unsafe_code)]

use std::fmt::Write as _;

use hdrhistogram::Histogram;
use tie_hlog::HlogSummary;

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
pub type Sweep = crate::SweepReport;

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

/// Appends a run summary's lines to `out`: rates, percentiles, and where every request sent
/// went.
pub fn write_summary(out: &mut String, name: &str, s: &crate::Summary) {
    let offered = s
        .offered_rps
        .map_or(String::new(), |r| format!("offered {r:.0}/s, "));
    let _ = writeln!(
        out,
        "{name}: {} loop, {} workers, {offered}sent {:.0}/s, achieved {:.0}/s; {} latencies: p50 {:.2} p90 {:.2} p99 {:.2} p99.9 {:.2} p99.99 {:.2} max {:.2} µs; send lag p99 {:.2} max {:.2} µs",
        s.mode, s.workers, s.sent_rps, s.achieved_rps, s.count, s.p50_us, s.p90_us, s.p99_us,
        s.p99_9_us, s.p99_99_us, s.max_us, s.send_lag_p99_us, s.max_send_lag_us
    );
    let _ = writeln!(
        out,
        "  sent {} = warm-up {} + ok {} ({} in the window, {} after) + errors {:?} + unanswered {}; unsent {}{}",
        s.sent, s.warmup, s.ok, s.ok_in_window, s.ok_after_window, s.errors, s.unanswered,
        s.unsent, if s.disconnected { "; the server went away" } else { "" }
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

    #[test]
    fn a_report_has_the_table_and_the_distribution() {
        let mut h = hdrhistogram::Histogram::<u64>::new(3).unwrap();
        for v in 1..=1000u64 {
            h.record(v * 1000).unwrap();
        }
        let mut log = Vec::new();
        tie_hlog::write_hlog_header(&mut log, "test", 0.0).unwrap();
        tie_hlog::write_hlog_interval(&mut log, "total", 0.0, 1.0, &h).unwrap();
        let summary = tie_hlog::read_hlog(&log).unwrap();
        let mut out = String::new();
        write_report(&mut out, "m", &summary, 1000.0, true);
        assert!(
            out.contains("total") && out.contains("percentile distribution"),
            "{out}"
        );
    }
}
