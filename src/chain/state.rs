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

const MAGIC: &[u8; 4] = b"GCPS";
const VERSION: u32 = 1;

/// Everything a policy remembers: the step counter (noise and schedules), the count of
/// consecutive skipped steps, and for the adaptive rules the norm history (AutoClip's
/// ring buffer, ZClip's warmup norms) and ZClip's running mean and variance.
#[derive(Debug, Clone, PartialEq)]
pub struct PolicyState {
    pub(crate) step: u64,
    /// Header words then history (f32 bits).
    pub(crate) words: Vec<u32>,
}

impl PolicyState {
    /// A zeroed state of `words` words (see `Program::fresh_state`).
    pub(crate) fn new(words: usize) -> Self {
        PolicyState {
            step: 0,
            words: vec![0; words],
        }
    }

    /// A state read from the device: the engine's per-step tag words are not part of it.
    pub(crate) fn from_device(step: u64, mut words: Vec<u32>, program: &Program) -> Self {
        for stage in &program.stages {
            words[stage.state_base + abi::ST_TAG as usize] = 0;
        }
        PolicyState { step, words }
    }

    /// Steps taken so far (the next step's number).
    pub fn step(&self) -> u64 {
        self.step
    }

    /// Consecutive steps skipped by [`crate::NonFinitePolicy::SkipStep`], up to the last.
    pub fn consecutive_skips(&self) -> u32 {
        self.words[ST_SKIPS]
    }

    /// Finite norms recorded by an adaptive rule so far.
    pub fn norms_seen(&self) -> u32 {
        self.words[ST_SEEN]
    }

    /// The stored norms (AutoClip: the ring buffer in slot order; ZClip: the warmup norms).
    pub fn history(&self) -> Vec<f32> {
        let cap = (self.words[ST_CAP] as usize).min(self.words.len() - HEADER_WORDS);
        let n = (self.words[ST_SEEN] as usize).min(cap);
        self.words[HEADER_WORDS..HEADER_WORDS + n]
            .iter()
            .map(|&w| f32::from_bits(w))
            .collect()
    }

    /// ZClip's running mean and variance (meaningful after warmup).
    pub fn ema(&self) -> (f32, f32) {
        (
            f32::from_bits(self.words[ST_MEAN]),
            f32::from_bits(self.words[ST_VAR]),
        )
    }

    /// Serializes the state (little-endian, versioned).
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(20 + 4 * self.words.len());
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&VERSION.to_le_bytes());
        out.extend_from_slice(&self.step.to_le_bytes());
        out.extend_from_slice(&(self.words.len() as u32).to_le_bytes());
        for w in &self.words {
            out.extend_from_slice(&w.to_le_bytes());
        }
        out
    }

    /// Reads a state written by [`PolicyState::to_bytes`].
    pub fn from_bytes(bytes: &[u8]) -> Result<PolicyState, ClipError> {
        let bad = |why: &str| ClipError::InvalidState(why.into());
        if bytes.len() < 20 || &bytes[..4] != MAGIC {
            return Err(bad("not a gradclip policy state"));
        }
        let u32_at = |i: usize| u32::from_le_bytes(bytes[i..i + 4].try_into().unwrap());
        if u32_at(4) != VERSION {
            return Err(bad("unsupported state version"));
        }
        let step = u64::from_le_bytes(bytes[8..16].try_into().unwrap());
        let n = u32_at(16) as usize;
        if n < HEADER_WORDS || bytes.len() != 20 + 4 * n {
            return Err(bad("truncated or oversized state"));
        }
        Ok(PolicyState {
            step,
            words: (0..n).map(|i| u32_at(20 + 4 * i)).collect(),
        })
    }

    /// Checks that this state has the layout of `fresh` (a program's fresh state): the
    /// same size and the same history capacity in every block.
    pub(crate) fn check_fits(&self, fresh: &PolicyState) -> Result<(), ClipError> {
        if self.words.len() != fresh.words.len() {
            return Err(ClipError::InvalidState(format!(
                "state holds {} words, the policy needs {}",
                self.words.len(),
                fresh.words.len()
            )));
        }
        // A fresh state is zero but for each block's capacity word.
        for (i, &w) in fresh.words.iter().enumerate() {
            if w != 0 && self.words[i] != w {
                return Err(ClipError::InvalidState(format!(
                    "state word {i} is {}, the policy keeps {w} history slots there",
                    self.words[i]
                )));
            }
        }
        Ok(())
    }
}
