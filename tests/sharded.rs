//! Sharded clipping with in-process ranks (threads and `ThreadCollective`): every chain of
//! `common/sharded.rs` clipped ZeRO-style across ranks equals the single-process clip, on
//! the CPU and on the GPU; failures on one rank are errors on every rank.

mod common;

use std::sync::Mutex;
use std::time::Duration;

use common::sharded::{check_all, gpt2_tiny, local, values, On};
use gradclip::{
    ClipError, ClipPolicy, Collective, CpuClipper, GradMut, LossScale, Rule, Schedule, Shard,
    SingleRank, TensorInfo, ThreadCollective,
};

/// Runs `f` on `n` thread ranks and returns what each returned.
fn on_ranks<T: Send>(n: usize, f: impl Fn(ThreadCollective) -> T + Sync) -> Vec<T> {
    let group = ThreadCollective::group_with_timeout(n, Duration::from_secs(120));
    std::thread::scope(|s| {
        let handles: Vec<_> = group.into_iter().map(|c| s.spawn(|| f(c))).collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("rank panicked"))
            .collect()
    })
}

#[test]
fn thread_ranks_on_the_cpu_clip_as_one_process() {
    for world in [1, 2, 3, 4] {
        on_ranks(world, |c| check_all(&c, On::Cpu));
    }
    check_all(&SingleRank, On::Cpu);
}

#[test]
fn four_thread_ranks_on_the_gpu_clip_as_one_process() {
    let gpu = common::gpu();
    let turns = Mutex::new(());
    on_ranks(4, |c| check_all(&c, On::Gpu(&gpu, &turns)));
}

/// The total norms of three steps of a global clip on `world` ranks, as bits.
fn norm_bits(world: usize) -> Vec<Vec<u64>> {
    let infos = gpt2_tiny();
    on_ranks(world, |c| {
        let shard = Shard::even(&infos, c.rank(), world).unwrap();
        let policy = ClipPolicy::new(Rule::GlobalNorm(1.0));
        let mut p = CpuClipper::sharded(policy, &infos, shard.clone(), &c).unwrap();
        (0..3)
            .map(|step| {
                let mut parts: Vec<Vec<f32>> = local(&values(&infos, step, 0), &shard);
                let mut g: Vec<GradMut<'_>> = parts.iter_mut().map(|v| GradMut::F32(v)).collect();
                p.step(&mut g, None).unwrap().total_norm.to_bits()
            })
            .collect()
    })
}

#[test]
fn norms_are_bitwise_the_same_on_every_rank_and_in_every_run() {
    let first = norm_bits(3);
    assert!(first.iter().all(|r| r == &first[0]), "{first:?}");
    assert_eq!(norm_bits(3), first);
}

#[test]
fn bad_input_on_one_rank_is_an_error_on_every_rank_and_changes_nothing() {
    let infos = gpt2_tiny();
    let out = on_ranks(3, |c| {
        let shard = Shard::even(&infos, c.rank(), 3).unwrap();
        let policy = ClipPolicy::new(Rule::GlobalNorm(1e-3));
        let mut p = CpuClipper::sharded(policy, &infos, shard.clone(), &c).unwrap();
        let mut parts: Vec<Vec<f32>> = local(&values(&infos, 0, 0), &shard);
        if c.rank() == 1 {
            // One element short.
            let t = (0..parts.len()).find(|&t| !parts[t].is_empty()).unwrap();
            parts[t].pop();
        }
        let before = parts.clone();
        let state = p.state().clone();
        let mut g: Vec<GradMut<'_>> = parts.iter_mut().map(|v| GradMut::F32(v)).collect();
        let r = p.step(&mut g, None);
        assert_eq!(parts, before, "rank {}: gradients untouched", c.rank());
        assert_eq!(p.state(), &state, "rank {}: state untouched", c.rank());
        r.map(|_| ())
    });
    assert!(
        matches!(out[1], Err(ClipError::ShapeMismatch { .. })),
        "{:?}",
        out[1]
    );
    for r in [0, 2] {
        assert!(
            matches!(out[r], Err(ClipError::Collective(_))),
            "{:?}",
            out[r]
        );
    }
}

#[test]
fn ranks_that_disagree_on_shards_or_chains_fail_to_plan_together() {
    let infos = gpt2_tiny();
    let plan = |shards: &[Shard], policies: &[ClipPolicy], infos: &[Vec<TensorInfo>]| {
        on_ranks(shards.len(), |c| {
            let r = c.rank();
            CpuClipper::sharded(policies[r].clone(), &infos[r], shards[r].clone(), &c).map(|_| ())
        })
    };
    let global = ClipPolicy::new(Rule::GlobalNorm(1.0));
    let even = |r| Shard::even(&infos, r, 2).unwrap();
    let same = vec![infos.clone(), infos.clone()];
    // Both ranks hold everything: every element twice.
    let whole = Shard::whole_tensors(&infos, |_, _| true);
    for (shards, policies) in [
        (
            vec![whole.clone(), whole],
            vec![global.clone(), global.clone()],
        ),
        (vec![even(0), even(0)], vec![global.clone(), global.clone()]),
        (
            vec![even(0), even(1)],
            vec![global.clone(), ClipPolicy::new(Rule::GlobalNorm(2.0))],
        ),
    ] {
        let out = plan(&shards, &policies, &same);
        assert!(
            out.iter()
                .all(|r| matches!(r, Err(ClipError::Collective(_)))),
            "{out:?}"
        );
    }
    // A bad shard on one rank: its own error there, a collective error on the other.
    let bad = Shard::new(&infos[..1], std::iter::once(0..1).collect()).unwrap();
    let out = plan(&[even(0), bad], &[global.clone(), global.clone()], &same);
    assert!(
        matches!(out[1], Err(ClipError::ShapeMismatch { .. })),
        "{out:?}"
    );
    assert!(matches!(out[0], Err(ClipError::Collective(_))), "{out:?}");
    // The same shards, chain and tensors plan.
    let out = plan(&[even(0), even(1)], &[global.clone(), global], &same);
    assert!(out.iter().all(|r| r.is_ok()), "{out:?}");
}

#[test]
fn tensor_parallel_whole_tensors_clip_as_one_process() {
    let infos = gpt2_tiny();
    let policy = ClipPolicy::new(Rule::GlobalNorm(0.5));
    let full = values(&infos, 2, 0);
    let mut want = full.clone();
    let mut g: Vec<GradMut<'_>> = want.iter_mut().map(|v| GradMut::F32(v)).collect();
    let report = CpuClipper::new(policy.clone(), &infos)
        .unwrap()
        .step(&mut g, None)
        .unwrap();
    let got = on_ranks(2, |c| {
        let shard = Shard::whole_tensors(&infos, |t, _| t % 2 == c.rank());
        let mut p = CpuClipper::sharded(policy.clone(), &infos, shard.clone(), &c).unwrap();
        let mut parts: Vec<Vec<f32>> = (full.iter().enumerate())
            .map(|(t, v)| {
                if shard.local_len(t) > 0 {
                    v.clone()
                } else {
                    vec![]
                }
            })
            .collect();
        let mut g: Vec<GradMut<'_>> = parts.iter_mut().map(|v| GradMut::F32(v)).collect();
        let r = p.step(&mut g, None).unwrap();
        (r.total_norm, parts)
    });
    for (norm, parts) in got {
        assert!(common::close(norm, report.total_norm, 1e-12));
        for (t, v) in parts.iter().enumerate().filter(|(_, v)| !v.is_empty()) {
            assert_eq!(v, &want[t], "tensor {t}");
        }
    }
}

#[test]
fn ranks_at_different_steps_all_fail_and_change_nothing() {
    let infos = gpt2_tiny();
    let out = on_ranks(2, |c| {
        let shard = Shard::even(&infos, c.rank(), 2).unwrap();
        let policy = ClipPolicy::new(Rule::GlobalNorm(1e-3));
        let mut p = CpuClipper::sharded(policy.clone(), &infos, shard.clone(), &c).unwrap();
        let mut parts: Vec<Vec<f32>> = local(&values(&infos, 0, 0), &shard);
        if c.rank() == 1 {
            // As if this rank's previous step had been lost: a state one step ahead.
            let mut other = CpuClipper::new(policy, &infos).unwrap();
            let mut full = values(&infos, 0, 0);
            let mut g: Vec<GradMut<'_>> = full.iter_mut().map(|v| GradMut::F32(v)).collect();
            other.step(&mut g, None).unwrap();
            p.set_state(other.state()).unwrap();
        }
        let before = parts.clone();
        let mut g: Vec<GradMut<'_>> = parts.iter_mut().map(|v| GradMut::F32(v)).collect();
        let r = p.step(&mut g, None);
        assert_eq!(parts, before, "rank {}: gradients untouched", c.rank());
        r.map(|_| ())
    });
    for r in &out {
        assert!(
            matches!(r, Err(ClipError::Collective(m)) if m.contains("different steps")),
            "{r:?}"
        );
    }
}

/// What ranks must agree on at every step is exchanged exactly: custom schedules of one
/// name whose factors differ, step numbers that differ only beyond f64's 53 bits, and
/// loss scales of states restored apart fail every rank with nothing changed.
#[test]
fn ranks_whose_factors_or_far_steps_differ_all_fail_and_change_nothing() {
    let infos = gpt2_tiny();
    for case in ["schedule", "steps", "loss scale"] {
        let out = on_ranks(2, |c| {
            let shard = Shard::even(&infos, c.rank(), 2).unwrap();
            let factor = if case == "schedule" && c.rank() == 1 {
                0.25f64
            } else {
                0.5
            };
            let schedule = Schedule::custom("decay", move |s| factor.powi(s as i32 + 1));
            let policy = ClipPolicy::new(Rule::GlobalNorm(1e-3))
                .schedule(schedule)
                .loss_scale(LossScale::dynamic());
            let mut p = CpuClipper::sharded(policy.clone(), &infos, shard.clone(), &c).unwrap();
            if case == "loss scale" && c.rank() == 1 {
                // A state whose scale backed off after an overflow, at the same step.
                let mut other = CpuClipper::new(policy, &infos).unwrap();
                let mut full = values(&infos, 0, 0);
                full[0][0] = f32::INFINITY;
                let mut g: Vec<GradMut<'_>> = full.iter_mut().map(|v| GradMut::F32(v)).collect();
                other.step(&mut g, None).unwrap();
                let backed_off = other.state().clone().with_steps_taken(0);
                assert_eq!(backed_off.loss_scale().unwrap().scale, 32768.0);
                p.set_state(&backed_off).unwrap();
            }
            if case == "steps" {
                let far = (1u64 << 53) + c.rank() as u64;
                p.set_state(&p.state().clone().with_steps_taken(far))
                    .unwrap();
            }
            let mut parts: Vec<Vec<f32>> = local(&values(&infos, 0, 0), &shard);
            let before = parts.clone();
            let mut g: Vec<GradMut<'_>> = parts.iter_mut().map(|v| GradMut::F32(v)).collect();
            let r = p.step(&mut g, None);
            assert_eq!(
                parts,
                before,
                "{case}, rank {}: gradients untouched",
                c.rank()
            );
            r.map(|_| ())
        });
        for r in &out {
            assert!(
                matches!(r, Err(ClipError::Collective(m)) if m.contains("different")),
                "{case}: {r:?}"
            );
        }
    }
}
