//! The Debian package, installed as an operator installs it: built by `packaging/build-deb.sh`
//! (cargo-deb; here from the debug binaries the test run already built), installed with dpkg
//! into a scratch Debian root (debootstrap minbase, cached under `target/test-cache/`), the node
//! started there exactly as the unit's `ExecStart` says, as the package's system user, then
//! upgraded over its own data and config.
//!
//! Peers: cargo-deb, debootstrap (Debian's mirror, for the scratch root), dpkg-deb, chroot.

#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use edgetwin_testkit::*;

/// The target dir this test runs from (`target/debug/deps/<test>` → `target`).
fn target_dir() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    exe.ancestors().nth(3).unwrap().to_path_buf()
}

fn ok(c: &mut Command) -> String {
    let out = run(c);
    assert!(
        out.status.success(),
        "{c:?} failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).to_string()
}

/// A fresh Debian bookworm minbase root (with adduser and the node's one shared library
/// beyond libc, libdbus) in `dir`: unpacked from the cached tarball, made once by debootstrap.
fn scratch_root(dir: &Path) -> PathBuf {
    let cache = target_dir().join("test-cache");
    std::fs::create_dir_all(&cache).unwrap();
    let tarball = cache.join("bookworm-minbase.tar");
    if !tarball.exists() {
        let build = cache.join(format!("bookworm-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&build);
        ok(Command::new("debootstrap")
            .args([
                "--variant=minbase",
                "--include=adduser,libdbus-1-3",
                "bookworm",
            ])
            .arg(&build)
            .arg("http://deb.debian.org/debian"));
        let partial = cache.join(format!("bookworm-{}.tar", std::process::id()));
        ok(Command::new("tar")
            .arg("-C")
            .arg(&build)
            .arg("-cf")
            .arg(&partial)
            .arg("."));
        std::fs::rename(&partial, &tarball).unwrap();
        let _ = std::fs::remove_dir_all(&build);
    }
    let root = dir.join("root");
    std::fs::create_dir_all(&root).unwrap();
    ok(Command::new("tar")
        .arg("-C")
        .arg(&root)
        .arg("-xf")
        .arg(&tarball));
    root
}

/// Builds the package with `version` into `out`, from the binaries already built.
fn build_deb(version: &str, out: &Path) -> PathBuf {
    for (package, bin) in [
        ("edgetwin-node", "edgetwin"),
        ("edgetwin-mapper-modbus", "edgetwin-mapper-modbus"),
        ("edgetwin-mapper-opcua", "edgetwin-mapper-opcua"),
        ("edgetwin-mapper-serial", "edgetwin-mapper-serial"),
        ("edgetwin-mapper-ble", "edgetwin-mapper-ble"),
    ] {
        workspace_bin(package, bin);
    }
    let deb = out.join(format!("edgetwin_{version}_amd64.deb"));
    ok(Command::new(repo_root().join("packaging/build-deb.sh"))
        .args([
            "--profile",
            "dev",
            "--no-build",
            "--fast",
            "--deb-version",
            version,
        ])
        .arg("--output")
        .arg(&deb)
        .env("CARGO_TARGET_DIR", target_dir()));
    deb
}

fn chroot(root: &Path) -> Command {
    chroot_as(root, None)
}

fn chroot_as(root: &Path, user: Option<&str>) -> Command {
    let mut c = Command::new("chroot");
    if let Some(u) = user {
        c.arg(format!("--userspec={u}:{u}"));
    }
    c.arg(root).env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin");
    c
}

fn dpkg_install(root: &Path, deb: &Path) {
    let name = deb.file_name().unwrap();
    std::fs::copy(deb, root.join("tmp").join(name)).unwrap();
    ok(chroot(root)
        .args(["dpkg", "-i"])
        .arg(Path::new("/tmp").join(name))
        .env("DEBIAN_FRONTEND", "noninteractive"));
}

/// The node started in the root as the installed unit says (its `ExecStart`, as its `User=`).
struct Installed {
    child: std::process::Child,
    http: u16,
    log: PathBuf,
}

impl Installed {
    fn start(root: &Path, http: u16) -> Installed {
        let unit =
            std::fs::read_to_string(root.join("lib/systemd/system/edgetwin.service")).unwrap();
        let field = |k: &str| {
            unit.lines()
                .find_map(|l| l.strip_prefix(k))
                .unwrap_or_else(|| panic!("installed unit has no {k}"))
                .to_string()
        };
        let exec = field("ExecStart=");
        let user = field("User=");
        let log = root.join("tmp/node.log");
        let stderr = std::fs::File::create(&log).unwrap();
        let child = chroot_as(root, Some(&user))
            .args(exec.split_whitespace())
            .env("EDGETWIN_LOG", "info")
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .unwrap();
        let mut node = Installed { child, http, log };
        node.ready();
        node
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn ready(&mut self) {
        let child = &mut self.child;
        let http = self.http;
        let exited = wait_for(Duration::from_secs(30), || {
            if let Ok(Some(status)) = child.try_wait() {
                return Some(Err(status));
            }
            http_status(http, "/readyz").filter(|s| *s == 200).map(Ok)
        });
        match exited {
            Some(Ok(_)) => {}
            Some(Err(status)) => panic!("installed node exited ({status}):\n{}", self.log()),
            None => panic!("installed node not ready:\n{}", self.log()),
        }
    }

    fn stop(mut self) {
        signal(self.child.id(), "TERM");
        let status = self.child.wait().unwrap();
        assert!(status.success(), "{status}:\n{}", self.log());
    }
}

#[test]
fn package_installs_into_a_fresh_debian_root_runs_as_its_unit_says_and_upgrades_keeping_config_and_data(
) {
    let work = tempfile::tempdir().unwrap();
    let v1 = build_deb("0.1.0-1", work.path());
    let v2 = build_deb("0.1.0-2", work.path());

    // What the package holds.
    let listing = ok(Command::new("dpkg-deb").arg("-c").arg(&v1));
    for path in [
        "./usr/bin/edgetwin",
        "./usr/bin/edgetwin-mapper-modbus",
        "./etc/edgetwin/node.yaml",
        "./lib/systemd/system/edgetwin.service",
        "./lib/systemd/system/edgetwin-mapper@.service",
        "./usr/share/man/man1/edgetwin-serve.1.gz",
        "./usr/share/bash-completion/completions/edgetwin",
        "./usr/share/doc/edgetwin/copyright",
        "./usr/share/doc/edgetwin/examples/profiles/modbus-power-meter.yaml",
    ] {
        assert!(
            listing.lines().any(|l| l.ends_with(path)),
            "{path} missing from the package:\n{listing}"
        );
    }
    let conffiles = ok(Command::new("dpkg-deb")
        .args(["-I"])
        .arg(&v1)
        .arg("conffiles"));
    assert!(conffiles.contains("/etc/edgetwin/node.yaml"), "{conffiles}");

    let root = scratch_root(work.path());
    dpkg_install(&root, &v1);
    let passwd = ok(chroot(&root).args(["getent", "passwd", "edgetwin"]));
    assert!(passwd.contains("/var/lib/edgetwin"), "{passwd}");
    let owner = ok(chroot(&root).args(["stat", "-c", "%U:%G %a", "/var/lib/edgetwin"]));
    assert_eq!(owner.trim(), "edgetwin:edgetwin 750");
    for bin in ["edgetwin", "edgetwin-mapper-modbus"] {
        let what = ok(Command::new("file").arg(root.join("usr/bin").join(bin)));
        assert!(what.contains(", stripped"), "{bin} not stripped: {what}");
    }
    let version = ok(chroot(&root).args(["/usr/bin/edgetwin", "--version"]));
    assert!(version.starts_with("edgetwin 0.1.0 (commit "), "{version}");

    // Local settings go in conf.d (ports free for this test run; the shipped file stays).
    let (http, mqtt, mqtt5) = (free_port(), free_port(), free_port());
    std::fs::write(
        root.join("etc/edgetwin/conf.d/50-test.yaml"),
        format!(
            "node_id: packaged\nmqtt:\n  listen: 127.0.0.1:{mqtt}\n  listen_v5: 127.0.0.1:{mqtt5}\nhttp:\n  listen: 127.0.0.1:{http}\n"
        ),
    )
    .unwrap();
    std::fs::write(
        root.join("etc/edgetwin/devices/meter.yaml"),
        std::fs::read_to_string(repo_root().join("examples/profiles/modbus-power-meter.yaml"))
            .unwrap(),
    )
    .unwrap();
    let node = Installed::start(&root, http);
    let meter = wait_for(Duration::from_secs(10), || {
        std::fs::read_dir(root.join("var/lib/edgetwin"))
            .ok()?
            .flatten()
            .any(|e| e.file_name() == "twins.redb")
            .then_some(())
    });
    assert!(
        meter.is_some(),
        "no twin store in /var/lib/edgetwin:\n{}",
        node.log()
    );
    // A desired value the upgrade must keep (the twin store in /var/lib/edgetwin).
    mosquitto_pub(mqtt, "dt/meter-7/desired", r#"{"setpoint": 23.5}"#, &[]);
    retained_until(mqtt, "dt/meter-7/twin", Duration::from_secs(10), |t| {
        t.is_some_and(|t| t["desired"]["setpoint"] == 23.5)
    });
    node.stop();

    // An operator's edit of the shipped file, which the upgrade must keep (a conffile).
    let shipped = root.join("etc/edgetwin/node.yaml");
    let edited = format!(
        "{}\n# edited on site\n",
        std::fs::read_to_string(&shipped).unwrap()
    );
    std::fs::write(&shipped, &edited).unwrap();
    dpkg_install(&root, &v2);
    assert_eq!(std::fs::read_to_string(&shipped).unwrap(), edited);
    assert!(root.join("etc/edgetwin/conf.d/50-test.yaml").exists());
    let mode = ok(chroot(&root).args(["stat", "-c", "%U:%G %a", "/etc/edgetwin/node.yaml"]));
    assert_eq!(
        mode.trim(),
        "root:edgetwin 640",
        "the node could not read its config"
    );
    let status = ok(chroot(&root).args(["dpkg-query", "-W", "-f=${Version}", "edgetwin"]));
    assert_eq!(status, "0.1.0-2");

    let node = Installed::start(&root, http);
    let twin = retained_until(mqtt, "dt/meter-7/twin", Duration::from_secs(10), |t| {
        t.is_some()
    })
    .unwrap();
    assert_eq!(
        twin["desired"]["setpoint"], 23.5,
        "lost in the upgrade: {twin}"
    );
    node.stop();
}

/// `docker -H unix://SOCKET` for the test's private daemon.
fn docker_cli() -> String {
    format!(
        "docker -H unix://{}",
        edgetwin_testkit::docker::daemon().socket.display()
    )
}

#[test]
fn package_the_container_image_builds_without_a_registry_and_runs_the_node_and_a_mapper() {
    workspace_bin("edgetwin-node", "edgetwin");
    workspace_bin("edgetwin-mapper-modbus", "edgetwin-mapper-modbus");
    let docker = docker_cli();
    let tag = format!("edgetwin:test-{}", std::process::id());
    ok(
        Command::new(repo_root().join("packaging/container/build.sh"))
            .args(["--profile", "dev", "--tag", &tag, "--docker", &docker])
            .args(["--bins", "edgetwin edgetwin-mapper-modbus"])
            .env("CARGO_TARGET_DIR", target_dir()),
    );
    let cli = |args: &[&str]| {
        let mut parts = docker.split_whitespace();
        let mut c = Command::new(parts.next().unwrap());
        c.args(parts).args(args);
        c
    };
    let version = ok(&mut cli(&["run", "--rm", &tag, "--version"]));
    assert!(version.starts_with("edgetwin 0.1.0 (commit "), "{version}");

    // The image's own command and config, its ports moved by a conf.d fragment (the test's
    // daemon has no bridge network: host networking, so the ports must be free ones).
    let conf = tempfile::tempdir().unwrap();
    let (http, mqtt, mqtt5) = (free_port(), free_port(), free_port());
    std::fs::write(
        conf.path().join("50-test.yaml"),
        format!(
            "node_id: boxed\nmqtt:\n  listen: 127.0.0.1:{mqtt}\n  listen_v5: 127.0.0.1:{mqtt5}\nhttp:\n  listen: 127.0.0.1:{http}\n"
        ),
    )
    .unwrap();
    let name = format!("edgetwin-node-{}", std::process::id());
    let mount = format!("{}:/etc/edgetwin/conf.d:ro", conf.path().display());
    ok(&mut cli(&[
        "run",
        "-d",
        "--name",
        &name,
        "--network",
        "host",
        "-v",
        &mount,
        &tag,
    ]));
    let logs = || {
        let out = run(&mut cli(&["logs", &name]));
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    };
    wait_for(Duration::from_secs(30), || {
        http_status(http, "/readyz").filter(|s| *s == 200)
    })
    .unwrap_or_else(|| panic!("the node in the container is not ready:\n{}", logs()));
    let user = ok(&mut cli(&["inspect", "-f", "{{.Config.User}}", &name]));
    assert_eq!(user.trim(), "10001:10001");

    // A mapper from the same image finds the node.
    let mapper = format!("edgetwin-mapper-{}", std::process::id());
    ok(&mut cli(&[
        "run",
        "-d",
        "--name",
        &mapper,
        "--network",
        "host",
        "--entrypoint",
        "/usr/bin/edgetwin-mapper-modbus",
        "-e",
        &format!("EDGETWIN_BROKER=127.0.0.1:{mqtt}"),
        &tag,
    ]));
    let up = wait_for(Duration::from_secs(30), || {
        let out =
            run(Command::new("curl").args(["-fsS", &format!("http://127.0.0.1:{http}/metrics")]));
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .any(|l| l == "edgetwin_mapper_up{protocol=\"modbus\"} 1")
            .then_some(())
    });
    let mapper_logs = run(&mut cli(&["logs", &mapper]));
    let _ = run(&mut cli(&["rm", "-f", &mapper]));
    ok(&mut cli(&["stop", "-t", "30", &name]));
    let exit = ok(&mut cli(&["inspect", "-f", "{{.State.ExitCode}}", &name]));
    let node_logs = logs();
    let _ = run(&mut cli(&["rm", "-f", &name]));
    let _ = run(&mut cli(&["rmi", "-f", &tag]));
    assert!(
        up.is_some(),
        "the mapper in its container never came up:\n{}",
        String::from_utf8_lossy(&mapper_logs.stderr)
    );
    assert_eq!(
        exit.trim(),
        "0",
        "the node did not stop cleanly:\n{node_logs}"
    );
}
