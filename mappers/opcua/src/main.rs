//! edgetwin OPC UA mapper (being written).

fn main() {}
