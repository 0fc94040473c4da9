//! Criterion benches of the CPU path and, when an adapter exists, the GPU path:
//! total norm, global clip (clipping / not clipping) and value clip, f32 and bf16.

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use gradclip::{
    bf16, cpu, DType, GlobalNormClip, GpuBatch, GpuContext, GpuTensor, GradMut, GradRef, Norm,
    ValueClip,
};
use wgpu::util::DeviceExt;

/// 100 tensors, 4M elements in all (16 MB of f32).
fn lens() -> Vec<usize> {
    (0..100).map(|i| 40_000 + 97 * (i % 7)).collect()
}

fn f32_data() -> Vec<Vec<f32>> {
    lens()
        .iter()
        .enumerate()
        .map(|(t, &n)| {
            (0..n)
                .map(|i| ((i * 31 + t) as f32 * 0.001).sin() * 1e-3)
                .collect()
        })
        .collect()
}

fn bench_cpu(c: &mut Criterion) {
    let mut f = f32_data();
    let mut b: Vec<Vec<bf16>> = f
        .iter()
        .map(|t| t.iter().map(|&x| bf16::from_f32(x)).collect())
        .collect();
    let total = cpu::partial_norm(
        &f.iter().map(|t| GradRef::F32(t)).collect::<Vec<_>>(),
        Norm::L2,
    )
    .unwrap()
    .total();
    let mut g = c.benchmark_group("cpu");
    g.sample_size(10);
    for (name, bytes) in [("f32", 4), ("bf16", 2)] {
        let n: usize = lens().iter().sum();
        g.throughput(Throughput::Bytes((n * bytes) as u64));
        let mut grads: Vec<GradMut<'_>> = if name == "f32" {
            f.iter_mut().map(|t| GradMut::F32(t)).collect()
        } else {
            b.iter_mut().map(|t| GradMut::BF16(t)).collect()
        };
        g.bench_function(format!("total_norm/{name}"), |bch| {
            bch.iter(|| {
                cpu::partial_norm(
                    &grads.iter().map(|x| x.as_ref()).collect::<Vec<_>>(),
                    Norm::L2,
                )
                .unwrap()
            })
        });
        let no_clip = GlobalNormClip::new((total * 10.0) as f32);
        g.bench_function(format!("global_clip_not_clipping/{name}"), |bch| {
            bch.iter(|| cpu::clip_by_global_norm(&mut grads, &no_clip).unwrap())
        });
        let clipping = GlobalNormClip::new(1e-30);
        g.bench_function(format!("global_clip_clipping/{name}"), |bch| {
            bch.iter(|| cpu::clip_by_global_norm(&mut grads, &clipping).unwrap())
        });
        g.bench_function(format!("value_clip/{name}"), |bch| {
            bch.iter(|| cpu::clip_by_value(&mut grads, &ValueClip::symmetric(1e-4)).unwrap())
        });
    }
    g.finish();
}

fn run(
    g: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>,
    name: &str,
    dtype: DType,
    batch: &mut GpuBatch,
    op: &dyn Fn(&mut GpuBatch),
) {
    g.bench_function(format!("{name}/{dtype}"), |bch| bch.iter(|| op(batch)));
}

fn bench_gpu(c: &mut Criterion) {
    // Benches, unlike tests, may run without an adapter: then only the CPU group runs.
    let Ok(ctx) = GpuContext::new() else { return };
    let f = f32_data();
    let mut g = c.benchmark_group("gpu");
    g.sample_size(10);
    for dtype in [DType::F32, DType::BF16] {
        let mut bytes = Vec::new();
        let mut tensors = Vec::new();
        for t in &f {
            let start = bytes.len() as u64;
            match dtype {
                DType::F32 => bytes.extend_from_slice(bytemuck::cast_slice(t)),
                _ => bytes.extend(t.iter().flat_map(|&x| bf16::from_f32(x).to_le_bytes())),
            }
            tensors.push((start, t.len() as u64));
            bytes.resize(bytes.len().next_multiple_of(4), 0);
        }
        let buffer = ctx
            .device()
            .create_buffer_init(&wgpu::util::BufferInitDescriptor {
                label: None,
                contents: &bytes,
                usage: wgpu::BufferUsages::STORAGE,
            });
        let list: Vec<GpuTensor<'_>> = tensors
            .iter()
            .map(|&(o, n)| GpuTensor::new(&buffer, o, n, dtype))
            .collect();
        let mut batch = GpuBatch::new(&ctx, &list).unwrap();
        let total = batch
            .total_norm(Norm::L2, false)
            .unwrap()
            .wait()
            .unwrap()
            .total_norm;
        g.throughput(Throughput::Bytes(bytes.len() as u64));

        run(&mut g, "total_norm", dtype, &mut batch, &|b| {
            drop(b.total_norm(Norm::L2, false).unwrap().wait().unwrap())
        });
        let no_clip = GlobalNormClip::new((total * 10.0) as f32);
        run(
            &mut g,
            "global_clip_not_clipping",
            dtype,
            &mut batch,
            &|b| drop(b.clip_by_global_norm(&no_clip).unwrap().wait().unwrap()),
        );
        let clipping = GlobalNormClip::new(1e-30);
        run(&mut g, "global_clip_clipping", dtype, &mut batch, &|b| {
            drop(b.clip_by_global_norm(&clipping).unwrap().wait().unwrap())
        });
        run(&mut g, "value_clip", dtype, &mut batch, &|b| {
            b.clip_by_value(&ValueClip::symmetric(1e-4)).unwrap();
            ctx.device()
                .poll(wgpu::PollType::wait_indefinitely())
                .unwrap();
        });
    }
    g.finish();
}

criterion_group!(benches, bench_cpu, bench_gpu);
criterion_main!(benches);
