//! Reading an ONNX node's attributes by name.

use std::collections::HashMap;

use tract_onnx::pb::{AttributeProto, NodeProto};

use crate::trees::unsupported;
use crate::BackendLoadError;

/// The attributes of a node by name.
pub(crate) struct Attributes<'a>(HashMap<&'a str, &'a AttributeProto>);

impl<'a> Attributes<'a> {
    pub(crate) fn of(node: &'a NodeProto) -> Self {
        Self(
            node.attribute
                .iter()
                .map(|a| (a.name.as_str(), a))
                .collect(),
        )
    }

    pub(crate) fn has(&self, name: &str) -> bool {
        self.0.contains_key(name)
    }

    pub(crate) fn ints(&self, name: &str) -> &'a [i64] {
        self.0.get(name).map_or(&[], |a| a.ints.as_slice())
    }

    pub(crate) fn int(&self, name: &str, default: i64) -> i64 {
        self.0.get(name).map_or(default, |a| a.i)
    }

    pub(crate) fn float(&self, name: &str, default: f32) -> f32 {
        self.0.get(name).map_or(default, |a| a.f)
    }

    pub(crate) fn string(&self, name: &str, default: &'a str) -> &'a [u8] {
        self.0
            .get(name)
            .map_or(default.as_bytes(), |a| a.s.as_slice())
    }

    pub(crate) fn strings(&self, name: &str) -> Vec<&'a [u8]> {
        self.0
            .get(name)
            .map_or_else(Vec::new, |a| a.strings.iter().map(Vec::as_slice).collect())
    }

    /// Float values given as `name` (floats) or `name_as_tensor` (a float or double tensor).
    pub(crate) fn floats(&self, name: &str) -> Result<Vec<f64>, BackendLoadError> {
        if let Some(a) = self.0.get(name) {
            if let Some(t) = &a.t {
                return self.tensor_floats(name, t);
            }
            return Ok(a.floats.iter().map(|&v| f64::from(v)).collect());
        }
        match self
            .0
            .get(format!("{name}_as_tensor").as_str())
            .and_then(|a| a.t.as_ref())
        {
            Some(t) => self.tensor_floats(name, t),
            None => Ok(Vec::new()),
        }
    }

    pub(crate) fn tensor_floats(
        &self,
        name: &str,
        t: &tract_onnx::pb::TensorProto,
    ) -> Result<Vec<f64>, BackendLoadError> {
        crate::bounds::floats(t)
            .ok_or_else(|| unsupported(format!("{name} is not a float or double tensor")))
    }

    /// A tensor of small integers (opset 5's `nodes_modes`, uint8; or int64).
    pub(crate) fn tensor_ints(&self, name: &str) -> Result<Vec<i64>, BackendLoadError> {
        /// ONNX's UINT8 element type.
        const UINT8: i32 = 2;
        match self.0.get(name).and_then(|a| a.t.as_ref()) {
            Some(t) if t.data_type == UINT8 && !t.int32_data.is_empty() => {
                Ok(t.int32_data.iter().map(|&v| i64::from(v)).collect())
            }
            Some(t) if t.data_type == UINT8 => {
                Ok(t.raw_data.iter().map(|&v| i64::from(v)).collect())
            }
            Some(t) => crate::bounds::int64s(t)
                .ok_or_else(|| unsupported(format!("{name} is not a uint8 or int64 tensor"))),
            None => Ok(Vec::new()),
        }
    }
}

/// The class labels a node names (`ZipMap`'s, a classifier's), as text.
pub(crate) fn labels_of(node: &NodeProto) -> Option<Vec<String>> {
    let a = Attributes::of(node);
    if a.has("classlabels_strings") {
        return Some(
            a.strings("classlabels_strings")
                .iter()
                .map(|s| String::from_utf8_lossy(s).into_owned())
                .collect(),
        );
    }
    ["classlabels_int64s", "classlabels_ints"]
        .iter()
        .find(|n| a.has(n))
        .map(|n| a.ints(n).iter().map(i64::to_string).collect())
}
