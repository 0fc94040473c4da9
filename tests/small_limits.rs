//! Tensors larger than the device's storage-binding size and dispatches wider than its
//! per-dimension workgroup limit, exercised with a device that asks for small limits.

mod common;
use common::*;
use gradclip::*;

/// A device of the test backends with small limits, held like [`gpu`]'s.
fn small_device() -> (Gpu, GpuContext) {
    let turn = gpu();
    let ctx = GpuContext::with_limits(backends(), |adapter| wgpu::Limits {
        max_storage_buffer_binding_size: 2 << 20,
        max_compute_workgroups_per_dimension: 5,
        ..adapter.clone()
    })
    .expect("a device with small limits");
    (turn, ctx)
}

#[test]
fn windows_and_folded_grids_match_the_oracle() {
    let (_turn, ctx) = small_device();
    assert_eq!(
        ctx.device().limits().max_storage_buffer_binding_size,
        2 << 20
    );
    let f = |n: usize, k: f32| {
        (0..n)
            .map(|i| ((i as f32) * k).sin() * 2.0)
            .collect::<Vec<f32>>()
    };
    // 1_200_001 f32 = 4.8 MB, three 2 MiB windows of 8 chunks; a 16-bit window holds 16
    // chunks: grids of more than 5 workgroups fold into 2-D.
    let h = vec![
        Host::F32(f(1_200_001, 0.1)),
        Host::F32(vec![]),
        Host::F32(f(1, 0.3)),
        Host::BF16(f(800_003, 0.7).into_iter().map(bf16::from_f32).collect()),
        Host::BF16(f(5, 0.9).into_iter().map(bf16::from_f32).collect()),
        Host::F16(f(524_289, 0.2).into_iter().map(f16::from_f32).collect()),
        Host::F32(f(262_145, 0.5)),
    ];
    let arena = upload(&ctx, &h);
    for norm in [Norm::L2, Norm::Inf, Norm::P(2.5)] {
        let measure = ClipPolicy::total_norm().norm(norm).with_group_report();
        let g = gpu_policy(&ctx, &arena, &h, measure.clone())
            .step()
            .unwrap()
            .wait()
            .unwrap();
        let c = cpu_policy(measure, &h)
            .step_deferred(&refs(&h), None)
            .unwrap()
            .report;
        assert!(close(g.total_norm, c.partial.total(), 1e-5));
        for (gt, ct) in common::norms_of(&g).iter().zip(&common::norms_of(&c)) {
            assert!(close(*gt, *ct, 1e-5), "{norm:?}: {gt} vs {ct}");
        }
    }
    let clip = ClipPolicy::global_norm(10.0);
    let mut cd = h.clone();
    cpu_policy(clip.clone(), &h)
        .step(&mut muts(&mut cd), None)
        .unwrap();
    assert!(
        gpu_policy(&ctx, &arena, &h, clip)
            .step()
            .unwrap()
            .wait()
            .unwrap()
            .clipped_units
            > 0
    );
    let gd = download(&ctx, &arena, &h);
    for (g, c) in gd.iter().zip(&cd) {
        for (gv, cv) in g.to_f64().iter().zip(c.to_f64()) {
            assert!(close(*gv, cv, 8e-3), "{gv} vs {cv}");
        }
    }
    let value = ClipPolicy::value_clip(ValueClip::symmetric(0.01));
    let mut cpu_value = cpu_policy(value.clone(), &h);
    cpu_value.step(&mut muts(&mut cd), None).unwrap();
    let mut gd2 = gd.clone();
    cpu_value.step(&mut muts(&mut gd2), None).unwrap();
    gpu_policy(&ctx, &arena, &h, value)
        .step()
        .unwrap()
        .wait()
        .unwrap();
    assert_eq!(download(&ctx, &arena, &h), gd2);
}

/// A fused optimizer over tensors wider than a binding window: rows cut at the gradient
/// and the parameter windows (a 16-bit gradient window holds twice the elements of an f32
/// parameter window), several dispatches per tensor, and the state read back and restored
/// piece by piece.
#[test]
fn optimizer_steps_across_windows_match_the_oracle() {
    let (_turn, ctx) = small_device();
    let f = |n: usize, k: f32| (0..n).map(|i| ((i as f32) * k).sin()).collect::<Vec<f32>>();
    let grads = vec![
        Host::BF16(f(900_001, 0.3).into_iter().map(bf16::from_f32).collect()),
        Host::F32(f(3, 0.5)),
        Host::F32(f(700_001, 0.7)),
    ];
    let params: Vec<Host> = grads
        .iter()
        .map(|g| Host::F32(f(g.as_ref().len(), 0.11)))
        .collect();
    let infos: Vec<TensorInfo> = (grads.iter().enumerate())
        .map(|(i, g)| TensorInfo::new(format!("t{i}"), &[g.as_ref().len() as u64]))
        .collect();
    let g_arena = upload(&ctx, &grads);
    let p_arena = upload(&ctx, &params);
    let gt = gpu_tensors(&g_arena, &grads, &infos);
    let pt = gpu_tensors(&p_arena, &params, &infos);
    let policy = ClipPolicy::new(Rule::GlobalNorm(1.0));
    let opt = Adam::adamw(1e-2).amsgrad();
    let mut gpu_opt = GpuClipper::with_optimizer(&ctx, &gt, &pt, policy.clone(), opt).unwrap();
    let mut cpu_opt = CpuClipper::with_optimizer(policy, &infos, opt).unwrap();
    let mut host: Vec<Vec<f32>> = (params.iter())
        .map(|p| p.to_f64().into_iter().map(|x| x as f32).collect())
        .collect();
    for _ in 0..2 {
        gpu_opt.step().unwrap().wait().unwrap();
        let mut p: Vec<&mut [f32]> = host.iter_mut().map(|p| &mut p[..]).collect();
        cpu_opt.step(&refs(&grads), &mut p).unwrap();
    }
    let got = download(&ctx, &p_arena, &params);
    for (g, c) in got.iter().zip(&host) {
        for (a, b) in g.to_f64().iter().zip(c) {
            assert!(
                close(*a, *b as f64, 1e-5) || (a - *b as f64).abs() < 1e-6,
                "{a} vs {b}"
            );
        }
    }
    // The state comes back piece by piece, and goes back the same way.
    let state = gpu_opt.state().unwrap();
    assert_eq!(state.steps, 2);
    for (ga, ca) in state.arrays.iter().zip(&cpu_opt.state().arrays) {
        for (g, c) in ga.iter().flatten().zip(ca.iter().flatten()) {
            assert!(
                close(*g as f64, *c as f64, 1e-4) || (g - c).abs() < 1e-9,
                "{g} vs {c}"
            );
        }
    }
    gpu_opt.set_state(cpu_opt.state()).unwrap();
    assert_eq!(&gpu_opt.state().unwrap(), cpu_opt.state());
}
