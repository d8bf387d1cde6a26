//! The node as a library: `edgetwin_node::serve(cfg, control)` runs in the test's own process and
//! is driven by third-party clients over TCP, then stopped through its `Control`.
//!
//! rumqttd's router and listener threads cannot be stopped, so a node served in-process keeps
//! them until the test binary exits; this file therefore serves one node.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use edgetwin_node::{serve, Control, NodeConfig};
use edgetwin_testkit::*;

#[test]
fn library_serve_runs_a_node_in_process_until_its_control_stops_it() {
    let dir = tempfile::tempdir().unwrap();
    let devices = dir.path().join("devices");
    std::fs::create_dir_all(&devices).unwrap();
    std::fs::write(
        devices.join("t.yaml"),
        format!("{MODEL_YAML}---\n{}", device_yaml("lib-1")),
    )
    .unwrap();
    let (mqtt, http) = (free_port(), free_port());
    let yaml = format!(
        "node_id: lib-node\ndata_dir: {}\ndevices_dir: {}\nmqtt:\n  listen: 127.0.0.1:{mqtt}\n  listen_v5: null\nhttp:\n  listen: 127.0.0.1:{http}\n",
        dir.path().join("data").display(),
        devices.display()
    );
    let cfg_path = dir.path().join("node.yaml");
    std::fs::write(&cfg_path, yaml).unwrap();
    let cfg = NodeConfig::load(&cfg_path).unwrap();

    let control = Control::default();
    let stop = control.shutdown.clone();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let node = rt.spawn(serve(cfg, control));

    let ready = wait_for(Duration::from_secs(20), || {
        http_status(http, "/readyz").filter(|s| *s == 200)
    });
    assert_eq!(ready, Some(200), "the in-process node never became ready");
    mosquitto_pub(mqtt, "dt/lib-1/desired", r#"{"mode":"in-process"}"#, &[]);
    retained_until(mqtt, "dt/lib-1/twin", Duration::from_secs(10), |t| {
        t.is_some_and(|t| t["desired"]["mode"] == "in-process")
    });

    stop.cancel();
    let result = rt.block_on(async { tokio::time::timeout(Duration::from_secs(30), node).await });
    assert!(
        matches!(result, Ok(Ok(Ok(())))),
        "serve returns Ok after its control stops it: {result:?}"
    );
    // Stopped in order: the HTTP listener is gone, the twin store was closed with the value.
    assert_eq!(http_status(http, "/readyz"), None);
    let (_, twins, _) =
        edgetwin_devicetwin::TwinStore::open(&dir.path().join("data/twins.redb")).unwrap();
    let twin = twins.iter().find(|t| t.device.as_str() == "lib-1").unwrap();
    assert_eq!(
        twin.desired["mode"].value,
        Some(serde_json::json!("in-process"))
    );
}
