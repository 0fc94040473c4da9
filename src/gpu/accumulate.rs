//! Gradient accumulation on the GPU (`shaders/accumulate.wgsl`): micro-batch gradients
//! are added into accumulation buffers with the 1/k scaling folded in, and a
//! [`GpuPolicy`] clips the sums once per accumulation, in the same command encoder.

use super::context::{guarded, GpuContext};
use super::policy::GpuPolicy;
use super::readback::PendingReport;
use super::resources::{bind, table, timestamp_writes, whole, window, DispatchSlots, Timestamps};
use super::tensor::{plan_tensors, GpuTensor};
use crate::chain::ClipPolicy;
use crate::chain::TensorInfo;
use crate::error::ClipError;
use crate::ops::check_micro_steps;
use crate::plan::{fold_grid, PlanSegment};
use crate::report::ClipReport;
use crate::shaders::abi::AccumulateParams;
use crate::shaders::{BindLayout, Kernel};

/// Gradient accumulation with clipping at the accumulation boundary, on the GPU.
///
/// Each micro-batch's backward pass writes its gradients into the *micro* tensors;
/// [`GpuAccumulator::encode`] adds them, times `1 / micro_steps`, into the *accumulated*
/// tensors (the first micro-batch of an accumulation overwrites them, so nothing needs
/// zeroing), and on the last micro-batch also runs the clipping policy on the sums. The
/// result is the mean gradient over all micro-batches, clipped once, as in a PyTorch loop
/// that divides the loss by k, calls `backward` k times and clips before `step`.
pub struct GpuAccumulator {
    ctx: GpuContext,
    /// Per binding window: bind group for the first micro-batch, for the others, and grid.
    passes: Vec<(wgpu::BindGroup, wgpu::BindGroup, [u32; 3])>,
    policy: GpuPolicy,
    micro_steps: u32,
    added: u32,
    timestamps: Option<Timestamps>,
}

impl std::fmt::Debug for GpuAccumulator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GpuAccumulator")
            .field("micro_steps", &self.micro_steps)
            .field("added", &self.added)
            .field("policy", &self.policy)
            .finish()
    }
}

impl GpuAccumulator {
    /// Plans accumulation of `micro` into `accumulated` over `micro_steps` micro-batches,
    /// clipped by `policy` (AGC also takes the parameters).
    ///
    /// `accumulated[i]` must have the dtype, length and byte offset of `micro[i]`, in
    /// buffers of their own that mirror the micro buffers one for one (typically a second
    /// buffer of the same size). Names and shapes for the policy are taken from
    /// `accumulated`. Errors (bad count, mismatched tensors, bad policy) create nothing.
    pub fn new(
        ctx: &GpuContext,
        micro: &[GpuTensor<'_>],
        accumulated: &[GpuTensor<'_>],
        params: Option<&[GpuTensor<'_>]>,
        micro_steps: u32,
        policy: ClipPolicy,
    ) -> Result<GpuAccumulator, ClipError> {
        check_micro_steps(micro_steps)?;
        check_mirrored(micro, accumulated)?;
        let (micro_plan, micro_buffers) = plan_tensors(ctx, micro, &[], PlanSegment::whole)?;
        let (plan, buffers) = plan_tensors(ctx, accumulated, &[], PlanSegment::whole)?;
        let same_windows = micro_plan.windows.len() == plan.windows.len()
            && (micro_plan.windows.iter().zip(&plan.windows)).all(|(a, b)| {
                (a.buffer, a.byte_offset, a.apply_first, a.apply_count)
                    == (b.buffer, b.byte_offset, b.apply_first, b.apply_count)
            });
        if !same_windows || micro_plan.apply_chunks != plan.apply_chunks {
            return Err(ClipError::InvalidConfig(
                "the accumulation buffers must mirror the micro-batch buffers".into(),
            ));
        }
        let policy = GpuPolicy::new(ctx, accumulated, params, policy)?;
        let device = &ctx.inner.device;
        let kernels = &ctx.inner.kernels;
        let passes = guarded(device, || {
            let chunks = table(device, "gradclip accumulate chunks", &plan.apply_chunks);
            let scale = 1.0 / micro_steps as f32;
            let slots = DispatchSlots::new(
                device,
                &(plan.windows.iter())
                    .flat_map(|w| {
                        [1, 0].map(|first| AccumulateParams {
                            first_chunk: w.apply_first,
                            n_chunks: w.apply_count,
                            scale,
                            first,
                        })
                    })
                    .collect::<Vec<_>>(),
            );
            let max_dim = device.limits().max_compute_workgroups_per_dimension;
            let passes = (plan.windows.iter().zip(&micro_plan.windows))
                .enumerate()
                .map(|(i, (w, mw))| {
                    let group = |slot: usize| {
                        bind(
                            device,
                            kernels.layout(BindLayout::Accumulate),
                            &[
                                (0, window(buffers[w.buffer], w)),
                                (1, window(micro_buffers[mw.buffer], mw)),
                                (2, whole(&chunks)),
                                (3, slots.slot(slot)),
                            ],
                        )
                    };
                    (
                        group(2 * i),
                        group(2 * i + 1),
                        fold_grid(w.apply_count, max_dim),
                    )
                })
                .collect();
            Ok(passes)
        })?;
        Ok(GpuAccumulator {
            ctx: ctx.clone(),
            passes,
            policy,
            micro_steps,
            added: 0,
            timestamps: None,
        })
    }

    /// Records the addition of the current micro-batch; on the last micro-batch of an
    /// accumulation, also the clipping of the sums, and returns the policy's report
    /// (readable once the encoder is submitted). The micro tensors must hold this
    /// micro-batch's gradients when the encoder runs.
    pub fn encode(
        &mut self,
        encoder: &mut wgpu::CommandEncoder,
    ) -> Result<Option<PendingReport<ClipReport>>, ClipError> {
        let boundary = self.added + 1 == self.micro_steps;
        let (device, kernels) = (&self.ctx.inner.device, &self.ctx.inner.kernels);
        kernels.prepare(device, &[Kernel::Accumulate])?;
        if boundary {
            // A policy error (a schedule out of range, a pipeline this device cannot build)
            // must come before anything is recorded.
            self.policy.check()?;
        }
        {
            let (device, kernels) = (&self.ctx.inner.device, &self.ctx.inner.kernels);
            let timestamp_writes = timestamp_writes(&self.timestamps);
            let mut pass = encoder.begin_compute_pass(&wgpu::ComputePassDescriptor {
                label: Some("gradclip accumulate"),
                timestamp_writes,
            });
            pass.set_pipeline(&kernels.pipeline(device, Kernel::Accumulate));
            for (first, rest, grid) in self.passes.iter().filter(|p| p.2[0] > 0) {
                pass.set_bind_group(0, if self.added == 0 { first } else { rest }, &[]);
                pass.dispatch_workgroups(grid[0], grid[1], 1);
            }
        }
        let report = if boundary {
            Some(self.policy.encode(encoder)?)
        } else {
            None
        };
        self.added = if boundary { 0 } else { self.added + 1 };
        Ok(report)
    }

    /// Makes every following accumulation pass write GPU timestamps at its start and end;
    /// the clipping pass at a boundary is timed through
    /// [`GpuAccumulator::policy_mut`]`().set_timestamp_writes(..)`. `None` stops it.
    pub fn set_timestamp_writes(&mut self, timestamps: Option<(wgpu::QuerySet, u32, u32)>) {
        self.timestamps = timestamps;
    }

    /// [`GpuAccumulator::encode`], submitted now.
    pub fn step(&mut self) -> Result<Option<PendingReport<ClipReport>>, ClipError> {
        let ctx = self.ctx.clone();
        let (added, step) = (self.added, self.policy.steps_taken());
        ctx.record_and_submit(
            "gradclip accumulate",
            self,
            |a, encoder| a.encode(encoder),
            |a| {
                a.added = added;
                a.policy.rewind(step);
            },
        )
    }

    /// Micro-batches added since the last boundary.
    pub fn pending(&self) -> u32 {
        self.added
    }

    /// Micro-batches per accumulation.
    pub fn micro_steps(&self) -> u32 {
        self.micro_steps
    }

    /// The clipping policy that runs at each boundary.
    pub fn policy(&self) -> &GpuPolicy {
        &self.policy
    }

    /// The clipping policy, to restore a saved state ([`GpuPolicy::set_state`]).
    pub fn policy_mut(&mut self) -> &mut GpuPolicy {
        &mut self.policy
    }

    /// Drops a partial accumulation: the next micro-batch starts a new one.
    pub fn reset(&mut self) {
        self.added = 0;
    }
}

/// Checks that `accumulated` mirrors `micro`: same count, dtype, length and offset per
/// tensor, and buffers that correspond one for one and are distinct from the micro ones.
fn check_mirrored(micro: &[GpuTensor<'_>], accumulated: &[GpuTensor<'_>]) -> Result<(), ClipError> {
    let bad = |i: usize, what: String| {
        let name = TensorInfo::name_of(accumulated[i].name.as_deref(), i);
        Err(ClipError::InvalidConfig(format!(
            "accumulation tensor '{name}' does not mirror its micro-batch tensor: {what}"
        )))
    };
    if micro.len() != accumulated.len() {
        return Err(ClipError::ShapeMismatch {
            tensor: "batch".into(),
            expected: format!("{} micro-batch tensors", micro.len()),
            got: format!("{} accumulation tensors", accumulated.len()),
        });
    }
    let mut pairs: Vec<(&wgpu::Buffer, &wgpu::Buffer)> = Vec::new();
    for (i, (m, a)) in micro.iter().zip(accumulated).enumerate() {
        if (m.dtype, m.len, m.offset) != (a.dtype, a.len, a.offset) {
            return bad(
                i,
                format!(
                    "{:?} x {} at byte {} vs {:?} x {} at byte {}",
                    a.dtype, a.len, a.offset, m.dtype, m.len, m.offset
                ),
            );
        }
        if micro.iter().any(|x| x.buffer == a.buffer) {
            return bad(
                i,
                "it shares a buffer with the micro-batch gradients".into(),
            );
        }
        let known = pairs
            .iter()
            .find(|(pm, pa)| *pm == m.buffer || *pa == a.buffer);
        match known {
            Some((pm, pa)) if *pm == m.buffer && *pa == a.buffer => {}
            Some(_) => return bad(i, "its buffer pairs with another micro buffer".into()),
            None => pairs.push((m.buffer, a.buffer)),
        }
    }
    Ok(())
}
