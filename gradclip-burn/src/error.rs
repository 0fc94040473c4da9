//! The crate's error type.

use burn::tensor::DType;
use gradclip::ClipError;

/// Everything that can go wrong between Burn and gradclip. An error of
/// [`crate::BurnClipper::clip`] is returned before any gradient is written: the gradients,
/// the clipper's state and its step counter are left as they were. (A report that cannot
/// be read back afterwards, [`ClipError::Readback`], comes after the clip ran.)
#[derive(Debug, thiserror::Error)]
pub enum BurnClipError {
    /// gradclip refused the policy or the tensors, or wgpu refused the step.
    #[error(transparent)]
    Clip(#[from] ClipError),
    /// A parameter that requires a gradient has none in the `GradientsParams`.
    #[error(
        "parameter {path:?} has no gradient: was it used in the loss, and were the gradients taken from this module (GradientsParams::from_grads)?"
    )]
    MissingGradient {
        /// Module path of the parameter.
        path: String,
    },
    /// A gradient or parameter lives on another device than the clipper's.
    #[error("{path:?} is on device {found}, but the clipper runs on {expected}")]
    ForeignDevice {
        /// Module path of the parameter.
        path: String,
        /// Its device.
        found: String,
        /// The clipper's device.
        expected: String,
    },
    /// A gradient of an element type gradclip does not clip.
    #[error("{path:?} has element type {dtype:?}; gradclip clips f32 (and flex32), f16 and bf16")]
    UnsupportedDType {
        /// Module path of the parameter.
        path: String,
        /// Its element type.
        dtype: DType,
    },
    /// A gradient that cannot be clipped even after a copy in order (its buffer range is
    /// shorter than its elements, or the copy is still not dense), a parameter that AGC
    /// reads and that is not stored in order, or a tensor not on Burn's wgpu backend.
    #[error("{path:?} cannot be clipped in place: {reason}")]
    Layout {
        /// Module path of the parameter.
        path: String,
        /// What is wrong with it.
        reason: String,
    },
    /// Burn's wgpu runtime could not be started or shared, or it failed a flush.
    #[error("Burn's wgpu runtime: {0}")]
    Runtime(String),
    /// The wrapped optimizer clips too (Burn's `grad_clipping` is set).
    #[error(
        "the optimizer already clips gradients (SGD's gradient_clipping or Adam's grad_clipping is set); leave it unset so nothing is clipped twice"
    )]
    ClipsTwice,
}
