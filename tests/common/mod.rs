//! Shared helpers of the integration tests: a GPU context (tests fail, never skip, when
//! no adapter exists) and upload/download of host tensors into one arena buffer.
#![allow(dead_code)]

use gradclip::{bf16, f16, GpuBatch, GpuContext, GpuTensor, GradMut, GradRef};
use std::sync::OnceLock;

/// The test GPU. Panics when no adapter exists: in CI the GPU tests must run (lavapipe).
pub fn gpu() -> GpuContext {
    static CTX: OnceLock<GpuContext> = OnceLock::new();
    CTX.get_or_init(|| {
        GpuContext::new().unwrap_or_else(|e| {
            panic!("GPU tests need a wgpu adapter (apt-get install mesa-vulkan-drivers): {e}")
        })
    })
    .clone()
}

/// Host tensors of mixed dtypes.
#[derive(Debug, Clone, PartialEq)]
pub enum Host {
    F32(Vec<f32>),
    F16(Vec<f16>),
    BF16(Vec<bf16>),
}

impl Host {
    pub fn as_ref(&self) -> GradRef<'_> {
        match self {
            Host::F32(v) => GradRef::F32(v),
            Host::F16(v) => GradRef::F16(v),
            Host::BF16(v) => GradRef::BF16(v),
        }
    }
    pub fn as_mut(&mut self) -> GradMut<'_> {
        match self {
            Host::F32(v) => GradMut::F32(v),
            Host::F16(v) => GradMut::F16(v),
            Host::BF16(v) => GradMut::BF16(v),
        }
    }
    pub fn to_f64(&self) -> Vec<f64> {
        match self {
            Host::F32(v) => v.iter().map(|&x| x as f64).collect(),
            Host::F16(v) => v.iter().map(|&x| x.to_f64()).collect(),
            Host::BF16(v) => v.iter().map(|&x| x.to_f64()).collect(),
        }
    }
}

pub fn refs(h: &[Host]) -> Vec<GradRef<'_>> {
    h.iter().map(|t| t.as_ref()).collect()
}
pub fn muts(h: &mut [Host]) -> Vec<GradMut<'_>> {
    h.iter_mut().map(|t| t.as_mut()).collect()
}

/// The tensors packed back to back (each at the next offset its dtype allows) in one
/// storage buffer, as a training program's gradient arena.
pub struct Arena {
    pub buffer: wgpu::Buffer,
    pub offsets: Vec<u64>,
    pub size: u64,
}

pub fn layout(h: &[Host], gap: u64) -> (Vec<u64>, u64) {
    let mut offsets = Vec::new();
    let mut at = 0u64;
    let mut prev = None;
    for t in h {
        let r = t.as_ref();
        // Same-dtype neighbours pack tightly (two tensors may share a 32-bit word); a change
        // of dtype starts a new word, which the library requires between f16 and bf16.
        let align = if prev == Some(r.dtype()) {
            r.dtype().size()
        } else {
            4
        };
        prev = Some(r.dtype());
        at = at.next_multiple_of(align);
        offsets.push(at);
        at += r.len() as u64 * r.dtype().size() + gap;
    }
    (offsets, at.next_multiple_of(4).max(4))
}

pub fn upload(ctx: &GpuContext, h: &[Host]) -> Arena {
    let (offsets, size) = layout(h, 0);
    let mut bytes = vec![0u8; size as usize];
    for (t, &o) in h.iter().zip(&offsets) {
        let b = t.as_ref();
        let b = b.as_bytes();
        bytes[o as usize..o as usize + b.len()].copy_from_slice(b);
    }
    use wgpu::util::DeviceExt;
    let buffer = ctx
        .device()
        .create_buffer_init(&wgpu::util::BufferInitDescriptor {
            label: Some("test arena"),
            contents: &bytes,
            usage: wgpu::BufferUsages::STORAGE
                | wgpu::BufferUsages::COPY_SRC
                | wgpu::BufferUsages::COPY_DST,
        });
    Arena {
        buffer,
        offsets,
        size,
    }
}

pub fn batch(ctx: &GpuContext, arena: &Arena, h: &[Host]) -> GpuBatch {
    let tensors: Vec<GpuTensor<'_>> = h
        .iter()
        .zip(&arena.offsets)
        .map(|(t, &o)| {
            GpuTensor::new(
                &arena.buffer,
                o,
                t.as_ref().len() as u64,
                t.as_ref().dtype(),
            )
        })
        .collect();
    GpuBatch::new(ctx, &tensors).expect("valid batch")
}

pub fn read_bytes(ctx: &GpuContext, buffer: &wgpu::Buffer, size: u64) -> Vec<u8> {
    let staging = ctx.device().create_buffer(&wgpu::BufferDescriptor {
        label: None,
        size,
        usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
        mapped_at_creation: false,
    });
    let mut enc = ctx.device().create_command_encoder(&Default::default());
    enc.copy_buffer_to_buffer(buffer, 0, &staging, 0, size);
    ctx.queue().submit([enc.finish()]);
    staging.map_async(wgpu::MapMode::Read, .., |r| r.expect("map"));
    ctx.device()
        .poll(wgpu::PollType::wait_indefinitely())
        .expect("poll");
    let out = staging.get_mapped_range(..).expect("mapped").to_vec();
    staging.unmap();
    out
}

/// Downloads the arena back into host tensors of the same shapes.
pub fn download(ctx: &GpuContext, arena: &Arena, like: &[Host]) -> Vec<Host> {
    let bytes = read_bytes(ctx, &arena.buffer, arena.size);
    like.iter()
        .zip(&arena.offsets)
        .map(|(t, &o)| {
            let n = t.as_ref().len();
            let o = o as usize;
            match t {
                Host::F32(_) => Host::F32(bytemuck::pod_collect_to_vec(&bytes[o..o + 4 * n])),
                Host::F16(_) => Host::F16(bytemuck::pod_collect_to_vec(&bytes[o..o + 2 * n])),
                Host::BF16(_) => Host::BF16(bytemuck::pod_collect_to_vec(&bytes[o..o + 2 * n])),
            }
        })
        .collect()
}

/// Relative closeness with an absolute floor.
pub fn close(a: f64, b: f64, rel: f64) -> bool {
    if a.is_nan() || b.is_nan() {
        return a.is_nan() && b.is_nan();
    }
    if a.is_infinite() || b.is_infinite() {
        return a == b;
    }
    (a - b).abs() <= rel * a.abs().max(b.abs()) + 1e-37
}
