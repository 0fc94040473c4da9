//! The bench's host section: what a step costs the CPU that records and submits it, for
//! the GPT-2 small shapes in one arena buffer and in one buffer per tensor, next to a plain
//! wgpu step written here that touches the same buffers with the same passes (a global-norm
//! clip: a sum per binding window, a combine, a scale per window; its bind groups made
//! once, or made every step). Host time does not depend on the adapter's speed, so the
//! full set runs on any adapter.

use std::time::Instant;

use wgpu::util::DeviceExt;

use gradclip::{AutoClip, ClipPolicy, DType, GpuClipper, GpuContext, GpuTensor, PerTensorClip};
use gradclip::{Rule, ZClip};

type Res<T> = Result<T, Box<dyn std::error::Error>>;

/// One figure: the median host time of `what` for `runner` on `layout`, in microseconds,
/// and the plain wgpu step's figure it compares with.
pub struct HostFigure {
    pub layout: &'static str,
    pub what: &'static str,
    pub runner: &'static str,
    pub us: f64,
    /// The plain step's figure for the same operation (encode + finish or submit, bind
    /// groups made once), where there is one.
    pub plain_us: Option<f64>,
}

/// f32 tensors of lengths `lens` in device buffers: one arena (several only where the
/// device's largest buffer is smaller), or one buffer per tensor.
struct Placed {
    buffers: Vec<wgpu::Buffer>,
    /// Per tensor: its buffer, byte offset and length.
    ranges: Vec<(usize, u64, u64)>,
}

impl Placed {
    fn new(ctx: &GpuContext, lens: &[usize], arena: bool) -> Placed {
        let dev = ctx.device();
        let limits = dev.limits();
        let align = limits.min_storage_buffer_offset_alignment as u64;
        let mut sizes: Vec<u64> = Vec::new();
        let mut ranges = Vec::with_capacity(lens.len());
        for &n in lens {
            let bytes = n as u64 * 4;
            // The next offset in the arena, unless a new buffer starts here.
            let at = match sizes.last() {
                Some(&end) if arena => Some(end.next_multiple_of(align)),
                _ => None,
            };
            match at.filter(|&at| at + bytes <= limits.max_buffer_size) {
                Some(at) => {
                    *sizes.last_mut().expect("a buffer") = at + bytes;
                    ranges.push((sizes.len() - 1, at, n as u64));
                }
                None => {
                    sizes.push(bytes);
                    ranges.push((sizes.len() - 1, 0, n as u64));
                }
            }
        }
        let buffers = (sizes.iter())
            .map(|&size| {
                dev.create_buffer(&wgpu::BufferDescriptor {
                    label: Some("bench host-cost gradients"),
                    size: size.max(4).next_multiple_of(4),
                    usage: wgpu::BufferUsages::STORAGE,
                    mapped_at_creation: false,
                })
            })
            .collect();
        Placed { buffers, ranges }
    }

    fn tensors(&self) -> Vec<GpuTensor<'_>> {
        (self.ranges.iter())
            .map(|&(b, offset, len)| GpuTensor::new(&self.buffers[b], offset, len, DType::F32))
            .collect()
    }
}

/// The median of `runs` timings of `f`, in microseconds.
fn median_us(runs: usize, mut f: impl FnMut() -> Res<f64>) -> Res<f64> {
    let mut v = (0..runs).map(|_| f()).collect::<Res<Vec<f64>>>()?;
    v.sort_by(f64::total_cmp);
    Ok(v[v.len() / 2])
}

fn us_since(t: Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1e6
}

fn wait(ctx: &GpuContext) -> Res<()> {
    ctx.device().poll(wgpu::PollType::wait_indefinitely())?;
    Ok(())
}

/// A four-stage chain: per-tensor, ZClip, AutoClip, then a global norm.
fn four_stages() -> ClipPolicy {
    ClipPolicy::new(PerTensorClip::new(1.0))
        .then(ZClip::new())
        .then(AutoClip::new(90.0, 100))
        .then(Rule::GlobalNorm(1.0))
}

/// The plain step over `placed`: a global-norm clip written in plain wgpu with the passes
/// of gradclip's: per binding window of a buffer (as large as the device binds) one
/// dispatch that sums the squares of its elements into one partial per workgroup, then
/// one dispatch that combines the partials, then per window one dispatch that scales
/// every element. Each window's bind group holds it, the partials and its slot (a
/// dynamic offset). It reads and writes what gradclip's step does, so the two leave the
/// caches alike on an adapter that runs on the CPU.
struct PlainStep {
    sum: wgpu::ComputePipeline,
    combine: wgpu::ComputePipeline,
    scale: wgpu::ComputePipeline,
    partials: wgpu::Buffer,
    slots: wgpu::Buffer,
    /// Per binding window: its buffer, byte offset and size, and its grid.
    windows: Vec<(usize, u64, u64, [u32; 3])>,
    groups: Vec<wgpu::BindGroup>,
}

const PLAIN_WGSL: &str = r#"
@group(0) @binding(0) var<storage, read_write> x: array<f32>;
@group(0) @binding(1) var<storage, read_write> partials: array<f32>;
// x: this window's first partial.
@group(0) @binding(2) var<uniform> slot: vec4<u32>;

const PER_GROUP: u32 = 4096u;
var<workgroup> sums: array<f32, 64>;

fn group_index(wg: vec3<u32>, n: vec3<u32>) -> u32 {
    return wg.x + wg.y * n.x;
}

@compute @workgroup_size(64)
fn sum(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) n: vec3<u32>,
       @builtin(local_invocation_index) lid: u32) {
    let g = group_index(wg, n);
    var acc = 0.0;
    for (var i = g * PER_GROUP + lid; i < min((g + 1u) * PER_GROUP, arrayLength(&x)); i += 64u) {
        acc += x[i] * x[i];
    }
    sums[lid] = acc;
    for (var half = 32u; half > 0u; half /= 2u) {
        workgroupBarrier();
        if (lid < half) { sums[lid] += sums[lid + half]; }
    }
    if (lid == 0u) { partials[slot.x + g] = sums[0]; }
}

@compute @workgroup_size(64)
fn combine(@builtin(local_invocation_index) lid: u32) {
    let n = arrayLength(&partials) - 1u;
    var acc = 0.0;
    for (var k = lid; k < n; k += 64u) { acc += partials[k]; }
    sums[lid] = acc;
    for (var half = 32u; half > 0u; half /= 2u) {
        workgroupBarrier();
        if (lid < half) { sums[lid] += sums[lid + half]; }
    }
    if (lid == 0u) { partials[n] = min(1.0, 1.0 / (sqrt(sums[0]) + 1e-6)); }
}

@compute @workgroup_size(64)
fn scale(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) n: vec3<u32>,
         @builtin(local_invocation_index) lid: u32) {
    let g = group_index(wg, n);
    let c = partials[arrayLength(&partials) - 1u];
    for (var i = g * PER_GROUP + lid; i < min((g + 1u) * PER_GROUP, arrayLength(&x)); i += 64u) {
        x[i] = x[i] * c;
    }
}
"#;

/// Elements per workgroup of the plain step (`PER_GROUP` above).
const PER_GROUP: u64 = 4096;
/// Bytes between two windows' slots (the dynamic offset alignment of every device).
const SLOT_BYTES: u64 = 256;

impl PlainStep {
    fn new(ctx: &GpuContext, placed: &Placed) -> PlainStep {
        let dev = ctx.device();
        let limits = dev.limits();
        let module = dev.create_shader_module(wgpu::ShaderModuleDescriptor {
            label: Some("bench host-cost plain step"),
            source: wgpu::ShaderSource::Wgsl(PLAIN_WGSL.into()),
        });
        let layout = dev.create_bind_group_layout(&wgpu::BindGroupLayoutDescriptor {
            label: None,
            entries: &[
                entry(
                    0,
                    wgpu::BufferBindingType::Storage { read_only: false },
                    false,
                ),
                entry(
                    1,
                    wgpu::BufferBindingType::Storage { read_only: false },
                    false,
                ),
                entry(2, wgpu::BufferBindingType::Uniform, true),
            ],
        });
        let pipeline_layout = dev.create_pipeline_layout(&wgpu::PipelineLayoutDescriptor {
            label: None,
            bind_group_layouts: &[Some(&layout)],
            immediate_size: 0,
        });
        let pipeline = |entry: &str| {
            dev.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
                label: Some(entry),
                layout: Some(&pipeline_layout),
                module: &module,
                entry_point: Some(entry),
                compilation_options: Default::default(),
                cache: None,
            })
        };
        // Windows as large as the device binds, at offsets it accepts.
        let align = limits.min_storage_buffer_offset_alignment as u64;
        let window = (limits.max_storage_buffer_binding_size / align) * align;
        let max_dim = limits.max_compute_workgroups_per_dimension;
        let mut windows = Vec::new();
        for (b, buffer) in placed.buffers.iter().enumerate() {
            let mut at = 0;
            while at < buffer.size() {
                let size = window.min(buffer.size() - at);
                let groups = (size / 4).div_ceil(PER_GROUP) as u32;
                let x = groups.min(max_dim);
                windows.push((b, at, size, [x, groups.div_ceil(x), 1]));
                at += size;
            }
        }
        let mut slot_words = Vec::new();
        let mut first = 0u32;
        for &(_, _, _, grid) in &windows {
            let mut slot = [0u32; (SLOT_BYTES / 4) as usize];
            slot[0] = first;
            slot_words.extend(slot);
            first += grid[0] * grid[1];
        }
        let slots = dev.create_buffer_init(&wgpu::util::BufferInitDescriptor {
            label: Some("bench host-cost plain slots"),
            contents: bytemuck::cast_slice(&slot_words),
            usage: wgpu::BufferUsages::UNIFORM,
        });
        let partials = dev.create_buffer(&wgpu::BufferDescriptor {
            label: Some("bench host-cost plain partials"),
            size: (first as u64 + 1) * 4,
            usage: wgpu::BufferUsages::STORAGE,
            mapped_at_creation: false,
        });
        let mut step = PlainStep {
            sum: pipeline("sum"),
            combine: pipeline("combine"),
            scale: pipeline("scale"),
            partials,
            slots,
            windows,
            groups: Vec::new(),
        };
        step.groups = step.bind(ctx, placed);
        step
    }

    /// One bind group per window.
    fn bind(&self, ctx: &GpuContext, placed: &Placed) -> Vec<wgpu::BindGroup> {
        let dev = ctx.device();
        let layout = self.sum.get_bind_group_layout(0);
        let buffer = |buffer, offset, size| {
            wgpu::BindingResource::Buffer(wgpu::BufferBinding {
                buffer,
                offset,
                size: wgpu::BufferSize::new(size),
            })
        };
        (self.windows.iter())
            .map(|&(b, offset, size, _)| {
                dev.create_bind_group(&wgpu::BindGroupDescriptor {
                    label: None,
                    layout: &layout,
                    entries: &[
                        wgpu::BindGroupEntry {
                            binding: 0,
                            resource: buffer(&placed.buffers[b], offset, size),
                        },
                        wgpu::BindGroupEntry {
                            binding: 1,
                            resource: self.partials.as_entire_binding(),
                        },
                        wgpu::BindGroupEntry {
                            binding: 2,
                            resource: buffer(&self.slots, 0, 16),
                        },
                    ],
                })
            })
            .collect()
    }

    /// Records the step into a new encoder; with `fresh`, its bind groups made anew.
    fn encode(&self, ctx: &GpuContext, placed: &Placed, fresh: bool) -> wgpu::CommandBuffer {
        let made;
        let groups = if fresh {
            made = self.bind(ctx, placed);
            &made
        } else {
            &self.groups
        };
        let mut enc = ctx.device().create_command_encoder(&Default::default());
        {
            let mut pass = enc.begin_compute_pass(&Default::default());
            let offset = |k: usize| [(k as u64 * SLOT_BYTES) as u32];
            let each = |pass: &mut wgpu::ComputePass<'_>| {
                for (k, (g, w)) in groups.iter().zip(&self.windows).enumerate() {
                    pass.set_bind_group(0, g, &offset(k));
                    pass.dispatch_workgroups(w.3[0], w.3[1], 1);
                }
            };
            pass.set_pipeline(&self.sum);
            each(&mut pass);
            pass.set_pipeline(&self.combine);
            pass.set_bind_group(0, &groups[0], &offset(0));
            pass.dispatch_workgroups(1, 1, 1);
            pass.set_pipeline(&self.scale);
            each(&mut pass);
        }
        enc.finish()
    }
}

/// A compute-visible buffer binding of `ty` at `binding`.
fn entry(binding: u32, ty: wgpu::BufferBindingType, dynamic: bool) -> wgpu::BindGroupLayoutEntry {
    wgpu::BindGroupLayoutEntry {
        binding,
        visibility: wgpu::ShaderStages::COMPUTE,
        ty: wgpu::BindingType::Buffer {
            ty,
            has_dynamic_offset: dynamic,
            min_binding_size: None,
        },
        count: None,
    }
}

/// The host section over tensors of `lens`, `runs` timed runs per figure.
pub fn measure(ctx: &GpuContext, lens: &[usize], runs: usize) -> Res<Vec<HostFigure>> {
    let mut figures = Vec::new();
    for (layout, arena) in [("one arena", true), ("one buffer per tensor", false)] {
        let (a, b) = (Placed::new(ctx, lens, arena), Placed::new(ctx, lens, arena));
        let (ta, tb) = (a.tensors(), b.tensors());
        let plain = PlainStep::new(ctx, &a);
        let mut plain_fig = |what, fresh: bool, submit: bool| -> Res<f64> {
            let us = median_us(runs, || {
                let t = Instant::now();
                let cb = plain.encode(ctx, &a, fresh);
                let encode = us_since(t);
                let t = Instant::now();
                ctx.queue().submit([cb]);
                let submitted = us_since(t);
                wait(ctx)?;
                Ok(if submit { submitted } else { encode })
            })?;
            figures.push(HostFigure {
                layout,
                what,
                runner: if fresh {
                    "plain wgpu step, bind groups made every step"
                } else {
                    "plain wgpu step, bind groups made once"
                },
                us,
                plain_us: None,
            });
            Ok(us)
        };
        let plain_encode = plain_fig("encode + finish", false, false)?;
        plain_fig("encode + finish", true, false)?;
        let plain_submit = plain_fig("submit", false, true)?;
        for (runner, policy) in [
            ("global clip", ClipPolicy::global_norm(1.0)),
            ("4-stage chain", four_stages()),
        ] {
            let mut clip = GpuClipper::new(ctx, &ta, None, policy)?;
            for _ in 0..3 {
                clip.step()?.wait()?;
            }
            let (mut encodes, mut submits) = (Vec::new(), Vec::new());
            for _ in 0..runs {
                let t = Instant::now();
                let mut enc = ctx.device().create_command_encoder(&Default::default());
                let report = clip.encode(&mut enc)?;
                let cb = enc.finish();
                encodes.push(us_since(t));
                let t = Instant::now();
                ctx.queue().submit([cb]);
                submits.push(us_since(t));
                report.wait()?;
            }
            let med = |mut v: Vec<f64>| {
                v.sort_by(f64::total_cmp);
                v[v.len() / 2]
            };
            let same = median_us(runs, || {
                let t = Instant::now();
                clip.rebind(&ta, None)?;
                Ok(us_since(t))
            })?;
            let mut k = 0;
            let moved = median_us(runs, || {
                k += 1;
                let t = Instant::now();
                clip.rebind(if k % 2 == 1 { &tb } else { &ta }, None)?;
                Ok(us_since(t))
            })?;
            let figure = |what, us, plain_us| HostFigure {
                layout,
                what,
                runner,
                us,
                plain_us,
            };
            figures.push(figure("encode + finish", med(encodes), Some(plain_encode)));
            figures.push(figure("submit", med(submits), Some(plain_submit)));
            figures.push(figure("rebind to the same ranges", same, None));
            figures.push(figure("rebind to moved ranges", moved, None));
        }
    }
    Ok(figures)
}

/// Prints the figures, each gradclip figure as a ratio to the plain step's.
pub fn print(figures: &[HostFigure], tensors: usize) {
    println!("\n== Host cost per step: GPT-2 small shapes, {tensors} f32 tensors (medians, us) ==");
    for f in figures {
        let ratio = f.plain_us.map_or(String::new(), |p| {
            format!("  ({:.2}x the plain step)", f.us / p)
        });
        println!(
            "  {:<22} {:<26} {:<46} {:>9.1} us{ratio}",
            f.layout, f.what, f.runner, f.us
        );
    }
}
