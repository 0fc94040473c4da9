//! The CPU path: multi-threaded (rayon), exact enough to be the test oracle of the GPU
//! path, and the fallback when no adapter exists. `engine.rs` twins the GPU engine stage
//! for stage. The policies, the accumulator, the optimizer, the sharded policy, the
//! per-example clipper, [`clip_by_global_norm`] and [`clip_with_norm`] run it;
//! [`clip_by_value`] clamps directly, and [`partial_norm`] and [`tensor_norms`] call the f64
//! reduction (`norm_reduce.rs`) directly.

/// Defines `fn $name` three times: as built, compiled for AVX2 and FMA, and for AVX-512
/// (F and BW); it runs the widest the CPU has (checked at run time). The 16-bit loops
/// (widening, f64 accumulation, rounding back) are bound by arithmetic at the baseline
/// x86-64 vector width, not by memory. Helpers the body calls must be `#[inline(always)]`
/// to be compiled with the wider vectors too.
macro_rules! wide_fn {
    ($(#[$meta:meta])* $vis:vis fn $name:ident($($arg:ident: $ty:ty),* $(,)?) $(-> $ret:ty)? $body:block) => {
        $(#[$meta])*
        $vis fn $name($($arg: $ty),*) $(-> $ret)? {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx512bw,avx2,fma")]
                fn avx512($($arg: $ty),*) $(-> $ret)? $body
                #[target_feature(enable = "avx2,fma")]
                fn avx2($($arg: $ty),*) $(-> $ret)? $body
                if std::is_x86_feature_detected!("avx512f") && std::is_x86_feature_detected!("avx512bw") {
                    // SAFETY: the CPU has AVX-512 F and BW (and so AVX2 and FMA), checked just above.
                    return unsafe { avx512($($arg),*) };
                }
                if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
                    // SAFETY: the CPU has AVX2 and FMA, checked just above.
                    return unsafe { avx2($($arg),*) };
                }
            }
            $body
        }
    };
}

// The runner types live at the crate root (one home each); this module's public items
// are the one-shot functions.
pub(crate) mod accumulate;
mod apply;
pub(crate) mod engine;
mod norm_reduce;
pub(crate) mod optimizer;
pub(crate) mod per_example;
pub(crate) mod philox;
pub(crate) mod policy;
mod prefetch;
pub(crate) mod sharded;

use std::cell::Cell;

use crate::chain::Program;
use crate::dtype::{GradMut, GradRef};
use crate::error::ClipError;
use crate::non_finite::NonFinitePolicy;
use crate::norm::{Norm, NormAcc, PartialNorm};
use crate::ops::{validate_max_norm, GlobalNormClip, ValueClip};
use crate::report::{ClipReport, GlobalOutcome};
use engine::CpuStep;

/// The total norm of a batch in mergeable form (PyTorch `get_total_norm`, split API).
/// The thread keeps the per-tensor buffer of its last call for the next.
pub fn partial_norm(grads: &[GradRef<'_>], norm: Norm) -> Result<PartialNorm, ClipError> {
    norm.validate()?;
    // The per-tensor accumulators, in this thread's buffer from the last call.
    let mut accs = TENSOR_ACCS.take();
    norm_reduce::tensor_accs_into(grads.len(), |t| grads[t], norm, &mut accs);
    let total = norm_reduce::total_acc(&accs, norm);
    TENSOR_ACCS.set(accs);
    Ok(PartialNorm::from_acc(norm, total))
}

/// The norm of every tensor, in batch order.
pub fn tensor_norms(grads: &[GradRef<'_>], norm: Norm) -> Result<Vec<f64>, ClipError> {
    norm.validate()?;
    Ok(norm_reduce::tensor_accs(grads, norm)
        .iter()
        .map(|a| a.total(norm))
        .collect())
}

thread_local! {
    /// The program and buffers of this thread's last one-shot global step, so that a loop
    /// calling the one-shot functions on the same shapes builds them once. Taken out while
    /// a step runs: a nested call (a rayon task run while this one waits) finds none and
    /// builds its own.
    static LAST_GLOBAL: Cell<Option<(Program, engine::Outcome)>> = const { Cell::new(None) };
    /// The buffer of [`partial_norm`]'s per-tensor accumulators, kept the same way.
    static TENSOR_ACCS: Cell<Vec<NormAcc>> = const { Cell::new(Vec::new()) };
}

/// One global-norm step of the CPU engine over whole tensors: `given` replaces the
/// reduced norm (split API). Errors come before anything is written.
fn global_step(
    grads: &mut [GradMut<'_>],
    norm: Norm,
    max_norm: f32,
    policy: NonFinitePolicy,
    given: Option<&PartialNorm>,
    tensor_norms: bool,
) -> Result<ClipReport, ClipError> {
    let same_shapes = |p: &Program| {
        p.units.len() == grads.len()
            && (p.units.iter().zip(grads.iter())).all(|(u, g)| u.len == g.as_ref().len() as u64)
    };
    let (program, mut out) = match LAST_GLOBAL.take() {
        Some((program, out)) if same_shapes(&program) => (program, out),
        _ => {
            let lens: Vec<u64> = grads.iter().map(|g| g.as_ref().len() as u64).collect();
            (Program::global(&lens), engine::Outcome::default())
        }
    };
    let step = CpuStep {
        norm,
        policy,
        multiplier: max_norm,
        given: given.map(|g| g.acc()),
        noise: None,
        step: 0,
        clamp: None,
    };
    // Under NonFinitePolicy::Error a non-finite step is held, so nothing is written before
    // the report turns into the error.
    let mut state = program.fresh_state();
    engine::run(
        grads,
        None,
        &program,
        &step,
        &mut state,
        given.is_none(),
        &mut out,
    );
    let f = out.stages[0].finish;
    let report = GlobalOutcome {
        step: 0,
        norm,
        acc: f.total,
        coef: f.coef,
        status: f.status,
        policy,
        tensors: grads.len() as u32,
        tensor_norms: tensor_norms.then(|| out.units.iter().map(|a| a.total(norm)).collect()),
        max_norm: Some(max_norm),
    }
    .report();
    LAST_GLOBAL.set(Some((program, out)));
    report
}

/// Clips a batch by its global norm, in place (PyTorch `clip_grad_norm_`).
/// Returns the report, or an error without touching the data.
///
/// The thread keeps the buffers of its last call (a few dozen bytes per tensor, shared
/// with [`clip_with_norm`]): a loop that clips the same shapes every step allocates them
/// once.
pub fn clip_by_global_norm(
    grads: &mut [GradMut<'_>],
    clip: &GlobalNormClip,
) -> Result<ClipReport, ClipError> {
    clip.validate()?;
    global_step(
        grads,
        clip.norm,
        clip.max_norm,
        clip.non_finite,
        None,
        clip.tensor_norms,
    )
}

/// Clips a batch with a norm computed elsewhere (PyTorch `clip_grads_with_norm_`): the
/// second half of the split API, after the shards' partial norms were combined.
pub fn clip_with_norm(
    grads: &mut [GradMut<'_>],
    max_norm: f32,
    total: &PartialNorm,
    policy: NonFinitePolicy,
) -> Result<ClipReport, ClipError> {
    validate_max_norm(max_norm)?;
    global_step(grads, total.norm(), max_norm, policy, Some(total), false)
}

/// Clamps every element to the bounds, in place (PyTorch `clip_grad_value_`).
pub fn clip_by_value(grads: &mut [GradMut<'_>], clip: &ValueClip) -> Result<(), ClipError> {
    clip.validate()?;
    // The rewrite stage alone, with one coefficient of 1 over whole tensors.
    apply::clamp(grads, clip);
    Ok(())
}
