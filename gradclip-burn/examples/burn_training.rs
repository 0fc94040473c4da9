//! A model written in Burn, trained three ways from one seed on the same data: no
//! clipping, Burn's own per-parameter norm clip at 1.0, and gradclip's global-norm clip at
//! 1.0 on Burn's device. `--model rnn` (the default) is the exploding-gradient RNN of the
//! seeds; `--model cnn` is the CNN of Burn's guide (`examples/custom-training-loop`: two
//! 3x3 convolutions, adaptive pooling, dropout, two linear layers, batches of 64 MNIST-sized
//! images, Adam at 1e-4), on synthetic images. Prints losses and norms, times the steps
//! (gradclip's share, and the host time of its call), and writes the monitor's plots into
//! `target/burn_training/<model>`.
//!
//! ```sh
//! cargo run --release -p gradclip-burn --example burn_training [-- --model cnn --steps 300 --seed 42]
//! ```

use std::time::Instant;

use burn::grad_clipping::GradientClippingConfig;
use burn::module::{Module, ModuleVisitor, Param};
use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::nn::loss::CrossEntropyLossConfig;
use burn::nn::pool::{AdaptiveAvgPool2d, AdaptiveAvgPool2dConfig};
use burn::nn::{Dropout, DropoutConfig, Initializer, Linear, LinearConfig, Relu};
use burn::optim::{AdamConfig, GradientsParams, ModuleOptimizer, SgdConfig};
use burn::tensor::{Device, Distribution, Int, Tensor, TensorData};
use gradclip::{ClipPolicy, GradMonitor, Rule};
use gradclip_burn::{BurnClipper, SharedDevice};

/// What the harness needs of a model: its weights, a batch, its loss and its optimizer.
trait Model: Module + Sized {
    type Batch;
    fn new(device: &Device) -> Self;
    fn batch(step: usize, seed: u64, device: &Device) -> Self::Batch;
    fn loss(&self, batch: Self::Batch) -> Tensor<1>;
    /// The optimizer of the model's recipe, with Burn's own clipping or without.
    fn optimizer(clip: Option<GradientClippingConfig>) -> ModuleOptimizer;
    /// The learning rate of the model's recipe.
    const LR: f64;
}

/// The RNN's sizes.
const INPUT: usize = 5;
const HIDDEN: usize = 30;
const SEQ: usize = 20;
const BATCH: usize = 16;

/// A stream of uniform(-1, 1) numbers for batch `step` of `seed`.
fn uniform(seed: u64, step: usize) -> impl FnMut() -> f32 {
    let mut s = seed ^ (step as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    move || {
        s = s
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }
}

/// A vanilla ReLU RNN, the output read from the last step.
#[derive(Module, Debug)]
struct Rnn {
    w_xh: Param<Tensor<2>>,
    w_hh: Param<Tensor<2>>,
    b_h: Param<Tensor<1>>,
    out: Linear,
}

impl Model for Rnn {
    type Batch = (Tensor<3>, Tensor<2>);
    const LR: f64 = 0.01;

    fn new(device: &Device) -> Rnn {
        let uniform = |shape: [usize; 2]| {
            Param::from_tensor(Tensor::random(
                shape,
                Distribution::Uniform(-0.25, 0.25),
                device,
            ))
        };
        Rnn {
            w_xh: uniform([INPUT, HIDDEN]),
            w_hh: uniform([HIDDEN, HIDDEN]),
            b_h: Param::from_tensor(Tensor::zeros([HIDDEN], device)),
            out: LinearConfig::new(HIDDEN, 1)
                .with_initializer(Initializer::Uniform {
                    min: -0.25,
                    max: 0.25,
                })
                .init(device),
        }
    }

    fn batch(step: usize, seed: u64, device: &Device) -> Self::Batch {
        rnn_batch(step, seed, device)
    }

    fn optimizer(clip: Option<GradientClippingConfig>) -> ModuleOptimizer {
        SgdConfig::new().with_gradient_clipping(clip).init()
    }

    fn loss(&self, (xs, y): Self::Batch) -> Tensor<1> {
        let [time, batch, _] = xs.dims();
        let mut h = Tensor::<2>::zeros([batch, HIDDEN], &xs.device());
        for t in 0..time {
            let x = xs.clone().narrow(0, t, 1).reshape([batch, INPUT]);
            let pre = x.matmul(self.w_xh.val()) + h.matmul(self.w_hh.val());
            h = burn::tensor::activation::relu(pre + self.b_h.val().unsqueeze());
        }
        (self.out.forward(h) - y).powi_scalar(2).mean()
    }
}

/// One batch: inputs uniform(-1, 1), target the sum over time of the mean input.
fn rnn_batch(step: usize, seed: u64, device: &Device) -> (Tensor<3>, Tensor<2>) {
    let mut next = uniform(seed, step);
    let xs: Vec<f32> = (0..SEQ * BATCH * INPUT).map(|_| next()).collect();
    let y: Vec<f32> = (0..BATCH)
        .map(|b| {
            (0..SEQ)
                .map(|t| {
                    (0..INPUT)
                        .map(|i| xs[(t * BATCH + b) * INPUT + i])
                        .sum::<f32>()
                        / INPUT as f32
                })
                .sum()
        })
        .collect();
    (
        Tensor::from_data(TensorData::new(xs, [SEQ, BATCH, INPUT]), device),
        Tensor::from_data(TensorData::new(y, [BATCH, 1]), device),
    )
}

/// The CNN of Burn's guide: 28x28 images, ten classes.
#[derive(Module, Debug)]
struct Cnn {
    conv1: Conv2d,
    conv2: Conv2d,
    pool: AdaptiveAvgPool2d,
    dropout: Dropout,
    linear1: Linear,
    linear2: Linear,
    activation: Relu,
}

/// The guide's batch size.
const IMAGES: usize = 64;

impl Model for Cnn {
    type Batch = (Tensor<3>, Tensor<1, Int>);
    const LR: f64 = 1e-4;

    fn new(device: &Device) -> Cnn {
        Cnn {
            conv1: Conv2dConfig::new([1, 8], [3, 3]).init(device),
            conv2: Conv2dConfig::new([8, 16], [3, 3]).init(device),
            pool: AdaptiveAvgPool2dConfig::new([8, 8]).init(),
            dropout: DropoutConfig::new(0.5).init(),
            linear1: LinearConfig::new(16 * 8 * 8, 512).init(device),
            linear2: LinearConfig::new(512, 10).init(device),
            activation: Relu::new(),
        }
    }

    /// Images of uniform noise plus a bright square whose place is the label.
    fn batch(step: usize, seed: u64, device: &Device) -> Self::Batch {
        let mut next = uniform(seed, step);
        let labels: Vec<i64> = (0..IMAGES)
            .map(|_| ((next() + 1.0) * 5.0) as i64 % 10)
            .collect();
        let mut pixels: Vec<f32> = (0..IMAGES * 28 * 28).map(|_| next() * 0.5).collect();
        for (i, &label) in labels.iter().enumerate() {
            let (row, col) = (2 + (label as usize / 5) * 12, 2 + (label as usize % 5) * 5);
            for r in row..row + 4 {
                for c in col..col + 4 {
                    pixels[i * 784 + r * 28 + c] += 2.0;
                }
            }
        }
        (
            Tensor::from_data(TensorData::new(pixels, [IMAGES, 28, 28]), device),
            Tensor::from_data(TensorData::new(labels, [IMAGES]), device),
        )
    }

    fn optimizer(clip: Option<GradientClippingConfig>) -> ModuleOptimizer {
        AdamConfig::new().with_grad_clipping(clip).init()
    }

    fn loss(&self, (images, labels): Self::Batch) -> Tensor<1> {
        let [batch, height, width] = images.dims();
        let x = images.reshape([batch, 1, height, width]);
        let x = self
            .activation
            .forward(self.dropout.forward(self.conv1.forward(x)));
        let x = self
            .activation
            .forward(self.dropout.forward(self.conv2.forward(x)));
        let x = self.pool.forward(x).reshape([batch, 16 * 8 * 8]);
        let x = self
            .activation
            .forward(self.dropout.forward(self.linear1.forward(x)));
        let logits = self.linear2.forward(x);
        CrossEntropyLossConfig::new()
            .init(&logits.device())
            .forward(logits, labels)
    }
}

/// How a run clips.
enum Clip {
    None(ModuleOptimizer),
    Burn(ModuleOptimizer),
    Gradclip(Box<BurnClipper>, ModuleOptimizer),
}

struct Run<M> {
    name: &'static str,
    clip: Clip,
    model: Option<M>,
    losses: Vec<f64>,
    norms: Vec<f64>,
    step_ms: Vec<f64>,
    clip_ms: Vec<f64>,
    /// Host time of `BurnClipper::clip` alone: finding the gradients, planning, recording
    /// and submitting the step, not waiting for it.
    host_ms: Vec<f64>,
    monitor: GradMonitor,
}

/// Global L2 norm of a module's gradients, computed by Burn (the unclipped runs' column).
fn burn_norm<M: Module>(model: &M, grads: &GradientsParams) -> f64 {
    struct SumSquares<'a>(&'a GradientsParams, f64);
    impl ModuleVisitor for SumSquares<'_> {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            if let Some(g) = self.0.get::<D>(param.id) {
                self.1 += g.powi_scalar(2).sum().into_scalar::<f64>();
            }
        }
    }
    let mut sum = SumSquares(grads, 0.0);
    model.visit(&mut sum);
    sum.1.sqrt()
}

impl<M: Model + Clone> Run<M> {
    fn new(name: &'static str, clip: Clip, init: &M) -> Run<M> {
        Run {
            name,
            clip,
            model: Some(init.clone()),
            losses: vec![],
            norms: vec![],
            step_ms: vec![],
            clip_ms: vec![],
            host_ms: vec![],
            monitor: GradMonitor::new(),
        }
    }

    /// One training step on batch `step`, ended on the device.
    fn step(&mut self, step: usize, seed: u64, device: &Device) {
        let model = self.model.take().expect("a model between steps");
        let batch = M::batch(step, seed, device);
        let start = Instant::now();
        let loss = model.loss(batch);
        let loss_value = loss.clone().into_scalar::<f64>();
        let mut grads = GradientsParams::from_grads(loss.backward(), &model);
        // The backward pass ends on the device in every run, so the clip is timed alone.
        device.sync().expect("device");
        let backward = start.elapsed();
        let update = match &mut self.clip {
            Clip::None(optim) | Clip::Burn(optim) => {
                // The norm column, untimed: Burn computes it before the update.
                self.norms.push(burn_norm(&model, &grads));
                let start = Instant::now();
                let model = optim.step(M::LR, model, grads);
                device.sync().expect("device");
                (model, start.elapsed())
            }
            Clip::Gradclip(clipper, optim) => {
                let start = Instant::now();
                let report = clipper.clip(&model, &mut grads).expect("gradclip step");
                self.host_ms.push(start.elapsed().as_secs_f64() * 1e3);
                let report = report.wait().expect("gradclip report");
                self.clip_ms.push(start.elapsed().as_secs_f64() * 1e3);
                self.norms.push(report.total_norm);
                self.monitor.record(report);
                let model = optim.step(M::LR, model, grads);
                device.sync().expect("device");
                (model, start.elapsed())
            }
        };
        let (model, update_time) = update;
        self.step_ms
            .push((backward + update_time).as_secs_f64() * 1e3);
        self.losses.push(loss_value);
        self.model = Some(model);
    }
}

fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

fn train<M: Model + Clone>(
    name: &str,
    shared: &SharedDevice,
    steps: usize,
    seed: u64,
) -> Result<(), Box<dyn std::error::Error>> {
    let device = shared.autodiff();
    device.seed(seed);
    let init = M::new(&device);
    let policy = ClipPolicy::new(Rule::GlobalNorm(1.0)).with_group_report();
    let norm = Some(GradientClippingConfig::Norm(1.0));
    let mut runs = [
        Run::new("no clipping", Clip::None(M::optimizer(None)), &init),
        Run::new(
            "Burn per-parameter norm 1.0",
            Clip::Burn(M::optimizer(norm)),
            &init,
        ),
        Run::new(
            "gradclip global norm 1.0",
            Clip::Gradclip(
                Box::new(BurnClipper::new(shared, policy)?),
                M::optimizer(None),
            ),
            &init,
        ),
    ];
    // The runs take turns step by step, so the machine's drift reaches all three alike.
    for step in 0..steps {
        for run in &mut runs {
            run.step(step, seed, &device);
        }
    }
    // About ten rows.
    let every = 10 * steps.div_ceil(100).max(1);
    println!("\n{name}: loss and global gradient norm before clipping, every {every} steps:");
    for step in (0..steps).step_by(every) {
        let cells: Vec<String> = runs
            .iter()
            .map(|r| format!("{:>10.4} {:>10.3e}", r.losses[step], r.norms[step]))
            .collect();
        println!("step {step:>4}  {}", cells.join("  |"));
    }
    println!();
    for r in &runs {
        let tail = &r.losses[steps.saturating_sub(50)..];
        let mean = tail.iter().sum::<f64>() / tail.len() as f64;
        let max_norm = r.norms.iter().cloned().fold(0.0, f64::max);
        print!(
            "{:<30} mean loss of the last 50 steps {:>9.4}, max norm {:>9.3e}, step {:>7.2} ms (median)",
            r.name,
            mean,
            max_norm,
            median(&r.step_ms)
        );
        if r.clip_ms.is_empty() {
            println!();
        } else {
            let share = median(&r.clip_ms) / median(&r.step_ms);
            println!(
                ", of which the clip {:.2} ms ({:.0}%; {:.3} ms of it host time to record and submit)",
                median(&r.clip_ms),
                share * 100.0,
                median(&r.host_ms)
            );
        }
    }
    if let Clip::Gradclip(clipper, _) = &runs[2].clip {
        println!(
            "gradclip moved its plan {} times and copied {} gradients",
            clipper.moves(),
            clipper.copies()
        );
    }
    let dir = std::path::Path::new("target/burn_training").join(name);
    std::fs::create_dir_all(&dir)?;
    let monitor = &runs[2].monitor;
    monitor.plot_norms(dir.join("clipped_norms.png"), true)?;
    monitor.plot_layers(dir.join("layers.png"), true)?;
    monitor.write_csv(dir.join("steps.csv"))?;
    println!(
        "\nwrote {}/clipped_norms.png, layers.png and steps.csv",
        dir.display()
    );
    Ok(())
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let arg = |flag: &str| {
        args.iter()
            .position(|a| a == flag)
            .and_then(|i| args.get(i + 1))
            .cloned()
    };
    let number =
        |flag: &str, default: u64| arg(flag).map_or(default, |v| v.parse().expect("a number"));
    let steps = number("--steps", 300) as usize;
    let seed = number("--seed", 42);
    let shared = SharedDevice::init()?;
    println!("device: {:?}", shared);
    match arg("--model").as_deref().unwrap_or("rnn") {
        "rnn" => train::<Rnn>("rnn", &shared, steps, seed),
        "cnn" => train::<Cnn>("cnn", &shared, steps, seed),
        other => Err(format!("unknown --model {other:?} (rnn or cnn)").into()),
    }
}
