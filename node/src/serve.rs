//! `edgetwin serve`: starts every part of the node in order and stops them in reverse order.
//!
//! # Start (each step finishes before the next begins)
//! 1. HTTP listener: `/healthz` answers, `/readyz` says "starting".
//! 2. Stores open: the twin store (a damaged file is restored, see `devicetwin::store`). The
//!    twin service writes the snapshot of what was opened in the background once it runs, so
//!    the restore point is current without holding up start-up.
//! 3. The embedded broker's router starts, **without** TCP listeners.
//! 4. Every internal consumer connects and the router acknowledges all its subscriptions: the
//!    twin service, the bridge tap, the container agent, the registry.
//! 5. Retained state is republished from our own stores: twin documents and mapper assignments.
//! 6. Only now the broker's internal TCP listeners start (loopback, ports and login picked
//!    now), then the bridge connects to the cloud (so commands the cloud queued while the node
//!    was down find the container agent listening), then the front door (the gate, which hands
//!    stored topics to the twin service and the bridge tap before the broker sees them), then
//!    the readiness canary, which asks through the front door. Ready once every check passes.
//!
//! # Stop (SIGTERM/SIGINT), the reverse
//! Not ready → intake stops (gate, whose keepers first queue what the broker still holds for
//! absent clients' kept sessions; registry, container agent, cloud relay, canary) → the twin
//! service drains what it already received, commits it and writes its snapshot → bounded flush
//! of the bridge (its outbox is durable, so nothing is lost when the flush is cut short) → exit
//! (rumqttd's threads end with the process).
//!
//! # Reload (SIGHUP)
//! Reopens the log file (`--log-file`, for logrotate), rescans the profile folders at once and
//! rereads the gate's credentials file; an invalid file keeps what was in force. Nothing stops.
//! Under systemd (`Type=notify`) the node says READY=1 once its listeners accept, RELOADING=1
//! and READY=1 around a reload, STOPPING=1 when it stops.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use edgetwin_devicetwin::store::{QuarantineKind, TwinStore};
use tokio::sync::{mpsc, Notify};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{error, info, warn};

use crate::config::NodeConfig;
use crate::health::Health;
use crate::http::{self, HttpState};
use crate::metrics::{Metrics, RestoredLabels};
use crate::registry::{self, Registry};
use crate::twin_service::{self, InjectedPatch, Input, TwinService, TwinServiceConfig};
use edgetwin_bridge::{self as bridge, Inbound};
use edgetwin_broker::EmbeddedBroker;
use edgetwin_broker::{LocalClient, Message};

/// The node's internal broker clients (their client ids, and the `link` label of their metrics).
pub const LINKS: [&str; 6] = [
    "twin-service",
    "bridge-tap",
    "containers",
    "registry",
    "cloud-relay",
    "retained",
];

/// Clients' retained publishes waiting for the retained store.
const RETAINED_QUEUE: usize = 4096;

/// Most inputs waiting for the twin service; past that its link reader stops reading and the
/// broker's log holds the rest (see `local.rs` for what happens when that overflows too).
const TWIN_INPUT_QUEUE: usize = 8192;

/// How a running node is told to stop or reload.
#[derive(Clone, Default)]
pub struct Control {
    /// Cancelled to stop the node.
    pub shutdown: CancellationToken,
    /// Notified to reload what can be reloaded.
    pub reload: Arc<Notify>,
}

impl Control {
    /// A control driven by the process's signals: SIGTERM and SIGINT stop, SIGHUP reloads.
    pub fn from_signals() -> anyhow::Result<Control> {
        Self::from_signals_with(|| {})
    }

    /// [`Control::from_signals`], calling `first` on each SIGHUP before the node reloads (the
    /// binary reopens its log file there, so the reload's own lines go to the new file).
    pub fn from_signals_with(first: impl Fn() + Send + 'static) -> anyhow::Result<Control> {
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = signal(SignalKind::terminate()).context("cannot install SIGTERM handler")?;
        let mut int = signal(SignalKind::interrupt()).context("cannot install SIGINT handler")?;
        let mut hup = signal(SignalKind::hangup()).context("cannot install SIGHUP handler")?;
        let control = Control::default();
        let c = control.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = term.recv() => { info!("SIGTERM received"); break }
                    _ = int.recv() => { info!("SIGINT received"); break }
                    _ = hup.recv() => {
                        first();
                        info!("SIGHUP received: reloading");
                        c.reload.notify_one();
                    }
                }
            }
            c.shutdown.cancel();
        });
        Ok(control)
    }
}

/// Runs the node until `control.shutdown` is cancelled.
pub async fn serve(cfg: NodeConfig, control: Control) -> anyhow::Result<()> {
    let metrics = Arc::new(Metrics::new());
    let health = Arc::new(Health::default());
    let intake = CancellationToken::new();
    let tracker = TaskTracker::new();

    // 1. HTTP first, so an orchestrator sees "starting" rather than a refused connection.
    // History requests wait in their queue until the history task runs (step 4).
    let (history_queries_tx, history_queries) = mpsc::channel(64);
    let http_server = http::bind(
        &cfg.http,
        HttpState {
            metrics: metrics.clone(),
            health: health.clone(),
            history: history_queries_tx,
        },
        intake.clone(),
    )
    .await?;
    tracker.spawn(async move {
        if let Err(e) = http_server.await {
            error!(error = %e, "HTTP server failed");
        }
    });

    // 2. Stores.
    std::fs::create_dir_all(&cfg.data_dir)
        .with_context(|| format!("cannot create data dir {}", cfg.data_dir.display()))?;
    // The profile files are read and validated while the stores open: neither needs the other,
    // and with thousands of devices both take a while.
    let profiles = {
        let registry = Registry::new(
            cfg.devices_dir.clone(),
            cfg.applied_profiles_dir(),
            metrics.clone(),
        );
        let cache = cfg.profile_cache_path();
        tokio::task::spawn_blocking(move || {
            let mut registry = registry.with_cache(cache);
            let first = registry.scan();
            (registry, first)
        })
    };
    // Opened beside the twin store, not after it.
    let retained_path = cfg.data_dir.join("retained.redb");
    let retained_open = {
        let path = retained_path.clone();
        tokio::task::spawn_blocking(move || {
            edgetwin_retained::RetainedStore::open(&path, edgetwin_retained::Limits::default())
        })
    };
    let history_path = cfg.data_dir.join("history.redb");
    let history_open = cfg.history.enabled.then(|| {
        let path = history_path.clone();
        tokio::task::spawn_blocking(move || edgetwin_history::HistoryStore::open(&path))
    });
    let store_path = cfg.twin_store_path();
    let (store, twins, quarantined) = {
        let path = store_path.clone();
        tokio::task::spawn_blocking(move || TwinStore::open(&path))
            .await
            .context("twin store open panicked")?
            .with_context(|| format!("cannot open twin store {}", store_path.display()))?
    };
    record_quarantine(&metrics, &quarantined);
    info!(twins = twins.len(), path = %store_path.display(), "twin store opened");
    let store = Arc::new(store);
    let (retained_store, kept_retained) = retained_open
        .await
        .context("retained store open panicked")??;
    info!(topics = kept_retained.len(), path = %retained_path.display(), "retained store opened");

    // 3. The router, no listeners yet.
    let tap_filters: Vec<String> = cfg
        .bridge
        .as_ref()
        .map(|b| b.up.iter().map(|r| r.filter.clone()).collect())
        .unwrap_or_default();
    let internal_filters: Vec<String> = twin_service::FILTERS
        .iter()
        .chain(registry::FILTERS.iter())
        .map(|f| f.to_string())
        .chain([
            edgetwin_contract::Topic::ContainersCmd.to_topic_string(),
            edgetwin_contract::topic::filter::HISTORY_GET.to_string(),
        ])
        .chain(tap_filters.iter().cloned())
        .collect();
    let broker = EmbeddedBroker::start_router(&cfg.mqtt, &internal_filters);
    metrics.register_with(|r| broker.metrics().register(r, &LINKS));

    // 4. Internal consumers, each subscribed before the next step.
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
    let (inputs_tx, inputs_rx) = mpsc::channel::<Input>(TWIN_INPUT_QUEUE);
    let twin_link = LocalClient::connect_into(
        &broker,
        "twin-service",
        &twin_service::FILTERS,
        inputs_tx.clone(),
        intake.clone(),
        &tracker,
    )
    .await?;
    // The history: its file, the twin service's feed, and requests over MQTT. Subscribed even
    // when switched off, so a request is answered with why.
    let history_metrics = crate::history::HistoryMetrics::default();
    metrics.register_with(|r| history_metrics.register(r));
    let history_store = match history_open {
        None => None,
        Some(open) => {
            let (s, salvaged) = open
                .await
                .context("history store open panicked")?
                .with_context(|| format!("cannot open history store {}", history_path.display()))?;
            info!(salvaged, path = %history_path.display(), "history store opened");
            Some(s)
        }
    };
    let (history_tx, history_rx) = mpsc::channel(crate::history::READING_QUEUE);
    let (history_link, history_requests) = LocalClient::connect(
        &broker,
        "history",
        &[edgetwin_contract::topic::filter::HISTORY_GET],
        256,
        intake.clone(),
        &tracker,
    )
    .await?;
    let history_stop = CancellationToken::new();
    let history_task = tokio::spawn(
        crate::history::HistoryTask {
            cfg: cfg.history.clone(),
            path: history_path,
            store: history_store,
            readings: history_rx,
            queries: history_queries,
            link: history_link,
            requests: history_requests,
            directory: directory.clone(),
            metrics: history_metrics.clone(),
        }
        .run(history_stop.clone()),
    );
    let history_feed = cfg.history.enabled.then(|| crate::history::HistoryFeed {
        tx: history_tx,
        metrics: history_metrics,
    });
    let mut service = TwinService::new(
        twin_link,
        store,
        twins,
        TwinServiceConfig {
            max_batch: cfg.twin.max_batch,
            max_properties_per_patch: cfg.twin.max_properties_per_patch,
            snapshot_every: Duration::from_secs(cfg.twin.snapshot_interval_s),
        },
        node_twin,
        twin_service::Reports {
            metrics: metrics.clone(),
            health: health.clone(),
            directory: directory.clone(),
            history: history_feed,
        },
    )?;

    // The bridge's tasks have their own tracker: the tap keeps appending after intake stopped.
    let bridge_tracker = TaskTracker::new();
    let mut bridge = match &cfg.bridge {
        None => None,
        Some(bcfg) => {
            let tap_stop = CancellationToken::new();
            let filters: Vec<&str> = tap_filters.iter().map(String::as_str).collect();
            let (client, messages) = LocalClient::connect(
                &broker,
                "bridge-tap",
                &filters,
                4096,
                tap_stop.clone(),
                &bridge_tracker,
            )
            .await?;
            let tap = bridge::Tap {
                client,
                messages,
                stop: tap_stop,
            };
            let (bridge, inbound) = bridge::start(
                bcfg,
                cfg.node_id.as_str(),
                &cfg.data_dir,
                tap,
                metrics.bridge.clone(),
                outbox_health(health.clone()),
            )?;
            let (relay, _) =
                LocalClient::connect(&broker, "cloud-relay", &[], 1, intake.clone(), &tracker)
                    .await?;
            tracker.spawn(route_cloud_messages(
                inbound,
                inputs_tx.clone(),
                relay,
                intake.clone(),
            ));
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
                .context("cannot start the container agent")?
                .with_node(cfg.node_id.as_str());
        let cmd = edgetwin_contract::Topic::ContainersCmd.to_topic_string();
        let (link, commands) = LocalClient::connect(
            &broker,
            "containers",
            &[cmd.as_str()],
            256,
            intake.clone(),
            &tracker,
        )
        .await?;
        let task = crate::container_agent::AgentTask {
            agent: Arc::new(agent),
            node: node.clone(),
            link,
            commands,
            desired: node_desired_rx,
            twin: inputs_tx.clone(),
            interval: Duration::from_millis(ccfg.reconcile_interval_ms),
            metrics: metrics.containers.clone(),
        };
        tracker.spawn(task.run(intake.clone()));
        info!(socket = %ccfg.runtime_socket, node = %node, "container agent started");
    }

    metrics.register_with(|r| {
        r.register_collector(Box::new(crate::node_health::ProcessCollector::new(
            cfg.data_dir.clone(),
        )))
    });
    let (health_link, _) =
        LocalClient::connect(&broker, "health", &[], 1, intake.clone(), &tracker).await?;
    tracker.spawn(
        crate::node_health::HealthTask {
            metrics: metrics.clone(),
            readiness: health.clone(),
            link: health_link,
            cloud: bridge.as_ref().map(|b| b.health_feed()),
            containers: cfg.containers.is_some(),
        }
        .run(intake.clone()),
    );

    let (reg_link, reg_in) = LocalClient::connect(
        &broker,
        "registry",
        &registry::FILTERS,
        64,
        intake.clone(),
        &tracker,
    )
    .await?;

    // 5. Retained state from our own stores (rumqttd keeps none across restarts): clients'
    // retained messages first, then the node's own (twin documents, assignments), which win.
    if !kept_retained.is_empty() {
        let (mut link, _) =
            LocalClient::connect(&broker, "retained", &[], 1, intake.clone(), &tracker).await?;
        for (topic, payload) in kept_retained {
            link.publish(Message::retained(topic, payload)).await;
        }
    }
    let (retained_tx, retained_rx) = mpsc::channel(RETAINED_QUEUE);
    tracker.spawn(crate::retained::run(
        retained_store,
        retained_rx,
        metrics.clone(),
    ));
    let (reg, first) = profiles.await.context("profile loading panicked")?;
    // Also with no profile at all: the registry is what registers the node's own twin, so a
    // containers-only node can be told its containers.
    service
        .apply_registry_now(&first.unwrap_or_default())
        .await?;
    let rescan = Arc::new(Notify::new());
    tracker.spawn(registry::run(
        reg,
        reg_link,
        reg_in,
        inputs_tx.clone(),
        Duration::from_millis(cfg.devices_scan_interval_ms),
        rescan.clone(),
        intake.clone(),
    ));
    let front_door_intake = Arc::new(crate::intake::NodeIntake {
        twins: inputs_tx.clone(),
        upstream: bridge.as_ref().map(|b| b.intake()),
        retained: Some(retained_tx),
    });
    drop(inputs_tx);
    let service_stop = CancellationToken::new();
    let service_task = tokio::spawn(service.run(inputs_rx, service_stop.clone()));

    // 6. Only now the outside world.
    // The broker has no listener: every client comes in through the front door, which reaches
    // it through in-process pipes with a login made now.
    let login = edgetwin_broker::fresh_login();
    let pipes = broker
        .serve_in_process(&cfg.mqtt, &login)
        .context("embedded broker")?;
    if let (Some(b), Some(bcfg)) = (bridge.as_mut(), &cfg.bridge) {
        b.connect();
        info!(url = %bcfg.url, "bridge to the cloud broker started");
    }
    let front = cfg.front_door();
    let anonymous_anywhere = front.allow_anonymous == Some(true);
    // The canary asks through the front door as clients do, on its first plain listener (or,
    // when every listener wants TLS, through the broker's in-process link).
    let plain = front.listeners.iter().position(|l| l.tls.is_none());
    let gate = edgetwin_gate::Gate::bind(
        front,
        edgetwin_gate::Upstream {
            broker: edgetwin_gate::upstream::Broker::InProcess(std::sync::Arc::new(move || {
                pipes.connect()
            })),
            login: Some(login.clone()),
        },
        directory.clone(),
        front_door_intake,
    )
    .await
    .context("MQTT front door")?;
    let sessions_path = cfg.data_dir.join("sessions.redb");
    let sessions = crate::sessions::DurableSessions::open(&sessions_path)
        .with_context(|| format!("session table {}", sessions_path.display()))?;
    gate.keep_sessions_in(std::sync::Arc::new(sessions));
    let gate_metrics = gate.metrics();
    metrics.register_with(|r| gate_metrics.register(r));
    let gate_reloader = Some(gate.reloader());
    let listeners = gate.local_addrs();
    let canary_via = match plain.and_then(|i| listeners.get(i).copied()) {
        Some(addr) => crate::canary::Via::Listener(addr, login.clone()),
        None => {
            let (client, rx) = LocalClient::connect(
                &broker,
                "edgetwin-canary",
                &[crate::canary::reply_filter().as_str()],
                16,
                intake.clone(),
                &tracker,
            )
            .await?;
            crate::canary::Via::Broker(client, rx)
        }
    };
    if anonymous_anywhere && listeners.iter().any(|a| !a.ip().is_loopback()) {
        warn!(listeners = ?listeners, "MQTT takes anonymous clients from other hosts (gate.allow_anonymous: true)");
    } else if cfg
        .gate
        .as_ref()
        .is_none_or(|g| g.credentials_file.is_none())
    {
        info!(listeners = ?listeners, "MQTT front door listening; anonymous clients from this host only, as admins (for other hosts add users: edgetwin user add)");
    } else {
        info!(listeners = ?listeners, "MQTT front door listening");
    }
    tracker.spawn(gate.run(intake.clone()));
    // Not ready until the twin service has answered the canary once through the listener.
    health.set(
        crate::canary::CHECK,
        crate::health::Verdict::Failing("waiting for the first answer".into()),
    );
    tracker.spawn(crate::canary::run(
        canary_via,
        cfg.node_id.as_str().to_string(),
        health.clone(),
        crate::canary::Timing {
            every: Duration::from_millis(cfg.health.canary_interval_ms),
            within: Duration::from_millis(cfg.health.canary_timeout_ms),
        },
        intake.clone(),
    ));
    tracker.spawn(reload_on_request(
        control.reload.clone(),
        rescan,
        gate_reloader,
        intake.clone(),
    ));
    health.serving();
    info!(http = %cfg.http.listen, node = %cfg.node_id, "node serving");
    release_freed_memory();
    crate::systemd::ready("serving");

    control.shutdown.cancelled().await;
    info!("shutting down");
    crate::systemd::stopping();
    health.stopping();
    intake.cancel();
    tracker.close();
    // The twin service stops after intake has stopped, so it commits everything it received.
    if tokio::time::timeout(Duration::from_secs(10), tracker.wait())
        .await
        .is_err()
    {
        warn!("background tasks did not stop within 10 s");
    }
    service_stop.cancel();
    match tokio::time::timeout(Duration::from_secs(20), service_task).await {
        Ok(Ok(Ok(()))) => {}
        Ok(Ok(Err(e))) => error!(error = %e, "twin service failed while stopping"),
        Ok(Err(e)) => error!(error = %e, "twin service panicked"),
        Err(_) => error!("twin service did not finish its final commit within 20 s"),
    }
    // After the twin service: its last readings are in the history's queue.
    history_stop.cancel();
    if tokio::time::timeout(Duration::from_secs(10), history_task)
        .await
        .is_err()
    {
        warn!("the history did not write its pending points within 10 s");
    }
    if let Some(bridge) = bridge {
        bridge.shutdown().await;
    }
    bridge_tracker.close();
    if tokio::time::timeout(Duration::from_secs(3), bridge_tracker.wait())
        .await
        .is_err()
    {
        warn!("bridge tasks did not stop within 3 s");
    }
    info!("stopped");
    Ok(())
}

/// The readiness check the bridge's outbox feeds.
pub const OUTBOX_CHECK: &str = "outbox";

fn outbox_health(health: Arc<Health>) -> bridge::HealthHook {
    Box::new(move |error| {
        let verdict = match error {
            None => crate::health::Verdict::Ok,
            Some(e) => crate::health::Verdict::Failing(e.to_string()),
        };
        health.set(OUTBOX_CHECK, verdict);
    })
}

/// Logs and counts what the twin store set aside or restored at open.
fn record_quarantine(metrics: &Metrics, quarantined: &[edgetwin_devicetwin::Quarantined]) {
    let mut records = 0;
    for q in quarantined {
        match &q.kind {
            QuarantineKind::Record { .. } => {
                records += 1;
                warn!(record = ?q, "twin store record quarantined");
            }
            QuarantineKind::File {
                renamed_to,
                restore,
            } => {
                error!(
                    renamed_to = %renamed_to.display(),
                    salvaged = restore.salvaged,
                    from_snapshot = restore.from_snapshot,
                    snapshot_taken_at_ms = ?restore.snapshot_taken_at_ms,
                    "the twin store file was damaged; restored from what could be read"
                );
                for (from, n) in [
                    ("salvage", restore.salvaged),
                    ("snapshot", restore.from_snapshot),
                ] {
                    metrics
                        .store_restored
                        .get_or_create(&RestoredLabels {
                            from: from.to_string(),
                        })
                        .set(n as i64);
                }
                metrics
                    .store_snapshot_damaged
                    .set(restore.snapshot_damaged_lines as i64);
            }
        }
    }
    metrics.store_quarantined.set(records);
}

/// Gives back what start-up (or a profile change) allocated and freed: profile files parsed,
/// every retained twin document and assignment republished. glibc's arenas keep it otherwise:
/// at 10,000 devices that was 2.2 KiB per device of idle RSS (benches/RESULTS.md). Off the async
/// threads, since glibc locks each arena while it walks them. A short task of its own, done
/// after 2 s, so nothing waits for it at shutdown.
pub(crate) fn release_freed_memory() {
    tokio::spawn(async {
        // Once now, and once after the work start-up leaves behind it (the twin store's
        // snapshot, the router's backlog of retained messages).
        for wait in [Duration::ZERO, Duration::from_secs(2)] {
            tokio::time::sleep(wait).await;
            let released = tokio::task::spawn_blocking(edgetwin_memtrim::release_free_memory)
                .await
                .unwrap_or(false);
            tracing::debug!(released, "free allocator memory returned to the system");
        }
    });
}

/// SIGHUP: rescan the profiles and reload the gate's credentials; never stops anything.
async fn reload_on_request(
    reload: Arc<Notify>,
    rescan: Arc<Notify>,
    gate: Option<edgetwin_gate::CredentialsReloader>,
    shutdown: CancellationToken,
) {
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = reload.notified() => {
                crate::systemd::reloading();
                rescan.notify_one();
                if let Some(g) = &gate {
                    match g.reload() {
                        Ok(Some(users)) => info!(users, "gate credentials reloaded"),
                        Ok(None) => {}
                        Err(e) => error!(error = %e, "gate credentials not reloaded; the previous ones stay in force"),
                    }
                }
                crate::systemd::ready("serving (reloaded)");
            }
        }
    }
}

/// Delivers messages from the cloud: desired patches to the twin service (source `cloud`, acked
/// after their commit), anything else republished on the local broker.
async fn route_cloud_messages(
    mut inbound: mpsc::UnboundedReceiver<Inbound>,
    twin: mpsc::Sender<Input>,
    mut relay: LocalClient,
    shutdown: CancellationToken,
) {
    loop {
        let msg = tokio::select! {
            _ = shutdown.cancelled() => break,
            m = inbound.recv() => m,
        };
        let Some(msg) = msg else { break };
        if let Some(why) = &msg.refused {
            // Signatures are required and this one has none that holds: nothing is done; the
            // sender learns why where it would have learnt the outcome (both go upstream).
            if let Some(answer) = refusal_answer(&msg.topic, &msg.payload, why) {
                relay.publish(answer).await;
            }
            let _ = msg.done.send(());
            continue;
        }
        match edgetwin_contract::Topic::parse(&msg.topic) {
            Some(edgetwin_contract::Topic::Desired(device)) => {
                let patch = InjectedPatch {
                    device,
                    payload: msg.payload,
                    source: edgetwin_contract::Source::Cloud,
                    done: Some(msg.done),
                };
                if twin.send(Input::Patch(patch)).await.is_err() {
                    break;
                }
            }
            _ => {
                relay.publish(Message::new(msg.topic, msg.payload)).await;
                let _ = msg.done.send(());
            }
        }
    }
}

/// The answer to a cloud message refused for want of a valid signature: an error on the
/// device's error topic for a desired patch, a failed result for a container command.
fn refusal_answer(topic: &str, payload: &[u8], why: &str) -> Option<Message> {
    use edgetwin_contract::{ErrorCode, ErrorMsg, Topic};
    // The request id, to match the answer: from the payload, or the message inside an envelope.
    let value = serde_json::from_slice::<serde_json::Value>(payload).ok();
    let inner = value
        .as_ref()
        .and_then(|v| v["msg"].as_str())
        .and_then(|m| serde_json::from_str::<serde_json::Value>(m).ok());
    let id = inner
        .as_ref()
        .or(value.as_ref())
        .and_then(|v| v.get("id").or_else(|| v.get("$id")))
        .and_then(|v| v.as_str())
        .map(str::to_string);
    let message = format!("refused: {why}");
    match Topic::parse(topic) {
        Some(Topic::Desired(device)) => {
            let e = ErrorMsg {
                id,
                code: ErrorCode::Unauthenticated,
                message,
                topic: topic.to_string(),
            };
            let body = serde_json::to_vec(&e).unwrap_or_default();
            Some(Message::new(Topic::Error(device).to_topic_string(), body))
        }
        Some(Topic::ContainersCmd) => {
            let body = serde_json::json!({
                "id": id.unwrap_or_default(),
                "ok": false,
                "code": ErrorCode::Unauthenticated.as_str(),
                "error": message,
            });
            Some(Message::new(
                Topic::ContainersResult.to_topic_string(),
                body.to_string(),
            ))
        }
        _ => {
            tracing::warn!(topic, "refused cloud message on a topic with no answer");
            None
        }
    }
}
