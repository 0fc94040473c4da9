// workgroup_reduce.wgsl: combines one accumulator per thread of a 256-thread workgroup
// into one, by a shared-memory tree in a fixed order (no atomics: the same bits on every
// run). Call it from uniform control flow.

#import acc

var<workgroup> wg_scale: array<f32, WG>;
var<workgroup> wg_sum: array<f32, WG>;
var<workgroup> wg_flags: array<u32, WG>;

// The combination of every thread's `acc`, returned to every thread.
fn workgroup_combine(acc: Acc, lid: u32, kind: u32, p: f32) -> Acc {
    wg_scale[lid] = acc.scale;
    wg_sum[lid] = acc.sum;
    wg_flags[lid] = acc.flags;
    workgroupBarrier();
    for (var stride = WG / 2u; stride > 0u; stride = stride >> 1u) {
        if (lid < stride) {
            let a = Acc(wg_scale[lid], wg_sum[lid], wg_flags[lid], 0u);
            let b = Acc(wg_scale[lid + stride], wg_sum[lid + stride], wg_flags[lid + stride], 0u);
            let c = acc_combine(a, b, kind, p);
            wg_scale[lid] = c.scale;
            wg_sum[lid] = c.sum;
            wg_flags[lid] = c.flags;
        }
        workgroupBarrier();
    }
    return Acc(wg_scale[0], wg_sum[0], wg_flags[0], 0u);
}

// The sum of every thread's `x` by the same tree, returned to every thread.
fn workgroup_sum(x: f32, lid: u32) -> f32 {
    wg_sum[lid] = x;
    workgroupBarrier();
    for (var stride = WG / 2u; stride > 0u; stride = stride >> 1u) {
        if (lid < stride) {
            wg_sum[lid] = wg_sum[lid] + wg_sum[lid + stride];
        }
        workgroupBarrier();
    }
    let total = wg_sum[0];
    // A following call reuses the array.
    workgroupBarrier();
    return total;
}
