//! Which client sessions the broker keeps, and until when: MQTT 5 Session Expiry, which rumqttd
//! does not have.
//!
//! rumqttd keeps a session exactly when the CONNECT had `clean_start` 0, and keeps it for good.
//! The gate therefore keeps the clock: it tells the broker to keep a session only when the
//! client asked for one (3.1.1 `clean_session` 0, MQTT 5 Session Expiry Interval above 0),
//! remembers when each kept session ends (its expiry counts from the disconnect, and a v5
//! DISCONNECT may change it), and ends it at the broker when that time comes (a clean-start
//! connect of the same client id, [`Sessions::expired`]). The table also keeps what the broker
//! cannot: each session's subscription options (No Local, Retain As Published), which the
//! connection that resumes the session gets back.
//!
//! The table survives a restart through a [`SessionStore`] (the node's `sessions.redb`): at start
//! the gate restores every session whose time has not run out and subscribes its filters at the
//! broker again, so what is published from then on is queued for it.
//!
//! While nobody holds a kept session, the gate holds it at the broker itself (a "keeper",
//! `keeper.rs`) and writes what the broker delivers to it into the store's queue of that
//! session ([`SessionStore::enqueue`]), so queued messages outlive a restart as well. rumqttd
//! alone keeps them in memory only.
//!
//! Pure: the relay asks [`Sessions::open`] at CONNECT and [`Sessions::close`] at the end.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use crate::origin::{Options, Subscriptions};

/// Seconds that mean "never ends" (MQTT 5 §3.1.2.11.2).
pub const FOREVER: u32 = u32::MAX;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Held {
    /// A connection (this gate number) has it.
    By(u64),
    /// Nobody; it ends then.
    Until(Instant),
    /// Nobody; it never ends.
    Forever,
    /// Its time ran out and the broker's copy is being ended ([`Sessions::expired`]); a CONNECT
    /// of the client id waits for [`Sessions::cleared`].
    Clearing,
}

#[derive(Debug, Clone)]
struct Kept {
    held: Held,
    /// Seconds after the disconnect (the CONNECT's, or its DISCONNECT's).
    expiry: u32,
    subs: Subscriptions,
    /// The client id as the client wrote it, and the identity holding it.
    owner: Option<(String, String)>,
}

/// A kept session as it is stored across restarts.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct StoredSession {
    /// Seconds after the disconnect ([`FOREVER`]: never ends).
    pub expiry_s: u32,
    /// When it ends, in milliseconds since the Unix epoch; `None` when it never ends or a
    /// connection held it (then it ends `expiry_s` after the node is back).
    pub ends_at_ms: Option<u64>,
    /// Its filters with their options.
    pub subs: Vec<(String, Options)>,
    /// The client id as the client wrote it (the key is the broker's form of it).
    #[serde(default)]
    pub client_id: String,
    /// The identity (user, certificate name, `anonymous`) holding it: after a restart, the
    /// client id is still that identity's (see [`crate::client_ids`]).
    #[serde(default)]
    pub identity: String,
}

/// A message queued for a kept session while nobody held it, as its client is to get it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Queued {
    /// Its place in the session's queue (the store numbers them, rising).
    pub seq: u64,
    /// The delivery as an MQTT 5 PUBLISH (QoS, retain flag and properties as the client gets
    /// them; the packet id is a placeholder).
    pub publish: Vec<u8>,
    /// When its Message Expiry runs out, in milliseconds since the Unix epoch.
    pub expires_at_ms: Option<u64>,
}

/// A message for [`SessionStore::enqueue`]: the publish and its expiry, as in [`Queued`].
pub type ToQueue = (Vec<u8>, Option<u64>);

/// Resolves when what was handed to the store is on disk (`Err`: it is not, and why).
pub type Written = tokio::sync::oneshot::Receiver<Result<(), String>>;

/// Where the session table is kept across restarts.
pub trait SessionStore: Send + Sync {
    /// Every stored session by (upstream) client id, once, at start.
    fn load(&self) -> Vec<(String, StoredSession)>;
    /// Stores (or replaces) a session. May return before it is on disk.
    fn put(&self, client: &str, session: &StoredSession);
    /// Forgets a session (and its queue).
    fn remove(&self, client: &str);
    /// Whether this store keeps queues. Without, messages for a session nobody holds stay in
    /// the broker's memory (and end with the process).
    fn keeps_queues(&self) -> bool {
        false
    }
    /// Appends `messages` to `client`'s queue, in order.
    fn enqueue(&self, client: &str, messages: Vec<ToQueue>) -> Written {
        let _ = (client, messages);
        let (tx, rx) = tokio::sync::oneshot::channel();
        let _ = tx.send(Err("this store keeps no queues".into()));
        rx
    }
    /// `client`'s queue, oldest first, after every change handed to the store before.
    fn queued(&self, client: &str) -> tokio::sync::oneshot::Receiver<Vec<Queued>> {
        let _ = client;
        let (tx, rx) = tokio::sync::oneshot::channel();
        let _ = tx.send(Vec::new());
        rx
    }
    /// How many messages and bytes `client`'s queue holds (as last written).
    fn queue_len(&self, client: &str) -> (usize, usize) {
        let _ = client;
        (0, 0)
    }
    /// The client got message `seq` of its queue: it goes.
    fn dequeue(&self, client: &str, seq: u64) {
        let _ = (client, seq);
    }
    /// Empties `client`'s queue (its session ended, or a clean start).
    fn clear_queue(&self, client: &str) {
        let _ = client;
    }
}

/// Keeps nothing: sessions end with the process (a gate without the node).
#[derive(Debug, Default)]
pub struct NoSessionStore;

impl SessionStore for NoSessionStore {
    fn load(&self) -> Vec<(String, StoredSession)> {
        Vec::new()
    }
    fn put(&self, _: &str, _: &StoredSession) {}
    fn remove(&self, _: &str) {}
}

/// What a CONNECT gets.
#[derive(Debug, Clone)]
pub struct Opened {
    /// The broker holds an old session of this client id that has to go first (clean start,
    /// or it expired): connect with clean start and disconnect before the real upstream connect.
    pub clear_first: bool,
    /// What the upstream CONNECT says: 0 keeps the session at the broker.
    pub clean_start: bool,
    /// The CONNACK's Session Present.
    pub present: bool,
    /// The resumed session's subscription options (empty for a new session).
    pub subs: Subscriptions,
}

/// The kept sessions of every client id.
#[derive(Debug, Default)]
pub struct Sessions {
    kept: HashMap<String, Kept>,
}

impl Sessions {
    /// A CONNECT of `client` on gate connection `conn`, asking for a clean start or not, with
    /// `expiry` seconds of session after it ends. `None`: the broker's copy of an expired
    /// session is being ended right now; ask again shortly.
    pub fn open(
        &mut self,
        client: &str,
        clean_start: bool,
        expiry: u32,
        conn: u64,
        now: Instant,
    ) -> Option<Opened> {
        if self
            .kept
            .get(client)
            .is_some_and(|k| k.held == Held::Clearing)
        {
            return None;
        }
        let old = self.kept.remove(client);
        let alive = old.as_ref().is_some_and(|k| match k.held {
            Held::Until(at) => at > now,
            Held::By(_) | Held::Forever => true,
            Held::Clearing => false,
        });
        let resume = alive && !clean_start;
        let subs = match (resume, old.as_ref()) {
            (true, Some(k)) => k.subs.clone(),
            _ => Subscriptions::default(),
        };
        let keep = expiry > 0;
        let opened = Opened {
            // A clean-start connect ends the old session by itself; a kept new one cannot be a
            // clean start at the broker, so the old one is ended first.
            clear_first: old.is_some() && !resume && keep,
            clean_start: !keep && !resume,
            present: resume,
            subs: subs.clone(),
        };
        if keep || resume {
            self.kept.insert(
                client.to_string(),
                Kept {
                    held: Held::By(conn),
                    expiry,
                    subs,
                    owner: old.and_then(|k| k.owner),
                },
            );
        }
        Some(opened)
    }

    /// Whether another connection than `conn` holds `client`'s session right now (a takeover,
    /// or a client that reconnects before its old connection has finished: that one may still
    /// have a DISCONNECT to read that ends the session).
    pub fn held_by_another(&self, client: &str, conn: u64) -> bool {
        self.kept
            .get(client)
            .is_some_and(|k| matches!(k.held, Held::By(c) if c != conn))
    }

    /// Connection `conn` of `client` ended (or sent DISCONNECT) with `expiry` seconds of session
    /// to run (the CONNECT's, or its DISCONNECT's) and `subs`. A session with no time left stays
    /// in the table as expired until the broker's copy is ended: by the next CONNECT of the
    /// client id or by the sweep, whichever comes first.
    pub fn close(
        &mut self,
        client: &str,
        conn: u64,
        expiry: u32,
        subs: Subscriptions,
        now: Instant,
    ) {
        let Some(k) = self.kept.get_mut(client) else {
            return;
        };
        if k.held != Held::By(conn) {
            // Taken over by a newer connection: the session is that one's now.
            return;
        }
        k.subs = subs;
        k.expiry = expiry;
        k.held = match expiry {
            FOREVER => Held::Forever,
            s => Held::Until(now + Duration::from_secs(u64::from(s))),
        };
    }

    /// Sessions whose time ran out: marked as being ended, for the caller to end the broker's
    /// copies and then call [`Sessions::cleared`] for each.
    pub fn expired(&mut self, now: Instant) -> Vec<String> {
        let mut gone = Vec::new();
        for (c, k) in &mut self.kept {
            if matches!(k.held, Held::Until(at) if at <= now) {
                k.held = Held::Clearing;
                gone.push(c.clone());
            }
        }
        gone
    }

    /// The broker's copy of `client`'s expired session is gone.
    pub fn cleared(&mut self, client: &str) {
        if self
            .kept
            .get(client)
            .is_some_and(|k| k.held == Held::Clearing)
        {
            self.kept.remove(client);
        }
    }

    /// Connection `conn`'s subscriptions changed (kept with the session, so a restart finds
    /// them).
    pub fn update_subs(&mut self, client: &str, conn: u64, subs: &Subscriptions) -> bool {
        match self.kept.get_mut(client) {
            Some(k) if k.held == Held::By(conn) => {
                k.subs = subs.clone();
                true
            }
            _ => false,
        }
    }

    /// Who holds `client`'s session: the client id as written and the identity.
    pub fn set_owner(&mut self, client: &str, client_id: &str, identity: &str) {
        if let Some(k) = self.kept.get_mut(client) {
            k.owner = Some((client_id.to_string(), identity.to_string()));
        }
    }

    /// `client`'s session as it is to be stored; `None`: nothing to store (no session, or its
    /// broker copy is being ended).
    pub fn stored(&self, client: &str, now: Instant, now_ms: u64) -> Option<StoredSession> {
        let k = self.kept.get(client)?;
        let ends_at_ms = match k.held {
            Held::Clearing => return None,
            Held::By(_) | Held::Forever => None,
            Held::Until(at) => Some(now_ms.saturating_add(
                u64::try_from(at.saturating_duration_since(now).as_millis()).unwrap_or(u64::MAX),
            )),
        };
        let (client_id, identity) = k.owner.clone().unwrap_or_default();
        Some(StoredSession {
            expiry_s: k.expiry,
            ends_at_ms,
            subs: k.subs.iter().map(|(f, o)| (f.clone(), *o)).collect(),
            client_id,
            identity,
        })
    }

    /// Puts back a session stored before a restart (nobody holds it now). `false`: its time ran
    /// out meanwhile; it is not restored.
    pub fn restore(&mut self, client: &str, s: &StoredSession, now: Instant, now_ms: u64) -> bool {
        let held = if s.expiry_s == FOREVER {
            Held::Forever
        } else {
            let ends = s
                .ends_at_ms
                .unwrap_or_else(|| now_ms.saturating_add(u64::from(s.expiry_s) * 1000));
            if ends <= now_ms {
                return false;
            }
            Held::Until(now + Duration::from_millis(ends - now_ms))
        };
        let mut subs = Subscriptions::default();
        for (f, o) in &s.subs {
            subs.subscribe(f, *o, 0);
        }
        self.kept.insert(
            client.to_string(),
            Kept {
                held,
                expiry: s.expiry_s,
                subs,
                owner: (!s.identity.is_empty()).then(|| (s.client_id.clone(), s.identity.clone())),
            },
        );
        true
    }

    /// Whether `client`'s session is kept with no connection holding it (a keeper holds it
    /// then), and its subscriptions.
    pub fn unheld(&self, client: &str) -> Option<&Subscriptions> {
        self.kept
            .get(client)
            .filter(|k| matches!(k.held, Held::Until(_) | Held::Forever))
            .map(|k| &k.subs)
    }

    /// How many sessions are kept (connected or not).
    pub fn len(&self) -> usize {
        self.kept.len()
    }

    /// Whether none is.
    pub fn is_empty(&self) -> bool {
        self.kept.is_empty()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn none() -> Subscriptions {
        Subscriptions::default()
    }

    #[test]
    fn no_expiry_means_no_session_after_the_connection() {
        let mut s = Sessions::default();
        let t = Instant::now();
        let o = s.open("a", true, 0, 1, t).unwrap();
        assert!(o.clean_start && !o.present && !o.clear_first);
        s.close("a", 1, 0, none(), t);
        assert!(s.is_empty());
        let o = s.open("a", false, 0, 2, t).unwrap();
        assert!(o.clean_start && !o.present);
    }

    #[test]
    fn a_kept_session_resumes_within_its_expiry_and_not_after() {
        let mut s = Sessions::default();
        let t = Instant::now();
        let o = s.open("a", true, 5, 1, t).unwrap();
        assert!(!o.clean_start && !o.present && !o.clear_first);
        s.close("a", 1, 5, none(), t);
        let o = s
            .open("a", false, 5, 2, t + Duration::from_secs(2))
            .unwrap();
        assert!(o.present && !o.clean_start && !o.clear_first);
        s.close("a", 2, 5, none(), t + Duration::from_secs(2));
        // Expired: not present, and the broker's old copy goes first.
        let o = s
            .open("a", false, 5, 3, t + Duration::from_secs(8))
            .unwrap();
        assert!(!o.present && o.clear_first && !o.clean_start);
    }

    #[test]
    fn clean_start_with_expiry_ends_the_old_session_first_and_keeps_the_new_one() {
        let mut s = Sessions::default();
        let t = Instant::now();
        s.open("a", true, 60, 1, t);
        s.close("a", 1, 60, none(), t);
        let o = s.open("a", true, 60, 2, t).unwrap();
        assert!(o.clear_first && !o.clean_start && !o.present);
    }

    #[test]
    fn a_session_is_held_by_another_connection_until_that_one_closes() {
        let mut s = Sessions::default();
        let t = Instant::now();
        s.open("a", false, 60, 1, t);
        assert!(s.held_by_another("a", 2), "connection 1 still holds it");
        assert!(!s.held_by_another("a", 1));
        s.close("a", 1, 0, none(), t);
        assert!(
            !s.held_by_another("a", 2),
            "closed (with expiry 0): nobody holds it"
        );
        let o = s.open("a", false, 60, 2, t).unwrap();
        assert!(!o.present, "the DISCONNECT's expiry 0 ended it");
    }

    #[test]
    fn a_disconnect_with_expiry_zero_ends_a_kept_session_at_once() {
        let mut s = Sessions::default();
        let t = Instant::now();
        s.open("a", true, 60, 1, t);
        s.close("a", 1, 0, none(), t);
        // Reconnecting at once finds no session, and the broker's copy is ended first.
        let o = s.open("a", false, 60, 2, t).unwrap();
        assert!(!o.present && o.clear_first);
    }

    #[test]
    fn the_sweep_ends_sessions_whose_time_ran_out_but_not_held_or_endless_ones() {
        let mut s = Sessions::default();
        let t = Instant::now();
        s.open("short", true, 1, 1, t);
        s.close("short", 1, 1, none(), t);
        s.open("forever", false, FOREVER, 2, t);
        s.close("forever", 2, FOREVER, none(), t);
        s.open("held", true, 1, 3, t);
        let later = t + Duration::from_secs(2);
        assert_eq!(s.expired(later), vec!["short".to_string()]);
        // While its broker copy is ended, a CONNECT of that id waits.
        assert!(s.open("short", false, 1, 4, later).is_none());
        s.cleared("short");
        assert!(!s.open("short", false, 1, 4, later).unwrap().present);
        assert_eq!(s.len(), 3);
    }

    #[test]
    fn a_stored_session_comes_back_after_a_restart_with_its_time_and_subscriptions() {
        let mut s = Sessions::default();
        let t = Instant::now();
        let ms = 1_000_000;
        s.open("held", true, 60, 1, t);
        let mut subs = none();
        subs.subscribe(
            "a/#",
            Options {
                qos: 1,
                no_local: true,
                retain_as_published: false,
                no_retained: false,
            },
            0,
        );
        assert!(s.update_subs("held", 1, &subs));
        s.set_owner("held", "plant/held", "app");
        s.open("left", true, 10, 2, t);
        s.close("left", 2, 10, none(), t);
        let held = s.stored("held", t, ms).unwrap();
        assert_eq!(
            (held.client_id.as_str(), held.identity.as_str()),
            ("plant/held", "app")
        );
        assert_eq!(
            (held.expiry_s, held.ends_at_ms, held.subs.len()),
            (60, None, 1)
        );
        let left = s
            .stored("left", t + Duration::from_secs(4), ms + 4000)
            .unwrap();
        assert_eq!(left.ends_at_ms, Some(ms + 10_000));

        // The node is back 5 s later.
        let mut back = Sessions::default();
        let t2 = Instant::now();
        assert!(back.restore("held", &held, t2, ms + 5000));
        assert!(back.restore("left", &left, t2, ms + 5000));
        let o = back.open("held", false, 60, 9, t2).unwrap();
        assert!(o.present && o.subs.contains("a/#"));
        // 20 s later "left" has run out.
        let mut late = Sessions::default();
        assert!(!late.restore("left", &left, t2, ms + 20_000));
    }

    #[test]
    fn a_taken_over_session_belongs_to_the_newer_connection() {
        let mut s = Sessions::default();
        let t = Instant::now();
        s.open("a", true, 60, 1, t);
        let o = s.open("a", false, 60, 2, t).unwrap();
        assert!(o.present);
        // The old connection's end changes nothing.
        s.close("a", 1, 0, none(), t);
        assert!(s.open("a", false, 60, 3, t).unwrap().present);
    }
}
