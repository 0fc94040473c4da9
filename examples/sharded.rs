//! Sharded global-norm clipping over MPI: GPT-2 small's gradients cut ZeRO-style across
//! the ranks, each rank clipping its shard so that the result is the single-process clip.
//! Prints each rank's share and the combined report, and times a sharded step against
//! the same clip of the rank's shard alone (medians), with the all-reduce's share.
//!
//! ```text
//! cargo build --release --features mpi --example sharded
//! mpiexec -n 2 target/release/examples/sharded            # CPU, GPT-2 small
//! mpiexec -n 2 target/release/examples/sharded --gpu --scale 16
//! ```
//! `--scale K` divides every tensor's first axis by K; `--steps S` sets the timed steps.

use std::cell::Cell;
use std::time::{Duration, Instant};

use gradclip::{
    ClipError, ClipPolicy, ClipReport, Collective, CpuClipper, DType, GpuClipper, GpuContext,
    GpuTensor, GradMut, MpiCollective, Rule, Shard, TensorInfo,
};

/// A collective that adds up the time spent in it.
struct Timed<C> {
    inner: C,
    spent: Cell<Duration>,
}

impl<C: Collective> Timed<C> {
    fn time<T>(&self, f: impl FnOnce() -> T) -> T {
        let start = Instant::now();
        let out = f();
        self.spent.set(self.spent.get() + start.elapsed());
        out
    }
}

impl<C: Collective> Collective for Timed<C> {
    fn rank(&self) -> usize {
        self.inner.rank()
    }
    fn size(&self) -> usize {
        self.inner.size()
    }
    fn all_reduce_max(&self, v: &mut [f64]) -> Result<(), ClipError> {
        self.time(|| self.inner.all_reduce_max(v))
    }
    fn all_reduce_sum(&self, v: &mut [f64]) -> Result<(), ClipError> {
        self.time(|| self.inner.all_reduce_sum(v))
    }
    fn all_reduce_or(&self, v: &mut [u32]) -> Result<(), ClipError> {
        self.time(|| self.inner.all_reduce_or(v))
    }
}

/// GPT-2 small's tensors (bench/gpt2-small-shapes.txt), first axes divided by `scale`.
fn shapes(scale: u64) -> Vec<TensorInfo> {
    let text = include_str!("../bench/gpt2-small-shapes.txt");
    (text.lines())
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .map(|l| {
            let (name, dims) = l.split_once('\t').expect("name<TAB>dims");
            let mut shape: Vec<u64> = dims.split('x').map(|d| d.parse().unwrap()).collect();
            shape[0] = (shape[0] / scale).max(1);
            TensorInfo::new(name, &shape)
        })
        .collect()
}

/// This rank's part of every tensor: values keyed by their logical index.
fn shard_values(infos: &[TensorInfo], shard: &Shard) -> Vec<Vec<f32>> {
    (0..infos.len())
        .map(|t| {
            let r = shard.range(t);
            (r.start..r.end)
                .map(|i| {
                    let x = (i ^ (t as u64) << 40).wrapping_mul(0x9E37_79B9_7F4A_7C15);
                    ((x >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 1e-3
                })
                .collect()
        })
        .collect()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// The largest of `x` over the ranks (the slowest rank sets a step's time).
fn slowest(comm: &dyn Collective, x: f64) -> f64 {
    let mut v = [x];
    comm.all_reduce_max(&mut v).expect("all-reduce");
    v[0]
}

fn main() {
    // Any failure ends the whole job: a rank that returned would leave the others waiting.
    MpiCollective::abort_on_panic();
    if let Err(e) = run() {
        panic!("{e}");
    }
}

fn run() -> Result<(), ClipError> {
    let args: Vec<String> = std::env::args().collect();
    let arg = |name: &str, default: u64| {
        (args.iter().position(|a| a == name))
            .map_or(default, |i| args[i + 1].parse().expect("a number"))
    };
    let (gpu, scale, steps) = (
        args.iter().any(|a| a == "--gpu"),
        arg("--scale", 1),
        arg("--steps", 9),
    );
    let world = MpiCollective::init()?;
    let comm = Timed {
        inner: &world,
        spent: Cell::new(Duration::ZERO),
    };
    let (rank, ranks) = (comm.rank(), comm.size());
    let infos = shapes(scale);
    let total: u64 = infos.iter().map(|t| t.len()).sum();
    let shard = Shard::even(&infos, rank, ranks)?;
    let held: Vec<usize> = (0..infos.len())
        .filter(|&t| shard.local_len(t) > 0)
        .collect();
    let mine: u64 = held.iter().map(|&t| shard.local_len(t)).sum();
    let cut = held
        .iter()
        .filter(|&&t| shard.local_len(t) < infos[t].len())
        .count();
    println!(
        "rank {rank}/{ranks}: {mine} of {total} elements ({:.1}%), {} tensors, {cut} of them cut",
        100.0 * mine as f64 / total as f64,
        held.len()
    );
    world.barrier();
    let policy = ClipPolicy::new(Rule::GlobalNorm(1e-3));
    let fresh = shard_values(&infos, &shard);
    // The same clip of this rank's shard alone: the work without the exchange.
    let local_infos: Vec<TensorInfo> = (held.iter())
        .map(|&t| TensorInfo::new(infos[t].name.clone(), &[shard.local_len(t)]))
        .collect();
    // Per timed step (after two warm-up steps): sharded step, its collectives, alone.
    let mut times: [Vec<f64>; 3] = Default::default();
    let mut record = |k: u64, t: [Duration; 3]| {
        if k >= 2 {
            (times.iter_mut().zip(t)).for_each(|(v, d)| v.push(d.as_secs_f64() * 1e3));
        }
    };
    let mut report: Option<ClipReport> = None;
    if gpu {
        let ctx = GpuContext::new()?;
        let bytes: Vec<u8> = fresh
            .iter()
            .flat_map(|v| bytemuck::cast_slice(v).to_vec())
            .collect();
        let buffer = ctx
            .device()
            .create_buffer(&gradclip::wgpu::BufferDescriptor {
                label: Some("shard"),
                size: (bytes.len() as u64).max(4),
                usage: gradclip::wgpu::BufferUsages::STORAGE
                    | gradclip::wgpu::BufferUsages::COPY_DST,
                mapped_at_creation: false,
            });
        let mut at = 0;
        let tensors: Vec<GpuTensor<'_>> = (0..infos.len())
            .map(|t| {
                let n = shard.local_len(t);
                at += n * 4;
                GpuTensor::new(&buffer, at - n * 4, n, DType::F32)
            })
            .collect();
        let mut sharded = GpuClipper::sharded(
            &ctx,
            &tensors,
            None,
            policy.clone(),
            &infos,
            shard.clone(),
            &comm,
        )?;
        let local: Vec<GpuTensor<'_>> = held.iter().map(|&t| tensors[t].clone()).collect();
        let mut alone = GpuClipper::new(&ctx, &local, None, policy.clone())?;
        for k in 0..steps + 2 {
            ctx.queue().write_buffer(&buffer, 0, &bytes);
            ctx.device()
                .poll(gradclip::wgpu::PollType::wait_indefinitely())
                .ok();
            comm.spent.set(Duration::ZERO);
            let start = Instant::now();
            let r = sharded.step()?;
            let (s, e) = (start.elapsed(), comm.spent.get());
            ctx.queue().write_buffer(&buffer, 0, &bytes);
            let start = Instant::now();
            alone.step()?.wait()?;
            record(k, [s, e, start.elapsed()]);
            report = Some(r);
        }
    } else {
        let mut sharded = CpuClipper::sharded(policy.clone(), &infos, shard.clone(), &comm)?;
        let mut alone = CpuClipper::new(policy, &local_infos)?;
        for k in 0..steps + 2 {
            let mut parts = fresh.clone();
            let mut grads: Vec<GradMut<'_>> = parts.iter_mut().map(|v| GradMut::F32(v)).collect();
            comm.spent.set(Duration::ZERO);
            let start = Instant::now();
            let r = sharded.step(&mut grads, None)?;
            let (s, e) = (start.elapsed(), comm.spent.get());
            let mut parts: Vec<Vec<f32>> = held.iter().map(|&t| fresh[t].clone()).collect();
            let mut grads: Vec<GradMut<'_>> = parts.iter_mut().map(|v| GradMut::F32(v)).collect();
            let start = Instant::now();
            alone.step(&mut grads, None)?;
            record(k, [s, e, start.elapsed()]);
            report = Some(r);
        }
    }
    // The exchange alone, all ranks ready (a barrier first): what a step's three
    // collectives cost without waiting for a slower rank.
    let units = report.as_ref().map_or(0, |r| r.units as usize);
    let bare: Vec<f64> = (0..steps)
        .map(|_| {
            let (mut f, mut o) = (vec![1.0; units], vec![0u32; units + 1]);
            world.barrier();
            let start = Instant::now();
            world.all_reduce_max(&mut f).expect("max");
            world.all_reduce_sum(&mut f).expect("sum");
            world.all_reduce_or(&mut o).expect("or");
            start.elapsed().as_secs_f64() * 1e3
        })
        .collect();
    let [step, exchange, local] = times.map(median);
    let (step, exchange, local, bare) = (
        slowest(&world, step),
        slowest(&world, exchange),
        slowest(&world, local),
        slowest(&world, median(bare)),
    );
    if rank == 0 {
        let r = report.expect("a step ran");
        println!(
            "combined: total norm {:.6e}, coefficient {:?}, {} of {} tensors clipped",
            r.total_norm, r.coef, r.clipped_units, r.units
        );
        println!(
            "{} ranks, {}, GPT-2/{scale}: sharded step {step:.3} ms, the shard clipped alone \
             {local:.3} ms ({:.2}x); in the step's collectives {exchange:.3} ms (waiting for the \
             slowest rank included), the three collectives alone {bare:.4} ms \
             (slowest rank, medians of {steps})",
            ranks,
            if gpu { "GPU" } else { "CPU" },
            step / local
        );
    }
    Ok(())
}
