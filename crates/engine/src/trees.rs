//! Tree ensembles of the ONNX-ML domain (`TreeEnsembleRegressor`, ai.onnx.ml opsets 1 and 3),
//! as scikit-learn (skl2onnx), LightGBM and XGBoost (onnxmltools) export them, run natively.
//!
//! At load the ensemble is compiled into flat arrays (structure of arrays: feature,
//! threshold, mode, children by index, missing-value direction; leaf weights contiguous per
//! leaf). A batch is evaluated tree by tree over its rows, accumulating in f64. A NaN feature
//! goes the way the node's `nodes_missing_value_tracks_true` says, as onnxruntime does.

use std::collections::HashMap;

use tract_onnx::pb::{AttributeProto, ModelProto, NodeProto};

use crate::{Backend, BackendError, BackendInfo, BackendLoadError, ModelIo};

/// The ONNX-ML domain.
pub const ML_DOMAIN: &str = "ai.onnx.ml";

/// How a branch node compares its feature with its threshold (the true branch when it holds).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
enum Mode {
    Leq,
    Lt,
    Gte,
    Gt,
    Eq,
    Neq,
    Leaf,
}

impl Mode {
    fn parse(s: &[u8]) -> Option<Self> {
        Some(match s {
            b"BRANCH_LEQ" => Self::Leq,
            b"BRANCH_LT" => Self::Lt,
            b"BRANCH_GTE" => Self::Gte,
            b"BRANCH_GT" => Self::Gt,
            b"BRANCH_EQ" => Self::Eq,
            b"BRANCH_NEQ" => Self::Neq,
            b"LEAF" => Self::Leaf,
            _ => return None,
        })
    }
}

/// How the trees' leaf values combine per target.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Aggregate {
    Sum,
    Average,
    Min,
    Max,
}

/// What is applied to the aggregated scores of a row.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum PostTransform {
    None,
    Logistic,
    Softmax,
    SoftmaxZero,
}

/// A compiled ensemble.
#[derive(Debug)]
pub struct TreeEnsemble {
    features: usize,
    targets: usize,
    roots: Vec<u32>,
    feature: Vec<u32>,
    threshold: Vec<f32>,
    mode: Vec<Mode>,
    true_child: Vec<u32>,
    false_child: Vec<u32>,
    missing_true: Vec<bool>,
    /// Per node: where its leaf weights start in `leaf_target`/`leaf_weight`, and how many.
    leaf_start: Vec<u32>,
    leaf_len: Vec<u32>,
    leaf_target: Vec<u32>,
    leaf_weight: Vec<f64>,
    base: Vec<f64>,
    aggregate: Aggregate,
    post: PostTransform,
}

fn unsupported(why: impl Into<String>) -> BackendLoadError {
    BackendLoadError::UnsupportedOp(why.into())
}

/// The attributes of a node by name.
struct Attributes<'a>(HashMap<&'a str, &'a AttributeProto>);

impl<'a> Attributes<'a> {
    fn of(node: &'a NodeProto) -> Self {
        Self(
            node.attribute
                .iter()
                .map(|a| (a.name.as_str(), a))
                .collect(),
        )
    }

    fn ints(&self, name: &str) -> &'a [i64] {
        self.0.get(name).map_or(&[], |a| a.ints.as_slice())
    }

    fn int(&self, name: &str, default: i64) -> i64 {
        self.0.get(name).map_or(default, |a| a.i)
    }

    fn string(&self, name: &str, default: &'a str) -> &'a [u8] {
        self.0
            .get(name)
            .map_or(default.as_bytes(), |a| a.s.as_slice())
    }

    fn strings(&self, name: &str) -> Vec<&'a [u8]> {
        self.0
            .get(name)
            .map_or_else(Vec::new, |a| a.strings.iter().map(Vec::as_slice).collect())
    }

    /// Float values given as `name` (floats) or `name_as_tensor` (a float or double tensor).
    fn floats(&self, name: &str) -> Result<Vec<f64>, BackendLoadError> {
        if let Some(a) = self.0.get(name) {
            return Ok(a.floats.iter().map(|&v| f64::from(v)).collect());
        }
        match self
            .0
            .get(format!("{name}_as_tensor").as_str())
            .and_then(|a| a.t.as_ref())
        {
            Some(t) => crate::bounds::floats(t).ok_or_else(|| {
                unsupported(format!("{name}_as_tensor is not a float or double tensor"))
            }),
            None => Ok(Vec::new()),
        }
    }
}

impl TreeEnsemble {
    /// Compiles a `TreeEnsembleRegressor` node reading `features` features per row.
    ///
    /// # Errors
    /// [`BackendLoadError::UnsupportedOp`] naming what is malformed or not supported (a node
    /// mode, aggregate or post-transform this engine does not have, arrays of unequal length,
    /// a child or feature out of range, a cycle).
    pub fn compile(node: &NodeProto, features: usize) -> Result<Self, BackendLoadError> {
        let a = Attributes::of(node);
        let tree_ids = a.ints("nodes_treeids");
        let node_ids = a.ints("nodes_nodeids");
        let feature_ids = a.ints("nodes_featureids");
        let modes = a.strings("nodes_modes");
        let values = a.floats("nodes_values")?;
        let true_ids = a.ints("nodes_truenodeids");
        let false_ids = a.ints("nodes_falsenodeids");
        let missing = a.ints("nodes_missing_value_tracks_true");
        let n = tree_ids.len();
        for (what, len) in [
            ("nodes_nodeids", node_ids.len()),
            ("nodes_featureids", feature_ids.len()),
            ("nodes_modes", modes.len()),
            ("nodes_values", values.len()),
            ("nodes_truenodeids", true_ids.len()),
            ("nodes_falsenodeids", false_ids.len()),
        ] {
            if len != n {
                return Err(unsupported(format!(
                    "TreeEnsembleRegressor: {what} has {len} entries, nodes_treeids {n}"
                )));
            }
        }
        if !missing.is_empty() && missing.len() != n {
            return Err(unsupported(
                "TreeEnsembleRegressor: nodes_missing_value_tracks_true has the wrong length",
            ));
        }
        let index: HashMap<(i64, i64), u32> = tree_ids
            .iter()
            .zip(node_ids)
            .enumerate()
            .map(|(i, (&t, &id))| ((t, id), i as u32))
            .collect();
        if index.len() != n {
            return Err(unsupported(
                "TreeEnsembleRegressor: a (tree, node) id repeats",
            ));
        }
        let child = |tree: i64, id: i64| {
            index.get(&(tree, id)).copied().ok_or_else(|| {
                unsupported(format!(
                    "TreeEnsembleRegressor: tree {tree} names node {id}, which it does not have"
                ))
            })
        };
        let mut e = Self {
            features,
            targets: usize::try_from(a.int("n_targets", 1)).unwrap_or(0),
            roots: Vec::new(),
            feature: Vec::with_capacity(n),
            threshold: Vec::with_capacity(n),
            mode: Vec::with_capacity(n),
            true_child: Vec::with_capacity(n),
            false_child: Vec::with_capacity(n),
            missing_true: Vec::with_capacity(n),
            leaf_start: vec![0; n],
            leaf_len: vec![0; n],
            leaf_target: Vec::new(),
            leaf_weight: Vec::new(),
            base: a.floats("base_values")?,
            aggregate: match a.string("aggregate_function", "SUM") {
                b"SUM" => Aggregate::Sum,
                b"AVERAGE" => Aggregate::Average,
                b"MIN" => Aggregate::Min,
                b"MAX" => Aggregate::Max,
                other => {
                    return Err(unsupported(format!(
                        "TreeEnsembleRegressor: aggregate_function {:?}",
                        String::from_utf8_lossy(other)
                    )))
                }
            },
            post: match a.string("post_transform", "NONE") {
                b"NONE" => PostTransform::None,
                b"LOGISTIC" => PostTransform::Logistic,
                b"SOFTMAX" => PostTransform::Softmax,
                b"SOFTMAX_ZERO" => PostTransform::SoftmaxZero,
                other => {
                    return Err(unsupported(format!(
                        "TreeEnsembleRegressor: post_transform {:?} is not supported by the tree engine",
                        String::from_utf8_lossy(other)
                    )))
                }
            },
        };
        if e.targets == 0 {
            return Err(unsupported("TreeEnsembleRegressor: n_targets is 0"));
        }
        if !e.base.is_empty() && e.base.len() != e.targets {
            return Err(unsupported(format!(
                "TreeEnsembleRegressor: {} base_values for {} targets",
                e.base.len(),
                e.targets
            )));
        }
        e.base.resize(e.targets, 0.0);
        let mut is_child = vec![false; n];
        for i in 0..n {
            let mode = Mode::parse(modes[i]).ok_or_else(|| {
                unsupported(format!(
                    "TreeEnsembleRegressor: node mode {:?}",
                    String::from_utf8_lossy(modes[i])
                ))
            })?;
            e.mode.push(mode);
            e.threshold.push(values[i] as f32);
            e.missing_true.push(missing.get(i).is_some_and(|&m| m != 0));
            if mode == Mode::Leaf {
                e.feature.push(0);
                e.true_child.push(i as u32);
                e.false_child.push(i as u32);
                continue;
            }
            let f = usize::try_from(feature_ids[i])
                .ok()
                .filter(|&f| f < features);
            let f = f.ok_or_else(|| {
                unsupported(format!(
                    "TreeEnsembleRegressor: node {} reads feature {}, the input has {features}",
                    node_ids[i], feature_ids[i]
                ))
            })?;
            e.feature.push(f as u32);
            let (t, fl) = (
                child(tree_ids[i], true_ids[i])?,
                child(tree_ids[i], false_ids[i])?,
            );
            is_child[t as usize] = true;
            is_child[fl as usize] = true;
            e.true_child.push(t);
            e.false_child.push(fl);
        }
        e.roots = (0..n as u32).filter(|&i| !is_child[i as usize]).collect();
        e.leaves(&a, &index)?;
        e.check_acyclic()?;
        Ok(e)
    }

    /// Groups the leaf weights by leaf, contiguous.
    fn leaves(
        &mut self,
        a: &Attributes<'_>,
        index: &HashMap<(i64, i64), u32>,
    ) -> Result<(), BackendLoadError> {
        let trees = a.ints("target_treeids");
        let nodes = a.ints("target_nodeids");
        let ids = a.ints("target_ids");
        let weights = a.floats("target_weights")?;
        if nodes.len() != trees.len() || ids.len() != trees.len() || weights.len() != trees.len() {
            return Err(unsupported(
                "TreeEnsembleRegressor: the target_* arrays differ in length",
            ));
        }
        let mut by_leaf: Vec<Vec<(u32, f64)>> = vec![Vec::new(); self.mode.len()];
        for i in 0..trees.len() {
            let leaf = *index.get(&(trees[i], nodes[i])).ok_or_else(|| {
                unsupported(format!(
                    "TreeEnsembleRegressor: a weight names node {} of tree {}, which does not exist",
                    nodes[i], trees[i]
                ))
            })?;
            if self.mode[leaf as usize] != Mode::Leaf {
                return Err(unsupported(format!(
                    "TreeEnsembleRegressor: a weight names node {} of tree {}, which is no leaf",
                    nodes[i], trees[i]
                )));
            }
            let target = u32::try_from(ids[i])
                .ok()
                .filter(|&t| (t as usize) < self.targets)
                .ok_or_else(|| {
                    unsupported(format!(
                        "TreeEnsembleRegressor: target {} of {} targets",
                        ids[i], self.targets
                    ))
                })?;
            by_leaf[leaf as usize].push((target, weights[i]));
        }
        for (leaf, entries) in by_leaf.into_iter().enumerate() {
            self.leaf_start[leaf] = self.leaf_target.len() as u32;
            self.leaf_len[leaf] = entries.len() as u32;
            for (t, w) in entries {
                self.leaf_target.push(t);
                self.leaf_weight.push(w);
            }
        }
        Ok(())
    }

    /// Refuses a tree whose walk could loop (a node reachable from itself).
    fn check_acyclic(&self) -> Result<(), BackendLoadError> {
        // 0: unseen, 1: on the current path, 2: done.
        let mut state = vec![0u8; self.mode.len()];
        for &root in &self.roots {
            let mut stack = vec![(root, false)];
            while let Some((node, leaving)) = stack.pop() {
                let i = node as usize;
                if leaving {
                    state[i] = 2;
                    continue;
                }
                match state[i] {
                    1 => return Err(unsupported("TreeEnsembleRegressor: a tree has a cycle")),
                    2 => continue,
                    _ => {}
                }
                state[i] = 1;
                stack.push((node, true));
                if self.mode[i] != Mode::Leaf {
                    stack.push((self.true_child[i], false));
                    stack.push((self.false_child[i], false));
                }
            }
        }
        if self.roots.is_empty() && !self.mode.is_empty() {
            return Err(unsupported("TreeEnsembleRegressor: no tree has a root"));
        }
        Ok(())
    }

    /// Values per row.
    pub fn targets(&self) -> usize {
        self.targets
    }

    /// The leaf `row` reaches from `root`.
    #[inline]
    fn leaf(&self, root: u32, row: &[f32]) -> usize {
        let mut n = root as usize;
        loop {
            let mode = self.mode[n];
            if mode == Mode::Leaf {
                return n;
            }
            let x = row[self.feature[n] as usize];
            let t = self.threshold[n];
            let go_true = if x.is_nan() {
                self.missing_true[n]
            } else {
                match mode {
                    Mode::Leq => x <= t,
                    Mode::Lt => x < t,
                    Mode::Gte => x >= t,
                    Mode::Gt => x > t,
                    Mode::Eq => x == t,
                    Mode::Neq => x != t,
                    Mode::Leaf => unreachable!("returned above"),
                }
            };
            n = if go_true {
                self.true_child[n]
            } else {
                self.false_child[n]
            } as usize;
        }
    }

    /// Scores `rows` rows of `input` into `output` (`rows * targets` values).
    pub fn run(&self, input: &[f32], rows: usize, output: &mut [f32]) {
        let (w, k) = (self.features, self.targets);
        let init = match self.aggregate {
            Aggregate::Sum | Aggregate::Average => 0.0,
            Aggregate::Min => f64::INFINITY,
            Aggregate::Max => f64::NEG_INFINITY,
        };
        let mut acc = vec![init; rows * k];
        // Tree by tree over the rows: one tree's nodes stay in cache for the whole batch.
        for &root in &self.roots {
            for r in 0..rows {
                let leaf = self.leaf(root, &input[r * w..(r + 1) * w]);
                let start = self.leaf_start[leaf] as usize;
                let end = start + self.leaf_len[leaf] as usize;
                let scores = &mut acc[r * k..(r + 1) * k];
                for j in start..end {
                    let (t, v) = (self.leaf_target[j] as usize, self.leaf_weight[j]);
                    scores[t] = match self.aggregate {
                        Aggregate::Sum | Aggregate::Average => scores[t] + v,
                        Aggregate::Min => scores[t].min(v),
                        Aggregate::Max => scores[t].max(v),
                    };
                }
            }
        }
        let trees = self.roots.len().max(1) as f64;
        for r in 0..rows {
            let scores = &mut acc[r * k..(r + 1) * k];
            for (s, b) in scores.iter_mut().zip(&self.base) {
                if !s.is_finite() && matches!(self.aggregate, Aggregate::Min | Aggregate::Max) {
                    // No tree gave this target a value.
                    *s = 0.0;
                }
                if self.aggregate == Aggregate::Average {
                    *s /= trees;
                }
                *s += b;
            }
            post_transform(self.post, scores);
            for (o, s) in output[r * k..(r + 1) * k].iter_mut().zip(scores.iter()) {
                *o = *s as f32;
            }
        }
    }
}

fn post_transform(post: PostTransform, scores: &mut [f64]) {
    match post {
        PostTransform::None => {}
        PostTransform::Logistic => {
            for s in scores.iter_mut() {
                *s = 1.0 / (1.0 + (-*s).exp());
            }
        }
        PostTransform::Softmax | PostTransform::SoftmaxZero => {
            let zero = post == PostTransform::SoftmaxZero;
            let max = scores
                .iter()
                .filter(|s| !zero || **s != 0.0)
                .fold(f64::NEG_INFINITY, |m, &s| m.max(s));
            let mut sum = 0.0;
            for s in scores.iter_mut() {
                if !(zero && *s == 0.0) {
                    *s = (*s - max).exp();
                    sum += *s;
                }
            }
            if sum > 0.0 {
                for s in scores.iter_mut() {
                    *s /= sum;
                }
            }
        }
    }
}

/// The tree ensemble of a graph that is one: its input goes straight into a
/// `TreeEnsembleRegressor` whose output is the graph's (directly, or through `Identity`).
/// `None` for any other graph.
///
/// # Errors
/// The ensemble is malformed or uses what the engine does not support.
pub fn plan(proto: &ModelProto, io: &ModelIo) -> Result<Option<TreeEnsemble>, BackendLoadError> {
    let Some(graph) = &proto.graph else {
        return Ok(None);
    };
    let [tree, rest @ ..] = graph.node.as_slice() else {
        return Ok(None);
    };
    if tree.op_type != "TreeEnsembleRegressor" || tree.domain != ML_DOMAIN {
        return Ok(None);
    }
    let (Some(input), Some(output)) = (tree.input.first(), tree.output.first()) else {
        return Ok(None);
    };
    if *input != io.input_name {
        return Ok(None);
    }
    let reaches_output = match rest {
        [] => *output == io.output_name,
        [identity] => {
            identity.op_type == "Identity"
                && identity.input.first() == Some(output)
                && identity.output.first() == Some(&io.output_name)
        }
        _ => false,
    };
    if !reaches_output {
        return Ok(None);
    }
    let ensemble = TreeEnsemble::compile(tree, io.input_width)?;
    if io.output_width != 0 && io.output_width != ensemble.targets() {
        // skl2onnx declares [N, 1] for a multi-target forest; the ensemble decides, as in
        // onnxruntime.
        tracing::warn!(
            declared = io.output_width,
            targets = ensemble.targets(),
            "the graph's output declares another width than the ensemble's targets: the targets are served"
        );
    }
    Ok(Some(ensemble))
}

/// Refuses a graph with an operator of a domain other than ONNX's own (the ONNX-ML ops other
/// than the tree ensembles this engine runs), naming it and its domain, before tract sees it.
///
/// # Errors
/// [`BackendLoadError::UnsupportedOp`].
pub fn refuse_foreign_ops(proto: &ModelProto) -> Result<(), BackendLoadError> {
    let Some(graph) = &proto.graph else {
        return Ok(());
    };
    match graph
        .node
        .iter()
        .find(|n| !n.domain.is_empty() && n.domain != "ai.onnx")
    {
        Some(n) => Err(unsupported(format!(
            "op {} of domain {} (node {:?}) is not supported by this build's engines{}",
            n.op_type,
            n.domain,
            n.name,
            if n.op_type == "TreeEnsembleRegressor" {
                ": the tree engine takes a graph that is one TreeEnsembleRegressor from the input to the output"
            } else {
                ""
            }
        ))),
        None => Ok(()),
    }
}

/// A tree ensemble on the CPU.
pub struct TreeBackend {
    info: BackendInfo,
    ensemble: TreeEnsemble,
}

impl TreeBackend {
    /// Serves `ensemble` with the graph's `io` (its output width set to the targets).
    pub fn new(mut io: ModelIo, ensemble: TreeEnsemble) -> Self {
        io.output_width = ensemble.targets();
        Self {
            info: BackendInfo {
                io,
                architecture: "tree-ensemble".into(),
                device: "cpu".into(),
                engine: "cpu-trees",
                device_memory_bytes: None,
                pci_bus_ids: Vec::new(),
            },
            ensemble,
        }
    }
}

impl Backend for TreeBackend {
    fn info(&self) -> &BackendInfo {
        &self.info
    }

    fn run_batch(
        &self,
        input: &[f32],
        rows: usize,
        output: &mut [f32],
    ) -> Result<(), BackendError> {
        let (iw, ow) = (self.info.io.input_width, self.info.io.output_width);
        crate::check_shape(input, rows, output, iw, ow)?;
        self.ensemble.run(input, rows, output);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use tract_onnx::pb::attribute_proto::AttributeType;

    use super::*;

    /// A small deterministic generator (xorshift64*).
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }
        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }
        fn float(&mut self) -> f32 {
            (self.below(2001) as f32 - 1000.0) / 250.0
        }
    }

    fn ints(name: &str, v: Vec<i64>) -> AttributeProto {
        AttributeProto {
            name: name.into(),
            r#type: AttributeType::Ints as i32,
            ints: v,
            ..Default::default()
        }
    }

    fn floats(name: &str, v: Vec<f32>) -> AttributeProto {
        AttributeProto {
            name: name.into(),
            r#type: AttributeType::Floats as i32,
            floats: v,
            ..Default::default()
        }
    }

    fn text(name: &str, v: &str) -> AttributeProto {
        AttributeProto {
            name: name.into(),
            r#type: AttributeType::String as i32,
            s: v.as_bytes().to_vec(),
            ..Default::default()
        }
    }

    const MODES: [&str; 6] = [
        "BRANCH_LEQ",
        "BRANCH_LT",
        "BRANCH_GTE",
        "BRANCH_GT",
        "BRANCH_EQ",
        "BRANCH_NEQ",
    ];

    /// One node: mode, feature, value, true id, false id, whether NaN goes the true way.
    type RandomNode = (String, usize, f32, i64, i64, bool);

    /// The arrays of one random ensemble, kept for the reference walker.
    struct Random {
        node: NodeProto,
        features: usize,
        targets: usize,
        /// (tree, node) -> the node.
        nodes: HashMap<(i64, i64), RandomNode>,
        /// (tree, node) -> [(target, weight)].
        leaves: HashMap<(i64, i64), Vec<(usize, f32)>>,
        trees: i64,
        base: Vec<f32>,
        aggregate: &'static str,
        post: &'static str,
    }

    fn random(rng: &mut Rng) -> Random {
        let features = 1 + rng.below(6) as usize;
        let targets = 1 + rng.below(3) as usize;
        let trees = 1 + rng.below(6) as i64;
        let aggregate = ["SUM", "AVERAGE", "MIN", "MAX"][rng.below(4) as usize];
        let post = ["NONE", "LOGISTIC", "SOFTMAX", "SOFTMAX_ZERO"][rng.below(4) as usize];
        let mut r = Random {
            node: NodeProto::default(),
            features,
            targets,
            nodes: HashMap::new(),
            leaves: HashMap::new(),
            trees,
            base: (0..targets).map(|_| rng.float()).collect(),
            aggregate,
            post,
        };
        let (mut a_tree, mut a_node, mut a_feat, mut a_mode, mut a_val) =
            (vec![], vec![], vec![], vec![], vec![]);
        let (mut a_true, mut a_false, mut a_missing) = (vec![], vec![], vec![]);
        let (mut t_tree, mut t_node, mut t_id, mut t_w) = (vec![], vec![], vec![], vec![]);
        for tree in 0..trees {
            // Node ids in a shuffled order: the engine must not rely on it.
            let depth = rng.below(5) as u32;
            let count = (1i64 << (depth + 1)) - 1;
            let mut ids: Vec<i64> = (0..count).collect();
            for i in (1..ids.len()).rev() {
                ids.swap(i, rng.below(i as u64 + 1) as usize);
            }
            for k in 0..count {
                let id = ids[k as usize];
                let leaf = k >= count / 2;
                let (mode, feature, value) = if leaf {
                    ("LEAF".to_string(), 0, 0.0)
                } else {
                    let mode = MODES[rng.below(6) as usize].to_string();
                    // Thresholds on a coarse grid, so rows hit them exactly.
                    (
                        mode,
                        rng.below(features as u64) as usize,
                        (rng.below(9) as f32 - 4.0) / 2.0,
                    )
                };
                let (t, f) = if leaf {
                    (0, 0)
                } else {
                    (ids[(2 * k + 1) as usize], ids[(2 * k + 2) as usize])
                };
                let missing = rng.below(2) == 1;
                a_tree.push(tree);
                a_node.push(id);
                a_feat.push(feature as i64);
                a_mode.push(mode.clone().into_bytes());
                a_val.push(value);
                a_true.push(t);
                a_false.push(f);
                a_missing.push(i64::from(missing));
                r.nodes
                    .insert((tree, id), (mode, feature, value, t, f, missing));
                if leaf {
                    let mut weights = Vec::new();
                    for target in 0..targets {
                        if rng.below(4) > 0 {
                            let w = rng.float();
                            t_tree.push(tree);
                            t_node.push(id);
                            t_id.push(target as i64);
                            t_w.push(w);
                            weights.push((target, w));
                        }
                    }
                    r.leaves.insert((tree, id), weights);
                }
            }
        }
        r.node = NodeProto {
            op_type: "TreeEnsembleRegressor".into(),
            domain: ML_DOMAIN.into(),
            attribute: vec![
                ints("nodes_treeids", a_tree),
                ints("nodes_nodeids", a_node),
                ints("nodes_featureids", a_feat),
                AttributeProto {
                    name: "nodes_modes".into(),
                    r#type: AttributeType::Strings as i32,
                    strings: a_mode,
                    ..Default::default()
                },
                floats("nodes_values", a_val),
                ints("nodes_truenodeids", a_true),
                ints("nodes_falsenodeids", a_false),
                ints("nodes_missing_value_tracks_true", a_missing),
                ints("target_treeids", t_tree),
                ints("target_nodeids", t_node),
                ints("target_ids", t_id),
                floats("target_weights", t_w),
                AttributeProto {
                    name: "n_targets".into(),
                    r#type: AttributeType::Int as i32,
                    i: targets as i64,
                    ..Default::default()
                },
                floats("base_values", r.base.clone()),
                text("aggregate_function", aggregate),
                text("post_transform", post),
            ],
            ..Default::default()
        };
        r
    }

    /// The ensemble's answer for `row`, walking the attribute arrays as the ONNX-ML spec
    /// describes them (tree 0 root is node id 0 in its own order: the first node listed).
    fn reference(r: &Random, row: &[f32]) -> Vec<f64> {
        let mut scores: Vec<Option<f64>> = vec![None; r.targets];
        for tree in 0..r.trees {
            // The root is the node no other node of the tree points to.
            let children: std::collections::HashSet<i64> = r
                .nodes
                .iter()
                .filter(|((t, _), n)| *t == tree && n.0 != "LEAF")
                .flat_map(|(_, n)| [n.3, n.4])
                .collect();
            let root = r
                .nodes
                .keys()
                .find(|(t, id)| *t == tree && !children.contains(id))
                .unwrap()
                .1;
            let mut id = root;
            loop {
                let (mode, feature, value, t, f, missing) = &r.nodes[&(tree, id)];
                if mode == "LEAF" {
                    break;
                }
                let x = row[*feature];
                let yes = if x.is_nan() {
                    *missing
                } else {
                    match mode.as_str() {
                        "BRANCH_LEQ" => x <= *value,
                        "BRANCH_LT" => x < *value,
                        "BRANCH_GTE" => x >= *value,
                        "BRANCH_GT" => x > *value,
                        "BRANCH_EQ" => x == *value,
                        _ => x != *value,
                    }
                };
                id = if yes { *t } else { *f };
            }
            for &(target, w) in &r.leaves[&(tree, id)] {
                let w = f64::from(w);
                let s = &mut scores[target];
                *s = Some(match (s.take(), r.aggregate) {
                    (None, _) => w,
                    (Some(v), "SUM" | "AVERAGE") => v + w,
                    (Some(v), "MIN") => v.min(w),
                    (Some(v), _) => v.max(w),
                });
            }
        }
        let mut out: Vec<f64> = scores
            .iter()
            .zip(&r.base)
            .map(|(s, b)| {
                let s = s.unwrap_or(0.0);
                let s = if r.aggregate == "AVERAGE" {
                    s / r.trees as f64
                } else {
                    s
                };
                s + f64::from(*b)
            })
            .collect();
        let post = match r.post {
            "LOGISTIC" => PostTransform::Logistic,
            "SOFTMAX" => PostTransform::Softmax,
            "SOFTMAX_ZERO" => PostTransform::SoftmaxZero,
            _ => PostTransform::None,
        };
        post_transform(post, &mut out);
        out
    }

    #[test]
    fn random_ensembles_answer_as_a_plain_walker_of_their_arrays() {
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        for case in 0..300 {
            let r = random(&mut rng);
            let e = TreeEnsemble::compile(&r.node, r.features).unwrap();
            let rows = 1 + rng.below(9) as usize;
            let input: Vec<f32> = (0..rows * r.features)
                .map(|_| match rng.below(6) {
                    0 => f32::NAN,
                    // On the thresholds' grid.
                    1 | 2 => (rng.below(9) as f32 - 4.0) / 2.0,
                    _ => rng.float(),
                })
                .collect();
            let mut output = vec![0.0; rows * r.targets];
            e.run(&input, rows, &mut output);
            for row in 0..rows {
                let want = reference(&r, &input[row * r.features..(row + 1) * r.features]);
                for (t, w) in want.iter().enumerate() {
                    let got = output[row * r.targets + t];
                    assert!(
                        (f64::from(got) - w).abs() <= 1e-5 * w.abs().max(1.0),
                        "case {case} ({} {}), row {row} target {t}: {got} against {w}",
                        r.aggregate,
                        r.post
                    );
                }
            }
        }
    }

    #[test]
    fn malformed_ensembles_are_refused_with_what_is_wrong() {
        let mut rng = Rng(7);
        // An ensemble with a branch, one of whose children is made to not exist.
        let mut r = loop {
            let r = random(&mut rng);
            if r.nodes.values().any(|n| n.0 != "LEAF") {
                break r;
            }
        };
        let branch = r
            .node
            .attribute
            .iter()
            .find(|a| a.name == "nodes_modes")
            .unwrap()
            .strings
            .iter()
            .position(|m| m.as_slice() != b"LEAF")
            .unwrap();
        for a in &mut r.node.attribute {
            if a.name == "nodes_truenodeids" {
                a.ints[branch] = 9999;
            }
        }
        let err = TreeEnsemble::compile(&r.node, r.features)
            .unwrap_err()
            .to_string();
        assert!(err.contains("node 9999, which it does not have"), "{err}");
        let mut r = random(&mut rng);
        for a in &mut r.node.attribute {
            if a.name == "post_transform" {
                a.s = b"PROBIT".to_vec();
            }
        }
        let err = TreeEnsemble::compile(&r.node, r.features)
            .unwrap_err()
            .to_string();
        assert!(err.contains("PROBIT"), "{err}");
    }
}
