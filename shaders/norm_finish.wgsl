// norm_finish.wgsl: second pass of every norm, and the clip coefficient.
//
// Entry `tensor_norms`: one workgroup per tensor; it combines that tensor's chunk partials
// (a contiguous run, in chunk order) into one accumulator.
//   0 inputs       storage, read        chunk partials (Acc)
//   1 ranges       storage, read        per tensor: (first partial, partial count)
//   2 outputs      storage, read_write  per-tensor Acc
//   3 step         uniform              StepParams
//   4 dispatch     uniform              DispatchParams (n_chunks = tensor count)
//
// Entry `total`: a single workgroup combines `dispatch.n_chunks` accumulators (chunk partials,
// or per-tensor results when those were asked for) into the total norm, applies the
// non-finite policy, computes the clip coefficient and writes the step report. It also
// writes the indirect dispatch arguments of the scaling pass: the precomputed workgroup
// counts when scaling is needed, zeros when it is not, so an unclipped step does no work
// and the host never reads the coefficient.
//   0 inputs       storage, read        accumulators to combine
//   3 step         uniform              StepParams (max_norm, policy, given norm for the split API)
//   4 dispatch     uniform              DispatchParams (n_chunks = input count, use_given)
//   5 report       storage, read_write  ReportHeader
//   6 args_full    storage, read        scaling-pass workgroup counts, 3 words per dispatch
//   7 args_out     storage, read_write  indirect arguments actually used
// CPU twin: src/cpu/norm_finish.rs.

#import grid
#import workgroup_reduce

override NORM_KIND: u32 = 2u;

@group(0) @binding(0) var<storage, read> inputs: array<Acc>;
@group(0) @binding(1) var<storage, read> ranges: array<vec2<u32>>;
@group(0) @binding(2) var<storage, read_write> outputs: array<Acc>;
@group(0) @binding(3) var<uniform> step: StepParams;
@group(0) @binding(4) var<uniform> dispatch: DispatchParams;
@group(0) @binding(5) var<storage, read_write> report: ReportHeader;
@group(0) @binding(6) var<storage, read> args_full: array<u32>;
@group(0) @binding(7) var<storage, read_write> args_out: array<u32>;

// Each thread folds inputs[first + lid], inputs[first + lid + WG], ... in order, then a
// tree combines the threads; returns the result to every thread.
fn reduce_range(first: u32, count: u32, lid: u32) -> Acc {
    var acc = acc_identity();
    for (var i = lid; i < count; i = i + WG) {
        acc = acc_combine(acc, inputs[first + i], NORM_KIND, step.p);
    }
    return workgroup_combine(acc, lid, NORM_KIND, step.p);
}

@compute @workgroup_size(WG)
fn tensor_norms(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let t = linear_workgroup(wid, nwg);
    if (t >= dispatch.n_chunks) {
        return;
    }
    let range = ranges[t];
    let acc = reduce_range(range.x, range.y, lid);
    if (lid == 0u) {
        outputs[t] = acc;
    }
}

// (max_norm / (total + 1e-6)) clamped to 1, PyTorch's formula, with the total kept as
// scale * root so a norm beyond f32::MAX still gives a finite, correct coefficient.
fn clip_coef(acc: Acc) -> f32 {
    if ((acc.flags & FLAG_NAN) != 0u) {
        return nan_f32();
    }
    if ((acc.flags & FLAG_INF) != 0u) {
        return 0.0;
    }
    if (NORM_KIND == KIND_INF) {
        return min(step.max_norm / (acc.scale + 1e-6), 1.0);
    }
    var root = acc.sum;
    if (NORM_KIND == KIND_L2) {
        root = sqrt(acc.sum);
    } else if (NORM_KIND == KIND_P) {
        root = pow(acc.sum, step.inv_p);
    }
    let total = acc.scale * root;
    if (nonfinite_flag(bitcast<u32>(total)) == 0u) {
        return min(step.max_norm / (total + 1e-6), 1.0);
    }
    return min((step.max_norm / acc.scale) / root, 1.0);
}

@compute @workgroup_size(WG)
fn total(@builtin(local_invocation_index) lid: u32) {
    var acc = reduce_range(0u, dispatch.n_chunks, lid);
    if (dispatch.use_given == 1u) {
        acc = step.given;
    }
    // ZeroNans: the NaNs are zeroed by the scaling pass, so they do not count here.
    var live = acc;
    live.flags = live_flags(acc.flags, step.policy);
    let coef = clip_coef(live);
    var status = 0u;
    var apply = !(coef >= 1.0); // true for NaN: propagate poisons every element, as PyTorch does
    if (acc.flags != 0u) {
        status = STATUS_NONFINITE;
    }
    if (step.policy == POLICY_ZERO_NANS && (acc.flags & FLAG_NAN) != 0u) {
        status = status | STATUS_NANS_ZEROED;
        apply = true;
    }
    if (live.flags != 0u && step.policy != POLICY_PROPAGATE && step.policy != POLICY_ZERO_NANS) {
        apply = false;
        if (step.policy == POLICY_SKIP) {
            status = status | STATUS_SKIPPED;
        }
    }
    if (apply) {
        status = status | STATUS_SCALED;
    }
    let n = arrayLength(&args_full);
    for (var i = lid; i < n; i = i + WG) {
        args_out[i] = select(0u, args_full[i], apply);
    }
    if (lid == 0u) {
        report = ReportHeader(acc, coef, status, 0u, 0u);
    }
}
