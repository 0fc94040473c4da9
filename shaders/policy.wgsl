// policy.wgsl: the coefficients of the clipping policies (src/policies), from the norms of
// the reduction core to one coefficient per segment.
//
// Bindings (group 0), shared by both entries:
//   0 inputs      storage, read        group norms (Acc), one per group
//   1 state       storage, read_write  PolicyState words: 8 header words, then history (f32)
//   2 report      storage, read_write  PolicyHeader
//   3 step        uniform              StepParams (p, 1/p, non-finite policy)
//   4 dispatch    uniform              DispatchParams (n_chunks = groups for `finish`,
//                                      segments for `coefs`)
//   5 config      uniform              PolicyParams
//   6 thresholds  storage, read        base threshold per group (before the schedule)
//   7 coefs       storage, read_write  coefficient per segment
//   8 group_of    storage, read        group of each segment
//   9 params      storage, read        AGC: norm of each segment of the parameters
//
// Entry `finish`: one workgroup. Combines the group norms into the total norm, applies
// the non-finite policy, and for the adaptive rules (ADAPTIVE = 1 percentile of history,
// 2 z-score) records the norm in the device state and derives this step's threshold.
// Entry `coefs`: one thread per segment computes its coefficient (FORMULA = 0
// min(c / (n + 1e-6), 1) as PyTorch, 1 c / max(n, c) as TF clip_by_norm, 2 AGC).
// CPU twin: src/cpu/policy.rs.

#import grid
#import workgroup_reduce

override NORM_KIND: u32 = 2u;
override ADAPTIVE: u32 = 0u;
override FORMULA: u32 = 0u;

@group(0) @binding(0) var<storage, read> inputs: array<Acc>;
@group(0) @binding(1) var<storage, read_write> state: array<u32>;
@group(0) @binding(2) var<storage, read_write> report: PolicyHeader;
@group(0) @binding(3) var<uniform> step: StepParams;
@group(0) @binding(4) var<uniform> dispatch: DispatchParams;
@group(0) @binding(5) var<uniform> config: PolicyParams;
@group(0) @binding(6) var<storage, read> thresholds: array<f32>;
@group(0) @binding(7) var<storage, read_write> coef_out: array<f32>;
@group(0) @binding(8) var<storage, read> group_of: array<u32>;
@group(0) @binding(9) var<storage, read> params: array<Acc>;

var<workgroup> sh_lo: f32;
var<workgroup> sh_hi: f32;
var<workgroup> sh_count: u32;

fn root_of(acc: Acc) -> f32 {
    if (NORM_KIND == KIND_L2) {
        return sqrt(acc.sum);
    }
    if (NORM_KIND == KIND_P) {
        return pow(acc.sum, step.inv_p);
    }
    return acc.sum;
}

// The norm as f32 (inf beyond f32::MAX), ignoring the flags.
fn norm_value(acc: Acc) -> f32 {
    if (NORM_KIND == KIND_INF) {
        return acc.scale;
    }
    return acc.scale * root_of(acc);
}

// c / (n + eps) with n = scale * root, finite for norms beyond f32::MAX (where eps no
// longer matters).
fn ratio(c: f32, acc: Acc, eps: f32) -> f32 {
    let n = norm_value(acc);
    if (nonfinite_flag(bitcast<u32>(n)) == 0u) {
        return c / (n + eps);
    }
    if (NORM_KIND == KIND_INF) {
        return c / acc.scale;
    }
    return (c / acc.scale) / root_of(acc);
}

// The coefficient of a norm against threshold `c` under FORMULA 0 or 1.
fn norm_coef(acc: Acc, c: f32) -> f32 {
    let flags = live_flags(acc.flags, step.policy);
    if ((flags & FLAG_NAN) != 0u) {
        return nan_f32();
    }
    if ((flags & FLAG_INF) != 0u) {
        return 0.0;
    }
    if (FORMULA == 1u) {
        // c / max(n, c): a zero (or empty) tensor stays as it is.
        let n = norm_value(acc);
        if (n <= c) {
            return 1.0;
        }
        return ratio(c, acc, 0.0);
    }
    return min(ratio(c, acc, 1e-6), 1.0);
}

fn state_f32(i: u32) -> f32 {
    return bitcast<f32>(state[i]);
}

// Percentile `q` (0..100) of the first m history entries, linear interpolation between
// order statistics as numpy's default. Ranks are counted (ties broken by position), so
// the result does not depend on thread timing.
fn percentile(m: u32, q: f32, lid: u32) -> f32 {
    let pos = q / 100.0 * f32(m - 1u);
    let lo = u32(floor(pos));
    let hi = min(lo + 1u, m - 1u);
    let t = pos - f32(lo);
    for (var i = lid; i < m; i = i + WG) {
        let v = state_f32(ST_HEADER + i);
        var rank = 0u;
        for (var j = 0u; j < m; j = j + 1u) {
            let u = state_f32(ST_HEADER + j);
            if (u < v || (u == v && j < i)) {
                rank = rank + 1u;
            }
        }
        if (rank == lo) {
            sh_lo = v;
        }
        if (rank == hi) {
            sh_hi = v;
        }
    }
    workgroupBarrier();
    let a = sh_lo;
    let b = sh_hi;
    // numpy's lerp: from the nearer end, so the result is monotone in t.
    if (t >= 0.5) {
        return b - (b - a) * (1.0 - t);
    }
    return a + (b - a) * t;
}

// Threshold from the AutoClip history after recording norm n (when `record`); only
// thread 0 touches the state, then every thread helps with the percentile.
fn autoclip(n: f32, record: bool, lid: u32) -> f32 {
    if (lid == 0u) {
        var seen = state[ST_SEEN];
        if (record) {
            state[ST_HEADER + seen % config.capacity] = bitcast<u32>(n);
            seen = seen + 1u;
            state[ST_SEEN] = seen;
        }
        sh_count = min(seen, config.capacity);
    }
    storageBarrier();
    let m = workgroupUniformLoad(&sh_count);
    if (m == 0u) {
        return inf_f32();
    }
    return percentile(m, config.percentile, lid);
}

// ZClip, one thread: returns the threshold (inf when no spike) and updates the state.
fn zclip(n: f32, record: bool) -> f32 {
    let inf = inf_f32();
    if (!record) {
        return inf;
    }
    let seen = state[ST_SEEN];
    let warmup = config.capacity;
    if (seen < warmup) {
        state[ST_HEADER + seen] = bitcast<u32>(n);
        state[ST_SEEN] = seen + 1u;
        if (seen + 1u == warmup) {
            var sum = 0.0;
            for (var i = 0u; i < warmup; i = i + 1u) {
                sum = sum + state_f32(ST_HEADER + i);
            }
            let mean = sum / f32(warmup);
            var sq = 0.0;
            for (var i = 0u; i < warmup; i = i + 1u) {
                let d = state_f32(ST_HEADER + i) - mean;
                sq = sq + d * d;
            }
            state[ST_MEAN] = bitcast<u32>(mean);
            state[ST_VAR] = bitcast<u32>(sq / f32(warmup));
        }
        return inf;
    }
    let mean = state_f32(ST_MEAN);
    let var_ = state_f32(ST_VAR);
    let sigma = sqrt(var_);
    let z = (n - mean) / (sigma + config.z_eps);
    var thr = inf;
    var x = n;
    if (z > config.z_thresh) {
        thr = mean + config.z_thresh * config.z_thresh * sigma / z;
        x = thr;
    }
    let a = config.alpha;
    let new_mean = a * mean + (1.0 - a) * x;
    let d = x - new_mean;
    state[ST_MEAN] = bitcast<u32>(new_mean);
    state[ST_VAR] = bitcast<u32>(a * var_ + (1.0 - a) * d * d);
    state[ST_SEEN] = seen + 1u;
    return thr;
}

@compute @workgroup_size(WG)
fn finish(@builtin(local_invocation_index) lid: u32) {
    var acc = acc_identity();
    for (var i = lid; i < dispatch.n_chunks; i = i + WG) {
        acc = acc_combine(acc, inputs[i], NORM_KIND, step.p);
    }
    let total = workgroup_combine(acc, lid, NORM_KIND, step.p);
    let flags = live_flags(total.flags, step.policy);
    var status = 0u;
    if (total.flags != 0u) {
        status = STATUS_NONFINITE;
    }
    if ((total.flags & FLAG_NAN) != 0u && step.policy == POLICY_ZERO_NANS) {
        status = status | STATUS_NANS_ZEROED;
    }
    let held = flags != 0u && step.policy != POLICY_PROPAGATE && step.policy != POLICY_ZERO_NANS;
    if (held) {
        status = status | STATUS_HELD;
        if (step.policy == POLICY_SKIP) {
            status = status | STATUS_SKIPPED;
        }
    }
    // Non-finite norms are never recorded: one bad step must not poison the history.
    let n = norm_value(total);
    let record = flags == 0u;
    var thr = thresholds[0] * config.multiplier;
    if (ADAPTIVE == 1u) {
        thr = autoclip(n, record, lid) * config.multiplier;
    }
    if (ADAPTIVE == 2u && lid == 0u) {
        thr = zclip(n, record) * config.multiplier;
    }
    if (ADAPTIVE != 0u && config.cap > 0.0) {
        thr = min(thr, config.cap * config.multiplier);
    }
    if (lid == 0u) {
        var skips = 0u;
        if ((status & STATUS_SKIPPED) != 0u) {
            skips = state[ST_SKIPS] + 1u;
        }
        state[ST_SKIPS] = skips;
        report.norm = total;
        report.threshold = thr;
        report.status = status;
        report.skips = skips;
        atomicStore(&report.clipped, 0u);
        var coef = 1.0;
        if (ADAPTIVE != 2u || thr < inf_f32()) {
            coef = norm_coef(total, thr);
        }
        report.coef = coef;
    }
}

fn agc_coef(g: Acc, w: Acc) -> f32 {
    if (live_flags(g.flags | w.flags, step.policy) != 0u) {
        return select(0.0, nan_f32(), (live_flags(g.flags | w.flags, step.policy) & FLAG_NAN) != 0u);
    }
    let limit = config.lambda * config.multiplier * max(norm_value(w), config.eps);
    let n = norm_value(g);
    if (n < limit) {
        return 1.0;
    }
    return limit / max(n, 1e-6);
}

@compute @workgroup_size(64)
fn coefs(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let s = linear_workgroup(wid, nwg) * 64u + lid;
    if (s >= dispatch.n_chunks) {
        return;
    }
    let g = group_of[s];
    var coef = 1.0;
    if ((report.status & STATUS_HELD) == 0u) {
        if (FORMULA == 2u) {
            coef = agc_coef(inputs[g], params[s]);
        } else if (ADAPTIVE != 0u) {
            coef = report.coef;
        } else {
            coef = norm_coef(inputs[g], thresholds[g] * config.multiplier);
        }
    }
    coef_out[s] = coef;
    if (!(coef >= 1.0)) {
        atomicAdd(&report.clipped, 1u);
    }
}
