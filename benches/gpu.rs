//! GPU benchmarks: the backend alone (per batch), end-to-end batch-1 latency through the rings,
//! and end-to-end throughput with many clients. Prints why it skipped where no GPU is usable.
//!
//! Environment: `ITERS` (batch-1 round trips, default 100,000), `CLIENT_CORE` (1), `SERVER_CORE`
//! (2), `POLLER_CORES` (extra poller cores for the throughput run, default none), `CLIENTS`
//! (throughput clients, 8, pinned from `FIRST_CLIENT_CORE`, default 4), `WINDOW` (requests in
//! flight per client, 64), `SECONDS` (throughput run length, 3), `PIPELINE_DEPTH` (the
//! throughput model's `pipeline_depth`, default 0: the poller waits for each batch).

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use tie::config::{IdleStrategy, ServiceConfig};
use tie::dataplane::Server;
use tie::models::{load_repository, LoadOptions};
use tie_client::{monotonic_ns, Client, ConnectOptions, Priority, WaitStrategy};
use tie_engine::devices::Gpus;

fn env(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn report(name: &str, h: &Histogram<u64>, rows: usize) {
    let p50 = h.value_at_quantile(0.5);
    println!(
        "{name:<40} n={:<8} p50={:>7.2}us p90={:>7.2}us p99={:>7.2}us p99.9={:>7.2}us max={:>8.2}us rows/s@p50={:>6.2}M",
        h.len(),
        p50 as f64 / 1e3,
        h.value_at_quantile(0.9) as f64 / 1e3,
        h.value_at_quantile(0.99) as f64 / 1e3,
        h.value_at_quantile(0.999) as f64 / 1e3,
        h.max() as f64 / 1e3,
        rows as f64 * 1e3 / p50.max(1) as f64,
    );
}

/// A repository of GPU models: mlp64 in fp32 and fp16, mlp256 in fp16 and fp32; mlp64 on the
/// CPU and with `backend = "auto"` (each batch on the engine measured faster for its size); and
/// `deterministic = true` copies of gpu64 and wide16 (`…d`: the fused kernels only), whose
/// figures beside the others' are what determinism costs.
fn repository(root: &std::path::Path, dir: &std::path::Path) {
    // Batch-1 models never wait for a batch to fill; wide16 (the throughput run) waits 20 us.
    for (name, source, backend, precision, timeout_us, deterministic) in [
        ("cpu64", "mlp64", "cpu", "fp32", 0, false),
        ("auto64", "mlp64", "auto", "fp32", 0, false),
        ("gpu64", "mlp64", "cuda", "fp32", 0, false),
        ("gpu64d", "mlp64", "cuda", "fp32", 0, true),
        ("gpu64h", "mlp64", "cuda", "fp16", 0, false),
        ("wide16", "mlp256", "cuda", "fp16", 20, false),
        ("wide16d", "mlp256", "cuda", "fp16", 0, true),
        ("wide32", "mlp256", "cuda", "fp32", 0, false),
    ] {
        let d = dir.join(name);
        std::fs::create_dir_all(d.join("1")).unwrap();
        std::fs::copy(
            root.join(format!("models/{source}/1/model.onnx")),
            d.join("1/model.onnx"),
        )
        .unwrap();
        // The throughput model keeps PIPELINE_DEPTH batches in flight.
        let depth = if timeout_us > 0 {
            env("PIPELINE_DEPTH", 0)
        } else {
            0
        };
        std::fs::write(
            d.join("config.toml"),
            format!(
                "backend = \"{backend}\"\nprecision = \"{precision}\"\nbatch_timeout_us = {timeout_us}\npipeline_depth = {depth}\ndeterministic = {deterministic}\n"
            ),
        )
        .unwrap();
    }
}

fn main() {
    let iters = env("ITERS", 100_000);
    let client_core = env("CLIENT_CORE", 1);
    let server_core = env("SERVER_CORE", 2);
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let dir = std::env::temp_dir().join(format!("tie-gpu-bench-{}", std::process::id()));
    let socket_dir = dir.join("sockets");
    std::fs::create_dir_all(&socket_dir).unwrap();
    repository(root, &dir.join("models"));
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter("info")
        .init();

    let mut config =
        ServiceConfig::parse("[batch_processing]\nmax_batch_size = 256\nbatch_timeout_us = 20\n")
            .unwrap();
    config.server.endpoint = "gpubench".into();
    config.server.socket_dir = Some(socket_dir.clone());
    let mut pollers = vec![server_core];
    if let Ok(extra) = std::env::var("POLLER_CORES") {
        pollers.extend(
            extra
                .split(',')
                .filter_map(|c| c.trim().parse::<usize>().ok()),
        );
    }
    config.server.poller_cores = pollers;
    config.server.idle = IdleStrategy::Spin;
    // Seven GPU models, and auto64's GPU copy (held where its batches split between engines).
    config.model_deployment.max_models_per_gpu = 8;
    let gpus = Gpus::probe(&config.gpu_options());
    if let Some(why) = gpus.unavailable() {
        println!("SKIPPED: no usable GPU: {why}");
        return;
    }
    gpus.log();
    let options = LoadOptions {
        layouts_dir: root.join("layouts/features"),
        warmup_requests: 100,
        profile_iterations: 50,
        ..LoadOptions::from_config_with(&config, gpus)
    };
    let models = load_repository(&dir.join("models"), &options).expect("load models");

    // The backend alone, same thread: eight input sets in rotation (not one cached buffer).
    for m in &models {
        let io = &m.backend.info().io;
        let sizes: &[usize] = if m.name.starts_with("gpu64") {
            &[1, 64, 256]
        } else {
            &[1, 8, 64, 256]
        };
        for &rows in sizes {
            let sets: Vec<Vec<f32>> = (0..8)
                .map(|s| {
                    (0..rows * io.input_width)
                        .map(|i| ((i * 31 + s * 7) as f32 * 0.013).sin())
                        .collect()
                })
                .collect();
            let mut output = vec![0.0f32; rows * io.output_width];
            let mut h = Histogram::<u64>::new_with_bounds(1, 100_000_000, 3).unwrap();
            let n = (iters / rows.max(4)).clamp(2_000, 50_000);
            for i in 0..n + 500 {
                let t = Instant::now();
                m.backend
                    .run_batch(&sets[i % 8], rows, &mut output)
                    .unwrap();
                if i >= 500 {
                    h.record(t.elapsed().as_nanos().max(1) as u64).unwrap();
                }
            }
            report(&format!("backend {} batch {rows}", m.name), &h, rows);
        }
    }

    let server = Server::start(&config, models).expect("start server");
    let connect = |model: &str| {
        Client::connect(
            "gpubench",
            model,
            ConnectOptions {
                socket_dir: Some(socket_dir.clone()),
                wait: WaitStrategy::BusySpin,
                timeout: Duration::from_secs(5),
                request_capacity: 256,
                response_capacity: 256,
                ..ConnectOptions::default()
            },
        )
        .expect("connect")
    };

    // Batch 1, one client, closed loop: the client-measured round trip.
    std::thread::scope(|s| {
        s.spawn(|| {
            if !core_affinity::set_for_current(core_affinity::CoreId { id: client_core }) {
                eprintln!("warning: cannot pin the client to core {client_core}");
            }
            for model in ["cpu64", "auto64", "gpu64", "gpu64d", "gpu64h", "wide32"] {
                let mut client = connect(model);
                let sets: Vec<Vec<f32>> = (0..8)
                    .map(|s| {
                        (0..client.feature_count())
                            .map(|i| ((i as usize * 31 + s * 7) as f32 * 0.013).sin())
                            .collect()
                    })
                    .collect();
                let mut h = Histogram::<u64>::new_with_bounds(1, 100_000_000, 3).unwrap();
                let (mut queue, mut compute) = (0u64, 0u64);
                for i in 0..iters + 5_000 {
                    let p = client.predict(&sets[i % 8]).expect("predict");
                    if i >= 5_000 {
                        h.record(p.round_trip_ns.max(1)).unwrap();
                        queue += p.response.queue_ns;
                        compute += p.response.compute_ns;
                    }
                }
                report(&format!("e2e {model} batch 1 (round trip)"), &h, 1);
                println!(
                    "{:<40} mean server queue {:.2}us, mean server compute {:.2}us",
                    "",
                    queue as f64 / iters as f64 / 1e3,
                    compute as f64 / iters as f64 / 1e3
                );
            }
        });
    });

    // Throughput: CLIENTS clients, each keeping WINDOW requests in flight, for SECONDS.
    let clients = env("CLIENTS", 8);
    let first_core = env("FIRST_CLIENT_CORE", 4);
    let window = env("WINDOW", 64);
    let seconds = env("SECONDS", 3);
    for model in ["wide16"] {
        let results: Vec<(u64, Histogram<u64>)> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..clients)
                .map(|c| {
                    let connect = &connect;
                    s.spawn(move || {
                        let core = first_core + c;
                        if !core_affinity::set_for_current(core_affinity::CoreId { id: core }) {
                            eprintln!("warning: cannot pin client {c} to core {core}");
                        }
                        let mut client = connect(model);
                        let features: Vec<f32> = (0..client.feature_count())
                            .map(|i| ((i as usize * 13 + c) as f32 * 0.021).cos())
                            .collect();
                        let mut sent = VecDeque::with_capacity(window);
                        let mut h = Histogram::<u64>::new_with_bounds(1, 100_000_000, 3).unwrap();
                        let mut done = 0u64;
                        let start = Instant::now();
                        let end = start + Duration::from_secs(seconds as u64);
                        let warm = start + Duration::from_millis(300);
                        loop {
                            let now = Instant::now();
                            if now >= end && sent.is_empty() {
                                break;
                            }
                            while now < end && sent.len() < window {
                                client
                                    .submit(&features, Priority::Normal, None)
                                    .expect("submit");
                                sent.push_back(monotonic_ns());
                            }
                            while let Some(r) = client.poll() {
                                let t0 = sent.pop_front().expect("a response per request");
                                assert!(r.status.is_ok(), "{:?}", r.status);
                                if Instant::now() > warm && Instant::now() < end {
                                    h.record((monotonic_ns() - t0).max(1)).unwrap();
                                    done += 1;
                                }
                            }
                        }
                        (done, h)
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let mut all = Histogram::<u64>::new_with_bounds(1, 100_000_000, 3).unwrap();
        let mut total = 0;
        for (n, h) in &results {
            total += n;
            all.add(h).unwrap();
        }
        let measured_s = seconds as f64 - 0.3;
        report(
            &format!("e2e {model} {clients} clients x {window} in flight"),
            &all,
            1,
        );
        println!(
            "{:<40} throughput {:.3} M rows/s",
            "",
            total as f64 / measured_s / 1e6
        );
    }
    for (key, b) in server.batch_stats() {
        println!("batches {key}: {b:?}");
    }
    server.shutdown();
    let _ = std::fs::remove_dir_all(&dir);
}
