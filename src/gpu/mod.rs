//! The GPU path: a context per device, one engine (`engine.rs`) planned once per program
//! and encoded step by step without a host round trip, reports read back asynchronously.

mod accumulate;
mod context;
mod deferred;
mod engine;
mod kernels;
mod optimizer;
mod per_example;
mod policy;
mod readback;
mod reduction;
mod resources;
mod sharded;
mod tensor;

pub use accumulate::GpuAccumulator;
pub use context::GpuContext;
pub use deferred::{DeferredClip, LossScaleBinding};
pub use optimizer::GpuOptimizer;
pub use per_example::GpuPerExample;
pub use policy::GpuPolicy;
pub use readback::{PendingReport, ReportFuture};
pub use sharded::ShardedGpuPolicy;
pub use tensor::GpuTensor;
