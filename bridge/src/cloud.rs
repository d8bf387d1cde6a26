//! The cloud connection over either MQTT version (`bridge.protocol`): rumqttc's v4 (3.1.1) or
//! v5 client behind one small surface, so the sender, the session and the state feeds do not
//! care which is spoken.
//!
//! What MQTT 5 adds here: a Session Expiry Interval (`session_expiry_s`: the cloud keeps the
//! node's session and its queued commands that long while the node is away; 3.1.1 keeps it
//! forever or until the broker's own limit), the content type and `content-encoding` user
//! property on batch envelopes (docs/contract.md §5.4), an `edgetwin-node` user property on them
//! naming the node, and PUBACK reason codes: a publish the cloud refuses (e.g. not authorized)
//! is released from the outbox and counted as dropped (`cloud_refused`), not resent forever.

use std::time::Duration;

use bytes::Bytes;
use rumqttc::v5::mqttbytes::v5 as p5;
use rumqttc::v5::mqttbytes::QoS as QoS5;
use rumqttc::QoS;

use crate::config::BridgeProtocol;

/// Extra MQTT 5 properties of a publish (ignored over 3.1.1).
#[derive(Debug, Clone, Default)]
pub struct Meta {
    /// Content Type.
    pub content_type: Option<&'static str>,
    /// User properties.
    pub user: Vec<(String, String)>,
}

/// The client half (cheap to clone; used from several tasks).
#[derive(Clone)]
pub enum Client {
    V4(rumqttc::AsyncClient),
    V5(rumqttc::v5::AsyncClient),
}

/// A message from the cloud, kept until it is acknowledged.
#[derive(Debug)]
pub enum Down {
    V4(rumqttc::Publish),
    V5(p5::Publish),
}

impl Down {
    /// The topic (a non-UTF-8 MQTT 5 topic comes out lossy: it matches no prefix then).
    pub fn topic(&self) -> String {
        match self {
            Down::V4(p) => p.topic.clone(),
            Down::V5(p) => String::from_utf8_lossy(&p.topic).into_owned(),
        }
    }

    /// The payload.
    pub fn payload(&self) -> Bytes {
        match self {
            Down::V4(p) => p.payload.clone(),
            Down::V5(p) => p.payload.clone(),
        }
    }
}

/// What the session acts on, whatever the version.
#[derive(Debug)]
pub enum Ev {
    ConnAck {
        session_present: bool,
    },
    /// PUBACK; `refused` names the reason when the cloud did not take the message.
    PubAck {
        pkid: u16,
        refused: Option<String>,
    },
    OutgoingPublish(u16),
    OutgoingDisconnect,
    Publish(Down),
    Other,
}

/// The event loop half.
pub enum Loop {
    V4(Box<rumqttc::EventLoop>),
    V5(Box<rumqttc::v5::EventLoop>),
}

/// Connection settings common to both versions.
pub struct Settings {
    pub protocol: BridgeProtocol,
    pub client_id: String,
    pub host: String,
    pub port: u16,
    pub keep_alive: Duration,
    pub window: u16,
    pub max_packet_bytes: usize,
    pub credentials: Option<(String, String)>,
    pub tls: Option<rumqttc::TlsConfiguration>,
    /// The will: topic and payload (QoS 1, retained).
    pub will: (String, Vec<u8>),
    /// MQTT 5 Session Expiry Interval, seconds.
    pub session_expiry_s: u32,
    /// Request channel capacity.
    pub capacity: usize,
}

/// Builds the client and its event loop.
pub fn connect(s: Settings) -> (Client, Loop) {
    let mut net = rumqttc::NetworkOptions::new();
    net.set_tcp_nodelay(true);
    net.set_connection_timeout(10);
    match s.protocol {
        BridgeProtocol::V4 => {
            let mut o = rumqttc::MqttOptions::new(s.client_id, s.host, s.port);
            o.set_last_will(rumqttc::LastWill::new(
                s.will.0,
                s.will.1,
                QoS::AtLeastOnce,
                true,
            ));
            o.set_keep_alive(s.keep_alive)
                .set_clean_session(false)
                .set_manual_acks(true)
                .set_inflight(s.window)
                .set_max_packet_size(s.max_packet_bytes, s.max_packet_bytes);
            if let Some((u, p)) = s.credentials {
                o.set_credentials(u, p);
            }
            if let Some(tls) = s.tls {
                o.set_transport(rumqttc::Transport::tls_with_config(tls));
            }
            let (c, mut el) = rumqttc::AsyncClient::new(o, s.capacity);
            el.set_network_options(net);
            (Client::V4(c), Loop::V4(Box::new(el)))
        }
        BridgeProtocol::V5 => {
            let mut o = rumqttc::v5::MqttOptions::new(s.client_id, s.host, s.port);
            o.set_last_will(p5::LastWill::new(
                s.will.0,
                s.will.1,
                QoS5::AtLeastOnce,
                true,
                None,
            ));
            o.set_keep_alive(s.keep_alive)
                .set_clean_start(false)
                .set_session_expiry_interval(Some(s.session_expiry_s))
                .set_manual_acks(true)
                .set_outgoing_inflight_upper_limit(s.window)
                .set_max_packet_size(Some(s.max_packet_bytes as u32))
                .set_network_options(net);
            if let Some((u, p)) = s.credentials {
                o.set_credentials(u, p);
            }
            if let Some(tls) = s.tls {
                o.set_transport(rumqttc::Transport::tls_with_config(tls));
            }
            let (c, el) = rumqttc::v5::AsyncClient::new(o, s.capacity);
            (Client::V5(c), Loop::V5(Box::new(el)))
        }
    }
}

fn qos5(q: QoS) -> QoS5 {
    match q {
        QoS::AtMostOnce => QoS5::AtMostOnce,
        QoS::AtLeastOnce => QoS5::AtLeastOnce,
        QoS::ExactlyOnce => QoS5::ExactlyOnce,
    }
}

/// rumqttc's request channel is full (or the event loop is gone).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Busy(pub String);

/// A publish rumqttc did not take, handed back so the caller can try again without having kept
/// a copy (every record would otherwise be copied once on its way out).
#[derive(Debug, thiserror::Error)]
#[error("{reason}")]
pub struct Unsent {
    /// Why.
    pub reason: String,
    /// The topic and payload, when rumqttc returned them (it does for a full channel).
    pub publish: Option<(String, Vec<u8>)>,
}

impl Client {
    /// Queues a publish without waiting.
    pub fn try_publish(
        &self,
        topic: String,
        qos: QoS,
        retain: bool,
        payload: Vec<u8>,
        meta: Option<&Meta>,
    ) -> Result<(), Unsent> {
        match self {
            Client::V4(c) => c.try_publish(topic, qos, retain, payload).map_err(|e| {
                let reason = e.to_string();
                let publish = match e {
                    rumqttc::ClientError::Request(rumqttc::Request::Publish(p))
                    | rumqttc::ClientError::TryRequest(rumqttc::Request::Publish(p)) => {
                        Some((p.topic, p.payload.to_vec()))
                    }
                    _ => None,
                };
                Unsent { reason, publish }
            }),
            Client::V5(c) => {
                let r = match meta {
                    Some(m) => {
                        let props = p5::PublishProperties {
                            content_type: m.content_type.map(str::to_string),
                            user_properties: m.user.clone(),
                            ..Default::default()
                        };
                        c.try_publish_with_properties(topic, qos5(qos), retain, payload, props)
                    }
                    None => c.try_publish(topic, qos5(qos), retain, payload),
                };
                r.map_err(|e| {
                    let reason = e.to_string();
                    let publish = match e {
                        rumqttc::v5::ClientError::Request(rumqttc::v5::Request::Publish(p))
                        | rumqttc::v5::ClientError::TryRequest(rumqttc::v5::Request::Publish(p)) => {
                            Some((
                                String::from_utf8_lossy(&p.topic).into_owned(),
                                p.payload.to_vec(),
                            ))
                        }
                        _ => None,
                    };
                    Unsent { reason, publish }
                })
            }
        }
    }

    /// Subscribes the filters (QoS 1).
    pub fn try_subscribe_many(&self, filters: Vec<String>) -> Result<(), Busy> {
        match self {
            Client::V4(c) => c
                .try_subscribe_many(
                    filters
                        .into_iter()
                        .map(|f| rumqttc::SubscribeFilter::new(f, QoS::AtLeastOnce)),
                )
                .map_err(|e| Busy(e.to_string())),
            Client::V5(c) => c
                .try_subscribe_many(
                    filters
                        .into_iter()
                        .map(|f| p5::Filter::new(f, QoS5::AtLeastOnce)),
                )
                .map_err(|e| Busy(e.to_string())),
        }
    }

    /// Acknowledges a message from the cloud.
    pub fn try_ack(&self, d: &Down) -> Result<(), Busy> {
        match (self, d) {
            (Client::V4(c), Down::V4(p)) => c.try_ack(p).map_err(|e| Busy(e.to_string())),
            (Client::V5(c), Down::V5(p)) => c.try_ack(p).map_err(|e| Busy(e.to_string())),
            _ => Err(Busy("message of the other protocol version".into())),
        }
    }

    /// Sends DISCONNECT (the broker then does not publish the will).
    pub fn try_disconnect(&self) -> Result<(), Busy> {
        match self {
            Client::V4(c) => c.try_disconnect().map_err(|e| Busy(e.to_string())),
            Client::V5(c) => c.try_disconnect().map_err(|e| Busy(e.to_string())),
        }
    }
}

impl Loop {
    /// The next event; `Err` when the connection failed (call [`Loop::reset`] then).
    pub async fn poll(&mut self) -> Result<Ev, String> {
        match self {
            Loop::V4(el) => {
                use rumqttc::{Event, Outgoing, Packet};
                Ok(match el.poll().await.map_err(|e| e.to_string())? {
                    Event::Incoming(Packet::ConnAck(a)) => Ev::ConnAck {
                        session_present: a.session_present,
                    },
                    Event::Incoming(Packet::PubAck(a)) => Ev::PubAck {
                        pkid: a.pkid,
                        refused: None,
                    },
                    Event::Incoming(Packet::Publish(p)) => Ev::Publish(Down::V4(p)),
                    Event::Outgoing(Outgoing::Publish(pkid)) => Ev::OutgoingPublish(pkid),
                    Event::Outgoing(Outgoing::Disconnect) => Ev::OutgoingDisconnect,
                    _ => Ev::Other,
                })
            }
            Loop::V5(el) => {
                use rumqttc::v5::Event;
                use rumqttc::Outgoing;
                Ok(match el.poll().await.map_err(|e| e.to_string())? {
                    Event::Incoming(p5::Packet::ConnAck(a)) => Ev::ConnAck {
                        session_present: a.session_present,
                    },
                    Event::Incoming(p5::Packet::PubAck(a)) => Ev::PubAck {
                        pkid: a.pkid,
                        refused: refusal(&a),
                    },
                    Event::Incoming(p5::Packet::Publish(p)) => Ev::Publish(Down::V5(p)),
                    Event::Outgoing(Outgoing::Publish(pkid)) => Ev::OutgoingPublish(pkid),
                    Event::Outgoing(Outgoing::Disconnect) => Ev::OutgoingDisconnect,
                    _ => Ev::Other,
                })
            }
        }
    }

    /// Forgets what rumqttc would retransmit, and any request queued since the failure: the
    /// outbox is the only retransmission queue (see the crate docs).
    pub fn reset(&mut self, window: u16) {
        match self {
            Loop::V4(el) => {
                el.clean();
                el.pending.clear();
                el.state = rumqttc::MqttState::new(window, true);
            }
            Loop::V5(el) => {
                el.clean();
                el.pending.clear();
                el.state = rumqttc::v5::MqttState::new(window, true);
            }
        }
    }
}

/// Why an MQTT 5 PUBACK says the cloud did not take the message (`None`: it did).
fn refusal(a: &p5::PubAck) -> Option<String> {
    use p5::PubAckReason as R;
    match a.reason {
        R::Success | R::NoMatchingSubscribers => None,
        r => {
            let why = a
                .properties
                .as_ref()
                .and_then(|p| p.reason_string.clone())
                .map(|s| format!(": {s}"))
                .unwrap_or_default();
            Some(format!("{r:?}{why}"))
        }
    }
}
