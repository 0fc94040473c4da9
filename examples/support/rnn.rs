//! The exploding-gradient experiment shared by `rnn_explode`, `threshold_search` and the
//! demo test: a vanilla RNN (input 5, hidden 30, output 1 read from the last step) whose
//! target is the sum over time of the mean input, trained with hand-written
//! backpropagation through time on the host, its gradients clipped on the GPU.
// Each user of this module takes part of it; the math indexes parallel arrays.
#![allow(dead_code, clippy::needless_range_loop)]

use gradclip::{Backend, ClipPolicy, Clipper, GpuContext, GradMonitor, GradMut, TensorInfo};

pub const INPUT: usize = 5;
pub const HIDDEN: usize = 30;
pub const BATCH: usize = 16;

/// Tensor names and shapes, in the order of [`Rnn::params`] and of the gradients.
pub const TENSORS: [(&str, &[u64]); 5] = [
    ("rnn.weight_ih", &[HIDDEN as u64, INPUT as u64]),
    ("rnn.weight_hh", &[HIDDEN as u64, HIDDEN as u64]),
    ("rnn.bias", &[HIDDEN as u64]),
    ("fc.weight", &[1, HIDDEN as u64]),
    ("fc.bias", &[1]),
];

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Activation {
    Tanh,
    Relu,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Optimizer {
    Sgd { lr: f64 },
    Adam { lr: f64 },
}

/// One experimental setting.
#[derive(Debug, Clone, Copy)]
pub struct Preset {
    pub name: &'static str,
    pub activation: Activation,
    pub seq_len: usize,
    /// Input and recurrent weights are drawn from uniform(-init, init).
    pub init: f64,
    pub optimizer: Optimizer,
    pub steps: usize,
}

impl Preset {
    /// The articles' setting: tanh, 100 steps of sequence, weights uniform(-1.5, 1.5), Adam.
    pub fn seeds() -> Preset {
        Preset {
            name: "seeds",
            activation: Activation::Tanh,
            seq_len: 100,
            init: 1.5,
            optimizer: Optimizer::Adam { lr: 0.01 },
            steps: 100,
        }
    }

    /// ReLU, sequence 20, weights uniform(-0.25, 0.25), plain SGD: clipping decides. The
    /// issue's PyTorch measurement used 300 steps; this reimplementation learns more slowly
    /// (one recurrent bias instead of two, its own data stream), so 1000 steps show it.
    pub fn relu_sgd() -> Preset {
        Preset {
            name: "relu-sgd",
            activation: Activation::Relu,
            seq_len: 20,
            init: 0.25,
            optimizer: Optimizer::Sgd { lr: 0.01 },
            steps: 1000,
        }
    }
}

/// SplitMix64: small, seedable, good enough for initialisation and data.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e3779b97f4a7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58476d1ce4e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d049bb133111eb);
        z ^ (z >> 31)
    }
    /// Uniform in [0, 1).
    pub fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
    pub fn symmetric(&mut self, a: f64) -> f64 {
        (2.0 * self.uniform() - 1.0) * a
    }
    /// Standard normal (Box-Muller).
    pub fn normal(&mut self) -> f64 {
        let u1 = 1.0 - self.uniform();
        let u2 = self.uniform();
        (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
    }
}

/// A batch: inputs `[batch][t][INPUT]` flattened, and targets.
#[derive(Debug, Clone)]
pub struct Batch {
    pub x: Vec<f64>,
    pub y: Vec<f64>,
    pub len: usize,
}

/// `n` sequences of standard normal inputs; target = sum over time of the mean input.
pub fn make_batch(rng: &mut Rng, n: usize, seq_len: usize) -> Batch {
    let x: Vec<f64> = (0..n * seq_len * INPUT).map(|_| rng.normal()).collect();
    let y = (0..n)
        .map(|b| {
            x[b * seq_len * INPUT..(b + 1) * seq_len * INPUT]
                .iter()
                .sum::<f64>()
                / INPUT as f64
        })
        .collect();
    Batch { x, y, len: n }
}

/// The model's parameters, flat and row-major, in [`TENSORS`] order.
#[derive(Debug, Clone, PartialEq)]
pub struct Rnn {
    pub params: [Vec<f64>; 5],
    pub activation: Activation,
    pub seq_len: usize,
}

impl Rnn {
    /// Input and recurrent weights from uniform(-init, init); biases and the output layer
    /// as PyTorch initialises them, uniform(-1/sqrt(hidden), 1/sqrt(hidden)).
    pub fn new(preset: &Preset, seed: u64) -> Rnn {
        let mut rng = Rng::new(seed);
        let k = 1.0 / (HIDDEN as f64).sqrt();
        let mut draw = |n: usize, a: f64| (0..n).map(|_| rng.symmetric(a)).collect::<Vec<f64>>();
        Rnn {
            params: [
                draw(HIDDEN * INPUT, preset.init),
                draw(HIDDEN * HIDDEN, preset.init),
                draw(HIDDEN, k),
                draw(HIDDEN, k),
                draw(1, k),
            ],
            activation: preset.activation,
            seq_len: preset.seq_len,
        }
    }

    fn act(&self, a: f64) -> f64 {
        match self.activation {
            Activation::Tanh => a.tanh(),
            Activation::Relu => a.max(0.0),
        }
    }

    /// d act / d a, from the activation's output `h`.
    fn act_grad(&self, h: f64) -> f64 {
        match self.activation {
            Activation::Tanh => 1.0 - h * h,
            Activation::Relu => (h > 0.0) as u8 as f64,
        }
    }

    /// Hidden states of one sequence, `[t + 1][HIDDEN]` with h_0 = 0.
    fn hidden_states(&self, x: &[f64]) -> Vec<[f64; HIDDEN]> {
        let [w_ih, w_hh, b, ..] = &self.params;
        let mut hs = vec![[0.0; HIDDEN]; self.seq_len + 1];
        for t in 0..self.seq_len {
            let xt = &x[t * INPUT..(t + 1) * INPUT];
            for i in 0..HIDDEN {
                let mut a = b[i];
                for j in 0..INPUT {
                    a += w_ih[i * INPUT + j] * xt[j];
                }
                for j in 0..HIDDEN {
                    a += w_hh[i * HIDDEN + j] * hs[t][j];
                }
                hs[t + 1][i] = self.act(a);
            }
        }
        hs
    }

    fn output(&self, h: &[f64; HIDDEN]) -> f64 {
        let [.., w_out, b_out] = &self.params;
        b_out[0] + (0..HIDDEN).map(|i| w_out[i] * h[i]).sum::<f64>()
    }

    /// Mean squared error over the batch.
    pub fn loss(&self, batch: &Batch) -> f64 {
        let per = self.seq_len * INPUT;
        (0..batch.len)
            .map(|b| {
                let hs = self.hidden_states(&batch.x[b * per..(b + 1) * per]);
                (self.output(&hs[self.seq_len]) - batch.y[b]).powi(2)
            })
            .sum::<f64>()
            / batch.len as f64
    }

    /// Loss and its gradient by backpropagation through time.
    pub fn loss_and_grads(&self, batch: &Batch) -> (f64, [Vec<f64>; 5]) {
        let [_, w_hh, _, w_out, _] = &self.params;
        let mut g = self.params.clone().map(|p| vec![0.0; p.len()]);
        let per = self.seq_len * INPUT;
        let mut loss = 0.0;
        for b in 0..batch.len {
            let x = &batch.x[b * per..(b + 1) * per];
            let hs = self.hidden_states(x);
            let err = self.output(&hs[self.seq_len]) - batch.y[b];
            loss += err * err / batch.len as f64;
            let dy = 2.0 * err / batch.len as f64;
            for i in 0..HIDDEN {
                g[3][i] += dy * hs[self.seq_len][i];
            }
            g[4][0] += dy;
            let mut dh: [f64; HIDDEN] = std::array::from_fn(|i| dy * w_out[i]);
            for t in (0..self.seq_len).rev() {
                let da: [f64; HIDDEN] =
                    std::array::from_fn(|i| dh[i] * self.act_grad(hs[t + 1][i]));
                let xt = &x[t * INPUT..(t + 1) * INPUT];
                for i in 0..HIDDEN {
                    for j in 0..INPUT {
                        g[0][i * INPUT + j] += da[i] * xt[j];
                    }
                    for j in 0..HIDDEN {
                        g[1][i * HIDDEN + j] += da[i] * hs[t][j];
                    }
                    g[2][i] += da[i];
                }
                dh = std::array::from_fn(|j| {
                    (0..HIDDEN).map(|i| w_hh[i * HIDDEN + j] * da[i]).sum()
                });
            }
        }
        (loss, g)
    }
}

/// Largest relative difference between the BPTT gradient and central finite differences,
/// over every parameter of a small model (sequence 6, batch 3).
pub fn finite_difference_error(activation: Activation, seed: u64) -> f64 {
    let preset = Preset {
        seq_len: 6,
        activation,
        init: 0.5,
        ..Preset::relu_sgd()
    };
    let mut model = Rnn::new(&preset, seed);
    let batch = make_batch(&mut Rng::new(seed + 1), 3, preset.seq_len);
    let (_, grads) = model.loss_and_grads(&batch);
    let eps = 1e-6;
    let mut worst = 0.0f64;
    for t in 0..5 {
        for i in 0..model.params[t].len() {
            let keep = model.params[t][i];
            model.params[t][i] = keep + eps;
            let up = model.loss(&batch);
            model.params[t][i] = keep - eps;
            let down = model.loss(&batch);
            model.params[t][i] = keep;
            let numeric = (up - down) / (2.0 * eps);
            let analytic = grads[t][i];
            worst =
                worst.max((numeric - analytic).abs() / (numeric.abs() + analytic.abs()).max(1e-3));
        }
    }
    worst
}

/// Adam (PyTorch defaults: betas 0.9, 0.999, eps 1e-8) or SGD over the five tensors.
#[derive(Debug, Clone)]
pub struct Trainer {
    optimizer: Optimizer,
    m: [Vec<f64>; 5],
    v: [Vec<f64>; 5],
    t: i32,
}

impl Trainer {
    pub fn new(optimizer: Optimizer, model: &Rnn) -> Trainer {
        let zeros = model.params.clone().map(|p| vec![0.0; p.len()]);
        Trainer {
            optimizer,
            m: zeros.clone(),
            v: zeros,
            t: 0,
        }
    }

    pub fn step(&mut self, model: &mut Rnn, grads: &[Vec<f64>; 5]) {
        self.t += 1;
        for k in 0..5 {
            for i in 0..grads[k].len() {
                let g = grads[k][i];
                model.params[k][i] -= match self.optimizer {
                    Optimizer::Sgd { lr } => lr * g,
                    Optimizer::Adam { lr } => {
                        self.m[k][i] = 0.9 * self.m[k][i] + 0.1 * g;
                        self.v[k][i] = 0.999 * self.v[k][i] + 0.001 * g * g;
                        let m = self.m[k][i] / (1.0 - 0.9f64.powi(self.t));
                        let v = self.v[k][i] / (1.0 - 0.999f64.powi(self.t));
                        lr * m / (v.sqrt() + 1e-8)
                    }
                };
            }
        }
    }
}

/// Clips the model's gradients on the GPU with a [`Clipper`]: it copies them into a
/// device buffer it planned once, runs the policy there and copies them back for the
/// host optimizer. The reports go to a [`GradMonitor`].
pub struct GpuClipper {
    clipper: Clipper,
    pub monitor: GradMonitor,
}

impl GpuClipper {
    pub fn new(ctx: &GpuContext, max_norm: f32) -> Result<GpuClipper, gradclip::ClipError> {
        let infos: Vec<TensorInfo> = (TENSORS.iter())
            .map(|(name, shape)| TensorInfo::new(*name, shape))
            .collect();
        let policy = ClipPolicy::global_norm(max_norm).with_group_report();
        Ok(GpuClipper {
            clipper: Clipper::new(Backend::Gpu(ctx.clone()), policy, &infos)?,
            monitor: GradMonitor::new(),
        })
    }

    /// Trains one copy (see [`train`]) with its gradients clipped here; the first
    /// clipping error is returned, and the monitor holds every step's report.
    pub fn train(&mut self, preset: &Preset, seed: u64) -> Result<History, gradclip::ClipError> {
        let mut failure = None;
        let history = train(preset, seed, |g| {
            if failure.is_none() {
                failure = self.clip(g).err();
            }
        });
        match failure {
            Some(e) => Err(e),
            None => Ok(history),
        }
    }

    /// Clips `grads` (in [`TENSORS`] order) in place on the GPU.
    pub fn clip(&mut self, grads: &mut [Vec<f64>; 5]) -> Result<(), gradclip::ClipError> {
        let mut f32s: Vec<Vec<f32>> = (grads.iter())
            .map(|g| g.iter().map(|&v| v as f32).collect())
            .collect();
        let mut views: Vec<GradMut<'_>> =
            f32s.iter_mut().map(|g| GradMut::from(&mut g[..])).collect();
        let report = self.clipper.step(&mut views, None)?;
        self.monitor.record(report);
        for (g, f) in grads.iter_mut().zip(&f32s) {
            for (v, &x) in g.iter_mut().zip(f) {
                *v = x as f64;
            }
        }
        Ok(())
    }
}

/// What one training run recorded.
#[derive(Debug, Clone, Default)]
pub struct History {
    /// Training loss per step.
    pub losses: Vec<f64>,
    /// Total gradient norm per step, before any clipping.
    pub norms: Vec<f64>,
    /// Loss on the held-out set after training.
    pub validation: f64,
}

/// Trains one copy from `seed` (the same data stream for every copy); `clip` rewrites the
/// gradients (or leaves them) before the optimizer step. Stops early once the loss is
/// not finite.
pub fn train(preset: &Preset, seed: u64, mut clip: impl FnMut(&mut [Vec<f64>; 5])) -> History {
    let mut model = Rnn::new(preset, seed);
    let mut trainer = Trainer::new(preset.optimizer, &model);
    let mut data = Rng::new(seed ^ 0x5eed);
    let mut history = History::default();
    for _ in 0..preset.steps {
        let batch = make_batch(&mut data, BATCH, preset.seq_len);
        let (loss, mut grads) = model.loss_and_grads(&batch);
        let norm = grads.iter().flatten().map(|g| g * g).sum::<f64>().sqrt();
        history.losses.push(loss);
        history.norms.push(norm);
        if !loss.is_finite() {
            break;
        }
        clip(&mut grads);
        trainer.step(&mut model, &grads);
    }
    let held_out = make_batch(&mut Rng::new(seed ^ 0xe7a1), 256, preset.seq_len);
    history.validation = model.loss(&held_out);
    history
}
