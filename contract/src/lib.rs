//! The edgetwin wire contract: validated ids, topic names and JSON payloads of the local topic API
//! (docs/contract.md §2). Every crate that speaks MQTT to a node builds and parses topics and
//! payloads through this crate only, so the contract lives in one place.

pub mod ids;
pub mod payload;
pub mod topic;
pub mod value;

pub use ids::{DeviceId, IdError, NodeId, PropertyName, ProtocolName};
pub use payload::*;
pub use topic::Topic;

/// Milliseconds since the Unix epoch (0 if the clock is before 1970): the one wall clock of the
/// project, read at the I/O edges; pure code takes time as a parameter.
pub fn now_ms() -> TimestampMs {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// Reads a password file the way every edgetwin client does (the bridge's `password_file`, the
/// CLI's and the mappers' `--password-file`): the whole file, a trailing line break dropped, so
/// `echo secret > file` works and a password never appears on a command line.
pub fn read_password_file(path: &std::path::Path) -> std::io::Result<String> {
    Ok(std::fs::read_to_string(path)?
        .trim_end_matches(['\r', '\n'])
        .to_string())
}
