//! Log set-up: `tracing` to stderr, human-readable or JSON; `RUST_LOG` filters (default info).
#![forbid(unsafe_code)]

use std::sync::atomic::{AtomicBool, Ordering};

use tracing_subscriber::EnvFilter;

use crate::config::LogFormat;

/// Whether the process logs JSON (said before the config is read, where the command line or
/// the environment asks for it, and by [`init`]).
static JSON: AtomicBool = AtomicBool::new(false);

/// Says that the process logs `format`, before [`init`] (for an error on the way there).
pub fn announce(format: LogFormat) {
    JSON.store(format == LogFormat::Json, Ordering::Relaxed);
}

/// `message` as the process's fatal error: a JSON line like the log's when it logs JSON,
/// else `error: message`.
pub fn fatal_line(message: &str) -> String {
    if JSON.load(Ordering::Relaxed) {
        serde_json::json!({
            "timestamp": chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
            "level": "ERROR",
            "fields": { "message": message },
            "target": "tie",
        })
        .to_string()
    } else {
        format!("error: {message}")
    }
}

/// Installs the global subscriber (once; later calls do nothing).
pub fn init(format: LogFormat) {
    announce(format);
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    use std::io::IsTerminal;
    // Colours only on a terminal: a log file or journal gets plain text.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
}
