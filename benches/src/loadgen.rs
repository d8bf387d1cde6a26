//! MQTT load generator on rumqttc (MQTT 3.1.1), identical for every broker under test.
//!
//! [`run_pubsub`] connects one subscriber on `{prefix}/#` and `P` publishers that each publish `N`
//! messages to `{prefix}/{p}/t`, as fast as the protocol allows or paced to a total rate. Every
//! payload starts with a 16-byte header: the send time (nanoseconds since [`now_ns`]'s process-wide
//! origin, little endian u64), the publisher index (u32) and the sequence number (u32), so the
//! subscriber measures end-to-end latency and counts loss and duplicates exactly.
//!
//! Every client sets TCP_NODELAY (rumqttc leaves Nagle's algorithm on by default) and every run is
//! bounded by a deadline.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use rumqttc::{AsyncClient, Event, EventLoop, MqttOptions, NetworkOptions, Outgoing, Packet, QoS};

use crate::stats::Summary;

/// Bytes of the header at the start of every generated payload.
pub const HEADER_LEN: usize = 16;

static ORIGIN: OnceLock<Instant> = OnceLock::new();

/// Nanoseconds since a process-wide origin (monotonic clock).
pub fn now_ns() -> u64 {
    ORIGIN.get_or_init(Instant::now).elapsed().as_nanos() as u64
}

/// Creates a client with TCP_NODELAY, clean session, 1 MiB packets and `inflight` outgoing QoS 1/2
/// messages in flight; the connection is made by the first poll of the event loop.
pub fn client(id: &str, addr: SocketAddr, inflight: u16) -> (AsyncClient, EventLoop) {
    let mut opts = MqttOptions::new(id, addr.ip().to_string(), addr.port());
    opts.set_keep_alive(Duration::from_secs(30))
        .set_clean_session(true)
        .set_max_packet_size(1 << 20, 1 << 20)
        .set_inflight(inflight.max(1))
        .set_request_channel_capacity(16);
    let (client, mut eventloop) = AsyncClient::new(opts, 16);
    let mut net = NetworkOptions::new();
    net.set_tcp_nodelay(true);
    eventloop.set_network_options(net);
    (client, eventloop)
}

/// Polls `eventloop` until an incoming packet satisfies `want`, failing after `timeout`.
pub async fn poll_until(
    eventloop: &mut EventLoop,
    timeout: Duration,
    what: &str,
    want: impl Fn(&Packet) -> bool,
) -> Result<()> {
    let wait = async {
        loop {
            match eventloop.poll().await {
                Ok(Event::Incoming(p)) if want(&p) => return Ok(()),
                Ok(_) => {}
                Err(e) => {
                    return Err(anyhow::Error::new(e).context(format!("while waiting for {what}")))
                }
            }
        }
    };
    tokio::time::timeout(timeout, wait)
        .await
        .with_context(|| format!("timed out after {timeout:?} waiting for {what}"))?
}

/// Connects a client (see [`client`]) and waits for CONNACK.
pub async fn connect(
    id: &str,
    addr: SocketAddr,
    inflight: u16,
) -> Result<(AsyncClient, EventLoop)> {
    let (c, mut el) = client(id, addr, inflight);
    poll_until(
        &mut el,
        Duration::from_secs(5),
        &format!("CONNACK of {id} from {addr}"),
        |p| matches!(p, Packet::ConnAck(_)),
    )
    .await?;
    Ok((c, el))
}

/// Subscribes to `filters` at `qos` and waits for the SUBACK of each.
pub async fn subscribe(
    client: &AsyncClient,
    el: &mut EventLoop,
    filters: &[&str],
    qos: QoS,
) -> Result<()> {
    for f in filters {
        client
            .subscribe(*f, qos)
            .await
            .with_context(|| format!("subscribe {f}"))?;
        poll_until(
            el,
            Duration::from_secs(5),
            &format!("SUBACK for {f}"),
            |p| matches!(p, Packet::SubAck(_)),
        )
        .await?;
    }
    Ok(())
}

/// Connects, subscribes to `topic` at QoS 1 and returns the payload of the first message on it
/// (a retained one, or one published while we wait); fails after `timeout`.
pub async fn first_message(addr: SocketAddr, topic: &str, timeout: Duration) -> Result<Vec<u8>> {
    let id = format!("bench-probe-{:08x}", rand::random::<u32>());
    let (c, mut el) = connect(&id, addr, 10).await?;
    c.subscribe(topic, QoS::AtLeastOnce)
        .await
        .with_context(|| format!("subscribe {topic}"))?;
    let wait = async {
        loop {
            match el.poll().await {
                Ok(Event::Incoming(Packet::Publish(p))) if p.topic == topic => {
                    return Ok(p.payload.to_vec())
                }
                Ok(_) => {}
                Err(e) => return Err(anyhow::Error::new(e).context(format!("waiting for {topic}"))),
            }
        }
    };
    let r = tokio::time::timeout(timeout, wait)
        .await
        .with_context(|| format!("no message on {topic} within {timeout:?}"))?;
    let _ = c.try_disconnect();
    r
}

/// Publishes every (topic, payload) retained at QoS 1 from one client and returns once all are
/// acknowledged (or fails after `timeout`).
pub async fn publish_retained(
    addr: SocketAddr,
    msgs: Vec<(String, Vec<u8>)>,
    timeout: Duration,
) -> Result<()> {
    let id = format!("bench-retain-{:08x}", rand::random::<u32>());
    let (c, mut el) = connect(&id, addr, 100).await?;
    let n = msgs.len();
    let sender = tokio::spawn(async move {
        for (t, p) in msgs {
            c.publish(t, QoS::AtLeastOnce, true, p)
                .await
                .context("publish retained")?;
        }
        Ok::<AsyncClient, anyhow::Error>(c)
    });
    let wait = async {
        let mut acked = 0;
        while acked < n {
            match el.poll().await {
                Ok(Event::Incoming(Packet::PubAck(_))) => acked += 1,
                Ok(_) => {}
                Err(e) => return Err(anyhow::Error::new(e).context("retained publisher")),
            }
        }
        Ok(())
    };
    tokio::time::timeout(timeout, wait)
        .await
        .with_context(|| format!("{n} retained publishes not acknowledged within {timeout:?}"))??;
    let c = sender.await.context("retained sender")??;
    let _ = c.try_disconnect();
    client_disconnect_and_drain(&mut el).await;
    Ok(())
}

/// Parses an MQTT QoS level 0, 1 or 2.
pub fn qos(level: u8) -> Result<QoS> {
    match level {
        0 => Ok(QoS::AtMostOnce),
        1 => Ok(QoS::AtLeastOnce),
        2 => Ok(QoS::ExactlyOnce),
        other => bail!("QoS must be 0, 1 or 2, not {other}"),
    }
}

/// One publish/subscribe run.
#[derive(Debug, Clone)]
pub struct PubSubSpec {
    /// The broker's MQTT 3.1.1 listener.
    pub addr: SocketAddr,
    /// Number of publishers.
    pub publishers: usize,
    /// Messages per publisher.
    pub messages: usize,
    /// Payload size in bytes (at least [`HEADER_LEN`]).
    pub payload: usize,
    /// QoS of the publishes and of the subscription.
    pub qos: QoS,
    /// Total publish rate in messages per second over all publishers; `None` publishes flat out.
    pub rate: Option<f64>,
    /// Topic prefix; publishers use `{prefix}/{p}/t`, the subscriber `{prefix}/#`.
    pub prefix: String,
    /// Outgoing QoS 1/2 messages in flight per publisher.
    pub inflight: u16,
    /// Hard limit on the whole run; what arrived until then is reported.
    pub deadline: Duration,
    /// After the publishers finish, stop waiting once nothing arrived for this long.
    pub drain_idle: Duration,
}

/// What a run measured.
#[derive(Debug, Clone)]
pub struct PubSubResult {
    /// Messages the publishers were asked to send.
    pub expected: usize,
    /// Messages completed by the publishers (written to the socket for QoS 0, acknowledged for QoS 1/2).
    pub sent: usize,
    /// Distinct messages the subscriber received.
    pub received: usize,
    /// Extra copies the subscriber received.
    pub duplicates: usize,
    /// Seconds from the start until the last publisher completed.
    pub publish_secs: f64,
    /// Seconds from the start until the last message arrived at the subscriber.
    pub receive_secs: f64,
    /// End-to-end latency (publish call to receipt) of every distinct message.
    pub latency: Summary,
    /// Whether the deadline cut the run short.
    pub timed_out: bool,
}

impl PubSubResult {
    /// Messages expected but never received.
    pub fn lost(&self) -> usize {
        self.expected - self.received.min(self.expected)
    }

    /// Completed publishes per second.
    pub fn publish_rate(&self) -> f64 {
        per_sec(self.sent, self.publish_secs)
    }

    /// Distinct messages received per second.
    pub fn receive_rate(&self) -> f64 {
        per_sec(self.received, self.receive_secs)
    }
}

fn per_sec(n: usize, secs: f64) -> f64 {
    if secs > 0.0 {
        n as f64 / secs
    } else {
        0.0
    }
}

#[derive(Default)]
struct SubState {
    seen: Vec<bool>,
    received: usize,
    duplicates: usize,
    foreign: usize,
    latencies: Vec<u64>,
    last: Option<Instant>,
}

/// Builds a payload of `len` bytes (at least the header) stamped with the current time.
pub fn stamped_payload(len: usize, publisher: u32, seq: u32) -> Vec<u8> {
    let mut buf = vec![0u8; len.max(HEADER_LEN)];
    buf[0..8].copy_from_slice(&now_ns().to_le_bytes());
    buf[8..12].copy_from_slice(&publisher.to_le_bytes());
    buf[12..16].copy_from_slice(&seq.to_le_bytes());
    buf
}

/// Reads the header of a generated payload: (send time ns, publisher, seq).
pub fn parse_stamp(payload: &[u8]) -> Option<(u64, u32, u32)> {
    let ts = u64::from_le_bytes(payload.get(0..8)?.try_into().ok()?);
    let p = u32::from_le_bytes(payload.get(8..12)?.try_into().ok()?);
    let s = u32::from_le_bytes(payload.get(12..16)?.try_into().ok()?);
    Some((ts, p, s))
}

/// Runs one publish/subscribe measurement (see the module doc).
pub async fn run_pubsub(spec: &PubSubSpec) -> Result<PubSubResult> {
    if spec.publishers == 0 || spec.messages == 0 {
        bail!("need at least one publisher and one message");
    }
    let expected = spec.publishers * spec.messages;
    let run_id: u32 = rand::random();
    let (sub, mut sub_el) = connect(&format!("bench-sub-{run_id:08x}"), spec.addr, 100).await?;
    subscribe(
        &sub,
        &mut sub_el,
        &[&format!("{}/#", spec.prefix)],
        spec.qos,
    )
    .await?;

    let state = Arc::new(Mutex::new(SubState {
        seen: vec![false; expected],
        latencies: Vec::with_capacity(expected),
        ..SubState::default()
    }));
    // The subscriber runs on a thread and runtime of its own: on the publishers' runtime, four
    // publishers flat out left it no turn (its PUBACKs for the first 100 deliveries went out
    // only after the flood), which measured this program's subscriber, not the broker.
    let sub_task = {
        let state = state.clone();
        let (publishers, messages) = (spec.publishers, spec.messages);
        let receive = async move {
            loop {
                match sub_el.poll().await {
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        let now = now_ns();
                        let mut st = state.lock().map_err(|_| anyhow::anyhow!("poisoned"))?;
                        st.last = Some(Instant::now());
                        match parse_stamp(&p.payload) {
                            Some((ts, pi, seq))
                                if (pi as usize) < publishers && (seq as usize) < messages =>
                            {
                                let idx = pi as usize * messages + seq as usize;
                                if st.seen[idx] {
                                    st.duplicates += 1;
                                } else {
                                    st.seen[idx] = true;
                                    st.received += 1;
                                    st.latencies.push(now.saturating_sub(ts));
                                }
                            }
                            _ => st.foreign += 1,
                        }
                        if st.received == publishers * messages {
                            return Ok::<(), anyhow::Error>(());
                        }
                    }
                    Ok(Event::Outgoing(Outgoing::Disconnect)) => return Ok(()),
                    Ok(_) => {}
                    Err(e) => return Err(anyhow::Error::new(e).context("subscriber connection")),
                }
            }
        };
        std::thread::Builder::new()
            .name("bench-subscriber".into())
            .spawn(move || {
                tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .context("subscriber runtime")?
                    .block_on(receive)
            })
            .context("subscriber thread")?
    };

    // Connect every publisher before the clock starts.
    let mut pubs = Vec::with_capacity(spec.publishers);
    for p in 0..spec.publishers {
        pubs.push(
            connect(
                &format!("bench-pub-{run_id:08x}-{p}"),
                spec.addr,
                spec.inflight,
            )
            .await?,
        );
    }
    let start = Instant::now();
    let deadline = start + spec.deadline;
    let completed = Arc::new(AtomicUsize::new(0));
    let pub_done: Arc<Mutex<Vec<Instant>>> = Arc::new(Mutex::new(Vec::new()));
    let mut tasks = Vec::new();
    for (p, (client, mut el)) in pubs.into_iter().enumerate() {
        let n = spec.messages;
        let qos = spec.qos;
        let completed = completed.clone();
        let pub_done = pub_done.clone();
        let closer = client.clone();
        // Event loop: counts completions (socket write for QoS 0, PUBACK/PUBCOMP otherwise).
        tasks.push(tokio::spawn(async move {
            let mut done = 0usize;
            while done < n {
                let ev = el
                    .poll()
                    .await
                    .with_context(|| format!("publisher {p} connection"))?;
                let finished = matches!(
                    (qos, ev),
                    (QoS::AtMostOnce, Event::Outgoing(Outgoing::Publish(_)))
                        | (QoS::AtLeastOnce, Event::Incoming(Packet::PubAck(_)))
                        | (QoS::ExactlyOnce, Event::Incoming(Packet::PubComp(_)))
                );
                if finished {
                    done += 1;
                    completed.fetch_add(1, Ordering::Relaxed);
                }
            }
            if let Ok(mut d) = pub_done.lock() {
                d.push(Instant::now());
            }
            // Every publish is complete: say goodbye and let the DISCONNECT go out.
            let _ = closer.try_disconnect();
            client_disconnect_and_drain(&mut el).await;
            Ok::<(), anyhow::Error>(())
        }));
        let topic = format!("{}/{p}/t", spec.prefix);
        let payload = spec.payload;
        let interval = spec
            .rate
            .map(|r| Duration::from_secs_f64(spec.publishers as f64 / r.max(0.001)));
        tasks.push(tokio::spawn(async move {
            for seq in 0..n {
                if let Some(iv) = interval {
                    tokio::time::sleep_until((start + iv * seq as u32).into()).await;
                }
                let buf = stamped_payload(payload, p as u32, seq as u32);
                client
                    .publish(topic.as_str(), qos, false, buf)
                    .await
                    .context("publish")?;
            }
            Ok::<(), anyhow::Error>(())
        }));
    }

    // Wait for the publishers (bounded by the deadline), then for the subscriber to drain.
    let mut timed_out = false;
    loop {
        if let Some(t) = tasks.iter().position(|t| t.is_finished()) {
            let t = tasks.swap_remove(t);
            t.await.context("publisher task panicked")??;
        }
        if tasks.is_empty() {
            break;
        }
        if Instant::now() > deadline {
            timed_out = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    for t in &tasks {
        t.abort();
    }
    let publish_end = pub_done
        .lock()
        .ok()
        .and_then(|d| d.iter().max().copied())
        .unwrap_or_else(Instant::now);
    let idle_since = Instant::now();
    loop {
        if sub_task.is_finished() {
            break;
        }
        let last = state.lock().ok().and_then(|s| s.last).unwrap_or(start);
        if Instant::now() > deadline {
            timed_out = true;
            break;
        }
        if last.max(idle_since).elapsed() > spec.drain_idle {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let _ = sub.disconnect().await;
    let gone = Instant::now() + Duration::from_secs(2);
    while !sub_task.is_finished() && Instant::now() < gone {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    if sub_task.is_finished() {
        match sub_task.join() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(e),
            Err(_) => bail!("subscriber thread panicked"),
        }
    } // else left behind: the broker sees the socket close when the program ends
    let mut st = state
        .lock()
        .map_err(|_| anyhow::anyhow!("subscriber state poisoned"))?;
    if st.foreign > 0 {
        eprintln!(
            "note: subscriber got {} messages not from this run",
            st.foreign
        );
    }
    let last = st.last.unwrap_or(start);
    Ok(PubSubResult {
        expected,
        sent: completed.load(Ordering::Relaxed),
        received: st.received,
        duplicates: st.duplicates,
        publish_secs: publish_end.duration_since(start).as_secs_f64(),
        receive_secs: last.duration_since(start).as_secs_f64(),
        latency: Summary::from_nanos(&mut st.latencies),
        timed_out,
    })
}

/// Polls a publisher's event loop for up to one second after its client asked to disconnect.
async fn client_disconnect_and_drain(el: &mut EventLoop) {
    let wait = async {
        loop {
            match el.poll().await {
                Ok(Event::Outgoing(Outgoing::Disconnect)) | Err(_) => return,
                Ok(_) => {}
            }
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(1), wait).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stamp_round_trip() {
        let b = stamped_payload(64, 3, 99);
        assert_eq!(b.len(), 64);
        let (ts, p, s) = parse_stamp(&b).expect("header");
        assert!(ts <= now_ns());
        assert_eq!((p, s), (3, 99));
        assert!(parse_stamp(&b[..10]).is_none());
        assert_eq!(stamped_payload(4, 0, 0).len(), HEADER_LEN);
    }
}
