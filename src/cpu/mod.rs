//! The CPU path: multi-threaded (rayon), exact enough to be the test oracle of the GPU
//! path, and the fallback when no adapter exists. `engine.rs` twins the GPU engine stage
//! for stage; every CPU runner (the policy, the accumulator, the optimizer, the sharded
//! policy, the per-example clipper) runs it.

/// Defines `fn $name` three times: as built, compiled for AVX2 and FMA, and for AVX-512
/// (F and BW); it runs the widest the CPU has (checked at run time). The 16-bit loops
/// (widening, f64 accumulation, rounding back) are bound by arithmetic at the baseline
/// x86-64 vector width, not by memory. Helpers the body calls must be `#[inline(always)]`
/// to be compiled with the wider vectors too.
macro_rules! wide_fn {
    ($(#[$meta:meta])* $vis:vis fn $name:ident($($arg:ident: $ty:ty),* $(,)?) $(-> $ret:ty)? $body:block) => {
        $(#[$meta])*
        $vis fn $name($($arg: $ty),*) $(-> $ret)? {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx512bw,avx2,fma")]
                fn avx512($($arg: $ty),*) $(-> $ret)? $body
                #[target_feature(enable = "avx2,fma")]
                fn avx2($($arg: $ty),*) $(-> $ret)? $body
                if std::is_x86_feature_detected!("avx512f") && std::is_x86_feature_detected!("avx512bw") {
                    // SAFETY: the CPU has AVX-512 F and BW (and so AVX2 and FMA), checked just above.
                    return unsafe { avx512($($arg),*) };
                }
                if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
                    // SAFETY: the CPU has AVX2 and FMA, checked just above.
                    return unsafe { avx2($($arg),*) };
                }
            }
            $body
        }
    };
}

// The runner types are exported at the crate root (one home each).
pub(crate) mod accumulate;
mod apply;
pub(crate) mod engine;
mod norm_reduce;
pub(crate) mod optimizer;
pub(crate) mod per_example;
pub(crate) mod philox;
pub(crate) mod policy;
mod prefetch;
pub(crate) mod sharded;
