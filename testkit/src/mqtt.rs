//! Third-party MQTT clients (mosquitto_pub/sub, the paho probe) and the cloud side of the
//! bridge: a real Mosquitto, a subscriber on it, and a TCP proxy that can cut the link while
//! both ends keep running.

use super::*;

/// `mosquitto_pub -q 1` as `user` (MQTT 5 with `v5`); the output, to check refusals too.
pub fn publish_as(port: u16, user: &str, pw: &str, topic: &str, msg: &str, v5: bool) -> Output {
    let mut extra = vec!["-u", user, "-P", pw];
    if v5 {
        extra.extend(["-V", "mqttv5"]);
    }
    mosquitto_pub_output(port, topic, msg, &extra)
}

pub fn mosquitto_pub(port: u16, topic: &str, payload: &str, extra: &[&str]) {
    let out = mosquitto_pub_output(port, topic, payload, extra);
    assert!(
        out.status.success(),
        "mosquitto_pub failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// One MQTT 5 request with `mosquitto_rr`: `payload` to `topic`, naming `response_topic`; the
/// JSON answer (asserting that one came within 5 s).
pub fn mosquitto_rr(port: u16, topic: &str, response_topic: &str, payload: &str) -> Value {
    require("mosquitto_rr");
    let out = run(Command::new("mosquitto_rr").args([
        "-h",
        "127.0.0.1",
        "-p",
        &port.to_string(),
        "-t",
        topic,
        "-e",
        response_topic,
        "-m",
        payload,
        "-W",
        "5",
    ]));
    assert!(
        out.status.success(),
        "mosquitto_rr failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "mosquitto_rr answered {:?}: {e}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

/// `mosquitto_pub -q 1` with `extra` arguments; its output, whatever the outcome.
pub fn mosquitto_pub_output(port: u16, topic: &str, payload: &str, extra: &[&str]) -> Output {
    require("mosquitto_pub");
    run(Command::new("mosquitto_pub")
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &port.to_string(),
            "-q",
            "1",
            "-t",
            topic,
            "-m",
            payload,
        ])
        .args(extra))
}

pub fn probe(
    port: u16,
    v5: bool,
    subs: &[&str],
    pubs: &[(&str, &str)],
    count: usize,
    extra: &[&str],
) -> Vec<Value> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("clients/mqtt_probe.py");
    let mut c = Command::new(python());
    c.arg(script)
        .args(["--port", &port.to_string(), "--count", &count.to_string()]);
    if v5 {
        c.arg("--v5");
    }
    for s in subs {
        c.args(["--sub", s]);
    }
    for (t, p) in pubs {
        c.args(["--pub", t, p]);
    }
    c.args(extra);
    let out = run(&mut c);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !stderr.contains("No module named"),
        "paho-mqtt is not installed; run ./test.sh: {stderr}"
    );
    let msgs: Vec<Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    assert!(
        out.status.success(),
        "probe got {} of {count} messages (exit {:?}): {msgs:?} {stderr}",
        msgs.len(),
        out.status.code()
    );
    msgs
}

/// The retained message on `topic` at the broker on `port` (JSON, or `Value::Null` for a non-JSON
/// payload), if any.
pub fn retained(port: u16, topic: &str) -> Option<Value> {
    retained_as(port, topic, &[])
}

/// [`retained`] with extra mosquitto_sub arguments (a login: `-u USER -P PASSWORD`).
pub fn retained_as(port: u16, topic: &str, extra: &[&str]) -> Option<Value> {
    require("mosquitto_sub");
    let out = run(Command::new("mosquitto_sub").args(extra).args([
        "-h",
        "127.0.0.1",
        "-p",
        &port.to_string(),
        "-t",
        topic,
        "--retained-only",
        "-C",
        "1",
        "-W",
        "1",
    ]));
    if !out.status.success() || out.stdout.is_empty() {
        return None;
    }
    Some(serde_json::from_slice(&out.stdout).unwrap_or(Value::Null))
}

/// Waits (up to `limit`) until the retained message on `topic` at the broker on `port`
/// satisfies `pred` (`None` = nothing retained).
pub fn retained_until(
    port: u16,
    topic: &str,
    limit: Duration,
    pred: impl Fn(Option<&Value>) -> bool,
) -> Option<Value> {
    retained_until_as(port, topic, &[], limit, pred)
}

/// [`retained_until`] with extra mosquitto_sub arguments (a login).
pub fn retained_until_as(
    port: u16,
    topic: &str,
    extra: &[&str],
    limit: Duration,
    pred: impl Fn(Option<&Value>) -> bool,
) -> Option<Value> {
    let deadline = Instant::now() + limit;
    loop {
        let v = retained_as(port, topic, extra);
        if pred(v.as_ref()) {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "retained message on {topic} (port {port}) never matched within {limit:?}; last: {v:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The JSON payload of a probe message.
pub fn payload(m: &Value) -> Value {
    serde_json::from_str(m["payload"].as_str().unwrap()).unwrap()
}

/// The first message on `topic`.
pub fn on<'a>(msgs: &'a [Value], topic: &str) -> &'a Value {
    msgs.iter()
        .find(|m| m["topic"] == topic)
        .unwrap_or_else(|| panic!("no message on {topic}: {msgs:?}"))
}

/// The Mosquitto binary (`/usr/sbin` is not on every user's PATH).
pub fn mosquitto_bin() -> String {
    if Path::new("/usr/sbin/mosquitto").exists() {
        "/usr/sbin/mosquitto".into()
    } else {
        require("mosquitto");
        "mosquitto".into()
    }
}

/// A Mosquitto on a free 127.0.0.1 port, playing the cloud broker. Sessions persist across
/// [`Mosquitto::stop`]/[`Mosquitto::restart`] (persistence file in its own temp dir).
pub struct Mosquitto {
    pub port: u16,
    dir: tempfile::TempDir,
    child: Option<Child>,
}

impl Mosquitto {
    pub fn start() -> Mosquitto {
        Mosquitto::start_with_acl(None)
    }

    /// Started with `acl` as its `acl_file` (anonymous clients get its `topic` lines).
    pub fn start_with_acl(acl: Option<&str>) -> Mosquitto {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let mut conf = format!(
            "listener {port} 127.0.0.1\nallow_anonymous true\npersistence true\npersistence_location {dir}/\n\
             autosave_interval 1\nmax_queued_messages 1000000\nmax_inflight_messages 100\nset_tcp_nodelay true\n\
             log_dest file {dir}/mosquitto.log\n",
            dir = dir.path().display()
        );
        if let Some(acl) = acl {
            let file = dir.path().join("acl");
            std::fs::write(&file, acl).unwrap();
            conf.push_str(&format!("acl_file {}\n", file.display()));
        }
        std::fs::write(dir.path().join("mosquitto.conf"), conf).unwrap();
        // Started as root, Mosquitto drops to its own user, which must still write its files.
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
        }
        let mut m = Mosquitto {
            port,
            dir,
            child: None,
        };
        m.restart();
        m
    }

    /// Starts it again on the same port (after [`Mosquitto::stop`]).
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "mosquitto already running");
        let child = Command::new(mosquitto_bin())
            .arg("-c")
            .arg(self.dir.path().join("mosquitto.conf"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "mosquitto did not start:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGTERM (it saves its sessions) and wait.
    pub fn stop(&mut self) {
        let mut child = self.child.take().expect("mosquitto running");
        signal(child.id(), "TERM");
        wait_exit(&mut child, Duration::from_secs(10));
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("mosquitto.log")).unwrap_or_default()
    }

    /// Publishes one message (QoS 1) at this broker.
    pub fn pub_(&self, topic: &str, payload: &str) {
        mosquitto_pub(self.port, topic, payload, &[]);
    }

    /// The retained message on `topic` (JSON, or `Value::Null` for a non-JSON payload), if any.
    pub fn retained(&self, topic: &str) -> Option<Value> {
        retained(self.port, topic)
    }

    /// Waits (up to `limit`) until the retained message on `topic` satisfies `pred`.
    pub fn retained_until(
        &self,
        topic: &str,
        limit: Duration,
        pred: impl Fn(Option<&Value>) -> bool,
    ) -> Option<Value> {
        retained_until(self.port, topic, limit, pred)
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A `mosquitto_sub` with a persistent session (QoS 1), collecting `(topic, payload)` lines in
/// the background. mosquitto_sub exits when its broker goes away; it is started again (same
/// client id, so the broker delivers what it queued for the session meanwhile).
pub struct Subscriber {
    got: std::sync::Arc<std::sync::Mutex<Vec<(String, String)>>>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    pid: std::sync::Arc<std::sync::Mutex<Option<u32>>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Subscriber {
    pub fn start(port: u16, client_id: &str, topic: &str) -> Subscriber {
        use std::sync::atomic::{AtomicBool, Ordering};
        use std::sync::{Arc, Mutex};
        require("mosquitto_sub");
        let got = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let pid = Arc::new(Mutex::new(None));
        let (sink, halt, pid_slot) = (got.clone(), stop.clone(), pid.clone());
        let (client_id, topic) = (client_id.to_string(), topic.to_string());
        let (ready_tx, ready_rx) = std::sync::mpsc::channel::<()>();
        let thread = std::thread::spawn(move || {
            use std::io::BufRead;
            while !halt.load(Ordering::SeqCst) {
                let child = Command::new("mosquitto_sub")
                    .args([
                        "-h",
                        "127.0.0.1",
                        "-p",
                        &port.to_string(),
                        "-q",
                        "1",
                        "-c",
                        "-i",
                        &client_id,
                        "-t",
                        &topic,
                        "-v",
                    ])
                    .stdout(Stdio::piped())
                    .stderr(Stdio::null())
                    .spawn();
                let Ok(mut child) = child else {
                    std::thread::sleep(Duration::from_millis(100));
                    continue;
                };
                *pid_slot.lock().unwrap() = Some(child.id());
                let _ = ready_tx.send(());
                if let Some(stdout) = child.stdout.take() {
                    for line in std::io::BufReader::new(stdout).lines() {
                        let Ok(line) = line else { break };
                        let (t, p) = line.split_once(' ').unwrap_or((&line, ""));
                        sink.lock().unwrap().push((t.to_string(), p.to_string()));
                    }
                }
                let _ = child.kill();
                let _ = child.wait();
                *pid_slot.lock().unwrap() = None;
                std::thread::sleep(Duration::from_millis(100));
            }
        });
        let _ = ready_rx.recv_timeout(Duration::from_secs(5));
        // mosquitto_sub has subscribed once it is connected; give it a moment.
        std::thread::sleep(Duration::from_millis(300));
        Subscriber {
            got,
            stop,
            pid,
            thread: Some(thread),
        }
    }

    /// Everything received so far.
    pub fn received(&self) -> Vec<(String, String)> {
        self.got.lock().unwrap().clone()
    }

    /// Waits until `pred` holds over everything received (up to `limit`).
    pub fn wait_until(
        &self,
        limit: Duration,
        pred: impl Fn(&[(String, String)]) -> bool,
    ) -> Vec<(String, String)> {
        let deadline = Instant::now() + limit;
        loop {
            let got = self.received();
            if pred(&got) {
                return got;
            }
            assert!(
                Instant::now() < deadline,
                "cloud subscriber condition not met within {limit:?}; got {} messages, last: {:?}",
                got.len(),
                got.last()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Subscriber {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        if let Some(pid) = *self.pid.lock().unwrap() {
            signal(pid, "KILL");
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A TCP proxy on a free 127.0.0.1 port in front of `target_port`; [`TcpProxy::cut`] drops
/// every connection and refuses new ones until [`TcpProxy::heal`] (a network partition).
pub struct TcpProxy {
    pub port: u16,
    cut: std::sync::Arc<std::sync::atomic::AtomicBool>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    conns: std::sync::Arc<std::sync::Mutex<Vec<TcpStream>>>,
}

impl TcpProxy {
    pub fn start(target_port: u16) -> TcpProxy {
        use std::sync::atomic::{AtomicBool, Ordering};
        use std::sync::{Arc, Mutex};
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let port = listener.local_addr().unwrap().port();
        let cut = Arc::new(AtomicBool::new(false));
        let stop = Arc::new(AtomicBool::new(false));
        let conns: Arc<Mutex<Vec<TcpStream>>> = Arc::new(Mutex::new(Vec::new()));
        let (c, s, k) = (cut.clone(), stop.clone(), conns.clone());
        std::thread::spawn(move || {
            while !s.load(Ordering::SeqCst) {
                match listener.accept() {
                    Ok((client, _)) => {
                        if c.load(Ordering::SeqCst) {
                            drop(client);
                            continue;
                        }
                        let _ = client.set_nonblocking(false);
                        let Ok(server) = TcpStream::connect(("127.0.0.1", target_port)) else {
                            continue;
                        };
                        let _ = client.set_nodelay(true);
                        let _ = server.set_nodelay(true);
                        {
                            let mut k = k.lock().unwrap();
                            k.push(client.try_clone().unwrap());
                            k.push(server.try_clone().unwrap());
                        }
                        for (mut from, mut to) in [
                            (client.try_clone().unwrap(), server.try_clone().unwrap()),
                            (server, client),
                        ] {
                            std::thread::spawn(move || {
                                let _ = std::io::copy(&mut from, &mut to);
                                let _ = to.shutdown(std::net::Shutdown::Both);
                            });
                        }
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        TcpProxy {
            port,
            cut,
            stop,
            conns,
        }
    }

    /// Drops every open connection and refuses new ones.
    pub fn cut(&self) {
        self.cut.store(true, std::sync::atomic::Ordering::SeqCst);
        for c in self.conns.lock().unwrap().drain(..) {
            let _ = c.shutdown(std::net::Shutdown::Both);
        }
    }

    /// Accepts connections again.
    pub fn heal(&self) {
        self.cut.store(false, std::sync::atomic::Ordering::SeqCst);
    }
}

impl Drop for TcpProxy {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        self.cut();
    }
}

/// A raw MQTT 3.1.1 CONNECT (clean session), for tests that must control every byte: a
/// keep-alive of 0, a client id rumqttd refuses, a client that never reads. `login`: user and
/// password.
pub fn raw_connect_v4(client_id: &str, login: Option<(&str, &str)>, keep_alive: u16) -> Vec<u8> {
    let flags = if login.is_some() { 0xC2 } else { 0x02 };
    let mut body = vec![0x00, 0x04, b'M', b'Q', b'T', b'T', 0x04, flags];
    body.extend_from_slice(&keep_alive.to_be_bytes());
    let (user, password) = login.unzip();
    for field in std::iter::once(client_id).chain(user).chain(password) {
        body.extend_from_slice(&(field.len() as u16).to_be_bytes());
        body.extend_from_slice(field.as_bytes());
    }
    assert!(body.len() < 128, "one-byte remaining length");
    let mut packet = vec![0x10, body.len() as u8];
    packet.extend(body);
    packet
}

/// MQTT's variable-length "remaining length" of a fixed header.
pub fn remaining_length(mut n: usize) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let mut b = (n % 128) as u8;
        n /= 128;
        if n > 0 {
            b |= 0x80;
        }
        out.push(b);
        if n == 0 {
            return out;
        }
    }
}

/// A raw MQTT 3.1.1 QoS 1 PUBLISH with packet id `pkid` (the topic as bytes, so tests can send
/// invalid UTF-8).
pub fn raw_publish_qos1_v4(pkid: u16, topic: &[u8], payload: &[u8]) -> Vec<u8> {
    let mut body = (topic.len() as u16).to_be_bytes().to_vec();
    body.extend_from_slice(topic);
    body.extend_from_slice(&pkid.to_be_bytes());
    body.extend_from_slice(payload);
    let mut p = vec![0x32];
    p.extend(remaining_length(body.len()));
    p.extend(body);
    p
}

/// A raw MQTT 3.1.1 SUBSCRIBE of one filter at QoS 0.
pub fn raw_subscribe_v4(pkid: u16, filter: &str) -> Vec<u8> {
    let mut body = pkid.to_be_bytes().to_vec();
    body.extend_from_slice(&(filter.len() as u16).to_be_bytes());
    body.extend_from_slice(filter.as_bytes());
    body.push(0x00);
    assert!(body.len() < 128, "one-byte remaining length");
    let mut packet = vec![0x82, body.len() as u8];
    packet.extend(body);
    packet
}
