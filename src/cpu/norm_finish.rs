//! CPU twin of the `total` entry of `shaders/norm_finish.wgsl`: from the batch's norm
//! accumulator to the clip coefficient and the step's status bits.

use crate::norm::{Norm, NormAcc, FLAG_NAN};
use crate::policy::NonFinitePolicy;
use crate::report::{STATUS_NANS_ZEROED, STATUS_NONFINITE, STATUS_SCALED, STATUS_SKIPPED};

/// The coefficient and status bits of a global-norm clip step.
pub(crate) fn finish(
    acc: &NormAcc,
    norm: Norm,
    max_norm: f32,
    policy: NonFinitePolicy,
) -> (f32, u32) {
    // ZeroNans: the NaNs are zeroed by the scaling pass, so they do not count here.
    let zero_nans = policy == NonFinitePolicy::ZeroNans;
    let live = NormAcc {
        flags: if zero_nans {
            acc.flags & !FLAG_NAN
        } else {
            acc.flags
        },
        ..*acc
    };
    let coef = live.clip_coef(norm, max_norm);
    // NaN is not >= 1, so a NaN coefficient is applied: propagate poisons every element.
    let mut apply = coef < 1.0 || coef.is_nan();
    let mut status = 0;
    if acc.flags != 0 {
        status = STATUS_NONFINITE;
    }
    if zero_nans && acc.flags & FLAG_NAN != 0 {
        status |= STATUS_NANS_ZEROED;
        apply = true;
    }
    let holds = matches!(policy, NonFinitePolicy::Error | NonFinitePolicy::SkipStep);
    if live.flags != 0 && holds {
        apply = false;
        if policy == NonFinitePolicy::SkipStep {
            status |= STATUS_SKIPPED;
        }
    }
    if apply {
        status |= STATUS_SCALED;
    }
    (coef, status)
}
