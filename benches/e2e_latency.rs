//! End-to-end latency: a client thread and the server's poller, each pinned to its own core,
//! one request at a time (`predict`, busy-spin), round trip recorded into an HdrHistogram.
//!
//! `cargo bench --bench e2e_latency` (env: `ITERS`, default 200000; `CLIENT_CORE`, default 0;
//! `SERVER_CORE`, default 1). Prints p50/p90/p99/p99.9/max per model, and the bare backend
//! compute time of one row for comparison.

use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use tie::config::{IdleStrategy, ServiceConfig};
use tie::dataplane::Server;
use tie::models::{load_repository, LoadOptions};
use tie_client::{Client, ConnectOptions, WaitStrategy};

fn env(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn report(name: &str, h: &Histogram<u64>) {
    println!(
        "{name:<34} n={:<8} p50={:>7.2}us p90={:>7.2}us p99={:>7.2}us p99.9={:>7.2}us max={:>8.2}us",
        h.len(),
        h.value_at_quantile(0.5) as f64 / 1e3,
        h.value_at_quantile(0.9) as f64 / 1e3,
        h.value_at_quantile(0.99) as f64 / 1e3,
        h.value_at_quantile(0.999) as f64 / 1e3,
        h.max() as f64 / 1e3,
    );
}

fn main() {
    // `cargo bench` passes `--bench`; nothing else is taken from the command line.
    let iters = env("ITERS", 200_000);
    let client_core = env("CLIENT_CORE", 0);
    let server_core = env("SERVER_CORE", 1);
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let socket_dir = std::env::temp_dir().join(format!("tie-bench-{}", std::process::id()));

    let mut config = ServiceConfig::default();
    config.server.endpoint = "bench".into();
    config.server.socket_dir = Some(socket_dir.clone());
    config.server.poller_cores = vec![server_core];
    config.server.idle = IdleStrategy::Spin;
    let options = LoadOptions {
        layouts_dir: root.join("layouts/features"),
        warmup_requests: 100,
        profile_iterations: 20,
        // The CPU path, on any machine (benches/gpu.rs measures the GPU).
        ..LoadOptions::from_config_with(
            &config,
            tie_engine::devices::Gpus::none("the CPU benchmark"),
        )
    };
    let models: Vec<_> = load_repository(&root.join("models"), &options)
        .expect("load models")
        .into_iter()
        .filter(|m| m.name == "identity" || m.name == "mlp64")
        .collect();

    // Bare compute on the backend, same thread, for reference: batch 1, and larger batches
    // (per batch) for the MLP.
    for m in &models {
        let io = &m.backend.info().io;
        let sizes: &[usize] = if m.name == "mlp64" {
            &[1, 4, 16, 64]
        } else {
            &[1]
        };
        for &rows in sizes {
            let input = vec![0.25f32; rows * io.input_width];
            let mut output = vec![0.0f32; rows * io.output_width];
            let mut h = Histogram::<u64>::new_with_bounds(1, 10_000_000, 3).unwrap();
            for i in 0..(iters / rows).min(100_000) + 1000 {
                let t = Instant::now();
                m.backend.run_batch(&input, rows, &mut output).unwrap();
                if i >= 1000 {
                    h.record(t.elapsed().as_nanos().max(1) as u64).unwrap();
                }
            }
            let engine = m.backend.info().engine;
            report(&format!("backend {} ({engine}) batch {rows}", m.name), &h);
        }
    }

    let server = Server::start(&config, models).expect("start server");
    if !core_affinity::set_for_current(core_affinity::CoreId { id: client_core }) {
        eprintln!("warning: cannot pin the client to core {client_core}");
    }
    for model in ["identity", "mlp64"] {
        let mut client = Client::connect(
            "bench",
            model,
            ConnectOptions {
                socket_dir: Some(socket_dir.clone()),
                wait: WaitStrategy::BusySpin,
                timeout: Duration::from_secs(5),
                ..ConnectOptions::default()
            },
        )
        .expect("connect");
        let features: Vec<f32> = (0..client.feature_count())
            .map(|i| (i as f32 * 0.37).sin())
            .collect();
        let mut h = Histogram::<u64>::new_with_bounds(1, 10_000_000, 3).unwrap();
        for i in 0..iters + 10_000 {
            let p = client.predict(&features).expect("predict");
            if i >= 10_000 {
                h.record(p.round_trip_ns.max(1)).unwrap();
            }
        }
        report(&format!("e2e {model} batch 1 (round trip)"), &h);
    }
    server.shutdown();
    let _ = std::fs::remove_dir_all(&socket_dir);
}
