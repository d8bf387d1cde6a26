//! Client ids bound to the identity that holds them, so one client cannot take over another's
//! session. In plain MQTT a CONNECT with a client id already in use disconnects the holder and
//! takes its session (its subscriptions and queued messages); behind the gate that would let a
//! mapper kick another protocol's mapper off the node, or read a persistent session's queue. The
//! gate lets an id be used only by the identity (user, certificate name, `anonymous`) that holds
//! it: while it is connected, and for a session the broker keeps after the disconnect, from then
//! on, across restarts of the node too (the kept sessions the gate restores name their identity,
//! [`ClientIds::hold_kept`]). A different identity is refused with MQTT's
//! "client identifier not valid". The same identity takes its own session over as MQTT says.
//!
//! Pure: the relay calls [`ClientIds::claim`] after authentication and [`ClientIds::release`]
//! when the connection ends.

use std::collections::HashMap;

/// Who holds a client id.
#[derive(Debug)]
struct Holder {
    identity: String,
    /// Connections of that identity using the id now (a takeover overlaps the old one briefly).
    live: u32,
    /// The broker keeps a session for the id after the last connection ends.
    kept: bool,
}

/// The table of held client ids, bounded.
#[derive(Debug)]
pub struct ClientIds {
    held: HashMap<String, Holder>,
    max: usize,
}

/// The id is held by another identity.
#[derive(Debug, PartialEq, Eq)]
pub struct Taken {
    /// Who holds it.
    pub by: String,
}

impl ClientIds {
    /// A table holding at most `max` ids (then ids of kept sessions nobody is connected with
    /// are forgotten first).
    pub fn new(max: usize) -> ClientIds {
        ClientIds {
            held: HashMap::new(),
            max,
        }
    }

    /// `identity` connects with `client_id`; `keeps_session` whether the broker keeps the
    /// session after it disconnects. An empty id (the broker assigns a fresh one) is nobody's.
    pub fn claim(
        &mut self,
        client_id: &str,
        identity: &str,
        keeps_session: bool,
    ) -> Result<(), Taken> {
        if client_id.is_empty() {
            return Ok(());
        }
        if let Some(h) = self.held.get_mut(client_id) {
            if h.identity != identity {
                return Err(Taken {
                    by: h.identity.clone(),
                });
            }
            h.live += 1;
            h.kept = keeps_session;
            return Ok(());
        }
        self.insert(
            client_id,
            Holder {
                identity: identity.to_string(),
                live: 1,
                kept: keeps_session,
            },
        );
        Ok(())
    }

    /// A new holder, making room first when the table is full.
    fn insert(&mut self, client_id: &str, holder: Holder) {
        if self.held.len() >= self.max {
            self.forget_one_idle();
        }
        self.held.insert(client_id.to_string(), holder);
    }

    /// `identity` held `client_id` with a kept session before the node restarted: it is still
    /// theirs (unless someone holds it already).
    pub fn hold_kept(&mut self, client_id: &str, identity: &str) {
        if client_id.is_empty() || self.held.contains_key(client_id) {
            return;
        }
        self.insert(
            client_id,
            Holder {
                identity: identity.to_string(),
                live: 0,
                kept: true,
            },
        );
    }

    /// A connection that claimed `client_id` ended.
    pub fn release(&mut self, client_id: &str) {
        if let Some(h) = self.held.get_mut(client_id) {
            h.live = h.live.saturating_sub(1);
            if h.live == 0 && !h.kept {
                self.held.remove(client_id);
            }
        }
    }

    /// Makes room: an id nobody is connected with (a kept session's). If every id is in use,
    /// the table grows past `max` by the connections themselves, which other limits bound.
    fn forget_one_idle(&mut self) {
        let idle = self
            .held
            .iter()
            .find(|(_, h)| h.live == 0)
            .map(|(id, _)| id.clone());
        if let Some(id) = idle {
            self.held.remove(&id);
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn client_ids_a_kept_session_restored_after_a_restart_stays_its_identitys() {
        let mut ids = ClientIds::new(10);
        ids.hold_kept("app-1", "app");
        assert!(ids.claim("app-1", "mapper", true).is_err());
        assert_eq!(ids.claim("app-1", "app", true), Ok(()));
    }

    #[test]
    fn client_ids_another_identity_cannot_take_a_connected_id() {
        let mut ids = ClientIds::new(10);
        assert_eq!(
            ids.claim("edgetwin-mapper-modbus", "modbus-mapper", false),
            Ok(())
        );
        assert_eq!(
            ids.claim("edgetwin-mapper-modbus", "opcua-mapper", false),
            Err(Taken {
                by: "modbus-mapper".into()
            })
        );
        // The holder itself may take its session over (MQTT's rule), and the id is free once
        // every one of its connections ended.
        assert_eq!(
            ids.claim("edgetwin-mapper-modbus", "modbus-mapper", false),
            Ok(())
        );
        ids.release("edgetwin-mapper-modbus");
        assert!(ids
            .claim("edgetwin-mapper-modbus", "opcua-mapper", false)
            .is_err());
        ids.release("edgetwin-mapper-modbus");
        assert_eq!(
            ids.claim("edgetwin-mapper-modbus", "opcua-mapper", false),
            Ok(())
        );
    }

    #[test]
    fn client_ids_a_kept_session_stays_its_owners_after_the_disconnect() {
        let mut ids = ClientIds::new(10);
        ids.claim("historian", "app-1", true).unwrap();
        ids.release("historian");
        assert!(
            ids.claim("historian", "app-2", false).is_err(),
            "would read app-1's queue"
        );
        ids.claim("historian", "app-1", false).unwrap();
        ids.release("historian");
        // Reconnected with a clean session: nothing is kept, the id is free.
        ids.claim("historian", "app-2", false).unwrap();
    }

    #[test]
    fn client_ids_empty_ids_are_nobodys_and_the_table_is_bounded() {
        let mut ids = ClientIds::new(2);
        ids.claim("", "a", true).unwrap();
        ids.claim("", "b", true).unwrap();
        ids.claim("k1", "a", true).unwrap();
        ids.release("k1");
        ids.claim("k2", "a", true).unwrap();
        ids.release("k2");
        ids.claim("k3", "a", true).unwrap();
        assert!(ids.held.len() <= 2, "{:?}", ids.held);
    }
}
