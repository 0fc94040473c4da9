//! The state a policy carries between steps, in the exact word layout the GPU keeps
//! (`state` binding of `shaders/coef.wgsl`), so a state saved from either backend
//! restores on either and a resumed run clips as the uninterrupted one would.

use crate::error::ClipError;

use super::Program;
use crate::shaders::abi;

/// Header words before the history.
pub(crate) const HEADER_WORDS: usize = abi::ST_HEADER as usize;
pub(crate) const ST_SEEN: usize = abi::ST_SEEN as usize;
pub(crate) const ST_SKIPS: usize = abi::ST_SKIPS as usize;
pub(crate) const ST_MEAN: usize = abi::ST_MEAN as usize;
pub(crate) const ST_VAR: usize = abi::ST_VAR as usize;
pub(crate) const ST_CAP: usize = abi::ST_CAP as usize;
pub(crate) const ST_SAVED_SLOT: usize = abi::ST_SAVED_SLOT as usize;
pub(crate) const ST_SAVED_MEAN: usize = abi::ST_SAVED_MEAN as usize;
pub(crate) const ST_SAVED_VAR: usize = abi::ST_SAVED_VAR as usize;
pub(crate) const ST_LOSS_SCALE: usize = abi::ST_LOSS_SCALE as usize;
pub(crate) const ST_GOOD_STEPS: usize = abi::ST_GOOD_STEPS as usize;
pub(crate) const ST_RECORDED: usize = abi::ST_RECORDED as usize;

const MAGIC: &[u8; 4] = b"GCPS";
const VERSION: u32 = 6;

/// What gives a state's numbers meaning, part by part: a state records a hash of each
/// (its fingerprint), so one restored into another chain or other tensors names the
/// first part that differs.
pub(crate) const MEANING: [&str; 8] = [
    "norm order",
    "norm stages (their kinds, parameters, masks, groups and order)",
    "non-finite policy",
    "schedule",
    "noise",
    "value clamp",
    "loss scaling",
    // Last: `PolicyState::for_tensors` compares every part before it.
    "tensors (their names, shapes and order)",
];

/// FNV-1a in 32 bits: the same on every platform and Rust version, as a hash saved with
/// a state must be (std's hashers promise neither). What it hashes is a fixed encoding of
/// the numbers and names that give a state meaning, never `Debug` text.
#[derive(Clone, Copy)]
struct Fnv(u32);

impl Fnv {
    fn new() -> Fnv {
        Fnv(0x811c_9dc5)
    }

    fn bytes(mut self, bytes: &[u8]) -> Fnv {
        for &b in bytes {
            self.0 = (self.0 ^ b as u32).wrapping_mul(0x0100_0193);
        }
        self
    }

    fn u32(self, v: u32) -> Fnv {
        self.bytes(&v.to_le_bytes())
    }

    fn u64(self, v: u64) -> Fnv {
        self.bytes(&v.to_le_bytes())
    }

    fn f32(self, v: f32) -> Fnv {
        self.u32(v.to_bits())
    }

    fn f64(self, v: f64) -> Fnv {
        self.u64(v.to_bits())
    }

    fn opt_f32(self, v: Option<f32>) -> Fnv {
        match v {
            None => self.u32(0),
            Some(x) => self.u32(1).f32(x),
        }
    }

    /// A string, length first, so that the pieces of a list stay apart.
    fn text(self, s: &str) -> Fnv {
        self.u64(s.len() as u64).bytes(s.as_bytes())
    }

    fn texts(self, list: &[String]) -> Fnv {
        list.iter()
            .fold(self.u64(list.len() as u64), |h, s| h.text(s))
    }

    /// A norm stage: a tag per kind, then its numbers and patterns.
    fn rule(self, rule: &super::Rule) -> Fnv {
        use super::{Rule, UnitAxis};
        match rule {
            Rule::GlobalNorm(c) => self.u32(1).f32(*c),
            Rule::PerTensor(p) => self.u32(2).f32(p.max_norm),
            Rule::Groups(g) => (g.groups.iter()).fold(
                self.u32(3)
                    .f32(g.default_max_norm)
                    .u64(g.groups.len() as u64),
                |h, group| {
                    h.text(&group.name)
                        .texts(&group.patterns)
                        .f32(group.max_norm)
                },
            ),
            Rule::BlockRms(b) => self.u32(4).f32(b.threshold),
            Rule::Agc(a) => {
                let axis = match a.axis {
                    UnitAxis::First => 0,
                    UnitAxis::Last => 1,
                };
                (self.u32(5).f32(a.lambda).f32(a.eps).u32(axis)).texts(&a.exclude)
            }
            Rule::AutoClip(a) => (self.u32(6).f32(a.percentile).u32(a.history)).opt_f32(a.max_norm),
            Rule::ZClip(z) => (self.u32(7).f32(z.alpha).f32(z.z_thresh).f32(z.eps))
                .u32(z.warmup)
                .opt_f32(z.max_norm),
            Rule::Masked(m) => self.u32(8).texts(&m.exclude).rule(&m.rule),
        }
    }
}

/// The fingerprint of `policy` over tensors `infos`: one hash per part of [`MEANING`].
pub(crate) fn meaning_of(policy: &super::ClipPolicy, infos: &[super::TensorInfo]) -> Vec<u32> {
    use super::Schedule;
    let h = Fnv::new;
    let schedule = match &policy.schedule {
        Schedule::Constant => h().u32(0),
        Schedule::StepDecay { factor, every } => h().u32(1).f64(*factor).u64(*every),
        Schedule::Custom(name, _) => h().u32(2).text(name),
    };
    let noise = match policy.noise {
        None => h().u32(0),
        Some(n) => h().u32(1).f32(n.sigma).u64(n.seed),
    };
    let value = match policy.value {
        None => h().u32(0),
        Some(v) => h().u32(1).f32(v.lo).f32(v.hi),
    };
    let loss_scale = match policy.loss_scale {
        None => h().u32(0),
        Some(l) => (h().u32(1).f32(l.init).f32(l.growth).u32(l.growth_interval))
            .f32(l.backoff)
            .f32(l.min)
            .f32(l.max),
    };
    let tensors = infos.iter().fold(h().u64(infos.len() as u64), |h, t| {
        (t.shape.iter()).fold(h.text(&t.name).u64(t.shape.len() as u64), |h, &d| h.u64(d))
    });
    vec![
        h().f64(policy.norm.order()).0,
        policy.rules().fold(h(), Fnv::rule).0,
        h().u32(policy.non_finite.code()).0,
        schedule.0,
        noise.0,
        value.0,
        loss_scale.0,
        tensors.0,
    ]
}

/// Words of one stage's record in a state's layout: adaptive kind, history slots, formula,
/// first state word, then the rule's numbers (`StageParams`).
pub(crate) const STAGE_RECORD: usize = 4 + STAGE_PARAMS_WORDS;
pub(crate) const STAGE_PARAMS_WORDS: usize = std::mem::size_of::<abi::StageParams>() / 4;

/// Which adaptive rule an [`AdaptiveState`] belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AdaptiveKind {
    /// [`crate::AutoClip`]: a ring buffer of past norms.
    AutoClip,
    /// [`crate::ZClip`]: warmup norms, then a running mean and variance.
    ZClip,
}

/// What one adaptive stage of a chain remembers ([`PolicyState::adaptive`]).
#[derive(Debug, Clone, PartialEq)]
pub struct AdaptiveState {
    /// The stage's place in the chain (0 for the first norm stage).
    pub stage: usize,
    /// Its rule.
    pub kind: AdaptiveKind,
    /// Finite norms it has recorded so far.
    pub norms_seen: u32,
    /// The norms it keeps: AutoClip's ring buffer in slot order, ZClip's warmup norms.
    pub history: Vec<f32>,
    /// ZClip's running mean and variance (meaningful after warmup); `None` for AutoClip.
    pub ema: Option<(f32, f32)>,
}

/// Everything a policy remembers: the step counter (noise and schedules), the count of
/// consecutive skipped steps, and for the adaptive rules the norm history (AutoClip's
/// ring buffer, ZClip's warmup norms) and ZClip's running mean and variance.
///
/// A state records the stages it belongs to (their rules and numbers): restoring it into
/// another configuration, or restoring values outside their domain, is an error.
#[derive(Debug, Clone, PartialEq)]
pub struct PolicyState {
    pub(crate) step: u64,
    /// Per stage, a [`STAGE_RECORD`]-word record of the program it was made for.
    pub(crate) layout: Vec<u32>,
    /// The fingerprint of the chain and tensors it was made for ([`MEANING`]); empty for
    /// the global programs, whose states are never saved.
    pub(crate) meaning: Vec<u32>,
    /// Header words then history (f32 bits).
    pub(crate) words: Vec<u32>,
}

impl PolicyState {
    /// A zeroed state of `words` words for stages described by `layout` (see
    /// `Program::fresh_state`).
    pub(crate) fn new(words: usize, layout: Vec<u32>, meaning: Vec<u32>) -> Self {
        PolicyState {
            step: 0,
            layout,
            meaning,
            words: vec![0; words],
        }
    }

    /// A state read from the device: the engine's per-step words (what `undo` would put
    /// back) are not part of it.
    pub(crate) fn from_device(step: u64, mut words: Vec<u32>, program: &Program) -> Self {
        for stage in &program.stages {
            stage.clear_step_words(&mut words);
        }
        let fresh = program.fresh_state();
        PolicyState {
            step,
            layout: fresh.layout,
            meaning: fresh.meaning,
            words,
        }
    }

    /// Steps taken so far: the next step's number.
    pub fn steps_taken(&self) -> u64 {
        self.step
    }

    /// The same state with `steps` steps taken (the next step numbered `steps`): to carry
    /// a run's step count (the noise key, the schedule) over to a fresh state.
    pub fn with_steps_taken(mut self, steps: u64) -> PolicyState {
        self.step = steps;
        self
    }

    /// Consecutive steps skipped by [`crate::NonFinitePolicy::SkipStep`], up to the last.
    pub fn consecutive_skips(&self) -> u32 {
        self.words[ST_SKIPS]
    }

    /// The loss scale and its count of finite steps, for a loss-scaled chain
    /// ([`crate::ClipPolicy::loss_scale`]); `None` otherwise.
    pub fn loss_scale(&self) -> Option<super::LossScaleState> {
        let scale = f32::from_bits(self.words[ST_LOSS_SCALE]);
        (scale != 0.0).then(|| super::LossScaleState {
            scale,
            finite_steps: self.words[ST_GOOD_STEPS],
        })
    }

    /// The state of every adaptive stage (AutoClip, ZClip) of the chain, in chain order.
    pub fn adaptive(&self) -> Vec<AdaptiveState> {
        (self.layout.chunks(STAGE_RECORD).enumerate())
            .filter_map(|(stage, record)| {
                let (kind, history, base) = (record[0], record[1] as usize, record[3] as usize);
                let kind = match kind {
                    abi::ADAPTIVE_AUTOCLIP => AdaptiveKind::AutoClip,
                    abi::ADAPTIVE_ZCLIP => AdaptiveKind::ZClip,
                    _ => return None,
                };
                let word = |i: usize| f32::from_bits(self.words[base + i]);
                let norms_seen = self.words[base + ST_SEEN];
                let kept = (norms_seen as usize).min(history);
                Some(AdaptiveState {
                    stage,
                    kind,
                    norms_seen,
                    history: (0..kept).map(|i| word(HEADER_WORDS + i)).collect(),
                    ema: (kind == AdaptiveKind::ZClip).then(|| (word(ST_MEAN), word(ST_VAR))),
                })
            })
            .collect()
    }

    /// This state moved to the same chain over other tensors (a layer frozen or unfrozen
    /// between steps): the adaptive memory and the step count carry over where the state
    /// does not depend on the tensors (its stages and their blocks are the same, as for
    /// global stages). Another chain, or a state whose blocks follow the tensors (AGC
    /// units, per-tensor groups), is [`ClipError::InvalidState`].
    pub fn for_tensors(
        &self,
        policy: &super::ClipPolicy,
        infos: &[super::TensorInfo],
    ) -> Result<PolicyState, ClipError> {
        let fresh = Program::new(policy, infos)?.fresh_state();
        let tensors = MEANING.len() - 1;
        let same_chain = self.meaning.len() == fresh.meaning.len()
            && self.meaning[..tensors] == fresh.meaning[..tensors];
        if !same_chain || self.layout != fresh.layout || self.words.len() != fresh.words.len() {
            return Err(ClipError::InvalidState(
                "the state moves to other tensors only for the same chain, whose state does \
                 not depend on the tensors"
                    .into(),
            ));
        }
        Ok(PolicyState {
            meaning: fresh.meaning,
            ..self.clone()
        })
    }

    /// Serializes the state (little-endian, versioned, with its layout).
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(
            28 + 4 * (self.layout.len() + self.meaning.len() + self.words.len()),
        );
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&VERSION.to_le_bytes());
        out.extend_from_slice(&self.step.to_le_bytes());
        for part in [&self.layout, &self.meaning, &self.words] {
            out.extend_from_slice(&(part.len() as u32).to_le_bytes());
            for w in part {
                out.extend_from_slice(&w.to_le_bytes());
            }
        }
        out
    }

    /// Reads a state written by [`PolicyState::to_bytes`]. Any other input (truncated,
    /// oversized, another format or version) is [`ClipError::InvalidState`].
    pub fn from_bytes(bytes: &[u8]) -> Result<PolicyState, ClipError> {
        let bad = |why: &str| ClipError::InvalidState(why.into());
        let word = |i: usize| -> Result<u32, ClipError> {
            let b = bytes.get(i..i + 4).ok_or_else(|| bad("truncated state"))?;
            Ok(u32::from_le_bytes(b.try_into().expect("4 bytes")))
        };
        if bytes.get(..4) != Some(&MAGIC[..]) {
            return Err(bad("not a gradclip policy state"));
        }
        if word(4)? != VERSION {
            return Err(bad("unsupported state version"));
        }
        let step = word(8)? as u64 | (word(12)? as u64) << 32;
        let mut at = 16;
        let mut part = || -> Result<Vec<u32>, ClipError> {
            let n = word(at)? as usize;
            if n > (bytes.len() - at) / 4 {
                return Err(bad("truncated state"));
            }
            let words = (0..n).map(|i| word(at + 4 + 4 * i)).collect();
            at += 4 + 4 * n;
            words
        };
        let layout = part()?;
        let meaning = part()?;
        let words = part()?;
        if at != bytes.len() {
            return Err(bad("oversized state"));
        }
        // Every stage's block (its header and history) lies inside the words.
        let blocks_fit = layout.chunks(STAGE_RECORD).all(|r| {
            let (history, base) = (r[1] as usize, r[3] as usize);
            base.checked_add(HEADER_WORDS + history)
                .is_some_and(|end| end <= words.len())
        });
        let malformed = words.len() < HEADER_WORDS
            || layout.len() % STAGE_RECORD != 0
            || !blocks_fit
            || !(meaning.is_empty() || meaning.len() == MEANING.len());
        if malformed {
            return Err(bad("malformed state"));
        }
        Ok(PolicyState {
            step,
            layout,
            meaning,
            words,
        })
    }

    /// Checks that this state belongs to the program whose fresh state is `fresh`: the
    /// same stages with the same rules and numbers, the same size, and values in their
    /// domain (norms finite and >= 0, a variance >= 0).
    pub(crate) fn check_fits(&self, fresh: &PolicyState) -> Result<(), ClipError> {
        let bad = |why: String| Err(ClipError::InvalidState(why));
        if self.meaning.len() != fresh.meaning.len() {
            return bad("the state was saved from another kind of step".into());
        }
        let differs = (self.meaning.iter().zip(&fresh.meaning)).position(|(a, b)| a != b);
        if let Some(part) = differs {
            return bad(format!(
                "the state was saved for another chain or other tensors: its {} differ",
                MEANING[part]
            ));
        }
        if self.layout != fresh.layout {
            return bad(
                "the state was saved from another policy (its stages, rules or numbers differ)"
                    .into(),
            );
        }
        if self.words.len() != fresh.words.len() {
            return bad(format!(
                "state holds {} words, the policy needs {}",
                self.words.len(),
                fresh.words.len()
            ));
        }
        // A loss scale where the chain has one (the fingerprint says so), finite and > 0:
        // every norm is divided by it.
        let scale = f32::from_bits(self.words[ST_LOSS_SCALE]);
        let scaled = fresh.words[ST_LOSS_SCALE] != 0;
        if scaled && !(scale.is_normal() && scale > 0.0) || !scaled && scale != 0.0 {
            return bad(format!(
                "the state holds the loss scale {scale}, not one this chain can use"
            ));
        }
        if !scaled && self.words[ST_GOOD_STEPS] != 0 {
            return bad(
                "the state counts finite steps of a loss scale this chain does not have".into(),
            );
        }
        for record in self.layout.chunks(STAGE_RECORD) {
            let (adaptive, history, base) = (record[0], record[1] as usize, record[3] as usize);
            if self.words[base + ST_CAP] as usize != history {
                return bad(format!(
                    "state block at word {base} does not keep {history} history slots"
                ));
            }
            if adaptive == abi::ADAPTIVE_NONE {
                continue;
            }
            let norm = |i: usize| f32::from_bits(self.words[base + i]);
            let seen = (self.words[base + ST_SEEN] as usize).min(history);
            for i in 0..seen {
                let v = norm(HEADER_WORDS + i);
                if !(v.is_finite() && v.is_sign_positive()) {
                    return bad(format!("history slot {i} holds {v}, not a norm"));
                }
            }
            let (mean, var) = (norm(ST_MEAN), norm(ST_VAR));
            let domain = |x: f32| x.is_finite() && x.is_sign_positive();
            if !(domain(mean) && domain(var)) {
                return bad(format!(
                    "ZClip mean {mean} and variance {var} must be finite and >= 0"
                ));
            }
        }
        Ok(())
    }
}
