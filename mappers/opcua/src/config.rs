//! Connection settings and property addressing taken from a [`ResolvedDevice`]'s `opcua`
//! sections. No I/O: the driver opens what this describes (and reads `passwordFile` at connect
//! time, so a rotated password is picked up on the next reconnect).

use std::path::PathBuf;
use std::time::Duration;

use edgetwin_contract::PropertyType;
use edgetwin_profile::protocol::{OpcuaVisitor, SecurityMode, SecurityPolicy};
use edgetwin_profile::{DeviceProperty, ProtocolConfig, ResolvedDevice};

/// The collect cycle the SDK uses when a property has none.
pub const DEFAULT_COLLECT_CYCLE: Duration = Duration::from_secs(1);

/// Why a device's profile cannot be served by this mapper.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ConfigError {
    /// The device has no `opcua` protocol section.
    #[error("device {0} has no opcua protocol section")]
    NotOpcua(String),
    /// A property cannot be served: no opcua visitor, or not in the model.
    #[error(transparent)]
    Visitor(#[from] edgetwin_profile::VisitorError),
    /// The security settings do not go together (validation normally prevents this).
    #[error("device {device}: {what}")]
    Security {
        /// The device id.
        device: String,
        /// What is wrong.
        what: &'static str,
    },
}

/// How the client authenticates its user.
#[derive(Clone, PartialEq, Eq)]
pub enum Identity {
    /// No user (anonymous token).
    Anonymous,
    /// User name with an inline password.
    Password {
        /// The user name.
        user: String,
        /// The password.
        password: String,
    },
    /// User name with the password in a file on the node (read at every connect).
    PasswordFile {
        /// The user name.
        user: String,
        /// The file holding the password (trailing newline removed).
        path: PathBuf,
    },
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print a password.
        match self {
            Identity::Anonymous => f.write_str("Anonymous"),
            Identity::Password { user, .. } => write!(f, "Password({user:?}, ***)"),
            Identity::PasswordFile { user, path } => {
                write!(f, "PasswordFile({user:?}, {})", path.display())
            }
        }
    }
}

/// Everything needed to open a session to one device's server.
#[derive(Debug, Clone, PartialEq)]
pub struct ConnSettings {
    /// Endpoint URL (`opc.tcp://host:port/path`).
    pub url: String,
    /// Security policy URI name as async-opcua spells it (`None`, `Basic256Sha256`).
    pub policy: SecurityPolicy,
    /// Message security mode.
    pub mode: SecurityMode,
    /// User authentication.
    pub identity: Identity,
    /// Client certificate and private key (required for Sign / SignAndEncrypt).
    pub keypair: Option<(PathBuf, PathBuf)>,
    /// Bound on every request (and on connecting).
    pub timeout: Duration,
}

/// The connection settings of `device`.
pub fn settings(device: &ResolvedDevice) -> Result<ConnSettings, ConfigError> {
    let id = device.id().as_str().to_string();
    let ProtocolConfig::Opcua(o) = &device.device.spec.protocol else {
        return Err(ConfigError::NotOpcua(id));
    };
    let identity = match (&o.user_name, &o.password, &o.password_file) {
        (None, _, _) => Identity::Anonymous,
        (Some(user), Some(password), _) => Identity::Password {
            user: user.clone(),
            password: password.clone(),
        },
        (Some(user), None, Some(path)) => Identity::PasswordFile {
            user: user.clone(),
            path: PathBuf::from(path),
        },
        (Some(user), None, None) => Identity::Password {
            user: user.clone(),
            password: String::new(),
        },
    };
    let keypair = match (&o.certificate, &o.private_key) {
        (Some(c), Some(k)) => Some((PathBuf::from(c), PathBuf::from(k))),
        _ => None,
    };
    let secure = o.security_mode != SecurityMode::None;
    if secure != (o.security_policy != SecurityPolicy::None) {
        return Err(ConfigError::Security {
            device: id,
            what: "securityPolicy and securityMode must both be None or both be set",
        });
    }
    if secure && keypair.is_none() {
        return Err(ConfigError::Security {
            device: id,
            what: "a secure channel needs `certificate` and `privateKey`",
        });
    }
    Ok(ConnSettings {
        url: o.url.clone(),
        policy: o.security_policy,
        mode: o.security_mode,
        identity,
        keypair,
        timeout: o.timeout.as_std(),
    })
}

/// The opcua visitor of a property and the property's model type (the one accessor of
/// `edgetwin_profile`, [`ResolvedDevice::visitor`]).
pub fn property<'a>(
    device: &ResolvedDevice,
    prop: &'a DeviceProperty,
) -> Result<(&'a OpcuaVisitor, PropertyType), ConfigError> {
    device
        .visitor::<OpcuaVisitor>(prop)
        .map_err(ConfigError::from)
}

/// The requested sampling interval of a subscribed property: its `samplingInterval`, else its
/// `collectCycle` (the SDK's 1 s default when absent).
pub fn sampling_interval(prop: &DeviceProperty, v: &OpcuaVisitor) -> Duration {
    v.sampling_interval
        .map(|d| d.as_std())
        .or(prop.collect_cycle.map(|d| d.as_std()))
        .unwrap_or(DEFAULT_COLLECT_CYCLE)
}

/// The publishing interval of a device's subscription: the shortest sampling interval of its
/// subscribed properties, so a change is published at most one interval after it is sampled.
/// `None` when nothing is subscribed.
pub fn publishing_interval(intervals: impl IntoIterator<Item = Duration>) -> Option<Duration> {
    intervals.into_iter().min()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn resolved(protocol: &str, visitor: &str) -> ResolvedDevice {
        let yaml = format!(
            "apiVersion: edgetwin/v1\nkind: DeviceModel\nmetadata: {{name: m}}\nspec:\n  protocol: opcua\n  properties:\n    - {{name: t, type: float, accessMode: ReadOnly}}\n---\napiVersion: edgetwin/v1\nkind: Device\nmetadata: {{name: d1}}\nspec:\n  deviceModelRef: m\n  protocol:\n    opcua: {protocol}\n  properties:\n    - name: t\n      collectCycle: 2s\n      visitors:\n        opcua: {visitor}\n"
        );
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("d.yaml"), yaml).unwrap();
        let (set, errors) = edgetwin_profile::load_dir(dir.path());
        assert!(errors.is_empty(), "{errors:?}");
        let d = set.resolved().next().unwrap();
        d
    }

    #[test]
    fn config_anonymous_none_device_gives_url_and_timeout() {
        let d = resolved(
            "{url: \"opc.tcp://127.0.0.1:4840\", timeout: 250ms}",
            "{nodeID: \"ns=2;s=Temp\"}",
        );
        let s = settings(&d).unwrap();
        assert_eq!(s.url, "opc.tcp://127.0.0.1:4840");
        assert_eq!(
            (s.policy, s.mode),
            (SecurityPolicy::None, SecurityMode::None)
        );
        assert_eq!(s.identity, Identity::Anonymous);
        assert_eq!(s.timeout, Duration::from_millis(250));
        let p = &d.device.spec.properties[0];
        let (v, ty) = property(&d, p).unwrap();
        assert_eq!(
            (v.node_id.as_str(), ty),
            ("ns=2;s=Temp", PropertyType::Float)
        );
        assert_eq!(sampling_interval(p, v), Duration::from_secs(2));
    }

    #[test]
    fn config_secure_device_with_password_file_keeps_paths_and_hides_secrets() {
        let d = resolved(
            "{url: \"opc.tcp://plc:4840\", securityPolicy: Basic256Sha256, securityMode: Sign, userName: op, password: s3cret, certificate: /pki/c.der, privateKey: /pki/k.pem}",
            "{nodeID: \"ns=2;i=5\", samplingInterval: 100ms}",
        );
        let s = settings(&d).unwrap();
        assert_eq!(s.mode, SecurityMode::Sign);
        assert_eq!(
            s.keypair,
            Some((PathBuf::from("/pki/c.der"), PathBuf::from("/pki/k.pem")))
        );
        assert!(!format!("{s:?}").contains("s3cret"));
        let p = &d.device.spec.properties[0];
        let (v, _) = property(&d, p).unwrap();
        assert_eq!(sampling_interval(p, v), Duration::from_millis(100));
    }

    #[test]
    fn config_publishing_interval_is_the_shortest_sampling_interval() {
        let ms = Duration::from_millis;
        assert_eq!(
            publishing_interval([ms(500), ms(200), ms(1000)]),
            Some(ms(200))
        );
        assert_eq!(publishing_interval([]), None);
    }
}
