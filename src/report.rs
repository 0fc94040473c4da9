//! What a norm or clipping step reports back.

use crate::error::ClipError;
use crate::norm::{Norm, NormAcc, PartialNorm};
use crate::policy::NonFinitePolicy;

/// Status bits shared with `shaders/norm_finish.wgsl`.
pub(crate) const STATUS_SCALED: u32 = 1;
pub(crate) const STATUS_SKIPPED: u32 = 2;
pub(crate) const STATUS_NONFINITE: u32 = 4;
pub(crate) const STATUS_NANS_ZEROED: u32 = 16;

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
    /// True when NaNs were found and replaced by 0 under [`NonFinitePolicy::ZeroNans`].
    pub nans_zeroed: bool,
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
        let mut acc = acc;
        if policy == NonFinitePolicy::ZeroNans {
            acc.flags &= !crate::norm::FLAG_NAN;
        }
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
            nans_zeroed: status & STATUS_NANS_ZEROED != 0,
            tensor_norms,
        })
    }
}

/// Policy status bits beyond the global ones (`STATUS_*` of `shaders/policy.wgsl`).
pub(crate) const STATUS_HELD: u32 = 8;

/// Norm and coefficient of one group (or AGC unit, or tensor for per-tensor rules).
#[derive(Debug, Clone, PartialEq)]
pub struct GroupReport {
    /// Group name (tensor name for per-tensor rules, `name[unit]` for AGC).
    pub name: String,
    /// Norm before clipping.
    pub norm: f64,
    /// Coefficient applied (1 when untouched).
    pub coef: f32,
}

/// The outcome of one step of a [`crate::ClipPolicy`].
#[derive(Debug, Clone, PartialEq)]
pub struct PolicyReport {
    /// The step this report belongs to (counted from 0).
    pub step: u64,
    /// Total norm of all gradients before clipping (NaN/inf when non-finite values were
    /// found; NaNs excluded under [`NonFinitePolicy::ZeroNans`]).
    pub total_norm: f64,
    /// For global rules, the threshold in force this step, schedule included (infinity
    /// when ZClip found no spike or an AutoClip history is empty); `None` for per-tensor,
    /// group, block RMS and AGC rules.
    pub threshold: Option<f32>,
    /// For global rules, the coefficient every gradient was multiplied by.
    pub coef: Option<f32>,
    /// Units (tensors, groups' tensors, AGC units) whose coefficient was below 1.
    pub clipped_units: u32,
    /// Units in the policy.
    pub units: u32,
    /// NaN or infinite gradients were found.
    pub non_finite: bool,
    /// NaNs were found and replaced by 0 ([`NonFinitePolicy::ZeroNans`]).
    pub nans_zeroed: bool,
    /// The step was skipped ([`NonFinitePolicy::SkipStep`]): gradients unchanged.
    pub skipped: bool,
    /// Consecutive skipped steps up to and including this one.
    pub consecutive_skips: u32,
    /// Per group norms and coefficients, when asked for.
    pub groups: Option<Vec<GroupReport>>,
}

/// The raw fields of a policy step, as both backends produce them.
pub(crate) struct PolicyOutcome {
    pub step: u64,
    pub norm: Norm,
    pub total: NormAcc,
    pub threshold: f32,
    pub coef: f32,
    pub status: u32,
    pub clipped: u32,
    pub units: u32,
    pub skips: u32,
    pub global: bool,
    pub policy: NonFinitePolicy,
    pub groups: Option<Vec<GroupReport>>,
}

impl PolicyOutcome {
    /// The report, or the error of [`NonFinitePolicy::Error`].
    pub(crate) fn report(self) -> Result<PolicyReport, ClipError> {
        let mut total = self.total;
        if self.policy == NonFinitePolicy::ZeroNans {
            total.flags &= !crate::norm::FLAG_NAN;
        }
        let total_norm = total.total(self.norm);
        if self.status & STATUS_HELD != 0 && self.policy == NonFinitePolicy::Error {
            return Err(ClipError::NonFiniteNorm(total_norm));
        }
        Ok(PolicyReport {
            step: self.step,
            total_norm,
            threshold: self.global.then_some(self.threshold),
            coef: self.global.then_some(self.coef),
            clipped_units: self.clipped,
            units: self.units,
            non_finite: self.status & STATUS_NONFINITE != 0,
            nans_zeroed: self.status & STATUS_NANS_ZEROED != 0,
            skipped: self.status & STATUS_SKIPPED != 0,
            consecutive_skips: self.skips,
            groups: self.groups,
        })
    }
}
