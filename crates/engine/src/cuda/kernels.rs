//! CUDA C source for a model, compiled at load by NVRTC.
//!
//! Two kinds of kernels come from one [`MlpPlan`]:
//! - `mlp_r{R}`: the whole MLP in one kernel. A block of 256 threads takes `R` rows, keeps
//!   their activations in shared memory and runs every layer: each thread owns one output
//!   column (or, for narrow layers, one slice of the inputs of one column, summed through shared
//!   memory afterwards), so a weight loaded once serves the block's `R` rows. Widths are
//!   compile-time constants. Best for small widths and batches, where launches dominate.
//! - `conv_in`, `act_{l}`, `conv_out`: the element-wise kernels around the cuBLASLt layers
//!   (input conversion to the storage type with the input activation, activations cuBLASLt's
//!   epilogues lack, conversion of the output back to f32).
//!
//! The source needs no headers: 16-bit values are converted with inline PTX.

use std::fmt::Write;

use super::Precision;
use crate::{Activation, MlpPlan};

/// Threads per block of every kernel.
pub const THREADS: u32 = 256;

/// Registers per thread the fused kernel may fill with prefetched weights.
const PREFETCH_REGISTERS: usize = 96;

/// Bytes of shared memory a block of `mlp_r{rows}` needs.
pub fn fused_shared_bytes(plan: &MlpPlan, rows: usize) -> usize {
    let widest = plan.widest();
    // Two activation buffers and the partial sums of a split layer (at most THREADS per row).
    (2 * rows * widest + rows * THREADS as usize) * 4
}

/// The C type weights are stored in.
fn storage_type(p: Precision) -> &'static str {
    match p {
        Precision::Fp32 | Precision::Tf32 => "float",
        Precision::Fp16 | Precision::Bf16 => "unsigned short",
    }
}

const PRELUDE: &str = r#"
typedef unsigned short u16;
__device__ __forceinline__ float ld_f32(const float* p, int i) { return __ldg(p + i); }
__device__ __forceinline__ float ld_f16(const u16* p, int i) {
    u16 h = __ldg(p + i); float f; asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h)); return f;
}
__device__ __forceinline__ float ld_bf16(const u16* p, int i) {
    return __uint_as_float(((unsigned)__ldg(p + i)) << 16);
}
__device__ __forceinline__ float to_f32_f32(float v) { return v; }
__device__ __forceinline__ float to_f32_f16(u16 h) { float f; asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h)); return f; }
__device__ __forceinline__ float to_f32_bf16(u16 h) { return __uint_as_float(((unsigned)h) << 16); }
__device__ __forceinline__ float from_f32_f32(float v) { return v; }
__device__ __forceinline__ u16 from_f32_f16(float v) { u16 h; asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(v)); return h; }
__device__ __forceinline__ u16 from_f32_bf16(float v) { u16 h; asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(h) : "f"(v)); return h; }
"#;

/// The suffix of the load/convert helpers for a precision.
fn suffix(p: Precision) -> &'static str {
    match p {
        Precision::Fp32 | Precision::Tf32 => "f32",
        Precision::Fp16 => "f16",
        Precision::Bf16 => "bf16",
    }
}

/// A C expression applying `act` to the float expression `v`.
fn activation(act: Activation, v: &str) -> String {
    match act {
        Activation::Identity => v.to_string(),
        // NaN stays NaN, as in ONNX (fmaxf would turn it into 0).
        Activation::Relu => format!("(({v}) < 0.0f ? 0.0f : ({v}))"),
        Activation::LeakyRelu(a) => format!("(({v}) >= 0.0f ? ({v}) : {a:e}f * ({v}))"),
        Activation::Sigmoid => format!("(1.0f / (1.0f + expf(-({v}))))"),
        Activation::Tanh => format!("tanhf({v})"),
        Activation::Gelu => format!("(0.5f * ({v}) * (1.0f + erff(({v}) * 0.70710678118654752f)))"),
        Activation::GeluTanh => format!(
            "(0.5f * ({v}) * (1.0f + tanhf(0.7978845608028654f * (({v}) + 0.044715f * ({v}) * ({v}) * ({v})))))"
        ),
    }
}

/// Offsets (in elements) of each layer's weights in the packed weight buffer: every layer
/// starts 256-byte aligned, as cuBLASLt wants.
pub fn weight_offsets(plan: &MlpPlan, precision: Precision) -> (Vec<usize>, usize) {
    let elem = precision.storage_bytes();
    let align = 256 / elem;
    let mut offsets = Vec::with_capacity(plan.layers.len());
    let mut at = 0usize;
    for l in &plan.layers {
        offsets.push(at);
        at += (l.inputs * l.outputs).div_ceil(align) * align;
    }
    (offsets, at)
}

/// Offsets (in elements) of each layer's biases in a packed bias buffer: 256-byte aligned for
/// 16-bit storage, 512 for f32.
pub fn bias_offsets(plan: &MlpPlan) -> (Vec<usize>, usize) {
    let mut offsets = Vec::with_capacity(plan.layers.len());
    let mut at = 0usize;
    for l in &plan.layers {
        offsets.push(at);
        at += l.outputs.div_ceil(128) * 128;
    }
    (offsets, at)
}

/// Source of the fused kernels `mlp_r{R}` for each `R` in `rows`, and of the element-wise
/// kernels the cuBLASLt path uses.
pub fn source(plan: &MlpPlan, precision: Precision, rows: &[usize]) -> String {
    let mut s = String::from(PRELUDE);
    let wt = storage_type(precision);
    let sfx = suffix(precision);
    let widest = plan.widest();
    let (w_off, _) = weight_offsets(plan, precision);
    let (b_off, _) = bias_offsets(plan);
    let t = THREADS as usize;
    for &r in rows {
        let _ = writeln!(
            s,
            "extern \"C\" __global__ void __launch_bounds__({t}) mlp_r{r}(const float* __restrict__ x, float* __restrict__ y, const {wt}* __restrict__ W, const float* __restrict__ B, int rows) {{"
        );
        let _ = writeln!(
            s,
            "  extern __shared__ float smem[];\n  float* buf0 = smem; float* buf1 = smem + {}; float* part = smem + {};",
            r * widest,
            2 * r * widest
        );
        let _ = writeln!(
            s,
            "  const int t = threadIdx.x; const int lane = t & 31; const int warp = t >> 5; const int row0 = blockIdx.x * {r}; (void)lane; (void)warp;"
        );
        // Weights of the layers each thread needs few of are loaded into registers first, all
        // at once, so their latency is paid once rather than once per layer.
        let mut prefetched = vec![false; plan.layers.len()];
        let mut budget = PREFETCH_REGISTERS;
        for (l, layer) in plan.layers.iter().enumerate() {
            let (inp, out) = (layer.inputs, layer.outputs);
            let split = (t / out).clamp(1, inp);
            if out > t {
                continue;
            }
            let per_thread = inp.div_ceil(split);
            if per_thread > budget {
                continue;
            }
            budget -= per_thread;
            prefetched[l] = true;
            let wo = w_off[l];
            let _ = writeln!(
                s,
                "  float w{l}[{per_thread}];\n  {{ const int j = t % {out}, k = t / {out};\n    #pragma unroll\n    for (int m = 0; m < {per_thread}; m++) {{ int i = k + m * {split}; w{l}[m] = (k < {split} && i < {inp}) ? ld_{sfx}(W, {wo} + i * {out} + j) : 0.0f; }} }}"
            );
        }
        // Input rows into buf0 (rows past the batch as zeros), with the input activation.
        let iw = plan.input_width;
        let _ = writeln!(
            s,
            "  for (int idx = t; idx < {r} * {iw}; idx += {t}) {{ int rr = idx / {iw}, i = idx - rr * {iw}; float v = (row0 + rr < rows) ? x[(size_t)(row0 + rr) * {iw} + i] : 0.0f; buf0[rr * {widest} + i] = {}; }}",
            activation(plan.input_activation, "v")
        );
        let _ = writeln!(s, "  __syncthreads();");
        let mut cur = 0;
        for (l, layer) in plan.layers.iter().enumerate() {
            let (inp, out) = (layer.inputs, layer.outputs);
            let (src, dst) = if cur == 0 {
                ("buf0", "buf1")
            } else {
                ("buf1", "buf0")
            };
            let split = (t / out).clamp(1, inp);
            let wo = w_off[l];
            let bo = b_off[l];
            let act = activation(layer.activation, "v");
            let _ = writeln!(
                s,
                "  {{ // layer {l}: {inp} -> {out}, inputs split {split} ways"
            );
            if split == 1 {
                let _ = writeln!(s, "    for (int j = t; j < {out}; j += {t}) {{");
                let _ = writeln!(
                    s,
                    "      float acc[{r}];\n      #pragma unroll\n      for (int rr = 0; rr < {r}; rr++) acc[rr] = 0.0f;"
                );
                if prefetched[l] {
                    let _ = writeln!(
                        s,
                        "      #pragma unroll\n      for (int i = 0; i < {inp}; i++) {{ float w = w{l}[i];\n        #pragma unroll\n        for (int rr = 0; rr < {r}; rr++) acc[rr] = fmaf({src}[rr * {widest} + i], w, acc[rr]); }}"
                    );
                } else {
                    let _ = writeln!(
                        s,
                        "      #pragma unroll 8\n      for (int i = 0; i < {inp}; i++) {{ float w = ld_{sfx}(W, {wo} + i * {out} + j);\n        #pragma unroll\n        for (int rr = 0; rr < {r}; rr++) acc[rr] = fmaf({src}[rr * {widest} + i], w, acc[rr]); }}"
                    );
                }
                let _ = writeln!(
                    s,
                    "      #pragma unroll\n      for (int rr = 0; rr < {r}; rr++) {{ float v = acc[rr] + B[{bo} + j]; {dst}[rr * {widest} + j] = {act}; }}\n    }}"
                );
            } else {
                let per_thread = inp.div_ceil(split);
                let _ = writeln!(
                    s,
                    "    const int j = t % {out}, k = t / {out};\n    if (k < {split}) {{\n      float acc[{r}];\n      #pragma unroll\n      for (int rr = 0; rr < {r}; rr++) acc[rr] = 0.0f;"
                );
                let weight = if prefetched[l] {
                    format!("w{l}[m]")
                } else {
                    format!("ld_{sfx}(W, {wo} + i * {out} + j)")
                };
                let _ = writeln!(
                    s,
                    "      #pragma unroll\n      for (int m = 0; m < {per_thread}; m++) {{ int i = k + m * {split}; if (i < {inp}) {{ float w = {weight};\n        #pragma unroll\n        for (int rr = 0; rr < {r}; rr++) acc[rr] = fmaf({src}[rr * {widest} + i], w, acc[rr]); }} }}"
                );
                let _ = writeln!(
                    s,
                    "      #pragma unroll\n      for (int rr = 0; rr < {r}; rr++) part[(k * {r} + rr) * {out} + j] = acc[rr];\n    }}\n    __syncthreads();"
                );
                if split >= 8 {
                    // One warp per output: lanes add strided partials, then shuffle down.
                    let _ = writeln!(
                        s,
                        "    for (int p = warp; p < {r} * {out}; p += {warps}) {{ int rr = p / {out}, jj = p - rr * {out}; float v = 0.0f;\n      for (int kk = lane; kk < {split}; kk += 32) v += part[(kk * {r} + rr) * {out} + jj];\n      #pragma unroll\n      for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);\n      if (lane == 0) {{ v += B[{bo} + jj]; {dst}[rr * {widest} + jj] = {act}; }} }}",
                        warps = t / 32
                    );
                } else {
                    let _ = writeln!(
                        s,
                        "    for (int idx = t; idx < {r} * {out}; idx += {t}) {{ int rr = idx / {out}, jj = idx - rr * {out}; float v = B[{bo} + jj];\n      #pragma unroll\n      for (int kk = 0; kk < {split}; kk++) v += part[(kk * {r} + rr) * {out} + jj];\n      {dst}[rr * {widest} + jj] = {act}; }}"
                    );
                }
            }
            let _ = writeln!(s, "  }}\n  __syncthreads();");
            cur = 1 - cur;
        }
        let ow = plan.output_width();
        let last = if cur == 0 { "buf0" } else { "buf1" };
        let _ = writeln!(
            s,
            "  for (int idx = t; idx < {r} * {ow}; idx += {t}) {{ int rr = idx / {ow}, j = idx - rr * {ow}; if (row0 + rr < rows) y[(size_t)(row0 + rr) * {ow} + j] = {last}[rr * {widest} + j]; }}\n}}"
        );
    }
    // Element-wise kernels of the cuBLASLt path. `ST` is the storage type of activations.
    let st = if precision.is_16bit() { "u16" } else { "float" };
    let _ = writeln!(
        s,
        "extern \"C\" __global__ void conv_in(const float* __restrict__ x, {st}* __restrict__ y, int n) {{ int i = blockIdx.x * blockDim.x + threadIdx.x; if (i < n) {{ float v = x[i]; y[i] = from_f32_{sfx}({}); }} }}",
        activation(plan.input_activation, "v")
    );
    for (l, layer) in plan.layers.iter().enumerate() {
        let _ = writeln!(
            s,
            "extern \"C\" __global__ void act_{l}({st}* __restrict__ y, int n) {{ int i = blockIdx.x * blockDim.x + threadIdx.x; if (i < n) {{ float v = to_f32_{sfx}(y[i]); y[i] = from_f32_{sfx}({}); }} }}",
            activation(layer.activation, "v")
        );
    }
    let _ = writeln!(
        s,
        "extern \"C\" __global__ void conv_out(const {st}* __restrict__ y, float* __restrict__ out, int n) {{ int i = blockIdx.x * blockDim.x + threadIdx.x; if (i < n) out[i] = to_f32_{sfx}(y[i]); }}"
    );
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Dense;

    fn plan() -> MlpPlan {
        MlpPlan {
            input_width: 3,
            input_activation: Activation::Identity,
            layers: vec![
                Dense {
                    inputs: 3,
                    outputs: 300,
                    weights: vec![0.0; 900],
                    bias: vec![0.0; 300],
                    activation: Activation::Gelu,
                },
                Dense {
                    inputs: 300,
                    outputs: 2,
                    weights: vec![0.0; 600],
                    bias: vec![0.0; 2],
                    activation: Activation::LeakyRelu(0.5),
                },
            ],
        }
    }

    #[test]
    fn weights_are_256_byte_aligned_per_layer() {
        let (off, total) = weight_offsets(&plan(), Precision::Fp16);
        assert_eq!(off, vec![0, 1024]);
        assert_eq!(total, 1024 + 640);
        let (off, _) = weight_offsets(&plan(), Precision::Fp32);
        assert_eq!(off, vec![0, 960]);
    }

    #[test]
    fn source_has_one_fused_kernel_per_row_count_and_the_layer_shapes() {
        let src = source(&plan(), Precision::Bf16, &[1, 4]);
        assert!(src.contains("mlp_r1(") && src.contains("mlp_r4("));
        assert!(src.contains("layer 0: 3 -> 300, inputs split 1 ways"));
        // 256 threads over 2 outputs: the 300 inputs are split 128 ways.
        assert!(src.contains("layer 1: 300 -> 2, inputs split 128 ways"));
        // 300 inputs over 128 slices: 3 weights per thread, prefetched into registers.
        assert!(src.contains("float w1[3];"));
        assert!(src.contains("ld_bf16(W, 1024 + i * 2 + j)"));
        // 128 partial sums per output: added by a warp.
        assert!(src.contains("__shfl_xor_sync"));
        assert!(src.contains("erff"));
        assert!(src.contains("act_0(") && src.contains("act_1(") && src.contains("conv_out("));
        // Braces balance (a cheap check that the generator closes what it opens).
        assert_eq!(src.matches('{').count(), src.matches('}').count());
    }

    #[test]
    fn shared_memory_grows_with_rows() {
        assert_eq!(fused_shared_bytes(&plan(), 1), (2 * 300 + 256) * 4);
        assert_eq!(fused_shared_bytes(&plan(), 4), (8 * 300 + 1024) * 4);
    }
}
