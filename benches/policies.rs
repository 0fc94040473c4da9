//! Criterion benches of the clipping policies: `cpu/policy/...` always, `gpu/policy/...`
//! when an adapter exists (benches may skip the GPU; the tests may not).
//!
//! ```text
//! cargo bench --bench policies [-- FILTER]
//! ```
//!
//! Workload: 48 f32 weight matrices of 256 x 341 elements (4.2M elements, 16.8 MB) with
//! parameters alongside for AGC; per-example clipping uses 16 examples of the same
//! tensors cut 16-fold. Every iteration starts from pristine gradients (the reset is not
//! timed), so each rule does its real work. GPU figures are wall time from the call
//! through `wait()`.
//!
//! `*/accumulate/add` times adding one micro-batch into the sums (no boundary: reads both,
//! writes the sums, so 3 x 16.8 MB of traffic), next to a same-run baseline: a plain
//! `s += m * scale` loop on the CPU, a buffer-to-buffer copy (2 x 16.8 MB) on the GPU.

use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use gradclip::{
    Agc, AutoClip, BlockRmsClip, ClipPolicy, CpuClipper, GaussianNoise, GpuClipper, GpuContext,
    GpuTensor, GradMut, GradRef, GroupClip, PerExampleClip, PerTensorClip, Rule, TensorInfo, ZClip,
};
use wgpu::util::DeviceExt;

const TENSORS: usize = 48;
const ROWS: u64 = 256;
const COLS: u64 = 341;
const BATCH: u32 = 16;

fn data(seed: u32) -> Vec<Vec<f32>> {
    let mut s = seed;
    (0..TENSORS)
        .map(|_| {
            (0..ROWS * COLS)
                .map(|_| {
                    s = s.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
                    (s >> 8) as f32 / (1u32 << 24) as f32 - 0.5
                })
                .collect()
        })
        .collect()
}

fn policies() -> Vec<(&'static str, ClipPolicy)> {
    vec![
        (
            "per_tensor",
            ClipPolicy::new(Rule::PerTensor(PerTensorClip { max_norm: 1.0 })),
        ),
        (
            "groups",
            ClipPolicy::new(Rule::Groups(GroupClip::new(0.8).group("a", "w1*", 0.5))),
        ),
        (
            "block_rms",
            ClipPolicy::new(Rule::BlockRms(BlockRmsClip { threshold: 0.01 })),
        ),
        ("agc_rows", ClipPolicy::new(Rule::Agc(Agc::new(0.01)))),
        (
            "autoclip",
            ClipPolicy::new(Rule::AutoClip(AutoClip::new(10.0, 1000))),
        ),
        ("zclip", ClipPolicy::new(Rule::ZClip(ZClip::default()))),
        (
            "global_noise",
            ClipPolicy::new(Rule::GlobalNorm(1.0)).noise(GaussianNoise {
                sigma: 1e-3,
                seed: 1,
            }),
        ),
    ]
}

fn infos() -> Vec<TensorInfo> {
    (0..TENSORS)
        .map(|i| TensorInfo::new(format!("w{i}"), &[ROWS, COLS]))
        .collect()
}

fn bench_cpu(c: &mut Criterion) {
    let pristine = data(1);
    let params = data(2);
    let p_refs: Vec<GradRef<'_>> = params.iter().map(|p| GradRef::F32(p)).collect();
    let mut g = c.benchmark_group("cpu/policy");
    g.throughput(Throughput::Bytes(TENSORS as u64 * ROWS * COLS * 4));
    g.sample_size(10);
    for (name, policy) in policies() {
        let mut run = CpuClipper::new(policy, &infos()).unwrap();
        g.bench_function(name, |b| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    let mut grads = pristine.clone();
                    let mut views: Vec<GradMut<'_>> =
                        grads.iter_mut().map(|x| GradMut::F32(x)).collect();
                    let t = Instant::now();
                    run.step(&mut views, Some(&p_refs)).unwrap();
                    total += t.elapsed();
                }
                total
            })
        });
    }
    let clip = PerExampleClip::new(BATCH, 1.0).noise(1.0, 3);
    let mut per_example = CpuClipper::per_example(clip, &infos()).unwrap();
    let mut outs: Vec<Vec<f32>> = (0..TENSORS)
        .map(|_| vec![0.0; (ROWS * COLS) as usize / BATCH as usize])
        .collect();
    g.bench_function("per_example", |b| {
        b.iter(|| {
            let mut views: Vec<&mut [f32]> = outs.iter_mut().map(|o| o.as_mut_slice()).collect();
            per_example.step(&p_refs, &mut views).unwrap()
        })
    });
    g.finish();
}

fn tensors(buf: &wgpu::Buffer) -> Vec<GpuTensor<'_>> {
    infos()
        .iter()
        .enumerate()
        .map(|(i, info)| {
            GpuTensor::new(
                buf,
                i as u64 * ROWS * COLS * 4,
                ROWS * COLS,
                gradclip::DType::F32,
            )
            .named(info.name.clone())
            .shaped(&info.shape)
        })
        .collect()
}

fn bench_gpu(c: &mut Criterion) {
    let Ok(ctx) = GpuContext::new() else {
        eprintln!("no wgpu adapter: GPU policy benches skipped");
        return;
    };
    let device = ctx.device();
    let bytes = TENSORS as u64 * ROWS * COLS * 4;
    let upload = |v: &[Vec<f32>], usage: wgpu::BufferUsages| {
        device.create_buffer_init(&wgpu::util::BufferInitDescriptor {
            label: None,
            contents: bytemuck::cast_slice(&v.concat()),
            usage: wgpu::BufferUsages::STORAGE | usage,
        })
    };
    let pristine = upload(&data(1), wgpu::BufferUsages::COPY_SRC);
    let grads = upload(&data(1), wgpu::BufferUsages::COPY_DST);
    let params = upload(&data(2), wgpu::BufferUsages::empty());
    let reset = || {
        let mut e = device.create_command_encoder(&Default::default());
        e.copy_buffer_to_buffer(&pristine, 0, &grads, 0, bytes);
        ctx.queue().submit([e.finish()]);
        device.poll(wgpu::PollType::wait_indefinitely()).unwrap();
    };
    let mut g = c.benchmark_group("gpu/policy");
    g.throughput(Throughput::Bytes(bytes));
    g.sample_size(10);
    let (gt, pt) = (tensors(&grads), tensors(&params));
    for (name, policy) in policies() {
        let mut run = GpuClipper::new(&ctx, &gt, Some(&pt), policy).unwrap();
        g.bench_function(name, |b| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    reset();
                    let t = Instant::now();
                    run.step().unwrap().wait().unwrap();
                    total += t.elapsed();
                }
                total
            })
        });
    }
    let out = device.create_buffer(&wgpu::BufferDescriptor {
        label: None,
        size: bytes / BATCH as u64,
        usage: wgpu::BufferUsages::STORAGE,
        mapped_at_creation: false,
    });
    let p = ROWS * COLS / BATCH as u64;
    let outs: Vec<GpuTensor<'_>> = (0..TENSORS)
        .map(|i| GpuTensor::new(&out, i as u64 * p * 4, p, gradclip::DType::F32))
        .collect();
    let mut run = GpuClipper::per_example(
        &ctx,
        &pt,
        &outs,
        PerExampleClip::new(BATCH, 1.0).noise(1.0, 3),
    )
    .unwrap();
    g.bench_function("per_example", |b| {
        b.iter(|| run.step().unwrap().wait().unwrap())
    });
    g.finish();
}

/// Micro-batches per accumulation, large enough that the benches never reach a boundary.
const NO_BOUNDARY: u32 = u32::MAX;

fn bench_accumulate(c: &mut Criterion) {
    let micro = data(1);
    let mut sums = data(2);
    let bytes = TENSORS as u64 * ROWS * COLS * 4;
    let mut g = c.benchmark_group("cpu/accumulate");
    g.throughput(Throughput::Bytes(3 * bytes));
    g.sample_size(10);
    let policy = ClipPolicy::global_norm(1.0);
    let mut acc = CpuClipper::accumulating(policy, &infos(), NO_BOUNDARY).unwrap();
    let m_refs: Vec<GradRef<'_>> = micro.iter().map(|p| GradRef::F32(p)).collect();
    g.bench_function("add", |b| {
        b.iter(|| {
            let mut views: Vec<GradMut<'_>> = sums.iter_mut().map(|x| GradMut::F32(x)).collect();
            acc.step(&mut views, &m_refs, None).unwrap()
        })
    });
    g.bench_function("baseline_loop", |b| {
        b.iter(|| {
            for (s, m) in sums.iter_mut().zip(&micro) {
                s.iter_mut().zip(m).for_each(|(s, m)| *s += m * 0.25);
            }
        })
    });
    g.finish();

    let Ok(ctx) = GpuContext::new() else {
        return;
    };
    let device = ctx.device();
    let buffer = |v: &[Vec<f32>]| {
        device.create_buffer_init(&wgpu::util::BufferInitDescriptor {
            label: None,
            contents: bytemuck::cast_slice(&v.concat()),
            usage: wgpu::BufferUsages::STORAGE
                | wgpu::BufferUsages::COPY_SRC
                | wgpu::BufferUsages::COPY_DST,
        })
    };
    let (micro_buf, sums_buf) = (buffer(&micro), buffer(&sums));
    let policy = ClipPolicy::new(Rule::GlobalNorm(1.0));
    let (mt, st) = (tensors(&micro_buf), tensors(&sums_buf));
    let mut acc = GpuClipper::accumulating(&ctx, &mt, &st, None, NO_BOUNDARY, policy).unwrap();
    let wait = || device.poll(wgpu::PollType::wait_indefinitely()).unwrap();
    let mut g = c.benchmark_group("gpu/accumulate");
    g.sample_size(10);
    g.throughput(Throughput::Bytes(3 * bytes));
    g.bench_function("add", |b| {
        b.iter(|| {
            acc.step().unwrap();
            wait();
        })
    });
    g.throughput(Throughput::Bytes(2 * bytes));
    g.bench_function("baseline_copy", |b| {
        b.iter(|| {
            let mut e = device.create_command_encoder(&Default::default());
            e.copy_buffer_to_buffer(&micro_buf, 0, &sums_buf, 0, bytes);
            ctx.queue().submit([e.finish()]);
            wait();
        })
    });
    g.finish();
}

criterion_group! {
    name = benches;
    // No HTML plots: gradclip's plotters build draws only with a registered font, and
    // the figures are what matters here.
    config = Criterion::default().without_plots().measurement_time(Duration::from_secs(3));
    targets = bench_cpu, bench_gpu, bench_accumulate
}
criterion_main!(benches);
