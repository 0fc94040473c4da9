//! The grid of `Clipper<W>` on `Backend::Gpu` (host slices staged through device mirrors)
//! for the wrappers beyond `Plain`: accumulation, per-example clipping, a fused optimizer
//! and sharded ranks. Every cell is run next to the CPU oracle on the same inputs and
//! compared value by value: the host tensors it writes back, its reports and its state.

mod common;

use std::sync::Mutex;
use std::time::Duration;

use common::sharded::Turns;
use common::{close, gpu, muts, refs, Host};
use gradclip::{
    bf16, f16, Adam, AutoClip, Backend, ClipError, ClipPolicy, ClipReport, Clipper, Collective,
    CpuClipper, GpuContext, NonFinitePolicy, Norm, Optimizer, PerExampleClip, PerTensorClip,
    PolicyState, Rule, Schedule, Sgd, Shard, TensorInfo, ThreadCollective, ZClip,
};

// ---------------------------------------------------------------------------------------
// Shared helpers
// ---------------------------------------------------------------------------------------

/// `n` deterministic values in `[-scale, scale)` (splitmix64 of `seed` and the index).
fn values(seed: u64, n: usize, scale: f32) -> Vec<f32> {
    (0..n as u64)
        .map(|i| {
            let mut x = seed
                .wrapping_mul(0x9E37_79B9_7F4A_7C15)
                .wrapping_add(i.wrapping_mul(0xD1B5_4A32_D192_ED03))
                .wrapping_add(0x632B_E59B_D9B4_E019);
            x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            x ^= x >> 31;
            let u = (x >> 40) as f32 / (1u64 << 24) as f32;
            (2.0 * u - 1.0) * scale
        })
        .collect()
}

/// A host tensor of `dtype` (0: f32, 2: bf16) holding `v`.
fn host(dtype: u8, v: Vec<f32>) -> Host {
    common::host(dtype, v)
}

/// Zeroed host tensors of the dtypes and lengths of `like`.
fn zeros_like(like: &[Host]) -> Vec<Host> {
    like.iter()
        .map(|h| match h {
            Host::F32(v) => Host::F32(vec![0.0; v.len()]),
            Host::F16(v) => Host::F16(vec![f16::ZERO; v.len()]),
            Host::BF16(v) => Host::BF16(vec![bf16::ZERO; v.len()]),
        })
        .collect()
}

/// f32 vectors as the `&mut [f32]` slices the optimizer and per-example steps take.
fn f32_muts(v: &mut [Vec<f32>]) -> Vec<&mut [f32]> {
    v.iter_mut().map(|x| x.as_mut_slice()).collect()
}

/// The bits of a 16-bit float in an order where neighbours differ by 1 (and -0 == +0).
fn ordered(bits: u16) -> i32 {
    let mag = (bits & 0x7fff) as i32;
    if bits & 0x8000 != 0 {
        -mag
    } else {
        mag
    }
}

/// f32 values equal within `rel` relative or `abs` absolute.
fn assert_f32s(got: &[f32], want: &[f32], rel: f64, abs: f64, what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, (&a, &b)) in got.iter().zip(want).enumerate() {
        let (a, b) = (a as f64, b as f64);
        assert!(
            close(a, b, rel) || (a - b).abs() <= abs,
            "{what}[{i}]: GPU {a:e} vs CPU {b:e}"
        );
    }
}

/// Host tensors equal: f32 within 1e-5 relative (or 1e-6 absolute); f16 and bf16 within
/// one unit in the last place of their type.
fn assert_hosts(got: &[Host], want: &[Host], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: tensor count");
    for (t, (g, w)) in got.iter().zip(want).enumerate() {
        let at = format!("{what}, tensor {t}");
        match (g, w) {
            (Host::F32(a), Host::F32(b)) => assert_f32s(a, b, 1e-5, 1e-6, &at),
            (Host::BF16(a), Host::BF16(b)) => {
                assert_eq!(a.len(), b.len(), "{at}: length");
                for (i, (x, y)) in a.iter().zip(b).enumerate() {
                    let d = (ordered(x.to_bits()) - ordered(y.to_bits())).abs();
                    assert!(
                        d <= 1,
                        "{at}[{i}]: GPU {x} vs CPU {y} ({d} bf16 ulps apart)"
                    );
                }
            }
            (Host::F16(a), Host::F16(b)) => {
                assert_eq!(a.len(), b.len(), "{at}: length");
                for (i, (x, y)) in a.iter().zip(b).enumerate() {
                    let d = (ordered(x.to_bits()) - ordered(y.to_bits())).abs();
                    assert!(d <= 1, "{at}[{i}]: GPU {x} vs CPU {y} ({d} f16 ulps apart)");
                }
            }
            _ => panic!("{at}: dtypes differ"),
        }
    }
}

/// The report fields every wrapper shares: step, units, clipped units, total norm (1e-5
/// relative), the global stage's coefficient and threshold, skips.
fn assert_report(got: &ClipReport, want: &ClipReport, what: &str) {
    assert_eq!(got.step, want.step, "{what}: step");
    assert_eq!(got.units, want.units, "{what}: units");
    assert_eq!(
        got.clipped_units, want.clipped_units,
        "{what}: clipped units"
    );
    assert_eq!(got.skipped, want.skipped, "{what}: skipped");
    assert_eq!(got.non_finite, want.non_finite, "{what}: non-finite");
    assert!(
        close(got.total_norm, want.total_norm, 1e-5),
        "{what}: total norm GPU {} vs CPU {}",
        got.total_norm,
        want.total_norm
    );
    match (got.coef, want.coef) {
        (Some(a), Some(b)) => assert!(
            close(a as f64, b as f64, 1e-5),
            "{what}: coefficient GPU {a} vs CPU {b}"
        ),
        (a, b) => assert_eq!(a, b, "{what}: coefficient"),
    }
    match (got.threshold, want.threshold) {
        (Some(a), Some(b)) => assert!(
            close(a as f64, b as f64, 1e-5),
            "{what}: threshold GPU {a} vs CPU {b}"
        ),
        (a, b) => assert_eq!(a, b, "{what}: threshold"),
    }
    assert_eq!(got.stages.len(), want.stages.len(), "{what}: stages");
    for (s, (a, b)) in got.stages.iter().zip(&want.stages).enumerate() {
        assert!(
            close(a.total_norm, b.total_norm, 1e-5),
            "{what}: stage {s} norm GPU {} vs CPU {}",
            a.total_norm,
            b.total_norm
        );
        assert_eq!(
            a.clipped_units, b.clipped_units,
            "{what}: stage {s} clipped"
        );
    }
}

/// Two chain states equal: steps, skips, and every adaptive history within 1e-5.
fn assert_states(got: &PolicyState, want: &PolicyState, what: &str) {
    assert_eq!(got.steps_taken(), want.steps_taken(), "{what}: steps taken");
    assert_eq!(
        got.consecutive_skips(),
        want.consecutive_skips(),
        "{what}: skips"
    );
    let (a, b) = (got.adaptive(), want.adaptive());
    assert_eq!(a.len(), b.len(), "{what}: adaptive stages");
    for (x, y) in a.iter().zip(&b) {
        assert_eq!(x.norms_seen, y.norms_seen, "{what}: norms seen");
        assert_f32s(
            &x.history,
            &y.history,
            1e-5,
            0.0,
            &format!("{what}: history"),
        );
        match (x.ema, y.ema) {
            (Some((m1, v1)), Some((m2, v2))) => {
                assert_f32s(&[m1, v1], &[m2, v2], 1e-5, 1e-12, &format!("{what}: ema"))
            }
            (p, q) => assert_eq!(p, q, "{what}: ema"),
        }
    }
}

// ---------------------------------------------------------------------------------------
// Accumulate
// ---------------------------------------------------------------------------------------

/// f32 and bf16 tensors of lengths 1, 7, 13 and 257, the dtypes interleaved.
fn accum_layout() -> Vec<(u8, usize)> {
    vec![
        (0, 1),
        (2, 1),
        (2, 7),
        (0, 7),
        (0, 13),
        (2, 13),
        (0, 257),
        (2, 257),
    ]
}

fn accum_infos() -> Vec<TensorInfo> {
    (accum_layout().iter().enumerate())
        .map(|(t, &(_, n))| TensorInfo::new(format!("t{t}"), &[n as u64]))
        .collect()
}

/// Micro-batch `m`: magnitudes grow with the tensor, so a per-tensor rule clips some.
fn micro_batch(m: u64) -> Vec<Host> {
    (accum_layout().iter().enumerate())
        .map(|(t, &(dtype, n))| {
            let scale = 0.03 * (1 + t) as f32;
            host(dtype, values(1000 * m + t as u64, n, scale))
        })
        .collect()
}

/// Chains at the boundary: a global norm that clips, a per-tensor rule, and AutoClip
/// (adaptive state) before a global norm.
fn accum_chains() -> Vec<(&'static str, ClipPolicy)> {
    vec![
        ("global norm", ClipPolicy::global_norm(0.5)),
        (
            "per tensor",
            ClipPolicy::new(Rule::PerTensor(PerTensorClip { max_norm: 0.3 })),
        ),
        (
            "autoclip then global",
            ClipPolicy::new(Rule::AutoClip(AutoClip::new(50.0, 4))).then(Rule::GlobalNorm(0.9)),
        ),
    ]
}

/// One micro-step on the GPU clipper and the CPU oracle, each into its own sums: the sums,
/// `pending()` and (at a boundary) the reports agree.
fn accum_both(
    gpu_c: &mut Clipper<gradclip::Accumulate>,
    cpu_c: &mut CpuClipper<gradclip::Accumulate>,
    gs: &mut [Host],
    cs: &mut [Host],
    micro: &[Host],
    what: &str,
) -> Option<ClipReport> {
    let rg = gpu_c.step(&mut muts(gs), &refs(micro), None).unwrap();
    let rc = cpu_c.step(&mut muts(cs), &refs(micro), None).unwrap();
    assert_hosts(gs, cs, &format!("{what}: sums"));
    assert_eq!(gpu_c.pending(), cpu_c.pending(), "{what}: pending");
    assert_eq!(gpu_c.steps_taken(), cpu_c.steps_taken(), "{what}: steps");
    match (&rg, &rc) {
        (Some(a), Some(b)) => assert_report(a, b, &format!("{what}: report")),
        (None, None) => {}
        _ => panic!("{what}: GPU report {rg:?}, CPU report {rc:?}"),
    }
    rg
}

/// `Clipper<Accumulate>` on the GPU equals `CpuClipper<Accumulate>`: k = 3, seven
/// micro-steps (a partial accumulation left), f32 and bf16 tensors of lengths 1, 7, 13,
/// 257; sums after every micro-step, `pending()`, boundary reports; then the GPU's chain
/// state moved into a fresh CPU clipper continues as both others do.
#[test]
fn accumulate_on_the_gpu_equals_the_cpu_and_its_state_moves_to_the_cpu() {
    let gpu = gpu();
    let infos = accum_infos();
    for (name, chain) in accum_chains() {
        let backend = Backend::Gpu(gpu.clone());
        let mut g = Clipper::accumulating(backend, chain.clone(), &infos, 3).unwrap();
        let mut c = CpuClipper::accumulating(chain.clone(), &infos, 3).unwrap();
        assert_eq!((g.micro_steps(), g.pending(), g.steps_taken()), (3, 0, 0));
        let (mut gs, mut cs) = (zeros_like(&micro_batch(0)), zeros_like(&micro_batch(0)));
        let mut clipped_any = false;
        for m in 0..7u64 {
            let what = format!("{name}, micro-step {m}");
            let report = accum_both(&mut g, &mut c, &mut gs, &mut cs, &micro_batch(m), &what);
            assert_eq!(g.pending(), ((m + 1) % 3) as u32, "{what}");
            assert_eq!(report.is_some(), (m + 1) % 3 == 0, "{what}: boundary");
            if let Some(r) = report {
                assert_eq!(r.step, m / 3, "{what}");
                assert_eq!(r.units, 8, "{what}");
                clipped_any |= r.clipped_units > 0;
                if name == "per tensor" {
                    // The rule is meaningful here: some tensors clipped, some not.
                    assert!(r.clipped_units > 0 && r.clipped_units < 8, "{what}: {r:?}");
                }
                if name == "global norm" {
                    assert!(r.coef.unwrap() < 1.0, "{what}: the global norm clips");
                }
            }
        }
        assert!(clipped_any, "{name}: the chain clipped at some boundary");
        assert_eq!((g.pending(), g.steps_taken()), (1, 2), "{name}");

        // The chain state read from the GPU is the CPU's; restored into a fresh CPU
        // clipper, the next accumulation continues as on the other two.
        let saved = g.state().unwrap();
        assert_states(&saved, c.state(), &format!("{name}: state"));
        let mut fresh = CpuClipper::accumulating(chain.clone(), &infos, 3).unwrap();
        fresh.set_state(&saved).unwrap();
        assert_eq!(fresh.steps_taken(), 2, "{name}: restored steps");
        // And into a fresh GPU clipper, before its first step (no device runner yet).
        let backend = Backend::Gpu(gpu.clone());
        let mut fresh_gpu = Clipper::accumulating(backend, chain, &infos, 3).unwrap();
        fresh_gpu.set_state(&saved).unwrap();
        assert_eq!(fresh_gpu.steps_taken(), 2, "{name}: restored steps (GPU)");
        // Drop the partial accumulation (the state does not carry it) on both.
        g.reset();
        c.reset();
        assert_eq!((g.pending(), c.pending()), (0, 0), "{name}: after reset");
        let (mut fs, mut fgs) = (zeros_like(&gs), zeros_like(&gs));
        for m in 7..10u64 {
            let what = format!("{name}, after the move, micro-step {m}");
            let micro = micro_batch(m);
            let rg = accum_both(&mut g, &mut c, &mut gs, &mut cs, &micro, &what);
            let rf = fresh.step(&mut muts(&mut fs), &refs(&micro), None).unwrap();
            let rfg = fresh_gpu
                .step(&mut muts(&mut fgs), &refs(&micro), None)
                .unwrap();
            assert_hosts(&gs, &fs, &format!("{what}: sums vs restored CPU"));
            assert_hosts(
                &fgs,
                &fs,
                &format!("{what}: restored GPU sums vs restored CPU"),
            );
            assert_eq!(g.pending(), fresh.pending(), "{what}: pending");
            assert_eq!(fresh_gpu.pending(), fresh.pending(), "{what}: pending");
            match (&rg, &rf, &rfg) {
                (Some(a), Some(b), Some(d)) => {
                    assert_eq!(a.step, 2, "{what}");
                    assert_report(a, b, &format!("{what}: report vs restored CPU"));
                    assert_report(d, b, &format!("{what}: restored GPU vs restored CPU"));
                }
                (None, None, None) => {}
                _ => panic!("{what}: reports {rg:?}, {rf:?}, {rfg:?}"),
            }
        }
        assert_states(
            &g.state().unwrap(),
            fresh.state(),
            &format!("{name}: state after the move"),
        );
        assert_states(
            &fresh_gpu.state().unwrap(),
            fresh.state(),
            &format!("{name}: restored GPU state after the move"),
        );
    }
}

/// A micro-batch of other lengths, or of another dtype, than the sums is
/// `ClipError::ShapeMismatch` on both backends, mid-accumulation and on the micro-batch
/// that would close it, and leaves the sums and `pending()` as they were; the next good
/// micro-batch continues as if the bad one had not come.
#[test]
fn accumulate_rejects_micro_batches_of_other_shapes_and_changes_nothing() {
    let gpu = gpu();
    let infos = accum_infos();
    let chain = ClipPolicy::global_norm(0.5);
    let mut g = Clipper::accumulating(Backend::Gpu(gpu.clone()), chain.clone(), &infos, 3).unwrap();
    let mut c = Clipper::accumulating(Backend::Cpu, chain.clone(), &infos, 3).unwrap();
    let mut oracle = CpuClipper::accumulating(chain, &infos, 3).unwrap();
    let (mut gs, mut cs) = (zeros_like(&micro_batch(0)), zeros_like(&micro_batch(0)));
    let mut os = zeros_like(&gs);
    // Before any step (the GPU has no mirrors yet), then after one and two micro-batches.
    for m in 0..3u64 {
        let good = micro_batch(m);
        let mut shorter = good.clone();
        if let Host::BF16(v) = &mut shorter[5] {
            v.pop();
        }
        let mut longer = good.clone();
        if let Host::F32(v) = &mut longer[6] {
            v.push(0.25);
        }
        let mut retyped = good.clone();
        retyped[3] = Host::F16(vec![f16::from_f32(0.1); 7]);
        for (bad_name, bad) in [
            ("one bf16 tensor shorter", &shorter),
            ("one f32 tensor longer", &longer),
            ("an f16 tensor for an f32 one", &retyped),
        ] {
            for (backend, clipper, sums) in [("GPU", &mut g, &mut gs), ("CPU", &mut c, &mut cs)] {
                let what = format!("{backend}, pending {m}, {bad_name}");
                let before = sums.clone();
                let steps = clipper.steps_taken();
                let e = clipper.step(&mut muts(sums), &refs(bad), None).unwrap_err();
                assert!(matches!(e, ClipError::ShapeMismatch { .. }), "{what}: {e}");
                assert_eq!(*sums, before, "{what}: sums untouched");
                assert_eq!(clipper.pending(), m as u32, "{what}: pending untouched");
                assert_eq!(clipper.steps_taken(), steps, "{what}: steps untouched");
            }
        }
        // The good micro-batch continues as on an oracle that never saw the bad ones.
        let ro = oracle.step(&mut muts(&mut os), &refs(&good), None).unwrap();
        let rg = g.step(&mut muts(&mut gs), &refs(&good), None).unwrap();
        let rc = c.step(&mut muts(&mut cs), &refs(&good), None).unwrap();
        assert_hosts(&gs, &os, &format!("GPU after micro-batch {m}"));
        assert_eq!(cs, os, "CPU after micro-batch {m}");
        assert_eq!(
            (g.pending(), c.pending()),
            (oracle.pending(), oracle.pending())
        );
        match (rg, rc, ro) {
            (Some(a), Some(b), Some(o)) => {
                assert_report(&a, &o, "GPU boundary");
                assert_report(&b, &o, "CPU boundary");
                assert!(a.coef.unwrap() < 1.0, "the boundary clipped");
            }
            (None, None, None) => assert!(m < 2),
            other => panic!("micro-batch {m}: reports {other:?}"),
        }
    }
}

// ---------------------------------------------------------------------------------------
// PerExample
// ---------------------------------------------------------------------------------------

const BATCH: u32 = 4;
/// Per-example lengths of the two tensors.
const PER: [usize; 2] = [13, 7];

fn per_example_infos() -> Vec<TensorInfo> {
    TensorInfo::unnamed(PER.iter().map(|&p| BATCH as usize * p))
}

/// Inputs `[batch, P_t]` (an f32 tensor and a bf16 one) at step `s`: example `i` scaled
/// by `0.1 + 0.25 i`, so small examples pass and large ones are clipped.
fn per_example_inputs(s: u64) -> Vec<Host> {
    (PER.iter().enumerate())
        .map(|(t, &p)| {
            let v: Vec<f32> = (0..BATCH as usize)
                .flat_map(|i| values(100 * s + 10 * t as u64 + i as u64, p, 0.1 + 0.25 * i as f32))
                .collect();
            host(2 * t as u8, v)
        })
        .collect()
}

/// `Clipper<PerExample>` on the GPU equals the CPU: batch 4, two tensors (f32 and bf16
/// inputs), flat and per-layer thresholds, with and without noise (keyed by seed, step,
/// tensor and index, so the same on both), layer reports on; outputs within 1e-5
/// relative (or 1e-6 absolute) and the report's fields over three steps.
#[test]
fn per_example_on_the_gpu_equals_the_cpu() {
    let gpu = gpu();
    let infos = per_example_infos();
    let configs = [
        ("flat", PerExampleClip::new(BATCH, 1.0).with_layer_report()),
        (
            "flat, noise, mean",
            PerExampleClip::new(BATCH, 1.0)
                .noise(0.1, 7)
                .mean_over(4.0)
                .with_layer_report(),
        ),
        (
            "per layer",
            PerExampleClip::per_layer(BATCH, vec![0.5, 0.3]).with_layer_report(),
        ),
        (
            "per layer, noise",
            PerExampleClip::per_layer(BATCH, vec![0.5, 0.3])
                .noise(0.2, 9)
                .with_layer_report(),
        ),
    ];
    for (name, clip) in configs {
        let noisy = clip.noise_multiplier > 0.0;
        let backend = Backend::Gpu(gpu.clone());
        let mut g = Clipper::per_example(backend, clip.clone(), &infos).unwrap();
        let mut c = CpuClipper::per_example(clip.clone(), &infos).unwrap();
        let mut noiseless = CpuClipper::per_example(
            PerExampleClip {
                noise_multiplier: 0.0,
                ..clip.clone()
            },
            &infos,
        )
        .unwrap();
        let mut partly_clipped = false;
        for s in 0..3u64 {
            let what = format!("{name}, step {s}");
            let inputs = per_example_inputs(s);
            let mut go: Vec<Vec<f32>> = PER.iter().map(|&p| vec![f32::NAN; p]).collect();
            let mut co = go.clone();
            let mut no = go.clone();
            let rg = g.step(&refs(&inputs), &mut f32_muts(&mut go)).unwrap();
            let rc = c.step(&refs(&inputs), &mut f32_muts(&mut co)).unwrap();
            noiseless
                .step(&refs(&inputs), &mut f32_muts(&mut no))
                .unwrap();
            for t in 0..PER.len() {
                assert_f32s(&go[t], &co[t], 1e-5, 1e-6, &format!("{what}: output {t}"));
            }
            // The noise is there (and differs from step to step through the key).
            let moved = go.iter().flatten().zip(no.iter().flatten());
            let max_noise = moved.map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
            assert_eq!(max_noise > 1e-3, noisy, "{what}: noise {max_noise}");
            assert_eq!(rg.step, s, "{what}: step");
            assert_eq!(rg.step, rc.step, "{what}: step");
            assert_eq!(rg.units, rc.units, "{what}: units");
            assert_eq!(rg.clipped_units, rc.clipped_units, "{what}: clipped units");
            assert_eq!(
                rg.clipped_per_tensor, rc.clipped_per_tensor,
                "{what}: clipped per tensor"
            );
            let per_tensor = rg
                .clipped_per_tensor
                .clone()
                .expect("layer report asked for");
            assert_eq!(per_tensor.len(), 2, "{what}");
            partly_clipped |= per_tensor.iter().any(|&k| k > 0 && k < BATCH);
            assert!(
                close(rg.noise_std as f64, rc.noise_std as f64, 1e-6),
                "{what}: noise std GPU {} vs CPU {}",
                rg.noise_std,
                rc.noise_std
            );
            assert_eq!(rg.noise_std > 0.0, noisy, "{what}: noise std");
            assert_eq!(g.steps_taken(), s + 1, "{what}: steps taken");
        }
        assert!(partly_clipped, "{name}: some examples clipped, others not");
    }
}

// ---------------------------------------------------------------------------------------
// Optimize
// ---------------------------------------------------------------------------------------

fn optim_infos() -> Vec<TensorInfo> {
    vec![TensorInfo::new("w", &[7, 13]), TensorInfo::new("b", &[257])]
}

/// Gradients at step `s`: f32 for `w`, bf16 for `b`.
fn optim_grads(s: u64) -> Vec<Host> {
    vec![
        host(0, values(500 + s, 91, 0.2 + 0.05 * s as f32)),
        host(2, values(600 + s, 257, 0.1)),
    ]
}

fn optim_params() -> Vec<Vec<f32>> {
    vec![values(7, 91, 0.5), values(8, 257, 0.5)]
}

/// AutoClip (state) then a global norm that clips every step.
fn optim_chain() -> ClipPolicy {
    ClipPolicy::new(Rule::AutoClip(AutoClip::new(50.0, 4))).then(Rule::GlobalNorm(0.5))
}

fn optimizers() -> Vec<(&'static str, Optimizer)> {
    vec![
        ("adamw", Adam::adamw(1e-2).into()),
        ("sgd momentum", Sgd::new(0.1).momentum(0.9).into()),
    ]
}

fn assert_params(got: &[Vec<f32>], want: &[Vec<f32>], what: &str) {
    for (t, (a, b)) in got.iter().zip(want).enumerate() {
        assert_f32s(a, b, 1e-5, 1e-6, &format!("{what}: params {t}"));
    }
}

/// `Clipper<Optimize>` on the GPU equals the CPU for AdamW and SGD with momentum after a
/// chain that clips: 4 fused steps and 4 `step_in_place` (the clipped gradients written
/// back), the optimizer state (steps, moments), a new learning rate, and the GPU's
/// optimizer and chain states restored into a fresh CPU clipper.
#[test]
fn optimize_on_the_gpu_equals_the_cpu_and_its_state_moves_to_the_cpu() {
    let gpu = gpu();
    let infos = optim_infos();
    for (name, opt) in optimizers() {
        let backend = Backend::Gpu(gpu.clone());
        let mut g = Clipper::with_optimizer(backend, optim_chain(), &infos, opt).unwrap();
        let mut c = CpuClipper::with_optimizer(optim_chain(), &infos, opt).unwrap();
        let (mut gp, mut cp) = (optim_params(), optim_params());
        for s in 0..8u64 {
            let what = format!("{name}, step {s}");
            let grads = optim_grads(s);
            let (rg, rc) = if s < 4 {
                let rg = g.step(&refs(&grads), &mut f32_muts(&mut gp)).unwrap();
                let rc = c.step(&refs(&grads), &mut f32_muts(&mut cp)).unwrap();
                (rg, rc)
            } else {
                let (mut gg, mut cg) = (grads.clone(), grads.clone());
                let rg = g.step_in_place(&mut muts(&mut gg), &mut f32_muts(&mut gp));
                let rc = c.step_in_place(&mut muts(&mut cg), &mut f32_muts(&mut cp));
                assert_hosts(&gg, &cg, &format!("{what}: clipped gradients"));
                assert_ne!(gg, grads, "{what}: the gradients were clipped in place");
                (rg.unwrap(), rc.unwrap())
            };
            assert_report(&rg, &rc, &what);
            assert_eq!(rg.step, s, "{what}");
            assert!(rg.coef.unwrap() < 1.0, "{what}: the chain clips");
            assert_params(&gp, &cp, &what);
            assert_ne!(gp, optim_params(), "{what}: the parameters moved");
            assert_eq!(g.steps_taken(), s + 1, "{what}");
        }
        // The optimizer state: steps and every moment.
        let (sg, sc) = (g.state().unwrap(), c.state().clone());
        assert_eq!(sg.steps, 8, "{name}: optimizer steps");
        assert_eq!(sg.steps, sc.steps, "{name}: optimizer steps");
        assert_eq!(sg.arrays.len(), sc.arrays.len(), "{name}: state arrays");
        assert!(!sg.arrays.is_empty(), "{name}: the optimizer keeps moments");
        for (k, (a, b)) in sg.arrays.iter().zip(&sc.arrays).enumerate() {
            assert_eq!(a.len(), 2, "{name}: array {k} tensors");
            for (t, (x, y)) in a.iter().zip(b).enumerate() {
                assert!(x.iter().any(|&m| m != 0.0), "{name}: moment {k}/{t} set");
                assert_f32s(x, y, 1e-5, 1e-9, &format!("{name}: moment {k} of {t}"));
            }
        }
        assert_states(
            &g.clip_state().unwrap(),
            c.clip_state(),
            &format!("{name}: chain state"),
        );

        // A new learning rate, then a step.
        let lr = g.lr() * 0.5;
        g.set_lr(lr).unwrap();
        c.set_lr(lr).unwrap();
        assert_eq!(g.lr(), lr, "{name}: lr");
        let before = gp.clone();
        let grads = optim_grads(8);
        let rg = g.step(&refs(&grads), &mut f32_muts(&mut gp)).unwrap();
        let rc = c.step(&refs(&grads), &mut f32_muts(&mut cp)).unwrap();
        assert_report(&rg, &rc, &format!("{name}, after set_lr"));
        assert_params(&gp, &cp, &format!("{name}, after set_lr"));
        assert_ne!(
            gp, before,
            "{name}: the step after set_lr moved the parameters"
        );

        // The GPU's optimizer and chain states in a fresh CPU clipper continue its params.
        let (saved, saved_clip) = (g.state().unwrap(), g.clip_state().unwrap());
        let mut fresh = CpuClipper::with_optimizer(optim_chain(), &infos, opt).unwrap();
        fresh.set_state(&saved).unwrap();
        fresh.set_clip_state(&saved_clip).unwrap();
        fresh.set_lr(g.lr()).unwrap();
        assert_eq!(fresh.steps_taken(), 9, "{name}: restored steps");
        // And into a fresh GPU clipper, before its first step (no device runner yet).
        let backend = Backend::Gpu(gpu.clone());
        let mut fresh_gpu = Clipper::with_optimizer(backend, optim_chain(), &infos, opt).unwrap();
        fresh_gpu.set_state(&saved).unwrap();
        fresh_gpu.set_clip_state(&saved_clip).unwrap();
        fresh_gpu.set_lr(g.lr()).unwrap();
        assert_eq!(fresh_gpu.steps_taken(), 9, "{name}: restored steps (GPU)");
        assert_eq!(fresh_gpu.lr(), g.lr(), "{name}: restored lr (GPU)");
        let (mut fp, mut fgp) = (gp.clone(), gp.clone());
        for s in 9..11u64 {
            let what = format!("{name}, restored, step {s}");
            let grads = optim_grads(s);
            let rg = g.step(&refs(&grads), &mut f32_muts(&mut gp)).unwrap();
            let rf = fresh.step(&refs(&grads), &mut f32_muts(&mut fp)).unwrap();
            let rfg = fresh_gpu
                .step(&refs(&grads), &mut f32_muts(&mut fgp))
                .unwrap();
            assert_report(&rg, &rf, &what);
            assert_report(&rfg, &rf, &format!("{what}: restored GPU"));
            assert_eq!(rg.step, s, "{what}");
            assert_params(&gp, &fp, &what);
            assert_params(&fgp, &fp, &format!("{what}: restored GPU"));
        }
    }
}

/// `Clipper<Optimize>` on the GPU: parameters (or gradients) of the wrong length are
/// `ClipError::ShapeMismatch`, before the first step and after it, and leave the
/// parameters, `steps_taken()` and the optimizer state as they were; the next good step
/// equals the CPU's.
#[test]
fn optimize_on_the_gpu_rejects_wrong_lengths_and_changes_nothing() {
    let gpu = gpu();
    let infos = optim_infos();
    let opt: Optimizer = Adam::adamw(1e-2).into();
    let backend = Backend::Gpu(gpu.clone());
    let mut g = Clipper::with_optimizer(backend, optim_chain(), &infos, opt).unwrap();
    let mut c = CpuClipper::with_optimizer(optim_chain(), &infos, opt).unwrap();
    let (mut gp, mut cp) = (optim_params(), optim_params());
    for s in 0..3u64 {
        let grads = optim_grads(s);
        let state = g.state().unwrap();
        // Parameters one element short, then one too many, in either tensor.
        for (t, delta) in [(0usize, -1i64), (1, 1)] {
            let what = format!("step {s}, params {t} {delta:+}");
            let mut bad = gp.clone();
            match delta {
                -1 => {
                    bad[t].pop();
                }
                _ => bad[t].push(0.5),
            }
            let before = bad.clone();
            let e = g.step(&refs(&grads), &mut f32_muts(&mut bad)).unwrap_err();
            assert!(matches!(e, ClipError::ShapeMismatch { .. }), "{what}: {e}");
            assert_eq!(bad, before, "{what}: params untouched");
            let mut gg = grads.clone();
            let e = g
                .step_in_place(&mut muts(&mut gg), &mut f32_muts(&mut bad))
                .unwrap_err();
            assert!(matches!(e, ClipError::ShapeMismatch { .. }), "{what}: {e}");
            assert_eq!(bad, before, "{what}: params untouched (in place)");
            assert_eq!(gg, grads, "{what}: gradients untouched (in place)");
            assert_eq!(g.steps_taken(), s, "{what}: steps taken");
        }
        // Gradients one element short.
        let mut short = grads.clone();
        if let Host::BF16(v) = &mut short[1] {
            v.pop();
        }
        let keep = gp.clone();
        let e = g.step(&refs(&short), &mut f32_muts(&mut gp)).unwrap_err();
        assert!(
            matches!(e, ClipError::ShapeMismatch { .. }),
            "step {s}: {e}"
        );
        assert_eq!(gp, keep, "step {s}: params untouched by short gradients");
        assert_eq!(g.steps_taken(), s, "step {s}: steps taken");
        assert_eq!(
            g.state().unwrap(),
            state,
            "step {s}: optimizer state untouched"
        );

        // The good step equals the CPU's.
        let rg = g.step(&refs(&grads), &mut f32_muts(&mut gp)).unwrap();
        let rc = c.step(&refs(&grads), &mut f32_muts(&mut cp)).unwrap();
        assert_report(&rg, &rc, &format!("good step {s}"));
        assert_params(&gp, &cp, &format!("good step {s}"));
        assert_eq!(g.state().unwrap().steps, s as u32 + 1);
    }
}

// ---------------------------------------------------------------------------------------
// Sharded
// ---------------------------------------------------------------------------------------

fn shard_infos() -> Vec<TensorInfo> {
    vec![
        TensorInfo::new("w", &[7, 13]),
        TensorInfo::new("b", &[13]),
        TensorInfo::new("e", &[257]),
        TensorInfo::new("s", &[1]),
    ]
}

/// The whole tensors at step `s`, growing with the step.
fn shard_grads(s: u64) -> Vec<Vec<f32>> {
    (shard_infos().iter().enumerate())
        .map(|(t, info)| {
            let scale = (0.05 + 0.05 * t as f32) * (1.0 + 0.5 * s as f32);
            values(900 + 10 * s + t as u64, info.len() as usize, scale)
        })
        .collect()
}

/// Which shard each rank holds.
type ShardOf = dyn Fn(usize) -> Shard + Sync;

/// What one rank saw: its reports, its clipped shards per step, its state at the end.
type RankRun = (Vec<ClipReport>, Vec<Vec<Vec<f32>>>, PolicyState, Shard);

/// Runs `steps` steps of `policy` on two thread ranks, each a `Clipper::sharded` on the
/// GPU holding `shard(rank)`.
fn run_sharded(
    ctx: &GpuContext,
    policy: &ClipPolicy,
    shard: impl Fn(usize) -> Shard + Sync,
    steps: u64,
) -> Vec<RankRun> {
    let infos = shard_infos();
    let turns = Mutex::new(());
    let group = ThreadCollective::group_with_timeout(2, Duration::from_secs(120));
    std::thread::scope(|scope| {
        let handles: Vec<_> = (group.into_iter())
            .map(|comm| {
                let (infos, turns, shard) = (&infos, &turns, &shard);
                scope.spawn(move || {
                    let rank = comm.rank();
                    let comm = Turns::new(&comm, Some(turns));
                    let mine = shard(rank);
                    let backend = Backend::Gpu(ctx.clone());
                    let mut clipper =
                        Clipper::sharded(backend, policy.clone(), infos, mine.clone(), comm)
                            .expect("sharded clipper");
                    let (mut reports, mut parts_per_step) = (Vec::new(), Vec::new());
                    for s in 0..steps {
                        let mut parts: Vec<Vec<f32>> = (shard_grads(s).iter().enumerate())
                            .map(|(t, v)| {
                                let r = mine.range(t);
                                v[r.start as usize..r.end as usize].to_vec()
                            })
                            .collect();
                        let mut hosts: Vec<Host> = parts.drain(..).map(Host::F32).collect();
                        let r = clipper
                            .step(&mut muts(&mut hosts), None)
                            .expect("sharded step");
                        reports.push(r);
                        parts_per_step.push(
                            hosts
                                .into_iter()
                                .map(|h| match h {
                                    Host::F32(v) => v,
                                    _ => unreachable!(),
                                })
                                .collect(),
                        );
                    }
                    assert_eq!(clipper.steps_taken(), steps, "rank {rank}: steps");
                    let state = clipper.state().expect("state");
                    (reports, parts_per_step, state, mine)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("rank panicked"))
            .collect()
    })
}

/// Two thread ranks, each a `Clipper::sharded` on the GPU, clip as one process: the
/// shards joined equal `CpuClipper::new` on the whole tensors (1e-5), and the reports'
/// norms and decisions and the final state are the single process's, for AutoClip and
/// ZClip chains (state) before a global norm, over even and hand-cut shards.
#[test]
fn sharded_on_the_gpu_equals_one_cpu_process() {
    let gpu = gpu();
    let infos = shard_infos();
    let even = |rank: usize| Shard::even(&shard_infos(), rank, 2).unwrap();
    // Every tensor cut mid-way, one rank holding nothing of the last.
    let cut = |rank: usize| {
        let ranges = match rank {
            0 => vec![0..40, 0..6, 0..200, 0..0],
            _ => vec![40..91, 6..13, 200..257, 0..1],
        };
        Shard::new(&shard_infos(), ranges).unwrap()
    };
    let cases: Vec<(&str, ClipPolicy, &ShardOf)> = vec![
        (
            "autoclip then global, even",
            ClipPolicy::new(Rule::AutoClip(AutoClip::new(50.0, 4))).then(Rule::GlobalNorm(0.5)),
            &even,
        ),
        (
            "zclip then global, cut",
            ClipPolicy::new(Rule::ZClip(ZClip {
                warmup: 2,
                ..ZClip::default()
            }))
            .then(Rule::GlobalNorm(0.5)),
            &cut,
        ),
    ];
    for (name, policy, shard) in cases {
        let ranks = run_sharded(&gpu, &policy, shard, 3);
        let mut single = CpuClipper::new(policy.clone(), &infos).unwrap();
        for s in 0..3usize {
            let what = format!("{name}, step {s}");
            let mut whole: Vec<Host> = shard_grads(s as u64).into_iter().map(Host::F32).collect();
            let want = single.step(&mut muts(&mut whole), None).unwrap();
            assert!(want.coef.unwrap() < 1.0, "{what}: the chain clips");
            let mut joined: Vec<Vec<f32>> = infos
                .iter()
                .map(|i| vec![f32::NAN; i.len() as usize])
                .collect();
            for (rank, (reports, parts, _, mine)) in ranks.iter().enumerate() {
                let got = &reports[s];
                assert_report(got, &want, &format!("{what}, rank {rank}"));
                assert_eq!(
                    got.total_norm.to_bits(),
                    ranks[0].0[s].total_norm.to_bits(),
                    "{what}: the same norm on every rank"
                );
                for (t, part) in parts[s].iter().enumerate() {
                    let r = mine.range(t);
                    joined[t][r.start as usize..r.end as usize].copy_from_slice(part);
                }
            }
            for (t, (got, want)) in joined.iter().zip(&whole).enumerate() {
                let Host::F32(want) = want else {
                    unreachable!()
                };
                assert_f32s(got, want, 1e-5, 0.0, &format!("{what}: tensor {t}"));
            }
        }
        for (rank, (_, _, state, _)) in ranks.iter().enumerate() {
            assert_states(state, single.state(), &format!("{name}: rank {rank} state"));
        }
    }
}

/// Bad input on one rank of a `Clipper<Sharded>` on the GPU, at its first step (when the
/// ranks check each other's plans) and at a later one (when they exchange norms): every
/// rank gets an error and none waits for the other; the good rank's gradients and the
/// step count stay as they were, and both ranks step on together afterwards.
#[test]
fn sharded_on_the_gpu_fails_every_rank_on_one_ranks_bad_input() {
    let ctx = gpu();
    let infos = shard_infos();
    let turns = Mutex::new(());
    let group = ThreadCollective::group_with_timeout(2, Duration::from_secs(60));
    std::thread::scope(|scope| {
        let handles: Vec<_> = (group.into_iter())
            .map(|comm| {
                let (infos, turns, ctx) = (&infos, &turns, &ctx);
                scope.spawn(move || {
                    let rank = comm.rank();
                    let comm = Turns::new(&comm, Some(turns));
                    let shard = Shard::even(infos, rank, 2).unwrap();
                    let backend = Backend::Gpu((*ctx).clone());
                    let policy = ClipPolicy::global_norm(0.5);
                    let mut clipper =
                        Clipper::sharded(backend, policy, infos, shard.clone(), comm).unwrap();
                    let parts = |s: u64| -> Vec<Host> {
                        (shard_grads(s).iter().enumerate())
                            .map(|(t, v)| {
                                let r = shard.range(t);
                                Host::F32(v[r.start as usize..r.end as usize].to_vec())
                            })
                            .collect()
                    };
                    for s in 0..2 {
                        // Rank 1 passes one element too many at steps 0 and 1.
                        let mut hosts = parts(s);
                        if rank == 1 {
                            let Host::F32(v) = &mut hosts[0] else {
                                unreachable!()
                            };
                            v.push(1.0);
                        }
                        let before = hosts.clone();
                        let e = clipper.step(&mut muts(&mut hosts), None).unwrap_err();
                        assert!(
                            matches!(
                                e,
                                ClipError::ShapeMismatch { .. } | ClipError::Collective(_)
                            ),
                            "rank {rank}, step {s}: {e}"
                        );
                        assert_eq!(hosts, before, "rank {rank}: gradients unchanged");
                        assert_eq!(clipper.steps_taken(), s, "rank {rank}: step count");
                        // Then a good step together.
                        let mut hosts = parts(s);
                        clipper.step(&mut muts(&mut hosts), None).unwrap();
                        assert_eq!(clipper.steps_taken(), s + 1);
                    }
                })
            })
            .collect();
        for h in handles {
            h.join().expect("a rank");
        }
    });
}

/// Per-example clipping resumes: a runner set to step 5 (before its first step, and after
/// steps) adds the noise of step 5, on the GPU (your buffers and host slices) as on the CPU.
#[test]
fn per_example_resumes_its_noise_at_a_set_step() {
    let gpu = gpu();
    let infos = per_example_infos();
    let clip = PerExampleClip::new(BATCH, 1.0).noise(0.2, 11);
    let inputs = per_example_inputs(5);
    let run = |r: &mut dyn FnMut(&mut [&mut [f32]]) -> ClipReport| {
        let mut out: Vec<Vec<f32>> = PER.iter().map(|&p| vec![f32::NAN; p]).collect();
        let report = r(&mut f32_muts(&mut out));
        (out, report)
    };
    // The oracle: a CPU runner that took steps 0 to 4.
    let mut oracle = CpuClipper::per_example(clip.clone(), &infos).unwrap();
    for s in 0..5 {
        let mut out: Vec<Vec<f32>> = PER.iter().map(|&p| vec![0.0; p]).collect();
        oracle
            .step(&refs(&per_example_inputs(s)), &mut f32_muts(&mut out))
            .unwrap();
    }
    let (want, want_r) = run(&mut |o| oracle.step(&refs(&inputs), o).unwrap());
    // Host slices on the GPU, set before the first step and after one.
    for steps_first in [0, 1] {
        let backend = Backend::Gpu(gpu.clone());
        let mut g = Clipper::per_example(backend, clip.clone(), &infos).unwrap();
        for s in 0..steps_first {
            let mut out: Vec<Vec<f32>> = PER.iter().map(|&p| vec![0.0; p]).collect();
            g.step(&refs(&per_example_inputs(s)), &mut f32_muts(&mut out))
                .unwrap();
        }
        g.set_steps_taken(5);
        assert_eq!(g.steps_taken(), 5);
        let (got, got_r) = run(&mut |o| g.step(&refs(&inputs), o).unwrap());
        assert_eq!((got_r.step, want_r.step), (5, 5));
        for t in 0..PER.len() {
            assert_f32s(
                &got[t],
                &want[t],
                1e-5,
                1e-6,
                &format!("resumed, output {t}"),
            );
        }
    }
    // A fresh CPU runner set to step 5 is the oracle itself.
    let mut c = CpuClipper::per_example(clip.clone(), &infos).unwrap();
    c.set_steps_taken(5);
    let (got, _) = run(&mut |o| c.step(&refs(&inputs), o).unwrap());
    assert_eq!(got, want);
}

/// Ranks of a `Clipper<Sharded>` on the GPU whose inputs differ in one thing each (the
/// chain's numbers, its norm order, its non-finite policy, a custom schedule's factors,
/// the tensors, a shard claimed twice, a state a step ahead): at the first step every rank
/// gets an error, none waits for the other, and no gradient changes; with nothing
/// different, the same setup steps.
#[test]
fn sharded_on_the_gpu_fails_every_rank_whose_inputs_differ() {
    let ctx = gpu();
    let infos = shard_infos();
    let renamed = {
        let mut v = shard_infos();
        v[1] = TensorInfo::new("bias", &[13]);
        v
    };
    let base = || ClipPolicy::global_norm(0.5);
    let ahead = {
        let mut cpu = CpuClipper::new(base(), &infos).unwrap();
        let mut full: Vec<Host> = shard_grads(0).into_iter().map(Host::F32).collect();
        cpu.step(&mut muts(&mut full), None).unwrap();
        cpu.state().clone()
    };
    // The chains of ranks 0 and 1, rank 1's tensors, whether rank 1 claims every tensor
    // whole, and whether it restores a state a step ahead.
    type Variant = (
        &'static str,
        ClipPolicy,
        ClipPolicy,
        Vec<TensorInfo>,
        bool,
        bool,
    );
    let warmup = |base_factor: f64| {
        base().schedule(Schedule::custom("warmup", move |s| base_factor + s as f64))
    };
    let variants: Vec<Variant> = vec![
        // The control: nothing differs, and the step runs.
        ("nothing", base(), base(), infos.clone(), false, false),
        (
            "max norm",
            base(),
            ClipPolicy::global_norm(0.6),
            infos.clone(),
            false,
            false,
        ),
        (
            "norm order",
            base(),
            base().norm(Norm::L1),
            infos.clone(),
            false,
            false,
        ),
        (
            "non-finite policy",
            base(),
            base().non_finite(NonFinitePolicy::SkipStep),
            infos.clone(),
            false,
            false,
        ),
        (
            "schedule factors",
            warmup(1.0),
            warmup(0.5),
            infos.clone(),
            false,
            false,
        ),
        ("tensor names", base(), base(), renamed, false, false),
        (
            "shard claimed twice",
            base(),
            base(),
            infos.clone(),
            true,
            false,
        ),
        (
            "state a step ahead",
            base(),
            base(),
            infos.clone(),
            false,
            true,
        ),
    ];
    for (what, first, other, other_infos, whole, stepped) in variants {
        let turns = Mutex::new(());
        let group = ThreadCollective::group_with_timeout(2, Duration::from_secs(60));
        std::thread::scope(|scope| {
            let handles: Vec<_> = (group.into_iter())
                .map(|comm| {
                    let (turns, ctx, infos) = (&turns, &ctx, &infos);
                    let (first, other, other_infos, ahead) = (&first, &other, &other_infos, &ahead);
                    scope.spawn(move || {
                        let rank = comm.rank();
                        let comm = Turns::new(&comm, Some(turns));
                        let mine = if rank == 1 && whole {
                            Shard::whole_tensors(infos, |_, _| true)
                        } else {
                            Shard::even(infos, rank, 2).unwrap()
                        };
                        let (policy, tensors) = match rank {
                            1 => (other.clone(), other_infos.as_slice()),
                            _ => (first.clone(), infos.as_slice()),
                        };
                        let backend = Backend::Gpu((*ctx).clone());
                        let mut clipper =
                            Clipper::sharded(backend, policy, tensors, mine.clone(), comm).unwrap();
                        if rank == 1 && stepped {
                            clipper.set_state(ahead).unwrap();
                        }
                        let mut hosts: Vec<Host> = (shard_grads(0).iter().enumerate())
                            .map(|(t, v)| {
                                let r = mine.range(t);
                                Host::F32(v[r.start as usize..r.end as usize].to_vec())
                            })
                            .collect();
                        let before = hosts.clone();
                        let outcome = clipper.step(&mut muts(&mut hosts), None);
                        if what == "nothing" {
                            assert!(outcome.is_ok(), "rank {rank}: {outcome:?}");
                            return;
                        }
                        let e = outcome.unwrap_err();
                        assert!(
                            matches!(e, ClipError::Collective(_)),
                            "{what}, rank {rank}: {e}"
                        );
                        assert_eq!(hosts, before, "{what}, rank {rank}: gradients unchanged");
                    })
                })
                .collect();
            for h in handles {
                h.join().expect("a rank");
            }
        });
    }
}
