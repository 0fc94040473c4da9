//! The shader modules, bind group layouts and pipeline cache of one device, built from the
//! description in `src/shaders`.

use std::collections::HashMap;
use std::sync::Mutex;

use crate::error::ClipError;
use crate::shaders::{BindLayout, Binding, Family, Kernel};

/// Everything compiled for one device; pipelines are built on first use and kept.
pub(crate) struct Kernels {
    modules: HashMap<Family, wgpu::ShaderModule>,
    layouts: HashMap<BindLayout, wgpu::BindGroupLayout>,
    pipelines: Mutex<HashMap<Kernel, wgpu::ComputePipeline>>,
}

fn layout_entry(binding: u32, kind: Binding) -> wgpu::BindGroupLayoutEntry {
    let ty = match kind {
        Binding::Storage { read_only } => wgpu::BufferBindingType::Storage { read_only },
        Binding::Uniform | Binding::Step => wgpu::BufferBindingType::Uniform,
    };
    wgpu::BindGroupLayoutEntry {
        binding,
        visibility: wgpu::ShaderStages::COMPUTE,
        ty: wgpu::BindingType::Buffer {
            ty,
            has_dynamic_offset: kind == Binding::Step,
            min_binding_size: None,
        },
        count: None,
    }
}

impl Kernels {
    /// The modules and layouts of every family, in an error scope: a device whose driver
    /// rejects one is an error, not a panic.
    pub(crate) fn new(device: &wgpu::Device) -> Result<Kernels, ClipError> {
        let scope = device.push_error_scope(wgpu::ErrorFilter::Validation);
        let modules = Family::ALL
            .iter()
            .map(|&family| {
                let module = device.create_shader_module(wgpu::ShaderModuleDescriptor {
                    label: Some(family.name()),
                    source: wgpu::ShaderSource::Wgsl(family.source().into()),
                });
                (family, module)
            })
            .collect();
        let layouts = BindLayout::ALL
            .iter()
            .map(|&layout| {
                let entries: Vec<_> = layout
                    .entries()
                    .iter()
                    .map(|&(binding, kind)| layout_entry(binding, kind))
                    .collect();
                let group = device.create_bind_group_layout(&wgpu::BindGroupLayoutDescriptor {
                    label: Some("gradclip"),
                    entries: &entries,
                });
                (layout, group)
            })
            .collect();
        if let Some(e) = pollster::block_on(scope.pop()) {
            return Err(ClipError::Wgpu(format!(
                "this device cannot compile gradclip's shaders: {e}"
            )));
        }
        Ok(Kernels {
            modules,
            layouts,
            pipelines: Mutex::new(HashMap::new()),
        })
    }

    /// The bind group layout `layout`.
    pub(crate) fn layout(&self, layout: BindLayout) -> &wgpu::BindGroupLayout {
        &self.layouts[&layout]
    }

    /// Builds the pipelines of `kernels` not built yet, inside an error scope: a device
    /// that cannot run one (its limits, its driver) is an error before anything is
    /// recorded, and nothing invalid is cached.
    pub(crate) fn prepare(
        &self,
        device: &wgpu::Device,
        kernels: &[Kernel],
    ) -> Result<(), ClipError> {
        let mut cache = self.pipelines.lock().unwrap_or_else(|e| e.into_inner());
        for &kernel in kernels {
            if cache.contains_key(&kernel) {
                continue;
            }
            let scope = device.push_error_scope(wgpu::ErrorFilter::Validation);
            let pipeline = self.build(device, kernel);
            if let Some(e) = pollster::block_on(scope.pop()) {
                return Err(ClipError::Wgpu(format!(
                    "this device cannot run {kernel:?}: {e}"
                )));
            }
            cache.insert(kernel, pipeline);
        }
        Ok(())
    }

    /// The pipeline of `kernel`, built once per device (see [`Kernels::prepare`]).
    pub(crate) fn pipeline(&self, device: &wgpu::Device, kernel: Kernel) -> wgpu::ComputePipeline {
        let mut cache = self.pipelines.lock().unwrap_or_else(|e| e.into_inner());
        cache
            .entry(kernel)
            .or_insert_with(|| self.build(device, kernel))
            .clone()
    }

    fn build(&self, device: &wgpu::Device, kernel: Kernel) -> wgpu::ComputePipeline {
        let spec = kernel.spec();
        let pipeline_layout = device.create_pipeline_layout(&wgpu::PipelineLayoutDescriptor {
            label: Some("gradclip"),
            bind_group_layouts: &[Some(self.layout(spec.layout))],
            immediate_size: 0,
        });
        device.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
            label: Some(spec.entry),
            layout: Some(&pipeline_layout),
            module: &self.modules[&spec.family],
            entry_point: Some(spec.entry),
            compilation_options: wgpu::PipelineCompilationOptions {
                constants: &spec.constants,
                zero_initialize_workgroup_memory: false,
            },
            cache: None,
        })
    }
}
