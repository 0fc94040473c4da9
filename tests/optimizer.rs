//! Fused optimizer steps: the CPU twin against torch.optim's known answers
//! (REFERENCE.md "Optimizer steps"), the GPU against the CPU twin after every kind of
//! chain, held steps, state round trips, bad input, and deferred scaling in a caller's
//! own shader.

mod common;

use common::{download, gpu, gpu_tensors, host, refs, upload, Host};
use gradclip::{
    Adam, Agc, ClipError, ClipPolicy, ClipReport, CpuClipper, DType, GaussianNoise, GpuClipper,
    GpuContext, GpuTensor, GradRef, LossScale, NonFinitePolicy, Optimizer, OptimizerState,
    PerTensorClip, Rule, Sgd, TensorInfo, UnitAxis, ValueClip,
};

/// Distance in f32 ulps (NaN to NaN: 0).
fn ulps(a: f32, b: f32) -> u32 {
    if a.is_nan() && b.is_nan() {
        return 0;
    }
    let key = |x: f32| {
        let b = x.to_bits() as i64;
        if b < 0x8000_0000 {
            b
        } else {
            0x8000_0000 - b
        }
    };
    (key(a) - key(b)).unsigned_abs().min(u32::MAX as u64) as u32
}

const START: [f32; 4] = [1.0, -2.0, 3.0, 0.5];
const GRADS: [[f32; 4]; 3] = [
    [0.1, -0.2, 0.3, 0.0],
    [1.0, 0.5, -0.25, 2.0],
    [-0.3, 0.0, 0.7, -1.0],
];

/// REFERENCE.md: torch.optim 2.15, the parameters after each of three steps.
// The values as torch printed them, digit for digit.
#[allow(clippy::excessive_precision)]
fn known_answers() -> Vec<(&'static str, Optimizer, [[f32; 4]; 3])> {
    vec![
        (
            "SGD(lr=0.1)",
            Sgd::new(0.1).into(),
            [
                [0.99000001, -1.98000002, 2.97000003, 0.5],
                [0.889999986, -2.02999997, 2.99500012, 0.300000012],
                [0.920000017, -2.02999997, 2.92500019, 0.400000006],
            ],
        ),
        (
            "SGD(lr=0.1, momentum=0.9, weight_decay=0.01)",
            Sgd::new(0.1).momentum(0.9).weight_decay(0.01).into(),
            [
                [0.989000022, -1.97800004, 2.96700001, 0.499500006],
                [0.878111005, -2.00622201, 2.95933294, 0.298550487],
                [0.80743283, -2.02961564, 2.87947321, 0.217397392],
            ],
        ),
        (
            "SGD(lr=0.1, momentum=0.9, nesterov=True)",
            Sgd::new(0.1).momentum(0.9).nesterov().into(),
            [
                [0.981000006, -1.96200001, 2.94300008, 0.5],
                [0.782900035, -2.04080009, 2.96620011, 0.119999997],
                [0.751610041, -2.06672001, 2.83158016, 0.148000002],
            ],
        ),
        (
            "Adam(lr=0.01)",
            Adam::new(0.01).into(),
            [
                [0.99000001, -1.99000001, 2.99000001, 0.5],
                [0.981929123, -1.9944222, 2.98961878, 0.492558628],
                [0.977779329, -1.99784052, 2.98389554, 0.490272224],
            ],
        ),
        (
            "Adam(lr=0.01, weight_decay=0.1)",
            Adam::new(0.01).weight_decay(0.1).into(),
            [
                [0.99000001, -1.99000001, 2.99000001, 0.49000001],
                [0.981479645, -1.98912275, 2.98271561, 0.482397467],
                [0.976134956, -1.98613203, 2.97433805, 0.479759395],
            ],
        ),
        (
            "AdamW(lr=0.01, weight_decay=0.1)",
            Adam::adamw(0.01).weight_decay(0.1).into(),
            [
                [0.989000022, -1.98800004, 2.98699999, 0.499500006],
                [0.979940176, -1.99043429, 2.98363185, 0.491559148],
                [0.974810481, -1.99186218, 2.97492504, 0.488781184],
            ],
        ),
        (
            "AdamW(lr=0.01, betas=(0.9, 0.95), weight_decay=0.1, amsgrad=True)",
            Adam::adamw(0.01)
                .betas(0.9, 0.95)
                .weight_decay(0.1)
                .amsgrad()
                .into(),
            [
                [0.989000022, -1.98800004, 2.98699999, 0.499500006],
                [0.980037808, -1.99039459, 2.9836309, 0.491650909],
                [0.974914014, -1.99174881, 2.9750123, 0.488883585],
            ],
        ),
    ]
}

/// A clip that never clips (the known answers are torch.optim's alone).
fn no_clip() -> ClipPolicy {
    ClipPolicy::new(Rule::GlobalNorm(1e30))
}

fn infos(lens: &[usize]) -> Vec<TensorInfo> {
    (lens.iter().enumerate())
        .map(|(i, &n)| TensorInfo::new(format!("t{i}"), &[n as u64]))
        .collect()
}

/// The four known-answer elements as tensors of lengths 1 and 3.
fn split(v: &[f32; 4]) -> Vec<Vec<f32>> {
    vec![v[..1].to_vec(), v[1..].to_vec()]
}

fn flat(h: &[Host]) -> Vec<f32> {
    h.iter()
        .flat_map(|t| t.to_f64().into_iter().map(|x| x as f32))
        .collect()
}

/// The worst distance in ulps between the parameters and a known answer.
fn worst(got: &[f32], want: &[f32; 4]) -> u32 {
    got.iter()
        .zip(want)
        .map(|(&a, &b)| ulps(a, b))
        .max()
        .unwrap()
}

#[test]
fn cpu_twin_matches_torch_optim() {
    for (name, opt, want) in known_answers() {
        let mut cpu = CpuClipper::with_optimizer(no_clip(), &infos(&[1, 3]), opt).unwrap();
        let mut params = split(&START);
        for (g, want) in GRADS.iter().zip(&want) {
            let grads = split(g);
            let grads: Vec<GradRef<'_>> = grads.iter().map(|g| GradRef::F32(g)).collect();
            let mut p: Vec<&mut [f32]> = params.iter_mut().map(|p| &mut p[..]).collect();
            cpu.step(&grads, &mut p).unwrap();
            let got: Vec<f32> = params.concat();
            assert!(worst(&got, want) <= 4, "{name}: {got:?} vs {want:?}");
        }
        assert_eq!(cpu.state().steps, 3);
    }
}

#[test]
fn gpu_matches_torch_optim() {
    let ctx = gpu();
    for (name, opt, want) in known_answers() {
        let params = split(&START).into_iter().map(Host::F32).collect::<Vec<_>>();
        let grads0 = split(&GRADS[0])
            .into_iter()
            .map(Host::F32)
            .collect::<Vec<_>>();
        let p_arena = upload(&ctx, &params);
        let g_arena = upload(&ctx, &grads0);
        let info = infos(&[1, 3]);
        let gt = gpu_tensors(&g_arena, &grads0, &info);
        let pt = gpu_tensors(&p_arena, &params, &info);
        let mut opt = GpuClipper::with_optimizer(&ctx, &gt, &pt, no_clip(), opt).unwrap();
        for (g, want) in GRADS.iter().zip(&want) {
            let grads: Vec<Host> = split(g).into_iter().map(Host::F32).collect();
            common::write(&ctx, &g_arena, &grads);
            opt.step().unwrap().wait().unwrap();
            let got = flat(&download(&ctx, &p_arena, &params));
            assert!(worst(&got, want) <= 8, "{name}: {got:?} vs {want:?}");
            // The gradients are read, never written.
            assert_eq!(download(&ctx, &g_arena, &grads), grads);
        }
        assert_eq!(opt.state().unwrap().steps, 3);
    }
}

/// A deterministic stream of values of mixed magnitudes.
fn values(seed: u64, n: usize, scale: f32) -> Vec<f32> {
    let mut s = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * scale
        })
        .collect()
}

/// Tensors of awkward lengths and every dtype; shapes for AGC.
fn shapes() -> Vec<Vec<u64>> {
    vec![
        vec![1],
        vec![7, 3],
        vec![0],
        vec![257],
        vec![5, 13],
        vec![3, 2, 2, 2],
        vec![70_001],
    ]
}

struct Case {
    infos: Vec<TensorInfo>,
    params: Vec<Host>,
}

fn case() -> Case {
    let infos: Vec<TensorInfo> = (shapes().iter().enumerate())
        .map(|(i, s)| TensorInfo::new(format!("t{i}"), s))
        .collect();
    let params = (infos.iter().enumerate())
        .map(|(i, t)| Host::F32(values(100 + i as u64, t.len() as usize, 2.0)))
        .collect();
    Case { infos, params }
}

fn grads_of(case: &Case, step: u64) -> Vec<Host> {
    (case.infos.iter().enumerate())
        .map(|(i, t)| {
            let v = values(step * 1000 + i as u64, t.len() as usize, 3.0);
            host(i as u8, v)
        })
        .collect()
}

/// Runs `steps` steps on both backends (fused on the GPU, or the in-place clip then the
/// update) and compares the parameters and the state.
fn compare(policy: ClipPolicy, opt: Optimizer, in_place: bool, steps: u64) {
    let case = case();
    compare_on(
        &case,
        &|step| grads_of(&case, step),
        policy,
        opt,
        in_place,
        steps,
    );
}

/// [`compare`] on the tensors of `case` with the gradients `grads_of(step)`.
fn compare_on(
    case: &Case,
    grads_of: &dyn Fn(u64) -> Vec<Host>,
    policy: ClipPolicy,
    opt: Optimizer,
    in_place: bool,
    steps: u64,
) {
    let ctx = gpu();
    let grads0 = grads_of(0);
    let g_arena = upload(&ctx, &grads0);
    let p_arena = upload(&ctx, &case.params);
    let gt = gpu_tensors(&g_arena, &grads0, &case.infos);
    let pt = gpu_tensors(&p_arena, &case.params, &case.infos);
    let mut gpu_opt = GpuClipper::with_optimizer(&ctx, &gt, &pt, policy.clone(), opt).unwrap();
    let mut cpu_opt = CpuClipper::with_optimizer(policy, &case.infos, opt).unwrap();
    let mut params: Vec<Vec<f32>> = (case.params.iter())
        .map(|p| p.to_f64().into_iter().map(|x| x as f32).collect())
        .collect();
    for step in 0..steps {
        let grads = grads_of(step);
        common::write(&ctx, &g_arena, &grads);
        let mut clipped = grads.clone();
        let gpu_report = if in_place {
            let mut enc = ctx.device().create_command_encoder(&Default::default());
            let pending = gpu_opt.encode_in_place(&mut enc).unwrap();
            ctx.queue().submit([enc.finish()]);
            pending.wait().unwrap()
        } else {
            gpu_opt.step().unwrap().wait().unwrap()
        };
        let mut p: Vec<&mut [f32]> = params.iter_mut().map(|p| &mut p[..]).collect();
        let cpu_report = if in_place {
            // The update reads the clipped gradients rounded to their dtype.
            cpu_opt
                .step_in_place(&mut common::muts(&mut clipped), &mut p)
                .unwrap()
        } else {
            cpu_opt.step(&refs(&grads), &mut p).unwrap()
        };
        assert_eq!(gpu_report.stages.len(), cpu_report.stages.len());
        let got = download(&ctx, &p_arena, &case.params);
        for (t, (g, c)) in got.iter().zip(&params).enumerate() {
            for (i, (&a, &b)) in g.to_f64().iter().zip(c).enumerate() {
                let a = a as f32;
                assert!(
                    ulps(a, b) <= 64 || (a - b).abs() <= 1e-6,
                    "step {step}, tensor {t}[{i}]: gpu {a} cpu {b}"
                );
            }
        }
        let on_gpu = download(&ctx, &g_arena, &grads);
        if in_place {
            // The gradients hold the clipped values, as the in-place CPU step leaves them.
            for (a, b) in flat(&on_gpu).iter().zip(flat(&clipped)) {
                assert!(ulps(*a, b) <= 2 || (a - b).abs() < 1e-6, "{a} vs {b}");
            }
        } else {
            assert_eq!(on_gpu, grads, "a fused step never writes the gradients");
        }
    }
    let (gs, cs) = (gpu_opt.state().unwrap(), cpu_opt.state().clone());
    assert_eq!(gs.steps, cs.steps);
    for (ga, ca) in gs.arrays.iter().zip(&cs.arrays) {
        for (g, c) in ga.iter().flatten().zip(ca.iter().flatten()) {
            assert!(
                ulps(*g, *c) <= 64 || (g - c).abs() <= 1e-6,
                "state {g} vs {c}"
            );
        }
    }
}

fn optimizers() -> Vec<Optimizer> {
    vec![
        Sgd::new(0.05).into(),
        Sgd::new(0.05)
            .momentum(0.9)
            .nesterov()
            .weight_decay(0.01)
            .into(),
        Sgd::new(0.05).momentum(0.8).dampening(0.3).into(),
        Adam::new(1e-2).weight_decay(0.05).into(),
        Adam::adamw(1e-2).betas(0.8, 0.95).amsgrad().into(),
    ]
}

#[test]
fn gpu_matches_cpu_after_a_global_clip() {
    for opt in optimizers() {
        compare(ClipPolicy::new(Rule::GlobalNorm(0.5)), opt, false, 3);
    }
}

#[test]
fn gpu_matches_cpu_after_chains() {
    let agc = || Rule::Agc(Agc::new(0.05).axis(UnitAxis::First));
    let agc_last = || Rule::Agc(Agc::new(0.05).axis(UnitAxis::Last));
    let policies = [
        ClipPolicy::new(agc()).then(Rule::GlobalNorm(1.0)),
        ClipPolicy::new(agc_last()),
        ClipPolicy::new(Rule::PerTensor(PerTensorClip { max_norm: 0.3 })),
        ClipPolicy::new(Rule::GlobalNorm(0.5))
            .noise(GaussianNoise {
                sigma: 0.01,
                seed: 7,
            })
            .value(ValueClip {
                lo: -0.02,
                hi: 0.02,
            }),
    ];
    let opt: Optimizer = Adam::adamw(1e-2).into();
    for policy in policies {
        compare(policy.clone(), opt, false, 2);
        compare(policy, Sgd::new(0.1).momentum(0.9).into(), true, 2);
    }
}

#[test]
fn held_steps_change_nothing_and_are_not_counted() {
    let ctx = gpu();
    let info = infos(&[3, 5]);
    let params = vec![Host::F32(vec![1.0, 2.0, 3.0]), Host::F32(values(3, 5, 1.0))];
    let good = vec![Host::F32(vec![0.1, 0.2, 0.3]), Host::F32(values(4, 5, 1.0))];
    let mut bad = good.clone();
    if let Host::F32(v) = &mut bad[1] {
        v[2] = f32::NAN;
    }
    let g_arena = upload(&ctx, &good);
    let p_arena = upload(&ctx, &params);
    let gt = gpu_tensors(&g_arena, &good, &info);
    let pt = gpu_tensors(&p_arena, &params, &info);
    let opt: Optimizer = Adam::new(0.1).into();
    // The NaN is in t1: measured by the global norm, or in a tensor the only stage leaves
    // alone (masked away), which holds the step all the same.
    for rule in [Rule::GlobalNorm(1.0), Rule::GlobalNorm(1.0).except(["t1"])] {
        let policy = ClipPolicy::new(rule).non_finite(NonFinitePolicy::SkipStep);
        common::write(&ctx, &p_arena, &params);
        held_steps_of(&ctx, policy, opt, (&g_arena, &p_arena), (&gt, &pt), &info);
    }

    // Under `Error` the held step is an error on both backends, and changes nothing.
    let policy = ClipPolicy::new(Rule::GlobalNorm(1.0)).non_finite(NonFinitePolicy::Error);
    let mut gpu_opt = GpuClipper::with_optimizer(&ctx, &gt, &pt, policy.clone(), opt).unwrap();
    let mut cpu_opt = CpuClipper::with_optimizer(policy, &info, opt).unwrap();
    common::write(&ctx, &g_arena, &bad);
    let before = download(&ctx, &p_arena, &params);
    let e = gpu_opt.step().unwrap().wait().unwrap_err();
    assert!(matches!(e, ClipError::NonFiniteNorm(_)), "{e}");
    assert_eq!(download(&ctx, &p_arena, &params), before);
    assert_eq!(gpu_opt.state().unwrap().steps, 0);
    let mut host_params: Vec<Vec<f32>> = vec![vec![1.0, 2.0, 3.0], values(3, 5, 1.0)];
    let mut p: Vec<&mut [f32]> = host_params.iter_mut().map(|p| &mut p[..]).collect();
    let kept: Vec<Vec<f32>> = p.iter().map(|p| p.to_vec()).collect();
    let e = cpu_opt.step(&refs(&bad), &mut p).unwrap_err();
    assert!(matches!(e, ClipError::NonFiniteNorm(_)), "{e}");
    assert!(p.iter().zip(&kept).all(|(a, b)| a[..] == b[..]));
    assert_eq!(cpu_opt.state().steps, 0);
}

/// Three steps of the optimizer wrapper under `policy` (`SkipStep`), the second with a NaN
/// in t1, on both backends: the held step changes no parameter and no state and is not
/// counted; the reports agree.
fn held_steps_of(
    ctx: &GpuContext,
    policy: ClipPolicy,
    opt: Optimizer,
    (g_arena, p_arena): (&common::Arena, &common::Arena),
    (gt, pt): (&[GpuTensor<'_>], &[GpuTensor<'_>]),
    info: &[TensorInfo],
) {
    let params = vec![Host::F32(vec![1.0, 2.0, 3.0]), Host::F32(values(3, 5, 1.0))];
    let good = vec![Host::F32(vec![0.1, 0.2, 0.3]), Host::F32(values(4, 5, 1.0))];
    let mut bad = good.clone();
    if let Host::F32(v) = &mut bad[1] {
        v[2] = f32::NAN;
    }
    let mut gpu_opt = GpuClipper::with_optimizer(ctx, gt, pt, policy.clone(), opt).unwrap();
    let mut cpu_opt = CpuClipper::with_optimizer(policy, info, opt).unwrap();
    let mut host_params: Vec<Vec<f32>> = vec![vec![1.0, 2.0, 3.0], values(3, 5, 1.0)];
    for (k, grads) in [&good, &bad, &good].into_iter().enumerate() {
        common::write(ctx, g_arena, grads);
        let before = download(ctx, p_arena, &params);
        let state_before = gpu_opt.state().unwrap();
        let report = gpu_opt.step().unwrap().wait().unwrap();
        let mut p: Vec<&mut [f32]> = host_params.iter_mut().map(|p| &mut p[..]).collect();
        let cpu_report = cpu_opt.step(&refs(grads), &mut p).unwrap();
        assert_eq!(report.skipped, cpu_report.skipped);
        if k == 1 {
            assert!(report.skipped);
            assert_eq!(download(ctx, p_arena, &params), before);
            assert_eq!(gpu_opt.state().unwrap(), state_before);
        }
        let got = flat(&download(ctx, p_arena, &params));
        for (a, b) in got.iter().zip(host_params.concat()) {
            assert!(ulps(*a, b) <= 16, "step {k}: {a} vs {b}");
        }
    }
    assert_eq!(gpu_opt.state().unwrap().steps, 2);
    assert_eq!(cpu_opt.state().steps, 2);
}

#[test]
fn state_moves_between_backends() {
    let ctx = gpu();
    let case = case();
    let grads = grads_of(&case, 1);
    let g_arena = upload(&ctx, &grads);
    let p_arena = upload(&ctx, &case.params);
    let gt = gpu_tensors(&g_arena, &grads, &case.infos);
    let pt = gpu_tensors(&p_arena, &case.params, &case.infos);
    let opt: Optimizer = Adam::adamw(1e-3).amsgrad().into();
    let policy = ClipPolicy::new(Rule::GlobalNorm(1.0));
    let mut gpu_opt = GpuClipper::with_optimizer(&ctx, &gt, &pt, policy.clone(), opt).unwrap();
    let mut cpu_opt = CpuClipper::with_optimizer(policy, &case.infos, opt).unwrap();
    let mut params: Vec<Vec<f32>> = (case.params.iter())
        .map(|p| p.to_f64().into_iter().map(|x| x as f32).collect())
        .collect();
    let mut p: Vec<&mut [f32]> = params.iter_mut().map(|p| &mut p[..]).collect();
    cpu_opt.step(&refs(&grads), &mut p).unwrap();
    cpu_opt.step(&refs(&grads), &mut p).unwrap();
    gpu_opt.set_state(cpu_opt.state()).unwrap();
    assert_eq!(&gpu_opt.state().unwrap(), cpu_opt.state());
    // Both go on from the moved state (and the same parameters) to the same place.
    drop(p);
    let moved: Vec<Host> = params.iter().map(|p| Host::F32(p.clone())).collect();
    common::write(&ctx, &p_arena, &moved);
    gpu_opt.set_clip_state(cpu_opt.clip_state()).unwrap();
    gpu_opt.step().unwrap().wait().unwrap();
    let mut p: Vec<&mut [f32]> = params.iter_mut().map(|p| &mut p[..]).collect();
    cpu_opt.step(&refs(&grads), &mut p).unwrap();
    drop(p);
    let got = flat(&download(&ctx, &p_arena, &case.params));
    for (a, b) in got.iter().zip(params.concat()) {
        assert!(ulps(*a, b) <= 64 || (a - b).abs() <= 1e-6, "{a} vs {b}");
    }
    assert_eq!(gpu_opt.state().unwrap().steps, 3);
    // A state for other tensors does not fit.
    let other =
        CpuClipper::with_optimizer(ClipPolicy::new(Rule::GlobalNorm(1.0)), &infos(&[3]), opt)
            .unwrap();
    assert!(gpu_opt.set_state(other.state()).is_err());
    assert!(cpu_opt.set_state(other.state()).is_err());
    // A state of another optimizer (each hyperparameter changed alone, the kind, AMSGrad
    // off) does not fit either; another learning rate does (schedules change it).
    let kept = cpu_opt.state().clone();
    let Optimizer::Adam(adam) = opt else {
        unreachable!("an Adam")
    };
    let others: [Optimizer; 6] = [
        Adam {
            betas: (0.8, 0.999),
            ..adam
        }
        .into(),
        Adam { eps: 1e-6, ..adam }.into(),
        Adam {
            weight_decay: 0.5,
            ..adam
        }
        .into(),
        Adam {
            decoupled: false,
            ..adam
        }
        .into(),
        Adam {
            amsgrad: false,
            ..adam
        }
        .into(),
        Sgd::new(1e-3).momentum(0.9).into(),
    ];
    for other in others {
        let foreign = OptimizerState {
            optimizer: other,
            ..kept.clone()
        };
        for e in [
            gpu_opt.set_state(&foreign).unwrap_err(),
            cpu_opt.set_state(&foreign).unwrap_err(),
        ] {
            assert!(
                matches!(&e, ClipError::InvalidState(m) if m.contains("optimizer")),
                "{e}"
            );
        }
    }
    let rescheduled = OptimizerState {
        optimizer: Adam { lr: 0.5, ..adam }.into(),
        ..kept.clone()
    };
    gpu_opt.set_state(&rescheduled).unwrap();
    cpu_opt.set_state(&rescheduled).unwrap();
    gpu_opt.set_state(&kept).unwrap();
    cpu_opt.set_state(&kept).unwrap();
    // Values out of their domain are refused on both backends, and change nothing.
    for (array, value) in [(1, -1e-3f32), (1, f32::NAN), (0, f32::INFINITY), (2, -0.5)] {
        let mut bad = kept.clone();
        bad.arrays[array][0][0] = value;
        for e in [
            gpu_opt.set_state(&bad).unwrap_err(),
            cpu_opt.set_state(&bad).unwrap_err(),
        ] {
            assert!(matches!(e, ClipError::InvalidState(_)), "{e}");
        }
    }
    assert_eq!(cpu_opt.state(), &kept);
    assert_eq!(gpu_opt.state().unwrap(), kept);
    // A step count at the top stays there: the bias correction never divides by zero.
    let top = OptimizerState {
        steps: u32::MAX - 1,
        ..kept
    };
    gpu_opt.set_state(&top).unwrap();
    cpu_opt.set_state(&top).unwrap();
    for _ in 0..2 {
        gpu_opt.step().unwrap().wait().unwrap();
        let mut p: Vec<&mut [f32]> = params.iter_mut().map(|p| &mut p[..]).collect();
        cpu_opt.step(&refs(&grads), &mut p).unwrap();
    }
    assert_eq!(cpu_opt.state().steps, u32::MAX);
    assert_eq!(gpu_opt.state().unwrap().steps, u32::MAX);
    let got = flat(&download(&ctx, &p_arena, &case.params));
    assert!(params.concat().iter().chain(&got).all(|x| x.is_finite()));
}

#[test]
fn bad_input_is_a_typed_error() {
    let ctx = gpu();
    let info = infos(&[4]);
    let grads = vec![Host::F32(vec![0.1; 4])];
    let g_arena = upload(&ctx, &grads);
    let gt = gpu_tensors(&g_arena, &grads, &info);
    let policy = ClipPolicy::new(Rule::GlobalNorm(1.0));
    // Parameters in the gradients' buffer.
    let e = GpuClipper::with_optimizer(&ctx, &gt, &gt, policy.clone(), Sgd::new(0.1)).unwrap_err();
    assert!(matches!(e, ClipError::SharedBuffer { .. }), "{e}");
    // 16-bit parameters.
    let half = vec![host(1, vec![1.0; 4])];
    let h_arena = upload(&ctx, &half);
    let ht = gpu_tensors(&h_arena, &half, &info);
    let e = GpuClipper::with_optimizer(&ctx, &gt, &ht, policy.clone(), Sgd::new(0.1)).unwrap_err();
    assert!(matches!(e, ClipError::NotF32 { .. }), "{e}");
    assert_eq!(download(&ctx, &h_arena, &half), half);
    assert_eq!(download(&ctx, &g_arena, &grads), grads);
    // Parameters misaligned, past the end of their buffer, or overlapping each other.
    let two = vec![Host::F32(vec![1.0; 8])];
    let two_arena = upload(&ctx, &two);
    let f32_at = |offset, len| GpuTensor::new(&two_arena.buffer, offset, len, DType::F32);
    let grads2 = vec![Host::F32(vec![0.1; 4]), Host::F32(vec![0.2; 4])];
    let g2_arena = upload(&ctx, &grads2);
    let g2 = gpu_tensors(&g2_arena, &grads2, &infos(&[4, 4]));
    for (bad, want) in [
        (vec![f32_at(2, 4), f32_at(16, 4)], "MisalignedOffset"),
        (vec![f32_at(0, 4), f32_at(20, 4)], "OutOfBounds"),
        (vec![f32_at(0, 4), f32_at(8, 4)], "OverlappingTensors"),
    ] {
        let e =
            GpuClipper::with_optimizer(&ctx, &g2, &bad, policy.clone(), Sgd::new(0.1)).unwrap_err();
        assert!(format!("{e:?}").starts_with(want), "{want}: {e:?}");
    }
    assert_eq!(download(&ctx, &two_arena, &two), two);
    // Parameters of another length.
    let short = vec![Host::F32(vec![1.0; 3])];
    let s_arena = upload(&ctx, &short);
    let st = gpu_tensors(&s_arena, &short, &infos(&[3]));
    let e = GpuClipper::with_optimizer(&ctx, &gt, &st, policy.clone(), Sgd::new(0.1)).unwrap_err();
    assert!(matches!(e, ClipError::ShapeMismatch { .. }), "{e}");
    // Bad hyperparameters, and a bad learning rate for later steps.
    let params = vec![Host::F32(vec![1.0; 4])];
    let p_arena = upload(&ctx, &params);
    let pt = gpu_tensors(&p_arena, &params, &info);
    for bad in [
        Optimizer::from(Sgd::new(f32::NAN)),
        Sgd::new(0.1).nesterov().into(),
        Adam::new(0.1).betas(0.9, 1.0).into(),
    ] {
        let e = GpuClipper::with_optimizer(&ctx, &gt, &pt, policy.clone(), bad).unwrap_err();
        assert!(matches!(e, ClipError::InvalidConfig(_)), "{e}");
        assert!(CpuClipper::with_optimizer(policy.clone(), &info, bad).is_err());
    }
    let mut opt =
        GpuClipper::with_optimizer(&ctx, &gt, &pt, policy.clone(), Sgd::new(0.1)).unwrap();
    assert!(opt.set_lr(-1.0).is_err());
    assert_eq!(opt.lr(), 0.1);
    // On the CPU: parameters of another length change nothing.
    let mut cpu = CpuClipper::with_optimizer(policy, &info, Sgd::new(0.1)).unwrap();
    let mut p = vec![1.0f32; 3];
    let e = cpu.step(&refs(&grads), &mut [&mut p[..]]).unwrap_err();
    assert!(matches!(e, ClipError::ShapeMismatch { .. }), "{e}");
    assert_eq!(p, vec![1.0; 3]);
    assert_eq!(cpu.state().steps, 0);
    assert_eq!(cpu.clip_state().steps_taken(), 0);
}

/// A caller's own SGD shader that applies a deferred clip as it reads the gradients.
const USER_SGD: &str = r#"
@group(0) @binding(0) var<storage, read> grads: array<f32>;
@group(0) @binding(1) var<storage, read_write> params: array<f32>;

@compute @workgroup_size(64)
fn main(@builtin(global_invocation_id) id: vec3<u32>) {
    let i = id.x;
    if (i >= arrayLength(&params) || gradclip_held()) {
        return;
    }
    // One tensor, one unit: unit 0.
    params[i] = params[i] - 0.1 * gradclip_scaled(grads[i], gradclip_unit(0u, 1u, 1u, i));
}
"#;

/// Runs one deferred step of `policy` over `grads` with `USER_SGD` applying its
/// coefficients (lr 0.1) to `params`, and checks it against the CPU twin's deferred step
/// applied by hand; returns the report, the CPU's step, and the parameters and gradients
/// after the GPU step.
fn user_sgd_step(
    ctx: &GpuContext,
    policy: ClipPolicy,
    grads: &[Host],
    params: &[Host],
) -> (ClipReport, gradclip::DeferredStep, Vec<f32>, Vec<f32>) {
    let info = infos(&[flat(grads).len()]);
    let g_arena = upload(ctx, grads);
    let p_arena = upload(ctx, params);
    let gt = gpu_tensors(&g_arena, grads, &info);
    let mut clip = GpuClipper::new(ctx, &gt, None, policy.clone()).unwrap();
    let deferred = clip.deferred();
    let source = format!("{}\n{USER_SGD}", deferred.wgsl(0, 2));
    let device = ctx.device();
    let module = device.create_shader_module(wgpu::ShaderModuleDescriptor {
        label: Some("user sgd"),
        source: wgpu::ShaderSource::Wgsl(source.into()),
    });
    let pipeline = device.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
        label: None,
        layout: None,
        module: &module,
        entry_point: Some("main"),
        compilation_options: Default::default(),
        cache: None,
    });
    let group = device.create_bind_group(&wgpu::BindGroupDescriptor {
        label: None,
        layout: &pipeline.get_bind_group_layout(0),
        entries: &[
            wgpu::BindGroupEntry {
                binding: 0,
                resource: g_arena.buffer.as_entire_binding(),
            },
            wgpu::BindGroupEntry {
                binding: 1,
                resource: p_arena.buffer.as_entire_binding(),
            },
            wgpu::BindGroupEntry {
                binding: 2,
                resource: deferred.coefficients(),
            },
            wgpu::BindGroupEntry {
                binding: 3,
                resource: deferred.report(),
            },
        ],
    });
    drop(deferred);
    let mut enc = device.create_command_encoder(&Default::default());
    let pending = clip.encode_deferred(&mut enc).unwrap();
    {
        let mut pass = enc.begin_compute_pass(&Default::default());
        pass.set_pipeline(&pipeline);
        pass.set_bind_group(0, &group, &[]);
        pass.dispatch_workgroups(2, 1, 1);
    }
    ctx.queue().submit([enc.finish()]);
    let report = pending.wait().unwrap();
    // The CPU twin: the same coefficients, applied by hand.
    let mut cpu = CpuClipper::new(policy, &info).unwrap();
    let step = cpu.step_deferred(&refs(grads), None).unwrap();
    let (g, p0) = (flat(grads), flat(params));
    let got = flat(&download(ctx, &p_arena, params));
    for i in 0..g.len() {
        let want = p0[i] - 0.1 * step.clipped(0, i as u32, g[i]).unwrap();
        assert!(ulps(got[i], want) <= 4, "{i}: {} vs {want}", got[i]);
    }
    let after = flat(&download(ctx, &g_arena, grads));
    (report, step, got, after)
}

#[test]
fn deferred_scaling_in_a_callers_shader() {
    let ctx = gpu();
    let mut g = values(9, 100, 4.0);
    g[17] = f32::NAN; // ZeroNans: the element steps by 0
    let grads = vec![Host::F32(g.clone())];
    let params = vec![Host::F32(values(10, 100, 1.0))];
    let policy = ClipPolicy::new(Rule::GlobalNorm(0.5)).non_finite(NonFinitePolicy::ZeroNans);
    let (report, step, got, after) = user_sgd_step(&ctx, policy, &grads, &params);
    assert_eq!(report.clipped_units, 1);
    assert_eq!(got[17], flat(&params)[17]);
    assert!(step.clipped(1, 0, 1.0).is_none() && step.clipped(0, 100, 1.0).is_none());
    // The gradients are not written (NaN compares by bits).
    assert!(after
        .iter()
        .zip(&g)
        .all(|(a, b)| a.to_bits() == b.to_bits()));
    // Noise or value clipping cannot be deferred.
    let (arena, info) = (upload(&ctx, &grads), infos(&[100]));
    let gt = gpu_tensors(&arena, &grads, &info);
    let noisy = ClipPolicy::new(Rule::GlobalNorm(0.5)).value(ValueClip { lo: -1.0, hi: 1.0 });
    let mut noisy = GpuClipper::new(&ctx, &gt, None, noisy).unwrap();
    let mut enc = ctx.device().create_command_encoder(&Default::default());
    assert!(matches!(
        noisy.encode_deferred(&mut enc),
        Err(ClipError::InvalidConfig(_))
    ));
}

/// A loss-scaled chain's deferred coefficients include the unscaling: the caller's pass
/// applies the clip of the gradients divided by the scale.
#[test]
fn deferred_coefficients_of_a_loss_scaled_chain_unscale() {
    let ctx = gpu();
    let g = values(9, 100, 4.0);
    let grads = vec![Host::F32(g.iter().map(|x| x * 1024.0).collect())];
    let params = vec![Host::F32(values(10, 100, 1.0))];
    let policy = ClipPolicy::new(Rule::GlobalNorm(0.5)).loss_scale(LossScale::fixed(1024.0));
    let (report, step, got, _) = user_sgd_step(&ctx, policy, &grads, &params);
    assert_eq!(report.clipped_units, 1);
    let coef = report.coef.unwrap();
    assert!(
        (report.total_norm * coef as f64 - 0.5).abs() < 1e-6,
        "the clip of g / 1024"
    );
    let p0 = flat(&params);
    for i in 0..100 {
        let want = p0[i] - 0.1 * g[i] * coef;
        assert!((got[i] - want).abs() <= 1e-6, "{i}: {} vs {want}", got[i]);
        assert!(
            ulps(
                step.clipped(0, i as u32, g[i] * 1024.0).unwrap(),
                g[i] * coef
            ) <= 2
        );
    }
}

/// Lengths around the edges that matter: empty, one, odd, prime, chunk edges.
const LENGTHS: &[usize] = &[0, 1, 2, 3, 7, 13, 257, 1021, 65_535, 65_536, 65_537];

fn magnitude(seed: u64, len: usize, dtype: u8, m: usize) -> Host {
    // Magnitudes each dtype holds: f16 up to 1e4, the others from 1e-30 to 1e30.
    let exp = match dtype % 3 {
        1 => [-4, -2, 0, 2, 4][m],
        _ => [-30, -10, 0, 10, 30][m],
    };
    host(dtype, values(seed, len, 2.0 * 10f32.powi(exp)))
}

proptest::proptest! {
    // A fixed seed: the suite passes or fails the same way on every run.
    #![proptest_config(proptest::prelude::ProptestConfig {
        cases: 24,
        rng_seed: proptest::test_runner::RngSeed::Fixed(0x6f70_7469),
        ..proptest::prelude::ProptestConfig::default()
    })]

    #[test]
    fn gpu_matches_cpu_over_sizes_and_magnitudes(
        tensors in proptest::collection::vec(
            (proptest::sample::select(LENGTHS), 0u8..3, 0usize..5), 1..6),
        seed in proptest::prelude::any::<u64>(),
        which in 0usize..5,
        rule in 0usize..3,
        in_place in proptest::prelude::any::<bool>(),
    ) {
        let infos: Vec<TensorInfo> = (tensors.iter().enumerate())
            .map(|(i, t)| TensorInfo::new(format!("t{i}"), &[t.0 as u64]))
            .collect();
        let params = (tensors.iter().enumerate())
            .map(|(i, t)| Host::F32(values(seed ^ i as u64, t.0, 2.0)))
            .collect();
        let case = Case { infos, params };
        let grads = |step: u64| -> Vec<Host> {
            (tensors.iter().enumerate())
                .map(|(i, &(len, dtype, m))| {
                    magnitude(seed.wrapping_add(step * 7919 + i as u64), len, dtype, m)
                })
                .collect()
        };
        let policy = match rule {
            0 => ClipPolicy::new(Rule::GlobalNorm(0.5)),
            1 => ClipPolicy::new(Rule::PerTensor(PerTensorClip { max_norm: 0.3 })),
            _ => ClipPolicy::new(Rule::GlobalNorm(1.0)).non_finite(NonFinitePolicy::ZeroNans),
        };
        compare_on(&case, &grads, policy, optimizers()[which], in_place, 2);
    }
}
