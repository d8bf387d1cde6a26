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

impl Frame {
    /// Decodes a PUBLISH.
    pub fn publish(&self) -> Result<PublishView, PacketError> {
        match self.header {
            Header::V4(h) => {
                let p = v4::Publish::read(h, self.raw.clone()).map_err(m4_err)?;
                Ok(PublishView {
                    topic: p.topic,
                    qos: p.qos as u8,
                    pkid: p.pkid,
                    topic_alias: None,
                    response_topic: None,
                    payload: p.payload,
                    retain: p.retain,
                })
            }
            Header::V5(h) => {
                let p = v5::Publish::read(h, self.raw.clone()).map_err(m5_err)?;
                let topic = String::from_utf8(p.topic.to_vec())
                    .map_err(|_| PacketError::Malformed("topic is not UTF-8".into()))?;
                let (topic_alias, response_topic) = match p.properties {
                    Some(pr) => (pr.topic_alias, pr.response_topic),
                    None => (None, None),
                };
                Ok(PublishView {
                    topic,
                    qos: p.qos as u8,
                    pkid: p.pkid,
                    topic_alias,
                    response_topic,
                    payload: p.payload,
                    retain: p.retain,
                })
            }
        }
    }

    /// Decodes a SUBSCRIBE: packet id and filters.
    pub fn subscribe(&self) -> Result<(u16, Vec<String>), PacketError> {
        match self.header {
            Header::V4(h) => {
                let s = v4::Subscribe::read(h, self.raw.clone()).map_err(m4_err)?;
                Ok((s.pkid, s.filters.into_iter().map(|f| f.path).collect()))
            }
            Header::V5(h) => {
                let s = v5::Subscribe::read(h, self.raw.clone()).map_err(m5_err)?;
                Ok((s.pkid, s.filters.into_iter().map(|f| f.path).collect()))
            }
        }
    }

    /// Re-encodes a SUBSCRIBE keeping only the filters whose `keep` entry is true.
    pub fn subscribe_keeping(&self, keep: &[bool]) -> Result<Bytes, PacketError> {
        let mut out = BytesMut::new();
        match self.header {
            Header::V4(h) => {
                let mut s = v4::Subscribe::read(h, self.raw.clone()).map_err(m4_err)?;
                s.filters = retain_by(s.filters, keep);
                s.write(&mut out).map_err(m4_err)?;
            }
            Header::V5(h) => {
                let mut s = v5::Subscribe::read(h, self.raw.clone()).map_err(m5_err)?;
                s.filters = retain_by(s.filters, keep);
                s.write(&mut out).map_err(m5_err)?;
            }
        }
        Ok(out.freeze())
    }

    /// Decodes an UNSUBSCRIBE: packet id and filters.
    pub fn unsubscribe(&self) -> Result<(u16, Vec<String>), PacketError> {
        match self.header {
            Header::V4(h) => {
                let s = v4::Unsubscribe::read(h, self.raw.clone()).map_err(m4_err)?;
                Ok((s.pkid, s.topics))
            }
            Header::V5(h) => {
                let s = v5::Unsubscribe::read(h, self.raw.clone()).map_err(m5_err)?;
                Ok((s.pkid, s.filters))
            }
        }
    }

    /// The packet id of a PUBREL.
    pub fn pubrel_pkid(&self) -> Result<u16, PacketError> {
        match self.header {
            Header::V4(h) => Ok(v4::PubRel::read(h, self.raw.clone()).map_err(m4_err)?.pkid),
            Header::V5(h) => Ok(v5::PubRel::read(h, self.raw.clone()).map_err(m5_err)?.pkid),
        }
    }

    /// The packet id of a PUBACK or PUBCOMP.
    pub fn ack_pkid(&self) -> Result<u16, PacketError> {
        match (self.kind, self.header) {
            (Kind::PubAck, Header::V4(h)) => {
                Ok(v4::PubAck::read(h, self.raw.clone()).map_err(m4_err)?.pkid)
            }
            (Kind::PubAck, Header::V5(h)) => {
                Ok(v5::PubAck::read(h, self.raw.clone()).map_err(m5_err)?.pkid)
            }
            (Kind::PubComp, Header::V4(h)) => {
                Ok(v4::PubComp::read(h, self.raw.clone()).map_err(m4_err)?.pkid)
            }
            (Kind::PubComp, Header::V5(h)) => {
                Ok(v5::PubComp::read(h, self.raw.clone()).map_err(m5_err)?.pkid)
            }
            _ => Err(PacketError::Malformed("not a PUBACK or PUBCOMP".into())),
        }
    }

    /// The packet id of a SUBACK.
    pub fn suback_pkid(&self) -> Result<u16, PacketError> {
        match self.header {
            Header::V4(h) => Ok(v4::SubAck::read(h, self.raw.clone()).map_err(m4_err)?.pkid),
            Header::V5(h) => Ok(v5::SubAck::read(h, self.raw.clone()).map_err(m5_err)?.pkid),
        }
    }

    /// Re-encodes a SUBACK for the client's original SUBSCRIBE: `allowed[i]` false puts a
    /// "not authorized" failure at position i; the broker's codes fill the allowed positions.
    pub fn suback_merged(&self, allowed: &[bool]) -> Result<Bytes, PacketError> {
        let mut out = BytesMut::new();
        match self.header {
            Header::V4(h) => {
                let mut s = v4::SubAck::read(h, self.raw.clone()).map_err(m4_err)?;
                s.return_codes = merge(s.return_codes, allowed, v4::SubscribeReasonCode::Failure)?;
                s.write(&mut out).map_err(m4_err)?;
            }
            Header::V5(h) => {
                let mut s = v5::SubAck::read(h, self.raw.clone()).map_err(m5_err)?;
                s.return_codes = merge(
                    s.return_codes,
                    allowed,
                    v5::SubscribeReasonCode::NotAuthorized,
                )?;
                s.write(&mut out).map_err(m5_err)?;
            }
        }
        Ok(out.freeze())
    }
}

fn retain_by<T>(items: Vec<T>, keep: &[bool]) -> Vec<T> {
    items
        .into_iter()
        .zip(keep.iter().copied().chain(std::iter::repeat(false)))
        .filter_map(|(f, k)| k.then_some(f))
        .collect()
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
        match self {
            Connect::V4(c) => !c.clean_session,
            Connect::V5(b) => {
                b.0.properties
                    .as_ref()
                    .and_then(|p| p.session_expiry_interval)
                    .is_some_and(|e| e > 0)
            }
        }
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

    /// The CONNECT to send upstream: the client's credentials and v5 enhanced-auth fields
    /// replaced by the broker's internal `login` (the gate authenticated the client already), and
    /// a keep-alive of 0 ("off", which rumqttd refuses without a CONNACK) replaced by
    /// `keepalive_off` seconds; the relay then pings the broker for the client.
    pub fn encode_for_upstream(
        &self,
        keepalive_off: u16,
        login: Option<&(String, String)>,
    ) -> Result<Bytes, PacketError> {
        let mut out = BytesMut::new();
        match self {
            Connect::V4(c) => {
                let mut c = c.clone();
                c.login = login.map(|(u, p)| v4::Login::new(u.as_str(), p.as_str()));
                if c.keep_alive == 0 {
                    c.keep_alive = keepalive_off;
                }
                c.client_id = upstream_client_id(&c.client_id).into_owned();
                c.write(&mut out).map_err(m4_err)?;
            }
            Connect::V5(b) => {
                let (c, will, _) = b.as_ref();
                let mut c = c.clone();
                if c.keep_alive == 0 {
                    c.keep_alive = keepalive_off;
                }
                c.client_id = upstream_client_id(&c.client_id).into_owned();
                if let Some(p) = c.properties.as_mut() {
                    p.authentication_method = None;
                    p.authentication_data = None;
                }
                let login = login.map(|(u, p)| v5::Login::new(u.as_str(), p.as_str()));
                c.write(will, &login, &mut out).map_err(m5_err)?;
            }
        }
        Ok(out.freeze())
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
                Refusal::ClientIdTaken => C::BadClientId,
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
                Refusal::ClientIdTaken => C::ClientIdentifierNotValid,
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
        let mut up = BytesMut::from(&got.encode_for_upstream(60, None).unwrap()[..]);
        let again = Connect::read(&mut up, 1 << 20).unwrap().unwrap();
        assert_eq!(again.login(), None);
        assert_eq!(again.client_id(), "c1");
        let internal = ("front-door".to_string(), "s3cret".to_string());
        let mut up = BytesMut::from(&got.encode_for_upstream(60, Some(&internal)).unwrap()[..]);
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
        let mut up = BytesMut::from(&got.encode_for_upstream(60, Some(&internal)).unwrap()[..]);
        let again = Connect::read(&mut up, 1 << 20).unwrap().unwrap();
        assert_eq!(again.login(), Some(("front-door", "s3cret")));
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
        let s = v4::SubAck::new(
            7,
            vec![v4::SubscribeReasonCode::Success(m4::QoS::AtLeastOnce)],
        );
        let mut b = v4_bytes(v4::Packet::SubAck(s));
        let f = next_frame(&mut b, Version::V4, 1 << 20).unwrap().unwrap();
        let merged = f.suback_merged(&[false, true, false]).unwrap();
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
                let _ = f.subscribe();
            }
            let mut b = BytesMut::from(bytes);
            let _ = Connect::read(&mut b, 1 << 20);
        }
    }
}
