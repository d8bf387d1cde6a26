//! edgetwin serial line mapper (being written).

fn main() {}
