//! Loss scaling (`ClipPolicy::loss_scale`): torch.amp.GradScaler's known answers
//! (REFERENCE.md "Dynamic loss scaling") on the CPU and the GPU, with f32 and f16
//! gradients; an overflow of S * g in f16 as the trigger of the backoff; the scale on the
//! device; states and bad configurations.

mod common;

use common::{download, gpu, gpu_tensors, upload, Host};
use gradclip::{
    f16, Backend, ClipError, ClipPolicy, ClipReport, Clipper, CpuClipper, GpuClipper, GradRef,
    LossScale, NonFinitePolicy, PolicyState, Sgd, TensorInfo,
};

/// One row of the known answers: the unscaled gradients (w; b), the total norm, skipped,
/// w and b after the step, and S after the update.
struct Row {
    w: [f32; 3],
    b: f32,
    norm: f32,
    skipped: bool,
    w_after: Option<[f32; 3]>,
    b_after: Option<f32>,
    scale_after: f32,
}

const W0: [f32; 3] = [1.0, -2.0, 0.5];
const B0: f32 = 0.25;

/// REFERENCE.md: GradScaler(init_scale=65536, growth_interval=3), clip_grad_norm_(1.0)
/// after unscale_, SGD(lr=0.1); `None`: unchanged by a skipped step.
#[allow(clippy::excessive_precision)]
fn rows() -> Vec<Row> {
    let row = |w, b, norm, skipped, w_after, b_after, scale_after| Row {
        w,
        b,
        norm,
        skipped,
        w_after,
        b_after,
        scale_after,
    };
    let inf = f32::INFINITY;
    vec![
        row(
            [3.0, 4.0, 0.0],
            12.0,
            13.0,
            false,
            Some([0.976923048, -2.030769348, 0.5]),
            Some(0.157692313),
            65536.0,
        ),
        row(
            [0.3, 0.4, 0.0],
            0.0,
            0.5,
            false,
            Some([0.946923018, -2.07076931, 0.5]),
            Some(0.157692313),
            65536.0,
        ),
        row([inf, 1.0, 0.0], 1.0, inf, true, None, None, 32768.0),
        row(
            [0.1, 0.1, 0.1],
            0.1,
            0.200000003,
            false,
            Some([0.936923027, -2.0807693, 0.49000001]),
            Some(0.147692308),
            32768.0,
        ),
        row(
            [1.0, 2.0, 2.0],
            0.0,
            3.0,
            false,
            Some([0.903589725, -2.147435904, 0.423333377]),
            Some(0.147692308),
            32768.0,
        ),
        row(
            [f32::NAN, 0.0, 0.0],
            0.0,
            f32::NAN,
            true,
            None,
            None,
            16384.0,
        ),
        row(
            [0.5, 0.5, 0.5],
            0.5,
            1.0,
            false,
            Some([0.853589773, -2.197435856, 0.373333424]),
            Some(0.097692356),
            16384.0,
        ),
        row(
            [2.0, 0.0, 0.0],
            0.0,
            2.0,
            false,
            Some([0.753589809, -2.197435856, 0.373333424]),
            Some(0.097692356),
            16384.0,
        ),
        row(
            [0.0, 3.0, 0.0],
            4.0,
            5.0,
            false,
            Some([0.753589809, -2.257435799, 0.373333424]),
            Some(0.01769237),
            32768.0,
        ),
        row(
            [1e-3, 1e-3, 1e-3],
            1e-3,
            0.00200000009,
            false,
            Some([0.753489792, -2.257535696, 0.373233438]),
            Some(0.017592371),
            32768.0,
        ),
    ]
}

fn infos() -> Vec<TensorInfo> {
    vec![TensorInfo::new("w", &[3]), TensorInfo::new("b", &[1])]
}

/// PyTorch's recipe as one chain: clip_grad_norm_(1.0) after unscale_, GradScaler with
/// `init` and growth interval 3.
fn chain(init: f32) -> ClipPolicy {
    ClipPolicy::global_norm(1.0).loss_scale(LossScale::dynamic().init(init).growth(2.0, 3))
}

/// The gradients a backward pass of the loss times `scale` gives, in f32 or f16.
fn scaled(row: &Row, scale: f32, half: bool) -> Vec<Host> {
    let w: Vec<f32> = row.w.iter().map(|g| g * scale).collect();
    let b = vec![row.b * scale];
    if half {
        let h = |v: Vec<f32>| Host::F16(v.into_iter().map(f16::from_f32).collect());
        vec![h(w), h(b)]
    } else {
        vec![Host::F32(w), Host::F32(b)]
    }
}

/// The bits of every element (NaN payloads included), to compare gradients exactly.
fn bits(h: &[Host]) -> Vec<u64> {
    h.iter()
        .flat_map(|t| t.to_f64())
        .map(f64::to_bits)
        .collect()
}

fn same(a: f32, b: f32) -> bool {
    a == b || (a.is_nan() && b.is_nan())
}

/// What a run gives per step: the report and the parameters after it.
type Trace = Vec<(ClipReport, Vec<f32>)>;

/// Runs the known answers' ten steps on the CPU's fused SGD, the scale starting at
/// `init` (the table's gradients times the scale in force).
fn cpu_run(init: f32, half: bool) -> Trace {
    let mut opt = CpuClipper::with_optimizer(chain(init), &infos(), Sgd::new(0.1)).unwrap();
    let (mut w, mut b) = (W0.to_vec(), vec![B0]);
    let mut scale = init;
    let mut out = Vec::new();
    for row in rows() {
        let grads = scaled(&row, scale, half);
        let refs: Vec<GradRef<'_>> = grads.iter().map(|g| g.as_ref()).collect();
        let report = opt.step(&refs, &mut [&mut w[..], &mut b[..]]).unwrap();
        scale = report.loss_scale.unwrap().next;
        out.push((report, [&w[..], &b[..]].concat()));
    }
    out
}

/// The same steps on the GPU's fused SGD.
fn gpu_run(init: f32, half: bool) -> Trace {
    let ctx = gpu();
    let params = vec![Host::F32(W0.to_vec()), Host::F32(vec![B0])];
    let grads0 = scaled(&rows()[0], init, half);
    let (p_arena, g_arena) = (upload(&ctx, &params), upload(&ctx, &grads0));
    let (gt, pt) = (
        gpu_tensors(&g_arena, &grads0, &infos()),
        gpu_tensors(&p_arena, &params, &infos()),
    );
    let mut opt = GpuClipper::with_optimizer(&ctx, &gt, &pt, chain(init), Sgd::new(0.1)).unwrap();
    let mut scale = init;
    let mut out = Vec::new();
    for row in rows() {
        let grads = scaled(&row, scale, half);
        common::write(&ctx, &g_arena, &grads);
        let report = opt.step().unwrap().wait().unwrap();
        scale = report.loss_scale.unwrap().next;
        // The gradients are read, never written.
        assert_eq!(bits(&download(&ctx, &g_arena, &grads)), bits(&grads));
        let p = download(&ctx, &p_arena, &params);
        let p: Vec<f32> = p
            .iter()
            .flat_map(|t| t.to_f64())
            .map(|x| x as f32)
            .collect();
        out.push((report, p));
    }
    out
}

/// Checks a run against the table: the scales (times `scale_ratio`, for a run that starts
/// at another scale), the skips and the norms exactly; the parameters within `tol`.
fn check(name: &str, trace: &Trace, scale_ratio: f32, tol: f32) {
    let mut want_p = [&W0[..], &[B0]].concat();
    let mut scale = 65536.0 * scale_ratio;
    for (step, (row, (report, p))) in rows().iter().zip(trace).enumerate() {
        let ls = report.loss_scale.unwrap();
        assert_eq!(ls.scale, scale, "{name} step {step}: scale used");
        assert_eq!(
            ls.next,
            row.scale_after * scale_ratio,
            "{name} step {step}: next"
        );
        assert_eq!(report.skipped, row.skipped, "{name} step {step}");
        assert_eq!(report.non_finite, row.skipped, "{name} step {step}");
        let norm = report.total_norm as f32;
        let close = (norm - row.norm).abs() <= tol * row.norm.abs().max(1.0);
        assert!(
            same(norm, row.norm) || close,
            "{name} step {step}: norm {norm} vs {}",
            row.norm
        );
        if let (Some(w), Some(b)) = (row.w_after, row.b_after) {
            want_p = [&w[..], &[b]].concat();
        }
        for (i, (&got, &want)) in p.iter().zip(&want_p).enumerate() {
            assert!(
                (got - want).abs() <= tol,
                "{name} step {step}: parameter {i} is {got}, PyTorch's {want}"
            );
        }
        scale = ls.next;
    }
}

#[test]
fn cpu_matches_grad_scaler_in_f32() {
    check("CPU f32", &cpu_run(65536.0, false), 1.0, 2e-7);
}

#[test]
fn gpu_matches_grad_scaler_in_f32() {
    check("GPU f32", &gpu_run(65536.0, false), 1.0, 2e-7);
}

/// In f16, S * g overflows at 2^16 (12 * 65536 > 65504): started at 2^12 the run is the
/// table's at 1/16 of its scales, with the gradients rounded to f16.
#[test]
fn cpu_and_gpu_match_grad_scaler_in_f16() {
    let (cpu, gpu) = (cpu_run(4096.0, true), gpu_run(4096.0, true));
    check("CPU f16", &cpu, 1.0 / 16.0, 3e-4);
    check("GPU f16", &gpu, 1.0 / 16.0, 3e-4);
    for (step, ((rc, pc), (rg, pg))) in cpu.iter().zip(&gpu).enumerate() {
        assert_eq!(rc.loss_scale, rg.loss_scale, "step {step}");
        assert_eq!(rc.skipped, rg.skipped, "step {step}");
        for (a, b) in pc.iter().zip(pg) {
            assert!(
                (a - b).abs() <= 2.0 * f32::EPSILON * a.abs(),
                "step {step}: {a} vs {b}"
            );
        }
    }
}

/// At PyTorch's default 2^16, f16 gradients of the first step overflow: S * 12 is inf in
/// f16 until S is 2^12, four skipped steps later, with the parameters untouched.
#[test]
fn an_f16_overflow_backs_the_scale_off() {
    for runner in ["CPU", "GPU"] {
        let first = &rows()[0];
        let ctx = gpu();
        let params = vec![Host::F32(W0.to_vec()), Host::F32(vec![B0])];
        let p_arena = upload(&ctx, &params);
        let g_arena = upload(&ctx, &scaled(first, 1.0, true));
        let (gt, pt) = (
            gpu_tensors(&g_arena, &scaled(first, 1.0, true), &infos()),
            gpu_tensors(&p_arena, &params, &infos()),
        );
        let policy = ClipPolicy::global_norm(1.0).loss_scale(LossScale::dynamic());
        let mut gpu_opt =
            GpuClipper::with_optimizer(&ctx, &gt, &pt, policy.clone(), Sgd::new(0.1)).unwrap();
        let mut cpu_opt = CpuClipper::with_optimizer(policy, &infos(), Sgd::new(0.1)).unwrap();
        let (mut w, mut b) = (W0.to_vec(), vec![B0]);
        let mut scale = 65536.0;
        let mut scales = Vec::new();
        for _ in 0..5 {
            let grads = scaled(first, scale, true);
            let report = if runner == "CPU" {
                let refs: Vec<GradRef<'_>> = grads.iter().map(|g| g.as_ref()).collect();
                cpu_opt.step(&refs, &mut [&mut w[..], &mut b[..]]).unwrap()
            } else {
                common::write(&ctx, &g_arena, &grads);
                gpu_opt.step().unwrap().wait().unwrap()
            };
            scales.push((report.skipped, report.loss_scale.unwrap().scale));
            scale = report.loss_scale.unwrap().next;
        }
        let want = [
            (true, 65536.0),
            (true, 32768.0),
            (true, 16384.0),
            (true, 8192.0),
            (false, 4096.0),
        ];
        assert_eq!(scales, want, "{runner}");
        let p: Vec<f32> = if runner == "CPU" {
            [&w[..], &b[..]].concat()
        } else {
            let p = download(&ctx, &p_arena, &params);
            p.iter()
                .flat_map(|t| t.to_f64())
                .map(|x| x as f32)
                .collect()
        };
        // The table's first step, taken at 2^12.
        let want_p = [&first.w_after.unwrap()[..], &[first.b_after.unwrap()]].concat();
        for (g, &w) in p.iter().zip(&want_p) {
            assert!((g - w).abs() <= 2e-7, "{runner}: {p:?}");
        }
    }
}

/// The chain alone writes the unscaled, clipped gradients; a skipped step leaves them as
/// they arrived. The same on both backends, and the state carries the scale over.
#[test]
fn the_chain_alone_unscales_and_clips_in_place() {
    let ctx = gpu();
    let first = scaled(&rows()[0], 65536.0, false);
    let arena = upload(&ctx, &first);
    let tensors = gpu_tensors(&arena, &first, &infos());
    let mut on_gpu = GpuClipper::new(&ctx, &tensors, None, chain(65536.0)).unwrap();
    let mut on_cpu = CpuClipper::new(chain(65536.0), &infos()).unwrap();
    let mut scale = 65536.0;
    for (step, row) in rows().iter().enumerate() {
        let grads = scaled(row, scale, false);
        common::write(&ctx, &arena, &grads);
        let rg = on_gpu.step().unwrap().wait().unwrap();
        let mut host = grads.clone();
        let rc = on_cpu.step(&mut common::muts(&mut host), None).unwrap();
        assert_eq!(rg.loss_scale, rc.loss_scale, "step {step}");
        let got = download(&ctx, &arena, &grads);
        if row.skipped {
            assert_eq!(
                bits(&got),
                bits(&grads),
                "step {step}: a skipped step writes nothing"
            );
            assert_eq!(bits(&host), bits(&grads), "step {step}");
        } else {
            let coef = (1.0 / (row.norm + 1e-6)).min(1.0) as f64;
            let unscaled = [&row.w[..], &[row.b]].concat();
            let flat: Vec<f64> = got.iter().flat_map(|t| t.to_f64()).collect();
            let flat_cpu: Vec<f64> = host.iter().flat_map(|t| t.to_f64()).collect();
            for (i, &u) in unscaled.iter().enumerate() {
                let want = u as f64 * coef;
                assert!(
                    (flat[i] - want).abs() <= 1e-6 * want.abs().max(1e-3),
                    "step {step}"
                );
                assert_eq!(
                    flat[i] as f32, flat_cpu[i] as f32,
                    "step {step}: GPU vs CPU"
                );
            }
        }
        scale = rg.loss_scale.unwrap().next;
    }
    // The scale and its count of finite steps are state, the same on both backends.
    let (sg, sc) = (on_gpu.state().unwrap(), on_cpu.state());
    assert_eq!(sg.loss_scale(), sc.loss_scale());
    let ls = sg.loss_scale().unwrap();
    assert_eq!((ls.scale, ls.finite_steps), (32768.0, 1));
    let back = PolicyState::from_bytes(&sg.to_bytes()).unwrap();
    let mut resumed = CpuClipper::new(chain(65536.0), &infos()).unwrap();
    resumed.set_state(&back).unwrap();
    assert_eq!(resumed.state().loss_scale(), Some(ls));
}

/// A state of a chain without loss scaling, or with another rule, does not restore; a
/// scale of 0, NaN or infinity in a saved state is refused.
#[test]
fn states_carry_their_loss_scale() {
    // The same chain without loss scaling (a loss-scaled chain skips non-finite steps).
    let skip = NonFinitePolicy::SkipStep;
    let plain = CpuClipper::new(ClipPolicy::global_norm(1.0).non_finite(skip), &infos()).unwrap();
    let mut scaled = CpuClipper::new(chain(65536.0), &infos()).unwrap();
    let other = CpuClipper::new(chain(1024.0), &infos()).unwrap();
    let why = |e: ClipError| e.to_string();
    let e = scaled.set_state(plain.state()).unwrap_err();
    assert!(
        why(e).contains("loss scaling"),
        "a state without a loss scale"
    );
    let e = scaled.set_state(other.state()).unwrap_err();
    assert!(why(e).contains("loss scaling"), "another rule");
    assert_eq!(scaled.state().loss_scale().map(|l| l.scale), Some(65536.0));
    assert_eq!(plain.state().loss_scale(), None);
    let good = scaled.state().to_bytes();
    // The scale is a word of the header after the capacity and the undo words: find it by
    // its bits.
    let at = (good.windows(4))
        .position(|w| w == 65536.0f32.to_le_bytes())
        .unwrap();
    for bad in [0.0f32, f32::NAN, f32::INFINITY, -1.0, 1e-40] {
        let mut bytes = good.clone();
        bytes[at..at + 4].copy_from_slice(&bad.to_le_bytes());
        let state = PolicyState::from_bytes(&bytes).unwrap();
        let e = scaled.set_state(&state).unwrap_err();
        assert!(matches!(e, ClipError::InvalidState(_)), "{bad}: {e}");
    }
    assert_eq!(scaled.state().loss_scale().unwrap().scale, 65536.0);
}

/// Accumulation: the scale stays through the micro-batches of one accumulation and moves
/// at its boundary, where the sums are unscaled and clipped; on host slices on the GPU and
/// on the CPU alike.
#[test]
fn accumulated_micro_batches_are_unscaled_at_the_boundary() {
    let ctx = gpu();
    for backend in [Backend::Gpu(ctx.clone()), Backend::Cpu] {
        let mut acc = Clipper::accumulating(backend, chain(65536.0), &infos(), 2).unwrap();
        let name = acc.describe();
        let mut scale = 65536.0;
        for (step, row) in rows()[..4].iter().enumerate() {
            let micro = scaled(row, scale, false);
            let mut sums = scaled(row, 0.0, false);
            let first = acc.step(&mut common::muts(&mut sums), &common::refs(&micro), None);
            assert!(
                first.unwrap().is_none(),
                "{name} step {step}: not a boundary"
            );
            let report = acc
                .step(&mut common::muts(&mut sums), &common::refs(&micro), None)
                .unwrap()
                .expect("a boundary");
            let ls = report.loss_scale.unwrap();
            assert_eq!(
                (ls.scale, ls.next),
                (scale, row.scale_after),
                "{name} step {step}"
            );
            assert_eq!(report.skipped, row.skipped, "{name} step {step}");
            if !row.skipped {
                // The mean of two equal micro-batches, unscaled and clipped.
                let coef = (1.0 / (row.norm + 1e-6)).min(1.0);
                let want = [&row.w[..], &[row.b]].concat();
                let got: Vec<f64> = sums.iter().flat_map(|t| t.to_f64()).collect();
                for (g, w) in got.iter().zip(want) {
                    let w = (w * coef) as f64;
                    assert!(
                        (g - w).abs() <= 1e-6 * w.abs().max(1e-3),
                        "{name} step {step}: {g} vs {w}"
                    );
                }
            }
            scale = ls.next;
        }
    }
}

/// The monitor keeps the scale of every step: its CSV's last column, its chart.
#[test]
fn the_monitor_records_the_scale() {
    let mut monitor = gradclip::GradMonitor::new();
    let mut run = CpuClipper::new(chain(65536.0), &infos()).unwrap();
    for row in &rows()[..3] {
        let mut grads = scaled(row, 1.0, false);
        monitor.record(run.step(&mut common::muts(&mut grads), None).unwrap());
    }
    let dir = std::env::temp_dir().join(format!("gradclip-loss-scale-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    monitor.write_csv(dir.join("steps.csv")).unwrap();
    let csv = std::fs::read_to_string(dir.join("steps.csv")).unwrap();
    let last: Vec<&str> = (csv.lines())
        .map(|l| l.rsplit(',').next().unwrap())
        .collect();
    assert_eq!(last, ["loss_scale", "65536", "65536", "65536"]);
    monitor.plot_loss_scale(dir.join("scale.svg")).unwrap();
    assert!(std::fs::metadata(dir.join("scale.svg")).unwrap().len() > 0);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn bad_loss_scales_are_refused() {
    let refused = |ls: LossScale| {
        let chain = ClipPolicy::global_norm(1.0).loss_scale(ls);
        matches!(chain.validate(), Err(ClipError::InvalidConfig(_)))
    };
    assert!(refused(LossScale::fixed(0.0)));
    assert!(refused(LossScale::fixed(f32::NAN)));
    assert!(refused(LossScale::fixed(f32::INFINITY)));
    assert!(refused(LossScale::dynamic().growth(0.5, 10)));
    assert!(refused(LossScale::dynamic().growth(2.0, 0)));
    assert!(refused(LossScale::dynamic().backoff(0.0)));
    assert!(refused(LossScale::dynamic().backoff(1.5)));
    assert!(refused(LossScale::dynamic().bounds(2.0, 1.0)));
    assert!(refused(LossScale::dynamic().init(1e30).bounds(1.0, 1e20)));
    assert!(!refused(LossScale::fixed(1024.0)));
    // Another non-finite policy after the loss scale, or no norm stage.
    let zero_nans = ClipPolicy::global_norm(1.0)
        .loss_scale(LossScale::dynamic())
        .non_finite(NonFinitePolicy::ZeroNans);
    assert!(zero_nans.validate().is_err());
    assert!(CpuClipper::new(zero_nans, &infos()).is_err());
    let measure = ClipPolicy::total_norm().loss_scale(LossScale::dynamic());
    assert!(measure.validate().is_err());
}
