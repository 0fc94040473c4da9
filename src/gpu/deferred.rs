//! Deferred scaling: what a caller's own pass binds and includes to apply the coefficients
//! a [`GpuClipper::encode_deferred`](crate::GpuClipper::encode_deferred) step left on the
//! device (`shaders/deferred.wgsl`).

use crate::chain::UnitLayout;
use crate::shaders::abi::{STATUS_HELD, STATUS_WORD, ST_LOSS_SCALE};

/// The coefficients of a deferred clip on the device, with the WGSL that reads them.
#[derive(Debug)]
pub struct DeferredClip<'a> {
    pub(crate) coefs: &'a wgpu::Buffer,
    pub(crate) report: &'a wgpu::Buffer,
    pub(crate) layouts: Vec<UnitLayout>,
    pub(crate) zero_nans: bool,
}

impl DeferredClip<'_> {
    /// The coefficient of every unit (f32; for a loss-scaled chain it includes the
    /// unscaling, `1 / scale`), read-only storage: bind it where [`DeferredClip::wgsl`]
    /// declares `gradclip_coefs`.
    pub fn coefficients(&self) -> wgpu::BindingResource<'_> {
        self.coefs.as_entire_binding()
    }

    /// The step's report, read-only storage: bind it where [`DeferredClip::wgsl`]
    /// declares `gradclip_report` (`gradclip_held` reads it).
    pub fn report(&self) -> wgpu::BindingResource<'_> {
        self.report.as_entire_binding()
    }

    /// Where the units of each tensor lie (a tensor that is one unit: `first`).
    pub fn layouts(&self) -> &[UnitLayout] {
        &self.layouts
    }

    /// The WGSL to put in front of a caller's shader: the bindings `gradclip_coefs` (at
    /// `first_binding`) and `gradclip_report` (the next) in bind group `group`, and the
    /// functions `gradclip_held()`, `gradclip_coef(unit)`, `gradclip_unit(first, div,
    /// count, index)` and `gradclip_scaled(x, unit)`.
    pub fn wgsl(&self, group: u32, first_binding: u32) -> String {
        crate::shaders::deferred_template()
            .replace("{group}", &group.to_string())
            .replace("{coefs}", &first_binding.to_string())
            .replace("{report}", &first_binding.saturating_add(1).to_string())
            .replace("{zero_nans}", if self.zero_nans { "true" } else { "false" })
            .replace("{status_word}", &STATUS_WORD.to_string())
            .replace("{held}", &STATUS_HELD.to_string())
    }
}

/// Where a loss-scaled chain keeps its scale on the device
/// ([`crate::GpuClipper::loss_scale_on_device`]), with the WGSL that reads it: a pass of
/// your own multiplies the next loss by it with no read-back. The scale is the one the
/// chain's next step expects; every step updates it on the device, in submission order.
#[derive(Debug, Clone, Copy)]
pub struct LossScaleBinding<'a> {
    pub(crate) state: &'a wgpu::Buffer,
}

impl LossScaleBinding<'_> {
    /// The chain's device state, read-only storage: bind it where
    /// [`LossScaleBinding::wgsl`] declares `gradclip_loss_state`.
    pub fn state(&self) -> wgpu::BindingResource<'_> {
        self.state.as_entire_binding()
    }

    /// The WGSL to put in front of a caller's shader: the binding `gradclip_loss_state`
    /// (bind group `group`, binding `binding`) and the function `gradclip_loss_scale()`.
    pub fn wgsl(&self, group: u32, binding: u32) -> String {
        crate::shaders::loss_scale_template()
            .replace("{group}", &group.to_string())
            .replace("{binding}", &binding.to_string())
            .replace("{word}", &ST_LOSS_SCALE.to_string())
    }
}
