// The README is the crate documentation, so its examples are compiled and run as doctests.
#![doc = include_str!("../README.md")]
#![warn(missing_docs)]

mod clipper;
pub mod cpu;
mod dtype;
mod error;
mod gpu;
mod norm;
mod ops;
mod plan;
mod policy;
mod report;

pub use clipper::{Backend, Clipper};
pub use dtype::{DType, GradMut, GradRef};
pub use error::ClipError;
pub use gpu::{GpuBatch, GpuContext, GpuTensor, PendingReport};
pub use half::{bf16, f16};
pub use norm::{Norm, NormAcc, PartialNorm};
pub use ops::{GlobalNormClip, ValueClip};
pub use policy::NonFinitePolicy;
pub use report::ClipReport;
