//! Metric history in ClickHouse (`[clickhouse]`) against a real server: Debian's
//! `clickhouse-server` package, installed by the test when the host lacks it, started here on
//! free ports with a data directory of its own.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use crate::common::{eventually, free_port, scratch_dir, send, TestServer, TEST_CONFIG};
use crate::journal::metric;
use serde_json::Value;

/// The `clickhouse-server` binary, installed from Debian's packages when absent; `None`
/// (a counted skip) when it is absent and only root could install it.
fn clickhouse_binary() -> Option<&'static PathBuf> {
    static BINARY: OnceLock<Option<PathBuf>> = OnceLock::new();
    let found = || {
        ["/usr/bin/clickhouse-server", "/usr/sbin/clickhouse-server"]
            .iter()
            .map(PathBuf::from)
            .find(|p| p.exists())
    };
    if found().is_none() && !rustix::process::geteuid().is_root() {
        crate::common::skip(
            crate::common::Need::Root,
            "clickhouse-server is not installed, and only root can install it (apt-get install clickhouse-server)",
        );
        return None;
    }
    let binary = BINARY.get_or_init(|| {
        if let Some(p) = found() {
            return Some(p);
        }
        let apt = |args: &[&str]| {
            Command::new("apt-get")
                .args(args)
                .env("DEBIAN_FRONTEND", "noninteractive")
                .status()
                .is_ok_and(|s| s.success())
        };
        let install = ["install", "-y", "--no-install-recommends", "clickhouse-server"];
        if !apt(&install) {
            assert!(
                apt(&["update"]) && apt(&install),
                "cannot install Debian's clickhouse-server (apt-get, as root): the ClickHouse tests need it"
            );
        }
        Some(found().expect("clickhouse-server installed"))
    });
    binary.as_ref()
}

/// `s` percent-encoded for a URL's query.
fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// A ClickHouse server of the test's own.
struct ClickHouseServer {
    binary: PathBuf,
    dir: PathBuf,
    http_port: u16,
    child: Option<Child>,
}

impl ClickHouseServer {
    /// `None`: skipped (see [`clickhouse_binary`]).
    fn start() -> Option<Self> {
        let binary = clickhouse_binary()?.clone();
        let dir = scratch_dir("clickhouse");
        let (http_port, tcp_port) = (free_port(), free_port());
        let d = dir.display();
        std::fs::write(
            dir.join("config.xml"),
            format!(
                r#"<?xml version="1.0"?>
<yandex>
    <logger><level>warning</level><console>1</console></logger>
    <http_port>{http_port}</http_port>
    <tcp_port>{tcp_port}</tcp_port>
    <listen_host>127.0.0.1</listen_host>
    <path>{d}/data/</path>
    <tmp_path>{d}/tmp/</tmp_path>
    <user_files_path>{d}/user_files/</user_files_path>
    <format_schema_path>{d}/format_schemas/</format_schema_path>
    <mark_cache_size>5368709</mark_cache_size>
    <users_config>users.xml</users_config>
    <default_profile>default</default_profile>
    <default_database>default</default_database>
</yandex>
"#
            ),
        )
        .unwrap();
        std::fs::write(
            dir.join("users.xml"),
            r#"<?xml version="1.0"?>
<yandex>
    <profiles><default></default></profiles>
    <users><default><password></password><networks><ip>127.0.0.1</ip></networks>
        <profile>default</profile><quota>default</quota></default></users>
    <quotas><default></default></quotas>
</yandex>
"#,
        )
        .unwrap();
        let mut server = Self {
            binary,
            dir,
            http_port,
            child: None,
        };
        server.spawn();
        Some(server)
    }

    /// Starts the server on its directory and waits until it answers.
    fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("server.log"))
            .unwrap();
        let child = Command::new(&self.binary)
            .arg(format!(
                "--config-file={}",
                self.dir.join("config.xml").display()
            ))
            .stdout(Stdio::from(log.try_clone().unwrap()))
            .stderr(Stdio::from(log))
            .spawn()
            .unwrap();
        self.child = Some(child);
        let started = Instant::now();
        let up = || {
            std::net::TcpStream::connect(("127.0.0.1", self.http_port)).is_ok()
                && send("GET", &format!("{}/?query=SELECT%201", self.url()), None).0 == 200
        };
        while !up() {
            assert!(
                started.elapsed() < Duration::from_secs(60),
                "ClickHouse did not start: {}",
                std::fs::read_to_string(self.dir.join("server.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Kills the server (SIGKILL: it goes away as a crash or a network cut would).
    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.http_port)
    }

    /// The rows `sql` selects, as JSON objects.
    fn select(&self, sql: &str) -> Vec<Value> {
        let url = format!(
            "{}/?query={}",
            self.url(),
            encode(&format!("{sql} FORMAT JSONEachRow"))
        );
        let (code, text) = send("GET", &url, None);
        assert_eq!(code, 200, "{sql}: {text}");
        text.lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    /// The one number `sql` selects (ClickHouse quotes 64-bit integers in JSON).
    fn number(&self, sql: &str) -> u64 {
        let rows = self.select(sql);
        let v = rows[0]
            .as_object()
            .unwrap()
            .values()
            .next()
            .unwrap()
            .clone();
        match v {
            Value::String(s) => s.parse().unwrap(),
            v => v.as_u64().unwrap(),
        }
    }
}

impl Drop for ClickHouseServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A tie server journaling mlp64 (into `journal_dir`) and pushing to `ch` with `extra` keys
/// in `[clickhouse]`; figures every 200 ms.
fn tie_server(ch: &ClickHouseServer, journal_dir: &std::path::Path, extra: &str) -> TestServer {
    let config = format!(
        "{TEST_CONFIG}\n[monitoring]\ninterval_ms = 200\n[journal]\ndir = {journal_dir:?}\n\
         rotate_seconds = 1\n[clickhouse]\nurl = \"{}\"\njournal = true\nflush_ms = 100\n{extra}",
        ch.url()
    );
    TestServer::start_with(&config, &crate::journal::repository(""))
}

/// Sends `n` mlp64 rows, one at a time.
fn predict(server: &TestServer, n: usize) {
    let f = crate::common::fixture("mlp64_v1");
    let mut client =
        tie_client::Client::connect(&server.endpoint, "mlp64", server.options()).unwrap();
    for i in 0..n {
        client.predict(&f.inputs[i % f.inputs.len()]).unwrap();
    }
}

#[test]
fn interval_figures_and_journal_rows_reach_clickhouse_and_match_the_monitor_and_the_files() {
    let Some(ch) = ClickHouseServer::start() else {
        return;
    };
    let journal_dir = scratch_dir("journal").join("files");
    let mut server = tie_server(&ch, &journal_dir, "");
    let n = 300;
    predict(&server, n);
    let url = format!(
        "{}/api/v1/internal/inference/performance/mlp64:1",
        server.http()
    );
    // The pollers hand their figures over within a flush.
    assert!(eventually(Duration::from_secs(10), || {
        let (_, text) = send("GET", &url, None);
        let monitor: Value = serde_json::from_str(&text).unwrap();
        monitor["successful_requests"] == n
    }));
    assert!(server.stop(), "a clean stop");

    // The monitor's figures, interval by interval, add up to its totals.
    let sums = ch.select(
        "SELECT sum(requests) AS requests, sum(responses) AS responses, \
         sum(successes) AS successes, sum(errors) AS errors, sum(rows) AS rows, \
         count() AS intervals, max(p99_ms) AS p99, any(host) AS host \
         FROM default.tie_metrics FINAL WHERE model = 'mlp64' AND version = '1'",
    );
    let s = &sums[0];
    let num = |k: &str| s[k].as_str().unwrap().parse::<u64>().unwrap();
    assert_eq!(num("requests"), n as u64, "{s}");
    assert_eq!(num("responses"), n as u64, "{s}");
    assert_eq!(num("successes"), n as u64, "{s}");
    assert_eq!(num("errors"), 0, "{s}");
    assert_eq!(num("rows"), n as u64, "{s}");
    assert!(num("intervals") >= 1);
    assert!(s["p99"].as_f64().unwrap() > 0.0, "{s}");
    assert!(!s["host"].as_str().unwrap().is_empty());
    // Every model has its rows, traffic or not.
    assert!(ch.number("SELECT count() FROM default.tie_metrics WHERE model = 'identity'") >= 1);

    // The journal's rows: the same as its files.
    let files = Command::new(env!("CARGO_BIN_EXE_tie"))
        .args(["journal", journal_dir.to_str().unwrap(), "--rows"])
        .output()
        .unwrap();
    assert!(files.status.success());
    let file_rows: Vec<Value> = String::from_utf8(files.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(file_rows.len(), n);
    let stored = ch.select(
        "SELECT request_id, session_id, status, source, outputs, features, confidence, time_ns \
         FROM default.tie_journal FINAL ORDER BY request_id",
    );
    assert_eq!(stored.len(), n);
    for (f, c) in file_rows.iter().zip(&stored) {
        assert_eq!(
            f["request_id"].to_string(),
            c["request_id"].as_str().unwrap()
        );
        assert_eq!(
            f["session_id"].to_string(),
            c["session_id"].as_str().unwrap()
        );
        assert_eq!(
            (f["status"].as_str(), c["status"].as_str()),
            (Some("Ok"), Some("Ok"))
        );
        assert_eq!(c["source"], "ring");
        assert_eq!(f["time_ns"].to_string(), c["time_ns"].as_str().unwrap());
        // The same f32 bits, whatever the decimal forms.
        let bits = |v: &Value| -> Vec<u32> {
            v.as_array()
                .unwrap()
                .iter()
                .map(|x| (x.as_f64().unwrap() as f32).to_bits())
                .collect()
        };
        assert_eq!(bits(&f["outputs"]), bits(&c["outputs"]));
        assert_eq!(bits(&f["features"]), bits(&c["features"]));
    }
}

#[test]
fn clickhouse_going_away_mid_run_loses_only_what_the_buffer_cannot_hold_and_counts_it() {
    let Some(mut ch) = ClickHouseServer::start() else {
        return;
    };
    let journal_dir = scratch_dir("journal").join("files");
    let mut server = tie_server(&ch, &journal_dir, "buffer_rows = 100\n");
    // Rows in ClickHouse's journal table (made with the first insert).
    let journal_in_ch = |ch: &ClickHouseServer| {
        if ch.number("EXISTS TABLE default.tie_journal") == 0 {
            return 0;
        }
        ch.number("SELECT count() FROM default.tie_journal FINAL WHERE model = 'mlp64'")
    };
    predict(&server, 40);
    assert!(eventually(Duration::from_secs(10), || journal_in_ch(&ch) == 40));

    // ClickHouse goes away: 250 more rows, of which the journal table's buffer holds 100.
    ch.kill();
    predict(&server, 250);
    let dropped = "tie_clickhouse_rows_dropped_total{table=\"journal\",reason=\"buffer_full\"}";
    assert!(
        eventually(Duration::from_secs(10), || metric(&server, dropped)
            == Some(150.0)),
        "{:?}",
        metric(&server, dropped)
    );
    assert!(eventually(Duration::from_secs(10), || {
        metric(&server, "tie_clickhouse_insert_errors_total").unwrap() >= 1.0
    }));
    // Serving went on meanwhile: every row answered (predict unwraps) and in the files.

    // Back: what was buffered arrives, the interval figures included.
    ch.spawn();
    assert!(
        eventually(Duration::from_secs(60), || journal_in_ch(&ch) == 140),
        "{}",
        journal_in_ch(&ch)
    );
    assert!(server.stop());
    let responses =
        ch.number("SELECT sum(responses) FROM default.tie_metrics FINAL WHERE model = 'mlp64'");
    assert_eq!(responses, 290, "no interval's figures were lost");
    let kept = ch.number("SELECT count() FROM default.tie_journal FINAL");
    assert_eq!(kept + 150, 290, "kept and counted add up");
    let files = Command::new(env!("CARGO_BIN_EXE_tie"))
        .args(["journal", journal_dir.to_str().unwrap(), "--rows"])
        .output()
        .unwrap();
    let rows = String::from_utf8_lossy(&files.stdout).lines().count();
    assert_eq!(rows, 290, "the files have every row");
}
