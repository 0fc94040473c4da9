//! Clipping policies: a [`Rule`] (what gets a norm and how norms become coefficients)
//! composed with a threshold [`Schedule`], optional [`GaussianNoise`] and a
//! [`NonFinitePolicy`]. The same description runs on the GPU ([`crate::GpuClipper`]) and
//! on the CPU ([`crate::CpuClipper`]), over the shared segment reduction.

mod layout;
mod loss_scale;
mod per_example;
mod rules;
mod schedule;
mod state;

pub use layout::UnitLayout;
pub(crate) use layout::{check_lens, check_shapes, Formula, Program, StagePlan, NO_GROUP};
pub use loss_scale::{LossScale, LossScaleState};
pub(crate) use per_example::clipped_per_tensor;
pub use per_example::{ExampleThreshold, PerExampleClip};
pub use rules::{
    Agc, AutoClip, BlockRmsClip, Group, GroupClip, Masked, PerTensorClip, Rule, UnitAxis, ZClip,
};
pub use schedule::Schedule;
pub use state::{AdaptiveKind, AdaptiveState, PolicyState};
pub(crate) use state::{
    HEADER_WORDS, ST_GOOD_STEPS, ST_LOSS_SCALE, ST_MEAN, ST_RECORDED, ST_SAVED_MEAN, ST_SAVED_SLOT,
    ST_SAVED_VAR, ST_SEEN, ST_SKIPS, ST_VAR,
};

use crate::error::ClipError;
use crate::non_finite::NonFinitePolicy;
use crate::norm::{Norm, PartialNorm};
use crate::ops::ValueClip;

/// Gaussian noise added to every element after clipping: `N(0, sigma^2)` from
/// Philox4x32-10 keyed by `(seed, step)` with counter `(index / 4, tensor, step)`, so the
/// noise of an element depends only on (seed, step, tensor, index): not on the GPU, the
/// launch geometry or the backend ([`crate::noise`]).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GaussianNoise {
    /// Standard deviation, finite and >= 0.
    pub sigma: f32,
    /// Generator seed.
    pub seed: u64,
}

/// Name and shape of one tensor, for rules that need them (groups by name, AGC units).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorInfo {
    /// Name matched by group and exclusion patterns.
    pub name: String,
    /// Shape; its product must be the tensor's length.
    pub shape: Vec<u64>,
}

impl TensorInfo {
    /// A tensor `name` of shape `shape`.
    pub fn new(name: impl Into<String>, shape: &[u64]) -> Self {
        TensorInfo {
            name: name.into(),
            shape: shape.to_vec(),
        }
    }

    /// The name of the tensor at `index` of a batch: its `label`, or `#index` without one.
    pub(crate) fn name_of(label: Option<&str>, index: usize) -> String {
        label.map_or_else(|| format!("#{index}"), str::to_owned)
    }

    /// Flat tensors of lengths `lens`, named `#0`, `#1`, ... as unnamed GPU tensors are:
    /// enough for every chain but those that match names or need shapes (groups, masks,
    /// AGC on weights of rank 2 or more).
    pub fn unnamed(lens: impl IntoIterator<Item = usize>) -> Vec<TensorInfo> {
        (lens.into_iter().enumerate())
            .map(|(i, len)| TensorInfo::new(TensorInfo::name_of(None, i), &[len as u64]))
            .collect()
    }

    /// Number of elements (`u64::MAX` for a shape whose product does not fit, which every
    /// clipper rejects).
    pub fn len(&self) -> u64 {
        self.checked_len().unwrap_or(u64::MAX)
    }

    /// The product of the shape, unless it overflows.
    pub(crate) fn checked_len(&self) -> Option<u64> {
        self.shape.iter().try_fold(1u64, |a, &d| a.checked_mul(d))
    }

    /// True for a tensor with no elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A clipping policy: a chain of norm stages plus the transforms around it, read in the
/// order written. Every rule is built the same way, `Kind::new(..)` then setters.
///
/// ```
/// use gradclip::{AutoClip, ClipPolicy, GaussianNoise, NonFinitePolicy, PerTensorClip};
/// use gradclip::{Rule, Schedule, ZClip};
/// let policy = ClipPolicy::new(PerTensorClip::new(1.0))
///     .then(ZClip::new().warmup(100))
///     .then(Rule::from(AutoClip::new(90.0, 1000)).except(["*.bias"]))
///     .schedule(Schedule::step_decay(0.5, 1000))
///     .noise(GaussianNoise { sigma: 1e-3, seed: 7 })
///     .non_finite(NonFinitePolicy::ZeroNans);
/// assert!(policy.validate().is_ok());
/// ```
#[derive(Debug, Clone)]
pub struct ClipPolicy {
    /// The norm stages, in order ([`ClipPolicy::then`]); none for
    /// [`ClipPolicy::total_norm`] and [`ClipPolicy::value_clip`].
    stages: Vec<Rule>,
    /// Norm order of the norm-threshold rules (AGC and block RMS are L2 by definition).
    pub norm: Norm,
    /// Threshold multiplier over steps.
    pub schedule: Schedule,
    /// Noise added after clipping.
    pub noise: Option<GaussianNoise>,
    /// Value clipping after the noise (Keras' `clipnorm` + `clipvalue` in one step).
    pub value: Option<ValueClip>,
    /// NaN and infinity handling.
    pub non_finite: NonFinitePolicy,
    /// Dynamic or fixed loss scaling ([`ClipPolicy::loss_scale`]); `None`: the gradients
    /// arrive unscaled.
    pub loss_scale: Option<LossScale>,
    /// Also report every group's (or unit's) norm and coefficient.
    pub report_groups: bool,
    /// Why the chain as written cannot run as written (noise or a value clamp before a
    /// later norm stage, say), refused by [`ClipPolicy::validate`].
    refused: Option<&'static str>,
}

/// What a chain's step does, by the stages it has.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ChainKind {
    /// Norm stages: measure, scale, then noise and the clamp.
    Stages,
    /// No stage and no clamp: the total norm is measured, nothing is written.
    Measure,
    /// No stage, a clamp: one elementwise pass, no norm measured.
    ValueOnly,
}

impl ClipPolicy {
    /// `rule` (a [`Rule`], or any rule's description: `ClipPolicy::new(AutoClip::new(90.0,
    /// 1000))`) with an L2 norm, a constant schedule, no noise, non-finite values
    /// propagated.
    pub fn new(rule: impl Into<Rule>) -> Self {
        ClipPolicy {
            stages: vec![rule.into()],
            ..ClipPolicy::total_norm()
        }
    }

    /// Clipping by the norm of all tensors together to `max_norm` (PyTorch's
    /// `clip_grad_norm_`, optax's `clip_by_global_norm`): `ClipPolicy::new(Rule::GlobalNorm(max_norm))`.
    pub fn global_norm(max_norm: f32) -> Self {
        ClipPolicy::new(Rule::GlobalNorm(max_norm))
    }

    /// No norm stage: a step measures the total norm of the gradients (PyTorch's
    /// `get_total_norm`; the report's `total_norm`, and `partial` for the split API) and
    /// writes nothing. [`ClipPolicy::then`] adds stages to it like to any chain.
    pub fn total_norm() -> Self {
        ClipPolicy {
            stages: Vec::new(),
            norm: Norm::L2,
            schedule: Schedule::Constant,
            noise: None,
            value: None,
            non_finite: NonFinitePolicy::Propagate,
            loss_scale: None,
            report_groups: false,
            refused: None,
        }
    }

    /// Every element clamped to `clip`'s bounds and nothing else (PyTorch's
    /// `clip_grad_value_`): one elementwise pass that measures no norm, so the report's
    /// norms are NaN. Noise and norm stages cannot be added to it.
    pub fn value_clip(clip: ValueClip) -> Self {
        ClipPolicy {
            value: Some(clip),
            ..ClipPolicy::total_norm()
        }
    }

    /// Adds a norm stage after the previous ones: it sees the gradients as the earlier
    /// stages scaled them (AGC then a global norm, say). The stages share one read of the
    /// gradients: a norm scales linearly, so each stage's norms are the unit norms times
    /// the coefficients so far, and one elementwise pass applies the product.
    ///
    /// Noise and the value clamp run after every norm stage, so a chain that writes them
    /// before a norm stage (`.value(..).then(..)`) is refused by
    /// [`ClipPolicy::validate`] rather than run in another order than written.
    pub fn then(mut self, rule: impl Into<Rule>) -> Self {
        if self.refused.is_none() {
            self.refused = match (self.noise, self.value) {
                (_, Some(_)) => Some(
                    "a value clamp is written before a norm stage, but runs after every norm \
                     stage: write .value(..) after the last .then(..)",
                ),
                (Some(_), None) => Some(
                    "noise is written before a norm stage, but runs after every norm stage: \
                     write .noise(..) after the last .then(..)",
                ),
                (None, None) => None,
            };
        }
        self.stages.push(rule.into());
        self
    }

    /// The norm stages in order.
    pub fn rules(&self) -> impl Iterator<Item = &Rule> {
        self.stages.iter()
    }

    /// What a step of this chain does.
    pub(crate) fn kind(&self) -> ChainKind {
        match (self.stages.is_empty(), self.value.is_some()) {
            (false, _) => ChainKind::Stages,
            (true, false) => ChainKind::Measure,
            (true, true) => ChainKind::ValueOnly,
        }
    }

    /// Checks that this chain can finish a step from the caller's total norm `total` (the
    /// split API): its only stage is a global norm, of `total`'s order.
    pub(crate) fn check_given(&self, total: &PartialNorm) -> Result<(), ClipError> {
        if !matches!(self.stages[..], [Rule::GlobalNorm(_)]) {
            return Err(ClipError::InvalidConfig(
                "a given total norm finishes a global-norm chain (ClipPolicy::global_norm) only"
                    .into(),
            ));
        }
        if total.norm() != self.norm {
            return Err(ClipError::InvalidConfig(format!(
                "the given total is a {:?} norm, the chain clips by the {:?} norm",
                total.norm(),
                self.norm
            )));
        }
        Ok(())
    }

    /// Uses norm order `norm`.
    pub fn norm(mut self, norm: Norm) -> Self {
        self.norm = norm;
        self
    }

    /// Uses threshold schedule `schedule`.
    pub fn schedule(mut self, schedule: Schedule) -> Self {
        self.schedule = schedule;
        self
    }

    /// Adds Gaussian noise after clipping.
    pub fn noise(mut self, noise: GaussianNoise) -> Self {
        self.noise = Some(noise);
        self
    }

    /// Clamps every element to `clip`'s bounds last, after scaling and noise, in the same
    /// elementwise pass. On a chain with no norm stage ([`ClipPolicy::total_norm`]) it is
    /// refused by [`ClipPolicy::validate`]: a clamp alone is [`ClipPolicy::value_clip`].
    pub fn value(mut self, clip: ValueClip) -> Self {
        if self.stages.is_empty() && self.refused.is_none() {
            self.refused = Some(
                "a value clamp on a chain with no norm stage: use ClipPolicy::value_clip for \
                 a clamp alone, or add the norm stages first",
            );
        }
        self.value = Some(clip);
        self
    }

    /// Uses non-finite policy `policy`.
    pub fn non_finite(mut self, policy: NonFinitePolicy) -> Self {
        self.non_finite = policy;
        self
    }

    /// Loss scaling for mixed-precision training: the gradients arrive multiplied by the
    /// scale S (the loss was multiplied by S before the backward pass). Every norm the
    /// chain and the report see is of the unscaled gradients (a norm scales linearly, so
    /// this costs no pass), the gradients a step writes (or a fused optimizer reads, or a
    /// deferred pass applies) are unscaled and clipped, and a step whose gradients hold an
    /// infinity or a NaN is skipped with the gradients, the adaptive state and the
    /// optimizer untouched, while S backs off. S lives in the chain's state (saved with
    /// it), in the report ([`crate::ClipReport::loss_scale`]) and on the device
    /// ([`crate::GpuClipper::loss_scale_on_device`]).
    ///
    /// An overflow is an expected event of loss scaling, so the chain's non-finite policy
    /// becomes [`NonFinitePolicy::SkipStep`]; setting another one afterwards is refused by
    /// [`ClipPolicy::validate`]. A loss-scaled chain needs a norm stage (the unscaling is
    /// folded into its coefficients): for loss scaling without clipping, use
    /// `ClipPolicy::global_norm(f32::MAX)`.
    pub fn loss_scale(mut self, scale: LossScale) -> Self {
        self.loss_scale = Some(scale);
        self.non_finite = NonFinitePolicy::SkipStep;
        self
    }

    /// Reports every group's norm and coefficient.
    pub fn with_group_report(mut self) -> Self {
        self.report_groups = true;
        self
    }

    /// True when a stage (AGC) needs the parameters as well as the gradients.
    pub fn needs_params(&self) -> bool {
        self.rules().any(|r| matches!(r.inner(), Rule::Agc(_)))
    }

    /// Checks the whole configuration.
    pub fn validate(&self) -> Result<(), ClipError> {
        if let Some(why) = self.refused {
            return Err(ClipError::InvalidConfig(why.into()));
        }
        if self.stages.is_empty() && self.noise.is_some() {
            return Err(ClipError::InvalidConfig(
                "noise needs a norm stage before it (DP-SGD clips, then adds noise)".into(),
            ));
        }
        let decides_on_the_norm = matches!(
            self.non_finite,
            NonFinitePolicy::Error | NonFinitePolicy::SkipStep
        );
        if self.kind() == ChainKind::ValueOnly && decides_on_the_norm {
            return Err(ClipError::InvalidConfig(
                "a value clamp alone measures no norm, so a non-finite policy that decides on \
                 the norm (Error, SkipStep) cannot apply: use Propagate or ZeroNans"
                    .into(),
            ));
        }
        for rule in self.rules() {
            rule.validate()?;
        }
        self.norm.validate()?;
        let l2_only = self
            .rules()
            .any(|r| matches!(r.inner(), Rule::Agc(_) | Rule::BlockRms(_)));
        if l2_only && self.norm != Norm::L2 {
            return Err(ClipError::InvalidConfig(
                "AGC and block RMS are defined with the L2 norm".into(),
            ));
        }
        if self
            .rules()
            .filter(|r| matches!(r.inner(), Rule::Agc(_)))
            .count()
            > 1
        {
            return Err(ClipError::InvalidConfig(
                "a chain holds at most one AGC stage (its units are the chain's units)".into(),
            ));
        }
        if let Some(v) = &self.value {
            v.validate()?;
        }
        if let Some(ls) = &self.loss_scale {
            ls.validate()?;
            if self.kind() != ChainKind::Stages {
                return Err(ClipError::InvalidConfig(
                    "loss scaling is folded into a norm stage's coefficients: add one                      (ClipPolicy::global_norm(f32::MAX) unscales without clipping)"
                        .into(),
                ));
            }
            if self.non_finite != NonFinitePolicy::SkipStep {
                return Err(ClipError::InvalidConfig(format!(
                    "a loss-scaled chain skips every step with non-finite gradients (and                      backs off its scale), so its non-finite policy is SkipStep, not {:?}",
                    self.non_finite
                )));
            }
        }
        if let Some(n) = self.noise {
            if !(n.sigma.is_finite() && n.sigma >= 0.0) {
                return Err(ClipError::InvalidConfig(format!(
                    "noise sigma must be finite and >= 0, got {}",
                    n.sigma
                )));
            }
        }
        Ok(())
    }
}
