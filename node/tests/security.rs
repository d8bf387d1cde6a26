//! The node behind its MQTT gate: users made with `edgetwin user add`, third-party clients
//! (mosquitto_pub/sub) on the gate's port, the broker itself only on loopback.
#![allow(clippy::unwrap_used)]

use edgetwin_testkit::*;

struct Secured {
    node: Node,
    gate: u16,
}

fn secured(devices: &[&str]) -> Secured {
    secured_with(devices, "")
}

/// Like [`secured`], with `limits` lines (indented under `gate.limits`).
fn secured_with(devices: &[&str], limits: &str) -> Secured {
    let creds_dir = tempfile::tempdir().unwrap().keep();
    let creds = creds_dir.join("users.yaml");
    user_add(&creds, "eng", "engineer", None, "eng-pw");
    user_add(&creds, "modbus-mapper", "mapper", Some("modbus"), "mb-pw");
    user_add(&creds, "opcua-mapper", "mapper", Some("opcua"), "ua-pw");
    let gate = free_port();
    let mut extra = format!(
        "gate:\n  listeners:\n    - listen: 127.0.0.1:{gate}\n  credentials_file: {}\n",
        creds.display()
    );
    if !limits.is_empty() {
        extra.push_str(&format!("  limits:\n{limits}"));
    }
    let mut node = Node::start_with_config(devices, &extra);
    // With a credentials file, nobody is anonymous: the test reads twins as the engineer.
    node.login = Some(("eng".into(), "eng-pw".into()));
    Secured { node, gate }
}

#[test]
fn security_wrong_password_is_refused_and_the_right_one_reaches_the_twin() {
    let s = secured(&["s-1"]);
    let o = publish_as(
        s.gate,
        "eng",
        "wrong",
        "dt/s-1/desired",
        r#"{"setpoint": 20}"#,
        false,
    );
    assert!(!o.status.success(), "wrong password accepted");
    let o = publish_as(
        s.gate,
        "eng",
        "eng-pw",
        "dt/s-1/desired",
        r#"{"setpoint": 20}"#,
        false,
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    s.node
        .twin_until("s-1", |t| t["desired"]["setpoint"] == 20.0);
    assert!(s
        .node
        .metrics()
        .contains("edgetwin_gate_auth_failures_total{reason=\"bad_password\"} 1"));
}

#[test]
fn security_mapper_cannot_publish_desired_or_another_protocols_device() {
    let s = secured(&["s-2"]);
    // Denied: the modbus mapper writing desired, the opcua mapper reporting a modbus device.
    publish_as(
        s.gate,
        "modbus-mapper",
        "mb-pw",
        "dt/s-2/desired",
        r#"{"setpoint": 30}"#,
        false,
    );
    publish_as(
        s.gate,
        "opcua-mapper",
        "ua-pw",
        "dt/s-2/reported",
        r#"{"temperature": 99}"#,
        false,
    );
    // Allowed: its own device's reading.
    let o = publish_as(
        s.gate,
        "modbus-mapper",
        "mb-pw",
        "dt/s-2/reported",
        r#"{"temperature": 21}"#,
        false,
    );
    assert!(o.status.success());
    let t = s
        .node
        .twin_until("s-2", |t| t["reported"]["temperature"] == 21.0);
    assert!(t["desired"].get("setpoint").is_none(), "{t}");
    let m = s.node.metrics();
    assert!(
        m.contains("edgetwin_gate_denied_total{role=\"mapper\",kind=\"publish\"} 2"),
        "{m}"
    );
}

#[test]
fn security_engineer_cannot_publish_reported_and_v5_shares_the_port() {
    let s = secured(&["s-3"]);
    publish_as(
        s.gate,
        "eng",
        "eng-pw",
        "dt/s-3/reported",
        r#"{"temperature": 5}"#,
        true,
    );
    let o = publish_as(
        s.gate,
        "eng",
        "eng-pw",
        "dt/s-3/desired",
        r#"{"mode": "eco"}"#,
        true,
    );
    assert!(
        o.status.success(),
        "v5 on the gate port: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let t = s.node.twin_until("s-3", |t| t["desired"]["mode"] == "eco");
    assert!(t["reported"].get("temperature").is_none(), "{t}");
}

/// Reads until the peer closes the connection or `limit` passes; whether it closed.
fn closed_within(s: &mut std::net::TcpStream, limit: std::time::Duration) -> bool {
    use std::io::Read;
    s.set_read_timeout(Some(limit)).unwrap();
    let mut buf = [0u8; 512];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return true,
            Err(_) => return false,
        }
    }
}

#[test]
fn security_slow_and_surplus_http_connections_are_closed_and_health_still_answers() {
    use std::io::Write;
    use std::net::TcpStream;
    use std::time::{Duration, Instant};
    let node = NodeSpec {
        http_keys: vec!["header_timeout_ms: 600".into(), "max_connections: 4".into()],
        ..NodeSpec::default()
    }
    .start();
    // Four clients that never finish their headers (slowloris) and one that sends nothing.
    let started = Instant::now();
    let mut slow: Vec<TcpStream> = (0..3)
        .map(|_| {
            let mut s = TcpStream::connect(("127.0.0.1", node.http_port)).unwrap();
            s.write_all(b"GET /readyz HTTP/1.1\r\nHost: x\r\nX-Slow: ")
                .unwrap();
            s
        })
        .collect();
    slow.push(TcpStream::connect(("127.0.0.1", node.http_port)).unwrap());
    // The limit is taken: the next connection is closed at once.
    let mut surplus = wait_for(Duration::from_secs(5), || {
        let mut s = TcpStream::connect(("127.0.0.1", node.http_port)).ok()?;
        closed_within(&mut s, Duration::from_millis(200)).then_some(s)
    })
    .expect("a connection past http.max_connections is closed at once");
    let _ = surplus.write_all(b"GET /healthz HTTP/1.1\r\n\r\n");
    // The slow ones are closed by the header timeout, long before any client gives up.
    for s in &mut slow {
        assert!(
            closed_within(s, Duration::from_secs(5)),
            "a slow connection was kept open"
        );
    }
    // Closed by the timeout, not refused: they were kept while their headers could still come.
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(500) && took < Duration::from_secs(5),
        "{took:?}"
    );
    // And the endpoint serves again, saying what it refused.
    let metrics = wait_for(Duration::from_secs(5), || {
        let (code, body) = node.http_get("/metrics").ok()?;
        (code == 200).then_some(body)
    })
    .expect("/metrics answers once the slow connections are gone");
    let refused = metrics
        .lines()
        .find_map(|l| l.strip_prefix("edgetwin_http_connections_refused_total "))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .unwrap_or(0.0);
    assert!(refused >= 1.0, "refusals not counted:\n{metrics}");
    assert_eq!(node.http_get("/readyz").unwrap().0, 200);
}

fn read_exact_within(s: &mut std::net::TcpStream, n: usize) -> Vec<u8> {
    use std::io::Read;
    s.set_read_timeout(Some(std::time::Duration::from_secs(5)))
        .unwrap();
    let mut buf = vec![0u8; n];
    s.read_exact(&mut buf).unwrap();
    buf
}

#[test]
fn security_gate_takes_keepalive_off_and_answers_dollar_filters_with_a_failure_code() {
    use std::io::Write;
    let s = secured(&["s-ka"]);
    let mut c = std::net::TcpStream::connect(("127.0.0.1", s.gate)).unwrap();
    // Keep-alive 0 ("off") is legal MQTT; the broker behind the gate refuses it without a
    // CONNACK, so the gate asks it for a keep-alive of its own and pings for the client.
    c.write_all(&raw_connect_v4(
        "plant/line-2/ka-0",
        Some(("eng", "eng-pw")),
        0,
    ))
    .unwrap();
    assert_eq!(read_exact_within(&mut c, 4), [0x20, 0x02, 0x00, 0x00]);
    // The client's own PINGREQ is still answered.
    c.write_all(&[0xC0, 0x00]).unwrap();
    assert_eq!(read_exact_within(&mut c, 2), [0xD0, 0x00]);
    // SUBSCRIBE $SYS/# (packet id 7): a SUBACK failure code, and the connection stays.
    c.write_all(&raw_subscribe_v4(7, "$SYS/#")).unwrap();
    assert_eq!(read_exact_within(&mut c, 5), [0x90, 0x03, 0x00, 0x07, 0x80]);
    c.write_all(&[0xC0, 0x00]).unwrap();
    assert_eq!(read_exact_within(&mut c, 2), [0xD0, 0x00]);
}

#[test]
fn security_gate_keeps_deliveries_within_the_clients_maximum_packet_size() {
    let s = secured(&["s-mp"]);
    let big = "x".repeat(400);
    // The client announces 128 bytes; it publishes (QoS 1) a large message and then a small
    // one to a topic it subscribed: only the small one may reach it, and nothing is redelivered.
    let got = probe(
        s.gate,
        true,
        &["dt/s-mp/desired"],
        &[("dt/s-mp/desired", &big), ("dt/s-mp/desired", "small")],
        1,
        &[
            "--username",
            "eng",
            "--password",
            "eng-pw",
            "--max-packet",
            "128",
            "--timeout",
            "3",
        ],
    );
    let payloads: Vec<&str> = got.iter().filter_map(|m| m["payload"].as_str()).collect();
    assert_eq!(payloads, ["small"], "{got:?}");
    assert!(s
        .node
        .metrics()
        .contains("edgetwin_gate_denied_total{role=\"engineer\",kind=\"oversize_delivery\"} 1"));
}

#[test]
fn security_gate_keeps_the_broker_session_of_a_client_without_keepalive_alive() {
    use std::io::Write;
    // The gate asks the broker for a 2 s keep-alive, which rumqttd enforces at 3 s of silence.
    let s = secured_with(&["s-idle"], "    keepalive_off_upstream_s: 2\n");
    let mut c = std::net::TcpStream::connect(("127.0.0.1", s.gate)).unwrap();
    c.write_all(&raw_connect_v4("idle-0", Some(("eng", "eng-pw")), 0))
        .unwrap();
    assert_eq!(read_exact_within(&mut c, 4), [0x20, 0x02, 0x00, 0x00]);
    // Silent for well past the broker's limit; only the gate's own pings reach the broker.
    std::thread::sleep(std::time::Duration::from_millis(4500));
    c.write_all(&[0xC0, 0x00]).unwrap();
    assert_eq!(
        read_exact_within(&mut c, 2),
        [0xD0, 0x00],
        "the session was dropped while the client was silent"
    );
}

/// The TCP ports process `pid` listens on (from `/proc/net/tcp` and the process's sockets).
fn listening_ports(pid: u32) -> Vec<u16> {
    let inodes: std::collections::HashSet<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .filter_map(|l| {
            let l = l.to_string_lossy().into_owned();
            Some(l.strip_prefix("socket:[")?.strip_suffix(']')?.to_string())
        })
        .collect();
    let mut ports = Vec::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(text) = std::fs::read_to_string(table) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            // local_address, ..., st (0A = LISTEN), ..., inode
            if f.len() > 9 && f[3] == "0A" && inodes.contains(f[9]) {
                let port = f[1].rsplit(':').next().unwrap();
                ports.push(u16::from_str_radix(port, 16).unwrap());
            }
        }
    }
    ports
}

#[test]
fn security_with_users_no_port_of_the_node_takes_an_anonymous_client() {
    let s = secured(&["s-9"]);
    let mut ports = listening_ports(s.node.pid());
    ports.sort_unstable();
    // The front door's ports (the node's own mqtt.listen and listen_v5, the gate listener) and
    // HTTP: the broker has no TCP listener (the front door reaches it in-process).
    let mut expected = vec![s.node.port, s.node.port_v5, s.gate, s.node.http_port];
    expected.sort_unstable();
    assert_eq!(
        ports, expected,
        "the node listens only where its config says"
    );
    for port in ports.iter().filter(|p| **p != s.node.http_port) {
        let o = mosquitto_pub_output(*port, "dt/s-9/desired", r#"{"mode":"sneaky"}"#, &[]);
        assert!(
            !o.status.success(),
            "port {port} took an anonymous client (ports {ports:?})"
        );
    }
    let t = s.node.twin("s-9");
    assert!(t["desired"].get("mode").is_none(), "{t}");
}

#[test]
fn security_the_cli_logs_in_with_a_user_and_a_password_file() {
    let s = secured(&["s-5"]);
    let pw = s.node.dir.path().join("eng.pw");
    std::fs::write(&pw, "eng-pw\n").unwrap();
    let anonymous = s.node.cli(&["twin", "get", "s-5", "--timeout-ms", "2000"]);
    assert!(
        !anonymous.status.success(),
        "an anonymous CLI got in: {anonymous:?}"
    );
    let pw = pw.to_str().unwrap();
    let login = ["--username", "eng", "--password-file", pw];
    let set = s
        .node
        .cli(&[&["twin", "set", "s-5", "mode=eco"][..], &login].concat());
    assert!(set.status.success(), "{set:?}");
    let got = s.node.cli(&[&["twin", "get", "s-5"][..], &login].concat());
    assert!(got.status.success(), "{got:?}");
    let twin: serde_json::Value = serde_json::from_slice(&got.stdout).unwrap();
    assert_eq!(twin["desired"]["mode"], "eco", "{twin}");
}

#[test]
fn security_a_client_id_cannot_be_taken_over_by_another_identity() {
    let s = secured(&["s-6"]);
    let id = "edgetwin-mapper-modbus";
    let gate = s.gate.to_string();
    let mut holder = std::process::Command::new("mosquitto_sub")
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &gate,
            "-i",
            id,
            "-u",
            "modbus-mapper",
            "-P",
            "mb-pw",
        ])
        .args(["-t", "mappers/modbus/devices/+", "-q", "1"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    s.node.log_until(std::time::Duration::from_secs(10), |l| {
        l.contains("client connected through the gate") && l.contains(id)
    });
    // Another mapper with the same client id: MQTT would hand it the session and drop the
    // holder; the gate refuses it.
    let o = mosquitto_pub_output(
        s.gate,
        "mappers/opcua/status",
        r#"{"state":"online"}"#,
        &["-i", id, "-u", "opcua-mapper", "-P", "ua-pw"],
    );
    assert!(!o.status.success(), "took over another mapper's client id");
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("identifier rejected"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(
        holder.try_wait().unwrap().is_none(),
        "the holder was disconnected"
    );
    assert!(s
        .node
        .metrics()
        .contains("edgetwin_gate_auth_failures_total{reason=\"client_id_taken\"} 1"));
    // The holder itself may reconnect with its id (MQTT's takeover of its own session).
    let o = mosquitto_pub_output(
        s.gate,
        "mappers/modbus/status",
        r#"{"state":"online"}"#,
        &["-i", id, "-u", "modbus-mapper", "-P", "mb-pw"],
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let _ = holder.kill();
    let _ = holder.wait();
}

/// A network namespace joined to this host by a veth pair: a second address to connect from.
/// Removed on drop.
struct OtherHost {
    ns: String,
    host_if: String,
    /// This host's address as the namespace sees it.
    host_ip: String,
}

impl OtherHost {
    /// `None` when namespaces cannot be made here (needs root and iproute2).
    fn make() -> Option<OtherHost> {
        let tag = format!("{:x}", std::process::id() % 0xfffff);
        let ns = format!("et-{tag}");
        let host_if = format!("eth{tag}h");
        let peer_if = format!("eth{tag}n");
        let net = 1 + std::process::id() % 250;
        let host_ip = format!("10.231.{net}.1");
        let ip = |args: &[&str]| {
            std::process::Command::new("ip")
                .args(args)
                .output()
                .is_ok_and(|o| o.status.success())
        };
        if !ip(&["netns", "add", &ns]) {
            return None;
        }
        let other = OtherHost {
            ns: ns.clone(),
            host_if: host_if.clone(),
            host_ip: host_ip.clone(),
        };
        let ok = ip(&[
            "link", "add", &host_if, "type", "veth", "peer", "name", &peer_if,
        ]) && ip(&["link", "set", &peer_if, "netns", &ns])
            && ip(&["addr", "add", &format!("{host_ip}/30"), "dev", &host_if])
            && ip(&["link", "set", &host_if, "up"])
            && ip(&[
                "-n",
                &ns,
                "addr",
                "add",
                &format!("10.231.{net}.2/30"),
                "dev",
                &peer_if,
            ])
            && ip(&["-n", &ns, "link", "set", &peer_if, "up"])
            && ip(&["-n", &ns, "link", "set", "lo", "up"]);
        ok.then_some(other)
    }

    /// mosquitto_pub run inside the namespace against this host.
    fn publish(&self, port: u16, extra: &[&str]) -> std::process::Output {
        std::process::Command::new("ip")
            .args([
                "netns",
                "exec",
                &self.ns,
                "mosquitto_pub",
                "-h",
                &self.host_ip,
            ])
            .args(["-p", &port.to_string(), "-q", "1", "-t", "dt/s-7/desired"])
            .args(["-m", r#"{"mode":"remote"}"#])
            .args(extra)
            .output()
            .unwrap()
    }
}

impl Drop for OtherHost {
    fn drop(&mut self) {
        let _ = std::process::Command::new("ip")
            .args(["link", "del", &self.host_if])
            .output();
        let _ = std::process::Command::new("ip")
            .args(["netns", "del", &self.ns])
            .output();
    }
}

#[test]
fn security_by_default_anonymous_clients_come_from_this_host_only() {
    let Some(other) = OtherHost::make() else {
        assert!(
            std::env::var_os("CI").is_none(),
            "cannot make a network namespace: this test needs root and iproute2"
        );
        eprintln!("skipped: cannot make a network namespace (needs root and iproute2)");
        return;
    };
    // No credentials file: the front door on every address, anonymous from loopback only.
    let port = free_port();
    let mut node = Node::start_with_config(
        &["s-7"],
        &format!("gate:\n  listeners: [{{listen: 0.0.0.0:{port}}}]\n"),
    );
    let o = other.publish(port, &["-V", "mqttv5"]);
    assert!(!o.status.success(), "anonymous from another host got in");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("ot authorized") || err.contains("ot authorised"),
        "{err}"
    );
    node.log_until(std::time::Duration::from_secs(5), |l| {
        l.contains("anonymous_remote") && l.contains("edgetwin user add")
    });
    // The same client on loopback is taken.
    let o = mosquitto_pub_output(port, "dt/s-7/desired", r#"{"mode":"local"}"#, &[]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    node.twin_until("s-7", |t| t["desired"]["mode"] == "local");
    node.assert_running();
}

#[test]
fn security_the_cli_reaches_a_tls_only_listener_with_cafile() {
    let pki = Pki::generate();
    let creds_dir = tempfile::tempdir().unwrap();
    let creds = creds_dir.path().join("users.yaml");
    user_add(&creds, "eng", "engineer", None, "eng-pw");
    let pw = creds_dir.path().join("eng.pw");
    std::fs::write(&pw, "eng-pw\n").unwrap();
    let tls = free_port();
    let mut node = Node::start_with_config(
        &["s-8"],
        &format!(
            "gate:\n  listeners:\n    - listen: 127.0.0.1:{tls}\n      tls: {{cert_file: {}, key_file: {}}}\n  credentials_file: {}\n",
            pki.path("server.pem"),
            pki.path("server.key"),
            creds.display()
        ),
    );
    node.login = Some(("eng".into(), "eng-pw".into()));
    let broker = format!("localhost:{tls}");
    let pw = pw.to_str().unwrap();
    let login = [
        "--username",
        "eng",
        "--password-file",
        pw,
        "--broker",
        &broker,
    ];
    // Without the CA bundle the tools speak plain MQTT, which a TLS listener does not answer.
    let plain = node.cli(&[&["twin", "get", "s-8", "--timeout-ms", "2000"][..], &login].concat());
    assert!(!plain.status.success(), "{plain:?}");
    let ca = pki.path("ca.pem");
    let with_tls = [&login[..], &["--cafile", &ca]].concat();
    let set = node.cli(&[&["twin", "set", "s-8", "mode=tls"][..], &with_tls].concat());
    assert!(set.status.success(), "{set:?}");
    node.twin_until("s-8", |t| t["desired"]["mode"] == "tls");
    node.assert_running();
}

/// A raw MQTT 5 CONNECT with a will on `will_topic`.
fn raw_connect_v5_with_will(client_id: &str, will_topic: &str) -> Vec<u8> {
    let s = |x: &str| {
        let mut v = (x.len() as u16).to_be_bytes().to_vec();
        v.extend_from_slice(x.as_bytes());
        v
    };
    let mut body = s("MQTT");
    body.extend([0x05, 0x06, 0x00, 0x1e, 0x00]); // v5, will + clean start, keep-alive 30, no properties
    body.extend(s(client_id));
    body.push(0x00); // no will properties
    body.extend(s(will_topic));
    body.extend(s("gone"));
    let mut p = vec![0x10, body.len() as u8];
    p.extend(body);
    p
}

#[test]
fn security_a_normal_mqtt5_disconnect_in_its_short_form_does_not_publish_the_will() {
    use std::io::Write;
    let node = Node::start(&[]);
    let watch = |topic: &str| {
        std::process::Command::new("mosquitto_sub")
            .args(["-h", "127.0.0.1", "-p", &node.port.to_string(), "-t", topic])
            .args(["-C", "1", "-W", "3"])
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap()
    };
    let session = |id: &str, topic: &str| {
        let mut s = std::net::TcpStream::connect(("127.0.0.1", node.port)).unwrap();
        s.set_read_timeout(Some(std::time::Duration::from_secs(5)))
            .unwrap();
        s.write_all(&raw_connect_v5_with_will(id, topic)).unwrap();
        assert_eq!(read_packet(&mut s).unwrap().0, 0x20, "CONNACK");
        s
    };
    // The spec's 1-byte form (reason 0x00, normal disconnection, properties omitted).
    let quiet = watch("wills/quiet");
    std::thread::sleep(std::time::Duration::from_millis(300));
    let mut s = session("short-disconnect", "wills/quiet");
    s.write_all(&[0xE0, 0x01, 0x00]).unwrap();
    drop(s);
    let out = quiet.wait_with_output().unwrap();
    assert!(
        out.stdout.is_empty(),
        "will published after a normal DISCONNECT: {:?}",
        String::from_utf8_lossy(&out.stdout)
    );
    // Control: a connection that just drops does publish its will.
    let loud = watch("wills/loud");
    std::thread::sleep(std::time::Duration::from_millis(300));
    drop(session("dropped", "wills/loud"));
    let out = loud.wait_with_output().unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "gone");
}

#[test]
fn security_an_oversized_publish_is_answered_with_packet_too_large() {
    use std::io::{Read, Write};
    let node = Node::start(&[]);
    let mut s = std::net::TcpStream::connect(("127.0.0.1", node.port)).unwrap();
    s.set_read_timeout(Some(std::time::Duration::from_secs(5)))
        .unwrap();
    s.write_all(&raw_connect_v5_with_will("big-one", "wills/big"))
        .unwrap();
    assert_eq!(read_packet(&mut s).unwrap().0, 0x20, "CONNACK");
    // 300 KB: over mqtt.max_payload_bytes (256 KiB by default), under the gate's own 1 MiB.
    let payload = vec![b'x'; 300_000];
    let mut body = vec![0x00, 0x05];
    body.extend_from_slice(b"big/t");
    body.extend_from_slice(&[0x00, 0x01, 0x00]); // packet id 1, no properties
    body.extend_from_slice(&payload);
    let mut packet = vec![0x32];
    packet.extend(remaining_length(body.len()));
    packet.extend(body);
    let _ = s.write_all(&packet);
    let mut answer = [0u8; 3];
    s.read_exact(&mut answer).unwrap();
    assert_eq!(answer[0], 0xE0, "a DISCONNECT: {answer:?}");
    assert_eq!(answer[2], 0x95, "reason Packet too large: {answer:?}");
}

/// Reads one MQTT packet: (first byte, body), or `None` on timeout or close.
fn read_packet(s: &mut std::net::TcpStream) -> Option<(u8, Vec<u8>)> {
    use std::io::Read;
    let mut first = [0u8; 1];
    s.read_exact(&mut first).ok()?;
    let (mut len, mut shift) = (0usize, 0);
    loop {
        let mut b = [0u8; 1];
        s.read_exact(&mut b).ok()?;
        len |= usize::from(b[0] & 0x7F) << shift;
        shift += 7;
        if b[0] & 0x80 == 0 {
            break;
        }
    }
    let mut body = vec![0u8; len];
    s.read_exact(&mut body).ok()?;
    Some((first[0], body))
}

#[test]
fn security_deliveries_keep_within_the_clients_receive_maximum() {
    use std::io::Write;
    let node = Node::start(&[]);
    let mut s = std::net::TcpStream::connect(("127.0.0.1", node.port)).unwrap();
    s.set_read_timeout(Some(std::time::Duration::from_secs(5)))
        .unwrap();
    // MQTT 5 CONNECT, clean start, Receive Maximum 2.
    let mut body = vec![0x00, 0x04, b'M', b'Q', b'T', b'T', 0x05, 0x02, 0x00, 0x1e];
    body.extend([0x03, 0x21, 0x00, 0x02]);
    body.extend([0x00, 0x04, b'f', b'l', b'o', b'w']);
    let mut connect = vec![0x10, body.len() as u8];
    connect.extend(body);
    s.write_all(&connect).unwrap();
    assert_eq!(read_packet(&mut s).unwrap().0, 0x20, "CONNACK");
    // SUBSCRIBE flow/t at QoS 1.
    s.write_all(&[
        0x82, 0x0c, 0x00, 0x01, 0x00, 0x00, 0x06, b'f', b'l', b'o', b'w', b'/', b't', 0x01,
    ])
    .unwrap();
    assert_eq!(read_packet(&mut s).unwrap().0, 0x90, "SUBACK");
    for m in ["1", "2", "3"] {
        mosquitto_pub(node.port, "flow/t", m, &[]);
    }
    let pkid_of = |body: &[u8]| {
        let topic_len = usize::from(u16::from_be_bytes([body[0], body[1]]));
        [body[2 + topic_len], body[3 + topic_len]]
    };
    let (kind, first) = read_packet(&mut s).unwrap();
    assert_eq!(kind & 0xF0, 0x30, "first delivery");
    let (kind, _) = read_packet(&mut s).unwrap();
    assert_eq!(kind & 0xF0, 0x30, "second delivery");
    s.set_read_timeout(Some(std::time::Duration::from_millis(1500)))
        .unwrap();
    assert!(
        read_packet(&mut s).is_none(),
        "a third delivery while two are unacknowledged"
    );
    let pkid = pkid_of(&first);
    s.write_all(&[0x40, 0x02, pkid[0], pkid[1]]).unwrap();
    s.set_read_timeout(Some(std::time::Duration::from_secs(5)))
        .unwrap();
    let (kind, third) = read_packet(&mut s).unwrap();
    assert_eq!(kind & 0xF0, 0x30, "the third once one is acknowledged");
    assert!(third.ends_with(b"3"), "{third:?}");
}

#[test]
fn security_acknowledgements_keep_their_order_when_stored_and_unstored_publishes_mix() {
    use std::io::Write;
    let node = Node::start(&["ord-1"]);
    let mut s = std::net::TcpStream::connect(("127.0.0.1", node.port)).unwrap();
    s.set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .unwrap();
    s.write_all(&raw_connect_v4("ordered", None, 30)).unwrap();
    assert_eq!(read_packet(&mut s).unwrap().0, 0x20, "CONNACK");
    // 200 QoS 1 publishes in one write: every third a stored twin patch (acknowledged only after
    // its commit), the rest plain messages (acknowledged as soon as the broker has them).
    let mut all = Vec::new();
    for pkid in 1..=200u16 {
        let (topic, payload) = if pkid % 3 == 0 {
            // Not padded: "99" sorts after "198", so the last patch must win by its stamp
            // (patches in the same millisecond are stamped in arrival order), not by value.
            ("dt/ord-1/desired", format!("{{\"mode\":\"{pkid}\"}}"))
        } else {
            ("plant/ord/t", format!("{pkid}"))
        };
        all.extend(raw_publish_qos1_v4(
            pkid,
            topic.as_bytes(),
            payload.as_bytes(),
        ));
    }
    s.write_all(&all).unwrap();
    let acked: Vec<u16> = (0..200)
        .map(|_| {
            let (kind, body) = read_packet(&mut s).expect("a PUBACK");
            assert_eq!(kind, 0x40, "PUBACK");
            u16::from_be_bytes([body[0], body[1]])
        })
        .collect();
    let expected: Vec<u16> = (1..=200).collect();
    assert_eq!(acked, expected, "acknowledged out of order");
    node.twin_until("ord-1", |t| t["desired"]["mode"] == "198");
}
