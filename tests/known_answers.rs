//! Known answers from REFERENCE.md and PyTorch semantics, on the CPU path and the GPU.

mod common;
use common::*;
use gradclip::*;

/// Runs a chain on both backends; returns (cpu report, cpu data, gpu report, gpu data).
fn both(h: &[Host], policy: &ClipPolicy) -> (ClipReport, Vec<Host>, ClipReport, Vec<Host>) {
    let mut cpu_data = h.to_vec();
    let cpu_report = cpu_policy(policy.clone(), h)
        .step(&mut muts(&mut cpu_data), None)
        .unwrap();
    let ctx = gpu();
    let arena = upload(&ctx, h);
    let mut b = gpu_policy(&ctx, &arena, h, policy.clone());
    let gpu_report = b.step().unwrap().wait().unwrap();
    (cpu_report, cpu_data, gpu_report, download(&ctx, &arena, h))
}

#[test]
fn norm_survives_values_whose_square_overflows_f32() {
    // REFERENCE: f32 [1e20, 1, 1] -> 1e20 (naive f32 gives inf).
    let h = vec![Host::F32(vec![1e20, 1.0, 1.0])];
    let (c, _, g, _) = both(&h, &ClipPolicy::global_norm(1e30));
    assert!(
        close(c.total_norm, 1e20f32 as f64, 1e-7),
        "{}",
        c.total_norm
    );
    assert!(
        close(g.total_norm, 1e20f32 as f64, 1e-6),
        "{}",
        g.total_norm
    );
}

#[test]
fn exploding_1e25_gradients_are_clipped_not_zeroed() {
    // PyTorch gives total = inf and zeroes these; the true norm is 3.1623e26.
    let h = vec![Host::F32(vec![1e25; 1000])];
    let (c, cd, g, gd) = both(&h, &ClipPolicy::global_norm(1.0));
    let truth = 1e25f32 as f64 * 1000f64.sqrt();
    assert!(close(c.total_norm, truth, 1e-7));
    assert!(close(g.total_norm, truth, 1e-6));
    assert!((c.clipped_units > 0) && (g.clipped_units > 0));
    for data in [cd, gd] {
        for v in data[0].to_f64() {
            assert!(close(v, 1.0 / 1000f64.sqrt(), 1e-5), "{v}");
        }
    }
}

#[test]
fn norm_beyond_f32_max_stays_finite_and_clips() {
    let h = vec![
        Host::BF16(vec![bf16::from_f32(3.0e38); 4]),
        Host::F32(vec![f32::MAX; 2]),
    ];
    let truth =
        ((bf16::from_f32(3.0e38).to_f64()).powi(2) * 4.0 + (f32::MAX as f64).powi(2) * 2.0).sqrt();
    let (c, cd, g, gd) = both(&h, &ClipPolicy::global_norm(1.0));
    assert!(truth > f32::MAX as f64);
    assert!(
        close(c.total_norm, truth, 1e-7),
        "{} vs {truth}",
        c.total_norm
    );
    assert!(
        close(g.total_norm, truth, 1e-6),
        "{} vs {truth}",
        g.total_norm
    );
    let expect = f32::MAX as f64 / truth;
    for data in [cd, gd] {
        assert!(close(data[1].to_f64()[0], expect, 1e-5));
    }
}

#[test]
fn tiny_gradients_do_not_underflow() {
    let h = vec![Host::F32(vec![1e-30; 1000])];
    let (c, _, g, _) = both(&h, &ClipPolicy::global_norm(1.0));
    let truth = 1e-30f32 as f64 * 1000f64.sqrt();
    assert!(close(c.total_norm, truth, 1e-7));
    assert!(close(g.total_norm, truth, 1e-6), "{}", g.total_norm);
    assert!(c.clipped_units == 0 && g.clipped_units == 0);
}

#[test]
fn pytorch_coefficient_and_return_value() {
    let h = vec![Host::F32(vec![3.0]), Host::F32(vec![4.0])];
    let (c, cd, g, gd) = both(&h, &ClipPolicy::global_norm(1.0));
    let coef = 1.0 / (5.0 + 1e-6);
    for (r, d) in [(c, cd), (g, gd)] {
        assert!(close(r.total_norm, 5.0, 1e-7));
        assert!(close(r.coef.unwrap() as f64, coef, 1e-6));
        assert!(close(d[0].to_f64()[0], 3.0 * coef, 1e-6));
        assert!(close(d[1].to_f64()[0], 4.0 * coef, 1e-6));
    }
}

#[test]
fn below_threshold_leaves_bits_unchanged() {
    let h = vec![
        Host::F32(vec![0.1, -0.2, 0.3]),
        Host::F16(vec![f16::from_f32(0.25); 3]),
    ];
    let (c, cd, g, gd) = both(&h, &ClipPolicy::global_norm(10.0));
    assert!(c.clipped_units == 0 && g.clipped_units == 0);
    assert_eq!(c.coef.unwrap(), 1.0);
    assert_eq!(cd, h);
    assert_eq!(gd, h);
}

#[test]
fn norm_orders() {
    let h = vec![Host::F32(vec![3.0, -4.0]), Host::F16(vec![])];
    let ctx = gpu();
    let arena = upload(&ctx, &h);
    for (norm, want) in [
        (Norm::L1, 7.0),
        (Norm::L2, 5.0),
        (Norm::Inf, 4.0),
        (Norm::p(3.0).unwrap(), 91f64.powf(1.0 / 3.0)),
    ] {
        let c = cpu_measure(&h, norm, false).partial.total();
        let mut b = gpu_policy(&ctx, &arena, &h, ClipPolicy::total_norm().norm(norm));
        let g = b.step().unwrap().wait().unwrap().total_norm;
        assert!(close(c, want, 1e-7), "{norm:?}: {c}");
        assert!(close(g, want, 1e-6), "{norm:?}: {g}");
    }
}

#[test]
fn empty_batch_and_empty_tensors_are_zero_and_unchanged() {
    for h in [vec![], vec![Host::F32(vec![]), Host::BF16(vec![])]] {
        let (c, cd, g, gd) = both(&h, &ClipPolicy::global_norm(1.0).with_group_report());
        for (r, d) in [(c, cd), (g, gd)] {
            assert_eq!(r.total_norm, 0.0);
            assert!(r.clipped_units == 0);
            assert_eq!(common::norms_of(&r), vec![0.0; h.len()]);
            assert_eq!(d, h);
        }
    }
}

#[test]
fn value_clip_symmetric_and_asymmetric() {
    let x = vec![-2.0, 0.5, f32::NAN, f32::INFINITY, f32::NEG_INFINITY, 1.5];
    for (clip, want) in [
        (
            ValueClip::symmetric(1.0),
            [-1.0, 0.5, f32::NAN, 1.0, -1.0, 1.0],
        ),
        (
            ValueClip::range(-0.5, 2.0),
            [-0.5, 0.5, f32::NAN, 2.0, -0.5, 1.5],
        ),
    ] {
        let h = vec![
            Host::F32(x.clone()),
            Host::BF16(x.iter().map(|&v| bf16::from_f32(v)).collect()),
        ];
        let mut cd = h.clone();
        (cpu_policy(ClipPolicy::value_clip(clip), &h).step(&mut muts(&mut cd), None)).unwrap();
        let ctx = gpu();
        let arena = upload(&ctx, &h);
        let mut b = gpu_policy(&ctx, &arena, &h, ClipPolicy::value_clip(clip));
        b.step().unwrap().wait().unwrap();
        let gd = download(&ctx, &arena, &h);
        for d in [&cd, &gd] {
            for t in d.iter() {
                for (got, want) in t.to_f64().iter().zip(want) {
                    assert!(close(*got, want as f64, 0.0), "{got} vs {want}");
                }
            }
        }
        assert_eq!(format!("{cd:?}"), format!("{gd:?}"));
    }
}

#[test]
fn non_finite_policies() {
    let h = vec![Host::F32(vec![1.0, f32::INFINITY, -2.0])];
    // Propagate: PyTorch's default, coef 0: finite -> 0, inf -> NaN.
    let (c, cd, g, gd) = both(&h, &ClipPolicy::global_norm(1.0));
    for (r, d) in [(c, cd), (g, gd)] {
        assert!(r.total_norm.is_infinite() && r.non_finite && (r.clipped_units > 0));
        let v = d[0].to_f64();
        assert!(v[0] == 0.0 && v[1].is_nan() && v[2] == 0.0, "{v:?}");
    }
    let nan = vec![Host::F32(vec![1.0, f32::NAN])];
    let (c, cd, g, gd) = both(&nan, &ClipPolicy::global_norm(1.0));
    for (r, d) in [(c, cd), (g, gd)] {
        assert!(r.total_norm.is_nan() && r.non_finite);
        assert!(d[0].to_f64().iter().all(|v| v.is_nan()));
    }
    // Skip: untouched, reported.
    let skip = ClipPolicy::global_norm(1.0).non_finite(NonFinitePolicy::SkipStep);
    let (c, cd, g, gd) = both(&h, &skip);
    for (r, d) in [(c, cd), (g, gd)] {
        assert!(r.skipped && r.non_finite && r.clipped_units == 0);
        assert_eq!(format!("{d:?}"), format!("{h:?}"));
    }
    // Error: untouched, error.
    let err = ClipPolicy::global_norm(1.0).non_finite(NonFinitePolicy::Error);
    let mut cd = h.clone();
    assert!(matches!(
        cpu_policy(err.clone(), &h).step(&mut muts(&mut cd), None),
        Err(ClipError::NonFiniteNorm(_))
    ));
    assert_eq!(format!("{cd:?}"), format!("{h:?}"));
    let ctx = gpu();
    let arena = upload(&ctx, &h);
    let r = gpu_policy(&ctx, &arena, &h, err).step().unwrap().wait();
    assert!(matches!(r, Err(ClipError::NonFiniteNorm(_))));
    assert_eq!(
        format!("{:?}", download(&ctx, &arena, &h)),
        format!("{h:?}")
    );
}

#[test]
fn split_api_matches_global_clip() {
    let a = vec![Host::F32((0..1000).map(|i| (i as f32).sin()).collect())];
    let b = vec![Host::BF16(
        (0..777)
            .map(|i| bf16::from_f32((i as f32).cos() * 3.0))
            .collect(),
    )];
    let whole: Vec<Host> = a.iter().chain(&b).cloned().collect();
    let ctx = gpu();
    for norm in [Norm::L2, Norm::L1, Norm::Inf, Norm::P(3.5)] {
        let pa = cpu_measure(&a, norm, false).partial;
        let arena_b = upload(&ctx, &b);
        let mut norm_b = gpu_policy(&ctx, &arena_b, &b, ClipPolicy::total_norm().norm(norm));
        let pb = norm_b.step().unwrap().wait().unwrap().partial;
        let combined = pa.combine(&pb).unwrap();
        let direct = cpu_measure(&whole, norm, false).partial;
        assert!(close(combined.total(), direct.total(), 1e-6));
        // The all-reduce form: MAX of scales, SUM of rescaled sums.
        let scale = pa.scale().max(pb.scale());
        let sum = pa.rescaled_sum(scale) + pb.rescaled_sum(scale);
        let reduced =
            PartialNorm::from_scaled_sum(norm, scale, sum, pa.flags() | pb.flags()).unwrap();
        assert!(close(reduced.total(), direct.total(), 1e-6));
        // Clipping each shard with the combined norm equals clipping the whole.
        let max_norm = (direct.total() / 3.0) as f32;
        let mut want = whole.clone();
        cpu_policy(ClipPolicy::global_norm(max_norm).norm(norm), &whole)
            .step(&mut muts(&mut want), None)
            .unwrap();
        let with_norm = ClipPolicy::global_norm(max_norm)
            .norm(combined.norm())
            .non_finite(NonFinitePolicy::Propagate);
        let mut got_a = a.clone();
        cpu_policy(with_norm.clone(), &a)
            .step_with_norm(&mut muts(&mut got_a), &combined)
            .unwrap();
        gpu_policy(&ctx, &arena_b, &b, with_norm)
            .step_with_norm(&combined)
            .unwrap()
            .wait()
            .unwrap();
        let got_b = download(&ctx, &arena_b, &b);
        let got: Vec<f64> = got_a
            .iter()
            .chain(&got_b)
            .flat_map(|t| t.to_f64())
            .collect();
        let want: Vec<f64> = want.iter().flat_map(|t| t.to_f64()).collect();
        for (g, w) in got.iter().zip(&want) {
            assert!(close(*g, *w, 8e-3), "{norm:?}: {g} vs {w}");
        }
    }
    let total = PartialNorm::from_total(Norm::L2, 10.0).unwrap();
    assert!(matches!(
        total.combine(&PartialNorm::zero(Norm::L1)),
        Err(ClipError::NormMismatch(..))
    ));
}

#[test]
fn gpu_norm_is_bitwise_deterministic() {
    let h: Vec<Host> = (0..5)
        .map(|t| {
            Host::F32(
                (0..100_003)
                    .map(|i| ((i * 7 + t) as f32 * 0.37).sin() * 1e3)
                    .collect(),
            )
        })
        .collect();
    let ctx = gpu();
    let arena = upload(&ctx, &h);
    let measure = ClipPolicy::total_norm().norm(Norm::L2).with_group_report();
    let mut b = gpu_policy(&ctx, &arena, &h, measure);
    let first = b.step().unwrap().wait().unwrap();
    for _ in 0..3 {
        let again = b.step().unwrap().wait().unwrap();
        assert_eq!(again.partial, first.partial);
        assert_eq!(again.tensors, first.tensors);
    }
}

#[test]
fn zero_nans_policy_zeroes_then_clips() {
    // optax zero_nans then clip_by_global_norm(1): [NaN, 3, 4] -> [0, 0.6, 0.8], on both
    // backends, with f16 too; below the threshold the NaN is still zeroed.
    let h = vec![
        Host::F32(vec![f32::NAN, 3.0, 4.0]),
        Host::F16(vec![f16::NAN, f16::from_f32(0.5)]),
    ];
    let clip = ClipPolicy::global_norm(1.0).non_finite(NonFinitePolicy::ZeroNans);
    let (cr, cd, gr, gd) = both(&h, &clip);
    for (r, d) in [(&cr, &cd), (&gr, &gd)] {
        assert!(
            r.nans_zeroed && r.non_finite && (r.clipped_units > 0) && !r.skipped,
            "{r:?}"
        );
        assert!(close(r.total_norm, (25.25f64).sqrt(), 1e-6), "{r:?}");
        let a = d[0].to_f64();
        assert_eq!(a[0], 0.0);
        assert!(close(a[1], 3.0 / 25.25f64.sqrt(), 1e-6));
        assert_eq!(d[1].to_f64()[0], 0.0);
    }
    let small = ClipPolicy::global_norm(100.0).non_finite(NonFinitePolicy::ZeroNans);
    let (cr, cd, gr, gd) = both(&h, &small);
    // NaNs zeroed at coefficient 1: a rewrite, but not a clip.
    for r in [&cr, &gr] {
        assert!(
            r.nans_zeroed && r.coef.unwrap() == 1.0 && r.clipped_units == 0,
            "{r:?}"
        );
    }
    assert_eq!(cd, gd);
    assert_eq!(gd[0], Host::F32(vec![0.0, 3.0, 4.0]));
}
