//! Loss scaling for mixed-precision training ([`LossScale`]): the loss is multiplied by a
//! scale S before the backward pass, so the gradients arrive times S; a loss-scaled chain
//! divides every norm by S, folds `1 / S` into the coefficients it applies, skips a step
//! whose gradients hold an infinity or a NaN, and updates S, all inside the step.

use crate::error::ClipError;

/// How a chain's loss scale S moves ([`crate::ClipPolicy::loss_scale`]): PyTorch's
/// `torch.amp.GradScaler` rule. A step whose scaled gradients hold an infinity or a NaN
/// is skipped and S is multiplied by `backoff` (not below `min`); after `growth_interval`
/// finite steps in a row S is multiplied by `growth` (not above `max`). A fixed scale
/// ([`LossScale::fixed`]) never moves, and its non-finite steps are skipped too.
///
/// ```
/// use gradclip::{ClipPolicy, LossScale};
/// // PyTorch's defaults: 2^16, x2 after 2000 finite steps, x0.5 after an overflow.
/// let chain = ClipPolicy::global_norm(1.0).loss_scale(LossScale::dynamic());
/// assert!(chain.validate().is_ok());
/// let quick = LossScale::dynamic().init(1024.0).growth(2.0, 100).backoff(0.25);
/// assert_eq!(quick.growth_interval, 100);
/// ```
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LossScale {
    /// The scale of the first step: finite, in `[min, max]`.
    pub init: f32,
    /// Factor after `growth_interval` finite steps in a row: finite and >= 1.
    pub growth: f32,
    /// Finite steps in a row before S grows: at least 1.
    pub growth_interval: u32,
    /// Factor after a skipped step: in (0, 1].
    pub backoff: f32,
    /// Bounds of S: finite, `0 < min <= max`.
    pub min: f32,
    /// See [`LossScale::min`].
    pub max: f32,
}

/// The smallest and largest powers of two that are normal f32: S never reaches 0 or
/// infinity, and dividing by it stays exact.
const MIN_SCALE: f32 = f32::MIN_POSITIVE;
const MAX_SCALE: f32 = 1.7014118e38; // 2^127

impl LossScale {
    /// PyTorch's `GradScaler` defaults: S starts at 2^16, doubles after 2000 finite steps
    /// in a row and halves after a skipped step, between 2^-126 and 2^127 (PyTorch has no
    /// bounds; these only keep S a normal f32).
    pub fn dynamic() -> LossScale {
        LossScale {
            init: 65536.0,
            growth: 2.0,
            growth_interval: 2000,
            backoff: 0.5,
            min: MIN_SCALE,
            max: MAX_SCALE,
        }
    }

    /// A scale that never moves (static loss scaling): steps with non-finite gradients are
    /// still skipped.
    pub fn fixed(scale: f32) -> LossScale {
        LossScale {
            init: scale,
            growth: 1.0,
            growth_interval: u32::MAX,
            backoff: 1.0,
            min: scale,
            max: scale,
        }
    }

    /// Starts at `scale`.
    pub fn init(self, scale: f32) -> LossScale {
        LossScale {
            init: scale,
            ..self
        }
    }

    /// Grows by `factor` after `interval` finite steps in a row.
    pub fn growth(self, factor: f32, interval: u32) -> LossScale {
        LossScale {
            growth: factor,
            growth_interval: interval,
            ..self
        }
    }

    /// Backs off by `factor` after a skipped step.
    pub fn backoff(self, factor: f32) -> LossScale {
        LossScale {
            backoff: factor,
            ..self
        }
    }

    /// Keeps the scale in `[min, max]`.
    pub fn bounds(self, min: f32, max: f32) -> LossScale {
        LossScale { min, max, ..self }
    }

    /// Checks the numbers.
    pub fn validate(&self) -> Result<(), ClipError> {
        let bad = |why: String| Err(ClipError::InvalidConfig(why));
        let LossScale {
            init,
            growth,
            growth_interval,
            backoff,
            min,
            max,
        } = *self;
        if !(min.is_normal() && min > 0.0 && max.is_finite() && min <= max) {
            return bad(format!(
                "loss scale bounds must be finite with 0 < min <= max (and min a normal f32), \
                 got [{min}, {max}]"
            ));
        }
        if !(init >= min && init <= max) {
            return bad(format!(
                "the initial loss scale {init} must lie in its bounds [{min}, {max}]"
            ));
        }
        if !(growth.is_finite() && growth >= 1.0) || growth_interval == 0 {
            return bad(format!(
                "loss scale growth must be a finite factor >= 1 after at least 1 step, got \
                 x{growth} after {growth_interval}"
            ));
        }
        if !(backoff > 0.0 && backoff <= 1.0) {
            return bad(format!(
                "loss scale backoff must be in (0, 1], got {backoff}"
            ));
        }
        Ok(())
    }

    /// The scale and count after a step with scale `state.scale` that was skipped or not:
    /// `update_loss_scale` of `shaders/coef.wgsl`, in its f32 arithmetic.
    pub(crate) fn next(&self, state: LossScaleState, skipped: bool) -> LossScaleState {
        let good = state.finite_steps.wrapping_add(1);
        if skipped {
            LossScaleState {
                scale: (state.scale * self.backoff).max(self.min),
                finite_steps: 0,
            }
        } else if good >= self.growth_interval {
            LossScaleState {
                scale: (state.scale * self.growth).min(self.max),
                finite_steps: 0,
            }
        } else {
            LossScaleState {
                scale: state.scale,
                finite_steps: good,
            }
        }
    }
}

/// What a loss-scaled chain remembers of its scale ([`crate::PolicyState::loss_scale`]).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LossScaleState {
    /// The scale the next step's gradients are expected to carry: multiply the next loss
    /// by it.
    pub scale: f32,
    /// Finite steps in a row since the scale last changed.
    pub finite_steps: u32,
}
