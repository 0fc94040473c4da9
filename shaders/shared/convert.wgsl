// convert.wgsl: f16 and bf16 to and from f32 (round to nearest even), bit-exact with
// the CPU twins in src/cpu/apply.rs and the half crate.

#import abi

// f16 bits -> f32, exact for subnormal halves (they become normal f32); without branches,
// as `f32_to_f16`.
fn f16_to_f32(h: u32) -> f32 {
    let sign = (h & 0x8000u) << 16u;
    let e = (h >> 10u) & 0x1fu;
    let m = h & 0x3ffu;
    let subnormal = bitcast<u32>(f32(m) * 5.9604645e-8);
    // NaN comes out quiet, as in `half` and the CPU twin.
    let special = 0x7f800000u | (m << 13u) | select(0u, 0x400000u, m != 0u);
    let normal = ((e + 112u) << 23u) | (m << 13u);
    return bitcast<f32>(sign | select(select(normal, special, e == 31u), subnormal, e == 0u));
}

// f32 -> f16 bits, round to nearest even; NaN stays NaN (quieted), overflow gives inf.
// Without branches (lanes of one SIMD batch of a software adapter would take different
// ones) and in integers alone, so no float rounding mode is assumed: below 2^-14 the
// significand is shifted to the f16 subnormal and rounded; else the exponent is rebiased
// and the 13 dropped bits round to nearest even.
fn f32_to_f16(x: f32) -> u32 {
    let b = bitcast<u32>(x);
    let sign = (b >> 16u) & 0x8000u;
    let a = b & 0x7fffffffu;
    let nan = 0x7e00u | ((a & 0x7fffffu) >> 13u);
    // f32 subnormals shift out entirely (their missing leading bit does not matter).
    let shift = u32(clamp(126 - i32(a >> 23u), 14, 31));
    let full = (a & 0x7fffffu) | 0x800000u;
    let kept = full >> shift;
    let rem = full & ((1u << shift) - 1u);
    let halfway = 1u << (shift - 1u);
    let up = (rem > halfway) | ((rem == halfway) & ((kept & 1u) == 1u));
    let sub = kept + select(0u, 1u, up);
    let normal = (a - (112u << 23u) + 0xfffu + ((a >> 13u) & 1u)) >> 13u;
    var h = select(normal, sub, a < 0x38800000u);
    h = select(h, 0x7c00u, a >= 0x47800000u);
    h = select(h, nan, a > 0x7f800000u);
    return sign | h;
}

fn bf16_to_f32(h: u32) -> f32 {
    return bitcast<f32>(h << 16u);
}

// f32 -> bf16 bits, round to nearest even; NaN stays NaN (quieted).
fn f32_to_bf16(x: f32) -> u32 {
    let b = bitcast<u32>(x);
    let rounded = (b + 0x7fffu + ((b >> 16u) & 1u)) >> 16u;
    return select(rounded, (b >> 16u) | 0x40u, (b & 0x7fffffffu) > 0x7f800000u);
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


// The bits of 16-bit element `e` in its word `word` (element 2w is the low half of word w).
fn half_of(word: u32, e: u32) -> u32 {
    return (word >> ((e & 1u) * 16u)) & 0xffffu;
}

// The words a contiguous 16-bit chunk touches: [first_word, end_word). A half of an edge
// word may lie outside the chunk.
fn first_word(c: Chunk) -> u32 {
    return c.start >> 1u;
}

fn end_word(c: Chunk) -> u32 {
    return (c.start + c.len + 1u) >> 1u;
}
