// The README is the crate documentation, so its examples are compiled and run as doctests.
#![doc = include_str!("../README.md")]
#![warn(missing_docs)]

mod chain;
mod clipper;
mod cpu;
mod dtype;
mod error;
mod gpu;
mod monitor;
mod non_finite;
mod norm;
mod ops;
mod optim;
mod plan;
mod recording;
mod report;
mod runner;
mod shaders;
mod shard;

pub use chain::{
    AdaptiveKind, AdaptiveState, Agc, AutoClip, BlockRmsClip, ClipPolicy, ExampleThreshold,
    GaussianNoise, Group, GroupClip, LossScale, LossScaleState, Masked, PerExampleClip,
    PerTensorClip, PolicyState, Rule, Schedule, TensorInfo, UnitAxis, UnitLayout, ZClip,
};
pub use clipper::{Backend, Clipper};
pub use cpu::policy::DeferredStep;
pub use dtype::{DType, GradMut, GradRef};
pub use error::ClipError;
pub use gpu::{DeferredClip, GpuContext, GpuTensor, LossScaleBinding, PendingReport, ReportFuture};
pub use half::{bf16, f16};
#[cfg(feature = "plot")]
pub use monitor::plot;
pub use monitor::GradMonitor;
pub use non_finite::NonFinitePolicy;
pub use norm::{Norm, PartialNorm};
pub use ops::ValueClip;
pub use optim::{Adam, Optimizer, OptimizerState, Sgd};
pub use report::{ClipReport, GroupReport, LossScaleReport, StageReport, TensorReport};
pub use runner::{
    Accumulate, CpuClipper, GpuClipper, Optimize, PerExample, Plain, Sharded, Wrapper,
};
#[cfg(feature = "mpi")]
pub use shard::mpi::MpiCollective;
pub use shard::{Collective, Shard, SingleRank, ThreadCollective};
/// The wgpu this crate is built against: use it for your buffers and devices so the
/// versions match.
pub use wgpu;

/// The counter-based generator behind [`GaussianNoise`], for checking or reproducing
/// the noise a step added.
pub mod noise {
    pub use crate::cpu::philox::{gaussian_block, gaussian_noise, philox4x32_10};
}

/// The guides in docs/, compiled here so their examples are tested with the crate's doctests.
#[cfg(doctest)]
mod docs_examples {
    #[doc = include_str!("../docs/architecture.md")]
    struct Architecture;
    #[doc = include_str!("../docs/guide.md")]
    struct Guide;
    #[doc = include_str!("../docs/sharding.md")]
    struct Sharding;
}
