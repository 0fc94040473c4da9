//! A clipping policy on host slices: a program of the CPU engine (`engine.rs`) built from a
//! [`ClipPolicy`], step after step, keeping its state. Norms are reduced exactly in f64
//! (the oracle of the GPU's f32 accumulators).

use std::sync::Arc;

use super::engine::{self, CpuStep};
use crate::chain::{check_shapes, ClipPolicy, PolicyState, Program, TensorInfo, UnitLayout};
use crate::dtype::{GradMut, GradRef};
use crate::error::ClipError;
use crate::report::STATUS_HELD;
use crate::report::{PolicyOutcome, PolicyReport, ReportShape, StageOutcome, UnitNorms};

/// Runs a [`ClipPolicy`] on host slices, step after step, keeping its state.
#[derive(Debug, Clone)]
pub struct CpuPolicy {
    policy: ClipPolicy,
    infos: Vec<TensorInfo>,
    program: Program,
    shape: Arc<ReportShape>,
    state: PolicyState,
}

impl CpuPolicy {
    /// A policy over tensors described by `infos` (names and shapes, in batch order).
    pub fn new(policy: ClipPolicy, infos: &[TensorInfo]) -> Result<CpuPolicy, ClipError> {
        let program = Program::new(&policy, infos)?;
        Ok(CpuPolicy {
            state: program.fresh_state(),
            shape: ReportShape::new(&program, infos),
            policy,
            infos: infos.to_vec(),
            program,
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

    /// Runs `program` instead (the same chain cut to a shard: same units and state).
    pub(crate) fn set_program(&mut self, program: Program) {
        self.program = program;
    }

    /// Restores a saved state (from either backend).
    pub fn set_state(&mut self, state: PolicyState) -> Result<(), ClipError> {
        state.check_fits(&self.program.fresh_state())?;
        self.state = state;
        Ok(())
    }

    /// Checks the inputs of the next step; returns its parameters.
    pub(crate) fn check(
        &self,
        grads: &[GradMut<'_>],
        params: Option<&[GradRef<'_>]>,
    ) -> Result<CpuStep, ClipError> {
        let lens: Vec<u64> = grads.iter().map(|g| g.as_ref().len() as u64).collect();
        self.check_with(&lens, params, |lens| check_shapes(&self.infos, lens))
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
    ) -> Result<PolicyReport, ClipError> {
        let step = self.check(grads, params)?;
        let params = params.filter(|_| self.program.needs_params());
        let mut state = self.state.clone();
        let out = engine::run(grads, params, &self.program, &step, &mut state, true);
        self.commit(step, state, out)
    }

    /// Runs one step without touching the gradients: the norms, the state and the report
    /// as [`CpuPolicy::step`] would leave them, and the coefficients for the caller to
    /// apply (deferred scaling, the CPU twin of [`crate::GpuPolicy::encode_deferred`]).
    pub fn step_deferred(
        &mut self,
        grads: &[GradRef<'_>],
        params: Option<&[GradRef<'_>]>,
    ) -> Result<DeferredStep, ClipError> {
        let lens: Vec<u64> = grads.iter().map(|g| g.len() as u64).collect();
        let step = self.check_with(&lens, params, |lens| check_shapes(&self.infos, lens))?;
        let params = params.filter(|_| self.program.needs_params());
        let mut state = self.state.clone();
        let norms = engine::reduce_units(grads, params, &self.program, step.norm);
        let out = engine::stages(&self.program, &step, &mut state, norms, true);
        let finish = out.stages[0].finish;
        let coefs = out.coefs.clone();
        let report = self.commit(step, state, out)?;
        Ok(DeferredStep {
            report,
            coefs,
            held: finish.status & STATUS_HELD != 0,
            step,
            layouts: self.program.unit_layouts(lens.len()),
            lens,
        })
    }

    /// Keeps the state a step left and reports the step.
    pub(crate) fn commit(
        &mut self,
        step: CpuStep,
        mut state: PolicyState,
        out: engine::Outcome,
    ) -> Result<PolicyReport, ClipError> {
        state.step = state.step.wrapping_add(1);
        self.state = state;
        let detail = self.policy.report_groups.then(|| UnitNorms {
            groups: out
                .stages
                .last()
                .map(|s| s.groups.clone())
                .unwrap_or_default(),
            units: out.units,
            coefs: out.coefs,
        });
        PolicyOutcome {
            step: step.step,
            norm: step.norm,
            stages: (out.stages.iter())
                .map(|s| StageOutcome {
                    total: s.finish.total,
                    threshold: s.finish.threshold,
                    coef: s.finish.coef,
                    status: s.finish.status,
                    clipped: s.clipped,
                    skips: s.finish.skips,
                })
                .collect(),
            units: self.program.units.len() as u32,
            policy: step.policy,
            shape: self.shape.clone(),
            detail,
        }
        .report()
    }
}

/// A step whose coefficients were computed but not applied ([`CpuPolicy::step_deferred`]).
#[derive(Debug, Clone)]
pub struct DeferredStep {
    /// The step's report.
    pub report: PolicyReport,
    /// The coefficient of every unit.
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
