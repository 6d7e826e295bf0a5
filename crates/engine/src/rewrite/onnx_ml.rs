//! The ONNX-ML ops that scikit-learn pipelines put around a model (skl2onnx), rewritten into
//! ONNX's own ops so that tract runs the graph, and a classifier's probabilities chosen as the
//! served output.
//!
//! - [`serve_probabilities`]: a classifier's graph has two outputs, the label and the
//!   probabilities (a tensor, or `ZipMap`'s map of it); the probability tensor is served and
//!   the nodes only the label (or the map) needs are dropped.
//! - [`rewrite`]: `Scaler`, `Normalizer` (MAX, L1, L2), `Binarizer`, `Imputer` (float values),
//!   `LinearRegressor` and `LinearClassifier` (post-transforms NONE, LOGISTIC, SOFTMAX) and
//!   `ArrayFeatureExtractor` become plain ops. Their answers follow onnxruntime's where ONNX
//!   leaves them open: a zero norm leaves the row as it is; a linear classifier with one score
//!   and two class labels answers `[1 - s, s]` (`[σ(-s), σ(s)]` under LOGISTIC).
//!
//! Ops of the domain not listed are left in place, for the caller to refuse by name.

use std::collections::{HashMap, HashSet};

use tract_onnx::pb::tensor_shape_proto::{dimension, Dimension};
use tract_onnx::pb::{
    type_proto, ModelProto, NodeProto, OperatorSetIdProto, TensorProto, TensorShapeProto,
    TypeProto, ValueInfoProto,
};

use super::{int_attribute, Emitter};
use crate::attributes::{labels_of, Attributes};
use crate::trees::{unsupported, ML_DOMAIN};
use crate::BackendLoadError;

use crate::bounds::{ONNX_FLOAT, ONNX_INT64};

const ONNX_INT32: i32 = 6;
const ONNX_STRING: i32 = 8;

fn is_ml(node: &NodeProto, op: &str) -> bool {
    node.domain == ML_DOMAIN && node.op_type == op
}

/// The element type of a tensor value (`None` for a sequence or map: tract's protobuf
/// types keep only tensor types).
fn elem_type(v: &ValueInfoProto) -> Option<i32> {
    let type_proto::Value::TensorType(t) = v.r#type.as_ref()?.value.as_ref()?;
    Some(t.elem_type)
}

/// For a classifier's graph (two outputs: a label tensor, and the probabilities as a float
/// tensor or as `ZipMap`'s map of one), the graph with the probability tensor as its only
/// output and without the nodes it does not need, and a note for the output's description.
/// `None` for any other graph.
pub(crate) fn serve_probabilities(proto: &ModelProto) -> Option<(ModelProto, String)> {
    let graph = proto.graph.as_ref()?;
    // A classifier: an ONNX-ML classifier op, or a label made by ArgMax.
    let classifies = graph.node.iter().any(|n| {
        (n.domain == ML_DOMAIN && n.op_type.ends_with("Classifier")) || n.op_type == "ArgMax"
    });
    if graph.output.len() != 2 || !classifies {
        return None;
    }
    let producer = |name: &str| {
        graph
            .node
            .iter()
            .find(|n| n.output.iter().any(|o| o == name))
    };
    let mut probabilities: Option<(ValueInfoProto, Option<&NodeProto>)> = None;
    let mut labels = Vec::new();
    for output in &graph.output {
        let made_by = producer(&output.name);
        match (made_by, elem_type(output)) {
            (Some(n), _) if is_ml(n, "ZipMap") && probabilities.is_none() => {
                let value = ValueInfoProto {
                    name: n.input.first()?.clone(),
                    r#type: Some(float_matrix(labels_of(n).map(|l| l.len()))),
                    ..Default::default()
                };
                probabilities = Some((value, Some(n)));
            }
            (_, Some(ONNX_FLOAT)) if probabilities.is_none() => {
                probabilities = Some((output.clone(), None));
            }
            (_, Some(ONNX_INT64 | ONNX_INT32 | ONNX_STRING)) => labels.push(output.name.clone()),
            _ => return None,
        }
    }
    let (served, zipmap) = probabilities?;
    let [label] = labels.as_slice() else {
        return None;
    };
    // Keep the nodes the probabilities need, in their order.
    let mut needed: HashSet<&str> = HashSet::from([served.name.as_str()]);
    let mut keep = vec![false; graph.node.len()];
    for (i, node) in graph.node.iter().enumerate().rev() {
        if node.output.iter().any(|o| needed.contains(o.as_str())) {
            keep[i] = true;
            needed.extend(node.input.iter().map(String::as_str));
        }
    }
    let class_labels = zipmap.and_then(labels_of).or_else(|| {
        graph
            .node
            .iter()
            .zip(&keep)
            .filter(|(_, k)| **k)
            .find_map(|(n, _)| labels_of(n))
    });
    let note = format!(
        "class probabilities or scores, as the graph computes them (its tensor {:?}){}{}; the label output {label} is not served",
        served.name,
        class_labels.map_or(String::new(), |l| format!(", for class labels [{}]", l.join(", "))),
        if zipmap.is_some() {
            " (served as a tensor, not as ZipMap's map)"
        } else {
            ""
        },
    );
    let mut proto = proto.clone();
    let g = proto.graph.as_mut().expect("checked above");
    g.node = g
        .node
        .drain(..)
        .zip(keep)
        .filter_map(|(n, k)| k.then_some(n))
        .collect();
    g.output = vec![served];
    Some((proto, note))
}

/// A float `[N, width]` tensor type (`width` unknown: symbolic).
fn float_matrix(width: Option<usize>) -> TypeProto {
    let dim = |value| Dimension {
        value: Some(value),
        ..Default::default()
    };
    let width = match width {
        Some(w) => dimension::Value::DimValue(w as i64),
        None => dimension::Value::DimParam("classes".into()),
    };
    TypeProto {
        value: Some(type_proto::Value::TensorType(type_proto::Tensor {
            elem_type: ONNX_FLOAT,
            shape: Some(TensorShapeProto {
                dim: vec![dim(dimension::Value::DimParam("N".into())), dim(width)],
            }),
        })),
        ..Default::default()
    }
}

/// `proto` (whose input is `[N, input_width]`) with its ONNX-ML preprocessing and linear ops
/// as ONNX's own ops, or `None` when it has none.
///
/// # Errors
/// [`BackendLoadError::UnsupportedOp`] for such an op with attributes this does not rewrite
/// (named with the rule), a classifier whose label output the graph uses, indices of
/// ArrayFeatureExtractor that are not constants within the width they read, or a graph that
/// uses the names rewrites make.
pub(crate) fn rewrite(
    proto: &ModelProto,
    input_width: usize,
) -> Result<Option<ModelProto>, BackendLoadError> {
    const OPS: [&str; 7] = [
        "Scaler",
        "Normalizer",
        "Binarizer",
        "Imputer",
        "LinearRegressor",
        "LinearClassifier",
        "ArrayFeatureExtractor",
    ];
    let Some(graph) = proto.graph.as_ref() else {
        return Ok(None);
    };
    if !graph
        .node
        .iter()
        .any(|n| n.domain == ML_DOMAIN && OPS.contains(&n.op_type.as_str()))
    {
        return Ok(None);
    }
    let opset = proto
        .opset_import
        .iter()
        .find(|o| o.domain.is_empty() || o.domain == "ai.onnx")
        .map(|o| o.version);
    super::check_names(graph)?;
    let mut out = Emitter::default();
    let used: HashSet<&str> = graph
        .node
        .iter()
        .flat_map(|n| n.input.iter())
        .chain(graph.output.iter().map(|o| &o.name))
        .map(String::as_str)
        .collect();
    let constants: HashMap<&str, &TensorProto> = graph
        .initializer
        .iter()
        .map(|t| (t.name.as_str(), t))
        .collect();
    // The widths of `[N, width]` values, as far as they are known (for the bounds of
    // ArrayFeatureExtractor's indices).
    let mut widths: HashMap<String, usize> = HashMap::new();
    if let Some(input) = graph
        .input
        .iter()
        .find(|i| !constants.contains_key(i.name.as_str()))
    {
        widths.insert(input.name.clone(), input_width);
    }
    for (k, node) in graph.node.iter().enumerate() {
        let width_in = node.input.first().and_then(|i| widths.get(i)).copied();
        if node.domain != ML_DOMAIN || !OPS.contains(&node.op_type.as_str()) {
            let a = Attributes::of(node);
            let width = match node.op_type.as_str() {
                "Identity" | "Cast" => width_in,
                "Concat" if matches!(a.int("axis", 0), 1 | -1) => node
                    .input
                    .iter()
                    .map(|i| widths.get(i).copied())
                    .sum::<Option<usize>>(),
                _ => None,
            };
            if let (Some(w), Some(o)) = (width, node.output.first()) {
                widths.insert(o.clone(), w);
            }
            out.nodes.push(node.clone());
            continue;
        }
        out.prefix = format!("{}ml{k}.", super::PREFIX);
        let op = Op {
            node,
            name: format!("{} {:?}", node.op_type, node.name),
            attributes: Attributes::of(node),
            opset: opset.unwrap_or(13),
        };
        // The output written and its width.
        let (output, width) = match node.op_type.as_str() {
            "Scaler" => (0, op.scaler(&mut out).map(|()| width_in)?),
            "Normalizer" => (0, op.normalizer(&mut out).map(|()| width_in)?),
            "Binarizer" => (0, op.binarizer(&mut out).map(|()| width_in)?),
            "Imputer" => (0, op.imputer(&mut out).map(|()| width_in)?),
            "LinearRegressor" => (0, Some(op.linear_regressor(&mut out)?)),
            "LinearClassifier" => (1, Some(op.linear_classifier(&mut out, &used)?)),
            _ => (
                0,
                Some(op.array_feature_extractor(&mut out, &constants, width_in)?),
            ),
        };
        if let (Some(w), Some(o)) = (width, op.output(output)) {
            widths.insert(o.to_string(), w);
        }
    }
    let mut proto = proto.clone();
    if opset.is_none() {
        proto.opset_import.push(OperatorSetIdProto {
            domain: String::new(),
            version: 13,
        });
    }
    let g = proto.graph.as_mut().expect("checked above");
    g.node = out.nodes;
    g.initializer.extend(out.constants);
    Ok(Some(proto))
}

/// `1 / (1 + e^-x)`, written out: tract's `Sigmoid` answers NaN with 0 or 1, where
/// onnxruntime's logistic answers NaN.
fn logistic(out: &mut Emitter, x: &str) -> String {
    let one = out.constant_f32(&[], &[1.0]);
    let neg = out.op("Neg", &[x], vec![]);
    let exp = out.op("Exp", &[&neg], vec![]);
    let den = out.op("Add", &[&one, &exp], vec![]);
    out.op("Div", &[&one, &den], vec![])
}

/// One ONNX-ML node being rewritten.
struct Op<'a> {
    node: &'a NodeProto,
    /// Its op and name, for errors.
    name: String,
    attributes: Attributes<'a>,
    /// The graph's version of ONNX's own ops.
    opset: i64,
}

impl Op<'_> {
    fn input(&self) -> Result<&str, BackendLoadError> {
        self.node
            .input
            .first()
            .map(String::as_str)
            .ok_or_else(|| unsupported(format!("{} has no input", self.name)))
    }

    fn output(&self, k: usize) -> Option<&str> {
        self.node
            .output
            .get(k)
            .map(String::as_str)
            .filter(|s| !s.is_empty())
    }

    fn floats(&self, name: &str) -> Result<Vec<f32>, BackendLoadError> {
        Ok(self
            .attributes
            .floats(name)?
            .into_iter()
            .map(|v| v as f32)
            .collect())
    }

    fn post_transform(&self) -> String {
        String::from_utf8_lossy(self.attributes.string("post_transform", "NONE")).into_owned()
    }

    /// Writes `value` into the node's first output.
    fn finish(&self, out: &mut Emitter, value: &str) {
        if let Some(y) = self.output(0) {
            out.op_into("Identity", &[value], vec![], y);
        }
    }

    /// `(x - offset) * scale`, per feature (or one value for all).
    fn scaler(&self, out: &mut Emitter) -> Result<(), BackendLoadError> {
        let mut value = self.input()?.to_string();
        let offset = self.floats("offset")?;
        if !offset.is_empty() {
            let c = out.constant_f32(&[offset.len()], &offset);
            value = out.op("Sub", &[&value, &c], vec![]);
        }
        let scale = self.floats("scale")?;
        if !scale.is_empty() {
            let c = out.constant_f32(&[scale.len()], &scale);
            value = out.op("Mul", &[&value, &c], vec![]);
        }
        self.finish(out, &value);
        Ok(())
    }

    /// A reduction over the features (axis 1), keeping the axis; `axes` is an input from
    /// opset 13 (ReduceSum) or 18 (the others).
    fn reduce(&self, out: &mut Emitter, op: &str, x: &str) -> String {
        let axes_as_input = self.opset >= if op == "ReduceSum" { 13 } else { 18 };
        if axes_as_input {
            let axes = out.constant_i64(&[1], &[1]);
            out.op(op, &[x, &axes], vec![int_attribute("keepdims", 1)])
        } else {
            out.op(
                op,
                &[x],
                vec![
                    super::ints_attribute("axes", &[1]),
                    int_attribute("keepdims", 1),
                ],
            )
        }
    }

    /// `x / norm(x)` per row; a row whose norm is 0 is left as it is. L2 is computed as
    /// onnxruntime does (`±sqrt(x² / Σx²)`, so that an overflowing row is NaN, not 0).
    fn normalizer(&self, out: &mut Emitter) -> Result<(), BackendLoadError> {
        let x = self.input()?;
        let zero = out.constant_f32(&[], &[0.0]);
        let (norm, normalized) = match self.attributes.string("norm", "MAX") {
            b"MAX" => {
                // As onnxruntime, a NaN is not a row's maximum.
                let nan = out.op("IsNaN", &[x], vec![]);
                let lowest = out.constant_f32(&[], &[f32::MIN]);
                let finite = out.op("Where", &[&nan, &lowest, x], vec![]);
                let max = self.reduce(out, "ReduceMax", &finite);
                let y = out.op("Div", &[x, &max], vec![]);
                (max, y)
            }
            b"L1" => {
                let abs = out.op("Abs", &[x], vec![]);
                let sum = self.reduce(out, "ReduceSum", &abs);
                let y = out.op("Div", &[x, &sum], vec![]);
                (sum, y)
            }
            b"L2" => {
                let squares = out.op("Mul", &[x, x], vec![]);
                let sum = self.reduce(out, "ReduceSum", &squares);
                let share = out.op("Div", &[&squares, &sum], vec![]);
                let root = out.op("Sqrt", &[&share], vec![]);
                let negative = out.op("Less", &[x, &zero], vec![]);
                let minus = out.op("Neg", &[&root], vec![]);
                let y = out.op("Where", &[&negative, &minus, &root], vec![]);
                (sum, y)
            }
            other => {
                return Err(unsupported(format!(
                    "{}: norm {:?}",
                    self.name,
                    String::from_utf8_lossy(other)
                )))
            }
        };
        let is_zero = out.op("Equal", &[&norm, &zero], vec![]);
        let y = out.op("Where", &[&is_zero, x, &normalized], vec![]);
        self.finish(out, &y);
        Ok(())
    }

    /// 1 where `x > threshold`, else 0; NaN stays NaN.
    fn binarizer(&self, out: &mut Emitter) -> Result<(), BackendLoadError> {
        let x = self.input()?;
        let threshold = self.attributes.float("threshold", 0.0);
        let t = out.constant_f32(&[], &[threshold]);
        let one = out.constant_f32(&[], &[1.0]);
        let zero = out.constant_f32(&[], &[0.0]);
        let above = out.op("Greater", &[x, &t], vec![]);
        let bits = out.op("Where", &[&above, &one, &zero], vec![]);
        let nan = out.op("IsNaN", &[x], vec![]);
        let y = out.op("Where", &[&nan, x, &bits], vec![]);
        self.finish(out, &y);
        Ok(())
    }

    /// The replaced value (NaN, or `replaced_value_float`) becomes the imputed one, per
    /// feature (or one value for all).
    fn imputer(&self, out: &mut Emitter) -> Result<(), BackendLoadError> {
        let x = self.input()?;
        let imputed = self.floats("imputed_value_floats")?;
        if imputed.is_empty() {
            return Err(unsupported(format!(
                "{}: only imputed_value_floats (float features) is supported",
                self.name
            )));
        }
        let replaced = self.attributes.float("replaced_value_float", 0.0);
        let hit = if replaced.is_nan() {
            out.op("IsNaN", &[x], vec![])
        } else {
            let r = out.constant_f32(&[], &[replaced]);
            out.op("Equal", &[x, &r], vec![])
        };
        let values = out.constant_f32(&[imputed.len()], &imputed);
        let y = out.op("Where", &[&hit, &values, x], vec![]);
        self.finish(out, &y);
        Ok(())
    }

    /// `x · coefficientsᵀ + intercepts`, `[N, targets]`.
    fn affine(&self, out: &mut Emitter, targets: usize) -> Result<String, BackendLoadError> {
        let x = self.input()?;
        let coefficients = self.floats("coefficients")?;
        let features = coefficients.len() / targets.max(1);
        if targets == 0 || features == 0 || features * targets != coefficients.len() {
            return Err(unsupported(format!(
                "{}: {} coefficients for {targets} targets",
                self.name,
                coefficients.len()
            )));
        }
        let mut transposed = vec![0.0; coefficients.len()];
        for t in 0..targets {
            for f in 0..features {
                transposed[f * targets + t] = coefficients[t * features + f];
            }
        }
        let w = out.constant_f32(&[features, targets], &transposed);
        let mut y = out.op("MatMul", &[x, &w], vec![]);
        let intercepts = self.floats("intercepts")?;
        if !intercepts.is_empty() {
            if intercepts.len() != targets {
                return Err(unsupported(format!(
                    "{}: {} intercepts for {targets} targets",
                    self.name,
                    intercepts.len()
                )));
            }
            let b = out.constant_f32(&[targets], &intercepts);
            y = out.op("Add", &[&y, &b], vec![]);
        }
        Ok(y)
    }

    /// Returns the width written (the targets).
    fn linear_regressor(&self, out: &mut Emitter) -> Result<usize, BackendLoadError> {
        let post = self.post_transform();
        if post != "NONE" {
            return Err(unsupported(format!("{}: post_transform {post}", self.name)));
        }
        let targets = usize::try_from(self.attributes.int("targets", 1)).unwrap_or(0);
        let y = self.affine(out, targets)?;
        self.finish(out, &y);
        Ok(targets)
    }

    /// The scores output (the second); the label output is not computed, so nothing in the
    /// graph may read it. Returns the width written.
    fn linear_classifier(
        &self,
        out: &mut Emitter,
        used: &HashSet<&str>,
    ) -> Result<usize, BackendLoadError> {
        if let Some(label) = self.output(0).filter(|l| used.contains(l)) {
            return Err(unsupported(format!(
                "{}: its label output {label:?} is read by the graph (tie serves the scores)",
                self.name
            )));
        }
        let Some(scores) = self.output(1) else {
            return Ok(0);
        };
        // onnxruntime's rule: as many scores as intercepts.
        let classes = self.floats("intercepts")?.len();
        let labels = labels_of(self.node).map_or(0, |l| l.len());
        let s = self.affine(out, classes)?;
        let post = self.post_transform();
        let y = match (classes == 1 && labels == 2, post.as_str()) {
            // onnxruntime applies no softmax to one score for two classes.
            (true, "NONE" | "SOFTMAX" | "SOFTMAX_ZERO") => {
                let one = out.constant_f32(&[], &[1.0]);
                let complement = out.op("Sub", &[&one, &s], vec![]);
                out.concat(&[complement, s], 1)
            }
            (true, "LOGISTIC") => {
                let neg = out.op("Neg", &[&s], vec![]);
                let a = logistic(out, &neg);
                let b = logistic(out, &s);
                out.concat(&[a, b], 1)
            }
            (false, "NONE") => s,
            (false, "LOGISTIC") => logistic(out, &s),
            (false, "SOFTMAX") => out.op("Softmax", &[&s], vec![int_attribute("axis", 1)]),
            (binary, other) => {
                return Err(unsupported(format!(
                    "{}: post_transform {other}{}",
                    self.name,
                    if binary {
                        " with one score for two classes"
                    } else {
                        ""
                    }
                )))
            }
        };
        out.op_into("Identity", &[&y], vec![], scores);
        Ok(if classes == 1 && labels == 2 {
            2
        } else {
            classes
        })
    }

    /// The features at the given indices (along the last axis): constants within the width
    /// of the value read (which must be known), as onnxruntime refuses others. Returns the
    /// width written.
    fn array_feature_extractor(
        &self,
        out: &mut Emitter,
        constants: &HashMap<&str, &TensorProto>,
        width_in: Option<usize>,
    ) -> Result<usize, BackendLoadError> {
        let x = self.input()?;
        let indices = self
            .node
            .input
            .get(1)
            .ok_or_else(|| unsupported(format!("{} has no indices", self.name)))?;
        let values = constants
            .get(indices.as_str())
            .and_then(|t| crate::bounds::int64s(t))
            .ok_or_else(|| {
                unsupported(format!(
                    "{}: its indices {indices:?} are not an int64 constant",
                    self.name
                ))
            })?;
        let width = width_in.ok_or_else(|| {
            unsupported(format!(
                "{}: the width of the value it reads ({x:?}) is not known at load",
                self.name
            ))
        })?;
        if let Some(bad) = values
            .iter()
            .find(|&&i| usize::try_from(i).map_or(true, |i| i >= width))
        {
            return Err(unsupported(format!(
                "{}: index {bad} is outside the {width} columns it reads",
                self.name
            )));
        }
        // As onnxruntime: the last axis keeps one entry per index, a scalar index included.
        let flat = out.constant_i64(&[values.len()], &values);
        let y = out.op("Gather", &[x, &flat], vec![int_attribute("axis", -1)]);
        self.finish(out, &y);
        Ok(values.len())
    }
}

#[cfg(test)]
mod tests {
    use crate::CpuEngine;

    /// The one-op graphs of `tests/fixtures/ml_ops.json` (made by `models/ml_ops.py`: every
    /// op this rewrites, with the attributes the exporters use and onnxruntime's open rules)
    /// answer as onnxruntime did, NaN rows included.
    #[test]
    fn ml_ops_answer_as_onnxruntime() {
        #[derive(serde::Deserialize)]
        struct Case {
            description: String,
            model: String,
            inputs: Vec<Vec<Option<f32>>>,
            expected: Vec<Vec<Option<f32>>>,
        }
        let cases: Vec<Case> = crate::fixtures::json("ml_ops.json");
        assert!(cases.len() >= 17);
        let mut failures = Vec::new();
        for case in &cases {
            let proto = crate::fixtures::model(&case.model);
            let backend =
                crate::cpu::load_proto(proto, "ml_ops".as_ref(), CpuEngine::Auto, u64::MAX)
                    .unwrap_or_else(|e| panic!("{}: {e}", case.description));
            let width = case.expected[0].len();
            assert_eq!(
                backend.info().io.output_width,
                width,
                "{}",
                case.description
            );
            let rows = case.inputs.len();
            let input = crate::fixtures::rows(&case.inputs);
            let mut output = vec![0.0; rows * width];
            backend.run_batch(&input, rows, &mut output).unwrap();
            for (r, want) in case.expected.iter().enumerate() {
                for (c, w) in want.iter().enumerate() {
                    let got = output[r * width + c];
                    let ok = match w {
                        Some(w) => (got - w).abs() <= 1e-5 * w.abs().max(1.0),
                        None => got.is_nan(),
                    };
                    if !ok {
                        failures.push(format!(
                            "{}, row {r} ({:?}) output {c}: {got} against onnxruntime's {w:?}",
                            case.description, case.inputs[r]
                        ));
                    }
                }
            }
        }
        assert!(failures.is_empty(), "{}", failures.join("\n"));
    }
    /// An ArrayFeatureExtractor index outside the columns it reads, or a graph that uses the
    /// names rewrites make, is refused at load, saying why.
    #[test]
    fn out_of_range_indices_and_reserved_names_are_refused() {
        #[derive(serde::Deserialize)]
        struct Case {
            description: String,
            model: String,
        }
        let cases: Vec<Case> = crate::fixtures::json("ml_ops.json");
        let afe = cases
            .iter()
            .find(|c| c.description.starts_with("ArrayFeatureExtractor [3, 1]"))
            .unwrap();
        let load = |proto| {
            crate::cpu::load_proto(proto, "ml_ops".as_ref(), CpuEngine::Auto, u64::MAX)
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default()
        };
        let mut proto = crate::fixtures::model(&afe.model);
        let graph = proto.graph.as_mut().unwrap();
        graph.initializer[0].int64_data = vec![3, 4];
        graph.initializer[0].raw_data.clear();
        let err = load(proto);
        assert!(err.contains("index 4 is outside the 4 columns"), "{err}");
        let mut proto = crate::fixtures::model(&afe.model);
        let graph = proto.graph.as_mut().unwrap();
        graph.node[0].output[0] = "tie.y".into();
        graph.output[0].name = "tie.y".into();
        let err = load(proto);
        assert!(err.contains("names starting with \"tie.\""), "{err}");
    }
}
