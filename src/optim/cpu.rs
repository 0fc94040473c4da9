//! The fused optimizer step on host slices, the twin of `src/gpu/optimizer.rs`: the
//! clipping policy's norms and coefficients without a rewrite ([`CpuPolicy::step_deferred`]),
//! then one pass that clips each gradient as it reads it and updates the parameter and its
//! state with the shader's arithmetic.

use rayon::prelude::*;

use super::{adam, check_lr, sgd, Optimizer, OptimizerState, Tick};
use crate::chain::{check_shapes, ClipPolicy, TensorInfo};
use crate::cpu::{to_f32, CpuPolicy};
use crate::dtype::{GradMut, GradRef};
use crate::error::ClipError;
use crate::report::PolicyReport;
use crate::shaders::abi::{OptimizerParams, OPT_SGD};

/// Elements per parallel task.
const BLOCK: usize = 1 << 14;

/// A clipping policy and an optimizer fused into one step over host slices: the gradients
/// are read twice (the norm, then the update) and never written. The CPU twin of
/// [`crate::GpuOptimizer`].
#[derive(Debug, Clone)]
pub struct CpuOptimizer {
    policy: CpuPolicy,
    optimizer: Optimizer,
    params: OptimizerParams,
    lens: Vec<u64>,
    state: OptimizerState,
    lr: f32,
}

impl CpuOptimizer {
    /// `optimizer` after `policy` over tensors described by `infos`. Errors (a bad policy
    /// or hyperparameter) create nothing.
    pub fn new(
        policy: ClipPolicy,
        infos: &[TensorInfo],
        optimizer: impl Into<Optimizer>,
    ) -> Result<CpuOptimizer, ClipError> {
        let optimizer = optimizer.into();
        optimizer.check()?;
        let lens: Vec<u64> = infos.iter().map(TensorInfo::len).collect();
        Ok(CpuOptimizer {
            policy: CpuPolicy::new(policy, infos)?,
            params: optimizer.params(),
            state: OptimizerState::fresh(&optimizer, &lens),
            lr: optimizer.lr(),
            optimizer,
            lens,
        })
    }

    /// The optimizer it runs.
    pub fn optimizer(&self) -> &Optimizer {
        &self.optimizer
    }

    /// The clipping policy, with its state and step count.
    pub fn policy(&self) -> &CpuPolicy {
        &self.policy
    }

    /// The learning rate of the following steps.
    pub fn lr(&self) -> f32 {
        self.lr
    }

    /// Sets the learning rate of the following steps (a schedule); finite and >= 0.
    pub fn set_lr(&mut self, lr: f32) -> Result<(), ClipError> {
        check_lr(lr)?;
        self.lr = lr;
        Ok(())
    }

    /// The optimizer state (steps taken, moments).
    pub fn state(&self) -> &OptimizerState {
        &self.state
    }

    /// Restores a saved optimizer state (from either backend).
    pub fn set_state(&mut self, state: OptimizerState) -> Result<(), ClipError> {
        state.check_fits(&OptimizerState::fresh(&self.optimizer, &self.lens))?;
        self.state = state;
        Ok(())
    }

    /// One step: clips `grads` (as the policy's in-place step would) while reading them and
    /// updates `params`, the f32 master weights, tensor for tensor. AGC measures these
    /// parameters. A held step (non-finite gradients under `Error` or `SkipStep`) changes
    /// no parameter and no optimizer state and is not counted as a step taken. Bad input
    /// is an error that changes nothing.
    pub fn step(
        &mut self,
        grads: &[GradRef<'_>],
        params: &mut [&mut [f32]],
    ) -> Result<PolicyReport, ClipError> {
        let plens: Vec<u64> = params.iter().map(|p| p.len() as u64).collect();
        check_shapes(&infos_of(&self.lens), &plens)?;
        let deferred = {
            let refs: Vec<GradRef<'_>> = params.iter().map(|p| GradRef::F32(p)).collect();
            self.policy.step_deferred(grads, Some(&refs))?
        };
        if deferred.held {
            return Ok(deferred.report);
        }
        self.update(grads, params, |t, i, x| deferred.clipped(t, i, x));
        Ok(deferred.report)
    }

    /// The unfused equivalent, twin of [`crate::GpuOptimizer::encode_in_place`]: the
    /// policy clips `grads` in place (they keep the clipped values), then the update reads
    /// them. A held step leaves the gradients, the parameters and the state untouched.
    pub fn step_in_place(
        &mut self,
        grads: &mut [GradMut<'_>],
        params: &mut [&mut [f32]],
    ) -> Result<PolicyReport, ClipError> {
        let plens: Vec<u64> = params.iter().map(|p| p.len() as u64).collect();
        check_shapes(&infos_of(&self.lens), &plens)?;
        let report = {
            let refs: Vec<GradRef<'_>> = params.iter().map(|p| GradRef::F32(p)).collect();
            self.policy.step(grads, Some(&refs))?
        };
        if report.skipped {
            return Ok(report);
        }
        let refs: Vec<GradRef<'_>> = grads.iter().map(|g| g.as_ref()).collect();
        self.update(&refs, params, |_, _, x| x);
        Ok(report)
    }

    /// Counts a step taken and updates every tensor, reading its gradients through `clip`
    /// (tensor, index, value).
    fn update(
        &mut self,
        grads: &[GradRef<'_>],
        params: &mut [&mut [f32]],
        clip: impl Fn(usize, u32, f32) -> f32 + Sync,
    ) {
        self.state.steps = self.state.steps.wrapping_add(1);
        let tick = Tick::new(
            &self.params,
            self.state.steps,
            self.lr,
            self.optimizer.decay(self.lr),
        );
        let mut arrays: Vec<std::slice::IterMut<'_, Vec<f32>>> =
            self.state.arrays.iter_mut().map(|a| a.iter_mut()).collect();
        for (t, (g, p)) in grads.iter().zip(params.iter_mut()).enumerate() {
            let state: Vec<&mut Vec<f32>> = arrays.iter_mut().filter_map(Iterator::next).collect();
            update_tensor(&self.params, &tick, &|i, x| clip(t, i, x), g, p, state);
        }
    }
}

/// Placeholder infos of tensors of lengths `lens` (only their lengths are checked).
fn infos_of(lens: &[u64]) -> Vec<TensorInfo> {
    lens.iter()
        .map(|&n| TensorInfo::new("parameters", &[n]))
        .collect()
}

/// Updates one tensor in parallel blocks, reading its gradients through `clip` (index,
/// value); `state` holds its state arrays.
fn update_tensor(
    opt: &OptimizerParams,
    tick: &Tick,
    clip: &(impl Fn(u32, f32) -> f32 + Sync),
    g: &GradRef<'_>,
    p: &mut [f32],
    state: Vec<&mut Vec<f32>>,
) {
    // Each block gets its parameters and the same range of each state array.
    let mut state: Vec<std::slice::ChunksMut<'_, f32>> =
        state.into_iter().map(|a| a.chunks_mut(BLOCK)).collect();
    let blocks: Vec<(usize, &mut [f32], Vec<&mut [f32]>)> = p
        .chunks_mut(BLOCK)
        .enumerate()
        .map(|(b, pb)| {
            let sb = state.iter_mut().filter_map(Iterator::next).collect();
            (b * BLOCK, pb, sb)
        })
        .collect();
    blocks.into_par_iter().for_each(|(start, pb, mut sb)| {
        // Arrays an optimizer does not keep are stand-ins, never read.
        let mut unused = [0.0f32; 3];
        for (k, x) in pb.iter_mut().enumerate() {
            let i = start + k;
            let grad = clip(i as u32, to_f32(g, i));
            let [u0, u1, u2] = &mut unused;
            let mut arrays = sb.iter_mut().map(|s| &mut s[k]);
            let s0 = arrays.next().unwrap_or(u0);
            *x = if opt.kind == OPT_SGD {
                sgd(opt, tick, *x, grad, s0)
            } else {
                let s1 = arrays.next().unwrap_or(u1);
                let s2 = arrays.next().unwrap_or(u2);
                adam(opt, tick, *x, grad, (s0, s1, s2))
            };
        }
    });
}
