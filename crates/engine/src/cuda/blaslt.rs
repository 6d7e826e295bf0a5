//! The cuBLASLt engine: one matmul per layer with the bias (and ReLU) in its epilogue, the
//! other activations and the f32 conversions as element-wise kernels.
//!
//! Activations are row-major `[rows, width]`, weights input-major `[inputs, outputs]`; seen
//! column-major these are `X^T` and `W^T`, so each layer is `Y^T = W^T X^T`: A = weights
//! (`outputs x inputs`, ld `outputs`), B = activations (`inputs x rows`), D = `outputs x rows`,
//! and the bias is a vector over D's rows, which is what the BIAS epilogues add.

use std::ffi::c_void;

use cudarc::cublaslt::result as lt;
use cudarc::cublaslt::sys;
use cudarc::driver::sys::{CUdeviceptr, CUfunction, CUstream};
use cudarc::driver::{result as cu, DriverError};

use super::kernels::THREADS;
use crate::{Activation, MlpPlan, Precision};

/// A matrix layout, destroyed on drop.
struct Layout(sys::cublasLtMatrixLayout_t);

impl Drop for Layout {
    fn drop(&mut self) {
        // SAFETY: created by `create_matrix_layout`, destroyed once.
        let _ = unsafe { lt::destroy_matrix_layout(self.0) };
    }
}

/// A matmul descriptor, destroyed on drop.
struct Desc(sys::cublasLtMatmulDesc_t);

impl Drop for Desc {
    fn drop(&mut self) {
        // SAFETY: created by `create_matmul_desc`, destroyed once.
        let _ = unsafe { lt::destroy_matmul_desc(self.0) };
    }
}

/// One layer at one batch size: descriptors and the algorithm cuBLASLt's heuristic chose.
struct LayerMatmul {
    desc: Desc,
    a: Layout,
    b: Layout,
    d: Layout,
    algo: sys::cublasLtMatmulAlgo_t,
}

/// What an enqueue uses of its instance.
pub struct Buffers<'a> {
    pub input: CUdeviceptr,
    pub output: CUdeviceptr,
    pub act: [CUdeviceptr; 2],
    pub workspace: CUdeviceptr,
    pub workspace_bytes: usize,
    pub conv_in: CUfunction,
    pub acts: &'a [CUfunction],
    pub conv_out: CUfunction,
}

/// Every layer's matmul at every bucket size.
pub struct LayerMatmuls {
    handle: sys::cublasLtHandle_t,
    /// `[bucket][layer]`.
    plans: Vec<(usize, Vec<LayerMatmul>)>,
    weights: Vec<CUdeviceptr>,
    widths: Vec<usize>,
    activations: Vec<Activation>,
    input_width: usize,
    /// The input goes through `conv_in` (16-bit storage, or an input activation).
    convert_input: bool,
    sixteen_bit: bool,
}

// SAFETY: the handle and descriptors are plain cuBLASLt objects usable from any thread; the
// struct is only used under its instance's mutex.
unsafe impl Send for LayerMatmuls {}

impl Drop for LayerMatmuls {
    fn drop(&mut self) {
        self.plans.clear();
        // SAFETY: created by `create_handle`, destroyed once, after its descriptors.
        let _ = super::device_change(|| unsafe { lt::destroy_handle(self.handle) });
    }
}

/// Why cuBLASLt has no plan for a model.
#[derive(Debug, thiserror::Error)]
pub enum BlasltPlanError {
    /// The model has no layer.
    #[error("the model has no layer")]
    NoLayer,
    /// A cuBLASLt call failed.
    #[error("cuBLASLt {what}: {source}")]
    Call {
        /// What was being made.
        what: &'static str,
        /// cuBLASLt's error.
        source: lt::CublasError,
    },
}

fn lt_err(what: &'static str) -> impl Fn(lt::CublasError) -> BlasltPlanError {
    move |source| BlasltPlanError::Call { what, source }
}

impl LayerMatmuls {
    /// Descriptors and algorithms for every layer at every bucket size.
    ///
    /// # Errors
    /// A description of the cuBLASLt call that failed (or found no algorithm).
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        plan: &MlpPlan,
        precision: Precision,
        buckets: &[usize],
        weights: CUdeviceptr,
        weight_offsets: &[usize],
        bias: CUdeviceptr,
        bias_offsets: &[usize],
        workspace_bytes: usize,
    ) -> Result<Self, BlasltPlanError> {
        if plan.layers.is_empty() {
            return Err(BlasltPlanError::NoLayer);
        }
        let handle = super::device_change(lt::create_handle).map_err(lt_err("handle"))?;
        let mut me = Self {
            handle,
            plans: Vec::new(),
            weights: weight_offsets
                .iter()
                .map(|o| weights + (o * precision.storage_bytes()) as u64)
                .collect(),
            widths: plan.layers.iter().map(|l| l.outputs).collect(),
            activations: plan.layers.iter().map(|l| l.activation).collect(),
            input_width: plan.input_width,
            convert_input: precision.is_16bit() || plan.input_activation != Activation::Identity,
            sixteen_bit: precision.is_16bit(),
        };
        let (data, compute) = match precision {
            Precision::Fp32 => (
                sys::cudaDataType_t::CUDA_R_32F,
                sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
            ),
            Precision::Tf32 => (
                sys::cudaDataType_t::CUDA_R_32F,
                sys::cublasComputeType_t::CUBLAS_COMPUTE_32F_FAST_TF32,
            ),
            Precision::Fp16 => (
                sys::cudaDataType_t::CUDA_R_16F,
                sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
            ),
            Precision::Bf16 => (
                sys::cudaDataType_t::CUDA_R_16BF,
                sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
            ),
        };
        let pref = lt::create_matmul_pref().map_err(lt_err("preference"))?;
        // SAFETY: `pref` is live; the attribute is a usize.
        let set = unsafe {
            lt::set_matmul_pref_attribute(
                pref,
                sys::cublasLtMatmulPreferenceAttributes_t::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                &workspace_bytes as *const usize as *const c_void,
                std::mem::size_of::<usize>(),
            )
        };
        let result = set.map_err(lt_err("workspace preference")).and_then(|()| {
            for &rows in buckets {
                let mut layers = Vec::with_capacity(plan.layers.len());
                for (l, layer) in plan.layers.iter().enumerate() {
                    let bias_ptr = bias + (bias_offsets[l] * precision.storage_bytes()) as u64;
                    layers.push(layer_matmul(
                        handle,
                        pref,
                        data,
                        compute,
                        layer.inputs as u64,
                        layer.outputs as u64,
                        rows as u64,
                        bias_ptr,
                        layer.activation == Activation::Relu,
                    )?);
                }
                me.plans.push((rows, layers));
            }
            Ok(())
        });
        // SAFETY: created above, destroyed once; the heuristics no longer need it.
        let _ = unsafe { lt::destroy_matmul_pref(pref) };
        result.map(|()| me)
    }

    /// Puts the layers of a `rows`-row batch on `stream` (input already on the device, output
    /// left in `bufs.output`).
    pub fn enqueue(
        &self,
        rows: usize,
        bufs: &Buffers<'_>,
        stream: CUstream,
    ) -> Result<(), DriverError> {
        let layers = &self
            .plans
            .iter()
            .find(|(r, _)| *r == rows)
            .expect("a plan per bucket")
            .1;
        let mut cur = bufs.input;
        if self.convert_input {
            elementwise(
                bufs.conv_in,
                &[bufs.input, bufs.act[0]],
                rows * self.input_width,
                stream,
            )?;
            cur = bufs.act[0];
        }
        let last = layers.len() - 1;
        for (l, m) in layers.iter().enumerate() {
            let out = if l == last && !self.sixteen_bit {
                bufs.output
            } else if cur == bufs.act[0] {
                bufs.act[1]
            } else {
                bufs.act[0]
            };
            let (alpha, beta) = (1.0f32, 0.0f32);
            // SAFETY: descriptors match the buffers' shapes and types (built for this bucket);
            // the buffers hold `largest >= rows` rows; the workspace is as large as declared.
            unsafe {
                lt::matmul(
                    self.handle,
                    m.desc.0,
                    &alpha as *const f32 as *const c_void,
                    &beta as *const f32 as *const c_void,
                    self.weights[l] as *const c_void,
                    m.a.0,
                    cur as *const c_void,
                    m.b.0,
                    out as *const c_void,
                    m.d.0,
                    out as *mut c_void,
                    m.d.0,
                    &m.algo,
                    bufs.workspace as *mut c_void,
                    bufs.workspace_bytes,
                    stream as sys::cudaStream_t,
                )
            }
            .map_err(|e| {
                tracing::error!(layer = l, rows, error = %e, "cuBLASLt matmul failed");
                DriverError(cudarc::driver::sys::CUresult::CUDA_ERROR_LAUNCH_FAILED)
            })?;
            if !matches!(self.activations[l], Activation::Identity | Activation::Relu) {
                elementwise(bufs.acts[l], &[out], rows * self.widths[l], stream)?;
            }
            cur = out;
        }
        if self.sixteen_bit {
            elementwise(
                bufs.conv_out,
                &[cur, bufs.output],
                rows * self.widths[last],
                stream,
            )?;
        }
        Ok(())
    }
}

#[allow(clippy::too_many_arguments)]
fn layer_matmul(
    handle: sys::cublasLtHandle_t,
    pref: sys::cublasLtMatmulPreference_t,
    data: sys::cudaDataType,
    compute: sys::cublasComputeType_t,
    inputs: u64,
    outputs: u64,
    rows: u64,
    bias: CUdeviceptr,
    relu: bool,
) -> Result<LayerMatmul, BlasltPlanError> {
    let desc = Desc(
        lt::create_matmul_desc(compute, sys::cudaDataType_t::CUDA_R_32F)
            .map_err(lt_err("descriptor"))?,
    );
    let epilogue = if relu {
        sys::cublasLtEpilogue_t::CUBLASLT_EPILOGUE_RELU_BIAS
    } else {
        sys::cublasLtEpilogue_t::CUBLASLT_EPILOGUE_BIAS
    };
    // SAFETY: `desc` is live; each attribute has the type and size cuBLASLt documents.
    unsafe {
        lt::set_matmul_desc_attribute(
            desc.0,
            sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_EPILOGUE,
            &epilogue as *const _ as *const c_void,
            std::mem::size_of::<sys::cublasLtEpilogue_t>(),
        )
        .map_err(lt_err("epilogue"))?;
        lt::set_matmul_desc_attribute(
            desc.0,
            sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_BIAS_POINTER,
            &bias as *const CUdeviceptr as *const c_void,
            std::mem::size_of::<CUdeviceptr>(),
        )
        .map_err(lt_err("bias pointer"))?;
    }
    let layout = |r: u64, c: u64, ld: u64| {
        lt::create_matrix_layout(data, r, c, ld as i64)
            .map(Layout)
            .map_err(lt_err("layout"))
    };
    let a = layout(outputs, inputs, outputs)?;
    let b = layout(inputs, rows, inputs)?;
    let d = layout(outputs, rows, outputs)?;
    // SAFETY: every descriptor is live.
    let heuristic =
        unsafe { lt::get_matmul_algo_heuristic(handle, desc.0, a.0, b.0, d.0, d.0, pref) }
            .map_err(lt_err("algorithm search"))?;
    Ok(LayerMatmul {
        desc,
        a,
        b,
        d,
        algo: heuristic.algo,
    })
}

/// Launches a 1-D element-wise kernel over `n` elements whose parameters are `ptrs` then `n`.
fn elementwise(
    f: CUfunction,
    ptrs: &[CUdeviceptr],
    n: usize,
    stream: CUstream,
) -> Result<(), DriverError> {
    let n32 = n as i32;
    // No allocation: at most two pointers and the count.
    let mut params: [*mut c_void; 3] = [std::ptr::null_mut(); 3];
    for (slot, p) in params.iter_mut().zip(ptrs) {
        *slot = p as *const CUdeviceptr as *mut c_void;
    }
    params[ptrs.len()] = &n32 as *const i32 as *mut c_void;
    let params = &mut params[..=ptrs.len()];
    let grid = n.div_ceil(THREADS as usize) as u32;
    // SAFETY: the parameters match the kernel's signature (pointers, then the count) and stay
    // alive during the call, which copies them; the buffers hold `n` elements.
    unsafe { cu::launch_kernel(f, (grid.max(1), 1, 1), (THREADS, 1, 1), 0, stream, params) }
}
