//! `edgetwin device convert`: KubeEdge `devices.kubeedge.io/v1beta1` DeviceModel and Device
//! documents to edgetwin profile YAML, with a note for every field that has no equal here.
//!
//! Pure (text in, text out). The shapes are those of KubeEdge's v1beta1 CRDs as its own
//! mappers use them: a model's `spec.protocol` and flat `properties[]` (`type: INT|FLOAT|...`,
//! `accessMode`, `minimum`/`maximum` as strings); a device's `deviceModelRef.name`,
//! `protocol: {protocolName, configData}`, `properties[]` with `visitors: {protocolName,
//! configData}`, `collectCycle`/`reportCycle` (milliseconds; values of 10^9 and more are Go
//! nanosecond durations, as KubeEdge's own mapper samples write them), `reportToCloud`,
//! `desired`, `pushMethod`; `nodeName`; `status`. The migration table is in
//! `docs/kubeedge-migration.md`.

use std::collections::BTreeMap;

use serde::Deserialize;
use serde_json::{json, Map, Value};

use crate::ProfileError;

/// The API version this converts from.
pub const KUBEEDGE_API: &str = "devices.kubeedge.io/v1beta1";

/// What `convert` made: edgetwin YAML (documents in input order), and a note per field that has
/// no equal.
#[derive(Debug, Clone, PartialEq)]
pub struct Conversion {
    /// The edgetwin profile documents, as YAML.
    pub yaml: String,
    /// What was changed, dropped or guessed, with where in the input.
    pub notes: Vec<ProfileError>,
    /// Models converted.
    pub models: usize,
    /// Devices converted.
    pub devices: usize,
}

/// Options of a conversion.
#[derive(Debug, Clone, Default)]
pub struct ConvertOptions {
    /// This node's name: a device whose `spec.nodeName` names another node is left out.
    pub node: Option<String>,
}

/// The longest model or device name edgetwin takes (`DeviceId`).
const MAX_NAME: usize = 128;

/// Converts the KubeEdge documents of one file. A document of another kind or API version is an
/// error (nothing is converted then), as is text that is not YAML.
pub fn convert(
    file: &str,
    text: &str,
    opts: &ConvertOptions,
) -> Result<Conversion, Vec<ProfileError>> {
    let mut docs = Vec::new();
    for (index, de) in serde_norway::Deserializer::from_str(text).enumerate() {
        match serde_norway::Value::deserialize(de) {
            Ok(v) if v.is_null() => {}
            Ok(v) => match serde_json::to_value(&v) {
                Ok(j) => docs.push((index, j)),
                Err(e) => {
                    return Err(vec![error(
                        file,
                        None,
                        "",
                        format!("not convertible to JSON: {e}"),
                    )])
                }
            },
            Err(e) => return Err(vec![crate::parse::from_yaml_error(file, &e, None)]),
        }
    }
    let mut c = Converter {
        file,
        text,
        opts,
        notes: Vec::new(),
        renames: BTreeMap::new(),
        errors: Vec::new(),
    };
    // Names first, so a device's deviceModelRef follows its model's new name.
    for (index, d) in &docs {
        if d["kind"] == "DeviceModel" {
            if let Some(n) = d["metadata"]["name"].as_str() {
                c.name(*index, n);
            }
        }
    }
    let mut out = Vec::new();
    let (mut models, mut devices) = (0, 0);
    for (index, d) in &docs {
        let api = d["apiVersion"].as_str().unwrap_or_default();
        if api != KUBEEDGE_API {
            c.errors.push(c.err(
                *index,
                "apiVersion",
                format!("apiVersion {api:?}: only {KUBEEDGE_API} documents are converted"),
            ));
            continue;
        }
        match d["kind"].as_str() {
            Some("DeviceModel") => {
                out.push(c.model(*index, d));
                models += 1;
            }
            Some("Device") => {
                if let Some(dev) = c.device(*index, d) {
                    out.push(dev);
                    devices += 1;
                }
            }
            other => c.errors.push(c.err(
                *index,
                "kind",
                format!("kind {other:?}: expected DeviceModel or Device"),
            )),
        }
    }
    if !c.errors.is_empty() {
        return Err(c.errors);
    }
    let mut yaml = format!(
        "# Converted from {file} ({KUBEEDGE_API}) by `edgetwin device convert`; see the notes it printed.\n"
    );
    for (i, doc) in out.iter().enumerate() {
        if i > 0 {
            yaml.push_str("---\n");
        }
        let text = serde_norway::to_string(doc)
            .map_err(|e| vec![error(file, None, "", format!("cannot write YAML: {e}"))])?;
        yaml.push_str(&text);
    }
    Ok(Conversion {
        yaml,
        notes: c.notes,
        models,
        devices,
    })
}

fn error(file: &str, line: Option<usize>, path: &str, message: String) -> ProfileError {
    ProfileError {
        file: file.to_owned(),
        line,
        path: path.to_owned(),
        message,
    }
}

struct Converter<'a> {
    file: &'a str,
    text: &'a str,
    opts: &'a ConvertOptions,
    notes: Vec<ProfileError>,
    /// KubeEdge names longer than edgetwin takes, and what they became.
    renames: BTreeMap<String, String>,
    errors: Vec<ProfileError>,
}

impl Converter<'_> {
    fn err(&self, index: usize, path: &str, message: String) -> ProfileError {
        error(
            self.file,
            crate::source::line_of(self.text, index, path),
            path,
            message,
        )
    }

    fn note(&mut self, index: usize, path: &str, message: impl Into<String>) {
        let e = self.err(index, path, message.into());
        self.notes.push(e);
    }

    /// The edgetwin name of a KubeEdge name: as is when it fits, else shortened (and noted
    /// once): the first characters and a hash of the whole, so two long names stay apart.
    fn name(&mut self, index: usize, name: &str) -> String {
        if name.len() <= MAX_NAME {
            return name.to_string();
        }
        if let Some(n) = self.renames.get(name) {
            return n.clone();
        }
        let hash = name.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
        });
        let short = format!("{}-{:08x}", &name[..MAX_NAME - 9], hash as u32);
        self.note(
            index,
            "metadata.name",
            format!(
                "name {name:?} is {} characters, edgetwin takes at most {MAX_NAME}: it is {short:?} here (and in every deviceModelRef to it)",
                name.len()
            ),
        );
        self.renames.insert(name.to_string(), short.clone());
        short
    }

    fn metadata(&mut self, index: usize, d: &Value) -> Value {
        let name = d["metadata"]["name"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        let name = self.name(index, &name);
        if let Some(ns) = d["metadata"]["namespace"]
            .as_str()
            .filter(|n| *n != "default")
        {
            self.note(
                index,
                "metadata.namespace",
                format!("namespace {ns:?} dropped: edgetwin has one name space per node"),
            );
        }
        let mut m = json!({ "name": name });
        if let Some(labels) = d["metadata"]["labels"]
            .as_object()
            .filter(|l| !l.is_empty())
        {
            m["labels"] = Value::Object(labels.clone());
        }
        m
    }

    fn model(&mut self, index: usize, d: &Value) -> Value {
        let metadata = self.metadata(index, d);
        let spec = &d["spec"];
        let protocol = spec["protocol"].as_str().unwrap_or_default().to_lowercase();
        if protocol.is_empty() {
            self.note(
                index,
                "spec.protocol",
                "no protocol: set `spec.protocol` (e.g. modbus) before loading",
            );
        }
        let mut props = Vec::new();
        for (i, p) in spec["properties"]
            .as_array()
            .into_iter()
            .flatten()
            .enumerate()
        {
            let at = |f: &str| format!("spec.properties[{i}].{f}");
            // Flat v1beta1 fields, or the older nested `type: {int: {accessMode, ...}}`.
            let (ty_name, fields) = match &p["type"] {
                Value::String(t) => (t.to_lowercase(), p.clone()),
                Value::Object(o) if o.len() == 1 => {
                    let (k, v) = o
                        .iter()
                        .next()
                        .map(|(k, v)| (k.clone(), v.clone()))
                        .unwrap_or_default();
                    (k.to_lowercase(), v)
                }
                _ => (String::new(), p.clone()),
            };
            let ty = match ty_name.as_str() {
                "int" | "integer" => "int",
                "float" | "double" => "float",
                "string" => "string",
                "boolean" | "bool" => "boolean",
                other => {
                    self.note(
                        index,
                        &at("type"),
                        format!("type {other:?} has no equal (edgetwin has int, float, string, boolean, object): property {:?} left out", p["name"]),
                    );
                    continue;
                }
            };
            let mut out = json!({
                "name": p["name"],
                "type": ty,
                "accessMode": fields["accessMode"].as_str().unwrap_or("ReadOnly"),
            });
            for key in ["minimum", "maximum"] {
                match &fields[key] {
                    Value::Null => {}
                    Value::String(s) if s.trim().is_empty() => {}
                    v => match number(v) {
                        Some(n) => out[key] = n,
                        None => self.note(
                            index,
                            &at(key),
                            format!("{key} {v} is not a number: left out"),
                        ),
                    },
                }
            }
            for key in ["unit", "description"] {
                if let Some(s) = fields[key]
                    .as_str()
                    .or(p[key].as_str())
                    .filter(|s| !s.is_empty())
                {
                    out[key] = Value::from(s);
                }
            }
            if let Some(v) = fields.get("defaultValue").filter(|v| !v.is_null()) {
                let v = if ty == "string" {
                    v.clone()
                } else {
                    number(v).unwrap_or_else(|| v.clone())
                };
                out["default"] = v;
            }
            props.push(out);
        }
        json!({
            "apiVersion": "edgetwin/v1",
            "kind": "DeviceModel",
            "metadata": metadata,
            "spec": {"protocol": protocol, "properties": props},
        })
    }

    fn device(&mut self, index: usize, d: &Value) -> Option<Value> {
        let spec = &d["spec"];
        if let Some(node) = spec["nodeName"].as_str() {
            match &self.opts.node {
                Some(me) if me != node => {
                    self.note(
                        index,
                        "spec.nodeName",
                        format!("device for node {node:?}, not this node ({me:?}): left out"),
                    );
                    return None;
                }
                Some(_) => {}
                None => self.note(
                    index,
                    "spec.nodeName",
                    format!("nodeName {node:?} dropped: an edgetwin profile is loaded by the node it is given to (convert with --node to leave out other nodes' devices)"),
                ),
            }
        }
        let metadata = self.metadata(index, d);
        let model_ref = spec["deviceModelRef"]["name"]
            .as_str()
            .or(spec["deviceModelRef"].as_str())
            .unwrap_or_default()
            .to_string();
        let model_ref = self.renames.get(&model_ref).cloned().unwrap_or(model_ref);
        let protocol_name = spec["protocol"]["protocolName"]
            .as_str()
            .unwrap_or_default()
            .to_lowercase();
        let config = &spec["protocol"]["configData"];
        let section = match protocol_name.as_str() {
            "modbus" => self.modbus_device(index, config),
            "opcua" => self.opcua_device(index, config),
            "" => {
                self.note(
                    index,
                    "spec.protocol",
                    "no protocolName: set the device's protocol section before loading",
                );
                json!({})
            }
            _ => config.clone(),
        };
        let mut props = Vec::new();
        for (i, p) in spec["properties"]
            .as_array()
            .into_iter()
            .flatten()
            .enumerate()
        {
            props.push(self.property(index, i, p, &protocol_name));
        }
        for key in ["status"] {
            if !d[key].is_null() {
                self.note(
                    index,
                    key,
                    "status dropped: twin state comes from the device, through its mapper",
                );
            }
        }
        for (k, _) in spec.as_object().into_iter().flatten() {
            if !["deviceModelRef", "nodeName", "protocol", "properties"].contains(&k.as_str()) {
                self.note(
                    index,
                    &format!("spec.{k}"),
                    format!("spec.{k} has no equal: dropped"),
                );
            }
        }
        let mut protocol = Map::new();
        protocol.insert(protocol_name, section);
        Some(json!({
            "apiVersion": "edgetwin/v1",
            "kind": "Device",
            "metadata": metadata,
            "spec": {"deviceModelRef": model_ref, "protocol": protocol, "properties": props},
        }))
    }

    fn property(&mut self, index: usize, i: usize, p: &Value, protocol: &str) -> Value {
        let at = |f: &str| format!("spec.properties[{i}].{f}");
        let mut out = json!({ "name": p["name"] });
        for key in ["collectCycle", "reportCycle"] {
            if let Some(d) = self.cycle(index, &at(key), &p[key]) {
                out[key] = Value::from(d);
            }
        }
        if p["reportToCloud"].as_bool() == Some(true) {
            out["telemetry"] = Value::Bool(true);
            self.note(
                index,
                &at("reportToCloud"),
                "reportToCloud is telemetry: true: each reading also goes to dt/{device}/telemetry, which the bridge forwards",
            );
        }
        if !p["desired"].is_null() {
            self.note(
                index,
                &at("desired"),
                format!("desired value {} dropped: set it with `edgetwin twin set` (a profile holds no values)", p["desired"]["value"]),
            );
        }
        if !p["pushMethod"].is_null() {
            self.note(
                index,
                &at("pushMethod"),
                "pushMethod dropped: edgetwin publishes every reading over its own MQTT topics (dt/{device}/reported, telemetry)",
            );
        }
        let config = &p["visitors"]["configData"];
        let visitor = match protocol {
            "modbus" => self.modbus_visitor(index, &at("visitors.configData"), config),
            "opcua" => {
                let mut v = json!({});
                if let Some(id) = config["nodeID"].as_str() {
                    v["nodeID"] = Value::from(id);
                }
                self.dropped(index, &at("visitors.configData"), config, &["nodeID"]);
                v
            }
            _ => config.clone(),
        };
        let mut visitors = Map::new();
        visitors.insert(protocol.to_string(), visitor);
        out["visitors"] = Value::Object(visitors);
        out
    }

    /// A KubeEdge cycle (milliseconds, or a Go duration in nanoseconds from 10^9 up) as an
    /// edgetwin duration string.
    fn cycle(&mut self, index: usize, path: &str, v: &Value) -> Option<String> {
        let n = v.as_u64()?;
        if n == 0 {
            return None;
        }
        let ms = if n >= 1_000_000_000 {
            let ms = n / 1_000_000;
            self.note(
                index,
                path,
                format!("{n} read as nanoseconds (a Go duration, as KubeEdge's mapper samples write it): {ms} ms"),
            );
            ms.max(1)
        } else {
            n
        };
        Some(if ms % 1000 == 0 {
            format!("{}s", ms / 1000)
        } else {
            format!("{ms}ms")
        })
    }

    /// Notes every key of `config` not in `used`.
    fn dropped(&mut self, index: usize, path: &str, config: &Value, used: &[&str]) {
        for (k, _) in config.as_object().into_iter().flatten() {
            if !used.contains(&k.as_str()) {
                self.note(
                    index,
                    &format!("{path}.{k}"),
                    format!("{k} has no equal: dropped"),
                );
            }
        }
    }

    fn modbus_device(&mut self, index: usize, c: &Value) -> Value {
        let path = "spec.protocol.configData";
        let mut out = json!({});
        if let Some(id) = c["slaveID"].as_u64() {
            out["slaveID"] = Value::from(id);
        }
        let tcp = c["ip"].is_string() || c["tcp"].is_object();
        if tcp {
            out["communicateMode"] = Value::from("TCP");
            out["ip"] = if c["ip"].is_null() {
                c["tcp"]["ip"].clone()
            } else {
                c["ip"].clone()
            };
            let port = c["port"].as_u64().or(c["tcp"]["port"].as_u64());
            if let Some(port) = port {
                out["port"] = Value::from(port);
            }
        } else {
            out["communicateMode"] = Value::from("RTU");
            if let Some(port) = c["serialPort"].as_str() {
                out["serialName"] = Value::from(port);
                if !port.starts_with('/') {
                    self.note(
                        index,
                        &format!("{path}.serialPort"),
                        format!("serialPort {port:?} is not a device path: set serialName to the serial port (prefer /dev/serial/by-id/...) before loading"),
                    );
                }
            }
            for key in ["baudRate", "dataBits", "stopBits"] {
                if let Some(n) = c[key].as_u64() {
                    out[key] = Value::from(n);
                }
            }
            if let Some(p) = c["parity"].as_str() {
                out["parity"] = Value::from(match p.to_lowercase().as_str() {
                    "e" | "even" => "even",
                    "o" | "odd" => "odd",
                    _ => "none",
                });
            }
        }
        self.dropped(
            index,
            path,
            c,
            &[
                "slaveID",
                "ip",
                "port",
                "tcp",
                "serialPort",
                "baudRate",
                "dataBits",
                "stopBits",
                "parity",
            ],
        );
        out
    }

    fn opcua_device(&mut self, index: usize, c: &Value) -> Value {
        let path = "spec.protocol.configData";
        let mut out = json!({});
        for key in [
            "url",
            "securityPolicy",
            "securityMode",
            "userName",
            "certificate",
            "privateKey",
        ] {
            if let Some(s) = c[key].as_str() {
                out[key] = Value::from(s);
            }
        }
        if let Some(p) = c["password"].as_str() {
            // KubeEdge's OPC UA samples give the password as a file path.
            let key = if p.starts_with('/') {
                "passwordFile"
            } else {
                "password"
            };
            out[key] = Value::from(p);
            if key == "password" {
                self.note(index, &format!("{path}.password"), "the password is inline: prefer passwordFile (the resolved device carries an inline password to the mapper)");
            }
        }
        self.dropped(
            index,
            path,
            c,
            &[
                "url",
                "securityPolicy",
                "securityMode",
                "userName",
                "password",
                "certificate",
                "privateKey",
            ],
        );
        out
    }

    fn modbus_visitor(&mut self, index: usize, path: &str, c: &Value) -> Value {
        let register = match c["register"]
            .as_str()
            .unwrap_or_default()
            .to_lowercase()
            .as_str()
        {
            "coilregister" | "coil" | "coils" => "CoilRegister",
            "discreteinputregister" | "discreteinput" | "discrete" => "DiscreteInputRegister",
            "inputregister" | "input" => "InputRegister",
            _ => "HoldingRegister",
        };
        let limit = c["limit"].as_u64().unwrap_or(1);
        let mut out = json!({
            "register": register,
            "offset": c["offset"].as_u64().unwrap_or(0),
        });
        // KubeEdge's Modbus mapper has no dataType: a bit table reads bits, registers are read
        // as `limit` words. edgetwin needs the type: the same reading, named.
        let data_type = match (register, limit) {
            ("CoilRegister" | "DiscreteInputRegister", _) => "bool",
            (_, 1) => "int16",
            (_, 2) => "int32",
            (_, 4) => "int64",
            _ => "string",
        };
        let dt = c["dataType"].as_str().unwrap_or(data_type);
        out["dataType"] = Value::from(dt);
        if c["dataType"].is_null() {
            self.note(
                index,
                path,
                format!("no dataType in KubeEdge: {dt} assumed for {register} with limit {limit}; set float32, uint16 ... if the device holds another type"),
            );
        }
        if dt == "string" || c["dataType"].is_string() {
            out["limit"] = Value::from(limit);
        }
        if let Some(scale) = c["scale"].as_f64().filter(|s| *s != 1.0) {
            out["scale"] = json!(scale);
        }
        if dt != "bool" {
            for key in ["isSwap", "isRegisterSwap"] {
                if let Some(b) = c[key].as_bool() {
                    out[key] = Value::Bool(b);
                }
            }
        }
        self.dropped(
            index,
            path,
            c,
            &[
                "register",
                "offset",
                "limit",
                "scale",
                "isSwap",
                "isRegisterSwap",
                "dataType",
            ],
        );
        out
    }
}

/// A number written as a number or a string (`"100"`).
fn number(v: &Value) -> Option<Value> {
    match v {
        Value::Number(_) => Some(v.clone()),
        Value::String(s) => {
            let t = s.trim();
            t.parse::<i64>().map(Value::from).ok().or_else(|| {
                t.parse::<f64>()
                    .ok()
                    .and_then(serde_json::Number::from_f64)
                    .map(Value::Number)
            })
        }
        _ => None,
    }
}
