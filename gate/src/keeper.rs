//! Keepers: the gate holds, at the broker, every kept session that no client is connected to,
//! and writes what the broker delivers to it into the session's durable queue.
//!
//! rumqttd keeps a disconnected session's messages as a cursor into its in-memory log, so a
//! restart of the node lost them. Instead, when the last connection of a kept session ends, the
//! gate connects to the broker under the session's client id itself (clean start 0, the session
//! goes on) and takes the deliveries: each one the client is to get at QoS 1 or 2 (the same
//! [`Subscriptions::verdict`] as a live delivery: min QoS, No Local, Retain As Published,
//! Message Expiry) is appended to the session's queue in the store, and acknowledged to the
//! broker only once it is on disk. QoS 0 deliveries are not queued (as Mosquitto's default,
//! `queue_qos0_messages false`). When the client comes back, its keeper stops first (it finishes
//! and acknowledges what it read, then disconnects; what the broker had not had acknowledged it
//! sends to the client's connection instead), and the queue goes to the client before anything
//! the broker sends (see the relay's [`Conn`](crate::relay)).
//!
//! A queue is bounded by `limits.max_queued_messages` and `limits.max_queued_bytes`; past them a
//! message is dropped, counted (`edgetwin_gate_queue_dropped_total`) and logged once per keeper.
//! At start the gate restores each stored session through its keeper, which subscribes the
//! session's filters again (the retained messages that brings are not queued: a resumed session
//! does not get them).
//!
//! What a kill -9 can still lose: a message the broker had acknowledged to its publisher and
//! not yet handed to the keeper (milliseconds; the broker's log is in memory). Topics the node
//! stores are committed before the broker sees them, whatever the session.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::BytesMut;
use rumqttc::v5::mqttbytes::v5 as m5;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use crate::origin::{Options, Origin, Subscriptions, Verdict};
use crate::packet::{self, Kind, PacketError, Version};
use crate::relay::{lock, now_ms, Shared, UPSTREAM_MAX_PACKET};
use crate::sessions::ToQueue;

/// Room left in a session's queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Room {
    pub messages: usize,
    pub bytes: usize,
}

/// What a keeper does with one delivery.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Keep {
    /// Into the queue.
    Queue(ToQueue),
    /// Not for the client (or QoS 0, or a retained message of the keeper's own SUBSCRIBE).
    Skip,
    /// For the client, but the queue is full.
    Full,
}

/// Decides what happens to delivery `p` (with its [`Origin`] already taken off) for a session
/// with `subs` whose last connection was `me`. Pure.
pub(crate) fn keep(
    subs: &Subscriptions,
    me: u64,
    topic: &str,
    mut p: m5::Publish,
    origin: Option<Origin>,
    now_ms: u64,
    room: &mut Room,
) -> Keep {
    // The broker marks only the retained messages it sends for a new subscription.
    if p.retain {
        return Keep::Skip;
    }
    let (qos, retain, left) = match subs.verdict(me, topic, p.qos as u8, false, origin, now_ms) {
        Verdict::Deliver {
            qos,
            retain,
            expiry_left_s,
        } => (qos, retain, expiry_left_s),
        Verdict::Withhold | Verdict::Expired => return Keep::Skip,
    };
    if qos == 0 {
        return Keep::Skip;
    }
    p.qos = packet::qos5(qos);
    p.retain = retain;
    p.dup = false;
    // A placeholder: the relay gives it a packet id of its own when it delivers it.
    p.pkid = 1;
    if let Some(pr) = p.properties.as_mut() {
        pr.topic_alias = None;
        pr.message_expiry_interval = None;
    }
    let expires_at_ms = left.map(|s| now_ms.saturating_add(u64::from(s) * 1000));
    let Ok(bytes) = packet::write_publish(Version::V5, &p) else {
        return Keep::Skip;
    };
    if room.messages == 0 || room.bytes < bytes.len() {
        return Keep::Full;
    }
    room.messages -= 1;
    room.bytes -= bytes.len();
    Keep::Queue((bytes.to_vec(), expires_at_ms))
}

/// A running keeper.
struct Running {
    stop: CancellationToken,
    done: tokio::task::JoinHandle<()>,
}

/// Every running keeper, by (upstream) client id.
#[derive(Default)]
pub(crate) struct Keepers {
    running: Mutex<HashMap<String, Running>>,
    tasks: TaskTracker,
    /// The gate is shutting down: no keeper starts.
    refusing: std::sync::atomic::AtomicBool,
    /// Every keeper stops (the parent of their stop tokens; cancelled by [`Keepers::close`]
    /// only, after `draining` is set, so each one drains first).
    closing: CancellationToken,
    /// Keepers told to stop take what the broker still has for them first (shutdown: nobody
    /// else will).
    draining: Arc<std::sync::atomic::AtomicBool>,
    /// The warning about `max_held_sessions` was logged.
    logged_cap: std::sync::atomic::AtomicBool,
}

impl Keepers {
    /// Starts holding `client`'s session (connection `me` was its last). `subscribe`: the
    /// broker does not have the session's filters yet (a restart); `ready` is told once it has.
    /// The caller holds the session table's lock, so a CONNECT of the client id cannot come
    /// between its check that nobody holds the session and this.
    pub fn start(
        &self,
        shared: &Arc<Shared>,
        client: &str,
        me: u64,
        subs: Subscriptions,
        subscribe: bool,
        ready: Option<tokio::sync::oneshot::Sender<bool>>,
    ) {
        if self.refusing.load(std::sync::atomic::Ordering::Relaxed) {
            return;
        }
        let max = shared.cfg.limits.max_held_sessions;
        let (holding, known) = {
            let running = lock(&self.running);
            // A keeper that only put a session back at the broker has ended by itself.
            let holding = running.values().filter(|r| !r.done.is_finished()).count();
            (holding, running.contains_key(client))
        };
        let holds = known || holding < max;
        if !holds {
            // The broker keeps this one's messages in memory, as it would without a keeper.
            shared.metrics.sessions_not_held.inc();
            if !self
                .logged_cap
                .swap(true, std::sync::atomic::Ordering::Relaxed)
            {
                warn!(client = %client, max, "more kept sessions are away than gate.limits.max_held_sessions: messages for the rest are kept in memory only, not across a restart (further ones are only counted)");
            }
            if !subscribe {
                return;
            }
            // After a restart the broker does not have the session yet: the keeper puts it
            // back (its filters subscribed) and leaves it to the broker.
        }
        let stop = self.closing.child_token();
        let done = self.tasks.spawn(hold(
            shared.clone(),
            client.to_string(),
            me,
            subs,
            Mode { subscribe, holds },
            ready,
            Stop {
                now: stop.clone(),
                drain: self.draining.clone(),
            },
        ));
        let old = lock(&self.running).insert(client.to_string(), Running { stop, done });
        if let Some(old) = old {
            // Not expected (a session has one keeper): the old one goes.
            old.stop.cancel();
        }
    }

    /// Stops `client`'s keeper, if one runs, and waits until it has acknowledged what it read
    /// and left the broker.
    pub async fn stop(&self, client: &str) {
        let running = lock(&self.running).remove(client);
        if let Some(r) = running {
            r.stop.cancel();
            let _ = r.done.await;
        }
    }

    /// No keeper starts from now on (shutdown); the running ones go on until
    /// [`Keepers::close`].
    pub fn refuse_new(&self) {
        self.refusing
            .store(true, std::sync::atomic::Ordering::Relaxed);
    }

    /// Stops every keeper (shutdown) once it has queued what the broker still has for it,
    /// and waits for them.
    pub async fn close(&self) {
        self.refuse_new();
        self.draining
            .store(true, std::sync::atomic::Ordering::Relaxed);
        self.closing.cancel();
        self.tasks.close();
        self.tasks.wait().await;
    }
}

/// What a keeper is to do.
#[derive(Debug, Clone, Copy)]
struct Mode {
    /// The broker does not have the session's filters yet (a restart): subscribe them first.
    subscribe: bool,
    /// Queue the session's deliveries (else: end once the broker has the session).
    holds: bool,
}

/// When a keeper stops.
#[derive(Clone)]
struct Stop {
    now: CancellationToken,
    /// Set: first take every delivery the broker has (until it is quiet for [`DRAIN_QUIET`]).
    drain: Arc<std::sync::atomic::AtomicBool>,
}

/// A draining keeper stops after this long without a delivery (or [`DRAIN_MAX`]).
const DRAIN_QUIET: Duration = Duration::from_millis(200);
const DRAIN_MAX: Duration = Duration::from_secs(3);

/// Holds `client`'s broker session until `stop`, reconnecting after a failure.
async fn hold(
    shared: Arc<Shared>,
    client: String,
    me: u64,
    subs: Subscriptions,
    mut mode: Mode,
    mut ready: Option<tokio::sync::oneshot::Sender<bool>>,
    stop: Stop,
) {
    // The project's one reconnect backoff (jittered, so keepers that lost the broker together
    // do not retry in step).
    let mut backoff =
        edgetwin_retry::Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
    let mut logged_full = false;
    loop {
        let r = hold_once(
            &shared,
            &client,
            me,
            &subs,
            &mut mode,
            &mut ready,
            &mut logged_full,
            &stop,
        )
        .await;
        let wait = match r {
            Ok(()) => return,
            Err(e) => {
                if stop.now.is_cancelled() {
                    return;
                }
                let wait = backoff.next_delay();
                warn!(client = %client, error = %e, retry_ms = wait.as_millis() as u64, "holding a kept session at the broker failed; retrying");
                wait
            }
        };
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = stop.now.cancelled() => {
                if let Some(r) = ready.take() {
                    let _ = r.send(false);
                }
                return;
            }
        }
    }
}

#[allow(clippy::too_many_arguments)]
async fn hold_once(
    shared: &Shared,
    client: &str,
    me: u64,
    subs: &Subscriptions,
    mode: &mut Mode,
    ready: &mut Option<tokio::sync::oneshot::Sender<bool>>,
    logged_full: &mut bool,
    stop: &Stop,
) -> std::io::Result<()> {
    let bad = |e: PacketError| std::io::Error::new(std::io::ErrorKind::InvalidData, e.to_string());
    let store = shared.session_store.get().cloned();
    let queues = mode.holds && store.as_ref().is_some_and(|s| s.keeps_queues());
    let limits = &shared.cfg.limits;
    let mut s = shared.upstream.broker.connect().await?;
    let keep_alive = limits.keepalive_off_upstream_s;
    s.write_all(
        &packet::session_connect(client, shared.upstream.login.as_ref(), false, keep_alive)
            .map_err(bad)?,
    )
    .await?;
    let mut ping = tokio::time::interval(Duration::from_millis(u64::from(keep_alive) * 500));
    ping.tick().await;
    let mut buf = BytesMut::with_capacity(4096);
    let mut connected = false;
    // QoS 2 deliveries acknowledged (PUBREC) whose PUBREL has not come yet.
    let mut releasing: std::collections::HashSet<u16> = std::collections::HashSet::new();
    let mut stopping: Option<tokio::time::Instant> = None;
    // Draining for a shutdown: (quiet until, at most until).
    let mut draining: Option<(tokio::time::Instant, tokio::time::Instant)> = None;
    loop {
        if let Some((quiet, max)) = draining {
            let now = tokio::time::Instant::now();
            if now >= quiet || now >= max {
                draining = None;
                stopping = Some(now + Duration::from_secs(1));
            }
        }
        if let Some(by) = stopping {
            // Done when every PUBREL is answered (or after a second: the broker sends the rest
            // to the client's connection).
            if releasing.is_empty() || tokio::time::Instant::now() >= by {
                let _ = s.write_all(&packet::DISCONNECT_NORMAL).await;
                let mut sink = [0u8; 256];
                let _ = tokio::time::timeout(Duration::from_secs(1), async {
                    while matches!(s.read(&mut sink).await, Ok(n) if n > 0) {}
                })
                .await;
                return Ok(());
            }
        }
        let wake = match (stopping, draining) {
            (Some(by), _) => Some(by),
            (None, Some((quiet, max))) => Some(quiet.min(max)),
            (None, None) => None,
        };
        let wait = wake.map_or(Duration::from_secs(3600), |by| {
            by.saturating_duration_since(tokio::time::Instant::now())
        });
        // The broker answers a CONNECT at once; without a CONNACK this try ends.
        let hello_by = (!connected).then(|| Duration::from_millis(limits.connect_timeout_ms));
        tokio::select! {
            _ = tokio::time::sleep(hello_by.unwrap_or(Duration::MAX)), if hello_by.is_some() => {
                return Err(std::io::Error::other("no CONNACK from the broker"));
            }
            r = s.read_buf(&mut buf) => {
                if r? == 0 {
                    return Err(std::io::Error::other("the broker closed the connection"));
                }
            }
            _ = stop.now.cancelled(), if stopping.is_none() && draining.is_none() => {
                let now = tokio::time::Instant::now();
                if stop.drain.load(std::sync::atomic::Ordering::Relaxed) && connected {
                    draining = Some((now + DRAIN_QUIET, now + DRAIN_MAX));
                } else {
                    stopping = Some(now + Duration::from_secs(1));
                }
                continue;
            }
            _ = ping.tick() => {
                s.write_all(&packet::PINGREQ).await?;
                continue;
            }
            _ = tokio::time::sleep(wait), if wake.is_some() => continue,
        }
        if let Some((quiet, max)) = draining.as_mut() {
            *quiet = (tokio::time::Instant::now() + DRAIN_QUIET).min(*max);
        }
        let mut acks = BytesMut::new();
        let mut batch: Vec<ToQueue> = Vec::new();
        let (queued, queued_bytes) = store.as_ref().map_or((0, 0), |st| st.queue_len(client));
        let mut room = Room {
            messages: limits.max_queued_messages.saturating_sub(queued),
            bytes: limits.max_queued_bytes.saturating_sub(queued_bytes),
        };
        let mut dropped = 0usize;
        while let Some(f) =
            packet::next_frame(&mut buf, Version::V5, UPSTREAM_MAX_PACKET).map_err(bad)?
        {
            match f.kind {
                Kind::ConnAck => {
                    // [connack flags, reason]: anything but success ends this try.
                    if f.raw.get(3).copied().unwrap_or(0x80) != 0 {
                        return Err(std::io::Error::other("the broker refused the connection"));
                    }
                    connected = true;
                    if mode.subscribe && !subs.is_empty() {
                        let filters = subs.iter().map(|(f, o)| filter(f, o)).collect::<Vec<_>>();
                        let sub = m5::Subscribe {
                            pkid: 1,
                            filters,
                            properties: None,
                        };
                        acks.extend_from_slice(&packet::write_v5_subscribe(&sub).map_err(bad)?);
                    } else {
                        stopping = stopping.or(at_broker(mode, ready, queues));
                    }
                }
                Kind::SubAck => stopping = stopping.or(at_broker(mode, ready, queues)),
                Kind::Publish if stopping.is_some() => {
                    // Not acknowledged: the broker sends it to the client's connection.
                }
                Kind::Publish => {
                    let mut p = f.publish_v5().map_err(bad)?;
                    let origin = p
                        .properties
                        .as_mut()
                        .and_then(|pr| Origin::take(&mut pr.user_properties));
                    let (qos, pkid) = (p.qos as u8, p.pkid);
                    let topic = String::from_utf8_lossy(&p.topic).into_owned();
                    match keep(subs, me, &topic, p, origin, now_ms(), &mut room) {
                        Keep::Queue(m) => batch.push(m),
                        Keep::Skip => {}
                        Keep::Full => dropped += 1,
                    }
                    match qos {
                        1 => acks.extend_from_slice(&packet::puback(Version::V5, pkid, None)),
                        2 => {
                            releasing.insert(pkid);
                            acks.extend_from_slice(&packet::pubrec(Version::V5, pkid, None));
                        }
                        _ => {}
                    }
                }
                Kind::PubRel => {
                    let pkid = f.pubrel_pkid().map_err(bad)?;
                    releasing.remove(&pkid);
                    acks.extend_from_slice(&packet::pubcomp(Version::V5, pkid));
                }
                Kind::Disconnect => {
                    return Err(std::io::Error::other("the broker disconnected the session"))
                }
                _ => {}
            }
        }
        if dropped > 0 {
            shared.metrics.queue_dropped.inc_by(dropped as u64);
            if !*logged_full {
                *logged_full = true;
                warn!(client = %client, max_messages = limits.max_queued_messages, max_bytes = limits.max_queued_bytes, "a kept session's queue is full; messages for it are dropped (limits.max_queued_messages / max_queued_bytes; further drops are only counted)");
            }
        }
        if !batch.is_empty() {
            let n = batch.len() as u64;
            let Some(st) = store.as_ref() else {
                return Err(std::io::Error::other("no store for the queue"));
            };
            // Acknowledged to the broker only once on disk: until then the broker still has it.
            match st.enqueue(client, batch).await {
                Ok(Ok(())) => {
                    shared.metrics.queued.inc_by(n);
                }
                Ok(Err(e)) => return Err(std::io::Error::other(format!("queue not written: {e}"))),
                Err(_) => return Err(std::io::Error::other("queue not written: the store ended")),
            }
            debug!(client = %client, messages = n, "queued for a kept session");
        }
        if !acks.is_empty() {
            s.write_all(&acks).await?;
        }
    }
}

/// The broker has the session with its filters now: `ready` is told. Returns when to stop:
/// at once when the keeper does not queue (nowhere to, or past `max_held_sessions`), and the
/// broker keeps the session from here.
fn at_broker(
    mode: &mut Mode,
    ready: &mut Option<tokio::sync::oneshot::Sender<bool>>,
    queues: bool,
) -> Option<tokio::time::Instant> {
    mode.subscribe = false;
    if let Some(r) = ready.take() {
        let _ = r.send(true);
    }
    (!queues).then(tokio::time::Instant::now)
}

fn filter(f: &str, o: &Options) -> m5::Filter {
    let mut fl = m5::Filter::new(f.to_string(), packet::qos5(o.qos));
    fl.nolocal = o.no_local;
    fl.preserve_retain = o.retain_as_published;
    fl
}

/// Restores each stored session through a keeper (which subscribes its filters at the broker)
/// and waits until every one has (or failed, logged).
pub(crate) async fn restore(shared: &Arc<Shared>, sessions: Vec<(String, Subscriptions)>) {
    let total = sessions.len();
    let mut waiting = Vec::with_capacity(total);
    for (id, subs) in sessions {
        let (tx, rx) = tokio::sync::oneshot::channel();
        {
            let table = lock(&shared.sessions);
            if table.unheld(&id).is_some() {
                // A fresh connection number: nothing published after the restart is its own.
                let me = shared
                    .next_conn
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                shared.keepers.start(shared, &id, me, subs, true, Some(tx));
            }
        }
        waiting.push((id, rx));
    }
    let mut failed = 0usize;
    // One deadline for all of them: start-up waits 10 s at most, however many fail.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    for (id, rx) in waiting {
        match tokio::time::timeout_at(deadline, rx).await {
            Ok(Ok(true)) => {}
            _ => {
                failed += 1;
                warn!(client = %id, "a kept session is not subscribed at the broker yet (its keeper goes on trying)");
            }
        }
    }
    if total > 0 {
        info!(sessions = total, failed, "kept client sessions restored");
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn subs(filter: &str, qos: u8, no_local: bool, rap: bool) -> Subscriptions {
        let mut s = Subscriptions::default();
        s.subscribe(
            filter,
            Options {
                qos,
                no_local,
                retain_as_published: rap,
                no_retained: false,
            },
            0,
        );
        s
    }

    fn delivery(topic: &str, qos: u8) -> m5::Publish {
        let mut p = m5::Publish::new(topic, packet::qos5(qos), Bytes::from_static(b"x"), None);
        p.pkid = 7;
        p
    }

    fn origin(qos: u8, retain: bool, conn: u64, expires_at_ms: Option<u64>) -> Option<Origin> {
        Some(Origin {
            qos,
            retain,
            conn,
            expires_at_ms,
        })
    }

    fn room() -> Room {
        Room {
            messages: 10,
            bytes: 1 << 20,
        }
    }

    fn decoded(m: &ToQueue) -> m5::Publish {
        let mut b = BytesMut::from(&m.0[..]);
        packet::next_frame(&mut b, Version::V5, 1 << 20)
            .unwrap()
            .unwrap()
            .publish_v5()
            .unwrap()
    }

    #[test]
    fn a_delivery_is_queued_at_the_lower_of_publish_and_subscription_qos() {
        let s = subs("t/#", 2, false, false);
        let mut r = room();
        let Keep::Queue(m) = keep(
            &s,
            1,
            "t/a",
            delivery("t/a", 2),
            origin(1, false, 9, None),
            0,
            &mut r,
        ) else {
            panic!("not queued")
        };
        let p = decoded(&m);
        assert_eq!(
            (p.qos as u8, p.retain, &p.topic[..]),
            (1, false, &b"t/a"[..])
        );
        assert_eq!(r.messages, 9);
    }

    #[test]
    fn qos0_own_and_retained_on_subscribe_deliveries_are_not_queued() {
        let s = subs("t/#", 1, true, false);
        let mut r = room();
        // QoS 0 at the publisher.
        assert_eq!(
            keep(
                &s,
                1,
                "t/a",
                delivery("t/a", 1),
                origin(0, false, 9, None),
                0,
                &mut r
            ),
            Keep::Skip
        );
        // Its own publish under No Local.
        assert_eq!(
            keep(
                &s,
                9,
                "t/a",
                delivery("t/a", 1),
                origin(1, false, 9, None),
                0,
                &mut r
            ),
            Keep::Skip
        );
        // A retained message the broker sent for the keeper's own SUBSCRIBE.
        let mut p = delivery("t/a", 1);
        p.retain = true;
        assert_eq!(
            keep(&s, 1, "t/a", p, origin(1, true, 9, None), 0, &mut r),
            Keep::Skip
        );
        assert_eq!(r, room(), "nothing took room");
    }

    #[test]
    fn expiry_is_kept_as_a_deadline_and_an_expired_message_is_not_queued() {
        let s = subs("t/#", 1, false, true);
        let mut r = room();
        let now = 1_000_000;
        assert_eq!(
            keep(
                &s,
                1,
                "t/a",
                delivery("t/a", 1),
                origin(1, false, 9, Some(now - 1)),
                now,
                &mut r
            ),
            Keep::Skip
        );
        let Keep::Queue(m) = keep(
            &s,
            1,
            "t/a",
            delivery("t/a", 1),
            origin(1, true, 9, Some(now + 4_500)),
            now,
            &mut r,
        ) else {
            panic!("not queued")
        };
        assert_eq!(
            m.1,
            Some(now + 5_000),
            "the interval left, in whole seconds"
        );
        let p = decoded(&m);
        assert!(p.retain, "Retain As Published");
        assert_eq!(p.properties.and_then(|pr| pr.message_expiry_interval), None);
    }

    #[test]
    fn a_full_queue_refuses_by_count_and_by_bytes() {
        let s = subs("t/#", 1, false, false);
        let mut r = Room {
            messages: 1,
            bytes: 1 << 20,
        };
        assert!(matches!(
            keep(&s, 1, "t/a", delivery("t/a", 1), None, 0, &mut r),
            Keep::Queue(_)
        ));
        assert_eq!(
            keep(&s, 1, "t/a", delivery("t/a", 1), None, 0, &mut r),
            Keep::Full
        );
        let mut r = Room {
            messages: 5,
            bytes: 4,
        };
        assert_eq!(
            keep(&s, 1, "t/a", delivery("t/a", 1), None, 0, &mut r),
            Keep::Full
        );
    }
}
