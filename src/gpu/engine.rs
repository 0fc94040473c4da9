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
//!    state, each unit's coefficient times this stage's factor, and the rewrite's
//!    indirect arguments);
//! 3. `rewrite` (`rewrite.wgsl`): the fused elementwise pass, zero workgroups when nothing
//!    must change;
//! 4. the report copy into a pooled readback buffer.
//!
//! Every configuration (a global-norm clip, the split API, a value clip, each rule and
//! chain of rules, accumulation, per-example clipping) is a program plus a [`Step`]
//! saying which stages run. Each step's host values go into its own parameter slot
//! ([`StepSlots`]), so steps encoded before one submission keep their own parameters.
//! The CPU twin is `src/cpu/engine.rs`.

use std::sync::Arc;

use super::batch::{plan_tensors, GpuTensor};
use super::context::{guarded, GpuContext};
use super::readback::{ReadbackLayout, ReportPool, REPORT_BYTES};
use super::reduction::SegmentReduction;
use super::resources::{
    bind, storage_init, storage_zeroed, table, timestamp_writes, whole, window_groups,
    DispatchParams, DispatchSlots, StepParams, StepSlots, Timestamps,
};
use crate::chain::{Program, NO_GROUP};
use crate::error::ClipError;
use crate::norm::Norm;
use crate::plan::{fold_grid, Plan};
use crate::shaders::abi::{self, StageParams, ACC_BYTES, ADAPTIVE_NONE};
use crate::shaders::{BindLayout, Kernel};

/// What one step does: the valid combinations of the engine's stages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Mode {
    /// Norms from the gradients and every stage's finish; nothing rewritten (a total
    /// norm, PyTorch's `get_total_norm`).
    Measure,
    /// Norms, every stage and the unit coefficients, no rewrite: coefficients read by
    /// another pass (deferred scaling, the fused optimizer, per-example sums).
    Coefficients,
    /// Norms, coefficients and the rewrite: a clip.
    Clip,
    /// A total norm given by the caller (the split API): coefficients and the rewrite.
    GivenNorm,
    /// The rewrite alone, dispatched in full: a value clamp with no norm.
    ValueOnly,
    /// The unit norms and nothing else (the first half of a sharded step); its readback
    /// holds the unit norms of the gradients, then of the parameters.
    UnitsOnly,
    /// From the unit norms already in place ([`Engine::write_units`], after the ranks
    /// merged them): the stages from their `combine` on, then the rewrite.
    FromUnits,
}

impl Mode {
    /// Runs `reduce` over the gradients.
    fn reduces(self) -> bool {
        matches!(
            self,
            Mode::Measure | Mode::Coefficients | Mode::Clip | Mode::UnitsOnly
        )
    }

    /// Runs the stages' `combine` of group norms.
    fn groups(self) -> bool {
        matches!(
            self,
            Mode::Measure | Mode::Coefficients | Mode::Clip | Mode::FromUnits
        )
    }

    /// Runs the norm stages (`finish`, and `coefs` when [`Mode::coefs`]).
    fn stages(self) -> bool {
        !matches!(self, Mode::ValueOnly | Mode::UnitsOnly)
    }

    /// Runs `coef`'s per-unit entry.
    fn coefs(self) -> bool {
        matches!(
            self,
            Mode::Coefficients | Mode::Clip | Mode::GivenNorm | Mode::FromUnits
        )
    }

    /// Runs `rewrite`.
    fn rewrite(self) -> bool {
        matches!(
            self,
            Mode::Clip | Mode::GivenNorm | Mode::ValueOnly | Mode::FromUnits
        )
    }

    /// Copies its reports into a readback buffer.
    pub(crate) fn reads_back(self) -> bool {
        self != Mode::ValueOnly
    }
}

/// One step: what it does and its parameters.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Step {
    /// Norm order (selects the pipelines).
    pub norm: Norm,
    /// Host values of the step (`seq` is filled in by the engine).
    pub params: StepParams,
    /// Which stages run.
    pub mode: Mode,
    /// Read back the last stage's group norms, unit norms and coefficients too.
    pub units: bool,
}

/// One entry of a step's recording: a dispatch (or, for a reduction, its pair of
/// dispatches) and what it binds. A step is recorded once into this list, which names
/// the pipelines to build and is then replayed into the compute pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Dispatch {
    /// The gradients' reduce over spans, for a direct step (one coefficient, no noise).
    SpanReduce,
    /// The chunk partials of the gradients (or, `params`, of the parameters, in L2),
    /// then the unit norms when `combine`.
    Reduce { params: bool, combine: bool },
    /// Stage `k`'s group norms from the unit norms.
    Groups(usize),
    /// Stage `k`'s total, policy and adaptive state; `partials`: straight from the chunk
    /// partials.
    Finish { stage: usize, partials: bool },
    /// Stage `k`'s unit coefficients.
    Coefs(usize),
    /// Stage `k` takes back what it recorded when a later stage held the step.
    Undo(usize),
    /// The elementwise pass over every binding window; `indirect`: sized by `coef`.
    Rewrite { indirect: bool },
}

/// The resources of one norm stage.
struct GpuStage {
    /// Its group norms from the unit norms (times the coefficients so far), unless its
    /// groups are the units of the first stage.
    groups: Option<(wgpu::BindGroup, [u32; 3])>,
    group_accs: wgpu::Buffer,
    finish: wgpu::BindGroup,
    coefs: wgpu::BindGroup,
    adaptive: u32,
    formula: u32,
}

/// A program planned on one device, encoded step after step.
pub(crate) struct Engine {
    ctx: GpuContext,
    program: Program,
    grads: SegmentReduction,
    params: Option<SegmentReduction>,
    stages: Vec<GpuStage>,
    /// A single global stage whose unit norms nobody reads: the total straight from the
    /// chunk partials, without the per-unit combine.
    finish_partials: Option<wgpu::BindGroup>,
    /// With one coefficient and no noise: the reduce over spans (bind group and grid per
    /// window) that such a direct step runs instead of the per-unit one.
    span_reduce: Option<Vec<(wgpu::BindGroup, [u32; 3])>>,
    coefs_grid: [u32; 3],
    /// Per binding window of the gradients: bind group and offset of its indirect args.
    /// Per window: the rewrite's bind group, the offset of its indirect counts and its
    /// full grid (dispatched directly by a value clip alone, which always rewrites).
    rewrites: Vec<(wgpu::BindGroup, u64, [u32; 3])>,
    args_out: wgpu::Buffer,
    /// Units may share 32-bit words (16-bit units ending mid-word): the atomic rewrite.
    shared_words: bool,
    slots: StepSlots,
    state: wgpu::Buffer,
    /// First word of every stage's state block (each gets the step's tag).
    blocks: Vec<usize>,
    reports: wgpu::Buffer,
    coef_buf: wgpu::Buffer,
    pool: Arc<ReportPool>,
    layout: ReadbackLayout,
    seq: u32,
    timestamps: Option<Timestamps>,
    /// The recording of the last step and its pipelines, kept so that a warm step
    /// allocates nothing.
    recording: std::sync::Mutex<(Vec<Dispatch>, Vec<Kernel>)>,
}

/// The `Coef` bind group of one stage and dispatch slot.
struct CoefBinding<'a> {
    state: &'a wgpu::Buffer,
    reports: &'a wgpu::Buffer,
    slots: &'a StepSlots,
    dispatch: &'a DispatchSlots,
    stage_params: &'a wgpu::Buffer,
    coefs: &'a wgpu::Buffer,
    w_accs: &'a wgpu::Buffer,
    args_full: &'a wgpu::Buffer,
    args_out: &'a wgpu::Buffer,
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
                (10, whole(self.args_full)),
                (11, whole(self.args_out)),
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
        let grads_red = SegmentReduction::new(device, kernels, &grad_plan, &grad_buffers, &slots);
        let params_red = param_plan
            .as_ref()
            .map(|(plan, bufs)| SegmentReduction::new(device, kernels, plan, bufs, &slots));
        let n_units = program.units.len();
        let n_stages = program.stages.len();
        let (state, pool) = kept.unzip();
        let state = state.unwrap_or_else(|| {
            storage_init(
                device,
                "gradclip state",
                bytemuck::cast_slice(&program.fresh_state().words),
                wgpu::BufferUsages::COPY_SRC | wgpu::BufferUsages::COPY_DST,
            )
        });
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
        let stage_params: Vec<StageParams> = program.stages.iter().map(|s| s.params).collect();
        let stage_params = table(device, "gradclip stage params", &stage_params);
        // One coefficient for everything and no noise (which needs each element's tensor and
        // index): the rewrite runs over spans, maximal runs of touching tensors, so small
        // tensors share workgroups and no word has two writers.
        let single_global = n_stages == 1 && program.stages[0].is_uniform();
        let spans = single_global && !noise;
        let rewrite_grids: Vec<[u32; 3]> = grad_plan
            .windows
            .iter()
            .map(|w| fold_grid(if spans { w.apply_count } else { w.reduce_count }, max_dim))
            .collect();
        let args_full = table(device, "gradclip rewrite grid", &rewrite_grids);
        let args_out = storage_zeroed(
            device,
            "gradclip rewrite indirect",
            rewrite_grids.len() as u64 * 12,
            wgpu::BufferUsages::INDIRECT,
        );
        // Dispatch parameters: per stage its groups/finish and its coefs; then the
        // finish of a single global stage straight from the chunk partials.
        let mut dispatch = Vec::new();
        for (k, st) in program.stages.iter().enumerate() {
            let stage = DispatchParams {
                global: st.is_global() as u32,
                first: (k == 0) as u32,
                stage: k as u32,
                state_base: st.state_base as u32,
                ..DispatchParams::default()
            };
            dispatch.push(DispatchParams {
                n_chunks: st.group_ranges.len() as u32,
                ..stage
            });
            dispatch.push(DispatchParams {
                n_chunks: n_units as u32,
                ..stage
            });
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
            global: 1,
            first: 1,
            state_base: program.stages[0].state_base as u32,
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
            args_full: &args_full,
            args_out: &args_out,
        };
        let coef_layout = kernels.layout(BindLayout::Coef);
        let span_chunks = spans.then(|| {
            let ranges: Vec<DispatchParams> = (grad_plan.windows.iter())
                .map(|w| DispatchParams::range(w.apply_first, w.apply_count))
                .collect();
            let chunks = table(device, "gradclip span chunks", &grad_plan.apply_chunks);
            (chunks, DispatchSlots::new(device, &ranges))
        });
        // A step that needs no unit norms reduces the spans: small tensors share chunks.
        let span_reduce = span_chunks.as_ref().map(|(chunks, span_slots)| {
            let partials = storage_zeroed(
                device,
                "gradclip span partials",
                grad_plan.apply_chunks.len() as u64 * ACC_BYTES,
                wgpu::BufferUsages::empty(),
            );
            let layout = kernels.layout(BindLayout::Reduce);
            let groups = window_groups(device, layout, &grad_plan, &grad_buffers, |wi| {
                vec![
                    (1, whole(chunks)),
                    (2, whole(&partials)),
                    (3, slots.binding()),
                    (4, span_slots.slot(wi)),
                ]
            });
            let grids = (grad_plan.windows.iter()).map(|w| fold_grid(w.apply_count, max_dim));
            (groups.into_iter().zip(grids).collect::<Vec<_>>(), partials)
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
                        (4, dispatch.slot(2 * k)),
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
                let partials = span_reduce.as_ref().map_or(&grads_red.partials, |s| &s.1);
                finish_partials = Some(binding(partials, 2 * n_stages));
            }
            stages.push(GpuStage {
                finish: binding(&group_accs, 2 * k),
                coefs: binding(&group_accs, 2 * k + 1),
                groups,
                group_accs,
                adaptive: st.adaptive,
                formula: st.formula as u32,
            });
        }
        let (rewrite_chunks, rewrite_slots) = match &span_chunks {
            Some((chunks, slots)) => (chunks, slots),
            None => (&grads_red.chunks, &grads_red.slots),
        };
        let rewrite_layout = kernels.layout(BindLayout::Rewrite);
        let rewrites = window_groups(device, rewrite_layout, &grad_plan, &grad_buffers, |wi| {
            vec![
                (1, whole(rewrite_chunks)),
                (2, whole(&coef_buf)),
                (3, slots.binding()),
                (4, rewrite_slots.slot(wi)),
                (6, whole(&reports)),
            ]
        })
        .into_iter()
        .zip(&rewrite_grids)
        .enumerate()
        .map(|(wi, (group, &grid))| (group, wi as u64 * 12, grid))
        .collect();
        // A 16-bit unit chunk that is strided or starts or ends mid-word shares a word
        // (spans never do: a half outside a span has no writer).
        let shared_words = !spans
            && grad_plan.reduce_chunks.iter().any(|c| {
                let half = c[3] != crate::shaders::abi::DTYPE_F32;
                half && (c[4] != 1 || c[1] % 2 == 1 || c[2] % 2 == 1)
            });
        let layout = ReadbackLayout::of(&program);
        let engine = Engine {
            ctx: ctx.clone(),
            grads: grads_red,
            params: params_red,
            stages,
            finish_partials,
            span_reduce: span_reduce.map(|s| s.0),
            coefs_grid: fold_grid((n_units as u32).div_ceil(64), max_dim),
            rewrites,
            args_out,
            shared_words,
            slots,
            state,
            blocks: program.stages.iter().map(|s| s.state_base).collect(),
            reports,
            coef_buf,
            pool: pool.unwrap_or_else(|| ReportPool::new(layout.size())),
            layout,
            seq: 0,
            timestamps: None,
            recording: Default::default(),
            program,
        };
        Ok(engine)
    }

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

    /// Records `step` into `out` (cleared first): every dispatch it makes, in order. The
    /// one decision of what a step runs, for building its pipelines and for encoding it.
    fn record(&self, step: &Step, out: &mut Vec<Dispatch>) {
        let direct = self.direct(step);
        out.clear();
        if direct && self.span_reduce.is_some() {
            out.push(Dispatch::SpanReduce);
        } else if step.mode.reduces() {
            out.push(Dispatch::Reduce {
                params: false,
                combine: !direct,
            });
            if self.params.is_some() {
                out.push(Dispatch::Reduce {
                    params: true,
                    combine: true,
                });
            }
        }
        if step.mode.stages() {
            for (k, stage) in self.stages.iter().enumerate() {
                if stage.groups.is_some() && step.mode.groups() && !direct {
                    out.push(Dispatch::Groups(k));
                }
                let partials = direct && k == 0 && self.finish_partials.is_some();
                out.push(Dispatch::Finish { stage: k, partials });
                if step.mode.coefs() && self.coefs_grid[0] > 0 {
                    out.push(Dispatch::Coefs(k));
                }
            }
            // A later stage may hold the step: the adaptive stages before the last take
            // back what they recorded (`undo` checks).
            let earlier = self.stages.len().saturating_sub(1);
            for k in (0..earlier).filter(|&k| self.stages[k].adaptive != ADAPTIVE_NONE) {
                out.push(Dispatch::Undo(k));
            }
        }
        if step.mode.rewrite() {
            out.push(Dispatch::Rewrite {
                indirect: step.mode != Mode::ValueOnly,
            });
        }
    }

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
            Dispatch::Rewrite { .. } => self.rewrite_kernel(&step.params),
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

    /// A step whose single global stage finishes straight from the chunk partials,
    /// without unit norms.
    fn direct(&self, step: &Step) -> bool {
        step.mode.reduces()
            && step.mode != Mode::UnitsOnly
            && !step.units
            && self.finish_partials.is_some()
    }

    /// Records `step` and builds the pipelines it needs (see `Kernels::prepare`); the
    /// recording stays in `self.recording` for [`Engine::encode`] to replay.
    pub(crate) fn prepare(&self, step: &Step) -> Result<(), ClipError> {
        let (device, kernels) = (&self.ctx.inner.device, &self.ctx.inner.kernels);
        let mut kept = self.recording.lock().unwrap_or_else(|e| e.into_inner());
        let (recording, list) = &mut *kept;
        self.record(step, recording);
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
    /// reports once the encoder has run (when the step asks for one). A device that cannot
    /// build one of the step's pipelines is an error before anything is recorded.
    pub(crate) fn encode(
        &mut self,
        encoder: &mut wgpu::CommandEncoder,
        step: Step,
        extra: impl FnOnce(&mut wgpu::ComputePass<'_>, u32),
    ) -> Result<Option<wgpu::Buffer>, ClipError> {
        self.prepare(&step)?;
        let ctx = self.ctx.clone();
        let (device, kernels) = (&ctx.inner.device, &ctx.inner.kernels);
        self.seq = self.seq.wrapping_add(1);
        let params = StepParams {
            seq: self.seq,
            ..step.params
        };
        let queue = &ctx.inner.queue;
        let state = (&self.state, &self.blocks[..]);
        let slot = (self.slots).write(queue, encoder, &params, state, &self.reports);
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
                        let spans = self.span_reduce.as_deref().unwrap_or_default();
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
                    Dispatch::Rewrite { indirect } => {
                        pass.set_pipeline(&pipeline());
                        for (group, args, grid) in &self.rewrites {
                            pass.set_bind_group(0, group, &[slot]);
                            if indirect {
                                pass.dispatch_workgroups_indirect(&self.args_out, *args);
                            } else {
                                pass.dispatch_workgroups(grid[0], grid[1], 1);
                            }
                        }
                    }
                }
            }
            drop(kept);
            extra(&mut pass, slot);
        }
        if !step.mode.reads_back() {
            return Ok(None);
        }
        let readback = self.pool.take(device)?;
        let layout = self.layout;
        let mut copy = |from: &wgpu::Buffer, to: std::ops::Range<u64>| {
            if to.end > to.start {
                encoder.copy_buffer_to_buffer(from, 0, &readback, to.start, to.end - to.start);
            }
        };
        if step.mode == Mode::UnitsOnly {
            let tables = std::iter::once(&self.grads).chain(&self.params);
            for (k, red) in tables.enumerate() {
                copy(&red.segment_accs, layout.unit_table(k as u64));
            }
            return Ok(Some(readback));
        }
        copy(&self.reports, layout.headers());
        if step.units {
            let last = &self.stages[self.stages.len() - 1];
            copy(&last.group_accs, layout.groups());
            copy(&self.grads.segment_accs, layout.units());
            copy(&self.coef_buf, layout.coefs());
        }
        Ok(Some(readback))
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
