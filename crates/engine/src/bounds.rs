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

/// ONNX `TensorProto.DataType` INT64.
const ONNX_INT64: i32 = 7;

/// The values of an INT64 constant tensor.
fn int64_values(t: &TensorProto) -> Option<Vec<i64>> {
    if t.data_type != ONNX_INT64 {
        return None;
    }
    if !t.int64_data.is_empty() {
        return Some(t.int64_data.clone());
    }
    if !t.raw_data.len().is_multiple_of(8) {
        return None;
    }
    Some(
        t.raw_data
            .chunks_exact(8)
            .map(|c| i64::from_le_bytes(c.try_into().expect("8 bytes")))
            .collect(),
    )
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

/// Checks, before tract sees the graph, the nodes that make a tensor of a shape given as a
/// constant (`ConstantOfShape`, `Expand`): none may exceed `max` bytes.
///
/// # Errors
/// [`BackendLoadError::TooLarge`] naming the node, its shape and the size.
pub fn check_proto(proto: &ModelProto, max: u64) -> Result<(), BackendLoadError> {
    let Some(graph) = &proto.graph else {
        return Ok(());
    };
    let mut constants: std::collections::HashMap<&str, &TensorProto> = graph
        .initializer
        .iter()
        .map(|t| (t.name.as_str(), t))
        .collect();
    for node in graph.node.iter().filter(|n| n.op_type == "Constant") {
        let value = node.attribute.iter().find(|a| a.name == "value");
        if let (Some(out), Some(t)) = (node.output.first(), value.and_then(|a| a.t.as_ref())) {
            constants.insert(out.as_str(), t);
        }
    }
    for node in &graph.node {
        let (shape_input, element) = match node.op_type.as_str() {
            "ConstantOfShape" => {
                let value = node.attribute.iter().find(|a| a.name == "value");
                let dt = value.and_then(|a| a.t.as_ref()).map_or(1, |t| t.data_type);
                (0, element_bytes(dt))
            }
            "Expand" => (1, 4),
            _ => continue,
        };
        let Some(shape) = node
            .input
            .get(shape_input)
            .and_then(|name| constants.get(name.as_str()))
            .and_then(|t| int64_values(t))
        else {
            continue;
        };
        let elements = shape
            .iter()
            .fold(1u128, |n, &d| n.saturating_mul(d.max(1) as u128));
        let bytes = elements.saturating_mul(u128::from(element));
        if bytes > u128::from(max) {
            return Err(too_large(
                format!("node {:?} ({} of shape {shape:?})", node.name, node.op_type),
                bytes,
                max,
            ));
        }
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
