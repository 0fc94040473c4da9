//! One wgpu device shared by Burn and gradclip.

use burn::tensor::Device;
use burn::tensor::wgpu::{WgpuOptions, WgpuSetup};
use gradclip::GpuContext;

use crate::error::BurnClipError;

/// Burn's wgpu device and the same device as a gradclip [`GpuContext`]: gradients are
/// clipped on the queue Burn computes them on, with no copy.
///
/// Two ways to get one: let Burn create the device ([`SharedDevice::init`],
/// [`SharedDevice::with_options`]), or create it yourself and hand it to both
/// ([`SharedDevice::from_setup`]). Either way this must happen before any tensor touches
/// the device: a runtime Burn started lazily does not give its wgpu device back.
#[derive(Clone)]
pub struct SharedDevice {
    device: Device,
    setup: WgpuSetup,
    gpu: GpuContext,
}

impl std::fmt::Debug for SharedDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedDevice")
            .field("device", &self.device)
            .field("adapter", &self.setup.adapter.get_info().name)
            .field("backend", &self.setup.backend)
            .finish()
    }
}

impl SharedDevice {
    /// Burn creates its default wgpu device (`Device::wgpu_options().init_with_setup()`).
    pub fn init() -> Result<SharedDevice, BurnClipError> {
        Self::with_options(Device::wgpu_options())
    }

    /// Burn creates the wgpu device `options` describe (adapter kind, graphics API,
    /// memory configuration).
    pub fn with_options(options: WgpuOptions) -> Result<SharedDevice, BurnClipError> {
        let (device, setup) = options
            .init_with_setup()
            .map_err(|e| BurnClipError::Runtime(e.to_string()))?;
        Self::new(device, setup)
    }

    /// A wgpu device you created is registered with Burn
    /// (`Device::wgpu_options().setup(setup).init()`) and used by gradclip. Request it as
    /// Burn would: the adapter's features (without `MAPPABLE_PRIMARY_BUFFERS`) and its
    /// limits. Register a setup once; clone the `SharedDevice` to share it.
    pub fn from_setup(setup: WgpuSetup) -> Result<SharedDevice, BurnClipError> {
        let device = Device::wgpu_options()
            .setup(setup.clone())
            .init()
            .map_err(|e| BurnClipError::Runtime(e.to_string()))?;
        Self::new(device, setup)
    }

    fn new(device: Device, setup: WgpuSetup) -> Result<SharedDevice, BurnClipError> {
        let gpu = GpuContext::from_device(setup.device.clone(), setup.queue.clone())?;
        Ok(SharedDevice { device, setup, gpu })
    }

    /// Burn's device, without autodiff: gradients live here.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Burn's device with autodiff, for the model and its inputs.
    pub fn autodiff(&self) -> Device {
        self.device.clone().autodiff()
    }

    /// The wgpu instance, adapter, device and queue Burn runs on.
    pub fn setup(&self) -> &WgpuSetup {
        &self.setup
    }

    /// The same device as a gradclip context.
    pub fn gpu(&self) -> &GpuContext {
        &self.gpu
    }
}
