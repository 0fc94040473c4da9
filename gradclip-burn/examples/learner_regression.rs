//! A regression model trained through burn-train's `Learner` with gradclip's global-norm
//! clip: the shape of Burn's `simple-regression` example (8 features, a hidden layer of
//! 64, one target), on synthetic data, so it runs offline. The model carries a
//! `LearnerClipper` and clips in `TrainStep::optimize`; the clip's norm, coefficient and
//! clipped counts are burn-train metrics (the dashboard with Burn's `tui` feature, the
//! metric logs under `target/learner_regression` in any case).
//!
//! It trains three ways from one seed on one device: no clipping, Burn's per-parameter
//! `Norm(1.0)`, and gradclip's global norm at 1.0, and prints each run's wall time (its
//! validation passes included) per training iteration.
//!
//! ```sh
//! cargo run --release -p gradclip-burn --example learner_regression [-- --epochs 3]
//! cargo run --release -p gradclip-burn --example learner_regression --features burn/tui
//! ```

use std::sync::Arc;
use std::time::Instant;

use burn::data::dataloader::batcher::Batcher;
use burn::data::dataloader::{DataLoader, DataLoaderBuilder};
use burn::data::dataset::InMemDataset;
use burn::grad_clipping::GradientClippingConfig;
use burn::lr_scheduler::module_lr_scheduler::ModuleLearningRate;
use burn::module::Module;
use burn::nn::{Linear, LinearConfig, Relu};
use burn::optim::{AdamConfig, GradientsParams, ModuleOptimizer};
use burn::tensor::{Device, Tensor, TensorData};
use burn::train::metric::LossMetric;
use burn::train::{
    InferenceStep, Learner, RegressionOutput, SupervisedTraining, TrainOutput, TrainStep,
};
use gradclip::{ClipPolicy, Rule};
use gradclip_burn::{ClipQuantity, LearnerClipper, SharedDevice};

const FEATURES: usize = 8;
const HIDDEN: usize = 64;
const BATCH: usize = 256;
const TRAIN: usize = 8192;
const VALID: usize = 1024;

// README: begin
#[derive(Module, Debug)]
struct Regression {
    input: Linear,
    output: Linear,
    activation: Relu,
    /// The clipper; `None` trains without gradclip.
    #[module(skip)]
    clip: Option<LearnerClipper>,
}

impl TrainStep for Regression {
    type Input = Batch;
    type Output = RegressionOutput;

    fn step(&self, batch: Batch) -> TrainOutput<RegressionOutput> {
        let item = self.forward(batch);
        TrainOutput::new(self, item.loss.backward(), item)
    }

    fn optimize(
        self,
        optim: &mut ModuleOptimizer,
        lr: ModuleLearningRate,
        grads: GradientsParams,
    ) -> Self {
        match self.clip.clone() {
            Some(clip) => clip.optimize(self, optim, lr, grads), // clip, then step
            None => optim.step(lr, self, grads),
        }
    }
}
// README: end

impl InferenceStep for Regression {
    type Input = Batch;
    type Output = RegressionOutput;

    fn step(&self, batch: Batch) -> RegressionOutput {
        self.forward(batch)
    }
}

impl Regression {
    fn new(device: &Device, clip: Option<LearnerClipper>) -> Regression {
        Regression {
            input: LinearConfig::new(FEATURES, HIDDEN).init(device),
            output: LinearConfig::new(HIDDEN, 1).init(device),
            activation: Relu::new(),
            clip,
        }
    }

    fn forward(&self, batch: Batch) -> RegressionOutput {
        let hidden = self.activation.forward(self.input.forward(batch.inputs));
        let output = self.output.forward(hidden);
        let loss = (output.clone() - batch.targets.clone())
            .powi_scalar(2)
            .mean();
        RegressionOutput::new(loss, output, batch.targets)
    }
}

/// One row: eight features and the target.
#[derive(Debug, Clone)]
struct Row {
    features: [f32; FEATURES],
    target: f32,
}

#[derive(Debug, Clone)]
struct Batch {
    inputs: Tensor<2>,
    targets: Tensor<2>,
}

#[derive(Clone)]
struct RowBatcher;

impl Batcher<Row, Batch> for RowBatcher {
    fn batch(&self, rows: Vec<Row>, device: &Device) -> Batch {
        let n = rows.len();
        let inputs: Vec<f32> = rows.iter().flat_map(|r| r.features).collect();
        let targets: Vec<f32> = rows.iter().map(|r| r.target).collect();
        Batch {
            inputs: Tensor::from_data(TensorData::new(inputs, [n, FEATURES]), device),
            targets: Tensor::from_data(TensorData::new(targets, [n, 1]), device),
        }
    }
}

/// Rows whose target is a fixed nonlinear function of the features plus noise, with a
/// few heavy-tailed rows (as house prices have) that make the gradients spike.
fn rows(n: usize, seed: u64) -> Vec<Row> {
    let mut s = seed;
    let mut next = || {
        s = s
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (s >> 40) as f32 / (1u64 << 24) as f32
    };
    (0..n)
        .map(|_| {
            let features: [f32; FEATURES] = std::array::from_fn(|_| next() * 4.0 - 2.0);
            let base: f32 = (features.iter().enumerate())
                .map(|(i, x)| (i as f32 + 1.0) * 0.3 * x * x.signum() * x.abs().sqrt())
                .sum();
            let spike = if next() < 0.01 { 40.0 } else { 1.0 };
            Row {
                features,
                target: base * spike + (next() - 0.5) * 0.1,
            }
        })
        .collect()
}

/// How one run clips.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Clip {
    None,
    BurnPerParameter,
    GradclipGlobal,
}

fn train(clip: Clip, shared: &SharedDevice, epochs: usize, dir: &str) -> (f64, usize) {
    let device = shared.autodiff();
    device.seed(7);
    let loader = |n, seed| -> Arc<dyn DataLoader<Batch>> {
        DataLoaderBuilder::new(RowBatcher)
            .batch_size(BATCH)
            .set_device(device.clone())
            .build(InMemDataset::new(rows(n, seed)))
    };
    let clipper = (clip == Clip::GradclipGlobal).then(|| {
        LearnerClipper::new(shared, ClipPolicy::new(Rule::GlobalNorm(1.0))).expect("a valid policy")
    });
    let mut optim = AdamConfig::new();
    if clip == Clip::BurnPerParameter {
        optim = optim.with_grad_clipping(Some(GradientClippingConfig::Norm(1.0)));
    }
    let model = Regression::new(&device, clipper.clone());
    let mut training = SupervisedTraining::new(dir, loader(TRAIN, 1), loader(VALID, 2))
        .metric_train_numeric(LossMetric::new())
        .metric_valid_numeric(LossMetric::new())
        .num_epochs(epochs)
        .with_application_logger(None);
    if let Some(clipper) = &clipper {
        for quantity in [
            ClipQuantity::NormBefore,
            ClipQuantity::NormAfter,
            ClipQuantity::Coefficient,
            ClipQuantity::ClippedUnits,
        ] {
            training = training.metric_train_numeric(clipper.metric(quantity));
        }
    }
    let start = Instant::now();
    let result = training.launch(Learner::new(model, optim.init(), 1e-3));
    let seconds = start.elapsed().as_secs_f64();
    if let Some(error) = result.error {
        panic!("training failed: {error}");
    }
    let iterations = epochs * TRAIN.div_ceil(BATCH);
    if let Some(clipper) = &clipper {
        let last = clipper.last_report().expect("a clipped step");
        println!(
            "gradclip: {} steps clipped, {} skipped, {} failed; last norm {:.4}, coefficient {:?}",
            clipper.steps(),
            clipper.skipped_steps(),
            clipper.failed_steps(),
            last.total_norm,
            last.coef
        );
        assert_eq!(clipper.steps() as usize, iterations);
    }
    (seconds, iterations)
}

fn main() {
    let mut epochs = 3;
    let mut rounds = 3;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = |default| args.next().and_then(|v| v.parse().ok()).unwrap_or(default);
        match arg.as_str() {
            "--epochs" => epochs = value(epochs),
            "--rounds" => rounds = value(rounds),
            other => panic!("unknown argument {other:?} (expected --epochs N, --rounds N)"),
        }
    }
    let shared = SharedDevice::init().expect("Burn's wgpu runtime");
    let clips = [Clip::None, Clip::BurnPerParameter, Clip::GradclipGlobal];
    // One untimed epoch each first (shader compilation), then the runs take turns, so
    // the machine's drift reaches all three alike.
    for clip in clips {
        train(clip, &shared, 1, "target/learner_regression/warm-up");
    }
    let mut ms = vec![vec![]; clips.len()];
    for _ in 0..rounds {
        for (i, clip) in clips.iter().enumerate() {
            let dir = format!("target/learner_regression/{clip:?}");
            let (seconds, iterations) = train(*clip, &shared, epochs, &dir);
            ms[i].push(seconds * 1e3 / iterations as f64);
        }
    }
    println!(
        "\ndevice: {} ({:?}); {epochs} epochs of {} iterations, {rounds} rounds",
        shared.setup().adapter.get_info().name,
        shared.setup().backend,
        TRAIN.div_ceil(BATCH)
    );
    println!("wall time per training iteration, validation included (median of the rounds):");
    let medians: Vec<f64> = (ms.iter_mut())
        .map(|times| {
            times.sort_by(f64::total_cmp);
            times[times.len() / 2]
        })
        .collect();
    for (clip, median) in clips.iter().zip(&medians) {
        let name = format!("{clip:?}");
        let ratio = median / medians[0];
        println!("  {name:<18} {median:>7.2} ms  ({ratio:.2}x no clipping)");
    }
    println!("metric logs: target/learner_regression/<run>/train/epoch-N/*.log");
}
