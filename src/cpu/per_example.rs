//! CPU twin of per-example clipping (`shaders/per_example.wgsl` after the policy
//! coefficients): the factors from exact f64 norms, then the sum over the batch in f32
//! in the shader's order, the noise and the division.

use rayon::prelude::*;

use super::engine::{execute, to_f32, CpuStep, Grads, Outcome};
use super::philox::gaussian_noise;
use crate::chain::{check_shapes, clipped_per_tensor, PerExampleClip, Program, TensorInfo};
use crate::dtype::GradRef;
use crate::error::ClipError;
use crate::non_finite::NonFinitePolicy;
use crate::norm::Norm;
use crate::recording::{record, Mode, Profile};
use crate::report::ClipReport;

/// Per-example clipping (DP-SGD) of host slices on the CPU, step after step: the CPU twin
/// of the engine of [`crate::GpuClipper<crate::PerExample>`]. Each step clips every example of the inputs (`[batch,
/// P_t]` per tensor), sums them into the outputs (`P_t` f32 each), adds the noise keyed by
/// the step's number and divides by the expected batch size when one is set.
#[derive(Debug, Clone)]
pub struct CpuPerExample {
    clip: PerExampleClip,
    infos: Vec<TensorInfo>,
    steps: u64,
}

impl CpuPerExample {
    /// Per-example clipping of inputs shaped as `infos` (each `batch * P_t` elements).
    /// A configuration that does not fit them is an error.
    pub fn new(clip: PerExampleClip, infos: &[TensorInfo]) -> Result<CpuPerExample, ClipError> {
        let lens: Vec<u64> = infos.iter().map(TensorInfo::len).collect();
        clip.validate(&lens)?;
        Ok(CpuPerExample {
            clip,
            infos: infos.to_vec(),
            steps: 0,
        })
    }

    /// One step over `inputs` into `outputs`, its noise keyed by [`Self::steps_taken`].
    /// Inputs or outputs of other lengths are an error that changes nothing, the step
    /// count included.
    pub fn step(
        &mut self,
        inputs: &[GradRef<'_>],
        outputs: &mut [&mut [f32]],
    ) -> Result<ClipReport, ClipError> {
        check_shapes(&self.infos, inputs.iter().map(|g| g.len() as u64))?;
        let report = clip_per_example(inputs, outputs, &self.clip, self.steps)?;
        self.steps += 1;
        Ok(report)
    }

    /// Steps taken so far: the next step's number (it keys the noise).
    pub fn steps_taken(&self) -> u64 {
        self.steps
    }

    /// Sets the next step's number: a resumed run continues its noise where it stopped.
    pub fn set_steps_taken(&mut self, steps: u64) {
        self.steps = steps;
    }
}

/// One per-example step numbered `step` (see [`CpuPerExample::step`]). Errors leave the
/// outputs untouched.
pub(crate) fn clip_per_example(
    inputs: &[GradRef<'_>],
    outputs: &mut [&mut [f32]],
    clip: &PerExampleClip,
    step: u64,
) -> Result<ClipReport, ClipError> {
    let lens: Vec<u64> = inputs.iter().map(|g| g.len() as u64).collect();
    clip.validate(&lens)?;
    let batch = clip.batch as usize;
    if outputs.len() != inputs.len()
        || outputs
            .iter()
            .zip(&lens)
            .any(|(o, &l)| o.len() as u64 != l / batch as u64)
    {
        return Err(ClipError::ShapeMismatch {
            tensor: "outputs".into(),
            expected: format!(
                "{:?} f32 elements",
                lens.iter().map(|l| l / batch as u64).collect::<Vec<_>>()
            ),
            got: format!("{:?}", outputs.iter().map(|o| o.len()).collect::<Vec<_>>()),
        });
    }
    let (thresholds, per_layer) = clip.thresholds();
    let program = Program::per_example(&lens, batch as u64, thresholds, per_layer);
    let cpu_step = CpuStep {
        norm: Norm::L2,
        policy: NonFinitePolicy::Propagate,
        multiplier: 1.0,
        given: None,
        noise: None,
        step,
        clamp: None,
        loss_scale: None,
    };
    // The recording the GPU replays before its per-example sum: the coefficients.
    let mut recording = Vec::new();
    record(
        &Profile::of(&program, false),
        Mode::Coefficients,
        false,
        &mut recording,
    );
    let mut out = Outcome::default();
    let mut state = program.fresh_state();
    let grads = Grads::Read(inputs);
    execute(
        &recording, grads, None, &program, &cpu_step, &mut state, &mut out,
    );
    let (coefs, run) = (&out.coefs, &out.stages[0]);
    let (clipped, total) = (run.clipped, run.finish.total);
    let n = inputs.len();
    let std = clip.noise_std();
    let inv = clip.inv_divisor();
    for (t, (input, out)) in inputs.iter().zip(outputs.iter_mut()).enumerate() {
        let p = out.len();
        out.par_iter_mut().enumerate().for_each(|(j, o)| {
            let mut sum = 0.0f32;
            for i in 0..batch {
                sum += coefs[i * n + t] * to_f32(input, i * p + j);
            }
            if std > 0.0 {
                sum += std * gaussian_noise(clip.seed, step, t as u32, j as u32);
            }
            *o = sum * inv;
        });
    }
    let per_unit = if per_layer { 1 } else { n.max(1) as u32 };
    Ok(ClipReport::per_example(
        step,
        clipped / per_unit,
        clip.batch * if per_layer { n as u32 } else { 1 },
        total,
        std,
        clip.report_layers.then(|| clipped_per_tensor(coefs, n)),
    ))
}
