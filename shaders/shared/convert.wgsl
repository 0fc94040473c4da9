// convert.wgsl: f16 and bf16 to and from f32 (round to nearest even), bit-exact with
// the CPU twins in src/cpu/apply.rs and the half crate.

#import abi

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
