//! The one local client API over rumqttd's in-process links: every internal consumer (twin
//! service, bridge tap, container agent, registry, cloud relay) connects with
//! [`LocalClient::connect`], which returns only once the router has acknowledged every
//! subscription, so the node can start its listeners knowing nobody internal misses a message.
//!
//! # Lagging consumers are detected, not silently skipped
//! rumqttd keeps one bounded log per filter and, when a reader falls behind past the log's
//! oldest segment, moves its cursor forward with only a warning in its own log. Each forwarded
//! message carries `(segment, offset)`, where the offset grows by one per message in that
//! filter's log, so the reader task here compares consecutive offsets per filter: a gap is a
//! run of messages this consumer never got. It is counted in
//! `edgetwin_local_link_skipped_messages_total{link}` and logged as an error naming the link
//! and the filter.

use std::time::Duration;

use anyhow::{bail, Context};
use bytes::Bytes;
use rumqttd::local::{LinkRx, LinkTx};
use rumqttd::protocol::{Packet, Publish, PublishProperties};
use rumqttd::{Forward, Notification};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{error, warn};

use crate::embedded::EmbeddedBroker;
use crate::metrics::{BrokerMetrics, LinkLabels};

/// How long the router may take to acknowledge a link's subscriptions at start.
const SUBACK_TIMEOUT: Duration = Duration::from_secs(10);

/// A message to publish on the local broker.
#[derive(Debug, Clone)]
pub struct Message {
    /// The topic name.
    pub topic: String,
    /// The payload (empty + retained clears a retained message).
    pub payload: Bytes,
    /// Whether the broker keeps it as the topic's retained message.
    pub retain: bool,
    /// MQTT 5 properties (response topic, correlation data), if any.
    pub props: Option<PublishProperties>,
}

impl Message {
    /// A plain, non-retained message.
    pub fn new(topic: impl Into<String>, payload: impl Into<Bytes>) -> Message {
        Message {
            topic: topic.into(),
            payload: payload.into(),
            retain: false,
            props: None,
        }
    }

    /// A retained message.
    pub fn retained(topic: impl Into<String>, payload: impl Into<Bytes>) -> Message {
        Message {
            retain: true,
            ..Message::new(topic, payload)
        }
    }

    /// The JSON encoding of `value` (our payload types always serialise).
    pub fn json<T: serde::Serialize>(topic: impl Into<String>, value: &T) -> Message {
        Message::new(topic, exact(serde_json::to_vec(value).unwrap_or_default()))
    }
}

/// `payload` as [`Bytes`] without the spare capacity an encoder's doubling left in it: a
/// retained payload lives as long as the broker keeps it (an 828-byte assignment sits in a
/// 1,024-byte buffer otherwise, 2 MiB at 10k devices).
pub fn exact(mut payload: Vec<u8>) -> Bytes {
    payload.shrink_to_fit();
    Bytes::from(payload)
}

/// The publishing half of an in-process client.
pub struct LocalClient {
    tx: LinkTx,
    name: &'static str,
}

impl LocalClient {
    /// Connects `name` (also its client id) to the router, subscribes `filters`, waits until the
    /// router acknowledged every one, and starts the task that feeds the returned receiver
    /// (bounded by `capacity`: when it is full, the task stops reading and rumqttd buffers, which
    /// is where lag detection takes over).
    pub async fn connect(
        broker: &EmbeddedBroker,
        name: &'static str,
        filters: &[&str],
        capacity: usize,
        shutdown: CancellationToken,
        tracker: &TaskTracker,
    ) -> anyhow::Result<(LocalClient, mpsc::Receiver<Forward>)> {
        let (out_tx, out_rx) = mpsc::channel(capacity.max(1));
        let client = Self::connect_into(broker, name, filters, out_tx, shutdown, tracker).await?;
        Ok((client, out_rx))
    }

    /// [`connect`](Self::connect), delivering into a channel the caller owns (the twin service
    /// takes every kind of input on one channel).
    pub async fn connect_into<T: From<Forward> + Send + 'static>(
        broker: &EmbeddedBroker,
        name: &'static str,
        filters: &[&str],
        out: mpsc::Sender<T>,
        shutdown: CancellationToken,
        tracker: &TaskTracker,
    ) -> anyhow::Result<LocalClient> {
        let (mut tx, mut rx) = broker.link(name)?;
        for f in filters {
            tx.subscribe(*f)
                .with_context(|| format!("{name} cannot subscribe {f}"))?;
        }
        let early = wait_for_subacks(&mut rx, name, filters.len()).await?;
        let reader = Reader {
            name,
            filters: filters.iter().map(|f| f.to_string()).collect(),
            last: vec![None; filters.len()],
            metrics: broker.metrics().clone(),
        };
        tracker.spawn(reader.run(early, rx, out, shutdown));
        Ok(LocalClient { tx, name })
    }

    /// Publishes on the local broker. rumqttd's `send` queues the packet and wakes the router; it
    /// never awaits anything (it can block the thread briefly while the router's channel is full,
    /// which is the router's own back-pressure), so awaiting it here completes at once.
    pub async fn publish(&mut self, m: Message) {
        let mut publish = Publish::new(Bytes::from(m.topic.clone()), m.payload, m.retain);
        publish.retain = m.retain;
        if let Err(e) = self.tx.send(Packet::Publish(publish, m.props)).await {
            warn!(link = self.name, topic = %m.topic, error = %e, "cannot publish to the embedded broker");
        }
    }

    /// Subscribes once more (the bridge does this on reconnect to be handed the retained
    /// messages again); not awaited: the acknowledgement is read and dropped by the reader.
    pub fn resubscribe(&mut self, filter: &str) -> anyhow::Result<()> {
        let fail = |e: rumqttd::local::LinkError| {
            anyhow::anyhow!("{} cannot resubscribe {filter}: {e}", self.name)
        };
        self.tx.unsubscribe(filter).map_err(fail)?;
        self.tx.subscribe(filter).map_err(fail)?;
        Ok(())
    }
}

/// Reads notifications until `n` SubAcks arrived; returns the messages that came meanwhile.
async fn wait_for_subacks(rx: &mut LinkRx, name: &str, n: usize) -> anyhow::Result<Vec<Forward>> {
    let mut early = Vec::new();
    let mut acked = 0;
    let deadline = tokio::time::Instant::now() + SUBACK_TIMEOUT;
    while acked < n {
        let next = tokio::time::timeout_at(deadline, rx.next())
            .await
            .with_context(|| format!("{name}: the broker did not acknowledge its subscriptions within {SUBACK_TIMEOUT:?}"))?
            .with_context(|| format!("{name}: broker link closed while subscribing"))?;
        match next {
            Some(Notification::Forward(f)) => early.push(f),
            Some(Notification::Unschedule) => rx
                .wake()
                .await
                .with_context(|| format!("{name}: broker link wake failed"))?,
            Some(other) => {
                if let Some(Packet::SubAck(ack, _)) = Option::<Packet>::from(other) {
                    use rumqttd::protocol::SubscribeReasonCode as Code;
                    let refused = ack.return_codes.iter().any(|c| {
                        !matches!(c, Code::QoS0 | Code::QoS1 | Code::QoS2 | Code::Success(_))
                    });
                    if refused {
                        bail!("{name}: the broker refused a subscription: {ack:?}");
                    }
                    acked += 1;
                }
            }
            None => {}
        }
    }
    Ok(early)
}

/// Moves notifications into the channel and accounts for skipped messages.
struct Reader {
    name: &'static str,
    filters: Vec<String>,
    /// Last offset seen per filter (by index into `filters`).
    last: Vec<Option<u64>>,
    metrics: BrokerMetrics,
}

impl Reader {
    async fn run<T: From<Forward>>(
        mut self,
        early: Vec<Forward>,
        mut rx: LinkRx,
        tx: mpsc::Sender<T>,
        shutdown: CancellationToken,
    ) {
        for f in early {
            self.account(&f);
            if tx.send(f.into()).await.is_err() {
                return;
            }
        }
        loop {
            let next = tokio::select! {
                _ = shutdown.cancelled() => break,
                n = rx.next() => n,
            };
            match next {
                Ok(Some(Notification::Forward(f))) => {
                    self.account(&f);
                    if tx.send(f.into()).await.is_err() {
                        break;
                    }
                }
                // The router stops feeding a link whose buffer filled up until the link says it
                // is ready again.
                Ok(Some(Notification::Unschedule)) => {
                    if let Err(e) = rx.wake().await {
                        error!(link = self.name, error = %e, "broker link wake failed");
                        break;
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    error!(link = self.name, error = %e, "broker link closed");
                    break;
                }
            }
        }
    }

    /// Compares the message's log offset with the last one of its filter.
    fn account(&mut self, f: &Forward) {
        let Some((_, offset)) = f.cursor else {
            return; // retained messages carry no cursor
        };
        let Ok(topic) = std::str::from_utf8(&f.publish.topic) else {
            return;
        };
        // A topic can match several of the link's filters; rumqttd then forwards it once per
        // filter, each with its own log's offset. The first filter whose offsets it continues is
        // the one it came from.
        // This runs for every message: no allocation, one pass over the link's few filters.
        let mut first = None;
        let mut continues = None;
        for (i, f) in self.filters.iter().enumerate() {
            if !edgetwin_contract::topic::filter::matches(f, topic) {
                continue;
            }
            first.get_or_insert(i);
            if self.last[i].is_none_or(|l| offset == l + 1) {
                continues = Some(i);
                break;
            }
        }
        let Some(idx) = continues.or(first) else {
            return;
        };
        if let Some(last) = self.last[idx].replace(offset) {
            if offset > last + 1 {
                let skipped = offset - last - 1;
                self.metrics
                    .local_link_skipped
                    .get_or_create(&LinkLabels {
                        link: self.name.to_string(),
                    })
                    .inc_by(skipped);
                error!(
                    link = self.name,
                    filter = %self.filters[idx],
                    skipped,
                    "consumer fell behind the broker's log: messages were skipped"
                );
            }
        }
    }
}
