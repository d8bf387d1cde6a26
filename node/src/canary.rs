//! The readiness canary: a real MQTT client that asks the twin service for a twin through the
//! broker's TCP listener, the way every mapper and engineer comes in, and turns readiness off
//! when no answer comes. A stalled twin service, a dead listener thread or a wedged router all
//! look the same from outside — requests go unanswered — and that is what it measures.
//!
//! It asks for [`CANARY_DEVICE`], which no profile may register (the registry refuses the name),
//! so the answer is always an `unknown_device` error: nothing is stored, nothing is written to
//! flash, and the twin service does not count these in its rejection metric.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use edgetwin_contract::{DeviceId, ErrorMsg, GetRequest, Topic};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use tokio::sync::mpsc;
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

/// Runs until shutdown.
pub async fn run(
    listener: SocketAddr,
    login: (String, String),
    node: String,
    health: Arc<Health>,
    timing: Timing,
    shutdown: CancellationToken,
) {
    let target = edgetwin_broker::loopback(listener);
    let Ok(device) = DeviceId::new(CANARY_DEVICE) else {
        return;
    };
    let mut opts = MqttOptions::new(
        format!("edgetwin-canary-{node}"),
        target.ip().to_string(),
        target.port(),
    );
    opts.set_keep_alive(Duration::from_secs(5))
        .set_clean_session(true)
        .set_credentials(login.0, login.1);
    let (client, mut eventloop) = AsyncClient::new(opts, 16);
    let (answers_tx, mut answers) = mpsc::channel::<String>(16);
    let (conn_tx, mut conn) = mpsc::channel::<String>(4);
    // Whether the reply subscription is in place; asking before it is would miss the answer.
    let (subscribed_tx, mut subscribed) = tokio::sync::watch::channel(false);
    let reply = Topic::Error(device.clone()).to_topic_string();
    let poll = {
        let reply = reply.clone();
        let client = client.clone();
        async move {
            loop {
                match eventloop.poll().await {
                    Ok(Event::Incoming(Packet::ConnAck(_))) => {
                        let _ = client.subscribe(reply.clone(), QoS::AtMostOnce).await;
                    }
                    Ok(Event::Incoming(Packet::SubAck(_))) => {
                        subscribed_tx.send_replace(true);
                    }
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        if let Ok(msg) = serde_json::from_slice::<ErrorMsg>(&p.payload) {
                            let _ = answers_tx.try_send(msg.id.unwrap_or_default());
                        }
                    }
                    Ok(_) => {}
                    Err(e) => {
                        subscribed_tx.send_replace(false);
                        let _ = conn_tx.try_send(e.to_string());
                        tokio::time::sleep(Duration::from_millis(500)).await;
                    }
                }
            }
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
                    Ok(e) => format!("cannot reach the MQTT listener {target}: {e}"),
                    Err(_) => format!(
                        "no subscription at the MQTT listener {target} within {:?}",
                        timing.within
                    ),
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
            let get = Topic::Get(device.clone()).to_topic_string();
            let verdict = match client.publish(get, QoS::AtMostOnce, false, req).await {
                Err(e) => Verdict::Failing(format!("canary cannot publish: {e}")),
                Ok(()) => wait_for(&mut answers, &mut conn, &id, timing.within, target).await,
            };
            debug!(?verdict, "canary");
            health.set(CHECK, verdict);
        }
    };
    tokio::select! {
        _ = shutdown.cancelled() => {}
        _ = poll => {}
        _ = ask => {}
    }
    let _ = client.try_disconnect();
}

async fn wait_for(
    answers: &mut mpsc::Receiver<String>,
    conn: &mut mpsc::Receiver<String>,
    id: &str,
    within: Duration,
    target: SocketAddr,
) -> Verdict {
    let deadline = tokio::time::Instant::now() + within;
    let mut last_conn_error = None;
    loop {
        tokio::select! {
            _ = tokio::time::sleep_until(deadline) => {
                return Verdict::Failing(match last_conn_error {
                    Some(e) => format!("cannot reach the MQTT listener {target}: {e}"),
                    None => format!("the twin service did not answer a request through the MQTT listener {target} within {within:?}"),
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
