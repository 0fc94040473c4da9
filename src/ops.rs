//! The value clamp: a small validated description that the CPU path and the GPU path
//! both execute in their elementwise pass.

use crate::error::ClipError;

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

    /// The clip in the integer domain of f16 and of bf16 elements.
    pub(crate) fn half_clamps(&self) -> (HalfClamp, HalfClamp) {
        use half::{bf16, f16};
        let f16s = HalfClamp::new(
            self.lo,
            self.hi,
            0x7c00,
            |b| f16::from_bits(b).to_f32(),
            |v| f16::from_f32(v).to_bits(),
        );
        let bf16s = HalfClamp::new(
            self.lo,
            self.hi,
            0x7f80,
            |b| bf16::from_bits(b).to_f32(),
            |v| bf16::from_f32(v).to_bits(),
        );
        (f16s, bf16s)
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

/// A value clip of one 16-bit format, in the integer domain. Bits map to keys that order
/// as the values do; an element below the bound `lo` is one whose key is below that of the
/// smallest value >= lo (found once by a binary search over the keys).
#[derive(Debug, Clone, Copy)]
pub(crate) struct HalfClamp {
    /// Bits of the largest finite magnitude + 1: at or above it, inf or NaN.
    pub nan_above: u16,
    /// Keys: below `lo_key` clamps to `lo_bits`, above `hi_key` to `hi_bits`.
    pub lo_key: u16,
    pub hi_key: u16,
    pub lo_bits: u16,
    pub hi_bits: u16,
}

impl HalfClamp {
    /// Sign-magnitude bits to an unsigned order: negative values flip every bit, the
    /// others flip the sign (so -0 and +0 are neighbours, both equal to 0 in the search).
    #[inline(always)]
    pub(crate) fn key(bits: u16) -> u16 {
        bits ^ (((bits as i16 >> 15) as u16) | 0x8000)
    }

    fn bits_of(key: u16) -> u16 {
        key ^ if key & 0x8000 != 0 { 0x8000 } else { 0xffff }
    }

    fn new(
        lo: f32,
        hi: f32,
        inf: u16,
        to_f32: impl Fn(u16) -> f32,
        round: impl Fn(f32) -> u16,
    ) -> Self {
        // The non-NaN keys, from -inf to +inf, order as their values.
        let (first, last) = (Self::key(0x8000 | inf), Self::key(inf));
        let value = |k: u16| to_f32(Self::bits_of(k));
        // The first key whose value fails `holds` (true, then false, along the keys): a
        // binary search over the key range itself (a list of the keys would be 128 KB,
        // allocated and freed at every value clip).
        let partition = |holds: &dyn Fn(f32) -> bool| -> u32 {
            let (mut a, mut b) = (first as u32, last as u32 + 1);
            while a < b {
                let m = (a + b) / 2;
                match holds(value(m as u16)) {
                    true => a = m + 1,
                    false => b = m,
                }
            }
            a
        };
        let lo_key = partition(&|v| v < lo) as u16;
        let above = partition(&|v| v <= hi);
        // No value <= hi (hi below -inf cannot happen): everything clamps down.
        let hi_key = if above == first as u32 {
            0
        } else {
            (above - 1) as u16
        };
        HalfClamp {
            nan_above: inf,
            lo_key,
            hi_key,
            lo_bits: round(lo),
            hi_bits: round(hi),
        }
    }

    /// The thresholds packed for the shader: `lo_key | hi_key << 16`.
    pub(crate) fn keys(&self) -> u32 {
        self.lo_key as u32 | (self.hi_key as u32) << 16
    }
}
