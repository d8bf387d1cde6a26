//! The edgetwin wire contract: validated ids, topic names and JSON payloads of the local topic API
//! (docs/contract.md §2). Every crate that speaks MQTT to a node builds and parses topics and
//! payloads through this crate only, so the contract lives in one place.

pub mod ids;
pub mod payload;
pub mod topic;

pub use ids::{DeviceId, IdError, NodeId, PropertyName, ProtocolName};
pub use payload::*;
pub use topic::Topic;
