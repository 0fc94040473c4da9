//! From a chain and the batch's tensors to the program both engines run: the units that
//! get a norm, and for every norm stage the groups whose norms set a threshold and the
//! formula that turns them into coefficients.

use super::rules::{Rule, UnitAxis};
use super::state::{HEADER_WORDS, STAGE_PARAMS_WORDS, ST_CAP, ST_LOSS_SCALE};
use super::{ChainKind, ClipPolicy, PolicyState, TensorInfo};
use crate::error::ClipError;
use crate::plan::PlanSegment;
use crate::shaders::abi;

/// How a norm and a threshold give a coefficient (a stage row's `formula` in
/// `shaders/coef.wgsl`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Formula {
    /// `min(c / (n + 1e-6), 1)`.
    PyTorch = abi::FORMULA_PYTORCH as isize,
    /// `c / max(n, c)`.
    Tf = abi::FORMULA_TF as isize,
    /// AGC against the parameters' unit norms.
    Agc = abi::FORMULA_AGC as isize,
}

/// Group index of a unit that a stage leaves alone (an AGC-excluded tensor).
pub(crate) use abi::NO_GROUP;

/// One norm stage of a program: how it groups the units and how group norms become
/// coefficients.
#[derive(Debug, Clone)]
pub(crate) struct StagePlan {
    /// Group of each unit, or [`NO_GROUP`].
    pub group_of: Vec<u32>,
    /// The units of every group, group after group.
    pub members: Vec<u32>,
    /// Per group: (first member, member count).
    pub group_ranges: Vec<[u32; 2]>,
    /// Base threshold per group (before the step's multiplier).
    pub thresholds: Vec<f32>,
    /// Group names for reports.
    pub group_names: Vec<String>,
    pub formula: Formula,
    /// `ADAPTIVE_*`: how a global threshold is found.
    pub adaptive: u32,
    /// The rule's numbers (AGC, AutoClip, ZClip).
    pub params: abi::StageParams,
    /// First word of its block of the device state, and the block's history slots.
    pub state_base: usize,
    pub history: usize,
}

impl StagePlan {
    /// One group, whose coefficient `finish` computes from the total (units masked out
    /// keep coefficient 1).
    pub(crate) fn is_global(&self) -> bool {
        self.group_ranges.len() == 1 && self.formula == Formula::PyTorch
    }

    /// Zeroes the words of its state block that live for one step only: what `undo`
    /// would put back.
    pub(crate) fn clear_step_words(&self, words: &mut [u32]) {
        for w in [
            abi::ST_SAVED_SLOT,
            abi::ST_SAVED_MEAN,
            abi::ST_SAVED_VAR,
            abi::ST_RECORDED,
        ] {
            words[self.state_base + w as usize] = 0;
        }
    }

    /// One coefficient for every unit: global, and no unit masked out.
    pub(crate) fn is_uniform(&self) -> bool {
        self.is_global() && !self.group_of.contains(&NO_GROUP)
    }

    /// True when group `g` is unit `g` for every unit.
    pub(crate) fn is_identity(&self) -> bool {
        self.group_ranges.len() == self.group_of.len()
            && self
                .group_of
                .iter()
                .enumerate()
                .all(|(u, &g)| g as usize == u)
    }

    /// Groups given as the group of each unit (in unit order inside each group).
    /// A counting sort: linear in units plus groups, so planning 10^5 tensors per tensor
    /// stays cheap.
    fn grouped(group_of: Vec<u32>, n_groups: usize) -> (Vec<u32>, Vec<[u32; 2]>) {
        let mut ranges = vec![[0u32, 0u32]; n_groups];
        for &g in group_of.iter().filter(|&&g| g != NO_GROUP) {
            ranges[g as usize][1] += 1;
        }
        let mut next = 0;
        for r in &mut ranges {
            r[0] = next;
            next += r[1];
        }
        let mut fill: Vec<u32> = ranges.iter().map(|r| r[0]).collect();
        let mut members = vec![0u32; next as usize];
        for (u, &g) in group_of.iter().enumerate().filter(|(_, &g)| g != NO_GROUP) {
            members[fill[g as usize] as usize] = u as u32;
            fill[g as usize] += 1;
        }
        (members, ranges)
    }
}

/// A chain resolved over one batch: the units that get a norm (the finest partition every
/// stage needs: AGC units where the chain has AGC, else whole tensors) and each norm
/// stage's groups. Both engines run exactly this.
#[derive(Debug, Clone)]
pub(crate) struct Program {
    pub units: Vec<PlanSegment>,
    pub stages: Vec<StagePlan>,
    /// Words of the device state: one block per stage, adaptive stages first.
    pub state_words: usize,
    /// Where each tensor starts in its logical tensor (a shard's first element; empty:
    /// every tensor is whole). Noise is keyed by the logical index.
    pub bases: Vec<u64>,
    /// The fingerprint its states record (`state::meaning_of`); empty for the global
    /// programs, whose states are never saved.
    pub meaning: Vec<u32>,
    /// What a step does: stages, a measure or a clamp alone.
    pub kind: ChainKind,
    /// The chain's loss scaling: its scale starts in the state's first block.
    pub loss_scale: Option<super::LossScale>,
}

/// Where the units of one tensor lie: element `index` of the tensor has the coefficient of
/// unit `first + (index / div) % count`. A tensor that is one unit has `count` 1, AGC rows
/// `div` = the row length, AGC columns `div` 1 and `count` = the number of columns. The
/// WGSL twin is `gradclip_unit` (in [`crate::DeferredClip::wgsl`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UnitLayout {
    /// The tensor's first unit.
    pub first: u32,
    /// Elements per step of the unit index (at least 1).
    pub div: u32,
    /// The tensor's number of units (at least 1).
    pub count: u32,
}

impl UnitLayout {
    /// The unit of element `index` of the tensor.
    pub fn unit_of(&self, index: u32) -> u32 {
        self.first + (index / self.div) % self.count
    }
}

/// A stage without rule numbers or state.
fn plain_stage(
    group_of: Vec<u32>,
    n_groups: usize,
    thresholds: Vec<f32>,
    group_names: Vec<String>,
    formula: Formula,
) -> StagePlan {
    let (members, group_ranges) = StagePlan::grouped(group_of.clone(), n_groups);
    StagePlan {
        group_of,
        members,
        group_ranges,
        thresholds,
        group_names,
        formula,
        adaptive: abi::ADAPTIVE_NONE,
        params: abi::StageParams::default(),
        state_base: 0,
        history: 0,
    }
}

impl Program {
    /// The unit layout of every one of `n_tensors` tensors (each has at least one unit:
    /// see [`Program::new`]); units of one tensor are consecutive.
    pub(crate) fn unit_layouts(&self, n_tensors: usize) -> Vec<UnitLayout> {
        let mut out = vec![
            UnitLayout {
                first: 0,
                div: 1,
                count: 1,
            };
            n_tensors
        ];
        let mut u = 0;
        while u < self.units.len() {
            let t = self.units[u].tensor;
            let count = self.units[u..].iter().take_while(|s| s.tensor == t).count();
            let unit = &self.units[u];
            // Rows step by their length; columns (strided units) by one element.
            let div = if count > 1 && unit.stride == 1 {
                unit.len
            } else {
                1
            };
            out[t] = UnitLayout {
                first: u as u32,
                div: div.max(1) as u32,
                count: count as u32,
            };
            u += count;
        }
        out
    }

    /// Lays the stages' state blocks out (adaptive stages first, so the saved state's
    /// first block is the adaptive one) and returns the program.
    fn with_state(units: Vec<PlanSegment>, mut stages: Vec<StagePlan>) -> Program {
        let mut order: Vec<usize> = (0..stages.len()).collect();
        order.sort_by_key(|&s| stages[s].adaptive == abi::ADAPTIVE_NONE);
        let mut next = 0;
        for s in order {
            stages[s].state_base = next;
            next += HEADER_WORDS + stages[s].history;
        }
        Program {
            units,
            stages,
            state_words: next.max(HEADER_WORDS),
            bases: Vec::new(),
            meaning: Vec::new(),
            kind: ChainKind::Stages,
            loss_scale: None,
        }
    }

    /// A fresh device state: zeros, with each block's history capacity in its header.
    pub(crate) fn fresh_state(&self) -> PolicyState {
        let layout = (self.stages.iter())
            .flat_map(|s| {
                let head = [
                    s.adaptive,
                    s.history as u32,
                    s.formula as u32,
                    s.state_base as u32,
                ];
                let params: [u32; STAGE_PARAMS_WORDS] = bytemuck::cast(s.params);
                head.into_iter().chain(params)
            })
            .collect();
        let mut state = PolicyState::new(self.state_words, layout, self.meaning.clone());
        for stage in &self.stages {
            state.words[stage.state_base + ST_CAP] = stage.history as u32;
        }
        if let Some(ls) = self.loss_scale {
            state.words[ST_LOSS_SCALE] = ls.init.to_bits();
        }
        state
    }

    /// Resolves `policy` (its chain of norm stages) over tensors described by `infos`.
    pub(crate) fn new(policy: &ClipPolicy, infos: &[TensorInfo]) -> Result<Program, ClipError> {
        policy.validate()?;
        if let Some(t) = infos.iter().find(|t| t.checked_len().is_none()) {
            return Err(ClipError::ShapeMismatch {
                tensor: t.name.clone(),
                expected: "a shape whose element count fits in 64 bits".into(),
                got: format!("{:?}", t.shape),
            });
        }
        // Units: AGC's where the chain has AGC (its excluded tensors whole), else tensors.
        let agc = policy.rules().find_map(|r| match r.inner() {
            Rule::Agc(a) => Some(a),
            _ => None,
        });
        let mut units = Vec::new();
        let mut unit_names = Vec::new();
        let mut agc_unit = Vec::new();
        for (tensor, t) in infos.iter().enumerate() {
            let len = t.len();
            let (count, unit_len, stride, step) = match agc {
                Some(a) if !a.excludes(&t.name) && len > 0 => agc_units(t, a.axis)?,
                _ => (1, len, 1, len),
            };
            let is_agc = agc.is_some_and(|a| !a.excludes(&t.name) && len > 0);
            for u in 0..count {
                units.push(PlanSegment {
                    tensor,
                    first: u * step,
                    len: unit_len,
                    stride,
                });
                unit_names.push(format!("{}[{u}]", t.name));
                agc_unit.push(is_agc);
            }
        }
        let n = units.len();
        let tensor_of: Vec<u32> = units.iter().map(|u| u.tensor as u32).collect();
        let names = || infos.iter().map(|t| t.name.clone()).collect::<Vec<_>>();
        let global = |thr: f32| {
            plain_stage(
                vec![0; n],
                1,
                vec![thr],
                vec!["all".into()],
                Formula::PyTorch,
            )
        };
        let stage_of = |rule: &Rule| match rule {
            Rule::GlobalNorm(c) => global(*c),
            Rule::AutoClip(a) => StagePlan {
                adaptive: abi::ADAPTIVE_AUTOCLIP,
                params: abi::StageParams {
                    percentile: a.percentile,
                    capacity: a.history,
                    cap: a.max_norm.unwrap_or(0.0),
                    ..Default::default()
                },
                history: a.history as usize,
                ..global(0.0)
            },
            Rule::ZClip(z) => StagePlan {
                adaptive: abi::ADAPTIVE_ZCLIP,
                params: abi::StageParams {
                    capacity: z.warmup,
                    alpha: z.alpha,
                    z_thresh: z.z_thresh,
                    z_eps: z.eps,
                    cap: z.max_norm.unwrap_or(0.0),
                    ..Default::default()
                },
                history: z.warmup as usize,
                ..global(0.0)
            },
            Rule::PerTensor(r) => plain_stage(
                tensor_of.clone(),
                infos.len(),
                vec![r.max_norm; infos.len()],
                names(),
                Formula::Tf,
            ),
            // rms / t = norm / (t * sqrt(len)): clip_by_norm with that threshold.
            Rule::BlockRms(r) => plain_stage(
                tensor_of.clone(),
                infos.len(),
                infos
                    .iter()
                    .map(|t| r.threshold * (t.len() as f32).sqrt())
                    .collect(),
                names(),
                Formula::Tf,
            ),
            Rule::Groups(g) => {
                let of: Vec<u32> = infos.iter().map(|t| g.group_of(&t.name) as u32).collect();
                let mut thresholds: Vec<f32> = g.groups.iter().map(|x| x.max_norm).collect();
                thresholds.push(g.default_max_norm);
                let mut group_names: Vec<String> =
                    g.groups.iter().map(|x| x.name.clone()).collect();
                group_names.push("default".into());
                plain_stage(
                    tensor_of.iter().map(|&t| of[t as usize]).collect(),
                    g.groups.len() + 1,
                    thresholds,
                    group_names,
                    Formula::PyTorch,
                )
            }
            Rule::Agc(a) => {
                // One group per AGC unit; excluded tensors are left alone.
                let mut next = 0;
                let group_of: Vec<u32> = agc_unit
                    .iter()
                    .map(|&is| {
                        if is {
                            next += 1;
                            next - 1
                        } else {
                            NO_GROUP
                        }
                    })
                    .collect();
                let group_names = (0..n).filter(|&u| agc_unit[u]);
                let group_names = group_names.map(|u| unit_names[u].clone()).collect();
                StagePlan {
                    params: abi::StageParams {
                        lambda: a.lambda,
                        eps: a.eps,
                        ..Default::default()
                    },
                    ..plain_stage(
                        group_of,
                        next as usize,
                        vec![0.0; next as usize],
                        group_names,
                        Formula::Agc,
                    )
                }
            }
            Rule::Masked(_) => unreachable!("stage_of takes the rule under its masks"),
        };
        let mut stages: Vec<StagePlan> = (policy.rules())
            .map(|rule| {
                let mut stage = stage_of(rule.inner());
                let masked = |u: &PlanSegment| rule.masks(&infos[u.tensor].name);
                if units.iter().any(masked) {
                    for (g, u) in stage.group_of.iter_mut().zip(&units) {
                        if masked(u) {
                            *g = NO_GROUP;
                        }
                    }
                    let n_groups = stage.group_ranges.len();
                    (stage.members, stage.group_ranges) =
                        StagePlan::grouped(stage.group_of.clone(), n_groups);
                }
                stage
            })
            .collect();
        if stages.is_empty() {
            // A chain with no stage measures: one global stage whose infinite threshold
            // never clips (a value clamp alone skips the stages altogether).
            stages.push(global(f32::INFINITY));
        }
        Ok(Program {
            meaning: super::state::meaning_of(policy, infos),
            kind: policy.kind(),
            loss_scale: policy.loss_scale,
            ..Program::with_state(units, stages)
        })
    }

    /// Index in its logical tensor of element 0 of tensor `t`.
    pub(crate) fn base(&self, t: usize) -> u64 {
        self.bases.get(t).copied().unwrap_or(0)
    }

    /// True when the chain has an AGC stage (it reads the parameters).
    pub(crate) fn needs_params(&self) -> bool {
        self.stages.iter().any(|s| s.formula == Formula::Agc)
    }

    /// Per-example clipping of `batch` examples over tensors of `lens[t] = batch * P_t`
    /// elements laid out `[batch, P_t]`: one unit per (example, tensor), example-major.
    /// `per_layer`: each unit is clipped by its tensor's threshold; otherwise an example's
    /// units form one group with threshold `thresholds[0]`.
    pub(crate) fn per_example(
        lens: &[u64],
        batch: u64,
        thresholds: &[f32],
        per_layer: bool,
    ) -> Program {
        let n = lens.len();
        let mut units = Vec::with_capacity(batch as usize * n);
        for i in 0..batch {
            for (tensor, &len) in lens.iter().enumerate() {
                let p = len / batch;
                units.push(PlanSegment {
                    tensor,
                    first: i * p,
                    len: p,
                    stride: 1,
                });
            }
        }
        let count = units.len() as u32;
        let stage = if per_layer {
            plain_stage(
                (0..count).collect(),
                count as usize,
                (0..count).map(|s| thresholds[s as usize % n]).collect(),
                (0..count).map(|g| format!("{g}")).collect(),
                Formula::PyTorch,
            )
        } else {
            plain_stage(
                (0..count).map(|s| s / n.max(1) as u32).collect(),
                batch as usize,
                vec![thresholds[0]; batch as usize],
                (0..batch).map(|g| format!("{g}")).collect(),
                Formula::PyTorch,
            )
        };
        Program::with_state(units, vec![stage])
    }
}

/// The AGC units of a non-empty tensor: (count, elements per unit, element stride inside
/// a unit, distance between the first elements of consecutive units).
///
/// `First` follows timm (`(out, in, ...)`): a whole tensor of rank <= 1, else one unit per
/// slice `W[i, ...]`. `Last` follows optax (`(in, out)`): a whole tensor when the shape
/// without its size-1 axes has rank <= 1; rank 2 and 3 reduce over axis 0 (every index of
/// the other axes is a unit, `in` elements apart); rank 4 over axes 0-2 and rank 5 over axes
/// 0-3 (a unit per output channel). Ranks above 5 are rejected, as optax does.
fn agc_units(t: &TensorInfo, axis: UnitAxis) -> Result<(u64, u64, u64, u64), ClipError> {
    let shape = &t.shape;
    let len = t.len();
    if shape.len() > 5 {
        return Err(ClipError::ShapeMismatch {
            tensor: t.name.clone(),
            expected: "a tensor of rank 5 or less for AGC".into(),
            got: format!("rank {} {:?}", shape.len(), shape),
        });
    }
    let squeezed = shape.iter().filter(|&&d| d != 1).count();
    Ok(match axis {
        _ if shape.len() <= 1 => (1, len, 1, len),
        UnitAxis::First => (shape[0], len / shape[0], 1, len / shape[0]),
        UnitAxis::Last if squeezed <= 1 => (1, len, 1, len),
        UnitAxis::Last => {
            // Axes reduced: 0 for ranks 2 and 3, all but the last for ranks 4 and 5.
            let reduced = if shape.len() <= 3 { 1 } else { shape.len() - 1 };
            let per_unit: u64 = shape[..reduced].iter().product();
            let units = len / per_unit;
            (units, per_unit, units, 1)
        }
    })
}

/// Checks that each info's shape matches the tensor length `lens[i]`.
pub(crate) fn check_shapes(
    infos: &[TensorInfo],
    lens: impl ExactSizeIterator<Item = u64>,
) -> Result<(), ClipError> {
    let expected: Vec<u64> = infos.iter().map(TensorInfo::len).collect();
    check_lens(&expected, infos, lens)
}

/// [`check_shapes`] against the lengths `expected` of `infos`, kept side by side by a
/// runner: a step reads one array, not every description (2000 small tensors' shapes
/// cost a tenth of a norm's time).
pub(crate) fn check_lens(
    expected: &[u64],
    infos: &[TensorInfo],
    lens: impl ExactSizeIterator<Item = u64>,
) -> Result<(), ClipError> {
    if expected.len() != lens.len() {
        return Err(ClipError::ShapeMismatch {
            tensor: "batch".into(),
            expected: format!("{} tensors", expected.len()),
            got: format!("{} tensors", lens.len()),
        });
    }
    for (t, (&want, got)) in expected.iter().zip(lens).enumerate() {
        if want != got {
            return Err(ClipError::ShapeMismatch {
                tensor: infos[t].name.clone(),
                expected: format!("{want} elements (shape {:?})", infos[t].shape),
                got: format!("{got} elements"),
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn units(shape: &[u64], axis: UnitAxis) -> (u64, u64, u64, u64) {
        agc_units(&TensorInfo::new("w", shape), axis).unwrap()
    }

    #[test]
    fn agc_units_follow_timm_and_optax_at_every_rank() {
        use UnitAxis::{First, Last};
        // timm, output first.
        assert_eq!(units(&[7], First), (1, 7, 1, 7));
        assert_eq!(units(&[4, 3], First), (4, 3, 1, 3));
        assert_eq!(units(&[8, 3, 2, 2], First), (8, 12, 1, 12));
        assert_eq!(units(&[2, 3, 2, 2, 2], First), (2, 24, 1, 24));
        // optax, output last: squeezed rank <= 1 is one unit.
        assert_eq!(units(&[1, 5], Last), (1, 5, 1, 5));
        assert_eq!(units(&[5, 1], Last), (1, 5, 1, 5));
        assert_eq!(units(&[3, 4], Last), (4, 3, 4, 1));
        // Rank 3 reduces over axis 0 only: (4, 2, 3) has 6 units of 4 elements.
        assert_eq!(units(&[4, 2, 3], Last), (6, 4, 6, 1));
        // Conv HWIO and DHWIO: one unit per output channel.
        assert_eq!(units(&[3, 3, 2, 5], Last), (5, 18, 5, 1));
        assert_eq!(units(&[2, 3, 3, 2, 5], Last), (5, 36, 5, 1));
        assert!(agc_units(&TensorInfo::new("w", &[1; 6]), Last).is_err());
        assert!(agc_units(&TensorInfo::new("w", &[2; 6]), First).is_err());
    }

    #[test]
    fn wrapping_shapes_are_rejected() {
        let policy = ClipPolicy::new(Rule::Agc(crate::Agc::new(0.01)));
        let infos = [TensorInfo::new("w", &[(1 << 63) + 2, 2])];
        assert!(matches!(
            Program::new(&policy, &infos),
            Err(ClipError::ShapeMismatch { .. })
        ));
    }
}
