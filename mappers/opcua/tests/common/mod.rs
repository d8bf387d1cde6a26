//! Shared test helpers: the asyncua simulator (`tests/sim/opcua_sim.py`) and resolved devices
//! built from profile YAML through the real loader.
#![allow(clippy::unwrap_used, dead_code, missing_docs)]

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use edgetwin_profile::ResolvedDevice;
use edgetwin_testkit::ScriptPeer;
use serde_json::Value;

/// The simulator script; its docstring lists the address space.
pub const SIM: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/sim/opcua_sim.py");

/// A running asyncua server; killed on drop.
pub struct Sim {
    peer: ScriptPeer,
    pub port: u16,
    args: Vec<String>,
}

impl Sim {
    /// Security None only, anonymous, on 127.0.0.1:`port`.
    pub fn start(port: u16) -> Sim {
        Sim::spawn(port, vec![])
    }

    /// Also Basic256Sha256 Sign / SignAndEncrypt (server certificate kept in `dir`), and only
    /// `user` (`name:password`) when given.
    pub fn secure(port: u16, dir: &Path, user: Option<&str>) -> Sim {
        let mut args = vec!["--secure".to_string(), dir.display().to_string()];
        if let Some(u) = user {
            args.extend(["--user".to_string(), u.to_string()]);
        }
        Sim::spawn(port, args)
    }

    /// `opc.tcp://127.0.0.1:{port}`.
    pub fn url(&self) -> String {
        format!("opc.tcp://127.0.0.1:{}", self.port)
    }

    fn spawn(port: u16, extra: Vec<String>) -> Sim {
        let mut args = vec!["serve".to_string(), port.to_string()];
        args.extend(extra);
        let peer = ScriptPeer::start(
            SIM,
            &args,
            "asyncua (pip install asyncua==2.1.0)",
            Duration::from_secs(30),
        );
        Sim { peer, port, args }
    }

    /// Client writes the server has accepted so far (`{"write": node, "type", "value"}`).
    pub fn writes(&self) -> Vec<Value> {
        self.peer.json_lines()
    }

    /// Waits until a client write of `value` to `node` has arrived; returns it.
    pub fn wait_write_of(&self, node: &str, value: &Value) -> Value {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(w) = self
                .writes()
                .into_iter()
                .find(|w| w["write"] == node && &w["value"] == value)
            {
                return w;
            }
            assert!(
                Instant::now() < deadline,
                "no write of {value} to {node}; writes: {:?}",
                self.writes()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Stops the server (SIGKILL).
    pub fn stop(&mut self) {
        self.peer.stop();
    }

    /// Starts the same server again on the same port.
    pub fn restart(&mut self) {
        self.stop();
        let extra = self.args[2..].to_vec();
        *self = Sim::spawn(self.port, extra);
    }
}

/// Writes a client certificate (`client-cert.der`) and key (`client-key.pem`) into `dir`, with
/// the mapper's application URI; returns their paths.
pub fn client_cert(dir: &Path) -> (String, String) {
    edgetwin_testkit::require(&edgetwin_testkit::python());
    let out = Command::new(edgetwin_testkit::python())
        .arg(SIM)
        .arg("client-cert")
        .arg(dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "client-cert: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    (
        dir.join("client-cert.der").display().to_string(),
        dir.join("client-key.pem").display().to_string(),
    )
}

/// A model property line and the matching device property.
pub struct Prop<'a> {
    pub name: &'a str,
    pub ty: &'a str,
    pub access: &'a str,
    /// The `visitors.opcua` flow mapping.
    pub visitor: String,
}

/// A read-only property.
pub fn prop<'a>(name: &'a str, ty: &'a str, visitor: &str) -> Prop<'a> {
    Prop {
        name,
        ty,
        access: "ReadOnly",
        visitor: visitor.to_string(),
    }
}

/// A read-write property.
pub fn rw<'a>(name: &'a str, ty: &'a str, visitor: &str) -> Prop<'a> {
    Prop {
        name,
        ty,
        access: "ReadWrite",
        visitor: visitor.to_string(),
    }
}

/// `{nodeID: "<node>"}` with extra fields (`poll: true`, `samplingInterval: 100ms`, ...).
pub fn node(id: &str, extra: &str) -> String {
    let id = id.replace('\\', "\\\\").replace('"', "\\\"");
    if extra.is_empty() {
        format!("{{nodeID: \"{id}\"}}")
    } else {
        format!("{{nodeID: \"{id}\", {extra}}}")
    }
}

/// Profile YAML with one model and one device using `protocol` (the flow mapping under
/// `protocol.opcua`), each property read every `cycle`.
pub fn profile_yaml(
    model: &str,
    device: &str,
    protocol: &str,
    cycle: &str,
    props: &[Prop<'_>],
) -> String {
    let mut y = format!(
        "apiVersion: edgetwin/v1\nkind: DeviceModel\nmetadata: {{name: {model}}}\nspec:\n  protocol: opcua\n  properties:\n"
    );
    for p in props {
        y.push_str(&format!(
            "    - {{name: {}, type: {}, accessMode: {}}}\n",
            p.name, p.ty, p.access
        ));
    }
    y.push_str(&format!(
        "---\napiVersion: edgetwin/v1\nkind: Device\nmetadata: {{name: {device}}}\nspec:\n  deviceModelRef: {model}\n  protocol:\n    opcua: {protocol}\n  properties:\n"
    ));
    for p in props {
        y.push_str(&format!(
            "    - name: {}\n      collectCycle: {cycle}\n      visitors:\n        opcua: {}\n",
            p.name, p.visitor
        ));
    }
    y
}

/// `{url: ..., timeout: 2s}` for the simulator.
pub fn anonymous(sim: &Sim) -> String {
    format!("{{url: \"{}\", timeout: 2s}}", sim.url())
}

/// The resolved device of a profile, through the real loader and validation.
pub fn resolve(yaml: &str, device: &str) -> ResolvedDevice {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("p.yaml"), yaml).unwrap();
    let (set, errors) = edgetwin_profile::load_dir(dir.path());
    assert!(errors.is_empty(), "profile errors: {errors:?}\n{yaml}");
    let id = edgetwin_contract::DeviceId::new(device).unwrap();
    set.resolve(&id).unwrap()
}

/// A driver whose PKI folder lives in `dir` (trusts the simulator's certificate on first use).
pub fn driver(dir: &Path) -> edgetwin_mapper_opcua::OpcuaDriver {
    edgetwin_mapper_opcua::OpcuaDriver::new(edgetwin_mapper_opcua::ClientOptions {
        pki_dir: dir.join("pki"),
        trust_server_certs: true,
    })
}
