//! A clipping policy on host slices: a program of the CPU engine (`engine.rs`) built from a
//! [`ClipPolicy`], step after step, keeping its state. Norms are reduced exactly in f64
//! (the oracle of the GPU's f32 accumulators).

use std::sync::Arc;

use super::engine::{self, CpuStep};
use crate::chain::{check_shapes, ClipPolicy, PolicyState, Program, TensorInfo};
use crate::dtype::{GradMut, GradRef};
use crate::error::ClipError;
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
        self.check_with(grads, params, |lens| check_shapes(&self.infos, lens))
    }

    /// [`CpuPolicy::check`] with `check_lens` judging the gradients' (and parameters')
    /// lengths.
    pub(crate) fn check_with(
        &self,
        grads: &[GradMut<'_>],
        params: Option<&[GradRef<'_>]>,
        check_lens: impl Fn(&[u64]) -> Result<(), ClipError>,
    ) -> Result<CpuStep, ClipError> {
        let lens: Vec<u64> = grads.iter().map(|g| g.as_ref().len() as u64).collect();
        check_lens(&lens)?;
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
