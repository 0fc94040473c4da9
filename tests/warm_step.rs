//! A warm step allocates nothing whose size grows with the number of tensors: on the CPU a
//! runner (and a fused optimizer) reuses its buffers, for a chain, a global clip and a
//! measure alike; on the GPU a runner records, submits and reads its report back without
//! a per-tensor allocation. (What a step returns, its report, is a few small
//! allocations.) A counting allocator watches the warm steps.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

mod common;

use gradclip::{Adam, ClipPolicy, CpuClipper, GradMut, GradRef, Norm, Rule, TensorInfo};

/// Counts the allocations of at least [`LARGE`] bytes, and the bytes of all allocations,
/// made while [`WATCH`] is set.
struct Counting;

static WATCH: AtomicBool = AtomicBool::new(false);
static LARGE_ALLOCS: AtomicUsize = AtomicUsize::new(0);
static BYTES: AtomicUsize = AtomicUsize::new(0);
/// Below what 1000 tensors need at 4 bytes each.
const LARGE: usize = 4000;

// SAFETY: forwards to the system allocator; the counters are atomics.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if WATCH.load(Ordering::Relaxed) && layout.size() >= LARGE {
            LARGE_ALLOCS.fetch_add(1, Ordering::Relaxed);
        }
        if WATCH.load(Ordering::Relaxed) {
            BYTES.fetch_add(layout.size(), Ordering::Relaxed);
        }
        // SAFETY: the caller's layout, passed on.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: allocated by `alloc` above with this layout.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// The allocations `f` makes of at least [`LARGE`] bytes, and the bytes it allocates.
fn allocs(f: impl FnOnce()) -> (usize, usize) {
    let before = (
        LARGE_ALLOCS.load(Ordering::Relaxed),
        BYTES.load(Ordering::Relaxed),
    );
    WATCH.store(true, Ordering::Relaxed);
    f();
    WATCH.store(false, Ordering::Relaxed);
    (
        LARGE_ALLOCS.load(Ordering::Relaxed) - before.0,
        BYTES.load(Ordering::Relaxed) - before.1,
    )
}

/// The allocations of at least [`LARGE`] bytes `f` makes.
fn large_allocs(f: impl FnOnce()) -> usize {
    allocs(f).0
}

/// `n` small tensors of 1-100 elements.
fn small(n: usize) -> Vec<Vec<f32>> {
    (0..n)
        .map(|t| (0..1 + t % 100).map(|i| (i as f32 - 7.0) * 0.01).collect())
        .collect()
}

#[test]
fn warm_steps_allocate_nothing_per_tensor() {
    let mut data = small(1000);
    let infos: Vec<TensorInfo> = (data.iter().enumerate())
        .map(|(t, x)| TensorInfo::new(format!("t{t}"), &[x.len() as u64]))
        .collect();
    let mut policy = CpuClipper::new(ClipPolicy::new(Rule::GlobalNorm(0.5)), &infos).unwrap();
    // What the one-shot `cpu::clip_by_global_norm` and `cpu::partial_norm` were: runners
    // over unnamed tensors, built once (the first step fills their buffers).
    let unnamed = TensorInfo::unnamed(data.iter().map(|x| x.len()));
    let mut global = CpuClipper::new(ClipPolicy::global_norm(0.5), &unnamed).unwrap();
    let mut measure = CpuClipper::new(ClipPolicy::total_norm().norm(Norm::L2), &unnamed).unwrap();
    let mut optimizer = CpuClipper::with_optimizer(
        ClipPolicy::new(Rule::GlobalNorm(0.5)),
        &infos,
        Adam::adamw(1e-3),
    )
    .unwrap();
    let mut weights = small(1000);
    for round in 0..2 {
        let mut grads: Vec<GradMut<'_>> = data.iter_mut().map(|x| GradMut::F32(x)).collect();
        let step = large_allocs(|| {
            policy.step(&mut grads, None).unwrap();
        });
        let one_shot = large_allocs(|| {
            global.step(&mut grads, None).unwrap();
        });
        // A total_norm step writes nothing.
        let norm = large_allocs(|| {
            measure.step(&mut grads, None).unwrap();
        });
        let refs: Vec<GradRef<'_>> = grads.iter().map(|g| g.as_ref()).collect();
        let mut params: Vec<&mut [f32]> = weights.iter_mut().map(|w| &mut w[..]).collect();
        let fused = large_allocs(|| {
            optimizer.step(&refs, &mut params).unwrap();
        });
        drop(refs);
        let unfused = large_allocs(|| {
            optimizer.step_in_place(&mut grads, &mut params).unwrap();
        });
        // The first round builds the buffers; the second must not.
        if round == 1 {
            assert_eq!(step, 0, "CpuClipper::step");
            assert_eq!(one_shot, 0, "CpuClipper::step of ClipPolicy::global_norm");
            assert_eq!(norm, 0, "CpuClipper::step of ClipPolicy::total_norm");
            assert_eq!(fused, 0, "CpuClipper<Optimize>::step");
            assert_eq!(unfused, 0, "CpuClipper<Optimize>::step_in_place");
        } else {
            assert!(
                step > 0 && one_shot > 0 && norm > 0 && fused > 0,
                "the counter sees the first step"
            );
        }
    }
}

/// The same on the GPU: a warm step of a runner (record, submit, read the report back)
/// over 4000 tensors in one buffer allocates no more than one over 1000 (what wgpu itself
/// records for a step, a few kilobytes of commands on its GL backend, does not grow with
/// the tensors; 3000 more tensors at 4 bytes each would be 12,000 bytes more).
#[test]
fn warm_gpu_steps_allocate_nothing_per_tensor() {
    use gradclip::{DType, GpuClipper, GpuContext, GpuTensor};
    let ctx = GpuContext::with_backends(common::backends()).expect("a GPU adapter");
    let chain = ClipPolicy::new(Rule::PerTensor(gradclip::PerTensorClip::new(0.5)))
        .then(Rule::GlobalNorm(0.5));
    for policy in [ClipPolicy::global_norm(0.5), chain] {
        let bytes: Vec<usize> = [1000, 4000]
            .iter()
            .map(|&n| {
                let lens: Vec<u64> = small(n).iter().map(|x| x.len() as u64).collect();
                let buffer = ctx.device().create_buffer(&wgpu::BufferDescriptor {
                    label: Some("warm step gradients"),
                    size: lens.iter().sum::<u64>() * 4,
                    usage: wgpu::BufferUsages::STORAGE,
                    mapped_at_creation: false,
                });
                let mut at = 0;
                let grads: Vec<GpuTensor<'_>> = (lens.iter())
                    .map(|&n| {
                        at += n * 4;
                        GpuTensor::new(&buffer, at - n * 4, n, DType::F32)
                    })
                    .collect();
                let mut runner = GpuClipper::new(&ctx, &grads, None, policy.clone()).unwrap();
                // The first steps build the pipelines and fill the pools.
                for _ in 0..2 {
                    runner.step().unwrap().wait().unwrap();
                }
                allocs(|| {
                    runner.step().unwrap().wait().unwrap();
                })
                .1
            })
            .collect();
        assert!(
            bytes[1] < bytes[0] + 4000,
            "GpuClipper::step of {policy:?}: {} bytes for 1000 tensors, {} for 4000",
            bytes[0],
            bytes[1]
        );
    }
}
