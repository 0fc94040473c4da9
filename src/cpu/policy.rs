//! CPU twin of `shaders/policy.wgsl` and `shaders/segment_apply.wgsl`: a clipping policy
//! step on host slices. Norms are reduced exactly in f64 (the oracle of the GPU's f32
//! accumulators); the adaptive state is updated with the shader's f32 arithmetic, in the
//! same order, so a state moves between backends.

use std::sync::Arc;

use half::f16;
use rayon::prelude::*;

use super::apply::{bf16_to_f32, f32_to_bf16};
use super::norm_reduce::{self, BLOCK};
use super::philox::gaussian_noise;
use crate::dtype::{GradMut, GradRef};
use crate::error::ClipError;
use crate::norm::{Norm, NormAcc, FLAG_INF, FLAG_NAN};
use crate::plan::PlanSegment;
use crate::policies::{
    check_shapes, ClipPolicy, Formula, Layout, PolicyState, Rule, TensorInfo, HEADER_WORDS,
    ST_MEAN, ST_SEEN, ST_SKIPS, ST_VAR,
};
use crate::policy::NonFinitePolicy;
use crate::report::{
    PolicyOutcome, PolicyReport, ReportShape, UnitNorms, STATUS_HELD, STATUS_NANS_ZEROED,
    STATUS_NONFINITE, STATUS_SKIPPED,
};

/// Runs a [`ClipPolicy`] on host slices, step after step, keeping its state.
#[derive(Debug, Clone)]
pub struct CpuPolicy {
    policy: ClipPolicy,
    infos: Vec<TensorInfo>,
    layout: Layout,
    shape: Arc<ReportShape>,
    state: PolicyState,
}

/// The values of one segment: a view, or a gathered copy of a strided unit.
fn segment_values<'a>(g: &GradRef<'a>, seg: &PlanSegment) -> Result<GradRef<'a>, Vec<f32>> {
    let (a, n) = (seg.first as usize, seg.len as usize);
    if seg.stride == 1 {
        return Ok(match *g {
            GradRef::F32(x) => GradRef::F32(&x[a..a + n]),
            GradRef::F16(x) => GradRef::F16(&x[a..a + n]),
            GradRef::BF16(x) => GradRef::BF16(&x[a..a + n]),
        });
    }
    Err((0..n)
        .map(|k| to_f32(g, a + k * seg.stride as usize))
        .collect())
}

/// Element `i` of `g` as f32.
pub(crate) fn to_f32(g: &GradRef<'_>, i: usize) -> f32 {
    match g {
        GradRef::F32(x) => x[i],
        GradRef::F16(x) => x[i].to_f32(),
        GradRef::BF16(x) => bf16_to_f32(x[i]),
    }
}

/// The norm accumulator of every segment.
pub(crate) fn segment_accs(
    grads: &[GradRef<'_>],
    segments: &[PlanSegment],
    norm: Norm,
) -> Vec<NormAcc> {
    let values: Vec<Result<GradRef<'_>, Vec<f32>>> = segments
        .iter()
        .map(|s| segment_values(&grads[s.tensor], s))
        .collect();
    let refs: Vec<GradRef<'_>> = values
        .iter()
        .map(|v| match v {
            Ok(r) => *r,
            Err(owned) => GradRef::F32(owned),
        })
        .collect();
    norm_reduce::tensor_accs(&refs, norm)
}

/// Flags that count under `policy`: ZeroNans removes NaNs before the norm.
fn live(flags: u32, policy: NonFinitePolicy) -> u32 {
    if policy == NonFinitePolicy::ZeroNans {
        flags & !FLAG_NAN
    } else {
        flags
    }
}

/// `norm_coef` of the shader, in f64.
pub(crate) fn norm_coef(
    acc: &NormAcc,
    norm: Norm,
    c: f32,
    formula: Formula,
    policy: NonFinitePolicy,
) -> f32 {
    let flags = live(acc.flags, policy);
    if flags & FLAG_NAN != 0 {
        return f32::NAN;
    }
    if flags & FLAG_INF != 0 {
        return 0.0;
    }
    let n = NormAcc { flags: 0, ..*acc }.total(norm);
    let c = c as f64;
    match formula {
        Formula::Tf if n <= c => 1.0,
        Formula::Tf => (c / n) as f32,
        _ => (c / (n + 1e-6)).min(1.0) as f32,
    }
}

/// AGC coefficient of a unit with gradient norm `g` and parameter norm `w`.
fn agc_coef(g: &NormAcc, w: &NormAcc, lambda: f32, eps: f32, policy: NonFinitePolicy) -> f32 {
    let flags = live(g.flags | w.flags, policy);
    if flags != 0 {
        return if flags & FLAG_NAN != 0 { f32::NAN } else { 0.0 };
    }
    let wn = NormAcc { flags: 0, ..*w }.total(Norm::L2);
    let gn = NormAcc { flags: 0, ..*g }.total(Norm::L2);
    let limit = lambda as f64 * wn.max(eps as f64);
    if gn < limit {
        1.0
    } else {
        (limit / gn.max(1e-6)) as f32
    }
}

/// numpy's default percentile of `v` (0..100), in the shader's f32 arithmetic.
pub(crate) fn percentile(v: &[f32], q: f32) -> f32 {
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    let m = s.len();
    let pos = q / 100.0 * (m - 1) as f32;
    let lo = pos.floor() as usize;
    let hi = (lo + 1).min(m - 1);
    let t = pos - lo as f32;
    let (a, b) = (s[lo], s[hi]);
    if t >= 0.5 {
        b - (b - a) * (1.0 - t)
    } else {
        a + (b - a) * t
    }
}

fn word(state: &PolicyState, i: usize) -> f32 {
    f32::from_bits(state.words[i])
}

/// AutoClip: record `n` (when finite) and return the percentile threshold.
fn autoclip(state: &mut PolicyState, n: f32, record: bool, q: f32) -> f32 {
    let cap = state.words.len() - HEADER_WORDS;
    let mut seen = state.words[ST_SEEN];
    if record {
        state.words[HEADER_WORDS + seen as usize % cap] = n.to_bits();
        seen += 1;
        state.words[ST_SEEN] = seen;
    }
    let m = (seen as usize).min(cap);
    if m == 0 {
        return f32::INFINITY;
    }
    let hist: Vec<f32> = (0..m).map(|i| word(state, HEADER_WORDS + i)).collect();
    percentile(&hist, q)
}

/// ZClip: returns the threshold (infinity without a spike) and updates the state.
fn zclip(state: &mut PolicyState, n: f32, record: bool, alpha: f32, z_t: f32, z_eps: f32) -> f32 {
    if !record {
        return f32::INFINITY;
    }
    let warmup = (state.words.len() - HEADER_WORDS) as u32;
    let seen = state.words[ST_SEEN];
    if seen < warmup {
        state.words[HEADER_WORDS + seen as usize] = n.to_bits();
        state.words[ST_SEEN] = seen + 1;
        if seen + 1 == warmup {
            let hist: Vec<f32> = (0..warmup as usize)
                .map(|i| word(state, HEADER_WORDS + i))
                .collect();
            let mean = hist.iter().fold(0.0f32, |s, &x| s + x) / warmup as f32;
            let sq = hist
                .iter()
                .fold(0.0f32, |s, &x| s + (x - mean) * (x - mean));
            state.words[ST_MEAN] = mean.to_bits();
            state.words[ST_VAR] = (sq / warmup as f32).to_bits();
        }
        return f32::INFINITY;
    }
    let (mean, var) = (word(state, ST_MEAN), word(state, ST_VAR));
    let sigma = var.sqrt();
    let z = (n - mean) / (sigma + z_eps);
    let (mut thr, mut x) = (f32::INFINITY, n);
    if z > z_t {
        thr = mean + z_t * z_t * sigma / z;
        x = thr;
    }
    let new_mean = alpha * mean + (1.0 - alpha) * x;
    let d = x - new_mean;
    state.words[ST_MEAN] = new_mean.to_bits();
    state.words[ST_VAR] = (alpha * var + (1.0 - alpha) * d * d).to_bits();
    state.words[ST_SEEN] = seen + 1;
    thr
}

/// Rewrites the elements of `seg` in `g` with `f(x, index in tensor)`.
fn rewrite(g: &mut GradMut<'_>, seg: &PlanSegment, f: impl Fn(f32, u32) -> f32 + Sync) {
    fn run<T: Send + Copy>(x: &mut [T], seg: &PlanSegment, f: impl Fn(T, u32) -> T + Sync) {
        let (a, n, stride) = (seg.first as usize, seg.len as usize, seg.stride as usize);
        if stride == 1 {
            x[a..a + n]
                .par_chunks_mut(BLOCK)
                .enumerate()
                .for_each(|(b, c)| {
                    for (j, v) in c.iter_mut().enumerate() {
                        *v = f(*v, (a + b * BLOCK + j) as u32);
                    }
                });
        } else {
            for k in 0..n {
                let i = a + k * stride;
                x[i] = f(x[i], i as u32);
            }
        }
    }
    match g {
        GradMut::F32(x) => run(x, seg, &f),
        GradMut::F16(x) => run(x, seg, |v: f16, i| f16::from_f32(f(v.to_f32(), i))),
        GradMut::BF16(x) => run(x, seg, |v, i| f32_to_bf16(f(bf16_to_f32(v), i))),
    }
}

impl CpuPolicy {
    /// A policy over tensors described by `infos` (names and shapes, in batch order).
    pub fn new(policy: ClipPolicy, infos: &[TensorInfo]) -> Result<CpuPolicy, ClipError> {
        let layout = Layout::new(&policy, infos)?;
        Ok(CpuPolicy {
            state: PolicyState::new(layout.history),
            shape: ReportShape::new(&layout, infos),
            policy,
            infos: infos.to_vec(),
            layout,
        })
    }

    /// The state to save (see [`PolicyState::to_bytes`]).
    pub fn state(&self) -> &PolicyState {
        &self.state
    }

    /// Restores a saved state (from either backend).
    pub fn set_state(&mut self, state: PolicyState) -> Result<(), ClipError> {
        state.check_fits(self.layout.history)?;
        self.state = state;
        Ok(())
    }

    /// Checks the inputs of the next step; returns its schedule multiplier.
    pub(crate) fn check(
        &self,
        grads: &[GradMut<'_>],
        params: Option<&[GradRef<'_>]>,
    ) -> Result<f32, ClipError> {
        let lens: Vec<u64> = grads.iter().map(|g| g.as_ref().len() as u64).collect();
        check_shapes(&self.infos, &lens)?;
        match (&self.policy.rule, params) {
            (Rule::Agc(_), Some(p)) => {
                let plens: Vec<u64> = p.iter().map(|g| g.len() as u64).collect();
                check_shapes(&self.infos, &plens)?;
            }
            (Rule::Agc(_), None) => {
                return Err(ClipError::InvalidConfig(
                    "AGC needs the parameters alongside the gradients".into(),
                ))
            }
            _ => {}
        }
        self.policy.schedule.checked(self.state.step)
    }

    /// Runs one step on `grads` in place; AGC also needs the parameters (same shapes).
    /// Errors leave the gradients and the state untouched.
    pub fn step(
        &mut self,
        grads: &mut [GradMut<'_>],
        params: Option<&[GradRef<'_>]>,
    ) -> Result<PolicyReport, ClipError> {
        let mult = self.check(grads, params)?;
        let (policy, layout) = (&self.policy, &self.layout);
        let norm = policy.norm;
        let nf = policy.non_finite;
        let step = self.state.step;
        let w_accs = params
            .filter(|_| matches!(policy.rule, Rule::Agc(_)))
            .map(|p| segment_accs(p, &layout.segments, Norm::L2));
        let refs: Vec<GradRef<'_>> = grads.iter().map(|g| g.as_ref()).collect();
        let seg = segment_accs(&refs, &layout.segments, norm);
        let groups: Vec<NormAcc> = layout
            .group_ranges
            .iter()
            .map(|&[a, n]| norm_reduce::total_acc(&seg[a as usize..(a + n) as usize], norm))
            .collect();
        let total = norm_reduce::total_acc(&groups, norm);

        // finish
        let mut state = self.state.clone();
        let flags = live(total.flags, nf);
        let mut status = if total.flags != 0 {
            STATUS_NONFINITE
        } else {
            0
        };
        if total.flags & FLAG_NAN != 0 && nf == NonFinitePolicy::ZeroNans {
            status |= STATUS_NANS_ZEROED;
        }
        if flags != 0 && matches!(nf, NonFinitePolicy::Error | NonFinitePolicy::SkipStep) {
            status |= STATUS_HELD;
            if nf == NonFinitePolicy::SkipStep {
                status |= STATUS_SKIPPED;
            }
        }
        let n = NormAcc { flags: 0, ..total }.total(norm) as f32;
        let record = flags == 0;
        let mut thr = layout.thresholds.first().copied().unwrap_or(0.0) * mult;
        let cap = match &policy.rule {
            Rule::AutoClip(a) => {
                thr = autoclip(&mut state, n, record, a.percentile) * mult;
                a.max_norm
            }
            Rule::ZClip(z) => {
                thr = zclip(&mut state, n, record, z.alpha, z.z_thresh, z.eps) * mult;
                z.max_norm
            }
            _ => None,
        };
        if let Some(c) = cap {
            thr = thr.min(c * mult);
        }
        let skips = if status & STATUS_SKIPPED != 0 {
            state.words[ST_SKIPS] + 1
        } else {
            0
        };
        state.words[ST_SKIPS] = skips;
        let coef = if layout.adaptive == 2 && thr == f32::INFINITY {
            1.0
        } else {
            norm_coef(&total, norm, thr, Formula::PyTorch, nf)
        };

        // coefs
        let coefs: Vec<f32> = (0..layout.segments.len())
            .map(|s| {
                let g = layout.group_of[s] as usize;
                if status & STATUS_HELD != 0 {
                    1.0
                } else if let (Rule::Agc(agc), Some(w)) = (&policy.rule, &w_accs) {
                    agc_coef(&seg[s], &w[s], agc.lambda * mult, agc.eps, nf)
                } else if layout.adaptive != 0 {
                    coef
                } else {
                    norm_coef(
                        &groups[g],
                        norm,
                        layout.thresholds[g] * mult,
                        layout.formula,
                        nf,
                    )
                }
            })
            .collect();
        // NaN coefficients count as clipping.
        let clipped = coefs.iter().filter(|c| c.is_nan() || **c < 1.0).count() as u32;

        // apply
        if status & STATUS_HELD == 0 {
            let zero_nans = nf == NonFinitePolicy::ZeroNans;
            let noise = policy.noise.filter(|n| n.sigma > 0.0);
            for (s, segment) in layout.segments.iter().enumerate() {
                let c = coefs[s];
                if c == 1.0 && noise.is_none() && !zero_nans {
                    continue;
                }
                let tensor = segment.tensor as u32;
                rewrite(&mut grads[segment.tensor], segment, |x, i| {
                    let mut y = if zero_nans && x.is_nan() { 0.0 } else { x };
                    y *= c;
                    if let Some(n) = noise {
                        y += n.sigma * gaussian_noise(n.seed, step, tensor, i);
                    }
                    y
                });
            }
        }
        state.step += 1;
        self.state = state;
        let detail = policy.report_groups.then(|| UnitNorms {
            shape: self.shape.clone(),
            groups,
            units: seg,
            coefs,
        });
        PolicyOutcome {
            step,
            norm,
            total,
            threshold: thr,
            coef,
            status,
            clipped,
            units: layout.segments.len() as u32,
            skips,
            global: policy.rule.is_global(),
            policy: nf,
            detail,
        }
        .report()
    }
}

/// A group's norm as reported: NaNs excluded under ZeroNans.
pub(crate) fn live_total(acc: &NormAcc, norm: Norm, policy: NonFinitePolicy) -> f64 {
    NormAcc {
        flags: live(acc.flags, policy),
        ..*acc
    }
    .total(norm)
}
