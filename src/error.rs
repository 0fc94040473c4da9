//! The crate's error type.

use crate::dtype::DType;

/// Everything that can go wrong. Every error is returned before any gradient is
/// written, so the caller's data is left exactly as it was.
#[derive(Debug, thiserror::Error, Clone, PartialEq)]
pub enum ClipError {
    /// The norm order `p` was below 1 or NaN.
    #[error("norm order p must be >= 1 (or infinity), got {0}")]
    InvalidNormOrder(f32),
    /// Value-clip bounds were NaN or `lo > hi`.
    #[error("value-clip bounds must satisfy lo <= hi and not be NaN, got lo = {lo}, hi = {hi}")]
    InvalidBounds {
        /// Lower bound given.
        lo: f32,
        /// Upper bound given.
        hi: f32,
    },
    /// A supplied total norm (split API) was negative or NaN.
    #[error("a total norm must be >= 0 and not NaN, got {0}")]
    InvalidTotalNorm(f64),
    /// A partial norm of another norm order was merged or applied.
    #[error("partial norms of different orders cannot be combined ({0} vs {1})")]
    NormMismatch(String, String),
    /// A gradient buffer lacks `BufferUsages::STORAGE`.
    #[error("tensor {tensor:?}: its buffer was not created with BufferUsages::STORAGE")]
    MissingStorageUsage {
        /// Name (or index) of the tensor.
        tensor: String,
    },
    /// A byte offset is not a multiple of the element size.
    #[error("tensor {tensor:?}: byte offset {offset} is not a multiple of {align} (the {dtype} element size)")]
    MisalignedOffset {
        /// Name (or index) of the tensor.
        tensor: String,
        /// The offending offset.
        offset: u64,
        /// Required alignment in bytes.
        align: u64,
        /// The tensor's element type.
        dtype: DType,
    },
    /// A tensor's byte range, in the whole 32-bit words the shaders read, runs past the
    /// end of its buffer.
    #[error(
        "tensor {tensor:?}: bytes {start}..{end} (whole 32-bit words) run past the end of its {size}-byte buffer"
    )]
    OutOfBounds {
        /// Name (or index) of the tensor.
        tensor: String,
        /// First byte of the tensor.
        start: u64,
        /// One past its last byte, rounded up to a whole 32-bit word.
        end: u64,
        /// Size of the buffer.
        size: u64,
    },
    /// Two tensors of one batch share bytes, so one step would clip them twice.
    #[error("tensors {first:?} and {second:?} overlap in the same buffer")]
    OverlappingTensors {
        /// The earlier tensor.
        first: String,
        /// The tensor that overlaps it.
        second: String,
    },
    /// An f16 and a bf16 tensor share one 32-bit word, which one pass cannot rewrite safely.
    #[error("tensors {first:?} and {second:?} have different 16-bit types but share a 32-bit word; start one at a 4-byte-aligned offset")]
    SharedWord {
        /// The earlier tensor.
        first: String,
        /// The later tensor.
        second: String,
    },
    /// Host data did not match the batch it was given to.
    #[error("tensor {tensor:?}: expected {expected}, got {got}")]
    ShapeMismatch {
        /// Name (or index) of the tensor.
        tensor: String,
        /// What the batch was planned with.
        expected: String,
        /// What was passed.
        got: String,
    },
    /// More than this backend can address: a tensor longer than the GPU path addresses
    /// (2^32 - 1 elements), a per-example tensor larger than one storage binding, a
    /// strided unit (an AGC column) that spans more than one storage binding, a binding
    /// window that needs more workgroups than a 2-D grid holds, or host data that does not
    /// fit the device's buffers ([`crate::Clipper`] on a GPU).
    #[error("{tensor:?} is larger than this backend supports (size {len}: elements of a tensor, bytes of a window)")]
    TooLarge {
        /// What was too large: a tensor's name (or index); `"window at byte .. of buffer
        /// .."` for a binding window; `"all host tensors (..)"` or `"#index (..)"` for
        /// [`crate::Clipper`]'s host data.
        tensor: String,
        /// Its length in elements; for a binding window, its size in bytes.
        len: u64,
    },
    /// A fused optimizer step writes the parameters while it reads the gradients, which
    /// wgpu allows only when they are in different buffers.
    #[error("parameter {param:?} and gradient {grad:?} are in the same buffer; a fused optimizer step needs the parameters in buffers of their own")]
    SharedBuffer {
        /// The parameter tensor.
        param: String,
        /// The gradient tensor in its buffer.
        grad: String,
    },
    /// A fused optimizer step keeps f32 master weights; this parameter tensor is not f32.
    #[error("parameter {tensor:?} is {dtype}; a fused optimizer step updates f32 master weights")]
    NotF32 {
        /// The parameter tensor.
        tensor: String,
        /// Its element type.
        dtype: crate::DType,
    },
    /// A policy or rule was configured with an invalid value.
    #[error("invalid clipping configuration: {0}")]
    InvalidConfig(String),
    /// A saved state (a [`crate::PolicyState`] or an [`crate::OptimizerState`]) could not
    /// be read, or does not belong where it was restored, or holds values outside their
    /// domain.
    #[error("invalid saved state: {0}")]
    InvalidState(String),
    /// A monitor export or plot could not be written (missing folder, no permission,
    /// unsupported file extension).
    #[error("cannot write {path}: {reason}")]
    Output {
        /// The file asked for.
        path: String,
        /// Why it failed.
        reason: String,
    },
    /// A buffer belongs to another device, or wgpu rejected the setup for another reason.
    #[error("wgpu rejected the batch (is every buffer from this context's device?): {0}")]
    Wgpu(String),
    /// No adapter could be found (neither hardware nor software).
    #[error("no wgpu adapter found: {0}")]
    NoAdapter(String),
    /// The GPU device was lost or a readback failed.
    #[error("GPU readback failed: {0}")]
    Readback(String),
    /// The total norm was NaN or infinite and the policy is [`crate::NonFinitePolicy::Error`];
    /// the gradients were not changed.
    #[error("the total gradient norm is non-finite ({0}); gradients left unchanged")]
    NonFiniteNorm(f64),
    /// A collective operation across ranks failed (a rank left, timed out, or the ranks
    /// disagree on the tensors, the shards or the policy); this rank's gradients and
    /// state were left unchanged.
    #[error("collective across ranks failed: {0}")]
    Collective(String),
    /// More steps of one clipper with parameters of their own (a schedule factor, noise, a
    /// caller's total or learning rate that changes) were encoded before a submission than
    /// it has parameter slots (64), so a later step overwrote this step's parameters; this step changed nothing (gradients and state
    /// untouched). Submit more often.
    #[error("step {0}: its parameters were overwritten by a later step encoded before the same submission (at most 64 steps with parameters of their own per submission); gradients left unchanged")]
    StepOverwritten(u64),
}
