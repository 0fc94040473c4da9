//! [`CpuClipper`]: the runner for host slices on the CPU, and the oracle of the GPU.

use super::{forward, Accumulate, Optimize, PerExample, Plain, Sharded, Wrapper};
use crate::chain::{ClipPolicy, PerExampleClip, PolicyState, TensorInfo};
use crate::cpu::accumulate::CpuAccumulator;
use crate::cpu::optimizer::CpuOptimizer;
use crate::cpu::per_example::CpuPerExample;
use crate::cpu::policy::{CpuPolicy, DeferredStep};
use crate::cpu::sharded::ShardedCpuPolicy;
use crate::dtype::{GradMut, GradRef};
use crate::error::ClipError;
use crate::norm::PartialNorm;
use crate::optim::{Optimizer, OptimizerState};
use crate::report::ClipReport;
use crate::shard::{Collective, Shard};

/// Clips host slices ([`GradMut`]: `&mut [f32]`, `&mut [f16]`, `&mut [bf16]`) on the CPU,
/// multi-threaded, with norms reduced exactly in f64: the fallback where there is no GPU
/// and the oracle the GPU is tested against. Tensors are described once, by
/// [`TensorInfo`]s (names for groups and masks, shapes for AGC; [`TensorInfo::unnamed`]
/// for flat ones). The wrapper `W` says what a step does around the chain:
///
/// | `W` | built by | a step |
/// |---|---|---|
/// | [`Plain`] | [`CpuClipper::new`] | clips the gradients in place |
/// | [`Accumulate`] | [`CpuClipper::accumulating`] | adds a micro-batch; every k-th also clips the sums |
/// | [`PerExample`] | [`CpuClipper::per_example`] | clips every example, sums, adds noise |
/// | [`Optimize`] | [`CpuClipper::with_optimizer`] | clips and updates the parameters (SGD, Adam, AdamW) |
/// | [`Sharded`] | [`CpuClipper::sharded`] | clips this rank's shards by the norms of every rank |
///
/// Bad input is a typed error that leaves the gradients, the state and the step count as
/// they were.
pub struct CpuClipper<W: Wrapper = Plain> {
    inner: W::Cpu,
}

impl<W: Wrapper> std::fmt::Debug for CpuClipper<W>
where
    W::Cpu: std::fmt::Debug,
{
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.inner.fmt(f)
    }
}

impl<W: Wrapper> Clone for CpuClipper<W>
where
    W::Cpu: Clone,
{
    fn clone(&self) -> Self {
        CpuClipper {
            inner: self.inner.clone(),
        }
    }
}

impl CpuClipper<Plain> {
    /// Runs `policy` over tensors described by `infos` (names and shapes, in batch order).
    /// A configuration that does not fit them is an error.
    pub fn new(policy: ClipPolicy, infos: &[TensorInfo]) -> Result<CpuClipper<Plain>, ClipError> {
        Ok(CpuClipper {
            inner: CpuPolicy::new(policy, infos)?,
        })
    }

    forward! {
        /// Runs one step on `grads` in place; AGC also needs the parameters (same shapes).
        /// A non-finite norm under [`crate::NonFinitePolicy::Error`] leaves the gradients
        /// and the adaptive state untouched but counts as a step, as on the GPU.
        pub fn step(&mut self, grads: &mut [GradMut<'_>], params: Option<&[GradRef<'_>]>) -> Result<ClipReport, ClipError>;
        /// Runs one step of a global-norm chain ([`ClipPolicy::global_norm`]) with the total
        /// norm `total` instead of the norm of `grads`: the second half of the split API,
        /// after every shard's `partial` (of a [`ClipPolicy::total_norm`] step) was
        /// combined. Another chain, or another norm order, is an error.
        pub fn step_with_norm(&mut self, grads: &mut [GradMut<'_>], total: &PartialNorm) -> Result<ClipReport, ClipError>;
        /// Runs one step without touching the gradients: the norms, the state and the
        /// report as [`CpuClipper::step`] would leave them, and the coefficients for you to
        /// apply (deferred scaling). Unlike the GPU's `encode_deferred`, noise and a value
        /// clamp are allowed: [`DeferredStep::clipped`] applies them.
        pub fn step_deferred(&mut self, grads: &[GradRef<'_>], params: Option<&[GradRef<'_>]>) -> Result<DeferredStep, ClipError>;
        /// The state to save (see [`PolicyState::to_bytes`]).
        pub fn state(&self) -> &PolicyState;
        /// The chain it runs.
        pub fn policy(&self) -> &ClipPolicy;
    }

    /// Restores a saved state (from either backend); the next step continues from it.
    pub fn set_state(&mut self, state: &PolicyState) -> Result<(), ClipError> {
        self.inner.set_state(state.clone())
    }

    /// Steps taken so far: the next step's number.
    pub fn steps_taken(&self) -> u64 {
        self.inner.state().steps_taken()
    }
}

impl CpuClipper<Accumulate> {
    /// Accumulates over `micro_steps` micro-batches of tensors described by `infos`, then
    /// clips the sums with `policy`.
    pub fn accumulating(
        policy: ClipPolicy,
        infos: &[TensorInfo],
        micro_steps: u32,
    ) -> Result<CpuClipper<Accumulate>, ClipError> {
        let inner = CpuAccumulator::new(CpuPolicy::new(policy, infos)?, micro_steps)?;
        Ok(CpuClipper { inner })
    }

    forward! {
        /// Adds one micro-batch's gradients, times `1 / micro_steps`, into `sums` (same
        /// dtypes and lengths; the first micro-batch of an accumulation overwrites them). At
        /// the boundary it also clips `sums` in place and returns the chain's report;
        /// otherwise `None`. AGC takes the parameters.
        pub fn step(&mut self, sums: &mut [GradMut<'_>], micro: &[GradRef<'_>], params: Option<&[GradRef<'_>]>) -> Result<Option<ClipReport>, ClipError>;
        /// Micro-batches added since the last boundary.
        pub fn pending(&self) -> u32;
        /// Micro-batches per accumulation.
        pub fn micro_steps(&self) -> u32;
        /// Drops a partial accumulation: the next micro-batch starts a new one.
        pub fn reset(&mut self);
    }

    /// The chain it runs at every boundary.
    pub fn policy(&self) -> &ClipPolicy {
        self.inner.policy().policy()
    }

    /// Accumulations clipped so far: the next boundary's step number.
    pub fn steps_taken(&self) -> u64 {
        self.inner.policy().state().steps_taken()
    }

    /// The chain's state to save.
    pub fn state(&self) -> &PolicyState {
        self.inner.policy().state()
    }

    /// Restores a saved chain state (from either backend).
    pub fn set_state(&mut self, state: &PolicyState) -> Result<(), ClipError> {
        self.inner.policy_mut().set_state(state.clone())
    }
}

impl CpuClipper<PerExample> {
    /// Per-example clipping of inputs shaped as `infos` (each `batch * P_t` elements).
    /// A configuration that does not fit them is an error.
    pub fn per_example(
        clip: PerExampleClip,
        infos: &[TensorInfo],
    ) -> Result<CpuClipper<PerExample>, ClipError> {
        let inner = CpuPerExample::new(clip, infos)?;
        Ok(CpuClipper { inner })
    }

    forward! {
        /// One step over `inputs` into `outputs` (`P_t` f32 elements each), its noise keyed
        /// by [`CpuClipper::steps_taken`].
        pub fn step(&mut self, inputs: &[GradRef<'_>], outputs: &mut [&mut [f32]]) -> Result<ClipReport, ClipError>;
        /// Steps taken so far: the next step's number (it keys the noise).
        pub fn steps_taken(&self) -> u64;
        /// Sets the next step's number (the state of per-example clipping): a resumed run
        /// continues its noise where it stopped.
        pub fn set_steps_taken(&mut self, steps: u64);
    }
}

impl CpuClipper<Optimize> {
    /// `optimizer` after `policy` over tensors described by `infos`. Errors (a bad policy
    /// or hyperparameter) create nothing.
    pub fn with_optimizer(
        policy: ClipPolicy,
        infos: &[TensorInfo],
        optimizer: impl Into<Optimizer>,
    ) -> Result<CpuClipper<Optimize>, ClipError> {
        let inner = CpuOptimizer::new(policy, infos, optimizer)?;
        Ok(CpuClipper { inner })
    }

    forward! {
        /// One step: clips `grads` (as the chain's in-place step would) while reading them
        /// and updates `params`, the f32 master weights, tensor for tensor. A held step
        /// (non-finite gradients under `Error` or `SkipStep`) changes no parameter and no
        /// optimizer state.
        pub fn step(&mut self, grads: &[GradRef<'_>], params: &mut [&mut [f32]]) -> Result<ClipReport, ClipError>;
        /// The unfused equivalent: the chain clips `grads` in place (they keep the clipped
        /// values), then the update reads them.
        pub fn step_in_place(&mut self, grads: &mut [GradMut<'_>], params: &mut [&mut [f32]]) -> Result<ClipReport, ClipError>;
        /// The optimizer it runs.
        pub fn optimizer(&self) -> &Optimizer;
        /// The learning rate of the following steps.
        pub fn lr(&self) -> f32;
        /// Sets the learning rate of the following steps (a schedule); finite and >= 0.
        pub fn set_lr(&mut self, lr: f32) -> Result<(), ClipError>;
        /// The optimizer state (steps taken, moments).
        pub fn state(&self) -> &OptimizerState;
    }

    /// Restores a saved optimizer state (from either backend), checked against this
    /// optimizer and these tensors.
    pub fn set_state(&mut self, state: &OptimizerState) -> Result<(), ClipError> {
        self.inner.set_state(state.clone())
    }

    /// The chain it runs.
    pub fn policy(&self) -> &ClipPolicy {
        self.inner.policy().policy()
    }

    /// Steps run so far, held ones included: the next report's `step` (the optimizer's own
    /// count, which skips held steps, is in [`OptimizerState`]).
    pub fn steps_taken(&self) -> u64 {
        self.inner.policy().state().steps_taken()
    }

    /// The chain's state to save.
    pub fn clip_state(&self) -> &PolicyState {
        self.inner.policy().state()
    }

    /// Restores a saved chain state (from either backend).
    pub fn set_clip_state(&mut self, state: &PolicyState) -> Result<(), ClipError> {
        self.inner.policy_mut().set_state(state.clone())
    }
}

impl<C: Collective> CpuClipper<Sharded<C>> {
    /// Plans `policy` over the logical tensors `infos`, of which this rank holds `shard`.
    /// Checks with every rank (two small collectives) that the shards tile every tensor
    /// and that all ranks planned the same tensors and chain.
    pub fn sharded(
        policy: ClipPolicy,
        infos: &[TensorInfo],
        shard: Shard,
        comm: C,
    ) -> Result<CpuClipper<Sharded<C>>, ClipError> {
        let inner = ShardedCpuPolicy::new(policy, infos, shard, comm)?;
        Ok(CpuClipper { inner })
    }

    forward! {
        /// Clips this rank's gradients in place: `grads[t]` holds [`Shard::range`]`(t)` of
        /// tensor `t`; AGC also takes the parameters' same ranges. The report is the whole
        /// step's and the same on every rank. Bad input on any rank is an error on every
        /// rank, and no rank changes its gradients or state.
        pub fn step(&mut self, grads: &mut [GradMut<'_>], params: Option<&[GradRef<'_>]>) -> Result<ClipReport, ClipError>;
        /// The chain it runs.
        pub fn policy(&self) -> &ClipPolicy;
        /// This rank's shard.
        pub fn shard(&self) -> &Shard;
        /// The collective it exchanges through.
        pub fn collective(&self) -> &C;
        /// The state (the same on every rank).
        pub fn state(&self) -> &PolicyState;
    }

    /// Restores a saved state; restore the same one on every rank.
    pub fn set_state(&mut self, state: &PolicyState) -> Result<(), ClipError> {
        self.inner.set_state(state.clone())
    }

    /// Steps taken so far: the next step's number.
    pub fn steps_taken(&self) -> u64 {
        self.inner.state().steps_taken()
    }
}
