//! Arbitrary bytes through the gate's packet inspection, as a client of either version would
//! send them: CONNECT sniffing, framing, and every decoder the relay uses. Must never panic.
#![no_main]

#[path = "../props/gate_packet.rs"]
mod props;

libfuzzer_sys::fuzz_target!(|data: &[u8]| props::check(data));
