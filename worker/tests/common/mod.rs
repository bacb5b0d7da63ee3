//! Where the real test data lives (fetched by scripts/fetch-data.sh).

use std::path::PathBuf;

pub fn data(name: &str) -> PathBuf {
    let dir = wsimil_common::data_dir();
    let p = dir.join(name);
    assert!(p.is_file(), "test data {} missing: run scripts/fetch-data.sh (or set WSIMIL_DATA)", p.display());
    p
}
