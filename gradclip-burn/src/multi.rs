//! Several devices of one process (burn-train's multi-device training): one clip of the
//! summed gradients across the devices, each device clipping the gradients it holds.
//!
//! Burn's optimizer sums each parameter's gradients from every device onto one of them
//! before it steps the parameter there. Doing that sum first leaves every gradient on
//! exactly one device: a whole-tensor shard. Each device is then a rank of
//! gradclip's sharded runner, the ranks are threads, and a [`ThreadCollective`] merges
//! their unit norms, so the clip is the one a single device would make of all the summed
//! gradients, with no gradient moved for it.

use burn::module::{Module, ModuleVisitor, Param, ParamId};
use burn::optim::{GradientsParams, MultiGradientsParams};
use burn::tensor::Tensor;
use gradclip::{
    ClipError, ClipPolicy, ClipReport, GpuClipper, GpuTensor, PolicyState, Shard, Sharded,
    TensorInfo, ThreadCollective,
};

use crate::clipper::{prepare, views};
use crate::device::SharedDevice;
use crate::error::BurnClipError;
use crate::gradients::{Found, Range};

/// One device's runner, a rank of the sharded clip.
type Rank = GpuClipper<Sharded<ThreadCollective>>;

/// What a plan was made for: the logical tensors (path, shape) and, per device, the
/// tensors it holds.
type Layout = (Vec<TensorInfo>, Vec<Vec<bool>>);

/// What the next plan starts from.
#[derive(Debug, Clone)]
enum Resume {
    /// This state: a saved one, or the last plan's moved to the new tensors.
    State(PolicyState),
    /// A fresh state at this step count: the last plan's state depended on tensors that
    /// are gone (AGC units, per-tensor groups).
    Steps(u64),
}

/// Clips the gradients of several Burn wgpu devices of one process
/// (`MultiGradientsParams`, as burn-train's multi-device training hands them over) by one
/// chain over their sum, each device in place on its own queue: the clip a single device
/// would make of the summed gradients.
///
/// [`MultiDeviceClipper::clip`] first sums each parameter's gradients onto one device,
/// as Burn's optimizer would, which then finds each gradient summed already; every device
/// then clips the gradients it holds, and the devices agree on the norms through a
/// [`ThreadCollective`] (one thread per device, one host round trip). Every chain works
/// but AGC (refused: Burn's sharded optimization keeps a parameter and its summed
/// gradient on different devices).
pub struct MultiDeviceClipper {
    devices: Vec<SharedDevice>,
    policy: ClipPolicy,
    planned: Option<(Vec<Rank>, Layout)>,
    /// A 4-byte buffer per device, the place of the tensors another device holds.
    empty: Vec<wgpu::Buffer>,
    restore: Option<Resume>,
    copies: u64,
}

impl std::fmt::Debug for MultiDeviceClipper {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MultiDeviceClipper")
            .field("devices", &self.devices)
            .field("policy", &self.policy)
            .field("copies", &self.copies)
            .finish()
    }
}

impl MultiDeviceClipper {
    /// A clipper running `policy` over `devices` (at least one, each a distinct Burn wgpu
    /// device). Fails on an invalid policy, an empty list, a device listed twice, or AGC:
    /// Burn's sharded optimization leaves a parameter on another device than its summed
    /// gradient, and AGC reads both.
    pub fn new(devices: &[SharedDevice], policy: ClipPolicy) -> Result<Self, BurnClipError> {
        policy.validate()?;
        let refuse = |why: &str| Err(ClipError::InvalidConfig(why.into()).into());
        if devices.is_empty() {
            return refuse("a multi-device clipper needs at least one device");
        }
        let twice = |i: usize| {
            devices[..i]
                .iter()
                .any(|d| d.device() == devices[i].device())
        };
        if (0..devices.len()).any(twice) {
            return refuse("a device is listed twice; list each device once");
        }
        if policy.needs_params() {
            return refuse(
                "AGC reads each parameter beside its gradient, and Burn's sharded optimization \
                 keeps them on different devices; clip AGC on one device (BurnClipper)",
            );
        }
        let empty = (devices.iter())
            .map(|d| {
                d.setup().device.create_buffer(&wgpu::BufferDescriptor {
                    label: Some("gradclip-burn: no local tensor"),
                    size: 4,
                    usage: wgpu::BufferUsages::STORAGE,
                    mapped_at_creation: false,
                })
            })
            .collect();
        Ok(MultiDeviceClipper {
            devices: devices.to_vec(),
            policy,
            planned: None,
            empty,
            restore: None,
            copies: 0,
        })
    }

    /// The policy this runs.
    pub fn policy(&self) -> &ClipPolicy {
        &self.policy
    }

    /// The devices it clips on, in rank order.
    pub fn devices(&self) -> &[SharedDevice] {
        &self.devices
    }

    /// How many gradients were copied in order before they could be clipped, over all
    /// steps and devices (see [`crate::BurnClipper::copies`]).
    pub fn copies(&self) -> u64 {
        self.copies
    }

    /// Sums each parameter's gradients in `grads` onto one device, then clips them all by
    /// the policy, in place. Every parameter of `module` that requires a gradient must
    /// have one on some device, and every device of `grads` must be one of the clipper's.
    /// Waits for the report (the devices must agree first). An error before the devices
    /// exchange their norms (a gradient missing, a foreign device, a layout) scales no
    /// gradient (they may have been summed); one after it (a device lost mid-step) may
    /// leave the other devices' gradients scaled.
    pub fn clip<M: Module>(
        &mut self,
        module: &M,
        grads: &mut MultiGradientsParams,
    ) -> Result<ClipReport, BurnClipError> {
        let slots = self.slots(grads)?;
        sum_onto_owners(module, grads);
        // Every parameter that requires a gradient has one somewhere, now on one device.
        let infos = logical(module, grads)?;
        let mut prepared = Vec::with_capacity(self.devices.len());
        for (rank, shared) in self.devices.iter().enumerate() {
            let local = &mut grads.grads[slots[rank]].0;
            prepared.push(prepare(
                module,
                local,
                shared,
                &self.policy,
                false,
                &mut self.copies,
            )?);
        }
        // Where each logical tensor is among each device's gradients, if it holds it.
        let held: Vec<Vec<Option<usize>>> = (prepared.iter())
            .map(|(found, _)| held_at(found, &infos))
            .collect();
        let layout: Layout = (
            infos.clone(),
            (held.iter())
                .map(|at| at.iter().map(Option::is_some).collect())
                .collect(),
        );
        let with_params = self.policy.needs_params();
        // Each rank's tensors in logical order: its ranges, or an empty one elsewhere.
        let mut locals: Vec<(Vec<GpuTensor<'_>>, Option<Vec<GpuTensor<'_>>>)> = Vec::new();
        for (rank, ((found, ranges), at)) in prepared.iter().zip(&held).enumerate() {
            let empty = &self.empty[rank];
            locals.push((
                place(&ranges.0, found, at, &infos, empty),
                with_params.then(|| place(&ranges.1, found, at, &infos, empty)),
            ));
        }
        let replan = !matches!(&self.planned, Some((_, planned)) if *planned == layout);
        let state = match (&self.planned, replan) {
            // Other tensors have gradients now (a layer frozen or unfrozen): the state
            // moves where it does not depend on them; the step count goes on in any case.
            (Some((ranks, _)), true) => {
                let state = ranks[0].state()?;
                Some(match state.for_tensors(&self.policy, &infos) {
                    Ok(moved) => Resume::State(moved),
                    Err(_) => Resume::Steps(state.steps_taken()),
                })
            }
            _ => self.restore.clone(),
        };
        if replan {
            self.planned = None;
            match self.plan(&locals, &layout, state.as_ref()) {
                Ok(ranks) => {
                    self.restore = None;
                    self.planned = Some((ranks, layout));
                }
                // Planned at the next step, with the state it had.
                Err(e) => {
                    self.restore = state;
                    return Err(e);
                }
            }
        }
        let (ranks, _) = self.planned.as_mut().expect("planned above");
        // Every rank moves before any steps, so that no rank waits for one that failed.
        for (rank, (grads, params)) in ranks.iter_mut().zip(&locals) {
            rank.rebind(grads, params.as_deref())?;
        }
        let reports = std::thread::scope(|s| {
            let running: Vec<_> = (ranks.iter_mut())
                .map(|rank| s.spawn(move || rank.step()))
                .collect();
            running.into_iter().map(joined).collect::<Vec<_>>()
        });
        // The ranges stay pinned until every device's pass is submitted.
        drop(locals);
        drop(prepared);
        let mut first = None;
        for report in reports {
            match report {
                Ok(report) => {
                    first.get_or_insert(report);
                }
                Err(e) => {
                    // A group a rank left (a timeout, a panic) is broken for good: plan
                    // anew, with a new group and the state, at the next step.
                    if matches!(
                        e,
                        BurnClipError::Clip(ClipError::Collective(_)) | BurnClipError::Runtime(_)
                    ) {
                        // The state of a rank that still answers (the failed one may not).
                        let state = ranks.iter().find_map(|r| r.state().ok());
                        if let Some(state) = state {
                            self.planned = None;
                            self.restore = Some(Resume::State(state));
                        }
                    }
                    return Err(e);
                }
            }
        }
        Ok(first.expect("at least one device"))
    }

    /// For each device, its entry in `grads` (an empty one is added for a device with
    /// none: it still takes part). Every entry must be a device of the clipper.
    fn slots(&self, grads: &mut MultiGradientsParams) -> Result<Vec<usize>, BurnClipError> {
        if let Some((_, device)) = (grads.grads.iter()).find(|(_, d)| {
            !self
                .devices
                .iter()
                .any(|s| *s.device() == d.clone().inner())
        }) {
            return Err(BurnClipError::ForeignDevice {
                path: "MultiGradientsParams".into(),
                found: format!("{device:?}"),
                expected: format!("one of {:?}", self.devices),
            });
        }
        let mut slots = Vec::with_capacity(self.devices.len());
        for shared in &self.devices {
            let at = |grads: &MultiGradientsParams| {
                (grads.grads.iter()).position(|(_, d)| d.clone().inner() == *shared.device())
            };
            if at(grads).is_none() {
                grads
                    .grads
                    .push((GradientsParams::new(), shared.device().clone()));
            }
            slots.push(at(grads).expect("pushed above"));
        }
        Ok(slots)
    }

    /// Plans a rank per device, on one thread each (the ranks check with each other that
    /// they planned the same chain over the same tensors).
    fn plan(
        &self,
        locals: &[(Vec<GpuTensor<'_>>, Option<Vec<GpuTensor<'_>>>)],
        layout: &Layout,
        state: Option<&Resume>,
    ) -> Result<Vec<Rank>, BurnClipError> {
        let (infos, held) = layout;
        let comms = ThreadCollective::group(self.devices.len());
        let built = std::thread::scope(|s| {
            let running: Vec<_> = (comms.into_iter().enumerate())
                .map(|(rank, comm)| {
                    let (grads, params) = &locals[rank];
                    let shared = &self.devices[rank];
                    let shard = Shard::whole_tensors(infos, |t, _| held[rank][t]);
                    let policy = self.policy.clone();
                    s.spawn(move || {
                        let mut gpu = GpuClipper::sharded(
                            shared.gpu(),
                            grads,
                            params.as_deref(),
                            policy,
                            infos,
                            shard,
                            comm,
                        )?;
                        match state {
                            Some(Resume::State(state)) => gpu.set_state(state)?,
                            Some(Resume::Steps(steps)) => {
                                let fresh = gpu.state()?.with_steps_taken(*steps);
                                gpu.set_state(&fresh)?;
                            }
                            None => {}
                        }
                        Ok::<_, ClipError>(gpu)
                    })
                })
                .collect();
            running.into_iter().map(joined).collect::<Vec<_>>()
        });
        built.into_iter().collect()
    }

    /// The chain's state, the same on every device; `None` before the first step (or a
    /// restored state, if one was set).
    pub fn state(&self) -> Result<Option<PolicyState>, BurnClipError> {
        match (&self.planned, &self.restore) {
            (Some((ranks, _)), _) => Ok(Some(ranks[0].state()?)),
            (None, Some(Resume::State(state))) => Ok(Some(state.clone())),
            (None, _) => Ok(None),
        }
    }

    /// Restores a saved state on every device: now, or at the first step.
    pub fn set_state(&mut self, state: PolicyState) -> Result<(), BurnClipError> {
        match &mut self.planned {
            Some((ranks, _)) => {
                for rank in ranks {
                    rank.set_state(&state)?;
                }
            }
            None => self.restore = Some(Resume::State(state)),
        }
        Ok(())
    }
}

/// For each logical tensor, its index among one device's gradients `found`, or `None`
/// where another device holds it. Both lists follow the module's visiting order, so one
/// walk pairs them.
fn held_at(found: &[Found], infos: &[TensorInfo]) -> Vec<Option<usize>> {
    let mut next = 0;
    (infos.iter())
        .map(|i| {
            let here = found.get(next).is_some_and(|f| f.path == i.name);
            next += here as usize;
            here.then(|| next - 1)
        })
        .collect()
}

/// One device's tensors in logical order: its own ranges (`at` from [`held_at`]), or an
/// empty range of `empty` for a tensor another device holds.
fn place<'a>(
    ranges: &'a [Range],
    found: &[Found],
    at: &[Option<usize>],
    infos: &[TensorInfo],
    empty: &'a wgpu::Buffer,
) -> Vec<GpuTensor<'a>> {
    let own = views(ranges, found);
    (infos.iter().zip(at))
        .map(|(i, at)| match at {
            Some(k) => own[*k].clone(),
            // Named and shaped as the logical tensor, as the sharded runner plans them.
            None => GpuTensor::new(empty, 0, 0, gradclip::DType::F32)
                .named(&i.name)
                .shaped(&i.shape),
        })
        .collect()
}

/// A device thread's result; its panic is an error, not a panic of the caller.
fn joined<T>(
    handle: std::thread::ScopedJoinHandle<'_, Result<T, ClipError>>,
) -> Result<T, BurnClipError> {
    match handle.join() {
        Ok(result) => Ok(result?),
        Err(_) => Err(BurnClipError::Runtime(
            "a device's clipping thread panicked".into(),
        )),
    }
}

/// Sums each parameter's gradients over the devices onto one of them
/// (`MultiGradientsParams::remove`, as Burn's optimizer would), leaving the sum in that
/// device's entry alone, where the optimizer finds it. Gradients of parameters outside
/// `module` stay as they are.
fn sum_onto_owners<M: Module>(module: &M, grads: &mut MultiGradientsParams) {
    struct Sum<'a>(&'a mut MultiGradientsParams);
    impl ModuleVisitor for Sum<'_> {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            if let Some((grad, device)) = self.0.remove::<D>(param.id) {
                let device = device.inner();
                // `remove` sums onto the device of one of the entries.
                let slot = (self.0.grads.iter())
                    .position(|(_, d)| d.clone().inner() == device)
                    .unwrap_or(0);
                self.0.grads[slot].0.register::<D>(param.id, grad);
            }
        }
    }
    module.visit(&mut Sum(grads));
}

/// The logical tensors: every parameter of `module` with a gradient on some device, by
/// path and shape, in visiting order (tied ones once). A parameter that requires a
/// gradient and has none is an error.
fn logical<M: Module>(
    module: &M,
    grads: &MultiGradientsParams,
) -> Result<Vec<TensorInfo>, BurnClipError> {
    struct Logical<'a> {
        grads: &'a MultiGradientsParams,
        path: Vec<String>,
        seen: Vec<ParamId>,
        infos: Vec<TensorInfo>,
        missing: Option<String>,
    }
    impl ModuleVisitor for Logical<'_> {
        fn enter_module(&mut self, name: &str, _container: &str) {
            self.path.push(name.to_string());
        }
        fn exit_module(&mut self, _name: &str, _container: &str) {
            self.path.pop();
        }
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            if self.seen.contains(&param.id) {
                return;
            }
            self.seen.push(param.id);
            let path = self.path.join(".");
            let grad = (self.grads.grads.iter()).find_map(|(g, _)| g.get::<D>(param.id));
            match grad {
                Some(grad) => {
                    let shape: Vec<u64> = grad.shape().iter().map(|&d| d as u64).collect();
                    self.infos.push(TensorInfo::new(&path, &shape));
                }
                None if param.val().is_require_grad() => {
                    self.missing.get_or_insert(path);
                }
                None => {}
            }
        }
    }
    let mut visitor = Logical {
        grads,
        path: Vec::new(),
        seen: Vec::new(),
        infos: Vec::new(),
        missing: None,
    };
    module.visit(&mut visitor);
    match visitor.missing {
        Some(path) => Err(BurnClipError::MissingGradient { path }),
        None => Ok(visitor.infos),
    }
}
