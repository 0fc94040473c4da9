//! A step recorded once: the list of what it runs, decided from the program and the step's
//! [`Mode`] alone. The GPU engine builds its pipelines from the list and replays it into a
//! compute pass (`gpu/engine/record.rs`); the CPU engine executes the same list, stage for
//! stage (`cpu/engine.rs`).

use crate::chain::{ChainKind, Program};

/// What one step does: the valid combinations of the engine's stages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Mode {
    /// Norms from the gradients and every stage's finish; nothing rewritten (a total
    /// norm, PyTorch's `get_total_norm`).
    Measure,
    /// Norms, every stage and the unit coefficients, no rewrite: coefficients read by
    /// another pass (deferred scaling, the fused optimizer, per-example sums).
    Coefficients,
    /// Norms, coefficients and the rewrite: a clip.
    Clip,
    /// A total norm given by the caller (the split API): coefficients and the rewrite.
    GivenNorm,
    /// The rewrite alone, dispatched in full: a value clamp with no norm.
    ValueOnly,
    /// The unit norms and nothing else (the first half of a sharded step); its readback
    /// holds the unit norms of the gradients, then of the parameters.
    UnitsOnly,
    /// From the unit norms already in place (`Engine::write_units` of the GPU, after the ranks
    /// merged them): the stages from their `combine` on, then the rewrite.
    FromUnits,
}

impl Mode {
    /// Runs `reduce` over the gradients.
    pub(crate) fn reduces(self) -> bool {
        matches!(
            self,
            Mode::Measure | Mode::Coefficients | Mode::Clip | Mode::UnitsOnly
        )
    }

    /// Runs the stages' `combine` of group norms.
    pub(crate) fn groups(self) -> bool {
        matches!(
            self,
            Mode::Measure | Mode::Coefficients | Mode::Clip | Mode::FromUnits
        )
    }

    /// Runs the norm stages (`finish`, and `coefs` when [`Mode::coefs`]).
    pub(crate) fn stages(self) -> bool {
        !matches!(self, Mode::ValueOnly | Mode::UnitsOnly)
    }

    /// Computes the unit coefficients (`coef`'s per-unit entry, or its `finish`).
    pub(crate) fn coefs(self) -> bool {
        matches!(
            self,
            Mode::Coefficients | Mode::Clip | Mode::GivenNorm | Mode::FromUnits
        )
    }

    /// Runs `rewrite`.
    pub(crate) fn rewrite(self) -> bool {
        matches!(
            self,
            Mode::Clip | Mode::GivenNorm | Mode::ValueOnly | Mode::FromUnits
        )
    }
}

/// One entry of a step's recording: a stage of the engine (on the GPU a dispatch, or for a
/// reduction its pair of dispatches).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Dispatch {
    /// The gradients' reduce over spans, for a direct step (one coefficient, no noise).
    SpanReduce,
    /// The chunk partials of the gradients (or, `params`, of the parameters, in L2),
    /// then the unit norms when `combine`.
    Reduce { params: bool, combine: bool },
    /// Stage `k`'s group norms from the unit norms.
    Groups(usize),
    /// Stage `stage`'s total (from `from`), policy and adaptive state; with `coefs`, its
    /// unit coefficients too. Then, in the same dispatch, the `stages - 1` stages after
    /// it, each its total from the unit norms (they are global: [`Profile::run`]). The
    /// chain's last stage also takes back what the earlier adaptive stages recorded when
    /// a stage held the step.
    Finish {
        stage: usize,
        stages: usize,
        from: Source,
        coefs: bool,
    },
    /// Stage `k`'s unit coefficients, in a pass of their own.
    Coefs(usize),
    /// The elementwise pass over every binding window.
    Rewrite,
}

/// What a stage's `finish` combines into its total.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Source {
    /// The reduction's chunk partials (a single global stage that reads no unit norms).
    Partials,
    /// Its group norms: combined by a `Groups` entry before it, or, for a first stage
    /// whose groups are the units, the unit norms. (Under a given total: nothing.)
    GroupNorms,
    /// The unit norms times the coefficients so far, folded by `finish` itself: the
    /// stage's one group is every unit, so no `Groups` entry runs.
    UnitNorms,
}

/// Up to this many units, a stage's `finish` computes their coefficients itself instead of
/// leaving them to a pass of their own, and runs the global stages after it (one
/// workgroup takes at most 16 units per thread, less than another dispatch costs to
/// record). A global stage folds its one group from the units at any count.
pub(crate) const FUSED_UNITS: usize = 16 * crate::shaders::abi::WG as usize;

/// What of a program decides its recordings, fixed when it is planned.
#[derive(Debug, Clone)]
pub(crate) struct Profile {
    /// A single global stage over every unit: a step that reads no unit norms takes its
    /// total straight from the reduction's partials.
    single_global: bool,
    /// ... and no noise: one coefficient for every element, so such a step reduces spans
    /// of the gradients (small tensors share chunks) instead of units.
    spans: bool,
    /// AGC reads the parameters' norms too.
    params: bool,
    /// Per stage: its group norms are combined from the unit norms (not so for a first
    /// stage whose groups are the units).
    groups: Vec<bool>,
    /// Per stage: its one group is every unit, with one coefficient for all of them.
    uniform: Vec<bool>,
    /// Per stage: how many stages a `finish` from it runs ([`Profile::run`]).
    runs: Vec<usize>,
    /// The program has units to scale.
    units: bool,
    /// At most [`FUSED_UNITS`] units: every `finish` computes its stage's coefficients.
    fused: bool,
    /// The chain only measures: nothing is ever rewritten.
    measures: bool,
}

impl Profile {
    /// The profile of `program`, whose steps add noise when `noise`.
    pub(crate) fn of(program: &Program, noise: bool) -> Profile {
        let stages = &program.stages;
        let single_global = stages.len() == 1 && stages[0].is_uniform();
        Profile {
            single_global,
            spans: single_global && !noise,
            params: program.needs_params(),
            groups: (stages.iter().enumerate())
                .map(|(k, s)| !(k == 0 && s.is_identity()))
                .collect(),
            uniform: stages.iter().map(|s| s.is_uniform()).collect(),
            runs: (0..stages.len())
                .map(|k| {
                    1 + stages[k + 1..]
                        .iter()
                        .take_while(|s| s.is_uniform())
                        .count()
                })
                .collect(),
            units: !program.units.is_empty(),
            fused: program.units.len() <= FUSED_UNITS,
            measures: program.kind == ChainKind::Measure,
        }
    }

    /// A single global stage: the total from the reduction's partials, without unit norms.
    pub(crate) fn single_global(&self) -> bool {
        self.single_global
    }

    /// A single global stage without noise: the reduction over spans.
    pub(crate) fn spans(&self) -> bool {
        self.spans
    }

    /// Whether some step's `finish` from stage `k` runs more than stage `k`: it computes
    /// the coefficients in its workgroup, global stages follow, and `k` is not inside an
    /// earlier stage's run.
    pub(crate) fn opens_run(&self, k: usize) -> bool {
        self.fused && self.runs[k] > 1 && (k == 0 || !self.uniform[k])
    }

    /// How many stages a `finish` from stage `k` runs when the step computes the unit
    /// coefficients in its workgroup and does not read group norms back: stage `k` and
    /// the global stages (one group of every unit) right after it, whose totals the
    /// workgroup folds from the unit norms times the coefficients so far.
    pub(crate) fn run(&self, k: usize) -> usize {
        self.runs[k]
    }

    /// Whether a step in `mode` (reading unit norms back when `detail`) finishes its
    /// single global stage straight from the reduction's partials.
    fn direct(&self, mode: Mode, detail: bool) -> bool {
        mode.reduces() && mode != Mode::UnitsOnly && !detail && self.single_global
    }
}

/// Records a step in `mode` of a program of `profile` (reading its unit norms back when
/// `detail`) into `out` (cleared first): every stage it runs, in order. The one decision
/// of what a step runs, on either backend.
pub(crate) fn record(profile: &Profile, mode: Mode, detail: bool, out: &mut Vec<Dispatch>) {
    let direct = profile.direct(mode, detail);
    out.clear();
    if direct && profile.spans {
        out.push(Dispatch::SpanReduce);
    } else if mode.reduces() {
        out.push(Dispatch::Reduce {
            params: false,
            combine: !direct,
        });
        if profile.params {
            out.push(Dispatch::Reduce {
                params: true,
                combine: true,
            });
        }
    }
    if mode.stages() {
        let coefs = mode.coefs() && profile.units;
        let fused = coefs && profile.fused;
        let mut k = 0;
        while k < profile.groups.len() {
            let groups = profile.groups[k] && mode.groups();
            let from = if direct && k == 0 {
                Source::Partials
            } else if !groups {
                Source::GroupNorms
            } else if profile.uniform[k] && !detail {
                // (A step that reads the group norms back has them combined.)
                Source::UnitNorms
            } else {
                out.push(Dispatch::Groups(k));
                Source::GroupNorms
            };
            // The stages after it form their groups in its workgroup.
            let stages = if fused && mode.groups() && !detail {
                profile.run(k)
            } else {
                1
            };
            out.push(Dispatch::Finish {
                stage: k,
                stages,
                from,
                coefs: fused,
            });
            if coefs && !fused {
                out.push(Dispatch::Coefs(k));
            }
            k += stages;
        }
    }
    // A chain that only measures writes nothing, whatever the mode of the step.
    if mode.rewrite() && !profile.measures {
        out.push(Dispatch::Rewrite);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chain::{AutoClip, ClipPolicy, PerTensorClip, Rule, TensorInfo, ZClip};
    use crate::ops::ValueClip;
    use Source::{GroupNorms, Partials, UnitNorms};

    /// The recording of `policy` over `n` tensors.
    fn over(n: usize, policy: ClipPolicy, noise: bool, mode: Mode, detail: bool) -> Vec<Dispatch> {
        let lens = vec![3usize; n];
        let program = Program::new(&policy, &TensorInfo::unnamed(lens)).unwrap();
        let mut out = vec![Dispatch::Groups(9)];
        record(&Profile::of(&program, noise), mode, detail, &mut out);
        out
    }

    fn recording(policy: ClipPolicy, noise: bool, mode: Mode, detail: bool) -> Vec<Dispatch> {
        over(2, policy, noise, mode, detail)
    }

    fn finish(stage: usize, from: Source, coefs: bool) -> Dispatch {
        run(stage, 1, from, coefs)
    }

    fn run(stage: usize, stages: usize, from: Source, coefs: bool) -> Dispatch {
        Dispatch::Finish {
            stage,
            stages,
            from,
            coefs,
        }
    }

    const UNITS: Dispatch = Dispatch::Reduce {
        params: false,
        combine: true,
    };

    #[test]
    fn each_mode_records_the_stages_it_runs() {
        use Dispatch::*;
        let global = ClipPolicy::global_norm(1.0);
        // One coefficient, no noise, no unit norms read: the reduce over spans, the total
        // from its partials with the coefficients, the rewrite.
        let direct = vec![SpanReduce, finish(0, Partials, true), Rewrite];
        assert_eq!(recording(global.clone(), false, Mode::Clip, false), direct);
        // Unit norms read back: the units, then the group of all of them, combined by a
        // pass of its own (its norm is read back too).
        let detailed = vec![UNITS, Groups(0), finish(0, GroupNorms, true), Rewrite];
        assert_eq!(recording(global.clone(), false, Mode::Clip, true), detailed);
        // Noise: no spans (every element has its own noise), the total still direct.
        assert_eq!(
            recording(global.clone(), true, Mode::Clip, false)[0],
            Reduce {
                params: false,
                combine: false
            }
        );
        // The split API: no reduce, no groups.
        let given = vec![finish(0, GroupNorms, true), Rewrite];
        assert_eq!(
            recording(global.clone(), false, Mode::GivenNorm, false),
            given
        );
        // A measure: no coefficients, nothing written.
        let measure = vec![SpanReduce, finish(0, Partials, false)];
        assert_eq!(
            recording(ClipPolicy::total_norm(), false, Mode::Measure, false),
            measure
        );
        // Even in a clip's mode, a chain that only measures writes nothing.
        let clip_mode = recording(ClipPolicy::total_norm(), false, Mode::Clip, false);
        assert!(!clip_mode.iter().any(|d| matches!(d, Rewrite)));
        // A clamp alone: the rewrite over every element, nothing else.
        let value = ClipPolicy::value_clip(ValueClip::symmetric(1.0));
        assert_eq!(
            recording(value, false, Mode::ValueOnly, false),
            vec![Rewrite]
        );
        // A sharded step: the units (and AGC's parameters) alone, then, from the exchanged
        // unit norms, everything but `reduce`.
        let agc = ClipPolicy::new(crate::chain::Agc::new(0.01));
        let program = Program::new(&agc, &[TensorInfo::new("w", &[3, 5])]).unwrap();
        let mut units = Vec::new();
        record(
            &Profile::of(&program, false),
            Mode::UnitsOnly,
            false,
            &mut units,
        );
        let params = Reduce {
            params: true,
            combine: true,
        };
        assert_eq!(units, vec![UNITS, params]);
        let from_units = recording(global.clone(), false, Mode::FromUnits, false);
        assert_eq!(from_units, vec![finish(0, UnitNorms, true), Rewrite]);
    }

    #[test]
    fn the_global_stages_after_a_stage_run_in_its_dispatch() {
        use Dispatch::*;
        // Per-tensor groups are the units: no groups entry for the first stage. The global
        // stages after it fold the units in its workgroup; one finish computes every
        // stage's coefficients.
        let chain = ClipPolicy::new(PerTensorClip::new(1.0))
            .then(ZClip::new())
            .then(Rule::GlobalNorm(2.0));
        let r = |n, detail| over(n, chain.clone(), false, Mode::Coefficients, detail);
        assert_eq!(
            r(FUSED_UNITS, false),
            vec![UNITS, run(0, 3, GroupNorms, true)]
        );
        // Read back, the last stage's group norms are combined by their own pass, and
        // every stage runs alone.
        let detailed = vec![
            UNITS,
            finish(0, GroupNorms, true),
            Groups(1),
            finish(1, GroupNorms, true),
            Groups(2),
            finish(2, GroupNorms, true),
        ];
        assert_eq!(r(FUSED_UNITS, true), detailed);
        // More units than one workgroup walks: the coefficients in passes of their own,
        // a global stage's group still folded by its finish.
        let apart = vec![
            UNITS,
            finish(0, GroupNorms, false),
            Coefs(0),
            finish(1, UnitNorms, false),
            Coefs(1),
            finish(2, UnitNorms, false),
            Coefs(2),
        ];
        assert_eq!(r(FUSED_UNITS + 1, false), apart);
        // A stage with groups of its own has them combined, and starts a run of its own.
        let groups = ClipPolicy::new(ZClip::new())
            .then(PerTensorClip::new(1.0))
            .then(Rule::GlobalNorm(2.0))
            .then(AutoClip::new(90.0, 10));
        assert_eq!(
            over(4, groups.clone(), false, Mode::Clip, false),
            vec![
                UNITS,
                finish(0, UnitNorms, true),
                Groups(1),
                run(1, 3, GroupNorms, true),
                Rewrite
            ]
        );
        // A measure computes no coefficients: every stage alone.
        let measure = over(4, groups, false, Mode::Measure, false);
        assert_eq!(
            measure
                .iter()
                .filter(|d| matches!(d, Finish { .. }))
                .count(),
            4
        );
    }
}
