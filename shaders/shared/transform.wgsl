// transform.wgsl: the elementwise work of a clipping step on one gradient value, shared by
// the in-place `rewrite` and the fused optimizer steps (which clip as they read). The
// importing module declares the step's parameters as `step: StepParams`.
// CPU twin: src/cpu/engine.rs (`transform`).

#import acc
#import philox

// Pipeline variants: scaling (a coefficient per unit, NaN zeroing), noise and clamping
// compiled in only where a step asks for them.
override SCALE: bool = true;
override NOISE: bool = true;
override CLAMP: bool = true;

// Whether a step's elementwise work may run, from its first report's status and tag: a
// step that norms (rule 1) is held by its `finish`; any step checks that its parameter
// slot is still its own.
fn step_runs(status: u32, tag: u32) -> bool {
    let held = step.rule == 1u && (status & STATUS_HELD) != 0u;
    return !held && tag == step.seq % TAG_RING;
}

// The step's elementwise parameters, read from the uniform once per invocation and passed
// to `transform`: lavapipe reloads a uniform at every use inside an element loop.
struct Elementwise {
    zero_nans: bool,
    sigma: f32,
    clamp: bool,
    lo: f32,
    hi: f32,
}

fn elementwise() -> Elementwise {
    return Elementwise(step.policy == POLICY_ZERO_NANS, step.sigma, step.clamp == 1u, step.lo, step.hi);
}

// `y` clamped to [lo, hi], without branches. NaN stays NaN, as in PyTorch and TensorFlow.
// It is tested on its bits: a driver may fold the comparisons into a clamp that returns a
// bound for NaN (GL does).
fn clamp_value(y: f32, ew: Elementwise) -> f32 {
    let clamped = select(select(y, ew.lo, y < ew.lo), ew.hi, y > ew.hi);
    return select(clamped, y, nonfinite_flag(bitcast<u32>(y)) == FLAG_NAN);
}

// The new value of element `index` of tensor `tensor`, whose unit has coefficient `coef`:
// NaN to zero (ZeroNans), times the coefficient, plus noise, clamped to [lo, hi].
fn transform(x: f32, coef: f32, ew: Elementwise, tensor: u32, index: u32) -> f32 {
    var y = x;
    if (SCALE && ew.zero_nans && nonfinite_flag(bitcast<u32>(x)) == FLAG_NAN) {
        y = 0.0;
    }
    if (SCALE && bitcast<u32>(coef) != bitcast<u32>(1.0)) {
        y = y * coef;
    }
    if (NOISE && ew.sigma > 0.0) {
        y = y + step_noise(step, tensor, index);
    }
    if (CLAMP && ew.clamp) {
        y = clamp_value(y, ew);
    }
    return y;
}
