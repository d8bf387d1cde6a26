//! Checks beyond types: unique names, model references, protocol sections against the model,
//! visitors against the model's properties, bounds and defaults. Every problem is collected; none
//! stops the others.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use edgetwin_contract::{DeviceId, PropertyType};

use crate::protocol::{PropertyVisitor, ProtocolConfig};
use crate::source::SourceDoc;
use crate::{Device, DeviceModel, Document, Issues, ProfileError, ProfileSet};

/// Checks a set of parsed files together and returns the models and devices they define.
///
/// A device's `deviceModelRef` may name a model of this set or one of `known_models` (models
/// already loaded, e.g. when a single file is applied to a running node); a model of this set
/// replaces a known model of the same name. The returned set holds the models of this set plus
/// the known models its devices use. Either everything is valid, or every error is returned.
pub fn validate(
    docs_by_file: &[(String, Vec<Document>)],
    known_models: &BTreeMap<String, DeviceModel>,
) -> Result<ProfileSet, Vec<ProfileError>> {
    validate_refs(&borrowed(docs_by_file), known_models)
}

/// [`validate`] on borrowed files: (file name, its documents). For callers that keep their
/// documents elsewhere (the node's registry), so they need not copy them to validate.
pub fn validate_refs(
    docs_by_file: &[(&str, &[Document])],
    known_models: &BTreeMap<String, DeviceModel>,
) -> Result<ProfileSet, Vec<ProfileError>> {
    validate_with(docs_by_file, known_models, &BTreeMap::new())
}

/// The files of `docs_by_file`, borrowed, in the same order.
pub(crate) fn borrowed(docs_by_file: &[(String, Vec<Document>)]) -> Vec<(&str, &[Document])> {
    docs_by_file
        .iter()
        .map(|(f, d)| (f.as_str(), d.as_slice()))
        .collect()
}

struct Report {
    errors: Vec<ProfileError>,
}

impl Report {
    fn push(&mut self, file: &str, source: &SourceDoc, path: &str, message: impl Into<String>) {
        self.errors.push(ProfileError {
            file: file.to_owned(),
            line: source.line_of(path),
            path: path.to_owned(),
            message: message.into(),
        });
    }

    fn issues(&mut self, file: &str, source: &SourceDoc, prefix: &str, issues: Issues) {
        for (rel, message) in issues {
            let path = if rel.is_empty() {
                prefix.to_owned()
            } else {
                format!("{prefix}.{rel}")
            };
            self.push(file, source, &path, message);
        }
    }
}

fn place(file: &str, source: &SourceDoc) -> String {
    match source.line_of("metadata.name") {
        Some(line) => format!("{file}:{line}"),
        None => file.to_owned(),
    }
}

/// [`validate`], also told which model names were defined in files rejected earlier, so a device
/// that refers to one gets a helpful message.
pub(crate) fn validate_with(
    docs_by_file: &[(&str, &[Document])],
    known_models: &BTreeMap<String, DeviceModel>,
    rejected_models: &BTreeMap<String, String>,
) -> Result<ProfileSet, Vec<ProfileError>> {
    let mut report = Report { errors: Vec::new() };
    let mut models: BTreeMap<String, (&str, &DeviceModel)> = BTreeMap::new();
    for &(file, docs) in docs_by_file {
        for doc in docs {
            if let Document::DeviceModel(m) = doc {
                check_model(file, m, &mut report);
                if let Some((first_file, first)) = models.get(m.name()) {
                    report.push(
                        file,
                        m.source(),
                        "metadata.name",
                        format!(
                            "device model {:?} is already defined at {}",
                            m.name(),
                            place(first_file, first.source())
                        ),
                    );
                } else {
                    models.insert(m.name().to_owned(), (file, m));
                }
            }
        }
    }

    let mut set = ProfileSet::default();
    let mut device_files: HashMap<&DeviceId, (&str, &Device)> = HashMap::new();
    for &(file, docs) in docs_by_file {
        for doc in docs {
            let Document::Device(d) = doc else { continue };
            if let Some((first_file, first)) = device_files.get(d.id()) {
                report.push(
                    file,
                    d.source(),
                    "metadata.name",
                    format!(
                        "device {:?} is already defined at {}",
                        d.id().as_str(),
                        place(first_file, first.source())
                    ),
                );
                continue;
            }
            device_files.insert(d.id(), (file, d));
            let model = match models.get(d.model_ref()) {
                Some((_, m)) => Some(*m),
                None => known_models.get(d.model_ref()),
            };
            if model.is_none() {
                let why = match rejected_models.get(d.model_ref()) {
                    Some(f) => format!(
                        "device model {:?} is defined in {f}, which has errors",
                        d.model_ref()
                    ),
                    None => format!("unknown device model {:?}", d.model_ref()),
                };
                report.push(file, d.source(), "spec.deviceModelRef", why);
            }
            check_device(file, d, model, &mut report);
            if let Some(m) = model {
                if !models.contains_key(m.name()) {
                    set.models.insert(m.name().to_owned(), m.clone());
                }
            }
            set.devices.insert(d.id().clone(), Arc::clone(d));
        }
    }
    if !report.errors.is_empty() {
        return Err(report.errors);
    }
    for (name, (_, m)) in models {
        let mut m = m.clone();
        m.set_source(SourceDoc::default());
        set.models.insert(name, m);
    }
    Ok(set)
}

fn check_model(file: &str, m: &DeviceModel, report: &mut Report) {
    let src = m.source();
    if DeviceId::new(m.name()).is_err() {
        report.push(
            file,
            src,
            "metadata.name",
            format!(
                "model name {:?} must be 1 to 128 letters, digits, '_', '.' or '-', starting with a letter or digit",
                m.name()
            ),
        );
    }
    // Any protocol may be named: a known one's sections are checked here, another one's are
    // passed to its mapper.
    let mut seen: HashMap<&str, usize> = HashMap::new();
    for (i, p) in m.spec.properties.iter().enumerate() {
        let at = |field: &str| format!("spec.properties[{i}].{field}");
        if let Some(first) = seen.insert(p.name.as_str(), i) {
            seen.insert(p.name.as_str(), first);
            report.push(
                file,
                src,
                &at("name"),
                format!(
                    "duplicate property {:?} (first at spec.properties[{first}])",
                    p.name.as_str()
                ),
            );
        }
        let numeric = matches!(p.ty, PropertyType::Int | PropertyType::Float);
        for (field, bound) in [("minimum", p.minimum), ("maximum", p.maximum)] {
            match bound {
                Some(_) if !numeric => report.push(
                    file,
                    src,
                    &at(field),
                    format!(
                        "{field} applies only to int and float properties, not {}",
                        p.ty
                    ),
                ),
                Some(b) if !b.is_finite() => report.push(
                    file,
                    src,
                    &at(field),
                    format!("{field} must be a finite number"),
                ),
                _ => {}
            }
        }
        if let (Some(lo), Some(hi)) = (p.minimum, p.maximum) {
            if lo > hi {
                report.push(
                    file,
                    src,
                    &at("minimum"),
                    format!("minimum {lo} is greater than maximum {hi}"),
                );
            }
        }
        if let Some(v) = &p.default {
            if !p.ty.admits(v) {
                report.push(
                    file,
                    src,
                    &at("default"),
                    format!("default {v} is not a {} value", p.ty),
                );
            } else if let Some(x) = v.as_f64() {
                if p.minimum.is_some_and(|lo| x < lo) || p.maximum.is_some_and(|hi| x > hi) {
                    report.push(
                        file,
                        src,
                        &at("default"),
                        format!(
                            "default {v} lies outside [{}, {}]",
                            p.minimum.map_or("-inf".into(), |b| b.to_string()),
                            p.maximum.map_or("inf".into(), |b| b.to_string())
                        ),
                    );
                }
            }
        }
    }
}

fn check_device(file: &str, d: &Device, model: Option<&DeviceModel>, report: &mut Report) {
    let src = d.source();
    let protocol = d.spec.protocol.name();
    let section = format!("spec.protocol.{protocol}");
    let mut issues = Issues::new();
    match &d.spec.protocol {
        ProtocolConfig::Modbus(c) => c.check(&mut issues),
        ProtocolConfig::Opcua(c) => c.check(&mut issues),
        ProtocolConfig::Ble(c) => c.check(&mut issues),
        ProtocolConfig::Serial(c) => c.check(&mut issues),
        ProtocolConfig::Other(_) => {}
    }
    report.issues(file, src, &section, issues);
    if let Some(m) = model {
        if m.protocol().as_str() != protocol {
            report.push(
                file,
                src,
                &section,
                format!(
                    "device model {:?} is for protocol {:?}, but this device has a `{protocol}` section",
                    m.name(),
                    m.protocol().as_str()
                ),
            );
        }
    }
    let mut seen: HashMap<&str, usize> = HashMap::new();
    for (i, p) in d.spec.properties.iter().enumerate() {
        let base = format!("spec.properties[{i}]");
        if let Some(first) = seen.insert(p.name.as_str(), i) {
            seen.insert(p.name.as_str(), first);
            report.push(
                file,
                src,
                &format!("{base}.name"),
                format!(
                    "duplicate property {:?} (first at spec.properties[{first}])",
                    p.name.as_str()
                ),
            );
        }
        for (field, cycle) in [
            ("collectCycle", p.collect_cycle),
            ("reportCycle", p.report_cycle),
            ("silenceTimeout", p.silence_timeout),
        ] {
            if cycle.is_some_and(|c| c.is_zero()) {
                report.push(
                    file,
                    src,
                    &format!("{base}.{field}"),
                    format!("{field} must be greater than 0"),
                );
            }
        }
        if p.silence_timeout.is_some() && !p.is_pushed() {
            report.push(
                file,
                src,
                &format!("{base}.silenceTimeout"),
                "silenceTimeout applies only to a value the device pushes (BLE notify, an OPC UA \
                 subscription, an unsolicited serial line); a polled value goes stale after \
                 its collectCycle",
            );
        }
        let deadband = p.report_on_change.as_ref().and_then(|r| r.deadband);
        if deadband.is_some_and(|x| !(x.is_finite() && x >= 0.0)) {
            report.push(
                file,
                src,
                &format!("{base}.reportOnChange.deadband"),
                "deadband must be a number >= 0",
            );
        }
        let visitor_protocol = p.visitors.protocol();
        let visitor_path = format!("{base}.visitors.{visitor_protocol}");
        if visitor_protocol != protocol {
            report.push(
                file,
                src,
                &visitor_path,
                format!("the visitor is for {visitor_protocol}, but the device speaks {protocol}"),
            );
        }
        let Some(m) = model else { continue };
        let Some(mp) = m.property(p.name.as_str()) else {
            let names: Vec<&str> = m.properties().iter().map(|p| p.name.as_str()).collect();
            report.push(
                file,
                src,
                &format!("{base}.name"),
                format!(
                    "device model {:?} has no property {:?} (it has: {})",
                    m.name(),
                    p.name.as_str(),
                    names.join(", ")
                ),
            );
            continue;
        };
        if deadband.is_some() && !matches!(mp.ty, PropertyType::Int | PropertyType::Float) {
            report.push(
                file,
                src,
                &format!("{base}.reportOnChange.deadband"),
                format!(
                    "deadband applies only to int and float properties, not {}",
                    mp.ty
                ),
            );
        }
        if visitor_protocol != protocol {
            continue;
        }
        let mut issues = Issues::new();
        match &p.visitors {
            PropertyVisitor::Modbus(v) => v.check(mp, &mut issues),
            PropertyVisitor::Opcua(v) => v.check(mp, &mut issues),
            PropertyVisitor::Ble(v) => v.check(mp, &mut issues),
            PropertyVisitor::Serial(v) => v.check(mp, &mut issues),
            PropertyVisitor::Other(_) => {}
        }
        report.issues(file, src, &visitor_path, issues);
    }
}
