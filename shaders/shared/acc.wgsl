// acc.wgsl: the norm accumulator, a monoid over |x| (identity + combine).
//
// (scale, sum, flags) stands for scale^p * sum (for p = inf, for scale alone). `scale` is
// the largest finite magnitude seen, so every term folded into `sum` is at most 1:
// nothing overflows for inputs up to f32::MAX and tiny inputs are not squared into 0.
// Non-finite elements never enter scale/sum; they set flag bits instead.
// Host twin: src/norm.rs (NormAcc, in f64).

#import abi

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

// Bits of a non-finite f32 have an all-ones exponent; checked on bits because shader
// compilers may assume float comparisons never see NaN.
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

fn inf_f32() -> f32 {
    return bitcast<f32>(0x7f800000u);
}

fn f32_max() -> f32 {
    return bitcast<f32>(0x7f7fffffu);
}

// Flags that count under non-finite policy `policy`: ZeroNans removes NaNs before the norm.
fn live_flags(flags: u32, policy: u32) -> u32 {
    if (policy == POLICY_ZERO_NANS) {
        return flags & ~FLAG_NAN;
    }
    return flags;
}

// `a` times coefficient `c` (a norm scales linearly; a NaN coefficient poisons the norm).
// The host twin is `NormAcc::scaled`.
fn acc_scaled(a: Acc, c: f32) -> Acc {
    if (nonfinite_flag(bitcast<u32>(c)) == FLAG_NAN) {
        return Acc(a.scale, a.sum, a.flags | FLAG_NAN, 0u);
    }
    return Acc(a.scale * abs(c), a.sum, a.flags, 0u);
}
