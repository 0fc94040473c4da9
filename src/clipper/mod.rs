//! One entry point for gradients in host memory: a hardware GPU if there is one, else the
//! CPU path; a software adapter only when asked for ([`Clipper::on`]).

use crate::chain::{ClipPolicy, PolicyState, Program, TensorInfo};
use crate::cpu::{self, policy::CpuPolicy};
use crate::dtype::{GradMut, GradRef};
use crate::error::ClipError;
use crate::gpu::{GpuBatch, GpuContext};
use crate::non_finite::NonFinitePolicy;
use crate::norm::{Norm, PartialNorm};
use crate::ops::{GlobalNormClip, ValueClip};
use crate::report::ClipReport;

mod staging;

use staging::{combine_norms, shapes_of, GpuChain, Streamed};

/// Where a [`Clipper`] runs.
#[derive(Debug, Clone)]
pub enum Backend {
    /// A wgpu device.
    Gpu(GpuContext),
    /// The multi-threaded CPU path.
    Cpu,
}

/// The chain a clipper runs ([`Clipper::with_policy`]).
enum Chain {
    Cpu(CpuPolicy),
    Gpu {
        policy: ClipPolicy,
        infos: Vec<TensorInfo>,
        /// Built at the first step, when the element types are known; rebuilt (state
        /// carried over) when they change.
        run: Option<Box<GpuChain>>,
        state: PolicyState,
    },
}

/// Clips host slices on the best available backend. With a GPU, the slices are copied
/// in, clipped there and copied back (for data already on the GPU use [`GpuBatch`] or
/// [`GpuPolicy`] directly). Any [`ClipPolicy`] runs through [`Clipper::with_policy`] and
/// [`Clipper::step`]; the one-shot global operations need no setup.
pub struct Clipper {
    backend: Backend,
    global: Option<Streamed>,
    chain: Option<Chain>,
    /// Global clips so far: the next one's report number.
    global_steps: u64,
}

impl std::fmt::Debug for Clipper {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Clipper")
            .field("backend", &self.describe())
            .finish()
    }
}

impl Default for Clipper {
    fn default() -> Self {
        Clipper::new()
    }
}

impl Clipper {
    /// A hardware GPU if there is one ([`GpuContext::hardware`]), else the CPU path, which
    /// is faster than a software adapter; [`Clipper::describe`] says which. For a software
    /// adapter (lavapipe, llvmpipe, WARP), ask for it:
    /// `Clipper::on(Backend::Gpu(GpuContext::new()?))`.
    pub fn new() -> Clipper {
        match GpuContext::hardware() {
            Ok(ctx) => Clipper::on(Backend::Gpu(ctx)),
            Err(_) => Clipper::on(Backend::Cpu),
        }
    }

    /// A clipper on the given backend.
    pub fn on(backend: Backend) -> Clipper {
        Clipper {
            backend,
            global: None,
            global_steps: 0,
            chain: None,
        }
    }

    /// Runs `policy` over tensors named and shaped by `tensors` at every
    /// [`Clipper::step`]. The configuration is checked here; nothing is built on error.
    pub fn with_policy(
        mut self,
        policy: ClipPolicy,
        tensors: &[TensorInfo],
    ) -> Result<Clipper, ClipError> {
        self.chain = Some(match &self.backend {
            Backend::Cpu => Chain::Cpu(CpuPolicy::new(policy, tensors)?),
            Backend::Gpu(_) => {
                let state = Program::new(&policy, tensors)?.fresh_state();
                Chain::Gpu {
                    policy,
                    infos: tensors.to_vec(),
                    run: None,
                    state,
                }
            }
        });
        Ok(self)
    }

    /// The backend in use.
    pub fn backend(&self) -> &Backend {
        &self.backend
    }

    /// A one-line description: the adapter's name, type and API, or "CPU".
    pub fn describe(&self) -> String {
        match &self.backend {
            Backend::Cpu => "CPU (rayon)".to_string(),
            Backend::Gpu(ctx) => match ctx.adapter_info() {
                Some(i) => format!("GPU: {} ({:?}, {:?})", i.name, i.device_type, i.backend),
                None => "GPU: caller's device".to_string(),
            },
        }
    }

    /// One step of the policy set by [`Clipper::with_policy`] over `grads`, in place;
    /// AGC also reads `params` (tensor for tensor). On error the gradients and the state
    /// are left as they were.
    pub fn step(
        &mut self,
        grads: &mut [GradMut<'_>],
        params: Option<&[GradRef<'_>]>,
    ) -> Result<ClipReport, ClipError> {
        let Some(chain) = &mut self.chain else {
            return Err(ClipError::InvalidConfig(
                "no policy to step: build the clipper with Clipper::with_policy".into(),
            ));
        };
        let (ctx, policy, infos, run, state) = match (chain, &self.backend) {
            (Chain::Cpu(cpu), _) => return cpu.step(grads, params),
            (
                Chain::Gpu {
                    policy,
                    infos,
                    run,
                    state,
                },
                Backend::Gpu(ctx),
            ) => (ctx, policy, infos, run, state),
            (Chain::Gpu { .. }, Backend::Cpu) => unreachable!("a GPU chain has a GPU backend"),
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
        let report = run.runner.step()?.wait()?;
        run.grads.read(ctx, grads)?;
        Ok(report)
    }

    /// The saved state of the policy ([`Clipper::with_policy`]): step counter, adaptive
    /// history, skip counter. The same layout on every backend.
    pub fn policy_state(&self) -> Result<PolicyState, ClipError> {
        match &self.chain {
            None => Err(ClipError::InvalidConfig("the clipper has no policy".into())),
            Some(Chain::Cpu(cpu)) => Ok(cpu.state().clone()),
            Some(Chain::Gpu { run: Some(r), .. }) => r.runner.state(),
            Some(Chain::Gpu { state, .. }) => Ok(state.clone()),
        }
    }

    /// Restores a saved state (from either backend) into the policy.
    pub fn set_policy_state(&mut self, saved: &PolicyState) -> Result<(), ClipError> {
        match &mut self.chain {
            None => Err(ClipError::InvalidConfig("the clipper has no policy".into())),
            Some(Chain::Cpu(cpu)) => cpu.set_state(saved.clone()),
            Some(Chain::Gpu { run: Some(r), .. }) => r.runner.set_state(saved),
            Some(Chain::Gpu { state, .. }) => {
                saved.check_fits(state)?;
                *state = saved.clone();
                Ok(())
            }
        }
    }

    /// The total norm of host tensors, in mergeable form.
    pub fn total_norm(
        &mut self,
        grads: &[GradRef<'_>],
        norm: Norm,
    ) -> Result<PartialNorm, ClipError> {
        if let Backend::Cpu = self.backend {
            return cpu::partial_norm(grads, norm);
        }
        norm.validate()?;
        let streamed = self.upload(grads)?;
        let mut total = PartialNorm::zero(norm);
        for batch in &mut streamed.batches {
            total = total.combine(&batch.total_norm(norm, false)?.wait()?.partial)?;
        }
        Ok(total)
    }

    /// Global-norm clipping of host tensors, in place (PyTorch `clip_grad_norm_`). Host
    /// data larger than one device buffer streams through several: their norms are
    /// combined, then each part is clipped with the total.
    pub fn clip_by_global_norm(
        &mut self,
        grads: &mut [GradMut<'_>],
        clip: &GlobalNormClip,
    ) -> Result<ClipReport, ClipError> {
        let (report, norms) = self.global_clip(grads, clip)?;
        Ok(self.numbered(report, grads.len(), norms))
    }

    /// The next global report's number, and the report of the whole batch.
    fn numbered(
        &mut self,
        report: ClipReport,
        tensors: usize,
        norms: Option<Vec<f64>>,
    ) -> ClipReport {
        let step = self.global_steps;
        self.global_steps += 1;
        report.for_batch(step, tensors as u32, norms)
    }

    /// The global clip's report and, when host data streamed through several buffers, the
    /// per-tensor norms combined from its parts (else the report has them).
    fn global_clip(
        &mut self,
        grads: &mut [GradMut<'_>],
        clip: &GlobalNormClip,
    ) -> Result<(ClipReport, Option<Vec<f64>>), ClipError> {
        if let Backend::Cpu = self.backend {
            return Ok((cpu::clip_by_global_norm(grads, clip)?, None));
        }
        clip.validate()?;
        let refs: Vec<GradRef<'_>> = grads.iter().map(|g| g.as_ref()).collect();
        if self.prepare(&refs)?.batches.len() == 1 {
            let report = self.round_trip(grads, true, |b| b.clip_by_global_norm(clip)?.wait())?;
            return Ok((report, None));
        }
        // Parts: the total (and per-part norms), then the clip of every part with it.
        let streamed = self.upload(&refs)?;
        let mut total = PartialNorm::zero(clip.norm);
        let mut per_tensor = vec![0.0f64; refs.len()];
        let parts = streamed.mirrors.groups.iter().zip(&mut streamed.batches);
        for ((pieces, _), batch) in parts {
            let r = batch.total_norm(clip.norm, clip.tensor_norms)?.wait()?;
            total = total.combine(&r.partial)?;
            for (&(t, _, _), n) in pieces.iter().zip(r.tensors.unwrap_or_default()) {
                per_tensor[t] = combine_norms(clip.norm, per_tensor[t], n.norm);
            }
        }
        let report = self.round_trip(grads, false, |b| {
            b.clip_with_norm(clip.max_norm, &total, clip.non_finite)?
                .wait()
        })?;
        Ok((report, clip.tensor_norms.then_some(per_tensor)))
    }

    /// Clipping host tensors with a norm computed elsewhere (the split API).
    pub fn clip_with_norm(
        &mut self,
        grads: &mut [GradMut<'_>],
        max_norm: f32,
        total: &PartialNorm,
        policy: NonFinitePolicy,
    ) -> Result<ClipReport, ClipError> {
        let report = match self.backend {
            Backend::Cpu => cpu::clip_with_norm(grads, max_norm, total, policy),
            Backend::Gpu(_) => self.round_trip(grads, true, |b| {
                b.clip_with_norm(max_norm, total, policy)?.wait()
            }),
        }?;
        Ok(self.numbered(report, grads.len(), None))
    }

    /// Value clipping of host tensors, in place (PyTorch `clip_grad_value_`).
    pub fn clip_by_value(
        &mut self,
        grads: &mut [GradMut<'_>],
        clip: &ValueClip,
    ) -> Result<(), ClipError> {
        match self.backend {
            Backend::Cpu => cpu::clip_by_value(grads, clip),
            Backend::Gpu(_) => self.round_trip(grads, true, |b| b.clip_by_value(clip)),
        }
    }

    /// Uploads (unless the device holds the data already), runs `op` on the batch of every
    /// part, and when every part succeeded copies them all back (so an error leaves the
    /// host data as it was); returns the first part's result.
    fn round_trip<T>(
        &mut self,
        grads: &mut [GradMut<'_>],
        upload: bool,
        mut op: impl FnMut(&mut GpuBatch) -> Result<T, ClipError>,
    ) -> Result<T, ClipError> {
        let refs: Vec<GradRef<'_>> = grads.iter().map(|g| g.as_ref()).collect();
        let streamed = if upload {
            self.upload(&refs)?
        } else {
            self.prepare(&refs)?
        };
        let mut first = None;
        for batch in &mut streamed.batches {
            let out = op(batch)?;
            first.get_or_insert(out);
        }
        let (Backend::Gpu(ctx), Some(streamed)) = (&self.backend, &self.global) else {
            unreachable!("round_trip runs on the GPU backend, after an upload")
        };
        streamed.mirrors.read(ctx, grads)?;
        Ok(first.expect("at least one part"))
    }

    /// The mirrors of the global operations for tensors like `grads`, built (with their
    /// batches) when the types or lengths changed.
    fn prepare(&mut self, grads: &[GradRef<'_>]) -> Result<&mut Streamed, ClipError> {
        let Backend::Gpu(ctx) = &self.backend else {
            unreachable!("the mirrors live on the GPU backend")
        };
        let shapes = shapes_of(grads);
        if self.global.as_ref().map(|s| &s.shapes) != Some(&shapes) {
            self.global = None;
            self.global = Some(Streamed::new(ctx, shapes)?);
        }
        Ok(self.global.as_mut().expect("built above"))
    }

    /// Copies host tensors into the mirrors of the global operations.
    fn upload(&mut self, grads: &[GradRef<'_>]) -> Result<&mut Streamed, ClipError> {
        self.prepare(grads)?;
        let (Backend::Gpu(ctx), Some(streamed)) = (&self.backend, &mut self.global) else {
            unreachable!("prepared above")
        };
        streamed.mirrors.write(ctx, grads);
        Ok(streamed)
    }
}
