//! A private Docker daemon for tests: its own unix socket, data root, exec root and pid file under
//! a temp dir, no bridge network and no iptables changes, so it never touches the host's Docker.
//! The image `bb:local` is built without any registry (`docker import` of a folder holding the
//! static busybox). A missing `dockerd`, `docker` or `busybox` fails the test (test.sh installs
//! docker.io and busybox-static). A watchdog shell stops the daemon and deletes its directory when
//! the test process exits.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// The image every container test runs: a root file system holding only `/bin/busybox`.
pub const IMAGE: &str = "bb:local";

/// The test process's private Docker daemon.
pub struct Daemon {
    /// Its API socket.
    pub socket: PathBuf,
    /// Outlives this process on purpose: it stops dockerd when we are gone.
    _watchdog: std::process::Child,
}

static DAEMON: OnceLock<Daemon> = OnceLock::new();

/// A program from PATH or one of `extra`.
fn find(program: &str, extra: &[&str]) -> PathBuf {
    let from_path = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .unwrap_or_default();
    from_path
        .into_iter()
        .chain(extra.iter().map(PathBuf::from))
        .map(|d| d.join(program))
        .find(|p| p.is_file())
        .unwrap_or_else(|| {
            panic!("{program} not found: install docker.io and busybox-static (test.sh does)")
        })
}

/// The daemon of this test process, started on first use.
pub fn daemon() -> &'static Daemon {
    DAEMON.get_or_init(start_daemon)
}

fn start_daemon() -> Daemon {
    let dockerd = find("dockerd", &["/usr/sbin", "/usr/bin"]);
    let docker = find("docker", &["/usr/bin"]);
    let busybox = find("busybox", &["/bin", "/usr/bin"]);
    let dir = tempfile::Builder::new()
        .prefix("etd-")
        .tempdir_in("/tmp")
        .unwrap()
        .keep();
    let socket = dir.join("d.sock");
    let script = r#"
        "$DOCKERD" --host "unix://$D/d.sock" --data-root "$D/data" --exec-root "$D/exec" \
            --pidfile "$D/dockerd.pid" --bridge=none --iptables=false --ip6tables=false \
            >"$D/dockerd.log" 2>&1 &
        DPID=$!
        while kill -0 "$PARENT" 2>/dev/null && kill -0 "$DPID" 2>/dev/null; do sleep 0.5; done
        kill "$DPID" 2>/dev/null
        wait "$DPID"
        rm -rf "$D"
    "#;
    let watchdog = Command::new("sh")
        .arg("-c")
        .arg(script)
        .env("DOCKERD", &dockerd)
        .env("D", &dir)
        .env("PARENT", std::process::id().to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn the dockerd watchdog");
    let host = format!("unix://{}", socket.display());
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let ok = Command::new(&docker)
            .args(["-H", &host, "info"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if ok {
            break;
        }
        if Instant::now() > deadline {
            let log = std::fs::read_to_string(dir.join("dockerd.log")).unwrap_or_default();
            panic!("dockerd did not come up at {host} within 90 s; its log:\n{log}");
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    // bb:local: a root file system holding only /bin/busybox.
    let root = dir.join("image-root");
    std::fs::create_dir_all(root.join("bin")).unwrap();
    std::fs::copy(&busybox, root.join("bin/busybox")).unwrap();
    let status = Command::new("sh")
        .arg("-c")
        .arg(r#"tar -C "$ROOT" -c . | "$DOCKER" -H "$HOST" import - "$IMAGE" >/dev/null"#)
        .env("ROOT", &root)
        .env("DOCKER", &docker)
        .env("HOST", &host)
        .env("IMAGE", IMAGE)
        .status()
        .unwrap();
    assert!(status.success(), "docker import of {IMAGE} failed");
    Daemon {
        socket,
        _watchdog: watchdog,
    }
}
