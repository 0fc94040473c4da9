//! A clipping policy over one rank's shard of the gradients, on the GPU: the engine's
//! `reduce` in one submission, the unit norms read back and merged over the ranks
//! (`src/shard`), then the stages and the rewrite from the merged norms in a second one.
//! The CPU twin is `src/cpu/sharded.rs`.

use super::context::GpuContext;
use super::engine::Mode;
use super::policy::GpuPolicy;
use super::tensor::GpuTensor;
use crate::chain::{ClipPolicy, PolicyState, Program, TensorInfo};
use crate::error::ClipError;
use crate::norm::{Norm, NormAcc};
use crate::report::ClipReport;
use crate::shard::{localize, table, Collective, Shard};

/// Runs a [`ClipPolicy`] over this rank's shard of the gradients in caller-owned buffers,
/// so that every rank's step equals the step one process would take on all of them.
///
/// As the CPU engine of [`crate::CpuClipper<crate::Sharded<C>>`]: the chain is resolved over the logical tensors
/// (`infos`, the same on every rank), and `grads[t]` holds this rank's range of tensor
/// `t` ([`Shard::range`]; a zero-length tensor where it holds nothing). wgpu has no
/// device-side collective, so a sharded step makes one host round trip: the unit norms
/// (one accumulator per unit, 16 bytes each) are read back after `reduce`, merged over
/// the ranks, written back, and the rest of the step runs from them. Build and step it on
/// every rank together.
pub struct ShardedGpuPolicy<C: Collective> {
    inner: GpuPolicy,
    shard: Shard,
    comm: C,
    /// The loss scale of the next step (0 without loss scaling), as the last report or
    /// restored state gave it: every step waits for its report, so the host knows it
    /// without reading the device, and the ranks check that they agree on it.
    loss_scale: f32,
}

impl<C: Collective> std::fmt::Debug for ShardedGpuPolicy<C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ShardedGpuPolicy")
            .field("rank", &self.comm.rank())
            .field("ranks", &self.comm.size())
            .field("policy", &self.inner)
            .finish()
    }
}

/// Checks that `tensors[t]` holds `shard.local_len(t)` elements.
fn check_local(tensors: &[GpuTensor<'_>], shard: &Shard) -> Result<(), ClipError> {
    let lens: Vec<u64> = tensors.iter().map(|t| t.len).collect();
    shard.check_local(&lens, |t| {
        TensorInfo::name_of(tensors[t].name.as_deref(), t)
    })
}

impl<C: Collective> ShardedGpuPolicy<C> {
    /// Plans `policy` over the logical tensors `infos`, of which this rank holds `shard`,
    /// in `grads` (and, for AGC, the parameters' same ranges in `params`). Checks with
    /// every rank that the shards tile every tensor and that all ranks planned the same
    /// tensors and chain; an error on one rank is an error on all of them, and gives the
    /// collective back (a caller can try again at its next step).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        ctx: &GpuContext,
        grads: &[GpuTensor<'_>],
        params: Option<&[GpuTensor<'_>]>,
        policy: ClipPolicy,
        infos: &[TensorInfo],
        shard: Shard,
        comm: C,
    ) -> Result<ShardedGpuPolicy<C>, (ClipError, C)> {
        let planned = (|| {
            Shard::new(infos, shard.ranges().to_vec())?;
            let program = Program::new(&policy, infos)?;
            check_local(grads, &shard)?;
            let params = match (program.needs_params(), params) {
                (false, _) => None,
                (true, Some(p)) => {
                    check_local(p, &shard)?;
                    Some(p)
                }
                (true, None) => {
                    return Err(ClipError::InvalidConfig(
                        "AGC needs the parameters alongside the gradients".into(),
                    ))
                }
            };
            // The logical tensor index must fit the chunk table's u32 (noise keys).
            if let Some(t) = infos.iter().find(|t| t.len() > u32::MAX as u64) {
                return Err(ClipError::TooLarge {
                    tensor: t.name.clone(),
                    len: t.len(),
                });
            }
            let local = localize(&program, &shard);
            let inner = GpuPolicy::build(ctx, grads, params, policy, local, infos)?;
            Ok((program, inner))
        })();
        let checked = planned.as_ref().map(|(p, g)| (g.policy(), p, &shard));
        if let Err(e) = Shard::verify(infos, checked.map_err(Clone::clone), &comm) {
            return Err((e, comm));
        }
        match planned {
            Ok((_, inner)) => Ok(ShardedGpuPolicy {
                loss_scale: inner.policy().loss_scale.map_or(0.0, |l| l.init),
                inner,
                shard,
                comm,
            }),
            Err(e) => Err((e, comm)),
        }
    }

    /// The chain it runs.
    pub fn policy(&self) -> &ClipPolicy {
        self.inner.policy()
    }

    /// Where this rank keeps the loss scale on the device.
    pub fn loss_scale_on_device(&self) -> Option<super::LossScaleBinding<'_>> {
        self.inner.loss_scale_on_device()
    }

    /// This rank's shard.
    pub fn shard(&self) -> &Shard {
        &self.shard
    }

    /// The collective it exchanges through.
    pub fn collective(&self) -> &C {
        &self.comm
    }

    /// Steps taken so far: the next step's number.
    pub fn steps_taken(&self) -> u64 {
        self.inner.steps_taken()
    }

    /// Moves this rank onto new buffer ranges of its same local tensors, keeping its state
    /// and step count ([`GpuPolicy::rebind`]); a local matter, with no exchange. Errors
    /// leave it as it was.
    pub fn rebind(
        &mut self,
        grads: &[GpuTensor<'_>],
        params: Option<&[GpuTensor<'_>]>,
    ) -> Result<(), ClipError> {
        check_local(grads, &self.shard)?;
        if let Some(p) = params {
            check_local(p, &self.shard)?;
        }
        self.inner.rebind(grads, params)
    }

    /// Reads the state back (the same on every rank).
    pub fn state(&self) -> Result<PolicyState, ClipError> {
        self.inner.state()
    }

    /// Restores a saved state; restore the same one on every rank.
    pub fn set_state(&mut self, state: &PolicyState) -> Result<(), ClipError> {
        self.inner.set_state(state)?;
        self.loss_scale = state.loss_scale().map_or(0.0, |l| l.scale);
        Ok(())
    }

    /// Makes every following step write GPU timestamps (see
    /// [`GpuPolicy::set_timestamp_writes`]; the second half of each step writes them).
    pub fn set_timestamp_writes(&mut self, timestamps: Option<(wgpu::QuerySet, u32, u32)>) {
        self.inner.set_timestamp_writes(timestamps);
    }

    /// Clips this rank's gradients in place and returns the whole step's report (the
    /// same on every rank). Blocks for the one host round trip: the unit norms are read
    /// back, merged over the ranks, and the rest of the step is submitted and awaited.
    /// A failure on any rank before the merge (a device error, a schedule out of range)
    /// is an error on every rank, and no rank changes its gradients or state.
    pub fn step(&mut self) -> Result<ClipReport, ClipError> {
        self.step_with(Ok(()))
    }

    /// [`ShardedGpuPolicy::step`], or, with this rank's `local` error, its part in the
    /// exchange that fails the step on every rank (nothing is recorded here).
    pub(crate) fn step_with(
        &mut self,
        local: Result<(), ClipError>,
    ) -> Result<ClipReport, ClipError> {
        let norm = self.inner.policy().norm;
        let n = self.inner.units();
        let needs_params = self.inner.engine().program().needs_params();
        let read = local.and_then(|_| {
            (self.inner)
                .submit_with(|p, encoder| p.encode_units(encoder))
                .and_then(|pending| pending.wait())
        });
        let (mut units, mut w_units) = match &read {
            Ok((g, w)) => (
                g.iter().map(|&a| NormAcc::from(a)).collect(),
                w.iter().map(|&a| NormAcc::from(a)).collect(),
            ),
            Err(_) => (vec![NormAcc::IDENTITY; n], vec![]),
        };
        if needs_params {
            w_units.resize(n, NormAcc::IDENTITY);
        }
        let mut parts = vec![(&mut units[..], norm)];
        if needs_params {
            parts.push((&mut w_units[..], Norm::L2));
        }
        let step = self.inner.steps_taken();
        let factor = self.inner.policy().schedule.checked(step).unwrap_or(0.0);
        let key = (step, factor, self.loss_scale);
        table::all_reduce(&self.comm, &mut parts, key, read.map(|_| ()))?;
        let to_acc = |t: &[NormAcc]| t.iter().map(|a| a.to_acc()).collect::<Vec<_>>();
        let merged_params = needs_params.then(|| to_acc(&w_units));
        (self.inner.engine()).write_units(&to_acc(&units), merged_params.as_deref())?;
        let pending = (self.inner).submit_with(|p, e| p.encode_with(e, Mode::FromUnits))?;
        let report = pending.wait()?;
        if let Some(l) = report.loss_scale {
            self.loss_scale = l.next;
        }
        Ok(report)
    }
}
