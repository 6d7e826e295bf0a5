//! `tie devices`: the GPUs the server would use, with NVML's figures.

use std::path::PathBuf;
use std::process::ExitCode;

use tie::config::ServiceConfig;

/// `tie devices`.
#[derive(Debug, clap::Args)]
pub struct DevicesArgs {
    /// Service config (TOML), for `[gpu_config]`.
    #[arg(long, env = "TIE_CONFIG")]
    pub config: Option<PathBuf>,
}

pub(super) fn devices(args: DevicesArgs) -> anyhow::Result<ExitCode> {
    let config = ServiceConfig::load(args.config.as_deref())?;
    let gpus = tie_engine::devices::Gpus::probe(&config.gpu_options());
    #[allow(unused_mut)]
    let mut devices = Vec::<serde_json::Value>::new();
    #[cfg(feature = "cuda")]
    if let tie_engine::devices::Gpus::Available(rt) = &gpus {
        for d in rt.devices() {
            devices.push(serde_json::json!({
                "ordinal": d.ordinal(),
                "name": d.name(),
                "arch": d.arch(),
                "memory_mb": d.total_bytes() >> 20,
            }));
        }
    }
    let (nvml, nvml_error) = match tie_engine::devices::figures() {
        Ok(f) => (Some(f), None),
        Err(e) => (None, Some(e.to_string())),
    };
    let report = serde_json::json!({
        "gpu_usable": gpus.unavailable().is_none(),
        "reason": gpus.unavailable(),
        "devices": devices,
        "nvml": nvml,
        "nvml_error": nvml_error,
    });
    println!("{}", serde_json::to_string_pretty(&report)?);
    Ok(ExitCode::SUCCESS)
}
