//! The collective operations a sharded step needs, as a trait the engines call, and an
//! in-process implementation over threads (the MPI one is `mpi.rs`, behind the `mpi`
//! feature). Nothing here knows about MPI.

use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::error::ClipError;

/// All-reduce operations across the ranks of one job: every rank calls the same
/// operations in the same order with slices of the same length, and every rank gets the
/// same result. A sharded step calls three of them (MAX, SUM, OR) on small vectors.
///
/// Implementations: [`ThreadCollective`] (ranks are threads of one process) and, with the
/// `mpi` feature, `MpiCollective` (ranks are MPI processes). Implement it for another
/// transport (NCCL through a host buffer, a parameter server) the same way.
pub trait Collective {
    /// This rank, in `0..size()`.
    fn rank(&self) -> usize;
    /// Number of ranks.
    fn size(&self) -> usize;
    /// Replaces every element by its maximum over the ranks.
    fn all_reduce_max(&self, values: &mut [f64]) -> Result<(), ClipError>;
    /// Replaces every element by its sum over the ranks; every rank must get the same bits.
    fn all_reduce_sum(&self, values: &mut [f64]) -> Result<(), ClipError>;
    /// Replaces every element by its bitwise OR over the ranks.
    fn all_reduce_or(&self, values: &mut [u32]) -> Result<(), ClipError>;
}

/// A borrowed collective is one too, so several policies can share one communicator.
impl<T: Collective + ?Sized> Collective for &T {
    fn rank(&self) -> usize {
        (**self).rank()
    }
    fn size(&self) -> usize {
        (**self).size()
    }
    fn all_reduce_max(&self, values: &mut [f64]) -> Result<(), ClipError> {
        (**self).all_reduce_max(values)
    }
    fn all_reduce_sum(&self, values: &mut [f64]) -> Result<(), ClipError> {
        (**self).all_reduce_sum(values)
    }
    fn all_reduce_or(&self, values: &mut [u32]) -> Result<(), ClipError> {
        (**self).all_reduce_or(values)
    }
}

/// A 1-rank world: every reduction leaves its values as they are (a sharded policy on it
/// is the unsharded one).
#[derive(Debug, Clone, Copy, Default)]
pub struct SingleRank;

impl Collective for SingleRank {
    fn rank(&self) -> usize {
        0
    }
    fn size(&self) -> usize {
        1
    }
    fn all_reduce_max(&self, _: &mut [f64]) -> Result<(), ClipError> {
        Ok(())
    }
    fn all_reduce_sum(&self, _: &mut [f64]) -> Result<(), ClipError> {
        Ok(())
    }
    fn all_reduce_or(&self, _: &mut [u32]) -> Result<(), ClipError> {
        Ok(())
    }
}

/// One operation in flight: what each rank contributed, as words.
#[derive(Default)]
struct Round {
    /// Bumped each time every rank has arrived (a generation barrier).
    generation: u64,
    arrived: usize,
    /// Per rank: its operation's name and its values (f64 or u32 bits).
    inputs: Vec<Option<(&'static str, Vec<u64>)>>,
    /// Why the group no longer works (a rank timed out).
    broken: Option<String>,
    /// The result of the last complete round, or why it failed.
    result: Option<Result<Vec<u64>, String>>,
    /// Ranks that have read `result` (the next round waits for all of them).
    read: usize,
}

struct Shared {
    round: Mutex<Round>,
    ready: Condvar,
    size: usize,
    timeout: Duration,
}

/// Ranks that are threads of one process: for tests and for data-parallel work on
/// several devices of one machine. Reductions combine the ranks' values in rank order,
/// so results are bitwise the same on every rank and in every run. A rank that does not
/// arrive within the timeout (it panicked, or stopped calling) makes the operation an error
/// on the ranks that wait, rather than a hang, and breaks the group: every later call on
/// every rank is an error too, so no rank goes on with a step the others left.
pub struct ThreadCollective {
    rank: usize,
    shared: Arc<Shared>,
}

impl std::fmt::Debug for ThreadCollective {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ThreadCollective")
            .field("rank", &self.rank)
            .field("size", &self.shared.size)
            .finish()
    }
}

impl ThreadCollective {
    /// `size` connected ranks (give one to each thread), waiting at most 60 s for each other.
    pub fn group(size: usize) -> Vec<ThreadCollective> {
        Self::group_with_timeout(size, Duration::from_secs(60))
    }

    /// [`ThreadCollective::group`] with another timeout.
    pub fn group_with_timeout(size: usize, timeout: Duration) -> Vec<ThreadCollective> {
        let shared = Arc::new(Shared {
            round: Mutex::new(Round {
                inputs: vec![None; size],
                ..Round::default()
            }),
            ready: Condvar::new(),
            size,
            timeout,
        });
        (0..size)
            .map(|rank| ThreadCollective {
                rank,
                shared: shared.clone(),
            })
            .collect()
    }

    /// Waits until `done`; reaching `deadline` first breaks the group for good (as MPI
    /// aborts), so no later call can pair one rank's step with another's.
    fn wait<'g>(
        &self,
        mut round: MutexGuard<'g, Round>,
        deadline: Instant,
        done: impl Fn(&Round) -> bool,
        what: &str,
    ) -> MutexGuard<'g, Round> {
        let s = &*self.shared;
        while !done(&round) && round.broken.is_none() {
            let left = deadline.saturating_duration_since(Instant::now());
            round = (s.ready.wait_timeout(round, left))
                .unwrap_or_else(|e| e.into_inner())
                .0;
            if !done(&round) && round.broken.is_none() && Instant::now() >= deadline {
                round.broken = Some(format!(
                    "rank {} waited {:?} for {what}; the group is broken",
                    self.rank, s.timeout
                ));
                s.ready.notify_all();
            }
        }
        round
    }

    /// Contributes `words` to the operation `op`; returns every rank's words combined with
    /// `fold` in rank order.
    fn reduce(
        &self,
        op: &'static str,
        words: Vec<u64>,
        fold: fn(u64, u64) -> u64,
    ) -> Result<Vec<u64>, ClipError> {
        let s = &*self.shared;
        let deadline = Instant::now() + s.timeout;
        let broken = |round: &Round| {
            ClipError::Collective(format!(
                "rank {}: {op}: {}",
                self.rank,
                round.broken.as_deref().unwrap_or("")
            ))
        };
        let mut round = s.round.lock().unwrap_or_else(|e| e.into_inner());
        // The previous round's result must have been read by every rank.
        round = self.wait(
            round,
            deadline,
            |r| r.result.is_none(),
            "the others to read a result",
        );
        if round.broken.is_some() {
            return Err(broken(&round));
        }
        round.inputs[self.rank] = Some((op, words));
        round.arrived += 1;
        let generation = round.generation;
        if round.arrived == s.size {
            let inputs: Vec<(&str, Vec<u64>)> =
                round.inputs.iter_mut().flat_map(Option::take).collect();
            let (op0, first) = &inputs[0];
            let agree = inputs
                .iter()
                .all(|(o, w)| o == op0 && w.len() == first.len());
            round.result = Some(if agree {
                let mut acc = first.clone();
                for (_, w) in &inputs[1..] {
                    for (a, &b) in acc.iter_mut().zip(w) {
                        *a = fold(*a, b);
                    }
                }
                Ok(acc)
            } else {
                let calls: Vec<String> = (inputs.iter())
                    .map(|(o, w)| format!("{o} of {}", w.len()))
                    .collect();
                Err(format!("the ranks called different operations: {calls:?}"))
            });
            round.arrived = 0;
            round.read = 0;
            round.generation += 1;
            s.ready.notify_all();
        }
        round = self.wait(
            round,
            deadline,
            |r| r.generation != generation,
            "the other ranks",
        );
        if round.generation == generation {
            return Err(broken(&round));
        }
        let result = round.result.clone().expect("a finished round has a result");
        round.read += 1;
        if round.read == s.size {
            round.result = None;
            s.ready.notify_all();
        }
        result.map_err(ClipError::Collective)
    }
}

impl Collective for ThreadCollective {
    fn rank(&self) -> usize {
        self.rank
    }

    fn size(&self) -> usize {
        self.shared.size
    }

    fn all_reduce_max(&self, values: &mut [f64]) -> Result<(), ClipError> {
        let words = values.iter().map(|v| v.to_bits()).collect();
        let max = |a: u64, b: u64| f64::from_bits(a).max(f64::from_bits(b)).to_bits();
        let out = self.reduce("max", words, max)?;
        for (v, w) in values.iter_mut().zip(out) {
            *v = f64::from_bits(w);
        }
        Ok(())
    }

    fn all_reduce_sum(&self, values: &mut [f64]) -> Result<(), ClipError> {
        let words = values.iter().map(|v| v.to_bits()).collect();
        let sum = |a: u64, b: u64| (f64::from_bits(a) + f64::from_bits(b)).to_bits();
        let out = self.reduce("sum", words, sum)?;
        for (v, w) in values.iter_mut().zip(out) {
            *v = f64::from_bits(w);
        }
        Ok(())
    }

    fn all_reduce_or(&self, values: &mut [u32]) -> Result<(), ClipError> {
        let words = values.iter().map(|&v| v as u64).collect();
        let out = self.reduce("or", words, |a, b| a | b)?;
        for (v, w) in values.iter_mut().zip(out) {
            *v = w as u32;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn on_ranks<T: Send>(n: usize, f: impl Fn(ThreadCollective) -> T + Sync) -> Vec<T> {
        let group = ThreadCollective::group_with_timeout(n, Duration::from_secs(5));
        std::thread::scope(|s| {
            let handles: Vec<_> = group.into_iter().map(|c| s.spawn(|| f(c))).collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        })
    }

    #[test]
    fn reductions_combine_every_rank_in_rank_order() {
        let out = on_ranks(4, |c| {
            let r = c.rank() as f64;
            let mut m = [r, -r, 0.5];
            c.all_reduce_max(&mut m).unwrap();
            // Rank order: 1e16 + 1 + 1 + 1 in f64 is 1e16 every time (each 1 is lost).
            let mut s = [if c.rank() == 0 { 1e16 } else { 1.0 }, r];
            c.all_reduce_sum(&mut s).unwrap();
            let mut o = [1u32 << c.rank(), 0];
            c.all_reduce_or(&mut o).unwrap();
            (m, s, o)
        });
        for (m, s, o) in out {
            assert_eq!(m, [3.0, 0.0, 0.5]);
            assert_eq!(s, [1e16, 6.0]);
            assert_eq!(o, [0b1111, 0]);
        }
    }

    #[test]
    fn mismatched_calls_fail_on_every_rank_and_missing_ranks_time_out() {
        let out = on_ranks(3, |c| {
            let mut v = vec![1.0; 2 + (c.rank() == 2) as usize];
            let mismatch = c.all_reduce_sum(&mut v);
            // Still usable afterwards.
            let mut w = [c.rank() as f64];
            c.all_reduce_max(&mut w).unwrap();
            (mismatch, v, w[0])
        });
        for (r, (mismatch, v, w)) in out.into_iter().enumerate() {
            assert!(
                matches!(mismatch, Err(ClipError::Collective(_))),
                "{mismatch:?}"
            );
            assert!(v.iter().all(|&x| x == 1.0), "rank {r}: values untouched");
            assert_eq!(w, 2.0);
        }
        let lonely = ThreadCollective::group_with_timeout(2, Duration::from_millis(50));
        let mut v = [1.0];
        assert!(matches!(
            lonely[0].all_reduce_sum(&mut v),
            Err(ClipError::Collective(_))
        ));
        assert_eq!(v, [1.0]);
        // The late rank cannot pair its call with the abandoned one: the group is broken.
        let e = lonely[1].all_reduce_sum(&mut v);
        assert!(
            matches!(&e, Err(ClipError::Collective(m)) if m.contains("broken")),
            "{e:?}"
        );
    }
}
