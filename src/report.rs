//! What a norm or clipping step reports back.

use std::sync::Arc;

use crate::chain::{ChainKind, Program, TensorInfo};
use crate::error::ClipError;
use crate::non_finite::NonFinitePolicy;
use crate::norm::{Norm, NormAcc, PartialNorm};

pub(crate) use crate::shaders::abi::{
    STATUS_HELD, STATUS_NANS_ZEROED, STATUS_NONFINITE, STATUS_SCALED, STATUS_SKIPPED, STATUS_STALE,
};

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

/// The outcome of one step of any chain on any runner. A chain with no norm stage
/// reports its measure ([`crate::ClipPolicy::total_norm`]: no stage, no threshold or
/// coefficient) or, for a clamp alone ([`crate::ClipPolicy::value_clip`]), no norm at all
/// (NaN norms).
#[derive(Debug, Clone, PartialEq)]
pub struct ClipReport {
    /// The step this report belongs to (counted from 0).
    pub step: u64,
    /// Total norm of all gradients before clipping, in f64: finite even beyond f32::MAX;
    /// NaN or infinite when non-finite values were found (NaNs excluded under
    /// [`NonFinitePolicy::ZeroNans`]). Of a chain: the first stage's.
    pub total_norm: f64,
    /// The same norm in mergeable form, for sharded training (the split API).
    pub partial: PartialNorm,
    /// Total norm after clipping (noise not included): for global rules always, for the
    /// others when the policy reports groups ([`crate::ClipPolicy::with_group_report`]).
    pub total_norm_after: Option<f64>,
    /// The threshold in force this step of the chain's last global stage (global norm,
    /// AutoClip, ZClip), schedule included (infinity when ZClip found no spike or an
    /// AutoClip history is empty); `None` when no stage is global.
    pub threshold: Option<f32>,
    /// That stage's coefficient, the one every gradient was (or, on a skipped step, would
    /// have been) multiplied by there.
    pub coef: Option<f32>,
    /// Units (tensors, AGC units) whose final coefficient was below 1 (or NaN); zeroing
    /// NaNs at coefficient 1 is no clip, and a held or skipped step clips none.
    pub clipped_units: u32,
    /// Units of the chain: AGC units where it has AGC (tensors AGC leaves out are one
    /// unit each), else tensors.
    pub units: u32,
    /// NaN or infinite gradients were found.
    pub non_finite: bool,
    /// NaNs were found and replaced by 0 ([`NonFinitePolicy::ZeroNans`]).
    pub nans_zeroed: bool,
    /// The step was skipped ([`NonFinitePolicy::SkipStep`]): gradients unchanged.
    pub skipped: bool,
    /// Consecutive skipped steps up to and including this one.
    pub consecutive_skips: u32,
    /// Every norm stage in chain order (one entry for a single rule).
    pub stages: Vec<StageReport>,
    /// Per group norms and coefficients of the chain's last norm stage, when asked for.
    pub groups: Option<Vec<GroupReport>>,
    /// Per tensor norms before and after, in batch order, when groups are asked for.
    pub tensors: Option<Vec<TensorReport>>,
    /// Standard deviation of the Gaussian noise added to every element (0 without noise;
    /// per-example clipping: of the noise added to the sum, before the division by the
    /// batch size).
    pub noise_std: f32,
    /// Per-example clipping ([`crate::PerExampleClip::with_layer_report`]): per tensor, in
    /// order, the examples whose factor for it was below 1 (per layer: the tensor's own
    /// factor; flat: the example's, so every entry is the same). `None` otherwise.
    pub clipped_per_tensor: Option<Vec<u32>>,
    /// The loss scale this step used and the next one, for a loss-scaled chain; `None`
    /// otherwise. The norms, thresholds and coefficients above are of the unscaled
    /// gradients; a skipped step (an overflow) is `skipped`.
    pub loss_scale: Option<LossScaleReport>,
}

/// The loss scale of a step of a loss-scaled chain ([`crate::ClipPolicy::loss_scale`]).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LossScaleReport {
    /// The scale this step's gradients carried: every norm of the report is of the
    /// gradients divided by it.
    pub scale: f32,
    /// The scale of the next step: multiply the next loss by it. Below `scale` after a
    /// skipped step, above it after enough finite steps in a row.
    pub next: f32,
}

/// What one norm stage of a chain saw and did.
#[derive(Debug, Clone, PartialEq)]
pub struct StageReport {
    /// The total norm this stage saw: of the gradients as the earlier stages scaled them
    /// (for an AGC stage, of its units only).
    pub total_norm: f64,
    /// For global stages, the threshold in force (schedule included).
    pub threshold: Option<f32>,
    /// For global stages, the coefficient this stage applied.
    pub coef: Option<f32>,
    /// Units whose coefficient was below 1 after this stage.
    pub clipped_units: u32,
}

/// What turns the per-unit numbers of a step into group and tensor reports: fixed when a
/// policy is planned, shared by the reports of every step.
#[derive(Debug)]
pub(crate) struct ReportShape {
    /// The last norm stage: its group names and members.
    group_names: Vec<String>,
    group_ranges: Vec<[u32; 2]>,
    members: Vec<u32>,
    /// Per tensor that has units: its name and units.
    tensors: Vec<(String, Vec<usize>)>,
    /// Per stage: one coefficient for every unit.
    global: Vec<bool>,
    /// What the chain's steps do (a measure reports no stage).
    kind: ChainKind,
}

impl ReportShape {
    pub(crate) fn new(program: &Program, infos: &[TensorInfo]) -> Arc<ReportShape> {
        let last = program.stages.last().expect("a chain has a norm stage");
        Arc::new(ReportShape {
            group_names: last.group_names.clone(),
            group_ranges: last.group_ranges.clone(),
            members: last.members.clone(),
            tensors: {
                let mut units: Vec<Vec<usize>> = vec![Vec::new(); infos.len()];
                for (u, s) in program.units.iter().enumerate() {
                    units[s.tensor].push(u);
                }
                (infos.iter().zip(units))
                    .filter(|(_, units)| !units.is_empty())
                    .map(|(info, units)| (info.name.clone(), units))
                    .collect()
            },
            global: program.stages.iter().map(|s| s.is_global()).collect(),
            kind: program.kind,
        })
    }
}

/// The per-unit numbers of a step, for reports that ask for groups.
pub(crate) struct UnitNorms {
    /// Norm accumulator per group of the last stage, as its coefficients were computed from.
    pub groups: Vec<NormAcc>,
    /// Norm accumulator per unit, before clipping.
    pub units: Vec<NormAcc>,
    /// Final coefficient per unit.
    pub coefs: Vec<f32>,
}

/// The raw fields of one norm stage, as both backends produce them.
#[derive(Debug, Clone, Copy)]
pub(crate) struct StageOutcome {
    pub total: NormAcc,
    pub threshold: f32,
    pub coef: f32,
    pub status: u32,
    pub clipped: u32,
    pub skips: u32,
    /// Stage 0's: the loss scale used and the next (see [`LossScaleReport`]).
    pub loss_scale: (f32, f32),
}

/// The raw fields of a policy step, as both backends produce them.
pub(crate) struct PolicyOutcome {
    pub step: u64,
    pub norm: Norm,
    /// The standard deviation of the chain's noise (0 without).
    pub noise_std: f32,
    pub stages: Vec<StageOutcome>,
    pub units: u32,
    pub policy: NonFinitePolicy,
    pub shape: Arc<ReportShape>,
    pub detail: Option<UnitNorms>,
    /// The chain is loss scaled: the report carries its scales, and the unit numbers of
    /// `detail` (of the gradients as they arrived) are unscaled here.
    pub loss_scaled: bool,
}

impl PolicyOutcome {
    /// The report, or the error of [`NonFinitePolicy::Error`] (or of an overwritten step).
    pub(crate) fn report(mut self) -> Result<ClipReport, ClipError> {
        let (norm, nf) = (self.norm, self.policy);
        if self.shape.kind == ChainKind::ValueOnly {
            return Ok(ClipReport::value_only(self.step, norm, self.units));
        }
        // A norm as reported: NaNs excluded under ZeroNans.
        let live = |acc: &NormAcc| {
            NormAcc {
                flags: nf.live_flags(acc.flags),
                ..*acc
            }
            .total(norm)
        };
        let first = self.stages[0];
        if first.status & STATUS_STALE != 0 {
            return Err(ClipError::StepOverwritten(self.step));
        }
        let total_norm = live(&first.total);
        let partial = PartialNorm::from_acc(
            norm,
            NormAcc {
                flags: nf.live_flags(first.total.flags),
                ..first.total
            },
        );
        let held = first.status & STATUS_HELD != 0;
        if held && nf == NonFinitePolicy::Error {
            return Err(ClipError::NonFiniteNorm(total_norm));
        }
        // A held step leaves the gradients as they were, and a measure scales nothing (it
        // computes no coefficients).
        let measures = self.shape.kind == ChainKind::Measure;
        let coef_of = |c: f32| if held || measures { 1.0 } else { c };
        let global = &self.shape.global;
        // A held step clips no unit, whatever a stage computed before the chain held it.
        let clipped_of = |s: &StageOutcome| if held { 0 } else { s.clipped };
        let stages: Vec<StageReport> = (self.stages.iter().zip(global))
            .map(|(s, &g)| StageReport {
                total_norm: live(&s.total),
                threshold: g.then_some(s.threshold),
                coef: g.then_some(s.coef),
                clipped_units: clipped_of(s),
            })
            .collect();
        let last = self.stages.len() - 1;
        let last_global = (0..self.stages.len()).rev().find(|&k| global[k]);
        // Without unit norms the norm after is known when the last stage is global.
        let mut total_norm_after = global[last].then(|| {
            live(
                &self.stages[last]
                    .total
                    .scaled(coef_of(self.stages[last].coef)),
            )
        });
        let mut groups = None;
        let mut tensors = None;
        let (scale, next) = first.loss_scale;
        let loss_scale = self.loss_scaled.then_some(LossScaleReport { scale, next });
        if let Some(d) = &mut self.detail {
            // The unit and group norms are of the gradients as they arrived, and the last
            // stage folded the unscaling into the coefficients (not on a held step).
            if let Some(ls) = loss_scale {
                let inv = 1.0 / ls.scale;
                (d.units.iter_mut().chain(&mut d.groups)).for_each(|a| *a = a.scaled(inv));
                if !held {
                    d.coefs.iter_mut().for_each(|c| *c /= inv);
                }
            }
            let after: Vec<NormAcc> = (d.units.iter().zip(&d.coefs))
                .map(|(acc, &c)| acc.scaled(coef_of(c)))
                .collect();
            let fold = |units: &mut dyn Iterator<Item = usize>, accs: &[NormAcc]| {
                units.fold(NormAcc::IDENTITY, |a, u| a.combine(accs[u], norm))
            };
            let list = |units: &[usize], accs: &[NormAcc]| fold(&mut units.iter().copied(), accs);
            let s = &self.shape;
            groups = Some(
                s.group_ranges
                    .iter()
                    .enumerate()
                    .map(|(g, &[a, n])| {
                        let members = &s.members[a as usize..(a + n) as usize];
                        let mut units = members.iter().map(|&u| u as usize);
                        GroupReport {
                            name: s.group_names[g].clone(),
                            norm: live(&d.groups[g]),
                            norm_after: live(&fold(&mut units, &after)),
                            coef: members
                                .first()
                                .map_or(1.0, |&u| coef_of(d.coefs[u as usize])),
                        }
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
        // A measure's one stage is the planner's, not the chain's: it reports none.
        let (stages, last_global) = match self.shape.kind {
            ChainKind::Measure => (Vec::new(), None),
            _ => (stages, last_global),
        };
        Ok(ClipReport {
            step: self.step,
            total_norm,
            partial,
            total_norm_after,
            threshold: last_global.map(|k| self.stages[k].threshold),
            coef: last_global.map(|k| self.stages[k].coef),
            clipped_units: clipped_of(&self.stages[last]),
            units: self.units,
            non_finite: first.status & STATUS_NONFINITE != 0,
            nans_zeroed: first.status & STATUS_NANS_ZEROED != 0,
            skipped: first.status & STATUS_SKIPPED != 0,
            consecutive_skips: first.skips,
            stages,
            groups,
            tensors,
            noise_std: self.noise_std,
            clipped_per_tensor: None,
            loss_scale,
        })
    }
}

impl ClipReport {
    /// The report of step `step` of a value clamp alone ([`crate::ClipPolicy::value_clip`]),
    /// which measures no norm: every norm is NaN, no unit counts as clipped.
    pub(crate) fn value_only(step: u64, norm: Norm, units: u32) -> ClipReport {
        let nan = NormAcc {
            flags: crate::norm::FLAG_NAN,
            ..NormAcc::IDENTITY
        };
        ClipReport {
            partial: PartialNorm::from_acc(norm, nan),
            non_finite: false,
            ..ClipReport::per_example(step, 0, units, nan, 0.0, None)
        }
    }

    /// The report of per-example clipping step `step`: `clipped` of `units` (examples, or
    /// (example, tensor) pairs per layer) had a factor below 1; `total` is the norm of all
    /// per-example gradients together, before clipping.
    pub(crate) fn per_example(
        step: u64,
        clipped: u32,
        units: u32,
        total: NormAcc,
        noise_std: f32,
        clipped_per_tensor: Option<Vec<u32>>,
    ) -> ClipReport {
        let total_norm = total.total(Norm::L2);
        ClipReport {
            step,
            total_norm,
            partial: PartialNorm::from_acc(Norm::L2, total),
            total_norm_after: None,
            threshold: None,
            coef: None,
            clipped_units: clipped,
            units,
            non_finite: !total_norm.is_finite(),
            nans_zeroed: false,
            skipped: false,
            consecutive_skips: 0,
            stages: Vec::new(),
            groups: None,
            tensors: None,
            noise_std,
            clipped_per_tensor,
            loss_scale: None,
        }
    }
}
