//! The readiness canary: a real MQTT client that asks the twin service for a twin through the
//! front door's listener, the way every mapper and engineer comes in, and turns readiness off
//! when no answer comes. A stalled twin service, a dead listener, a wedged front door or router
//! all look the same from outside — requests go unanswered — and that is what it measures.
//! Where every listener wants TLS it asks through the embedded broker's in-process link instead
//! (it has no client certificate), which still covers the router and the twin service.
//!
//! It asks for [`CANARY_DEVICE`], which no profile may register (the registry refuses the name),
//! so the answer is always an `unknown_device` error: nothing is stored, nothing is written to
//! flash, and the twin service does not count these in its rejection metric.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use edgetwin_broker::{LocalClient, Message};
use edgetwin_contract::{DeviceId, ErrorMsg, GetRequest, Topic};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tracing::debug;

use crate::health::{Health, Verdict};

/// The device id the canary asks for; reserved.
pub const CANARY_DEVICE: &str = "edgetwin-canary";
/// The readiness check the canary owns.
pub const CHECK: &str = "twin service answers over MQTT";

/// How often the canary asks, and how long an answer may take.
#[derive(Debug, Clone, Copy)]
pub struct Timing {
    /// Time between requests.
    pub every: Duration,
    /// Longest wait for the answer.
    pub within: Duration,
}

/// The way the canary's requests go in.
pub enum Via {
    /// A front-door listener, with the node's own login.
    Listener(SocketAddr, (String, String)),
    /// The embedded broker's in-process link, subscribed to [`reply_filter`] already.
    Broker(LocalClient, mpsc::Receiver<rumqttd::Forward>),
}

/// The topic the canary's answers come on (a [`Via::Broker`] link subscribes it).
pub fn reply_filter() -> String {
    DeviceId::new(CANARY_DEVICE)
        .map(|d| Topic::Error(d).to_topic_string())
        .unwrap_or_default()
}

/// What the transport tells the asking loop.
struct Wires {
    /// Whether the reply subscription is in place; asking before it is would miss the answer.
    subscribed: watch::Sender<bool>,
    /// Ids of the answers that came.
    answers: mpsc::Sender<String>,
    /// Connection errors.
    conn: mpsc::Sender<String>,
}

impl Wires {
    fn answer(&self, payload: &[u8]) {
        if let Ok(msg) = serde_json::from_slice::<ErrorMsg>(payload) {
            let _ = self.answers.try_send(msg.id.unwrap_or_default());
        }
    }
}

/// Runs until shutdown.
pub async fn run(
    via: Via,
    node: String,
    health: Arc<Health>,
    timing: Timing,
    shutdown: CancellationToken,
) {
    let Ok(device) = DeviceId::new(CANARY_DEVICE) else {
        return;
    };
    let get = Topic::Get(device.clone()).to_topic_string();
    let (answers_tx, mut answers) = mpsc::channel::<String>(16);
    let (conn_tx, mut conn) = mpsc::channel::<String>(4);
    let (subscribed_tx, mut subscribed) = watch::channel(false);
    let (requests_tx, requests) = mpsc::channel::<Vec<u8>>(4);
    let wires = Wires {
        subscribed: subscribed_tx,
        answers: answers_tx,
        conn: conn_tx,
    };
    let target = match &via {
        Via::Listener(addr, _) => {
            format!("the MQTT listener {}", edgetwin_broker::loopback(*addr))
        }
        Via::Broker(..) => "the embedded broker (every listener wants TLS)".to_string(),
    };
    let transport = async {
        match via {
            Via::Listener(addr, login) => {
                by_listener(addr, login, &node, &get, wires, requests).await
            }
            Via::Broker(client, rx) => by_broker(client, rx, &get, wires, requests).await,
        }
    };
    let ask = async {
        let mut n: u64 = 0;
        let mut tick = tokio::time::interval(timing.every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            // The watch guard must not live across an await (it is not `Send`).
            let ready = matches!(
                tokio::time::timeout(timing.within, subscribed.wait_for(|s| *s)).await,
                Ok(Ok(_))
            );
            if !ready {
                let why = match conn.try_recv() {
                    Ok(e) => format!("cannot reach {target}: {e}"),
                    Err(_) => format!("no subscription at {target} within {:?}", timing.within),
                };
                health.set(CHECK, Verdict::Failing(why));
                continue;
            }
            n += 1;
            let id = format!("canary-{n}");
            let req = serde_json::to_vec(&GetRequest {
                id: Some(id.clone()),
            })
            .unwrap_or_default();
            let verdict = match requests_tx.try_send(req) {
                Err(e) => Verdict::Failing(format!("canary cannot publish: {e}")),
                Ok(()) => wait_for(&mut answers, &mut conn, &id, timing.within, &target).await,
            };
            debug!(?verdict, "canary");
            health.set(CHECK, verdict);
        }
    };
    tokio::select! {
        _ = shutdown.cancelled() => {}
        _ = transport => {}
        _ = ask => {}
    }
}

/// Asks through a front-door listener with rumqttc, reconnecting as a client does.
async fn by_listener(
    listener: SocketAddr,
    login: (String, String),
    node: &str,
    get: &str,
    wires: Wires,
    mut requests: mpsc::Receiver<Vec<u8>>,
) {
    let target = edgetwin_broker::loopback(listener);
    let mut opts = MqttOptions::new(
        format!("edgetwin-canary-{node}"),
        target.ip().to_string(),
        target.port(),
    );
    opts.set_keep_alive(Duration::from_secs(5))
        .set_clean_session(true)
        .set_credentials(login.0, login.1);
    let (client, mut eventloop) = AsyncClient::new(opts, 16);
    let reply = reply_filter();
    let poll = async {
        loop {
            match eventloop.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(_))) => {
                    let _ = client.subscribe(reply.clone(), QoS::AtMostOnce).await;
                }
                Ok(Event::Incoming(Packet::SubAck(_))) => {
                    wires.subscribed.send_replace(true);
                }
                Ok(Event::Incoming(Packet::Publish(p))) => wires.answer(&p.payload),
                Ok(_) => {}
                Err(e) => {
                    wires.subscribed.send_replace(false);
                    let _ = wires.conn.try_send(e.to_string());
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            }
        }
    };
    let publish = async {
        while let Some(req) = requests.recv().await {
            if let Err(e) = client.publish(get, QoS::AtMostOnce, false, req).await {
                let _ = wires.conn.try_send(format!("cannot publish: {e}"));
            }
        }
    };
    tokio::select! {
        _ = poll => {}
        _ = publish => {}
    }
    let _ = client.try_disconnect();
}

/// Asks through the embedded broker's in-process link.
async fn by_broker(
    mut client: LocalClient,
    mut rx: mpsc::Receiver<rumqttd::Forward>,
    get: &str,
    wires: Wires,
    mut requests: mpsc::Receiver<Vec<u8>>,
) {
    // The link subscribed before it was handed over.
    wires.subscribed.send_replace(true);
    let answers = async {
        while let Some(f) = rx.recv().await {
            wires.answer(&f.publish.payload);
        }
        let _ = wires.conn.try_send("the in-process link ended".to_string());
        wires.subscribed.send_replace(false);
        std::future::pending::<()>().await;
    };
    let publish = async {
        while let Some(req) = requests.recv().await {
            client.publish(Message::new(get, req)).await;
        }
    };
    tokio::select! {
        _ = answers => {}
        _ = publish => {}
    }
}

async fn wait_for(
    answers: &mut mpsc::Receiver<String>,
    conn: &mut mpsc::Receiver<String>,
    id: &str,
    within: Duration,
    target: &str,
) -> Verdict {
    let deadline = tokio::time::Instant::now() + within;
    let mut last_conn_error = None;
    loop {
        tokio::select! {
            _ = tokio::time::sleep_until(deadline) => {
                return Verdict::Failing(match last_conn_error {
                    Some(e) => format!("cannot reach {target}: {e}"),
                    None => format!("the twin service did not answer a request through {target} within {within:?}"),
                });
            }
            Some(got) = answers.recv() => {
                if got == id {
                    return Verdict::Ok;
                }
            }
            Some(e) = conn.recv() => last_conn_error = Some(e),
        }
    }
}
