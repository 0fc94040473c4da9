//! Planning a batch for the GPU, once: validation, binding windows, chunk tables and
//! dispatch sizes. Pure host logic, independent of wgpu, so it is tested on its own.
//!
//! A buffer is bound through windows of at most the device's storage-binding size,
//! starting at multiples of that size rounded down to the offset alignment. Each tensor
//! is cut into *segments* (whole tensors, AGC units, examples), and each segment into
//! chunks of at most [`CHUNK_ELEMS`] elements, cut every `CHUNK_ELEMS` elements from the
//! 32-bit word the segment starts in and at window edges; one workgroup handles one
//! chunk. A strided segment (a column of a row-major matrix) must lie inside one window.
//! The global elementwise passes use chunks over *spans*, maximal runs of touching
//! tensors, so a word shared by two 16-bit tensors is written by one workgroup only; the
//! segment-wise pass writes such shared words with atomics instead.

use std::collections::HashMap;

pub(crate) mod step_table;

use crate::dtype::DType;
use crate::error::ClipError;

/// Elements per chunk (per workgroup): 256 threads x 32.
pub(crate) const CHUNK_ELEMS: u64 = 65536;

/// One tensor as the planner sees it.
#[derive(Debug, Clone)]
pub(crate) struct PlanTensor<'a> {
    /// Index of its buffer in the batch's list of distinct buffers.
    pub buffer: usize,
    /// Size of that buffer in bytes.
    pub buffer_size: u64,
    /// Byte offset of the first element.
    pub offset: u64,
    /// Number of elements.
    pub len: u64,
    /// Element type.
    pub dtype: DType,
    /// Its name, if it has one (see [`PlanTensor::name`]).
    pub label: Option<&'a str>,
    /// Its index in the batch.
    pub index: usize,
    /// Index of its first element in its logical tensor (a shard's start; else 0).
    pub base: u64,
}

/// Device limits that shape a plan.
#[derive(Debug, Clone, Copy)]
pub(crate) struct PlanLimits {
    pub max_binding: u64,
    pub offset_alignment: u64,
    pub max_workgroups_per_dim: u32,
}

/// A chunk table row, as the shaders read it (`Chunk` of `src/shaders/abi.rs`):
/// segment (or span), first element relative to the window, element count, dtype code,
/// element stride, tensor, index of the first element inside its tensor, unused.
pub(crate) type ChunkRow = [u32; 8];

/// A run of elements of one tensor that gets its own norm: a whole tensor, an AGC unit
/// (a row, or a strided column), one example of a per-example gradient.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct PlanSegment {
    /// Index of the tensor.
    pub tensor: usize,
    /// Index of the first element inside the tensor.
    pub first: u64,
    /// Number of elements.
    pub len: u64,
    /// Distance between consecutive elements, in elements (1: contiguous).
    pub stride: u64,
}

impl PlanTensor<'_> {
    /// Its name for error messages (`#index` when it has none), made only when needed: a
    /// move plans every tensor anew.
    pub(crate) fn name(&self) -> String {
        crate::chain::TensorInfo::name_of(self.label, self.index)
    }
}

impl PlanSegment {
    /// Every tensor as one segment, in batch order.
    pub(crate) fn whole(tensors: &[PlanTensor]) -> Vec<PlanSegment> {
        (0..tensors.len())
            .map(|tensor| PlanSegment {
                tensor,
                first: 0,
                len: tensors[tensor].len,
                stride: 1,
            })
            .collect()
    }
}

/// One binding window of one buffer and the chunks each pass runs in it.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Window {
    pub buffer: usize,
    pub byte_offset: u64,
    pub byte_size: u64,
    pub reduce_first: u32,
    pub reduce_count: u32,
    pub apply_first: u32,
    pub apply_count: u32,
}

/// The plan of a batch.
#[derive(Debug, Clone, Default)]
pub(crate) struct Plan {
    pub windows: Vec<Window>,
    /// Chunks of the segments: reduced one partial each, and rewritten with the segment's
    /// own coefficient by the segment-wise elementwise pass.
    pub reduce_chunks: Vec<ChunkRow>,
    /// Chunks over spans, for the elementwise passes that use one coefficient.
    pub apply_chunks: Vec<ChunkRow>,
    /// Per segment, in the order given: (first reduce chunk, chunk count).
    pub segment_ranges: Vec<[u32; 2]>,
}

/// Bytes of the windows a buffer is bound through (the largest binding, rounded down to the offset alignment).
pub(crate) fn window_bytes(limits: &PlanLimits) -> u64 {
    (limits.max_binding.min(1 << 31) / limits.offset_alignment) * limits.offset_alignment
}

/// Folds `n` workgroups into a 2-D grid that respects the per-dimension limit.
pub(crate) fn fold_grid(n: u32, max_per_dim: u32) -> [u32; 3] {
    if n == 0 {
        return [0, 0, 0];
    }
    let x = n.min(max_per_dim);
    [x, n.div_ceil(x), 1]
}

/// Cuts element range `[start, end)` of a buffer (element size `es`) into chunks every
/// CHUNK_ELEMS elements from the 32-bit word `start` lies in, and at window edges, calling
/// `emit(window, first, first relative to the window, count)`. Cut from the range's own
/// first word, a tensor has the same chunks wherever a pool puts it (short of a window
/// edge and of the parity of a 16-bit start), so a move keeps the plan's shape; and no two
/// chunks of a range share a word (a span's chunks are rewritten without atomics).
fn cut(start: u64, end: u64, es: u64, window_bytes: u64, mut emit: impl FnMut(u64, u64, u64, u64)) {
    let origin = start - start % (4 / es);
    let window_elems = window_bytes / es;
    // Divided once per range, not per chunk: a move plans every chunk anew.
    let mut window = start / window_elems;
    let mut window_start = window * window_elems;
    let mut e = start;
    while e < end {
        if e == window_start + window_elems {
            window += 1;
            window_start = e;
        }
        let next = (origin + ((e - origin) / CHUNK_ELEMS + 1) * CHUNK_ELEMS)
            .min(end)
            .min(window_start + window_elems);
        emit(window, e, e - window_start, next - e);
        e = next;
    }
}

impl Plan {
    /// Validates the tensors and builds the plan over `segments` (which must lie inside
    /// their tensors); errors leave nothing behind.
    pub(crate) fn new(
        tensors: &[PlanTensor],
        segments: &[PlanSegment],
        limits: PlanLimits,
    ) -> Result<Plan, ClipError> {
        for t in tensors {
            let es = t.dtype.size();
            if t.offset % es != 0 {
                return Err(ClipError::MisalignedOffset {
                    tensor: t.name(),
                    offset: t.offset,
                    align: es,
                    dtype: t.dtype,
                });
            }
            let end = t.len.checked_mul(es).and_then(|b| b.checked_add(t.offset));
            // Shaders read whole 32-bit words: the tensor's words must lie in the buffer.
            let end = end.and_then(|e| e.checked_next_multiple_of(4));
            match end {
                Some(end) if end <= t.buffer_size => {}
                _ => {
                    return Err(ClipError::OutOfBounds {
                        tensor: t.name(),
                        start: t.offset,
                        end: end.unwrap_or(u64::MAX),
                        size: t.buffer_size,
                    })
                }
            }
        }
        // Chunk rows hold element indices as u32.
        if let Some(t) = tensors.iter().find(|t| t.len > u32::MAX as u64) {
            return Err(ClipError::TooLarge {
                tensor: t.name(),
                len: t.len,
            });
        }
        let window_bytes = window_bytes(&limits);
        // Non-empty tensors in (buffer, offset) order: chunks and spans follow this order.
        let mut order: Vec<usize> = (0..tensors.len()).filter(|&i| tensors[i].len > 0).collect();
        order.sort_by_key(|&i| (tensors[i].buffer, tensors[i].offset));
        for pair in order.windows(2) {
            let (a, b) = (&tensors[pair[0]], &tensors[pair[1]]);
            let a_end = a.offset + a.len * a.dtype.size();
            if a.buffer == b.buffer && b.offset < a_end {
                return Err(ClipError::OverlappingTensors {
                    first: a.name(),
                    second: b.name(),
                });
            }
            // Two 16-bit tensors of different types in one 32-bit word cannot share a span.
            if a.buffer == b.buffer
                && a.dtype != b.dtype
                && a.dtype != DType::F32
                && b.dtype != DType::F32
                && (a_end - 1) / 4 == b.offset / 4
            {
                return Err(ClipError::SharedWord {
                    first: a.name(),
                    second: b.name(),
                });
            }
        }

        let mut plan = Plan {
            segment_ranges: vec![[0, 0]; segments.len()],
            ..Plan::default()
        };
        let mut windows: Vec<Window> = Vec::new();
        // Looked up by (buffer, window), so planning stays linear in buffers too.
        let mut index: HashMap<(usize, u64), usize> = HashMap::new();
        // Consecutive chunks mostly lie in one window: the last one found is asked first.
        let mut last: Option<((usize, u64), usize)> = None;
        let mut window_of = |buffer: usize, window: u64, size: u64| -> usize {
            match last {
                Some((key, wi)) if key == (buffer, window) => return wi,
                _ => {}
            }
            let byte_offset = window * window_bytes;
            let wi = *index.entry((buffer, window)).or_insert_with(|| {
                windows.push(Window {
                    buffer,
                    byte_offset,
                    byte_size: window_bytes.min((size & !3) - byte_offset),
                    reduce_first: 0,
                    reduce_count: 0,
                    apply_first: 0,
                    apply_count: 0,
                });
                windows.len() - 1
            });
            last = Some(((buffer, window), wi));
            wi
        };
        // Segments in (buffer, first byte) order, so a contiguous segment that crosses a
        // window is the last of one window and the first of the next: its chunks stay
        // contiguous once grouped by window. Strided segments never cross a window.
        let mut seg_order: Vec<usize> = (0..segments.len())
            .filter(|&s| segments[s].len > 0)
            .collect();
        let byte_start = |s: &PlanSegment| {
            let t = &tensors[s.tensor];
            t.offset + s.first * t.dtype.size()
        };
        seg_order.sort_by_key(|&s| (tensors[segments[s].tensor].buffer, byte_start(&segments[s])));
        let mut reduce: Vec<(usize, ChunkRow)> = Vec::new();
        for &si in &seg_order {
            let seg = &segments[si];
            let t = &tensors[seg.tensor];
            let es = t.dtype.size();
            let row = |rel: u64, n: u64, index: u64| {
                [
                    si as u32,
                    rel as u32,
                    n as u32,
                    t.dtype.shader_code(),
                    seg.stride as u32,
                    seg.tensor as u32,
                    (t.base + index) as u32,
                    0,
                ]
            };
            let tensor_start = t.offset / es;
            let start = tensor_start + seg.first;
            if seg.stride == 1 {
                cut(start, start + seg.len, es, window_bytes, |w, e, rel, n| {
                    let wi = window_of(t.buffer, w, t.buffer_size);
                    reduce.push((wi, row(rel, n, e - tensor_start)));
                });
            } else {
                let last = start + (seg.len - 1) * seg.stride;
                let w = start * es / window_bytes;
                if last * es / window_bytes != w {
                    return Err(ClipError::TooLarge {
                        tensor: t.name(),
                        len: t.len,
                    });
                }
                let wi = window_of(t.buffer, w, t.buffer_size);
                let base = w * window_bytes / es;
                let mut k = 0;
                while k < seg.len {
                    let n = CHUNK_ELEMS.min(seg.len - k);
                    let e = start + k * seg.stride;
                    reduce.push((wi, row(e - base, n, e - tensor_start)));
                    k += n;
                }
            }
        }
        // Spans: runs of byte-contiguous tensors of one buffer and dtype.
        let mut apply: Vec<(usize, ChunkRow)> = Vec::new();
        // Buffer, first byte, end byte, dtype, buffer size.
        let mut span: Option<(usize, u64, u64, DType, u64)> = None;
        let mut spans = Vec::new();
        for &i in &order {
            let t = &tensors[i];
            let end = t.offset + t.len * t.dtype.size();
            span = match span {
                Some((b, s, e, d, size)) if b == t.buffer && e == t.offset && d == t.dtype => {
                    Some((b, s, end, d, size))
                }
                other => {
                    spans.extend(other);
                    Some((t.buffer, t.offset, end, t.dtype, t.buffer_size))
                }
            };
        }
        spans.extend(span);
        for (si, &(buffer, s, e, dtype, size)) in spans.iter().enumerate() {
            let es = dtype.size();
            cut(s / es, e / es, es, window_bytes, |w, _, rel, n| {
                let wi = window_of(buffer, w, size);
                apply.push((
                    wi,
                    [
                        si as u32,
                        rel as u32,
                        n as u32,
                        dtype.shader_code(),
                        1,
                        0,
                        0,
                        0,
                    ],
                ));
            });
        }

        // Group the chunk tables by window, keeping their order inside each window (a
        // stable sort).
        reduce.sort_by_key(|&(wi, _)| wi);
        apply.sort_by_key(|&(wi, _)| wi);
        for (table, rows) in [
            (&mut plan.reduce_chunks, &reduce),
            (&mut plan.apply_chunks, &apply),
        ] {
            table.extend(rows.iter().map(|(_, r)| *r));
        }
        let (mut r, mut a) = (0, 0);
        for (wi, w) in windows.iter_mut().enumerate() {
            let count = |rows: &[(usize, ChunkRow)], from: usize| {
                rows[from..].iter().take_while(|(x, _)| *x == wi).count()
            };
            let (nr, na) = (count(&reduce, r), count(&apply, a));
            (w.reduce_first, w.reduce_count) = (r as u32, nr as u32);
            (w.apply_first, w.apply_count) = (a as u32, na as u32);
            (r, a) = (r + nr, a + na);
        }
        for (i, row) in plan.reduce_chunks.iter().enumerate() {
            let range = &mut plan.segment_ranges[row[0] as usize];
            if range[1] == 0 {
                range[0] = i as u32;
            }
            range[1] += 1;
        }
        let max_groups = limits.max_workgroups_per_dim as u64;
        for w in &windows {
            if w.reduce_count.max(w.apply_count) as u64 > max_groups * max_groups {
                return Err(ClipError::TooLarge {
                    tensor: format!("window at byte {} of buffer {}", w.byte_offset, w.buffer),
                    len: w.byte_size,
                });
            }
        }
        plan.windows = windows;
        Ok(plan)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A tensor has the same chunks wherever it lies in its buffer, so a pool's moves keep
    /// the plan's shape.
    #[test]
    fn chunks_do_not_depend_on_where_a_tensor_lies() {
        let limits = PlanLimits {
            max_binding: 1 << 30,
            offset_alignment: 256,
            max_workgroups_per_dim: 65535,
        };
        let counts = |shift: u64| {
            let tensors: Vec<PlanTensor> = [(2 * CHUNK_ELEMS, 0), (CHUNK_ELEMS + 3, 1 << 22)]
                .iter()
                .enumerate()
                .map(|(i, &(len, at))| PlanTensor {
                    buffer: 0,
                    buffer_size: 1 << 24,
                    offset: at + 4 * shift,
                    len,
                    dtype: DType::F32,
                    label: None,
                    index: i,
                    base: 0,
                })
                .collect();
            let plan = Plan::new(&tensors, &PlanSegment::whole(&tensors), limits).unwrap();
            let sizes: Vec<u32> = plan.reduce_chunks.iter().map(|c| c[2]).collect();
            (
                plan.segment_ranges.iter().map(|r| r[1]).collect::<Vec<_>>(),
                sizes,
            )
        };
        let (units, sizes) = counts(0);
        assert_eq!(units, [2, 2]);
        for shift in [1, 1000, CHUNK_ELEMS - 1] {
            assert_eq!(
                counts(shift),
                (units.clone(), sizes.clone()),
                "shift {shift}"
            );
        }
    }

    /// A 16-bit range that starts mid-word is cut at word edges: no two of its chunks (a
    /// span's are rewritten without atomics) write one 32-bit word.
    #[test]
    fn chunks_of_a_16_bit_range_do_not_share_words() {
        let limits = PlanLimits {
            max_binding: 1 << 30,
            offset_alignment: 256,
            max_workgroups_per_dim: 65535,
        };
        let tensors = vec![PlanTensor {
            buffer: 0,
            buffer_size: 1 << 24,
            offset: 2,
            len: 3 * CHUNK_ELEMS,
            dtype: DType::F16,
            label: Some("t"),
            index: 0,
            base: 0,
        }];
        let plan = Plan::new(&tensors, &PlanSegment::whole(&tensors), limits).unwrap();
        for table in [&plan.reduce_chunks, &plan.apply_chunks] {
            assert_eq!(table.len(), 4);
            for pair in table.windows(2) {
                let (end, next) = (pair[0][1] + pair[0][2], pair[1][1]);
                assert_eq!((end, end % 2), (next, 0), "{table:?}");
            }
        }
    }
}
