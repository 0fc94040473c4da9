//! [`GpuClipper`]: the runner for gradients in caller-owned wgpu buffers.

use super::{forward, Accumulate, Optimize, PerExample, Plain, Sharded, Wrapper};
use crate::chain::{ClipPolicy, PerExampleClip, PolicyState, TensorInfo};
use crate::error::ClipError;
use crate::gpu::{
    DeferredClip, GpuAccumulator, GpuContext, GpuOptimizer, GpuPerExample, GpuPolicy, GpuTensor,
    LossScaleBinding, PendingReport, ShardedGpuPolicy,
};
use crate::norm::PartialNorm;
use crate::optim::{Optimizer, OptimizerState};
use crate::report::ClipReport;
use crate::shard::{Collective, Shard};

/// Clips gradients that live in your own wgpu buffers ([`GpuTensor`]s), with no host round
/// trip: a step is planned once, then recorded into your command encoder (`encode`) or
/// submitted at once (`step`), and its report read back asynchronously
/// ([`PendingReport`]: wait on it or `.await` it). The wrapper `W` says what a step does
/// around the chain; each has its constructor:
///
/// | `W` | built by | a step |
/// |---|---|---|
/// | [`Plain`] | [`GpuClipper::new`] | clips the gradients in place |
/// | [`Accumulate`] | [`GpuClipper::accumulating`] | adds a micro-batch; every k-th also clips the sums |
/// | [`PerExample`] | [`GpuClipper::per_example`] | clips every example, sums, adds noise |
/// | [`Optimize`] | [`GpuClipper::with_optimizer`] | clips and updates the parameters (SGD, Adam, AdamW) |
/// | [`Sharded`] | [`GpuClipper::sharded`] | clips this rank's shards by the norms of every rank |
///
/// Bad input is a typed error that records nothing and changes no state.
pub struct GpuClipper<W: Wrapper = Plain> {
    inner: W::Gpu,
}

impl<W: Wrapper> std::fmt::Debug for GpuClipper<W>
where
    W::Gpu: std::fmt::Debug,
{
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.inner.fmt(f)
    }
}

impl GpuClipper<Plain> {
    /// Plans `policy` over `grads`; AGC also takes the parameters, tensor for tensor of
    /// the same shapes. Names and shapes come from [`GpuTensor::named`] and
    /// [`GpuTensor::shaped`]. Errors (bad configuration, bad tensors) create nothing.
    pub fn new(
        ctx: &GpuContext,
        grads: &[GpuTensor<'_>],
        params: Option<&[GpuTensor<'_>]>,
        policy: ClipPolicy,
    ) -> Result<GpuClipper<Plain>, ClipError> {
        let inner = GpuPolicy::new(ctx, grads, params, policy)?;
        Ok(GpuClipper { inner })
    }

    forward! {
        /// Moves the runner onto new buffer ranges of the same tensors (same names, shapes,
        /// lengths and order; dtypes may change), keeping its state and step count: for
        /// gradients a memory pool relocates between steps. Errors leave it as it was.
        pub fn rebind(&mut self, grads: &[GpuTensor<'_>], params: Option<&[GpuTensor<'_>]>) -> Result<(), ClipError>;
        /// The chain it runs.
        pub fn policy(&self) -> &ClipPolicy;
        /// Where a loss-scaled chain ([`ClipPolicy::loss_scale`]) keeps the scale of the
        /// next step on the device, with the WGSL that reads it: multiply the next loss by
        /// it in a pass of your own, no read-back needed. `None` without loss scaling.
        pub fn loss_scale_on_device(&self) -> Option<LossScaleBinding<'_>>;
        /// Number of units (tensors, or AGC units) the chain scales.
        pub fn units(&self) -> usize;
        /// Steps taken so far: the next step's number.
        pub fn steps_taken(&self) -> u64;
        /// Makes every following step write GPU timestamps at the start and end of its
        /// compute pass (indices `begin` and `end` of `query_set`); `None` stops it. Needs
        /// `Features::TIMESTAMP_QUERY`, which [`GpuContext::new`] enables where available.
        pub fn set_timestamp_writes(&mut self, timestamps: Option<(wgpu::QuerySet, u32, u32)>);
        /// Records one step: norms, coefficients and the in-place rewrite, with no host
        /// round trip. The report is readable once the encoder is submitted and run. Up to
        /// 64 steps with parameters of their own (a schedule factor or noise key that
        /// changes) may be encoded before a submission (steps whose parameters do not change
        /// share theirs); a step whose parameters a later one overwrote changes nothing and
        /// its report is [`ClipError::StepOverwritten`].
        pub fn encode(&mut self, encoder: &mut wgpu::CommandEncoder) -> Result<PendingReport<ClipReport>, ClipError>;
        /// Records one step of a global-norm chain ([`ClipPolicy::global_norm`]) that clips
        /// by the total norm `total` instead of measuring the gradients: the second half of
        /// the split API, after every shard's `partial` (of a [`ClipPolicy::total_norm`]
        /// step) was combined. Another chain, or another norm order, is an error.
        pub fn encode_with_norm(&mut self, encoder: &mut wgpu::CommandEncoder, total: &PartialNorm) -> Result<PendingReport<ClipReport>, ClipError>;
        /// [`GpuClipper::encode_with_norm`], submitted now.
        pub fn step_with_norm(&mut self, total: &PartialNorm) -> Result<PendingReport<ClipReport>, ClipError>;
        /// Records one step that computes the norms, the state and every unit's
        /// coefficient but leaves the gradients as they are (deferred scaling): a pass of
        /// your own recorded after it multiplies as it reads ([`GpuClipper::deferred`]).
        /// A chain with noise or a value clamp is an error here.
        pub fn encode_deferred(&mut self, encoder: &mut wgpu::CommandEncoder) -> Result<PendingReport<ClipReport>, ClipError>;
        /// What your pass binds to apply the coefficients of [`GpuClipper::encode_deferred`].
        pub fn deferred(&self) -> DeferredClip<'_>;
        /// [`GpuClipper::encode`], submitted now.
        pub fn step(&mut self) -> Result<PendingReport<ClipReport>, ClipError>;
        /// Reads the state back (waits for the GPU), to save it with
        /// [`PolicyState::to_bytes`].
        pub fn state(&self) -> Result<PolicyState, ClipError>;
        /// Restores a saved state (from either backend); the next step continues from it.
        pub fn set_state(&mut self, state: &PolicyState) -> Result<(), ClipError>;
    }
}

impl GpuClipper<Accumulate> {
    /// Accumulates `micro` into `sums` over `micro_steps` micro-batches, clipped by
    /// `policy` at every boundary (AGC also takes the parameters). `sums[i]` has the dtype,
    /// length and byte offset of `micro[i]`, in buffers of their own that mirror the micro
    /// buffers one for one; names and shapes come from `sums`. Each micro-batch's
    /// gradients are added times `1 / micro_steps` (the first of an accumulation
    /// overwrites the sums): the clipped mean, as a PyTorch loop that divides the loss by
    /// k. Errors create nothing.
    pub fn accumulating(
        ctx: &GpuContext,
        micro: &[GpuTensor<'_>],
        sums: &[GpuTensor<'_>],
        params: Option<&[GpuTensor<'_>]>,
        micro_steps: u32,
        policy: ClipPolicy,
    ) -> Result<GpuClipper<Accumulate>, ClipError> {
        let inner = GpuAccumulator::new(ctx, micro, sums, params, micro_steps, policy)?;
        Ok(GpuClipper { inner })
    }

    forward! {
        /// Records the addition of the current micro-batch; on the last micro-batch of an
        /// accumulation also the clipping of the sums, whose report it returns (`None`
        /// before). The micro tensors must hold this micro-batch when the encoder runs.
        pub fn encode(&mut self, encoder: &mut wgpu::CommandEncoder) -> Result<Option<PendingReport<ClipReport>>, ClipError>;
        /// [`GpuClipper::encode`], submitted now.
        pub fn step(&mut self) -> Result<Option<PendingReport<ClipReport>>, ClipError>;
        /// Micro-batches added since the last boundary.
        pub fn pending(&self) -> u32;
        /// Micro-batches per accumulation.
        pub fn micro_steps(&self) -> u32;
        /// Drops a partial accumulation: the next micro-batch starts a new one.
        pub fn reset(&mut self);
        /// Makes the accumulation passes write GPU timestamps (see
        /// [`GpuClipper::set_clip_timestamp_writes`] for the clip at a boundary).
        pub fn set_timestamp_writes(&mut self, timestamps: Option<(wgpu::QuerySet, u32, u32)>);
    }

    /// Makes the clip at every boundary write GPU timestamps at the start and end of its
    /// compute pass; `None` stops it.
    pub fn set_clip_timestamp_writes(&mut self, timestamps: Option<(wgpu::QuerySet, u32, u32)>) {
        self.inner.policy_mut().set_timestamp_writes(timestamps)
    }

    /// Where a loss-scaled chain ([`ClipPolicy::loss_scale`]) keeps the scale of the next
    /// step on the device (see [`GpuClipper::loss_scale_on_device`] of `Plain`).
    pub fn loss_scale_on_device(&self) -> Option<LossScaleBinding<'_>> {
        self.inner.policy().loss_scale_on_device()
    }

    /// The chain it runs at every boundary.
    pub fn policy(&self) -> &ClipPolicy {
        self.inner.policy().policy()
    }

    /// Accumulations clipped so far: the next boundary's step number.
    pub fn steps_taken(&self) -> u64 {
        self.inner.policy().steps_taken()
    }

    /// Reads the chain's state back (waits for the GPU).
    pub fn state(&self) -> Result<PolicyState, ClipError> {
        self.inner.policy().state()
    }

    /// Restores a saved chain state (from either backend).
    pub fn set_state(&mut self, state: &PolicyState) -> Result<(), ClipError> {
        self.inner.policy_mut().set_state(state)
    }
}

impl GpuClipper<PerExample> {
    /// Per-example clipping of `inputs` (`[batch, P_t]` per tensor, any dtype) into
    /// `outputs` (`P_t` f32 elements each, not overlapping the inputs or each other).
    /// Errors create nothing.
    pub fn per_example(
        ctx: &GpuContext,
        inputs: &[GpuTensor<'_>],
        outputs: &[GpuTensor<'_>],
        clip: PerExampleClip,
    ) -> Result<GpuClipper<PerExample>, ClipError> {
        let inner = GpuPerExample::new(ctx, inputs, outputs, clip)?;
        Ok(GpuClipper { inner })
    }

    forward! {
        /// Records one step: per-example norms and factors, the clipped sum and the noise.
        pub fn encode(&mut self, encoder: &mut wgpu::CommandEncoder) -> Result<PendingReport<ClipReport>, ClipError>;
        /// [`GpuClipper::encode`], submitted now.
        pub fn step(&mut self) -> Result<PendingReport<ClipReport>, ClipError>;
        /// Steps taken so far: the next step's number (it keys the noise).
        pub fn steps_taken(&self) -> u64;
        /// Sets the next step's number (the state of per-example clipping): a resumed run
        /// continues its noise where it stopped.
        pub fn set_steps_taken(&mut self, steps: u64);
        /// Makes every following step write GPU timestamps at the start and end of its
        /// compute pass; `None` stops it.
        pub fn set_timestamp_writes(&mut self, timestamps: Option<(wgpu::QuerySet, u32, u32)>);
    }
}

impl GpuClipper<Optimize> {
    /// `optimizer` after `policy` over gradients `grads` and f32 parameters `params`
    /// (tensor for tensor the same lengths, in buffers other than the gradients'); AGC
    /// measures these parameters. Errors create nothing and touch no buffer.
    pub fn with_optimizer(
        ctx: &GpuContext,
        grads: &[GpuTensor<'_>],
        params: &[GpuTensor<'_>],
        policy: ClipPolicy,
        optimizer: impl Into<Optimizer>,
    ) -> Result<GpuClipper<Optimize>, ClipError> {
        let inner = GpuOptimizer::new(ctx, grads, params, policy, optimizer)?;
        Ok(GpuClipper { inner })
    }

    forward! {
        /// Records one step: the chain's norms and coefficients, then the update, which
        /// reads the gradients once and scales them as it reads (they are not rewritten).
        pub fn encode(&mut self, encoder: &mut wgpu::CommandEncoder) -> Result<PendingReport<ClipReport>, ClipError>;
        /// The unfused equivalent: the chain clips the gradients in place (they keep the
        /// clipped values), then the update reads them.
        pub fn encode_in_place(&mut self, encoder: &mut wgpu::CommandEncoder) -> Result<PendingReport<ClipReport>, ClipError>;
        /// [`GpuClipper::encode`], submitted now.
        pub fn step(&mut self) -> Result<PendingReport<ClipReport>, ClipError>;
        /// [`GpuClipper::encode_in_place`], submitted now.
        pub fn step_in_place(&mut self) -> Result<PendingReport<ClipReport>, ClipError>;
        /// The optimizer it runs.
        pub fn optimizer(&self) -> &Optimizer;
        /// The learning rate of the following steps.
        pub fn lr(&self) -> f32;
        /// Sets the learning rate of the following steps (a schedule of your own).
        pub fn set_lr(&mut self, lr: f32) -> Result<(), ClipError>;
        /// Reads the optimizer state back (waits for the GPU): moments and step count.
        pub fn state(&self) -> Result<OptimizerState, ClipError>;
        /// Restores a saved optimizer state (from either backend), checked against this
        /// optimizer and these tensors.
        pub fn set_state(&mut self, state: &OptimizerState) -> Result<(), ClipError>;
        /// Reads the chain's state back (waits for the GPU).
        pub fn clip_state(&self) -> Result<PolicyState, ClipError>;
        /// Restores a saved chain state (from either backend).
        pub fn set_clip_state(&mut self, state: &PolicyState) -> Result<(), ClipError>;
        /// Makes every following step write GPU timestamps at the start and end of its
        /// compute pass; `None` stops it.
        pub fn set_timestamp_writes(&mut self, timestamps: Option<(wgpu::QuerySet, u32, u32)>);
    }

    /// Where a loss-scaled chain ([`ClipPolicy::loss_scale`]) keeps the scale of the next
    /// step on the device (see [`GpuClipper::loss_scale_on_device`] of `Plain`).
    pub fn loss_scale_on_device(&self) -> Option<LossScaleBinding<'_>> {
        self.inner.policy().loss_scale_on_device()
    }

    /// The chain it runs.
    pub fn policy(&self) -> &ClipPolicy {
        self.inner.policy().policy()
    }

    /// Steps run so far, held ones included: the next report's `step` (the optimizer's own
    /// count, which skips held steps, is in [`OptimizerState`]).
    pub fn steps_taken(&self) -> u64 {
        self.inner.policy().steps_taken()
    }
}

impl<C: Collective> GpuClipper<Sharded<C>> {
    /// Plans `policy` over the logical tensors `infos`, of which this rank holds `shard`,
    /// in `grads` (and, for AGC, the parameters' same ranges in `params`). Checks with
    /// every rank that the shards tile every tensor and that all ranks planned the same
    /// tensors and chain; an error on one rank is an error on all of them.
    #[allow(clippy::too_many_arguments)]
    pub fn sharded(
        ctx: &GpuContext,
        grads: &[GpuTensor<'_>],
        params: Option<&[GpuTensor<'_>]>,
        policy: ClipPolicy,
        infos: &[TensorInfo],
        shard: Shard,
        comm: C,
    ) -> Result<GpuClipper<Sharded<C>>, ClipError> {
        let inner = ShardedGpuPolicy::new(ctx, grads, params, policy, infos, shard, comm)
            .map_err(|(e, _)| e)?;
        Ok(GpuClipper { inner })
    }

    forward! {
        /// One step, run now: this rank's unit norms, exchanged with every rank, then the
        /// coefficients and the rewrite. The report (the whole step's, the same on every
        /// rank) is read before it returns, since the ranks must agree first.
        pub fn step(&mut self) -> Result<ClipReport, ClipError>;
        /// The chain it runs.
        pub fn policy(&self) -> &ClipPolicy;
        /// Where a loss-scaled chain ([`ClipPolicy::loss_scale`]) keeps the scale of the
        /// next step on this rank on the device, with the WGSL that reads it: multiply the next loss by
        /// it in a pass of your own, no read-back needed. `None` without loss scaling.
        pub fn loss_scale_on_device(&self) -> Option<LossScaleBinding<'_>>;
        /// Moves this rank onto new buffer ranges of the same local tensors (same names,
        /// shapes, lengths and order; dtypes may change), keeping its state and step count:
        /// for gradients a memory pool relocates between steps. No exchange with the other
        /// ranks; errors leave it as it was.
        pub fn rebind(&mut self, grads: &[GpuTensor<'_>], params: Option<&[GpuTensor<'_>]>) -> Result<(), ClipError>;
        /// This rank's shard.
        pub fn shard(&self) -> &Shard;
        /// The collective it exchanges through.
        pub fn collective(&self) -> &C;
        /// Steps taken so far: the next step's number.
        pub fn steps_taken(&self) -> u64;
        /// Reads the state back (waits for the GPU); the same on every rank.
        pub fn state(&self) -> Result<PolicyState, ClipError>;
        /// Restores a saved state; restore the same one on every rank.
        pub fn set_state(&mut self, state: &PolicyState) -> Result<(), ClipError>;
        /// Makes the second half of every following step write GPU timestamps; `None`
        /// stops it.
        pub fn set_timestamp_writes(&mut self, timestamps: Option<(wgpu::QuerySet, u32, u32)>);
    }
}
