// apply.wgsl: the in-place elementwise pass: scale by the clip coefficient (OP = 0) or
// clamp to [lo, hi] (OP = 1).
//
// Bindings (group 0):
//   0 grads     storage, read_write  one binding window of a gradient buffer, as 32-bit words
//   1 chunks    storage, read        chunk table (Chunk) over spans, element indices
//                                    relative to the window
//   2 report    storage, read        ReportHeader from norm_finish.wgsl (the coefficient)
//   3 step      uniform              StepParams (clamp bounds)
//   4 dispatch  uniform              DispatchParams: this window's slice of the chunk table
//
// One workgroup rewrites one chunk. Chunks cover maximal runs of batch tensors that touch,
// so a 32-bit word holding two 16-bit elements is written by exactly one workgroup; a half
// that lies outside the run keeps its bits. The scaling pass is dispatched indirectly with
// the counts norm_finish wrote, so it runs zero workgroups when nothing is clipped.
// CPU twins: src/cpu/apply.rs.

#import acc
#import convert
#import grid

override OP: u32 = 0u;

@group(0) @binding(0) var<storage, read_write> grads: array<u32>;
@group(0) @binding(1) var<storage, read> chunks: array<Chunk>;
@group(0) @binding(2) var<storage, read> report: ReportHeader;
@group(0) @binding(3) var<uniform> step: StepParams;
@group(0) @binding(4) var<uniform> dispatch: DispatchParams;

fn apply_f32(x: f32, coef: f32) -> f32 {
    if (OP == OP_SCALE) {
        // NonFinitePolicy::ZeroNans zeroes NaNs as it scales.
        if (step.policy == POLICY_ZERO_NANS && nonfinite_flag(bitcast<u32>(x)) == FLAG_NAN) {
            return 0.0;
        }
        return x * coef;
    }
    // NaN compares false both ways and stays NaN, as in PyTorch and TensorFlow.
    if (x < step.lo) {
        return step.lo;
    }
    if (x > step.hi) {
        return step.hi;
    }
    return x;
}

// One 16-bit element; unchanged elements keep their exact bits.
fn apply_half(h: u32, dtype: u32, coef: f32) -> u32 {
    let x = half_to_f32(h, dtype);
    let shift = select(16u, 0u, dtype == DTYPE_F16);
    if (OP == OP_SCALE) {
        return f32_to_half(apply_f32(x, coef), dtype);
    }
    if (x < step.lo) {
        return (step.lo_half >> shift) & 0xffffu;
    }
    if (x > step.hi) {
        return (step.hi_half >> shift) & 0xffffu;
    }
    return h;
}

@compute @workgroup_size(WG)
fn main(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let local = linear_workgroup(wid, nwg);
    if (local >= dispatch.n_chunks) {
        return;
    }
    let chunk = chunks[dispatch.first_chunk + local];
    let start = chunk.start;
    let end = chunk.start + chunk.len;
    let dtype = chunk.dtype;
    var coef = 1.0;
    if (OP == OP_SCALE) {
        coef = report.coef;
    }
    if (dtype == DTYPE_F32) {
        for (var i = start + lid; i < end; i = i + WG) {
            grads[i] = bitcast<u32>(apply_f32(bitcast<f32>(grads[i]), coef));
        }
        return;
    }
    let first_word = start >> 1u;
    let end_word = (end + 1u) >> 1u;
    for (var w = first_word + lid; w < end_word; w = w + WG) {
        let bits = grads[w];
        var lo = bits & 0xffffu;
        var hi = bits >> 16u;
        let e0 = w * 2u;
        if (e0 >= start) {
            lo = apply_half(lo, dtype, coef);
        }
        if (e0 + 1u < end) {
            hi = apply_half(hi, dtype, coef);
        }
        grads[w] = lo | (hi << 16u);
    }
}
