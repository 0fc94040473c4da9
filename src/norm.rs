//! Norm orders and the overflow-safe norm accumulator (the host twin of `Acc` in
//! `shaders/shared/acc.wgsl`).
//!
//! An accumulator `(scale, sum, flags)` stands for `scale^p * sum`: the p-th power of a
//! norm held so that neither squaring huge values nor tiny ones leaves the float range.
//! It is a monoid: [`NormAcc::IDENTITY`] and [`NormAcc::combine`], associative, so chunks
//! reduce in any tree shape and shards merge. Non-finite elements never enter
//! `scale`/`sum`; they set [`NormAcc::flags`].

use crate::error::ClipError;

pub(crate) use crate::shaders::abi::{FLAG_INF, FLAG_NAN};

/// The order of a vector norm.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Norm {
    /// Sum of absolute values.
    L1,
    /// Euclidean norm (PyTorch's default `norm_type=2.0`).
    L2,
    /// Largest absolute value (`norm_type=inf`).
    Inf,
    /// `(sum |x|^p)^(1/p)` for a finite `p >= 1`; build it with [`Norm::p`].
    P(f32),
}

impl Norm {
    /// The norm of order `p`: `L1`, `L2` and `Inf` for 1, 2 and infinity, otherwise `P(p)`.
    /// Errors when `p < 1` or `p` is NaN.
    pub fn p(p: f32) -> Result<Norm, ClipError> {
        let norm = if p == 1.0 {
            Norm::L1
        } else if p == 2.0 {
            Norm::L2
        } else if p == f32::INFINITY {
            Norm::Inf
        } else {
            Norm::P(p)
        };
        norm.validate()?;
        Ok(norm)
    }

    /// The order as a number (`f64::INFINITY` for [`Norm::Inf`]).
    pub fn order(self) -> f64 {
        match self {
            Norm::L1 => 1.0,
            Norm::L2 => 2.0,
            Norm::Inf => f64::INFINITY,
            Norm::P(p) => p as f64,
        }
    }

    /// Checks that a [`Norm::P`] order is finite and at least 1.
    pub fn validate(self) -> Result<(), ClipError> {
        match self {
            Norm::P(p) if !(p >= 1.0 && p.is_finite()) => Err(ClipError::InvalidNormOrder(p)),
            _ => Ok(()),
        }
    }

    /// The shader's `NORM_KIND` code.
    pub(crate) fn kind_code(self) -> u32 {
        use crate::shaders::abi::{KIND_INF, KIND_L1, KIND_L2, KIND_P};
        match self {
            Norm::Inf => KIND_INF,
            Norm::L1 => KIND_L1,
            Norm::L2 => KIND_L2,
            Norm::P(_) => KIND_P,
        }
    }

    /// `r^p` (for a ratio `r` in [0, 1] in the accumulators; above 1 for `on_device`).
    fn pow_ratio(self, r: f64) -> f64 {
        match self {
            Norm::L1 => r,
            Norm::L2 => r * r,
            Norm::Inf => 0.0,
            Norm::P(p) => r.powf(p as f64),
        }
    }

    /// `sum^(1/p)`.
    fn root(self, sum: f64) -> f64 {
        match self {
            Norm::L1 => sum,
            Norm::L2 => sum.sqrt(),
            Norm::Inf => 1.0,
            Norm::P(p) => sum.powf(1.0 / p as f64),
        }
    }
}

/// Overflow-safe partial p-norm: `scale^p * sum`, plus non-finite flags.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct NormAcc {
    /// Scale factor (for [`Norm::Inf`], the norm itself).
    pub scale: f64,
    /// Sum of `(|x| / scale)^p` (unused for [`Norm::Inf`]).
    pub sum: f64,
    /// Bit 0: an infinite element was seen; bit 1: a NaN was seen.
    pub flags: u32,
}

impl From<crate::shaders::abi::Acc> for NormAcc {
    fn from(a: crate::shaders::abi::Acc) -> NormAcc {
        NormAcc {
            scale: a.scale as f64,
            sum: a.sum as f64,
            flags: a.flags,
        }
    }
}

impl NormAcc {
    /// The device's f32 form (of an accumulator whose scale came from the device, so it
    /// is an f32 value; its sum is at most the element count).
    pub(crate) fn to_acc(self) -> crate::shaders::abi::Acc {
        crate::shaders::abi::Acc {
            scale: self.scale as f32,
            sum: self.sum as f32,
            flags: self.flags,
            _pad: 0,
        }
    }

    /// The accumulator of the same elements times `coef` (a norm is absolutely
    /// homogeneous); a NaN coefficient makes it NaN. `acc_scaled` of the shaders.
    pub(crate) fn scaled(&self, coef: f32) -> NormAcc {
        if coef.is_nan() {
            return NormAcc {
                flags: self.flags | FLAG_NAN,
                ..*self
            };
        }
        NormAcc {
            scale: self.scale * (coef as f64).abs(),
            ..*self
        }
    }

    /// `sum` re-expressed at a common `scale` at least this one's (an all-reduced
    /// maximum), so the sums of several parts simply add.
    pub(crate) fn rescaled_sum(&self, norm: Norm, scale: f64) -> f64 {
        if self.scale == 0.0 || scale == 0.0 || norm == Norm::Inf {
            return 0.0;
        }
        self.sum * norm.pow_ratio(self.scale / scale)
    }

    /// The accumulator of no elements.
    pub const IDENTITY: NormAcc = NormAcc {
        scale: 0.0,
        sum: 0.0,
        flags: 0,
    };

    /// An accumulator holding a plain sum of p-th powers (for inf, the maximum).
    pub(crate) fn from_power_sum(norm: Norm, sum: f64, flags: u32) -> NormAcc {
        match norm {
            Norm::Inf => NormAcc {
                scale: sum,
                sum: 0.0,
                flags,
            },
            _ if sum == 0.0 => NormAcc {
                flags,
                ..Self::IDENTITY
            },
            _ => NormAcc {
                scale: 1.0,
                sum,
                flags,
            },
        }
    }

    /// Merges two accumulators of the same norm; associative, with [`NormAcc::IDENTITY`]
    /// as identity. Mirrors `acc_combine` in `shaders/shared/acc.wgsl`.
    pub fn combine(self, other: NormAcc, norm: Norm) -> NormAcc {
        let flags = self.flags | other.flags;
        if norm == Norm::Inf {
            return NormAcc {
                scale: self.scale.max(other.scale),
                sum: 0.0,
                flags,
            };
        }
        if self.scale == other.scale && self.scale != 0.0 && self.scale.is_finite() {
            // The ratio is 1: the same sum as below, without the division. The CPU's
            // L1/L2 blocks all have scale 1, so this is how they combine, per tensor.
            return NormAcc {
                scale: self.scale,
                sum: self.sum + other.sum,
                flags,
            };
        }
        let (big, small) = if other.scale > self.scale {
            (other, self)
        } else {
            (self, other)
        };
        if big.scale == 0.0 {
            return NormAcc {
                flags,
                ..Self::IDENTITY
            };
        }
        NormAcc {
            scale: big.scale,
            sum: big.sum + small.sum * norm.pow_ratio(small.scale / big.scale),
            flags,
        }
    }

    /// This accumulator as the device holds it: f32 scale and sum, a scale beyond f32
    /// range moved into the sum. Both backends finish a step from these numbers.
    pub(crate) fn on_device(&self, norm: Norm) -> NormAcc {
        let total = NormAcc { flags: 0, ..*self }.total(norm);
        // Below f32's smallest subnormal the norm is 0 on the device too.
        if total as f32 == 0.0 && norm != Norm::Inf {
            return NormAcc {
                flags: self.flags,
                ..NormAcc::IDENTITY
            };
        }
        if norm == Norm::Inf || total == 0.0 {
            return NormAcc {
                scale: self.scale as f32 as f64,
                sum: self.sum as f32 as f64,
                flags: self.flags,
            };
        }
        // The norm itself as the scale (sum 1), or f32::MAX and the rest in the sum.
        let scale = total.min(f32::MAX as f64) as f32 as f64;
        NormAcc {
            scale,
            sum: norm.pow_ratio(total / scale) as f32 as f64,
            flags: self.flags,
        }
    }

    /// The norm in f32 as the shaders compute it (`norm_value` of coef.wgsl: `scale *
    /// root(sum)` in f32, infinity beyond f32 range), ignoring the flags, and the root.
    pub(crate) fn value_f32(&self, norm: Norm) -> (f32, f32) {
        let d = self.on_device(norm);
        let (scale, sum) = (d.scale as f32, d.sum as f32);
        let root = match norm {
            Norm::L1 => sum,
            Norm::L2 => sum.sqrt(),
            Norm::Inf => 1.0,
            Norm::P(p) => sum.powf(1.0 / p),
        };
        let n = if norm == Norm::Inf {
            scale
        } else {
            scale * root
        };
        (n, root)
    }

    /// `c / (n + eps)` in f32 as the shaders compute it (`ratio` of coef.wgsl): finite for
    /// norms beyond f32 range, where `eps` no longer matters.
    pub(crate) fn ratio_f32(&self, norm: Norm, c: f32, eps: f32) -> f32 {
        let (n, root) = self.value_f32(norm);
        if n.is_finite() {
            return c / (n + eps);
        }
        let scale = self.on_device(norm).scale as f32;
        if norm == Norm::Inf {
            c / scale
        } else {
            (c / scale) / root
        }
    }

    /// The norm: NaN if a NaN was seen, infinity if an infinity was, else `scale * sum^(1/p)`.
    pub fn total(&self, norm: Norm) -> f64 {
        if self.flags & FLAG_NAN != 0 {
            f64::NAN
        } else if self.flags & FLAG_INF != 0 {
            f64::INFINITY
        } else if norm == Norm::Inf {
            self.scale
        } else {
            self.scale * norm.root(self.sum)
        }
    }
}

/// The norm of part of a batch (one shard, one device), in a form that merges with the
/// parts of other shards without overflow. Read it from a report (`partial`, of a
/// [`crate::ClipPolicy::total_norm`] step on each shard), combine the shards, then clip
/// each shard with `step_with_norm` of a [`crate::ClipPolicy::global_norm`] runner.
///
/// For an all-reduce: reduce [`PartialNorm::scale`] with MAX, then
/// [`PartialNorm::rescaled_sum`] at that scale with SUM, and rebuild with
/// [`PartialNorm::from_scaled_sum`]; inf-norms need only the MAX. Non-finite flags
/// ([`PartialNorm::flags`]) reduce with bitwise OR.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PartialNorm {
    norm: Norm,
    acc: NormAcc,
}

impl PartialNorm {
    /// The empty partial norm (no elements) of order `norm`.
    pub fn zero(norm: Norm) -> PartialNorm {
        PartialNorm {
            norm,
            acc: NormAcc::IDENTITY,
        }
    }

    pub(crate) fn from_acc(norm: Norm, acc: NormAcc) -> PartialNorm {
        PartialNorm { norm, acc }
    }

    /// A partial norm standing for a known total norm (for example one all-reduced by the
    /// caller as a plain number). Infinity is accepted and marks the norm non-finite.
    pub fn from_total(norm: Norm, total: f64) -> Result<PartialNorm, ClipError> {
        norm.validate()?;
        if total.is_nan() || total < 0.0 {
            return Err(ClipError::InvalidTotalNorm(total));
        }
        if norm == Norm::Inf && total > f32::MAX as f64 && total.is_finite() {
            // The largest |element| of f32 or 16-bit gradients is at most f32::MAX.
            return Err(ClipError::InvalidTotalNorm(total));
        }
        // scale = total, sum = 1 stands for total^p whatever p is.
        let acc = if total.is_infinite() {
            NormAcc {
                flags: FLAG_INF,
                ..NormAcc::IDENTITY
            }
        } else if total == 0.0 {
            NormAcc::IDENTITY
        } else {
            NormAcc {
                scale: total,
                sum: if norm == Norm::Inf { 0.0 } else { 1.0 },
                flags: 0,
            }
        };
        Ok(PartialNorm { norm, acc })
    }

    /// Rebuilds a partial norm from an all-reduced MAX of scales and SUM of
    /// [`PartialNorm::rescaled_sum`]s, and the OR of flags.
    pub fn from_scaled_sum(
        norm: Norm,
        scale: f64,
        sum: f64,
        flags: u32,
    ) -> Result<PartialNorm, ClipError> {
        norm.validate()?;
        if !(scale >= 0.0 && sum >= 0.0) || scale.is_infinite() || sum.is_infinite() {
            return Err(ClipError::InvalidTotalNorm(scale));
        }
        if norm == Norm::Inf && scale > f32::MAX as f64 {
            // The largest |element| of f32 or 16-bit gradients is at most f32::MAX.
            return Err(ClipError::InvalidTotalNorm(scale));
        }
        Ok(PartialNorm {
            norm,
            acc: NormAcc {
                scale,
                sum,
                flags: flags & (FLAG_INF | FLAG_NAN),
            },
        })
    }

    /// The norm order.
    pub fn norm(&self) -> Norm {
        self.norm
    }

    /// The largest scale of this part (for inf-norms, the norm itself).
    pub fn scale(&self) -> f64 {
        self.acc.scale
    }

    /// Non-finite flags: bit 0 an infinity, bit 1 a NaN.
    pub fn flags(&self) -> u32 {
        self.acc.flags
    }

    /// This part's sum of `(|x| / scale)^p` re-expressed at a larger common `scale`
    /// (the all-reduced maximum), so the sums of all shards can simply be added.
    pub fn rescaled_sum(&self, scale: f64) -> f64 {
        self.acc.rescaled_sum(self.norm, scale)
    }

    /// Merges two parts of one batch; errors if their orders differ.
    pub fn combine(&self, other: &PartialNorm) -> Result<PartialNorm, ClipError> {
        if self.norm != other.norm {
            return Err(ClipError::NormMismatch(
                format!("{:?}", self.norm),
                format!("{:?}", other.norm),
            ));
        }
        Ok(PartialNorm {
            norm: self.norm,
            acc: self.acc.combine(other.acc, self.norm),
        })
    }

    /// The norm this part stands for (f64, so it is finite even beyond f32::MAX).
    pub fn total(&self) -> f64 {
        self.acc.total(self.norm)
    }

    /// True when no infinite or NaN element was seen.
    pub fn is_finite(&self) -> bool {
        self.acc.flags == 0
    }

    pub(crate) fn acc(&self) -> NormAcc {
        self.acc
    }
}
