//! What a norm or clipping step reports back.

use crate::error::ClipError;
use crate::norm::{Norm, NormAcc, PartialNorm};
use crate::policy::NonFinitePolicy;

/// Status bits shared with `shaders/norm_finish.wgsl`.
pub(crate) const STATUS_SCALED: u32 = 1;
pub(crate) const STATUS_SKIPPED: u32 = 2;
pub(crate) const STATUS_NONFINITE: u32 = 4;

/// The outcome of one norm or clipping step.
#[derive(Debug, Clone, PartialEq)]
pub struct ClipReport {
    /// Total norm before clipping, in f64: finite even when it exceeds f32::MAX; NaN or
    /// infinity when the gradients held NaN or infinity.
    pub total_norm: f64,
    /// The same norm in mergeable form, for sharded training.
    pub partial: PartialNorm,
    /// The coefficient the gradients were (or would have been) multiplied by.
    pub coef: f32,
    /// True when the gradients were multiplied by `coef` (`coef < 1`, or NaN).
    pub clipped: bool,
    /// True when NaN or infinite gradients were found.
    pub non_finite: bool,
    /// True when the step was skipped under [`NonFinitePolicy::SkipStep`].
    pub skipped: bool,
    /// Per-tensor norms before clipping, in batch order, when asked for.
    pub tensor_norms: Option<Vec<f64>>,
}

impl ClipReport {
    /// Builds the report of a step and applies the error policy.
    pub(crate) fn new(
        norm: Norm,
        acc: NormAcc,
        coef: f32,
        status: u32,
        policy: NonFinitePolicy,
        tensor_norms: Option<Vec<f64>>,
    ) -> Result<ClipReport, ClipError> {
        let partial = PartialNorm::from_acc(norm, acc);
        let total_norm = partial.total();
        let non_finite = status & STATUS_NONFINITE != 0;
        if non_finite && policy == NonFinitePolicy::Error {
            return Err(ClipError::NonFiniteNorm(total_norm));
        }
        Ok(ClipReport {
            total_norm,
            partial,
            coef,
            clipped: status & STATUS_SCALED != 0,
            non_finite,
            skipped: status & STATUS_SKIPPED != 0,
            tensor_norms,
        })
    }
}
