//! Clipping policies: a [`Rule`] (what gets a norm and how norms become coefficients)
//! composed with a threshold [`Schedule`], optional [`GaussianNoise`] and a
//! [`NonFinitePolicy`]. The same description runs on the GPU ([`crate::GpuPolicy`]) and
//! on the CPU ([`crate::CpuPolicy`]), over the shared segment reduction.

mod layout;
mod per_example;
mod rules;
mod schedule;
mod state;

pub use layout::UnitLayout;
pub(crate) use layout::{check_shapes, Formula, Program, StagePlan, NO_GROUP};
pub(crate) use per_example::clipped_per_tensor;
pub use per_example::{ExampleThreshold, PerExampleClip, PerExampleReport};
pub use rules::{
    Agc, AutoClip, BlockRmsClip, Group, GroupClip, Masked, PerTensorClip, Rule, UnitAxis, ZClip,
};
pub use schedule::Schedule;
pub use state::{AdaptiveKind, AdaptiveState, PolicyState};
pub(crate) use state::{
    HEADER_WORDS, ST_MEAN, ST_SAVED_MEAN, ST_SAVED_SLOT, ST_SAVED_VAR, ST_SEEN, ST_SKIPS, ST_VAR,
};

use crate::error::ClipError;
use crate::non_finite::NonFinitePolicy;
use crate::norm::Norm;
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
    /// The first norm stage.
    pub rule: Rule,
    /// Further norm stages, in order ([`ClipPolicy::then`]).
    pub then: Vec<Rule>,
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
    /// Also report every group's (or unit's) norm and coefficient.
    pub report_groups: bool,
    /// What was written before a later norm stage although it runs after every one
    /// (noise or the value clamp), refused by [`ClipPolicy::validate`].
    misordered: Option<&'static str>,
}

impl ClipPolicy {
    /// `rule` (a [`Rule`], or any rule's description: `ClipPolicy::new(AutoClip::new(90.0,
    /// 1000))`) with an L2 norm, a constant schedule, no noise, non-finite values
    /// propagated.
    pub fn new(rule: impl Into<Rule>) -> Self {
        ClipPolicy {
            rule: rule.into(),
            then: Vec::new(),
            norm: Norm::L2,
            schedule: Schedule::Constant,
            noise: None,
            value: None,
            non_finite: NonFinitePolicy::Propagate,
            report_groups: false,
            misordered: None,
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
        if self.misordered.is_none() {
            self.misordered = match (self.noise, self.value) {
                (_, Some(_)) => Some("a value clamp"),
                (Some(_), None) => Some("noise"),
                (None, None) => None,
            };
        }
        self.then.push(rule.into());
        self
    }

    /// The norm stages in order.
    pub fn rules(&self) -> impl Iterator<Item = &Rule> {
        std::iter::once(&self.rule).chain(&self.then)
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
    /// elementwise pass.
    pub fn value(mut self, clip: ValueClip) -> Self {
        self.value = Some(clip);
        self
    }

    /// Uses non-finite policy `policy`.
    pub fn non_finite(mut self, policy: NonFinitePolicy) -> Self {
        self.non_finite = policy;
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
        if let Some(what) = self.misordered {
            return Err(ClipError::InvalidConfig(format!(
                "{what} is written before a norm stage, but runs after every norm stage: \
                 write .noise(..) and .value(..) after the last .then(..)"
            )));
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
