//! Discovery for commissioning: which unit ids answer on a Modbus TCP endpoint or serial line,
//! and which registers they hold, as a draft profile the engineer edits and applies.
//!
//! Bounded and polite: only the unit ids and register ranges asked for, at most
//! [`Limits::max_requests`] requests, [`Limits::pause`] between requests, blocks of
//! [`BLOCK`] registers split into single reads only where the device refused the block. A unit
//! that does not answer its first request within the timeout (or answers with a gateway or
//! device-failure exception, as a gateway does for a unit behind it that is not there) is
//! absent and is not asked again. The scan itself is [`plan`] (pure) and the driver's I/O.

use std::collections::BTreeMap;
use std::ops::RangeInclusive;
use std::time::Duration;

use serde::Deserialize;
use serde_json::{json, Value};

/// Registers read in one request while scanning.
pub const BLOCK: u16 = 10;

/// What to scan, as the CLI sends it (`mappers/modbus/discover`, `target`).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScanRequest {
    /// `host:port` of a Modbus TCP device or gateway.
    #[serde(default)]
    pub tcp: Option<String>,
    /// A serial line (Modbus RTU).
    #[serde(default)]
    pub serial: Option<SerialTarget>,
    /// Unit ids to try, e.g. `"1-10"` or `"1,3,7"`. Default `1-10`.
    #[serde(default)]
    pub units: Option<String>,
    /// Holding register range, e.g. `"0-99"`.
    #[serde(default)]
    pub holding: Option<String>,
    /// Input register range.
    #[serde(default)]
    pub input: Option<String>,
    /// Coil range.
    #[serde(default)]
    pub coils: Option<String>,
    /// Discrete input range.
    #[serde(default)]
    pub discrete: Option<String>,
    /// Prefix of the draft's model and device names. Default `discovered`.
    #[serde(default)]
    pub name: Option<String>,
}

/// A serial line to scan.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct SerialTarget {
    /// The port path.
    pub path: String,
    /// Baud rate. Default 9600.
    #[serde(default)]
    pub baud_rate: Option<u32>,
}

/// The limits a scan keeps to.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Limits {
    /// Requests in all.
    pub max_requests: u32,
    /// Pause between two requests.
    pub pause: Duration,
    /// How long a unit may take to answer.
    pub timeout: Duration,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            max_requests: 2000,
            pause: Duration::from_millis(5),
            timeout: Duration::from_millis(300),
        }
    }
}

/// A register table as the scan names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Table {
    /// Holding registers.
    Holding,
    /// Input registers.
    Input,
    /// Coils.
    Coils,
    /// Discrete inputs.
    Discrete,
}

impl Table {
    fn register(self) -> &'static str {
        match self {
            Table::Holding => "HoldingRegister",
            Table::Input => "InputRegister",
            Table::Coils => "CoilRegister",
            Table::Discrete => "DiscreteInputRegister",
        }
    }

    fn prefix(self) -> &'static str {
        match self {
            Table::Holding => "hr",
            Table::Input => "ir",
            Table::Coils => "co",
            Table::Discrete => "di",
        }
    }
}

/// A parsed scan: unit ids and per-table ranges.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    /// Unit ids, ascending.
    pub units: Vec<u8>,
    /// Ranges per table.
    pub ranges: Vec<(Table, RangeInclusive<u16>)>,
}

/// `"1-10"`, `"1,3,7-9"` as numbers; `None` with a reason when it is not such a list or a number
/// falls outside `lo..=hi`.
pub fn numbers(text: &str, lo: u32, hi: u32) -> Result<Vec<u32>, String> {
    let mut out = Vec::new();
    for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (a, b) = match part.split_once('-') {
            Some((a, b)) => (a.trim(), b.trim()),
            None => (part, part),
        };
        let parse = |s: &str| {
            s.parse::<u32>()
                .map_err(|_| format!("{part:?} is not a number or a range like 1-10"))
        };
        let (a, b) = (parse(a)?, parse(b)?);
        if a > b || a < lo || b > hi {
            return Err(format!("{part:?} must lie within {lo}-{hi}, low to high"));
        }
        out.extend(a..=b);
    }
    out.sort_unstable();
    out.dedup();
    if out.is_empty() {
        return Err(format!("{text:?} names nothing"));
    }
    Ok(out)
}

/// The plan of a request; defaults: units 1-10, holding and input registers 0-99.
pub fn plan(req: &ScanRequest) -> Result<Plan, String> {
    let units = numbers(req.units.as_deref().unwrap_or("1-10"), 1, 247)
        .map_err(|e| format!("units: {e}"))?
        .into_iter()
        .map(|u| u as u8)
        .collect();
    let mut ranges = Vec::new();
    let defaulted = req.holding.is_none()
        && req.input.is_none()
        && req.coils.is_none()
        && req.discrete.is_none();
    for (table, text) in [
        (
            Table::Holding,
            req.holding.as_deref().or(defaulted.then_some("0-99")),
        ),
        (
            Table::Input,
            req.input.as_deref().or(defaulted.then_some("0-99")),
        ),
        (Table::Coils, req.coils.as_deref()),
        (Table::Discrete, req.discrete.as_deref()),
    ] {
        let Some(text) = text else { continue };
        let (a, b) = match text.split_once('-') {
            Some((a, b)) => (a.trim(), b.trim()),
            None => (text.trim(), text.trim()),
        };
        let parse = |s: &str| {
            s.parse::<u16>()
                .map_err(|_| format!("{table:?}: {text:?} is not a range like 0-99"))
        };
        let (a, b) = (parse(a)?, parse(b)?);
        if a > b {
            return Err(format!("{table:?}: {text:?} runs backwards"));
        }
        ranges.push((table, a..=b));
    }
    if req.tcp.is_some() == req.serial.is_some() {
        return Err("give exactly one of tcp (host:port) and serial (a port path)".into());
    }
    Ok(Plan { units, ranges })
}

/// What a scan found on one unit: table and address → raw value (16-bit word, or 0/1 for bits).
pub type Found = BTreeMap<(Table, u16), u16>;

/// The draft profile (YAML) for what a scan found: one model and one device per unit, every
/// register a read-only `int` property (raw 16-bit values: the device's manual says which pairs
/// are float32 or int32, and which holding registers may be written).
pub fn draft(req: &ScanRequest, found: &BTreeMap<u8, Found>) -> Result<String, String> {
    let prefix = req.name.as_deref().unwrap_or("discovered");
    let mut docs = Vec::new();
    for (unit, regs) in found {
        let name = format!("{prefix}-u{unit}");
        let props: Vec<Value> = regs
            .keys()
            .map(|(t, a)| {
                let ty = if matches!(t, Table::Coils | Table::Discrete) {
                    "boolean"
                } else {
                    "int"
                };
                json!({"name": format!("{}{a}", t.prefix()), "type": ty, "accessMode": "ReadOnly"})
            })
            .collect();
        docs.push(json!({
            "apiVersion": "edgetwin/v1",
            "kind": "DeviceModel",
            "metadata": {"name": name},
            "spec": {"protocol": "modbus", "properties": props},
        }));
        let protocol = match (&req.tcp, &req.serial) {
            (Some(hostport), _) => {
                let (host, port) = hostport
                    .rsplit_once(':')
                    .unwrap_or((hostport.as_str(), "502"));
                json!({"communicateMode": "TCP", "ip": host, "port": port.parse::<u16>().unwrap_or(502), "slaveID": unit})
            }
            (None, Some(s)) => {
                json!({"communicateMode": "RTU", "serialName": s.path, "baudRate": s.baud_rate.unwrap_or(9600), "slaveID": unit})
            }
            (None, None) => return Err("no target".into()),
        };
        let dprops: Vec<Value> = regs
            .iter()
            .map(|((t, a), raw)| {
                let data_type = if matches!(t, Table::Coils | Table::Discrete) { "bool" } else { "uint16" };
                json!({
                    "name": format!("{}{a}", t.prefix()),
                    "visitors": {"modbus": {"register": t.register(), "offset": a, "dataType": data_type}},
                    "_raw": raw,
                })
            })
            .collect();
        docs.push(json!({
            "apiVersion": "edgetwin/v1",
            "kind": "Device",
            "metadata": {"name": name},
            "spec": {"deviceModelRef": name, "protocol": {"modbus": protocol}, "properties": dprops},
        }));
    }
    let mut yaml = String::from(
        "# Draft profile from `edgetwin discover modbus`. Every register found is a read-only\n\
         # int (raw 16-bit values): per the device's manual, combine pairs into float32/int32\n\
         # (limit 2), add scale and units, make setpoints ReadWrite, give better names.\n",
    );
    for (i, d) in docs.iter().enumerate() {
        if i > 0 {
            yaml.push_str("---\n");
        }
        let mut text = serde_norway::to_string(d).map_err(|e| e.to_string())?;
        // What each register held when scanned, as a comment beside it.
        text = annotate_raw(&text);
        yaml.push_str(&text);
    }
    Ok(yaml)
}

/// Turns the `_raw: N` entries into comments (`# read N`) on the property's line above.
fn annotate_raw(text: &str) -> String {
    let lines: Vec<&str> = text.lines().collect();
    let mut out: Vec<String> = Vec::new();
    for line in lines {
        if let Some(raw) = line.trim().strip_prefix("_raw: ") {
            // The property's `- name:` line is the latest that starts with "- name:".
            if let Some(pos) = out
                .iter()
                .rposition(|l| l.trim_start().starts_with("- name:"))
            {
                out[pos] = format!("{}  # read {raw}", out[pos]);
            }
            continue;
        }
        out.push(line.to_string());
    }
    out.join("\n") + "\n"
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn req() -> ScanRequest {
        ScanRequest {
            tcp: Some("127.0.0.1:5020".into()),
            serial: None,
            units: Some("1-3".into()),
            holding: Some("0-9".into()),
            input: None,
            coils: None,
            discrete: None,
            name: None,
        }
    }

    #[test]
    fn discover_plan_reads_unit_lists_and_ranges_and_defaults() {
        assert_eq!(numbers("1,3,7-9", 1, 247).unwrap(), vec![1, 3, 7, 8, 9]);
        assert!(numbers("0-3", 1, 247).unwrap_err().contains("within 1-247"));
        assert!(numbers("a", 1, 247).is_err());
        let p = plan(&req()).unwrap();
        assert_eq!(p.units, vec![1, 2, 3]);
        assert_eq!(p.ranges, vec![(Table::Holding, 0..=9)]);
        let p = plan(&ScanRequest {
            holding: None,
            units: None,
            ..req()
        })
        .unwrap();
        assert_eq!(p.units.len(), 10);
        assert_eq!(
            p.ranges,
            vec![(Table::Holding, 0..=99), (Table::Input, 0..=99)]
        );
        assert!(
            plan(&ScanRequest { tcp: None, ..req() }).is_err(),
            "a target is needed"
        );
    }

    #[test]
    fn discover_draft_is_a_profile_that_validates() {
        let mut found = BTreeMap::new();
        found.insert(
            1u8,
            Found::from([((Table::Holding, 9), 54321), ((Table::Coils, 0), 1)]),
        );
        let yaml = draft(&req(), &found).unwrap();
        assert!(
            yaml.contains("hr9") && yaml.contains("# read 54321"),
            "{yaml}"
        );
        let docs = edgetwin_profile::parse_str("draft.yaml", &yaml)
            .unwrap_or_else(|e| panic!("{e:#?}\n{yaml}"));
        edgetwin_profile::validate(&[("draft.yaml".into(), docs)], &Default::default())
            .unwrap_or_else(|e| panic!("{e:#?}\n{yaml}"));
    }
}
