//! A training step that keeps its own wgpu buffers: its own compute shader writes the
//! gradients, gradclip clips them in place, its own shader applies SGD, all in one
//! command encoder per step; no copy, no host round trip. The clipping reports are read
//! back asynchronously by a `GradMonitor`, a few steps late.
//!
//!     cargo run --release --example own_buffers
//!
//! The model is a toy quadratic, loss = sum_i k_i (w_i - 1)^2 / 2 with stiffness k_i up to
//! 40, so plain SGD at lr 0.1 diverges (0.1 * 40 > 2); clipped at a norm of 10, each step
//! moves the weights by at most 1 and the distance to the optimum shrinks steadily. At the
//! end the same steps run on the CPU path and the weights are compared.

use gradclip::{
    ClipPolicy, CpuClipper, DType, GpuClipper, GpuContext, GpuTensor, GradMonitor, GradMut, Rule,
    TensorInfo,
};
use wgpu::util::DeviceExt;

#[path = "support/wgpu_util.rs"]
mod support;
use support::{pipeline, read_back};

/// The training program's own kernels (not gradclip's).
const TRAINING_WGSL: &str = r#"
@group(0) @binding(0) var<storage, read_write> w: array<f32>;
@group(0) @binding(1) var<storage, read_write> g: array<f32>;

fn stiffness(i: u32) -> f32 { return 1.0 + f32((i * 7u) % 40u); }

@compute @workgroup_size(64)
fn gradients(@builtin(global_invocation_id) id: vec3<u32>) {
    let i = id.x;
    if (i < arrayLength(&w)) { g[i] = stiffness(i) * (w[i] - 1.0); }
}

@compute @workgroup_size(64)
fn sgd(@builtin(global_invocation_id) id: vec3<u32>) {
    let i = id.x;
    if (i < arrayLength(&w)) { w[i] = w[i] - 0.1 * g[i]; }
}
"#;

const LENS: [u64; 2] = [1000, 24];
const STEPS: usize = 30;

fn stiffness(i: usize) -> f32 {
    1.0 + ((i * 7) % 40) as f32
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let ctx = GpuContext::new()?;
    let device = ctx.device();
    let n: u64 = LENS.iter().sum();
    let init: Vec<f32> = (0..n).map(|i| ((i % 13) as f32 - 6.0) * 0.5).collect();
    let weights = device.create_buffer_init(&wgpu::util::BufferInitDescriptor {
        label: Some("weights"),
        contents: bytemuck::cast_slice(&init),
        usage: wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_SRC,
    });
    let grads = device.create_buffer(&wgpu::BufferDescriptor {
        label: Some("gradients"),
        size: n * 4,
        usage: wgpu::BufferUsages::STORAGE,
        mapped_at_creation: false,
    });
    let (gradients, sgd) = (
        pipeline(device, TRAINING_WGSL, "gradients"),
        pipeline(device, TRAINING_WGSL, "sgd"),
    );
    let bind = |p: &wgpu::ComputePipeline| {
        device.create_bind_group(&wgpu::BindGroupDescriptor {
            label: None,
            layout: &p.get_bind_group_layout(0),
            entries: &[
                wgpu::BindGroupEntry {
                    binding: 0,
                    resource: weights.as_entire_binding(),
                },
                wgpu::BindGroupEntry {
                    binding: 1,
                    resource: grads.as_entire_binding(),
                },
            ],
        })
    };
    let (grad_group, sgd_group) = (bind(&gradients), bind(&sgd));

    // gradclip sees the two layers inside the program's gradient buffer.
    let names = ["layer1.weight", "layer2.weight"];
    let tensors = [
        GpuTensor::new(&grads, 0, LENS[0], DType::F32).named(names[0]),
        GpuTensor::new(&grads, LENS[0] * 4, LENS[1], DType::F32).named(names[1]),
    ];
    let policy = ClipPolicy::new(Rule::GlobalNorm(10.0)).with_group_report();
    let mut clip = GpuClipper::new(&ctx, &tensors, None, policy.clone())?;
    let mut monitor = GradMonitor::new();
    let groups = (n as u32).div_ceil(64);
    for _ in 0..STEPS {
        let mut encoder = device.create_command_encoder(&Default::default());
        {
            let mut pass = encoder.begin_compute_pass(&Default::default());
            pass.set_pipeline(&gradients);
            pass.set_bind_group(0, &grad_group, &[]);
            pass.dispatch_workgroups(groups, 1, 1);
        }
        let report = clip.encode(&mut encoder)?;
        {
            let mut pass = encoder.begin_compute_pass(&Default::default());
            pass.set_pipeline(&sgd);
            pass.set_bind_group(0, &sgd_group, &[]);
            pass.dispatch_workgroups(groups, 1, 1);
        }
        ctx.queue().submit([encoder.finish()]);
        // Hands the pending report over and goes on; nothing here waits for the GPU.
        monitor.track(report)?;
    }
    monitor.flush()?;
    println!(" step | norm before | norm after | coef");
    for r in monitor.records().iter().step_by(3) {
        println!(
            " {:4} | {:11.4} | {:10.4} | {:.4}",
            r.step,
            r.total_norm,
            r.total_norm_after.unwrap_or(f64::NAN),
            r.coef.unwrap_or(1.0)
        );
    }

    // The same training on the CPU path, as a check.
    let infos: Vec<TensorInfo> = (names.iter().zip(LENS))
        .map(|(name, len)| TensorInfo::new(*name, &[len]))
        .collect();
    let mut cpu = CpuClipper::new(policy, &infos)?;
    let mut w = init.clone();
    for _ in 0..STEPS {
        let mut g: Vec<f32> = (w.iter().enumerate())
            .map(|(i, &x)| stiffness(i) * (x - 1.0))
            .collect();
        let (g1, g2) = g.split_at_mut(LENS[0] as usize);
        cpu.step(&mut [GradMut::F32(g1), GradMut::F32(g2)], None)?;
        w.iter_mut().zip(&g).for_each(|(x, g)| *x -= 0.1 * g);
    }
    let gpu_w = read_back(&ctx, &weights)?;
    let diff = gpu_w
        .iter()
        .zip(&w)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f32, f32::max);
    let dist = |w: &[f32]| w.iter().map(|x| (x - 1.0) * (x - 1.0)).sum::<f32>().sqrt();
    println!(
        "distance to the optimum: {:.4} at the start, {:.4} after {STEPS} clipped steps",
        dist(&init),
        dist(&gpu_w)
    );
    println!("largest difference between GPU and CPU weights: {diff:.2e}");
    Ok(())
}
