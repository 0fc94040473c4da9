// rewrite.wgsl: the engine's `rewrite` stage, the one in-place elementwise pass of a step
// with all its elementwise work fused (`transform`: NaNs to zero, times the unit's
// coefficient, plus Gaussian noise, clamped to [lo, hi]).
//
// Bindings (group 0):
//   0 grads     storage, read_write  one binding window of a gradient buffer, as words
//   1 chunks    storage, read        the unit chunk table (Chunk) of `reduce`, or for one
//                                    coefficient without noise the chunks over spans
//   2 partials  storage, read_write  the reduce's, unused here (one bind group per window
//                                    serves the reduce over its chunks and this pass)
//   3 step      uniform              StepParams of this step, at a dynamic offset
//   4 dispatch  uniform              DispatchParams: this window's slice of the chunk table
//   5 coefs     storage, read        coefficient per unit (coef.wgsl `coefs`)
//   6 report    storage, read        StepReport as words (read-only: its counter is atomic)
//
// One workgroup rewrites one chunk, or returns at once when the step is held or its unit
// needs nothing (coefficient 1, no noise, clamp or NaN to remove): the pass is dispatched
// over every chunk with no host round trip, and a step that changes nothing costs each
// workgroup a few reads. (An indirect dispatch sized by `coef` would skip even those, but
// wgpu validates each indirect dispatch with one of its own, which cost more host time
// than the whole rewrite's encoding with one buffer per tensor.) Entry `main` serves programs whose units own whole 32-bit words. Where units
// may end inside a word (odd-length 16-bit units, strided 16-bit AGC columns), entry
// `shared_words` updates a word whose other half belongs to another chunk with an atomic
// XOR of this half's bits only: no lost updates, and the other half is never written. An
// element whose value does not change keeps its exact bits. CPU twin: src/cpu/engine.rs (`rewrite`).

#import convert
#import grid
#import transform

// The same binding seen two ways: plain words by `main`, atomic words by `shared_words`.
@group(0) @binding(0) var<storage, read_write> words: array<u32>;
@group(0) @binding(0) var<storage, read_write> grads: array<atomic<u32>>;
@group(0) @binding(1) var<storage, read> chunks: array<Chunk>;
@group(0) @binding(5) var<storage, read> coefs: array<f32>;
@group(0) @binding(3) var<uniform> step: StepParams;
@group(0) @binding(4) var<uniform> dispatch: DispatchParams;
@group(0) @binding(6) var<storage, read> report: array<u32>;

// This workgroup's chunk, coefficient and step parameters, read once, and whether it has
// anything to do.
struct Work {
    chunk: Chunk,
    coef: f32,
    run: bool,
    ew: Elementwise,
    // A clamp and nothing else: compare with the bounds, write the pre-rounded bound bits.
    clamp_alone: bool,
    // A coefficient other than 1 and nothing else.
    scale_alone: bool,
    half: HalfClamp,
}

// A 16-bit value's bits in an unsigned order (negative values flip every bit, the others
// the sign), as the host's `HalfClamp::key`.
fn half_key(h: u32) -> u32 {
    return h ^ select(0x8000u, 0xffffu, (h & 0x8000u) != 0u);
}

// A clamp alone of 16-bit values: the pre-rounded bound bits and the integer thresholds the
// host found (the decisions of comparing in f32).
struct HalfClamp {
    lo: u32,
    hi: u32,
    key_lo: u32,
    key_hi: u32,
    max_finite: u32,
}

fn half_clamp(is_f16: bool) -> HalfClamp {
    let shift = select(16u, 0u, is_f16);
    let keys = select(step.keys_bf16, step.keys_f16, is_f16);
    return HalfClamp(
        (step.lo_half >> shift) & 0xffffu,
        (step.hi_half >> shift) & 0xffffu,
        keys & 0xffffu,
        keys >> 16u,
        select(0x7f80u, 0x7c00u, is_f16),
    );
}

// Without branches; NaN keeps its bits.
fn clamp_half(h: u32, c: HalfClamp) -> u32 {
    let k = half_key(h);
    var out = select(h, c.lo, k < c.key_lo);
    out = select(out, c.hi, k > c.key_hi);
    return select(out, h, (h & 0x7fffu) > c.max_finite);
}

// `half_transform` of a bf16 value when the step only scales: the product, rounded; a
// value the product leaves as it was keeps its bits.
fn scale_bf16(h: u32, coef: f32) -> u32 {
    let x = bf16_to_f32(h);
    let y = x * coef;
    return select(f32_to_bf16(y), h, bitcast<u32>(y) == bitcast<u32>(x));
}

// The one operation of a hoisted 16-bit loop (the same for every invocation): the clamp
// alone, or the bf16 scale alone.
fn hoisted(h: u32, job: Work) -> u32 {
    if (job.clamp_alone) {
        return clamp_half(h, job.half);
    }
    return scale_bf16(h, job.coef);
}

fn f32_transform(bits: u32, job: Work, index: u32) -> u32 {
    return bitcast<u32>(transform(bitcast<f32>(bits), job.coef, job.ew, job.chunk.tensor, index));
}

fn half_transform(h: u32, job: Work, index: u32) -> u32 {
    if (job.clamp_alone) {
        return clamp_half(h, job.half);
    }
    let dtype = job.chunk.dtype;
    let x = half_to_f32(h, dtype);
    let y = transform(x, job.coef, job.ew, job.chunk.tensor, index);
    if (bitcast<u32>(y) == bitcast<u32>(x)) {
        return h;
    }
    return f32_to_half(y, dtype);
}

// Rewrites the 16-bit element `e` of the window alone, with an atomic XOR.
fn update_half(e: u32, job: Work, index: u32) {
    let w = e >> 1u;
    let shift = (e & 1u) * 16u;
    let old = (atomicLoad(&grads[w]) >> shift) & 0xffffu;
    let updated = half_transform(old, job, index);
    atomicXor(&grads[w], (old ^ updated) << shift);
}

fn work_of(inv: Invocation) -> Work {
    let status = report[STATUS_WORD];
    var ew = elementwise();
    let local = workgroup_index(inv);
    if (local >= dispatch.n_chunks || !step_runs(status, report[TAG_WORD])) {
        return Work(chunks[0], 1.0, false, ew, false, false, half_clamp(true));
    }
    let chunk = chunks[dispatch.first_chunk + local];
    var coef = 1.0;
    if (SCALE && step.rule == 1u) {
        coef = coefs[chunk.seg];
    }
    // NaNs are zeroed where the step found some; where it read no gradients (the caller's
    // total, split API), wherever the chunk is rewritten anyway; a clamp alone, whose step
    // runs no stage, zeroes any it meets.
    // Compared as bits: a NaN coefficient (Propagate) must count as work, and a compiler
    // may fold a float comparison as if NaN never occurred.
    let other = bitcast<u32>(coef) != bitcast<u32>(1.0) || ew.sigma > 0.0 || ew.clamp;
    ew.zero_nans = ew.zero_nans
        && (step.rule == 0u || (status & STATUS_NANS_ZEROED) != 0u || (step.use_given == 1u && other));
    let idle = !other && !ew.zero_nans;
    let unscaled = !SCALE || (!ew.zero_nans && bitcast<u32>(coef) == bitcast<u32>(1.0));
    let clamp_alone = CLAMP && !NOISE && ew.clamp && unscaled;
    let scale_alone = SCALE && !unscaled && !ew.zero_nans && (!NOISE || ew.sigma == 0.0)
        && (!CLAMP || !ew.clamp);
    let half = half_clamp(chunk.dtype == DTYPE_F16);
    return Work(chunk, coef, !idle, ew, clamp_alone, scale_alone, half);
}

// Word `w` of a contiguous 16-bit chunk rewritten; a half outside the chunk keeps its bits
// (both halves are computed and the outside one discarded, without branches).
fn rewrite_word(bits: u32, job: Work, w: u32) -> u32 {
    let c = job.chunk;
    let lo = bits & 0xffffu;
    let hi = bits >> 16u;
    let e0 = w * 2u;
    let i0 = c.index + e0 - c.start; // wraps for a low half before the chunk: discarded
    let new_lo = select(lo, half_transform(lo, job, i0), e0 >= c.start);
    let new_hi = select(hi, half_transform(hi, job, i0 + 1u), e0 + 1u < c.start + c.len);
    return new_lo | (new_hi << 16u);
}

// Entry `main`, for chunk tables where no word has two writers (f32 units, 16-bit units on
// word boundaries, or spans): plain loads and stores.
@compute @workgroup_size(WG)
fn main(inv: Invocation) {
    let job = work_of(inv);
    if (!job.run) {
        return;
    }
    let c = job.chunk;
    if (c.dtype == DTYPE_F32) {
        for (var k = inv.lid; k < c.len; k = k + WG) {
            let e = c.start + k * c.stride;
            words[e] = f32_transform(words[e], job, c.index + k * c.stride);
        }
        return;
    }
    if (job.clamp_alone || (job.scale_alone && c.dtype == DTYPE_BF16)) {
        // The clamp, or the bf16 scale, hoisted out of `half_transform`: its branches and
        // conversions for either 16-bit type made the 16-bit value clip 1.3-2x and the bf16
        // global clip 1.2-1.3x the plain kernels on lavapipe.
        for (var w = first_word(c) + inv.lid; w < end_word(c); w = w + WG) {
            let bits = words[w];
            let e0 = w * 2u;
            let lo = select(bits & 0xffffu, hoisted(bits & 0xffffu, job), e0 >= c.start);
            let hi = select(bits >> 16u, hoisted(bits >> 16u, job), e0 + 1u < c.start + c.len);
            words[w] = lo | (hi << 16u);
        }
        return;
    }
    for (var w = first_word(c) + inv.lid; w < end_word(c); w = w + WG) {
        words[w] = rewrite_word(words[w], job, w);
    }
}

// Entry `shared_words`, for programs where a word may hold elements of two units: every
// store is an atomic XOR of the changed bits, so the other unit's half is never written.
@compute @workgroup_size(WG)
fn shared_words(inv: Invocation) {
    let job = work_of(inv);
    if (!job.run) {
        return;
    }
    let c = job.chunk;
    if (c.stride != 1u || c.dtype == DTYPE_F32) {
        for (var k = inv.lid; k < c.len; k = k + WG) {
            let e = c.start + k * c.stride;
            let index = c.index + k * c.stride;
            if (c.dtype == DTYPE_F32) {
                let x = atomicLoad(&grads[e]);
                atomicStore(&grads[e], f32_transform(x, job, index));
            } else {
                update_half(e, job, index);
            }
        }
        return;
    }
    for (var w = first_word(c) + inv.lid; w < end_word(c); w = w + WG) {
        let bits = atomicLoad(&grads[w]);
        let changed = bits ^ rewrite_word(bits, job, w);
        if (changed != 0u) {
            atomicXor(&grads[w], changed);
        }
    }
}
