//! The device a batch runs on: adapter choice, device creation, the kernel cache.

use std::sync::{Arc, OnceLock};

use super::kernels::Kernels;
use crate::error::ClipError;

/// A wgpu device and queue with gradclip's kernels; cheap to clone.
#[derive(Clone)]
pub struct GpuContext {
    pub(crate) inner: Arc<ContextInner>,
}

pub(crate) struct ContextInner {
    pub device: wgpu::Device,
    pub queue: wgpu::Queue,
    pub info: Option<wgpu::AdapterInfo>,
    pub kernels: Kernels,
}

impl std::fmt::Debug for GpuContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GpuContext")
            .field("adapter", &self.inner.info)
            .finish()
    }
}

/// Order of preference: real GPUs first, then software rasterisers such as lavapipe.
fn rank(info: &wgpu::AdapterInfo) -> u8 {
    match info.device_type {
        wgpu::DeviceType::DiscreteGpu => 0,
        wgpu::DeviceType::IntegratedGpu => 1,
        wgpu::DeviceType::VirtualGpu => 2,
        wgpu::DeviceType::Other => 3,
        wgpu::DeviceType::Cpu => 4,
    }
}

impl GpuContext {
    /// Opens the best adapter: a hardware GPU if there is one, else a software one
    /// (lavapipe, WARP, llvmpipe). Honours wgpu's environment variables: `WGPU_BACKEND`
    /// (which backends to search), `WGPU_ADAPTER_NAME` (a substring of the adapter name
    /// to require) and `WGPU_POWER_PREF` (`low`/`high`, between two hardware GPUs).
    /// The device gets the adapter's own limits, so large buffers bind in few windows.
    ///
    /// GL adapters are taken only when asked for (`WGPU_BACKEND=gl`, or
    /// [`GpuContext::with_backends`]): wgpu's GL backend shares one EGL context between
    /// threads and panics when two threads use it at once, so a GL device must be used
    /// from one thread at a time.
    pub fn new() -> Result<GpuContext, ClipError> {
        Self::open(|adapter| adapter.clone(), Self::default_backends(), false)
    }

    /// The backends [`GpuContext::new`] searches: `WGPU_BACKEND`'s when set, else every
    /// backend but GL.
    pub fn default_backends() -> wgpu::Backends {
        wgpu::Backends::from_env().unwrap_or(wgpu::Backends::all() - wgpu::Backends::GL)
    }

    /// Like [`GpuContext::new`], among adapters of `backends` only (GL included when
    /// named: use a GL device from one thread at a time).
    pub fn with_backends(backends: wgpu::Backends) -> Result<GpuContext, ClipError> {
        Self::open(|adapter| adapter.clone(), backends, false)
    }

    /// Like [`GpuContext::new`], but only a hardware GPU: a software adapter (one that
    /// reports itself as a CPU device) is a [`ClipError::NoAdapter`]. [`crate::Backend::best`]
    /// uses it, because the CPU path beats a software adapter on host data.
    pub fn hardware() -> Result<GpuContext, ClipError> {
        Self::open(|adapter| adapter.clone(), Self::default_backends(), true)
    }

    /// Like [`GpuContext::with_backends`], with device limits chosen from the adapter's
    /// limits. Tests use it to request small binding sizes and workgroup counts.
    pub fn with_limits(
        backends: wgpu::Backends,
        choose: impl Fn(&wgpu::Limits) -> wgpu::Limits,
    ) -> Result<GpuContext, ClipError> {
        Self::open(choose, backends, false)
    }

    fn open(
        choose: impl Fn(&wgpu::Limits) -> wgpu::Limits,
        backends: wgpu::Backends,
        hardware_only: bool,
    ) -> Result<GpuContext, ClipError> {
        // One instance per process: devices of one instance detect each other's buffers
        // as a validation error instead of wgpu-core failing an internal assertion.
        static INSTANCE: OnceLock<wgpu::Instance> = OnceLock::new();
        let instance = INSTANCE.get_or_init(|| {
            wgpu::Instance::new(wgpu::InstanceDescriptor::new_without_display_handle_from_env())
        });
        let mut adapters = pollster::block_on(instance.enumerate_adapters(backends));
        if adapters.is_empty() {
            return Err(ClipError::NoAdapter(
                "wgpu found no adapter (install a GPU driver, or Mesa's lavapipe: apt-get install mesa-vulkan-drivers)".into(),
            ));
        }
        if let Ok(name) = std::env::var("WGPU_ADAPTER_NAME") {
            let name = name.to_lowercase();
            adapters.retain(|a| a.get_info().name.to_lowercase().contains(&name));
            if adapters.is_empty() {
                return Err(ClipError::NoAdapter(format!(
                    "no adapter name contains {name:?}"
                )));
            }
        }
        if hardware_only {
            adapters.retain(|a| a.get_info().device_type != wgpu::DeviceType::Cpu);
            if adapters.is_empty() {
                return Err(ClipError::NoAdapter(
                    "no hardware GPU (only software adapters)".into(),
                ));
            }
        }
        let high = wgpu::PowerPreference::from_env() != Some(wgpu::PowerPreference::LowPower);
        adapters.sort_by_key(|a| {
            let info = a.get_info();
            let r = rank(&info);
            // Between discrete and integrated, WGPU_POWER_PREF=low prefers integrated.
            let r = if !high && r <= 1 { 1 - r } else { r };
            (r, info.name)
        });
        let mut last_error = String::new();
        for adapter in adapters {
            let limits = choose(&adapter.limits());
            let features = adapter.features() & wgpu::Features::TIMESTAMP_QUERY;
            let request = adapter.request_device(&wgpu::DeviceDescriptor {
                label: Some("gradclip"),
                required_features: features,
                required_limits: limits,
                ..Default::default()
            });
            match pollster::block_on(request) {
                Ok((device, queue)) => match Self::build(device, queue, Some(adapter.get_info())) {
                    Ok(ctx) => return Ok(ctx),
                    // This adapter cannot compile the shaders: try the next.
                    Err(e) => last_error = format!("{}: {e}", adapter.get_info().name),
                },
                Err(e) => last_error = format!("{}: {e}", adapter.get_info().name),
            }
        }
        Err(ClipError::NoAdapter(last_error))
    }

    /// Uses the caller's device and queue (the usual case inside a training program).
    /// Fails ([`ClipError::Wgpu`]) when the device cannot compile gradclip's shaders.
    pub fn from_device(device: wgpu::Device, queue: wgpu::Queue) -> Result<GpuContext, ClipError> {
        Self::build(device, queue, None)
    }

    fn build(
        device: wgpu::Device,
        queue: wgpu::Queue,
        info: Option<wgpu::AdapterInfo>,
    ) -> Result<GpuContext, ClipError> {
        let kernels = Kernels::new(&device)?;
        Ok(GpuContext {
            inner: Arc::new(ContextInner {
                device,
                queue,
                info,
                kernels,
            }),
        })
    }

    /// Records a step of `runner` into an encoder of its own and submits it, recording and
    /// submission both inside error scopes: a recording that hit a wgpu error is never
    /// submitted. When anything fails nothing ran, so `undo` puts back what recording
    /// advanced (step counters, micro-batch counts). The one way every runner submits.
    pub(crate) fn record_and_submit<R, T>(
        &self,
        label: &str,
        runner: &mut R,
        record: impl FnOnce(&mut R, &mut wgpu::CommandEncoder) -> Result<T, ClipError>,
        undo: impl FnOnce(&mut R),
    ) -> Result<T, ClipError> {
        let device = &self.inner.device;
        let recorded = guarded(device, || {
            let mut encoder = device
                .create_command_encoder(&wgpu::CommandEncoderDescriptor { label: Some(label) });
            let out = record(runner, &mut encoder)?;
            Ok((encoder, out))
        });
        let submitted = recorded.and_then(|(encoder, out)| {
            self.submit(encoder)?;
            Ok(out)
        });
        if submitted.is_err() {
            undo(runner);
        }
        submitted
    }

    /// Finishes and submits `encoder` inside validation and out-of-memory error scopes: a
    /// rejected submission (a caller's buffer destroyed since planning, say) is an error
    /// instead of wgpu's panic, and none of its work ran.
    pub(crate) fn submit(&self, encoder: wgpu::CommandEncoder) -> Result<(), ClipError> {
        let queue = &self.inner.queue;
        guarded(&self.inner.device, || Ok(queue.submit([encoder.finish()])))
            .map(|_| ())
            .map_err(|e| match e {
                ClipError::Wgpu(e) => {
                    ClipError::Wgpu(format!("wgpu rejected the step (nothing ran): {e}"))
                }
                other => other,
            })
    }

    /// The adapter chosen by [`GpuContext::new`]; `None` for [`GpuContext::from_device`].
    pub fn adapter_info(&self) -> Option<&wgpu::AdapterInfo> {
        self.inner.info.as_ref()
    }

    /// The device.
    pub fn device(&self) -> &wgpu::Device {
        &self.inner.device
    }

    /// The queue.
    pub fn queue(&self) -> &wgpu::Queue {
        &self.inner.queue
    }
}

/// Runs `f` inside internal, out-of-memory and validation error scopes, so that a wgpu error it
/// causes comes back as [`ClipError::Wgpu`] and never reaches the device's
/// uncaptured-error handler (which panics by default, and under Burn's cubecl).
pub(crate) fn guarded<T>(
    device: &wgpu::Device,
    f: impl FnOnce() -> Result<T, ClipError>,
) -> Result<T, ClipError> {
    let internal = device.push_error_scope(wgpu::ErrorFilter::Internal);
    let oom = device.push_error_scope(wgpu::ErrorFilter::OutOfMemory);
    let validation = device.push_error_scope(wgpu::ErrorFilter::Validation);
    let out = f();
    let invalid = pollster::block_on(validation.pop());
    let out_of_memory = pollster::block_on(oom.pop());
    let internal = pollster::block_on(internal.pop());
    match invalid.or(out_of_memory).or(internal) {
        Some(e) => Err(ClipError::Wgpu(e.to_string())),
        None => out,
    }
}
