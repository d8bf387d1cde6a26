//! `edgetwin serve`: starts every part of the node in order and stops them in reverse order.
//!
//! Start: store (load twins) → broker listeners → twin service (subscribed before any client can
//! publish to it) → registry (publishes devices, twins, assignments) → HTTP → ready.
//! Stop (SIGTERM/SIGINT): not ready → stop registry and intake → the twin service drains what it
//! already received and commits it → bounded flush of the bridge (its outbox is durable, so
//! nothing is lost when the flush is cut short) → exit (rumqttd's threads end with the process).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use edgetwin_devicetwin::store::TwinStore;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{error, info, warn};

use crate::bridge::{self, Inbound};
use crate::config::NodeConfig;
use crate::embedded_broker::EmbeddedBroker;
use crate::http::{self, HttpState};
use crate::metrics::Metrics;
use crate::registry::{self, Registry};
use crate::twin_service::{
    self, InjectedPatch, Origin, RegistryUpdate, TwinService, TwinServiceConfig,
};

/// Runs the node until SIGTERM/SIGINT.
pub async fn serve(cfg: NodeConfig) -> anyhow::Result<()> {
    let metrics = Arc::new(Metrics::new());
    let ready = Arc::new(AtomicBool::new(false));
    let shutdown = CancellationToken::new();
    let tracker = TaskTracker::new();

    std::fs::create_dir_all(&cfg.data_dir)
        .with_context(|| format!("cannot create data dir {}", cfg.data_dir.display()))?;
    let store_path = cfg.twin_store_path();
    let (store, twins, quarantined) = TwinStore::open(&store_path)
        .with_context(|| format!("cannot open twin store {}", store_path.display()))?;
    for q in &quarantined {
        warn!(record = ?q, "twin store record quarantined");
    }
    metrics.store_quarantined.set(quarantined.len() as i64);
    info!(twins = twins.len(), path = %store_path.display(), "twin store opened");
    let store = Arc::new(store);

    let broker = EmbeddedBroker::start(&cfg.mqtt).await?;
    info!(v4 = %cfg.mqtt.listen, v5 = ?cfg.mqtt.listen_v5, "embedded MQTT broker listening");

    // The node's own twin carries the declared containers when the container agent is on.
    let (node_desired_tx, node_desired_rx) = tokio::sync::watch::channel(None);
    let node_twin = cfg
        .containers
        .as_ref()
        .map(|_| -> anyhow::Result<_> {
            let id = edgetwin_contract::DeviceId::new(cfg.node_id.as_str())
                .map_err(|e| anyhow::anyhow!("node_id as the node twin's device id: {e}"))?;
            Ok((id, node_desired_tx))
        })
        .transpose()?;
    let node_device = node_twin.as_ref().map(|(d, _)| d.clone());

    let directory = Arc::new(twin_service::Directory::default());
    let (twin_tx, twin_rx) = broker.link("edgetwin-twin")?;
    let twin_in = twin_service::spawn_link_reader(twin_rx, 65_536, shutdown.clone(), &tracker);
    let mut service = TwinService::new(
        twin_tx,
        store,
        twins,
        metrics.clone(),
        TwinServiceConfig {
            max_batch: cfg.twin.max_batch,
            max_properties_per_patch: cfg.twin.max_properties_per_patch,
        },
        node_twin,
        directory.clone(),
    )?;

    let mut reg = Registry::new(
        cfg.devices_dir.clone(),
        cfg.applied_profiles_dir(),
        metrics.clone(),
    );
    if let Some(set) = reg.scan() {
        service.apply_registry_now(set).await?;
    }

    let (reg_tx, reg_rx) = mpsc::channel::<RegistryUpdate>(16);
    let (cloud_tx, cloud_rx) = mpsc::channel::<InjectedPatch>(1024);
    let service_shutdown = CancellationToken::new();
    let service_task =
        tokio::spawn(service.run(twin_in, reg_rx, cloud_rx, service_shutdown.clone()));

    let bridge = match &cfg.bridge {
        None => None,
        Some(bcfg) => {
            let (bridge, inbound) = bridge::start(
                bcfg,
                cfg.node_id.as_str(),
                &cfg.data_dir,
                broker.link("edgetwin-bridge-up")?,
                metrics.clone(),
            )?;
            let down_link = broker.link("edgetwin-bridge-down")?;
            tracker.spawn(route_cloud_messages(
                inbound,
                cloud_tx.clone(),
                down_link,
                shutdown.clone(),
            ));
            info!(url = %bcfg.url, "bridge to the cloud broker started");
            Some(bridge)
        }
    };

    if let (Some(ccfg), Some(node)) = (&cfg.containers, node_device) {
        let runtime = Arc::new(edgetwin_containers::DockerRuntime::new(
            &ccfg.runtime_socket,
        ));
        let dir = cfg.containers_dir();
        let agent =
            tokio::task::spawn_blocking(move || edgetwin_containers::Agent::new(runtime, dir))
                .await
                .context("container agent start-up panicked")?
                .context("cannot start the container agent")?;
        let (mut agent_tx, agent_rx) = broker.link("edgetwin-containers")?;
        agent_tx
            .subscribe(edgetwin_contract::Topic::ContainersCmd.to_topic_string())
            .context("container agent cannot subscribe node/containers/cmd")?;
        let commands = twin_service::spawn_link_reader(agent_rx, 256, shutdown.clone(), &tracker);
        let task = crate::container_agent::AgentTask {
            agent: Arc::new(agent),
            node: node.clone(),
            link_tx: agent_tx,
            commands,
            desired: node_desired_rx,
            twin: cloud_tx.clone(),
            interval: Duration::from_millis(ccfg.reconcile_interval_ms),
            metrics: metrics.containers.clone(),
        };
        tracker.spawn(task.run(shutdown.clone()));
        info!(socket = %ccfg.runtime_socket, node = %node, "container agent started");
    }

    let (mut reg_link_tx, reg_link_rx) = broker.link("edgetwin-registry")?;
    for f in ["node/devices/apply", "node/devices/list"] {
        reg_link_tx
            .subscribe(f)
            .with_context(|| format!("registry cannot subscribe {f}"))?;
    }
    let reg_in = twin_service::spawn_link_reader(reg_link_rx, 64, shutdown.clone(), &tracker);
    tracker.spawn(registry::run(
        reg,
        reg_link_tx,
        reg_in,
        reg_tx,
        Duration::from_millis(cfg.devices_scan_interval_ms),
        shutdown.clone(),
    ));

    if let Some(gcfg) = &cfg.gate {
        let gate = edgetwin_gate::Gate::bind(
            gcfg.clone(),
            cfg.mqtt.listen,
            cfg.mqtt.listen_v5,
            directory.clone(),
        )
        .await
        .context("MQTT gate")?;
        let gate_metrics = gate.metrics();
        metrics.register_with(|r| gate_metrics.register(r));
        info!(listeners = ?gate.local_addrs(), "MQTT gate listening (TLS, authentication, topic permissions)");
        tracker.spawn(gate.run(shutdown.clone()));
    }

    let http_server = http::bind(
        cfg.http.listen,
        HttpState {
            metrics: metrics.clone(),
            ready: ready.clone(),
        },
        shutdown.clone(),
    )
    .await?;
    tracker.spawn(async move {
        if let Err(e) = http_server.await {
            error!(error = %e, "HTTP server failed");
        }
    });
    info!(http = %cfg.http.listen, node = %cfg.node_id, "node ready");
    ready.store(true, Ordering::Release);

    wait_for_signal().await?;
    info!("shutting down");
    ready.store(false, Ordering::Release);
    shutdown.cancel();
    tracker.close();
    // The twin service stops after intake has stopped, so it commits everything it received.
    if tokio::time::timeout(Duration::from_secs(10), tracker.wait())
        .await
        .is_err()
    {
        warn!("background tasks did not stop within 10 s");
    }
    service_shutdown.cancel();
    match tokio::time::timeout(Duration::from_secs(20), service_task).await {
        Ok(Ok(Ok(()))) => {}
        Ok(Ok(Err(e))) => error!(error = %e, "twin service failed while stopping"),
        Ok(Err(e)) => error!(error = %e, "twin service panicked"),
        Err(_) => error!("twin service did not finish its final commit within 20 s"),
    }
    if let Some(bridge) = bridge {
        bridge.shutdown().await;
    }
    info!("stopped");
    Ok(())
}

/// Delivers messages from the cloud: desired patches to the twin service (source `cloud`, acked
/// after their commit), anything else republished on the local broker.
async fn route_cloud_messages(
    mut inbound: mpsc::UnboundedReceiver<Inbound>,
    twin: mpsc::Sender<InjectedPatch>,
    (mut link_tx, _link_rx): (rumqttd::local::LinkTx, rumqttd::local::LinkRx),
    shutdown: CancellationToken,
) {
    loop {
        let msg = tokio::select! {
            _ = shutdown.cancelled() => break,
            m = inbound.recv() => m,
        };
        let Some(msg) = msg else { break };
        match edgetwin_contract::Topic::parse(&msg.topic) {
            Some(edgetwin_contract::Topic::Desired(device)) => {
                let patch = InjectedPatch {
                    device,
                    payload: msg.payload,
                    origin: Origin::Cloud,
                    done: Some(msg.done),
                };
                if twin.send(patch).await.is_err() {
                    break;
                }
            }
            _ => match link_tx.publish(msg.topic.clone(), msg.payload) {
                Ok(_) => {
                    let _ = msg.done.send(());
                }
                Err(e) => {
                    warn!(topic = %msg.topic, error = %e, "cannot publish a cloud message locally")
                }
            },
        }
    }
}

async fn wait_for_signal() -> anyhow::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).context("cannot install SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("cannot install SIGINT handler")?;
    tokio::select! {
        _ = term.recv() => info!("SIGTERM received"),
        _ = int.recv() => info!("SIGINT received"),
    }
    Ok(())
}
