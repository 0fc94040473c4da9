// norm_reduce.wgsl: first pass of every norm, one partial accumulator per chunk.
//
// Bindings (group 0):
//   0 grads     storage, read_write  one binding window of a gradient buffer, as 32-bit words
//                                    (only read: read_write so that the rewrite's bind
//                                    group of the window serves this pass too)
//   1 chunks    storage, read        chunk table (Chunk), element indices relative to the
//                                    window's start
//   2 partials  storage, read_write  one Acc per chunk, indexed by first_chunk + workgroup
//   3 step      uniform              StepParams of this step (p for general norms), at a
//                                    dynamic offset
//   4 dispatch  uniform              DispatchParams: this window's slice of the chunk table
//   5, 6                             the rewrite's (coefficients, report), unused here
//
// One workgroup reduces one chunk (at most CHUNK_ELEMS elements of one segment) in a fixed
// order: each thread folds a strided run of words, then a shared-memory tree
// (workgroup_reduce.wgsl) combines the 256 thread accumulators. No atomics, so the result
// is the same bits on every run. This is the engine's `reduce` stage.
// CPU twin: src/cpu/norm_reduce.rs.

#import convert
#import grid
#import workgroup_reduce

override NORM_KIND: u32 = 2u;

@group(0) @binding(0) var<storage, read_write> grads: array<u32>;
@group(0) @binding(1) var<storage, read> chunks: array<Chunk>;
@group(0) @binding(2) var<storage, read_write> partials: array<Acc>;
@group(0) @binding(3) var<uniform> step: StepParams;
@group(0) @binding(4) var<uniform> dispatch: DispatchParams;

// Running state of one thread: the accumulator plus 1/scale, so the common
// case (no new maximum) costs a multiply instead of a divide.
struct Running {
    acc: Acc,
    inv: f32,
}

fn fold(st: ptr<function, Running>, x: f32) {
    let nf = nonfinite_flag(bitcast<u32>(x));
    if (nf != 0u) {
        (*st).acc.flags = (*st).acc.flags | nf;
        return;
    }
    let a = abs(x);
    if (NORM_KIND == KIND_INF) {
        (*st).acc.scale = max((*st).acc.scale, a);
        return;
    }
    if (a > (*st).acc.scale) {
        (*st).acc.sum = (*st).acc.sum * pow_ratio((*st).acc.scale / a, NORM_KIND, step.p) + 1.0;
        (*st).acc.scale = a;
        (*st).inv = 1.0 / a;
    } else if (a > 0.0) {
        (*st).acc.sum = (*st).acc.sum + pow_ratio(min(a * (*st).inv, 1.0), NORM_KIND, step.p);
    }
}

// Element `e` of the window, of any dtype.
fn element(e: u32, dtype: u32) -> f32 {
    if (dtype == DTYPE_F32) {
        return bitcast<f32>(grads[e]);
    }
    return half_to_f32(half_of(grads[e >> 1u], e), dtype);
}

@compute @workgroup_size(WG)
fn main(inv: Invocation) {
    let local = workgroup_index(inv);
    // Uniform per workgroup, so the early return keeps barriers in uniform control flow.
    if (local >= dispatch.n_chunks) {
        return;
    }
    let c = chunks[dispatch.first_chunk + local];
    var st = Running(acc_identity(), 0.0);
    if (c.stride != 1u) {
        // A strided unit (an AGC column): one element per load.
        for (var k = inv.lid; k < c.len; k = k + WG) {
            fold(&st, element(c.start + k * c.stride, c.dtype));
        }
    } else if (c.dtype == DTYPE_F32) {
        for (var i = c.start + inv.lid; i < c.start + c.len; i = i + WG) {
            fold(&st, bitcast<f32>(grads[i]));
        }
    } else {
        // Two 16-bit elements per word; halves outside the chunk are skipped.
        for (var w = first_word(c) + inv.lid; w < end_word(c); w = w + WG) {
            let bits = grads[w];
            let e0 = w * 2u;
            if (e0 >= c.start) {
                fold(&st, half_to_f32(bits & 0xffffu, c.dtype));
            }
            if (e0 + 1u < c.start + c.len) {
                fold(&st, half_to_f32(bits >> 16u, c.dtype));
            }
        }
    }
    let acc = workgroup_combine(st.acc, inv.lid, NORM_KIND, step.p);
    if (inv.lid == 0u) {
        partials[dispatch.first_chunk + local] = acc;
    }
}
