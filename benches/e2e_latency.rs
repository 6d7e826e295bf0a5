//! End-to-end latency: a client thread and the server's poller, each pinned to its own core,
//! one request at a time (`predict`, busy-spin), round trip recorded into an HdrHistogram.
//!
//! `cargo bench --bench e2e_latency` (env: `ITERS`, default 200000; `CLIENT_CORE`, default 0;
//! `SERVER_CORE`, default 1; `REPO`, the model repository, default `models/`; `MODELS`, the
//! models measured, default `identity,mlp64`; `BATCHES`, the backend's batch sizes, default
//! `1,4,16,64`; `IDLE_SESSIONS`, sessions connected to each model and left idle while its
//! round trip is measured, default 0; `COLD_SAMPLES`, round trips each after 3 ms without a
//! request, default 300; `JOURNAL`, a directory: every model journals every answer, features
//! included, into it; unset: no journal; `JOURNAL_CORE`, the journal writer's core, default:
//! the process's CPUs but the poller's). Prints p50/p90/p99/p99.9/max per model, and the bare backend compute
//! time of a batch (and rows per second) for comparison.
//!
//! Rows: feature `i` of row `r` is `2 sin(0.37 i + 1.7 r)`, 256 rows in turn (as
//! `benches/trees_anchor.py` feeds its anchors).
//!
//! The tree models of `benches/trees_anchor.py`:
//! `REPO=target/bench-trees MODELS=lgbm500,lgbm500_onnx,xgb300,xgb300_onnx BATCHES=1,256`.

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

/// This process's resident memory (`/proc/self/statm`), in bytes.
fn rss_bytes() -> u64 {
    procfs::process::Process::myself()
        .and_then(|p| p.statm())
        .map_or(0, |s| s.resident * procfs::page_size())
}

/// Row `r` of the benchmark's rows, `width` features.
fn row(r: usize, width: usize) -> impl Iterator<Item = f32> {
    (0..width).map(move |i| 2.0 * (0.37 * i as f32 + 1.7 * (r % 256) as f32).sin())
}

/// Starts this program again as a process holding `n` idle sessions to `model`; returns once
/// they are connected. It exits when its stdin closes.
fn idle_child(socket_dir: &std::path::Path, model: &str, n: usize) -> std::process::Child {
    use std::io::BufRead;
    let mut child = std::process::Command::new(std::env::current_exe().unwrap())
        .env("E2E_IDLE_CHILD", format!("{n}"))
        .env("E2E_IDLE_MODEL", model)
        .env("E2E_IDLE_SOCKETS", socket_dir)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("start the idle sessions' process");
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert_eq!(
        line.trim(),
        "connected",
        "the idle sessions' process failed"
    );
    child
}

/// The idle sessions' process (see [`idle_child`]).
fn idle_sessions(n: usize) {
    let options = ConnectOptions {
        socket_dir: Some(std::env::var_os("E2E_IDLE_SOCKETS").unwrap().into()),
        timeout: Duration::from_secs(5),
        ..ConnectOptions::default()
    };
    let model = std::env::var("E2E_IDLE_MODEL").unwrap();
    let clients: Vec<Client> = (0..n)
        .map(|_| Client::connect("bench", &model, options.clone()).expect("connect"))
        .collect();
    println!("connected");
    let _ = std::io::Read::read_to_end(&mut std::io::stdin(), &mut Vec::new());
    drop(clients);
}

fn main() {
    if let Some(n) = std::env::var("E2E_IDLE_CHILD")
        .ok()
        .and_then(|n| n.parse().ok())
    {
        return idle_sessions(n);
    }
    // `cargo bench` passes `--bench`; nothing else is taken from the command line.
    let iters = env("ITERS", 200_000);
    let client_core = env("CLIENT_CORE", 0);
    let server_core = env("SERVER_CORE", 1);
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let socket_dir = std::env::temp_dir().join(format!("tie-bench-{}", std::process::id()));

    // As `tie serve` does.
    tie::memory::keep_freed_memory();
    let mut config = ServiceConfig::default();
    config.server.endpoint = "bench".into();
    config.server.socket_dir = Some(socket_dir.clone());
    config.server.poller_cores = vec![server_core];
    config.server.idle = IdleStrategy::Spin;
    let journal = std::env::var_os("JOURNAL").map(std::path::PathBuf::from);
    config.journal.dir = journal.clone();
    if let Ok(core) = std::env::var("JOURNAL_CORE") {
        config.journal.writer_cores = vec![core.parse().expect("JOURNAL_CORE: a core number")];
    }
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
    let repo = std::env::var_os("REPO").map_or_else(|| root.join("models"), Into::into);
    let names: Vec<String> = std::env::var("MODELS")
        .unwrap_or_else(|_| "identity,mlp64".into())
        .split(',')
        .map(str::to_string)
        .collect();
    let batches: Vec<usize> = std::env::var("BATCHES")
        .unwrap_or_else(|_| "1,4,16,64".into())
        .split(',')
        .map(|b| b.parse().expect("BATCHES: sizes separated by commas"))
        .collect();
    let mut models: Vec<_> = load_repository(&repo, &options)
        .expect("load models")
        .into_iter()
        .filter(|m| names.contains(&m.name))
        .collect();
    if let Some(dir) = &journal {
        println!(
            "journal: every answer of every model, into {}",
            dir.display()
        );
        for m in &mut models {
            m.config.journal = true;
        }
    }
    assert_eq!(models.len(), names.len(), "MODELS names models REPO lacks");

    // Bare compute on the backend, same thread, for reference: each batch size (per batch),
    // but only batch 1 for the identity.
    for m in &models {
        let io = &m.backend.info().io;
        let sizes = if m.name == "identity" {
            &batches[..1]
        } else {
            &batches[..]
        };
        for &rows in sizes {
            // The 256 rows in turn (a batch of 256 is all of them).
            let w = io.input_width;
            let pool: Vec<f32> = (0..256 + rows).flat_map(|r| row(r, w)).collect();
            let mut output = vec![0.0f32; rows * io.output_width];
            let mut h = Histogram::<u64>::new_with_bounds(1, 10_000_000, 3).unwrap();
            for i in 0..(iters / rows).min(100_000) + 1000 {
                let first = (i * rows) % 256;
                let input = &pool[first * w..(first + rows) * w];
                let t = Instant::now();
                m.backend.run_batch(input, rows, &mut output).unwrap();
                if i >= 1000 {
                    h.record(t.elapsed().as_nanos().max(1) as u64).unwrap();
                }
            }
            let engine = m.backend.info().engine;
            report(&format!("backend {} ({engine}) batch {rows}", m.name), &h);
            if rows > 1 {
                println!(
                    "{:<34} {:.0} rows/s at the p50 batch time",
                    "",
                    rows as f64 * 1e9 / h.value_at_quantile(0.5) as f64
                );
            }
        }
    }

    let server = Server::start(&config, models).expect("start server");
    if !core_affinity::set_for_current(core_affinity::CoreId { id: client_core }) {
        eprintln!("warning: cannot pin the client to core {client_core}");
    }
    let idle_sessions = env("IDLE_SESSIONS", 0);
    let options = ConnectOptions {
        socket_dir: Some(socket_dir.clone()),
        wait: WaitStrategy::BusySpin,
        timeout: Duration::from_secs(5),
        ..ConnectOptions::default()
    };
    for model in &names {
        // Sessions that stay connected and send nothing while the round trip is measured, from
        // another process (this one's sessions would count as the control plane's).
        let rss_before = rss_bytes();
        let idle = (idle_sessions > 0).then(|| idle_child(&socket_dir, model, idle_sessions));
        if idle.is_some() {
            // Let the pollers adopt them before measuring.
            std::thread::sleep(Duration::from_millis(200));
            let grown = rss_bytes().saturating_sub(rss_before) as f64;
            println!(
                "{model}: {idle_sessions} idle sessions: server RSS +{:.1} MiB ({:.1} KiB each)",
                grown / (1 << 20) as f64,
                grown / 1024.0 / idle_sessions as f64
            );
        }
        let mut client = Client::connect("bench", model, options.clone()).expect("connect");
        let width = client.feature_count() as usize;
        let rows: Vec<Vec<f32>> = (0..256).map(|r| row(r, width).collect()).collect();
        let mut h = Histogram::<u64>::new_with_bounds(1, 10_000_000, 3).unwrap();
        for i in 0..iters + 10_000 {
            let p = client.predict(&rows[i % 256]).expect("predict");
            if i >= 10_000 {
                h.record(p.round_trip_ns.max(1)).unwrap();
            }
        }
        let with_idle = if idle_sessions > 0 {
            format!(", {idle_sessions} idle sessions")
        } else {
            String::new()
        };
        report(&format!("e2e {model} batch 1 (round trip){with_idle}"), &h);
        // The first request after the session sat quiet past the time a session goes cold.
        let mut cold = Histogram::<u64>::new_with_bounds(1, 10_000_000, 3).unwrap();
        for i in 0..env("COLD_SAMPLES", 300) {
            std::thread::sleep(Duration::from_millis(3));
            let p = client.predict(&rows[i % 256]).expect("predict");
            cold.record(p.round_trip_ns.max(1)).unwrap();
        }
        if !cold.is_empty() {
            report(&format!("e2e {model} after 3 ms quiet{with_idle}"), &cold);
        }
        if let Some(mut child) = idle {
            // Its stdin closes: it hangs up its sessions and exits.
            drop(child.stdin.take());
            let _ = child.wait();
        }
    }
    let journal = server.monitor().journal.get().cloned();
    server.shutdown();
    if let Some(j) = journal {
        for (key, c) in j.all_counters() {
            use std::sync::atomic::Ordering::Relaxed;
            println!(
                "journal {key}: {} rows written, {} dropped",
                c.written.load(Relaxed),
                c.dropped.load(Relaxed)
            );
        }
    }
    let _ = std::fs::remove_dir_all(&socket_dir);
}
