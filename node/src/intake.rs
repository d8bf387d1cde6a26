//! The node's stores as the front door sees them: which topics the node keeps, and where a
//! client's publish on one goes before it may be acknowledged (see `edgetwin_gate::intake`).
//!
//! - `dt/{device}/desired` and `dt/{device}/reported` go to the twin service, which answers
//!   after the batch holding them is committed to the twin store (or the patch is rejected).
//! - Anything on a bridge `up` route goes to the bridge's tap, which answers after the outbox
//!   append.
//! - A retained publish on a topic outside the node's topic API goes to the retained store, so
//!   it is still there after a restart.
//!
//! A topic with more than one (an `up` route such as `dt/#`) waits for all of them.

use bytes::Bytes;
use edgetwin_contract::Topic;
use edgetwin_gate::{Commit, NotStored, Submitted};
use tokio::sync::{mpsc, oneshot};

use crate::twin_service::{ClientPublish, Input};

/// What the node stores, and the way in.
pub struct NodeIntake {
    /// The twin service's input.
    pub twins: mpsc::Sender<Input>,
    /// The bridge's tap, when there is a bridge.
    pub upstream: Option<edgetwin_bridge::Intake>,
    /// The durable retained store (clients' retained messages outside the node's topic API).
    pub retained: Option<mpsc::Sender<crate::retained::RetainedWrite>>,
}

impl NodeIntake {
    async fn submit_owned(&self, topic: &str, payload: Bytes, retain: bool) -> Option<Commit> {
        let parsed = Topic::parse(topic);
        let twin = matches!(parsed, Some(Topic::Desired(_) | Topic::Reported(_)));
        let up = self.upstream.as_ref().filter(|u| u.carries(topic));
        let keep = self
            .retained
            .as_ref()
            .filter(|_| retain && crate::retained::kept(parsed.as_ref()));
        if !twin && up.is_none() && keep.is_none() {
            return None;
        }
        let mut waits: Vec<oneshot::Receiver<Result<(), String>>> = Vec::with_capacity(2);
        if twin {
            let (done, rx) = oneshot::channel();
            let input = Input::Client(ClientPublish {
                topic: topic.to_string(),
                payload: payload.clone(),
                done,
            });
            if self.twins.send(input).await.is_err() {
                return Some(not_stored("the twin service has stopped"));
            }
            waits.push(rx);
        }
        if let Some(keep) = keep {
            let (done, rx) = oneshot::channel();
            let write = crate::retained::RetainedWrite {
                topic: topic.to_string(),
                payload: payload.clone(),
                done,
            };
            if keep.send(write).await.is_err() {
                return Some(not_stored("the retained store has stopped"));
            }
            waits.push(rx);
        }
        if let Some(up) = up {
            match up.submit(topic, payload).await {
                Some(rx) => waits.push(rx),
                None => return Some(not_stored("the bridge has stopped")),
            }
        }
        Some(Box::pin(async move {
            for w in waits {
                match w.await {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => return Err(NotStored(e)),
                    Err(_) => return Err(NotStored("the store stopped before committing".into())),
                }
            }
            Ok(())
        }))
    }
}

fn not_stored(why: &'static str) -> Commit {
    Box::pin(std::future::ready(Err(NotStored(why.to_string()))))
}

impl edgetwin_gate::Intake for NodeIntake {
    fn submit<'a>(&'a self, topic: &'a str, payload: Bytes, retain: bool) -> Submitted<'a> {
        Box::pin(self.submit_owned(topic, payload, retain))
    }
}
