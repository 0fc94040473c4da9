//! gradclip on Burn's gradients, on Burn's own wgpu device (lavapipe in CI): every clip is
//! checked against gradclip's CPU oracle run on the gradients read back to the host, and
//! training with the clip on the device against training with the clip on the host.

use std::sync::{Arc, Mutex, MutexGuard, OnceLock};

use burn::data::dataloader::batcher::Batcher;
use burn::data::dataloader::{DataLoader, DataLoaderBuilder};
use burn::data::dataset::InMemDataset;
use burn::lr_scheduler::module_lr_scheduler::ModuleLearningRate;
use burn::train::metric::LossMetric;
use burn::train::{
    ExecutionStrategy, InferenceStep, Interrupter, Learner, LearningResult, MultiDeviceOptim,
    RegressionOutput, SupervisedTraining, TrainOutput, TrainStep,
};

use burn::module::{Module, ModuleVisitor, Param, ParamId};
use burn::nn::conv::{
    Conv1d, Conv1dConfig, Conv2d, Conv2dConfig, ConvTranspose2d, ConvTranspose2dConfig,
};
use burn::nn::transformer::{
    TransformerEncoder, TransformerEncoderConfig, TransformerEncoderInput,
};
use burn::nn::{
    BatchNorm, BatchNormConfig, Embedding, EmbeddingConfig, Gru, GruConfig, LayerNorm,
    LayerNormConfig, Linear, LinearConfig, Lstm, LstmConfig,
};
use burn::optim::{GradientsParams, ModuleOptimizer, MultiGradientsParams, SgdConfig};
use burn::tensor::{Device, Int, Tensor, TensorData};
use gradclip::{
    Agc, ClipPolicy, ClipReport, CpuClipper, GaussianNoise, GradMut, GradRef, GroupClip, LossScale,
    PerTensorClip, Rule, TensorInfo, UnitAxis,
};
use gradclip_burn::{
    BurnClipError, BurnClipper, ClipQuantity, ClippedOptimizer, LearnerClipper, MultiDeviceClipper,
    SharedDevice,
};

/// The shared device, held for the test (tests take turns on a GL device: wgpu's GL
/// backend panics when two threads use its context at once); `None` (the test is skipped,
/// saying so) only outside CI when Burn's wgpu runtime cannot start. In CI it must start.
fn shared() -> Option<Held> {
    static SHARED: OnceLock<Result<SharedDevice, String>> = OnceLock::new();
    static TURN: Mutex<()> = Mutex::new(());
    match SHARED.get_or_init(|| SharedDevice::init().map_err(|e| e.to_string())) {
        Ok(shared) => {
            let gl = shared.setup().backend == wgpu::Backend::Gl;
            let turn = gl.then(|| TURN.lock().unwrap_or_else(|e| e.into_inner()));
            Some(Held(shared.clone(), turn))
        }
        Err(e) if std::env::var_os("CI").is_some() => {
            panic!(
                "Burn's wgpu runtime must start in CI (apt-get install mesa-vulkan-drivers): {e}"
            )
        }
        Err(e) => {
            eprintln!("skipped: Burn's wgpu runtime did not start on this machine: {e}");
            None
        }
    }
}

/// A test's hold on the shared device (see [`shared`]); on GL its turn, released on drop.
struct Held(
    SharedDevice,
    #[allow(dead_code)] Option<MutexGuard<'static, ()>>,
);

impl std::ops::Deref for Held {
    type Target = SharedDevice;
    fn deref(&self) -> &SharedDevice {
        &self.0
    }
}

#[derive(Module, Debug)]
struct Mlp {
    fc1: Linear,
    fc2: Linear,
}

impl Mlp {
    fn new(device: &Device) -> Mlp {
        Mlp {
            fc1: LinearConfig::new(5, 7).init(device),
            fc2: LinearConfig::new(7, 3).init(device),
        }
    }

    fn loss(&self, x: Tensor<2>, y: Tensor<2>) -> Tensor<1> {
        let h = burn::tensor::activation::relu(self.fc1.forward(x));
        (self.fc2.forward(h) - y).powi_scalar(2).mean()
    }
}

/// A vanilla RNN whose recurrent weights are large enough for its gradients to explode.
#[derive(Module, Debug)]
struct Rnn {
    w_xh: Param<Tensor<2>>,
    w_hh: Param<Tensor<2>>,
    b_h: Param<Tensor<1>>,
    out: Linear,
}

impl Rnn {
    /// Weights from a fixed stream, not Burn's generator: tests run in parallel and would
    /// draw from it in between. `w_hh` uniform(-2, 2) x 0.6 makes the gradients explode.
    fn new(device: &Device) -> Rnn {
        let param = |shape: [usize; 2], seed, scale| {
            Param::from_tensor(data(shape, seed, device).mul_scalar(scale))
        };
        Rnn {
            w_xh: param([3, 6], 31, 0.4),
            w_hh: param([6, 6], 32, 0.6),
            b_h: Param::from_tensor(Tensor::zeros([6], device)),
            out: Linear {
                weight: param([6, 1], 33, 0.3),
                bias: Some(Param::from_tensor(Tensor::zeros([1], device))),
            },
        }
    }

    /// `xs` is `[time, batch, 3]`; the loss is the MSE of the last output against `y`.
    fn loss(&self, xs: Tensor<3>, y: Tensor<2>) -> Tensor<1> {
        let [time, batch, _] = xs.dims();
        let mut h = Tensor::<2>::zeros([batch, 6], &xs.device());
        for t in 0..time {
            let x = xs.clone().narrow(0, t, 1).reshape([batch, 3]);
            h = (x.matmul(self.w_xh.val())
                + h.matmul(self.w_hh.val())
                + self.b_h.val().unsqueeze())
            .tanh();
        }
        (self.out.forward(h) - y).powi_scalar(2).mean()
    }
}

/// Deterministic inputs in [-2, 2).
fn data<const D: usize>(shape: [usize; D], seed: u64, device: &Device) -> Tensor<D> {
    let n = shape.iter().product();
    let mut s = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    let values: Vec<f32> = (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 4.0 - 2.0
        })
        .collect();
    Tensor::from_data(TensorData::new(values, shape), device)
}

/// One host tensor: module path, shape, values.
#[derive(Debug, Clone)]
struct HostTensor {
    path: String,
    shape: Vec<u64>,
    values: Vec<f32>,
}

/// Reads the gradients (or, with `grads` = None, the parameter values) back, in the
/// module's visiting order, one entry per parameter id.
struct Reader<'a> {
    grads: Option<&'a GradientsParams>,
    /// Read the values of the parameters (those with a gradient, when `grads` is given).
    values: bool,
    path: Vec<String>,
    seen: Vec<ParamId>,
    out: Vec<HostTensor>,
}

impl ModuleVisitor for Reader<'_> {
    fn enter_module(&mut self, name: &str, _: &str) {
        self.path.push(name.into());
    }
    fn exit_module(&mut self, _: &str, _: &str) {
        self.path.pop();
    }
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        if self.seen.contains(&param.id) {
            return;
        }
        let tensor = match (self.grads, self.values) {
            (Some(g), false) => g.get::<D>(param.id),
            (Some(g), true) => g.get::<D>(param.id).map(|_| param.val().inner()),
            (None, _) => Some(param.val().inner()),
        };
        if let Some(t) = tensor {
            self.seen.push(param.id);
            self.out.push(HostTensor {
                path: self.path.join("."),
                shape: t.shape().iter().map(|&d| d as u64).collect(),
                values: t.into_data().convert::<f32>().try_to_vec::<f32>().unwrap(),
            });
        }
    }
}

fn read<M: Module>(model: &M, grads: Option<&GradientsParams>) -> Vec<HostTensor> {
    read_as(model, grads, grads.is_none())
}

/// The values of the parameters that have a gradient in `grads` (what AGC reads).
fn read_values<M: Module>(model: &M, grads: &GradientsParams) -> Vec<HostTensor> {
    read_as(model, Some(grads), true)
}

fn read_as<M: Module>(model: &M, grads: Option<&GradientsParams>, values: bool) -> Vec<HostTensor> {
    let mut reader = Reader {
        grads,
        values,
        path: vec![],
        seen: vec![],
        out: vec![],
    };
    model.visit(&mut reader);
    reader.out
}

/// Replaces every gradient of `model` in `grads` by `host` (same order as [`read`]).
struct Writer<'a> {
    grads: &'a mut GradientsParams,
    host: std::vec::IntoIter<HostTensor>,
    seen: Vec<ParamId>,
    device: Device,
}

impl ModuleVisitor for Writer<'_> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        if self.seen.contains(&param.id) || self.grads.get::<D>(param.id).is_none() {
            return;
        }
        self.seen.push(param.id);
        let h = self.host.next().unwrap();
        let shape: Vec<usize> = h.shape.iter().map(|&d| d as usize).collect();
        let t = Tensor::<D>::from_data(TensorData::new(h.values, shape), &self.device);
        self.grads.register(param.id, t);
    }
}

fn write<M: Module>(
    model: &M,
    grads: &mut GradientsParams,
    host: Vec<HostTensor>,
    device: &Device,
) {
    let mut writer = Writer {
        grads,
        host: host.into_iter(),
        seen: vec![],
        device: device.clone(),
    };
    model.visit(&mut writer);
}

/// gradclip's CPU oracle: `policy` over the host gradients (and parameters for AGC).
fn oracle(
    policy: &ClipPolicy,
    grads: &mut [HostTensor],
    params: Option<&[HostTensor]>,
) -> ClipReport {
    let infos: Vec<TensorInfo> = grads
        .iter()
        .map(|g| TensorInfo::new(&g.path, &g.shape))
        .collect();
    let mut cpu = CpuClipper::new(policy.clone(), &infos).unwrap();
    let params: Option<Vec<GradRef>> =
        params.map(|p| p.iter().map(|t| GradRef::F32(&t.values)).collect());
    let mut views: Vec<GradMut> = grads
        .iter_mut()
        .map(|g| GradMut::F32(&mut g.values))
        .collect();
    cpu.step(&mut views, params.as_deref()).unwrap()
}

/// Every element of `got` within `rel` of `want`, relative to the tensor's largest value.
fn assert_close(got: &[HostTensor], want: &[HostTensor], rel: f32) {
    assert_eq!(got.len(), want.len());
    for (g, w) in got.iter().zip(want) {
        assert_eq!(g.path, w.path);
        let scale = w
            .values
            .iter()
            .fold(f32::MIN_POSITIVE, |m, v| m.max(v.abs()));
        for (i, (a, b)) in g.values.iter().zip(&w.values).enumerate() {
            assert!(
                (a - b).abs() <= rel * scale,
                "{} [{i}]: {a} vs {b} (scale {scale})",
                g.path
            );
        }
    }
}

/// The total norms of two reports within 1e-6 of each other, relative.
fn assert_same_norm(got: &ClipReport, want: &ClipReport) {
    let rel = (got.total_norm - want.total_norm).abs() / want.total_norm;
    assert!(rel < 1e-6, "norm {} vs {}", got.total_norm, want.total_norm);
}

fn mlp_step(shared: &SharedDevice, seed: u64) -> (Mlp, GradientsParams) {
    let device = shared.autodiff();
    device.seed(seed);
    let model = Mlp::new(&device);
    let grads = mlp_grads(&model, seed, &device);
    (model, grads)
}

/// The gradients of `model` on a batch drawn from `seed`.
fn mlp_grads(model: &Mlp, seed: u64, device: &Device) -> GradientsParams {
    let x = data([9, 5], seed, device);
    let y = data([9, 3], seed + 1, device).mul_scalar(50.0);
    GradientsParams::from_grads(model.loss(x, y).backward(), model)
}

/// Clips `grads` on the device with `policy` and checks it against the oracle; returns
/// the clipped gradients and how many the clipper copied first.
fn check_against_oracle<M: Module>(
    shared: &SharedDevice,
    model: &M,
    mut grads: GradientsParams,
    policy: ClipPolicy,
) -> (Vec<HostTensor>, u64) {
    let mut host = read(model, Some(&grads));
    let params = policy.needs_params().then(|| read_values(model, &grads));
    let want = oracle(&policy, &mut host, params.as_deref());
    let mut clipper = BurnClipper::new(shared, policy).unwrap();
    let report = clipper.clip(model, &mut grads).unwrap().wait().unwrap();
    let got = read(model, Some(&grads));
    assert_close(&got, &host, 1e-6);
    assert_same_norm(&report, &want);
    assert_eq!(report.clipped_units, want.clipped_units);
    (got, clipper.copies())
}

#[test]
fn global_norm_clip_of_an_mlp_matches_the_host_clip() {
    let Some(shared) = shared() else { return };
    let (model, grads) = mlp_step(&shared, 1);
    let before = read(&model, Some(&grads));
    let total: f64 = before
        .iter()
        .flat_map(|t| &t.values)
        .map(|&v| (v as f64).powi(2))
        .sum::<f64>()
        .sqrt();
    assert!(total > 2.0, "the test needs a clipping step, norm {total}");
    let (got, _) = check_against_oracle(
        &shared,
        &model,
        grads,
        ClipPolicy::new(Rule::GlobalNorm(1.0)),
    );
    let after: f64 = got
        .iter()
        .flat_map(|t| &t.values)
        .map(|&v| (v as f64).powi(2))
        .sum::<f64>()
        .sqrt();
    assert!((after - 1.0).abs() < 1e-5, "clipped norm {after}");
}

/// Mixed precision's recipe on Burn: the backward pass of the loss times S gives the
/// gradients times S, and a loss-scaled chain clips them as the unscaled ones; an
/// overflow is skipped, the gradients left as they were, and the scale backed off.
#[test]
fn a_loss_scaled_chain_unscales_burns_gradients() {
    let Some(shared) = shared() else { return };
    let device = shared.autodiff();
    device.seed(3);
    let model = Mlp::new(&device);
    let (x, y) = (
        data([9, 5], 3, &device),
        data([9, 3], 4, &device).mul_scalar(50.0),
    );
    let loss = || model.loss(x.clone(), y.clone());
    let plain = GradientsParams::from_grads(loss().backward(), &model);
    let mut want = read(&model, Some(&plain));
    let unscaled = oracle(&ClipPolicy::global_norm(1.0), &mut want, None);
    assert!(unscaled.clipped_units > 0, "the test needs a clipping step");
    let chain = ClipPolicy::global_norm(1.0).loss_scale(LossScale::dynamic().init(1024.0));
    let mut clipper = BurnClipper::new(&shared, chain).unwrap();
    let mut scaled = GradientsParams::from_grads(loss().mul_scalar(1024.0).backward(), &model);
    let report = clipper.clip(&model, &mut scaled).unwrap().wait().unwrap();
    assert_close(&read(&model, Some(&scaled)), &want, 1e-5);
    assert_same_norm(&report, &unscaled);
    assert_eq!(
        report.loss_scale.map(|l| (l.scale, l.next)),
        Some((1024.0, 1024.0))
    );
    // S * g beyond f32: skipped, nothing written, S halved.
    let mut overflow = GradientsParams::from_grads(loss().mul_scalar(f32::MAX).backward(), &model);
    let bits = |t: Vec<HostTensor>| -> Vec<u32> {
        t.iter()
            .flat_map(|t| t.values.iter().map(|v| v.to_bits()))
            .collect()
    };
    let before = bits(read(&model, Some(&overflow)));
    let report = clipper.clip(&model, &mut overflow).unwrap().wait().unwrap();
    assert!(report.skipped && report.non_finite);
    assert_eq!(bits(read(&model, Some(&overflow))), before);
    assert_eq!(report.loss_scale.unwrap().next, 512.0);
}

#[test]
fn groups_by_parameter_path_agc_and_a_chain_match_the_oracle() {
    let Some(shared) = shared() else { return };
    let groups = GroupClip::new(10.0)
        .group("first", "fc1.*", 0.5)
        .group("biases", "*.bias", 0.1);
    let agc = Agc {
        lambda: 0.02,
        axis: UnitAxis::First,
        ..Agc::default()
    };
    for policy in [
        ClipPolicy::new(Rule::Groups(groups)).with_group_report(),
        ClipPolicy::new(Rule::Agc(agc.clone())),
        ClipPolicy::new(Rule::Agc(agc)).then(Rule::GlobalNorm(0.5)),
        ClipPolicy::new(Rule::GlobalNorm(1.0).except(["fc2.*"])),
    ] {
        let (model, grads) = mlp_step(&shared, 2);
        check_against_oracle(&shared, &model, grads, policy);
    }
}

#[test]
fn group_reports_carry_the_parameter_paths() {
    let Some(shared) = shared() else { return };
    let (model, mut grads) = mlp_step(&shared, 3);
    let policy =
        ClipPolicy::new(Rule::PerTensor(PerTensorClip { max_norm: 0.1 })).with_group_report();
    let mut clipper = BurnClipper::new(&shared, policy).unwrap();
    let report = clipper.clip(&model, &mut grads).unwrap().wait().unwrap();
    let names: Vec<&str> = report
        .groups
        .as_ref()
        .unwrap()
        .iter()
        .map(|g| g.name.as_str())
        .collect();
    assert_eq!(names, ["fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"]);
}

/// Burn's own `GradientClippingConfig::Norm` clips each parameter by its own norm: that is
/// gradclip's per-tensor rule, not a global norm, which keeps the gradient's direction.
#[test]
fn burns_per_parameter_norm_clip_is_the_per_tensor_rule_not_the_global_norm() {
    let Some(shared) = shared() else { return };
    let (model, grads) = mlp_step(&shared, 4);
    let host = read(&model, Some(&grads));
    let clipping = burn::grad_clipping::GradientClippingConfig::Norm(1.0).init();
    let burn_clipped: Vec<HostTensor> = host
        .iter()
        .map(|t| {
            let shape: Vec<usize> = t.shape.iter().map(|&d| d as usize).collect();
            let g = Tensor::<1>::from_data(
                TensorData::new(t.values.clone(), [t.values.len()]),
                shared.device(),
            );
            let _ = shape;
            HostTensor {
                values: clipping
                    .clip_gradient(g)
                    .into_data()
                    .convert::<f32>()
                    .try_to_vec::<f32>()
                    .unwrap(),
                ..t.clone()
            }
        })
        .collect();
    let (per_tensor, _) = check_against_oracle(
        &shared,
        &model,
        grads,
        ClipPolicy::new(Rule::PerTensor(PerTensorClip { max_norm: 1.0 })),
    );
    // Burn divides by norm + f32::MIN_POSITIVE, gradclip (and PyTorch) by norm + 1e-6.
    assert_close(&per_tensor, &burn_clipped, 2e-6);
    let (model, grads) = mlp_step(&shared, 4);
    let (global, _) = check_against_oracle(
        &shared,
        &model,
        grads,
        ClipPolicy::new(Rule::GlobalNorm(1.0)),
    );
    let differs = global.iter().zip(&burn_clipped).any(|(g, b)| {
        g.values
            .iter()
            .zip(&b.values)
            .any(|(x, y)| (x - y).abs() > 1e-3 * y.abs().max(1e-3))
    });
    assert!(
        differs,
        "a global norm clip must differ from the per-parameter one here"
    );
}

/// Trains `steps` SGD steps from `init`, clipping with gradclip on the device
/// (`on_device`) or with the CPU oracle on gradients read back to the host.
fn train_rnn(
    shared: &SharedDevice,
    init: &Rnn,
    steps: usize,
    policy: &ClipPolicy,
    on_device: bool,
) -> (Rnn, Vec<ClipReport>, u64) {
    let device = shared.autodiff();
    let mut model = init.clone();
    let mut reports = vec![];
    let clipper = BurnClipper::new(shared, policy.clone()).unwrap();
    let mut optim = ClippedOptimizer::new(SgdConfig::new().init(), clipper).unwrap();
    let infos: Vec<TensorInfo> = read(init, None)
        .iter()
        .map(|t| TensorInfo::new(&t.path, &t.shape))
        .collect();
    let mut host_clip = CpuClipper::new(policy.clone(), &infos).unwrap();
    let mut host_optim = SgdConfig::new().init();
    for step in 0..steps {
        let xs = data([8, 4, 3], 100 + step as u64, &device);
        let y = data([4, 1], 200 + step as u64, &device);
        let grads = GradientsParams::from_grads(model.loss(xs, y).backward(), &model);
        if on_device {
            // The host run reads the gradients back here: so does this one, so that Burn
            // syncs at the same points and fuses the same kernels in both runs.
            let _ = read(&model, Some(&grads));
            let (next, report) = optim.step(0.05, model, grads);
            model = next;
            reports.push(report.unwrap());
        } else {
            let mut grads = grads;
            let mut host = read(&model, Some(&grads));
            let weights = policy.needs_params().then(|| read(&model, None));
            let params: Option<Vec<GradRef>> =
                (weights.as_ref()).map(|w| w.iter().map(|t| GradRef::F32(&t.values)).collect());
            let mut views: Vec<GradMut> = host
                .iter_mut()
                .map(|g| GradMut::F32(&mut g.values))
                .collect();
            reports.push(host_clip.step(&mut views, params.as_deref()).unwrap());
            write(&model, &mut grads, host, shared.device());
            model = host_optim.step(0.05, model, grads);
        }
    }
    (model, reports, optim.clipper().moves())
}

/// The device run and the host run of `policy` agree on every report and on the weights.
fn check_training(
    shared: &SharedDevice,
    policy: ClipPolicy,
    steps: usize,
) -> (Vec<ClipReport>, u64) {
    let device = shared.autodiff();
    let init = Rnn::new(&device);
    let (on_device, reports, moves) = train_rnn(shared, &init, steps, &policy, true);
    let (on_host, host_reports, _) = train_rnn(shared, &init, steps, &policy, false);
    for (a, b) in reports.iter().zip(&host_reports) {
        // The two runs drift apart by rounding: each clip agrees to 1e-7 and the exploding
        // RNN amplifies it (seen on GL: 1e-5 at step 11). A broken clip is off by far more.
        let tol = 1e-4;
        let close = |x: f64, y: f64| (x - y).abs() <= tol * y.abs().max(1e-30);
        assert!(
            close(a.total_norm, b.total_norm),
            "step {}: {} vs {}",
            a.step,
            a.total_norm,
            b.total_norm
        );
        let (ta, tb) = (
            a.threshold.unwrap_or(0.0) as f64,
            b.threshold.unwrap_or(0.0) as f64,
        );
        assert!(close(ta, tb), "step {}: threshold {ta} vs {tb}", a.step);
        assert_eq!(
            (a.step, a.clipped_units, a.skipped),
            (b.step, b.clipped_units, b.skipped)
        );
    }
    assert_close(&read(&on_device, None), &read(&on_host, None), 1e-4);
    (reports, moves)
}

#[test]
fn rnn_trained_with_the_device_clip_matches_the_host_clipped_run() {
    let Some(shared) = shared() else { return };
    let (reports, _) = check_training(&shared, ClipPolicy::new(Rule::GlobalNorm(1.0)), 6);
    assert!(
        reports[0].total_norm > 2.0,
        "the RNN must explode for the test to clip"
    );
    assert!(reports.iter().all(|r| r.clipped_units > 0));
}

/// AutoClip's history lives on the device across steps, also when Burn's pool hands the
/// gradients other buffer ranges (the plan moves, keeping its state).
#[test]
fn adaptive_state_carries_across_steps_as_on_the_host() {
    let Some(shared) = shared() else { return };
    let policy = ClipPolicy::new(Rule::AutoClip(gradclip::AutoClip::new(50.0, 8)));
    let (reports, moves) = check_training(&shared, policy, 12);
    eprintln!("the gradients moved {moves} times in 12 steps");
    assert!(
        moves > 0,
        "the test must see Burn's pool move the gradients"
    );
    assert!(reports.iter().any(|r| r.clipped_units > 0));
}

/// AGC reads the parameters, which SGD writes anew every step: they move too.
#[test]
fn agc_then_global_norm_trains_as_on_the_host() {
    let Some(shared) = shared() else { return };
    let agc = Agc {
        lambda: 0.05,
        ..Agc::default()
    };
    let policy = ClipPolicy::new(Rule::Agc(agc)).then(Rule::GlobalNorm(1.0));
    let (reports, moves) = check_training(&shared, policy, 6);
    assert!(moves > 0);
    assert!(reports.iter().all(|r| r.clipped_units > 0));
}

#[test]
fn a_missing_gradient_is_a_typed_error_and_touches_nothing() {
    let Some(shared) = shared() else { return };
    let (model, mut grads) = mlp_step(&shared, 6);
    let id = model.fc2.bias.as_ref().unwrap().id;
    let _ = grads.remove::<1>(id);
    let before = read(&model, Some(&grads));
    let mut clipper = BurnClipper::new(&shared, ClipPolicy::new(Rule::GlobalNorm(1e-3))).unwrap();
    let err = clipper.clip(&model, &mut grads).unwrap_err();
    assert!(
        matches!(&err, BurnClipError::MissingGradient { path } if path == "fc2.bias"),
        "{err}"
    );
    assert_close(&read(&model, Some(&grads)), &before, 0.0);
}

#[test]
fn a_transposed_gradient_is_clipped_in_place_and_copied_only_for_agc() {
    let Some(shared) = shared() else { return };
    let agc = Agc::new(0.02).axis(UnitAxis::Last);
    for (policy, copies) in [
        (ClipPolicy::new(Rule::GlobalNorm(1e-3)), 0),
        (
            ClipPolicy::new(Rule::PerTensor(PerTensorClip { max_norm: 0.1 })),
            0,
        ),
        (ClipPolicy::new(Rule::Agc(agc)), 1),
        // Noise is keyed by each element's index in order, as on the host.
        (
            ClipPolicy::new(Rule::GlobalNorm(1e-3)).noise(GaussianNoise {
                sigma: 1e-3,
                seed: 3,
            }),
            1,
        ),
    ] {
        let (model, mut grads) = mlp_step(&shared, 7);
        let id = model.fc1.weight.id;
        let g: Tensor<2> = grads.remove(id).unwrap();
        // The same values as a transposed view of a [7, 5] tensor: dense, in another order.
        let t = Tensor::<2>::from_data(g.transpose().into_data(), shared.device());
        grads.register(id, t.transpose());
        let (_, copied) = check_against_oracle(&shared, &model, grads, policy.clone());
        assert_eq!(copied, copies, "{policy:?}");
    }
}

#[test]
fn a_broadcast_gradient_is_copied_then_clipped() {
    let Some(shared) = shared() else { return };
    let (model, mut grads) = mlp_step(&shared, 8);
    let id = model.fc2.bias.as_ref().unwrap().id;
    // One value seen three times: a stride-0 view, not dense.
    let one = Tensor::<1>::from_floats([2.5], shared.device());
    grads.remove::<1>(id).unwrap();
    grads.register(id, one.expand([3]));
    let (got, copied) = check_against_oracle(
        &shared,
        &model,
        grads,
        ClipPolicy::new(Rule::GlobalNorm(1e-3)),
    );
    assert_eq!(copied, 1);
    let bias = got.iter().find(|t| t.path == "fc2.bias").unwrap();
    assert!(bias.values.iter().all(|&v| v == bias.values[0] && v > 0.0));
}

/// A small CNN with Burn's convolution layers, whose backward passes produce weight
/// gradients in permuted (dense, not in order) layouts.
#[derive(Module, Debug)]
struct Cnn {
    conv1d: Conv1d,
    conv: Conv2d,
    deconv: ConvTranspose2d,
    fc: Linear,
}

impl Cnn {
    fn new(device: &Device) -> Cnn {
        Cnn {
            conv1d: Conv1dConfig::new(2, 3, 3).init(device),
            conv: Conv2dConfig::new([1, 4], [3, 3]).init(device),
            deconv: ConvTranspose2dConfig::new([4, 2], [2, 2]).init(device),
            fc: LinearConfig::new(50, 3).init(device),
        }
    }

    fn loss(&self, seq: Tensor<3>, img: Tensor<4>, y: Tensor<2>) -> Tensor<1> {
        let a = self.conv1d.forward(seq).powi_scalar(2).mean();
        let h = burn::tensor::activation::relu(self.conv.forward(img));
        let h: Tensor<2> = self.deconv.forward(h).flatten(1, 3);
        a + (self.fc.forward(h) - y).powi_scalar(2).mean()
    }
}

#[test]
fn a_cnns_gradients_match_the_oracle_in_place_and_under_agc() {
    let Some(shared) = shared() else { return };
    let groups = GroupClip::new(10.0)
        .group("convs", "conv*", 0.3)
        .group("biases", "*.bias", 0.05);
    let agc = Agc::new(0.02).exclude("fc.*");
    for (policy, in_place) in [
        (ClipPolicy::new(Rule::GlobalNorm(1.0)), true),
        (
            ClipPolicy::new(Rule::Groups(groups)).with_group_report(),
            true,
        ),
        (
            ClipPolicy::new(Rule::PerTensor(PerTensorClip { max_norm: 0.2 })),
            true,
        ),
        (
            ClipPolicy::new(Rule::Agc(agc)).then(Rule::GlobalNorm(0.5)),
            false,
        ),
    ] {
        let device = shared.autodiff();
        let model = Cnn::new(&device);
        let seq = data([2, 2, 8], 41, &device);
        let img = data([2, 1, 6, 6], 42, &device);
        let y = data([2, 3], 43, &device).mul_scalar(40.0);
        let grads = GradientsParams::from_grads(model.loss(seq, img, y).backward(), &model);
        let (_, copied) = check_against_oracle(&shared, &model, grads, policy.clone());
        // In place whatever the layouts; AGC copies the weight gradients not in order,
        // which shows that the backward pass produced some.
        assert_eq!(copied == 0, in_place, "{policy:?}: {copied} copies");
    }
}

/// A sequence model with Burn's other common layers: an embedding, layer and batch norms,
/// an LSTM, a GRU, a transformer encoder block (attention with its transposes) and a
/// linear head.
#[derive(Module, Debug)]
struct Seq {
    embed: Embedding,
    norm: LayerNorm,
    lstm: Lstm,
    gru: Gru,
    encoder: TransformerEncoder,
    batch_norm: BatchNorm,
    head: Linear,
}

impl Seq {
    fn new(device: &Device) -> Seq {
        Seq {
            embed: EmbeddingConfig::new(10, 8).init(device),
            norm: LayerNormConfig::new(8).init(device),
            lstm: LstmConfig::new(8, 6, true).init(device),
            gru: GruConfig::new(6, 6, true).init(device),
            encoder: TransformerEncoderConfig::new(6, 12, 2, 1)
                .with_dropout(0.0)
                .init(device),
            batch_norm: BatchNormConfig::new(6).init(device),
            head: LinearConfig::new(6, 3).init(device),
        }
    }

    fn loss(&self, ids: Tensor<2, Int>, y: Tensor<2>) -> Tensor<1> {
        let x = self.norm.forward(self.embed.forward(ids));
        let (x, _) = self.lstm.forward(x, None);
        let x = self.gru.forward(x, None);
        let x = self.encoder.forward(TransformerEncoderInput::new(x));
        let x = self.batch_norm.forward(x.swap_dims(1, 2)).swap_dims(1, 2);
        let pooled: Tensor<2> = x.mean_dim(1).squeeze_dim(1);
        (self.head.forward(pooled) - y).powi_scalar(2).mean()
    }
}

#[test]
fn a_sequence_models_gradients_match_the_oracle() {
    let Some(shared) = shared() else { return };
    let groups = GroupClip::new(10.0)
        .group("recurrent", "lstm.*", 0.2)
        .group("attention", "encoder.*", 0.3)
        .group("biases", "*.bias", 0.05);
    let agc = Agc::new(0.02).exclude("head.*");
    for policy in [
        ClipPolicy::new(Rule::GlobalNorm(0.5)),
        ClipPolicy::new(Rule::Groups(groups)).with_group_report(),
        ClipPolicy::new(Rule::Agc(agc)).then(Rule::GlobalNorm(0.5)),
    ] {
        let device = shared.autodiff();
        let model = Seq::new(&device);
        let ids: Vec<i64> = (0..10).map(|i| (i * 7 % 10) as i64).collect();
        let ids = Tensor::<2, Int>::from_data(TensorData::new(ids, [2, 5]), &device);
        let y = data([2, 3], 51, &device).mul_scalar(40.0);
        let grads = GradientsParams::from_grads(model.loss(ids, y).backward(), &model);
        let in_place = !policy.needs_params();
        let (_, copies) = check_against_oracle(&shared, &model, grads, policy);
        // Every gradient of these layers is dense: clipped in place unless AGC needs order.
        assert!(!in_place || copies == 0, "{copies} copies");
    }
}

#[derive(Module, Debug)]
struct Twin {
    a: Param<Tensor<1>>,
    b: Param<Tensor<1>>,
}

#[test]
fn gradients_sharing_one_buffer_range_are_each_clipped_once() {
    let Some(shared) = shared() else { return };
    let device = shared.autodiff();
    let twin = Twin {
        a: Param::from_tensor(Tensor::zeros([5], &device)),
        b: Param::from_tensor(Tensor::zeros([5], &device)),
    };
    let g = Tensor::<1>::from_floats([3.0, -4.0, 12.0, 0.5, 1e-3], shared.device());
    let mut grads = GradientsParams::new();
    grads.register(twin.a.id, g.clone());
    grads.register(twin.b.id, g);
    let (got, _) = check_against_oracle(
        &shared,
        &twin,
        grads,
        ClipPolicy::new(Rule::GlobalNorm(2.0)),
    );
    assert_eq!(got[0].values, got[1].values);
}

#[test]
fn an_optimizer_that_clips_already_is_refused() {
    let Some(shared) = shared() else { return };
    let clips = SgdConfig::new()
        .with_gradient_clipping(Some(burn::grad_clipping::GradientClippingConfig::Norm(1.0)))
        .init();
    let clipper = BurnClipper::new(&shared, ClipPolicy::new(Rule::GlobalNorm(1.0))).unwrap();
    let err = ClippedOptimizer::new(clips, clipper).err().unwrap();
    assert!(matches!(err, BurnClipError::ClipsTwice), "{err}");
}

/// A skipped step (NaN gradients under SkipStep) leaves the module and the gradients as
/// they were; the next finite step trains.
#[test]
fn a_skipped_step_leaves_the_module_unchanged() {
    let Some(shared) = shared() else { return };
    let (model, mut grads) = mlp_step(&shared, 9);
    let id = model.fc2.bias.as_ref().unwrap().id;
    let g: Tensor<1> = grads.remove(id).unwrap();
    grads.register(id, g.mul_scalar(f32::NAN));
    let policy =
        ClipPolicy::new(Rule::GlobalNorm(1.0)).non_finite(gradclip::NonFinitePolicy::SkipStep);
    let clipper = BurnClipper::new(&shared, policy).unwrap();
    let mut optim = ClippedOptimizer::new(SgdConfig::new().init(), clipper).unwrap();
    let before = read(&model, None);
    let (model, report) = optim.step(0.1, model, grads);
    let report = report.unwrap();
    assert!(report.skipped && report.non_finite);
    assert_close(&read(&model, None), &before, 0.0);
    let grads = mlp_grads(&model, 9, &shared.autodiff());
    let (model, report) = optim.step(0.1, model, grads);
    assert!(!report.unwrap().skipped);
    let after = read(&model, None);
    assert!(after.iter().zip(&before).any(|(a, b)| a.values != b.values));
}

/// A gradient of an element type gradclip does not clip (f64 here, where the device has
/// it; else a quantized one) is a typed error, and nothing is written.
#[test]
fn an_unsupported_element_type_is_a_typed_error() {
    let Some(shared) = shared() else { return };
    let (model, mut grads) = mlp_step(&shared, 10);
    let id = model.fc2.weight.id;
    let g: Tensor<2> = grads.remove(id).unwrap();
    let device = shared.device();
    let scheme = burn::tensor::quantization::QuantScheme::default();
    let odd = if device.supports_dtype(burn::tensor::DType::F64) {
        g.cast(burn::tensor::DType::F64)
    } else if shared.setup().backend != wgpu::Backend::Gl {
        // Burn's quantization fails on GL ("Can't store in u32") though it says it has it.
        g.quantize_dynamic(&scheme)
    } else {
        // Mesa's GL: no f64; CI runs this on lavapipe.
        assert!(
            std::env::var_os("CI").is_none(),
            "no unsupported float type to try"
        );
        eprintln!("skipped: this device has neither f64 nor quantized tensors");
        return;
    };
    let dtype = odd.dtype();
    grads.register(id, odd);
    let before = read(&model, Some(&grads));
    let mut clipper = BurnClipper::new(&shared, ClipPolicy::new(Rule::GlobalNorm(1e-3))).unwrap();
    let err = clipper.clip(&model, &mut grads).unwrap_err();
    assert!(
        matches!(&err, BurnClipError::UnsupportedDType { path, dtype: d } if path == "fc2.weight" && *d == dtype),
        "{err}"
    );
    assert_close(&read(&model, Some(&grads)), &before, 0.0);
}

/// f16 and bf16 gradients (Burn's half-precision training) are clipped in their own type,
/// as the oracle clips them.
#[test]
fn half_precision_gradients_match_the_oracle() {
    let Some(shared) = shared() else { return };
    let mut ran = 0;
    for dtype in [burn::tensor::DType::F16, burn::tensor::DType::BF16] {
        // Burn's wgpu backend has f16 on lavapipe, not bf16 (no WGSL type for it).
        if !shared.device().supports_dtype(dtype) {
            eprintln!("skipped {dtype:?}: Burn does not offer it on this device");
            continue;
        }
        ran += 1;
        let (model, mut grads) = mlp_step(&shared, 11);
        for p in [model.fc1.weight.id, model.fc2.weight.id] {
            let g: Tensor<2> = grads.remove(p).unwrap();
            grads.register(p, g.cast(dtype));
        }
        for p in [
            model.fc1.bias.as_ref().unwrap().id,
            model.fc2.bias.as_ref().unwrap().id,
        ] {
            let g: Tensor<1> = grads.remove(p).unwrap();
            grads.register(p, g.cast(dtype));
        }
        // The host copy in the same type (exact: f32 holds every f16 and bf16 value).
        let halves = read(&model, Some(&grads));
        let mut want: Vec<Half> = halves.iter().map(|t| Half::new(dtype, &t.values)).collect();
        let infos: Vec<TensorInfo> = halves
            .iter()
            .map(|t| TensorInfo::new(&t.path, &t.shape))
            .collect();
        let policy = ClipPolicy::new(Rule::GlobalNorm(1.0));
        let mut cpu = CpuClipper::new(policy.clone(), &infos).unwrap();
        let mut views: Vec<GradMut> = want.iter_mut().map(|h| h.as_mut()).collect();
        let want_report = cpu.step(&mut views, None).unwrap();
        let mut clipper = BurnClipper::new(&shared, policy).unwrap();
        let report = clipper.clip(&model, &mut grads).unwrap().wait().unwrap();
        assert!(
            (report.total_norm - want_report.total_norm).abs() <= 1e-6 * want_report.total_norm
        );
        // Each element rounds once to the type, as on the host: at most one unit apart.
        let ulp = if dtype == burn::tensor::DType::F16 {
            1e-3
        } else {
            8e-3
        };
        for (got, want) in read(&model, Some(&grads)).iter().zip(&want) {
            for (a, b) in got.values.iter().zip(want.to_f32()) {
                assert!(
                    (a - b).abs() <= ulp * b.abs() + 1e-7,
                    "{dtype:?} {}: {a} vs {b}",
                    got.path
                );
            }
        }
    }
    assert!(
        ran > 0 || std::env::var_os("CI").is_none(),
        "lavapipe offers f16"
    );
}

/// Host values of one 16-bit type.
enum Half {
    F16(Vec<gradclip::f16>),
    BF16(Vec<gradclip::bf16>),
}

impl Half {
    fn new(dtype: burn::tensor::DType, v: &[f32]) -> Half {
        match dtype {
            burn::tensor::DType::F16 => {
                Half::F16(v.iter().map(|&x| gradclip::f16::from_f32(x)).collect())
            }
            _ => Half::BF16(v.iter().map(|&x| gradclip::bf16::from_f32(x)).collect()),
        }
    }

    fn as_mut(&mut self) -> GradMut<'_> {
        match self {
            Half::F16(v) => GradMut::F16(v),
            Half::BF16(v) => GradMut::BF16(v),
        }
    }

    fn to_f32(&self) -> Vec<f32> {
        match self {
            Half::F16(v) => v.iter().map(|x| x.to_f32()).collect(),
            Half::BF16(v) => v.iter().map(|x| x.to_f32()).collect(),
        }
    }
}

#[derive(Module, Debug)]
struct Pair {
    a: Param<Tensor<1>>,
    b: Param<Tensor<1>>,
}

/// When another set of parameters gets gradients (one unfrozen), the clipper plans the
/// new set and AutoClip's history carries over, as on the host.
#[test]
fn a_new_set_of_gradients_is_planned_anew_with_the_state() {
    let Some(shared) = shared() else { return };
    let device = shared.autodiff();
    let frozen = Pair {
        a: Param::from_tensor(Tensor::zeros([3], &device)),
        b: Param::from_tensor(Tensor::zeros([2], &device)).set_require_grad(false),
    };
    let policy = ClipPolicy::new(Rule::AutoClip(gradclip::AutoClip::new(50.0, 4)));
    let mut clipper = BurnClipper::new(&shared, policy.clone()).unwrap();
    let mut grads = GradientsParams::new();
    grads.register(
        frozen.a.id,
        Tensor::<1>::from_floats([3.0, 4.0, 12.0], shared.device()),
    );
    let first = clipper.clip(&frozen, &mut grads).unwrap().wait().unwrap();
    let unfrozen = Pair {
        a: frozen.a.clone(),
        b: frozen.b.clone().set_require_grad(true),
    };
    let mut grads = GradientsParams::new();
    grads.register(
        unfrozen.a.id,
        Tensor::<1>::from_floats([30.0, 40.0, 0.0], shared.device()),
    );
    grads.register(
        unfrozen.b.id,
        Tensor::<1>::from_floats([0.0, 1.0], shared.device()),
    );
    let second = clipper.clip(&unfrozen, &mut grads).unwrap().wait().unwrap();
    let (host_first, host_second) = two_sets_on_the_host(&policy);
    assert_eq!((first.step, second.step), (0, 1));
    assert!(
        (first.total_norm - host_first.total_norm).abs() < 1e-6 * host_first.total_norm,
        "{} vs {}",
        first.total_norm,
        host_first.total_norm
    );
    let close = |a: f64, b: f64| (a - b).abs() <= 1e-6 * b.abs();
    assert!(close(second.total_norm, host_second.total_norm));
    let (t, ht) = (second.threshold.unwrap(), host_second.threshold.unwrap());
    assert!(close(t as f64, ht as f64), "threshold {t} vs {ht}");
    assert_eq!(clipper.moves(), 1);
}

/// The host's two steps of `policy`: `a` = [3, 4, 12] alone, then `a` = [30, 40, 0] and
/// `b` = [0, 1], the state handed from one set of tensors to the next.
fn two_sets_on_the_host(policy: &ClipPolicy) -> (ClipReport, ClipReport) {
    let mut cpu = CpuClipper::new(policy.clone(), &[TensorInfo::new("a", &[3])]).unwrap();
    let mut a = [3.0f32, 4.0, 12.0];
    let first = cpu.step(&mut [GradMut::F32(&mut a)], None).unwrap();
    let state = cpu.state().clone();
    let infos = [TensorInfo::new("a", &[3]), TensorInfo::new("b", &[2])];
    let mut cpu = CpuClipper::new(policy.clone(), &infos).unwrap();
    cpu.set_state(&state.for_tensors(policy, &infos).unwrap())
        .unwrap();
    let (mut a, mut b) = ([30.0f32, 40.0, 0.0], [0.0f32, 1.0]);
    let second = cpu
        .step(&mut [GradMut::F32(&mut a), GradMut::F32(&mut b)], None)
        .unwrap();
    (first, second)
}

/// A second Burn wgpu device on the shared device's adapter: a wgpu device of its own,
/// registered with Burn once per process, as a machine's second GPU would be.
fn second_device(shared: &SharedDevice) -> SharedDevice {
    static SECOND: OnceLock<SharedDevice> = OnceLock::new();
    SECOND
        .get_or_init(|| {
            let setup = shared.setup();
            let adapter = &setup.adapter;
            let (device, queue) =
                pollster::block_on(adapter.request_device(&wgpu::DeviceDescriptor {
                    required_features: adapter.features()
                        - wgpu::Features::MAPPABLE_PRIMARY_BUFFERS,
                    required_limits: adapter.limits(),
                    ..Default::default()
                }))
                .expect("a second device on the adapter");
            SharedDevice::from_setup(burn::tensor::wgpu::WgpuSetup {
                instance: setup.instance.clone(),
                adapter: adapter.clone(),
                device,
                queue,
                backend: setup.backend,
            })
            .expect("Burn registers the second device")
        })
        .clone()
}

/// Every parameter's gradient of `model`, from whichever device's entry holds it, in
/// the module's order; each must be in exactly one entry.
fn read_multi<M: Module>(model: &M, grads: &MultiGradientsParams) -> Vec<HostTensor> {
    let all: Vec<Vec<HostTensor>> = (grads.grads.iter())
        .map(|(g, _)| read(model, Some(g)))
        .collect();
    let order = read_as(model, None, true);
    (order.iter())
        .filter_map(|p| {
            let held: Vec<&HostTensor> = (all.iter().flatten())
                .filter(|t| t.path == p.path)
                .collect();
            assert!(held.len() <= 1, "{} held by {} devices", p.path, held.len());
            held.first().map(|t| (*t).clone())
        })
        .collect()
}

/// Two devices' gradients (burn-train's multi-device step) are clipped by one chain over
/// their sum, each device in place, as the host clips the sum; Burn's `step_multi` then
/// steps with them. Global norm, groups by path and AutoClip over steps.
#[test]
fn two_devices_clip_their_summed_gradients_as_the_host_does() {
    let Some(shared) = shared() else { return };
    let other = second_device(&shared);
    let (d0, d1) = (shared.autodiff(), other.autodiff());
    let chains = [
        ClipPolicy::new(Rule::GlobalNorm(0.5)),
        ClipPolicy::new(Rule::Groups(
            GroupClip::new(1.0).group("first", "fc1.*", 0.3),
        )),
        ClipPolicy::new(Rule::AutoClip(gradclip::AutoClip::new(30.0, 8))),
    ];
    for policy in chains {
        let model = Mlp::new(&d0);
        let mut clipper =
            MultiDeviceClipper::new(&[(*shared).clone(), other.clone()], policy.clone()).unwrap();
        let mut host_clip: Option<CpuClipper> = None;
        for step in 0..3u64 {
            let replica = model.clone().fork(&d1);
            let g0 = mlp_grads(&model, 10 + step, &d0);
            let g1 = mlp_grads(&replica, 20 + step, &d1);
            let mut sum = read(&model, Some(&g0));
            for (s, t) in sum.iter_mut().zip(read(&replica, Some(&g1))) {
                for (a, b) in s.values.iter_mut().zip(t.values) {
                    *a += b;
                }
            }
            let infos: Vec<TensorInfo> = (sum.iter())
                .map(|g| TensorInfo::new(&g.path, &g.shape))
                .collect();
            let cpu =
                host_clip.get_or_insert_with(|| CpuClipper::new(policy.clone(), &infos).unwrap());
            let mut views: Vec<GradMut> = sum
                .iter_mut()
                .map(|g| GradMut::F32(&mut g.values))
                .collect();
            let want = cpu.step(&mut views, None).unwrap();
            let mut grads = MultiGradientsParams {
                grads: vec![(g0, d0.clone()), (g1, d1.clone())],
            };
            let report = clipper.clip(&model, &mut grads).unwrap();
            assert_eq!(report.step, step);
            assert!(
                (report.total_norm - want.total_norm).abs() <= 1e-6 * want.total_norm,
                "{} vs {}",
                report.total_norm,
                want.total_norm
            );
            assert_eq!(report.clipped_units, want.clipped_units);
            assert_close(&read_multi(&model, &grads), &sum, 1e-6);
            // Burn's optimizer finds every gradient summed already: p - 1.0 * clipped.
            let before = read(&model, None);
            let mut optim = SgdConfig::new().init();
            let stepped = optim.step_multi(1.0, model.clone(), grads);
            let want_params: Vec<HostTensor> = (before.iter().zip(&sum))
                .map(|(p, g)| HostTensor {
                    values: (p.values.iter().zip(&g.values))
                        .map(|(p, g)| p - g)
                        .collect(),
                    ..p.clone()
                })
                .collect();
            assert_close(&read(&stepped, None), &want_params, 1e-5);
        }
    }
}

/// A device that is not one of the clipper's is a typed error, with nothing scaled.
#[test]
fn a_multi_device_clip_refuses_a_device_it_does_not_clip_on() {
    let Some(shared) = shared() else { return };
    let other = second_device(&shared);
    let (d0, d1) = (shared.autodiff(), other.autodiff());
    let model = Mlp::new(&d0);
    let replica = model.clone().fork(&d1);
    let mut grads = MultiGradientsParams {
        grads: vec![
            (mlp_grads(&model, 1, &d0), d0.clone()),
            (mlp_grads(&replica, 2, &d1), d1.clone()),
        ],
    };
    let before: Vec<Vec<HostTensor>> = (grads.grads.iter())
        .map(|(g, _)| read(&model, Some(g)))
        .collect();
    let mut clipper = MultiDeviceClipper::new(
        &[(*shared).clone()],
        ClipPolicy::new(Rule::GlobalNorm(1e-3)),
    )
    .unwrap();
    let err = clipper.clip(&model, &mut grads).unwrap_err();
    assert!(matches!(err, BurnClipError::ForeignDevice { .. }), "{err}");
    for ((g, _), want) in grads.grads.iter().zip(&before) {
        assert_close(&read(&model, Some(g)), want, 0.0);
    }
    // No device, a device twice, AGC (its parameter and summed gradient would lie on
    // different devices): refused when the clipper is made.
    let global = ClipPolicy::new(Rule::GlobalNorm(1.0));
    let agc = ClipPolicy::new(Rule::Agc(Agc::new(0.01)));
    for (devices, policy) in [
        (vec![], global.clone()),
        (vec![(*shared).clone(), (*shared).clone()], global),
        (vec![(*shared).clone(), other.clone()], agc),
    ] {
        let err = MultiDeviceClipper::new(&devices, policy).unwrap_err();
        assert!(
            matches!(
                err,
                BurnClipError::Clip(gradclip::ClipError::InvalidConfig(_))
            ),
            "{err}"
        );
    }
}

/// The MLP trained through burn-train's Learner, clipping in `TrainStep::optimize`.
#[derive(Module, Debug)]
struct Learned {
    mlp: Mlp,
    #[module(skip)]
    clip: LearnerClipper,
}

/// A batch is drawn from its seed, as [`mlp_grads`] draws it.
#[derive(Clone)]
struct SeedBatcher;

impl Batcher<u64, (Tensor<2>, Tensor<2>)> for SeedBatcher {
    fn batch(&self, seeds: Vec<u64>, device: &Device) -> (Tensor<2>, Tensor<2>) {
        let seed = seeds[0];
        (
            data([9, 5], seed, device),
            data([9, 3], seed + 1, device).mul_scalar(50.0),
        )
    }
}

impl Learned {
    fn forward(&self, (x, y): (Tensor<2>, Tensor<2>)) -> RegressionOutput {
        let out = self
            .mlp
            .fc2
            .forward(burn::tensor::activation::relu(self.mlp.fc1.forward(x)));
        let loss = (out.clone() - y.clone()).powi_scalar(2).mean();
        RegressionOutput::new(loss, out, y)
    }
}

impl TrainStep for Learned {
    type Input = (Tensor<2>, Tensor<2>);
    type Output = RegressionOutput;

    fn step(&self, batch: Self::Input) -> TrainOutput<RegressionOutput> {
        let out = self.forward(batch);
        TrainOutput::new(self, out.loss.backward(), out)
    }

    fn optimize(
        self,
        optim: &mut ModuleOptimizer,
        lr: ModuleLearningRate,
        grads: GradientsParams,
    ) -> Self {
        self.clip.clone().optimize(self, optim, lr, grads)
    }

    fn optimize_multi(
        self,
        optim: &mut ModuleOptimizer,
        lr: ModuleLearningRate,
        grads: MultiGradientsParams,
    ) -> Self {
        self.clip.clone().optimize_multi(self, optim, lr, grads)
    }
}

impl InferenceStep for Learned {
    type Input = (Tensor<2>, Tensor<2>);
    type Output = RegressionOutput;

    fn step(&self, batch: Self::Input) -> RegressionOutput {
        self.forward(batch)
    }
}

const LEARNER_SEEDS: [u64; 4] = [3, 4, 5, 6];

/// Trains `model` through the Learner, one epoch over [`LEARNER_SEEDS`] (one batch each),
/// plain SGD at 0.1 (`optim`), with the clip's metrics logged under `dir`.
fn learn(
    model: Learned,
    optim: ModuleOptimizer,
    dir: &std::path::Path,
    interrupter: Interrupter,
    devices: Option<Vec<Device>>,
) -> LearningResult<Learned> {
    let device = model.mlp.fc1.weight.val().device();
    let loader = || -> Arc<dyn DataLoader<(Tensor<2>, Tensor<2>)>> {
        DataLoaderBuilder::new(SeedBatcher)
            .batch_size(1)
            .set_device(device.clone())
            .build(InMemDataset::new(LEARNER_SEEDS.to_vec()))
    };
    let mut training = SupervisedTraining::new(dir, loader(), loader())
        .metric_train_numeric(LossMetric::new())
        .num_epochs(1)
        .with_interrupter(interrupter)
        .with_application_logger(None);
    for quantity in [ClipQuantity::NormBefore, ClipQuantity::Coefficient] {
        training = training.metric_train_numeric(model.clip.metric(quantity));
    }
    if let Some(devices) = devices {
        let several = ExecutionStrategy::MultiDevice(devices, MultiDeviceOptim::OptimSharded);
        training = training.with_training_strategy(several.into());
    }
    training.launch(Learner::new(model, optim, 0.1))
}

/// The per-item values a metric logged for the first training epoch.
fn logged(dir: &std::path::Path, name: &str) -> Vec<f64> {
    let file = dir
        .join("train/epoch-1")
        .join(format!("{}.log", name.replace(' ', "_")));
    let text = std::fs::read_to_string(&file).unwrap_or_else(|e| panic!("{file:?}: {e}"));
    (text.lines())
        .filter(|l| !l.ends_with(",final"))
        .map(|l| l.split(',').next().unwrap().parse().unwrap())
        .collect()
}

/// A Learner user's training: the model clips in `TrainStep::optimize` through a
/// `LearnerClipper`, and trains exactly as the same steps clipped by hand; the clip's
/// norm and coefficient reach burn-train's metric logs, one per step.
#[test]
fn a_learner_clips_in_optimize_as_a_hand_written_loop_does() {
    let Some(shared) = shared() else { return };
    let device = shared.autodiff();
    let policy = ClipPolicy::new(Rule::GlobalNorm(1.0));
    let mlp = Mlp::new(&device);
    // By hand: the same batches, clipped and stepped with SGD at 0.1.
    let mut by_hand = ClippedOptimizer::new(
        SgdConfig::new().init(),
        BurnClipper::new(&shared, policy.clone()).unwrap(),
    )
    .unwrap();
    let mut want = mlp.clone();
    let mut reports = Vec::new();
    for seed in LEARNER_SEEDS {
        let grads = mlp_grads(&want, seed, &device);
        let (next, report) = by_hand.step(0.1, want, grads);
        want = next;
        reports.push(report.unwrap());
    }
    let dir = std::env::temp_dir().join(format!("gradclip-learner-{}", std::process::id()));
    let clip = LearnerClipper::new(&shared, policy).unwrap();
    let model = Learned {
        mlp,
        clip: clip.clone(),
    };
    let result = learn(
        model,
        SgdConfig::new().init(),
        &dir,
        Interrupter::new(),
        None,
    );
    assert!(result.error.is_none() && result.interrupted.is_none());
    assert_eq!((clip.steps(), clip.failed_steps()), (4, 0));
    assert_close(&read(&result.model.mlp, None), &read(&want, None), 1e-5);
    let norms: Vec<f64> = reports.iter().map(|r| r.total_norm).collect();
    let coefs: Vec<f64> = reports.iter().map(|r| r.coef.unwrap() as f64).collect();
    for (name, want) in [("Gradient norm", norms), ("Clip coefficient", coefs)] {
        let got = logged(&dir, name);
        assert_eq!(got.len(), want.len(), "{name}: {got:?}");
        for (g, w) in got.iter().zip(&want) {
            assert!((g - w).abs() <= 1e-4 * w.abs(), "{name}: {g} vs {w}");
        }
    }
    assert!(
        reports.iter().any(|r| r.coef.unwrap() < 1.0),
        "the clip clipped"
    );
    std::fs::remove_dir_all(&dir).ok();
}

/// A clip that fails inside the Learner (here Burn's optimizer clips too) takes no step,
/// keeps the typed error, and stops the training through the Interrupter it was given.
#[test]
fn a_failing_clip_in_the_learner_stops_the_training_and_changes_nothing() {
    let Some(shared) = shared() else { return };
    let device = shared.autodiff();
    let mlp = Mlp::new(&device);
    let before = read(&mlp, None);
    let interrupter = Interrupter::new();
    let clip = LearnerClipper::new(&shared, ClipPolicy::new(Rule::GlobalNorm(1.0)))
        .unwrap()
        .stop_on_error(interrupter.clone());
    let model = Learned {
        mlp,
        clip: clip.clone(),
    };
    let optim = SgdConfig::new()
        .with_gradient_clipping(Some(burn::grad_clipping::GradientClippingConfig::Norm(1.0)))
        .init();
    let dir = std::env::temp_dir().join(format!("gradclip-learner-fail-{}", std::process::id()));
    let result = learn(model, optim, &dir, interrupter, None);
    let reason = result
        .interrupted
        .expect("stopped")
        .reason
        .unwrap_or_default();
    assert!(reason.contains("already clips"), "{reason}");
    assert_eq!((clip.steps(), clip.failed_steps()), (0, 1));
    assert!(matches!(clip.take_error(), Some(BurnClipError::ClipsTwice)));
    assert!(clip.take_error().is_none());
    assert_close(&read(&result.model.mlp, None), &before, 0.0);
    std::fs::remove_dir_all(&dir).ok();
}

/// burn-train's multi-device training with sharded optimization hands every device's
/// gradients to `optimize_multi`: a `LearnerClipper::multi_device` clips them by one global
/// norm of their sum, every step, and the training completes.
#[test]
fn a_learner_on_two_devices_clips_in_optimize_multi() {
    let Some(shared) = shared() else { return };
    let other = second_device(&shared);
    let devices = [(*shared).clone(), other.clone()];
    let clip =
        LearnerClipper::multi_device(&devices, ClipPolicy::new(Rule::GlobalNorm(1.0))).unwrap();
    let model = Learned {
        mlp: Mlp::new(&shared.autodiff()),
        clip: clip.clone(),
    };
    let dir = std::env::temp_dir().join(format!("gradclip-learner-multi-{}", std::process::id()));
    let autodiff = vec![shared.autodiff(), other.autodiff()];
    let result = learn(
        model,
        SgdConfig::new().init(),
        &dir,
        Interrupter::new(),
        Some(autodiff),
    );
    assert!(
        result.error.is_none() && result.interrupted.is_none(),
        "{:?}",
        clip.take_error()
    );
    // Four batches over two devices: two steps of two devices each.
    let error = clip.take_error();
    assert_eq!((clip.steps(), clip.failed_steps()), (2, 0), "{error:?}");
    let last = clip.last_report().unwrap();
    assert!(last.coef.unwrap() < 1.0, "the clip clipped: {last:?}");
    let after = last.total_norm_after.unwrap();
    assert!((after - 1.0).abs() < 1e-5, "norm after clipping {after}");
    assert_eq!(logged(&dir, "Gradient norm").len(), 4, "one value per item");
    std::fs::remove_dir_all(&dir).ok();
}

/// On two devices as on one: when another set of parameters has gradients (a layer
/// unfrozen), the devices plan anew with AutoClip's history, as the host does; a gradient
/// of a parameter outside the module clipped stays where it was, untouched.
#[test]
fn two_devices_plan_a_new_set_of_gradients_anew_with_the_state() {
    let Some(shared) = shared() else { return };
    let other = second_device(&shared);
    let (d0, d1) = (shared.autodiff(), other.autodiff());
    let frozen = Pair {
        a: Param::from_tensor(Tensor::zeros([3], &d0)),
        b: Param::from_tensor(Tensor::zeros([2], &d0)).set_require_grad(false),
    };
    let outside = Param::from_tensor(Tensor::<1>::zeros([2], &d0));
    let policy = ClipPolicy::new(Rule::AutoClip(gradclip::AutoClip::new(50.0, 4)));
    let mut clipper =
        MultiDeviceClipper::new(&[(*shared).clone(), other.clone()], policy.clone()).unwrap();
    // Each device holds half of every summed gradient.
    let halves = |parts: &[(ParamId, Vec<f32>)], extra: bool| {
        let mut grads = MultiGradientsParams::default();
        for (device, inner) in [(&d0, shared.device()), (&d1, other.device())] {
            let mut g = GradientsParams::new();
            for (id, v) in parts {
                let half: Vec<f32> = v.iter().map(|x| x / 2.0).collect();
                let n = half.len();
                g.register(
                    *id,
                    Tensor::<1>::from_data(TensorData::new(half, [n]), inner),
                );
            }
            if extra && device == &d0 {
                g.register(outside.id, Tensor::<1>::from_floats([7.0, -7.0], inner));
            }
            grads.grads.push((g, device.clone()));
        }
        grads
    };
    let mut grads = halves(&[(frozen.a.id, vec![3.0, 4.0, 12.0])], false);
    let first = clipper.clip(&frozen, &mut grads).unwrap();
    let unfrozen = Pair {
        a: frozen.a.clone(),
        b: frozen.b.clone().set_require_grad(true),
    };
    let parts = [
        (unfrozen.a.id, vec![30.0, 40.0, 0.0]),
        (unfrozen.b.id, vec![0.0, 1.0]),
    ];
    let mut grads = halves(&parts, true);
    let second = clipper.clip(&unfrozen, &mut grads).unwrap();
    let (host_first, host_second) = two_sets_on_the_host(&policy);
    let close = |a: f64, b: f64| (a - b).abs() <= 1e-6 * b.abs();
    assert_eq!((first.step, second.step), (0, 1));
    assert!(close(first.total_norm, host_first.total_norm));
    assert!(close(second.total_norm, host_second.total_norm));
    let (t, ht) = (second.threshold.unwrap(), host_second.threshold.unwrap());
    assert!(close(t as f64, ht as f64), "threshold {t} vs {ht}");
    let kept: Vec<Vec<f32>> = (grads.grads.iter())
        .filter_map(|(g, _)| g.get::<1>(outside.id))
        .map(|t| t.into_data().convert::<f32>().try_to_vec::<f32>().unwrap())
        .collect();
    assert_eq!(
        kept,
        vec![vec![7.0, -7.0]],
        "the gradient outside the module"
    );
}
