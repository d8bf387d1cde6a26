//! Device profiles: the `DeviceModel` and `Device` YAML documents of docs/contract.md §4, their
//! protocol sections (Modbus, OPC UA, BLE, serial), the loader that reports every error with file,
//! line and field path, cross-document validation, [`ResolvedDevice`] (what a mapper receives on
//! `mappers/{protocol}/devices/{device}`) and the JSON Schemas committed in `schemas/`.
//!
//! Field names follow KubeEdge's `devices.kubeedge.io/v1beta1` where it has one and EdgeX's device
//! profiles otherwise. Loading is two steps: [`parse_str`] turns one file into documents (syntax
//! and types), [`validate`] checks a set of files together (references, protocol settings against
//! the model). [`load_dir`] does both for a folder and keeps every file that has no error.
//!
//! ```
//! let text = "apiVersion: edgetwin/v1\nkind: DeviceModel\nmetadata: {name: m}\nspec:\n  protocol: modbus\n  properties: [{name: v, type: float, accessMode: ReadOnly}]\n";
//! let docs = edgetwin_profile::parse_str("m.yaml", text).expect("valid");
//! let set = edgetwin_profile::validate(&[("m.yaml".into(), docs)], &Default::default()).expect("valid");
//! assert!(set.models["m"].property("v").is_some());
//! ```

pub mod cache;
mod check;
mod device;
mod duration;
mod error;
pub mod kubeedge;
mod loader;
mod model;
mod parse;
pub mod protocol;
pub mod schema;
mod set;
mod source;
mod validate;

pub use device::{
    Device, DeviceKind, DeviceMetadata, DeviceProperty, DeviceSpec, ReportOnChange,
    DEFAULT_COLLECT_CYCLE, DEFAULT_REPORT_CYCLE_FACTOR, STALE_AFTER_INTERVALS, STALE_SLACK,
};
pub use duration::{Duration, DurationError};
pub use error::ProfileError;
pub use loader::load_dir;
pub use model::{
    ApiVersion, DeviceModel, DeviceModelKind, DeviceModelSpec, ModelMetadata, ModelProperty,
};
pub use parse::parse_str;
pub use protocol::{OtherSection, PropertyVisitor, ProtocolConfig};
pub use set::{
    model_json, resolved_json, resolved_json_with, Document, ProfileSet, ProtocolVisitor,
    ResolvedDevice, VisitorError,
};
pub use validate::{validate, validate_refs};

/// The 1-based line of the field `path` (`bridge.up[1].filter`, as serde_path_to_error writes
/// it) in the first YAML document of `text`, or of its nearest parent that is there. The node's
/// config errors use it to name lines as the profile errors do.
pub fn yaml_line_of(text: &str, path: &str) -> Option<usize> {
    source::line_of(text, 0, path)
}

pub use source::{segments as field_path, Seg as FieldSeg};

/// Problems found by a section's own checks: (path relative to the section, message).
pub(crate) type Issues = Vec<(String, String)>;
