//! Mixed-precision training with f16 gradients: dynamic loss scaling fused into the clip.
//!
//!     cargo run --release --example mixed_precision -- [--steps N] [--out DIR]
//!
//! A linear regression whose gradients are small (the targets are of order 1e-6), trained
//! on the GPU with its gradients stored in f16, as an f16 backward pass leaves them. The
//! program's own WGSL computes the residuals and the gradients (times the loss scale S,
//! read on the device through `LossScaleBinding`: no read-back), then
//! `GpuClipper::with_optimizer` unscales, checks for overflow, clips, updates S and steps
//! SGD on f32 master weights, in the same command encoder. Three runs from one seed:
//! 1. no loss scaling: the f16 gradients lose their precision in f16's subnormal range
//!    and flush to zero, and the loss stalls;
//! 2. a fixed scale of 2^24: the gradients keep their precision;
//! 3. a dynamic scale from 2^36: S * g overflows f16 at first, so S backs off (those steps
//!    are skipped with the weights untouched), then grows as the gradients shrink, and
//!    backs off again at each new overflow.
//!
//! Prints the loss every 50 steps and writes `loss.png`, `norms.png` and `loss_scale.png`
//! (the monitor's charts) and the monitor's CSV into DIR (default
//! `target/mixed_precision`). The weights are read back after every step only to plot
//! the loss; training never needs them on the host.

use gradclip::plot::LineChart;
use gradclip::{ClipPolicy, DType, GpuClipper, GpuContext, GpuTensor, GradMonitor, LossScale, Sgd};
use wgpu::util::DeviceExt;

#[path = "support/wgpu_util.rs"]
mod support;
use support::{pipeline, read_back};

/// Features and samples of the regression.
const D: usize = 64;
const N: usize = 256;

/// The program's forward pass: one residual per sample.
const RESIDUALS_WGSL: &str = r#"
@group(0) @binding(0) var<storage, read> x: array<f32>;
@group(0) @binding(1) var<storage, read> t: array<f32>;
@group(0) @binding(2) var<storage, read> w: array<f32>;
@group(0) @binding(3) var<storage, read_write> r: array<f32>;

@compute @workgroup_size(64)
fn main(@builtin(global_invocation_id) id: vec3<u32>) {
    let i = id.x;
    if (i >= arrayLength(&t)) { return; }
    var y = 0.0;
    for (var j = 0u; j < D; j = j + 1u) { y = y + x[i * D + j] * w[j]; }
    r[i] = y - t[i];
}
"#;

/// The program's backward pass of the loss times S (`gradclip_loss_scale()`, from the
/// include in front of it), stored in f16: two gradients per word.
const GRADIENTS_WGSL: &str = r#"
@group(0) @binding(0) var<storage, read> x: array<f32>;
@group(0) @binding(1) var<storage, read> r: array<f32>;
@group(0) @binding(2) var<storage, read_write> g: array<u32>;

fn gradient(j: u32, scale: f32) -> f32 {
    var s = 0.0;
    for (var i = 0u; i < N; i = i + 1u) { s = s + r[i] * x[i * D + j]; }
    return scale * s / f32(N);
}

@compute @workgroup_size(32)
fn main(@builtin(global_invocation_id) id: vec3<u32>) {
    let k = id.x;
    if (k >= D / 2u) { return; }
    let scale = gradclip_loss_scale();
    g[k] = pack2x16float(vec2<f32>(gradient(2u * k, scale), gradient(2u * k + 1u, scale)));
}
"#;

/// The include for a run without loss scaling: S is 1.
const NO_SCALE_WGSL: &str = "fn gradclip_loss_scale() -> f32 { return 1.0; }\n";

/// A deterministic stream in [-1, 1).
fn stream(seed: u64) -> impl FnMut() -> f32 {
    let mut s = seed;
    move || {
        s = s
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (s >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }
}

/// The data: inputs, targets from small true weights, and the loss of weights `w`.
struct Data {
    x: Vec<f32>,
    t: Vec<f32>,
}

impl Data {
    fn new(seed: u64) -> Data {
        let mut next = stream(seed);
        let x: Vec<f32> = (0..N * D).map(|_| next()).collect();
        let truth: Vec<f32> = (0..D).map(|j| 2e-6 * (j as f32 * 0.7).sin()).collect();
        let t = (0..N)
            .map(|i| (0..D).map(|j| x[i * D + j] * truth[j]).sum())
            .collect();
        Data { x, t }
    }

    /// Half the mean squared residual, in f64.
    fn loss(&self, w: &[f32]) -> f64 {
        let sq: f64 = (0..N)
            .map(|i| {
                let y: f64 = (0..D).map(|j| self.x[i * D + j] as f64 * w[j] as f64).sum();
                (y - self.t[i] as f64).powi(2)
            })
            .sum();
        0.5 * sq / N as f64
    }
}

/// One run's losses per step and its monitor.
struct Run {
    name: &'static str,
    losses: Vec<f64>,
    monitor: GradMonitor,
}

fn train(
    ctx: &GpuContext,
    data: &Data,
    name: &'static str,
    chain: ClipPolicy,
    steps: usize,
) -> Result<Run, Box<dyn std::error::Error>> {
    let device = ctx.device();
    let usage = wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_SRC;
    let init = |label, contents: &[f32]| {
        device.create_buffer_init(&wgpu::util::BufferInitDescriptor {
            label: Some(label),
            contents: bytemuck::cast_slice(contents),
            usage,
        })
    };
    let x = init("x", &data.x);
    let t = init("t", &data.t);
    let w = init("w", &[0.0f32; D]);
    let r = init("r", &[0.0f32; N]);
    let g = init("g (f16)", &[0.0f32; D / 2]);
    let grads = [GpuTensor::new(&g, 0, D as u64, DType::F16).named("w")];
    let params = [GpuTensor::new(&w, 0, D as u64, DType::F32).named("w")];
    let mut clip = GpuClipper::with_optimizer(ctx, &grads, &params, chain, Sgd::new(0.1))?;

    // The program's passes; the gradient pass reads S where the chain keeps it.
    let consts = format!("const D: u32 = {D}u;\nconst N: u32 = {N}u;\n");
    let scale = clip.loss_scale_on_device();
    let include = scale.map_or(NO_SCALE_WGSL.to_string(), |s| s.wgsl(1, 0));
    let forward = pipeline(device, &format!("{consts}{RESIDUALS_WGSL}"), "main");
    let backward = pipeline(
        device,
        &format!("{consts}{include}{GRADIENTS_WGSL}"),
        "main",
    );
    let group = |p: &wgpu::ComputePipeline, index: u32, bufs: &[wgpu::BindingResource<'_>]| {
        device.create_bind_group(&wgpu::BindGroupDescriptor {
            label: None,
            layout: &p.get_bind_group_layout(index),
            entries: &(bufs.iter().enumerate())
                .map(|(i, b)| wgpu::BindGroupEntry {
                    binding: i as u32,
                    resource: b.clone(),
                })
                .collect::<Vec<_>>(),
        })
    };
    fn whole(b: &wgpu::Buffer) -> wgpu::BindingResource<'_> {
        b.as_entire_binding()
    }
    let forward_group = group(&forward, 0, &[whole(&x), whole(&t), whole(&w), whole(&r)]);
    let backward_group = group(&backward, 0, &[whole(&x), whole(&r), whole(&g)]);
    let scale_group = scale.map(|s| group(&backward, 1, &[s.state()]));

    let mut run = Run {
        name,
        losses: Vec::with_capacity(steps),
        monitor: GradMonitor::new(),
    };
    for _ in 0..steps {
        let mut encoder = device.create_command_encoder(&Default::default());
        {
            let mut pass = encoder.begin_compute_pass(&Default::default());
            pass.set_pipeline(&forward);
            pass.set_bind_group(0, &forward_group, &[]);
            pass.dispatch_workgroups(N.div_ceil(64) as u32, 1, 1);
            pass.set_pipeline(&backward);
            pass.set_bind_group(0, &backward_group, &[]);
            if let Some(s) = &scale_group {
                pass.set_bind_group(1, s, &[]);
            }
            pass.dispatch_workgroups(1, 1, 1);
        }
        let report = clip.encode(&mut encoder)?;
        ctx.queue().submit([encoder.finish()]);
        run.monitor.track(report)?;
        // For the plot only.
        run.losses.push(data.loss(&read_back(ctx, &w)?));
    }
    run.monitor.flush()?;
    Ok(run)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut steps = 600;
    let mut out = std::path::PathBuf::from("target/mixed_precision");
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--steps" => steps = args.next().ok_or("--steps N")?.parse()?,
            "--out" => out = args.next().ok_or("--out DIR")?.into(),
            other => return Err(format!("unknown argument {other}").into()),
        }
    }
    std::fs::create_dir_all(&out)?;
    let ctx = GpuContext::new()?;
    if let Some(info) = ctx.adapter_info() {
        println!("training on {} ({:?})", info.name, info.backend);
    }
    let data = Data::new(7);
    println!("loss at the start: {:.3e}", data.loss(&[0.0; D]));
    let clip = || ClipPolicy::global_norm(2e-6);
    let runs = [
        train(&ctx, &data, "no loss scaling", clip(), steps)?,
        train(
            &ctx,
            &data,
            "fixed scale 2^24",
            clip().loss_scale(LossScale::fixed(16_777_216.0)),
            steps,
        )?,
        train(
            &ctx,
            &data,
            "dynamic scale from 2^36",
            clip().loss_scale(LossScale::dynamic().init(68_719_476_736.0).growth(2.0, 25)),
            steps,
        )?,
    ];

    println!(
        "\n step | {:>22} | {:>22} | {:>22}",
        runs[0].name, runs[1].name, runs[2].name
    );
    for s in (0..steps).step_by(50).chain([steps - 1]) {
        let cell = |r: &Run| {
            let rec = &r.monitor.records()[s];
            let scale = rec
                .loss_scale
                .map_or(String::new(), |l| format!(" S=2^{}", l.scale.log2()));
            let skip = if rec.skipped { " skip" } else { "" };
            format!("{:.3e}{scale}{skip}", r.losses[s])
        };
        println!(
            " {s:4} | {:>22} | {:>22} | {:>22}",
            cell(&runs[0]),
            cell(&runs[1]),
            cell(&runs[2])
        );
    }
    for r in &runs {
        let skipped = r.monitor.records().iter().filter(|r| r.skipped).count();
        let zero = r
            .monitor
            .records()
            .iter()
            .filter(|r| r.total_norm == 0.0)
            .count();
        println!(
            "{}: final loss {:.3e}, {skipped} steps skipped (overflow), {zero} steps whose \
             f16 gradients were all zero",
            r.name,
            r.losses[steps - 1]
        );
    }

    let points = |f: &dyn Fn(usize) -> f64| (0..steps).map(|s| (s as f64, f(s))).collect();
    let mut loss = LineChart::new("Training loss, f16 gradients", "step", "loss").log_y(true);
    let mut norms =
        LineChart::new("Gradient norm (unscaled, before clipping)", "step", "norm").log_y(true);
    for r in &runs {
        loss = loss.line(r.name, points(&|s| r.losses[s]));
        norms = norms.line(r.name, points(&|s| r.monitor.records()[s].total_norm));
    }
    loss.save(out.join("loss.png"))?;
    norms.save(out.join("norms.png"))?;
    runs[2]
        .monitor
        .plot_loss_scale(out.join("loss_scale.png"))?;
    runs[2].monitor.write_csv(out.join("dynamic.csv"))?;
    println!("plots and records written to {}", out.display());
    Ok(())
}
