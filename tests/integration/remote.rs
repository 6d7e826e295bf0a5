//! Models from object storage and from MLflow's Model Registry, against real servers from
//! PyPI started here on free ports: an S3 API server (`moto` in server mode) and an MLflow
//! tracking server (SQLite store, artifacts served by the tracking server), with models
//! registered through MLflow's own Python API (`tests/python/mlflow_register.py`).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tie_client::{Client, ConnectOptions};

use crate::common::{
    agent, eventually, fixture, free_port, inference_request, post, post_empty, python_tools, root,
    scratch_dir, TestServer, TEST_CONFIG,
};
use crate::models::{client_loop, keys, loaded, matches, API};

const MOTO: &[&str] = &["moto[server]==5.2.5"];
const MLFLOW: &[&str] = &["mlflow==3.17.2", "onnx==1.23.2", "onnxruntime==1.23.2"];

/// A server process of the test's own (moto or MLflow), killed when dropped.
struct Service {
    command: Vec<String>,
    port: u16,
    dir: PathBuf,
    child: Option<Child>,
    /// A path that answers 200 once it serves.
    health: &'static str,
}

impl Service {
    fn moto() -> Self {
        let bin = python_tools(MOTO);
        let port = free_port();
        let mut s = Self {
            command: vec![
                bin.join("moto_server").display().to_string(),
                "-H".into(),
                "127.0.0.1".into(),
                "-p".into(),
                port.to_string(),
            ],
            port,
            dir: scratch_dir("moto"),
            child: None,
            health: "/moto-api/",
        };
        s.spawn();
        s
    }

    fn mlflow() -> Self {
        let bin = python_tools(MLFLOW);
        let port = free_port();
        let dir = scratch_dir("mlflow");
        let mut s = Self {
            command: vec![
                bin.join("mlflow").display().to_string(),
                "server".into(),
                "--backend-store-uri".into(),
                format!("sqlite:///{}", dir.join("db.sqlite").display()),
                "--artifacts-destination".into(),
                dir.join("artifacts").display().to_string(),
                "--host".into(),
                "127.0.0.1".into(),
                "--port".into(),
                port.to_string(),
                "--workers".into(),
                "1".into(),
            ],
            port,
            dir,
            child: None,
            health: "/health",
        };
        s.spawn();
        s
    }

    fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("server.log"))
            .unwrap();
        use std::os::unix::process::CommandExt;
        self.child = Some(
            Command::new(&self.command[0])
                .args(&self.command[1..])
                .current_dir(&self.dir)
                // A group of its own: MLflow's workers are killed with it.
                .process_group(0)
                .stdout(Stdio::from(log.try_clone().unwrap()))
                .stderr(Stdio::from(log))
                .spawn()
                .unwrap(),
        );
        let url = format!("{}{}", self.url(), self.health);
        let up = || {
            std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok()
                && agent().get(&url).call().is_ok_and(|r| r.status() == 200)
        };
        let started = Instant::now();
        while !up() {
            assert!(
                started.elapsed() < Duration::from_secs(120),
                "{} did not start: {}",
                self.command[0],
                std::fs::read_to_string(self.dir.join("server.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Kills the server and every process it started (SIGKILL: gone as a crash or a network
    /// cut would leave it).
    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            if let Some(pid) = rustix::process::Pid::from_raw(c.id() as i32) {
                let _ = rustix::process::kill_process_group(pid, rustix::process::Signal::KILL);
            }
            let _ = c.wait();
        }
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Bucket `tie` of the S3 server, through a signed client as an uploader would use.
fn bucket(s3: &Service) -> (tokio::runtime::Runtime, object_store::aws::AmazonS3) {
    let create = agent()
        .put(&format!("{}/tie", s3.url()))
        .send_empty()
        .unwrap();
    assert!(create.status().is_success(), "{}", create.status());
    #[allow(deprecated)]
    let _ = rustls::crypto::ring::default_provider().install_default();
    let store = object_store::aws::AmazonS3Builder::new()
        .with_bucket_name("tie")
        .with_endpoint(s3.url())
        .with_allow_http(true)
        .with_region("us-east-1")
        .with_access_key_id("test")
        .with_secret_access_key("test")
        .build()
        .unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    (rt, store)
}

fn s3_put(s3: &(tokio::runtime::Runtime, object_store::aws::AmazonS3), key: &str, body: &[u8]) {
    use object_store::ObjectStoreExt;
    let (rt, store) = s3;
    rt.block_on(store.put(&key.into(), body.to_vec().into()))
        .unwrap();
}

fn s3_delete(s3: &(tokio::runtime::Runtime, object_store::aws::AmazonS3), key: &str) {
    use object_store::ObjectStoreExt;
    let (rt, store) = s3;
    rt.block_on(store.delete(&key.into())).unwrap();
}

fn model_bytes(model: &str, version: u32) -> Vec<u8> {
    std::fs::read(root().join(format!("models/{model}/{version}/model.onnx"))).unwrap()
}

fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The default version of `model` in `models/loaded`.
fn default_version(api: &str, model: &str) -> Option<String> {
    loaded(api)
        .iter()
        .find(|m| m["model_name"] == model && m["is_default"] == true)
        .map(|m| m["version"].as_str().unwrap().to_string())
}

/// HTTP `predict` with `version`: the version that answered, its answer checked against that
/// version's fixture (row 0 of each version's fixture is sent).
fn predict_version(api: &str, version: Option<&str>) -> String {
    let (f1, f2) = (fixture("multi_v1"), fixture("multi_v2"));
    let rows = [f1.inputs[0].clone(), f2.inputs[0].clone()];
    let request = inference_request("r", "multi", version, &rows, Value::Null);
    let (code, body) = post(&format!("{api}/predict"), &request);
    assert_eq!(code, 200, "{body}");
    let v = body["model_metadata"]["model_version"]
        .as_str()
        .unwrap()
        .to_string();
    let got: Vec<f32> = body["predictions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["value"].as_f64().unwrap() as f32)
        .collect();
    let width = got.len() / 2;
    let (f, row) = match v.as_str() {
        "1" => (&f1, &got[..width]),
        "2" => (&f2, &got[width..]),
        _ => panic!("version {v} answered"),
    };
    assert!(matches(f, 0, row), "version {v}: {got:?}");
    v
}

/// Waits (up to 30 s) until the server's log says `text`.
fn wait_for_log(server: &TestServer, text: &str) {
    assert!(
        eventually(Duration::from_secs(30), || server.log().contains(text)),
        "no {text:?} in the log:\n{}",
        server.log()
    );
}

/// Waits (up to 30 s) until `multi`'s default version is `version`.
fn wait_for_default(server: &TestServer, api: &str, version: &str) {
    assert!(
        eventually(Duration::from_secs(30), || default_version(api, "multi")
            .as_deref()
            == Some(version)),
        "{}",
        server.log()
    );
}

/// Blobs in the model cache, and how many of them the mirror links.
fn blobs(cache: &Path) -> (usize, usize) {
    use std::os::unix::fs::MetadataExt;
    let mut all = 0;
    let mut linked = 0;
    for e in std::fs::read_dir(cache.join("blobs")).unwrap() {
        let m = e.unwrap().metadata().unwrap();
        all += 1;
        if m.nlink() > 1 {
            linked += 1;
        }
    }
    (all, linked)
}

#[test]
fn a_repository_in_s3_serves_reloads_new_versions_refuses_a_bad_digest_and_starts_from_the_cache() {
    let mut s3 = Service::moto();
    let b = bucket(&s3);
    let (v1, v2) = (model_bytes("multi", 1), model_bytes("multi", 2));
    s3_put(&b, "repo/multi/1/model.onnx", &v1);
    s3_put(&b, "repo/multi/config.toml", b"backend = \"cpu\"\n");
    s3_put(
        &b,
        "repo/identity/1/model.onnx",
        &model_bytes("identity", 1),
    );
    s3_put(&b, "repo/notes.txt", b"not part of the layout");
    let cache = scratch_dir("model-cache").join("cache");
    let config = format!(
        "{TEST_CONFIG}\n[model_cache]\ndir = {cache:?}\nmax_size_mb = 0\n\
         [object_store]\nendpoint = \"{}\"\nallow_http = \"true\"\nregion = \"us-east-1\"\n\
         access_key_id = \"test\"\nsecret_access_key = \"test\"\n",
        s3.url()
    );
    let mut server = TestServer::start_with(&config, Path::new("s3://tie/repo"));
    let api = format!("{}/{API}", server.http());
    assert_eq!(keys(&api), ["identity:1", "multi:1"]);
    assert_eq!(predict_version(&api, None), "1");

    // A new version, with its digest beside it: `tie reload` picks it up.
    s3_put(&b, "repo/multi/2/model.onnx", &v2);
    s3_put(
        &b,
        "repo/multi/2/model.onnx.sha256",
        format!("{}  model.onnx\n", sha256_hex(&v2)).as_bytes(),
    );
    let (code, report) = post_empty(&format!("{api}/models/reload"), None);
    assert_eq!(code, 200, "{report}\n{}", server.log());
    assert_eq!(report["defaults"]["multi"], 2, "{report}");
    assert_eq!(predict_version(&api, None), "2");
    assert_eq!(predict_version(&api, Some("1")), "1");

    // A version whose digest is not its file's: refused, and nothing changes.
    s3_put(&b, "repo/multi/3/model.onnx", &v1);
    s3_put(
        &b,
        "repo/multi/3/model.onnx.sha256",
        format!("{}\n", sha256_hex(b"another file")).as_bytes(),
    );
    let (code, report) = post_empty(&format!("{api}/models/reload"), None);
    assert!(code >= 400, "{code} {report}");
    assert!(report.to_string().contains("SHA-256"), "{report}");
    assert_eq!(keys(&api), ["identity:1", "multi:1", "multi:2"]);
    assert!(!cache.join("mirror/multi/3").exists());
    s3_delete(&b, "repo/multi/3/model.onnx");
    s3_delete(&b, "repo/multi/3/model.onnx.sha256");

    // Version 1 leaves the store: unloaded at the next reload, and its blob evicted (the cache
    // keeps only what the mirror links, at max_size_mb = 0).
    s3_delete(&b, "repo/multi/1/model.onnx");
    let (code, report) = post_empty(&format!("{api}/models/reload"), None);
    assert_eq!(code, 200, "{report}");
    assert_eq!(keys(&api), ["identity:1", "multi:2"]);
    assert_eq!(blobs(&cache), (2, 2));

    // The store goes away: a restart serves the cache's copy, and says so.
    s3.kill();
    server.restart();
    assert!(server.log().contains("last known good"), "{}", server.log());
    let api = format!("{}/{API}", server.http());
    assert_eq!(keys(&api), ["identity:1", "multi:2"]);
    assert_eq!(predict_version(&api, None), "2");
    // A reload while it is away fails with the store's error; the versions serving go on.
    let (code, report) = post_empty(&format!("{api}/models/reload"), None);
    assert!(code >= 500, "{code} {report}");
    assert!(report.to_string().contains("unreachable"), "{report}");
    assert_eq!(predict_version(&api, None), "2");
}

/// Registers `files` (`FILE[:HOW]`, see `tests/python/mlflow_register.py`) as versions 1, 2, …
/// of `multi` through MLflow's Python API, `champion` on version 1; the script's lines.
fn register(mlflow: &Service, files: &[String]) -> Vec<String> {
    let out = Command::new(python_tools(MLFLOW).join("python"))
        .arg(root().join("tests/python/mlflow_register.py"))
        .arg(mlflow.url())
        .arg("multi")
        .args(files)
        .args(["--alias", "champion=1"])
        // MLflow's telemetry thread sets and unsets a variable of the environment while the
        // client's requests read it (a KeyError, now and then, mid-registration); nor should a
        // test reach outside the host.
        .env("MLFLOW_DISABLE_TELEMETRY", "true")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // MLflow prints its own lines (links to the runs) among the script's.
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.starts_with("multi "))
        .map(str::to_string)
        .collect()
}

/// Moves `alias` of registered model `name` to `version` through MLflow's REST API.
fn set_alias(mlflow: &Service, name: &str, alias: &str, version: u32) {
    let (code, body) = post(
        &format!("{}/api/2.0/mlflow/registered-models/alias", mlflow.url()),
        &json!({"name": name, "alias": alias, "version": version.to_string()}),
    );
    assert_eq!(code, 200, "{body}");
}

#[test]
fn mlflow_models_follow_a_moving_alias_under_load_load_on_demand_and_start_from_the_cache() {
    let mut mlflow = Service::mlflow();
    let models = root().join("models/multi");
    let registered = register(
        &mlflow,
        &[
            models.join("1/model.onnx").display().to_string(),
            format!("{}:sha256", models.join("2/model.onnx").display()),
            format!("{}:bad-sha256", models.join("1/model.onnx").display()),
        ],
    );
    assert_eq!(registered, ["multi 1", "multi 2", "multi 3"]);
    // The local repository holds the model's config (and nothing else).
    let local = scratch_dir("registry-configs");
    std::fs::create_dir_all(local.join("multi")).unwrap();
    std::fs::write(local.join("multi/config.toml"), "backend = \"cpu\"\n").unwrap();
    let cache = scratch_dir("model-cache").join("cache");
    let config = format!(
        "{TEST_CONFIG}load_on_demand = true\n[model_cache]\ndir = {cache:?}\n\
         [registry]\nkind = \"mlflow\"\nuri = \"{}\"\nmodels = [\"multi@champion\"]\n\
         poll_interval_sec = 1\n",
        mlflow.url()
    );
    let mut server = TestServer::start_with(&config, &local);
    let api = format!("{}/{API}", server.http());
    assert_eq!(keys(&api), ["multi:1"]);
    let listed = loaded(&api);
    assert_eq!(listed[0]["labels"], json!(["champion"]), "{listed:?}");

    // Clients stream while the alias moves to version 2: each session switches once, and
    // every request gets its one answer.
    let stop = Arc::new(AtomicBool::new(false));
    let clients: Vec<_> = (0..2)
        .map(|_| {
            let client = Client::connect(&server.endpoint, "multi", server.options()).unwrap();
            let stop = stop.clone();
            std::thread::spawn(move || client_loop(client, stop))
        })
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    set_alias(&mlflow, "multi", "champion", 2);
    wait_for_default(&server, &api, "2");
    std::thread::sleep(Duration::from_millis(300));
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        let seen = c.join().unwrap();
        assert!(seen.failures.is_empty(), "{:?}", seen.failures);
        assert_eq!(seen.ok, seen.submitted);
        let versions: Vec<u32> = seen.runs.iter().map(|(v, _)| *v).collect();
        assert_eq!(versions, [1, 2], "{:?}", seen.runs);
    }
    assert_eq!(keys(&api), ["multi:2"]);

    // An alias moved to a corrupt artifact: refused, version 2 keeps serving.
    set_alias(&mlflow, "multi", "champion", 3);
    wait_for_log(&server, "refused (a corrupt or tampered artifact)");
    assert_eq!(keys(&api), ["multi:2"]);
    assert_eq!(predict_version(&api, None), "2");
    set_alias(&mlflow, "multi", "champion", 2);

    // Version 1, no longer named: a session pinned to it loads it on demand (the hello waits
    // while it loads), and so does an HTTP request.
    let mut pinned = Client::connect(
        &server.endpoint,
        "multi",
        ConnectOptions {
            version: Some(1),
            ..server.options()
        },
    )
    .unwrap();
    let f1 = fixture("multi_v1");
    let r = pinned.predict(&f1.inputs[0]).unwrap();
    assert_eq!(r.response.model_version, 1);
    assert!(matches(&f1, 0, r.response.outputs()));
    assert_eq!(keys(&api), ["multi:1", "multi:2"]);
    assert!(server.log().contains("loaded on demand"));
    // `latest`: the highest version the registry's copy holds.
    assert_eq!(predict_version(&api, Some("latest")), "2");
    // A version the registry lacks: not found, and said so.
    let request = inference_request("r", "multi", Some("9"), &f1.inputs[..1], Value::Null);
    let (code, body) = post(&format!("{api}/predict"), &request);
    assert_eq!(code, 404, "{body}");
    drop(pinned);

    // The registry goes away: a restart serves the cache's copy, and says so.
    mlflow.kill();
    server.restart();
    assert!(server.log().contains("last known good"), "{}", server.log());
    let api = format!("{}/{API}", server.http());
    assert!(keys(&api).contains(&"multi:2".to_string()));
    assert_eq!(predict_version(&api, None), "2");
}

#[test]
fn a_local_repository_loads_versions_on_demand_and_latest_names_the_highest() {
    let repo = scratch_dir("on-demand-repo");
    crate::common::add_version(&repo, "multi", 1, "multi", 1);
    crate::common::add_version(&repo, "multi", 2, "multi", 2);
    // Only version 1 loads at start.
    std::fs::write(
        repo.join("multi/config.toml"),
        "backend = \"cpu\"\nversions = { specific = [1] }\n",
    )
    .unwrap();
    let off = TestServer::start_with(TEST_CONFIG, &repo);
    let api = format!("{}/{API}", off.http());
    // Without load_on_demand, `latest` is the highest loaded, and version 2 is not served.
    assert_eq!(predict_version(&api, Some("latest")), "1");
    let f2 = fixture("multi_v2");
    let request = inference_request("r", "multi", Some("2"), &f2.inputs[..1], Value::Null);
    assert_eq!(post(&format!("{api}/predict"), &request).0, 404);
    drop(off);

    let config = format!("{TEST_CONFIG}load_on_demand = true\n");
    let server = TestServer::start_with(&config, &repo);
    let api = format!("{}/{API}", server.http());
    assert_eq!(keys(&api), ["multi:1"]);
    // `tie predict --version latest`: the hello names the highest version, loaded on demand
    // while the client waits.
    let out = server.predict_cli_with("multi", &["--version", "latest"], &f2.inputs[0]);
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        server.log()
    );
    let answer: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(answer["model_metadata"]["model_version"], "2", "{answer}");
    assert_eq!(keys(&api), ["multi:1", "multi:2"]);
    // The default stays version 1; a version the repository lacks is not found.
    assert_eq!(predict_version(&api, None), "1");
    let request = inference_request("r", "multi", Some("7"), &f2.inputs[..1], Value::Null);
    let (code, body) = post(&format!("{api}/predict"), &request);
    assert_eq!(code, 404, "{body}");
}

/// A TCP proxy in front of a server that, while `cut` is set, ends every artifact download
/// part-way (a registry that goes away mid-download), and passes everything else.
struct CutProxy {
    port: u16,
    cut: Arc<AtomicBool>,
}

impl CutProxy {
    fn start(upstream: u16) -> Self {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let cut = Arc::new(AtomicBool::new(false));
        let cutting = cut.clone();
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { return };
                let Ok(server) = std::net::TcpStream::connect(("127.0.0.1", upstream)) else {
                    continue;
                };
                let download = Arc::new(AtomicBool::new(false));
                let (c2, s2) = (client.try_clone().unwrap(), server.try_clone().unwrap());
                let (seen, cutting) = (download.clone(), cutting.clone());
                // Client to server: notes a download request.
                std::thread::spawn(move || {
                    use std::io::{Read, Write};
                    let (mut from, mut to) = (client, server);
                    let mut buf = [0u8; 16 << 10];
                    while let Ok(n) = from.read(&mut buf) {
                        if n == 0 {
                            break;
                        }
                        let head = String::from_utf8_lossy(&buf[..n.min(200)]).into_owned();
                        if head.starts_with("GET /api/2.0/mlflow-artifacts/artifacts/")
                            && !head.lines().next().unwrap_or_default().contains('?')
                        {
                            seen.store(cutting.load(Ordering::Relaxed), Ordering::Relaxed);
                        }
                        if to.write_all(&buf[..n]).is_err() {
                            break;
                        }
                    }
                    let _ = to.shutdown(std::net::Shutdown::Both);
                });
                // Server to client: a cut download stops after part of its answer.
                std::thread::spawn(move || {
                    use std::io::{Read, Write};
                    let (mut from, mut to) = (s2, c2);
                    let mut buf = [0u8; 16 << 10];
                    while let Ok(n) = from.read(&mut buf) {
                        if n == 0 {
                            break;
                        }
                        if download.load(Ordering::Relaxed) {
                            let _ = to.write_all(&buf[..n.min(400)]);
                            break;
                        }
                        if to.write_all(&buf[..n]).is_err() {
                            break;
                        }
                    }
                    let _ = to.shutdown(std::net::Shutdown::Both);
                    let _ = from.shutdown(std::net::Shutdown::Both);
                });
            }
        });
        Self { port, cut }
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
}

#[test]
fn a_registry_gone_mid_download_changes_nothing_and_a_later_poll_gets_the_version() {
    let mlflow = Service::mlflow();
    let models = root().join("models/multi");
    register(
        &mlflow,
        &[
            models.join("1/model.onnx").display().to_string(),
            models.join("2/model.onnx").display().to_string(),
        ],
    );
    let proxy = CutProxy::start(mlflow.port);
    let cache = scratch_dir("model-cache").join("cache");
    let config = format!(
        "{TEST_CONFIG}\n[model_cache]\ndir = {cache:?}\n[registry]\nkind = \"mlflow\"\n\
         uri = \"{}\"\nmodels = [\"multi@champion\"]\npoll_interval_sec = 1\n",
        proxy.url()
    );
    let server = TestServer::start_with(&config, &scratch_dir("registry-configs"));
    let api = format!("{}/{API}", server.http());
    assert_eq!(keys(&api), ["multi:1"]);

    // The alias moves while downloads are cut: each poll fails, and nothing changes.
    proxy.cut.store(true, Ordering::Relaxed);
    set_alias(&mlflow, "multi", "champion", 2);
    wait_for_log(&server, "could not be read or served");
    assert_eq!(keys(&api), ["multi:1"]);
    assert_eq!(predict_version(&api, None), "1");
    assert!(!cache.join("mirror/multi/2").exists());
    let leftovers: Vec<_> = std::fs::read_dir(cache.join("blobs"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .filter(|n| n.to_string_lossy().starts_with('.'))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");

    // Back: the next poll fetches version 2 and switches to it.
    proxy.cut.store(false, Ordering::Relaxed);
    wait_for_default(&server, &api, "2");
    assert_eq!(predict_version(&api, None), "2");
}
