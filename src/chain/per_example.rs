//! Per-example clipping for differentially private SGD (Opacus, DP-SGD).

use crate::error::ClipError;

/// The clipping thresholds of [`PerExampleClip`].
#[derive(Debug, Clone, PartialEq)]
pub enum ExampleThreshold {
    /// One norm per example over all tensors ("flat" clipping) with threshold C.
    Flat(f32),
    /// One norm per example and tensor, each tensor with its own threshold C_t; the
    /// noise uses C = sqrt(sum C_t^2), as Opacus does.
    PerLayer(Vec<f32>),
}

/// DP-SGD clipping: gradients laid out `[batch, P_t]` per tensor; each example i gets
/// `f_i = min(C / (n_i + 1e-6), 1)` from its own norm `n_i`; the output is
/// `(sum_i f_i * g_i + N(0, (noise_multiplier * C)^2)) / divisor` per element, with
/// `divisor` the expected batch size when given (else 1). Noise comes from Philox4x32-10
/// keyed by (seed, step), counter (element / 4, tensor, step), as [`crate::GaussianNoise`].
#[derive(Debug, Clone, PartialEq)]
pub struct PerExampleClip {
    /// Batch size: every tensor's length must be a multiple of it.
    pub batch: u32,
    /// Clipping thresholds.
    pub threshold: ExampleThreshold,
    /// Noise multiplier sigma (the noise std is sigma * C); 0 for none.
    pub noise_multiplier: f32,
    /// Noise seed.
    pub seed: u64,
    /// Divide the sum by this expected batch size (Poisson sampling); `None`: no division.
    pub expected_batch_size: Option<f32>,
    /// Also report, per tensor, how many examples were clipped
    /// ([`crate::ClipReport::clipped_per_tensor`]); on the GPU this reads every
    /// (example, tensor) coefficient back.
    pub report_layers: bool,
}

impl PerExampleClip {
    /// Flat clipping of `batch` examples to norm `max_norm`, no noise, no division.
    pub fn new(batch: u32, max_norm: f32) -> Self {
        PerExampleClip {
            batch,
            threshold: ExampleThreshold::Flat(max_norm),
            noise_multiplier: 0.0,
            seed: 0,
            expected_batch_size: None,
            report_layers: false,
        }
    }

    /// Per-layer clipping of `batch` examples, tensor `t` to norm `max_norms[t]` (Opacus'
    /// per-layer mode), no noise, no division.
    pub fn per_layer(batch: u32, max_norms: Vec<f32>) -> Self {
        PerExampleClip {
            threshold: ExampleThreshold::PerLayer(max_norms),
            ..PerExampleClip::new(batch, 1.0)
        }
    }

    /// Reports how many examples were clipped per tensor.
    pub fn with_layer_report(mut self) -> Self {
        self.report_layers = true;
        self
    }

    /// Adds Gaussian noise of std `noise_multiplier * C`.
    pub fn noise(mut self, noise_multiplier: f32, seed: u64) -> Self {
        self.noise_multiplier = noise_multiplier;
        self.seed = seed;
        self
    }

    /// Divides the result by `expected_batch_size`.
    pub fn mean_over(mut self, expected_batch_size: f32) -> Self {
        self.expected_batch_size = Some(expected_batch_size);
        self
    }

    /// The thresholds as listed per tensor (Flat: one).
    pub(crate) fn thresholds(&self) -> (&[f32], bool) {
        match &self.threshold {
            ExampleThreshold::Flat(c) => (std::slice::from_ref(c), false),
            ExampleThreshold::PerLayer(c) => (c, true),
        }
    }

    /// Std of the noise: sigma * C (C = sqrt(sum C_t^2) per layer).
    pub(crate) fn noise_std(&self) -> f32 {
        let (c, _) = self.thresholds();
        self.noise_multiplier * c.iter().map(|x| x * x).sum::<f32>().sqrt()
    }

    /// 1 / expected batch size (1 without).
    pub(crate) fn inv_divisor(&self) -> f32 {
        1.0 / self.expected_batch_size.unwrap_or(1.0)
    }

    /// Checks the configuration against tensors of lengths `lens`.
    pub(crate) fn validate(&self, lens: &[u64]) -> Result<(), ClipError> {
        /// Units allowed even where the tensors hold fewer elements (empty tensors).
        const MAX_UNITS: u64 = 1 << 24;
        let bad = |m: String| Err(ClipError::InvalidConfig(m));
        if self.batch == 0 {
            return bad("batch must be >= 1".into());
        }
        let (c, per_layer) = self.thresholds();
        if c.iter().any(|x| !(x.is_finite() && *x > 0.0)) {
            return bad(format!("thresholds must be finite and > 0, got {c:?}"));
        }
        if per_layer && c.len() != lens.len() {
            return bad(format!(
                "{} per-layer thresholds for {} tensors",
                c.len(),
                lens.len()
            ));
        }
        if !(self.noise_multiplier.is_finite() && self.noise_multiplier >= 0.0) {
            return bad(format!(
                "noise multiplier must be finite and >= 0, got {}",
                self.noise_multiplier
            ));
        }
        if let Some(b) = self.expected_batch_size {
            if !(b.is_finite() && b > 0.0) {
                return bad(format!(
                    "expected batch size must be finite and > 0, got {b}"
                ));
            }
        }
        if let Some((t, len)) = lens
            .iter()
            .enumerate()
            .find(|(_, &l)| l % self.batch as u64 != 0)
        {
            return bad(format!(
                "tensor #{t} has {len} elements, not a multiple of batch {}",
                self.batch
            ));
        }
        // One unit per (example, tensor), each with its norm and coefficient: a batch far
        // beyond the data would allocate without bound.
        let units = self.batch as u64 * lens.len() as u64;
        let elements: u64 = lens.iter().sum();
        if units > MAX_UNITS.max(elements) {
            return bad(format!(
                "batch {} over {} tensors is {units} per-example units, more than the {} elements (or 2^24)",
                self.batch,
                lens.len(),
                elements
            ));
        }
        Ok(())
    }
}

/// Per tensor, the examples whose coefficient is below 1 (or NaN), from the coefficients
/// of the (example, tensor) units, example-major.
pub(crate) fn clipped_per_tensor(coefs: &[f32], n_tensors: usize) -> Vec<u32> {
    let mut counts = vec![0u32; n_tensors];
    for (u, c) in coefs.iter().enumerate() {
        if c.is_nan() || *c < 1.0 {
            counts[u % n_tensors] += 1;
        }
    }
    counts
}
