//! A planned batch of gradient tensors on the GPU and the encoding of each operation.
//!
//! Everything a step needs (chunk tables, partials, report, indirect arguments, bind
//! groups) is created when the batch is built; encoding a step only records dispatches,
//! writes the small parameter block when it changed, and takes a readback buffer from
//! the pool.

use std::sync::Arc;

use bytemuck::Zeroable;
use half::{bf16, f16};

use super::context::GpuContext;
use super::readback::{PendingReport, ReportKind, ReportPool, HEADER_BYTES};
use super::reduction::SegmentReduction;
use super::resources::{
    bind, storage_init, storage_zeroed, uniform_buffer, whole, window, DispatchParams,
    DispatchSlots, StepParams,
};
use crate::dtype::DType;
use crate::error::ClipError;
use crate::norm::{Norm, PartialNorm};
use crate::ops::{validate_max_norm, GlobalNormClip, ValueClip};
use crate::plan::{fold_grid, Plan, PlanLimits, PlanSegment, PlanTensor};
use crate::policies::TensorInfo;
use crate::policy::NonFinitePolicy;
use crate::shaders::abi::{Acc, ACC_BYTES};
use crate::shaders::abi::{OP_CLAMP, OP_SCALE};
use crate::shaders::{BindLayout, Kernel};

/// One gradient tensor inside a caller-owned `wgpu::Buffer`.
#[derive(Debug, Clone)]
pub struct GpuTensor<'a> {
    /// The buffer; it needs `BufferUsages::STORAGE`.
    pub buffer: &'a wgpu::Buffer,
    /// Byte offset of the first element; a multiple of the element size.
    pub offset: u64,
    /// Number of elements.
    pub len: u64,
    /// Element type.
    pub dtype: DType,
    /// Optional name, used in error messages and matched by policy name patterns.
    pub name: Option<String>,
    /// Optional shape (its product must be `len`), needed by AGC for weights of rank >= 2.
    pub shape: Option<Vec<u64>>,
}

impl<'a> GpuTensor<'a> {
    /// A tensor of `len` elements of `dtype` at byte `offset` of `buffer`.
    pub fn new(buffer: &'a wgpu::Buffer, offset: u64, len: u64, dtype: DType) -> Self {
        GpuTensor {
            buffer,
            offset,
            len,
            dtype,
            name: None,
            shape: None,
        }
    }

    /// Gives the tensor a shape (for AGC units).
    pub fn shaped(mut self, shape: &[u64]) -> Self {
        self.shape = Some(shape.to_vec());
        self
    }

    /// Name and shape as policies see them (`#i` and `[len]` when not given).
    pub(crate) fn info(&self, i: usize) -> TensorInfo {
        TensorInfo {
            name: self.name.clone().unwrap_or_else(|| format!("#{i}")),
            shape: self.shape.clone().unwrap_or_else(|| vec![self.len]),
        }
    }

    /// Gives the tensor a name.
    pub fn named(mut self, name: impl Into<String>) -> Self {
        self.name = Some(name.into());
        self
    }
}

/// The elementwise bind group and grid of one binding window.
struct WindowBinding {
    apply: wgpu::BindGroup,
    apply_grid: [u32; 3],
}

/// Which accumulators the `total` pass combines.
enum TotalFrom {
    Partials,
    Tensors,
    Given,
}

/// A batch of gradient tensors on one device, planned once and clipped every step.
pub struct GpuBatch {
    ctx: GpuContext,
    n_tensors: usize,
    windows: Vec<WindowBinding>,
    reduction: SegmentReduction,
    total_from_partials: wgpu::BindGroup,
    total_from_tensors: wgpu::BindGroup,
    total_given: wgpu::BindGroup,
    step: wgpu::Buffer,
    last_step: Option<StepParams>,
    report: wgpu::Buffer,
    args_out: wgpu::Buffer,
    pool: Arc<ReportPool>,
    timestamps: Option<(wgpu::QuerySet, u32, u32)>,
}

impl std::fmt::Debug for GpuBatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GpuBatch")
            .field("tensors", &self.n_tensors)
            .field("windows", &self.windows.len())
            .finish()
    }
}

/// Checks `tensors` and plans them over the segments `segments` makes of them; returns
/// the plan and the distinct buffers its windows index.
pub(crate) fn plan_tensors<'a>(
    ctx: &GpuContext,
    tensors: &[GpuTensor<'a>],
    segments: impl FnOnce(&[PlanTensor]) -> Vec<PlanSegment>,
) -> Result<(Plan, Vec<&'a wgpu::Buffer>), ClipError> {
    let limits = ctx.inner.device.limits();
    let mut buffers: Vec<&wgpu::Buffer> = Vec::new();
    let mut plan_tensors = Vec::with_capacity(tensors.len());
    for (i, t) in tensors.iter().enumerate() {
        let name = t.name.clone().unwrap_or_else(|| format!("#{i}"));
        if !t.buffer.usage().contains(wgpu::BufferUsages::STORAGE) {
            return Err(ClipError::MissingStorageUsage { tensor: name });
        }
        let buffer = match buffers.iter().position(|b| *b == t.buffer) {
            Some(b) => b,
            None => {
                buffers.push(t.buffer);
                buffers.len() - 1
            }
        };
        plan_tensors.push(PlanTensor {
            buffer,
            buffer_size: t.buffer.size(),
            offset: t.offset,
            len: t.len,
            dtype: t.dtype,
            name,
        });
    }
    let segments = segments(&plan_tensors);
    let plan = Plan::new(
        &plan_tensors,
        &segments,
        PlanLimits {
            max_binding: limits.max_storage_buffer_binding_size,
            offset_alignment: limits.min_storage_buffer_offset_alignment as u64,
            max_workgroups_per_dim: limits.max_compute_workgroups_per_dimension,
        },
    )?;
    Ok((plan, buffers))
}

impl GpuBatch {
    /// Plans a batch over tensors living in caller-owned buffers. Checks every tensor
    /// (STORAGE usage, alignment, bounds, overlap, device) and creates all per-batch
    /// resources; on error nothing is kept and no buffer is touched.
    pub fn new(ctx: &GpuContext, tensors: &[GpuTensor<'_>]) -> Result<GpuBatch, ClipError> {
        let (plan, buffers) = plan_tensors(ctx, tensors, PlanSegment::whole)?;
        let scope = ctx
            .inner
            .device
            .push_error_scope(wgpu::ErrorFilter::Validation);
        let batch = Self::build(ctx, &plan, &buffers, tensors.len());
        if let Some(error) = pollster::block_on(scope.pop()) {
            return Err(ClipError::Wgpu(error.to_string()));
        }
        Ok(batch)
    }

    fn build(
        ctx: &GpuContext,
        plan: &Plan,
        buffers: &[&wgpu::Buffer],
        n_tensors: usize,
    ) -> GpuBatch {
        let device = &ctx.inner.device;
        let kernels = &ctx.inner.kernels;
        let max_dim = device.limits().max_compute_workgroups_per_dimension;
        let step = uniform_buffer(
            device,
            "gradclip step params",
            std::mem::size_of::<StepParams>() as u64,
        );
        let reduction = SegmentReduction::new(device, kernels, plan, buffers, &step);
        let apply_chunks = storage_init(
            device,
            "gradclip apply chunks",
            bytemuck::cast_slice(&plan.apply_chunks),
            wgpu::BufferUsages::empty(),
        );
        let report = storage_zeroed(
            device,
            "gradclip report",
            HEADER_BYTES,
            wgpu::BufferUsages::COPY_SRC,
        );
        let apply_grids: Vec<[u32; 3]> = plan
            .windows
            .iter()
            .map(|w| fold_grid(w.apply_count, max_dim))
            .collect();
        let args_full = storage_init(
            device,
            "gradclip scale grid",
            bytemuck::cast_slice(&apply_grids),
            wgpu::BufferUsages::empty(),
        );
        let args_out = storage_zeroed(
            device,
            "gradclip scale indirect",
            apply_grids.len() as u64 * 12,
            wgpu::BufferUsages::INDIRECT,
        );

        // Dispatch parameters: one per window for the elementwise pass, then the three
        // totals (from partials, from tensor norms, from a given norm).
        let mut params: Vec<DispatchParams> = plan
            .windows
            .iter()
            .map(|w| DispatchParams::range(w.apply_first, w.apply_count))
            .collect();
        let totals = params.len();
        params.extend([
            DispatchParams::range(0, reduction.n_chunks as u32),
            DispatchParams::range(0, n_tensors as u32),
            DispatchParams {
                use_given: 1,
                ..DispatchParams::default()
            },
        ]);
        let slots = DispatchSlots::new(device, &params);
        let windows = plan
            .windows
            .iter()
            .enumerate()
            .map(|(wi, w)| WindowBinding {
                apply: bind(
                    device,
                    kernels.layout(BindLayout::Apply),
                    &[
                        (0, window(buffers[w.buffer], w)),
                        (1, whole(&apply_chunks)),
                        (2, whole(&report)),
                        (3, whole(&step)),
                        (4, slots.slot(wi)),
                    ],
                ),
                apply_grid: apply_grids[wi],
            })
            .collect();
        let total = |input: &wgpu::Buffer, s: usize| {
            bind(
                device,
                kernels.layout(BindLayout::Total),
                &[
                    (0, whole(input)),
                    (3, whole(&step)),
                    (4, slots.slot(totals + s)),
                    (5, whole(&report)),
                    (6, whole(&args_full)),
                    (7, whole(&args_out)),
                ],
            )
        };
        GpuBatch {
            n_tensors,
            total_from_partials: total(&reduction.partials, 0),
            total_from_tensors: total(&reduction.segment_accs, 1),
            total_given: total(&reduction.partials, 2),
            windows,
            reduction,
            step,
            last_step: None,
            report,
            args_out,
            pool: ReportPool::new(HEADER_BYTES + n_tensors as u64 * ACC_BYTES),
            timestamps: None,
            ctx: ctx.clone(),
        }
    }

    /// Number of tensors in the batch.
    pub fn len(&self) -> usize {
        self.n_tensors
    }

    /// True when the batch has no tensors.
    pub fn is_empty(&self) -> bool {
        self.n_tensors == 0
    }

    /// Makes every following step write GPU timestamps at the start and end of its compute
    /// pass (indices `begin` and `end` of `query_set`); `None` stops it. Needs
    /// `Features::TIMESTAMP_QUERY`, which [`GpuContext::new`] enables where available.
    pub fn set_timestamp_writes(&mut self, timestamps: Option<(wgpu::QuerySet, u32, u32)>) {
        self.timestamps = timestamps;
    }

    /// Writes the step parameters if they changed since the last step.
    fn set_step(&mut self, params: StepParams) {
        if self.last_step != Some(params) {
            self.ctx
                .inner
                .queue
                .write_buffer(&self.step, 0, bytemuck::bytes_of(&params));
            self.last_step = Some(params);
        }
    }

    /// Step parameters for a norm of order `norm`, keeping the other fields.
    fn params_for(&self, norm: Norm) -> StepParams {
        let mut p = self.last_step.unwrap_or_else(StepParams::zeroed);
        let order = norm.order() as f32;
        p.p = order;
        p.inv_p = 1.0 / order;
        p
    }

    fn begin_pass<'e>(&self, encoder: &'e mut wgpu::CommandEncoder) -> wgpu::ComputePass<'e> {
        let timestamp_writes = self.timestamps.as_ref().map(|(query_set, begin, end)| {
            wgpu::ComputePassTimestampWrites {
                query_set,
                beginning_of_pass_write_index: Some(*begin),
                end_of_pass_write_index: Some(*end),
            }
        });
        encoder.begin_compute_pass(&wgpu::ComputePassDescriptor {
            label: Some("gradclip"),
            timestamp_writes,
        })
    }

    /// Records the norm passes and the coefficient, then (for a clip) the indirect scaling.
    fn encode_step(
        &mut self,
        encoder: &mut wgpu::CommandEncoder,
        norm: Norm,
        from: TotalFrom,
        clip: Option<NonFinitePolicy>,
    ) -> PendingReport {
        let ctx = self.ctx.clone();
        let (device, kernels) = (&ctx.inner.device, &ctx.inner.kernels);
        let kind = norm.kind_code();
        {
            let mut pass = self.begin_pass(encoder);
            if !matches!(from, TotalFrom::Given) {
                self.reduction
                    .encode_partials(&mut pass, device, kernels, kind);
            }
            if matches!(from, TotalFrom::Tensors) {
                self.reduction
                    .encode_segments(&mut pass, device, kernels, kind);
            }
            pass.set_pipeline(&kernels.pipeline(device, Kernel::Total(kind)));
            let total = match from {
                TotalFrom::Partials => &self.total_from_partials,
                TotalFrom::Tensors => &self.total_from_tensors,
                TotalFrom::Given => &self.total_given,
            };
            pass.set_bind_group(0, total, &[]);
            pass.dispatch_workgroups(1, 1, 1);
            if clip.is_some() {
                pass.set_pipeline(&kernels.pipeline(device, Kernel::Apply(OP_SCALE)));
                for (i, w) in self.windows.iter().enumerate() {
                    pass.set_bind_group(0, &w.apply, &[]);
                    pass.dispatch_workgroups_indirect(&self.args_out, i as u64 * 12);
                }
            }
        }
        let readback = self.pool.take(device);
        encoder.copy_buffer_to_buffer(&self.report, 0, &readback, 0, HEADER_BYTES);
        let tensor_norms = matches!(from, TotalFrom::Tensors);
        if tensor_norms && self.n_tensors > 0 {
            encoder.copy_buffer_to_buffer(
                &self.reduction.segment_accs,
                0,
                &readback,
                HEADER_BYTES,
                self.n_tensors as u64 * ACC_BYTES,
            );
        }
        PendingReport::clip_report(
            encoder,
            readback,
            self.pool.clone(),
            ctx.inner.device.clone(),
            ReportKind {
                norm,
                clip,
                tensor_norms: tensor_norms.then_some(self.n_tensors),
            },
        )
    }

    /// Records the total norm of the batch (PyTorch `get_total_norm`), and per-tensor
    /// norms when asked. Nothing is modified. The report is readable after submission.
    pub fn encode_total_norm(
        &mut self,
        encoder: &mut wgpu::CommandEncoder,
        norm: Norm,
        tensor_norms: bool,
    ) -> Result<PendingReport, ClipError> {
        norm.validate()?;
        let params = self.params_for(norm);
        self.set_step(params);
        let from = if tensor_norms {
            TotalFrom::Tensors
        } else {
            TotalFrom::Partials
        };
        Ok(self.encode_step(encoder, norm, from, None))
    }

    /// Records a global-norm clip: norm, coefficient and scaling, all on the GPU in one
    /// pass sequence; the scaling runs zero workgroups when the coefficient is 1.
    pub fn encode_clip_by_global_norm(
        &mut self,
        encoder: &mut wgpu::CommandEncoder,
        clip: &GlobalNormClip,
    ) -> Result<PendingReport, ClipError> {
        clip.validate()?;
        let mut params = self.params_for(clip.norm);
        params.max_norm = clip.max_norm;
        params.policy = clip.non_finite.code();
        self.set_step(params);
        let from = if clip.tensor_norms {
            TotalFrom::Tensors
        } else {
            TotalFrom::Partials
        };
        Ok(self.encode_step(encoder, clip.norm, from, Some(clip.non_finite)))
    }

    /// Records a clip with a norm computed elsewhere (PyTorch `clip_grads_with_norm_`),
    /// typically the combination of every shard's [`PartialNorm`].
    pub fn encode_clip_with_norm(
        &mut self,
        encoder: &mut wgpu::CommandEncoder,
        max_norm: f32,
        total: &PartialNorm,
        policy: NonFinitePolicy,
    ) -> Result<PendingReport, ClipError> {
        validate_max_norm(max_norm)?;
        let norm = total.norm();
        let mut params = self.params_for(norm);
        params.max_norm = max_norm;
        params.policy = policy.code();
        params.given = given_acc(total);
        self.set_step(params);
        Ok(self.encode_step(encoder, norm, TotalFrom::Given, Some(policy)))
    }

    /// Records a value clip: every element clamped to `[lo, hi]`.
    pub fn encode_clip_by_value(
        &mut self,
        encoder: &mut wgpu::CommandEncoder,
        clip: &ValueClip,
    ) -> Result<(), ClipError> {
        clip.validate()?;
        let mut params = self.last_step.unwrap_or_else(StepParams::zeroed);
        params.lo = clip.lo;
        params.hi = clip.hi;
        let halves =
            |v: f32| f16::from_f32(v).to_bits() as u32 | (bf16::from_f32(v).to_bits() as u32) << 16;
        params.lo_half = halves(clip.lo);
        params.hi_half = halves(clip.hi);
        self.set_step(params);
        let ctx = self.ctx.clone();
        let mut pass = self.begin_pass(encoder);
        pass.set_pipeline(
            &ctx.inner
                .kernels
                .pipeline(&ctx.inner.device, Kernel::Apply(OP_CLAMP)),
        );
        for w in self.windows.iter().filter(|w| w.apply_grid[0] > 0) {
            pass.set_bind_group(0, &w.apply, &[]);
            pass.dispatch_workgroups(w.apply_grid[0], w.apply_grid[1], 1);
        }
        Ok(())
    }

    /// Encodes with `f` into a new command encoder and submits it.
    fn submit<T>(
        &mut self,
        f: impl FnOnce(&mut Self, &mut wgpu::CommandEncoder) -> Result<T, ClipError>,
    ) -> Result<T, ClipError> {
        let mut encoder =
            self.ctx
                .inner
                .device
                .create_command_encoder(&wgpu::CommandEncoderDescriptor {
                    label: Some("gradclip"),
                });
        let out = f(self, &mut encoder)?;
        self.ctx.inner.queue.submit([encoder.finish()]);
        Ok(out)
    }

    /// [`GpuBatch::encode_total_norm`], submitted now.
    pub fn total_norm(
        &mut self,
        norm: Norm,
        tensor_norms: bool,
    ) -> Result<PendingReport, ClipError> {
        self.submit(|b, e| b.encode_total_norm(e, norm, tensor_norms))
    }

    /// [`GpuBatch::encode_clip_by_global_norm`], submitted now.
    pub fn clip_by_global_norm(
        &mut self,
        clip: &GlobalNormClip,
    ) -> Result<PendingReport, ClipError> {
        self.submit(|b, e| b.encode_clip_by_global_norm(e, clip))
    }

    /// [`GpuBatch::encode_clip_with_norm`], submitted now.
    pub fn clip_with_norm(
        &mut self,
        max_norm: f32,
        total: &PartialNorm,
        policy: NonFinitePolicy,
    ) -> Result<PendingReport, ClipError> {
        self.submit(|b, e| b.encode_clip_with_norm(e, max_norm, total, policy))
    }

    /// [`GpuBatch::encode_clip_by_value`], submitted now.
    pub fn clip_by_value(&mut self, clip: &ValueClip) -> Result<(), ClipError> {
        self.submit(|b, e| b.encode_clip_by_value(e, clip))
    }
}

/// A host partial norm as the shader's f32 `Acc`; a scale beyond f32 range is moved to
/// f32::MAX with its sum rescaled.
fn given_acc(total: &PartialNorm) -> Acc {
    let max = f32::MAX as f64;
    let (scale, sum) = if total.scale() > max {
        (max, total.rescaled_sum(max))
    } else {
        (total.scale(), total.rescaled_sum(total.scale()))
    };
    Acc {
        scale: scale as f32,
        sum: sum as f32,
        flags: total.flags(),
        _pad: 0,
    }
}
