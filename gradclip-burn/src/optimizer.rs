//! An optimizer that clips inside its step.

use burn::lr_scheduler::module_lr_scheduler::ModuleLearningRate;
use burn::module::Module;
use burn::optim::{GradientsParams, ModuleOptimizer};
use gradclip::ClipReport;

use crate::clipper::BurnClipper;
use crate::error::BurnClipError;

/// A Burn [`ModuleOptimizer`] that clips the gradients with a [`BurnClipper`] first: one
/// line in the training loop. The optimizer's own `gradient_clipping` must be unset.
///
/// The step waits for the clip's report (a few bytes) so that a step gradclip skips
/// ([`gradclip::NonFinitePolicy::SkipStep`]) or rejects ([`gradclip::NonFinitePolicy::Error`])
/// leaves the module and the optimizer state unchanged; use [`BurnClipper::clip`] and
/// Burn's optimizer directly to keep the report pending.
pub struct ClippedOptimizer {
    optim: ModuleOptimizer,
    clipper: BurnClipper,
}

impl ClippedOptimizer {
    /// Wraps `optim`; fails with [`BurnClipError::ClipsTwice`] when it clips on its own.
    pub fn new(optim: ModuleOptimizer, clipper: BurnClipper) -> Result<Self, BurnClipError> {
        if optim.has_gradient_clipping() {
            return Err(BurnClipError::ClipsTwice);
        }
        Ok(ClippedOptimizer { optim, clipper })
    }

    /// The clipper.
    pub fn clipper(&self) -> &BurnClipper {
        &self.clipper
    }

    /// The wrapped optimizer (to save its record, say).
    pub fn optimizer(&self) -> &ModuleOptimizer {
        &self.optim
    }

    /// Clips `grads`, then steps `module` with them. Returns the module (unchanged when
    /// the clip failed or skipped the step) and the clip's report.
    pub fn step<M: Module>(
        &mut self,
        lr: impl Into<ModuleLearningRate>,
        module: M,
        mut grads: GradientsParams,
    ) -> (M, Result<ClipReport, BurnClipError>) {
        match self.clipper.clip_waiting(&module, &mut grads) {
            Ok(report) if !report.skipped => (self.optim.step(lr, module, grads), Ok(report)),
            other => (module, other),
        }
    }
}
