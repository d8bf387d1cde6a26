//! What the embedded broker counts about its in-process clients; registered by the node.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;

/// Labels of per-link metrics: the internal client's name (a closed set chosen by the node).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LinkLabels {
    /// The local client's name.
    pub link: String,
}

/// The broker's metrics. Cheap to clone (shared counters).
#[derive(Clone, Debug, Default)]
pub struct BrokerMetrics {
    /// Messages an internal consumer never got because it fell behind the broker's log.
    pub local_link_skipped: Family<LinkLabels, Counter>,
}

impl BrokerMetrics {
    /// Registers every metric (names get the registry's prefix); `links` are pre-created at 0
    /// so a dashboard sees the series before anything is skipped.
    pub fn register(&self, registry: &mut Registry, links: &[&str]) {
        registry.register(
            "local_link_skipped_messages",
            "Messages an internal consumer (link) never received because it fell behind the embedded broker's log",
            self.local_link_skipped.clone(),
        );
        registry.register(
            "broker_subscriber_skipped_messages",
            "Messages a subscriber (any client) never received because it fell behind its filter's bounded log in the embedded broker (counted from rumqttd's cursor-jump warnings)",
            crate::skips::subscriber_skipped().clone(),
        );
        for link in links {
            let _ = self.local_link_skipped.get_or_create(&LinkLabels {
                link: link.to_string(),
            });
        }
    }
}
