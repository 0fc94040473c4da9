//! A buffer of another `wgpu::Instance` cannot be told apart from one of gradclip's device:
//! wgpu-core looks resource ids up per instance, so the id names whatever buffer of this
//! instance has it. This pins what happens in the one setup tested: planning fails with a
//! typed error (naming one of gradclip's own buffers), and nothing panics. Alone in its
//! binary, so the ids it meets are the same on every run.

mod common;
use gradclip::{ClipError, ClipPolicy, DType, GpuClipper, GpuTensor};

#[test]
fn a_buffer_of_another_instance_is_a_typed_error_not_a_panic() {
    let ctx = common::gpu();
    let instance =
        wgpu::Instance::new(wgpu::InstanceDescriptor::new_without_display_handle_from_env());
    let adapter = pollster::block_on(instance.request_adapter(&Default::default()))
        .expect("an adapter of the second instance");
    let (device, _queue) = pollster::block_on(adapter.request_device(&Default::default()))
        .expect("a device of the second instance");
    let foreign = device.create_buffer(&wgpu::BufferDescriptor {
        label: Some("another instance's gradients"),
        size: 64,
        usage: wgpu::BufferUsages::STORAGE,
        mapped_at_creation: false,
    });
    let planned = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let tensors = [GpuTensor::new(&foreign, 0, 4, DType::F32)];
        GpuClipper::new(&ctx, &tensors, None, ClipPolicy::global_norm(1.0)).map(|_| ())
    }));
    match planned {
        Ok(Err(ClipError::Wgpu(_))) => {}
        Ok(other) => panic!("expected a typed wgpu error, got {other:?}"),
        Err(_) => panic!("planning over another instance's buffer panicked"),
    }
}
