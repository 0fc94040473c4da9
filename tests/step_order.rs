//! Parameters recorded in the step: several steps encoded into one command encoder (one
//! submission) each run with their own parameters and noise keys, and a step whose
//! parameter slot was overwritten before submission changes nothing and says so.

mod common;

use common::{close, cpu_measure, download, gpu, gpu_policy, gpu_tensors, upload, Host};
use gradclip::{
    AutoClip, ClipError, ClipPolicy, ClipReport, CpuClipper, GaussianNoise, GpuClipper, Norm,
    PartialNorm, Rule, Schedule, TensorInfo, ValueClip, ZClip,
};

fn grads() -> Vec<Host> {
    vec![
        Host::F32(
            (0..257)
                .map(|i| ((i * 37 % 101) as f32 - 50.0) * 0.01)
                .collect(),
        ),
        Host::F32((0..64).map(|i| (i as f32 - 31.5) * 0.02).collect()),
    ]
}

fn infos(h: &[Host]) -> Vec<TensorInfo> {
    (h.iter().enumerate())
        .map(|(i, t)| TensorInfo::new(format!("t{i}"), &[t.as_ref().len() as u64]))
        .collect()
}

#[test]
fn global_norm_steps_in_one_encoder_keep_their_norm_order() {
    let ctx = gpu();
    let h = grads();
    let arena = upload(&ctx, &h);
    let cpu3 = cpu_measure(&h, Norm::p(3.0).unwrap(), false).partial;
    let cpu4 = cpu_measure(&h, Norm::p(4.0).unwrap(), false).partial;
    // norm(P(3)), then a clip by the P(4) norm at half of it, then norm(P(3)) again (the
    // same runner's next step): one submission.
    let measure = ClipPolicy::total_norm().norm(Norm::p(3.0).unwrap());
    let mut norm3 = gpu_policy(&ctx, &arena, &h, measure);
    let max_norm = (cpu4.total() / 2.0) as f32;
    let clip = ClipPolicy::global_norm(max_norm).norm(Norm::p(4.0).unwrap());
    let mut clip4 = gpu_policy(&ctx, &arena, &h, clip);
    let mut encoder = ctx.device().create_command_encoder(&Default::default());
    let n3 = norm3.encode(&mut encoder).unwrap();
    let c4 = clip4.encode(&mut encoder).unwrap();
    let after = norm3.encode(&mut encoder).unwrap();
    ctx.queue().submit([encoder.finish()]);
    let (n3, c4, after) = (
        n3.wait().unwrap(),
        c4.wait().unwrap(),
        after.wait().unwrap(),
    );
    assert!(
        close(n3.total_norm, cpu3.total(), 1e-6),
        "{} vs {}",
        n3.total_norm,
        cpu3.total()
    );
    assert!(
        close(c4.total_norm, cpu4.total(), 1e-6),
        "{} vs {}",
        c4.total_norm,
        cpu4.total()
    );
    assert!(
        (c4.clipped_units > 0) && close(c4.coef.unwrap() as f64, 0.5, 1e-5),
        "coef {}",
        c4.coef.unwrap()
    );
    // The last norm saw the clipped gradients: half the first.
    assert!(close(
        after.total_norm,
        cpu3.total() * c4.coef.unwrap() as f64,
        1e-5
    ));
}

/// Runs `steps` steps of `policy` on the CPU from `h`.
fn cpu_steps(policy: &ClipPolicy, h: &[Host], steps: usize) -> (Vec<Host>, Vec<ClipReport>) {
    let mut run = CpuClipper::new(policy.clone(), &infos(h)).unwrap();
    let mut h = h.to_vec();
    let reports = (0..steps)
        .map(|_| run.step(&mut common::muts(&mut h), None).unwrap())
        .collect();
    (h, reports)
}

#[test]
fn scheduled_noisy_steps_in_one_encoder_match_the_cpu_step_by_step() {
    let ctx = gpu();
    let h = grads();
    let policy = ClipPolicy::new(Rule::GlobalNorm(0.5))
        .schedule(Schedule::step_decay(0.5, 1))
        .noise(GaussianNoise {
            sigma: 1e-3,
            seed: 9,
        });
    let arena = upload(&ctx, &h);
    let tensors = gpu_tensors(&arena, &h, &infos(&h));
    let mut run = GpuClipper::new(&ctx, &tensors, None, policy.clone()).unwrap();
    let mut encoder = ctx.device().create_command_encoder(&Default::default());
    let pending: Vec<_> = (0..3).map(|_| run.encode(&mut encoder).unwrap()).collect();
    ctx.queue().submit([encoder.finish()]);
    let reports: Vec<ClipReport> = pending.into_iter().map(|p| p.wait().unwrap()).collect();
    let (want, cpu_reports) = cpu_steps(&policy, &h, 3);
    for (step, (g, c)) in reports.iter().zip(&cpu_reports).enumerate() {
        assert_eq!(g.step, step as u64);
        // Each step's own schedule factor: 0.5, 0.25, 0.125.
        assert_eq!(g.threshold, Some(0.5 * 0.5f32.powi(step as i32)));
        assert_eq!(g.threshold, c.threshold);
        assert!(close(g.total_norm, c.total_norm, 1e-5), "step {step}");
    }
    // Noise keyed by each step: the same gradients as three separate CPU steps (a step
    // that reused another's key would differ by a whole noise draw, ~1e-3).
    let got = download(&ctx, &arena, &h);
    for (a, b) in got.iter().zip(&want) {
        for (x, y) in a.to_f64().iter().zip(b.to_f64()) {
            assert!((x - y).abs() < 2e-6, "{x} vs {y}");
        }
    }
}

#[test]
fn an_overwritten_step_changes_nothing_and_says_so() {
    let ctx = gpu();
    let h = grads();
    // One adaptive stage, and two (the later one's finish and the earlier one's undo
    // check the slot too).
    let autoclip = ClipPolicy::new(Rule::AutoClip(AutoClip::new(50.0, 1000)));
    let chain = autoclip.clone().then(Rule::ZClip(ZClip::default()));
    for policy in [autoclip, chain] {
        // A schedule gives every step parameters of its own, so each takes a slot.
        let policy = policy.schedule(Schedule::step_decay(0.99, 1));
        let arena = upload(&ctx, &h);
        let tensors = gpu_tensors(&arena, &h, &infos(&h));
        let mut run = GpuClipper::new(&ctx, &tensors, None, policy).unwrap();
        // 65 steps before one submission: the 65th reuses the first step's slot.
        let mut encoder = ctx.device().create_command_encoder(&Default::default());
        let pending: Vec<_> = (0..65).map(|_| run.encode(&mut encoder).unwrap()).collect();
        ctx.queue().submit([encoder.finish()]);
        let results: Vec<_> = pending.into_iter().map(|p| p.wait()).collect();
        assert!(
            matches!(results[0], Err(ClipError::StepOverwritten(0))),
            "{:?}",
            results[0]
        );
        assert!(results[1..].iter().all(|r| r.is_ok()));
        // The overwritten step recorded no norm in any history.
        let seen = |run: &GpuClipper| -> Vec<u32> {
            let state = run.state().unwrap();
            state.adaptive().iter().map(|a| a.norms_seen).collect()
        };
        assert!(seen(&run).iter().all(|&n| n == 64), "{:?}", seen(&run));
        // The next submission is fine again.
        assert!(run.step().unwrap().wait().is_ok());
        assert!(seen(&run).iter().all(|&n| n == 65), "{:?}", seen(&run));
    }
}

/// Steps whose parameters do not change share their slot: more than 64 of them before one
/// submission all run, each recording its norm.
#[test]
fn steps_with_the_same_parameters_are_never_overwritten() {
    let ctx = gpu();
    let h = grads();
    let policy = ClipPolicy::new(Rule::AutoClip(AutoClip::new(50.0, 1000)));
    let arena = upload(&ctx, &h);
    let tensors = gpu_tensors(&arena, &h, &infos(&h));
    let mut run = GpuClipper::new(&ctx, &tensors, None, policy).unwrap();
    let mut encoder = ctx.device().create_command_encoder(&Default::default());
    let pending: Vec<_> = (0..130)
        .map(|_| run.encode(&mut encoder).unwrap())
        .collect();
    ctx.queue().submit([encoder.finish()]);
    for (step, p) in pending.into_iter().enumerate() {
        assert_eq!(p.wait().unwrap().step, step as u64);
    }
    assert_eq!(run.state().unwrap().adaptive()[0].norms_seen, 130);
}

/// A value clip alone has no report to say so: when its slot is overwritten before
/// submission it changes nothing (it never runs with another step's parameters).
#[test]
fn an_overwritten_value_clip_changes_nothing() {
    let ctx = gpu();
    let h = vec![Host::F32(vec![10.0; 300]), Host::F32(vec![-10.0; 7])];
    let arena = upload(&ctx, &h);
    // A runner's bounds are fixed with its chain, so the value clip is one runner (bounds
    // 2) and the norms another, over the same tensors.
    // Scheduled, so that every clamp step has parameters of its own (a slot each).
    let mut clamp = gpu_policy(
        &ctx,
        &arena,
        &h,
        ClipPolicy::value_clip(ValueClip::symmetric(2.0)).schedule(Schedule::step_decay(0.99, 1)),
    );
    let mut measure = gpu_policy(&ctx, &arena, &h, ClipPolicy::total_norm().norm(Norm::L2));
    let mut encoder = ctx.device().create_command_encoder(&Default::default());
    // Clamp step 0; then 63 norms; then clamp steps 1..=64, step 64 in step 0's slot.
    let first = clamp.encode(&mut encoder).unwrap();
    let norms: Vec<_> = (1..64)
        .map(|_| measure.encode(&mut encoder).unwrap())
        .collect();
    let later: Vec<_> = (1..=64)
        .map(|_| clamp.encode(&mut encoder).unwrap())
        .collect();
    ctx.queue().submit([encoder.finish()]);
    // A clamp alone measures no norm: its reports are ready at once, NaN norms.
    for r in std::iter::once(first).chain(later) {
        let r = r.wait().unwrap();
        assert!(r.total_norm.is_nan() && r.clipped_units == 0, "{r:?}");
    }
    // Had step 0 run (with any step's parameters), the norms would be of 2s, not 10s.
    let want = 10.0 * 307f64.sqrt();
    for (i, p) in norms.into_iter().enumerate() {
        let n = p.wait().unwrap().total_norm;
        assert!(close(n, want, 1e-6), "step {}: {n} vs {want}", i + 1);
    }
    let out = download(&ctx, &arena, &h);
    assert_eq!(
        out,
        vec![Host::F32(vec![2.0; 300]), Host::F32(vec![-2.0; 7])]
    );
}

/// Every configuration writes GPU timestamps around its compute pass when asked.
#[test]
fn every_configuration_writes_timestamps() {
    let ctx = gpu();
    if !ctx
        .device()
        .features()
        .contains(wgpu::Features::TIMESTAMP_QUERY)
    {
        // The adapter cannot time passes; lavapipe (CI) can, so this branch is not CI's.
        assert!(
            std::env::var_os("CI").is_none(),
            "CI's adapter must support timestamps"
        );
        return;
    }
    let h = grads();
    let arena = upload(&ctx, &h);
    let sums = upload(&ctx, &h);
    let t = gpu_tensors(&arena, &h, &infos(&h));
    let s = gpu_tensors(&sums, &h, &infos(&h));
    let examples = vec![Host::F32(vec![0.5; 64])];
    let ex_in = upload(&ctx, &examples);
    let ex_out = upload(&ctx, &[Host::F32(vec![0.0; 16])]);
    let ex_in_t = gpu_tensors(&ex_in, &examples, &infos(&examples));
    let ex_out_t = gpu_tensors(&ex_out, &[Host::F32(vec![0.0; 16])], &infos(&examples));
    let policy = ClipPolicy::new(Rule::GlobalNorm(0.5));
    let mut norm_only = gpu_policy(&ctx, &arena, &h, ClipPolicy::total_norm());
    let mut with_norm = gpu_policy(&ctx, &arena, &h, ClipPolicy::global_norm(0.5));
    let given = PartialNorm::from_total(Norm::L2, 2.0).unwrap();
    let mut value = gpu_policy(
        &ctx,
        &arena,
        &h,
        ClipPolicy::value_clip(ValueClip::symmetric(1.0)),
    );
    let mut chain = GpuClipper::new(&ctx, &t, None, policy.clone()).unwrap();
    let mut acc = gradclip::GpuClipper::accumulating(&ctx, &t, &s, None, 2, policy).unwrap();
    let per_example = gradclip::PerExampleClip::new(4, 1.0);
    let mut dp = gradclip::GpuClipper::per_example(&ctx, &ex_in_t, &ex_out_t, per_example).unwrap();
    let query_set = || {
        ctx.device().create_query_set(&wgpu::QuerySetDescriptor {
            label: None,
            ty: wgpu::QueryType::Timestamp,
            count: 2,
        })
    };
    type Encode<'a> = Box<dyn FnMut(wgpu::QuerySet, &mut wgpu::CommandEncoder) + 'a>;
    let configurations: Vec<(&str, Encode<'_>)> = vec![
        // What GpuBatch's global clip, total norm, clip with a given norm and value clip
        // were: GpuClipper steps of their chains.
        (
            "GpuClipper total_norm",
            Box::new(|q, e| {
                norm_only.set_timestamp_writes(Some((q, 0, 1)));
                drop(norm_only.encode(e).unwrap());
            }),
        ),
        (
            "GpuClipper encode_with_norm",
            Box::new(|q, e| {
                with_norm.set_timestamp_writes(Some((q, 0, 1)));
                drop(with_norm.encode_with_norm(e, &given).unwrap());
            }),
        ),
        (
            "GpuClipper value_clip",
            Box::new(|q, e| {
                value.set_timestamp_writes(Some((q, 0, 1)));
                drop(value.encode(e).unwrap());
            }),
        ),
        (
            "GpuClipper",
            Box::new(|q, e| {
                chain.set_timestamp_writes(Some((q, 0, 1)));
                drop(chain.encode(e).unwrap());
            }),
        ),
        (
            "GpuClipper<Accumulate>",
            Box::new(|q, e| {
                acc.set_timestamp_writes(Some((q, 0, 1)));
                assert!(acc.encode(e).unwrap().is_none());
            }),
        ),
        (
            "GpuClipper<PerExample>",
            Box::new(|q, e| {
                dp.set_timestamp_writes(Some((q, 0, 1)));
                drop(dp.encode(e).unwrap());
            }),
        ),
    ];
    for (name, mut encode) in configurations {
        let q = query_set();
        let resolved = ctx.device().create_buffer(&wgpu::BufferDescriptor {
            label: None,
            size: 16,
            usage: wgpu::BufferUsages::QUERY_RESOLVE | wgpu::BufferUsages::COPY_SRC,
            mapped_at_creation: false,
        });
        let mut encoder = ctx.device().create_command_encoder(&Default::default());
        encode(q.clone(), &mut encoder);
        encoder.resolve_query_set(&q, 0..2, &resolved, 0);
        ctx.queue().submit([encoder.finish()]);
        let words: Vec<u64> =
            bytemuck::pod_collect_to_vec(&common::read_bytes(&ctx, &resolved, 16));
        assert!(words[0] > 0 && words[1] >= words[0], "{name}: {words:?}");
    }
}
