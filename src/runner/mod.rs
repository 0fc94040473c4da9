//! The runners, one per place the gradients live, and the wrappers around a chain that
//! every runner offers. A runner's type names its place ([`GpuClipper`]: your wgpu
//! buffers; [`CpuClipper`]: host slices on the CPU; [`crate::Clipper`]: host slices on
//! the best backend) and its wrapper ([`Plain`], [`Accumulate`], [`PerExample`],
//! [`Optimize`], [`Sharded`]), which decides what a step takes and what state it keeps.
//! The engines behind them live in `gpu/` and `cpu/`; this module only gives them one
//! surface.

mod cpu;
mod gpu;

use std::marker::PhantomData;

pub use cpu::CpuClipper;
pub use gpu::GpuClipper;

use crate::shard::Collective;

mod sealed {
    pub trait Sealed {}
}

/// What a runner does around its chain: the type parameter of [`GpuClipper`],
/// [`CpuClipper`] and [`crate::Clipper`]. Implemented by [`Plain`], [`Accumulate`],
/// [`PerExample`], [`Optimize`] and [`Sharded`] only.
pub trait Wrapper: sealed::Sealed {
    /// The engine of this wrapper on the GPU.
    #[doc(hidden)]
    type Gpu;
    /// The engine of this wrapper on the CPU.
    #[doc(hidden)]
    type Cpu;
    /// The engine of this wrapper on a GPU behind host slices ([`crate::Clipper`]).
    #[doc(hidden)]
    type Staged;
}

/// The chain alone: every step clips the gradients it is given.
#[derive(Debug)]
pub enum Plain {}

/// Gradient accumulation: micro-batches are added into sums (times 1/k), and the chain
/// clips the sums once every k micro-batches (optax's `MultiSteps`).
#[derive(Debug)]
pub enum Accumulate {}

/// Per-example clipping (DP-SGD, Opacus): every example's gradient is clipped on its own
/// ([`crate::PerExampleClip`]), then summed, noised and averaged.
#[derive(Debug)]
pub enum PerExample {}

/// A fused optimizer after the chain (SGD, Adam, AdamW: [`crate::Optimizer`]): the update
/// reads the gradients once and applies the chain's coefficients as it reads.
#[derive(Debug)]
pub enum Optimize {}

/// A chain over tensors sharded across ranks (ZeRO, FSDP, tensor parallel): every rank
/// holds part of every tensor ([`crate::Shard`]) and the norms are exchanged through the
/// collective `C`, so the step is the one the whole tensors would take.
#[derive(Debug)]
pub struct Sharded<C: Collective>(std::convert::Infallible, PhantomData<C>);

impl sealed::Sealed for Plain {}
impl sealed::Sealed for Accumulate {}
impl sealed::Sealed for PerExample {}
impl sealed::Sealed for Optimize {}
impl<C: Collective> sealed::Sealed for Sharded<C> {}

impl Wrapper for Plain {
    type Gpu = crate::gpu::GpuPolicy;
    type Cpu = crate::cpu::policy::CpuPolicy;
    type Staged = crate::clipper::staged::StagedChain;
}

impl Wrapper for Accumulate {
    type Gpu = crate::gpu::GpuAccumulator;
    type Cpu = crate::cpu::accumulate::CpuAccumulator;
    type Staged = crate::clipper::staged::StagedAccumulate;
}

impl Wrapper for PerExample {
    type Gpu = crate::gpu::GpuPerExample;
    type Cpu = crate::cpu::per_example::CpuPerExample;
    type Staged = crate::clipper::staged::StagedPerExample;
}

impl Wrapper for Optimize {
    type Gpu = crate::gpu::GpuOptimizer;
    type Cpu = crate::cpu::optimizer::CpuOptimizer;
    type Staged = crate::clipper::staged::StagedOptimize;
}

impl<C: Collective> Wrapper for Sharded<C> {
    type Gpu = crate::gpu::ShardedGpuPolicy<C>;
    type Cpu = crate::cpu::sharded::ShardedCpuPolicy<C>;
    type Staged = crate::clipper::staged::StagedSharded<C>;
}

/// Methods that hand their arguments to the same method of `self.inner`, each with its
/// own documentation.
macro_rules! forward {
    () => {};
    ($(#[$m:meta])* pub fn $name:ident(&self $(, $arg:ident: $ty:ty)*) $(-> $ret:ty)?; $($rest:tt)*) => {
        $(#[$m])*
        pub fn $name(&self $(, $arg: $ty)*) $(-> $ret)? {
            self.inner.$name($($arg),*)
        }
        forward!($($rest)*);
    };
    ($(#[$m:meta])* pub fn $name:ident(&mut self $(, $arg:ident: $ty:ty)*) $(-> $ret:ty)?; $($rest:tt)*) => {
        $(#[$m])*
        pub fn $name(&mut self $(, $arg: $ty)*) $(-> $ret)? {
            self.inner.$name($($arg),*)
        }
        forward!($($rest)*);
    };
}
pub(crate) use forward;
