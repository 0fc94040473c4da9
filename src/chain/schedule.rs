//! Threshold schedules: a multiplier of every threshold of a policy, per step.

use std::sync::Arc;

/// How thresholds change over training: every threshold of the rule (max norms, group
/// thresholds, the block RMS threshold, AGC's lambda, the adaptive thresholds) is
/// multiplied by `multiplier(step)`. The same factor can drive a learning rate with
/// [`Schedule::lr`], so threshold and step size decay together.
#[derive(Clone, Default)]
pub enum Schedule {
    /// Always 1.
    #[default]
    Constant,
    /// `factor^(step / every)` (integer division): decays by `factor` every `every` steps.
    StepDecay {
        /// Factor per period, finite and > 0.
        factor: f64,
        /// Period in steps, >= 1.
        every: u64,
    },
    /// Any function of the step, under a name of the caller's: a saved state and the
    /// ranks of a sharded run know a custom schedule by its name only.
    Custom(String, Arc<dyn Fn(u64) -> f64 + Send + Sync>),
}

impl std::fmt::Debug for Schedule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Schedule::Constant => f.write_str("Constant"),
            Schedule::StepDecay { factor, every } => f
                .debug_struct("StepDecay")
                .field("factor", factor)
                .field("every", every)
                .finish(),
            Schedule::Custom(name, _) => write!(f, "Custom({name:?})"),
        }
    }
}

impl Schedule {
    /// Decay by `factor` every `every` steps.
    pub fn step_decay(factor: f64, every: u64) -> Self {
        Schedule::StepDecay { factor, every }
    }

    /// A schedule given by `f(step)`, known as `name`: give two different functions two
    /// different names, since states and sharded ranks tell schedules apart by name.
    pub fn custom(name: impl Into<String>, f: impl Fn(u64) -> f64 + Send + Sync + 'static) -> Self {
        Schedule::Custom(name.into(), Arc::new(f))
    }

    /// The threshold multiplier at `step` (counted from 0).
    pub fn multiplier(&self, step: u64) -> f64 {
        match self {
            Schedule::Constant => 1.0,
            Schedule::StepDecay { factor, every } => {
                factor.powi((step / (*every).max(1)).min(i32::MAX as u64) as i32)
            }
            Schedule::Custom(_, f) => f(step),
        }
    }

    /// A learning rate following the same schedule: `base_lr * multiplier(step)`.
    pub fn lr(&self, base_lr: f64, step: u64) -> f64 {
        base_lr * self.multiplier(step)
    }

    /// The multiplier as the shaders take it; errors when it is not finite and > 0.
    pub(crate) fn checked(&self, step: u64) -> Result<f32, crate::ClipError> {
        let m = self.multiplier(step) as f32;
        if m.is_finite() && m > 0.0 {
            Ok(m)
        } else {
            Err(crate::ClipError::InvalidConfig(format!(
                "schedule multiplier at step {step} must be finite and > 0, got {m}"
            )))
        }
    }
}
