//! wsimil's developer tools, apart from the product: what the benchmarks measure ([`bench`]), the
//! ICMIL teacher diagnostic ([`teacher_check`]) and the `wsimil-dev` command line ([`cli`]).

pub mod alloc;
pub mod bench;
pub mod cli;
pub mod teacher_check;
