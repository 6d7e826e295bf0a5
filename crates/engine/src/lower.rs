//! Lowering of ONNX graphs: their I/O ([`model_io`]) and, for MLP-shaped graphs, an
//! [`MlpPlan`] ([`lower_mlp`]).
//!
//! An MLP-shaped graph is a single chain from the input to the output of these ops:
//! `Gemm`, `MatMul` (constant right operand), `Add`/`Sub`/`Mul`/`Div` by a constant (folded into
//! the preceding layer), `BatchNormalization` (folded into the preceding layer), `Relu`,
//! `LeakyRelu`, `Sigmoid`, `Tanh`, `Gelu` (fused into the preceding layer), `Identity`, `Dropout` and
//! `Flatten` of a `[batch, n]` value (no-ops), and the affine ops of ONNX-ML that pipelines put
//! in front of (or in place of) a network: `Scaler` and `LinearRegressor` (with the `Cast` to
//! float32 and the final `Reshape` to `[-1, width]` that skl2onnx writes). Layers without an
//! activation are merged into the next one. Anything else is served by tract.

use std::collections::HashMap;

use tract_onnx::pb::{self, type_proto, GraphProto, ModelProto, NodeProto, TensorProto};

use crate::mlp::{Activation, Dense, MlpPlan};
use crate::{BackendLoadError, ModelIo};

/// Why a graph is not an MLP: the op or tensor outside the MLP set, and the rule it breaks.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum LowerError {
    /// The file has no graph.
    #[error("no graph")]
    NoGraph,
    /// A constant is not float32.
    #[error("constant {name:?} is not float32")]
    ConstantNotF32 {
        /// The tensor.
        name: String,
    },
    /// A constant's data is in a file beside the model.
    #[error("constant {name:?} is stored outside the file")]
    ConstantExternal {
        /// The tensor.
        name: String,
    },
    /// A constant's value count is not its shape's.
    #[error("constant {name:?} has {values} values for shape {dims:?}")]
    ConstantSize {
        /// The tensor.
        name: String,
        /// Values stored.
        values: usize,
        /// Its shape.
        dims: Vec<usize>,
    },
    /// A per-output constant that does not broadcast over the chain's width.
    #[error("{what} constant of shape {dims:?} does not broadcast over width {width}")]
    Broadcast {
        /// What it is for (the op's operand).
        what: String,
        /// Its shape.
        dims: Vec<usize>,
        /// The chain's width.
        width: usize,
    },
    /// An operand that should be an initializer is not.
    #[error("{name:?} is not a constant")]
    NotConstant {
        /// The value.
        name: String,
    },
    /// An affine op not directly after a dense layer.
    #[error("{op} is not directly after a dense layer")]
    NotAfterDense {
        /// The op.
        op: String,
    },
    /// A dense layer with no outputs.
    #[error("a dense layer with no outputs")]
    NoOutputs,
    /// Two activations in a row.
    #[error("{op} follows another activation")]
    DoubleActivation {
        /// The second one.
        op: String,
    },
    /// An op that does not read the chain's current value.
    #[error("{op} does not take the chain's value")]
    OffChain {
        /// The op.
        op: String,
    },
    /// An op of another domain (ONNX-ML, a custom one).
    #[error("op {op} of domain {domain:?}")]
    ForeignDomain {
        /// The op.
        op: String,
        /// Its domain.
        domain: String,
    },
    /// An op in the MLP set used in a way the MLP path does not run.
    #[error("{op} {rule}")]
    Unsupported {
        /// The op.
        op: &'static str,
        /// What about it (`with transA`, `in training mode`).
        rule: &'static str,
    },
    /// `Sub` or `Div` with the constant as the left operand.
    #[error("{op} with the constant on the left")]
    ConstantOnLeft {
        /// The op.
        op: String,
    },
    /// Weights whose input count is not the chain's width.
    #[error("{op} expects {inputs} inputs, the chain has {width}")]
    Width {
        /// The op.
        op: &'static str,
        /// Its weights' inputs.
        inputs: usize,
        /// The chain's width.
        width: usize,
    },
    /// `Gelu` with an approximation other than none or tanh.
    #[error("Gelu with approximate = {0:?}")]
    GeluApproximate(String),
    /// An op outside the MLP set.
    #[error("op {op} is outside the MLP set")]
    OutsideMlpSet {
        /// The op.
        op: String,
    },
    /// An op with no output.
    #[error("{op} has no output")]
    NoOutput {
        /// The op.
        op: String,
    },
    /// A `Constant` node (the MLP path takes constants from initializers only).
    #[error("op Constant (constants must be initializers)")]
    ConstantNode,
    /// The chain of ops does not end at the graph's output.
    #[error("the chain does not end at the graph's output")]
    ChainEnd,
    /// The chain's width is not the output's declared width.
    #[error("the chain has width {chain}, the output declares {declared}")]
    OutputWidth {
        /// The chain's.
        chain: usize,
        /// The graph output's.
        declared: usize,
    },
}

fn err<T>(e: LowerError) -> Result<T, LowerError> {
    Err(e)
}

use crate::bounds::ONNX_FLOAT;

/// A `[batch, n]` f32 value's name and `n` (`None` when the file does not fix it).
pub(crate) fn value_2d(v: &pb::ValueInfoProto) -> Result<(String, Option<usize>), String> {
    let Some(type_proto::Value::TensorType(t)) = v.r#type.as_ref().and_then(|t| t.value.as_ref())
    else {
        return Err(format!("{:?} is not a tensor", v.name));
    };
    if t.elem_type != ONNX_FLOAT {
        return Err(format!(
            "{:?} has element type {} (only float32 is served)",
            v.name, t.elem_type
        ));
    }
    let dims = t.shape.as_ref().map(|s| s.dim.as_slice()).unwrap_or(&[]);
    if dims.len() != 2 {
        return Err(format!(
            "{:?} has rank {} (tie serves [batch, features] tensors)",
            v.name,
            dims.len()
        ));
    }
    use pb::tensor_shape_proto::dimension::Value;
    let width = match dims[1].value {
        Some(Value::DimValue(n)) if n > 0 => Some(n as usize),
        Some(Value::DimValue(n)) => return Err(format!("{:?} has width {n}", v.name)),
        _ => None,
    };
    Ok((v.name.clone(), width))
}

/// The graph's input and output (one f32 `[batch, n]` each). The output width is `None` when
/// the file does not state it.
pub(super) fn graph_io(proto: &ModelProto) -> Result<(ModelIo, bool), BackendLoadError> {
    let graph = proto
        .graph
        .as_ref()
        .ok_or_else(|| BackendLoadError::UnsupportedIo("the model has no graph".into()))?;
    let initializers: std::collections::HashSet<&str> =
        graph.initializer.iter().map(|t| t.name.as_str()).collect();
    let inputs: Vec<_> = graph
        .input
        .iter()
        .filter(|i| !initializers.contains(i.name.as_str()))
        .collect();
    if inputs.len() != 1 || graph.output.len() != 1 {
        return Err(BackendLoadError::UnsupportedIo(format!(
            "{} inputs and {} outputs (tie serves models with one input and one output)",
            inputs.len(),
            graph.output.len()
        )));
    }
    let (input_name, input_width) = value_2d(inputs[0]).map_err(BackendLoadError::UnsupportedIo)?;
    let input_width = input_width.ok_or_else(|| {
        BackendLoadError::UnsupportedIo(format!("input {input_name:?} has no fixed width"))
    })?;
    let (output_name, output_width) =
        value_2d(&graph.output[0]).map_err(BackendLoadError::UnsupportedIo)?;
    Ok((
        ModelIo {
            input_name,
            input_width,
            output_name,
            output_width: output_width.unwrap_or(0),
            output_note: None,
        },
        output_width.is_some(),
    ))
}

/// The graph's I/O; an output width the file leaves open is 0 until a backend resolves it.
pub(super) fn model_io(proto: &ModelProto) -> Result<ModelIo, BackendLoadError> {
    graph_io(proto).map(|(io, _)| io)
}

fn tensor_f32(t: &TensorProto) -> Result<(Vec<usize>, Vec<f32>), LowerError> {
    if t.data_type != ONNX_FLOAT {
        return err(LowerError::ConstantNotF32 {
            name: t.name.clone(),
        });
    }
    if !t.external_data.is_empty() {
        return err(LowerError::ConstantExternal {
            name: t.name.clone(),
        });
    }
    let dims: Vec<usize> = t.dims.iter().map(|&d| d.max(0) as usize).collect();
    let count: usize = dims.iter().product();
    let data: Vec<f32> = if !t.float_data.is_empty() {
        t.float_data.clone()
    } else {
        t.raw_data
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect()
    };
    if data.len() != count {
        return err(LowerError::ConstantSize {
            name: t.name.clone(),
            values: data.len(),
            dims,
        });
    }
    Ok((dims, data))
}

fn attr_f(node: &NodeProto, name: &str, default: f32) -> f32 {
    node.attribute
        .iter()
        .find(|a| a.name == name)
        .map_or(default, |a| a.f)
}

fn attr_i(node: &NodeProto, name: &str, default: i64) -> i64 {
    node.attribute
        .iter()
        .find(|a| a.name == name)
        .map_or(default, |a| a.i)
}

/// A per-output vector from a constant that broadcasts over `[batch, width]`.
fn broadcast_row(
    dims: &[usize],
    data: &[f32],
    width: usize,
    what: &str,
) -> Result<Vec<f32>, LowerError> {
    let n = data.len();
    let row_shaped = match dims {
        [] | [1] | [1, 1] => true,
        [w] | [1, w] => *w == width,
        _ => false,
    };
    if !row_shaped {
        return err(LowerError::Broadcast {
            what: what.to_string(),
            dims: dims.to_vec(),
            width,
        });
    }
    Ok(if n == 1 {
        vec![data[0]; width]
    } else {
        data.to_vec()
    })
}

struct Chain<'a> {
    constants: HashMap<&'a str, &'a TensorProto>,
    current: String,
    width: usize,
    layers: Vec<Dense>,
    input_activation: Activation,
}

impl<'a> Chain<'a> {
    fn constant(&self, name: &str) -> Result<(Vec<usize>, Vec<f32>), LowerError> {
        match self.constants.get(name) {
            Some(t) => tensor_f32(t),
            None => err(LowerError::NotConstant {
                name: name.to_string(),
            }),
        }
    }

    /// The last layer, if it can still absorb an affine op (no activation yet).
    fn open_layer(&mut self, op: &str) -> Result<&mut Dense, LowerError> {
        match self.layers.last_mut() {
            Some(l) if l.activation == Activation::Identity => Ok(l),
            _ => err(LowerError::NotAfterDense { op: op.to_string() }),
        }
    }

    fn dense(
        &mut self,
        weights_in_out: Vec<f32>,
        outputs: usize,
        bias: Vec<f32>,
    ) -> Result<(), LowerError> {
        if outputs == 0 {
            return err(LowerError::NoOutputs);
        }
        self.layers.push(Dense {
            inputs: self.width,
            outputs,
            weights: weights_in_out,
            bias,
            activation: Activation::Identity,
        });
        self.width = outputs;
        Ok(())
    }

    fn activation(&mut self, act: Activation, op: &str) -> Result<(), LowerError> {
        match self.layers.last_mut() {
            Some(l) if l.activation == Activation::Identity => l.activation = act,
            None if self.input_activation == Activation::Identity => self.input_activation = act,
            _ => return err(LowerError::DoubleActivation { op: op.to_string() }),
        }
        Ok(())
    }

    /// The constant operand of a binary op whose other operand is the current value.
    fn binary_constant(
        &self,
        node: &NodeProto,
    ) -> Result<(bool, Vec<usize>, Vec<f32>), LowerError> {
        match node.input.as_slice() {
            [a, b] if *a == self.current => self.constant(b).map(|(d, v)| (true, d, v)),
            [a, b] if *b == self.current => self.constant(a).map(|(d, v)| (false, d, v)),
            _ => err(LowerError::OffChain {
                op: node.op_type.clone(),
            }),
        }
    }

    fn node(&mut self, node: &NodeProto) -> Result<(), LowerError> {
        let op = node.op_type.as_str();
        if node.domain == crate::trees::ML_DOMAIN && matches!(op, "Scaler" | "LinearRegressor") {
            if node.input.first().map(String::as_str) != Some(self.current.as_str()) {
                return err(LowerError::OffChain { op: op.to_string() });
            }
            match op {
                "Scaler" => self.scaler(node)?,
                _ => self.linear_regressor(node)?,
            }
            return self.advance(node);
        }
        if !node.domain.is_empty() && node.domain != "ai.onnx" {
            return err(LowerError::ForeignDomain {
                op: op.to_string(),
                domain: node.domain.clone(),
            });
        }
        let first = node.input.first().map(String::as_str);
        let binary = matches!(op, "Add" | "Sub" | "Mul" | "Div");
        if !binary && first != Some(self.current.as_str()) {
            return err(LowerError::OffChain { op: op.to_string() });
        }
        match op {
            "Gemm" => {
                if attr_i(node, "transA", 0) != 0 {
                    return err(LowerError::Unsupported {
                        op: "Gemm",
                        rule: "with transA",
                    });
                }
                let (alpha, beta) = (attr_f(node, "alpha", 1.0), attr_f(node, "beta", 1.0));
                let (dims, b) = self.constant(node.input.get(1).map_or("", String::as_str))?;
                let [r, c] = dims[..] else {
                    return err(LowerError::Unsupported {
                        op: "Gemm",
                        rule: "weights are not 2-D",
                    });
                };
                let trans_b = attr_i(node, "transB", 0) != 0;
                let (inputs, outputs) = if trans_b { (c, r) } else { (r, c) };
                if inputs != self.width {
                    return err(LowerError::Width {
                        op: "Gemm",
                        inputs,
                        width: self.width,
                    });
                }
                let mut w = vec![0.0f32; inputs * outputs];
                for i in 0..inputs {
                    for j in 0..outputs {
                        let v = if trans_b {
                            b[j * inputs + i]
                        } else {
                            b[i * outputs + j]
                        };
                        w[i * outputs + j] = alpha * v;
                    }
                }
                let bias = match node.input.get(2).filter(|n| !n.is_empty()) {
                    Some(name) => {
                        let (d, v) = self.constant(name)?;
                        broadcast_row(&d, &v, outputs, "Gemm bias")?
                            .into_iter()
                            .map(|x| beta * x)
                            .collect()
                    }
                    None => vec![0.0; outputs],
                };
                self.dense(w, outputs, bias)?;
            }
            "MatMul" => {
                let (dims, b) = self.constant(node.input.get(1).map_or("", String::as_str))?;
                let [inputs, outputs] = dims[..] else {
                    return err(LowerError::Unsupported {
                        op: "MatMul",
                        rule: "weights are not 2-D",
                    });
                };
                if inputs != self.width {
                    return err(LowerError::Width {
                        op: "MatMul",
                        inputs,
                        width: self.width,
                    });
                }
                self.dense(b, outputs, vec![0.0; outputs])?;
            }
            "Add" | "Sub" | "Mul" | "Div" => {
                let (current_first, dims, c) = self.binary_constant(node)?;
                let width = self.width;
                let c = broadcast_row(&dims, &c, width, op)?;
                let layer = self.open_layer(op)?;
                match (op, current_first) {
                    ("Add", _) => layer.bias.iter_mut().zip(&c).for_each(|(b, c)| *b += c),
                    ("Sub", true) => layer.bias.iter_mut().zip(&c).for_each(|(b, c)| *b -= c),
                    ("Mul", _) => scale_columns(layer, &c),
                    ("Div", true) => {
                        let inv: Vec<f32> = c.iter().map(|c| 1.0 / c).collect();
                        scale_columns(layer, &inv);
                    }
                    _ => return err(LowerError::ConstantOnLeft { op: op.to_string() }),
                }
            }
            "BatchNormalization" => {
                if attr_i(node, "training_mode", 0) != 0
                    || (node.output.len() > 1 && node.output[1..].iter().any(|o| !o.is_empty()))
                {
                    return err(LowerError::Unsupported {
                        op: "BatchNormalization",
                        rule: "in training mode",
                    });
                }
                let eps = attr_f(node, "epsilon", 1e-5);
                let width = self.width;
                let mut params = Vec::new();
                for name in node.input.iter().skip(1).take(4) {
                    let (d, v) = self.constant(name)?;
                    params.push(broadcast_row(&d, &v, width, "BatchNormalization")?);
                }
                let [scale, bias, mean, var] = &params[..] else {
                    return err(LowerError::Unsupported {
                        op: "BatchNormalization",
                        rule: "without its four parameters",
                    });
                };
                let s: Vec<f32> = scale
                    .iter()
                    .zip(var)
                    .map(|(g, v)| g / (v + eps).sqrt())
                    .collect();
                let layer = self.open_layer(op)?;
                for j in 0..width {
                    layer.bias[j] = (layer.bias[j] - mean[j]) * s[j] + bias[j];
                }
                let outputs = layer.outputs;
                for (k, w) in layer.weights.iter_mut().enumerate() {
                    *w *= s[k % outputs];
                }
            }
            "Relu" => self.activation(Activation::Relu, op)?,
            "LeakyRelu" => {
                self.activation(Activation::LeakyRelu(attr_f(node, "alpha", 0.01)), op)?
            }
            "Sigmoid" => self.activation(Activation::Sigmoid, op)?,
            "Tanh" => self.activation(Activation::Tanh, op)?,
            "Gelu" => {
                let approximate = node
                    .attribute
                    .iter()
                    .find(|a| a.name == "approximate")
                    .map_or(&b"none"[..], |a| a.s.as_slice());
                match approximate {
                    b"none" => self.activation(Activation::Gelu, op)?,
                    b"tanh" => self.activation(Activation::GeluTanh, op)?,
                    other => {
                        return err(LowerError::GeluApproximate(
                            String::from_utf8_lossy(other).into_owned(),
                        ))
                    }
                }
            }
            "Identity" | "Dropout" => {}
            "Flatten" => {
                if attr_i(node, "axis", 1) != 1 {
                    return err(LowerError::Unsupported {
                        op: "Flatten",
                        rule: "with an axis other than 1",
                    });
                }
            }
            "Cast" => {
                // To float32 (skl2onnx writes one after a Scaler): the chain is float32 already.
                if attr_i(node, "to", 0) != i64::from(ONNX_FLOAT) {
                    return err(LowerError::Unsupported {
                        op: "Cast",
                        rule: "to a type other than float32",
                    });
                }
            }
            "Reshape" => {
                // To [-1, width] or [0, width] (skl2onnx ends an MLP with one): a no-op.
                let shape = node
                    .input
                    .get(1)
                    .and_then(|n| self.constants.get(n.as_str()))
                    .and_then(|t| crate::bounds::int64s(t));
                let keeps = matches!(shape.as_deref(), Some([b, w]) if (*b == -1 || *b == 0) && *w == self.width as i64);
                if !keeps {
                    return err(LowerError::Unsupported {
                        op: "Reshape",
                        rule: "to a shape other than [-1, width]",
                    });
                }
            }
            other => {
                return err(LowerError::OutsideMlpSet {
                    op: other.to_string(),
                })
            }
        }
        self.advance(node)
    }

    /// The chain's value is now `node`'s output.
    fn advance(&mut self, node: &NodeProto) -> Result<(), LowerError> {
        match node.output.first() {
            Some(out) if !out.is_empty() => {
                self.current = out.clone();
                Ok(())
            }
            _ => err(LowerError::NoOutput {
                op: node.op_type.clone(),
            }),
        }
    }

    /// ONNX-ML `Scaler`: `(x - offset) * scale` per feature, a diagonal layer (merged with its
    /// neighbours by [`merge_affine`]).
    fn scaler(&mut self, node: &NodeProto) -> Result<(), LowerError> {
        let floats = |name: &str| {
            node.attribute
                .iter()
                .find(|a| a.name == name)
                .map_or_else(Vec::new, |a| a.floats.clone())
        };
        let width = self.width;
        // Per feature, or one value for all; absent: `fill`.
        let per_feature = |name: &str, fill: f32| {
            let v = floats(name);
            if v.is_empty() {
                Ok(vec![fill; width])
            } else {
                broadcast_row(&[v.len()], &v, width, &format!("Scaler {name}"))
            }
        };
        let offset = per_feature("offset", 0.0)?;
        let scale = per_feature("scale", 1.0)?;
        let mut w = vec![0.0f32; width * width];
        for i in 0..width {
            w[i * width + i] = scale[i];
        }
        let bias: Vec<f32> = offset.iter().zip(&scale).map(|(o, s)| -o * s).collect();
        self.dense(w, width, bias)
    }

    /// ONNX-ML `LinearRegressor`: `x · coefficientsᵀ + intercepts` (post_transform NONE), a
    /// dense layer.
    fn linear_regressor(&mut self, node: &NodeProto) -> Result<(), LowerError> {
        let attribute = |name: &str| node.attribute.iter().find(|a| a.name == name);
        let post = attribute("post_transform").map_or(&b"NONE"[..], |a| a.s.as_slice());
        if post != b"NONE" {
            return err(LowerError::Unsupported {
                op: "LinearRegressor",
                rule: "with a post_transform",
            });
        }
        let coefficients = attribute("coefficients").map_or_else(Vec::new, |a| a.floats.clone());
        let targets = usize::try_from(attribute("targets").map_or(1, |a| a.i)).unwrap_or(0);
        let width = self.width;
        if targets == 0 || coefficients.len() != targets * width {
            return err(LowerError::Width {
                op: "LinearRegressor",
                inputs: coefficients.len() / targets.max(1),
                width,
            });
        }
        let intercepts = attribute("intercepts").map_or_else(Vec::new, |a| a.floats.clone());
        let bias = if intercepts.is_empty() {
            vec![0.0; targets]
        } else {
            broadcast_row(
                &[intercepts.len()],
                &intercepts,
                targets,
                "LinearRegressor intercepts",
            )?
        };
        // coefficients are [targets, inputs]; the layer's weights [inputs, outputs].
        let mut w = vec![0.0f32; width * targets];
        for j in 0..targets {
            for i in 0..width {
                w[i * targets + j] = coefficients[j * width + i];
            }
        }
        self.dense(w, targets, bias)
    }
}

/// Merges each layer without an activation into the layer after it (`(x·A + a)·B + b =
/// x·(A·B) + (a·B + b)`), so a scaler in front of a network costs nothing at run time.
fn merge_affine(layers: Vec<Dense>) -> Vec<Dense> {
    let mut out: Vec<Dense> = Vec::with_capacity(layers.len());
    for next in layers {
        match out.last() {
            // Only where it saves work (a scaler's diagonal in front of a layer; not a
            // bottleneck between two wide layers).
            Some(prev)
                if prev.activation == Activation::Identity
                    && prev.inputs * next.outputs
                        <= prev.inputs * prev.outputs + prev.outputs * next.outputs =>
            {
                let prev = out.pop().expect("a last layer");
                let (n, m, k) = (prev.inputs, prev.outputs, next.outputs);
                let mut weights = vec![0.0f32; n * k];
                for i in 0..n {
                    let row = &mut weights[i * k..(i + 1) * k];
                    for j in 0..m {
                        let a = prev.weights[i * m + j];
                        if a != 0.0 {
                            let next_row = &next.weights[j * k..(j + 1) * k];
                            row.iter_mut().zip(next_row).for_each(|(w, b)| *w += a * b);
                        }
                    }
                }
                let mut bias = next.bias.clone();
                for j in 0..m {
                    let next_row = &next.weights[j * k..(j + 1) * k];
                    let a = prev.bias[j];
                    bias.iter_mut().zip(next_row).for_each(|(b, w)| *b += a * w);
                }
                out.push(Dense {
                    inputs: n,
                    outputs: k,
                    weights,
                    bias,
                    activation: next.activation,
                });
            }
            _ => out.push(next),
        }
    }
    out
}

fn scale_columns(layer: &mut Dense, s: &[f32]) {
    let outputs = layer.outputs;
    for (k, w) in layer.weights.iter_mut().enumerate() {
        *w *= s[k % outputs];
    }
    layer.bias.iter_mut().zip(s).for_each(|(b, s)| *b *= s);
}

/// Lowers an MLP-shaped graph to an [`MlpPlan`].
///
/// # Errors
/// [`LowerError`] naming the first op or tensor outside the MLP set.
pub fn lower_mlp(proto: &ModelProto, io: &ModelIo) -> Result<MlpPlan, LowerError> {
    let graph: &GraphProto = proto.graph.as_ref().ok_or(LowerError::NoGraph)?;
    let mut chain = Chain {
        constants: graph
            .initializer
            .iter()
            .map(|t| (t.name.as_str(), t))
            .collect(),
        current: io.input_name.clone(),
        width: io.input_width,
        layers: Vec::new(),
        input_activation: Activation::Identity,
    };
    for node in &graph.node {
        if node.op_type == "Constant" {
            return err(LowerError::ConstantNode);
        }
        chain.node(node)?;
    }
    if chain.current != io.output_name {
        return err(LowerError::ChainEnd);
    }
    // A graph with a Scaler and no dense layer is elementwise: as a diagonal layer it would
    // spread a NaN feature over every output (0 · NaN), so it goes to tract.
    let has = |ops: &[&str]| graph.node.iter().any(|n| ops.contains(&n.op_type.as_str()));
    if has(&["Scaler"]) && !has(&["Gemm", "MatMul", "LinearRegressor"]) {
        return err(LowerError::Unsupported {
            op: "Scaler",
            rule: "in a graph without a dense layer",
        });
    }
    if io.output_width != 0 && chain.width != io.output_width {
        return err(LowerError::OutputWidth {
            chain: chain.width,
            declared: io.output_width,
        });
    }
    Ok(MlpPlan {
        input_width: io.input_width,
        layers: merge_affine(chain.layers),
        input_activation: chain.input_activation,
    })
}
