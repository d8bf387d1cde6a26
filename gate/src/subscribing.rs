//! SUBSCRIBEs on their way through the broker, so that a subscription the front door received
//! before a publish takes effect before it.
//!
//! Each client has its own connection to the broker, and rumqttd serves connections
//! independently: a subscriber's SUBSCRIBE can reach the router after another client's PUBLISH
//! that the gate received later, and the subscriber misses it. A single-process broker
//! (Mosquitto) never does that. So while a SUBSCRIBE is with the broker (sent, no SUBACK yet), a
//! publish from another connection on a topic it matches waits for that SUBACK (at most
//! [`MAX_WAIT`]); publishes on other topics, and the subscriber's own, do not wait.
//!
//! That covers a SUBSCRIBE the gate has read. One sent a few microseconds before the PUBLISH
//! may still be unread on its socket when the PUBLISH is handled (each connection is a task of
//! its own), so the relay yields once per read that holds a publish before handling it: the
//! connections that became readable with it are read first (tokio runs a yielded task after
//! polling the I/O driver). Measured with the Paho suite, whose `test_subscribe_options` and
//! `test_request_response` publish right after another client's SUBSCRIBE without waiting for
//! its SUBACK: without the yield the first failed in 3 of 4 runs and the second in 1 of 3;
//! with it both passed in each of 4 runs.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Duration;

/// Longest a publish waits for a SUBACK (a broker that never answers must not stall
/// publishers).
pub const MAX_WAIT: Duration = Duration::from_secs(1);

/// The SUBSCRIBEs the broker has not answered yet, node-wide.
#[derive(Debug, Default)]
pub struct Subscribing {
    /// (connection, packet id) → filters.
    pending: Mutex<HashMap<(u64, u16), Vec<String>>>,
    /// How many are pending (the publish path's lock-free check).
    count: AtomicUsize,
    answered: tokio::sync::Notify,
}

impl Subscribing {
    /// Connection `conn` sent the broker a SUBSCRIBE `pkid` for `filters`.
    pub fn sent(&self, conn: u64, pkid: u16, filters: Vec<String>) {
        let mut p = self.lock();
        if p.insert((conn, pkid), filters).is_none() {
            self.count.fetch_add(1, Ordering::Release);
        }
    }

    /// The broker answered `conn`'s SUBSCRIBE `pkid`.
    pub fn answered(&self, conn: u64, pkid: u16) {
        if self.lock().remove(&(conn, pkid)).is_some() {
            self.count.fetch_sub(1, Ordering::Release);
            self.answered.notify_waiters();
        }
    }

    /// Connection `conn` ended: none of its SUBSCRIBEs is waited for any more.
    pub fn ended(&self, conn: u64) {
        let mut p = self.lock();
        let before = p.len();
        p.retain(|(c, _), _| *c != conn);
        let gone = before - p.len();
        if gone > 0 {
            self.count.fetch_sub(gone, Ordering::Release);
            self.answered.notify_waiters();
        }
    }

    /// Returns once no SUBSCRIBE of another connection than `me` matching `topic` is with the
    /// broker (or after [`MAX_WAIT`]).
    pub async fn before_publish(&self, me: u64, topic: &str) {
        if self.count.load(Ordering::Acquire) == 0 {
            return;
        }
        let deadline = tokio::time::Instant::now() + MAX_WAIT;
        loop {
            let answered = self.answered.notified();
            tokio::pin!(answered);
            answered.as_mut().enable();
            if !self.waits_for(me, topic) {
                return;
            }
            if tokio::time::timeout_at(deadline, answered).await.is_err() {
                return;
            }
        }
    }

    fn waits_for(&self, me: u64, topic: &str) -> bool {
        self.lock().iter().any(|((c, _), filters)| {
            *c != me
                && filters.iter().any(|f| {
                    let f = crate::acl::strip_share(f).unwrap_or(f);
                    edgetwin_contract::topic::filter::matches(f, topic)
                })
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<(u64, u16), Vec<String>>> {
        self.pending
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[tokio::test]
    async fn a_publish_waits_for_a_matching_subscribe_of_another_connection_only() {
        let s = Arc::new(Subscribing::default());
        s.sent(1, 7, vec!["a/+".into()]);
        // Another topic, or the subscriber itself: no wait.
        tokio::time::timeout(Duration::from_millis(1), s.before_publish(2, "b/x"))
            .await
            .expect("other topic");
        tokio::time::timeout(Duration::from_millis(1), s.before_publish(1, "a/x"))
            .await
            .expect("own connection");
        // A matching publish waits until the SUBACK.
        let waiting = tokio::spawn({
            let s = s.clone();
            async move { s.before_publish(2, "a/x").await }
        });
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(!waiting.is_finished());
        s.answered(1, 7);
        tokio::time::timeout(Duration::from_millis(500), waiting)
            .await
            .expect("released by the SUBACK")
            .expect("task");
    }

    #[tokio::test]
    async fn an_unanswered_subscribe_holds_a_publish_at_most_max_wait() {
        let s = Subscribing::default();
        s.sent(1, 7, vec!["#".into()]);
        let started = tokio::time::Instant::now();
        s.before_publish(2, "a").await;
        assert!(started.elapsed() >= MAX_WAIT);
        s.ended(1);
        let started = tokio::time::Instant::now();
        s.before_publish(2, "a").await;
        assert!(started.elapsed() < Duration::from_millis(500));
    }
}
