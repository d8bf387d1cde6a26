//! `edgetwin device convert` on KubeEdge's own v1beta1 examples (`tests/data/kubeedge/`, sources
//! in its README): the result loads, and every field without an equal is noted.
#![allow(clippy::unwrap_used, missing_docs)]

use std::collections::BTreeMap;
use std::path::Path;

use edgetwin_profile::kubeedge::{convert, ConvertOptions};
use edgetwin_profile::{parse_str, validate, ProfileError};

fn data(name: &str) -> String {
    std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/data/kubeedge")
            .join(name),
    )
    .unwrap()
}

fn both() -> String {
    format!(
        "{}---\n{}",
        data("modbus-model.yaml"),
        data("modbus-instance.yaml")
    )
}

fn note<'a>(notes: &'a [ProfileError], path: &str) -> &'a ProfileError {
    notes
        .iter()
        .find(|n| n.path == path)
        .unwrap_or_else(|| panic!("no note at {path}: {notes:#?}"))
}

#[test]
fn kubeedge_modbus_sample_converts_to_a_profile_that_loads() {
    let text = both();
    let c = convert("ke.yaml", &text, &ConvertOptions::default()).unwrap();
    assert_eq!((c.models, c.devices), (1, 1));
    let docs = parse_str("out.yaml", &c.yaml).unwrap_or_else(|e| panic!("{e:#?}\n{}", c.yaml));
    let set = validate(&[("out.yaml".into(), docs)], &BTreeMap::new())
        .unwrap_or_else(|e| panic!("{e:#?}\n{}", c.yaml));
    let device = &set.devices[&"modbus-instance-01".parse().unwrap()];
    let p = &device.spec.properties[0];
    assert_eq!(p.collect_cycle.unwrap().to_string(), "10s");
    assert!(p.telemetry);
    // Every KubeEdge-only field is named, with its line in the input.
    for path in [
        "spec.nodeName",
        "spec.properties[0].pushMethod",
        "spec.properties[0].reportToCloud",
        "spec.properties[0].collectCycle",
        "spec.protocol.configData.serialPort",
        "status",
    ] {
        let n = note(&c.notes, path);
        assert!(n.line.is_some(), "{n}");
    }
    assert!(note(&c.notes, "spec.properties[0].collectCycle")
        .message
        .contains("nanoseconds"));
}

#[test]
fn kubeedge_docs_model_keeps_its_range_and_unit() {
    let c = convert(
        "m.yaml",
        &data("docs-beta1-model.yaml"),
        &ConvertOptions::default(),
    )
    .unwrap();
    let docs = parse_str("out.yaml", &c.yaml).unwrap();
    let set = validate(&[("out.yaml".into(), docs)], &BTreeMap::new()).unwrap();
    let m = &set.models["beta1-model"];
    let temp = m.property("temp").unwrap();
    assert_eq!((temp.minimum, temp.maximum), (Some(1.0), Some(100.0)));
    assert_eq!(temp.unit.as_deref(), Some("Celsius"));
    assert!(c.notes.is_empty(), "{:#?}", c.notes);
}

#[test]
fn kubeedge_devices_of_another_node_are_left_out_with_a_note() {
    let text = both();
    let mine = convert(
        "ke.yaml",
        &text,
        &ConvertOptions {
            node: Some("edge-node".into()),
        },
    )
    .unwrap();
    assert_eq!(mine.devices, 1);
    assert!(
        mine.notes.iter().all(|n| n.path != "spec.nodeName"),
        "{:#?}",
        mine.notes
    );
    let other = convert(
        "ke.yaml",
        &text,
        &ConvertOptions {
            node: Some("edge-2".into()),
        },
    )
    .unwrap();
    assert_eq!(other.devices, 0);
    assert!(note(&other.notes, "spec.nodeName")
        .message
        .contains("left out"));
}

#[test]
fn kubeedge_names_longer_than_ours_are_shortened_consistently() {
    let long = "m".repeat(200);
    let text = both().replace("modbus-01", &long);
    let c = convert("ke.yaml", &text, &ConvertOptions::default()).unwrap();
    let docs = parse_str("out.yaml", &c.yaml).unwrap();
    let set = validate(&[("out.yaml".into(), docs)], &BTreeMap::new())
        .unwrap_or_else(|e| panic!("{e:#?}"));
    let device = set.devices.values().next().unwrap();
    assert_eq!(device.model_ref().len(), 128);
    assert!(set.models.contains_key(device.model_ref()));
    assert!(note(&c.notes, "metadata.name")
        .message
        .contains("at most 128"));
}

#[test]
fn kubeedge_convert_refuses_what_is_not_kubeedge_v1beta1() {
    let errors = convert(
        "x.yaml",
        "apiVersion: edgetwin/v1\nkind: Device\n",
        &ConvertOptions::default(),
    )
    .unwrap_err();
    assert!(
        errors[0]
            .message
            .contains("only devices.kubeedge.io/v1beta1"),
        "{errors:#?}"
    );
    assert!(convert("x.yaml", "a: [", &ConvertOptions::default()).is_err());
}

#[test]
fn kubeedge_yaml_given_to_the_loader_says_how_to_convert_it() {
    let errors = parse_str("ke.yaml", &data("modbus-model.yaml")).unwrap_err();
    assert_eq!(errors.len(), 1, "{errors:#?}");
    assert!(
        errors[0]
            .message
            .contains("edgetwin device convert ke.yaml"),
        "{}",
        errors[0]
    );
    assert_eq!(errors[0].line, Some(1));
}

#[test]
fn kubeedge_opcua_device_converts_its_connection_and_node_ids() {
    // KubeEdge's OPC UA sample (mappers-go build/crd-samples/devices/opcua-device.yaml, a
    // v1alpha2 document) in the v1beta1 layout: the same fields under protocol.configData and
    // visitors.configData.
    let text = "\
apiVersion: devices.kubeedge.io/v1beta1
kind: DeviceModel
metadata: {name: opcua-model}
spec:
  protocol: opcua
  properties:
    - {name: temperature, type: INT, accessMode: ReadOnly}
    - {name: switcher, type: BOOLEAN, accessMode: ReadWrite}
---
apiVersion: devices.kubeedge.io/v1beta1
kind: Device
metadata: {name: lamp}
spec:
  deviceModelRef: {name: opcua-model}
  protocol:
    protocolName: opcua
    configData:
      url: opc.tcp://192.168.56.103:4840
      userName: testuser
      password: /ca/pass
      certificate: /ca/clientcert.pem
      privateKey: /ca/clientkey.pem
      securityMode: Sign
      securityPolicy: Basic256Sha256
      remoteCertificate: /ca/servercert.pem
  properties:
    - name: temperature
      visitors: {protocolName: opcua, configData: {nodeID: ns=2;i=2}}
    - name: switcher
      visitors: {protocolName: opcua, configData: {nodeID: ns=2;i=3}}
";
    let c = convert("lamp.yaml", text, &ConvertOptions::default()).unwrap();
    let docs = parse_str("out.yaml", &c.yaml).unwrap_or_else(|e| panic!("{e:#?}\n{}", c.yaml));
    let set = validate(&[("out.yaml".into(), docs)], &BTreeMap::new())
        .unwrap_or_else(|e| panic!("{e:#?}\n{}", c.yaml));
    assert_eq!(set.devices.len(), 1);
    assert!(c.yaml.contains("passwordFile: /ca/pass"), "{}", c.yaml);
    assert!(c.yaml.contains("nodeID: ns=2;i=3"), "{}", c.yaml);
    assert!(note(&c.notes, "spec.protocol.configData.remoteCertificate")
        .message
        .contains("no equal"));
}
