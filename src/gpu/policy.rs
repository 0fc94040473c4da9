//! A clipping policy on the GPU: the shared segment reduction, the policy kernels
//! (`shaders/policy.wgsl`) and the segment-wise elementwise pass
//! (`shaders/segment_apply.wgsl`), recorded into one compute pass per step. The state
//! (AutoClip history, ZClip EMA, skip counter) stays on the device between steps.

use std::sync::Arc;

use bytemuck::Zeroable;

use super::batch::{plan_tensors, GpuTensor};
use super::context::GpuContext;
use super::readback::{accs_at, PendingReport, ReportPool};
use super::reduction::SegmentReduction;
use super::resources::{
    bind, storage_init, storage_zeroed, uniform_buffer, whole, window, DispatchParams,
    DispatchSlots, StepParams,
};
use crate::error::ClipError;
use crate::norm::Norm;
use crate::plan::fold_grid;
use crate::policies::{
    check_shapes, ClipPolicy, GaussianNoise, Layout, PolicyState, Rule, TensorInfo,
};
use crate::report::{PolicyOutcome, PolicyReport, ReportShape, UnitNorms};
use crate::shaders::abi::{self, Acc, PolicyHeader, PolicyParams, ACC_BYTES};
use crate::shaders::{BindLayout, Kernel};

/// Bytes of the policy report header.
const POLICY_HEADER_BYTES: u64 = std::mem::size_of::<PolicyHeader>() as u64;

/// Runs a [`ClipPolicy`] over gradients in caller-owned buffers, step after step.
pub struct GpuPolicy {
    ctx: GpuContext,
    policy: ClipPolicy,
    layout: Layout,
    n_tensors: usize,
    grads: SegmentReduction,
    params: Option<SegmentReduction>,
    groups: Option<(wgpu::BindGroup, [u32; 3])>,
    group_accs: wgpu::Buffer,
    finish: wgpu::BindGroup,
    coefs: wgpu::BindGroup,
    coefs_grid: [u32; 3],
    applies: Vec<(wgpu::BindGroup, [u32; 3])>,
    step_buf: wgpu::Buffer,
    config_buf: wgpu::Buffer,
    last: Option<(StepParams, PolicyParams)>,
    state_buf: wgpu::Buffer,
    report: wgpu::Buffer,
    coef_buf: wgpu::Buffer,
    pool: Arc<ReportPool>,
    shape: Arc<ReportShape>,
    step: u64,
}

impl std::fmt::Debug for GpuPolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GpuPolicy")
            .field("rule", &self.policy.rule)
            .field("tensors", &self.n_tensors)
            .field("units", &self.layout.segments.len())
            .field("step", &self.step)
            .finish()
    }
}

impl GpuPolicy {
    /// Plans `policy` over `grads`; AGC also takes the parameters, tensor for tensor of
    /// the same shapes. Names and shapes come from [`GpuTensor::named`] and
    /// [`GpuTensor::shaped`]. Errors (bad configuration, bad tensors) create nothing.
    pub fn new(
        ctx: &GpuContext,
        grads: &[GpuTensor<'_>],
        params: Option<&[GpuTensor<'_>]>,
        policy: ClipPolicy,
    ) -> Result<GpuPolicy, ClipError> {
        let infos: Vec<TensorInfo> = grads.iter().enumerate().map(|(i, t)| t.info(i)).collect();
        let lens: Vec<u64> = grads.iter().map(|t| t.len).collect();
        check_shapes(&infos, &lens)?;
        let layout = Layout::new(&policy, &infos)?;
        if let (Rule::Agc(_), Some(p)) = (&policy.rule, params) {
            let plens: Vec<u64> = p.iter().map(|t| t.len).collect();
            check_shapes(&infos, &plens)?;
        }
        Self::build(ctx, grads, params, policy, layout, true)
    }

    /// Plans `layout` (already resolved from `policy`) over `grads`; `in_place` adds the
    /// segment-wise rewrite of the gradients.
    pub(crate) fn build(
        ctx: &GpuContext,
        grads: &[GpuTensor<'_>],
        params: Option<&[GpuTensor<'_>]>,
        policy: ClipPolicy,
        layout: Layout,
        in_place: bool,
    ) -> Result<GpuPolicy, ClipError> {
        let segments = |_: &[crate::plan::PlanTensor]| layout.segments.clone();
        let (grad_plan, grad_buffers) = plan_tensors(ctx, grads, segments)?;
        let param_plan = match (&policy.rule, params) {
            (Rule::Agc(_), Some(p)) => Some(plan_tensors(ctx, p, |_| layout.segments.clone())?),
            (Rule::Agc(_), None) => {
                return Err(ClipError::InvalidConfig(
                    "AGC needs the parameters alongside the gradients".into(),
                ))
            }
            _ => None,
        };
        let device = &ctx.inner.device;
        let kernels = &ctx.inner.kernels;
        let scope = device.push_error_scope(wgpu::ErrorFilter::Validation);
        let max_dim = device.limits().max_compute_workgroups_per_dimension;
        let step_buf = uniform_buffer(
            device,
            "gradclip step params",
            std::mem::size_of::<StepParams>() as u64,
        );
        let config_buf = uniform_buffer(
            device,
            "gradclip policy params",
            std::mem::size_of::<PolicyParams>() as u64,
        );
        let grads_red =
            SegmentReduction::new(device, kernels, &grad_plan, &grad_buffers, &step_buf);
        let params_red = param_plan
            .as_ref()
            .map(|(plan, bufs)| SegmentReduction::new(device, kernels, plan, bufs, &step_buf));
        let n_seg = layout.segments.len();
        let n_groups = layout.group_ranges.len();
        let identity = n_groups == n_seg
            && layout
                .group_of
                .iter()
                .enumerate()
                .all(|(s, &g)| g as usize == s);
        let slots = DispatchSlots::new(
            device,
            &[
                DispatchParams::range(0, n_groups as u32),
                DispatchParams::range(0, n_seg as u32),
            ],
        );
        let group_accs = if identity {
            grads_red.segment_accs.clone()
        } else {
            storage_zeroed(
                device,
                "gradclip group norms",
                n_groups as u64 * ACC_BYTES,
                wgpu::BufferUsages::COPY_SRC,
            )
        };
        let groups = (!identity).then(|| {
            let ranges = storage_init(
                device,
                "gradclip group ranges",
                bytemuck::cast_slice(&layout.group_ranges),
                wgpu::BufferUsages::empty(),
            );
            let group = bind(
                device,
                kernels.layout(BindLayout::Reduce),
                &[
                    (0, whole(&grads_red.segment_accs)),
                    (1, whole(&ranges)),
                    (2, whole(&group_accs)),
                    (3, whole(&step_buf)),
                    (4, slots.slot(0)),
                ],
            );
            (group, fold_grid(n_groups as u32, max_dim))
        });
        let state_buf = storage_zeroed(
            device,
            "gradclip policy state",
            PolicyState::new(layout.history).words.len() as u64 * 4,
            wgpu::BufferUsages::COPY_SRC | wgpu::BufferUsages::COPY_DST,
        );
        let report = storage_zeroed(
            device,
            "gradclip policy report",
            POLICY_HEADER_BYTES,
            wgpu::BufferUsages::COPY_SRC,
        );
        let coef_buf = storage_zeroed(
            device,
            "gradclip coefficients",
            n_seg as u64 * 4,
            wgpu::BufferUsages::COPY_SRC,
        );
        let thresholds = storage_init(
            device,
            "gradclip thresholds",
            bytemuck::cast_slice(&layout.thresholds),
            wgpu::BufferUsages::empty(),
        );
        let group_of = storage_init(
            device,
            "gradclip group of segment",
            bytemuck::cast_slice(&layout.group_of),
            wgpu::BufferUsages::empty(),
        );
        let w_accs = params_red
            .as_ref()
            .map_or(&grads_red.segment_accs, |p| &p.segment_accs);
        let policy_bind = |slot: usize| {
            bind(
                device,
                kernels.layout(BindLayout::Policy),
                &[
                    (0, whole(&group_accs)),
                    (1, whole(&state_buf)),
                    (2, whole(&report)),
                    (3, whole(&step_buf)),
                    (4, slots.slot(slot)),
                    (5, whole(&config_buf)),
                    (6, whole(&thresholds)),
                    (7, whole(&coef_buf)),
                    (8, whole(&group_of)),
                    (9, whole(w_accs)),
                ],
            )
        };
        let finish = policy_bind(0);
        let coefs = policy_bind(1);
        let applies = grad_plan
            .windows
            .iter()
            .filter(|_| in_place)
            .enumerate()
            .map(|(wi, w)| {
                let group = bind(
                    device,
                    kernels.layout(BindLayout::SegmentApply),
                    &[
                        (0, window(grad_buffers[w.buffer], w)),
                        (1, whole(&grads_red.chunks)),
                        (2, whole(&coef_buf)),
                        (3, whole(&step_buf)),
                        (4, grads_red.slots.slot(wi)),
                        (5, whole(&config_buf)),
                        (6, whole(&report)),
                    ],
                );
                (group, fold_grid(w.reduce_count, max_dim))
            })
            .collect();
        let readback = POLICY_HEADER_BYTES
            + if policy.report_groups {
                (n_groups + n_seg) as u64 * ACC_BYTES + n_seg as u64 * 4
            } else {
                0
            };
        let gpu = GpuPolicy {
            ctx: ctx.clone(),
            n_tensors: grads.len(),
            grads: grads_red,
            params: params_red,
            groups,
            group_accs,
            finish,
            coefs,
            coefs_grid: fold_grid((n_seg as u32).div_ceil(64), max_dim),
            applies,
            step_buf,
            config_buf,
            last: None,
            state_buf,
            report,
            coef_buf,
            pool: ReportPool::new(readback),
            shape: ReportShape::new(
                &layout,
                &grads
                    .iter()
                    .enumerate()
                    .map(|(i, t)| t.info(i))
                    .collect::<Vec<_>>(),
            ),
            step: 0,
            policy,
            layout,
        };
        if let Some(error) = pollster::block_on(scope.pop()) {
            return Err(ClipError::Wgpu(error.to_string()));
        }
        Ok(gpu)
    }

    /// The policy this runs.
    pub fn policy(&self) -> &ClipPolicy {
        &self.policy
    }

    /// Number of units (tensors, AGC units) that get their own coefficient.
    pub fn units(&self) -> usize {
        self.layout.segments.len()
    }

    /// The next step's number.
    pub fn step(&self) -> u64 {
        self.step
    }

    fn params_for_step(&self) -> Result<(StepParams, PolicyParams), ClipError> {
        let policy = &self.policy;
        let order = policy.norm.order() as f32;
        let step = StepParams {
            p: order,
            inv_p: 1.0 / order,
            policy: policy.non_finite.code(),
            ..StepParams::zeroed()
        };
        let noise = policy.noise.unwrap_or(GaussianNoise {
            sigma: 0.0,
            seed: 0,
        });
        let mut config = PolicyParams {
            multiplier: policy.schedule.checked(self.step)?,
            capacity: self.layout.history as u32,
            sigma: noise.sigma,
            seed_lo: noise.seed as u32,
            seed_hi: (noise.seed >> 32) as u32,
            step_lo: self.step as u32,
            step_hi: (self.step >> 32) as u32,
            ..PolicyParams::zeroed()
        };
        match &policy.rule {
            Rule::Agc(a) => {
                config.lambda = a.lambda;
                config.eps = a.eps;
            }
            Rule::AutoClip(a) => {
                config.percentile = a.percentile;
                config.cap = a.max_norm.unwrap_or(0.0);
            }
            Rule::ZClip(z) => {
                config.alpha = z.alpha;
                config.z_thresh = z.z_thresh;
                config.z_eps = z.eps;
                config.cap = z.max_norm.unwrap_or(0.0);
            }
            _ => {}
        }
        Ok((step, config))
    }

    /// Writes this step's parameters (when they changed); `noise` overrides the policy's.
    pub(crate) fn prepare(&mut self, noise: Option<GaussianNoise>) -> Result<(), ClipError> {
        let mut params = self.params_for_step()?;
        if let Some(n) = noise {
            params.1.sigma = n.sigma;
            params.1.seed_lo = n.seed as u32;
            params.1.seed_hi = (n.seed >> 32) as u32;
        }
        if self.last != Some(params) {
            let queue = &self.ctx.inner.queue;
            queue.write_buffer(&self.step_buf, 0, bytemuck::bytes_of(&params.0));
            queue.write_buffer(&self.config_buf, 0, bytemuck::bytes_of(&params.1));
            self.last = Some(params);
        }
        Ok(())
    }

    /// The pool of report readback buffers.
    pub(crate) fn pool(&self) -> Arc<ReportPool> {
        self.pool.clone()
    }

    /// The per-segment coefficients, the report and the policy parameters, for passes
    /// that consume them.
    pub(crate) fn outputs(&self) -> (&wgpu::Buffer, &wgpu::Buffer, &wgpu::Buffer) {
        (&self.coef_buf, &self.report, &self.config_buf)
    }

    /// Records norms, coefficients and (in place) the rewrite into `pass`.
    pub(crate) fn encode_pass(&self, pass: &mut wgpu::ComputePass<'_>) {
        let ctx = &self.ctx;
        let (device, kernels) = (&ctx.inner.device, &ctx.inner.kernels);
        let kind = self.policy.norm.kind_code();
        let adaptive = self.layout.adaptive;
        {
            self.grads.encode_partials(pass, device, kernels, kind);
            self.grads.encode_segments(pass, device, kernels, kind);
            if let Some(p) = &self.params {
                let l2 = Norm::L2.kind_code();
                p.encode_partials(pass, device, kernels, l2);
                p.encode_segments(pass, device, kernels, l2);
            }
            if let Some((group, grid)) = &self.groups {
                pass.set_pipeline(&kernels.pipeline(device, Kernel::TensorNorms(kind)));
                pass.set_bind_group(0, group, &[]);
                pass.dispatch_workgroups(grid[0], grid[1], 1);
            }
            pass.set_pipeline(&kernels.pipeline(device, Kernel::PolicyFinish { kind, adaptive }));
            pass.set_bind_group(0, &self.finish, &[]);
            pass.dispatch_workgroups(1, 1, 1);
            if self.coefs_grid[0] > 0 {
                let formula = self.layout.formula as u32;
                pass.set_pipeline(&kernels.pipeline(
                    device,
                    Kernel::PolicyCoefs {
                        kind,
                        adaptive,
                        formula,
                    },
                ));
                pass.set_bind_group(0, &self.coefs, &[]);
                pass.dispatch_workgroups(self.coefs_grid[0], self.coefs_grid[1], 1);
            }
            if !self.applies.is_empty() {
                pass.set_pipeline(&kernels.pipeline(device, Kernel::SegmentApply));
            }
            for (group, grid) in self.applies.iter().filter(|(_, g)| g[0] > 0) {
                pass.set_bind_group(0, group, &[]);
                pass.dispatch_workgroups(grid[0], grid[1], 1);
            }
        }
    }

    /// Copies the report into a pooled readback buffer; returns it with the step number,
    /// and advances the step.
    pub(crate) fn finish_step(
        &mut self,
        encoder: &mut wgpu::CommandEncoder,
    ) -> (wgpu::Buffer, u64) {
        let device = &self.ctx.inner.device;
        let readback = self.pool.take(device);
        encoder.copy_buffer_to_buffer(&self.report, 0, &readback, 0, POLICY_HEADER_BYTES);
        let n_groups = self.layout.group_ranges.len() as u64;
        let n_seg = self.layout.segments.len() as u64;
        if self.policy.report_groups {
            if n_groups > 0 {
                encoder.copy_buffer_to_buffer(
                    &self.group_accs,
                    0,
                    &readback,
                    POLICY_HEADER_BYTES,
                    n_groups * ACC_BYTES,
                );
            }
            if n_seg > 0 {
                let units = POLICY_HEADER_BYTES + n_groups * ACC_BYTES;
                let accs = &self.grads.segment_accs;
                encoder.copy_buffer_to_buffer(accs, 0, &readback, units, n_seg * ACC_BYTES);
                let coefs = units + n_seg * ACC_BYTES;
                encoder.copy_buffer_to_buffer(&self.coef_buf, 0, &readback, coefs, n_seg * 4);
            }
        }
        let step = self.step;
        self.step += 1;
        (readback, step)
    }

    /// Records one step: norms, coefficients and the in-place rewrite, with no host
    /// round trip. The report is readable once the encoder is submitted and run.
    ///
    /// Submit each step's encoder before encoding the next step: the step's parameters
    /// (step number for the noise, schedule multiplier) are written with
    /// `Queue::write_buffer`, which takes effect at the next submission, so two steps in
    /// one encoder would both run with the later step's parameters.
    pub fn encode(
        &mut self,
        encoder: &mut wgpu::CommandEncoder,
    ) -> Result<PendingReport<PolicyReport>, ClipError> {
        self.prepare(None)?;
        {
            let mut pass = encoder.begin_compute_pass(&wgpu::ComputePassDescriptor {
                label: Some("gradclip policy"),
                timestamp_writes: None,
            });
            self.encode_pass(&mut pass);
        }
        let (readback, step) = self.finish_step(encoder);
        let n_seg = self.layout.segments.len() as u64;
        let norm = self.policy.norm;
        let nf = self.policy.non_finite;
        let global = self.policy.rule.is_global();
        let shape = self.policy.report_groups.then(|| self.shape.clone());
        let n_groups = self.layout.group_ranges.len();
        let units = n_seg as u32;
        Ok(PendingReport::on_submit(
            encoder,
            readback,
            self.pool.clone(),
            self.ctx.inner.device.clone(),
            Box::new(move |w: &[u32]| {
                let detail = shape.map(|shape| {
                    let n = n_seg as usize;
                    let header = abi::words_of::<PolicyHeader>();
                    let units0 = header + abi::words_of::<Acc>() * n_groups;
                    let coefs0 = units0 + abi::words_of::<Acc>() * n;
                    UnitNorms {
                        shape,
                        groups: accs_at(w, header, n_groups),
                        units: accs_at(w, units0, n),
                        coefs: bytemuck::cast_slice(&w[coefs0..coefs0 + n]).to_vec(),
                    }
                });
                let h: PolicyHeader = abi::read(w);
                PolicyOutcome {
                    step,
                    norm,
                    total: h.norm.into(),
                    threshold: h.threshold,
                    coef: h.coef,
                    status: h.status,
                    clipped: h.clipped,
                    units,
                    skips: h.skips,
                    global,
                    policy: nf,
                    detail,
                }
                .report()
            }),
        ))
    }

    /// [`GpuPolicy::encode`], submitted now.
    pub fn run(&mut self) -> Result<PendingReport<PolicyReport>, ClipError> {
        let mut encoder =
            self.ctx
                .inner
                .device
                .create_command_encoder(&wgpu::CommandEncoderDescriptor {
                    label: Some("gradclip policy"),
                });
        let pending = self.encode(&mut encoder)?;
        self.ctx.inner.queue.submit([encoder.finish()]);
        Ok(pending)
    }

    /// Reads the state back (waits for the GPU), to save it with [`PolicyState::to_bytes`].
    pub fn state(&self) -> Result<PolicyState, ClipError> {
        let device = &self.ctx.inner.device;
        let size = self.state_buf.size();
        let staging = device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("gradclip state readback"),
            size,
            usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        let mut encoder = device.create_command_encoder(&Default::default());
        encoder.copy_buffer_to_buffer(&self.state_buf, 0, &staging, 0, size);
        let pending: PendingReport<Vec<u32>> = PendingReport::on_submit(
            &encoder,
            staging,
            ReportPool::new(size),
            device.clone(),
            Box::new(|w: &[u32]| Ok(w.to_vec())),
        );
        self.ctx.inner.queue.submit([encoder.finish()]);
        let mut words = pending.wait()?;
        words.truncate(PolicyState::new(self.layout.history).words.len());
        Ok(PolicyState {
            step: self.step,
            words,
        })
    }

    /// Restores a saved state (from either backend); the next step continues from it.
    pub fn set_state(&mut self, state: &PolicyState) -> Result<(), ClipError> {
        state.check_fits(self.layout.history)?;
        self.ctx
            .inner
            .queue
            .write_buffer(&self.state_buf, 0, bytemuck::cast_slice(&state.words));
        self.step = state.step;
        Ok(())
    }
}
