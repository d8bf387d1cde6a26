//! What the node stores, and how the gate waits for it before anyone sees or acknowledges it.
//!
//! A PUBLISH on a topic the node keeps (a twin's `desired`/`reported`, anything the bridge sends
//! upstream) is handed to the node's stores through an [`Intake`] first. The gate forwards the
//! packet to the broker only once the store has committed it, so the broker's PUBACK (QoS 1) or
//! PUBREC (QoS 2), which is what the client receives, follows the commit: **a PUBACK means
//! durable**. Everything a connection sends goes to the broker in the order it was sent (later
//! packets wait behind a pending commit), so acknowledgements keep their order when stored and
//! unstored publishes mix. The stores group-commit whatever waits, so many publishes pending at
//! once cost one commit.

use std::future::Future;
use std::pin::Pin;

use bytes::Bytes;

/// A store could not take the message (disk full, I/O error, the store is stopping). The gate
/// does not acknowledge it: it disconnects the client, which sends the message again when it
/// reconnects.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{0}")]
pub struct NotStored(pub String);

/// Resolves once the message is committed.
pub type Commit = Pin<Box<dyn Future<Output = Result<(), NotStored>> + Send>>;

/// Resolves once the message is queued for its store (waiting for room is the back-pressure);
/// `None` when the node does not store the topic.
pub type Submitted<'a> = Pin<Box<dyn Future<Output = Option<Commit>> + Send + 'a>>;

/// The node's stores, as the gate sees them.
pub trait Intake: Send + Sync {
    /// Hands a client's publish to every store that keeps `topic`. The payload is the frame's
    /// own bytes (no copy).
    fn submit<'a>(&'a self, topic: &'a str, payload: Bytes, retain: bool) -> Submitted<'a>;
}

/// An intake that stores nothing: every publish goes to the broker at once (a gate in front of
/// a plain broker, as in the gate's own tests).
#[derive(Debug, Default, Clone, Copy)]
pub struct NothingStored;

impl Intake for NothingStored {
    fn submit<'a>(&'a self, _topic: &'a str, _payload: Bytes, _retain: bool) -> Submitted<'a> {
        Box::pin(std::future::ready(None))
    }
}
