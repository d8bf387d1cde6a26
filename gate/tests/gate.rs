//! The gate end to end: third-party clients (mosquitto_pub/sub) through the gate to a real
//! Mosquitto on a free port, standing in for the node's internal listener.
#![allow(clippy::unwrap_used, missing_docs)]

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Arc;
use std::time::Duration;

use edgetwin_contract::ids::{DeviceId, ProtocolName};
use edgetwin_gate::{DeviceDirectory, Gate, GateConfig, GateMetrics, ListenerConfig, TlsConfig};
use edgetwin_testkit::{require, Mosquitto, Pki, Subscriber};
use tokio_util::sync::CancellationToken;

struct Dir(HashMap<&'static str, &'static str>);

impl DeviceDirectory for Dir {
    fn protocol_of(&self, device: &DeviceId) -> Option<ProtocolName> {
        self.0
            .get(device.as_str())
            .map(|p| ProtocolName::new(*p).unwrap())
    }
}

fn directory() -> Arc<dyn DeviceDirectory> {
    Arc::new(Dir(HashMap::from([("m1", "modbus"), ("o1", "opcua")])))
}

/// A fast argon2id hash (small parameters: tests run unoptimised).
fn argon2_hash(plain: &str) -> String {
    use argon2::password_hash::{rand_core::OsRng, PasswordHasher, SaltString};
    let params = argon2::Params::new(1024, 1, 1, None).unwrap();
    argon2::Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params)
        .hash_password(plain.as_bytes(), &SaltString::generate(&mut OsRng))
        .unwrap()
        .to_string()
}

/// users: eng/eng-pw (engineer, argon2), app/app-pw (app, bcrypt), mb/mb-pw (modbus mapper),
/// mapper-modbus (modbus mapper, certificate only).
fn write_credentials(dir: &Path) -> PathBuf {
    let yaml = format!(
        "users:\n\
         - {{name: eng, role: engineer, password_hash: '{}'}}\n\
         - {{name: app, role: app, password_hash: '{}'}}\n\
         - {{name: mb, role: mapper, protocol: modbus, password_hash: '{}'}}\n\
         - {{name: mapper-modbus, role: mapper, protocol: modbus}}\n",
        argon2_hash("eng-pw"),
        bcrypt::hash("app-pw", 4).unwrap(),
        argon2_hash("mb-pw"),
    );
    let path = dir.join("users.yaml");
    std::fs::write(&path, yaml).unwrap();
    path
}

/// A gate running on its own runtime thread; stopped (and awaited) on drop.
struct TestGate {
    port: u16,
    metrics: GateMetrics,
    stop: CancellationToken,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl TestGate {
    fn start(cfg: GateConfig, upstream: u16) -> TestGate {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let up: SocketAddr = ([127, 0, 0, 1], upstream).into();
        let gate = rt
            .block_on(Gate::bind(
                cfg,
                edgetwin_gate::Upstream {
                    broker: edgetwin_gate::upstream::Broker::Tcp(up),
                    login: None,
                },
                directory(),
                Arc::new(edgetwin_gate::NothingStored),
            ))
            .unwrap();
        let port = gate.local_addrs()[0].port();
        let metrics = gate.metrics();
        let stop = CancellationToken::new();
        let token = stop.clone();
        let thread = std::thread::spawn(move || rt.block_on(gate.run(token)));
        TestGate {
            port,
            metrics,
            stop,
            thread: Some(thread),
        }
    }

    fn metrics_text(&self) -> String {
        let mut reg = prometheus_client::registry::Registry::with_prefix("edgetwin");
        self.metrics.register(&mut reg);
        let mut s = String::new();
        prometheus_client::encoding::text::encode(&mut s, &reg).unwrap();
        s
    }

    fn metric(&self, series: &str) -> f64 {
        self.metrics_text()
            .lines()
            .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
            .unwrap_or(0.0)
    }
}

impl Drop for TestGate {
    fn drop(&mut self) {
        self.stop.cancel();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn config(creds: Option<PathBuf>) -> GateConfig {
    let mut c = GateConfig::plain(([127, 0, 0, 1], 0).into());
    c.credentials_file = creds;
    c
}

fn pub_(port: u16, args: &[&str]) -> Output {
    require("mosquitto_pub");
    Command::new("mosquitto_pub")
        .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-q", "1"])
        .args(args)
        .output()
        .unwrap()
}

fn sub(port: u16, args: &[&str]) -> Output {
    require("mosquitto_sub");
    Command::new("mosquitto_sub")
        .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-v"])
        .args(args)
        .output()
        .unwrap()
}

fn text(o: &Output) -> String {
    format!(
        "exit {:?}\nstdout: {}\nstderr: {}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// Publishes `marker` as admin straight at the upstream broker, waits until the upstream
/// subscriber has it, and returns every topic it saw (so anything sent before is in there).
fn seen_upstream(up: &Mosquitto, watcher: &Subscriber) -> Vec<String> {
    let marker = format!("marker/{}", rand_suffix());
    up.pub_(&marker, "{}");
    watcher
        .wait_until(Duration::from_secs(10), |got| {
            got.iter().any(|(t, _)| *t == marker)
        })
        .into_iter()
        .map(|(t, _)| t)
        .collect()
}

fn rand_suffix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
}

#[test]
fn gate_refuses_a_wrong_password_and_counts_it() {
    let dir = tempfile::tempdir().unwrap();
    let up = Mosquitto::start();
    let gate = TestGate::start(config(Some(write_credentials(dir.path()))), up.port);
    for v in ["mqttv311", "mqttv5"] {
        let o = pub_(
            gate.port,
            &[
                "-V",
                v,
                "-u",
                "eng",
                "-P",
                "nope",
                "-t",
                "dt/m1/desired",
                "-m",
                "{}",
            ],
        );
        assert!(!o.status.success(), "{v}: {}", text(&o));
        let o = pub_(gate.port, &["-V", v, "-t", "dt/m1/desired", "-m", "{}"]);
        assert!(!o.status.success(), "{v} anonymous: {}", text(&o));
        let o = pub_(
            gate.port,
            &[
                "-V",
                v,
                "-u",
                "eng",
                "-P",
                "eng-pw",
                "-t",
                "dt/m1/desired",
                "-m",
                "{}",
            ],
        );
        assert!(o.status.success(), "{v} right password: {}", text(&o));
    }
    assert_eq!(
        gate.metric("edgetwin_gate_auth_failures_total{reason=\"bad_password\"}"),
        2.0
    );
    assert_eq!(
        gate.metric("edgetwin_gate_auth_failures_total{reason=\"no_credentials\"}"),
        2.0
    );
}

#[test]
fn gate_serves_v4_and_v5_clients_on_the_same_port() {
    let dir = tempfile::tempdir().unwrap();
    let up = Mosquitto::start();
    let watcher = Subscriber::start(up.port, "watch-both", "#");
    let gate = TestGate::start(config(Some(write_credentials(dir.path()))), up.port);
    for (v, dev) in [("mqttv311", "m1"), ("mqttv5", "o1")] {
        let topic = format!("dt/{dev}/desired");
        let o = pub_(
            gate.port,
            &[
                "-V",
                v,
                "-u",
                "app",
                "-P",
                "app-pw",
                "-t",
                &topic,
                "-m",
                "{\"x\":1}",
            ],
        );
        assert!(o.status.success(), "{v}: {}", text(&o));
    }
    let seen = seen_upstream(&up, &watcher);
    assert!(seen.contains(&"dt/m1/desired".to_string()), "{seen:?}");
    assert!(seen.contains(&"dt/o1/desired".to_string()), "{seen:?}");
    assert_eq!(
        gate.metric("edgetwin_gate_connections_total{role=\"app\",version=\"v5\"}"),
        1.0
    );
}

#[test]
fn gate_mapper_cannot_publish_desired_or_another_protocols_device() {
    let dir = tempfile::tempdir().unwrap();
    let up = Mosquitto::start();
    let watcher = Subscriber::start(up.port, "watch-mapper", "#");
    let gate = TestGate::start(config(Some(write_credentials(dir.path()))), up.port);
    let login = ["-u", "mb", "-P", "mb-pw"];
    for (v, topic) in [
        ("mqttv311", "dt/m1/desired"),
        ("mqttv5", "dt/m1/desired"),
        ("mqttv311", "dt/o1/reported"),
        ("mqttv5", "dt/o1/reported"),
    ] {
        // The client gets its PUBACK (v5 with reason 0x87), so it never stalls.
        let o = pub_(
            gate.port,
            &[&["-V", v, "-t", topic, "-m", "{}"][..], &login].concat(),
        );
        if v == "mqttv5" {
            assert!(
                String::from_utf8_lossy(&o.stderr).contains("uthori"),
                "{v} {topic}: {}",
                text(&o)
            );
        }
    }
    let o = pub_(
        gate.port,
        &[&["-t", "dt/m1/reported", "-m", "{\"v\":1}"][..], &login].concat(),
    );
    assert!(o.status.success(), "{}", text(&o));
    let seen = seen_upstream(&up, &watcher);
    assert!(seen.contains(&"dt/m1/reported".to_string()), "{seen:?}");
    assert!(!seen.contains(&"dt/m1/desired".to_string()), "{seen:?}");
    assert!(!seen.contains(&"dt/o1/reported".to_string()), "{seen:?}");
    assert_eq!(
        gate.metric("edgetwin_gate_denied_total{role=\"mapper\",kind=\"publish\"}"),
        4.0
    );
}

#[test]
fn gate_engineer_cannot_publish_reported() {
    let dir = tempfile::tempdir().unwrap();
    let up = Mosquitto::start();
    let watcher = Subscriber::start(up.port, "watch-eng", "#");
    let gate = TestGate::start(config(Some(write_credentials(dir.path()))), up.port);
    let o = pub_(
        gate.port,
        &[
            "-u",
            "eng",
            "-P",
            "eng-pw",
            "-t",
            "dt/m1/reported",
            "-m",
            "{}",
        ],
    );
    assert!(o.status.success(), "v4 gets a PUBACK: {}", text(&o));
    let seen = seen_upstream(&up, &watcher);
    assert!(!seen.contains(&"dt/m1/reported".to_string()), "{seen:?}");
    assert_eq!(
        gate.metric("edgetwin_gate_denied_total{role=\"engineer\",kind=\"publish\"}"),
        1.0
    );
}

#[test]
fn gate_denied_subscribe_gets_a_failure_code() {
    let dir = tempfile::tempdir().unwrap();
    let up = Mosquitto::start();
    let gate = TestGate::start(config(Some(write_credentials(dir.path()))), up.port);
    for v in ["mqttv311", "mqttv5"] {
        let o = sub(
            gate.port,
            &[
                "-V",
                v,
                "-u",
                "app",
                "-P",
                "app-pw",
                "-t",
                "mappers/#",
                "-C",
                "1",
                "-W",
                "3",
            ],
        );
        // mosquitto_sub reports the failure code (and exits 0 for v4, 1 for v5).
        assert!(
            String::from_utf8_lossy(&o.stderr).contains("denied"),
            "{v}: {}",
            text(&o)
        );
    }
    assert_eq!(
        gate.metric("edgetwin_gate_denied_total{role=\"app\",kind=\"subscribe\"}"),
        2.0
    );
}

#[test]
fn gate_partly_denied_subscribe_keeps_the_allowed_filter_working() {
    let dir = tempfile::tempdir().unwrap();
    let up = Mosquitto::start();
    let gate = TestGate::start(config(Some(write_credentials(dir.path()))), up.port);
    let port = gate.port;
    let reader = std::thread::spawn(move || {
        sub(
            port,
            &[
                "-V",
                "mqttv5",
                "-u",
                "app",
                "-P",
                "app-pw",
                "-t",
                "node/#",
                "-t",
                "dt/+/twin",
                "-C",
                "1",
                "-W",
                "10",
            ],
        )
    });
    // Publish until the reader (connecting and subscribing meanwhile) has got one.
    while !reader.is_finished() {
        up.pub_("dt/m1/twin", "{\"version\":1}");
        std::thread::sleep(Duration::from_millis(100));
    }
    let o = reader.join().unwrap();
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("dt/m1/twin"),
        "{}",
        text(&o)
    );
}

#[test]
fn gate_mapper_receives_deltas_of_its_own_devices_only() {
    let dir = tempfile::tempdir().unwrap();
    let up = Mosquitto::start();
    let gate = TestGate::start(config(Some(write_credentials(dir.path()))), up.port);
    let port = gate.port;
    let reader = std::thread::spawn(move || {
        sub(
            port,
            &[
                "-q",
                "1",
                "-u",
                "mb",
                "-P",
                "mb-pw",
                "-t",
                "dt/+/delta",
                "-C",
                "2",
                "-W",
                "10",
            ],
        )
    });
    // Publish pairs until the reader (connecting and subscribing meanwhile) has got two: once it
    // has the first, the next pair's other-protocol delta reaches the gate and must be denied.
    while !reader.is_finished() {
        up.pub_("dt/o1/delta", "{\"device\":\"o1\"}");
        up.pub_("dt/m1/delta", "{\"device\":\"m1\"}");
        std::thread::sleep(Duration::from_millis(100));
    }
    let o = reader.join().unwrap();
    let out = String::from_utf8_lossy(&o.stdout);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 2, "{}", text(&o));
    assert!(
        lines.iter().all(|l| l.starts_with("dt/m1/delta")),
        "{}",
        text(&o)
    );
    assert!(gate.metric("edgetwin_gate_denied_total{role=\"mapper\",kind=\"deliver\"}") >= 1.0);
}

#[test]
fn gate_disconnects_oversize_packets_long_topics_and_too_many_subscriptions() {
    let up = Mosquitto::start();
    let watcher = Subscriber::start(up.port, "watch-limits", "#");
    let mut cfg = config(None);
    cfg.limits.max_packet_bytes = 4096;
    cfg.limits.max_topic_len = 64;
    cfg.limits.max_subscriptions_per_client = 2;
    let gate = TestGate::start(cfg, up.port);
    let dir = tempfile::tempdir().unwrap();
    let big = dir.path().join("big");
    std::fs::write(&big, vec![b'x'; 10_000]).unwrap();
    let o = pub_(gate.port, &["-t", "big/one", "-f", big.to_str().unwrap()]);
    assert!(!o.status.success(), "{}", text(&o));
    let long = format!("long/{}", "a".repeat(100));
    let _ = pub_(gate.port, &["-t", &long, "-m", "x"]);
    let o = sub(
        gate.port,
        &["-t", "a/1", "-t", "a/2", "-t", "a/3", "-C", "1", "-W", "3"],
    );
    assert!(!o.status.success(), "{}", text(&o));
    let seen = seen_upstream(&up, &watcher);
    assert!(
        !seen.iter().any(|t| t == "big/one" || t == &long),
        "{seen:?}"
    );
    // mosquitto_sub reconnects after being cut, so that one can count more than once.
    for reason in [
        "packet_too_large",
        "topic_too_long",
        "too_many_subscriptions",
    ] {
        assert!(
            gate.metric(&format!(
                "edgetwin_gate_disconnects_total{{reason=\"{reason}\"}}"
            )) >= 1.0,
            "{reason}\n{}",
            gate.metrics_text()
        );
    }
}

#[test]
fn gate_closes_malformed_connections_and_keeps_serving() {
    let up = Mosquitto::start();
    let gate = TestGate::start(config(None), up.port);
    for garbage in [
        &b"\x10\x05\x00\x04MQTX"[..],
        b"\xff\xff\xff\xff\xff",
        b"\x30\x02\x00\x09",
        b"GET / HTTP/1.1\r\n\r\n",
    ] {
        let mut s = std::net::TcpStream::connect(("127.0.0.1", gate.port)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s.write_all(garbage).unwrap();
        let mut rest = Vec::new();
        // The gate closes the connection (EOF), it does not hang or crash.
        let _ = s.read_to_end(&mut rest);
    }
    let o = pub_(gate.port, &["-t", "still/alive", "-m", "x"]);
    assert!(o.status.success(), "{}", text(&o));
}

// ---------------------------------------------------------------------------------------------
// TLS

/// The test PKI (`edgetwin_testkit::Pki`) as a gate listener.
trait PkiListener {
    fn listener(&self, require_client_cert: bool) -> ListenerConfig;
}

impl PkiListener for Pki {
    fn listener(&self, require_client_cert: bool) -> ListenerConfig {
        ListenerConfig {
            listen: ([127, 0, 0, 1], 0).into(),
            tls: Some(TlsConfig {
                cert_file: self.path("server.pem").into(),
                key_file: self.path("server.key").into(),
                client_ca_file: Some(self.path("ca.pem").into()),
                require_client_cert,
            }),
        }
    }
}

fn tls_pub(port: u16, pki: &Pki, extra: &[&str]) -> Output {
    require("mosquitto_pub");
    Command::new("mosquitto_pub")
        .args(["-h", "localhost", "-p", &port.to_string(), "-q", "1"])
        .args(["--cafile", &pki.path("ca.pem")])
        .args(extra)
        .output()
        .unwrap()
}

#[test]
fn gate_tls_refuses_an_untrusted_client_certificate() {
    let pki = Pki::generate();
    let dir = tempfile::tempdir().unwrap();
    let up = Mosquitto::start();
    let mut cfg = config(Some(write_credentials(dir.path())));
    cfg.listeners = vec![pki.listener(true)];
    let gate = TestGate::start(cfg, up.port);
    let o = tls_pub(
        gate.port,
        &pki,
        &[
            "--cert",
            &pki.path("rogue.pem"),
            "--key",
            &pki.path("rogue.key"),
            "-t",
            "dt/m1/reported",
            "-m",
            "{}",
        ],
    );
    assert!(!o.status.success(), "{}", text(&o));
    let o = tls_pub(
        gate.port,
        &pki,
        &[
            "-u",
            "eng",
            "-P",
            "eng-pw",
            "-t",
            "dt/m1/desired",
            "-m",
            "{}",
        ],
    );
    assert!(
        !o.status.success(),
        "no client cert on a require_client_cert listener: {}",
        text(&o)
    );
    // The gate counts a failed handshake when its side of it ends, which can be just after the
    // client has exited: wait for the count rather than read it once.
    let series = "edgetwin_gate_auth_failures_total{reason=\"tls_handshake\"}";
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while gate.metric(series) < 2.0 {
        assert!(
            std::time::Instant::now() < deadline,
            "{series} = {}",
            gate.metric(series)
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

#[test]
fn gate_tls_client_certificate_identity_wins_over_the_username() {
    let pki = Pki::generate();
    let dir = tempfile::tempdir().unwrap();
    let up = Mosquitto::start();
    let watcher = Subscriber::start(up.port, "watch-tls", "#");
    let mut cfg = config(Some(write_credentials(dir.path())));
    cfg.listeners = vec![pki.listener(false)];
    let gate = TestGate::start(cfg, up.port);
    let cert = [
        "--cert",
        &pki.path("client.pem"),
        "--key",
        &pki.path("client.key"),
    ];
    // The certificate says mapper-modbus: reported for its device goes through...
    let o = tls_pub(
        gate.port,
        &pki,
        &[&cert[..], &["-t", "dt/m1/reported", "-m", "{}"]].concat(),
    );
    assert!(o.status.success(), "{}", text(&o));
    // ...and the engineer's username does not turn it into an engineer.
    let o = tls_pub(
        gate.port,
        &pki,
        &[
            &cert[..],
            &[
                "-u",
                "eng",
                "-P",
                "eng-pw",
                "-t",
                "dt/m1/desired",
                "-m",
                "{}",
            ],
        ]
        .concat(),
    );
    assert!(o.status.success(), "{}", text(&o));
    // Without a certificate, the password path still works on the same TLS listener.
    let o = tls_pub(
        gate.port,
        &pki,
        &[
            "-V",
            "mqttv5",
            "-u",
            "app",
            "-P",
            "app-pw",
            "-t",
            "dt/o1/desired",
            "-m",
            "{}",
        ],
    );
    assert!(o.status.success(), "{}", text(&o));
    let seen = seen_upstream(&up, &watcher);
    assert!(seen.contains(&"dt/m1/reported".to_string()), "{seen:?}");
    assert!(seen.contains(&"dt/o1/desired".to_string()), "{seen:?}");
    assert!(!seen.contains(&"dt/m1/desired".to_string()), "{seen:?}");
    assert_eq!(
        gate.metric("edgetwin_gate_connections_total{role=\"mapper\",version=\"v4\"}"),
        2.0
    );
}

#[test]
fn gate_refuses_publishes_to_new_topics_past_the_nodes_distinct_topic_budget() {
    let dir = tempfile::tempdir().unwrap();
    let up = Mosquitto::start();
    let watcher = Subscriber::start(up.port, "watch-topics", "#");
    let mut cfg = config(Some(write_credentials(dir.path())));
    cfg.limits.max_distinct_topics = 2;
    let gate = TestGate::start(cfg, up.port);
    let publish = |topic: &str| {
        let o = pub_(
            gate.port,
            &[
                "-V", "mqttv5", "-u", "eng", "-P", "eng-pw", "-t", topic, "-m", "{}",
            ],
        );
        text(&o)
    };
    // Two unregistered topics fit, and stay allowed; a third new one is refused with 0x97.
    publish("dt/ghost-1/desired");
    publish("dt/ghost-2/desired");
    publish("dt/ghost-1/desired");
    let refused = publish("dt/ghost-3/desired");
    // A registered device's topics never count, however many there are.
    publish("dt/m1/desired");
    publish("dt/o1/desired");
    let seen = seen_upstream(&up, &watcher);
    for t in [
        "dt/ghost-1/desired",
        "dt/ghost-2/desired",
        "dt/m1/desired",
        "dt/o1/desired",
    ] {
        assert!(seen.contains(&t.to_string()), "{t} not passed on: {seen:?}");
    }
    assert!(
        !seen.contains(&"dt/ghost-3/desired".to_string()),
        "{seen:?}"
    );
    assert!(
        refused.to_lowercase().contains("quota"),
        "the client is told why: {refused}"
    );
    assert_eq!(
        gate.metric("edgetwin_gate_denied_total{role=\"engineer\",kind=\"topic_budget\"}"),
        1.0
    );
}

#[test]
fn gate_refuses_new_filters_past_the_nodes_distinct_filter_budget() {
    let dir = tempfile::tempdir().unwrap();
    let up = Mosquitto::start();
    let mut cfg = config(Some(write_credentials(dir.path())));
    cfg.limits.max_distinct_filters = 2;
    let gate = TestGate::start(cfg, up.port);
    let subscribe = |filter: &str| {
        let o = sub(
            gate.port,
            &[
                "-u", "eng", "-P", "eng-pw", "-t", filter, "-C", "1", "-W", "2",
            ],
        );
        !String::from_utf8_lossy(&o.stderr).contains("denied")
    };
    // Two distinct filters fit; the same ones stay allowed for any client afterwards (the
    // broker already holds their logs); a third distinct one is refused.
    assert!(subscribe("dt/a/twin"));
    assert!(subscribe("dt/b/twin"));
    assert!(subscribe("dt/a/twin"));
    assert!(!subscribe("dt/c/twin"), "past the budget");
    assert!(subscribe("dt/b/twin"));
    assert_eq!(
        gate.metric("edgetwin_gate_denied_total{role=\"engineer\",kind=\"filter_budget\"}"),
        1.0
    );
}

#[test]
fn gate_holds_back_password_guesses_and_still_lets_the_right_password_in() {
    let dir = tempfile::tempdir().unwrap();
    let up = Mosquitto::start();
    let mut cfg = config(Some(write_credentials(dir.path())));
    cfg.limits.login_free_failures = 2;
    let gate = TestGate::start(cfg, up.port);
    let attempt = |password: &str| {
        pub_(
            gate.port,
            &[
                "-u",
                "eng",
                "-P",
                password,
                "-t",
                "dt/m1/desired",
                "-m",
                "{}",
            ],
        )
    };
    let started = std::time::Instant::now();
    for _ in 0..5 {
        assert!(
            !attempt("guess").status.success(),
            "a wrong password got in"
        );
    }
    // Two free failures; then turns spaced 250 ms, 500 ms: guesses 4 and 5 were held back.
    assert!(
        started.elapsed() >= Duration::from_millis(750),
        "{:?}",
        started.elapsed()
    );
    assert!(gate.metric("edgetwin_gate_login_delayed_total") >= 2.0);
    // The right password still gets in (at its turn), and clears the record.
    let o = attempt("eng-pw");
    assert!(o.status.success(), "{}", text(&o));
    let o = attempt("eng-pw");
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(
        gate.metric("edgetwin_gate_auth_failures_total{reason=\"bad_password\"}"),
        5.0
    );
}

#[test]
fn gate_refuses_unchecked_a_flood_of_parallel_guesses() {
    let dir = tempfile::tempdir().unwrap();
    let up = Mosquitto::start();
    let mut cfg = config(Some(write_credentials(dir.path())));
    cfg.limits.login_free_failures = 1;
    cfg.limits.login_max_delay_ms = 1000;
    let gate = TestGate::start(cfg, up.port);
    let port = gate.port;
    // One guess fails first, so the address is known when the flood comes.
    let first = pub_(
        port,
        &[
            "-u",
            "eng",
            "-P",
            "first",
            "-t",
            "dt/m1/desired",
            "-m",
            "{}",
        ],
    );
    assert!(!first.status.success());
    let guesses: Vec<_> = (0..12)
        .map(|i| {
            std::thread::spawn(move || {
                pub_(
                    port,
                    &[
                        "-u",
                        "eng",
                        "-P",
                        &format!("guess-{i}"),
                        "-t",
                        "dt/m1/desired",
                        "-m",
                        "{}",
                    ],
                )
            })
        })
        .collect();
    for g in guesses {
        assert!(!g.join().unwrap().status.success());
    }
    // Opening many connections at once does not multiply the guess rate: the attempts queue,
    // and those whose turn is more than login_max_delay_ms away are refused unchecked.
    let checked = gate.metric("edgetwin_gate_auth_failures_total{reason=\"bad_password\"}");
    let throttled = gate.metric("edgetwin_gate_auth_failures_total{reason=\"throttled\"}");
    assert_eq!(
        checked + throttled,
        13.0,
        "checked {checked}, throttled {throttled}"
    );
    assert!(throttled >= 1.0, "checked {checked}, throttled {throttled}");
}

#[test]
fn gate_answers_topic_alias_zero_with_disconnect_0x94() {
    use std::io::{Read, Write};
    let up = Mosquitto::start();
    let gate = TestGate::start(config(None), up.port);
    let mut c = std::net::TcpStream::connect(("127.0.0.1", gate.port)).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    // MQTT 5 CONNECT (clean start, keep-alive 60, no properties, client id "a").
    c.write_all(&[
        0x10, 0x0e, 0x00, 0x04, b'M', b'Q', b'T', b'T', 0x05, 0x02, 0x00, 0x3c, 0x00, 0x00, 0x01,
        b'a',
    ])
    .unwrap();
    let mut head = [0u8; 2];
    c.read_exact(&mut head).unwrap();
    assert_eq!(head[0], 0x20, "CONNACK expected");
    let mut rest = vec![0u8; head[1] as usize];
    c.read_exact(&mut rest).unwrap();
    assert_eq!(rest[1], 0x00, "connection accepted");
    // PUBLISH QoS 0 to "t" with Topic Alias (0x23) = 0.
    c.write_all(&[0x30, 0x08, 0x00, 0x01, b't', 0x03, 0x23, 0x00, 0x00, b'x'])
        .unwrap();
    c.read_exact(&mut head).unwrap();
    assert_eq!(head[0], 0xe0, "DISCONNECT expected");
    let mut reason = [0u8; 1];
    c.read_exact(&mut reason).unwrap();
    assert_eq!(reason[0], 0x94, "Topic Alias invalid");
}
