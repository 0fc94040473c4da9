//! Software prefetch for the CPU's streaming loops: each loop works in pieces of eight
//! cache lines and asks for the lines [`AHEAD`] bytes past each piece first. On the Xeon
//! VM where it was measured (BENCHMARKS.md, 2026-12-03; 124M elements, 2 threads), the
//! hardware prefetcher alone left the 16-bit passes at 1.2-1.35x their time with the hint
//! (a bf16 value clip 13.1 ms against 9.9, an f16 clip 20.2 against 17.8) and the f32
//! ones at 1.1-1.15x.

/// How far ahead of the current piece the loops prefetch. Measured on that VM, in
/// alternation: 1-2 KiB did best for every type; 4-8 KiB helped 16-bit loops as much but
/// made the f32 ones slower than with no hint.
const AHEAD: usize = 2048;

/// Bytes of the pieces the loops prefetch for: eight cache lines.
pub(crate) const PIECE_BYTES: usize = 512;

/// Hints that the [`PIECE_BYTES`] from [`AHEAD`] bytes past the start of `piece` are
/// read soon (whatever the piece's length: a fixed count keeps the loops' frame small).
/// A hint past the end of the buffer is harmless: prefetches never fault, and the address
/// is only computed, not dereferenced.
#[inline(always)]
pub(crate) fn prefetch_ahead<T>(piece: &[T]) {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
        let start = piece.as_ptr().cast::<i8>().wrapping_add(AHEAD);
        for line in 0..PIECE_BYTES / 64 {
            // SAFETY: a prefetch reads nothing and cannot fault, at any address.
            unsafe { _mm_prefetch::<_MM_HINT_T0>(start.wrapping_add(64 * line)) };
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = piece;
}

/// Elements of `T` in a piece of [`PIECE_BYTES`].
pub(crate) const fn piece_len<T>() -> usize {
    PIECE_BYTES / std::mem::size_of::<T>()
}

/// Runs `f` on `x` piece by piece ([`PIECE_BYTES`] each, the last one shorter), each
/// after the prefetch of the lines ahead of it: the frame of every elementwise loop.
#[inline(always)]
pub(crate) fn in_pieces<T>(x: &mut [T], mut f: impl FnMut(&mut [T])) {
    for piece in x.chunks_mut(piece_len::<T>()) {
        prefetch_ahead(piece);
        f(piece)
    }
}

/// The ranges of consecutive pieces of `n` elements that cover `0..len` (the last one
/// shorter): the frame of loops over several arrays at once.
pub(crate) fn pieces(len: usize, n: usize) -> impl Iterator<Item = std::ops::Range<usize>> {
    (0..len)
        .step_by(n)
        .map(move |start| start..len.min(start + n))
}
