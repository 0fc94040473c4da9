//! One entry point for gradients in host memory: a hardware GPU if there is one, else the
//! CPU path; a software adapter only when asked for ([`Clipper::on`]).

use crate::chain::{ClipPolicy, PolicyState, Program, TensorInfo};
use crate::cpu::{self, CpuPolicy};
use crate::dtype::{DType, GradMut, GradRef};
use crate::error::ClipError;
use crate::gpu::{GpuBatch, GpuContext, GpuPolicy, GpuTensor};
use crate::non_finite::NonFinitePolicy;
use crate::norm::{Norm, PartialNorm};
use crate::ops::{GlobalNormClip, ValueClip};
use crate::report::{ClipReport, PolicyReport};

/// Where a [`Clipper`] runs.
#[derive(Debug, Clone)]
pub enum Backend {
    /// A wgpu device.
    Gpu(GpuContext),
    /// The multi-threaded CPU path.
    Cpu,
}

/// Host tensors mirrored in one device buffer (and its readback buffer), kept while their
/// types and lengths stay the same so a training loop reuses buffers and plans.
struct Mirror {
    shapes: Vec<(DType, usize)>,
    offsets: Vec<u64>,
    buffer: wgpu::Buffer,
    staging: wgpu::Buffer,
}

fn shapes_of(grads: &[GradRef<'_>]) -> Vec<(DType, usize)> {
    grads.iter().map(|g| (g.dtype(), g.len())).collect()
}

impl Mirror {
    /// Buffers for tensors of these types and lengths; a batch larger than one device
    /// buffer may be is a typed error, not a failed allocation.
    fn new(ctx: &GpuContext, shapes: Vec<(DType, usize)>) -> Result<Mirror, ClipError> {
        let mut offsets = Vec::with_capacity(shapes.len());
        let mut at = 0u64;
        for &(dtype, len) in &shapes {
            // 4-byte aligned starts keep f16 and bf16 tensors in words of their own.
            at = at.next_multiple_of(4);
            offsets.push(at);
            at += len as u64 * dtype.size();
        }
        let size = at.next_multiple_of(4).max(4);
        let limit = ctx.device().limits().max_buffer_size;
        if size > limit {
            return Err(ClipError::TooLarge {
                tensor: format!("all host tensors ({size} bytes; a buffer holds {limit})"),
                len: shapes.iter().map(|&(_, n)| n as u64).sum(),
            });
        }
        let buffer = |label, usage| {
            ctx.device().create_buffer(&wgpu::BufferDescriptor {
                label: Some(label),
                size,
                usage,
                mapped_at_creation: false,
            })
        };
        use wgpu::BufferUsages as U;
        Ok(Mirror {
            shapes,
            offsets,
            buffer: buffer(
                "gradclip host mirror",
                U::STORAGE | U::COPY_DST | U::COPY_SRC,
            ),
            staging: buffer("gradclip host readback", U::MAP_READ | U::COPY_DST),
        })
    }

    /// The mirrored tensors, named and shaped by `infos` where given.
    fn tensors(&self, infos: Option<&[TensorInfo]>) -> Vec<GpuTensor<'_>> {
        (self.shapes.iter().zip(&self.offsets).enumerate())
            .map(|(i, (&(dtype, len), &o))| {
                let t = GpuTensor::new(&self.buffer, o, len as u64, dtype);
                match infos.and_then(|infos| infos.get(i)) {
                    Some(info) => t.named(info.name.clone()).shaped(&info.shape),
                    None => t,
                }
            })
            .collect()
    }

    /// Copies host tensors in.
    fn write(&self, ctx: &GpuContext, grads: &[GradRef<'_>]) {
        for (g, &o) in grads.iter().zip(&self.offsets) {
            let bytes = g.as_bytes();
            // write_buffer needs 4-byte multiples: an odd 16-bit tensor is padded with a zero.
            if bytes.len() % 4 == 0 {
                ctx.queue().write_buffer(&self.buffer, o, bytes);
            } else {
                let mut padded = bytes.to_vec();
                padded.resize(bytes.len().next_multiple_of(4), 0);
                ctx.queue().write_buffer(&self.buffer, o, &padded);
            }
        }
    }

    /// Copies the device's tensors back into `grads`.
    fn read(&self, ctx: &GpuContext, grads: &mut [GradMut<'_>]) -> Result<(), ClipError> {
        let mut encoder = ctx.device().create_command_encoder(&Default::default());
        encoder.copy_buffer_to_buffer(&self.buffer, 0, &self.staging, 0, self.staging.size());
        ctx.submit(encoder)?;
        self.staging.map_async(wgpu::MapMode::Read, .., |_| {});
        ctx.device()
            .poll(wgpu::PollType::wait_indefinitely())
            .map_err(|e| ClipError::Readback(e.to_string()))?;
        {
            let view = (self.staging.get_mapped_range(..))
                .map_err(|e| ClipError::Readback(e.to_string()))?;
            for (g, &o) in grads.iter_mut().zip(&self.offsets) {
                let dst = g.as_bytes_mut();
                let n = dst.len();
                dst.copy_from_slice(&view[o as usize..o as usize + n]);
            }
        }
        self.staging.unmap();
        Ok(())
    }
}

/// A chain on the GPU over mirrored host tensors (and their parameters, for AGC).
struct GpuChain {
    grads: Mirror,
    params: Option<Mirror>,
    runner: GpuPolicy,
}

impl GpuChain {
    /// Mirrors for tensors like `grads` (and `params`) and `policy` planned over them,
    /// starting from `state`.
    fn new(
        ctx: &GpuContext,
        policy: &ClipPolicy,
        infos: &[TensorInfo],
        state: &PolicyState,
        grads: &[GradRef<'_>],
        params: Option<&[GradRef<'_>]>,
    ) -> Result<GpuChain, ClipError> {
        let grads = Mirror::new(ctx, shapes_of(grads))?;
        let params = params.map(|p| Mirror::new(ctx, shapes_of(p))).transpose()?;
        let tensors = grads.tensors(Some(infos));
        let param_tensors = params.as_ref().map(|m| m.tensors(Some(infos)));
        let mut runner = GpuPolicy::new(ctx, &tensors, param_tensors.as_deref(), policy.clone())?;
        runner.set_state(state)?;
        Ok(GpuChain {
            grads,
            params,
            runner,
        })
    }
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
    batch: Option<(Mirror, GpuBatch)>,
    chain: Option<Chain>,
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
            batch: None,
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
    ) -> Result<PolicyReport, ClipError> {
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
        crate::chain::check_shapes(infos, &lens)?;
        let fits = run.as_ref().is_some_and(|r| {
            r.grads.shapes == shapes_of(&refs)
                && r.params.as_ref().map(|m| &m.shapes) == params.map(shapes_of).as_ref()
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
        let report = run.runner.run()?.wait()?;
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
        match self.backend {
            Backend::Cpu => cpu::partial_norm(grads, norm),
            Backend::Gpu(_) => {
                let batch = self.upload(grads)?;
                Ok(batch.total_norm(norm, false)?.wait()?.partial)
            }
        }
    }

    /// Global-norm clipping of host tensors, in place (PyTorch `clip_grad_norm_`).
    pub fn clip_by_global_norm(
        &mut self,
        grads: &mut [GradMut<'_>],
        clip: &GlobalNormClip,
    ) -> Result<ClipReport, ClipError> {
        match self.backend {
            Backend::Cpu => cpu::clip_by_global_norm(grads, clip),
            Backend::Gpu(_) => self.round_trip(grads, |b| b.clip_by_global_norm(clip)?.wait()),
        }
    }

    /// Clipping host tensors with a norm computed elsewhere (the split API).
    pub fn clip_with_norm(
        &mut self,
        grads: &mut [GradMut<'_>],
        max_norm: f32,
        total: &PartialNorm,
        policy: NonFinitePolicy,
    ) -> Result<ClipReport, ClipError> {
        match self.backend {
            Backend::Cpu => cpu::clip_with_norm(grads, max_norm, total, policy),
            Backend::Gpu(_) => {
                self.round_trip(grads, |b| b.clip_with_norm(max_norm, total, policy)?.wait())
            }
        }
    }

    /// Value clipping of host tensors, in place (PyTorch `clip_grad_value_`).
    pub fn clip_by_value(
        &mut self,
        grads: &mut [GradMut<'_>],
        clip: &ValueClip,
    ) -> Result<(), ClipError> {
        match self.backend {
            Backend::Cpu => cpu::clip_by_value(grads, clip),
            Backend::Gpu(_) => self.round_trip(grads, |b| b.clip_by_value(clip)),
        }
    }

    /// Uploads, runs `op` on the GPU batch, and copies the result back when `op` succeeded.
    fn round_trip<T>(
        &mut self,
        grads: &mut [GradMut<'_>],
        op: impl FnOnce(&mut GpuBatch) -> Result<T, ClipError>,
    ) -> Result<T, ClipError> {
        let refs: Vec<GradRef<'_>> = grads.iter().map(|g| g.as_ref()).collect();
        let out = op(self.upload(&refs)?)?;
        let (Backend::Gpu(ctx), Some((mirror, _))) = (&self.backend, &self.batch) else {
            unreachable!("round_trip runs on the GPU backend, after an upload")
        };
        mirror.read(ctx, grads)?;
        Ok(out)
    }

    /// Copies host tensors into the mirror of the global operations, building it (and
    /// its batch) when the types or lengths changed.
    fn upload(&mut self, grads: &[GradRef<'_>]) -> Result<&mut GpuBatch, ClipError> {
        let Backend::Gpu(ctx) = &self.backend else {
            unreachable!("upload runs on the GPU backend")
        };
        let shapes = shapes_of(grads);
        if self.batch.as_ref().map(|(m, _)| &m.shapes) != Some(&shapes) {
            self.batch = None;
            let mirror = Mirror::new(ctx, shapes)?;
            let batch = GpuBatch::new(ctx, &mirror.tensors(None))?;
            self.batch = Some((mirror, batch));
        }
        let (mirror, batch) = self.batch.as_mut().expect("built above");
        mirror.write(ctx, grads);
        Ok(batch)
    }
}
