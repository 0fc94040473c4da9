//! Fault injection: inputs that once panicked, hung, allocated without bound or diverged
//! between the backends. Each gets a typed error (with the data and state byte-identical
//! afterwards) or a documented result, on the CPU and on the GPU.

mod common;

use common::{backends, download, gpu, gpu_tensors, host, muts, refs, upload, Host};
use gradclip::{
    Agc, AutoClip, Backend, ClipError, ClipPolicy, Clipper, CpuClipper, GaussianNoise, GpuClipper,
    GpuContext, GroupClip, LossScale, NonFinitePolicy, Norm, Optimizer, PerExampleClip,
    PerTensorClip, PolicyState, Rule, Schedule, Sgd, Shard, SingleRank, TensorInfo, ValueClip,
    ZClip,
};
use proptest::prelude::*;

/// A CPU and a GPU run of `policy` over `h`, one step each; the outputs and reports.
fn both_once(policy: &ClipPolicy, h: &[Host], infos: &[TensorInfo]) -> [Vec<Host>; 2] {
    let mut c = h.to_vec();
    let mut cpu = CpuClipper::new(policy.clone(), infos).unwrap();
    cpu.step(&mut muts(&mut c), None).unwrap();
    let ctx = gpu();
    let arena = upload(&ctx, h);
    let mut run = GpuClipper::new(&ctx, &gpu_tensors(&arena, h, infos), None, policy.clone());
    run.as_mut().unwrap().step().unwrap().wait().unwrap();
    [c, download(&ctx, &arena, h)]
}

#[test]
fn names_of_any_script_match_globs_without_panicking() {
    let infos = [
        TensorInfo::new("层.权重", &[2]),
        TensorInfo::new("aé", &[2]),
        TensorInfo::new("ab", &[2]),
    ];
    let h = vec![
        host(0, vec![3.0, 4.0]),
        host(0, vec![3.0, 4.0]),
        host(0, vec![3.0, 4.0]),
    ];
    // "*b" matches "ab" only; "a*b" matches "ab" only; "层*" matches the first.
    let groups = GroupClip::new(100.0)
        .group("b", "*b", 1.0)
        .group("ab", "a*b", 1.0)
        .group("层", "层*", 0.5);
    let policy = ClipPolicy::new(Rule::Groups(groups)).with_group_report();
    for out in both_once(&policy, &h, &infos) {
        let n = |t: &Host| t.to_f64().iter().map(|x| x * x).sum::<f64>().sqrt();
        assert!((n(&out[0]) - 0.5).abs() < 1e-5, "{out:?}");
        assert_eq!(out[1], h[1], "aé is in the default group (100)");
        assert!((n(&out[2]) - 1.0).abs() < 1e-5);
    }
    let agc = ClipPolicy::new(Rule::Agc(Agc::new(0.01).exclude("*权重").exclude("a*b")));
    let infos2 = [
        TensorInfo::new("层.权重", &[1, 2]),
        TensorInfo::new("aé", &[1, 2]),
    ];
    assert!(CpuClipper::new(agc, &infos2).is_ok());
}

#[test]
fn shapes_and_batches_beyond_reason_are_typed_errors() {
    // A shape whose element count wraps u64.
    let wrap = [TensorInfo::new("w", &[(1 << 63) + 2, 2])];
    let agc = ClipPolicy::new(Rule::Agc(Agc::new(0.01)));
    let e = CpuClipper::new(agc, &wrap).unwrap_err();
    assert!(matches!(e, ClipError::ShapeMismatch { .. }), "{e}");
    // Per-example clipping of u32::MAX examples over an empty tensor: no 128 GiB plan.
    let clip = PerExampleClip::new(u32::MAX, 1.0);
    let e =
        gradclip::CpuClipper::per_example(clip.clone(), &[TensorInfo::new("e", &[0])]).unwrap_err();
    assert!(matches!(e, ClipError::InvalidConfig(_)), "{e}");
    let ctx = gpu();
    let h = vec![Host::F32(vec![])];
    let arena = upload(&ctx, &h);
    let infos = [TensorInfo::new("e", &[0])];
    let t = gpu_tensors(&arena, &h, &infos);
    let e = gradclip::GpuClipper::per_example(&ctx, &t, &t, clip).unwrap_err();
    assert!(matches!(e, ClipError::InvalidConfig(_)), "{e}");
    // An AutoClip history beyond the device state's reach.
    let long = ClipPolicy::new(Rule::AutoClip(AutoClip::new(50.0, (1 << 24) + 1)));
    let e = CpuClipper::new(long, &infos).unwrap_err();
    assert!(matches!(e, ClipError::InvalidConfig(_)), "{e}");
    // A given norm below f32's smallest subnormal is 0 on both backends: nothing clips.
    let tiny = gradclip::PartialNorm::from_total(gradclip::Norm::L2, 1e-50).unwrap();
    let g = vec![host(0, vec![3.0, 4.0])];
    let arena = upload(&ctx, &g);
    let policy = gradclip::NonFinitePolicy::Propagate;
    let split = ClipPolicy::global_norm(1.0)
        .norm(tiny.norm())
        .non_finite(policy);
    let rg = common::gpu_policy(&ctx, &arena, &g, split.clone()).step_with_norm(&tiny);
    let mut c = g.clone();
    let rc = (common::cpu_policy(split, &g).step_with_norm(&mut muts(&mut c), &tiny)).unwrap();
    assert_eq!(
        (rg.unwrap().wait().unwrap().coef.unwrap(), rc.coef.unwrap()),
        (1.0, 1.0)
    );
    assert_eq!(download(&ctx, &arena, &g), c);
}

/// Host data larger than one device buffer streams through several, each tensor whole:
/// every global operation (measure, clip, value clamp, the non-finite policies) and a
/// chain equal the CPU's. A tensor larger than a buffer is no longer cut into pieces: it
/// is a typed error that points to the CPU backend, with nothing touched, and the CPU
/// backend clips it.
#[test]
fn host_data_larger_than_a_device_buffer_streams() {
    let _turn = gpu();
    let small = GpuContext::with_limits(backends(), |a| wgpu::Limits {
        max_buffer_size: 1 << 20,
        max_storage_buffer_binding_size: 1 << 18,
        ..a.clone()
    })
    .unwrap();
    let wave = |n: usize, k: f32| (0..n).map(|i| ((i as f32) * k).sin()).collect::<Vec<f32>>();
    // 2.3 MB over three 1 MiB buffers: 800 kB of f32, an odd bf16 tensor, 800 kB of bf16,
    // small ones on both sides; every large tensor spans several binding windows.
    let h = vec![
        host(1, wave(3, 0.7)),
        host(0, wave(200_001, 0.01)),
        host(2, wave(70_001, 0.03)),
        host(0, wave(5, 1.1)),
        host(1, wave(262_145, 0.002)),
        host(2, wave(400_001, 0.001)),
    ];
    let infos_of = |h: &[Host]| -> Vec<TensorInfo> {
        (h.iter().enumerate())
            .map(|(i, t)| TensorInfo::new(format!("t{i}"), &[t.as_ref().len() as u64]))
            .collect()
    };
    // One step of `policy` over `g` by a new clipper on the small GPU, or on the CPU.
    let on_gpu = |policy: &ClipPolicy, g: &mut [Host]| {
        Clipper::new(Backend::Gpu(small.clone()), policy.clone(), &infos_of(g))
            .unwrap()
            .step(&mut muts(g), None)
    };
    let on_cpu = |policy: &ClipPolicy, g: &mut [Host]| {
        Clipper::new(Backend::Cpu, policy.clone(), &infos_of(g))
            .unwrap()
            .step(&mut muts(g), None)
    };
    let same = |a: &[Host], b: &[Host]| {
        for (x, y) in a.iter().zip(b) {
            for (p, q) in x.to_f64().iter().zip(y.to_f64()) {
                assert!(
                    common::close(*p, q, 1e-2) || (p - q).abs() < 1e-6,
                    "{p} vs {q}"
                );
            }
        }
    };
    for norm in [
        gradclip::Norm::L2,
        gradclip::Norm::Inf,
        gradclip::Norm::P(3.0),
    ] {
        let measure = ClipPolicy::total_norm().norm(norm);
        let (mut a, mut b) = (h.clone(), h.clone());
        let g = on_gpu(&measure, &mut a).unwrap().partial;
        let c = on_cpu(&measure, &mut b).unwrap().partial;
        assert!(common::close(g.total(), c.total(), 1e-5), "{norm:?}");
        assert!(a == h && b == h, "a measure writes nothing");
        let clip = ClipPolicy::global_norm(1.0).norm(norm).with_group_report();
        let ra = on_gpu(&clip, &mut a).unwrap();
        let rb = on_cpu(&clip, &mut b).unwrap();
        assert!(
            (ra.clipped_units > 0)
                && common::close(ra.coef.unwrap() as f64, rb.coef.unwrap() as f64, 1e-5)
        );
        assert!(common::close(ra.total_norm, rb.total_norm, 1e-5));
        let (ta, tb) = (common::norms_of(&ra), common::norms_of(&rb));
        for (x, y) in ta.iter().zip(&tb) {
            assert!(common::close(*x, *y, 1e-5), "{norm:?}: {ta:?} vs {tb:?}");
        }
        same(&a, &b);
    }
    let (mut a, mut b) = (h.clone(), h.clone());
    let value = ClipPolicy::value_clip(gradclip::ValueClip::range(-0.3, 0.5));
    on_gpu(&value, &mut a).unwrap();
    on_cpu(&value, &mut b).unwrap();
    assert_eq!(a, b);
    // A NaN in the second buffer under Error: an error, and nothing written anywhere.
    let mut bad = h.clone();
    bad[4] = host(1, {
        let mut v = wave(262_145, 0.002);
        v[100_000] = f32::NAN;
        v
    });
    let before = bad.clone();
    let clip = ClipPolicy::global_norm(1.0).non_finite(gradclip::NonFinitePolicy::Error);
    let e = on_gpu(&clip, &mut bad).unwrap_err();
    assert!(matches!(e, ClipError::NonFiniteNorm(_)), "{e}");
    let bytes =
        |h: &[Host]| -> Vec<u8> { refs(h).iter().flat_map(|g| g.as_bytes().to_vec()).collect() };
    assert!(bytes(&bad) == bytes(&before), "the error wrote data");
    // ZeroNans: the NaN becomes 0 and the rest clips by the NaN-free norm.
    let zero = ClipPolicy::global_norm(1.0).non_finite(gradclip::NonFinitePolicy::ZeroNans);
    let mut c = bad.clone();
    let rg = on_gpu(&zero, &mut bad).unwrap();
    let rc = on_cpu(&zero, &mut c).unwrap();
    assert!(rg.nans_zeroed && common::close(rg.total_norm, rc.total_norm, 1e-5));
    same(&bad, &c);
    // Propagate with per-tensor norms: the NaN tensor's norm is NaN, the others agree.
    let mut bad = before.clone();
    let mut c = bad.clone();
    let norms = ClipPolicy::global_norm(1.0).with_group_report();
    let rg = on_gpu(&norms, &mut bad).unwrap();
    let rc = on_cpu(&norms, &mut c).unwrap();
    assert!(rg.non_finite && rc.non_finite);
    let (tg, tc) = (common::norms_of(&rg), common::norms_of(&rc));
    for (i, (x, y)) in tg.iter().zip(&tc).enumerate() {
        assert!(common::close(*x, *y, 1e-5), "tensor {i}: {x} vs {y}");
    }
    assert!(tg[4].is_nan());
    // A chain with state, spread over several buffers, equals the CPU step after step.
    let spread = vec![
        h[0].clone(),
        host(0, wave(200_000, 0.02)),
        h[2].clone(),
        h[4].clone(),
    ];
    let chain = ClipPolicy::new(Rule::PerTensor(gradclip::PerTensorClip { max_norm: 2.0 }))
        .then(Rule::AutoClip(AutoClip::new(50.0, 8)));
    let mut gpu_chain = Clipper::new(
        Backend::Gpu(small.clone()),
        chain.clone(),
        &infos_of(&spread),
    )
    .unwrap();
    let mut cpu_chain = Clipper::new(Backend::Cpu, chain, &infos_of(&spread)).unwrap();
    for _ in 0..2 {
        let (mut a, mut b) = (spread.clone(), spread.clone());
        let ra = gpu_chain.step(&mut muts(&mut a), None).unwrap();
        let rb = cpu_chain.step(&mut muts(&mut b), None).unwrap();
        assert_eq!(ra.clipped_units, rb.clipped_units);
        same(&a, &b);
    }
    // Tensors larger than a buffer (1.2 MB of f32, 1.2 MB of bf16), which were once cut:
    // every operation on the GPU is a typed error naming the first, nothing touched; the
    // CPU backend, which it points to, clips them.
    let mut large = h.clone();
    large[1] = host(0, wave(300_001, 0.01));
    large[5] = host(2, wave(600_001, 0.001));
    let policies = [
        ClipPolicy::total_norm(),
        ClipPolicy::global_norm(1.0).with_group_report(),
        ClipPolicy::value_clip(gradclip::ValueClip::range(-0.3, 0.5)),
        ClipPolicy::new(Rule::GlobalNorm(1.0)),
    ];
    for policy in &policies {
        let mut d = large.clone();
        let e = on_gpu(policy, &mut d).unwrap_err();
        match &e {
            ClipError::TooLarge { tensor, len } => {
                assert!(
                    tensor.starts_with("#1 ") && tensor.contains("Backend::Cpu"),
                    "{e}"
                );
                assert_eq!(*len, 300_001, "{e}");
            }
            _ => panic!("{policy:?}: {e}"),
        }
        assert_eq!(d, large);
    }
    let mut d = large.clone();
    let r = on_cpu(&ClipPolicy::global_norm(1.0), &mut d).unwrap();
    assert!(r.clipped_units > 0 && d != large);
}

fn adaptive_chain() -> ClipPolicy {
    ClipPolicy::new(Rule::AutoClip(AutoClip::new(50.0, 4))).then(Rule::ZClip(ZClip {
        warmup: 2,
        ..ZClip::default()
    }))
}

fn state_infos() -> Vec<TensorInfo> {
    vec![TensorInfo::new("w", &[3])]
}

fn state_grads(k: usize) -> Vec<Host> {
    vec![host(0, vec![1.0 + k as f32, -2.0, 0.5 * k as f32])]
}

/// A state after `steps` steps of the adaptive chain on the CPU.
fn saved_state(steps: usize) -> PolicyState {
    let mut cpu = CpuClipper::new(adaptive_chain(), &state_infos()).unwrap();
    for k in 0..steps {
        cpu.step(&mut muts(&mut state_grads(k)), None).unwrap();
    }
    cpu.state().clone()
}

/// Restores `bytes` into a GPU run of the adaptive chain: a refused state leaves it as it
/// was; an accepted one steps to coefficients in [0, 1].
fn restore_on_gpu(bytes: &[u8]) -> Result<(), ClipError> {
    let state = PolicyState::from_bytes(bytes)?;
    let ctx = gpu();
    let h = state_grads(7);
    let arena = upload(&ctx, &h);
    let t = gpu_tensors(&arena, &h, &state_infos());
    let mut run = GpuClipper::new(&ctx, &t, None, adaptive_chain()).unwrap();
    let before = run.state().unwrap();
    if let Err(e) = run.set_state(&state) {
        assert_eq!(
            run.state().unwrap(),
            before,
            "a refused state changed nothing"
        );
        return Err(e);
    }
    let report = run.step().unwrap().wait().unwrap();
    for stage in &report.stages {
        let c = stage.coef.unwrap();
        assert!((0.0..=1.0).contains(&c), "coefficient {c} from {state:?}");
    }
    assert!(download(&ctx, &arena, &h)[0]
        .to_f64()
        .iter()
        .all(|x| x.is_finite()));
    Ok(())
}

/// Restores `bytes` into a CPU run of the adaptive chain. A refused state leaves it as it
/// was; an accepted one steps to finite, non-negative coefficients.
fn restore_anywhere(bytes: &[u8]) -> Result<(), ClipError> {
    let state = PolicyState::from_bytes(bytes)?;
    let mut cpu = CpuClipper::new(adaptive_chain(), &state_infos()).unwrap();
    let before = cpu.state().clone();
    if let Err(e) = cpu.set_state(&state) {
        assert_eq!(cpu.state(), &before, "a refused state changed nothing");
        return Err(e);
    }
    let mut g = state_grads(7);
    let report = cpu.step(&mut muts(&mut g), None).unwrap();
    for stage in &report.stages {
        let c = stage.coef.unwrap();
        assert!((0.0..=1.0).contains(&c), "coefficient {c} from {state:?}");
    }
    assert!(g[0].to_f64().iter().all(|x| x.is_finite()));
    Ok(())
}

/// Word `i` of the saved state `bytes` set to `value` (word offsets: 16 bytes of header,
/// the layout, the fingerprint, then the words, each part after its length).
fn with_word(bytes: &[u8], i: usize, value: f32) -> Vec<u8> {
    let count_at = |at: usize| u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap()) as usize;
    let meaning_at = 20 + 4 * count_at(16);
    let words_at = meaning_at + 4 + 4 * count_at(meaning_at);
    let at = words_at + 4 + 4 * i;
    let mut b = bytes.to_vec();
    b[at..at + 4].copy_from_slice(&value.to_le_bytes());
    b
}

/// History slot `i` of a state's first block (after its header words, abi::ST_HEADER).
fn slot(i: usize) -> usize {
    11 + i
}

#[test]
fn states_of_other_policies_or_out_of_domain_are_refused() {
    let good = saved_state(5);
    assert!(restore_anywhere(&good.to_bytes()).is_ok());
    let invalid = |r: Result<(), ClipError>| assert!(matches!(r, Err(ClipError::InvalidState(_))));
    // Another rule's state: AutoClip alone into the AutoClip -> ZClip chain.
    let mut other = CpuClipper::new(
        ClipPolicy::new(Rule::AutoClip(AutoClip::new(50.0, 4))),
        &state_infos(),
    )
    .unwrap();
    other.step(&mut muts(&mut state_grads(1)), None).unwrap();
    invalid(restore_anywhere(&other.state().to_bytes()));
    // The same rules with other numbers (percentile 90).
    let mut numbers = CpuClipper::new(
        ClipPolicy::new(Rule::AutoClip(AutoClip::new(90.0, 4))).then(Rule::ZClip(ZClip {
            warmup: 2,
            ..ZClip::default()
        })),
        &state_infos(),
    )
    .unwrap();
    numbers.step(&mut muts(&mut state_grads(1)), None).unwrap();
    invalid(restore_anywhere(&numbers.state().to_bytes()));
    // Truncated, oversized, empty, another format.
    let bytes = good.to_bytes();
    for cut in [0, 3, 4, 16, 20, bytes.len() - 1] {
        invalid(restore_anywhere(&bytes[..cut]));
    }
    let mut longer = bytes.clone();
    longer.push(0);
    invalid(restore_anywhere(&longer));
    // A stage record whose block lies beyond the words (its first word, the record's
    // fourth) is refused when read, before anything indexes it.
    let mut beyond = bytes.clone();
    beyond[32..36].copy_from_slice(&u32::MAX.to_le_bytes());
    invalid(PolicyState::from_bytes(&beyond).map(|_| ()));
    // Values outside their domain: a NaN or negative norm in the history, a negative
    // variance.
    for (word, value) in [
        (slot(0), f32::NAN),
        (slot(1), -1.0),
        (slot(0), f32::INFINITY),
        (slot(2), -0.0),
    ] {
        invalid(restore_anywhere(&with_word(&bytes, word, value)));
    }
    // ZClip's block comes after AutoClip's (its header and 4 slots): its variance.
    invalid(restore_anywhere(&with_word(&bytes, slot(4) + 3, -0.5)));
    // The GPU refuses the same states and keeps its own.
    let ctx = gpu();
    let h = state_grads(0);
    let arena = upload(&ctx, &h);
    let t = gpu_tensors(&arena, &h, &state_infos());
    let mut run = GpuClipper::new(&ctx, &t, None, adaptive_chain()).unwrap();
    run.step().unwrap().wait().unwrap();
    let kept = run.state().unwrap();
    let e = run.set_state(other.state()).unwrap_err();
    assert!(matches!(e, ClipError::InvalidState(_)), "{e}");
    let nan = PolicyState::from_bytes(&with_word(&bytes, slot(0), f32::NAN)).unwrap();
    assert!(matches!(
        run.set_state(&nan),
        Err(ClipError::InvalidState(_))
    ));
    assert_eq!(run.state().unwrap(), kept);
    assert!(run.set_state(&good).is_ok());
    assert_eq!(run.state().unwrap(), good);
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 2000,
        rng_seed: proptest::test_runner::RngSeed::Fixed(0x7374_6174),
        ..ProptestConfig::default()
    })]

    /// Bit flips and random bytes: never a panic; whatever is accepted steps to finite,
    /// non-negative coefficients.
    #[test]
    fn restoring_corrupted_states_never_panics(
        flips in prop::collection::vec((any::<usize>(), 0u8..8), 1..8),
        garbage in prop::collection::vec(any::<u8>(), 0..200),
        use_garbage in any::<bool>(),
    ) {
        let bytes = if use_garbage {
            // A real state's magic and format version, so the garbage is parsed.
            let mut g = saved_state(6).to_bytes()[..8].to_vec();
            g.extend(garbage);
            g
        } else {
            let mut b = saved_state(6).to_bytes();
            for (at, bit) in flips {
                let i = at % b.len();
                b[i] ^= 1 << bit;
            }
            b
        };
        let _ = restore_anywhere(&bytes);
    }
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 100,
        rng_seed: proptest::test_runner::RngSeed::Fixed(0x6770_7573),
        ..ProptestConfig::default()
    })]

    /// The same on the GPU: the CPU's verdict, and no panic.
    #[test]
    fn restoring_corrupted_states_on_the_gpu_agrees(
        flips in prop::collection::vec((any::<usize>(), 0u8..8), 1..8),
    ) {
        let mut b = saved_state(6).to_bytes();
        for (at, bit) in flips {
            let i = at % b.len();
            b[i] ^= 1 << bit;
        }
        prop_assert_eq!(restore_on_gpu(&b).is_ok(), restore_anywhere(&b).is_ok());
    }
}

/// A caller's buffer destroyed after planning: every step is a typed error (wgpu rejects
/// the submission, nothing runs), counters stay where they were, and the device lives on.
#[test]
fn buffers_destroyed_after_planning_are_typed_errors() {
    let ctx = gpu();
    let h = vec![host(0, vec![3.0; 64]), host(2, vec![4.0; 33])];
    let infos = [TensorInfo::new("a", &[64]), TensorInfo::new("b", &[33])];
    let wgpu_error = |r: Result<(), ClipError>, what: &str| {
        assert!(matches!(r, Err(ClipError::Wgpu(_))), "{what}: {r:?}");
    };
    let arena = upload(&ctx, &h);
    // The removed GpuBatch's operations, each a runner of its chain now.
    let global = ClipPolicy::global_norm(1.0);
    let mut clip = common::gpu_policy(&ctx, &arena, &h, global.clone());
    let measure = ClipPolicy::total_norm().with_group_report();
    let mut total = common::gpu_policy(&ctx, &arena, &h, measure);
    let value = ClipPolicy::value_clip(gradclip::ValueClip::symmetric(1.0));
    let mut value = common::gpu_policy(&ctx, &arena, &h, value);
    let t = gpu_tensors(&arena, &h, &infos);
    let mut chain = GpuClipper::new(&ctx, &t, None, adaptive_chain()).unwrap();
    let sums = upload(&ctx, &h);
    let s = gpu_tensors(&sums, &h, &infos);
    let policy = ClipPolicy::new(Rule::GlobalNorm(1.0));
    let mut acc = gradclip::GpuClipper::accumulating(&ctx, &t, &s, None, 3, policy).unwrap();
    arena.buffer.destroy();
    wgpu_error(clip.step().map(drop), "global clip");
    wgpu_error(total.step().map(drop), "total norm");
    wgpu_error(value.step().map(drop), "value clip");
    wgpu_error(chain.step().map(drop), "policy step");
    let counts = [clip.steps_taken(), total.steps_taken(), value.steps_taken()];
    assert_eq!(counts, [0, 0, 0]);
    assert_eq!(chain.steps_taken(), 0);
    wgpu_error(acc.step().map(drop), "accumulation");
    assert_eq!((acc.pending(), acc.steps_taken()), (0, 0));
    // The device still works for buffers that live.
    let fresh = upload(&ctx, &h);
    let r = common::gpu_policy(&ctx, &fresh, &h, global).step();
    assert!(r.unwrap().wait().unwrap().clipped_units > 0);
}

/// An AGC-excluded tensor's parameters do not count, however few units the batch has.
#[test]
fn excluded_parameters_do_not_count() {
    let infos = [TensorInfo::new("w", &[1, 4]), TensorInfo::new("b", &[4])];
    let grads = vec![host(0, vec![3.0, 4.0, 0.0, 0.0]), host(0, vec![1.0; 4])];
    let params = vec![host(0, vec![0.1; 4]), host(0, vec![f32::INFINITY; 4])];
    let chain = ClipPolicy::new(Rule::Agc(Agc::new(0.01).exclude("b")))
        .non_finite(gradclip::NonFinitePolicy::SkipStep);
    let mut c = grads.clone();
    let mut cpu = CpuClipper::new(chain.clone(), &infos).unwrap();
    let cr = cpu.step(&mut muts(&mut c), Some(&refs(&params))).unwrap();
    let ctx = gpu();
    let arena = upload(&ctx, &grads);
    let p_arena = upload(&ctx, &params);
    let t = gpu_tensors(&arena, &grads, &infos);
    let pt = gpu_tensors(&p_arena, &params, &infos);
    let mut run = GpuClipper::new(&ctx, &t, Some(&pt), chain).unwrap();
    let gr = run.step().unwrap().wait().unwrap();
    assert!(!cr.skipped && !gr.skipped && !gr.non_finite, "{gr:?}");
    let g = download(&ctx, &arena, &grads);
    for (x, y) in g
        .iter()
        .flat_map(|t| t.to_f64())
        .zip(c.iter().flat_map(|t| t.to_f64()))
    {
        assert!(common::close(x, y, 1e-6), "{x} vs {y}");
    }
    assert_ne!(c, grads, "w was clipped");
}

/// AGC with a NaN or an infinity in the parameters: the step reports it as non-finite,
/// SkipStep and Error hold it (gradients untouched), Propagate follows timm (a NaN
/// parameter makes its unit NaN, an infinite one leaves it as it is), on both backends.
#[test]
fn agc_with_non_finite_parameters_follows_the_policy() {
    use gradclip::NonFinitePolicy as P;
    let infos = [TensorInfo::new("w", &[2, 2])];
    let grads = vec![host(0, vec![3.0, 4.0, 0.3, 0.4])];
    let ctx = gpu();
    for (bad, name) in [(f32::NAN, "NaN"), (f32::INFINITY, "inf")] {
        let params = vec![host(0, vec![bad, 1.0, 0.1, 0.1])];
        for policy in [P::Propagate, P::SkipStep, P::Error] {
            let chain = ClipPolicy::new(Rule::Agc(Agc::new(0.01))).non_finite(policy);
            let what = format!("{name} parameter, {policy:?}");
            let mut c = grads.clone();
            let mut cpu = CpuClipper::new(chain.clone(), &infos).unwrap();
            let cr = cpu.step(&mut muts(&mut c), Some(&refs(&params)));
            let arena = upload(&ctx, &grads);
            let p_arena = upload(&ctx, &params);
            let t = gpu_tensors(&arena, &grads, &infos);
            let pt = gpu_tensors(&p_arena, &params, &infos);
            let mut gpu_run = GpuClipper::new(&ctx, &t, Some(&pt), chain).unwrap();
            let gr = gpu_run.step().unwrap().wait();
            let g = download(&ctx, &arena, &grads);
            for (x, y) in g[0].to_f64().iter().zip(c[0].to_f64()) {
                assert!(common::close(*x, y, 1e-6), "{what}: GPU {x} vs CPU {y}");
            }
            match policy {
                P::Error => {
                    assert!(matches!(cr, Err(ClipError::NonFiniteNorm(_))), "{what}");
                    assert!(matches!(gr, Err(ClipError::NonFiniteNorm(_))), "{what}");
                    assert_eq!(c, grads, "{what}");
                }
                P::SkipStep => {
                    let (cr, gr) = (cr.unwrap(), gr.unwrap());
                    assert!(cr.skipped && gr.skipped && cr.non_finite, "{what}");
                    assert_eq!(c, grads, "{what}");
                }
                _ => {
                    let (cr, gr) = (cr.unwrap(), gr.unwrap());
                    assert!(cr.non_finite && gr.non_finite, "{what}");
                    let row0 = &c[0].to_f64()[..2];
                    if bad.is_nan() {
                        assert!(row0.iter().all(|x| x.is_nan()), "{what}: {row0:?}");
                    } else {
                        assert_eq!(row0, &[3.0, 4.0], "{what}");
                    }
                    // The finite row is clipped by AGC as usual: 0.01 * 0.1414 / 0.5.
                    let row1 = &c[0].to_f64()[2..];
                    assert!((row1[0] - 0.3 * 0.01 * 0.02f64.sqrt() / 0.5).abs() < 1e-6);
                }
            }
        }
    }
}

/// A device that cannot run gradclip's kernels (workgroups of 256 threads beyond its
/// limits): every step is a typed error before anything is recorded, never a panic.
#[test]
fn devices_that_cannot_build_the_kernels_are_typed_errors() {
    let _turn = gpu();
    let tiny = GpuContext::with_limits(backends(), |a| wgpu::Limits {
        max_compute_workgroup_size_x: 64,
        max_compute_invocations_per_workgroup: 64,
        ..a.clone()
    })
    .unwrap();
    let h = vec![host(0, vec![3.0, 4.0])];
    let infos = [TensorInfo::new("w", &[2])];
    let arena = upload(&tiny, &h);
    let wgpu_error = |r: Result<(), ClipError>, what: &str| {
        assert!(matches!(r, Err(ClipError::Wgpu(_))), "{what}: {r:?}");
    };
    let global = ClipPolicy::global_norm(1.0);
    let mut clip = common::gpu_policy(&tiny, &arena, &h, global.clone());
    wgpu_error(clip.step().map(drop), "global clip");
    assert_eq!(clip.steps_taken(), 0);
    let value = ClipPolicy::value_clip(gradclip::ValueClip::symmetric(1.0));
    let mut value = common::gpu_policy(&tiny, &arena, &h, value);
    wgpu_error(value.step().map(drop), "value clip");
    assert_eq!(value.steps_taken(), 0);
    let t = gpu_tensors(&arena, &h, &infos);
    let mut chain = GpuClipper::new(&tiny, &t, None, adaptive_chain()).unwrap();
    let mut encoder = tiny.device().create_command_encoder(&Default::default());
    wgpu_error(chain.encode(&mut encoder).map(drop), "policy step");
    assert_eq!(chain.steps_taken(), 0);
    let mut clipper = Clipper::new(Backend::Gpu(tiny.clone()), global, &infos).unwrap();
    let mut g = h.clone();
    let r = clipper.step(&mut muts(&mut g), None);
    wgpu_error(r.map(drop), "host clip");
    assert_eq!(g, h);
}

/// The chain the wrapper test saves its state under: adaptive, then a per-tensor stage.
fn meaning_chain() -> ClipPolicy {
    ClipPolicy::new(Rule::AutoClip(AutoClip::new(90.0, 4)))
        .then(Rule::PerTensor(PerTensorClip { max_norm: 2.0 }))
}

/// Sets `saved` on every runner (GPU buffers, host slices staged on the GPU, the CPU) and
/// every wrapper with a chain state (plain, accumulation, fused optimizer, sharded) built
/// for `policy` over `infos`; returns each cell's name and outcome. A refused state must
/// leave the cell's state as it was.
fn restore_in_every_cell(
    ctx: &GpuContext,
    policy: &ClipPolicy,
    infos: &[TensorInfo],
    saved: &PolicyState,
) -> Vec<(&'static str, Result<(), ClipError>)> {
    let data: Vec<Host> = (infos.iter())
        .map(|i| host(0, (0..i.len()).map(|k| k as f32 * 0.5 - 1.0).collect()))
        .collect();
    let (a, b, c) = (upload(ctx, &data), upload(ctx, &data), upload(ctx, &data));
    let (ta, tb, tc) = (
        gpu_tensors(&a, &data, infos),
        gpu_tensors(&b, &data, infos),
        gpu_tensors(&c, &data, infos),
    );
    let sgd = Optimizer::Sgd(Sgd::new(0.1));
    let whole = || Shard::whole_tensors(infos, |_, _| true);
    let staged = || Backend::Gpu(ctx.clone());
    // Each cell: restore, and on refusal compare the state's bytes before and after.
    macro_rules! cell {
        ($name:literal, $runner:expr, |$r:ident| $get:expr, $set:ident) => {{
            let mut $r = $runner.unwrap();
            let before = $get;
            let outcome = $r.$set(saved);
            if outcome.is_err() {
                assert_eq!($get, before, "{}: a refused state changed it", $name);
            }
            ($name, outcome)
        }};
    }
    vec![
        cell!(
            "GpuClipper::new",
            GpuClipper::new(ctx, &ta, None, policy.clone()),
            |r| r.state().unwrap().to_bytes(),
            set_state
        ),
        cell!(
            "GpuClipper::accumulating",
            GpuClipper::accumulating(ctx, &ta, &tb, None, 3, policy.clone()),
            |r| r.state().unwrap().to_bytes(),
            set_state
        ),
        cell!(
            "GpuClipper::with_optimizer",
            GpuClipper::with_optimizer(ctx, &ta, &tc, policy.clone(), sgd),
            |r| r.clip_state().unwrap().to_bytes(),
            set_clip_state
        ),
        cell!(
            "GpuClipper::sharded",
            GpuClipper::sharded(ctx, &ta, None, policy.clone(), infos, whole(), SingleRank),
            |r| r.state().unwrap().to_bytes(),
            set_state
        ),
        cell!(
            "Clipper::new",
            Clipper::new(staged(), policy.clone(), infos),
            |r| r.state().unwrap().to_bytes(),
            set_state
        ),
        cell!(
            "Clipper::accumulating",
            Clipper::accumulating(staged(), policy.clone(), infos, 3),
            |r| r.state().unwrap().to_bytes(),
            set_state
        ),
        cell!(
            "Clipper::with_optimizer",
            Clipper::with_optimizer(staged(), policy.clone(), infos, sgd),
            |r| r.clip_state().unwrap().to_bytes(),
            set_clip_state
        ),
        cell!(
            "Clipper::sharded",
            Clipper::sharded(staged(), policy.clone(), infos, whole(), SingleRank),
            |r| r.state().unwrap().to_bytes(),
            set_state
        ),
        cell!(
            "CpuClipper::new",
            CpuClipper::new(policy.clone(), infos),
            |r| r.state().to_bytes(),
            set_state
        ),
        cell!(
            "CpuClipper::accumulating",
            CpuClipper::accumulating(policy.clone(), infos, 3),
            |r| r.state().to_bytes(),
            set_state
        ),
        cell!(
            "CpuClipper::with_optimizer",
            CpuClipper::with_optimizer(policy.clone(), infos, sgd),
            |r| r.clip_state().to_bytes(),
            set_clip_state
        ),
        cell!(
            "CpuClipper::sharded",
            CpuClipper::sharded(policy.clone(), infos, whole(), SingleRank),
            |r| r.state().to_bytes(),
            set_state
        ),
    ]
}

/// A saved chain state restores only into the chain and tensors it was saved for, on every
/// runner and wrapper that keeps one: each part of its meaning changed alone is
/// `InvalidState` naming that part, with the cell's state unchanged; where it belongs,
/// every cell takes it.
#[test]
fn every_runner_and_wrapper_refuses_a_state_of_another_chain() {
    let ctx = gpu();
    let infos = vec![TensorInfo::new("w", &[2, 3]), TensorInfo::new("b", &[3])];
    let mut run = CpuClipper::new(meaning_chain(), &infos).unwrap();
    let mut data = vec![
        host(0, vec![1.0, -2.0, 3.0, 0.5, 0.25, -1.0]),
        host(0, vec![4.0, 0.0, -3.0]),
    ];
    run.step(&mut muts(&mut data), None).unwrap();
    let saved = PolicyState::from_bytes(&run.state().to_bytes()).unwrap();
    for (cell, outcome) in restore_in_every_cell(&ctx, &meaning_chain(), &infos, &saved) {
        assert!(outcome.is_ok(), "{cell}: where it belongs: {outcome:?}");
    }
    let renamed = vec![TensorInfo::new("w2", &[2, 3]), TensorInfo::new("b", &[3])];
    let reshaped = vec![TensorInfo::new("w", &[3, 2]), TensorInfo::new("b", &[3])];
    let others = [
        ("norm order", meaning_chain().norm(Norm::L1), &infos),
        (
            "norm stages",
            ClipPolicy::new(Rule::AutoClip(AutoClip::new(90.0, 4)))
                .then(Rule::PerTensor(PerTensorClip { max_norm: 3.0 })),
            &infos,
        ),
        (
            "norm stages",
            ClipPolicy::new(Rule::AutoClip(AutoClip::new(90.0, 4)))
                .then(Rule::PerTensor(PerTensorClip { max_norm: 2.0 }).except(["b"])),
            &infos,
        ),
        (
            "non-finite",
            meaning_chain().non_finite(NonFinitePolicy::ZeroNans),
            &infos,
        ),
        (
            "schedule",
            meaning_chain().schedule(Schedule::step_decay(0.5, 10)),
            &infos,
        ),
        (
            "noise",
            meaning_chain().noise(GaussianNoise {
                sigma: 0.1,
                seed: 1,
            }),
            &infos,
        ),
        (
            "value clamp",
            meaning_chain().value(ValueClip::symmetric(1.0)),
            &infos,
        ),
        ("tensors", meaning_chain(), &renamed),
        ("tensors", meaning_chain(), &reshaped),
    ];
    for (part, policy, infos) in others {
        for (cell, outcome) in restore_in_every_cell(&ctx, &policy, infos, &saved) {
            match outcome {
                Err(ClipError::InvalidState(m)) => assert!(m.contains(part), "{cell}, {part}: {m}"),
                other => panic!("{cell}, {part}: {other:?}"),
            }
        }
    }
    // A loss-scaled chain's state: taken by every cell of that chain, refused by the same
    // chain without loss scaling or with another scale rule.
    let scaled = || meaning_chain().loss_scale(LossScale::dynamic().growth(2.0, 3));
    let mut run = CpuClipper::new(scaled(), &infos).unwrap();
    run.step(&mut muts(&mut data), None).unwrap();
    let saved = PolicyState::from_bytes(&run.state().to_bytes()).unwrap();
    for (cell, outcome) in restore_in_every_cell(&ctx, &scaled(), &infos, &saved) {
        assert!(
            outcome.is_ok(),
            "{cell}: a loss-scaled state where it belongs: {outcome:?}"
        );
    }
    let others = [
        meaning_chain().non_finite(NonFinitePolicy::SkipStep),
        scaled().loss_scale(LossScale::dynamic().growth(2.0, 4)),
        scaled().loss_scale(LossScale::fixed(65536.0)),
    ];
    for policy in others {
        for (cell, outcome) in restore_in_every_cell(&ctx, &policy, &infos, &saved) {
            match outcome {
                Err(ClipError::InvalidState(m)) => {
                    assert!(m.contains("loss scaling"), "{cell}: {m}")
                }
                other => panic!("{cell}, loss scaling: {other:?}"),
            }
        }
    }
    // The chain's own state with a value out of its domain (a NaN, a negative norm in
    // AutoClip's history): refused by every cell, which keeps its own.
    for value in [f32::NAN, -1.0] {
        let bytes = with_word(&saved.to_bytes(), slot(0), value);
        let bad = PolicyState::from_bytes(&bytes).unwrap();
        for (cell, outcome) in restore_in_every_cell(&ctx, &scaled(), &infos, &bad) {
            assert!(
                matches!(outcome, Err(ClipError::InvalidState(_))),
                "{cell}, history {value}: {outcome:?}"
            );
        }
    }
}
