//! The bench's host section: what a step costs the CPU that records and submits it, for
//! the GPT-2 small shapes in one arena buffer and in one buffer per tensor, next to a plain
//! wgpu step written here that touches the same buffers (one dispatch per buffer, its bind
//! groups made once, or made every step). Host time does not depend on the adapter's
//! speed, so the full set runs on any adapter; the gradients are zeros, so the GPU work
//! each step waits for stays small.

use std::time::Instant;

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

/// The plain step over `placed`: one dispatch per buffer of a kernel that reads and writes
/// one word of it.
struct PlainStep {
    pipeline: wgpu::ComputePipeline,
    groups: Vec<wgpu::BindGroup>,
}

const TOUCH_WGSL: &str = r#"
@group(0) @binding(0) var<storage, read_write> x: array<u32>;
@compute @workgroup_size(64)
fn touch(@builtin(global_invocation_id) g: vec3<u32>) {
    if (g.x < arrayLength(&x)) { x[g.x] = x[g.x] + 0u; }
}
"#;

impl PlainStep {
    fn new(ctx: &GpuContext, placed: &Placed) -> PlainStep {
        let dev = ctx.device();
        let module = dev.create_shader_module(wgpu::ShaderModuleDescriptor {
            label: Some("bench host-cost plain step"),
            source: wgpu::ShaderSource::Wgsl(TOUCH_WGSL.into()),
        });
        let pipeline = dev.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
            label: Some("touch"),
            layout: None,
            module: &module,
            entry_point: Some("touch"),
            compilation_options: Default::default(),
            cache: None,
        });
        let mut step = PlainStep {
            pipeline,
            groups: Vec::new(),
        };
        step.groups = step.bind(ctx, placed);
        step
    }

    /// One bind group per buffer (a binding no larger than the device allows).
    fn bind(&self, ctx: &GpuContext, placed: &Placed) -> Vec<wgpu::BindGroup> {
        let dev = ctx.device();
        let layout = self.pipeline.get_bind_group_layout(0);
        let max = dev.limits().max_storage_buffer_binding_size;
        (placed.buffers.iter())
            .map(|b| {
                let size = wgpu::BufferSize::new(b.size().min(max) & !3);
                dev.create_bind_group(&wgpu::BindGroupDescriptor {
                    label: None,
                    layout: &layout,
                    entries: &[wgpu::BindGroupEntry {
                        binding: 0,
                        resource: wgpu::BindingResource::Buffer(wgpu::BufferBinding {
                            buffer: b,
                            offset: 0,
                            size,
                        }),
                    }],
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
            pass.set_pipeline(&self.pipeline);
            for g in groups {
                pass.set_bind_group(0, g, &[]);
                pass.dispatch_workgroups(1, 1, 1);
            }
        }
        enc.finish()
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
