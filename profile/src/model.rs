//! `kind: DeviceModel`: what a kind of device offers, as properties with a type, an access mode
//! and optional bounds (KubeEdge `DeviceModel` v1beta1, EdgeX `minimum`/`maximum`/`defaultValue`).

use std::collections::BTreeMap;

use edgetwin_contract::{AccessMode, PropertyName, PropertyType, ProtocolName};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::source::SourceDoc;

/// The `apiVersion` of every profile document.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum ApiVersion {
    /// `edgetwin/v1`.
    #[default]
    #[serde(rename = "edgetwin/v1")]
    V1,
}

/// The `kind` of a device model document.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum DeviceModelKind {
    /// `DeviceModel`.
    #[default]
    DeviceModel,
}

/// Name and labels of a device model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ModelMetadata {
    /// The model name, referenced by devices' `deviceModelRef`; `[A-Za-z0-9][A-Za-z0-9_.-]{0,127}`.
    #[schemars(regex(pattern = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$"))]
    pub name: String,
    /// Free-form labels.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
}

/// A device model document (`kind: DeviceModel`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[schemars(title = "DeviceModel")]
pub struct DeviceModel {
    /// Always `edgetwin/v1`.
    pub api_version: ApiVersion,
    /// Always `DeviceModel`.
    pub kind: DeviceModelKind,
    /// Name and labels.
    pub metadata: ModelMetadata,
    /// Protocol and properties.
    pub spec: DeviceModelSpec,
    #[serde(skip)]
    #[schemars(skip)]
    pub(crate) source: SourceDoc,
}

/// What a device model declares.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DeviceModelSpec {
    /// The protocol its devices speak (`modbus`, `opcua`, `ble`, `serial`); devices of this model
    /// must have this protocol section.
    pub protocol: ProtocolName,
    /// What the model is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// The properties, names unique.
    pub properties: Vec<ModelProperty>,
}

/// One property of a device model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ModelProperty {
    /// Property name, unique in the model.
    pub name: PropertyName,
    /// Value type: boolean, int, float, string or object.
    #[serde(rename = "type")]
    pub ty: PropertyType,
    /// `ReadOnly` (reported only) or `ReadWrite` (desired values are written to the device).
    pub access_mode: AccessMode,
    /// Unit of the value, e.g. `V`, `°C`, `%`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unit: Option<String>,
    /// What the property means.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// Inclusive lower bound, checked on desired writes (int and float only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub minimum: Option<f64>,
    /// Inclusive upper bound, checked on desired writes (int and float only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub maximum: Option<f64>,
    /// Initial desired value of a new twin, written at `ts` 0 so any real write wins; the device's
    /// mapper writes it to the hardware when the device is first registered, so leave it out on
    /// actuators that must not move on their own. Must have the property's type and lie within
    /// bounds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default: Option<serde_json::Value>,
}

impl ModelProperty {
    /// A property with no unit, description, bounds or default.
    pub fn new(name: PropertyName, ty: PropertyType, access_mode: AccessMode) -> ModelProperty {
        ModelProperty {
            name,
            ty,
            access_mode,
            unit: None,
            description: None,
            minimum: None,
            maximum: None,
            default: None,
        }
    }

    /// The value type.
    pub fn property_type(&self) -> PropertyType {
        self.ty
    }

    /// Who may write it.
    pub fn access_mode(&self) -> AccessMode {
        self.access_mode
    }

    /// Whether desired writes are allowed.
    pub fn is_writable(&self) -> bool {
        self.access_mode == AccessMode::ReadWrite
    }

    /// Inclusive lower bound, if any.
    pub fn minimum(&self) -> Option<f64> {
        self.minimum
    }

    /// Inclusive upper bound, if any.
    pub fn maximum(&self) -> Option<f64> {
        self.maximum
    }
}

impl DeviceModel {
    /// A model document named `name` with `spec`.
    pub fn new(name: impl Into<String>, spec: DeviceModelSpec) -> DeviceModel {
        DeviceModel {
            api_version: ApiVersion::V1,
            kind: DeviceModelKind::DeviceModel,
            metadata: ModelMetadata {
                name: name.into(),
                labels: BTreeMap::new(),
            },
            spec,
            source: SourceDoc::default(),
        }
    }

    /// The model name (`metadata.name`).
    pub fn name(&self) -> &str {
        &self.metadata.name
    }

    /// The protocol its devices speak.
    pub fn protocol(&self) -> &ProtocolName {
        &self.spec.protocol
    }

    /// The property called `name`, if the model has one.
    pub fn property(&self, name: &str) -> Option<&ModelProperty> {
        self.spec
            .properties
            .iter()
            .find(|p| p.name.as_str() == name)
    }

    /// All properties, in declaration order.
    pub fn properties(&self) -> &[ModelProperty] {
        &self.spec.properties
    }

    pub(crate) fn source(&self) -> &SourceDoc {
        &self.source
    }

    pub(crate) fn set_source(&mut self, source: SourceDoc) {
        self.source = source;
    }
}
