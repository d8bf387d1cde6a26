//! Device simulators and mapper processes: scripted Python peers, socat pty pairs, mapper
//! binaries against a node.

use super::*;

/// A scripted Python peer (a device simulator): its stdout lines are collected, its stderr kept
/// for error messages, and `start` returns once it printed `READY`. Killed on drop.
pub struct ScriptPeer {
    child: Child,
    lines: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
    errs: std::sync::Arc<std::sync::Mutex<String>>,
}

impl ScriptPeer {
    /// Runs `script args` with the test Python and waits up to `ready_within` for `READY`;
    /// `packages` names what to install when the script cannot import them.
    pub fn start(
        script: &str,
        args: &[String],
        packages: &str,
        ready_within: Duration,
    ) -> ScriptPeer {
        use std::io::BufRead;
        require(&python());
        let mut child = Command::new(python())
            .arg(script)
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let lines = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let errs = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
        let (out, l) = (child.stdout.take().unwrap(), lines.clone());
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(out).lines().map_while(Result::ok) {
                l.lock().unwrap().push(line);
            }
        });
        let (err, e) = (child.stderr.take().unwrap(), errs.clone());
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(err).lines().map_while(Result::ok) {
                let mut e = e.lock().unwrap();
                e.push_str(&line);
                e.push('\n');
            }
        });
        let mut peer = ScriptPeer { child, lines, errs };
        let deadline = Instant::now() + ready_within;
        while !peer.lines().iter().any(|l| l == "READY") {
            if let Ok(Some(status)) = peer.child.try_wait() {
                let e = peer.errs.lock().unwrap().clone();
                assert!(
                    !e.contains("No module named"),
                    "{packages} is not installed; run ./test.sh: {e}"
                );
                panic!("{script} exited ({status}): {e}");
            }
            assert!(
                Instant::now() < deadline,
                "{script} not ready: {}",
                peer.errs.lock().unwrap()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        peer
    }

    /// Every stdout line so far.
    pub fn lines(&self) -> Vec<String> {
        self.lines.lock().unwrap().clone()
    }

    /// The stdout lines that are JSON, in order.
    pub fn json_lines(&self) -> Vec<Value> {
        self.lines
            .lock()
            .unwrap()
            .iter()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    /// Kills the peer (SIGKILL).
    pub fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for ScriptPeer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A linked pair of pseudo terminals made by socat (one end for a scripted device, the other for
/// the mapper); killed on drop.
pub struct PtyPair {
    child: Child,
    /// One end (`/dev/pts/N`).
    pub a: String,
    /// The other end.
    pub b: String,
}

impl PtyPair {
    /// Starts socat and waits (up to 10 s each) for the two pty names it prints.
    pub fn new() -> PtyPair {
        require("socat");
        let mut child = Command::new("socat")
            .args(["-d", "-d", "pty,raw,echo=0", "pty,raw,echo=0"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let err = std::io::BufReader::new(child.stderr.take().unwrap());
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            use std::io::BufRead;
            for line in err.lines() {
                let Ok(line) = line else { break };
                // "... N PTY is /dev/pts/7"
                if let Some(p) = line.split("PTY is ").nth(1) {
                    let _ = tx.send(p.trim().to_string());
                }
            }
        });
        let a = rx.recv_timeout(Duration::from_secs(10)).unwrap();
        let b = rx.recv_timeout(Duration::from_secs(10)).unwrap();
        PtyPair { child, a, b }
    }
}

impl Default for PtyPair {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for PtyPair {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A mapper binary running against a node (`--broker 127.0.0.1:{node.port}`), its stderr in
/// `mapper.log` beside the node's files; killed on drop.
pub struct MapperProcess {
    child: Child,
    log: PathBuf,
}

impl MapperProcess {
    /// Starts `bin` against `node` with extra environment variables.
    pub fn start(node: &Node, bin: &str, env: &[(&str, &std::ffi::OsStr)]) -> MapperProcess {
        Self::start_at(node, &format!("127.0.0.1:{}", node.port), bin, env)
    }

    /// Starts `bin` against `broker` (`host:port`, one of `node`'s listeners) with extra
    /// environment variables.
    pub fn start_at(
        node: &Node,
        broker: &str,
        bin: &str,
        env: &[(&str, &std::ffi::OsStr)],
    ) -> MapperProcess {
        let log = node.dir.path().join("mapper.log");
        let mut c = Command::new(bin);
        c.args(["--broker", broker]);
        for (k, v) in env {
            c.env(k, v);
        }
        let child = c
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {bin}: {e}"));
        MapperProcess { child, log }
    }

    /// What the mapper logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Fails the test if the mapper has exited.
    pub fn assert_running(&mut self) {
        assert!(
            self.child.try_wait().unwrap().is_none(),
            "mapper exited:\n{}",
            self.log()
        );
    }

    /// Kills the mapper with SIGKILL (no clean stop: only its MQTT will says it is gone) and
    /// reaps it.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Asserts the mapper still runs, then stops it with SIGTERM and expects exit code 0 within 5 s.
    pub fn assert_running_then_stop_cleanly(&mut self) {
        self.assert_running();
        signal(self.child.id(), "TERM");
        let status = wait_exit(&mut self.child, Duration::from_secs(5));
        assert!(
            status.success(),
            "exit {status} after SIGTERM:\n{}",
            self.log()
        );
    }
}

impl Drop for MapperProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
