//! The Python example mapper (`examples/python-mapper/`) follows the topic contract: it passes
//! the same compliance suite as Rust mappers, against the real node.
#![allow(clippy::unwrap_used)]

use std::path::Path;

use edgetwin_mapper_sdk::compliance::{run_compliance, ComplianceSpec, Expect};
use edgetwin_testkit::{python, require};
use serde_json::json;

#[test]
fn python_example_mapper_passes_the_compliance_suite() {
    require(&python());
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/python-mapper");
    let profile = std::fs::read_to_string(dir.join("devices.yaml")).unwrap();
    run_compliance(ComplianceSpec {
        protocol: "serial".into(),
        mapper_bin: python().into(),
        mapper_pre_args: vec![dir.join("mapper.py").display().to_string()],
        profile_yaml: profile,
        device: "pysim-1".into(),
        read: (
            "counter".into(),
            Expect::Matches(Box::new(|v| v.as_i64().is_some_and(|n| n > 0))),
        ),
        write: Some(("setpoint".into(), json!(21.5))),
        ..ComplianceSpec::default()
    });
}
