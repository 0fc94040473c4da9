//! The fused optimizer step on host slices, the twin of `src/gpu/optimizer.rs`: the
//! clipping policy's norms and coefficients without a rewrite ([`CpuPolicy::step_deferred`]),
//! then one pass that clips each gradient as it reads it and updates the parameter and its
//! state with the shader's arithmetic.

use super::apply::scaled;
use super::engine::to_f32;
use super::norm_reduce::f16_bits_to_f32;
use super::policy::{CpuPolicy, DeferredStep};
use super::prefetch::{piece_len, pieces, prefetch_ahead};
use crate::chain::{ClipPolicy, TensorInfo};
use crate::dtype::{GradMut, GradRef};
use crate::error::ClipError;
use crate::optim::{adam, check_lr, sgd, Optimizer, OptimizerState, Tick};
use crate::report::ClipReport;
use crate::shaders::abi::{OptimizerParams, OPT_SGD};

/// A clipping policy and an optimizer fused into one step over host slices: the gradients
/// are read twice (the norm, then the update) and never written. The CPU twin of
/// the GPU engine of [`crate::GpuClipper<crate::Optimize>`].
#[derive(Debug, Clone)]
pub struct CpuOptimizer {
    policy: CpuPolicy,
    optimizer: Optimizer,
    params: OptimizerParams,
    lens: Vec<u64>,
    /// Running totals of `lens`: where each tensor's elements end in the batch.
    ends: Vec<usize>,
    state: OptimizerState,
    lr: f32,
    /// The last fused step's coefficients, whose buffers the next one reuses.
    deferred: Option<DeferredStep>,
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
            ends: (lens.iter())
                .scan(0, |end, &n| {
                    *end += n as usize;
                    Some(*end)
                })
                .collect(),
            lens,
            deferred: None,
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

    /// The clipping policy, to restore a saved state.
    pub(crate) fn policy_mut(&mut self) -> &mut CpuPolicy {
        &mut self.policy
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
        state.check_fits(&self.optimizer, &self.lens)?;
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
    ) -> Result<ClipReport, ClipError> {
        (self.policy).check_lens(params.iter().map(|p| p.len() as u64))?;
        let deferred = {
            let refs = self.param_refs(params);
            let kept = self.deferred.take();
            self.policy.defer(grads, refs.as_deref(), kept)?
        };
        let report = deferred.report.clone();
        if !deferred.held {
            self.update(
                |t| grads[t],
                params,
                |t| match deferred.uniform(t) {
                    Some((coef, zero_nans)) => Read::Scaled(coef, zero_nans),
                    None => Read::Each(&deferred, t),
                },
            );
        }
        self.deferred = Some(deferred);
        Ok(report)
    }

    /// The unfused equivalent, twin of `GpuClipper<Optimize>::encode_in_place`: the
    /// policy clips `grads` in place (they keep the clipped values), then the update reads
    /// them. A held step leaves the gradients, the parameters and the state untouched.
    pub fn step_in_place(
        &mut self,
        grads: &mut [GradMut<'_>],
        params: &mut [&mut [f32]],
    ) -> Result<ClipReport, ClipError> {
        (self.policy).check_lens(params.iter().map(|p| p.len() as u64))?;
        let report = {
            let refs = self.param_refs(params);
            self.policy.step(grads, refs.as_deref())?
        };
        if report.skipped {
            return Ok(report);
        }
        let grads: &[GradMut<'_>] = grads;
        self.update(|t| grads[t].as_ref(), params, |_| Read::Scaled(1.0, false));
        Ok(report)
    }

    /// The parameters as the policy reads them: only a chain with AGC does.
    fn param_refs<'p>(&self, params: &'p [&mut [f32]]) -> Option<Vec<GradRef<'p>>> {
        let needed = self.policy.program().needs_params();
        needed.then(|| params.iter().map(|p| GradRef::F32(p)).collect())
    }

    /// Counts a step taken and updates every tensor, reading its gradients as `read`
    /// says.
    fn update<'g, 'c>(
        &mut self,
        grad: impl Fn(usize) -> GradRef<'g> + Sync,
        params: &mut [&mut [f32]],
        read: impl Fn(usize) -> Read<'c> + Sync,
    ) {
        self.state.steps = self.state.steps.saturating_add(1);
        let tick = Tick::new(
            &self.params,
            self.state.steps,
            self.lr,
            self.optimizer.decay(self.lr),
        );
        let count = self.state.arrays.len();
        let mut arrays: [&mut [Vec<f32>]; 3] = [&mut [], &mut [], &mut []];
        for (slot, a) in arrays.iter_mut().zip(&mut self.state.arrays) {
            *slot = a;
        }
        let job = Update {
            opt: &self.params,
            tick: &tick,
            read: &read,
            grad: &grad,
            arrays: count,
        };
        job.tensors(0, params, arrays, &self.ends);
    }
}

/// The parallel update of one step: tensors and elements split in halves (`rayon::join`)
/// down to tasks of about [`TASK`] elements, small tensors sharing one, so a step over
/// many tensors hands work to the pool once and lists nothing.
struct Update<'a, R, G> {
    opt: &'a OptimizerParams,
    tick: &'a Tick,
    read: &'a R,
    /// Tensor `t`'s gradients.
    grad: &'a G,
    /// State arrays per tensor: 0 (SGD), 1 (momentum), 2 (Adam) or 3 (AMSGrad).
    arrays: usize,
}

impl<'g, 'c, R, G> Update<'_, R, G>
where
    R: Fn(usize) -> Read<'c> + Sync,
    G: Fn(usize) -> GradRef<'g> + Sync,
{
    /// Tensors `first..first + params.len()`, whose state arrays are `state` and whose
    /// elements end at `ends` (running totals over the batch).
    fn tensors(
        &self,
        first: usize,
        params: &mut [&mut [f32]],
        state: [&mut [Vec<f32>]; 3],
        ends: &[usize],
    ) {
        let (Some(p0), Some(&last)) = (params.first(), ends.last()) else {
            return;
        };
        let start = ends[0] - p0.len();
        let total = last - start;
        if params.len() > 1 && total > TASK {
            // The tensor boundary nearest half the elements, one tensor at least each side.
            let half = ends.partition_point(|&e| e - start < total / 2);
            let mid = half.clamp(1, params.len() - 1);
            let (pa, pb) = params.split_at_mut(mid);
            let [s0, s1, s2] = state.map(|s| s.split_at_mut(mid.min(s.len())));
            let (ea, eb) = ends.split_at(mid);
            rayon::join(
                || self.tensors(first, pa, [s0.0, s1.0, s2.0], ea),
                || self.tensors(first + mid, pb, [s0.1, s1.1, s2.1], eb),
            );
            return;
        }
        let [s0, s1, s2] = state;
        for (k, p) in params.iter_mut().enumerate() {
            let st = [s0.get_mut(k), s1.get_mut(k), s2.get_mut(k)]
                .map(|a| a.map_or(&mut [][..], |a| &mut a[..]));
            self.elements(first + k, 0, p, st);
        }
    }

    /// Elements `at..at + p.len()` of tensor `t`: its parameters `p` and the same range
    /// of its state arrays `state` (empty where it has fewer).
    fn elements(&self, t: usize, at: usize, p: &mut [f32], state: [&mut [f32]; 3]) {
        if p.len() > TASK {
            let mid = (p.len() / 2).next_multiple_of(BLOCK);
            let (pa, pb) = p.split_at_mut(mid);
            let [s0, s1, s2] = state.map(|s| s.split_at_mut(mid.min(s.len())));
            rayon::join(
                || self.elements(t, at, pa, [s0.0, s1.0, s2.0]),
                || self.elements(t, at + mid, pb, [s0.1, s1.1, s2.1]),
            );
            return;
        }
        let (opt, tick, read, g) = (self.opt, self.tick, (self.read)(t), (self.grad)(t));
        let mut clipped = [0.0f32; BLOCK];
        let [s0, s1, s2] = state;
        for (b, pb) in p.chunks_mut(BLOCK).enumerate() {
            let (off, n) = (b * BLOCK, pb.len());
            let gb = &mut clipped[..n];
            read_block(&read, &g, at + off, gb);
            // A state array this optimizer does not keep stays empty.
            fn block(s: &mut [f32], off: usize, n: usize) -> &mut [f32] {
                match s.is_empty() {
                    true => s,
                    false => &mut s[off..off + n],
                }
            }
            let (m, v, vmax) = (block(s0, off, n), block(s1, off, n), block(s2, off, n));
            match (opt.kind, self.arrays) {
                (OPT_SGD, 0) => sgd_plain(opt, tick, pb, gb),
                (OPT_SGD, _) => sgd_momentum(opt, tick, pb, gb, m),
                (_, 2) => adam_block(opt, tick, pb, gb, m, v),
                _ => amsgrad_block(opt, tick, pb, gb, m, v, vmax),
            }
        }
    }
}

/// How one tensor's gradients are read.
enum Read<'a> {
    /// Times one coefficient, NaNs to 0 or not (1 and false: as they are).
    Scaled(f32, bool),
    /// Each element through the deferred clip of tensor `.1`.
    Each(&'a DeferredStep, usize),
}

/// Elements per parallel task (at most), and per block of clipped gradients inside it.
const TASK: usize = 1 << 16;
const BLOCK: usize = 1 << 12;

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
