//! Gradient tensors in caller-owned buffers, and the global-norm operations over them
//! (total norm, global clip, split API, value clip) as configurations of the engine.

use super::context::GpuContext;
use super::engine::{Engine, Mode, Step};
use super::readback::{decode_clip, PendingReport, ReportKind};
use super::resources::StepParams;
use crate::chain::{Program, TensorInfo};
use crate::dtype::DType;
use crate::error::ClipError;
use crate::non_finite::NonFinitePolicy;
use crate::norm::{Norm, PartialNorm};
use crate::ops::{validate_max_norm, GlobalNormClip, ValueClip};
use crate::plan::{Plan, PlanLimits, PlanSegment, PlanTensor};
use crate::shaders::abi::Acc;

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

/// The names and shapes of `tensors` (unnamed ones are `#index`).
pub(crate) fn infos_of(tensors: &[GpuTensor<'_>]) -> Vec<TensorInfo> {
    tensors.iter().enumerate().map(|(i, t)| t.info(i)).collect()
}

/// A batch of gradient tensors on one device, planned once and clipped every step: the
/// engine's global-norm program over whole tensors (PyTorch's `clip_grad_norm_` family).
pub struct GpuBatch {
    engine: Engine,
    n_tensors: usize,
    /// Steps with a report encoded so far: the next report's number.
    steps: u64,
}

impl std::fmt::Debug for GpuBatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GpuBatch")
            .field("tensors", &self.n_tensors)
            .finish()
    }
}

/// The planner's view of `tensors` (shard starts `bases`) and the distinct buffers it
/// indexes; checks that every buffer can be bound as storage.
pub(crate) fn plan_inputs<'a>(
    tensors: &[GpuTensor<'a>],
    bases: &[u64],
) -> Result<(Vec<PlanTensor>, Vec<&'a wgpu::Buffer>), ClipError> {
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
            base: bases.get(i).copied().unwrap_or(0),
        });
    }
    Ok((plan_tensors, buffers))
}

/// The limits of `ctx`'s device that shape a plan.
pub(crate) fn plan_limits(ctx: &GpuContext) -> PlanLimits {
    let limits = ctx.inner.device.limits();
    PlanLimits {
        max_binding: limits.max_storage_buffer_binding_size,
        offset_alignment: limits.min_storage_buffer_offset_alignment as u64,
        max_workgroups_per_dim: limits.max_compute_workgroups_per_dimension,
    }
}

/// Checks `tensors` and plans them over the segments `segments` makes of them; returns
/// the plan and the distinct buffers its windows index.
pub(crate) fn plan_tensors<'a>(
    ctx: &GpuContext,
    tensors: &[GpuTensor<'a>],
    bases: &[u64],
    segments: impl FnOnce(&[PlanTensor]) -> Vec<PlanSegment>,
) -> Result<(Plan, Vec<&'a wgpu::Buffer>), ClipError> {
    let (plan_tensors, buffers) = plan_inputs(tensors, bases)?;
    let segments = segments(&plan_tensors);
    let plan = Plan::new(&plan_tensors, &segments, plan_limits(ctx))?;
    Ok((plan, buffers))
}

impl GpuBatch {
    /// Plans a batch over tensors living in caller-owned buffers. Checks every tensor
    /// (STORAGE usage, alignment, bounds, overlap, device) and creates all per-batch
    /// resources; on error nothing is kept and no buffer is touched.
    pub fn new(ctx: &GpuContext, tensors: &[GpuTensor<'_>]) -> Result<GpuBatch, ClipError> {
        let lens: Vec<u64> = tensors.iter().map(|t| t.len).collect();
        let engine = Engine::new(ctx, tensors, None, Program::global(&lens), false)?;
        Ok(GpuBatch {
            engine,
            n_tensors: tensors.len(),
            steps: 0,
        })
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
        self.engine.set_timestamp_writes(timestamps);
    }

    /// Records `step` and returns its report, decoded as a global-norm report.
    fn encode_step(
        &mut self,
        encoder: &mut wgpu::CommandEncoder,
        step: Step,
        clip: Option<(NonFinitePolicy, f32)>,
    ) -> Result<PendingReport, ClipError> {
        let readback = (self.engine.encode(encoder, step, |_, _| {})?)
            .expect("global-norm steps read their report back");
        let kind = ReportKind {
            norm: step.norm,
            clip: clip.map(|c| c.0),
            max_norm: clip.map(|c| c.1),
            tensor_norms: step.units,
            layout: self.engine.layout(),
            step: self.steps,
            tensors: self.n_tensors as u32,
        };
        self.steps += 1;
        Ok(PendingReport::on_submit(
            encoder,
            readback,
            self.engine.pool(),
            self.engine.ctx().inner.device.clone(),
            Box::new(move |words| decode_clip(words, kind)),
        ))
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
        let step = Step {
            // An infinite threshold: the coefficient is 1 and nothing is rewritten.
            params: norm_params(norm, f32::INFINITY, NonFinitePolicy::Propagate),
            mode: Mode::Measure,
            units: tensor_norms,
            norm,
        };
        self.encode_step(encoder, step, None)
    }

    /// Records a global-norm clip: norm, coefficient and scaling, all on the GPU in one
    /// compute pass; the scaling runs zero workgroups when the coefficient is 1.
    pub fn encode_clip_by_global_norm(
        &mut self,
        encoder: &mut wgpu::CommandEncoder,
        clip: &GlobalNormClip,
    ) -> Result<PendingReport, ClipError> {
        clip.validate()?;
        let step = Step {
            params: norm_params(clip.norm, clip.max_norm, clip.non_finite),
            mode: Mode::Clip,
            units: clip.tensor_norms,
            norm: clip.norm,
        };
        self.encode_step(encoder, step, Some((clip.non_finite, clip.max_norm)))
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
        let step = Step {
            params: StepParams {
                given: given_acc(total),
                use_given: 1,
                ..norm_params(norm, max_norm, policy)
            },
            mode: Mode::GivenNorm,
            units: false,
            norm,
        };
        self.encode_step(encoder, step, Some((policy, max_norm)))
    }

    /// Records a value clip: every element clamped to `[lo, hi]` (for 16-bit tensors, the
    /// bounds rounded to the type), NaN kept. It has no report; like every step it reads
    /// its own parameter slot, and one whose slot was overwritten before submission (more
    /// than 64 steps of this batch in one submission) changes nothing.
    pub fn encode_clip_by_value(
        &mut self,
        encoder: &mut wgpu::CommandEncoder,
        clip: &ValueClip,
    ) -> Result<(), ClipError> {
        clip.validate()?;
        let (lo_half, hi_half) = clip.half_bounds();
        let (f16s, bf16s) = clip.half_clamps();
        let step = Step {
            params: StepParams {
                rule: 0,
                clamp: 1,
                lo: clip.lo,
                hi: clip.hi,
                lo_half,
                hi_half,
                keys_f16: f16s.keys(),
                keys_bf16: bf16s.keys(),
                ..StepParams::default()
            },
            mode: Mode::ValueOnly,
            units: false,
            norm: Norm::L2,
        };
        self.engine.encode(encoder, step, |_, _| {})?;
        Ok(())
    }

    /// Encodes with `f` into a new command encoder and submits it.
    fn submit<T>(
        &mut self,
        f: impl FnOnce(&mut Self, &mut wgpu::CommandEncoder) -> Result<T, ClipError>,
    ) -> Result<T, ClipError> {
        let ctx = self.engine.ctx().clone();
        let steps = self.steps;
        ctx.record_and_submit("gradclip", self, f, |b| b.steps = steps)
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

/// Step parameters of a global-norm step of order `norm` against `max_norm`.
fn norm_params(norm: Norm, max_norm: f32, policy: NonFinitePolicy) -> StepParams {
    let order = norm.order() as f32;
    StepParams {
        policy: policy.code(),
        p: order,
        inv_p: 1.0 / order,
        rule: 1,
        multiplier: max_norm,
        ..StepParams::default()
    }
}

/// A host partial norm as the shader's f32 `Acc`; a scale beyond f32 range is moved to
/// f32::MAX with its sum rescaled.
fn given_acc(total: &PartialNorm) -> Acc {
    let d = total.acc().on_device(total.norm());
    Acc {
        scale: d.scale as f32,
        sum: d.sum as f32,
        flags: d.flags,
        _pad: 0,
    }
}
