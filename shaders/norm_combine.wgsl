// norm_combine.wgsl: the engine's `combine` stage: runs of accumulators into one each.
// Entry `main` combines contiguous runs (chunk partials into unit norms); entry `groups`
// forms a norm stage's group norms from the unit norms of its members, each unit's norm
// times its coefficient so far (a norm scales linearly: no re-read of the gradients).
//
// Bindings (group 0):
//   0 inputs    storage, read        accumulators (Acc)
//   1 ranges    storage, read        per output: (first input or member, count)
//   2 outputs   storage, read_write  one Acc per range
//   3 step      uniform              StepParams of this step (p), at a dynamic offset
//   4 dispatch  uniform              DispatchParams (n_chunks = number of ranges; `first`:
//                                    the chain's first stage, nothing to scale by yet)
//   5 members   storage, read        `groups`: the units of every group, group by group
//   6 coefs     storage, read        `groups`: each unit's coefficient so far
//
// One workgroup combines one range: each thread folds its inputs in order, then the
// shared tree combines the threads, so the result does not depend on timing.
// CPU twin: src/cpu/engine.rs (`combine`).

#import grid
#import workgroup_reduce

override NORM_KIND: u32 = 2u;

@group(0) @binding(0) var<storage, read> inputs: array<Acc>;
@group(0) @binding(1) var<storage, read> ranges: array<vec2<u32>>;
@group(0) @binding(2) var<storage, read_write> outputs: array<Acc>;
@group(0) @binding(3) var<uniform> step: StepParams;
@group(0) @binding(4) var<uniform> dispatch: DispatchParams;

@group(0) @binding(5) var<storage, read> members: array<u32>;
@group(0) @binding(6) var<storage, read> coefs: array<f32>;

// The range of this workgroup's output; empty past the last one (no early return, so
// every thread reaches the tree's barriers).
fn range_of(r: u32) -> vec2<u32> {
    if (r >= dispatch.n_chunks) {
        return vec2<u32>(0u, 0u);
    }
    return ranges[r];
}

// Combines the threads' accumulators and writes output `r`.
fn store(r: u32, acc: Acc, lid: u32) {
    let total = workgroup_combine(acc, lid, NORM_KIND, step.p);
    if (lid == 0u && r < dispatch.n_chunks) {
        outputs[r] = total;
    }
}

// A contiguous run of the inputs.
fn fold_run(range: vec2<u32>, lid: u32) -> Acc {
    var acc = acc_identity();
    for (var i = lid; i < range.y; i = i + WG) {
        acc = acc_combine(acc, inputs[range.x + i], NORM_KIND, step.p);
    }
    return acc;
}

// A group's members, each times its coefficient so far.
fn fold_members(range: vec2<u32>, lid: u32) -> Acc {
    var acc = acc_identity();
    for (var i = lid; i < range.y; i = i + WG) {
        let u = members[range.x + i];
        var a = inputs[u];
        if (dispatch.first == 0u) {
            a = acc_scaled(a, coefs[u]);
        }
        acc = acc_combine(acc, a, NORM_KIND, step.p);
    }
    return acc;
}

@compute @workgroup_size(WG)
fn main(inv: Invocation) {
    let r = workgroup_index(inv);
    store(r, fold_run(range_of(r), inv.lid), inv.lid);
}

@compute @workgroup_size(WG)
fn groups(inv: Invocation) {
    let r = workgroup_index(inv);
    store(r, fold_members(range_of(r), inv.lid), inv.lid);
}
