//! wsimil's developer tools, apart from the product: what the benchmarks measure ([`bench`]), the
//! ICMIL teacher diagnostic ([`teacher_check`]), the synthetic TCGA-scale cohort ([`cohort`]) and
//! the `wsimil-dev` command line ([`cli`]).

pub mod alloc;
pub mod bench;
pub mod cli;
pub mod cohort;
pub mod teacher_check;
