//! Counting what rumqttd only logs: when a subscriber (any client, remote or in-process) falls
//! so far behind that its cursor points before the oldest segment of its filter's log, rumqttd
//! moves the cursor forward and emits one `warn!` with the cursor it wanted and the one it got
//! (router/routing.rs in rumqttd 0.20). Nothing else tells anyone. [`skip_layer`] is a tracing
//! layer that turns those events into a counter of the messages the subscriber never got,
//! `edgetwin_broker_subscriber_skipped_messages_total` (see [`crate::BrokerMetrics`]).
//!
//! It reads the event's `request_cursor` and `start_cursor` fields, `(segment, offset)` pairs whose
//! offsets count messages of one filter's log; the lockfile pins the rumqttd version whose event
//! this parses, and a unit test feeds it that event's exact shape.

use std::sync::OnceLock;

use prometheus_client::metrics::counter::Counter;
use tracing::field::{Field, Visit};
use tracing_subscriber::layer::{Context, Layer};

const TARGET: &str = "rumqttd::router::routing";

/// The process-wide counter the layer feeds (a subscriber can be installed once per process).
pub fn subscriber_skipped() -> &'static Counter {
    static C: OnceLock<Counter> = OnceLock::new();
    C.get_or_init(Counter::default)
}

/// The layer; install it beside the log output, with [`skip_filter`] so it sees only the one
/// event it counts whatever the log level.
pub fn skip_layer() -> SkipLayer {
    SkipLayer
}

/// What [`skip_layer`] needs to see: rumqttd's router warnings, and none of its spans. rumqttd
/// opens its per-connection and per-publish spans at *error* level, so a level filter alone
/// would enable them, and creating them (the publish span formats its topic) took half of the
/// router thread's time per message.
pub fn skip_filter<S>() -> impl tracing_subscriber::layer::Filter<S> {
    use tracing_subscriber::filter::FilterExt;
    tracing_subscriber::filter::Targets::new()
        .with_target(TARGET, tracing::Level::WARN)
        .and(tracing_subscriber::filter::filter_fn(|m| m.is_event()))
}

/// For the log output: whether a span or event is shown by default. rumqttd's spans are left
/// out (see [`skip_filter`]; its warnings then lack their connection's span fields), unless
/// the user asks for rumqttd's own detail.
pub fn quiet_broker_spans(meta: &tracing::Metadata<'_>) -> bool {
    !(meta.is_span() && meta.target().starts_with("rumqttd"))
}

/// See the module doc.
#[derive(Debug, Clone, Copy)]
pub struct SkipLayer;

#[derive(Default)]
struct Cursors {
    request: Option<(u64, u64)>,
    start: Option<(u64, u64)>,
}

fn parse_cursor(s: &str) -> Option<(u64, u64)> {
    let (a, b) = s
        .trim()
        .strip_prefix('(')?
        .strip_suffix(')')?
        .split_once(',')?;
    Some((a.trim().parse().ok()?, b.trim().parse().ok()?))
}

impl Visit for Cursors {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        match field.name() {
            "request_cursor" => self.request = parse_cursor(&format!("{value:?}")),
            "start_cursor" => self.start = parse_cursor(&format!("{value:?}")),
            _ => {}
        }
    }
}

impl<S: tracing::Subscriber> Layer<S> for SkipLayer {
    fn on_event(&self, event: &tracing::Event<'_>, _ctx: Context<'_, S>) {
        if event.metadata().target() != TARGET {
            return;
        }
        let mut c = Cursors::default();
        event.record(&mut c);
        if let (Some(req), Some(start)) = (c.request, c.start) {
            subscriber_skipped().inc_by(start.1.saturating_sub(req.1));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tracing_subscriber::layer::SubscriberExt;

    #[test]
    fn skips_counts_the_messages_between_the_wanted_and_the_given_cursor() {
        let before = subscriber_skipped().get();
        let subscriber =
            tracing_subscriber::registry().with(skip_layer().with_filter(skip_filter()));
        tracing::subscriber::with_default(subscriber, || {
            // The shape of rumqttd 0.20's event (router/routing.rs, forward_device_data).
            let request: (u64, u64) = (2, 1000);
            let start: (u64, u64) = (5, 4096);
            tracing::warn!(target: "rumqttd::router::routing", request_cursor = ?request, start_cursor = ?start, error = "Read cursor start jumped");
            // Others are not counted.
            tracing::warn!(target: "rumqttd::router::routing", "something else");
            tracing::warn!(target: "elsewhere", request_cursor = ?request, start_cursor = ?start);
        });
        assert_eq!(subscriber_skipped().get() - before, 3096);
    }
}
