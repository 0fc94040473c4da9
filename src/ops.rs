//! The clipping transforms: small validated descriptions that the CPU path and the GPU
//! path both execute over the shared norm reduction.

use crate::error::ClipError;
use crate::non_finite::NonFinitePolicy;
use crate::norm::Norm;

/// Clip by the norm of all tensors together (PyTorch `clip_grad_norm_`):
/// every element is multiplied by `min(max_norm / (total + 1e-6), 1)`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GlobalNormClip {
    /// Largest allowed total norm; finite and > 0.
    pub max_norm: f32,
    /// Norm order (default L2).
    pub norm: Norm,
    /// What to do with NaN or infinite gradients (default: propagate, as PyTorch).
    pub non_finite: NonFinitePolicy,
    /// Also report every tensor's own norm (costs one small extra pass on the GPU).
    pub tensor_norms: bool,
}

impl GlobalNormClip {
    /// L2 clipping to `max_norm`, PyTorch's defaults otherwise.
    pub fn new(max_norm: f32) -> Self {
        GlobalNormClip {
            max_norm,
            norm: Norm::L2,
            non_finite: NonFinitePolicy::Propagate,
            tensor_norms: false,
        }
    }

    /// Uses norm order `norm`.
    pub fn norm(mut self, norm: Norm) -> Self {
        self.norm = norm;
        self
    }

    /// Uses non-finite policy `policy`.
    pub fn non_finite(mut self, policy: NonFinitePolicy) -> Self {
        self.non_finite = policy;
        self
    }

    /// Asks for per-tensor norms in the report.
    pub fn with_tensor_norms(mut self) -> Self {
        self.tensor_norms = true;
        self
    }

    /// Checks `max_norm` and the norm order.
    pub fn validate(&self) -> Result<(), ClipError> {
        validate_max_norm(self.max_norm)?;
        self.norm.validate()
    }
}

/// `max_norm` must be finite and strictly positive.
pub(crate) fn validate_max_norm(max_norm: f32) -> Result<(), ClipError> {
    if max_norm.is_finite() && max_norm > 0.0 {
        Ok(())
    } else {
        Err(ClipError::InvalidMaxNorm(max_norm))
    }
}

/// Clamp every element to `[lo, hi]` (PyTorch `clip_grad_value_`, TF `clip_by_value`).
/// NaN elements stay NaN; infinities clamp to the bounds. For f16 and bf16 tensors the
/// bounds are rounded to the element type (round to nearest even).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ValueClip {
    /// Lower bound.
    pub lo: f32,
    /// Upper bound.
    pub hi: f32,
}

impl ValueClip {
    /// The bounds rounded to f16 (low 16 bits) and bf16 (high 16 bits), as the shaders
    /// take them.
    pub(crate) fn half_bounds(&self) -> (u32, u32) {
        let halves = |v: f32| {
            half::f16::from_f32(v).to_bits() as u32
                | (half::bf16::from_f32(v).to_bits() as u32) << 16
        };
        (halves(self.lo), halves(self.hi))
    }

    /// `[-v, v]`, PyTorch's `clip_grad_value_(params, v)`.
    pub fn symmetric(v: f32) -> Self {
        ValueClip { lo: -v, hi: v }
    }

    /// `[lo, hi]`, TensorFlow's `clip_by_value(t, lo, hi)`.
    pub fn range(lo: f32, hi: f32) -> Self {
        ValueClip { lo, hi }
    }

    /// Errors when a bound is NaN or `lo > hi`.
    pub fn validate(&self) -> Result<(), ClipError> {
        if self.lo <= self.hi {
            Ok(())
        } else {
            Err(ClipError::InvalidBounds {
                lo: self.lo,
                hi: self.hi,
            })
        }
    }
}

/// Checks a micro-batch count.
pub(crate) fn check_micro_steps(micro_steps: u32) -> Result<(), ClipError> {
    if micro_steps == 0 {
        return Err(ClipError::InvalidConfig(
            "gradient accumulation needs at least one micro-batch (micro_steps = 0)".into(),
        ));
    }
    Ok(())
}
