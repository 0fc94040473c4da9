//! A clipping policy on host slices: a program of the CPU engine (`engine.rs`) built from a
//! [`ClipPolicy`], step after step, keeping its state. Norms are reduced exactly in f64
//! (the oracle of the GPU's f32 accumulators).

use std::sync::Arc;

use super::engine::{self, CpuStep, Grads};
use crate::chain::{
    check_lens, ChainKind, ClipPolicy, PolicyState, Program, TensorInfo, UnitLayout,
};
use crate::dtype::{GradMut, GradRef};
use crate::error::ClipError;
use crate::norm::PartialNorm;
use crate::recording::{record, Dispatch, Mode, Profile};
use crate::report::STATUS_HELD;
use crate::report::{ClipReport, PolicyOutcome, ReportShape, StageOutcome, UnitNorms};

/// Runs a [`ClipPolicy`] on host slices, step after step, keeping its state.
#[derive(Debug, Clone)]
pub struct CpuPolicy {
    policy: ClipPolicy,
    infos: Vec<TensorInfo>,
    /// The tensors' lengths, side by side for the check of every step.
    lens: Vec<u64>,
    program: Program,
    shape: Arc<ReportShape>,
    state: PolicyState,
    /// The last step's outcome: its buffers are the next step's (boxed: a policy stays
    /// small to move around).
    outcome: Box<engine::Outcome>,
    /// What of the program decides its recordings, and the last step's recording (its
    /// buffer is the next step's).
    profile: Profile,
    recording: Vec<Dispatch>,
}

impl CpuPolicy {
    /// A policy over tensors described by `infos` (names and shapes, in batch order).
    pub fn new(policy: ClipPolicy, infos: &[TensorInfo]) -> Result<CpuPolicy, ClipError> {
        let program = Program::new(&policy, infos)?;
        let profile = Profile::of(&program, policy.noise.is_some());
        Ok(CpuPolicy {
            state: program.fresh_state(),
            shape: ReportShape::new(&program, infos),
            policy,
            infos: infos.to_vec(),
            lens: infos.iter().map(TensorInfo::len).collect(),
            program,
            outcome: Box::default(),
            profile,
            recording: Vec::new(),
        })
    }

    /// The state to save (see [`PolicyState::to_bytes`]).
    pub fn state(&self) -> &PolicyState {
        &self.state
    }

    /// The policy it runs.
    pub fn policy(&self) -> &ClipPolicy {
        &self.policy
    }

    /// The program it runs.
    pub(crate) fn program(&self) -> &Program {
        &self.program
    }

    /// The program, the state and the kept outcome, for a step run outside
    /// [`CpuPolicy::step`] (a sharded step); [`CpuPolicy::commit`] then counts it.
    pub(crate) fn parts_mut(&mut self) -> (&Program, &mut PolicyState, &mut engine::Outcome) {
        (&self.program, &mut self.state, &mut self.outcome)
    }

    /// Runs `program` instead (the same chain cut to a shard: same units and state).
    pub(crate) fn set_program(&mut self, program: Program) {
        self.profile = Profile::of(&program, self.policy.noise.is_some());
        self.program = program;
    }

    /// Restores a saved state (from either backend).
    pub fn set_state(&mut self, mut state: PolicyState) -> Result<(), ClipError> {
        state.check_fits(&self.program.fresh_state())?;
        // The per-step words are not part of a state (as on the GPU).
        for stage in &self.program.stages {
            stage.clear_step_words(&mut state.words);
        }
        self.state = state;
        Ok(())
    }

    /// Checks the inputs of the next step (gradients of lengths `lens`, the parameters);
    /// returns its parameters.
    pub(crate) fn check(
        &self,
        lens: impl ExactSizeIterator<Item = u64>,
        params: Option<&[GradRef<'_>]>,
    ) -> Result<CpuStep, ClipError> {
        self.check_lens(lens)?;
        self.next_step(params, |lens| self.check_lens(lens.iter().copied()))
    }

    /// Checks that tensors of lengths `lens` are the ones this policy was built for.
    pub(crate) fn check_lens(
        &self,
        lens: impl ExactSizeIterator<Item = u64>,
    ) -> Result<(), ClipError> {
        check_lens(&self.lens, &self.infos, lens)
    }

    /// [`CpuPolicy::check`] of gradients of lengths `lens`, with `check_lens` judging
    /// the gradients' (and parameters') lengths.
    pub(crate) fn check_with(
        &self,
        lens: &[u64],
        params: Option<&[GradRef<'_>]>,
        check_lens: impl Fn(&[u64]) -> Result<(), ClipError>,
    ) -> Result<CpuStep, ClipError> {
        check_lens(lens)?;
        self.next_step(params, check_lens)
    }

    /// The parameters of the next step once the gradients' lengths passed: the
    /// parameters (AGC) judged by `check_lens`, the schedule's multiplier at this step.
    fn next_step(
        &self,
        params: Option<&[GradRef<'_>]>,
        check_lens: impl Fn(&[u64]) -> Result<(), ClipError>,
    ) -> Result<CpuStep, ClipError> {
        let policy = &self.policy;
        if self.program.needs_params() {
            let Some(p) = params else {
                return Err(ClipError::InvalidConfig(
                    "AGC needs the parameters alongside the gradients".into(),
                ));
            };
            let plens: Vec<u64> = p.iter().map(|g| g.len() as u64).collect();
            check_lens(&plens)?;
        }
        Ok(CpuStep {
            norm: policy.norm,
            policy: policy.non_finite,
            multiplier: policy.schedule.checked(self.state.step)?,
            given: None,
            noise: policy.noise,
            step: self.state.step,
            clamp: policy.value,
            loss_scale: policy.loss_scale,
        })
    }

    /// Runs one step on `grads` in place; AGC also needs the parameters (same shapes).
    /// Bad input is an error that leaves the gradients and the state untouched. A
    /// non-finite norm under [`crate::NonFinitePolicy::Error`] leaves the gradients and
    /// the adaptive state untouched but counts as a step, as on the GPU, where the verdict
    /// is known only once the report is read: the step counter numbers every step run.
    pub fn step(
        &mut self,
        grads: &mut [GradMut<'_>],
        params: Option<&[GradRef<'_>]>,
    ) -> Result<ClipReport, ClipError> {
        let step = self.check(grads.iter().map(|g| g.as_ref().len() as u64), params)?;
        let params = params.filter(|_| self.program.needs_params());
        // Nothing fails from here on: the step runs on the kept state and buffers.
        let mode = match self.program.kind {
            ChainKind::Stages => Mode::Clip,
            ChainKind::Measure => Mode::Measure,
            ChainKind::ValueOnly => Mode::ValueOnly,
        };
        self.execute(mode, Grads::Write(grads), params, &step);
        self.commit(step)
    }

    /// Records a step in `mode` (the recording the GPU would replay) and executes it on
    /// the kept state and buffers.
    pub(crate) fn execute(
        &mut self,
        mode: Mode,
        grads: Grads<'_, '_>,
        params: Option<&[GradRef<'_>]>,
        step: &CpuStep,
    ) {
        let detail = self.policy.report_groups;
        record(&self.profile, mode, detail, &mut self.recording);
        let (program, state, out) = (&self.program, &mut self.state, &mut self.outcome);
        engine::execute(&self.recording, grads, params, program, step, state, out);
    }

    /// Runs one step of a global-norm chain (`ClipPolicy::global_norm`, with its
    /// schedule, non-finite policy and value clamp) with the total norm `total` instead of
    /// the norm of `grads`: the second half of the split API (PyTorch's
    /// `clip_grads_with_norm_`), after every shard's [`PartialNorm`] (the `partial` of a
    /// [`ClipPolicy::total_norm`] step's report) was combined. Another chain, or a norm
    /// of another order, is an error that changes nothing.
    pub fn step_with_norm(
        &mut self,
        grads: &mut [GradMut<'_>],
        total: &PartialNorm,
    ) -> Result<ClipReport, ClipError> {
        let mut step = self.check(grads.iter().map(|g| g.as_ref().len() as u64), None)?;
        self.policy.check_given(total)?;
        step.given = Some(total.acc());
        // No unit norms this step: none of an earlier step's may remain.
        self.outcome.units.clear();
        self.execute(Mode::GivenNorm, Grads::Write(grads), None, &step);
        self.commit(step)
    }

    /// Runs one step without touching the gradients: the norms, the state and the report
    /// as [`CpuPolicy::step`] would leave them, and the coefficients for the caller to
    /// apply (deferred scaling, the CPU twin of [`crate::GpuClipper::encode_deferred`]).
    pub fn step_deferred(
        &mut self,
        grads: &[GradRef<'_>],
        params: Option<&[GradRef<'_>]>,
    ) -> Result<DeferredStep, ClipError> {
        self.defer(grads, params, None)
    }

    /// [`CpuPolicy::step_deferred`] into the buffers of an earlier step's `kept` result
    /// (a warm step allocates nothing per tensor; the program, and so the units' layouts,
    /// stay the same for a policy's life).
    pub(crate) fn defer(
        &mut self,
        grads: &[GradRef<'_>],
        params: Option<&[GradRef<'_>]>,
        kept: Option<DeferredStep>,
    ) -> Result<DeferredStep, ClipError> {
        let lens = grads.iter().map(|g| g.len() as u64);
        let step = self.check(lens.clone(), params)?;
        let params = params.filter(|_| self.program.needs_params());
        self.execute(Mode::Coefficients, Grads::Read(grads), params, &step);
        let out = &self.outcome;
        let held = out.stages[0].finish.status & STATUS_HELD != 0;
        let (mut coefs, layouts, mut kept_lens) = match kept {
            Some(d) if d.layouts.len() == grads.len() => (d.coefs, d.layouts, d.lens),
            _ => (
                Vec::new(),
                self.program.unit_layouts(grads.len()),
                Vec::new(),
            ),
        };
        coefs.clone_from(&out.coefs);
        kept_lens.clear();
        kept_lens.extend(lens);
        let report = self.commit(step)?;
        Ok(DeferredStep {
            report,
            coefs,
            held,
            step,
            layouts,
            lens: kept_lens,
        })
    }

    /// Counts the step that just ran on the state and into the kept outcome, and
    /// reports it.
    pub(crate) fn commit(&mut self, step: CpuStep) -> Result<ClipReport, ClipError> {
        self.state.step = self.state.step.wrapping_add(1);
        let out = &self.outcome;
        // A step from a given total has no unit norms to detail.
        let detail = (self.policy.report_groups && step.given.is_none()).then(|| UnitNorms {
            groups: out
                .stages
                .last()
                .map(|s| s.groups.clone())
                .unwrap_or_default(),
            units: out.units.clone(),
            coefs: out.coefs.clone(),
        });
        PolicyOutcome {
            step: step.step,
            norm: step.norm,
            noise_std: step.noise.map_or(0.0, |n| n.sigma),
            stages: (out.stages.iter())
                .map(|s| StageOutcome {
                    total: s.finish.total,
                    threshold: s.finish.threshold,
                    coef: s.finish.coef,
                    status: s.finish.status,
                    clipped: s.clipped,
                    skips: s.finish.skips,
                    loss_scale: out.loss_scale,
                })
                .collect(),
            units: self.program.units.len() as u32,
            policy: step.policy,
            shape: self.shape.clone(),
            detail,
            loss_scaled: step.loss_scale.is_some(),
        }
        .report()
    }
}

/// A step whose coefficients were computed but not applied ([`crate::CpuClipper::step_deferred`]).
#[derive(Debug, Clone)]
pub struct DeferredStep {
    /// The step's report.
    pub report: ClipReport,
    /// The coefficient of every unit (for a loss-scaled chain, times `1 / scale`).
    pub coefs: Vec<f32>,
    /// The step is held (non-finite under `Error` or `SkipStep`): apply nothing.
    pub held: bool,
    step: CpuStep,
    layouts: Vec<UnitLayout>,
    lens: Vec<u64>,
}

impl DeferredStep {
    /// Where the units of each tensor lie.
    pub fn layouts(&self) -> &[UnitLayout] {
        &self.layouts
    }

    /// The coefficient of every element of tensor `tensor` and whether NaNs become 0, when
    /// that is all its clip does (one unit, no noise, no clamp): the loops that read it
    /// can then scale a block at once.
    pub(crate) fn uniform(&self, tensor: usize) -> Option<(f32, bool)> {
        let layout = self.layouts[tensor];
        let plain = self.step.noise.is_none_or(|n| n.sigma == 0.0) && self.step.clamp.is_none();
        let zero_nans = self.step.policy == crate::NonFinitePolicy::ZeroNans;
        (layout.count == 1 && plain).then(|| (self.coefs[layout.first as usize], zero_nans))
    }

    /// The clipped value of element `index` of tensor `tensor`, whose gradient is `x`:
    /// what the in-place step would have written there (NaN zeroing, the unit's
    /// coefficient, noise and value clamping; `x` itself when held). `None` for a tensor
    /// or an index the step does not have.
    pub fn clipped(&self, tensor: usize, index: u32, x: f32) -> Option<f32> {
        let len = *self.lens.get(tensor)?;
        ((index as u64) < len).then(|| self.clip_at(tensor, index, x))
    }

    /// [`DeferredStep::clipped`] of an element known to exist.
    pub(crate) fn clip_at(&self, tensor: usize, index: u32, x: f32) -> f32 {
        if self.held {
            return x;
        }
        let coef = self.coefs[self.layouts[tensor].unit_of(index) as usize];
        engine::transform(&self.step, coef, tensor as u32, index as u64, x)
    }
}
