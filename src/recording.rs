//! A step recorded once: the list of what it runs, decided from the program and the step's
//! [`Mode`] alone. The GPU engine builds its pipelines from the list and replays it into a
//! compute pass (`gpu/engine/record.rs`); the CPU engine executes the same list, stage for
//! stage (`cpu/engine.rs`).

use crate::chain::{ChainKind, Program};
use crate::shaders::abi::ADAPTIVE_NONE;

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

    /// Runs `coef`'s per-unit entry.
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
    /// Stage `k`'s total, policy and adaptive state; `partials`: straight from the chunk
    /// partials.
    Finish { stage: usize, partials: bool },
    /// Stage `k`'s unit coefficients.
    Coefs(usize),
    /// Stage `k` takes back what it recorded when a later stage held the step.
    Undo(usize),
    /// The elementwise pass over every binding window.
    Rewrite,
}

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
    /// Per stage: it keeps an adaptive state.
    adaptive: Vec<bool>,
    /// The program has units to scale.
    units: bool,
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
            adaptive: stages.iter().map(|s| s.adaptive != ADAPTIVE_NONE).collect(),
            units: !program.units.is_empty(),
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
        for (k, &groups) in profile.groups.iter().enumerate() {
            if groups && mode.groups() && !direct {
                out.push(Dispatch::Groups(k));
            }
            out.push(Dispatch::Finish {
                stage: k,
                partials: direct && k == 0,
            });
            if mode.coefs() && profile.units {
                out.push(Dispatch::Coefs(k));
            }
        }
        // A later stage may hold the step: the adaptive stages before the last take back
        // what they recorded (`undo` checks).
        let earlier = profile.adaptive.len().saturating_sub(1);
        for k in (0..earlier).filter(|&k| profile.adaptive[k]) {
            out.push(Dispatch::Undo(k));
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
    use crate::chain::{ClipPolicy, PerTensorClip, Rule, TensorInfo, ZClip};
    use crate::ops::ValueClip;

    fn recording(policy: ClipPolicy, noise: bool, mode: Mode, detail: bool) -> Vec<Dispatch> {
        let program = Program::new(&policy, &TensorInfo::unnamed([3, 5])).unwrap();
        let mut out = vec![Dispatch::Undo(9)];
        record(&Profile::of(&program, noise), mode, detail, &mut out);
        out
    }

    #[test]
    fn each_mode_records_the_stages_it_runs() {
        use Dispatch::*;
        let global = ClipPolicy::global_norm(1.0);
        // One coefficient, no noise, no unit norms read: the reduce over spans, the total
        // from its partials, the coefficients, the rewrite.
        let direct = vec![
            SpanReduce,
            Finish {
                stage: 0,
                partials: true,
            },
            Coefs(0),
            Rewrite,
        ];
        assert_eq!(recording(global.clone(), false, Mode::Clip, false), direct);
        // Unit norms read back: the units, then the group of all of them.
        let detailed = vec![
            Reduce {
                params: false,
                combine: true,
            },
            Groups(0),
            Finish {
                stage: 0,
                partials: false,
            },
            Coefs(0),
            Rewrite,
        ];
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
        let given = vec![
            Finish {
                stage: 0,
                partials: false,
            },
            Coefs(0),
            Rewrite,
        ];
        assert_eq!(
            recording(global.clone(), false, Mode::GivenNorm, false),
            given
        );
        // A measure: no coefficients, nothing written.
        let measure = vec![
            SpanReduce,
            Finish {
                stage: 0,
                partials: true,
            },
        ];
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
        assert_eq!(
            units,
            vec![
                Reduce {
                    params: false,
                    combine: true
                },
                Reduce {
                    params: true,
                    combine: true
                }
            ]
        );
        let from_units = recording(global.clone(), false, Mode::FromUnits, false);
        assert_eq!(
            from_units,
            vec![
                Groups(0),
                Finish {
                    stage: 0,
                    partials: false
                },
                Coefs(0),
                Rewrite
            ]
        );
        // Per-tensor groups are the units: no groups dispatch for the first stage; an
        // adaptive stage before a later one takes back what it recorded.
        let chain = ClipPolicy::new(PerTensorClip::new(1.0))
            .then(ZClip::new())
            .then(Rule::GlobalNorm(2.0));
        let r = recording(chain, false, Mode::Coefficients, false);
        assert_eq!(
            r,
            vec![
                Reduce {
                    params: false,
                    combine: true
                },
                Finish {
                    stage: 0,
                    partials: false
                },
                Coefs(0),
                Groups(1),
                Finish {
                    stage: 1,
                    partials: false
                },
                Coefs(1),
                Groups(2),
                Finish {
                    stage: 2,
                    partials: false
                },
                Coefs(2),
                Undo(1),
            ]
        );
    }
}
