//! Gradient accumulation: k micro-batches accumulated on the GPU and clipped once give the
//! clipped gradient of the single large batch; the GPU matches its CPU twin for every
//! rule and dtype; bad input is a typed error.

mod common;

use common::{close, download, gpu, gpu_tensors, host, rules, upload, write, Host};
use gradclip::{ClipError, ClipPolicy, CpuClipper, GpuClipper, GpuTensor, Rule, TensorInfo};

/// A linear model `y = W x + b` (W 3x5) with squared loss, and a fixed data set.
struct Linear {
    w: Vec<f32>,
    b: Vec<f32>,
    xs: Vec<[f32; 5]>,
    ys: Vec<[f32; 3]>,
}

impl Linear {
    fn new(seed: u64, n: usize, weight: f32) -> Linear {
        let mut s = seed;
        let mut next = move || {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (s >> 40) as f32 / (1u64 << 24) as f32 - 0.5
        };
        Linear {
            w: (0..15).map(|_| weight * next()).collect(),
            b: (0..3).map(|_| next()).collect(),
            xs: (0..n).map(|_| [(); 5].map(|_| 4.0 * next())).collect(),
            ys: (0..n).map(|_| [(); 3].map(|_| next())).collect(),
        }
    }

    /// Gradient of the mean loss over examples `range`, in f64: (dW, db).
    fn grad(&self, range: std::ops::Range<usize>) -> (Vec<f64>, Vec<f64>) {
        let m = range.len() as f64;
        let (mut dw, mut db) = (vec![0.0; 15], vec![0.0; 3]);
        for i in range {
            for o in 0..3 {
                let y: f64 = (0..5)
                    .map(|j| self.w[o * 5 + j] as f64 * self.xs[i][j] as f64)
                    .sum::<f64>()
                    + self.b[o] as f64;
                let r = y - self.ys[i][o] as f64;
                for j in 0..5 {
                    dw[o * 5 + j] += r * self.xs[i][j] as f64 / m;
                }
                db[o] += r / m;
            }
        }
        (dw, db)
    }
}

fn f32s(v: &[f64]) -> Host {
    Host::F32(v.iter().map(|&x| x as f32).collect())
}

fn infos() -> Vec<TensorInfo> {
    vec![
        TensorInfo::new("fc.weight", &[3, 5]),
        TensorInfo::new("fc.bias", &[3]),
    ]
}

#[test]
fn accumulation_matches_one_large_batch() {
    let ctx = gpu();
    let (k, batch) = (4, 48);
    let micro_size = batch / k;
    let policy = ClipPolicy::new(Rule::GlobalNorm(5.0));
    let like = [f32s(&[0.0; 15]), f32s(&[0.0; 3])];
    let micro = upload(&ctx, &like);
    // The sums start as NaN: the first micro-batch must overwrite, not add.
    let sums = upload(
        &ctx,
        &[Host::F32(vec![f32::NAN; 15]), Host::F32(vec![f32::NAN; 3])],
    );
    let mut acc = GpuClipper::accumulating(
        &ctx,
        &gpu_tensors(&micro, &like, &infos()),
        &gpu_tensors(&sums, &like, &infos()),
        None,
        k as u32,
        policy.clone(),
    )
    .unwrap();
    let mut oracle = CpuClipper::new(policy, &infos()).unwrap();
    let mut clipped = Vec::new();
    // Two accumulations, the second with larger weights (larger gradients).
    for (round, weight) in [1.0f32, 30.0].into_iter().enumerate() {
        let model = Linear::new(7 + round as u64, batch, weight);
        for m in 0..k {
            let (dw, db) = model.grad(m * micro_size..(m + 1) * micro_size);
            write(&ctx, &micro, &[f32s(&dw), f32s(&db)]);
            let report = acc.step().unwrap();
            assert_eq!(report.is_some(), m + 1 == k, "report only at the boundary");
            assert_eq!(acc.pending(), ((m + 1) % k) as u32);
            if let Some(report) = report {
                let report = report.wait().unwrap();
                // The large batch, clipped on the CPU.
                let (dw, db) = model.grad(0..batch);
                let mut want = vec![f32s(&dw), f32s(&db)];
                let cpu = oracle.step(&mut common::muts(&mut want), None).unwrap();
                assert!(
                    close(report.total_norm, cpu.total_norm, 1e-5),
                    "{report:?} {cpu:?}"
                );
                assert_eq!(report.coef.unwrap() < 1.0, cpu.coef.unwrap() < 1.0);
                clipped.push(cpu.coef.unwrap() < 1.0);
                let got = download(&ctx, &sums, &like);
                for (g, w) in got.iter().zip(&want) {
                    for (a, b) in g.to_f64().iter().zip(w.to_f64()) {
                        assert!(close(*a, b, 1e-5) || (a - b).abs() < 1e-7, "{a} vs {b}");
                    }
                }
            }
        }
    }
    assert_eq!(
        clipped,
        [false, true],
        "one round below the threshold, one above"
    );
}

#[test]
fn gpu_accumulator_matches_cpu_for_every_rule_and_dtype() {
    let ctx = gpu();
    let shapes: [(u64, u64, u8); 4] = [(4, 7, 0), (3, 5, 1), (1, 9, 2), (3, 3, 1)];
    let infos: Vec<TensorInfo> = (shapes.iter().enumerate())
        .map(|(i, &(a, b, _))| TensorInfo::new(format!("t{i}"), &[a, b]))
        .collect();
    let mut s = 11u64;
    let mut make = |scale: f32| -> Vec<Host> {
        (shapes.iter())
            .map(|&(a, b, d)| {
                let v = (0..a * b)
                    .map(|_| {
                        s = s.wrapping_mul(6364136223846793005).wrapping_add(1);
                        ((s >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * scale
                    })
                    .collect();
                host(d, v)
            })
            .collect()
    };
    let k = 3;
    let batches: Vec<Vec<Host>> = (0..2 * k).map(|i| make(1.0 + i as f32)).collect();
    let params = make(1.0);
    for rule in rules() {
        let policy = ClipPolicy::new(rule).with_group_report();
        let like = &batches[0];
        let (micro, sums, p) = (
            upload(&ctx, like),
            upload(&ctx, like),
            upload(&ctx, &params),
        );
        let p_t = gpu_tensors(&p, &params, &infos);
        let mut gpu_acc = GpuClipper::accumulating(
            &ctx,
            &gpu_tensors(&micro, like, &infos),
            &gpu_tensors(&sums, like, &infos),
            Some(&p_t),
            k as u32,
            policy.clone(),
        )
        .unwrap();
        let mut cpu_acc = CpuClipper::accumulating(policy.clone(), &infos, k as u32).unwrap();
        let mut cpu_sums = like.clone();
        for b in &batches {
            write(&ctx, &micro, b);
            let g = gpu_acc.step().unwrap().map(|r| r.wait().unwrap());
            let c = cpu_acc
                .step(
                    &mut common::muts(&mut cpu_sums),
                    &common::refs(b),
                    Some(&common::refs(&params)),
                )
                .unwrap();
            assert_eq!(g.is_some(), c.is_some());
            let got = download(&ctx, &sums, like);
            for (i, (x, y)) in got.iter().zip(&cpu_sums).enumerate() {
                let rel = match y {
                    Host::F32(_) => 1e-5,
                    Host::F16(_) => 2e-3,
                    Host::BF16(_) => 1.6e-2,
                };
                for (u, v) in x.to_f64().iter().zip(y.to_f64()) {
                    assert!(
                        close(*u, v, rel) || (u - v).abs() < 1e-6,
                        "{:?} tensor {i}: {u} vs {v}",
                        policy.rules().collect::<Vec<_>>()
                    );
                }
            }
            if let (Some(g), Some(c)) = (g, c) {
                assert!(close(g.total_norm, c.total_norm, 1e-4), "{g:?} vs {c:?}");
                assert_eq!(g.step, c.step);
            }
        }
    }
}

#[test]
fn accumulation_bad_input_is_a_typed_error() {
    let ctx = gpu();
    let like = [Host::F32(vec![1.0; 6]), Host::F32(vec![2.0; 4])];
    let infos = [TensorInfo::new("a", &[6]), TensorInfo::new("b", &[4])];
    let (micro, sums) = (upload(&ctx, &like), upload(&ctx, &like));
    let m = gpu_tensors(&micro, &like, &infos);
    let s = gpu_tensors(&sums, &like, &infos);
    let policy = ClipPolicy::new(Rule::GlobalNorm(1.0));
    let new = |m: &[GpuTensor<'_>], s: &[GpuTensor<'_>], k: u32| {
        GpuClipper::accumulating(&ctx, m, s, None, k, policy.clone()).map(|_| ())
    };
    let invalid = |r: Result<(), ClipError>| {
        let e = r.unwrap_err();
        assert!(matches!(e, ClipError::InvalidConfig(_)), "{e}");
        e.to_string()
    };
    assert!(invalid(new(&m, &s, 0)).contains("micro_steps = 0"));
    // Same buffer for both sides.
    assert!(invalid(new(&m, &m, 2)).contains("shares a buffer"));
    // Offsets that do not mirror.
    let mut shifted = s.clone();
    shifted[1].offset += 4;
    shifted[1].len -= 1;
    assert!(invalid(new(&m, &shifted, 2)).contains("does not mirror"));
    assert!(matches!(
        new(&m, &s[..1], 2),
        Err(ClipError::ShapeMismatch { .. })
    ));

    assert!(CpuClipper::accumulating(policy.clone(), &infos, 0).is_err());
    let mut acc = CpuClipper::accumulating(policy.clone(), &infos, 2).unwrap();
    let mut sums = like.to_vec();
    let wrong = [Host::F32(vec![1.0; 6]), Host::F32(vec![1.0; 5])];
    let e = acc
        .step(&mut common::muts(&mut sums), &common::refs(&wrong), None)
        .unwrap_err();
    assert!(matches!(e, ClipError::ShapeMismatch { .. }), "{e}");
    assert_eq!(sums, like, "sums untouched");
    assert_eq!(acc.pending(), 0);
    // Sums and micro-batch that agree with each other but not with the declared tensors
    // are refused on every micro-step, not only at the boundary.
    let mut short = [Host::F32(vec![1.0; 5]), Host::F32(vec![2.0; 4])];
    let short_micro = short.clone();
    let e = acc
        .step(
            &mut common::muts(&mut short),
            &common::refs(&short_micro),
            None,
        )
        .unwrap_err();
    assert!(matches!(e, ClipError::ShapeMismatch { .. }), "{e}");
    assert_eq!((acc.pending(), short), (0, short_micro));

    // AGC without parameters fails at the boundary before the sums change.
    let agc = ClipPolicy::new(Rule::Agc(gradclip::Agc::new(0.01)));
    let mut acc = CpuClipper::accumulating(agc, &infos, 1).unwrap();
    let e = acc
        .step(&mut common::muts(&mut sums), &common::refs(&like), None)
        .unwrap_err();
    assert!(matches!(e, ClipError::InvalidConfig(_)), "{e}");
    assert_eq!(sums, like, "sums untouched");
}
