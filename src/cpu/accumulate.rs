//! CPU twin of `shaders/accumulate.wgsl`: gradient accumulation over micro-batches with
//! the 1/k scaling folded in, and [`CpuAccumulator`], which clips at the boundary.

use half::f16;
use rayon::prelude::*;

use super::apply::{bf16_to_f32, f32_to_bf16};
use super::norm_reduce::BLOCK;
use super::policy::CpuPolicy;
use crate::chain::TensorInfo;
use crate::dtype::{GradMut, GradRef};
use crate::error::ClipError;
use crate::ops::check_micro_steps;
use crate::report::ClipReport;

/// `sums = (first ? 0 : sums) + scale * micro`, element by element in f32, rounded once.
fn add_into(sums: &mut GradMut<'_>, micro: &GradRef<'_>, scale: f32, first: bool) {
    let add = |s: f32, x: f32| if first { scale * x } else { s + scale * x };
    fn zip<S: Send, M: Sync>(s: &mut [S], m: &[M], f: impl Fn(&mut S, &M) + Sync) {
        s.par_chunks_mut(BLOCK)
            .zip(m.par_chunks(BLOCK))
            .for_each(|(s, m)| s.iter_mut().zip(m).for_each(|(s, m)| f(s, m)));
    }
    match (sums, micro) {
        (GradMut::F32(s), GradRef::F32(m)) => zip(s, m, |s, m| *s = add(*s, *m)),
        (GradMut::F16(s), GradRef::F16(m)) => zip(s, m, |s, m| {
            *s = f16::from_f32(add(s.to_f32(), m.to_f32()));
        }),
        (GradMut::BF16(s), GradRef::BF16(m)) => zip(s, m, |s, m| {
            *s = f32_to_bf16(add(bf16_to_f32(*s), bf16_to_f32(*m)));
        }),
        _ => unreachable!("dtypes are checked before adding"),
    }
}

/// Checks that `micro[i]` has the dtype and length of `sums[i]`.
pub(crate) fn check_pairs(sums: &[GradMut<'_>], micro: &[GradRef<'_>]) -> Result<(), ClipError> {
    if sums.len() != micro.len() {
        return Err(ClipError::ShapeMismatch {
            tensor: "batch".into(),
            expected: format!("{} tensors", sums.len()),
            got: format!("{} tensors", micro.len()),
        });
    }
    for (i, (s, m)) in sums.iter().zip(micro).enumerate() {
        let s = s.as_ref();
        if s.dtype() != m.dtype() || s.len() != m.len() {
            return Err(ClipError::ShapeMismatch {
                tensor: TensorInfo::name_of(None, i),
                expected: format!("{} {:?} elements", s.len(), s.dtype()),
                got: format!("{} {:?} elements", m.len(), m.dtype()),
            });
        }
    }
    Ok(())
}

/// Gradient accumulation on host slices: adds each micro-batch's gradients, scaled by
/// `1 / micro_steps`, into the accumulation slices, and runs a [`CpuPolicy`] on them once
/// every `micro_steps` micro-batches. CPU twin of the engine of [`crate::GpuClipper<crate::Accumulate>`].
#[derive(Debug, Clone)]
pub struct CpuAccumulator {
    policy: CpuPolicy,
    micro_steps: u32,
    added: u32,
}

impl CpuAccumulator {
    /// Accumulates over `micro_steps` micro-batches, then clips with `policy`.
    pub fn new(policy: CpuPolicy, micro_steps: u32) -> Result<CpuAccumulator, ClipError> {
        check_micro_steps(micro_steps)?;
        Ok(CpuAccumulator {
            policy,
            micro_steps,
            added: 0,
        })
    }

    /// Adds one micro-batch's gradients into `sums` (same dtypes and lengths; the first
    /// micro-batch of an accumulation overwrites them). At the accumulation boundary it
    /// also clips `sums` in place and returns the policy's report; otherwise `None`.
    /// AGC takes the parameters. Bad input (lengths, types, a missing parameter) is an
    /// error that leaves `sums` and the count untouched. A non-finite norm under
    /// [`crate::NonFinitePolicy::Error`] is the step's verdict, as on the GPU (which finds
    /// it on the device): the micro-batch was added, the sums stay unclipped and the next
    /// micro-batch starts a new accumulation.
    pub fn step(
        &mut self,
        sums: &mut [GradMut<'_>],
        micro: &[GradRef<'_>],
        params: Option<&[GradRef<'_>]>,
    ) -> Result<Option<ClipReport>, ClipError> {
        check_pairs(sums, micro)?;
        // Every micro-batch has the declared lengths, as on the GPU (not only the last).
        (self.policy).check_lens(micro.iter().map(|g| g.len() as u64))?;
        let scale = 1.0 / self.micro_steps as f32;
        let first = self.added == 0;
        if self.added + 1 == self.micro_steps {
            // Check the policy's inputs before the sums change, so a bad call keeps them.
            let lens = sums.iter().map(|g| g.as_ref().len() as u64);
            self.policy.check(lens, params)?;
        }
        sums.par_iter_mut()
            .zip(micro)
            .for_each(|(s, m)| add_into(s, m, scale, first));
        self.added += 1;
        if self.added < self.micro_steps {
            return Ok(None);
        }
        self.added = 0;
        self.policy.step(sums, params).map(Some)
    }

    /// Micro-batches added since the last boundary.
    pub fn pending(&self) -> u32 {
        self.added
    }

    /// Micro-batches per accumulation.
    pub fn micro_steps(&self) -> u32 {
        self.micro_steps
    }

    /// The clipping policy (its state, for saving).
    pub fn policy(&self) -> &CpuPolicy {
        &self.policy
    }

    /// The clipping policy, to restore a saved state.
    pub(crate) fn policy_mut(&mut self) -> &mut CpuPolicy {
        &mut self.policy
    }

    /// Drops a partial accumulation: the next micro-batch starts a new one.
    pub fn reset(&mut self) {
        self.added = 0;
    }
}
