//! The router: strategies, weighted splits and ensembles, from the repository's
//! `routing.toml` (read at start and by every whole-repository reload).
//!
//! ```toml
//! # A strategy's requests go to one of its targets: the one its `model_routing_hint` names,
//! # else one drawn by weight from a hash of the request id (the same id, the same target).
//! [strategies.momentum]
//! targets = [
//!     { model = "multi", version = "stable", weight = 90 },
//!     { model = "multi", version = "canary", weight = 10 },
//! ]
//!
//! # An ensemble is a model of its own (`model_name = "blend"`, metrics key `blend:ensemble`):
//! # its members run on the same features and their outputs are combined, value by value.
//! [ensembles.blend]
//! combine = "weighted_mean"     # or "median"
//! members = [
//!     { model = "multi", version = "1", weight = 0.7 },
//!     { model = "multi", version = "2", weight = 0.3 },
//! ]
//!
//! # A shadow: the rows version 1 answers (or a share of them) also go to version 2, off the
//! # hot path, after version 1's answer is written; only version 1 answers. How the two differ
//! # is reported in `performance/multi:1` and /metrics.
//! [shadows."multi:1"]
//! shadow = "multi:2"
//! sample_rate = 1.0             # the share of rows shadowed, in (0, 1]
//! tolerance = 1e-6              # |a − b| ≤ tolerance × max(1, |a|) counts as within
//! ```
#![forbid(unsafe_code)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// A model (and version) a strategy or ensemble uses.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RouteTarget {
    /// Model name.
    pub model: String,
    /// Version number or label; absent: the model's default.
    #[serde(default)]
    pub version: Option<String>,
    /// Share of the strategy's requests, or weight in a weighted mean (default 1).
    #[serde(default = "one")]
    pub weight: f32,
}

fn one() -> f32 {
    1.0
}

impl RouteTarget {
    /// `model` or `model:version`.
    pub fn key(&self) -> String {
        match &self.version {
            Some(v) => format!("{}:{v}", self.model),
            None => self.model.clone(),
        }
    }
}

/// How an ensemble combines its members' outputs, value by value.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Combine {
    /// Σ wᵢ·vᵢ / Σ wᵢ.
    #[default]
    WeightedMean,
    /// The median of the members' values (weights not used; the mean of the middle two for
    /// an even count).
    Median,
}

/// An ensemble: in `routing.toml`, or per request in `StrategyContext.ensemble_config`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct EnsembleConfig {
    /// The models run on the same features (at most [`MAX_ENSEMBLE_MEMBERS`]; checked when
    /// it runs: the same layout and the same number of values).
    pub members: Vec<RouteTarget>,
    /// How their outputs combine.
    #[serde(default)]
    pub combine: Combine,
}

/// A strategy's routing rule.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Strategy {
    /// Where its requests may go.
    pub targets: Vec<RouteTarget>,
}

/// A shadow of a primary version (`[shadows."name:version"]`).
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ShadowRule {
    /// The version that also runs the primary's rows: `name:version` (a number or a label),
    /// or `name` for that model's default version.
    pub shadow: String,
    /// The share of the primary's answered rows it gets, in (0, 1], spread evenly.
    #[serde(default = "full_share")]
    pub sample_rate: f64,
    /// An output within `tolerance × max(1, |primary's|)` of the primary's counts as within
    /// tolerance.
    #[serde(default = "default_tolerance")]
    pub tolerance: f64,
}

fn full_share() -> f64 {
    1.0
}

fn default_tolerance() -> f64 {
    1e-6
}

/// `routing.toml`.
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Routing {
    /// By strategy name.
    pub strategies: BTreeMap<String, Strategy>,
    /// By ensemble name.
    pub ensembles: BTreeMap<String, EnsembleConfig>,
    /// By primary: `name:version` (a number or a label), or `name` for the model's default.
    pub shadows: BTreeMap<String, ShadowRule>,
}

/// Why `routing.toml` was refused.
#[derive(Debug, thiserror::Error)]
pub enum RoutingError {
    /// Unreadable.
    #[error("cannot read {}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// Not valid TOML or an unknown key.
    #[error("invalid {}: {source}", path.display())]
    Parse {
        /// The file.
        path: PathBuf,
        /// The error.
        source: Box<toml::de::Error>,
    },
    /// A rule that cannot work.
    #[error("invalid {}: {why}", path.display())]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What.
        why: TargetsError,
    },
}

impl Routing {
    /// `<repo>/routing.toml`, or no rule when there is none.
    ///
    /// # Errors
    /// [`RoutingError`]: unreadable, invalid, or a rule that cannot work.
    pub fn load(repo: &Path) -> Result<Self, RoutingError> {
        let path = repo.join("routing.toml");
        if !path.exists() {
            return Ok(Self::default());
        }
        let text = std::fs::read_to_string(&path).map_err(|source| RoutingError::Io {
            path: path.clone(),
            source,
        })?;
        let routing: Self = toml::from_str(&text).map_err(|source| RoutingError::Parse {
            path: path.clone(),
            source: Box::new(source),
        })?;
        routing
            .validate()
            .map_err(|why| RoutingError::Invalid { path, why })?;
        Ok(routing)
    }

    /// Checks what can be checked without the models: targets and weights.
    ///
    /// # Errors
    /// The first strategy or ensemble whose targets cannot work.
    pub fn validate(&self) -> Result<(), TargetsError> {
        for (name, s) in &self.strategies {
            check_targets(&format!("strategy {name:?}"), &s.targets)?;
        }
        for (name, e) in &self.ensembles {
            check_ensemble(&format!("ensemble {name:?}"), e)?;
        }
        for (primary, rule) in &self.shadows {
            check_shadow(primary, rule)?;
        }
        Ok(())
    }
}

/// Most members of an ensemble.
pub const MAX_ENSEMBLE_MEMBERS: usize = 16;

/// Why a strategy's targets or an ensemble's members cannot work; `what` names the strategy
/// or ensemble (`ensemble "avg"`).
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum TargetsError {
    /// More members than an ensemble may have.
    #[error("{what} has {members} members; at most {MAX_ENSEMBLE_MEMBERS}")]
    TooManyMembers {
        /// The ensemble.
        what: String,
        /// Its members.
        members: usize,
    },
    /// No target at all.
    #[error("{what} has no target")]
    NoTarget {
        /// The strategy or ensemble.
        what: String,
    },
    /// A negative or non-finite weight.
    #[error("{what}: target {target} has weight {weight}; weights are finite and not negative")]
    BadWeight {
        /// The strategy or ensemble.
        what: String,
        /// The target (`name` or `name:version`).
        target: String,
        /// Its weight.
        weight: f32,
    },
    /// Every weight is 0.
    #[error("{what}: every weight is 0")]
    AllZero {
        /// The strategy or ensemble.
        what: String,
    },
    /// A shadow rule that cannot work.
    #[error("shadow of {primary:?}: {why}")]
    BadShadow {
        /// The primary's key.
        primary: String,
        /// What is wrong.
        why: String,
    },
}

/// A shadow rule: two different keys, a share in (0, 1], a finite tolerance ≥ 0.
///
/// # Errors
/// [`TargetsError::BadShadow`] saying what is wrong.
pub fn check_shadow(primary: &str, rule: &ShadowRule) -> Result<(), TargetsError> {
    let bad = |why: String| {
        Err(TargetsError::BadShadow {
            primary: primary.into(),
            why,
        })
    };
    let empty = |key: &str| key.is_empty() || key.starts_with(':') || key.ends_with(':');
    if empty(primary) || empty(&rule.shadow) {
        return bad("a model is `name` or `name:version`".into());
    }
    if primary == rule.shadow {
        return bad("a version cannot shadow itself".into());
    }
    if !(rule.sample_rate > 0.0 && rule.sample_rate <= 1.0) {
        return bad(format!(
            "sample_rate = {}: must be in (0, 1]",
            rule.sample_rate
        ));
    }
    if !(rule.tolerance.is_finite() && rule.tolerance >= 0.0) {
        return bad(format!(
            "tolerance = {}: must be finite and not negative",
            rule.tolerance
        ));
    }
    Ok(())
}

/// An ensemble's members: as [`check_targets`], at most [`MAX_ENSEMBLE_MEMBERS`].
///
/// # Errors
/// [`TargetsError`] saying what is wrong.
pub fn check_ensemble(what: &str, e: &EnsembleConfig) -> Result<(), TargetsError> {
    if e.members.len() > MAX_ENSEMBLE_MEMBERS {
        return Err(TargetsError::TooManyMembers {
            what: what.into(),
            members: e.members.len(),
        });
    }
    check_targets(what, &e.members)
}

/// Targets or members: at least one, finite non-negative weights, one positive.
///
/// # Errors
/// [`TargetsError`] saying what is wrong.
pub fn check_targets(what: &str, targets: &[RouteTarget]) -> Result<(), TargetsError> {
    if targets.is_empty() {
        return Err(TargetsError::NoTarget { what: what.into() });
    }
    if let Some(t) = targets
        .iter()
        .find(|t| !t.weight.is_finite() || t.weight < 0.0)
    {
        return Err(TargetsError::BadWeight {
            what: what.into(),
            target: t.key(),
            weight: t.weight,
        });
    }
    if targets.iter().all(|t| t.weight == 0.0) {
        return Err(TargetsError::AllZero { what: what.into() });
    }
    Ok(())
}

/// The hash of a request id that draws its weighted split: FNV-1a, then MurmurHash3's 64-bit
/// finalizer (FNV-1a alone leaves the high bits of ids that differ in their last characters
/// alike). Stable across runs, builds and hosts.
pub fn request_hash(request_id: &str) -> u64 {
    let mut h = request_id.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    });
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^ (h >> 33)
}

/// The target a weighted split gives `request_id`: the hash's place in [0, 1) picks a target by
/// cumulative weight.
pub fn split<'t>(targets: &'t [RouteTarget], request_id: &str) -> &'t RouteTarget {
    let total: f64 = targets.iter().map(|t| f64::from(t.weight)).sum();
    // The top 53 bits: a uniform double in [0, 1).
    let u = (request_hash(request_id) >> 11) as f64 / (1u64 << 53) as f64;
    let mut at = u * total;
    for t in targets {
        let w = f64::from(t.weight);
        if at < w {
            return t;
        }
        at -= w;
    }
    // Rounding at the very top: the last target with a weight.
    targets
        .iter()
        .rev()
        .find(|t| t.weight > 0.0)
        .expect("validated: one weight is positive")
}

/// Combines the members' values at one position.
pub fn combine(how: Combine, values: &[(f32, f32)]) -> f32 {
    match how {
        Combine::WeightedMean => {
            let (sum, weights) = values.iter().fold((0.0f64, 0.0f64), |(s, w), &(v, wt)| {
                (s + f64::from(v) * f64::from(wt), w + f64::from(wt))
            });
            (sum / weights) as f32
        }
        Combine::Median => {
            let mut v: Vec<f32> = values.iter().map(|&(v, _)| v).collect();
            v.sort_by(f32::total_cmp);
            let n = v.len();
            if n % 2 == 1 {
                v[n / 2]
            } else {
                (v[n / 2 - 1] + v[n / 2]) / 2.0
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target(model: &str, weight: f32) -> RouteTarget {
        RouteTarget {
            model: model.into(),
            version: None,
            weight,
        }
    }

    #[test]
    fn a_split_is_deterministic_and_follows_the_weights() {
        let targets = [target("a", 90.0), target("b", 10.0), target("c", 0.0)];
        let mut counts = BTreeMap::new();
        let n = 100_000;
        for i in 0..n {
            // Ids alike but for their last characters, as order ids are.
            let id = format!("order-{i}");
            let t = split(&targets, &id);
            assert_eq!(t, split(&targets, &id), "the same id, the same target");
            *counts.entry(t.model.clone()).or_insert(0u32) += 1;
        }
        // Binomial(100000, 0.1): sd ~95; 5 sd either side.
        let b = counts["b"] as i64;
        assert!((10_000 - b).abs() < 475, "{counts:?}");
        assert!(!counts.contains_key("c"), "a zero weight gets nothing");
    }

    #[test]
    fn combinations() {
        assert_eq!(
            combine(Combine::WeightedMean, &[(1.0, 3.0), (5.0, 1.0)]),
            2.0
        );
        assert_eq!(
            combine(Combine::Median, &[(1.0, 3.0), (5.0, 1.0), (2.0, 0.0)]),
            2.0
        );
        assert_eq!(combine(Combine::Median, &[(1.0, 3.0), (5.0, 1.0)]), 3.0);
    }

    #[test]
    fn bad_rules_are_named() {
        let bad = |text: &str| {
            let r: Routing = toml::from_str(text).unwrap();
            r.validate().unwrap_err().to_string()
        };
        assert!(bad("[strategies.s]\ntargets = []").contains("no target"));
        assert!(
            bad("[strategies.s]\ntargets = [{ model = \"m\", weight = -1 }]").contains("weight -1")
        );
        assert!(
            bad("[ensembles.e]\nmembers = [{ model = \"m\", weight = 0 }]")
                .contains("every weight is 0")
        );
        assert!(
            toml::from_str::<Routing>("[strategy.s]").is_err(),
            "unknown keys refused"
        );
        assert!(bad("[shadows.\"m:1\"]\nshadow = \"m:1\"").contains("cannot shadow itself"));
        assert!(bad("[shadows.m]\nshadow = \"m:2\"\nsample_rate = 0").contains("sample_rate = 0"));
        assert!(bad("[shadows.m]\nshadow = \"m:2\"\ntolerance = -1").contains("tolerance = -1"));
        assert!(bad("[shadows.m]\nshadow = \"m:\"").contains("`name` or `name:version`"));
        let ok: Routing = toml::from_str("[shadows.\"m:1\"]\nshadow = \"m:2\"").unwrap();
        ok.validate().unwrap();
        assert_eq!(ok.shadows["m:1"].sample_rate, 1.0);
    }
}
