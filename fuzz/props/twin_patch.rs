//! Arbitrary bytes as a desired and a reported patch against a twin of a small model: never
//! panics, and a rejected patch leaves the twin exactly as it was.
//!
//! Shared by the cargo-fuzz target of the same name and the stable replay of the committed
//! corpus (`fuzz/corpus/twin_patch/`) in the test command.

use std::collections::BTreeMap;

use edgetwin_contract::{AccessMode, DeviceId, PropertyType, Source};
use edgetwin_devicetwin::core::{ModelSpec, Patch, PropertySpec, Twin};

fn model() -> ModelSpec {
    let mut properties = BTreeMap::new();
    for (name, ty, access, min, max) in [
        (
            "setpoint",
            PropertyType::Float,
            AccessMode::ReadWrite,
            Some(5.0),
            Some(35.0),
        ),
        (
            "count",
            PropertyType::Int,
            AccessMode::ReadWrite,
            None,
            None,
        ),
        (
            "mode",
            PropertyType::String,
            AccessMode::ReadWrite,
            None,
            None,
        ),
        (
            "relay",
            PropertyType::Boolean,
            AccessMode::ReadWrite,
            None,
            None,
        ),
        (
            "cfg",
            PropertyType::Object,
            AccessMode::ReadWrite,
            None,
            None,
        ),
        (
            "temperature",
            PropertyType::Float,
            AccessMode::ReadOnly,
            None,
            None,
        ),
    ] {
        properties.insert(
            name.to_string(),
            PropertySpec {
                ty,
                access,
                minimum: min,
                maximum: max,
                per_entry: false,
            },
        );
    }
    ModelSpec {
        name: "m".into(),
        properties,
    }
}

/// The property, for one input: panics (an assertion) when it does not hold.
pub fn check(data: &[u8]) {
    let Ok(device) = DeviceId::new("d") else {
        return;
    };
    let spec = model();
    let mut twin = Twin::new(device, "m".into());
    let Ok(patch) = Patch::parse(data, 64) else {
        return;
    };
    for reported in [false, true] {
        let before = twin.clone();
        let result = if reported {
            twin.apply_reported(&spec, &patch, Source::Local, 1_000)
        } else {
            twin.apply_desired(&spec, &patch, Source::Local, 1_000)
        };
        if result.is_err() {
            assert_eq!(before, twin, "a rejected patch changed the twin");
        }
        let _ = serde_json::to_vec(&twin.to_doc());
        let _ = twin.delta();
    }
}
