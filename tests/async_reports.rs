//! Pending reports are futures: several steps in flight, awaited in any order, each equal
//! to the CPU oracle's report of the same step.

mod common;

use common::{close, gpu, gpu_policy, host, unnamed, upload, write, Host};
use gradclip::{ClipError, ClipPolicy, ClipReport, CpuClipper, GpuClipper, GradMut};

/// Three steps of a global clip at max norm 1: a large batch (clips), the same batch
/// after clipping (does not), then new gradients written between the steps.
fn steps() -> [Vec<Host>; 2] {
    let a: Vec<f32> = (0..1031)
        .map(|i| ((i * 37 % 101) as f32 - 50.0) * 0.1)
        .collect();
    let b: Vec<f32> = (0..17).map(|i| (i as f32 - 8.0) * 1e-3).collect();
    let first = vec![host(0, a.clone()), host(1, b.clone())];
    let third = vec![
        host(0, a.iter().map(|x| x * 1e-4).collect()),
        host(1, b.iter().map(|x| x * 3.0).collect()),
    ];
    [first, third]
}

/// The oracle's reports of the same three steps (one runner: steps 0, 1, 2).
fn cpu_reports(clip: &ClipPolicy) -> Vec<ClipReport> {
    let [mut g, mut third] = steps();
    let mut run = CpuClipper::new(clip.clone(), &unnamed(&g)).unwrap();
    let mut step = |g: &mut [Host]| {
        let mut m: Vec<GradMut<'_>> = g.iter_mut().map(|t| t.as_mut()).collect();
        run.step(&mut m, None).unwrap()
    };
    vec![step(&mut g), step(&mut g), step(&mut third)]
}

fn assert_same(gpu: &ClipReport, cpu: &ClipReport, step: usize) {
    assert_eq!(
        gpu.step, cpu.step,
        "step {step}: both runners number their steps"
    );
    assert!(
        close(gpu.total_norm, cpu.total_norm, 1e-6),
        "step {step}: norm {} against {}",
        gpu.total_norm,
        cpu.total_norm
    );
    assert!(
        close(gpu.coef.unwrap() as f64, cpu.coef.unwrap() as f64, 1e-6),
        "step {step}: coef {} against {}",
        gpu.coef.unwrap(),
        cpu.coef.unwrap()
    );
    assert_eq!(
        (gpu.clipped_units > 0),
        (cpu.clipped_units > 0),
        "step {step}"
    );
}

#[test]
fn reports_of_steps_in_flight_are_awaited_in_any_order() {
    let ctx = gpu();
    let [first, third] = steps();
    let arena = upload(&ctx, &first);
    let clip = ClipPolicy::global_norm(1.0);
    let mut batch: GpuClipper = gpu_policy(&ctx, &arena, &first, clip.clone());

    let mut pending = Vec::new();
    for k in 0..3 {
        if k == 2 {
            // Queued before the third step's commands, so that step reads it.
            write(&ctx, &arena, &third);
        }
        let mut encoder = ctx.device().create_command_encoder(&Default::default());
        pending.push(batch.encode(&mut encoder).unwrap());
        ctx.queue().submit([encoder.finish()]);
    }
    let [p0, p1, p2]: [_; 3] = pending.try_into().unwrap();
    // Last step first: each future resolves on its own mapping, whatever the order.
    let (r2, r0, r1) = pollster::block_on(async {
        let r2 = p2.await.unwrap();
        let r0 = p0.await.unwrap();
        let r1 = p1.await.unwrap();
        (r2, r0, r1)
    });

    let cpu = cpu_reports(&clip);
    for (k, r) in [r0, r1, r2].iter().enumerate() {
        assert_same(r, &cpu[k], k);
    }
    // The first step clips, the third does not (the second sits at the threshold).
    assert!(cpu[0].clipped_units > 0 && cpu[2].clipped_units == 0);
}

#[test]
fn awaiting_and_waiting_give_the_same_report() {
    let ctx = gpu();
    let [first, _] = steps();
    let clip = ClipPolicy::global_norm(1.0).with_group_report();
    let mut reports = Vec::new();
    for awaited in [false, true] {
        let arena = upload(&ctx, &first);
        let mut batch = gpu_policy(&ctx, &arena, &first, clip.clone());
        let mut encoder = ctx.device().create_command_encoder(&Default::default());
        let p = batch.encode(&mut encoder).unwrap();
        ctx.queue().submit([encoder.finish()]);
        reports.push(if awaited {
            pollster::block_on(p).unwrap()
        } else {
            p.wait().unwrap()
        });
    }
    assert_eq!(reports[0], reports[1]);
    assert_same(&reports[1], &cpu_reports(&clip)[0], 0);
}

#[test]
fn a_step_never_submitted_resolves_to_an_error() {
    let ctx = gpu();
    let [first, _] = steps();
    let arena = upload(&ctx, &first);
    let mut batch = gpu_policy(&ctx, &arena, &first, ClipPolicy::global_norm(1.0));
    let mut encoder = ctx.device().create_command_encoder(&Default::default());
    let p = batch.encode(&mut encoder).unwrap();
    drop(encoder);
    match pollster::block_on(p) {
        Err(ClipError::Readback(msg)) => assert!(msg.contains("never submitted"), "{msg}"),
        other => panic!("expected a readback error, got {other:?}"),
    }
}
