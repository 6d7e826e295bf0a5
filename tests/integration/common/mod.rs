//! Test support: a real `tie serve` process in its own socket directory, and child client
//! processes (this test binary re-run with a role in its environment).
#![allow(dead_code)]

pub mod onnx;
mod python;
mod skip;

pub use python::{python_client, python_tools};
pub use skip::{skip, Need};

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use serde_json::Value;
use tie_client::{Client, ConnectOptions, Response, Status, WaitStrategy};

static NEXT: AtomicUsize = AtomicUsize::new(0);

/// The repository root.
pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// A free TCP port on loopback (free when asked; the server binds it right after).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A fresh directory under the system temp dir, removed by the caller or left for inspection.
pub fn scratch_dir(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "tie-test-{}-{}-{tag}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Copies version `version` of example model `model` into repository `repo` as version
/// `as_version` of model `name`; returns the file.
pub fn add_version(repo: &Path, model: &str, version: u32, name: &str, as_version: u32) -> PathBuf {
    let dir = repo.join(name).join(as_version.to_string());
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("model.onnx");
    std::fs::copy(
        root()
            .join("models")
            .join(model)
            .join(version.to_string())
            .join("model.onnx"),
        &file,
    )
    .unwrap();
    file
}

/// `config` with `server.http_admin_without_token = true` unless it sets that key or
/// `server.api_token_file`.
fn admin_without_token(config: &str) -> String {
    let mut table: toml::Table = config.parse().expect("a test config is TOML");
    let server = table
        .entry("server")
        .or_insert_with(|| toml::Value::Table(Default::default()))
        .as_table_mut()
        .expect("[server] is a table");
    if !server.contains_key("api_token_file") && !server.contains_key("http_admin_without_token") {
        server.insert(
            "http_admin_without_token".into(),
            toml::Value::Boolean(true),
        );
    }
    table.to_string()
}

/// A `tie serve` process.
pub struct TestServer {
    pub child: Child,
    pub dir: PathBuf,
    pub endpoint: String,
    repository: PathBuf,
}

/// Config for tests: pollers sleep when idle so many processes share two cores.
pub const TEST_CONFIG: &str = r#"
[server]
idle = "spin-park"
idle_spin_us = 50
idle_park_us = 20
[model_deployment]
warmup_requests = 2
profile_iterations = 3
"#;

impl TestServer {
    pub fn start() -> Self {
        Self::start_with(TEST_CONFIG, &root().join("models"))
    }

    /// Starts a server with `config`. Unless the config says otherwise (`api_token_file` or
    /// `http_admin_without_token`), its state-changing HTTP endpoints need no token, as most
    /// tests drive them without one; the security tests set their own.
    pub fn start_with(config: &str, repository: &Path) -> Self {
        let dir = scratch_dir("server");
        std::fs::write(dir.join("tie.toml"), admin_without_token(config)).unwrap();
        let server = Self {
            child: Self::spawn(&dir, repository),
            dir,
            endpoint: "test".into(),
            repository: repository.into(),
        };
        server.wait_ready();
        server
    }

    /// Starts `tie serve` with `dir`'s config and socket directory, appending to its log.
    fn spawn(dir: &Path, repository: &Path) -> Child {
        let stderr = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join("server.log"))
            .unwrap();
        Command::new(env!("CARGO_BIN_EXE_tie"))
            .current_dir(root())
            .args(["serve", "--config"])
            .arg(dir.join("tie.toml"))
            .arg("--model-repository")
            .arg(repository)
            .args(["--endpoint", "test"])
            // Tests run many servers at once: each takes a free port (logged).
            .args(["--http-addr", "127.0.0.1:0"])
            .arg("--socket-dir")
            .arg(dir)
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .expect("start tie serve")
    }

    /// Starts the server again in the same directory (after it was killed or stopped); the
    /// earlier log is kept as `server.log.1`.
    pub fn restart(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        std::fs::rename(self.dir.join("server.log"), self.dir.join("server.log.1")).unwrap();
        self.child = Self::spawn(&self.dir, &self.repository);
        self.wait_ready();
    }

    /// Waits until the server listens: its socket file appears at bind, a moment before it
    /// listens (a connect in between is refused), so the log line written after both counts.
    fn wait_ready(&self) {
        let socket = self.dir.join("test.sock");
        let started = Instant::now();
        let listening =
            |log: &str| log.contains(" serving socket=") || log.contains("\"message\":\"serving\"");
        while !socket.exists() || !listening(&self.log()) {
            assert!(
                started.elapsed() < Duration::from_secs(60),
                "server did not start; log:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// `http://127.0.0.1:PORT` of the control plane (from the server's log).
    pub fn http(&self) -> String {
        format!(
            "http://{}",
            self.logged_addr("HTTP control plane listening addr=")
        )
    }

    /// `127.0.0.1:PORT` of the gRPC service (from the server's log).
    pub fn grpc(&self) -> String {
        self.logged_addr("(Open Inference Protocol) listening addr=")
    }

    /// The address the log line with `mark` names after it.
    fn logged_addr(&self, mark: &str) -> String {
        let mut found = None;
        let seen = eventually(Duration::from_secs(30), || {
            found = self.log().lines().find_map(|l| {
                let at = l.find(mark)?;
                Some(l[at + mark.len()..].split_whitespace().next()?.to_string())
            });
            found.is_some()
        });
        assert!(seen, "no {mark:?} in the log:\n{}", self.log());
        found.unwrap()
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("server.log")).unwrap_or_default()
    }

    /// `tie predict` of one row of `model` against this server (its output, whatever its
    /// status).
    pub fn predict_cli(&self, model: &str, features: &[f32]) -> std::process::Output {
        self.predict_cli_with(model, &[], features)
    }

    /// [`TestServer::predict_cli`] with more arguments (`--version latest`).
    pub fn predict_cli_with(
        &self,
        model: &str,
        args: &[&str],
        features: &[f32],
    ) -> std::process::Output {
        let features: Vec<String> = features.iter().map(|v| v.to_string()).collect();
        Command::new(env!("CARGO_BIN_EXE_tie"))
            .args(["predict", "--endpoint", &self.endpoint, "--model", model])
            .args(args)
            // `=`: a first value that starts with `-` is not taken for a flag.
            .arg(format!("--features={}", features.join(",")))
            .arg("--socket-dir")
            .arg(&self.dir)
            .output()
            .unwrap()
    }

    /// Connect options for this server: its socket directory, spin-then-yield waiting.
    pub fn options(&self) -> ConnectOptions {
        ConnectOptions {
            socket_dir: Some(self.dir.clone()),
            wait: WaitStrategy::SpinThenYield {
                spin: Duration::from_micros(20),
            },
            timeout: Duration::from_secs(10),
            ..ConnectOptions::default()
        }
    }

    pub fn signal(&self, signal: i32) {
        // SAFETY-free: plain kill(2) through the `kill` command keeps the tests free of libc.
        let status = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(self.pid().to_string())
            .status()
            .unwrap();
        assert!(status.success());
    }

    /// SIGSTOP, returning once every thread of the server is stopped.
    pub fn pause(&self) {
        self.signal(19);
        let stopped = eventually(Duration::from_secs(5), || {
            let Ok(tasks) = std::fs::read_dir(format!("/proc/{}/task", self.pid())) else {
                return false;
            };
            tasks
                .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("stat")).ok())
                .all(|stat| {
                    // The state follows the command name in parentheses.
                    stat.rsplit_once(") ")
                        .is_some_and(|(_, rest)| rest.starts_with('T'))
                })
        });
        assert!(stopped, "server did not stop");
    }

    /// SIGTERM, then wait for the exit; returns whether it exited successfully.
    pub fn stop(&mut self) -> bool {
        self.signal(15);
        self.child.wait().unwrap().success()
    }

    /// File descriptors of the server that are session segments.
    pub fn segment_fds(&self) -> usize {
        let Ok(entries) = std::fs::read_dir(format!("/proc/{}/fd", self.pid())) else {
            return 0;
        };
        entries
            .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
            .filter(|t| t.to_string_lossy().contains("tie-session"))
            .count()
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The environment variable `name` parsed, or `default` when unset or unparsable (for the
/// sizes of longer documented runs).
pub fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Runs `cmd` (a `tie serve` that must refuse to start) expecting it to fail within 60 s: one
/// that starts instead is killed and the test fails. Its exit status and stderr.
pub fn fails_within(cmd: &mut Command) -> (std::process::ExitStatus, String) {
    let mut child = cmd
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if started.elapsed() > Duration::from_secs(60) {
            let _ = child.kill();
            let _ = child.wait();
            panic!("it started instead of refusing");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
    assert!(!status.success(), "{stderr}");
    (status, stderr)
}

/// Waits until `f` holds, for at most `limit`; returns whether it did.
pub fn eventually(limit: Duration, mut f: impl FnMut() -> bool) -> bool {
    let started = Instant::now();
    while started.elapsed() < limit {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    f()
}

/// Expected outputs of a model, as committed by `models/generate.py`.
#[derive(serde::Deserialize)]
pub struct Fixture {
    pub model: String,
    pub version: u32,
    pub inputs: Vec<Vec<f32>>,
    pub outputs: Vec<Vec<f32>>,
}

pub fn fixture(name: &str) -> Fixture {
    let path = root()
        .join("tests/fixtures/expected")
        .join(format!("{name}.json"));
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// All fixtures.
pub fn fixtures() -> Vec<Fixture> {
    let mut names: Vec<String> = std::fs::read_dir(root().join("tests/fixtures/expected"))
        .unwrap()
        .map(|e| {
            e.unwrap()
                .path()
                .file_stem()
                .unwrap()
                .to_string_lossy()
                .into_owned()
        })
        .collect();
    names.sort();
    names.iter().map(|n| fixture(n)).collect()
}

/// Relative error with a floor of 1 on the scale: |a - b| / max(|b|, 1).
pub fn rel_err(a: f32, b: f32) -> f32 {
    (a - b).abs() / b.abs().max(1.0)
}

/// Re-runs this test binary as a child process running the `#[ignore]`d test `entry` with
/// `TIE_CHILD_ROLE=role`.
pub fn spawn_child(entry: &str, role: &str, envs: &[(&str, String)]) -> Child {
    let mut cmd = Command::new(std::env::current_exe().unwrap());
    cmd.args([
        "--exact",
        entry,
        "--ignored",
        "--nocapture",
        "--test-threads=1",
    ])
    .env("TIE_CHILD_ROLE", role)
    .stdout(Stdio::piped())
    .stderr(Stdio::inherit());
    for (k, v) in envs {
        cmd.env(k, v);
    }
    cmd.spawn().expect("spawn child client")
}

/// A request slot's words for `client`'s ring: `header`, then `features`.
pub fn raw_frame(
    client: &Client,
    header: tie_client::layouts::abi::RequestHeader,
    features: &[f32],
) -> Vec<u64> {
    use tie_client::layouts::abi::REQUEST_HEADER_WORDS;
    let slot_words = client.segment().geometry().request_slot_size / 8;
    let mut words = vec![0u64; slot_words];
    words[..REQUEST_HEADER_WORDS]
        .copy_from_slice(bytemuck::cast_slice(bytemuck::bytes_of(&header)));
    let body: &mut [f32] = bytemuck::cast_slice_mut(&mut words[REQUEST_HEADER_WORDS..]);
    body[..features.len()].copy_from_slice(features);
    words
}

/// The next response of `client`, waiting up to 20 s.
pub fn next_response(client: &mut Client) -> Response {
    let started = Instant::now();
    loop {
        if let Some(r) = client.poll() {
            return r;
        }
        assert!(started.elapsed() < Duration::from_secs(20), "no response");
        std::thread::yield_now();
    }
}

/// The next `n` responses of `client`, checking that no extra one follows.
pub fn responses(client: &mut Client, n: usize) -> Vec<Response> {
    let got: Vec<Response> = (0..n).map(|_| next_response(client)).collect();
    assert_eq!(client.poll(), None, "an extra response");
    got
}

/// Answers to a burst sent to a model whose batches fail: the failed batch (or batches, if the
/// poller woke mid-way) answered `ExecutionFailed`, then, once the model is marked not ready,
/// `NotReady`. Nothing else. Returns how many failed.
pub fn failed_then_not_ready(statuses: &[Status]) -> usize {
    let failed = statuses
        .iter()
        .take_while(|s| **s == Status::EXECUTION_FAILED)
        .count();
    assert!(failed > 0, "{statuses:?}");
    assert!(
        statuses[failed..].iter().all(|s| *s == Status::NOT_READY),
        "{statuses:?}"
    );
    failed
}

// HTTP helpers for the control plane.

pub fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(60)))
        .build()
        .into()
}

pub fn send(method: &str, url: &str, body: Option<&[u8]>) -> (u16, String) {
    let agent = agent();
    let response = match (method, body) {
        ("GET", _) => agent.get(url).call(),
        (_, Some(b)) => agent
            .post(url)
            .header("content-type", "application/json")
            .send(b),
        (_, None) => agent.post(url).send_empty(),
    };
    let mut response = response.unwrap_or_else(|e| panic!("{method} {url}: {e}"));
    let code = response.status().as_u16();
    let text = response
        .body_mut()
        .with_config()
        .limit(64 << 20)
        .read_to_string()
        .unwrap();
    (code, text)
}

pub fn get(url: &str) -> (u16, Value) {
    let (code, text) = send("GET", url, None);
    (
        code,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

pub fn post(url: &str, body: &Value) -> (u16, Value) {
    let (code, text) = send("POST", url, Some(body.to_string().as_bytes()));
    (
        code,
        serde_json::from_str(&text).unwrap_or_else(|_| panic!("not JSON ({code}): {text}")),
    )
}

/// The spec's `InferenceRequest` as JSON: `rows` of features for `model` (`version`), with
/// `strategy_context` (`Value::Null` for none).
pub fn inference_request(
    id: &str,
    model: &str,
    version: Option<&str>,
    rows: &[Vec<f32>],
    strategy_context: Value,
) -> Value {
    serde_json::json!({
        "request_id": id,
        "model_name": model,
        "model_version": version,
        "input_features": rows.concat(),
        "feature_names": [],
        "batch_size": rows.len(),
        "priority": "Normal",
        "timeout_ms": null,
        "strategy_context": strategy_context,
    })
}

/// POSTs an empty body, with `Authorization: Bearer token` when given; the answer as JSON.
pub fn post_empty(url: &str, token: Option<&str>) -> (u16, Value) {
    let mut request = agent().post(url);
    if let Some(t) = token {
        request = request.header("Authorization", &format!("Bearer {t}"));
    }
    let mut response = request
        .send_empty()
        .unwrap_or_else(|e| panic!("POST {url}: {e}"));
    let code = response.status().as_u16();
    let text = response.body_mut().read_to_string().unwrap();
    (
        code,
        serde_json::from_str(&text).unwrap_or_else(|_| panic!("not JSON ({code}): {text}")),
    )
}

/// Sends `total` requests from client number `c` with up to `window(sent so far)` in flight,
/// and checks every answer: its request's, in order, OK, within `tolerance` of what
/// `reference` gives for its row alone. `label` names the client in failures.
pub fn stream_checked(
    client: &mut Client,
    label: &str,
    c: usize,
    total: usize,
    window: &dyn Fn(usize) -> usize,
    reference: &dyn tie_engine::Backend,
    tolerance: crate::conformance::Tolerance,
) {
    let io = &reference.info().io;
    let mut sent = std::collections::VecDeque::new();
    let (mut next, mut answered) = (0usize, 0usize);
    while answered < total {
        while next < total && sent.len() < window(next) {
            let features: Vec<f32> = (0..io.input_width)
                .map(|i| ((i * 7 + next * 13 + c * 101) % 97) as f32 / 97.0 - 0.5)
                .collect();
            let id = client
                .submit(&features, tie_client::Priority::Normal, None)
                .unwrap();
            sent.push_back((id, features));
            next += 1;
        }
        let Some(r) = client.poll() else { continue };
        let (id, features) = sent.pop_front().unwrap();
        assert_eq!(r.request_id, id, "{label}: answers out of order");
        assert_eq!(r.status, Status::OK, "{label}, request {answered}");
        let mut expected = vec![0.0f32; io.output_width];
        reference.run_batch(&features, 1, &mut expected).unwrap();
        if let Err(why) = crate::conformance::compare(r.outputs(), &expected, tolerance) {
            panic!("{label}, request {answered}: {why}");
        }
        answered += 1;
    }
}
