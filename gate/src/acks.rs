//! The order of a connection's acknowledgements to the broker.
//!
//! rumqttd takes the acknowledgements of its deliveries (PUBACK or PUBREC, then PUBCOMP) only in
//! the order it sent the deliveries, and cuts the connection at the first one out of order. MQTT
//! does not ask that of clients, and the gate answers some deliveries itself (withheld ones, and
//! those sent to the client at a lower QoS), at once, while the client's answers to earlier ones
//! are still on their way. So every acknowledgement waits here until those before it are ready,
//! and they go to the broker in rumqttd's order.
//!
//! Bounded by the broker's in-flight window of the connection (`mqtt.max_inflight_messages`):
//! only deliveries the broker has sent and not yet had acknowledged are held.

use std::collections::VecDeque;

use bytes::{Bytes, BytesMut};

/// One connection's acknowledgements on their way to the broker.
#[derive(Debug, Default)]
pub struct AckOrder {
    /// QoS 1/2 deliveries in the order the broker sent them, with their PUBACK / PUBREC once
    /// ready.
    first: VecDeque<(u16, Option<Bytes>)>,
    /// The broker's PUBRELs in the order it sent them, with their PUBCOMP once ready.
    second: VecDeque<(u16, Option<Bytes>)>,
}

/// Which acknowledgement of a delivery.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// PUBACK (QoS 1) or PUBREC (QoS 2).
    First,
    /// PUBCOMP (QoS 2).
    Second,
}

impl AckOrder {
    /// The broker sent a QoS 1/2 delivery (`Phase::First`) or a PUBREL (`Phase::Second`) with
    /// `pkid`.
    pub fn sent(&mut self, phase: Phase, pkid: u16) {
        self.queue(phase).push_back((pkid, None));
    }

    /// `ack` answers `pkid` in `phase`: appends to `out` every acknowledgement that may go now,
    /// in the broker's order. `false` when nothing waits for that packet id (the caller passes
    /// the ack on as it is and lets the broker judge it).
    pub fn ready(&mut self, phase: Phase, pkid: u16, ack: Bytes, out: &mut BytesMut) -> bool {
        let q = self.queue(phase);
        let Some(slot) = q.iter_mut().find(|(p, a)| *p == pkid && a.is_none()) else {
            return false;
        };
        slot.1 = Some(ack);
        while let Some((_, Some(_))) = q.front() {
            if let Some((_, Some(a))) = q.pop_front() {
                out.extend_from_slice(&a);
            }
        }
        true
    }

    /// How many wait (both phases).
    pub fn len(&self) -> usize {
        self.first.len() + self.second.len()
    }

    /// Whether nothing waits.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn queue(&mut self, phase: Phase) -> &mut VecDeque<(u16, Option<Bytes>)> {
        match phase {
            Phase::First => &mut self.first,
            Phase::Second => &mut self.second,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn ack(pkid: u16) -> Bytes {
        Bytes::from(vec![0x40, 2, (pkid >> 8) as u8, pkid as u8])
    }

    #[test]
    fn an_early_acknowledgement_waits_for_the_ones_before_it() {
        let mut a = AckOrder::default();
        for p in [1, 2, 3] {
            a.sent(Phase::First, p);
        }
        let mut out = BytesMut::new();
        assert!(a.ready(Phase::First, 3, ack(3), &mut out));
        assert!(out.is_empty());
        assert!(a.ready(Phase::First, 1, ack(1), &mut out));
        assert_eq!(&out[..], &ack(1)[..]);
        out.clear();
        assert!(a.ready(Phase::First, 2, ack(2), &mut out));
        assert_eq!(&out[..], &[&ack(2)[..], &ack(3)[..]].concat()[..]);
        assert!(a.is_empty());
    }

    #[test]
    fn an_acknowledgement_nothing_waits_for_is_the_callers() {
        let mut a = AckOrder::default();
        let mut out = BytesMut::new();
        assert!(!a.ready(Phase::Second, 9, ack(9), &mut out));
        a.sent(Phase::First, 9);
        assert!(!a.ready(Phase::Second, 9, ack(9), &mut out));
        assert!(a.ready(Phase::First, 9, ack(9), &mut out));
    }

    proptest! {
        /// Whatever order the answers come in, the broker gets them in its own order, each once.
        #[test]
        fn the_broker_sees_its_own_order(n in 1usize..40, seed: u64) {
            let mut a = AckOrder::default();
            let ids: Vec<u16> = (1..=n as u16).collect();
            for p in &ids {
                a.sent(Phase::First, *p);
            }
            let mut answers = ids.clone();
            let mut x = seed | 1;
            for i in (1..answers.len()).rev() {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                answers.swap(i, (x % (i as u64 + 1)) as usize);
            }
            let mut out = BytesMut::new();
            for p in answers {
                prop_assert!(a.ready(Phase::First, p, ack(p), &mut out));
            }
            let want: Vec<u8> = ids.iter().flat_map(|p| ack(*p).to_vec()).collect();
            prop_assert_eq!(&out[..], &want[..]);
            prop_assert!(a.is_empty());
        }
    }
}
