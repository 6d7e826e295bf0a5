//! The performance monitor: per model, HdrHistograms of each stage of a request and counters of
//! its outcomes, the spec's `ModelPerformanceMetrics`, threshold alerts, Prometheus text and
//! HdrHistogram interval logs.
//!
//! # How figures get here without slowing the pollers
//!
//! A poller records into its own [`Sample`] per model (a histogram record is a few
//! nanoseconds, with no lock and no shared cache line). Every [`FLUSH_NS`], and when it goes
//! idle, it swaps the sample for an empty one from its [`Exchange`] with `try_lock` only: it
//! never waits, never allocates, and keeps recording into the same sample when the monitor
//! holds a lock. The monitor merges what was handed over into the model's totals ([`collect`])
//! before every read and on every tick, empties the samples and hands them back.
//!
//! # Stages (nanoseconds)
//!
//! | stage | per | from | to |
//! |---|---|---|---|
//! | `queue` | request | frame accepted | its batch starts |
//! | `compute` | request | its batch starts | its batch's outputs are ready |
//! | `total` | request | frame accepted | its response is written (server side) |
//! | `end_to_end` | request | client submit | client read the response (reported by the client in its next frame) |
//! | `gather` | batch | batch starts | rows copied into the backend's staging (pinned memory on a GPU: the host side of H2D) |
//! | `execute` | batch | rows staged | outputs back in host memory (H2D, kernels and D2H on a GPU) |
//!
//! Only requests that were executed are in `queue`, `compute` and `total`; every response is
//! counted by its status.
//!
//! [`collect`]: Monitor::collect
#![forbid(unsafe_code)]

mod alerts;
pub mod clickhouse;
mod hlog_files;
mod metrics;
pub mod prometheus;
mod sample;
mod state;
mod task;

pub use alerts::*;
pub use hlog_files::*;
pub use metrics::*;
pub use prometheus::{ProcessFamilies, CONTENT_TYPE, LATENCY_BUCKETS};
pub use sample::*;
pub use state::*;
pub use task::*;

#[cfg(test)]
mod tests {
    use super::*;

    use crate::config::{MonitoringSection, PerformanceThresholdsSection};
    use tie_layouts::abi::Status;

    #[test]
    fn alerts_rise_once_and_clear_past_the_hysteresis() {
        // Upper threshold 10: raised above 10, kept down to 9, cleared below.
        let mut active = false;
        let mut transitions = 0;
        for v in [5.0, 11.0, 10.5, 9.5, 9.1, 12.0, 8.9, 9.5, 10.0] {
            let next = alert_state(active, Some(v), 10.0, true);
            transitions += usize::from(next != active);
            active = next;
        }
        assert_eq!(transitions, 2);
        assert!(!active);
        // Lower threshold 100: raised below, cleared above 110; unmeasured keeps the state.
        assert!(alert_state(false, Some(99.0), 100.0, false));
        assert!(alert_state(true, Some(105.0), 100.0, false));
        assert!(!alert_state(true, Some(111.0), 100.0, false));
        assert!(alert_state(true, None, 100.0, false));
    }

    #[test]
    fn samples_handed_over_are_merged_once_and_reused() {
        let monitor = Monitor::new(
            vec![ModelEntry {
                key: "m:1".into(),
                device_memory_bytes: None,
                pci_bus_ids: Vec::new(),
            }],
            PerformanceThresholdsSection::default(),
            MonitoringSection::default(),
        );
        // Nothing measured yet: no stage is reported (not a row of zeros).
        assert!(monitor.metrics(0).stages.is_empty());
        let mut r = monitor.recorder(0);
        for round in 0..10u64 {
            let s = r.sample();
            s.requests += 2;
            s.respond(Status::OK);
            s.respond(Status::TIMEOUT);
            s.record(Stage::Total, 1_000 * (round + 1));
            r.flush(round * FLUSH_NS, FLUSH_NS);
            monitor.collect();
        }
        r.flush(u64::MAX, 0);
        let m = monitor.metrics(0);
        assert_eq!(m.total_requests, 20);
        assert_eq!(m.successful_requests, 10);
        assert_eq!(m.timeouts, 10);
        assert_eq!(m.errors_by_kind.get("Timeout"), Some(&10));
        assert_eq!(m.stages["total"].count, 10);
        assert_eq!(
            m.stages.keys().collect::<Vec<_>>(),
            ["total"],
            "only the stage recorded is reported"
        );
        assert!(
            (m.max_latency_ms.unwrap() - 0.010).abs() < 1e-4,
            "{:?}",
            m.max_latency_ms
        );
    }

    #[test]
    fn pci_ids_match_across_spellings() {
        assert_eq!(pci_key("00000000:19:00.0"), pci_key("0000:19:00.0"));
        assert_ne!(pci_key("0000:19:00.0"), pci_key("0000:1a:00.0"));
        assert_eq!(pci_key("19:00.0"), Some((0, 0x19, 0, 0)));
    }

    #[test]
    fn a_models_gpu_utilisation_is_the_mean_of_its_gpus_as_nvml_spells_them() {
        use tie_engine::devices::GpuUtilization;
        let gpus = [
            GpuUtilization {
                pci_bus_id: "00000000:19:00.0".into(),
                utilization_pct: 90,
            },
            GpuUtilization {
                pci_bus_id: "00000000:3B:00.0".into(),
                utilization_pct: 50,
            },
        ];
        let on = |ids: &[&str]| {
            let ids: Vec<String> = ids.iter().map(|s| s.to_string()).collect();
            super::state::gpu_utilization(&ids, &gpus)
        };
        assert_eq!(on(&["0000:19:00.0"]), Some(0.9));
        assert_eq!(on(&["0000:19:00.0", "0000:3b:00.0"]), Some(0.7));
        assert_eq!(on(&["0000:5e:00.0"]), None, "a GPU NVML does not list");
    }

    #[test]
    fn an_interval_log_is_never_written_through_a_symlink_and_one_failing_file_spares_the_others() {
        let dir = std::env::temp_dir().join(format!("tie-hlog-link-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let victim = dir.join("victim");
        std::fs::write(&victim, "keep me").unwrap();
        std::os::unix::fs::symlink(&victim, hlog_path(&dir, "a:1")).unwrap();
        // A hard link to another file of this user, and a FIFO (which would block an open).
        let linked = dir.join("linked");
        std::fs::write(&linked, "keep me too").unwrap();
        std::fs::hard_link(&linked, hlog_path(&dir, "c:1")).unwrap();
        rustix::fs::mknodat(
            rustix::fs::CWD,
            hlog_path(&dir, "d:1"),
            rustix::fs::FileType::Fifo,
            rustix::fs::Mode::from_raw_mode(0o600),
            0,
        )
        .unwrap();
        let keys = ["a:1", "b:1", "c:1", "d:1"].map(String::from);
        let mut files = HlogFiles::create(&dir, &keys).unwrap();
        let mut sample = Sample::default();
        sample.record(Stage::Total, 1000);
        files.write("a:1", &sample, std::time::Duration::from_secs(1));
        files.write("b:1", &sample, std::time::Duration::from_secs(1));
        drop(files);
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "keep me");
        assert_eq!(std::fs::read_to_string(&linked).unwrap(), "keep me too");
        let b = std::fs::read(hlog_path(&dir, "b:1")).unwrap();
        assert_eq!(tie_hlog::read_hlog(&b).unwrap().tags["total"].intervals, 1);
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(hlog_path(&dir, "b:1"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o027, 0, "mode {mode:o}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn an_interval_log_reads_back_with_its_counts_and_percentiles() {
        let dir = std::env::temp_dir().join(format!("tie-hlog-{}", std::process::id()));
        let mut files = HlogFiles::create(&dir, &["m:1".to_string()]).unwrap();
        let mut sample = Sample::default();
        for i in 1..=1000u64 {
            sample.record(Stage::Total, i * 1000);
        }
        files.write("m:1", &sample, std::time::Duration::from_secs(1));
        sample.reset_in_place();
        sample.record_n(Stage::Total, 5_000_000, 10);
        sample.record(Stage::Queue, 42);
        files.write("m:1", &sample, std::time::Duration::from_secs(1));
        drop(files);
        let bytes = std::fs::read(hlog_path(&dir, "m:1")).unwrap();
        let log = tie_hlog::read_hlog(&bytes).unwrap();
        let total = &log.tags["total"];
        assert_eq!(total.intervals, 2);
        assert_eq!(total.histogram.len(), 1010);
        assert_eq!(
            total.histogram.max(),
            total.histogram.highest_equivalent(5_000_000)
        );
        assert!(total.histogram.value_at_percentile(50.0).abs_diff(505_000) < 1_000);
        assert_eq!(log.tags["queue"].histogram.len(), 1);
        assert!(matches!(
            tie_hlog::read_hlog(b"#only a comment\n"),
            Err(tie_hlog::HlogReadError::Empty)
        ));
        assert!(tie_hlog::read_hlog(b"garbage,line\n").is_err());
        let _ = std::fs::remove_dir_all(dir);
    }
}
