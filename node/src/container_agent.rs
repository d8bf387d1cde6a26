//! The node's container agent task: carries out `node/containers/cmd` (coming down through the
//! bridge) on the container runtime, keeps the containers declared in the node's own twin
//! (`dt/{node}/desired.containers`) in their desired state, reports them in
//! `reported.containers`, and keeps the retained `node/containers/status` current.
//!
//! The desired state comes from the twin store, so after a reboot with the cloud unreachable the
//! declared containers are brought back all the same (edge autonomy).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use edgetwin_containers::{parse_desired, Agent, MetricsSnapshot};
use edgetwin_contract::{DeviceId, ErrorCode, ErrorMsg, Topic};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, NoLabelSet};
use prometheus_client::metrics::MetricType;
use rumqttd::Forward;
use serde_json::{json, Value};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::twin_service::{InjectedPatch, Input, CONTAINER_AGENT_SOURCE};
use edgetwin_broker::{LocalClient, Message};

/// What the agent task needs besides the agent itself.
pub struct AgentTask {
    /// The container agent.
    pub agent: Arc<Agent>,
    /// The node's own twin.
    pub node: DeviceId,
    /// Publishes results and status on the local broker.
    pub link: LocalClient,
    /// Commands from `node/containers/cmd`.
    pub commands: mpsc::Receiver<Forward>,
    /// The node twin's committed `desired.containers`.
    pub desired: watch::Receiver<Option<Value>>,
    /// Where `reported.containers` goes (the twin service's input).
    pub twin: mpsc::Sender<Input>,
    /// How often the runtime is checked against the desired state.
    pub interval: Duration,
    /// Metrics export.
    pub metrics: Arc<ContainerMetrics>,
}

/// `node/containers/status` is published when it changes, and at least this often even when it
/// does not (a heartbeat for the cloud, which receives it through the bridge): publishing it at
/// every reconcile tick sent 8,640 unchanged copies a day, queued in the outbox during outages.
pub const STATUS_HEARTBEAT: Duration = Duration::from_secs(300);

impl AgentTask {
    /// Runs until shutdown.
    pub async fn run(mut self, shutdown: CancellationToken) {
        let mut tick = tokio::time::interval(self.interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_reported: Option<Value> = None;
        let mut last_invalid: Option<Vec<String>> = None;
        let mut last_status: Option<(Value, tokio::time::Instant)> = None;
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                cmd = self.commands.recv() => {
                    let Some(cmd) = cmd else { break };
                    let result = self.agent.handle_command(&cmd.publish.payload).await;
                    self.link
                        .publish(Message::new(Topic::ContainersResult.to_topic_string(), result))
                        .await;
                    self.publish_status(&mut last_status).await;
                }
                changed = self.desired.changed() => {
                    if changed.is_err() {
                        break;
                    }
                    self.reconcile(&mut last_reported, &mut last_invalid).await;
                    self.publish_status(&mut last_status).await;
                }
                _ = tick.tick() => {
                    self.reconcile(&mut last_reported, &mut last_invalid).await;
                    self.publish_status(&mut last_status).await;
                }
            }
            self.metrics.update(self.agent.metrics());
        }
    }

    async fn reconcile(
        &mut self,
        last_reported: &mut Option<Value>,
        last_invalid: &mut Option<Vec<String>>,
    ) {
        // Never declared: containers started by commands are left alone.
        let Some(desired) = self.desired.borrow().clone() else {
            return;
        };
        let desired = if desired.is_null() {
            json!({})
        } else {
            desired
        };
        let parsed = match parse_desired(&desired) {
            Ok(p) => {
                *last_invalid = None;
                p
            }
            Err(errors) => {
                if last_invalid.as_ref() != Some(&errors) {
                    warn!(device = %self.node, errors = ?errors, "desired containers are invalid; nothing changed");
                    let msg = ErrorMsg {
                        id: None,
                        code: ErrorCode::DeviceConfig,
                        message: format!("desired.containers: {}", errors.join("; ")),
                        topic: Topic::Desired(self.node.clone()).to_topic_string(),
                    };
                    self.link
                        .publish(Message::json(
                            Topic::Error(self.node.clone()).to_topic_string(),
                            &msg,
                        ))
                        .await;
                    *last_invalid = Some(errors);
                }
                return;
            }
        };
        let report = self.agent.reconcile(&parsed).await;
        if report.error_count() > 0 {
            warn!(device = %self.node, errors = report.error_count(), runtime = ?report.error, "reconcile had errors");
        }
        if report.error.is_some() {
            // The runtime could not be read: report nothing rather than an empty set.
            return;
        }
        if last_reported.as_ref() != Some(&report.reported) {
            info!(device = %self.node, containers = %report.reported, "containers reported");
            let patch = json!({ "containers": report.reported.clone() });
            let Ok(reporter) = edgetwin_contract::ProtocolName::new(CONTAINER_AGENT_SOURCE) else {
                return;
            };
            let injected = InjectedPatch {
                device: self.node.clone(),
                payload: Bytes::from(patch.to_string()),
                source: edgetwin_contract::Source::Mapper(reporter),
                done: None,
            };
            if self.twin.send(Input::Patch(injected)).await.is_ok() {
                *last_reported = Some(report.reported);
            }
        }
    }

    /// Publishes `node/containers/status` when the containers changed since `last` (or the
    /// heartbeat is due).
    async fn publish_status(&mut self, last: &mut Option<(Value, tokio::time::Instant)>) {
        let status = match self.agent.status().await {
            Ok(s) => s,
            Err(e) => {
                warn!(error = %e, "container runtime status unavailable");
                return;
            }
        };
        let containers = serde_json::to_value(&status.containers).unwrap_or(Value::Null);
        let now = tokio::time::Instant::now();
        let unchanged = last
            .as_ref()
            .is_some_and(|(c, at)| *c == containers && now.duration_since(*at) < STATUS_HEARTBEAT);
        if unchanged {
            return;
        }
        match serde_json::to_vec(&status) {
            Ok(p) => {
                self.link
                    .publish(Message::retained(
                        Topic::ContainersStatus.to_topic_string(),
                        p,
                    ))
                    .await;
                *last = Some((containers, now));
            }
            Err(e) => warn!(error = %e, "cannot encode container status"),
        }
    }
}

/// Latest container agent counters, encoded on every scrape.
#[derive(Debug, Default)]
pub struct ContainerMetrics {
    snapshot: Mutex<Option<MetricsSnapshot>>,
}

impl ContainerMetrics {
    /// Replaces the snapshot.
    pub fn update(&self, s: MetricsSnapshot) {
        if let Ok(mut cur) = self.snapshot.lock() {
            *cur = Some(s);
        }
    }
}

impl Collector for ContainerMetrics {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let Ok(guard) = self.snapshot.lock() else {
            return Ok(());
        };
        // Without an agent the families are still described (empty), so dashboards and the
        // metrics list stay the same on every node.
        let none = MetricsSnapshot::default();
        let s = guard.as_ref().unwrap_or(&none);
        let mut m = encoder.encode_descriptor(
            "containers",
            "Containers on the node's runtime by state",
            None,
            MetricType::Gauge,
        )?;
        for (state, n) in &s.containers_by_state {
            m.encode_family(&[("state", state.as_str())])?
                .encode_gauge(&i64::try_from(*n).unwrap_or(i64::MAX))?;
        }
        let mut m = encoder.encode_descriptor(
            "container_commands",
            "Container commands carried out, by action and outcome (redeliveries not counted)",
            None,
            MetricType::Counter,
        )?;
        let by: BTreeMap<_, _> = s.command_results.iter().collect();
        for ((action, outcome), n) in by {
            m.encode_family(&[("action", *action), ("outcome", *outcome)])?
                .encode_counter::<NoLabelSet, _, u64>(n, None)?;
        }
        for (name, help, v) in [
            (
                "container_command_duplicates",
                "Redelivered container commands answered from the id store",
                s.command_duplicates,
            ),
            (
                "container_reconciles",
                "Reconciles of the declared containers",
                s.reconcile_runs,
            ),
            (
                "container_reconcile_errors",
                "Failed reconcile actions (and reconciles that could not read the runtime)",
                s.reconcile_errors,
            ),
            (
                "container_restarts",
                "Container restarts done by the runtime under restart policies",
                s.restarts,
            ),
        ] {
            encoder
                .encode_descriptor(name, help, None, MetricType::Counter)?
                .encode_counter::<NoLabelSet, _, u64>(&v, None)?;
        }
        Ok(())
    }
}
