//! edgetwin BLE mapper (being written).

fn main() {}
