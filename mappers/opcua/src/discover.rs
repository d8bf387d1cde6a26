//! Discovery for commissioning (`edgetwin discover opcua`): the variables of a server's address
//! space as a draft profile. Bounded: from `root` (the Objects folder by default) at most
//! `depth` levels down and `maxNodes` nodes, following hierarchical references forward; the
//! standard `Server` object (namespace 0) is left out. The browse is the driver's I/O; what it
//! found becomes YAML here ([`draft`], pure).

use serde::Deserialize;
use serde_json::{json, Value};

/// What to browse, as the CLI sends it (`mappers/opcua/discover`, `target`).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct BrowseRequest {
    /// The server, `opc.tcp://host:port/path`.
    pub url: String,
    /// Security policy (`None`, `Basic256Sha256`), as in a device profile.
    #[serde(default)]
    pub security_policy: Option<String>,
    /// Security mode (`None`, `Sign`, `SignAndEncrypt`).
    #[serde(default)]
    pub security_mode: Option<String>,
    /// User name.
    #[serde(default)]
    pub user_name: Option<String>,
    /// File with the user's password, on the mapper's host.
    #[serde(default)]
    pub password_file: Option<String>,
    /// Where to start, a node id. Default the Objects folder, `i=85`.
    #[serde(default)]
    pub root: Option<String>,
    /// Levels below `root`. Default 4.
    #[serde(default)]
    pub depth: Option<u32>,
    /// Nodes in all. Default 500.
    #[serde(default)]
    pub max_nodes: Option<usize>,
    /// Name of the draft's model and device. Default `discovered-opcua`.
    #[serde(default)]
    pub name: Option<String>,
}

impl BrowseRequest {
    /// The server's settings as a device's `opcua` section: what the browse connects with, and
    /// what the draft's device gets.
    pub fn section(&self) -> Value {
        let mut section = json!({"url": self.url});
        for (k, v) in [
            ("securityPolicy", &self.security_policy),
            ("securityMode", &self.security_mode),
            ("userName", &self.user_name),
            ("passwordFile", &self.password_file),
        ] {
            if let Some(v) = v {
                section[k] = Value::from(v.as_str());
            }
        }
        section
    }
}

/// One variable found.
#[derive(Debug, Clone, PartialEq)]
pub struct Variable {
    /// Its node id, in the standard string form (`ns=2;s=Temperature`).
    pub node_id: String,
    /// Its browse name (the property's name, made valid and unique).
    pub browse_name: String,
    /// The model type (`int`, `float`, `string`, `boolean`).
    pub ty: &'static str,
    /// Whether its access level lets a client write it.
    pub writable: bool,
}

/// The model type of an OPC UA built-in data type (its numeric id in namespace 0); `None` for
/// types a profile cannot hold.
pub fn model_type(data_type: u32) -> Option<&'static str> {
    match data_type {
        1 => Some("boolean"),
        2..=9 => Some("int"),
        10 | 11 => Some("float"),
        12 => Some("string"),
        _ => None,
    }
}

/// `name` made into a property name (letters, digits, `_`, `-`; starting with a letter or
/// digit), unique among `taken`.
pub fn property_name(name: &str, taken: &mut std::collections::HashSet<String>) -> String {
    let mut n: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "_-".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect();
    n = n.trim_start_matches(['_', '-']).to_string();
    if n.is_empty() {
        n = "value".into();
    }
    n.truncate(100);
    let mut candidate = n.clone();
    let mut i = 2;
    while !taken.insert(candidate.clone()) {
        candidate = format!("{n}_{i}");
        i += 1;
    }
    candidate
}

/// The draft profile (YAML) of the variables found: one model and one device for the server.
pub fn draft(req: &BrowseRequest, vars: &[Variable]) -> Result<String, String> {
    let name = req.name.as_deref().unwrap_or("discovered-opcua");
    let mut taken = std::collections::HashSet::new();
    let named: Vec<(String, &Variable)> = vars
        .iter()
        .map(|v| (property_name(&v.browse_name, &mut taken), v))
        .collect();
    let props: Vec<Value> = named
        .iter()
        .map(|(n, v)| {
            json!({"name": n, "type": v.ty, "accessMode": if v.writable { "ReadWrite" } else { "ReadOnly" }})
        })
        .collect();
    let model = json!({
        "apiVersion": "edgetwin/v1",
        "kind": "DeviceModel",
        "metadata": {"name": name},
        "spec": {"protocol": "opcua", "properties": props},
    });
    let section = req.section();
    let dprops: Vec<Value> = named
        .iter()
        .map(|(n, v)| json!({"name": n, "visitors": {"opcua": {"nodeID": v.node_id}}}))
        .collect();
    let device = json!({
        "apiVersion": "edgetwin/v1",
        "kind": "Device",
        "metadata": {"name": name},
        "spec": {"deviceModelRef": name, "protocol": {"opcua": section}, "properties": dprops},
    });
    let mut yaml = String::from(
        "# Draft profile from `edgetwin discover opcua`: every variable found under the root,\n\
         # read by subscription. Rename properties, add units, drop what you do not need.\n",
    );
    for (i, d) in [model, device].iter().enumerate() {
        if i > 0 {
            yaml.push_str("---\n");
        }
        yaml.push_str(&serde_norway::to_string(d).map_err(|e| e.to_string())?);
    }
    Ok(yaml)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn discover_names_become_valid_and_unique_properties() {
        let mut taken = std::collections::HashSet::new();
        assert_eq!(property_name("Level", &mut taken), "Level");
        assert_eq!(property_name("Level", &mut taken), "Level_2");
        assert_eq!(
            property_name("\"Tank 1\".Level", &mut taken),
            "Tank_1__Level"
        );
        assert_eq!(property_name("W.Bool", &mut taken), "W_Bool");
        assert_eq!(property_name("__", &mut taken), "value");
    }

    #[test]
    fn discover_opcua_draft_validates() {
        let req: BrowseRequest =
            serde_json::from_value(json!({"url": "opc.tcp://127.0.0.1:4840"})).unwrap();
        let vars = vec![
            Variable {
                node_id: "ns=2;s=Int16".into(),
                browse_name: "Int16".into(),
                ty: "int",
                writable: false,
            },
            Variable {
                node_id: "ns=2;s=Setpoint".into(),
                browse_name: "Setpoint".into(),
                ty: "float",
                writable: true,
            },
        ];
        let yaml = draft(&req, &vars).unwrap();
        let docs = edgetwin_profile::parse_str("d.yaml", &yaml)
            .unwrap_or_else(|e| panic!("{e:#?}\n{yaml}"));
        edgetwin_profile::validate(&[("d.yaml".into(), docs)], &Default::default())
            .unwrap_or_else(|e| panic!("{e:#?}\n{yaml}"));
        assert!(yaml.contains("accessMode: ReadWrite"), "{yaml}");
    }
}
