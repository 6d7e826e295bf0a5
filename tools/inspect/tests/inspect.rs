//! tie-inspect against a running server: the JSON snapshot of sessions in known states, the
//! proof that inspecting changes nothing, the plain table, the messages when it cannot attach,
//! and the rendering of a known state.

#[path = "../../../tests/integration/common/skip.rs"]
mod skip;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use ratatui::backend::TestBackend;
use ratatui::Terminal;
use tie::config::ServiceConfig;
use tie::dataplane::Server;
use tie::models::{load_repository, LoadOptions};
use tie_client::{Client, ConnectOptions, Priority, SubmitError};
use tie_inspect::snapshot::{RequestView, ResponseView, RingState, SessionSnapshot, Snapshot};
use tie_inspect::view::{render, App};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn scratch(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("tie-inspect-{}-{tag}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn start_server(dir: &Path) -> Server {
    let mut config = ServiceConfig::default();
    config.server.endpoint = "insp".into();
    config.server.socket_dir = Some(dir.to_path_buf());
    config.server.idle = tie::config::IdleStrategy::SpinPark;
    let options = LoadOptions {
        layouts_dir: root().join("layouts/features"),
        warmup_requests: 1,
        profile_iterations: 0,
        ..LoadOptions::from_config(&config)
    };
    let models: Vec<_> = load_repository(&root().join("models"), &options)
        .unwrap()
        .into_iter()
        .filter(|m| m.name == "mlp64")
        .collect();
    Server::start(&config, models).unwrap()
}

fn client(dir: &Path, capacity: u32) -> Client {
    let options = ConnectOptions {
        socket_dir: Some(dir.to_path_buf()),
        request_capacity: capacity,
        response_capacity: capacity,
        ..ConnectOptions::default()
    };
    Client::connect("insp", "mlp64", options).unwrap()
}

fn inspect_cli(dir: &Path, extra: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_tie-inspect"))
        .args(["--endpoint", "insp", "--socket-dir"])
        .arg(dir)
        .args(["--refresh-ms", "50"])
        .args(extra)
        .output()
        .unwrap()
}

fn wait_for(mut f: impl FnMut() -> bool) -> bool {
    for _ in 0..500 {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    false
}

#[test]
fn json_snapshot_shows_sessions_in_known_states() {
    let dir = scratch("json");
    let server = start_server(&dir);
    let features = vec![0.5f32; 64];
    let idle = client(&dir, 8);
    // A client that stopped reading: its response ring fills, then it is refused.
    let mut stalled = client(&dir, 4);
    for _ in 0..4 {
        stalled.submit(&features, Priority::Normal, None).unwrap();
    }
    assert!(matches!(
        stalled.submit(&features, Priority::Normal, None),
        Err(SubmitError::QueueFull { .. })
    ));
    // A client that died: its session is reclaimed and no longer listed.
    let dead_id = {
        let dead = client(&dir, 8);
        dead.session_id()
    };
    assert!(wait_for(|| {
        let out = inspect_cli(&dir, &["--once", "--json"]);
        let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        json["sessions"].as_array().unwrap().len() == 2
            && json["sessions"][1]["responses"]["occupancy"] == 4
    }));
    let out = inspect_cli(&dir, &["--once", "--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let sessions = json["sessions"].as_array().unwrap();
    let ids: Vec<u64> = sessions
        .iter()
        .map(|s| s["session_id"].as_u64().unwrap())
        .collect();
    assert_eq!(ids, [idle.session_id(), stalled.session_id()]);
    assert!(!ids.contains(&dead_id));
    let (i, s) = (&sessions[0], &sessions[1]);
    assert_eq!(i["model"], "mlp64");
    assert_eq!(i["layout"], "mlp64");
    assert_eq!(i["state"], "running");
    assert_eq!(i["client_pid"], std::process::id());
    assert_eq!(i["requests"]["tail"], 0);
    assert_eq!(i["unanswered"], 0);
    assert!(i["lag_us"].is_null());
    assert_eq!(i["request_rate"], 0.0);
    assert_eq!(s["requests"]["tail"], 4);
    assert_eq!(s["responses"]["occupancy"], 4);
    assert_eq!(s["responses"]["capacity"], 4);
    assert_eq!(s["ring_full"], 1);
    assert_eq!(s["errors"], 0);
    assert_eq!(s["unanswered"], 0);
    // The plain table names the same sessions.
    let out = inspect_cli(&dir, &["--once"]);
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(
        table.contains("mlp64:1") && table.contains("4/4"),
        "{table}"
    );
    // With the live view's columns: the layout, the age and the rates.
    let header = table.lines().next().unwrap_or_default();
    for column in ["layout", "since", "req/s", "resp/s"] {
        assert!(header.contains(column), "{column}: {table}");
    }
    assert!(table.contains("mlp64 "), "the layout's name: {table}");
    drop((idle, stalled));
    server.shutdown();
}

#[test]
fn inspecting_changes_no_ring_content_or_index() {
    let dir = scratch("nochange");
    let server = start_server(&dir);
    let mut c = client(&dir, 8);
    let features: Vec<f32> = (0..64).map(|i| i as f32).collect();
    for _ in 0..5 {
        c.predict(&features).unwrap();
    }
    // A request left unanswered would be answered meanwhile: keep the session quiet.
    let words = |c: &Client| -> Vec<u64> {
        c.segment()
            .words()
            .iter()
            .map(|w| w.load(std::sync::atomic::Ordering::Acquire))
            .collect()
    };
    let before = words(&c);
    for _ in 0..3 {
        let out = inspect_cli(&dir, &["--once", "--json"]);
        assert!(out.status.success());
    }
    let sessions =
        tie_client::inspect::inspect("insp", Some(&dir), Duration::from_secs(2)).unwrap();
    let (requests, responses) = tie_inspect::snapshot::recent_frames(&sessions[0], 3, &[]);
    assert_eq!(requests.len(), 3);
    assert_eq!(requests[2].features[5], ("f5".to_string(), 5.0));
    assert_eq!(responses.len(), 3);
    assert_eq!(responses[2].status, "Ok");
    drop(sessions);
    assert_eq!(before, words(&c), "inspecting changed the segment");
    server.shutdown();
}

#[test]
fn clear_messages_when_it_cannot_attach() {
    let dir = scratch("none");
    let out = inspect_cli(&dir, &["--once"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no tie server is running"), "{err}");

    // Another user: the socket (mode 0600) refuses it.
    if rustix_euid_is_root() && Command::new("runuser").arg("--help").output().is_ok() {
        let server = start_server(&dir);
        std::fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .unwrap();
        let out = Command::new("runuser")
            .args(["-u", "nobody", "--"])
            .arg(env!("CARGO_BIN_EXE_tie-inspect"))
            .args(["--endpoint", "insp", "--once", "--socket-dir"])
            .arg(&dir)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success());
        assert!(err.contains("permission denied"), "{err}");
        server.shutdown();
    } else {
        skip::skip(
            skip::Need::Root,
            "the other-user check needs root and runuser",
        );
    }
}

fn rustix_euid_is_root() -> bool {
    std::fs::read_to_string("/proc/self/status").is_ok_and(|s| {
        s.lines()
            .find_map(|l| l.strip_prefix("Uid:"))
            .and_then(|ids| ids.split_whitespace().nth(1).map(|e| e == "0"))
            .unwrap_or(false)
    })
}

fn known_snapshot() -> Snapshot {
    let session = |id: u64, model: &str, resp: u64, lag: Option<f64>| SessionSnapshot {
        session_id: id,
        client_pid: 4242,
        process: "trader".into(),
        model: model.into(),
        model_version: 1,
        layout: "mlp64".into(),
        connected_unix_s: 1000.0 - 125.0,
        state: "running".into(),
        requests: RingState {
            head: 10,
            tail: 12,
            occupancy: 2,
            capacity: 8,
        },
        responses: RingState {
            head: 6,
            tail: 6 + resp,
            occupancy: resp,
            capacity: 8,
        },
        request_rate: Some(1000.0),
        response_rate: None,
        errors: id,
        ring_full: 0,
        unanswered: 2,
        lag_us: lag,
    };
    Snapshot {
        taken_unix_s: 1000.0,
        sessions: vec![
            session(1, "mlp64", 8, None),
            session(2, "multi", 4, Some(12.5)),
        ],
    }
}

fn screen(app: &App) -> String {
    let mut terminal = Terminal::new(TestBackend::new(160, 12)).unwrap();
    terminal.draw(|f| render(f, app)).unwrap();
    let buffer = terminal.backend().buffer().clone();
    (0..buffer.area.height)
        .map(|y| {
            (0..buffer.area.width)
                .map(|x| buffer[(x, y)].symbol().to_string())
                .collect::<String>()
        })
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn renders_a_known_state() {
    let mut app = App::new(known_snapshot());
    let text = screen(&app);
    assert!(text.contains("2 sessions"), "{text}");
    assert!(text.contains("[########] 8/8"), "{text}");
    assert!(text.contains("[####....] 4/8"), "{text}");
    assert!(text.contains("[##......] 2/8"), "{text}");
    assert!(text.contains("1000/s") && text.contains("12.5"), "{text}");
    assert!(text.contains("2m05s"), "connected since: {text}");
    // Every header stands over its column.
    let lines: Vec<&str> = text.lines().collect();
    let header = lines.iter().find(|l| l.contains("session pid")).unwrap();
    let row = lines.iter().find(|l| l.contains("multi:1")).unwrap();
    for (label, cell) in [("since", "2m05s"), ("state", "running"), ("lag us", "12.5")] {
        assert_eq!(
            header.find(label),
            row.find(cell),
            "{label} is not over {cell}:\n{text}"
        );
    }
    // Sorting by lag puts session 2 first; filtering keeps only matching models.
    app.sort = app.sort.next();
    assert_eq!(app.selected_id(), Some(2));
    app.filter = "mlp".into();
    assert_eq!(app.rows().len(), 1);
    app.filter.clear();
    app.paused = true;
    assert!(screen(&app).contains("[PAUSED]"));
    app.detail = Some((
        vec![RequestView {
            seq: 11,
            request_id: 12,
            priority: 3,
            deadline_ns: 0,
            features: vec![("bid".into(), 1.5), ("ask".into(), 2.5)],
        }],
        vec![ResponseView {
            request_id: 12,
            status: "Timeout".into(),
            outputs: vec![],
            queue_ns: 5,
            compute_ns: 0,
        }],
    ));
    let text = screen(&app);
    assert!(
        text.contains("bid=1.5 ask=2.5") && text.contains("Timeout"),
        "{text}"
    );
}
