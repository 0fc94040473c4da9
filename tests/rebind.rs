//! `GpuClipper::rebind`: the plan moves to new buffer ranges of the same tensors (a memory
//! pool relocated them) and the adaptive state and step count carry over, step for step
//! as on the CPU.

mod common;
use common::*;
use gradclip::*;

fn tensors<'a>(
    buffer: &'a wgpu::Buffer,
    offsets: &[u64],
    h: &[Host],
    infos: &[TensorInfo],
) -> Vec<GpuTensor<'a>> {
    h.iter()
        .zip(offsets)
        .zip(infos)
        .map(|((t, &o), info)| {
            GpuTensor::new(buffer, o, t.as_ref().len() as u64, t.as_ref().dtype())
                .named(info.name.clone())
                .shaped(&info.shape)
        })
        .collect()
}

#[test]
fn a_rebound_policy_keeps_its_state_as_the_cpu_does() {
    let ctx = gpu();
    let base = vec![
        host(0, (0..37).map(|i| (i as f32 * 0.37).sin()).collect()),
        host(2, (0..11).map(|i| (i as f32 - 5.0) * 0.25).collect()),
        host(0, vec![3.0, -4.0, 0.5]),
    ];
    let infos: Vec<TensorInfo> = ["enc.weight", "enc.bias", "head.weight"]
        .iter()
        .zip(&base)
        .map(|(n, t)| TensorInfo::new(*n, &[t.as_ref().len() as u64]))
        .collect();
    let policy = ClipPolicy::new(Rule::AutoClip(AutoClip::new(50.0, 4)));
    let mut cpu = CpuClipper::new(policy.clone(), &infos).unwrap();
    // Two places for the same tensors: packed, and after a 3-element pad.
    let pad = host(0, vec![0.0; 3]);
    let padded: Vec<Host> = std::iter::once(pad).chain(base.clone()).collect();
    let (a, b) = (upload(&ctx, &base), upload(&ctx, &padded));
    let mut gpu = GpuClipper::new(
        &ctx,
        &tensors(&a.buffer, &a.offsets, &base, &infos),
        None,
        policy,
    )
    .unwrap();
    for step in 0..8usize {
        let k = [1.0f32, 5.0, 0.2, 9.0, 1.0, 30.0, 0.5, 2.0][step];
        let mut h: Vec<Host> = base
            .iter()
            .map(|t| {
                host(
                    if matches!(t, Host::F32(_)) { 0 } else { 2 },
                    t.to_f64().iter().map(|&v| v as f32 * k).collect(),
                )
            })
            .collect();
        let (arena, skip) = if step % 2 == 0 { (&a, 0) } else { (&b, 1) };
        let mut placed: Vec<Host> = if skip == 1 {
            std::iter::once(host(0, vec![0.0; 3]))
                .chain(h.clone())
                .collect()
        } else {
            h.clone()
        };
        write(&ctx, arena, &placed);
        if step > 0 {
            gpu.rebind(
                &tensors(&arena.buffer, &arena.offsets[skip..], &h, &infos),
                None,
            )
            .unwrap();
        }
        let got = gpu.step().unwrap().wait().unwrap();
        let want = cpu.step(&mut muts(&mut h), None).unwrap();
        assert_eq!(
            (got.step, got.clipped_units),
            (want.step, want.clipped_units)
        );
        assert!(
            close(got.total_norm, want.total_norm, 1e-6),
            "{} vs {}",
            got.total_norm,
            want.total_norm
        );
        let (tg, tw) = (
            got.threshold.unwrap() as f64,
            want.threshold.unwrap() as f64,
        );
        assert!(close(tg, tw, 1e-6), "step {step}: threshold {tg} vs {tw}");
        placed = download(&ctx, arena, &placed);
        for (g, w) in placed[skip..].iter().zip(&h) {
            for (x, y) in g.to_f64().iter().zip(w.to_f64()) {
                assert!(close(*x, y, 1e-6), "step {step}: {x} vs {y}");
            }
        }
    }
    assert_eq!(gpu.steps_taken(), 8);
}

#[test]
fn rebinding_other_tensors_is_refused_and_changes_nothing() {
    let ctx = gpu();
    let h = vec![host(0, vec![3.0, 4.0]), host(0, vec![1.0; 5])];
    let infos = [TensorInfo::new("a", &[2]), TensorInfo::new("b", &[5])];
    let arena = upload(&ctx, &h);
    let policy = ClipPolicy::new(Rule::GlobalNorm(1.0));
    let mut gpu = GpuClipper::new(
        &ctx,
        &tensors(&arena.buffer, &arena.offsets, &h, &infos),
        None,
        policy,
    )
    .unwrap();
    let shorter = vec![host(0, vec![3.0, 4.0]), host(0, vec![1.0; 4])];
    let err = gpu
        .rebind(
            &tensors(&arena.buffer, &arena.offsets, &shorter, &infos),
            None,
        )
        .unwrap_err();
    assert!(
        matches!(&err, ClipError::ShapeMismatch { tensor, .. } if tensor == "b"),
        "{err}"
    );
    let renamed = [TensorInfo::new("a", &[2]), TensorInfo::new("c", &[5])];
    let err = gpu
        .rebind(&tensors(&arena.buffer, &arena.offsets, &h, &renamed), None)
        .unwrap_err();
    assert!(matches!(err, ClipError::ShapeMismatch { .. }), "{err}");
    let err = gpu
        .rebind(
            &tensors(&arena.buffer, &arena.offsets[..1], &h[..1], &infos),
            None,
        )
        .unwrap_err();
    assert!(matches!(err, ClipError::ShapeMismatch { .. }), "{err}");
    assert_eq!(gpu.steps_taken(), 0);
    // The same ranges again: nothing to do, and the next step as before.
    gpu.rebind(&tensors(&arena.buffer, &arena.offsets, &h, &infos), None)
        .unwrap();
    let report = gpu.step().unwrap().wait().unwrap();
    assert!(close(report.total_norm, 30f64.sqrt(), 1e-6));
    let out = download(&ctx, &arena, &h);
    assert!(close(out[0].to_f64()[0], 3.0 / 30f64.sqrt(), 1e-6));
}

/// A sharded rank moves too: two ranks (threads) each hold whole tensors, alternate
/// between two places for them, and clip step for step as one CPU process, AutoClip's
/// history carried across the moves.
#[test]
fn a_rebound_sharded_rank_keeps_its_state_as_one_cpu_process() {
    let ctx = gpu();
    let base = [
        (0..37)
            .map(|i| (i as f32 * 0.37).sin())
            .collect::<Vec<f32>>(),
        (0..11).map(|i| (i as f32 - 5.0) * 0.25).collect(),
        vec![3.0, -4.0, 0.5],
    ];
    let infos: Vec<TensorInfo> = ["enc.weight", "enc.bias", "head.weight"]
        .iter()
        .zip(&base)
        .map(|(n, t)| TensorInfo::new(*n, &[t.len() as u64]))
        .collect();
    let policy = ClipPolicy::new(Rule::AutoClip(AutoClip::new(50.0, 4)));
    let scales = [1.0f32, 5.0, 0.2, 9.0, 1.0, 30.0];
    let at = |step: usize| -> Vec<Vec<f32>> {
        (base.iter())
            .map(|t| t.iter().map(|v| v * scales[step]).collect())
            .collect()
    };
    let mut cpu = CpuClipper::new(policy.clone(), &infos).unwrap();
    let want: Vec<(ClipReport, Vec<Vec<f32>>)> = (0..scales.len())
        .map(|step| {
            let mut h: Vec<Host> = at(step).into_iter().map(|v| host(0, v)).collect();
            let report = cpu.step(&mut muts(&mut h), None).unwrap();
            (
                report,
                h.iter()
                    .map(|t| t.to_f64().iter().map(|&v| v as f32).collect())
                    .collect(),
            )
        })
        .collect();
    let comms = ThreadCollective::group(2);
    std::thread::scope(|s| {
        for comm in comms {
            let (ctx, infos, policy, want) = (&*ctx, &infos, &policy, &want);
            s.spawn(move || {
                let rank = comm.rank();
                let shard = Shard::whole_tensors(infos, |t, _| t % 2 == rank);
                // This rank's tensors (empty where another rank holds them), packed, or
                // after a 3-element pad.
                let local = |step: usize, pad: bool| -> Vec<Host> {
                    let mine = (at(step).into_iter().enumerate())
                        .map(|(t, v)| host(0, if shard.local_len(t) > 0 { v } else { vec![] }));
                    let pad = pad.then(|| host(0, vec![0.0; 3]));
                    pad.into_iter().chain(mine).collect()
                };
                let arenas = [upload(ctx, &local(0, false)), upload(ctx, &local(0, true))];

                let first = local(0, false);
                let mut gpu = GpuClipper::sharded(
                    ctx,
                    &tensors(&arenas[0].buffer, &arenas[0].offsets, &first, infos),
                    None,
                    policy.clone(),
                    infos,
                    shard.clone(),
                    &comm,
                )
                .unwrap();
                for (step, (want, clipped)) in want.iter().enumerate() {
                    let pad = step % 2;
                    let h = local(step, pad == 1);
                    write(ctx, &arenas[pad], &h);
                    gpu.rebind(
                        &tensors(
                            &arenas[pad].buffer,
                            &arenas[pad].offsets[pad..],
                            &h[pad..],
                            infos,
                        ),
                        None,
                    )
                    .unwrap();
                    let got = gpu.step().unwrap();
                    assert_eq!(
                        (got.step, got.clipped_units),
                        (want.step, want.clipped_units)
                    );
                    assert!(close(got.total_norm, want.total_norm, 1e-6), "step {step}");
                    let out = download(ctx, &arenas[pad], &h);
                    for (t, g) in out[pad..].iter().enumerate() {
                        if shard.local_len(t) > 0 {
                            for (x, y) in g.to_f64().iter().zip(&clipped[t]) {
                                assert!(
                                    close(*x, *y as f64, 1e-6),
                                    "rank {rank} step {step}: {x} vs {y}"
                                );
                            }
                        }
                    }
                }
                assert_eq!(gpu.steps_taken(), scales.len() as u64);
            });
        }
    });
}

/// `h` written into `buffer` at byte `shift`, as an arena of its own offsets.
fn placed(ctx: &GpuContext, buffer: &wgpu::Buffer, shift: u64, h: &[Host]) -> Arena {
    let (offsets, bytes) = packed(h);
    ctx.queue().write_buffer(buffer, shift, &bytes);
    Arena {
        buffer: buffer.clone(),
        offsets: offsets.iter().map(|o| o + shift).collect(),
        size: buffer.size(),
    }
}

fn big_buffer(ctx: &GpuContext, size: u64) -> wgpu::Buffer {
    ctx.device().create_buffer(&wgpu::BufferDescriptor {
        label: Some("test pool"),
        size,
        usage: wgpu::BufferUsages::STORAGE
            | wgpu::BufferUsages::COPY_DST
            | wgpu::BufferUsages::COPY_SRC,
        mapped_at_creation: false,
    })
}

/// A pool's moves within one buffer (Burn's, every step), and between two: f32, bf16 and
/// f16 tensors at other offsets each step, AutoClip's history carried, step for step as
/// on the CPU, with one coefficient and with one per tensor, every other step recorded
/// into the caller's encoder; every step's output read where it was placed.
#[test]
fn moves_within_one_buffer_keep_the_state_as_the_cpu_does() {
    let ctx = gpu();
    let base = vec![
        host(0, (0..37).map(|i| (i as f32 * 0.37).sin()).collect()),
        host(2, (0..11).map(|i| (i as f32 - 5.0) * 0.25).collect()),
        host(1, (0..5).map(|i| i as f32 * 0.5 - 1.0).collect()),
        host(0, vec![3.0, -4.0, 0.5]),
    ];
    let infos: Vec<TensorInfo> = ["enc.weight", "enc.bias", "norm.gain", "head.weight"]
        .iter()
        .zip(&base)
        .map(|(n, t)| TensorInfo::new(*n, &[t.as_ref().len() as u64]))
        .collect();
    // One coefficient (the reduce and rewrite over spans), the same reading each unit's
    // norm back (the per-unit reduce too), and per-unit coefficients.
    let autoclip = ClipPolicy::new(Rule::AutoClip(AutoClip::new(50.0, 4)));
    let per_unit = autoclip
        .clone()
        .then(Rule::PerTensor(PerTensorClip { max_norm: 0.4 }));
    let detailed = autoclip.clone().with_group_report();
    for policy in [autoclip, detailed, per_unit] {
        for buffers in [1, 2] {
            moves_between_buffers(&ctx, &base, &infos, policy.clone(), buffers);
        }
    }
}

/// Steps of `policy` over tensors moved each step within `n_buffers` buffers (taking
/// turns), against the CPU.
fn moves_between_buffers(
    ctx: &GpuContext,
    base: &[Host],
    infos: &[TensorInfo],
    policy: ClipPolicy,
    n_buffers: usize,
) {
    let ctx = ctx.clone();
    let mut cpu = CpuClipper::new(policy.clone(), infos).unwrap();
    // Of different sizes: the binding windows differ, the chunks do not.
    let buffers: Vec<wgpu::Buffer> = (0..n_buffers as u64)
        .map(|k| big_buffer(&ctx, 1024 * (k + 1)))
        .collect();
    let shifts = [0u64, 12, 4, 40, 12, 0, 28, 8];
    let scales = [1.0f32, 5.0, 0.2, 9.0, 1.0, 30.0, 0.5, 2.0];
    let scaled = |k: f32| -> Vec<Host> {
        (base.iter())
            .map(|t| {
                let v = t.to_f64().iter().map(|&v| v as f32 * k).collect();
                host(
                    match t {
                        Host::F32(_) => 0,
                        Host::F16(_) => 1,
                        _ => 2,
                    },
                    v,
                )
            })
            .collect()
    };
    let first = placed(&ctx, &buffers[0], shifts[0], &scaled(scales[0]));
    let mut gpu = GpuClipper::new(
        &ctx,
        &tensors(&first.buffer, &first.offsets, base, infos),
        None,
        policy,
    )
    .unwrap();
    for (step, (&shift, &k)) in shifts.iter().zip(&scales).enumerate() {
        let mut h = scaled(k);
        let arena = placed(&ctx, &buffers[step % n_buffers], shift, &h);
        gpu.rebind(&tensors(&arena.buffer, &arena.offsets, &h, infos), None)
            .unwrap();
        let got = if step % 2 == 0 {
            gpu.step().unwrap().wait().unwrap()
        } else {
            let mut encoder = ctx.device().create_command_encoder(&Default::default());
            let report = gpu.encode(&mut encoder).unwrap();
            ctx.queue().submit([encoder.finish()]);
            report.wait().unwrap()
        };
        let want = cpu.step(&mut muts(&mut h), None).unwrap();
        assert_eq!(
            (got.step, got.clipped_units),
            (want.step, want.clipped_units)
        );
        assert!(close(got.total_norm, want.total_norm, 1e-6), "step {step}");
        for (g, w) in download(&ctx, &arena, &h).iter().zip(&h) {
            for (x, y) in g.to_f64().iter().zip(w.to_f64()) {
                assert!(close(*x, y, 1e-6), "step {step}: {x} vs {y}");
            }
        }
    }
}

/// A step recorded into the caller's encoder before a move, and one after, submitted
/// together: each clips the data where it lay when it was recorded.
#[test]
fn a_step_recorded_before_a_move_keeps_its_ranges() {
    let ctx = gpu();
    let infos = [TensorInfo::new("a", &[4]), TensorInfo::new("b", &[3])];
    let first = vec![host(0, vec![3.0, 4.0, 0.0, 0.0]), host(0, vec![0.0; 3])];
    let second = vec![host(0, vec![0.0; 4]), host(0, vec![6.0, 0.0, 8.0])];
    let buffer = big_buffer(&ctx, 1024);
    let a = placed(&ctx, &buffer, 0, &first);
    let b = placed(&ctx, &buffer, 512, &second);
    let mut gpu = GpuClipper::new(
        &ctx,
        &tensors(&a.buffer, &a.offsets, &first, &infos),
        None,
        ClipPolicy::global_norm(1.0),
    )
    .unwrap();
    let mut encoder = ctx.device().create_command_encoder(&Default::default());
    let ra = gpu.encode(&mut encoder).unwrap();
    gpu.rebind(&tensors(&b.buffer, &b.offsets, &second, &infos), None)
        .unwrap();
    let rb = gpu.encode(&mut encoder).unwrap();
    ctx.queue().submit([encoder.finish()]);
    let (ra, rb) = (ra.wait().unwrap(), rb.wait().unwrap());
    assert!(close(ra.total_norm, 5.0, 1e-6), "{}", ra.total_norm);
    assert!(close(rb.total_norm, 10.0, 1e-6), "{}", rb.total_norm);
    let got_a = download(&ctx, &a, &first);
    let got_b = download(&ctx, &b, &second);
    assert!(
        close(got_a[0].to_f64()[0], 0.6, 1e-6),
        "{:?}",
        got_a[0].to_f64()
    );
    assert!(
        close(got_b[1].to_f64()[2], 0.8, 1e-6),
        "{:?}",
        got_b[1].to_f64()
    );
}
