//! Arbitrary topics and filters through the pure ACL: never panics, and a filter allowed to a
//! non-mapper role never matches a topic that role may not receive.
#![no_main]

#[path = "../props/gate_acl.rs"]
mod props;

libfuzzer_sys::fuzz_target!(|data: &[u8]| props::check(data));
