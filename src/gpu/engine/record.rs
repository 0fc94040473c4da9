//! Recording a step: what it runs (its list of dispatches, the one decision), the
//! pipelines that list needs, and its replay into one compute pass.

use crate::error::ClipError;
use crate::gpu::readback::Readback;
use crate::gpu::resources::{timestamp_writes, StepParams};
use crate::norm::Norm;
use crate::shaders::abi;
use crate::shaders::Kernel;

use super::{Dispatch, Engine, Mode, Source, Step};

impl Engine {
    /// The pipeline of dispatch `d` of `step` (of a reduction, its first).
    fn kernel(&self, d: Dispatch, step: &Step) -> Kernel {
        let kind = step.norm.kind_code();
        match d {
            Dispatch::SpanReduce | Dispatch::Reduce { params: false, .. } => Kernel::Reduce(kind),
            Dispatch::Reduce { params: true, .. } => Kernel::Reduce(Norm::L2.kind_code()),
            Dispatch::Groups(_) => Kernel::Groups(kind),
            Dispatch::Finish { from, coefs, .. } => Kernel::Finish {
                kind,
                from_units: from == Source::UnitNorms,
                coefs,
            },
            Dispatch::Coefs(_) => Kernel::Coefs(kind),
            Dispatch::Rewrite => self.rewrite_kernel(&step.params),
        }
    }

    /// The kernels of dispatch `d` of `step`: its own and, for a reduction that combines
    /// its partials into unit norms, the combine's.
    fn kernels_of(&self, d: Dispatch, step: &Step) -> (Kernel, Option<Kernel>) {
        let kernel = self.kernel(d, step);
        let combine = match (d, kernel) {
            (Dispatch::Reduce { combine: true, .. }, Kernel::Reduce(kind)) => {
                Some(Kernel::Combine(kind))
            }
            _ => None,
        };
        (kernel, combine)
    }

    /// Records `step` and builds the pipelines it needs (see `Kernels::prepare`), unless
    /// the recording kept in `self.recorded` was made for a step that records the same
    /// way; [`Engine::encode`] replays it.
    pub(crate) fn prepare(&self, step: &Step) -> Result<(), ClipError> {
        let (device, kernels) = (&self.ctx.inner.device, &self.ctx.inner.kernels);
        let key = RecordKey {
            mode: step.mode,
            detail: step.detail,
            kind: step.norm.kind_code(),
            rewrite: self.rewrite_kernel(&step.params),
        };
        let mut kept = self.recorded.lock().unwrap_or_else(|e| e.into_inner());
        if kept.key == Some(key) {
            return Ok(());
        }
        let Recorded {
            key: kept_key,
            dispatches,
            pipelines,
        } = &mut *kept;
        *kept_key = None;
        crate::recording::record(&self.profile, step.mode, step.detail, dispatches);
        let of_each: Vec<(Kernel, Option<Kernel>)> = dispatches
            .iter()
            .map(|&d| self.kernels_of(d, step))
            .collect();
        let list: Vec<Kernel> = (of_each.iter())
            .flat_map(|&(kernel, combine)| std::iter::once(kernel).chain(combine))
            .collect();
        kernels.prepare(device, &list)?;
        pipelines.clear();
        let pipeline = |k| kernels.pipeline(device, k);
        for (kernel, combine) in of_each {
            pipelines.push((pipeline(kernel), combine.map(pipeline)));
        }
        *kept_key = Some(key);
        Ok(())
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
        let kept = self.recorded.lock().unwrap_or_else(|e| e.into_inner());
        let needs_units = kept.dispatches.iter().any(units);
        drop(kept);
        if needs_units {
            self.make_unit_windows()?;
        }
        let ctx = self.ctx.clone();
        let (device, queue) = (&ctx.inner.device, &ctx.inner.queue);
        let slot = (self.slots).write(queue, encoder, &step.params, &self.reports);
        {
            let timestamp_writes = timestamp_writes(&self.timestamps);
            let mut pass = encoder.begin_compute_pass(&wgpu::ComputePassDescriptor {
                label: Some("gradclip step"),
                timestamp_writes,
            });
            let kept = self.recorded.lock().unwrap_or_else(|e| e.into_inner());
            for (&d, (pipeline, combine)) in kept.dispatches.iter().zip(&kept.pipelines) {
                match d {
                    Dispatch::SpanReduce => {
                        pass.set_pipeline(pipeline);
                        let spans = self.spans.as_ref().map_or(&[][..], |s| &s.reduce[..]);
                        for (group, grid) in spans.iter().filter(|(_, g)| g[0] > 0) {
                            pass.set_bind_group(0, group, &[slot]);
                            pass.dispatch_workgroups(grid[0], grid[1], 1);
                        }
                    }
                    Dispatch::Reduce { params, .. } => {
                        let red = match (params, &self.params) {
                            (true, Some(p)) => p,
                            _ => &self.grads,
                        };
                        red.encode(&mut pass, (pipeline, combine.as_ref()), slot);
                    }
                    Dispatch::Groups(k) => {
                        let (group, grid) = self.stages[k].groups.as_ref().expect("recorded");
                        pass.set_pipeline(pipeline);
                        pass.set_bind_group(0, group, &[slot]);
                        pass.dispatch_workgroups(grid[0], grid[1], 1);
                    }
                    Dispatch::Finish {
                        stage,
                        stages,
                        from,
                        ..
                    } => {
                        let own = &self.stages[stage];
                        let finish = match (from, stages) {
                            (Source::Partials, _) => self
                                .finish_partials
                                .as_ref()
                                .expect("a single global stage"),
                            (_, 1) => &own.finish,
                            _ => own.run.as_ref().expect("a stage that opens a run"),
                        };
                        pass.set_pipeline(pipeline);
                        pass.set_bind_group(0, finish, &[slot]);
                        pass.dispatch_workgroups(1, 1, 1);
                    }
                    Dispatch::Coefs(k) => {
                        pass.set_pipeline(pipeline);
                        pass.set_bind_group(0, &self.stages[k].coefs, &[slot]);
                        pass.dispatch_workgroups(self.coefs_grid[0], self.coefs_grid[1], 1);
                    }
                    Dispatch::Rewrite => {
                        pass.set_pipeline(pipeline);
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

/// What decides a step's recording and its pipelines.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct RecordKey {
    mode: Mode,
    detail: bool,
    kind: u32,
    rewrite: Kernel,
}

/// A step's recording with the pipelines of its dispatches, kept while the steps record
/// the same way: a warm step neither records, nor looks a pipeline up, nor allocates.
#[derive(Default)]
pub(super) struct Recorded {
    key: Option<RecordKey>,
    dispatches: Vec<Dispatch>,
    /// Per dispatch its pipeline and, for a reduction that combines its partials into
    /// unit norms, the combine's.
    pipelines: Vec<(wgpu::ComputePipeline, Option<wgpu::ComputePipeline>)>,
}
