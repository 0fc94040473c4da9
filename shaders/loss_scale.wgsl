// loss_scale.wgsl: the include that reads a loss-scaled chain's scale on the device, for a
// caller's own shader that multiplies the loss (or the seed of the backward pass) by it,
// so the scale never goes through the host. Placeholders in braces are filled in by
// `LossScaleBinding::wgsl`: the bind group, the binding and the scale's word.
//
// Bindings (group {group}):
//   {binding}  storage, read  the chain's device state (`LossScaleBinding::state`)

@group({group}) @binding({binding}) var<storage, read> gradclip_loss_state: array<u32>;

// The loss scale the chain's next step expects its gradients to carry: multiply the loss
// by it. Every step of the chain updates it on the device (backoff, growth).
fn gradclip_loss_scale() -> f32 {
    return bitcast<f32>(gradclip_loss_state[{word}u]);
}
