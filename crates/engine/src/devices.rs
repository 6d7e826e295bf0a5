//! Whether this server has GPUs ([`Gpus`]) and what NVML says about them ([`figures`]).
//!
//! Every figure here is read from the driver or NVML; one that cannot be read is `None`, never a
//! guess.

use std::sync::Arc;

use serde::Serialize;

/// The GPUs models may run on, or why there are none.
#[derive(Clone)]
pub enum Gpus {
    /// At least one configured GPU is usable.
    #[cfg(feature = "cuda")]
    Available(Arc<crate::cuda::GpuRuntime>),
    /// No GPU is usable, and why.
    Unavailable(Arc<str>),
}

impl std::fmt::Debug for Gpus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            #[cfg(feature = "cuda")]
            Self::Available(rt) => write!(f, "Available({} devices)", rt.devices().len()),
            Self::Unavailable(why) => write!(f, "Unavailable({why})"),
        }
    }
}

/// Which GPUs to open and the memory rules for models on them (the server's `[gpu_config]`
/// and `[model_deployment]`).
#[derive(Clone, Debug, PartialEq)]
pub struct GpuOptions {
    /// GPUs to use, by CUDA ordinal.
    pub device_ids: Vec<u32>,
    /// Capture executions as CUDA graphs.
    pub cuda_graphs: bool,
    /// Device memory pool per GPU, in MB.
    pub memory_pool_mb: u32,
    /// Fraction of a GPU's memory one model may use.
    pub memory_fraction_per_model: f32,
    /// Most models per GPU.
    pub max_models_per_gpu: u32,
}

impl Gpus {
    /// Opens the GPUs `options` names, with its memory rules.
    pub fn probe(options: &GpuOptions) -> Self {
        #[cfg(feature = "cuda")]
        {
            let limits = crate::cuda::MemoryLimits {
                pool_bytes: u64::from(options.memory_pool_mb) << 20,
                fraction_per_model: options.memory_fraction_per_model,
                max_models: options.max_models_per_gpu,
            };
            match crate::cuda::GpuRuntime::probe(&options.device_ids, options.cuda_graphs, limits) {
                Ok(rt) => Self::Available(rt),
                Err(why) => Self::Unavailable(why.to_string().into()),
            }
        }
        #[cfg(not(feature = "cuda"))]
        {
            let _ = options;
            Self::Unavailable(
                "this build has no GPU support (built without the `cuda` feature)".into(),
            )
        }
    }

    /// A runtime with no GPU, for callers that want the CPU only.
    pub fn none(why: &str) -> Self {
        Self::Unavailable(why.into())
    }

    /// Why no GPU is usable, if none is.
    pub fn unavailable(&self) -> Option<&str> {
        match self {
            #[cfg(feature = "cuda")]
            Self::Available(_) => None,
            Self::Unavailable(why) => Some(why),
        }
    }

    /// Logs, once, what models will run on.
    pub fn log(&self) {
        match self {
            #[cfg(feature = "cuda")]
            Self::Available(rt) => {
                for d in rt.devices() {
                    tracing::info!(
                        device = d.ordinal(),
                        name = d.name(),
                        arch = d.arch(),
                        memory_mb = d.total_bytes() >> 20,
                        graphs = rt.graphs(),
                        cublaslt = rt.cublaslt(),
                        "GPU in use"
                    );
                }
            }
            Self::Unavailable(why) => {
                tracing::info!(reason = %why, "no usable GPU: models run on the CPU");
            }
        }
    }
}

/// NVML's busy share of one GPU: the one figure the monitor reads every tick.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GpuUtilization {
    /// PCI bus id (`domain:bus:device.function`).
    pub pci_bus_id: String,
    /// Percent of the last sample period a kernel ran.
    pub utilization_pct: u32,
}

/// What NVML reports of one GPU now.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct GpuFigures {
    /// NVML index.
    pub index: u32,
    /// Product name.
    pub name: Option<String>,
    /// PCI bus id (`domain:bus:device.function`).
    pub pci_bus_id: Option<String>,
    /// Percent of the last sample period a kernel ran.
    pub utilization_pct: Option<u32>,
    /// Device memory in use (all processes).
    pub memory_used_mb: Option<u64>,
    /// Device memory.
    pub memory_total_mb: Option<u64>,
    /// Core temperature.
    pub temperature_c: Option<u32>,
    /// SM clock.
    pub sm_clock_mhz: Option<u32>,
    /// Memory clock.
    pub memory_clock_mhz: Option<u32>,
    /// Board power draw.
    pub power_w: Option<f32>,
}

/// Why NVML's figures cannot be read here.
#[derive(Clone, Debug, thiserror::Error)]
pub enum NvmlError {
    /// This build has no GPU support.
    #[error("this build has no GPU support (built without the `cuda` feature)")]
    NotBuilt,
    /// The NVML library could not be initialised (no driver, or no GPU).
    #[error("NVML unavailable: {reason}")]
    Init {
        /// NVML's message.
        reason: String,
    },
    /// NVML did not give the device count.
    #[error("NVML device count: {reason}")]
    DeviceCount {
        /// NVML's message.
        reason: String,
    },
}

/// NVML's figures for every GPU, or why there are none (no NVML library, no GPU, or a build
/// without GPU support).
///
/// # Errors
/// Why NVML is not usable here.
pub fn figures() -> Result<Vec<GpuFigures>, NvmlError> {
    #[cfg(feature = "cuda")]
    {
        use nvml_wrapper::enum_wrappers::device::{Clock, TemperatureSensor};
        let nvml = nvml()?;
        let count = nvml.device_count().map_err(|e| NvmlError::DeviceCount {
            reason: e.to_string(),
        })?;
        Ok((0..count)
            .map(|index| match nvml.device_by_index(index) {
                Ok(d) => {
                    let memory = d.memory_info().ok();
                    GpuFigures {
                        index,
                        name: d.name().ok(),
                        pci_bus_id: d.pci_info().ok().map(|p| p.bus_id),
                        utilization_pct: d.utilization_rates().ok().map(|u| u.gpu),
                        memory_used_mb: memory.as_ref().map(|m| m.used >> 20),
                        memory_total_mb: memory.as_ref().map(|m| m.total >> 20),
                        temperature_c: d.temperature(TemperatureSensor::Gpu).ok(),
                        sm_clock_mhz: d.clock_info(Clock::SM).ok(),
                        memory_clock_mhz: d.clock_info(Clock::Memory).ok(),
                        power_w: d.power_usage().ok().map(|mw| mw as f32 / 1000.0),
                    }
                }
                Err(_) => GpuFigures {
                    index,
                    ..GpuFigures::default()
                },
            })
            .collect())
    }
    #[cfg(not(feature = "cuda"))]
    {
        Err(NvmlError::NotBuilt)
    }
}

/// The utilisation of every GPU NVML can read it of, with one NVML call per GPU: the handles
/// and bus ids are looked up once per process (again at each call until every GPU's were
/// read). For a server's periodic sampling, where [`figures`] would make eight calls per GPU,
/// each a call into the driver beside the pollers' launches and completion checks. A GPU
/// whose figure NVML does not give is left out.
///
/// # Errors
/// Why NVML is not usable here.
pub fn utilizations() -> Result<Vec<GpuUtilization>, NvmlError> {
    #[cfg(feature = "cuda")]
    {
        type Handles = Vec<(nvml_wrapper::Device<'static>, String)>;
        static DEVICES: std::sync::OnceLock<Handles> = std::sync::OnceLock::new();
        let read = |devices: &Handles| -> Vec<GpuUtilization> {
            devices
                .iter()
                .filter_map(|(device, bus_id)| {
                    Some(GpuUtilization {
                        pci_bus_id: bus_id.clone(),
                        utilization_pct: device.utilization_rates().ok()?.gpu,
                    })
                })
                .collect()
        };
        if let Some(devices) = DEVICES.get() {
            return Ok(read(devices));
        }
        let nvml = nvml()?;
        let count = nvml.device_count().map_err(|e| NvmlError::DeviceCount {
            reason: e.to_string(),
        })?;
        let devices: Handles = (0..count)
            .filter_map(|index| {
                let device = nvml.device_by_index(index).ok()?;
                let bus_id = device.pci_info().ok()?.bus_id;
                Some((device, bus_id))
            })
            .collect();
        // Kept only when complete: a GPU NVML could not name this time is looked up again.
        if count > 0 && devices.len() == count as usize {
            return Ok(read(DEVICES.get_or_init(|| devices)));
        }
        Ok(read(&devices))
    }
    #[cfg(not(feature = "cuda"))]
    {
        Err(NvmlError::NotBuilt)
    }
}

/// The process's NVML, initialised at the first use.
#[cfg(feature = "cuda")]
fn nvml() -> Result<&'static nvml_wrapper::Nvml, NvmlError> {
    static NVML: std::sync::OnceLock<Result<nvml_wrapper::Nvml, NvmlError>> =
        std::sync::OnceLock::new();
    NVML.get_or_init(|| {
        nvml_wrapper::Nvml::init().map_err(|e| NvmlError::Init {
            reason: e.to_string(),
        })
    })
    .as_ref()
    .map_err(Clone::clone)
}
