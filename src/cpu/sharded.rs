//! A clipping policy over one rank's shard of the gradients, on host slices: the CPU
//! engine's stages with the unit norms merged over the ranks between `reduce` and the
//! first `combine` (`src/shard`). The GPU twin is `src/gpu/sharded.rs`.

use super::engine::Grads;
use super::policy::CpuPolicy;
use crate::chain::{ClipPolicy, PolicyState, TensorInfo};
use crate::dtype::{GradMut, GradRef};
use crate::error::ClipError;
use crate::norm::{Norm, NormAcc};
use crate::recording::Mode;
use crate::report::ClipReport;
use crate::shard::{localize, table, Collective, Shard};

/// Runs a [`ClipPolicy`] on this rank's shard of the gradients, so that every rank's
/// step equals the step one process would take on all of them.
///
/// The chain is resolved over the *logical* tensors (`infos`, the same on every rank);
/// [`ShardedCpuPolicy::step`] takes this rank's part of each tensor, the range
/// [`Shard::range`] says (an empty slice for a tensor it holds nothing of). A step makes
/// one exchange through the [`Collective`]: the partial norm of every unit (MAX, SUM, OR),
/// after which every rank computes the same thresholds, coefficients and adaptive state.
/// Build and step it on every rank together: both talk to the other ranks.
pub struct ShardedCpuPolicy<C: Collective> {
    inner: CpuPolicy,
    shard: Shard,
    comm: C,
}

impl<C: Collective> std::fmt::Debug for ShardedCpuPolicy<C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ShardedCpuPolicy")
            .field("rank", &self.comm.rank())
            .field("ranks", &self.comm.size())
            .field("policy", &self.inner)
            .finish()
    }
}

impl<C: Collective> ShardedCpuPolicy<C> {
    /// Plans `policy` over the logical tensors `infos`, of which this rank holds `shard`.
    /// Checks with every rank (two small collectives) that the shards tile every tensor
    /// and that all ranks planned the same tensors and chain.
    pub fn new(
        policy: ClipPolicy,
        infos: &[TensorInfo],
        shard: Shard,
        comm: C,
    ) -> Result<ShardedCpuPolicy<C>, ClipError> {
        let planned =
            Shard::new(infos, shard.ranges().to_vec()).and_then(|_| CpuPolicy::new(policy, infos));
        let checked = planned.as_ref().map(|p| (p.policy(), p.program(), &shard));
        let checked = checked.map_err(Clone::clone);
        Shard::verify(infos, checked, &comm)?;
        let mut inner = planned?;
        let local = localize(inner.program(), &shard);
        inner.set_program(local);
        Ok(ShardedCpuPolicy { inner, shard, comm })
    }

    /// The chain it runs.
    pub fn policy(&self) -> &ClipPolicy {
        self.inner.policy()
    }

    /// This rank's shard.
    pub fn shard(&self) -> &Shard {
        &self.shard
    }

    /// The collective it exchanges through.
    pub fn collective(&self) -> &C {
        &self.comm
    }

    /// The state (the same on every rank).
    pub fn state(&self) -> &PolicyState {
        self.inner.state()
    }

    /// Restores a saved state; restore the same one on every rank.
    pub fn set_state(&mut self, state: PolicyState) -> Result<(), ClipError> {
        self.inner.set_state(state)
    }

    /// Clips this rank's gradients in place: `grads[t]` holds [`Shard::range`]`(t)` of
    /// tensor `t`; AGC also takes the parameters' same ranges. The report is the whole
    /// step's (norms over every rank) and the same on every rank. Bad input on any rank
    /// is an error on every rank, and no rank changes its gradients or state.
    pub fn step(
        &mut self,
        grads: &mut [GradMut<'_>],
        params: Option<&[GradRef<'_>]>,
    ) -> Result<ClipReport, ClipError> {
        let shard = &self.shard;
        let lens: Vec<u64> = grads.iter().map(|g| g.as_ref().len() as u64).collect();
        let checked = (self.inner).check_with(&lens, params, |lens| {
            shard.check_local(lens, |t| format!("#{t}"))
        });
        let norm = self.inner.policy().norm;
        let step_number = self.inner.state().step;
        let scale = self.inner.state().loss_scale().map_or(0.0, |l| l.scale);
        let needs_params = self.inner.program().needs_params();
        let params = params.filter(|_| needs_params);
        if let Ok(step) = &checked {
            // The first half: this rank's unit norms.
            (self.inner).execute(Mode::UnitsOnly, Grads::Write(grads), params, step);
        }
        let (program, _, out) = self.inner.parts_mut();
        let n = program.units.len();
        if checked.is_err() {
            // This rank still takes part in the exchange, with empty norms.
            out.units.clear();
            out.units.resize(n, NormAcc::IDENTITY);
            out.w_units = None;
        }
        if needs_params && out.w_units.is_none() {
            out.w_units = Some(vec![NormAcc::IDENTITY; n]);
        }
        let mut parts = vec![(&mut out.units[..], norm)];
        if let Some(w) = out.w_units.as_mut() {
            parts.push((&mut w[..], Norm::L2));
        }
        let local = checked.as_ref().map(|_| ()).map_err(Clone::clone);
        let factor = checked.as_ref().map_or(0.0, |s| s.multiplier);
        let key = (step_number, factor, scale);
        table::all_reduce(&self.comm, &mut parts, key, local)?;
        let step = checked?;
        // The second half, from the merged unit norms.
        (self.inner).execute(Mode::FromUnits, Grads::Write(grads), None, &step);
        self.inner.commit(step)
    }
}
