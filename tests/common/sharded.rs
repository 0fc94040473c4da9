//! The sharded-clipping checks, run by every rank of a job: in-process ranks
//! (`tests/sharded.rs`, threads) or MPI processes (`tests/mpi.rs`). A scaled-down GPT-2
//! set is split ZeRO-style across the ranks (tensors cut mid-way, or at rows for AGC);
//! each rank clips its shard, the clipped shards are gathered, and everything is compared
//! with the single-process CPU clip of the whole set: norms within 1e-6 relative, every
//! element within 1e-6 relative, the same decisions, and bitwise the same report and state
//! on every rank.

use std::cell::RefCell;
use std::sync::{Mutex, MutexGuard};

use gradclip::{
    Agc, AutoClip, ClipError, ClipPolicy, ClipReport, Collective, CpuClipper, GaussianNoise,
    GpuClipper, GpuContext, GpuTensor, GradMut, GradRef, GroupClip, LossScale, NonFinitePolicy,
    PerTensorClip, Rule, Shard, Sharded, TensorInfo, UnitAxis, ZClip,
};

use super::{close, download, upload, Host};

/// GPT-2's tensors, scaled down (width 16, 2 blocks, vocabulary 503, context 64).
pub fn gpt2_tiny() -> Vec<TensorInfo> {
    let (d, v, ctx) = (16, 503, 64);
    let mut t = vec![
        TensorInfo::new("wte.weight", &[v, d]),
        TensorInfo::new("wpe.weight", &[ctx, d]),
    ];
    for b in 0..2 {
        let h = |s: &str| format!("h.{b}.{s}");
        t.extend([
            TensorInfo::new(h("ln_1.weight"), &[d]),
            TensorInfo::new(h("ln_1.bias"), &[d]),
            TensorInfo::new(h("attn.c_attn.weight"), &[d, 3 * d]),
            TensorInfo::new(h("attn.c_attn.bias"), &[3 * d]),
            TensorInfo::new(h("attn.c_proj.weight"), &[d, d]),
            TensorInfo::new(h("attn.c_proj.bias"), &[d]),
            TensorInfo::new(h("ln_2.weight"), &[d]),
            TensorInfo::new(h("ln_2.bias"), &[d]),
            TensorInfo::new(h("mlp.c_fc.weight"), &[d, 4 * d]),
            TensorInfo::new(h("mlp.c_fc.bias"), &[4 * d]),
            TensorInfo::new(h("mlp.c_proj.weight"), &[4 * d, d]),
            TensorInfo::new(h("mlp.c_proj.bias"), &[d]),
        ]);
    }
    t.extend([
        TensorInfo::new("ln_f.weight", &[d]),
        TensorInfo::new("ln_f.bias", &[d]),
    ]);
    t
}

/// Deterministic values of tensor `t` at step `step`: magnitudes that differ by tensor
/// and grow with the step, so clipping starts partway.
pub fn values(infos: &[TensorInfo], step: u64, salt: u64) -> Vec<Vec<f32>> {
    (infos.iter().enumerate())
        .map(|(t, info)| {
            let scale = 10f32.powi((t % 5) as i32 - 3) * (1.0 + step as f32 * 0.35);
            (0..info.len())
                .map(|i| {
                    let mut x = (i + 1) ^ ((t as u64 + 7) << 32) ^ (step << 48) ^ (salt << 56);
                    x = x.wrapping_mul(0x9E37_79B9_7F4A_7C15);
                    x ^= x >> 29;
                    x = x.wrapping_mul(0xBF58_476D_1CE4_E5B9);
                    let u = (x >> 40) as f32 / (1u64 << 24) as f32;
                    (u - 0.5) * scale
                })
                .collect()
        })
        .collect()
}

/// One check: a chain, how the set is cut, how many steps, and which rank (if any) gets a
/// NaN at its first element on step 1.
pub struct Case {
    pub name: &'static str,
    pub policy: ClipPolicy,
    pub rows: bool,
    pub steps: u64,
    pub nan_on: Option<usize>,
}

/// Every chain the checks cover.
pub fn cases(world: usize) -> Vec<Case> {
    let case = |name, policy, rows, steps| Case {
        name,
        policy,
        rows,
        steps,
        nan_on: None,
    };
    vec![
        case("global", ClipPolicy::new(Rule::GlobalNorm(1.0)), false, 3),
        case(
            "groups",
            ClipPolicy::new(Rule::Groups(
                GroupClip::new(0.4)
                    .group("embeddings", "w*", 0.8)
                    .group("block 0", "h.0.*", 0.5),
            )),
            false,
            2,
        ),
        case(
            "per-tensor",
            ClipPolicy::new(Rule::PerTensor(PerTensorClip { max_norm: 0.3 })),
            false,
            2,
        ),
        case(
            "agc rows",
            ClipPolicy::new(Rule::Agc(Agc::new(0.02))),
            true,
            2,
        ),
        case(
            "agc cut mid-row",
            ClipPolicy::new(Rule::Agc(Agc::new(0.02))),
            false,
            2,
        ),
        case(
            "agc columns cut (optax axis)",
            ClipPolicy::new(Rule::Agc(Agc::new(0.02).axis(UnitAxis::Last))),
            false,
            2,
        ),
        case(
            "agc then global",
            ClipPolicy::new(Rule::Agc(Agc::new(0.05).exclude("*.bias")))
                .then(Rule::GlobalNorm(0.9)),
            true,
            2,
        ),
        case(
            "autoclip",
            ClipPolicy::new(Rule::AutoClip(AutoClip::new(30.0, 8))),
            false,
            20,
        ),
        case(
            "zclip with noise",
            ClipPolicy::new(Rule::ZClip(ZClip {
                warmup: 3,
                ..ZClip::default()
            }))
            .noise(GaussianNoise {
                sigma: 1e-3,
                seed: 11,
            }),
            false,
            6,
        ),
        Case {
            nan_on: Some(world - 1),
            ..case(
                "skip on one rank's NaN",
                ClipPolicy::new(Rule::GlobalNorm(1.0)).non_finite(NonFinitePolicy::SkipStep),
                false,
                3,
            )
        },
        // One rank's NaN skips the step and backs the scale off on every rank; two finite
        // steps in a row grow it.
        Case {
            nan_on: Some(world - 1),
            ..case(
                "loss scaled, one rank overflows",
                ClipPolicy::new(Rule::PerTensor(PerTensorClip { max_norm: 0.3 }))
                    .then(Rule::GlobalNorm(1.0))
                    .loss_scale(LossScale::dynamic().init(1024.0).growth(2.0, 2)),
                false,
                5,
            )
        },
    ]
}

/// Where a rank clips its shard.
#[derive(Clone, Copy)]
pub enum On<'a> {
    Cpu,
    /// The GPU; `turns` is held around every GPU use of this rank and released while it
    /// waits for the others (GL's context allows one thread at a time).
    Gpu(&'a GpuContext, &'a Mutex<()>),
}

/// A collective that lets go of the GPU turn while it waits for the other ranks (wgpu's GL
/// backend allows one thread at a time; on Vulkan the turns only serialize submissions).
pub struct Turns<'a, C: Collective> {
    inner: &'a C,
    lock: Option<&'a Mutex<()>>,
    held: RefCell<Option<MutexGuard<'a, ()>>>,
}

impl<'a, C: Collective> Turns<'a, C> {
    pub fn new(inner: &'a C, lock: Option<&'a Mutex<()>>) -> Self {
        let t = Turns {
            inner,
            lock,
            held: RefCell::new(None),
        };
        t.take();
        t
    }
    fn take(&self) {
        if let Some(l) = self.lock {
            *self.held.borrow_mut() = Some(l.lock().unwrap_or_else(|e| e.into_inner()));
        }
    }
    fn around<T>(&self, f: impl FnOnce() -> T) -> T {
        self.held.borrow_mut().take();
        let out = f();
        self.take();
        out
    }
}

impl<C: Collective> Collective for Turns<'_, C> {
    fn rank(&self) -> usize {
        self.inner.rank()
    }
    fn size(&self) -> usize {
        self.inner.size()
    }
    fn all_reduce_max(&self, v: &mut [f64]) -> Result<(), ClipError> {
        self.around(|| self.inner.all_reduce_max(v))
    }
    fn all_reduce_sum(&self, v: &mut [f64]) -> Result<(), ClipError> {
        self.around(|| self.inner.all_reduce_sum(v))
    }
    fn all_reduce_or(&self, v: &mut [u32]) -> Result<(), ClipError> {
        self.around(|| self.inner.all_reduce_or(v))
    }
}

/// This rank's part of every tensor.
pub fn local(full: &[Vec<f32>], shard: &Shard) -> Vec<Vec<f32>> {
    (full.iter().enumerate())
        .map(|(t, v)| {
            let r = shard.range(t);
            v[r.start as usize..r.end as usize].to_vec()
        })
        .collect()
}

/// Every rank's clipped shard put back together (a SUM of zero-padded copies: exact).
fn gather(
    comm: &dyn Collective,
    parts: &[Vec<f32>],
    shard: &Shard,
    infos: &[TensorInfo],
) -> Vec<f64> {
    let total: u64 = infos.iter().map(|t| t.len()).sum();
    let mut all = vec![0.0f64; total as usize];
    let mut at = 0;
    for (t, info) in infos.iter().enumerate() {
        let r = shard.range(t);
        for (k, &x) in parts[t].iter().enumerate() {
            all[at + r.start as usize + k] = x as f64;
        }
        at += info.len() as usize;
    }
    comm.all_reduce_sum(&mut all).expect("gather");
    all
}

/// Checks that `x` has the same bits on every rank.
fn same_everywhere(comm: &dyn Collective, what: &str, x: f64) {
    let mut v = [x, -x];
    comm.all_reduce_max(&mut v).expect("compare");
    assert!(
        (x.is_nan() && v[0].is_nan()) || (v[0] == -v[1] && v[0].to_bits() == x.to_bits()),
        "rank {}: {what} = {x:e} differs from another rank's",
        comm.rank()
    );
}

fn report_matches(case: &str, step: u64, got: &ClipReport, want: &ClipReport, rel: f64) {
    let at = format!("{case}, step {step}");
    assert!(
        close(got.total_norm, want.total_norm, rel),
        "{at}: norm {} vs single-process {}",
        got.total_norm,
        want.total_norm
    );
    assert_eq!(got.skipped, want.skipped, "{at}: skipped");
    assert_eq!(got.non_finite, want.non_finite, "{at}: non-finite");
    assert_eq!(got.clipped_units, want.clipped_units, "{at}: clipped units");
    assert_eq!(got.units, want.units, "{at}: units");
    assert_eq!(got.consecutive_skips, want.consecutive_skips, "{at}: skips");
    assert_eq!(got.loss_scale, want.loss_scale, "{at}: loss scale");
    if let (Some(a), Some(b)) = (got.threshold, want.threshold) {
        assert!(close(a as f64, b as f64, rel), "{at}: threshold {a} vs {b}");
    }
    for (a, b) in got.stages.iter().zip(&want.stages) {
        assert!(close(a.total_norm, b.total_norm, rel), "{at}: stage norm");
    }
}

/// Runs every case on this rank (`comm`), clipping on `on`; panics on any mismatch.
pub fn check_all(comm: &dyn Collective, on: On<'_>) {
    let infos = gpt2_tiny();
    let world = comm.size();
    for case in cases(world) {
        let lock = match on {
            On::Gpu(_, l) => Some(l),
            On::Cpu => None,
        };
        let comm = Turns::new(&comm, lock);
        let shard = if case.rows {
            Shard::even_rows(&infos, comm.rank(), world)
        } else {
            Shard::even(&infos, comm.rank(), world)
        }
        .unwrap();
        let weights = values(&infos, 0, 1);
        let mut reference = CpuClipper::new(case.policy.clone(), &infos).unwrap();
        let mut sharded = ShardedRun::new(on, &case.policy, &infos, &shard, &weights, &comm);
        for step in 0..case.steps {
            let mut full = values(&infos, step, 0);
            if let (Some(rank), 1) = (case.nan_on, step) {
                let owner = Shard::even(&infos, rank, world).unwrap();
                let t = (0..infos.len()).find(|&t| owner.local_len(t) > 0).unwrap();
                full[t][owner.range(t).start as usize] = f32::NAN;
            }
            let mut parts = local(&full, &shard);
            let got = sharded.step(&mut parts, &local(&weights, &shard));
            let mut want_grads: Vec<Host> = full.iter().cloned().map(Host::F32).collect();
            let w: Vec<GradRef<'_>> = weights.iter().map(|v| GradRef::F32(v)).collect();
            let mut muts: Vec<GradMut<'_>> = want_grads.iter_mut().map(|h| h.as_mut()).collect();
            let want = reference.step(&mut muts, Some(&w)).unwrap();
            report_matches(case.name, step, &got, &want, 1e-6);
            same_everywhere(&comm, "total norm", got.total_norm);
            same_everywhere(&comm, "coefficient", got.coef.unwrap_or(1.0) as f64);
            let next_scale = got.loss_scale.map_or(0.0, |l| l.next as f64);
            same_everywhere(&comm, "next loss scale", next_scale);
            let all = gather(&comm, &parts, &shard, &infos);
            let want: Vec<f64> = want_grads.iter().flat_map(|h| h.to_f64()).collect();
            // The GPU's noise is the CPU's within 2e-6 of sigma (its f32 transcendentals).
            let abs = case.policy.noise.map_or(0.0, |n| n.sigma as f64 * 2e-6);
            for (i, (a, b)) in all.iter().zip(&want).enumerate() {
                assert!(
                    close(*a, *b, 1e-6) || (a - b).abs() <= abs,
                    "{}, step {step}: element {i} is {a:e}, single-process {b:e}",
                    case.name
                );
            }
        }
        let state = sharded.state_bytes();
        let hash = state
            .iter()
            .fold(0u64, |h, &b| h.wrapping_mul(0x100_0000_01b3) ^ b as u64);
        same_everywhere(&comm, "state", (hash >> 12) as f64);
    }
}

/// The tensors of an arena of this rank's shards, named after the logical tensors.
fn local_tensors<'b>(
    a: &'b super::Arena,
    like: &[Host],
    infos: &[TensorInfo],
) -> Vec<GpuTensor<'b>> {
    (like.iter().zip(&a.offsets).zip(infos))
        .map(|((h, &o), info)| {
            let n = h.as_ref().len() as u64;
            GpuTensor::new(&a.buffer, o, n, gradclip::DType::F32).named(info.name.clone())
        })
        .collect()
}

/// A sharded runner of either backend, with its buffers.
enum ShardedRun<'a, C: Collective> {
    Cpu(Box<CpuClipper<Sharded<&'a C>>>),
    Gpu {
        ctx: &'a GpuContext,
        policy: Box<GpuClipper<Sharded<&'a C>>>,
        arena: super::Arena,
        like: Vec<Host>,
        _params: super::Arena,
    },
}

impl<'a, C: Collective> ShardedRun<'a, C> {
    fn new(
        on: On<'a>,
        policy: &ClipPolicy,
        infos: &[TensorInfo],
        shard: &Shard,
        weights: &[Vec<f32>],
        comm: &'a C,
    ) -> Self {
        let policy = policy.clone();
        match on {
            On::Cpu => ShardedRun::Cpu(Box::new(
                CpuClipper::sharded(policy, infos, shard.clone(), comm).expect("sharded policy"),
            )),
            On::Gpu(ctx, _) => {
                let like: Vec<Host> = (0..infos.len())
                    .map(|t| Host::F32(vec![0.0; shard.local_len(t) as usize]))
                    .collect();
                let arena = upload(ctx, &like);
                let w: Vec<Host> = local(weights, shard).into_iter().map(Host::F32).collect();
                let params = upload(ctx, &w);
                let (g, p) = (
                    local_tensors(&arena, &like, infos),
                    local_tensors(&params, &like, infos),
                );
                let policy =
                    GpuClipper::sharded(ctx, &g, Some(&p), policy, infos, shard.clone(), comm)
                        .expect("sharded GPU policy");
                drop((g, p));
                ShardedRun::Gpu {
                    ctx,
                    policy: Box::new(policy),
                    arena,
                    like,
                    _params: params,
                }
            }
        }
    }

    fn step(&mut self, parts: &mut [Vec<f32>], weights: &[Vec<f32>]) -> ClipReport {
        match self {
            ShardedRun::Cpu(p) => {
                let mut g: Vec<GradMut<'_>> = parts.iter_mut().map(|v| GradMut::F32(v)).collect();
                let w: Vec<GradRef<'_>> = weights.iter().map(|v| GradRef::F32(v)).collect();
                p.step(&mut g, Some(&w)).expect("sharded step")
            }
            ShardedRun::Gpu {
                ctx,
                policy,
                arena,
                like,
                ..
            } => {
                let host: Vec<Host> = parts.iter().cloned().map(Host::F32).collect();
                super::write(ctx, arena, &host);
                let report = policy.step().expect("sharded GPU step");
                for (p, h) in parts.iter_mut().zip(download(ctx, arena, like)) {
                    let Host::F32(v) = h else { unreachable!() };
                    *p = v;
                }
                report
            }
        }
    }

    fn state_bytes(&self) -> Vec<u8> {
        match self {
            ShardedRun::Cpu(p) => p.state().to_bytes(),
            ShardedRun::Gpu { policy, .. } => policy.state().expect("state").to_bytes(),
        }
    }
}
