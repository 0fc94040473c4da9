//! One entry point for gradients in host memory: a hardware GPU if there is one, else the
//! CPU path; a software adapter only when asked for ([`Clipper::on`]).

use crate::chain::{ClipPolicy, PolicyState, Program, TensorInfo};
use crate::cpu::policy::CpuPolicy;
use crate::dtype::{GradMut, GradRef};
use crate::error::ClipError;
use crate::gpu::GpuContext;
use crate::norm::PartialNorm;
use crate::report::ClipReport;

mod staging;

use staging::{shapes_of, GpuChain};

/// Where a [`Clipper`] runs.
#[derive(Debug, Clone)]
pub enum Backend {
    /// A wgpu device.
    Gpu(GpuContext),
    /// The multi-threaded CPU path.
    Cpu,
}

/// The chain a clipper runs, on its backend.
enum Chain {
    Cpu(CpuPolicy),
    Gpu {
        ctx: GpuContext,
        policy: ClipPolicy,
        infos: Vec<TensorInfo>,
        /// Built at the first step, when the element types are known; rebuilt (state
        /// carried over) when they change.
        run: Option<Box<GpuChain>>,
        state: PolicyState,
    },
}

/// Runs a [`ClipPolicy`] over host slices (`Vec<f32>`, `&mut [f16]`, ...) on the best
/// backend there is, step after step, keeping its state. With a GPU, the slices are
/// copied in, clipped there and copied back (for data already on the GPU use
/// [`crate::GpuClipper`] directly).
pub struct Clipper {
    chain: Chain,
}

impl std::fmt::Debug for Clipper {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Clipper")
            .field("backend", &self.describe())
            .finish()
    }
}

impl Clipper {
    /// Runs `policy` over tensors named and shaped by `tensors` on a hardware GPU if there
    /// is one ([`GpuContext::hardware`]), else on the CPU path, which is faster than a
    /// software adapter; [`Clipper::describe`] says which. For a software adapter
    /// (lavapipe, llvmpipe, WARP), ask for it with [`Clipper::on`]. The configuration is
    /// checked here; nothing is built on error.
    pub fn new(policy: ClipPolicy, tensors: &[TensorInfo]) -> Result<Clipper, ClipError> {
        let backend = match GpuContext::hardware() {
            Ok(ctx) => Backend::Gpu(ctx),
            Err(_) => Backend::Cpu,
        };
        Clipper::on(backend, policy, tensors)
    }

    /// [`Clipper::new`] on the given backend.
    pub fn on(
        backend: Backend,
        policy: ClipPolicy,
        tensors: &[TensorInfo],
    ) -> Result<Clipper, ClipError> {
        let chain = match backend {
            Backend::Cpu => Chain::Cpu(CpuPolicy::new(policy, tensors)?),
            Backend::Gpu(ctx) => {
                let state = Program::new(&policy, tensors)?.fresh_state();
                Chain::Gpu {
                    ctx,
                    policy,
                    infos: tensors.to_vec(),
                    run: None,
                    state,
                }
            }
        };
        Ok(Clipper { chain })
    }

    /// The backend in use.
    pub fn backend(&self) -> Backend {
        match &self.chain {
            Chain::Cpu(_) => Backend::Cpu,
            Chain::Gpu { ctx, .. } => Backend::Gpu(ctx.clone()),
        }
    }

    /// A one-line description: the adapter's name, type and API, or "CPU".
    pub fn describe(&self) -> String {
        match &self.chain {
            Chain::Cpu(_) => "CPU (rayon)".to_string(),
            Chain::Gpu { ctx, .. } => match ctx.adapter_info() {
                Some(i) => format!("GPU: {} ({:?}, {:?})", i.name, i.device_type, i.backend),
                None => "GPU: caller's device".to_string(),
            },
        }
    }

    /// The policy it runs.
    pub fn policy(&self) -> &ClipPolicy {
        match &self.chain {
            Chain::Cpu(cpu) => cpu.policy(),
            Chain::Gpu { policy, .. } => policy,
        }
    }

    /// Steps taken so far: the next step's number.
    pub fn steps_taken(&self) -> u64 {
        match &self.chain {
            Chain::Cpu(cpu) => cpu.state().steps_taken(),
            Chain::Gpu { run: Some(r), .. } => r.runner.steps_taken(),
            Chain::Gpu { state, .. } => state.steps_taken(),
        }
    }

    /// One step of the policy over `grads`, in place; AGC also reads `params` (tensor for
    /// tensor). On error the gradients and the state are left as they were.
    pub fn step(
        &mut self,
        grads: &mut [GradMut<'_>],
        params: Option<&[GradRef<'_>]>,
    ) -> Result<ClipReport, ClipError> {
        match &mut self.chain {
            Chain::Cpu(cpu) => cpu.step(grads, params),
            Chain::Gpu { .. } => self.gpu_step(grads, params, None),
        }
    }

    /// One step of a global-norm chain ([`ClipPolicy::global_norm`]) that clips by the
    /// total norm `total` instead of measuring `grads`: the second half of the split API
    /// (see [`crate::CpuClipper::step_with_norm`]). Another chain, or a norm of another
    /// order, is an error that changes nothing.
    pub fn step_with_norm(
        &mut self,
        grads: &mut [GradMut<'_>],
        total: &PartialNorm,
    ) -> Result<ClipReport, ClipError> {
        match &mut self.chain {
            Chain::Cpu(cpu) => cpu.step_with_norm(grads, total),
            Chain::Gpu { policy, .. } => {
                policy.check_given(total)?;
                self.gpu_step(grads, None, Some(total))
            }
        }
    }

    /// A step on the GPU backend: the mirrors (re)built for `grads`, filled, the step run
    /// (with the given total norm, if any) and the result copied back.
    fn gpu_step(
        &mut self,
        grads: &mut [GradMut<'_>],
        params: Option<&[GradRef<'_>]>,
        given: Option<&PartialNorm>,
    ) -> Result<ClipReport, ClipError> {
        let Chain::Gpu {
            ctx,
            policy,
            infos,
            run,
            state,
        } = &mut self.chain
        else {
            unreachable!("a GPU step runs on the GPU backend")
        };
        let refs: Vec<GradRef<'_>> = grads.iter().map(|g| g.as_ref()).collect();
        let lens: Vec<u64> = refs.iter().map(|g| g.len() as u64).collect();
        crate::chain::check_shapes(infos, lens.iter().copied())?;
        let fits = run.as_ref().is_some_and(|r| {
            r.grads.shapes() == shapes_of(&refs)
                && r.params.as_ref().map(|m| m.shapes()) == params.map(shapes_of)
        });
        if !fits {
            if let Some(old) = run.take() {
                *state = old.runner.state()?;
            }
            *run = Some(Box::new(GpuChain::new(
                ctx, policy, infos, state, &refs, params,
            )?));
        }
        let run = run.as_mut().expect("built above");
        run.grads.write(ctx, &refs);
        if let (Some(m), Some(p)) = (&run.params, params) {
            m.write(ctx, p);
        }
        let report = match given {
            Some(total) => run.runner.step_with_norm(total)?.wait()?,
            None => run.runner.step()?.wait()?,
        };
        run.grads.read(ctx, grads)?;
        Ok(report)
    }

    /// The state to save (see [`PolicyState::to_bytes`]): step counter, adaptive history,
    /// skip counter. The same layout on every backend.
    pub fn state(&self) -> Result<PolicyState, ClipError> {
        match &self.chain {
            Chain::Cpu(cpu) => Ok(cpu.state().clone()),
            Chain::Gpu { run: Some(r), .. } => r.runner.state(),
            Chain::Gpu { state, .. } => Ok(state.clone()),
        }
    }

    /// Restores a saved state (from either backend); the next step continues from it.
    pub fn set_state(&mut self, saved: &PolicyState) -> Result<(), ClipError> {
        match &mut self.chain {
            Chain::Cpu(cpu) => cpu.set_state(saved.clone()),
            Chain::Gpu { run: Some(r), .. } => r.runner.set_state(saved),
            Chain::Gpu { state, .. } => {
                saved.check_fits(state)?;
                *state = saved.clone();
                Ok(())
            }
        }
    }
}
