//! Bounds on what building a graph may allocate: a small ONNX file can ask for a huge tensor
//! (`ConstantOfShape [65536, 65536]`), which constant folding or the first inference would
//! make. Such a model is refused at load, naming the node and the size.

use tract_onnx::pb::{ModelProto, TensorProto};
use tract_onnx::prelude::*;
use tract_onnx::tract_core::internal::DimLike;

use crate::BackendLoadError;

/// The largest tensor a graph may make when its model config does not say
/// (`max_tensor_mb`): 1 GiB.
pub const DEFAULT_MAX_TENSOR_BYTES: u64 = 1 << 30;

/// ONNX `TensorProto.DataType` FLOAT, INT64 and DOUBLE.
pub(crate) const ONNX_FLOAT: i32 = 1;
pub(crate) const ONNX_INT64: i32 = 7;
const ONNX_DOUBLE: i32 = 11;

/// The raw bytes of `t` in `size`-byte little-endian elements (`None` when they do not divide).
fn raw_chunks(t: &TensorProto, size: usize) -> Option<std::slice::ChunksExact<'_, u8>> {
    t.raw_data
        .len()
        .is_multiple_of(size)
        .then(|| t.raw_data.chunks_exact(size))
}

/// The values of an INT64 constant tensor.
pub(crate) fn int64s(t: &TensorProto) -> Option<Vec<i64>> {
    if t.data_type != ONNX_INT64 {
        return None;
    }
    if !t.int64_data.is_empty() {
        return Some(t.int64_data.clone());
    }
    Some(
        raw_chunks(t, 8)?
            .map(|c| i64::from_le_bytes(c.try_into().expect("8 bytes")))
            .collect(),
    )
}

/// The values of a FLOAT or DOUBLE constant tensor.
pub(crate) fn floats(t: &TensorProto) -> Option<Vec<f64>> {
    match t.data_type {
        ONNX_FLOAT if !t.float_data.is_empty() => {
            Some(t.float_data.iter().map(|&v| f64::from(v)).collect())
        }
        ONNX_FLOAT => Some(
            raw_chunks(t, 4)?
                .map(|c| f64::from(f32::from_le_bytes(c.try_into().expect("4 bytes"))))
                .collect(),
        ),
        ONNX_DOUBLE if !t.double_data.is_empty() => Some(t.double_data.clone()),
        ONNX_DOUBLE => Some(
            raw_chunks(t, 8)?
                .map(|c| f64::from_le_bytes(c.try_into().expect("8 bytes")))
                .collect(),
        ),
        _ => None,
    }
}

/// The values of a constant tensor as numbers (integers and floats), when it holds them.
fn values(t: &TensorProto) -> Option<Vec<f64>> {
    int64s(t)
        .map(|v| v.into_iter().map(|v| v as f64).collect())
        .or_else(|| floats(t))
}

/// Bytes of one element of ONNX data type `code` (4 where unknown).
fn element_bytes(code: i32) -> u64 {
    match code {
        2..=3 | 9 => 1,
        4..=5 | 10 | 16 => 2,
        7 | 11 | 13 => 8,
        _ => 4,
    }
}

fn too_large(what: String, bytes: u128, max: u64) -> BackendLoadError {
    BackendLoadError::TooLarge(format!(
        "{what} would make a tensor of {:.1} MiB; the limit is {:.1} MiB (max_tensor_mb in the model's config.toml)",
        bytes as f64 / f64::from(1 << 20),
        max as f64 / f64::from(1 << 20)
    ))
}

/// The product of `dims` (each at least 1), saturating.
fn volume(dims: impl IntoIterator<Item = f64>) -> u128 {
    dims.into_iter().fold(1u128, |n, d| {
        let d = if d.is_nan() { 1.0 } else { d.clamp(1.0, 1e30) };
        n.saturating_mul(d as u128)
    })
}

/// What the graph's constants are known to hold, as [`check_proto`] follows them.
#[derive(Default)]
struct Known<'a> {
    /// Values of constant tensors (small ones: shapes, repeats, scalars).
    values: std::collections::HashMap<&'a str, Vec<f64>>,
    /// Shapes of constant tensors and of the graph's inputs (the batch dimension as 1).
    shapes: std::collections::HashMap<&'a str, Vec<f64>>,
}

impl<'a> Known<'a> {
    fn tensor(&mut self, name: &'a str, t: &TensorProto) {
        self.shapes
            .insert(name, t.dims.iter().map(|&d| d as f64).collect());
        if let Some(v) = values(t) {
            self.values.insert(name, v);
        }
    }

    fn value(&self, names: &[String], i: usize) -> Option<&Vec<f64>> {
        self.values.get(names.get(i)?.as_str())
    }

    /// Follows the values a node computes from known values (the ops shapes are made with).
    fn follow(&mut self, node: &'a tract_onnx::pb::NodeProto) {
        let Some(out) = node.output.first() else {
            return;
        };
        let attribute = |n: &str| node.attribute.iter().find(|a| a.name == n);
        let computed: Option<Vec<f64>> = match node.op_type.as_str() {
            "Constant" => {
                if let Some(t) = attribute("value").and_then(|a| a.t.as_ref()) {
                    self.tensor(out, t);
                    return;
                }
                attribute("value_ints")
                    .map(|a| a.ints.iter().map(|&v| v as f64).collect())
                    .or_else(|| attribute("value_int").map(|a| vec![a.i as f64]))
                    .or_else(|| {
                        attribute("value_floats")
                            .map(|a| a.floats.iter().map(|&v| f64::from(v)).collect())
                    })
                    .or_else(|| attribute("value_float").map(|a| vec![f64::from(a.f)]))
            }
            "Identity" | "Cast" | "Unsqueeze" | "Squeeze" | "Reshape" | "Flatten" => {
                self.value(&node.input, 0).cloned()
            }
            "Concat" => node
                .input
                .iter()
                .map(|i| self.values.get(i.as_str()).cloned())
                .collect::<Option<Vec<_>>>()
                .map(|parts| parts.concat()),
            "Add" | "Sub" | "Mul" | "Div" | "Max" | "Min" => {
                match (self.value(&node.input, 0), self.value(&node.input, 1)) {
                    (Some(a), Some(b)) if a.len() == b.len() || a.len() == 1 || b.len() == 1 => {
                        let n = a.len().max(b.len());
                        let at = |v: &Vec<f64>, i: usize| v[if v.len() == 1 { 0 } else { i }];
                        Some(
                            (0..n)
                                .map(|i| {
                                    let (x, y) = (at(a, i), at(b, i));
                                    match node.op_type.as_str() {
                                        "Add" => x + y,
                                        "Sub" => x - y,
                                        "Mul" => x * y,
                                        "Div" if y != 0.0 => x / y,
                                        "Max" => x.max(y),
                                        "Min" => x.min(y),
                                        _ => x,
                                    }
                                })
                                .collect(),
                        )
                    }
                    _ => None,
                }
            }
            _ => None,
        };
        if let Some(v) = computed {
            self.shapes.insert(out, vec![v.len() as f64]);
            self.values.insert(out, v);
        }
    }

    /// Elements of the tensor `node` makes, where its size follows from known constants.
    fn made(&self, node: &tract_onnx::pb::NodeProto) -> Option<u128> {
        let input = |i: usize| node.input.get(i).map(String::as_str);
        match node.op_type.as_str() {
            "ConstantOfShape" => Some(volume(self.value(&node.input, 0)?.iter().copied())),
            // At least as large as the shape asked for.
            "Expand" => Some(volume(self.value(&node.input, 1)?.iter().copied())),
            "Tile" => {
                let shape = self.shapes.get(input(0)?)?;
                let repeats = self.value(&node.input, 1)?;
                Some(volume(shape.iter().chain(repeats.iter()).copied()))
            }
            "Range" => {
                let scalar = |i| self.value(&node.input, i)?.first().copied();
                let (start, limit, delta) = (scalar(0)?, scalar(1)?, scalar(2)?);
                (delta != 0.0).then(|| volume([((limit - start) / delta).ceil()]))
            }
            _ => None,
        }
    }
}

/// Checks, before tract sees the graph, the nodes that make a tensor whose size follows from
/// constants (`ConstantOfShape`, `Expand`, `Tile`, `Range`, their shapes given directly or
/// computed from constants through `Constant`, `Identity`, `Cast`, `Concat`, `Unsqueeze`,
/// arithmetic): none may exceed `max` bytes. Sizes that depend on other computations are
/// checked on the typed graph ([`check_typed`]).
///
/// # Errors
/// [`BackendLoadError::TooLarge`] naming the node, its op and the size.
pub fn check_proto(proto: &ModelProto, max: u64) -> Result<(), BackendLoadError> {
    let Some(graph) = &proto.graph else {
        return Ok(());
    };
    let mut known = Known::default();
    for t in &graph.initializer {
        known.tensor(&t.name, t);
    }
    for node in &graph.node {
        if let Some(elements) = known.made(node) {
            let element = match node.op_type.as_str() {
                "ConstantOfShape" => node
                    .attribute
                    .iter()
                    .find(|a| a.name == "value")
                    .and_then(|a| a.t.as_ref())
                    .map_or(4, |t| element_bytes(t.data_type)),
                _ => 4,
            };
            let bytes = elements.saturating_mul(u128::from(element));
            if bytes > u128::from(max) {
                return Err(too_large(
                    format!("node {:?} ({})", node.name, node.op_type),
                    bytes,
                    max,
                ));
            }
        }
        known.follow(node);
    }
    Ok(())
}

/// Checks every tensor of the typed graph whose size is known (the batch dimension counted
/// as one row): none may exceed `max` bytes.
///
/// # Errors
/// [`BackendLoadError::TooLarge`] naming the node, its shape and the size.
pub fn check_typed(model: &TypedModel, max: u64) -> Result<(), BackendLoadError> {
    for node in model.nodes() {
        for output in &node.outputs {
            let fact = &output.fact;
            let elements = fact.shape.iter().fold(1u128, |n, d| {
                n.saturating_mul(d.to_usize().map_or(1, |d| d.max(1)) as u128)
            });
            let bytes = elements.saturating_mul(fact.datum_type.size_of() as u128);
            if bytes > u128::from(max) {
                return Err(too_large(
                    format!(
                        "node {:?} ({} of shape {:?})",
                        node.name,
                        node.op.name(),
                        fact.shape
                    ),
                    bytes,
                    max,
                ));
            }
        }
    }
    Ok(())
}
