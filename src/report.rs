//! What a norm or clipping step reports back.

use std::sync::Arc;

use crate::error::ClipError;
use crate::norm::{Norm, NormAcc, PartialNorm};
use crate::policies::{Layout, TensorInfo};
use crate::policy::NonFinitePolicy;

pub(crate) use crate::shaders::abi::{
    STATUS_HELD, STATUS_NANS_ZEROED, STATUS_NONFINITE, STATUS_SCALED, STATUS_SKIPPED, STATUS_STALE,
};

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

/// Norm and coefficient of one group (or AGC unit, or tensor for per-tensor rules).
#[derive(Debug, Clone, PartialEq)]
pub struct GroupReport {
    /// Group name (tensor name for per-tensor rules, `name[unit]` for AGC).
    pub name: String,
    /// Norm before clipping.
    pub norm: f64,
    /// Norm after clipping: each unit's norm times its coefficient (Gaussian noise, added
    /// after scaling, is not included).
    pub norm_after: f64,
    /// Coefficient applied (1 when untouched).
    pub coef: f32,
}

/// Norms of one tensor before and after a policy step.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorReport {
    /// Tensor name ([`crate::GpuTensor::named`], [`TensorInfo::new`]).
    pub name: String,
    /// Norm before clipping.
    pub norm: f64,
    /// Norm after clipping (noise not included, as for [`GroupReport::norm_after`]).
    pub norm_after: f64,
}

/// The outcome of one step of a [`crate::ClipPolicy`].
#[derive(Debug, Clone, PartialEq)]
pub struct PolicyReport {
    /// The step this report belongs to (counted from 0).
    pub step: u64,
    /// Total norm of all gradients before clipping (NaN/inf when non-finite values were
    /// found; NaNs excluded under [`NonFinitePolicy::ZeroNans`]).
    pub total_norm: f64,
    /// Total norm after clipping (noise not included): for global rules always, for the
    /// others when the policy reports groups ([`crate::ClipPolicy::with_group_report`]).
    pub total_norm_after: Option<f64>,
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
    /// Per tensor norms before and after, in batch order, when groups are asked for
    /// (tensors that AGC leaves out have no entry).
    pub tensors: Option<Vec<TensorReport>>,
}

/// What turns the per-unit numbers of a step into group and tensor reports: fixed when a
/// policy is planned, shared by the reports of every step.
#[derive(Debug)]
pub(crate) struct ReportShape {
    group_names: Vec<String>,
    group_ranges: Vec<[u32; 2]>,
    /// Per tensor that has units: its name and units.
    tensors: Vec<(String, Vec<usize>)>,
}

impl ReportShape {
    /// Number of groups.
    pub(crate) fn groups(&self) -> usize {
        self.group_ranges.len()
    }

    pub(crate) fn new(layout: &Layout, infos: &[TensorInfo]) -> Arc<ReportShape> {
        Arc::new(ReportShape {
            group_names: layout.group_names.clone(),
            group_ranges: layout.group_ranges.clone(),
            tensors: infos
                .iter()
                .enumerate()
                .map(|(t, info)| {
                    let units = (layout.segments.iter().enumerate())
                        .filter(|(_, s)| s.tensor == t)
                        .map(|(u, _)| u)
                        .collect();
                    (info.name.clone(), units)
                })
                .filter(|(_, units): &(String, Vec<usize>)| !units.is_empty())
                .collect(),
        })
    }
}

/// The per-unit numbers of a step, for reports that ask for groups.
pub(crate) struct UnitNorms {
    pub shape: Arc<ReportShape>,
    /// Norm accumulator per group, as the coefficients were computed from.
    pub groups: Vec<NormAcc>,
    /// Norm accumulator per unit (segment).
    pub units: Vec<NormAcc>,
    /// Coefficient per unit.
    pub coefs: Vec<f32>,
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
    pub detail: Option<UnitNorms>,
}

/// The accumulator of `acc` scaled by `coef` (a norm is absolutely homogeneous).
fn scaled(acc: &NormAcc, coef: f32) -> NormAcc {
    NormAcc {
        scale: acc.scale * (coef as f64).abs(),
        ..*acc
    }
}

impl PolicyOutcome {
    /// The report, or the error of [`NonFinitePolicy::Error`].
    pub(crate) fn report(self) -> Result<PolicyReport, ClipError> {
        let mut total = self.total;
        if self.policy == NonFinitePolicy::ZeroNans {
            total.flags &= !crate::norm::FLAG_NAN;
        }
        if self.status & STATUS_STALE != 0 {
            return Err(ClipError::StepOverwritten(self.step));
        }
        let total_norm = total.total(self.norm);
        let held = self.status & STATUS_HELD != 0;
        if held && self.policy == NonFinitePolicy::Error {
            return Err(ClipError::NonFiniteNorm(total_norm));
        }
        let (norm, nf) = (self.norm, self.policy);
        // A norm as reported: NaNs excluded under ZeroNans.
        let live = |acc: &NormAcc| {
            NormAcc {
                flags: nf.live_flags(acc.flags),
                ..*acc
            }
            .total(norm)
        };
        // A held step leaves the gradients as they were.
        let coef_of = |c: f32| if held { 1.0 } else { c };
        let mut total_norm_after = self
            .global
            .then(|| live(&scaled(&total, coef_of(self.coef))));
        let mut groups = None;
        let mut tensors = None;
        if let Some(d) = &self.detail {
            let after: Vec<NormAcc> = (d.units.iter().zip(&d.coefs))
                .map(|(acc, &c)| scaled(acc, coef_of(c)))
                .collect();
            let fold = |units: &mut dyn Iterator<Item = usize>, accs: &[NormAcc]| {
                units.fold(NormAcc::IDENTITY, |a, u| a.combine(accs[u], norm))
            };
            let list = |units: &[usize], accs: &[NormAcc]| fold(&mut units.iter().copied(), accs);
            let s = &d.shape;
            groups = Some(
                s.group_ranges
                    .iter()
                    .enumerate()
                    .map(|(g, &[a, n])| GroupReport {
                        name: s.group_names[g].clone(),
                        norm: live(&d.groups[g]),
                        norm_after: live(&fold(&mut (a..a + n).map(|u| u as usize), &after)),
                        coef: if n == 0 { 1.0 } else { d.coefs[a as usize] },
                    })
                    .collect(),
            );
            tensors = Some(
                s.tensors
                    .iter()
                    .map(|(name, units)| TensorReport {
                        name: name.clone(),
                        norm: live(&list(units, &d.units)),
                        norm_after: live(&list(units, &after)),
                    })
                    .collect(),
            );
            total_norm_after = Some(live(&fold(&mut (0..after.len()), &after)));
        }
        Ok(PolicyReport {
            step: self.step,
            total_norm,
            total_norm_after,
            threshold: self.global.then_some(self.threshold),
            coef: self.global.then_some(self.coef),
            clipped_units: self.clipped,
            units: self.units,
            non_finite: self.status & STATUS_NONFINITE != 0,
            nans_zeroed: self.status & STATUS_NANS_ZEROED != 0,
            skipped: self.status & STATUS_SKIPPED != 0,
            consecutive_skips: self.skips,
            groups,
            tensors,
        })
    }
}
