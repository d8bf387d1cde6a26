//! The upstream bridge: store-and-forward to a cloud MQTT broker (docs/contract.md §5).
//!
//! The bridge knows nothing about twins. It moves topic-addressed messages:
//!
//! ```text
//!  local broker ──tap link──▶ tap ──append (group commit)──▶ outbox (redb)
//!                                                              │ peek (oldest first)
//!  cloud broker ◀──QoS 1 publish── sender ◀────────────────────┘
//!        │  PUBACK ──▶ session ──seq──▶ acker ──ack──▶ outbox
//!        └─ {prefix}{down filters} ──▶ session ──▶ [`Inbound`] (PUBACK after `done`)
//! ```
//!
//! # Up path
//! Clients' messages come from the front door ([`Intake`]); besides, an in-process rumqttd link
//! subscribes to the `up` filters. The *tap* drains whatever waits on
//! it into one batch and appends it to the outbox in one durable transaction per lane
//! ([`lanes`]: control, then bulk); only then can the sender see it. Every record is published as `{prefix}{local topic}` with QoS 1 (retained if
//! its route says so) and stays in the outbox until the cloud broker's PUBACK for it arrives.
//! Retained routes are unsubscribed and subscribed again on the tap link at every (re)connect, so
//! rumqttd hands over its retained messages (the current twin documents, statuses) once more and
//! they go up through the outbox too: the cloud converges even if it lost its retained state or
//! the outbox dropped something.
//!
//! # Ack tracking (rumqttc 0.25 does not return packet ids)
//! See [`inflight`]: the sender queues the record's `seq` and calls `try_publish` under one lock;
//! the session binds each `Outgoing::Publish(pkid)` event to the oldest queued `seq` (rumqttc
//! emits them in request order) and each `PubAck(pkid)` releases that `seq` to the acker, which
//! acks everything that arrived since its last commit in one outbox transaction.
//!
//! **On a lost connection the bridge clears rumqttc's own retransmission state** (its `pending`
//! queue, the unread request channel and `MqttState`) together with every pkid↔seq binding, under
//! the same lock. The sender then re-peeks from the oldest unacked record. The outbox is the only
//! retransmission queue: there is one source of truth, packet ids are fresh per connection (no
//! stale PUBACK can release the wrong record), and a record that rumqttc had not written yet is
//! not sent twice. The price is that records sent but not acked before the loss are sent again
//! (at-least-once; the cloud may see duplicates, never gaps).
//!
//! # Order and lanes
//! Every waiting control record goes before any bulk one, and bulk records never fill the last
//! tenth of the window, so state never waits behind a telemetry backlog. Within a lane, records
//! are sent in sequence (append) order, so order is kept per topic and per device; a resend after
//! a reconnect restarts from the oldest unacked record, so the cloud may see `a b a b c` but
//! never `b` before the first `a`. The sender reads each lane ahead of the window
//! (`ReadAhead`), the next read already under way, and rumqttc (vendored) writes every publish
//! waiting in its channel before one flush. MQTT 3.1.1 brokers acknowledge in order, and the
//! in-flight window (`max_inflight_messages`) never exceeds rumqttc's, so no packet-id collision
//! reorders anything.
//!
//! # Batching
//! With `bridge.batch`, the sender hands bulk records of batched topics to a [`batch::Batcher`]
//! instead of publishing them: one envelope per topic goes when it is full, when its interval
//! passed and nothing more is waiting to be read, or at shutdown. Its in-flight ticket holds
//! every record's tag, so its PUBACK acks them all; a lost connection drops open batches with
//! everything else, and the records are read again. The outbox never sees a batch.
//!
//! # MQTT version
//! The `cloud` module puts rumqttc's 3.1.1 and 5 clients behind one surface (`bridge.protocol`); the
//! rest of the bridge does not know which one runs.
//!
//! # Replay pacing
//! Bulk records appended before the current connection came up are the *backlog*. By default it
//! drains unpaced, as fast as the cloud acknowledges; `replay_max_msgs_per_s` caps it (token
//! bucket with 100 ms of burst) for a cloud that rate-limits its clients. Control records and
//! records appended while connected are never paced.
//!
//! # Down path
//! The cloud session is persistent (`clean_session = false`, fixed client id), so what the cloud
//! publishes while the node is offline is delivered after reconnect. Each message is handed over
//! as an [`Inbound`] with its local topic (prefix removed); the cloud broker gets its PUBACK only
//! after the receiver fires `done` (manual acks), i.e. after a desired patch is committed.
//!
//! # Shutdown
//! The caller stops the node's intake and drains the twin service (its last twin documents reach
//! the tap), then calls [`Bridge::shutdown`]: the tap keeps appending until its link has been
//! quiet for 100 ms (at most 1 s; rumqttd PUBACKs a local publisher before routing the message to
//! the tap, so this is what makes an acknowledged local publish reach the outbox), then the sender
//! keeps sending for up to `flush_timeout_ms` or until the outbox is empty, then disconnects.
//! Whatever is not sent by then stays in the durable outbox for the next start.
//!
//! Durability: a client's message on an up route comes from the node's front door through
//! [`Intake`] and is acknowledged only once appended. Messages of the node's own publishers
//! (twin documents, statuses, container results) reach the tap through the broker and are in
//! memory until the tap's next append commits (one batch, milliseconds); `kill -9` inside that
//! window loses them, and they are published again from the node's state (the retained routes
//! are re-read at every reconnect). Everything appended survives.

pub mod batch;
mod cloud;
pub mod config;
pub mod inflight;
pub mod lanes;
pub mod metrics;
pub mod signed;

use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use anyhow::Context;
use bytes::Bytes;
use cloud::{Client, Down, Ev, Loop};
use edgetwin_outbox::{Limits, NewRecord, Outbox, OverflowPolicy};
use rumqttc::QoS;
use rumqttd::Forward;
use tokio::sync::{mpsc, oneshot, watch, Notify};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, error, info, warn};

pub use config::BridgeConfig;
use config::{OutboxPolicy, UpRoute};
use edgetwin_broker::LocalClient;
use edgetwin_contract::{now_ms, MapperState, NodePresenceMsg};
use inflight::Inflight;
use lanes::Lane;
pub use metrics::BridgeMetrics;

/// Most records appended per outbox transaction.
const MAX_APPEND_BATCH: usize = 1024;

/// Clients' messages waiting for the tap (the front door waits for room beyond this).
const FRONT_DOOR_QUEUE: usize = 4096;
/// Most records peeked at once.
const MAX_PEEK: usize = 256;
/// Largest MQTT packet to or from the cloud broker.
const MAX_PACKET_BYTES: usize = 4 * 1024 * 1024;

/// A message from the cloud broker, under its local topic.
#[derive(Debug)]
pub struct Inbound {
    /// The cloud topic without the prefix.
    pub topic: String,
    /// The payload as received (with signatures required: the message inside the verified
    /// envelope).
    pub payload: Bytes,
    /// With signatures required: why the message was refused (then `payload` is what came, and
    /// nothing may be done with it but answering that it was refused).
    pub refused: Option<String>,
    /// Fire once the message took effect; the cloud broker gets its PUBACK then. Dropping it
    /// leaves the message unacknowledged, so the cloud delivers it again after a reconnect.
    pub done: oneshot::Sender<()>,
}

/// The connection as the sender and the tap see it.
#[derive(Debug, Clone, Copy, Default)]
struct ConnState {
    epoch: u64,
    connected: bool,
    /// When this connection came up (unix ms): older records are backlog.
    since_ms: i64,
}

/// State shared by the bridge's tasks.
struct Shared {
    outbox: lanes::Lanes,
    metrics: Arc<BridgeMetrics>,
    /// Whether the outbox can append (`None`) or why not, reported through `on_health`.
    outbox_error: Mutex<Option<String>>,
    on_health: HealthHook,
    inflight: Mutex<Inflight>,
    /// Records were appended.
    appended: Notify,
    /// In-flight space was freed (or the connection changed).
    space: Notify,
    window: usize,
    /// Shutting down: open batches go now, not at their interval.
    flushing: std::sync::atomic::AtomicBool,
    /// Named in the envelopes' MQTT 5 user properties.
    node_id: String,
}

impl Shared {
    /// While appends fail, probes the outbox each tick so that readiness recovers when space is
    /// freed even if no message arrives.
    async fn probe_if_failing(&self) {
        if self.outbox_error().is_none() {
            return;
        }
        let lanes: Vec<Arc<Outbox>> = self
            .outbox
            .all()
            .iter()
            .map(|(_, o)| (*o).clone())
            .collect();
        let probed = tokio::task::spawn_blocking(move || {
            lanes
                .iter()
                .try_for_each(|o| o.probe(now_ms()))
                .map_err(|e| e.to_string())
        })
        .await;
        match probed {
            Ok(Ok(())) => self.set_outbox_health(None),
            Ok(Err(e)) => self.set_outbox_health(Some(e)),
            Err(e) => self.set_outbox_health(Some(e.to_string())),
        }
    }

    fn outbox_error(&self) -> Option<String> {
        self.outbox_error
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Records whether the outbox can append and tells the node when that changes.
    fn set_outbox_health(&self, error: Option<String>) {
        let mut cur = self.outbox_error.lock().unwrap_or_else(|p| p.into_inner());
        if *cur != error {
            (self.on_health)(error.as_deref());
            *cur = error;
        }
    }

    fn inflight(&self) -> MutexGuard<'_, Inflight> {
        self.inflight.lock().unwrap_or_else(|p| p.into_inner())
    }

    async fn sync_metrics(&self) {
        let stats = self.outbox.stats();
        self.metrics.sync_outbox(&stats, now_ms());
        self.metrics
            .inflight
            .set(self.inflight().in_flight() as i64);
    }
}

/// A running bridge; stop it with [`Bridge::shutdown`].
pub struct Bridge {
    shared: Arc<Shared>,
    /// The cloud session, until [`Bridge::connect`] starts it.
    session: Option<(Session, Loop)>,
    stop: CancellationToken,
    tap_stop: CancellationToken,
    tracker: TaskTracker,
    tap: tokio::task::JoinHandle<()>,
    flush_timeout: Duration,
    intake: Intake,
    health: Arc<watch::Sender<Option<Bytes>>>,
}

/// The bridge's local side: a local client subscribed to the `up` filters (see
/// [`BridgeConfig::up`]), its messages, and the token that stops its reader (cancelled by
/// [`Bridge::shutdown`] after the last append, not with the rest of the node).
pub struct Tap {
    /// The tap's client (it re-subscribes the retained routes at every reconnect).
    pub client: LocalClient,
    /// What the broker routes to the `up` filters.
    pub messages: mpsc::Receiver<Forward>,
    /// Stops the tap's reader.
    pub stop: CancellationToken,
}

/// A client's publish on an up route, handed over by the node's front door before anyone
/// acknowledged it (see [`Intake`]).
struct FrontDoorMessage {
    topic: String,
    payload: Bytes,
    done: oneshot::Sender<Result<(), String>>,
}

/// Where the node's front door hands clients' publishes on the `up` routes: the tap appends them
/// to the outbox in its next group commit and answers once they are durable. The front door
/// passes each one on to the local broker only after that, so the tap's own subscription sees
/// it again: the tap skips that copy (it knows what it appended from the front door and has not
/// seen come back yet, by topic and payload).
#[derive(Clone)]
pub struct Intake {
    tx: mpsc::Sender<FrontDoorMessage>,
    routes: Arc<Vec<UpRoute>>,
}

impl Intake {
    /// Whether messages on `topic` go upstream.
    pub fn carries(&self, topic: &str) -> bool {
        self.routes
            .iter()
            .any(|r| edgetwin_contract::topic::filter::matches(&r.filter, topic))
    }

    /// Queues a client's message for the outbox (waiting while the tap's queue is full); the
    /// receiver resolves once it is appended, with the outbox's error if it could not be.
    /// `None` once the bridge stopped.
    pub async fn submit(
        &self,
        topic: &str,
        payload: Bytes,
    ) -> Option<oneshot::Receiver<Result<(), String>>> {
        let (done, rx) = oneshot::channel();
        let m = FrontDoorMessage {
            topic: topic.to_string(),
            payload,
            done,
        };
        self.tx.send(m).await.ok()?;
        Some(rx)
    }
}

/// Told whether the outbox can append (`None`) or why not, each time that changes; the node
/// turns it into a readiness check.
pub type HealthHook = Box<dyn Fn(Option<&str>) + Send + Sync>;

/// See [`Bridge::health_feed`].
#[derive(Clone)]
pub struct HealthFeed(Arc<watch::Sender<Option<Bytes>>>);

impl HealthFeed {
    /// Replaces the document the cloud is to see.
    pub fn set(&self, document: Bytes) {
        self.0.send_replace(Some(document));
    }
}

/// Opens the outbox and starts the bridge's local tasks; the cloud connection starts with
/// [`Bridge::connect`], once the node's internal consumers are subscribed (so commands the cloud
/// queued while the node was down find the container agent listening). Messages from the cloud
/// come out of the returned receiver.
pub fn start(
    cfg: &BridgeConfig,
    node_id: &str,
    data_dir: &Path,
    tap: Tap,
    metrics: Arc<BridgeMetrics>,
    on_health: HealthHook,
) -> anyhow::Result<(Bridge, mpsc::UnboundedReceiver<Inbound>)> {
    let endpoint = config::parse_url(&cfg.url).map_err(|e| anyhow::anyhow!("bridge.url: {e}"))?;
    let prefix = cfg.topic_prefix(node_id);
    let limits = Limits {
        max_bytes: cfg.outbox.max_bytes,
        max_age_ms: cfg.outbox.max_age_s.saturating_mul(1000),
        max_records: None,
        policy: match cfg.outbox.policy {
            OutboxPolicy::DropOldest => OverflowPolicy::DropOldest,
            OutboxPolicy::RejectNew => OverflowPolicy::RejectNew,
        },
    };
    let outbox = lanes::Lanes::open(data_dir, limits, &metrics)?;

    let verifier = cfg
        .signatures
        .as_ref()
        .map(|s| signed::Verifier::new(&s.keys, s.max_validity_s))
        .transpose()
        .map_err(|e| anyhow::anyhow!("bridge.signatures.keys: {e}"))?;
    let presence = Presence {
        topic: format!("{prefix}node/status"),
        boot_ms: now_ms(),
    };
    let password = match (&cfg.password, &cfg.password_file) {
        (Some(p), _) => Some(p.clone()),
        (None, Some(f)) => Some(
            edgetwin_contract::read_password_file(f)
                .with_context(|| format!("bridge.password_file: cannot read {}", f.display()))?,
        ),
        (None, None) => None,
    };
    let window = usize::from(cfg.max_inflight_messages);
    let (client, eventloop) = cloud::connect(cloud::Settings {
        protocol: cfg.protocol,
        client_id: cfg.client_id(node_id),
        host: endpoint.host.clone(),
        port: endpoint.port,
        keep_alive: Duration::from_secs(u64::from(cfg.keep_alive_s)),
        window: cfg.max_inflight_messages,
        max_packet_bytes: MAX_PACKET_BYTES,
        credentials: cfg
            .username
            .clone()
            .map(|u| (u, password.unwrap_or_default())),
        tls: if endpoint.tls {
            Some(tls_config(cfg)?)
        } else {
            None
        },
        // The cloud broker publishes this when the connection dies without a DISCONNECT (a
        // crash, a lost link, a frozen node past 1.5 keep-alives): the node's presence says
        // offline.
        will: (
            presence.topic.clone(),
            presence.payload(MapperState::Offline, Some("connection lost")),
        ),
        session_expiry_s: cfg.session_expiry_s,
        // Room for the whole window plus subscriptions and down-path acks, so `try_publish`
        // within the window never finds the channel full.
        capacity: window * 2 + 64,
    });

    let shared = Arc::new(Shared {
        outbox,
        metrics,
        outbox_error: Mutex::new(None),
        on_health,
        inflight: Mutex::new(Inflight::default()),
        appended: Notify::new(),
        space: Notify::new(),
        window,
        flushing: std::sync::atomic::AtomicBool::new(false),
        node_id: node_id.to_string(),
    });
    let stop = CancellationToken::new();
    let tracker = TaskTracker::new();
    let (conn_tx, conn_rx) = watch::channel(ConnState::default());
    let (acks_tx, acks_rx) = mpsc::unbounded_channel();
    let (inbound_tx, inbound_rx) = mpsc::unbounded_channel();

    // The tap keeps reading after the node's intake stopped: what rumqttd already acknowledged to
    // a publisher must still reach the outbox (see `Bridge::shutdown`).
    let Tap {
        client: tap_client,
        messages: tap_in,
        stop: tap_stop,
    } = tap;
    let (front_tx, front_rx) = mpsc::channel(FRONT_DOOR_QUEUE);
    let intake = Intake {
        tx: front_tx,
        routes: Arc::new(cfg.up.clone()),
    };
    let tap = tokio::spawn(run_tap(
        shared.clone(),
        tap_client,
        TapInputs {
            broker: tap_in,
            front_door: front_rx,
        },
        cfg.up.clone(),
        prefix.clone(),
        conn_rx.clone(),
    ));
    tracker.spawn(run_sender(
        shared.clone(),
        client.clone(),
        conn_rx.clone(),
        SenderConfig {
            replay_rate: cfg.replay_max_msgs_per_s,
            batch: cfg.batch.clone().map(|b| (b, prefix.clone())),
        },
        stop.clone(),
    ));
    tracker.spawn(run_acker(shared.clone(), acks_rx));
    let (health_tx, health_rx) = watch::channel(None);
    tracker.spawn(run_state_feed(
        shared.clone(),
        client.clone(),
        conn_rx,
        health_rx,
        format!(
            "{prefix}{}",
            edgetwin_contract::Topic::NodeHealth.to_topic_string()
        ),
        stop.clone(),
    ));
    let session = Session {
        shared: shared.clone(),
        client,
        conn: conn_tx,
        acks: acks_tx,
        inbound: inbound_tx,
        prefix,
        down: cfg.down.clone(),
        window: cfg.max_inflight_messages,
        backoff: edgetwin_retry::Backoff::new(
            Duration::from_millis(cfg.reconnect.initial_ms),
            Duration::from_millis(cfg.reconnect.max_ms),
        ),
        tracker: tracker.clone(),
        host: format!("{}:{}", endpoint.host, endpoint.port),
        presence,
        verifier,
    };
    let ticker_shared = shared.clone();
    let ticker_stop = stop.clone();
    tracker.spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tokio::select! {
                _ = ticker_stop.cancelled() => break,
                _ = tick.tick() => {
                    ticker_shared.probe_if_failing().await;
                    ticker_shared.sync_metrics().await
                }
            }
        }
    });
    Ok((
        Bridge {
            shared,
            session: Some((session, eventloop)),
            stop,
            tap_stop,
            tracker,
            tap,
            flush_timeout: Duration::from_millis(cfg.flush_timeout_ms),
            intake,
            health: Arc::new(health_tx),
        },
        inbound_rx,
    ))
}

impl Bridge {
    /// Where the front door hands clients' messages on the up routes.
    pub fn intake(&self) -> Intake {
        self.intake.clone()
    }

    /// Where the node hands its latest health document: the bridge publishes it retained as
    /// `{prefix}node/health`, outside the outbox (it says what is true now, so a backlog never
    /// delays it and an outage never queues stale copies), at once and again at every connection.
    pub fn health_feed(&self) -> HealthFeed {
        HealthFeed(self.health.clone())
    }

    /// Starts the cloud connection (once; later calls do nothing).
    pub fn connect(&mut self) {
        if let Some((session, eventloop)) = self.session.take() {
            self.tracker
                .spawn(session.run(eventloop, self.stop.clone()));
        }
    }

    /// Bounded flush, then stop: call after intake stopped and the twin service drained. Appends
    /// what the tap still holds, keeps sending until the outbox is empty, the connection is down,
    /// or the flush timeout passed, then disconnects from the cloud broker.
    pub async fn shutdown(self) {
        let deadline = Instant::now() + self.flush_timeout;
        // rumqttd acknowledged messages to their publishers before routing them to the tap: keep
        // appending until the tap link has been quiet for 100 ms (at most 1 s), then stop it.
        let quiet_until = Instant::now() + Duration::from_secs(1);
        loop {
            let before = self.shared.metrics.outbox_appended.get();
            tokio::time::sleep(Duration::from_millis(100)).await;
            let after = self.shared.metrics.outbox_appended.get();
            if before == after || Instant::now() >= quiet_until {
                break;
            }
        }
        self.tap_stop.cancel();
        if tokio::time::timeout_at(deadline, self.tap).await.is_err() {
            warn!("bridge tap did not finish its last append in time");
        }
        // Open batches go now rather than at their interval.
        self.shared
            .flushing
            .store(true, std::sync::atomic::Ordering::SeqCst);
        self.shared.appended.notify_one();
        loop {
            let records = self.shared.outbox.stats().records;
            let connected = self.shared.inflight().is_connected();
            if records == 0 || !connected {
                info!(records, connected, "bridge flushed");
                break;
            }
            if Instant::now() >= deadline {
                warn!(
                    records,
                    "bridge flush timed out; the rest stays in the outbox"
                );
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        self.stop.cancel();
        self.tracker.close();
        if tokio::time::timeout(Duration::from_secs(3), self.tracker.wait())
            .await
            .is_err()
        {
            warn!("bridge tasks did not stop within 3 s");
        }
        self.shared.sync_metrics().await;
    }
}

fn tls_config(cfg: &BridgeConfig) -> anyhow::Result<rumqttc::TlsConfiguration> {
    let Some(tls) = &cfg.tls else {
        anyhow::bail!("bridge.tls: mqtts:// needs tls.ca_file");
    };
    let client = tls.cert_file.as_deref().zip(tls.key_file.as_deref());
    client_tls(&tls.ca_file, client).context("bridge.tls")
}

/// rumqttc's TLS settings from PEM files: the CA bundle the server's certificate must chain to,
/// and optionally a client certificate and its key. Also what the CLI's `--cafile`, `--cert` and
/// `--key` use.
pub fn client_tls(
    ca_file: &Path,
    client: Option<(&Path, &Path)>,
) -> anyhow::Result<rumqttc::TlsConfiguration> {
    // rumqttc is built without a crypto provider; ring is the process default.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let read = |p: &Path| std::fs::read(p).with_context(|| format!("cannot read {}", p.display()));
    let client_auth = match client {
        Some((cert, key)) => Some((read(cert)?, read(key)?)),
        None => None,
    };
    Ok(rumqttc::TlsConfiguration::Simple {
        ca: read(ca_file)?,
        alpn: None,
        client_auth,
    })
}

/// What the tap appends: what the broker routes to the up filters, and clients' messages from
/// the front door.
struct TapInputs {
    broker: mpsc::Receiver<Forward>,
    front_door: mpsc::Receiver<FrontDoorMessage>,
}

/// Appends what the tap receives to the outbox, one transaction per batch (broker messages and
/// front-door messages together), answers the front door once its messages are in, and re-reads
/// the retained routes at every (re)connect.
async fn run_tap(
    shared: Arc<Shared>,
    mut link: LocalClient,
    mut inputs: TapInputs,
    routes: Vec<UpRoute>,
    prefix: String,
    mut conn: watch::Receiver<ConnState>,
) {
    let mut buf = Vec::with_capacity(MAX_APPEND_BATCH);
    let mut front = Vec::with_capacity(MAX_APPEND_BATCH);
    let mut echoes = Echoes::default();
    let mut resynced_epoch = 0;
    let mut conn_open = true;
    let mut front_open = true;
    loop {
        tokio::select! {
            biased;
            changed = conn.changed(), if conn_open => {
                if changed.is_err() {
                    conn_open = false;
                    continue;
                }
                let s = *conn.borrow_and_update();
                if s.connected && s.epoch != resynced_epoch {
                    resynced_epoch = s.epoch;
                    for r in routes.iter().filter(|r| r.retain) {
                        // A new subscription is handed the broker's retained messages.
                        if let Err(e) = link.resubscribe(&r.filter) {
                            warn!(filter = %r.filter, error = %e, "cannot re-read retained messages for the cloud");
                        }
                    }
                    debug!(epoch = s.epoch, "retained routes re-read for the cloud");
                }
            }
            n = inputs.front_door.recv_many(&mut front, MAX_APPEND_BATCH), if front_open => {
                if n == 0 {
                    front_open = false;
                    continue;
                }
                while buf.len() < MAX_APPEND_BATCH {
                    match inputs.broker.try_recv() {
                        Ok(f) => buf.push(f),
                        Err(_) => break,
                    }
                }
                tap_batch(&shared, &mut buf, &mut front, &mut echoes, &routes, &prefix).await;
            }
            n = inputs.broker.recv_many(&mut buf, MAX_APPEND_BATCH) => {
                if n == 0 {
                    break;
                }
                while front.len() < MAX_APPEND_BATCH {
                    match inputs.front_door.try_recv() {
                        Ok(m) => front.push(m),
                        Err(_) => break,
                    }
                }
                tap_batch(&shared, &mut buf, &mut front, &mut echoes, &routes, &prefix).await;
            }
        }
    }
    debug!("bridge tap stopped");
}

/// One append: the broker's messages (less the echoes of front-door messages already in the
/// outbox) and the front door's, in one transaction; then the front door is answered.
async fn tap_batch(
    shared: &Arc<Shared>,
    broker: &mut Vec<Forward>,
    front: &mut Vec<FrontDoorMessage>,
    echoes: &mut Echoes,
    routes: &[UpRoute],
    prefix: &str,
) {
    let now = now_ms();
    let mut records: Vec<(Lane, NewRecord)> = broker
        .drain(..)
        .filter(|f| !echoes.take(&f.publish.topic, &f.publish.payload))
        .filter_map(|f| to_record(&f, routes, prefix, now))
        .collect();
    let mut waiting = Vec::with_capacity(front.len());
    for m in front.drain(..) {
        let lane = record_for(&m.topic, &m.payload, routes, prefix, now).map(|(lane, r)| {
            records.push((lane, r));
            lane
        });
        waiting.push((m, lane));
    }
    let (control, bulk): (Vec<_>, Vec<_>) =
        records.into_iter().partition(|(l, _)| *l == Lane::Control);
    let strip = |v: Vec<(Lane, NewRecord)>| v.into_iter().map(|(_, r)| r).collect::<Vec<_>>();
    // Two files: their commits (and fsyncs) run side by side, not one after the other.
    let (control, bulk) = tokio::join!(
        append(shared, Lane::Control, strip(control), now),
        append(shared, Lane::Bulk, strip(bulk), now)
    );
    for (m, lane) in waiting {
        let result = match lane {
            Some(Lane::Control) => control.clone(),
            Some(Lane::Bulk) => bulk.clone(),
            None => Ok(()),
        };
        // Expected before the answer: the front door passes the message on only after it.
        if result.is_ok() {
            echoes.expect(&m.topic, &m.payload);
        }
        let _ = m.done.send(result);
    }
}

/// Front-door messages appended to the outbox whose copy from the broker has not come back to
/// the tap yet, by topic and payload hash. Bounded: an entry whose copy never came (the broker
/// dropped it, or the front door lost its client before passing it on) is forgotten after
/// [`Echoes::KEEP`] or when [`Echoes::MAX`] are held.
#[derive(Default)]
struct Echoes {
    pending: std::collections::HashMap<(String, u64), u32>,
    order: std::collections::VecDeque<(Instant, String, u64)>,
}

impl Echoes {
    const KEEP: Duration = Duration::from_secs(60);
    const MAX: usize = 65_536;

    fn key(payload: &[u8]) -> u64 {
        use std::hash::{Hash, Hasher};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        payload.hash(&mut h);
        h.finish()
    }

    fn expect(&mut self, topic: &str, payload: &[u8]) {
        let now = Instant::now();
        while let Some((at, t, k)) = self.order.front() {
            if self.order.len() < Self::MAX && now.duration_since(*at) < Self::KEEP {
                break;
            }
            let key = (t.clone(), *k);
            self.order.pop_front();
            if let Some(n) = self.pending.get_mut(&key) {
                *n -= 1;
                if *n == 0 {
                    self.pending.remove(&key);
                }
            }
        }
        let k = Self::key(payload);
        *self.pending.entry((topic.to_string(), k)).or_insert(0) += 1;
        self.order.push_back((now, topic.to_string(), k));
    }

    /// Whether this broker message is the copy of one appended from the front door (then it
    /// is not appended again).
    fn take(&mut self, topic: &[u8], payload: &[u8]) -> bool {
        if self.pending.is_empty() {
            return false;
        }
        let Ok(topic) = std::str::from_utf8(topic) else {
            return false;
        };
        let key = (topic.to_string(), Self::key(payload));
        match self.pending.get_mut(&key) {
            Some(n) => {
                *n -= 1;
                if *n == 0 {
                    self.pending.remove(&key);
                }
                true
            }
            None => false,
        }
    }
}

fn to_record(f: &Forward, routes: &[UpRoute], prefix: &str, now: i64) -> Option<(Lane, NewRecord)> {
    let Ok(topic) = std::str::from_utf8(&f.publish.topic) else {
        debug!("ignoring a message with a non-UTF-8 topic");
        return None;
    };
    record_for(topic, &f.publish.payload, routes, prefix, now)
}

fn record_for(
    topic: &str,
    payload: &[u8],
    routes: &[UpRoute],
    prefix: &str,
    now: i64,
) -> Option<(Lane, NewRecord)> {
    let route = routes
        .iter()
        .find(|r| edgetwin_contract::topic::filter::matches(&r.filter, topic))?;
    let record = NewRecord {
        ts_ms: now,
        topic: format!("{prefix}{topic}"),
        payload: payload.to_vec(),
        qos: 1,
        retain: route.retain,
        key: topic.to_string(),
    };
    Some((route.lane(), record))
}

/// Appends in one transaction; `Err` (the outbox's error) when nothing was appended. Records the
/// outbox's limits refused count as appended: that loss is the configured policy's, counted in
/// `outbox_dropped_records_total`.
async fn append(
    shared: &Arc<Shared>,
    lane: Lane,
    records: Vec<NewRecord>,
    now: i64,
) -> Result<(), String> {
    if records.is_empty() {
        return Ok(());
    }
    let n = records.len();
    let outbox = shared.outbox.get(lane).clone();
    let result = match tokio::task::spawn_blocking(move || outbox.append(records, now)).await {
        Ok(Ok(report)) => {
            shared.set_outbox_health(None);
            let rejected = report.seqs.iter().filter(|s| s.is_none()).count();
            if rejected > 0 {
                warn!(
                    rejected,
                    of = n,
                    "outbox refused records (limits; see outbox_dropped_records_total)"
                );
            }
            debug!(records = n, lane = ?lane, "appended to outbox");
            shared.outbox.appended(lane);
            Ok(())
        }
        Ok(Err(e)) => {
            shared.set_outbox_health(Some(e.to_string()));
            error!(error = %e, records = n, "outbox append failed; these messages are lost (the front door's are not acknowledged)");
            shared.metrics.append_failed(n as u64);
            Err(e.to_string())
        }
        Err(e) => {
            error!(error = %e, records = n, "outbox append task failed; these messages are lost (the front door's are not acknowledged)");
            shared.metrics.append_failed(n as u64);
            Err(e.to_string())
        }
    };
    shared.appended.notify_one();
    shared.sync_metrics().await;
    result
}

/// Token bucket for backlog replay: `rate` per second with up to 100 ms of burst.
struct Pacer {
    interval: Duration,
    next: Instant,
}

impl Pacer {
    fn new(rate: u32) -> Option<Pacer> {
        (rate > 0).then(|| Pacer {
            interval: Duration::from_secs_f64(1.0 / f64::from(rate)),
            next: Instant::now(),
        })
    }

    /// Takes the next slot at `now`; returns when it may be used (`None` = at once).
    fn reserve(&mut self, now: Instant) -> Option<Instant> {
        let at = (self.next > now).then_some(self.next);
        let floor = now.checked_sub(Duration::from_millis(100)).unwrap_or(now);
        self.next = self.next.max(floor) + self.interval;
        at
    }

    async fn wait(&mut self) {
        if let Some(at) = self.reserve(Instant::now()) {
            tokio::time::sleep_until(at).await;
        }
    }
}

/// A bulk publish waiting for a slot: one record, or a batch of them.
enum BulkOut {
    One(edgetwin_outbox::Record),
    Batch(batch::Ready),
}

/// What the sender needs besides the shared state.
struct SenderConfig {
    replay_rate: u32,
    /// Batching, with the topic prefix it applies under.
    batch: Option<(batch::BatchConfig, String)>,
}

/// Publishes outbox records, oldest first, within the in-flight window of the current connection.
async fn run_sender(
    shared: Arc<Shared>,
    client: Client,
    mut conn: watch::Receiver<ConnState>,
    cfg: SenderConfig,
    stop: CancellationToken,
) {
    'connection: loop {
        let state = tokio::select! {
            _ = stop.cancelled() => return,
            s = conn.wait_for(|s| s.connected) => match s {
                Ok(s) => *s,
                Err(_) => return,
            },
        };
        let epoch = state.epoch;
        let mut pacer = Pacer::new(cfg.replay_rate);
        let mut control = ReadAhead::new(shared.clone(), Lane::Control);
        let mut bulk = ReadAhead::new(shared.clone(), Lane::Bulk);
        // Rebuilt per connection: what a lost connection left unacknowledged is read again.
        let mut batcher = cfg
            .batch
            .as_ref()
            .map(|(c, prefix)| batch::Batcher::new(c.clone(), prefix));
        // Bulk publishes in the order they must go (a record that cannot join its topic's open
        // batch waits behind that batch, so order per topic holds).
        let mut queue: std::collections::VecDeque<BulkOut> = std::collections::VecDeque::new();
        // Telemetry never takes the whole window: a control record (a twin document, an error,
        // a command result) finds a slot at once even while a backlog drains.
        let reserve = (shared.window / 10).clamp(1, shared.window.saturating_sub(1).max(1));
        let reserve = if shared.window <= 1 { 0 } else { reserve };
        loop {
            if stop.is_cancelled() {
                return;
            }
            let space = {
                let g = shared.inflight();
                if !g.is_current(epoch) {
                    continue 'connection;
                }
                shared.window.saturating_sub(g.in_flight())
            };
            if space == 0 {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = shared.space.notified() => {}
                    _ = conn.changed() => {}
                }
                continue;
            }
            match control.next().await {
                Ok(Some(r)) => {
                    let seq = r.seq;
                    match send_one(&shared, &client, epoch, Lane::Control, r) {
                        Sent::Yes => {
                            shared.metrics.sent.inc();
                        }
                        Sent::Lost => continue 'connection,
                        Sent::Full(_) => {
                            // Not sent: read again from it (what followed it was not sent either).
                            control.restart_at(seq);
                            tokio::time::sleep(Duration::from_millis(10)).await;
                        }
                    }
                    continue;
                }
                Ok(None) => {}
                Err(e) => {
                    error!(error = %e, "outbox peek failed; retrying in 1 s");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                }
            }
            if space <= reserve {
                // Only bulk records wait, and the rest of the window is control's.
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = shared.space.notified() => {}
                    _ = shared.appended.notified() => {}
                    _ = conn.changed() => {}
                }
                continue;
            }
            if let Some(out) = queue.pop_front() {
                // Backlog singles are paced, and batches (each one publish, whatever it holds).
                let (one, backlog) = match &out {
                    BulkOut::One(r) => (true, r.ts_ms < state.since_ms),
                    BulkOut::Batch(_) => (false, true),
                };
                if let (Some(p), true) = (pacer.as_mut(), backlog) {
                    tokio::select! {
                        _ = stop.cancelled() => return,
                        _ = p.wait() => {}
                    }
                }
                let sent = match out {
                    BulkOut::One(r) => {
                        send_one(&shared, &client, epoch, Lane::Bulk, r).map_full(BulkOut::One)
                    }
                    BulkOut::Batch(b) => send_batch(&shared, &client, epoch, b),
                };
                match sent {
                    Sent::Yes if one => {
                        shared.metrics.sent.inc();
                        if backlog {
                            shared.metrics.replayed.inc();
                        }
                    }
                    Sent::Yes => {}
                    Sent::Lost => continue 'connection,
                    Sent::Full(out) => {
                        warn!("cloud connection queue full; retrying");
                        queue.push_front(out);
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                }
                continue;
            }
            match bulk.next().await {
                Ok(Some(r)) => {
                    let Some(b) = batcher.as_mut().filter(|_| !r.retain) else {
                        queue.push_back(BulkOut::One(r));
                        continue;
                    };
                    let tag = lanes::tag(Lane::Bulk, r.seq);
                    match b.push(&r.topic, &r.payload, tag, Instant::now()) {
                        Ok(full) => {
                            if r.ts_ms < state.since_ms {
                                shared.metrics.replayed.inc();
                            }
                            queue.extend(full.into_iter().map(BulkOut::Batch));
                        }
                        Err(_) => {
                            // Sent alone, after whatever of its topic is already held.
                            queue.extend(b.take_topic(&r.topic).map(BulkOut::Batch));
                            queue.push_back(BulkOut::One(r));
                        }
                    }
                }
                Ok(None) => {
                    // Nothing more to read: the batches that are due go (all of them at shutdown).
                    let next_due = match batcher.as_mut() {
                        Some(b) => {
                            let flush = shared.flushing.load(std::sync::atomic::Ordering::SeqCst);
                            queue.extend(
                                b.due(Instant::now(), flush).into_iter().map(BulkOut::Batch),
                            );
                            b.next_due()
                        }
                        None => None,
                    };
                    if !queue.is_empty() {
                        continue;
                    }
                    let batch_due = async {
                        match next_due {
                            Some(at) => tokio::time::sleep_until(at).await,
                            None => std::future::pending().await,
                        }
                    };
                    tokio::select! {
                        _ = stop.cancelled() => return,
                        _ = shared.appended.notified() => {}
                        _ = conn.changed() => {}
                        _ = batch_due => {}
                        // Expired records are dropped by peek; look again now and then.
                        _ = tokio::time::sleep(Duration::from_secs(5)) => {}
                    }
                }
                Err(e) => {
                    error!(error = %e, "outbox peek failed; retrying in 1 s");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        }
    }
}

/// How handing a publish to rumqttc went.
enum Sent<T> {
    Yes,
    /// The connection of this epoch is gone.
    Lost,
    /// rumqttc's request channel is full: try again with this.
    Full(T),
}

impl<T> Sent<T> {
    fn map_full<U>(self, f: impl FnOnce(T) -> U) -> Sent<U> {
        match self {
            Sent::Yes => Sent::Yes,
            Sent::Lost => Sent::Lost,
            Sent::Full(t) => Sent::Full(f(t)),
        }
    }
}

/// Queues the publish's ticket and hands it to rumqttc under one lock (see [`inflight`]).
fn send_tracked(
    shared: &Shared,
    epoch: u64,
    ticket: inflight::Ticket,
    publish: impl FnOnce() -> Result<(), cloud::Unsent>,
) -> Sent<cloud::Unsent> {
    let mut g = shared.inflight();
    if !g.is_current(epoch) {
        return Sent::Lost;
    }
    g.queue(ticket);
    match publish() {
        Ok(()) => Sent::Yes,
        Err(e) => {
            g.unqueue_last();
            Sent::Full(e)
        }
    }
}

/// Puts back what rumqttc handed back; `None` when it did not (then the connection's sender
/// starts over from the outbox, which still holds the record).
fn restore(unsent: cloud::Unsent, topic: &mut String, payload: &mut Vec<u8>) -> Option<()> {
    let (t, p) = unsent.publish?;
    (*topic, *payload) = (t, p);
    Some(())
}

fn send_one(
    shared: &Shared,
    client: &Client,
    epoch: u64,
    lane: Lane,
    mut r: edgetwin_outbox::Record,
) -> Sent<edgetwin_outbox::Record> {
    let qos = if r.qos == 0 {
        QoS::AtMostOnce
    } else {
        QoS::AtLeastOnce
    };
    let ticket = inflight::Ticket::One(lanes::tag(lane, r.seq));
    let (topic, payload) = (std::mem::take(&mut r.topic), std::mem::take(&mut r.payload));
    match send_tracked(shared, epoch, ticket, || {
        client.try_publish(topic, qos, r.retain, payload, None)
    }) {
        Sent::Yes => Sent::Yes,
        Sent::Lost => Sent::Lost,
        Sent::Full(e) => match restore(e, &mut r.topic, &mut r.payload) {
            Some(()) => Sent::Full(r),
            None => Sent::Lost,
        },
    }
}

fn send_batch(shared: &Shared, client: &Client, epoch: u64, mut b: batch::Ready) -> Sent<BulkOut> {
    let n = b.tags.len() as u64;
    let (raw, bytes) = (b.raw_bytes as u64, b.payload.len() as u64);
    let ticket = inflight::Ticket::Batch(b.tags.clone());
    let (topic, payload) = (std::mem::take(&mut b.topic), std::mem::take(&mut b.payload));
    // MQTT 5 only (dropped over 3.1.1, where the topic and zstd's magic number tell the same).
    let mut user = vec![("edgetwin-node".to_string(), shared.node_id.clone())];
    if let Some(enc) = b.compression.encoding() {
        user.push(("content-encoding".to_string(), enc.to_string()));
    }
    let meta = cloud::Meta {
        content_type: Some(batch::CONTENT_TYPE),
        user,
    };
    match send_tracked(shared, epoch, ticket, || {
        client.try_publish(topic, QoS::AtLeastOnce, false, payload, Some(&meta))
    }) {
        Sent::Yes => {
            let m = &shared.metrics;
            m.sent.inc_by(n);
            m.batches.inc();
            m.batch_raw_bytes.inc_by(raw);
            m.batch_sent_bytes.inc_by(bytes);
            Sent::Yes
        }
        Sent::Lost => Sent::Lost,
        Sent::Full(e) => match restore(e, &mut b.topic, &mut b.payload) {
            Some(()) => Sent::Full(BulkOut::Batch(b)),
            None => Sent::Lost,
        },
    }
}

/// Most bytes of records read ahead of the window.
const READ_AHEAD_BYTES: usize = 4 * 1024 * 1024;
/// Most records read ahead of the window.
const MAX_READ_AHEAD: usize = 2048;

type PeekTask = tokio::task::JoinHandle<Result<Vec<edgetwin_outbox::Record>, String>>;

/// Outbox records read ahead of the window, oldest first, with the next read already under way
/// while the ones read are sent. A PUBACK frees one slot at a time; reading on demand cost a
/// read per slot, and every read waits for the outbox's lock, which an ack's fsync holds: the
/// window ran dry behind each ack commit (a drain at 0.2x Mosquitto's bridge).
struct ReadAhead {
    shared: Arc<Shared>,
    lane: Lane,
    /// The last sequence number read (the next read starts after it).
    cursor: Option<u64>,
    ready: std::collections::VecDeque<edgetwin_outbox::Record>,
    pending: Option<PeekTask>,
    /// The lane's append count when the read under way started.
    reading_at: u64,
    /// The lane's append count when a read last found nothing after `cursor`: no read again
    /// until it moves.
    empty_at: Option<u64>,
    /// Records per read, from the size of the records read last (bounded in bytes).
    batch: usize,
}

impl ReadAhead {
    fn new(shared: Arc<Shared>, lane: Lane) -> ReadAhead {
        ReadAhead {
            shared,
            lane,
            cursor: None,
            ready: std::collections::VecDeque::new(),
            pending: None,
            reading_at: 0,
            empty_at: None,
            batch: MAX_PEEK,
        }
    }

    /// Whether the lane may hold records after `cursor` that were not read yet.
    fn fresh(&self) -> bool {
        self.empty_at != Some(self.shared.outbox.appends(self.lane))
    }

    fn start_read(&mut self) {
        if self.pending.is_some() {
            return;
        }
        let outbox = self.shared.outbox.get(self.lane).clone();
        let (cursor, n) = (self.cursor, self.batch);
        self.reading_at = self.shared.outbox.appends(self.lane);
        self.pending = Some(tokio::task::spawn_blocking(move || {
            outbox.peek(cursor, n, now_ms()).map_err(|e| e.to_string())
        }));
    }

    async fn finish_read(&mut self) -> Result<(), String> {
        let Some(task) = self.pending.take() else {
            return Ok(());
        };
        let records = task.await.map_err(|e| e.to_string())??;
        match records.last() {
            None => self.empty_at = Some(self.reading_at),
            Some(last) => {
                self.cursor = Some(last.seq);
                self.empty_at = None;
                let bytes: usize = records
                    .iter()
                    .map(|r| r.topic.len() + r.payload.len() + 64)
                    .sum();
                let per_record = (bytes / records.len()).max(1);
                self.batch = (READ_AHEAD_BYTES / 2 / per_record).clamp(16, MAX_READ_AHEAD);
                self.ready.extend(records);
            }
        }
        Ok(())
    }

    /// The next record to send; `None` when the outbox holds nothing after what was read.
    async fn next(&mut self) -> Result<Option<edgetwin_outbox::Record>, String> {
        if self.pending.as_ref().is_some_and(|t| t.is_finished()) {
            self.finish_read().await?;
        }
        // Keep a read under way while at most half a read is left.
        let fresh = self.fresh();
        if self.ready.len() <= self.batch / 2 && fresh {
            self.start_read();
        }
        if self.ready.is_empty() {
            if !fresh && self.pending.is_none() {
                return Ok(None);
            }
            self.start_read();
            self.finish_read().await?;
        }
        Ok(self.ready.pop_front())
    }

    /// Forgets what was read from `seq` on, to read it again.
    fn restart_at(&mut self, seq: u64) {
        self.ready.clear();
        self.pending = None;
        self.empty_at = None;
        self.cursor = seq.checked_sub(1);
    }
}

/// Longest an ack stays deferred (committed without fsync): a crash replays at most this much of
/// a drain upstream (duplicates, never losses), and redb reuses the freed pages after it.
const ACK_SYNC_INTERVAL: Duration = Duration::from_millis(250);

/// Acks released records in the outbox, everything that arrived since the last commit at once.
/// Within [`ACK_SYNC_INTERVAL`] of a lane's last durable commit its acks are deferred: during a
/// drain that is one fsync per lane every 250 ms instead of one per ack batch.
async fn run_acker(shared: Arc<Shared>, mut acks: mpsc::UnboundedReceiver<u64>) {
    use edgetwin_outbox::AckDurability;
    let mut buf = Vec::new();
    let lanes = [Lane::Control, Lane::Bulk];
    let mut synced_at = [Instant::now(); 2];
    let mut deferred = [false; 2];
    loop {
        let due = (0..2)
            .filter(|&i| deferred[i])
            .map(|i| synced_at[i] + ACK_SYNC_INTERVAL)
            .min();
        let n = match due {
            Some(at) => match tokio::time::timeout_at(at, acks.recv_many(&mut buf, 8192)).await {
                Ok(n) => n,
                Err(_) => {
                    // Quiet: make the deferred acks durable now.
                    for i in 0..2 {
                        if deferred[i] {
                            sync_lane(&shared, lanes[i]).await;
                            (synced_at[i], deferred[i]) = (Instant::now(), false);
                        }
                    }
                    continue;
                }
            },
            None => acks.recv_many(&mut buf, 8192).await,
        };
        if n == 0 {
            for i in (0..2).filter(|&i| deferred[i]) {
                sync_lane(&shared, lanes[i]).await;
            }
            break;
        }
        let (mut control, mut bulk) = (Vec::new(), Vec::new());
        for t in buf.drain(..) {
            match lanes::untag(t) {
                (Lane::Control, seq) => control.push(seq),
                (Lane::Bulk, seq) => bulk.push(seq),
            }
        }
        for (i, seqs) in [control, bulk].into_iter().enumerate() {
            if seqs.is_empty() {
                continue;
            }
            let lane = lanes[i];
            let durable = synced_at[i].elapsed() >= ACK_SYNC_INTERVAL;
            let how = if durable {
                AckDurability::Immediate
            } else {
                AckDurability::Deferred
            };
            let n = seqs.len();
            let outbox = shared.outbox.get(lane).clone();
            match tokio::task::spawn_blocking(move || outbox.ack_with(&seqs, how)).await {
                Ok(Ok(_)) => {
                    if durable {
                        (synced_at[i], deferred[i]) = (Instant::now(), false);
                    } else {
                        deferred[i] = true;
                    }
                }
                Ok(Err(e)) => {
                    warn!(error = %e, records = n, lane = ?lane, "outbox ack failed; these records will be sent again")
                }
                Err(e) => {
                    warn!(error = %e, records = n, lane = ?lane, "outbox ack task failed; these records will be sent again")
                }
            }
        }
        shared.sync_metrics().await;
    }
}

/// Makes a lane's deferred acks durable.
async fn sync_lane(shared: &Shared, lane: Lane) {
    let outbox = shared.outbox.get(lane).clone();
    match tokio::task::spawn_blocking(move || outbox.sync()).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => {
            warn!(error = %e, lane = ?lane, "outbox sync failed; acked records may be sent again after a crash")
        }
        Err(e) => warn!(error = %e, lane = ?lane, "outbox sync task failed"),
    }
}

/// The cloud connection: drives rumqttc's event loop, tracks acks, reconnects with backoff.
/// Publishes a retained state document (QoS 1) outside the outbox: its PUBACK releases no record.
fn publish_untracked(
    shared: &Shared,
    client: &Client,
    topic: &str,
    payload: impl Into<Vec<u8>>,
) -> Result<(), cloud::Unsent> {
    // Queued under the same lock as the publish, so the session binds its packet id to no record.
    let mut g = shared.inflight();
    g.queue(inflight::Ticket::Untracked);
    let r = client.try_publish(
        topic.to_string(),
        QoS::AtLeastOnce,
        true,
        payload.into(),
        None,
    );
    if r.is_err() {
        g.unqueue_last();
    }
    r
}

/// Keeps the cloud's retained copy of a state document current: published when it changes while
/// connected, and once more on every new connection (the cloud may have lost it; what changed
/// while offline is sent then, once, not queued).
async fn run_state_feed(
    shared: Arc<Shared>,
    client: Client,
    mut conn: watch::Receiver<ConnState>,
    mut doc: watch::Receiver<Option<Bytes>>,
    topic: String,
    stop: CancellationToken,
) {
    let mut pending = false;
    let mut published_in: Option<u64> = None;
    loop {
        tokio::select! {
            _ = stop.cancelled() => break,
            r = conn.changed() => if r.is_err() { break },
            r = doc.changed() => {
                if r.is_err() { break }
                pending = true;
            }
        }
        let c = *conn.borrow_and_update();
        if !c.connected || (!pending && published_in == Some(c.epoch)) {
            continue;
        }
        let Some(payload) = doc.borrow_and_update().clone() else {
            continue;
        };
        match publish_untracked(&shared, &client, &topic, payload.to_vec()) {
            Ok(()) => {
                pending = false;
                published_in = Some(c.epoch);
            }
            // Tried again at the next change or connection.
            Err(e) => warn!(topic = %topic, error = %e, "cannot publish a state document"),
        }
    }
}

struct Session {
    shared: Arc<Shared>,
    client: Client,
    conn: watch::Sender<ConnState>,
    acks: mpsc::UnboundedSender<u64>,
    inbound: mpsc::UnboundedSender<Inbound>,
    prefix: String,
    down: Vec<String>,
    window: u16,
    backoff: edgetwin_retry::Backoff,
    tracker: TaskTracker,
    host: String,
    presence: Presence,
    verifier: Option<signed::Verifier>,
}

/// The node's presence at the cloud: the retained `{prefix}node/status`, `online` at every
/// connection, `offline` with a reason at a clean stop, and the MQTT will (also `offline`) when
/// the connection dies.
struct Presence {
    topic: String,
    /// When this bridge (the node process) started, ms: a new `boot` is a restart.
    boot_ms: i64,
}

impl Presence {
    fn payload(&self, state: MapperState, reason: Option<&str>) -> Vec<u8> {
        let msg = NodePresenceMsg {
            state,
            ts: now_ms(),
            version: env!("CARGO_PKG_VERSION").to_string(),
            boot: self.boot_ms,
            reason: reason.map(str::to_string),
        };
        msg.to_json_bytes()
    }
}

impl Session {
    /// Publishes the node's presence (retained, QoS 1) outside the outbox: it says what is true
    /// now, so it never waits behind a backlog and is never replayed.
    fn publish_presence(&self, state: MapperState, reason: Option<&str>) {
        let payload = self.presence.payload(state, reason);
        if let Err(e) = publish_untracked(&self.shared, &self.client, &self.presence.topic, payload)
        {
            warn!(error = %e, "cannot publish the node's presence");
        }
    }

    async fn run(mut self, mut eventloop: Loop, stop: CancellationToken) {
        let mut connected_before = false;
        loop {
            let event = tokio::select! {
                _ = stop.cancelled() => break,
                e = eventloop.poll() => e,
            };
            match event {
                Ok(Ev::ConnAck { session_present }) => {
                    let epoch = self.shared.inflight().on_connected();
                    // First on the new connection, before the sender queues anything of it.
                    self.publish_presence(MapperState::Online, None);
                    if !self.down.is_empty() {
                        let filters = self
                            .down
                            .iter()
                            .map(|f| format!("{}{f}", self.prefix))
                            .collect();
                        if let Err(e) = self.client.try_subscribe_many(filters) {
                            error!(error = ?e, "cannot subscribe the cloud topics");
                        }
                    }
                    self.conn.send_replace(ConnState {
                        epoch,
                        connected: true,
                        since_ms: now_ms(),
                    });
                    self.shared.space.notify_one();
                    let m = &self.shared.metrics;
                    m.connected.set(1);
                    if connected_before {
                        m.reconnects.inc();
                    }
                    connected_before = true;
                    self.backoff.reset();
                    info!(broker = %self.host, session_present, "connected to the cloud broker");
                }
                Ok(Ev::PubAck { pkid, refused }) => {
                    let ticket = self.shared.inflight().on_puback(pkid);
                    if let Some(ticket) = ticket {
                        let tags = ticket.tags();
                        let n = tags.len() as u64;
                        match &refused {
                            None => {
                                self.shared.metrics.acked.inc_by(n);
                            }
                            Some(why) if n > 0 => {
                                // Sending it again would be refused again: released, counted.
                                warn!(records = n, reason = %why, "the cloud broker refused a publish; its records are dropped");
                                self.shared
                                    .metrics
                                    .outbox_dropped
                                    .get_or_create(&metrics::ReasonLabels {
                                        reason: metrics::CLOUD_REFUSED.to_string(),
                                    })
                                    .inc_by(n);
                            }
                            Some(why) => {
                                warn!(reason = %why, "the cloud broker refused a state document")
                            }
                        }
                        for t in tags {
                            let _ = self.acks.send(*t);
                        }
                        self.shared.space.notify_one();
                    }
                }
                Ok(Ev::OutgoingPublish(pkid)) => {
                    if let Err(e) = self.shared.inflight().on_outgoing(pkid) {
                        error!(error = %e, "ack tracking out of step");
                    }
                }
                Ok(Ev::Publish(p)) => self.down(p),
                Ok(_) => {}
                Err(e) => {
                    let lost = {
                        let mut g = self.shared.inflight();
                        // The outbox is the only retransmission queue: drop what rumqttc would
                        // resend (and any request queued since the failure) with the bindings.
                        eventloop.reset(self.window);
                        g.on_lost()
                    };
                    let was_connected = self.conn.borrow().connected;
                    self.conn.send_modify(|s| s.connected = false);
                    self.shared.space.notify_one();
                    let m = &self.shared.metrics;
                    m.connected.set(0);
                    m.connection_errors.inc();
                    m.inflight.set(0);
                    let wait = self.backoff.next_delay();
                    if was_connected {
                        warn!(broker = %self.host, error = %e, in_flight = lost, retry_in_ms = wait.as_millis() as u64, "cloud broker connection lost");
                    } else {
                        warn!(broker = %self.host, error = %e, retry_in_ms = wait.as_millis() as u64, "cannot connect to the cloud broker");
                    }
                    tokio::select! {
                        _ = stop.cancelled() => break,
                        _ = tokio::time::sleep(wait) => {}
                    }
                }
            }
        }
        if self.conn.borrow().connected {
            // A clean stop: say so (the DISCONNECT keeps the broker from publishing the will).
            self.publish_presence(MapperState::Offline, Some("stopped"));
            let _ = tokio::time::timeout(Duration::from_millis(500), async {
                loop {
                    match eventloop.poll().await {
                        Ok(Ev::OutgoingPublish(pkid)) => {
                            let _ = self.shared.inflight().on_outgoing(pkid);
                        }
                        Ok(Ev::PubAck { pkid, .. }) => match self.shared.inflight().on_puback(pkid)
                        {
                            Some(inflight::Ticket::Untracked) => break,
                            Some(t) => {
                                for tag in t.tags() {
                                    let _ = self.acks.send(*tag);
                                }
                            }
                            None => {}
                        },
                        Err(_) => break,
                        _ => {}
                    }
                }
            })
            .await;
            let _ = self.client.try_disconnect();
            let _ = tokio::time::timeout(Duration::from_millis(500), async {
                loop {
                    match eventloop.poll().await {
                        Ok(Ev::OutgoingDisconnect) | Err(_) => break,
                        _ => {}
                    }
                }
            })
            .await;
            info!(broker = %self.host, "disconnected from the cloud broker");
        }
        self.shared.metrics.connected.set(0);
    }

    /// A message from the cloud: hand it over; PUBACK once it took effect.
    fn down(&self, p: Down) {
        self.shared.metrics.received.inc();
        let epoch = self.shared.inflight().epoch();
        let cloud_topic = p.topic();
        let local = cloud_topic
            .strip_prefix(self.prefix.as_str())
            .filter(|t| !t.is_empty())
            .map(str::to_string);
        let Some(topic) = local else {
            warn!(topic = %cloud_topic, "ignoring a cloud message outside the prefix");
            let _ = self.client.try_ack(&p);
            return;
        };
        debug!(topic = %topic, "message from the cloud");
        let (payload, refused) = match &self.verifier {
            None => (p.payload(), None),
            Some(v) => match v.open(&cloud_topic, &p.payload(), now_ms()) {
                Ok(msg) => (Bytes::from(msg), None),
                Err(r) => {
                    warn!(topic = %topic, reason = r.reason(), error = %r, "cloud message refused: signatures are required");
                    self.shared
                        .metrics
                        .refused
                        .get_or_create(&metrics::ReasonLabels {
                            reason: r.reason().to_string(),
                        })
                        .inc();
                    (p.payload(), Some(r.to_string()))
                }
            },
        };
        let (done, done_rx) = oneshot::channel();
        let inbound = Inbound {
            topic,
            payload,
            refused,
            done,
        };
        if self.inbound.send(inbound).is_err() {
            // Shutting down: left unacknowledged, the cloud delivers it again.
            return;
        }
        let shared = self.shared.clone();
        let client = self.client.clone();
        self.tracker.spawn(async move {
            if done_rx.await.is_ok() {
                // Only within the connection it arrived on: a PUBACK in a later connection could
                // name another message.
                let g = shared.inflight();
                if g.is_current(epoch) {
                    let _ = client.try_ack(&p);
                }
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bridge_replay_pacer_spaces_backlog_at_the_configured_rate() {
        let mut p = Pacer::new(100).expect("paced");
        let t0 = Instant::now();
        p.next = t0;
        // Sending as fast as allowed: slot n is at t0 + n * 10 ms.
        let mut now = t0;
        for n in 0..200u32 {
            if let Some(at) = p.reserve(now) {
                assert_eq!(at, t0 + Duration::from_millis(10) * n);
                now = at;
            }
        }
        assert_eq!(now - t0, Duration::from_millis(1990));
        // After a long idle spell at most 100 ms of burst is allowed.
        let later = now + Duration::from_secs(60);
        let free = (0..50).take_while(|_| p.reserve(later).is_none()).count();
        assert_eq!(
            free, 11,
            "100 ms of burst at 10 ms per message, plus the current slot"
        );
        assert!(Pacer::new(0).is_none(), "0 = unpaced");
    }
}
