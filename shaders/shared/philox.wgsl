// philox.wgsl: Philox4x32-10 and Gaussian noise, imported by the kernels that add noise.
// No bindings, no entry points.
//
// The generator is counter-based: the noise of an element is a pure function of
// (seed, step, tensor, index), so it does not depend on the launch geometry or the
// device, and the CPU twin (src/cpu/philox.rs) produces the same integer stream.

#import abi

const PHILOX_M0: u32 = 0xD2511F53u;
const PHILOX_M1: u32 = 0xCD9E8D57u;
const PHILOX_W0: u32 = 0x9E3779B9u;
const PHILOX_W1: u32 = 0xBB67AE85u;

// (low, high) words of the 64-bit product a * b; WGSL has no 64-bit integers, so the
// product is assembled from 16-bit limbs.
fn mulhilo(a: u32, b: u32) -> vec2<u32> {
    let a0 = a & 0xffffu;
    let a1 = a >> 16u;
    let b0 = b & 0xffffu;
    let b1 = b >> 16u;
    let p00 = a0 * b0;
    let p01 = a0 * b1;
    let p10 = a1 * b0;
    let p11 = a1 * b1;
    // Middle column: at most 3 * (2^16 - 1), no overflow.
    let mid = (p00 >> 16u) + (p01 & 0xffffu) + (p10 & 0xffffu);
    let lo = (p00 & 0xffffu) | (mid << 16u);
    let hi = p11 + (p01 >> 16u) + (p10 >> 16u) + (mid >> 16u);
    return vec2<u32>(lo, hi);
}

fn philox4x32_10(counter: vec4<u32>, key: vec2<u32>) -> vec4<u32> {
    var c = counter;
    var k = key;
    for (var round = 0u; round < 10u; round = round + 1u) {
        if (round > 0u) {
            k = k + vec2<u32>(PHILOX_W0, PHILOX_W1);
        }
        let p0 = mulhilo(PHILOX_M0, c.x);
        let p1 = mulhilo(PHILOX_M1, c.z);
        c = vec4<u32>(p1.y ^ c.y ^ k.x, p1.x, p0.y ^ c.w ^ k.y, p0.x);
    }
    return c;
}

// (0, 1]: ((x >> 8) + 1) / 2^24, exact in f32 and never 0.
fn uniform_open(x: u32) -> f32 {
    return f32((x >> 8u) + 1u) * 5.9604645e-8;
}

// -ln(uniform_open(x)), accurate in relative terms: near u = 1, where `log` is only
// bounded in absolute error, the series of -ln(1 - d) in the exact d = 1 - u.
// CPU twin: neg_log_uniform_open in src/cpu/philox.rs.
fn neg_log_uniform_open(x: u32) -> f32 {
    let m = (~x) >> 8u;
    if (m < 65536u) {
        let d = f32(m) * 5.9604645e-8;
        return d * (1.0 + d * (0.5 + d * (1.0 / 3.0)));
    }
    return -log(uniform_open(x));
}

// Standard normal of element `index` of tensor `tensor` at step `step` (lo, hi) under
// `seed` (lo, hi): lane index % 4 of the block with counter (index / 4, tensor, step),
// Box-Muller on words (0, 1) for lanes 0-1 and (2, 3) for lanes 2-3.
fn gaussian_noise(seed: vec2<u32>, step: vec2<u32>, tensor: u32, index: u32) -> f32 {
    let r = philox4x32_10(vec4<u32>(index >> 2u, tensor, step.x, step.y), seed);
    let lane = index & 3u;
    var a = r.x;
    var b = r.y;
    if (lane >= 2u) {
        a = r.z;
        b = r.w;
    }
    let radius = sqrt(2.0 * neg_log_uniform_open(a));
    let theta = 6.2831855 * uniform_open(b);
    if ((lane & 1u) == 0u) {
        return radius * cos(theta);
    }
    return radius * sin(theta);
}

// The noise a step adds to element `index` of tensor `tensor`: sigma times the standard
// normal keyed by the step's seed and counter.
fn step_noise(p: StepParams, tensor: u32, index: u32) -> f32 {
    let seed = vec2<u32>(p.seed_lo, p.seed_hi);
    return p.sigma * gaussian_noise(seed, vec2<u32>(p.step_lo, p.step_hi), tensor, index);
}
