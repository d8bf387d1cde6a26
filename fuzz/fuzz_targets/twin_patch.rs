//! Arbitrary bytes as a desired and a reported patch against a twin of a small model: never
//! panics, and a rejected patch leaves the twin exactly as it was.
#![no_main]

#[path = "../props/twin_patch.rs"]
mod props;

libfuzzer_sys::fuzz_target!(|data: &[u8]| props::check(data));
