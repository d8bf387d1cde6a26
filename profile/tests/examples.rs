//! Every example profile shipped in `examples/profiles` is valid.
#![allow(clippy::unwrap_used, missing_docs)]

use std::path::Path;

#[test]
fn examples_profiles_are_valid() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/profiles");
    let (set, errors) = edgetwin_profile::load_dir(&dir);
    let shown: Vec<String> = errors.iter().map(ToString::to_string).collect();
    assert!(
        errors.is_empty(),
        "example profiles have errors:\n{}",
        shown.join("\n")
    );
    let models: Vec<&str> = set.models.keys().map(String::as_str).collect();
    assert_eq!(
        models,
        ["co2-analyser", "ess-sensor", "power-meter", "tank-plc"]
    );
    let devices: Vec<&str> = set.devices.keys().map(|d| d.as_str()).collect();
    assert_eq!(
        devices,
        [
            "co2-lab-1",
            "cold-room-3",
            "meter-12",
            "meter-7",
            "tank-station-1"
        ]
    );
    let relay = set.devices[&"meter-7".parse().unwrap()]
        .property("relay")
        .unwrap();
    let edgetwin_profile::PropertyVisitor::Modbus(visitor) = &relay.visitors else {
        panic!("not modbus")
    };
    assert_eq!(
        visitor.limit,
        Some(1),
        "validated devices carry their default limit"
    );
    for resolved in set.resolved() {
        assert_eq!(
            resolved.protocol().as_str(),
            resolved.device.protocol_name()
        );
    }
    for file in std::fs::read_dir(&dir).unwrap() {
        let path = file.unwrap().path();
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(
            text.starts_with("# yaml-language-server: $schema=../../schemas/profile.schema.json\n"),
            "{} lacks the schema modeline",
            path.display()
        );
    }
}
