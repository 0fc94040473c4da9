//! Property tests: the GPU path against the CPU oracle over tensor counts, lengths
//! (0, 1, odd, prime, chunk edges), mixed dtypes and magnitudes from 1e-30 to 1e30.

mod common;
use common::*;
use gradclip::*;
use proptest::prelude::*;

const LENGTHS: &[usize] = &[
    0, 1, 2, 3, 7, 13, 31, 257, 1021, 8191, 8192, 8193, 65_535, 65_536, 65_537, 131_073, 199_999,
];

fn fill(len: usize, seed: u64, exp: i32, dtype: u8) -> Host {
    let mut s = seed | 1;
    let mut next = || {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        ((s >> 11) as f64 / (1u64 << 53) as f64) * 2.0 - 1.0
    };
    let scale = 10f64.powi(exp);
    let v: Vec<f64> = (0..len).map(|_| next() * scale).collect();
    match dtype {
        0 => Host::F32(v.iter().map(|&x| x as f32).collect()),
        1 => Host::F16(v.iter().map(|&x| f16::from_f64(x)).collect()),
        _ => Host::BF16(v.iter().map(|&x| bf16::from_f64(x)).collect()),
    }
}

/// One tensor: length, dtype and a magnitude the dtype can hold.
fn tensor() -> impl Strategy<Value = Host> {
    (
        prop::sample::select(LENGTHS),
        0u8..3,
        any::<u64>(),
        0usize..5,
    )
        .prop_map(|(len, dtype, seed, m)| {
            let exp = match dtype {
                0 => [-30, -10, 0, 10, 30][m],
                1 => [-4, -2, 0, 2, 4][m],
                _ => [-30, -10, 0, 10, 30][m],
            };
            fill(len, seed, exp, dtype)
        })
}

fn batch_strategy() -> impl Strategy<Value = Vec<Host>> {
    prop::collection::vec(tensor(), 0..64).prop_filter("keep lavapipe runs short", |h| {
        h.iter().map(|t| t.as_ref().len()).sum::<usize>() <= 1_500_000
    })
}

fn norm_strategy() -> impl Strategy<Value = Norm> {
    prop::sample::select(vec![
        Norm::L2,
        Norm::L1,
        Norm::Inf,
        Norm::P(3.0),
        Norm::P(1.5),
    ])
}

/// Whether two results of `t`'s dtype agree within one rounding step (relative, and for
/// f16 absolute in its subnormal range), as coefficients may differ by ulps.
fn elem_close(t: &Host, a: f64, b: f64) -> bool {
    match t {
        Host::F32(_) => close(a, b, 2e-6),
        Host::F16(_) => close(a, b, 1e-3) || (a - b).abs() <= 6e-8,
        Host::BF16(_) => close(a, b, 8e-3),
    }
}

proptest! {
    // A fixed seed: the suite passes or fails the same way on every run.
    #![proptest_config(ProptestConfig {
        cases: 64,
        rng_seed: proptest::test_runner::RngSeed::Fixed(0x6772_6164),
        ..ProptestConfig::default()
    })]

    #[test]
    fn norms_match_oracle(h in batch_strategy(), norm in norm_strategy()) {
        let ctx = gpu();
        let arena = upload(&ctx, &h);
        let measure = ClipPolicy::total_norm().norm(norm).with_group_report();
        let mut b = gpu_policy(&ctx, &arena, &h, measure);
        let g = b.step().unwrap().wait().unwrap();
        let cr = cpu_measure(&h, norm, true);
        let c = cr.partial;
        prop_assert!(close(g.total_norm, c.total(), 1e-5), "{} vs {}", g.total_norm, c.total());
        let ct = common::norms_of(&cr);
        prop_assert_eq!(ct.len(), h.len());
        for (gt, ct) in common::norms_of(&g).iter().zip(&ct) {
            prop_assert!(close(*gt, *ct, 1e-5), "{} vs {}", gt, ct);
        }
    }

    #[test]
    fn global_clip_matches_oracle(h in batch_strategy(), norm in norm_strategy(), frac in 0.01f64..2.0) {
        let total = cpu_measure(&h, norm, false).partial.total();
        let max_norm = ((total * frac) as f32).max(1e-30);
        let clip = ClipPolicy::global_norm(max_norm).norm(norm);
        let mut cd = h.clone();
        let cr = cpu_policy(clip.clone(), &h).step(&mut muts(&mut cd), None).unwrap();
        let ctx = gpu();
        let arena = upload(&ctx, &h);
        let gr = gpu_policy(&ctx, &arena, &h, clip).step().unwrap().wait().unwrap();
        let gd = download(&ctx, &arena, &h);
        prop_assert!(close(gr.coef.unwrap() as f64, cr.coef.unwrap() as f64, 1e-5), "{} vs {}", gr.coef.unwrap(), cr.coef.unwrap());
        for ((g, c), orig) in gd.iter().zip(&cd).zip(&h) {
            for (gv, cv) in g.to_f64().iter().zip(c.to_f64()) {
                // GPUs may flush subnormal results to zero; below f32's normal range only
                // the magnitude is compared.
                prop_assert!(elem_close(orig, *gv, cv) || (cv.abs() < 1.2e-38 && gv.abs() < 1.2e-38), "{} vs {}", gv, cv);
            }
        }
    }

    #[test]
    fn value_clip_matches_oracle_bitwise(h in batch_strategy(), lo in -1e3f32..0.0, width in 0.0f32..2e3) {
        let clip = ValueClip::range(lo, lo + width);
        let mut cd = h.clone();
        cpu_policy(ClipPolicy::value_clip(clip), &h).step(&mut muts(&mut cd), None).unwrap();
        let ctx = gpu();
        let arena = upload(&ctx, &h);
        let mut b = gpu_policy(&ctx, &arena, &h, ClipPolicy::value_clip(clip));
        b.step().unwrap().wait().unwrap();
        prop_assert_eq!(download(&ctx, &arena, &h), cd);
    }
}

#[test]
fn gpu_l2_accuracy_against_f64_reference() {
    // 2^24 elements of widely varying magnitude on the GPU; the bench example checks the
    // 124M-element GPT-2 set.
    let n = 1 << 24;
    let h = vec![fill(n, 42, 3, 0), fill(1001, 7, -20, 0)];
    let truth: f64 = h
        .iter()
        .flat_map(|t| t.to_f64())
        .map(|x| x * x)
        .sum::<f64>()
        .sqrt();
    let ctx = gpu();
    let arena = upload(&ctx, &h);
    let g = gpu_policy(&ctx, &arena, &h, ClipPolicy::total_norm().norm(Norm::L2))
        .step()
        .unwrap()
        .wait()
        .unwrap();
    assert!(
        close(g.total_norm, truth, 1e-5),
        "{} vs {truth}",
        g.total_norm
    );
}

#[test]
fn cpu_accuracy_on_1e8_elements() {
    let n = 100_000_000;
    let Host::F32(x) = fill(n, 9, 0, 0) else {
        unreachable!()
    };
    let mut truth = 0.0f64;
    let mut comp = 0.0f64; // Kahan-compensated f64 reference
    for &v in &x {
        let y = (v as f64) * (v as f64) - comp;
        let t = truth + y;
        comp = (t - truth) - y;
        truth = t;
    }
    let truth = truth.sqrt();
    let norm_of = |norm: Norm| {
        let mut run = CpuClipper::new(
            ClipPolicy::total_norm().norm(norm),
            &TensorInfo::unnamed([n]),
        )
        .unwrap();
        run.step_deferred(&[GradRef::F32(&x)], None)
            .unwrap()
            .report
            .partial
            .total()
    };
    let got = norm_of(Norm::L2);
    assert!(close(got, truth, 1e-9), "{got} vs {truth}");
    let l1: f64 = x.iter().map(|&v| v.abs() as f64).sum();
    let got = norm_of(Norm::L1);
    assert!(close(got, l1, 1e-9));
}

/// Every finite f16 value (and every bf16 from 1e-30 to 1e30) scaled by the GPU rounds as
/// `half` rounds the f32 product at the coefficient the GPU reports: ties to even (a
/// coefficient of few significant bits makes many), f16 subnormals, values scaled to zero.
#[test]
fn gpu_16_bit_scaling_rounds_every_value() {
    let ctx = gpu();
    let all = || (0..=u16::MAX).map(|b| (f16::from_bits(b), bf16::from_bits(b)));
    let f16s = all().map(|p| p.0).filter(|v| v.is_finite()).collect();
    let bf16s = all()
        .map(|p| p.1)
        .filter(|v| (1e-30..1e30).contains(&v.to_f32().abs()));
    // A total norm of 1 and `max_norm` = k (1 + 1e-6) ask for a coefficient of k (exactly
    // k for 0.75, 0.6875 and 1/1024, whose products have few bits: many ties).
    let total = PartialNorm::from_total(Norm::L2, 1.0).unwrap();
    for h in [Host::F16(f16s), Host::BF16(bf16s.collect())] {
        let h = vec![h];
        let mut ties = 0;
        for k in [0.75f32, 0.3, 0.6875, 1.0 / 1024.0, 3e-7] {
            let arena = upload(&ctx, &h);
            let max_norm = k * (1.0 + 1e-6);
            let clip = ClipPolicy::global_norm(max_norm).non_finite(Default::default());
            let r = (gpu_policy(&ctx, &arena, &h, clip).step_with_norm(&total))
                .unwrap()
                .wait()
                .unwrap();
            assert!((r.clipped_units > 0) && r.coef.unwrap() < 1.0, "{k}: {r:?}");
            let got = download(&ctx, &arena, &h);
            // `dropped`: the bits a normal result drops, for counting its ties.
            let mut check = |x: f32, got: u16, round: fn(f32) -> u16, dropped: u32| {
                let p = x * r.coef.unwrap();
                ties += usize::from(p.to_bits() & ((1 << dropped) - 1) == 1 << (dropped - 1));
                round(p) == got
            };
            let mismatches = match (&h[0], &got[0]) {
                (Host::F16(x), Host::F16(g)) => (x.iter().zip(g))
                    .filter(|(a, b)| {
                        !check(a.to_f32(), b.to_bits(), |p| f16::from_f32(p).to_bits(), 13)
                    })
                    .count(),
                (Host::BF16(x), Host::BF16(g)) => (x.iter().zip(g))
                    .filter(|(a, b)| {
                        !check(a.to_f32(), b.to_bits(), |p| bf16::from_f32(p).to_bits(), 16)
                    })
                    .count(),
                _ => unreachable!("same dtype"),
            };
            assert_eq!(mismatches, 0, "{k} (coef {})", r.coef.unwrap());
        }
        assert!(ties > 1000, "only {ties} ties");
    }
}

/// The split API under `ZeroNans` reads no gradients before it scales: a NaN in them is
/// zeroed wherever the step rewrites (a caller's total that clips, or noise with one that
/// does not), on both backends alike; with nothing else to do, the step leaves them.
#[test]
fn the_split_api_zeroes_nans_where_it_rewrites() {
    let ctx = gpu();
    let h = vec![
        host(0, vec![f32::NAN, 3.0, -4.0, 0.5]),
        host(2, vec![1.0, f32::NAN, 2.0]),
    ];
    for (total, noise) in [(10.0, false), (0.5, true), (0.5, false)] {
        let given = PartialNorm::from_total(Norm::L2, total).unwrap();
        let mut clip = ClipPolicy::global_norm(1.0).non_finite(NonFinitePolicy::ZeroNans);
        if noise {
            clip = clip.noise(GaussianNoise {
                sigma: 1e-3,
                seed: 7,
            });
        }
        let arena = upload(&ctx, &h);
        let mut gpu = gpu_policy(&ctx, &arena, &h, clip.clone());
        gpu.step_with_norm(&given).unwrap().wait().unwrap();
        let mut c = h.clone();
        (cpu_policy(clip, &h).step_with_norm(&mut muts(&mut c), &given)).unwrap();
        let g = download(&ctx, &arena, &h);
        let rewrites = total > 1.0 || noise;
        for (t, (a, b)) in g.iter().zip(&c).enumerate() {
            for (x, y) in a.to_f64().iter().zip(b.to_f64()) {
                assert_eq!(
                    x.is_nan(),
                    y.is_nan(),
                    "tensor {t}, total {total}, noise {noise}"
                );
                assert!(x.is_nan() || (x - y).abs() <= 1e-6, "{x} vs {y}");
            }
        }
        let kept = [g[0].to_f64()[0], g[1].to_f64()[1]];
        assert_eq!(
            kept.map(f64::is_nan),
            [!rewrites; 2],
            "total {total}, noise {noise}"
        );
    }
}
