// optimizer.wgsl: fused optimizer steps that clip as they read. SGD (momentum, dampening,
// Nesterov, weight decay) and Adam / AdamW (amsgrad) as torch.optim defines them, over
// f32 master weights and f32 state, from f32, f16 or bf16 gradients. Each gradient is read
// once and passed through the step's `transform` with its unit's coefficient, so a clipped
// optimizer step costs the norm read plus this pass, and the gradients are never written.
//
// Bindings (group 0):
//   0 grads     storage, read        one binding window of a gradient buffer, as words
//   1 chunks    storage, read        the step table (StepChunk)
//   2 coefs     storage, read        coefficient per unit (coef.wgsl `coefs`)
//   3 step      uniform              StepParams of this step, at a dynamic offset (lr)
//   4 run       uniform              StepRunParams: this dispatch's rows and state length
//   5 params    storage, read_write  one binding window of the f32 parameters
//   6 report    storage, read        StepReport as words
//   7 state     storage, read_write  this dispatch's state: m (or the momentum), v, vmax
//   8 counter   storage              OptimizerCounter: read_write in `tick`, read in `update`
//   9 opt       uniform              OptimizerParams
//
// Entry `tick` (one invocation) decides once per step whether it runs (not held by the
// clip, its parameter slot its own), counts it and derives Adam's bias corrections; a held
// step leaves the counter, the parameters and the state untouched. Entry `update`: one
// workgroup updates one row of the table, 256 threads striding over its elements.
// CPU twin: src/optim/mod.rs (`sgd`, `adam`, `power`), run by src/cpu/optimizer.rs.

#import convert
#import grid
#import transform
#import units

@group(0) @binding(0) var<storage, read> grads: array<u32>;
@group(0) @binding(1) var<storage, read> chunks: array<StepChunk>;
@group(0) @binding(2) var<storage, read> coefs: array<f32>;
@group(0) @binding(3) var<uniform> step: StepParams;
@group(0) @binding(4) var<uniform> run: StepRunParams;
@group(0) @binding(5) var<storage, read_write> params: array<f32>;
@group(0) @binding(6) var<storage, read> report: array<u32>;
@group(0) @binding(7) var<storage, read_write> state: array<f32>;
@group(0) @binding(8) var<storage, read_write> counter_rw: OptimizerCounter;
@group(0) @binding(8) var<storage, read> counter: OptimizerCounter;
@group(0) @binding(9) var<uniform> opt: OptimizerParams;

// b^t by squaring, in f32: the same products, in the same order, as the host twin.
fn power(b: f32, t: u32) -> f32 {
    var result = 1.0;
    var base = b;
    var e = t;
    loop {
        if ((e & 1u) != 0u) {
            result = result * base;
        }
        e = e >> 1u;
        if (e == 0u) {
            break;
        }
        base = base * base;
    }
    return result;
}

@compute @workgroup_size(1)
fn tick() {
    var c = counter_rw;
    c.run = select(0u, 1u, step_runs(report[STATUS_WORD], report[TAG_WORD]));
    if (c.run == 1u) {
        // Stops at the top: wrapping to 0 would divide by zero below.
        c.steps = c.steps + select(1u, 0u, c.steps == 0xffffffffu);
        c.step_size = step.lr / (1.0 - power(opt.beta1, c.steps));
        c.bias2_sqrt = sqrt(1.0 - power(opt.beta2, c.steps));
    }
    counter_rw = c;
}

// Element `k` of row `c` of the gradients, as f32.
fn gradient(c: StepChunk, k: u32) -> f32 {
    let e = c.grad_start + k;
    if (c.dtype == DTYPE_F32) {
        return bitcast<f32>(grads[e]);
    }
    return half_to_f32(half_of(grads[e >> 1u], e), c.dtype);
}

// The step's optimizer constants, read once per invocation: lavapipe reloads a uniform or
// storage value at every use inside an element loop.
struct Hyper {
    opt: OptimizerParams,
    steps: u32,
    step_size: f32,
    bias2_sqrt: f32,
    lr: f32,
    decay: f32,
}

// torch.optim.SGD on one element; `s`: its momentum buffer.
fn sgd(p: f32, g: f32, s: u32, h: Hyper) -> f32 {
    let o = h.opt;
    var d = g;
    if (o.weight_decay != 0.0) {
        d = d + o.weight_decay * p;
    }
    if (o.momentum != 0.0) {
        // The first step starts the buffer at the gradient, as torch does.
        var buf = d;
        if (h.steps != 1u) {
            buf = state[s] * o.momentum + o.undamped * d;
        }
        state[s] = buf;
        if (o.nesterov == 1u) {
            d = d + o.momentum * buf;
        } else {
            d = buf;
        }
    }
    return p - h.lr * d;
}

// torch.optim.Adam / AdamW on one element; `s`: its first moment, `s + n` the second,
// `s + 2n` the running maximum of the second (amsgrad).
fn adam(p: f32, g: f32, s: u32, n: u32, h: Hyper) -> f32 {
    let o = h.opt;
    var x = p;
    var d = g;
    if (o.weight_decay != 0.0) {
        if (o.decoupled == 1u) {
            x = x * h.decay;
        } else {
            d = d + o.weight_decay * x;
        }
    }
    let m_old = state[s];
    // torch's lerp(m, d, w): from the nearer end.
    let w = o.one_minus_beta1;
    var m = d - (d - m_old) * (1.0 - w);
    if (w < 0.5) {
        m = m_old + w * (d - m_old);
    }
    let v = state[s + n] * o.beta2 + o.one_minus_beta2 * d * d;
    state[s] = m;
    state[s + n] = v;
    var vv = v;
    if (o.amsgrad == 1u) {
        vv = max(state[s + 2u * n], v);
        state[s + 2u * n] = vv;
    }
    let denom = sqrt(vv) / h.bias2_sqrt + o.eps;
    return x - h.step_size * m / denom;
}

// The clipped gradient of element `k` of row `c`; `coef`: the row's coefficient when its
// tensor is one unit, else (`per_unit`) each element's unit has its own.
fn clipped(c: StepChunk, k: u32, coef: f32, per_unit: bool, ew: Elementwise) -> f32 {
    let index = c.index + k;
    var unit_coef = coef;
    if (per_unit) {
        unit_coef = coefs[gradclip_unit(c.unit_first, c.unit_div, c.unit_count, index)];
    }
    return transform(gradient(c, k), unit_coef, ew, c.tensor, index);
}

@compute @workgroup_size(WG)
fn update(inv: Invocation) {
    let local = workgroup_index(inv);
    if (local >= run.n_chunks || counter.run == 0u) {
        return;
    }
    let c = chunks[run.first_chunk + local];
    let n = run.state_len;
    var coef = 1.0;
    if (SCALE && step.rule == 1u) {
        coef = coefs[c.unit_first];
    }
    let per_unit = SCALE && step.rule == 1u && c.unit_count != 1u;
    let ew = elementwise();
    let cnt = counter;
    let h = Hyper(opt, cnt.steps, cnt.step_size, cnt.bias2_sqrt, step.lr, step.decay);
    // One loop per optimizer: the choice is made once per row, not per element.
    if (h.opt.kind == OPT_SGD) {
        for (var k = inv.lid; k < c.len; k = k + WG) {
            let at = c.param_start + k;
            params[at] = sgd(params[at], clipped(c, k, coef, per_unit, ew), c.state_start + k, h);
        }
        return;
    }
    for (var k = inv.lid; k < c.len; k = k + WG) {
        let at = c.param_start + k;
        params[at] = adam(params[at], clipped(c, k, coef, per_unit, ew), c.state_start + k, n, h);
    }
}
