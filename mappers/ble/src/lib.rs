//! The edgetwin BLE mapper as a library: the pure [`codec`] (GATT value decoding and encoding,
//! UUIDs, standard characteristics), [`config`] (the peripheral and characteristics from a
//! resolved device), the [`transport`] trait (what the driver needs from a Bluetooth stack),
//! [`btle`] (that trait on btleplug) and [`driver`] (the SDK `Driver` over any transport). The
//! binary in `main.rs` only runs the SDK runtime with the btleplug transport.

pub mod btle;
pub mod codec;
pub mod config;
pub mod driver;
pub mod transport;

pub use btle::BtleplugTransport;
pub use driver::{BleConn, BleDriver};
