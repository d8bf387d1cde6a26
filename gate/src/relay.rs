//! One client connection: TLS handshake, CONNECT, authentication, the upstream dial, then the
//! two-way relay with inspection.
//!
//! Both directions run in the connection's one task (`select!`), so ending either ends both and
//! nothing outlives the connection. Each read is framed into whole packets; allowed packets are
//! forwarded as their raw bytes, batched into one write per read. The gate answers for what it
//! withholds, so neither side waits forever: a denied QoS 1/2 PUBLISH is acknowledged to the client
//! (v5 with reason 0x87), a withheld delivery is acknowledged to the broker, a partly denied
//! SUBSCRIBE is forwarded without the denied filters and the broker's SUBACK is widened back to
//! the client's original filter list with failures in the denied places.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use rumqttc::v5::mqttbytes::v5::DisconnectReasonCode;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::acks::{AckOrder, Phase};
use crate::acl::{self, DeviceDirectory, Role};
use crate::config::GateConfig;
use crate::credentials::{role_of, Credentials};
use crate::intake::{Commit, Intake};
use crate::logins::{Logins, Turn};
use crate::metrics::{ConnectionLabels, GateMetrics};
use crate::origin::{Options, Origin, Subscriptions, Verdict};
use crate::packet::{self, Connect, Kind, PacketError, Refusal, Version};
use crate::sessions::{Queued, SessionStore, Sessions};
use crate::tls::cert_identity;
use crate::upstream::BrokerStream;

/// Everything the connections share.
pub(crate) struct Shared {
    pub cfg: GateConfig,
    /// Replaced whole by [`crate::Gate::reload_credentials`]; a connection authenticates against
    /// the set in force when its CONNECT arrives.
    pub credentials: std::sync::RwLock<Option<Arc<Credentials>>>,
    pub upstream: crate::Upstream,
    pub dir: Arc<dyn DeviceDirectory>,
    /// The node's stores: publishes on stored topics reach the broker only once committed.
    pub intake: Arc<dyn Intake>,
    pub metrics: GateMetrics,
    /// Distinct filters passed to the broker so far (see `limits.max_distinct_filters`;
    /// `$share/{group}/` stripped: a shared subscription uses the log of its filter).
    pub filters: NameBudget,
    /// Distinct topic names outside the registry's passed so far (`limits.max_distinct_topics`).
    pub topics: NameBudget,
    /// Failed logins by address and user, for the back-off.
    pub logins: Mutex<Logins>,
    /// Which identity holds which client id.
    pub client_ids: Mutex<crate::client_ids::ClientIds>,
    /// The sessions the broker keeps for clients, and until when.
    pub sessions: Mutex<Sessions>,
    /// Where the session table outlives the process ([`crate::Gate::keep_sessions_in`]).
    pub session_store: std::sync::OnceLock<Arc<dyn SessionStore>>,
    /// SUBSCRIBEs the broker has not answered yet (publishes they match wait for them).
    pub subscribing: crate::subscribing::Subscribing,
    /// The next connection's number (for [`Origin::conn`]).
    pub next_conn: std::sync::atomic::AtomicU64,
    /// The kept sessions nobody is connected to, held at the broker by the gate.
    pub keepers: crate::keeper::Keepers,
}

/// A node-wide budget of distinct names (filters or topics) that the broker keeps state for as
/// long as it runs.
#[derive(Debug)]
pub(crate) struct NameBudget {
    known: Mutex<HashSet<String>>,
    max: usize,
}

impl NameBudget {
    pub fn new(max: usize) -> NameBudget {
        NameBudget {
            known: Mutex::new(HashSet::new()),
            max,
        }
    }

    /// Whether `key` may go to the broker: it is known, or there is room for it (then it is
    /// known from now on).
    pub fn admit(&self, key: &str) -> bool {
        let mut known = self
            .known
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if known.contains(key) {
            return true;
        }
        if known.len() >= self.max {
            return false;
        }
        known.insert(key.to_string());
        true
    }
}

trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}
type ClientStream = Box<dyn Io>;

/// Why an anonymous client from another host is refused, in the log and an MQTT 5 CONNACK.
const ANONYMOUS_REMOTE: &str = "anonymous clients are accepted from this host only: connect with a user (edgetwin user add), or set gate.allow_anonymous: true";

/// Largest packet accepted from the upstream broker (it enforces its own limit).
pub(crate) const UPSTREAM_MAX_PACKET: usize = 256 * 1024 * 1024;

/// Why the gate cut a client.
struct Cut {
    reason: &'static str,
    detail: String,
    v5: DisconnectReasonCode,
}

impl Cut {
    fn packet(e: PacketError) -> Cut {
        match e {
            PacketError::TooLarge(n) => Cut {
                reason: "packet_too_large",
                detail: format!("packet of {n} bytes exceeds limits.max_packet_bytes"),
                v5: DisconnectReasonCode::PacketTooLarge,
            },
            e => Cut {
                reason: "malformed",
                detail: e.to_string(),
                v5: DisconnectReasonCode::MalformedPacket,
            },
        }
    }

    fn topic_too_long(len: usize, max: usize) -> Cut {
        Cut {
            reason: "topic_too_long",
            detail: format!("topic of {len} bytes exceeds limits.max_topic_len {max}"),
            v5: DisconnectReasonCode::TopicNameInvalid,
        }
    }

    fn protocol(detail: &str) -> Cut {
        Cut {
            reason: "protocol_error",
            detail: detail.to_string(),
            v5: DisconnectReasonCode::ProtocolError,
        }
    }
}

/// How a relay ended.
enum End {
    /// One side closed (or an I/O error): nothing to tell.
    Closed,
    /// The gate cut the client.
    Cut(Cut),
    /// The node is shutting down.
    Shutdown,
}

/// Serves one accepted TCP connection until it ends or `shutdown` fires.
pub(crate) async fn serve(
    shared: Arc<Shared>,
    tcp: TcpStream,
    peer: SocketAddr,
    tls: Option<TlsAcceptor>,
    shutdown: CancellationToken,
) {
    let limits = &shared.cfg.limits;
    let deadline = tokio::time::Instant::now() + Duration::from_millis(limits.connect_timeout_ms);
    if let Err(e) = tcp.set_nodelay(true) {
        debug!(%peer, error = %e, "cannot set TCP_NODELAY");
    }
    let (mut client, cert_name): (ClientStream, Option<String>) = match tls {
        None => (Box::new(tcp), None),
        Some(acceptor) => match tokio::time::timeout_at(deadline, acceptor.accept(tcp)).await {
            Ok(Ok(s)) => {
                let name = s
                    .get_ref()
                    .1
                    .peer_certificates()
                    .and_then(|c| c.first())
                    .and_then(cert_identity);
                (Box::new(s), name)
            }
            Ok(Err(e)) => {
                shared.metrics.auth_failure("tls_handshake");
                info!(%peer, error = %e, "TLS handshake refused");
                return;
            }
            Err(_) => {
                debug!(%peer, "TLS handshake timed out");
                return;
            }
        },
    };

    let mut buf = BytesMut::with_capacity(4096);
    let connect = tokio::select! {
        r = tokio::time::timeout_at(deadline, read_connect(&mut client, &mut buf, limits.max_packet_bytes)) => r,
        _ = shutdown.cancelled() => return,
    };
    let connect = match connect {
        Ok(Ok(c)) => c,
        Ok(Err(ConnectReadError::Packet(PacketError::UnsupportedLevel(level)))) => {
            shared.metrics.auth_failure("unsupported_version");
            info!(%peer, level, "CONNECT refused: unsupported protocol level");
            let _ = client
                .write_all(&packet::connack_refused(
                    Version::V4,
                    Refusal::UnsupportedVersion,
                ))
                .await;
            return;
        }
        Ok(Err(ConnectReadError::Packet(e))) => {
            shared.metrics.disconnect(Cut::packet(e.clone()).reason);
            info!(%peer, error = %e, "bad CONNECT; connection closed");
            return;
        }
        Ok(Err(ConnectReadError::Io)) => return,
        Err(_) => {
            debug!(%peer, "no CONNECT within limits.connect_timeout_ms");
            return;
        }
    };
    let version = connect.version();
    let client_id = connect.client_id().to_string();
    if version == Version::V4 && client_id.is_empty() && !connect.clean_start() {
        // [MQTT-3.1.3-8]: a session needs a client id to come back to.
        shared.metrics.auth_failure("client_id_rejected");
        info!(%peer, "CONNECT refused: no client id, and a session asked for");
        let _ = client
            .write_all(&packet::connack_refused(version, Refusal::ClientIdRejected))
            .await;
        return;
    }

    let user = connect.login().map(|l| l.0.to_string());
    let turn = shared
        .logins
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .turn(peer.ip(), user.as_deref(), std::time::Instant::now());
    match turn {
        Turn::Now => {}
        Turn::At(at) => {
            shared.metrics.login_delayed.inc();
            debug!(%peer, client = %client_id, "login held back after failed logins");
            tokio::select! {
                _ = tokio::time::sleep_until(at.into()) => {}
                _ = shutdown.cancelled() => return,
            }
        }
        Turn::Refuse => {
            shared.metrics.auth_failure("throttled");
            debug!(%peer, client = %client_id, "CONNECT refused unchecked: too many failed logins");
            let _ = client
                .write_all(&packet::connack_refused(version, Refusal::NotAuthorized))
                .await;
            let _ = client.shutdown().await;
            return;
        }
    }
    let outcome = authenticate(&shared, &connect, cert_name, peer).await;
    {
        let mut logins = shared
            .logins
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        match &outcome {
            Ok(_) => logins.succeeded(peer.ip(), user.as_deref()),
            Err(_) => logins.failed(peer.ip(), user.as_deref(), std::time::Instant::now()),
        }
    }
    let (role, identity) = match outcome {
        Ok(r) => r,
        Err((why, reason)) => {
            shared.metrics.auth_failure(reason);
            let explained = (reason == "anonymous_remote").then_some(ANONYMOUS_REMOTE);
            warn!(%peer, client = %client_id, user = connect.login().map(|l| l.0).unwrap_or(""), reason, hint = explained.unwrap_or(""), "CONNECT refused");
            let _ = client
                .write_all(&packet::connack_refused_explained(version, why, explained))
                .await;
            let _ = client.shutdown().await;
            return;
        }
    };
    if let Some(will) = connect.will_topic() {
        if will.len() > limits.max_topic_len || !acl::may_publish(&role, &will, shared.dir.as_ref())
        {
            shared.metrics.auth_failure("will_denied");
            shared.metrics.deny(role.label(), "publish");
            warn!(%peer, client = %client_id, user = %identity, topic = %will, "CONNECT refused: will topic not allowed");
            let _ = client
                .write_all(&packet::connack_refused(version, Refusal::NotAuthorized))
                .await;
            return;
        }
    }

    let claimed = shared
        .client_ids
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .claim(&client_id, &identity, connect.keeps_session());
    if let Err(taken) = claimed {
        shared.metrics.auth_failure("client_id_taken");
        warn!(%peer, client = %client_id, user = %identity, held_by = %taken.by, "CONNECT refused: the client id belongs to another identity");
        let _ = client
            .write_all(&packet::connack_refused(version, Refusal::ClientIdTaken))
            .await;
        return;
    }
    // Released however this connection ends.
    let _release = ReleaseOnDrop {
        shared: &shared,
        client_id: &client_id,
    };

    let conn_id = shared
        .next_conn
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let upstream_id = packet::upstream_client_id(&client_id).into_owned();
    // An empty client id has no session to come back to (MQTT 5 assigns one per connection).
    let opened = if client_id.is_empty() {
        None
    } else {
        // A client that reconnects at once may reach us before its old connection has read the
        // DISCONNECT it sent (with a session expiry that ends the session): give the old
        // connection a moment to finish, then take over as before.
        let patience = tokio::time::Instant::now() + TAKEOVER_PATIENCE;
        while tokio::time::Instant::now() < patience
            && lock(&shared.sessions).held_by_another(&upstream_id, conn_id)
        {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        loop {
            let o = lock(&shared.sessions).open(
                &upstream_id,
                connect.clean_start(),
                connect.session_expiry(),
                conn_id,
                std::time::Instant::now(),
            );
            match o {
                Some(o) => break Some(o),
                // The sweep is ending this client id's expired session at the broker.
                None if tokio::time::Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(20)).await
                }
                None => return,
            }
        }
    };
    // The gate's own hold of the session ends before the client's: what it read is in the
    // queue, what it did not the broker sends to this connection.
    if opened.is_some() {
        shared.keepers.stop(&upstream_id).await;
    }
    let queued = match (&opened, shared.session_store.get()) {
        (Some(o), Some(store)) if store.keeps_queues() => {
            if o.present {
                store.queued(&upstream_id).await.unwrap_or_default()
            } else {
                store.clear_queue(&upstream_id);
                Vec::new()
            }
        }
        _ => Vec::new(),
    };
    if opened.as_ref().is_some_and(|o| o.clear_first) {
        end_at_broker(&shared, &upstream_id).await;
    }
    if opened.is_some() {
        lock(&shared.sessions).set_owner(&upstream_id, &client_id, &identity);
        shared.persist(&upstream_id);
    }
    let upstream_addr = &shared.upstream.broker;
    let upstream = match dial(
        upstream_addr,
        deadline,
        &connect,
        limits.keepalive_off_upstream_s,
        shared.upstream.login.as_ref(),
        opened.as_ref().is_none_or(|o| o.clean_start),
        conn_id,
    )
    .await
    {
        Ok(u) => u,
        Err(e) => {
            shared.metrics.auth_failure("upstream_unavailable");
            warn!(%peer, client = %client_id, upstream = %upstream_addr, error = %e, "upstream broker unavailable");
            let _ = client
                .write_all(&packet::connack_refused(version, Refusal::Unavailable))
                .await;
            if !client_id.is_empty() {
                lock(&shared.sessions).close(
                    &upstream_id,
                    conn_id,
                    connect.session_expiry(),
                    Subscriptions::default(),
                    std::time::Instant::now(),
                );
            }
            return;
        }
    };

    shared
        .metrics
        .connections
        .get_or_create(&ConnectionLabels {
            role: role.label().into(),
            version: version.label().into(),
        })
        .inc();
    shared.metrics.active.inc();
    info!(%peer, client = %client_id, user = %identity, role = role.label(), version = version.label(), "client connected through the gate");

    let conn = Conn {
        shared: &shared,
        role,
        version,
        client_id: &client_id,
        session_id: (!client_id.is_empty()).then(|| upstream_id.clone()),
        session_closed: std::sync::atomic::AtomicBool::new(false),
        conn_id,
        session_present: opened.as_ref().is_some_and(|o| o.present),
        subs: Mutex::new(opened.map(|o| o.subs).unwrap_or_default()),
        expiry: std::sync::atomic::AtomicU32::new(connect.session_expiry()),
        qos2_as_qos1: Mutex::new(HashSet::new()),
        withheld_qos2: Mutex::new(HashSet::new()),
        acks: tokio::sync::Mutex::new(AckOrder::default()),
        own_deliveries: Mutex::new(OwnDeliveries::default()),
        pending_subacks: Mutex::new(HashMap::new()),
        keepalive_off: connect.keep_alive() == 0,
        client_max_packet: connect.max_packet_size(),
        window: connect
            .receive_maximum()
            .map(|m| Mutex::new(Window::new(m))),
        client_pings: std::sync::atomic::AtomicU32::new(0),
        client_disconnected: std::sync::atomic::AtomicBool::new(false),
        queued: Mutex::new(queued),
    };
    let end = conn.relay(client, buf, upstream, &shutdown).await;
    shared.metrics.active.dec();
    shared.subscribing.ended(conn_id);
    // Unless its DISCONNECT did already, the session's clock starts now.
    conn.close_session();
    if let Some(id) = &conn.session_id {
        keep_while_away(&shared, id, conn_id);
    }
    match end {
        End::Closed => debug!(client = %client_id, "connection closed"),
        End::Shutdown => debug!(client = %client_id, "connection closed for shutdown"),
        End::Cut(c) => {
            shared.metrics.disconnect(c.reason);
            warn!(client = %client_id, user = %identity, reason = c.reason, detail = %c.detail, "client disconnected by the gate");
        }
    }
}

/// Gives the connection's client id back when the connection ends.
struct ReleaseOnDrop<'a> {
    shared: &'a Shared,
    client_id: &'a str,
}

impl Drop for ReleaseOnDrop<'_> {
    fn drop(&mut self) {
        self.shared
            .client_ids
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .release(self.client_id);
    }
}

enum ConnectReadError {
    Packet(PacketError),
    Io,
}

async fn read_connect(
    client: &mut ClientStream,
    buf: &mut BytesMut,
    max: usize,
) -> Result<Connect, ConnectReadError> {
    loop {
        if let Some(c) = Connect::read(buf, max).map_err(ConnectReadError::Packet)? {
            return Ok(c);
        }
        match client.read_buf(buf).await {
            Ok(0) | Err(_) => return Err(ConnectReadError::Io),
            Ok(_) => {}
        }
    }
}

type AuthOutcome = Result<(Role, String), (Refusal, &'static str)>;

async fn authenticate(
    shared: &Shared,
    connect: &Connect,
    cert_name: Option<String>,
    peer: SocketAddr,
) -> AuthOutcome {
    let anonymous = || -> AuthOutcome {
        if shared.cfg.anonymous_allowed_from(peer.ip()) {
            role_of(shared.cfg.anonymous_role, None)
                .map(|r| (r, "anonymous".to_string()))
                .map_err(|_| (Refusal::NotAuthorized, "no_credentials"))
        } else if shared.cfg.allow_anonymous.is_none() && shared.cfg.credentials_file.is_none() {
            Err((Refusal::NotAuthorized, "anonymous_remote"))
        } else {
            Err((Refusal::NotAuthorized, "no_credentials"))
        }
    };
    // The node's own clients (its readiness canary) use the broker's internal login, which
    // only this process knows.
    if let (Some((user, password)), Some((u, p))) = (connect.login(), &shared.upstream.login) {
        use subtle::ConstantTimeEq;
        if user == u && bool::from(password.as_bytes().ct_eq(p.as_bytes())) {
            return role_of(crate::RoleName::Admin, None)
                .map(|r| (r, "node".to_string()))
                .map_err(|_| (Refusal::NotAuthorized, "no_credentials"));
        }
    }
    let creds = shared
        .credentials
        .read()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .clone();
    let Some(creds) = creds else {
        return anonymous();
    };
    // A verified certificate's identity wins over a username in CONNECT.
    if let Some(name) = cert_name {
        return match creds.user(&name) {
            Some(u) => Ok((u.role.clone(), name)),
            None => Err((Refusal::NotAuthorized, "unknown_certificate")),
        };
    }
    let Some((user, password)) = connect.login() else {
        return anonymous();
    };
    let password = password.as_bytes().to_vec();
    let Some(entry) = creds.user(user).cloned() else {
        // Same cost as a wrong password, so the answer's timing does not reveal user names.
        let _ = tokio::task::spawn_blocking(move || {
            crate::credentials::verify_for_unknown_user(&password)
        })
        .await;
        return Err((Refusal::BadCredentials, "unknown_user"));
    };
    let check = entry.clone();
    // Hash verification is slow on purpose: keep it off the async workers.
    let ok = tokio::task::spawn_blocking(move || check.verify_password(&password))
        .await
        .unwrap_or(false);
    if ok {
        Ok((entry.role, user.to_string()))
    } else {
        Err((Refusal::BadCredentials, "bad_password"))
    }
}

/// Acknowledges a PUBLISH the gate does not pass on, for the side that will never see it:
/// PUBACK for QoS 1, PUBREC for QoS 2 (whose packet id goes into `held`, so the PUBREL that
/// follows is answered here too). `reason` is the MQTT 5 reason the sender is told, if any.
/// How long a CONNECT waits for an older connection of its client id to finish before taking the
/// session over from it.
const TAKEOVER_PATIENCE: Duration = Duration::from_millis(200);

fn ack_unforwarded(
    version: Version,
    p: &packet::PublishView,
    reason: Option<packet::Denial>,
    back: &mut BytesMut,
    held: &mut HashSet<u16>,
) {
    match p.qos {
        1 => back.extend_from_slice(&packet::puback(version, p.pkid, reason)),
        2 => {
            back.extend_from_slice(&packet::pubrec(version, p.pkid, reason));
            held.insert(p.pkid);
        }
        _ => {}
    }
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

async fn dial(
    broker: &crate::upstream::Broker,
    deadline: tokio::time::Instant,
    connect: &Connect,
    keepalive_off: u16,
    login: Option<&(String, String)>,
    clean_start: bool,
    conn: u64,
) -> std::io::Result<BrokerStream> {
    let mut s = tokio::time::timeout_at(deadline, broker.connect())
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timed out"))??;
    let first = connect
        .encode_for_upstream(keepalive_off, login, clean_start, conn)
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e.to_string()))?;
    s.write_all(&first).await?;
    Ok(s)
}

/// Ends the broker's session of `upstream_id` (a clean-start connect, then DISCONNECT). A
/// failure is logged: the session then lasts until the next clean start of that client id.
async fn end_at_broker(shared: &Shared, upstream_id: &str) {
    let attempt = async {
        let mut s = shared.upstream.broker.connect().await?;
        let hello = packet::session_connect(upstream_id, shared.upstream.login.as_ref(), true, 10)
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e.to_string()))?;
        s.write_all(&hello).await?;
        // The CONNACK: the broker has dropped the old session by then.
        let mut ack = [0u8; 4];
        s.read_exact(&mut ack[..2]).await?;
        let mut rest = vec![0u8; usize::from(ack[1])];
        s.read_exact(&mut rest).await?;
        s.write_all(&packet::DISCONNECT_NORMAL).await?;
        // The broker closes after a DISCONNECT; waiting for that keeps its log quiet.
        let mut sink = [0u8; 64];
        while s.read(&mut sink).await? > 0 {}
        std::io::Result::Ok(())
    };
    match tokio::time::timeout(Duration::from_secs(5), attempt).await {
        Ok(Ok(())) => debug!(client = %upstream_id, "session ended at the broker"),
        Ok(Err(e)) => {
            warn!(client = %upstream_id, error = %e, "could not end a session at the broker")
        }
        Err(_) => warn!(client = %upstream_id, "could not end a session at the broker: timed out"),
    }
}

impl Shared {
    /// Stores `client`'s session as the table has it now (or forgets it).
    fn persist(&self, client: &str) {
        let Some(store) = self.session_store.get() else {
            return;
        };
        let s = lock(&self.sessions).stored(client, std::time::Instant::now(), now_ms());
        match s {
            Some(s) => store.put(client, &s),
            None => store.remove(client),
        }
    }
}

/// Puts the stored sessions back: into the table, and at the broker (each client id's session
/// with its filters subscribed, by its keeper), so what is published from now on is queued for
/// them.
pub(crate) async fn restore_sessions(shared: &Arc<Shared>) {
    let Some(store) = shared.session_store.get().cloned() else {
        return;
    };
    let stored = store.load();
    let (now, ms) = (std::time::Instant::now(), now_ms());
    let mut back = Vec::new();
    {
        let mut table = lock(&shared.sessions);
        for (id, s) in stored {
            if table.restore(&id, &s, now, ms) {
                lock(&shared.client_ids).hold_kept(&s.client_id, &s.identity);
                let subs = table.unheld(&id).cloned().unwrap_or_default();
                back.push((id, subs));
            } else {
                store.remove(&id);
            }
        }
    }
    crate::keeper::restore(shared, back).await;
}

/// Starts the gate's hold of `client`'s session when it is kept and nobody holds it (its last
/// connection, `conn`, has just ended).
fn keep_while_away(shared: &Arc<Shared>, client: &str, conn: u64) {
    let store_queues = shared.session_store.get().is_some_and(|s| s.keeps_queues());
    if !store_queues {
        // The broker keeps the messages in memory.
        return;
    }
    let table = lock(&shared.sessions);
    if let Some(subs) = table.unheld(client) {
        shared
            .keepers
            .start(shared, client, conn, subs.clone(), false, None);
    }
}

/// On a connection of the gate's own to the broker: SUBSCRIBEs `filters` and returns the
/// retained messages the broker sends for them. rumqttd sends those right after the SUBACK,
/// ahead of any live message (which comes with the retain flag cleared), so the first live
/// delivery, or `quiet` without traffic, ends it. (Waiting for quiet alone never ended while
/// publishers kept the filter busy, and the client's connection waited with it, up to 5 s:
/// measured, a QoS 1 subscriber at 5k msg/s got 3,200 msg/s and lost a third.)
async fn subscribe_for_retained(
    s: &mut BrokerStream,
    filters: Vec<rumqttc::v5::mqttbytes::v5::Filter>,
    quiet: Duration,
) -> std::io::Result<Vec<rumqttc::v5::mqttbytes::v5::Publish>> {
    let bad = |e: PacketError| std::io::Error::new(std::io::ErrorKind::InvalidData, e.to_string());
    let mut subscribed = filters.is_empty();
    if !subscribed {
        let sub = rumqttc::v5::mqttbytes::v5::Subscribe {
            pkid: 1,
            filters,
            properties: None,
        };
        s.write_all(&packet::write_v5_subscribe(&sub).map_err(bad)?)
            .await?;
    }
    let mut got = Vec::new();
    let mut buf = BytesMut::with_capacity(4096);
    loop {
        let wait = if subscribed {
            quiet
        } else {
            Duration::from_secs(2)
        };
        match tokio::time::timeout(wait, s.read_buf(&mut buf)).await {
            Err(_) if subscribed => return Ok(got),
            Err(_) => return Err(std::io::Error::other("no SUBACK from the broker")),
            Ok(r) => {
                if r? == 0 {
                    return Err(std::io::Error::other("the broker closed"));
                }
            }
        }
        let mut back = BytesMut::new();
        let mut live = false;
        while let Some(f) =
            packet::next_frame(&mut buf, Version::V5, UPSTREAM_MAX_PACKET).map_err(bad)?
        {
            match f.kind {
                Kind::SubAck => subscribed = true,
                Kind::Publish => {
                    let p = f.publish_v5().map_err(bad)?;
                    match p.qos as u8 {
                        1 => back.extend_from_slice(&packet::puback(Version::V5, p.pkid, None)),
                        2 => back.extend_from_slice(&packet::pubrec(Version::V5, p.pkid, None)),
                        _ => {}
                    }
                    if p.retain {
                        got.push(p);
                    } else {
                        live = true;
                    }
                }
                Kind::PubRel => {
                    let pkid = f.pubrel_pkid().map_err(bad)?;
                    back.extend_from_slice(&packet::pubcomp(Version::V5, pkid));
                }
                _ => {}
            }
        }
        s.write_all(&back).await?;
        if live && subscribed {
            return Ok(got);
        }
    }
}

/// The gate's own deliveries to one client, outstanding: packet ids above the broker's (rumqttd
/// numbers its deliveries 1 to 100), with the QoS 2 ones' state.
#[derive(Debug, Default)]
struct OwnDeliveries {
    next: u16,
    /// Packet id → (QoS, PUBREC received).
    out: HashMap<u16, (u8, bool)>,
    /// Packet id → the queued message (its place in the session's queue) it delivers.
    from_queue: HashMap<u16, u64>,
}

/// What became of one of the gate's own deliveries ([`Conn::send_own`]).
enum Own {
    Sent,
    /// Not for this client (its topic, or its size): never to be sent to it.
    Refused,
    /// Could not be encoded.
    Unwritable,
    /// Every one of the gate's packet ids is in use.
    NoPacketId,
}

/// The first packet id the gate uses for its own deliveries.
const OWN_PKIDS: u16 = 1000;

impl OwnDeliveries {
    /// A free packet id for a delivery at `qos` (`None`: every one is in use).
    fn next(&mut self, qos: u8) -> Option<u16> {
        for _ in OWN_PKIDS..=u16::MAX {
            self.next = if self.next < OWN_PKIDS || self.next == u16::MAX {
                OWN_PKIDS
            } else {
                self.next + 1
            };
            if !self.out.contains_key(&self.next) {
                self.out.insert(self.next, (qos, false));
                return Some(self.next);
            }
        }
        None
    }

    /// Gives `pkid` back unused (its delivery was not sent).
    fn release(&mut self, pkid: u16) {
        self.out.remove(&pkid);
        self.from_queue.remove(&pkid);
    }

    /// The client's PUBREC for `pkid`: `true` when it is one of ours (a PUBREL goes back).
    fn received(&mut self, pkid: u16) -> bool {
        match self.out.get_mut(&pkid) {
            Some((2, rec)) => {
                *rec = true;
                true
            }
            _ => false,
        }
    }

    /// The client's PUBACK or PUBCOMP (`kind`) for `pkid`: `Some` when it ends one of ours,
    /// with the queued message it delivered, if it was one.
    fn done(&mut self, pkid: u16, kind: Kind) -> Option<Option<u64>> {
        let ends = matches!(
            (self.out.get(&pkid), kind),
            (Some((1, _)), Kind::PubAck) | (Some((2, _)), Kind::PubComp)
        );
        if !ends {
            return None;
        }
        self.out.remove(&pkid);
        Some(self.from_queue.remove(&pkid))
    }
}

/// The retained messages matching `filter`, fetched from the broker on a connection of the
/// gate's own (a clean session subscribing the filter at QoS 0, to which rumqttd sends up to
/// `max_outgoing_packet_count`, 10,000, of them). Empty when that fails (logged).
async fn fetch_retained(
    shared: &Shared,
    conn: u64,
    filter: &str,
) -> Vec<rumqttc::v5::mqttbytes::v5::Publish> {
    use rumqttc::v5::mqttbytes::v5 as m5;
    // No client id encodes to this (the gate's encoding writes `%` only before two hex digits).
    let id = format!("%retained-{conn}");
    let attempt = async {
        let bad =
            |e: PacketError| std::io::Error::new(std::io::ErrorKind::InvalidData, e.to_string());
        let mut s = shared.upstream.broker.connect().await?;
        s.write_all(
            &packet::session_connect(&id, shared.upstream.login.as_ref(), true, 10).map_err(bad)?,
        )
        .await?;
        // The retained messages follow the SUBACK at once; a short quiet ends the fetch.
        // QoS 0: rumqttd sends a QoS 0 subscription up to 10,000 retained messages, a QoS 1/2
        // one no more than its free in-flight slots.
        let filters = vec![m5::Filter::new(filter.to_string(), packet::qos5(0))];
        let got = subscribe_for_retained(&mut s, filters, Duration::from_millis(50)).await?;
        s.write_all(&packet::DISCONNECT_NORMAL).await?;
        std::io::Result::Ok(got)
    };
    match tokio::time::timeout(Duration::from_secs(5), attempt).await {
        Ok(Ok(got)) => got,
        Ok(Err(e)) => {
            warn!(filter, error = %e, "could not fetch retained messages for a re-subscription");
            Vec::new()
        }
        Err(_) => {
            warn!(
                filter,
                "could not fetch retained messages for a re-subscription: timed out"
            );
            Vec::new()
        }
    }
}

/// Ends, once a second, the sessions whose expiry ran out while nobody held them.
pub(crate) async fn end_expired_sessions(shared: Arc<Shared>, shutdown: CancellationToken) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            _ = shutdown.cancelled() => return,
        }
        let gone = lock(&shared.sessions).expired(std::time::Instant::now());
        for id in gone {
            shared.keepers.stop(&id).await;
            end_at_broker(&shared, &id).await;
            lock(&shared.sessions).cleared(&id);
            shared.persist(&id);
        }
    }
}

struct Conn<'a> {
    shared: &'a Shared,
    role: Role,
    version: Version,
    client_id: &'a str,
    /// The client id the session table knows the session by (the upstream one); `None` for a
    /// connection without a client id, which has no session to come back to.
    session_id: Option<String>,
    /// The session's clock has started (at DISCONNECT, or at the end).
    session_closed: std::sync::atomic::AtomicBool,
    /// This connection's number ([`Origin::conn`] of what it publishes).
    conn_id: u64,
    /// The CONNACK's Session Present, as the gate's session table says.
    session_present: bool,
    /// The client's subscriptions with their options (the broker knows only filter and QoS).
    subs: Mutex<Subscriptions>,
    /// Seconds the session outlives the connection (the CONNECT's; an MQTT 5 DISCONNECT may
    /// change it).
    expiry: std::sync::atomic::AtomicU32,
    /// QoS 2 deliveries sent to the client at QoS 1 (its publish was QoS 1): the client's PUBACK
    /// becomes the PUBREC the broker waits for.
    qos2_as_qos1: Mutex<HashSet<u16>>,
    /// QoS 2 deliveries whose PUBREC the gate sent for the client (withheld, or sent at a lower
    /// QoS): the broker's PUBREL is answered here.
    withheld_qos2: Mutex<HashSet<u16>>,
    /// Acknowledgements to the broker, held to its order (see [`crate::acks`]); held while they
    /// are written, so the two directions' acknowledgements do not overtake each other.
    acks: tokio::sync::Mutex<AckOrder>,
    /// Deliveries the gate sends the client itself (retained messages again for a
    /// re-subscription), under packet ids the broker never uses.
    own_deliveries: Mutex<OwnDeliveries>,
    /// SUBSCRIBEs forwarded without some filters: packet id → which of the client's filters were
    /// allowed.
    pending_subacks: Mutex<HashMap<u16, Vec<bool>>>,
    /// The client turned keep-alive off: the gate pings the broker for it (every half of
    /// `limits.keepalive_off_upstream_s`) and keeps the answers to itself.
    keepalive_off: bool,
    /// PINGREQs the client sent that the broker has not answered yet (only those answers go to
    /// the client).
    client_pings: std::sync::atomic::AtomicU32,
    /// The client sent DISCONNECT: the broker ends the connection from its side.
    client_disconnected: std::sync::atomic::AtomicBool,
    /// The client's MQTT 5 Maximum Packet Size: larger deliveries are not sent to it (the spec
    /// has the server discard them as if delivered); rumqttd ignores it.
    client_max_packet: Option<usize>,
    /// The client's MQTT 5 Receive Maximum, when it set one.
    window: Option<Mutex<Window>>,
    /// What was queued for the session while the client was away: sent right after the
    /// CONNACK, before anything the broker sends.
    queued: Mutex<Vec<Queued>>,
}

type Writer<W> = tokio::sync::Mutex<W>;

/// An MQTT 5 client's Receive Maximum for the deliveries it gets: at most `max` QoS 1/2
/// publishes unacknowledged (until its PUBACK, or PUBCOMP for QoS 2); later ones wait here, in
/// order. rumqttd ignores the property. What waits is bounded by the broker's own in-flight
/// window for the connection (`mqtt.max_inflight_messages`), which the held deliveries keep
/// open. QoS 0 deliveries are not counted (the spec's quota is for QoS 1 and 2) and pass.
struct Window {
    max: usize,
    out: HashSet<u16>,
    held: std::collections::VecDeque<(u16, Bytes)>,
}

impl Window {
    fn new(max: u16) -> Window {
        Window {
            max: usize::from(max.max(1)),
            out: HashSet::new(),
            held: std::collections::VecDeque::new(),
        }
    }

    /// A QoS 1/2 delivery: `Some` to send now, `None` when it waits.
    fn offer(&mut self, pkid: u16, raw: Bytes) -> Option<Bytes> {
        // A resend of one outstanding (DUP) goes at once; nothing overtakes what waits.
        if self.out.contains(&pkid) || (self.held.is_empty() && self.out.len() < self.max) {
            self.out.insert(pkid);
            return Some(raw);
        }
        self.held.push_back((pkid, raw));
        None
    }

    /// The client acknowledged `pkid`: what may go now, in order.
    fn acked(&mut self, pkid: u16) -> Vec<Bytes> {
        let mut go = Vec::new();
        if self.out.remove(&pkid) {
            while self.out.len() < self.max {
                let Some((p, raw)) = self.held.pop_front() else {
                    break;
                };
                self.out.insert(p);
                go.push(raw);
            }
        }
        go
    }
}

/// What the client sent, on its way to the broker in the client's order.
enum ToBroker {
    /// Packets to write now (after whatever is ahead of them).
    Now(BytesMut),
    /// A publish on a stored topic, with its QoS: written once its commit resolves.
    Committed(Commit, Bytes, u8),
}

impl ToBroker {
    fn bytes(&self) -> usize {
        match self {
            ToBroker::Now(b) => b.len(),
            ToBroker::Committed(_, raw, _) => raw.len(),
        }
    }
}

/// Items between a connection's reader and its in-order writer. Each stored publish is one
/// item, so this bounds the commits a connection can have pending; when it is full the gate
/// stops reading the client (TCP back-pressure) instead of acknowledging ahead of the store.
const IN_ORDER_ITEMS: usize = 256;

/// Bytes waiting between a connection's reader and its in-order writer, at most (or one packet,
/// when `limits.max_packet_bytes` is larger): with [`IN_ORDER_ITEMS`] this bounds what one
/// connection holds in memory while its publishes wait for their commits.
const IN_ORDER_BYTES: usize = 4 * 1024 * 1024;

/// The reader's end of the in-order queue: each item holds permits for its bytes until the
/// writer has written it.
struct InOrder {
    tx: tokio::sync::mpsc::Sender<(ToBroker, tokio::sync::OwnedSemaphorePermit)>,
    bytes: Arc<tokio::sync::Semaphore>,
    capacity: usize,
}

impl InOrder {
    fn new(
        max_packet: usize,
    ) -> (
        InOrder,
        tokio::sync::mpsc::Receiver<(ToBroker, tokio::sync::OwnedSemaphorePermit)>,
    ) {
        let capacity = IN_ORDER_BYTES.max(max_packet + 16);
        let (tx, rx) = tokio::sync::mpsc::channel(IN_ORDER_ITEMS);
        let bytes = Arc::new(tokio::sync::Semaphore::new(capacity));
        (
            InOrder {
                tx,
                bytes,
                capacity,
            },
            rx,
        )
    }

    /// Queues `item`, waiting while the queue is full in items or bytes. `Err`: the writer is
    /// gone.
    async fn send(&self, item: ToBroker) -> Result<(), ()> {
        let want = item.bytes().clamp(1, self.capacity);
        let permit = self
            .bytes
            .clone()
            .acquire_many_owned(u32::try_from(want).unwrap_or(u32::MAX))
            .await
            .map_err(|_| ())?;
        self.tx.send((item, permit)).await.map_err(|_| ())
    }
}

/// Writes the client's packets to the broker in the order they came, each stored publish only
/// after its commit. A QoS 1/2 publish whose commit fails ends the connection unacknowledged
/// (the client sends it again after reconnecting); a QoS 0 one is dropped.
async fn forward_in_order<U: AsyncWrite + Unpin>(
    mut items: tokio::sync::mpsc::Receiver<(ToBroker, tokio::sync::OwnedSemaphorePermit)>,
    upstream: &Writer<U>,
    disconnected: &std::sync::atomic::AtomicBool,
) -> End {
    // The permit goes when the item is written (or dropped).
    while let Some((item, _permit)) = items.recv().await {
        let bytes = match item {
            ToBroker::Now(b) => b,
            ToBroker::Committed(commit, raw, qos) => match commit.await {
                Ok(()) => BytesMut::from(&raw[..]),
                // QoS 0 promises nothing: the message is dropped, the client stays.
                Err(e) if qos == 0 => {
                    debug!(error = %e, "QoS 0 publish not stored; dropped");
                    continue;
                }
                Err(e) => {
                    return End::Cut(Cut {
                        reason: "store_failed",
                        detail: format!(
                            "a publish could not be stored, so it is not acknowledged: {e}"
                        ),
                        v5: DisconnectReasonCode::UnspecifiedError,
                    })
                }
            },
        };
        if write(upstream, bytes).await.is_err() {
            return End::Closed;
        }
    }
    // The client's side ended and everything it sent is written. After a DISCONNECT the broker
    // closes its side itself (that ends the connection through `broker_to_client`); closing
    // ours first makes rumqttd log an error for a connection that ended normally.
    if disconnected.load(std::sync::atomic::Ordering::Relaxed) {
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    End::Closed
}

impl Conn<'_> {
    async fn relay(
        &self,
        client: ClientStream,
        client_buf: BytesMut,
        upstream: BrokerStream,
        shutdown: &CancellationToken,
    ) -> End {
        let (cr, cw) = tokio::io::split(client);
        let (ur, uw) = tokio::io::split(upstream);
        let cw = Writer::new(cw);
        let uw = Writer::new(uw);
        let (to_broker, in_order) = InOrder::new(self.shared.cfg.limits.max_packet_bytes);
        let end = tokio::select! {
            e = self.client_to_broker(cr, client_buf, to_broker, &cw, &uw) => e,
            e = forward_in_order(in_order, &uw, &self.client_disconnected) => e,
            e = self.broker_to_client(ur, &cw, &uw) => e,
            e = self.ping_for_client(&uw) => e,
            _ = shutdown.cancelled() => End::Shutdown,
        };
        let reason = match &end {
            End::Cut(c) => Some(c.v5),
            End::Shutdown => Some(DisconnectReasonCode::ServerShuttingDown),
            End::Closed => None,
        };
        let mut cw = cw.lock().await;
        if let Some(r) = reason {
            let bye = packet::disconnect(self.version, r);
            if !bye.is_empty() {
                let _ = tokio::time::timeout(Duration::from_secs(1), cw.write_all(&bye)).await;
            }
        }
        let _ = tokio::time::timeout(Duration::from_secs(1), cw.shutdown()).await;
        end
    }

    /// Keeps the broker session of a client without keep-alive alive: a PINGREQ every half
    /// keep-alive. Never ends for other clients.
    async fn ping_for_client<U: AsyncWrite + Unpin>(&self, upstream: &Writer<U>) -> End {
        if !self.keepalive_off {
            return std::future::pending().await;
        }
        let every =
            Duration::from_millis(u64::from(self.shared.cfg.limits.keepalive_off_upstream_s) * 500);
        loop {
            tokio::time::sleep(every).await;
            if upstream
                .lock()
                .await
                .write_all(&packet::PINGREQ)
                .await
                .is_err()
            {
                return End::Closed;
            }
        }
    }

    /// Reads the client's packets, checks them, and queues them for the broker in their order
    /// (see [`forward_in_order`]). When the client's side ends, the queue is closed and the
    /// writer finishes what it holds before the connection ends.
    async fn client_to_broker<R, C, U>(
        &self,
        mut reader: R,
        mut buf: BytesMut,
        to_broker: InOrder,
        client: &Writer<C>,
        upstream: &Writer<U>,
    ) -> End
    where
        R: AsyncRead + Unpin,
        C: AsyncWrite + Unpin,
        U: AsyncWrite + Unpin,
    {
        let limits = &self.shared.cfg.limits;
        let dir = self.shared.dir.as_ref();
        let mut aliases: HashMap<u16, String> = HashMap::new();
        let mut denied_qos2: HashSet<u16> = HashSet::new();
        // QoS 2 packet ids handed to the stores and not yet released: a redelivery (DUP) of one
        // of them is passed on but not stored a second time.
        let mut stored_qos2: HashSet<u16> = HashSet::new();
        let mut logged_pub = false;
        let mut logged_sub = false;
        loop {
            let mut out = BytesMut::new();
            let mut back = BytesMut::new();
            // The client's acknowledgements of deliveries, for the broker in its order.
            let mut acks: Vec<(Phase, u16, Bytes)> = Vec::new();
            // Filters whose retained messages the gate sends itself (fetched from the broker).
            let mut resend: Vec<(String, u8)> = Vec::new();
            let mut yielded = false;
            loop {
                let frame =
                    match packet::next_frame(&mut buf, self.version, limits.max_packet_bytes) {
                        Ok(Some(f)) => f,
                        Ok(None) => break,
                        Err(e) => return End::Cut(Cut::packet(e)),
                    };
                match frame.kind {
                    Kind::Publish => {
                        // Decoded once: the view for the checks, the whole packet for the broker.
                        let decoded = match frame.publish_v5() {
                            Ok(p) => p,
                            Err(e) => return End::Cut(Cut::packet(e)),
                        };
                        let p = match packet::PublishView::of(&decoded) {
                            Ok(p) => p,
                            Err(e) => return End::Cut(Cut::packet(e)),
                        };
                        if p.topic_alias == Some(0) {
                            // [MQTT-3.3.2-8]: 0 is not a topic alias; the spec's answer is a
                            // DISCONNECT 0x94 (rumqttd closes without a reason).
                            return End::Cut(Cut {
                                reason: "topic_alias_invalid",
                                detail: "PUBLISH with topic alias 0".into(),
                                v5: DisconnectReasonCode::TopicAliasInvalid,
                            });
                        }
                        let topic = if p.topic.is_empty() {
                            match p.topic_alias.and_then(|a| aliases.get(&a)) {
                                Some(t) => t.clone(),
                                None => {
                                    return End::Cut(Cut::protocol(
                                        "PUBLISH with an unknown topic alias",
                                    ))
                                }
                            }
                        } else {
                            p.topic.clone()
                        };
                        if topic.len() > limits.max_topic_len {
                            return End::Cut(Cut::topic_too_long(
                                topic.len(),
                                limits.max_topic_len,
                            ));
                        }
                        let allowed = acl::may_publish(&self.role, &topic, dir)
                            && p.response_topic
                                .as_deref()
                                .is_none_or(|rt| acl::may_receive(&self.role, rt, dir));
                        // Checked after the ACL, so a denied publish spends no budget.
                        let within_budget = !allowed
                            || acl::bounded_by_registry(&topic, dir)
                            || self.shared.topics.admit(&topic);
                        let denial = if !allowed {
                            Some(packet::Denial::NotAuthorized)
                        } else if !within_budget {
                            Some(packet::Denial::QuotaExceeded)
                        } else {
                            None
                        };
                        if denial.is_none() {
                            if let (Some(a), false) = (p.topic_alias, p.topic.is_empty()) {
                                aliases.insert(a, p.topic.clone());
                            }
                            // A SUBSCRIBE another client sent before this publish takes effect
                            // first (see `subscribing`). Once per read, the other connections
                            // that became readable with this one are read first: their
                            // SUBSCRIBEs are then known here.
                            if !yielded {
                                yielded = true;
                                tokio::task::yield_now().await;
                            }
                            self.shared
                                .subscribing
                                .before_publish(self.conn_id, &topic)
                                .await;
                            let up = match self.for_broker(decoded) {
                                Ok(b) => b,
                                Err(e) => return End::Cut(Cut::packet(e)),
                            };
                            let redelivered = p.qos == 2 && stored_qos2.contains(&p.pkid);
                            let commit = if redelivered {
                                None
                            } else {
                                self.shared
                                    .intake
                                    .submit(&topic, p.payload.clone(), p.retain)
                                    .await
                            };
                            match commit {
                                None => out.extend_from_slice(&up),
                                Some(commit) => {
                                    if p.qos == 2 {
                                        stored_qos2.insert(p.pkid);
                                    }
                                    let before = std::mem::take(&mut out);
                                    if !before.is_empty()
                                        && to_broker.send(ToBroker::Now(before)).await.is_err()
                                    {
                                        return End::Closed;
                                    }
                                    let item = ToBroker::Committed(commit, up, p.qos);
                                    if to_broker.send(item).await.is_err() {
                                        return End::Closed;
                                    }
                                }
                            }
                        } else {
                            let kind = if allowed { "topic_budget" } else { "publish" };
                            self.shared.metrics.deny(self.role.label(), kind);
                            if !logged_pub {
                                logged_pub = true;
                                if allowed {
                                    warn!(client = %self.client_id, topic = %topic, max = self.shared.topics.max, "PUBLISH refused: the node's budget of distinct topics (gate.limits.max_distinct_topics) is spent (further refusals for this client are only counted)");
                                } else {
                                    warn!(client = %self.client_id, role = self.role.label(), topic = %topic, "PUBLISH denied (further denials for this client are only counted)");
                                }
                            } else {
                                debug!(client = %self.client_id, topic = %topic, kind, "PUBLISH refused");
                            }
                            ack_unforwarded(self.version, &p, denial, &mut back, &mut denied_qos2);
                        }
                    }
                    Kind::PubRel => {
                        let pkid = match frame.pubrel_pkid() {
                            Ok(p) => p,
                            Err(e) => return End::Cut(Cut::packet(e)),
                        };
                        if denied_qos2.remove(&pkid) {
                            back.extend_from_slice(&packet::pubcomp(self.version, pkid));
                        } else {
                            stored_qos2.remove(&pkid);
                            out.extend_from_slice(&frame.raw);
                        }
                    }
                    Kind::Subscribe => {
                        let mut sub = match frame.subscribe_v5() {
                            Ok(s) => s,
                            Err(e) => return End::Cut(Cut::packet(e)),
                        };
                        let pkid = sub.pkid;
                        let filters: Vec<String> =
                            sub.filters.iter().map(|f| f.path.clone()).collect();
                        if let Some(f) = filters.iter().find(|f| f.len() > limits.max_topic_len) {
                            return End::Cut(Cut::topic_too_long(f.len(), limits.max_topic_len));
                        }
                        let permitted: Vec<bool> = filters
                            .iter()
                            .map(|f| acl::may_subscribe(&self.role, f, dir))
                            .collect();
                        let allowed: Vec<bool> = filters
                            .iter()
                            .zip(&permitted)
                            .map(|(f, p)| {
                                *p && self.shared.filters.admit(acl::strip_share(f).unwrap_or(f))
                            })
                            .collect();
                        {
                            let mut subs = lock(&self.subs);
                            let new = filters
                                .iter()
                                .zip(&allowed)
                                .filter(|(f, a)| **a && !subs.contains(f))
                                .count();
                            if subs.len() + new > limits.max_subscriptions_per_client {
                                return End::Cut(Cut {
                                    reason: "too_many_subscriptions",
                                    detail: format!(
                                        "more than limits.max_subscriptions_per_client {}",
                                        limits.max_subscriptions_per_client
                                    ),
                                    v5: DisconnectReasonCode::QuotaExceeded,
                                });
                            }
                            for ((fl, a), p) in sub.filters.iter().zip(&allowed).zip(&permitted) {
                                let f = &fl.path;
                                if *a {
                                    let (rh, qos) = (retain_handling_of(fl), fl.qos as u8);
                                    let existed = subs.contains(f);
                                    // rumqttd sends retained messages only for a new filter, and
                                    // a QoS 1/2 one at most its in-flight window (100) of them;
                                    // those the gate sends itself, all of them.
                                    let gate_sends = !f.starts_with("$share/")
                                        && ((existed && rh == 0)
                                            || (!existed
                                                && rh != 2
                                                && qos > 0
                                                && f.contains(['+', '#'])));
                                    subs.subscribe(f, options_of(fl), rh);
                                    if gate_sends {
                                        subs.retained_from_gate(f);
                                        resend.push((f.clone(), qos));
                                    }
                                } else if *p {
                                    self.shared.metrics.deny(self.role.label(), "filter_budget");
                                    warn!(client = %self.client_id, filter = %f, max = self.shared.filters.max, "SUBSCRIBE refused: the node's budget of distinct filters (gate.limits.max_distinct_filters) is spent");
                                } else {
                                    self.shared.metrics.deny(self.role.label(), "subscribe");
                                    if !logged_sub {
                                        logged_sub = true;
                                        warn!(client = %self.client_id, role = self.role.label(), filter = %f, "SUBSCRIBE denied (further denials for this client are only counted)");
                                    } else {
                                        debug!(client = %self.client_id, filter = %f, "SUBSCRIBE denied");
                                    }
                                }
                            }
                        }
                        self.subscriptions_changed();
                        if !allowed.iter().any(|a| *a) {
                            back.extend_from_slice(&packet::suback_all_denied(
                                self.version,
                                pkid,
                                filters.len(),
                            ));
                        } else {
                            if !allowed.iter().all(|a| *a) {
                                lock(&self.pending_subacks).insert(pkid, allowed.clone());
                                let mut keep = allowed.iter();
                                sub.filters
                                    .retain(|_| keep.next().copied().unwrap_or(false));
                            }
                            match packet::write_v5_subscribe(&sub) {
                                Ok(b) => out.extend_from_slice(&b),
                                Err(e) => return End::Cut(Cut::packet(e)),
                            }
                            self.shared.subscribing.sent(
                                self.conn_id,
                                pkid,
                                sub.filters.iter().map(|f| f.path.clone()).collect(),
                            );
                        }
                    }
                    Kind::Unsubscribe => {
                        let uns = match frame.unsubscribe_v5() {
                            Ok(u) => u,
                            Err(e) => return End::Cut(Cut::packet(e)),
                        };
                        {
                            let mut subs = lock(&self.subs);
                            for f in &uns.filters {
                                subs.unsubscribe(f);
                            }
                        }
                        self.subscriptions_changed();
                        match packet::write_v5_unsubscribe(&uns) {
                            Ok(b) => out.extend_from_slice(&b),
                            Err(e) => return End::Cut(Cut::packet(e)),
                        }
                    }
                    Kind::Connect => return End::Cut(Cut::protocol("second CONNECT")),
                    Kind::Auth => {
                        return End::Cut(Cut::protocol("AUTH (re-authentication) is not supported"))
                    }
                    Kind::ConnAck | Kind::SubAck | Kind::UnsubAck | Kind::PingResp => {
                        return End::Cut(Cut::protocol("server-only packet from a client"))
                    }
                    Kind::PingReq => {
                        self.client_pings
                            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        out.extend_from_slice(&frame.raw);
                    }
                    Kind::Disconnect => {
                        self.client_disconnected
                            .store(true, std::sync::atomic::Ordering::Relaxed);
                        match frame.disconnect_session_expiry() {
                            // [MQTT-3.14.2-2]: a session that was to end with the connection
                            // cannot be given an expiry at DISCONNECT; that one is ignored.
                            Ok(Some(e))
                                if self.expiry.load(std::sync::atomic::Ordering::Relaxed) > 0 =>
                            {
                                self.expiry.store(e, std::sync::atomic::Ordering::Relaxed)
                            }
                            Ok(_) => {}
                            Err(e) => return End::Cut(Cut::packet(e)),
                        }
                        // At once, not when the broker has closed: a client that reconnects
                        // right after its DISCONNECT finds the session as that left it.
                        self.close_session();
                        if frame.raw[..] == [0xE0, 0x01, 0x00] {
                            // [MQTT-3.14.2.1]: reason 0x00 (normal disconnection, the will is
                            // not sent) may come as one byte with the properties left out;
                            // rumqttd takes that form for a broken connection and publishes the
                            // will. The same disconnect in the form it reads:
                            out.extend_from_slice(&packet::DISCONNECT_NORMAL);
                        } else {
                            out.extend_from_slice(&frame.raw);
                        }
                    }
                    Kind::PubAck | Kind::PubComp => {
                        let pkid = match frame.ack_pkid() {
                            Ok(p) => p,
                            Err(e) => return End::Cut(Cut::packet(e)),
                        };
                        let own = lock(&self.own_deliveries).done(pkid, frame.kind);
                        if let Some(queued) = own {
                            // One of the gate's own deliveries: nothing for the broker.
                            if let (Some(seq), Some(id), Some(store)) =
                                (queued, &self.session_id, self.shared.session_store.get())
                            {
                                store.dequeue(id, seq);
                            }
                        } else if frame.kind == Kind::PubComp {
                            acks.push((Phase::Second, pkid, frame.raw.clone()));
                        } else if lock(&self.qos2_as_qos1).remove(&pkid) {
                            // A QoS 2 delivery the client got at QoS 1: its PUBACK is the
                            // PUBREC the broker waits for, and the broker's PUBREL is ours.
                            acks.push((
                                Phase::First,
                                pkid,
                                packet::pubrec(Version::V5, pkid, None),
                            ));
                            lock(&self.withheld_qos2).insert(pkid);
                        } else {
                            acks.push((Phase::First, pkid, frame.raw.clone()));
                        }
                        if let Some(w) = &self.window {
                            for raw in lock(w).acked(pkid) {
                                back.extend_from_slice(&raw);
                            }
                        }
                    }
                    // 3.1.1 acknowledgements are valid MQTT 5 ones (success, no properties).
                    Kind::PubRec => {
                        let pkid = match frame.ack_pkid() {
                            Ok(p) => p,
                            Err(e) => return End::Cut(Cut::packet(e)),
                        };
                        if lock(&self.own_deliveries).received(pkid) {
                            back.extend_from_slice(&packet::pubrel(self.version, pkid));
                        } else {
                            acks.push((Phase::First, pkid, frame.raw.clone()));
                        }
                    }
                }
            }
            if !resend.is_empty() {
                // After the SUBSCRIBE itself, so the SUBACK comes first.
                if !out.is_empty()
                    && to_broker
                        .send(ToBroker::Now(std::mem::take(&mut out)))
                        .await
                        .is_err()
                {
                    return End::Closed;
                }
                for (filter, max_qos) in resend {
                    let retained = fetch_retained(self.shared, self.conn_id, &filter).await;
                    for p in retained {
                        self.deliver_own(p, max_qos, &mut back);
                    }
                }
            }
            if !acks.is_empty() {
                let mut order = self.acks.lock().await;
                let mut up = BytesMut::new();
                for (phase, pkid, ack) in acks {
                    if !order.ready(phase, pkid, ack.clone(), &mut up) {
                        up.extend_from_slice(&ack);
                    }
                }
                if write(upstream, up).await.is_err() {
                    return End::Closed;
                }
            }
            if !out.is_empty() && to_broker.send(ToBroker::Now(out)).await.is_err() {
                return End::Closed;
            }
            if write(client, back).await.is_err() {
                return End::Closed;
            }
            match reader.read_buf(&mut buf).await {
                Ok(0) | Err(_) => {
                    // What was read still goes to the broker: the writer ends the connection.
                    drop(to_broker);
                    return std::future::pending().await;
                }
                Ok(_) => {}
            }
        }
    }

    /// Starts the session's clock (once): from now it lasts its expiry, unless a CONNECT of the
    /// client id takes it up again.
    fn close_session(&self) {
        let Some(id) = &self.session_id else {
            return;
        };
        if self
            .session_closed
            .swap(true, std::sync::atomic::Ordering::Relaxed)
        {
            return;
        }
        let subs = lock(&self.subs).clone();
        let expiry = self.expiry.load(std::sync::atomic::Ordering::Relaxed);
        lock(&self.shared.sessions).close(
            id,
            self.conn_id,
            expiry,
            subs,
            std::time::Instant::now(),
        );
        self.shared.persist(id);
    }

    /// Keeps a kept session's subscriptions in the session table (and its store) as they are
    /// now.
    fn subscriptions_changed(&self) {
        let Some(id) = &self.session_id else {
            return;
        };
        let subs = lock(&self.subs).clone();
        if lock(&self.shared.sessions).update_subs(id, self.conn_id, &subs) {
            self.shared.persist(id);
        }
    }

    /// Sends the client a retained message the gate fetched itself, at min(publish QoS,
    /// `max_qos`) under one of the gate's own packet ids (rumqttd's copies of the retained
    /// messages for that subscription are withheld, see [`Subscriptions::retained_from_gate`]).
    fn deliver_own(
        &self,
        mut p: rumqttc::v5::mqttbytes::v5::Publish,
        max_qos: u8,
        out: &mut BytesMut,
    ) {
        let origin = p
            .properties
            .as_mut()
            .and_then(|pr| Origin::take(&mut pr.user_properties));
        // The fetch subscribed at QoS 0 (so the broker sends them all): the publish's own QoS
        // is in its origin; the node's own publications go at the subscription's.
        let qos = max_qos.min(origin.map_or(max_qos, |o| o.qos));
        p.qos = packet::qos5(qos);
        p.retain = true;
        p.dup = false;
        if let Some(pr) = p.properties.as_mut() {
            pr.topic_alias = None;
            pr.subscription_identifiers.clear();
        }
        let _ = self.send_own(p, None, out);
    }

    /// Sends the client what was queued for its session while it was away, oldest first,
    /// under the gate's own packet ids; each leaves the queue when the client acknowledges it.
    fn deliver_queued(&self, out: &mut BytesMut) {
        let queued = std::mem::take(&mut *lock(&self.queued));
        if queued.is_empty() {
            return;
        }
        let (Some(id), Some(store)) = (&self.session_id, self.shared.session_store.get()) else {
            return;
        };
        let now = now_ms();
        let (mut sent, mut gone) = (0usize, 0usize);
        for q in queued {
            let mut raw = BytesMut::from(&q.publish[..]);
            let decoded = packet::next_frame(&mut raw, Version::V5, UPSTREAM_MAX_PACKET)
                .ok()
                .flatten()
                .and_then(|f| f.publish_v5().ok());
            let Some(mut p) = decoded else {
                warn!(client = %self.client_id, seq = q.seq, "a queued message does not read; dropped");
                store.dequeue(id, q.seq);
                gone += 1;
                continue;
            };
            if q.expires_at_ms.is_some_and(|at| at <= now) {
                store.dequeue(id, q.seq);
                gone += 1;
                continue;
            }
            if let Some(at) = q.expires_at_ms {
                let left = u32::try_from((at - now).div_ceil(1000)).unwrap_or(u32::MAX);
                p.properties
                    .get_or_insert_with(Default::default)
                    .message_expiry_interval = Some(left);
            }
            match self.send_own(p, Some(q.seq), out) {
                Own::Sent => sent += 1,
                Own::Refused => {
                    store.dequeue(id, q.seq);
                    gone += 1;
                }
                Own::Unwritable => {}
                // The rest wait for the next connection.
                Own::NoPacketId => break,
            }
        }
        debug!(client = %self.client_id, sent, dropped = gone, "queued messages sent to a resumed session");
    }

    /// Sends `p` (its QoS, retain flag and properties as the client is to get them) under one
    /// of the gate's own packet ids, remembering the queued message `seq` it delivers, if any.
    /// It is refused when the client may not receive its topic or it is larger than the
    /// client's Maximum Packet Size (as the spec has it: discarded as if delivered).
    fn send_own(
        &self,
        mut p: rumqttc::v5::mqttbytes::v5::Publish,
        seq: Option<u64>,
        out: &mut BytesMut,
    ) -> Own {
        let topic = String::from_utf8_lossy(&p.topic);
        if self.role != Role::Admin
            && !acl::may_receive(&self.role, &topic, self.shared.dir.as_ref())
        {
            return Own::Refused;
        }
        let qos = p.qos as u8;
        p.pkid = if qos == 0 {
            0
        } else {
            let mut own = lock(&self.own_deliveries);
            let Some(pkid) = own.next(qos) else {
                return Own::NoPacketId;
            };
            if let Some(seq) = seq {
                own.from_queue.insert(pkid, seq);
            }
            pkid
        };
        let Ok(bytes) = packet::write_publish(self.version, &p) else {
            lock(&self.own_deliveries).release(p.pkid);
            return Own::Unwritable;
        };
        if self.client_max_packet.is_some_and(|max| bytes.len() > max) {
            lock(&self.own_deliveries).release(p.pkid);
            return Own::Refused;
        }
        self.deliver(qos, p.pkid, bytes, out);
        Own::Sent
    }

    /// A client PUBLISH as the broker gets it: MQTT 5, marked with its [`Origin`].
    fn for_broker(&self, mut p: rumqttc::v5::mqttbytes::v5::Publish) -> Result<Bytes, PacketError> {
        let props = p.properties.get_or_insert_with(Default::default);
        Origin {
            qos: p.qos as u8,
            retain: p.retain,
            conn: self.conn_id,
            expires_at_ms: props
                .message_expiry_interval
                .map(|s| now_ms().saturating_add(u64::from(s) * 1000)),
        }
        .attach(&mut props.user_properties);
        packet::write_publish(Version::V5, &p)
    }

    /// Acknowledges to the broker a delivery the client does not get: PUBACK for QoS 1; PUBREC
    /// for QoS 2, whose PUBREL is then answered here.
    fn ack_for_broker(&self, order: &mut AckOrder, qos: u8, pkid: u16, back: &mut BytesMut) {
        let ack = match qos {
            1 => packet::puback(Version::V5, pkid, None),
            2 => {
                lock(&self.withheld_qos2).insert(pkid);
                packet::pubrec(Version::V5, pkid, None)
            }
            _ => return,
        };
        if !order.ready(Phase::First, pkid, ack.clone(), back) {
            back.extend_from_slice(&ack);
        }
    }

    /// Puts a delivery the client may receive into `out`, or into the Receive Maximum window's
    /// wait when the client has as many unacknowledged as it asked for.
    fn deliver(&self, qos: u8, pkid: u16, raw: Bytes, out: &mut BytesMut) {
        match (&self.window, qos) {
            (Some(w), 1 | 2) => {
                if let Some(raw) = lock(w).offer(pkid, raw) {
                    out.extend_from_slice(&raw);
                }
            }
            _ => out.extend_from_slice(&raw),
        }
    }

    async fn broker_to_client<C, U>(
        &self,
        mut reader: tokio::io::ReadHalf<BrokerStream>,
        client: &Writer<C>,
        upstream: &Writer<U>,
    ) -> End
    where
        C: AsyncWrite + Unpin,
        U: AsyncWrite + Unpin,
    {
        let dir = self.shared.dir.as_ref();
        let mut buf = BytesMut::with_capacity(8192);
        // The broker's topic aliases, and those the client has been told (a withheld delivery
        // may have been the one that set an alias up).
        let mut aliases: HashMap<u16, String> = HashMap::new();
        let mut told: HashSet<u16> = HashSet::new();
        let inspect = self.role != Role::Admin;
        loop {
            match reader.read_buf(&mut buf).await {
                Ok(0) | Err(_) => return End::Closed,
                Ok(_) => {}
            }
            let mut out = BytesMut::new();
            let mut back = BytesMut::new();
            let mut order = self.acks.lock().await;
            loop {
                let frame = match packet::next_frame(&mut buf, Version::V5, UPSTREAM_MAX_PACKET) {
                    Ok(Some(f)) => f,
                    Ok(None) => break,
                    Err(e) => {
                        warn!(client = %self.client_id, error = %e, "bad packet from the upstream broker");
                        return End::Closed;
                    }
                };
                let converted = match frame.kind {
                    Kind::Publish => {
                        let Ok(mut p) = frame.publish_v5() else {
                            return End::Closed;
                        };
                        let alias = p.properties.as_ref().and_then(|pr| pr.topic_alias);
                        let topic = if p.topic.is_empty() {
                            alias.and_then(|a| aliases.get(&a)).cloned()
                        } else {
                            let t = String::from_utf8(p.topic.to_vec()).ok();
                            if let (Some(a), Some(t)) = (alias, &t) {
                                aliases.insert(a, t.clone());
                            }
                            t
                        };
                        let Some(topic) = topic else {
                            return End::Closed;
                        };
                        let origin = p
                            .properties
                            .as_mut()
                            .and_then(|pr| Origin::take(&mut pr.user_properties));
                        let (broker_qos, pkid) = (p.qos as u8, p.pkid);
                        if broker_qos > 0 {
                            order.sent(Phase::First, pkid);
                        }
                        if inspect && !acl::may_receive(&self.role, &topic, dir) {
                            self.shared.metrics.deny(self.role.label(), "deliver");
                            debug!(client = %self.client_id, topic = %topic, "delivery withheld");
                            self.ack_for_broker(&mut order, broker_qos, pkid, &mut back);
                            continue;
                        }
                        let verdict = lock(&self.subs).verdict(
                            self.conn_id,
                            &topic,
                            broker_qos,
                            p.retain,
                            origin,
                            now_ms(),
                        );
                        let (qos, retain, left) = match verdict {
                            Verdict::Deliver {
                                qos,
                                retain,
                                expiry_left_s,
                            } => (qos, retain, expiry_left_s),
                            Verdict::Withhold | Verdict::Expired => {
                                debug!(client = %self.client_id, topic = %topic, ?verdict, "delivery not for this client");
                                self.ack_for_broker(&mut order, broker_qos, pkid, &mut back);
                                continue;
                            }
                        };
                        p.retain = retain;
                        p.qos = packet::qos5(qos);
                        if qos == 0 {
                            p.pkid = 0;
                        }
                        if let Some(pr) = p.properties.as_mut() {
                            if left.is_some() {
                                pr.message_expiry_interval = left;
                            }
                        }
                        if let Some(a) = alias {
                            if p.topic.is_empty() && !told.contains(&a) {
                                p.topic = Bytes::from(topic.clone());
                            }
                            if !p.topic.is_empty() {
                                told.insert(a);
                            }
                        }
                        let Ok(bytes) = packet::write_publish(self.version, &p) else {
                            return End::Closed;
                        };
                        if self.client_max_packet.is_some_and(|max| bytes.len() > max) {
                            self.shared
                                .metrics
                                .deny(self.role.label(), "oversize_delivery");
                            debug!(client = %self.client_id, topic = %topic, bytes = bytes.len(), "delivery larger than the client's Maximum Packet Size discarded");
                            // Acknowledged for the client, so the broker does not send it again.
                            self.ack_for_broker(&mut order, broker_qos, pkid, &mut back);
                            continue;
                        }
                        // Sent at a lower QoS than the broker's: the gate finishes the broker's
                        // side of the exchange.
                        match (broker_qos, qos) {
                            (1, 0) | (2, 0) => {
                                self.ack_for_broker(&mut order, broker_qos, pkid, &mut back)
                            }
                            (2, 1) => {
                                lock(&self.qos2_as_qos1).insert(pkid);
                            }
                            _ => {}
                        }
                        self.deliver(qos, p.pkid, bytes, &mut out);
                        continue;
                    }
                    Kind::PubRel => {
                        let Ok(pkid) = frame.pubrel_pkid() else {
                            return End::Closed;
                        };
                        order.sent(Phase::Second, pkid);
                        if lock(&self.withheld_qos2).remove(&pkid) {
                            let comp = packet::pubcomp(Version::V5, pkid);
                            if !order.ready(Phase::Second, pkid, comp.clone(), &mut back) {
                                back.extend_from_slice(&comp);
                            }
                            continue;
                        }
                        frame.ack_for(self.version)
                    }
                    Kind::PubAck | Kind::PubRec | Kind::PubComp | Kind::UnsubAck => {
                        frame.ack_for(self.version)
                    }
                    Kind::SubAck => {
                        let Ok(s) = frame.suback_v5() else {
                            return End::Closed;
                        };
                        self.shared.subscribing.answered(self.conn_id, s.pkid);
                        let pending = lock(&self.pending_subacks).remove(&s.pkid);
                        packet::suback_for(self.version, s, pending.as_deref())
                    }
                    Kind::ConnAck => {
                        let ack = frame.connack_for(self.version, self.session_present);
                        if let Ok(b) = &ack {
                            out.extend_from_slice(b);
                            self.deliver_queued(&mut out);
                            continue;
                        }
                        ack
                    }
                    Kind::PingResp if self.keepalive_off => {
                        // Ours unless the client has a ping of its own outstanding.
                        let theirs = self
                            .client_pings
                            .fetch_update(
                                std::sync::atomic::Ordering::Relaxed,
                                std::sync::atomic::Ordering::Relaxed,
                                |n| n.checked_sub(1),
                            )
                            .is_ok();
                        if !theirs {
                            continue;
                        }
                        Ok(frame.raw.clone())
                    }
                    // 3.1.1 has no server DISCONNECT (or AUTH): the broker closes next.
                    Kind::Disconnect | Kind::Auth if self.version == Version::V4 => continue,
                    _ => Ok(frame.raw.clone()),
                };
                match converted {
                    Ok(b) => out.extend_from_slice(&b),
                    Err(e) => {
                        warn!(client = %self.client_id, error = %e, "bad packet from the upstream broker");
                        return End::Closed;
                    }
                }
            }
            // The broker's acknowledgements first, while their order is held; a slow client
            // then holds up only its own deliveries.
            if write(upstream, back).await.is_err() {
                return End::Closed;
            }
            drop(order);
            if write(client, out).await.is_err() {
                return End::Closed;
            }
        }
    }
}

/// Milliseconds since the Unix epoch (message expiry deadlines).
pub(crate) fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// A subscription's options as the gate keeps them.
fn options_of(f: &rumqttc::v5::mqttbytes::v5::Filter) -> Options {
    Options {
        qos: f.qos as u8,
        no_local: f.nolocal,
        retain_as_published: f.preserve_retain,
        no_retained: false,
    }
}

/// MQTT 5 Retain Handling: 0 send retained messages, 1 only for a new subscription, 2 never.
fn retain_handling_of(f: &rumqttc::v5::mqttbytes::v5::Filter) -> u8 {
    use rumqttc::v5::mqttbytes::v5::RetainForwardRule as R;
    match f.retain_forward_rule {
        R::OnEverySubscribe => 0,
        R::OnNewSubscribe => 1,
        R::Never => 2,
    }
}

async fn write<W: AsyncWrite + Unpin>(w: &Writer<W>, bytes: BytesMut) -> std::io::Result<()> {
    if bytes.is_empty() {
        return Ok(());
    }
    let bytes: Bytes = bytes.freeze();
    w.lock().await.write_all(&bytes).await
}

#[cfg(test)]
mod own_delivery_tests {
    use super::*;

    #[test]
    fn own_deliveries_use_packet_ids_the_broker_never_does_and_end_with_the_right_ack() {
        let mut o = OwnDeliveries::default();
        let one = o.next(1).unwrap_or(0);
        let two = o.next(2).unwrap_or(0);
        assert!(one >= OWN_PKIDS && two >= OWN_PKIDS && one != two);
        // A broker delivery's packet id is not ours.
        assert!(o.done(7, Kind::PubAck).is_none());
        // QoS 1 ends with PUBACK; QoS 2 with PUBREC, then PUBCOMP (a PUBACK does not end it).
        assert_eq!(o.done(one, Kind::PubAck), Some(None));
        assert!(o.done(two, Kind::PubAck).is_none());
        assert!(o.received(two));
        assert_eq!(o.done(two, Kind::PubComp), Some(None));
        assert!(o.out.is_empty());
    }

    #[test]
    fn an_acknowledged_own_delivery_of_a_queued_message_names_its_place_in_the_queue() {
        let mut o = OwnDeliveries::default();
        let id = o.next(1).unwrap_or(0);
        o.from_queue.insert(id, 42);
        assert_eq!(o.done(id, Kind::PubAck), Some(Some(42)));
        assert!(o.from_queue.is_empty());
    }
}

#[cfg(test)]
mod window_tests {
    use super::*;

    fn b(n: u8) -> Bytes {
        Bytes::from(vec![n])
    }

    #[test]
    fn window_holds_deliveries_past_the_receive_maximum_and_releases_them_in_order() {
        let mut w = Window::new(2);
        assert_eq!(w.offer(1, b(1)), Some(b(1)));
        assert_eq!(w.offer(2, b(2)), Some(b(2)));
        assert_eq!(w.offer(3, b(3)), None, "a third waits");
        assert_eq!(w.offer(4, b(4)), None);
        assert_eq!(
            w.offer(2, b(2)),
            Some(b(2)),
            "a resend of an outstanding one goes"
        );
        assert!(w.acked(9).is_empty(), "an unknown id releases nothing");
        assert_eq!(w.acked(2), vec![b(3)]);
        assert_eq!(w.acked(1), vec![b(4)]);
        assert!(w.acked(3).is_empty() && w.held.is_empty());
        assert_eq!(w.offer(5, b(5)), Some(b(5)), "room again");
    }

    #[test]
    fn window_of_zero_is_taken_as_one() {
        let mut w = Window::new(0);
        assert_eq!(w.offer(1, b(1)), Some(b(1)));
        assert_eq!(w.offer(2, b(2)), None);
    }
}
