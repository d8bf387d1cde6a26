//! The real mapper binary between the real node and the pymodbus simulator, observed only through
//! the topic contract: reported values, desired writes, offline/online, exceptions, device apply,
//! and the SDK's compliance suite.
#![allow(clippy::unwrap_used)]

mod common;

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::*;
use edgetwin_mapper_sdk::compliance::{run_compliance, ComplianceSpec, Expect};
use edgetwin_testkit::{free_port, MapperProcess, Node};
use serde_json::{json, Value};

const MAPPER: &str = env!("CARGO_BIN_EXE_edgetwin-mapper-modbus");

/// The mapper binary against a node.
struct Mapper;

impl Mapper {
    fn start(node: &Node) -> MapperProcess {
        MapperProcess::start(
            node,
            MAPPER,
            &[(
                "EDGETWIN_LOG",
                "info,edgetwin_mapper_modbus=debug,edgetwin_mapper_sdk=debug".as_ref(),
            )],
        )
    }
}

fn meter_props<'a>() -> Vec<Prop<'a>> {
    vec![
        prop(
            "voltage",
            "float",
            "{register: HoldingRegister, offset: 2, dataType: float32, isRegisterSwap: true}",
        ),
        prop(
            "count",
            "int",
            "{register: HoldingRegister, offset: 12, dataType: uint32, isRegisterSwap: true}",
        ),
        prop(
            "delta",
            "int",
            "{register: HoldingRegister, offset: 8, dataType: int16}",
        ),
        prop(
            "serial",
            "string",
            "{register: HoldingRegister, offset: 26, limit: 4, dataType: string}",
        ),
        prop(
            "outside",
            "float",
            "{register: HoldingRegister, offset: 32, dataType: int16, scale: 0.1, valueOffset: 10}",
        ),
        prop(
            "running",
            "boolean",
            "{register: CoilRegister, offset: 0, dataType: bool}",
        ),
        rw(
            "setpoint",
            "float",
            "{register: HoldingRegister, offset: 30, dataType: uint16, scale: 0.1}",
        ),
    ]
}

/// A mosquitto_sub on one topic, known to be subscribed before `new` returns.
struct Sub {
    child: Child,
    rx: std::sync::mpsc::Receiver<String>,
}

impl Sub {
    fn new(node: &Node, topic: &str) -> Sub {
        edgetwin_testkit::require("mosquitto_sub");
        let sync = "test/modbus/sync";
        let mut child = Command::new("mosquitto_sub")
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &node.port.to_string(),
                "-v",
                "-t",
                topic,
                "-t",
                sync,
            ])
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let out = std::io::BufReader::new(child.stdout.take().unwrap());
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            use std::io::BufRead;
            for line in out.lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        // Publish on the sync topic until it comes back: then the subscription is in place.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            node.pub_(sync, "{}");
            if let Ok(l) = rx.recv_timeout(Duration::from_millis(200)) {
                if l.starts_with(sync) {
                    break;
                }
            }
            assert!(
                std::time::Instant::now() < deadline,
                "mosquitto_sub never subscribed"
            );
        }
        Sub { child, rx }
    }

    /// The next JSON payload on the topic.
    fn next(&self, limit: Duration) -> Value {
        let deadline = std::time::Instant::now() + limit;
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            let line = self
                .rx
                .recv_timeout(left)
                .expect("no message on the topic in time");
            if let Some((_, p)) = line
                .split_once(' ')
                .filter(|(t, _)| !t.starts_with("test/"))
            {
                return serde_json::from_str(p).unwrap();
            }
        }
    }
}

impl Drop for Sub {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The pymodbus meter on a free port and a node serving `meter-1` on it, read every `cycle`.
fn meter_node(cycle: &str) -> (Sim, Node) {
    let port = free_port();
    let sim = Sim::tcp(port);
    let node = Node::start_with_profile(&profile_yaml(
        "meter",
        "meter-1",
        &tcp(port, 1),
        cycle,
        &meter_props(),
    ));
    (sim, node)
}

fn reported(t: &Value, name: &str) -> Value {
    t["reported"][name].clone()
}

fn status(node: &Node, device: &str, state: &str, limit: Duration) {
    node.retained_until(&format!("dt/{device}/status"), limit, |v| {
        v.is_some_and(|v| v["state"] == state)
    });
}

#[test]
fn modbus_mapper_reports_register_values_with_types_scaling_and_orders() {
    let (_sim, node) = meter_node("300ms");
    let mut mapper = Mapper::start(&node);
    let t = node.twin_until("meter-1", |t| {
        t["reported"]["setpoint"].is_number() && t["reported"]["running"].is_boolean()
    });
    assert_eq!(reported(&t, "voltage"), json!(230.5));
    assert_eq!(reported(&t, "count"), json!(3_000_000_000u64));
    assert_eq!(reported(&t, "delta"), json!(-1234));
    assert_eq!(reported(&t, "serial"), json!("EDGE-1"));
    assert!(
        (reported(&t, "outside").as_f64().unwrap() + 30.0).abs() < 1e-9,
        "{t}"
    );
    assert_eq!(reported(&t, "running"), json!(true));
    assert!(
        (reported(&t, "setpoint").as_f64().unwrap() - 21.5).abs() < 1e-9,
        "{t}"
    );
    status(&node, "meter-1", "online", Duration::from_secs(5));
    mapper.assert_running();
}

#[test]
fn modbus_mapper_desired_setpoint_reaches_the_register_is_reported_and_delta_clears() {
    let (sim, node) = meter_node("300ms");
    let _mapper = Mapper::start(&node);
    node.twin_until("meter-1", |t| t["reported"]["setpoint"].is_number());
    node.pub_("dt/meter-1/desired", r#"{"setpoint": 25.5}"#);
    assert_eq!(sim.wait_write(1, 30), vec![255]);
    let t = node.twin_until("meter-1", |t| {
        t["reported"]["setpoint"]
            .as_f64()
            .is_some_and(|v| (v - 25.5).abs() < 1e-9)
    });
    assert_eq!(t["desired"]["setpoint"], json!(25.5));
    // No delta left: every desired property is reported with the same value.
    for (k, v) in t["desired"].as_object().unwrap() {
        assert_eq!(&t["reported"][k], v, "delta left for {k}: {t}");
    }
}

#[test]
fn modbus_mapper_an_integer_desired_on_a_float_property_settles_with_one_write() {
    let (sim, node) = meter_node("200ms");
    let _mapper = Mapper::start(&node);
    node.twin_until("meter-1", |t| t["reported"]["setpoint"].is_number());
    // `25`, not `25.0`: the register reads back 25.0 (scale 0.1), which meets it.
    node.pub_("dt/meter-1/desired", r#"{"setpoint": 25}"#);
    assert_eq!(sim.wait_write(1, 30), vec![250]);
    node.twin_until("meter-1", |t| t["reported"]["setpoint"] == json!(25.0));
    // Watch ten more collect cycles: before, every report resent the delta (`25` is not `25.0`
    // as JSON text) and the register was written again each time.
    let setpoint_writes = || {
        sim.writes()
            .into_iter()
            .filter(|w| w["address"] == 30)
            .collect::<Vec<_>>()
    };
    let watch_until = std::time::Instant::now() + Duration::from_secs(2);
    while std::time::Instant::now() < watch_until && setpoint_writes().len() == 1 {
        std::thread::sleep(Duration::from_millis(50));
    }
    let writes = setpoint_writes();
    assert_eq!(
        writes.len(),
        1,
        "the setpoint register was written again: {writes:?}"
    );
}

#[test]
fn modbus_mapper_killed_leaves_its_devices_offline_not_online() {
    let (_sim, node) = meter_node("300ms");
    let mut mapper = Mapper::start(&node);
    node.twin_until("meter-1", |t| t["status"]["state"] == "online");
    mapper.kill9();
    // The mapper's will reaches the node, which marks what it served offline (within the
    // broker's noticing the closed connection: at once for a killed process on this host).
    let t = node.twin_until("meter-1", |t| t["status"]["state"] == "offline");
    assert_eq!(t["status"]["message"], "mapper modbus is offline", "{t}");
    // A new mapper brings it back.
    let _again = Mapper::start(&node);
    node.twin_until("meter-1", |t| t["status"]["state"] == "online");
}

#[test]
fn modbus_mapper_stopped_simulator_goes_offline_and_recovers_without_restart() {
    let port = free_port();
    let mut sim = Sim::tcp(port);
    let cycle = Duration::from_millis(500);
    let props = vec![prop(
        "delta",
        "int",
        "{register: HoldingRegister, offset: 8, dataType: int16}",
    )];
    let node = Node::start_with_profile(&profile_yaml(
        "meter",
        "meter-1",
        &tcp(port, 1),
        "500ms",
        &props,
    ));
    let mut mapper = Mapper::start(&node);
    status(&node, "meter-1", "online", Duration::from_secs(10));

    sim.stop();
    // Two poll periods, plus the time mosquitto_sub needs to look.
    status(
        &node,
        "meter-1",
        "offline",
        2 * cycle + Duration::from_secs(1),
    );

    let _sim = Sim::tcp(port);
    status(&node, "meter-1", "online", Duration::from_secs(15));
    mapper.assert_running();
    node.twin_until("meter-1", |t| t["reported"]["delta"] == json!(-1234));
}

#[test]
fn modbus_mapper_exception_is_reported_on_the_error_topic_and_the_mapper_keeps_running() {
    let port = free_port();
    let _sim = Sim::tcp(port);
    let props = vec![
        prop(
            "delta",
            "int",
            "{register: HoldingRegister, offset: 8, dataType: int16}",
        ),
        prop(
            "missing",
            "int",
            "{register: HoldingRegister, offset: 70, dataType: uint16}",
        ),
    ];
    let node = Node::start_with_profile(&profile_yaml(
        "meter",
        "meter-1",
        &tcp(port, 1),
        "300ms",
        &props,
    ));
    // Errors are not retained: subscribe before the mapper starts.
    let sub = Sub::new(&node, "dt/meter-1/error");
    let mut mapper = Mapper::start(&node);
    let e = sub.next(Duration::from_secs(15));
    let text = e["message"].as_str().unwrap_or_default();
    assert!(text.contains("missing") || text.contains("70"), "{e}");
    assert!(text.contains("0x02"), "the exception is named: {e}");
    let t = node.twin_until("meter-1", |t| t["reported"]["delta"] == json!(-1234));
    assert!(t["reported"].get("missing").is_none(), "{t}");
    status(&node, "meter-1", "online", Duration::from_secs(5));
    // The refusal stays in the twin, with when it began, for as long as it lasts: after ten
    // more collect cycles it is still there, unchanged.
    let t = node.twin_until("meter-1", |t| t["status"]["errors"]["missing"].is_object());
    let first = t["status"]["errors"]["missing"].clone();
    assert_eq!(first["code"], "device_refused", "{t}");
    assert!(first["message"].as_str().unwrap().contains("0x02"), "{t}");
    std::thread::sleep(Duration::from_secs(3));
    let later = node.twin("meter-1");
    assert_eq!(later["status"]["errors"]["missing"], first, "{later}");
    assert_eq!(later["status"]["state"], "online", "{later}");
    // ... and in `edgetwin device list`.
    let out = node.cli(&["device", "list"]);
    let list = String::from_utf8_lossy(&out.stdout);
    let row = list
        .lines()
        .find(|l| l.contains("meter-1"))
        .unwrap_or_default();
    assert!(
        row.contains("online") && row.contains("missing: device_refused"),
        "{list}"
    );
    mapper.assert_running();
}

/// The meter with `limit`, a setpoint the device clamps to 100 (register 48 of the simulator).
fn clamping_node() -> (Sim, Node) {
    let port = free_port();
    let sim = Sim::tcp(port);
    let mut props = meter_props();
    props.push(rw(
        "limit",
        "int",
        "{register: HoldingRegister, offset: 48, dataType: uint16}",
    ));
    let node = Node::start_with_profile(&profile_yaml(
        "meter",
        "meter-1",
        &tcp(port, 1),
        "200ms",
        &props,
    ));
    (sim, node)
}

fn writes_to(sim: &Sim, address: u64) -> usize {
    sim.writes()
        .into_iter()
        .filter(|w| w["address"] == address)
        .count()
}

#[test]
fn modbus_mapper_a_value_the_device_does_not_hold_is_written_three_times_then_left_with_a_lasting_error(
) {
    let (sim, node) = clamping_node();
    let mut mapper = Mapper::start(&node);
    node.twin_until("meter-1", |t| t["reported"]["limit"] == json!(0));
    node.pub_("dt/meter-1/desired", r#"{"limit": 150}"#);
    let t = node.twin_until("meter-1", |t| t["status"]["errors"]["limit"].is_object());
    let e = &t["status"]["errors"]["limit"];
    assert_eq!(e["code"], "write_not_held", "{t}");
    assert_eq!(e["value"], json!(150), "{t}");
    assert_eq!(t["reported"]["limit"], json!(100), "{t}");
    assert_eq!(sim.wait_nth_write(1, 48, 3), vec![150]);
    // Neither the running mapper nor a restarted one writes it again.
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(writes_to(&sim, 48), 3, "{:?}", sim.writes());
    mapper.kill9();
    let _again = Mapper::start(&node);
    status(&node, "meter-1", "online", Duration::from_secs(15));
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(
        writes_to(&sim, 48),
        3,
        "written again after a restart: {:?}",
        sim.writes()
    );
    let t = node.twin("meter-1");
    assert_eq!(
        t["status"]["errors"]["limit"]["code"], "write_not_held",
        "{t}"
    );
    // A value it holds is written once and clears the error.
    node.pub_("dt/meter-1/desired", r#"{"limit": 80}"#);
    let t = node.twin_until("meter-1", |t| t["reported"]["limit"] == json!(80));
    assert!(t["status"].get("errors").is_none(), "{t}");
    assert_eq!(writes_to(&sim, 48), 4);
}

#[test]
fn modbus_mapper_a_value_finer_than_the_register_resolution_is_refused_without_a_write() {
    let (sim, node) = meter_node("200ms");
    let _mapper = Mapper::start(&node);
    node.twin_until("meter-1", |t| t["reported"]["setpoint"].is_number());
    // setpoint is a uint16 at scale 0.1: it can hold 21.5 or 21.6, never 21.55.
    node.pub_("dt/meter-1/desired", r#"{"setpoint": 21.55}"#);
    let t = node.twin_until("meter-1", |t| t["status"]["errors"]["setpoint"].is_object());
    let e = &t["status"]["errors"]["setpoint"];
    assert_eq!(e["code"], "device_config", "{t}");
    let message = e["message"].as_str().unwrap();
    assert!(
        message.contains("21.55") && message.contains("resolution 0.1"),
        "{t}"
    );
    assert_eq!(writes_to(&sim, 30), 0, "{:?}", sim.writes());
}

#[test]
fn modbus_mapper_picks_up_devices_added_and_removed_with_device_apply() {
    let port = free_port();
    let _sim = Sim::tcp(port);
    let props = vec![prop(
        "unit",
        "int",
        "{register: HoldingRegister, offset: 33, dataType: uint16}",
    )];
    let node = Node::start_with_profile(&profile_yaml(
        "meter",
        "meter-1",
        &tcp(port, 1),
        "300ms",
        &props,
    ));
    let mut mapper = Mapper::start(&node);
    node.twin_until("meter-1", |t| t["reported"]["unit"] == json!(111));

    let file = node.dir.path().join("extra.yaml");
    std::fs::write(
        &file,
        device_yaml("meter", "meter-2", &tcp(port, 2), "300ms", &props),
    )
    .unwrap();
    let out = node.cli(&["device", "apply", file.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    node.twin_until("meter-2", |t| t["reported"]["unit"] == json!(222));

    // The same file now names another device instead: meter-2 is removed, meter-3 added.
    std::fs::write(
        &file,
        device_yaml("meter", "meter-3", &tcp(port, 2), "300ms", &props),
    )
    .unwrap();
    let out = node.cli(&["device", "apply", file.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    node.twin_until("meter-3", |t| t["reported"]["unit"] == json!(222));
    node.retained_until("dt/meter-2/status", Duration::from_secs(10), |v| {
        v.is_none()
    });
    mapper.assert_running();
}

#[test]
fn modbus_mapper_passes_the_sdk_compliance_suite() {
    let port = free_port();
    let _sim = Sim::tcp(port);
    run_compliance(ComplianceSpec {
        protocol: "modbus".into(),
        mapper_bin: MAPPER.into(),
        profile_yaml: profile_yaml("meter", "meter-1", &tcp(port, 1), "300ms", &meter_props()),
        device: "meter-1".into(),
        read: ("voltage".into(), Expect::Value(json!(230.5))),
        write: Some(("setpoint".into(), json!(22.5))),
        ..ComplianceSpec::default()
    });
}

/// A credentials file with an engineer (`eng`/`eng-pw`) and the modbus mapper
/// (`modbus-mapper`/`mb-pw`), and the mapper's password file: (folder, credentials, password).
fn users() -> (tempfile::TempDir, std::path::PathBuf, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let creds = dir.path().join("users.yaml");
    edgetwin_testkit::user_add(&creds, "eng", "engineer", None, "eng-pw");
    edgetwin_testkit::user_add(&creds, "modbus-mapper", "mapper", Some("modbus"), "mb-pw");
    let pw = dir.path().join("mapper.pw");
    std::fs::write(&pw, "mb-pw\n").unwrap();
    (dir, creds, pw)
}

#[test]
fn modbus_mapper_logs_in_as_a_mapper_user_on_a_node_with_users() {
    use edgetwin_testkit::NodeSpec;
    let (_creds_dir, creds, pw) = users();
    // A thermostat device (modbus at 127.0.0.1:5020, where nothing answers): the mapper can only
    // report it offline, and only if the node let it in as the modbus mapper.
    let mut node = NodeSpec {
        devices: vec!["gm-1".into()],
        extra_yaml: format!("gate:\n  credentials_file: {}\n", creds.display()),
        ..NodeSpec::default()
    }
    .start();
    node.login = Some(("eng".into(), "eng-pw".into()));

    // Anonymous: refused, so it never reports anything.
    let anonymous = MapperProcess::start(&node, MAPPER, &[]);
    node.log_until(Duration::from_secs(10), |l| {
        l.contains("CONNECT refused") && l.contains("no_credentials")
    });
    assert_eq!(node.retained("mappers/modbus/status"), None);
    drop(anonymous);

    let mut mapper = MapperProcess::start(
        &node,
        MAPPER,
        &[
            ("EDGETWIN_USERNAME", "modbus-mapper".as_ref()),
            ("EDGETWIN_PASSWORD_FILE", pw.as_os_str()),
        ],
    );
    // The anonymous attempts just before have put this address into the gate's failed-login
    // back-off, so the first login can be held back several seconds (run alone the whole test
    // took 5.8-10.6 s; in a full CI run this wait once ran out at 10 s).
    node.retained_until("mappers/modbus/status", Duration::from_secs(30), |v| {
        v.is_some_and(|v| v["state"] == "online")
    });
    status(&node, "gm-1", "offline", Duration::from_secs(15));
    mapper.assert_running();
}

#[test]
fn modbus_mapper_reaches_a_tls_only_listener_with_cafile() {
    use edgetwin_testkit::{NodeSpec, Pki};
    let pki = Pki::generate();
    let (_creds_dir, creds, pw) = users();
    let tls = free_port();
    let mut node = NodeSpec {
        devices: vec!["gt-1".into()],
        extra_yaml: format!(
            "gate:\n  listeners:\n    - listen: 127.0.0.1:{tls}\n      tls: {{cert_file: {}, key_file: {}}}\n  credentials_file: {}\n",
            pki.path("server.pem"),
            pki.path("server.key"),
            creds.display()
        ),
        ..NodeSpec::default()
    }
    .start();
    node.login = Some(("eng".into(), "eng-pw".into()));
    let ca = pki.path("ca.pem");
    let mut mapper = MapperProcess::start_at(
        &node,
        &format!("localhost:{tls}"),
        MAPPER,
        &[
            ("EDGETWIN_USERNAME", "modbus-mapper".as_ref()),
            ("EDGETWIN_PASSWORD_FILE", pw.as_os_str()),
            ("EDGETWIN_CAFILE", ca.as_ref()),
        ],
    );
    node.retained_until("mappers/modbus/status", Duration::from_secs(10), |v| {
        v.is_some_and(|v| v["state"] == "online")
    });
    status(&node, "gt-1", "offline", Duration::from_secs(15));
    mapper.assert_running();
}

#[test]
fn modbus_mapper_serves_kubeedge_sample_devices_converted_with_device_convert() {
    // KubeEdge's own v1beta1 Modbus RTU sample (profile/tests/data/kubeedge, source named in
    // its README), converted by the CLI for this node.
    let data =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../profile/tests/data/kubeedge");
    let out = std::process::Command::new(edgetwin_testkit::edgetwin_bin())
        .args(["device", "convert", "--node", "edge-node"])
        .arg(data.join("modbus-model.yaml"))
        .arg(data.join("modbus-instance.yaml"))
        .output()
        .unwrap();
    let notes = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{notes}");
    assert!(
        notes.contains("pushMethod dropped")
            && notes.contains("converted 1 model(s) and 1 device(s)"),
        "{notes}"
    );
    let yaml = String::from_utf8_lossy(&out.stdout).to_string();
    // Its serialPort `'1'` names KubeEdge's test port: point it at this test's serial line.
    let pty = edgetwin_testkit::PtyPair::new();
    let sim = Sim::rtu(&pty.b);
    assert_eq!(yaml.matches("serialName: '1'").count(), 1, "{yaml}");
    let yaml = yaml.replace("serialName: '1'", &format!("serialName: {}", pty.a));
    // The sample reads every 10 s; read it faster here.
    let yaml = yaml.replace("collectCycle: 10s", "collectCycle: 300ms");
    let node = Node::start_with_profile(&yaml);
    let _mapper = Mapper::start(&node);
    // `temperature` is an int read from coil 2 (as KubeEdge's mapper reads it): 1.
    node.twin_until("modbus-instance-01", |t| {
        t["reported"]["temperature"] == json!(1)
    });
    node.pub_("dt/modbus-instance-01/desired", r#"{"temperature": 0}"#);
    let w = sim.wait_write(1, 2);
    assert_eq!(w, vec![0], "{:?}", sim.writes());
    node.twin_until("modbus-instance-01", |t| {
        t["reported"]["temperature"] == json!(0)
    });
}

#[test]
fn modbus_discover_finds_the_simulators_units_and_registers_as_a_draft_that_serves_them() {
    // The simulator serves units 1 and 2 with holding registers 0-49 (50-99 invalid) and input
    // registers 0-1; unit 3 is not there.
    let port = free_port();
    let sim = Sim::tcp(port);
    let node = Node::start(&[]);
    let mut mapper = Mapper::start(&node);
    node.retained_until("mappers/modbus/status", Duration::from_secs(15), |v| {
        v.is_some_and(|v| v["state"] == "online")
    });
    let dir = tempfile::tempdir().unwrap();
    let draft = dir.path().join("draft.yaml");
    let out = node.cli(&[
        "discover",
        "modbus",
        "--tcp",
        &format!("127.0.0.1:{port}"),
        "--units",
        "1-3",
        "--holding",
        "0-59",
        "--input",
        "0-9",
        "-o",
        draft.to_str().unwrap(),
    ]);
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{said}\n{}", mapper.log());
    assert!(
        said.contains("unit 1: 52 register") && said.contains("unit 2: 52 register"),
        "{said}"
    );
    assert!(!said.contains("unit 3"), "{said}");
    let yaml = std::fs::read_to_string(&draft).unwrap();
    assert!(
        yaml.contains("name: hr49") && !yaml.contains("name: hr50"),
        "{yaml}"
    );
    assert!(
        yaml.contains("name: ir1") && !yaml.contains("name: ir2"),
        "{yaml}"
    );
    assert!(yaml.contains("# read 54321"), "{yaml}");
    // No write reached the device: a scan only reads.
    assert!(sim.writes().is_empty(), "{:?}", sim.writes());
    let out = node.cli(&["device", "validate", draft.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Applied, the draft's devices are served with the simulator's values.
    let out = node.cli(&["device", "apply", draft.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    node.twin_until("discovered-u1", |t| t["reported"]["hr9"] == json!(54321));
    node.twin_until("discovered-u2", |t| t["reported"]["hr33"] == json!(222));
    mapper.assert_running();
}

#[test]
fn modbus_discover_without_a_mapper_says_so_at_once() {
    let node = Node::start(&[]);
    let out = node.cli(&[
        "discover",
        "modbus",
        "--tcp",
        "127.0.0.1:1",
        "--timeout-ms",
        "2000",
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("mappers/modbus/status"), "{err}");
}
