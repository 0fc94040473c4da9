//! The one GPU engine. A program (units, groups, thresholds and formula: [`Layout`]) is
//! planned once over caller-owned buffers; each step is then encoded as the same fixed
//! stages in one compute pass, with no host round trip:
//!
//! 1. `reduce`  (`norm_reduce.wgsl`): one partial norm per chunk of every unit, from one
//!    read of the gradients (and of the parameters for AGC);
//! 2. `combine` (`norm_combine.wgsl`): partials into unit norms, units into groups;
//! 3. `coef`    (`coef.wgsl`): the total norm, the non-finite policy, the adaptive state,
//!    one coefficient per unit, and the rewrite's indirect arguments;
//! 4. `rewrite` (`rewrite.wgsl`): the fused elementwise pass, zero workgroups when nothing
//!    must change;
//! 5. the report copy into a pooled readback buffer.
//!
//! Every configuration (a global-norm clip, the split API, a value clip, each rule,
//! accumulation, per-example clipping) is a program plus a [`Step`] saying which stages
//! run. Each step's host values go into its own parameter slot ([`StepSlots`]), so steps
//! encoded before one submission keep their own parameters. The CPU twin is
//! `src/cpu/engine.rs`.

use std::sync::Arc;

use super::batch::{plan_tensors, GpuTensor};
use super::context::GpuContext;
use super::readback::ReportPool;
use super::reduction::SegmentReduction;
use super::resources::{
    bind, storage_init, storage_zeroed, whole, window, DispatchParams, DispatchSlots, StepParams,
    StepSlots,
};
use crate::error::ClipError;
use crate::norm::Norm;
use crate::plan::fold_grid;
use crate::policies::{Formula, Layout};
use crate::shaders::abi::{StepReport, ACC_BYTES};
use crate::shaders::{BindLayout, Kernel};

/// Bytes of the report header.
pub(crate) const REPORT_BYTES: u64 = std::mem::size_of::<StepReport>() as u64;

/// Which stages one step runs, with its parameters.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Step {
    /// Norm order (selects the pipelines).
    pub norm: Norm,
    /// Host values of the step (`seq` is filled in by the engine).
    pub params: StepParams,
    /// Run `reduce` and `combine` (not for a given norm or a step without a norm rule).
    pub reduce: bool,
    /// Run `coef`'s per-unit entry.
    pub coefs: bool,
    /// Run `rewrite`.
    pub rewrite: bool,
    /// Read back group norms, unit norms and coefficients after the header.
    pub units: bool,
    /// Copy the report into a readback buffer at all.
    pub readback: bool,
}

/// A program planned on one device, encoded step after step.
pub(crate) struct Engine {
    ctx: GpuContext,
    layout: Layout,
    grads: SegmentReduction,
    params: Option<SegmentReduction>,
    /// Units into groups, unless every unit is its own group.
    groups: Option<(wgpu::BindGroup, [u32; 3])>,
    group_accs: wgpu::Buffer,
    finish_groups: wgpu::BindGroup,
    /// Global programs whose unit norms nobody reads: the total straight from the chunk
    /// partials, without the per-unit combine.
    finish_partials: Option<wgpu::BindGroup>,
    coefs: wgpu::BindGroup,
    coefs_grid: [u32; 3],
    /// Per binding window of the gradients: bind group and offset of its indirect args.
    rewrites: Vec<(wgpu::BindGroup, u64)>,
    args_out: wgpu::Buffer,
    slots: StepSlots,
    state: wgpu::Buffer,
    report: wgpu::Buffer,
    coef_buf: wgpu::Buffer,
    pool: Arc<ReportPool>,
    seq: u32,
    timestamps: Option<(wgpu::QuerySet, u32, u32)>,
}

impl Engine {
    /// Plans `layout` over `grads` (and, for AGC, `params`, tensor for tensor); `state_words`
    /// is the size of the device state. Errors create nothing and touch no buffer.
    pub(crate) fn new(
        ctx: &GpuContext,
        grads: &[GpuTensor<'_>],
        params: Option<&[GpuTensor<'_>]>,
        layout: Layout,
        state_words: usize,
    ) -> Result<Engine, ClipError> {
        let (grad_plan, grad_buffers) = plan_tensors(ctx, grads, |_| layout.segments.clone())?;
        let param_plan = params
            .map(|p| plan_tensors(ctx, p, |_| layout.segments.clone()))
            .transpose()?;
        let device = &ctx.inner.device;
        let kernels = &ctx.inner.kernels;
        let scope = device.push_error_scope(wgpu::ErrorFilter::Validation);
        let max_dim = device.limits().max_compute_workgroups_per_dimension;
        let slots = StepSlots::new(device);
        let grads_red = SegmentReduction::new(device, kernels, &grad_plan, &grad_buffers, &slots);
        let params_red = param_plan
            .as_ref()
            .map(|(plan, bufs)| SegmentReduction::new(device, kernels, plan, bufs, &slots));
        let n_units = layout.segments.len();
        let n_groups = layout.group_ranges.len();
        let identity = n_groups == n_units
            && layout
                .group_of
                .iter()
                .enumerate()
                .all(|(s, &g)| g as usize == s);
        let global = n_groups == 1 && layout.formula == Formula::PyTorch;
        let dispatch = DispatchSlots::new(
            device,
            &[
                DispatchParams::range(0, n_groups as u32),
                DispatchParams {
                    global: global as u32,
                    ..DispatchParams::range(0, n_units as u32)
                },
                DispatchParams::range(0, grads_red.n_chunks as u32),
            ],
        );
        let group_accs = if identity {
            grads_red.segment_accs.clone()
        } else {
            storage_zeroed(
                device,
                "gradclip group norms",
                n_groups as u64 * ACC_BYTES,
                wgpu::BufferUsages::COPY_SRC,
            )
        };
        let groups = (!identity).then(|| {
            let ranges = storage_init(
                device,
                "gradclip group ranges",
                bytemuck::cast_slice(&layout.group_ranges),
                wgpu::BufferUsages::empty(),
            );
            let group = bind(
                device,
                kernels.layout(BindLayout::Reduce),
                &[
                    (0, whole(&grads_red.segment_accs)),
                    (1, whole(&ranges)),
                    (2, whole(&group_accs)),
                    (3, slots.binding()),
                    (4, dispatch.slot(0)),
                ],
            );
            (group, fold_grid(n_groups as u32, max_dim))
        });
        let state = storage_zeroed(
            device,
            "gradclip state",
            state_words as u64 * 4,
            wgpu::BufferUsages::COPY_SRC | wgpu::BufferUsages::COPY_DST,
        );
        let report = storage_zeroed(
            device,
            "gradclip report",
            REPORT_BYTES,
            wgpu::BufferUsages::COPY_SRC,
        );
        let coef_buf = storage_zeroed(
            device,
            "gradclip coefficients",
            n_units as u64 * 4,
            wgpu::BufferUsages::COPY_SRC,
        );
        let thresholds = storage_init(
            device,
            "gradclip thresholds",
            bytemuck::cast_slice(&layout.thresholds),
            wgpu::BufferUsages::empty(),
        );
        let group_of = storage_init(
            device,
            "gradclip group of unit",
            bytemuck::cast_slice(&layout.group_of),
            wgpu::BufferUsages::empty(),
        );
        let rewrite_grids: Vec<[u32; 3]> = grad_plan
            .windows
            .iter()
            .map(|w| fold_grid(w.reduce_count, max_dim))
            .collect();
        let args_full = storage_init(
            device,
            "gradclip rewrite grid",
            bytemuck::cast_slice(&rewrite_grids),
            wgpu::BufferUsages::empty(),
        );
        let args_out = storage_zeroed(
            device,
            "gradclip rewrite indirect",
            rewrite_grids.len() as u64 * 12,
            wgpu::BufferUsages::INDIRECT,
        );
        let w_accs = params_red
            .as_ref()
            .map_or(&grads_red.segment_accs, |p| &p.segment_accs);
        let coef_bind = |inputs: &wgpu::Buffer, slot: usize| {
            bind(
                device,
                kernels.layout(BindLayout::Coef),
                &[
                    (0, whole(inputs)),
                    (1, whole(&state)),
                    (2, whole(&report)),
                    (3, slots.binding()),
                    (4, dispatch.slot(slot)),
                    (6, whole(&thresholds)),
                    (7, whole(&coef_buf)),
                    (8, whole(&group_of)),
                    (9, whole(w_accs)),
                    (10, whole(&args_full)),
                    (11, whole(&args_out)),
                ],
            )
        };
        let finish_groups = coef_bind(&group_accs, 0);
        let coefs = coef_bind(&group_accs, 1);
        let finish_partials = global.then(|| coef_bind(&grads_red.partials, 2));
        let rewrites = grad_plan
            .windows
            .iter()
            .enumerate()
            .map(|(wi, w)| {
                let group = bind(
                    device,
                    kernels.layout(BindLayout::Rewrite),
                    &[
                        (0, window(grad_buffers[w.buffer], w)),
                        (1, whole(&grads_red.chunks)),
                        (2, whole(&coef_buf)),
                        (3, slots.binding()),
                        (4, grads_red.slots.slot(wi)),
                        (6, whole(&report)),
                    ],
                );
                (group, wi as u64 * 12)
            })
            .collect();
        let readback = REPORT_BYTES + (n_groups + n_units) as u64 * ACC_BYTES + n_units as u64 * 4;
        let engine = Engine {
            ctx: ctx.clone(),
            grads: grads_red,
            params: params_red,
            groups,
            group_accs,
            finish_groups,
            finish_partials,
            coefs,
            coefs_grid: fold_grid((n_units as u32).div_ceil(64), max_dim),
            rewrites,
            args_out,
            slots,
            state,
            report,
            coef_buf,
            pool: ReportPool::new(readback),
            seq: 0,
            timestamps: None,
            layout,
        };
        if let Some(error) = pollster::block_on(scope.pop()) {
            return Err(ClipError::Wgpu(error.to_string()));
        }
        Ok(engine)
    }

    /// The program.
    pub(crate) fn layout(&self) -> &Layout {
        &self.layout
    }

    /// The context it runs on.
    pub(crate) fn ctx(&self) -> &GpuContext {
        &self.ctx
    }

    /// The pool of report readback buffers.
    pub(crate) fn pool(&self) -> Arc<ReportPool> {
        self.pool.clone()
    }

    /// The per-unit coefficients, the report and the parameter slots, for passes that
    /// consume them.
    pub(crate) fn outputs(&self) -> (&wgpu::Buffer, &wgpu::Buffer, &StepSlots) {
        (&self.coef_buf, &self.report, &self.slots)
    }

    /// Makes every following step write GPU timestamps at the start and end of its
    /// compute pass; `None` stops it.
    pub(crate) fn set_timestamp_writes(&mut self, timestamps: Option<(wgpu::QuerySet, u32, u32)>) {
        self.timestamps = timestamps;
    }

    /// Records one step; `extra` records further dispatches in the same pass after the
    /// stages (given the step's slot offset). Returns the readback buffer that holds the
    /// report once the encoder has run (when the step asks for one).
    pub(crate) fn encode(
        &mut self,
        encoder: &mut wgpu::CommandEncoder,
        step: Step,
        extra: impl FnOnce(&mut wgpu::ComputePass<'_>, u32),
    ) -> Option<wgpu::Buffer> {
        let ctx = self.ctx.clone();
        let (device, kernels) = (&ctx.inner.device, &ctx.inner.kernels);
        self.seq = self.seq.wrapping_add(1);
        let params = StepParams {
            seq: self.seq,
            ..step.params
        };
        let slot = self
            .slots
            .write(&ctx.inner.queue, encoder, &params, &self.state);
        let kind = step.norm.kind_code();
        let adaptive = self.layout.adaptive;
        let direct = step.reduce && !step.units && self.finish_partials.is_some();
        {
            let timestamp_writes = self.timestamps.as_ref().map(|(query_set, begin, end)| {
                wgpu::ComputePassTimestampWrites {
                    query_set,
                    beginning_of_pass_write_index: Some(*begin),
                    end_of_pass_write_index: Some(*end),
                }
            });
            let mut pass = encoder.begin_compute_pass(&wgpu::ComputePassDescriptor {
                label: Some("gradclip step"),
                timestamp_writes,
            });
            if step.reduce {
                self.grads
                    .encode_partials(&mut pass, device, kernels, kind, slot);
                if !direct {
                    self.grads
                        .encode_units(&mut pass, device, kernels, kind, slot);
                }
                if let Some(p) = &self.params {
                    let l2 = Norm::L2.kind_code();
                    p.encode_partials(&mut pass, device, kernels, l2, slot);
                    p.encode_units(&mut pass, device, kernels, l2, slot);
                }
                if let (Some((group, grid)), false) = (&self.groups, direct) {
                    pass.set_pipeline(&kernels.pipeline(device, Kernel::Combine(kind)));
                    pass.set_bind_group(0, group, &[slot]);
                    pass.dispatch_workgroups(grid[0], grid[1], 1);
                }
            }
            pass.set_pipeline(&kernels.pipeline(device, Kernel::Finish { kind, adaptive }));
            let finish = match (&self.finish_partials, direct) {
                (Some(partials), true) => partials,
                _ => &self.finish_groups,
            };
            pass.set_bind_group(0, finish, &[slot]);
            pass.dispatch_workgroups(1, 1, 1);
            if step.coefs && self.coefs_grid[0] > 0 {
                let formula = self.layout.formula as u32;
                pass.set_pipeline(&kernels.pipeline(
                    device,
                    Kernel::Coefs {
                        kind,
                        adaptive,
                        formula,
                    },
                ));
                pass.set_bind_group(0, &self.coefs, &[slot]);
                pass.dispatch_workgroups(self.coefs_grid[0], self.coefs_grid[1], 1);
            }
            if step.rewrite {
                pass.set_pipeline(&kernels.pipeline(device, Kernel::Rewrite));
                for (group, args) in &self.rewrites {
                    pass.set_bind_group(0, group, &[slot]);
                    pass.dispatch_workgroups_indirect(&self.args_out, *args);
                }
            }
            extra(&mut pass, slot);
        }
        if !step.readback {
            return None;
        }
        let readback = self.pool.take(device);
        encoder.copy_buffer_to_buffer(&self.report, 0, &readback, 0, REPORT_BYTES);
        let n_groups = self.layout.group_ranges.len() as u64;
        let n_units = self.layout.segments.len() as u64;
        if step.units && n_units > 0 {
            let units = REPORT_BYTES + n_groups * ACC_BYTES;
            encoder.copy_buffer_to_buffer(
                &self.group_accs,
                0,
                &readback,
                REPORT_BYTES,
                n_groups * ACC_BYTES,
            );
            let accs = &self.grads.segment_accs;
            encoder.copy_buffer_to_buffer(accs, 0, &readback, units, n_units * ACC_BYTES);
            let coefs = units + n_units * ACC_BYTES;
            encoder.copy_buffer_to_buffer(&self.coef_buf, 0, &readback, coefs, n_units * 4);
        }
        Some(readback)
    }

    /// Sequence number of the last encoded step.
    pub(crate) fn seq(&self) -> u32 {
        self.seq
    }

    /// Reads the device state back (waits for the GPU).
    pub(crate) fn read_state(&self) -> Result<Vec<u32>, ClipError> {
        let device = &self.ctx.inner.device;
        let size = self.state.size();
        let pool = ReportPool::new(size);
        let staging = pool.take(device);
        let mut encoder = device.create_command_encoder(&Default::default());
        encoder.copy_buffer_to_buffer(&self.state, 0, &staging, 0, size);
        let pending: super::PendingReport<Vec<u32>> = super::PendingReport::on_submit(
            &encoder,
            staging,
            pool,
            device.clone(),
            Box::new(|w: &[u32]| Ok(w.to_vec())),
        );
        self.ctx.inner.queue.submit([encoder.finish()]);
        pending.wait()
    }

    /// Overwrites the device state with `words`.
    pub(crate) fn write_state(&self, words: &[u32]) {
        self.ctx
            .inner
            .queue
            .write_buffer(&self.state, 0, bytemuck::cast_slice(words));
    }
}
