//! The runner for gradients in host memory, on the backend the caller picks
//! ([`Backend::best`]: a hardware GPU if there is one, else the CPU path; a software
//! adapter only when asked for).

use crate::chain::{ClipPolicy, PerExampleClip, PolicyState, TensorInfo};
use crate::dtype::{GradMut, GradRef};
use crate::error::ClipError;
use crate::gpu::GpuContext;
use crate::norm::PartialNorm;
use crate::optim::{Optimizer, OptimizerState};
use crate::report::ClipReport;
use crate::runner::{Accumulate, CpuClipper, Optimize, PerExample, Plain, Sharded, Wrapper};
use crate::shard::{Collective, Shard};

pub(crate) mod staged;
mod staging;

use staged::{StagedAccumulate, StagedChain, StagedOptimize, StagedPerExample, StagedSharded};

/// Where a [`Clipper`] runs.
#[derive(Debug, Clone)]
pub enum Backend {
    /// A wgpu device.
    Gpu(GpuContext),
    /// The multi-threaded CPU path.
    Cpu,
}

impl Backend {
    /// A hardware GPU if there is one ([`GpuContext::hardware`]), else the CPU, which is
    /// faster on host data than a software adapter (lavapipe, llvmpipe, WARP); ask for
    /// one with `Backend::Gpu(GpuContext::new()?)`.
    pub fn best() -> Backend {
        match GpuContext::hardware() {
            Ok(ctx) => Backend::Gpu(ctx),
            Err(_) => Backend::Cpu,
        }
    }
}

/// A runner on its backend.
enum OnBackend<W: Wrapper> {
    Cpu(CpuClipper<W>),
    Gpu(GpuContext, Box<W::Staged>),
}

/// Clips host slices (`Vec<f32>`, `&mut [f16]`, ...) on a backend of your choice
/// ([`Backend::best`]: a hardware GPU if there is one, else the CPU), step after step,
/// keeping its state. On a GPU the slices are copied into device buffers, the step runs
/// there and what it wrote is copied back; each host tensor stays whole (one larger than
/// a device buffer is [`ClipError::TooLarge`]: use [`Backend::Cpu`] for it). For data
/// already on the GPU use [`crate::GpuClipper`]; on the CPU alone, [`CpuClipper`] (which
/// this runs there). The wrapper `W` says what a step does around the chain, as for
/// [`CpuClipper`], whose steps these take the same arguments as:
///
/// | `W` | built by |
/// |---|---|
/// | [`Plain`] | [`Clipper::new`] |
/// | [`Accumulate`] | [`Clipper::accumulating`] |
/// | [`PerExample`] | [`Clipper::per_example`] |
/// | [`Optimize`] | [`Clipper::with_optimizer`] |
/// | [`Sharded`] | [`Clipper::sharded`] |
///
/// On a GPU the device runner is built at the first step, when the element types are
/// known; a chain alone is rebuilt when they change, the other wrappers refuse other
/// types than their first step's (`ShapeMismatch`), and AGC's parameters are needed at
/// every step (on the CPU, an accumulation reads them at its boundaries only). A sharded clipper checks the other
/// ranks at its first step there (on the CPU, when it is built), so run every rank on the
/// same backend.
pub struct Clipper<W: Wrapper = Plain> {
    on: OnBackend<W>,
}

impl<W: Wrapper> std::fmt::Debug for Clipper<W> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Clipper")
            .field("backend", &self.describe())
            .finish()
    }
}

impl<W: Wrapper> Clipper<W> {
    /// `cpu` on the CPU, or `gpu` staged on a device.
    fn on(
        backend: Backend,
        cpu: impl FnOnce() -> Result<CpuClipper<W>, ClipError>,
        gpu: impl FnOnce() -> Result<W::Staged, ClipError>,
    ) -> Result<Clipper<W>, ClipError> {
        let on = match backend {
            Backend::Cpu => OnBackend::Cpu(cpu()?),
            Backend::Gpu(ctx) => OnBackend::Gpu(ctx, Box::new(gpu()?)),
        };
        Ok(Clipper { on })
    }

    /// The backend in use.
    pub fn backend(&self) -> Backend {
        match &self.on {
            OnBackend::Cpu(_) => Backend::Cpu,
            OnBackend::Gpu(ctx, _) => Backend::Gpu(ctx.clone()),
        }
    }

    /// A one-line description: the adapter's name, type and API, or "CPU".
    pub fn describe(&self) -> String {
        match &self.on {
            OnBackend::Cpu(_) => "CPU (rayon)".to_string(),
            OnBackend::Gpu(ctx, _) => match ctx.adapter_info() {
                Some(i) => format!("GPU: {} ({:?}, {:?})", i.name, i.device_type, i.backend),
                None => "GPU: caller's device".to_string(),
            },
        }
    }
}

/// Runs `$cpu` on a CPU clipper or `$gpu` on a staged one (with its context).
macro_rules! on_backend {
    ($self:expr, $c:ident => $cpu:expr, ($ctx:ident, $g:ident) => $gpu:expr) => {
        match $self {
            OnBackend::Cpu($c) => $cpu,
            OnBackend::Gpu($ctx, $g) => $gpu,
        }
    };
}

/// The chain's accessors of a wrapper whose state is its chain's.
macro_rules! chain_state {
    ([$($g:tt)*] $ty:ty) => {
        impl<$($g)*> $ty {
            /// The chain it runs.
            pub fn policy(&self) -> &ClipPolicy {
                on_backend!(&self.on, c => c.policy(), (_ctx, g) => g.policy())
            }

            /// Steps taken so far (for accumulation, boundaries): the next report's `step`.
            pub fn steps_taken(&self) -> u64 {
                on_backend!(&self.on, c => c.steps_taken(), (_ctx, g) => g.steps_taken())
            }

            /// The chain's state to save (see [`PolicyState::to_bytes`]): step counter,
            /// adaptive history, skip counter. The same layout on every backend.
            pub fn state(&self) -> Result<PolicyState, ClipError> {
                on_backend!(&self.on, c => Ok(c.state().clone()), (_ctx, g) => g.state())
            }

            /// Restores a saved chain state (from either backend); the next step
            /// continues from it.
            pub fn set_state(&mut self, saved: &PolicyState) -> Result<(), ClipError> {
                on_backend!(&mut self.on, c => c.set_state(saved), (_ctx, g) => g.set_state(saved))
            }
        }
    };
}

chain_state!([] Clipper<Plain>);
chain_state!([] Clipper<Accumulate>);
chain_state!([C: Collective] Clipper<Sharded<C>>);

impl Clipper<Plain> {
    /// Runs `policy` over tensors named and shaped by `tensors` on `backend`. The
    /// configuration is checked here; nothing is built on error.
    pub fn new(
        backend: Backend,
        policy: ClipPolicy,
        tensors: &[TensorInfo],
    ) -> Result<Clipper<Plain>, ClipError> {
        let p = policy.clone();
        Clipper::on(
            backend,
            || CpuClipper::new(p, tensors),
            || StagedChain::new(policy, tensors),
        )
    }

    /// One step of the chain over `grads`, in place; AGC also reads `params` (tensor for
    /// tensor). On error the gradients and the state are left as they were.
    pub fn step(
        &mut self,
        grads: &mut [GradMut<'_>],
        params: Option<&[GradRef<'_>]>,
    ) -> Result<ClipReport, ClipError> {
        on_backend!(&mut self.on, c => c.step(grads, params), (ctx, g) => g.step(ctx, grads, params, None))
    }

    /// One step of a global-norm chain ([`ClipPolicy::global_norm`]) that clips by the
    /// total norm `total` instead of measuring `grads`: the second half of the split API
    /// (see [`CpuClipper::step_with_norm`]). Another chain, or a norm of another order, is
    /// an error that changes nothing.
    pub fn step_with_norm(
        &mut self,
        grads: &mut [GradMut<'_>],
        total: &PartialNorm,
    ) -> Result<ClipReport, ClipError> {
        on_backend!(&mut self.on, c => c.step_with_norm(grads, total), (ctx, g) => g.step(ctx, grads, None, Some(total)))
    }
}

impl Clipper<Accumulate> {
    /// Accumulates over `micro_steps` micro-batches of tensors described by `tensors`,
    /// then clips the sums with `policy`, on `backend`.
    pub fn accumulating(
        backend: Backend,
        policy: ClipPolicy,
        tensors: &[TensorInfo],
        micro_steps: u32,
    ) -> Result<Clipper<Accumulate>, ClipError> {
        let p = policy.clone();
        Clipper::on(
            backend,
            || CpuClipper::accumulating(p, tensors, micro_steps),
            || StagedAccumulate::new(policy, tensors, micro_steps),
        )
    }

    /// Adds one micro-batch's gradients, times `1 / micro_steps`, into `sums` (same
    /// dtypes and lengths; the first micro-batch of an accumulation overwrites them). At
    /// the boundary it also clips `sums` in place and returns the chain's report;
    /// otherwise `None`. AGC takes the parameters.
    pub fn step(
        &mut self,
        sums: &mut [GradMut<'_>],
        micro: &[GradRef<'_>],
        params: Option<&[GradRef<'_>]>,
    ) -> Result<Option<ClipReport>, ClipError> {
        on_backend!(&mut self.on, c => c.step(sums, micro, params), (ctx, g) => g.step(ctx, sums, micro, params))
    }

    /// Micro-batches added since the last boundary.
    pub fn pending(&self) -> u32 {
        on_backend!(&self.on, c => c.pending(), (_ctx, g) => g.pending())
    }

    /// Micro-batches per accumulation.
    pub fn micro_steps(&self) -> u32 {
        on_backend!(&self.on, c => c.micro_steps(), (_ctx, g) => g.micro_steps())
    }

    /// Drops a partial accumulation: the next micro-batch starts a new one.
    pub fn reset(&mut self) {
        on_backend!(&mut self.on, c => c.reset(), (_ctx, g) => g.reset())
    }
}

impl Clipper<PerExample> {
    /// Per-example clipping of inputs shaped as `tensors` (each `batch * P_t` elements),
    /// on `backend`.
    pub fn per_example(
        backend: Backend,
        clip: PerExampleClip,
        tensors: &[TensorInfo],
    ) -> Result<Clipper<PerExample>, ClipError> {
        let c = clip.clone();
        Clipper::on(
            backend,
            || CpuClipper::per_example(c, tensors),
            || StagedPerExample::new(clip, tensors),
        )
    }

    /// One step over `inputs` into `outputs` (`P_t` f32 elements each), its noise keyed
    /// by [`Clipper::steps_taken`].
    pub fn step(
        &mut self,
        inputs: &[GradRef<'_>],
        outputs: &mut [&mut [f32]],
    ) -> Result<ClipReport, ClipError> {
        on_backend!(&mut self.on, c => c.step(inputs, outputs), (ctx, g) => g.step(ctx, inputs, outputs))
    }

    /// Steps taken so far: the next step's number (it keys the noise).
    pub fn steps_taken(&self) -> u64 {
        on_backend!(&self.on, c => c.steps_taken(), (_ctx, g) => g.steps_taken())
    }

    /// Sets the next step's number (the state of per-example clipping): a resumed run
    /// continues its noise where it stopped.
    pub fn set_steps_taken(&mut self, steps: u64) {
        on_backend!(&mut self.on, c => c.set_steps_taken(steps), (_ctx, g) => g.set_steps_taken(steps))
    }
}

impl Clipper<Optimize> {
    /// `optimizer` after `policy` over tensors described by `tensors`, on `backend`.
    /// Errors (a bad policy or hyperparameter) create nothing.
    pub fn with_optimizer(
        backend: Backend,
        policy: ClipPolicy,
        tensors: &[TensorInfo],
        optimizer: impl Into<Optimizer>,
    ) -> Result<Clipper<Optimize>, ClipError> {
        let (optimizer, p) = (optimizer.into(), policy.clone());
        Clipper::on(
            backend,
            || CpuClipper::with_optimizer(p, tensors, optimizer),
            || StagedOptimize::new(policy, tensors, optimizer),
        )
    }

    /// One step: clips `grads` (as the chain's in-place step would) while reading them
    /// and updates `params`, the f32 master weights, tensor for tensor. A held step
    /// changes no parameter and no optimizer state.
    pub fn step(
        &mut self,
        grads: &[GradRef<'_>],
        params: &mut [&mut [f32]],
    ) -> Result<ClipReport, ClipError> {
        on_backend!(&mut self.on, c => c.step(grads, params), (ctx, g) => g.step(ctx, grads, params))
    }

    /// The unfused equivalent: the chain clips `grads` in place (they keep the clipped
    /// values), then the update reads them.
    pub fn step_in_place(
        &mut self,
        grads: &mut [GradMut<'_>],
        params: &mut [&mut [f32]],
    ) -> Result<ClipReport, ClipError> {
        on_backend!(&mut self.on, c => c.step_in_place(grads, params), (ctx, g) => g.step_in_place(ctx, grads, params))
    }

    /// The optimizer it runs.
    pub fn optimizer(&self) -> &Optimizer {
        on_backend!(&self.on, c => c.optimizer(), (_ctx, g) => g.optimizer())
    }

    /// The chain it runs.
    pub fn policy(&self) -> &ClipPolicy {
        on_backend!(&self.on, c => c.policy(), (_ctx, g) => g.policy())
    }

    /// The learning rate of the following steps.
    pub fn lr(&self) -> f32 {
        on_backend!(&self.on, c => c.lr(), (_ctx, g) => g.lr())
    }

    /// Sets the learning rate of the following steps (a schedule); finite and >= 0.
    pub fn set_lr(&mut self, lr: f32) -> Result<(), ClipError> {
        on_backend!(&mut self.on, c => c.set_lr(lr), (_ctx, g) => g.set_lr(lr))
    }

    /// Steps run so far, held ones included: the next report's `step`.
    pub fn steps_taken(&self) -> u64 {
        on_backend!(&self.on, c => c.steps_taken(), (_ctx, g) => g.steps_taken())
    }

    /// The optimizer state to save (steps taken, moments).
    pub fn state(&self) -> Result<OptimizerState, ClipError> {
        on_backend!(&self.on, c => Ok(c.state().clone()), (_ctx, g) => g.state())
    }

    /// Restores a saved optimizer state (from either backend).
    pub fn set_state(&mut self, saved: &OptimizerState) -> Result<(), ClipError> {
        on_backend!(&mut self.on, c => c.set_state(saved), (_ctx, g) => g.set_state(saved))
    }

    /// The chain's state to save.
    pub fn clip_state(&self) -> Result<PolicyState, ClipError> {
        on_backend!(&self.on, c => Ok(c.clip_state().clone()), (_ctx, g) => g.clip_state())
    }

    /// Restores a saved chain state (from either backend).
    pub fn set_clip_state(&mut self, saved: &PolicyState) -> Result<(), ClipError> {
        on_backend!(&mut self.on, c => c.set_clip_state(saved), (_ctx, g) => g.set_clip_state(saved))
    }
}

impl<C: Collective> Clipper<Sharded<C>> {
    /// Runs `policy` over the logical tensors `tensors`, of which this rank holds `shard`,
    /// on `backend` (the same on every rank).
    pub fn sharded(
        backend: Backend,
        policy: ClipPolicy,
        tensors: &[TensorInfo],
        shard: Shard,
        comm: C,
    ) -> Result<Clipper<Sharded<C>>, ClipError> {
        match backend {
            Backend::Cpu => Ok(Clipper {
                on: OnBackend::Cpu(CpuClipper::sharded(policy, tensors, shard, comm)?),
            }),
            Backend::Gpu(ctx) => {
                let staged = StagedSharded::new(policy, tensors, shard, comm)?;
                Ok(Clipper {
                    on: OnBackend::Gpu(ctx, Box::new(staged)),
                })
            }
        }
    }

    /// Clips this rank's gradients in place: `grads[t]` holds [`Shard::range`]`(t)` of
    /// tensor `t`; AGC also takes the parameters' same ranges. The report is the whole
    /// step's and the same on every rank.
    pub fn step(
        &mut self,
        grads: &mut [GradMut<'_>],
        params: Option<&[GradRef<'_>]>,
    ) -> Result<ClipReport, ClipError> {
        on_backend!(&mut self.on, c => c.step(grads, params), (ctx, g) => g.step(ctx, grads, params))
    }

    /// This rank's shard.
    pub fn shard(&self) -> &Shard {
        on_backend!(&self.on, c => c.shard(), (_ctx, g) => g.shard())
    }

    /// The collective it exchanges through.
    pub fn collective(&self) -> &C {
        on_backend!(&self.on, c => c.collective(), (_ctx, g) => g.collective())
    }
}
