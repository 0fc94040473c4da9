// common.wgsl: helpers prepended to every gradclip kernel (not a kernel itself).
//
// The norm accumulator is a monoid over |x|: (scale, sum, flags) stands for
// scale^p * sum (for p = inf, for scale alone). `scale` is the largest finite
// magnitude seen, so every term folded into `sum` is at most 1: nothing
// overflows for inputs up to f32::MAX and tiny inputs are not squared into 0.
// Non-finite elements never enter scale/sum; they set flag bits instead.
// src/norm.rs holds the host twin of this monoid.

const FLAG_INF: u32 = 1u;
const FLAG_NAN: u32 = 2u;

const DTYPE_F32: u32 = 0u;
const DTYPE_F16: u32 = 1u;
const DTYPE_BF16: u32 = 2u;

// Norm kinds, selected per pipeline with the NORM_KIND override constant.
const KIND_INF: u32 = 0u;
const KIND_L1: u32 = 1u;
const KIND_L2: u32 = 2u;
const KIND_P: u32 = 3u;

struct Acc {
    scale: f32,
    sum: f32,
    flags: u32,
    _pad: u32,
}

// What the finishing pass leaves for the host and for the scaling pass.
struct ReportHeader {
    norm: Acc,
    coef: f32,
    status: u32,
    _pad0: u32,
    _pad1: u32,
}

// Per-step parameters, written by the host only when they change.
struct StepParams {
    max_norm: f32,
    p: f32,
    inv_p: f32,
    policy: u32,       // 0 propagate, 1 error, 2 skip step
    lo: f32,           // value clip bounds, f32
    hi: f32,
    lo_half: u32,      // bounds rounded to f16 (low 16 bits) and bf16 (high 16 bits)
    hi_half: u32,
    given: Acc,        // norm supplied by the caller (split API)
}

// Per-dispatch parameters, fixed when the batch is planned.
struct DispatchParams {
    first_chunk: u32,  // this dispatch's slice of the chunk table
    n_chunks: u32,     // workgroups with work (or inputs to combine)
    use_given: u32,    // 1: `total` takes step.given instead of reducing (split API)
    _pad: u32,
}

// One row of a chunk table (src/plan): one workgroup's share of a segment. Element k of
// the chunk (k < len) is element `start + k * stride` of the binding window and element
// `index + k * stride` of tensor `tensor`.
struct Chunk {
    seg: u32,
    start: u32,
    len: u32,
    dtype: u32,
    stride: u32,
    tensor: u32,
    index: u32,
    _pad: u32,
}

// Configuration of a clipping policy (src/policies) for one step, written by the host
// only when it changes.
struct PolicyParams {
    multiplier: f32,   // schedule factor of this step
    lambda: f32,       // AGC
    eps: f32,          // AGC
    percentile: f32,   // AutoClip, in [0, 100]
    capacity: u32,     // AutoClip history size, ZClip warmup
    alpha: f32,        // ZClip
    z_thresh: f32,     // ZClip
    z_eps: f32,        // ZClip
    cap: f32,          // optional max_norm cap of the adaptive rules (0: none)
    sigma: f32,        // Gaussian noise std (0: none)
    seed_lo: u32,
    seed_hi: u32,
    step_lo: u32,
    step_hi: u32,
    _pad0: u32,
    _pad1: u32,
}

// What the policy passes leave for the host (word 6, status, is also read by the
// elementwise pass).
struct PolicyHeader {
    norm: Acc,
    threshold: f32,
    coef: f32,
    status: u32,
    clipped: atomic<u32>,
    skips: u32,
    _pad0: u32,
    _pad1: u32,
    _pad2: u32,
}

fn acc_identity() -> Acc {
    return Acc(0.0, 0.0, 0u, 0u);
}

// |x|^p for a ratio in [0, 1].
fn pow_ratio(r: f32, kind: u32, p: f32) -> f32 {
    if (kind == KIND_L1) {
        return r;
    }
    if (kind == KIND_L2) {
        return r * r;
    }
    if (r == 0.0) {
        return 0.0;
    }
    return pow(r, p);
}

fn acc_combine(a: Acc, b: Acc, kind: u32, p: f32) -> Acc {
    let flags = a.flags | b.flags;
    if (kind == KIND_INF) {
        return Acc(max(a.scale, b.scale), 0.0, flags, 0u);
    }
    var big = a;
    var small = b;
    if (b.scale > a.scale) {
        big = b;
        small = a;
    }
    if (big.scale == 0.0) {
        return Acc(0.0, 0.0, flags, 0u);
    }
    let sum = big.sum + small.sum * pow_ratio(small.scale / big.scale, kind, p);
    return Acc(big.scale, sum, flags, 0u);
}

// Bits of a non-finite f32 have an all-ones exponent; checked on bits because
// shader compilers may assume float comparisons never see NaN.
fn nonfinite_flag(bits: u32) -> u32 {
    if ((bits & 0x7f800000u) != 0x7f800000u) {
        return 0u;
    }
    if ((bits & 0x007fffffu) != 0u) {
        return FLAG_NAN;
    }
    return FLAG_INF;
}

fn nan_f32() -> f32 {
    return bitcast<f32>(0x7fc00000u);
}

// f16 bits -> f32, exact for subnormal halves (they become normal f32).
fn f16_to_f32(h: u32) -> f32 {
    let sign = (h & 0x8000u) << 16u;
    let e = (h >> 10u) & 0x1fu;
    let m = h & 0x3ffu;
    if (e == 0u) {
        return bitcast<f32>(sign | bitcast<u32>(f32(m) * 5.9604645e-8));
    }
    if (e == 31u) {
        return bitcast<f32>(sign | 0x7f800000u | (m << 13u));
    }
    return bitcast<f32>(sign | ((e + 112u) << 23u) | (m << 13u));
}

// f32 -> f16 bits, round to nearest even; NaN stays NaN (quieted), overflow gives inf.
fn f32_to_f16(x: f32) -> u32 {
    let b = bitcast<u32>(x);
    let sign = (b >> 16u) & 0x8000u;
    let e = (b >> 23u) & 0xffu;
    let m = b & 0x7fffffu;
    if (e == 0xffu) {
        if (m != 0u) {
            return sign | 0x7e00u | (m >> 13u);
        }
        return sign | 0x7c00u;
    }
    let ex = i32(e) - 112;
    if (ex >= 31) {
        return sign | 0x7c00u;
    }
    if (ex <= 0) {
        if (ex < -10) {
            return sign;
        }
        let full = m | 0x800000u;
        let shift = u32(14 - ex);
        var h = full >> shift;
        let rem = full & ((1u << shift) - 1u);
        let halfway = 1u << (shift - 1u);
        if (rem > halfway || (rem == halfway && (h & 1u) == 1u)) {
            h = h + 1u;
        }
        return sign | h;
    }
    var h = (u32(ex) << 10u) | (m >> 13u);
    let rem = m & 0x1fffu;
    if (rem > 0x1000u || (rem == 0x1000u && (h & 1u) == 1u)) {
        h = h + 1u; // a carry into the exponent is the correct rounding, up to inf
    }
    return sign | h;
}

fn bf16_to_f32(h: u32) -> f32 {
    return bitcast<f32>(h << 16u);
}

// f32 -> bf16 bits, round to nearest even; NaN stays NaN (quieted).
fn f32_to_bf16(x: f32) -> u32 {
    let b = bitcast<u32>(x);
    if ((b & 0x7fffffffu) > 0x7f800000u) {
        return (b >> 16u) | 0x40u;
    }
    return (b + 0x7fffu + ((b >> 16u) & 1u)) >> 16u;
}

fn half_to_f32(h: u32, dtype: u32) -> f32 {
    if (dtype == DTYPE_F16) {
        return f16_to_f32(h);
    }
    return bf16_to_f32(h);
}

fn f32_to_half(x: f32, dtype: u32) -> u32 {
    if (dtype == DTYPE_F16) {
        return f32_to_f16(x);
    }
    return f32_to_bf16(x);
}

// Dispatches longer than max_compute_workgroups_per_dimension are folded into 2-D.
fn linear_workgroup(wid: vec3<u32>, nwg: vec3<u32>) -> u32 {
    return wid.y * nwg.x + wid.x;
}
