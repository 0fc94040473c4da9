//! Sharded clipping: where the gradients live when a model is split over ranks, and the
//! one exchange that lets every rank clip its part exactly as one process would clip the
//! whole.
//!
//! A [`Shard`] says which contiguous element range of every logical tensor this rank
//! holds (ZeRO/FSDP: slices of the flattened gradients; tensor parallel: whole tensors).
//! Every rank resolves the chain over the *logical* tensors, so units and groups have
//! the same names and indices everywhere; [`localize`] then cuts each unit to this rank's
//! elements. A step reduces the local part of every unit, merges the unit table over the
//! ranks ([`table::all_reduce`], through a [`Collective`]) and finishes with the merged
//! numbers, so thresholds, adaptive state and skip counters are identical on every rank
//! without further traffic.

pub(crate) mod collective;
#[cfg(feature = "mpi")]
pub(crate) mod mpi;
pub(crate) mod table;

use std::hash::{Hash, Hasher};
use std::ops::Range;

use crate::chain::{ClipPolicy, Program, TensorInfo};
use crate::error::ClipError;
use crate::plan::PlanSegment;
pub use collective::{Collective, SingleRank, ThreadCollective};

/// The part of every logical tensor one rank holds: a contiguous element range per
/// tensor (possibly empty), in the tensors' order. The ranges of all ranks must tile
/// every tensor exactly once; the sharded policies check that when they are built.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Shard {
    ranges: Vec<Range<u64>>,
}

impl Shard {
    /// This rank holds `ranges[t]` of tensor `t` of `infos`.
    pub fn new(infos: &[TensorInfo], ranges: Vec<Range<u64>>) -> Result<Shard, ClipError> {
        if ranges.len() != infos.len() {
            return Err(ClipError::ShapeMismatch {
                tensor: "shard".into(),
                expected: format!("a range for each of {} tensors", infos.len()),
                got: format!("{} ranges", ranges.len()),
            });
        }
        for (info, r) in infos.iter().zip(&ranges) {
            if r.start > r.end || r.end > info.len() {
                return Err(ClipError::ShapeMismatch {
                    tensor: info.name.clone(),
                    expected: format!("a shard range inside 0..{}", info.len()),
                    got: format!("{r:?}"),
                });
            }
        }
        Ok(Shard { ranges })
    }

    /// ZeRO-style: the tensors flattened one after the other and cut into `world` equal
    /// parts (the last ones may be shorter); this is part `rank`. Cuts fall anywhere,
    /// mid-tensor and mid-row.
    pub fn even(infos: &[TensorInfo], rank: usize, world: usize) -> Result<Shard, ClipError> {
        Self::cut(infos, rank, world, |_, x| x)
    }

    /// [`Shard::even`] with every cut moved up to the next row of the tensor it falls in
    /// (a slice along the first axis, `W[i, ...]`), so no row is split across ranks.
    pub fn even_rows(infos: &[TensorInfo], rank: usize, world: usize) -> Result<Shard, ClipError> {
        Self::cut(infos, rank, world, |info, x| {
            let row = match info.shape.as_slice() {
                [rows, ..] if info.shape.len() >= 2 && *rows > 0 => info.len() / rows,
                _ => 1,
            };
            x.next_multiple_of(row.max(1)).min(info.len())
        })
    }

    /// Tensor parallel: this rank holds the whole tensors for which `owns(index, info)`
    /// is true, and nothing of the others.
    pub fn whole_tensors(infos: &[TensorInfo], owns: impl Fn(usize, &TensorInfo) -> bool) -> Shard {
        let ranges = (infos.iter().enumerate())
            .map(|(t, info)| if owns(t, info) { 0..info.len() } else { 0..0 })
            .collect();
        Shard { ranges }
    }

    /// Cuts the flattened tensors at `k * ceil(total / world)`, each cut moved by `align`
    /// (tensor, offset inside it) to an offset of the same tensor.
    fn cut(
        infos: &[TensorInfo],
        rank: usize,
        world: usize,
        align: impl Fn(&TensorInfo, u64) -> u64,
    ) -> Result<Shard, ClipError> {
        if world == 0 || rank >= world {
            return Err(ClipError::InvalidConfig(format!(
                "rank {rank} of a world of {world}"
            )));
        }
        let total =
            (infos.iter()).try_fold(0u64, |a, t| t.checked_len().and_then(|l| a.checked_add(l)));
        let Some(total) = total else {
            return Err(ClipError::InvalidConfig(
                "the tensors hold more than 2^64 elements".into(),
            ));
        };
        let part = total.div_ceil(world as u64);
        // A flattened position, aligned inside the tensor it falls in.
        let aligned = |x: u64| {
            let mut start = 0;
            for info in infos {
                let end = start + info.len();
                if x < end {
                    return start + align(info, x - start);
                }
                start = end;
            }
            total
        };
        let lo = aligned((rank as u64 * part).min(total));
        let hi = aligned(((rank as u64 + 1) * part).min(total)).max(lo);
        let mut start = 0;
        let ranges = infos
            .iter()
            .map(|info| {
                let end = start + info.len();
                let r = lo.clamp(start, end) - start..hi.clamp(start, end) - start;
                start = end;
                r
            })
            .collect();
        Ok(Shard { ranges })
    }

    /// The element range of tensor `t` this rank holds.
    pub fn range(&self, t: usize) -> Range<u64> {
        self.ranges[t].clone()
    }

    /// Every tensor's range, in order.
    pub fn ranges(&self) -> &[Range<u64>] {
        &self.ranges
    }

    /// Elements of tensor `t` this rank holds.
    pub fn local_len(&self, t: usize) -> u64 {
        self.ranges[t].end - self.ranges[t].start
    }

    /// Checks that a rank's local tensors have the lengths of its ranges (`name(t)` names
    /// tensor `t` in the error).
    pub(crate) fn check_local(
        &self,
        lens: &[u64],
        name: impl Fn(usize) -> String,
    ) -> Result<(), ClipError> {
        if lens.len() != self.ranges.len() {
            return Err(ClipError::ShapeMismatch {
                tensor: "batch".into(),
                expected: format!("{} tensors", self.ranges.len()),
                got: format!("{} tensors", lens.len()),
            });
        }
        match (0..lens.len()).find(|&t| lens[t] != self.local_len(t)) {
            Some(t) => Err(ClipError::ShapeMismatch {
                tensor: name(t),
                expected: format!("this rank's shard {:?}", self.range(t)),
                got: format!("{} elements", lens[t]),
            }),
            None => Ok(()),
        }
    }

    /// Checks with every rank that the shards tile each tensor exactly once and that all
    /// ranks planned the same tensors and chain; two collectives, at planning time.
    /// `planned` is this rank's own planning (its program, or why it failed): a rank
    /// that failed still takes part, so every rank gets an error and none waits.
    pub(crate) fn verify(
        infos: &[TensorInfo],
        planned: Result<(&ClipPolicy, &Program, &Shard), ClipError>,
        comm: &dyn Collective,
    ) -> Result<(), ClipError> {
        let (rank, world) = (comm.rank(), comm.size());
        let fingerprint = match &planned {
            Ok((policy, program, _)) => {
                (fingerprint(policy, infos, program) & ((1 << 52) - 1)) as f64
            }
            Err(_) => 0.0,
        };
        let failed = planned.is_err() as u32 as f64;
        let n = infos.len();
        let mut same = [fingerprint, -fingerprint, failed, n as f64, -(n as f64)];
        comm.all_reduce_max(&mut same)?;
        // Every rank sees the same `same`, so all of them stop here together, before a
        // reduction whose length depends on what they planned.
        let (_, _, shard) = planned?;
        if same[2] != 0.0 {
            return Err(ClipError::Collective(
                "another rank could not plan its shard (bad tensors, shard or chain)".into(),
            ));
        }
        if same[0] != -same[1] || same[3] != -same[4] {
            return Err(ClipError::Collective(
                "the ranks planned different tensors or chains".into(),
            ));
        }
        // An all-gather of every rank's ranges through a SUM (exact: integers below 2^53).
        let mut all = vec![0.0; 2 * n * world];
        for (t, r) in shard.ranges.iter().enumerate() {
            all[2 * (rank * n + t)] = r.start as f64;
            all[2 * (rank * n + t) + 1] = r.end as f64;
        }
        comm.all_reduce_sum(&mut all)?;
        for (t, info) in infos.iter().enumerate() {
            let mut parts: Vec<(u64, u64)> = (0..world)
                .map(|r| (all[2 * (r * n + t)] as u64, all[2 * (r * n + t) + 1] as u64))
                .filter(|(a, b)| a < b)
                .collect();
            parts.sort();
            let mut next = 0;
            for &(a, b) in &parts {
                if a != next {
                    let what = if a < next { "overlap" } else { "leave a gap" };
                    return Err(ClipError::Collective(format!(
                        "the ranks' shards of tensor {:?} {what} at element {}",
                        info.name,
                        a.min(next)
                    )));
                }
                next = b;
            }
            if next != info.len() {
                return Err(ClipError::Collective(format!(
                    "the ranks' shards of tensor {:?} end at element {next} of {}",
                    info.name,
                    info.len()
                )));
            }
        }
        Ok(())
    }
}

/// A hash of what every rank must agree on: the fingerprint a saved state records (norm,
/// stages, non-finite policy, schedule, noise, clamp, tensors), whether the ranks report
/// groups, and the resolved program.
fn fingerprint(policy: &ClipPolicy, infos: &[TensorInfo], program: &Program) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    program.meaning.hash(&mut h);
    policy.report_groups.hash(&mut h);
    for info in infos {
        (&info.name, &info.shape).hash(&mut h);
    }
    for u in &program.units {
        (u.tensor, u.first, u.len, u.stride).hash(&mut h);
    }
    for s in &program.stages {
        (&s.group_of, s.formula as u32, s.adaptive, s.history).hash(&mut h);
        s.thresholds.iter().for_each(|t| t.to_bits().hash(&mut h));
        bytemuck::bytes_of(&s.params).hash(&mut h);
    }
    h.finish()
}

/// `program` (resolved over the logical tensors) cut to this rank's elements: the same
/// units, stages and state, each unit reduced to the elements `shard` holds, in the
/// coordinates of the local tensors; the program remembers where each local tensor starts
/// in its logical tensor (noise is keyed by the logical element index).
pub(crate) fn localize(program: &Program, shard: &Shard) -> Program {
    let units = (program.units.iter())
        .map(|u| {
            let r = shard.range(u.tensor);
            // Unit elements are `first + k * stride`, k < len; keep those in `r`.
            let from = |x: u64| match x.checked_sub(u.first) {
                Some(d) => d.div_ceil(u.stride).min(u.len),
                None => 0,
            };
            let (k0, k1) = (from(r.start), from(r.end));
            if k1 <= k0 {
                return PlanSegment {
                    first: 0,
                    len: 0,
                    ..*u
                };
            }
            PlanSegment {
                first: u.first + k0 * u.stride - r.start,
                len: k1 - k0,
                ..*u
            }
        })
        .collect();
    Program {
        units,
        bases: shard.ranges.iter().map(|r| r.start).collect(),
        ..program.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chain::{ClipPolicy, Rule};
    use crate::{Agc, UnitAxis};

    fn infos() -> Vec<TensorInfo> {
        vec![
            TensorInfo::new("a", &[5, 3]),
            TensorInfo::new("b", &[7]),
            TensorInfo::new("c", &[0]),
            TensorInfo::new("d", &[2, 4]),
        ]
    }

    #[test]
    fn even_shards_tile_the_flattened_tensors() {
        let infos = infos();
        for world in 1..=7 {
            for rows in [false, true] {
                let mut held = vec![vec![0u32; 30]; 4];
                for rank in 0..world {
                    let s = if rows {
                        Shard::even_rows(&infos, rank, world).unwrap()
                    } else {
                        Shard::even(&infos, rank, world).unwrap()
                    };
                    for (t, r) in s.ranges().iter().enumerate() {
                        assert!(r.end <= infos[t].len());
                        if rows && t == 0 && !r.is_empty() {
                            assert_eq!(r.start % 3, 0, "rows of a stay whole");
                        }
                        for e in r.clone() {
                            held[t][e as usize] += 1;
                        }
                    }
                }
                for (t, info) in infos.iter().enumerate() {
                    let n = info.len() as usize;
                    assert!(held[t][..n].iter().all(|&c| c == 1), "{world} {rows} {t}");
                }
            }
        }
        assert!(Shard::even(&infos, 3, 3).is_err());
        assert!(Shard::new(&infos, vec![0..16, 0..7, 0..0, 0..8]).is_err());
        assert!(Shard::new(&infos, vec![0..15, 0..7]).is_err());
    }

    #[test]
    fn localized_units_are_the_held_elements_of_each_unit() {
        let infos = infos();
        for axis in [UnitAxis::First, UnitAxis::Last] {
            let policy = ClipPolicy::new(Rule::Agc(Agc::new(0.1).axis(axis)));
            let program = Program::new(&policy, &infos).unwrap();
            for world in 1..=5 {
                let mut seen: Vec<Vec<u64>> = vec![vec![]; program.units.len()];
                for rank in 0..world {
                    let shard = Shard::even(&infos, rank, world).unwrap();
                    let local = localize(&program, &shard);
                    assert_eq!(local.units.len(), program.units.len());
                    for (u, seg) in local.units.iter().enumerate() {
                        let base = shard.range(seg.tensor).start;
                        for k in 0..seg.len {
                            let e = seg.first + k * seg.stride;
                            assert!(e < shard.local_len(seg.tensor));
                            seen[u].push(base + e);
                        }
                    }
                }
                for (u, seg) in program.units.iter().enumerate() {
                    seen[u].sort();
                    let want: Vec<u64> = (0..seg.len).map(|k| seg.first + k * seg.stride).collect();
                    assert_eq!(seen[u], want, "{axis:?} world {world} unit {u}");
                }
            }
        }
    }
}
