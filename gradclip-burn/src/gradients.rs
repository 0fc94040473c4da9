//! Finding a module's gradients (and parameters) and the wgpu buffer ranges behind them.
//!
//! A Burn gradient is a fusion handle; resolving it (a clone, since resolving the only
//! owner consumes it) gives the cubecl tensor, whose handle names a range of one pooled
//! buffer. The range is looked up every step: the pool may move memory between steps.
//!
//! Burn's backward passes produce gradients in several layouts: in order, or dense in
//! another order (a convolution's weight gradient is a permuted view, strides
//! `[1, 72, 24, 8]` for shape `[8, 1, 3, 3]`). A dense permutation covers exactly its
//! elements' range, and norms and elementwise scaling do not care about order, so it is
//! clipped in place. Only what cannot be (not dense, tiled, or permuted under AGC, whose
//! units follow the axes, or under noise, keyed by each element's index) is replaced by a
//! copy in order first.

use burn::backend::wgpu::{AutoCompiler, CubeBackend, CubeTensor, Wgpu, WgpuResource};
use burn::cubecl::wgpu::WgpuServer;
use burn::module::{Module, ModuleVisitor, Param, ParamId};
use burn::optim::GradientsParams;
use burn::tensor::{DType, Device, Tensor};
use gradclip::{ClipPolicy, GpuTensor};

use crate::error::BurnClipError;

/// One parameter of the module that has a gradient: its path, shape and resolved tensors.
pub(crate) struct Found {
    /// Module path (`encoder.layers.0.weight`), the tensor's name in policies and reports.
    pub path: String,
    pub id: ParamId,
    pub shape: Vec<u64>,
    pub grad: CubeTensor,
    /// Why the gradient must be copied before it can be clipped in place, if it must.
    pub needs_copy: Option<String>,
    /// The parameter's value, when the policy needs it (AGC).
    pub param: Option<CubeTensor>,
    /// Replaces the gradient in `GradientsParams` by a copy of itself, in order, in memory
    /// of its own.
    pub copy: fn(&mut GradientsParams, ParamId),
}

/// The parameters of `module` that have a gradient in `grads`, in visiting order, with
/// it (and their values when `policy` needs the parameters); with `every`, a parameter
/// that requires a gradient and has none is an error. Nothing is changed.
pub(crate) fn collect<M: Module>(
    module: &M,
    grads: &GradientsParams,
    device: &Device,
    policy: &ClipPolicy,
    every: bool,
) -> Result<Vec<Found>, BurnClipError> {
    // What makes a gradient's element order matter: AGC's units are slices along an axis,
    // and noise is keyed by each element's index in its tensor.
    let in_order = if policy.needs_params() {
        Some("AGC needs its rows in order")
    } else if policy.noise.is_some() {
        Some("noise is keyed by each element's index in order")
    } else {
        None
    };
    let mut visitor = Collect {
        grads,
        device,
        with_params: policy.needs_params(),
        every,
        in_order,
        path: Vec::new(),
        found: Vec::new(),
        error: None,
    };
    module.visit(&mut visitor);
    match visitor.error {
        Some(error) => Err(error),
        None => Ok(visitor.found),
    }
}

struct Collect<'a> {
    grads: &'a GradientsParams,
    device: &'a Device,
    with_params: bool,
    /// A parameter that requires a gradient must have one.
    every: bool,
    /// Why a gradient must be in the order of its axes, when the policy needs it.
    in_order: Option<&'static str>,
    path: Vec<String>,
    found: Vec<Found>,
    error: Option<BurnClipError>,
}

impl ModuleVisitor for Collect<'_> {
    fn enter_module(&mut self, name: &str, _container: &str) {
        self.path.push(name.to_string());
    }

    fn exit_module(&mut self, _name: &str, _container: &str) {
        self.path.pop();
    }

    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        // Tied parameters (one id at several paths) are clipped once, under their first path.
        if self.error.is_some() || self.found.iter().any(|f| f.id == param.id) {
            return;
        }
        match self.take(param) {
            Ok(Some(found)) => self.found.push(found),
            Ok(None) => {}
            Err(error) => self.error = Some(error),
        }
    }
}

impl Collect<'_> {
    fn take<const D: usize>(
        &self,
        param: &Param<Tensor<D>>,
    ) -> Result<Option<Found>, BurnClipError> {
        let path = self.path.join(".");
        let value = param.val();
        let Some(grad) = self.grads.get::<D>(param.id) else {
            if self.every && value.is_require_grad() {
                return Err(BurnClipError::MissingGradient { path });
            }
            // A frozen parameter: nothing to clip.
            return Ok(None);
        };
        let shape = grad.shape().iter().map(|&d| d as u64).collect();
        let (grad, order) = self.resolve(&path, grad)?;
        let needs_copy = match order {
            Order::Sequential => None,
            Order::Permuted => self
                .in_order
                .map(|why| format!("{why}; strides {:?}", grad.meta.strides())),
            Order::Other(reason) => Some(reason),
        };
        let value = match self.with_params {
            true => match self.resolve(&path, value.inner())? {
                (value, Order::Sequential) => Some(value),
                (value, _) => {
                    return Err(BurnClipError::Layout {
                        path,
                        reason: format!(
                            "AGC reads the parameter's rows, and its value is a strided view \
                             (strides {:?}); store the parameter in order",
                            value.meta.strides()
                        ),
                    });
                }
            },
            false => None,
        };
        Ok(Some(Found {
            path,
            id: param.id,
            shape,
            grad,
            needs_copy,
            param: value,
            copy: copy::<D>,
        }))
    }

    /// The cubecl tensor behind `tensor` and how its elements lie in its buffer.
    fn resolve<const D: usize>(
        &self,
        path: &str,
        tensor: Tensor<D>,
    ) -> Result<(CubeTensor, Order), BurnClipError> {
        let device = tensor.device();
        if device != *self.device {
            return Err(BurnClipError::ForeignDevice {
                path: path.into(),
                found: format!("{device:?}"),
                expected: format!("{:?}", self.device),
            });
        }
        let dtype = tensor.dtype();
        if !matches!(dtype, DType::F32 | DType::Flex32 | DType::F16 | DType::BF16) {
            return Err(BurnClipError::UnsupportedDType {
                path: path.into(),
                dtype,
            });
        }
        let layout = |reason: String| BurnClipError::Layout {
            path: path.into(),
            reason,
        };
        let fusion = tensor
            .try_into_primitive::<Wgpu>()
            .map_err(|e| layout(format!("not a tensor of Burn's wgpu backend ({e:?})")))?;
        let client = fusion.client.clone();
        let cube = client.resolve_tensor_float::<CubeBackend>(fusion);
        let order = order(&cube);
        Ok((cube, order))
    }
}

/// How a tensor's elements lie in its buffer range.
pub(crate) enum Order {
    /// Dense, in the order of its axes.
    Sequential,
    /// Dense, in another order of its axes: the same range, elements permuted.
    Permuted,
    /// Anything else (broadcast, gaps, overlaps, tiles), and why.
    Other(String),
}

fn order(cube: &CubeTensor) -> Order {
    let (shape, strides) = (cube.meta.shape(), cube.meta.strides());
    if cube.meta.is_tiled() {
        return Order::Other(format!("a tiled layout (shape {shape:?})"));
    }
    if cube.is_contiguous() {
        return Order::Sequential;
    }
    // Dense in some order: the axes of more than one element, by stride, each step the
    // product of the sizes below it (axes of one element may carry any stride).
    let mut axes: Vec<(usize, usize)> = (shape.iter().copied())
        .zip(strides.iter().copied())
        .filter(|&(size, _)| size > 1)
        .collect();
    axes.sort_by_key(|&(_, stride)| stride);
    let mut next = 1;
    for (size, stride) in axes {
        if stride != next {
            return Order::Other(format!("not dense (shape {shape:?}, strides {strides:?})"));
        }
        next *= size;
    }
    Order::Permuted
}

/// `copy` for a rank-`D` gradient: flattening a gradient that is not in order writes it
/// in order, and a multiply by one writes a tensor of its own when the input is shared
/// (the gradients of two parameters in one range); the values stay, NaN and -0 included.
fn copy<const D: usize>(grads: &mut GradientsParams, id: ParamId) {
    if let Some(grad) = grads.remove::<D>(id) {
        let shape = grad.shape();
        let n = shape.num_elements();
        let flat = grad.reshape([n]).mul_scalar(1.0);
        grads.register::<D>(id, flat.reshape(shape));
    }
}

/// A tensor's buffer range, held in place (the pool neither frees nor moves it) until
/// this is dropped, after the step that uses it was submitted.
pub(crate) struct Range {
    /// cubecl's pin on the allocation (its type is not exported).
    _pinned: Box<dyn std::any::Any + Send>,
    buffer: wgpu::Buffer,
    offset: u64,
    len: u64,
    dtype: gradclip::DType,
}

impl Range {
    /// Looks up the range behind `tensor`; it must hold exactly its elements.
    pub(crate) fn of(path: &str, tensor: &CubeTensor) -> Result<Range, BurnClipError> {
        let resource = tensor
            .client
            .get_resource::<WgpuServer<AutoCompiler>>(tensor.handle.clone())
            .map_err(|e| BurnClipError::Runtime(format!("{path:?}: {e}")))?;
        let len = tensor.meta.shape().num_elements() as u64;
        let dtype = match tensor.dtype {
            DType::F16 => gradclip::DType::F16,
            DType::BF16 => gradclip::DType::BF16,
            // Flex32 is stored as f32.
            _ => gradclip::DType::F32,
        };
        let bytes = len * dtype.size();
        let WgpuResource {
            buffer,
            offset,
            size,
            ..
        } = resource.resource().clone();
        if size < bytes {
            return Err(BurnClipError::Layout {
                path: path.into(),
                reason: format!(
                    "its buffer range holds {size} bytes, its {len} elements need {bytes}"
                ),
            });
        }
        Ok(Range {
            _pinned: Box::new(resource),
            buffer,
            offset,
            len,
            dtype,
        })
    }

    /// The range as a gradclip tensor named `path` of shape `shape`.
    pub(crate) fn tensor(&self, path: &str, shape: &[u64]) -> GpuTensor<'_> {
        GpuTensor::new(&self.buffer, self.offset, self.len, self.dtype)
            .named(path)
            .shaped(shape)
    }

    /// True when the two ranges share a byte.
    pub(crate) fn overlaps(&self, other: &Range) -> bool {
        let end = |r: &Range| r.offset + r.len * r.dtype.size();
        self.buffer == other.buffer && self.offset < end(other) && other.offset < end(self)
    }

    /// What identifies the range: buffer, first byte, element count and type.
    pub(crate) fn key(&self) -> (wgpu::Buffer, u64, u64, gradclip::DType) {
        (self.buffer.clone(), self.offset, self.len, self.dtype)
    }
}
