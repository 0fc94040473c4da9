//! The clipping rules: each says which units get a norm and how a unit's norm and
//! threshold give its coefficient.

use crate::error::ClipError;

fn check(ok: bool, what: &str, value: f64) -> Result<(), ClipError> {
    if ok {
        Ok(())
    } else {
        Err(ClipError::InvalidConfig(format!("{what} = {value}")))
    }
}

fn positive(what: &str, v: f32) -> Result<(), ClipError> {
    check(
        v.is_finite() && v > 0.0,
        &format!("{what} must be finite and > 0, got"),
        v as f64,
    )
}

/// Clip each tensor by its own norm (Keras `clipnorm`, TF `clip_by_norm`):
/// `g_t * c / max(norm_t, c)`; a zero tensor stays zero.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PerTensorClip {
    /// The threshold `c`, finite and > 0.
    pub max_norm: f32,
}

impl PerTensorClip {
    /// Each tensor clipped to norm `max_norm`.
    pub fn new(max_norm: f32) -> Self {
        PerTensorClip { max_norm }
    }
}

/// One group of tensors with its own threshold, chosen by name.
#[derive(Debug, Clone, PartialEq)]
pub struct Group {
    /// Name used in reports.
    pub name: String,
    /// Glob patterns over tensor names (`*` matches any run of characters); a tensor
    /// joins the first group with a matching pattern.
    pub patterns: Vec<String>,
    /// The group's threshold, finite and > 0.
    pub max_norm: f32,
}

/// Layer-wise clipping: tensors grouped by name, each group clipped by its own group
/// norm with PyTorch's formula `min(c_g / (norm_g + 1e-6), 1)` (as calling
/// `clip_grad_norm_` per group does). Tensors that match no group form the default group.
#[derive(Debug, Clone, PartialEq)]
pub struct GroupClip {
    /// Groups, tried in order.
    pub groups: Vec<Group>,
    /// Threshold of the default group (unmatched tensors).
    pub default_max_norm: f32,
}

impl GroupClip {
    /// No groups yet: every tensor in the default group with threshold `default_max_norm`.
    pub fn new(default_max_norm: f32) -> Self {
        GroupClip {
            groups: Vec::new(),
            default_max_norm,
        }
    }

    /// Adds a group `name` of the tensors whose name matches `pattern`.
    pub fn group(mut self, name: &str, pattern: &str, max_norm: f32) -> Self {
        self.groups.push(Group {
            name: name.into(),
            patterns: vec![pattern.into()],
            max_norm,
        });
        self
    }

    /// The group index of a tensor name (`groups.len()` is the default group).
    pub(crate) fn group_of(&self, name: &str) -> usize {
        self.groups
            .iter()
            .position(|g| g.patterns.iter().any(|p| glob_match(p, name)))
            .unwrap_or(self.groups.len())
    }

    pub(crate) fn validate(&self) -> Result<(), ClipError> {
        positive("default max_norm", self.default_max_norm)?;
        for g in &self.groups {
            positive(&format!("max_norm of group {:?}", g.name), g.max_norm)?;
        }
        Ok(())
    }
}

/// `*` matches any run of characters; everything else matches itself.
pub(crate) fn glob_match(pattern: &str, name: &str) -> bool {
    let parts: Vec<&str> = pattern.split('*').collect();
    if parts.len() == 1 {
        return pattern == name;
    }
    let (first, last) = (parts[0], parts[parts.len() - 1]);
    // Both ends matched first, so the cuts below fall on character boundaries.
    let fits = name.len() >= first.len() + last.len();
    if !fits || !name.starts_with(first) || !name.ends_with(last) {
        return false;
    }
    let mut rest = &name[first.len()..name.len() - last.len()];
    for part in &parts[1..parts.len() - 1] {
        match rest.find(part) {
            Some(i) => rest = &rest[i + part.len()..],
            None => return false,
        }
    }
    true
}

/// Block RMS clipping (optax `clip_by_block_rms`): each tensor divided by
/// `max(1, rms(g) / threshold)`, `rms = sqrt(mean(g^2))`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BlockRmsClip {
    /// Largest allowed RMS, finite and > 0.
    pub threshold: f32,
}

impl BlockRmsClip {
    /// Each tensor's RMS clipped to `threshold`.
    pub fn new(threshold: f32) -> Self {
        BlockRmsClip { threshold }
    }
}

/// Which axis indexes the units of a weight for AGC.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum UnitAxis {
    /// PyTorch layout `(out, in, ...)`: a unit is one slice along the first axis (a row),
    /// its norm taken over all the other axes (timm `adaptive_clip_grad`).
    #[default]
    First,
    /// JAX/Flax layout `(..., in, out)`: a unit is one index of the last axis (a column),
    /// its norm taken over all the other axes (optax `adaptive_grad_clip`).
    Last,
}

/// Adaptive Gradient Clipping (NFNets): per unit i,
/// `limit_i = lambda * max(||W_i||, eps)`; `G_i` is kept when `||G_i|| < limit_i`, else
/// scaled to `G_i * limit_i / max(||G_i||, 1e-6)`. Tensors of rank <= 1 are one unit.
#[derive(Debug, Clone, PartialEq)]
pub struct Agc {
    /// Clipping factor lambda (default 0.01), finite and > 0.
    pub lambda: f32,
    /// Floor of the parameter norm (default 1e-3), finite and >= 0.
    pub eps: f32,
    /// Unit axis of weights of rank >= 2.
    pub axis: UnitAxis,
    /// Name patterns (`*` globs) of tensors left unclipped, typically the final classifier.
    pub exclude: Vec<String>,
}

impl Default for Agc {
    fn default() -> Self {
        Agc {
            lambda: 0.01,
            eps: 1e-3,
            axis: UnitAxis::First,
            exclude: Vec::new(),
        }
    }
}

impl Agc {
    /// AGC with the given lambda, eps 1e-3, PyTorch layout.
    pub fn new(lambda: f32) -> Self {
        Agc {
            lambda,
            ..Agc::default()
        }
    }

    /// Sets the unit axis.
    pub fn axis(mut self, axis: UnitAxis) -> Self {
        self.axis = axis;
        self
    }

    /// Sets eps.
    pub fn eps(mut self, eps: f32) -> Self {
        self.eps = eps;
        self
    }

    /// Leaves the tensors matching `pattern` unclipped.
    pub fn exclude(mut self, pattern: &str) -> Self {
        self.exclude.push(pattern.into());
        self
    }

    pub(crate) fn excludes(&self, name: &str) -> bool {
        self.exclude.iter().any(|p| glob_match(p, name))
    }

    pub(crate) fn validate(&self) -> Result<(), ClipError> {
        positive("AGC lambda", self.lambda)?;
        check(
            self.eps.is_finite() && self.eps >= 0.0,
            "AGC eps must be finite and >= 0, got",
            self.eps as f64,
        )
    }
}

/// AutoClip: the threshold of each step is the `percentile` of the total norms seen so
/// far, this step's included (linear interpolation, as numpy's default), over a ring
/// buffer of the last `history` norms kept on the device; then a global clip with
/// PyTorch's formula. Non-finite norms are not recorded.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AutoClip {
    /// Percentile in [0, 100] (the seeds use 90; the AutoClip paper 10).
    pub percentile: f32,
    /// Ring buffer size, >= 1 (e.g. 1000 or 10000 for a long run).
    pub history: u32,
    /// Optional fixed cap on the threshold.
    pub max_norm: Option<f32>,
}

impl AutoClip {
    /// The `percentile` of the last `history` norms.
    pub fn new(percentile: f32, history: u32) -> Self {
        AutoClip {
            percentile,
            history,
            max_norm: None,
        }
    }

    pub(crate) fn validate(&self) -> Result<(), ClipError> {
        check(
            (0.0..=100.0).contains(&self.percentile),
            "AutoClip percentile must be in [0, 100], got",
            self.percentile as f64,
        )?;
        check(self.history >= 1, "AutoClip history must be >= 1, got", 0.0)?;
        // The history lives in the device state (4 bytes a norm).
        check(
            self.history <= 1 << 24,
            "AutoClip history must be at most 2^24, got",
            self.history as f64,
        )?;
        if let Some(c) = self.max_norm {
            positive("AutoClip max_norm", c)?;
        }
        Ok(())
    }
}

/// ZClip: z-score spike detection on the total norm. After `warmup` steps (mean and
/// population variance of their norms, no clipping), with `z = (n - mean) / (std + eps)`:
/// a spike (`z > z_thresh`) is clipped to `mean + z_thresh^2 * std / z` (coefficient
/// `threshold / (n + 1e-6)`); the EMA (`alpha`) then absorbs the clipped norm, or `n`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ZClip {
    /// EMA factor (default 0.97), in (0, 1).
    pub alpha: f32,
    /// z-score threshold (default 2.5), > 0.
    pub z_thresh: f32,
    /// Added to the std (default 1e-6).
    pub eps: f32,
    /// Warmup steps (default 25), >= 1.
    pub warmup: u32,
    /// Optional fixed cap, applied as a global clip after the spike rule.
    pub max_norm: Option<f32>,
}

impl Default for ZClip {
    fn default() -> Self {
        ZClip {
            alpha: 0.97,
            z_thresh: 2.5,
            eps: 1e-6,
            warmup: 25,
            max_norm: None,
        }
    }
}

impl ZClip {
    /// ZClip with its defaults: alpha 0.97, z threshold 2.5, eps 1e-6, 25 warmup steps, no
    /// cap.
    pub fn new() -> Self {
        ZClip::default()
    }

    /// Sets the EMA factor.
    pub fn alpha(mut self, alpha: f32) -> Self {
        self.alpha = alpha;
        self
    }

    /// Sets the z-score threshold.
    pub fn z_thresh(mut self, z_thresh: f32) -> Self {
        self.z_thresh = z_thresh;
        self
    }

    /// Sets what is added to the std.
    pub fn eps(mut self, eps: f32) -> Self {
        self.eps = eps;
        self
    }

    /// Sets the warmup steps.
    pub fn warmup(mut self, warmup: u32) -> Self {
        self.warmup = warmup;
        self
    }

    /// Caps the threshold at `max_norm`.
    pub fn max_norm(mut self, max_norm: f32) -> Self {
        self.max_norm = Some(max_norm);
        self
    }

    pub(crate) fn validate(&self) -> Result<(), ClipError> {
        check(
            self.alpha > 0.0 && self.alpha < 1.0,
            "ZClip alpha must be in (0, 1), got",
            self.alpha as f64,
        )?;
        positive("ZClip z_thresh", self.z_thresh)?;
        check(
            self.eps.is_finite() && self.eps >= 0.0,
            "ZClip eps must be finite and >= 0, got",
            self.eps as f64,
        )?;
        check(self.warmup >= 1, "ZClip warmup must be >= 1, got", 0.0)?;
        if let Some(c) = self.max_norm {
            positive("ZClip max_norm", c)?;
        }
        Ok(())
    }
}

/// What a policy clips by.
#[derive(Debug, Clone, PartialEq)]
pub enum Rule {
    /// One global norm over every tensor, PyTorch's `clip_grad_norm_` formula.
    GlobalNorm(f32),
    /// Each tensor by its own norm.
    PerTensor(PerTensorClip),
    /// Groups of tensors by their group norms.
    Groups(GroupClip),
    /// Each tensor by its RMS.
    BlockRms(BlockRmsClip),
    /// Unit-wise, relative to the parameters.
    Agc(Agc),
    /// Global, threshold from a percentile of the norm history.
    AutoClip(AutoClip),
    /// Global, z-score spike detection.
    ZClip(ZClip),
    /// Another rule over every tensor but some ([`Rule::except`]).
    Masked(Masked),
}

/// A rule applied to every tensor except those whose names match one of the patterns
/// (`*` matches any run of characters), as optax's `masked` wraps a transform: the
/// excluded tensors neither count in the rule's norms nor get its coefficients.
#[derive(Debug, Clone, PartialEq)]
pub struct Masked {
    /// The rule.
    pub rule: Box<Rule>,
    /// Name patterns of the tensors it leaves alone.
    pub exclude: Vec<String>,
}

/// Every rule's description is a rule: `ClipPolicy::new(AutoClip::new(90.0, 1000))`.
macro_rules! rule_from {
    ($($kind:ident($ty:ty)),*) => {$(
        impl From<$ty> for Rule {
            fn from(r: $ty) -> Rule {
                Rule::$kind(r)
            }
        }
    )*};
}

rule_from!(
    PerTensor(PerTensorClip),
    Groups(GroupClip),
    BlockRms(BlockRmsClip),
    Agc(Agc),
    AutoClip(AutoClip),
    ZClip(ZClip),
    Masked(Masked)
);

impl Rule {
    /// This rule over every tensor except those matching `patterns` (a norm stage that
    /// leaves biases and norm layers alone, say: `Rule::GlobalNorm(1.0).except(["*.bias"])`).
    /// Masks of masks add up.
    pub fn except<S: Into<String>>(self, patterns: impl IntoIterator<Item = S>) -> Rule {
        let more = patterns.into_iter().map(Into::into);
        match self {
            Rule::Masked(mut m) => {
                m.exclude.extend(more);
                Rule::Masked(m)
            }
            rule => Rule::Masked(Masked {
                rule: Box::new(rule),
                exclude: more.collect(),
            }),
        }
    }

    /// The rule under any masks.
    pub(crate) fn inner(&self) -> &Rule {
        match self {
            Rule::Masked(m) => m.rule.inner(),
            rule => rule,
        }
    }

    /// True when a mask of this rule excludes tensor `name`.
    pub(crate) fn masks(&self, name: &str) -> bool {
        match self {
            Rule::Masked(m) => m.exclude.iter().any(|p| glob_match(p, name)) || m.rule.masks(name),
            _ => false,
        }
    }

    pub(crate) fn validate(&self) -> Result<(), ClipError> {
        match self {
            Rule::Masked(m) => m.rule.validate(),
            Rule::GlobalNorm(c) => positive("max_norm", *c),
            Rule::PerTensor(r) => positive("max_norm", r.max_norm),
            Rule::Groups(r) => r.validate(),
            Rule::BlockRms(r) => positive("block RMS threshold", r.threshold),
            Rule::Agc(r) => r.validate(),
            Rule::AutoClip(r) => r.validate(),
            Rule::ZClip(r) => r.validate(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::glob_match;

    #[test]
    fn globs() {
        assert!(glob_match("lstm*", "lstm.weight_hh"));
        assert!(glob_match("*weight*", "fc.weight.0"));
        assert!(glob_match("fc.bias", "fc.bias"));
        assert!(glob_match("*", ""));
        // Names and patterns of any script: no cut inside a character.
        assert!(!glob_match("*b", "层.权重"));
        assert!(!glob_match("a*b", "aé"));
        assert!(glob_match("层*", "层.权重"));
        assert!(glob_match("*权重", "层.权重"));
        assert!(glob_match("*.*", "层.权重"));
        assert!(!glob_match("层*层", "层"));
        assert!(glob_match("a*b*c", "abc"));
        assert!(!glob_match("a*b*c", "acb"));
        assert!(!glob_match("ab*ba", "aba"));
        assert!(!glob_match("fc", "fc.bias"));
        assert!(glob_match("*embed*", "model.embedding.weight"));
    }
}
