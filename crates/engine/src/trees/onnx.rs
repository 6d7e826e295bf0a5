//! The ONNX-ML tree operators, as scikit-learn (skl2onnx), LightGBM and XGBoost
//! (onnxmltools) export them: `TreeEnsembleRegressor` and `TreeEnsembleClassifier`
//! (ai.onnx.ml opsets 1 and 3) and `TreeEnsemble` (opset 5), compiled into a [`TreeEnsemble`].
//!
//! A graph runs on the tree engine when it is one such node from the input to the outputs,
//! with only `Identity`, `Cast` (of the label) and `ZipMap` (of the probabilities) after it.
//! A classifier serves its probability tensor (ZipMap's map of it is not built); its label
//! output is not served. Where onnxruntime's answers follow rules of its own (a regressor of
//! one target applies only PROBIT; two classes with one class's weights), the engine follows
//! them, so that answers match it.

use std::collections::{HashMap, HashSet};

use tract_onnx::pb::{ModelProto, NodeProto};

use crate::attributes::Attributes;

use super::ensemble::{Aggregate, Branch, Builder, Mode, Output, PostTransform, TreeEnsemble};
use super::unsupported;
use crate::{BackendLoadError, ModelIo};

/// The ONNX-ML domain.
pub const ML_DOMAIN: &str = "ai.onnx.ml";

/// The tree operators this engine runs.
const TREE_OPS: [&str; 3] = [
    "TreeEnsembleRegressor",
    "TreeEnsembleClassifier",
    "TreeEnsemble",
];

fn same_lengths(op: &str, n: usize, arrays: &[(&str, usize)]) -> Result<(), BackendLoadError> {
    for (what, len) in arrays {
        if *len != n {
            return Err(unsupported(format!(
                "{op}: {what} has {len} entries, {} {n}",
                arrays[0].0
            )));
        }
    }
    Ok(())
}

fn classic_mode(s: &[u8]) -> Option<Mode> {
    Some(match s {
        b"BRANCH_LEQ" => Mode::Leq,
        b"BRANCH_LT" => Mode::Lt,
        b"BRANCH_GTE" => Mode::Gte,
        b"BRANCH_GT" => Mode::Gt,
        b"BRANCH_EQ" => Mode::Eq,
        b"BRANCH_NEQ" => Mode::Neq,
        b"LEAF" => Mode::Leaf,
        _ => return None,
    })
}

fn post_transform_named(op: &str, s: &[u8]) -> Result<PostTransform, BackendLoadError> {
    Ok(match s {
        b"NONE" => PostTransform::None,
        b"LOGISTIC" => PostTransform::Logistic,
        b"SOFTMAX" => PostTransform::Softmax,
        b"SOFTMAX_ZERO" => PostTransform::SoftmaxZero,
        b"PROBIT" => PostTransform::Probit,
        other => {
            return Err(unsupported(format!(
                "{op}: post_transform {:?}",
                String::from_utf8_lossy(other)
            )))
        }
    })
}

/// onnxruntime applies no post-transform but PROBIT to a single score.
fn single_score(post: PostTransform) -> PostTransform {
    if post == PostTransform::Probit {
        post
    } else {
        PostTransform::None
    }
}

/// Compiles a tree node (`TreeEnsembleRegressor`, `TreeEnsembleClassifier`, `TreeEnsemble`) reading `features` features per row.
///
/// # Errors
/// [`BackendLoadError::UnsupportedOp`] naming what is malformed or not supported (a node
/// mode, aggregate or post-transform this engine does not have, arrays of unequal length,
/// a child or feature out of range, a cycle).
pub fn compile(node: &NodeProto, features: usize) -> Result<TreeEnsemble, BackendLoadError> {
    match node.op_type.as_str() {
        "TreeEnsembleRegressor" => compile_classic(node, features, false),
        "TreeEnsembleClassifier" => compile_classic(node, features, true),
        "TreeEnsemble" => compile_v5(node, features),
        other => Err(unsupported(format!("{other} is not a tree ensemble"))),
    }
}

/// `TreeEnsembleRegressor` or `TreeEnsembleClassifier` (opsets 1 and 3).
fn compile_classic(
    node: &NodeProto,
    features: usize,
    classifier: bool,
) -> Result<TreeEnsemble, BackendLoadError> {
    let op: &'static str = if classifier {
        "TreeEnsembleClassifier"
    } else {
        "TreeEnsembleRegressor"
    };
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
    same_lengths(
        op,
        n,
        &[
            ("nodes_treeids", n),
            ("nodes_nodeids", node_ids.len()),
            ("nodes_featureids", feature_ids.len()),
            ("nodes_modes", modes.len()),
            ("nodes_values", values.len()),
            ("nodes_truenodeids", true_ids.len()),
            ("nodes_falsenodeids", false_ids.len()),
        ],
    )?;
    if !missing.is_empty() && missing.len() != n {
        return Err(unsupported(format!(
            "{op}: nodes_missing_value_tracks_true has the wrong length"
        )));
    }
    let prefix = if classifier { "class" } else { "target" };
    let w_trees = a.ints(&format!("{prefix}_treeids"));
    let w_nodes = a.ints(&format!("{prefix}_nodeids"));
    let w_ids = a.ints(&format!("{prefix}_ids"));
    let w_values = a.floats(&format!("{prefix}_weights"))?;
    same_lengths(
        op,
        w_trees.len(),
        &[
            ("the weights' tree ids", w_trees.len()),
            ("their node ids", w_nodes.len()),
            ("their target ids", w_ids.len()),
            ("their values", w_values.len()),
        ],
    )?;
    let mut post = post_transform_named(op, a.string("post_transform", "NONE"))?;
    let mut base = a.floats("base_values")?;
    let mut aggregate = Aggregate::Sum;
    let mut output = Output::Scores;
    // Which target each weight's id goes to.
    let mut target_of: fn(i64) -> i64 = |id| id;
    let targets = if classifier {
        let classes = a
            .ints("classlabels_int64s")
            .len()
            .max(a.strings("classlabels_strings").len());
        let weight_classes: HashSet<i64> = w_ids.iter().copied().collect();
        match classes {
            0 | 1 => {
                return Err(unsupported(format!(
                    "{op}: {classes} class labels (a classifier has two or more)"
                )))
            }
            2 if base.len() == 2 => {
                return Err(unsupported(format!(
                    "{op}: two classes with two base_values, which ONNX leaves open (onnxruntime adds class 1's base value to class 0's score)"
                )))
            }
            2 if weight_classes.len() == 1 && weight_classes.contains(&0) => {
                // One score for two classes.
                if post == PostTransform::Probit {
                    return Err(unsupported(format!(
                        "{op}: PROBIT on two classes scored by one value (onnxruntime writes one column of two)"
                    )));
                }
                output = if w_values.iter().all(|&w| w >= 0.0) {
                    Output::BinaryComplement
                } else {
                    Output::BinaryMirror
                };
                target_of = |_| 0;
                1
            }
            2 => {
                output = Output::Classes;
                base.resize(2, 0.0);
                2
            }
            k => {
                output = Output::Classes;
                k
            }
        }
    } else {
        aggregate = match a.string("aggregate_function", "SUM") {
            b"SUM" => Aggregate::Sum,
            b"AVERAGE" => Aggregate::Average,
            b"MIN" => Aggregate::Min,
            b"MAX" => Aggregate::Max,
            other => {
                return Err(unsupported(format!(
                    "{op}: aggregate_function {:?}",
                    String::from_utf8_lossy(other)
                )))
            }
        };
        let targets = usize::try_from(a.int("n_targets", 1)).unwrap_or(0);
        if targets == 0 {
            return Err(unsupported(format!("{op}: n_targets is 0")));
        }
        if targets == 1 {
            post = single_score(post);
        }
        targets
    };
    let mut b = Builder::new(op, features, targets);
    // (tree, node id) -> index, in the order the arrays list the nodes.
    let mut index: HashMap<(i64, i64), u32> = HashMap::with_capacity(n);
    for i in 0..n {
        let mode = classic_mode(modes[i]).ok_or_else(|| {
            unsupported(format!(
                "{op}: node mode {:?}",
                String::from_utf8_lossy(modes[i])
            ))
        })?;
        let id = if mode == Mode::Leaf {
            b.leaf()
        } else {
            b.branch(Branch {
                mode,
                feature: feature_ids[i],
                threshold: values[i] as f32,
                missing_true: missing.get(i).is_some_and(|&m| m != 0),
                zero_missing: false,
                set: Vec::new(),
            })?
        };
        if index.insert((tree_ids[i], node_ids[i]), id).is_some() {
            return Err(unsupported(format!("{op}: a (tree, node) id repeats")));
        }
    }
    let find = |tree: i64, id: i64| {
        index.get(&(tree, id)).copied().ok_or_else(|| {
            unsupported(format!(
                "{op}: tree {tree} names node {id}, which it does not have"
            ))
        })
    };
    for i in 0..n {
        let node = index[&(tree_ids[i], node_ids[i])];
        if !b.is_leaf(node) {
            let (t, f) = (
                find(tree_ids[i], true_ids[i])?,
                find(tree_ids[i], false_ids[i])?,
            );
            b.connect(node, t, f);
        }
    }
    for i in 0..w_trees.len() {
        let leaf = find(w_trees[i], w_nodes[i])?;
        b.weight(leaf, target_of(w_ids[i]), w_values[i])?;
    }
    if matches!(output, Output::BinaryComplement | Output::BinaryMirror) {
        base.truncate(1);
    }
    b.finish(None, base, aggregate, post, output)
}

/// `TreeEnsemble` (ai.onnx.ml opset 5): branches and leaves in separate arrays, set
/// membership (`BRANCH_MEMBER`), integer aggregate and post-transform codes.
fn compile_v5(node: &NodeProto, features: usize) -> Result<TreeEnsemble, BackendLoadError> {
    let op = "TreeEnsemble";
    let a = Attributes::of(node);
    let feature_ids = a.ints("nodes_featureids");
    let modes = a.tensor_ints("nodes_modes")?;
    let splits = a.floats("nodes_splits")?;
    let true_ids = a.ints("nodes_truenodeids");
    let true_leafs = a.ints("nodes_trueleafs");
    let false_ids = a.ints("nodes_falsenodeids");
    let false_leafs = a.ints("nodes_falseleafs");
    let missing = a.ints("nodes_missing_value_tracks_true");
    let leaf_targets = a.ints("leaf_targetids");
    let leaf_weights = a.floats("leaf_weights")?;
    let roots = a.ints("tree_roots");
    let members = a.floats("membership_values")?;
    let n = feature_ids.len();
    same_lengths(
        op,
        n,
        &[
            ("nodes_featureids", n),
            ("nodes_modes", modes.len()),
            ("nodes_splits", splits.len()),
            ("nodes_truenodeids", true_ids.len()),
            ("nodes_trueleafs", true_leafs.len()),
            ("nodes_falsenodeids", false_ids.len()),
            ("nodes_falseleafs", false_leafs.len()),
        ],
    )?;
    if !missing.is_empty() && missing.len() != n {
        return Err(unsupported(format!(
            "{op}: nodes_missing_value_tracks_true has the wrong length"
        )));
    }
    same_lengths(
        op,
        leaf_targets.len(),
        &[
            ("leaf_targetids", leaf_targets.len()),
            ("leaf_weights", leaf_weights.len()),
        ],
    )?;
    let targets = usize::try_from(a.int("n_targets", 1))
        .ok()
        .filter(|&t| t > 0)
        .ok_or_else(|| unsupported(format!("{op}: n_targets is not positive")))?;
    let aggregate = match a.int("aggregate_function", 1) {
        0 => Aggregate::Average,
        1 => Aggregate::Sum,
        2 => Aggregate::Min,
        3 => Aggregate::Max,
        other => return Err(unsupported(format!("{op}: aggregate_function {other}"))),
    };
    let mut post = match a.int("post_transform", 0) {
        0 => PostTransform::None,
        1 => PostTransform::Softmax,
        2 => PostTransform::Logistic,
        3 => PostTransform::SoftmaxZero,
        4 => PostTransform::Probit,
        other => return Err(unsupported(format!("{op}: post_transform {other}"))),
    };
    if targets == 1 {
        post = single_score(post);
    }
    // The sets of the MEMBER nodes, in order, each ended by a NaN.
    let mut sets = members
        .split(|v| v.is_nan())
        .map(|s| s.iter().map(|&v| v as f32).collect::<Vec<f32>>());
    let mut b = Builder::new(op, features, targets);
    for i in 0..n {
        let mode = match modes[i] {
            0 => Mode::Leq,
            1 => Mode::Lt,
            2 => Mode::Gte,
            3 => Mode::Gt,
            4 => Mode::Eq,
            5 => Mode::Neq,
            6 => Mode::Member,
            other => return Err(unsupported(format!("{op}: node mode {other}"))),
        };
        let set = if mode == Mode::Member {
            sets.next().ok_or_else(|| {
                unsupported(format!(
                    "{op}: membership_values has fewer sets than there are BRANCH_MEMBER nodes"
                ))
            })?
        } else {
            Vec::new()
        };
        b.branch(Branch {
            mode,
            feature: feature_ids[i],
            threshold: splits[i] as f32,
            missing_true: missing.get(i).is_some_and(|&m| m != 0),
            zero_missing: false,
            set,
        })?;
    }
    let leaves: Vec<u32> = (0..leaf_targets.len()).map(|_| b.leaf()).collect();
    for (i, (&t, &w)) in leaf_targets.iter().zip(&leaf_weights).enumerate() {
        b.weight(leaves[i], t, w)?;
    }
    let child = |id: i64, leaf: i64| {
        let found = if leaf != 0 {
            usize::try_from(id)
                .ok()
                .and_then(|i| leaves.get(i).copied())
        } else {
            usize::try_from(id)
                .ok()
                .filter(|&i| i < n)
                .map(|i| i as u32)
        };
        found.ok_or_else(|| {
            unsupported(format!(
                "{op}: a node names {} {id}, which does not exist",
                if leaf != 0 { "leaf" } else { "node" }
            ))
        })
    };
    for i in 0..n {
        let (t, f) = (
            child(true_ids[i], true_leafs[i])?,
            child(false_ids[i], false_leafs[i])?,
        );
        b.connect(i as u32, t, f);
    }
    let roots = roots
        .iter()
        .map(|&r| {
            u32::try_from(r)
                .ok()
                .filter(|&r| (r as usize) < n)
                .ok_or_else(|| unsupported(format!("{op}: tree root {r} does not exist")))
        })
        .collect::<Result<Vec<u32>, _>>()?;
    b.finish(Some(roots), Vec::new(), aggregate, post, Output::Scores)
}

/// The tree ensemble of a graph that is one: its single input goes straight into a tree
/// node whose outputs reach the graph's outputs only through `Identity`, `Cast` (the
/// label) and `ZipMap` (the probabilities). `None` for any other graph.
///
/// The I/O served: the graph's input, and the scores (a regressor's) or the probability
/// tensor (a classifier's) under the name of the graph output they reach.
///
/// # Errors
/// The ensemble is malformed or uses what the engine does not support; the graph's input is
/// not an f32 `[batch, features]` tensor.
pub fn plan(proto: &ModelProto) -> Result<Option<(ModelIo, TreeEnsemble)>, BackendLoadError> {
    let Some(graph) = &proto.graph else {
        return Ok(None);
    };
    let trees: Vec<&NodeProto> = graph
        .node
        .iter()
        .filter(|n| n.domain == ML_DOMAIN && TREE_OPS.contains(&n.op_type.as_str()))
        .collect();
    let [tree] = trees.as_slice() else {
        return Ok(None);
    };
    let initializers: HashSet<&str> = graph.initializer.iter().map(|t| t.name.as_str()).collect();
    let inputs: Vec<_> = graph
        .input
        .iter()
        .filter(|i| !initializers.contains(i.name.as_str()))
        .collect();
    let [input] = inputs.as_slice() else {
        return Ok(None);
    };
    if tree.input.first() != Some(&input.name) {
        return Ok(None);
    }
    let classifier = tree.op_type == "TreeEnsembleClassifier";
    // The tree's scores (a classifier's second output) and where they go.
    let scores = tree.output.get(usize::from(classifier));
    let Some(scores) = scores else {
        return Ok(None);
    };
    let label = classifier.then(|| tree.output.first()).flatten();
    // Follow each tensor through the nodes after the tree; anything but the allowed ops
    // makes the graph not a tree graph.
    let mut served: Option<(String, bool)> = None;
    let mut label_outputs = Vec::new();
    let mut frontier: Vec<(String, bool)> = vec![(scores.clone(), true)];
    if let Some(l) = label {
        frontier.push((l.clone(), false));
    }
    let outputs: HashSet<&str> = graph.output.iter().map(|o| o.name.as_str()).collect();
    let mut zipmapped = false;
    let mut used = 1;
    while let Some((tensor, is_scores)) = frontier.pop() {
        if outputs.contains(tensor.as_str()) {
            if is_scores {
                if served.is_some() {
                    return Ok(None);
                }
                served = Some((tensor.clone(), zipmapped));
            } else {
                label_outputs.push(tensor.clone());
            }
        }
        for n in graph.node.iter().filter(|n| n.input.contains(&tensor)) {
            let allowed = match (n.op_type.as_str(), n.domain.as_str()) {
                ("Identity", "" | "ai.onnx") => true,
                ("Cast", "" | "ai.onnx") => !is_scores,
                ("ZipMap", ML_DOMAIN) => is_scores && classifier,
                _ => false,
            };
            if !allowed || n.input.len() != 1 || n.output.len() != 1 {
                return Ok(None);
            }
            used += 1;
            if n.op_type == "ZipMap" {
                zipmapped = true;
            }
            frontier.push((n.output[0].clone(), is_scores));
        }
    }
    if used != graph.node.len() || outputs.len() != label_outputs.len() + 1 {
        return Ok(None);
    }
    let Some((output_name, zipmapped)) = served else {
        return Ok(None);
    };
    let (input_name, width) =
        crate::lower::value_2d(input).map_err(BackendLoadError::UnsupportedIo)?;
    let input_width = width.ok_or_else(|| {
        BackendLoadError::UnsupportedIo(format!("input {input_name:?} has no fixed width"))
    })?;
    let ensemble = compile(tree, input_width)?;
    let declared = graph
        .output
        .iter()
        .find(|o| o.name == output_name)
        .and_then(|o| crate::lower::value_2d(o).ok())
        .and_then(|(_, width)| width);
    if declared.is_some_and(|w| w != ensemble.outputs()) {
        // skl2onnx declares [N, 1] for a multi-target forest; the ensemble decides, as in
        // onnxruntime.
        tracing::warn!(
            declared,
            outputs = ensemble.outputs(),
            "the graph's output declares another width than the ensemble's: the ensemble's is served"
        );
    }
    let output_note = classifier.then(|| {
        let names = crate::attributes::labels_of(tree).unwrap_or_default();
        format!(
            "class probabilities, one column per class label [{}]{}{}",
            names.join(", "),
            if zipmapped {
                " (served as a tensor, not as ZipMap's map)"
            } else {
                ""
            },
            if label_outputs.is_empty() {
                String::new()
            } else {
                format!(
                    "; the label output {} is not served",
                    label_outputs.join(", ")
                )
            }
        )
    });
    let io = ModelIo {
        input_name,
        input_width,
        output_name,
        output_width: ensemble.outputs(),
        output_note,
    };
    Ok(Some((io, ensemble)))
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
            if TREE_OPS.contains(&n.op_type.as_str()) {
                ": the tree engine takes a graph that is one tree ensemble from the input to the outputs (Identity, Cast and ZipMap after it)"
            } else {
                ""
            }
        ))),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use tract_onnx::pb::attribute_proto::AttributeType;
    use tract_onnx::pb::AttributeProto;

    use super::super::ensemble::post_transform;
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
        // Half the ensembles compare one way only (LEQ, LT, GTE or GT): the fast walk's.
        let uniform = (rng.below(2) == 0).then(|| rng.below(4) as usize);
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
                    let mode = MODES[uniform.unwrap_or_else(|| rng.below(6) as usize)].to_string();
                    // Thresholds on a coarse grid, so rows hit them exactly; some infinite
                    // (LightGBM writes `inf` where only NaN is split off).
                    let value = match rng.below(12) {
                        0 => f32::INFINITY,
                        1 => f32::NEG_INFINITY,
                        _ => (rng.below(9) as f32 - 4.0) / 2.0,
                    };
                    (mode, rng.below(features as u64) as usize, value)
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
                    // NaN != t holds.
                    *missing || mode == "BRANCH_NEQ"
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
            .map(|(s, b)| match s {
                // onnxruntime: an unscored target is 0 among several, its base value alone.
                None if r.targets > 1 => 0.0,
                None => f64::from(*b),
                Some(s) if r.aggregate == "AVERAGE" => s / r.trees as f64 + f64::from(*b),
                Some(s) => s + f64::from(*b),
            })
            .collect();
        let post = match r.post {
            // onnxruntime transforms no single score but by PROBIT.
            _ if r.targets == 1 => PostTransform::None,
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
            let e = compile(&r.node, r.features).unwrap();
            // Fewer rows than the fast walk's lanes, and more.
            let rows = 1 + rng.below(40) as usize;
            let input: Vec<f32> = (0..rows * r.features)
                .map(|_| match rng.below(8) {
                    0 => f32::NAN,
                    6 => f32::INFINITY,
                    7 => f32::NEG_INFINITY,
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
        let err = compile(&r.node, r.features).unwrap_err().to_string();
        assert!(err.contains("node 9999, which it does not have"), "{err}");
        let mut r = random(&mut rng);
        for a in &mut r.node.attribute {
            if a.name == "post_transform" {
                a.s = b"CUBE".to_vec();
            }
        }
        let err = compile(&r.node, r.features).unwrap_err().to_string();
        assert!(err.contains("CUBE"), "{err}");
    }

    /// The ensembles of `tests/fixtures/random_trees.json` (every op, node mode,
    /// missing direction, aggregate, post-transform and classifier shape; made by
    /// `models/random_trees.py`) answer as onnxruntime did.
    #[test]
    fn random_ensembles_answer_as_onnxruntime() {
        #[derive(serde::Deserialize)]
        struct Case {
            kind: String,
            post: String,
            model: String,
            width: usize,
            inputs: Vec<Vec<Option<f32>>>,
            oracle: String,
            expected: Vec<Vec<serde_json::Value>>,
        }
        let cases: Vec<Case> = crate::fixtures::json("random_trees.json");
        assert!(cases.len() >= 100);
        let mut failures = Vec::new();
        for (i, case) in cases.iter().enumerate() {
            let proto = crate::fixtures::model(&case.model);
            let (io, ensemble) = match plan(&proto) {
                Ok(Some(planned)) => planned,
                other => {
                    failures.push(format!(
                        "case {i} ({} {}): {:?}",
                        case.kind,
                        case.post,
                        other.err()
                    ));
                    continue;
                }
            };
            assert_eq!(io.output_width, case.width, "case {i}");
            let rows = case.inputs.len();
            let input = crate::fixtures::rows(&case.inputs);
            let mut output = vec![0.0; rows * case.width];
            ensemble.run(&input, rows, &mut output);
            for (r, want) in case.expected.iter().enumerate() {
                for (c, w) in want.iter().enumerate() {
                    let got = output[r * case.width + c];
                    let ok = match (w.as_f64(), w.as_str()) {
                        (Some(w), _) => (f64::from(got) - w).abs() <= 1e-4 * w.abs().max(1.0),
                        (None, Some("nan")) => got.is_nan(),
                        (None, Some(inf)) => got.to_string() == inf,
                        _ => false,
                    };
                    if !ok {
                        failures.push(format!(
                            "case {i} ({} {}), row {r} column {c}: {got} against {}'s {w:?}",
                            case.kind, case.post, case.oracle
                        ));
                    }
                }
            }
        }
        assert!(
            failures.is_empty(),
            "{} differences:\n{}",
            failures.len(),
            failures.join("\n")
        );
    }
}
