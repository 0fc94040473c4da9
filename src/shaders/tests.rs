//! The shader ABI checked without a GPU: every kernel family parses and validates, every
//! pipeline variant the engine can ask for specialises and compiles to SPIR-V, every
//! entry point's bindings match its bind group layout, and every shared struct has the
//! same size and field offsets in WGSL (naga's layout) as in Rust.

use std::collections::HashMap;

use naga::back::pipeline_constants::process_overrides;
use naga::valid::{Capabilities, ValidationFlags, Validator};

use super::abi::STRUCTS;
use super::{Binding, Family, Kernel};

fn parse(family: Family) -> (naga::Module, naga::valid::ModuleInfo) {
    let source = family.source();
    let module = naga::front::wgsl::parse_str(&source)
        .unwrap_or_else(|e| panic!("{}.wgsl: {}", family.name(), e.emit_to_string(&source)));
    let info = Validator::new(ValidationFlags::all(), Capabilities::empty())
        .validate(&module)
        .unwrap_or_else(|e| panic!("{}.wgsl: {}", family.name(), e.emit_to_string(&source)));
    (module, info)
}

#[test]
fn every_family_validates() {
    for family in Family::ALL {
        parse(family);
    }
}

#[test]
fn every_variant_specialises_and_compiles() {
    let modules: HashMap<Family, _> = Family::ALL.iter().map(|&f| (f, parse(f))).collect();
    let mut seen = 0;
    for kernel in Kernel::all() {
        let spec = kernel.spec();
        let (module, info) = &modules[&spec.family];
        let constants: naga::back::PipelineConstants = spec
            .constants
            .iter()
            .map(|&(name, value)| (name.to_string(), value))
            .collect();
        for (name, _) in &spec.constants {
            assert!(
                module
                    .overrides
                    .iter()
                    .any(|(_, o)| o.name.as_deref() == Some(name)),
                "{kernel:?}: {}.wgsl has no override {name}",
                spec.family.name()
            );
        }
        let (module, info) = process_overrides(
            module,
            info,
            Some((naga::ShaderStage::Compute, spec.entry)),
            &constants,
        )
        .unwrap_or_else(|e| panic!("{kernel:?}: {e}"));
        let options = naga::back::spv::Options::default();
        let pipeline = naga::back::spv::PipelineOptions {
            shader_stage: naga::ShaderStage::Compute,
            entry_point: spec.entry.to_string(),
        };
        naga::back::spv::write_vec(&module, &info, &options, Some(&pipeline))
            .unwrap_or_else(|e| panic!("{kernel:?}: {e}"));
        seen += 1;
    }
    // 3 kernels without overrides, 8 optimizer updates, 16 rewrites; per norm kind:
    // reduce, 2 combines, coefs and 4 finishes (folding the units or not, with the
    // coefficients or without).
    assert_eq!(seen, 3 + 8 + 16 + 4 * (4 + 4), "variants");
}

/// The bindings an entry point uses: (binding, kind).
fn used_bindings(
    module: &naga::Module,
    info: &naga::valid::ModuleInfo,
    entry: &str,
) -> Vec<(u32, Binding)> {
    let index = module
        .entry_points
        .iter()
        .position(|e| e.name == entry)
        .unwrap_or_else(|| panic!("no entry point {entry}"));
    let usage = info.get_entry_point(index);
    let mut used: Vec<(u32, Binding)> = module
        .global_variables
        .iter()
        .filter(|(handle, _)| !usage[*handle].is_empty())
        .filter_map(|(_, var)| {
            let binding = var.binding.as_ref()?;
            assert_eq!(binding.group, 0, "{entry}: group {}", binding.group);
            let kind = match var.space {
                // The step slot is a uniform too; the layout says which are dynamic.
                naga::AddressSpace::Uniform if var.name.as_deref() == Some("step") => Binding::Step,
                naga::AddressSpace::Uniform => Binding::Uniform,
                naga::AddressSpace::Storage { access } => Binding::Storage {
                    read_only: !access.contains(naga::StorageAccess::STORE),
                },
                other => panic!("{entry}: binding {} in {other:?}", binding.binding),
            };
            Some((binding.binding, kind))
        })
        .collect();
    used.sort_by_key(|&(b, _)| b);
    used
}

#[test]
fn bindings_match_layouts() {
    for kernel in Kernel::all() {
        let spec = kernel.spec();
        let (module, info) = parse(spec.family);
        let layout = spec.layout.entries();
        for (binding, kind) in used_bindings(&module, &info, spec.entry) {
            let declared = layout.iter().find(|(b, _)| *b == binding);
            assert_eq!(
                declared.map(|(_, k)| *k),
                Some(kind),
                "{kernel:?}: binding {binding} of {}.wgsl",
                spec.family.name()
            );
        }
    }
}

#[test]
fn structs_match_rust() {
    // One module that declares every struct, so naga lays each out.
    let source = Family::NormReduce.source();
    let mut source = source;
    for s in STRUCTS {
        // Keep every struct alive: naga's layouter sees all declared types anyway.
        source.push_str(&format!("fn keep_{}(x: {}) {{}}\n", s.name, s.name));
    }
    let module = naga::front::wgsl::parse_str(&source).expect("abi parses");
    let mut layouter = naga::proc::Layouter::default();
    layouter.update(module.to_ctx()).expect("abi lays out");
    for s in STRUCTS {
        let (handle, ty) = module
            .types
            .iter()
            .find(|(_, t)| t.name.as_deref() == Some(s.name))
            .unwrap_or_else(|| panic!("WGSL has no struct {}", s.name));
        let naga::TypeInner::Struct { members, span } = &ty.inner else {
            panic!("{} is not a struct", s.name);
        };
        assert_eq!(*span as usize, s.size, "size of {}", s.name);
        assert_eq!(
            layouter[handle].size as usize, s.size,
            "layout size of {}",
            s.name
        );
        assert_eq!(members.len(), s.offsets.len(), "members of {}", s.name);
        for (m, (&offset, (name, _))) in members.iter().zip(s.offsets.iter().zip(s.fields)) {
            assert_eq!(m.name.as_deref(), Some(*name), "{}", s.name);
            assert_eq!(m.offset as usize, offset, "offset of {}.{}", s.name, name);
        }
    }
}

#[test]
fn imports_resolve_once() {
    for family in Family::ALL {
        let source = family.source();
        assert!(!source.contains("#import"), "{}", family.name());
        assert_eq!(
            source.matches("fn acc_identity").count(),
            source.contains("fn acc_identity") as usize,
            "{}",
            family.name()
        );
    }
}
