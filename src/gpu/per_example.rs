//! Per-example (DP-SGD) clipping on the GPU: the policy engine computes every example's
//! factor from its norm, then `shaders/per_example.wgsl` sums the clipped examples and
//! adds the noise, one dispatch per tensor, all in one compute pass.

use std::num::NonZeroU64;

use super::context::{guarded, GpuContext};
use super::engine::{Mode, Step};
use super::policy::GpuPolicy;
use super::readback::{decode_units, PendingReport};
use super::resources::{bind, whole, DispatchSlots};
use super::tensor::{infos_of, GpuTensor};
use crate::chain::{clipped_per_tensor, ClipPolicy, GaussianNoise, PerExampleClip, Program, Rule};
use crate::dtype::DType;
use crate::error::ClipError;
use crate::norm::NormAcc;
use crate::plan::fold_grid;
use crate::report::ClipReport;
use crate::shaders::abi::{self, ExampleParams, StepReport};
use crate::shaders::{BindLayout, Kernel};

/// Per-example clipping of `[batch, P_t]` gradients into `P_t`-element f32 outputs.
pub struct GpuPerExample {
    ctx: GpuContext,
    clip: PerExampleClip,
    engine: GpuPolicy,
    dispatches: Vec<(wgpu::BindGroup, [u32; 3])>,
    n_tensors: u32,
}

impl std::fmt::Debug for GpuPerExample {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GpuPerExample")
            .field("clip", &self.clip)
            .field("tensors", &self.n_tensors)
            .finish()
    }
}

/// The binding of bytes `[start, end)` of `buffer`, from the aligned offset at or below
/// `start`; returns it with the element index of `start` inside it.
fn sub_window<'a>(
    ctx: &GpuContext,
    t: &GpuTensor<'a>,
    name: &str,
) -> Result<(wgpu::BindingResource<'a>, u32), ClipError> {
    let limits = ctx.inner.device.limits();
    let es = t.dtype.size();
    let end = t.offset + t.len * es;
    if !t.offset.is_multiple_of(es) {
        return Err(ClipError::MisalignedOffset {
            tensor: name.into(),
            offset: t.offset,
            align: es,
            dtype: t.dtype,
        });
    }
    if end > t.buffer.size() & !3 {
        return Err(ClipError::OutOfBounds {
            tensor: name.into(),
            start: t.offset,
            end,
            size: t.buffer.size(),
        });
    }
    let start = t.offset - t.offset % limits.min_storage_buffer_offset_alignment as u64;
    let size = (end - start).next_multiple_of(4).max(4);
    if size > limits.max_storage_buffer_binding_size {
        return Err(ClipError::TooLarge {
            tensor: name.into(),
            len: t.len,
        });
    }
    let binding = wgpu::BindingResource::Buffer(wgpu::BufferBinding {
        buffer: t.buffer,
        offset: start,
        size: NonZeroU64::new(size),
    });
    Ok((binding, ((t.offset - start) / es) as u32))
}

impl GpuPerExample {
    /// Plans per-example clipping of `inputs` (`[batch, P_t]`, any dtype) into `outputs`
    /// (`P_t` f32 elements each, not overlapping the inputs or each other).
    pub fn new(
        ctx: &GpuContext,
        inputs: &[GpuTensor<'_>],
        outputs: &[GpuTensor<'_>],
        clip: PerExampleClip,
    ) -> Result<GpuPerExample, ClipError> {
        let lens: Vec<u64> = inputs.iter().map(|t| t.len).collect();
        clip.validate(&lens)?;
        let batch = clip.batch as u64;
        if outputs.len() != inputs.len() {
            return Err(ClipError::ShapeMismatch {
                tensor: "outputs".into(),
                expected: format!("{} tensors", inputs.len()),
                got: format!("{} tensors", outputs.len()),
            });
        }
        for (i, (o, &len)) in outputs.iter().zip(&lens).enumerate() {
            if o.dtype != DType::F32 || o.len != len / batch {
                return Err(ClipError::ShapeMismatch {
                    tensor: format!("output #{i}"),
                    expected: format!("{} f32 elements", len / batch),
                    got: format!("{} {} elements", o.len, o.dtype),
                });
            }
            if !o.buffer.usage().contains(wgpu::BufferUsages::STORAGE) {
                return Err(ClipError::MissingStorageUsage {
                    tensor: format!("output #{i}"),
                });
            }
        }
        // Outputs must not overlap each other or any input.
        let all: Vec<&GpuTensor<'_>> = inputs.iter().chain(outputs).collect();
        for (a, x) in all.iter().enumerate() {
            for y in &all[a + 1..] {
                let (xe, ye) = (
                    x.offset + x.len * x.dtype.size(),
                    y.offset + y.len * y.dtype.size(),
                );
                if x.buffer == y.buffer && x.offset < ye && y.offset < xe && x.len > 0 && y.len > 0
                {
                    let name = |t: &GpuTensor<'_>| t.name.clone().unwrap_or_else(|| "?".into());
                    return Err(ClipError::OverlappingTensors {
                        first: name(x),
                        second: name(y),
                    });
                }
            }
        }
        let (thresholds, per_layer) = clip.thresholds();
        let program = Program::per_example(&lens, batch, thresholds, per_layer);
        let policy = ClipPolicy::new(Rule::GlobalNorm(thresholds[0]));
        let engine = GpuPolicy::build(ctx, inputs, None, policy, program, &infos_of(inputs))?;
        let device = &ctx.inner.device;
        let dispatches = guarded(device, || {
            let max_dim = device.limits().max_compute_workgroups_per_dimension;
            let n = inputs.len() as u32;
            let mut params = Vec::with_capacity(inputs.len());
            let mut windows = Vec::with_capacity(inputs.len());
            for (t, (i, o)) in inputs.iter().zip(outputs).enumerate() {
                let (iw, in_offset) = sub_window(ctx, i, &format!("input #{t}"))?;
                let (ow, out_offset) = sub_window(ctx, o, &format!("output #{t}"))?;
                params.push(ExampleParams {
                    in_offset,
                    out_offset,
                    len: o.len as u32,
                    batch: clip.batch,
                    tensor: t as u32,
                    seg_base: t as u32,
                    seg_stride: n,
                    dtype: i.dtype.shader_code(),
                    inv_divisor: clip.inv_divisor(),
                    policy: 0,
                    ..ExampleParams::default()
                });
                windows.push((iw, ow, fold_grid((o.len as u32).div_ceil(256), max_dim)));
            }
            let slots = DispatchSlots::new(device, &params);
            let (coefs, report, step_slots) = engine.engine().outputs();
            let kernels = &ctx.inner.kernels;
            let dispatches = windows
                .into_iter()
                .enumerate()
                .map(|(t, (iw, ow, grid))| {
                    let group = bind(
                        device,
                        kernels.layout(BindLayout::PerExample),
                        &[
                            (0, iw),
                            (1, ow),
                            (2, whole(coefs)),
                            (3, slots.slot(t)),
                            (4, step_slots.binding()),
                            (5, whole(report)),
                        ],
                    );
                    (group, grid)
                })
                .collect();
            Ok(dispatches)
        })?;
        Ok(GpuPerExample {
            ctx: ctx.clone(),
            clip,
            engine,
            dispatches,
            n_tensors: inputs.len() as u32,
        })
    }

    /// Steps taken so far: the next step's number (it keys the noise).
    pub fn steps_taken(&self) -> u64 {
        self.engine.steps_taken()
    }

    /// Sets the next step's number: a resumed run continues its noise where it stopped.
    pub fn set_steps_taken(&mut self, steps: u64) {
        self.engine.rewind(steps);
    }

    /// Makes every following step write GPU timestamps at the start and end of its compute
    /// pass (norms, factors and the clipped sum all run in it); `None` stops it. See
    /// [`GpuPolicy::set_timestamp_writes`].
    pub fn set_timestamp_writes(&mut self, timestamps: Option<(wgpu::QuerySet, u32, u32)>) {
        self.engine.set_timestamp_writes(timestamps);
    }

    /// Records one step: per-example norms and factors, the clipped sum and the noise.
    pub fn encode(
        &mut self,
        encoder: &mut wgpu::CommandEncoder,
    ) -> Result<PendingReport<ClipReport>, ClipError> {
        let noise_std = self.clip.noise_std();
        let params = self.engine.params(Some(GaussianNoise {
            sigma: noise_std,
            seed: self.clip.seed,
        }))?;
        let ctx = self.ctx.clone();
        (ctx.inner.kernels).prepare(&ctx.inner.device, &[Kernel::PerExample])?;
        let dispatches = &self.dispatches;
        let step = Step {
            detail: self.clip.report_layers,
            ..self.engine.step_of(params, Mode::Coefficients)
        };
        let (readback, step) = self.engine.encode_step(encoder, step, |pass, slot| {
            pass.set_pipeline(
                &ctx.inner
                    .kernels
                    .pipeline(&ctx.inner.device, Kernel::PerExample),
            );
            for (group, grid) in dispatches.iter().filter(|(_, g)| g[0] > 0) {
                pass.set_bind_group(0, group, &[slot]);
                pass.dispatch_workgroups(grid[0], grid[1], 1);
            }
        })?;
        let (_, per_layer) = self.clip.thresholds();
        let per_unit = if per_layer { 1 } else { self.n_tensors.max(1) };
        let units = self.clip.batch * if per_layer { self.n_tensors } else { 1 };
        let n_tensors = self.n_tensors as usize;
        let layers = self
            .clip
            .report_layers
            .then(|| self.engine.readback_layout());
        Ok(PendingReport::on_submit(
            encoder,
            readback,
            self.engine.engine().pool(),
            self.ctx.inner.device.clone(),
            Box::new(move |w: &[u32]| {
                let header: StepReport = abi::read(w);
                if header.status & abi::STATUS_STALE != 0 {
                    return Err(ClipError::StepOverwritten(step));
                }
                Ok(ClipReport::per_example(
                    step,
                    header.clipped / per_unit,
                    units,
                    NormAcc::from(header.norm),
                    noise_std,
                    layers.map(|layout| {
                        let coefs = decode_units(w, &layout).coefs;
                        clipped_per_tensor(&coefs, n_tensors)
                    }),
                ))
            }),
        ))
    }

    /// [`GpuPerExample::encode`], submitted now.
    pub fn step(&mut self) -> Result<PendingReport<ClipReport>, ClipError> {
        let ctx = self.ctx.clone();
        let step = self.engine.steps_taken();
        ctx.record_and_submit(
            "gradclip per-example",
            self,
            |p, encoder| p.encode(encoder),
            |p| p.engine.rewind(step),
        )
    }
}
