//! A clipping policy on host slices: a program of the CPU engine (`engine.rs`) built from a
//! [`ClipPolicy`], step after step, keeping its state. Norms are reduced exactly in f64
//! (the oracle of the GPU's f32 accumulators).

use std::sync::Arc;

use super::engine::{self, CpuStep, Threshold};
use crate::dtype::{GradMut, GradRef};
use crate::error::ClipError;
use crate::policies::{check_shapes, ClipPolicy, Layout, PolicyState, Rule, TensorInfo};
use crate::report::{PolicyOutcome, PolicyReport, ReportShape, UnitNorms};

/// Runs a [`ClipPolicy`] on host slices, step after step, keeping its state.
#[derive(Debug, Clone)]
pub struct CpuPolicy {
    policy: ClipPolicy,
    infos: Vec<TensorInfo>,
    layout: Layout,
    shape: Arc<ReportShape>,
    state: PolicyState,
}

impl CpuPolicy {
    /// A policy over tensors described by `infos` (names and shapes, in batch order).
    pub fn new(policy: ClipPolicy, infos: &[TensorInfo]) -> Result<CpuPolicy, ClipError> {
        let layout = Layout::new(&policy, infos)?;
        Ok(CpuPolicy {
            state: PolicyState::new(layout.history),
            shape: ReportShape::new(&layout, infos),
            policy,
            infos: infos.to_vec(),
            layout,
        })
    }

    /// The state to save (see [`PolicyState::to_bytes`]).
    pub fn state(&self) -> &PolicyState {
        &self.state
    }

    /// Restores a saved state (from either backend).
    pub fn set_state(&mut self, state: PolicyState) -> Result<(), ClipError> {
        state.check_fits(self.layout.history)?;
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
        check_shapes(&self.infos, &lens)?;
        let policy = &self.policy;
        let mut agc = (0.0, 0.0);
        let threshold = match &policy.rule {
            Rule::Agc(a) => {
                let Some(p) = params else {
                    return Err(ClipError::InvalidConfig(
                        "AGC needs the parameters alongside the gradients".into(),
                    ));
                };
                let plens: Vec<u64> = p.iter().map(|g| g.len() as u64).collect();
                check_shapes(&self.infos, &plens)?;
                agc = (a.lambda, a.eps);
                Threshold::Fixed
            }
            Rule::AutoClip(a) => Threshold::AutoClip {
                percentile: a.percentile,
                cap: a.max_norm,
            },
            Rule::ZClip(z) => Threshold::ZClip {
                alpha: z.alpha,
                z_thresh: z.z_thresh,
                eps: z.eps,
                cap: z.max_norm,
            },
            _ => Threshold::Fixed,
        };
        Ok(CpuStep {
            norm: policy.norm,
            policy: policy.non_finite,
            multiplier: policy.schedule.checked(self.state.step)?,
            given: None,
            threshold,
            agc,
            noise: policy.noise,
            step: self.state.step,
            clamp: policy.value,
        })
    }

    /// Runs one step on `grads` in place; AGC also needs the parameters (same shapes).
    /// Errors leave the gradients and the state untouched.
    pub fn step(
        &mut self,
        grads: &mut [GradMut<'_>],
        params: Option<&[GradRef<'_>]>,
    ) -> Result<PolicyReport, ClipError> {
        let step = self.check(grads, params)?;
        let params = params.filter(|_| matches!(self.policy.rule, Rule::Agc(_)));
        let mut state = self.state.clone();
        let out = engine::run(grads, params, &self.layout, &step, &mut state, true);
        state.step += 1;
        self.state = state;
        let detail = self.policy.report_groups.then(|| UnitNorms {
            shape: self.shape.clone(),
            groups: out.groups,
            units: out.units,
            coefs: out.coefs.clone(),
        });
        // NaN coefficients count as clipping.
        let clipped = out.coefs.iter().filter(|c| c.is_nan() || **c < 1.0).count() as u32;
        let f = out.finish;
        PolicyOutcome {
            step: step.step,
            norm: step.norm,
            total: f.total,
            threshold: f.threshold,
            coef: f.coef,
            status: f.status,
            clipped,
            units: self.layout.segments.len() as u32,
            skips: f.skips,
            global: self.policy.rule.is_global(),
            policy: step.policy,
            detail,
        }
        .report()
    }
}
