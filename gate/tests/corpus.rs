//! The committed fuzz corpora of the gate's targets, replayed with seeded variations on the
//! stable toolchain (see `edgetwin_testkit::corpus`).
#![allow(clippy::unwrap_used)]

#[path = "../../fuzz/props/gate_packet.rs"]
mod gate_packet;

#[path = "../../fuzz/props/gate_acl.rs"]
mod gate_acl;

#[test]
fn corpus_gate_packet_inspection_never_panics() {
    edgetwin_testkit::corpus::replay("gate_packet", 20_000, gate_packet::check);
}

#[test]
fn corpus_gate_acl_never_lets_a_role_subscribe_to_what_it_may_not_read() {
    edgetwin_testkit::corpus::replay("gate_acl", 20_000, gate_acl::check);
}
