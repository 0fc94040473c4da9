//! The WGSL side of the library as data, independent of wgpu: the kernel families (one
//! `.wgsl` file each in `shaders/`), the shared files they import, the bind group layout
//! of every entry point, and every pipeline variant (entry point plus override constants)
//! the engine can ask for. `src/gpu/kernels.rs` compiles them for a device; the tests
//! here parse and validate each one with naga, without a GPU.
//!
//! Imports: a line `#import name` pulls in `shaders/shared/name.wgsl` (or the generated
//! [`abi`]) once per module, before the line, with its own imports first.

pub(crate) mod abi;

#[cfg(test)]
mod tests;

/// One `.wgsl` file with entry points: one stage of the engine each.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum Family {
    NormReduce,
    NormCombine,
    Coef,
    Rewrite,
    PerExample,
    Accumulate,
    Optimizer,
}

impl Family {
    pub(crate) const ALL: [Family; 7] = [
        Family::NormReduce,
        Family::NormCombine,
        Family::Coef,
        Family::Rewrite,
        Family::PerExample,
        Family::Accumulate,
        Family::Optimizer,
    ];

    /// The file name without `.wgsl`.
    pub(crate) fn name(self) -> &'static str {
        match self {
            Family::NormReduce => "norm_reduce",
            Family::NormCombine => "norm_combine",
            Family::Coef => "coef",
            Family::Rewrite => "rewrite",
            Family::PerExample => "per_example",
            Family::Accumulate => "accumulate",
            Family::Optimizer => "optimizer",
        }
    }

    fn text(self) -> &'static str {
        match self {
            Family::NormReduce => include_str!("../../shaders/norm_reduce.wgsl"),
            Family::NormCombine => include_str!("../../shaders/norm_combine.wgsl"),
            Family::Coef => include_str!("../../shaders/coef.wgsl"),
            Family::Rewrite => include_str!("../../shaders/rewrite.wgsl"),
            Family::PerExample => include_str!("../../shaders/per_example.wgsl"),
            Family::Accumulate => include_str!("../../shaders/accumulate.wgsl"),
            Family::Optimizer => include_str!("../../shaders/optimizer.wgsl"),
        }
    }

    /// The module's WGSL with every import resolved.
    pub(crate) fn source(self) -> String {
        let mut out = String::new();
        let mut seen = Vec::new();
        resolve(self.text(), &mut seen, &mut out);
        out
    }
}

/// The include of deferred scaling (`shaders/deferred.wgsl`) with its imports resolved
/// and its placeholders (`{group}`, ...) still in place.
pub(crate) fn deferred_template() -> String {
    template(include_str!("../../shaders/deferred.wgsl"))
}

/// The include that reads a loss scale (`shaders/loss_scale.wgsl`), placeholders in place.
pub(crate) fn loss_scale_template() -> String {
    template(include_str!("../../shaders/loss_scale.wgsl"))
}

/// A caller's include with its imports resolved.
fn template(text: &str) -> String {
    let mut out = String::new();
    resolve(text, &mut Vec::new(), &mut out);
    out
}

/// The shared files, by import name.
fn shared(name: &str) -> Option<String> {
    let text = match name {
        "abi" => return Some(abi::wgsl()),
        "acc" => include_str!("../../shaders/shared/acc.wgsl"),
        "convert" => include_str!("../../shaders/shared/convert.wgsl"),
        "grid" => include_str!("../../shaders/shared/grid.wgsl"),
        "philox" => include_str!("../../shaders/shared/philox.wgsl"),
        "select" => include_str!("../../shaders/shared/select.wgsl"),
        "transform" => include_str!("../../shaders/shared/transform.wgsl"),
        "units" => include_str!("../../shaders/shared/units.wgsl"),
        "workgroup_reduce" => include_str!("../../shaders/shared/workgroup_reduce.wgsl"),
        _ => return None,
    };
    Some(text.to_string())
}

fn resolve(text: &str, seen: &mut Vec<String>, out: &mut String) {
    for line in text.lines() {
        match line.strip_prefix("#import ") {
            Some(name) => {
                let name = name.trim();
                if seen.iter().any(|s| s == name) {
                    continue;
                }
                seen.push(name.to_string());
                // Every name is a literal of this crate's shaders: a typo fails the
                // shader tests, so it cannot reach a user.
                let text = shared(name).unwrap_or_else(|| panic!("unknown WGSL import {name}"));
                resolve(&text, seen, out);
            }
            None => {
                out.push_str(line);
                out.push('\n');
            }
        }
    }
}

/// How an entry point sees one binding.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Binding {
    Storage {
        read_only: bool,
    },
    Uniform,
    /// The step's [`abi::StepParams`]: a uniform bound at the step's dynamic offset.
    Step,
}

const RO: Binding = Binding::Storage { read_only: true };
const RW: Binding = Binding::Storage { read_only: false };
const UNIFORM: Binding = Binding::Uniform;
const STEP: Binding = Binding::Step;

/// A bind group layout (group 0) shared by the entry points that use it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum BindLayout {
    /// `norm_reduce` and `rewrite`: one binding window of the caller's buffers with a chunk
    /// table, so that one bind group per window serves the reduce and the rewrite over it
    /// (a move to other buffers makes one bind group per window anew).
    Window,
    /// `norm_combine`'s `main`.
    Combine,
    /// `norm_combine`'s `groups`.
    Groups,
    Coef,
    PerExample,
    Accumulate,
    /// `optimizer`'s `tick`.
    OptimizerTick,
    /// `optimizer`'s `update`.
    OptimizerUpdate,
}

impl BindLayout {
    pub(crate) const ALL: [BindLayout; 8] = [
        BindLayout::Window,
        BindLayout::Combine,
        BindLayout::Groups,
        BindLayout::Coef,
        BindLayout::PerExample,
        BindLayout::Accumulate,
        BindLayout::OptimizerTick,
        BindLayout::OptimizerUpdate,
    ];

    /// `(binding, kind)` of every entry.
    pub(crate) fn entries(self) -> &'static [(u32, Binding)] {
        match self {
            BindLayout::Window => &[
                (0, RW),
                (1, RO),
                (2, RW),
                (3, STEP),
                (4, UNIFORM),
                (5, RO),
                (6, RO),
            ],
            BindLayout::Combine => &[(0, RO), (1, RO), (2, RW), (3, STEP), (4, UNIFORM)],
            BindLayout::Groups => &[
                (0, RO),
                (1, RO),
                (2, RW),
                (3, STEP),
                (4, UNIFORM),
                (5, RO),
                (6, RO),
            ],
            BindLayout::Coef => &[
                (0, RO),
                (1, RW),
                (2, RW),
                (3, STEP),
                (4, UNIFORM),
                (5, RO),
                (6, RO),
                (7, RW),
                (8, RO),
                (9, RO),
                (10, RO),
            ],
            BindLayout::PerExample => {
                &[(0, RO), (1, RW), (2, RO), (3, UNIFORM), (4, STEP), (5, RO)]
            }
            BindLayout::Accumulate => &[(0, RW), (1, RO), (2, RO), (3, UNIFORM)],
            BindLayout::OptimizerTick => &[(3, STEP), (6, RO), (8, RW), (9, UNIFORM)],
            BindLayout::OptimizerUpdate => &[
                (0, RO),
                (1, RO),
                (2, RO),
                (3, STEP),
                (4, UNIFORM),
                (5, RW),
                (6, RO),
                (7, RW),
                (8, RO),
                (9, UNIFORM),
            ],
        }
    }
}

/// A compute pipeline the library uses, with its override constants.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum Kernel {
    /// `reduce`: chunk partials of norm kind `KIND_*`.
    Reduce(u32),
    /// `combine`: runs of accumulators into one.
    Combine(u32),
    /// `combine`: a norm stage's group norms from scaled unit norms.
    Groups(u32),
    /// `coef`, entry `finish` (the stages' rules come from their rows); `from_units`: its
    /// first stage's one group folded from the unit norms in its own workgroup; `coefs`:
    /// the unit coefficients of every stage it runs too.
    Finish {
        kind: u32,
        from_units: bool,
        coefs: bool,
    },
    /// `coef`, entry `coefs`.
    Coefs(u32),
    /// `rewrite`; `shared_words`: units may share 32-bit words (the atomic entry);
    /// `scale`: the step has coefficients or zeroes NaNs; `noise`, `clamp`: it adds noise,
    /// clamps.
    Rewrite {
        shared_words: bool,
        scale: bool,
        noise: bool,
        clamp: bool,
    },
    PerExample,
    Accumulate,
    /// `optimizer`, entry `tick`.
    OptimizerTick,
    /// `optimizer`, entry `update`, with the `rewrite` flags of the clip it applies
    /// (all off after an in-place clip).
    OptimizerUpdate {
        scale: bool,
        noise: bool,
        clamp: bool,
    },
}

/// The override constants of `transform.wgsl`.
fn transform_flags(scale: bool, noise: bool, clamp: bool) -> Vec<(&'static str, f64)> {
    let flag = |on: bool| on as u8 as f64;
    vec![
        ("SCALE", flag(scale)),
        ("NOISE", flag(noise)),
        ("CLAMP", flag(clamp)),
    ]
}

/// Where a [`Kernel`] lives and how it is specialised.
#[derive(Debug, Clone)]
pub(crate) struct KernelSpec {
    pub family: Family,
    pub entry: &'static str,
    pub layout: BindLayout,
    pub constants: Vec<(&'static str, f64)>,
}

impl Kernel {
    /// Every variant the engine can ask for (validated by the shader tests).
    #[cfg(test)]
    pub(crate) fn all() -> Vec<Kernel> {
        use abi::*;
        let kinds = [KIND_INF, KIND_L1, KIND_L2, KIND_P];
        let mut all = vec![
            Kernel::PerExample,
            Kernel::Accumulate,
            Kernel::OptimizerTick,
        ];
        for bits in 0..8 {
            all.push(Kernel::OptimizerUpdate {
                scale: bits & 1 != 0,
                noise: bits & 2 != 0,
                clamp: bits & 4 != 0,
            });
        }
        for bits in 0..16 {
            all.push(Kernel::Rewrite {
                shared_words: bits & 1 != 0,
                noise: bits & 2 != 0,
                clamp: bits & 4 != 0,
                scale: bits & 8 != 0,
            });
        }
        for kind in kinds {
            all.extend([
                Kernel::Reduce(kind),
                Kernel::Combine(kind),
                Kernel::Groups(kind),
            ]);
            all.push(Kernel::Coefs(kind));
            for bits in 0..4 {
                all.push(Kernel::Finish {
                    kind,
                    from_units: bits & 1 != 0,
                    coefs: bits & 2 != 0,
                });
            }
        }
        all
    }

    pub(crate) fn spec(self) -> KernelSpec {
        let kind = |k: u32| vec![("NORM_KIND", k as f64)];
        let (family, entry, layout, constants) = match self {
            Kernel::Reduce(k) => (Family::NormReduce, "main", BindLayout::Window, kind(k)),
            Kernel::Combine(k) => (Family::NormCombine, "main", BindLayout::Combine, kind(k)),
            Kernel::Groups(k) => (Family::NormCombine, "groups", BindLayout::Groups, kind(k)),
            Kernel::Finish {
                kind: k,
                from_units,
                coefs,
            } => (
                Family::Coef,
                "finish",
                BindLayout::Coef,
                vec![
                    ("NORM_KIND", k as f64),
                    ("FROM_UNITS", from_units as u8 as f64),
                    ("COEFS", coefs as u8 as f64),
                ],
            ),
            Kernel::Coefs(k) => (Family::Coef, "coefs", BindLayout::Coef, kind(k)),
            Kernel::Rewrite {
                shared_words,
                scale,
                noise,
                clamp,
            } => {
                let entry = if shared_words { "shared_words" } else { "main" };
                let flags = transform_flags(scale, noise, clamp);
                (Family::Rewrite, entry, BindLayout::Window, flags)
            }
            Kernel::OptimizerTick => (Family::Optimizer, "tick", BindLayout::OptimizerTick, vec![]),
            Kernel::OptimizerUpdate {
                scale,
                noise,
                clamp,
            } => (
                Family::Optimizer,
                "update",
                BindLayout::OptimizerUpdate,
                transform_flags(scale, noise, clamp),
            ),
            Kernel::PerExample => (Family::PerExample, "main", BindLayout::PerExample, vec![]),
            Kernel::Accumulate => (Family::Accumulate, "main", BindLayout::Accumulate, vec![]),
        };
        KernelSpec {
            family,
            entry,
            layout,
            constants,
        }
    }
}
