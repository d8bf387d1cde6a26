//! JSON Schemas of the profile documents and of [`crate::ResolvedDevice`], generated from the
//! Rust types (draft-07, which yaml-language-server and most editors understand). The committed
//! copies live in `schemas/`; `cargo run -p edgetwin-profile --bin edgetwin-schemas -- schemas/`
//! refreshes them and the `schemas_are_fresh` test fails when they are stale.

use schemars::generate::SchemaSettings;
use schemars::JsonSchema;
use serde_json::{json, Value};

use crate::{Device, DeviceModel, ResolvedDevice};

fn settings() -> SchemaSettings {
    SchemaSettings::draft07().for_deserialize()
}

fn root_for<T: JsonSchema>() -> Value {
    settings()
        .into_generator()
        .into_root_schema_for::<T>()
        .to_value()
}

/// Schema of a `kind: DeviceModel` document.
pub fn device_model_schema() -> Value {
    root_for::<DeviceModel>()
}

/// Schema of a `kind: Device` document.
pub fn device_schema() -> Value {
    root_for::<Device>()
}

/// Schema of the retained payload on `mappers/{protocol}/devices/{device}`.
pub fn resolved_device_schema() -> Value {
    root_for::<ResolvedDevice>()
}

/// Schema of any profile document (one of DeviceModel and Device), for editors.
pub fn profile_schema() -> Value {
    let mut generator = settings().into_generator();
    let model = generator.subschema_for::<DeviceModel>().to_value();
    let device = generator.subschema_for::<Device>().to_value();
    let definitions = generator.take_definitions(true);
    json!({
        "$schema": "http://json-schema.org/draft-07/schema#",
        "title": "edgetwin profile document",
        "description": "One YAML document of an edgetwin profile file: a DeviceModel or a Device (apiVersion edgetwin/v1).",
        "oneOf": [model, device],
        "definitions": definitions,
    })
}

/// Every committed schema file: (file name in `schemas/`, pretty JSON with a final newline).
pub fn schema_files() -> Vec<(&'static str, String)> {
    [
        ("device-model.schema.json", device_model_schema()),
        ("device.schema.json", device_schema()),
        ("resolved-device.schema.json", resolved_device_schema()),
        ("profile.schema.json", profile_schema()),
    ]
    .into_iter()
    .map(|(name, value)| {
        let text = serde_json::to_string_pretty(&value).unwrap_or_default();
        (name, text + "\n")
    })
    .collect()
}
