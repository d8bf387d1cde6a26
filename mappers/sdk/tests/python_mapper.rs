//! The Python example mapper (`examples/python-mapper/`) follows the topic contract: it passes
//! the same compliance suite as Rust mappers, against the real node, under a protocol of its own
//! (`pysim`) that the node knows nothing of, and runs beside a serial mapper on one node.
#![allow(clippy::unwrap_used)]

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use common::{eventually, memory_mapper_bin, profile, status};
use edgetwin_mapper_sdk::compliance::{run_compliance, ComplianceSpec, Expect};
use edgetwin_testkit::{python, require, MapperProcess, Node};
use serde_json::json;

fn example_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/python-mapper")
}

#[test]
fn python_example_mapper_passes_the_compliance_suite() {
    require(&python());
    let dir = example_dir();
    let profile = std::fs::read_to_string(dir.join("devices.yaml")).unwrap();
    run_compliance(ComplianceSpec {
        protocol: "pysim".into(),
        mapper_bin: python().into(),
        mapper_pre_args: vec![dir.join("mapper.py").display().to_string()],
        profile_yaml: profile,
        device: "pysim-1".into(),
        read: (
            "counter".into(),
            // Its device section (`pysim: {seed: 100}`) reached it as written.
            Expect::Matches(Box::new(|v| v.as_i64().is_some_and(|n| n > 100))),
        ),
        write: Some(("setpoint".into(), json!(21.5))),
        ..ComplianceSpec::default()
    });
}

/// The Python mapper as a process; killed on drop.
struct PythonMapper(Child);

impl Drop for PythonMapper {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn python_example_mapper_runs_beside_the_serial_mapper_on_one_node() {
    require(&python());
    let dir = example_dir();
    let pysim = std::fs::read_to_string(dir.join("devices.yaml")).unwrap();
    // The memory mapper serves the `serial` protocol; the Python one its own `pysim`.
    let node = Node::start_with_profile(&format!("{}---\n{pysim}", profile(&["sim-1"])));
    let _serial = MapperProcess::start(&node, memory_mapper_bin().to_str().unwrap(), &[]);
    let _pysim = PythonMapper(
        Command::new(python())
            .arg(dir.join("mapper.py"))
            .args(["--broker", &format!("127.0.0.1:{}", node.port)])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    for device in ["sim-1", "pysim-1"] {
        eventually(&format!("{device} online"), || {
            status(&node, device).as_deref() == Some("online")
        });
    }
    for protocol in ["serial", "pysim"] {
        let s = node
            .retained(&format!("mappers/{protocol}/status"))
            .unwrap();
        assert_eq!(s["state"], "online", "{protocol}: {s}");
    }
    node.twin_until("sim-1", |t| t["reported"]["humidity"] == 40.0);
    node.twin_until("pysim-1", |t| {
        t["reported"]["counter"].as_i64().is_some_and(|n| n > 100)
    });
    // Each mapper gets only its own devices.
    assert!(node.retained("mappers/pysim/devices/sim-1").is_none());
    assert!(node.retained("mappers/serial/devices/pysim-1").is_none());
}
