//! A local attacker's tries (RELIABILITY.md, "Local attacker"): each test makes the attack
//! and shows it fail. Those needing a second user run as root (a thread or a child process
//! switches to uid 65534); elsewhere they skip visibly.

use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::Value;
use tie_client::{Client, ConnectError, ConnectOptions};

use crate::common::onnx;
use crate::common::{
    add_version, eventually, fails_within, get, inference_request, post, post_empty, root,
    scratch_dir, skip, Need, TestServer, TEST_CONFIG,
};

const NOBODY: u32 = 65534;

fn is_root() -> bool {
    rustix::process::geteuid().is_root()
}

/// [`TEST_CONFIG`] with `extra` in its `[server]` section.
fn config_with(extra: &str) -> String {
    TEST_CONFIG.replacen("[server]\n", &format!("[server]\n{extra}\n"), 1)
}

/// Runs `tie serve` with `socket_dir`, expecting it to refuse to start; its stderr.
fn serve_refused(socket_dir: &Path, extra_args: &[&str]) -> String {
    let dir = scratch_dir("refused");
    std::fs::write(dir.join("tie.toml"), config_with("")).unwrap();
    let (_, stderr) = fails_within(
        Command::new(env!("CARGO_BIN_EXE_tie"))
            .current_dir(root())
            .args(["serve", "--config"])
            .arg(dir.join("tie.toml"))
            .arg("--model-repository")
            .arg(root().join("models"))
            .args(["--endpoint", "test", "--http-addr", "127.0.0.1:0"])
            .arg("--socket-dir")
            .arg(socket_dir)
            .args(extra_args),
    );
    stderr
}

#[test]
fn a_socket_directory_someone_else_can_change_is_refused() {
    // Writable by everyone (a squatter made it so), or a symlink to somewhere else: refused,
    // saying why.
    let base = scratch_dir("squat");
    let open = base.join("open");
    std::fs::create_dir(&open).unwrap();
    std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).unwrap();
    let err = serve_refused(&open, &[]);
    assert!(
        err.contains("socket directory") && err.contains("lets other users write"),
        "{err}"
    );
    let link = base.join("link");
    let target = base.join("target");
    std::fs::create_dir(&target).unwrap();
    std::os::unix::fs::symlink(&target, &link).unwrap();
    let err = serve_refused(&link, &[]);
    assert!(err.contains("symlink"), "{err}");
    if !is_root() {
        skip(
            Need::Root,
            "a directory owned by another user needs root to make",
        );
        return;
    }
    // Made first by another user (mode 0700, so only the owner check can tell).
    let theirs = base.join("theirs");
    std::fs::create_dir(&theirs).unwrap();
    std::os::unix::fs::chown(&theirs, Some(NOBODY), Some(NOBODY)).unwrap();
    std::fs::set_permissions(&theirs, std::fs::Permissions::from_mode(0o700)).unwrap();
    let err = serve_refused(&theirs, &[]);
    assert!(
        err.contains(&format!("belongs to uid {NOBODY}")) && err.contains("uid 0"),
        "{err}"
    );
}

/// A fake server run by uid 65534 (a thread of this root process with that uid, as another
/// user's process would be): it binds `<dir>/test.sock`, accepts one connection, and returns
/// what the client sent before hanging up.
fn fake_server(dir: &Path) -> std::thread::JoinHandle<Vec<u8>> {
    let path = dir.join("test.sock");
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let handle = std::thread::spawn(move || {
        rustix::thread::set_thread_res_uid(
            rustix::process::Uid::from_raw(NOBODY),
            rustix::process::Uid::from_raw(NOBODY),
            rustix::process::Uid::ROOT,
        )
        .unwrap();
        let listener = UnixListener::bind(&path).unwrap();
        ready_tx.send(()).unwrap();
        let (mut stream, _) = listener.accept().unwrap();
        stream
            .set_read_timeout(Some(Duration::from_millis(500)))
            .unwrap();
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        while let Ok(n) = stream.read(&mut buf) {
            if n == 0 {
                break;
            }
            got.extend_from_slice(&buf[..n]);
        }
        got
    });
    ready_rx
        .recv_timeout(Duration::from_secs(5))
        .expect("fake server bound");
    handle
}

#[test]
fn clients_refuse_a_server_run_by_another_user() {
    if !is_root() {
        skip(Need::Root, "a fake server as another user needs root");
        return;
    }
    let dir = scratch_dir("fake");
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777)).unwrap();
    // The Rust client: refused before anything is sent.
    let fake = fake_server(&dir);
    let options = ConnectOptions {
        socket_dir: Some(dir.clone()),
        reconnect: None,
        ..ConnectOptions::default()
    };
    match Client::connect("test", "identity", options.clone()) {
        Err(e @ ConnectError::UntrustedServer { .. }) => {
            let message = e.to_string();
            assert!(
                message.contains(&format!("uid {NOBODY}")) && message.contains("uid 0"),
                "{message}"
            );
        }
        Err(e) => panic!("wrong error: {e}"),
        Ok(_) => panic!("connected to a fake server"),
    }
    assert!(fake.join().unwrap().is_empty(), "the client sent to it");
    // `tie predict`: the same, with both uids named; nothing sent.
    std::fs::remove_file(dir.join("test.sock")).unwrap();
    let fake = fake_server(&dir);
    let out = Command::new(env!("CARGO_BIN_EXE_tie"))
        .args(["predict", "--endpoint", "test", "--model", "identity"])
        .arg("--socket-dir")
        .arg(&dir)
        .args(["--features", "1,2,3,4"])
        .env_remove("TIE_SERVER_UID")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains(&format!("uid {NOBODY}")) && stderr.contains("TIE_SERVER_UID"),
        "{stderr}"
    );
    assert!(fake.join().unwrap().is_empty(), "tie predict sent to it");
    // Named as the server to trust (options, or the environment for the tools): the hello
    // goes to it.
    std::fs::remove_file(dir.join("test.sock")).unwrap();
    let fake = fake_server(&dir);
    let trusting = ConnectOptions {
        server_uid: Some(NOBODY),
        connect_timeout: Duration::from_millis(300),
        timeout: Duration::from_millis(300),
        ..options
    };
    assert!(Client::connect("test", "identity", trusting).is_err());
    assert!(!fake.join().unwrap().is_empty(), "the hello was not sent");
}

/// Copies the example identity model into a fresh repository.
fn identity_repository() -> PathBuf {
    let repo = scratch_dir("repo");
    add_version(&repo, "identity", 1, "identity", 1);
    repo
}

fn api(server: &TestServer, path: &str) -> String {
    format!("{}/api/v1/internal/inference/{path}", server.http())
}

#[test]
fn http_cannot_change_the_server_without_the_token_nor_run_without_it_where_required() {
    let token_file = scratch_dir("token").join("token");
    std::fs::write(&token_file, "s3cret\n").unwrap();
    let config = config_with(&format!(
        "api_token_file = {:?}\nhttp_token_everywhere = true",
        token_file.display().to_string()
    ));
    let server = TestServer::start_with(&config, &identity_repository());
    let unload = api(&server, "models/identity:1/unload");
    let (code, body) = post_empty(&unload, None);
    assert_eq!(code, 401, "{body}");
    let (code, body) = post_empty(&api(&server, "models/reload"), Some("wrong"));
    assert_eq!(code, 401, "{body}");
    // Predictions and reads need it too.
    let request = inference_request("r", "identity", None, &[vec![1.0; 4]], Value::Null);
    let (code, text) = crate::common::send(
        "POST",
        &api(&server, "predict"),
        Some(request.to_string().as_bytes()),
    );
    assert_eq!(code, 401, "{text}");
    let (code, _) = get(&format!("{}/metrics", server.http()));
    assert_eq!(code, 401);
    // The scheme in lower case is the same scheme.
    let response = crate::common::agent()
        .post(&api(&server, "predict"))
        .header("content-type", "application/json")
        .header("authorization", "bearer s3cret")
        .send(request.to_string().as_bytes())
        .unwrap();
    assert_eq!(response.status().as_u16(), 200);
    // The ring client was never disturbed.
    let mut client = Client::connect("test", "identity", server.options()).unwrap();
    assert_eq!(
        client.predict(&[1.0, 2.0, 3.0, 4.0]).unwrap().outputs()[1],
        2.0
    );
}

#[test]
fn without_a_token_http_cannot_unload_and_ready_lists_a_missing_model() {
    let server = TestServer::start_with(
        &config_with("http_admin_without_token = false"),
        &identity_repository(),
    );
    let unload = api(&server, "models/identity:1/unload");
    let (code, body) = post_empty(&unload, None);
    assert_eq!(code, 401, "{body}");
    assert!(
        body["message"]
            .as_str()
            .is_some_and(|m| m.contains("server.api_token_file")),
        "{body}"
    );
    let mut client = Client::connect("test", "identity", server.options()).unwrap();
    client.predict(&[1.0, 2.0, 3.0, 4.0]).unwrap();
    let (code, _) = get(&format!("{}/health/ready", server.http()));
    assert_eq!(code, 200);

    // An operator who opts out can unload; readiness then says what is missing.
    let open = TestServer::start_with(
        &config_with("http_admin_without_token = true"),
        &identity_repository(),
    );
    assert!(open
        .log()
        .contains("any local user who reaches the HTTP listener"));
    let (code, body) = post_empty(&api(&open, "models/identity:1/unload"), None);
    assert_eq!(code, 200, "{body}");
    let (code, body) = get(&format!("{}/health/ready", open.http()));
    assert_eq!(code, 503, "{body}");
    let missing = body["models"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["model_key"] == "identity:1")
        .unwrap_or_else(|| panic!("{body}"));
    assert_eq!(missing["ready"], false);
    assert!(
        missing["reason"]
            .as_str()
            .is_some_and(|r| r.contains("not served")),
        "{body}"
    );
    let (code, body) = post_empty(&api(&open, "models/reload"), None);
    assert_eq!(code, 200, "{body}");
    let ready = eventually(Duration::from_secs(10), || {
        get(&format!("{}/health/ready", open.http())).0 == 200
    });
    assert!(ready, "{}", get(&format!("{}/health/ready", open.http())).1);
}

#[test]
fn http_sessions_do_not_take_the_clients_places_and_http_rows_are_capped() {
    let server = TestServer::start_with(
        &config_with("max_sessions = 1\nhttp_max_rows_per_sec = 100"),
        &identity_repository(),
    );
    // HTTP requests in parallel: their pooled sessions stay open a while after.
    let request = inference_request("r", "identity", None, &[vec![1.0; 4]], Value::Null);
    let url = api(&server, "predict");
    let threads: Vec<_> = (0..4)
        .map(|_| {
            let (url, request) = (url.clone(), request.clone());
            std::thread::spawn(move || post(&url, &request).0)
        })
        .collect();
    for t in threads {
        assert_eq!(t.join().unwrap(), 200);
    }
    // The one client place is still free.
    let mut client = Client::connect("test", "identity", server.options()).unwrap();
    client.predict(&[1.0, 2.0, 3.0, 4.0]).unwrap();
    match Client::connect("test", "identity", server.options()) {
        Err(ConnectError::Refused { message, .. }) => {
            assert!(message.contains("server.max_sessions = 1"), "{message}")
        }
        Err(e) => panic!("{e}"),
        Ok(_) => panic!("a second client got a place"),
    }
    // 100 rows a second (a burst of one full request): a second large request is refused.
    let rows = vec![vec![0.5f32; 4]; 4000];
    let big = inference_request("big", "identity", None, &rows, Value::Null);
    let (code, body) = post(&url, &big);
    assert_eq!(code, 200, "{body}");
    let (code, body) = post(&url, &big);
    assert_eq!(code, 429, "{body}");
    assert!(
        body["message"]
            .as_str()
            .is_some_and(|m| m.contains("http_max_rows_per_sec = 100")),
        "{body}"
    );
}

#[test]
fn http_on_a_unix_socket_is_reached_as_the_ring_socket_is() {
    let server = TestServer::start_with(
        &config_with("http_unix_socket = true"),
        &identity_repository(),
    );
    let path = server.dir.join("test.http.sock");
    let mode = std::fs::metadata(&path).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
    assert!(server
        .log()
        .contains(&format!("addr=unix:{}", path.display())));
    let mut stream = UnixStream::connect(&path).unwrap();
    stream
        .write_all(b"GET /health/live HTTP/1.1\r\nHost: tie\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    // A body that trickles in is cut off after 10 s.
    let mut slow = UnixStream::connect(&path).unwrap();
    slow.write_all(
        b"POST /api/v1/internal/inference/predict HTTP/1.1\r\nHost: tie\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{",
    )
    .unwrap();
    slow.set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let started = Instant::now();
    let mut buf = [0u8; 4096];
    let n = slow.read(&mut buf).unwrap();
    let answer = String::from_utf8_lossy(&buf[..n]);
    assert!(
        answer.starts_with("HTTP/1.1 400") && answer.contains("did not arrive"),
        "{answer}"
    );
    assert!(started.elapsed() < Duration::from_secs(20));
    // `tie reload` reaches it there, from a config naming the socket directory.
    let cli = server.dir.join("cli.toml");
    std::fs::write(
        &cli,
        format!(
            "[server]\nendpoint = \"test\"\nsocket_dir = {:?}\nhttp_unix_socket = true\n",
            server.dir.display().to_string()
        ),
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_tie"))
        .args(["reload", "--config"])
        .arg(&cli)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn idle_http_connections_are_capped_and_time_out() {
    let server = TestServer::start_with(
        &config_with("http_max_connections = 4"),
        &identity_repository(),
    );
    let addr = server.http().trim_start_matches("http://").to_string();
    // Four connections that never finish their headers hold every place.
    let mut idle: Vec<std::net::TcpStream> = (0..4)
        .map(|_| {
            let mut s = std::net::TcpStream::connect(&addr).unwrap();
            s.write_all(b"GET /health/live HTTP/1.1\r\nHost:").unwrap();
            s
        })
        .collect();
    std::thread::sleep(Duration::from_millis(200));
    // A fifth is closed at once.
    let mut fifth = std::net::TcpStream::connect(&addr).unwrap();
    fifth
        .set_read_timeout(Some(Duration::from_secs(2)))
        .unwrap();
    let _ = fifth.write_all(b"GET /health/live HTTP/1.1\r\nHost: x\r\n\r\n");
    let mut buf = [0u8; 64];
    assert!(
        matches!(fifth.read(&mut buf), Ok(0) | Err(_)),
        "a connection over the cap was served"
    );
    assert!(eventually(Duration::from_secs(5), || server
        .log()
        .contains("HTTP connections closed unserved")));
    // The header timeout frees their places.
    let started = Instant::now();
    for s in &mut idle {
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let n = s.read(&mut buf).unwrap_or(0);
        let text = String::from_utf8_lossy(&buf[..n]).to_string();
        assert!(n == 0 || text.starts_with("HTTP/1.1 408"), "{text}");
    }
    assert!(started.elapsed() < Duration::from_secs(25));
    let (code, _) = get(&format!("{}/health/live", server.http()));
    assert_eq!(code, 200);
}

/// Open file descriptors of process `pid`.
fn open_fds(pid: i32) -> u64 {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count() as u64)
        .unwrap_or(0)
}

#[test]
fn running_out_of_descriptors_neither_floods_the_log_nor_stops_serving() {
    let server = TestServer::start_with(&config_with(""), &identity_repository());
    let pid = server.pid();
    let http = server.http();
    // Its descriptor limit cut to what it holds plus a few, then a flood of connections that
    // never say hello.
    let limit = open_fds(pid) + 24;
    rustix::process::prlimit(
        rustix::process::Pid::from_raw(pid),
        rustix::process::Resource::Nofile,
        rustix::process::Rlimit {
            current: Some(limit),
            maximum: Some(limit),
        },
    )
    .unwrap();
    let socket = server.dir.join("test.sock");
    let before = server.log().lines().count();
    let flood: Vec<UnixStream> = (0..150)
        .filter_map(|_| UnixStream::connect(&socket).ok())
        .collect();
    std::thread::sleep(Duration::from_secs(2));
    let log = server.log();
    let failures = log
        .lines()
        .skip(before)
        .filter(|l| l.contains("accept failed"))
        .count();
    assert!(
        log.contains("out of file descriptors"),
        "the limit was not reached: {} connections\n{log}",
        flood.len()
    );
    assert!(failures <= 5, "{failures} accept warnings in 2 s");
    drop(flood);
    // Serving goes on once descriptors are free again.
    let ok = eventually(Duration::from_secs(5), || {
        Client::connect("test", "identity", server.options())
            .is_ok_and(|mut c| c.predict(&[1.0, 2.0, 3.0, 4.0]).is_ok())
    });
    assert!(ok, "{}", server.log());
    assert_eq!(get(&format!("{http}/health/live")).0, 200);
}

#[test]
fn a_descriptor_limit_too_low_for_max_sessions_is_refused_with_the_numbers() {
    let dir = scratch_dir("nofile");
    std::fs::write(dir.join("tie.toml"), config_with("max_sessions = 1024")).unwrap();
    let script = "ulimit -n 512 && exec \"$0\" \"$@\"";
    let (_, stderr) = fails_within(
        Command::new("sh")
            .args(["-c", script])
            .arg(env!("CARGO_BIN_EXE_tie"))
            .args(["serve", "--config"])
            .arg(dir.join("tie.toml"))
            .arg("--model-repository")
            .arg(identity_repository())
            .args(["--http-addr", "127.0.0.1:0", "--socket-dir"])
            .arg(&dir),
    );
    assert!(
        stderr.contains("server.max_sessions = 1024")
            && stderr.contains("allows 512")
            && stderr.contains("LimitNOFILE"),
        "{stderr}"
    );
}

#[test]
fn version_directories_are_canonical_and_every_skipped_entry_is_named() {
    let repo = scratch_dir("versions");
    add_version(&repo, "identity", 1, "identity", 1);
    // Aliases of version 1 holding another model, and names that are no version.
    for alias in ["01", "+1", "0", "abc", "4294967296"] {
        let dir = repo.join("identity").join(alias);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::copy(
            root().join("models/softmax3/1/model.onnx"),
            dir.join("model.onnx"),
        )
        .unwrap();
    }
    std::fs::create_dir_all(repo.join("identity/2")).unwrap();
    std::fs::write(repo.join("identity/2/model.onx"), b"misnamed").unwrap();
    let server = TestServer::start_with(TEST_CONFIG, &repo);
    let (_, loaded) = get(&api(&server, "models/loaded"));
    let keys: Vec<String> = loaded
        .as_array()
        .unwrap_or_else(|| panic!("{loaded}"))
        .iter()
        .filter_map(|m| m["model_key"].as_str().map(str::to_string))
        .collect();
    assert_eq!(keys, ["identity:1"], "{loaded}");
    let mut client = Client::connect("test", "identity", server.options()).unwrap();
    let r = client.predict(&[1.0, 2.0, 3.0, 4.0]).unwrap();
    assert_eq!(r.outputs(), [1.0, 2.0, 3.0, 4.0], "served from 1/");
    let log = server.log();
    for skipped in ["01", "+1", "0", "abc", "4294967296", "2"] {
        let entry = repo.join("identity").join(skipped);
        assert!(
            log.lines()
                .any(|l| l.contains("skipped") && l.contains(&entry.display().to_string())),
            "{skipped} not named\n{log}"
        );
    }
}

/// `y = sqrt(1 - x²)`: finite for the canary (|x| < 1), NaN past 1.
fn sqrt_model() -> Vec<u8> {
    onnx::model(
        vec![
            onnx::node("Mul", &["x", "x"], "sq"),
            onnx::node("Sub", &["one", "sq"], "d"),
            onnx::node("Sqrt", &["d"], "y"),
        ],
        vec![onnx::floats("one", &[1], &[1.0])],
        4,
        4,
    )
}

#[test]
fn non_finite_outputs_are_errors_and_a_non_finite_canary_refuses_the_model() {
    let repo = identity_repository();
    onnx::install(&repo, "sqrt", &sqrt_model());
    let server = TestServer::start_with(TEST_CONFIG, &repo);
    let mut client = Client::connect("test", "sqrt", server.options()).unwrap();
    let ok = client.predict(&[0.6, 0.0, 0.0, 0.0]).unwrap();
    assert!((ok.outputs()[0] - 0.8).abs() < 1e-6);
    let err = client
        .predict(&[0.0, 2.0, 0.0, 0.0])
        .unwrap_err()
        .to_string();
    assert!(err.contains("output 1 is NaN or infinite"), "{err}");
    // The client's session goes on.
    client.predict(&[0.0; 4]).unwrap();
    let request = inference_request(
        "nan",
        "sqrt",
        None,
        &[vec![2.0, 0.0, 0.0, 0.0]],
        Value::Null,
    );
    let (code, body) = post(&api(&server, "predict"), &request);
    assert_eq!(code, 500, "{body}");
    assert!(body.to_string().contains("NaN or infinite"), "{body}");
    // A model answering NaN to everything is refused at load, saying why.
    let nan = onnx::model(
        vec![onnx::node("Mul", &["x", "nan"], "y")],
        vec![onnx::floats("nan", &[1], &[f32::NAN])],
        4,
        4,
    );
    onnx::install(&repo, "nan", &nan);
    let (code, body) = post_empty(&api(&server, "models/nan/load"), None);
    assert!(code >= 400, "{code} {body}");
    assert!(body.to_string().contains("not finite"), "{body}");
}

/// Peak resident memory of process `pid`, in KiB.
fn peak_rss_kib(pid: i32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap()
}

#[test]
fn a_model_asking_for_a_huge_tensor_is_refused_before_it_is_made() {
    let repo = identity_repository();
    let server = TestServer::start_with(TEST_CONFIG, &repo);
    // A few hundred bytes asking for 2 GiB or more: y = x + sum(big), where big's shape is a
    // constant, or computed from constants (Constant value_ints, Concat), or a Tile or Range.
    let sum_into_y = |big: &str| {
        let mut sum = onnx::node("ReduceSum", &[big], "total");
        sum.attribute.push(onnx::int_attribute("keepdims", 1));
        vec![sum, onnx::node("Add", &["x", "total"], "y")]
    };
    let int_constant = |out: &str, values: &[i64]| {
        let mut n = onnx::node("Constant", &[], out);
        n.attribute.push(tract_onnx::pb::AttributeProto {
            name: "value_ints".into(),
            r#type: tract_onnx::pb::attribute_proto::AttributeType::Ints as i32,
            ints: values.to_vec(),
            ..Default::default()
        });
        n
    };
    let bombs: Vec<(&str, &str, Vec<u8>)> = vec![
        (
            "bomb",
            "ConstantOfShape",
            onnx::model(
                [
                    vec![onnx::node("ConstantOfShape", &["shape"], "big")],
                    sum_into_y("big"),
                ]
                .concat(),
                vec![onnx::ints("shape", &[2], &[32768, 16384])],
                4,
                4,
            ),
        ),
        (
            "bigbomb",
            "ConstantOfShape",
            onnx::model(
                [
                    vec![
                        int_constant("rows", &[65536]),
                        int_constant("cols", &[65536]),
                        onnx::node("Concat", &["rows", "cols"], "shape"),
                        onnx::node("ConstantOfShape", &["shape"], "big"),
                    ],
                    sum_into_y("big"),
                ]
                .concat(),
                vec![],
                4,
                4,
            ),
        ),
        (
            "tilebomb",
            "Tile",
            onnx::model(
                [
                    vec![onnx::node("Tile", &["one", "repeats"], "big")],
                    sum_into_y("big"),
                ]
                .concat(),
                vec![
                    onnx::floats("one", &[1, 1], &[1.0]),
                    onnx::ints("repeats", &[2], &[65536, 65536]),
                ],
                4,
                4,
            ),
        ),
        (
            "rangebomb",
            "Range",
            onnx::model(
                [
                    vec![onnx::node("Range", &["start", "limit", "delta"], "big")],
                    sum_into_y("big"),
                ]
                .concat(),
                vec![
                    onnx::floats("start", &[], &[0.0]),
                    onnx::floats("limit", &[], &[1e9]),
                    onnx::floats("delta", &[], &[1.0]),
                ],
                4,
                4,
            ),
        ),
    ];
    for (name, op, bomb) in bombs {
        onnx::install(&repo, name, &bomb);
        let (code, body) = post_empty(&api(&server, &format!("models/{name}/load")), None);
        assert!(code >= 400, "{name}: {code} {body}");
        let text = body.to_string();
        assert!(
            text.contains(op) && text.contains("MiB") && text.contains("max_tensor_mb"),
            "{name}: {body}"
        );
    }
    let peak = peak_rss_kib(server.pid());
    assert!(peak < 512 * 1024, "peak RSS {peak} KiB");
    // A name no client can send is refused at load too.
    let long = "m".repeat(64);
    add_version(&repo, "identity", 1, &long, 1);
    let (code, body) = post_empty(&api(&server, &format!("models/{long}/load")), None);
    assert!(code >= 400, "{code} {body}");
    assert!(body.to_string().contains("64 bytes"), "{body}");
}

#[test]
fn shutdown_leaves_another_servers_socket_and_a_removed_socket_is_logged() {
    let mut first = TestServer::start_with(TEST_CONFIG, &identity_repository());
    let socket = first.dir.join("test.sock");
    std::fs::remove_file(&socket).unwrap();
    assert!(eventually(Duration::from_secs(5), || first
        .log()
        .contains("the socket file was removed")));
    // A second server takes the endpoint in the same directory.
    let dir = first.dir.clone();
    let out = Command::new(env!("CARGO_BIN_EXE_tie"))
        .current_dir(root())
        .args(["serve", "--config"])
        .arg(dir.join("tie.toml"))
        .arg("--model-repository")
        .arg(identity_repository())
        .args([
            "--endpoint",
            "test",
            "--http-addr",
            "127.0.0.1:0",
            "--socket-dir",
        ])
        .arg(&dir)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut second = Guard(out);
    assert!(eventually(Duration::from_secs(60), || UnixStream::connect(
        &socket
    )
    .is_ok()));
    assert!(first.stop());
    assert!(
        socket.exists(),
        "the first server removed the second's socket"
    );
    let mut client = Client::connect("test", "identity", first.options()).unwrap();
    client.predict(&[1.0, 2.0, 3.0, 4.0]).unwrap();
    let _ = second.0.kill();
}

/// Kills the child when dropped.
struct Guard(std::process::Child);

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
