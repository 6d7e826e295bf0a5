//! The MLP path: dense layers with fused activations, run row by row with SIMD where the CPU
//! has it.
//!
//! Weights are stored input-major (`w[i * out + j]`), so each input value scales one
//! contiguous row of weights into the output (an axpy the compiler vectorises), 16 or 64 columns
//! at a time; the columns left past the last 16 (all of a thin layer's: a linear model's one
//! output) are kept transposed as well, each a dot product over the inputs. On x86-64 with
//! AVX2 and FMA a copy of the loops compiled for them is chosen at load.

use std::sync::Mutex;

use crate::{Backend, BackendError, BackendInfo, ModelIo};

/// An element-wise activation.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Activation {
    /// x.
    Identity,
    /// max(x, 0).
    Relu,
    /// x for x >= 0, alpha * x otherwise.
    LeakyRelu(f32),
    /// 1 / (1 + e^-x).
    Sigmoid,
    /// tanh(x).
    Tanh,
    /// x/2 (1 + erf(x / sqrt 2)) (ONNX `Gelu`).
    Gelu,
    /// x/2 (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))) (ONNX `Gelu` with `approximate = "tanh"`).
    GeluTanh,
}

impl Activation {
    #[inline(always)]
    fn apply(self, v: &mut [f32]) {
        match self {
            Self::Identity => {}
            // NaN stays NaN, as in ONNX (`max` would turn it into 0).
            Self::Relu => v
                .iter_mut()
                .for_each(|x| *x = if *x < 0.0 { 0.0 } else { *x }),
            Self::LeakyRelu(a) => v
                .iter_mut()
                .for_each(|x| *x = if *x >= 0.0 { *x } else { a * *x }),
            Self::Sigmoid => v.iter_mut().for_each(|x| *x = 1.0 / (1.0 + (-*x).exp())),
            Self::Tanh => v.iter_mut().for_each(|x| *x = x.tanh()),
            Self::Gelu => v.iter_mut().for_each(|x| {
                *x = 0.5 * *x * (1.0 + libm::erff(*x * std::f32::consts::FRAC_1_SQRT_2))
            }),
            Self::GeluTanh => v.iter_mut().for_each(|x| {
                let inner = 0.797_884_6 * (*x + 0.044_715 * *x * *x * *x);
                *x = 0.5 * *x * (1.0 + inner.tanh());
            }),
        }
    }
}

/// One dense layer: `y = act(x W + b)`.
#[derive(Clone, Debug, PartialEq)]
pub struct Dense {
    /// Inputs.
    pub inputs: usize,
    /// Outputs.
    pub outputs: usize,
    /// `inputs * outputs` weights, input-major.
    pub weights: Vec<f32>,
    /// `outputs` biases.
    pub bias: Vec<f32>,
    /// Applied after the bias.
    pub activation: Activation,
}

/// A chain of dense layers (an empty chain passes its input through, optionally with a final
/// activation).
#[derive(Clone, Debug, PartialEq)]
pub struct MlpPlan {
    /// Width of the input.
    pub input_width: usize,
    /// The layers in order.
    pub layers: Vec<Dense>,
    /// An activation applied to the input before the first layer.
    pub input_activation: Activation,
}

impl MlpPlan {
    /// Width of the output.
    pub fn output_width(&self) -> usize {
        self.layers.last().map_or(self.input_width, |l| l.outputs)
    }

    /// The widest activation: the input or a layer's output.
    pub fn widest(&self) -> usize {
        self.layers
            .iter()
            .map(|l| l.outputs)
            .chain([self.input_width])
            .max()
            .unwrap_or(1)
    }

    /// Runs `R` rows (row `r` of the input at `input[r * input_width..]`) through every layer;
    /// `a` and `b` are scratch of at least `R * widest`.
    #[inline(always)]
    fn run_block<const R: usize, const FMA: bool>(
        &self,
        tails: &[Vec<f32>],
        input: &[f32],
        output: &mut [f32],
        a: &mut [f32],
        b: &mut [f32],
    ) {
        let stride = self.widest();
        self.run_layers(tails, input, R, output, a, b, |layer, tail, x, y| {
            dense::<R, FMA>(layer, tail, x, stride, y, stride);
        });
    }

    /// Runs `rows` rows (`input` row-major) through every layer with `layer(layer, tail, x, y)`,
    /// which computes a layer's rows of `y` from those of `x` (`tail`: the layer's
    /// [`tail_columns`]): the rows go into `a` (with the input activation), `widest()` apart,
    /// then from buffer to buffer, then into `output`.
    #[allow(clippy::too_many_arguments)]
    #[inline(always)]
    fn run_layers(
        &self,
        tails: &[Vec<f32>],
        input: &[f32],
        rows: usize,
        output: &mut [f32],
        a: &mut [f32],
        b: &mut [f32],
        layer: impl Fn(&Dense, &[f32], &[f32], &mut [f32]),
    ) {
        let (iw, ow, stride) = (self.input_width, self.output_width(), self.widest());
        for r in 0..rows {
            let row = &mut a[r * stride..r * stride + iw];
            row.copy_from_slice(&input[r * iw..(r + 1) * iw]);
            self.input_activation.apply(row);
        }
        let (mut cur, mut next) = (a, b);
        for (l, tail) in self.layers.iter().zip(tails) {
            layer(l, tail, cur, next);
            std::mem::swap(&mut cur, &mut next);
        }
        for r in 0..rows {
            output[r * ow..(r + 1) * ow].copy_from_slice(&cur[r * stride..r * stride + ow]);
        }
    }

    /// Runs `rows` rows layer by layer (every row through a layer before the next), each layer
    /// panel by panel ([`dense_panels`]): the weights are read from memory once per batch, not
    /// once per block of rows.
    #[inline(always)]
    fn run_by_layer<const FMA: bool>(
        &self,
        tails: &[Vec<f32>],
        input: &[f32],
        rows: usize,
        output: &mut [f32],
        s: &mut Scratch,
    ) {
        let stride = self.widest();
        let need = rows * stride;
        if s.a.len() < need {
            s.a.resize(need, 0.0);
            s.b.resize(need, 0.0);
        }
        self.run_layers(
            tails,
            input,
            rows,
            output,
            &mut s.a[..need],
            &mut s.b[..need],
            |layer, tail, x, y| dense_panels::<FMA>(layer, tail, x, y, rows, stride),
        );
    }

    #[inline(always)]
    fn run_rows_generic<const FMA: bool>(
        &self,
        tails: &[Vec<f32>],
        input: &[f32],
        rows: usize,
        output: &mut [f32],
        s: &mut Scratch,
    ) {
        let (iw, ow) = (self.input_width, self.output_width());
        if rows > BLOCK_ROWS && self.layers.iter().any(|l| l.weights.len() > LARGE_LAYER) {
            self.run_by_layer::<FMA>(tails, input, rows, output, s);
            return;
        }
        let mut r = 0;
        // BLOCK_ROWS rows at a time share every weight load; the rest one by one.
        while r + BLOCK_ROWS <= rows {
            self.run_block::<BLOCK_ROWS, FMA>(
                tails,
                &input[r * iw..],
                &mut output[r * ow..],
                &mut s.a,
                &mut s.b,
            );
            r += BLOCK_ROWS;
        }
        while r < rows {
            self.run_block::<1, FMA>(
                tails,
                &input[r * iw..],
                &mut output[r * ow..],
                &mut s.a,
                &mut s.b,
            );
            r += 1;
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    fn run_rows_avx2(
        &self,
        tails: &[Vec<f32>],
        input: &[f32],
        rows: usize,
        output: &mut [f32],
        s: &mut Scratch,
    ) {
        self.run_rows_generic::<true>(tails, input, rows, output, s);
    }

    /// Runs `rows` rows; `tails` holds every layer's [`tail_columns`].
    fn run_rows(
        &self,
        tails: &[Vec<f32>],
        input: &[f32],
        rows: usize,
        output: &mut [f32],
        s: &mut Scratch,
    ) {
        #[cfg(target_arch = "x86_64")]
        if s.avx2 {
            // SAFETY: `s.avx2` is set only when the CPU reports AVX2 and FMA.
            unsafe { self.run_rows_avx2(tails, input, rows, output, s) };
            return;
        }
        self.run_rows_generic::<false>(tails, input, rows, output, s);
    }
}

/// `y = act(x W + b)` for `R` rows (`x` rows `xs` apart, `y` rows `ys` apart): output columns
/// in register blocks (64 wide for one row, 16 wide for a block of rows), each accumulated over all
/// inputs, so every weight load serves `R` rows and the accumulators stay in registers.
#[inline(always)]
fn dense<const R: usize, const FMA: bool>(
    layer: &Dense,
    tail: &[f32],
    x: &[f32],
    xs: usize,
    y: &mut [f32],
    ys: usize,
) {
    let mut jb = 0;
    if R == 1 {
        while jb + 64 <= layer.outputs {
            block::<R, 64, FMA>(layer, x, xs, y, ys, jb);
            jb += 64;
        }
    }
    while jb + 16 <= layer.outputs {
        block::<R, 16, FMA>(layer, x, xs, y, ys, jb);
        jb += 16;
    }
    last_columns::<FMA>(layer, tail, x, xs, y, ys, R, jb);
}

/// The columns from `jb` on (fewer than 16) of `rows` rows, each a dot product of the row
/// with the column's weights ([`dot`], read from `tail`, the layer's [`tail_columns`]), then
/// the activation of every column.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn last_columns<const FMA: bool>(
    layer: &Dense,
    tail: &[f32],
    x: &[f32],
    xs: usize,
    y: &mut [f32],
    ys: usize,
    rows: usize,
    jb: usize,
) {
    let n = layer.inputs;
    for r in 0..rows {
        let xr = &x[r * xs..r * xs + n];
        for j in jb..layer.outputs {
            let c = j - jb;
            y[r * ys + j] = layer.bias[j] + dot::<FMA>(xr, &tail[c * n..(c + 1) * n]);
        }
        layer
            .activation
            .apply(&mut y[r * ys..r * ys + layer.outputs]);
    }
}

/// Lanes of the partial sums of [`dot`].
const DOT_LANES: usize = 32;

/// `x · w` (equal lengths) in a fixed order whatever the batch: value `i` goes into partial
/// sum `i % 32` (32 independent sums, which the compiler keeps in vector registers; the last
/// values padded with zeros to 32), and the partial sums are then added pairwise (16 + 16,
/// 8 + 8, ...).
#[inline(always)]
fn dot<const FMA: bool>(x: &[f32], w: &[f32]) -> f32 {
    let (xc, wc) = (x.chunks_exact(DOT_LANES), w.chunks_exact(DOT_LANES));
    let (xr, wr) = (xc.remainder(), wc.remainder());
    let lanes = |c: &[f32]| -> [f32; DOT_LANES] { c.try_into().expect("chunks of DOT_LANES") };
    let mut p = [0.0f32; DOT_LANES];
    for (xa, wa) in xc.zip(wc) {
        fma_lanes::<FMA>(&mut p, &lanes(xa), &lanes(wa));
    }
    if !xr.is_empty() {
        let (mut xa, mut wa) = ([0.0f32; DOT_LANES], [0.0f32; DOT_LANES]);
        xa[..xr.len()].copy_from_slice(xr);
        wa[..wr.len()].copy_from_slice(wr);
        fma_lanes::<FMA>(&mut p, &xa, &wa);
    }
    let mut half = DOT_LANES / 2;
    while half > 0 {
        for k in 0..half {
            p[k] += p[k + half];
        }
        half /= 2;
    }
    p[0]
}

/// `p[k] += x[k] * w[k]` for every lane.
#[inline(always)]
fn fma_lanes<const FMA: bool>(
    p: &mut [f32; DOT_LANES],
    x: &[f32; DOT_LANES],
    w: &[f32; DOT_LANES],
) {
    for k in 0..DOT_LANES {
        // Fused only where the CPU has FMA: elsewhere `mul_add` is a slow libm call.
        p[k] = if FMA {
            x[k].mul_add(w[k], p[k])
        } else {
            x[k] * w[k] + p[k]
        };
    }
}

/// A layer's columns past its last whole 16-column panel (fewer than 16), transposed: column
/// `c` (of `jb + c`) is `tail[c * inputs..(c + 1) * inputs]`, so that [`dot`] reads it in order.
fn tail_columns(layer: &Dense) -> Vec<f32> {
    let jb = layer.outputs / 16 * 16;
    (jb..layer.outputs)
        .flat_map(|j| (0..layer.inputs).map(move |i| layer.weights[i * layer.outputs + j]))
        .collect()
}

/// `y = act(x W + b)` for `rows` rows, column panel by column panel: each 16-column panel of
/// the weights serves every row (in blocks of [`BLOCK_ROWS`]) while it is in cache. Each value
/// is computed as [`dense`] computes it, so the bits are the same.
#[inline(always)]
fn dense_panels<const FMA: bool>(
    layer: &Dense,
    tail: &[f32],
    x: &[f32],
    y: &mut [f32],
    rows: usize,
    s: usize,
) {
    let mut jb = 0;
    while jb + 16 <= layer.outputs {
        let mut r = 0;
        while r + BLOCK_ROWS <= rows {
            block::<BLOCK_ROWS, 16, FMA>(layer, &x[r * s..], s, &mut y[r * s..], s, jb);
            r += BLOCK_ROWS;
        }
        while r < rows {
            block::<1, 16, FMA>(layer, &x[r * s..], s, &mut y[r * s..], s, jb);
            r += 1;
        }
        jb += 16;
    }
    last_columns::<FMA>(layer, tail, x, s, y, s, rows, jb);
}

#[inline(always)]
fn block<const R: usize, const W: usize, const FMA: bool>(
    layer: &Dense,
    x: &[f32],
    xs: usize,
    y: &mut [f32],
    ys: usize,
    jb: usize,
) {
    let mut acc = [[0.0f32; W]; R];
    for row in acc.iter_mut() {
        row.copy_from_slice(&layer.bias[jb..jb + W]);
    }
    for i in 0..layer.inputs {
        let w: &[f32; W] = layer.weights[i * layer.outputs + jb..i * layer.outputs + jb + W]
            .try_into()
            .expect("W columns");
        for (r, row) in acc.iter_mut().enumerate() {
            let xv = x[r * xs + i];
            for k in 0..W {
                // Fused only where the CPU has FMA: elsewhere `mul_add` is a slow libm call.
                row[k] = if FMA {
                    xv.mul_add(w[k], row[k])
                } else {
                    xv * w[k] + row[k]
                };
            }
        }
    }
    for (r, row) in acc.iter().enumerate() {
        y[r * ys + jb..r * ys + jb + W].copy_from_slice(row);
    }
}

/// Rows that share each weight load in a batch: 4 rows × 16 columns keep 8 accumulators in
/// registers (6 rows measured slower here: 51 µs against 32 µs for a batch of 64).
const BLOCK_ROWS: usize = 4;

/// Weights (floats) of a layer past which a batch runs layer by layer ([`dense_panels`]): 4 MiB,
/// more than a core's L2 cache, so that block by block of rows each block would read the layer
/// from memory again.
const LARGE_LAYER: usize = 1 << 20;

struct Scratch {
    a: Vec<f32>,
    b: Vec<f32>,
    avx2: bool,
}

/// Runs an [`MlpPlan`] on the CPU.
pub struct MlpBackend {
    info: BackendInfo,
    plan: MlpPlan,
    /// Each layer's [`tail_columns`].
    tails: Vec<Vec<f32>>,
    scratch: Mutex<Scratch>,
}

impl MlpBackend {
    /// A backend for `plan`, whose widths match `io`.
    pub fn new(io: ModelIo, plan: MlpPlan) -> Self {
        let widest = plan.widest();
        #[cfg(target_arch = "x86_64")]
        let avx2 = is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma");
        #[cfg(not(target_arch = "x86_64"))]
        let avx2 = false;
        Self {
            info: BackendInfo::cpu(io, "mlp", "cpu-mlp"),
            tails: plan.layers.iter().map(tail_columns).collect(),
            plan,
            scratch: Mutex::new(Scratch {
                a: vec![0.0; BLOCK_ROWS * widest],
                b: vec![0.0; BLOCK_ROWS * widest],
                avx2,
            }),
        }
    }

    /// The plan.
    pub fn plan(&self) -> &MlpPlan {
        &self.plan
    }
}

impl Backend for MlpBackend {
    fn info(&self) -> &BackendInfo {
        &self.info
    }

    fn run_batch(
        &self,
        input: &[f32],
        rows: usize,
        output: &mut [f32],
    ) -> Result<(), BackendError> {
        let (iw, ow) = (self.plan.input_width, self.plan.output_width());
        crate::check_shape(input, rows, output, iw, ow)?;
        let mut scratch = self
            .scratch
            .lock()
            .map_err(|_| BackendError::Execution("scratch lock poisoned".into()))?;
        self.plan
            .run_rows(&self.tails, input, rows, output, &mut scratch);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::fixtures::io;

    #[test]
    fn two_layers_by_hand() {
        // x W1 + b1 = [1*1 + 2*3 + 0.5, 1*2 + 2*4 - 20] = [7.5, -10] -> relu [7.5, 0]
        // then [7.5, 0] . [2, 1] - 1 = 14
        let plan = MlpPlan {
            input_width: 2,
            input_activation: Activation::Identity,
            layers: vec![
                Dense {
                    inputs: 2,
                    outputs: 2,
                    weights: vec![1.0, 2.0, 3.0, 4.0],
                    bias: vec![0.5, -20.0],
                    activation: Activation::Relu,
                },
                Dense {
                    inputs: 2,
                    outputs: 1,
                    weights: vec![2.0, 1.0],
                    bias: vec![-1.0],
                    activation: Activation::Identity,
                },
            ],
        };
        let b = MlpBackend::new(io(2, 1), plan);
        let mut out = [0.0f32; 2];
        b.run_batch(&[1.0, 2.0, 1.0, 2.0], 2, &mut out).unwrap();
        assert_eq!(out, [14.0, 14.0]);
        assert!(b.run_batch(&[1.0], 1, &mut out).is_err());
    }

    /// A plan of random layers `widths[0] -> widths[1] -> ...`, ReLU between, Tanh last.
    fn random_plan(widths: &[usize], seed: u64) -> MlpPlan {
        let mut state = seed;
        let mut next = move || {
            state = state
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            ((state >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.2
        };
        let layers = widths
            .windows(2)
            .enumerate()
            .map(|(l, w)| Dense {
                inputs: w[0],
                outputs: w[1],
                weights: (0..w[0] * w[1]).map(|_| next()).collect(),
                bias: (0..w[1]).map(|_| next()).collect(),
                activation: if l + 2 == widths.len() {
                    Activation::Tanh
                } else {
                    Activation::Relu
                },
            })
            .collect();
        MlpPlan {
            input_width: widths[0],
            layers,
            input_activation: Activation::Identity,
        }
    }

    #[test]
    fn each_row_gets_the_same_bits_alone_and_in_every_batch_on_both_paths() {
        // A small model (row blocks through every layer) and one with a layer past LARGE_LAYER
        // (layer by layer, panel by panel); odd widths leave columns past the last panel.
        for widths in [&[37, 64, 19, 3][..], &[64, 1030, 1031, 5]] {
            assert_eq!(
                widths.windows(2).any(|w| w[0] * w[1] > LARGE_LAYER),
                widths[1] > 1000
            );
            let b = MlpBackend::new(
                io(widths[0], *widths.last().unwrap()),
                random_plan(widths, 3),
            );
            let (iw, ow) = (widths[0], *widths.last().unwrap());
            let rows = 70;
            let input: Vec<f32> = (0..rows * iw)
                .map(|i| ((i * 7919 % 1000) as f32 - 500.0) / 250.0)
                .collect();
            let mut alone = vec![0.0f32; rows * ow];
            for r in 0..rows {
                b.run_batch(
                    &input[r * iw..(r + 1) * iw],
                    1,
                    &mut alone[r * ow..(r + 1) * ow],
                )
                .unwrap();
            }
            for n in 1..=rows {
                for start in [0, rows - n] {
                    let mut out = vec![0.0f32; n * ow];
                    b.run_batch(&input[start * iw..(start + n) * iw], n, &mut out)
                        .unwrap();
                    let want = &alone[start * ow..(start + n) * ow];
                    assert!(
                        out.iter()
                            .zip(want)
                            .all(|(a, b)| a.to_bits() == b.to_bits()),
                        "{widths:?}: rows {start}..{} in a batch of {n} differ from alone",
                        start + n
                    );
                }
            }
        }
    }

    #[test]
    fn outputs_match_a_plain_reference_with_and_without_whole_panels() {
        // Thin layers (all columns past the last 16-column panel: a linear model over 256
        // features, 64 -> 1), wide ones with a few left over, and inputs not a multiple of the
        // dot product's lanes.
        for widths in [&[256, 8][..], &[64, 1], &[37, 64, 19, 3], &[70, 33, 17]] {
            let plan = random_plan(widths, 11);
            let b = MlpBackend::new(io(widths[0], *widths.last().unwrap()), plan.clone());
            let (iw, ow) = (widths[0], *widths.last().unwrap());
            let rows = 9;
            let input: Vec<f32> = (0..rows * iw)
                .map(|i| ((i * 7919 % 1000) as f32 - 500.0) / 250.0)
                .collect();
            let mut out = vec![0.0f32; rows * ow];
            b.run_batch(&input, rows, &mut out).unwrap();
            for r in 0..rows {
                let mut v: Vec<f64> = input[r * iw..(r + 1) * iw]
                    .iter()
                    .map(|&x| f64::from(x))
                    .collect();
                for l in &plan.layers {
                    v = (0..l.outputs)
                        .map(|j| {
                            let z = f64::from(l.bias[j])
                                + (0..l.inputs)
                                    .map(|i| v[i] * f64::from(l.weights[i * l.outputs + j]))
                                    .sum::<f64>();
                            match l.activation {
                                Activation::Relu => z.max(0.0),
                                Activation::Tanh => z.tanh(),
                                other => panic!("{other:?} not in random_plan"),
                            }
                        })
                        .collect();
                }
                for (j, want) in v.iter().enumerate() {
                    let got = f64::from(out[r * ow + j]);
                    assert!(
                        (got - want).abs() <= 1e-5 * (1.0 + want.abs()),
                        "{widths:?} row {r} output {j}: {got} against {want}"
                    );
                }
            }
        }
    }

    #[test]
    fn an_input_activation_applies_before_the_first_layer() {
        let plan = MlpPlan {
            input_width: 2,
            input_activation: Activation::Relu,
            layers: vec![Dense {
                inputs: 2,
                outputs: 1,
                weights: vec![1.0, 1.0],
                bias: vec![0.0],
                activation: Activation::Identity,
            }],
        };
        let b = MlpBackend::new(io(2, 1), plan);
        let mut out = [0.0f32];
        b.run_batch(&[-3.0, 2.0], 1, &mut out).unwrap();
        assert_eq!(out, [2.0]);
    }

    #[test]
    fn activations() {
        let mut v = [-2.0f32, 0.0, 3.0];
        Activation::LeakyRelu(0.1).apply(&mut v);
        assert_eq!(v, [-0.2, 0.0, 3.0]);
        let mut v = [0.0f32];
        Activation::Sigmoid.apply(&mut v);
        assert_eq!(v, [0.5]);
        // Reference values from torch.nn.functional.gelu (exact and tanh).
        let mut v = [-1.0f32, 0.5, 2.0];
        Activation::Gelu.apply(&mut v);
        for (a, b) in v.iter().zip([-0.158_655_26, 0.345_731_14, 1.954_499_7]) {
            assert!((a - b).abs() < 1e-6, "{a} vs {b}");
        }
        let mut v = [-1.0f32, 0.5, 2.0];
        Activation::GeluTanh.apply(&mut v);
        for (a, b) in v.iter().zip([-0.158_808, 0.345_714, 1.954_597_7]) {
            assert!((a - b).abs() < 1e-5, "{a} vs {b}");
        }
    }
}
