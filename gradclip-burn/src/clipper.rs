//! Clipping a Burn module's gradients in place with any gradclip chain.

use burn::module::Module;
use burn::optim::GradientsParams;
use gradclip::{
    ClipPolicy, ClipReport, GpuClipper, GpuTensor, PendingReport, PolicyState, TensorInfo,
};

use crate::device::SharedDevice;
use crate::error::BurnClipError;
use crate::gradients::{Found, Range, collect};

/// What identifies one step's buffer ranges (gradients, then parameters).
type Key = Vec<(wgpu::Buffer, u64, u64, gradclip::DType)>;

/// Clips a Burn module's gradients on Burn's own wgpu device and queue, after the
/// backward pass and before the optimizer step: any [`ClipPolicy`] (global norm, groups
/// by parameter path, AGC, adaptive rules, chains), one fused pass, no copy of the
/// gradients and no host read-back inside the step.
///
/// Tensor names are module paths (`encoder.layers.0.weight`), so group and exclusion
/// patterns such as `encoder.*` or `*.bias` work. The policy is planned on the first
/// step; when Burn's memory pool hands the gradients other buffer ranges, the plan moves
/// to them and keeps its state ([`BurnClipper::moves`] counts how often).
pub struct BurnClipper {
    shared: SharedDevice,
    policy: ClipPolicy,
    planned: Option<(GpuClipper, Key)>,
    restore: Option<PolicyState>,
    moves: u64,
    copies: u64,
}

impl std::fmt::Debug for BurnClipper {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BurnClipper")
            .field("policy", &self.policy)
            .field("planned", &self.planned.as_ref().map(|(p, _)| p))
            .field("moves", &self.moves)
            .field("copies", &self.copies)
            .finish()
    }
}

impl BurnClipper {
    /// A clipper running `policy` on `shared`'s device. Fails on an invalid policy.
    pub fn new(shared: &SharedDevice, policy: ClipPolicy) -> Result<BurnClipper, BurnClipError> {
        policy.validate()?;
        Ok(BurnClipper {
            shared: shared.clone(),
            policy,
            planned: None,
            restore: None,
            moves: 0,
            copies: 0,
        })
    }

    /// The policy this runs.
    pub fn policy(&self) -> &ClipPolicy {
        &self.policy
    }

    /// The device it clips on.
    pub fn shared(&self) -> &SharedDevice {
        &self.shared
    }

    /// How many steps found the gradients in other buffer ranges than the step before
    /// (Burn's pool moved them) and moved the plan onto them
    /// ([`gradclip::GpuClipper::rebind`]): in place when the plan's shape holds and no
    /// step recorded into a caller's encoder may still read the old tables, else planned
    /// anew.
    pub fn moves(&self) -> u64 {
        self.moves
    }

    /// How many gradients were copied before they could be clipped, over all steps.
    ///
    /// Gradients in order, and gradients dense in another order (a convolution's weight
    /// gradient, a transposed matmul's), are clipped in place. A gradient is copied, in
    /// order, into memory of its own when it is not dense (broadcast, gaps, overlaps) or
    /// tiled, when it shares memory with another gradient, or, under AGC or noise, when it
    /// is not in order (AGC's units are slices along an axis; noise is keyed by each
    /// element's index). The copy replaces the gradient in
    /// `GradientsParams`, so the optimizer steps with the clipped copy.
    pub fn copies(&self) -> u64 {
        self.copies
    }

    /// Clips `grads`, the gradients of `module` (`GradientsParams::from_grads`), in place:
    /// every parameter that requires a gradient must have one. Encodes the chain on
    /// Burn's queue after Burn's pending work and submits it; the report is read back
    /// only when asked for ([`PendingReport::wait`], or a [`gradclip::GradMonitor`]).
    ///
    /// Tied parameters (one `ParamId` at several paths) are clipped once, under their
    /// first path. Gradients in any dense order are clipped in place; the few that cannot
    /// be are replaced in `grads` by a copy first ([`BurnClipper::copies`]), so two
    /// gradients that share one buffer range are each clipped once. On error nothing was
    /// written.
    pub fn clip<M: Module>(
        &mut self,
        module: &M,
        grads: &mut GradientsParams,
    ) -> Result<PendingReport<ClipReport>, BurnClipError> {
        let with_params = self.policy.needs_params();
        let (found, ranges) = prepare(
            module,
            grads,
            &self.shared,
            &self.policy,
            true,
            &mut self.copies,
        )?;
        let grad_tensors = views(&ranges.0, &found);
        let param_tensors = with_params.then(|| views(&ranges.1, &found));
        let key: Key = ranges.0.iter().chain(&ranges.1).map(Range::key).collect();
        let params = param_tensors.as_deref();
        match &mut self.planned {
            Some((_, planned)) if *planned == key => {}
            Some((gpu, planned)) => {
                match gpu.rebind(&grad_tensors, params) {
                    Ok(()) => {}
                    // Another set of parameters has gradients now (a layer unfrozen, say):
                    // plan it anew, keeping the state where it still fits.
                    Err(gradclip::ClipError::ShapeMismatch { .. }) => {
                        let state = gpu.state()?;
                        let ctx = self.shared.gpu();
                        let mut fresh =
                            GpuClipper::new(ctx, &grad_tensors, params, self.policy.clone())?;
                        let infos: Vec<TensorInfo> = (found.iter())
                            .map(|f| TensorInfo::new(&f.path, &f.shape))
                            .collect();
                        match state.for_tensors(&self.policy, &infos) {
                            Ok(moved) => fresh.set_state(&moved)?,
                            // A state that follows the tensors (AGC units, per-tensor
                            // groups): fresh, but the step count goes on.
                            Err(_) => {
                                let restarted =
                                    fresh.state()?.with_steps_taken(state.steps_taken());
                                fresh.set_state(&restarted)?;
                            }
                        }
                        *gpu = fresh;
                    }
                    Err(e) => return Err(e.into()),
                }
                *planned = key;
                self.moves += 1;
            }
            None => {
                let mut gpu = GpuClipper::new(
                    self.shared.gpu(),
                    &grad_tensors,
                    params,
                    self.policy.clone(),
                )?;
                if let Some(state) = &self.restore {
                    gpu.set_state(state)?;
                }
                self.restore = None;
                self.planned = Some((gpu, key));
            }
        }
        let (gpu, _) = self.planned.as_mut().expect("planned above");
        let pending = gpu.step()?;
        // The ranges stay pinned until gradclip's pass is submitted.
        drop(grad_tensors);
        drop(ranges);
        Ok(pending)
    }

    /// [`BurnClipper::clip`], then waits for the report: for the wrappers that step the
    /// optimizer only when the clip neither failed nor skipped the step.
    pub(crate) fn clip_waiting<M: Module>(
        &mut self,
        module: &M,
        grads: &mut GradientsParams,
    ) -> Result<ClipReport, BurnClipError> {
        Ok(self.clip(module, grads)?.wait()?)
    }

    /// The policy's state (adaptive history, step count), read back from the device, to
    /// save with [`PolicyState::to_bytes`]; `None` before the first step.
    pub fn state(&self) -> Result<Option<PolicyState>, BurnClipError> {
        match &self.planned {
            Some((gpu, _)) => Ok(Some(gpu.state()?)),
            None => Ok(self.restore.clone()),
        }
    }

    /// Restores a saved state (from either gradclip backend): now, or at the first step.
    pub fn set_state(&mut self, state: PolicyState) -> Result<(), BurnClipError> {
        match &mut self.planned {
            Some((gpu, _)) => gpu.set_state(&state)?,
            None => self.restore = Some(state),
        }
        Ok(())
    }
}

/// The gradients of `module` in `grads` on `shared`'s device (with `every`, one for each
/// parameter that requires one), each made clippable in place: the few that cannot be are
/// replaced in `grads` by a copy in order (`copies` counts them). Returns them with their
/// buffer ranges (gradients, then parameters where the policy reads them), pinned, and
/// Burn's work submitted, so that a pass recorded now runs after it.
pub(crate) fn prepare<M: Module>(
    module: &M,
    grads: &mut GradientsParams,
    shared: &SharedDevice,
    policy: &ClipPolicy,
    every: bool,
    copies: &mut u64,
) -> Result<(Vec<Found>, Ranges), BurnClipError> {
    let device = shared.device();
    // Replaces the gradients `which` of `found` by copies in order and collects anew.
    let mut copy = |grads: &mut GradientsParams, found: &[Found], which: &[usize]| {
        for &i in which {
            (found[i].copy)(grads, found[i].id);
        }
        *copies += which.len() as u64;
        collect(module, grads, device, policy, every)
    };
    let mut found = collect(module, grads, device, policy, every)?;
    let misplaced: Vec<usize> = (0..found.len())
        .filter(|&i| found[i].needs_copy.is_some())
        .collect();
    if !misplaced.is_empty() {
        found = copy(grads, &found, &misplaced)?;
        if let Some(f) = found.iter().find(|f| f.needs_copy.is_some()) {
            return Err(BurnClipError::Layout {
                path: f.path.clone(),
                reason: format!(
                    "{}, still after a copy",
                    f.needs_copy.as_deref().unwrap_or("")
                ),
            });
        }
    }
    let mut ranges = lookup(&found)?;
    let shared_ranges = overlapping(&ranges.0);
    if !shared_ranges.is_empty() {
        drop(ranges);
        found = copy(grads, &found, &shared_ranges)?;
        ranges = lookup(&found)?;
        if let Some(&i) = overlapping(&ranges.0).first() {
            return Err(BurnClipError::Layout {
                path: found[i].path.clone(),
                reason: "its gradient still shares memory with another one after a copy".into(),
            });
        }
    }
    // Burn's backward (and the copies) must be submitted before gradclip's pass.
    device
        .flush()
        .map_err(|e| BurnClipError::Runtime(format!("flushing Burn's work: {e}")))?;
    Ok((found, ranges))
}

/// The buffer ranges of the gradients and, where present, of the parameters.
pub(crate) type Ranges = (Vec<Range>, Vec<Range>);

/// The buffer ranges of the gradients and, where present, of the parameters.
fn lookup(found: &[Found]) -> Result<Ranges, BurnClipError> {
    let grads = found
        .iter()
        .map(|f| Range::of(&f.path, &f.grad))
        .collect::<Result<Vec<_>, _>>()?;
    let params = found
        .iter()
        .filter_map(|f| f.param.as_ref().map(|p| Range::of(&f.path, p)))
        .collect::<Result<Vec<_>, _>>()?;
    Ok((grads, params))
}

/// The ranges as gradclip tensors named and shaped as their parameters.
pub(crate) fn views<'a>(ranges: &'a [Range], found: &[Found]) -> Vec<GpuTensor<'a>> {
    (ranges.iter().zip(found))
        .map(|(r, f)| r.tensor(&f.path, &f.shape))
        .collect()
}

/// Indices of gradients whose bytes overlap an earlier gradient's (the same tensor twice,
/// or views of one tensor such as the pieces of a `cat` backward).
fn overlapping(grads: &[Range]) -> Vec<usize> {
    (0..grads.len())
        .filter(|&i| grads[..i].iter().any(|g| g.overlaps(&grads[i])))
        .collect()
}
