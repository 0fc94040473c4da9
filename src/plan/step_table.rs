//! The table of a fused optimizer step: the gradients and the f32 parameters of the same
//! tensors, in buffers and binding windows of their own, cut together into rows that lie
//! in one gradient window and one parameter window each, grouped into dispatches ("runs")
//! with a state buffer of their own. Pure host logic, tested without a GPU.

use super::{window_bytes, PlanLimits, PlanTensor, CHUNK_ELEMS};
use crate::chain::UnitLayout;
use crate::dtype::DType;
use crate::error::ClipError;
use crate::shaders::abi::StepChunk;

/// A binding window: (buffer index, byte offset, byte size).
pub(crate) type Binding = (usize, u64, u64);

/// One dispatch of the step: its gradient and parameter windows, its rows of the table
/// and the length of each of its state arrays.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct StepRun {
    pub grads: Binding,
    pub params: Binding,
    pub first_chunk: u32,
    pub n_chunks: u32,
    pub state_len: u32,
}

/// The table: every row, run after run.
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct StepTable {
    pub chunks: Vec<StepChunk>,
    pub runs: Vec<StepRun>,
    /// Per tensor, per run it touches: (run, first element of the tensor in the run's
    /// state arrays, element of the tensor, count), for reading and writing the state.
    pub pieces: Vec<Vec<(usize, u64, u64, u64)>>,
}

/// Cuts gradient tensors `grads` and parameter tensors `params` (f32, the same lengths;
/// in buffers of their own; both already validated by `Plan::new`) into the step's table; `layouts`: each tensor's
/// units; `arrays`: the optimizer's f32 state arrays per element.
pub(crate) fn plan_step(
    grads: &[PlanTensor],
    params: &[PlanTensor],
    layouts: &[UnitLayout],
    arrays: usize,
    limits: &PlanLimits,
) -> Result<StepTable, ClipError> {
    let wb = window_bytes(limits);
    // A run's state arrays together fit one binding.
    let run_cap = (wb / 4 / arrays.max(1) as u64).min(u32::MAX as u64);
    let binding = |t: &PlanTensor, e: u64| -> (Binding, u64) {
        let es = t.dtype.size();
        let w = (t.offset + e * es) / wb;
        let size = wb.min((t.buffer_size & !3) - w * wb);
        // The first element past the window, as an element of the tensor.
        let end = ((w + 1) * wb - t.offset).div_ceil(es);
        ((t.buffer, w * wb, size), end)
    };
    let mut table = StepTable::default();
    for (ti, (g, p)) in grads.iter().zip(params).enumerate() {
        if p.dtype != DType::F32 {
            return Err(ClipError::NotF32 {
                tensor: p.name(),
                dtype: p.dtype,
            });
        }
        let mut pieces = Vec::new();
        let mut e = 0;
        while e < g.len {
            let (gb, g_end) = binding(g, e);
            let (pb, p_end) = binding(p, e);
            let same = table.runs.last().is_some_and(|r: &StepRun| {
                r.grads == gb && r.params == pb && (r.state_len as u64) < run_cap
            });
            if !same {
                table.runs.push(StepRun {
                    grads: gb,
                    params: pb,
                    first_chunk: table.chunks.len() as u32,
                    n_chunks: 0,
                    state_len: 0,
                });
            }
            let ri = table.runs.len() - 1;
            let run = &mut table.runs[ri];
            let n = (g.len - e)
                .min(g_end - e)
                .min(p_end - e)
                .min(CHUNK_ELEMS)
                .min(run_cap - run.state_len as u64);
            let layout = layouts[ti];
            table.chunks.push(StepChunk {
                grad_start: ((g.offset + e * g.dtype.size() - gb.1) / g.dtype.size()) as u32,
                param_start: ((p.offset + 4 * e - pb.1) / 4) as u32,
                state_start: run.state_len,
                len: n as u32,
                dtype: g.dtype.shader_code(),
                tensor: ti as u32,
                index: e as u32,
                unit_first: layout.first,
                unit_div: layout.div,
                unit_count: layout.count,
                ..StepChunk::default()
            });
            match pieces.last_mut() {
                Some((r, _, _, count)) if *r == ri => *count += n,
                _ => pieces.push((ri, run.state_len as u64, e, n)),
            }
            run.n_chunks += 1;
            run.state_len += n as u32;
            e += n;
        }
        table.pieces.push(pieces);
    }
    Ok(table)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tensor(buffer: usize, offset: u64, len: u64, dtype: DType) -> PlanTensor<'static> {
        PlanTensor {
            buffer,
            buffer_size: 1 << 20,
            offset,
            len,
            dtype,
            label: None,
            index: buffer,
            base: 0,
        }
    }

    const WHOLE: UnitLayout = UnitLayout {
        first: 0,
        div: 1,
        count: 1,
    };

    fn limits(max_binding: u64) -> PlanLimits {
        PlanLimits {
            max_binding,
            offset_alignment: 256,
            max_workgroups_per_dim: 65535,
        }
    }

    /// Every element of every tensor is in exactly one row, at the right place of its
    /// windows, and rows never cross a window.
    fn check_cover(grads: &[PlanTensor], params: &[PlanTensor], t: &StepTable, wb: u64) {
        // Rows fill each run's state arrays back to back.
        for run in &t.runs {
            let rows = &t.chunks[run.first_chunk as usize..][..run.n_chunks as usize];
            let mut at = 0;
            for c in rows {
                assert_eq!(c.state_start, at);
                at += c.len;
            }
            assert_eq!(at, run.state_len);
        }
        for (ti, (g, p)) in grads.iter().zip(params).enumerate() {
            let mut next = 0;
            for run in &t.runs {
                let rows = &t.chunks[run.first_chunk as usize..][..run.n_chunks as usize];
                for c in rows.iter().filter(|c| c.tensor == ti as u32) {
                    assert_eq!(c.index as u64, next);
                    let gb = (run.grads.1 + c.grad_start as u64 * g.dtype.size()) - g.offset;
                    assert_eq!(gb / g.dtype.size(), next);
                    let pb = run.params.1 + c.param_start as u64 * 4 - p.offset;
                    assert_eq!(pb / 4, next);
                    let g_end = (c.grad_start + c.len) as u64 * g.dtype.size();
                    assert!(g_end <= run.grads.2 && run.grads.2 <= wb);
                    let p_end = (c.param_start + c.len) as u64 * 4;
                    assert!(p_end <= run.params.2 && run.params.2 <= wb);
                    next += c.len as u64;
                }
            }
            assert_eq!(next, g.len);
        }
    }

    #[test]
    fn rows_follow_both_window_layouts() {
        // 16-bit gradients and f32 parameters: the parameter windows come twice as often.
        let grads = [
            tensor(0, 0, 1000, DType::BF16),
            tensor(0, 2000, 3, DType::BF16),
            tensor(1, 512, 70_000, DType::F16),
        ];
        let params = [
            tensor(2, 0, 1000, DType::F32),
            tensor(2, 4000, 3, DType::F32),
            tensor(2, 4012, 70_000, DType::F32),
        ];
        let lim = limits(4096);
        let t = plan_step(&grads, &params, &[WHOLE; 3], 2, &lim).unwrap();
        check_cover(&grads, &params, &t, 4096);
        for run in &t.runs {
            assert!(run.state_len as u64 * 4 * 2 <= 4096);
        }
        let wide = plan_step(&grads, &params, &[WHOLE; 3], 3, &limits(1 << 30)).unwrap();
        check_cover(&grads, &params, &wide, 1 << 30);
        // One gradient buffer per run at most: two runs, the third tensor in chunks.
        assert_eq!(wide.runs.len(), 2);
        assert_eq!(wide.chunks.len(), 2 + 2);
        assert_eq!(wide.pieces[2], vec![(1, 0, 0, 70_000)]);
    }

    #[test]
    fn parameters_must_be_f32() {
        let grads = [tensor(0, 0, 100, DType::F32)];
        let params = [tensor(1, 0, 100, DType::BF16)];
        let e = plan_step(&grads, &params, &[WHOLE], 1, &limits(1 << 20)).unwrap_err();
        assert!(matches!(e, ClipError::NotF32 { .. }));
    }
}
