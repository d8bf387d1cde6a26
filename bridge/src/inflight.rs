//! Ack tracking between outbox sequence numbers and MQTT packet ids (pure, no I/O).
//!
//! rumqttc's `publish()` does not return the packet id it assigns. It does, however, emit
//! `Event::Outgoing(Outgoing::Publish(pkid))` for every QoS 1 publish in the order the requests
//! were queued (its request channel is FIFO, and after a packet-id collision it stops taking new
//! requests until the colliding one went out). So the sender queues an outbox `seq` here *while
//! holding the lock* under which it calls `try_publish`, and the event loop pops the oldest
//! queued `seq` for each `Outgoing::Publish(pkid)`; a PUBACK for `pkid` then names exactly one
//! `seq`. A lost connection forgets everything (see the bridge module doc for why).

use std::collections::{HashMap, VecDeque};

/// The "sequence number" of a publish that is not an outbox record (the node's presence on
/// `{prefix}node/status`): tracked for its packet id like any other, never acked in the outbox.
pub const UNTRACKED: u64 = u64::MAX;

/// Publishes handed to rumqttc and not yet acknowledged, for one connection.
#[derive(Debug, Default)]
pub struct Inflight {
    /// Queued with rumqttc, packet id not yet known (oldest first).
    queued: VecDeque<u64>,
    /// Written to the socket, waiting for PUBACK.
    on_wire: HashMap<u16, u64>,
    /// Connection generation; bumped on every CONNACK.
    epoch: u64,
    connected: bool,
}

/// rumqttc reported a publish that we did not queue (a bug, or rumqttc state we failed to clear).
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
#[error("rumqttc sent packet id {0} for a publish the bridge did not queue")]
pub struct Unexpected(pub u16);

impl Inflight {
    /// Publishes not yet acknowledged (queued plus on the wire).
    pub fn in_flight(&self) -> usize {
        self.queued.len() + self.on_wire.len()
    }

    /// The current connection generation.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// Whether the connection of `epoch` is up (so a publish may be queued for it).
    pub fn is_current(&self, epoch: u64) -> bool {
        self.connected && self.epoch == epoch
    }

    /// Whether the cloud connection is up.
    pub fn is_connected(&self) -> bool {
        self.connected
    }

    /// A publish for `seq` was queued with rumqttc.
    pub fn queue(&mut self, seq: u64) {
        self.queued.push_back(seq);
    }

    /// Undoes the last [`Inflight::queue`] (rumqttc refused the request).
    pub fn unqueue_last(&mut self) {
        self.queued.pop_back();
    }

    /// rumqttc wrote a publish with `pkid`: binds it to the oldest queued `seq`.
    pub fn on_outgoing(&mut self, pkid: u16) -> Result<u64, Unexpected> {
        let seq = self.queued.pop_front().ok_or(Unexpected(pkid))?;
        // A pkid still bound means the broker never acked it in this connection; rumqttc only
        // reuses ids after their ack, so this cannot happen without a bug upstream.
        if self.on_wire.insert(pkid, seq).is_some() {
            return Err(Unexpected(pkid));
        }
        Ok(seq)
    }

    /// PUBACK for `pkid`: the `seq` that may now be removed from the outbox.
    pub fn on_puback(&mut self, pkid: u16) -> Option<u64> {
        self.on_wire.remove(&pkid)
    }

    /// CONNACK: a new connection generation starts with nothing in flight.
    pub fn on_connected(&mut self) -> u64 {
        self.queued.clear();
        self.on_wire.clear();
        self.epoch += 1;
        self.connected = true;
        self.epoch
    }

    /// The connection is gone: forget every binding (the records stay in the outbox and are sent
    /// again on the next connection). Returns how many were in flight.
    pub fn on_lost(&mut self) -> usize {
        let n = self.in_flight();
        self.queued.clear();
        self.on_wire.clear();
        self.connected = false;
        n
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn inflight_binds_packet_ids_in_queue_order_and_acks_by_id() {
        let mut f = Inflight::default();
        let e = f.on_connected();
        assert!(f.is_current(e));
        for s in [10, 11, 12] {
            f.queue(s);
        }
        assert_eq!(f.on_outgoing(1), Ok(10));
        assert_eq!(f.on_outgoing(2), Ok(11));
        assert_eq!(f.in_flight(), 3);
        // Acks may come in any order.
        assert_eq!(f.on_puback(2), Some(11));
        assert_eq!(f.on_outgoing(3), Ok(12));
        assert_eq!(f.on_puback(1), Some(10));
        assert_eq!(f.on_puback(1), None, "a duplicate ack names nothing");
        assert_eq!(f.on_puback(3), Some(12));
        assert_eq!(f.in_flight(), 0);
    }

    #[test]
    fn inflight_reuses_a_packet_id_after_its_ack() {
        let mut f = Inflight::default();
        f.on_connected();
        f.queue(1);
        f.queue(2);
        assert_eq!(f.on_outgoing(7), Ok(1));
        assert_eq!(f.on_puback(7), Some(1));
        assert_eq!(f.on_outgoing(7), Ok(2));
        assert_eq!(f.on_puback(7), Some(2));
    }

    #[test]
    fn inflight_rejects_publish_it_did_not_queue() {
        let mut f = Inflight::default();
        f.on_connected();
        assert_eq!(f.on_outgoing(1), Err(Unexpected(1)));
    }

    #[test]
    fn inflight_lost_connection_forgets_bindings_and_stale_acks() {
        let mut f = Inflight::default();
        let e1 = f.on_connected();
        f.queue(5);
        f.queue(6);
        f.on_outgoing(1).unwrap();
        assert_eq!(f.on_lost(), 2);
        assert!(!f.is_current(e1));
        let e2 = f.on_connected();
        assert_ne!(e1, e2);
        assert_eq!(
            f.on_puback(1),
            None,
            "an ack of the old connection names nothing"
        );
        assert_eq!(f.in_flight(), 0);
    }
}
