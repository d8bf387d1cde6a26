//! Arbitrary bytes through the gate's packet inspection, as a client of either version would
//! send them: CONNECT sniffing, framing, and every decoder the relay uses. Must never panic.
//!
//! Shared by the cargo-fuzz target of the same name and the stable replay of the committed
//! corpus (`fuzz/corpus/gate_packet/`) in the test command.

use bytes::BytesMut;
use edgetwin_gate::origin::Origin;
use edgetwin_gate::packet::{
    next_frame, suback_for, write_publish, write_v5_subscribe, write_v5_unsubscribe, Connect, Kind,
    Version,
};

/// The property, for one input: panics (an assertion) when it does not hold.
pub fn check(data: &[u8]) {
    let mut first = BytesMut::from(data);
    if let Ok(Some(c)) = Connect::read(&mut first, 1 << 16) {
        let _ = c.encode_for_upstream(60, None, false, 1);
        let _ = c.will_topic();
    }
    for version in [Version::V4, Version::V5] {
        let mut buf = BytesMut::from(data);
        while let Ok(Some(f)) = next_frame(&mut buf, version, 1 << 16) {
            match f.kind {
                Kind::Publish => {
                    let _ = f.publish();
                    if let Ok(mut p) = f.publish_v5() {
                        if let Some(props) = p.properties.as_mut() {
                            let _ = Origin::take(&mut props.user_properties);
                        }
                        let _ = write_publish(Version::V4, &p);
                        let _ = write_publish(Version::V5, &p);
                    }
                }
                Kind::Subscribe => {
                    if let Ok(mut s) = f.subscribe_v5() {
                        s.filters.truncate(1);
                        let _ = write_v5_subscribe(&s);
                    }
                }
                Kind::Unsubscribe => {
                    if let Ok(u) = f.unsubscribe_v5() {
                        let _ = write_v5_unsubscribe(&u);
                    }
                }
                Kind::PubRel => {
                    let _ = f.pubrel_pkid();
                    let _ = f.ack_for(Version::V4);
                }
                Kind::PubAck | Kind::PubRec | Kind::PubComp | Kind::UnsubAck => {
                    let _ = f.ack_for(Version::V4);
                }
                Kind::SubAck => {
                    if let Ok(s) = f.suback_v5() {
                        let _ = suback_for(Version::V4, s, Some(&[true, false, true]));
                    }
                }
                Kind::ConnAck => {
                    let _ = f.connack_for(Version::V4, true);
                    let _ = f.connack_for(Version::V5, false);
                }
                Kind::Disconnect => {
                    let _ = f.disconnect_session_expiry();
                }
                _ => {}
            }
        }
    }
}
