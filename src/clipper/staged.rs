//! The GPU backend of [`super::Clipper`], one staged runner per wrapper: host tensors are
//! copied into device mirrors, the device runner steps there, and what the step wrote is
//! copied back. Mirrors and device runners are built at the first step, when the element
//! types are known; a chain alone is rebuilt (its state carried over) when they change,
//! the other wrappers keep the types of their first step.

use super::staging::{shapes_of, Mirrors};
use crate::chain::{check_shapes, ClipPolicy, PerExampleClip, PolicyState, Program, TensorInfo};
use crate::cpu::accumulate::check_pairs;
use crate::dtype::{DType, GradMut, GradRef};
use crate::error::ClipError;
use crate::gpu::{
    GpuAccumulator, GpuContext, GpuOptimizer, GpuPerExample, GpuPolicy, ShardedGpuPolicy,
};
use crate::norm::PartialNorm;
use crate::ops::check_micro_steps;
use crate::optim::{Optimizer, OptimizerState};
use crate::report::ClipReport;
use crate::shard::{Collective, Shard};

/// `ClipError::ShapeMismatch` for host tensors of other types than the first step's.
fn types_changed(what: &str, first: &[(DType, usize)], now: &[(DType, usize)]) -> ClipError {
    ClipError::ShapeMismatch {
        tensor: what.into(),
        expected: format!("the element types and lengths of the first step: {first:?}"),
        got: format!("{now:?}"),
    }
}

/// Checks that `now` are the shapes `mirrors` were built for.
fn check_same(what: &str, mirrors: &Mirrors, now: &[(DType, usize)]) -> Result<(), ClipError> {
    let first = mirrors.shapes();
    match first == now {
        true => Ok(()),
        false => Err(types_changed(what, &first, now)),
    }
}

/// The gradients of an optimizer step: read only (fused), or clipped in place.
enum OptimGrads<'a, 'g> {
    Read(&'a [GradRef<'g>]),
    InPlace(&'a mut [GradMut<'g>]),
}

/// f32 slices as gradients, to mirror them.
fn f32_refs<'a>(xs: &'a [&mut [f32]]) -> Vec<GradRef<'a>> {
    xs.iter().map(|x| GradRef::F32(x)).collect()
}

/// f32 slices as writable gradients, to read them back.
fn f32_muts<'a>(xs: &'a mut [&mut [f32]]) -> Vec<GradMut<'a>> {
    xs.iter_mut().map(|x| GradMut::F32(x)).collect()
}

/// A chain alone over mirrored host tensors (and their parameters, for AGC).
pub struct StagedChain {
    policy: ClipPolicy,
    infos: Vec<TensorInfo>,
    run: Option<Box<ChainRun>>,
    /// The state while no device runner holds it.
    state: PolicyState,
}

struct ChainRun {
    grads: Mirrors,
    params: Option<Mirrors>,
    runner: GpuPolicy,
}

impl StagedChain {
    pub(super) fn new(policy: ClipPolicy, infos: &[TensorInfo]) -> Result<StagedChain, ClipError> {
        let state = Program::new(&policy, infos)?.fresh_state();
        Ok(StagedChain {
            policy,
            infos: infos.to_vec(),
            run: None,
            state,
        })
    }

    pub(super) fn policy(&self) -> &ClipPolicy {
        &self.policy
    }

    /// The parameters a step reads: none unless the chain has AGC, which needs them, of
    /// the lengths `check` accepts.
    fn params_of<'p, 'g>(
        &self,
        params: Option<&'p [GradRef<'g>]>,
        check: impl FnOnce(&[GradRef<'_>]) -> Result<(), ClipError>,
    ) -> Result<Option<&'p [GradRef<'g>]>, ClipError> {
        if !self.policy.needs_params() {
            return Ok(None);
        }
        let p = params.ok_or_else(|| {
            ClipError::InvalidConfig("AGC needs the parameters alongside the gradients".into())
        })?;
        check(p)?;
        Ok(Some(p))
    }

    pub(super) fn steps_taken(&self) -> u64 {
        match &self.run {
            Some(r) => r.runner.steps_taken(),
            None => self.state.steps_taken(),
        }
    }

    /// A step (with the given total norm, if any): the mirrors (re)built for `grads`,
    /// filled, the step run and the result copied back.
    pub(super) fn step(
        &mut self,
        ctx: &GpuContext,
        grads: &mut [GradMut<'_>],
        params: Option<&[GradRef<'_>]>,
        given: Option<&PartialNorm>,
    ) -> Result<ClipReport, ClipError> {
        if let Some(total) = given {
            self.policy.check_given(total)?;
        }
        let refs: Vec<GradRef<'_>> = grads.iter().map(|g| g.as_ref()).collect();
        check_shapes(&self.infos, refs.iter().map(|g| g.len() as u64))?;
        let params = self.params_of(params, |p| {
            check_shapes(&self.infos, p.iter().map(|g| g.len() as u64))
        })?;
        let fits = self.run.as_ref().is_some_and(|r| {
            r.grads.shapes() == shapes_of(&refs)
                && r.params.as_ref().map(|m| m.shapes()) == params.map(shapes_of)
        });
        if !fits {
            if let Some(old) = &self.run {
                // Read before the runner goes: a failed read keeps it.
                self.state = old.runner.state()?;
                self.run = None;
            }
            let grads = Mirrors::new(ctx, &shapes_of(&refs))?;
            let params = params
                .map(|p| Mirrors::new(ctx, &shapes_of(p)))
                .transpose()?;
            let tensors = grads.tensors(&self.infos, true);
            let param_tensors = params.as_ref().map(|m| m.tensors(&self.infos, true));
            let policy = self.policy.clone();
            let mut runner = GpuPolicy::new(ctx, &tensors, param_tensors.as_deref(), policy)?;
            runner.set_state(&self.state)?;
            self.run = Some(Box::new(ChainRun {
                grads,
                params,
                runner,
            }));
        }
        let run = self.run.as_mut().expect("built above");
        run.grads.write(ctx, &refs);
        if let (Some(m), Some(p)) = (&run.params, params) {
            m.write(ctx, p);
        }
        let report = match given {
            Some(total) => run.runner.step_with_norm(total)?.wait()?,
            None => run.runner.step()?.wait()?,
        };
        run.grads.read(ctx, grads)?;
        Ok(report)
    }

    pub(super) fn state(&self) -> Result<PolicyState, ClipError> {
        match &self.run {
            Some(r) => r.runner.state(),
            None => Ok(self.state.clone()),
        }
    }

    pub(super) fn set_state(&mut self, saved: &PolicyState) -> Result<(), ClipError> {
        match &mut self.run {
            Some(r) => r.runner.set_state(saved),
            None => {
                saved.check_fits(&self.state)?;
                self.state = saved.clone();
                Ok(())
            }
        }
    }
}

/// Gradient accumulation over mirrored host tensors: the micro-batch and the sums go in,
/// the sums come back after every micro-batch (as the CPU leaves them).
pub struct StagedAccumulate {
    chain: StagedChain,
    micro_steps: u32,
    run: Option<Box<AccumulateRun>>,
}

struct AccumulateRun {
    micro: Mirrors,
    sums: Mirrors,
    params: Option<Mirrors>,
    runner: GpuAccumulator,
}

impl StagedAccumulate {
    pub(super) fn new(
        policy: ClipPolicy,
        infos: &[TensorInfo],
        micro_steps: u32,
    ) -> Result<StagedAccumulate, ClipError> {
        check_micro_steps(micro_steps)?;
        Ok(StagedAccumulate {
            chain: StagedChain::new(policy, infos)?,
            micro_steps,
            run: None,
        })
    }

    pub(super) fn policy(&self) -> &ClipPolicy {
        self.chain.policy()
    }

    pub(super) fn micro_steps(&self) -> u32 {
        self.micro_steps
    }

    pub(super) fn pending(&self) -> u32 {
        self.run.as_ref().map_or(0, |r| r.runner.pending())
    }

    pub(super) fn reset(&mut self) {
        if let Some(r) = &mut self.run {
            r.runner.reset();
        }
    }

    pub(super) fn steps_taken(&self) -> u64 {
        match &self.run {
            Some(r) => r.runner.policy().steps_taken(),
            None => self.chain.steps_taken(),
        }
    }

    pub(super) fn step(
        &mut self,
        ctx: &GpuContext,
        sums: &mut [GradMut<'_>],
        micro: &[GradRef<'_>],
        params: Option<&[GradRef<'_>]>,
    ) -> Result<Option<ClipReport>, ClipError> {
        check_pairs(sums, micro)?;
        let infos = &self.chain.infos;
        check_shapes(infos, micro.iter().map(|g| g.len() as u64))?;
        let params = (self.chain).params_of(params, |p| {
            check_shapes(infos, p.iter().map(|g| g.len() as u64))
        })?;
        let shapes = shapes_of(micro);
        let run = match &mut self.run {
            Some(run) => {
                check_same("micro-batch", &run.micro, &shapes)?;
                if let (Some(m), Some(p)) = (&run.params, params) {
                    check_same("parameters", m, &shapes_of(p))?;
                }
                run
            }
            None => {
                let (micro_m, sums_m) = (Mirrors::new(ctx, &shapes)?, Mirrors::new(ctx, &shapes)?);
                let params_m = params
                    .map(|p| Mirrors::new(ctx, &shapes_of(p)))
                    .transpose()?;
                let infos = &self.chain.infos;
                let p_tensors = params_m.as_ref().map(|m| m.tensors(infos, true));
                let mut runner = GpuAccumulator::new(
                    ctx,
                    &micro_m.tensors(infos, true),
                    &sums_m.tensors(infos, true),
                    p_tensors.as_deref(),
                    self.micro_steps,
                    self.chain.policy.clone(),
                )?;
                runner.policy_mut().set_state(&self.chain.state()?)?;
                self.run.insert(Box::new(AccumulateRun {
                    micro: micro_m,
                    sums: sums_m,
                    params: params_m,
                    runner,
                }))
            }
        };
        run.micro.write(ctx, micro);
        if run.runner.pending() > 0 {
            // The sums so far are the caller's (who may have changed them), as on the CPU.
            let refs: Vec<GradRef<'_>> = sums.iter().map(|g| g.as_ref()).collect();
            run.sums.write(ctx, &refs);
        }
        if let (Some(m), Some(p)) = (&run.params, params) {
            m.write(ctx, p);
        }
        let report = run.runner.step()?.map(|r| r.wait()).transpose();
        // The read back follows the accumulation in the queue; the sums hold the
        // micro-batch even when the clip's verdict is an error, as on the CPU.
        run.sums.read(ctx, sums)?;
        report
    }

    pub(super) fn state(&self) -> Result<PolicyState, ClipError> {
        match &self.run {
            Some(r) => r.runner.policy().state(),
            None => self.chain.state(),
        }
    }

    pub(super) fn set_state(&mut self, saved: &PolicyState) -> Result<(), ClipError> {
        match &mut self.run {
            Some(r) => r.runner.policy_mut().set_state(saved),
            None => self.chain.set_state(saved),
        }
    }
}

/// Per-example clipping over mirrored host tensors: the inputs go in, the f32 outputs
/// come back.
pub struct StagedPerExample {
    clip: PerExampleClip,
    infos: Vec<TensorInfo>,
    run: Option<Box<PerExampleRun>>,
    /// The step count while no device runner holds it.
    steps: u64,
}

struct PerExampleRun {
    inputs: Mirrors,
    outputs: Mirrors,
    runner: GpuPerExample,
}

impl StagedPerExample {
    pub(super) fn new(
        clip: PerExampleClip,
        infos: &[TensorInfo],
    ) -> Result<StagedPerExample, ClipError> {
        let lens: Vec<u64> = infos.iter().map(TensorInfo::len).collect();
        clip.validate(&lens)?;
        Ok(StagedPerExample {
            clip,
            infos: infos.to_vec(),
            run: None,
            steps: 0,
        })
    }

    pub(super) fn steps_taken(&self) -> u64 {
        self.run
            .as_ref()
            .map_or(self.steps, |r| r.runner.steps_taken())
    }

    pub(super) fn set_steps_taken(&mut self, steps: u64) {
        match &mut self.run {
            Some(r) => r.runner.set_steps_taken(steps),
            None => self.steps = steps,
        }
    }

    pub(super) fn step(
        &mut self,
        ctx: &GpuContext,
        inputs: &[GradRef<'_>],
        outputs: &mut [&mut [f32]],
    ) -> Result<ClipReport, ClipError> {
        check_shapes(&self.infos, inputs.iter().map(|g| g.len() as u64))?;
        let batch = self.clip.batch as usize;
        let want: Vec<(DType, usize)> = (inputs.iter())
            .map(|g| (DType::F32, g.len() / batch.max(1)))
            .collect();
        let got: Vec<(DType, usize)> = outputs.iter().map(|o| (DType::F32, o.len())).collect();
        if got != want {
            return Err(ClipError::ShapeMismatch {
                tensor: "outputs".into(),
                expected: format!("{want:?}"),
                got: format!("{got:?}"),
            });
        }
        let shapes = shapes_of(inputs);
        let run = match &mut self.run {
            Some(run) => {
                check_same("inputs", &run.inputs, &shapes)?;
                run
            }
            None => {
                let (inputs_m, outputs_m) =
                    (Mirrors::new(ctx, &shapes)?, Mirrors::new(ctx, &want)?);
                let mut runner = GpuPerExample::new(
                    ctx,
                    &inputs_m.tensors(&self.infos, true),
                    &outputs_m.tensors(&self.infos, false),
                    self.clip.clone(),
                )?;
                runner.set_steps_taken(self.steps);
                self.run.insert(Box::new(PerExampleRun {
                    inputs: inputs_m,
                    outputs: outputs_m,
                    runner,
                }))
            }
        };
        run.inputs.write(ctx, inputs);
        let report = run.runner.step()?.wait()?;
        run.outputs.read(ctx, &mut f32_muts(outputs))?;
        Ok(report)
    }
}

/// A chain fused with an optimizer over mirrored host tensors: the gradients and the f32
/// parameters go in, the parameters (and, in place, the gradients) come back; the
/// optimizer's moments stay on the device.
pub struct StagedOptimize {
    chain: StagedChain,
    optimizer: Optimizer,
    lr: f32,
    /// The optimizer state while no device runner holds it.
    state: OptimizerState,
    run: Option<Box<OptimizeRun>>,
}

struct OptimizeRun {
    grads: Mirrors,
    params: Mirrors,
    runner: GpuOptimizer,
}

impl StagedOptimize {
    pub(super) fn new(
        policy: ClipPolicy,
        infos: &[TensorInfo],
        optimizer: Optimizer,
    ) -> Result<StagedOptimize, ClipError> {
        optimizer.check()?;
        let lens: Vec<u64> = infos.iter().map(TensorInfo::len).collect();
        Ok(StagedOptimize {
            chain: StagedChain::new(policy, infos)?,
            lr: optimizer.lr(),
            state: OptimizerState::fresh(&optimizer, &lens),
            optimizer,
            run: None,
        })
    }

    pub(super) fn policy(&self) -> &ClipPolicy {
        self.chain.policy()
    }

    pub(super) fn optimizer(&self) -> &Optimizer {
        &self.optimizer
    }

    pub(super) fn lr(&self) -> f32 {
        self.lr
    }

    pub(super) fn set_lr(&mut self, lr: f32) -> Result<(), ClipError> {
        if let Some(r) = &mut self.run {
            r.runner.set_lr(lr)?;
        } else {
            crate::optim::check_lr(lr)?;
        }
        self.lr = lr;
        Ok(())
    }

    pub(super) fn steps_taken(&self) -> u64 {
        match &self.run {
            Some(r) => r.runner.policy().steps_taken(),
            None => self.chain.steps_taken(),
        }
    }

    /// A step: fused (`in_place` false: the gradients are read, not written) or the
    /// chain's in-place clip then the update (the clipped gradients copied back).
    fn run(
        &mut self,
        ctx: &GpuContext,
        grads: OptimGrads<'_, '_>,
        params: &mut [&mut [f32]],
    ) -> Result<ClipReport, ClipError> {
        let infos = &self.chain.infos;
        let (run, in_place) = {
            let refs: Vec<GradRef<'_>> = match &grads {
                OptimGrads::Read(g) => g.to_vec(),
                OptimGrads::InPlace(g) => g.iter().map(|g| g.as_ref()).collect(),
            };
            check_shapes(infos, refs.iter().map(|g| g.len() as u64))?;
            check_shapes(infos, params.iter().map(|p| p.len() as u64))?;
            let shapes = shapes_of(&refs);
            let run = match &mut self.run {
                Some(run) => {
                    check_same("gradients", &run.grads, &shapes)?;
                    run
                }
                None => {
                    let grads_m = Mirrors::new(ctx, &shapes)?;
                    let params_m = Mirrors::new(ctx, &shapes_of(&f32_refs(params)))?;
                    let mut runner = GpuOptimizer::new(
                        ctx,
                        &grads_m.tensors(infos, true),
                        &params_m.tensors(infos, true),
                        self.chain.policy.clone(),
                        self.optimizer,
                    )?;
                    runner.set_clip_state(&self.chain.state()?)?;
                    runner.set_state(&self.state)?;
                    runner.set_lr(self.lr)?;
                    self.run.insert(Box::new(OptimizeRun {
                        grads: grads_m,
                        params: params_m,
                        runner,
                    }))
                }
            };
            run.grads.write(ctx, &refs);
            run.params.write(ctx, &f32_refs(params));
            (run, matches!(grads, OptimGrads::InPlace(_)))
        };
        let report = match in_place {
            true => run.runner.step_in_place()?,
            false => run.runner.step()?,
        }
        .wait()?;
        run.params.read(ctx, &mut f32_muts(params))?;
        if let OptimGrads::InPlace(back) = grads {
            run.grads.read(ctx, back)?;
        }
        Ok(report)
    }

    pub(super) fn step(
        &mut self,
        ctx: &GpuContext,
        grads: &[GradRef<'_>],
        params: &mut [&mut [f32]],
    ) -> Result<ClipReport, ClipError> {
        self.run(ctx, OptimGrads::Read(grads), params)
    }

    pub(super) fn step_in_place(
        &mut self,
        ctx: &GpuContext,
        grads: &mut [GradMut<'_>],
        params: &mut [&mut [f32]],
    ) -> Result<ClipReport, ClipError> {
        self.run(ctx, OptimGrads::InPlace(grads), params)
    }

    pub(super) fn state(&self) -> Result<OptimizerState, ClipError> {
        match &self.run {
            Some(r) => r.runner.state(),
            None => Ok(self.state.clone()),
        }
    }

    pub(super) fn set_state(&mut self, saved: &OptimizerState) -> Result<(), ClipError> {
        match &mut self.run {
            Some(r) => r.runner.set_state(saved),
            None => {
                let lens: Vec<u64> = self.chain.infos.iter().map(TensorInfo::len).collect();
                saved.check_fits(&self.optimizer, &lens)?;
                self.state = saved.clone();
                Ok(())
            }
        }
    }

    pub(super) fn clip_state(&self) -> Result<PolicyState, ClipError> {
        match &self.run {
            Some(r) => r.runner.clip_state(),
            None => self.chain.state(),
        }
    }

    pub(super) fn set_clip_state(&mut self, saved: &PolicyState) -> Result<(), ClipError> {
        match &mut self.run {
            Some(r) => r.runner.set_clip_state(saved),
            None => self.chain.set_state(saved),
        }
    }
}

/// A sharded chain over this rank's mirrored shards. Its device runner, and with it the
/// check with every rank, is built at the first step, which every rank takes together.
pub struct StagedSharded<C: Collective> {
    chain: StagedChain,
    shard: Shard,
    /// The collective until the device runner takes it.
    comm: Option<C>,
    run: Option<Box<ShardedRun<C>>>,
}

struct ShardedRun<C: Collective> {
    grads: Mirrors,
    params: Option<Mirrors>,
    runner: ShardedGpuPolicy<C>,
}

impl<C: Collective> StagedSharded<C> {
    pub(super) fn new(
        policy: ClipPolicy,
        infos: &[TensorInfo],
        shard: Shard,
        comm: C,
    ) -> Result<StagedSharded<C>, ClipError> {
        Shard::new(infos, shard.ranges().to_vec())?;
        Ok(StagedSharded {
            chain: StagedChain::new(policy, infos)?,
            shard,
            comm: Some(comm),
            run: None,
        })
    }

    pub(super) fn policy(&self) -> &ClipPolicy {
        self.chain.policy()
    }

    pub(super) fn shard(&self) -> &Shard {
        &self.shard
    }

    pub(super) fn collective(&self) -> &C {
        match (&self.run, &self.comm) {
            (Some(r), _) => r.runner.collective(),
            (None, Some(c)) => c,
            (None, None) => unreachable!("a failed first step gives the collective back"),
        }
    }

    pub(super) fn steps_taken(&self) -> u64 {
        match &self.run {
            Some(r) => r.runner.steps_taken(),
            None => self.chain.steps_taken(),
        }
    }

    /// This rank's checks of its input: the shard's lengths, the parameters AGC needs,
    /// the types of the first step. Returns the parameters the step reads.
    fn check<'p, 'g>(
        &self,
        grads: &[GradRef<'_>],
        params: Option<&'p [GradRef<'g>]>,
    ) -> Result<Option<&'p [GradRef<'g>]>, ClipError> {
        let name = |t: usize| self.chain.infos[t].name.clone();
        let lens: Vec<u64> = grads.iter().map(|g| g.len() as u64).collect();
        self.shard.check_local(&lens, name)?;
        let params = self.chain.params_of(params, |p| {
            let lens: Vec<u64> = p.iter().map(|g| g.len() as u64).collect();
            self.shard.check_local(&lens, name)
        })?;
        if let Some(run) = &self.run {
            check_same("gradients", &run.grads, &shapes_of(grads))?;
            if let (Some(m), Some(p)) = (&run.params, params) {
                check_same("parameters", m, &shapes_of(p))?;
            }
        }
        Ok(params)
    }

    /// A step. Bad input on this rank still takes part in the exchange (the first step's
    /// check of the plans, or a step's exchange of norms), so every rank fails the step
    /// and none waits; nothing changes anywhere.
    pub(super) fn step(
        &mut self,
        ctx: &GpuContext,
        grads: &mut [GradMut<'_>],
        params: Option<&[GradRef<'_>]>,
    ) -> Result<ClipReport, ClipError> {
        let refs: Vec<GradRef<'_>> = grads.iter().map(|g| g.as_ref()).collect();
        let local = self.check(&refs, params);
        let params = local.as_ref().ok().copied().flatten();
        let run = match &mut self.run {
            Some(run) => {
                if let Err(e) = local {
                    // This rank's part in the exchange, which fails on every rank.
                    return Err(run.runner.step_with(Err(e.clone())).err().unwrap_or(e));
                }
                run
            }
            None => {
                let infos = &self.chain.infos;
                let mirrors = local.and_then(|_| {
                    let grads_m = Mirrors::new(ctx, &shapes_of(&refs))?;
                    let params_m = params
                        .map(|p| Mirrors::new(ctx, &shapes_of(p)))
                        .transpose()?;
                    Ok((grads_m, params_m))
                });
                let comm = self
                    .comm
                    .take()
                    .expect("the collective until the first step");
                let (grads_m, params_m) = match mirrors {
                    Ok(m) => m,
                    Err(e) => {
                        // This rank's part in the other ranks' check of the plans.
                        let joined = Shard::verify(infos, Err(e.clone()), &comm);
                        self.comm = Some(comm);
                        return Err(joined.err().unwrap_or(e));
                    }
                };
                let p_tensors = params_m.as_ref().map(|m| m.tensors(infos, false));
                let built = ShardedGpuPolicy::new(
                    ctx,
                    &grads_m.tensors(infos, false),
                    p_tensors.as_deref(),
                    self.chain.policy.clone(),
                    infos,
                    self.shard.clone(),
                    comm,
                );
                let runner = match built {
                    Ok(runner) => runner,
                    Err((e, comm)) => {
                        // Kept for the next step, which tries again with every rank.
                        self.comm = Some(comm);
                        return Err(e);
                    }
                };
                let state = self.chain.state()?;
                let run = self.run.insert(Box::new(ShardedRun {
                    grads: grads_m,
                    params: params_m,
                    runner,
                }));
                // A device that cannot take the state fails the step; the runner (and with
                // it the collective) stays.
                run.runner.set_state(&state)?;
                run
            }
        };
        run.grads.write(ctx, &refs);
        if let (Some(m), Some(p)) = (&run.params, params) {
            m.write(ctx, p);
        }
        let report = run.runner.step()?;
        run.grads.read(ctx, grads)?;
        Ok(report)
    }

    pub(super) fn state(&self) -> Result<PolicyState, ClipError> {
        match &self.run {
            Some(r) => r.runner.state(),
            None => self.chain.state(),
        }
    }

    pub(super) fn set_state(&mut self, saved: &PolicyState) -> Result<(), ClipError> {
        match &mut self.run {
            Some(r) => r.runner.set_state(saved),
            None => self.chain.set_state(saved),
        }
    }
}
