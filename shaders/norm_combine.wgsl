// norm_combine.wgsl: the engine's `combine` stage: runs of accumulators into one each
// (chunk partials into unit norms, unit norms into group norms).
//
// Bindings (group 0):
//   0 inputs    storage, read        accumulators (Acc)
//   1 ranges    storage, read        per output: (first input, input count)
//   2 outputs   storage, read_write  one Acc per range
//   3 step      uniform              StepParams of this step (p), at a dynamic offset
//   4 dispatch  uniform              DispatchParams (n_chunks = number of ranges)
//
// One workgroup combines one range: each thread folds inputs[first + lid],
// inputs[first + lid + WG], ... in order, then the shared tree combines the threads, so
// the result does not depend on timing. CPU twin: src/cpu/norm_reduce.rs (`total_acc`).

#import grid
#import workgroup_reduce

override NORM_KIND: u32 = 2u;

@group(0) @binding(0) var<storage, read> inputs: array<Acc>;
@group(0) @binding(1) var<storage, read> ranges: array<vec2<u32>>;
@group(0) @binding(2) var<storage, read_write> outputs: array<Acc>;
@group(0) @binding(3) var<uniform> step: StepParams;
@group(0) @binding(4) var<uniform> dispatch: DispatchParams;

@compute @workgroup_size(WG)
fn main(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let r = linear_workgroup(wid, nwg);
    if (r >= dispatch.n_chunks) {
        return;
    }
    let range = ranges[r];
    var acc = acc_identity();
    for (var i = lid; i < range.y; i = i + WG) {
        acc = acc_combine(acc, inputs[range.x + i], NORM_KIND, step.p);
    }
    let total = workgroup_combine(acc, lid, NORM_KIND, step.p);
    if (lid == 0u) {
        outputs[r] = total;
    }
}
