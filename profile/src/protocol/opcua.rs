//! OPC UA client connections (`spec.protocol.opcua`, `visitors.opcua`), field names after
//! KubeEdge's OPC UA mapper (`url`, `securityPolicy`, `securityMode`, `userName`, `password`,
//! `certificate`, `privateKey`, `nodeID`).

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::model::ModelProperty;
use crate::{Duration, Issues};

/// OPC UA security policy of the secure channel.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum SecurityPolicy {
    /// No security (only with `securityMode: None`).
    #[default]
    None,
    /// Basic256Sha256 (needs `securityMode` Sign or SignAndEncrypt).
    Basic256Sha256,
}

/// OPC UA message security mode.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum SecurityMode {
    /// Messages are neither signed nor encrypted.
    #[default]
    None,
    /// Messages are signed.
    Sign,
    /// Messages are signed and encrypted.
    SignAndEncrypt,
}

/// Connection settings of an OPC UA server.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct OpcuaDevice {
    /// Endpoint URL, `opc.tcp://host:port/path`.
    pub url: String,
    /// `None` or `Basic256Sha256`. Default `None`.
    #[serde(default)]
    pub security_policy: SecurityPolicy,
    /// `None`, `Sign` or `SignAndEncrypt`. Default `None`.
    #[serde(default)]
    pub security_mode: SecurityMode,
    /// User name for user/password authentication; anonymous when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_name: Option<String>,
    /// Password, inline. Prefer `passwordFile`: this value is passed on to the mapper.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password: Option<String>,
    /// Path of a file on the node holding the password (read by the mapper).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password_file: Option<String>,
    /// Path of the client certificate (DER or PEM) for signed or encrypted channels.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub certificate: Option<String>,
    /// Path of the client certificate's private key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub private_key: Option<String>,
    /// How long to wait for a reply. Default `1s`.
    #[serde(default = "super::default_timeout")]
    pub timeout: Duration,
}

impl OpcuaDevice {
    pub(crate) fn check(&self, out: &mut Issues) {
        if !self.url.starts_with("opc.tcp://") || self.url.len() <= "opc.tcp://".len() {
            out.push((
                "url".into(),
                format!("url {:?} must look like opc.tcp://host:4840/path", self.url),
            ));
        }
        match (self.security_policy, self.security_mode) {
            (SecurityPolicy::None, SecurityMode::None) => {}
            (SecurityPolicy::None, mode) => out.push((
                "securityMode".into(),
                format!("securityMode {mode:?} needs a securityPolicy other than None"),
            )),
            (policy, SecurityMode::None) => out.push((
                "securityMode".into(),
                format!("securityPolicy {policy:?} needs securityMode Sign or SignAndEncrypt"),
            )),
            _ => {
                if self.certificate.is_none() {
                    out.push((
                        String::new(),
                        "a secure channel needs `certificate` and `privateKey`".into(),
                    ));
                }
            }
        }
        if self.certificate.is_some() != self.private_key.is_some() {
            out.push((
                String::new(),
                "`certificate` and `privateKey` go together".into(),
            ));
        }
        if self.password.is_some() && self.password_file.is_some() {
            out.push((
                "passwordFile".into(),
                "give either `password` or `passwordFile`, not both".into(),
            ));
        }
        if (self.password.is_some() || self.password_file.is_some()) && self.user_name.is_none() {
            out.push((String::new(), "a password needs `userName`".into()));
        }
        if self.timeout.is_zero() {
            out.push(("timeout".into(), "timeout must be greater than 0".into()));
        }
    }
}

/// The OPC UA node of one property.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct OpcuaVisitor {
    /// Node id in the standard string form, e.g. `ns=2;s=Temperature` or `ns=3;i=1001`.
    #[serde(rename = "nodeID")]
    pub node_id: String,
    /// Sampling interval requested for the monitored item; the server's default when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sampling_interval: Option<Duration>,
    /// Absolute deadband of the monitored item's data change filter.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deadband: Option<f64>,
    /// Read the node every `collectCycle` instead of subscribing to it. Default false.
    #[serde(default)]
    pub poll: bool,
}

impl OpcuaVisitor {
    pub(crate) fn check(&self, _prop: &ModelProperty, out: &mut Issues) {
        if !is_node_id(&self.node_id) {
            out.push((
                "nodeID".into(),
                format!(
                    "{:?} is not an OPC UA node id; write e.g. \"ns=2;s=Temperature\" or \"i=2258\"",
                    self.node_id
                ),
            ));
        }
        if let Some(d) = self.deadband {
            if !(d.is_finite() && d >= 0.0) {
                out.push(("deadband".into(), "deadband must be a number >= 0".into()));
            }
        }
    }
}

/// `[ns=<u16>;]<i|s|g|b>=<id>` (also `nsu=<uri>;` namespace URIs).
fn is_node_id(s: &str) -> bool {
    let rest = match s.split_once(';') {
        Some((ns, rest)) => {
            let ok = ns
                .strip_prefix("ns=")
                .map(|n| n.parse::<u16>().is_ok())
                .unwrap_or(false)
                || ns.strip_prefix("nsu=").is_some_and(|u| !u.is_empty());
            if !ok {
                return false;
            }
            rest
        }
        None => s,
    };
    match rest.split_once('=') {
        Some(("i", id)) => id.parse::<u32>().is_ok(),
        Some(("s" | "g" | "b", id)) => !id.is_empty(),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::is_node_id;

    #[test]
    fn opcua_node_id_accepts_the_standard_forms() {
        for good in [
            "ns=2;s=Temp",
            "i=2258",
            "ns=3;i=1001",
            "nsu=urn:x;s=A.B",
            "ns=1;g=09087e75-8e5e-499b-954f-f2a9603db28a",
        ] {
            assert!(is_node_id(good), "{good}");
        }
        for bad in ["", "Temp", "ns=x;s=T", "ns=2;i=abc", "ns=2;q=1", "ns=2;s="] {
            assert!(!is_node_id(bad), "{bad}");
        }
    }
}
