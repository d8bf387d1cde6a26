//! What `/readyz` reports: the node is ready only when start-up finished, it is not stopping, and
//! every check is passing right now. Each check has one owner that sets it (the twin service for
//! the twin store, the bridge for the outbox, the canary for the twin service's answer through
//! the public listener); `/readyz` says which check fails and why, so an operator's probe or a
//! field engineer's curl tells the truth instead of "OK".

use std::collections::BTreeMap;
use std::sync::{Mutex, PoisonError};
use std::time::Instant;

/// One readiness check's current verdict.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Passing.
    Ok,
    /// Failing, with the reason in words.
    Failing(String),
}

#[derive(Debug, Clone)]
struct Entry {
    verdict: Verdict,
    since: Instant,
}

/// Where the node is in its lifecycle.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Starting,
    Serving,
    Stopping,
}

/// The node's readiness: its phase plus named checks.
#[derive(Debug)]
pub struct Health {
    inner: Mutex<(Phase, BTreeMap<&'static str, Entry>)>,
}

impl Default for Health {
    fn default() -> Self {
        Health {
            inner: Mutex::new((Phase::Starting, BTreeMap::new())),
        }
    }
}

/// The verdict `/readyz` answers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    /// Whether the node is ready.
    pub ready: bool,
    /// One line per check (and the phase when not serving).
    pub text: String,
}

impl Health {
    /// Sets a check's verdict (the check is created on first use).
    pub fn set(&self, check: &'static str, verdict: Verdict) {
        let mut inner = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        let entry = inner.1.entry(check).or_insert_with(|| Entry {
            verdict: verdict.clone(),
            since: Instant::now(),
        });
        if entry.verdict != verdict {
            match &verdict {
                Verdict::Ok => tracing::info!(check, "readiness check passes again"),
                Verdict::Failing(why) => tracing::warn!(check, %why, "readiness check fails"),
            }
            entry.verdict = verdict;
            entry.since = Instant::now();
        }
    }

    /// A check's current verdict (`None`: never set).
    #[cfg_attr(not(test), allow(dead_code))]
    pub fn verdict(&self, check: &str) -> Option<Verdict> {
        let inner = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        inner.1.get(check).map(|e| e.verdict.clone())
    }

    /// Start-up finished: ready as soon as every check passes.
    pub fn serving(&self) {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner).0 = Phase::Serving;
    }

    /// Shutdown began: never ready again.
    pub fn stopping(&self) {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner).0 = Phase::Stopping;
    }

    /// What keeps the node from being ready, one line each: the phase when not serving, then
    /// every failing check as `name: why` (no durations, so it only changes when the truth does).
    pub fn failing(&self) -> Vec<String> {
        let inner = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        let phase = match inner.0 {
            Phase::Starting => Some("starting".to_string()),
            Phase::Stopping => Some("stopping".to_string()),
            Phase::Serving => None,
        };
        phase
            .into_iter()
            .chain(inner.1.iter().filter_map(|(name, e)| match &e.verdict {
                Verdict::Ok => None,
                Verdict::Failing(why) => Some(format!("{name}: {why}")),
            }))
            .collect()
    }

    /// The current verdict.
    pub fn report(&self) -> Report {
        let inner = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        let mut ready = inner.0 == Phase::Serving;
        let mut text = String::new();
        match inner.0 {
            Phase::Starting => text.push_str("not ready: starting\n"),
            Phase::Stopping => text.push_str("not ready: stopping\n"),
            Phase::Serving => {}
        }
        for (name, e) in &inner.1 {
            let secs = e.since.elapsed().as_secs();
            match &e.verdict {
                Verdict::Ok => text.push_str(&format!("{name}: ok\n")),
                Verdict::Failing(why) => {
                    ready = false;
                    text.push_str(&format!("{name}: failing for {secs} s: {why}\n"));
                }
            }
        }
        if ready {
            text.insert_str(0, "ready\n");
        }
        Report { ready, text }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn health_is_not_ready_while_starting_or_stopping() {
        let h = Health::default();
        h.set("twin store", Verdict::Ok);
        assert!(!h.report().ready);
        h.serving();
        assert!(h.report().ready);
        h.stopping();
        let r = h.report();
        assert!(!r.ready);
        assert!(r.text.contains("stopping"), "{}", r.text);
    }

    #[test]
    fn health_one_failing_check_makes_the_node_not_ready_and_names_why() {
        let h = Health::default();
        h.serving();
        h.set("twin store", Verdict::Ok);
        h.set("outbox", Verdict::Failing("disk full".into()));
        let r = h.report();
        assert!(!r.ready);
        assert!(r.text.contains("outbox: failing"), "{}", r.text);
        assert!(r.text.contains("disk full"), "{}", r.text);
        assert!(r.text.contains("twin store: ok"), "{}", r.text);
        assert_eq!(h.failing(), vec!["outbox: disk full".to_string()]);
        h.set("outbox", Verdict::Ok);
        assert!(h.report().ready);
    }
}
