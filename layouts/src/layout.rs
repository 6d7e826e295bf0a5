//! Feature layouts: the ordered features a model reads, and their hash.
//!
//! A layout is a TOML file (see `layouts/features/` for examples):
//!
//! ```toml
//! name = "mlp64"
//! dtype = "f32"
//! features = ["f00", "f01"]
//! # optional: accept NaN and infinite values (default false)
//! allow_non_finite = false
//! ```
//!
//! Its hash covers what a writer of frames must agree on: the dtype and the ordered feature
//! names (and so their count). The name and `allow_non_finite` are not part of it.

use crate::{fnv1a, FNV_OFFSET};
use serde::Deserialize;
use std::path::Path;
use std::string::String;
use std::vec::Vec;

extern crate std;

/// An ordered list of named features of one dtype.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FeatureLayout {
    /// Name of the layout.
    pub name: String,
    /// Element type; only `"f32"` is defined.
    pub dtype: String,
    /// Feature names in frame order.
    pub features: Vec<String>,
    /// Whether NaN and infinite feature values are accepted.
    #[serde(default)]
    pub allow_non_finite: bool,
}

/// Why a layout could not be read.
#[derive(Debug)]
pub enum LayoutError {
    /// The file could not be read.
    Io {
        /// The file.
        path: std::path::PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// The TOML is invalid or has unknown keys.
    Parse(std::boxed::Box<toml::de::Error>),
    /// The dtype is not `f32`.
    UnsupportedDtype(String),
    /// No features, too many, or a name is empty or repeated.
    BadFeatures(String),
}

impl std::fmt::Display for LayoutError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Io { path, source } => {
                write!(f, "cannot read layout {}: {source}", path.display())
            }
            Self::Parse(e) => write!(f, "invalid layout: {e}"),
            Self::UnsupportedDtype(d) => write!(f, "unsupported layout dtype {d:?} (only \"f32\")"),
            Self::BadFeatures(why) => write!(f, "invalid layout features: {why}"),
        }
    }
}

impl std::error::Error for LayoutError {}

impl FeatureLayout {
    /// Parses and checks a layout.
    ///
    /// # Errors
    /// [`LayoutError`] for invalid TOML, unknown keys, a dtype other than `f32`, no features,
    /// more than [`crate::abi::MAX_FEATURES`], or an empty or repeated name.
    pub fn from_toml(text: &str) -> Result<Self, LayoutError> {
        let layout: Self = toml::from_str(text).map_err(|e| LayoutError::Parse(e.into()))?;
        layout.check()?;
        Ok(layout)
    }

    /// Reads and checks a layout file.
    ///
    /// # Errors
    /// As [`FeatureLayout::from_toml`], and [`LayoutError::Io`] when the file cannot be read.
    pub fn from_file(path: &Path) -> Result<Self, LayoutError> {
        let text = std::fs::read_to_string(path).map_err(|source| LayoutError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_toml(&text)
    }

    /// The layout a model with no declared layout reads: `count` features named `f0`, `f1`, ...
    pub fn positional(name: &str, count: u32) -> Self {
        Self {
            name: name.into(),
            dtype: "f32".into(),
            features: (0..count).map(|i| std::format!("f{i}")).collect(),
            allow_non_finite: false,
        }
    }

    fn check(&self) -> Result<(), LayoutError> {
        if self.dtype != "f32" {
            return Err(LayoutError::UnsupportedDtype(self.dtype.clone()));
        }
        let n = self.features.len();
        if n == 0 || n > crate::abi::MAX_FEATURES as usize {
            return Err(LayoutError::BadFeatures(std::format!(
                "{n} features, expected 1..={}",
                crate::abi::MAX_FEATURES
            )));
        }
        let mut seen = std::collections::HashSet::new();
        for f in &self.features {
            if f.is_empty() {
                return Err(LayoutError::BadFeatures("an empty feature name".into()));
            }
            if !seen.insert(f.as_str()) {
                return Err(LayoutError::BadFeatures(std::format!(
                    "{f:?} appears twice"
                )));
            }
        }
        Ok(())
    }

    /// Number of features.
    pub fn feature_count(&self) -> u32 {
        self.features.len() as u32
    }

    /// The layout hash compared at connect time (never 0, which a hello uses for "any").
    pub fn hash(&self) -> u64 {
        let mut h = fnv1a(FNV_OFFSET, b"tie-layout-v1\0");
        h = fnv1a(h, self.dtype.as_bytes());
        h = fnv1a(h, &(self.features.len() as u64).to_le_bytes());
        for f in &self.features {
            h = fnv1a(h, f.as_bytes());
            h = fnv1a(h, b"\0");
        }
        if h == 0 {
            1
        } else {
            h
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hash_depends_on_order_not_name() {
        let a = FeatureLayout::from_toml(
            r#"name="a"
dtype="f32"
features=["x","y"]"#,
        )
        .unwrap();
        let b = FeatureLayout::from_toml(
            r#"name="b"
dtype="f32"
features=["x","y"]"#,
        )
        .unwrap();
        let c = FeatureLayout::from_toml(
            r#"name="a"
dtype="f32"
features=["y","x"]"#,
        )
        .unwrap();
        assert_eq!(a.hash(), b.hash());
        assert_ne!(a.hash(), c.hash());
        assert_ne!(a.hash(), FeatureLayout::positional("p", 2).hash());
    }

    #[test]
    fn bad_layouts_are_refused() {
        assert!(matches!(
            FeatureLayout::from_toml(
                r#"name="a"
dtype="f16"
features=["x"]"#
            ),
            Err(LayoutError::UnsupportedDtype(_))
        ));
        assert!(matches!(
            FeatureLayout::from_toml(
                r#"name="a"
dtype="f32"
features=[]"#
            ),
            Err(LayoutError::BadFeatures(_))
        ));
        assert!(matches!(
            FeatureLayout::from_toml(
                r#"name="a"
dtype="f32"
features=["x","x"]"#
            ),
            Err(LayoutError::BadFeatures(_))
        ));
        assert!(matches!(
            FeatureLayout::from_toml(
                r#"name="a"
dtype="f32"
features=["x"]
extra=1"#
            ),
            Err(LayoutError::Parse(_))
        ));
    }

    #[test]
    #[cfg_attr(miri, ignore = "reads files: Miri isolates the file system")]
    fn example_layout_files_parse() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("features");
        let a = FeatureLayout::from_file(&dir.join("mlp64.toml")).unwrap();
        let b = FeatureLayout::from_file(&dir.join("mlp64_reordered.toml")).unwrap();
        assert_eq!(a.feature_count(), 64);
        assert_ne!(a.hash(), b.hash());
    }
}
