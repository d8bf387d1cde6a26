//! The committed fuzz corpus of `profile_loader`, replayed with seeded variations on the stable
//! toolchain (see `edgetwin_testkit::corpus`).
#![allow(clippy::unwrap_used)]

#[path = "../../fuzz/props/profile_loader.rs"]
mod profile_loader;

#[test]
fn corpus_profile_loader_never_panics_and_every_error_names_the_file() {
    edgetwin_testkit::corpus::replay("profile_loader", 500, profile_loader::check);
}
