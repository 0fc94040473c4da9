//! The CPU path: multi-threaded (rayon), exact enough to be the test oracle of the GPU
//! path, and the fallback when no adapter exists. Each file twins a shader of the same
//! name in `shaders/`.

mod accumulate;
mod apply;
mod norm_finish;
mod norm_reduce;
mod per_example;
pub(crate) mod philox;
mod policy;

pub(crate) use accumulate::check_micro_steps;
pub use accumulate::CpuAccumulator;
pub use per_example::clip_per_example;
pub(crate) use policy::live_total;
pub use policy::CpuPolicy;

use crate::dtype::{GradMut, GradRef};
use crate::error::ClipError;
use crate::norm::{Norm, PartialNorm};
use crate::ops::{validate_max_norm, GlobalNormClip, ValueClip};
use crate::policy::NonFinitePolicy;
use crate::report::{ClipReport, STATUS_SCALED};

fn as_refs<'a>(grads: &'a [GradMut<'_>]) -> Vec<GradRef<'a>> {
    grads.iter().map(|g| g.as_ref()).collect()
}

/// The total norm of a batch in mergeable form (PyTorch `get_total_norm`, split API).
pub fn partial_norm(grads: &[GradRef<'_>], norm: Norm) -> Result<PartialNorm, ClipError> {
    norm.validate()?;
    let accs = norm_reduce::tensor_accs(grads, norm);
    Ok(PartialNorm::from_acc(
        norm,
        norm_reduce::total_acc(&accs, norm),
    ))
}

/// The norm of every tensor, in batch order.
pub fn tensor_norms(grads: &[GradRef<'_>], norm: Norm) -> Result<Vec<f64>, ClipError> {
    norm.validate()?;
    Ok(norm_reduce::tensor_accs(grads, norm)
        .iter()
        .map(|a| a.total(norm))
        .collect())
}

/// Clips a batch by its global norm, in place (PyTorch `clip_grad_norm_`).
/// Returns the report, or an error without touching the data.
pub fn clip_by_global_norm(
    grads: &mut [GradMut<'_>],
    clip: &GlobalNormClip,
) -> Result<ClipReport, ClipError> {
    clip.validate()?;
    let accs = norm_reduce::tensor_accs(&as_refs(grads), clip.norm);
    let total = norm_reduce::total_acc(&accs, clip.norm);
    let tensor_norms = clip
        .tensor_norms
        .then(|| accs.iter().map(|a| a.total(clip.norm)).collect());
    apply_total(
        grads,
        PartialNorm::from_acc(clip.norm, total),
        clip.max_norm,
        clip.non_finite,
        tensor_norms,
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
    apply_total(grads, *total, max_norm, policy, None)
}

fn apply_total(
    grads: &mut [GradMut<'_>],
    total: PartialNorm,
    max_norm: f32,
    policy: NonFinitePolicy,
    tensor_norms: Option<Vec<f64>>,
) -> Result<ClipReport, ClipError> {
    let (coef, status) = norm_finish::finish(&total.acc(), total.norm(), max_norm, policy);
    let report = ClipReport::new(
        total.norm(),
        total.acc(),
        coef,
        status,
        policy,
        tensor_norms,
    )?;
    if status & STATUS_SCALED != 0 {
        apply::scale(grads, coef, policy == NonFinitePolicy::ZeroNans);
    }
    Ok(report)
}

/// Clamps every element to the bounds, in place (PyTorch `clip_grad_value_`).
pub fn clip_by_value(grads: &mut [GradMut<'_>], clip: &ValueClip) -> Result<(), ClipError> {
    clip.validate()?;
    apply::clamp(grads, clip);
    Ok(())
}
