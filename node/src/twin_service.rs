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
    topic::filter, DeltaMsg, DesiredResult, DeviceId, DeviceState, DeviceStatusMsg, ErrorCode,
    ErrorMsg, GetRequest, GetResult, MapperMetricsMsg, MapperState, MapperStatusMsg, PatchOutcome,
    ProtocolName, Source, Topic,
};
use edgetwin_devicetwin::core::{ModelSpec, Patch, PropertySpec, Rejection, Side, Twin};
use edgetwin_devicetwin::store::{Health, TwinStore};
use edgetwin_profile::ProfileSet;
use rumqttd::protocol::PublishProperties;
use rumqttd::Forward;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use crate::health::{Health as Readiness, Verdict};
use crate::metrics::{Metrics, ReasonLabels, StatusLabels, UpdateLabels};
use edgetwin_broker::{LocalClient, Message};
use edgetwin_contract::now_ms;

/// A new set of registered devices for the twin service, with an acknowledgement once the twins
/// exist durably and the mapper assignments are published.
pub struct RegistryUpdate {
    /// Every registered model and device.
    pub set: Arc<ProfileSet>,
    /// Fired after the update took effect (or failed to be stored).
    pub done: Option<oneshot::Sender<anyhow::Result<()>>>,
}

/// A patch handed to the twin service in-process rather than through the broker: desired
/// patches from the cloud (via the bridge, `Source::Cloud`) and the container agent's reported
/// state of the node's own twin (`Source::Mapper("containers")`).
pub struct InjectedPatch {
    /// The device the patch is for.
    pub device: DeviceId,
    /// The JSON merge patch.
    pub payload: Bytes,
    /// Who wrote it; a mapper source writes reported properties, any other desired ones.
    pub source: Source,
    /// Fired after the patch was committed (or rejected); the cloud broker is acked then.
    /// Dropped unfired when the commit failed, so the cloud sends the patch again.
    pub done: Option<oneshot::Sender<()>>,
}

/// A client's publish on `dt/{device}/desired` or `dt/{device}/reported`, handed over by the
/// front door before anyone saw or acknowledged it.
pub struct ClientPublish {
    /// The topic as published.
    pub topic: String,
    /// The payload as published.
    pub payload: Bytes,
    /// Fired once the patch is committed, or rejected (a rejection is an answer on
    /// `dt/{device}/error`, and the publish is still acknowledged); an error when the commit
    /// failed, so the front door does not acknowledge it.
    pub done: oneshot::Sender<Result<(), String>>,
}

/// Everything the twin service is asked to do, on one channel, handled in arrival order.
pub enum Input {
    /// A message the broker routed to one of the service's subscriptions ([`FILTERS`]).
    Broker(Forward),
    /// A client's twin patch from the front door.
    Client(ClientPublish),
    /// A patch from inside the node.
    Patch(InjectedPatch),
    /// A new set of registered devices.
    Registry(RegistryUpdate),
}

impl From<Forward> for Input {
    fn from(f: Forward) -> Input {
        Input::Broker(f)
    }
}

/// The protocol name the container agent reports under (`mapper:containers` in metadata).
pub const CONTAINER_AGENT_SOURCE: &str = "containers";

/// The node twin's one property: the declared containers.
pub const NODE_CONTAINERS: &str = "containers";

/// A registered device: what every part of the node needs to know about it, computed once per
/// registry change. Models are shared (`Arc`), so a device costs its id, a protocol name and
/// a hash.
#[derive(Debug)]
pub struct Registered {
    /// The model's checks.
    pub spec: Arc<ModelSpec>,
    /// Who reports this device (its mapper's protocol, or the container agent).
    pub reporter: ProtocolName,
    /// Hash of the retained assignment its mapper receives (`mappers/{p}/devices/{d}`), to
    /// publish only changes; `None` for the node's own twin, which no mapper serves.
    pub assignment: Option<u64>,
    /// How long (ms) it may go without a reading while `online` before the node marks it
    /// `stale` (`DeviceSpec::stale_after`); `None`: never.
    pub stale_after_ms: Option<i64>,
}

impl Registered {
    /// The protocol whose mapper serves the device; `None` for the node's own twin.
    pub fn mapper(&self) -> Option<&ProtocolName> {
        self.assignment.map(|_| &self.reporter)
    }
}

/// The registered devices, one read-only snapshot shared by the twin service (which builds it),
/// the gate (per-client permissions) and the mapper metrics re-export (which devices may appear
/// as labels).
pub type Devices = Arc<HashMap<DeviceId, Registered>>;

/// Where the current [`Devices`] snapshot is published; readers take a cheap `Arc` clone.
#[derive(Debug, Default)]
pub struct Directory {
    current: std::sync::RwLock<Devices>,
}

impl Directory {
    /// The current snapshot.
    pub fn devices(&self) -> Devices {
        self.current
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    fn replace(&self, devices: Devices) {
        *self
            .current
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = devices;
    }
}

impl edgetwin_gate::DeviceDirectory for Directory {
    fn protocol_of(&self, device: &DeviceId) -> Option<ProtocolName> {
        let devices = self.devices();
        devices.get(device)?.mapper().cloned()
    }
}

/// Tells the writers of a finished batch how it went: the front door's clients get the commit's
/// outcome; in-process patches (the cloud's) are told only of success, and a dropped `done`
/// leaves the cloud's message unacknowledged, so it comes again.
fn answer(
    committed: Result<(), String>,
    patches: impl Iterator<Item = oneshot::Sender<()>>,
    clients: impl Iterator<Item = oneshot::Sender<Result<(), String>>>,
) {
    if committed.is_ok() {
        for d in patches {
            let _ = d.send(());
        }
    }
    for c in clients {
        let _ = c.send(committed.clone());
    }
}

fn hash_of(bytes: &[u8]) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    bytes.hash(&mut h);
    h.finish()
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
        NODE_CONTAINERS.to_string(),
        PropertySpec {
            ty: edgetwin_contract::PropertyType::Object,
            access: edgetwin_contract::AccessMode::ReadWrite,
            minimum: None,
            maximum: None,
            // Each declared container is its own register: a patch names the containers it
            // changes, and edits of different containers from the cloud and on the node both win.
            per_entry: true,
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
    /// How often the store snapshot is rewritten while twins change.
    pub snapshot_every: std::time::Duration,
}

/// The twin service state.
pub struct TwinService {
    link: LocalClient,
    store: Arc<TwinStore>,
    metrics: Arc<Metrics>,
    cfg: TwinServiceConfig,
    twins: HashMap<DeviceId, Twin>,
    /// Registered devices, the node's own twin included (the snapshot the directory shares).
    devices: Devices,
    /// The node's own twin (container agent), if enabled.
    node: Option<DeviceId>,
    /// Device → protocol, shared with the gate.
    directory: Arc<Directory>,
    /// Where the node twin's `desired.containers` goes after each commit that changed it.
    node_desired: Option<tokio::sync::watch::Sender<Option<serde_json::Value>>>,
    /// Readiness; this service owns the "twin store" check.
    health: Arc<Readiness>,
    /// Per device: the `lastSeen` its retained document was last published with for a
    /// repeated reading alone (so such republishes are a full period apart).
    seen_published: HashMap<DeviceId, i64>,
    /// The local history's feed.
    history: Option<crate::history::HistoryFeed>,
}

/// What the twin service subscribes. Not `desired` and `reported`: clients' patches come from
/// the front door ([`Input::Client`]), which passes them on to the broker only after their
/// commit, so the service would see each of them twice.
pub const FILTERS: [&str; 4] = [
    filter::GET,
    filter::STATUS,
    filter::MAPPER_STATUS,
    filter::MAPPER_METRICS,
];

/// The readiness check the twin service owns.
pub const STORE_CHECK: &str = "twin store";

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
    outs: Vec<Message>,
    /// Devices to store without publishing (metadata-only changes).
    silent: HashSet<DeviceId>,
    /// Devices whose document is published again without storing it (a `lastSeen` that moved
    /// on by a [`last_seen_period`]).
    republish: HashSet<DeviceId>,
    /// Messages whose effect depends on the commit, answered with `store_failed` if it fails.
    pending_errors: Vec<(DeviceId, String, Option<String>)>,
    /// Desired patches with an `$id` to answer once the batch is committed.
    answers: Vec<(DeviceId, String, PatchOutcome)>,
    /// Accepted numeric readings, for the local history once the batch is committed.
    readings: Vec<crate::history::Reading>,
}

/// Where the twin service reports besides MQTT: its metrics, its readiness check, and the
/// device → protocol directory the gate reads.
pub struct Reports {
    /// The node's metrics.
    pub metrics: Arc<Metrics>,
    /// Readiness; the service owns [`STORE_CHECK`].
    pub health: Arc<Readiness>,
    /// Rewritten on every registry change.
    pub directory: Arc<Directory>,
    /// Where accepted numeric readings go; `None`: no history.
    pub history: Option<crate::history::HistoryFeed>,
}

impl TwinService {
    /// Creates the service over loaded twins; `link` is already subscribed to [`FILTERS`].
    pub fn new(
        link: LocalClient,
        store: Arc<TwinStore>,
        twins: Vec<Twin>,
        cfg: TwinServiceConfig,
        node: Option<NodeTwin>,
        reports: Reports,
    ) -> anyhow::Result<TwinService> {
        let Reports {
            metrics,
            health,
            directory,
            history,
        } = reports;
        let twins: HashMap<DeviceId, Twin> =
            twins.into_iter().map(|t| (t.device.clone(), t)).collect();
        // The container agent starts from the stored desired state, so declared containers come
        // back after a reboot even with the cloud unreachable.
        if let Some((d, tx)) = &node {
            tx.send_replace(twins.get(d).and_then(node_desired_containers));
        }
        Ok(TwinService {
            link,
            store,
            metrics,
            cfg,
            twins,
            devices: Devices::default(),
            node: node.as_ref().map(|(d, _)| d.clone()),
            directory,
            node_desired: node.map(|(_, tx)| tx),
            health,
            seen_published: HashMap::new(),
            history,
        })
    }

    /// Runs until shutdown; then processes what already arrived, commits it, and returns.
    pub async fn run(
        mut self,
        mut inputs: mpsc::Receiver<Input>,
        shutdown: CancellationToken,
    ) -> anyhow::Result<()> {
        let mut buf = Vec::with_capacity(self.cfg.max_batch);
        self.report_store_health();
        // While the store is failing, a probe each second finds out when it can write again
        // (space freed), so readiness recovers even when no patch arrives.
        let mut probe = tokio::time::interval(std::time::Duration::from_secs(1));
        probe.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut snapshot = tokio::time::interval(self.cfg.snapshot_every);
        snapshot.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        snapshot.tick().await;
        let mut snapshotted_at = self.store.write_transactions();
        // Once a second: devices that went quiet while `online` become `stale`.
        let mut sweep = tokio::time::interval(std::time::Duration::from_secs(1));
        sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // The state just opened becomes the restore point (after a crash the last snapshot may
        // be up to an interval old); written off the start-up path.
        let mut snapshot_task = {
            let (store, metrics) = (self.store.clone(), self.metrics.clone());
            Some(tokio::task::spawn_blocking(move || {
                take_snapshot(&store, &metrics)
            }))
        };
        loop {
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => break,
                _ = snapshot.tick() => {
                    let writes = self.store.write_transactions();
                    let idle = snapshot_task.as_ref().is_none_or(|t| t.is_finished());
                    if writes != snapshotted_at && idle {
                        snapshotted_at = writes;
                        // Off the service's path: a read transaction does not hold up commits.
                        let (store, metrics) = (self.store.clone(), self.metrics.clone());
                        snapshot_task = Some(tokio::task::spawn_blocking(move || {
                            take_snapshot(&store, &metrics);
                        }));
                    }
                }
                _ = sweep.tick() => self.sweep_stale().await,
                _ = probe.tick() => {
                    if self.store.health() != Health::Ok {
                        let store = self.store.clone();
                        let _ = tokio::task::spawn_blocking(move || store.probe()).await;
                        self.report_store_health();
                    }
                }
                n = inputs.recv_many(&mut buf, self.cfg.max_batch) => {
                    if n == 0 {
                        break;
                    }
                    let batch = std::mem::take(&mut buf);
                    self.process(batch).await;
                }
            }
        }
        // Drain what already arrived, so an accepted message is not dropped at exit.
        inputs.close();
        while let Ok(i) = inputs.try_recv() {
            buf.push(i);
            if buf.len() >= self.cfg.max_batch {
                self.process(std::mem::take(&mut buf)).await;
            }
        }
        if !buf.is_empty() {
            self.process(buf).await;
        }
        if let Some(t) = snapshot_task {
            let _ = t.await;
        }
        let (store, metrics) = (self.store.clone(), self.metrics.clone());
        let _ = tokio::task::spawn_blocking(move || take_snapshot(&store, &metrics)).await;
        info!("twin service stopped; store flushed");
        Ok(())
    }

    /// Applies a batch of inputs in order: messages and patches are group-committed together;
    /// a registry change ends the batch before it (it commits the twins it creates on its own).
    async fn process(&mut self, inputs: Vec<Input>) {
        let mut b = Batch::default();
        let mut done = Vec::new();
        let mut clients = Vec::new();
        let arrived = Instant::now();
        for input in inputs {
            match input {
                Input::Broker(f) => {
                    let topic = String::from_utf8_lossy(&f.publish.topic).into_owned();
                    self.handle(&mut b, arrived, &topic, &f.publish.payload, f.properties);
                }
                Input::Client(c) => {
                    self.handle(&mut b, arrived, &c.topic, &c.payload, None);
                    clients.push(c.done);
                }
                Input::Patch(p) => {
                    let topic = match Side::written_by(&p.source) {
                        Side::Desired => Topic::Desired(p.device.clone()),
                        Side::Reported => Topic::Reported(p.device.clone()),
                    };
                    let topic = topic.to_topic_string();
                    self.handle_patch(&mut b, arrived, &topic, p.device, &p.payload, p.source);
                    done.extend(p.done);
                }
                Input::Registry(update) => {
                    let committed = self.finish(std::mem::take(&mut b)).await;
                    answer(committed, done.drain(..), clients.drain(..));
                    let result = self.apply_registry(&update.set).await;
                    if let Err(e) = &result {
                        error!(error = %e, "device registry update failed");
                    }
                    // A profile change parses and republishes in bulk, as start-up does.
                    crate::serve::release_freed_memory();
                    if let Some(done) = update.done {
                        let _ = done.send(result);
                    }
                }
            }
        }
        let committed = self.finish(b).await;
        answer(committed, done.drain(..), clients.drain(..));
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
            Topic::Desired(d) => self.handle_patch(b, arrived, topic, d, payload, Source::Local),
            Topic::Reported(d) => {
                // A reported patch is the device's mapper's, whoever published it (the gate keeps
                // other clients off this topic).
                let Some(reporter) = self.devices.get(&d).map(|r| r.reporter.clone()) else {
                    let r = Rejection {
                        code: ErrorCode::UnknownDevice,
                        message: format!("device \"{d}\" is not registered on this node"),
                    };
                    return self.reject(b, &d, topic, None, r);
                };
                self.handle_patch(b, arrived, topic, d, payload, Source::Mapper(reporter))
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
        // The readiness canary's requests are answered like anyone's but not counted.
        if device.as_str() != crate::canary::CANARY_DEVICE {
            self.metrics
                .twin_updates_rejected
                .get_or_create(&ReasonLabels {
                    reason: r.code.as_str().to_string(),
                })
                .inc();
        }
        debug!(device = %device, topic, code = %r.code, message = %r.message, "patch rejected");
        if let (Some(id), Some(Topic::Desired(_))) = (&id, Topic::parse(topic)) {
            b.outs.push(json_out(
                &Topic::DesiredResult(device.clone()).to_topic_string(),
                &DesiredResult {
                    id: id.clone(),
                    result: PatchOutcome::Rejected,
                    version: None,
                    code: Some(r.code),
                    message: Some(r.message.clone()),
                },
                false,
                None,
            ));
        }
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
        source: Source,
    ) {
        let side = Side::written_by(&source);
        let patch = match Patch::parse(payload, self.cfg.max_properties_per_patch) {
            Ok(p) => p,
            Err(r) => return self.reject(b, &device, topic, id_of(payload), r),
        };
        let id = patch.id.clone().filter(|_| side == Side::Desired);
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
            return self.reject(b, &device, topic, id, r);
        }
        let Some(reg) = self.devices.get(&device) else {
            let r = Rejection {
                code: ErrorCode::UnknownDevice,
                message: format!("device \"{device}\" is not registered on this node"),
            };
            return self.reject(b, &device, topic, id, r);
        };
        // The node twin's declared containers are checked before they are stored: a spec the
        // agent cannot carry out must not become the state it restores after a reboot.
        if side == Side::Desired && self.node.as_ref() == Some(&device) {
            if let Some(Some(serde_json::Value::Object(entries))) = patch
                .props
                .iter()
                .find(|(k, _)| k.as_str() == NODE_CONTAINERS)
                .map(|(_, v)| v)
            {
                // Each container is its own register: what is checked is the declared set this
                // patch would leave (its entries over the current ones; `null` removes one).
                let mut set = match self.twins.get(&device).and_then(node_desired_containers) {
                    Some(serde_json::Value::Object(m)) => m,
                    _ => serde_json::Map::new(),
                };
                for (name, spec) in entries {
                    if spec.is_null() {
                        set.remove(name);
                    } else {
                        set.insert(name.clone(), spec.clone());
                    }
                }
                if let Err(errors) =
                    edgetwin_containers::parse_desired(&serde_json::Value::Object(set))
                {
                    let r = Rejection {
                        code: ErrorCode::DeviceConfig,
                        message: format!("desired.containers: {}", errors.join("; ")),
                    };
                    return self.reject(b, &device, topic, id, r);
                }
            }
        }
        let spec = reg.spec.clone();
        let period = last_seen_period(reg.stale_after_ms);
        self.touch(b, &device);
        let model = spec.name.clone();
        let twin = self
            .twins
            .entry(device.clone())
            .or_insert_with(|| Twin::new(device.clone(), model));
        let seen_before = twin.status.last_seen;
        let result = match side {
            Side::Desired => twin.apply_desired(&spec, &patch, source.clone(), now),
            Side::Reported => twin.apply_reported(&spec, &patch, source.clone(), now),
        };
        // The retained document's `lastSeen` follows the readings a period at a time (not at
        // every poll: that would publish every twin every cycle), a full period after the last
        // time a reading alone moved it.
        let seen_moved = match (seen_before, twin.status.last_seen) {
            (Some(a), Some(b)) => {
                // Without an entry yet, the document was last published with at most `a`.
                let since = *self.seen_published.entry(device.clone()).or_insert(a);
                b - since >= period
            }
            (None, Some(_)) => true,
            _ => false,
        };
        let labels = UpdateLabels {
            side: side.as_str().to_string(),
            source: source.kind().to_string(),
        };
        if side == Side::Reported && result.is_ok() && self.history.is_some() {
            // Every accepted reading, changed or not: the history's buckets count them.
            let at = patch.ts.unwrap_or(now).min(now);
            let props = patch.props.iter().map(|(k, v)| (k.as_str(), v.as_ref()));
            b.readings
                .extend(crate::history::readings_of(&device, props, at));
        }
        match result {
            Err(r) => self.reject(b, &device, topic, id, r),
            Ok(applied) if applied.changed.is_empty() => {
                if let Some(id) = id.clone() {
                    b.answers
                        .push((device.clone(), id, PatchOutcome::Unchanged));
                }
                self.metrics
                    .twin_updates_unchanged
                    .get_or_create(&labels)
                    .inc();
                if applied.status_changed {
                    // Back from `stale`, or a property error came or went: stored and shown.
                    self.mark_dirty(b, &device, None);
                    b.pending_errors
                        .push((device.clone(), topic.to_string(), id));
                } else if seen_moved {
                    if let Some(seen) = twin.status.last_seen {
                        self.seen_published.insert(device.clone(), seen);
                    }
                    b.republish.insert(device.clone());
                }
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
                if let Some(id) = id.clone() {
                    b.answers.push((device.clone(), id, PatchOutcome::Applied));
                }
                b.pending_errors.push((device, topic.to_string(), id));
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
                message: format!("device \"{device}\" is not registered on this node"),
            };
            return self.reject(b, &device, topic, req.id, r);
        };
        let result = GetResult {
            id: req.id,
            twin: twin.to_doc(),
        };
        let (reply_topic, reply_props) = reply_route(props, Topic::GetResult(device));
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
        if let Some(twin) = self.twins.get_mut(&device) {
            if twin.apply_status(&msg) {
                self.mark_dirty(b, &device, None);
            }
        }
    }

    fn handle_mapper_status(&mut self, b: &mut Batch, protocol: ProtocolName, payload: &Bytes) {
        let Ok(msg) = serde_json::from_slice::<MapperStatusMsg>(payload) else {
            return;
        };
        let served = self.served_by(&protocol);
        self.metrics
            .mapper_up
            .get_or_create(&crate::metrics::MapperLabels {
                protocol: protocol.to_string(),
            })
            .set(i64::from(msg.state == MapperState::Online));
        if msg.state == MapperState::Offline {
            // Its will (or its clean stop): nobody else will say its devices are gone.
            let message = format!("mapper {protocol} is offline");
            let now = now_ms();
            let mut marked = 0usize;
            for d in served {
                self.touch(b, &d);
                if let Some(twin) = self.twins.get_mut(&d) {
                    if twin.mark_mapper_gone(&message, now) {
                        marked += 1;
                        self.mark_dirty(b, &d, None);
                    }
                }
            }
            warn!(protocol = %protocol, devices = marked, "mapper offline; its devices are marked offline");
            return;
        }
        // A (re)connected mapper gets the deltas it may have missed.
        info!(protocol = %protocol, "mapper online; resending deltas");
        b.resend_delta.extend(served);
    }

    /// The devices `protocol`'s mapper serves (assigned to it).
    fn served_by(&self, protocol: &ProtocolName) -> Vec<DeviceId> {
        self.devices
            .iter()
            .filter(|(_, reg)| reg.mapper() == Some(protocol))
            .map(|(d, _)| d.clone())
            .collect()
    }

    /// Commits the batch, then publishes what it produced; `Err` (the store's error) when the
    /// commit failed and the batch was rolled back.
    async fn finish(&mut self, b: Batch) -> Result<(), String> {
        let Batch {
            originals,
            dirty,
            arrived,
            resend_delta,
            mut outs,
            pending_errors,
            silent,
            republish,
            answers,
            readings,
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
                    // Patches that changed nothing are answered as such; the rest are refused.
                    let refused: HashSet<&String> = pending_errors
                        .iter()
                        .filter_map(|(_, _, id)| id.as_ref())
                        .collect();
                    for (device, id, outcome) in &answers {
                        if !refused.contains(id) {
                            let version = self.twins.get(device).map(|t| t.version);
                            failed
                                .outs
                                .push(desired_result(device, id, *outcome, version));
                        }
                    }
                    for (device, topic, id) in pending_errors {
                        let r = Rejection {
                            code: ErrorCode::StoreFailed,
                            message: format!("the change could not be stored: {e}"),
                        };
                        self.reject(&mut failed, &device, &topic, id, r);
                    }
                    outs.extend(failed.outs);
                    self.flush(outs).await;
                    return Err(e.to_string());
                }
            }
        }
        self.notify_node_desired(&dirty);
        if let Some(h) = &self.history {
            h.offer(readings);
        }
        for (device, id, outcome) in &answers {
            let version = self.twins.get(device).map(|t| t.version);
            outs.push(desired_result(device, id, *outcome, version));
        }
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
        for d in republish.iter().filter(|d| !dirty.contains(d)) {
            if let Some(twin) = self.twins.get(d) {
                outs.push(json_out(
                    &Topic::Twin(d.clone()).to_topic_string(),
                    &twin.to_doc(),
                    true,
                    None,
                ));
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
        self.flush(outs).await;
        for (d, t) in arrived {
            if delta_sent.contains(&d) {
                self.metrics
                    .twin_delta_latency
                    .observe(t.elapsed().as_secs_f64());
            }
        }
        self.update_device_gauge();
        Ok(())
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

    fn report_store_health(&self) {
        let verdict = match self.store.health() {
            Health::Ok => Verdict::Ok,
            Health::Failing { error, .. } => Verdict::Failing(error),
        };
        self.health.set(STORE_CHECK, verdict);
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
        self.report_store_health();
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

    async fn flush(&mut self, outs: Vec<Message>) {
        for m in outs {
            self.link.publish(m).await;
        }
    }

    /// Marks `stale` every `online` device whose last reading is older than its bound, and
    /// commits and publishes what changed.
    async fn sweep_stale(&mut self) {
        let now = now_ms();
        let mut quiet = Vec::new();
        for (d, reg) in self.devices.iter() {
            let Some(bound) = reg.stale_after_ms else {
                continue;
            };
            let Some(t) = self.twins.get(d) else { continue };
            // Checked first, so only the twins that change are touched (copied for a rollback).
            if t.is_quiet(bound, now) {
                quiet.push((d.clone(), bound));
            }
        }
        if quiet.is_empty() {
            return;
        }
        let mut b = Batch::default();
        for (d, bound) in quiet {
            self.touch(&mut b, &d);
            let Some(t) = self.twins.get_mut(&d) else {
                continue;
            };
            let since = t.status.last_seen;
            let marked = t.mark_stale(bound, now, || match since {
                Some(s) => format!(
                    "no reading for {} s (expected within {} s)",
                    (now - s) / 1000,
                    bound / 1000
                ),
                None => format!(
                    "no reading since the mapper said online (expected within {} s)",
                    bound / 1000
                ),
            });
            if marked {
                warn!(device = %d, bound_ms = bound, "no reading within the device's bound; marked stale");
                self.mark_dirty(&mut b, &d, None);
            }
        }
        if let Err(e) = self.finish(b).await {
            // The twins were rolled back: the next sweep tries again.
            warn!(error = %e, "storing stale devices failed");
        }
    }

    fn update_device_gauge(&self) {
        let mut counts: BTreeMap<&'static str, i64> =
            DeviceState::ALL.iter().map(|s| (s.as_str(), 0)).collect();
        for d in self.devices.keys() {
            let state = self
                .twins
                .get(d)
                .map(|t| t.status.state)
                .unwrap_or(DeviceState::Unknown);
            *counts.entry(state.as_str()).or_default() += 1;
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
    pub async fn apply_registry_now(&mut self, set: &ProfileSet) -> anyhow::Result<()> {
        self.apply_registry(set).await
    }

    /// Applies a new registry: creates twins for new devices (durably), publishes changed mapper
    /// assignments and twin documents, and withdraws the retained messages of removed devices.
    async fn apply_registry(&mut self, set: &ProfileSet) -> anyhow::Result<()> {
        let mut new_devices: HashMap<DeviceId, Registered> = HashMap::new();
        if let Some(node) = &self.node {
            let reporter =
                ProtocolName::new(CONTAINER_AGENT_SOURCE).context("agent source name")?;
            new_devices.insert(
                node.clone(),
                Registered {
                    spec: Arc::new(node_model_spec()),
                    reporter,
                    assignment: None,
                    stale_after_ms: None,
                },
            );
        }
        let mut specs: HashMap<String, Arc<ModelSpec>> = HashMap::new();
        // Each model's JSON once, spliced into every assignment of its devices.
        let mut model_jsons: HashMap<&str, Vec<u8>> = HashMap::new();
        for (name, model) in &set.models {
            specs.insert(name.clone(), Arc::new(model_spec(name, model)));
            match edgetwin_profile::model_json(model) {
                Ok(j) => {
                    model_jsons.insert(name, j);
                }
                Err(e) => error!(model = %name, error = %e, "cannot encode device model"),
            }
        }
        // Assignments to publish: computed here from borrowed parts, published below, and only
        // their hash kept.
        let mut assignments: Vec<(DeviceId, ProtocolName, Bytes)> = Vec::new();
        for (id, device) in &set.devices {
            let model_name = device.model_ref().to_string();
            let (Some(spec), Some(model), Some(model_json)) = (
                specs.get(&model_name),
                set.models.get(&model_name),
                model_jsons.get(model_name.as_str()),
            ) else {
                warn!(device = %id, model = %model_name, "device refers to an unknown model; skipped");
                continue;
            };
            if self.node.as_ref() == Some(id) {
                warn!(device = %id, "a profile device has the node's own name; the node twin wins");
                continue;
            }
            if id.as_str() == crate::canary::CANARY_DEVICE {
                warn!(device = %id, "this device name is reserved for the node's readiness canary; skipped");
                continue;
            }
            let payload = match edgetwin_profile::resolved_json_with(device, model_json) {
                Ok(p) => edgetwin_broker::local::exact(p),
                Err(e) => {
                    error!(device = %id, error = %e, "cannot encode resolved device");
                    continue;
                }
            };
            let protocol = model.protocol().clone();
            new_devices.insert(
                id.clone(),
                Registered {
                    spec: spec.clone(),
                    reporter: protocol.clone(),
                    assignment: Some(hash_of(&payload)),
                    stale_after_ms: device
                        .spec
                        .stale_after()
                        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX)),
                },
            );
            assignments.push((id.clone(), protocol, payload));
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
            // Per-device state of this service goes with the device (churn must not grow it).
            self.seen_published.remove(d);
            self.link
                .publish(Message::retained(
                    Topic::Twin(d.clone()).to_topic_string(),
                    Bytes::new(),
                ))
                .await;
        }
        // Withdraw assignments whose protocol changed or whose device went away.
        for (d, old) in self.devices.iter() {
            let Some(was) = old.mapper() else { continue };
            if new_devices.get(d).and_then(Registered::mapper) != Some(was) {
                self.link
                    .publish(Message::retained(
                        Topic::MapperDevice(old.reporter.clone(), d.clone()).to_topic_string(),
                        Bytes::new(),
                    ))
                    .await;
            }
        }
        let newly: Vec<DeviceId> = new_devices
            .keys()
            .filter(|d| !self.devices.contains_key(*d))
            .cloned()
            .collect();
        for (d, protocol, payload) in assignments {
            let unchanged = self.devices.get(&d).is_some_and(|old| {
                old.reporter == protocol && old.assignment == new_devices[&d].assignment
            });
            if !unchanged {
                self.link
                    .publish(Message::retained(
                        Topic::MapperDevice(protocol, d.clone()).to_topic_string(),
                        payload,
                    ))
                    .await;
            }
        }
        self.devices = Arc::new(new_devices);
        self.directory.replace(self.devices.clone());
        let registered = |d: &str| DeviceId::new(d).is_ok_and(|d| self.devices.contains_key(&d));
        self.metrics.mappers.retain_devices(&registered);
        for d in newly {
            if let Some(twin) = self.twins.get(&d) {
                let m = json_out(
                    &Topic::Twin(d.clone()).to_topic_string(),
                    &twin.to_doc(),
                    true,
                    None,
                );
                self.link.publish(m).await;
            }
        }
        self.update_device_gauge();
        Ok(())
    }
}

/// Writes the store's snapshot (the restore point for a damaged file) and records when.
pub fn take_snapshot(store: &TwinStore, metrics: &Metrics) {
    match store.snapshot() {
        Ok(stats) => {
            metrics
                .store_snapshot_timestamp
                .set(stats.taken_at_ms / 1000);
            debug!(
                twins = stats.twins,
                bytes = stats.bytes,
                "twin store snapshot written"
            );
        }
        Err(e) => warn!(error = %e, "cannot write the twin store snapshot"),
    }
}

/// The node twin's `desired.containers`, if set.
fn node_desired_containers(twin: &Twin) -> Option<serde_json::Value> {
    twin.desired_value(NODE_CONTAINERS)
}

/// The delta message of a twin, if desired and reported differ.
/// The answer to a desired patch with `$id` that was applied or changed nothing.
fn desired_result(
    device: &DeviceId,
    id: &str,
    result: PatchOutcome,
    version: Option<u64>,
) -> Message {
    json_out(
        &Topic::DesiredResult(device.clone()).to_topic_string(),
        &DesiredResult {
            id: id.to_string(),
            result,
            version,
            code: None,
            message: None,
        },
        false,
        None,
    )
}

/// The `$id` of a patch that could not be parsed, if its payload is still an object with one
/// (so a malformed patch is answered on the result topic too).
fn id_of(payload: &[u8]) -> Option<String> {
    let v: serde_json::Value = serde_json::from_slice(payload).ok()?;
    v.get(edgetwin_contract::ID_KEY)?
        .as_str()
        .filter(|s| s.len() <= edgetwin_devicetwin::core::MAX_ID_LEN)
        .map(str::to_string)
}

/// How far (ms) a device's `lastSeen` moves on before its retained document is published again
/// without another change: half its stale bound, at least 5 s (one minute without a bound).
pub fn last_seen_period(stale_after_ms: Option<i64>) -> i64 {
    stale_after_ms.map_or(60_000, |b| (b / 2).max(5_000))
}

fn delta_out(twin: &Twin, now: i64) -> Option<Message> {
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
) -> Message {
    Message {
        topic: topic.to_string(),
        // Our payload types always serialise; an empty payload would only be a retained delete.
        payload: edgetwin_broker::local::exact(
            serde_json::to_vec(value).unwrap_or_else(|_| b"{}".to_vec()),
        ),
        retain,
        props,
    }
}

/// Where a request's answer goes: MQTT 5 request/response (the request's response topic, with
/// its correlation data) when it named a valid one, else the contract's `result` topic.
pub(crate) fn reply_route(
    props: Option<PublishProperties>,
    result: Topic,
) -> (String, Option<PublishProperties>) {
    match props {
        Some(p) if p.response_topic.as_deref().is_some_and(valid_publish_topic) => {
            let rt = p.response_topic.clone().unwrap_or_default();
            let props = PublishProperties {
                correlation_data: p.correlation_data,
                ..Default::default()
            };
            (rt, Some(props))
        }
        _ => (result.to_topic_string(), None),
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
                        per_entry: false,
                    },
                )
            })
            .collect(),
    }
}
