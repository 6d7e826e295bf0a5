//! `tie serve` refuses bad configuration with an error naming what is wrong, and logs as JSON
//! when asked.

use std::process::Command;

use crate::common::Need;
use crate::common::{root, scratch_dir, TestServer};

/// Runs `tie serve` expecting it to fail at start-up; returns its stderr.
fn serve_fails(config: &str, repository: &std::path::Path) -> String {
    let dir = scratch_dir("bad-config");
    let config_path = dir.join("tie.toml");
    std::fs::write(&config_path, config).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_tie"))
        .current_dir(root())
        .args(["serve", "--config"])
        .arg(&config_path)
        .arg("--model-repository")
        .arg(repository)
        .args(["--http-addr", "127.0.0.1:0"])
        .arg("--socket-dir")
        .arg(&dir)
        .output()
        .unwrap();
    assert!(!out.status.success(), "tie serve started with a bad config");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// A repository holding one copy of the mlp64 model, with `config` as its config.toml.
fn repository_with(config: &str) -> std::path::PathBuf {
    let repo = scratch_dir("repo");
    let version = repo.join("m/1");
    std::fs::create_dir_all(&version).unwrap();
    std::fs::copy(
        root().join("models/mlp64/1/model.onnx"),
        version.join("model.onnx"),
    )
    .unwrap();
    std::fs::write(repo.join("m/config.toml"), config).unwrap();
    repo
}

#[test]
fn an_api_token_file_it_cannot_read_is_named_not_the_http_address() {
    let dir = scratch_dir("token-missing");
    let missing = dir.join("no-such-token");
    let err = serve_fails(
        &format!("[server]\napi_token_file = {missing:?}\n"),
        &repository_with(""),
    );
    assert!(
        err.contains("cannot read the control plane's API token")
            && err.contains("server.api_token_file")
            && err.contains("no-such-token"),
        "{err}"
    );
    assert!(!err.contains("http_addr"), "{err}");
}

#[test]
fn a_listener_that_cannot_bind_is_named_by_its_setting() {
    // 192.0.2.0/24 is TEST-NET-1: no interface of this host has it.
    let err = serve_fails(
        "[server]\ngrpc_addr = \"192.0.2.1:8001\"\n",
        &repository_with(""),
    );
    assert!(
        err.contains("cannot serve the control plane: server.grpc_addr 192.0.2.1:8001"),
        "{err}"
    );
    assert!(!err.contains("http_addr"), "{err}");
}

#[test]
fn a_model_asking_for_a_journal_on_a_server_without_one_is_refused_with_the_fix() {
    let err = serve_fails("", &repository_with("journal = true\n"));
    assert!(
        err.contains("journal = true, but the server keeps no journal: set [journal] dir"),
        "{err}"
    );
    let err = serve_fails("", &repository_with("journal_sample_rate = 0\n"));
    assert!(
        err.contains("journal_sample_rate = 0: must be in (0, 1]"),
        "{err}"
    );
    let err = serve_fails("[journal]\nrotate_seconds = 0\n", &repository_with(""));
    assert!(err.contains("journal.rotate_seconds"), "{err}");
}

#[test]
fn clickhouse_settings_that_cannot_work_are_refused_with_the_key() {
    let repo = repository_with("");
    for (config, says) in [
        (
            "[clickhouse]\nurl = \"https://ch:8443\"\n",
            "clickhouse.url = https://ch:8443: must be an http:// URL",
        ),
        (
            "[clickhouse]\nurl = \"http://127.0.0.1:8123\"\nmetrics_table = \"m; DROP TABLE x\"\n",
            "clickhouse.metrics_table",
        ),
        (
            "[clickhouse]\nurl = \"http://127.0.0.1:8123\"\njournal = true\n",
            "the journal's rows need a journal: set [journal] dir",
        ),
        (
            "[clickhouse]\nbuffer_rows = 0\n",
            "clickhouse.buffer_rows = 0",
        ),
    ] {
        let err = serve_fails(config, &repo);
        assert!(err.contains(says), "{config}: {err}");
    }
    // A password file others can read is refused.
    let dir = scratch_dir("ch-secret");
    let secret = dir.join("password");
    std::fs::write(&secret, "s3cret\n").unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o644)).unwrap();
    let err = serve_fails(
        &format!("[clickhouse]\nurl = \"http://127.0.0.1:8123\"\npassword_file = {secret:?}\n"),
        &repo,
    );
    assert!(err.contains("others may read it: chmod 600"), "{err}");
}

#[test]
fn unknown_service_config_keys_are_named() {
    let err = serve_fails(
        "[batch_processing]\nmax_batch_sise = 8\n",
        &root().join("models"),
    );
    assert!(err.contains("max_batch_sise"), "{err}");
    let err = serve_fails("[server]\npoller_cores = [4096]\n", &root().join("models"));
    assert!(
        err.contains("server.poller_cores") && err.contains("4096"),
        "{err}"
    );
}

#[test]
fn errors_name_each_cause_once() {
    // A repository that does not exist: the OS's reason once, not once per layer.
    let err = serve_fails("", &scratch_dir("missing").join("models-missing"));
    assert_eq!(err.matches("No such file or directory").count(), 1, "{err}");
    // Said as the model repository, with where to set it.
    assert!(
        err.contains("cannot read the model repository") && err.contains("--model-repository"),
        "{err}"
    );
    // A model the loader refuses: the backend's reason once.
    let repo = repository_with("");
    std::fs::write(repo.join("m/1/model.onnx"), b"not a model").unwrap();
    let err = serve_fails("", &repo);
    let line = err
        .lines()
        .find(|l| l.starts_with("error:"))
        .unwrap_or(&err);
    assert_eq!(line.matches("cannot read ONNX model").count(), 1, "{err}");
    assert_eq!(line.matches("failed to decode").count(), 1, "{err}");
}

#[test]
fn bad_model_configs_are_named() {
    let err = serve_fails("", &repository_with("layuot = \"mlp64\"\n"));
    assert!(err.contains("layuot"), "{err}");
    // A layout whose width differs from the model's input.
    let repo = repository_with("layout = \"narrow\"\n");
    let layouts = scratch_dir("layouts");
    std::fs::write(
        layouts.join("narrow.toml"),
        "name = \"narrow\"\ndtype = \"f32\"\nfeatures = [\"a\", \"b\"]\n",
    )
    .unwrap();
    let config = format!("[server]\nlayouts_dir = {:?}\n", layouts.to_str().unwrap());
    let err = serve_fails(&config, &repo);
    assert!(err.contains("has 2 features, the model reads 64"), "{err}");
    // A layout that does not exist.
    let err = serve_fails("", &repository_with("layout = \"missing\"\n"));
    assert!(err.contains("missing"), "{err}");
    // An ONNX file that is not one.
    let repo = repository_with("");
    std::fs::write(repo.join("m/1/model.onnx"), b"not a model").unwrap();
    let err = serve_fails("", &repo);
    assert!(err.contains("model.onnx"), "{err}");
    // Batching overrides out of range.
    let err = serve_fails("", &repository_with("max_queue_size = 2000000000\n"));
    assert!(err.contains("max_queue_size = 2000000000"), "{err}");
    let err = serve_fails(
        "",
        &repository_with("max_batch_size = 8\nallowed_batch_sizes = [4, 16]\n"),
    );
    assert!(err.contains("allowed_batch_sizes holds 16"), "{err}");
    // An empty repository.
    let err = serve_fails("", &scratch_dir("empty"));
    assert!(err.contains("no model"), "{err}");
}

#[test]
fn logs_are_json_when_configured() {
    let config =
        crate::common::TEST_CONFIG.replace("[server]\n", "[server]\nlog_format = \"json\"\n");
    let server = TestServer::start_with(&config, &root().join("models"));
    let log = server.log();
    let lines: Vec<serde_json::Value> = log
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    assert!(!lines.is_empty());
    assert!(lines.iter().any(|l| l["level"] == "INFO"), "{log}");
}

/// `tie serve` on a free HTTP port with `dir` as its socket directory, from the project's root.
fn serve_in(dir: &std::path::Path) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_tie"));
    command
        .current_dir(root())
        .args(["serve", "--http-addr", "127.0.0.1:0", "--socket-dir"])
        .arg(dir);
    command
}

/// The message of `stderr`'s last line, which must be a JSON log line at level ERROR.
fn json_fatal_message(stderr: &str) -> String {
    let last: serde_json::Value = serde_json::from_str(stderr.lines().last().unwrap_or(""))
        .unwrap_or_else(|e| panic!("{e}: {stderr}"));
    assert_eq!(last["level"], "ERROR", "{stderr}");
    last["fields"]["message"]
        .as_str()
        .unwrap_or_else(|| panic!("no message: {stderr}"))
        .to_string()
}

#[test]
fn a_config_that_parses_but_is_invalid_is_reported_in_its_own_log_format() {
    let dir = scratch_dir("json-invalid");
    let config = dir.join("tie.toml");
    std::fs::write(
        &config,
        "[server]\nlog_format = \"json\"\npoller_cores = [100000]\n",
    )
    .unwrap();
    let (status, stderr) = crate::common::fails_within(
        serve_in(&dir)
            .arg("--config")
            .arg(&config)
            .env_remove("TIE_LOG_FORMAT"),
    );
    assert_eq!(status.code(), Some(1));
    let message = json_fatal_message(&stderr);
    assert!(message.contains("server.poller_cores = 100000"), "{stderr}");
}

#[test]
fn settings_from_the_environment_and_fatal_errors_in_the_log_format() {
    // TIE_CONFIG names the config (its bad key is reported), TIE_LOG_FORMAT makes the fatal
    // error a JSON line like the log's, even one before the config is read.
    let dir = scratch_dir("env");
    let config = dir.join("tie.toml");
    std::fs::write(
        &config,
        "[server]
endpiont = \"x\"\n",
    )
    .unwrap();
    // (Were a variable not read, the server would start: `fails_within` ends it, failing.)
    let (status, stderr) = crate::common::fails_within(
        serve_in(&dir)
            .env("TIE_CONFIG", &config)
            .env("TIE_LOG_FORMAT", "json"),
    );
    assert_eq!(status.code(), Some(1));
    assert!(json_fatal_message(&stderr).contains("endpiont"), "{stderr}");
    // TIE_HTTP_ADDR is read as --http-addr is.
    let (_, stderr) = crate::common::fails_within(
        Command::new(env!("CARGO_BIN_EXE_tie"))
            .current_dir(root())
            .args(["serve", "--socket-dir"])
            .arg(&dir)
            .env("TIE_HTTP_ADDR", "not-an-address"),
    );
    assert!(
        stderr.contains("not-an-address") && stderr.contains("--http-addr"),
        "{stderr}"
    );
}

/// `tie devices`' report where no GPU is usable; `None` (after saying so) where one is.
fn no_gpu_report() -> Option<serde_json::Value> {
    let out = Command::new(env!("CARGO_BIN_EXE_tie"))
        .arg("devices")
        .output()
        .unwrap();
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    if report["gpu_usable"] == true {
        crate::common::skip(
            Need::NoGpu,
            "a GPU is usable here (the GPU tests cover that case)",
        );
        return None;
    }
    Some(report)
}

#[test]
fn a_cuda_model_without_a_usable_gpu_names_the_reason() {
    let Some(report) = no_gpu_report() else {
        return;
    };
    let err = serve_fails("", &repository_with("backend = \"cuda\"\n"));
    assert!(
        err.contains("backend = \"cuda\" but no GPU is usable"),
        "{err}"
    );
    assert!(err.contains(report["reason"].as_str().unwrap()), "{err}");
    // A precision that does not exist is named.
    let err = serve_fails("", &repository_with("precision = \"fp8\"\n"));
    assert!(err.contains("fp8"), "{err}");
}

#[test]
fn with_no_gpu_an_auto_model_is_served_on_the_cpu_and_the_reason_logged_once() {
    if no_gpu_report().is_none() {
        return;
    }
    let mut server = TestServer::start_with(
        crate::common::TEST_CONFIG,
        &repository_with("backend = \"auto\"\nprecision = \"fp16\"\n"),
    );
    server.stop();
    let log = server.log();
    assert_eq!(log.matches("no usable GPU").count(), 1, "{log}");
    assert!(log.contains("engine=\"cpu-mlp\""), "{log}");
}

#[test]
fn lock_memory_locks_the_servers_memory_or_fails_naming_the_limit() {
    let config =
        crate::common::TEST_CONFIG.replacen("[server]\n", "[server]\nlock_memory = true\n", 1);
    assert!(config.contains("lock_memory"));
    let dir = scratch_dir("mlock");
    let config_path = dir.join("tie.toml");
    std::fs::write(&config_path, &config).unwrap();
    let log = std::fs::File::create(dir.join("server.log")).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_tie"))
        .current_dir(root())
        .args(["serve", "--config"])
        .arg(&config_path)
        .args(["--http-addr", "127.0.0.1:0"])
        .arg("--socket-dir")
        .arg(&dir)
        .stderr(log)
        .spawn()
        .unwrap();
    let pid = child.id();
    // Either it locks its memory (root, or an unlimited limit) and serves, or it refuses to
    // start and says which limit to raise.
    let mut exited = None;
    let locked = crate::common::eventually(std::time::Duration::from_secs(10), || {
        if let Ok(Some(status)) = child.try_wait() {
            exited = Some(status);
            return true;
        }
        std::fs::read_to_string(format!("/proc/{pid}/status"))
            .ok()
            .and_then(|s| {
                s.lines()
                    .find(|l| l.starts_with("VmLck:"))
                    .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
            })
            .is_some_and(|kb| kb > 0)
    });
    assert!(locked, "neither locked nor exited in 10 s");
    let err = std::fs::read_to_string(dir.join("server.log")).unwrap();
    match exited {
        None => {
            let _ = Command::new("kill").arg(pid.to_string()).status();
            assert!(child.wait().unwrap().success(), "{err}");
        }
        Some(status) => {
            assert!(!status.success(), "{err}");
            assert!(err.contains("LimitMEMLOCK"), "{err}");
        }
    }
}

#[test]
fn a_second_server_on_the_endpoint_is_refused_before_its_models_load() {
    let first = TestServer::start();
    let (status, stderr) = crate::common::fails_within(
        Command::new(env!("CARGO_BIN_EXE_tie"))
            .current_dir(root())
            .args(["serve", "--config"])
            .arg(first.dir.join("tie.toml"))
            .arg("--model-repository")
            .arg(root().join("models"))
            .args(["--endpoint", &first.endpoint])
            .args(["--http-addr", "127.0.0.1:0", "--socket-dir"])
            .arg(&first.dir),
    );
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("another tie server is already listening"),
        "{stderr}"
    );
    assert!(!stderr.contains("model loaded"), "{stderr}");
}
