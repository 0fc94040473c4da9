//! Fused optimizer steps on the GPU (`shaders/optimizer.wgsl`): a [`GpuPolicy`] computes the
//! clip's coefficients without rewriting the gradients, and in the same compute pass
//! `tick` counts the step and `update` clips each gradient as it reads it and updates the
//! f32 parameters and their state. The CPU twin is the engine of [`crate::CpuClipper<crate::Optimize>`].

use super::context::{guarded, GpuContext};
use super::engine::Mode;
use super::policy::GpuPolicy;
use super::readback::{read_words, PendingReport};
use super::resources::{bind, range, storage_init, storage_zeroed, table, whole, DispatchSlots};
use super::tensor::{infos_of, plan_inputs, plan_limits, GpuTensor};
use crate::chain::TensorInfo;
use crate::chain::{check_shapes, ClipPolicy, PolicyState};
use crate::error::ClipError;
use crate::optim::{check_lr, Optimizer, OptimizerState};
use crate::plan::step_table::{plan_step, StepTable};
use crate::plan::{fold_grid, Plan, PlanSegment};
use crate::report::ClipReport;
use crate::shaders::abi::{self, OptimizerCounter, StepRunParams};
use crate::shaders::{BindLayout, Kernel};

/// A clipping policy and an optimizer fused into one compute pass over caller-owned
/// buffers: the gradients are read twice (the norm, then the update) and never written;
/// the parameters are f32 master weights updated in place; the optimizer state stays on
/// the device. A step the clip holds (non-finite gradients under
/// [`crate::NonFinitePolicy::Error`] or `SkipStep`) changes no parameter and no state and
/// is not counted as a step taken, decided on the device with no host round trip.
pub struct GpuOptimizer {
    ctx: GpuContext,
    policy: GpuPolicy,
    optimizer: Optimizer,
    lr: f32,
    lens: Vec<u64>,
    table: StepTable,
    tick: wgpu::BindGroup,
    /// Per run: its bind group and grid.
    runs: Vec<(wgpu::BindGroup, [u32; 3])>,
    /// Per run: its state buffer (each state array of the run, one after the other).
    states: Vec<wgpu::Buffer>,
    counter: wgpu::Buffer,
}

impl std::fmt::Debug for GpuOptimizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GpuOptimizer")
            .field("optimizer", &self.optimizer)
            .field("lr", &self.lr)
            .field("policy", &self.policy)
            .field("dispatches", &self.runs.len())
            .finish()
    }
}

impl GpuOptimizer {
    /// Plans `optimizer` after `policy` over gradients `grads` and f32 parameters `params`
    /// (tensor for tensor the same lengths, in buffers other than the gradients'); AGC
    /// measures these parameters. Errors (a bad policy, hyperparameter or tensor) create
    /// nothing and touch no buffer.
    pub fn new(
        ctx: &GpuContext,
        grads: &[GpuTensor<'_>],
        params: &[GpuTensor<'_>],
        policy: ClipPolicy,
        optimizer: impl Into<Optimizer>,
    ) -> Result<GpuOptimizer, ClipError> {
        let optimizer = optimizer.into();
        optimizer.check()?;
        let name = |t: &GpuTensor<'_>, i: usize| TensorInfo::name_of(t.name.as_deref(), i);
        for (pi, p) in params.iter().enumerate() {
            if let Some(gi) = grads.iter().position(|g| g.buffer == p.buffer) {
                return Err(ClipError::SharedBuffer {
                    param: name(p, pi),
                    grad: name(&grads[gi], gi),
                });
            }
        }
        let plens: Vec<u64> = params.iter().map(|t| t.len).collect();
        check_shapes(&infos_of(grads), plens.iter().copied())?;
        let policy = GpuPolicy::new(ctx, grads, Some(params), policy)?;
        let (grad_tensors, grad_buffers) = plan_inputs(grads, &[])?;
        let (param_tensors, param_buffers) = plan_inputs(params, &[])?;
        let limits = plan_limits(ctx);
        // The policy checked the gradients; the parameters get the same checks (alignment,
        // bounds, overlap) before anything is cut.
        Plan::new(&param_tensors, &PlanSegment::whole(&param_tensors), limits)?;
        let program = policy.engine().program();
        let layouts = program.unit_layouts(grads.len());
        let arrays = optimizer.state_arrays();
        let steps = plan_step(&grad_tensors, &param_tensors, &layouts, arrays, &limits)?;
        let device = &ctx.inner.device;
        let kernels = &ctx.inner.kernels;
        let (tick, runs, states, counter) = guarded(device, || {
            let (coefs, reports, slots) = policy.engine().outputs();
            let chunks = table(device, "gradclip optimizer table", &steps.chunks);
            let opt = DispatchSlots::new(device, &[optimizer.params()]);
            let counter = storage_init(
                device,
                "gradclip optimizer counter",
                bytemuck::bytes_of(&OptimizerCounter::default()),
                wgpu::BufferUsages::COPY_SRC | wgpu::BufferUsages::COPY_DST,
            );
            let run_params: Vec<StepRunParams> = (steps.runs.iter())
                .map(|r| StepRunParams {
                    first_chunk: r.first_chunk,
                    n_chunks: r.n_chunks,
                    state_len: r.state_len,
                    _pad0: 0,
                })
                .collect();
            let run_slots = DispatchSlots::new(device, &run_params);
            let tick = bind(
                device,
                kernels.layout(BindLayout::OptimizerTick),
                &[
                    (3, slots.binding()),
                    (6, whole(reports)),
                    (8, whole(&counter)),
                    (9, opt.slot(0)),
                ],
            );
            let max_dim = device.limits().max_compute_workgroups_per_dimension;
            let mut states = Vec::with_capacity(steps.runs.len());
            let mut runs = Vec::with_capacity(steps.runs.len());
            for (i, run) in steps.runs.iter().enumerate() {
                let state = storage_zeroed(
                    device,
                    "gradclip optimizer state",
                    run.state_len as u64 * 4 * arrays as u64,
                    wgpu::BufferUsages::COPY_SRC | wgpu::BufferUsages::COPY_DST,
                );
                let group = bind(
                    device,
                    kernels.layout(BindLayout::OptimizerUpdate),
                    &[
                        (
                            0,
                            range(grad_buffers[run.grads.0], run.grads.1, run.grads.2),
                        ),
                        (1, whole(&chunks)),
                        (2, whole(coefs)),
                        (3, slots.binding()),
                        (4, run_slots.slot(i)),
                        (
                            5,
                            range(param_buffers[run.params.0], run.params.1, run.params.2),
                        ),
                        (6, whole(reports)),
                        (7, whole(&state)),
                        (8, whole(&counter)),
                        (9, opt.slot(0)),
                    ],
                );
                runs.push((group, fold_grid(run.n_chunks, max_dim)));
                states.push(state);
            }
            Ok((tick, runs, states, counter))
        })?;
        Ok(GpuOptimizer {
            ctx: ctx.clone(),
            policy,
            lr: optimizer.lr(),
            optimizer,
            lens: grads.iter().map(|t| t.len).collect(),
            table: steps,
            tick,
            runs,
            states,
            counter,
        })
    }

    /// The optimizer it runs.
    pub fn optimizer(&self) -> &Optimizer {
        &self.optimizer
    }

    /// The clipping policy, with its step count.
    pub fn policy(&self) -> &GpuPolicy {
        &self.policy
    }

    /// Reads the clipping policy's state back (waits for the GPU); see
    /// [`GpuPolicy::state`].
    pub fn clip_state(&self) -> Result<PolicyState, ClipError> {
        self.policy.state()
    }

    /// Restores the clipping policy's state; see [`GpuPolicy::set_state`].
    pub fn set_clip_state(&mut self, state: &PolicyState) -> Result<(), ClipError> {
        self.policy.set_state(state)
    }

    /// The learning rate of the following steps.
    pub fn lr(&self) -> f32 {
        self.lr
    }

    /// Sets the learning rate of the following steps (a schedule); finite and >= 0. Each
    /// step records its own, so steps encoded before one submission keep theirs.
    pub fn set_lr(&mut self, lr: f32) -> Result<(), ClipError> {
        check_lr(lr)?;
        self.lr = lr;
        Ok(())
    }

    /// Makes every following step write GPU timestamps at the start and end of its compute
    /// pass; see [`GpuPolicy::set_timestamp_writes`].
    pub fn set_timestamp_writes(&mut self, timestamps: Option<(wgpu::QuerySet, u32, u32)>) {
        self.policy.set_timestamp_writes(timestamps);
    }

    /// Records one fused step: the clip's norms and coefficients, then the update, which
    /// clips each gradient as it reads it; the gradients are not written. The report is
    /// readable once the encoder is submitted and run.
    pub fn encode(
        &mut self,
        encoder: &mut wgpu::CommandEncoder,
    ) -> Result<PendingReport<ClipReport>, ClipError> {
        self.encode_as(encoder, false)
    }

    /// Records the unfused equivalent: the clip rewrites the gradients in place (they keep
    /// the clipped values), then the update reads them. One more read and write of the
    /// gradients than [`GpuOptimizer::encode`], for a caller that needs the clipped
    /// gradients afterwards; the parameters come out the same.
    pub fn encode_in_place(
        &mut self,
        encoder: &mut wgpu::CommandEncoder,
    ) -> Result<PendingReport<ClipReport>, ClipError> {
        self.encode_as(encoder, true)
    }

    /// [`GpuOptimizer::encode`], submitted now.
    pub fn step(&mut self) -> Result<PendingReport<ClipReport>, ClipError> {
        self.submit(false)
    }

    /// [`GpuOptimizer::encode_in_place`], submitted now.
    pub fn step_in_place(&mut self) -> Result<PendingReport<ClipReport>, ClipError> {
        self.submit(true)
    }

    /// A step recorded into a new encoder and submitted; a submission that fails leaves
    /// the step count where it was.
    fn submit(&mut self, in_place: bool) -> Result<PendingReport<ClipReport>, ClipError> {
        self.policy.check()?;
        let ctx = self.ctx.clone();
        let start = self.policy.steps_taken();
        ctx.record_and_submit(
            "gradclip optimizer",
            self,
            |o, encoder| o.encode_as(encoder, in_place),
            |o| o.policy.rewind(start),
        )
    }

    fn encode_as(
        &mut self,
        encoder: &mut wgpu::CommandEncoder,
        in_place: bool,
    ) -> Result<PendingReport<ClipReport>, ClipError> {
        let mut params = self.policy.params(None)?;
        params.lr = self.lr;
        params.decay = self.optimizer.decay(self.lr);
        let update = if in_place {
            Kernel::OptimizerUpdate {
                scale: false,
                noise: false,
                clamp: false,
            }
        } else {
            Kernel::OptimizerUpdate {
                scale: true,
                noise: params.sigma > 0.0,
                clamp: params.clamp == 1,
            }
        };
        let (device, kernels) = (&self.ctx.inner.device, &self.ctx.inner.kernels);
        kernels.prepare(device, &[Kernel::OptimizerTick, update])?;
        // In place, the update reads the gradients the clip rewrote; else it reads the
        // coefficients and scales as it reads.
        let mode = if in_place {
            Mode::Clip
        } else {
            Mode::Coefficients
        };
        let step = self.policy.step_of(params, mode);
        let (tick, runs) = (&self.tick, &self.runs);
        self.policy.encode_policy(encoder, step, |pass, slot| {
            pass.set_pipeline(&kernels.pipeline(device, Kernel::OptimizerTick));
            pass.set_bind_group(0, tick, &[slot]);
            pass.dispatch_workgroups(1, 1, 1);
            pass.set_pipeline(&kernels.pipeline(device, update));
            for (group, grid) in runs.iter().filter(|(_, g)| g[0] > 0) {
                pass.set_bind_group(0, group, &[slot]);
                pass.dispatch_workgroups(grid[0], grid[1], 1);
            }
        })
    }

    /// Reads the optimizer state back (waits for the GPU). Each buffer comes back through a
    /// staging buffer of its own size: none is larger than one binding window.
    pub fn state(&self) -> Result<OptimizerState, ClipError> {
        let mut state = OptimizerState::fresh(&self.optimizer, &self.lens);
        let counter: OptimizerCounter = abi::read(&read_words(&self.ctx, &self.counter)?);
        state.steps = counter.steps;
        for (run, buffer) in self.states.iter().enumerate() {
            let words = read_words(&self.ctx, buffer)?;
            let len = self.table.runs[run].state_len as usize;
            let pieces = (self.table.pieces.iter().enumerate())
                .flat_map(|(t, p)| p.iter().map(move |piece| (t, piece)))
                .filter(|(_, piece)| piece.0 == run);
            for (t, &(_, first, elem, count)) in pieces {
                for (k, array) in state.arrays.iter_mut().enumerate() {
                    let from = k * len + first as usize;
                    let src: &[f32] = bytemuck::cast_slice(&words[from..from + count as usize]);
                    array[t][elem as usize..(elem + count) as usize].copy_from_slice(src);
                }
            }
        }
        Ok(state)
    }

    /// Restores a saved optimizer state (from either backend); the next step continues
    /// from it.
    pub fn set_state(&mut self, state: &OptimizerState) -> Result<(), ClipError> {
        state.check_fits(&self.optimizer, &self.lens)?;
        let queue = &self.ctx.inner.queue;
        guarded(&self.ctx.inner.device, || {
            let counter = OptimizerCounter {
                steps: state.steps,
                ..OptimizerCounter::default()
            };
            queue.write_buffer(&self.counter, 0, bytemuck::bytes_of(&counter));
            for (t, pieces) in self.table.pieces.iter().enumerate() {
                for &(run, first, elem, count) in pieces {
                    let len = self.table.runs[run].state_len as u64;
                    for (k, array) in state.arrays.iter().enumerate() {
                        let data = &array[t][elem as usize..(elem + count) as usize];
                        let at = (k as u64 * len + first) * 4;
                        queue.write_buffer(&self.states[run], at, bytemuck::cast_slice(data));
                    }
                }
            }
            Ok(())
        })
    }
}
