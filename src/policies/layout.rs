//! From a policy and the batch's tensors to the segments that get a norm, the groups
//! whose norms set a threshold, and the formula that turns them into coefficients.

use super::rules::{Rule, UnitAxis};
use super::{ClipPolicy, TensorInfo};
use crate::error::ClipError;
use crate::plan::PlanSegment;
use crate::shaders::abi;

/// How a norm and a threshold give a coefficient (`FORMULA` of `shaders/policy.wgsl`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Formula {
    /// `min(c / (n + 1e-6), 1)`.
    PyTorch = abi::FORMULA_PYTORCH as isize,
    /// `c / max(n, c)`.
    Tf = abi::FORMULA_TF as isize,
    /// AGC against the parameters' unit norms.
    Agc = abi::FORMULA_AGC as isize,
}

/// The resolved shape of a policy over one batch.
#[derive(Debug, Clone)]
pub(crate) struct Layout {
    /// Segments, numbered in group order.
    pub segments: Vec<PlanSegment>,
    /// Group of each segment.
    pub group_of: Vec<u32>,
    /// Per group: (first segment, segment count).
    pub group_ranges: Vec<[u32; 2]>,
    /// Base threshold per group (before the schedule).
    pub thresholds: Vec<f32>,
    /// Group names for reports.
    pub group_names: Vec<String>,
    pub formula: Formula,
    /// `ADAPTIVE` of the shader: 0 none, 1 AutoClip, 2 ZClip.
    pub adaptive: u32,
    /// History slots of the state.
    pub history: usize,
}

impl Layout {
    /// The global-norm program over whole tensors of lengths `lens`, base threshold 1 (each
    /// step's multiplier is its max_norm): PyTorch's `clip_grad_norm_` and the split API.
    pub(crate) fn global(lens: &[u64]) -> Layout {
        let n = lens.len();
        Layout {
            segments: (lens.iter().enumerate())
                .map(|(tensor, &len)| PlanSegment {
                    tensor,
                    first: 0,
                    len,
                    stride: 1,
                })
                .collect(),
            group_of: vec![0; n],
            group_ranges: vec![[0, n as u32]],
            thresholds: vec![1.0],
            group_names: vec!["all".into()],
            formula: Formula::PyTorch,
            adaptive: abi::ADAPTIVE_NONE,
            history: 0,
        }
    }

    /// Resolves `policy` over tensors described by `infos`.
    pub(crate) fn new(policy: &ClipPolicy, infos: &[TensorInfo]) -> Result<Layout, ClipError> {
        policy.validate()?;
        if let Some(t) = infos.iter().find(|t| t.checked_len().is_none()) {
            return Err(ClipError::ShapeMismatch {
                tensor: t.name.clone(),
                expected: "a shape whose element count fits in 64 bits".into(),
                got: format!("{:?}", t.shape),
            });
        }
        let whole: Vec<PlanSegment> = infos
            .iter()
            .enumerate()
            .map(|(tensor, t)| PlanSegment {
                tensor,
                first: 0,
                len: t.len(),
                stride: 1,
            })
            .collect();
        let n = infos.len();
        let names = || infos.iter().map(|t| t.name.clone()).collect::<Vec<_>>();
        let one_group = |thr: f32, adaptive: u32, history: usize| Layout {
            group_of: vec![0; n],
            group_ranges: vec![[0, n as u32]],
            segments: whole.clone(),
            thresholds: vec![thr],
            group_names: vec!["all".into()],
            formula: Formula::PyTorch,
            adaptive,
            history,
        };
        let per_segment = |segments: Vec<PlanSegment>, thresholds: Vec<f32>, formula, names| {
            let count = segments.len();
            Layout {
                group_of: (0..count as u32).collect(),
                group_ranges: (0..count as u32).map(|s| [s, 1]).collect(),
                segments,
                thresholds,
                group_names: names,
                formula,
                adaptive: 0,
                history: 0,
            }
        };
        Ok(match &policy.rule {
            Rule::GlobalNorm(c) => one_group(*c, 0, 0),
            Rule::AutoClip(a) => one_group(0.0, 1, a.history as usize),
            Rule::ZClip(z) => one_group(0.0, 2, z.warmup as usize),
            Rule::PerTensor(r) => per_segment(whole, vec![r.max_norm; n], Formula::Tf, names()),
            Rule::BlockRms(r) => {
                // rms / t = norm / (t * sqrt(len)): clip_by_norm with that threshold.
                let thr = infos
                    .iter()
                    .map(|t| r.threshold * (t.len() as f32).sqrt())
                    .collect();
                per_segment(whole, thr, Formula::Tf, names())
            }
            Rule::Groups(g) => {
                let count = g.groups.len() + 1;
                let of: Vec<usize> = infos.iter().map(|t| g.group_of(&t.name)).collect();
                let mut segments = Vec::with_capacity(n);
                let mut group_of = Vec::with_capacity(n);
                let mut group_ranges = Vec::with_capacity(count);
                for group in 0..count {
                    let first = segments.len() as u32;
                    for (t, _) in of.iter().enumerate().filter(|(_, &x)| x == group) {
                        segments.push(whole[t]);
                        group_of.push(group as u32);
                    }
                    group_ranges.push([first, segments.len() as u32 - first]);
                }
                let mut thresholds: Vec<f32> = g.groups.iter().map(|x| x.max_norm).collect();
                thresholds.push(g.default_max_norm);
                let mut group_names: Vec<String> =
                    g.groups.iter().map(|x| x.name.clone()).collect();
                group_names.push("default".into());
                Layout {
                    segments,
                    group_of,
                    group_ranges,
                    thresholds,
                    group_names,
                    formula: Formula::PyTorch,
                    adaptive: 0,
                    history: 0,
                }
            }
            Rule::Agc(agc) => {
                let mut segments = Vec::new();
                let mut unit_names = Vec::new();
                for (tensor, t) in infos.iter().enumerate() {
                    if agc.excludes(&t.name) || t.is_empty() {
                        continue;
                    }
                    let (units, unit_len, stride, step) = agc_units(t, agc.axis)?;
                    for u in 0..units {
                        segments.push(PlanSegment {
                            tensor,
                            first: u * step,
                            len: unit_len,
                            stride,
                        });
                        unit_names.push(format!("{}[{u}]", t.name));
                    }
                }
                let count = segments.len();
                per_segment(segments, vec![0.0; count], Formula::Agc, unit_names)
            }
        })
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
pub(crate) fn check_shapes(infos: &[TensorInfo], lens: &[u64]) -> Result<(), ClipError> {
    if infos.len() != lens.len() {
        return Err(ClipError::ShapeMismatch {
            tensor: "batch".into(),
            expected: format!("{} tensors", infos.len()),
            got: format!("{} tensors", lens.len()),
        });
    }
    for (info, &len) in infos.iter().zip(lens) {
        if info.len() != len {
            return Err(ClipError::ShapeMismatch {
                tensor: info.name.clone(),
                expected: format!("{} elements (shape {:?})", info.len(), info.shape),
                got: format!("{len} elements"),
            });
        }
    }
    Ok(())
}

impl Layout {
    /// Per-example clipping of `batch` examples over tensors of `lens[t] = batch * P_t`
    /// elements laid out `[batch, P_t]`: one segment per (example, tensor), example-major.
    /// `per_layer`: each segment is clipped by its tensor's threshold; otherwise an
    /// example's segments form one group with threshold `thresholds[0]`.
    pub(crate) fn per_example(
        lens: &[u64],
        batch: u64,
        thresholds: &[f32],
        per_layer: bool,
    ) -> Layout {
        let n = lens.len();
        let mut segments = Vec::with_capacity(batch as usize * n);
        for i in 0..batch {
            for (tensor, &len) in lens.iter().enumerate() {
                let p = len / batch;
                segments.push(PlanSegment {
                    tensor,
                    first: i * p,
                    len: p,
                    stride: 1,
                });
            }
        }
        let count = segments.len() as u32;
        let (group_of, group_ranges, group_thresholds): (Vec<u32>, Vec<[u32; 2]>, Vec<f32>) =
            if per_layer {
                (
                    (0..count).collect(),
                    (0..count).map(|s| [s, 1]).collect(),
                    (0..count).map(|s| thresholds[s as usize % n]).collect(),
                )
            } else {
                (
                    (0..count).map(|s| s / n.max(1) as u32).collect(),
                    (0..batch as u32)
                        .map(|i| [i * n as u32, n as u32])
                        .collect(),
                    vec![thresholds[0]; batch as usize],
                )
            };
        Layout {
            group_names: (0..group_ranges.len()).map(|g| format!("{g}")).collect(),
            segments,
            group_of,
            group_ranges,
            thresholds: group_thresholds,
            formula: Formula::PyTorch,
            adaptive: 0,
            history: 0,
        }
    }
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
            Layout::new(&policy, &infos),
            Err(ClipError::ShapeMismatch { .. })
        ));
    }
}
