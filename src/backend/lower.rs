//! Lowering of ONNX graphs: their I/O ([`model_io`]) and, for MLP-shaped graphs, an
//! [`MlpPlan`] ([`lower_mlp`]).
//!
//! An MLP-shaped graph is a single chain from the input to the output of these ops:
//! `Gemm`, `MatMul` (constant right operand), `Add`/`Sub`/`Mul`/`Div` by a constant (folded into
//! the preceding layer), `BatchNormalization` (folded into the preceding layer), `Relu`,
//! `LeakyRelu`, `Sigmoid`, `Tanh`, `Gelu` (fused into the preceding layer), `Identity`, `Dropout` and
//! `Flatten` of a `[batch, n]` value (no-ops). Anything else is served by tract.

use std::collections::HashMap;

use tract_onnx::pb::{self, type_proto, GraphProto, ModelProto, NodeProto, TensorProto};

use super::mlp::{Activation, Dense, MlpPlan};
use super::{BackendLoadError, ModelIo};

/// Why a graph is not an MLP (the reason names the op or tensor).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct LowerError(pub String);

fn err<T>(msg: impl Into<String>) -> Result<T, LowerError> {
    Err(LowerError(msg.into()))
}

const ONNX_FLOAT: i32 = 1;

/// A `[batch, n]` f32 value's name and `n` (`None` when the file does not fix it).
fn value_2d(v: &pb::ValueInfoProto) -> Result<(String, Option<usize>), String> {
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
        return err(format!("constant {:?} is not float32", t.name));
    }
    if !t.external_data.is_empty() {
        return err(format!("constant {:?} is stored outside the file", t.name));
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
        return err(format!(
            "constant {:?} has {} values for shape {dims:?}",
            t.name,
            data.len()
        ));
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
        return err(format!(
            "{what} constant of shape {dims:?} does not broadcast over width {width}"
        ));
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
            None => err(format!("{name:?} is not a constant")),
        }
    }

    /// The last layer, if it can still absorb an affine op (no activation yet).
    fn open_layer(&mut self, op: &str) -> Result<&mut Dense, LowerError> {
        match self.layers.last_mut() {
            Some(l) if l.activation == Activation::Identity => Ok(l),
            _ => err(format!("{op} is not directly after a dense layer")),
        }
    }

    fn dense(
        &mut self,
        weights_in_out: Vec<f32>,
        outputs: usize,
        bias: Vec<f32>,
    ) -> Result<(), LowerError> {
        if outputs == 0 {
            return err("a dense layer with no outputs");
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
            _ => return err(format!("{op} follows another activation")),
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
            _ => err(format!("{} does not take the chain's value", node.op_type)),
        }
    }

    fn node(&mut self, node: &NodeProto) -> Result<(), LowerError> {
        let op = node.op_type.as_str();
        if !node.domain.is_empty() && node.domain != "ai.onnx" {
            return err(format!("op {op} of domain {:?}", node.domain));
        }
        let first = node.input.first().map(String::as_str);
        let binary = matches!(op, "Add" | "Sub" | "Mul" | "Div");
        if !binary && first != Some(self.current.as_str()) {
            return err(format!("{op} does not take the chain's value"));
        }
        match op {
            "Gemm" => {
                if attr_i(node, "transA", 0) != 0 {
                    return err("Gemm with transA");
                }
                let (alpha, beta) = (attr_f(node, "alpha", 1.0), attr_f(node, "beta", 1.0));
                let (dims, b) = self.constant(node.input.get(1).map_or("", String::as_str))?;
                let [r, c] = dims[..] else {
                    return err("Gemm weights are not 2-D");
                };
                let trans_b = attr_i(node, "transB", 0) != 0;
                let (inputs, outputs) = if trans_b { (c, r) } else { (r, c) };
                if inputs != self.width {
                    return err(format!(
                        "Gemm expects {inputs} inputs, the chain has {}",
                        self.width
                    ));
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
                    return err("MatMul weights are not 2-D");
                };
                if inputs != self.width {
                    return err(format!(
                        "MatMul expects {inputs} inputs, the chain has {}",
                        self.width
                    ));
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
                    _ => return err(format!("{op} with the constant on the left")),
                }
            }
            "BatchNormalization" => {
                if attr_i(node, "training_mode", 0) != 0
                    || (node.output.len() > 1 && node.output[1..].iter().any(|o| !o.is_empty()))
                {
                    return err("BatchNormalization in training mode");
                }
                let eps = attr_f(node, "epsilon", 1e-5);
                let width = self.width;
                let mut params = Vec::new();
                for name in node.input.iter().skip(1).take(4) {
                    let (d, v) = self.constant(name)?;
                    params.push(broadcast_row(&d, &v, width, "BatchNormalization")?);
                }
                let [scale, bias, mean, var] = &params[..] else {
                    return err("BatchNormalization without its four parameters");
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
                        return err(format!(
                            "Gelu with approximate = {:?}",
                            String::from_utf8_lossy(other)
                        ))
                    }
                }
            }
            "Identity" | "Dropout" => {}
            "Flatten" => {
                if attr_i(node, "axis", 1) != 1 {
                    return err("Flatten with an axis other than 1");
                }
            }
            other => return err(format!("op {other} is outside the MLP set")),
        }
        match node.output.first() {
            Some(out) if !out.is_empty() => self.current = out.clone(),
            _ => return err(format!("{op} has no output")),
        }
        Ok(())
    }
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
    let graph: &GraphProto = proto
        .graph
        .as_ref()
        .ok_or_else(|| LowerError("no graph".into()))?;
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
            return err("op Constant (constants must be initializers)");
        }
        chain.node(node)?;
    }
    if chain.current != io.output_name {
        return err("the chain does not end at the graph's output");
    }
    if io.output_width != 0 && chain.width != io.output_width {
        return err(format!(
            "the chain has width {}, the output declares {}",
            chain.width, io.output_width
        ));
    }
    Ok(MlpPlan {
        input_width: io.input_width,
        layers: chain.layers,
        input_activation: chain.input_activation,
    })
}
