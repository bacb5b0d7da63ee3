//! Which vector instructions this CPU's kernels may use: one rule for every choice made at run
//! time (the fused ViT kernels' `#[target_feature]` copies in [`super::vit_cpu`], OpenBLAS's
//! `OPENBLAS_CORETYPE` in [`super::blas`]).
//!
//! A level is chosen only when the CPU has *every* feature its kernels are compiled for: running
//! code built for `avx512bw` on a CPU that has only `avx512f` (some Xeon Phi, some hypervisors that
//! mask features) is undefined behaviour, not a slow path.

/// A level of vector instructions, widest first.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Simd {
    /// AVX-512 (foundation, byte/word, dword/qword, vector length) with FMA.
    Avx512,
    /// AVX2 with FMA.
    Avx2,
    /// What every x86-64 (or other) CPU has.
    Baseline,
}

/// The features the AVX-512 kernels are compiled for (their `target_feature` list, in this order).
pub const AVX512_FEATURES: &[&str] = &["avx512f", "avx512bw", "avx512dq", "avx512vl", "fma"];
/// The features the AVX2 kernels are compiled for.
pub const AVX2_FEATURES: &[&str] = &["avx2", "fma"];

impl Simd {
    /// The widest level all of whose features `has` reports.
    pub fn from_features(has: impl Fn(&str) -> bool) -> Simd {
        if AVX512_FEATURES.iter().all(|f| has(f)) {
            Simd::Avx512
        } else if AVX2_FEATURES.iter().all(|f| has(f)) {
            Simd::Avx2
        } else {
            Simd::Baseline
        }
    }

    /// This CPU's level, detected once.
    pub fn of_this_cpu() -> Simd {
        static LEVEL: std::sync::OnceLock<Simd> = std::sync::OnceLock::new();
        *LEVEL.get_or_init(|| Simd::from_features(detected))
    }
}

/// Whether this CPU has the named feature (one of the names above; any other is `false`).
fn detected(feature: &str) -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::is_x86_feature_detected as has;
        match feature {
            "avx512f" => has!("avx512f"),
            "avx512bw" => has!("avx512bw"),
            "avx512dq" => has!("avx512dq"),
            "avx512vl" => has!("avx512vl"),
            "avx2" => has!("avx2"),
            "fma" => has!("fma"),
            _ => false,
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = feature;
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn level(features: &[&str]) -> Simd {
        Simd::from_features(|f| features.contains(&f))
    }

    #[test]
    fn a_level_needs_every_feature_its_kernels_are_compiled_for() {
        assert_eq!(level(&["avx512f", "avx512bw", "avx512dq", "avx512vl", "fma", "avx2"]), Simd::Avx512);
        // AVX-512 foundation alone (the case that was undefined behaviour): the AVX2 kernels.
        assert_eq!(level(&["avx512f", "avx2", "fma"]), Simd::Avx2);
        for missing in AVX512_FEATURES {
            let rest: Vec<&str> = AVX512_FEATURES.iter().copied().filter(|f| f != missing).chain(["avx2"]).collect();
            let want = if *missing == "fma" { Simd::Baseline } else { Simd::Avx2 };
            assert_eq!(level(&rest), want, "without {missing}");
        }
        assert_eq!(level(&["avx2"]), Simd::Baseline, "AVX2 without FMA");
        assert_eq!(level(&["fma"]), Simd::Baseline);
        assert_eq!(level(&[]), Simd::Baseline);
    }

    /// The kernels' `target_feature` lists are literals (the attribute takes no constant): they
    /// must name exactly what the rule checks.
    #[test]
    fn the_kernels_are_compiled_for_exactly_the_features_the_rule_checks() {
        let src = include_str!("vit_cpu.rs");
        let enabled: Vec<&str> = src
            .lines()
            .filter_map(|l| l.trim().strip_prefix("#[target_feature(enable = \""))
            .map(|l| l.trim_end_matches("\")]"))
            .collect();
        assert_eq!(enabled, [AVX512_FEATURES.join(","), AVX2_FEATURES.join(",")], "vit_cpu.rs's kernels");
    }
}
