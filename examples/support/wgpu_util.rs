//! The examples' own wgpu plumbing: a compute pipeline from WGSL, and reading a buffer
//! back for their checks.

use gradclip::GpuContext;

/// Reads an f32 buffer back (once, at the end: the training loops never do).
pub fn read_back(
    ctx: &GpuContext,
    buffer: &wgpu::Buffer,
) -> Result<Vec<f32>, Box<dyn std::error::Error>> {
    let staging = ctx.device().create_buffer(&wgpu::BufferDescriptor {
        label: Some("staging"),
        size: buffer.size(),
        usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
        mapped_at_creation: false,
    });
    let mut encoder = ctx.device().create_command_encoder(&Default::default());
    encoder.copy_buffer_to_buffer(buffer, 0, &staging, 0, buffer.size());
    ctx.queue().submit([encoder.finish()]);
    staging.slice(..).map_async(wgpu::MapMode::Read, |_| {});
    ctx.device().poll(wgpu::PollType::wait_indefinitely())?;
    let data = bytemuck::cast_slice(&staging.slice(..).get_mapped_range()?).to_vec();
    Ok(data)
}

/// A compute pipeline of the entry point `entry` of `source`, its layout from the shader.
pub fn pipeline(device: &wgpu::Device, source: &str, entry: &str) -> wgpu::ComputePipeline {
    let module = device.create_shader_module(wgpu::ShaderModuleDescriptor {
        label: None,
        source: wgpu::ShaderSource::Wgsl(source.into()),
    });
    device.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
        label: Some(entry),
        layout: None,
        module: &module,
        entry_point: Some(entry),
        compilation_options: Default::default(),
        cache: None,
    })
}
