//! Element types of gradient tensors and their host views.

use half::{bf16, f16};
use std::fmt;

/// Element type of a gradient tensor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DType {
    /// IEEE binary32.
    F32,
    /// IEEE binary16.
    F16,
    /// bfloat16: the upper half of an f32.
    BF16,
}

impl DType {
    /// Size of one element in bytes.
    pub fn size(self) -> u64 {
        match self {
            DType::F32 => 4,
            DType::F16 | DType::BF16 => 2,
        }
    }

    /// The code the shaders use (`DTYPE_*` of `src/shaders/abi.rs`).
    pub(crate) fn shader_code(self) -> u32 {
        use crate::shaders::abi::{DTYPE_BF16, DTYPE_F16, DTYPE_F32};
        match self {
            DType::F32 => DTYPE_F32,
            DType::F16 => DTYPE_F16,
            DType::BF16 => DTYPE_BF16,
        }
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            DType::F32 => "f32",
            DType::F16 => "f16",
            DType::BF16 => "bf16",
        })
    }
}

/// A read-only view of one gradient tensor on the host.
#[derive(Debug, Clone, Copy)]
pub enum GradRef<'a> {
    /// f32 elements.
    F32(&'a [f32]),
    /// f16 elements.
    F16(&'a [f16]),
    /// bf16 elements.
    BF16(&'a [bf16]),
}

/// A mutable view of one gradient tensor on the host, clipped in place.
#[derive(Debug)]
pub enum GradMut<'a> {
    /// f32 elements.
    F32(&'a mut [f32]),
    /// f16 elements.
    F16(&'a mut [f16]),
    /// bf16 elements.
    BF16(&'a mut [bf16]),
}

impl GradRef<'_> {
    /// Number of elements.
    pub fn len(&self) -> usize {
        match self {
            GradRef::F32(s) => s.len(),
            GradRef::F16(s) => s.len(),
            GradRef::BF16(s) => s.len(),
        }
    }

    /// True when the tensor has no elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Element type.
    pub fn dtype(&self) -> DType {
        match self {
            GradRef::F32(_) => DType::F32,
            GradRef::F16(_) => DType::F16,
            GradRef::BF16(_) => DType::BF16,
        }
    }

    /// The raw bytes, as the GPU path uploads them.
    pub fn as_bytes(&self) -> &[u8] {
        match self {
            GradRef::F32(s) => bytemuck::cast_slice(s),
            GradRef::F16(s) => bytemuck::cast_slice(s),
            GradRef::BF16(s) => bytemuck::cast_slice(s),
        }
    }
}

impl<'a> GradMut<'a> {
    /// A read-only view of the same data.
    pub fn as_ref(&self) -> GradRef<'_> {
        match self {
            GradMut::F32(s) => GradRef::F32(s),
            GradMut::F16(s) => GradRef::F16(s),
            GradMut::BF16(s) => GradRef::BF16(s),
        }
    }

    /// The raw bytes, writable, as the GPU path downloads them.
    pub fn as_bytes_mut(&mut self) -> &mut [u8] {
        match self {
            GradMut::F32(s) => bytemuck::cast_slice_mut(s),
            GradMut::F16(s) => bytemuck::cast_slice_mut(s),
            GradMut::BF16(s) => bytemuck::cast_slice_mut(s),
        }
    }
}

impl<'a> From<&'a [f32]> for GradRef<'a> {
    fn from(s: &'a [f32]) -> Self {
        GradRef::F32(s)
    }
}
impl<'a> From<&'a [f16]> for GradRef<'a> {
    fn from(s: &'a [f16]) -> Self {
        GradRef::F16(s)
    }
}
impl<'a> From<&'a [bf16]> for GradRef<'a> {
    fn from(s: &'a [bf16]) -> Self {
        GradRef::BF16(s)
    }
}
impl<'a> From<&'a mut [f32]> for GradMut<'a> {
    fn from(s: &'a mut [f32]) -> Self {
        GradMut::F32(s)
    }
}
impl<'a> From<&'a mut [f16]> for GradMut<'a> {
    fn from(s: &'a mut [f16]) -> Self {
        GradMut::F16(s)
    }
}
impl<'a> From<&'a mut [bf16]> for GradMut<'a> {
    fn from(s: &'a mut [bf16]) -> Self {
        GradMut::BF16(s)
    }
}
