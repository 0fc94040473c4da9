//! Shared helpers of the integration tests: a GPU context (tests fail, never skip, when
//! no adapter exists) and upload/download of host tensors into one arena buffer.
#![allow(dead_code)]

use gradclip::{
    bf16, f16, Agc, AutoClip, BlockRmsClip, ClipPolicy, ClipReport, CpuClipper, GpuClipper,
    GpuContext, GpuTensor, GradMut, GradRef, GroupClip, Norm, PerTensorClip, Rule, TensorInfo,
    UnitAxis, ZClip,
};
pub mod sharded;

use std::cell::Cell;
use std::sync::{Mutex, MutexGuard, OnceLock};

/// The backends the test GPU comes from: `GpuContext::new`'s, else GL (a fresh machine
/// with Mesa's GL and no Vulkan driver), which tests then use one at a time.
pub fn backends() -> wgpu::Backends {
    static BACKENDS: OnceLock<wgpu::Backends> = OnceLock::new();
    *BACKENDS.get_or_init(|| match GpuContext::new() {
        Ok(_) => GpuContext::default_backends(),
        Err(_) => wgpu::Backends::GL,
    })
}

/// The test GPU, held for the caller's scope. Panics when no adapter exists: in CI the GPU
/// tests must run (lavapipe). On a GL device the holders take turns, across threads,
/// because wgpu's GL backend panics when two threads use its context at once.
pub fn gpu() -> Gpu {
    static CTX: OnceLock<GpuContext> = OnceLock::new();
    let ctx = CTX
        .get_or_init(|| {
            let ctx = GpuContext::with_backends(backends()).unwrap_or_else(|e| {
                panic!("GPU tests need a wgpu adapter (apt-get install mesa-vulkan-drivers): {e}")
            });
            if let Some(i) = ctx.adapter_info() {
                eprintln!("GPU tests on {} ({:?})", i.name, i.backend);
            }
            ctx
        })
        .clone();
    let gl = ctx
        .adapter_info()
        .is_some_and(|i| i.backend == wgpu::Backend::Gl);
    Gpu::hold(ctx, gl)
}

/// A test's hold on the GPU (see [`gpu`]): derefs to the context; re-entrant per thread.
pub struct Gpu {
    ctx: GpuContext,
    _turn: Option<MutexGuard<'static, ()>>,
}

thread_local! {
    static HOLDS: Cell<usize> = const { Cell::new(0) };
}

impl Gpu {
    fn hold(ctx: GpuContext, take_turns: bool) -> Gpu {
        static TURN: Mutex<()> = Mutex::new(());
        let first = HOLDS.with(|h| h.replace(h.get() + 1)) == 0;
        let turn = (take_turns && first).then(|| TURN.lock().unwrap_or_else(|e| e.into_inner()));
        Gpu { ctx, _turn: turn }
    }
}

impl Drop for Gpu {
    fn drop(&mut self) {
        HOLDS.with(|h| h.set(h.get() - 1));
    }
}

impl std::ops::Deref for Gpu {
    type Target = GpuContext;
    fn deref(&self) -> &GpuContext {
        &self.ctx
    }
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

/// The bytes of the arena that holds `h`.
pub fn packed(h: &[Host]) -> (Vec<u64>, Vec<u8>) {
    let (offsets, size) = layout(h, 0);
    let mut bytes = vec![0u8; size as usize];
    for (t, &o) in h.iter().zip(&offsets) {
        let b = t.as_ref();
        let b = b.as_bytes();
        bytes[o as usize..o as usize + b.len()].copy_from_slice(b);
    }
    (offsets, bytes)
}

/// Overwrites an arena made by [`upload`] with new values of the same tensors.
pub fn write(ctx: &GpuContext, arena: &Arena, h: &[Host]) {
    ctx.queue().write_buffer(&arena.buffer, 0, &packed(h).1);
}

/// The arena's tensors as `GpuTensor`s, named and shaped after `infos`.
pub fn gpu_tensors<'a>(
    arena: &'a Arena,
    h: &[Host],
    infos: &[gradclip::TensorInfo],
) -> Vec<GpuTensor<'a>> {
    h.iter()
        .zip(&arena.offsets)
        .zip(infos)
        .map(|((t, &o), info)| {
            GpuTensor::new(
                &arena.buffer,
                o,
                t.as_ref().len() as u64,
                t.as_ref().dtype(),
            )
            .named(info.name.clone())
            .shaped(&info.shape)
        })
        .collect()
}

pub fn upload(ctx: &GpuContext, h: &[Host]) -> Arena {
    let (offsets, bytes) = packed(h);
    let size = bytes.len() as u64;
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

/// The arena's tensors as unnamed `GpuTensor`s (named `#0`, `#1`, ... by the runners).
pub fn tensors<'a>(arena: &'a Arena, h: &[Host]) -> Vec<GpuTensor<'a>> {
    h.iter()
        .zip(&arena.offsets)
        .map(|(t, &o)| {
            GpuTensor::new(
                &arena.buffer,
                o,
                t.as_ref().len() as u64,
                t.as_ref().dtype(),
            )
        })
        .collect()
}

/// A GPU runner of `policy` over the arena's tensors, unnamed. Panics on an invalid batch
/// or policy: tests of bad input call `GpuClipper::new` themselves.
pub fn gpu_policy(ctx: &GpuContext, arena: &Arena, h: &[Host], policy: ClipPolicy) -> GpuClipper {
    GpuClipper::new(ctx, &tensors(arena, h), None, policy).expect("valid batch")
}

/// Descriptions of `h` as flat unnamed tensors (`#0`, `#1`, ...).
pub fn unnamed(h: &[Host]) -> Vec<TensorInfo> {
    TensorInfo::unnamed(h.iter().map(|t| t.as_ref().len()))
}

/// A CPU runner of `policy` over tensors shaped like `h`, unnamed: the oracle. Its first
/// step is step 0.
pub fn cpu_policy(policy: ClipPolicy, h: &[Host]) -> CpuClipper {
    CpuClipper::new(policy, &unnamed(h)).expect("valid CPU policy")
}

/// The CPU report of a `ClipPolicy::total_norm` step over `h` (which writes nothing): the
/// total norm, its partial form and, with `tensors`, every tensor's norm.
pub fn cpu_measure(h: &[Host], norm: Norm, tensors: bool) -> ClipReport {
    let mut measure = ClipPolicy::total_norm().norm(norm);
    if tensors {
        measure = measure.with_group_report();
    }
    let mut run = cpu_policy(measure, h);
    run.step_deferred(&refs(h), None).unwrap().report
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

/// A host tensor of dtype code `dtype % 3` (f32, f16, bf16) holding `v`.
pub fn host(dtype: u8, v: Vec<f32>) -> Host {
    match dtype % 3 {
        0 => Host::F32(v),
        1 => Host::F16(v.into_iter().map(f16::from_f32).collect()),
        _ => Host::BF16(v.into_iter().map(bf16::from_f32).collect()),
    }
}

/// One rule of each kind, for tensors named `t0`, `t1`, ...
pub fn rules() -> Vec<Rule> {
    vec![
        Rule::GlobalNorm(1.0),
        Rule::GlobalNorm(0.7).except(["t1"]),
        Rule::PerTensor(PerTensorClip { max_norm: 0.5 }),
        Rule::PerTensor(PerTensorClip { max_norm: 0.2 }).except(["*0", "t2"]),
        Rule::Groups(GroupClip::new(0.3).group("odd", "t*1", 0.7)),
        Rule::BlockRms(BlockRmsClip { threshold: 0.05 }),
        Rule::Agc(Agc::new(0.05)),
        Rule::Agc(Agc::new(0.05).axis(UnitAxis::Last)),
        Rule::AutoClip(AutoClip::new(50.0, 4)),
        Rule::ZClip(ZClip {
            warmup: 2,
            ..ZClip::default()
        }),
    ]
}

/// The per-tensor norms of a report that has them.
pub fn norms_of(r: &gradclip::ClipReport) -> Vec<f64> {
    let tensors = r.tensors.as_ref().expect("the report has per-tensor norms");
    tensors.iter().map(|t| t.norm).collect()
}
