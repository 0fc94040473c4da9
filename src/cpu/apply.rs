//! The CPU engine's `rewrite` over whole tensors with one coefficient (the global family's
//! fast path; `shaders/rewrite.wgsl` on the GPU): scale, or clamp to bounds, in place.
//! Arithmetic is in f32 and 16-bit results round to nearest even, as on the GPU.

use crate::dtype::GradMut;
use crate::ops::ValueClip;
use half::{bf16, f16};
use rayon::prelude::*;

use super::norm_reduce::BLOCK;

/// bf16 -> f32 is a shift; written out because the generic conversion does not vectorise.
#[inline(always)]
pub(crate) fn bf16_to_f32(x: bf16) -> f32 {
    f32::from_bits((x.to_bits() as u32) << 16)
}

/// f32 -> bf16, round to nearest even, NaN kept (quieted): `f32_to_bf16` of the shader.
#[inline(always)]
pub(crate) fn f32_to_bf16(x: f32) -> bf16 {
    let b = x.to_bits();
    let bits = if b & 0x7fff_ffff > 0x7f80_0000 {
        (b >> 16) | 0x40
    } else {
        (b + 0x7fff + ((b >> 16) & 1)) >> 16
    };
    bf16::from_bits(bits as u16)
}

/// Runs `f32_op` / `f16_op` / `bf16_op` over every element, in parallel blocks.
fn for_each_elem(
    grads: &mut [GradMut<'_>],
    f32_op: impl Fn(f32) -> f32 + Sync,
    f16_op: impl Fn(f16) -> f16 + Sync,
    bf16_op: impl Fn(bf16) -> bf16 + Sync,
) {
    grads.par_iter_mut().for_each(|g| match g {
        GradMut::F32(x) => x
            .par_chunks_mut(BLOCK)
            .for_each(|c| c.iter_mut().for_each(|v| *v = f32_op(*v))),
        GradMut::F16(x) => x
            .par_chunks_mut(BLOCK)
            .for_each(|c| c.iter_mut().for_each(|v| *v = f16_op(*v))),
        GradMut::BF16(x) => x
            .par_chunks_mut(BLOCK)
            .for_each(|c| c.iter_mut().for_each(|v| *v = bf16_op(*v))),
    });
}

/// Multiplies every element by `coef`, first replacing NaNs by 0 when `zero_nans`.
pub(crate) fn scale(grads: &mut [GradMut<'_>], coef: f32, zero_nans: bool) {
    let f = |x: f32| {
        if zero_nans && x.is_nan() {
            0.0
        } else {
            x * coef
        }
    };
    for_each_elem(
        grads,
        f,
        |x| f16::from_f32(f(x.to_f32())),
        |x| f32_to_bf16(f(bf16_to_f32(x))),
    );
}

/// Clamps every element to `[lo, hi]`; NaN stays NaN.
pub(crate) fn clamp(grads: &mut [GradMut<'_>], clip: &ValueClip) {
    let (lo, hi) = (clip.lo, clip.hi);
    let (lo16, hi16) = (f16::from_f32(lo), f16::from_f32(hi));
    let (lob, hib) = (bf16::from_f32(lo), bf16::from_f32(hi));
    fn pick<T: Copy>(x: T, v: f32, lo: f32, hi: f32, lo_t: T, hi_t: T) -> T {
        if v < lo {
            lo_t
        } else if v > hi {
            hi_t
        } else {
            x
        }
    }
    for_each_elem(
        grads,
        |x| pick(x, x, lo, hi, lo, hi),
        |x| pick(x, x.to_f32(), lo, hi, lo16, hi16),
        |x| pick(x, bf16_to_f32(x), lo, hi, lob, hib),
    );
}
