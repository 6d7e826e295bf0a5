//! `tie-inspect`: shows the live state of every session of a running tie server.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Parser;
use ratatui::crossterm::event::{self, Event, KeyCode, KeyEventKind};
use tie_client::inspect::{inspect, InspectedSession};
use tie_client::ConnectError;
use tie_inspect::snapshot::{recent_frames, Snapshot};
use tie_inspect::view::{render, App};
use tie_layouts::FeatureLayout;

/// How often the live view asks the server for its sessions again.
const REATTACH: Duration = Duration::from_secs(2);

/// Live view of a running tie server's session rings.
#[derive(Debug, Parser)]
#[command(name = "tie-inspect", version, about)]
struct Args {
    /// Endpoint name of the server.
    #[arg(long, default_value = "tie")]
    endpoint: String,
    /// Socket directory (default: `$TIE_SOCKET_DIR`, else `$XDG_RUNTIME_DIR/tie` then /run/tie).
    #[arg(long)]
    socket_dir: Option<PathBuf>,
    /// Print one snapshot and exit (a table, or JSON with --json).
    #[arg(long)]
    once: bool,
    /// With --once: print JSON.
    #[arg(long, requires = "once")]
    json: bool,
    /// Refresh interval of the live view, and the sampling interval of rates with --once.
    #[arg(long, default_value_t = 500)]
    refresh_ms: u64,
    /// Directory of layout files, to name features in the detail view.
    #[arg(long, default_value = "layouts/features")]
    layouts_dir: PathBuf,
    /// Frames shown in the detail view.
    #[arg(long, default_value_t = 16)]
    frames: u64,
}

fn main() -> ExitCode {
    let args = Args::parse();
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tie-inspect: {}", tie_client::each_cause_once(e.as_ref()));
            ExitCode::FAILURE
        }
    }
}

fn attach(args: &Args) -> anyhow::Result<Vec<InspectedSession>> {
    inspect(&args.endpoint, args.socket_dir.as_deref(), Duration::from_secs(2)).map_err(|e| match e {
        ConnectError::ServerNotRunning { path, .. } => anyhow::anyhow!(
            "no tie server is running at {} (endpoint {:?})",
            path.display(),
            args.endpoint
        ),
        ConnectError::PermissionDenied { path, .. } => anyhow::anyhow!(
            "permission denied: run as the server's user or a member of its group ({})",
            path.display()
        ),
        ConnectError::VersionMismatch { ours, theirs } => anyhow::anyhow!(
            "the server speaks ABI version {theirs}, this tie-inspect {ours}: use the tie-inspect of the server's release"
        ),
        other => anyhow::Error::new(other).context("cannot inspect the server"),
    })
}

fn run(args: &Args) -> anyhow::Result<()> {
    let sessions = attach(args)?;
    if args.once {
        let first = Snapshot::take(&sessions, None);
        let at = Instant::now();
        std::thread::sleep(Duration::from_millis(args.refresh_ms));
        let snapshot = Snapshot::take(&sessions, Some((&first, at)));
        if args.json {
            println!("{}", serde_json::to_string_pretty(&snapshot)?);
        } else {
            print!("{}", snapshot.table());
        }
        return Ok(());
    }
    live(args, sessions)
}

fn live(args: &Args, mut sessions: Vec<InspectedSession>) -> anyhow::Result<()> {
    let mut terminal = ratatui::init();
    let result = (|| -> anyhow::Result<()> {
        let mut taken_at = Instant::now();
        let mut attached_at = Instant::now();
        let mut app = App::new(Snapshot::take(&sessions, None));
        let refresh = Duration::from_millis(args.refresh_ms.max(20));
        loop {
            terminal.draw(|f| render(f, &app)).context("drawing")?;
            if event::poll(refresh.saturating_sub(taken_at.elapsed()))? {
                if let Event::Key(key) = event::read()? {
                    if key.kind != KeyEventKind::Press {
                        continue;
                    }
                    if app.editing_filter {
                        match key.code {
                            KeyCode::Enter => app.editing_filter = false,
                            KeyCode::Esc => {
                                app.filter.clear();
                                app.editing_filter = false;
                            }
                            KeyCode::Backspace => {
                                app.filter.pop();
                            }
                            KeyCode::Char(c) => app.filter.push(c),
                            _ => {}
                        }
                        continue;
                    }
                    match key.code {
                        KeyCode::Char('q') => return Ok(()),
                        KeyCode::Char('p') => app.paused = !app.paused,
                        KeyCode::Char('s') => app.sort = app.sort.next(),
                        KeyCode::Char('/') => app.editing_filter = true,
                        KeyCode::Up => app.selected = app.selected.saturating_sub(1),
                        KeyCode::Down => {
                            app.selected =
                                (app.selected + 1).min(app.rows().len().saturating_sub(1))
                        }
                        KeyCode::Enter => app.detail = Some(detail(args, &sessions, &app)),
                        KeyCode::Esc => app.detail = None,
                        _ => {}
                    }
                }
            }
            if taken_at.elapsed() >= refresh && !app.paused {
                // New sessions appear and closed ones go: attach again every few seconds (each
                // attach costs the server's listener a /proc open and a send per session).
                if attached_at.elapsed() >= REATTACH {
                    if let Ok(fresh) = attach(args) {
                        sessions = fresh;
                    }
                    attached_at = Instant::now();
                }
                app.snapshot = Snapshot::take(&sessions, Some((&app.snapshot, taken_at)));
                taken_at = Instant::now();
                if app.detail.is_some() {
                    app.detail = Some(detail(args, &sessions, &app));
                }
            }
        }
    })();
    ratatui::restore();
    result
}

fn detail(
    args: &Args,
    sessions: &[InspectedSession],
    app: &App,
) -> (
    Vec<tie_inspect::snapshot::RequestView>,
    Vec<tie_inspect::snapshot::ResponseView>,
) {
    let Some(session) = app
        .selected_id()
        .and_then(|id| sessions.iter().find(|s| s.record.session_id == id))
    else {
        return (Vec::new(), Vec::new());
    };
    let layout = tie_layouts::hello::read_name(&session.record.layout_name);
    let names = FeatureLayout::from_file(&args.layouts_dir.join(format!("{layout}.toml")))
        .map(|l| l.features)
        .unwrap_or_default();
    recent_frames(session, args.frames, &names)
}
