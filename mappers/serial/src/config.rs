//! Line settings and property visitors taken from a [`ResolvedDevice`]'s `serial` sections. No
//! I/O: the driver opens what this describes.
//!
//! The port path is used as given, so stable `/dev/serial/by-id/...` symlinks work (a USB
//! adapter that comes back as another `/dev/ttyUSBn` after a reboot keeps its by-id name).

use std::fmt;
use std::time::Duration;

use edgetwin_contract::PropertyType;
use edgetwin_profile::protocol::{DataBits, Parity, SerialVisitor, StopBits};
use edgetwin_profile::{DeviceProperty, ProtocolConfig, ResolvedDevice};

/// Why a device's profile cannot be served by this mapper.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ConfigError {
    /// The device has no `serial` protocol section.
    #[error("device {0} has no serial protocol section")]
    NotSerial(String),
    /// A property cannot be served: no serial visitor, or not in the model.
    #[error(transparent)]
    Visitor(#[from] edgetwin_profile::VisitorError),
}

/// Settings of one serial line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LineSettings {
    /// The serial device path, opened as is (symlinks such as `/dev/serial/by-id/...` work).
    pub path: String,
    /// Baud rate.
    pub baud_rate: u32,
    /// Data bits.
    pub data_bits: DataBits,
    /// Parity.
    pub parity: Parity,
    /// Stop bits.
    pub stop_bits: StopBits,
    /// What ends a line the device sends (requests and write templates carry their own).
    pub line_ending: String,
    /// How long to wait for a reply line (and for a write to go out).
    pub timeout: Duration,
}

impl fmt::Display for LineSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let p = match self.parity {
            Parity::None => 'N',
            Parity::Even => 'E',
            Parity::Odd => 'O',
        };
        write!(
            f,
            "{} ({} baud {}{p}{})",
            self.path, self.baud_rate, self.data_bits, self.stop_bits
        )
    }
}

/// The line settings of `device`.
pub fn settings(device: &ResolvedDevice) -> Result<LineSettings, ConfigError> {
    let ProtocolConfig::Serial(s) = &device.device.spec.protocol else {
        return Err(ConfigError::NotSerial(device.id().as_str().to_string()));
    };
    Ok(LineSettings {
        path: s.port.clone(),
        baud_rate: s.baud_rate,
        data_bits: s.data_bits,
        parity: s.parity,
        stop_bits: s.stop_bits,
        line_ending: s.line_ending.clone(),
        timeout: s.timeout.as_std(),
    })
}

/// The serial visitor of a property and the property's model type (the one accessor of
/// `edgetwin_profile`, [`ResolvedDevice::visitor`]).
pub fn property<'a>(
    device: &ResolvedDevice,
    prop: &'a DeviceProperty,
) -> Result<(&'a SerialVisitor, PropertyType), ConfigError> {
    device
        .visitor::<SerialVisitor>(prop)
        .map_err(ConfigError::from)
}

/// Whether the property's value comes only from lines the device sends on its own (no
/// `request`; a property with both is polled with its request).
pub fn is_unsolicited(v: &SerialVisitor) -> bool {
    v.unsolicited && v.request.is_none()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn example() -> ResolvedDevice {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../../examples/profiles");
        let yaml = std::fs::read_to_string(format!("{dir}/serial-sensor.yaml")).unwrap();
        let tmp = tempfile::tempdir().unwrap();
        std::fs::write(tmp.path().join("p.yaml"), yaml).unwrap();
        let (set, errors) = edgetwin_profile::load_dir(tmp.path());
        assert!(errors.is_empty(), "{errors:?}");
        let d = set.resolved().next().unwrap();
        d
    }

    #[test]
    fn config_example_profile_gives_by_id_path_line_settings_and_timeout() {
        let d = example();
        let s = settings(&d).unwrap();
        assert!(s.path.starts_with("/dev/serial/by-id/"), "{}", s.path);
        assert_eq!(s.baud_rate, 9600);
        assert_eq!(s.line_ending, "\r\n");
        assert_eq!(s.timeout, Duration::from_millis(500));
        assert!(s.to_string().ends_with("(9600 baud 8N1)"), "{s}");
    }

    #[test]
    fn config_example_profile_has_polled_and_unsolicited_properties() {
        let d = example();
        let kinds: Vec<(String, bool, PropertyType)> = d
            .device
            .spec
            .properties
            .iter()
            .map(|p| {
                let (v, ty) = property(&d, p).unwrap();
                (p.name.as_str().to_string(), is_unsolicited(v), ty)
            })
            .collect();
        assert!(kinds.contains(&("co2".into(), false, PropertyType::Int)));
        assert!(kinds.contains(&("alarm".into(), true, PropertyType::Boolean)));
    }
}
