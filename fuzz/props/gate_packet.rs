//! Arbitrary bytes through the gate's packet inspection, as a client of either version would
//! send them: CONNECT sniffing, framing, and every decoder the relay uses. Must never panic.
//!
//! Shared by the cargo-fuzz target of the same name and the stable replay of the committed
//! corpus (`fuzz/corpus/gate_packet/`) in the test command.

use bytes::BytesMut;
use edgetwin_gate::packet::{next_frame, Connect, Kind, Version};

/// The property, for one input: panics (an assertion) when it does not hold.
pub fn check(data: &[u8]) {
    let mut first = BytesMut::from(data);
    if let Ok(Some(c)) = Connect::read(&mut first, 1 << 16) {
        let _ = c.encode_for_upstream(60, None);
        let _ = c.will_topic();
    }
    for version in [Version::V4, Version::V5] {
        let mut buf = BytesMut::from(data);
        while let Ok(Some(f)) = next_frame(&mut buf, version, 1 << 16) {
            match f.kind {
                Kind::Publish => {
                    let _ = f.publish();
                }
                Kind::Subscribe => {
                    if let Ok((_, filters)) = f.subscribe() {
                        let keep: Vec<bool> = (0..filters.len()).map(|i| i % 2 == 0).collect();
                        let _ = f.subscribe_keeping(&keep);
                    }
                }
                Kind::Unsubscribe => {
                    let _ = f.unsubscribe();
                }
                Kind::PubRel => {
                    let _ = f.pubrel_pkid();
                }
                Kind::SubAck => {
                    let _ = f.suback_pkid();
                    let _ = f.suback_merged(&[true, false, true]);
                }
                _ => {}
            }
        }
    }
}
