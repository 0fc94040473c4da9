//! The reduction under the CPU engine's `reduce` and `combine` (twins of
//! `shaders/norm_reduce.wgsl` and `shaders/norm_combine.wgsl`): the norm of every tensor or
//! unit, reduced block by block in f64 in a fixed order (so the result is the same bits on
//! every run and every thread count).
//!
//! The host has f64, so the common norms take a faster exact route than the GPU's
//! scaled accumulator: a square of any finite f32 (at most 1.2e77) and a sum of 2^16 of
//! them fit f64 with room to spare, and the smallest f32 subnormal squared (2e-90) is
//! still a normal f64. Only general p, where |x|^p can leave f64 range, uses the scaled
//! accumulator element by element.
//!
//! A 16-bit value's square is exact in f32 (22 significant bits at most), so the 16-bit
//! L2 sums add [`RUN`] squares per lane in f32 before the lane moves to f64: a relative
//! error of about 7 * 2^-24 (4.2e-7) at most in the sum, 2.1e-7 in the norm, at a fraction
//! of the arithmetic (an f64 lane per element is what bounds an in-cache or AVX2 pass). A
//! bf16 square can leave f32's range: a block whose f32 sums overflow, or whose sum is
//! below [`TINY_SUM`], is summed again in f64 alone.

use super::apply::bf16_to_f32;
use super::prefetch::{piece_len, prefetch_ahead, PIECE_BYTES};
use crate::dtype::GradRef;
use crate::norm::{Norm, NormAcc, FLAG_INF, FLAG_NAN};
use half::slice::HalfFloatSliceExt;
use rayon::prelude::*;

/// Elements per parallel block; part of the fixed reduction order.
pub(crate) const BLOCK: usize = 1 << 16;
/// 16-bit elements are widened to f32 this many at a time, on the stack.
const WIDEN: usize = 1024;
/// Independent accumulators, so the compiler can vectorise the reductions.
const LANES: usize = 32;
/// Rows of LANES 16-bit squares a lane sums in f32 before adding its partial in f64.
const RUN: usize = 8;
// A run of 16-bit rows is one prefetch piece, and a piece is whole rows of any type.
const _: () = assert!(LANES * RUN * 2 == PIECE_BYTES && PIECE_BYTES.is_multiple_of(LANES * 4));
/// A bf16 square of |x| < 2^-63 falls below f32's normal range and is off by up to 2^-150;
/// a block of 2^16 of them by 2^-134, within 2^-34 of any sum of at least this. A bf16 block
/// whose sum is below it is summed again in f64.
const TINY_SUM: f64 = 1.0 / (1u128 << 100) as f64;

/// Flag bits of one element.
fn flags_of(x: f32) -> u32 {
    if x.is_nan() {
        FLAG_NAN
    } else if x.is_infinite() {
        FLAG_INF
    } else {
        0
    }
}

/// Sum of `f(x)` over `x`, with LANES independent f64 accumulators.
#[inline(always)]
fn lane_sum(x: &[f32], f: impl Fn(f64) -> f64) -> f64 {
    let mut acc = [0.0f64; LANES];
    let mut chunks = x.chunks_exact(LANES);
    for c in &mut chunks {
        for i in 0..LANES {
            acc[i] += f(c[i] as f64);
        }
    }
    let tail: f64 = chunks.remainder().iter().map(|&v| f(v as f64)).sum();
    acc.iter().sum::<f64>() + tail
}

/// Largest |x| over `x`, and the OR of non-finite flags.
#[inline(always)]
fn max_abs(x: &[f32]) -> (f32, u32) {
    let mut acc = [0.0f32; LANES];
    let mut poison = [0.0f32; LANES];
    let mut chunks = x.chunks_exact(LANES);
    for c in &mut chunks {
        for i in 0..LANES {
            acc[i] = acc[i].max(c[i].abs());
            // 0 for finite x, NaN for inf or NaN: finds non-finite values without a branch.
            poison[i] += c[i] * 0.0;
        }
    }
    let mut m = acc.iter().fold(0.0f32, |a, &b| a.max(b));
    let mut p: f32 = poison.iter().sum();
    for &v in chunks.remainder() {
        m = m.max(v.abs());
        p += v * 0.0;
    }
    if p.is_nan() {
        let flags = x.iter().fold(0, |f, &v| f | flags_of(v));
        let m = x
            .iter()
            .filter(|v| v.is_finite())
            .fold(0.0f32, |a, &v| a.max(v.abs()));
        return (m, flags);
    }
    (m, 0)
}

/// The accumulator of one block of f32 values.
#[inline(always)]
fn reduce_f32(x: &[f32], norm: Norm) -> NormAcc {
    let power_sum = |f: fn(f64) -> f64| {
        let s = lane_sum(x, f);
        if s.is_finite() {
            return NormAcc::from_power_sum(norm, s, 0);
        }
        // Only a non-finite element makes the f64 sum non-finite: redo the block without them.
        let flags = x.iter().fold(0, |fl, &v| fl | flags_of(v));
        let s: f64 = x
            .iter()
            .filter(|v| v.is_finite())
            .map(|&v| f(v as f64))
            .sum();
        NormAcc::from_power_sum(norm, s, flags)
    };
    match norm {
        Norm::L2 => {
            let s = f32_sum_sq(x);
            match s.is_finite() {
                true => NormAcc::from_power_sum(norm, s, 0),
                false => power_sum(|v| v * v),
            }
        }
        Norm::L1 => power_sum(f64::abs),
        Norm::Inf => {
            let (m, flags) = max_abs(x);
            NormAcc::from_power_sum(norm, m as f64, flags)
        }
        Norm::P(_) => x.iter().fold(NormAcc::IDENTITY, |acc, &v| {
            let elem = if v.is_finite() {
                NormAcc {
                    scale: v.abs() as f64,
                    sum: if v == 0.0 { 0.0 } else { 1.0 },
                    flags: 0,
                }
            } else {
                NormAcc {
                    flags: flags_of(v),
                    ..NormAcc::IDENTITY
                }
            };
            acc.combine(elem, norm)
        }),
    }
}

/// The accumulator of a block of 16-bit values, widened to f32 on the stack.
#[inline(always)]
fn reduce_half<T>(x: &[T], norm: Norm) -> NormAcc
where
    [T]: HalfFloatSliceExt,
{
    let mut buf = [0.0f32; WIDEN];
    x.chunks(WIDEN).fold(NormAcc::IDENTITY, |acc, c| {
        let b = &mut buf[..c.len()];
        c.convert_to_f32_slice(b);
        acc.combine(reduce_f32(b, norm), norm)
    })
}

/// The accumulator of a block of bf16 values: widening is a shift, written out so it
/// vectorises with the reduction.
#[inline(always)]
fn reduce_bf16(x: &[half::bf16], norm: Norm) -> NormAcc {
    let mut buf = [0.0f32; WIDEN];
    x.chunks(WIDEN).fold(NormAcc::IDENTITY, |acc, c| {
        let b = &mut buf[..c.len()];
        for (w, v) in b.iter_mut().zip(c) {
            *w = bf16_to_f32(*v);
        }
        acc.combine(reduce_f32(b, norm), norm)
    })
}

/// Sum of squares in f64 of `widen(x)` over `x`, element `i` in lane `i % LANES`, the tail
/// first and then the lanes in order: the summation order of every f32 L2 block sum (and
/// of a bf16 block redone in f64), at any vector width.
#[inline(always)]
fn lane_sum_sq<T: Copy>(x: &[T], widen: impl Fn(T) -> f32) -> f64 {
    let mut acc = [0.0f64; LANES];
    let rows = x.len() - x.len() % LANES;
    for piece in x[..rows].chunks(piece_len::<T>()) {
        prefetch_ahead(piece);
        for c in piece.chunks_exact(LANES) {
            for i in 0..LANES {
                let v = widen(c[i]) as f64;
                acc[i] += v * v;
            }
        }
    }
    let mut sum = 0.0;
    for &v in &x[rows..] {
        let v = widen(v) as f64;
        sum += v * v;
    }
    for a in acc {
        sum += a;
    }
    sum
}

wide_fn! {
    /// Sum of squares in f64 of f32 values (finite for any finite input: see the module
    /// header).
    fn f32_sum_sq(x: &[f32]) -> f64 {
        lane_sum_sq(x, |v| v)
    }
}

/// The order in which the 16-bit sums add their lanes' totals: position `k` holds the lane
/// of element `16 (k / 16) + 2 (k % 8) + k / 8 % 2` of a row, the order in which the AVX2
/// bf16 loop holds them (a word of two bf16 values gives the even one by a shift and the
/// odd one by a mask, so that loop needs no shuffle).
const RUN_LANE_ORDER: [usize; LANES] = {
    let mut order = [0; LANES];
    let mut k = 0;
    while k < LANES {
        order[k] = 16 * (k / 16) + 2 * (k % 8) + k / 8 % 2;
        k += 1;
    }
    order
};

/// Sum of squares of 16-bit values `widen(x)` whose squares are exact in f32: element `i`
/// in lane `i % LANES`, each lane adding up to [`RUN`] rows in f32 and then that partial
/// to its f64 total; then [`runs_total`]. The F16C, AVX2 and AVX-512 loops follow the same
/// order, so every path gives the same bits.
#[inline(always)]
fn lane_sum_sq_runs<T: Copy>(x: &[T], widen: impl Fn(T) -> f32 + Copy) -> f64 {
    let mut acc = [0.0f64; LANES];
    let rows = x.len() - x.len() % LANES;
    for run in x[..rows].chunks(LANES * RUN) {
        prefetch_ahead(run);
        let mut part = [0.0f32; LANES];
        for c in run.chunks_exact(LANES) {
            for i in 0..LANES {
                let v = widen(c[i]);
                part[i] += v * v;
            }
        }
        for i in 0..LANES {
            acc[i] += part[i] as f64;
        }
    }
    runs_total(&acc, &x[rows..], widen)
}

/// The total of a 16-bit sum of squares from its lanes (`lanes[i]`: the lane of element
/// `i` of a row) and the tail under LANES ([`held_total`] of the lanes in
/// [`RUN_LANE_ORDER`]).
#[inline(always)]
fn runs_total<T: Copy>(lanes: &[f64; LANES], tail: &[T], widen: impl Fn(T) -> f32) -> f64 {
    held_total(|k| lanes[RUN_LANE_ORDER[k]], tail_sum_sq(tail, widen))
}

/// Sum of squares in f64 of the tail of a 16-bit sum, in order.
#[inline(always)]
fn tail_sum_sq<T: Copy>(tail: &[T], widen: impl Fn(T) -> f32) -> f64 {
    tail.iter().fold(0.0, |sum, &v| {
        let v = widen(v) as f64;
        sum + v * v
    })
}

/// The total of the lanes `held(k)`, position `k` of [`RUN_LANE_ORDER`], and the tail's
/// sum: a pairwise tree of the lanes (a few dependent additions, not 32: this is paid
/// once per small tensor), then the tail. The first level reads the lanes where they are
/// (an inlined gather, not a permuted copy).
#[inline(always)]
fn held_total(held: impl Fn(usize) -> f64, tail_sum: f64) -> f64 {
    let mut sums = [0.0f64; LANES / 2];
    for (k, s) in sums.iter_mut().enumerate() {
        *s = held(k) + held(k + LANES / 2);
    }
    let mut width = LANES / 4;
    while width > 0 {
        for k in 0..width {
            sums[k] += sums[k + width];
        }
        width /= 2;
    }
    sums[0] + tail_sum
}

/// f16 bits to f32, exactly and without a branch (so it vectorises): a normal's exponent
/// rebiased in the integer domain, a subnormal's mantissa converted and scaled by 2^-24
/// (never a subnormal f32 operand, which costs a microcode assist per element on x86),
/// infinity and NaN (payload kept, quieted) by a select.
#[inline(always)]
pub(crate) fn f16_bits_to_f32(h: u16) -> f32 {
    let h = h as u32;
    let sign = (h & 0x8000) << 16;
    let em = h & 0x7fff;
    let normal = (em << 13) + (112 << 23);
    let subnormal = (em as f32 * f32::from_bits(0x3380_0000)).to_bits();
    // NaN comes out quiet, as `half` and the hardware conversion give it.
    let special = (em << 13) | 0x7f80_0000 | (((em > 0x7c00) as u32) << 22);
    let bits = if em < 0x400 {
        subnormal
    } else if em >= 0x7c00 {
        special
    } else {
        normal
    };
    f32::from_bits(bits | sign)
}

/// Sum of squares of f16 values in f32 runs ([`lane_sum_sq_runs`]): with the hardware
/// conversion (AVX-512, else F16C) where the CPU has it, else widened in the loop. Every
/// path adds in the same order, so the result has the same bits either way.
fn f16_sum_sq(x: &[half::f16]) -> f64 {
    #[cfg(target_arch = "x86_64")]
    {
        if std::is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU has AVX-512 F, checked just above.
            return unsafe { f16_sum_sq_avx512(x) };
        }
        if has_f16c() {
            // SAFETY: the CPU has AVX2, F16C and FMA, checked just above.
            return unsafe { f16_sum_sq_f16c(x) };
        }
    }
    f16_sum_sq_widened(x)
}

/// [`f16_sum_sq`] with the 256-bit `vcvtph2ps` of F16C: four vectors of eight f32 are
/// the lanes' runs, eight vectors of four f64 their totals.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,f16c,fma")]
fn f16_sum_sq_f16c(x: &[half::f16]) -> f64 {
    use std::arch::x86_64::*;
    const _: () = assert!(LANES == 32);
    let mut acc = [_mm256_setzero_pd(); 8];
    let rows = x.len() - x.len() % LANES;
    for run in x[..rows].chunks(LANES * RUN) {
        prefetch_ahead(run);
        let mut part = [_mm256_setzero_ps(); 4];
        for c in run.chunks_exact(LANES) {
            for (q, p) in part.iter_mut().enumerate() {
                // SAFETY: `c` holds 32 halves, so 8 from `8 * q` are 16 readable bytes.
                let h = unsafe { _mm_loadu_si128(c.as_ptr().add(8 * q).cast()) };
                let f = _mm256_cvtph_ps(h);
                // One rounding either way: the square is exact.
                *p = _mm256_fmadd_ps(f, f, *p);
            }
        }
        for (q, p) in part.iter().enumerate() {
            let lo = _mm256_cvtps_pd(_mm256_castps256_ps128(*p));
            let hi = _mm256_cvtps_pd(_mm256_extractf128_ps::<1>(*p));
            acc[2 * q] = _mm256_add_pd(acc[2 * q], lo);
            acc[2 * q + 1] = _mm256_add_pd(acc[2 * q + 1], hi);
        }
    }
    let mut lanes = [0.0f64; LANES];
    for (k, v) in acc.iter().enumerate() {
        // SAFETY: 4 f64 written into lanes[4k..4k + 4], inside the array.
        unsafe { _mm256_storeu_pd(lanes.as_mut_ptr().add(4 * k), *v) };
    }
    runs_total(&lanes, &x[rows..], widen_f16)
}

/// [`f16_sum_sq`] with `vcvtph2ps`: two vectors of sixteen f32 are the lanes' runs, four
/// vectors of eight f64 their totals.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
fn f16_sum_sq_avx512(x: &[half::f16]) -> f64 {
    use std::arch::x86_64::*;
    const _: () = assert!(LANES == 32);
    let mut acc = [_mm512_setzero_pd(); 4];
    let rows = x.len() - x.len() % LANES;
    for run in x[..rows].chunks(LANES * RUN) {
        prefetch_ahead(run);
        let mut part = [_mm512_setzero_ps(); 2];
        for c in run.chunks_exact(LANES) {
            for (q, p) in part.iter_mut().enumerate() {
                // SAFETY: `c` holds 32 halves, so 16 from `16 * q` are 32 readable bytes.
                let h = unsafe { _mm256_loadu_si256(c.as_ptr().add(16 * q).cast()) };
                let f = _mm512_cvtph_ps(h);
                // One rounding either way: the square is exact.
                *p = _mm512_fmadd_ps(f, f, *p);
            }
        }
        for (q, p) in part.iter().enumerate() {
            let lo = _mm512_cvtps_pd(_mm512_castps512_ps256(*p));
            let hi = _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(
                _mm512_castps_pd(*p),
            )));
            acc[2 * q] = _mm512_add_pd(acc[2 * q], lo);
            acc[2 * q + 1] = _mm512_add_pd(acc[2 * q + 1], hi);
        }
    }
    let mut lanes = [0.0f64; LANES];
    for (k, v) in acc.iter().enumerate() {
        // SAFETY: 8 f64 written into lanes[8k..8k + 8], inside the array.
        unsafe { _mm512_storeu_pd(lanes.as_mut_ptr().add(8 * k), *v) };
    }
    runs_total(&lanes, &x[rows..], widen_f16)
}

/// Whether the F16C loop can run: AVX2, F16C and FMA.
#[cfg(target_arch = "x86_64")]
fn has_f16c() -> bool {
    std::is_x86_feature_detected!("avx2")
        && std::is_x86_feature_detected!("f16c")
        && std::is_x86_feature_detected!("fma")
}

/// f16 bits widened exactly, as [`runs_total`]'s `widen`.
#[inline(always)]
fn widen_f16(v: half::f16) -> f32 {
    f16_bits_to_f32(v.to_bits())
}

wide_fn! {
    /// [`f16_sum_sq`] widened in the loop ([`f16_bits_to_f32`]).
    fn f16_sum_sq_widened(x: &[half::f16]) -> f64 {
        lane_sum_sq_runs(x, widen_f16)
    }
}

/// Sum of squares of bf16 values in f32 runs ([`lane_sum_sq_runs`]): see [`TINY_SUM`] for
/// when it is redone by [`bf16_sum_sq_f64`]. With AVX2 intrinsics where the CPU has AVX2
/// (as compiled, the widening takes a shuffle per vector, which bounds the loop),
/// with AVX-512 too: on a Xeon VM, the same loop on 512-bit loads took 1.15-1.2x the time
/// of this one out of cache (GPT-2 small: 9.2-9.5 ms against 7.8-8.1), no less in cache.
/// Else as compiled for the widest vectors; the same bits either way.
fn bf16_sum_sq(x: &[half::bf16]) -> f64 {
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU has AVX2, checked just above.
        return unsafe { bf16_sum_sq_avx2(x) };
    }
    bf16_sum_sq_wide(x)
}

wide_fn! {
    /// [`bf16_sum_sq`] as compiled (widening is a shift, in the same loop).
    fn bf16_sum_sq_wide(x: &[half::bf16]) -> f64 {
        lane_sum_sq_runs(x, bf16_to_f32)
    }
}

/// [`bf16_sum_sq`] with AVX2: a 32-bit word holds two bf16 values, the even one widened
/// by a shift and the odd one by a mask; four vectors of eight f32 are the lanes' runs
/// (in [`RUN_LANE_ORDER`]), eight vectors of four f64 their totals.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn bf16_sum_sq_avx2(x: &[half::bf16]) -> f64 {
    use std::arch::x86_64::*;
    const _: () = assert!(LANES == 32);
    let high = _mm256_set1_epi32(0xffff_0000u32 as i32);
    let mut acc = [_mm256_setzero_pd(); 8];
    let rows = x.len() - x.len() % LANES;
    for run in x[..rows].chunks(LANES * RUN) {
        prefetch_ahead(run);
        let mut part = [_mm256_setzero_ps(); 4];
        for c in run.chunks_exact(LANES) {
            // SAFETY: `c` holds 32 bf16 values: 64 readable bytes from its start.
            let (a, b) = unsafe {
                let p = c.as_ptr().cast::<__m256i>();
                (_mm256_loadu_si256(p), _mm256_loadu_si256(p.add(1)))
            };
            let v = [
                _mm256_slli_epi32::<16>(a),
                _mm256_and_si256(a, high),
                _mm256_slli_epi32::<16>(b),
                _mm256_and_si256(b, high),
            ];
            for (p, v) in part.iter_mut().zip(v) {
                let f = _mm256_castsi256_ps(v);
                // A multiply, then an add, as the other paths: a bf16 square below 2^-126
                // is a rounded f32 subnormal, so a fused multiply-add could differ.
                *p = _mm256_add_ps(*p, _mm256_mul_ps(f, f));
            }
        }
        for (q, p) in part.iter().enumerate() {
            let lo = _mm256_cvtps_pd(_mm256_castps256_ps128(*p));
            let hi = _mm256_cvtps_pd(_mm256_extractf128_ps::<1>(*p));
            acc[2 * q] = _mm256_add_pd(acc[2 * q], lo);
            acc[2 * q + 1] = _mm256_add_pd(acc[2 * q + 1], hi);
        }
    }
    let mut held = [0.0f64; LANES];
    for (k, v) in acc.iter().enumerate() {
        // SAFETY: 4 f64 written into held[4k..4k + 4], inside the array.
        unsafe { _mm256_storeu_pd(held.as_mut_ptr().add(4 * k), *v) };
    }
    // Position k holds the lane of element RUN_LANE_ORDER[k] already.
    held_total(|k| held[k], tail_sum_sq(&x[rows..], bf16_to_f32))
}

wide_fn! {
    /// [`f32_sum_sq`] of bf16 values: every square in f64.
    fn bf16_sum_sq_f64(x: &[half::bf16]) -> f64 {
        lane_sum_sq(x, bf16_to_f32)
    }
}

/// The accumulator of one block of any element type.
fn reduce_block(g: GradRef<'_>, norm: Norm) -> NormAcc {
    match g {
        GradRef::F32(x) => reduce_f32(x, norm),
        GradRef::F16(x) if norm == Norm::L2 => {
            let s = f16_sum_sq(x);
            match s.is_finite() {
                true => NormAcc::from_power_sum(norm, s, 0),
                false => reduce_half(x, norm),
            }
        }
        GradRef::F16(x) => reduce_half(x, norm),
        GradRef::BF16(x) if norm == Norm::L2 => match bf16_sum_sq(x) {
            s if s.is_finite() && s >= TINY_SUM => NormAcc::from_power_sum(norm, s, 0),
            // Zeros (unused embedding rows, say) need no second pass.
            0.0 if x.iter().fold(0, |o, v| o | v.to_bits()) & 0x7fff == 0 => {
                NormAcc::from_power_sum(norm, 0.0, 0)
            }
            // A square beyond f32 range (or a non-finite value) or below its normal range.
            _ => match bf16_sum_sq_f64(x) {
                s if s.is_finite() => NormAcc::from_power_sum(norm, s, 0),
                _ => reduce_bf16(x, norm),
            },
        },
        GradRef::BF16(x) => reduce_bf16(x, norm),
    }
}

/// The accumulator of one tensor: its fixed blocks (in parallel when it has several)
/// combined in order.
fn tensor_acc(g: &GradRef<'_>, norm: Norm) -> NormAcc {
    fn blocks<'a, T: Sync>(x: &'a [T], norm: Norm, wrap: fn(&'a [T]) -> GradRef<'a>) -> NormAcc {
        if x.len() <= BLOCK {
            return NormAcc::IDENTITY.combine(reduce_block(wrap(x), norm), norm);
        }
        let partials: Vec<NormAcc> = x
            .par_chunks(BLOCK)
            .map(|b| reduce_block(wrap(b), norm))
            .collect();
        total_acc(&partials, norm)
    }
    match *g {
        GradRef::F32(x) => blocks(x, norm, GradRef::F32),
        GradRef::F16(x) => blocks(x, norm, GradRef::F16),
        GradRef::BF16(x) => blocks(x, norm, GradRef::BF16),
    }
}

/// One accumulator per tensor of the `count` tensors `grad(t)`, in order, into `accs`
/// (whose buffer a warm step reuses); blocks run in parallel and combine in order.
pub(crate) fn tensor_accs_into<'g>(
    count: usize,
    grad: impl Fn(usize) -> GradRef<'g> + Sync,
    norm: Norm,
    accs: &mut Vec<NormAcc>,
) {
    accs.clear();
    accs.resize(count, NormAcc::IDENTITY);
    let tasks = tasks_of((0..count).map(|t| grad(t).len()));
    in_tasks(accs, &tasks, |t, acc| *acc = tensor_acc(&grad(t), norm));
}

/// Runs `f(i, &mut items[i])` for every item, in parallel `tasks` of consecutive items
/// ([`tasks_of`]).
pub(crate) fn in_tasks<T: Send>(
    items: &mut [T],
    tasks: &[std::ops::Range<usize>],
    f: impl Fn(usize, &mut T) + Sync,
) {
    let mut rest = items;
    let parts: Vec<(usize, &mut [T])> = (tasks.iter())
        .map(|r| {
            let (head, tail) = std::mem::take(&mut rest).split_at_mut(r.len());
            rest = tail;
            (r.start, head)
        })
        .collect();
    parts.into_par_iter().for_each(|(start, part)| {
        for (k, item) in part.iter_mut().enumerate() {
            f(start + k, item)
        }
    });
}

/// Consecutive items (of `lens` elements each) cut into parallel tasks of about a block
/// of elements each (an item of a block or more is a task of its own): a task per small
/// tensor would cost more than the tensor.
pub(crate) fn tasks_of(lens: impl ExactSizeIterator<Item = usize>) -> Vec<std::ops::Range<usize>> {
    let total = lens.len();
    let mut tasks = Vec::new();
    let (mut start, mut elems) = (0, 0);
    for (i, n) in lens.enumerate() {
        if i > start && elems + n > BLOCK {
            tasks.push(start..i);
            (start, elems) = (i, 0);
        }
        elems += n;
    }
    if start < total {
        tasks.push(start..total);
    }
    tasks
}

/// The combined accumulator of a batch, from its per-tensor accumulators.
pub(crate) fn total_acc(accs: &[NormAcc], norm: Norm) -> NormAcc {
    accs.iter()
        .fold(NormAcc::IDENTITY, |a, &b| a.combine(b, norm))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The hardware and the widened f16 sums have the same bits.
    #[test]
    fn f16_sums_agree_bit_for_bit() {
        #[cfg(target_arch = "x86_64")]
        if !std::is_x86_feature_detected!("f16c") {
            eprintln!("no F16C here: the hardware f16 path is not compared");
        }
        let x: Vec<half::f16> = (0..100_003u32)
            .map(|i| half::f16::from_bits((i.wrapping_mul(2654435761) >> 16) as u16 & 0x7bff))
            .collect();
        for n in [0, 1, 31, 32, 33, 1000, 100_003] {
            let want = f16_sum_sq_widened(&x[..n]).to_bits();
            assert_eq!(f16_sum_sq(&x[..n]).to_bits(), want, "{n}");
            // The F16C path too where the dispatch prefers AVX-512.
            #[cfg(target_arch = "x86_64")]
            if has_f16c() {
                // SAFETY: the CPU has AVX2, F16C and FMA, checked just above.
                assert_eq!(unsafe { f16_sum_sq_f16c(&x[..n]) }.to_bits(), want, "{n}");
            }
        }
    }

    /// The AVX2, the compiled and the scalar bf16 sums have the same bits (the AVX2 loop
    /// holds its lanes in another order and must add them in the same one).
    #[test]
    fn bf16_sums_agree_bit_for_bit() {
        // Magnitudes 2^-16 to 2^14: squares stay in f32's normal range (no pass is
        // redone) and span 60 bits, so the f64 additions of lane totals round and another
        // order of the lanes gives other bits (short sums, whose lanes hold one square).
        let x: Vec<half::bf16> = (0..100_003u32)
            .map(|i| {
                let b = (i.wrapping_mul(2654435761) >> 13) as u16;
                half::bf16::from_bits((b % 0x0f00 + 0x3780) | (b & 0x8000))
            })
            .collect();
        // A lane whose squares are f32 subnormals (1.5 * 2^-75, then 2^-75: a fused
        // multiply-add rounds their sum to 2^-148, a multiply and an add to 2^-149) in a
        // block whose sum (2^-100, from 2^-50) is kept in f32 runs.
        let mut tiny = vec![half::bf16::ZERO; 64];
        tiny[0] = half::bf16::from_f32(1.5 * 2f32.powi(-75));
        tiny[32] = half::bf16::from_f32(2f32.powi(-75));
        tiny[1] = half::bf16::from_f32(2f32.powi(-50));
        assert!(lane_sum_sq_runs(&tiny, bf16_to_f32) >= TINY_SUM);
        let want = lane_sum_sq_runs(&tiny, bf16_to_f32).to_bits();
        assert_eq!(bf16_sum_sq(&tiny).to_bits(), want, "subnormal squares");
        assert_eq!(bf16_sum_sq_wide(&tiny).to_bits(), want, "subnormal squares");
        let short = (0..64).flat_map(|start| [(start, 32), (start, 33), (start, 64)]);
        let long = [0, 1, 31, 255, 256, 257, 1000, 100_003].map(|n| (0, n));
        for (start, n) in short.chain(long) {
            let x = &x[start..start + n];
            let want = lane_sum_sq_runs(x, bf16_to_f32).to_bits();
            assert_eq!(bf16_sum_sq(x).to_bits(), want, "{start} {n}");
            assert_eq!(bf16_sum_sq_wide(x).to_bits(), want, "{start} {n}");
            #[cfg(target_arch = "x86_64")]
            if std::is_x86_feature_detected!("avx2") {
                // SAFETY: the CPU has AVX2, checked just above.
                assert_eq!(
                    unsafe { bf16_sum_sq_avx2(x) }.to_bits(),
                    want,
                    "{start} {n}"
                );
            }
        }
    }

    /// The 16-bit L2 sums in f32 runs stay within their bound of the f64 sum, and bf16
    /// squares outside f32's normal range are summed in f64 alone.
    #[test]
    fn sixteen_bit_runs_are_within_their_bound() {
        let bits = |i: u32| (i.wrapping_mul(2654435761) >> 13) as u16;
        let bound = 7.0 / (1u64 << 24) as f64;
        let exact = |v: &mut dyn Iterator<Item = f32>| v.map(|x| (x as f64) * (x as f64)).sum();
        for n in [1, 31, 32, 33, 257, 4096, BLOCK] {
            // Every finite f16 (magnitudes 6e-8 to 65504), and bf16 within 2^-43..2^37.
            let h: Vec<half::f16> = (0..n as u32)
                .map(|i| half::f16::from_bits((bits(i) % 0x7c00) | (bits(i) & 0x8000)))
                .collect();
            let want: f64 = exact(&mut h.iter().map(|v| v.to_f32()));
            let got = reduce_block(GradRef::F16(&h), Norm::L2)
                .total(Norm::L2)
                .powi(2);
            assert!(
                (got - want).abs() <= bound * want,
                "f16 {n}: {got} vs {want}"
            );
            let b: Vec<half::bf16> = (0..n as u32)
                .map(|i| half::bf16::from_bits((bits(i) % 0x2800 + 0x2a00) | (bits(i) & 0x8000)))
                .collect();
            let want: f64 = exact(&mut b.iter().map(|v| v.to_f32()));
            let got = reduce_block(GradRef::BF16(&b), Norm::L2)
                .total(Norm::L2)
                .powi(2);
            assert!(
                (got - want).abs() <= bound * want,
                "bf16 {n}: {got} vs {want}"
            );
        }
        // The worst case of a run: 1 then squares just under half its ulp, each rounded
        // away (7 * 2^-24 of the sum lost with RUN = 8; a longer run fails).
        let mut h = vec![half::f16::from_bits(0x0bff); LANES * RUN];
        h[..LANES].fill(half::f16::ONE);
        let want: f64 = exact(&mut h.iter().map(|v| v.to_f32()));
        let got = reduce_block(GradRef::F16(&h), Norm::L2)
            .total(Norm::L2)
            .powi(2);
        assert!(
            (got - want).abs() <= bound * want,
            "worst case: {got} vs {want}"
        );
        assert!(
            (got - want).abs() > 0.99 * bound * want,
            "worst case: {got} vs {want}"
        );
        // 1e-30 and 1e30: squares below and beyond f32 range, summed exactly in f64.
        for x in [1e-30f32, 1e30, 3e38] {
            let b = vec![half::bf16::from_f32(x); 1000];
            let v = half::bf16::from_f32(x).to_f32() as f64;
            let got = reduce_block(GradRef::BF16(&b), Norm::L2).total(Norm::L2);
            assert_eq!(got, (1000.0 * v * v).sqrt(), "{x}");
        }
    }

    /// Tasks cover every item once, in order, about a block of elements each.
    #[test]
    fn tasks_cover_items_in_order() {
        let lens = [10, BLOCK, 5, 5, BLOCK / 2, BLOCK / 2 + 1, 0, 3];
        let tasks = tasks_of(lens.iter().copied());
        assert_eq!(tasks, [0..1, 1..2, 2..5, 5..8]);
        assert!(tasks_of(std::iter::empty()).is_empty());
    }

    /// Every f16 value widens to the bits `half` gives (NaN payloads included).
    #[test]
    fn branch_free_f16_widening_is_exact() {
        for bits in 0..=u16::MAX {
            let want = half::f16::from_bits(bits).to_f32();
            let got = f16_bits_to_f32(bits);
            if want.is_nan() {
                assert!(got.is_nan(), "{bits:#x}");
            }
            assert_eq!(got.to_bits(), want.to_bits(), "{bits:#x}");
        }
    }
}
