//! [`Divergence`]: how two models' answers to the same rows differ (a replay of the journal
//! through another version).

use serde::Serialize;

/// One output column's differences.
#[derive(Clone, Debug, Default, Serialize, PartialEq)]
pub struct OutputDivergence {
    /// The largest |a − b|.
    pub max_abs_diff: f64,
    /// The mean |a − b| over the rows compared.
    pub mean_abs_diff: f64,
    /// Rows where a and b have the same sign (both zero counts as the same).
    pub same_sign: u64,
    /// Rows over the tolerance on this output.
    pub over_tolerance: u64,
}

/// A row among those that differ most.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct WorstRow {
    /// The journaled request's id.
    pub request_id: u64,
    /// Its session.
    pub session_id: u64,
    /// When it was answered (RFC 3339).
    pub time: String,
    /// Its largest |a − b| over the outputs.
    pub max_abs_diff: f64,
    /// The recorded outputs.
    pub recorded: Vec<f32>,
    /// The outputs now.
    pub replayed: Vec<f32>,
}

/// How a set of rows' answers compare.
#[derive(Clone, Debug, Serialize)]
pub struct Divergence {
    /// |a − b| ≤ `tolerance` × max(1, |recorded|) on every output counts as within.
    pub tolerance: f64,
    /// Rows compared.
    pub rows: u64,
    /// Rows whose outputs have the same bits.
    pub identical: u64,
    /// Rows not identical but within the tolerance on every output.
    pub within_tolerance: u64,
    /// Rows over the tolerance on some output.
    pub different: u64,
    /// Per output column.
    pub outputs: Vec<OutputDivergence>,
    /// The rows with the largest difference, largest first.
    pub worst: Vec<WorstRow>,
    /// How many rows `worst` keeps.
    #[serde(skip)]
    keep: usize,
    #[serde(skip)]
    sums: Vec<f64>,
}

impl Divergence {
    /// An empty comparison at `tolerance`, keeping the `keep` rows that differ most.
    pub fn new(tolerance: f64, keep: usize) -> Self {
        Self {
            tolerance,
            rows: 0,
            identical: 0,
            within_tolerance: 0,
            different: 0,
            outputs: Vec::new(),
            worst: Vec::new(),
            keep,
            sums: Vec::new(),
        }
    }

    /// Adds one row: its recorded outputs and the replayed ones (same length).
    pub fn add(
        &mut self,
        recorded: &[f32],
        replayed: &[f32],
        row: impl FnOnce() -> (u64, u64, String),
    ) {
        if self.outputs.len() < recorded.len() {
            self.outputs
                .resize(recorded.len(), OutputDivergence::default());
            self.sums.resize(recorded.len(), 0.0);
        }
        self.rows += 1;
        let mut identical = recorded.len() == replayed.len();
        let mut over = false;
        let mut worst = 0.0f64;
        for (i, (&a, &b)) in recorded.iter().zip(replayed).enumerate() {
            identical &= a.to_bits() == b.to_bits();
            let diff = (f64::from(a) - f64::from(b)).abs();
            // NaN on either side (an engine that fails) is as far as it gets.
            let diff = if diff.is_nan() { f64::INFINITY } else { diff };
            let o = &mut self.outputs[i];
            o.max_abs_diff = o.max_abs_diff.max(diff);
            self.sums[i] += diff;
            if (a >= 0.0) == (b >= 0.0) || (a == 0.0 && b == 0.0) {
                o.same_sign += 1;
            }
            if diff > self.tolerance * f64::from(a.abs()).max(1.0) {
                o.over_tolerance += 1;
                over = true;
            }
            worst = worst.max(diff);
        }
        if identical {
            self.identical += 1;
        } else if over {
            self.different += 1;
        } else {
            self.within_tolerance += 1;
        }
        for (o, s) in self.outputs.iter_mut().zip(&self.sums) {
            o.mean_abs_diff = s / self.rows as f64;
        }
        if !identical && self.keep > 0 {
            let least = self.worst.last().map_or(-1.0, |w| w.max_abs_diff);
            if self.worst.len() < self.keep || worst > least {
                let (request_id, session_id, time) = row();
                let at = self.worst.partition_point(|w| w.max_abs_diff >= worst);
                self.worst.insert(
                    at,
                    WorstRow {
                        request_id,
                        session_id,
                        time,
                        max_abs_diff: worst,
                        recorded: recorded.to_vec(),
                        replayed: replayed.to_vec(),
                    },
                );
                self.worst.truncate(self.keep);
            }
        }
    }

    /// The share of rows over the tolerance (0 with no rows).
    pub fn different_share(&self) -> f64 {
        if self.rows == 0 {
            0.0
        } else {
            self.different as f64 / self.rows as f64
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row() -> (u64, u64, String) {
        (1, 2, "t".into())
    }

    #[test]
    fn rows_count_as_identical_within_or_different_and_the_worst_are_kept() {
        let mut d = Divergence::new(1e-3, 2);
        d.add(&[1.0, -2.0], &[1.0, -2.0], row);
        d.add(&[1.0, -2.0], &[1.0001, -2.0], || (2, 2, "t".into()));
        d.add(&[1.0, -2.0], &[1.5, 2.0], || (3, 2, "t".into()));
        d.add(&[0.5, 0.0], &[0.6, 0.0], || (4, 2, "t".into()));
        assert_eq!(
            (d.rows, d.identical, d.within_tolerance, d.different),
            (4, 1, 1, 2)
        );
        assert_eq!(d.outputs[0].over_tolerance, 2);
        assert_eq!(d.outputs[1].over_tolerance, 1);
        assert_eq!(d.outputs[1].same_sign, 3);
        assert!((d.outputs[1].max_abs_diff - 4.0).abs() < 1e-12);
        assert!((d.outputs[1].mean_abs_diff - 1.0).abs() < 1e-12);
        let worst: Vec<u64> = d.worst.iter().map(|w| w.request_id).collect();
        assert_eq!(worst, [3, 4]);
        assert!((d.different_share() - 0.5).abs() < 1e-12);
    }
}
