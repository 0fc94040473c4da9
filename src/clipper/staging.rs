//! Host staging for the GPU backend of [`super::Clipper`]: host tensors mirrored in
//! device buffers, copied in and back.

use crate::chain::TensorInfo;
use crate::dtype::{DType, GradMut, GradRef};
use crate::error::ClipError;
use crate::gpu::{GpuContext, GpuTensor};

/// Host tensors mirrored in one device buffer (and its readback buffer), kept while their
/// types and lengths stay the same so a training loop reuses buffers and plans.
pub(super) struct Mirror {
    pub(super) shapes: Vec<(DType, usize)>,
    pub(super) offsets: Vec<u64>,
    pub(super) buffer: wgpu::Buffer,
    pub(super) staging: wgpu::Buffer,
}

pub(super) fn shapes_of(grads: &[GradRef<'_>]) -> Vec<(DType, usize)> {
    grads.iter().map(|g| (g.dtype(), g.len())).collect()
}

impl Mirror {
    /// Buffers for tensors of these types and lengths; a batch larger than one device
    /// buffer may be is a typed error, not a failed allocation.
    pub(super) fn new(ctx: &GpuContext, shapes: Vec<(DType, usize)>) -> Result<Mirror, ClipError> {
        let mut offsets = Vec::with_capacity(shapes.len());
        let mut at = 0u64;
        for &(dtype, len) in &shapes {
            // 4-byte aligned starts keep f16 and bf16 tensors in words of their own.
            at = at.next_multiple_of(4);
            offsets.push(at);
            at += len as u64 * dtype.size();
        }
        let size = at.next_multiple_of(4).max(4);
        let limit = ctx.device().limits().max_buffer_size;
        if size > limit {
            return Err(ClipError::TooLarge {
                tensor: format!("all host tensors ({size} bytes; a buffer holds {limit})"),
                len: shapes.iter().map(|&(_, n)| n as u64).sum(),
            });
        }
        let buffer = |label, usage| {
            ctx.device().create_buffer(&wgpu::BufferDescriptor {
                label: Some(label),
                size,
                usage,
                mapped_at_creation: false,
            })
        };
        use wgpu::BufferUsages as U;
        let oom = ctx
            .device()
            .push_error_scope(wgpu::ErrorFilter::OutOfMemory);
        let mirror = Mirror {
            shapes,
            offsets,
            buffer: buffer(
                "gradclip host mirror",
                U::STORAGE | U::COPY_DST | U::COPY_SRC,
            ),
            staging: buffer("gradclip host readback", U::MAP_READ | U::COPY_DST),
        };
        match pollster::block_on(oom.pop()) {
            Some(e) => Err(ClipError::Wgpu(format!(
                "no device memory for {size} bytes: {e}"
            ))),
            None => Ok(mirror),
        }
    }

    /// The mirrored tensors holding host tensors `pieces`, named by `infos` (and shaped,
    /// with `shaped`: not for shards, whose lengths are not their tensors').
    fn tensors(&self, pieces: &[Piece], infos: &[TensorInfo], shaped: bool) -> Vec<GpuTensor<'_>> {
        (self.shapes.iter().zip(&self.offsets).zip(pieces))
            .map(|((&(dtype, len), &o), &(host, _, _))| {
                let t = GpuTensor::new(&self.buffer, o, len as u64, dtype);
                match (infos.get(host), shaped) {
                    (Some(info), true) => t.named(info.name.clone()).shaped(&info.shape),
                    (Some(info), false) => t.named(info.name.clone()),
                    (None, _) => t,
                }
            })
            .collect()
    }

    /// Copies host tensors (as bytes, one slice per mirrored tensor) in.
    pub(super) fn write(&self, ctx: &GpuContext, tensors: &[&[u8]]) {
        for (bytes, &o) in tensors.iter().zip(&self.offsets) {
            // write_buffer needs 4-byte multiples: an odd 16-bit tensor is padded with a zero.
            if bytes.len() % 4 == 0 {
                ctx.queue().write_buffer(&self.buffer, o, bytes);
            } else {
                let mut padded = bytes.to_vec();
                padded.resize(bytes.len().next_multiple_of(4), 0);
                ctx.queue().write_buffer(&self.buffer, o, &padded);
            }
        }
    }

    /// Copies the device's tensors back into `tensors` (bytes, one slice per tensor).
    pub(super) fn read(
        &self,
        ctx: &GpuContext,
        tensors: &mut [&mut [u8]],
    ) -> Result<(), ClipError> {
        let mut encoder = ctx.device().create_command_encoder(&Default::default());
        encoder.copy_buffer_to_buffer(&self.buffer, 0, &self.staging, 0, self.staging.size());
        ctx.submit(encoder)?;
        self.staging.map_async(wgpu::MapMode::Read, .., |_| {});
        ctx.device()
            .poll(wgpu::PollType::wait_indefinitely())
            .map_err(|e| ClipError::Readback(e.to_string()))?;
        {
            let view = (self.staging.get_mapped_range(..))
                .map_err(|e| ClipError::Readback(e.to_string()))?;
            for (dst, &o) in tensors.iter_mut().zip(&self.offsets) {
                let n = dst.len();
                dst.copy_from_slice(&view[o as usize..o as usize + n]);
            }
        }
        self.staging.unmap();
        Ok(())
    }
}

fn bytes_of<'a>(grads: &'a [GradRef<'_>]) -> Vec<&'a [u8]> {
    grads.iter().map(|g| g.as_bytes()).collect()
}

/// Part of a host tensor: (tensor, first element, elements).
pub(super) type Piece = (usize, usize, usize);

/// Host tensors of `shapes` in groups that fit buffers of `cap` bytes, in tensor order,
/// each tensor whole: one larger than a buffer is [`ClipError::TooLarge`].
fn split(shapes: &[(DType, usize)], cap: u64) -> Result<Vec<Vec<Piece>>, ClipError> {
    let mut groups: Vec<Vec<Piece>> = vec![Vec::new()];
    let mut used = 0u64;
    for (t, &(dtype, len)) in shapes.iter().enumerate() {
        let bytes = len as u64 * dtype.size();
        if bytes > cap {
            return Err(ClipError::TooLarge {
                tensor: format!(
                    "#{t} ({bytes} bytes; a device buffer holds {cap}: clip it with \
                     Backend::Cpu)"
                ),
                len: len as u64,
            });
        }
        let start = used.next_multiple_of(4);
        if start + bytes > cap {
            groups.push(Vec::new());
            used = 0;
        }
        let start = used.next_multiple_of(4);
        groups.last_mut().expect("a group").push((t, 0, len));
        used = start + bytes;
    }
    Ok(groups)
}

/// Host tensors in as many device buffers as they need, in tensor order, each whole.
pub(super) struct Mirrors {
    pub(super) groups: Vec<(Vec<Piece>, Mirror)>,
}

impl Mirrors {
    pub(super) fn new(ctx: &GpuContext, shapes: &[(DType, usize)]) -> Result<Mirrors, ClipError> {
        let cap = ctx.device().limits().max_buffer_size & !3;
        let groups = (split(shapes, cap)?.into_iter())
            .map(|pieces| {
                let piece_shapes = pieces.iter().map(|&(t, _, n)| (shapes[t].0, n)).collect();
                Ok((pieces, Mirror::new(ctx, piece_shapes)?))
            })
            .collect::<Result<_, ClipError>>()?;
        Ok(Mirrors { groups })
    }

    pub(super) fn shapes(&self) -> Vec<(DType, usize)> {
        (self.groups.iter())
            .flat_map(|(_, m)| m.shapes.iter().copied())
            .collect()
    }

    /// The mirrored tensors, named by `infos` (and shaped, with `shaped`).
    pub(super) fn tensors(&self, infos: &[TensorInfo], shaped: bool) -> Vec<GpuTensor<'_>> {
        (self.groups.iter())
            .flat_map(|(pieces, m)| m.tensors(pieces, infos, shaped))
            .collect()
    }

    pub(super) fn write(&self, ctx: &GpuContext, grads: &[GradRef<'_>]) {
        let (bytes, sizes) = (bytes_of(grads), sizes_of(grads));
        for (pieces, mirror) in &self.groups {
            mirror.write(ctx, &piece_bytes(&bytes, &sizes, pieces));
        }
    }

    pub(super) fn read(
        &self,
        ctx: &GpuContext,
        grads: &mut [GradMut<'_>],
    ) -> Result<(), ClipError> {
        for (pieces, mirror) in &self.groups {
            mirror.read(ctx, &mut piece_bytes_mut(grads, pieces))?;
        }
        Ok(())
    }
}

fn sizes_of(grads: &[GradRef<'_>]) -> Vec<u64> {
    grads.iter().map(|g| g.dtype().size()).collect()
}

/// The bytes of `pieces` of `grads`, writable (a group holds one piece per tensor at most).
fn piece_bytes_mut<'a>(grads: &'a mut [GradMut<'_>], pieces: &[Piece]) -> Vec<&'a mut [u8]> {
    let mut out = Vec::with_capacity(pieces.len());
    let mut next = pieces.iter().peekable();
    for (t, g) in grads.iter_mut().enumerate() {
        if let Some(&&(_, first, n)) = next.peek().filter(|p| p.0 == t) {
            let es = g.as_ref().dtype().size() as usize;
            out.push(&mut g.as_bytes_mut()[first * es..(first + n) * es]);
            next.next();
        }
    }
    out
}

/// The bytes of `pieces` of `grads`.
fn piece_bytes<'a>(grads: &[&'a [u8]], sizes: &[u64], pieces: &[Piece]) -> Vec<&'a [u8]> {
    (pieces.iter())
        .map(|&(t, first, n)| {
            let es = sizes[t] as usize;
            &grads[t][first * es..(first + n) * es]
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lens(groups: &[Vec<Piece>]) -> Vec<Vec<(usize, usize)>> {
        (groups.iter())
            .map(|g| g.iter().map(|&(t, _, n)| (t, n)).collect())
            .collect()
    }

    #[test]
    fn whole_tensors_fill_buffers_exactly_and_larger_ones_are_refused() {
        // An odd number of f32 that fills a buffer exactly stays in it.
        let cap = 4 * 7;
        let g = split(&[(DType::F32, 7), (DType::F32, 3)], cap).unwrap();
        assert_eq!(lens(&g), vec![vec![(0, 7)], vec![(1, 3)]]);
        // Every tensor starts on a whole word: 3 halves take 6 bytes, the next starts at 8.
        let g = split(&[(DType::F16, 3), (DType::F16, 1), (DType::F32, 1)], 12).unwrap();
        assert_eq!(lens(&g), vec![vec![(0, 3), (1, 1)], vec![(2, 1)]]);
        // A tensor larger than a buffer is an error.
        let e = split(&[(DType::F32, 8)], cap).unwrap_err();
        assert!(matches!(e, ClipError::TooLarge { .. }));
        // Empty tensors take no room.
        let g = split(&[(DType::BF16, 0), (DType::F32, 1)], 4).unwrap();
        assert_eq!(lens(&g), vec![vec![(0, 0), (1, 1)]]);
    }
}
