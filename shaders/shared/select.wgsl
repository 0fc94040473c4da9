// select.wgsl: order statistics and percentiles of a stage's norm history, by radix
// selection in one workgroup (AutoClip's threshold). It reads the history where the
// importing shader keeps it: `state` from word `base + ST_HEADER` on (`base`: the first
// word of the stage's block), and needs `WG` threads. Call from uniform control flow.

// Radix selection of an order statistic: a histogram of one 8-bit digit, the digits chosen
// so far and the rank still sought among the values that share them.
var<workgroup> sel_hist: array<atomic<u32>, 256>;
var<workgroup> sel_prefix: u32;
var<workgroup> sel_rank: u32;

// The order statistic `k` (0-based) of the first m history entries: a radix selection,
// 8 bits a pass from the top, over their bits (norms are >= 0, so the bits order as the
// values do). O(m) work in all and no scratch copy; the same value as sorting, whatever
// the thread timing. Call from uniform control flow.
fn order_statistic(base: u32, m: u32, k: u32, lid: u32) -> f32 {
    // A previous call's threads may still read the shared prefix.
    workgroupBarrier();
    if (lid == 0u) {
        sel_prefix = 0u;
        sel_rank = k;
    }
    for (var round = 0u; round < 4u; round = round + 1u) {
        let shift = 24u - 8u * round;
        // The digits above this one, as a mask (none in the first pass).
        let above = (0xffffffffu << (31u - 8u * round)) << 1u;
        atomicStore(&sel_hist[lid], 0u);
        workgroupBarrier();
        let prefix = sel_prefix;
        for (var i = lid; i < m; i = i + WG) {
            let bits = state[base + ST_HEADER + i];
            if ((bits & above) == prefix) {
                atomicAdd(&sel_hist[(bits >> shift) & 0xffu], 1u);
            }
        }
        workgroupBarrier();
        if (lid == 0u) {
            var rank = sel_rank;
            var digit = 0u;
            for (; digit < 255u; digit = digit + 1u) {
                let count = atomicLoad(&sel_hist[digit]);
                if (rank < count) {
                    break;
                }
                rank = rank - count;
            }
            sel_rank = rank;
            sel_prefix = prefix | (digit << shift);
        }
        workgroupBarrier();
    }
    return bitcast<f32>(workgroupUniformLoad(&sel_prefix));
}

// Percentile `q` (0..100) of the first m history entries, linear interpolation between
// order statistics as numpy's default.
fn percentile(base: u32, m: u32, q: f32, lid: u32) -> f32 {
    let pos = q / 100.0 * f32(m - 1u);
    // f32(m - 1) may round up for long histories.
    let lo = min(u32(floor(pos)), m - 1u);
    let hi = min(lo + 1u, m - 1u);
    let t = pos - f32(lo);
    let a = order_statistic(base, m, lo, lid);
    let b = order_statistic(base, m, hi, lid);
    // numpy's lerp: from the nearer end, so the result is monotone in t.
    if (t >= 0.5) {
        return b - (b - a) * (1.0 - t);
    }
    return a + (b - a) * t;
}
