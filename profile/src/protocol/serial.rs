//! Line-oriented serial devices (`spec.protocol.serial`, `visitors.serial`): the mapper sends an
//! optional request line and reads reply lines, or listens to lines the device sends on its own,
//! and takes the value from a regular expression's capture group.

use edgetwin_contract::AccessMode;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::{default_baud_rate, default_timeout, DataBits, Parity, StopBits};
use crate::model::ModelProperty;
use crate::{Duration, Issues};

/// Settings of a serial line.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SerialDevice {
    /// Serial port path; prefer stable `/dev/serial/by-id/...` paths.
    pub port: String,
    /// Baud rate. Default 9600.
    #[serde(default = "default_baud_rate")]
    pub baud_rate: u32,
    /// Data bits, 5 to 8. Default 8.
    #[serde(default)]
    pub data_bits: DataBits,
    /// `none`, `even` or `odd`. Default `none`.
    #[serde(default)]
    pub parity: Parity,
    /// Stop bits, 1 or 2. Default 1.
    #[serde(default)]
    pub stop_bits: StopBits,
    /// What ends a line, both ways. Default `"\n"`.
    #[serde(default = "default_line_ending")]
    pub line_ending: String,
    /// How long to wait for a reply line. Default `1s`.
    #[serde(default = "default_timeout")]
    pub timeout: Duration,
}

fn default_line_ending() -> String {
    "\n".into()
}

impl SerialDevice {
    pub(crate) fn check(&self, out: &mut Issues) {
        if self.port.trim().is_empty() {
            out.push(("port".into(), "port must not be empty".into()));
        }
        if self.baud_rate == 0 {
            out.push(("baudRate".into(), "baudRate must be greater than 0".into()));
        }
        if self.line_ending.is_empty() {
            out.push(("lineEnding".into(), "lineEnding must not be empty".into()));
        }
        if self.timeout.is_zero() {
            out.push(("timeout".into(), "timeout must be greater than 0".into()));
        }
    }
}

/// How one property is read from (and written to) a serial device.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SerialVisitor {
    /// Text sent to ask for the value, sent as is (include the line ending), e.g. `"READ TEMP\r\n"`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request: Option<String>,
    /// Regular expression (Rust `regex` syntax) matched against each line; the value is its named
    /// group `value`, or its only capture group.
    pub pattern: String,
    /// Text sent to write a desired value; `{value}` is replaced by the value, e.g. `"SET {value}\r\n"`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub write: Option<String>,
    /// The device sends matching lines on its own; no `request` is needed. Default false.
    #[serde(default)]
    pub unsolicited: bool,
}

impl SerialVisitor {
    pub(crate) fn check(&self, prop: &ModelProperty, out: &mut Issues) {
        match regex::Regex::new(&self.pattern) {
            Err(e) => out.push(("pattern".into(), format!("pattern does not compile: {e}"))),
            Ok(re) => {
                let has_named = re.capture_names().any(|n| n == Some("value"));
                let groups = re.captures_len() - 1;
                if groups == 0 {
                    out.push((
                        "pattern".into(),
                        "pattern needs a capture group around the value, e.g. \"T=(\\\\d+)\" or \"T=(?P<value>\\\\d+)\"".into(),
                    ));
                } else if groups > 1 && !has_named {
                    out.push((
                        "pattern".into(),
                        format!("pattern has {groups} capture groups: name the value's group (?P<value>...)"),
                    ));
                }
            }
        }
        if self.request.is_none() && !self.unsolicited {
            out.push((
                String::new(),
                "give `request` (to poll the value) or `unsolicited: true` (the device sends it on its own)".into(),
            ));
        }
        if let Some(req) = &self.request {
            if req.is_empty() {
                out.push(("request".into(), "request must not be empty".into()));
            }
        }
        match &self.write {
            Some(w) if !w.contains("{value}") => {
                out.push(("write".into(), "write template needs `{value}`".into()))
            }
            None if prop.access_mode == AccessMode::ReadWrite => out.push((
                String::new(),
                format!(
                    "property {:?} is ReadWrite, so it needs a `write` template",
                    prop.name.as_str()
                ),
            )),
            _ => {}
        }
    }
}
