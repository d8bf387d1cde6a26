//! The compliance test every mapper runs from its own `tests/`: the real `edgetwin` node (through
//! `edgetwin-testkit`) and the real mapper binary, checked only through the topic contract.
//!
//! ```no_run
//! use edgetwin_mapper_sdk::compliance::{run_compliance, ComplianceSpec, Expect};
//! # let yaml = String::new();
//! // start the device simulator first, then:
//! run_compliance(ComplianceSpec {
//!     protocol: "modbus".into(),
//!     mapper_bin: "target/debug/edgetwin-mapper-modbus".into(), // env!("CARGO_BIN_EXE_...") in tests/
//!     profile_yaml: yaml,
//!     device: "meter-1".into(),
//!     read: ("voltage".into(), Expect::Value(serde_json::json!(230.0))),
//!     write: Some(("setpoint".into(), serde_json::json!(21.5))),
//!     ..ComplianceSpec::default()
//! });
//! ```
//!
//! Checks, in order (each failure panics with the mapper's log):
//! 1. `mappers/{protocol}/status` is retained `online`;
//! 2. `dt/{device}/status` is retained `online`;
//! 3. the twin's reported `read.0` satisfies `read.1`;
//! 4. a desired write of `write` is reported back and leaves no delta (desired == reported);
//! 5. SIGTERM makes the mapper exit with 0 within 5 s, and both statuses become `offline`.

use std::fmt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use edgetwin_testkit::{signal, Node};
use serde_json::Value;

/// What the reported value of the read check must be.
pub enum Expect {
    /// Exactly this JSON value.
    Value(Value),
    /// Any value the closure accepts.
    Matches(Box<dyn Fn(&Value) -> bool + Send>),
}

impl Expect {
    fn accepts(&self, v: &Value) -> bool {
        match self {
            Expect::Value(want) => want == v,
            Expect::Matches(f) => f(v),
        }
    }
}

impl fmt::Debug for Expect {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Expect::Value(v) => write!(f, "{v}"),
            Expect::Matches(_) => f.write_str("<closure>"),
        }
    }
}

/// What to run and what to expect.
#[derive(Debug)]
pub struct ComplianceSpec {
    /// The protocol the mapper serves (`modbus`, `opcua`, `ble`, `serial`).
    pub protocol: String,
    /// The mapper binary (in a mapper's tests: `env!("CARGO_BIN_EXE_<name>")`).
    pub mapper_bin: PathBuf,
    /// Arguments before `--broker` (e.g. the script when `mapper_bin` is an interpreter).
    pub mapper_pre_args: Vec<String>,
    /// Extra arguments after `--broker 127.0.0.1:{port}`.
    pub mapper_args: Vec<String>,
    /// Extra environment variables for the mapper.
    pub mapper_env: Vec<(String, String)>,
    /// Profile YAML (models and devices) for the node's devices folder; the device must point
    /// at the simulator the caller started.
    pub profile_yaml: String,
    /// The device to check.
    pub device: String,
    /// A property and the value it must be reported with.
    pub read: (String, Expect),
    /// A writable property and a value to write (skipped when `None`).
    pub write: Option<(String, Value)>,
    /// How long each step may take. Default 15 s.
    pub step_timeout: Duration,
}

impl Default for ComplianceSpec {
    fn default() -> Self {
        ComplianceSpec {
            protocol: String::new(),
            mapper_bin: PathBuf::new(),
            mapper_pre_args: Vec::new(),
            mapper_args: Vec::new(),
            mapper_env: Vec::new(),
            profile_yaml: String::new(),
            device: String::new(),
            read: (String::new(), Expect::Matches(Box::new(|_| true))),
            write: None,
            step_timeout: Duration::from_secs(15),
        }
    }
}

/// A mapper process, killed when dropped.
struct Mapper {
    child: Option<Child>,
    log: PathBuf,
}

impl Mapper {
    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Mapper {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Starts a node with the spec's profile and the mapper binary, runs every check; panics with
/// the node's and the mapper's logs on the first failure.
pub fn run_compliance(spec: ComplianceSpec) {
    let node = Node::start_with_profile(&spec.profile_yaml);
    let mut mapper = spawn_mapper(&spec, &node);
    let ctx = Ctx {
        node: &node,
        spec: &spec,
    };
    let fail = |what: &str, mapper: &Mapper| -> ! {
        panic!(
            "compliance: {what}\n--- mapper log ---\n{}\n--- node log ---\n{}",
            mapper.log(),
            node.log()
        )
    };

    let mapper_status = format!("mappers/{}/status", spec.protocol);
    if !ctx.until_retained(&mapper_status, |v| state_is(v, "online")) {
        fail(
            &format!("{mapper_status} never became retained online"),
            &mapper,
        );
    }
    let device_status = format!("dt/{}/status", spec.device);
    if !ctx.until_retained(&device_status, |v| state_is(v, "online")) {
        fail(
            &format!("{device_status} never became retained online"),
            &mapper,
        );
    }
    let (prop, expect) = &spec.read;
    if !ctx.until_twin(|t| t["reported"].get(prop).is_some_and(|v| expect.accepts(v))) {
        fail(
            &format!(
                "reported {prop:?} never matched {expect:?}; twin: {}",
                ctx.twin_text()
            ),
            &mapper,
        );
    }
    if let Some((prop, value)) = &spec.write {
        node.pub_(
            &format!("dt/{}/desired", spec.device),
            &serde_json::json!({ prop.as_str(): value }).to_string(),
        );
        let converged = ctx.until_twin(|t| {
            t["desired"].get(prop) == Some(value) && t["reported"].get(prop) == Some(value)
        });
        if !converged {
            fail(
                &format!(
                    "desired {prop:?} = {value} was never reported back; twin: {}",
                    ctx.twin_text()
                ),
                &mapper,
            );
        }
    }

    let Some(mut child) = mapper.child.take() else {
        fail("mapper not running", &mapper)
    };
    signal(child.id(), "TERM");
    let deadline = Instant::now() + Duration::from_secs(5);
    let status = loop {
        match child.try_wait() {
            Ok(Some(s)) => break s,
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                fail("mapper did not exit within 5 s of SIGTERM", &mapper);
            }
        }
    };
    if !status.success() {
        fail(
            &format!("mapper exited with {status} after SIGTERM"),
            &mapper,
        );
    }
    if !ctx.until_retained(&mapper_status, |v| state_is(v, "offline")) {
        fail(
            &format!("{mapper_status} not retained offline after SIGTERM"),
            &mapper,
        );
    }
    if !ctx.until_retained(&device_status, |v| state_is(v, "offline")) {
        fail(
            &format!("{device_status} not retained offline after SIGTERM"),
            &mapper,
        );
    }
}

fn spawn_mapper(spec: &ComplianceSpec, node: &Node) -> Mapper {
    let log = node.dir.path().join("mapper.log");
    let file = std::fs::File::create(&log)
        .unwrap_or_else(|e| panic!("compliance: cannot create {}: {e}", log.display()));
    let child = Command::new(&spec.mapper_bin)
        .args(&spec.mapper_pre_args)
        .arg("--broker")
        .arg(format!("127.0.0.1:{}", node.port))
        .args(&spec.mapper_args)
        .envs(spec.mapper_env.iter().map(|(k, v)| (k, v)))
        .env("EDGETWIN_LOG", "info,edgetwin_mapper_sdk=debug")
        .stdout(Stdio::null())
        .stderr(file)
        .spawn()
        .unwrap_or_else(|e| {
            panic!(
                "compliance: cannot start mapper {}: {e}",
                spec.mapper_bin.display()
            )
        });
    Mapper {
        child: Some(child),
        log,
    }
}

fn state_is(v: Option<&Value>, state: &str) -> bool {
    v.is_some_and(|v| v["state"] == state)
}

struct Ctx<'a> {
    node: &'a Node,
    spec: &'a ComplianceSpec,
}

impl Ctx<'_> {
    fn until_retained(&self, topic: &str, pred: impl Fn(Option<&Value>) -> bool) -> bool {
        let deadline = Instant::now() + self.spec.step_timeout;
        loop {
            if pred(self.node.retained(topic).as_ref()) {
                return true;
            }
            if Instant::now() > deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn twin(&self) -> Option<Value> {
        self.node.retained(&format!("dt/{}/twin", self.spec.device))
    }

    fn twin_text(&self) -> String {
        self.twin().map(|t| t.to_string()).unwrap_or_default()
    }

    fn until_twin(&self, pred: impl Fn(&Value) -> bool) -> bool {
        let deadline = Instant::now() + self.spec.step_timeout;
        loop {
            if self.twin().is_some_and(|t| pred(&t)) {
                return true;
            }
            if Instant::now() > deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}
