//! Latency–throughput curve of the MLP on the CPU, batching off vs on, from several pinned
//! client processes.
//!
//! `cargo bench --bench batching` (env: `CLIENTS` client processes, default 8;
//! `SERVER_CORE`, default 1; `FIRST_CLIENT_CORE`, default 2 (clients take the next cores,
//! wrapping); `POINT_MS`, default 1000; `RATES`, comma-separated total offered req/s, default a
//! doubling sweep from 25k; `MODEL`, default mlp64).
//!
//! Each client process is this program re-run with `TIE_BENCH_CLIENT` set: it sends open-loop
//! at its share of the offered rate, times every request from its *scheduled* send time (no
//! coordinated omission: a request that could not be sent on time counts its wait), and
//! returns an HdrHistogram. The server runs in this process, its poller pinned and spinning.
//! For each policy the sweep stops two points past saturation (achieved < 95% offered).

use std::io::Write;
use std::time::Duration;

use hdrhistogram::serialization::{Deserializer, Serializer, V2Serializer};
use hdrhistogram::Histogram;
use tie::config::{IdleStrategy, ServiceConfig};
use tie::dataplane::Server;
use tie::models::{load_repository, LoadOptions};
use tie_client::{monotonic_ns, Client, ConnectOptions, Priority, WaitStrategy};

fn env(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn main() {
    if std::env::var("TIE_BENCH_CLIENT").is_ok() {
        client();
        return;
    }
    let clients = env("CLIENTS", 8);
    let server_core = env("SERVER_CORE", 1) as usize;
    let first_core = env("FIRST_CLIENT_CORE", 2) as usize;
    let point_ms = env("POINT_MS", 1000);
    let model = std::env::var("MODEL").unwrap_or_else(|_| "mlp64".into());
    let rates: Vec<u64> = match std::env::var("RATES") {
        Ok(r) => r.split(',').filter_map(|v| v.trim().parse().ok()).collect(),
        Err(_) => std::iter::successors(Some(25_000u64), |r| Some(r * 2))
            .take(10)
            .collect(),
    };
    let ncores = core_affinity::get_core_ids().map_or(1, |c| c.len());
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    println!(
        "model {model}, {clients} client processes (cores {first_core}..), server poller on core {server_core}, {ncores} cores, {point_ms} ms per point"
    );
    println!(
        "{:<22} {:>10} {:>10} {:>9} {:>9} {:>9} {:>9} {:>8} {:>8} {:>7}",
        "policy",
        "offered/s",
        "achieved/s",
        "p50 us",
        "p99 us",
        "p99.9 us",
        "max us",
        "failed",
        "unsent",
        "rows/b"
    );
    for (name, batching) in [
        ("off (batch 1)", "max_batch_size = 1\nbatch_timeout_us = 0"),
        (
            "on, greedy",
            "max_batch_size = 64\nbatch_timeout_us = 0\nenable_dynamic_batching = false",
        ),
        (
            "on, timeout 50us",
            "max_batch_size = 64\nbatch_timeout_us = 50\nenable_dynamic_batching = false",
        ),
    ] {
        let socket_dir = std::env::temp_dir().join(format!("tie-batching-{}", std::process::id()));
        let mut config =
            ServiceConfig::parse(&format!("[batch_processing]\n{batching}\n")).unwrap();
        config.server.endpoint = "bench".into();
        config.server.socket_dir = Some(socket_dir.clone());
        config.server.poller_cores = vec![server_core];
        config.server.idle = IdleStrategy::Spin;
        let options = LoadOptions {
            layouts_dir: root.join("layouts/features"),
            warmup_requests: 100,
            profile_iterations: 20,
            ..LoadOptions::from_config_with(
                &config,
                tie_engine::devices::Gpus::none("the CPU benchmark"),
            )
        };
        let models: Vec<_> = load_repository(&root.join("models"), &options)
            .unwrap()
            .into_iter()
            .filter(|m| m.name == model)
            .collect();
        let server = Server::start(&config, models).unwrap();
        let mut past_saturation = 0;
        for &rate in &rates {
            let before = server.stats();
            let children: Vec<_> = (0..clients)
                .map(|i| {
                    std::process::Command::new(std::env::current_exe().unwrap())
                        .env("TIE_BENCH_CLIENT", "1")
                        .env("TIE_SOCKET_DIR", &socket_dir)
                        .env("CORE", ((first_core + i as usize) % ncores).to_string())
                        .env("RATE", (rate / clients).max(1).to_string())
                        .env("POINT_MS", point_ms.to_string())
                        .env("MODEL", &model)
                        .stdout(std::process::Stdio::piped())
                        .spawn()
                        .unwrap()
                })
                .collect();
            let mut merged = Histogram::<u64>::new_with_bounds(1, 60_000_000_000, 3).unwrap();
            let (mut ok, mut failed, mut unsent) = (0u64, 0u64, 0u64);
            for child in children {
                let out = child.wait_with_output().unwrap();
                let text = String::from_utf8_lossy(&out.stdout);
                let line = text
                    .lines()
                    .find(|l| l.starts_with("RESULT"))
                    .unwrap_or_else(|| panic!("client: {text}"));
                let fields: Vec<&str> = line.split_whitespace().collect();
                ok += fields[1].parse::<u64>().unwrap();
                failed += fields[2].parse::<u64>().unwrap();
                unsent += fields[3].parse::<u64>().unwrap();
                let bytes = decode_hex(fields[4]);
                let h: Histogram<u64> = Deserializer::new().deserialize(&mut &bytes[..]).unwrap();
                merged.add(&h).unwrap();
            }
            let achieved = ok as f64 * 1000.0 / point_ms as f64;
            let after = server.stats();
            let rows_per_batch =
                (after.rows - before.rows) as f64 / (after.batches - before.batches).max(1) as f64;
            println!(
                "{:<22} {:>10} {:>10.0} {:>9.2} {:>9.2} {:>9.2} {:>9.1} {:>8} {:>8} {:>7.1}",
                name,
                rate,
                achieved,
                merged.value_at_quantile(0.5) as f64 / 1e3,
                merged.value_at_quantile(0.99) as f64 / 1e3,
                merged.value_at_quantile(0.999) as f64 / 1e3,
                merged.max() as f64 / 1e3,
                failed,
                unsent,
                rows_per_batch,
            );
            std::io::stdout().flush().unwrap();
            if achieved < 0.95 * rate as f64 {
                past_saturation += 1;
                if past_saturation >= 2 {
                    break;
                }
            }
        }
        server.shutdown();
        let _ = std::fs::remove_dir_all(&socket_dir);
    }
}

fn client() {
    let core = env("CORE", 0) as usize;
    let rate = env("RATE", 1000).max(1);
    let point_ms = env("POINT_MS", 1000);
    let model = std::env::var("MODEL").unwrap();
    core_affinity::set_for_current(core_affinity::CoreId { id: core });
    let mut client = Client::connect(
        "bench",
        &model,
        ConnectOptions {
            wait: WaitStrategy::BusySpin,
            request_capacity: 1024,
            response_capacity: 1024,
            timeout: Duration::from_secs(5),
            ..ConnectOptions::default()
        },
    )
    .unwrap();
    let features: Vec<f32> = (0..client.feature_count())
        .map(|i| (i as f32 * 0.37).sin())
        .collect();
    let interval_ns = 1_000_000_000 / rate;
    let total = rate * point_ms / 1000;
    let mut h = Histogram::<u64>::new_with_bounds(1, 60_000_000_000, 3).unwrap();
    // Scheduled send times of the requests in flight, in order.
    let mut scheduled = std::collections::VecDeque::with_capacity(1024);
    let start = monotonic_ns() + 10_000_000;
    let (mut sent, mut ok, mut failed) = (0u64, 0u64, 0u64);
    let deadline = start + point_ms * 1_000_000 + 5_000_000_000;
    while (sent < total || !scheduled.is_empty()) && monotonic_ns() < deadline {
        let now = monotonic_ns();
        let due = start + sent * interval_ns;
        if sent < total && now >= due {
            // Too many in flight: the request waits, and its wait counts.
            if client.submit(&features, Priority::Normal, None).is_ok() {
                scheduled.push_back(due);
                sent += 1;
            }
        }
        while let Some(r) = client.poll() {
            let due = scheduled.pop_front().unwrap();
            h.record(monotonic_ns().saturating_sub(due).max(1)).unwrap();
            if r.status.is_ok() {
                ok += 1;
            } else {
                failed += 1;
            }
        }
    }
    // Requests not sent, or not answered, by the end of the point (5 s after it).
    let unsent = scheduled.len() as u64 + (total - sent);
    let mut bytes = Vec::new();
    V2Serializer::new().serialize(&h, &mut bytes).unwrap();
    println!("RESULT {ok} {failed} {unsent} {}", encode_hex(&bytes));
}

fn encode_hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn decode_hex(text: &str) -> Vec<u8> {
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&text[i..i + 2], 16).unwrap())
        .collect()
}
