//! Finding usable GPUs ([`GpuRuntime::probe`]) and booking their memory ([`GpuDevice::reserve`]).

use std::sync::{Arc, Mutex};

use cudarc::driver::CudaContext;

/// Why a model was refused device memory (the spec's `OutOfMemory { requested_mb }`).
#[derive(Clone, Debug, thiserror::Error)]
#[error("GPU out of memory: requested {requested_mb}MB ({why})")]
pub struct OutOfMemory {
    /// Device memory one instance of the model needs, rounded up.
    pub requested_mb: usize,
    /// Which limit it hit.
    pub why: String,
}

/// The memory rules of `[model_deployment]` and `[gpu_config]`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct MemoryLimits {
    /// Device memory all models on a device may hold (`memory_pool_size_mb`; 0: the device's).
    pub pool_bytes: u64,
    /// Share of the pool one model may hold (`memory_fraction_per_model`; 0 in tests: no limit).
    pub fraction_per_model: f32,
    /// Models per device (`max_models_per_gpu`; 0: no limit).
    pub max_models: u32,
}

/// A GPU the server may use.
pub struct GpuDevice {
    ordinal: usize,
    ctx: Arc<CudaContext>,
    name: String,
    arch: String,
    total_bytes: u64,
    /// PCI address (`0000:3b:00.0`), if the driver reports it.
    pci: Option<String>,
    ledger: Mutex<Ledger>,
}

#[derive(Default)]
struct Ledger {
    bytes: u64,
    models: u32,
}

/// Device memory booked for one model instance (or one of its pipelines); given back on drop.
pub struct Reservation {
    device: Arc<GpuDevice>,
    bytes: u64,
    /// It counts as a model against `max_models`.
    model: bool,
}

impl Drop for Reservation {
    fn drop(&mut self) {
        let mut l = self.device.ledger.lock().unwrap_or_else(|e| e.into_inner());
        l.bytes -= self.bytes;
        l.models -= u32::from(self.model);
    }
}

impl GpuDevice {
    /// CUDA ordinal.
    pub fn ordinal(&self) -> usize {
        self.ordinal
    }

    /// Product name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// NVRTC target (`sm_90`).
    pub fn arch(&self) -> &str {
        &self.arch
    }

    /// Device memory.
    pub fn total_bytes(&self) -> u64 {
        self.total_bytes
    }

    /// PCI address (`0000:3b:00.0`).
    pub fn pci_address(&self) -> Option<&str> {
        self.pci.as_deref()
    }

    /// NUMA node of the GPU's PCI device (`None` where the host has one node or does not say).
    pub fn numa_node(&self) -> Option<i64> {
        let path = format!("/sys/bus/pci/devices/{}/numa_node", self.pci.as_ref()?);
        let node: i64 = std::fs::read_to_string(path).ok()?.trim().parse().ok()?;
        (node >= 0).then_some(node)
    }

    /// Bytes booked by loaded models.
    pub fn booked_bytes(&self) -> u64 {
        self.ledger.lock().unwrap_or_else(|e| e.into_inner()).bytes
    }

    pub(super) fn context(&self) -> &Arc<CudaContext> {
        &self.ctx
    }

    /// Books `bytes` for one model instance under `limits`.
    ///
    /// # Errors
    /// [`OutOfMemory`] naming the limit the model would cross.
    pub fn reserve(
        self: &Arc<Self>,
        bytes: usize,
        limits: MemoryLimits,
    ) -> Result<Reservation, OutOfMemory> {
        self.book(bytes, limits, true)
    }

    /// Books `bytes` more for a model already on the device (a pipeline's buffers): the pool
    /// and the free memory limit it, the per-model limits do not.
    ///
    /// # Errors
    /// [`OutOfMemory`] naming the limit it would cross.
    pub fn reserve_more(
        self: &Arc<Self>,
        bytes: usize,
        limits: MemoryLimits,
    ) -> Result<Reservation, OutOfMemory> {
        self.book(bytes, limits, false)
    }

    fn book(
        self: &Arc<Self>,
        bytes: usize,
        limits: MemoryLimits,
        model: bool,
    ) -> Result<Reservation, OutOfMemory> {
        let requested_mb = bytes.div_ceil(1 << 20);
        let refuse = |why: String| Err(OutOfMemory { requested_mb, why });
        let mut l = self.ledger.lock().unwrap_or_else(|e| e.into_inner());
        let pool = if limits.pool_bytes == 0 {
            self.total_bytes
        } else {
            limits.pool_bytes.min(self.total_bytes)
        };
        let bytes = bytes as u64;
        if model && limits.max_models != 0 && l.models >= limits.max_models {
            return refuse(format!(
                "GPU {} already holds max_models_per_gpu = {} models",
                self.ordinal, limits.max_models
            ));
        }
        if model && limits.fraction_per_model > 0.0 {
            let cap = (pool as f64 * limits.fraction_per_model as f64) as u64;
            if bytes > cap {
                return refuse(format!(
                    "memory_fraction_per_model = {} of a {} MB pool allows {} MB",
                    limits.fraction_per_model,
                    pool >> 20,
                    cap >> 20
                ));
            }
        }
        if l.bytes + bytes > pool {
            return refuse(format!(
                "the pool of GPU {} has {} of {} MB left",
                self.ordinal,
                (pool - l.bytes.min(pool)) >> 20,
                pool >> 20
            ));
        }
        if let Ok((free, _)) = self.ctx.mem_get_info() {
            if bytes > free as u64 {
                return refuse(format!("GPU {} has {} MB free", self.ordinal, free >> 20));
            }
        }
        l.bytes += bytes;
        l.models += u32::from(model);
        Ok(Reservation {
            device: self.clone(),
            bytes,
            model,
        })
    }
}

/// The GPUs this server uses and how.
pub struct GpuRuntime {
    devices: Vec<Arc<GpuDevice>>,
    graphs: bool,
    cublaslt: bool,
    limits: MemoryLimits,
}

/// Why no GPU is usable.
#[derive(Debug, thiserror::Error)]
pub enum GpuProbeError {
    /// libcuda is not installed.
    #[error("libcuda (the NVIDIA driver) was not found")]
    NoDriver,
    /// `cuInit` failed.
    #[error("cuInit failed: {0}")]
    Init(cudarc::driver::DriverError),
    /// NVRTC is not installed.
    #[error("libnvrtc (NVRTC, which compiles tie's GPU kernels) was not found")]
    NoNvrtc,
    /// The device count could not be read.
    #[error("counting GPUs: {0}")]
    Count(cudarc::driver::DriverError),
    /// The driver sees no GPU.
    #[error("the driver reports no GPU")]
    NoGpu,
    /// Every configured GPU is missing or failed to open.
    #[error("none of gpu_config.device_ids = {device_ids:?} is usable ({present} GPU(s) present)")]
    NoneUsable {
        /// The configured GPUs.
        device_ids: Vec<u32>,
        /// GPUs the driver sees.
        present: i32,
    },
}

impl GpuRuntime {
    /// Opens the configured devices. `Err` says why no GPU is usable (no driver, no NVRTC, no
    /// device, every configured device missing); a configured device that is missing while
    /// others work is logged and skipped.
    ///
    /// # Errors
    /// The reason, for the server to log once before serving on the CPU.
    pub fn probe(
        device_ids: &[u32],
        graphs: bool,
        limits: MemoryLimits,
    ) -> Result<Arc<Self>, GpuProbeError> {
        // SAFETY: only looks for the library (cudarc panics on calls when it is missing).
        if !unsafe { cudarc::driver::sys::is_culib_present() } {
            return Err(GpuProbeError::NoDriver);
        }
        cudarc::driver::result::init().map_err(GpuProbeError::Init)?;
        // SAFETY: as above, for NVRTC.
        if !unsafe { cudarc::nvrtc::sys::is_culib_present() } {
            return Err(GpuProbeError::NoNvrtc);
        }
        let count = CudaContext::device_count().map_err(GpuProbeError::Count)?;
        if count <= 0 {
            return Err(GpuProbeError::NoGpu);
        }
        let mut devices = Vec::new();
        for &id in device_ids {
            let ordinal = id as usize;
            if id as i32 >= count {
                tracing::warn!(
                    device = id,
                    present = count,
                    "gpu_config.device_ids names a GPU that is not present; skipped"
                );
                continue;
            }
            match open(ordinal) {
                Ok(d) => devices.push(Arc::new(d)),
                Err(e) => tracing::warn!(device = id, error = %e, "GPU unusable; skipped"),
            }
        }
        if devices.is_empty() {
            return Err(GpuProbeError::NoneUsable {
                device_ids: device_ids.to_vec(),
                present: count,
            });
        }
        // SAFETY: as above, for cuBLASLt.
        let cublaslt = unsafe { cudarc::cublaslt::sys::is_culib_present() };
        if !cublaslt {
            tracing::warn!("libcublasLt not found: GPU models run on the fused kernels only");
        }
        Ok(Arc::new(Self {
            devices,
            graphs,
            cublaslt,
            limits,
        }))
    }

    /// The usable devices.
    pub fn devices(&self) -> &[Arc<GpuDevice>] {
        &self.devices
    }

    /// Whether executions are captured as CUDA graphs.
    pub fn graphs(&self) -> bool {
        self.graphs
    }

    /// Whether cuBLASLt is available.
    pub fn cublaslt(&self) -> bool {
        self.cublaslt
    }

    /// The memory rules.
    pub fn limits(&self) -> MemoryLimits {
        self.limits
    }
}

fn open(ordinal: usize) -> Result<GpuDevice, cudarc::driver::DriverError> {
    let ctx = CudaContext::new(ordinal)?;
    // tie synchronises its own streams; cudarc's per-buffer events would also be captured into
    // graphs.
    // SAFETY: called before any buffer or stream of this context exists.
    unsafe { ctx.disable_event_tracking() };
    // No scheduling flags are set: the primary context is shared by every runtime of the
    // process, and changing its flags while other threads run work in it is not safe (a
    // concurrent test run failed with a launch failure while every probe did); tie waits for
    // its batches by spinning on `cuStreamQuery` itself.
    let (major, minor) = ctx.compute_capability()?;
    use cudarc::driver::sys::CUdevice_attribute as A;
    let pci = match (
        ctx.attribute(A::CU_DEVICE_ATTRIBUTE_PCI_DOMAIN_ID),
        ctx.attribute(A::CU_DEVICE_ATTRIBUTE_PCI_BUS_ID),
        ctx.attribute(A::CU_DEVICE_ATTRIBUTE_PCI_DEVICE_ID),
    ) {
        (Ok(domain), Ok(bus), Ok(dev)) => Some(format!("{domain:04x}:{bus:02x}:{dev:02x}.0")),
        _ => None,
    };
    Ok(GpuDevice {
        pci,
        ordinal,
        name: ctx.name()?,
        arch: format!("sm_{major}{minor}"),
        total_bytes: ctx.total_mem()? as u64,
        ledger: Mutex::new(Ledger::default()),
        ctx,
    })
}
