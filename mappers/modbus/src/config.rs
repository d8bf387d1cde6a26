//! Connection settings and property addressing taken from a [`ResolvedDevice`]'s `modbus`
//! sections. No I/O: the driver opens what this describes.
//!
//! RTU serial paths are used as given, so stable `/dev/serial/by-id/...` symlinks work (a USB
//! adapter that comes back under another `/dev/ttyUSBn` after a reboot keeps its by-id name).

use std::fmt;
use std::time::Duration;

use edgetwin_contract::PropertyType;
use edgetwin_profile::protocol::{CommunicateMode, DataBits, ModbusVisitor, Parity, StopBits};
use edgetwin_profile::{DeviceProperty, ProtocolConfig, ResolvedDevice};

/// Why a device's profile cannot be served by this mapper.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ConfigError {
    /// The device has no `modbus` protocol section.
    #[error("device {0} has no modbus protocol section")]
    NotModbus(String),
    /// A required field is missing (validation normally prevents this).
    #[error("device {device}: {what}")]
    Missing {
        /// The device id.
        device: String,
        /// What is missing.
        what: &'static str,
    },
    /// A property cannot be served: no modbus visitor, or not in the model.
    #[error(transparent)]
    Visitor(#[from] edgetwin_profile::VisitorError),
    /// Two devices on one serial line ask for different line settings.
    #[error("serial line {path} is already open as {open}; this device wants {wanted}")]
    LineSettings {
        /// The serial path.
        path: String,
        /// Settings the line is open with.
        open: String,
        /// Settings this device asks for.
        wanted: String,
    },
}

/// Serial line settings of an RTU device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SerialSettings {
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
}

impl fmt::Display for SerialSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let p = match self.parity {
            Parity::None => 'N',
            Parity::Even => 'E',
            Parity::Odd => 'O',
        };
        write!(
            f,
            "{} baud {}{p}{}",
            self.baud_rate, self.data_bits, self.stop_bits
        )
    }
}

/// Where the device is reached.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    /// Modbus TCP: host (IP address or name) and port.
    Tcp {
        /// IP address or host name.
        host: String,
        /// TCP port.
        port: u16,
    },
    /// Modbus RTU on a serial line, possibly shared with other devices.
    Rtu(SerialSettings),
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Endpoint::Tcp { host, port } => write!(f, "tcp://{host}:{port}"),
            Endpoint::Rtu(s) => write!(f, "rtu:{} ({s})", s.path),
        }
    }
}

/// Everything needed to talk to one device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnSettings {
    /// TCP address or serial line.
    pub endpoint: Endpoint,
    /// Slave (unit) id, set on every request.
    pub slave: u8,
    /// Per-request timeout (also bounds TCP connect).
    pub timeout: Duration,
}

/// The connection settings of `device`.
pub fn settings(device: &ResolvedDevice) -> Result<ConnSettings, ConfigError> {
    let id = device.id().as_str().to_string();
    let ProtocolConfig::Modbus(m) = &device.device.spec.protocol else {
        return Err(ConfigError::NotModbus(id));
    };
    let endpoint = match m.communicate_mode {
        CommunicateMode::Tcp => Endpoint::Tcp {
            host: m.ip.clone().ok_or(ConfigError::Missing {
                device: id.clone(),
                what: "communicateMode TCP needs `ip`",
            })?,
            port: m.port,
        },
        CommunicateMode::Rtu => Endpoint::Rtu(SerialSettings {
            path: m.serial_name.clone().ok_or(ConfigError::Missing {
                device: id.clone(),
                what: "communicateMode RTU needs `serialName`",
            })?,
            baud_rate: m.baud_rate,
            data_bits: m.data_bits,
            parity: m.parity,
            stop_bits: m.stop_bits,
        }),
    };
    Ok(ConnSettings {
        endpoint,
        slave: m.slave_id,
        timeout: m.timeout.as_std(),
    })
}

/// The modbus visitor of a property and the property's model type (the one accessor of
/// `edgetwin_profile`, [`ResolvedDevice::visitor`]).
pub fn property<'a>(
    device: &ResolvedDevice,
    prop: &'a DeviceProperty,
) -> Result<(&'a ModbusVisitor, PropertyType), ConfigError> {
    device
        .visitor::<ModbusVisitor>(prop)
        .map_err(ConfigError::from)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn resolved(yaml_device: &str) -> ResolvedDevice {
        let yaml = format!(
            "apiVersion: edgetwin/v1\nkind: DeviceModel\nmetadata: {{name: m}}\nspec:\n  protocol: modbus\n  properties:\n    - {{name: t, type: float, accessMode: ReadOnly}}\n---\n{yaml_device}"
        );
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("d.yaml"), yaml).unwrap();
        let (set, errors) = edgetwin_profile::load_dir(dir.path());
        assert!(errors.is_empty(), "{errors:?}");
        let d = set.resolved().next().unwrap();
        d
    }

    #[test]
    fn config_tcp_device_gives_host_port_slave_and_timeout() {
        let d = resolved(
            "apiVersion: edgetwin/v1\nkind: Device\nmetadata: {name: d1}\nspec:\n  deviceModelRef: m\n  protocol:\n    modbus: {communicateMode: TCP, ip: 127.0.0.1, port: 1502, slaveID: 3, timeout: 250ms}\n  properties:\n    - name: t\n      visitors:\n        modbus: {register: InputRegister, offset: 4, dataType: float32}\n",
        );
        let s = settings(&d).unwrap();
        assert_eq!(
            s.endpoint,
            Endpoint::Tcp {
                host: "127.0.0.1".into(),
                port: 1502
            }
        );
        assert_eq!(s.slave, 3);
        assert_eq!(s.timeout, Duration::from_millis(250));
        let (v, ty) = property(&d, &d.device.spec.properties[0]).unwrap();
        assert_eq!((v.offset, v.limit, ty), (4, Some(2), PropertyType::Float));
    }

    #[test]
    fn config_rtu_device_keeps_by_id_path_and_line_settings() {
        let d = resolved(
            "apiVersion: edgetwin/v1\nkind: Device\nmetadata: {name: d2}\nspec:\n  deviceModelRef: m\n  protocol:\n    modbus: {communicateMode: RTU, serialName: /dev/serial/by-id/usb-FTDI-if00-port0, baudRate: 19200, parity: even, stopBits: 2, dataBits: 7, slaveID: 9}\n",
        );
        let s = settings(&d).unwrap();
        let Endpoint::Rtu(line) = &s.endpoint else {
            panic!("not RTU: {s:?}")
        };
        assert_eq!(line.path, "/dev/serial/by-id/usb-FTDI-if00-port0");
        assert_eq!(line.to_string(), "19200 baud 7E2");
        assert_eq!(s.slave, 9);
        assert_eq!(s.timeout, Duration::from_secs(1));
    }
}
