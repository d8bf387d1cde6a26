//! Benchmark support for edgetwin: an MQTT load generator on rumqttc ([`loadgen`]), helpers that
//! start and stop the brokers under test ([`procs`]), latency statistics ([`stats`]) and a plain
//! text table printer ([`table`]).
//!
//! The same generator drives every broker, so the figures are comparable side by side. Every server
//! binds 127.0.0.1 on a free port and every loop is bounded in count and time.

pub mod loadgen;
pub mod procs;
pub mod stats;
pub mod table;
