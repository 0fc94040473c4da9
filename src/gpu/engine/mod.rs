//! The one GPU engine. A program (the units and every norm stage's groups: [`Program`]) is
//! planned once over caller-owned buffers; each step is then encoded as the same fixed
//! stages in one compute pass, with no host round trip:
//!
//! 1. `reduce`  (`norm_reduce.wgsl`, then `norm_combine.wgsl` `main`): one partial norm
//!    per chunk of every unit, from one read of the gradients (and of the parameters for
//!    AGC), then the unit norms;
//! 2. per norm stage of the chain, `combine` (`norm_combine.wgsl` `groups`: its group
//!    norms from the unit norms times the coefficients so far, so a later stage needs no
//!    re-read) and `coef` (`coef.wgsl`: the total, the non-finite policy, the adaptive
//!    state, each unit's coefficient times this stage's factor); where the units fit one
//!    workgroup, one `finish` does all of it for a stage and the global stages after it
//!    (the recording says which);
//! 3. `rewrite` (`rewrite.wgsl`): the fused elementwise pass, whose workgroups return at
//!    once where nothing must change;
//! 4. the report copy into a pooled readback buffer.
//!
//! Every configuration (a global-norm clip, the split API, a value clip, each rule and
//! chain of rules, accumulation, per-example clipping) is a program plus a [`Step`]
//! saying which stages run. Each step's host values go into a parameter slot
//! ([`StepSlots`]; steps whose values do not change share one), so steps encoded before
//! one submission keep their own parameters.
//! Which stages a step runs is its recording (`src/recording.rs`), which the CPU twin
//! (`src/cpu/engine.rs`) executes too.

mod build;
mod record;

use record::Recorded;

use std::sync::Arc;

use super::context::{guarded, GpuContext};
use super::readback::{ReadbackLayout, ReportPool};
use super::reduction::SegmentReduction;
use super::resources::{ChunkTable, DispatchSlots, StepParams, StepSlots, Timestamps};
use crate::chain::Program;
use crate::error::ClipError;
use crate::norm::Norm;
use crate::recording::Profile;
pub(crate) use crate::recording::{Dispatch, Mode, Source};
use crate::shaders::abi;

/// One step: what it does and its parameters.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Step {
    /// Norm order (selects the pipelines).
    pub norm: Norm,
    /// Host values of the step (`seq` is filled in by its parameter slots).
    pub params: StepParams,
    /// Which stages run.
    pub mode: Mode,
    /// Read back the last stage's group norms, unit norms and coefficients too.
    pub detail: bool,
}

/// The resources of one norm stage.
struct GpuStage {
    /// Its group norms from the unit norms (times the coefficients so far), unless its
    /// groups are the units of the first stage.
    groups: Option<(wgpu::BindGroup, [u32; 3])>,
    group_accs: wgpu::Buffer,
    finish: wgpu::BindGroup,
    coefs: wgpu::BindGroup,
    /// The finish that runs the global stages after it too, when a step may ask for it
    /// (`Profile::opens_run`).
    run: Option<wgpu::BindGroup>,
}

/// The chunks over spans (maximal runs of touching tensors, so small tensors share
/// workgroups) of an engine with one coefficient and no noise.
struct Spans {
    /// The chunk table, rewritten in place when the tensors move within their buffers.
    chunks: ChunkTable,
    /// Per window: its slice of the chunk table.
    slots: DispatchSlots,
    /// One accumulator per chunk.
    partials: wgpu::Buffer,
    /// The bind group and grid per window of the reduce over the spans and the rewrite.
    reduce: Vec<(wgpu::BindGroup, [u32; 3])>,
}

/// Where an engine's tensors lie, as far as its bind groups and table sizes see it: the
/// shape of the gradients' plan and their buffers, and the parameters' (AGC).
#[derive(Debug, PartialEq)]
pub(crate) struct Placement {
    grads: (build::PlanShape, Vec<wgpu::Buffer>),
    params: Option<(build::PlanShape, Vec<wgpu::Buffer>)>,
}

/// A program planned on one device, encoded step after step.
pub(crate) struct Engine {
    ctx: GpuContext,
    program: Program,
    /// What of the program decides its recordings.
    profile: Profile,
    grads: SegmentReduction,
    params: Option<SegmentReduction>,
    stages: Vec<GpuStage>,
    /// A single global stage whose unit norms nobody reads: the total straight from the
    /// chunk partials, without the per-unit combine.
    finish_partials: Option<wgpu::BindGroup>,
    /// With one coefficient and no noise: the chunks over spans, which such a direct step
    /// reduces instead of the per-unit ones and the rewrite runs over.
    spans: Option<Spans>,
    coefs_grid: [u32; 3],
    /// Units may share 32-bit words (16-bit units ending mid-word): the atomic rewrite.
    shared_words: bool,
    /// What the resources that depend on where the tensors lie were made for, so that a
    /// move that keeps their shape only rewrites the chunk tables and makes the bind groups
    /// over the buffers that changed (`Engine::moved_in_place`).
    placed: Placement,
    slots: StepSlots,
    state: wgpu::Buffer,
    reports: wgpu::Buffer,
    coef_buf: wgpu::Buffer,
    pool: Arc<ReportPool>,
    layout: ReadbackLayout,
    timestamps: Option<Timestamps>,
    /// The recording of the last step and its pipelines (see [`Recorded`]).
    recorded: std::sync::Mutex<Recorded>,
}

impl Engine {
    /// Where the parts of this engine's readbacks lie.
    pub(crate) fn layout(&self) -> ReadbackLayout {
        self.layout
    }

    /// The program.
    pub(crate) fn program(&self) -> &Program {
        &self.program
    }

    /// The context it runs on.
    pub(crate) fn ctx(&self) -> &GpuContext {
        &self.ctx
    }

    /// The pool of report readback buffers.
    pub(crate) fn pool(&self) -> Arc<ReportPool> {
        self.pool.clone()
    }

    /// The per-unit coefficients, the reports and the parameter slots, for passes that
    /// consume them.
    pub(crate) fn outputs(&self) -> (&wgpu::Buffer, &wgpu::Buffer, &StepSlots) {
        (&self.coef_buf, &self.reports, &self.slots)
    }

    /// Makes every following step write GPU timestamps at the start and end of its
    /// compute pass; `None` stops it.
    pub(crate) fn set_timestamp_writes(&mut self, timestamps: Option<Timestamps>) {
        self.timestamps = timestamps;
    }

    /// Overwrites the unit norms of the gradients (and of the parameters) with merged
    /// ones, for a [`Mode::FromUnits`] step submitted after this call.
    pub(crate) fn write_units(
        &self,
        grads: &[abi::Acc],
        params: Option<&[abi::Acc]>,
    ) -> Result<(), ClipError> {
        let (device, queue) = (&self.ctx.inner.device, &self.ctx.inner.queue);
        guarded(device, || {
            let tables =
                std::iter::once((&self.grads, grads)).chain(self.params.iter().zip(params));
            for (red, accs) in tables.filter(|(_, a)| !a.is_empty()) {
                queue.write_buffer(&red.segment_accs, 0, bytemuck::cast_slice(accs));
            }
            Ok(())
        })
    }

    /// The device state (for a caller's pass that reads the loss scale).
    pub(crate) fn state_buffer(&self) -> &wgpu::Buffer {
        &self.state
    }

    /// Reads the device state back (waits for the GPU).
    pub(crate) fn read_state(&self) -> Result<Vec<u32>, ClipError> {
        super::readback::read_words(&self.ctx, &self.state)
    }

    /// Overwrites the device state with `words`.
    pub(crate) fn write_state(&self, words: &[u32]) -> Result<(), ClipError> {
        let queue = &self.ctx.inner.queue;
        guarded(&self.ctx.inner.device, || {
            queue.write_buffer(&self.state, 0, bytemuck::cast_slice(words));
            Ok(())
        })
    }
}
