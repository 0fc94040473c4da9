// coef.wgsl: the engine's `coef` stage: from the group norms of `combine` to one
// coefficient per unit, running the chain's norm rules (src/chain) with this step's
// parameters.
//
// Bindings (group 0), shared by both entries:
//   0 inputs      storage, read        group norms (Acc) of the dispatch's stage, one
//                                      per group
//   1 state       storage, read_write  device state: per stage a block (from its row's
//                                      state_base) of header words (ST_*), then history
//                                      (f32)
//   2 reports     storage, read_write  StepReport of each norm stage
//   3 step        uniform              StepParams of this step, at a dynamic offset
//   4 dispatch    uniform              DispatchParams (the stage, and for `finish` how
//                                      many stages it runs; n_chunks = the stage's
//                                      groups for `finish`, units for `coefs`; units)
//   5 stages      storage, read        StageRow of each norm stage: its rule, adaptive
//                                      rule, formula, state block
//   6 thresholds  storage, read        the dispatch's stage's base threshold per group
//   7 coefs       storage, read_write  coefficient per unit so far (the chain's product)
//   8 group_of    storage, read        the dispatch's stage's group of each unit, or
//                                      NO_GROUP
//   9 params      storage, read        AGC: norm of each unit of the parameters
//  10 units       storage, read        the gradients' unit norms (their flags: the units
//                                      the first stage leaves alone)
//
// Entry `finish`: one workgroup runs `dispatch.count` stages from `dispatch.stage`, each:
// checks that this step's parameter slot is its own (the tag the encoder copied into the
// first report), combines the group norms into the total norm (or takes the caller's,
// split API), applies the non-finite policy, and for the adaptive rules records the norm
// in the device state and derives this step's threshold. FROM_UNITS = 1 (a stage whose
// one group is every unit): the workgroup folds the unit norms times the coefficients so
// far itself, as `combine`'s `groups` would (the same threads fold the same units, then
// the same tree), so no group pass runs before it; the stages after the dispatch's first
// are all such stages. COEFS = 1: the workgroup then computes every unit's coefficient, as
// `coefs` would (for programs whose units a workgroup walks in a few rounds), so a chain
// whose later stages are global runs its norm stages in one dispatch.
// Entry `coefs`: one thread per unit computes its stage's factor (its formula: PyTorch
// min(c / (n + 1e-6), 1), TF c / max(n, c), or AGC) and multiplies it into the unit's
// coefficient (the first stage starts it).
// Each norm stage of a chain runs its finish and its coefficients on its group norms:
// those `combine` formed from the unit norms times the coefficients so far, or those the
// finish folds itself.
// Loss scaling (step.loss_scaling): the gradients arrive times the scale S of the state's
// first block, and a norm scales linearly, so every norm a stage sees is divided by S here
// (no pass over the gradients); the last stage's coefficients fold in 1 / S, which the
// rewrite, the fused optimizer or a deferred pass apply, and its `finish` updates S from
// the chain's verdict (backoff after a skipped step, growth after enough finite ones).
// The last stage's `finish` takes back the norm each earlier adaptive stage recorded when a
// later stage held the step.
// A stage's rule, adaptive rule and formula are read from its row (one pipeline runs any
// stage); the values are uniform, so the adaptive rules' workgroup steps stay in uniform
// control flow.
// AutoClip's percentile of the history is a radix selection (shared/select.wgsl).
// CPU twin: src/cpu/engine.rs (`finish`, `coefs`, `undo`).

#import grid
#import workgroup_reduce
#import select

override NORM_KIND: u32 = 2u;
override FROM_UNITS: u32 = 0u;
override COEFS: u32 = 0u;

@group(0) @binding(0) var<storage, read> inputs: array<Acc>;
@group(0) @binding(1) var<storage, read_write> state: array<u32>;
@group(0) @binding(2) var<storage, read_write> reports: array<StepReport>;
@group(0) @binding(3) var<uniform> step: StepParams;
@group(0) @binding(4) var<uniform> dispatch: DispatchParams;
@group(0) @binding(5) var<storage, read> stages: array<StageRow>;
@group(0) @binding(6) var<storage, read> thresholds: array<f32>;
@group(0) @binding(7) var<storage, read_write> coef_out: array<f32>;
@group(0) @binding(8) var<storage, read> group_of: array<u32>;
@group(0) @binding(9) var<storage, read> params: array<Acc>;
@group(0) @binding(10) var<storage, read> units: array<Acc>;

var<workgroup> sh_count: u32;
var<workgroup> sh_outside: atomic<u32>;

// The non-finite flags of the units stage 0 leaves alone (a mask), for the first stage's
// `finish`: the chain's verdict covers every gradient, not only those a stage measures (a
// later stage that covers them sees them too; the verdict is an OR). Call from uniform
// control flow.
fn outside_flags(lid: u32) -> u32 {
    if (lid == 0u) {
        atomicStore(&sh_outside, 0u);
    }
    workgroupBarrier();
    let n = min(arrayLength(&group_of), arrayLength(&units));
    var flags = 0u;
    for (var u = lid; u < n; u = u + WG) {
        if (group_of[u] == NO_GROUP) {
            flags = flags | units[u].flags;
        }
    }
    if (flags != 0u) {
        atomicOr(&sh_outside, flags);
    }
    workgroupBarrier();
    return atomicLoad(&sh_outside);
}

// Stage `j`'s rule.
fn rule(j: u32) -> StageParams {
    return stages[j].rule;
}

// The first word of stage `j`'s state block.
fn block(j: u32) -> u32 {
    return stages[j].state_base;
}

fn is_last(j: u32) -> bool {
    return j + 1u == arrayLength(&stages);
}

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

// The coefficient of a norm against threshold `c` under `formula` (PyTorch or TF).
fn norm_coef(acc: Acc, c: f32, formula: u32) -> f32 {
    let flags = live_flags(acc.flags, step.policy);
    if ((flags & FLAG_NAN) != 0u) {
        return nan_f32();
    }
    if ((flags & FLAG_INF) != 0u) {
        return 0.0;
    }
    if (formula == FORMULA_TF) {
        // c / max(n, c): a zero (or empty) tensor stays as it is.
        let n = norm_value(acc);
        if (n <= c) {
            return 1.0;
        }
        return ratio(c, acc, 0.0);
    }
    return min(ratio(c, acc, 1e-6), 1.0);
}

fn state_f32(base: u32, i: u32) -> f32 {
    return bitcast<f32>(state[base + i]);
}

// Stage j's AutoClip threshold from its history after recording norm n (when `record`);
// only thread 0 touches the state, then every thread helps with the percentile.
fn autoclip(j: u32, n: f32, record: bool, lid: u32) -> f32 {
    let base = block(j);
    if (lid == 0u) {
        var seen = state[base + ST_SEEN];
        if (record) {
            state[base + ST_HEADER + seen % rule(j).capacity] = bitcast<u32>(n);
            seen = seen + 1u;
            state[base + ST_SEEN] = seen;
        }
        sh_count = min(seen, rule(j).capacity);
    }
    storageBarrier();
    let m = workgroupUniformLoad(&sh_count);
    if (m == 0u) {
        return inf_f32();
    }
    return percentile(base, m, rule(j).percentile, lid);
}

// Stage j's ZClip, one thread: returns the threshold (inf when no spike) and updates the
// state.
fn zclip(j: u32, n: f32, record: bool) -> f32 {
    let inf = inf_f32();
    if (!record) {
        return inf;
    }
    let base = block(j);
    let seen = state[base + ST_SEEN];
    let warmup = rule(j).capacity;
    if (seen < warmup) {
        state[base + ST_HEADER + seen] = bitcast<u32>(n);
        state[base + ST_SEEN] = seen + 1u;
        // The last warmup norm: the workgroup sums the moments next (`warmup_moments`).
        sh_count = select(0u, 1u, seen + 1u == warmup);
        return inf;
    }
    let mean = state_f32(base, ST_MEAN);
    let var_ = state_f32(base, ST_VAR);
    let sigma = sqrt(var_);
    let r = rule(j);
    let z = (n - mean) / (sigma + r.z_eps);
    var thr = inf;
    var x = n;
    if (z > r.z_thresh) {
        thr = mean + r.z_thresh * r.z_thresh * sigma / z;
        x = thr;
    }
    let a = r.alpha;
    let new_mean = a * mean + (1.0 - a) * x;
    let d = x - new_mean;
    state[base + ST_MEAN] = bitcast<u32>(new_mean);
    state[base + ST_VAR] = bitcast<u32>(a * var_ + (1.0 - a) * d * d);
    state[base + ST_SEEN] = seen + 1u;
    return thr;
}

// ZClip's warmup mean and variance over its `count` norms, summed by the whole workgroup
// in a fixed order (thread t takes norms t, t + WG, ...; then the shared tree), as the CPU
// twin sums them; no thread loops more than count / WG times. Call from uniform control
// flow.
fn warmup_moments(base: u32, count: u32, lid: u32) {
    var s = 0.0;
    for (var i = lid; i < count; i = i + WG) {
        s = s + state_f32(base, ST_HEADER + i);
    }
    let mean = workgroup_sum(s, lid) / f32(count);
    var q = 0.0;
    for (var i = lid; i < count; i = i + WG) {
        let d = state_f32(base, ST_HEADER + i) - mean;
        q = q + d * d;
    }
    let var_ = workgroup_sum(q, lid) / f32(count);
    if (lid == 0u) {
        state[base + ST_MEAN] = bitcast<u32>(mean);
        state[base + ST_VAR] = bitcast<u32>(var_);
    }
}

// Keeps what recording a norm overwrites in stage j's block (the history slot
// `seen % cap`, the mean, the variance) in its ST_SAVED_* words, for `undo`.
fn save_overwritten(j: u32) {
    let base = block(j);
    let cap = rule(j).capacity;
    if (cap > 0u) {
        state[base + ST_SAVED_SLOT] = state[base + ST_HEADER + state[base + ST_SEEN] % cap];
    }
    state[base + ST_SAVED_MEAN] = state[base + ST_MEAN];
    state[base + ST_SAVED_VAR] = state[base + ST_VAR];
}

// The loss scale of the step being run (1 without loss scaling), read from the state
// before the chain's last `finish` updates it.
fn loss_scale_now() -> f32 {
    if (step.loss_scaling == 0u) {
        return 1.0;
    }
    return bitcast<f32>(state[ST_LOSS_SCALE]);
}

// The loss scale after a step whose chain verdict is `skipped`: backoff after a skipped
// step, growth after `growth_interval` finite steps in a row, within [min, max].
fn update_loss_scale(skipped: bool) -> f32 {
    var s = bitcast<f32>(state[ST_LOSS_SCALE]);
    var good = state[ST_GOOD_STEPS] + 1u;
    if (skipped) {
        s = max(s * step.backoff, step.min_scale);
        good = 0u;
    } else if (good >= step.growth_interval) {
        s = min(s * step.growth, step.max_scale);
        good = 0u;
    }
    state[ST_LOSS_SCALE] = bitcast<u32>(s);
    state[ST_GOOD_STEPS] = good;
    return s;
}

// Stage j of the dispatch's run (`own`: the dispatch's first, whose tables are bound):
// its total, verdict, adaptive state and report, then with COEFS its unit coefficients.
// Call from uniform control flow, with j uniform.
fn finish_stage(j: u32, own: bool, lid: u32) {
    let first = j == 0u;
    let last = is_last(j);
    let row = stages[j];
    let adaptive = row.adaptive;
    let r = row.rule;
    // Every thread reads the scale before the first barrier; thread 0 of the last stage
    // updates it at the end.
    let scale = loss_scale_now();
    var acc = acc_identity();
    if (FROM_UNITS == 1u || !own) {
        for (var u = lid; u < dispatch.units; u = u + WG) {
            var a = units[u];
            if (!first) {
                a = acc_scaled(a, coef_out[u]);
            }
            acc = acc_combine(acc, a, NORM_KIND, step.p);
        }
    } else {
        for (var i = lid; i < dispatch.n_chunks; i = i + WG) {
            acc = acc_combine(acc, inputs[i], NORM_KIND, step.p);
        }
    }
    // AGC reads the parameters: their NaN or infinity counts as the step's. (An AGC stage
    // is the one with a lambda, which is > 0; it is always the dispatch's own.)
    if (r.lambda > 0.0) {
        for (var u = lid; u < arrayLength(&group_of); u = u + WG) {
            if (group_of[u] != NO_GROUP) {
                acc.flags = acc.flags | params[u].flags;
            }
        }
    }
    var total = workgroup_combine(acc, lid, NORM_KIND, step.p);
    if (step.use_given == 1u) {
        total = step.given;
    }
    if (step.rule == 0u) {
        total = acc_identity();
    }
    total = acc_scaled(total, 1.0 / scale);
    // Another step overwrote this step's parameter slot before it was submitted: change
    // nothing and say so.
    let fresh = step.seq % TAG_RING == reports[0].tag;
    // What the step's verdict sees: this stage's total and, in the first stage, the units
    // it leaves alone (not under a given total, which has no unit norms).
    var seen = total.flags;
    if (first && step.use_given == 0u) {
        seen = seen | outside_flags(lid);
    }
    let flags = live_flags(seen, step.policy);
    var status = 0u;
    if (seen != 0u) {
        status = STATUS_NONFINITE;
    }
    if ((seen & FLAG_NAN) != 0u && step.policy == POLICY_ZERO_NANS) {
        status = status | STATUS_NANS_ZEROED;
    }
    if (flags != 0u && (step.policy == POLICY_ERROR || step.policy == POLICY_SKIP)) {
        status = status | STATUS_HELD;
        if (step.policy == POLICY_SKIP) {
            status = status | STATUS_SKIPPED;
        }
    }
    if (!fresh) {
        status = STATUS_STALE | STATUS_HELD;
    }
    // Non-finite norms are never recorded: one bad step must not poison the history, and
    // a step an earlier stage holds records nothing. A norm beyond f32 range enters the
    // history as f32::MAX.
    let n = min(norm_value(total), f32_max());
    let held_before = !first && (reports[0].status & STATUS_HELD) != 0u;
    let own_flags = live_flags(total.flags, step.policy);
    let record = own_flags == 0u && (status & STATUS_HELD) == 0u && fresh && !held_before;
    if (adaptive != ADAPTIVE_NONE && lid == 0u) {
        state[block(j) + ST_RECORDED] = select(0u, 1u, record);
        if (record) {
            save_overwritten(j);
        }
    }
    var thr = row.threshold * step.multiplier;
    if (adaptive == ADAPTIVE_AUTOCLIP) {
        thr = autoclip(j, n, record, lid) * step.multiplier;
    }
    if (adaptive == ADAPTIVE_ZCLIP) {
        if (lid == 0u) {
            sh_count = 0u;
            thr = zclip(j, n, record) * step.multiplier;
        }
        storageBarrier();
        if (workgroupUniformLoad(&sh_count) == 1u) {
            warmup_moments(block(j), r.capacity, lid);
        }
    }
    if (adaptive != ADAPTIVE_NONE && r.cap > 0.0) {
        thr = min(thr, r.cap * step.multiplier);
    }
    var coef = 1.0;
    if (step.rule == 1u && (adaptive != ADAPTIVE_ZCLIP || thr < inf_f32())) {
        coef = norm_coef(total, thr, FORMULA_PYTORCH);
    }
    let held = (status & STATUS_HELD) != 0u;
    let every_unit = step.sigma > 0.0 || step.clamp == 1u
        || (status & STATUS_NANS_ZEROED) != 0u || scale != 1.0;
    if (!held && (every_unit || !(coef >= 1.0))) {
        status = status | STATUS_SCALED;
    }
    if (lid == 0u) {
        // One chain-wide verdict in the first stage's report (the one the rewrite and
        // the host read): any stage that finds non-finite values holds or skips the step.
        // One skip counter, in the state's first block.
        let verdict = STATUS_HELD | STATUS_SKIPPED | STATUS_NONFINITE | STATUS_NANS_ZEROED;
        if (first) {
            reports[0].skips_before = state[ST_SKIPS];
            if (fresh) {
                state[ST_SKIPS] = select(0u, state[ST_SKIPS] + 1u, (status & STATUS_SKIPPED) != 0u);
            }
        } else if (fresh) {
            let before = reports[0].status;
            reports[0].status = before | (status & verdict);
            if ((status & STATUS_SKIPPED) != 0u && (before & STATUS_SKIPPED) == 0u) {
                state[ST_SKIPS] = reports[0].skips_before + 1u;
            }
            reports[0].skips = state[ST_SKIPS];
        }
        reports[j].norm = total;
        reports[j].threshold = thr;
        if (first) {
            reports[0].status = status;
        } else {
            reports[j].status = status | (reports[0].status & STATUS_HELD);
        }
        reports[j].skips = state[ST_SKIPS];
        atomicStore(&reports[j].clipped, 0u);
        reports[j].coef = coef;
        if (first) {
            reports[0].loss_scale = scale;
            reports[0].next_scale = scale;
        }
        // The chain's verdict is final after its last stage: the scale moves once per
        // step that ran (not for a step whose slot was overwritten), and a held step
        // leaves the adaptive state as it found it.
        if (last && fresh) {
            if (step.loss_scaling == 1u) {
                reports[0].next_scale = update_loss_scale((reports[0].status & STATUS_SKIPPED) != 0u);
            }
            if ((reports[0].status & STATUS_HELD) != 0u) {
                for (var k = 0u; k < j; k = k + 1u) {
                    if (stages[k].adaptive != ADAPTIVE_NONE) {
                        undo(block(k), rule(k).capacity);
                    }
                }
            }
        }
    }
    if (COEFS == 1u) {
        // Thread 0's report first.
        storageBarrier();
        var clipped = 0u;
        for (var s = lid; s < dispatch.units; s = s + WG) {
            clipped = clipped + unit_coef(j, row, own, s);
        }
        if (clipped != 0u) {
            atomicAdd(&reports[j].clipped, clipped);
        }
    }
}

@compute @workgroup_size(WG)
fn finish(@builtin(local_invocation_index) lid: u32) {
    let end = dispatch.stage + dispatch.count;
    for (var j = dispatch.stage; j < end; j = j + 1u) {
        finish_stage(j, j == dispatch.stage, lid);
        // The next stage reads this one's report, state and coefficients.
        storageBarrier();
    }
}

fn agc_coef(j: u32, g: Acc, w: Acc) -> f32 {
    let flags = live_flags(g.flags | w.flags, step.policy);
    if ((flags & FLAG_NAN) != 0u) {
        return nan_f32();
    }
    // An infinite gradient norm scales to 0; an infinite parameter norm makes the limit
    // infinite, which leaves the unit as it is (timm).
    if ((flags & g.flags & FLAG_INF) != 0u) {
        return 0.0;
    }
    if (flags != 0u) {
        return 1.0;
    }
    let limit = rule(j).lambda * step.multiplier * max(norm_value(w), rule(j).eps);
    let n = norm_value(g);
    if (n < limit) {
        return 1.0;
    }
    return limit / max(n, 1e-6);
}

// Stage j's factor of unit `s` multiplied into the unit's coefficient (`own`: the
// dispatch's own stage, whose tables are bound; another is global, every unit in its one
// group); 1 when the chain's coefficient of the unit is now below 1 (NaN counts), else 0.
fn unit_coef(j: u32, row: StageRow, own: bool, s: u32) -> u32 {
    var g = 0u;
    if (own) {
        g = group_of[s];
    }
    var factor = 1.0;
    let held = (reports[j].status & STATUS_HELD) != 0u;
    // The norms of the gradients as they arrived, divided by the loss scale.
    let inv_scale = 1.0 / reports[0].loss_scale;
    if (!held && step.rule == 1u && g != NO_GROUP) {
        // (A stage whose `finish` folds the units has no group norms: it is global.)
        if (row.formula == FORMULA_AGC) {
            factor = agc_coef(j, acc_scaled(inputs[g], inv_scale), params[s]);
        } else if (row.adaptive != ADAPTIVE_NONE || row.global == 1u) {
            factor = reports[j].coef;
        } else {
            let group = acc_scaled(inputs[g], inv_scale);
            factor = norm_coef(group, thresholds[g] * step.multiplier, row.formula);
        }
    }
    var coef = factor;
    if (j != 0u) {
        coef = coef_out[s] * factor;
    }
    let clipped = select(0u, 1u, !(coef >= 1.0));
    // What the gradients are multiplied by: the chain's coefficient, and after the last
    // stage the unscaling too (counted as a clip it is not).
    if (is_last(j) && !held) {
        coef = coef * inv_scale;
    }
    coef_out[s] = coef;
    return clipped;
}

@compute @workgroup_size(64)
fn coefs(inv: Invocation) {
    let s = workgroup_index(inv) * 64u + inv.lid;
    let j = dispatch.stage;
    if (s < dispatch.n_chunks && unit_coef(j, stages[j], true, s) == 1u) {
        atomicAdd(&reports[dispatch.stage].clipped, 1u);
    }
}

// Takes back the norm the adaptive stage whose block starts at `base` (history `cap`)
// recorded in this step, if it recorded one (its `finish` marked the block).
fn undo(base: u32, cap: u32) {
    if (state[base + ST_RECORDED] == 0u) {
        return;
    }
    let seen = state[base + ST_SEEN] - 1u;
    state[base + ST_SEEN] = seen;
    if (cap > 0u) {
        state[base + ST_HEADER + seen % cap] = state[base + ST_SAVED_SLOT];
    }
    state[base + ST_MEAN] = state[base + ST_SAVED_MEAN];
    state[base + ST_VAR] = state[base + ST_SAVED_VAR];
}
