//! What to do when gradients contain NaN or infinity.

/// Policy for a step whose gradients hold NaN or infinite values (found by the norm pass).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum NonFinitePolicy {
    /// PyTorch's default (`error_if_nonfinite=False`): the total norm is NaN or inf and the
    /// coefficient follows from it (0 for inf, NaN for NaN), so finite gradients become 0
    /// (or NaN) and inf gradients become NaN. The report says `non_finite`.
    #[default]
    Propagate,
    /// Leave every gradient and the adaptive state untouched and return
    /// [`crate::ClipError::NonFiniteNorm`] (PyTorch's `error_if_nonfinite=True`, without its
    /// device-to-host sync). The step still counts: on the GPU the verdict is known only
    /// when its report is read, so both backends number every step run.
    Error,
    /// Leave every gradient and the adaptive state untouched and report the step as
    /// skipped, so the training loop can skip its optimizer update (as AMP's grad scaler
    /// does). In a chain, any stage that finds the values holds the whole step: no stage
    /// records its norm.
    SkipStep,
    /// optax `zero_nans`: NaN elements are replaced by 0 before the norm and the clip
    /// (infinities still propagate); the report says `nans_zeroed`.
    ZeroNans,
}

impl NonFinitePolicy {
    /// The flags that count under this policy: ZeroNans removes NaNs before the norm.
    pub(crate) fn live_flags(self, flags: u32) -> u32 {
        if self == NonFinitePolicy::ZeroNans {
            flags & !crate::norm::FLAG_NAN
        } else {
            flags
        }
    }

    /// The shader's `policy` code in `StepParams`.
    pub(crate) fn code(self) -> u32 {
        use crate::shaders::abi::*;
        match self {
            NonFinitePolicy::Propagate => POLICY_PROPAGATE,
            NonFinitePolicy::Error => POLICY_ERROR,
            NonFinitePolicy::SkipStep => POLICY_SKIP,
            NonFinitePolicy::ZeroNans => POLICY_ZERO_NANS,
        }
    }
}
