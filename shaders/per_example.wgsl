// per_example.wgsl: the DP-SGD sum: out[j] = (sum_i f_i * g[i, j] + std * N(0, 1)) / divisor
// for one tensor laid out [batch, P].
//
// Bindings (group 0):
//   0 inputs    storage, read        window of the per-example gradients (32-bit words)
//   1 outputs   storage, read_write  window of the f32 output
//   2 coefs     storage, read        f_i per (example, tensor) segment (coef.wgsl `coefs`)
//   3 tensor    uniform              ExampleParams of this tensor
//   4 step      uniform              StepParams of this step (noise std, seed, step), at a
//                                    dynamic offset
//   5 report    storage, read        StepReport as words (read-only: its counter is atomic)
//
// One thread owns one output element and walks the batch in order, so the sum has a
// fixed order; reads of consecutive threads are consecutive. When the step is held
// (non-finite gradients under SkipStep or Error) the output is left untouched.
// CPU twin: src/cpu/per_example.rs.

#import acc
#import convert
#import grid
#import philox

@group(0) @binding(0) var<storage, read> inputs: array<u32>;
@group(0) @binding(1) var<storage, read_write> outputs: array<f32>;
@group(0) @binding(2) var<storage, read> coefs: array<f32>;
@group(0) @binding(3) var<uniform> tensor: ExampleParams;
@group(0) @binding(4) var<uniform> step: StepParams;
@group(0) @binding(5) var<storage, read> report: array<u32>;

fn element(e: u32, dtype: u32) -> f32 {
    if (dtype == DTYPE_F32) {
        return bitcast<f32>(inputs[e]);
    }
    return half_to_f32(half_of(inputs[e >> 1u], e), dtype);
}

@compute @workgroup_size(WG)
fn main(inv: Invocation) {
    let j = workgroup_index(inv) * WG + inv.lid;
    if (j >= tensor.len || (report[STATUS_WORD] & STATUS_HELD) != 0u) {
        return;
    }
    var sum = 0.0;
    for (var i = 0u; i < tensor.batch; i = i + 1u) {
        var x = element(tensor.in_offset + i * tensor.len + j, tensor.dtype);
        if (tensor.policy == POLICY_ZERO_NANS && nonfinite_flag(bitcast<u32>(x)) == FLAG_NAN) {
            x = 0.0;
        }
        sum = sum + coefs[tensor.seg_base + i * tensor.seg_stride] * x;
    }
    if (step.sigma > 0.0) {
        sum = sum + step_noise(step, tensor.tensor, j);
    }
    outputs[tensor.out_offset + j] = sum * tensor.inv_divisor;
}
