// deferred.wgsl: the include of deferred scaling (`GpuPolicy::encode_deferred`), for a
// caller's own shader that reads the gradients after a deferred clip: an optimizer step
// that multiplies as it reads, so clipping costs one read pass and no write. Placeholders
// in braces are filled in by `DeferredClip::wgsl`: the bind group, the two bindings, and
// the policy's NaN handling.
//
// Bindings (group {group}):
//   {coefs}   storage, read   the coefficient of every unit (`DeferredClip::coefficients`)
//   {report}  storage, read   the step's report header (`DeferredClip::report`)
//
// Units: a tensor's units start at `first` with `div` and `count` from its `UnitLayout`
// (`DeferredClip::layouts`): element `index` belongs to `gradclip_unit(first, div, count,
// index)`; a tensor that is one unit is unit `first`.

#import units

@group({group}) @binding({coefs}) var<storage, read> gradclip_coefs: array<f32>;
@group({group}) @binding({report}) var<storage, read> gradclip_report: array<u32>;

const GRADCLIP_ZERO_NANS: bool = {zero_nans};

// True when the clip held the step (non-finite gradients under `Error` or `SkipStep`, or a
// step whose parameters were overwritten): leave the parameters and the state alone.
fn gradclip_held() -> bool {
    return (gradclip_report[{status_word}u] & {held}u) != 0u;
}

// The coefficient of unit `unit`.
fn gradclip_coef(unit: u32) -> f32 {
    return gradclip_coefs[unit];
}

// Gradient value `x` of unit `unit` as the in-place clip would have left it.
fn gradclip_scaled(x: f32, unit: u32) -> f32 {
    var y = x;
    let bits = bitcast<u32>(x);
    if (GRADCLIP_ZERO_NANS && (bits & 0x7f800000u) == 0x7f800000u && (bits & 0x7fffffu) != 0u) {
        y = 0.0;
    }
    let coef = gradclip_coefs[unit];
    if (bitcast<u32>(coef) != bitcast<u32>(1.0)) {
        y = y * coef;
    }
    return y;
}
