//! 10,000 steps whose reports are dropped unread: the process does not grow. Alone in its
//! test binary, so that no other test allocates in the process while it measures.

mod common;

use common::{gpu, gpu_tensors, host, upload};
use gradclip::{ClipPolicy, GpuClipper, Rule, TensorInfo};

#[test]
fn dropped_reports_keep_memory_flat() {
    let ctx = gpu();
    let h = vec![host(0, vec![1.0; 1000])];
    let infos = [TensorInfo::new("w", &[1000])];
    let arena = upload(&ctx, &h);
    let t = gpu_tensors(&arena, &h, &infos);
    let mut run = GpuClipper::new(&ctx, &t, None, ClipPolicy::new(Rule::GlobalNorm(1.0))).unwrap();
    let rss = || -> u64 {
        let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
        let pages: u64 = statm
            .split(' ')
            .nth(1)
            .and_then(|p| p.parse().ok())
            .unwrap_or(0);
        pages * 4096
    };
    let mut step = |n: usize| {
        for _ in 0..n {
            drop(run.step().unwrap());
        }
        ctx.device()
            .poll(wgpu::PollType::wait_indefinitely())
            .unwrap();
    };
    step(1000);
    let warm = rss();
    step(9000);
    let grown = rss().saturating_sub(warm);
    assert!(grown < 32 << 20, "grew {grown} bytes over 9000 steps");
    assert_eq!(run.steps_taken(), 10_000);
}
