//! The exploding-gradient RNN of the seeds, written in Burn and trained three ways from one
//! seed on the same data: no clipping, Burn's own per-parameter norm clip at 1.0, and
//! gradclip's global-norm clip at 1.0 on Burn's device. Prints losses and norms, times
//! the steps, and writes the monitor's plots into `target/burn_rnn`.
//!
//! ```sh
//! cargo run --release -p gradclip-burn --example burn_rnn [-- --steps 300 --seed 42]
//! ```

use std::time::Instant;

use burn::grad_clipping::GradientClippingConfig;
use burn::module::{Module, Param};
use burn::nn::{Initializer, Linear, LinearConfig};
use burn::optim::{GradientsParams, ModuleOptimizer, SgdConfig};
use burn::tensor::{Device, Distribution, Tensor, TensorData};
use gradclip::{ClipPolicy, GradMonitor, Rule};
use gradclip_burn::{BurnClipper, SharedDevice};

const INPUT: usize = 5;
const HIDDEN: usize = 30;
const SEQ: usize = 20;
const BATCH: usize = 16;
const LR: f64 = 0.01;

/// A vanilla ReLU RNN, the output read from the last step.
#[derive(Module, Debug)]
struct Rnn {
    w_xh: Param<Tensor<2>>,
    w_hh: Param<Tensor<2>>,
    b_h: Param<Tensor<1>>,
    out: Linear,
}

impl Rnn {
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

    fn loss(&self, xs: Tensor<3>, y: Tensor<2>) -> Tensor<1> {
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
fn batch(step: usize, seed: u64, device: &Device) -> (Tensor<3>, Tensor<2>) {
    let mut s = seed ^ (step as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    let mut next = || {
        s = s
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    };
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

/// How a run clips.
enum Clip {
    None(ModuleOptimizer),
    Burn(ModuleOptimizer),
    Gradclip(Box<BurnClipper>, ModuleOptimizer),
}

struct Run {
    name: &'static str,
    clip: Clip,
    model: Option<Rnn>,
    losses: Vec<f64>,
    norms: Vec<f64>,
    step_ms: Vec<f64>,
    clip_ms: Vec<f64>,
    /// Host time of `BurnClipper::clip` alone: finding the gradients, planning, recording
    /// and submitting the step, not waiting for it.
    host_ms: Vec<f64>,
    monitor: GradMonitor,
}

/// Global L2 norm of the gradients, computed by Burn (the unclipped runs' norm column).
fn burn_norm(model: &Rnn, grads: &GradientsParams) -> f64 {
    let sq = |t: Option<Tensor<2>>| t.map_or(0.0, |t| t.powi_scalar(2).sum().into_scalar::<f64>());
    let sq1 = |t: Option<Tensor<1>>| t.map_or(0.0, |t| t.powi_scalar(2).sum().into_scalar::<f64>());
    (sq(grads.get(model.w_xh.id))
        + sq(grads.get(model.w_hh.id))
        + sq1(grads.get(model.b_h.id))
        + sq(grads.get(model.out.weight.id))
        + sq1(model.out.bias.as_ref().and_then(|b| grads.get(b.id))))
    .sqrt()
}

impl Run {
    fn new(name: &'static str, clip: Clip, init: &Rnn) -> Run {
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
        let (xs, y) = batch(step, seed, device);
        let start = Instant::now();
        let loss = model.loss(xs, y);
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
                let model = optim.step(LR, model, grads);
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
                let model = optim.step(LR, model, grads);
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

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let arg = |flag: &str, default: u64| {
        args.iter()
            .position(|a| a == flag)
            .and_then(|i| args.get(i + 1))
            .map_or(default, |v| v.parse().expect("a number"))
    };
    let steps = arg("--steps", 300) as usize;
    let seed = arg("--seed", 42);
    let shared = SharedDevice::init()?;
    println!("device: {:?}", shared);
    let device = shared.autodiff();
    device.seed(seed);
    let init = Rnn::new(&device);
    let policy = ClipPolicy::new(Rule::GlobalNorm(1.0)).with_group_report();
    let burn_clip =
        SgdConfig::new().with_gradient_clipping(Some(GradientClippingConfig::Norm(1.0)));
    let mut runs = [
        Run::new("no clipping", Clip::None(SgdConfig::new().init()), &init),
        Run::new(
            "Burn per-parameter norm 1.0",
            Clip::Burn(burn_clip.init()),
            &init,
        ),
        Run::new(
            "gradclip global norm 1.0",
            Clip::Gradclip(
                Box::new(BurnClipper::new(&shared, policy)?),
                SgdConfig::new().init(),
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
    println!("\nloss and global gradient norm before clipping, every {every} steps:");
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
    let dir = std::path::Path::new("target/burn_rnn");
    std::fs::create_dir_all(dir)?;
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
