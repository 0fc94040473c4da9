//! The main job: list adapters, check the GPU against the CPU oracle, and time total norm,
//! global clip (clipping / not clipping) and value clip on the GPT-2 small shapes and on
//! 2000 small tensors, f32 and bf16, next to memory-bandwidth floors measured in this run.
//!
//! cargo run --release --example bench [-- --quick] [-- --cpu-only] [-- --shapes PATH]
//!
//! GPU times come from timestamp queries when the adapter has them (kernel time), else
//! from wall time around submit + wait. GB/s counts the bytes each operation must move:
//! norm 1 read; clip 2 reads + 1 write; no-clip 1 read; value clip 1 read + 1 write.

use std::time::Instant;

use gradclip::{
    bf16, cpu, DType, GlobalNormClip, GpuBatch, GpuContext, GpuTensor, GradMut, GradRef, Norm,
    ValueClip,
};
use rayon::prelude::*;
use wgpu::util::DeviceExt;

const RUNS: usize = 7;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn load_shapes(path: &str, quick: bool) -> Vec<usize> {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{path}: {e}"));
    let mut lens: Vec<usize> = text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .map(|l| {
            l.split('\t')
                .nth(1)
                .expect("name<TAB>dims")
                .split('x')
                .map(|d| d.parse::<usize>().unwrap())
                .product()
        })
        .collect();
    if quick {
        lens.iter_mut().for_each(|n| *n = (*n / 16).max(1));
    }
    lens
}

fn values(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            ((s >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 2e-3
        })
        .collect()
}

enum Data {
    F32(Vec<Vec<f32>>),
    BF16(Vec<Vec<bf16>>),
}

impl Data {
    fn refs(&self) -> Vec<GradRef<'_>> {
        match self {
            Data::F32(v) => v.iter().map(|t| GradRef::F32(t)).collect(),
            Data::BF16(v) => v.iter().map(|t| GradRef::BF16(t)).collect(),
        }
    }
    fn muts(&mut self) -> Vec<GradMut<'_>> {
        match self {
            Data::F32(v) => v.iter_mut().map(|t| GradMut::F32(t)).collect(),
            Data::BF16(v) => v.iter_mut().map(|t| GradMut::BF16(t)).collect(),
        }
    }
    fn bytes(&self) -> f64 {
        self.refs().iter().map(|r| r.as_bytes().len() as f64).sum()
    }
}

fn row(what: &str, ms: f64, bytes: f64, floor_ms: f64) {
    println!(
        "  {what:<34} {ms:>9.3} ms {:>8.1} GB/s {:>6.0}% of floor ({floor_ms:.3} ms)",
        bytes / ms / 1e6,
        100.0 * floor_ms / ms
    );
}

/// CPU floors: a parallel read pass and a parallel read+write pass over `bytes` bytes.
fn cpu_floors(bytes: usize) -> (f64, f64) {
    let mut buf = vec![1.0f32; bytes / 4];
    let read = median(
        (0..RUNS)
            .map(|_| {
                let t = Instant::now();
                // Eight independent lanes so the floor is memory-bound, not latency-bound.
                let s: f32 = buf
                    .par_chunks(1 << 16)
                    .map(|c| {
                        let mut acc = [0.0f32; 8];
                        c.chunks_exact(8)
                            .for_each(|x| (0..8).for_each(|i| acc[i] += x[i]));
                        acc.iter().sum::<f32>()
                    })
                    .sum();
                std::hint::black_box(s);
                t.elapsed().as_secs_f64() * 1e3
            })
            .collect(),
    );
    let rw = median(
        (0..RUNS)
            .map(|_| {
                let t = Instant::now();
                buf.par_chunks_mut(1 << 16)
                    .for_each(|c| c.iter_mut().for_each(|v| *v *= 1.0000001));
                t.elapsed().as_secs_f64() * 1e3
            })
            .collect(),
    );
    (read, rw)
}

fn bench_cpu(name: &str, data: &mut Data) {
    let bytes = data.bytes();
    let (read, rw) = cpu_floors(bytes as usize);
    println!(
        "CPU {name}: {:.1} MB; floors: read {read:.3} ms ({:.1} GB/s), read+write {rw:.3} ms",
        bytes / 1e6,
        bytes / read / 1e6
    );
    let time = |data: &mut Data, f: &dyn Fn(&mut Data)| {
        median(
            (0..RUNS)
                .map(|_| {
                    let t = Instant::now();
                    f(data);
                    t.elapsed().as_secs_f64() * 1e3
                })
                .collect(),
        )
    };
    let total = cpu::partial_norm(&data.refs(), Norm::L2).unwrap().total();
    row(
        "total norm (L2)",
        time(data, &|d| {
            std::hint::black_box(cpu::partial_norm(&d.refs(), Norm::L2).unwrap());
        }),
        bytes,
        read,
    );
    let no_clip = GlobalNormClip::new((total * 10.0) as f32);
    row(
        "global clip, not clipping",
        time(data, &|d| {
            assert!(
                !cpu::clip_by_global_norm(&mut d.muts(), &no_clip)
                    .unwrap()
                    .clipped
            )
        }),
        bytes,
        read,
    );
    // The norm shrinks each run, so clip to a tiny fraction: every run still clips.
    let clipping = GlobalNormClip::new((total * 1e-30) as f32);
    row(
        "global clip, clipping",
        time(data, &|d| {
            assert!(
                cpu::clip_by_global_norm(&mut d.muts(), &clipping)
                    .unwrap()
                    .clipped
            )
        }),
        2.0 * bytes,
        read + rw,
    );
    row(
        "value clip",
        time(data, &|d| {
            cpu::clip_by_value(&mut d.muts(), &ValueClip::symmetric(1e-3)).unwrap()
        }),
        bytes,
        rw,
    );
}

fn bench_gpu(ctx: &GpuContext, name: &str, data: &Data) -> bool {
    let dev = ctx.device();
    let refs = data.refs();
    let mut offsets = Vec::new();
    let mut contents = Vec::new();
    for r in &refs {
        contents.resize(contents.len().next_multiple_of(4), 0);
        offsets.push(contents.len() as u64);
        contents.extend_from_slice(r.as_bytes());
    }
    contents.resize(contents.len().next_multiple_of(4), 0);
    let buffer = dev.create_buffer_init(&wgpu::util::BufferInitDescriptor {
        label: Some("bench grads"),
        contents: &contents,
        usage: wgpu::BufferUsages::STORAGE
            | wgpu::BufferUsages::COPY_SRC
            | wgpu::BufferUsages::COPY_DST,
    });
    let tensors: Vec<GpuTensor<'_>> = refs
        .iter()
        .zip(&offsets)
        .map(|(r, &o)| GpuTensor::new(&buffer, o, r.len() as u64, r.dtype()))
        .collect();
    let mut batch = GpuBatch::new(ctx, &tensors).expect("batch");
    let bytes = data.bytes();

    // Oracle check first.
    let want = cpu::partial_norm(&refs, Norm::L2).unwrap().total();
    let got = batch
        .total_norm(Norm::L2, false)
        .unwrap()
        .wait()
        .unwrap()
        .total_norm;
    let rel = (got - want).abs() / want;
    let ok = rel < 1e-5;
    println!("GPU {name}: {:.1} MB; oracle check: norm {got:.6e} vs CPU {want:.6e}, rel err {rel:.1e} {}", bytes / 1e6, if ok { "PASS" } else { "FAIL" });

    let timestamps = dev.features().contains(wgpu::Features::TIMESTAMP_QUERY);
    let qs = timestamps.then(|| {
        dev.create_query_set(&wgpu::QuerySetDescriptor {
            label: None,
            ty: wgpu::QueryType::Timestamp,
            count: 2,
        })
    });
    let resolve = dev.create_buffer(&wgpu::BufferDescriptor {
        label: None,
        size: 16,
        usage: wgpu::BufferUsages::QUERY_RESOLVE | wgpu::BufferUsages::COPY_SRC,
        mapped_at_creation: false,
    });
    let readback = dev.create_buffer(&wgpu::BufferDescriptor {
        label: None,
        size: 16,
        usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
        mapped_at_creation: false,
    });
    let period = ctx.queue().get_timestamp_period() as f64;
    if let Some(qs) = &qs {
        batch.set_timestamp_writes(Some((qs.clone(), 0, 1)));
    }
    // Runs one encoded step and returns its time in ms (kernel time when timestamps exist).
    let run = |batch: &mut GpuBatch, f: &dyn Fn(&mut GpuBatch, &mut wgpu::CommandEncoder)| {
        let mut enc = dev.create_command_encoder(&Default::default());
        f(batch, &mut enc);
        if let Some(qs) = &qs {
            enc.resolve_query_set(qs, 0..2, &resolve, 0);
            enc.copy_buffer_to_buffer(&resolve, 0, &readback, 0, 16);
        }
        let t = Instant::now();
        ctx.queue().submit([enc.finish()]);
        dev.poll(wgpu::PollType::wait_indefinitely()).unwrap();
        let wall = t.elapsed().as_secs_f64() * 1e3;
        if qs.is_none() {
            return wall;
        }
        readback.map_async(wgpu::MapMode::Read, .., |_| {});
        dev.poll(wgpu::PollType::wait_indefinitely()).unwrap();
        let ts: Vec<u64> = bytemuck::pod_collect_to_vec(&readback.get_mapped_range(..).unwrap());
        readback.unmap();
        (ts[1].saturating_sub(ts[0])) as f64 * period / 1e6
    };
    let time = |batch: &mut GpuBatch, f: &dyn Fn(&mut GpuBatch, &mut wgpu::CommandEncoder)| {
        median((0..RUNS).map(|_| run(batch, f)).collect())
    };

    // Floor: a buffer-to-buffer copy of the same size (one read + one write), timed the same way.
    let src = &buffer;
    let dst = dev.create_buffer(&wgpu::BufferDescriptor {
        label: None,
        size: src.size(),
        usage: wgpu::BufferUsages::COPY_DST | wgpu::BufferUsages::STORAGE,
        mapped_at_creation: false,
    });
    let copy_ms = median(
        (0..RUNS)
            .map(|_| {
                let mut enc = dev.create_command_encoder(&Default::default());
                if let Some(qs) = &qs {
                    // Timestamps around the copy through an empty pass pair keep the method identical.
                    drop(enc.begin_compute_pass(&wgpu::ComputePassDescriptor {
                        label: None,
                        timestamp_writes: Some(wgpu::ComputePassTimestampWrites {
                            query_set: qs,
                            beginning_of_pass_write_index: Some(0),
                            end_of_pass_write_index: None,
                        }),
                    }));
                    enc.copy_buffer_to_buffer(src, 0, &dst, 0, src.size());
                    drop(enc.begin_compute_pass(&wgpu::ComputePassDescriptor {
                        label: None,
                        timestamp_writes: Some(wgpu::ComputePassTimestampWrites {
                            query_set: qs,
                            beginning_of_pass_write_index: None,
                            end_of_pass_write_index: Some(1),
                        }),
                    }));
                    enc.resolve_query_set(qs, 0..2, &resolve, 0);
                    enc.copy_buffer_to_buffer(&resolve, 0, &readback, 0, 16);
                } else {
                    enc.copy_buffer_to_buffer(src, 0, &dst, 0, src.size());
                }
                let t = Instant::now();
                ctx.queue().submit([enc.finish()]);
                dev.poll(wgpu::PollType::wait_indefinitely()).unwrap();
                if qs.is_none() {
                    return t.elapsed().as_secs_f64() * 1e3;
                }
                readback.map_async(wgpu::MapMode::Read, .., |_| {});
                dev.poll(wgpu::PollType::wait_indefinitely()).unwrap();
                let ts: Vec<u64> =
                    bytemuck::pod_collect_to_vec(&readback.get_mapped_range(..).unwrap());
                readback.unmap();
                (ts[1].saturating_sub(ts[0])) as f64 * period / 1e6
            })
            .collect(),
    );
    // A copy moves 2x bytes: half of it is the one-read floor, 1.5x the clip floor.
    let read_floor = copy_ms / 2.0;
    println!(
        "  floor: copy of {:.1} MB in {copy_ms:.3} ms = {:.1} GB/s ({})",
        bytes / 1e6,
        2.0 * bytes / copy_ms / 1e6,
        if timestamps {
            "timestamps"
        } else {
            "wall clock"
        }
    );
    let no_clip = GlobalNormClip::new((want * 10.0) as f32);
    let clipping = GlobalNormClip::new((want * 1e-30) as f32);
    row(
        "total norm (L2)",
        time(&mut batch, &|b, e| {
            drop(b.encode_total_norm(e, Norm::L2, false).unwrap())
        }),
        bytes,
        read_floor,
    );
    row(
        "global clip, not clipping",
        time(&mut batch, &|b, e| {
            drop(b.encode_clip_by_global_norm(e, &no_clip).unwrap())
        }),
        bytes,
        read_floor,
    );
    row(
        "global clip, clipping",
        time(&mut batch, &|b, e| {
            drop(b.encode_clip_by_global_norm(e, &clipping).unwrap())
        }),
        3.0 * bytes,
        3.0 * read_floor,
    );
    row(
        "value clip",
        time(&mut batch, &|b, e| {
            b.encode_clip_by_value(e, &ValueClip::symmetric(1e-3))
                .unwrap()
        }),
        2.0 * bytes,
        copy_ms,
    );
    ok
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let quick =
        args.iter().any(|a| a == "--quick") || std::env::var("GRADCLIP_BENCH_QUICK").is_ok();
    let cpu_only = args.iter().any(|a| a == "--cpu-only");
    let path = args
        .iter()
        .position(|a| a == "--shapes")
        .map(|i| args[i + 1].clone())
        .unwrap_or_else(|| "../shared/bench/gpt2-small-shapes.txt".into());

    let instance =
        wgpu::Instance::new(wgpu::InstanceDescriptor::new_without_display_handle_from_env());
    for a in pollster::block_on(instance.enumerate_adapters(wgpu::Backends::all())) {
        let i = a.get_info();
        println!(
            "adapter: {} ({:?}, {:?}, driver {})",
            i.name, i.device_type, i.backend, i.driver_info
        );
    }
    let ctx = if cpu_only {
        None
    } else {
        GpuContext::new()
            .map_err(|e| println!("no GPU: {e}; CPU only"))
            .ok()
    };
    if let Some(i) = ctx.as_ref().and_then(|c| c.adapter_info()) {
        println!("using: {} ({:?})", i.name, i.backend);
    }
    println!("CPU threads: {}", rayon::current_num_threads());

    let gpt2 = load_shapes(&path, quick);
    let small: Vec<usize> = (0..2000)
        .map(|i| [64, 257, 768, 1000, 3072, 4096][i % 6])
        .collect();
    let mut ok = true;
    for (wname, lens) in [("gpt2-small", &gpt2), ("2000 small tensors", &small)] {
        let n: usize = lens.iter().sum();
        for dtype in [DType::F32, DType::BF16] {
            let f32s: Vec<Vec<f32>> = lens
                .iter()
                .enumerate()
                .map(|(i, &n)| values(n, i as u64 + 1))
                .collect();
            let mut data = match dtype {
                DType::BF16 => Data::BF16(
                    f32s.iter()
                        .map(|t| t.iter().map(|&x| bf16::from_f32(x)).collect())
                        .collect(),
                ),
                _ => Data::F32(f32s),
            };
            let name = format!("{wname} {dtype} ({} tensors, {n} elements)", lens.len());
            if let Some(ctx) = &ctx {
                ok &= bench_gpu(ctx, &name, &data);
            }
            bench_cpu(&name, &mut data);
        }
    }
    if !ok {
        eprintln!("oracle check FAILED");
        std::process::exit(1);
    }
}
