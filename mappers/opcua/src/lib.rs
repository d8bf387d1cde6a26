//! The edgetwin OPC UA mapper as a library: the pure [`codec`] (node ids, variant <-> JSON),
//! [`config`] (connection settings from a resolved device) and [`driver`] (the SDK `Driver` over
//! async-opcua's client, with subscriptions feeding the SDK's poll cycle). The binary in
//! `main.rs` only runs the SDK runtime with it.

pub mod codec;
pub mod config;
pub mod discover;
pub mod driver;

pub use driver::{ClientOptions, OpcuaConn, OpcuaDriver};
