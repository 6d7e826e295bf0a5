//! Batches kept in flight (`pipeline_depth`): the poller reads and answers requests while
//! batches compute (on the CPU, on a batch thread of the poller's lane; the GPU's streams are
//! tested in `gpu`). Every request is answered once, in its session's order, with its own answer, whatever
//! is in flight when its session goes.

use std::collections::VecDeque;

use crate::common::{fixture, rel_err, responses, root, scratch_dir, Fixture, TestServer};
use tie_client::{monotonic_ns, Client, ConnectOptions, Priority, Status};

/// A repository with the example `model` (features named by position) on the CPU (on a GPU
/// host too), two batches deep.
fn repository(model: &str) -> std::path::PathBuf {
    let repo = scratch_dir("pipeline-repo");
    crate::common::add_version(&repo, model, 1, model, 1);
    std::fs::write(
        repo.join(model).join("config.toml"),
        "backend = \"cpu\"\npipeline_depth = 2\n",
    )
    .unwrap();
    repo
}

fn server_of(model: &str, batching: &str) -> TestServer {
    let config = format!(
        "{}\n[batch_processing]\n{batching}\n",
        crate::common::TEST_CONFIG
    );
    TestServer::start_with(&config, &repository(model))
}

fn server(batching: &str) -> TestServer {
    server_of("mlp64", batching)
}

fn connect_to(server: &TestServer, model: &str) -> Client {
    let options = ConnectOptions {
        request_capacity: 256,
        response_capacity: 256,
        ..server.options()
    };
    Client::connect(&server.endpoint, model, options).unwrap()
}

fn connect(server: &TestServer) -> Client {
    connect_to(server, "mlp64")
}

/// Client number `c` sends `total` of the fixture's rows in turn with up to `window` in flight,
/// and checks every answer: its request's, in order, OK, the fixture's output; then that no
/// answer is left over.
fn stream_fixture(client: &mut Client, f: &Fixture, c: usize, total: usize, window: usize) {
    let mut sent = VecDeque::new();
    let (mut next, mut answered) = (0usize, 0usize);
    while answered < total {
        while next < total && sent.len() < window {
            let row = (next + c) % f.inputs.len();
            let id = client
                .submit(&f.inputs[row], Priority::Normal, None)
                .unwrap();
            sent.push_back((id, row));
            next += 1;
        }
        let Some(r) = client.poll() else {
            std::thread::yield_now();
            continue;
        };
        let (id, row) = sent.pop_front().expect("an answer per request");
        assert_eq!(r.request_id, id, "client {c}: answers out of order");
        assert_eq!(r.status, Status::OK, "client {c}");
        assert!(
            rel_err(r.outputs()[0], f.outputs[row][0]) <= 1e-5,
            "client {c}: row {row}: {} vs {}",
            r.outputs()[0],
            f.outputs[row][0]
        );
        answered += 1;
    }
    assert_eq!(client.poll(), None, "an extra response");
}

#[test]
fn clients_streaming_through_a_pipeline_get_each_answer_once_in_order() {
    let server = server("max_batch_size = 16\nbatch_timeout_us = 20");
    let f = fixture("mlp64_v1");
    std::thread::scope(|s| {
        for c in 0..3usize {
            let (server, f) = (&server, &f);
            s.spawn(move || stream_fixture(&mut connect(server), f, c, 3000, 48));
        }
    });
    let log = server.log();
    assert!(log.contains("batches computed on a batch thread"), "{log}");
}

#[test]
fn late_and_refused_requests_wait_for_the_batches_in_flight_before_them() {
    // Batches of 2 with two in flight: while they compute, the session's late and refused
    // requests behind them are ready to answer at once, and must still come after them.
    let server = server("max_batch_size = 2\nbatch_timeout_us = 0\nmax_queue_size = 24");
    let f = fixture("mlp64_v1");
    let mut client = connect(&server);
    let mut seen = std::collections::HashSet::new();
    for round in 0..20 {
        server.pause();
        let soon = monotonic_ns() + 1_000_000;
        let mut expected = Vec::new();
        for i in 0..40 {
            let row = (i + round) % f.inputs.len();
            // One in four already late when read.
            let deadline = (i % 4 == 3).then_some(soon);
            let id = client
                .submit(&f.inputs[row], Priority::Normal, deadline)
                .unwrap();
            expected.push((id, row, deadline.is_some()));
        }
        std::thread::sleep(std::time::Duration::from_millis(2));
        server.signal(18);
        let got = responses(&mut client, expected.len());
        // Read in one scan (unless the poller woke mid-way), the first 24 are queued and the
        // rest refused; whatever the split, late ones never run and order holds.
        for (i, (r, (id, row, late))) in got.iter().zip(&expected).enumerate() {
            assert_eq!(r.request_id, *id, "round {round}: answers out of order");
            match (r.status, late) {
                (Status::OK, false) => {
                    assert!(rel_err(r.outputs()[0], f.outputs[*row][0]) <= 1e-5);
                }
                (Status::TIMEOUT, true) | (Status::QUEUE_FULL, _) => {}
                other => panic!("round {round}, request {i}: {other:?}"),
            }
            seen.insert(r.status);
        }
    }
    assert!(
        seen.contains(&Status::TIMEOUT) && seen.contains(&Status::QUEUE_FULL),
        "{seen:?}"
    );
}

#[test]
fn a_session_gone_with_batches_in_flight_leaves_no_answer_to_the_next() {
    // mlp256 in batches of 64: milliseconds each on the CPU, so batches are still in flight
    // when the server notices the session went, and the next session may take its slot.
    let server = server_of("mlp256", "max_batch_size = 64\nbatch_timeout_us = 0");
    let f = fixture("mlp256_v1");
    for _ in 0..10 {
        let mut gone = connect_to(&server, "mlp256");
        server.pause();
        for i in 0..256 {
            gone.submit(&f.inputs[i % f.inputs.len()], Priority::Normal, None)
                .unwrap();
        }
        server.signal(18);
        drop(gone);
        let mut next = connect_to(&server, "mlp256");
        for i in 0..20 {
            let row = i % f.inputs.len();
            let p = next.predict(&f.inputs[row]).unwrap();
            for (got, want) in p.outputs().iter().zip(&f.outputs[row]) {
                assert!(rel_err(*got, *want) <= 1e-4, "{got} vs {want}");
            }
        }
        assert_eq!(next.poll(), None, "an answer the session did not ask for");
    }
}

#[test]
fn a_pipelined_model_that_fails_a_batch_answers_it_execution_failed() {
    let config = crate::common::TEST_CONFIG
        .replacen("[server]\n", "[server]\nfault_injection = true\n", 1)
        .replacen(
            "[model_deployment]\n",
            "[model_deployment]\nhealth_check_interval_sec = 3600\n",
            1,
        )
        + "[batch_processing]\nmax_batch_size = 8\nbatch_timeout_us = 0\n";
    let server = TestServer::start_with(&config, &repository("mlp64"));
    let f = fixture("mlp64_v1");
    let mut client = connect(&server);
    client.predict(&f.inputs[0]).unwrap();
    let fault = format!(
        "{}/api/v1/internal/inference/models/mlp64:1/fault",
        server.http()
    );
    assert_eq!(
        crate::common::post(&fault, &serde_json::json!({"mode": "fail"})).0,
        200
    );
    server.pause();
    let ids: Vec<u64> = (0..32)
        .map(|i| {
            client
                .submit(&f.inputs[i % 8], Priority::Normal, None)
                .unwrap()
        })
        .collect();
    server.signal(18);
    let got = responses(&mut client, ids.len());
    assert_eq!(got.iter().map(|r| r.request_id).collect::<Vec<_>>(), ids);
    let statuses: Vec<Status> = got.iter().map(|r| r.status).collect();
    crate::common::failed_then_not_ready(&statuses);
    assert!(server.log().contains("injected fault"), "{}", server.log());
}

#[test]
fn a_pipeline_deeper_than_allowed_is_refused_at_load() {
    let repo = repository("mlp64");
    std::fs::write(repo.join("mlp64/config.toml"), "pipeline_depth = 9\n").unwrap();
    let dir = scratch_dir("pipeline-depth");
    std::fs::write(dir.join("tie.toml"), crate::common::TEST_CONFIG).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_tie"))
        .current_dir(root())
        .args(["serve", "--config"])
        .arg(dir.join("tie.toml"))
        .arg("--model-repository")
        .arg(&repo)
        .args(["--http-addr", "127.0.0.1:0", "--socket-dir"])
        .arg(&dir)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("pipeline_depth = 9") && stderr.contains("at most 8"),
        "{stderr}"
    );
}

/// Counts the batches an engine runs, those run on a poller's thread, and the largest.
struct Counted {
    inner: std::sync::Arc<dyn tie_engine::Backend>,
    batches: std::sync::atomic::AtomicUsize,
    on_poller: std::sync::atomic::AtomicUsize,
    fewest: std::sync::atomic::AtomicUsize,
    most: std::sync::atomic::AtomicUsize,
}

impl Counted {
    fn new(inner: std::sync::Arc<dyn tie_engine::Backend>) -> std::sync::Arc<Self> {
        std::sync::Arc::new(Self {
            inner,
            batches: 0.into(),
            on_poller: 0.into(),
            fewest: usize::MAX.into(),
            most: 0.into(),
        })
    }
}

impl tie_engine::Backend for Counted {
    fn info(&self) -> &tie_engine::BackendInfo {
        self.inner.info()
    }

    fn run_batch(
        &self,
        input: &[f32],
        rows: usize,
        output: &mut [f32],
    ) -> Result<(), tie_engine::BackendError> {
        use std::sync::atomic::Ordering::Relaxed;
        self.batches.fetch_add(1, Relaxed);
        if std::thread::current()
            .name()
            .is_some_and(|n| n.starts_with("tie-poller"))
        {
            self.on_poller.fetch_add(1, Relaxed);
        }
        self.fewest.fetch_min(rows, Relaxed);
        self.most.fetch_max(rows, Relaxed);
        self.inner.run_batch(input, rows, output)
    }
}

/// What `backend = "auto"` builds where both engines win some batch sizes (a GPU host), here
/// with two CPU engines: small batches run on the poller at once unless batches are in flight,
/// larger ones on the pipeline; every answer is its request's, once, in order.
#[test]
fn a_model_split_by_batch_size_runs_each_batch_on_its_engine_and_answers_in_order() {
    use std::sync::Arc;
    let dir = scratch_dir("split");
    let socket_dir = dir.join("sockets");
    std::fs::create_dir_all(&socket_dir).unwrap();
    let mut config = tie::config::ServiceConfig::parse(&format!(
        "{}\n[batch_processing]\nmax_batch_size = 32\nbatch_timeout_us = 50\nenable_dynamic_batching = false\n",
        crate::common::TEST_CONFIG
    ))
    .unwrap();
    config.server.endpoint = "split".into();
    config.server.socket_dir = Some(socket_dir.clone());
    let options = tie::models::LoadOptions {
        layouts_dir: root().join("layouts/features"),
        ..tie::models::LoadOptions::from_config_with(
            &config,
            tie_engine::devices::Gpus::none("the test runs on the CPU"),
        )
    };
    let mut models = tie::models::load_repository(&repository("mlp64"), &options).unwrap();
    assert_eq!(models.len(), 1);
    let model = &mut models[0];
    assert_eq!(model.config.pipeline_depth, 2);
    let reference = model.backend.clone();
    let small = Counted::new(reference.clone());
    let large = Counted::new(reference.clone());
    model.backend = Arc::new(tie_engine::SplitBackend::new(
        small.clone(),
        large.clone(),
        4,
    ));
    let server = tie::dataplane::Server::start(&config, models).unwrap();
    std::thread::scope(|s| {
        for c in 0..3usize {
            let (socket_dir, reference) = (&socket_dir, &reference);
            s.spawn(move || {
                let options = ConnectOptions {
                    socket_dir: Some(socket_dir.clone()),
                    request_capacity: 256,
                    response_capacity: 256,
                    timeout: std::time::Duration::from_secs(10),
                    ..ConnectOptions::default()
                };
                let mut client = Client::connect("split", "mlp64", options).unwrap();
                // Alternately one request at a time and bursts of up to 60.
                crate::common::stream_checked(
                    &mut client,
                    &format!("client {c}"),
                    c,
                    2000,
                    &|next| {
                        if (next / 100).is_multiple_of(2) {
                            1
                        } else {
                            60
                        }
                    },
                    reference.as_ref(),
                    crate::conformance::Tolerance::Elementwise(1e-5),
                );
            });
        }
    });
    server.shutdown();
    use std::sync::atomic::Ordering::Relaxed;
    // Lone requests ran on the small-batch engine, on the poller; bursts made batches of more
    // than 4 rows, which only the other engine ran (and small ones too, behind batches in
    // flight).
    assert!(small.on_poller.load(Relaxed) > 0);
    assert!(
        small.most.load(Relaxed) <= 4,
        "{}",
        small.most.load(Relaxed)
    );
    assert!(large.batches.load(Relaxed) > 0);
    assert!(large.most.load(Relaxed) > 4, "{}", large.most.load(Relaxed));
}

#[test]
fn a_model_spread_over_two_pollers_answers_each_session_in_order_from_both() {
    let repo = scratch_dir("pollers-repo");
    crate::common::add_version(&repo, "mlp64", 1, "mlp64", 1);
    std::fs::write(
        repo.join("mlp64").join("config.toml"),
        "backend = \"cpu\"\npipeline_depth = 2\npollers = 2\n",
    )
    .unwrap();
    crate::common::add_version(&repo, "multi", 1, "multi", 1);
    // More pollers than the server has: all of them, logged.
    std::fs::write(repo.join("multi").join("config.toml"), "pollers = 5\n").unwrap();
    let config = format!(
        "{}\n[batch_processing]\nmax_batch_size = 16\nbatch_timeout_us = 20\n",
        crate::common::TEST_CONFIG.replace("[server]\n", "[server]\npoller_cores = [0, 1]\n")
    );
    let server = TestServer::start_with(&config, &repo);
    let f = fixture("mlp64_v1");
    std::thread::scope(|s| {
        for c in 0..4usize {
            let (server, f) = (&server, &f);
            s.spawn(move || stream_fixture(&mut connect(server), f, c, 2000, 32));
        }
    });
    let mut multi = connect_to(&server, "multi");
    let m = fixture("multi_v1");
    let r = multi.predict(&m.inputs[0]).unwrap();
    assert!(rel_err(r.outputs()[0], m.outputs[0][0]) <= 1e-5);
    let log = server.log();
    let opened: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("session opened") && l.contains("mlp64"))
        .collect();
    assert_eq!(opened.len(), 4, "{log}");
    for poller in ["poller=0", "poller=1"] {
        assert_eq!(
            opened.iter().filter(|l| l.contains(poller)).count(),
            2,
            "two sessions on {poller}: {log}"
        );
    }
    assert!(
        log.contains("the model asks for more pollers than the server has"),
        "{log}"
    );
}

/// Every thread of `tie serve` but the pollers (control plane, monitor, listener, the lane's
/// batch thread) runs off the poller cores, so that none is woken onto a poller's core, and
/// off their SMT siblings while other CPUs remain; each poller runs on its own.
#[test]
fn the_servers_other_threads_run_off_the_poller_cores() {
    let config = format!(
        "{}\n[batch_processing]\nbatch_timeout_us = 20\n",
        crate::common::TEST_CONFIG.replace("[server]\n", "[server]\npoller_cores = [1]\n")
    );
    let server = TestServer::start_with(&config, &repository("mlp64"));
    // A request, so that the lane and its batch thread exist.
    let f = fixture("mlp64_v1");
    let r = connect(&server).predict(&f.inputs[0]).unwrap();
    assert!(rel_err(r.outputs()[0], f.outputs[0][0]) <= 1e-5);
    let process = procfs::process::Process::new(server.pid()).unwrap();
    let (mut pollers, mut others) = (Vec::new(), Vec::new());
    for task in process.tasks().unwrap().flatten() {
        // A thread that ended since the listing has no status.
        let Ok(status) = task.status() else {
            continue;
        };
        let cpus = cpu_list(status.cpus_allowed_list);
        if status.name.starts_with("tie-poller") {
            pollers.push((status.name, cpus));
        } else {
            others.push((status.name, cpus));
        }
    }
    assert_eq!(pollers, [("tie-poller-0".to_string(), vec![1])]);
    assert!(
        others.iter().any(|(name, _)| name.starts_with("tie-batch")),
        "{others:?}"
    );
    for (name, cpus) in &others {
        assert!(
            !cpus.contains(&1),
            "{name} may run on the poller's core: {cpus:?}"
        );
    }
    // The poller's SMT siblings (none where SMT is off or the topology is not exposed) are
    // kept off too, unless the process may run on nothing else.
    let siblings = tie::host::smt_siblings(1);
    let allowed = cpu_list(
        procfs::process::Process::myself()
            .unwrap()
            .status()
            .unwrap()
            .cpus_allowed_list,
    );
    let elsewhere = allowed
        .iter()
        .any(|&c| c != 1 && !siblings.contains(&(c as usize)));
    if elsewhere {
        for (name, cpus) in &others {
            assert!(
                !cpus.iter().any(|&c| siblings.contains(&(c as usize))),
                "{name} may run on a sibling {siblings:?} of the poller's core: {cpus:?}"
            );
        }
        assert!(
            server
                .log()
                .contains("the server's other threads run off the poller cores"),
            "{}",
            server.log()
        );
    } else {
        assert!(
            server
                .log()
                .contains("the server's other threads run on SMT siblings of the poller cores"),
            "{}",
            server.log()
        );
    }
}

/// The CPUs of a `Cpus_allowed_list` (ranges, as procfs reads them), one by one.
fn cpu_list(ranges: Option<Vec<(u32, u32)>>) -> Vec<u32> {
    ranges
        .expect("Cpus_allowed_list")
        .into_iter()
        .flat_map(|(first, last)| first..=last)
        .collect()
}
