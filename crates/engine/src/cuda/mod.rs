//! The GPU backend: MLP-shaped ONNX graphs on NVIDIA GPUs through the CUDA driver API, NVRTC
//! and cuBLASLt (all loaded at run time by `cudarc`, so a build needs no CUDA installed).
//!
//! A model gets one `Instance` per configured device. An instance owns a stream, pinned host
//! staging buffers (the input write-combined: the poller only writes it; the output cacheable:
//! the poller reads it), device buffers, the model's weights, and one execution per batch size
//! the batcher forms ("bucket"): H2D copy, the kernels, D2H copy, captured as a CUDA graph and
//! replayed per batch. Each bucket runs whichever engine was fastest when the instance was
//! built (measured, not guessed): the fused one-kernel MLP (`mlp_r{R}`, see `kernels`) or
//! one cuBLASLt matmul per layer with the bias (and ReLU) in its epilogue. Nothing is allocated
//! per batch.
//!
//! Batches go to the healthy instance with the least outstanding work; an instance whose device
//! fails is taken out of rotation (logged with its device) and the batch is retried on another.

mod blaslt;
mod kernels;
mod pipeline;
mod runtime;

use std::ffi::c_void;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use cudarc::driver::sys::{CUdeviceptr, CUfunction, CUstreamCaptureMode};
use cudarc::driver::{result as cu, CudaFunction, CudaGraph, CudaModule, CudaStream, DriverError};

use crate::{
    Backend, BackendError, BackendHealth, BackendInfo, MlpPlan, ModelIo, Pipeline, Precision,
};
pub use blaslt::BlasltPlanError;
use blaslt::LayerMatmuls;
pub use runtime::{GpuDevice, GpuProbeError, GpuRuntime, MemoryLimits, OutOfMemory, Reservation};

/// Rows per block the fused kernel is built for; each bucket uses the fastest that fits.
const FUSED_ROWS: [usize; 5] = [1, 2, 4, 8, 16];
/// Shared memory a block may use without opting in to more.
const SHARED_LIMIT: usize = 48 * 1024;
/// cuBLASLt workspace per instance.
const WORKSPACE_BYTES: usize = 4 << 20;
/// Replays timed per candidate engine when choosing a bucket's engine.
const CHOICE_RUNS: usize = 30;

/// Why a model could not be put on the GPU.
#[derive(Debug, thiserror::Error)]
pub enum CudaLoadError {
    /// The model does not fit the memory limits or the device.
    #[error(transparent)]
    OutOfMemory(#[from] OutOfMemory),
    /// A CUDA, NVRTC or cuBLASLt call failed.
    #[error("{0}")]
    Cuda(String),
}

fn cuda_err(what: &str) -> impl Fn(DriverError) -> CudaLoadError + '_ {
    move |e| CudaLoadError::Cuda(format!("{what}: {e}"))
}

/// How a bucket is executed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Engine {
    /// The one-kernel MLP with this many rows per block.
    Fused(usize),
    /// The one-kernel MLP reading its input from and writing its output to the pinned host
    /// buffers directly (mapped memory): no copy-engine steps, one graph node.
    FusedMapped(usize),
    /// One cuBLASLt matmul per layer.
    Blaslt,
}

impl std::fmt::Display for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Fused(r) => write!(f, "fused/{r}"),
            Self::FusedMapped(r) => write!(f, "fused/{r}/mapped"),
            Self::Blaslt => f.write_str("cublaslt"),
        }
    }
}

/// Changes to what the process holds on its GPUs (allocations, frees, synchronous copies,
/// modules, cuBLASLt handles, graph captures and their teardown), one at a time across the
/// process. A free or a synchronous copy may wait for the whole device, and a graph captured
/// in another thread meanwhile fails (seen on an H100 as "unspecified launch failure" or an
/// invalidated capture when models loaded while others were dropped). None of these is on the
/// path of a batch.
static DEVICE_CHANGES: Mutex<()> = Mutex::new(());

thread_local! {
    /// Whether this thread holds [`DEVICE_CHANGES`] (a change made inside another, as a drop
    /// that frees buffers, does not take it again).
    static HOLDS_DEVICE_CHANGES: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Runs `f` as one change to the process's GPU state (see [`DEVICE_CHANGES`]).
pub(crate) fn device_change<R>(f: impl FnOnce() -> R) -> R {
    if HOLDS_DEVICE_CHANGES.get() {
        return f();
    }
    struct Held<'a>(#[allow(dead_code)] std::sync::MutexGuard<'a, ()>);
    impl Drop for Held<'_> {
        fn drop(&mut self) {
            HOLDS_DEVICE_CHANGES.set(false);
        }
    }
    let _held = Held(DEVICE_CHANGES.lock().unwrap_or_else(|e| e.into_inner()));
    HOLDS_DEVICE_CHANGES.set(true);
    f()
}

/// Device memory owned by an instance.
struct DeviceBuffer {
    ptr: CUdeviceptr,
}

impl DeviceBuffer {
    fn new(bytes: usize) -> Result<Self, DriverError> {
        // SAFETY: a plain allocation in the current context (bound by the caller).
        let ptr = device_change(|| unsafe { cu::malloc_sync(bytes.max(1)) })?;
        Ok(Self { ptr })
    }
}

impl Drop for DeviceBuffer {
    fn drop(&mut self) {
        // SAFETY: allocated by `malloc_sync`, freed once; owners drop buffers with their
        // context bound and nothing in flight (`InstanceState::drop` synchronises first; a
        // failed build never launched anything).
        let _ = device_change(|| unsafe { cu::free_sync(self.ptr) });
    }
}

impl Drop for HostBuffer {
    fn drop(&mut self) {
        // SAFETY: allocated by `malloc_host`, freed once, no copy or kernel in flight (as above).
        let _ = device_change(|| unsafe { cu::free_host(self.ptr as *mut c_void) });
    }
}

/// Page-locked host memory owned by an instance, mapped into the device's address space.
struct HostBuffer {
    ptr: *mut f32,
    len: usize,
    /// The same memory as the device addresses it.
    device: CUdeviceptr,
}

impl HostBuffer {
    fn new(len: usize, flags: u32) -> Result<Self, DriverError> {
        device_change(|| Self::allocate(len, flags))
    }

    fn allocate(len: usize, flags: u32) -> Result<Self, DriverError> {
        let flags = flags | cudarc::driver::sys::CU_MEMHOSTALLOC_DEVICEMAP;
        // SAFETY: a plain allocation in the current context (bound by the caller).
        let ptr = unsafe { cu::malloc_host(len.max(1) * 4, flags) }? as *mut f32;
        // SAFETY: `ptr` holds `len` f32s; zeroed so that padded rows never hold garbage.
        unsafe { std::ptr::write_bytes(ptr, 0, len.max(1)) };
        let mut device: CUdeviceptr = 0;
        // SAFETY: `ptr` was allocated with DEVICEMAP in the current context.
        let r = unsafe {
            cudarc::driver::sys::cuMemHostGetDevicePointer_v2(&mut device, ptr as *mut c_void, 0)
        };
        if r != cudarc::driver::sys::CUresult::CUDA_SUCCESS {
            // SAFETY: allocated above, not shared.
            let _ = unsafe { cu::free_host(ptr as *mut c_void) };
            return Err(DriverError(r));
        }
        Ok(Self { ptr, len, device })
    }

    fn as_mut_slice(&mut self, len: usize) -> &mut [f32] {
        assert!(len <= self.len);
        // SAFETY: `ptr` holds `self.len` f32s, no copy is in flight (the synchronous path waits
        // for every batch; a pipeline hands out a slot's buffers only while its batch is not
        // running) and `&mut self` makes this the only reference.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, len) }
    }

    fn as_slice(&self, len: usize) -> &[f32] {
        assert!(len <= self.len);
        // SAFETY: as above; nothing writes it while no batch of its own runs.
        unsafe { std::slice::from_raw_parts(self.ptr, len) }
    }
}

/// The buffers one execution reads and writes: the pinned staging buffers (as the host and the
/// device address them) and the device's input, output, activations and cuBLASLt workspace.
#[derive(Clone, Copy)]
struct Io {
    host_in: *mut f32,
    host_in_device: CUdeviceptr,
    host_out: *mut f32,
    host_out_device: CUdeviceptr,
    input: CUdeviceptr,
    output: CUdeviceptr,
    act: [CUdeviceptr; 2],
    workspace: CUdeviceptr,
    /// Where the execution writes 1 once its outputs are in `host_out` (a pipeline slot's
    /// completion flag, in mapped host memory; 0: none).
    done_flag: CUdeviceptr,
}

impl Io {
    /// The staging buffers `host_in` and `host_out` with the device's `[input, output]`,
    /// activations and workspace (0: none).
    fn new(
        host_in: &HostBuffer,
        host_out: &HostBuffer,
        [input, output]: [CUdeviceptr; 2],
        act: [CUdeviceptr; 2],
        workspace: CUdeviceptr,
    ) -> Self {
        Self {
            host_in: host_in.ptr,
            host_in_device: host_in.device,
            host_out: host_out.ptr,
            host_out_device: host_out.device,
            input,
            output,
            act,
            workspace,
            done_flag: 0,
        }
    }

    /// The same buffers, the execution writing 1 to `flag` (device address) when done.
    fn with_done_flag(self, flag: CUdeviceptr) -> Self {
        Self {
            done_flag: flag,
            ..self
        }
    }
}

/// `cuStreamQuery` or `cuEventQuery`'s answer (see [`done`]).
type Query = cudarc::driver::sys::CUresult;

/// Whether the work a stream holds is done (without waiting).
fn query_stream(stream: &CudaStream) -> Query {
    // SAFETY: a live stream (borrowed).
    unsafe { cudarc::driver::sys::cuStreamQuery(stream.cu_stream()) }
}

/// A query's answer: done, not yet, or the error.
fn done(q: Query) -> Result<bool, DriverError> {
    match q {
        Query::CUDA_SUCCESS => Ok(true),
        Query::CUDA_ERROR_NOT_READY => Ok(false),
        e => Err(DriverError(e)),
    }
}

/// The fused kernels that fit, by rows per block.
struct Fused {
    rows: usize,
    function: CUfunction,
    shared_bytes: u32,
}

/// One batch size's execution.
struct Bucket {
    size: usize,
    engine: Engine,
    /// Median run time measured when the engine was chosen.
    measured_ns: u64,
    graph: Option<CudaGraph>,
}

/// What one device holds of a model. Used under its instance's lock only.
struct InstanceState {
    iw: usize,
    ow: usize,
    stream: Arc<CudaStream>,
    host_in: HostBuffer,
    host_out: HostBuffer,
    input: DeviceBuffer,
    output: DeviceBuffer,
    weights: DeviceBuffer,
    bias: DeviceBuffer,
    /// Biases in the storage type, read by the cuBLASLt epilogues through `matmuls`.
    _bias_stored: DeviceBuffer,
    act: [DeviceBuffer; 2],
    /// Bytes of each activation buffer.
    act_bytes: usize,
    workspace: Option<DeviceBuffer>,
    fused: Vec<Fused>,
    conv_in: CUfunction,
    acts: Vec<CUfunction>,
    conv_out: CUfunction,
    matmuls: Option<LayerMatmuls>,
    buckets: Vec<Bucket>,
    // Kept alive for the functions above.
    _module: Arc<CudaModule>,
    _functions: Vec<CudaFunction>,
}

// SAFETY: the raw pointers are CUDA allocations and handles valid in any thread once the
// context is bound (every entry point binds it); the state is only used under its instance's
// mutex.
unsafe impl Send for InstanceState {}

impl Drop for InstanceState {
    fn drop(&mut self) {
        device_change(|| {
            let _ = self.stream.context().bind_to_thread();
            let _ = self.stream.synchronize();
            // Graphs first: they reference the buffers, which the fields' drops free after
            // this.
            self.buckets.clear();
            self.matmuls = None;
        });
    }
}

/// A model on one device.
struct Instance {
    device: Arc<GpuDevice>,
    outstanding: AtomicUsize,
    /// Pipelines built on it (the next goes to the instance with the fewest).
    pipelines: AtomicUsize,
    healthy: AtomicBool,
    /// Fail the next batch as a broken device would (tests of the failover).
    inject_failure: AtomicBool,
    /// Pipelines on it do not see their batches' completion flags (tests of the driver
    /// queries that find a failed device's batches).
    hide_flags: AtomicBool,
    state: Mutex<InstanceState>,
    /// Device memory booked for this instance; released when the instance goes.
    _reservation: Reservation,
}

/// Runs an [`MlpPlan`] on one or more GPUs.
pub struct CudaBackend {
    precision: Precision,
    shared: Arc<Shared>,
}

/// What the backend and its pipelines share.
struct Shared {
    info: BackendInfo,
    plan_shape: (usize, usize),
    largest: usize,
    instances: Vec<Arc<Instance>>,
    /// Memory rules, for the pipelines' buffers.
    limits: MemoryLimits,
    /// Executions are captured as CUDA graphs (pipelines need them).
    graphs: bool,
    /// Pipelines built whose batches' completion is read from their flags (see `pipeline`).
    pipelines_by_flag: AtomicUsize,
}

impl CudaBackend {
    /// Builds the model on every device of `runtime` that has room for it: weights uploaded,
    /// kernels compiled, each bucket's engine chosen by timing and its graph captured.
    ///
    /// `buckets` are the batch sizes the batcher forms (ascending); a batch of another size
    /// runs in the smallest bucket that holds it, its extra rows ignored.
    ///
    /// # Errors
    /// [`CudaLoadError::OutOfMemory`] when no device has room for the model;
    /// [`CudaLoadError::Cuda`] when CUDA, NVRTC or cuBLASLt fail.
    pub fn load(
        runtime: &GpuRuntime,
        io: ModelIo,
        plan: &MlpPlan,
        precision: Precision,
        buckets: &[usize],
    ) -> Result<Self, CudaLoadError> {
        Self::load_with_engines(runtime, io, plan, precision, buckets, &|_| true)
    }

    /// [`load`](Self::load) choosing each bucket's engine only among those `allow` accepts
    /// (tests hold every engine to the same results this way).
    ///
    /// # Errors
    /// As [`load`](Self::load); also when `allow` leaves a bucket no engine.
    pub fn load_with_engines(
        runtime: &GpuRuntime,
        io: ModelIo,
        plan: &MlpPlan,
        precision: Precision,
        buckets: &[usize],
        allow: &dyn Fn(Engine) -> bool,
    ) -> Result<Self, CudaLoadError> {
        assert!(!buckets.is_empty() && buckets.windows(2).all(|w| w[0] < w[1]));
        let largest = *buckets.last().expect("not empty");
        let source = kernels::source(plan, precision, &fused_rows(plan));
        let bytes = instance_bytes(plan, precision, largest, runtime.cublaslt());
        let mut instances = Vec::new();
        let mut refused = None;
        let mut failed = None;
        for device in runtime.devices() {
            let reservation = match device.reserve(bytes, runtime.limits()) {
                Ok(r) => r,
                Err(e) => {
                    tracing::warn!(device = device.ordinal(), error = %e, "model does not fit this GPU");
                    refused = Some(e);
                    continue;
                }
            };
            let state = match build_instance(&InstanceSpec {
                device,
                source: &source,
                plan,
                precision,
                buckets,
                graphs: runtime.graphs(),
                cublaslt: runtime.cublaslt(),
                allow,
            }) {
                Ok(state) => state,
                Err(e) => {
                    tracing::warn!(device = device.ordinal(), error = %e, "model not built on this GPU");
                    failed = Some(e);
                    continue;
                }
            };
            instances.push(Arc::new(Instance {
                device: device.clone(),
                outstanding: AtomicUsize::new(0),
                pipelines: AtomicUsize::new(0),
                healthy: AtomicBool::new(true),
                inject_failure: AtomicBool::new(false),
                hide_flags: AtomicBool::new(false),
                state: Mutex::new(state),
                _reservation: reservation,
            }));
        }
        if instances.is_empty() {
            return Err(failed.unwrap_or_else(|| {
                refused.map_or_else(
                    || CudaLoadError::Cuda("no GPU device".into()),
                    CudaLoadError::OutOfMemory,
                )
            }));
        }
        let devices: Vec<String> = instances
            .iter()
            .map(|i| format!("cuda:{}", i.device.ordinal()))
            .collect();
        let info = BackendInfo {
            io,
            architecture: "mlp".into(),
            device: devices.join(","),
            engine: "cuda",
            device_memory_bytes: Some(bytes as u64 * instances.len() as u64),
            pci_bus_ids: instances
                .iter()
                .filter_map(|i| i.device.pci_address().map(str::to_string))
                .collect(),
        };
        Ok(Self {
            precision,
            shared: Arc::new(Shared {
                info,
                plan_shape: (plan.input_width, plan.output_width()),
                largest,
                instances,
                limits: runtime.limits(),
                graphs: runtime.graphs(),
                pipelines_by_flag: AtomicUsize::new(0),
            }),
        })
    }

    /// How many of the pipelines built so far read their batches' completion from a flag the
    /// graph writes (the others query the driver: where it cannot capture that write).
    pub fn pipelines_by_flag(&self) -> usize {
        self.shared.pipelines_by_flag.load(Ordering::Relaxed)
    }

    /// The precision the model runs in.
    pub fn precision(&self) -> Precision {
        self.precision
    }

    /// Each bucket's size, engine and the median run time measured when it was chosen (H2D,
    /// kernels, D2H and the wait), for the first instance.
    pub fn engines(&self) -> Vec<(usize, Engine, u64)> {
        let state = self.shared.instances[0]
            .state
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        state
            .buckets
            .iter()
            .map(|b| (b.size, b.engine, b.measured_ns))
            .collect()
    }

    /// The devices serving the model and whether each is in rotation.
    pub fn devices(&self) -> Vec<(usize, bool)> {
        self.shared
            .instances
            .iter()
            .map(|i| (i.device.ordinal(), i.healthy.load(Ordering::Relaxed)))
            .collect()
    }

    /// Takes a device's instance out of rotation, as a failure does (operators draining a
    /// GPU; tests of the failover). Returns whether the model had an instance there.
    pub fn take_out_of_rotation(&self, ordinal: usize) -> bool {
        self.set_on_device(ordinal, |i| &i.healthy, false)
    }

    /// Makes the next batch on a device's instance fail as a broken device would, after its
    /// rows were gathered (tests of the failover and of `ExecutionFailed` answers). Returns
    /// whether the model had an instance there.
    #[doc(hidden)]
    pub fn inject_failure(&self, ordinal: usize) -> bool {
        self.set_on_device(ordinal, |i| &i.inject_failure, true)
    }

    /// Makes the pipelines on a device's instance blind to their batches' completion flags,
    /// as if the device never wrote them (a failed device's do not): a batch is then found
    /// done only by the stream's query once the whole stream is idle, at least `QUERY_AFTER`
    /// after its first check (tests of that query). Returns whether the model had an instance
    /// there.
    #[doc(hidden)]
    pub fn hide_completion_flags(&self, ordinal: usize, hidden: bool) -> bool {
        self.set_on_device(ordinal, |i| &i.hide_flags, hidden)
    }

    /// Stores `value` into the `flag` of every instance on device `ordinal`; whether there was
    /// one.
    fn set_on_device(
        &self,
        ordinal: usize,
        flag: fn(&Instance) -> &AtomicBool,
        value: bool,
    ) -> bool {
        let mut found = false;
        for i in self
            .shared
            .instances
            .iter()
            .filter(|i| i.device.ordinal() == ordinal)
        {
            flag(i).store(value, Ordering::Relaxed);
            found = true;
        }
        found
    }
}

impl Shared {
    /// The healthy instance with the least outstanding work.
    fn pick(&self) -> Option<&Arc<Instance>> {
        self.instances
            .iter()
            .filter(|i| i.healthy.load(Ordering::Relaxed))
            .min_by_key(|i| i.outstanding.load(Ordering::Relaxed))
    }

    /// Takes `instance` out of rotation after it failed a batch.
    fn fail(instance: &Instance, e: &DriverError) {
        // A failed launch or copy leaves the context unusable: out of rotation.
        instance.healthy.store(false, Ordering::Relaxed);
        tracing::error!(
            device = instance.device.ordinal(),
            error = %e,
            "GPU failed a batch; device taken out of rotation for this model"
        );
    }

    fn run_batch(
        &self,
        input: &[f32],
        rows: usize,
        output: &mut [f32],
    ) -> Result<(), BackendError> {
        let (iw, ow) = self.plan_shape;
        crate::check_shape(input, rows, output, iw, ow)?;
        if rows > self.largest {
            return Err(BackendError::Shape(format!(
                "{rows} rows: the model's largest batch is {}",
                self.largest
            )));
        }
        if rows == 0 {
            return Ok(());
        }
        self.run_gathered(
            &mut |staging| {
                staging[..input.len()].copy_from_slice(input);
                rows
            },
            output,
        )
        .map(|_| ())
    }

    fn run_gathered(
        &self,
        gather: &mut dyn FnMut(&mut [f32]) -> usize,
        output: &mut [f32],
    ) -> Result<usize, BackendError> {
        let (iw, ow) = self.plan_shape;
        // Rows gathered into an instance that then failed, for the retry on another (copied
        // out under that instance's lock: another poller may gather into it next).
        let mut carried: Option<(usize, Vec<f32>)> = None;
        while let Some(instance) = self.pick() {
            instance.outstanding.fetch_add(1, Ordering::Relaxed);
            let result = {
                let mut state = instance.state.lock().unwrap_or_else(|e| e.into_inner());
                let staging = state.host_in.as_mut_slice(self.largest * iw);
                let rows = match &carried {
                    Some((rows, from)) => {
                        staging[..rows * iw].copy_from_slice(from);
                        *rows
                    }
                    None => gather(staging),
                };
                if rows > self.largest || output.len() < rows * ow {
                    instance.outstanding.fetch_sub(1, Ordering::Relaxed);
                    return Err(BackendError::Shape(format!(
                        "{rows} rows gathered: at most {} fit, and the output holds {}",
                        self.largest,
                        output.len() / ow.max(1)
                    )));
                }
                let result = if rows == 0 {
                    Ok(())
                } else if instance.inject_failure.swap(false, Ordering::Relaxed) {
                    Err(DriverError(
                        cudarc::driver::sys::CUresult::CUDA_ERROR_LAUNCH_FAILED,
                    ))
                } else {
                    state.run(rows, output)
                };
                if result.is_err() {
                    // Rare (a device failed): the allocation does not matter here.
                    carried = Some((rows, state.host_in.as_slice(rows * iw).to_vec()));
                }
                result.map(|()| rows)
            };
            instance.outstanding.fetch_sub(1, Ordering::Relaxed);
            match result {
                Ok(rows) => return Ok(rows),
                Err(e) => Self::fail(instance, &e),
            }
        }
        Err(BackendError::Execution(
            "no GPU instance of the model is in rotation".into(),
        ))
    }
}

impl Backend for CudaBackend {
    fn info(&self) -> &BackendInfo {
        &self.shared.info
    }

    fn run_batch(
        &self,
        input: &[f32],
        rows: usize,
        output: &mut [f32],
    ) -> Result<(), BackendError> {
        self.shared.run_batch(input, rows, output)
    }

    fn run_gathered(
        &self,
        gather: &mut dyn FnMut(&mut [f32]) -> usize,
        _scratch: &mut [f32],
        output: &mut [f32],
    ) -> Result<usize, BackendError> {
        self.shared.run_gathered(gather, output)
    }

    fn pipeline(&self, depth: usize) -> Option<Box<dyn Pipeline>> {
        pipeline::CudaPipeline::build(&self.shared, depth).map(|p| Box::new(p) as Box<dyn Pipeline>)
    }

    fn health(&self) -> BackendHealth {
        let out: Vec<String> = self
            .shared
            .instances
            .iter()
            .filter(|i| !i.healthy.load(Ordering::Relaxed))
            .map(|i| format!("cuda:{}", i.device.ordinal()))
            .collect();
        if out.len() == self.shared.instances.len() {
            BackendHealth::Unhealthy(format!("every GPU instance failed ({})", out.join(", ")))
        } else {
            BackendHealth::Healthy
        }
    }
}

impl InstanceState {
    /// Runs the first `rows` rows of the pinned input (already written) into `output`.
    fn run(&mut self, rows: usize, output: &mut [f32]) -> Result<(), DriverError> {
        let ow = self.ow;
        let b = self
            .buckets
            .iter()
            .position(|b| b.size >= rows)
            .expect("rows <= largest bucket");
        // The input was written through write-combining buffers: drain them before the GPU
        // reads it (a kernel reading mapped memory gets no fence from a copy call).
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
        self.stream.context().bind_to_thread()?;
        match &self.buckets[b].graph {
            Some(graph) => graph.launch()?,
            None => {
                let (size, engine) = (self.buckets[b].size, self.buckets[b].engine);
                self.enqueue(&self.io(), self.stream.cu_stream(), size, engine)?;
            }
        }
        self.wait()?;
        output[..rows * ow].copy_from_slice(self.host_out.as_slice(rows * ow));
        Ok(())
    }

    /// Spins until the stream is idle: the poller owns its core, and a spin answers sooner than
    /// the driver's blocking wait.
    fn wait(&self) -> Result<(), DriverError> {
        while !done(query_stream(&self.stream))? {
            std::hint::spin_loop();
        }
        Ok(())
    }

    /// The instance's own buffers (the synchronous path's).
    fn io(&self) -> Io {
        Io::new(
            &self.host_in,
            &self.host_out,
            [self.input.ptr, self.output.ptr],
            [self.act[0].ptr, self.act[1].ptr],
            self.workspace.as_ref().map_or(0, |w| w.ptr),
        )
    }

    /// Puts one batch of `size` rows on `stream`, reading and writing `io`: H2D, the engine's
    /// kernels, D2H, then the write of `io.done_flag` where it has one.
    fn enqueue(
        &self,
        io: &Io,
        stream: cudarc::driver::sys::CUstream,
        size: usize,
        engine: Engine,
    ) -> Result<(), DriverError> {
        let (iw, ow) = (self.iw, self.ow);
        let mapped = matches!(engine, Engine::FusedMapped(_));
        if !mapped {
            // SAFETY: the host buffers hold `largest` rows and stay allocated as long as any
            // graph that captured these copies (graphs are dropped first); device buffers
            // likewise.
            unsafe {
                let input = std::slice::from_raw_parts(io.host_in, size * iw);
                cu::memcpy_htod_async(io.input, input, stream)?;
            }
        }
        match engine {
            Engine::Fused(r) | Engine::FusedMapped(r) => {
                let f = self
                    .fused
                    .iter()
                    .find(|f| f.rows == r)
                    .expect("engine chosen from the fused kernels");
                let (x, y) = if mapped {
                    (io.host_in_device, io.host_out_device)
                } else {
                    (io.input, io.output)
                };
                let (w, bias) = (self.weights.ptr, self.bias.ptr);
                let rows = size as i32;
                let mut params: [*mut c_void; 5] = [
                    &x as *const _ as *mut c_void,
                    &y as *const _ as *mut c_void,
                    &w as *const _ as *mut c_void,
                    &bias as *const _ as *mut c_void,
                    &rows as *const _ as *mut c_void,
                ];
                let grid = size.div_ceil(r) as u32;
                // SAFETY: the parameters match `mlp_r{r}`'s signature and point to live values
                // (copied by the launch); the buffers hold `largest >= size` rows.
                unsafe {
                    cu::launch_kernel(
                        f.function,
                        (grid, 1, 1),
                        (kernels::THREADS, 1, 1),
                        f.shared_bytes,
                        stream,
                        &mut params,
                    )?;
                }
            }
            Engine::Blaslt => {
                let m = self
                    .matmuls
                    .as_ref()
                    .expect("engine chosen only with cuBLASLt");
                m.enqueue(
                    size,
                    &blaslt::Buffers {
                        input: io.input,
                        output: io.output,
                        act: io.act,
                        workspace: io.workspace,
                        workspace_bytes: WORKSPACE_BYTES,
                        conv_in: self.conv_in,
                        acts: &self.acts,
                        conv_out: self.conv_out,
                    },
                    stream,
                )?;
            }
        }
        if !mapped {
            // SAFETY: as for the input copy.
            unsafe {
                let out = std::slice::from_raw_parts_mut(io.host_out, size * ow);
                cu::memcpy_dtoh_async(out, io.output, stream)?;
            }
        }
        if io.done_flag != 0 {
            // The default flags fence the stream's earlier work first (as `__threadfence_system`
            // does for a thread): the outputs are visible to the host before the flag is.
            // SAFETY: a live stream; `done_flag` is the device address of mapped host memory
            // that outlives every graph capturing this write (the pipeline drops its graphs
            // first).
            unsafe {
                use cudarc::driver::sys::{cuStreamWriteValue32_v2, CUstreamWriteValue_flags};
                let flags = CUstreamWriteValue_flags::CU_STREAM_WRITE_VALUE_DEFAULT as u32;
                cuStreamWriteValue32_v2(stream, io.done_flag, 1, flags).result()?;
            }
        }
        Ok(())
    }

    /// Captures one batch of `size` rows on `stream`, reading and writing `io`, as a graph.
    fn capture(
        &self,
        io: &Io,
        stream: &Arc<CudaStream>,
        size: usize,
        engine: Engine,
    ) -> Result<CudaGraph, DriverError> {
        device_change(|| {
            stream.begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)?;
            let enqueued = self.enqueue(io, stream.cu_stream(), size, engine);
            // End the capture whatever happened, so the stream is usable again.
            let graph = stream.end_capture(cudarc::driver::sys::CUgraphInstantiate_flags(0));
            enqueued?;
            let graph = graph?.ok_or(DriverError(
                cudarc::driver::sys::CUresult::CUDA_ERROR_STREAM_CAPTURE_INVALIDATED,
            ))?;
            graph.upload()?;
            Ok(graph)
        })
    }

    /// Median time of `CHOICE_RUNS` runs of an engine at `size` rows (replays of its graph,
    /// or eager launches).
    fn time(
        &self,
        size: usize,
        engine: Engine,
        graph: Option<&CudaGraph>,
    ) -> Result<u64, DriverError> {
        let mut samples = Vec::with_capacity(CHOICE_RUNS);
        for i in 0..CHOICE_RUNS + 5 {
            let t = Instant::now();
            match graph {
                Some(g) => g.launch()?,
                None => self.enqueue(&self.io(), self.stream.cu_stream(), size, engine)?,
            }
            self.wait()?;
            if i >= 5 {
                samples.push(t.elapsed().as_nanos() as u64);
            }
        }
        samples.sort_unstable();
        Ok(samples[samples.len() / 2])
    }
}

/// Row counts per block the fused kernel can use for `plan` (shared memory permitting).
fn fused_rows(plan: &MlpPlan) -> Vec<usize> {
    FUSED_ROWS
        .into_iter()
        .filter(|&r| kernels::fused_shared_bytes(plan, r) <= SHARED_LIMIT)
        .collect()
}

/// Device bytes one instance of `plan` takes with buckets up to `largest` rows.
pub fn instance_bytes(
    plan: &MlpPlan,
    precision: Precision,
    largest: usize,
    cublaslt: bool,
) -> usize {
    let (_, weights) = kernels::weight_offsets(plan, precision);
    let (_, biases) = kernels::bias_offsets(plan);
    let widest = plan.widest();
    let io = largest * (plan.input_width + plan.output_width()) * 4;
    let act = 2 * largest * widest * precision.storage_bytes();
    let workspace = if cublaslt { WORKSPACE_BYTES } else { 0 };
    weights * precision.storage_bytes()
        + biases * (4 + precision.storage_bytes())
        + io
        + act
        + workspace
}

/// Converts f32 values to the storage type's bits (f16/bf16 round to nearest even).
fn stored_bytes(values: &[f32], precision: Precision) -> Vec<u8> {
    match precision {
        Precision::Fp32 | Precision::Tf32 => bytemuck::cast_slice(values).to_vec(),
        Precision::Fp16 => values
            .iter()
            .flat_map(|v| half::f16::from_f32(*v).to_bits().to_ne_bytes())
            .collect(),
        Precision::Bf16 => values
            .iter()
            .flat_map(|v| half::bf16::from_f32(*v).to_bits().to_ne_bytes())
            .collect(),
    }
}

fn upload(ptr: CUdeviceptr, bytes: &[u8]) -> Result<(), DriverError> {
    // SAFETY: `ptr` is an allocation of at least `bytes.len()` bytes (sized by the caller).
    device_change(|| unsafe { cu::memcpy_htod_sync(ptr, bytes) })
}

/// What one GPU instance of a model is built from.
struct InstanceSpec<'a> {
    device: &'a GpuDevice,
    /// The model's kernels' CUDA source.
    source: &'a str,
    plan: &'a MlpPlan,
    precision: Precision,
    /// Batch sizes the instance runs, ascending.
    buckets: &'a [usize],
    /// Capture each bucket's execution as a CUDA graph.
    graphs: bool,
    /// cuBLASLt is usable.
    cublaslt: bool,
    /// Which engines may be chosen.
    allow: &'a dyn Fn(Engine) -> bool,
}

/// The compiled kernels of an instance.
struct Kernels {
    module: Arc<CudaModule>,
    functions: Vec<CudaFunction>,
    fused: Vec<Fused>,
    conv_in: CUfunction,
    conv_out: CUfunction,
    acts: Vec<CUfunction>,
}

/// Builds an instance on `spec.device`: its kernels compiled, its weights uploaded, its
/// buffers allocated and, per bucket, the fastest allowed engine chosen by timing.
fn build_instance(spec: &InstanceSpec<'_>) -> Result<InstanceState, CudaLoadError> {
    spec.device
        .context()
        .bind_to_thread()
        .map_err(cuda_err("binding the context"))?;
    let kernels = compile_kernels(spec)?;
    let mut state = allocate_instance(spec, kernels)?;
    state.buckets = choose_engines(&mut state, spec)?;
    Ok(state)
}

/// NVRTC-compiles the model's kernels for the device and finds each function.
fn compile_kernels(spec: &InstanceSpec<'_>) -> Result<Kernels, CudaLoadError> {
    let ctx = spec.device.context();
    let ptx = cudarc::nvrtc::compile_ptx_with_opts(
        spec.source,
        cudarc::nvrtc::CompileOptions {
            options: vec![format!("--gpu-architecture={}", spec.device.arch())],
            ..Default::default()
        },
    )
    .map_err(|e| {
        CudaLoadError::Cuda(format!("NVRTC could not compile the model's kernels: {e}"))
    })?;
    let module = device_change(|| ctx.load_module(ptx)).map_err(cuda_err("loading the kernels"))?;
    let mut functions = Vec::new();
    let mut function = |name: &str| -> Result<CUfunction, CudaLoadError> {
        let f = module
            .load_function(name)
            .map_err(cuda_err("finding a kernel"))?;
        let raw = f.cu_function();
        functions.push(f);
        Ok(raw)
    };
    let mut fused = Vec::new();
    for r in fused_rows(spec.plan) {
        fused.push(Fused {
            rows: r,
            function: function(&format!("mlp_r{r}"))?,
            shared_bytes: kernels::fused_shared_bytes(spec.plan, r) as u32,
        });
    }
    let conv_in = function("conv_in")?;
    let conv_out = function("conv_out")?;
    let acts = (0..spec.plan.layers.len())
        .map(|l| function(&format!("act_{l}")))
        .collect::<Result<Vec<_>, _>>()?;

    Ok(Kernels {
        module,
        functions,
        fused,
        conv_in,
        conv_out,
        acts,
    })
}
/// A model's weights and biases on the device, packed per layer.
struct Parameters {
    /// Every layer's weights, in the instance's precision.
    weights: DeviceBuffer,
    /// Every layer's biases in f32 (the fused kernels' epilogues).
    bias: DeviceBuffer,
    /// The biases in the instance's precision (cuBLASLt's epilogues).
    bias_stored: DeviceBuffer,
    /// Where each layer's weights start, in elements.
    weight_offsets: Vec<usize>,
    /// Where each layer's biases start, in elements.
    bias_offsets: Vec<usize>,
}

/// Packs and uploads the plan's weights and biases.
fn upload_parameters(plan: &MlpPlan, precision: Precision) -> Result<Parameters, CudaLoadError> {
    let elem = precision.storage_bytes();
    let alloc = |bytes| DeviceBuffer::new(bytes).map_err(oom_or(bytes));
    let (w_off, w_len) = kernels::weight_offsets(plan, precision);
    let (b_off, b_len) = kernels::bias_offsets(plan);
    let weights = alloc(w_len * elem)?;
    let bias = alloc(b_len * 4)?;
    let bias_stored = alloc(b_len * elem)?;
    let mut packed_w = vec![0f32; w_len];
    let mut packed_b = vec![0f32; b_len];
    for (l, layer) in plan.layers.iter().enumerate() {
        packed_w[w_off[l]..w_off[l] + layer.weights.len()].copy_from_slice(&layer.weights);
        packed_b[b_off[l]..b_off[l] + layer.bias.len()].copy_from_slice(&layer.bias);
    }
    upload(weights.ptr, &stored_bytes(&packed_w, precision))
        .map_err(cuda_err("uploading weights"))?;
    upload(bias.ptr, bytemuck::cast_slice(&packed_b)).map_err(cuda_err("uploading biases"))?;
    upload(bias_stored.ptr, &stored_bytes(&packed_b, precision))
        .map_err(cuda_err("uploading biases"))?;
    Ok(Parameters {
        weights,
        bias,
        bias_stored,
        weight_offsets: w_off,
        bias_offsets: b_off,
    })
}

/// Uploads the weights and allocates the instance's device, pinned and cuBLASLt buffers.
fn allocate_instance(
    spec: &InstanceSpec<'_>,
    kernels: Kernels,
) -> Result<InstanceState, CudaLoadError> {
    let InstanceSpec {
        device,
        plan,
        precision,
        buckets,
        cublaslt,
        ..
    } = *spec;
    let Kernels {
        module,
        functions,
        fused,
        conv_in,
        conv_out,
        acts,
    } = kernels;
    let largest = *buckets.last().expect("not empty");
    let (iw, ow) = (plan.input_width, plan.output_width());
    let widest = plan.widest();
    let elem = precision.storage_bytes();
    let alloc = |bytes| DeviceBuffer::new(bytes).map_err(oom_or(bytes));
    let Parameters {
        weights,
        bias,
        bias_stored,
        weight_offsets: w_off,
        bias_offsets: b_off,
    } = upload_parameters(plan, precision)?;
    let input = alloc(largest * iw * 4)?;
    let output = alloc(largest * ow * 4)?;
    let act = [
        alloc(largest * widest * elem)?,
        alloc(largest * widest * elem)?,
    ];
    let workspace = if cublaslt {
        Some(alloc(WORKSPACE_BYTES)?)
    } else {
        None
    };
    let host_in = HostBuffer::new(
        largest * iw,
        cudarc::driver::sys::CU_MEMHOSTALLOC_WRITECOMBINED,
    )
    .map_err(cuda_err("allocating pinned input"))?;
    let host_out =
        HostBuffer::new(largest * ow, 0).map_err(cuda_err("allocating pinned output"))?;
    let stream = device
        .context()
        .new_stream()
        .map_err(cuda_err("creating a stream"))?;
    let matmuls = if cublaslt {
        match LayerMatmuls::new(
            plan,
            precision,
            buckets,
            weights.ptr,
            &w_off,
            bias_stored.ptr,
            &b_off,
            WORKSPACE_BYTES,
        ) {
            Ok(m) => Some(m),
            Err(e) => {
                tracing::warn!(device = device.ordinal(), error = %e, "cuBLASLt has no plan for this model; fused kernels only");
                None
            }
        }
    } else {
        None
    };
    Ok(InstanceState {
        iw,
        ow,
        stream,
        host_in,
        host_out,
        input,
        output,
        weights,
        bias,
        _bias_stored: bias_stored,
        act,
        act_bytes: largest * widest * elem,
        workspace,
        fused,
        conv_in,
        acts,
        conv_out,
        matmuls,
        buckets: Vec::new(),
        _module: module,
        _functions: functions,
    })
}

/// Per bucket, times every allowed engine (fused kernels, mapped or not, and cuBLASLt) on
/// non-zero inputs and keeps the fastest, with its captured graph.
fn choose_engines(
    state: &mut InstanceState,
    spec: &InstanceSpec<'_>,
) -> Result<Vec<Bucket>, CudaLoadError> {
    let InstanceSpec {
        device,
        plan,
        buckets,
        graphs,
        allow,
        ..
    } = *spec;
    let (largest, iw, widest) = (
        *buckets.last().expect("not empty"),
        plan.input_width,
        plan.widest(),
    );
    // Fill the input with values that are not zeros (zeros can run faster than real data).
    for (i, v) in state
        .host_in
        .as_mut_slice(largest * iw)
        .iter_mut()
        .enumerate()
    {
        *v = ((i * 7919 % 1000) as f32 - 500.0) / 500.0;
    }
    let mut chosen = Vec::with_capacity(buckets.len());
    for &size in buckets {
        let mut candidates: Vec<Engine> = state
            .fused
            .iter()
            .filter(|f| f.rows == 1 || f.rows <= size.next_power_of_two())
            .flat_map(|f| [Engine::Fused(f.rows), Engine::FusedMapped(f.rows)])
            .collect();
        if state.matmuls.is_some() {
            candidates.push(Engine::Blaslt);
        }
        candidates.retain(|e| allow(*e));
        if candidates.is_empty() {
            return Err(CudaLoadError::Cuda(format!(
                "no GPU engine for a batch of {size}: layers up to {widest} wide exceed the fused kernel's shared memory and cuBLASLt is unavailable (or was excluded)"
            )));
        }
        let mut best: Option<(u64, Engine, Option<CudaGraph>)> = None;
        for engine in candidates {
            let graph = if graphs {
                Some(
                    state
                        .capture(&state.io(), &state.stream, size, engine)
                        .map_err(cuda_err("capturing a CUDA graph"))?,
                )
            } else {
                None
            };
            let ns = state
                .time(size, engine, graph.as_ref())
                .map_err(cuda_err("timing an engine"))?;
            tracing::debug!(device = device.ordinal(), size, %engine, ns, "engine timed");
            // The graph that loses is destroyed as a change to the device's state.
            let loser = if best.as_ref().is_none_or(|(b, _, _)| ns < *b) {
                best.replace((ns, engine, graph)).and_then(|(_, _, g)| g)
            } else {
                graph
            };
            device_change(|| drop(loser));
        }
        let (ns, engine, graph) = best.expect("at least one candidate");
        tracing::debug!(device = device.ordinal(), size, %engine, ns, "engine chosen");
        chosen.push(Bucket {
            size,
            engine,
            measured_ns: ns,
            graph,
        });
    }
    Ok(chosen)
}

fn oom_or(bytes: usize) -> impl Fn(DriverError) -> CudaLoadError {
    move |e| {
        if e.0 == cudarc::driver::sys::CUresult::CUDA_ERROR_OUT_OF_MEMORY {
            CudaLoadError::OutOfMemory(OutOfMemory {
                requested_mb: bytes.div_ceil(1 << 20),
                why: "the device has no free memory left".into(),
            })
        } else {
            CudaLoadError::Cuda(format!("allocating {bytes} bytes of device memory: {e}"))
        }
    }
}
