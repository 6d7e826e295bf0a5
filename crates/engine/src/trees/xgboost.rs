//! XGBoost's JSON model format (`model.json`, as `save_model("model.json")` writes it),
//! compiled into a [`TreeEnsemble`] that answers as `Booster.predict` does (probabilities
//! for the logistic and softprob objectives, the value for regression).
//!
//! A node sends `x < split_condition` left and a missing value its `default_left` way;
//! `base_score` becomes a margin as the objective says (logit, log or as is). `gbtree` and
//! `dart` boosters are read; `gblinear`, categorical splits and vector leaves are refused
//! by name.

use serde::Deserialize;

use super::ensemble::{Aggregate, Branch, Builder, Mode, Output, PostTransform, TreeEnsemble};
use super::unsupported;
use crate::{BackendLoadError, ModelIo};

const WHAT: &str = "XGBoost model.json";

fn error(why: impl std::fmt::Display) -> BackendLoadError {
    unsupported(format!("{WHAT}: {why}"))
}

#[derive(Deserialize)]
struct File {
    learner: Learner,
}

#[derive(Deserialize)]
struct Learner {
    learner_model_param: ModelParam,
    objective: Named,
    gradient_booster: Booster,
}

#[derive(Deserialize)]
struct ModelParam {
    base_score: String,
    #[serde(default)]
    num_class: Option<String>,
    num_feature: String,
    #[serde(default)]
    num_target: Option<String>,
}

#[derive(Deserialize)]
struct Named {
    name: String,
}

#[derive(Deserialize)]
struct Booster {
    name: String,
    /// `gbtree`'s trees.
    model: Option<Model>,
    /// `dart`'s trees and their weights.
    gbtree: Option<Box<Booster>>,
    #[serde(default)]
    weight_drop: Vec<f64>,
}

#[derive(Deserialize)]
struct Model {
    trees: Vec<Tree>,
    tree_info: Vec<i64>,
}

#[derive(Deserialize)]
struct Tree {
    left_children: Vec<i64>,
    right_children: Vec<i64>,
    split_indices: Vec<i64>,
    split_conditions: Vec<f64>,
    default_left: Vec<u8>,
    #[serde(default)]
    split_type: Vec<u8>,
    tree_param: TreeParam,
}

#[derive(Deserialize)]
struct TreeParam {
    #[serde(default)]
    size_leaf_vector: Option<String>,
}

fn number<T: std::str::FromStr>(what: &str, s: &str) -> Result<T, BackendLoadError> {
    s.trim()
        .parse()
        .map_err(|_| error(format!("{what} {s:?} is not a number")))
}

/// `base_score`: one number, or a bracketed list (one per class or target).
fn base_scores(s: &str) -> Result<Vec<f64>, BackendLoadError> {
    s.trim()
        .trim_start_matches('[')
        .trim_end_matches(']')
        .split(',')
        .map(|v| number("base_score", v))
        .collect()
}

/// How an objective's `predict` turns a margin into its answer.
struct Objective {
    post: PostTransform,
    /// `base_score` to a margin.
    margin: fn(f64) -> f64,
    /// What `predict` answers.
    note: &'static str,
}

fn objective(name: &str) -> Result<Objective, BackendLoadError> {
    let same: fn(f64) -> f64 = |b| b;
    let logit: fn(f64) -> f64 = |b| (b / (1.0 - b)).ln();
    let log: fn(f64) -> f64 = f64::ln;
    let (post, margin, note) = match name {
        "reg:squarederror"
        | "reg:squaredlogerror"
        | "reg:pseudohubererror"
        | "reg:absoluteerror"
        | "reg:quantileerror"
        | "reg:linear"
        | "binary:logitraw"
        | "rank:pairwise"
        | "rank:ndcg"
        | "rank:map" => (PostTransform::None, same, "the value"),
        "reg:logistic" | "binary:logistic" => (
            PostTransform::Logistic,
            logit,
            "the probability of the positive class",
        ),
        "count:poisson" | "reg:gamma" | "reg:tweedie" | "survival:cox" => {
            (PostTransform::Exp, log, "exp of the margin")
        }
        "multi:softprob" | "multi:softmax" => (
            PostTransform::Softmax,
            same,
            "class probabilities, one column per class (softprob's answer)",
        ),
        other => return Err(error(format!("objective {other:?} is not supported"))),
    };
    Ok(Objective { post, margin, note })
}

/// Compiles an XGBoost JSON model.
///
/// # Errors
/// [`BackendLoadError::UnsupportedOp`] naming what is malformed or not supported.
pub fn parse(text: &str) -> Result<(ModelIo, TreeEnsemble), BackendLoadError> {
    let file: File =
        serde_json::from_str(text).map_err(|e| error(format!("not an XGBoost JSON model: {e}")))?;
    let learner = file.learner;
    let param = &learner.learner_model_param;
    let features: usize = number("num_feature", &param.num_feature)?;
    let classes: usize = param
        .num_class
        .as_deref()
        .map_or(Ok(0), |c| number("num_class", c))?;
    let outputs: usize = param
        .num_target
        .as_deref()
        .map_or(Ok(1), |t| number("num_target", t))?;
    let targets = classes.max(outputs).max(1);
    let Objective { post, margin, note } = objective(&learner.objective.name)?;
    let booster = learner.gradient_booster;
    let (model, weights) = match booster.name.as_str() {
        "gbtree" => (booster.model, Vec::new()),
        "dart" => match booster.gbtree {
            Some(inner) => (inner.model, booster.weight_drop),
            None => return Err(error("a dart booster without its trees")),
        },
        other => {
            return Err(error(format!(
                "booster {other:?} is not supported (gbtree and dart are)"
            )))
        }
    };
    let model = model.ok_or_else(|| error("the booster has no model"))?;
    if model.tree_info.len() != model.trees.len() {
        return Err(error("tree_info and trees differ in length"));
    }
    if !weights.is_empty() && weights.len() != model.trees.len() {
        return Err(error("weight_drop and trees differ in length"));
    }
    let mut b = Builder::new(WHAT, features, targets);
    let mut roots = Vec::with_capacity(model.trees.len());
    for (i, tree) in model.trees.iter().enumerate() {
        let target = model.tree_info[i];
        let scale = weights.get(i).copied().unwrap_or(1.0);
        if tree
            .tree_param
            .size_leaf_vector
            .as_deref()
            .is_some_and(|s| s.trim() != "0" && s.trim() != "1")
        {
            return Err(error(format!(
                "tree {i} has vector leaves (multi_output_tree), which are not supported"
            )));
        }
        let n = tree.left_children.len();
        for (what, len) in [
            ("right_children", tree.right_children.len()),
            ("split_indices", tree.split_indices.len()),
            ("split_conditions", tree.split_conditions.len()),
            ("default_left", tree.default_left.len()),
        ] {
            if len != n {
                return Err(error(format!(
                    "tree {i}: {what} has {len} entries, left_children {n}"
                )));
            }
        }
        if tree.split_type.iter().any(|&t| t != 0) {
            return Err(error(format!(
                "tree {i} has a categorical split, which is not supported (export it through ONNX)"
            )));
        }
        let first = b.nodes() as u32;
        for j in 0..n {
            if tree.left_children[j] == -1 {
                let leaf = b.leaf();
                b.weight(leaf, target, tree.split_conditions[j] * scale)?;
            } else {
                b.branch(Branch {
                    mode: Mode::Lt,
                    feature: tree.split_indices[j],
                    threshold: tree.split_conditions[j] as f32,
                    missing_true: tree.default_left[j] != 0,
                    zero_missing: false,
                    set: Vec::new(),
                })?;
            }
        }
        let child = |c: i64| {
            usize::try_from(c)
                .ok()
                .filter(|&c| c < n)
                .map(|c| first + c as u32)
                .ok_or_else(|| error(format!("tree {i} names node {c}, which it does not have")))
        };
        for j in 0..n {
            if tree.left_children[j] != -1 {
                let (t, f) = (
                    child(tree.left_children[j])?,
                    child(tree.right_children[j])?,
                );
                b.connect(first + j as u32, t, f);
            }
        }
        if n > 0 {
            roots.push(first);
        }
    }
    let mut base = base_scores(&param.base_score)?;
    if base.len() == 1 {
        base = vec![base[0]; targets];
    }
    let base = base.into_iter().map(margin).collect();
    let ensemble = b.finish(Some(roots), base, Aggregate::Sum, post, Output::Scores)?;
    let note = format!(
        "XGBoost objective {}: {note}, as Booster.predict answers",
        learner.objective.name
    );
    Ok((super::native_io(features, &ensemble, note), ensemble))
}
