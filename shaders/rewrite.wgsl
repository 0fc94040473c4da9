// rewrite.wgsl: the engine's `rewrite` stage, the one in-place elementwise pass of a step
// with all its elementwise work fused: NaNs to zero (NonFinitePolicy::ZeroNans), times the
// unit's coefficient, plus Gaussian noise, clamped to [lo, hi] (value clipping).
//
// Bindings (group 0):
//   0 grads     storage, read_write  one binding window of a gradient buffer, as words
//   1 chunks    storage, read        the unit chunk table (Chunk) of `reduce`, or for one
//                                    coefficient without noise the chunks over spans
//   2 coefs     storage, read        coefficient per unit (coef.wgsl `coefs`)
//   3 step      uniform              StepParams of this step, at a dynamic offset
//   4 dispatch  uniform              DispatchParams: this window's slice of the chunk table
//   6 report    storage, read        StepReport as words (read-only: its counter is atomic)
//
// One workgroup rewrites one chunk, or returns at once when the step is held or its unit
// needs nothing (coefficient 1, no noise, clamp or NaN to remove). It is dispatched
// indirectly with the counts `coef` wrote, so a step that changes nothing runs zero
// workgroups. Entry `main` serves programs whose units own whole 32-bit words. Where units
// may end inside a word (odd-length 16-bit units, strided 16-bit AGC columns), entry
// `shared_words` updates a word whose other half belongs to another chunk with an atomic
// XOR of this half's bits only: no lost updates, and the other half is never written. An element whose value does not change
// keeps its exact bits. CPU twin: src/cpu/engine.rs (`rewrite`).

#import acc
#import convert
#import grid
#import philox

// Pipeline variants: noise and clamping compiled in only where a step asks for them.
override NOISE: bool = true;
override CLAMP: bool = true;

// The same binding seen two ways: plain words by `main`, atomic words by `shared_words`.
@group(0) @binding(0) var<storage, read_write> words: array<u32>;
@group(0) @binding(0) var<storage, read_write> grads: array<atomic<u32>>;
@group(0) @binding(1) var<storage, read> chunks: array<Chunk>;
@group(0) @binding(2) var<storage, read> coefs: array<f32>;
@group(0) @binding(3) var<uniform> step: StepParams;
@group(0) @binding(4) var<uniform> dispatch: DispatchParams;
@group(0) @binding(6) var<storage, read> report: array<u32>;

// The new value of element `index` of tensor `tensor`.
fn transform(x: f32, coef: f32, tensor: u32, index: u32) -> f32 {
    var y = x;
    if (step.policy == POLICY_ZERO_NANS && nonfinite_flag(bitcast<u32>(x)) == FLAG_NAN) {
        y = 0.0;
    }
    if (bitcast<u32>(coef) != bitcast<u32>(1.0)) {
        y = y * coef;
    }
    if (NOISE && step.sigma > 0.0) {
        let seed = vec2<u32>(step.seed_lo, step.seed_hi);
        let at = vec2<u32>(step.step_lo, step.step_hi);
        y = y + step.sigma * gaussian_noise(seed, at, tensor, index);
    }
    // NaN compares false both ways and stays NaN, as in PyTorch and TensorFlow.
    if (CLAMP && step.clamp == 1u) {
        if (y < step.lo) {
            y = step.lo;
        } else if (y > step.hi) {
            y = step.hi;
        }
    }
    return y;
}

fn f32_transform(bits: u32, coef: f32, tensor: u32, index: u32) -> u32 {
    return bitcast<u32>(transform(bitcast<f32>(bits), coef, tensor, index));
}

// A clamp and nothing else: compare with the bounds, write the pre-rounded bound bits.
fn clamp_only(coef: f32) -> bool {
    return CLAMP && !NOISE && step.clamp == 1u && step.policy != POLICY_ZERO_NANS
        && bitcast<u32>(coef) == bitcast<u32>(1.0);
}

fn half_transform(h: u32, dtype: u32, coef: f32, tensor: u32, index: u32) -> u32 {
    let x = half_to_f32(h, dtype);
    if (clamp_only(coef)) {
        let shift = select(16u, 0u, dtype == DTYPE_F16);
        if (x < step.lo) {
            return (step.lo_half >> shift) & 0xffffu;
        }
        if (x > step.hi) {
            return (step.hi_half >> shift) & 0xffffu;
        }
        return h;
    }
    let y = transform(x, coef, tensor, index);
    if (bitcast<u32>(y) == bitcast<u32>(x)) {
        return h;
    }
    return f32_to_half(y, dtype);
}

// Rewrites the 16-bit element `e` of the window alone, with an atomic XOR.
fn update_half(e: u32, dtype: u32, coef: f32, tensor: u32, index: u32) {
    let w = e >> 1u;
    let shift = (e & 1u) * 16u;
    let old = (atomicLoad(&grads[w]) >> shift) & 0xffffu;
    let updated = half_transform(old, dtype, coef, tensor, index);
    atomicXor(&grads[w], (old ^ updated) << shift);
}

// This workgroup's chunk and coefficient, and whether it has anything to do.
struct Work {
    chunk: Chunk,
    coef: f32,
    run: bool,
}

fn work_of(wid: vec3<u32>, nwg: vec3<u32>) -> Work {
    let local = linear_workgroup(wid, nwg);
    if (local >= dispatch.n_chunks || (report[STATUS_WORD] & STATUS_HELD) != 0u) {
        return Work(chunks[0], 1.0, false);
    }
    let chunk = chunks[dispatch.first_chunk + local];
    var coef = 1.0;
    if (step.rule == 1u) {
        coef = coefs[chunk.seg];
    }
    let idle = coef == 1.0 && step.sigma == 0.0 && step.policy != POLICY_ZERO_NANS
        && step.clamp == 0u;
    return Work(chunk, coef, !idle);
}

// Entry `main`, for chunk tables where no word has two writers (f32 units, 16-bit units on
// word boundaries, or spans): plain loads and stores.
@compute @workgroup_size(WG)
fn main(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let job = work_of(wid, nwg);
    if (!job.run) {
        return;
    }
    let c = job.chunk;
    if (c.dtype == DTYPE_F32) {
        for (var k = lid; k < c.len; k = k + WG) {
            let e = c.start + k * c.stride;
            words[e] = f32_transform(words[e], job.coef, c.tensor, c.index + k * c.stride);
        }
        return;
    }
    // A half outside the chunk (at the edge of a span) keeps its bits: it has no writer.
    let end = c.start + c.len;
    let end_word = (end + 1u) >> 1u;
    for (var w = (c.start >> 1u) + lid; w < end_word; w = w + WG) {
        let bits = words[w];
        var lo = bits & 0xffffu;
        var hi = bits >> 16u;
        let e0 = w * 2u;
        let i0 = c.index + e0 - c.start; // wraps for a low half before the chunk: unused
        if (e0 >= c.start) {
            lo = half_transform(lo, c.dtype, job.coef, c.tensor, i0);
        }
        if (e0 + 1u < end) {
            hi = half_transform(hi, c.dtype, job.coef, c.tensor, i0 + 1u);
        }
        words[w] = lo | (hi << 16u);
    }
}

// Entry `shared_words`, for programs where a word may hold elements of two units.
@compute @workgroup_size(WG)
fn shared_words(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let job = work_of(wid, nwg);
    if (!job.run) {
        return;
    }
    let chunk = job.chunk;
    let coef = job.coef;
    let dtype = chunk.dtype;
    if (chunk.stride != 1u || dtype == DTYPE_F32) {
        for (var k = lid; k < chunk.len; k = k + WG) {
            let e = chunk.start + k * chunk.stride;
            let index = chunk.index + k * chunk.stride;
            if (dtype == DTYPE_F32) {
                let x = atomicLoad(&grads[e]);
                atomicStore(&grads[e], f32_transform(x, coef, chunk.tensor, index));
            } else {
                update_half(e, dtype, coef, chunk.tensor, index);
            }
        }
        return;
    }
    let start = chunk.start;
    let end = start + chunk.len;
    let end_word = (end + 1u) >> 1u;
    for (var w = (start >> 1u) + lid; w < end_word; w = w + WG) {
        let e0 = w * 2u;
        let i0 = chunk.index + e0 - start; // tensor index of the low half (wraps if outside)
        if (e0 >= start && e0 + 1u < end) {
            let bits = atomicLoad(&grads[w]);
            let lo = half_transform(bits & 0xffffu, dtype, coef, chunk.tensor, i0);
            let hi = half_transform(bits >> 16u, dtype, coef, chunk.tensor, i0 + 1u);
            atomicStore(&grads[w], lo | (hi << 16u));
        } else if (e0 >= start) {
            update_half(e0, dtype, coef, chunk.tensor, i0);
        } else {
            update_half(e0 + 1u, dtype, coef, chunk.tensor, i0 + 1u);
        }
    }
}
