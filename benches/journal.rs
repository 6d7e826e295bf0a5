//! The journal writer's throughput: chunks of 256 answers turned into Arrow record batches and
//! written to a Parquet file with the server's settings, on one core, as its writer thread
//! does (the poller's side, copying rows into chunks, is in `e2e_latency` with `JOURNAL`).
//!
//! `cargo bench --bench journal` (env: `ROWS`, default 512000; `WIDTHS`, features per row,
//! default `0,8,64`, 0: `journal_features = false`; `CORE`, default 0). Prints, per width, the
//! time per row to build the batches and to write them, and the rows per second of both.

use std::sync::Arc;
use std::time::Instant;

use parquet::arrow::ArrowWriter;
use tie::journal::writer::{properties, schema, to_batch};
use tie::journal::{Chunk, SessionInfo, CHUNK_ROWS};

fn env(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Feature `j` of row `i`: 1,000 distinct values, or with `RANDOM=1` floats that rarely
/// repeat (market data: compression finds little in them).
fn feature(i: usize, j: usize) -> f32 {
    if std::env::var_os("RANDOM").is_some_and(|v| v == "1") {
        let mut x = (i as u64) << 32 | j as u64;
        x = x.wrapping_mul(0x9E37_79B9_7F4A_7C15);
        x ^= x >> 29;
        (x % 1_000_003) as f32 * 1.3e-6 - 0.6
    } else {
        ((i * 31 + j * 7) % 1000) as f32 * 1e-3
    }
}

/// A full chunk of answers with `width` features each (none kept when 0) and one output.
fn chunk(width: usize) -> Chunk {
    let mut c = Chunk::default();
    c.model.push_str("mlp64");
    c.version = 1;
    c.input_width = width;
    c.output_width = 1;
    c.engines.push("cpu-mlp");
    c.sessions.push(SessionInfo {
        id: 1,
        pid: 1234,
        process: Arc::from("strategy"),
        source: "ring",
    });
    for i in 0..CHUNK_ROWS as u64 {
        c.session.push(0);
        c.engine.push(0);
        c.request_id.push(i);
        c.priority.push(1);
        c.status.push(0);
        c.sent_ns.push(1_000 * i);
        c.read_ns.push(1_000 * i + 300);
        c.answered_ns.push(1_000 * i + 900);
        c.has_features.push(width > 0);
        c.features
            .extend((0..width).map(|j| feature(i as usize, j)));
        c.has_outputs.push(true);
        c.outputs.push(i as f32 * 0.5);
        c.confidence.push(0.75);
    }
    c
}

fn main() {
    let rows = env("ROWS", 512_000);
    let core = env("CORE", 0);
    core_affinity::set_for_current(core_affinity::CoreId { id: core });
    let widths: Vec<usize> = std::env::var("WIDTHS")
        .unwrap_or_else(|_| "0,8,64".into())
        .split(',')
        .map(|w| w.parse().expect("WIDTHS: numbers separated by commas"))
        .collect();
    let schema = schema();
    let path =
        std::env::temp_dir().join(format!("tie-bench-journal-{}.parquet", std::process::id()));
    for width in widths {
        let c = chunk(width);
        let chunks = rows.div_ceil(CHUNK_ROWS);
        let n = (chunks * CHUNK_ROWS) as f64;
        let file = std::fs::File::create(&path).unwrap();
        let mut props = properties().into_builder();
        match std::env::var("VARIANT").as_deref() {
            Ok("none") => props = props.set_compression(parquet::basic::Compression::UNCOMPRESSED),
            Ok("none-nostats") => {
                props = props
                    .set_compression(parquet::basic::Compression::UNCOMPRESSED)
                    .set_statistics_enabled(parquet::file::properties::EnabledStatistics::None)
            }
            Ok("before") => {
                // The settings before the lists went uncompressed and without statistics.
                for list in ["features", "outputs"] {
                    let values = parquet::schema::types::ColumnPath::new(vec![
                        list.into(),
                        "list".into(),
                        "item".into(),
                    ]);
                    props = props
                        .set_column_compression(values.clone(), parquet::basic::Compression::SNAPPY)
                        .set_column_statistics_enabled(
                            values,
                            parquet::file::properties::EnabledStatistics::Page,
                        );
                }
            }
            Ok("nostats") => {
                props =
                    props.set_statistics_enabled(parquet::file::properties::EnabledStatistics::None)
            }
            _ => {}
        }
        let mut writer = ArrowWriter::try_new(file, schema.clone(), Some(props.build())).unwrap();
        let (mut build_ns, mut write_ns) = (0u128, 0u128);
        for _ in 0..chunks {
            let t = Instant::now();
            let batch = to_batch(&c, &schema);
            let built = Instant::now();
            writer.write(&batch).unwrap();
            build_ns += (built - t).as_nanos();
            write_ns += built.elapsed().as_nanos();
        }
        let t = Instant::now();
        writer.close().unwrap();
        write_ns += t.elapsed().as_nanos();
        let bytes = std::fs::metadata(&path).map_or(0, |m| m.len());
        let per_row = (build_ns + write_ns) as f64 / n;
        println!(
            "journal writer, {width:>2} features: build {:>5.0} ns/row, write {:>5.0} ns/row, {:.2} M rows/s, {:.0} bytes/row on disk",
            build_ns as f64 / n,
            write_ns as f64 / n,
            1e3 / per_row,
            bytes as f64 / n
        );
    }
    let _ = std::fs::remove_file(&path);
}
