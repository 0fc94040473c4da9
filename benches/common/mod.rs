//! Workloads shared by `benches/clip.rs` and `examples/bench.rs`: deterministic gradients,
//! the host gradient arena, the timed operations and their clipping settings.
#![allow(dead_code)] // each user takes a different subset

use gradclip::{bf16, f16, ClipPolicy, CpuClipper, DType, GradMut, GradRef, TensorInfo, ValueClip};
use rayon::prelude::*;

pub const BLOCK: usize = 1 << 16;
/// Standard deviation of the generated gradients.
pub const SIGMA: f32 = 1e-3;

/// 2000 small tensors, as a model with many biases and norms has; 257 is odd so bf16
/// tensors start at every 2-byte offset.
pub fn small_lens() -> Vec<usize> {
    const LENS: [usize; 6] = [64, 257, 768, 1000, 3072, 4096];
    (0..2000).map(|i| LENS[i % LENS.len()]).collect()
}

/// Deterministic gradients, roughly N(0, SIGMA^2): the sum of four xorshift uniforms per
/// element. Each block has its own seed, so the values do not depend on the thread count.
pub fn gradients(n: usize) -> Vec<f32> {
    let mut v = vec![0.0f32; n];
    v.par_chunks_mut(BLOCK).enumerate().for_each(|(b, chunk)| {
        // splitmix64 of the block index: well-spread nonzero xorshift seeds.
        let mut z = (b as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        let mut s = (z ^ (z >> 31)) | 1;
        let scale = 3f32.sqrt() * SIGMA;
        for x in chunk {
            let mut u = 0.0f32;
            for _ in 0..4 {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                u += (s >> 40) as f32 / (1u64 << 24) as f32;
            }
            *x = (u - 2.0) * scale;
        }
    });
    v
}

/// All tensors of one workload back to back in one allocation: the host copy of a
/// gradient arena, whose bytes are exactly the GPU buffer's.
#[derive(Clone)]
pub enum Flat {
    F32(Vec<f32>),
    F16(Vec<f16>),
    BF16(Vec<bf16>),
}

pub fn split<'a, T>(mut rest: &'a [T], lens: &[usize]) -> Vec<&'a [T]> {
    lens.iter()
        .map(|&n| {
            let (head, tail) = rest.split_at(n);
            rest = tail;
            head
        })
        .collect()
}

pub fn split_mut<'a, T>(mut rest: &'a mut [T], lens: &[usize]) -> Vec<&'a mut [T]> {
    lens.iter()
        .map(|&n| {
            let (head, tail) = std::mem::take(&mut rest).split_at_mut(n);
            rest = tail;
            head
        })
        .collect()
}

pub fn par_copy<T: Copy + Send + Sync>(dst: &mut [T], src: &[T]) {
    dst.par_chunks_mut(BLOCK)
        .zip(src.par_chunks(BLOCK))
        .for_each(|(d, s)| d.copy_from_slice(s));
}

impl Flat {
    pub fn new(dtype: DType, values: &[f32]) -> Flat {
        match dtype {
            DType::F32 => Flat::F32(values.to_vec()),
            DType::BF16 => Flat::BF16(values.par_iter().map(|&x| bf16::from_f32(x)).collect()),
            DType::F16 => Flat::F16(values.par_iter().map(|&x| f16::from_f32(x)).collect()),
        }
    }
    pub fn dtype(&self) -> DType {
        match self {
            Flat::F32(_) => DType::F32,
            Flat::F16(_) => DType::F16,
            Flat::BF16(_) => DType::BF16,
        }
    }
    pub fn bytes(&self) -> &[u8] {
        match self {
            Flat::F32(v) => bytemuck::cast_slice(v),
            Flat::F16(v) => bytemuck::cast_slice(v),
            Flat::BF16(v) => bytemuck::cast_slice(v),
        }
    }
    pub fn refs<'a>(&'a self, lens: &[usize]) -> Vec<GradRef<'a>> {
        match self {
            Flat::F32(v) => split(v, lens).into_iter().map(GradRef::from).collect(),
            Flat::F16(v) => split(v, lens).into_iter().map(GradRef::from).collect(),
            Flat::BF16(v) => split(v, lens).into_iter().map(GradRef::from).collect(),
        }
    }
    pub fn muts<'a>(&'a mut self, lens: &[usize]) -> Vec<GradMut<'a>> {
        match self {
            Flat::F32(v) => split_mut(v, lens).into_iter().map(GradMut::from).collect(),
            Flat::F16(v) => split_mut(v, lens).into_iter().map(GradMut::from).collect(),
            Flat::BF16(v) => split_mut(v, lens).into_iter().map(GradMut::from).collect(),
        }
    }
    /// The total L2 norm of the tensors of lengths `lens` (the CPU oracle's).
    pub fn total_norm(&self, lens: &[usize]) -> f64 {
        let infos = TensorInfo::unnamed(lens.iter().copied());
        let mut policy = CpuClipper::new(ClipPolicy::total_norm(), &infos).expect("a measure");
        let mut copy = self.clone();
        let report = policy.step(&mut copy.muts(lens), None).expect("a norm");
        report.total_norm
    }

    pub fn reset_from(&mut self, pristine: &Flat) {
        match (self, pristine) {
            (Flat::F32(d), Flat::F32(s)) => par_copy(d, s),
            (Flat::F16(d), Flat::F16(s)) => par_copy(d, s),
            (Flat::BF16(d), Flat::BF16(s)) => par_copy(d, s),
            _ => unreachable!("same dtype"),
        }
    }
}

#[derive(Clone, Copy, PartialEq)]
pub enum Op {
    Norm,
    Clipping,
    NotClipping,
    Value,
}

impl Op {
    pub const ALL: [Op; 4] = [Op::Norm, Op::Clipping, Op::NotClipping, Op::Value];

    pub fn label(self) -> &'static str {
        match self {
            Op::Norm => "total norm (L2)",
            Op::Clipping => "global clip, clipping",
            Op::NotClipping => "global clip, not clipping",
            Op::Value => "value clip",
        }
    }
    /// Benchmark id of the operation.
    pub fn name(self) -> &'static str {
        match self {
            Op::Norm => "total_norm",
            Op::Clipping => "global_clip_clipping",
            Op::NotClipping => "global_clip_not_clipping",
            Op::Value => "value_clip",
        }
    }
    /// The chain of the operation on a workload of total norm `norm`.
    pub fn policy(self, norm: f64) -> ClipPolicy {
        match self {
            Op::Norm => ClipPolicy::total_norm(),
            // coef about 0.5: every element is rewritten, none becomes subnormal.
            Op::Clipping => ClipPolicy::global_norm((norm * 0.5) as f32),
            Op::NotClipping => ClipPolicy::global_norm((norm * 10.0) as f32),
            Op::Value => ClipPolicy::value_clip(value_clip()),
        }
    }
    /// Bytes moved per byte of gradients.
    pub fn traffic(self) -> f64 {
        match self {
            Op::Norm | Op::NotClipping => 1.0,
            Op::Clipping => 3.0,
            Op::Value => 2.0,
        }
    }
    pub fn mutates(self) -> bool {
        matches!(self, Op::Clipping | Op::Value)
    }
    pub fn expect_clipped(self) -> Option<bool> {
        match self {
            Op::Clipping => Some(true),
            Op::NotClipping => Some(false),
            _ => None,
        }
    }
}

/// The value clamp of the benchmarks: one sigma, about a third of the elements clamp.
pub fn value_clip() -> ValueClip {
    ValueClip::symmetric(SIGMA)
}
