// segment_apply.wgsl: the in-place elementwise pass of the clipping policies: every
// segment scaled by its own coefficient, NaNs zeroed (NonFinitePolicy::ZeroNans), and
// Gaussian noise added.
//
// Bindings (group 0):
//   0 grads     storage, read_write  one binding window of a gradient buffer, as atomic words
//   1 chunks    storage, read        the reduction's chunk table (Chunk), per segment
//   2 coefs     storage, read        coefficient per segment (policy.wgsl `coefs`)
//   3 step      uniform              StepParams (non-finite policy)
//   4 dispatch  uniform              DispatchParams: this window's slice of the chunk table
//   5 config    uniform              PolicyParams (noise std, seed, step)
//   6 report    storage, read        PolicyHeader as words (read-only: its counter is atomic)
//
// One workgroup rewrites one chunk, or returns at once when its coefficient is 1 and
// there is no noise or NaN to remove. Segments may end inside a 32-bit word (odd-length
// 16-bit units, strided AGC columns), so a word whose other half belongs to another
// chunk is updated with an atomic XOR of this half's bits only: no lost updates, and the
// other half's bits are never read for writing. Words wholly inside the chunk are plain
// (atomic) stores. CPU twin: the elementwise part of src/cpu/policy.rs.

#import acc
#import convert
#import grid
#import philox

@group(0) @binding(0) var<storage, read_write> grads: array<atomic<u32>>;
@group(0) @binding(1) var<storage, read> chunks: array<Chunk>;
@group(0) @binding(2) var<storage, read> coefs: array<f32>;
@group(0) @binding(3) var<uniform> step: StepParams;
@group(0) @binding(4) var<uniform> dispatch: DispatchParams;
@group(0) @binding(5) var<uniform> config: PolicyParams;
@group(0) @binding(6) var<storage, read> report: array<u32>;

// The new value of element `index` of tensor `tensor`.
fn transform(x: f32, coef: f32, tensor: u32, index: u32) -> f32 {
    var y = x;
    if (step.policy == POLICY_ZERO_NANS && nonfinite_flag(bitcast<u32>(x)) == FLAG_NAN) {
        y = 0.0;
    }
    y = y * coef;
    if (config.sigma > 0.0) {
        let seed = vec2<u32>(config.seed_lo, config.seed_hi);
        let at = vec2<u32>(config.step_lo, config.step_hi);
        y = y + config.sigma * gaussian_noise(seed, at, tensor, index);
    }
    return y;
}

fn half_transform(h: u32, dtype: u32, coef: f32, tensor: u32, index: u32) -> u32 {
    return f32_to_half(transform(half_to_f32(h, dtype), coef, tensor, index), dtype);
}

// Rewrites the 16-bit element `e` of the window alone, with an atomic XOR.
fn update_half(e: u32, dtype: u32, coef: f32, tensor: u32, index: u32) {
    let w = e >> 1u;
    let shift = (e & 1u) * 16u;
    let old = (atomicLoad(&grads[w]) >> shift) & 0xffffu;
    let updated = half_transform(old, dtype, coef, tensor, index);
    atomicXor(&grads[w], (old ^ updated) << shift);
}

@compute @workgroup_size(WG)
fn main(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let local = linear_workgroup(wid, nwg);
    if (local >= dispatch.n_chunks || (report[POLICY_STATUS_WORD] & STATUS_HELD) != 0u) {
        return;
    }
    let chunk = chunks[dispatch.first_chunk + local];
    let coef = coefs[chunk.seg];
    if (coef == 1.0 && config.sigma == 0.0 && step.policy != POLICY_ZERO_NANS) {
        return;
    }
    let dtype = chunk.dtype;
    if (chunk.stride != 1u || dtype == DTYPE_F32) {
        for (var k = lid; k < chunk.len; k = k + WG) {
            let e = chunk.start + k * chunk.stride;
            let index = chunk.index + k * chunk.stride;
            if (dtype == DTYPE_F32) {
                let x = bitcast<f32>(atomicLoad(&grads[e]));
                atomicStore(&grads[e], bitcast<u32>(transform(x, coef, chunk.tensor, index)));
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
