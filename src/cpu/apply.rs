//! The CPU engine's `rewrite` over whole tensors with one coefficient (the global family's
//! fast path; `shaders/rewrite.wgsl` on the GPU): scale, or clamp to bounds, in place.
//! Arithmetic is in f32 and 16-bit results round to nearest even, as on the GPU.

use crate::dtype::GradMut;
use crate::ops::{HalfClamp, ValueClip};
use half::{bf16, f16};
use rayon::prelude::*;

use super::norm_reduce::{per_task, BLOCK};

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

/// Multiplies every element by `coef`, first replacing NaNs by 0 when `zero_nans`.
pub(crate) fn scale(grads: &mut [GradMut<'_>], coef: f32, zero_nans: bool) {
    let per_task = tensors_per_task(grads);
    grads
        .par_iter_mut()
        .with_min_len(per_task)
        .for_each(|g| match g {
            GradMut::F32(x) => {
                (x.par_chunks_mut(BLOCK)).for_each(|c| scale_f32(c, coef, zero_nans))
            }
            GradMut::F16(x) => {
                (x.par_chunks_mut(BLOCK)).for_each(|c| scale_f16(c, coef, zero_nans))
            }
            GradMut::BF16(x) => {
                (x.par_chunks_mut(BLOCK)).for_each(|c| scale_bf16(c, coef, zero_nans))
            }
        });
}

/// Small tensors share a task, about a block of elements each.
fn tensors_per_task(grads: &[GradMut<'_>]) -> usize {
    let elems = grads.iter().map(|g| g.as_ref().len()).sum();
    per_task(grads.len(), elems)
}

/// One element of [`scale`], in f32.
#[inline(always)]
fn scaled(x: f32, coef: f32, zero_nans: bool) -> f32 {
    if zero_nans && x.is_nan() {
        0.0
    } else {
        x * coef
    }
}

/// [`f32_to_bf16`] without a branch, so it vectorises.
#[inline(always)]
fn round_bf16(x: f32) -> u16 {
    let b = x.to_bits();
    let nan = (b >> 16) | 0x40;
    let rounded = (b.wrapping_add(0x7fff + ((b >> 16) & 1))) >> 16;
    (if b & 0x7fff_ffff > 0x7f80_0000 {
        nan
    } else {
        rounded
    }) as u16
}

wide_fn! {
    /// [`scale`] of a block of f32 values.
    fn scale_f32(c: &mut [f32], coef: f32, zero_nans: bool) {
        for v in c.iter_mut() {
            *v = scaled(*v, coef, zero_nans);
        }
    }
}

wide_fn! {
    /// [`scale`] of a block of bf16 values: widen (a shift), scale, round to nearest even.
    fn scale_bf16(c: &mut [bf16], coef: f32, zero_nans: bool) {
        let c: &mut [u16] = bytemuck::cast_slice_mut(c);
        for v in c.iter_mut() {
            let x = f32::from_bits((*v as u32) << 16);
            *v = round_bf16(scaled(x, coef, zero_nans));
        }
    }
}

wide_fn! {
    /// [`scale`] of a block of f16 values, converted a stack buffer at a time (F16C where
    /// the CPU has it).
    fn scale_f16(c: &mut [f16], coef: f32, zero_nans: bool) {
        use half::slice::HalfFloatSliceExt;
        let mut buf = [0.0f32; 1024];
        for part in c.chunks_mut(1024) {
            let b = &mut buf[..part.len()];
            part.convert_to_f32_slice(b);
            for v in b.iter_mut() {
                *v = scaled(*v, coef, zero_nans);
            }
            part.convert_from_f32_slice(b);
        }
    }
}

/// Clamps every element to `[lo, hi]`; NaN stays NaN. 16-bit elements are compared as
/// integers against thresholds found once (the same decisions as comparing in f32), so the
/// loop vectorises over 16-bit lanes; a clamped element gets the bound rounded to its type.
pub(crate) fn clamp(grads: &mut [GradMut<'_>], clip: &ValueClip) {
    let (lo, hi) = (clip.lo, clip.hi);
    let (f16s, bf16s) = clip.half_clamps();
    let per_task = tensors_per_task(grads);
    grads
        .par_iter_mut()
        .with_min_len(per_task)
        .for_each(|g| match g {
            GradMut::F32(x) => x.par_chunks_mut(BLOCK).for_each(|c| clamp_f32(c, lo, hi)),
            GradMut::F16(x) => (x.par_chunks_mut(BLOCK))
                .for_each(|c| clamp_halves(bytemuck::cast_slice_mut(c), &f16s)),
            GradMut::BF16(x) => (x.par_chunks_mut(BLOCK))
                .for_each(|c| clamp_halves(bytemuck::cast_slice_mut(c), &bf16s)),
        });
}

wide_fn! {
    /// NaN compares false both ways and stays NaN. Selects, not branches: values on both
    /// sides of a bound would mispredict.
    fn clamp_f32(c: &mut [f32], lo: f32, hi: f32) {
        for v in c.iter_mut() {
            let x = *v;
            let y = if x < lo { lo } else { x };
            *v = if x > hi { hi } else { y };
        }
    }
}

wide_fn! {
    /// The value clip of a block of 16-bit values in the integer domain (see
    /// [`HalfClamp`]).
    fn clamp_halves(c: &mut [u16], h: &HalfClamp) {
        let (lo_key, hi_key, lo, hi, nan) = (h.lo_key, h.hi_key, h.lo_bits, h.hi_bits, h.nan_above);
        for v in c.iter_mut() {
            let bits = *v;
            let k = HalfClamp::key(bits);
            let y = if k < lo_key { lo } else { bits };
            let y = if k > hi_key { hi } else { y };
            *v = if bits & 0x7fff > nan { bits } else { y };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every 16-bit value against bounds of every kind: the integer clamp takes the
    /// decision a comparison in f32 takes.
    #[test]
    fn integer_clamp_matches_the_f32_comparison() {
        let bounds = [
            (-1.0f32, 1.0f32),
            (0.1, 0.1),
            (-0.0, 0.0),
            (0.0, 5e-8),
            (-f32::INFINITY, -3.3e38),
            (1e-40, 7e4),
            (-65504.0, f32::INFINITY),
            (-1e-7, 1e-7),
        ];
        for (lo, hi) in bounds {
            let mut f: Vec<f16> = (0..=u16::MAX).map(f16::from_bits).collect();
            let mut b: Vec<bf16> = (0..=u16::MAX).map(bf16::from_bits).collect();
            let clip = ValueClip::range(lo, hi);
            clamp(&mut [GradMut::F16(&mut f), GradMut::BF16(&mut b)], &clip);
            for bits in 0..=u16::MAX {
                let pick = |v: f32, lo_t: u16, hi_t: u16| {
                    if v < lo {
                        lo_t
                    } else if v > hi {
                        hi_t
                    } else {
                        bits
                    }
                };
                let x = f16::from_bits(bits).to_f32();
                let want = pick(x, f16::from_f32(lo).to_bits(), f16::from_f32(hi).to_bits());
                assert_eq!(
                    f[bits as usize].to_bits(),
                    want,
                    "f16 {bits:#x} in [{lo}, {hi}]"
                );
                let x = bf16_to_f32(bf16::from_bits(bits));
                let want = pick(x, f32_to_bf16(lo).to_bits(), f32_to_bf16(hi).to_bits());
                assert_eq!(
                    b[bits as usize].to_bits(),
                    want,
                    "bf16 {bits:#x} in [{lo}, {hi}]"
                );
            }
        }
    }
}
