//! Clipping for the price of one read: the clip's coefficients stay on the device and the
//! optimizer multiplies as it reads the gradients, so nothing writes them back.
//!
//!     cargo run --release --example deferred_scaling
//!
//! The toy quadratic of `own_buffers` (plain SGD at lr 0.1 diverges on it; clipped at a
//! norm of 10 it converges), trained three ways from the same start:
//! 1. the program's own SGD shader includes gradclip's deferred-scaling WGSL and applies
//!    `GpuClipper::encode_deferred`'s coefficients as it reads the gradients;
//! 2. `GpuClipper<Optimize>` runs the clip and the SGD step fused, in one compute pass;
//! 3. `CpuClipper<Optimize>`, the CPU twin, as the check.
//!
//! Then AdamW, fused on the GPU and on the CPU.

use gradclip::{
    Adam, ClipPolicy, CpuClipper, DType, GpuClipper, GpuContext, GpuTensor, GradRef, Optimizer,
    Rule, Sgd, TensorInfo,
};
use wgpu::util::DeviceExt;

#[path = "support/wgpu_util.rs"]
mod support;
use support::{pipeline, read_back};

/// The program's gradient kernel (not gradclip's).
const GRADIENTS_WGSL: &str = r#"
@group(0) @binding(0) var<storage, read> w: array<f32>;
@group(0) @binding(1) var<storage, read_write> g: array<f32>;

@compute @workgroup_size(64)
fn main(@builtin(global_invocation_id) id: vec3<u32>) {
    let i = id.x;
    if (i < arrayLength(&w)) { g[i] = (1.0 + f32((i * 7u) % 40u)) * (w[i] - 1.0); }
}
"#;

/// The program's SGD kernel, after gradclip's include (`DeferredClip::wgsl(0, 2)`): it
/// skips a step the clip held and reads each gradient through `gradclip_scaled`.
const SGD_WGSL: &str = r#"
@group(0) @binding(0) var<storage, read> g: array<f32>;
@group(0) @binding(1) var<storage, read_write> w: array<f32>;

@compute @workgroup_size(64)
fn main(@builtin(global_invocation_id) id: vec3<u32>) {
    let i = id.x;
    if (i >= arrayLength(&w) || gradclip_held()) { return; }
    // Two tensors, one unit each: elements past the first tensor are in unit SECOND.
    let unit = select(FIRST, SECOND, i >= FIRST_LEN);
    w[i] = w[i] - 0.1 * gradclip_scaled(g[i], unit);
}
"#;

const LENS: [u64; 2] = [1000, 24];
const STEPS: usize = 30;

fn stiffness(i: usize) -> f32 {
    1.0 + ((i * 7) % 40) as f32
}

struct Buffers {
    weights: wgpu::Buffer,
    grads: wgpu::Buffer,
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let ctx = GpuContext::new()?;
    let n: u64 = LENS.iter().sum();
    let init: Vec<f32> = (0..n).map(|i| ((i % 13) as f32 - 6.0) * 0.5).collect();
    let names = ["layer1.weight", "layer2.weight"];
    let infos: Vec<TensorInfo> = (names.iter().zip(LENS))
        .map(|(name, len)| TensorInfo::new(*name, &[len]))
        .collect();
    let policy = ClipPolicy::new(Rule::GlobalNorm(10.0));
    let dist = |w: &[f32]| w.iter().map(|x| (x - 1.0) * (x - 1.0)).sum::<f32>().sqrt();
    println!("distance to the optimum at the start: {:.4}", dist(&init));

    // 1. Deferred scaling in the program's own SGD shader.
    let deferred = {
        let b = buffers(&ctx, &init);
        let tensors = tensors_of(&b.grads, &names);
        let mut clip = GpuClipper::new(&ctx, &tensors, None, policy.clone())?;
        let layouts = clip.deferred().layouts().to_vec();
        let source = format!(
            "{}\nconst FIRST: u32 = {}u;\nconst SECOND: u32 = {}u;\nconst FIRST_LEN: u32 = {}u;\n{SGD_WGSL}",
            clip.deferred().wgsl(0, 2),
            layouts[0].first,
            layouts[1].first,
            LENS[0],
        );
        let device = ctx.device();
        let gradients = pipeline(device, GRADIENTS_WGSL, "main");
        let sgd = pipeline(device, &source, "main");
        let grad_group = group(device, &gradients, &[&b.weights, &b.grads], &[]);
        let sgd_group = {
            let d = clip.deferred();
            group(
                device,
                &sgd,
                &[&b.grads, &b.weights],
                &[d.coefficients(), d.report()],
            )
        };
        let groups = (n as u32).div_ceil(64);
        let mut last = None;
        for _ in 0..STEPS {
            let mut encoder = device.create_command_encoder(&Default::default());
            dispatch(&mut encoder, &gradients, &grad_group, groups);
            // Norms and coefficients only: the gradients are not written.
            let report = clip.encode_deferred(&mut encoder)?;
            dispatch(&mut encoder, &sgd, &sgd_group, groups);
            ctx.queue().submit([encoder.finish()]);
            last = Some(report);
        }
        if let Some(r) = last {
            let r = r.wait()?;
            println!(
                "deferred: last step's norm {:.3}, coefficient {:.4}",
                r.total_norm,
                r.coef.unwrap_or(1.0)
            );
        }
        read_back(&ctx, &b.weights)?
    };

    // 2 and 3: the fused optimizer on the GPU and its CPU twin, SGD then AdamW.
    let optimizers: [(&str, Optimizer); 2] = [
        ("SGD", Sgd::new(0.1).into()),
        ("AdamW", Adam::adamw(0.1).into()),
    ];
    for (name, opt) in optimizers {
        let b = buffers(&ctx, &init);
        let grads = tensors_of(&b.grads, &names);
        let params = tensors_of(&b.weights, &names);
        let mut fused = GpuClipper::with_optimizer(&ctx, &grads, &params, policy.clone(), opt)?;
        let device = ctx.device();
        let gradients = pipeline(device, GRADIENTS_WGSL, "main");
        let grad_group = group(device, &gradients, &[&b.weights, &b.grads], &[]);
        for _ in 0..STEPS {
            let mut encoder = device.create_command_encoder(&Default::default());
            dispatch(
                &mut encoder,
                &gradients,
                &grad_group,
                (n as u32).div_ceil(64),
            );
            let _report = fused.encode(&mut encoder)?;
            ctx.queue().submit([encoder.finish()]);
        }
        let gpu_w = read_back(&ctx, &b.weights)?;

        let mut cpu = CpuClipper::with_optimizer(policy.clone(), &infos, opt)?;
        let mut w = init.clone();
        for _ in 0..STEPS {
            let g: Vec<f32> = (w.iter().enumerate())
                .map(|(i, &x)| stiffness(i) * (x - 1.0))
                .collect();
            let (g1, g2) = g.split_at(LENS[0] as usize);
            let (w1, w2) = w.split_at_mut(LENS[0] as usize);
            cpu.step(&[GradRef::F32(g1), GradRef::F32(g2)], &mut [w1, w2])?;
        }
        let diff = |a: &[f32], b: &[f32]| {
            (a.iter().zip(b))
                .map(|(x, y)| (x - y).abs())
                .fold(0.0f32, f32::max)
        };
        println!(
            "{name}: distance after {STEPS} clipped steps {:.4} (GPU fused) and {:.4} (CPU); \
             largest difference {:.2e}",
            dist(&gpu_w),
            dist(&w),
            diff(&gpu_w, &w)
        );
        // The same arithmetic on both backends: differences are roundings.
        assert!(diff(&gpu_w, &w) <= 1e-5, "{name}: GPU and CPU disagree");
        if name == "SGD" {
            let d = diff(&deferred, &gpu_w);
            println!(
                "SGD: deferred scaling in the program's shader and the fused step differ by \
                 at most {d:.2e}"
            );
            assert!(d <= 1e-5, "deferred and fused SGD disagree");
        }
    }
    Ok(())
}

fn buffers(ctx: &GpuContext, init: &[f32]) -> Buffers {
    let device = ctx.device();
    let weights = device.create_buffer_init(&wgpu::util::BufferInitDescriptor {
        label: Some("weights"),
        contents: bytemuck::cast_slice(init),
        usage: wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_SRC,
    });
    let grads = device.create_buffer(&wgpu::BufferDescriptor {
        label: Some("gradients"),
        size: init.len() as u64 * 4,
        usage: wgpu::BufferUsages::STORAGE,
        mapped_at_creation: false,
    });
    Buffers { weights, grads }
}

/// The two layers inside one buffer, as gradclip sees them.
fn tensors_of<'a>(buffer: &'a wgpu::Buffer, names: &[&str; 2]) -> Vec<GpuTensor<'a>> {
    vec![
        GpuTensor::new(buffer, 0, LENS[0], DType::F32).named(names[0]),
        GpuTensor::new(buffer, LENS[0] * 4, LENS[1], DType::F32).named(names[1]),
    ]
}

/// A bind group of `buffers` (bindings 0, 1, ...) then `extra` resources.
fn group(
    device: &wgpu::Device,
    pipeline: &wgpu::ComputePipeline,
    buffers: &[&wgpu::Buffer],
    extra: &[wgpu::BindingResource<'_>],
) -> wgpu::BindGroup {
    let resources = (buffers.iter().map(|b| b.as_entire_binding())).chain(extra.iter().cloned());
    let entries: Vec<wgpu::BindGroupEntry<'_>> = resources
        .enumerate()
        .map(|(i, resource)| wgpu::BindGroupEntry {
            binding: i as u32,
            resource,
        })
        .collect();
    device.create_bind_group(&wgpu::BindGroupDescriptor {
        label: None,
        layout: &pipeline.get_bind_group_layout(0),
        entries: &entries,
    })
}

fn dispatch(
    encoder: &mut wgpu::CommandEncoder,
    pipeline: &wgpu::ComputePipeline,
    group: &wgpu::BindGroup,
    groups: u32,
) {
    let mut pass = encoder.begin_compute_pass(&Default::default());
    pass.set_pipeline(pipeline);
    pass.set_bind_group(0, group, &[]);
    pass.dispatch_workgroups(groups, 1, 1);
}
