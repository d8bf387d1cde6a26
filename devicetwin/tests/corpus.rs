//! The committed fuzz corpus of `twin_patch`, replayed with seeded variations on the stable
//! toolchain (see `edgetwin_testkit::corpus`).
#![allow(clippy::unwrap_used)]

#[path = "../../fuzz/props/twin_patch.rs"]
mod twin_patch;

#[test]
fn corpus_twin_patch_never_panics_and_a_rejected_patch_changes_nothing() {
    edgetwin_testkit::corpus::replay("twin_patch", 5_000, twin_patch::check);
}
