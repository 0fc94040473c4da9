//! burn-train's Learner: clipping inside `TrainStep::optimize`, and metrics for its
//! dashboard and logs.
//!
//! The Learner owns the optimizer and calls `TrainStep::optimize` with the gradients of
//! each step, after its own gradient accumulation; a global norm cannot live inside Burn's
//! per-parameter `Optimizer`. So the model carries a [`LearnerClipper`] (a cheap, shared
//! handle in a `#[module(skip)]` field) and its `optimize` hands over to it. Errors cannot
//! leave `optimize`, which returns the model: they are kept in the handle, logged, and,
//! when asked, stop the training through burn-train's `Interrupter`.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard};

use burn::lr_scheduler::module_lr_scheduler::ModuleLearningRate;
use burn::module::Module;
use burn::optim::{GradientsParams, ModuleOptimizer, MultiGradientsParams};
use burn::tensor::TensorReadError;
use burn::train::Interrupter;
use burn::train::metric::state::{FormatOptions, NumericMetricState};
use burn::train::metric::{
    Metric, MetricAttributes, MetricMetadata, MetricName, Numeric, NumericAttributes, NumericEntry,
    SerializedEntry,
};
use gradclip::{ClipPolicy, ClipReport, PolicyState};

use crate::clipper::BurnClipper;
use crate::device::SharedDevice;
use crate::error::BurnClipError;
use crate::multi::MultiDeviceClipper;

/// How many reports a [`LearnerClipper`] keeps for its metrics (the oldest go first).
const KEPT_REPORTS: usize = 1024;

/// A [`BurnClipper`] for burn-train's `Learner`: a handle the model carries in a
/// `#[module(skip)]` field, whose [`LearnerClipper::optimize`] clips the gradients and
/// steps the optimizer. Clones share one clipper, its state and its reports.
///
/// ```no_run
/// use burn::lr_scheduler::module_lr_scheduler::ModuleLearningRate;
/// use burn::module::Module;
/// use burn::nn::Linear;
/// use burn::optim::{GradientsParams, ModuleOptimizer, MultiGradientsParams};
/// use burn::train::{RegressionOutput, TrainOutput, TrainStep};
/// use gradclip_burn::LearnerClipper;
/// # use burn::tensor::Tensor;
///
/// #[derive(Module, Debug)]
/// struct Model {
///     linear: Linear,
///     #[module(skip)]
///     clip: LearnerClipper,
/// }
///
/// impl TrainStep for Model {
///     type Input = (Tensor<2>, Tensor<2>);
///     type Output = RegressionOutput;
///
///     fn step(&self, (x, y): Self::Input) -> TrainOutput<RegressionOutput> {
///         let out = self.linear.forward(x);
///         let loss = (out.clone() - y.clone()).powi_scalar(2).mean();
///         TrainOutput::new(self, loss.backward(), RegressionOutput::new(loss, out, y))
///     }
///
///     fn optimize(
///         self,
///         optim: &mut ModuleOptimizer,
///         lr: ModuleLearningRate,
///         grads: GradientsParams,
///     ) -> Self {
///         self.clip.clone().optimize(self, optim, lr, grads)
///     }
/// }
/// ```
///
/// A clip that fails (a typed [`BurnClipError`]) or skips the step
/// ([`gradclip::NonFinitePolicy::SkipStep`]) leaves the model and the optimizer state as
/// they were; a failure is logged, kept ([`LearnerClipper::take_error`]), counted, and
/// stops the training when [`LearnerClipper::stop_on_error`] gave it the Learner's
/// `Interrupter`. Each step waits for its report (a few bytes), which decides whether the
/// optimizer steps.
#[derive(Clone)]
pub struct LearnerClipper {
    clipper: Arc<Mutex<BurnClipper>>,
    /// For `optimize_multi`, where the Learner trains on several devices.
    multi: Option<Arc<Mutex<MultiDeviceClipper>>>,
    log: Arc<Mutex<ClipLog>>,
    interrupter: Option<Interrupter>,
}

impl std::fmt::Debug for LearnerClipper {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let log = lock(&self.log);
        f.debug_struct("LearnerClipper")
            .field("steps", &log.pushed)
            .field("skipped_steps", &log.skipped)
            .field("failed_steps", &log.failed)
            .finish()
    }
}

/// What the steps reported, for the handle's owner and its metrics.
#[derive(Default)]
struct ClipLog {
    /// The latest reports, oldest first, each with the steps skipped up to it; `pushed`
    /// counts every report ever pushed.
    reports: VecDeque<(ClipReport, u64)>,
    pushed: u64,
    skipped: u64,
    failed: u64,
    error: Option<BurnClipError>,
}

impl ClipLog {
    fn push(&mut self, report: ClipReport) {
        self.skipped += report.skipped as u64;
        if self.reports.len() == KEPT_REPORTS {
            self.reports.pop_front();
        }
        self.reports.push_back((report, self.skipped));
        self.pushed += 1;
    }

    /// The report numbered `n` (counting every push from 0), or the oldest one kept after
    /// it, with its number; `None` when no report from `n` on exists yet.
    fn from(&self, n: u64) -> Option<(u64, &(ClipReport, u64))> {
        let first = self.pushed - self.reports.len() as u64;
        let n = n.max(first);
        self.reports.get((n - first) as usize).map(|r| (n, r))
    }
}

/// Locks, taking over a lock a panicking thread left: the log and the clipper are left
/// consistent between statements, and a panic elsewhere must not become one here.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl LearnerClipper {
    /// A handle clipping with `policy` on `shared`'s device (the Learner's device is
    /// `shared.autodiff()`). Fails on an invalid policy.
    pub fn new(shared: &SharedDevice, policy: ClipPolicy) -> Result<Self, BurnClipError> {
        Ok(LearnerClipper {
            clipper: Arc::new(Mutex::new(BurnClipper::new(shared, policy)?)),
            multi: None,
            log: Arc::default(),
            interrupter: None,
        })
    }

    /// A handle for multi-device training (burn-train's `ExecutionStrategy::MultiDevice`
    /// over `devices`' autodiff devices, in the same order): `optimize_multi` clips the
    /// gradients of all devices by one chain over their sum ([`MultiDeviceClipper`]), and
    /// `optimize` (the Learner optimizing on its main device) clips on `devices[0]`.
    pub fn multi_device(
        devices: &[SharedDevice],
        policy: ClipPolicy,
    ) -> Result<Self, BurnClipError> {
        let multi = MultiDeviceClipper::new(devices, policy.clone())?;
        Ok(LearnerClipper {
            multi: Some(Arc::new(Mutex::new(multi))),
            ..Self::new(&devices[0], policy)?
        })
    }

    /// Stops the training (`interrupter.stop`, with the error's message as the reason)
    /// when a clip fails; give it the `Interrupter` the training runs with
    /// (`SupervisedTraining::with_interrupter`, or its `interrupter()`). Without it the
    /// training goes on, and the failed steps leave the model as it was.
    pub fn stop_on_error(mut self, interrupter: Interrupter) -> Self {
        self.interrupter = Some(interrupter);
        self
    }

    /// Clips `grads`, the gradients of `module`, then steps `module` with `optim` at `lr`:
    /// call it from `TrainStep::optimize`. Returns `module` unchanged when the clip failed
    /// or skipped the step. A Burn optimizer that clips on its own (`grad_clipping` set)
    /// fails every step with [`BurnClipError::ClipsTwice`].
    pub fn optimize<M: Module>(
        &self,
        module: M,
        optim: &mut ModuleOptimizer,
        lr: ModuleLearningRate,
        mut grads: GradientsParams,
    ) -> M {
        let clipped = match optim.has_gradient_clipping() {
            true => Err(BurnClipError::ClipsTwice),
            false => lock(&self.clipper).clip_waiting(&module, &mut grads),
        };
        match self.logged(clipped) {
            Some(false) => optim.step(lr, module, grads),
            _ => module,
        }
    }

    /// [`LearnerClipper::optimize`] for the gradients of several devices (call it from
    /// `TrainStep::optimize_multi`): one clip of their sum, on the devices that hold them,
    /// then the optimizer's `step_multi`. A handle made by [`LearnerClipper::new`] fails
    /// every such step; make it with [`LearnerClipper::multi_device`].
    pub fn optimize_multi<M: Module>(
        &self,
        module: M,
        optim: &mut ModuleOptimizer,
        lr: ModuleLearningRate,
        mut grads: MultiGradientsParams,
    ) -> M {
        let clipped = match (&self.multi, optim.has_gradient_clipping()) {
            (_, true) => Err(BurnClipError::ClipsTwice),
            (None, false) => Err(BurnClipError::Clip(gradclip::ClipError::InvalidConfig(
                "gradients of several devices, but this LearnerClipper was made for one \
                 (LearnerClipper::new); make it with LearnerClipper::multi_device"
                    .into(),
            ))),
            (Some(multi), false) => lock(multi).clip(&module, &mut grads),
        };
        match self.logged(clipped) {
            Some(false) => optim.step_multi(lr, module, grads),
            _ => module,
        }
    }

    /// Logs a step's outcome: whether it skipped the step, or `None` when it failed.
    fn logged(&self, clipped: Result<ClipReport, BurnClipError>) -> Option<bool> {
        match clipped {
            Ok(report) => {
                let skipped = report.skipped;
                lock(&self.log).push(report);
                Some(skipped)
            }
            Err(error) => {
                self.fail(error);
                None
            }
        }
    }

    fn fail(&self, error: BurnClipError) {
        let message = format!("gradient clipping failed, the step was not taken: {error}");
        log::error!("{message}");
        if let Some(interrupter) = &self.interrupter {
            interrupter.stop(Some(&message));
        }
        let mut log = lock(&self.log);
        log.failed += 1;
        log.error = Some(error);
    }

    /// The latest step's report, if a step was clipped.
    pub fn last_report(&self) -> Option<ClipReport> {
        lock(&self.log).reports.back().map(|(r, _)| r.clone())
    }

    /// Steps clipped so far (skipped ones included, failed ones not).
    pub fn steps(&self) -> u64 {
        lock(&self.log).pushed
    }

    /// Steps the chain skipped ([`gradclip::NonFinitePolicy::SkipStep`]).
    pub fn skipped_steps(&self) -> u64 {
        lock(&self.log).skipped
    }

    /// Steps whose clip failed, leaving the model as it was.
    pub fn failed_steps(&self) -> u64 {
        lock(&self.log).failed
    }

    /// The latest failure, taken out (the next call gives `None` until another step fails).
    pub fn take_error(&self) -> Option<BurnClipError> {
        lock(&self.log).error.take()
    }

    /// The chain's state (adaptive history, step count), read back from the device, to
    /// save beside the Learner's checkpoints; `None` before the first step. A handle made
    /// by [`LearnerClipper::multi_device`] gives the state of the clip that ran:
    /// `optimize_multi`'s once it has run, else `optimize`'s.
    pub fn state(&self) -> Result<Option<PolicyState>, BurnClipError> {
        if let Some(multi) = &self.multi
            && let Some(state) = lock(multi).state()?
        {
            return Ok(Some(state));
        }
        lock(&self.clipper).state()
    }

    /// Restores a saved state (into both clips of a multi-device handle): now, or at the
    /// first step.
    pub fn set_state(&self, state: PolicyState) -> Result<(), BurnClipError> {
        if let Some(multi) = &self.multi {
            lock(multi).set_state(state.clone())?;
        }
        lock(&self.clipper).set_state(state)
    }

    /// A burn-train metric of `quantity`, to register with
    /// `SupervisedTraining::metric_train_numeric`.
    pub fn metric(&self, quantity: ClipQuantity) -> ClipMetric {
        ClipMetric {
            log: self.log.clone(),
            quantity,
            name: Arc::new(quantity.name().to_string()),
            state: NumericMetricState::new(),
            next: 0,
        }
    }
}

/// What a [`ClipMetric`] shows, per clipped step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClipQuantity {
    /// The total gradient norm before clipping ([`ClipReport::total_norm`]).
    NormBefore,
    /// The total norm after clipping ([`ClipReport::total_norm_after`]; global rules, or a
    /// policy with group reports).
    NormAfter,
    /// The coefficient of the chain's last global stage ([`ClipReport::coef`]).
    Coefficient,
    /// Units (tensors, AGC units) clipped this step ([`ClipReport::clipped_units`]).
    ClippedUnits,
    /// Steps skipped so far ([`gradclip::NonFinitePolicy::SkipStep`]).
    SkippedSteps,
}

impl ClipQuantity {
    /// The metric's name in the dashboard and the logs.
    pub fn name(self) -> &'static str {
        match self {
            ClipQuantity::NormBefore => "Gradient norm",
            ClipQuantity::NormAfter => "Gradient norm after clipping",
            ClipQuantity::Coefficient => "Clip coefficient",
            ClipQuantity::ClippedUnits => "Clipped units",
            ClipQuantity::SkippedSteps => "Skipped steps",
        }
    }

    /// Its value in a step's report; `None` where the report has none, or a norm that is
    /// not finite (a skipped step's: [`ClipQuantity::SkippedSteps`] counts those).
    fn of(self, report: &ClipReport, skipped_so_far: u64) -> Option<f64> {
        let finite = |v: f64| v.is_finite().then_some(v);
        match self {
            ClipQuantity::NormBefore => finite(report.total_norm),
            ClipQuantity::NormAfter => report.total_norm_after.and_then(finite),
            ClipQuantity::Coefficient => report.coef.map(f64::from).and_then(finite),
            ClipQuantity::ClippedUnits => Some(report.clipped_units as f64),
            ClipQuantity::SkippedSteps => Some(skipped_so_far as f64),
        }
    }
}

/// One [`ClipQuantity`] of the clipped steps as a burn-train numeric metric: made by
/// [`LearnerClipper::metric`], registered with `metric_train_numeric`, shown in the
/// dashboard and written to the metric logs like the loss.
///
/// Each training item takes the oldest step report it has not shown yet, so every step
/// is shown once, in order; an item whose optimizer call brought no new step (under
/// gradient accumulation over `n` items, or the items of several devices) repeats the
/// latest value.
#[derive(Clone)]
pub struct ClipMetric {
    log: Arc<Mutex<ClipLog>>,
    quantity: ClipQuantity,
    name: MetricName,
    state: NumericMetricState,
    /// The number of the next report to show.
    next: u64,
}

impl Metric for ClipMetric {
    type Input = ();

    fn name(&self) -> MetricName {
        self.name.clone()
    }

    fn attributes(&self) -> MetricAttributes {
        NumericAttributes {
            unit: None,
            higher_is_better: false,
        }
        .into()
    }

    fn update(
        &mut self,
        _item: &(),
        _metadata: &MetricMetadata,
    ) -> Result<SerializedEntry, TensorReadError> {
        let log = lock(&self.log);
        if let Some((n, (report, skipped))) = log.from(self.next) {
            if let Some(value) = self.quantity.of(report, *skipped) {
                self.state.update(value, 1);
            }
            self.next = n + 1;
        }
        drop(log);
        Ok(self.state.compute_update(self.format()))
    }

    fn compute(&mut self) -> Result<SerializedEntry, TensorReadError> {
        Ok(self.state.compute_final(self.format()))
    }

    fn clear(&mut self) {
        self.state.reset()
    }
}

impl ClipMetric {
    fn format(&self) -> FormatOptions {
        FormatOptions::new(self.name.clone()).precision(4)
    }
}

impl Numeric for ClipMetric {
    fn value(&self) -> Option<NumericEntry> {
        Some(self.state.current_value())
    }

    fn running_value(&self) -> Option<NumericEntry> {
        Some(self.state.running_value())
    }

    fn final_value(&self) -> NumericEntry {
        self.state.final_value()
    }
}
