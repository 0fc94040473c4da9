//! The shader ABI: every constant, code and `#[repr(C)]` struct that Rust and WGSL share,
//! defined once here. The WGSL side is generated from these definitions (the virtual
//! import `abi`, see [`wgsl`]), and a test without a GPU checks with naga that every
//! struct has the same size and field offsets on both sides.

use bytemuck::{Pod, Zeroable};

/// Declares `#[repr(C)]` structs shared with WGSL and records, for each, its WGSL
/// declaration and its Rust field offsets. A field may give its WGSL type explicitly
/// (`=> "atomic<u32>"`) when it differs from the Rust one.
macro_rules! abi_structs {
    ($(
        $(#[$meta:meta])*
        pub(crate) struct $name:ident {
            $( $(#[$fmeta:meta])* pub $field:ident : $ty:ty $(=> $wgsl:literal)? ),* $(,)?
        }
    )*) => {
        $(
            $(#[$meta])*
            #[repr(C)]
            #[derive(Debug, Clone, Copy, PartialEq, Default, Pod, Zeroable)]
            pub(crate) struct $name {
                $( $(#[$fmeta])* pub $field: $ty ),*
            }
        )*

        /// Every shared struct: name, WGSL fields (name, type) and Rust (size, offsets).
        pub(crate) const STRUCTS: &[AbiStruct] = &[$(
            AbiStruct {
                name: stringify!($name),
                fields: &[$( (stringify!($field), abi_structs!(@ty $ty $(, $wgsl)?)) ),*],
                size: std::mem::size_of::<$name>(),
                offsets: &[$( std::mem::offset_of!($name, $field) ),*],
            }
        ),*];
    };
    (@ty $ty:ty, $wgsl:literal) => { $wgsl };
    (@ty $ty:ty) => { stringify!($ty) };
}

/// One struct shared with WGSL.
#[derive(Debug)]
pub(crate) struct AbiStruct {
    pub name: &'static str,
    /// WGSL member names and types, in order.
    pub fields: &'static [(&'static str, &'static str)],
    /// Rust `size_of` (checked by the shader tests).
    #[cfg_attr(not(test), allow(dead_code))]
    pub size: usize,
    /// Rust `offset_of` of each member (checked by the shader tests).
    #[cfg_attr(not(test), allow(dead_code))]
    pub offsets: &'static [usize],
}

abi_structs! {
    /// The norm monoid `(scale, sum, flags)` meaning `scale^p * sum`, as f32 words
    /// (the host twin in f64 is `NormAcc` in `src/norm.rs`).
    pub(crate) struct Acc {
        pub scale: f32,
        pub sum: f32,
        pub flags: u32,
        pub _pad: u32,
    }

    /// One row of a chunk table (`src/plan`): one workgroup's share of a segment. Element
    /// `k < len` of the chunk is element `start + k * stride` of the binding window and
    /// element `index + k * stride` of tensor `tensor`.
    pub(crate) struct Chunk {
        pub seg: u32,
        pub start: u32,
        pub len: u32,
        pub dtype: u32,
        pub stride: u32,
        pub tensor: u32,
        pub index: u32,
        pub _pad: u32,
    }

    /// Everything one step needs from the host, written into a slot of a ring
    /// ([`STEP_SLOTS`]) unless they are the values last written, and bound at that slot's
    /// dynamic offset, so steps encoded before one submission each keep their own values.
    pub(crate) struct StepParams {
        /// Sequence number of the encoded step; `seq % TAG_RING` must equal the tag the
        /// encoder copied into the first report, or the slot was overwritten.
        pub seq: u32,
        /// `POLICY_*`: the non-finite policy.
        pub policy: u32,
        /// Norm order and its inverse.
        pub p: f32,
        pub inv_p: f32,
        /// A total norm supplied by the caller (split API), used when `use_given` is 1.
        pub given: Acc,
        pub use_given: u32,
        /// 1: a norm rule sets the coefficients; 0: they are 1 and nothing is reduced.
        pub rule: u32,
        /// 1: clamp to `[lo, hi]` after scaling and noise (value clipping).
        pub clamp: u32,
        /// Factor of every threshold this step (the schedule; `max_norm` for a plain
        /// global clip, whose base threshold is 1).
        pub multiplier: f32,
        pub lo: f32,
        pub hi: f32,
        /// The bounds rounded to f16 (low 16 bits) and bf16 (high 16 bits), for a clamp
        /// alone on 16-bit words.
        pub lo_half: u32,
        pub hi_half: u32,
        /// Gaussian noise std (0: none), generator seed and step (the noise key).
        pub sigma: f32,
        pub seed_lo: u32,
        pub seed_hi: u32,
        pub step_lo: u32,
        pub step_hi: u32,
        /// For a clamp alone on 16-bit words, the integer thresholds (`HalfClamp::keys`)
        /// of f16 and of bf16.
        pub keys_f16: u32,
        pub keys_bf16: u32,
        /// A fused optimizer step (`optimizer.wgsl`): its learning rate and AdamW's
        /// decay factor `1 - lr * weight_decay` (rounded once, on the host).
        pub lr: f32,
        pub decay: f32,
        /// 1: the chain is loss scaled ([`crate::LossScale`]): every norm is divided by
        /// the scale in the state (`ST_LOSS_SCALE`), and the last stage updates it.
        pub loss_scaling: u32,
        /// The scale's update rule: times `growth` after `growth_interval` finite steps
        /// in a row, times `backoff` after a skipped step, kept in `[min_scale,
        /// max_scale]`.
        pub growth: f32,
        pub backoff: f32,
        pub growth_interval: u32,
        pub min_scale: f32,
        pub max_scale: f32,
        pub _pad0: u32,
    }

    /// Per-dispatch parameters, fixed when a batch is planned.
    pub(crate) struct DispatchParams {
        /// This dispatch's slice of the chunk table.
        pub first_chunk: u32,
        /// Workgroups with work (or inputs to combine).
        pub n_chunks: u32,
        /// 1 for the chain's first norm stage: its groups' members are not scaled by
        /// earlier coefficients (`combine`).
        pub first: u32,
        /// The norm stage (its report and row).
        pub stage: u32,
        /// `finish`: how many stages it runs, from `stage` on.
        pub count: u32,
        /// The program's units (a `finish` that folds the unit norms or computes the
        /// unit coefficients in its own workgroup walks them all).
        pub units: u32,
        pub _pad0: u32,
        pub _pad1: u32,
    }

    /// The numbers of one norm stage's rule, fixed when a chain is planned.
    pub(crate) struct StageParams {
        /// AGC.
        pub lambda: f32,
        pub eps: f32,
        /// AutoClip, in [0, 100].
        pub percentile: f32,
        /// AutoClip history size, ZClip warmup.
        pub capacity: u32,
        /// ZClip.
        pub alpha: f32,
        pub z_thresh: f32,
        pub z_eps: f32,
        /// Optional max_norm cap of the adaptive rules (0: none).
        pub cap: f32,
    }

    /// One norm stage as the shaders see it, so that one pipeline runs any stage (and
    /// one `finish` several): its rule's numbers, its adaptive rule (`ADAPTIVE_*`), its
    /// formula (`FORMULA_*`) and the first word of its state block.
    pub(crate) struct StageRow {
        pub rule: StageParams,
        pub adaptive: u32,
        pub formula: u32,
        pub state_base: u32,
        /// 1 when the stage has one coefficient for every unit (the one `finish`
        /// computes from the total).
        pub global: u32,
        /// The base threshold of its first group (of its only one, for a global stage).
        pub threshold: f32,
    }

    /// What a step leaves for the host and for the elementwise passes.
    pub(crate) struct StepReport {
        /// Total norm before clipping.
        pub norm: Acc,
        /// Threshold in force (global rules).
        pub threshold: f32,
        /// Coefficient of the first group (the global one for global rules).
        pub coef: f32,
        /// `STATUS_*` bits.
        pub status: u32,
        /// Units whose coefficient is below 1.
        pub clipped: u32 => "atomic<u32>",
        /// Consecutive skipped steps.
        pub skips: u32,
        /// The first stage's copy of the skip counter before this step (later stages
        /// that skip the step count from it).
        pub skips_before: u32,
        /// The tag of the step's parameter slot, copied in by its encoder (stage 0's
        /// report): every stage, and the rewrite, checks the slot with it.
        pub tag: u32,
        /// Stage 0's report: the loss scale this step's norms were divided by (1 when the
        /// chain is not loss scaled), and the one the next step uses.
        pub loss_scale: f32,
        pub next_scale: f32,
        pub _pad0: u32,
        pub _pad1: u32,
    }

    /// One tensor of a per-example (DP-SGD) sum.
    pub(crate) struct ExampleParams {
        /// Element index of `g[0, 0]` in the input window.
        pub in_offset: u32,
        /// Element index of `out[0]` in the output window.
        pub out_offset: u32,
        /// `P`, elements per example.
        pub len: u32,
        pub batch: u32,
        pub tensor: u32,
        /// Segment of (example 0, this tensor).
        pub seg_base: u32,
        /// Segments between consecutive examples.
        pub seg_stride: u32,
        pub dtype: u32,
        pub inv_divisor: f32,
        pub policy: u32,
        pub _pad0: u32,
        pub _pad1: u32,
    }

    /// One row of a fused optimizer step's table (`src/plan/step_table.rs`): one
    /// workgroup's run of contiguous elements of one tensor, in the gradient window, the
    /// parameter window and the state buffer of its dispatch. The element `index + k` of
    /// tensor `tensor` belongs to unit `unit_first + ((index + k) / unit_div) % unit_count`.
    pub(crate) struct StepChunk {
        pub grad_start: u32,
        pub param_start: u32,
        pub state_start: u32,
        pub len: u32,
        pub dtype: u32,
        pub tensor: u32,
        pub index: u32,
        pub unit_first: u32,
        pub unit_div: u32,
        pub unit_count: u32,
        pub _pad0: u32,
        pub _pad1: u32,
    }

    /// One dispatch of a fused optimizer step: its rows of the table and the length of
    /// each state array in its state buffer (`m`, then `v`, then `vmax`).
    pub(crate) struct StepRunParams {
        pub first_chunk: u32,
        pub n_chunks: u32,
        pub state_len: u32,
        pub _pad0: u32,
    }

    /// The fixed hyperparameters of a fused optimizer (the learning rate is per step, in
    /// [`StepParams::lr`]).
    pub(crate) struct OptimizerParams {
        /// `OPT_SGD` or `OPT_ADAM`.
        pub kind: u32,
        pub weight_decay: f32,
        /// SGD.
        pub momentum: f32,
        /// `1 - dampening`.
        pub undamped: f32,
        pub nesterov: u32,
        /// Adam: `beta1`, `beta2` and their complements (rounded once, on the host).
        pub beta1: f32,
        pub beta2: f32,
        pub one_minus_beta1: f32,
        pub one_minus_beta2: f32,
        pub eps: f32,
        /// 1: AdamW (decay the parameters), 0: Adam (add the decay to the gradient).
        pub decoupled: u32,
        pub amsgrad: u32,
    }

    /// The optimizer's step counter on the device and what `tick` derived from it for
    /// this step: `steps` counts the steps taken (a held step takes none).
    pub(crate) struct OptimizerCounter {
        pub steps: u32,
        /// 1: this step updates; 0: it is held (or its slot was overwritten).
        pub run: u32,
        /// Adam: `lr / (1 - beta1^t)` and `sqrt(1 - beta2^t)`.
        pub step_size: f32,
        pub bias2_sqrt: f32,
    }

    /// One window of a gradient accumulation.
    pub(crate) struct AccumulateParams {
        pub first_chunk: u32,
        pub n_chunks: u32,
        pub scale: f32,
        /// 1: the first micro-batch of an accumulation.
        pub first: u32,
    }
}

/// Bytes of one [`Acc`].
pub(crate) const ACC_BYTES: u64 = std::mem::size_of::<Acc>() as u64;

/// Optimizer kinds of [`OptimizerParams::kind`].
pub(crate) const OPT_SGD: u32 = 0;
pub(crate) const OPT_ADAM: u32 = 1;

/// Non-finite flag bits of [`Acc::flags`].
pub(crate) const FLAG_INF: u32 = 1;
pub(crate) const FLAG_NAN: u32 = 2;

/// Element type codes of [`Chunk::dtype`].
pub(crate) const DTYPE_F32: u32 = 0;
pub(crate) const DTYPE_F16: u32 = 1;
pub(crate) const DTYPE_BF16: u32 = 2;

/// Norm kinds, the `NORM_KIND` override.
pub(crate) const KIND_INF: u32 = 0;
pub(crate) const KIND_L1: u32 = 1;
pub(crate) const KIND_L2: u32 = 2;
pub(crate) const KIND_P: u32 = 3;

/// Non-finite policy codes of [`StepParams::policy`].
pub(crate) const POLICY_PROPAGATE: u32 = 0;
pub(crate) const POLICY_ERROR: u32 = 1;
pub(crate) const POLICY_SKIP: u32 = 2;
pub(crate) const POLICY_ZERO_NANS: u32 = 3;

/// Status bits of the report headers.
pub(crate) const STATUS_SCALED: u32 = 1;
pub(crate) const STATUS_SKIPPED: u32 = 2;
pub(crate) const STATUS_NONFINITE: u32 = 4;
/// Gradients must stay untouched (non-finite under `Error` or `SkipStep`).
pub(crate) const STATUS_HELD: u32 = 8;
pub(crate) const STATUS_NANS_ZEROED: u32 = 16;

/// The step's parameter slot was overwritten before submission: nothing was changed.
pub(crate) const STATUS_STALE: u32 = 32;

/// Words of the device state header, then the history.
pub(crate) const ST_SEEN: u32 = 0;
pub(crate) const ST_SKIPS: u32 = 1;
pub(crate) const ST_MEAN: u32 = 2;
pub(crate) const ST_VAR: u32 = 3;
/// History slots of the block (fixed by the program).
pub(crate) const ST_CAP: u32 = 4;
/// What recording a norm overwrites (the history slot `seen % cap`, the mean, the
/// variance), kept so `undo` can put it back when a later stage holds the step (scratch of
/// one step, not part of a saved state).
pub(crate) const ST_SAVED_SLOT: u32 = 5;
pub(crate) const ST_SAVED_MEAN: u32 = 6;
pub(crate) const ST_SAVED_VAR: u32 = 7;
/// The loss scale and the finite steps in a row since it last changed (first block only:
/// one scale per chain).
pub(crate) const ST_LOSS_SCALE: u32 = 8;
pub(crate) const ST_GOOD_STEPS: u32 = 9;
/// 1 when the stage recorded a norm this step, for `undo` (scratch of one step).
pub(crate) const ST_RECORDED: u32 = 10;
pub(crate) const ST_HEADER: u32 = 11;

/// Parameter slots per engine: up to this many writes of parameters (steps whose values
/// differ from the last ones written) may be encoded before a submission.
pub(crate) const STEP_SLOTS: u32 = 64;
/// Tags of the slot check; coprime with [`STEP_SLOTS`], so a slot overwritten by a later
/// write (before 61 x 64 writes in one submission) carries another tag.
pub(crate) const TAG_RING: u32 = 61;

/// A stage row's `adaptive` ([`StageRow`]): how a global threshold is found.
pub(crate) const ADAPTIVE_NONE: u32 = 0;
pub(crate) const ADAPTIVE_AUTOCLIP: u32 = 1;
pub(crate) const ADAPTIVE_ZCLIP: u32 = 2;

/// A stage row's `formula` ([`StageRow`]): how a norm and a threshold give a coefficient.
pub(crate) const FORMULA_PYTORCH: u32 = 0;
pub(crate) const FORMULA_TF: u32 = 1;
pub(crate) const FORMULA_AGC: u32 = 2;

/// Word of [`StepReport::status`], for kernels that bind the report read-only (its
/// atomic counter makes the struct itself read-write only).
pub(crate) const STATUS_WORD: u32 = (std::mem::offset_of!(StepReport, status) / 4) as u32;

/// Word of [`StepReport::tag`].
pub(crate) const TAG_WORD: u32 = (std::mem::offset_of!(StepReport, tag) / 4) as u32;

/// Group of a unit that a stage leaves alone.
pub(crate) const NO_GROUP: u32 = u32::MAX;

/// Threads per workgroup of the chunk kernels, and elements one workgroup handles.
pub(crate) const WG: u32 = 256;

/// Every shared constant, as it appears in WGSL.
const CONSTS: &[(&str, u32)] = &[
    ("FLAG_INF", FLAG_INF),
    ("FLAG_NAN", FLAG_NAN),
    ("DTYPE_F32", DTYPE_F32),
    ("DTYPE_F16", DTYPE_F16),
    ("DTYPE_BF16", DTYPE_BF16),
    ("KIND_INF", KIND_INF),
    ("KIND_L1", KIND_L1),
    ("KIND_L2", KIND_L2),
    ("KIND_P", KIND_P),
    ("POLICY_PROPAGATE", POLICY_PROPAGATE),
    ("POLICY_ERROR", POLICY_ERROR),
    ("POLICY_SKIP", POLICY_SKIP),
    ("POLICY_ZERO_NANS", POLICY_ZERO_NANS),
    ("STATUS_SCALED", STATUS_SCALED),
    ("STATUS_SKIPPED", STATUS_SKIPPED),
    ("STATUS_NONFINITE", STATUS_NONFINITE),
    ("STATUS_HELD", STATUS_HELD),
    ("STATUS_NANS_ZEROED", STATUS_NANS_ZEROED),
    ("ST_SEEN", ST_SEEN),
    ("ST_SKIPS", ST_SKIPS),
    ("ST_MEAN", ST_MEAN),
    ("ST_VAR", ST_VAR),
    ("ST_HEADER", ST_HEADER),
    ("ST_LOSS_SCALE", ST_LOSS_SCALE),
    ("ST_GOOD_STEPS", ST_GOOD_STEPS),
    ("ST_RECORDED", ST_RECORDED),
    ("ADAPTIVE_NONE", ADAPTIVE_NONE),
    ("ADAPTIVE_AUTOCLIP", ADAPTIVE_AUTOCLIP),
    ("ADAPTIVE_ZCLIP", ADAPTIVE_ZCLIP),
    ("FORMULA_PYTORCH", FORMULA_PYTORCH),
    ("FORMULA_TF", FORMULA_TF),
    ("FORMULA_AGC", FORMULA_AGC),
    ("WG", WG),
    ("NO_GROUP", NO_GROUP),
    ("STATUS_WORD", STATUS_WORD),
    ("TAG_WORD", TAG_WORD),
    ("STATUS_STALE", STATUS_STALE),
    ("ST_CAP", ST_CAP),
    ("ST_SAVED_SLOT", ST_SAVED_SLOT),
    ("ST_SAVED_MEAN", ST_SAVED_MEAN),
    ("ST_SAVED_VAR", ST_SAVED_VAR),
    ("TAG_RING", TAG_RING),
    ("OPT_SGD", OPT_SGD),
    ("OPT_ADAM", OPT_ADAM),
];

/// The WGSL text of the `abi` import: every constant and struct above.
pub(crate) fn wgsl() -> String {
    let mut out = String::from("// abi: generated from src/shaders/abi.rs; do not edit.\n");
    for (name, value) in CONSTS {
        out.push_str(&format!("const {name}: u32 = {value}u;\n"));
    }
    for s in STRUCTS {
        out.push_str(&format!("struct {} {{\n", s.name));
        for (field, ty) in s.fields {
            out.push_str(&format!("    {field}: {ty},\n"));
        }
        out.push_str("}\n");
    }
    out
}

/// Reads a `T` from the front of a readback's words.
pub(crate) fn read<T: Pod>(words: &[u32]) -> T {
    bytemuck::pod_read_unaligned(&bytemuck::cast_slice(words)[..std::mem::size_of::<T>()])
}

/// Words of a `T`.
pub(crate) const fn words_of<T>() -> usize {
    std::mem::size_of::<T>() / 4
}
