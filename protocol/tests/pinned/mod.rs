#![allow(clippy::unwrap_used)]

//! Files that pin what the crate produces, for clients in other languages:
//! a test fails when they differ, and `GPUCTL_BLESS=1` rewrites them after
//! a deliberate change.

use std::path::Path;

/// Checks `text` against the file at `relative` (from the crate's root),
/// or writes it there when `GPUCTL_BLESS` is set; `test` names the cargo
/// test target that rewrites it.
pub fn check_or_bless(relative: &str, text: &str, test: &str) {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(relative);
    if std::env::var_os("GPUCTL_BLESS").is_some() {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, text).unwrap();
        return;
    }
    let pinned = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        pinned == text,
        "{} differs from what the crate produces; after a deliberate change, run GPUCTL_BLESS=1 cargo test -p gpuctl-protocol --test {test}",
        path.display()
    );
}
