//! ONNX's recurrent ops (`GRU`, `LSTM`, `RNN`) unrolled over their window into plain ops
//! (`Gather`, `MatMul`, `Add`, `Mul`, `Sub`, the gate activations, `Reshape`, `Concat`,
//! `Transpose`), before tract sees the graph.
//!
//! A window model's sequence length is fixed by the graph (the row is reshaped into
//! `[batch, steps, features]`), while its batch dimension is symbolic; tract's own recurrent
//! ops need a concrete batch (it panics without one) and its GRU has given answers that differ
//! from onnxruntime's. Unrolled, the graph keeps its symbolic batch and every step is ops
//! whose answers are checked against onnxruntime on the exporters' models.
//!
//! Supported: all three ops in the forward, reverse and bidirectional directions, both
//! layouts, `linear_before_reset`, initial states, LSTM peepholes, and the gate activations
//! `Sigmoid`, `Tanh` and `Relu`. Refused by name: `sequence_lens` (padded batches), `clip`,
//! LSTM's `input_forget`, other activations, and weights that are not constants.

use std::collections::HashMap;

use tract_onnx::pb::{ModelProto, NodeProto, TensorProto};
use tract_onnx::prelude::*;
use tract_onnx::tract_core::internal::DimLike;
use tract_onnx::tract_hir::infer::Factoid;

use super::{int_attribute, ints_attribute, Emitter};
use crate::attributes::Attributes;
use crate::trees::unsupported;
use crate::BackendLoadError;

/// The recurrent ops, by their ONNX name.
const OPS: [&str; 3] = ["GRU", "LSTM", "RNN"];

fn is_recurrent(node: &NodeProto) -> bool {
    (node.domain.is_empty() || node.domain == "ai.onnx") && OPS.contains(&node.op_type.as_str())
}

/// `proto` with its recurrent ops unrolled, or `None` when it has none.
///
/// `input_width` is the width of the graph's `[batch, width]` input, used to learn each
/// recurrent op's sequence length.
///
/// # Errors
/// [`BackendLoadError::UnsupportedOp`] for a recurrent op used in a way this does not unroll
/// (see the module's list), or whose sequence length the graph does not fix.
pub(crate) fn unroll(
    proto: &ModelProto,
    input_width: usize,
    max_tensor_bytes: u64,
) -> Result<Option<ModelProto>, BackendLoadError> {
    let Some(graph) = proto.graph.as_ref() else {
        return Ok(None);
    };
    if !graph.node.iter().any(is_recurrent) {
        return Ok(None);
    }
    super::check_names(graph)?;
    // Shape inference folds constants: the graph's tensors are bounded first.
    crate::bounds::check_proto(proto, max_tensor_bytes)?;
    let lengths = sequence_lengths(proto, input_width)?;
    let constants: HashMap<&str, &TensorProto> = graph
        .initializer
        .iter()
        .map(|t| (t.name.as_str(), t))
        .collect();
    let mut out = Emitter::default();
    for (k, node) in graph.node.iter().enumerate() {
        if !is_recurrent(node) {
            out.nodes.push(node.clone());
            continue;
        }
        out.prefix = format!("{}unroll{k}.", super::PREFIX);
        let op = format!("{} {:?}", node.op_type, node.name);
        let x = optional_input(node, 0)
            .ok_or_else(|| unsupported(format!("{op}: no input sequence")))?;
        let steps = match lengths.get(&k).copied().flatten() {
            Some(steps @ 1..=MAX_STEPS) => steps,
            Some(steps) => {
                return Err(unsupported(format!(
                    "{op}: a sequence of {steps} steps (1 to {MAX_STEPS} are unrolled)"
                )))
            }
            None => {
                return Err(unsupported(format!(
                    "{op}: the graph does not fix the length of its sequence {x:?} (it may not depend on the batch)"
                )))
            }
        };
        let cell = Cell::read(node, &constants)?;
        cell.unroll(node, x, steps, &mut out)?;
    }
    let mut proto = proto.clone();
    let graph = proto.graph.as_mut().expect("checked above");
    graph.node = out.nodes;
    graph.initializer.extend(out.constants);
    Ok(Some(proto))
}

/// The longest sequence unrolled: each step is some twenty ops, and tract's optimisation of
/// the graph grows with them (a 256-step GRU loads in seconds).
const MAX_STEPS: usize = 1024;

/// Input `k` of `node`, if given (an empty name is an input left out).
fn optional_input(node: &NodeProto, k: usize) -> Option<&String> {
    node.input.get(k).filter(|s| !s.is_empty())
}

/// The sequence length of each recurrent node (by its index in the graph), learned by tract's
/// shape inference with the batch left symbolic (`None` where it could not tell, or where the
/// length depends on the batch).
fn sequence_lengths(
    proto: &ModelProto,
    input_width: usize,
) -> Result<HashMap<usize, Option<usize>>, BackendLoadError> {
    let graph = proto.graph.as_ref().expect("the caller checked");
    let mut model = crate::tract::inference_model(proto, input_width)?;
    // Facts are filled as far as analysis gets; a failure further on is reported when the
    // unrolled graph is built.
    let _ = model.analyse(false);
    let mut facts = HashMap::new();
    for node in model.nodes() {
        for ix in 0..node.outputs.len() {
            let outlet = OutletId::new(node.id, ix);
            if let (Some(label), Ok(fact)) = (model.outlet_label(outlet), model.outlet_fact(outlet))
            {
                facts.insert(label.to_string(), fact.clone());
            }
        }
    }
    let mut lengths = HashMap::new();
    for (k, node) in graph.node.iter().enumerate() {
        if !is_recurrent(node) {
            continue;
        }
        let axis = usize::from(Attributes::of(node).int("layout", 0) == 1);
        let length = optional_input(node, 0)
            .and_then(|x| facts.get(x))
            .and_then(|f| {
                let dims: Vec<_> = f.shape.dims().collect();
                dims.get(axis)?.concretize()?.to_usize().ok()
            });
        lengths.insert(k, length);
    }
    Ok(lengths)
}

/// Which recurrent op.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Gru,
    Lstm,
    Rnn,
}

impl Kind {
    /// Gates in W, R and each half of B (GRU: z r h; LSTM: i o f c; RNN: one).
    fn gates(self) -> usize {
        match self {
            Kind::Gru => 3,
            Kind::Lstm => 4,
            Kind::Rnn => 1,
        }
    }

    /// Activations per direction, and their defaults.
    fn default_activations(self) -> &'static [&'static str] {
        match self {
            Kind::Gru => &["Sigmoid", "Tanh"],
            Kind::Lstm => &["Sigmoid", "Tanh", "Tanh"],
            Kind::Rnn => &["Tanh"],
        }
    }
}

/// One direction's constants, each gate's transposed so that a step is `x · Wᵀ`.
struct Direction {
    /// Per gate: `Wᵀ` `[input, hidden]`.
    w: Vec<Vec<f32>>,
    /// Per gate: `Rᵀ` `[hidden, hidden]`.
    r: Vec<Vec<f32>>,
    /// Per gate: the bias added to the input projection.
    bias: Vec<Vec<f32>>,
    /// GRU with `linear_before_reset`: `Rb` of the h gate, added inside the reset.
    reset_bias: Option<Vec<f32>>,
    /// LSTM peepholes (i, o, f).
    peepholes: Option<[Vec<f32>; 3]>,
    /// Activation names (see [`Kind::default_activations`]).
    activations: Vec<String>,
    /// Whether it walks the window from the last step.
    reverse: bool,
}

/// A recurrent node's constants and options.
struct Cell {
    kind: Kind,
    hidden: usize,
    input: usize,
    batch_first: bool,
    directions: Vec<Direction>,
}

impl Cell {
    fn read(
        node: &NodeProto,
        constants: &HashMap<&str, &TensorProto>,
    ) -> Result<Self, BackendLoadError> {
        let kind = match node.op_type.as_str() {
            "GRU" => Kind::Gru,
            "LSTM" => Kind::Lstm,
            _ => Kind::Rnn,
        };
        let op = format!("{} {:?}", node.op_type, node.name);
        let a = Attributes::of(node);
        let input_name = |i: usize| optional_input(node, i);
        if input_name(4).is_some() {
            return Err(unsupported(format!(
                "{op}: sequence_lens (a batch of padded sequences) is not supported"
            )));
        }
        if a.has("clip") {
            return Err(unsupported(format!("{op}: clip is not supported")));
        }
        if kind == Kind::Lstm && a.int("input_forget", 0) != 0 {
            return Err(unsupported(format!("{op}: input_forget is not supported")));
        }
        let directions = match a.string("direction", "forward") {
            b"forward" => vec![false],
            b"reverse" => vec![true],
            b"bidirectional" => vec![false, true],
            other => {
                return Err(unsupported(format!(
                    "{op}: direction {:?}",
                    String::from_utf8_lossy(other)
                )))
            }
        };
        let d = directions.len();
        let hidden = usize::try_from(a.int("hidden_size", 0))
            .ok()
            .filter(|&h| h > 0)
            .ok_or_else(|| unsupported(format!("{op}: hidden_size is not given")))?;
        let g = kind.gates();
        let constant = |i: usize, what: &str| -> Result<Option<Vec<f32>>, BackendLoadError> {
            let Some(name) = input_name(i) else {
                return Ok(None);
            };
            let t = constants.get(name.as_str()).ok_or_else(|| {
                unsupported(format!(
                    "{op}: {what} {name:?} is not an initializer (the weights must be constant tensors)"
                ))
            })?;
            let values = crate::bounds::floats(t).ok_or_else(|| {
                unsupported(format!("{op}: {what} {name:?} is not a float tensor"))
            })?;
            Ok(Some(values.into_iter().map(|v| v as f32).collect()))
        };
        let w = constant(1, "W")?.ok_or_else(|| unsupported(format!("{op}: W is not given")))?;
        let r = constant(2, "R")?.ok_or_else(|| unsupported(format!("{op}: R is not given")))?;
        // Sizes in checked arithmetic (hidden_size is the file's word), R's first: it bounds
        // hidden_size by the data the file holds, before anything is made from it.
        let wrong = |what: &str, got: usize, want: Option<usize>| {
            unsupported(format!(
                "{op}: {what} has {got} values, {} expected for hidden_size {hidden}",
                want.map_or_else(|| "more than can be".to_string(), |w| w.to_string())
            ))
        };
        let dgh = d.checked_mul(g).and_then(|n| n.checked_mul(hidden));
        let want_r = dgh.and_then(|n| n.checked_mul(hidden));
        if want_r != Some(r.len()) {
            return Err(wrong("R", r.len(), want_r));
        }
        let dgh = dgh.expect("R's size was checked");
        let input = w.len() / dgh;
        if input == 0 || input * dgh != w.len() {
            return Err(wrong("W", w.len(), Some(dgh * input.max(1))));
        }
        let b = constant(3, "B")?.unwrap_or_else(|| vec![0.0; 2 * dgh]);
        if b.len() != 2 * dgh {
            return Err(wrong("B", b.len(), Some(2 * dgh)));
        }
        let p = if kind == Kind::Lstm {
            constant(7, "P")?
        } else {
            None
        };
        if let Some(p) = p.as_ref().filter(|p| p.len() != d * 3 * hidden) {
            return Err(wrong("P", p.len(), Some(d * 3 * hidden)));
        }
        let outputs = if kind == Kind::Lstm { 3 } else { 2 };
        if node.output.iter().skip(outputs).any(|o| !o.is_empty()) {
            return Err(unsupported(format!(
                "{op}: {} outputs ({} has {outputs})",
                node.output.len(),
                node.op_type
            )));
        }
        let defaults = kind.default_activations();
        let names = a.strings("activations");
        let activations: Vec<String> = if names.is_empty() {
            directions
                .iter()
                .flat_map(|_| defaults.iter().map(|s| (*s).to_string()))
                .collect()
        } else {
            names
                .iter()
                .map(|s| String::from_utf8_lossy(s).into_owned())
                .collect()
        };
        if activations.len() != d * defaults.len() {
            return Err(unsupported(format!(
                "{op}: {} activations for {d} direction(s)",
                activations.len()
            )));
        }
        if let Some(other) = activations
            .iter()
            .find(|s| !matches!(s.as_str(), "Sigmoid" | "Tanh" | "Relu"))
        {
            return Err(unsupported(format!(
                "{op}: activation {other} (Sigmoid, Tanh and Relu are supported)"
            )));
        }
        let linear_before_reset = kind == Kind::Gru && a.int("linear_before_reset", 0) != 0;
        // Rows `first..first + hidden` of a `[rows, cols]` matrix, transposed.
        let transposed = |m: &[f32], first: usize, cols: usize| -> Vec<f32> {
            let mut t = vec![0.0; cols * hidden];
            for j in 0..hidden {
                for i in 0..cols {
                    t[i * hidden + j] = m[(first + j) * cols + i];
                }
            }
            t
        };
        let directions = directions
            .iter()
            .enumerate()
            .map(|(dir, &reverse)| {
                let w = &w[dir * g * hidden * input..(dir + 1) * g * hidden * input];
                let r = &r[dir * g * hidden * hidden..(dir + 1) * g * hidden * hidden];
                let b = &b[dir * 2 * g * hidden..(dir + 1) * 2 * g * hidden];
                let slice = |v: &[f32], k: usize| v[k * hidden..(k + 1) * hidden].to_vec();
                let (wb, rb) = b.split_at(g * hidden);
                let bias = (0..g)
                    .map(|k| {
                        let inside = linear_before_reset && k == 2;
                        slice(wb, k)
                            .iter()
                            .zip(slice(rb, k))
                            .map(|(x, y)| if inside { *x } else { x + y })
                            .collect()
                    })
                    .collect();
                Direction {
                    w: (0..g).map(|k| transposed(w, k * hidden, input)).collect(),
                    r: (0..g).map(|k| transposed(r, k * hidden, hidden)).collect(),
                    bias,
                    reset_bias: linear_before_reset.then(|| slice(rb, 2)),
                    peepholes: p.as_ref().map(|p| {
                        let p = &p[dir * 3 * hidden..(dir + 1) * 3 * hidden];
                        [slice(p, 0), slice(p, 1), slice(p, 2)]
                    }),
                    activations: activations[dir * defaults.len()..(dir + 1) * defaults.len()]
                        .to_vec(),
                    reverse,
                }
            })
            .collect();
        Ok(Self {
            kind,
            hidden,
            input,
            batch_first: a.int("layout", 0) == 1,
            directions,
        })
    }

    /// Writes `value` (in layout 0) into output `name`, transposed by `perm` into the
    /// batch-first layout where the op has it.
    fn write_output(&self, out: &mut Emitter, value: &str, perm: &[i64], name: &str) {
        if self.batch_first {
            out.op_into(
                "Transpose",
                &[value],
                vec![ints_attribute("perm", perm)],
                name,
            );
        } else {
            out.op_into("Identity", &[value], vec![], name);
        }
    }

    /// Writes the unrolled steps of `node` over `steps` steps, ending in its outputs' names.
    fn unroll(
        &self,
        node: &NodeProto,
        x: &str,
        steps: usize,
        out: &mut Emitter,
    ) -> Result<(), BackendLoadError> {
        let (h, i) = (self.hidden, self.input);
        let input_name = |k: usize| optional_input(node, k).cloned();
        // X as [steps, batch, input].
        let x = if self.batch_first {
            out.op("Transpose", &[x], vec![ints_attribute("perm", &[1, 0, 2])])
        } else {
            x.to_string()
        };
        // Initial states, per direction as [batch, hidden].
        let state_axis = i64::from(self.batch_first);
        let initial = |out: &mut Emitter, k: usize, dir: usize| {
            input_name(k).map(|s| {
                let index = out.scalar_i64(dir as i64);
                out.op(
                    "Gather",
                    &[&s, &index],
                    vec![int_attribute("axis", state_axis)],
                )
            })
        };
        let mut ys: Vec<Vec<String>> = vec![Vec::new(); steps];
        let mut last_h = Vec::new();
        let mut last_c = Vec::new();
        for (dir, d) in self.directions.iter().enumerate() {
            let gates = self.kind.gates();
            let projected: Vec<String> = (0..gates)
                .map(|k| {
                    let w = out.constant_f32(&[i, h], &d.w[k]);
                    let b = out.constant_f32(&[h], &d.bias[k]);
                    let xw = out.op("MatMul", &[&x, &w], vec![]);
                    out.op("Add", &[&xw, &b], vec![])
                })
                .collect();
            let r: Vec<String> = (0..gates)
                .map(|k| out.constant_f32(&[h, h], &d.r[k]))
                .collect();
            let reset_bias = d.reset_bias.as_ref().map(|rb| out.constant_f32(&[h], rb));
            let peepholes = d
                .peepholes
                .as_ref()
                .map(|p| p.clone().map(|p| out.constant_f32(&[h], &p)));
            let act =
                |out: &mut Emitter, k: usize, v: &str| out.op(&d.activations[k], &[v], vec![]);
            let mut state = initial(out, 5, dir);
            let mut cell = if self.kind == Kind::Lstm {
                initial(out, 6, dir)
            } else {
                None
            };
            let order: Vec<usize> = if d.reverse {
                (0..steps).rev().collect()
            } else {
                (0..steps).collect()
            };
            for t in order {
                let index = out.scalar_i64(t as i64);
                let xt: Vec<String> = projected
                    .iter()
                    .map(|p| out.op("Gather", &[p, &index], vec![int_attribute("axis", 0)]))
                    .collect();
                // x + h · Rᵀ for gate k (x alone while the state is zero).
                let recur = |out: &mut Emitter, k: usize, state: &Option<String>| match state {
                    Some(s) => {
                        let hr = out.op("MatMul", &[s, &r[k]], vec![]);
                        out.op("Add", &[&xt[k], &hr], vec![])
                    }
                    None => xt[k].clone(),
                };
                let next = match self.kind {
                    Kind::Rnn => {
                        let v = recur(out, 0, &state);
                        act(out, 0, &v)
                    }
                    Kind::Gru => {
                        let z = recur(out, 0, &state);
                        let z = act(out, 0, &z);
                        let rr = recur(out, 1, &state);
                        let rr = act(out, 0, &rr);
                        let inner = match (&state, &reset_bias) {
                            (Some(s), None) => {
                                let rs = out.op("Mul", &[&rr, s], vec![]);
                                let rsr = out.op("MatMul", &[&rs, &r[2]], vec![]);
                                out.op("Add", &[&xt[2], &rsr], vec![])
                            }
                            (None, None) => xt[2].clone(),
                            (Some(s), Some(rb)) => {
                                let hr = out.op("MatMul", &[s, &r[2]], vec![]);
                                let hrb = out.op("Add", &[&hr, rb], vec![]);
                                let gated = out.op("Mul", &[&rr, &hrb], vec![]);
                                out.op("Add", &[&xt[2], &gated], vec![])
                            }
                            (None, Some(rb)) => {
                                let gated = out.op("Mul", &[&rr, rb], vec![]);
                                out.op("Add", &[&xt[2], &gated], vec![])
                            }
                        };
                        let candidate = act(out, 1, &inner);
                        // h' = (1 - z) ⊙ candidate + z ⊙ h = candidate + z ⊙ (h - candidate)
                        match &state {
                            Some(s) => {
                                let diff = out.op("Sub", &[s, &candidate], vec![]);
                                let zd = out.op("Mul", &[&z, &diff], vec![]);
                                out.op("Add", &[&candidate, &zd], vec![])
                            }
                            None => {
                                let zc = out.op("Mul", &[&z, &candidate], vec![]);
                                out.op("Sub", &[&candidate, &zc], vec![])
                            }
                        }
                    }
                    Kind::Lstm => {
                        // Gates in W's order: i o f c; peepholes i o f.
                        let peep =
                            |out: &mut Emitter, v: String, k: usize, c: &Option<String>| match (
                                c, &peepholes,
                            ) {
                                (Some(c), Some(p)) => {
                                    let pc = out.op("Mul", &[c, &p[k]], vec![]);
                                    out.op("Add", &[&v, &pc], vec![])
                                }
                                _ => v,
                            };
                        let gi = recur(out, 0, &state);
                        let gi = peep(out, gi, 0, &cell);
                        let gi = act(out, 0, &gi);
                        let gf = recur(out, 2, &state);
                        let gf = peep(out, gf, 2, &cell);
                        let gf = act(out, 0, &gf);
                        let gc = recur(out, 3, &state);
                        let gc = act(out, 1, &gc);
                        let ic = out.op("Mul", &[&gi, &gc], vec![]);
                        let c = match &cell {
                            Some(c) => {
                                let fc = out.op("Mul", &[&gf, c], vec![]);
                                out.op("Add", &[&fc, &ic], vec![])
                            }
                            None => ic,
                        };
                        let go = recur(out, 1, &state);
                        let go = peep(out, go, 1, &Some(c.clone()));
                        let go = act(out, 0, &go);
                        let hc = act(out, 2, &c);
                        cell = Some(c);
                        out.op("Mul", &[&go, &hc], vec![])
                    }
                };
                ys[t].push(next.clone());
                state = Some(next);
            }
            last_h.push(state.expect("at least one step"));
            if let Some(c) = cell {
                last_c.push(c);
            }
        }
        let output = |k: usize| node.output.get(k).filter(|s| !s.is_empty());
        // Y: [steps, directions, batch, hidden] ([batch, steps, directions, hidden] batch-first).
        if let Some(y) = output(0) {
            let shape = out.constant_i64(&[4], &[1, 1, -1, h as i64]);
            let per_step: Vec<String> = ys
                .iter()
                .map(|hs| {
                    let parts: Vec<String> = hs
                        .iter()
                        .map(|s| out.op("Reshape", &[s, &shape], vec![]))
                        .collect();
                    out.concat(&parts, 1)
                })
                .collect();
            let stacked = out.concat(&per_step, 0);
            self.write_output(out, &stacked, &[2, 0, 1, 3], y);
        }
        // Y_h and Y_c: [directions, batch, hidden] ([batch, directions, hidden] batch-first).
        for (k, finals) in [(1, &last_h), (2, &last_c)] {
            let Some(name) = output(k) else { continue };
            let shape = out.constant_i64(&[3], &[1, -1, h as i64]);
            let parts: Vec<String> = finals
                .iter()
                .map(|s| out.op("Reshape", &[s, &shape], vec![]))
                .collect();
            let stacked = out.concat(&parts, 0);
            self.write_output(out, &stacked, &[1, 0, 2], name);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use crate::{load_cpu, Backend as _, CpuEngine};

    /// The window models of `tests/fixtures/sequence` (PyTorch's exporter; made by
    /// `models/generate_sequence.py`) load with a symbolic batch and answer as onnxruntime
    /// did, one row at a time and all rows in one batch.
    #[test]
    fn exported_sequence_models_answer_as_onnxruntime() {
        #[derive(serde::Deserialize)]
        struct Fixture {
            model: String,
            inputs: Vec<Vec<f32>>,
            expected: Vec<Vec<f32>>,
        }
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/fixtures/sequence");
        let mut checked = Vec::new();
        for entry in std::fs::read_dir(dir).unwrap() {
            let name = entry.unwrap().file_name().to_string_lossy().into_owned();
            if !name.ends_with(".json") {
                continue;
            }
            let f: Fixture = crate::fixtures::json(&format!("sequence/{name}"));
            let model = format!("{dir}/{}/1/model.onnx", f.model);
            let backend = load_cpu(model.as_ref(), CpuEngine::Auto)
                .unwrap_or_else(|e| panic!("{}: {e}", f.model));
            let io = &backend.info().io;
            let (iw, ow) = (io.input_width, io.output_width);
            assert_eq!(ow, f.expected[0].len(), "{}", f.model);
            let rows = f.inputs.len();
            let input: Vec<f32> = f.inputs.concat();
            let mut batch = vec![0.0; rows * ow];
            backend.run_batch(&input, rows, &mut batch).unwrap();
            for (r, want) in f.expected.iter().enumerate() {
                let mut one = vec![0.0; ow];
                backend
                    .run_batch(&input[r * iw..(r + 1) * iw], 1, &mut one)
                    .unwrap();
                for (c, w) in want.iter().enumerate() {
                    for (how, got) in [("alone", one[c]), ("in the batch", batch[r * ow + c])] {
                        assert!(
                            (got - w).abs() <= 1e-4 * w.abs().max(1.0),
                            "{} row {r} output {c} {how}: {got} against onnxruntime's {w}",
                            f.model
                        );
                    }
                }
            }
            checked.push(f.model);
        }
        checked.sort();
        assert_eq!(
            checked,
            ["attention", "conv_ln", "gru", "gru_bi", "lstm", "rnn"],
            "fixtures checked"
        );
    }
    /// The random recurrent graphs of `tests/fixtures/random_recurrent.json` (every op,
    /// direction, layout, activation, initial state, peepholes and linear_before_reset; made
    /// by `models/random_recurrent.py`) answer, unrolled, as onnxruntime did.
    #[test]
    fn random_recurrent_graphs_answer_as_onnxruntime() {
        #[derive(serde::Deserialize)]
        struct Case {
            description: String,
            model: String,
            inputs: Vec<Vec<f32>>,
            expected: Vec<Vec<f32>>,
        }
        let cases: Vec<Case> = crate::fixtures::json("random_recurrent.json");
        assert!(cases.len() >= 60);
        let mut failures = Vec::new();
        for (i, case) in cases.iter().enumerate() {
            let proto = crate::fixtures::model(&case.model);
            let io = crate::lower::model_io(&proto).unwrap();
            let unrolled = super::unroll(&proto, io.input_width, u64::MAX)
                .unwrap()
                .expect("a recurrent op");
            let backend = crate::TractBackend::new(&unrolled, io, u64::MAX)
                .unwrap_or_else(|e| panic!("case {i} ({}): {e}", case.description));
            let (rows, width) = (case.inputs.len(), case.expected[0].len());
            let mut output = vec![0.0; rows * width];
            backend
                .run_batch(&case.inputs.concat(), rows, &mut output)
                .unwrap();
            for (r, want) in case.expected.iter().enumerate() {
                for (c, w) in want.iter().enumerate() {
                    let got = output[r * width + c];
                    if (got - w).abs() > 1e-4 * w.abs().max(1.0) {
                        failures.push(format!(
                            "case {i} ({}), row {r} output {c}: {got} against onnxruntime's {w}",
                            case.description
                        ));
                    }
                }
            }
        }
        assert!(failures.is_empty(), "{}", failures.join("\n"));
    }
    /// A recurrent op whose hidden_size does not match its weights (up to sizes that
    /// overflow), or whose sequence is longer than is unrolled, is refused at load.
    #[test]
    fn wrong_sizes_and_long_sequences_are_refused() {
        #[derive(serde::Deserialize)]
        struct Case {
            model: String,
        }
        let cases: Vec<Case> = crate::fixtures::json("random_recurrent.json");
        let proto = crate::fixtures::model(&cases[0].model);
        let io = crate::lower::model_io(&proto).unwrap();
        for hidden in [7, 1 << 40, (1 << 61) + 1] {
            let mut bad = proto.clone();
            let graph = bad.graph.as_mut().unwrap();
            let node = graph
                .node
                .iter_mut()
                .find(|n| super::is_recurrent(n))
                .unwrap();
            let a = node
                .attribute
                .iter_mut()
                .find(|a| a.name == "hidden_size")
                .unwrap();
            a.i = hidden;
            let err = super::unroll(&bad, io.input_width, u64::MAX)
                .unwrap_err()
                .to_string();
            assert!(err.contains("R has"), "hidden_size {hidden}: {err}");
        }
        // The row reshaped into 2,000 steps of one feature.
        let mut long = proto.clone();
        let graph = long.graph.as_mut().unwrap();
        let shape = graph
            .initializer
            .iter_mut()
            .find(|t| t.name == "shape")
            .unwrap();
        shape.int64_data = vec![-1, 2000, 1];
        shape.raw_data.clear();
        let err = super::unroll(&long, 2000, u64::MAX)
            .unwrap_err()
            .to_string();
        assert!(err.contains("2000 steps (1 to 1024"), "{err}");
    }
}
