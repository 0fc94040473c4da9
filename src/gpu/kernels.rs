//! Shader modules, bind group layouts and the pipeline cache of one device.

use std::collections::HashMap;
use std::sync::Mutex;

const COMMON: &str = include_str!("../../shaders/common.wgsl");
const NORM_REDUCE: &str = include_str!("../../shaders/norm_reduce.wgsl");
const NORM_FINISH: &str = include_str!("../../shaders/norm_finish.wgsl");
const APPLY: &str = include_str!("../../shaders/apply.wgsl");
const PHILOX: &str = include_str!("../../shaders/philox.wgsl");
const POLICY: &str = include_str!("../../shaders/policy.wgsl");
const SEGMENT_APPLY: &str = include_str!("../../shaders/segment_apply.wgsl");
const PER_EXAMPLE: &str = include_str!("../../shaders/per_example.wgsl");
const ACCUMULATE: &str = include_str!("../../shaders/accumulate.wgsl");

/// A compute pipeline the library uses, with its override constants (`NORM_KIND`, `OP`,
/// `ADAPTIVE`, `FORMULA`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum Kernel {
    Reduce(u32),
    TensorNorms(u32),
    Total(u32),
    Apply(u32),
    PolicyFinish {
        kind: u32,
        adaptive: u32,
    },
    PolicyCoefs {
        kind: u32,
        adaptive: u32,
        formula: u32,
    },
    SegmentApply,
    PerExample,
    Accumulate,
}

/// `OP` of `shaders/apply.wgsl`.
pub(crate) const OP_SCALE: u32 = 0;
pub(crate) const OP_CLAMP: u32 = 1;

/// Everything compiled for one device; pipelines are built on first use and kept.
pub(crate) struct Kernels {
    norm_reduce: wgpu::ShaderModule,
    norm_finish: wgpu::ShaderModule,
    apply: wgpu::ShaderModule,
    policy: wgpu::ShaderModule,
    segment_apply: wgpu::ShaderModule,
    per_example: wgpu::ShaderModule,
    accumulate: wgpu::ShaderModule,
    /// Layout of `norm_reduce` and of `tensor_norms` (same binding shapes).
    pub reduce_layout: wgpu::BindGroupLayout,
    pub total_layout: wgpu::BindGroupLayout,
    pub apply_layout: wgpu::BindGroupLayout,
    pub policy_layout: wgpu::BindGroupLayout,
    pub segment_apply_layout: wgpu::BindGroupLayout,
    pub per_example_layout: wgpu::BindGroupLayout,
    pub accumulate_layout: wgpu::BindGroupLayout,
    pipelines: Mutex<HashMap<Kernel, wgpu::ComputePipeline>>,
}

fn storage(binding: u32, read_only: bool) -> wgpu::BindGroupLayoutEntry {
    entry(binding, wgpu::BufferBindingType::Storage { read_only })
}

fn uniform(binding: u32) -> wgpu::BindGroupLayoutEntry {
    entry(binding, wgpu::BufferBindingType::Uniform)
}

fn entry(binding: u32, ty: wgpu::BufferBindingType) -> wgpu::BindGroupLayoutEntry {
    wgpu::BindGroupLayoutEntry {
        binding,
        visibility: wgpu::ShaderStages::COMPUTE,
        ty: wgpu::BindingType::Buffer {
            ty,
            has_dynamic_offset: false,
            min_binding_size: None,
        },
        count: None,
    }
}

impl Kernels {
    pub(crate) fn new(device: &wgpu::Device) -> Kernels {
        let module = |label: &str, src: &str| {
            device.create_shader_module(wgpu::ShaderModuleDescriptor {
                label: Some(label),
                source: wgpu::ShaderSource::Wgsl(format!("{COMMON}\n{src}").into()),
            })
        };
        let layout = |label: &str, entries: &[wgpu::BindGroupLayoutEntry]| {
            device.create_bind_group_layout(&wgpu::BindGroupLayoutDescriptor {
                label: Some(label),
                entries,
            })
        };
        Kernels {
            norm_reduce: module("gradclip norm_reduce", NORM_REDUCE),
            norm_finish: module("gradclip norm_finish", NORM_FINISH),
            apply: module("gradclip apply", APPLY),
            policy: module("gradclip policy", POLICY),
            segment_apply: module(
                "gradclip segment_apply",
                &format!("{PHILOX}\n{SEGMENT_APPLY}"),
            ),
            per_example: module("gradclip per_example", &format!("{PHILOX}\n{PER_EXAMPLE}")),
            accumulate: module("gradclip accumulate", ACCUMULATE),
            reduce_layout: layout(
                "gradclip reduce",
                &[
                    storage(0, true),
                    storage(1, true),
                    storage(2, false),
                    uniform(3),
                    uniform(4),
                ],
            ),
            total_layout: layout(
                "gradclip total",
                &[
                    storage(0, true),
                    uniform(3),
                    uniform(4),
                    storage(5, false),
                    storage(6, true),
                    storage(7, false),
                ],
            ),
            apply_layout: layout(
                "gradclip apply",
                &[
                    storage(0, false),
                    storage(1, true),
                    storage(2, true),
                    uniform(3),
                    uniform(4),
                ],
            ),
            policy_layout: layout(
                "gradclip policy",
                &[
                    storage(0, true),
                    storage(1, false),
                    storage(2, false),
                    uniform(3),
                    uniform(4),
                    uniform(5),
                    storage(6, true),
                    storage(7, false),
                    storage(8, true),
                    storage(9, true),
                ],
            ),
            segment_apply_layout: layout(
                "gradclip segment_apply",
                &[
                    storage(0, false),
                    storage(1, true),
                    storage(2, true),
                    uniform(3),
                    uniform(4),
                    uniform(5),
                    storage(6, true),
                ],
            ),
            per_example_layout: layout(
                "gradclip per_example",
                &[
                    storage(0, true),
                    storage(1, false),
                    storage(2, true),
                    uniform(3),
                    uniform(4),
                    storage(5, true),
                ],
            ),
            accumulate_layout: layout(
                "gradclip accumulate",
                &[
                    storage(0, false),
                    storage(1, true),
                    storage(2, true),
                    uniform(3),
                ],
            ),
            pipelines: Mutex::new(HashMap::new()),
        }
    }

    /// The pipeline of `kernel`, built once per device.
    pub(crate) fn pipeline(&self, device: &wgpu::Device, kernel: Kernel) -> wgpu::ComputePipeline {
        let mut cache = self.pipelines.lock().unwrap_or_else(|e| e.into_inner());
        cache
            .entry(kernel)
            .or_insert_with(|| {
                let kind = |k: u32| vec![("NORM_KIND", k as f64)];
                let (module, entry, layout, constants) = match kernel {
                    Kernel::Reduce(k) => (&self.norm_reduce, "main", &self.reduce_layout, kind(k)),
                    Kernel::TensorNorms(k) => (
                        &self.norm_finish,
                        "tensor_norms",
                        &self.reduce_layout,
                        kind(k),
                    ),
                    Kernel::Total(k) => (&self.norm_finish, "total", &self.total_layout, kind(k)),
                    Kernel::Apply(op) => (
                        &self.apply,
                        "main",
                        &self.apply_layout,
                        vec![("OP", op as f64)],
                    ),
                    Kernel::PolicyFinish { kind: k, adaptive } => (
                        &self.policy,
                        "finish",
                        &self.policy_layout,
                        vec![("NORM_KIND", k as f64), ("ADAPTIVE", adaptive as f64)],
                    ),
                    Kernel::PolicyCoefs {
                        kind: k,
                        adaptive,
                        formula,
                    } => (
                        &self.policy,
                        "coefs",
                        &self.policy_layout,
                        vec![
                            ("NORM_KIND", k as f64),
                            ("ADAPTIVE", adaptive as f64),
                            ("FORMULA", formula as f64),
                        ],
                    ),
                    Kernel::SegmentApply => (
                        &self.segment_apply,
                        "main",
                        &self.segment_apply_layout,
                        vec![],
                    ),
                    Kernel::PerExample => {
                        (&self.per_example, "main", &self.per_example_layout, vec![])
                    }
                    Kernel::Accumulate => {
                        (&self.accumulate, "main", &self.accumulate_layout, vec![])
                    }
                };
                let pipeline_layout =
                    device.create_pipeline_layout(&wgpu::PipelineLayoutDescriptor {
                        label: Some("gradclip"),
                        bind_group_layouts: &[Some(layout)],
                        immediate_size: 0,
                    });
                device.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
                    label: Some(entry),
                    layout: Some(&pipeline_layout),
                    module,
                    entry_point: Some(entry),
                    compilation_options: wgpu::PipelineCompilationOptions {
                        constants: &constants,
                        zero_initialize_workgroup_memory: false,
                    },
                    cache: None,
                })
            })
            .clone()
    }
}
