//! gradclip inside Burn training code: clip a Burn module's gradients in place, on
//! Burn's own wgpu device and queue, with any gradclip chain.
//!
//! ```no_run
//! use burn::optim::{GradientsParams, SgdConfig};
//! use gradclip::{ClipPolicy, Rule};
//! use gradclip_burn::{BurnClipper, SharedDevice};
//! # fn demo<M: burn::module::Module>(model: M, loss: burn::tensor::Tensor<1>) -> Result<(), Box<dyn std::error::Error>> {
//! let shared = SharedDevice::init()?; // before any tensor touches the device
//! let mut clipper = BurnClipper::new(&shared, ClipPolicy::new(Rule::GlobalNorm(1.0)))?;
//! let mut optim = SgdConfig::new().init();
//! let mut grads = GradientsParams::from_grads(loss.backward(), &model);
//! let report = clipper.clip(&model, &mut grads)?; // on the device, before the step
//! let model = optim.step(0.1, model, grads);
//! println!("norm before clipping: {}", report.wait()?.total_norm);
//! # Ok(()) }
//! ```
//!
//! The guide is `docs/burn.md` in the gradclip repository.

#![warn(missing_docs)]

mod clipper;
mod device;
mod error;
mod gradients;
#[cfg(feature = "learner")]
mod learner;
mod multi;
mod optimizer;

pub use clipper::BurnClipper;
pub use device::SharedDevice;
pub use error::BurnClipError;
#[cfg(feature = "learner")]
pub use learner::{ClipMetric, ClipQuantity, LearnerClipper};
pub use multi::MultiDeviceClipper;
pub use optimizer::ClippedOptimizer;

/// The guide, docs/burn.md, compiled here so its examples are tested with the doctests.
#[cfg(all(doctest, feature = "learner"))]
#[doc = include_str!("../../docs/burn.md")]
struct Guide;
