//! The exploding-gradient demo (`examples/rnn_explode.rs`): its backpropagation through
//! time against finite differences, and on a shorter relu-sgd run, that clipping on the
//! GPU decides whether the RNN trains.

#[path = "../examples/support/rnn.rs"]
mod rnn;

mod common;

use rnn::{finite_difference_error, train, Activation, GpuClipper, Preset};

#[test]
fn bptt_gradients_match_finite_differences() {
    for act in [Activation::Tanh, Activation::Relu] {
        for seed in [1, 2] {
            let err = finite_difference_error(act, seed);
            assert!(err < 1e-5, "{act:?} seed {seed}: relative error {err:e}");
        }
    }
}

#[test]
fn clipping_on_the_gpu_lets_the_relu_rnn_train() {
    let preset = Preset {
        steps: 600,
        ..Preset::relu_sgd()
    };
    let seed = 42;
    let plain = train(&preset, seed, |_| {});
    let mut clipper = GpuClipper::new(&common::gpu(), 1.0).unwrap();
    let clipped = clipper.train(&preset, seed).unwrap();

    let tail = |h: &[f64]| h[h.len() - 50..].iter().sum::<f64>() / 50.0;
    let (p, c) = (tail(&plain.losses), tail(&clipped.losses));
    // The unclipped copy diverges or stalls near the target variance (4).
    assert!(!p.is_finite() || p > 2.5, "unclipped mean loss {p}");
    assert!(c < 1.5, "clipped mean loss {c}");
    assert!(
        !p.is_finite() || c < 0.5 * p,
        "clipped {c} vs unclipped {p}"
    );
    assert!(clipped.validation < 0.5 * plain.validation || !plain.validation.is_finite());

    // The monitor saw every step, in order, with the threshold and the clipped norm.
    let records = clipper.monitor.records();
    assert_eq!(records.len(), preset.steps);
    for (i, (r, host)) in records.iter().zip(&clipped.norms).enumerate() {
        assert_eq!(r.step, i as u64);
        assert_eq!(r.threshold, Some(1.0));
        // The GPU norm is of the f32 gradients, the host one of the f64 gradients.
        assert!(
            common::close(r.total_norm, *host, 1e-5),
            "step {i}: {} vs {host}",
            r.total_norm
        );
        let after = r.total_norm_after.unwrap();
        if r.total_norm > 1.0 {
            assert!(r.clipped_units == 5 && (after - 1.0).abs() < 1e-5, "{r:?}");
        } else {
            assert_eq!(after, r.total_norm);
        }
    }
}
