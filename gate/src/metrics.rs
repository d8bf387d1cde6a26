//! The gate's metrics. Registered by the node under its `edgetwin` prefix through
//! [`GateMetrics::register`], which adds `gate_`; every label is a closed set.
//!
//! | name | labels | meaning |
//! |---|---|---|
//! | `edgetwin_gate_connections_total` | `role`, `version` (v4, v5) | clients accepted (CONNECT authenticated) |
//! | `edgetwin_gate_connections_active` | | clients relayed right now |
//! | `edgetwin_gate_auth_failures_total` | `reason` | refused CONNECTs: `bad_password`, `unknown_user`, `no_credentials`, `unknown_certificate`, `will_denied`, `tls_handshake`, `unsupported_version`, `upstream_unavailable` |
//! | `edgetwin_gate_denied_total` | `role`, `kind` (publish, subscribe, deliver) | packets refused by the ACL (`deliver`: a broker message withheld from a client, e.g. another protocol's delta to a mapper) |
//! | `edgetwin_gate_queued_total` | | messages written to a kept session's durable queue while its client was away |
//! | `edgetwin_gate_queue_dropped_total` | | messages for a kept session dropped: its queue was full |
//! | `edgetwin_gate_sessions_not_held_total` | | away kept sessions left to the broker's memory (`limits.max_held_sessions` reached): their messages are not kept across a restart |
//! | `edgetwin_gate_disconnects_total` | `reason` | clients cut by the gate: `packet_too_large`, `topic_too_long`, `too_many_subscriptions`, `malformed`, `protocol_error`, `topic_alias_invalid`, `store_failed` (a publish that could not be stored is not acknowledged) |

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

/// Labels of accepted connections.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ConnectionLabels {
    /// admin, engineer, mapper, app.
    pub role: String,
    /// v4 or v5.
    pub version: String,
}

/// Labels with one reason.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    /// The reason (closed set, see the module doc).
    pub reason: String,
}

/// Labels of ACL denials.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DenialLabels {
    /// admin, engineer, mapper, app.
    pub role: String,
    /// publish, subscribe or deliver.
    pub kind: String,
}

/// Every gate metric; cheap to clone (shared counters).
#[derive(Clone, Debug, Default)]
pub struct GateMetrics {
    /// Accepted connections.
    pub connections: Family<ConnectionLabels, Counter>,
    /// Connections being relayed.
    pub active: Gauge,
    /// Refused CONNECTs.
    pub auth_failures: Family<ReasonLabels, Counter>,
    /// ACL denials.
    pub denied: Family<DenialLabels, Counter>,
    /// Clients cut by a limit or bad input.
    pub disconnects: Family<ReasonLabels, Counter>,
    /// Login attempts held back by the failed-login back-off.
    pub login_delayed: Counter,
    /// Messages written to a kept session's queue while its client was away.
    pub queued: Counter,
    /// Messages for a kept session dropped because its queue was full.
    pub queue_dropped: Counter,
    /// Away kept sessions left to the broker's memory (`limits.max_held_sessions` reached).
    pub sessions_not_held: Counter,
}

impl GateMetrics {
    /// Registers every metric in `registry` under the `gate` prefix.
    pub fn register(&self, registry: &mut Registry) {
        let r = registry.sub_registry_with_prefix("gate");
        r.register(
            "connections",
            "Clients accepted by the gate",
            self.connections.clone(),
        );
        r.register(
            "connections_active",
            "Clients relayed by the gate right now",
            self.active.clone(),
        );
        r.register(
            "auth_failures",
            "CONNECTs refused by the gate",
            self.auth_failures.clone(),
        );
        r.register(
            "denied",
            "Packets refused by the gate's topic permissions",
            self.denied.clone(),
        );
        r.register(
            "disconnects",
            "Clients disconnected by the gate for a limit or bad input",
            self.disconnects.clone(),
        );
        r.register(
            "login_delayed",
            "Login attempts held back after failed logins from their address or for their user",
            self.login_delayed.clone(),
        );
        r.register(
            "queued",
            "Messages written to the durable queue of a kept session while its client was away",
            self.queued.clone(),
        );
        r.register(
            "queue_dropped",
            "Messages for a kept session dropped because its queue was full (limits.max_queued_messages, max_queued_bytes)",
            self.queue_dropped.clone(),
        );
        r.register(
            "sessions_not_held",
            "Away kept sessions whose messages stay in the broker's memory only, because gate.limits.max_held_sessions were held",
            self.sessions_not_held.clone(),
        );
    }

    pub(crate) fn auth_failure(&self, reason: &str) {
        self.auth_failures
            .get_or_create(&ReasonLabels {
                reason: reason.into(),
            })
            .inc();
    }

    pub(crate) fn disconnect(&self, reason: &str) {
        self.disconnects
            .get_or_create(&ReasonLabels {
                reason: reason.into(),
            })
            .inc();
    }

    pub(crate) fn deny(&self, role: &str, kind: &str) {
        self.denied
            .get_or_create(&DenialLabels {
                role: role.into(),
                kind: kind.into(),
            })
            .inc();
    }
}
