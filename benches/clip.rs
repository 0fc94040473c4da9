//! Criterion benches: `cpu/...` always, `gpu/...` when `GpuContext::new` finds an adapter
//! (benches may skip the GPU; the tests may not).
//!
//! ```text
//! cargo bench --bench clip [-- FILTER]      e.g. -- cpu/  or  -- global_clip
//! ```
//!
//! Ids are `{cpu,gpu}/{operation}/{dtype}/{workload}`; workloads are `16M` (100 tensors,
//! 16.8M elements) and `2000-small` (2000 tensors of 64..4096 elements, 3.1M elements).
//! Throughput counts the bytes an operation must move: a norm or an unclipped step reads
//! the gradients once, a clipping step reads twice and writes once, a value clip reads and
//! writes once. Operations that modify the gradients start every iteration from a pristine
//! copy; the reset is not timed. GPU figures are wall time from the call through `wait()`
//! (or a device poll for value clip). For kernel times and bandwidth floors run
//! `cargo run --release --example bench`.

use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use gradclip::{ClipReport, CpuClipper, DType, GpuClipper, GpuContext, GpuTensor, TensorInfo};
use wgpu::util::DeviceExt;

mod common;
use common::{gradients, small_lens, Flat, Op};

fn workloads() -> [(&'static str, Vec<usize>); 2] {
    [
        ("16M", (0..100).map(|i| 167_000 + 331 * (i % 7)).collect()),
        ("2000-small", small_lens()),
    ]
}

/// Sums the time of `iters` runs of `op` on `state`, each after an untimed `reset` when the
/// operation modifies the gradients.
fn timed<S>(
    iters: u64,
    op: Op,
    state: &mut S,
    mut reset: impl FnMut(&mut S),
    mut run: impl FnMut(&mut S) -> Option<ClipReport>,
) -> Duration {
    let mut total = Duration::ZERO;
    for _ in 0..iters {
        if op.mutates() {
            reset(state);
        }
        let t = Instant::now();
        let report = run(state);
        total += t.elapsed();
        // A step that did not clip as its name says would mislabel the figure.
        if let (Some(want), Some(r)) = (op.expect_clipped(), report) {
            assert_eq!(
                (r.clipped_units > 0),
                want,
                "{} clipped = {}",
                op.name(),
                (r.clipped_units > 0)
            );
        }
    }
    total
}

fn bench_cpu(c: &mut Criterion) {
    let mut g = c.benchmark_group("cpu");
    for (name, lens) in workloads() {
        let values = gradients(lens.iter().sum());
        for dtype in [DType::F32, DType::BF16] {
            let pristine = Flat::new(dtype, &values);
            let mut work = pristine.clone();
            let norm = pristine.total_norm(&lens);
            let infos = TensorInfo::unnamed(lens.iter().copied());
            for op in Op::ALL {
                let mut runner = CpuClipper::new(op.policy(norm), &infos).unwrap();
                g.throughput(Throughput::Bytes(
                    (op.traffic() * pristine.bytes().len() as f64) as u64,
                ));
                let id = BenchmarkId::new(op.name(), format!("{dtype}/{name}"));
                g.bench_function(id, |b| {
                    b.iter_custom(|iters| {
                        timed(
                            iters,
                            op,
                            &mut work,
                            |w| w.reset_from(&pristine),
                            |w| Some(runner.step(&mut w.muts(&lens), None).unwrap()),
                        )
                    })
                });
            }
        }
    }
    g.finish();
}

fn bench_gpu(c: &mut Criterion) {
    let ctx = match GpuContext::new() {
        Ok(ctx) => ctx,
        Err(e) => {
            eprintln!("gpu benches skipped: {e}");
            return;
        }
    };
    let (dev, queue) = (ctx.device(), ctx.queue());
    let wait = || {
        dev.poll(wgpu::PollType::wait_indefinitely())
            .expect("device poll")
    };
    let mut g = c.benchmark_group("gpu");
    for (name, lens) in workloads() {
        let values = gradients(lens.iter().sum());
        for dtype in [DType::F32, DType::BF16] {
            let host = Flat::new(dtype, &values);
            let norm = host.total_norm(&lens);
            let pristine = dev.create_buffer_init(&wgpu::util::BufferInitDescriptor {
                label: Some("bench pristine grads"),
                contents: host.bytes(),
                usage: wgpu::BufferUsages::COPY_SRC,
            });
            let work = dev.create_buffer(&wgpu::BufferDescriptor {
                label: Some("bench grads"),
                size: pristine.size(),
                usage: wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_DST,
                mapped_at_creation: false,
            });
            let reset = || {
                let mut enc = dev.create_command_encoder(&Default::default());
                enc.copy_buffer_to_buffer(&pristine, 0, &work, 0, work.size());
                queue.submit([enc.finish()]);
                wait();
            };
            reset();
            let mut offset = 0;
            let tensors: Vec<GpuTensor<'_>> = lens
                .iter()
                .map(|&n| {
                    let t = GpuTensor::new(&work, offset, n as u64, dtype);
                    offset += n as u64 * dtype.size();
                    t
                })
                .collect();
            for op in Op::ALL {
                let mut runner = GpuClipper::new(&ctx, &tensors, None, op.policy(norm)).unwrap();
                g.throughput(Throughput::Bytes(
                    (op.traffic() * host.bytes().len() as f64) as u64,
                ));
                let id = BenchmarkId::new(op.name(), format!("{dtype}/{name}"));
                g.bench_function(id, |b| {
                    b.iter_custom(|iters| {
                        timed(
                            iters,
                            op,
                            &mut runner,
                            |_| reset(),
                            |runner| {
                                let report = runner.step().unwrap();
                                wait();
                                Some(report.wait().unwrap())
                            },
                        )
                    })
                });
            }
        }
    }
    g.finish();
}

criterion_group! {
    name = benches;
    // Small samples and short windows: the whole run takes a few minutes on two cores.
    // No HTML plots: gradclip's plotters build draws only with a registered font, and
    // the figures are what matters here.
    config = Criterion::default()
        .without_plots()
        .sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_millis(1500));
    targets = bench_cpu, bench_gpu
}
criterion_main!(benches);
