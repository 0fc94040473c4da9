//! CPU twin of the GPU engine (`src/gpu/engine/`): the same program ([`Program`]) run
//! as the same recording of a step ([`crate::recording::record`]), entry for entry
//! ([`execute`]), by functions named after the engine's stages (`finish` and `coefs` are
//! also the shader entry points' names, `undo` a function of `coef.wgsl`; `combine` is the
//! entry `groups` of `norm_combine.wgsl`, and `reduce` does in one step what
//! `norm_reduce.wgsl` and the entry `main` of `norm_combine.wgsl` do in two):
//! `reduce` (unit norms, exact in f64), then per norm stage `combine` (its groups, from the
//! unit norms times the coefficients so far), `finish` (total, non-finite policy,
//! adaptive state, global coefficient) and `coefs` (the unit coefficients), then `rewrite`
//! (the fused elementwise pass). The adaptive state is updated with the shader's f32 arithmetic
//! in the same order, so a state moves between backends. Tests can compare any stage.

use half::f16;
use rayon::prelude::*;

use super::apply::{self, bf16_to_f32, f32_to_bf16};
use super::norm_reduce::{self, BLOCK};
use super::philox::gaussian_noise;
use crate::chain::{
    Formula, GaussianNoise, LossScale, LossScaleState, PolicyState, Program, StagePlan,
    HEADER_WORDS, NO_GROUP, ST_GOOD_STEPS, ST_LOSS_SCALE, ST_MEAN, ST_RECORDED, ST_SAVED_MEAN,
    ST_SAVED_SLOT, ST_SAVED_VAR, ST_SEEN, ST_SKIPS, ST_VAR,
};
use crate::dtype::{GradMut, GradRef};
use crate::non_finite::NonFinitePolicy;
use crate::norm::{Norm, NormAcc, FLAG_INF, FLAG_NAN};
use crate::ops::ValueClip;
use crate::plan::PlanSegment;
use crate::recording::{Dispatch, Source};
use crate::report::{
    STATUS_HELD, STATUS_NANS_ZEROED, STATUS_NONFINITE, STATUS_SCALED, STATUS_SKIPPED,
};
use crate::shaders::abi;

/// The host values of one step (the CPU side of `StepParams`).
#[derive(Debug, Clone, Copy)]
pub(crate) struct CpuStep {
    pub norm: Norm,
    pub policy: NonFinitePolicy,
    /// Factor of every threshold (the schedule; `max_norm` for a plain global clip).
    pub multiplier: f32,
    /// A total norm supplied by the caller (split API) instead of the reduced one.
    pub given: Option<NormAcc>,
    pub noise: Option<GaussianNoise>,
    /// The step number (noise key).
    pub step: u64,
    pub clamp: Option<ValueClip>,
    /// The chain's loss scaling (its scale is in the state).
    pub loss_scale: Option<LossScale>,
}

/// What `finish` leaves for the later stages and the report.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Finish {
    pub total: NormAcc,
    pub status: u32,
    pub threshold: f32,
    pub coef: f32,
    pub skips: u32,
}

impl Finish {
    /// The finish of a stage not run yet.
    const NONE: Finish = Finish {
        total: NormAcc::IDENTITY,
        status: 0,
        threshold: 0.0,
        coef: 1.0,
        skips: 0,
    };
}

/// The values of one unit: a view, or a gathered copy of a strided unit.
fn unit_values<'a>(g: &GradRef<'a>, seg: &PlanSegment) -> Result<GradRef<'a>, Vec<f32>> {
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

/// `reduce`: the norm accumulator of every unit of the `count` tensors `grad(t)`, into
/// `accs`.
fn reduce<'g>(
    count: usize,
    grad: impl Fn(usize) -> GradRef<'g> + Sync,
    units: &[PlanSegment],
    norm: Norm,
    accs: &mut Vec<NormAcc>,
) {
    let whole = units.len() == count
        && units
            .iter()
            .enumerate()
            .all(|(t, u)| u.tensor == t && u.first == 0 && u.stride == 1);
    if whole {
        return norm_reduce::tensor_accs_into(count, grad, norm, accs);
    }
    let values: Vec<Result<GradRef<'_>, Vec<f32>>> = units
        .iter()
        .map(|s| unit_values(&grad(s.tensor), s))
        .collect();
    let unit = |u: usize| match &values[u] {
        Ok(r) => *r,
        Err(owned) => GradRef::F32(owned),
    };
    norm_reduce::tensor_accs_into(units.len(), unit, norm, accs)
}

/// `combine`: the norm of each group of `stage` into `groups`, from the unit norms times
/// `coefs` (the coefficients of the earlier stages; `None` for the first).
fn combine(
    units: &[NormAcc],
    coefs: Option<&[f32]>,
    stage: &StagePlan,
    norm: Norm,
    groups: &mut Vec<NormAcc>,
) {
    groups.clear();
    groups.extend(stage.group_ranges.iter().map(|&[a, n]| {
        let members = &stage.members[a as usize..(a + n) as usize];
        // In member order, as `total_acc` folds.
        members.iter().fold(NormAcc::IDENTITY, |acc, &u| {
            let unit = match coefs {
                Some(c) => units[u as usize].scaled(c[u as usize]),
                None => units[u as usize],
            };
            acc.combine(unit, norm)
        })
    }));
}

/// The coefficient of a norm against threshold `c`: `norm_coef` of the shader, in its f32
/// arithmetic, so both backends agree at ties: PyTorch's `min(c / (n + 1e-6), 1)` or TF's
/// `c / max(n, c)`; NaN when a NaN counts, 0 for an infinity. Finite for norms beyond f32
/// range.
fn norm_coef(acc: &NormAcc, norm: Norm, c: f32, formula: Formula, policy: NonFinitePolicy) -> f32 {
    let flags = policy.live_flags(acc.flags);
    if flags & FLAG_NAN != 0 {
        return f32::NAN;
    }
    if flags & FLAG_INF != 0 {
        return 0.0;
    }
    match formula {
        Formula::Tf if acc.value_f32(norm).0 <= c => 1.0,
        Formula::Tf => acc.ratio_f32(norm, c, 0.0),
        _ => acc.ratio_f32(norm, c, 1e-6).min(1.0),
    }
}

/// AGC coefficient of a unit with gradient norm `g` and parameter norm `w`.
fn agc_coef(g: &NormAcc, w: &NormAcc, lambda: f32, eps: f32, policy: NonFinitePolicy) -> f32 {
    let flags = policy.live_flags(g.flags | w.flags);
    if flags & FLAG_NAN != 0 {
        return f32::NAN;
    }
    // An infinite gradient norm scales to 0; an infinite parameter norm makes the limit
    // infinite, which leaves the unit as it is (timm).
    if flags & g.flags & FLAG_INF != 0 {
        return 0.0;
    }
    if flags != 0 {
        return 1.0;
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
fn percentile(v: &[f32], q: f32) -> f32 {
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    let m = s.len();
    let pos = q / 100.0 * (m - 1) as f32;
    // f32(m - 1) may round up for long histories.
    let lo = (pos.floor() as usize).min(m - 1);
    let hi = (lo + 1).min(m - 1);
    let t = pos - lo as f32;
    let (a, b) = (s[lo], s[hi]);
    if t >= 0.5 {
        b - (b - a) * (1.0 - t)
    } else {
        a + (b - a) * t
    }
}

fn word(block: &[u32], i: usize) -> f32 {
    f32::from_bits(block[i])
}

/// AutoClip on its state block: record `n` (when finite) and return the percentile
/// threshold.
fn autoclip(state: &mut [u32], n: f32, record: bool, q: f32) -> f32 {
    let cap = state.len() - HEADER_WORDS;
    let mut seen = state[ST_SEEN];
    if record {
        state[HEADER_WORDS + seen as usize % cap] = n.to_bits();
        seen = seen.wrapping_add(1);
        state[ST_SEEN] = seen;
    }
    let m = (seen as usize).min(cap);
    if m == 0 {
        return f32::INFINITY;
    }
    let hist: Vec<f32> = (0..m).map(|i| word(state, HEADER_WORDS + i)).collect();
    percentile(&hist, q)
}

/// ZClip on its state block: returns the threshold (infinity without a spike) and
/// updates the state.
/// The sum of `f` over `values` in the order of the shader's `warmup_moments`: lane `t`
/// of a workgroup adds values `t, t + WG, ...`, then the lanes meet in the shared tree.
fn workgroup_sum(values: &[f32], f: impl Fn(f32) -> f32) -> f32 {
    let mut lanes = [0.0f32; abi::WG as usize];
    for (i, &v) in values.iter().enumerate() {
        lanes[i % lanes.len()] += f(v);
    }
    let mut stride = lanes.len() / 2;
    while stride > 0 {
        for i in 0..stride {
            lanes[i] += lanes[i + stride];
        }
        stride /= 2;
    }
    lanes[0]
}

fn zclip(state: &mut [u32], n: f32, record: bool, p: &abi::StageParams) -> f32 {
    let (alpha, z_t, z_eps) = (p.alpha, p.z_thresh, p.z_eps);
    if !record {
        return f32::INFINITY;
    }
    let warmup = (state.len() - HEADER_WORDS) as u32;
    let seen = state[ST_SEEN];
    if seen < warmup {
        state[HEADER_WORDS + seen as usize] = n.to_bits();
        state[ST_SEEN] = seen + 1;
        if seen + 1 == warmup {
            let hist: Vec<f32> = (0..warmup as usize)
                .map(|i| word(state, HEADER_WORDS + i))
                .collect();
            let mean = workgroup_sum(&hist, |x| x) / warmup as f32;
            let var = workgroup_sum(&hist, |x| (x - mean) * (x - mean)) / warmup as f32;
            state[ST_MEAN] = mean.to_bits();
            state[ST_VAR] = var.to_bits();
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
    state[ST_MEAN] = new_mean.to_bits();
    state[ST_VAR] = (alpha * var + (1.0 - alpha) * d * d).to_bits();
    state[ST_SEEN] = seen.wrapping_add(1);
    thr
}

/// `finish` of one norm stage: its total norm (combined groups, or the caller's), the
/// non-finite policy, the adaptive threshold and the coefficient of the first group;
/// updates the stage's state block (not when `held_before`: an earlier stage holds the
/// step). `outside`: the flags of the units the stage leaves alone, which the step's
/// verdict sees too (the first stage's; 0 for the others).
fn finish(
    groups: &[NormAcc],
    (param_flags, outside, inv_scale): (u32, u32, f32),
    stage: &StagePlan,
    step: &CpuStep,
    held_before: bool,
    state: &mut PolicyState,
) -> Finish {
    let norm = step.norm;
    let mut total = step
        .given
        .unwrap_or_else(|| norm_reduce::total_acc(groups, norm));
    total.flags |= param_flags;
    // The norm of the unscaled gradients (a norm scales linearly).
    let total = total.scaled(inv_scale);
    let block = &mut state.words[stage.state_base..stage.state_base + HEADER_WORDS + stage.history];
    let seen = total.flags | outside;
    let flags = step.policy.live_flags(seen);
    let mut status = if seen != 0 { STATUS_NONFINITE } else { 0 };
    if seen & FLAG_NAN != 0 && step.policy == NonFinitePolicy::ZeroNans {
        status |= STATUS_NANS_ZEROED;
    }
    if flags != 0
        && matches!(
            step.policy,
            NonFinitePolicy::Error | NonFinitePolicy::SkipStep
        )
    {
        status |= STATUS_HELD;
        if step.policy == NonFinitePolicy::SkipStep {
            status |= STATUS_SKIPPED;
        }
    }
    // Non-finite norms are never recorded: one bad step must not poison the history, and
    // a step an earlier stage holds records nothing. A norm beyond f32 range enters the
    // history as f32::MAX.
    let n = total.value_f32(norm).0.min(f32::MAX);
    let own = step.policy.live_flags(total.flags);
    let record = own == 0 && status & STATUS_HELD == 0 && !held_before;
    let mult = step.multiplier;
    let p = &stage.params;
    if stage.adaptive != abi::ADAPTIVE_NONE {
        block[ST_RECORDED] = record as u32;
        if record {
            save_overwritten(block);
        }
    }
    let threshold = match stage.adaptive {
        abi::ADAPTIVE_AUTOCLIP => autoclip(block, n, record, p.percentile) * mult,
        abi::ADAPTIVE_ZCLIP => zclip(block, n, record, p) * mult,
        _ => stage.thresholds.first().copied().unwrap_or(0.0) * mult,
    };
    let threshold = if stage.adaptive != abi::ADAPTIVE_NONE && p.cap > 0.0 {
        threshold.min(p.cap * mult)
    } else {
        threshold
    };
    let no_spike = stage.adaptive == abi::ADAPTIVE_ZCLIP && threshold == f32::INFINITY;
    let coef = if no_spike {
        1.0
    } else {
        norm_coef(&total, norm, threshold, Formula::PyTorch, step.policy)
    };
    let held = status & STATUS_HELD != 0;
    let every_unit = step.noise.is_some_and(|n| n.sigma > 0.0)
        || step.clamp.is_some()
        || status & STATUS_NANS_ZEROED != 0
        || inv_scale != 1.0;
    if !held && (every_unit || coef < 1.0 || coef.is_nan()) {
        status |= STATUS_SCALED;
    }
    Finish {
        total,
        status,
        threshold,
        coef,
        skips: 0,
    }
}

/// Keeps what recording a norm overwrites in the block's `ST_SAVED_*` words.
fn save_overwritten(block: &mut [u32]) {
    let cap = block.len() - HEADER_WORDS;
    if cap > 0 {
        block[ST_SAVED_SLOT] = block[HEADER_WORDS + block[ST_SEEN] as usize % cap];
    }
    block[ST_SAVED_MEAN] = block[ST_MEAN];
    block[ST_SAVED_VAR] = block[ST_VAR];
}

/// `undo` of an adaptive stage after the chain's last `finish`: when a later stage held
/// the step, the norm this stage recorded (its `finish` marked the block) is taken back
/// (its history slot, count, mean and variance as they were), so a held step leaves the
/// adaptive state as it found it.
fn undo(block: &mut [u32], chain_status: u32) {
    if chain_status & STATUS_HELD == 0 || block[ST_RECORDED] == 0 {
        return;
    }
    let seen = block[ST_SEEN].wrapping_sub(1);
    block[ST_SEEN] = seen;
    let cap = block.len() - HEADER_WORDS;
    if cap > 0 {
        block[HEADER_WORDS + seen as usize % cap] = block[ST_SAVED_SLOT];
    }
    block[ST_MEAN] = block[ST_SAVED_MEAN];
    block[ST_VAR] = block[ST_SAVED_VAR];
}

/// `coefs` of one norm stage: multiplies its factor into every unit's coefficient
/// (`coefs` holds the earlier stages' product; `first` starts it), and after the `last`
/// stage folds in `inv_scale`, the unscaling of a loss-scaled chain. Returns the units
/// whose chain coefficient is now below 1 (NaN counts).
#[allow(clippy::too_many_arguments)]
fn coefs(
    stage: &StagePlan,
    groups: &[NormAcc],
    params: Option<&[NormAcc]>,
    finish: &Finish,
    step: &CpuStep,
    coefs: &mut [f32],
    (first, last): (bool, bool),
    inv_scale: f32,
) -> u32 {
    let global = stage.is_global();
    let adaptive = stage.adaptive != abi::ADAPTIVE_NONE;
    let held = finish.status & STATUS_HELD != 0;
    let mut clipped = 0;
    for (u, c) in coefs.iter_mut().enumerate() {
        let g = stage.group_of[u];
        // The norms of the gradients as they arrived, divided by the loss scale.
        let group = || groups[g as usize].scaled(inv_scale);
        let factor = if held || g == NO_GROUP {
            1.0
        } else if let (Formula::Agc, Some(w)) = (stage.formula, params) {
            let p = &stage.params;
            // The unit's norm as the earlier stages left it: its group of one.
            agc_coef(
                &group(),
                &w[u],
                p.lambda * step.multiplier,
                p.eps,
                step.policy,
            )
        } else if adaptive || global {
            finish.coef
        } else {
            norm_coef(
                &group(),
                step.norm,
                stage.thresholds[g as usize] * step.multiplier,
                stage.formula,
                step.policy,
            )
        };
        let coef = if first { factor } else { *c * factor };
        clipped += (coef.is_nan() || coef < 1.0) as u32;
        *c = if last && !held {
            coef * inv_scale
        } else {
            coef
        };
    }
    clipped
}

/// Rewrites the elements of `seg` in `g` with `f(x, index in tensor)`.
fn rewrite_unit(g: &mut GradMut<'_>, seg: &PlanSegment, f: impl Fn(f32, u32) -> f32 + Sync) {
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
    // An element whose value does not change keeps its exact bits.
    match g {
        GradMut::F32(x) => run(x, seg, &f),
        GradMut::F16(x) => run(x, seg, |v: f16, i| {
            let (a, b) = (v.to_f32(), f(v.to_f32(), i));
            if a.to_bits() == b.to_bits() {
                v
            } else {
                f16::from_f32(b)
            }
        }),
        GradMut::BF16(x) => run(x, seg, |v, i| {
            let (a, b) = (bf16_to_f32(v), f(bf16_to_f32(v), i));
            if a.to_bits() == b.to_bits() {
                v
            } else {
                f32_to_bf16(b)
            }
        }),
    }
}

/// `rewrite`: NaNs to zero, times each unit's coefficient, plus noise, clamped, over every
/// unit that needs it; nothing when the step is held.
fn rewrite(
    grads: &mut [GradMut<'_>],
    program: &Program,
    coefs: &[f32],
    finish: &Finish,
    step: &CpuStep,
) {
    if finish.status & STATUS_HELD != 0 {
        return;
    }
    let zero_nans = step.policy == NonFinitePolicy::ZeroNans;
    let noise = step.noise.filter(|n| n.sigma > 0.0);
    let global = program.stages.len() == 1 && program.stages[0].is_uniform();
    let whole = program.units.len() == grads.len()
        && (program.units.iter().enumerate()).all(|(t, s)| s.tensor == t && s.first == 0);
    if noise.is_none() && global && whole {
        // One coefficient over whole tensors (the loss scale's unscaling in it, as `coefs`
        // folds it): the tuned elementwise loops.
        let coef = coefs.first().copied().unwrap_or(1.0);
        if finish.status & STATUS_SCALED != 0 && (coef != 1.0 || zero_nans) {
            apply::scale(grads, coef, zero_nans);
        }
        if let Some(clip) = &step.clamp {
            apply::clamp(grads, clip);
        }
        return;
    }
    // The pass runs when every unit needs it (noise, clamp, NaNs found) or some
    // coefficient is not 1; then each unit with work is rewritten (the GPU's workgroups
    // decide per chunk, to the same values).
    let every_unit =
        noise.is_some() || step.clamp.is_some() || finish.status & STATUS_NANS_ZEROED != 0;
    if !every_unit && coefs.iter().all(|c| c.to_bits() == 1.0f32.to_bits()) {
        return;
    }
    for (s, unit) in program.units.iter().enumerate() {
        let c = coefs[s];
        if c == 1.0 && noise.is_none() && !zero_nans && step.clamp.is_none() {
            continue;
        }
        let tensor = unit.tensor as u32;
        let base = program.base(unit.tensor);
        rewrite_unit(&mut grads[unit.tensor], unit, |x, i| {
            transform(step, c, tensor, base + i as u64, x)
        });
    }
}

/// The elementwise work of a step on one value `x` of tensor `tensor` at logical index
/// `index`, whose unit has coefficient `coef` (`transform.wgsl`): NaN to zero (ZeroNans),
/// times the coefficient, plus noise, clamped.
pub(crate) fn transform(step: &CpuStep, coef: f32, tensor: u32, index: u64, x: f32) -> f32 {
    let zero_nans = step.policy == NonFinitePolicy::ZeroNans;
    let mut y = if zero_nans && x.is_nan() { 0.0 } else { x };
    if coef.to_bits() != 1.0f32.to_bits() {
        y *= coef;
    }
    if let Some(n) = step.noise.filter(|n| n.sigma > 0.0) {
        y += n.sigma * gaussian_noise(n.seed, step.step, tensor, index as u32);
    }
    match step.clamp {
        Some(v) if y < v.lo => v.lo,
        Some(v) if y > v.hi => v.hi,
        _ => y,
    }
}

/// One norm stage's output of a step.
#[derive(Debug, Clone)]
pub(crate) struct StageRun {
    pub groups: Vec<NormAcc>,
    pub finish: Finish,
    /// Units whose coefficient was below 1 after this stage.
    pub clipped: u32,
    /// Its groups were combined this step (else they are the unit norms, or unused).
    grouped: bool,
}

/// Every stage's output of one step, for reports and tests. A policy keeps one between
/// steps: a warm step refills its buffers instead of allocating them.
#[derive(Debug, Clone, Default)]
pub(crate) struct Outcome {
    /// The norm of every unit (`reduce`).
    pub units: Vec<NormAcc>,
    /// The parameters' unit norms (L2), for AGC.
    pub w_units: Option<Vec<NormAcc>>,
    pub stages: Vec<StageRun>,
    /// The coefficient of every unit (the product over the stages, times the unscaling
    /// of a loss-scaled chain).
    pub coefs: Vec<f32>,
    /// The loss scale this step divided by (1 without loss scaling) and the next one.
    pub loss_scale: (f32, f32),
}

/// The gradients of a step: read, and written when its recording ends in a rewrite.
pub(crate) enum Grads<'a, 'g> {
    Read(&'a [GradRef<'g>]),
    Write(&'a mut [GradMut<'g>]),
}

impl Grads<'_, '_> {
    fn len(&self) -> usize {
        match self {
            Grads::Read(g) => g.len(),
            Grads::Write(g) => g.len(),
        }
    }

    fn get(&self, t: usize) -> GradRef<'_> {
        match self {
            Grads::Read(g) => g[t],
            Grads::Write(g) => g[t].as_ref(),
        }
    }
}

/// Executes a step's `recording` ([`crate::recording::record`], the list the GPU replays)
/// over `grads` (and, for AGC, `params`), stage for stage, into `out`: `reduce`, per norm
/// stage `combine` -> `finish` (after the last, the chain's verdict and `undo`) ->
/// `coefs`, then `rewrite`. A stage whose groups the recording does not combine (a first
/// stage whose groups are the units, or a total read straight from the reduction) takes
/// them from the unit norms; under a given total (`step.given`) it has none.
pub(crate) fn execute(
    recording: &[Dispatch],
    mut grads: Grads<'_, '_>,
    params: Option<&[GradRef<'_>]>,
    program: &Program,
    step: &CpuStep,
    state: &mut PolicyState,
    out: &mut Outcome,
) {
    // The stages' outputs are reset by the first stage dispatch of the step.
    let mut begun = false;
    for &d in recording {
        match d {
            Dispatch::SpanReduce | Dispatch::Reduce { params: false, .. } => {
                reduce(
                    grads.len(),
                    |t| grads.get(t),
                    &program.units,
                    step.norm,
                    &mut out.units,
                );
                out.w_units = None;
            }
            Dispatch::Reduce { params: true, .. } => {
                if let Some(p) = params {
                    let w = out.w_units.get_or_insert_with(Vec::new);
                    reduce(p.len(), |t| p[t], &program.units, Norm::L2, w);
                }
            }
            Dispatch::Groups(k) => {
                if !std::mem::replace(&mut begun, true) {
                    begin(program, step, state, out);
                }
                group_stage(k, program, step, out);
            }
            Dispatch::Finish {
                stage,
                stages,
                from,
                coefs,
            } => {
                if !std::mem::replace(&mut begun, true) {
                    begin(program, step, state, out);
                }
                for k in stage..stage + stages {
                    // The stages after the first fold their one group from the units.
                    if k > stage || from == Source::UnitNorms {
                        group_stage(k, program, step, out);
                    }
                    finish_stage(k, program, step, state, out);
                    // The chain's verdict is final after its last stage; a held step
                    // leaves the adaptive state as it found it.
                    if k + 1 == program.stages.len() {
                        let merged = close(program, step, state, out);
                        let adaptive = |s: &&StagePlan| s.adaptive != abi::ADAPTIVE_NONE;
                        for earlier in program.stages[..k].iter().filter(adaptive) {
                            let words = HEADER_WORDS + earlier.history;
                            undo(&mut state.words[earlier.state_base..][..words], merged);
                        }
                    }
                    if coefs {
                        stage_coefs(k, program, step, out);
                    }
                }
            }
            Dispatch::Coefs(k) => stage_coefs(k, program, step, out),
            Dispatch::Rewrite => {
                let Grads::Write(g) = &mut grads else {
                    unreachable!("a recording that rewrites is executed on writable gradients")
                };
                match (begun, &step.clamp) {
                    (true, _) => rewrite(g, program, &out.coefs, &out.stages[0].finish, step),
                    // A clamp alone: no stage ran, a pass over every element (after the
                    // NaNs are zeroed, as the GPU's transform does).
                    (false, Some(clamp)) => {
                        if step.policy == NonFinitePolicy::ZeroNans {
                            apply::scale(g, 1.0, true);
                        }
                        apply::clamp(g, clamp)
                    }
                    (false, None) => {}
                }
            }
        }
    }
    if begun {
        // As a state read from the device has them (`PolicyState::from_device`).
        for stage in &program.stages {
            stage.clear_step_words(&mut state.words);
        }
    }
}

/// Stage `k`'s group norms from the unit norms, each times its coefficient so far.
fn group_stage(k: usize, program: &Program, step: &CpuStep, out: &mut Outcome) {
    let Outcome {
        units,
        stages,
        coefs,
        ..
    } = out;
    let earlier = (k > 0).then_some(&coefs[..]);
    let run = &mut stages[k];
    combine(
        units,
        earlier,
        &program.stages[k],
        step.norm,
        &mut run.groups,
    );
    run.grouped = true;
}

/// Stage `k`'s factor multiplied into every unit's coefficient.
fn stage_coefs(k: usize, program: &Program, step: &CpuStep, out: &mut Outcome) {
    let Outcome {
        w_units,
        stages,
        coefs: unit_coefs,
        loss_scale,
        ..
    } = out;
    let held_before = (stages[..k].iter()).any(|s| s.finish.status & STATUS_HELD != 0);
    // As the GPU's `coefs` reads its stage's report: held when an earlier stage held the
    // step, too.
    let seen = Finish {
        status: stages[k].finish.status | if held_before { STATUS_HELD } else { 0 },
        ..stages[k].finish
    };
    let place = (k == 0, k + 1 == program.stages.len());
    stages[k].clipped = coefs(
        &program.stages[k],
        &stages[k].groups,
        w_units.as_deref(),
        &seen,
        step,
        unit_coefs,
        place,
        1.0 / loss_scale.0,
    );
}

/// Starts the stages of a step: every unit's coefficient 1, one output per stage, the loss
/// scale read from the state.
fn begin(program: &Program, step: &CpuStep, state: &PolicyState, out: &mut Outcome) {
    let scale = match step.loss_scale {
        Some(_) => f32::from_bits(state.words[ST_LOSS_SCALE]),
        None => 1.0,
    };
    out.loss_scale = (scale, scale);
    out.coefs.clear();
    out.coefs.resize(program.units.len(), 1.0);
    out.stages.truncate(program.stages.len());
    while out.stages.len() < program.stages.len() {
        out.stages.push(StageRun {
            groups: Vec::new(),
            finish: Finish::NONE,
            clipped: 0,
            grouped: false,
        });
    }
    for s in &mut out.stages {
        (s.finish, s.clipped, s.grouped) = (Finish::NONE, 0, false);
    }
}

/// `finish` of stage `k` of a step, from its groups (combined, the unit norms, or none
/// under a given total).
fn finish_stage(
    k: usize,
    program: &Program,
    step: &CpuStep,
    state: &mut PolicyState,
    out: &mut Outcome,
) {
    let stage = &program.stages[k];
    let Outcome {
        units,
        w_units,
        stages,
        loss_scale,
        ..
    } = out;
    let held_before = (stages[..k].iter()).any(|s| s.finish.status & STATUS_HELD != 0);
    let run = &mut stages[k];
    if !run.grouped {
        match step.given {
            Some(_) => run.groups.clear(),
            None => combine(units, None, stage, step.norm, &mut run.groups),
        }
    }
    // AGC reads the parameters: their NaN or infinity counts as the step's.
    let param_flags = match (&*w_units, stage.formula) {
        (Some(w), Formula::Agc) => (stage.group_of.iter().zip(w))
            .filter(|(&g, _)| g != NO_GROUP)
            .fold(0, |f, (_, a)| f | a.flags),
        _ => 0,
    };
    // The first stage's verdict covers the units it leaves alone (with no unit norms under
    // a given total, whose chain covers every unit).
    let outside = match (k, step.given) {
        (0, None) => (stage.group_of.iter().zip(units.iter()))
            .filter(|(&g, _)| g == NO_GROUP)
            .fold(0, |f, (_, a)| f | a.flags),
        _ => 0,
    };
    let inv_scale = 1.0 / loss_scale.0;
    run.finish = finish(
        &run.groups,
        (param_flags, outside, inv_scale),
        stage,
        step,
        held_before,
        state,
    );
}

/// The chain's verdict once every stage has finished, in the first stage: any stage that
/// finds non-finite values holds or skips the step; one skip counter, in the state's
/// first block; then the loss scale moves. Returns the merged status.
fn close(program: &Program, step: &CpuStep, state: &mut PolicyState, out: &mut Outcome) -> u32 {
    let verdict = STATUS_HELD | STATUS_SKIPPED | STATUS_NONFINITE | STATUS_NANS_ZEROED;
    let stages = &mut out.stages[..program.stages.len()];
    let merged = (stages.iter()).fold(0, |m, s| m | (s.finish.status & verdict));
    let skipped = merged & STATUS_SKIPPED != 0;
    state.words[ST_SKIPS] = if skipped {
        state.words[ST_SKIPS].wrapping_add(1)
    } else {
        0
    };
    for (k, s) in stages.iter_mut().enumerate() {
        s.finish.skips = state.words[ST_SKIPS];
        if k == 0 {
            s.finish.status |= merged;
        } else {
            s.finish.status |= merged & STATUS_HELD;
        }
    }
    if let Some(rule) = &step.loss_scale {
        let now = LossScaleState {
            scale: out.loss_scale.0,
            finite_steps: state.words[ST_GOOD_STEPS],
        };
        let next = rule.next(now, skipped);
        state.words[ST_LOSS_SCALE] = next.scale.to_bits();
        state.words[ST_GOOD_STEPS] = next.finite_steps;
        out.loss_scale.1 = next.scale;
    }
    merged
}
