//! The twin service: the in-process broker client that owns every device twin.
//!
//! It drains whatever messages wait on its link into one batch, applies them to the in-memory
//! twins with the pure core (`edgetwin_devicetwin::core`), writes every changed twin in one redb
//! transaction (group commit), and only then publishes twin documents, deltas, get results and
//! errors. If the commit fails, the in-memory twins of that batch are rolled back and every message
//! that would have changed something is answered with `store_failed`, so memory never runs ahead
//! of disk.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::Instant;

use anyhow::Context;
use bytes::Bytes;
use edgetwin_contract::{
    topic::filter, DeltaMsg, DeviceId, DeviceStatusMsg, ErrorCode, ErrorMsg, GetRequest, GetResult,
    MapperMetricsMsg, MapperState, MapperStatusMsg, ProtocolName, Source, Topic,
};
use edgetwin_devicetwin::core::{ModelSpec, Patch, PropertySpec, Rejection, Twin};
use edgetwin_devicetwin::store::TwinStore;
use edgetwin_profile::{ProfileSet, ResolvedDevice};
use rumqttd::local::{LinkRx, LinkTx};
use rumqttd::protocol::{Packet, Publish, PublishProperties};
use rumqttd::{Forward, Notification};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use crate::clock::now_ms;
use crate::metrics::{Metrics, ReasonLabels, Side, StatusLabels, UpdateLabels};

/// A new set of registered devices for the twin service, with an acknowledgement once the twins
/// exist durably and the mapper assignments are published.
pub struct RegistryUpdate {
    /// Every registered model and device.
    pub set: ProfileSet,
    /// Fired after the update took effect (or failed to be stored).
    pub done: Option<oneshot::Sender<anyhow::Result<()>>>,
}

/// A patch handed to the twin service in-process rather than through the broker: desired
/// patches from the cloud (via the bridge) and the container agent's reported state.
pub struct InjectedPatch {
    /// The device the patch is for.
    pub device: DeviceId,
    /// The JSON merge patch.
    pub payload: Bytes,
    /// Who sent it.
    pub origin: Origin,
    /// Fired after the patch was committed (or rejected); the cloud broker is acked then.
    pub done: Option<oneshot::Sender<()>>,
}

/// Where an injected patch comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Origin {
    /// A desired patch from the cloud; applied with source `cloud`.
    Cloud,
    /// The container agent's report for the node's own twin; applied as reported.
    ContainerAgent,
}

/// Who sent a patch: desired from a local client or the cloud, reported from a mapper (or the
/// container agent, which reports like a mapper of the node's own twin).
#[derive(Clone, Copy, PartialEq, Eq)]
enum PatchFrom {
    Local,
    Cloud,
    Mapper,
}

/// The protocol name the container agent reports under (`mapper:containers` in metadata).
pub const CONTAINER_AGENT_SOURCE: &str = "containers";

/// A registered device as the twin service sees it.
struct Registered {
    /// The model's checks.
    spec: Arc<ModelSpec>,
    /// Who reports this device (its mapper's protocol, or the container agent).
    reporter: ProtocolName,
    /// What its mapper receives; `None` for the node's own twin, which no mapper serves.
    resolved: Option<ResolvedDevice>,
}

/// Which protocol serves each registered device, for the gate's per-client permissions; the
/// twin service rewrites it on every registry change, the gate reads it on every mapper message.
#[derive(Debug, Default)]
pub struct Directory {
    map: std::sync::RwLock<HashMap<DeviceId, ProtocolName>>,
}

impl edgetwin_gate::DeviceDirectory for Directory {
    fn protocol_of(&self, device: &DeviceId) -> Option<ProtocolName> {
        self.map.read().ok()?.get(device).cloned()
    }
}

/// The node twin's device id and where its committed `desired.containers` goes.
pub type NodeTwin = (
    DeviceId,
    tokio::sync::watch::Sender<Option<serde_json::Value>>,
);

/// The built-in model of the node's own twin: `desired.containers` / `reported.containers`.
fn node_model_spec() -> ModelSpec {
    let mut properties = BTreeMap::new();
    properties.insert(
        "containers".to_string(),
        PropertySpec {
            ty: edgetwin_contract::PropertyType::Object,
            access: edgetwin_contract::AccessMode::ReadWrite,
            minimum: None,
            maximum: None,
        },
    );
    ModelSpec {
        name: NODE_MODEL.to_string(),
        properties,
    }
}

/// Name of the built-in model of the node's own twin.
pub const NODE_MODEL: &str = "edgetwin-node";

/// How far ahead of the node's clock a writer's `ts` may be.
const MAX_CLOCK_SKEW_MS: i64 = 5 * 60 * 1000;

/// Settings of the service.
pub struct TwinServiceConfig {
    /// Most messages per group commit.
    pub max_batch: usize,
    /// Most properties in one patch.
    pub max_properties_per_patch: usize,
}

/// Starts the task that moves broker notifications from the link into a channel, so the service
/// can batch with `recv_many`.
pub fn spawn_link_reader(
    mut link_rx: LinkRx,
    capacity: usize,
    shutdown: CancellationToken,
    tracker: &tokio_util::task::TaskTracker,
) -> mpsc::Receiver<Forward> {
    let (tx, rx) = mpsc::channel(capacity);
    tracker.spawn(async move {
        loop {
            let next = tokio::select! {
                _ = shutdown.cancelled() => break,
                n = link_rx.next() => n,
            };
            match next {
                Ok(Some(Notification::Forward(f))) => {
                    if tx.send(f).await.is_err() {
                        break;
                    }
                }
                // The router stops feeding a link whose buffer filled up until the link says it
                // is ready again.
                Ok(Some(Notification::Unschedule)) => {
                    if let Err(e) = link_rx.wake().await {
                        error!(error = %e, "broker link wake failed");
                        break;
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    error!(error = %e, "broker link closed");
                    break;
                }
            }
        }
    });
    rx
}

/// Where a publish goes after the commit.
struct Out {
    topic: String,
    payload: Vec<u8>,
    retain: bool,
    props: Option<PublishProperties>,
}

/// The twin service state.
pub struct TwinService {
    link_tx: LinkTx,
    store: Arc<TwinStore>,
    metrics: Arc<Metrics>,
    cfg: TwinServiceConfig,
    twins: HashMap<DeviceId, Twin>,
    /// Registered devices, the node's own twin included.
    devices: HashMap<DeviceId, Registered>,
    /// The node's own twin (container agent), if enabled.
    node: Option<DeviceId>,
    /// Device → protocol, shared with the gate.
    directory: Arc<Directory>,
    /// Where the node twin's `desired.containers` goes after each commit that changed it.
    node_desired: Option<tokio::sync::watch::Sender<Option<serde_json::Value>>>,
    /// Assignments as last published: device -> (protocol, payload), to publish only changes.
    assigned: HashMap<DeviceId, (ProtocolName, Vec<u8>)>,
}

/// One batch's bookkeeping.
#[derive(Default)]
struct Batch {
    /// Twins as they were before this batch touched them, to roll back a failed commit.
    originals: HashMap<DeviceId, Option<Twin>>,
    /// Devices whose twin document changed (persist + republish).
    dirty: Vec<DeviceId>,
    dirty_set: HashSet<DeviceId>,
    /// Earliest arrival of a change per device, for the delta latency metric.
    arrived: HashMap<DeviceId, Instant>,
    /// Devices whose delta must be (re)sent even if their twin did not change.
    resend_delta: Vec<DeviceId>,
    /// Publishes in message order; `None` entries are the twin/delta of a dirty device, resolved
    /// after the commit so they carry the committed state.
    outs: Vec<Out>,
    /// Devices to store without publishing (metadata-only changes).
    silent: HashSet<DeviceId>,
    /// Messages whose effect depends on the commit, answered with `store_failed` if it fails.
    pending_errors: Vec<(DeviceId, String, Option<String>)>,
}

impl TwinService {
    /// Creates the service over loaded twins and subscribes its link.
    pub fn new(
        mut link_tx: LinkTx,
        store: Arc<TwinStore>,
        twins: Vec<Twin>,
        metrics: Arc<Metrics>,
        cfg: TwinServiceConfig,
        node: Option<NodeTwin>,
        directory: Arc<Directory>,
    ) -> anyhow::Result<TwinService> {
        for f in [
            filter::DESIRED,
            filter::REPORTED,
            filter::GET,
            filter::STATUS,
            filter::MAPPER_STATUS,
            filter::MAPPER_METRICS,
        ] {
            link_tx
                .subscribe(f)
                .with_context(|| format!("twin service cannot subscribe {f}"))?;
        }
        let twins: HashMap<DeviceId, Twin> =
            twins.into_iter().map(|t| (t.device.clone(), t)).collect();
        // The container agent starts from the stored desired state, so declared containers come
        // back after a reboot even with the cloud unreachable.
        if let Some((d, tx)) = &node {
            tx.send_replace(twins.get(d).and_then(node_desired_containers));
        }
        Ok(TwinService {
            link_tx,
            store,
            metrics,
            cfg,
            twins,
            devices: HashMap::new(),
            node: node.as_ref().map(|(d, _)| d.clone()),
            directory,
            node_desired: node.map(|(_, tx)| tx),
            assigned: HashMap::new(),
        })
    }

    /// Runs until shutdown; then processes what already arrived, commits it, and returns.
    pub async fn run(
        mut self,
        mut incoming: mpsc::Receiver<Forward>,
        mut registry: mpsc::Receiver<RegistryUpdate>,
        mut cloud: mpsc::Receiver<InjectedPatch>,
        shutdown: CancellationToken,
    ) -> anyhow::Result<()> {
        let mut buf = Vec::with_capacity(self.cfg.max_batch);
        let mut cloud_buf = Vec::new();
        let mut cloud_open = true;
        loop {
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => break,
                Some(update) = registry.recv() => {
                    let result = self.apply_registry(update.set).await;
                    if let Err(e) = &result {
                        error!(error = %e, "device registry update failed");
                    }
                    if let Some(done) = update.done {
                        let _ = done.send(result);
                    }
                }
                n = incoming.recv_many(&mut buf, self.cfg.max_batch) => {
                    if n == 0 {
                        break;
                    }
                    let batch = std::mem::take(&mut buf);
                    self.process(batch).await;
                }
                n = cloud.recv_many(&mut cloud_buf, self.cfg.max_batch), if cloud_open => {
                    if n == 0 {
                        cloud_open = false;
                        continue;
                    }
                    let batch = std::mem::take(&mut cloud_buf);
                    self.process_cloud(batch).await;
                }
            }
        }
        // Drain what the broker already handed us, so an accepted message is not dropped at exit.
        incoming.close();
        while let Ok(f) = incoming.try_recv() {
            buf.push(f);
            if buf.len() >= self.cfg.max_batch {
                self.process(std::mem::take(&mut buf)).await;
            }
        }
        if !buf.is_empty() {
            self.process(buf).await;
        }
        info!("twin service stopped; store flushed");
        Ok(())
    }

    async fn process(&mut self, batch: Vec<Forward>) {
        let mut b = Batch::default();
        let arrived = Instant::now();
        for f in batch {
            let topic = String::from_utf8_lossy(&f.publish.topic).into_owned();
            self.handle(&mut b, arrived, &topic, &f.publish.payload, f.properties);
        }
        self.finish(b).await;
    }

    /// Applies desired patches from the cloud as one batch, then fires their `done`.
    async fn process_cloud(&mut self, batch: Vec<InjectedPatch>) {
        let mut b = Batch::default();
        let arrived = Instant::now();
        let mut done = Vec::with_capacity(batch.len());
        for p in batch {
            let (topic, from) = match p.origin {
                Origin::Cloud => (Topic::Desired(p.device.clone()), PatchFrom::Cloud),
                Origin::ContainerAgent => (Topic::Reported(p.device.clone()), PatchFrom::Mapper),
            };
            self.handle_patch(
                &mut b,
                arrived,
                &topic.to_topic_string(),
                p.device,
                &p.payload,
                from,
            );
            done.extend(p.done);
        }
        self.finish(b).await;
        for d in done {
            let _ = d.send(());
        }
    }

    fn handle(
        &mut self,
        b: &mut Batch,
        arrived: Instant,
        topic: &str,
        payload: &Bytes,
        props: Option<PublishProperties>,
    ) {
        let Some(parsed) = Topic::parse(topic) else {
            debug!(topic, "ignoring message on unparsable topic");
            return;
        };
        match parsed {
            Topic::Desired(d) => self.handle_patch(b, arrived, topic, d, payload, PatchFrom::Local),
            Topic::Reported(d) => {
                self.handle_patch(b, arrived, topic, d, payload, PatchFrom::Mapper)
            }
            Topic::Get(d) => self.handle_get(b, topic, d, payload, props),
            Topic::Status(d) => self.handle_status(b, topic, d, payload),
            Topic::MapperStatus(p) => self.handle_mapper_status(b, p, payload),
            Topic::MapperMetrics(p) => match serde_json::from_slice::<MapperMetricsMsg>(payload) {
                Ok(mut msg) => {
                    msg.devices.retain(|d, _| {
                        DeviceId::new(d.as_str()).is_ok_and(|d| self.devices.contains_key(&d))
                    });
                    self.metrics.mappers.update(p.as_str(), msg);
                }
                Err(e) => debug!(topic, error = %e, "ignoring malformed mapper metrics"),
            },
            _ => {}
        }
    }

    fn reject(
        &self,
        b: &mut Batch,
        device: &DeviceId,
        topic: &str,
        id: Option<String>,
        r: Rejection,
    ) {
        self.metrics
            .twin_updates_rejected
            .get_or_create(&ReasonLabels {
                reason: r.code.as_str().to_string(),
            })
            .inc();
        debug!(device = %device, topic, code = %r.code, message = %r.message, "patch rejected");
        let msg = ErrorMsg {
            id,
            code: r.code,
            message: r.message,
            topic: topic.to_string(),
        };
        b.outs.push(json_out(
            &Topic::Error(device.clone()).to_topic_string(),
            &msg,
            false,
            None,
        ));
    }

    fn touch(&mut self, b: &mut Batch, device: &DeviceId) {
        if !b.originals.contains_key(device) {
            b.originals
                .insert(device.clone(), self.twins.get(device).cloned());
        }
    }

    fn mark_dirty(&mut self, b: &mut Batch, device: &DeviceId, arrived: Option<Instant>) {
        if b.dirty_set.insert(device.clone()) {
            b.dirty.push(device.clone());
        }
        if let Some(t) = arrived {
            b.arrived.entry(device.clone()).or_insert(t);
        }
    }

    fn mark_dirty_silent(&mut self, b: &mut Batch, device: &DeviceId) {
        b.silent.insert(device.clone());
    }

    fn handle_patch(
        &mut self,
        b: &mut Batch,
        arrived: Instant,
        topic: &str,
        device: DeviceId,
        payload: &Bytes,
        from: PatchFrom,
    ) {
        let side = match from {
            PatchFrom::Local | PatchFrom::Cloud => Side::Desired,
            PatchFrom::Mapper => Side::Reported,
        };
        let patch = match Patch::parse(payload, self.cfg.max_properties_per_patch) {
            Ok(p) => p,
            Err(r) => return self.reject(b, &device, topic, None, r),
        };
        let now = now_ms();
        if patch.ts.is_some_and(|ts| ts > now + MAX_CLOCK_SKEW_MS) {
            // A far-future timestamp would win every later write and lock the property.
            let r = Rejection {
                code: ErrorCode::InvalidPatch,
                message: format!(
                    "\"ts\" is more than {} s ahead of the node's clock",
                    MAX_CLOCK_SKEW_MS / 1000
                ),
            };
            return self.reject(b, &device, topic, None, r);
        }
        let Some(reg) = self.devices.get(&device) else {
            let r = Rejection {
                code: ErrorCode::UnknownDevice,
                message: format!("device {device:?} is not registered on this node"),
            };
            return self.reject(b, &device, topic, None, r);
        };
        let spec = reg.spec.clone();
        let source = match side {
            Side::Desired if from == PatchFrom::Cloud => Source::Cloud,
            Side::Desired => Source::Local,
            Side::Reported => Source::Mapper(reg.reporter.clone()),
        };
        self.touch(b, &device);
        let model = spec.name.clone();
        let twin = self
            .twins
            .entry(device.clone())
            .or_insert_with(|| Twin::new(device.clone(), model));
        let result = match side {
            Side::Desired => twin.apply_desired(&spec, &patch, source.clone(), now),
            Side::Reported => twin.apply_reported(&spec, &patch, source.clone(), now),
        };
        let labels = UpdateLabels {
            side: side.as_str().to_string(),
            source: match source {
                Source::Local => "local".into(),
                Source::Cloud => "cloud".into(),
                Source::Mapper(_) => "mapper".into(),
            },
        };
        match result {
            Err(r) => self.reject(b, &device, topic, None, r),
            Ok(applied) if applied.changed.is_empty() => {
                self.metrics
                    .twin_updates_unchanged
                    .get_or_create(&labels)
                    .inc();
                // A newer desired write of the same value moves its (ts, source); that is stored
                // (not published) so convergence holds across restarts. Repeated readings are
                // not stored: that would rewrite flash on every poll.
                if side == Side::Desired && !applied.touched.is_empty() {
                    self.mark_dirty_silent(b, &device);
                }
            }
            Ok(applied) => {
                self.metrics
                    .twin_updates_accepted
                    .get_or_create(&labels)
                    .inc();
                debug!(device = %device, topic, changed = ?applied.changed, "patch applied");
                self.mark_dirty(b, &device, Some(arrived));
                b.pending_errors.push((device, topic.to_string(), None));
            }
        }
    }

    fn handle_get(
        &mut self,
        b: &mut Batch,
        topic: &str,
        device: DeviceId,
        payload: &Bytes,
        props: Option<PublishProperties>,
    ) {
        let req: GetRequest = if payload.iter().all(u8::is_ascii_whitespace) {
            GetRequest::default()
        } else {
            match serde_json::from_slice(payload) {
                Ok(r) => r,
                Err(e) => {
                    let r = Rejection {
                        code: ErrorCode::MalformedJson,
                        message: format!("get request is not {{\"id\": string}}: {e}"),
                    };
                    return self.reject(b, &device, topic, None, r);
                }
            }
        };
        let Some(twin) = self
            .twins
            .get(&device)
            .filter(|_| self.devices.contains_key(&device))
        else {
            let r = Rejection {
                code: ErrorCode::UnknownDevice,
                message: format!("device {device:?} is not registered on this node"),
            };
            return self.reject(b, &device, topic, req.id, r);
        };
        let result = GetResult {
            id: req.id,
            twin: twin.to_doc(),
        };
        // MQTT 5 request/response: answer on the response topic with the correlation data.
        let (reply_topic, reply_props) = match props {
            Some(p) if p.response_topic.as_deref().is_some_and(valid_publish_topic) => {
                let rt = p.response_topic.clone().unwrap_or_default();
                let props = PublishProperties {
                    correlation_data: p.correlation_data.clone(),
                    ..Default::default()
                };
                (rt, Some(props))
            }
            _ => (Topic::GetResult(device).to_topic_string(), None),
        };
        b.outs
            .push(json_out(&reply_topic, &result, false, reply_props));
    }

    fn handle_status(&mut self, b: &mut Batch, topic: &str, device: DeviceId, payload: &Bytes) {
        if payload.is_empty() || !self.devices.contains_key(&device) {
            return;
        }
        let msg: DeviceStatusMsg = match serde_json::from_slice(payload) {
            Ok(m) => m,
            Err(e) => {
                let r = Rejection {
                    code: ErrorCode::MalformedJson,
                    message: format!("status is not {{\"state\",\"ts\",\"message\"?}}: {e}"),
                };
                return self.reject(b, &device, topic, None, r);
            }
        };
        self.touch(b, &device);
        let now = now_ms();
        if let Some(twin) = self.twins.get_mut(&device) {
            if twin.apply_status(&msg, now) {
                self.mark_dirty(b, &device, None);
            }
        }
    }

    fn handle_mapper_status(&mut self, b: &mut Batch, protocol: ProtocolName, payload: &Bytes) {
        let Ok(msg) = serde_json::from_slice::<MapperStatusMsg>(payload) else {
            return;
        };
        if msg.state != MapperState::Online {
            return;
        }
        // A (re)connected mapper gets the deltas it may have missed.
        info!(protocol = %protocol, "mapper online; resending deltas");
        for (d, reg) in &self.devices {
            if reg.resolved.is_some() && reg.reporter == protocol {
                b.resend_delta.push(d.clone());
            }
        }
    }

    async fn finish(&mut self, b: Batch) {
        let Batch {
            originals,
            dirty,
            arrived,
            resend_delta,
            mut outs,
            pending_errors,
            silent,
            ..
        } = b;
        if !dirty.is_empty() || !silent.is_empty() {
            let mut to_store: Vec<&DeviceId> = dirty.iter().collect();
            to_store.extend(silent.iter().filter(|d| !dirty.contains(d)));
            let twins: Vec<Twin> = to_store
                .iter()
                .filter_map(|d| self.twins.get(*d).cloned())
                .collect();
            match self.commit(twins).await {
                Ok(()) => {}
                Err(e) => {
                    error!(error = %e, devices = dirty.len(), "twin store commit failed; batch rolled back");
                    for (d, original) in originals {
                        match original {
                            Some(t) => {
                                self.twins.insert(d, t);
                            }
                            None => {
                                self.twins.remove(&d);
                            }
                        }
                    }
                    let mut failed = Batch::default();
                    for (device, topic, id) in pending_errors {
                        let r = Rejection {
                            code: ErrorCode::StoreFailed,
                            message: format!("the change could not be stored: {e}"),
                        };
                        self.reject(&mut failed, &device, &topic, id, r);
                    }
                    outs.extend(failed.outs);
                    self.flush(outs);
                    return;
                }
            }
        }
        self.notify_node_desired(&dirty);
        let now = now_ms();
        let mut delta_sent = HashSet::new();
        for d in &dirty {
            let Some(twin) = self.twins.get(d) else {
                continue;
            };
            outs.push(json_out(
                &Topic::Twin(d.clone()).to_topic_string(),
                &twin.to_doc(),
                true,
                None,
            ));
            if let Some(out) = delta_out(twin, now) {
                outs.push(out);
                delta_sent.insert(d.clone());
            }
        }
        for d in resend_delta {
            if delta_sent.contains(&d) {
                continue;
            }
            if let Some(out) = self.twins.get(&d).and_then(|t| delta_out(t, now)) {
                outs.push(out);
                delta_sent.insert(d);
            }
        }
        self.flush(outs);
        for (d, t) in arrived {
            if delta_sent.contains(&d) {
                self.metrics
                    .twin_delta_latency
                    .observe(t.elapsed().as_secs_f64());
            }
        }
        self.update_device_gauge();
    }

    /// Hands the node twin's committed `desired.containers` to the container agent when it changed.
    fn notify_node_desired(&self, dirty: &[DeviceId]) {
        let (Some(node), Some(tx)) = (&self.node, &self.node_desired) else {
            return;
        };
        if dirty.contains(node) {
            let desired = self.twins.get(node).and_then(node_desired_containers);
            tx.send_if_modified(|cur| {
                let changed = *cur != desired;
                if changed {
                    cur.clone_from(&desired);
                }
                changed
            });
        }
    }

    async fn commit(&self, twins: Vec<Twin>) -> anyhow::Result<()> {
        let store = self.store.clone();
        let started = Instant::now();
        let n = twins.len();
        let result = tokio::task::spawn_blocking(move || {
            let refs: Vec<&Twin> = twins.iter().collect();
            store.commit(&refs).map(|_| ())
        })
        .await
        .context("store commit task panicked")?;
        match result {
            Ok(()) => {
                self.metrics
                    .store_commit_duration
                    .observe(started.elapsed().as_secs_f64());
                self.metrics.store_commit_batch.observe(n as f64);
                Ok(())
            }
            Err(e) => {
                self.metrics.store_commit_errors.inc();
                Err(e.into())
            }
        }
    }

    fn flush(&mut self, outs: Vec<Out>) {
        for o in outs {
            self.publish_raw(o);
        }
    }

    fn publish_json<T: serde::Serialize>(
        &mut self,
        topic: &str,
        value: &T,
        retain: bool,
        props: Option<PublishProperties>,
    ) {
        let o = json_out(topic, value, retain, props);
        self.publish_raw(o);
    }

    fn publish_raw(&mut self, o: Out) {
        let mut publish = Publish::new(
            Bytes::from(o.topic.clone()),
            Bytes::from(o.payload),
            o.retain,
        );
        publish.retain = o.retain;
        // LinkTx::send only queues into the router's channel; it never waits on a client.
        if let Err(e) = send_now(&mut self.link_tx, Packet::Publish(publish, o.props)) {
            warn!(topic = %o.topic, error = %e, "cannot publish to the embedded broker");
        }
    }

    fn update_device_gauge(&self) {
        let mut counts: BTreeMap<&'static str, i64> =
            [("unknown", 0), ("online", 0), ("offline", 0), ("error", 0)]
                .into_iter()
                .collect();
        for d in self.devices.keys() {
            let state = self
                .twins
                .get(d)
                .map(|t| t.status.state)
                .unwrap_or(edgetwin_contract::DeviceState::Unknown);
            let key = match state {
                edgetwin_contract::DeviceState::Unknown => "unknown",
                edgetwin_contract::DeviceState::Online => "online",
                edgetwin_contract::DeviceState::Offline => "offline",
                edgetwin_contract::DeviceState::Error => "error",
            };
            *counts.entry(key).or_default() += 1;
        }
        for (status, n) in counts {
            self.metrics
                .devices
                .get_or_create(&StatusLabels {
                    status: status.to_string(),
                })
                .set(n);
        }
    }

    /// Applies the registry found at start, before the service loop runs.
    pub async fn apply_registry_now(&mut self, set: ProfileSet) -> anyhow::Result<()> {
        self.apply_registry(set).await
    }

    /// Applies a new registry: creates twins for new devices (durably), publishes changed mapper
    /// assignments and twin documents, and withdraws the retained messages of removed devices.
    async fn apply_registry(&mut self, set: ProfileSet) -> anyhow::Result<()> {
        let mut new_devices: HashMap<DeviceId, Registered> = HashMap::new();
        if let Some(node) = &self.node {
            let reporter =
                ProtocolName::new(CONTAINER_AGENT_SOURCE).context("agent source name")?;
            new_devices.insert(
                node.clone(),
                Registered {
                    spec: Arc::new(node_model_spec()),
                    reporter,
                    resolved: None,
                },
            );
        }
        let mut specs: HashMap<String, Arc<ModelSpec>> = HashMap::new();
        for (name, model) in &set.models {
            specs.insert(name.clone(), Arc::new(model_spec(name, model)));
        }
        for (id, device) in &set.devices {
            let model_name = device.model_ref().to_string();
            let (Some(spec), Some(model)) = (specs.get(&model_name), set.models.get(&model_name))
            else {
                warn!(device = %id, model = %model_name, "device refers to an unknown model; skipped");
                continue;
            };
            if self.node.as_ref() == Some(id) {
                warn!(device = %id, "a profile device has the node's own name; the node twin wins");
                continue;
            }
            let resolved = ResolvedDevice {
                device: device.clone(),
                model: model.clone(),
            };
            new_devices.insert(
                id.clone(),
                Registered {
                    spec: spec.clone(),
                    reporter: resolved.protocol(),
                    resolved: Some(resolved),
                },
            );
        }
        // Twins that must be created or whose model changed, committed before anything is published.
        let mut to_store = Vec::new();
        for (id, reg) in &new_devices {
            let spec = &reg.spec;
            match self.twins.get_mut(id) {
                Some(t) if t.model == spec.name => {}
                Some(t) => {
                    t.model = spec.name.clone();
                    to_store.push(t.clone());
                }
                None => {
                    let mut t = Twin::new(id.clone(), spec.name.clone());
                    if let Some(model) = set.models.get(&spec.name) {
                        apply_model_defaults(&mut t, spec, model);
                    }
                    self.twins.insert(id.clone(), t.clone());
                    to_store.push(t);
                }
            }
        }
        if !to_store.is_empty() {
            self.commit(to_store).await?;
        }
        // Withdraw removed devices.
        let removed: Vec<DeviceId> = self
            .devices
            .keys()
            .filter(|d| !new_devices.contains_key(*d))
            .cloned()
            .collect();
        for d in &removed {
            info!(device = %d, "device unregistered");
            self.publish_raw(Out {
                topic: Topic::Twin(d.clone()).to_topic_string(),
                payload: Vec::new(),
                retain: true,
                props: None,
            });
        }
        let old_assigned = std::mem::take(&mut self.assigned);
        for (d, (p, _)) in &old_assigned {
            let still = new_devices
                .get(d)
                .and_then(|r| r.resolved.as_ref())
                .map(ResolvedDevice::protocol);
            if still.as_ref() != Some(p) {
                self.publish_raw(Out {
                    topic: Topic::MapperDevice(p.clone(), d.clone()).to_topic_string(),
                    payload: Vec::new(),
                    retain: true,
                    props: None,
                });
            }
        }
        let newly: Vec<DeviceId> = new_devices
            .keys()
            .filter(|d| !self.devices.contains_key(*d))
            .cloned()
            .collect();
        for (d, reg) in &new_devices {
            let Some(resolved) = &reg.resolved else {
                continue;
            };
            let protocol = resolved.protocol();
            let payload = match serde_json::to_vec(resolved) {
                Ok(p) => p,
                Err(e) => {
                    error!(device = %d, error = %e, "cannot encode resolved device");
                    continue;
                }
            };
            let unchanged = old_assigned
                .get(d)
                .is_some_and(|(p, old)| *p == protocol && *old == payload);
            if !unchanged {
                self.publish_raw(Out {
                    topic: Topic::MapperDevice(protocol.clone(), d.clone()).to_topic_string(),
                    payload: payload.clone(),
                    retain: true,
                    props: None,
                });
            }
            self.assigned.insert(d.clone(), (protocol, payload));
        }
        self.devices = new_devices;
        if let Ok(mut map) = self.directory.map.write() {
            *map = self
                .devices
                .iter()
                .filter(|(_, r)| r.resolved.is_some())
                .map(|(d, r)| (d.clone(), r.reporter.clone()))
                .collect();
        }
        let registered = |d: &str| DeviceId::new(d).is_ok_and(|d| self.devices.contains_key(&d));
        self.metrics.mappers.retain_devices(&registered);
        for d in newly {
            if let Some(twin) = self.twins.get(&d) {
                let doc = twin.to_doc();
                self.publish_json(&Topic::Twin(d.clone()).to_topic_string(), &doc, true, None);
            }
        }
        self.update_device_gauge();
        Ok(())
    }
}

/// Queues a packet for the router. `LinkTx::send` is `async` only in name: it pushes into a buffer
/// and sends a wake-up on the router's channel without awaiting anything, so one poll completes it.
pub(crate) fn send_now(link_tx: &mut LinkTx, packet: Packet) -> Result<usize, String> {
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    let mut fut = std::pin::pin!(link_tx.send(packet));
    loop {
        if let std::task::Poll::Ready(r) = std::future::Future::poll(fut.as_mut(), &mut cx) {
            return r.map_err(|e| e.to_string());
        }
        std::thread::yield_now();
    }
}

/// The node twin's `desired.containers`, if set.
fn node_desired_containers(twin: &Twin) -> Option<serde_json::Value> {
    twin.desired.get("containers").and_then(|e| e.value.clone())
}

/// The delta message of a twin, if desired and reported differ.
fn delta_out(twin: &Twin, now: i64) -> Option<Out> {
    let delta = twin.delta();
    if delta.is_empty() {
        return None;
    }
    let msg = DeltaMsg {
        device: twin.device.clone(),
        version: twin.version,
        delta,
        ts: now,
    };
    Some(json_out(
        &Topic::Delta(twin.device.clone()).to_topic_string(),
        &msg,
        false,
        None,
    ))
}

fn json_out<T: serde::Serialize>(
    topic: &str,
    value: &T,
    retain: bool,
    props: Option<PublishProperties>,
) -> Out {
    Out {
        topic: topic.to_string(),
        // Our payload types always serialise; an empty payload would only be a retained delete.
        payload: serde_json::to_vec(value).unwrap_or_else(|_| b"{}".to_vec()),
        retain,
        props,
    }
}

fn valid_publish_topic(t: &str) -> bool {
    !t.is_empty() && !t.contains(['+', '#']) && t.len() <= 1024
}

/// Seeds a new twin's desired properties with the model's `default` values, written at `ts` 0 so
/// that any real write, from anywhere, wins over them.
fn apply_model_defaults(twin: &mut Twin, spec: &ModelSpec, model: &edgetwin_profile::DeviceModel) {
    let mut props = serde_json::Map::new();
    for p in model.properties() {
        if let Some(v) = &p.default {
            props.insert(p.name.to_string(), v.clone());
        }
    }
    if props.is_empty() {
        return;
    }
    props.insert(edgetwin_contract::TS_KEY.into(), 0.into());
    let Ok(bytes) = serde_json::to_vec(&props) else {
        return;
    };
    let patch = match Patch::parse(&bytes, usize::MAX) {
        Ok(p) => p,
        Err(r) => {
            return warn!(device = %twin.device, error = %r.message, "model defaults not applied")
        }
    };
    if let Err(r) = twin.apply_desired(spec, &patch, Source::Local, now_ms()) {
        warn!(device = %twin.device, error = %r.message, "model defaults not applied");
    }
}

/// The twin core's view of a device model.
pub fn model_spec(name: &str, model: &edgetwin_profile::DeviceModel) -> ModelSpec {
    ModelSpec {
        name: name.to_string(),
        properties: model
            .properties()
            .iter()
            .map(|p| {
                (
                    p.name.to_string(),
                    PropertySpec {
                        ty: p.ty,
                        access: p.access_mode,
                        minimum: p.minimum,
                        maximum: p.maximum,
                    },
                )
            })
            .collect(),
    }
}
