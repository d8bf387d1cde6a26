//! Packet framing and inspection on top of rumqttc's maintained MQTT codecs
//! (`rumqttc::mqttbytes::v4` and `rumqttc::v5::mqttbytes::v5`); no MQTT encoding is written here.
//!
//! The relay frames every packet (fixed header only) and forwards its raw bytes; it decodes a
//! packet only when it has to look inside (CONNECT, PUBLISH, SUBSCRIBE, UNSUBSCRIBE, PUBREL,
//! SUBACK), and encodes only the packets the gate answers itself (acks, refusals).

use bytes::{Bytes, BytesMut};
use rumqttc::mqttbytes::{self as m4, v4};
use rumqttc::v5::mqttbytes::{self as m5, v5};

/// MQTT protocol version of a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    /// MQTT 3.1.1 (protocol level 4).
    V4,
    /// MQTT 5 (protocol level 5).
    V5,
}

impl Version {
    /// The label value (`v4`, `v5`).
    pub fn label(self) -> &'static str {
        match self {
            Version::V4 => "v4",
            Version::V5 => "v5",
        }
    }
}

/// Why a byte stream is not acceptable MQTT.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PacketError {
    /// The packet is larger than the limit.
    #[error("packet of {0} bytes exceeds max_packet_bytes")]
    TooLarge(usize),
    /// The bytes are not a valid packet.
    #[error("malformed packet: {0}")]
    Malformed(String),
    /// CONNECT with a protocol level other than 4 or 5.
    #[error("unsupported protocol level {0}")]
    UnsupportedLevel(u8),
}

fn m4_err(e: m4::Error) -> PacketError {
    match e {
        m4::Error::PayloadSizeLimitExceeded(n) => PacketError::TooLarge(n),
        e => PacketError::Malformed(e.to_string()),
    }
}

fn m5_err(e: m5::Error) -> PacketError {
    match e {
        m5::Error::PayloadSizeLimitExceeded { pkt_size, .. } => PacketError::TooLarge(pkt_size),
        e => PacketError::Malformed(e.to_string()),
    }
}

/// Control packet types (the high nibble of the first byte).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// CONNECT.
    Connect,
    /// CONNACK.
    ConnAck,
    /// PUBLISH.
    Publish,
    /// PUBACK.
    PubAck,
    /// PUBREC.
    PubRec,
    /// PUBREL.
    PubRel,
    /// PUBCOMP.
    PubComp,
    /// SUBSCRIBE.
    Subscribe,
    /// SUBACK.
    SubAck,
    /// UNSUBSCRIBE.
    Unsubscribe,
    /// UNSUBACK.
    UnsubAck,
    /// PINGREQ.
    PingReq,
    /// PINGRESP.
    PingResp,
    /// DISCONNECT.
    Disconnect,
    /// AUTH (MQTT 5 only).
    Auth,
}

impl Kind {
    fn of(byte1: u8, version: Version) -> Result<Kind, PacketError> {
        Ok(match byte1 >> 4 {
            1 => Kind::Connect,
            2 => Kind::ConnAck,
            3 => Kind::Publish,
            4 => Kind::PubAck,
            5 => Kind::PubRec,
            6 => Kind::PubRel,
            7 => Kind::PubComp,
            8 => Kind::Subscribe,
            9 => Kind::SubAck,
            10 => Kind::Unsubscribe,
            11 => Kind::UnsubAck,
            12 => Kind::PingReq,
            13 => Kind::PingResp,
            14 => Kind::Disconnect,
            15 if version == Version::V5 => Kind::Auth,
            n => return Err(PacketError::Malformed(format!("packet type {n}"))),
        })
    }
}

#[derive(Debug, Clone, Copy)]
enum Header {
    V4(m4::FixedHeader),
    V5(v5::FixedHeader),
}

/// One whole packet, framed but not decoded.
#[derive(Debug, Clone)]
pub struct Frame {
    /// The packet type.
    pub kind: Kind,
    /// The whole packet, fixed header included.
    pub raw: Bytes,
    header: Header,
}

/// Takes the next whole packet off `buf`; `Ok(None)` when more bytes are needed.
pub fn next_frame(
    buf: &mut BytesMut,
    version: Version,
    max_packet_bytes: usize,
) -> Result<Option<Frame>, PacketError> {
    let header = match version {
        Version::V4 => match m4::check(buf.iter(), max_packet_bytes) {
            Ok(h) => Header::V4(h),
            Err(m4::Error::InsufficientBytes(_)) => return Ok(None),
            Err(e) => return Err(m4_err(e)),
        },
        Version::V5 => {
            let max = u32::try_from(max_packet_bytes).unwrap_or(u32::MAX);
            match v5::check(buf.iter(), Some(max)) {
                Ok(h) => Header::V5(h),
                Err(m5::Error::InsufficientBytes(_)) => return Ok(None),
                Err(e) => return Err(m5_err(e)),
            }
        }
    };
    let len = match header {
        Header::V4(h) => h.frame_length(),
        Header::V5(h) => h.frame_length(),
    };
    let byte1 = buf.first().copied().unwrap_or(0);
    let kind = Kind::of(byte1, version)?;
    let raw = buf.split_to(len).freeze();
    Ok(Some(Frame { kind, raw, header }))
}

/// The parts of a PUBLISH the gate looks at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublishView {
    /// Topic name; empty when a v5 topic alias stands for it.
    pub topic: String,
    /// QoS 0, 1 or 2.
    pub qos: u8,
    /// Packet id (0 for QoS 0).
    pub pkid: u16,
    /// v5 topic alias.
    pub topic_alias: Option<u16>,
    /// v5 response topic.
    pub response_topic: Option<String>,
    /// The application message (a slice of the frame, not a copy).
    pub payload: Bytes,
    /// The retain flag.
    pub retain: bool,
}

impl PublishView {
    /// The parts of a decoded PUBLISH (either version's, in its MQTT 5 form).
    pub fn of(p: &v5::Publish) -> Result<PublishView, PacketError> {
        let topic = String::from_utf8(p.topic.to_vec())
            .map_err(|_| PacketError::Malformed("topic is not UTF-8".into()))?;
        let (topic_alias, response_topic) = match &p.properties {
            Some(pr) => (pr.topic_alias, pr.response_topic.clone()),
            None => (None, None),
        };
        Ok(PublishView {
            topic,
            qos: p.qos as u8,
            pkid: p.pkid,
            topic_alias,
            response_topic,
            payload: p.payload.clone(),
            retain: p.retain,
        })
    }
}

impl Frame {
    /// Decodes a PUBLISH.
    pub fn publish(&self) -> Result<PublishView, PacketError> {
        PublishView::of(&self.publish_v5()?)
    }

    /// A PUBLISH in its MQTT 5 form, whatever the client's version (the broker is always spoken
    /// to in MQTT 5; a 3.1.1 publish has no properties).
    pub fn publish_v5(&self) -> Result<v5::Publish, PacketError> {
        match self.header {
            Header::V4(h) => {
                let p = v4::Publish::read(h, self.raw.clone()).map_err(m4_err)?;
                Ok(v5::Publish {
                    dup: p.dup,
                    qos: qos5(p.qos as u8),
                    retain: p.retain,
                    topic: Bytes::from(p.topic),
                    pkid: p.pkid,
                    payload: p.payload,
                    properties: None,
                })
            }
            Header::V5(h) => v5::Publish::read(h, self.raw.clone()).map_err(m5_err),
        }
    }

    /// A SUBSCRIBE in its MQTT 5 form (a 3.1.1 filter has only its QoS).
    pub fn subscribe_v5(&self) -> Result<v5::Subscribe, PacketError> {
        match self.header {
            Header::V4(h) => {
                let s = v4::Subscribe::read(h, self.raw.clone()).map_err(m4_err)?;
                Ok(v5::Subscribe {
                    pkid: s.pkid,
                    filters: s
                        .filters
                        .into_iter()
                        .map(|f| v5::Filter::new(f.path, qos5(f.qos as u8)))
                        .collect(),
                    properties: None,
                })
            }
            Header::V5(h) => v5::Subscribe::read(h, self.raw.clone()).map_err(m5_err),
        }
    }

    /// An UNSUBSCRIBE in its MQTT 5 form.
    pub fn unsubscribe_v5(&self) -> Result<v5::Unsubscribe, PacketError> {
        match self.header {
            Header::V4(h) => {
                let s = v4::Unsubscribe::read(h, self.raw.clone()).map_err(m4_err)?;
                Ok(v5::Unsubscribe {
                    pkid: s.pkid,
                    filters: s.topics,
                    properties: None,
                })
            }
            Header::V5(h) => v5::Unsubscribe::read(h, self.raw.clone()).map_err(m5_err),
        }
    }

    /// The broker's CONNACK for a client of `version`, saying `present` for Session Present
    /// (the gate keeps the session table, see [`crate::sessions`]); 3.1.1 gets the nearest
    /// return code.
    pub fn connack_for(&self, version: Version, present: bool) -> Result<Bytes, PacketError> {
        let Header::V5(h) = self.header else {
            return Err(PacketError::Malformed("not an MQTT 5 CONNACK".into()));
        };
        let mut a = v5::ConnAck::read(h, self.raw.clone()).map_err(m5_err)?;
        let ok = a.code == v5::ConnectReturnCode::Success;
        let mut out = BytesMut::new();
        if version == Version::V5 {
            a.session_present = ok && present;
            a.write(&mut out).map_err(m5_err)?;
            return Ok(out.freeze());
        }
        use v5::ConnectReturnCode as C5;
        let code = match a.code {
            C5::Success => v4::ConnectReturnCode::Success,
            C5::UnsupportedProtocolVersion | C5::RefusedProtocolVersion => {
                v4::ConnectReturnCode::RefusedProtocolVersion
            }
            C5::ClientIdentifierNotValid | C5::BadClientId => v4::ConnectReturnCode::BadClientId,
            C5::BadUserNamePassword => v4::ConnectReturnCode::BadUserNamePassword,
            C5::NotAuthorized | C5::Banned => v4::ConnectReturnCode::NotAuthorized,
            _ => v4::ConnectReturnCode::ServiceUnavailable,
        };
        v4::ConnAck {
            session_present: ok && present,
            code,
        }
        .write(&mut out)
        .map_err(m4_err)?;
        Ok(out.freeze())
    }

    /// The Session Expiry Interval of an MQTT 5 DISCONNECT, if it has one.
    pub fn disconnect_session_expiry(&self) -> Result<Option<u32>, PacketError> {
        // Remaining length 0 or 1: no properties (the codec wants them after a reason code).
        if self.raw.len() <= 3 {
            return Ok(None);
        }
        match self.header {
            Header::V5(h) => Ok(v5::Disconnect::read(h, self.raw.clone())
                .map_err(m5_err)?
                .properties
                .and_then(|p| p.session_expiry_interval)),
            Header::V4(_) => Ok(None),
        }
    }

    /// The broker's PUBACK, PUBREC, PUBREL, PUBCOMP or UNSUBACK for a client of `version`:
    /// 3.1.1 has only the packet id (an MQTT 5 broker may add a reason and properties).
    pub fn ack_for(&self, version: Version) -> Result<Bytes, PacketError> {
        if version == Version::V5 || self.raw.len() == 4 {
            return Ok(self.raw.clone());
        }
        let pkid = match self.raw.get(2..4) {
            Some(b) => u16::from_be_bytes([b[0], b[1]]),
            None => {
                return Err(PacketError::Malformed(
                    "acknowledgement without packet id".into(),
                ))
            }
        };
        let first = match self.kind {
            Kind::PubRel => 0x62,
            _ => self.raw[0] & 0xF0,
        };
        Ok(Bytes::from(vec![first, 2, (pkid >> 8) as u8, pkid as u8]))
    }

    /// The packet id of a PUBREL.
    pub fn pubrel_pkid(&self) -> Result<u16, PacketError> {
        match self.header {
            Header::V4(h) => Ok(v4::PubRel::read(h, self.raw.clone()).map_err(m4_err)?.pkid),
            Header::V5(h) => Ok(v5::PubRel::read(h, self.raw.clone()).map_err(m5_err)?.pkid),
        }
    }

    /// The packet id of a PUBACK, PUBREC or PUBCOMP.
    pub fn ack_pkid(&self) -> Result<u16, PacketError> {
        match (self.kind, self.header) {
            (Kind::PubAck, Header::V4(h)) => {
                Ok(v4::PubAck::read(h, self.raw.clone()).map_err(m4_err)?.pkid)
            }
            (Kind::PubAck, Header::V5(h)) => {
                Ok(v5::PubAck::read(h, self.raw.clone()).map_err(m5_err)?.pkid)
            }
            (Kind::PubRec, Header::V4(h)) => {
                Ok(v4::PubRec::read(h, self.raw.clone()).map_err(m4_err)?.pkid)
            }
            (Kind::PubRec, Header::V5(h)) => {
                Ok(v5::PubRec::read(h, self.raw.clone()).map_err(m5_err)?.pkid)
            }
            (Kind::PubComp, Header::V4(h)) => {
                Ok(v4::PubComp::read(h, self.raw.clone()).map_err(m4_err)?.pkid)
            }
            (Kind::PubComp, Header::V5(h)) => {
                Ok(v5::PubComp::read(h, self.raw.clone()).map_err(m5_err)?.pkid)
            }
            _ => Err(PacketError::Malformed(
                "not a PUBACK, PUBREC or PUBCOMP".into(),
            )),
        }
    }

    /// A SUBACK from the broker, decoded (the broker speaks MQTT 5).
    pub fn suback_v5(&self) -> Result<v5::SubAck, PacketError> {
        match self.header {
            Header::V5(h) => v5::SubAck::read(h, self.raw.clone()).map_err(m5_err),
            Header::V4(_) => Err(PacketError::Malformed("not an MQTT 5 SUBACK".into())),
        }
    }
}

/// The MQTT 5 codec's QoS for 0, 1 or 2 (anything higher is 2).
pub fn qos5(n: u8) -> m5::QoS {
    match n {
        0 => m5::QoS::AtMostOnce,
        1 => m5::QoS::AtLeastOnce,
        _ => m5::QoS::ExactlyOnce,
    }
}

/// A PUBLISH encoded for a client of `version` (3.1.1 drops the properties).
pub fn write_publish(version: Version, p: &v5::Publish) -> Result<Bytes, PacketError> {
    let mut out = BytesMut::new();
    match version {
        Version::V5 => {
            p.write(&mut out).map_err(m5_err)?;
        }
        Version::V4 => {
            let topic = String::from_utf8(p.topic.to_vec())
                .map_err(|_| PacketError::Malformed("topic is not UTF-8".into()))?;
            let q = v4::Publish {
                dup: p.dup,
                qos: m4::qos(p.qos as u8).map_err(m4_err)?,
                retain: p.retain,
                topic,
                pkid: p.pkid,
                payload: p.payload.clone(),
            };
            q.write(&mut out).map_err(m4_err)?;
        }
    }
    Ok(out.freeze())
}

/// An MQTT 5 packet's bytes (for the broker).
pub fn write_v5_subscribe(s: &v5::Subscribe) -> Result<Bytes, PacketError> {
    let mut out = BytesMut::new();
    s.write(&mut out).map_err(m5_err)?;
    Ok(out.freeze())
}

/// An MQTT 5 UNSUBSCRIBE's bytes (for the broker).
pub fn write_v5_unsubscribe(s: &v5::Unsubscribe) -> Result<Bytes, PacketError> {
    let mut out = BytesMut::new();
    s.write(&mut out).map_err(m5_err)?;
    Ok(out.freeze())
}

/// The broker's MQTT 5 SUBACK for a client of `version`, widened back to the client's filter
/// list when some filters were not passed on (`allowed[i]` false: "not authorized" there).
pub fn suback_for(
    version: Version,
    mut s: v5::SubAck,
    allowed: Option<&[bool]>,
) -> Result<Bytes, PacketError> {
    if let Some(allowed) = allowed {
        s.return_codes = merge(
            s.return_codes,
            allowed,
            v5::SubscribeReasonCode::NotAuthorized,
        )?;
    }
    let mut out = BytesMut::new();
    match version {
        Version::V5 => {
            s.write(&mut out).map_err(m5_err)?;
        }
        Version::V4 => {
            let codes = s
                .return_codes
                .into_iter()
                .map(|c| match c {
                    v5::SubscribeReasonCode::Success(q) => m4::qos(q as u8).map_or(
                        v4::SubscribeReasonCode::Failure,
                        v4::SubscribeReasonCode::Success,
                    ),
                    _ => v4::SubscribeReasonCode::Failure,
                })
                .collect();
            v4::SubAck::new(s.pkid, codes)
                .write(&mut out)
                .map_err(m4_err)?;
        }
    }
    Ok(out.freeze())
}

fn merge<T: Copy>(broker: Vec<T>, allowed: &[bool], denied: T) -> Result<Vec<T>, PacketError> {
    let mut codes = broker.into_iter();
    let merged: Vec<T> = allowed
        .iter()
        .map(|a| if *a { codes.next() } else { Some(denied) })
        .collect::<Option<_>>()
        .ok_or_else(|| PacketError::Malformed("SUBACK has fewer codes than filters".into()))?;
    Ok(merged)
}

/// A decoded CONNECT of either version.
#[derive(Debug, Clone)]
pub enum Connect {
    /// MQTT 3.1.1.
    V4(v4::Connect),
    /// MQTT 5.
    V5(Box<(v5::Connect, Option<v5::LastWill>, Option<v5::Login>)>),
}

impl Connect {
    /// Reads the first packet of a connection: a CONNECT of level 4 or 5. `Ok(None)` when more
    /// bytes are needed.
    pub fn read(
        buf: &mut BytesMut,
        max_packet_bytes: usize,
    ) -> Result<Option<Connect>, PacketError> {
        let max = u32::try_from(max_packet_bytes).unwrap_or(u32::MAX);
        let h5 = match v5::check(buf.iter(), Some(max)) {
            Ok(h) => h,
            Err(m5::Error::InsufficientBytes(_)) => return Ok(None),
            Err(e) => return Err(m5_err(e)),
        };
        if buf.first().map(|b| b >> 4) != Some(1) {
            return Err(PacketError::Malformed("first packet is not CONNECT".into()));
        }
        let raw = buf.split_to(h5.frame_length()).freeze();
        match v5::Connect::read(h5, raw.clone()) {
            Ok(parts) => Ok(Some(Connect::V5(Box::new(parts)))),
            Err(m5::Error::InvalidProtocolLevel(4)) => {
                let h4 = m4::check(raw.iter(), max_packet_bytes).map_err(m4_err)?;
                let c = v4::Connect::read(h4, raw).map_err(m4_err)?;
                Ok(Some(Connect::V4(c)))
            }
            Err(m5::Error::InvalidProtocolLevel(n)) => Err(PacketError::UnsupportedLevel(n)),
            Err(e) => Err(m5_err(e)),
        }
    }

    /// The protocol version.
    pub fn version(&self) -> Version {
        match self {
            Connect::V4(_) => Version::V4,
            Connect::V5(..) => Version::V5,
        }
    }

    /// The largest packet the client accepts (MQTT 5 Maximum Packet Size), if it said.
    pub fn max_packet_size(&self) -> Option<usize> {
        match self {
            Connect::V4(_) => None,
            Connect::V5(b) => {
                b.0.properties
                    .as_ref()
                    .and_then(|p| p.max_packet_size)
                    .map(|m| m as usize)
            }
        }
    }

    /// The MQTT 5 Receive Maximum: how many QoS 1/2 deliveries the client takes unacknowledged.
    pub fn receive_maximum(&self) -> Option<u16> {
        match self {
            Connect::V4(_) => None,
            Connect::V5(b) => b.0.properties.as_ref().and_then(|p| p.receive_maximum),
        }
    }

    /// The keep-alive the client asked for, in seconds (0: off).
    pub fn keep_alive(&self) -> u16 {
        match self {
            Connect::V4(c) => c.keep_alive,
            Connect::V5(b) => b.0.keep_alive,
        }
    }

    /// Whether the broker keeps the client's session after it disconnects (MQTT 3.1.1
    /// `clean_session` = 0; MQTT 5 a Session Expiry Interval above 0).
    pub fn keeps_session(&self) -> bool {
        self.session_expiry() > 0
    }

    /// The client id.
    pub fn client_id(&self) -> &str {
        match self {
            Connect::V4(c) => &c.client_id,
            Connect::V5(b) => &b.0.client_id,
        }
    }

    /// Username and password, if given.
    pub fn login(&self) -> Option<(&str, &str)> {
        match self {
            Connect::V4(c) => c
                .login
                .as_ref()
                .map(|l| (l.username.as_str(), l.password.as_str())),
            Connect::V5(b) => {
                b.2.as_ref()
                    .map(|l| (l.username.as_str(), l.password.as_str()))
            }
        }
    }

    /// The will topic, if a will is set.
    pub fn will_topic(&self) -> Option<String> {
        match self {
            Connect::V4(c) => c.last_will.as_ref().map(|w| w.topic.clone()),
            Connect::V5(b) => {
                b.1.as_ref()
                    .map(|w| String::from_utf8_lossy(&w.topic).into_owned())
            }
        }
    }

    /// The CONNECT to send upstream, always MQTT 5 (the broker's MQTT 5 deliveries carry what
    /// the gate needs back, see [`crate::origin`]): the client's credentials and v5
    /// enhanced-auth fields replaced by the broker's internal `login` (the gate authenticated the
    /// client already), a keep-alive of 0 ("off", which rumqttd refuses without a CONNACK)
    /// replaced by `keepalive_off` seconds (the relay then pings the broker for the client), the
    /// broker told to keep the session or not (`keep_session`, decided by the gate's session
    /// table: rumqttd ignores Session Expiry), and the will marked with its `origin`.
    pub fn encode_for_upstream(
        &self,
        keepalive_off: u16,
        login: Option<&(String, String)>,
        clean_start: bool,
        conn: u64,
    ) -> Result<Bytes, PacketError> {
        let mut out = BytesMut::new();
        let (mut c, mut will) = match self {
            Connect::V4(c) => (
                v5::Connect {
                    keep_alive: c.keep_alive,
                    client_id: c.client_id.clone(),
                    clean_start: c.clean_session,
                    properties: None,
                },
                c.last_will.as_ref().map(|w| v5::LastWill {
                    topic: Bytes::from(w.topic.clone()),
                    message: w.message.clone(),
                    qos: qos5(w.qos as u8),
                    retain: w.retain,
                    properties: None,
                }),
            ),
            Connect::V5(b) => (b.0.clone(), b.1.clone()),
        };
        if c.keep_alive == 0 {
            c.keep_alive = keepalive_off;
        }
        c.clean_start = clean_start;
        c.client_id = upstream_client_id(&c.client_id).into_owned();
        if let Some(p) = c.properties.as_mut() {
            p.authentication_method = None;
            p.authentication_data = None;
            // The gate keeps the session's clock; rumqttd keeps a session iff clean_start is 0.
            p.session_expiry_interval = None;
        }
        if let Some(w) = will.as_mut() {
            let props = w.properties.get_or_insert_with(|| v5::LastWillProperties {
                delay_interval: None,
                payload_format_indicator: None,
                message_expiry_interval: None,
                content_type: None,
                response_topic: None,
                correlation_data: None,
                user_properties: Vec::new(),
            });
            crate::origin::Origin {
                qos: w.qos as u8,
                retain: w.retain,
                conn,
                // Counted from when the will is published, which only the broker knows.
                expires_at_ms: None,
            }
            .attach(&mut props.user_properties);
        }
        let login = login.map(|(u, p)| v5::Login::new(u.as_str(), p.as_str()));
        c.write(&will, &login, &mut out).map_err(m5_err)?;
        Ok(out.freeze())
    }

    /// Whether the client asked to start without its old session (3.1.1 `clean_session`,
    /// MQTT 5 `clean_start`).
    pub fn clean_start(&self) -> bool {
        match self {
            Connect::V4(c) => c.clean_session,
            Connect::V5(b) => b.0.clean_start,
        }
    }

    /// How long the session outlives the connection, in seconds (`u32::MAX`: never ends):
    /// 3.1.1 `clean_session` 0 keeps it for good, 1 not at all; MQTT 5 says it in Session
    /// Expiry Interval (absent: 0).
    pub fn session_expiry(&self) -> u32 {
        match self {
            Connect::V4(c) => {
                if c.clean_session {
                    0
                } else {
                    u32::MAX
                }
            }
            Connect::V5(b) => {
                b.0.properties
                    .as_ref()
                    .and_then(|p| p.session_expiry_interval)
                    .unwrap_or(0)
            }
        }
    }
}

/// The client id the broker sees: any UTF-8 id is valid MQTT, but rumqttd refuses ids holding
/// `+ $ # /` (`plant/line-2/sensor-7`) without a CONNACK, so those and `%` are percent-encoded.
/// The encoding is one-to-one, so two clients never share a session upstream by accident.
pub fn upstream_client_id(id: &str) -> std::borrow::Cow<'_, str> {
    const ESCAPED: [char; 5] = ['%', '+', '$', '#', '/'];
    if !id.contains(ESCAPED) {
        return std::borrow::Cow::Borrowed(id);
    }
    let mut out = String::with_capacity(id.len() + 8);
    for c in id.chars() {
        if ESCAPED.contains(&c) {
            out.push_str(&format!("%{:02X}", c as u32));
        } else {
            out.push(c);
        }
    }
    std::borrow::Cow::Owned(out)
}

/// The gate's own MQTT 5 CONNECT for the broker's session of `client_id` (the upstream id):
/// `clean_start` 1 starts it afresh (ending the one the broker holds, when a DISCONNECT follows
/// at once; the retained fetch's connections), 0 takes up the session the broker keeps (a
/// keeper holding an away session).
pub fn session_connect(
    client_id: &str,
    login: Option<&(String, String)>,
    clean_start: bool,
    keep_alive: u16,
) -> Result<Bytes, PacketError> {
    let c = v5::Connect {
        keep_alive,
        client_id: client_id.to_string(),
        clean_start,
        properties: None,
    };
    let login = login.map(|(u, p)| v5::Login::new(u.as_str(), p.as_str()));
    let mut out = BytesMut::new();
    c.write(&None, &login, &mut out).map_err(m5_err)?;
    Ok(out.freeze())
}

/// A normal MQTT 5 DISCONNECT (the will is not sent), as rumqttd reads it.
pub const DISCONNECT_NORMAL: [u8; 2] = [0xE0, 0x00];

/// A PINGREQ (the same bytes in MQTT 3.1.1 and 5).
pub const PINGREQ: [u8; 2] = [0xC0, 0x00];

/// Why the gate refuses a CONNECT.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// Unknown user or wrong password (v4 0x04, v5 0x86).
    BadCredentials,
    /// No acceptable identity, or the will topic is not allowed (v4 0x05, v5 0x87).
    NotAuthorized,
    /// Protocol version not served (v4 0x01, v5 0x84).
    UnsupportedVersion,
    /// The upstream broker cannot be reached (v4 0x03, v5 0x88).
    Unavailable,
    /// The client id belongs to another identity (v4 0x02, v5 0x85).
    ClientIdTaken,
    /// A 3.1.1 client without a client id asked to keep its session (v4 0x02, v5 0x85).
    ClientIdRejected,
}

/// A CONNACK refusing the connection.
pub fn connack_refused(version: Version, why: Refusal) -> Bytes {
    connack_refused_explained(version, why, None)
}

/// A refusing CONNACK; MQTT 5 clients are also told `why_text` as the Reason String (v4 has
/// only the return code).
pub fn connack_refused_explained(version: Version, why: Refusal, why_text: Option<&str>) -> Bytes {
    let mut out = BytesMut::new();
    let r = match version {
        Version::V4 => {
            use v4::ConnectReturnCode as C;
            let code = match why {
                Refusal::BadCredentials => C::BadUserNamePassword,
                Refusal::NotAuthorized => C::NotAuthorized,
                Refusal::UnsupportedVersion => C::RefusedProtocolVersion,
                Refusal::Unavailable => C::ServiceUnavailable,
                Refusal::ClientIdTaken | Refusal::ClientIdRejected => C::BadClientId,
            };
            v4::ConnAck::new(code, false)
                .write(&mut out)
                .map_err(m4_err)
        }
        Version::V5 => {
            use v5::ConnectReturnCode as C;
            let code = match why {
                Refusal::BadCredentials => C::BadUserNamePassword,
                Refusal::NotAuthorized => C::NotAuthorized,
                Refusal::UnsupportedVersion => C::UnsupportedProtocolVersion,
                Refusal::Unavailable => C::ServerUnavailable,
                Refusal::ClientIdTaken | Refusal::ClientIdRejected => C::ClientIdentifierNotValid,
            };
            v5::ConnAck {
                session_present: false,
                code,
                properties: why_text.map(reason_string_only),
            }
            .write(&mut out)
            .map_err(m5_err)
        }
    };
    ack_bytes(r, out)
}

fn reason_string_only(text: &str) -> v5::ConnAckProperties {
    v5::ConnAckProperties {
        session_expiry_interval: None,
        receive_max: None,
        max_qos: None,
        retain_available: None,
        max_packet_size: None,
        assigned_client_identifier: None,
        topic_alias_max: None,
        reason_string: Some(text.to_string()),
        user_properties: Vec::new(),
        wildcard_subscription_available: None,
        subscription_identifiers_available: None,
        shared_subscription_available: None,
        server_keep_alive: None,
        response_information: None,
        server_reference: None,
        authentication_method: None,
        authentication_data: None,
    }
}

fn ack_bytes(r: Result<usize, PacketError>, out: BytesMut) -> Bytes {
    // Encoding a fixed-size ack cannot fail; an empty result would only close the connection.
    match r {
        Ok(_) => out.freeze(),
        Err(_) => Bytes::new(),
    }
}

/// A PUBACK; `denied` sets v5 reason 0x87 (v4 has no reason code).
pub fn puback(version: Version, pkid: u16, denied: Option<Denial>) -> Bytes {
    let mut out = BytesMut::new();
    let r = match version {
        Version::V4 => v4::PubAck::new(pkid).write(&mut out).map_err(m4_err),
        Version::V5 => {
            let mut a = v5::PubAck::new(pkid, None);
            match denied {
                Some(Denial::NotAuthorized) => a.reason = v5::PubAckReason::NotAuthorized,
                Some(Denial::QuotaExceeded) => a.reason = v5::PubAckReason::QuotaExceeded,
                None => {}
            }
            a.write(&mut out).map_err(m5_err)
        }
    };
    ack_bytes(r, out)
}

/// Why a publish was not passed on; MQTT 5 acknowledgements carry it as their reason code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Denial {
    /// 0x87: the client's role may not publish there.
    NotAuthorized,
    /// 0x97: the node's budget of distinct topics is spent.
    QuotaExceeded,
}

/// A PUBREC; `denied` sets its v5 reason (0x87 or 0x97), which ends the QoS 2 exchange.
pub fn pubrec(version: Version, pkid: u16, denied: Option<Denial>) -> Bytes {
    let mut out = BytesMut::new();
    let r = match version {
        Version::V4 => v4::PubRec::new(pkid).write(&mut out).map_err(m4_err),
        Version::V5 => {
            let mut a = v5::PubRec::new(pkid, None);
            match denied {
                Some(Denial::NotAuthorized) => a.reason = v5::PubRecReason::NotAuthorized,
                Some(Denial::QuotaExceeded) => a.reason = v5::PubRecReason::QuotaExceeded,
                None => {}
            }
            a.write(&mut out).map_err(m5_err)
        }
    };
    ack_bytes(r, out)
}

/// A PUBCOMP.
pub fn pubcomp(version: Version, pkid: u16) -> Bytes {
    let mut out = BytesMut::new();
    let r = match version {
        Version::V4 => v4::PubComp::new(pkid).write(&mut out).map_err(m4_err),
        Version::V5 => v5::PubComp::new(pkid, None).write(&mut out).map_err(m5_err),
    };
    ack_bytes(r, out)
}

/// A PUBREL.
pub fn pubrel(version: Version, pkid: u16) -> Bytes {
    let mut out = BytesMut::new();
    let r = match version {
        Version::V4 => v4::PubRel::new(pkid).write(&mut out).map_err(m4_err),
        Version::V5 => v5::PubRel::new(pkid, None).write(&mut out).map_err(m5_err),
    };
    ack_bytes(r, out)
}

/// A SUBACK refusing every one of `count` filters (v4 0x80, v5 0x87).
pub fn suback_all_denied(version: Version, pkid: u16, count: usize) -> Bytes {
    let mut out = BytesMut::new();
    let r = match version {
        Version::V4 => v4::SubAck::new(pkid, vec![v4::SubscribeReasonCode::Failure; count])
            .write(&mut out)
            .map_err(m4_err),
        Version::V5 => v5::SubAck {
            pkid,
            return_codes: vec![v5::SubscribeReasonCode::NotAuthorized; count],
            properties: None,
        }
        .write(&mut out)
        .map_err(m5_err),
    };
    ack_bytes(r, out)
}

/// A v5 DISCONNECT with a reason (v4 has no server DISCONNECT: empty).
pub fn disconnect(version: Version, reason: v5::DisconnectReasonCode) -> Bytes {
    let mut out = BytesMut::new();
    match version {
        Version::V4 => Bytes::new(),
        Version::V5 => {
            let r = v5::Disconnect::new(reason).write(&mut out).map_err(m5_err);
            ack_bytes(r, out)
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn client_ids_rumqttd_refuses_are_encoded_and_plain_ones_kept() {
        assert_eq!(upstream_client_id("sensor-7"), "sensor-7");
        assert_eq!(
            upstream_client_id("plant/line-2/sensor-7"),
            "plant%2Fline-2%2Fsensor-7"
        );
        assert_eq!(upstream_client_id("a+b$c#d%e"), "a%2Bb%24c%23d%25e");
        assert_eq!(upstream_client_id("ünï/"), "ünï%2F");
    }

    proptest! {
        /// Distinct ids stay distinct upstream, and none holds a character rumqttd refuses.
        #[test]
        fn the_upstream_client_id_is_one_to_one_and_acceptable(
            a in "[a-z%+$#/ü]{0,12}",
            b in "[a-z%+$#/ü]{0,12}",
        ) {
            let (ua, ub) = (upstream_client_id(&a), upstream_client_id(&b));
            prop_assert_eq!(a == b, ua == ub);
            prop_assert!(!ua.contains(['+', '$', '#', '/']));
        }
    }

    fn v4_bytes(p: v4::Packet) -> BytesMut {
        let mut b = BytesMut::new();
        p.write(&mut b, 1 << 20).unwrap();
        b
    }

    #[test]
    fn packet_connect_sniffs_v4_and_v5_and_replaces_credentials_with_the_internal_login() {
        let mut c = v4::Connect::new("c1");
        c.set_login("u", "p");
        let mut b = v4_bytes(v4::Packet::Connect(c));
        let got = Connect::read(&mut b, 1 << 20).unwrap().unwrap();
        assert_eq!(got.version(), Version::V4);
        assert_eq!(got.login(), Some(("u", "p")));
        let mut up = BytesMut::from(&got.encode_for_upstream(60, None, true, 1).unwrap()[..]);
        let again = Connect::read(&mut up, 1 << 20).unwrap().unwrap();
        assert_eq!(again.login(), None);
        assert_eq!(again.client_id(), "c1");
        // The broker is spoken to in MQTT 5 whatever the client speaks.
        assert_eq!(again.version(), Version::V5);
        let internal = ("front-door".to_string(), "s3cret".to_string());
        let mut up = BytesMut::from(
            &got.encode_for_upstream(60, Some(&internal), true, 1)
                .unwrap()[..],
        );
        let again = Connect::read(&mut up, 1 << 20).unwrap().unwrap();
        assert_eq!(again.login(), Some(("front-door", "s3cret")));

        let c5 = v5::Connect {
            keep_alive: 10,
            client_id: "c5".into(),
            clean_start: true,
            properties: None,
        };
        let login = Some(v5::Login {
            username: "u".into(),
            password: "p".into(),
        });
        let mut b = BytesMut::new();
        c5.write(&None, &login, &mut b).unwrap();
        let got = Connect::read(&mut b, 1 << 20).unwrap().unwrap();
        assert_eq!(got.version(), Version::V5);
        assert_eq!(got.login(), Some(("u", "p")));
        let mut up = BytesMut::from(
            &got.encode_for_upstream(60, Some(&internal), false, 1)
                .unwrap()[..],
        );
        let again = Connect::read(&mut up, 1 << 20).unwrap().unwrap();
        assert_eq!(again.login(), Some(("front-door", "s3cret")));
        assert!(!again.clean_start());
    }

    #[test]
    fn packet_a_v4_publish_and_subscribe_become_mqtt5_and_deliveries_go_back_in_the_clients_version(
    ) {
        let mut p = v4::Publish::new("a/b", m4::QoS::ExactlyOnce, b"x".to_vec());
        p.pkid = 7;
        p.retain = true;
        let mut b = v4_bytes(v4::Packet::Publish(p));
        let f = next_frame(&mut b, Version::V4, 1 << 20).unwrap().unwrap();
        let p5 = f.publish_v5().unwrap();
        assert_eq!((p5.qos as u8, p5.pkid, p5.retain), (2, 7, true));
        let back = write_publish(Version::V4, &p5).unwrap();
        let mut bb = BytesMut::from(&back[..]);
        let f4 = next_frame(&mut bb, Version::V4, 1 << 20).unwrap().unwrap();
        assert_eq!(f4.publish().unwrap().topic, "a/b");

        let s = v4::Subscribe::new("a/#", m4::QoS::AtLeastOnce);
        let mut b = v4_bytes(v4::Packet::Subscribe(s));
        let f = next_frame(&mut b, Version::V4, 1 << 20).unwrap().unwrap();
        let s5 = f.subscribe_v5().unwrap();
        assert_eq!(s5.filters[0].path, "a/#");
        assert_eq!(s5.filters[0].qos as u8, 1);

        // An MQTT 5 SUBACK for a 3.1.1 client: failures become 0x80.
        let ack = v5::SubAck {
            pkid: 3,
            return_codes: vec![
                v5::SubscribeReasonCode::Success(m5::QoS::AtLeastOnce),
                v5::SubscribeReasonCode::QuotaExceeded,
            ],
            properties: None,
        };
        let four = suback_for(Version::V4, ack, None).unwrap();
        assert_eq!(&four[..], &[0x90, 4, 0, 3, 1, 0x80]);
    }

    #[test]
    fn packet_a_disconnect_says_its_session_expiry_in_any_valid_form() {
        for short in [&[0xE0u8, 0x00][..], &[0xE0, 0x01, 0x00]] {
            let mut b = BytesMut::from(short);
            let f = next_frame(&mut b, Version::V5, 1 << 20).unwrap().unwrap();
            assert_eq!(f.disconnect_session_expiry(), Ok(None));
        }
        // Reason 0, properties: Session Expiry Interval (0x11) = 5.
        let mut b = BytesMut::from(&[0xE0u8, 0x07, 0x00, 0x05, 0x11, 0, 0, 0, 5][..]);
        let f = next_frame(&mut b, Version::V5, 1 << 20).unwrap().unwrap();
        assert_eq!(f.disconnect_session_expiry(), Ok(Some(5)));
    }

    #[test]
    fn packet_mqtt5_acks_lose_reason_and_properties_for_a_v4_client() {
        // PUBACK pkid 9, reason 0x10 (no matching subscribers).
        let mut b = BytesMut::from(&[0x40u8, 3, 0, 9, 0x10][..]);
        let f = next_frame(&mut b, Version::V5, 1 << 20).unwrap().unwrap();
        assert_eq!(&f.ack_for(Version::V4).unwrap()[..], &[0x40, 2, 0, 9]);
        assert_eq!(&f.ack_for(Version::V5).unwrap()[..], &[0x40, 3, 0, 9, 0x10]);
        let mut b = BytesMut::from(&[0x62u8, 3, 0, 9, 0][..]);
        let f = next_frame(&mut b, Version::V5, 1 << 20).unwrap().unwrap();
        assert_eq!(&f.ack_for(Version::V4).unwrap()[..], &[0x62, 2, 0, 9]);
    }

    #[test]
    fn packet_frames_wait_for_more_bytes_and_refuse_oversize() {
        let mut p = v4::Publish::new("dt/a/desired", m4::QoS::AtLeastOnce, vec![0u8; 100]);
        p.pkid = 1;
        let b = v4_bytes(v4::Packet::Publish(p));
        let mut half = BytesMut::from(&b[..10]);
        assert!(next_frame(&mut half, Version::V4, 1 << 20)
            .unwrap()
            .is_none());
        let mut whole = b.clone();
        let f = next_frame(&mut whole, Version::V4, 1 << 20)
            .unwrap()
            .unwrap();
        assert_eq!(f.kind, Kind::Publish);
        assert_eq!(f.publish().unwrap().topic, "dt/a/desired");
        let mut whole = b;
        assert!(matches!(
            next_frame(&mut whole, Version::V4, 50),
            Err(PacketError::TooLarge(_))
        ));
    }

    #[test]
    fn packet_suback_merge_puts_failures_where_filters_were_denied() {
        let s = v5::SubAck {
            pkid: 7,
            return_codes: vec![v5::SubscribeReasonCode::Success(m5::QoS::AtLeastOnce)],
            properties: None,
        };
        let merged = suback_for(Version::V4, s, Some(&[false, true, false])).unwrap();
        let mut mb = BytesMut::from(&merged[..]);
        let v4::Packet::SubAck(s) = v4::Packet::read(&mut mb, 1 << 20).unwrap() else {
            panic!()
        };
        assert_eq!(
            s.return_codes,
            vec![
                v4::SubscribeReasonCode::Failure,
                v4::SubscribeReasonCode::Success(m4::QoS::AtLeastOnce),
                v4::SubscribeReasonCode::Failure
            ]
        );
    }

    #[test]
    fn packet_garbage_is_an_error_never_a_panic() {
        for bytes in [
            &[0x00u8, 0x00][..],
            &[0xF0, 0x00],
            &[0x30, 0x02, 0x00, 0x09],
            &[0x82, 0x80, 0x80, 0x80, 0x80, 0x01],
            &[0x10, 0x03, 0x00, 0x04, 0x4d],
        ] {
            let mut b = BytesMut::from(bytes);
            if let Ok(Some(f)) = next_frame(&mut b, Version::V4, 1 << 20) {
                let _ = f.publish();
                let _ = f.subscribe_v5();
            }
            let mut b = BytesMut::from(bytes);
            let _ = Connect::read(&mut b, 1 << 20);
        }
    }
}
