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

/// The font charts are drawn with (DejaVu Sans; its licence is beside it).
static FONT: &[u8] = include_bytes!("../assets/fonts/DejaVuSans.ttf");

/// Series colours: dark and distinct on white (the Tableau 10 palette, then darker shades).
const COLOURS: [(u8, u8, u8); 14] = [
    (31, 119, 180),
    (255, 127, 14),
    (44, 160, 44),
    (214, 39, 40),
    (148, 103, 189),
    (140, 86, 75),
    (227, 119, 194),
    (127, 127, 127),
    (188, 189, 34),
    (23, 190, 207),
    (0, 63, 92),
    (122, 81, 149),
    (188, 80, 144),
    (0, 109, 44),
];

/// A series' colour; beyond the palette, colours repeat (the percentile panel dashes them).
fn colour(i: usize) -> plotters::style::RGBColor {
    let (r, g, b) = COLOURS[i % COLOURS.len()];
    plotters::style::RGBColor(r, g, b)
}

/// A number as an axis label: integers without a decimal point, others with the digits
/// they need (`0.5`, `2.5`, `120`).
fn tick(v: f64) -> String {
    if v.abs() >= 10.0 || v == v.round() {
        format!("{v:.0}")
    } else {
        let text = format!("{v:.3}");
        text.trim_end_matches('0').trim_end_matches('.').to_string()
    }
}

/// The ticks of a log axis over whole decades `lo..hi`: labelled values (decades, and 2 and 5
/// times them over three decades or fewer) and unlabelled grid values.
fn log_ticks(lo: f64, hi: f64) -> (Vec<f64>, Vec<f64>) {
    let decades = (hi / lo).log10().round().max(1.0) as i32;
    let (mut labelled, mut grid) = (Vec::new(), Vec::new());
    for d in 0..decades {
        let base = lo * 10f64.powi(d);
        for m in 1..10 {
            let v = base * f64::from(m);
            if m == 1 || (decades <= 3 && (m == 2 || m == 5)) {
                labelled.push(v);
            } else {
                grid.push(v);
            }
        }
    }
    labelled.push(hi);
    (labelled, grid)
}

/// The ticks of a linear axis from 0 to `max`: multiples of a 1-2-5 step, at most 10.
fn linear_ticks(max: f64) -> Vec<f64> {
    let raw = max / 8.0;
    let magnitude = 10f64.powf(raw.log10().floor());
    let step = [1.0, 2.0, 5.0, 10.0]
        .iter()
        .map(|m| m * magnitude)
        .find(|&s| s >= raw)
        .unwrap_or(10.0 * magnitude);
    (0..)
        .map(|i| f64::from(i) * step)
        .take_while(|&v| v <= max)
        .collect()
}

/// Whole decades around `lo..hi` (positive values).
fn decades(lo: f64, hi: f64) -> (f64, f64) {
    let lo = 10f64.powf(lo.max(1e-3).log10().floor());
    let hi = 10f64.powf(hi.max(lo).log10().ceil());
    (lo, if hi > lo { hi } else { lo * 10.0 })
}

/// Width of a panel's legend column, right of its plot.
const LEGEND_WIDTH: u32 = 360;

/// What a panel's frame shows: its caption, the axes' descriptions and ticks.
struct Frame {
    caption: &'static str,
    x_desc: &'static str,
    y_desc: &'static str,
    /// Labelled x values and their labels.
    x_ticks: Vec<(f64, String)>,
    /// The x range.
    x: std::ops::Range<f64>,
    /// Whole decades of the log y axis.
    y: (f64, f64),
}

/// A panel's chart: linear x, log y.
type Chart<'a, 'b> = plotters::chart::ChartContext<
    'a,
    plotters::prelude::BitMapBackend<'b>,
    plotters::coord::cartesian::Cartesian2d<
        plotters::coord::types::RangedCoordf64,
        plotters::coord::combinators::LogCoord<f64>,
    >,
>;

type Area<'b> =
    plotters::prelude::DrawingArea<plotters::prelude::BitMapBackend<'b>, plotters::coord::Shift>;

/// The error of a drawing call, as text.
fn drawing<E: std::fmt::Display>(e: E) -> anyhow::Error {
    anyhow::anyhow!("drawing the chart: {e}")
}

/// Draws a panel's frame in `plot` (grid, axes, ticks, their labels, caption and axis
/// descriptions; text through `pen`, on `root`) and returns its chart for the series.
fn frame<'a, 'b>(
    root: &Area<'b>,
    plot: &'a Area<'b>,
    f: &Frame,
    pen: &crate::text::Pen,
) -> anyhow::Result<Chart<'a, 'b>> {
    use crate::text::Anchor;
    use plotters::prelude::*;
    let mut chart = ChartBuilder::on(plot)
        .margin(20)
        .margin_top(50)
        .margin_right(50)
        .x_label_area_size(50)
        .y_label_area_size(80)
        .build_cartesian_2d(f.x.clone(), (f.y.0..f.y.1).log_scale())
        .map_err(drawing)?;
    let (y_labelled, y_grid) = log_ticks(f.y.0, f.y.1);
    let grid = |chart: &mut Chart<'a, 'b>, points: [(f64, f64); 2], strong: bool| {
        let style = if strong {
            BLACK.mix(0.25)
        } else {
            BLACK.mix(0.08)
        };
        chart
            .draw_series(LineSeries::new(points, style.stroke_width(1)))
            .map(|_| ())
    };
    for &y in &y_grid {
        grid(&mut chart, [(f.x.start, y), (f.x.end, y)], false).map_err(drawing)?;
    }
    for &y in &y_labelled {
        grid(&mut chart, [(f.x.start, y), (f.x.end, y)], true).map_err(drawing)?;
    }
    for (x, _) in &f.x_ticks {
        grid(&mut chart, [(*x, f.y.0), (*x, f.y.1)], true).map_err(drawing)?;
    }
    let (xs, ys) = chart.plotting_area().get_pixel_range();
    root.draw(&Rectangle::new(
        [(xs.start, ys.start), (xs.end - 1, ys.end - 1)],
        BLACK.stroke_width(1),
    ))
    .map_err(drawing)?;
    for (x, label) in &f.x_ticks {
        let (px, _) = chart.backend_coord(&(*x, f.y.0));
        root.draw(&PathElement::new(
            vec![(px, ys.end), (px, ys.end + 5)],
            BLACK,
        ))
        .map_err(drawing)?;
        pen.draw(root, label, (px, ys.end + 8), Anchor::Top)
            .map_err(drawing)?;
    }
    for &y in &y_labelled {
        let (_, py) = chart.backend_coord(&(f.x.start, y));
        root.draw(&PathElement::new(
            vec![(xs.start - 5, py), (xs.start, py)],
            BLACK,
        ))
        .map_err(drawing)?;
        pen.draw(root, &tick(y), (xs.start - 8, py), Anchor::Right)
            .map_err(drawing)?;
    }
    let centre = (xs.start + xs.end) / 2;
    pen.draw(root, f.x_desc, (centre, ys.end + 30), Anchor::Top)
        .map_err(drawing)?;
    pen.draw(root, f.y_desc, (xs.start, ys.start - 14), Anchor::Left)
        .map_err(drawing)?;
    let caption = crate::text::Pen { px: 24.0, ..*pen };
    caption
        .draw(root, f.caption, (centre, ys.start - 44), Anchor::Top)
        .map_err(drawing)?;
    Ok(chart)
}

/// Draws the legend of a panel in `area` (a column beside the plot): a line of its colour and
/// dash, and the label, per series.
fn draw_legend(
    root: &Area<'_>,
    area: &Area<'_>,
    entries: &[(String, plotters::style::ShapeStyle, bool)],
    pen: &crate::text::Pen,
) -> anyhow::Result<()> {
    use plotters::prelude::*;
    let (xs, ys) = area.get_pixel_range();
    let (x0, y0) = (xs.start, ys.start + 80);
    for (i, (label, style, dashed)) in entries.iter().enumerate() {
        let y = y0 + 22 * i as i32;
        let segments: Vec<(i32, i32)> = if *dashed {
            vec![(0, 6), (10, 16), (20, 26)]
        } else {
            vec![(0, 28)]
        };
        for (a, b) in segments {
            root.draw(&PathElement::new(vec![(x0 + a, y), (x0 + b, y)], *style))
                .map_err(drawing)?;
        }
        // Long labels keep their end (the file and tag that tell series apart).
        let chars: Vec<char> = label.chars().collect();
        let shown: String = if chars.len() > 40 {
            std::iter::once('…')
                .chain(chars[chars.len() - 39..].iter().copied())
                .collect()
        } else {
            label.clone()
        };
        pen.draw(root, &shown, (x0 + 36, y), crate::text::Anchor::Left)
            .map_err(drawing)?;
    }
    Ok(())
}

/// Draws a PNG at `path`: latency by percentile of every (log, tag) (percentile axis in nines
/// and latency on a log axis, as HdrHistogram's plots), and below it latency against throughput
/// for each sweep with its p99 bound and its knee. Legends are beside the plots.
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
    anyhow::ensure!(
        !logs.is_empty() || !sweeps.is_empty(),
        "nothing to draw: give .hlog files or a sweep.json"
    );
    let font = ab_glyph::FontRef::try_from_slice(FONT).map_err(drawing)?;
    let pen = crate::text::Pen {
        font: &font,
        px: 15.0,
        colour: plotters::style::RGBColor(0, 0, 0),
    };
    const PANEL: u32 = 560;
    const WIDTH: u32 = 1400;
    // A panel for the percentiles when there are logs, one for the sweeps when there are any.
    let height = match (logs.is_empty(), sweeps.is_empty()) {
        (false, false) => 2 * PANEL,
        _ => PANEL,
    };
    let root = BitMapBackend::new(path, (WIDTH, height)).into_drawing_area();
    root.fill(&WHITE).map_err(drawing)?;
    let (top, bottom) = match (logs.is_empty(), sweeps.is_empty()) {
        (false, true) => (Some(root.clone()), None),
        (true, false) => (None, Some(root.clone())),
        _ => {
            let (a, b) = root.split_vertically(PANEL);
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
        let (plot, legend) = top.split_horizontally(WIDTH - LEGEND_WIDTH);
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
            .filter(|(_, h)| !h.is_empty())
            .collect();
        let value = |h: &Histogram<u64>, q: f64| h.value_at_quantile(q) as f64 / units_per_us;
        let y_max = series
            .iter()
            .map(|(_, h)| value(h, 1.0 - 10f64.powf(-NINES)))
            .fold(1e-3, f64::max);
        let y_min = series
            .iter()
            .map(|(_, h)| value(h, 0.0))
            .fold(y_max, f64::min);
        let y = decades(y_min, y_max);
        let x_ticks = (0..=NINES as i32)
            .map(|n| {
                let label = match n {
                    0 => "0%".to_string(),
                    n => format!(
                        "{:.*}%",
                        (n - 2).max(0) as usize,
                        100.0 * (1.0 - 10f64.powi(-n))
                    ),
                };
                (f64::from(n), label)
            })
            .collect();
        let frame_of = Frame {
            caption: "Latency by percentile",
            x_desc: "percentile",
            y_desc: "latency (µs, log scale)",
            x_ticks,
            x: 0.0..NINES,
            y,
        };
        let mut chart = frame(&root, &plot, &frame_of, &pen)?;
        let mut entries = Vec::new();
        for (i, (label, h)) in series.iter().enumerate() {
            let style = colour(i).stroke_width(2);
            let points: Vec<(f64, f64)> = (0..=500)
                .map(|k| {
                    let x = NINES * k as f64 / 500.0;
                    (x, value(h, 1.0 - 10f64.powf(-x)).max(y.0))
                })
                .collect();
            // Past the palette, colours come again, dashed.
            let dashed = i >= COLOURS.len();
            if dashed {
                chart
                    .draw_series(DashedLineSeries::new(points, 8, 5, style))
                    .map_err(drawing)?;
            } else {
                chart
                    .draw_series(LineSeries::new(points, style))
                    .map_err(drawing)?;
            }
            entries.push((label.clone(), style, dashed));
        }
        draw_legend(&root, &legend, &entries, &pen)?;
    }
    if let Some(bottom) = bottom {
        let (plot, legend) = bottom.split_horizontally(WIDTH - LEGEND_WIDTH);
        let points = || sweeps.iter().flat_map(|(_, s)| s.points.iter());
        let x_max = points()
            .map(|p| p.offered_rps.max(p.achieved_rps))
            .fold(1.0, f64::max)
            * 1.05;
        // Latencies and every bound on a log axis: the bound is drawn however far it is.
        let values = || {
            points()
                .flat_map(|p| [p.p50_us, p.p99_us])
                .chain(sweeps.iter().map(|(_, s)| s.p99_bound_us))
                .filter(|&v| v > 0.0)
        };
        let y_max = values().fold(1e-3, f64::max);
        let y = decades(values().fold(y_max, f64::min), y_max);
        let frame_of = Frame {
            caption: "Latency against throughput (sweep)",
            x_desc: "achieved requests per second",
            y_desc: "latency (µs, log scale)",
            x_ticks: linear_ticks(x_max)
                .into_iter()
                .map(|x| (x, tick(x)))
                .collect(),
            x: 0.0..x_max,
            y,
        };
        let mut chart = frame(&root, &plot, &frame_of, &pen)?;
        let mut entries = Vec::new();
        for (i, (name, s)) in sweeps.iter().enumerate() {
            let name = short(name);
            for (j, (what, pick)) in [("p50", 0usize), ("p99", 1)].into_iter().enumerate() {
                let style = colour(2 * i + j).stroke_width(2);
                let points: Vec<(f64, f64)> = s
                    .points
                    .iter()
                    .map(|p| (p.achieved_rps, if pick == 0 { p.p50_us } else { p.p99_us }))
                    .filter(|&(_, v)| v > 0.0)
                    .collect();
                chart
                    .draw_series(LineSeries::new(points.clone(), style))
                    .map_err(drawing)?;
                chart
                    .draw_series(
                        points
                            .into_iter()
                            .map(|p| Circle::new(p, 4, style.color.filled())),
                    )
                    .map_err(drawing)?;
                entries.push((format!("{name} {what}"), style, false));
            }
            // The bound, dashed, across the panel.
            let bound = colour(2 * i + 1).mix(0.8).stroke_width(2);
            chart
                .draw_series(DashedLineSeries::new(
                    [(0.0, s.p99_bound_us), (x_max, s.p99_bound_us)],
                    10,
                    6,
                    bound,
                ))
                .map_err(drawing)?;
            entries.push((
                format!("{name} p99 bound {} µs", tick(s.p99_bound_us)),
                bound,
                true,
            ));
            // The knee: the last sustained point, ringed and named.
            if let Some(knee) = s
                .knee_rps
                .and_then(|k| s.points.iter().find(|p| p.offered_rps == k))
            {
                let at = (knee.achieved_rps, knee.p99_us.max(y.0));
                let ring = BLACK.stroke_width(2);
                chart
                    .draw_series([Circle::new(at, 9, ring)])
                    .map_err(drawing)?;
                let what = if s.crossed {
                    "knee"
                } else {
                    "highest rate tried"
                };
                let (px, py) = chart.backend_coord(&at);
                pen.draw(
                    &root,
                    &format!("{what}: {}/s", tick(knee.offered_rps)),
                    (px + 14, py + 14),
                    crate::text::Anchor::Left,
                )
                .map_err(drawing)?;
                entries.push((format!("{name} {what} (ringed)"), ring, false));
            }
        }
        draw_legend(&root, &legend, &entries, &pen)?;
    }
    root.present().map_err(drawing)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn axis_ticks_are_round_numbers_written_plainly() {
        assert_eq!(tick(40000.0), "40000");
        assert_eq!(tick(2.0), "2");
        assert_eq!(tick(0.5), "0.5");
        assert_eq!(tick(0.01), "0.01");
        assert_eq!(
            linear_ticks(42000.0),
            [0.0, 10000.0, 20000.0, 30000.0, 40000.0]
        );
        assert_eq!(
            linear_ticks(8.0),
            [0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0]
        );
        let (labelled, grid) = log_ticks(10.0, 1000.0);
        assert_eq!(labelled, [10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0]);
        assert_eq!(grid.len(), 12);
        let (labelled, _) = log_ticks(0.01, 100000.0);
        assert_eq!(
            labelled.len(),
            8,
            "decades only over a wide range: {labelled:?}"
        );
        assert_eq!(decades(0.07, 11_000.0), (0.01, 100_000.0));
        assert_eq!(decades(5.0, 5.0), (1.0, 10.0));
    }

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
