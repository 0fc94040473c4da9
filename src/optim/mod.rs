//! Fused optimizer steps: what SGD and Adam / AdamW compute on one element, as
//! torch.optim defines them, with the arithmetic of `shaders/optimizer.wgsl` in the same
//! order (the CPU twin is the GPU's oracle). The GPU step is `src/gpu/optimizer.rs`, the
//! CPU step `src/cpu/optimizer.rs`; both clip the gradients as they read them and never
//! write them.

use crate::error::ClipError;
use crate::shaders::abi::{OptimizerParams, OPT_ADAM, OPT_SGD};

/// Stochastic gradient descent, as `torch.optim.SGD`: with weight decay `d = g + wd * p`;
/// with momentum `buf = momentum * buf + (1 - dampening) * d` (the first step taken sets
/// `buf = d`: torch's buffer is created there) and `d = buf`, or `d = d + momentum * buf` with Nesterov; then `p -= lr * d`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sgd {
    /// Learning rate (a step may override it: [`crate::GpuClipper<Optimize>::set_lr`]).
    pub lr: f32,
    /// Momentum factor in `[0, 1)`; 0: none (no state).
    pub momentum: f32,
    /// Dampening of the momentum, in `[0, 1]`.
    pub dampening: f32,
    /// Nesterov momentum (needs momentum > 0 and no dampening).
    pub nesterov: bool,
    /// L2 penalty added to the gradient.
    pub weight_decay: f32,
}

impl Sgd {
    /// Plain SGD with learning rate `lr`.
    pub fn new(lr: f32) -> Sgd {
        Sgd {
            lr,
            momentum: 0.0,
            dampening: 0.0,
            nesterov: false,
            weight_decay: 0.0,
        }
    }

    /// With momentum `momentum`.
    pub fn momentum(self, momentum: f32) -> Sgd {
        Sgd { momentum, ..self }
    }

    /// With dampening `dampening` of the momentum.
    pub fn dampening(self, dampening: f32) -> Sgd {
        Sgd { dampening, ..self }
    }

    /// With Nesterov momentum.
    pub fn nesterov(self) -> Sgd {
        Sgd {
            nesterov: true,
            ..self
        }
    }

    /// With L2 weight decay `weight_decay`.
    pub fn weight_decay(self, weight_decay: f32) -> Sgd {
        Sgd {
            weight_decay,
            ..self
        }
    }
}

/// Adam, as `torch.optim.Adam` and `torch.optim.AdamW`: `m = lerp(m, g, 1 - beta1)`,
/// `v = beta2 * v + (1 - beta2) * g^2`, `p -= lr / (1 - beta1^t) * m / (sqrt(v) /
/// sqrt(1 - beta2^t) + eps)`, with `t` the number of steps taken. Weight decay is added
/// to the gradient (Adam) or decays the parameters first, `p *= 1 - lr * wd` (AdamW,
/// `decoupled`). With amsgrad the running maximum of `v` takes its place.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Adam {
    /// Learning rate (a step may override it: [`crate::GpuClipper<Optimize>::set_lr`]).
    pub lr: f32,
    /// Decay rates of the first and second moments, each in `[0, 1)`.
    pub betas: (f32, f32),
    /// Added to the denominator, >= 0.
    pub eps: f32,
    /// Weight decay, >= 0.
    pub weight_decay: f32,
    /// Decoupled weight decay (AdamW).
    pub decoupled: bool,
    /// Use the running maximum of the second moment.
    pub amsgrad: bool,
}

impl Adam {
    /// Adam with torch's defaults: betas (0.9, 0.999), eps 1e-8, no weight decay.
    pub fn new(lr: f32) -> Adam {
        Adam {
            lr,
            betas: (0.9, 0.999),
            eps: 1e-8,
            weight_decay: 0.0,
            decoupled: false,
            amsgrad: false,
        }
    }

    /// AdamW with torch's defaults: betas (0.9, 0.999), eps 1e-8, weight decay 0.01.
    pub fn adamw(lr: f32) -> Adam {
        Adam {
            weight_decay: 0.01,
            decoupled: true,
            ..Adam::new(lr)
        }
    }

    /// With moment decay rates `beta1`, `beta2`.
    pub fn betas(self, beta1: f32, beta2: f32) -> Adam {
        Adam {
            betas: (beta1, beta2),
            ..self
        }
    }

    /// With `eps` in the denominator.
    pub fn eps(self, eps: f32) -> Adam {
        Adam { eps, ..self }
    }

    /// With weight decay `weight_decay` (added to the gradient for Adam, decoupled for
    /// AdamW).
    pub fn weight_decay(self, weight_decay: f32) -> Adam {
        Adam {
            weight_decay,
            ..self
        }
    }

    /// With the amsgrad variant.
    pub fn amsgrad(self) -> Adam {
        Adam {
            amsgrad: true,
            ..self
        }
    }
}

/// An optimizer a fused step can run.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Optimizer {
    /// [`Sgd`].
    Sgd(Sgd),
    /// [`Adam`] or AdamW.
    Adam(Adam),
}

impl From<Sgd> for Optimizer {
    fn from(s: Sgd) -> Self {
        Optimizer::Sgd(s)
    }
}

impl From<Adam> for Optimizer {
    fn from(a: Adam) -> Self {
        Optimizer::Adam(a)
    }
}

fn bad(what: &str, value: f32, want: &str) -> ClipError {
    ClipError::InvalidConfig(format!("optimizer {what} is {value}; it must be {want}"))
}

/// Checks a learning rate (also one set for a single step).
pub(crate) fn check_lr(lr: f32) -> Result<(), ClipError> {
    if lr.is_finite() && lr >= 0.0 {
        Ok(())
    } else {
        Err(bad("learning rate", lr, "finite and >= 0"))
    }
}

impl Optimizer {
    /// The same optimizer with learning rate `lr`.
    pub(crate) fn with_lr(self, lr: f32) -> Optimizer {
        match self {
            Optimizer::Sgd(s) => Optimizer::Sgd(Sgd { lr, ..s }),
            Optimizer::Adam(a) => Optimizer::Adam(Adam { lr, ..a }),
        }
    }

    /// The configured learning rate.
    pub fn lr(&self) -> f32 {
        match self {
            Optimizer::Sgd(s) => s.lr,
            Optimizer::Adam(a) => a.lr,
        }
    }

    /// Checks every hyperparameter as torch.optim does.
    pub(crate) fn check(&self) -> Result<(), ClipError> {
        check_lr(self.lr())?;
        let unit = |what, v: f32, closed: bool| {
            let ok = v >= 0.0 && if closed { v <= 1.0 } else { v < 1.0 };
            if ok {
                Ok(())
            } else {
                Err(bad(what, v, if closed { "in [0, 1]" } else { "in [0, 1)" }))
            }
        };
        let non_negative = |what, v: f32| {
            if v.is_finite() && v >= 0.0 {
                Ok(())
            } else {
                Err(bad(what, v, "finite and >= 0"))
            }
        };
        match self {
            Optimizer::Sgd(s) => {
                unit("momentum", s.momentum, false)?;
                unit("dampening", s.dampening, true)?;
                non_negative("weight decay", s.weight_decay)?;
                if s.nesterov && (s.momentum == 0.0 || s.dampening != 0.0) {
                    return Err(ClipError::InvalidConfig(
                        "Nesterov momentum needs a momentum above 0 and no dampening".into(),
                    ));
                }
            }
            Optimizer::Adam(a) => {
                unit("beta1", a.betas.0, false)?;
                unit("beta2", a.betas.1, false)?;
                non_negative("eps", a.eps)?;
                non_negative("weight decay", a.weight_decay)?;
            }
        }
        Ok(())
    }

    /// f32 state arrays per element: the momentum buffer; m and v; and vmax.
    pub(crate) fn state_arrays(&self) -> usize {
        match self {
            Optimizer::Sgd(s) => (s.momentum != 0.0) as usize,
            Optimizer::Adam(a) => 2 + a.amsgrad as usize,
        }
    }

    /// The hyperparameters as the shader reads them; each complement is computed once,
    /// in f64 from the f32 value, and rounded (torch takes it from a Python float, so a
    /// beta of 0.9 gives 0.1 there and 0.10000002 here: an ulp-level difference).
    pub(crate) fn params(&self) -> OptimizerParams {
        let complement = |x: f32| (1.0 - x as f64) as f32;
        match *self {
            Optimizer::Sgd(s) => OptimizerParams {
                kind: OPT_SGD,
                weight_decay: s.weight_decay,
                momentum: s.momentum,
                undamped: complement(s.dampening),
                nesterov: s.nesterov as u32,
                ..OptimizerParams::default()
            },
            Optimizer::Adam(a) => OptimizerParams {
                kind: OPT_ADAM,
                weight_decay: a.weight_decay,
                beta1: a.betas.0,
                beta2: a.betas.1,
                one_minus_beta1: complement(a.betas.0),
                one_minus_beta2: complement(a.betas.1),
                eps: a.eps,
                decoupled: a.decoupled as u32,
                amsgrad: a.amsgrad as u32,
                ..OptimizerParams::default()
            },
        }
    }

    /// AdamW's per-step decay factor `1 - lr * wd`, rounded once from f64.
    pub(crate) fn decay(&self, lr: f32) -> f32 {
        match self {
            Optimizer::Adam(a) if a.decoupled => (1.0 - lr as f64 * a.weight_decay as f64) as f32,
            _ => 1.0,
        }
    }
}

/// `b^t` by squaring, in f32 (the shader's `power`).
pub(crate) fn power(b: f32, t: u32) -> f32 {
    let (mut result, mut base, mut e) = (1.0f32, b, t);
    loop {
        if e & 1 != 0 {
            result *= base;
        }
        e >>= 1;
        if e == 0 {
            return result;
        }
        base *= base;
    }
}

/// What one step of the optimizer uses besides its elements: `tick`'s output.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Tick {
    /// Steps taken, this one included.
    pub steps: u32,
    pub lr: f32,
    pub decay: f32,
    pub step_size: f32,
    pub bias2_sqrt: f32,
}

impl Tick {
    /// The scalars of step number `steps` (1 for the first) with learning rate `lr`.
    pub(crate) fn new(opt: &OptimizerParams, steps: u32, lr: f32, decay: f32) -> Tick {
        Tick {
            steps,
            lr,
            decay,
            step_size: lr / (1.0 - power(opt.beta1, steps)),
            bias2_sqrt: (1.0 - power(opt.beta2, steps)).sqrt(),
        }
    }
}

/// `sgd` of the shader: the new parameter; `buf` is the momentum buffer (unused without
/// momentum).
#[inline(always)]
pub(crate) fn sgd(opt: &OptimizerParams, t: &Tick, p: f32, g: f32, buf: &mut f32) -> f32 {
    let mut d = g;
    if opt.weight_decay != 0.0 {
        d += opt.weight_decay * p;
    }
    if opt.momentum != 0.0 {
        let b = if t.steps != 1 {
            *buf * opt.momentum + opt.undamped * d
        } else {
            d
        };
        *buf = b;
        d = if opt.nesterov == 1 {
            d + opt.momentum * b
        } else {
            b
        };
    }
    p - t.lr * d
}

/// `adam` of the shader: the new parameter; `m`, `v`, `vmax` are the element's state
/// (`vmax` unused without amsgrad).
#[inline(always)]
pub(crate) fn adam(
    opt: &OptimizerParams,
    t: &Tick,
    p: f32,
    g: f32,
    (m, v, vmax): (&mut f32, &mut f32, &mut f32),
) -> f32 {
    let (mut x, mut d) = (p, g);
    if opt.weight_decay != 0.0 {
        if opt.decoupled == 1 {
            x *= t.decay;
        } else {
            d += opt.weight_decay * x;
        }
    }
    // torch's lerp(m, d, w): from the nearer end.
    let w = opt.one_minus_beta1;
    let m_new = if w < 0.5 {
        *m + w * (d - *m)
    } else {
        d - (d - *m) * (1.0 - w)
    };
    let v_new = *v * opt.beta2 + opt.one_minus_beta2 * d * d;
    *m = m_new;
    *v = v_new;
    let mut vv = v_new;
    if opt.amsgrad == 1 {
        vv = vmax.max(v_new);
        *vmax = vv;
    }
    let denom = vv.sqrt() / t.bias2_sqrt + opt.eps;
    x - t.step_size * m_new / denom
}

/// The optimizer state of every tensor, to save and restore (either backend): the steps
/// taken and, per tensor, its state arrays (SGD: the momentum buffer if any; Adam: m and
/// v, then vmax with amsgrad), each as long as the tensor. A state with `steps` 0 starts
/// afresh: SGD's next step sets its momentum buffers to the gradients, as torch does for
/// buffers it has not created yet.
///
/// Restoring checks the state against the optimizer and tensors it is restored into (the
/// optimizer's kind and hyperparameters, its learning rate aside; the arrays and their
/// lengths) and its values (every moment finite, Adam's second moments >= 0): anything
/// else is [`ClipError::InvalidState`] and changes nothing.
#[derive(Debug, Clone, PartialEq)]
pub struct OptimizerState {
    /// The optimizer the state belongs to: its kind and hyperparameters are checked when
    /// the state is restored, its learning rate is not (a schedule changes it).
    pub optimizer: Optimizer,
    /// Steps taken (held steps are not counted): Adam's `t`. It stops at `u32::MAX`
    /// rather than wrap to 0, where the bias correction would divide by zero.
    pub steps: u32,
    /// `arrays[k][tensor]`: state array `k` of each tensor.
    pub arrays: Vec<Vec<Vec<f32>>>,
}

impl OptimizerState {
    /// A fresh state for `opt` over tensors of lengths `lens`.
    pub(crate) fn fresh(opt: &Optimizer, lens: &[u64]) -> OptimizerState {
        let tensors: Vec<Vec<f32>> = lens.iter().map(|&n| vec![0.0; n as usize]).collect();
        OptimizerState {
            optimizer: *opt,
            steps: 0,
            arrays: vec![tensors; opt.state_arrays()],
        }
    }

    /// Checks that this state belongs to `opt` over tensors of lengths `lens` (its
    /// arrays and their lengths) and that its values are in their domain.
    pub(crate) fn check_fits(&self, opt: &Optimizer, lens: &[u64]) -> Result<(), ClipError> {
        let bad = |why: String| Err(ClipError::InvalidState(why));
        if self.optimizer.with_lr(0.0) != opt.with_lr(0.0) {
            return bad(format!(
                "the optimizer state is of {:?}, this runner's optimizer is {:?} (the learning \
                 rate aside)",
                self.optimizer, opt
            ));
        }
        let fits = self.arrays.len() == opt.state_arrays()
            && (self.arrays.iter()).all(|a| {
                a.len() == lens.len() && a.iter().zip(lens).all(|(v, &n)| v.len() as u64 == n)
            });
        if !fits {
            return bad("the optimizer state does not fit this optimizer and these tensors".into());
        }
        for (k, array) in self.arrays.iter().enumerate() {
            // Adam's arrays after the first (v, vmax) are second moments.
            let second = matches!(opt, Optimizer::Adam(_)) && k > 0;
            for (t, values) in array.iter().enumerate() {
                let out = |x: &f32| !x.is_finite() || (second && *x < 0.0);
                if let Some(i) = values.iter().position(out) {
                    let what = if second {
                        "a second moment must be finite and >= 0"
                    } else {
                        "a moment must be finite"
                    };
                    return bad(format!(
                        "state array {k} of tensor #{t} holds {} at {i}: {what}",
                        values[i]
                    ));
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn power_is_exact_for_small_exponents() {
        assert_eq!(power(0.5, 0), 1.0);
        assert_eq!(power(0.5, 10), 1.0 / 1024.0);
        assert_eq!(power(0.9, 1), 0.9);
        assert_eq!(power(0.9, 2), 0.9f32 * 0.9f32);
        assert_eq!(power(0.9, 3), 0.9f32 * (0.9f32 * 0.9f32));
    }

    #[test]
    fn bad_hyperparameters_are_rejected() {
        assert!(Optimizer::from(Sgd::new(-1.0)).check().is_err());
        assert!(Optimizer::from(Sgd::new(0.1).nesterov()).check().is_err());
        assert!(
            Optimizer::from(Sgd::new(0.1).momentum(0.9).dampening(0.1).nesterov())
                .check()
                .is_err()
        );
        assert!(Optimizer::from(Sgd::new(0.1).momentum(1.0))
            .check()
            .is_err());
        assert!(Optimizer::from(Adam::new(0.1).betas(1.0, 0.9))
            .check()
            .is_err());
        assert!(Optimizer::from(Adam::new(f32::NAN)).check().is_err());
        assert!(Optimizer::from(Adam::new(0.1).eps(-1.0)).check().is_err());
        assert!(Optimizer::from(Adam::adamw(1e-3).amsgrad()).check().is_ok());
        assert!(Optimizer::from(Sgd::new(0.1).momentum(0.9).nesterov())
            .check()
            .is_ok());
    }
}
