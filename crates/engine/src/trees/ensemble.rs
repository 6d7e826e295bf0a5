//! The compiled ensemble ([`TreeEnsemble`]): flat arrays built by [`Builder`] from any of
//! the formats, and the batch walk.
//!
//! Nodes are a structure of arrays indexed by node (feature, threshold, mode, both children,
//! how a missing value goes); leaf weights are contiguous per leaf. A batch is evaluated tree
//! by tree over its rows (one tree's nodes stay in cache for the whole batch), accumulating
//! in f64.

use super::unsupported;
use crate::BackendLoadError;

/// How a branch node compares its feature with its threshold (the true branch when it holds).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub(super) enum Mode {
    Leq,
    Lt,
    Gte,
    Gt,
    Eq,
    Neq,
    /// The feature is one of a set of values.
    Member,
    Leaf,
}

/// How the trees' values combine per target.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Aggregate {
    Sum,
    Average,
    Min,
    Max,
}

/// What is applied to the aggregated scores of a row.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum PostTransform {
    None,
    Logistic,
    Softmax,
    SoftmaxZero,
    /// onnxruntime's probit (its approximation of the inverse error function).
    Probit,
    /// `exp` of each score (the log-link objectives of the native formats).
    Exp,
}

/// How the scores of a row become its outputs (onnxruntime's rules where ONNX leaves them
/// open).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Output {
    /// A regressor's scores, post-transformed. Of several targets, one that no tree scored
    /// for the row is 0 (its base value is not added); a single target is its base value.
    Scores,
    /// A classifier's scores, post-transformed; a class no tree scored is its base value.
    Classes,
    /// A two-class classifier with one score `s`, all weights non-negative:
    /// `[1 - s, s]`, or `[σ(-s), σ(s)]` under LOGISTIC.
    BinaryComplement,
    /// A two-class classifier with one score `s`, weights of either sign: `[-s, s]`, or
    /// `[σ(-s), σ(s)]` under LOGISTIC.
    BinaryMirror,
}

/// Bits of [`TreeEnsemble::missing`].
const NAN_TRUE: u8 = 1;
/// A value within ±[`ZERO`] is missing too (LightGBM's `missing_type=Zero`).
const ZERO_MISSING: u8 = 2;
/// LightGBM's zero: `|x| <= 1e-35` in f64, which for an f32 `x` is `|x| <=` this.
const ZERO: f32 = 1e-35;

/// A compiled ensemble.
#[derive(Debug)]
pub struct TreeEnsemble {
    features: usize,
    /// Scores per row.
    targets: usize,
    roots: Vec<u32>,
    /// Per node: feature, threshold and children (the general walk reads them; the fast walk
    /// reads its own copy, [`Fast::nodes`]).
    nodes: Vec<Packed>,
    mode: Vec<Mode>,
    /// [`NAN_TRUE`] | [`ZERO_MISSING`].
    missing: Vec<u8>,
    /// Per [`Mode::Member`] node: its values' range in `members` (sorted); empty for others.
    set: Vec<(u32, u32)>,
    members: Vec<f32>,
    /// Per node: where its leaf weights start in `leaf_target`/`leaf_weight`, and how many.
    leaf_start: Vec<u32>,
    leaf_len: Vec<u32>,
    leaf_target: Vec<u32>,
    leaf_weight: Vec<f64>,
    base: Vec<f64>,
    aggregate: Aggregate,
    post: PostTransform,
    output: Output,
    /// The fast walk, when every branch compares the same way ([`Mode::Leq`], [`Mode::Lt`],
    /// [`Mode::Gte`] or [`Mode::Gt`]) and only NaN is missing (see [`TreeEnsemble::pack`]).
    fast: Option<Fast>,
    /// Of an ensemble of one target summed or averaged: each node's leaf weight (0 where it
    /// has none, which sums as no score does), added without the general walk over a leaf's
    /// entries.
    single: Option<Vec<f64>>,
}

/// A walk without branches on the data: at most a tree's depth of steps (a leaf steps to
/// itself; the walk ends once every lane is at its leaf), [`LANES`] walks in lockstep (rows
/// of a batch, or trees of a row) so that their loads overlap, and no test for NaN (see
/// [`Fast::missing`]).
#[derive(Debug)]
struct Fast {
    mode: Mode,
    /// What a NaN feature becomes in the second of the two planes of a row the fast walk reads
    /// (the row as it is, then again): the first is read by the nodes that send NaN the false
    /// way (every comparison with NaN is false), the second by those that send it the true
    /// way, where NaN becomes a value every threshold sends the true way (−∞ for `<=` and
    /// `<`, +∞ for `>=` and `>`), so that a step needs no test for NaN.
    missing: f32,
    /// The trees again, breadth first with each node's children side by side (`[false,
    /// true]` from `children`), so that a step adds the comparison to an index instead of
    /// loading the child; a leaf is its own child, with a NaN threshold (no comparison holds).
    nodes: Vec<FastNode>,
    /// Per tree: its root in `nodes`.
    roots: Vec<u32>,
    /// Per entry of `nodes`: the ensemble's node it copies (for a leaf's weights).
    origin: Vec<u32>,
    /// Per tree: the fewest and the most steps from its root to a leaf.
    depth: Vec<(u32, u32)>,
    /// Per group of [`LANES`] trees: the fewest and the most steps of any of them.
    group_depth: Vec<(u32, u32)>,
}

/// A node: the feature (plus the feature count where NaN goes the true way, as [`NAN_TRUE`]
/// says: the index the fast walk reads in its two planes of a row, see [`Fast::missing`]),
/// the threshold, and the children as `[false, true]` (a leaf's both itself).
#[derive(Clone, Copy, Debug)]
#[repr(C)]
struct Packed {
    feature: u32,
    threshold: f32,
    child: [u32; 2],
}

/// A node of the fast walk (see [`Fast::nodes`]).
#[derive(Clone, Copy, Debug)]
#[repr(C)]
struct FastNode {
    /// As [`Packed::feature`].
    feature: u32,
    threshold: f32,
    /// The false child; the true one follows it.
    children: u32,
}

/// Walks in lockstep.
const LANES: usize = 16;

/// One step of the fast walk from `p` for `planes`, a row as the fast walk reads it (see
/// [`Fast::missing`]; `M`: the mode, as `Mode as u8`).
///
/// # Safety
/// `planes` holds twice the ensemble's features, at least one (`p.feature` is below that:
/// `Builder::branch` checks the feature, `Builder::push` adds at most the feature count, and a
/// leaf reads feature 0).
#[inline(always)]
unsafe fn step<const M: u8>(p: &FastNode, planes: &[f32]) -> u32 {
    // SAFETY: as the caller promises.
    let x = unsafe { *planes.get_unchecked(p.feature as usize) };
    let t = p.threshold;
    let holds = match M {
        0 => x <= t,
        1 => x < t,
        2 => x >= t,
        _ => x > t,
    };
    p.children + u32::from(holds)
}

/// A branch as a format describes it, before its children are known.
pub(super) struct Branch {
    pub mode: Mode,
    pub feature: i64,
    pub threshold: f32,
    /// Whether NaN (and, with `zero_missing`, a zero) takes the true branch.
    pub missing_true: bool,
    pub zero_missing: bool,
    /// The values of a [`Mode::Member`] node.
    pub set: Vec<f32>,
}

/// Builds a [`TreeEnsemble`] node by node, checking what a format's file says.
pub(super) struct Builder {
    /// The operator or format, for errors.
    what: &'static str,
    e: TreeEnsemble,
    weights: Vec<Vec<(u32, f64)>>,
}

const UNSET: u32 = u32::MAX;

impl Builder {
    pub fn new(what: &'static str, features: usize, targets: usize) -> Self {
        Self {
            what,
            e: TreeEnsemble {
                features,
                targets,
                roots: Vec::new(),
                nodes: Vec::new(),
                mode: Vec::new(),
                missing: Vec::new(),
                set: Vec::new(),
                members: Vec::new(),
                leaf_start: Vec::new(),
                leaf_len: Vec::new(),
                leaf_target: Vec::new(),
                leaf_weight: Vec::new(),
                base: Vec::new(),
                aggregate: Aggregate::Sum,
                post: PostTransform::None,
                output: Output::Scores,
                fast: None,
                single: None,
            },
            weights: Vec::new(),
        }
    }

    pub fn error(&self, why: impl std::fmt::Display) -> BackendLoadError {
        unsupported(format!("{}: {why}", self.what))
    }

    fn push(&mut self, mode: Mode, feature: u32, threshold: f32, missing: u8) -> u32 {
        self.e.mode.push(mode);
        let plane = if missing & NAN_TRUE != 0 {
            self.e.features as u32
        } else {
            0
        };
        self.e.nodes.push(Packed {
            feature: feature + plane,
            threshold,
            child: [UNSET; 2],
        });
        self.e.missing.push(missing);
        self.e.set.push((0, 0));
        self.weights.push(Vec::new());
        (self.e.mode.len() - 1) as u32
    }

    /// Adds a branch; its children come with [`Builder::connect`].
    pub fn branch(&mut self, b: Branch) -> Result<u32, BackendLoadError> {
        // A node's feature index holds the feature count added (see `Packed`).
        if self.e.features > (u32::MAX / 2) as usize {
            return Err(self.error(format!(
                "{} features: the tree engine reads at most {}",
                self.e.features,
                u32::MAX / 2
            )));
        }
        let feature = usize::try_from(b.feature)
            .ok()
            .filter(|&f| f < self.e.features)
            .ok_or_else(|| {
                self.error(format!(
                    "a node reads feature {}, the input has {}",
                    b.feature, self.e.features
                ))
            })?;
        // NaN != t holds: a NEQ node sends NaN the true way whatever it says (as onnxruntime
        // and ONNX's reference do).
        let nan_true = b.missing_true || b.mode == Mode::Neq;
        let missing =
            if nan_true { NAN_TRUE } else { 0 } | if b.zero_missing { ZERO_MISSING } else { 0 };
        let node = self.push(b.mode, feature as u32, b.threshold, missing);
        if b.mode == Mode::Member {
            let mut set = b.set;
            set.retain(|v| !v.is_nan());
            set.sort_by(f32::total_cmp);
            set.dedup();
            let start = self.e.members.len() as u32;
            self.e.members.extend(&set);
            self.e.set[node as usize] = (start, set.len() as u32);
        }
        Ok(node)
    }

    /// Adds a leaf; its values come with [`Builder::weight`].
    pub fn leaf(&mut self) -> u32 {
        let node = self.push(Mode::Leaf, 0, 0.0, 0);
        self.e.nodes[node as usize].child = [node; 2];
        node
    }

    pub fn is_leaf(&self, node: u32) -> bool {
        self.e.mode[node as usize] == Mode::Leaf
    }

    pub fn nodes(&self) -> usize {
        self.e.mode.len()
    }

    pub fn connect(&mut self, node: u32, true_child: u32, false_child: u32) {
        self.e.nodes[node as usize].child = [false_child, true_child];
    }

    /// Adds `weight` to `target` at `leaf`.
    pub fn weight(&mut self, leaf: u32, target: i64, weight: f64) -> Result<(), BackendLoadError> {
        if self.e.mode[leaf as usize] != Mode::Leaf {
            return Err(self.error("a weight names a node that is no leaf"));
        }
        let target = u32::try_from(target)
            .ok()
            .filter(|&t| (t as usize) < self.e.targets)
            .ok_or_else(|| self.error(format!("target {target} of {} targets", self.e.targets)))?;
        self.weights[leaf as usize].push((target, weight));
        Ok(())
    }

    /// Multiplies every leaf weight (a native format's scale folded into its leaves).
    pub fn scale_weights(&mut self, by: f64) {
        for w in self.weights.iter_mut().flatten() {
            w.1 *= by;
        }
    }

    /// The ensemble, with `roots` (the nodes no node points to when `None`).
    pub fn finish(
        mut self,
        roots: Option<Vec<u32>>,
        base: Vec<f64>,
        aggregate: Aggregate,
        post: PostTransform,
        output: Output,
    ) -> Result<TreeEnsemble, BackendLoadError> {
        let n = self.e.mode.len();
        let mut is_child = vec![false; n];
        for i in 0..n {
            let [f, t] = self.e.nodes[i].child;
            if t as usize >= n || f as usize >= n {
                return Err(self.error("a branch names a child that does not exist"));
            }
            if self.e.mode[i] != Mode::Leaf {
                is_child[t as usize] = true;
                is_child[f as usize] = true;
            }
        }
        self.e.roots = match roots {
            Some(r) if r.iter().any(|&r| r as usize >= n) => {
                return Err(self.error("a tree root does not exist"))
            }
            Some(r) => r,
            None => (0..n as u32).filter(|&i| !is_child[i as usize]).collect(),
        };
        if self.e.roots.is_empty() && n > 0 {
            return Err(self.error("no tree has a root"));
        }
        if !base.is_empty() && base.len() != self.e.targets {
            return Err(self.error(format!(
                "{} base values for {} targets",
                base.len(),
                self.e.targets
            )));
        }
        self.e.base = base;
        self.e.base.resize(self.e.targets, 0.0);
        self.e.aggregate = aggregate;
        self.e.post = post;
        self.e.output = output;
        self.e.leaf_start = vec![0; n];
        self.e.leaf_len = vec![0; n];
        for (leaf, entries) in std::mem::take(&mut self.weights).into_iter().enumerate() {
            self.e.leaf_start[leaf] = self.e.leaf_target.len() as u32;
            self.e.leaf_len[leaf] = entries.len() as u32;
            for (t, w) in entries {
                self.e.leaf_target.push(t);
                self.e.leaf_weight.push(w);
            }
        }
        self.check_acyclic()?;
        self.e.fast = self.e.pack();
        // With finite weights: a NaN weight counts as no score in the general walk's sums.
        if self.e.targets == 1
            && matches!(aggregate, Aggregate::Sum | Aggregate::Average)
            && self.e.leaf_weight.iter().all(|w| w.is_finite())
        {
            let e = &self.e;
            self.e.single = Some(
                (0..n)
                    .map(|leaf| {
                        let start = e.leaf_start[leaf] as usize;
                        e.leaf_weight[start..start + e.leaf_len[leaf] as usize]
                            .iter()
                            .sum()
                    })
                    .collect(),
            );
        }
        Ok(self.e)
    }

    /// Refuses a tree whose walk could loop (a node reachable from itself).
    fn check_acyclic(&self) -> Result<(), BackendLoadError> {
        let e = &self.e;
        // 0: unseen, 1: on the current path, 2: done.
        let mut state = vec![0u8; e.mode.len()];
        for &root in &e.roots {
            let mut stack = vec![(root, false)];
            while let Some((node, leaving)) = stack.pop() {
                let i = node as usize;
                if leaving {
                    state[i] = 2;
                    continue;
                }
                match state[i] {
                    1 => return Err(self.error("a tree has a cycle")),
                    2 => continue,
                    _ => {}
                }
                state[i] = 1;
                stack.push((node, true));
                if e.mode[i] != Mode::Leaf {
                    for child in e.nodes[i].child {
                        stack.push((child, false));
                    }
                }
            }
        }
        Ok(())
    }
}

impl TreeEnsemble {
    /// The [`Fast`] walk, where the nodes allow it (the tree has no cycle: checked before): one
    /// way of comparing, only NaN missing, no NaN threshold, at least one feature, and no
    /// strict comparison with the infinity NaN becomes on a node sending NaN the true way.
    fn pack(&self) -> Option<Fast> {
        let branches = || (0..self.mode.len()).filter(|&i| self.mode[i] != Mode::Leaf);
        let mode = branches().next().map_or(Mode::Leq, |i| self.mode[i]);
        let missing = match mode {
            Mode::Leq | Mode::Lt => f32::NEG_INFINITY,
            _ => f32::INFINITY,
        };
        // −∞ < −∞ and +∞ > +∞ are false: a node sending NaN the true way with that
        // threshold needs the NaN test of the other walk.
        let strict = matches!(mode, Mode::Lt | Mode::Gt);
        if !matches!(mode, Mode::Leq | Mode::Lt | Mode::Gte | Mode::Gt)
            || self.features == 0
            || branches().any(|i| {
                let t = self.nodes[i].threshold;
                self.mode[i] != mode
                    || self.missing[i] & ZERO_MISSING != 0
                    || t.is_nan()
                    || (strict && self.missing[i] & NAN_TRUE != 0 && t == missing)
            })
        {
            return None;
        }
        let depth: Vec<(u32, u32)> = self.roots.iter().map(|&r| self.depth(r)).collect();
        let group_depth = depth
            .chunks(LANES)
            .map(|g| {
                let shallowest = g.iter().map(|d| d.0).min().unwrap_or(0);
                (shallowest, g.iter().map(|d| d.1).max().unwrap_or(0))
            })
            .collect();
        // A node two parents share is copied for each; past twice the ensemble's nodes the
        // walk that follows the children is kept.
        let limit = 2 * self.nodes.len() + 2;
        let unset = FastNode {
            feature: 0,
            threshold: f32::NAN,
            children: 0,
        };
        let (mut nodes, mut origin, mut roots) = (Vec::new(), Vec::new(), Vec::new());
        for &root in &self.roots {
            roots.push(nodes.len() as u32);
            nodes.push(unset);
            origin.push(root);
            let mut i = nodes.len() - 1;
            while i < nodes.len() {
                if nodes.len() > limit {
                    return None;
                }
                let old = origin[i] as usize;
                nodes[i] = if self.mode[old] == Mode::Leaf {
                    FastNode {
                        children: i as u32,
                        ..unset
                    }
                } else {
                    let p = self.nodes[old];
                    let children = nodes.len() as u32;
                    for child in p.child {
                        nodes.push(unset);
                        origin.push(child);
                    }
                    FastNode {
                        feature: p.feature,
                        threshold: p.threshold,
                        children,
                    }
                };
                i += 1;
            }
        }
        Some(Fast {
            mode,
            missing,
            nodes,
            roots,
            origin,
            depth,
            group_depth,
        })
    }

    /// The fewest and the most steps from `root` to a leaf.
    fn depth(&self, root: u32) -> (u32, u32) {
        let (mut shallowest, mut deepest) = (u32::MAX, 0);
        let mut stack = vec![(root, 0u32)];
        while let Some((n, d)) = stack.pop() {
            let i = n as usize;
            if self.mode[i] == Mode::Leaf {
                shallowest = shallowest.min(d);
                deepest = deepest.max(d);
            } else {
                for child in self.nodes[i].child {
                    stack.push((child, d + 1));
                }
            }
        }
        (shallowest.min(deepest), deepest)
    }

    /// Features per row.
    pub fn features(&self) -> usize {
        self.features
    }

    /// Values per row served.
    pub fn outputs(&self) -> usize {
        match self.output {
            Output::Scores | Output::Classes => self.targets,
            Output::BinaryComplement | Output::BinaryMirror => 2,
        }
    }

    /// Trees in the ensemble.
    pub fn trees(&self) -> usize {
        self.roots.len()
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
            let node = &self.nodes[n];
            let f = node.feature as usize;
            let x = row[if f >= self.features {
                f - self.features
            } else {
                f
            }];
            let t = node.threshold;
            let missing = self.missing[n];
            let go_true = if x.is_nan() || (missing & ZERO_MISSING != 0 && x.abs() <= ZERO) {
                missing & NAN_TRUE != 0
            } else {
                match mode {
                    Mode::Leq => x <= t,
                    Mode::Lt => x < t,
                    Mode::Gte => x >= t,
                    Mode::Gt => x > t,
                    Mode::Eq => x == t,
                    Mode::Neq => x != t,
                    Mode::Member => {
                        let (start, len) = self.set[n];
                        self.members[start as usize..(start + len) as usize]
                            .binary_search_by(|m| m.total_cmp(&x))
                            .is_ok()
                    }
                    Mode::Leaf => unreachable!("returned above"),
                }
            };
            n = node.child[usize::from(go_true)] as usize;
        }
    }

    /// Scores `rows` rows of `input` into `output` (`rows * outputs()` values).
    pub fn run(&self, input: &[f32], rows: usize, output: &mut [f32]) {
        let (w, k) = (self.features, self.targets);
        // NaN: no tree has scored this target yet (0 with `single`, where it is the same).
        let unscored = if self.single.is_some() { 0.0 } else { f64::NAN };
        let mut acc = vec![unscored; rows * k];
        match self.fast.as_ref().map(|f| f.mode) {
            Some(Mode::Leq) => self.run_fast::<0>(input, rows, &mut acc),
            Some(Mode::Lt) => self.run_fast::<1>(input, rows, &mut acc),
            Some(Mode::Gte) => self.run_fast::<2>(input, rows, &mut acc),
            Some(_) => self.run_fast::<3>(input, rows, &mut acc),
            None => {
                for &root in &self.roots {
                    for r in 0..rows {
                        let leaf = self.leaf(root, &input[r * w..(r + 1) * w]);
                        self.add(leaf, &mut acc[r * k..(r + 1) * k]);
                    }
                }
            }
        }
        let o = self.outputs();
        for r in 0..rows {
            self.finish_row(
                &mut acc[r * k..(r + 1) * k],
                &mut output[r * o..(r + 1) * o],
            );
        }
    }

    /// Adds the weights of `leaf` to row `r`'s scores in `acc`.
    #[inline(always)]
    fn add_fast(&self, leaf: usize, r: usize, acc: &mut [f64]) {
        match &self.single {
            Some(values) => acc[r] += values[leaf],
            None => {
                let k = self.targets;
                self.add(leaf, &mut acc[r * k..(r + 1) * k]);
            }
        }
    }

    /// Adds the weights of `leaf` to a row's `scores`.
    #[inline]
    fn add(&self, leaf: usize, scores: &mut [f64]) {
        let start = self.leaf_start[leaf] as usize;
        let end = start + self.leaf_len[leaf] as usize;
        for j in start..end {
            let (t, v) = (self.leaf_target[j] as usize, self.leaf_weight[j]);
            let s = scores[t];
            scores[t] = match self.aggregate {
                _ if s.is_nan() => v,
                Aggregate::Sum | Aggregate::Average => s + v,
                Aggregate::Min => s.min(v),
                Aggregate::Max => s.max(v),
            };
        }
    }

    /// [`LANES`] walks in lockstep, of `depth.1` steps at most: the first `depth.0` (no walk
    /// reaches a leaf sooner) without looking, then until every walk is at its leaf.
    ///
    /// # Safety
    /// Each of `rows` holds twice the ensemble's features (the planes of `run_fast`).
    #[inline(always)]
    unsafe fn walk<const M: u8>(
        nodes: &[FastNode],
        at: &mut [u32; LANES],
        rows: &[&[f32]; LANES],
        depth: (u32, u32),
    ) {
        for _ in 0..depth.0 {
            for k in 0..LANES {
                // SAFETY: a walk starts at a root and moves to a child, and `pack` made every
                // root and child a node; the caller promises the rows.
                at[k] = unsafe { step::<M>(nodes.get_unchecked(at[k] as usize), rows[k]) };
            }
        }
        for _ in depth.0..depth.1 {
            let mut moved = false;
            for k in 0..LANES {
                // SAFETY: as above.
                let next = unsafe { step::<M>(nodes.get_unchecked(at[k] as usize), rows[k]) };
                moved |= next != at[k];
                at[k] = next;
            }
            // Every lane at its leaf (a leaf steps to itself): an unbalanced tree's walks
            // end before its depth.
            if !moved {
                break;
            }
        }
    }

    /// The fast walk: of a batch, [`LANES`] rows at a time through each tree; of fewer rows,
    /// [`LANES`] trees at a time for each row.
    fn run_fast<const M: u8>(&self, input: &[f32], rows: usize, acc: &mut [f64]) {
        let Some(fast) = &self.fast else { return };
        let w = self.features;
        // Each row as two planes, NaN replaced in the second (see `Fast::missing`).
        let mut planes = vec![0.0f32; rows * 2 * w];
        for (src, dst) in input.chunks_exact(w).zip(planes.chunks_exact_mut(2 * w)) {
            let (as_is, replaced) = dst.split_at_mut(w);
            as_is.copy_from_slice(src);
            for (x, r) in src.iter().zip(replaced) {
                *r = if x.is_nan() { fast.missing } else { *x };
            }
        }
        let row = |r: usize| &planes[r * 2 * w..(r + 1) * 2 * w];
        if rows >= LANES {
            for (tree, &root) in fast.roots.iter().enumerate() {
                for first in (0..rows).step_by(LANES) {
                    let n = (rows - first).min(LANES);
                    let mut at = [root; LANES];
                    // Lanes past the batch walk its last row again, unused.
                    let lanes: [&[f32]; LANES] = std::array::from_fn(|l| row(first + l.min(n - 1)));
                    // SAFETY: the lanes are rows of `planes`.
                    unsafe { Self::walk::<M>(&fast.nodes, &mut at, &lanes, fast.depth[tree]) };
                    for (l, &leaf) in at[..n].iter().enumerate() {
                        let r = first + l;
                        self.add_fast(fast.origin[leaf as usize] as usize, r, acc);
                    }
                }
            }
        } else {
            for r in 0..rows {
                let lanes = [row(r); LANES];
                for (group, roots) in fast.roots.chunks(LANES).enumerate() {
                    // Lanes past the last tree walk it again, unused.
                    let mut at: [u32; LANES] =
                        std::array::from_fn(|l| roots[l.min(roots.len() - 1)]);
                    // SAFETY: the lanes are a row of `planes`.
                    unsafe {
                        Self::walk::<M>(&fast.nodes, &mut at, &lanes, fast.group_depth[group])
                    };
                    for &leaf in &at[..roots.len()] {
                        self.add_fast(fast.origin[leaf as usize] as usize, r, acc);
                    }
                }
            }
        }
    }

    fn finish_row(&self, scores: &mut [f64], out: &mut [f32]) {
        let trees = self.roots.len().max(1) as f64;
        let unscored_zero = self.output == Output::Scores && scores.len() > 1;
        for (s, b) in scores.iter_mut().zip(&self.base) {
            if s.is_nan() {
                *s = if unscored_zero { 0.0 } else { *b };
                continue;
            }
            if self.aggregate == Aggregate::Average {
                *s /= trees;
            }
            *s += b;
        }
        match self.output {
            Output::Scores | Output::Classes => {
                post_transform(self.post, scores);
                for (o, s) in out.iter_mut().zip(scores.iter()) {
                    *o = *s as f32;
                }
            }
            Output::BinaryComplement | Output::BinaryMirror => {
                let s = scores[0];
                let (a, b) = if self.post == PostTransform::Logistic {
                    (logistic(-s), logistic(s))
                } else if self.output == Output::BinaryComplement {
                    (1.0 - s, s)
                } else {
                    (-s, s)
                };
                out[0] = a as f32;
                out[1] = b as f32;
            }
        }
    }
}

fn logistic(s: f64) -> f64 {
    1.0 / (1.0 + (-s).exp())
}

/// onnxruntime's probit: `√2 · erfinv(2p − 1)` with the inverse error function approximated
/// as onnxruntime does (Winitzki's formula, a = 0.147), in f32, so that answers match it.
fn probit(p: f64) -> f64 {
    let x = 2.0 * p as f32 - 1.0;
    let sign = if x < 0.0 { -1.0f32 } else { 1.0 };
    let x = (1.0 - x) * (1.0 + x);
    let ln = x.ln();
    // onnxruntime's own value of π, for the same answers.
    #[allow(clippy::approx_constant)]
    const PI: f32 = 3.14159;
    let v = 2.0 / (PI * 0.147) + 0.5 * ln;
    let v2 = 1.0 / 0.147 * ln;
    let v3 = -v + (v * v - v2).sqrt();
    f64::from(std::f32::consts::SQRT_2 * sign * v3.sqrt())
}

pub(super) fn post_transform(post: PostTransform, scores: &mut [f64]) {
    match post {
        PostTransform::None => {}
        PostTransform::Logistic => scores.iter_mut().for_each(|s| *s = logistic(*s)),
        PostTransform::Probit => scores.iter_mut().for_each(|s| *s = probit(*s)),
        PostTransform::Exp => scores.iter_mut().for_each(|s| *s = s.exp()),
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

#[cfg(test)]
mod tests {
    use super::*;

    /// One tree: a branch on feature 0 against `threshold` (NaN the way `missing_true` says),
    /// scoring 1 on the true side and 2 on the false side.
    fn stump(mode: Mode, threshold: f32, missing_true: bool) -> TreeEnsemble {
        let mut b = Builder::new("stump", 1, 1);
        let branch = b
            .branch(Branch {
                mode,
                feature: 0,
                threshold,
                missing_true,
                zero_missing: false,
                set: Vec::new(),
            })
            .unwrap();
        let (yes, no) = (b.leaf(), b.leaf());
        b.weight(yes, 0, 1.0).unwrap();
        b.weight(no, 0, 2.0).unwrap();
        b.connect(branch, yes, no);
        b.finish(
            None,
            Vec::new(),
            Aggregate::Sum,
            PostTransform::None,
            Output::Scores,
        )
        .unwrap()
    }

    /// NaN goes the way each node says on both walks, infinite thresholds and values
    /// included, at batch sizes under and over the lanes; a strict comparison with the
    /// infinity that NaN would become sends such an ensemble to the walk that tests NaN.
    #[test]
    fn nan_takes_each_nodes_way_against_infinite_thresholds() {
        let values = [f32::NAN, f32::INFINITY, f32::NEG_INFINITY, 0.0, -1.5, 2.5];
        for mode in [Mode::Leq, Mode::Lt, Mode::Gte, Mode::Gt] {
            for threshold in [f32::INFINITY, f32::NEG_INFINITY, 0.0] {
                for missing_true in [false, true] {
                    let e = stump(mode, threshold, missing_true);
                    let strict_on_sentinel = missing_true
                        && matches!(
                            (mode, threshold),
                            (Mode::Lt, f32::NEG_INFINITY) | (Mode::Gt, f32::INFINITY)
                        );
                    assert_eq!(
                        e.fast.is_some(),
                        !strict_on_sentinel,
                        "{mode:?} {threshold}"
                    );
                    for rows in [1, LANES + 3] {
                        let input: Vec<f32> = (0..rows).map(|r| values[r % values.len()]).collect();
                        let mut out = vec![0.0; rows];
                        e.run(&input, rows, &mut out);
                        for (x, got) in input.iter().zip(&out) {
                            let holds = if x.is_nan() {
                                missing_true
                            } else {
                                match mode {
                                    Mode::Leq => *x <= threshold,
                                    Mode::Lt => *x < threshold,
                                    Mode::Gte => *x >= threshold,
                                    _ => *x > threshold,
                                }
                            };
                            let want = if holds { 1.0 } else { 2.0 };
                            assert_eq!(
                                *got, want,
                                "{mode:?} {threshold} NaN-true {missing_true}, x {x}, {rows} rows"
                            );
                        }
                    }
                }
            }
        }
    }
}
