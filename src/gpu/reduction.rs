//! The engine's `reduce` and first `combine` on the GPU: the norm of every unit of a
//! planned batch (`norm_reduce` over chunks, then `norm_combine` over each unit's
//! partials).

use super::kernels::Kernels;
use super::resources::{
    bind, storage_zeroed, table, whole, window_groups, ChunkTable, DispatchParams, DispatchSlots,
    StepSlots,
};
use crate::plan::{fold_grid, Plan, Window};
use crate::shaders::abi::ACC_BYTES;
use crate::shaders::BindLayout;

/// The engine-wide bindings of a pass over chunk windows: the step's parameter slots,
/// and the coefficients and reports a rewrite reads.
pub(crate) type Shared<'a> = (&'a StepSlots, &'a wgpu::Buffer, &'a wgpu::Buffer);

/// The bind group (layout `Window`) and grid of each binding window of `buffers`, for the
/// reduce over a chunk table (`tables`: the table, one partial per chunk, each window's
/// slice) and the rewrite over the same chunks; `count`: a window's chunks in the table.
pub(crate) fn chunk_windows(
    device: &wgpu::Device,
    kernels: &Kernels,
    windows: &[Window],
    buffers: &[&wgpu::Buffer],
    (chunks, partials, slots): (&ChunkTable, &wgpu::Buffer, &DispatchSlots),
    (step, coefs, reports): Shared<'_>,
    count: impl Fn(&Window) -> u32,
) -> Vec<(wgpu::BindGroup, [u32; 3])> {
    let max_dim = device.limits().max_compute_workgroups_per_dimension;
    let layout = kernels.layout(BindLayout::Window);
    let groups = window_groups(device, layout, windows, buffers, |wi| {
        vec![
            (1, whole(&chunks.buffer)),
            (2, whole(partials)),
            (3, step.binding()),
            (4, slots.slot(wi)),
            (5, whole(coefs)),
            (6, whole(reports)),
        ]
    });
    (groups.into_iter().zip(windows))
        .map(|(group, w)| (group, fold_grid(count(w), max_dim)))
        .collect()
}

/// Segment norms of one plan, with every resource created up front.
pub(crate) struct SegmentReduction {
    /// Per binding window: bind group and grid; `None` until made for where the tensors
    /// lie now (an engine with spans makes them when a step first needs them).
    reduce: Option<Vec<(wgpu::BindGroup, [u32; 3])>>,
    combine: wgpu::BindGroup,
    combine_grid: [u32; 3],
    /// The chunk table (`Chunk` rows), also read by the segment-wise elementwise pass.
    pub chunks: ChunkTable,
    /// One accumulator per chunk.
    pub partials: wgpu::Buffer,
    /// One accumulator per segment, in segment order.
    pub segment_accs: wgpu::Buffer,
    /// Dispatch slots: one per window (its slice of the chunk table), then the combine.
    pub slots: DispatchSlots,
    pub n_chunks: usize,
}

impl SegmentReduction {
    /// Resources for `plan` over `buffers`, with the engine's `shared` bindings (its window
    /// bind groups serve the reduce and a rewrite over its chunks).
    pub(crate) fn new(
        device: &wgpu::Device,
        kernels: &Kernels,
        plan: &Plan,
        buffers: &[&wgpu::Buffer],
        shared: Shared<'_>,
    ) -> SegmentReduction {
        let step = shared.0;
        let max_dim = device.limits().max_compute_workgroups_per_dimension;
        let n_segments = plan.segment_ranges.len();
        let n_chunks = plan.reduce_chunks.len();
        // Rewritten in place when the tensors move within their buffers.
        let chunks = ChunkTable::new(device, "gradclip chunks", &plan.reduce_chunks);
        let ranges = table(device, "gradclip segment ranges", &plan.segment_ranges);
        let partials = storage_zeroed(
            device,
            "gradclip partials",
            n_chunks as u64 * ACC_BYTES,
            wgpu::BufferUsages::empty(),
        );
        let segment_accs = storage_zeroed(
            device,
            "gradclip segment norms",
            n_segments as u64 * ACC_BYTES,
            // Read back and written by a sharded step's exchange.
            wgpu::BufferUsages::COPY_SRC | wgpu::BufferUsages::COPY_DST,
        );
        let mut params: Vec<DispatchParams> = plan
            .windows
            .iter()
            .map(|w| DispatchParams::range(w.reduce_first, w.reduce_count))
            .collect();
        params.push(DispatchParams::range(0, n_segments as u32));
        let slots = DispatchSlots::new(device, &params);
        let layout = kernels.layout(BindLayout::Combine);
        let combine = bind(
            device,
            layout,
            &[
                (0, whole(&partials)),
                (1, whole(&ranges)),
                (2, whole(&segment_accs)),
                (3, step.binding()),
                (4, slots.slot(plan.windows.len())),
            ],
        );
        let mut reduction = SegmentReduction {
            reduce: None,
            combine,
            combine_grid: fold_grid(n_segments as u32, max_dim),
            chunks,
            partials,
            segment_accs,
            slots,
            n_chunks,
        };
        let groups = reduction.window_groups(device, kernels, &plan.windows, buffers, shared);
        reduction.reduce = Some(groups);
        reduction
    }

    /// The bind group and grid of each binding window (of `buffers`), for the reduce over
    /// this reduction's chunks and a rewrite over them: the only bind groups of a
    /// reduction that hold the caller's buffers, made anew when the tensors move to
    /// other buffers.
    pub(crate) fn window_groups(
        &self,
        device: &wgpu::Device,
        kernels: &Kernels,
        windows: &[Window],
        buffers: &[&wgpu::Buffer],
        shared: Shared<'_>,
    ) -> Vec<(wgpu::BindGroup, [u32; 3])> {
        let tables = (&self.chunks, &self.partials, &self.slots);
        let count = |w: &Window| w.reduce_count;
        chunk_windows(device, kernels, windows, buffers, tables, shared, count)
    }

    /// The window bind groups and grids, for a pass over this reduction's chunks (none
    /// while they are not made).
    pub(crate) fn windows(&self) -> &[(wgpu::BindGroup, [u32; 3])] {
        self.reduce.as_deref().unwrap_or_default()
    }

    /// Whether the window bind groups are made for where the tensors lie now.
    pub(crate) fn has_windows(&self) -> bool {
        self.reduce.is_some()
    }

    /// Takes the window bind groups made by [`SegmentReduction::window_groups`].
    /// `None` leaves them to be made when needed.
    pub(crate) fn set_window_groups(&mut self, groups: Option<Vec<(wgpu::BindGroup, [u32; 3])>>) {
        self.reduce = groups;
    }

    /// Records the chunk partials with the step slot at `slot` by pipeline `reduce`, then,
    /// with a `combine` pipeline, their combine into one accumulator per unit.
    pub(crate) fn encode(
        &self,
        pass: &mut wgpu::ComputePass<'_>,
        (reduce, combine): (&wgpu::ComputePipeline, Option<&wgpu::ComputePipeline>),
        slot: u32,
    ) {
        pass.set_pipeline(reduce);
        for (group, grid) in self.windows().iter().filter(|(_, g)| g[0] > 0) {
            pass.set_bind_group(0, group, &[slot]);
            pass.dispatch_workgroups(grid[0], grid[1], 1);
        }
        if let (Some(combine), true) = (combine, self.combine_grid[0] > 0) {
            pass.set_pipeline(combine);
            pass.set_bind_group(0, &self.combine, &[slot]);
            pass.dispatch_workgroups(self.combine_grid[0], self.combine_grid[1], 1);
        }
    }
}
