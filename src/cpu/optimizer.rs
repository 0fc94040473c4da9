//! The fused optimizer step on host slices, the twin of `src/gpu/optimizer.rs`: the
//! clipping policy's norms and coefficients without a rewrite ([`CpuPolicy::step_deferred`]),
//! then one pass that clips each gradient as it reads it and updates the parameter and its
//! state with the shader's arithmetic.

use rayon::prelude::*;

use super::apply::scaled;
use super::engine::to_f32;
use super::norm_reduce::f16_bits_to_f32;
use super::policy::{CpuPolicy, DeferredStep};
use super::prefetch::{piece_len, pieces, prefetch_ahead};
use crate::chain::{check_shapes, ClipPolicy, TensorInfo};
use crate::dtype::{GradMut, GradRef};
use crate::error::ClipError;
use crate::optim::{adam, check_lr, sgd, Optimizer, OptimizerState, Tick};
use crate::report::PolicyReport;
use crate::shaders::abi::{OptimizerParams, OPT_SGD};

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
        check_shapes(&infos_of(&self.lens), plens.iter().copied())?;
        let deferred = {
            let refs: Vec<GradRef<'_>> = params.iter().map(|p| GradRef::F32(p)).collect();
            self.policy.step_deferred(grads, Some(&refs))?
        };
        if deferred.held {
            return Ok(deferred.report);
        }
        self.update(grads, params, |t| match deferred.uniform(t) {
            Some((coef, zero_nans)) => Read::Scaled(coef, zero_nans),
            None => Read::Each(&deferred, t),
        });
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
        check_shapes(&infos_of(&self.lens), plens.iter().copied())?;
        let report = {
            let refs: Vec<GradRef<'_>> = params.iter().map(|p| GradRef::F32(p)).collect();
            self.policy.step(grads, Some(&refs))?
        };
        if report.skipped {
            return Ok(report);
        }
        let refs: Vec<GradRef<'_>> = grads.iter().map(|g| g.as_ref()).collect();
        self.update(&refs, params, |_| Read::Scaled(1.0, false));
        Ok(report)
    }

    /// Counts a step taken and updates every tensor, reading its gradients as `read`
    /// says.
    fn update<'c>(
        &mut self,
        grads: &[GradRef<'_>],
        params: &mut [&mut [f32]],
        read: impl Fn(usize) -> Read<'c>,
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
            update_tensor(&self.params, &tick, &read(t), g, p, state);
        }
    }
}

/// Placeholder infos of tensors of lengths `lens` (only their lengths are checked).
fn infos_of(lens: &[u64]) -> Vec<TensorInfo> {
    lens.iter()
        .map(|&n| TensorInfo::new("parameters", &[n]))
        .collect()
}

/// How one tensor's gradients are read.
enum Read<'a> {
    /// Times one coefficient, NaNs to 0 or not (1 and false: as they are).
    Scaled(f32, bool),
    /// Each element through the deferred clip of tensor `.1`.
    Each(&'a DeferredStep, usize),
}

/// Elements per parallel task, and per block of clipped gradients inside it.
const TASK: usize = 1 << 16;
const BLOCK: usize = 1 << 12;

/// One parallel task: its first element, its parameters and its range of each state array.
type Task<'a> = (usize, &'a mut [f32], Vec<&'a mut [f32]>);

/// Updates one tensor in parallel tasks; `state` holds its state arrays.
fn update_tensor(
    opt: &OptimizerParams,
    tick: &Tick,
    read: &Read<'_>,
    g: &GradRef<'_>,
    p: &mut [f32],
    state: Vec<&mut Vec<f32>>,
) {
    // Each task gets its parameters and the same range of each state array.
    let mut state: Vec<std::slice::ChunksMut<'_, f32>> =
        state.into_iter().map(|a| a.chunks_mut(TASK)).collect();
    let tasks: Vec<Task<'_>> = p
        .chunks_mut(TASK)
        .enumerate()
        .map(|(b, pb)| {
            let sb = state.iter_mut().filter_map(Iterator::next).collect();
            (b * TASK, pb, sb)
        })
        .collect();
    tasks.into_par_iter().for_each(|(start, pt, mut st)| {
        let mut clipped = [0.0f32; BLOCK];
        for (b, pb) in pt.chunks_mut(BLOCK).enumerate() {
            let at = start + b * BLOCK;
            let gb = &mut clipped[..pb.len()];
            read_block(read, g, at, gb);
            let mut sb = st
                .iter_mut()
                .map(|s| &mut s[b * BLOCK..b * BLOCK + pb.len()]);
            match (opt.kind, sb.next(), sb.next(), sb.next()) {
                (OPT_SGD, None, _, _) => sgd_plain(opt, tick, pb, gb),
                (OPT_SGD, Some(buf), _, _) => sgd_momentum(opt, tick, pb, gb, buf),
                (_, Some(m), Some(v), None) => adam_block(opt, tick, pb, gb, m, v),
                (_, Some(m), Some(v), Some(vmax)) => amsgrad_block(opt, tick, pb, gb, m, v, vmax),
                _ => unreachable!("Adam keeps two or three state arrays"),
            }
        }
    });
}

/// The clipped gradients of elements `at..at + out.len()` of `g`, into `out`.
fn read_block(read: &Read<'_>, g: &GradRef<'_>, at: usize, out: &mut [f32]) {
    let n = out.len();
    match (read, g) {
        (&Read::Scaled(coef, zero_nans), GradRef::F32(x)) => {
            scaled_f32(&x[at..at + n], coef, zero_nans, out)
        }
        (&Read::Scaled(coef, zero_nans), GradRef::BF16(x)) => {
            scaled_bf16(bytemuck::cast_slice(&x[at..at + n]), coef, zero_nans, out)
        }
        (&Read::Scaled(coef, zero_nans), GradRef::F16(x)) => {
            scaled_f16(bytemuck::cast_slice(&x[at..at + n]), coef, zero_nans, out)
        }
        (&Read::Each(clip, t), g) => {
            for (k, o) in out.iter_mut().enumerate() {
                *o = clip.clip_at(t, (at + k) as u32, to_f32(g, at + k));
            }
        }
    }
}

// The reads of the gradients and the updates below prefetch every array they stream
// through (see `prefetch.rs`), piece by piece.

wide_fn! {
    fn scaled_f32(x: &[f32], coef: f32, zero_nans: bool, out: &mut [f32]) {
        for r in pieces(x.len(), piece_len::<f32>()) {
            prefetch_ahead(&x[r.clone()]);
            for (o, &v) in out[r.clone()].iter_mut().zip(&x[r]) {
                *o = scaled(v, coef, zero_nans);
            }
        }
    }
}

wide_fn! {
    fn scaled_bf16(x: &[u16], coef: f32, zero_nans: bool, out: &mut [f32]) {
        for r in pieces(x.len(), piece_len::<u16>()) {
            prefetch_ahead(&x[r.clone()]);
            for (o, &v) in out[r.clone()].iter_mut().zip(&x[r]) {
                *o = scaled(f32::from_bits((v as u32) << 16), coef, zero_nans);
            }
        }
    }
}

wide_fn! {
    fn scaled_f16(x: &[u16], coef: f32, zero_nans: bool, out: &mut [f32]) {
        for r in pieces(x.len(), piece_len::<u16>()) {
            prefetch_ahead(&x[r.clone()]);
            for (o, &v) in out[r.clone()].iter_mut().zip(&x[r]) {
                *o = scaled(f16_bits_to_f32(v), coef, zero_nans);
            }
        }
    }
}

// The optimizers over blocks: the shader's arithmetic (`sgd`, `adam`) in loops the
// compiler vectorises, one per kind of state.

wide_fn! {
    fn sgd_plain(opt: &OptimizerParams, t: &Tick, p: &mut [f32], g: &[f32]) {
        for r in pieces(p.len(), piece_len::<f32>()) {
            let p = &mut p[r.clone()];
            prefetch_ahead(p);
            for (x, &d) in p.iter_mut().zip(&g[r]) {
                let mut unused = 0.0;
                *x = sgd(opt, t, *x, d, &mut unused);
            }
        }
    }
}

wide_fn! {
    fn sgd_momentum(opt: &OptimizerParams, t: &Tick, p: &mut [f32], g: &[f32], buf: &mut [f32]) {
        for r in pieces(p.len(), piece_len::<f32>()) {
            let (p, buf) = (&mut p[r.clone()], &mut buf[r.clone()]);
            prefetch_ahead(p);
            prefetch_ahead(buf);
            for ((x, &d), b) in p.iter_mut().zip(&g[r]).zip(buf) {
                *x = sgd(opt, t, *x, d, b);
            }
        }
    }
}

wide_fn! {
    fn adam_block(
        opt: &OptimizerParams,
        t: &Tick,
        p: &mut [f32],
        g: &[f32],
        m: &mut [f32],
        v: &mut [f32],
    ) {
        for r in pieces(p.len(), piece_len::<f32>()) {
            let (p, m, v) = (&mut p[r.clone()], &mut m[r.clone()], &mut v[r.clone()]);
            prefetch_ahead(p);
            prefetch_ahead(m);
            prefetch_ahead(v);
            for (((x, &d), m), v) in p.iter_mut().zip(&g[r]).zip(m).zip(v) {
                let mut unused = 0.0;
                *x = adam(opt, t, *x, d, (m, v, &mut unused));
            }
        }
    }
}

wide_fn! {
    fn amsgrad_block(
        opt: &OptimizerParams,
        t: &Tick,
        p: &mut [f32],
        g: &[f32],
        m: &mut [f32],
        v: &mut [f32],
        vmax: &mut [f32],
    ) {
        for r in pieces(p.len(), piece_len::<f32>()) {
            let (p, m, v) = (&mut p[r.clone()], &mut m[r.clone()], &mut v[r.clone()]);
            let vmax = &mut vmax[r.clone()];
            for s in [&*p, &*m, &*v, &*vmax] {
                prefetch_ahead(s);
            }
            for ((((x, &d), m), v), vm) in p.iter_mut().zip(&g[r]).zip(m).zip(v).zip(vmax) {
                *x = adam(opt, t, *x, d, (m, v, vm));
            }
        }
    }
}
