//! Gradient tensors in caller-owned buffers, and how they are checked and planned.

use super::context::GpuContext;
use crate::chain::TensorInfo;
use crate::dtype::DType;
use crate::error::ClipError;
use crate::norm::PartialNorm;
use crate::plan::{Plan, PlanLimits, PlanSegment, PlanTensor};
use crate::shaders::abi::Acc;

/// One gradient tensor inside a caller-owned `wgpu::Buffer`.
#[derive(Debug, Clone)]
pub struct GpuTensor<'a> {
    /// The buffer; it needs `BufferUsages::STORAGE`.
    pub buffer: &'a wgpu::Buffer,
    /// Byte offset of the first element; a multiple of the element size.
    pub offset: u64,
    /// Number of elements.
    pub len: u64,
    /// Element type.
    pub dtype: DType,
    /// Optional name, used in error messages and matched by policy name patterns.
    pub name: Option<String>,
    /// Optional shape (its product must be `len`), needed by AGC for weights of rank >= 2.
    pub shape: Option<Vec<u64>>,
}

impl<'a> GpuTensor<'a> {
    /// A tensor of `len` elements of `dtype` at byte `offset` of `buffer`.
    pub fn new(buffer: &'a wgpu::Buffer, offset: u64, len: u64, dtype: DType) -> Self {
        GpuTensor {
            buffer,
            offset,
            len,
            dtype,
            name: None,
            shape: None,
        }
    }

    /// Gives the tensor a shape (for AGC units).
    pub fn shaped(mut self, shape: &[u64]) -> Self {
        self.shape = Some(shape.to_vec());
        self
    }

    /// Name and shape as policies see them (`#i` and `[len]` when not given).
    pub(crate) fn info(&self, i: usize) -> TensorInfo {
        TensorInfo {
            name: TensorInfo::name_of(self.name.as_deref(), i),
            shape: self.shape.clone().unwrap_or_else(|| vec![self.len]),
        }
    }

    /// Whether it is the tensor `info` describes at index `i` of its batch (its name, or
    /// `#i` without one, and its shape), without making either.
    pub(crate) fn is(&self, i: usize, info: &TensorInfo) -> bool {
        let shape = self
            .shape
            .as_deref()
            .unwrap_or(std::slice::from_ref(&self.len));
        let name = match &self.name {
            Some(name) => *name == info.name,
            None => is_index_name(&info.name, i),
        };
        name && shape == info.shape
    }

    /// Gives the tensor a name.
    pub fn named(mut self, name: impl Into<String>) -> Self {
        self.name = Some(name.into());
        self
    }
}

/// Where a planned tensor lies and what it is: a rebind to tensors that are all the same
/// as before has nothing to do.
#[derive(Debug)]
pub(crate) struct Bound {
    buffer: wgpu::Buffer,
    offset: u64,
    len: u64,
    dtype: DType,
    name: Option<String>,
    shape: Option<Vec<u64>>,
}

impl Bound {
    /// The bindings of `tensors`.
    pub(crate) fn all(tensors: &[GpuTensor<'_>]) -> Vec<Bound> {
        (tensors.iter())
            .map(|t| Bound {
                buffer: t.buffer.clone(),
                offset: t.offset,
                len: t.len,
                dtype: t.dtype,
                name: t.name.clone(),
                shape: t.shape.clone(),
            })
            .collect()
    }

    /// Makes `bound` hold `tensors`, keeping what it allocated where it can.
    pub(crate) fn set(bound: &mut Vec<Bound>, tensors: &[GpuTensor<'_>]) {
        bound.truncate(tensors.len());
        for (b, t) in bound.iter_mut().zip(tensors) {
            if b.buffer != *t.buffer {
                b.buffer = t.buffer.clone();
            }
            (b.offset, b.len, b.dtype) = (t.offset, t.len, t.dtype);
            b.name.clone_from(&t.name);
            b.shape.clone_from(&t.shape);
        }
        let have = bound.len();
        bound.extend(Bound::all(&tensors[have..]));
    }

    /// True when `tensors` are, one for one, the tensors `bound` holds.
    pub(crate) fn same(bound: &[Bound], tensors: &[GpuTensor<'_>]) -> bool {
        bound.len() == tensors.len()
            && bound.iter().zip(tensors).all(|(b, t)| {
                (&b.buffer, b.offset, b.len, b.dtype) == (t.buffer, t.offset, t.len, t.dtype)
                    && b.name == t.name
                    && b.shape == t.shape
            })
    }
}

/// Whether `name` is `#i`, the name of an unnamed tensor at index `i`.
fn is_index_name(name: &str, i: usize) -> bool {
    let Some(digits) = name.strip_prefix('#') else {
        return false;
    };
    // Compared digit by digit from the last, so a rebind formats nothing.
    let (mut rest, mut digits) = (i, digits.bytes().rev());
    loop {
        if digits.next() != Some(b'0' + (rest % 10) as u8) {
            return false;
        }
        rest /= 10;
        if rest == 0 {
            return digits.next().is_none();
        }
    }
}

/// The names and shapes of `tensors` (unnamed ones are `#index`).
pub(crate) fn infos_of(tensors: &[GpuTensor<'_>]) -> Vec<TensorInfo> {
    tensors.iter().enumerate().map(|(i, t)| t.info(i)).collect()
}

/// The planner's view of `tensors` (shard starts `bases`) and the distinct buffers it
/// indexes; checks that every buffer can be bound as storage.
pub(crate) fn plan_inputs<'a, 't>(
    tensors: &'t [GpuTensor<'a>],
    bases: &[u64],
) -> Result<(Vec<PlanTensor<'t>>, Vec<&'a wgpu::Buffer>), ClipError> {
    let mut buffers: Vec<&wgpu::Buffer> = Vec::new();
    let mut plan_tensors = Vec::with_capacity(tensors.len());
    for (i, t) in tensors.iter().enumerate() {
        let buffer = match buffers.iter().position(|b| *b == t.buffer) {
            Some(b) => b,
            None => {
                buffers.push(t.buffer);
                buffers.len() - 1
            }
        };
        plan_tensors.push(PlanTensor {
            buffer,
            buffer_size: t.buffer.size(),
            offset: t.offset,
            len: t.len,
            dtype: t.dtype,
            label: t.name.as_deref(),
            index: i,
            base: bases.get(i).copied().unwrap_or(0),
        });
        if !t.buffer.usage().contains(wgpu::BufferUsages::STORAGE) {
            let tensor = plan_tensors[i].name();
            return Err(ClipError::MissingStorageUsage { tensor });
        }
    }
    Ok((plan_tensors, buffers))
}

/// The limits of `ctx`'s device that shape a plan.
pub(crate) fn plan_limits(ctx: &GpuContext) -> PlanLimits {
    let limits = ctx.inner.device.limits();
    PlanLimits {
        max_binding: limits.max_storage_buffer_binding_size,
        offset_alignment: limits.min_storage_buffer_offset_alignment as u64,
        max_workgroups_per_dim: limits.max_compute_workgroups_per_dimension,
    }
}

/// Checks `tensors` and plans them over the segments `segments` makes of them; returns
/// the plan and the distinct buffers its windows index.
pub(crate) fn plan_tensors<'a>(
    ctx: &GpuContext,
    tensors: &[GpuTensor<'a>],
    bases: &[u64],
    segments: impl FnOnce(&[PlanTensor]) -> Vec<PlanSegment>,
) -> Result<(Plan, Vec<&'a wgpu::Buffer>), ClipError> {
    let (plan_tensors, buffers) = plan_inputs(tensors, bases)?;
    let segments = segments(&plan_tensors);
    let plan = Plan::new(&plan_tensors, &segments, plan_limits(ctx))?;
    Ok((plan, buffers))
}

/// A host partial norm as the shader's f32 `Acc`; a scale beyond f32 range is moved to
/// f32::MAX with its sum rescaled.
pub(crate) fn given_acc(total: &PartialNorm) -> Acc {
    let d = total.acc().on_device(total.norm());
    Acc {
        scale: d.scale as f32,
        sum: d.sum as f32,
        flags: d.flags,
        _pad: 0,
    }
}

#[cfg(test)]
mod tests {
    use super::is_index_name;

    /// A rebind matches unnamed tensors by `#index` without formatting it: exactly the
    /// names `format!("#{i}")` makes.
    #[test]
    fn index_names_match_only_their_own_index() {
        for i in [0, 7, 10, 99, 100, 12345, usize::MAX] {
            assert!(is_index_name(&format!("#{i}"), i), "{i}");
            for other in [
                format!("#0{i}"),
                format!("#+{i}"),
                format!("{i}"),
                format!("#{i}0"),
            ] {
                assert!(!is_index_name(&other, i), "{other} as {i}");
            }
            assert!(!is_index_name(&format!("#{}", i.wrapping_add(1)), i));
        }
        assert!(!is_index_name("#", 0) && !is_index_name("", 0) && !is_index_name("#00", 0));
    }
}
