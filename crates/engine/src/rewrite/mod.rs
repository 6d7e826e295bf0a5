//! Graphs rewritten before an engine sees them, into ops that engine runs:
//! - [`recurrent`]: `GRU`, `LSTM` and `RNN` unrolled over their window (for tract);
//! - [`onnx_ml`]: the ONNX-ML preprocessing and linear ops scikit-learn pipelines put around a
//!   model (`Scaler`, `Normalizer`, `Binarizer`, `Imputer`, `LinearRegressor`,
//!   `LinearClassifier`, `ArrayFeatureExtractor`) as ONNX's own ops, and a classifier's
//!   probabilities chosen as the served output.

use std::collections::HashMap;

use tract_onnx::pb::attribute_proto::AttributeType;
use tract_onnx::pb::{AttributeProto, NodeProto, TensorProto};

pub(crate) mod onnx_ml;
pub(crate) mod recurrent;

use crate::bounds::{ONNX_FLOAT, ONNX_INT64};
use crate::trees::unsupported;
use crate::BackendLoadError;

/// The prefix of every name a rewrite makes.
pub(crate) const PREFIX: &str = "tie.";

/// Refuses a graph that already names a value with [`PREFIX`], so that the names a rewrite
/// makes cannot collide with the graph's own.
pub(crate) fn check_names(graph: &tract_onnx::pb::GraphProto) -> Result<(), BackendLoadError> {
    let names = graph
        .node
        .iter()
        .flat_map(|n| n.input.iter().chain(&n.output))
        .chain(graph.initializer.iter().map(|t| &t.name));
    match names.into_iter().find(|n| n.starts_with(PREFIX)) {
        Some(n) => Err(unsupported(format!(
            "the graph names a value {n:?}: names starting with {PREFIX:?} are kept for tie's rewrites"
        ))),
        None => Ok(()),
    }
}

pub(crate) fn int_attribute(name: &str, value: i64) -> AttributeProto {
    AttributeProto {
        name: name.into(),
        r#type: AttributeType::Int as i32,
        i: value,
        ..Default::default()
    }
}

pub(crate) fn ints_attribute(name: &str, values: &[i64]) -> AttributeProto {
    AttributeProto {
        name: name.into(),
        r#type: AttributeType::Ints as i32,
        ints: values.to_vec(),
        ..Default::default()
    }
}

/// Collects the nodes and constants of a rewritten graph, naming new values uniquely (under
/// [`PREFIX`], which [`check_names`] keeps out of the graphs it takes).
#[derive(Default)]
pub(crate) struct Emitter {
    pub(crate) nodes: Vec<NodeProto>,
    pub(crate) constants: Vec<TensorProto>,
    /// Prefix of the names made for the op being rewritten.
    pub(crate) prefix: String,
    count: usize,
    /// The int64 scalars made so far, by value.
    scalars: HashMap<i64, String>,
}

impl Emitter {
    pub(crate) fn fresh(&mut self, what: &str) -> String {
        self.count += 1;
        format!("{}{what}{}", self.prefix, self.count)
    }

    /// Adds `op` and returns its (new) output's name.
    pub(crate) fn op(
        &mut self,
        op: &str,
        inputs: &[&str],
        attribute: Vec<AttributeProto>,
    ) -> String {
        let output = self.fresh(op);
        self.op_into(op, inputs, attribute, &output);
        output
    }

    /// Adds `op` writing `output`.
    pub(crate) fn op_into(
        &mut self,
        op: &str,
        inputs: &[&str],
        attribute: Vec<AttributeProto>,
        output: &str,
    ) {
        self.nodes.push(NodeProto {
            op_type: op.into(),
            name: format!("{output}.node"),
            input: inputs.iter().map(|s| (*s).to_string()).collect(),
            output: vec![output.into()],
            attribute,
            ..Default::default()
        });
    }

    pub(crate) fn concat(&mut self, parts: &[String], axis: i64) -> String {
        if parts.len() == 1 {
            return parts[0].clone();
        }
        let inputs: Vec<&str> = parts.iter().map(String::as_str).collect();
        self.op("Concat", &inputs, vec![int_attribute("axis", axis)])
    }

    pub(crate) fn constant_f32(&mut self, dims: &[usize], values: &[f32]) -> String {
        let name = self.fresh("const");
        self.constants.push(TensorProto {
            name: name.clone(),
            dims: dims.iter().map(|&d| d as i64).collect(),
            data_type: ONNX_FLOAT,
            float_data: values.to_vec(),
            ..Default::default()
        });
        name
    }

    pub(crate) fn constant_i64(&mut self, dims: &[usize], values: &[i64]) -> String {
        let name = self.fresh("const");
        self.constants.push(TensorProto {
            name: name.clone(),
            dims: dims.iter().map(|&d| d as i64).collect(),
            data_type: ONNX_INT64,
            int64_data: values.to_vec(),
            ..Default::default()
        });
        name
    }

    pub(crate) fn scalar_i64(&mut self, value: i64) -> String {
        if let Some(name) = self.scalars.get(&value) {
            return name.clone();
        }
        let name = self.constant_i64(&[], &[value]);
        self.scalars.insert(value, name.clone());
        name
    }
}
