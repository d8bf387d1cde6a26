//! The owner of the durable retained store: takes clients' retained publishes from the front
//! door, group-commits whatever waits in one transaction, and answers each once it is on disk.
//!
//! Which retained messages are kept: those on topics outside the node's own topic API. The
//! node's own retained state (twin documents, assignments, container status) is republished from
//! its stores at every start, and liveness (`dt/{device}/status`, `mappers/{protocol}/status`)
//! must come from the mappers that are connected now, not from before the restart.

use std::sync::Arc;

use bytes::Bytes;
use edgetwin_retained::RetainedStore;
use tokio::sync::{mpsc, oneshot};
use tracing::{error, warn};

use crate::metrics::Metrics;

/// One retained publish on its way to the store.
pub struct RetainedWrite {
    /// The topic.
    pub topic: String,
    /// The payload; empty clears the topic.
    pub payload: Bytes,
    /// Answered once stored (or refused by the store's limits, which is counted), or with the
    /// store's error.
    pub done: oneshot::Sender<Result<(), String>>,
}

/// Whether a retained publish on a topic is kept across restarts, from the topic as
/// `Topic::parse` read it: only topics outside the node's topic API are.
pub fn kept(parsed: Option<&edgetwin_contract::Topic>) -> bool {
    parsed.is_none()
}

/// Most writes per transaction.
const MAX_BATCH: usize = 1024;

/// Runs until every sender is gone.
pub async fn run(
    store: RetainedStore,
    mut writes: mpsc::Receiver<RetainedWrite>,
    metrics: Arc<Metrics>,
) {
    let mut store = Some(store);
    let mut buf = Vec::with_capacity(MAX_BATCH);
    metrics
        .retained_stored
        .set(store.as_ref().map_or(0, |s| s.len()) as i64);
    while writes.recv_many(&mut buf, MAX_BATCH).await > 0 {
        let batch = std::mem::take(&mut buf);
        let Some(mut s) = store.take() else { break };
        let (s, batch, result) = match tokio::task::spawn_blocking(move || {
            let result = s.apply(batch.iter().map(|w| (w.topic.as_str(), &w.payload[..])));
            (s, batch, result)
        })
        .await
        {
            Ok(r) => r,
            Err(e) => {
                error!(error = %e, "retained store task failed; retained messages are no longer kept");
                return;
            }
        };
        let answer = match result {
            Ok(applied) => {
                if applied.refused > 0 {
                    metrics.retained_refused.inc_by(applied.refused as u64);
                    warn!(refused = applied.refused, "retained store full: new retained topics are not kept across restarts (edgetwin_retained_refused_total)");
                }
                Ok(())
            }
            Err(e) => {
                error!(error = %e, "retained store write failed; these retained messages are not acknowledged");
                Err(e.to_string())
            }
        };
        metrics.retained_stored.set(s.len() as i64);
        for w in batch {
            let _ = w.done.send(answer.clone());
        }
        store = Some(s);
    }
}
