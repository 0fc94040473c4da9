//! Reading a buffer back, for the examples' final checks.

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
