//! The container agent against a real Docker daemon started by this test binary: its own unix
//! socket, data root, exec root and pid file under a temp dir, no bridge network and no iptables
//! changes, so it never touches the host's Docker. The image `bb:local` is built without any
//! registry (`docker import` of a folder holding the static busybox). A missing `dockerd`,
//! `docker` or `busybox` fails the tests (test.sh installs docker.io and busybox-static).
//!
//! A watchdog shell stops the daemon and deletes its directory when this process exits.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use edgetwin_containers::{
    parse_desired, Agent, BackoffPolicy, CommandResult, ContainerRuntime, ContainerState,
    DesiredContainer, DockerRuntime, LogStream, RuntimeError,
};
use serde_json::{json, Value};

use edgetwin_testkit::docker::{daemon, IMAGE};

/// Reconciles own every managed container of the shared daemon: one at a time.
static RECONCILE_LOCK: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

struct Fixture {
    runtime: Arc<DockerRuntime>,
    agent: Agent,
    data: tempfile::TempDir,
}

fn fixture() -> Fixture {
    let runtime = Arc::new(DockerRuntime::new(&daemon().socket));
    let data = tempfile::tempdir().unwrap();
    let agent = Agent::new(runtime.clone(), data.path()).unwrap();
    Fixture {
        runtime,
        agent,
        data,
    }
}

async fn send(agent: &Agent, cmd: Value) -> CommandResult {
    let bytes = agent.handle_command(cmd.to_string().as_bytes()).await;
    serde_json::from_slice(&bytes).unwrap()
}

fn sleeper() -> Value {
    json!(["/bin/busybox", "sh", "-c", "echo a; echo b; sleep 3600"])
}

/// Stops within a second on SIGTERM (PID 1 ignores signals it has no handler for).
fn polite() -> Vec<String> {
    [
        "/bin/busybox",
        "sh",
        "-c",
        "trap 'exit 0' TERM; while true; do sleep 0.2; done",
    ]
    .map(String::from)
    .to_vec()
}

async fn cleanup(rt: &DockerRuntime, names: &[&str]) {
    for n in names {
        let _ = rt.remove(n, true).await;
    }
}

#[tokio::test]
async fn commands_run_starts_the_container_and_list_shows_it_running() {
    let f = fixture();
    let name = "cmd-run";
    cleanup(&f.runtime, &[name]).await;
    let r = send(
        &f.agent,
        json!({"id": "run-1", "action": "run", "name": name, "image": IMAGE, "args": sleeper(),
               "env": {"GREETING": "hi"}, "restart": "no"}),
    )
    .await;
    assert!(r.ok, "{r:?}");
    let c = r.container.unwrap();
    assert_eq!((c.name.as_str(), c.image.as_str()), (name, IMAGE));
    assert_eq!(c.state, ContainerState::Running);
    assert!(c.started_at.is_some());

    let l = send(&f.agent, json!({"id": "list-1", "action": "list"})).await;
    assert!(l.ok, "{l:?}");
    let listed = l.containers.unwrap();
    let mine = listed.iter().find(|c| c.name == name).unwrap();
    assert_eq!(mine.state, ContainerState::Running);
    cleanup(&f.runtime, &[name]).await;
}

#[tokio::test]
async fn commands_stop_leaves_the_container_exited_with_its_exit_code() {
    let f = fixture();
    let name = "cmd-stop";
    cleanup(&f.runtime, &[name]).await;
    let r = send(
        &f.agent,
        json!({"id": "stop-run", "action": "run", "name": name, "image": IMAGE, "args": sleeper()}),
    )
    .await;
    assert!(r.ok, "{r:?}");
    // busybox sh as PID 1 ignores SIGTERM: killed after the 1 s timeout.
    let s = send(
        &f.agent,
        json!({"id": "stop-1", "action": "stop", "name": name, "timeout_s": 1}),
    )
    .await;
    assert!(s.ok, "{s:?}");
    let c = s.container.unwrap();
    assert_eq!(c.state, ContainerState::Exited);
    assert_eq!(c.exit_code, Some(137));
    let info = f.runtime.inspect(name).await.unwrap();
    assert_eq!(info.state, ContainerState::Exited);
    cleanup(&f.runtime, &[name]).await;
}

fn script(sh: &str) -> Value {
    json!(["/bin/busybox", "sh", "-c", sh])
}

/// A runtime speaking at most API 1.41, the stop endpoint without `signal` (Debian 12's Docker
/// 20.10 speaks 1.41 anyway; on a newer daemon the pin keeps these tests on the kill path).
async fn runtime_1_41() -> Arc<DockerRuntime> {
    let rt = Arc::new(DockerRuntime::new(&daemon().socket).with_api_version(1, 41));
    assert_eq!(rt.api_version().await.unwrap(), "1.41");
    rt
}

#[tokio::test]
async fn daemon_api_version_is_negotiated() {
    let rt = DockerRuntime::new(&daemon().socket);
    let v = rt.api_version().await.unwrap();
    eprintln!("the test daemon speaks API {v}");
    assert!(v.starts_with("1."), "{v}");
}

#[tokio::test]
async fn stop_with_sigkill_on_api_1_41_kills_a_container_ignoring_term_at_once() {
    let rt = runtime_1_41().await;
    let data = tempfile::tempdir().unwrap();
    let agent = Agent::new(rt.clone(), data.path()).unwrap();
    let name = "stop-kill-141";
    cleanup(&rt, &[name]).await;
    let r = send(
        &agent,
        json!({"id": "sk-run", "action": "run", "name": name, "image": IMAGE,
               "args": script("trap '' TERM; while true; do sleep 0.2; done")}),
    )
    .await;
    assert!(r.ok, "{r:?}");
    let t0 = Instant::now();
    let s = send(
        &agent,
        json!({"id": "sk-stop", "action": "stop", "name": name, "signal": "SIGKILL", "timeout_s": 30}),
    )
    .await;
    let took = t0.elapsed();
    assert!(s.ok, "{s:?}");
    let c = s.container.unwrap();
    assert_eq!((c.state, c.exit_code), (ContainerState::Exited, Some(137)));
    assert!(
        took < Duration::from_secs(5),
        "stop took {took:?}: the signal was ignored"
    );
    cleanup(&rt, &[name]).await;
}

#[tokio::test]
async fn stop_with_sigusr1_on_api_1_41_runs_the_containers_handler_and_it_stays_stopped() {
    let rt = runtime_1_41().await;
    let data = tempfile::tempdir().unwrap();
    let agent = Agent::new(rt.clone(), data.path()).unwrap();
    let name = "stop-usr1-141";
    cleanup(&rt, &[name]).await;
    let r = send(
        &agent,
        json!({"id": "su-run", "action": "run", "name": name, "image": IMAGE, "restart": "always",
               "args": script("trap 'exit 7' USR1; trap '' TERM; while true; do sleep 0.2; done")}),
    )
    .await;
    assert!(r.ok, "{r:?}");
    let t0 = Instant::now();
    let s = send(
        &agent,
        json!({"id": "su-stop", "action": "stop", "name": name, "signal": "SIGUSR1", "timeout_s": 30}),
    )
    .await;
    assert!(s.ok, "{s:?}");
    assert!(t0.elapsed() < Duration::from_secs(5), "{:?}", t0.elapsed());
    assert_eq!(
        s.container.unwrap().exit_code,
        Some(7),
        "the USR1 handler ran"
    );
    // Restart policy always: a stop must not be undone by the runtime. Proving that nothing
    // happens takes a wait; Docker's first restart would come after 100 ms.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let info = rt.inspect(name).await.unwrap();
    assert_eq!(
        (info.state, info.restart_count),
        (ContainerState::Exited, Some(0))
    );
    cleanup(&rt, &[name]).await;
}

#[tokio::test]
async fn stop_with_an_ignored_signal_on_api_1_41_kills_after_the_timeout() {
    let rt = runtime_1_41().await;
    let name = "stop-ignored-141";
    cleanup(&rt, &[name]).await;
    let spec = edgetwin_containers::ContainerSpec {
        args: polite_ignoring_usr1(),
        ..edgetwin_containers::ContainerSpec::new(name, IMAGE)
    };
    rt.run(&spec).await.unwrap();
    let t0 = Instant::now();
    rt.stop(name, Some("SIGUSR1"), Some(Duration::from_secs(1)))
        .await
        .unwrap();
    let took = t0.elapsed();
    let info = rt.inspect(name).await.unwrap();
    assert_eq!(
        (info.state, info.exit_code),
        (ContainerState::Exited, Some(137))
    );
    assert!(
        took >= Duration::from_secs(1),
        "killed before the timeout: {took:?}"
    );
    assert!(took < Duration::from_secs(8), "{took:?}");
    // Stopping a stopped container is fine, as with the stop endpoint.
    rt.stop(name, Some("SIGUSR1"), None).await.unwrap();
    cleanup(&rt, &[name]).await;
}

fn polite_ignoring_usr1() -> Vec<String> {
    [
        "/bin/busybox",
        "sh",
        "-c",
        "trap '' USR1 TERM; while true; do sleep 0.2; done",
    ]
    .map(String::from)
    .to_vec()
}

#[tokio::test]
async fn commands_start_and_restart_bring_a_stopped_container_back() {
    let f = fixture();
    let name = "cmd-start";
    cleanup(&f.runtime, &[name]).await;
    let args: Vec<Value> = polite().into_iter().map(Value::from).collect();
    assert!(
        send(
            &f.agent,
            json!({"id": "st-run", "action": "run", "name": name, "image": IMAGE, "args": args})
        )
        .await
        .ok
    );
    let s = send(
        &f.agent,
        json!({"id": "st-stop", "action": "stop", "name": name}),
    )
    .await;
    assert_eq!(s.container.unwrap().exit_code, Some(0), "trap exits 0");
    let s = send(
        &f.agent,
        json!({"id": "st-start", "action": "start", "name": name}),
    )
    .await;
    assert_eq!(
        s.container.as_ref().unwrap().state,
        ContainerState::Running,
        "{s:?}"
    );
    let s = send(
        &f.agent,
        json!({"id": "st-restart", "action": "restart", "name": name, "timeout_s": 5}),
    )
    .await;
    assert_eq!(s.container.unwrap().state, ContainerState::Running);
    cleanup(&f.runtime, &[name]).await;
}

#[tokio::test]
async fn commands_remove_deletes_the_container() {
    let f = fixture();
    let name = "cmd-remove";
    cleanup(&f.runtime, &[name]).await;
    assert!(
        send(&f.agent, json!({"id": "rm-run", "action": "run", "name": name, "image": IMAGE, "args": sleeper()}))
            .await
            .ok
    );
    let refused = send(
        &f.agent,
        json!({"id": "rm-0", "action": "remove", "name": name}),
    )
    .await;
    assert!(!refused.ok, "a running container needs force: {refused:?}");
    let r = send(
        &f.agent,
        json!({"id": "rm-1", "action": "remove", "name": name, "force": true}),
    )
    .await;
    assert!(r.ok, "{r:?}");
    assert_eq!(
        f.runtime.inspect(name).await.unwrap_err(),
        RuntimeError::NoSuchContainer { name: name.into() }
    );
    let again = send(
        &f.agent,
        json!({"id": "rm-2", "action": "remove", "name": name}),
    )
    .await;
    assert!(!again.ok);
    assert_eq!(again.error.unwrap(), format!("no such container: {name}"));
}

#[tokio::test]
async fn commands_logs_return_the_last_lines() {
    let f = fixture();
    let name = "cmd-logs";
    cleanup(&f.runtime, &[name]).await;
    assert!(
        send(&f.agent, json!({"id": "logs-run", "action": "run", "name": name, "image": IMAGE, "args": sleeper()}))
            .await
            .ok
    );
    // The echoes happen right after start; wait until both are there.
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut n = 0;
    loop {
        n += 1;
        let all = send(
            &f.agent,
            json!({"id": format!("logs-all-{n}"), "action": "logs", "name": name}),
        )
        .await;
        let lines: Option<Vec<&str>> = all
            .logs
            .as_ref()
            .map(|l| l.iter().map(|l| l.line.as_str()).collect());
        if lines == Some(vec!["a", "b"]) {
            break;
        }
        assert!(Instant::now() < deadline, "logs never showed a, b: {all:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let last = send(
        &f.agent,
        json!({"id": "logs-tail", "action": "logs", "name": name, "tail": 1}),
    )
    .await;
    let last = last.logs.unwrap();
    assert_eq!(last.len(), 1);
    assert_eq!(
        (last[0].line.as_str(), last[0].stream, last[0].ts),
        ("b", LogStream::Stdout, None)
    );
    cleanup(&f.runtime, &[name]).await;
}

#[tokio::test]
async fn commands_logs_mark_streams_give_timestamps_and_honour_since() {
    let f = fixture();
    let name = "cmd-logs-streams";
    cleanup(&f.runtime, &[name]).await;
    let before = edgetwin_containers::commands::now_ms();
    assert!(
        send(
            &f.agent,
            json!({"id": "ls-run", "action": "run", "name": name, "image": IMAGE,
            "args": script("echo out1; echo err1 >&2; echo out2; echo err2 >&2; sleep 3600")})
        )
        .await
        .ok
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut n = 0;
    let lines = loop {
        n += 1;
        let r = send(
            &f.agent,
            json!({"id": format!("ls-{n}"), "action": "logs", "name": name, "timestamps": true}),
        )
        .await;
        assert!(r.ok, "{r:?}");
        let lines = r.logs.unwrap();
        if lines.len() == 4 {
            break lines;
        }
        assert!(Instant::now() < deadline, "never 4 lines: {lines:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let mut by_stream: Vec<(LogStream, &str)> =
        lines.iter().map(|l| (l.stream, l.line.as_str())).collect();
    // The two streams are logged apart, so their relative order is not guaranteed.
    by_stream.sort_by_key(|(s, l)| (*s == LogStream::Stderr, *l));
    assert_eq!(
        by_stream,
        vec![
            (LogStream::Stdout, "out1"),
            (LogStream::Stdout, "out2"),
            (LogStream::Stderr, "err1"),
            (LogStream::Stderr, "err2"),
        ]
    );
    for l in &lines {
        let ts = l.ts.expect("timestamps asked for");
        assert!(
            ts >= before - 2000 && ts <= edgetwin_containers::commands::now_ms(),
            "{l:?}"
        );
    }
    let wire: Value = serde_json::to_value(&lines[0]).unwrap();
    assert!(wire["stream"].is_string() && wire["line"].is_string() && wire["ts"].is_i64());

    // Everything was logged before a minute from now, and within the last 10 minutes.
    let r = send(
        &f.agent,
        json!({"id": "ls-future", "action": "logs", "name": name,
               "since": humantime::format_rfc3339_seconds(std::time::SystemTime::now() + Duration::from_secs(60)).to_string()}),
    )
    .await;
    assert_eq!(r.logs.unwrap(), vec![], "nothing since a minute from now");
    let r = send(
        &f.agent,
        json!({"id": "ls-10m", "action": "logs", "name": name, "since": "10m"}),
    )
    .await;
    let recent = r.logs.unwrap();
    assert_eq!(recent.len(), 4, "{recent:?}");
    assert!(
        recent.iter().all(|l| l.ts.is_none()),
        "no timestamps unless asked"
    );

    for (extra, needle) in [
        (
            json!({"since": "last tuesday"}),
            "since: \"last tuesday\" is neither",
        ),
        (
            json!({"timestamps": 1}),
            "timestamps: must be true or false",
        ),
    ] {
        let mut cmd = json!({"id": "ls-bad", "action": "logs", "name": name});
        for (k, v) in extra.as_object().unwrap() {
            cmd[k] = v.clone();
        }
        let bad = send(&f.agent, cmd).await;
        assert!(!bad.ok);
        assert_eq!(bad.code.as_deref(), Some("invalid"));
        let e = bad.error.unwrap();
        assert!(e.contains(needle), "{e}");
    }
    cleanup(&f.runtime, &[name]).await;
}

#[tokio::test]
async fn commands_duplicate_id_runs_once_and_returns_the_stored_result() {
    let f = fixture();
    let name = "cmd-dup";
    cleanup(&f.runtime, &[name]).await;
    let cmd =
        json!({"id": "dup-1", "action": "run", "name": name, "image": IMAGE, "args": sleeper()});
    let first = send(&f.agent, cmd.clone()).await;
    assert!(first.ok, "{first:?}");
    let id_before = f.runtime.inspect(name).await.unwrap().id;
    // Stopped by someone else: a second run would start it (or fail on the name).
    f.runtime
        .stop(name, Some("SIGKILL"), Some(Duration::from_secs(1)))
        .await
        .unwrap();
    let second = send(&f.agent, cmd.clone()).await;
    assert_eq!(second, first, "the redelivery gets the stored result");
    let info = f.runtime.inspect(name).await.unwrap();
    assert_eq!(info.id, id_before);
    assert_eq!(info.state, ContainerState::Exited, "not started again");
    let m = f.agent.metrics();
    assert_eq!(m.command_duplicates, 1);
    assert_eq!(m.command_results.get(&("run", "ok")), Some(&1));

    // The stored result survives a node restart (same data dir).
    let data = f.data.path().to_path_buf();
    drop(f.agent);
    let agent = Agent::new(f.runtime.clone(), &data).unwrap();
    assert_eq!(send(&agent, cmd).await, first);
    assert_eq!(
        f.runtime.inspect(name).await.unwrap().state,
        ContainerState::Exited
    );
    cleanup(&f.runtime, &[name]).await;
}

#[tokio::test]
async fn commands_concurrent_duplicates_run_once() {
    let f = fixture();
    let name = "cmd-dup-concurrent";
    cleanup(&f.runtime, &[name]).await;
    let cmd =
        json!({"id": "dupc-1", "action": "run", "name": name, "image": IMAGE, "args": sleeper()})
            .to_string();
    let (a, b) = tokio::join!(
        f.agent.handle_command(cmd.as_bytes()),
        f.agent.handle_command(cmd.as_bytes())
    );
    assert_eq!(a, b);
    let r: CommandResult = serde_json::from_slice(&a).unwrap();
    assert!(r.ok, "{r:?}");
    assert_eq!(f.agent.metrics().command_duplicates, 1);
    cleanup(&f.runtime, &[name]).await;
}

#[tokio::test]
async fn commands_run_with_a_missing_image_fails_naming_the_image() {
    let f = fixture();
    let r = send(
        &f.agent,
        json!({"id": "img-1", "action": "run", "name": "cmd-noimage", "image": "nowhere/absent:9"}),
    )
    .await;
    assert!(!r.ok);
    let e = r.error.unwrap();
    assert!(e.contains("image nowhere/absent:9 is not present"), "{e}");
    assert_eq!(
        f.agent
            .metrics()
            .command_results
            .get(&("run", "image_not_present")),
        Some(&1)
    );
}

#[tokio::test]
async fn commands_run_with_a_taken_name_fails_naming_the_container() {
    let f = fixture();
    let name = "cmd-taken";
    cleanup(&f.runtime, &[name]).await;
    let first = send(
        &f.agent,
        json!({"id": "taken-1", "action": "run", "name": name, "image": IMAGE, "args": sleeper()}),
    )
    .await;
    assert!(first.ok, "{first:?}");
    let second = send(
        &f.agent,
        json!({"id": "taken-2", "action": "run", "name": name, "image": IMAGE, "args": sleeper()}),
    )
    .await;
    assert!(!second.ok);
    assert_eq!(
        second.error.unwrap(),
        format!("container name {name} is already taken")
    );
    cleanup(&f.runtime, &[name]).await;
}

#[tokio::test]
async fn commands_on_an_unreachable_runtime_fail_naming_the_socket() {
    let dir = tempfile::tempdir().unwrap();
    // A socket path nobody created, and a socket file nobody listens on.
    let missing = dir.path().join("missing.sock");
    let refused = dir.path().join("refused.sock");
    drop(std::os::unix::net::UnixListener::bind(&refused).unwrap());
    for socket in [missing, refused] {
        let rt = Arc::new(DockerRuntime::new(&socket));
        let agent = Agent::new(rt.clone(), dir.path().join("data")).unwrap();
        let cmd = json!({"id": "unreach-1", "action": "run", "name": "x", "image": IMAGE});
        let r = send(&agent, cmd.clone()).await;
        assert!(!r.ok);
        let e = r.error.unwrap();
        assert!(
            e.starts_with(&format!(
                "container runtime unreachable at {}",
                socket.display()
            )),
            "{e}"
        );
        // Nothing ran, so nothing is stored: a redelivery tries again.
        let _ = send(&agent, cmd).await;
        let m = agent.metrics();
        assert_eq!(m.command_duplicates, 0);
        assert_eq!(m.command_results.get(&("run", "unreachable")), Some(&2));
        assert!(matches!(
            agent.status().await,
            Err(RuntimeError::Unreachable { .. })
        ));
        let rep = agent.reconcile(&BTreeMap::new()).await;
        assert!(rep.error.unwrap().contains(&socket.display().to_string()));
    }
}

#[tokio::test]
async fn commands_malformed_payloads_are_answered_with_the_bad_field() {
    let f = fixture();
    let bytes = f
        .agent
        .handle_command(b"{\"id\": \"m1\", \"action\": \"run\"")
        .await;
    let r: CommandResult = serde_json::from_slice(&bytes).unwrap();
    assert!(!r.ok && r.error.unwrap().contains("malformed JSON"));
    let r = send(&f.agent, json!({"id": "m2", "action": "run", "name": "x"})).await;
    assert_eq!(r.id, "m2");
    assert!(r.error.unwrap().contains("image: missing field"));
    let r = send(&f.agent, json!({"id": "m3", "action": "stop"})).await;
    assert!(r.error.unwrap().contains("name: missing field"));
    assert_eq!(
        f.agent.metrics().command_results.get(&("run", "invalid")),
        Some(&1)
    );
}

fn desired(v: Value) -> BTreeMap<String, DesiredContainer> {
    parse_desired(&v).unwrap()
}

async fn state_of(rt: &DockerRuntime, name: &str) -> Option<ContainerState> {
    rt.inspect(name).await.ok().map(|i| i.state)
}

#[tokio::test]
async fn reconcile_brings_the_desired_set_to_running_and_stopped() {
    let _one = RECONCILE_LOCK.lock().await;
    let f = fixture();
    let names = ["rec-web", "rec-batch"];
    cleanup(&f.runtime, &names).await;
    let d = desired(json!({
        "rec-web": {"image": IMAGE, "args": polite(), "env": {"MODE": "web"}, "state": "running",
                    "restart": "unless-stopped", "limits": {"memory_bytes": 67108864, "cpus": 0.5}},
        "rec-batch": {"image": IMAGE, "args": polite(), "state": "stopped"}
    }));
    let rep = f.agent.reconcile(&d).await;
    assert_eq!(rep.error_count(), 0, "{rep:?}");
    assert_eq!(
        state_of(&f.runtime, "rec-web").await,
        Some(ContainerState::Running)
    );
    assert_eq!(
        state_of(&f.runtime, "rec-batch").await,
        Some(ContainerState::Created)
    );
    assert_eq!(rep.reported["rec-web"]["state"], "running");
    assert_eq!(rep.reported["rec-web"]["image"], IMAGE);
    assert_eq!(rep.reported["rec-batch"]["state"], "created");

    // Flip the states: web stopped, batch running.
    let d = desired(json!({
        "rec-web": {"image": IMAGE, "args": polite(), "env": {"MODE": "web"}, "state": "stopped",
                    "restart": "unless-stopped", "limits": {"memory_bytes": 67108864, "cpus": 0.5}},
        "rec-batch": {"image": IMAGE, "args": polite(), "state": "running"}
    }));
    let web_id = f.runtime.inspect("rec-web").await.unwrap().id;
    let rep = f.agent.reconcile(&d).await;
    assert_eq!(rep.error_count(), 0, "{rep:?}");
    let web = f.runtime.inspect("rec-web").await.unwrap();
    assert_eq!(
        (web.state, web.exit_code),
        (ContainerState::Exited, Some(0))
    );
    assert_eq!(web.id, web_id, "stopped, not recreated");
    assert_eq!(
        state_of(&f.runtime, "rec-batch").await,
        Some(ContainerState::Running)
    );
    assert_eq!(rep.reported["rec-web"]["exit_code"], 0);

    // Converged: nothing more to do.
    let rep = f.agent.reconcile(&d).await;
    assert!(rep.outcomes.is_empty(), "{:?}", rep.outcomes);
    cleanup(&f.runtime, &names).await;
}

#[tokio::test]
async fn reconcile_recreates_a_container_whose_args_changed() {
    let _one = RECONCILE_LOCK.lock().await;
    let f = fixture();
    let name = "rec-change";
    cleanup(&f.runtime, &[name]).await;
    let d = desired(json!({name: {"image": IMAGE, "args": polite(), "state": "running"}}));
    assert_eq!(f.agent.reconcile(&d).await.error_count(), 0);
    let before = f.runtime.inspect(name).await.unwrap().id;
    let d = desired(
        json!({name: {"image": IMAGE, "args": polite(), "env": {"V": "2"}, "state": "running"}}),
    );
    let rep = f.agent.reconcile(&d).await;
    assert_eq!(rep.outcomes.len(), 1);
    assert_eq!(rep.outcomes[0].action, "recreate");
    let after = f.runtime.inspect(name).await.unwrap();
    assert_ne!(after.id, before);
    assert_eq!(after.state, ContainerState::Running);
    cleanup(&f.runtime, &[name]).await;
}

#[tokio::test]
async fn reconcile_removes_undesired_managed_containers_but_not_unmanaged_ones() {
    let _one = RECONCILE_LOCK.lock().await;
    let f = fixture();
    let names = ["rec-keep", "rec-drop", "rec-theirs"];
    cleanup(&f.runtime, &names).await;
    let d = desired(json!({
        "rec-keep": {"image": IMAGE, "args": polite(), "state": "running"},
        "rec-drop": {"image": IMAGE, "args": polite(), "state": "running"}
    }));
    assert_eq!(f.agent.reconcile(&d).await.error_count(), 0);
    // Someone else's container (created by a command: not managed).
    let r = send(
        &f.agent,
        json!({"id": "theirs-1", "action": "run", "name": "rec-theirs", "image": IMAGE, "args": polite()}),
    )
    .await;
    assert!(r.ok, "{r:?}");

    let d = desired(json!({"rec-keep": {"image": IMAGE, "args": polite(), "state": "running"}}));
    let rep = f.agent.reconcile(&d).await;
    assert_eq!(rep.error_count(), 0, "{rep:?}");
    assert_eq!(state_of(&f.runtime, "rec-drop").await, None, "removed");
    assert_eq!(
        state_of(&f.runtime, "rec-keep").await,
        Some(ContainerState::Running)
    );
    assert_eq!(
        state_of(&f.runtime, "rec-theirs").await,
        Some(ContainerState::Running),
        "untouched"
    );
    assert!(rep.reported.get("rec-drop").is_none());
    assert!(
        rep.reported.get("rec-theirs").is_none(),
        "not managed, not in the twin"
    );

    // Desiring the unmanaged name is a reported conflict, not a takeover.
    let d = desired(json!({"rec-theirs": {"image": IMAGE, "state": "stopped"}}));
    let rep = f.agent.reconcile(&d).await;
    let conflict = rep
        .outcomes
        .iter()
        .find(|o| o.name == "rec-theirs")
        .unwrap();
    assert_eq!(conflict.action, "conflict");
    assert!(rep.reported["rec-theirs"]["error"]
        .as_str()
        .unwrap()
        .contains("does not manage"));
    assert_eq!(
        state_of(&f.runtime, "rec-theirs").await,
        Some(ContainerState::Running)
    );
    cleanup(&f.runtime, &names).await;
}

#[tokio::test]
async fn reconcile_reports_a_missing_image_for_that_container_and_carries_on() {
    let _one = RECONCILE_LOCK.lock().await;
    let f = fixture();
    let names = ["rec-ok", "rec-noimage"];
    cleanup(&f.runtime, &names).await;
    let d = desired(json!({
        "rec-noimage": {"image": "nowhere/absent:1", "state": "running"},
        "rec-ok": {"image": IMAGE, "args": polite(), "state": "running"}
    }));
    let rep = f.agent.reconcile(&d).await;
    assert_eq!(rep.error_count(), 1, "{rep:?}");
    assert_eq!(
        state_of(&f.runtime, "rec-ok").await,
        Some(ContainerState::Running)
    );
    let e = rep.reported["rec-noimage"]["error"].as_str().unwrap();
    assert!(e.contains("image nowhere/absent:1 is not present"), "{e}");
    assert_eq!(f.agent.metrics().reconcile_errors, 1);
    cleanup(&f.runtime, &names).await;
}

#[tokio::test]
async fn reconcile_after_the_agent_is_recreated_brings_containers_back() {
    let _one = RECONCILE_LOCK.lock().await;
    let f = fixture();
    let names = ["rec-boot-a", "rec-boot-b"];
    cleanup(&f.runtime, &names).await;
    let d = json!({
        "rec-boot-a": {"image": IMAGE, "args": polite(), "state": "running"},
        "rec-boot-b": {"image": IMAGE, "args": polite(), "state": "running"}
    });
    assert_eq!(
        f.agent.reconcile(&desired(d.clone())).await.error_count(),
        0
    );
    let a_id = f.runtime.inspect("rec-boot-a").await.unwrap().id;

    // The node goes down; meanwhile one container stops and the other disappears.
    let data: PathBuf = f.data.path().to_path_buf();
    drop(f.agent);
    f.runtime.stop("rec-boot-a", None, None).await.unwrap();
    f.runtime.remove("rec-boot-b", true).await.unwrap();

    // The node comes back with the same desired set (from its twin store).
    let agent = Agent::new(f.runtime.clone(), Path::new(&data)).unwrap();
    let rep = agent.reconcile(&desired(d)).await;
    assert_eq!(rep.error_count(), 0, "{rep:?}");
    let a = f.runtime.inspect("rec-boot-a").await.unwrap();
    assert_eq!(a.state, ContainerState::Running);
    assert_eq!(
        a.id, a_id,
        "restarted, not recreated: the labels tie it to the agent"
    );
    assert_eq!(
        state_of(&f.runtime, "rec-boot-b").await,
        Some(ContainerState::Running)
    );
    cleanup(&f.runtime, &names).await;
}

#[tokio::test]
async fn status_reports_every_container_and_metrics_count_them_by_state() {
    let f = fixture();
    let name = "status-one";
    cleanup(&f.runtime, &[name]).await;
    assert!(
        send(&f.agent, json!({"id": "status-run", "action": "run", "name": name, "image": IMAGE, "args": sleeper()}))
            .await
            .ok
    );
    let s = f.agent.status().await.unwrap();
    assert!(s.ts > 0);
    let mine = s.containers.iter().find(|c| c.name == name).unwrap();
    assert_eq!(mine.state, ContainerState::Running);
    assert_eq!(mine.restart_count, Some(0));
    let wire: Value = serde_json::from_slice(&s.to_bytes()).unwrap();
    assert!(wire["containers"]
        .as_array()
        .unwrap()
        .iter()
        .any(|c| c["name"] == name && c["state"] == "running"));
    let m = f.agent.metrics();
    assert!(m.containers_by_state[&ContainerState::Running] >= 1);
    assert_eq!(m.containers_by_state.len(), 7);
    cleanup(&f.runtime, &[name]).await;
}

#[tokio::test]
async fn crash_loop_of_a_declared_container_is_reported_and_the_agents_restarts_back_off() {
    let _one = RECONCILE_LOCK.lock().await;
    let rt = Arc::new(DockerRuntime::new(&daemon().socket));
    let data = tempfile::tempdir().unwrap();
    // The default back-off's shape (first restart at once, then doubling), in seconds not tens.
    let agent = Agent::new(rt.clone(), data.path())
        .unwrap()
        .with_backoff(BackoffPolicy {
            initial: Duration::from_secs(1),
            max: Duration::from_secs(4),
            reset_after: Duration::from_secs(600),
        });
    let name = "crash-declared";
    cleanup(&rt, &[name]).await;
    let d = desired(
        json!({name: {"image": IMAGE, "args": script("exit 3"), "restart": "no",
                                  "state": "running"}}),
    );
    // Reconcile every 100 ms, as a very impatient node would.
    let deadline = Instant::now() + Duration::from_secs(30);
    let (mut ticks, mut starts) = (0u32, 0u32);
    let reported = loop {
        let rep = agent.reconcile(&d).await;
        ticks += 1;
        starts += rep.outcomes.iter().filter(|o| o.action == "start").count() as u32;
        assert_eq!(rep.error_count(), 0, "{rep:?}");
        let entry = rep.reported[name].clone();
        if entry["state"] == "crash_loop" {
            break entry;
        }
        assert!(Instant::now() < deadline, "never crash_loop: {entry}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    // Created and started once, then restarted at once, after 1 s, after 2 s: the third restart
    // makes it a crash loop.
    assert_eq!(starts, 3, "{reported}");
    assert_eq!(reported["restart_count"], 3, "{reported}");
    assert!(
        ticks >= starts + 1 + 5,
        "the back-off held starts back: {ticks} ticks, {starts} starts"
    );
    // Exited at once: code 3, waiting 4 s; or the third run has not ended yet.
    if reported.get("finished_at").is_some() && reported["exit_code"] == 3 {
        assert_eq!(reported["backoff_ms"], 4000, "{reported}");
    }
    // Docker itself never restarted it (restart policy no).
    assert_eq!(rt.inspect(name).await.unwrap().restart_count, Some(0));

    // Once exited, the status says so too, with the exit code and the back-off.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let s = agent.status().await.unwrap();
        let mine = s.containers.iter().find(|c| c.name == name).unwrap();
        if mine.exit_code == Some(3) {
            assert_eq!(mine.state, ContainerState::CrashLoop, "{mine:?}");
            assert_eq!(mine.restart_count, Some(3));
            assert_eq!(mine.backoff_ms, Some(4000));
            assert!(mine.finished_at.is_some());
            break;
        }
        assert!(Instant::now() < deadline, "never exited: {mine:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(agent.metrics().containers_by_state[&ContainerState::CrashLoop] >= 1);
    cleanup(&rt, &[name]).await;
}

#[tokio::test]
async fn crash_loop_of_the_runtime_restart_policy_is_reported_in_status_and_list() {
    let f = fixture();
    let name = "crash-on-failure";
    cleanup(&f.runtime, &[name]).await;
    let r = send(
        &f.agent,
        json!({"id": "crash-run", "action": "run", "name": name, "image": IMAGE,
               "args": script("exit 3"), "restart": "on-failure"}),
    )
    .await;
    assert!(r.ok, "a container that exits at once is still run: {r:?}");
    // Docker restarts it after 100 ms, 200 ms, 400 ms ...
    let deadline = Instant::now() + Duration::from_secs(30);
    let mine = loop {
        let s = f.agent.status().await.unwrap();
        let mine = s.containers.into_iter().find(|c| c.name == name).unwrap();
        if mine.state == ContainerState::CrashLoop {
            break mine;
        }
        assert!(Instant::now() < deadline, "never crash_loop: {mine:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(mine.restart_count.unwrap() >= 3, "{mine:?}");
    assert_eq!(mine.backoff_ms, None, "Docker's back-off is its own");
    let l = send(&f.agent, json!({"id": "crash-list", "action": "list"})).await;
    let listed = l.containers.unwrap();
    let listed = listed.iter().find(|c| c.name == name).unwrap();
    assert_eq!(listed.state, ContainerState::CrashLoop, "{listed:?}");
    // Between two restarts Docker keeps the last exit code.
    let deadline = Instant::now() + Duration::from_secs(20);
    while f.runtime.inspect(name).await.unwrap().exit_code != Some(3) {
        assert!(Instant::now() < deadline, "exit code 3 never seen");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    cleanup(&f.runtime, &[name]).await;
}
