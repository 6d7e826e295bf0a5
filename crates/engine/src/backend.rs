//! The [`Backend`] contract: what runs a batch of feature rows through a model, the model's
//! I/O ([`ModelIo`]), what a loaded backend is ([`BackendInfo`]), and its errors.

/// The I/O of a model: one f32 input of `[batch, input_width]`, one f32 output of
/// `[batch, output_width]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ModelIo {
    /// Name of the graph's input.
    pub input_name: String,
    /// Features per row.
    pub input_width: usize,
    /// Name of the graph's output.
    pub output_name: String,
    /// Values per row.
    pub output_width: usize,
    /// What the served output is, where the graph's own outputs do not say it (a
    /// classifier's probabilities served in place of its ZipMap, its label not served).
    pub output_note: Option<String>,
}

/// What a loaded backend is.
#[derive(Clone, Debug)]
pub struct BackendInfo {
    /// The model's I/O.
    pub io: ModelIo,
    /// Architecture, as reported to users (`mlp`, `onnx-graph`).
    pub architecture: String,
    /// Where it runs (`cpu`).
    pub device: String,
    /// Backend name (`cpu-mlp`, `cpu-tract`, `cuda`).
    pub engine: &'static str,
    /// Device memory the model holds (all its GPU instances); `None` on the CPU.
    pub device_memory_bytes: Option<u64>,
    /// PCI bus ids of the GPUs it runs on (empty on the CPU), to match NVML's figures.
    pub pci_bus_ids: Vec<String>,
}

impl BackendInfo {
    /// A backend on the CPU: no device memory, no GPU.
    pub fn cpu(io: ModelIo, architecture: impl Into<String>, engine: &'static str) -> Self {
        Self {
            io,
            architecture: architecture.into(),
            device: "cpu".into(),
            engine,
            device_memory_bytes: None,
            pci_bus_ids: Vec::new(),
        }
    }
}

/// Arithmetic of a model on the GPU (the CPU backends compute in f32 whatever is asked).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    /// f32 weights and arithmetic, no TF32 (the CPU's result up to summation order).
    #[default]
    Fp32,
    /// f32 storage; matrix products may round their operands to TF32 (10-bit mantissa).
    Tf32,
    /// f16 weights and activations between layers, f32 accumulation.
    Fp16,
    /// bf16 weights and activations between layers, f32 accumulation.
    Bf16,
}

impl Precision {
    /// Bytes of one stored weight or activation.
    pub fn storage_bytes(self) -> usize {
        if self.is_16bit() {
            2
        } else {
            4
        }
    }

    /// Whether weights are stored in 16 bits.
    pub fn is_16bit(self) -> bool {
        matches!(self, Self::Fp16 | Self::Bf16)
    }

    /// Name as written in configs.
    pub fn name(self) -> &'static str {
        match self {
            Self::Fp32 => "fp32",
            Self::Tf32 => "tf32",
            Self::Fp16 => "fp16",
            Self::Bf16 => "bf16",
        }
    }
}

/// Health of a backend.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BackendHealth {
    /// Serving.
    Healthy,
    /// Not serving, with the reason.
    Unhealthy(String),
}

/// Why a batch failed.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    /// The input is not `rows * input_width` values or the output buffer is too small.
    #[error("batch shape mismatch: {0}")]
    Shape(String),
    /// The engine failed.
    #[error("execution failed: {0}")]
    Execution(String),
}

/// Runs batches of one model.
///
/// `run_batch` may be called from several threads at once; implementations keep their scratch
/// state behind their own synchronisation.
pub trait Backend: Send + Sync {
    /// What this backend is and the model's I/O.
    fn info(&self) -> &BackendInfo;

    /// Runs `rows` rows: `input` is `rows * input_width` values row-major, `output` receives
    /// `rows * output_width` values row-major.
    ///
    /// # Errors
    /// [`BackendError`] when the shapes are wrong or the engine fails.
    fn run_batch(&self, input: &[f32], rows: usize, output: &mut [f32])
        -> Result<(), BackendError>;

    /// Runs a batch whose rows `gather` writes straight into the backend's input staging
    /// memory (pinned host memory on a GPU, so a batch is copied once, from the rings to where
    /// the copy engine reads it). `gather` gets room for `scratch.len() / input_width` rows,
    /// writes its rows from the start and returns how many; `output` receives them as in
    /// [`run_batch`](Self::run_batch). Returns the row count.
    ///
    /// The default gathers into `scratch` and calls `run_batch`.
    ///
    /// # Errors
    /// As [`run_batch`](Self::run_batch).
    fn run_gathered(
        &self,
        gather: &mut dyn FnMut(&mut [f32]) -> usize,
        scratch: &mut [f32],
        output: &mut [f32],
    ) -> Result<usize, BackendError> {
        let rows = gather(scratch);
        if rows > 0 {
            let iw = self.info().io.input_width;
            self.run_batch(&scratch[..rows * iw], rows, output)?;
        }
        Ok(rows)
    }

    /// Whether the backend can serve.
    fn health(&self) -> BackendHealth {
        BackendHealth::Healthy
    }

    /// A pipeline of its own, `depth` batches deep, for one caller that keeps batches in
    /// flight (a poller's lane), where the engine runs batches asynchronously (the GPU);
    /// `None` where it has none (the CPU engines: see [`crate::ThreadPipeline`]) or the
    /// pipeline's resources could not be had.
    fn pipeline(&self, depth: usize) -> Option<Box<dyn Pipeline>> {
        let _ = depth;
        None
    }

    /// Another engine of the same model that runs a batch of `rows` rows faster than this
    /// backend's [`run_gathered`](Self::run_gathered) and [`pipeline`](Self::pipeline) would
    /// (the CPU engine of a model split by batch size: see [`crate::SplitBackend`]); `None`
    /// where there is none. A caller that knows a batch's size before gathering it asks
    /// first, so the batch is gathered straight into the right engine's staging memory.
    fn faster_engine_for(&self, rows: usize) -> Option<&dyn Backend> {
        let _ = rows;
        None
    }
}

/// Batches in flight on an asynchronous engine, for one caller: the caller gathers a batch
/// into a free slot's staging memory and launches it, goes on with other work, and collects
/// the outputs in launch order. Nothing in it waits for a batch to compute (a batch rerun
/// elsewhere after its device failed aside).
///
/// Every launched batch is collected exactly once: [`ready`](Self::ready) gives the oldest
/// one's outputs (or its failure) once it is done, and [`retire`](Self::retire) frees its slot.
pub trait Pipeline: Send {
    /// Whether a slot is free for another batch.
    fn has_room(&self) -> bool;

    /// Batches launched and not yet retired.
    fn in_flight(&self) -> usize;

    /// Gathers a batch into a free slot (as [`Backend::run_gathered`] does) and launches it.
    /// Returns the rows `gather` returned (padding included); 0: nothing was gathered and
    /// nothing launched. A launch that fails is reported by [`ready`](Self::ready) for that
    /// batch.
    ///
    /// # Panics
    /// When no slot is free ([`has_room`](Self::has_room)).
    fn launch(&mut self, gather: &mut dyn FnMut(&mut [f32]) -> usize) -> usize;

    /// The oldest batch's outputs (`rows * output_width` values) once it is done; `None`
    /// while it runs or when nothing is in flight. Once it answered `Some`, the caller
    /// retires the batch before asking again.
    ///
    /// # Errors
    /// [`BackendError`] when the batch failed and could not be run elsewhere.
    fn ready(&mut self) -> Option<Result<&mut [f32], BackendError>>;

    /// Frees the oldest batch's slot, once [`ready`](Self::ready) answered for it.
    fn retire(&mut self);
}

/// Checks that `input` holds `rows` rows of `iw` values and `output` room for `rows` of `ow`.
///
/// # Errors
/// [`BackendError::Shape`] saying what was expected.
pub fn check_shape(
    input: &[f32],
    rows: usize,
    output: &[f32],
    iw: usize,
    ow: usize,
) -> Result<(), BackendError> {
    if input.len() != rows * iw || output.len() < rows * ow {
        return Err(BackendError::Shape(format!(
            "{rows} rows need {} inputs and {} outputs, got {} and {}",
            rows * iw,
            rows * ow,
            input.len(),
            output.len()
        )));
    }
    Ok(())
}
