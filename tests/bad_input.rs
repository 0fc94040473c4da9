//! Every bad input returns its typed error and leaves the gradients byte-identical.

mod common;
use common::*;
use gradclip::*;

fn arena_f32(ctx: &GpuContext, n: usize) -> (Vec<Host>, Arena) {
    let h = vec![Host::F32((0..n).map(|i| i as f32 + 0.5).collect())];
    let arena = upload(ctx, &h);
    (h, arena)
}

fn unchanged(ctx: &GpuContext, arena: &Arena, h: &[Host]) {
    assert_eq!(download(ctx, arena, h), h, "gradients were modified");
}

/// A runner of `policy` on the GPU over the arena's tensors, and on the CPU over `h`:
/// both errors, since a policy is validated when its runner is built.
fn both_refuse(
    ctx: &GpuContext,
    arena: &Arena,
    h: &[Host],
    policy: ClipPolicy,
    want: fn(&ClipError) -> bool,
) {
    let g = GpuClipper::new(ctx, &tensors(arena, h), None, policy.clone()).unwrap_err();
    assert!(want(&g), "GPU: {g}");
    let c = CpuClipper::new(policy, &unnamed(h)).unwrap_err();
    assert!(want(&c), "CPU: {c}");
}

#[test]
fn bad_parameters_are_rejected_on_both_paths() {
    let ctx = gpu();
    let (h, arena) = arena_f32(&ctx, 100);
    let mut cd = h.clone();
    let invalid_max_norm = |e: &ClipError| match e {
        ClipError::InvalidConfig(m) => m.contains("max_norm must be finite and > 0"),
        _ => false,
    };
    for max_norm in [f32::NAN, -1.0, 0.0, f32::INFINITY] {
        both_refuse(
            &ctx,
            &arena,
            &h,
            ClipPolicy::global_norm(max_norm),
            invalid_max_norm,
        );
        // The split API's chain (a global norm finished from a given total).
        let split = ClipPolicy::global_norm(max_norm)
            .norm(Norm::L2)
            .non_finite(NonFinitePolicy::Propagate);
        both_refuse(&ctx, &arena, &h, split, invalid_max_norm);
    }
    for p in [0.5, 0.0, -2.0, f32::NAN] {
        assert!(matches!(Norm::p(p), Err(ClipError::InvalidNormOrder(_))));
        let order = |e: &ClipError| matches!(e, ClipError::InvalidNormOrder(_));
        let clip = ClipPolicy::global_norm(1.0).norm(Norm::P(p));
        both_refuse(&ctx, &arena, &h, clip, order);
        let measure = ClipPolicy::total_norm()
            .norm(Norm::P(p))
            .with_group_report();
        both_refuse(&ctx, &arena, &h, measure, order);
    }
    for (lo, hi) in [(1.0, -1.0), (f32::NAN, 1.0), (0.0, f32::NAN)] {
        let clip = ClipPolicy::value_clip(ValueClip::range(lo, hi));
        both_refuse(&ctx, &arena, &h, clip, |e| {
            matches!(e, ClipError::InvalidBounds { .. })
        });
    }
    for total in [-1.0, f64::NAN] {
        assert!(matches!(
            PartialNorm::from_total(Norm::L2, total),
            Err(ClipError::InvalidTotalNorm(_))
        ));
    }
    // A valid runner given a total norm its chain cannot use is refused before it
    // writes anything: a chain other than one global norm, or another norm order.
    let zero = PartialNorm::zero(Norm::L2);
    let mut b = gpu_policy(
        &ctx,
        &arena,
        &h,
        ClipPolicy::global_norm(1.0).norm(Norm::Inf),
    );
    let e = b.step_with_norm(&zero).unwrap_err();
    assert!(matches!(e, ClipError::InvalidConfig(_)), "{e}");
    let mut c = cpu_policy(ClipPolicy::total_norm(), &h);
    let e = c.step_with_norm(&mut muts(&mut cd), &zero).unwrap_err();
    assert!(matches!(e, ClipError::InvalidConfig(_)), "{e}");
    assert_eq!(cd, h);
    unchanged(&ctx, &arena, &h);
}

#[test]
fn bad_tensor_descriptions_are_rejected() {
    let ctx = gpu();
    let (h, arena) = arena_f32(&ctx, 100);
    let buf = &arena.buffer;
    let check = |tensors: &[GpuTensor<'_>], want: fn(&ClipError) -> bool| {
        let err = GpuClipper::new(&ctx, tensors, None, ClipPolicy::global_norm(1.0))
            .expect_err(&format!("{tensors:?}"));
        assert!(want(&err), "unexpected error: {err}");
        assert!(!err.to_string().is_empty());
    };
    // Misaligned offsets.
    check(&[GpuTensor::new(buf, 2, 10, DType::F32)], |e| {
        matches!(e, ClipError::MisalignedOffset { .. })
    });
    check(&[GpuTensor::new(buf, 1, 10, DType::BF16)], |e| {
        matches!(e, ClipError::MisalignedOffset { .. })
    });
    // Ranges past the end (and overflowing arithmetic).
    check(&[GpuTensor::new(buf, 0, 101, DType::F32)], |e| {
        matches!(e, ClipError::OutOfBounds { .. })
    });
    check(&[GpuTensor::new(buf, 4, u64::MAX / 2, DType::F32)], |e| {
        matches!(e, ClipError::OutOfBounds { .. })
    });
    // Three f16 in a 6-byte buffer: their second word runs past the end.
    let six = ctx.device().create_buffer(&wgpu::BufferDescriptor {
        label: None,
        size: 6,
        usage: wgpu::BufferUsages::STORAGE,
        mapped_at_creation: false,
    });
    check(&[GpuTensor::new(&six, 0, 3, DType::F16)], |e| {
        matches!(
            e,
            ClipError::OutOfBounds {
                start: 0,
                end: 8,
                size: 6,
                ..
            }
        )
    });
    // Overlap.
    check(
        &[
            GpuTensor::new(buf, 0, 50, DType::F32).named("a"),
            GpuTensor::new(buf, 196, 10, DType::F32).named("b"),
        ],
        |e| matches!(e, ClipError::OverlappingTensors { .. }),
    );
    // f16 and bf16 sharing a word.
    check(
        &[
            GpuTensor::new(buf, 0, 3, DType::F16),
            GpuTensor::new(buf, 6, 3, DType::BF16),
        ],
        |e| matches!(e, ClipError::SharedWord { .. }),
    );
    // Buffer without STORAGE usage.
    let plain = ctx.device().create_buffer(&wgpu::BufferDescriptor {
        label: None,
        size: 64,
        usage: wgpu::BufferUsages::COPY_DST,
        mapped_at_creation: false,
    });
    check(&[GpuTensor::new(&plain, 0, 4, DType::F32)], |e| {
        matches!(e, ClipError::MissingStorageUsage { .. })
    });
    // A buffer of another device.
    let other = GpuContext::with_backends(common::backends()).unwrap();
    let foreign = other.device().create_buffer(&wgpu::BufferDescriptor {
        label: None,
        size: 64,
        usage: wgpu::BufferUsages::STORAGE,
        mapped_at_creation: false,
    });
    check(&[GpuTensor::new(&foreign, 0, 4, DType::F32)], |e| {
        matches!(e, ClipError::Wgpu(_))
    });
    unchanged(&ctx, &arena, &h);
}
