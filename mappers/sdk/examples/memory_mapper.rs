//! A complete mapper over simulated in-memory devices (the SDK's test double): what a mapper's
//! `main.rs` looks like. Run: `edgetwin-mapper-memory --broker 127.0.0.1:1883`.

#[path = "../tests/common/memory.rs"]
mod memory;

fn main() -> std::process::ExitCode {
    edgetwin_mapper_sdk::main_with(memory::MemoryDriver::default())
}
