//! Recording a step: what it runs (its list of dispatches, the one decision), the
//! pipelines that list needs, and its replay into one compute pass.

use crate::error::ClipError;
use crate::gpu::readback::Readback;
use crate::gpu::resources::{timestamp_writes, StepParams};
use crate::norm::Norm;
use crate::shaders::abi;
use crate::shaders::Kernel;

use super::{Dispatch, Engine, Mode, Step};

impl Engine {
    /// The pipeline of dispatch `d` of `step` (of a reduction, its first).
    fn kernel(&self, d: Dispatch, step: &Step) -> Kernel {
        let kind = step.norm.kind_code();
        match d {
            Dispatch::SpanReduce | Dispatch::Reduce { params: false, .. } => Kernel::Reduce(kind),
            Dispatch::Reduce { params: true, .. } => Kernel::Reduce(Norm::L2.kind_code()),
            Dispatch::Groups(_) => Kernel::Groups(kind),
            Dispatch::Finish { stage, .. } => Kernel::Finish {
                kind,
                adaptive: self.stages[stage].adaptive,
            },
            Dispatch::Coefs(k) => Kernel::Coefs {
                kind,
                adaptive: self.stages[k].adaptive,
                formula: self.stages[k].formula,
            },
            Dispatch::Undo(_) => Kernel::Undo,
            Dispatch::Rewrite => self.rewrite_kernel(&step.params),
        }
    }

    /// The pipelines of `recording`, a recording of `step`, into `all` (cleared first).
    fn kernels_of(&self, recording: &[Dispatch], step: &Step, all: &mut Vec<Kernel>) {
        all.clear();
        for &d in recording {
            let kernel = self.kernel(d, step);
            all.push(kernel);
            if let (Dispatch::Reduce { combine: true, .. }, Kernel::Reduce(kind)) = (d, kernel) {
                all.push(Kernel::Combine(kind));
            }
        }
    }

    /// Records `step` and builds the pipelines it needs (see `Kernels::prepare`); the
    /// recording stays in `self.recording` for [`Engine::encode`] to replay.
    pub(crate) fn prepare(&self, step: &Step) -> Result<(), ClipError> {
        let (device, kernels) = (&self.ctx.inner.device, &self.ctx.inner.kernels);
        let mut kept = self.recording.lock().unwrap_or_else(|e| e.into_inner());
        let (recording, list) = &mut *kept;
        crate::recording::record(&self.profile, step.mode, step.detail, recording);
        self.kernels_of(recording, step, list);
        kernels.prepare(device, list)
    }

    /// The rewrite variant of a step with `params`.
    fn rewrite_kernel(&self, params: &StepParams) -> Kernel {
        Kernel::Rewrite {
            shared_words: self.shared_words,
            scale: params.rule == 1 || params.policy == abi::POLICY_ZERO_NANS,
            noise: params.sigma > 0.0,
            clamp: params.clamp == 1,
        }
    }

    /// Records one step; `extra` records further dispatches in the same pass after the
    /// stages (given the step's slot offset). Returns the readback buffer that holds the
    /// reports once the encoder has run. A device that cannot
    /// build one of the step's pipelines is an error before anything is recorded.
    pub(crate) fn encode(
        &mut self,
        encoder: &mut wgpu::CommandEncoder,
        step: Step,
        extra: impl FnOnce(&mut wgpu::ComputePass<'_>, u32),
    ) -> Result<Readback, ClipError> {
        self.prepare(&step)?;
        let units = |d: &Dispatch| matches!(d, Dispatch::Reduce { params: false, .. });
        let kept = self.recording.lock().unwrap_or_else(|e| e.into_inner());
        let needs_units = kept.0.iter().any(units);
        drop(kept);
        if needs_units {
            self.make_unit_windows()?;
        }
        let ctx = self.ctx.clone();
        let (device, kernels) = (&ctx.inner.device, &ctx.inner.kernels);
        let queue = &ctx.inner.queue;
        let slot = (self.slots).write(queue, encoder, &step.params, &self.reports);
        let kind = step.norm.kind_code();
        {
            let timestamp_writes = timestamp_writes(&self.timestamps);
            let mut pass = encoder.begin_compute_pass(&wgpu::ComputePassDescriptor {
                label: Some("gradclip step"),
                timestamp_writes,
            });
            let kept = self.recording.lock().unwrap_or_else(|e| e.into_inner());
            for &d in &kept.0 {
                let pipeline = || kernels.pipeline(device, self.kernel(d, &step));
                match d {
                    Dispatch::SpanReduce => {
                        pass.set_pipeline(&pipeline());
                        let spans = self.spans.as_ref().map_or(&[][..], |s| &s.reduce[..]);
                        for (group, grid) in spans.iter().filter(|(_, g)| g[0] > 0) {
                            pass.set_bind_group(0, group, &[slot]);
                            pass.dispatch_workgroups(grid[0], grid[1], 1);
                        }
                    }
                    Dispatch::Reduce { params, combine } => {
                        // The reduction binds its own pipelines.
                        let (red, kind) = match (params, &self.params) {
                            (true, Some(p)) => (p, Norm::L2.kind_code()),
                            _ => (&self.grads, kind),
                        };
                        red.encode(&mut pass, device, kernels, (kind, slot), combine);
                    }
                    Dispatch::Groups(k) => {
                        let (group, grid) = self.stages[k].groups.as_ref().expect("recorded");
                        pass.set_pipeline(&pipeline());
                        pass.set_bind_group(0, group, &[slot]);
                        pass.dispatch_workgroups(grid[0], grid[1], 1);
                    }
                    Dispatch::Finish { stage, partials } => {
                        let finish = match (&self.finish_partials, partials) {
                            (Some(p), true) => p,
                            _ => &self.stages[stage].finish,
                        };
                        pass.set_pipeline(&pipeline());
                        pass.set_bind_group(0, finish, &[slot]);
                        pass.dispatch_workgroups(1, 1, 1);
                    }
                    Dispatch::Coefs(k) => {
                        pass.set_pipeline(&pipeline());
                        pass.set_bind_group(0, &self.stages[k].coefs, &[slot]);
                        pass.dispatch_workgroups(self.coefs_grid[0], self.coefs_grid[1], 1);
                    }
                    Dispatch::Undo(k) => {
                        pass.set_pipeline(&pipeline());
                        pass.set_bind_group(0, &self.stages[k].finish, &[slot]);
                        pass.dispatch_workgroups(1, 1, 1);
                    }
                    Dispatch::Rewrite => {
                        pass.set_pipeline(&pipeline());
                        for (group, grid) in self.rewrite_windows().iter().filter(|(_, g)| g[0] > 0)
                        {
                            pass.set_bind_group(0, group, &[slot]);
                            pass.dispatch_workgroups(grid[0], grid[1], 1);
                        }
                    }
                }
            }
            drop(kept);
            extra(&mut pass, slot);
        }
        let readback = self.pool.take(device)?;
        let layout = self.layout;
        let mut copy = |from: &wgpu::Buffer, to: std::ops::Range<u64>| {
            if to.end > to.start {
                encoder.copy_buffer_to_buffer(from, 0, &readback, to.start, to.end - to.start);
            }
        };
        let len = if step.mode == Mode::UnitsOnly {
            let tables = std::iter::once(&self.grads).chain(&self.params);
            let mut end = 0;
            for (k, red) in tables.enumerate() {
                let table = layout.unit_table(k as u64);
                end = table.end;
                copy(&red.segment_accs, table);
            }
            end
        } else {
            copy(&self.reports, layout.headers());
            if step.detail {
                let last = &self.stages[self.stages.len() - 1];
                copy(&last.group_accs, layout.groups());
                copy(&self.grads.segment_accs, layout.units());
                copy(&self.coef_buf, layout.coefs());
                layout.coefs().end
            } else {
                layout.headers().end
            }
        };
        // A map needs at least one word.
        let len = len.max(4);
        Ok(Readback {
            buffer: readback,
            len,
        })
    }
}
