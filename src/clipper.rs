//! One entry point for host data that runs on the best backend available: a hardware GPU,
//! else a software GPU adapter, else the CPU path.

use crate::cpu;
use crate::dtype::{DType, GradMut, GradRef};
use crate::error::ClipError;
use crate::gpu::{GpuBatch, GpuContext, GpuTensor};
use crate::non_finite::NonFinitePolicy;
use crate::norm::{Norm, PartialNorm};
use crate::ops::{GlobalNormClip, ValueClip};
use crate::report::ClipReport;

/// Where a [`Clipper`] runs.
#[derive(Debug, Clone)]
pub enum Backend {
    /// A wgpu device.
    Gpu(GpuContext),
    /// The multi-threaded CPU path.
    Cpu,
}

/// The batch of host tensors last sent to the GPU, kept while shapes stay the same so a
/// training loop reuses its buffers and plan.
struct HostArena {
    shapes: Vec<(DType, usize)>,
    offsets: Vec<u64>,
    buffer: wgpu::Buffer,
    staging: wgpu::Buffer,
    batch: GpuBatch,
}

/// Clips host slices on the best available backend. With a GPU, the slices are copied in,
/// clipped there and copied back (for data already on the GPU use [`GpuBatch`] directly).
pub struct Clipper {
    backend: Backend,
    arena: Option<HostArena>,
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
    /// A hardware GPU if there is one, else a software adapter, else the CPU path;
    /// [`Clipper::describe`] says which.
    pub fn new() -> Clipper {
        match GpuContext::new() {
            Ok(ctx) => Clipper::on(Backend::Gpu(ctx)),
            Err(_) => Clipper::on(Backend::Cpu),
        }
    }

    /// A clipper on the given backend.
    pub fn on(backend: Backend) -> Clipper {
        Clipper {
            backend,
            arena: None,
        }
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

    /// The total norm of host tensors, in mergeable form.
    pub fn total_norm(
        &mut self,
        grads: &[GradRef<'_>],
        norm: Norm,
    ) -> Result<PartialNorm, ClipError> {
        match self.backend {
            Backend::Cpu => cpu::partial_norm(grads, norm),
            Backend::Gpu(_) => {
                let arena = self.upload(grads)?;
                Ok(arena.batch.total_norm(norm, false)?.wait()?.partial)
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
        let arena = self.upload(&refs)?;
        let out = op(&mut arena.batch)?;
        let Backend::Gpu(ctx) = &self.backend else {
            unreachable!("round_trip runs on the GPU backend")
        };
        let arena = self.arena.as_ref().expect("uploaded above");
        let mut encoder = ctx.device().create_command_encoder(&Default::default());
        encoder.copy_buffer_to_buffer(&arena.buffer, 0, &arena.staging, 0, arena.staging.size());
        ctx.queue().submit([encoder.finish()]);
        arena.staging.map_async(wgpu::MapMode::Read, .., |_| {});
        ctx.device()
            .poll(wgpu::PollType::wait_indefinitely())
            .map_err(|e| ClipError::Readback(e.to_string()))?;
        {
            let view = arena
                .staging
                .get_mapped_range(..)
                .map_err(|e| ClipError::Readback(e.to_string()))?;
            for (g, &o) in grads.iter_mut().zip(&arena.offsets) {
                let dst = g.as_bytes_mut();
                let n = dst.len();
                dst.copy_from_slice(&view[o as usize..o as usize + n]);
            }
        }
        arena.staging.unmap();
        Ok(out)
    }

    /// Copies host tensors into the arena, building it when the shapes changed.
    fn upload(&mut self, grads: &[GradRef<'_>]) -> Result<&mut HostArena, ClipError> {
        let Backend::Gpu(ctx) = &self.backend else {
            unreachable!("upload runs on the GPU backend")
        };
        let shapes: Vec<(DType, usize)> = grads.iter().map(|g| (g.dtype(), g.len())).collect();
        if self.arena.as_ref().map(|a| &a.shapes) != Some(&shapes) {
            self.arena = None;
            let mut offsets = Vec::with_capacity(grads.len());
            let mut at = 0u64;
            for g in grads {
                // 4-byte aligned starts keep f16 and bf16 tensors in words of their own.
                at = at.next_multiple_of(4);
                offsets.push(at);
                at += g.len() as u64 * g.dtype().size();
            }
            let size = at.next_multiple_of(4).max(4);
            let buffer = ctx.device().create_buffer(&wgpu::BufferDescriptor {
                label: Some("gradclip host arena"),
                size,
                usage: wgpu::BufferUsages::STORAGE
                    | wgpu::BufferUsages::COPY_DST
                    | wgpu::BufferUsages::COPY_SRC,
                mapped_at_creation: false,
            });
            let staging = ctx.device().create_buffer(&wgpu::BufferDescriptor {
                label: Some("gradclip host arena readback"),
                size,
                usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
                mapped_at_creation: false,
            });
            let tensors: Vec<GpuTensor<'_>> = grads
                .iter()
                .zip(&offsets)
                .map(|(g, &o)| GpuTensor::new(&buffer, o, g.len() as u64, g.dtype()))
                .collect();
            let batch = GpuBatch::new(ctx, &tensors)?;
            self.arena = Some(HostArena {
                shapes,
                offsets,
                buffer,
                staging,
                batch,
            });
        }
        let arena = self.arena.as_mut().expect("built above");
        for (g, &o) in grads.iter().zip(&arena.offsets) {
            let bytes = g.as_bytes();
            // write_buffer needs 4-byte multiples: an odd 16-bit tensor is padded with a zero.
            if bytes.len() % 4 == 0 {
                ctx.queue().write_buffer(&arena.buffer, o, bytes);
            } else {
                let mut padded = bytes.to_vec();
                padded.resize(bytes.len().next_multiple_of(4), 0);
                ctx.queue().write_buffer(&arena.buffer, o, &padded);
            }
        }
        Ok(arena)
    }
}
