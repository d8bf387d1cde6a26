//! The mapper runtime: one MQTT connection to the node's broker, device assignments, one task per
//! device, status, metrics and shutdown. A protocol only supplies a [`Driver`].
//!
//! # Topics
//! - subscribes `mappers/{protocol}/devices/+` (retained [`ResolvedDevice`] JSON; an empty payload
//!   removes the device) and `dt/+/delta`;
//! - publishes `mappers/{protocol}/status` (retained; the MQTT will says `offline`),
//!   `mappers/{protocol}/metrics` every [`RuntimeOptions::metrics_interval`], and per device
//!   `dt/{device}/reported`, `dt/{device}/telemetry`, `dt/{device}/status` (retained) and
//!   `dt/{device}/error`.
//!
//! # Tasks
//! The connection's event loop runs in its own task and feeds the main loop, which routes
//! assignments and deltas to device tasks. Every task is spawned on one [`TaskTracker`] and stopped
//! through a [`CancellationToken`]: on shutdown the device tasks are cancelled and awaited (each
//! closes its connection), then offline statuses are published and the MQTT session is closed.
//!
//! A device whose profile changes is restarted (the new task waits for the old one to close its
//! connection first); a desired change never restarts anything. Deltas for a device not assigned
//! yet (they can arrive first after a (re)connect) are parked and handed over with the assignment.

mod device;

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use edgetwin_contract::{
    DeltaMsg, DeviceId, DeviceState, DeviceStatusMsg, DiscoverRequest, DiscoverResult, MapperState,
    MapperStatusMsg, ProtocolName, Topic,
};
use edgetwin_profile::ResolvedDevice;
use rumqttc::{
    AsyncClient, Event, EventLoop, LastWill, MqttOptions, NetworkOptions, Outgoing, Packet, QoS,
};
use serde::Serialize;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, error, info, warn};

use crate::metrics::Metrics;
use crate::Driver;
use edgetwin_retry::Backoff;

/// How a mapper process runs; [`RuntimeOptions::new`] gives the documented defaults.
#[derive(Debug, Clone)]
pub struct RuntimeOptions {
    /// The node's MQTT broker, `host:port`. Default `127.0.0.1:1883`.
    pub broker: String,
    /// The version string in `mappers/{protocol}/status`. Default: the SDK's version.
    pub version: String,
    /// How often `mappers/{protocol}/metrics` is published. Default 5 s.
    pub metrics_interval: Duration,
    /// Collect cycle of a property without `collectCycle`. Default 1 s.
    pub default_collect_cycle: Duration,
    /// Longest wait between reconnect attempts to a device (it is also never longer than the
    /// device's shortest collect cycle). Default 30 s.
    pub device_backoff_max: Duration,
    /// Longest wait between reconnect attempts to the broker. Default 30 s.
    pub broker_backoff_max: Duration,
    /// Cancel this to shut down cleanly.
    pub shutdown: CancellationToken,
    /// User name and password at the node (a `mapper` user of this protocol); `None`:
    /// anonymous.
    pub login: Option<(String, String)>,
    /// TLS to the node; `None`: plain TCP.
    pub tls: Option<TlsFiles>,
}

/// TLS material, as PEM bytes: the CA bundle the node's certificate must chain to, and
/// optionally a client certificate with its key.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    /// CA bundle.
    pub ca: Vec<u8>,
    /// Client certificate and key.
    pub client: Option<(Vec<u8>, Vec<u8>)>,
}

impl RuntimeOptions {
    /// Defaults for a mapper connecting to `broker` (`host:port`).
    pub fn new(broker: impl Into<String>) -> RuntimeOptions {
        RuntimeOptions {
            broker: broker.into(),
            version: env!("CARGO_PKG_VERSION").into(),
            metrics_interval: Duration::from_secs(5),
            default_collect_cycle: Duration::from_secs(1),
            device_backoff_max: Duration::from_secs(30),
            broker_backoff_max: Duration::from_secs(30),
            shutdown: CancellationToken::new(),
            login: None,
            tls: None,
        }
    }
}

impl Default for RuntimeOptions {
    fn default() -> Self {
        RuntimeOptions::new("127.0.0.1:1883")
    }
}

/// Why the runtime could not run.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    /// `--broker` is not `host:port`.
    #[error("invalid broker address {0:?}: expected host:port, e.g. 127.0.0.1:1883")]
    BadBroker(String),
    /// The driver's protocol name cannot be used in topics.
    #[error("invalid protocol name {name:?}: {reason}")]
    BadProtocol {
        /// What the driver returned.
        name: String,
        /// Why it is invalid.
        reason: String,
    },
    /// The async runtime could not start.
    #[error("cannot start the async runtime: {0}")]
    Io(#[from] std::io::Error),
}

pub(crate) use edgetwin_contract::now_ms;

/// Splits `host:port`.
pub fn parse_broker(s: &str) -> Result<(String, u16), RuntimeError> {
    let bad = || RuntimeError::BadBroker(s.to_owned());
    let (host, port) = s.rsplit_once(':').ok_or_else(bad)?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.is_empty() {
        return Err(bad());
    }
    Ok((host.to_owned(), port.parse().map_err(|_| bad())?))
}

/// Publishing side of the MQTT connection, shared by every task. Publishing never blocks: when
/// the request queue is full (broker unreachable for long) the message is dropped with a warning.
#[derive(Clone)]
pub(crate) struct Out {
    client: AsyncClient,
    /// The last status published per device, republished after every broker reconnect (the
    /// broker keeps retained messages only in memory, so a restarted node has lost them).
    statuses: Arc<Mutex<HashMap<DeviceId, LastStatus>>>,
}

/// A device's last published state and message.
type LastStatus = (DeviceState, Option<String>);

impl Out {
    pub(crate) fn json<T: Serialize>(&self, topic: &str, msg: &T, retain: bool) {
        match serde_json::to_vec(msg) {
            Ok(p) => self.raw(topic, p, retain, QoS::AtLeastOnce),
            Err(e) => error!(topic, error = %e, "cannot encode payload"),
        }
    }

    pub(crate) fn raw(&self, topic: &str, payload: Vec<u8>, retain: bool, qos: QoS) {
        if let Err(e) = self.client.try_publish(topic, qos, retain, payload) {
            warn!(topic, error = %e, "publish dropped: MQTT request queue full or closed");
        }
    }

    pub(crate) fn status(&self, device: &DeviceId, state: DeviceState, message: Option<String>) {
        self.statuses
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(device.clone(), (state, message.clone()));
        self.send_status(device, state, message);
    }

    fn send_status(&self, device: &DeviceId, state: DeviceState, message: Option<String>) {
        let msg = DeviceStatusMsg {
            state,
            ts: now_ms(),
            message,
        };
        self.json(&Topic::Status(device.clone()).to_topic_string(), &msg, true);
    }

    /// Clears a removed device's retained status.
    fn clear_status(&self, device: &DeviceId) {
        self.statuses
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(device);
        self.raw(
            &Topic::Status(device.clone()).to_topic_string(),
            Vec::new(),
            true,
            QoS::AtLeastOnce,
        );
    }

    /// Publishes every device's last status again.
    fn republish_statuses(&self) {
        let all: Vec<_> = self
            .statuses
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .map(|(d, (s, m))| (d.clone(), *s, m.clone()))
            .collect();
        for (d, s, m) in all {
            self.send_status(&d, s, m);
        }
    }
}

/// Settings every device task shares.
#[derive(Debug, Clone)]
pub(crate) struct DeviceSettings {
    pub(crate) default_collect_cycle: Duration,
    pub(crate) backoff_max: Duration,
}

/// Runs a mapper until `opts.shutdown` is cancelled; returns after a clean shutdown (offline
/// statuses published, MQTT session closed). Broker and device failures are retried forever;
/// only unusable options are errors.
pub async fn run<D: Driver>(driver: D, opts: RuntimeOptions) -> Result<(), RuntimeError> {
    let protocol = ProtocolName::new(driver.protocol()).map_err(|e| RuntimeError::BadProtocol {
        name: driver.protocol().into(),
        reason: e.to_string(),
    })?;
    let (host, port) = parse_broker(&opts.broker)?;
    let status_topic = Topic::MapperStatus(protocol.clone()).to_topic_string();
    let mapper_status = |state| {
        serde_json::to_vec(&MapperStatusMsg {
            state,
            ts: now_ms(),
            version: opts.version.clone(),
        })
        .unwrap_or_default()
    };

    let mut mo = MqttOptions::new(format!("edgetwin-mapper-{protocol}"), host, port);
    mo.set_keep_alive(Duration::from_secs(10));
    mo.set_clean_session(true);
    mo.set_max_packet_size(1 << 20, 1 << 20);
    if let Some((user, password)) = &opts.login {
        mo.set_credentials(user.clone(), password.clone());
    }
    if let Some(tls) = &opts.tls {
        // rumqttc is built without a crypto provider; ring is the process default.
        let _ = rustls::crypto::ring::default_provider().install_default();
        mo.set_transport(rumqttc::Transport::tls_with_config(
            rumqttc::TlsConfiguration::Simple {
                ca: tls.ca.clone(),
                alpn: None,
                client_auth: tls.client.clone(),
            },
        ));
    }
    mo.set_last_will(LastWill::new(
        &status_topic,
        mapper_status(MapperState::Offline),
        QoS::AtLeastOnce,
        true,
    ));
    let (client, mut eventloop) = AsyncClient::new(mo, 4096);
    let mut net = NetworkOptions::new();
    net.set_tcp_nodelay(true);
    net.set_connection_timeout(5);
    eventloop.set_network_options(net);

    let tracker = TaskTracker::new();
    let stop_events = CancellationToken::new();
    let (ev_tx, mut ev_rx) = mpsc::channel(1024);
    let event_task = tracker.spawn(event_loop(
        eventloop,
        ev_tx,
        stop_events.clone(),
        opts.broker_backoff_max,
    ));

    let out = Out {
        client: client.clone(),
        statuses: Arc::default(),
    };
    let metrics = Metrics::default();
    let mut disp = Dispatcher {
        driver: Arc::new(driver),
        protocol: protocol.clone(),
        out: out.clone(),
        metrics: metrics.clone(),
        tracker: tracker.clone(),
        root: CancellationToken::new(),
        settings: DeviceSettings {
            default_collect_cycle: opts.default_collect_cycle,
            backoff_max: opts.device_backoff_max,
        },
        devices: HashMap::new(),
        parked: HashMap::new(),
    };
    let metrics_topic = Topic::MapperMetrics(protocol.clone()).to_topic_string();
    let mut metrics_tick =
        tokio::time::interval(opts.metrics_interval.max(Duration::from_millis(10)));
    metrics_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    info!(protocol = %protocol, broker = %opts.broker, "mapper starting");

    loop {
        tokio::select! {
            _ = opts.shutdown.cancelled() => break,
            _ = metrics_tick.tick() => {
                match serde_json::to_vec(&metrics.snapshot(now_ms())) {
                    Ok(p) => out.raw(&metrics_topic, p, false, QoS::AtMostOnce),
                    Err(e) => error!(error = %e, "cannot encode metrics"),
                }
            }
            ev = ev_rx.recv() => match ev {
                None => break,
                Some(Packet::ConnAck(_)) => {
                    info!(protocol = %protocol, "connected to the broker; subscribing");
                    // The filters of `Topic::MapperDevice` and `Topic::Delta`.
                    let filters = [
                        format!("mappers/{protocol}/devices/+"),
                        "dt/+/delta".to_string(),
                        Topic::MapperDiscover(protocol.clone()).to_topic_string(),
                    ];
                    for f in filters {
                        if let Err(e) = client.try_subscribe(&f, QoS::AtLeastOnce) {
                            error!(filter = %f, error = %e, "cannot subscribe");
                        }
                    }
                    out.raw(&status_topic, mapper_status(MapperState::Online), true, QoS::AtLeastOnce);
                    out.republish_statuses();
                }
                Some(Packet::Publish(p)) => disp.handle(&p.topic, &p.payload),
                Some(_) => {}
            }
        }
    }

    info!(protocol = %protocol, "shutting down: stopping device tasks");
    disp.root.cancel();
    let served: Vec<DeviceId> = disp.devices.keys().cloned().collect();
    let joins: Vec<JoinHandle<()>> = disp.devices.drain().map(|(_, h)| h.join).collect();
    let all_stopped = async {
        for j in joins {
            let _ = j.await;
        }
    };
    if tokio::time::timeout(Duration::from_secs(3), all_stopped)
        .await
        .is_err()
    {
        warn!("some device tasks did not stop within 3 s");
    }
    for d in &served {
        out.status(d, DeviceState::Offline, Some("mapper stopped".into()));
    }
    out.raw(
        &status_topic,
        mapper_status(MapperState::Offline),
        true,
        QoS::AtLeastOnce,
    );
    if let Err(e) = client.try_disconnect() {
        warn!(error = %e, "cannot request disconnect");
    }
    // Let the event loop flush the offline statuses and the DISCONNECT, then stop it.
    let flushed = tokio::time::timeout(Duration::from_secs(2), async {
        while ev_rx.recv().await.is_some() {}
    })
    .await;
    if flushed.is_err() {
        warn!("MQTT session not closed within 2 s");
    }
    stop_events.cancel();
    let _ = event_task.await;
    tracker.close();
    tracker.wait().await;
    info!(protocol = %protocol, "mapper stopped");
    Ok(())
}

/// Polls the MQTT event loop, forwarding incoming packets; reconnects with backoff and jitter.
/// Ends after the outgoing DISCONNECT, or when `stop` is cancelled.
async fn event_loop(
    mut eventloop: EventLoop,
    tx: mpsc::Sender<Packet>,
    stop: CancellationToken,
    backoff_max: Duration,
) {
    let mut backoff = Backoff::new(Duration::from_millis(100), backoff_max);
    loop {
        let ev = tokio::select! {
            _ = stop.cancelled() => return,
            ev = eventloop.poll() => ev,
        };
        match ev {
            Ok(Event::Incoming(p)) => {
                if matches!(p, Packet::ConnAck(_)) {
                    backoff.reset();
                }
                if matches!(p, Packet::ConnAck(_) | Packet::Publish(_)) && tx.send(p).await.is_err()
                {
                    return;
                }
            }
            Ok(Event::Outgoing(Outgoing::Disconnect)) => {
                debug!("DISCONNECT sent");
                return;
            }
            Ok(Event::Outgoing(_)) => {}
            Err(e) => {
                let wait = backoff.next_delay();
                warn!(error = %e, retry_in_ms = wait.as_millis() as u64, "broker connection failed; retrying");
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(wait) => {}
                }
            }
        }
    }
}

/// A running device task.
struct Handle {
    resolved: ResolvedDevice,
    token: CancellationToken,
    tx: mpsc::UnboundedSender<DeltaMsg>,
    join: JoinHandle<()>,
}

/// The longest a discovery scan may run.
pub const DISCOVER_TIMEOUT: Duration = Duration::from_secs(120);

/// Most deltas parked for devices not assigned (yet); deltas of other protocols' devices also
/// arrive on `dt/+/delta`, so this bounds the memory they can take.
const MAX_PARKED: usize = 10_000;

/// Routes assignments and deltas to device tasks.
struct Dispatcher<D: Driver> {
    driver: Arc<D>,
    protocol: ProtocolName,
    out: Out,
    metrics: Metrics,
    tracker: TaskTracker,
    root: CancellationToken,
    settings: DeviceSettings,
    devices: HashMap<DeviceId, Handle>,
    parked: HashMap<DeviceId, DeltaMsg>,
}

impl<D: Driver> Dispatcher<D> {
    fn handle(&mut self, topic: &str, payload: &[u8]) {
        match Topic::parse(topic) {
            Some(Topic::MapperDevice(p, d)) if p == self.protocol => self.assign(d, payload),
            Some(Topic::Delta(d)) => self.delta(d, payload),
            Some(Topic::MapperDiscover(p)) if p == self.protocol => self.discover(payload),
            _ => debug!(topic, "ignoring message"),
        }
    }

    /// Runs a commissioning scan beside the device tasks and publishes what it found.
    fn discover(&mut self, payload: &[u8]) {
        let req: DiscoverRequest = match serde_json::from_slice(payload) {
            Ok(r) => r,
            Err(e) => {
                warn!(error = %e, "discovery request is not {{\"id\", \"target\"}}; ignored");
                return;
            }
        };
        info!(id = %req.id, target = %req.target, "discovery requested");
        let (driver, out, token) = (self.driver.clone(), self.out.clone(), self.root.clone());
        let topic = Topic::MapperDiscoverResult(self.protocol.clone()).to_topic_string();
        self.tracker.spawn(async move {
            let scan = tokio::time::timeout(DISCOVER_TIMEOUT, driver.discover(&req.target));
            let result = tokio::select! {
                _ = token.cancelled() => Err("the mapper is stopping".to_string()),
                r = scan => r.unwrap_or_else(|_| Err(format!(
                    "the scan took longer than {} s; ask for fewer units or registers",
                    DISCOVER_TIMEOUT.as_secs()
                ))),
            };
            let msg = match result {
                Ok(d) => {
                    info!(id = %req.id, found = d.found.len(), "discovery done");
                    DiscoverResult {
                        id: req.id,
                        ok: true,
                        profile: Some(d.profile),
                        found: d.found,
                        error: None,
                    }
                }
                Err(e) => {
                    warn!(id = %req.id, error = %e, "discovery failed");
                    DiscoverResult {
                        id: req.id,
                        ok: false,
                        profile: None,
                        found: Vec::new(),
                        error: Some(e),
                    }
                }
            };
            out.json(&topic, &msg, false);
        });
    }

    fn assign(&mut self, id: DeviceId, payload: &[u8]) {
        if payload.is_empty() {
            if let Some(h) = self.devices.remove(&id) {
                info!(device = %id, "device removed");
                h.token.cancel();
                let out = self.out.clone();
                let metrics = self.metrics.clone();
                // Once the task has closed its connection: forget its counters, clear its status.
                self.tracker.spawn(async move {
                    let _ = h.join.await;
                    metrics.remove(id.as_str());
                    out.clear_status(&id);
                });
            }
            return;
        }
        let resolved: ResolvedDevice = match serde_json::from_slice(payload) {
            Ok(r) => r,
            Err(e) => {
                warn!(device = %id, error = %e, "assignment is not a resolved device; ignored");
                self.out.status(
                    &id,
                    DeviceState::Error,
                    Some(format!("mapper cannot read its assignment: {e}")),
                );
                return;
            }
        };
        if resolved.id() != &id {
            warn!(device = %id, named = %resolved.id(), "assignment names another device; ignored");
            return;
        }
        if self
            .devices
            .get(&id)
            .is_some_and(|h| h.resolved == resolved)
        {
            debug!(device = %id, "assignment unchanged");
            return;
        }
        let predecessor = self.devices.remove(&id).map(|h| {
            info!(device = %id, "device profile changed; reconnecting it");
            h.token.cancel();
            h.join
        });
        if predecessor.is_none() {
            info!(device = %id, "device assigned");
        }
        let token = self.root.child_token();
        let (tx, rx) = mpsc::unbounded_channel();
        if let Some(d) = self.parked.remove(&id) {
            let _ = tx.send(d);
        }
        let task = device::DeviceTask::new(
            self.driver.clone(),
            Arc::new(resolved.clone()),
            self.out.clone(),
            self.metrics.clone(),
            token.clone(),
            self.settings.clone(),
        );
        let join = self.tracker.spawn(task.run(rx, predecessor));
        self.devices.insert(
            id,
            Handle {
                resolved,
                token,
                tx,
                join,
            },
        );
    }

    fn delta(&mut self, id: DeviceId, payload: &[u8]) {
        let msg: DeltaMsg = match serde_json::from_slice(payload) {
            Ok(m) => m,
            Err(e) => {
                debug!(device = %id, error = %e, "ignoring malformed delta");
                return;
            }
        };
        match self.devices.get(&id) {
            Some(h) => {
                let _ = h.tx.send(msg);
            }
            None if self.parked.len() < MAX_PARKED || self.parked.contains_key(&id) => {
                self.parked.insert(id, msg);
            }
            None => {}
        }
    }
}
