//! The terminal UI: a table of sessions with ring gauges, and a detail view of one session's
//! last frames. [`render`] draws an [`App`] into any ratatui frame (the tests use ratatui's
//! test backend).

use ratatui::layout::{Constraint, Layout};
use ratatui::style::{Modifier, Style};
use ratatui::text::Line;
use ratatui::widgets::{Block, Borders, Paragraph, Row, Table};
use ratatui::Frame;

use crate::snapshot::{RequestView, ResponseView, RingState, SessionSnapshot, Snapshot};

/// Column the session table is sorted by.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum SortKey {
    /// Session id.
    #[default]
    Session,
    /// Oldest unanswered request first.
    Lag,
    /// Fullest response ring first.
    ResponseOccupancy,
    /// Most errors first.
    Errors,
}

impl SortKey {
    /// The next key, for the `s` key.
    pub fn next(self) -> Self {
        match self {
            Self::Session => Self::Lag,
            Self::Lag => Self::ResponseOccupancy,
            Self::ResponseOccupancy => Self::Errors,
            Self::Errors => Self::Session,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Self::Session => "session",
            Self::Lag => "lag",
            Self::ResponseOccupancy => "response ring",
            Self::Errors => "errors",
        }
    }
}

/// What the UI shows.
#[derive(Clone, Debug)]
pub struct App {
    /// The latest snapshot.
    pub snapshot: Snapshot,
    /// Selected row (in the sorted, filtered table).
    pub selected: usize,
    /// Sort column.
    pub sort: SortKey,
    /// Only sessions whose model or process contains this.
    pub filter: String,
    /// Whether the filter is being typed.
    pub editing_filter: bool,
    /// Snapshots are not refreshed.
    pub paused: bool,
    /// The selected session's last frames, when the detail view is open.
    pub detail: Option<(Vec<RequestView>, Vec<ResponseView>)>,
}

impl App {
    /// An app showing `snapshot`.
    pub fn new(snapshot: Snapshot) -> Self {
        Self {
            snapshot,
            selected: 0,
            sort: SortKey::Session,
            filter: String::new(),
            editing_filter: false,
            paused: false,
            detail: None,
        }
    }

    /// The sessions shown, sorted and filtered.
    pub fn rows(&self) -> Vec<&SessionSnapshot> {
        let mut rows: Vec<&SessionSnapshot> = self
            .snapshot
            .sessions
            .iter()
            .filter(|s| {
                self.filter.is_empty()
                    || s.model.contains(&self.filter)
                    || s.process.contains(&self.filter)
            })
            .collect();
        match self.sort {
            SortKey::Session => rows.sort_by_key(|s| s.session_id),
            SortKey::Lag => {
                rows.sort_by(|a, b| b.lag_us.unwrap_or(0.0).total_cmp(&a.lag_us.unwrap_or(0.0)))
            }
            SortKey::ResponseOccupancy => {
                rows.sort_by_key(|s| std::cmp::Reverse(s.responses.occupancy))
            }
            SortKey::Errors => rows.sort_by_key(|s| std::cmp::Reverse(s.errors)),
        }
        rows
    }

    /// The selected session's id.
    pub fn selected_id(&self) -> Option<u64> {
        self.rows().get(self.selected).map(|s| s.session_id)
    }
}

/// A ring's occupancy as `[####......] q/cap`.
pub fn ring_bar(r: &RingState, width: usize) -> String {
    let filled = if r.capacity == 0 {
        0
    } else {
        ((r.occupancy.min(r.capacity) * width as u64).div_ceil(r.capacity)) as usize
    };
    format!(
        "[{}{}] {}/{}",
        "#".repeat(filled),
        ".".repeat(width - filled),
        r.occupancy,
        r.capacity
    )
}

/// How long ago, as `1h02m`, `3m05s` or `42s`.
pub fn age(secs: f64) -> String {
    let s = secs.max(0.0) as u64;
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m{:02}s", s / 60, s % 60),
        _ => format!("{}h{:02}m", s / 3600, s % 3600 / 60),
    }
}

fn rate(r: Option<f64>) -> String {
    r.map_or("-".into(), |r| format!("{r:.0}/s"))
}

/// Draws the app.
pub fn render(frame: &mut Frame<'_>, app: &App) {
    let [top, main, bottom] = Layout::vertical([
        Constraint::Length(1),
        Constraint::Min(3),
        Constraint::Length(1),
    ])
    .areas(frame.area());
    let title = format!(
        "tie-inspect  {} sessions  sort: {}  filter: {}{}",
        app.snapshot.sessions.len(),
        app.sort.name(),
        if app.filter.is_empty() {
            "-"
        } else {
            &app.filter
        },
        if app.paused { "  [PAUSED]" } else { "" }
    );
    frame.render_widget(Paragraph::new(title), top);
    let help = if app.editing_filter {
        "type a filter, Enter to apply, Esc to clear"
    } else {
        "q quit  p pause  s sort  / filter  Enter detail  Esc back  up/down select"
    };
    frame.render_widget(Paragraph::new(help), bottom);
    match &app.detail {
        Some((requests, responses)) => render_detail(frame, main, app, requests, responses),
        None => render_table(frame, main, app),
    }
}

fn render_table(frame: &mut Frame<'_>, area: ratatui::layout::Rect, app: &App) {
    let header = Row::new([
        "session",
        "pid",
        "process",
        "model",
        "layout",
        "since",
        "state",
        "requests",
        "responses",
        "req/s",
        "resp/s",
        "err",
        "full",
        "lag us",
    ])
    .style(Style::default().add_modifier(Modifier::BOLD));
    let rows: Vec<Row<'_>> = app
        .rows()
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let row = Row::new(vec![
                s.session_id.to_string(),
                s.client_pid.to_string(),
                s.process.clone(),
                format!("{}:{}", s.model, s.model_version),
                s.layout.clone(),
                age(app.snapshot.taken_unix_s - s.connected_unix_s),
                s.state.clone(),
                ring_bar(&s.requests, 8),
                ring_bar(&s.responses, 8),
                rate(s.request_rate),
                rate(s.response_rate),
                s.errors.to_string(),
                s.ring_full.to_string(),
                s.lag_us.map_or("-".into(), |l| format!("{l:.1}")),
            ]);
            if i == app.selected {
                row.style(Style::default().add_modifier(Modifier::REVERSED))
            } else {
                row
            }
        })
        .collect();
    let widths = [
        Constraint::Length(7),
        Constraint::Length(8),
        Constraint::Length(14),
        Constraint::Length(12),
        Constraint::Length(10),
        Constraint::Length(9),
        Constraint::Length(8),
        Constraint::Length(18),
        Constraint::Length(18),
        Constraint::Length(9),
        Constraint::Length(9),
        Constraint::Length(5),
        Constraint::Length(5),
        Constraint::Length(9),
    ];
    let table = Table::new(rows, widths)
        .header(header)
        .block(Block::default().borders(Borders::ALL).title("sessions"));
    frame.render_widget(table, area);
}

fn render_detail(
    frame: &mut Frame<'_>,
    area: ratatui::layout::Rect,
    app: &App,
    requests: &[RequestView],
    responses: &[ResponseView],
) {
    let [left, right] =
        Layout::horizontal([Constraint::Percentage(60), Constraint::Percentage(40)]).areas(area);
    let id = app.selected_id().map_or("-".into(), |i| i.to_string());
    let request_lines: Vec<Line<'_>> = requests
        .iter()
        .map(|r| {
            let features: Vec<String> = r
                .features
                .iter()
                .map(|(name, v)| format!("{name}={v}"))
                .collect();
            Line::from(format!(
                "#{} id {} prio {}: {}",
                r.seq,
                r.request_id,
                r.priority,
                features.join(" ")
            ))
        })
        .collect();
    let response_lines: Vec<Line<'_>> = responses
        .iter()
        .map(|r| {
            Line::from(format!(
                "id {} {} {:?} queue {} ns compute {} ns",
                r.request_id, r.status, r.outputs, r.queue_ns, r.compute_ns
            ))
        })
        .collect();
    frame.render_widget(
        Paragraph::new(request_lines).block(
            Block::default()
                .borders(Borders::ALL)
                .title(format!("session {id}: last requests")),
        ),
        left,
    );
    frame.render_widget(
        Paragraph::new(response_lines).block(
            Block::default()
                .borders(Borders::ALL)
                .title("last responses"),
        ),
        right,
    );
}
