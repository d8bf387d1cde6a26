//! The peripheral to find and each property's characteristic, taken from a [`ResolvedDevice`]'s
//! `ble` sections. No I/O.

use edgetwin_contract::PropertyType;
use edgetwin_profile::protocol::BleVisitor;
use edgetwin_profile::{DeviceProperty, ProtocolConfig, ResolvedDevice};

use crate::codec;
use crate::transport::{CharAddr, Target};

/// Why a device's profile cannot be served by this mapper.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ConfigError {
    /// The device has no `ble` protocol section.
    #[error("device {0} has no ble protocol section")]
    NotBle(String),
    /// Neither `macAddress` nor `name` is given (validation normally prevents this).
    #[error("device {0}: give macAddress or name")]
    NoTarget(String),
    /// A property cannot be served: no ble visitor, or not in the model.
    #[error(transparent)]
    Visitor(#[from] edgetwin_profile::VisitorError),
    /// A UUID of a property is not valid.
    #[error("property {prop}: {error}")]
    Uuid {
        /// The property.
        prop: String,
        /// What is wrong.
        error: codec::CodecError,
    },
}

/// The peripheral of `device`: its address (upper case) or advertised name.
pub fn target(device: &ResolvedDevice) -> Result<Target, ConfigError> {
    let id = device.id().as_str().to_string();
    let ProtocolConfig::Ble(b) = &device.device.spec.protocol else {
        return Err(ConfigError::NotBle(id));
    };
    match (&b.mac_address, &b.name) {
        (Some(mac), _) => Ok(Target::Address(mac.to_ascii_uppercase())),
        (None, Some(name)) => Ok(Target::Name(name.clone())),
        (None, None) => Err(ConfigError::NoTarget(id)),
    }
}

/// The BLE visitor of a property, the type of the model property it feeds, and its
/// characteristic.
pub fn property<'a>(
    device: &ResolvedDevice,
    prop: &'a DeviceProperty,
) -> Result<(&'a BleVisitor, PropertyType, CharAddr), ConfigError> {
    let name = prop.name.as_str().to_string();
    let (v, ty) = device.visitor::<BleVisitor>(prop)?;
    let uuid = |s: &str| {
        codec::parse_uuid(s).map_err(|error| ConfigError::Uuid {
            prop: name.clone(),
            error,
        })
    };
    let ch = CharAddr {
        service: v.service_uuid.as_deref().map(uuid).transpose()?,
        characteristic: uuid(&v.characteristic_uuid)?,
    };
    Ok((v, ty, ch))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn example() -> ResolvedDevice {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../../examples/profiles");
        let yaml = std::fs::read_to_string(format!("{dir}/ble-sensor.yaml")).unwrap();
        let tmp = tempfile::tempdir().unwrap();
        std::fs::write(tmp.path().join("p.yaml"), yaml).unwrap();
        let (set, errors) = edgetwin_profile::load_dir(tmp.path());
        assert!(errors.is_empty(), "{errors:?}");
        let d = set.resolved().next().unwrap();
        d
    }

    #[test]
    fn config_example_profile_finds_the_sensor_by_address() {
        assert_eq!(
            target(&example()).unwrap(),
            Target::Address("C4:7C:8D:6A:12:3F".into())
        );
    }

    #[test]
    fn config_example_profile_characteristics_expand_to_full_uuids() {
        let d = example();
        let p = d.device.property("temperature").unwrap();
        let (v, ty, ch) = property(&d, p).unwrap();
        assert!(v.notify);
        assert_eq!(ty, PropertyType::Float);
        assert_eq!(
            ch.characteristic.to_string(),
            "00002a6e-0000-1000-8000-00805f9b34fb"
        );
        assert_eq!(
            ch.service.unwrap().to_string(),
            "0000181a-0000-1000-8000-00805f9b34fb"
        );
        for (name, v) in d.device.spec.properties.iter().filter_map(|p| {
            property(&d, p).ok().map(|(v, _, ch)| {
                (
                    p.name.as_str(),
                    codec::standard_mismatch(ch.characteristic, v),
                )
            })
        }) {
            assert_eq!(
                v, None,
                "{name} decodes its standard characteristic the standard way"
            );
        }
    }
}
