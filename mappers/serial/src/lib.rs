//! The edgetwin serial line mapper as a library: the pure [`codec`] (request/write templates,
//! line splitting, value extraction and conversion), [`config`] (line settings and visitors from
//! a resolved device) and [`driver`] (the SDK `Driver` over tokio-serial). The binary in
//! `main.rs` only runs the SDK runtime with it.

pub mod codec;
pub mod config;
pub mod driver;

pub use driver::{SerialConn, SerialDriver};
