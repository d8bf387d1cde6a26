//! `edgetwin-mapper-serial`: the line-oriented serial mapper process: the SDK runtime with
//! [`SerialDriver`](edgetwin_mapper_serial::SerialDriver).

fn main() -> std::process::ExitCode {
    edgetwin_mapper_sdk::main_with(edgetwin_mapper_serial::SerialDriver::new())
}
