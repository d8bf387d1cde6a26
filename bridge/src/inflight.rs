//! Ack tracking between outbox sequence numbers and MQTT packet ids (pure, no I/O).
//!
//! rumqttc's `publish()` does not return the packet id it assigns. It does, however, emit
//! `Event::Outgoing(Outgoing::Publish(pkid))` for every QoS 1 publish in the order the requests
//! were queued (its request channel is FIFO, and after a packet-id collision it stops taking new
//! requests until the colliding one went out). So the sender queues an outbox `seq` here *while
//! holding the lock* under which it calls `try_publish`, and the event loop pops the oldest
//! queued [`Ticket`] for each `Outgoing::Publish(pkid)`; a PUBACK for `pkid` then names exactly
//! the records that publish carried: one, or a whole batch ([`crate::batch`]). A lost connection
//! forgets everything (see the bridge module doc for why).

use std::collections::{HashMap, VecDeque};

/// What one publish carries, released by its PUBACK.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ticket {
    /// Not an outbox record (the node's presence, its health document): tracked for its packet
    /// id like any other, never acked in the outbox.
    Untracked,
    /// One outbox record (its in-flight tag, [`crate::lanes::tag`]).
    One(u64),
    /// A batch: every record in it, in outbox order.
    Batch(Vec<u64>),
}

impl Ticket {
    /// The in-flight tags of the records the publish carried.
    pub fn tags(&self) -> &[u64] {
        match self {
            Ticket::Untracked => &[],
            Ticket::One(t) => std::slice::from_ref(t),
            Ticket::Batch(t) => t,
        }
    }
}

/// Publishes handed to rumqttc and not yet acknowledged, for one connection.
#[derive(Debug, Default)]
pub struct Inflight {
    /// Queued with rumqttc, packet id not yet known (oldest first).
    queued: VecDeque<Ticket>,
    /// Written to the socket, waiting for PUBACK.
    on_wire: HashMap<u16, Ticket>,
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

    /// A publish carrying `ticket` was queued with rumqttc.
    pub fn queue(&mut self, ticket: Ticket) {
        self.queued.push_back(ticket);
    }

    /// Undoes the last [`Inflight::queue`] (rumqttc refused the request).
    pub fn unqueue_last(&mut self) {
        self.queued.pop_back();
    }

    /// rumqttc wrote a publish with `pkid`: binds it to the oldest queued ticket.
    pub fn on_outgoing(&mut self, pkid: u16) -> Result<(), Unexpected> {
        let ticket = self.queued.pop_front().ok_or(Unexpected(pkid))?;
        // A pkid still bound means the broker never acked it in this connection; rumqttc only
        // reuses ids after their ack, so this cannot happen without a bug upstream.
        if self.on_wire.insert(pkid, ticket).is_some() {
            return Err(Unexpected(pkid));
        }
        Ok(())
    }

    /// PUBACK for `pkid`: what may now be removed from the outbox.
    pub fn on_puback(&mut self, pkid: u16) -> Option<Ticket> {
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
        f.queue(Ticket::One(10));
        f.queue(Ticket::Batch(vec![11, 13]));
        f.queue(Ticket::Untracked);
        f.on_outgoing(1).unwrap();
        f.on_outgoing(2).unwrap();
        assert_eq!(f.in_flight(), 3);
        // Acks may come in any order; a batch's ack names all of its records.
        assert_eq!(f.on_puback(2).unwrap().tags(), &[11, 13]);
        f.on_outgoing(3).unwrap();
        assert_eq!(f.on_puback(1), Some(Ticket::One(10)));
        assert_eq!(f.on_puback(1), None, "a duplicate ack names nothing");
        assert_eq!(f.on_puback(3).unwrap().tags(), &[] as &[u64]);
        assert_eq!(f.in_flight(), 0);
    }

    #[test]
    fn inflight_reuses_a_packet_id_after_its_ack() {
        let mut f = Inflight::default();
        f.on_connected();
        f.queue(Ticket::One(1));
        f.queue(Ticket::One(2));
        f.on_outgoing(7).unwrap();
        assert_eq!(f.on_puback(7), Some(Ticket::One(1)));
        f.on_outgoing(7).unwrap();
        assert_eq!(f.on_puback(7), Some(Ticket::One(2)));
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
        f.queue(Ticket::One(5));
        f.queue(Ticket::One(6));
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
