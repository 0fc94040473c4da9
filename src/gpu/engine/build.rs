//! Planning an engine: its program over the caller's buffers, and every device resource
//! (tables, bind groups, state, readback pool) made once.

use std::sync::Arc;

use crate::chain::{Program, NO_GROUP};
use crate::error::ClipError;
use crate::gpu::context::{guarded, GpuContext};
use crate::gpu::readback::{ReadbackLayout, ReportPool, REPORT_BYTES};
use crate::gpu::reduction::{chunk_windows, SegmentReduction};
use crate::gpu::resources::{
    bind, storage_init, storage_zeroed, table, whole, ChunkTable, DispatchParams, DispatchSlots,
    StepSlots,
};
use crate::gpu::tensor::{plan_tensors, GpuTensor};
use crate::plan::{fold_grid, ChunkRow, Plan};
use crate::recording::Profile;
use crate::shaders::abi::{StageRow, ACC_BYTES};
use crate::shaders::BindLayout;

use super::{Engine, GpuStage, Placement, Spans};
use crate::plan::Window;

/// The `Coef` bind group of one stage and dispatch slot.
struct CoefBinding<'a> {
    state: &'a wgpu::Buffer,
    reports: &'a wgpu::Buffer,
    slots: &'a StepSlots,
    dispatch: &'a DispatchSlots,
    stage_params: &'a wgpu::Buffer,
    coefs: &'a wgpu::Buffer,
    w_accs: &'a wgpu::Buffer,
    /// The gradients' unit norms: the first stage's `finish` reads the flags of the units
    /// it leaves alone.
    units: &'a wgpu::Buffer,
}

impl CoefBinding<'_> {
    fn bind(
        &self,
        device: &wgpu::Device,
        layout: &wgpu::BindGroupLayout,
        inputs: &wgpu::Buffer,
        thresholds: &wgpu::Buffer,
        group_of: &wgpu::Buffer,
        slot: usize,
    ) -> wgpu::BindGroup {
        bind(
            device,
            layout,
            &[
                (0, whole(inputs)),
                (1, whole(self.state)),
                (2, whole(self.reports)),
                (3, self.slots.binding()),
                (4, self.dispatch.slot(slot)),
                (5, whole(self.stage_params)),
                (6, whole(thresholds)),
                (7, whole(self.coefs)),
                (8, whole(group_of)),
                (9, whole(self.w_accs)),
                (10, whole(self.units)),
            ],
        )
    }
}

impl Engine {
    /// Plans `program` over `grads` (and, for AGC, `params`, tensor for tensor); `noise`:
    /// its steps may add noise. Errors create nothing and touch no buffer.
    pub(crate) fn new(
        ctx: &GpuContext,
        grads: &[GpuTensor<'_>],
        params: Option<&[GpuTensor<'_>]>,
        program: Program,
        noise: bool,
    ) -> Result<Engine, ClipError> {
        Self::build(ctx, grads, params, program, noise, None)
    }

    /// This engine's program planned over new buffer ranges of the same tensors; the
    /// device state, the readback pool and the timestamp writes are shared, not copied,
    /// so steps go on from where this one's left off.
    pub(crate) fn rebound(
        &self,
        grads: &[GpuTensor<'_>],
        params: Option<&[GpuTensor<'_>]>,
        noise: bool,
    ) -> Result<Engine, ClipError> {
        let kept = (self.state.clone(), self.pool.clone());
        let program = self.program.clone();
        let mut engine = Self::build(&self.ctx, grads, params, program, noise, Some(kept))?;
        engine.timestamps = self.timestamps.clone();
        Ok(engine)
    }

    /// Moves this engine onto new ranges of the same tensors in place when the move keeps
    /// the shape of everything placed (as many binding windows, the same chunks per window
    /// and per unit; the windows may lie in other buffers or at other byte ranges):
    /// then the chunk tables are written on the queue, which orders the writes after the
    /// steps already submitted and before the next, and where tensors moved to other
    /// buffers only the bind groups of the windows over the caller's buffers are made
    /// anew. Returns `false`, with nothing changed, when the shape differs (the caller
    /// plans anew). The caller must know that every step it encoded was submitted.
    pub(crate) fn moved_in_place(
        &mut self,
        grads: &[GpuTensor<'_>],
        params: Option<&[GpuTensor<'_>]>,
    ) -> Result<bool, ClipError> {
        let program = &self.program;
        let (grad_plan, grad_buffers) =
            plan_tensors(&self.ctx, grads, &program.bases, |_| program.units.clone())?;
        let param_plan = params
            .map(|p| plan_tensors(&self.ctx, p, &program.bases, |_| program.units.clone()))
            .transpose()?;
        let placed = Placement::of(&grad_plan, &grad_buffers, param_plan.as_ref());
        if !placed.same_shape(&self.placed) {
            return Ok(false);
        }
        let ctx = self.ctx.clone();
        let (device, kernels) = (&ctx.inner.device, &ctx.inner.kernels);
        // The new bind groups first: a buffer wgpu refuses fails here, with nothing changed.
        // Bind groups hold the windows' buffers and byte ranges.
        let moved = |now: &(PlanShape, Vec<wgpu::Buffer>), was: &(PlanShape, Vec<wgpu::Buffer>)| {
            let range = |w: &Window| (w.buffer, w.byte_offset, w.byte_size);
            now.1 != was.1
                || !now
                    .0
                    .windows
                    .iter()
                    .map(range)
                    .eq(was.0.windows.iter().map(range))
        };
        let grads_moved = moved(&placed.grads, &self.placed.grads);
        let params_moved = match (&placed.params, &self.placed.params) {
            (Some(now), Some(was)) => moved(now, was),
            _ => false,
        };
        let shared = (&self.slots, &self.coef_buf, &self.reports);
        let groups = guarded(device, || {
            // With spans, most steps reduce and rewrite the spans only: the per-unit
            // reduce's groups wait for a step that needs them.
            let grads = grads_moved.then(|| match self.span_groups(&grad_plan, &grad_buffers) {
                Some(spans) => (None, Some(spans)),
                None => {
                    let windows = &grad_plan.windows;
                    let reduce =
                        (self.grads).window_groups(device, kernels, windows, &grad_buffers, shared);
                    (Some(reduce), None)
                }
            });
            let params = match (&self.params, &param_plan) {
                (Some(red), Some((plan, bufs))) if params_moved => {
                    Some(red.window_groups(device, kernels, &plan.windows, bufs, shared))
                }
                _ => None,
            };
            Ok((grads, params))
        })?;
        // Only the rows of the tensors that moved are written.
        let queue = &ctx.inner.queue;
        let param_rows = param_plan.as_ref().map(|(plan, _)| plan);
        let patched = guarded(device, || {
            self.each_table(&grad_plan, param_rows, |t, rows| t.patch(queue, rows));
            Ok(())
        });
        if let Err(e) = patched {
            // Some writes may have gone through: the old rows go back, so the engine stays
            // where it was.
            guarded(device, || {
                self.each_table(&grad_plan, param_rows, |t, rows| t.restore(queue, rows));
                Ok(())
            })?;
            return Err(e);
        }
        self.each_table(&grad_plan, param_rows, |t, rows| t.keep(rows));
        let (grad_groups, param_groups) = groups;
        if let Some((reduce, spans)) = grad_groups {
            self.grads.set_window_groups(reduce);
            if let Some(groups) = spans {
                self.set_span_groups(groups);
            }
        }
        if let (Some(red), Some(groups)) = (&mut self.params, param_groups) {
            red.set_window_groups(Some(groups));
        }
        self.shared_words = shares_words(&grad_plan, self.spans.is_some());
        self.placed = placed;
        Ok(true)
    }

    fn build(
        ctx: &GpuContext,
        grads: &[GpuTensor<'_>],
        params: Option<&[GpuTensor<'_>]>,
        program: Program,
        noise: bool,
        kept: Option<(wgpu::Buffer, Arc<ReportPool>)>,
    ) -> Result<Engine, ClipError> {
        let (grad_plan, grad_buffers) =
            plan_tensors(ctx, grads, &program.bases, |_| program.units.clone())?;
        let param_plan = params
            .map(|p| plan_tensors(ctx, p, &program.bases, |_| program.units.clone()))
            .transpose()?;
        guarded(&ctx.inner.device, || {
            Self::allocate(
                ctx,
                (grad_plan, grad_buffers),
                param_plan,
                program,
                noise,
                kept,
            )
        })
    }

    /// The device resources of a planned engine (inside [`guarded`]).
    fn allocate(
        ctx: &GpuContext,
        (grad_plan, grad_buffers): (Plan, Vec<&wgpu::Buffer>),
        param_plan: Option<(Plan, Vec<&wgpu::Buffer>)>,
        program: Program,
        noise: bool,
        kept: Option<(wgpu::Buffer, Arc<ReportPool>)>,
    ) -> Result<Engine, ClipError> {
        let device = &ctx.inner.device;
        let kernels = &ctx.inner.kernels;
        let max_dim = device.limits().max_compute_workgroups_per_dimension;
        let slots = StepSlots::new(device);
        let n_units = program.units.len();
        let n_stages = program.stages.len();
        let reports = storage_zeroed(
            device,
            "gradclip reports",
            n_stages as u64 * REPORT_BYTES,
            wgpu::BufferUsages::COPY_SRC | wgpu::BufferUsages::COPY_DST,
        );
        let coef_buf = storage_zeroed(
            device,
            "gradclip coefficients",
            n_units as u64 * 4,
            wgpu::BufferUsages::COPY_SRC,
        );
        let shared = (&slots, &coef_buf, &reports);
        let grads_red = SegmentReduction::new(device, kernels, &grad_plan, &grad_buffers, shared);
        let params_red = param_plan
            .as_ref()
            .map(|(plan, bufs)| SegmentReduction::new(device, kernels, plan, bufs, shared));
        let (state, pool) = kept.unzip();
        let state = state.unwrap_or_else(|| {
            storage_init(
                device,
                "gradclip state",
                bytemuck::cast_slice(&program.fresh_state().words),
                wgpu::BufferUsages::COPY_SRC | wgpu::BufferUsages::COPY_DST,
            )
        });
        let stage_rows: Vec<StageRow> = (program.stages.iter())
            .map(|s| StageRow {
                rule: s.params,
                adaptive: s.adaptive,
                formula: s.formula as u32,
                state_base: s.state_base as u32,
                global: s.is_global() as u32,
                threshold: s.thresholds.first().copied().unwrap_or(0.0),
            })
            .collect();
        let stage_params = table(device, "gradclip stage params", &stage_rows);
        // One coefficient for everything and no noise (which needs each element's tensor and
        // index): the rewrite runs over spans, maximal runs of touching tensors, so small
        // tensors share workgroups and no word has two writers.
        let profile = Profile::of(&program, noise);
        let (single_global, spans) = (profile.single_global(), profile.spans());
        // Dispatch parameters: per stage its groups and finish, its coefs, and its finish
        // that runs the global stages after it too (`Profile::run`); then the finish of a
        // single global stage straight from the chunk partials.
        let mut dispatch = Vec::new();
        for (k, st) in program.stages.iter().enumerate() {
            let stage = DispatchParams {
                first: (k == 0) as u32,
                stage: k as u32,
                count: 1,
                units: n_units as u32,
                ..DispatchParams::default()
            };
            let groups = DispatchParams {
                n_chunks: st.group_ranges.len() as u32,
                ..stage
            };
            let coefs = DispatchParams {
                n_chunks: n_units as u32,
                ..stage
            };
            let run = DispatchParams {
                count: profile.run(k) as u32,
                ..groups
            };
            dispatch.extend([groups, coefs, run]);
        }
        // The finish of a single global stage straight from the chunk partials: of the spans
        // when there are spans, else of the unit chunks.
        let direct_chunks = if spans {
            grad_plan.apply_chunks.len()
        } else {
            grads_red.n_chunks
        };
        dispatch.push(DispatchParams {
            n_chunks: direct_chunks as u32,
            first: 1,
            count: 1,
            units: n_units as u32,
            ..DispatchParams::default()
        });
        let dispatch = DispatchSlots::new(device, &dispatch);
        let coef_binding = CoefBinding {
            state: &state,
            reports: &reports,
            slots: &slots,
            dispatch: &dispatch,
            stage_params: &stage_params,
            coefs: &coef_buf,
            w_accs: params_red
                .as_ref()
                .map_or(&grads_red.segment_accs, |p| &p.segment_accs),
            units: &grads_red.segment_accs,
        };
        let coef_layout = kernels.layout(BindLayout::Coef);
        let placed = Placement::of(&grad_plan, &grad_buffers, param_plan.as_ref());
        // A step that needs no unit norms reduces the spans: small tensors share chunks.
        let span_chunks = spans.then(|| {
            let ranges: Vec<DispatchParams> = (grad_plan.windows.iter())
                .map(|w| DispatchParams::range(w.apply_first, w.apply_count))
                .collect();
            Spans {
                chunks: ChunkTable::new(device, "gradclip span chunks", &grad_plan.apply_chunks),
                slots: DispatchSlots::new(device, &ranges),
                partials: storage_zeroed(
                    device,
                    "gradclip span partials",
                    grad_plan.apply_chunks.len() as u64 * ACC_BYTES,
                    wgpu::BufferUsages::empty(),
                ),
                reduce: Vec::new(),
            }
        });
        let mut finish_partials = None;
        let mut stages = Vec::with_capacity(n_stages);
        for (k, st) in program.stages.iter().enumerate() {
            let n_groups = st.group_ranges.len();
            let shared = k == 0 && st.is_identity();
            let group_accs = if shared {
                grads_red.segment_accs.clone()
            } else {
                storage_zeroed(
                    device,
                    "gradclip group norms",
                    n_groups as u64 * ACC_BYTES,
                    wgpu::BufferUsages::COPY_SRC,
                )
            };
            let groups = (!shared).then(|| {
                let ranges = table(device, "gradclip group ranges", &st.group_ranges);
                let members = table(device, "gradclip group members", &st.members);
                let group = bind(
                    device,
                    kernels.layout(BindLayout::Groups),
                    &[
                        (0, whole(&grads_red.segment_accs)),
                        (1, whole(&ranges)),
                        (2, whole(&group_accs)),
                        (3, slots.binding()),
                        (4, dispatch.slot(3 * k)),
                        (5, whole(&members)),
                        (6, whole(&coef_buf)),
                    ],
                );
                (group, fold_grid(n_groups as u32, max_dim))
            });
            let thresholds = table(device, "gradclip thresholds", &st.thresholds);
            // Padded with NO_GROUP (tables are at least 16 bytes): `finish` scans it whole.
            let mut padded = st.group_of.clone();
            padded.resize(padded.len().max(4), NO_GROUP);
            let group_of = table(device, "gradclip group of unit", &padded);
            let binding = |inputs: &wgpu::Buffer, slot| {
                coef_binding.bind(device, coef_layout, inputs, &thresholds, &group_of, slot)
            };
            if single_global {
                let partials = span_chunks
                    .as_ref()
                    .map_or(&grads_red.partials, |s| &s.partials);
                finish_partials = Some(binding(partials, 3 * n_stages));
            }
            stages.push(GpuStage {
                finish: binding(&group_accs, 3 * k),
                coefs: binding(&group_accs, 3 * k + 1),
                run: profile
                    .opens_run(k)
                    .then(|| binding(&group_accs, 3 * k + 2)),
                groups,
                group_accs,
            });
        }
        let shared_words = shares_words(&grad_plan, spans);
        let layout = ReadbackLayout::of(&program);
        let mut engine = Engine {
            ctx: ctx.clone(),
            grads: grads_red,
            params: params_red,
            stages,
            profile,
            finish_partials,
            spans: span_chunks,
            coefs_grid: fold_grid((n_units as u32).div_ceil(64), max_dim),
            shared_words,
            placed,
            slots,
            state,
            reports,
            coef_buf,
            pool: pool.unwrap_or_else(|| ReportPool::new(&ctx.inner.device, layout.size())),
            layout,
            timestamps: None,
            recorded: Default::default(),
            program,
        };
        if let Some(groups) = engine.span_groups(&grad_plan, &grad_buffers) {
            engine.set_span_groups(groups);
        }
        Ok(engine)
    }

    /// The bind group and grid of each binding window of `plan` over `buffers` for the
    /// reduce and the rewrite over spans, when the engine has spans (else the gradients'
    /// reduction's serve the rewrite).
    fn span_groups(
        &self,
        plan: &Plan,
        buffers: &[&wgpu::Buffer],
    ) -> Option<Vec<(wgpu::BindGroup, [u32; 3])>> {
        let (device, kernels) = (&self.ctx.inner.device, &self.ctx.inner.kernels);
        let spans = self.spans.as_ref()?;
        let tables = (&spans.chunks, &spans.partials, &spans.slots);
        let shared = (&self.slots, &self.coef_buf, &self.reports);
        let count = |w: &Window| w.apply_count;
        Some(chunk_windows(
            device,
            kernels,
            &plan.windows,
            buffers,
            tables,
            shared,
            count,
        ))
    }

    /// Calls `f` on each chunk table with its rows in the gradients' plan `grads` and the
    /// parameters' `params`.
    fn each_table(
        &mut self,
        grads: &Plan,
        params: Option<&Plan>,
        mut f: impl FnMut(&mut ChunkTable, &[ChunkRow]),
    ) {
        f(&mut self.grads.chunks, &grads.reduce_chunks);
        if let Some(spans) = &mut self.spans {
            f(&mut spans.chunks, &grads.apply_chunks);
        }
        if let (Some(red), Some(plan)) = (&mut self.params, params) {
            f(&mut red.chunks, &plan.reduce_chunks);
        }
    }

    /// Makes the gradients' per-unit reduce groups where a move left them to be made when
    /// a step needs them (an engine with spans), inside error scopes.
    pub(super) fn make_unit_windows(&mut self) -> Result<(), ClipError> {
        if self.grads.has_windows() {
            return Ok(());
        }
        let (device, kernels) = (&self.ctx.inner.device, &self.ctx.inner.kernels);
        let (shape, buffers) = &self.placed.grads;
        let buffers: Vec<&wgpu::Buffer> = buffers.iter().collect();
        let shared = (&self.slots, &self.coef_buf, &self.reports);
        let groups = guarded(device, || {
            Ok((self.grads).window_groups(device, kernels, &shape.windows, &buffers, shared))
        })?;
        self.grads.set_window_groups(Some(groups));
        Ok(())
    }

    /// Takes the bind groups made by [`Engine::span_groups`].
    fn set_span_groups(&mut self, groups: Vec<(wgpu::BindGroup, [u32; 3])>) {
        if let Some(spans) = &mut self.spans {
            spans.reduce = groups;
        }
    }

    /// The bind groups and grids of the rewrite, one per binding window: the span
    /// reduce's when there are spans, else the gradients' reduction's.
    pub(super) fn rewrite_windows(&self) -> &[(wgpu::BindGroup, [u32; 3])] {
        match &self.spans {
            Some(spans) => &spans.reduce,
            None => self.grads.windows(),
        }
    }
}

/// Whether a 16-bit unit chunk of `plan` is strided or starts or ends mid-word, sharing a
/// word with another unit (spans never do: a half outside a span has no writer).
fn shares_words(plan: &Plan, spans: bool) -> bool {
    !spans
        && plan.reduce_chunks.iter().any(|c| {
            let half = c[3] != crate::shaders::abi::DTYPE_F32;
            half && (c[4] != 1 || c[1] % 2 == 1 || c[2] % 2 == 1)
        })
}

impl Placement {
    /// Whether `self` and `other` have the same shape, wherever their buffers are.
    /// (The windows may lie elsewhere: their bind groups are made anew.)
    fn same_shape(&self, other: &Placement) -> bool {
        let same = |a: &PlanShape, b: &PlanShape| {
            let counts =
                |w: &Window| (w.reduce_first, w.reduce_count, w.apply_first, w.apply_count);
            a.segment_ranges == b.segment_ranges
                && a.kinds == b.kinds
                && a.windows
                    .iter()
                    .map(counts)
                    .eq(b.windows.iter().map(counts))
        };
        same(&self.grads.0, &other.grads.0)
            && match (&self.params, &other.params) {
                (Some(a), Some(b)) => same(&a.0, &b.0),
                (a, b) => a.is_none() && b.is_none(),
            }
    }

    /// The placement of a gradients' plan over `buffers` and, for AGC, the parameters'.
    fn of(
        grads: &Plan,
        buffers: &[&wgpu::Buffer],
        params: Option<&(Plan, Vec<&wgpu::Buffer>)>,
    ) -> Placement {
        let shape = |plan: &Plan| PlanShape {
            windows: plan.windows.clone(),
            segment_ranges: plan.segment_ranges.clone(),
            kinds: (plan.reduce_chunks.iter().chain(&plan.apply_chunks))
                .map(|c| [c[3], c[4]])
                .collect(),
        };
        let bufs = |b: &[&wgpu::Buffer]| b.iter().map(|&b| b.clone()).collect::<Vec<_>>();
        Placement {
            grads: (shape(grads), bufs(buffers)),
            params: params.map(|(plan, b)| (shape(plan), bufs(b))),
        }
    }
}

/// What the bind groups, dispatch sizes, table sizes and kernels of one plan depend on:
/// its windows (buffer, byte range, chunks), its units' chunk ranges, and each chunk's
/// element type and stride.
#[derive(Debug, PartialEq)]
pub(crate) struct PlanShape {
    windows: Vec<Window>,
    segment_ranges: Vec<[u32; 2]>,
    kinds: Vec<[u32; 2]>,
}
