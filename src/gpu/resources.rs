//! Small helpers to create the buffers and bind groups of a planned batch.

use std::num::NonZeroU64;

use bytemuck::Pod;

use crate::plan::ChunkRow;
pub(crate) use crate::shaders::abi::{DispatchParams, StepParams};
use crate::shaders::abi::{STEP_SLOTS, TAG_RING, TAG_WORD};
use wgpu::util::DeviceExt;

impl DispatchParams {
    /// `n` items starting at `first`.
    pub(crate) fn range(first: u32, n: u32) -> Self {
        DispatchParams {
            first_chunk: first,
            n_chunks: n,
            ..Self::default()
        }
    }
}

/// Read-only uniform blocks (`DispatchParams` and the like), each at its own aligned
/// offset, so one buffer serves every dispatch of a batch.
pub(crate) struct DispatchSlots {
    buffer: wgpu::Buffer,
    align: u64,
    size: u64,
}

impl DispatchSlots {
    pub(crate) fn new<T: Pod>(device: &wgpu::Device, params: &[T]) -> Self {
        let size = std::mem::size_of::<T>();
        let min = device.limits().min_uniform_buffer_offset_alignment as usize;
        let align = size.next_multiple_of(min);
        let mut bytes = vec![0u8; params.len().max(1) * align];
        for (i, p) in params.iter().enumerate() {
            bytes[i * align..i * align + size].copy_from_slice(bytemuck::bytes_of(p));
        }
        let buffer = device.create_buffer_init(&wgpu::util::BufferInitDescriptor {
            label: Some("gradclip dispatch params"),
            contents: &bytes,
            usage: wgpu::BufferUsages::UNIFORM,
        });
        DispatchSlots {
            buffer,
            align: align as u64,
            size: size as u64,
        }
    }

    /// The binding of slot `i`.
    pub(crate) fn slot(&self, i: usize) -> wgpu::BindingResource<'_> {
        wgpu::BindingResource::Buffer(wgpu::BufferBinding {
            buffer: &self.buffer,
            offset: i as u64 * self.align,
            size: NonZeroU64::new(self.size),
        })
    }
}

/// The ring of per-step parameter slots of one engine: the `seq`-th write of parameters
/// goes to slot `seq % STEP_SLOTS`, and a step binds its slot at that slot's dynamic
/// offset, so every step encoded before a submission reads its own parameters. A step
/// whose parameters are those last written binds their slot without writing again (the
/// parameters of most training loops do not change between steps).
pub(crate) struct StepSlots {
    buffer: wgpu::Buffer,
    /// The tags `0..TAG_RING`, copied into the first report by each step's encoder.
    tags: wgpu::Buffer,
    stride: u64,
    /// The parameters last written, with their `seq`.
    last: Option<StepParams>,
}

impl StepSlots {
    pub(crate) fn new(device: &wgpu::Device) -> Self {
        let min = device.limits().min_uniform_buffer_offset_alignment as u64;
        let stride = (std::mem::size_of::<StepParams>() as u64).next_multiple_of(min);
        let buffer = device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("gradclip step slots"),
            size: stride * STEP_SLOTS as u64,
            usage: wgpu::BufferUsages::UNIFORM | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        let tags: Vec<u32> = (0..TAG_RING).collect();
        let tags = device.create_buffer_init(&wgpu::util::BufferInitDescriptor {
            label: Some("gradclip step tags"),
            contents: bytemuck::cast_slice(&tags),
            usage: wgpu::BufferUsages::COPY_SRC,
        });
        StepSlots {
            buffer,
            tags,
            stride,
            last: None,
        }
    }

    /// The binding of one slot; bind groups pass the slot's offset ([`StepSlots::write`]).
    pub(crate) fn binding(&self) -> wgpu::BindingResource<'_> {
        wgpu::BindingResource::Buffer(wgpu::BufferBinding {
            buffer: &self.buffer,
            offset: 0,
            size: NonZeroU64::new(std::mem::size_of::<StepParams>() as u64),
        })
    }

    /// Writes `params` (whose `seq` is set here) into the next slot, unless they are the
    /// parameters last written, and records the copy of their tag into the first report's
    /// `tag`, which every stage checks against its slot; returns the slot's dynamic offset.
    /// A later write into the same slot before the step is submitted changes the slot's
    /// tag, so the step finds that its parameters were overwritten.
    pub(crate) fn write(
        &mut self,
        queue: &wgpu::Queue,
        encoder: &mut wgpu::CommandEncoder,
        params: &StepParams,
        reports: &wgpu::Buffer,
    ) -> u32 {
        let next = StepParams {
            seq: self.last.map_or(0, |last| last.seq.wrapping_add(1)),
            ..*params
        };
        let unchanged = self.last.filter(|last| {
            bytemuck::bytes_of(&StepParams {
                seq: next.seq,
                ..*last
            }) == bytemuck::bytes_of(&next)
        });
        let seq = unchanged.unwrap_or(next).seq;
        let offset = (seq % STEP_SLOTS) as u64 * self.stride;
        if unchanged.is_none() {
            queue.write_buffer(&self.buffer, offset, bytemuck::bytes_of(&next));
            self.last = Some(next);
        }
        let tag = (seq % TAG_RING) as u64 * 4;
        encoder.copy_buffer_to_buffer(&self.tags, tag, reports, TAG_WORD as u64 * 4, 4);
        offset as u32
    }
}

/// A storage buffer holding `data` (at least 16 bytes: bindings cannot be empty).
pub(crate) fn storage_init(
    device: &wgpu::Device,
    label: &str,
    data: &[u8],
    usage: wgpu::BufferUsages,
) -> wgpu::Buffer {
    let mut contents = data.to_vec();
    contents.resize(data.len().max(16), 0);
    device.create_buffer_init(&wgpu::util::BufferInitDescriptor {
        label: Some(label),
        contents: &contents,
        usage: wgpu::BufferUsages::STORAGE | usage,
    })
}

/// A read-only storage table holding `data` (chunk rows, ranges, thresholds, ...).
pub(crate) fn table<T: Pod>(device: &wgpu::Device, label: &str, data: &[T]) -> wgpu::Buffer {
    storage_init(
        device,
        label,
        bytemuck::cast_slice(data),
        wgpu::BufferUsages::empty(),
    )
}

/// A zeroed storage buffer of `size` bytes (at least 16).
pub(crate) fn storage_zeroed(
    device: &wgpu::Device,
    label: &str,
    size: u64,
    usage: wgpu::BufferUsages,
) -> wgpu::Buffer {
    device.create_buffer(&wgpu::BufferDescriptor {
        label: Some(label),
        size: size.max(16),
        usage: wgpu::BufferUsages::STORAGE | usage,
        mapped_at_creation: false,
    })
}

/// The whole of `buffer` as a binding.
pub(crate) fn whole(buffer: &wgpu::Buffer) -> wgpu::BindingResource<'_> {
    buffer.as_entire_binding()
}

/// A bind group of `layout` from `(binding, resource)` pairs.
pub(crate) fn bind(
    device: &wgpu::Device,
    layout: &wgpu::BindGroupLayout,
    entries: &[(u32, wgpu::BindingResource<'_>)],
) -> wgpu::BindGroup {
    let entries: Vec<wgpu::BindGroupEntry<'_>> = entries
        .iter()
        .map(|(binding, resource)| wgpu::BindGroupEntry {
            binding: *binding,
            resource: resource.clone(),
        })
        .collect();
    device.create_bind_group(&wgpu::BindGroupDescriptor {
        label: Some("gradclip"),
        layout,
        entries: &entries,
    })
}

/// A window of a gradient buffer as a binding.
pub(crate) fn window<'a>(
    buffer: &'a wgpu::Buffer,
    w: &crate::plan::Window,
) -> wgpu::BindingResource<'a> {
    range(buffer, w.byte_offset, w.byte_size)
}

/// `size` bytes of `buffer` from `offset`, as a binding.
pub(crate) fn range(buffer: &wgpu::Buffer, offset: u64, size: u64) -> wgpu::BindingResource<'_> {
    wgpu::BindingResource::Buffer(wgpu::BufferBinding {
        buffer,
        offset,
        size: NonZeroU64::new(size),
    })
}

/// One bind group of `layout` per binding window of `plan`: window `i` of its gradient
/// buffer at binding 0, then the entries `rest(i)`.
pub(crate) fn window_groups<'a>(
    device: &wgpu::Device,
    layout: &wgpu::BindGroupLayout,
    windows: &[crate::plan::Window],
    buffers: &[&'a wgpu::Buffer],
    rest: impl Fn(usize) -> Vec<(u32, wgpu::BindingResource<'a>)>,
) -> Vec<wgpu::BindGroup> {
    (windows.iter().enumerate())
        .map(|(i, w)| {
            let mut entries = vec![(0, window(buffers[w.buffer], w))];
            entries.extend(rest(i));
            bind(device, layout, &entries)
        })
        .collect()
}

/// Where a step's compute pass writes its timestamps: a query set and the indices of
/// its first and last write.
pub(crate) type Timestamps = (wgpu::QuerySet, u32, u32);

/// The pass descriptor's timestamp writes for `t`.
pub(crate) fn timestamp_writes(
    t: &Option<Timestamps>,
) -> Option<wgpu::ComputePassTimestampWrites<'_>> {
    t.as_ref()
        .map(|(query_set, begin, end)| wgpu::ComputePassTimestampWrites {
            query_set,
            beginning_of_pass_write_index: Some(*begin),
            end_of_pass_write_index: Some(*end),
        })
}

/// A chunk table on the device with a copy of its rows on the host, so that a move of the
/// tensors writes only the rows that changed.
pub(crate) struct ChunkTable {
    pub buffer: wgpu::Buffer,
    rows: Vec<ChunkRow>,
}

impl ChunkTable {
    pub(crate) fn new(device: &wgpu::Device, label: &str, rows: &[ChunkRow]) -> ChunkTable {
        ChunkTable {
            buffer: storage_init(
                device,
                label,
                bytemuck::cast_slice(rows),
                wgpu::BufferUsages::COPY_DST,
            ),
            rows: rows.to_vec(),
        }
    }

    /// Writes on `queue` each run of `rows` (as many as the table has) that differs from
    /// the table's; [`ChunkTable::keep`] then records them as the table's.
    pub(crate) fn patch(&self, queue: &wgpu::Queue, rows: &[ChunkRow]) {
        self.write_changes(queue, &self.rows, rows);
    }

    /// Writes the table's own rows back over the runs where `rows`, patched in by a move
    /// that then failed, differ from them.
    pub(crate) fn restore(&self, queue: &wgpu::Queue, rows: &[ChunkRow]) {
        self.write_changes(queue, rows, &self.rows);
    }

    /// Writes each run of `to` that differs from `from`.
    fn write_changes(&self, queue: &wgpu::Queue, from: &[ChunkRow], to: &[ChunkRow]) {
        let mut i = 0;
        while i < to.len() {
            if to[i] == from[i] {
                i += 1;
                continue;
            }
            let start = i;
            while i < to.len() && to[i] != from[i] {
                i += 1;
            }
            let at = (start * std::mem::size_of::<ChunkRow>()) as u64;
            queue.write_buffer(&self.buffer, at, bytemuck::cast_slice(&to[start..i]));
        }
    }

    /// Takes `rows` as the table's, once [`ChunkTable::patch`] wrote them.
    pub(crate) fn keep(&mut self, rows: &[ChunkRow]) {
        self.rows.copy_from_slice(rows);
    }
}
