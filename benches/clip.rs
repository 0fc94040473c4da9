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

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use gradclip::{
    bf16, cpu, ClipReport, DType, GlobalNormClip, GpuBatch, GpuContext, GpuTensor, GradMut,
    GradRef, Norm, ValueClip,
};
use rayon::prelude::*;
use wgpu::util::DeviceExt;

const BLOCK: usize = 1 << 16;
const SIGMA: f32 = 1e-3;

fn workloads() -> [(&'static str, Vec<usize>); 2] {
    const SMALL: [usize; 6] = [64, 257, 768, 1000, 3072, 4096];
    [
        ("16M", (0..100).map(|i| 167_000 + 331 * (i % 7)).collect()),
        (
            "2000-small",
            (0..2000).map(|i| SMALL[i % SMALL.len()]).collect(),
        ),
    ]
}

/// Deterministic gradients, roughly N(0, SIGMA^2), independent of the thread count.
fn gradients(n: usize) -> Vec<f32> {
    let mut v = vec![0.0f32; n];
    v.par_chunks_mut(BLOCK).enumerate().for_each(|(b, chunk)| {
        let mut s = (b as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        for x in chunk {
            let mut u = 0.0f32;
            for _ in 0..4 {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                u += (s >> 40) as f32 / (1u64 << 24) as f32;
            }
            *x = (u - 2.0) * 3f32.sqrt() * SIGMA;
        }
    });
    v
}

/// One workload's tensors back to back in one allocation (bytes as in the GPU buffer).
#[derive(Clone)]
enum Flat {
    F32(Vec<f32>),
    BF16(Vec<bf16>),
}

fn split<'a, T>(mut rest: &'a [T], lens: &[usize]) -> Vec<&'a [T]> {
    lens.iter()
        .map(|&n| {
            let (head, tail) = rest.split_at(n);
            rest = tail;
            head
        })
        .collect()
}

fn split_mut<'a, T>(mut rest: &'a mut [T], lens: &[usize]) -> Vec<&'a mut [T]> {
    lens.iter()
        .map(|&n| {
            let (head, tail) = std::mem::take(&mut rest).split_at_mut(n);
            rest = tail;
            head
        })
        .collect()
}

impl Flat {
    fn new(dtype: DType, values: &[f32]) -> Flat {
        match dtype {
            DType::BF16 => Flat::BF16(values.par_iter().map(|&x| bf16::from_f32(x)).collect()),
            _ => Flat::F32(values.to_vec()),
        }
    }
    fn bytes(&self) -> &[u8] {
        match self {
            Flat::F32(v) => bytemuck::cast_slice(v),
            Flat::BF16(v) => bytemuck::cast_slice(v),
        }
    }
    fn refs<'a>(&'a self, lens: &[usize]) -> Vec<GradRef<'a>> {
        match self {
            Flat::F32(v) => split(v, lens).into_iter().map(GradRef::from).collect(),
            Flat::BF16(v) => split(v, lens).into_iter().map(GradRef::from).collect(),
        }
    }
    fn muts<'a>(&'a mut self, lens: &[usize]) -> Vec<GradMut<'a>> {
        match self {
            Flat::F32(v) => split_mut(v, lens).into_iter().map(GradMut::from).collect(),
            Flat::BF16(v) => split_mut(v, lens).into_iter().map(GradMut::from).collect(),
        }
    }
    fn reset_from(&mut self, pristine: &Flat) {
        fn copy<T: Copy + Send + Sync>(d: &mut [T], s: &[T]) {
            d.par_chunks_mut(BLOCK)
                .zip(s.par_chunks(BLOCK))
                .for_each(|(d, s)| d.copy_from_slice(s));
        }
        match (self, pristine) {
            (Flat::F32(d), Flat::F32(s)) => copy(d, s),
            (Flat::BF16(d), Flat::BF16(s)) => copy(d, s),
            _ => unreachable!("same dtype"),
        }
    }
}

#[derive(Clone, Copy)]
enum Op {
    Norm,
    Clipping,
    NotClipping,
    Value,
}

impl Op {
    const ALL: [Op; 4] = [Op::Norm, Op::Clipping, Op::NotClipping, Op::Value];

    fn name(self) -> &'static str {
        match self {
            Op::Norm => "total_norm",
            Op::Clipping => "global_clip_clipping",
            Op::NotClipping => "global_clip_not_clipping",
            Op::Value => "value_clip",
        }
    }
    /// Bytes moved per byte of gradients.
    fn traffic(self) -> u64 {
        match self {
            Op::Norm | Op::NotClipping => 1,
            Op::Clipping => 3,
            Op::Value => 2,
        }
    }
    fn mutates(self) -> bool {
        matches!(self, Op::Clipping | Op::Value)
    }
    /// Panics when a step did not clip as its name says: the figure would be mislabelled.
    fn check(self, report: Option<ClipReport>) {
        if let Some(r) = report {
            match self {
                Op::Clipping => assert!(r.clipped, "clipping step did not clip"),
                Op::NotClipping => assert!(!r.clipped, "non-clipping step clipped"),
                _ => {}
            }
        }
    }
}

struct Params {
    clipping: GlobalNormClip,
    not_clipping: GlobalNormClip,
    value: ValueClip,
}

impl Params {
    fn new(norm: f64) -> Params {
        Params {
            clipping: GlobalNormClip::new((norm * 0.5) as f32),
            not_clipping: GlobalNormClip::new((norm * 10.0) as f32),
            value: ValueClip::symmetric(SIGMA),
        }
    }
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
        op.check(report);
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
            let norm = cpu::partial_norm(&pristine.refs(&lens), Norm::L2)
                .unwrap()
                .total();
            let p = Params::new(norm);
            for op in Op::ALL {
                g.throughput(Throughput::Bytes(
                    op.traffic() * pristine.bytes().len() as u64,
                ));
                let id = BenchmarkId::new(op.name(), format!("{dtype}/{name}"));
                g.bench_function(id, |b| {
                    b.iter_custom(|iters| {
                        timed(
                            iters,
                            op,
                            &mut work,
                            |w| w.reset_from(&pristine),
                            |w| match op {
                                Op::Norm => {
                                    black_box(cpu::partial_norm(&w.refs(&lens), Norm::L2)).unwrap();
                                    None
                                }
                                Op::Clipping | Op::NotClipping => {
                                    let clip = if matches!(op, Op::Clipping) {
                                        &p.clipping
                                    } else {
                                        &p.not_clipping
                                    };
                                    Some(
                                        cpu::clip_by_global_norm(&mut w.muts(&lens), clip).unwrap(),
                                    )
                                }
                                Op::Value => {
                                    cpu::clip_by_value(&mut w.muts(&lens), &p.value).unwrap();
                                    None
                                }
                            },
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
            let norm = cpu::partial_norm(&host.refs(&lens), Norm::L2)
                .unwrap()
                .total();
            let p = Params::new(norm);
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
            let mut batch = GpuBatch::new(&ctx, &tensors).unwrap();
            for op in Op::ALL {
                g.throughput(Throughput::Bytes(op.traffic() * host.bytes().len() as u64));
                let id = BenchmarkId::new(op.name(), format!("{dtype}/{name}"));
                g.bench_function(id, |b| {
                    b.iter_custom(|iters| {
                        timed(
                            iters,
                            op,
                            &mut batch,
                            |_| reset(),
                            |batch| match op {
                                Op::Norm => {
                                    Some(batch.total_norm(Norm::L2, false).unwrap().wait().unwrap())
                                }
                                Op::Clipping => Some(
                                    batch
                                        .clip_by_global_norm(&p.clipping)
                                        .unwrap()
                                        .wait()
                                        .unwrap(),
                                ),
                                Op::NotClipping => Some(
                                    batch
                                        .clip_by_global_norm(&p.not_clipping)
                                        .unwrap()
                                        .wait()
                                        .unwrap(),
                                ),
                                Op::Value => {
                                    batch.clip_by_value(&p.value).unwrap();
                                    wait();
                                    None
                                }
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
    config = Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_millis(1500));
    targets = bench_cpu, bench_gpu
}
criterion_main!(benches);
