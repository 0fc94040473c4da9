// accumulate.wgsl: gradient accumulation, sums = (first ? 0 : sums) + scale * micro, with
// scale = 1 / micro_steps, so k micro-batches add up to the mean gradient (the loss
// scaling 1/k of an accumulation loop, folded into the addition).
//
// Bindings (group 0):
//   0 sums      storage, read_write  one binding window of an accumulation buffer, as words
//   1 micro     storage, read        the same window of the micro-batch gradient buffer
//   2 chunks    storage, read        chunk table (Chunk) over spans, element indices
//                                    relative to the window (the same for both buffers)
//   3 params    uniform              AccumulateParams: this window's chunks, scale, first
//
// One workgroup adds one chunk. The two buffers hold their tensors at the same offsets,
// so one chunk table serves both; chunks cover maximal runs of touching tensors, so a
// word holding two 16-bit elements is written by one workgroup, and a half outside the
// run keeps its bits. The first micro-batch overwrites whatever the sums held. The sum
// is formed in f32 and rounded once to the element type.
// CPU twin: src/cpu/accumulate.rs.

#import convert
#import grid

@group(0) @binding(0) var<storage, read_write> sums: array<u32>;
@group(0) @binding(1) var<storage, read> micro: array<u32>;
@group(0) @binding(2) var<storage, read> chunks: array<Chunk>;
@group(0) @binding(3) var<uniform> params: AccumulateParams;

fn add(sum: f32, x: f32) -> f32 {
    if (params.first == 1u) {
        return params.scale * x;
    }
    return sum + params.scale * x;
}

fn add_half(sum: u32, x: u32, dtype: u32) -> u32 {
    return f32_to_half(add(half_to_f32(sum, dtype), half_to_f32(x, dtype)), dtype);
}

@compute @workgroup_size(WG)
fn main(inv: Invocation) {
    let local = workgroup_index(inv);
    if (local >= params.n_chunks) {
        return;
    }
    let c = chunks[params.first_chunk + local];
    if (c.dtype == DTYPE_F32) {
        for (var i = c.start + inv.lid; i < c.start + c.len; i = i + WG) {
            sums[i] = bitcast<u32>(add(bitcast<f32>(sums[i]), bitcast<f32>(micro[i])));
        }
        return;
    }
    // A half outside the chunk keeps its bits.
    for (var w = first_word(c) + inv.lid; w < end_word(c); w = w + WG) {
        let s = sums[w];
        let x = micro[w];
        var lo = s & 0xffffu;
        var hi = s >> 16u;
        let e0 = w * 2u;
        if (e0 >= c.start) {
            lo = add_half(lo, x & 0xffffu, c.dtype);
        }
        if (e0 + 1u < c.start + c.len) {
            hi = add_half(hi, x >> 16u, c.dtype);
        }
        sums[w] = lo | (hi << 16u);
    }
}
