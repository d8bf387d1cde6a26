//! Test harness shared by every crate's integration tests: starts the real `edgetwin` binary on
//! free loopback ports in a temp dir and drives it only with third-party clients
//! (mosquitto_pub/sub/rr, and paho-mqtt through `clients/mqtt_probe.py`).
//!
//! Peers are never skipped: a missing one fails the test with a pointer to `./test.sh`, which
//! installs them.
#![allow(clippy::unwrap_used, clippy::missing_panics_doc, missing_docs)]

pub mod corpus;
pub mod docker;
mod mqtt;
mod node;
mod peers;
mod pki;

pub use mqtt::*;
pub use node::*;
pub use peers::*;
pub use pki::Pki;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

/// Polls `probe` every 20 ms until it returns something, for at most `within`.
pub fn wait_for<T>(within: Duration, mut probe: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + within;
    loop {
        if let Some(v) = probe() {
            return Some(v);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A loopback port for a server the test starts, free right now and not handed out before by
/// this process.
///
/// Not `bind(0)`: the kernel hands those out of the ephemeral range (`ip_local_port_range`,
/// 32768–60999 by default), the same range every outgoing connection takes its local port from,
/// so between our probe and the server's bind a client's connection could take the port. These
/// come from 10000–32767 instead, starting at a point drawn from the process id so that test
/// binaries running side by side walk different stretches, and never repeat within a process.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    const LOW: u32 = 10_000;
    const SPAN: u32 = 32_768 - LOW;
    static NEXT: AtomicU32 = AtomicU32::new(u32::MAX);
    let _ = NEXT.compare_exchange(
        u32::MAX,
        std::process::id().wrapping_mul(2_654_435_761) % SPAN,
        Ordering::SeqCst,
        Ordering::SeqCst,
    );
    for _ in 0..SPAN {
        let n = NEXT.fetch_add(1, Ordering::SeqCst) % SPAN;
        let port = u16::try_from(LOW + n).unwrap();
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free loopback port in {LOW}..32768");
}

/// Fails (never skips) when a peer program is missing: `./test.sh` installs them.
pub fn require(program: &str) {
    let found = Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {program}"))
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    assert!(
        found,
        "peer `{program}` is not installed; run ./test.sh, which installs every peer"
    );
}

/// The Python interpreter that has the peers' packages.
pub fn python() -> String {
    std::env::var("EDGETWIN_TEST_PYTHON").unwrap_or_else(|_| "python3".into())
}

pub fn signal(pid: u32, sig: &str) {
    let _ = Command::new("kill")
        .args([&format!("-{sig}"), &pid.to_string()])
        .status();
}

pub(crate) fn wait_exit(child: &mut Child, limit: Duration) -> std::process::ExitStatus {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(s) = child.try_wait().unwrap() {
            return s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("process did not exit within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The repository's root folder (for the files the tests read: packaging, examples, docs).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The answer to [`http_get`].
#[derive(Debug, Clone)]
pub struct HttpReply {
    /// The status code (0 when the status line does not parse).
    pub status: u16,
    /// The status line and headers.
    pub head: String,
    /// Everything after the headers, as sent (chunked bodies are not decoded).
    pub body: String,
}

impl HttpReply {
    /// The value of header `name` (any case).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.head.lines().find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case(name).then(|| v.trim())
        })
    }
}

/// A plain HTTP/1.1 GET to `127.0.0.1:port` with extra request `headers`, the connection closed
/// after the answer (5 s to read it).
pub fn http_get(port: u16, path: &str, headers: &[(&str, &str)]) -> std::io::Result<HttpReply> {
    let mut s = TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    let extra: String = headers
        .iter()
        .map(|(k, v)| format!("{k}: {v}\r\n"))
        .collect();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: localhost\r\n{extra}Connection: close\r\n\r\n"
    )?;
    let mut buf = String::new();
    s.read_to_string(&mut buf)?;
    let (head, body) = buf.split_once("\r\n\r\n").unwrap_or((buf.as_str(), ""));
    Ok(HttpReply {
        status: head
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or(0),
        head: head.to_string(),
        body: body.to_string(),
    })
}

/// The status of `GET path` on `127.0.0.1:port`, `None` when nothing answers.
pub fn http_status(port: u16, path: &str) -> Option<u16> {
    http_get(port, path, &[]).ok().map(|r| r.status)
}

pub fn run(c: &mut Command) -> Output {
    c.output()
        .unwrap_or_else(|e| panic!("cannot run {c:?}: {e}"))
}
