//! The monitor's thread: ticks, alert logging and the webhook, interval logs.
#![forbid(unsafe_code)]

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::*;

/// Runs the monitor's ticks every `monitoring.interval_ms` until `stop`: rates, alerts (logged,
/// and posted to `monitoring.alert_webhook`), interval logs.
pub fn monitor_task(monitor: Arc<Monitor>, stop: Arc<std::sync::atomic::AtomicBool>) {
    let settings = monitor.settings().clone();
    let interval = Duration::from_millis(settings.interval_ms.max(10));
    let keys: Vec<String> = monitor.entries().into_iter().map(|e| e.key).collect();
    let mut hlog = settings.hlog_dir.as_ref().and_then(|dir| {
        HlogFiles::create(dir, &keys)
            .inspect_err(
                |e| tracing::error!(dir = %dir.display(), error = %e, "cannot write interval logs"),
            )
            .ok()
    });
    let webhook = settings.alert_webhook.clone().and_then(webhook_sender);
    let mut last = Instant::now();
    let mut last_end_ms = 0i64;
    loop {
        let stopping = stop.load(Ordering::Relaxed);
        if !stopping {
            std::thread::sleep(Duration::from_millis(10).min(interval));
            if last.elapsed() < interval {
                continue;
            }
        }
        // A stopping server's last interval (the pollers have stopped) is ticked too.
        let elapsed = last.elapsed();
        last = Instant::now();
        // Models come and go: the entries are read again each interval.
        let entries = monitor.entries();
        let on_gpu = entries.iter().any(|e| !e.pci_bus_ids.is_empty());
        let gpus = if on_gpu {
            tie_engine::devices::utilizations().ok()
        } else {
            None
        };
        let clickhouse = monitor.clickhouse.get();
        // Strictly increasing: a row's key in ClickHouse holds its interval's end, and two
        // ticks in one millisecond (the last, at shutdown) must not collapse into one row.
        let end_ms = chrono::Utc::now().timestamp_millis().max(last_end_ms + 1);
        last_end_ms = end_ms;
        let mut rows = Vec::new();
        let events = monitor.tick(elapsed, gpus.as_deref(), &mut |i, sample, gpu| {
            let Some(entry) = entries.get(i) else {
                return;
            };
            if let Some(h) = hlog.as_mut() {
                h.write(&entry.key, sample, elapsed);
            }
            if let Some(ch) = clickhouse {
                rows.push(clickhouse::metrics_row(
                    ch.host(),
                    &entry.key,
                    sample,
                    elapsed,
                    end_ms,
                    gpu,
                    entry.device_memory_bytes,
                ));
            }
        });
        if let Some(ch) = clickhouse {
            ch.push(clickhouse::Table::Metrics, rows);
        }
        for e in events {
            report_alert(e, webhook.as_ref().map(|(tx, _)| tx));
        }
        if stopping {
            break;
        }
    }
    // The last events are posted before the server exits (for at most 2 s).
    if let Some((tx, handle)) = webhook {
        drop(tx);
        let until = Instant::now() + Duration::from_secs(2);
        while !handle.is_finished() && Instant::now() < until {
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

/// `v` as the f64 of its shortest decimal form, so that a log says `0.01`, not the f32's
/// exact `0.009999999776482582`.
fn as_written(v: f32) -> f64 {
    v.to_string().parse().unwrap_or(f64::from(v))
}

/// Logs an alert transition and queues it for the webhook, if there is one (never waiting:
/// an event the webhook's backlog has no room for is logged as not posted).
fn report_alert(e: AlertEvent, webhook: Option<&std::sync::mpsc::SyncSender<AlertEvent>>) {
    let (value, threshold) = (as_written(e.value), as_written(e.threshold));
    if e.state == "raised" {
        tracing::warn!(
            model = %e.model_key,
            alert = e.kind.name(),
            value,
            threshold,
            "performance alert raised"
        );
    } else {
        tracing::info!(
            model = %e.model_key,
            alert = e.kind.name(),
            value,
            threshold,
            "performance alert cleared"
        );
    }
    if let Some(tx) = webhook {
        match tx.try_send(e) {
            Ok(()) => {}
            Err(std::sync::mpsc::TrySendError::Full(_)) => {
                tracing::warn!("alert webhook backlog full: an alert event was not posted")
            }
            Err(std::sync::mpsc::TrySendError::Disconnected(_)) => {
                tracing::warn!("alert webhook thread gone: an alert event was not posted")
            }
        }
    }
}

/// A thread that POSTs alert transitions as JSON to `url`, in order, so a slow receiver holds
/// up nothing else; failures are logged. `None` (logged) when the thread cannot start.
pub(super) fn webhook_sender(
    url: String,
) -> Option<(
    std::sync::mpsc::SyncSender<AlertEvent>,
    std::thread::JoinHandle<()>,
)> {
    let (tx, rx) = std::sync::mpsc::sync_channel::<AlertEvent>(256);
    let spawned = std::thread::Builder::new()
        .name("tie-webhook".into())
        .spawn(move || {
            let agent: ureq::Agent = ureq::Agent::config_builder()
                .timeout_global(Some(Duration::from_secs(5)))
                .build()
                .into();
            for event in rx {
                let body = serde_json::to_vec(&event).unwrap_or_default();
                let sent = agent
                    .post(&url)
                    .header("content-type", "application/json")
                    .send(&body[..]);
                if let Err(e) = sent {
                    tracing::warn!(url = %url, error = %e, "alert webhook failed");
                }
            }
        });
    match spawned {
        Ok(handle) => Some((tx, handle)),
        Err(e) => {
            tracing::error!(error = %e, "cannot start the alert webhook thread");
            None
        }
    }
}
