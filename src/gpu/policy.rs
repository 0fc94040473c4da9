//! A clipping policy on the GPU: a program of the engine (`src/gpu/engine/`) built from a
//! [`ClipPolicy`], one compute pass per step. The state (AutoClip history, ZClip EMA, skip
//! counter) stays on the device between steps.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use super::context::GpuContext;
use super::deferred::{DeferredClip, LossScaleBinding};
use super::engine::{Engine, Mode, Step};
use super::readback::{
    decode_stages, decode_units, words_in, PendingReport, Readback, ReadbackLayout,
};
use super::resources::StepParams;
use super::tensor::{given_acc, infos_of, Bound, GpuTensor};
use crate::chain::{
    check_lens, check_shapes, ChainKind, ClipPolicy, GaussianNoise, PolicyState, Program,
    TensorInfo,
};
use crate::error::ClipError;
use crate::norm::PartialNorm;
use crate::report::{ClipReport, PolicyOutcome, ReportShape};
use crate::shaders::abi::Acc;

/// The unit norms of a step's gradients, then of its parameters (empty without AGC).
pub(crate) type UnitAccs = (Vec<Acc>, Vec<Acc>);

/// Runs a [`ClipPolicy`] over gradients in caller-owned buffers, step after step.
pub struct GpuPolicy {
    engine: Engine,
    policy: ClipPolicy,
    shape: Arc<ReportShape>,
    /// Name and shape of every gradient tensor planned, and beside them their lengths,
    /// which a rebind must match.
    infos: Vec<TensorInfo>,
    lens: Vec<u64>,
    /// Where the gradients (and the parameters) lie now.
    bound: (Vec<Bound>, Option<Vec<Bound>>),
    step: u64,
    /// Steps recorded into a caller's encoder whose work has not been seen done (it may
    /// not be submitted yet): while there are any, a move plans anew rather than rewrite
    /// tables such a step still reads. Counted down when the work is done.
    caller_steps: Arc<AtomicUsize>,
    /// Inside [`GpuPolicy::submit_with`]: the steps recorded now are submitted by it.
    own_submit: bool,
}

impl std::fmt::Debug for GpuPolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GpuPolicy")
            .field("stages", &self.policy.rules().count())
            .field("tensors", &self.infos.len())
            .field("units", &self.units())
            .field("step", &self.step)
            .finish()
    }
}

impl GpuPolicy {
    /// Plans `policy` over `grads`; AGC also takes the parameters, tensor for tensor of
    /// the same shapes. Names and shapes come from [`GpuTensor::named`] and
    /// [`GpuTensor::shaped`]. Errors (bad configuration, bad tensors) create nothing.
    pub fn new(
        ctx: &GpuContext,
        grads: &[GpuTensor<'_>],
        params: Option<&[GpuTensor<'_>]>,
        policy: ClipPolicy,
    ) -> Result<GpuPolicy, ClipError> {
        let infos = infos_of(grads);
        let lens: Vec<u64> = grads.iter().map(|t| t.len).collect();
        check_shapes(&infos, lens.iter().copied())?;
        let program = Program::new(&policy, &infos)?;
        let params = if program.needs_params() {
            let Some(p) = params else {
                return Err(ClipError::InvalidConfig(
                    "AGC needs the parameters alongside the gradients".into(),
                ));
            };
            let plens: Vec<u64> = p.iter().map(|t| t.len).collect();
            check_shapes(&infos, plens.iter().copied())?;
            Some(p)
        } else {
            None
        };
        Self::build(ctx, grads, params, policy, program, &infos)
    }

    /// Plans `program` (already resolved from `policy` over the tensors `infos`) over
    /// `grads`.
    pub(crate) fn build(
        ctx: &GpuContext,
        grads: &[GpuTensor<'_>],
        params: Option<&[GpuTensor<'_>]>,
        policy: ClipPolicy,
        program: Program,
        infos: &[TensorInfo],
    ) -> Result<GpuPolicy, ClipError> {
        let shape = ReportShape::new(&program, infos);
        let engine = Engine::new(ctx, grads, params, program, policy.noise.is_some())?;
        Ok(GpuPolicy {
            engine,
            policy,
            shape,
            infos: infos.to_vec(),
            lens: grads.iter().map(|t| t.len).collect(),
            bound: (Bound::all(grads), params.map(Bound::all)),
            step: 0,
            caller_steps: Arc::default(),
            own_submit: false,
        })
    }

    /// Where the parts of this policy's readbacks lie.
    pub(crate) fn readback_layout(&self) -> ReadbackLayout {
        self.engine.layout()
    }

    /// Moves the policy onto new buffer ranges of the same tensors (same names, shapes,
    /// lengths and order; dtypes may change), keeping its adaptive state and step count:
    /// for gradients a memory pool relocates between steps. The device state and the
    /// readback buffers stay where they are. A move that keeps the plan's shape (as many
    /// binding windows, the same chunks per window and per unit), when every step recorded so far was
    /// submitted by the policy itself (`step`), rewrites the chunk tables and makes only
    /// the bind groups over the caller's buffers anew, where those buffers changed; any
    /// other move builds the tables and bind groups anew; a rebind to the ranges it has
    /// already does nothing. Errors leave the policy as it was.
    pub fn rebind(
        &mut self,
        grads: &[GpuTensor<'_>],
        params: Option<&[GpuTensor<'_>]>,
    ) -> Result<(), ClipError> {
        let same_params = match (&self.bound.1, params) {
            (Some(b), Some(p)) => Bound::same(b, p),
            (None, _) => !self.engine.program().needs_params(),
            (Some(_), None) => false,
        };
        if same_params && Bound::same(&self.bound.0, grads) {
            return Ok(());
        }
        if grads.len() != self.infos.len() {
            return Err(ClipError::ShapeMismatch {
                tensor: "the batch".into(),
                expected: format!("{} tensors", self.infos.len()),
                got: format!("{}", grads.len()),
            });
        }
        let wanted = self.infos.iter().zip(&self.lens);
        for (i, (t, (want, want_len))) in grads.iter().zip(wanted).enumerate() {
            if !t.is(i, want) || t.len != *want_len {
                let (info, len) = (t.info(i), t.len);
                return Err(ClipError::ShapeMismatch {
                    tensor: want.name.clone(),
                    expected: format!("{} {:?} of {want_len} elements", want.name, want.shape),
                    got: format!("{} {:?} of {len} elements", info.name, info.shape),
                });
            }
        }
        let program = self.engine.program();
        let params = match (program.needs_params(), params) {
            (true, None) => {
                return Err(ClipError::InvalidConfig(
                    "AGC needs the parameters alongside the gradients".into(),
                ))
            }
            (true, Some(p)) => {
                check_lens(&self.lens, &self.infos, p.iter().map(|t| t.len))?;
                Some(p)
            }
            (false, _) => None,
        };
        // In place when the move keeps the plan's shape and no recorded step can still
        // read the old tables; else planned anew, keeping the state.
        let caller_steps = self.caller_steps.load(Ordering::Acquire);
        if caller_steps > 0 || !self.engine.moved_in_place(grads, params)? {
            let noise = self.policy.noise.is_some();
            self.engine = self.engine.rebound(grads, params, noise)?;
        }
        Bound::set(&mut self.bound.0, grads);
        match (&mut self.bound.1, params) {
            (Some(bound), Some(p)) => Bound::set(bound, p),
            (bound, p) => *bound = p.map(Bound::all),
        }
        Ok(())
    }

    /// The policy this runs.
    pub fn policy(&self) -> &ClipPolicy {
        &self.policy
    }

    /// Number of units (tensors, AGC units) that get their own coefficient.
    pub fn units(&self) -> usize {
        self.engine.program().units.len()
    }

    /// Steps taken so far: the next step's number.
    pub fn steps_taken(&self) -> u64 {
        self.step
    }

    /// Makes every following step write GPU timestamps at the start and end of its compute
    /// pass (indices `begin` and `end` of `query_set`); `None` stops it. Needs
    /// `Features::TIMESTAMP_QUERY`, which [`GpuContext::new`] enables where available.
    pub fn set_timestamp_writes(&mut self, timestamps: Option<(wgpu::QuerySet, u32, u32)>) {
        self.engine.set_timestamp_writes(timestamps);
    }

    /// This step's parameters; `noise` overrides the policy's. Fails (a schedule out of
    /// range) before anything is recorded.
    pub(crate) fn params(&self, noise: Option<GaussianNoise>) -> Result<StepParams, ClipError> {
        let policy = &self.policy;
        let order = policy.norm.order() as f32;
        let noise = noise.or(policy.noise).unwrap_or(GaussianNoise {
            sigma: 0.0,
            seed: 0,
        });
        let (lo_half, hi_half) = policy.value.map_or((0, 0), |v| v.half_bounds());
        let keys = policy.value.map(|v| v.half_clamps());
        let (keys_f16, keys_bf16) = keys.map_or((0, 0), |(f, b)| (f.keys(), b.keys()));
        // The step keys the noise only: without noise, steps keep the same parameters and
        // so their parameter slot (`StepSlots::write`).
        let key = if noise.sigma > 0.0 { self.step } else { 0 };
        let params = StepParams {
            policy: policy.non_finite.code(),
            p: order,
            inv_p: 1.0 / order,
            // A clamp alone scales nothing (its coefficients are never computed).
            rule: (self.engine.program().kind != ChainKind::ValueOnly) as u32,
            multiplier: policy.schedule.checked(self.step)?,
            sigma: noise.sigma,
            seed_lo: noise.seed as u32,
            seed_hi: (noise.seed >> 32) as u32,
            step_lo: key as u32,
            step_hi: (key >> 32) as u32,
            clamp: policy.value.is_some() as u32,
            lo: policy.value.map_or(0.0, |v| v.lo),
            hi: policy.value.map_or(0.0, |v| v.hi),
            lo_half,
            hi_half,
            keys_f16,
            keys_bf16,
            ..StepParams::default()
        };
        Ok(match policy.loss_scale {
            Some(ls) => StepParams {
                loss_scaling: 1,
                growth: ls.growth,
                backoff: ls.backoff,
                growth_interval: ls.growth_interval,
                min_scale: ls.min,
                max_scale: ls.max,
                ..params
            },
            None => params,
        })
    }

    /// The engine, for configurations that add their own dispatches.
    pub(crate) fn engine(&self) -> &Engine {
        &self.engine
    }

    /// Records `step` (its mode decides whether the gradients are rewritten) with `extra`
    /// dispatches after the stages; returns the readback and the step number, and advances
    /// the step.
    pub(crate) fn encode_step(
        &mut self,
        encoder: &mut wgpu::CommandEncoder,
        step: Step,
        extra: impl FnOnce(&mut wgpu::ComputePass<'_>, u32),
    ) -> Result<(Readback, u64), ClipError> {
        let readback = self.engine.encode(encoder, step, extra)?;
        let n = self.step;
        self.step = self.step.wrapping_add(1);
        Ok((readback, n))
    }

    /// Records one step: norms, coefficients and the in-place rewrite, with no host
    /// round trip. The report is readable once the encoder is submitted and run.
    ///
    /// Steps may be encoded back to back into one encoder (or several encoders submitted
    /// together): each records its own parameters (step number for the noise, schedule
    /// factor). Up to 64 steps of one policy with parameters of their own may be encoded
    /// before a submission (steps whose parameters do not change share theirs); a step
    /// whose parameters were overwritten by a later one changes nothing and its report is
    /// [`ClipError::StepOverwritten`].
    pub fn encode(
        &mut self,
        encoder: &mut wgpu::CommandEncoder,
    ) -> Result<PendingReport<ClipReport>, ClipError> {
        self.encode_with(encoder, Mode::Clip)
    }

    /// [`GpuPolicy::encode`] in `mode` (a clip, or one from merged unit norms).
    pub(crate) fn encode_with(
        &mut self,
        encoder: &mut wgpu::CommandEncoder,
        mode: Mode,
    ) -> Result<PendingReport<ClipReport>, ClipError> {
        let params = self.params(None)?;
        let kind = self.engine.program().kind;
        if kind == ChainKind::ValueOnly && mode == Mode::Clip {
            return self.encode_value_only(encoder, params);
        }
        let mode = match (kind, mode) {
            (ChainKind::Measure, Mode::Clip) => Mode::Measure,
            _ => mode,
        };
        let step = self.step_of(params, mode);
        self.encode_policy(encoder, step, |_, _| {})
    }

    /// Records the step of a clamp alone: the rewrite and nothing else. Its report holds
    /// no norm; it resolves, as every report, once the GPU has run the step.
    fn encode_value_only(
        &mut self,
        encoder: &mut wgpu::CommandEncoder,
        params: StepParams,
    ) -> Result<PendingReport<ClipReport>, ClipError> {
        let step = self.step_of(params, Mode::ValueOnly);
        let (readback, n) = self.encode_step(encoder, step, |_, _| {})?;
        let (norm, units) = (self.policy.norm, self.engine.layout().n_units() as u32);
        Ok(self.pending(encoder, readback, move |_: &[u32]| {
            Ok(ClipReport::value_only(n, norm, units))
        }))
    }

    /// Records one step of a global-norm chain (`ClipPolicy::global_norm`, with its
    /// schedule, non-finite policy and value clamp) that clips by the total norm `total`
    /// instead of measuring the gradients: the second half of the split API (PyTorch's
    /// `clip_grads_with_norm_`), after every shard's [`PartialNorm`] (the `partial` of a
    /// [`ClipPolicy::total_norm`] step's report) was combined. Another chain, or a norm
    /// of another order, is an error before anything is recorded.
    pub fn encode_with_norm(
        &mut self,
        encoder: &mut wgpu::CommandEncoder,
        total: &PartialNorm,
    ) -> Result<PendingReport<ClipReport>, ClipError> {
        self.policy.check_given(total)?;
        let params = StepParams {
            given: given_acc(total),
            use_given: 1,
            ..self.params(None)?
        };
        let step = Step {
            detail: false,
            ..self.step_of(params, Mode::GivenNorm)
        };
        self.encode_policy(encoder, step, |_, _| {})
    }

    /// [`GpuPolicy::encode_with_norm`], submitted now.
    pub fn step_with_norm(
        &mut self,
        total: &PartialNorm,
    ) -> Result<PendingReport<ClipReport>, ClipError> {
        self.submit_with(|policy, encoder| policy.encode_with_norm(encoder, total))
    }

    /// Records `step` (with `extra` dispatches after its stages) and returns its policy
    /// report.
    pub(crate) fn encode_policy(
        &mut self,
        encoder: &mut wgpu::CommandEncoder,
        step: Step,
        extra: impl FnOnce(&mut wgpu::ComputePass<'_>, u32),
    ) -> Result<PendingReport<ClipReport>, ClipError> {
        let detail = step.detail;
        let (readback, step) = self.encode_step(encoder, step, extra)?;
        let norm = self.policy.norm;
        let nf = self.policy.non_finite;
        let shape = self.shape.clone();
        let noise_std = self.policy.noise.map_or(0.0, |n| n.sigma);
        let loss_scaled = self.policy.loss_scale.is_some();
        let layout = self.engine.layout();
        Ok(self.pending(encoder, readback, move |w: &[u32]| {
            PolicyOutcome {
                step,
                norm,
                noise_std,
                stages: decode_stages(w, &layout),
                units: layout.n_units() as u32,
                policy: nf,
                detail: detail.then(|| decode_units(w, &layout)),
                shape,
                loss_scaled,
            }
            .report()
        }))
    }

    /// Records one step that computes the norms, the state and every unit's coefficient
    /// but leaves the gradients as they are: deferred scaling. The coefficients stay on
    /// the device ([`GpuPolicy::deferred`]) for a pass of the caller's own, recorded after
    /// this one, that multiplies as it reads (`gradclip_scaled` of
    /// [`DeferredClip::wgsl`]); clipping then costs one read of the gradients. Noise and
    /// value clipping change each element and need the in-place step: a policy with
    /// either is an error here.
    pub fn encode_deferred(
        &mut self,
        encoder: &mut wgpu::CommandEncoder,
    ) -> Result<PendingReport<ClipReport>, ClipError> {
        if self.policy.noise.is_some() || self.policy.value.is_some() {
            return Err(ClipError::InvalidConfig(
                "deferred scaling applies coefficients only; noise and value clipping need \
                 the in-place step (encode)"
                    .into(),
            ));
        }
        let params = self.params(None)?;
        let step = self.step_of(params, Mode::Coefficients);
        self.encode_policy(encoder, step, |_, _| {})
    }

    /// What a caller's pass binds to apply the coefficients of [`GpuPolicy::encode_deferred`].
    pub fn deferred(&self) -> DeferredClip<'_> {
        let (coefs, report, _) = self.engine.outputs();
        DeferredClip {
            coefs,
            report,
            layouts: self.engine.program().unit_layouts(self.infos.len()),
            zero_nans: self.policy.non_finite == crate::NonFinitePolicy::ZeroNans,
        }
    }

    /// The pending value `decode` reads from `readback` once `encoder` has run.
    fn pending<T>(
        &self,
        encoder: &wgpu::CommandEncoder,
        readback: Readback,
        decode: impl FnOnce(&[u32]) -> Result<T, ClipError> + Send + Sync + 'static,
    ) -> PendingReport<T> {
        if !self.own_submit {
            self.caller_steps.fetch_add(1, Ordering::AcqRel);
            let caller_steps = self.caller_steps.clone();
            encoder.on_submitted_work_done(move || {
                caller_steps.fetch_sub(1, Ordering::AcqRel);
            });
        }
        let device = self.engine.ctx().inner.device.clone();
        PendingReport::on_submit(
            encoder,
            readback,
            self.engine.pool(),
            device,
            Box::new(decode),
        )
    }

    /// Records the unit norms of the next step and nothing else (the first half of a
    /// sharded step); the step counter stays. The pending value holds the unit norms of
    /// the gradients, then of the parameters.
    pub(crate) fn encode_units(
        &mut self,
        encoder: &mut wgpu::CommandEncoder,
    ) -> Result<PendingReport<UnitAccs>, ClipError> {
        let params = self.params(None)?;
        let step = Step {
            detail: false,
            ..self.step_of(params, Mode::UnitsOnly)
        };
        let readback = self.engine.encode(encoder, step, |_, _| {})?;
        let layout = self.engine.layout();
        let has_params = self.engine.program().needs_params();
        Ok(self.pending(encoder, readback, move |w: &[u32]| {
            let table = |k: u64| -> Vec<Acc> {
                bytemuck::cast_slice(words_in(w, layout.unit_table(k))).to_vec()
            };
            Ok((table(0), if has_params { table(1) } else { vec![] }))
        }))
    }

    /// [`GpuPolicy::encode`], submitted now.
    pub fn step(&mut self) -> Result<PendingReport<ClipReport>, ClipError> {
        self.submit_with(|policy, encoder| policy.encode(encoder))
    }

    /// Records with `record` into a new encoder and submits it; a submission that fails
    /// leaves the step counter where it was.
    pub(crate) fn submit_with<T>(
        &mut self,
        record: impl FnOnce(&mut Self, &mut wgpu::CommandEncoder) -> Result<T, ClipError>,
    ) -> Result<T, ClipError> {
        let ctx = self.engine.ctx().clone();
        let step = self.step;
        self.own_submit = true;
        let out = ctx.record_and_submit("gradclip policy", self, record, |p| p.rewind(step));
        self.own_submit = false;
        out
    }

    /// The engine step of a policy step in `mode` with `params`.
    pub(crate) fn step_of(&self, params: StepParams, mode: Mode) -> Step {
        Step {
            norm: self.policy.norm,
            params,
            mode,
            detail: self.policy.report_groups,
        }
    }

    /// Where the loss scale of the next step lives on the device
    /// ([`crate::ClipPolicy::loss_scale`]); `None` for a chain without loss scaling.
    pub fn loss_scale_on_device(&self) -> Option<LossScaleBinding<'_>> {
        self.policy.loss_scale.is_some().then(|| LossScaleBinding {
            state: self.engine.state_buffer(),
        })
    }

    /// Checks that the next step can be recorded (its schedule, its pipelines on this
    /// device), so a caller can fail before it records work of its own.
    pub(crate) fn check(&self) -> Result<(), ClipError> {
        self.engine
            .prepare(&self.step_of(self.params(None)?, Mode::Clip))
    }

    /// Sets the next step's number back to `step`, after a submission that did not run.
    pub(crate) fn rewind(&mut self, step: u64) {
        self.step = step;
    }

    /// Reads the state back (waits for the GPU), to save it with [`PolicyState::to_bytes`].
    pub fn state(&self) -> Result<PolicyState, ClipError> {
        let mut words = self.engine.read_state()?;
        words.truncate(self.engine.program().state_words);
        Ok(PolicyState::from_device(
            self.step,
            words,
            self.engine.program(),
        ))
    }

    /// Restores a saved state (from either backend); the next step continues from it.
    pub fn set_state(&mut self, state: &PolicyState) -> Result<(), ClipError> {
        state.check_fits(&self.engine.program().fresh_state())?;
        self.engine.write_state(&state.words)?;
        self.step = state.step;
        Ok(())
    }
}
