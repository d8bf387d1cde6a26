//! Profile loading as a specification: every rule, with the error's path and line.
#![allow(clippy::unwrap_used, missing_docs)]

use std::collections::BTreeMap;

use edgetwin_profile::{
    load_dir, parse_str, validate, DeviceModel, Document, ProfileError, ProfileSet, ResolvedDevice,
};

const MODEL: &str = "\
apiVersion: edgetwin/v1
kind: DeviceModel
metadata: {name: power-meter}
spec:
  protocol: modbus
  properties:
    - {name: voltage, type: float, accessMode: ReadOnly, unit: V}
    - {name: relay, type: boolean, accessMode: ReadWrite}
    - {name: setpoint, type: float, accessMode: ReadWrite, minimum: 5, maximum: 35}
";

const DEVICE: &str = "\
apiVersion: edgetwin/v1
kind: Device
metadata: {name: meter-7}
spec:
  deviceModelRef: power-meter
  protocol:
    modbus: {communicateMode: TCP, ip: 192.0.2.10, port: 502, slaveID: 1}
  properties:
    - name: voltage
      collectCycle: 1s
      reportOnChange: {deadband: 0.5}
      telemetry: true
      visitors:
        modbus: {register: HoldingRegister, offset: 0, limit: 2, dataType: float32, isRegisterSwap: true}
";

/// 1-based line of the first line of `text` containing `needle`.
fn line(text: &str, needle: &str) -> usize {
    text.lines()
        .position(|l| l.contains(needle))
        .map(|i| i + 1)
        .unwrap_or_else(|| panic!("{needle:?} not in text"))
}

/// Parses and validates `files` together; the errors, or an empty list.
fn errors(files: &[(&str, &str)]) -> Vec<ProfileError> {
    let mut parsed = Vec::new();
    let mut errors = Vec::new();
    for (name, text) in files {
        match parse_str(name, text) {
            Ok(docs) => parsed.push((name.to_string(), docs)),
            Err(es) => errors.extend(es),
        }
    }
    if let Err(es) = validate(&parsed, &BTreeMap::new()) {
        errors.extend(es);
    }
    errors
}

fn one_file(text: &str) -> Vec<ProfileError> {
    errors(&[("p.yaml", text)])
}

fn with_model_and_device(device: &str) -> String {
    format!("{MODEL}---\n{device}")
}

/// Asserts that exactly one error has `path`, at the line containing `needle`, mentioning `words`.
#[track_caller]
fn assert_error(errors: &[ProfileError], text: &str, path: &str, needle: &str, words: &str) {
    let found: Vec<&ProfileError> = errors.iter().filter(|e| e.path == path).collect();
    assert_eq!(
        found.len(),
        1,
        "expected one error at {path}, got: {errors:#?}"
    );
    let e = found[0];
    assert_eq!(e.line, Some(line(text, needle)), "wrong line for {e}");
    assert!(e.message.contains(words), "{e} does not mention {words:?}");
}

#[test]
fn profile_accepts_the_design_example() {
    let text = with_model_and_device(DEVICE);
    assert_eq!(one_file(&text), vec![]);
}

#[test]
fn profile_error_names_file_line_and_path_for_unknown_field() {
    let text = with_model_and_device(
        &DEVICE.replace("telemetry: true", "telemetry: true\n      colectCycle: 2s"),
    );
    let errors = one_file(&text);
    assert_error(
        &errors,
        &text,
        "spec.properties[0].colectCycle",
        "colectCycle",
        "unknown field `colectCycle`",
    );
    let shown = errors[0].to_string();
    let expected = format!(
        "p.yaml:{}: spec.properties[0].colectCycle: unknown field `colectCycle`",
        line(&text, "colectCycle")
    );
    assert!(shown.starts_with(&expected), "{shown}");
}

#[test]
fn profile_error_displays_as_file_line_path_message() {
    let e = ProfileError {
        file: "a.yaml".into(),
        line: Some(7),
        path: "spec.protocol".into(),
        message: "bad".into(),
    };
    assert_eq!(e.to_string(), "a.yaml:7: spec.protocol: bad");
    let e = ProfileError {
        file: "a.yaml".into(),
        line: None,
        path: String::new(),
        message: "unreadable".into(),
    };
    assert_eq!(e.to_string(), "a.yaml: unreadable");
}

#[test]
fn profile_rejects_duration_without_unit() {
    let text = with_model_and_device(&DEVICE.replace("collectCycle: 1s", "collectCycle: 5"));
    let errors = one_file(&text);
    assert_error(
        &errors,
        &text,
        "spec.properties[0].collectCycle",
        "collectCycle: 5",
        "has no unit",
    );
    assert!(errors[0].message.contains("\"5s\""), "{}", errors[0]);
}

#[test]
fn profile_rejects_duration_that_is_not_a_duration() {
    let text = with_model_and_device(&DEVICE.replace("collectCycle: 1s", "collectCycle: soon"));
    let errors = one_file(&text);
    assert_error(
        &errors,
        &text,
        "spec.properties[0].collectCycle",
        "collectCycle: soon",
        "invalid duration",
    );
}

#[test]
fn profile_reports_all_errors_at_once() {
    let model = MODEL.replace("minimum: 5, maximum: 35", "minimum: 50, maximum: 35");
    let device = DEVICE
        .replace("ip: 192.0.2.10, ", "")
        .replace("slaveID: 1}", "slaveID: 250}")
        .replace("limit: 2, dataType: float32", "limit: 1, dataType: float32");
    let text = format!("{model}---\n{device}");
    let errors = one_file(&text);
    let paths: Vec<&str> = errors.iter().map(|e| e.path.as_str()).collect();
    assert_eq!(
        paths,
        [
            "spec.properties[2].minimum",
            "spec.protocol.modbus",
            "spec.protocol.modbus.slaveID",
            "spec.properties[0].visitors.modbus.limit"
        ],
        "{errors:#?}"
    );
    assert_error(
        &errors,
        &text,
        "spec.properties[2].minimum",
        "name: setpoint",
        "greater than maximum",
    );
    assert_error(
        &errors,
        &text,
        "spec.protocol.modbus",
        "communicateMode: TCP",
        "needs `ip`",
    );
    assert_error(
        &errors,
        &text,
        "spec.properties[0].visitors.modbus.limit",
        "dataType: float32",
        "needs limit 2",
    );
}

#[test]
fn profile_reports_type_errors_of_every_document() {
    let text = format!(
        "{}---\n{}",
        MODEL.replace("accessMode: ReadOnly, unit: V", "accessMode: Sometimes"),
        DEVICE.replace("slaveID: 1", "slaveID: one")
    );
    let errors = one_file(&text);
    assert_eq!(errors.len(), 2, "{errors:#?}");
    assert_eq!(errors[0].path, "spec.properties[0].accessMode");
    assert_eq!(errors[0].line, Some(line(&text, "Sometimes")));
    assert_eq!(errors[1].path, "spec.protocol.modbus.slaveID");
    assert_eq!(errors[1].line, Some(line(&text, "slaveID: one")));
}

#[test]
fn profile_lines_count_from_the_file_start_in_later_documents() {
    let second = DEVICE
        .replace("meter-7", "meter-8")
        .replace("offset: 0,", "offset: 65535,");
    let text = format!("{MODEL}---\n{DEVICE}---\n# comment\n\n{second}");
    let errors = one_file(&text);
    assert_eq!(errors.len(), 1, "{errors:#?}");
    assert_eq!(errors[0].path, "spec.properties[0].visitors.modbus.offset");
    assert_eq!(errors[0].line, Some(line(&text, "offset: 65535")));
    assert!(errors[0].line.unwrap() > 30);
}

#[test]
fn profile_syntax_error_names_its_line() {
    let text = format!("{MODEL}---\nkind: Device\nmetadata: {{name: [x}}\n");
    let errors = one_file(&text);
    assert_eq!(errors.len(), 1, "{errors:#?}");
    assert_eq!(errors[0].line, Some(line(&text, "name: [x")));
}

#[test]
fn profile_rejects_unknown_kind() {
    let text = MODEL.replace("kind: DeviceModel", "kind: DeviceProfile");
    let errors = one_file(&text);
    assert_error(
        &errors,
        &text,
        "kind",
        "DeviceProfile",
        "unknown kind `DeviceProfile`",
    );
}

#[test]
fn profile_rejects_unknown_api_version() {
    let text = MODEL.replace("edgetwin/v1", "edgetwin/v2");
    let errors = one_file(&text);
    assert_error(&errors, &text, "apiVersion", "edgetwin/v2", "edgetwin/v1");
}

#[test]
fn profile_rejects_invalid_device_name() {
    let text = with_model_and_device(&DEVICE.replace("name: meter-7", "name: meter/7"));
    let errors = one_file(&text);
    assert_error(
        &errors,
        &text,
        "metadata.name",
        "meter/7",
        "invalid device id",
    );
}

#[test]
fn profile_rejects_duplicate_model_property_names() {
    let text = MODEL.replace("name: relay", "name: voltage");
    let errors = one_file(&text);
    assert_error(
        &errors,
        &text,
        "spec.properties[1].name",
        "name: voltage, type: boolean",
        "duplicate property \"voltage\"",
    );
}

#[test]
fn profile_rejects_minimum_above_maximum() {
    let text = MODEL.replace("minimum: 5, maximum: 35", "minimum: 36, maximum: 35");
    let errors = one_file(&text);
    assert_error(
        &errors,
        &text,
        "spec.properties[2].minimum",
        "name: setpoint",
        "minimum 36 is greater than maximum 35",
    );
}

#[test]
fn profile_rejects_bounds_on_non_numeric_property() {
    let text = MODEL.replace(
        "type: boolean, accessMode: ReadWrite}",
        "type: boolean, accessMode: ReadWrite, maximum: 1}",
    );
    let errors = one_file(&text);
    assert_error(
        &errors,
        &text,
        "spec.properties[1].maximum",
        "name: relay",
        "only to int and float",
    );
}

#[test]
fn profile_rejects_default_of_wrong_type() {
    let text = MODEL.replace(
        "minimum: 5, maximum: 35}",
        "minimum: 5, maximum: 35, default: warm}",
    );
    let errors = one_file(&text);
    assert_error(
        &errors,
        &text,
        "spec.properties[2].default",
        "default: warm",
        "is not a float value",
    );
}

#[test]
fn profile_rejects_default_outside_bounds() {
    let text = MODEL.replace(
        "minimum: 5, maximum: 35}",
        "minimum: 5, maximum: 35, default: 40}",
    );
    let errors = one_file(&text);
    assert_error(
        &errors,
        &text,
        "spec.properties[2].default",
        "default: 40",
        "outside [5, 35]",
    );
}

#[test]
fn profile_accepts_any_protocol_and_passes_its_sections_through_as_written() {
    let text = "\
apiVersion: edgetwin/v1
kind: DeviceModel
metadata: {name: zb-sensor}
spec:
  protocol: zigbee
  properties:
    - {name: temperature, type: float, accessMode: ReadOnly}
---
apiVersion: edgetwin/v1
kind: Device
metadata: {name: zb-1}
spec:
  deviceModelRef: zb-sensor
  protocol:
    zigbee: {ieee: \"00:12:4b:00:1c:a1:b2:c3\", channel: 15}
  properties:
    - name: temperature
      collectCycle: 10s
      visitors:
        zigbee: {cluster: 1026, attribute: 0, scale: 0.01}
";
    assert_eq!(one_file(text), vec![]);
    let docs = parse_str("p.yaml", text).unwrap();
    let set = validate(&[("p.yaml".into(), docs)], &BTreeMap::new()).unwrap();
    let device = &set.devices[&"zb-1".parse().unwrap()];
    assert_eq!(device.protocol_name(), "zigbee");
    let json: serde_json::Value = serde_json::from_slice(
        &edgetwin_profile::resolved_json(device, &set.models["zb-sensor"]).unwrap(),
    )
    .unwrap();
    assert_eq!(
        json["device"]["spec"]["protocol"],
        serde_json::json!({"zigbee": {"ieee": "00:12:4b:00:1c:a1:b2:c3", "channel": 15}})
    );
    assert_eq!(
        json["device"]["spec"]["properties"][0]["visitors"],
        serde_json::json!({"zigbee": {"cluster": 1026, "attribute": 0, "scale": 0.01}})
    );
}

#[test]
fn profile_rejects_another_protocol_section_that_is_not_a_mapping_or_not_a_name() {
    let text = with_model_and_device(&DEVICE.replace(
        "modbus: {communicateMode: TCP, ip: 192.0.2.10, port: 502, slaveID: 1}",
        "zigbee: 15",
    ));
    let errors = one_file(&text);
    assert!(
        errors
            .iter()
            .any(|e| e.message.contains("must be a mapping")),
        "{errors:#?}"
    );
    let text = with_model_and_device(&DEVICE.replace(
        "modbus: {communicateMode: TCP, ip: 192.0.2.10, port: 502, slaveID: 1}",
        "\"zig bee\": {}",
    ));
    let errors = one_file(&text);
    assert!(
        errors
            .iter()
            .any(|e| e.message.contains("cannot name a protocol")),
        "{errors:#?}"
    );
}

#[test]
fn profile_rejects_unknown_device_model_ref() {
    let text = DEVICE.to_string();
    let errors = one_file(&text);
    assert_error(
        &errors,
        &text,
        "spec.deviceModelRef",
        "deviceModelRef",
        "unknown device model \"power-meter\"",
    );
}

#[test]
fn profile_accepts_model_ref_to_an_already_known_model() {
    let model_docs = parse_str("m.yaml", MODEL).unwrap();
    let known: BTreeMap<String, DeviceModel> = model_docs
        .into_iter()
        .filter_map(|d| match d {
            Document::DeviceModel(m) => Some((m.name().to_owned(), m)),
            Document::Device(_) => None,
        })
        .collect();
    let docs = parse_str("d.yaml", DEVICE).unwrap();
    let set = validate(&[("d.yaml".into(), docs)], &known).unwrap();
    let resolved = set.resolve(&"meter-7".parse().unwrap()).unwrap();
    assert_eq!(resolved.model.name(), "power-meter");
}

#[test]
fn profile_finds_models_in_other_files_of_the_load_set() {
    assert_eq!(errors(&[("d.yaml", DEVICE), ("m.yaml", MODEL)]), vec![]);
}

#[test]
fn profile_rejects_protocol_section_not_matching_the_model() {
    let device = DEVICE.replace(
        "modbus: {communicateMode: TCP, ip: 192.0.2.10, port: 502, slaveID: 1}",
        "opcua: {url: \"opc.tcp://192.0.2.10:4840\"}",
    );
    let text = with_model_and_device(&device);
    let errors = one_file(&text);
    assert_error(
        &errors,
        &text,
        "spec.protocol.opcua",
        "opc.tcp",
        "is for protocol \"modbus\"",
    );
    assert_error(
        &errors,
        &text,
        "spec.properties[0].visitors.modbus",
        "register: HoldingRegister",
        "device speaks opcua",
    );
}

#[test]
fn profile_rejects_two_protocol_sections() {
    let device = DEVICE.replace(
        "slaveID: 1}",
        "slaveID: 1}\n    opcua: {url: \"opc.tcp://x:4840\"}",
    );
    let text = with_model_and_device(&device);
    let errors = one_file(&text);
    assert_eq!(errors.len(), 1, "{errors:#?}");
    assert_eq!(errors[0].path, "spec.protocol");
    assert!(
        errors[0].message.contains("only one protocol section"),
        "{}",
        errors[0]
    );
}

#[test]
fn profile_rejects_device_property_missing_from_the_model() {
    let text = with_model_and_device(&DEVICE.replace("- name: voltage", "- name: volts"));
    let errors = one_file(&text);
    assert_error(
        &errors,
        &text,
        "spec.properties[0].name",
        "name: volts",
        "has no property \"volts\" (it has: voltage, relay, setpoint)",
    );
}

#[test]
fn profile_rejects_visitor_for_another_protocol() {
    let device = DEVICE.replace(
        "modbus: {register: HoldingRegister, offset: 0, limit: 2, dataType: float32, isRegisterSwap: true}",
        "ble: {characteristicUUID: \"2A6E\", dataType: int16}",
    );
    let text = with_model_and_device(&device);
    let errors = one_file(&text);
    assert_error(
        &errors,
        &text,
        "spec.properties[0].visitors.ble",
        "characteristicUUID",
        "the visitor is for ble",
    );
}

#[test]
fn profile_rejects_a_visitor_of_another_protocol_than_the_device() {
    let device = DEVICE.replace(
        "modbus: {register: HoldingRegister",
        "zigbee: {register: HoldingRegister",
    );
    let text = with_model_and_device(&device);
    let errors = one_file(&text);
    assert_eq!(errors.len(), 1, "{errors:#?}");
    assert_eq!(errors[0].path, "spec.properties[0].visitors.zigbee");
    assert!(
        errors[0]
            .message
            .contains("the visitor is for zigbee, but the device speaks modbus"),
        "{}",
        errors[0]
    );
}

#[test]
fn profile_rejects_modbus_limit_that_does_not_fit_the_data_type() {
    let text = with_model_and_device(
        &DEVICE.replace("limit: 2, dataType: float32", "limit: 4, dataType: float32"),
    );
    let errors = one_file(&text);
    assert_error(
        &errors,
        &text,
        "spec.properties[0].visitors.modbus.limit",
        "limit: 4",
        "float32 needs limit 2",
    );
}

#[test]
fn profile_rejects_modbus_limit_above_one_read() {
    let text = with_model_and_device(&DEVICE.replace(
        "limit: 2, dataType: float32",
        "limit: 126, dataType: string",
    ));
    let errors = one_file(&text);
    assert!(
        errors
            .iter()
            .any(|e| e.path == "spec.properties[0].visitors.modbus.limit"
                && e.message.contains("125 registers")),
        "{errors:#?}"
    );
}

#[test]
fn profile_rejects_modbus_non_bool_on_coils() {
    let text = with_model_and_device(
        &DEVICE.replace("register: HoldingRegister", "register: CoilRegister"),
    );
    let errors = one_file(&text);
    assert!(
        errors
            .iter()
            .any(|e| e.path == "spec.properties[0].visitors.modbus.dataType"
                && e.message.contains("must be bool")),
        "{errors:#?}"
    );
}

#[test]
fn profile_reads_a_coil_into_an_int_property_as_0_or_1_but_not_into_a_float() {
    let model = MODEL.replace(
        "- {name: voltage, type: float, accessMode: ReadOnly, unit: V}",
        "- {name: voltage, type: int, accessMode: ReadOnly}",
    );
    let device = DEVICE.replace(
        "modbus: {register: HoldingRegister, offset: 0, limit: 2, dataType: float32, isRegisterSwap: true}",
        "modbus: {register: CoilRegister, offset: 0, dataType: bool}",
    );
    assert_eq!(one_file(&format!("{model}---\n{device}")), vec![]);
    let errors = one_file(&with_model_and_device(&device));
    assert!(
        errors
            .iter()
            .any(|e| e.message.contains("cannot hold the model's float")),
        "{errors:#?}"
    );
}

#[test]
fn profile_rejects_writable_property_on_input_register() {
    let device = DEVICE
        .replace("- name: voltage", "- name: setpoint")
        .replace("register: HoldingRegister", "register: InputRegister");
    let text = with_model_and_device(&device);
    let errors = one_file(&text);
    assert_error(
        &errors,
        &text,
        "spec.properties[0].visitors.modbus.register",
        "InputRegister",
        "is ReadWrite but InputRegister is read-only",
    );
}

#[test]
fn profile_rejects_modbus_tcp_without_ip() {
    let text = with_model_and_device(&DEVICE.replace("ip: 192.0.2.10, ", ""));
    let errors = one_file(&text);
    assert_error(
        &errors,
        &text,
        "spec.protocol.modbus",
        "communicateMode: TCP",
        "communicateMode TCP needs `ip`",
    );
}

#[test]
fn profile_rejects_modbus_rtu_without_serial_name() {
    let text = with_model_and_device(&DEVICE.replace(
        "communicateMode: TCP, ip: 192.0.2.10, port: 502,",
        "communicateMode: RTU, baudRate: 19200,",
    ));
    let errors = one_file(&text);
    assert_error(
        &errors,
        &text,
        "spec.protocol.modbus",
        "communicateMode: RTU",
        "communicateMode RTU needs `serialName`",
    );
}

#[test]
fn profile_accepts_modbus_rtu_on_a_by_id_path() {
    let device = DEVICE.replace(
        "modbus: {communicateMode: TCP, ip: 192.0.2.10, port: 502, slaveID: 1}",
        "modbus:\n      communicateMode: RTU\n      serialName: /dev/serial/by-id/usb-FTDI_FT232R_USB_UART_A50285BI-if00-port0\n      parity: even\n      stopBits: 2\n      slaveID: 3",
    );
    assert_eq!(one_file(&with_model_and_device(&device)), vec![]);
}

#[test]
fn profile_rejects_modbus_data_bits_outside_five_to_eight() {
    let text = with_model_and_device(&DEVICE.replace("slaveID: 1}", "slaveID: 1, dataBits: 9}"));
    let errors = one_file(&text);
    assert_eq!(errors.len(), 1, "{errors:#?}");
    assert_eq!(errors[0].path, "spec.protocol.modbus.dataBits");
    assert!(
        errors[0]
            .message
            .contains("dataBits must be one of 5, 6, 7, 8, not 9"),
        "{}",
        errors[0]
    );
}

const BLE_MODEL: &str = "\
apiVersion: edgetwin/v1
kind: DeviceModel
metadata: {name: ess}
spec:
  protocol: ble
  properties:
    - {name: temperature, type: float, accessMode: ReadOnly}
---
apiVersion: edgetwin/v1
kind: Device
metadata: {name: room-1}
spec:
  deviceModelRef: ess
  protocol:
    ble: {macAddress: \"C4:7C:8D:6A:12:3F\"}
  properties:
    - name: temperature
      visitors:
        ble: {characteristicUUID: \"2A6E\", dataType: int16, scale: 0.01}
";

#[test]
fn profile_accepts_ble_found_by_address() {
    assert_eq!(one_file(BLE_MODEL), vec![]);
}

#[test]
fn profile_rejects_ble_with_both_address_and_name() {
    let text = BLE_MODEL.replace(
        "{macAddress: \"C4:7C:8D:6A:12:3F\"}",
        "{macAddress: \"C4:7C:8D:6A:12:3F\", name: ESS}",
    );
    let errors = one_file(&text);
    assert_error(
        &errors,
        &text,
        "spec.protocol.ble.name",
        "name: ESS",
        "either `macAddress` or `name`",
    );
}

#[test]
fn profile_rejects_ble_with_neither_address_nor_name() {
    let text = BLE_MODEL.replace("{macAddress: \"C4:7C:8D:6A:12:3F\"}", "{}");
    let errors = one_file(&text);
    assert_error(
        &errors,
        &text,
        "spec.protocol.ble",
        "ble: {}",
        "give `macAddress` or `name`",
    );
}

const SERIAL_MODEL: &str = "\
apiVersion: edgetwin/v1
kind: DeviceModel
metadata: {name: analyser}
spec:
  protocol: serial
  properties:
    - {name: co2, type: int, accessMode: ReadOnly}
---
apiVersion: edgetwin/v1
kind: Device
metadata: {name: lab-1}
spec:
  deviceModelRef: analyser
  protocol:
    serial: {port: /dev/ttyS0}
  properties:
    - name: co2
      collectCycle: 5s
      visitors:
        serial: {request: \"READ CO2\\r\\n\", pattern: '^CO2=(\\d+)$'}
";

#[test]
fn profile_accepts_serial_request_with_one_capture_group() {
    assert_eq!(one_file(SERIAL_MODEL), vec![]);
}

#[test]
fn profile_rejects_serial_pattern_that_does_not_compile() {
    let text = SERIAL_MODEL.replace("'^CO2=(\\d+)$'", "'^CO2=(\\d+$'");
    let errors = one_file(&text);
    assert_error(
        &errors,
        &text,
        "spec.properties[0].visitors.serial.pattern",
        "pattern:",
        "does not compile",
    );
}

#[test]
fn profile_rejects_serial_pattern_without_capture_group() {
    let text = SERIAL_MODEL.replace("'^CO2=(\\d+)$'", "'^CO2=\\d+$'");
    let errors = one_file(&text);
    assert_error(
        &errors,
        &text,
        "spec.properties[0].visitors.serial.pattern",
        "pattern:",
        "needs a capture group",
    );
}

#[test]
fn profile_rejects_serial_pattern_with_unnamed_groups_only() {
    let text = SERIAL_MODEL.replace("'^CO2=(\\d+)$'", "'^(CO2)=(\\d+)$'");
    let errors = one_file(&text);
    assert_error(
        &errors,
        &text,
        "spec.properties[0].visitors.serial.pattern",
        "pattern:",
        "(?P<value>...)",
    );
}

#[test]
fn profile_rejects_duplicate_device_names_across_files() {
    let errors = errors(&[
        ("a.yaml", &with_model_and_device(DEVICE)),
        ("b.yaml", DEVICE),
    ]);
    assert_eq!(errors.len(), 1, "{errors:#?}");
    assert_eq!(errors[0].file, "b.yaml");
    assert_eq!(errors[0].path, "metadata.name");
    assert_eq!(errors[0].line, Some(line(DEVICE, "meter-7")));
    let first_line = line(&with_model_and_device(DEVICE), "meter-7");
    assert!(
        errors[0]
            .message
            .contains(&format!("already defined at a.yaml:{first_line}")),
        "{}",
        errors[0]
    );
}

#[test]
fn profile_rejects_duplicate_model_names_across_files() {
    let errors = errors(&[("a.yaml", MODEL), ("b.yaml", MODEL)]);
    assert_eq!(errors.len(), 1, "{errors:#?}");
    assert_eq!(
        (errors[0].file.as_str(), errors[0].path.as_str()),
        ("b.yaml", "metadata.name")
    );
    assert!(
        errors[0].message.contains("already defined at a.yaml:3"),
        "{}",
        errors[0]
    );
}

#[test]
fn load_dir_keeps_good_files_when_one_is_bad() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("a-model.yaml"), MODEL).unwrap();
    std::fs::write(dir.path().join("b-good.yaml"), DEVICE).unwrap();
    let bad = DEVICE
        .replace("meter-7", "meter-9")
        .replace("slaveID: 1", "slaveID: 0");
    std::fs::write(dir.path().join("c-bad.yml"), &bad).unwrap();
    std::fs::write(dir.path().join("notes.txt"), "not a profile").unwrap();
    let (set, errors) = load_dir(dir.path());
    assert_eq!(errors.len(), 1, "{errors:#?}");
    assert!(errors[0].file.ends_with("c-bad.yml"));
    assert_eq!(errors[0].path, "spec.protocol.modbus.slaveID");
    assert_eq!(errors[0].line, Some(line(&bad, "slaveID")));
    assert_eq!(set.models.keys().collect::<Vec<_>>(), ["power-meter"]);
    assert_eq!(
        set.devices.keys().map(|d| d.as_str()).collect::<Vec<_>>(),
        ["meter-7"]
    );
}

#[test]
fn load_dir_rejects_devices_whose_model_file_is_bad() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("model.yaml"),
        MODEL.replace("minimum: 5", "minimum: 50"),
    )
    .unwrap();
    std::fs::write(dir.path().join("device.yaml"), DEVICE).unwrap();
    let (set, errors) = load_dir(dir.path());
    assert_eq!(set, ProfileSet::default());
    assert_eq!(errors.len(), 2, "{errors:#?}");
    assert!(errors[1].file.ends_with("device.yaml"));
    assert!(
        errors[1].message.contains("model.yaml, which has errors"),
        "{}",
        errors[1]
    );
}

#[test]
fn resolved_device_round_trips_through_json_with_defaults_written_out() {
    let docs = parse_str("p.yaml", &with_model_and_device(DEVICE)).unwrap();
    let set = validate(&[("p.yaml".into(), docs)], &BTreeMap::new()).unwrap();
    let resolved = set.resolve(&"meter-7".parse().unwrap()).unwrap();
    assert_eq!(resolved.protocol().as_str(), "modbus");
    let json = serde_json::to_value(&resolved).unwrap();
    assert_eq!(
        json["device"]["spec"]["protocol"]["modbus"]["timeout"],
        "1s"
    );
    assert_eq!(json["device"]["spec"]["protocol"]["modbus"]["slaveID"], 1);
    assert_eq!(
        json["device"]["spec"]["properties"][0]["visitors"]["modbus"]["scale"],
        1.0
    );
    assert_eq!(json["model"]["spec"]["properties"][2]["maximum"], 35.0);
    let back: ResolvedDevice = serde_json::from_value(json).unwrap();
    assert_eq!(back, resolved);
}

#[test]
fn model_helpers_expose_type_access_and_bounds() {
    let docs = parse_str("m.yaml", MODEL).unwrap();
    let Document::DeviceModel(m) = &docs[0] else {
        panic!("not a model")
    };
    let p = m.property("setpoint").unwrap();
    assert_eq!(p.property_type(), edgetwin_contract::PropertyType::Float);
    assert!(p.is_writable());
    assert_eq!((p.minimum(), p.maximum()), (Some(5.0), Some(35.0)));
    assert!(m.property("nope").is_none());
}

#[test]
fn profile_rejects_a_silence_timeout_on_a_polled_value() {
    let text = with_model_and_device(
        &DEVICE.replace("      telemetry: true\n", "      silenceTimeout: 30s\n"),
    );
    assert_error(
        &one_file(&text),
        &text,
        "spec.properties[0].silenceTimeout",
        "silenceTimeout",
        "only to a value the device pushes",
    );
}

/// The one device of `text` (which must be valid).
fn the_device(text: &str) -> edgetwin_profile::Device {
    let docs = parse_str("p.yaml", text).unwrap();
    let set = validate(&[("p.yaml".into(), docs)], &BTreeMap::new()).unwrap();
    edgetwin_profile::Device::clone(&set.devices.into_values().next().unwrap())
}

#[test]
fn profile_stale_bound_is_two_of_the_shortest_report_intervals_plus_slack() {
    use std::time::Duration;
    // voltage: reportOnChange at collectCycle 1s, so its heartbeat (10 × 1s) is its interval.
    let d = the_device(&with_model_and_device(DEVICE));
    assert_eq!(d.spec.stale_after(), Some(Duration::from_secs(21)));
    // Every reading reported: the collect cycle is the interval.
    let d = the_device(&with_model_and_device(
        &DEVICE.replace("      reportOnChange: {deadband: 0.5}\n", ""),
    ));
    assert_eq!(d.spec.stale_after(), Some(Duration::from_secs(3)));
}

#[test]
fn profile_reports_every_type_error_of_a_document_at_once_in_words() {
    let device = DEVICE
        .replace("slaveID: 1}", "slaveID: one}")
        .replace("offset: 0,", "offset: zero,")
        .replace("dataType: float32", "dataType: float33")
        .replace("telemetry: true", "telemetry: true\n      colectCycle: 2s");
    let text = with_model_and_device(&device);
    let errors = one_file(&text);
    assert_eq!(errors.len(), 4, "{errors:#?}");
    assert_error(
        &errors,
        &text,
        "spec.protocol.modbus.slaveID",
        "slaveID: one",
        "expected an integer between 1 and 247, got the text \"one\"",
    );
    assert_error(
        &errors,
        &text,
        "spec.properties[0].visitors.modbus.offset",
        "offset: zero",
        "expected an integer between 0 and 65535",
    );
    assert_error(
        &errors,
        &text,
        "spec.properties[0].visitors.modbus.dataType",
        "float33",
        "expected one of `bool`, `int16`",
    );
    assert_error(
        &errors,
        &text,
        "spec.properties[0].colectCycle",
        "colectCycle",
        "unknown field `colectCycle`",
    );
    // No Rust words.
    for e in &errors {
        for rust in ["u8", "u16", "map,", "variant"] {
            assert!(!e.message.contains(rust), "{e}");
        }
    }
}
