//! LightGBM's text model format (`model.txt`, as `Booster.save_model` writes it), compiled
//! into a [`TreeEnsemble`] that answers as `Booster.predict` does (probabilities for the
//! binary and multiclass objectives, the raw score for regression).
//!
//! Thresholds are f64 in the file; an f32 feature `x` satisfies `x <= t` exactly when it
//! satisfies `x <= t'` with `t'` the largest f32 not above `t`, so the comparison is exact.
//! Missing values follow each node's `decision_type`: `missing_type=NaN` sends NaN the
//! default way, `Zero` sends NaN and `|x| <= 1e-35` the default way, `None` treats NaN as 0.
//! Categorical splits and linear trees are refused by name.

use std::collections::HashMap;

use super::ensemble::{Aggregate, Branch, Builder, Mode, Output, PostTransform, TreeEnsemble};
use super::unsupported;
use crate::{BackendLoadError, ModelIo};

const WHAT: &str = "LightGBM model.txt";

fn error(why: impl std::fmt::Display) -> BackendLoadError {
    unsupported(format!("{WHAT}: {why}"))
}

/// The largest f32 not above `t`.
pub(super) fn f32_at_most(t: f64) -> f32 {
    let f = t as f32;
    if f64::from(f) > t {
        f.next_down()
    } else {
        f
    }
}

/// The `key=value` lines of one section.
struct Section<'a> {
    name: &'a str,
    keys: HashMap<&'a str, &'a str>,
}

impl<'a> Section<'a> {
    fn get(&self, key: &str) -> Result<&'a str, BackendLoadError> {
        self.keys
            .get(key)
            .copied()
            .ok_or_else(|| error(format!("{} has no {key}", self.name)))
    }

    fn number<T: std::str::FromStr>(&self, key: &str) -> Result<T, BackendLoadError> {
        let v = self.get(key)?;
        v.trim()
            .parse()
            .map_err(|_| error(format!("{} has {key}={v}, not a number", self.name)))
    }

    /// A space-separated array of `len` numbers.
    fn array<T: std::str::FromStr>(
        &self,
        key: &str,
        len: usize,
    ) -> Result<Vec<T>, BackendLoadError> {
        let v = self.get(key)?;
        let values = v
            .split_whitespace()
            .map(str::parse)
            .collect::<Result<Vec<T>, _>>()
            .map_err(|_| error(format!("{} has a {key} that is not numbers", self.name)))?;
        if values.len() != len {
            return Err(error(format!(
                "{} has {} values of {key}, {len} expected",
                self.name,
                values.len()
            )));
        }
        Ok(values)
    }
}

/// How the scores become `predict`'s answer.
struct Objective {
    post: PostTransform,
    /// A factor folded into the leaf values (`sigmoid:` of the binary objectives).
    scale: f64,
    note: &'static str,
}

fn objective(line: &str) -> Result<Objective, BackendLoadError> {
    let mut parts = line.split_whitespace();
    let name = parts.next().unwrap_or("");
    let params: HashMap<&str, &str> = parts.filter_map(|p| p.split_once(':')).collect();
    let sigmoid = || -> Result<f64, BackendLoadError> {
        params.get("sigmoid").map_or(Ok(1.0), |s| {
            s.parse().map_err(|_| {
                error(format!(
                    "objective {line:?} has a sigmoid that is not a number"
                ))
            })
        })
    };
    if line.split_whitespace().any(|p| p == "sqrt") {
        return Err(error(format!(
            "objective {line:?}: the sqrt transform of the label is not supported"
        )));
    }
    Ok(match name {
        "regression"
        | "regression_l2"
        | "l2"
        | "mean_squared_error"
        | "mse"
        | "l2_root"
        | "root_mean_squared_error"
        | "rmse"
        | "regression_l1"
        | "l1"
        | "mean_absolute_error"
        | "mae"
        | "huber"
        | "fair"
        | "quantile"
        | "mape"
        | "mean_absolute_percentage_error"
        | "lambdarank"
        | "rank_xendcg"
        | "xendcg"
        | "xe_ndcg"
        | "xe_ndcg_mart"
        | "xendcg_mart"
        | "custom"
        | "none" => Objective {
            post: PostTransform::None,
            scale: 1.0,
            note: "the raw score",
        },
        "binary" => Objective {
            post: PostTransform::Logistic,
            scale: sigmoid()?,
            note: "the probability of the positive class",
        },
        "cross_entropy" | "xentropy" => Objective {
            post: PostTransform::Logistic,
            scale: 1.0,
            note: "the predicted probability",
        },
        "multiclass" | "softmax" => Objective {
            post: PostTransform::Softmax,
            scale: 1.0,
            note: "class probabilities, one column per class",
        },
        "multiclassova" | "multiclass_ova" | "ova" | "ovr" => Objective {
            post: PostTransform::Logistic,
            scale: sigmoid()?,
            note: "one-vs-all class probabilities, one column per class",
        },
        "poisson" | "gamma" | "tweedie" => Objective {
            post: PostTransform::Exp,
            scale: 1.0,
            note: "exp of the raw score",
        },
        other => return Err(error(format!("objective {other:?} is not supported"))),
    })
}

/// Splits `text` into its header and tree sections.
fn sections(text: &str) -> Result<(Section<'_>, Vec<Section<'_>>), BackendLoadError> {
    let mut header = Section {
        name: "the header",
        keys: HashMap::new(),
    };
    let mut trees: Vec<Section<'_>> = Vec::new();
    for line in text.lines() {
        let line = line.trim_end_matches('\r');
        if line == "end of trees" {
            return Ok((header, trees));
        }
        if let Some(name) = line.strip_prefix("Tree=") {
            trees.push(Section {
                name: if name.is_empty() { "a tree" } else { line },
                keys: HashMap::new(),
            });
            continue;
        }
        let section = trees.last_mut().unwrap_or(&mut header);
        match line.split_once('=') {
            Some((k, v)) => {
                section.keys.insert(k, v);
            }
            None if !line.is_empty() => {
                // Flags without a value (`average_output`).
                section.keys.insert(line, "");
            }
            None => {}
        }
    }
    Err(error(
        "no \"end of trees\" line: the file is not a LightGBM text model or is cut short",
    ))
}

/// Compiles a LightGBM text model.
///
/// # Errors
/// [`BackendLoadError::UnsupportedOp`] naming what is malformed or not supported.
pub fn parse(text: &str) -> Result<(ModelIo, TreeEnsemble), BackendLoadError> {
    if !text.starts_with("tree") {
        return Err(error("the file does not start with \"tree\""));
    }
    let (header, trees) = sections(text)?;
    let features = header.number::<usize>("max_feature_idx")? + 1;
    let per_iteration: usize = header.number("num_tree_per_iteration")?;
    if per_iteration == 0 {
        return Err(error("num_tree_per_iteration is 0"));
    }
    let objective = objective(header.get("objective")?)?;
    let average = header.keys.contains_key("average_output");
    if average && per_iteration > 1 {
        return Err(error(
            "average_output with more than one tree per iteration",
        ));
    }
    let mut b = Builder::new(WHAT, features, per_iteration);
    let mut roots = Vec::with_capacity(trees.len());
    for (i, tree) in trees.iter().enumerate() {
        let target = (i % per_iteration) as i64;
        let leaves: usize = tree.number("num_leaves")?;
        if tree.keys.get("is_linear").is_some_and(|v| v.trim() != "0") {
            return Err(error(format!(
                "{} is a linear tree, which is not supported",
                tree.name
            )));
        }
        let leaf_values: Vec<f64> = tree.array("leaf_value", leaves)?;
        if leaves == 1 {
            let leaf = b.leaf();
            b.weight(leaf, target, leaf_values[0])?;
            roots.push(leaf);
            continue;
        }
        let branches = leaves - 1;
        let split_feature: Vec<i64> = tree.array("split_feature", branches)?;
        let threshold: Vec<f64> = tree.array("threshold", branches)?;
        let decision: Vec<u8> = tree.array("decision_type", branches)?;
        let left: Vec<i64> = tree.array("left_child", branches)?;
        let right: Vec<i64> = tree.array("right_child", branches)?;
        let first = b.nodes() as u32;
        for j in 0..branches {
            let d = decision[j];
            if d & 1 != 0 {
                return Err(error(format!(
                    "{} has a categorical split, which is not supported (export it through ONNX)",
                    tree.name
                )));
            }
            let default_left = d & 2 != 0;
            let (missing_true, zero_missing) = match (d >> 2) & 3 {
                // None: NaN is 0.
                0 => (0.0 <= threshold[j], false),
                1 => (default_left, true),
                _ => (default_left, false),
            };
            b.branch(Branch {
                mode: Mode::Leq,
                feature: split_feature[j],
                threshold: f32_at_most(threshold[j]),
                missing_true,
                zero_missing,
                set: Vec::new(),
            })?;
        }
        let first_leaf = b.nodes() as u32;
        for &v in &leaf_values {
            let leaf = b.leaf();
            b.weight(leaf, target, v)?;
        }
        let child = |c: i64| -> Result<u32, BackendLoadError> {
            let (index, count, base) = if c >= 0 {
                (c, branches, first)
            } else {
                (!c, leaves, first_leaf)
            };
            usize::try_from(index)
                .ok()
                .filter(|&i| i < count)
                .map(|i| base + i as u32)
                .ok_or_else(|| {
                    error(format!(
                        "{} names child {c}, which it does not have",
                        tree.name
                    ))
                })
        };
        for j in 0..branches {
            let (t, f) = (child(left[j])?, child(right[j])?);
            b.connect(first + j as u32, t, f);
        }
        roots.push(first);
    }
    if trees.is_empty() {
        return Err(error("the model has no trees"));
    }
    b.scale_weights(objective.scale);
    let aggregate = if average {
        Aggregate::Average
    } else {
        Aggregate::Sum
    };
    let ensemble = b.finish(
        Some(roots),
        Vec::new(),
        aggregate,
        objective.post,
        Output::Scores,
    )?;
    let note = format!(
        "LightGBM objective {}: {}, as Booster.predict answers",
        header.get("objective")?.trim(),
        objective.note
    );
    Ok((super::native_io(features, &ensemble, note), ensemble))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thresholds_round_down_so_that_comparisons_stay_exact() {
        for t in [
            0.1f64,
            -0.767_398_923_635_482_7,
            1.0334447622299197,
            1e-35,
            -1e30,
            3.0,
        ] {
            let f = f32_at_most(t);
            assert!(f64::from(f) <= t);
            assert!(f64::from(f.next_up()) > t, "{t}: {f}");
        }
    }

    #[test]
    fn what_the_engine_cannot_run_is_refused_by_name() {
        let model = |decision: &str, objective: &str| {
            format!(
                "tree\nversion=v4\nnum_class=1\nnum_tree_per_iteration=1\nmax_feature_idx=1\nobjective={objective}\n\n\
                 Tree=0\nnum_leaves=2\nsplit_feature=0\nthreshold=0.5\ndecision_type={decision}\n\
                 left_child=-1\nright_child=-2\nleaf_value=1 2\nis_linear=0\n\n\nend of trees\n"
            )
        };
        assert!(parse(&model("2", "regression")).is_ok());
        let err = parse(&model("1", "regression")).err().unwrap().to_string();
        assert!(err.contains("categorical"), "{err}");
        let err = parse(&model("2", "lambdarank_custom"))
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("objective \"lambdarank_custom\""), "{err}");
        let err = parse(&model("2", "regression sqrt"))
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("sqrt"), "{err}");
        let cut = model("2", "regression").replace("end of trees\n", "");
        let err = parse(&cut).err().unwrap().to_string();
        assert!(err.contains("end of trees"), "{err}");
    }
}
