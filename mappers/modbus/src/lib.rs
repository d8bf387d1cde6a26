//! The edgetwin Modbus TCP/RTU mapper as a library: the pure [`codec`] (values and read
//! planning), [`config`] (connection settings from a resolved device) and [`driver`] (the SDK
//! `Driver` over tokio-modbus). The binary in `main.rs` only runs the SDK runtime with it.

pub mod codec;
pub mod config;
pub mod discover;
pub mod driver;

pub use driver::{ModbusConn, ModbusDriver};
