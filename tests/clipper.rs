//! `Clipper`, the host-slice entry point: any chain on a GPU equals the same chain on the
//! CPU, state carries over between backends and element types, errors leave the host
//! data as it was, and the default backend is a hardware GPU or the CPU.

mod common;

use common::{gpu, host, muts, refs, Host};
use gradclip::{
    Agc, AutoClip, Backend, ClipError, ClipPolicy, Clipper, GpuContext, NonFinitePolicy, Rule,
    TensorInfo, UnitAxis, ValueClip,
};

fn infos() -> Vec<TensorInfo> {
    vec![
        TensorInfo::new("w", &[3, 5]),
        TensorInfo::new("b", &[7]),
        TensorInfo::new("h", &[2, 9]),
    ]
}

/// Gradients for `infos()` at step `k`, of dtypes (f32, f16, bf16), with a NaN in step 1.
fn grads(k: usize) -> Vec<Host> {
    let v = |n: usize, s: f32| -> Vec<f32> {
        (0..n)
            .map(|i| s * ((i * 7 + k * 3) % 11) as f32 - s * 4.0)
            .collect()
    };
    let mut w = v(15, 0.3 * (k + 1) as f32);
    if k == 1 {
        w[4] = f32::NAN;
    }
    vec![host(0, w), host(1, v(7, 0.2)), host(2, v(18, 0.05))]
}

fn params() -> Vec<Host> {
    let v = |n: usize| (0..n).map(|i| 0.1 + 0.01 * i as f32).collect::<Vec<f32>>();
    vec![host(0, v(15)), host(1, v(7)), host(2, v(18))]
}

/// AGC, then AutoClip, then a value clip, NaNs zeroed: state, three stages, one pass.
fn chain() -> ClipPolicy {
    ClipPolicy::new(Rule::Agc(Agc::new(0.02).axis(UnitAxis::First)))
        .then(Rule::AutoClip(AutoClip::new(50.0, 8)))
        .value(ValueClip::symmetric(0.4))
        .non_finite(NonFinitePolicy::ZeroNans)
}

/// Within one ulp of the element type (relative), both NaN or both equal otherwise.
fn assert_close(a: &[Host], b: &[Host], what: &str) {
    assert_eq!(a.len(), b.len(), "{what}: tensor count");
    for (t, (x, y)) in a.iter().zip(b).enumerate() {
        let rel = match x {
            Host::F32(_) => 1e-5,
            Host::F16(_) => 2f64.powi(-10),
            Host::BF16(_) => 2f64.powi(-7),
        };
        let (x, y) = (x.to_f64(), y.to_f64());
        assert_eq!(x.len(), y.len(), "{what}: tensor {t} length");
        for (i, (p, q)) in x.iter().zip(&y).enumerate() {
            assert!(
                common::close(*p, *q, rel),
                "{what}: tensor {t}[{i}]: {p} vs {q}"
            );
        }
    }
}

#[test]
fn any_chain_on_the_gpu_equals_the_cpu_and_state_moves_between_them() {
    let gpu = gpu();
    let mut on_gpu = Clipper::new(Backend::Gpu(gpu.clone()), chain(), &infos()).unwrap();
    let mut on_cpu = Clipper::new(Backend::Cpu, chain(), &infos()).unwrap();
    let p = params();
    for k in 0..4 {
        let (mut a, mut b) = (grads(k), grads(k));
        let ra = on_gpu.step(&mut muts(&mut a), Some(&refs(&p))).unwrap();
        let rb = on_cpu.step(&mut muts(&mut b), Some(&refs(&p))).unwrap();
        assert_close(&a, &b, &format!("step {k}"));
        assert_eq!((ra.step, rb.step), (k as u64, k as u64));
        assert_eq!(ra.stages.len(), 2);
        assert_eq!(ra.nans_zeroed, k == 1);
        assert_eq!(ra.clipped_units, rb.clipped_units, "step {k}");
        assert!(common::close(ra.total_norm, rb.total_norm, 1e-5));
        // The value clip ran last: no element beyond the bound.
        assert!(a.iter().flat_map(|t| t.to_f64()).all(|x| x.abs() <= 0.4));
        assert!(a.iter().flat_map(|t| t.to_f64()).any(|x| x != 0.0));
    }
    // The GPU's AutoClip history continues on the CPU, and back.
    let saved = on_gpu.state().unwrap();
    assert_eq!(saved.steps_taken(), 4);
    assert_eq!(saved.adaptive()[0].norms_seen, 4);
    let (gh, ch) = (
        saved.adaptive()[0].history.clone(),
        on_cpu.state().unwrap().adaptive()[0].history.clone(),
    );
    assert_eq!(gh.len(), ch.len());
    for (g, c) in gh.iter().zip(&ch) {
        assert!(
            common::close(*g as f64, *c as f64, 1e-6),
            "history {gh:?} vs {ch:?}"
        );
    }
    let mut fresh = Clipper::new(Backend::Cpu, chain(), &infos()).unwrap();
    fresh.set_state(&saved).unwrap();
    let (mut a, mut b) = (grads(4), grads(4));
    let ra = fresh.step(&mut muts(&mut a), Some(&refs(&p))).unwrap();
    let rb = on_gpu.step(&mut muts(&mut b), Some(&refs(&p))).unwrap();
    assert_eq!((ra.step, rb.step), (4, 4));
    assert_close(&a, &b, "after the state moved");
}

#[test]
fn new_element_types_rebuild_the_gpu_plan_and_keep_the_state() {
    let gpu = gpu();
    let policy = ClipPolicy::new(Rule::AutoClip(AutoClip::new(50.0, 8)));
    let infos = infos();
    let mut clipper = Clipper::new(Backend::Gpu(gpu.clone()), policy.clone(), &infos).unwrap();
    let mut oracle = Clipper::new(Backend::Cpu, policy, &infos).unwrap();
    for k in 0..3 {
        let mut g = grads(k + 2);
        // Step 1 sends the first tensor as bf16: a new mirror and plan, same history.
        if k == 1 {
            g[0] = host(2, g[0].to_f64().iter().map(|&x| x as f32).collect());
        }
        let mut h = g.clone();
        let r = clipper.step(&mut muts(&mut g), None).unwrap();
        let o = oracle.step(&mut muts(&mut h), None).unwrap();
        assert_eq!(r.step, k as u64);
        let (t, u) = (r.threshold.unwrap() as f64, o.threshold.unwrap() as f64);
        assert!(common::close(t, u, 1e-6), "step {k}: threshold {t} vs {u}");
        assert_close(&g, &h, &format!("step {k}"));
    }
    assert_eq!(clipper.state().unwrap().adaptive()[0].norms_seen, 3);
}

#[test]
fn bad_steps_leave_the_host_data_and_the_state_untouched() {
    let gpu = gpu();
    for backend in [Backend::Gpu(gpu.clone()), Backend::Cpu] {
        let name = format!("{backend:?}");
        // A clipper always has a policy: a bad one is refused when it is built, on
        // every backend (there is no clipper without a policy to step).
        let e = Clipper::new(backend.clone(), ClipPolicy::global_norm(-1.0), &infos()).unwrap_err();
        assert!(matches!(e, ClipError::InvalidConfig(_)), "{name}: {e}");
        let mut g = grads(0);
        let before = g.clone();

        let mut clipper = Clipper::new(backend, chain(), &infos()).unwrap();
        // AGC without the parameters.
        let e = clipper.step(&mut muts(&mut g), None).unwrap_err();
        assert!(matches!(e, ClipError::InvalidConfig(_)), "{name}: {e}");
        // A tensor of the wrong length.
        let mut short = grads(0);
        short[1] = host(1, vec![0.5; 6]);
        let copy = short.clone();
        let e = (clipper.step(&mut muts(&mut short), Some(&refs(&params())))).unwrap_err();
        assert!(matches!(e, ClipError::ShapeMismatch { .. }), "{name}: {e}");
        assert_eq!(short, copy);
        assert_eq!(g, before);
        let state = clipper.state().unwrap();
        let seen: Vec<u32> = state.adaptive().iter().map(|a| a.norms_seen).collect();
        assert!(
            state.steps_taken() == 0 && seen.iter().all(|&n| n == 0),
            "{name}"
        );
    }
    // A configuration error comes at construction.
    let bad = ClipPolicy::new(Rule::GlobalNorm(-1.0));
    assert!(Clipper::new(Backend::Cpu, bad, &infos()).is_err());
}

#[test]
fn the_default_backend_is_a_hardware_gpu_or_the_cpu() {
    // Opening adapters touches a GL context too: take the GPU turn.
    let _turn = gpu();
    let mut clipper = Clipper::new(Backend::best(), chain(), &infos()).unwrap();
    match GpuContext::hardware() {
        Ok(_) => assert!(matches!(clipper.backend(), Backend::Gpu(_))),
        Err(e) => {
            assert!(matches!(e, ClipError::NoAdapter(_)), "{e}");
            assert!(matches!(clipper.backend(), Backend::Cpu));
            assert_eq!(clipper.describe(), "CPU (rayon)");
        }
    }
    // Whatever it chose, it clips.
    let mut g = grads(2);
    let report = clipper.step(&mut muts(&mut g), Some(&refs(&params())));
    assert_eq!(report.unwrap().step, 0);
}
