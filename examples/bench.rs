//! The README's main command: check the GPU against the CPU oracle, then time gradient
//! clipping next to memory-bandwidth floors measured in the same run.
//!
//! ```text
//! cargo run --release --example bench [-- OPTIONS]
//!
//!   --quick         GPT-2 tensors scaled down 16x, for software adapters
//!                   (also GRADCLIP_BENCH_QUICK=1)
//!   --full          the whole GPT-2 set on a software adapter too (by default a
//!                   software adapter checks and times GPT-2 / 16; the CPU the whole set)
//!   --cpu-only      no GPU, even when an adapter exists
//!   --gpu-only      no CPU timings (the CPU oracle still checks the GPU)
//!   --host-only     only the host section: what recording and submitting a step costs
//!                   the CPU, for the GPT-2 shapes in one arena and in one buffer per
//!                   tensor, next to a plain wgpu step (it also runs at the end of every
//!                   run with a GPU)
//!   --shapes PATH   a shapes file in the format of bench/gpt2-small-shapes.txt (also
//!                   GRADCLIP_BENCH_SHAPES); by default that file, built into the binary,
//!                   so a copied binary runs anywhere
//!   --runs N        timed runs per figure, the median is reported (default 7; CPU
//!                   figures of a set under 64 MiB take 5 N)
//!   --json PATH     also write every figure as JSON records {workload, dtype, path, op,
//!                   ms, floor_ms, plain_ms, adapter, ...}
//!
//!   GRADCLIP_TORCH_PYTHON=/path/to/python   a Python with torch (optional): PyTorch's
//!                   get_total_norm / clip_grad_norm_ / clip_grad_value_ on the same shapes,
//!                   timed right after each gradclip figure (path `torch-cpu`, or
//!                   `torch-cuda` next to the GPU rows when torch has CUDA)
//! ```
//!
//! It lists the wgpu adapters and opens the one `GpuContext::new` picks (a hardware GPU,
//! else a software adapter such as lavapipe; with none it runs on the CPU only). Then, for
//! the GPT-2 small parameter shapes and for 2000 small tensors, in f32, f16 and bf16, it checks
//! the GPU against the CPU oracle (PASS/FAIL; exit status 1 on any FAIL) and times: total
//! norm (L2), global clip that clips, global clip that does not clip, and value clip.
//!
//! Every figure is the median of N runs after one warm-up run; the gradients are reset
//! from a pristine copy before every run (not timed), so each run clips exactly as its
//! label says, which is checked. GPU "time" is kernel time from timestamp queries when the
//! adapter has them, else wall time; GPU "wall" is the API call through `wait()`.
//! GB/s counts the bytes an operation must move: a norm or an unclipped step reads the
//! gradients once, a clipping step reads twice and writes once, a value clip reads and
//! writes once. Floors: on the GPU a `copy_buffer_to_buffer` of the same bytes (one read
//! and one write, 2 * bytes / time); on the CPU a rayon read pass and a read+write pass
//! over a buffer of the same size, each the best of several loops (as built, AVX2, AVX2
//! with a software prefetch, and a memcpy for read+write), timed in every run right before
//! the operation (the machine's memory speed drifts), from the same cache state (the
//! buffer just touched, as the gradients are), and taken as the median of its best loop:
//! the operation's statistic. A clipping step's floor is the two-pass floor read +
//! read/write. The gradient lists an operation takes are built before its timer starts.

use std::error::Error;
use std::hint::black_box;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use gradclip::{
    bf16, f16, Adam, ClipPolicy, ClipReport, CpuClipper, DType, GpuClipper, GpuContext, GpuTensor,
    LossScale, Rule, TensorInfo,
};
use rayon::prelude::*;
use wgpu::util::DeviceExt;

#[path = "../benches/common/mod.rs"]
mod common;
#[path = "support/host_cost.rs"]
mod host_cost;
use common::{gradients, small_lens, value_clip, Flat, Op, BLOCK, SIGMA};

type Res<T> = Result<T, Box<dyn Error>>;

/// Relative tolerance of GPU against CPU norms, coefficients and f32 clipped values.
const REL_TOL: f64 = 1e-5;

const USAGE: &str = "usage: cargo run --release --example bench [-- --quick] [--cpu-only] \
                     [--gpu-only] [--host-only] [--full] [--shapes PATH] [--runs N] [--json PATH]";

struct Options {
    quick: bool,
    cpu_only: bool,
    gpu_only: bool,
    host_only: bool,
    runs: usize,
    /// A shapes file; `None`: the GPT-2 small shapes built into the binary.
    shapes: Option<PathBuf>,
    json: Option<PathBuf>,
    full: bool,
}

fn options() -> Result<Options, String> {
    let mut o = Options {
        quick: std::env::var("GRADCLIP_BENCH_QUICK").is_ok_and(|v| !v.is_empty() && v != "0"),
        cpu_only: false,
        gpu_only: false,
        host_only: false,
        runs: 7,
        shapes: std::env::var_os("GRADCLIP_BENCH_SHAPES").map(PathBuf::from),
        json: None,
        full: false,
    };
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--quick" => o.quick = true,
            "--full" => o.full = true,
            "--cpu-only" => o.cpu_only = true,
            "--gpu-only" => o.gpu_only = true,
            "--host-only" => o.host_only = true,
            "--shapes" => o.shapes = Some(args.next().ok_or(USAGE)?.into()),
            "--json" => o.json = Some(args.next().ok_or(USAGE)?.into()),
            "--runs" => {
                o.runs = args
                    .next()
                    .and_then(|n| n.parse().ok())
                    .filter(|&n| n > 0)
                    .ok_or(USAGE)?
            }
            _ => return Err(USAGE.into()),
        }
    }
    if o.cpu_only && o.gpu_only {
        return Err("--cpu-only and --gpu-only exclude each other".into());
    }
    Ok(o)
}

/// Element counts of the tensors of a shapes file (`name<TAB>AxBxC`, `#` comments).
/// The GPT-2 small parameter shapes, built in: the binary needs no file of the tree it was
/// built in.
/// `bench/torch_peer.py`, built in for the same reason.
const TORCH_PEER: &str = include_str!("../bench/torch_peer.py");

const GPT2_SHAPES: &str = include_str!("../bench/gpt2-small-shapes.txt");

/// The tensor lengths of the shapes file `path`, or of the built-in GPT-2 shapes.
fn load_shapes(path: Option<&std::path::Path>) -> Res<Vec<usize>> {
    let (text, name) = match path {
        Some(p) => (
            std::fs::read_to_string(p).map_err(|e| format!("{}: {e}", p.display()))?,
            p.display().to_string(),
        ),
        None => (
            GPT2_SHAPES.to_string(),
            "gpt2-small-shapes.txt (built in)".into(),
        ),
    };
    let mut lens = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let bad = || format!("{name}:{}: expected name<TAB>dims", i + 1);
        let dims = line.split('\t').nth(1).ok_or_else(bad)?;
        let n: Result<usize, _> = dims.trim().split('x').map(str::parse::<usize>).product();
        lens.push(n.map_err(|_| bad())?);
    }
    Ok(lens)
}

/// Read and read+write floor times in ms; a step's floor follows from the bytes it moves.
struct Floors {
    read: f64,
    rw: f64,
}

impl Floors {
    /// The floor of `op` and its name.
    fn of(&self, op: Op) -> (&'static str, f64) {
        let ms = match op {
            Op::Norm | Op::NotClipping => self.read,
            Op::Clipping => self.read + self.rw,
            Op::Value => self.rw,
        };
        (Self::label(op), ms)
    }

    /// The name of `op`'s floor.
    fn label(op: Op) -> &'static str {
        match op {
            Op::Norm | Op::NotClipping => "read",
            Op::Clipping => "read + rw",
            Op::Value => "rw",
        }
    }
}

/// A workload under this many bytes times its CPU figures [`CACHED_SET_RUNS`] times as
/// often.
const CACHED_SET_BYTES: usize = 64 << 20;
const CACHED_SET_RUNS: usize = 5;

fn ms_since(t: Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1e3
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// Calls `sample` once to warm up, then `runs` times; medians of each of its figures.
fn medians<const K: usize>(
    runs: usize,
    mut sample: impl FnMut() -> Res<[f64; K]>,
) -> Res<[f64; K]> {
    sample()?;
    let samples = (0..runs).map(|_| sample()).collect::<Res<Vec<_>>>()?;
    Ok(std::array::from_fn(|k| {
        median(samples.iter().map(|s| s[k]).collect())
    }))
}

/// Counts checks and prints each as PASS or FAIL.
#[derive(Default)]
struct Checks {
    failed: Vec<String>,
}

impl Checks {
    fn check(&mut self, what: &str, ok: bool, detail: impl std::fmt::Display) {
        println!("  {} {what:<40} {detail}", if ok { "PASS" } else { "FAIL" });
        if !ok {
            self.failed.push(what.to_string());
        }
    }
}

fn rel_err(got: f64, want: f64) -> f64 {
    if got == want {
        0.0
    } else {
        (got - want).abs() / want.abs()
    }
}

/// Largest relative difference between the GPU's and the CPU's elements, and how many
/// are out of tolerance: REL_TOL for f32, one unit in the last place for bf16.
fn compare(dtype: DType, gpu: &[u8], cpu: &[u8]) -> (f64, usize) {
    let size = dtype.size() as usize;
    gpu.par_chunks(size * BLOCK)
        .zip(cpu.par_chunks(size * BLOCK))
        .map(|(g, c)| {
            let mut worst = 0.0f64;
            let mut bad = 0;
            for (g, c) in g.chunks_exact(size).zip(c.chunks_exact(size)) {
                let (rel, ok) = if dtype != DType::F32 {
                    // 16-bit values: at most one unit in the last place apart.
                    let (a, b) = (
                        u16::from_le_bytes([g[0], g[1]]),
                        u16::from_le_bytes([c[0], c[1]]),
                    );
                    let wide = |h: u16| match dtype {
                        DType::F16 => f16::from_bits(h).to_f64(),
                        _ => bf16::from_bits(h).to_f64(),
                    };
                    (rel_err(wide(a), wide(b)), a.abs_diff(b) <= 1)
                } else {
                    let x = f32::from_le_bytes([g[0], g[1], g[2], g[3]]) as f64;
                    let y = f32::from_le_bytes([c[0], c[1], c[2], c[3]]) as f64;
                    let rel = rel_err(x, y);
                    (rel, rel <= REL_TOL)
                };
                worst = worst.max(rel);
                bad += usize::from(!ok);
            }
            (worst, bad)
        })
        .reduce(|| (0.0, 0), |a, b| (a.0.max(b.0), a.1 + b.1))
}

/// One runner per operation, in the order of [`Op::ALL`], on a workload of total norm
/// `norm` over tensors of lengths `lens`.
fn cpu_runners(lens: &[usize], norm: f64) -> Res<Vec<CpuClipper>> {
    let infos = TensorInfo::unnamed(lens.iter().copied());
    (Op::ALL.iter())
        .map(|op| Ok(CpuClipper::new(op.policy(norm), &infos)?))
        .collect()
}

/// The loops a floor is the best of: as built, with AVX2 (where the CPU has it), and with
/// AVX2 and a software prefetch 2 KiB ahead of each 512 bytes (as gradclip's loops do:
/// with the hint, a 16-bit norm otherwise came out below the floor). No operation
/// compiled for the wider vectors, or with the hint, beats the best of them.
#[derive(Clone, Copy)]
enum FloorLoop {
    AsBuilt,
    Avx2,
    Avx2Prefetch,
}

impl FloorLoop {
    const ALL: [FloorLoop; 3] = [FloorLoop::AsBuilt, FloorLoop::Avx2, FloorLoop::Avx2Prefetch];
}

/// Sum of the words of `c` with `how` (see [`FloorLoop`]).
fn read_words(c: &[u32], how: FloorLoop) -> u32 {
    /// 16 independent wrapping sums, so the loop vectorises at any width.
    #[inline(always)]
    fn sum(c: &[u32], prefetch: bool) -> u32 {
        #[inline(always)]
        fn lanes(c: &[u32], acc: &mut [u32; 16]) {
            let mut chunks = c.chunks_exact(16);
            for w in &mut chunks {
                for i in 0..16 {
                    acc[i] = acc[i].wrapping_add(w[i]);
                }
            }
            acc[0] = (chunks.remainder().iter()).fold(acc[0], |a, &x| a.wrapping_add(x));
        }
        let mut acc = [0u32; 16];
        match prefetch {
            true => c.chunks(128).for_each(|piece| {
                prefetch_ahead(piece);
                lanes(piece, &mut acc)
            }),
            false => lanes(c, &mut acc),
        }
        acc.iter().fold(0, |a, &x| a.wrapping_add(x))
    }
    #[cfg(target_arch = "x86_64")]
    if !matches!(how, FloorLoop::AsBuilt) && std::is_x86_feature_detected!("avx2") {
        #[target_feature(enable = "avx2")]
        fn sum_avx2(c: &[u32], prefetch: bool) -> u32 {
            sum(c, prefetch)
        }
        // SAFETY: the CPU has AVX2, checked just above.
        return unsafe { sum_avx2(c, matches!(how, FloorLoop::Avx2Prefetch)) };
    }
    sum(c, false)
}

/// Hints that the 512 bytes from 2 KiB past the start of `piece` are read soon.
#[inline(always)]
fn prefetch_ahead(piece: &[u32]) {
    #[cfg(target_arch = "x86_64")]
    for line in 0..8 {
        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
        let at = piece.as_ptr().cast::<i8>().wrapping_add(2048 + 64 * line);
        // SAFETY: a prefetch reads nothing and cannot fault, at any address.
        unsafe { _mm_prefetch::<_MM_HINT_T0>(at) };
    }
}

/// A byte sum of `b`: reads it into the cache, untimed, before a timed operation.
fn touch(b: &[u8]) -> u8 {
    (b.par_chunks(4 * BLOCK))
        .map(|c| c.iter().fold(0u8, |a, &x| a.wrapping_add(x)))
        .reduce(|| 0, u8::wrapping_add)
}

/// Adds `step` to every word of `c` in place, with `how` (see [`FloorLoop`]).
fn bump_words(c: &mut [u32], step: u32, how: FloorLoop) {
    #[inline(always)]
    fn bump(c: &mut [u32], step: u32, prefetch: bool) {
        match prefetch {
            true => c.chunks_mut(128).for_each(|piece| {
                prefetch_ahead(piece);
                piece.iter_mut().for_each(|v| *v = v.wrapping_add(step))
            }),
            false => c.iter_mut().for_each(|v| *v = v.wrapping_add(step)),
        }
    }
    #[cfg(target_arch = "x86_64")]
    if !matches!(how, FloorLoop::AsBuilt) && std::is_x86_feature_detected!("avx2") {
        #[target_feature(enable = "avx2")]
        fn bump_avx2(c: &mut [u32], step: u32, prefetch: bool) {
            bump(c, step, prefetch)
        }
        // SAFETY: the CPU has AVX2, checked just above.
        return unsafe { bump_avx2(c, step, matches!(how, FloorLoop::Avx2Prefetch)) };
    }
    bump(c, step, false)
}

/// Buffers for the CPU floors of one workload: the floors are timed in every run of every
/// operation, right before it, so the machine's drift reaches both alike.
struct FloorBuffers {
    buf: Vec<u32>,
    copy: Vec<u32>,
}

impl FloorBuffers {
    fn new(bytes: usize) -> FloorBuffers {
        let n = bytes.div_ceil(4);
        FloorBuffers {
            buf: vec![1u32; n],
            copy: vec![0u32; n],
        }
    }

    /// One run of each read loop ([`FloorLoop`]), each from the cache state an operation
    /// starts from (its buffer just touched): ms per loop.
    fn read(&self) -> [f64; 3] {
        FloorLoop::ALL.map(|how| {
            black_box(touch(bytemuck::cast_slice(&self.buf)));
            let t = Instant::now();
            let s = (self.buf.par_chunks(BLOCK))
                .map(|c| read_words(c, how))
                .reduce(|| 0, u32::wrapping_add);
            black_box(s);
            ms_since(t)
        })
    }

    /// One run of each read+write loop: the in-place adds ([`FloorLoop`]), then a parallel
    /// memcpy of the same bytes into another buffer; ms per loop.
    fn rw(&mut self) -> [f64; 4] {
        let step = black_box(1u32);
        let mut ms = [0.0; 4];
        for (k, how) in FloorLoop::ALL.into_iter().enumerate() {
            black_box(touch(bytemuck::cast_slice(&self.buf)));
            let t = Instant::now();
            (self.buf.par_chunks_mut(BLOCK)).for_each(|c| bump_words(c, step, how));
            ms[k] = ms_since(t);
        }
        black_box(touch(bytemuck::cast_slice(&self.buf)));
        let t = Instant::now();
        (self.copy.par_chunks_mut(BLOCK))
            .zip(self.buf.par_chunks(BLOCK))
            .for_each(|(d, s)| d.copy_from_slice(s));
        black_box(&self.copy);
        ms[3] = ms_since(t);
        ms
    }

    /// One run of the loops of `op`'s floor, into `runs` (all but the first run: the
    /// warm-up run of [`medians`]).
    fn sample(&mut self, op: Op, runs: &mut FloorRuns) {
        let keep = std::mem::replace(&mut runs.warm, true);
        if op != Op::Value {
            let read = self.read();
            runs.read.extend(keep.then_some(read));
        }
        if matches!(op, Op::Clipping | Op::Value) {
            let rw = self.rw();
            runs.rw.extend(keep.then_some(rw));
        }
    }
}

/// The floor loops' times over the runs of one figure. A floor is its best loop's median:
/// the statistic the operation reports, from the same cache state, so the ratio measures
/// the operation, not the spread of single short calls (the best single run of several
/// loops had made 0.1-0.5 ms sets look 1.3-2x slower than their medians are).
#[derive(Default)]
struct FloorRuns {
    /// A run was sampled (the warm-up).
    warm: bool,
    read: Vec<[f64; 3]>,
    rw: Vec<[f64; 4]>,
}

impl FloorRuns {
    fn best<const K: usize>(runs: &[[f64; K]]) -> f64 {
        if runs.is_empty() {
            return f64::NAN;
        }
        (0..K)
            .map(|k| median(runs.iter().map(|r| r[k]).collect()))
            .fold(f64::INFINITY, f64::min)
    }

    fn floors(&self) -> Floors {
        Floors {
            read: Self::best(&self.read),
            rw: Self::best(&self.rw),
        }
    }
}

/// One timed figure.
struct Row {
    workload: String,
    dtype: DType,
    path: &'static str,
    /// The operation's label.
    op: &'static str,
    moved: f64,
    ms: f64,
    wall: Option<f64>,
    floor: (&'static str, f64),
    /// The plain kernels of the same traffic (GPU rows with timestamps).
    plain: Option<f64>,
    /// A peer's adapter and variant (PyTorch rows).
    peer: Option<(String, String)>,
}

impl Row {
    fn gbps(&self) -> f64 {
        self.moved / self.ms / 1e6
    }
    fn print(&self) {
        let wall = self.wall.map_or("-".into(), |w| format!("{w:.3}"));
        println!(
            "  {:<4} {:<26} {:>9.1} MB {:>10.3} ms {:>10} ms {:>8.1} GB/s   floor {:<9} {:>9.3} ms {:>5.0}%  {:>5.2}x",
            self.path,
            self.op,
            self.moved / 1e6,
            self.ms,
            wall,
            self.gbps(),
            self.floor.0,
            self.floor.1,
            100.0 * self.floor.1 / self.ms,
            self.ms / self.floor.1,
        );
        if let Some(plain) = self.plain {
            println!(
                "       plain kernels of the same traffic {plain:.3} ms: gradclip {:.2}x",
                self.ms / plain
            );
        }
        if let Some((adapter, variant)) = &self.peer {
            println!("       (PyTorch, {variant}, on {adapter})");
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn bench_cpu(
    rows: &mut Vec<Row>,
    checks: &mut Checks,
    peer: &mut Option<TorchPeer>,
    floor_buffers: &mut FloorBuffers,
    name: &str,
    lens: &[usize],
    pristine: &Flat,
    norm: f64,
    runs: usize,
) -> Res<()> {
    let bytes = pristine.bytes().len();
    let mut work = pristine.clone();
    let mut runners = cpu_runners(lens, norm)?;
    // One untimed round of every operation and floor first: this workload's buffers are
    // new, and the first operation timed otherwise ran up to 1.6x slower than the same
    // reduction timed after it.
    for (op, runner) in Op::ALL.into_iter().zip(&mut runners) {
        floor_buffers.sample(op, &mut FloorRuns::default());
        work.reset_from(pristine);
        runner.step(&mut work.muts(lens), None)?;
    }
    work.reset_from(pristine);
    for (op, runner) in Op::ALL.into_iter().zip(&mut runners) {
        let mut labelled = true;
        let mut floor_runs = FloorRuns::default();
        let [ms] = medians(runs, || {
            floor_buffers.sample(op, &mut floor_runs);
            if op.mutates() {
                work.reset_from(pristine);
            }
            // The floor ran warm (its best run); the operation starts from the same cache
            // state: the timed floors just evicted the gradients of a set that fits the cache.
            black_box(touch(work.bytes()));
            // Listed before the timer starts: building the list (and freeing it, which can
            // trim the heap) is not the operation's cost.
            let mut grads = work.muts(lens);
            let t = Instant::now();
            let report = runner.step(&mut grads, None)?;
            let ms = ms_since(t);
            if let Some(want) = op.expect_clipped() {
                labelled &= (report.clipped_units > 0) == want;
            }
            Ok([ms])
        })?;
        if !labelled {
            checks.check(&format!("CPU {}: runs as labelled", op.label()), false, "");
        }
        let row = Row {
            workload: name.into(),
            dtype: pristine.dtype(),
            path: "CPU",
            op: op.label(),
            moved: op.traffic() * bytes as f64,
            ms,
            wall: None,
            floor: floor_runs.floors().of(op),
            plain: None,
            peer: None,
        };
        row.print();
        let peer_row = (peer.as_mut().filter(|p| !p.cuda)).and_then(|p| p.row(&row, lens, runs));
        rows.push(row);
        if let Some(r) = peer_row {
            r.print();
            rows.push(r);
        }
    }
    Ok(())
}

/// PyTorch on the same shapes as a peer column (`GRADCLIP_TORCH_PYTHON`): a long-lived
/// `bench/torch_peer.py --serve`, asked for each operation right after gradclip's, so
/// both are timed in the same state of the machine.
struct TorchPeer {
    child: std::process::Child,
    stdin: std::process::ChildStdin,
    /// Its answers, one line each, read on a thread so that a stuck peer times out.
    answers: std::sync::mpsc::Receiver<String>,
    adapter: String,
    cuda: bool,
    /// Set once the peer failed to answer: no further questions.
    lost: bool,
}

impl TorchPeer {
    /// How long one answer may take (a GPT-2 set is built and timed in a few seconds).
    const PATIENCE: std::time::Duration = std::time::Duration::from_secs(120);

    /// The peer, when `GRADCLIP_TORCH_PYTHON` names a Python with torch (else `None`,
    /// saying why).
    fn start() -> Option<TorchPeer> {
        use std::io::BufRead;
        use std::process::{Command, Stdio};
        let python = std::env::var_os("GRADCLIP_TORCH_PYTHON")?;
        // The script is built in too, written out for Python: the binary runs outside
        // the tree it was built in.
        let script = std::env::temp_dir().join("gradclip-torch-peer.py");
        if let Err(e) = std::fs::write(&script, TORCH_PEER) {
            println!("  PyTorch peer: cannot write {}: {e}", script.display());
            return None;
        }
        let threads = rayon::current_num_threads().to_string();
        let spawned = Command::new(&python)
            .arg(script)
            .arg("--serve")
            .env("OMP_NUM_THREADS", &threads)
            .env("MKL_NUM_THREADS", &threads)
            // Idle OpenMP threads must not spin into gradclip's timings.
            .env("OMP_WAIT_POLICY", "PASSIVE")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn();
        let mut child = match spawned {
            Ok(c) => c,
            Err(e) => {
                println!(
                    "PyTorch peer: cannot start {}: {e}",
                    python.to_string_lossy()
                );
                return None;
            }
        };
        let stdin = child.stdin.take()?;
        let stdout = std::io::BufReader::new(child.stdout.take()?);
        let (send, answers) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in stdout.lines().map_while(Result::ok) {
                if send.send(line).is_err() {
                    break;
                }
            }
        });
        let mut peer = TorchPeer {
            child,
            stdin,
            answers,
            adapter: String::new(),
            cuda: false,
            lost: false,
        };
        match peer.ask(&serde_json::json!({ "probe": true })) {
            Some(a) if a.get("adapter").is_some() => {
                peer.adapter = a["adapter"].as_str().unwrap_or("?").to_string();
                peer.cuda = a["cuda"].as_bool().unwrap_or(false);
                println!("PyTorch peer: torch on {}", peer.adapter);
                Some(peer)
            }
            _ => {
                println!("PyTorch peer: that Python has no torch; no peer column");
                None
            }
        }
    }

    /// One request and its answer; `None` (saying why, once) when the peer is lost.
    fn ask(&mut self, request: &serde_json::Value) -> Option<serde_json::Value> {
        use std::io::Write;
        if self.lost {
            return None;
        }
        let sent = writeln!(self.stdin, "{request}").and_then(|_| self.stdin.flush());
        let answer = match sent {
            Ok(()) => self.answers.recv_timeout(Self::PATIENCE).ok(),
            Err(_) => None,
        };
        let parsed = answer.and_then(|line| serde_json::from_str(&line).ok());
        if parsed.is_none() {
            println!("  PyTorch peer: no answer; the run goes on without it");
            self.lost = true;
            let _ = self.child.kill();
        }
        parsed
    }

    /// PyTorch's figure for the operation of `row`, over tensors of `lens`.
    fn row(&mut self, row: &Row, lens: &[usize], runs: usize) -> Option<Row> {
        let answer = self.ask(&serde_json::json!({
            "workload": row.workload,
            "lens": lens,
            "dtype": row.dtype.to_string(),
            "op": row.op,
            "runs": runs,
            "sigma": SIGMA,
        }))?;
        let Some(ms) = answer["ms"].as_f64() else {
            println!("  PyTorch peer: {}", answer["error"]);
            return None;
        };
        // The answer names its question, so a stray line cannot shift every later figure.
        if answer["op"] != row.op || answer["dtype"] != row.dtype.to_string() {
            println!("  PyTorch peer: answer out of step ({answer}); the run goes on without it");
            self.lost = true;
            return None;
        }
        let variant = answer["variant"].as_str().unwrap_or("?").to_string();
        Some(Row {
            path: "torch",
            ms,
            wall: None,
            plain: None,
            peer: Some((self.adapter.clone(), variant)),
            workload: row.workload.clone(),
            ..*row
        })
    }
}

impl Drop for TorchPeer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A timestamp query pair (and a scratch slot) and the buffers to read the pair back.
struct Timestamps {
    set: wgpu::QuerySet,
    resolve: wgpu::Buffer,
    readback: wgpu::Buffer,
    period_ns: f64,
}

impl Timestamps {
    fn new(ctx: &GpuContext) -> Option<Timestamps> {
        let dev = ctx.device();
        if !dev.features().contains(wgpu::Features::TIMESTAMP_QUERY) {
            return None;
        }
        let buffer = |usage| {
            dev.create_buffer(&wgpu::BufferDescriptor {
                label: Some("bench timestamps"),
                size: 16,
                usage,
                mapped_at_creation: false,
            })
        };
        Some(Timestamps {
            set: dev.create_query_set(&wgpu::QuerySetDescriptor {
                label: Some("bench timestamps"),
                ty: wgpu::QueryType::Timestamp,
                // Begin and end, and a scratch slot for the end of a step's first pass
                // when it has two.
                count: 3,
            }),
            resolve: buffer(wgpu::BufferUsages::QUERY_RESOLVE | wgpu::BufferUsages::COPY_SRC),
            readback: buffer(wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST),
            period_ns: ctx.queue().get_timestamp_period() as f64,
        })
    }

    /// An empty compute pass that only writes a timestamp: brackets work that is not a
    /// compute pass (a copy). Vulkan writes it once all earlier commands have finished.
    fn mark(&self, enc: &mut wgpu::CommandEncoder, begin: bool) {
        let index = if begin { 0 } else { 1 };
        let _pass = enc.begin_compute_pass(&wgpu::ComputePassDescriptor {
            label: Some("bench timestamp"),
            timestamp_writes: Some(wgpu::ComputePassTimestampWrites {
                query_set: &self.set,
                beginning_of_pass_write_index: begin.then_some(index),
                end_of_pass_write_index: (!begin).then_some(index),
            }),
        });
    }

    /// Milliseconds between the two timestamps of the last finished work.
    fn read_ms(&self, ctx: &GpuContext) -> Res<f64> {
        let mut enc = ctx.device().create_command_encoder(&Default::default());
        enc.resolve_query_set(&self.set, 0..2, &self.resolve, 0);
        enc.copy_buffer_to_buffer(&self.resolve, 0, &self.readback, 0, 16);
        ctx.queue().submit([enc.finish()]);
        self.readback
            .map_async(wgpu::MapMode::Read, .., |r| r.expect("map timestamps"));
        ctx.device().poll(wgpu::PollType::wait_indefinitely())?;
        let ticks: Vec<u64> = bytemuck::pod_collect_to_vec(&self.readback.get_mapped_range(..)?);
        self.readback.unmap();
        Ok(ticks[1].saturating_sub(ticks[0]) as f64 * self.period_ns / 1e6)
    }
}

/// The gradients on the GPU: the buffer the batch clips and a pristine copy to reset it.
struct GpuGrads {
    pristine: wgpu::Buffer,
    work: wgpu::Buffer,
}

impl GpuGrads {
    fn upload(ctx: &GpuContext, flat: &Flat) -> Res<GpuGrads> {
        let dev = ctx.device();
        let pristine = dev.create_buffer_init(&wgpu::util::BufferInitDescriptor {
            label: Some("bench pristine grads"),
            contents: flat.bytes(),
            usage: wgpu::BufferUsages::COPY_SRC,
        });
        let work = dev.create_buffer(&wgpu::BufferDescriptor {
            label: Some("bench grads"),
            size: pristine.size(),
            usage: wgpu::BufferUsages::STORAGE
                | wgpu::BufferUsages::COPY_SRC
                | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        let g = GpuGrads { pristine, work };
        g.reset(ctx, None)?;
        Ok(g)
    }

    /// Copies the pristine gradients over the working ones and waits; bracketed by
    /// timestamps when given, as the GPU's bandwidth floor.
    fn reset(&self, ctx: &GpuContext, ts: Option<&Timestamps>) -> Res<()> {
        let mut enc = ctx.device().create_command_encoder(&Default::default());
        if let Some(ts) = ts {
            ts.mark(&mut enc, true);
        }
        enc.copy_buffer_to_buffer(&self.pristine, 0, &self.work, 0, self.work.size());
        if let Some(ts) = ts {
            ts.mark(&mut enc, false);
        }
        ctx.queue().submit([enc.finish()]);
        ctx.device().poll(wgpu::PollType::wait_indefinitely())?;
        Ok(())
    }

    fn download(&self, ctx: &GpuContext, len: usize) -> Res<Vec<u8>> {
        let staging = ctx.device().create_buffer(&wgpu::BufferDescriptor {
            label: Some("bench download"),
            size: self.work.size(),
            usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        let mut enc = ctx.device().create_command_encoder(&Default::default());
        enc.copy_buffer_to_buffer(&self.work, 0, &staging, 0, self.work.size());
        ctx.queue().submit([enc.finish()]);
        staging.map_async(wgpu::MapMode::Read, .., |r| r.expect("map download"));
        ctx.device().poll(wgpu::PollType::wait_indefinitely())?;
        let bytes = staging.get_mapped_range(..len as u64)?.to_vec();
        staging.unmap();
        Ok(bytes)
    }

    /// The working buffer's tensors, packed back to back as in `Flat`.
    fn tensors(&self, lens: &[usize], dtype: DType) -> Vec<GpuTensor<'_>> {
        let mut offset = 0;
        (lens.iter())
            .map(|&n| {
                let t = GpuTensor::new(&self.work, offset, n as u64, dtype);
                offset += n as u64 * dtype.size();
                t
            })
            .collect()
    }

    /// One runner per operation over the working buffer, in the order of [`Op::ALL`], on a
    /// workload of total norm `norm`.
    fn runners(
        &self,
        ctx: &GpuContext,
        lens: &[usize],
        dtype: DType,
        norm: f64,
    ) -> Res<Vec<GpuClipper>> {
        let tensors = self.tensors(lens, dtype);
        (Op::ALL.iter())
            .map(|op| Ok(GpuClipper::new(ctx, &tensors, None, op.policy(norm))?))
            .collect()
    }
}

/// The simplest WGSL kernels of the same traffic, the baseline of gradclip's kernels:
/// a grid-stride sum of squares with one partial per workgroup, a scale, a clamp. No
/// overflow safety, no chunk table, no determinism across launch shapes.
const PLAIN_WGSL: &str = r#"
override HALF: bool = false;
override FACTOR: f32 = 1.0;
override LO: f32 = 0.0;
override HI: f32 = 0.0;
@group(0) @binding(0) var<storage, read_write> x: array<u32>;
@group(0) @binding(1) var<storage, read_write> partials: array<f32>;
var<workgroup> tree: array<f32, 256>;

fn lo_half(w: u32) -> f32 { return bitcast<f32>(w << 16u); }
fn hi_half(w: u32) -> f32 { return bitcast<f32>(w & 0xffff0000u); }
fn clamp_nan(v: f32) -> f32 { return select(select(v, LO, v < LO), HI, v > HI); }

@compute @workgroup_size(256)
fn sumsq(@builtin(global_invocation_id) g: vec3<u32>, @builtin(local_invocation_index) l: u32,
         @builtin(workgroup_id) w: vec3<u32>, @builtin(num_workgroups) n: vec3<u32>) {
    var s = 0.0;
    for (var i = g.x; i < arrayLength(&x); i = i + n.x * 256u) {
        let b = x[i];
        if (HALF) {
            s = s + lo_half(b) * lo_half(b) + hi_half(b) * hi_half(b);
        } else {
            s = s + bitcast<f32>(b) * bitcast<f32>(b);
        }
    }
    tree[l] = s;
    workgroupBarrier();
    for (var k = 128u; k > 0u; k = k >> 1u) {
        if (l < k) {
            tree[l] = tree[l] + tree[l + k];
        }
        workgroupBarrier();
    }
    if (l == 0u) {
        partials[w.x] = partials[w.x] + tree[0];
    }
}

@compute @workgroup_size(256)
fn scale(@builtin(global_invocation_id) g: vec3<u32>, @builtin(num_workgroups) n: vec3<u32>) {
    for (var i = g.x; i < arrayLength(&x); i = i + n.x * 256u) {
        let b = x[i];
        if (HALF) {
            let a = bitcast<u32>(lo_half(b) * FACTOR) >> 16u;
            x[i] = a | (bitcast<u32>(hi_half(b) * FACTOR) & 0xffff0000u);
        } else {
            x[i] = bitcast<u32>(bitcast<f32>(b) * FACTOR);
        }
    }
}

@compute @workgroup_size(256)
fn clamp(@builtin(global_invocation_id) g: vec3<u32>, @builtin(num_workgroups) n: vec3<u32>) {
    for (var i = g.x; i < arrayLength(&x); i = i + n.x * 256u) {
        let b = x[i];
        if (HALF) {
            let a = bitcast<u32>(clamp_nan(lo_half(b))) >> 16u;
            x[i] = a | (bitcast<u32>(clamp_nan(hi_half(b))) & 0xffff0000u);
        } else {
            x[i] = bitcast<u32>(clamp_nan(bitcast<f32>(b)));
        }
    }
}
"#;

/// Workgroups of a plain dispatch (grid-stride loops cover any length).
const PLAIN_GROUPS: u32 = 1024;

/// The plain kernels over one working buffer, in binding windows.
struct Plain {
    sumsq: wgpu::ComputePipeline,
    scale: wgpu::ComputePipeline,
    clamp: wgpu::ComputePipeline,
    /// Per window: the groups of the sum (with the partials) and of the rewrites.
    windows: Vec<(wgpu::BindGroup, wgpu::BindGroup, wgpu::BindGroup)>,
}

impl Plain {
    fn new(ctx: &GpuContext, work: &wgpu::Buffer, dtype: DType) -> Plain {
        let dev = ctx.device();
        let module = dev.create_shader_module(wgpu::ShaderModuleDescriptor {
            label: Some("bench plain kernels"),
            source: wgpu::ShaderSource::Wgsl(PLAIN_WGSL.into()),
        });
        let half = if dtype == DType::F32 { 0.0 } else { 1.0 };
        let pipeline = |entry: &str| {
            let constants = [
                ("HALF", half),
                ("FACTOR", 0.5),
                ("LO", value_clip().lo as f64),
                ("HI", value_clip().hi as f64),
            ];
            dev.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
                label: Some(entry),
                layout: None,
                module: &module,
                entry_point: Some(entry),
                compilation_options: wgpu::PipelineCompilationOptions {
                    constants: &constants,
                    zero_initialize_workgroup_memory: false,
                },
                cache: None,
            })
        };
        let (sumsq, scale, clamp) = (pipeline("sumsq"), pipeline("scale"), pipeline("clamp"));
        let partials = dev.create_buffer(&wgpu::BufferDescriptor {
            label: Some("bench plain partials"),
            size: PLAIN_GROUPS as u64 * 4,
            usage: wgpu::BufferUsages::STORAGE,
            mapped_at_creation: false,
        });
        let limits = dev.limits();
        let align = limits.min_storage_buffer_offset_alignment as u64;
        let window = (limits.max_storage_buffer_binding_size / align) * align;
        let size = work.size() & !3;
        let mut windows = Vec::new();
        let mut offset = 0;
        while offset < size {
            let len = (size - offset).min(window);
            let range = wgpu::BufferBinding {
                buffer: work,
                offset,
                size: std::num::NonZeroU64::new(len),
            };
            let group = |pipe: &wgpu::ComputePipeline, with_partials: bool| {
                let mut entries = vec![wgpu::BindGroupEntry {
                    binding: 0,
                    resource: wgpu::BindingResource::Buffer(range.clone()),
                }];
                if with_partials {
                    entries.push(wgpu::BindGroupEntry {
                        binding: 1,
                        resource: partials.as_entire_binding(),
                    });
                }
                dev.create_bind_group(&wgpu::BindGroupDescriptor {
                    label: None,
                    layout: &pipe.get_bind_group_layout(0),
                    entries: &entries,
                })
            };
            windows.push((
                group(&sumsq, true),
                group(&scale, false),
                group(&clamp, false),
            ));
            offset += len;
        }
        Plain {
            sumsq,
            scale,
            clamp,
            windows,
        }
    }

    /// Runs the plain kernels of `op` in one timed pass and waits.
    fn run(&self, ctx: &GpuContext, op: Op, ts: &Timestamps) -> Res<()> {
        let mut enc = ctx.device().create_command_encoder(&Default::default());
        {
            let mut pass = enc.begin_compute_pass(&wgpu::ComputePassDescriptor {
                label: Some("bench plain"),
                timestamp_writes: Some(wgpu::ComputePassTimestampWrites {
                    query_set: &ts.set,
                    beginning_of_pass_write_index: Some(0),
                    end_of_pass_write_index: Some(1),
                }),
            });
            let steps: &[(&wgpu::ComputePipeline, usize)] = match op {
                Op::Norm | Op::NotClipping => &[(&self.sumsq, 0)],
                Op::Clipping => &[(&self.sumsq, 0), (&self.scale, 1)],
                Op::Value => &[(&self.clamp, 2)],
            };
            for &(pipe, which) in steps {
                pass.set_pipeline(pipe);
                for w in &self.windows {
                    let group = [&w.0, &w.1, &w.2][which];
                    pass.set_bind_group(0, group, &[]);
                    pass.dispatch_workgroups(PLAIN_GROUPS, 1, 1);
                }
            }
        }
        ctx.queue().submit([enc.finish()]);
        ctx.device().poll(wgpu::PollType::wait_indefinitely())?;
        Ok(())
    }
}

/// One step of `runner`, waited for (a value clip's report is ready at once, its step
/// is not).
fn run_gpu(runner: &mut GpuClipper, ctx: &GpuContext) -> Res<ClipReport> {
    let report = runner.step()?;
    ctx.device().poll(wgpu::PollType::wait_indefinitely())?;
    Ok(report.wait()?)
}

/// Checks every GPU operation (`runners`, in the order of [`Op::ALL`]) against the CPU
/// oracle, from pristine gradients.
fn check_gpu(
    checks: &mut Checks,
    ctx: &GpuContext,
    g: &GpuGrads,
    runners: &mut [GpuClipper],
    lens: &[usize],
    pristine: &Flat,
    norm: f64,
) -> Res<()> {
    let dtype = pristine.dtype();
    let len = pristine.bytes().len();
    let mut work = pristine.clone();
    let mut oracle = cpu_runners(lens, norm)?;
    let [total, clipping, not_clipping, value] = runners else {
        unreachable!("a runner per operation")
    };

    let got = run_gpu(total, ctx)?.total_norm;
    let rel = rel_err(got, norm);
    checks.check(
        "total norm",
        rel < REL_TOL,
        format!("GPU {got:.9e}, CPU {norm:.9e}, rel err {rel:.1e}"),
    );

    let cpu_r = oracle[1].step(&mut work.muts(lens), None)?;
    let gpu_r = run_gpu(clipping, ctx)?;
    let coef_rel = rel_err(
        gpu_r.coef.unwrap_or(1.0) as f64,
        cpu_r.coef.unwrap_or(1.0) as f64,
    );
    let (worst, bad) = compare(dtype, &g.download(ctx, len)?, work.bytes());
    checks.check(
        "global clip, clipping: coef and values",
        (cpu_r.clipped_units > 0) && (gpu_r.clipped_units > 0) && coef_rel < REL_TOL && bad == 0,
        format!(
            "coef GPU {} CPU {}, values max rel diff {worst:.1e}, {bad} out of tolerance",
            gpu_r.coef.unwrap_or(1.0),
            cpu_r.coef.unwrap_or(1.0)
        ),
    );

    g.reset(ctx, None)?;
    work.reset_from(pristine);
    let cpu_r = oracle[2].step(&mut work.muts(lens), None)?;
    let gpu_r = run_gpu(not_clipping, ctx)?;
    let same = g.download(ctx, len)? == pristine.bytes();
    checks.check(
        "global clip, not clipping: untouched",
        cpu_r.clipped_units == 0 && gpu_r.clipped_units == 0 && same,
        format!(
            "clipped GPU {} CPU {}, values {}",
            (gpu_r.clipped_units > 0),
            (cpu_r.clipped_units > 0),
            if same { "unchanged" } else { "CHANGED" }
        ),
    );

    work.reset_from(pristine);
    oracle[3].step(&mut work.muts(lens), None)?;
    run_gpu(value, ctx)?;
    let got = g.download(ctx, len)?;
    let (_, bad) = compare(dtype, &got, work.bytes());
    let same = got == work.bytes();
    checks.check(
        "value clip: bit-identical",
        same,
        format!("{bad} elements out of tolerance"),
    );
    g.reset(ctx, None)?;
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn bench_gpu(
    rows: &mut Vec<Row>,
    checks: &mut Checks,
    peer: &mut Option<TorchPeer>,
    ctx: &GpuContext,
    name: &str,
    lens: &[usize],
    pristine: &Flat,
    norm: f64,
    runs: usize,
) -> Res<()> {
    let bytes = pristine.bytes().len();
    let g = GpuGrads::upload(ctx, pristine)?;
    let mut runners = g.runners(ctx, lens, pristine.dtype(), norm)?;
    check_gpu(checks, ctx, &g, &mut runners, lens, pristine, norm)?;

    let ts = Timestamps::new(ctx);
    for runner in &mut runners {
        runner.set_timestamp_writes(ts.as_ref().map(|t| (t.set.clone(), 0, 1)));
    }
    let kernel_ms = |wall: f64| ts.as_ref().map_or(Ok(wall), |t| t.read_ms(ctx));

    let [copy, copy_wall] = medians(runs, || {
        let t = Instant::now();
        g.reset(ctx, ts.as_ref())?;
        let wall = ms_since(t);
        Ok([kernel_ms(wall)?, wall])
    })?;
    println!(
        "  GPU floor: copy of {:.1} MB in {copy:.3} ms = {:.1} GB/s ({}; wall {copy_wall:.3} ms)",
        bytes as f64 / 1e6,
        2.0 * bytes as f64 / copy / 1e6,
        if ts.is_some() {
            "timestamps"
        } else {
            "wall clock"
        }
    );
    // A copy reads and writes every byte once: half of it stands for one read pass.
    let floors = Floors {
        read: copy / 2.0,
        rw: copy,
    };
    let plain = ts
        .as_ref()
        .map(|_| Plain::new(ctx, &g.work, pristine.dtype()));
    for (op, runner) in Op::ALL.into_iter().zip(&mut runners) {
        let plain_ms = match (&plain, &ts) {
            (Some(plain), Some(t)) => Some(
                medians(runs, || {
                    if op.mutates() {
                        g.reset(ctx, None)?;
                    }
                    plain.run(ctx, op, t)?;
                    Ok([t.read_ms(ctx)?])
                })?[0],
            ),
            _ => None,
        };
        let mut labelled = true;
        let [ms, wall] = medians(runs, || {
            if op.mutates() {
                g.reset(ctx, None)?;
            }
            let t = Instant::now();
            let report = run_gpu(runner, ctx)?;
            let wall = ms_since(t);
            if let Some(want) = op.expect_clipped() {
                labelled &= (report.clipped_units > 0) == want;
            }
            Ok([kernel_ms(wall)?, wall])
        })?;
        if !labelled {
            checks.check(&format!("GPU {}: runs as labelled", op.label()), false, "");
        }
        let row = Row {
            workload: name.into(),
            dtype: pristine.dtype(),
            path: "GPU",
            op: op.label(),
            moved: op.traffic() * bytes as f64,
            ms,
            wall: Some(wall),
            floor: floors.of(op),
            plain: plain_ms,
            peer: None,
        };
        row.print();
        let peer_row = (peer.as_mut().filter(|p| p.cuda)).and_then(|p| p.row(&row, lens, runs));
        rows.push(row);
        if let Some(r) = peer_row {
            r.print();
            rows.push(r);
        }
    }
    Ok(())
}

/// The loss scale the mixed-precision rows' gradients carry (`LOSS_SCALE` of
/// `bench/torch_peer.py`).
const LOSS_SCALE: f32 = 1024.0;

/// How a step row runs its clip and its AdamW step.
#[derive(Clone, Copy, PartialEq)]
enum StepKind {
    /// The clip rewrites the gradients, the step reads them again.
    Unfused,
    /// The step clips as it reads.
    Fused,
    /// Mixed precision as separate passes (PyTorch's recipe): an unscaling pass (here a
    /// loss-scaled chain that never clips: a read for the overflow check, a rewrite), then
    /// the unfused clip and step.
    ScaledSeparate,
    /// The loss-scaled chain fused into the step: unscaling, overflow check and clip
    /// cost no pass of their own.
    ScaledFused,
}

/// Clip-then-step against the fused step: a global clip that clips, then AdamW (f32
/// parameters and moments), on the CPU and the GPU. Unfused, the clip rewrites the
/// gradients and the step reads them again; fused, the step clips as it reads and the
/// gradients are never written. Then the same with gradients that carry a loss scale:
/// unscaling, clip and step as separate passes against the loss-scaled chain fused into
/// the step. Floors: the same bytes read and written at the floors' speeds of this run.
#[allow(clippy::too_many_arguments)]
fn bench_steps(
    rows: &mut Vec<Row>,
    checks: &mut Checks,
    peer: &mut Option<TorchPeer>,
    floor_buffers: &mut FloorBuffers,
    (ctx, on_cpu): (Option<&GpuContext>, bool),
    name: &str,
    lens: &[usize],
    pristine: &Flat,
    norm: f64,
    runs: usize,
) -> Res<()> {
    let bytes = pristine.bytes().len() as f64;
    let n: usize = lens.iter().sum();
    let infos: Vec<TensorInfo> = (lens.iter().enumerate())
        .map(|(i, &len)| TensorInfo::new(format!("t{i}"), &[len as u64]))
        .collect();
    let policy = ClipPolicy::new(Rule::GlobalNorm((norm * 0.5) as f32));
    // The same clip of the gradients divided by the loss scale.
    let unscaled_clip = ClipPolicy::new(Rule::GlobalNorm((norm * 0.5) as f32 / LOSS_SCALE));
    let scaled = unscaled_clip
        .clone()
        .loss_scale(LossScale::fixed(LOSS_SCALE));
    let unscale = ClipPolicy::global_norm(f32::MAX).loss_scale(LossScale::fixed(LOSS_SCALE));
    let adamw = Adam::adamw(1e-3);
    let start: Vec<f32> = (0..n).map(|i| ((i % 97) as f32 - 48.0) * 1e-3).collect();
    // (label, kind, bytes read, bytes written)
    let state = 3.0 * 4.0 * n as f64; // parameters, m and v: each read and written
    use StepKind::*;
    let variants = [
        (
            "clip + AdamW step, unfused",
            Unfused,
            3.0 * bytes + state,
            bytes + state,
        ),
        (
            "clip + AdamW step, fused",
            Fused,
            2.0 * bytes + state,
            state,
        ),
        (
            "loss-scaled clip + AdamW step, separate passes",
            ScaledSeparate,
            5.0 * bytes + state,
            2.0 * bytes + state,
        ),
        (
            "loss-scaled clip + AdamW step, fused",
            ScaledFused,
            2.0 * bytes + state,
            state,
        ),
    ];
    // A floor of `read` bytes read and `written` of them written back.
    let floor_of = |read_ms: f64, rw_ms: f64, read: f64, written: f64| {
        rw_ms * written / bytes + read_ms * (read - written) / bytes
    };
    let push = |rows: &mut Vec<Row>, row: Row, peer: &mut Option<TorchPeer>, cuda: bool| {
        row.print();
        let torch = (pristine.dtype() == DType::F32)
            .then_some(())
            .and_then(|_| peer.as_mut().filter(|p| p.cuda == cuda))
            .and_then(|p| p.row(&row, lens, runs));
        rows.push(row);
        if let Some(r) = torch {
            r.print();
            rows.push(r);
        }
    };
    if let Some(ctx) = ctx {
        let g = GpuGrads::upload(ctx, pristine)?;
        let ts = Timestamps::new(ctx);
        let params = ctx
            .device()
            .create_buffer_init(&wgpu::util::BufferInitDescriptor {
                label: Some("bench parameters"),
                contents: bytemuck::cast_slice(&start),
                usage: wgpu::BufferUsages::STORAGE,
            });
        let grads = g.tensors(lens, pristine.dtype());
        let mut offset = 0;
        let param_tensors: Vec<GpuTensor<'_>> = (lens.iter())
            .map(|&len| {
                let t = GpuTensor::new(&params, offset, len as u64, DType::F32);
                offset += 4 * len as u64;
                t
            })
            .collect();
        let [copy] = medians(runs, || {
            g.reset(ctx, ts.as_ref())?;
            Ok([ts.as_ref().map_or(Ok(f64::NAN), |t| t.read_ms(ctx))?])
        })?;
        // One optimizer per chain, for every variant of it: its state goes on, which costs
        // the same.
        let mut opt =
            GpuClipper::with_optimizer(ctx, &grads, &param_tensors, policy.clone(), adamw)?;
        let mut opt_unscaled =
            GpuClipper::with_optimizer(ctx, &grads, &param_tensors, unscaled_clip.clone(), adamw)?;
        let mut opt_scaled =
            GpuClipper::with_optimizer(ctx, &grads, &param_tensors, scaled.clone(), adamw)?;
        let mut unscaling = GpuClipper::new(ctx, &grads, None, unscale.clone())?;
        // Timestamps around every pass of a step: the first pass starts, the last ends.
        let stamp = |begin, end| ts.as_ref().map(|t| (t.set.clone(), begin, end));
        for (label, kind, read, written) in variants {
            match kind {
                Unfused | Fused => opt.set_timestamp_writes(stamp(0, 1)),
                ScaledSeparate => {
                    unscaling.set_timestamp_writes(stamp(0, 2));
                    opt_unscaled.set_timestamp_writes(stamp(2, 1));
                }
                ScaledFused => opt_scaled.set_timestamp_writes(stamp(0, 1)),
            }
            // The unfused runs leave the gradients clipped: every variant starts pristine.
            g.reset(ctx, None)?;
            let mut labelled = true;
            let [ms, wall] = medians(runs, || {
                if kind != Fused && kind != ScaledFused {
                    g.reset(ctx, None)?;
                }
                let t = Instant::now();
                let mut enc = ctx.device().create_command_encoder(&Default::default());
                let pending = match kind {
                    Unfused => opt.encode_in_place(&mut enc)?,
                    Fused => opt.encode(&mut enc)?,
                    ScaledSeparate => {
                        drop(unscaling.encode(&mut enc)?);
                        opt_unscaled.encode_in_place(&mut enc)?
                    }
                    ScaledFused => opt_scaled.encode(&mut enc)?,
                };
                ctx.queue().submit([enc.finish()]);
                labelled &= pending.wait()?.clipped_units > 0;
                let wall = ms_since(t);
                Ok([ts.as_ref().map_or(Ok(wall), |t| t.read_ms(ctx))?, wall])
            })?;
            if !labelled {
                checks.check(&format!("GPU {label}: clips"), false, "");
            }
            let row = Row {
                workload: name.into(),
                dtype: pristine.dtype(),
                path: "GPU",
                op: label,
                moved: read + written,
                ms,
                wall: Some(wall),
                floor: ("copy", floor_of(copy / 2.0, copy, read, written)),
                plain: None,
                peer: None,
            };
            push(rows, row, peer, true);
        }
    }
    if !on_cpu {
        return Ok(());
    }
    let mut work = pristine.clone();
    let mut opt = CpuClipper::with_optimizer(policy.clone(), &infos, adamw)?;
    let mut opt_unscaled = CpuClipper::with_optimizer(unscaled_clip, &infos, adamw)?;
    let mut opt_scaled = CpuClipper::with_optimizer(scaled, &infos, adamw)?;
    let mut unscaling = CpuClipper::new(unscale, &infos)?;
    let mut params = start;
    for (label, kind, read, written) in variants {
        let mut floor_runs = FloorRuns::default();
        let mut labelled = true;
        let [ms] = medians(runs, || {
            floor_buffers.sample(Op::Clipping, &mut floor_runs);
            if kind != Fused && kind != ScaledFused {
                work.reset_from(pristine);
            }
            let mut p = common::split_mut(&mut params, lens);
            let (grads, mut in_place) = (pristine.refs(lens), work.muts(lens));
            let t = Instant::now();
            let report = match kind {
                Unfused => opt.step_in_place(&mut in_place, &mut p)?,
                Fused => opt.step(&grads, &mut p)?,
                ScaledSeparate => {
                    unscaling.step(&mut in_place, None)?;
                    opt_unscaled.step_in_place(&mut in_place, &mut p)?
                }
                ScaledFused => opt_scaled.step(&grads, &mut p)?,
            };
            let ms = ms_since(t);
            labelled &= report.clipped_units > 0;
            Ok([ms])
        })?;
        if !labelled {
            checks.check(&format!("CPU {label}: clips"), false, "");
        }
        let f = floor_runs.floors();
        let row = Row {
            workload: name.into(),
            dtype: pristine.dtype(),
            path: "CPU",
            op: label,
            moved: read + written,
            ms,
            wall: None,
            floor: ("read + rw", floor_of(f.read, f.rw, read, written)),
            plain: None,
            peer: None,
        };
        push(rows, row, peer, false);
    }
    Ok(())
}

fn print_summary(rows: &[Row], gpu_name: &str) {
    println!("\n## Summary (GPU: {gpu_name})\n");
    println!(
        "GPU time is kernel time (timestamps) where available; GPU wall is submit through wait.\n"
    );
    println!("| workload | dtype | path | operation | moved MB | time ms | wall ms | GB/s | floor | floor ms | % of floor | time / floor | plain ms | time / plain |");
    println!("|---|---|---|---|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|");
    for r in rows {
        let (plain, vs_plain) = match r.plain {
            Some(p) => (format!("{p:.3}"), format!("{:.2}x", r.ms / p)),
            None => ("-".into(), "-".into()),
        };
        println!(
            "| {} | {} | {} | {} | {:.1} | {:.3} | {} | {:.1} | {} | {:.3} | {:.0}% | {:.2}x | {plain} | {vs_plain} |",
            r.workload,
            r.dtype,
            r.path,
            r.op,
            r.moved / 1e6,
            r.ms,
            r.wall.map_or("-".into(), |w| format!("{w:.3}")),
            r.gbps(),
            r.floor.0,
            r.floor.1,
            100.0 * r.floor.1 / r.ms,
            r.ms / r.floor.1
        );
    }
}

/// Every figure as a JSON record: workload, dtype, path (`cpu` or `gpu`), op, ms, floor_ms,
/// plain_ms (GPU rows with timestamps: the plain kernels of the same traffic; else null),
/// adapter, and the bytes moved and wall time.
fn write_json(
    path: &std::path::Path,
    rows: &[Row],
    host: &[host_cost::HostFigure],
    gpu_name: &str,
) -> Res<()> {
    let cpu_name = format!("CPU, {} rayon threads", rayon::current_num_threads());
    let records: Vec<serde_json::Value> = (rows.iter())
        .map(|r| {
            let gpu = r.path == "GPU";
            let path = match &r.peer {
                Some((adapter, _)) if adapter.starts_with("CPU") => "torch-cpu",
                Some(_) => "torch-cuda",
                None if gpu => "gpu",
                None => "cpu",
            };
            let adapter = match &r.peer {
                Some((adapter, _)) => adapter.as_str(),
                None if gpu => gpu_name,
                None => cpu_name.as_str(),
            };
            serde_json::json!({
                "workload": r.workload,
                "dtype": r.dtype.to_string(),
                "path": path,
                "op": r.op,
                "ms": r.ms,
                "floor_ms": r.floor.1,
                "floor": r.floor.0,
                "plain_ms": r.plain,
                "adapter": adapter,
                "variant": r.peer.as_ref().map(|p| p.1.as_str()),
                "moved_mb": r.moved / 1e6,
                "wall_ms": r.wall,
            })
        })
        .chain(host.iter().map(|f| {
            serde_json::json!({
                "workload": "GPT-2 small shapes, host cost",
                "dtype": "f32",
                "path": "gpu-host",
                "layout": f.layout,
                "op": f.what,
                "runner": f.runner,
                "us": f.us,
                "plain_us": f.plain_us,
                "adapter": gpu_name,
            })
        }))
        .collect();
    let text = serde_json::to_string_pretty(&records).map_err(|e| e.to_string())?;
    std::fs::write(path, text + "\n").map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(())
}

fn run(o: &Options) -> Res<Vec<String>> {
    let instance =
        wgpu::Instance::new(wgpu::InstanceDescriptor::new_without_display_handle_from_env());
    let adapters = pollster::block_on(instance.enumerate_adapters(wgpu::Backends::all()));
    println!("wgpu adapters: {}", adapters.len());
    for a in &adapters {
        let i = a.get_info();
        println!(
            "  {} ({:?}, {:?}, driver {} {})",
            i.name, i.device_type, i.backend, i.driver, i.driver_info
        );
    }
    drop(adapters);
    let ctx = if o.cpu_only {
        println!("GPU: skipped (--cpu-only)");
        None
    } else {
        match GpuContext::new() {
            Ok(ctx) => Some(ctx),
            Err(e) => {
                println!("GPU: none ({e}); running on the CPU only");
                None
            }
        }
    };
    let gpu_name = match ctx.as_ref().and_then(|c| c.adapter_info()) {
        Some(i) => format!("{} ({:?}, {:?})", i.name, i.device_type, i.backend),
        None => "none".into(),
    };
    if let Some(ctx) = &ctx {
        let ts = ctx
            .device()
            .features()
            .contains(wgpu::Features::TIMESTAMP_QUERY);
        println!(
            "GPU: using {gpu_name}; timestamp queries: {}",
            if ts { "yes" } else { "no" }
        );
    }
    println!(
        "CPU: {} rayon threads; {} timed runs per figure",
        rayon::current_num_threads(),
        o.runs
    );

    let gpt2 = load_shapes(o.shapes.as_deref())?;
    let scaled: Vec<usize> = gpt2.iter().map(|n| n.div_ceil(16)).collect();
    // A software adapter times the GPU on the scaled-down set (the CPU keeps the full one),
    // so the main command stays quick; --full asks for everything.
    let software = ctx
        .as_ref()
        .and_then(|c| c.adapter_info())
        .is_some_and(|i| i.device_type == wgpu::DeviceType::Cpu);
    let split = software && !o.quick && !o.full;
    if split {
        println!(
            "GPU: a software adapter: its oracle checks and timings use GPT-2 small / 16 \
             (--full for the whole set)"
        );
    }
    // (name, tensors, on the GPU, on the CPU)
    let mut workloads = Vec::new();
    if o.quick {
        workloads.push(("GPT-2 small / 16", scaled, true, true));
    } else {
        workloads.push(("GPT-2 small", gpt2.clone(), !split, true));
        if split {
            workloads.push(("GPT-2 small / 16", scaled, true, false));
        }
    }
    workloads.push(("2000 small tensors", small_lens(), true, true));

    let mut peer = TorchPeer::start();
    let mut rows = Vec::new();
    let mut checks = Checks::default();
    for (name, lens, on_gpu, on_cpu) in workloads.iter().filter(|_| !o.host_only) {
        let n: usize = lens.iter().sum();
        let values = gradients(n);
        for dtype in [DType::F32, DType::F16, DType::BF16] {
            let pristine = Flat::new(dtype, &values);
            println!(
                "\n== {name}, {dtype}: {} tensors, {n} elements, {:.1} MB ==",
                lens.len(),
                pristine.bytes().len() as f64 / 1e6
            );
            let norm = pristine.total_norm(lens);
            // The CPU floors' buffers, of the gradients' size (empty for a GPU-only run).
            let cpu_bytes = if !o.gpu_only && *on_cpu {
                pristine.bytes().len()
            } else {
                0
            };
            let mut floor_buffers = FloorBuffers::new(cpu_bytes);
            if let (Some(ctx), true) = (&ctx, *on_gpu) {
                bench_gpu(
                    &mut rows,
                    &mut checks,
                    &mut peer,
                    ctx,
                    name,
                    lens,
                    &pristine,
                    norm,
                    o.runs,
                )?;
            }
            // The optimizer steps on the GPT-2 set, f32 and bf16 gradients.
            if name.starts_with("GPT-2") && dtype != DType::F16 {
                let gpu = ctx.as_ref().filter(|_| *on_gpu);
                bench_steps(
                    &mut rows,
                    &mut checks,
                    &mut peer,
                    &mut floor_buffers,
                    (gpu, !o.gpu_only && *on_cpu),
                    name,
                    lens,
                    &pristine,
                    norm,
                    o.runs.min(3),
                )?;
            }
            if !o.gpu_only && *on_cpu {
                // A set that fits the cache runs in well under a millisecond, where
                // thread wake-ups spread single calls widely: more runs keep its medians
                // (and its floors') steady.
                let runs = match pristine.bytes().len() < CACHED_SET_BYTES {
                    true => CACHED_SET_RUNS * o.runs,
                    false => o.runs,
                };
                bench_cpu(
                    &mut rows,
                    &mut checks,
                    &mut peer,
                    &mut floor_buffers,
                    name,
                    lens,
                    &pristine,
                    norm,
                    runs,
                )?;
            }
        }
    }
    // The host section: the full GPT-2 set (host time does not depend on the adapter's
    // speed), or the scaled one with --quick.
    let host = match &ctx {
        Some(ctx) => {
            let lens = if o.quick { &workloads[0].1 } else { &gpt2 };
            let figures = host_cost::measure(ctx, lens, o.runs.max(7))?;
            host_cost::print(&figures, lens.len());
            figures
        }
        None => Vec::new(),
    };
    print_summary(&rows, &gpu_name);
    if let Some(path) = &o.json {
        write_json(path, &rows, &host, &gpu_name)?;
        println!(
            "\nwrote {} records to {}",
            rows.len() + host.len(),
            path.display()
        );
    }
    Ok(checks.failed)
}

fn main() -> ExitCode {
    let o = match options() {
        Ok(o) => o,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(2);
        }
    };
    match run(&o) {
        Ok(failed) if failed.is_empty() => ExitCode::SUCCESS,
        Ok(failed) => {
            eprintln!("\nFAILED checks: {}", failed.join("; "));
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(2)
        }
    }
}
