//! Hostile input is harmless: a seeded corpus of bad bytes, bad MQTT packets and bad payloads on
//! every port of the node, then a normal client is still served, nothing panicked, `/readyz`
//! still answers and the node's memory is back within 32 MiB of where it was before.
#![allow(clippy::unwrap_used)]

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use edgetwin_testkit::*;
use rand::{Rng, SeedableRng};

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

/// Sends `bytes` on a fresh connection and reads whatever comes back for a moment; the node may
/// close the connection at any point.
fn throw(port: u16, bytes: &[u8]) {
    let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) else {
        return;
    };
    s.set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    s.set_write_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    let _ = s.write_all(bytes);
    let mut sink = [0u8; 4096];
    let _ = s.read(&mut sink);
}

/// Connects as an anonymous MQTT 3.1.1 client, sends every publish and returns how many PUBACKs
/// came back (each publish on a stored topic is answered, even a rejected one).
fn publish_all(port: u16, publishes: &[Vec<u8>]) -> usize {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(&raw_connect_v4("hostile-payloads", None, 30))
        .unwrap();
    let mut connack = [0u8; 4];
    s.read_exact(&mut connack).unwrap();
    assert_eq!(connack, [0x20, 0x02, 0x00, 0x00], "CONNACK");
    for p in publishes {
        s.write_all(p).unwrap();
    }
    let mut acks = 0;
    let mut buf = [0u8; 4];
    while acks < publishes.len() {
        match s.read_exact(&mut buf) {
            Ok(()) if buf[0] == 0x40 => acks += 1,
            _ => break,
        }
    }
    acks
}

#[test]
fn hostile_input_on_every_port_leaves_the_node_serving_with_bounded_memory() {
    let mut rng = rand::rngs::StdRng::seed_from_u64(
        std::env::var("EDGETWIN_HOSTILE_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(5),
    );
    let mut node = Node::start(&["h-1"]);
    node.pub_("dt/h-1/desired", r#"{"mode":"before"}"#);
    node.twin_until("h-1", |t| t["desired"]["mode"] == "before");
    let pid = node.pid();
    let before = rss_kib(pid);
    let ports = [node.port, node.port_v5, node.http_port];

    // 1. Random bytes, random lengths, on every port.
    for i in 0..300 {
        let len = rng.random_range(1..if i % 10 == 0 { 65_536 } else { 512 });
        let bytes: Vec<u8> = (0..len).map(|_| rng.random()).collect();
        throw(ports[i % ports.len()], &bytes);
    }
    // 2. Broken MQTT on both MQTT ports.
    let huge_len = [0x10, 0xFF, 0xFF, 0xFF, 0x7F];
    let five_byte_len = [0x10, 0xFF, 0xFF, 0xFF, 0xFF, 0x01];
    let bad_name = b"\x10\x0c\x00\x04MQXX\x04\x02\x00\x1e\x00\x00".to_vec();
    let publish_first = raw_publish_qos1_v4(1, b"dt/h-1/desired", b"{}");
    let mut v5_props = vec![0x00, 0x04, b'M', b'Q', b'T', b'T', 0x05, 0x02, 0x00, 0x1e];
    let props: Vec<u8> = (0..10_000)
        .flat_map(|_| [0x26u8, 0x00, 0x01, b'k', 0x00, 0x01, b'v'])
        .collect();
    v5_props.extend(remaining_length(props.len()));
    v5_props.extend(props);
    v5_props.extend([0x00, 0x01, b'x']);
    let mut v5_connect = vec![0x10];
    v5_connect.extend(remaining_length(v5_props.len()));
    v5_connect.extend(v5_props);
    let mut bad_v5_prop = vec![
        0x10, 0x0e, 0x00, 0x04, b'M', b'Q', b'T', b'T', 0x05, 0x02, 0x00, 0x1e,
    ];
    bad_v5_prop.extend([0x01, 0x7F, 0x00, 0x00]);
    let mut connect_then_bad_topic = raw_connect_v4("hostile-utf8", None, 30);
    connect_then_bad_topic.extend(raw_publish_qos1_v4(2, b"dt/\xff\xfe/desired", b"{}"));
    let mut connect_then_truncated = raw_connect_v4("hostile-cut", None, 30);
    connect_then_truncated.extend(&raw_publish_qos1_v4(3, b"dt/h-1/desired", &[b'x'; 1000])[..500]);
    for port in [node.port, node.port_v5] {
        for bytes in [
            &huge_len[..],
            &five_byte_len[..],
            &bad_name,
            &publish_first,
            &v5_connect,
            &bad_v5_prop,
            &connect_then_bad_topic,
            &connect_then_truncated,
        ] {
            throw(port, bytes);
        }
    }
    // 3. Well-formed MQTT, hostile payloads on stored and unstored topics.
    let deep = "[".repeat(100_000);
    let many: String = format!(
        "{{{}}}",
        (0..10_000)
            .map(|i| format!("\"p{i}\":{i}"))
            .collect::<Vec<_>>()
            .join(",")
    );
    let laughs = {
        let mut y = String::from(
            "a: &a [\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\"]\n",
        );
        for (i, c) in ('b'..='i').enumerate() {
            let prev = (b'a' + i as u8) as char;
            y.push_str(&format!("{c}: &{c} [*{prev},*{prev},*{prev},*{prev},*{prev},*{prev},*{prev},*{prev},*{prev}]\n"));
        }
        serde_json::json!({"id": "laughs", "files": [{"name": "laughs.yaml", "content": y}]})
            .to_string()
    };
    let big_string = format!("{{\"mode\":\"{}\"}}", "x".repeat(200_000));
    let garbage: Vec<u8> = (0..4096).map(|_| rng.random()).collect();
    let payloads: Vec<(&str, Vec<u8>)> = vec![
        ("dt/h-1/desired", deep.into_bytes()),
        ("dt/h-1/desired", many.into_bytes()),
        ("dt/h-1/desired", b"{\"mode\": 1e999999}".to_vec()),
        ("dt/h-1/desired", big_string.into_bytes()),
        ("dt/h-1/desired", b"\xff\xfe{\"mode\":\"x\"}".to_vec()),
        ("dt/h-1/desired", garbage.clone()),
        ("dt/h-1/reported", garbage.clone()),
        ("dt/nobody/desired", b"{\"mode\":\"x\"}".to_vec()),
        ("dt/h-1/get", garbage.clone()),
        ("node/devices/apply", laughs.into_bytes()),
        ("node/devices/apply", garbage),
    ];
    let publishes: Vec<Vec<u8>> = payloads
        .iter()
        .enumerate()
        .map(|(i, (t, p))| raw_publish_qos1_v4(i as u16 + 1, t.as_bytes(), p))
        .collect();
    let acked = publish_all(node.port, &publishes);
    assert_eq!(
        acked,
        publishes.len(),
        "every well-formed publish is acknowledged"
    );

    // Then: a normal client is served, on both ports and versions.
    node.pub_("dt/h-1/desired", r#"{"mode":"after"}"#);
    node.twin_until("h-1", |t| t["desired"]["mode"] == "after");
    let got = probe(node.port_v5, true, &["dt/h-1/twin"], &[], 1, &[]);
    assert_eq!(payload(&got[0])["desired"]["mode"], "after");
    assert_eq!(node.http_get("/readyz").unwrap().0, 200);
    node.assert_running();
    let log = node.log();
    assert!(!log.contains("panicked"), "a panic:\n{log}");
    // Memory comes back near where it was (the allocator keeps some).
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut after = rss_kib(pid);
    while after > before + 32 * 1024 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(200));
        after = rss_kib(pid);
    }
    assert!(
        after <= before + 32 * 1024,
        "RSS {before} KiB before the corpus, {after} KiB after"
    );
    eprintln!("RSS {before} KiB before the corpus, {after} KiB after");
}
