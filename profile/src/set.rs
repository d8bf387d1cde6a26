//! The result of loading: documents, the validated set, and the resolved device a mapper gets.

use std::collections::BTreeMap;
use std::sync::Arc;

use edgetwin_contract::{DeviceId, PropertyType, ProtocolName};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::{Device, DeviceModel, DeviceProperty, PropertyVisitor};

/// One YAML document of a profile file.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(untagged)]
pub enum Document {
    /// `kind: DeviceModel`.
    DeviceModel(DeviceModel),
    /// `kind: Device`, shared with the [`ProfileSet`] it is validated into.
    Device(Arc<Device>),
}

impl Document {
    /// `metadata.name` of the document.
    pub fn name(&self) -> &str {
        match self {
            Document::DeviceModel(m) => m.name(),
            Document::Device(d) => d.id().as_str(),
        }
    }
}

/// Validated models and devices; every device's model is in `models`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ProfileSet {
    /// Models by name.
    pub models: BTreeMap<String, DeviceModel>,
    /// Devices by id: the parsed documents themselves (defaults written out), shared.
    pub devices: BTreeMap<DeviceId, Arc<Device>>,
}

impl ProfileSet {
    /// The device `id` together with its model, if both are in the set.
    pub fn resolve(&self, id: &DeviceId) -> Option<ResolvedDevice> {
        let device = self.devices.get(id)?;
        let model = self.models.get(device.model_ref())?;
        Some(ResolvedDevice {
            device: Device::clone(device),
            model: model.clone(),
        })
    }

    /// Every device of the set with its model, in device id order.
    pub fn resolved(&self) -> impl Iterator<Item = ResolvedDevice> + '_ {
        self.devices.keys().filter_map(|id| self.resolve(id))
    }
}

/// A device with its model: the retained JSON payload on `mappers/{protocol}/devices/{device}`,
/// everything a mapper needs to serve the device. Defaults are written out explicitly.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
#[schemars(title = "ResolvedDevice")]
pub struct ResolvedDevice {
    /// The device document.
    pub device: Device,
    /// The model it refers to.
    pub model: DeviceModel,
}

/// A protocol's visitor type: how [`ResolvedDevice::visitor`] takes it out of a
/// [`PropertyVisitor`].
pub trait ProtocolVisitor: Sized {
    /// The protocol's name.
    const PROTOCOL: &'static str;
    /// This protocol's visitor, if `v` is one.
    fn of(v: &PropertyVisitor) -> Option<&Self>;
}

macro_rules! protocol_visitor {
    ($ty:ty, $variant:ident, $name:literal) => {
        impl ProtocolVisitor for $ty {
            const PROTOCOL: &'static str = $name;
            fn of(v: &PropertyVisitor) -> Option<&Self> {
                match v {
                    PropertyVisitor::$variant(x) => Some(x),
                    _ => None,
                }
            }
        }
    };
}

protocol_visitor!(crate::protocol::ModbusVisitor, Modbus, "modbus");
protocol_visitor!(crate::protocol::OpcuaVisitor, Opcua, "opcua");
protocol_visitor!(crate::protocol::BleVisitor, Ble, "ble");
protocol_visitor!(crate::protocol::SerialVisitor, Serial, "serial");

/// Why a mapper cannot serve a property of its device.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VisitorError {
    /// The property has no visitor of the mapper's protocol.
    #[error("property {property} has no {protocol} visitor")]
    NoVisitor {
        /// The property.
        property: String,
        /// The mapper's protocol.
        protocol: &'static str,
    },
    /// The property is not in the device's model.
    #[error("property {0} is not in the device's model")]
    NotInModel(String),
}

impl ResolvedDevice {
    /// The visitor of protocol `V` of one of this device's properties, with the property's type
    /// in the model: what a mapper needs to read or write it.
    pub fn visitor<'a, V: ProtocolVisitor>(
        &self,
        prop: &'a DeviceProperty,
    ) -> Result<(&'a V, PropertyType), VisitorError> {
        let v = V::of(&prop.visitors).ok_or_else(|| VisitorError::NoVisitor {
            property: prop.name.as_str().to_string(),
            protocol: V::PROTOCOL,
        })?;
        let ty = self
            .model
            .property(prop.name.as_str())
            .map(|p| p.ty)
            .ok_or_else(|| VisitorError::NotInModel(prop.name.as_str().to_string()))?;
        Ok((v, ty))
    }
}

/// The JSON of a [`ResolvedDevice`] from borrowed parts, so a node with thousands of devices of
/// one model need not copy the model per device to publish their assignments.
pub fn resolved_json(device: &Device, model: &DeviceModel) -> serde_json::Result<Vec<u8>> {
    #[derive(Serialize)]
    struct Borrowed<'a> {
        device: &'a Device,
        model: &'a DeviceModel,
    }
    serde_json::to_vec(&Borrowed { device, model })
}

/// [`resolved_json`] with the model's JSON ([`model_json`]) encoded once and spliced in: the
/// same bytes, for a node that publishes thousands of assignments of one model at start.
pub fn resolved_json_with(device: &Device, model_json: &[u8]) -> serde_json::Result<Vec<u8>> {
    let mut out = Vec::with_capacity(model_json.len() + 512);
    out.extend_from_slice(b"{\"device\":");
    serde_json::to_writer(&mut out, device)?;
    out.extend_from_slice(b",\"model\":");
    out.extend_from_slice(model_json);
    out.push(b'}');
    Ok(out)
}

/// The JSON of a model, for [`resolved_json_with`].
pub fn model_json(model: &DeviceModel) -> serde_json::Result<Vec<u8>> {
    serde_json::to_vec(model)
}

impl ResolvedDevice {
    /// The protocol whose mapper serves the device (the model's `protocol`).
    pub fn protocol(&self) -> ProtocolName {
        self.model.spec.protocol.clone()
    }

    /// The device id.
    pub fn id(&self) -> &DeviceId {
        self.device.id()
    }
}

#[cfg(test)]
mod resolved_json_tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn resolved_json_is_the_json_of_the_owned_resolved_device() {
        let yaml = "apiVersion: edgetwin/v1\nkind: DeviceModel\nmetadata: {name: m}\nspec:\n  protocol: modbus\n  properties:\n    - {name: v, type: float, accessMode: ReadWrite, minimum: 0}\n---\napiVersion: edgetwin/v1\nkind: Device\nmetadata: {name: d}\nspec:\n  deviceModelRef: m\n  protocol:\n    modbus: {communicateMode: TCP, ip: 127.0.0.1, port: 502, slaveID: 1}\n  properties:\n    - name: v\n      visitors:\n        modbus: {register: HoldingRegister, offset: 0, limit: 2, dataType: float32}\n";
        let docs = crate::parse_str("t.yaml", yaml).unwrap();
        let set = crate::validate(&[("t.yaml".to_string(), docs)], &Default::default()).unwrap();
        let (_, device) = set.devices.iter().next().unwrap();
        let model = &set.models["m"];
        let owned = ResolvedDevice {
            device: Device::clone(device),
            model: model.clone(),
        };
        assert_eq!(
            resolved_json(device, model).unwrap(),
            serde_json::to_vec(&owned).unwrap()
        );
    }

    #[test]
    fn the_spliced_assignment_is_byte_for_byte_the_encoded_one() {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/profiles");
        let mut seen = 0;
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            let text = std::fs::read_to_string(&path).unwrap();
            let docs = crate::parse_str("x.yaml", &text).unwrap();
            let set =
                crate::validate(&[("x.yaml".to_string(), docs)], &Default::default()).unwrap();
            for device in set.devices.values() {
                let model = &set.models[device.model_ref()];
                let spliced = resolved_json_with(device, &model_json(model).unwrap()).unwrap();
                assert_eq!(
                    spliced,
                    resolved_json(device, model).unwrap(),
                    "{}",
                    path.display()
                );
                seen += 1;
            }
        }
        assert!(seen > 0);
    }
}
