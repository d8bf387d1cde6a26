//! Topic names of the local topic API v1, built and parsed in one place.

use crate::ids::{DeviceId, ProtocolName};

/// Every topic of the local API that edgetwin publishes or listens to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Topic {
    /// `dt/{device}/desired`: merge patch of desired properties.
    Desired(DeviceId),
    /// `dt/{device}/reported`: merge patch of reported properties.
    Reported(DeviceId),
    /// `dt/{device}/delta`: desired properties that reported does not match yet.
    Delta(DeviceId),
    /// `dt/{device}/twin`: the whole twin document (retained).
    Twin(DeviceId),
    /// `dt/{device}/get`: request for the twin document.
    Get(DeviceId),
    /// `dt/{device}/get/result`: reply to a get request.
    GetResult(DeviceId),
    /// `dt/{device}/desired/result`: the answer to a desired patch that carried `$id`.
    DesiredResult(DeviceId),
    /// `dt/{device}/error`: a rejected patch or request.
    Error(DeviceId),
    /// `dt/{device}/status`: the device's connection state, published by its mapper (retained).
    Status(DeviceId),
    /// `dt/{device}/telemetry`: time series readings.
    Telemetry(DeviceId),
    /// `dt/{device}/history/get`: request for a property's recent history.
    HistoryGet(DeviceId),
    /// `dt/{device}/history/result`: reply to a history request.
    HistoryResult(DeviceId),
    /// `mappers/{protocol}/devices/{device}`: the resolved device for a mapper (retained).
    MapperDevice(ProtocolName, DeviceId),
    /// `mappers/{protocol}/status`: a mapper's own state (retained, also its will).
    MapperStatus(ProtocolName),
    /// `mappers/{protocol}/metrics`: a mapper's counters, re-exported on the node's `/metrics`.
    MapperMetrics(ProtocolName),
    /// `mappers/{protocol}/discover`: a commissioning scan for that protocol's mapper.
    MapperDiscover(ProtocolName),
    /// `mappers/{protocol}/discover/result`: what the scan found.
    MapperDiscoverResult(ProtocolName),
    /// `node/containers/cmd`: container command.
    ContainersCmd,
    /// `node/containers/result`: container command result.
    ContainersResult,
    /// `node/containers/status`: container states (retained).
    ContainersStatus,
    /// `node/health`: the node's health document (retained).
    NodeHealth,
    /// `node/devices/apply`: profile YAML sent by `edgetwin device apply`.
    DevicesApply,
    /// `node/devices/apply/result`: the answer to an apply request.
    DevicesApplyResult,
    /// `node/devices/list`: request for the registered devices.
    DevicesList,
    /// `node/devices/list/result`: the registered devices.
    DevicesListResult,
}

/// Subscription filters the twin service listens on.
pub mod filter {
    /// All desired patches.
    pub const DESIRED: &str = "dt/+/desired";
    /// All reported patches.
    pub const REPORTED: &str = "dt/+/reported";
    /// All get requests.
    pub const GET: &str = "dt/+/get";
    /// All history requests.
    pub const HISTORY_GET: &str = "dt/+/history/get";
    /// All device status messages.
    pub const STATUS: &str = "dt/+/status";
    /// All mapper status messages.
    pub const MAPPER_STATUS: &str = "mappers/+/status";
    /// All mapper metrics snapshots.
    pub const MAPPER_METRICS: &str = "mappers/+/metrics";
    /// Every device-twin topic.
    pub const ALL_TWIN: &str = "dt/#";

    /// Does topic name `topic` match `filter` under MQTT's rules: `+` is one level, `#` the rest
    /// including the parent level (`a/#` matches `a`), and a filter starting with a wildcard never
    /// matches a topic starting with `$` (MQTT 3.1.1 §4.7.2, MQTT 5 §4.7.2). The one matcher of the
    /// project: the gate's permissions, the bridge's routes and the node's link accounting use it.
    pub fn matches(filter: &str, topic: &str) -> bool {
        if topic.starts_with('$') && (filter.starts_with('+') || filter.starts_with('#')) {
            return false;
        }
        let mut f = filter.split('/');
        let mut t = topic.split('/');
        loop {
            match (f.next(), t.next()) {
                (Some("#"), _) => return true,
                (Some("+"), Some(_)) => {}
                (Some(a), Some(b)) if a == b => {}
                (None, None) => return true,
                _ => return false,
            }
        }
    }
}

impl Topic {
    /// The topic string.
    pub fn to_topic_string(&self) -> String {
        match self {
            Topic::Desired(d) => format!("dt/{d}/desired"),
            Topic::Reported(d) => format!("dt/{d}/reported"),
            Topic::Delta(d) => format!("dt/{d}/delta"),
            Topic::Twin(d) => format!("dt/{d}/twin"),
            Topic::Get(d) => format!("dt/{d}/get"),
            Topic::GetResult(d) => format!("dt/{d}/get/result"),
            Topic::DesiredResult(d) => format!("dt/{d}/desired/result"),
            Topic::Error(d) => format!("dt/{d}/error"),
            Topic::Status(d) => format!("dt/{d}/status"),
            Topic::Telemetry(d) => format!("dt/{d}/telemetry"),
            Topic::HistoryGet(d) => format!("dt/{d}/history/get"),
            Topic::HistoryResult(d) => format!("dt/{d}/history/result"),
            Topic::MapperDevice(p, d) => format!("mappers/{p}/devices/{d}"),
            Topic::MapperStatus(p) => format!("mappers/{p}/status"),
            Topic::MapperMetrics(p) => format!("mappers/{p}/metrics"),
            Topic::MapperDiscover(p) => format!("mappers/{p}/discover"),
            Topic::MapperDiscoverResult(p) => format!("mappers/{p}/discover/result"),
            Topic::ContainersCmd => "node/containers/cmd".into(),
            Topic::ContainersResult => "node/containers/result".into(),
            Topic::ContainersStatus => "node/containers/status".into(),
            Topic::NodeHealth => "node/health".into(),
            Topic::DevicesApply => "node/devices/apply".into(),
            Topic::DevicesApplyResult => "node/devices/apply/result".into(),
            Topic::DevicesList => "node/devices/list".into(),
            Topic::DevicesListResult => "node/devices/list/result".into(),
        }
    }

    /// Parses a topic string; `None` for anything outside the API or with an invalid id.
    pub fn parse(topic: &str) -> Option<Topic> {
        let parts: Vec<&str> = topic.split('/').collect();
        let dev = |s: &str| DeviceId::new(s).ok();
        let proto = |s: &str| ProtocolName::new(s).ok();
        Some(match parts.as_slice() {
            ["dt", d, "desired"] => Topic::Desired(dev(d)?),
            ["dt", d, "desired", "result"] => Topic::DesiredResult(dev(d)?),
            ["dt", d, "reported"] => Topic::Reported(dev(d)?),
            ["dt", d, "delta"] => Topic::Delta(dev(d)?),
            ["dt", d, "twin"] => Topic::Twin(dev(d)?),
            ["dt", d, "get"] => Topic::Get(dev(d)?),
            ["dt", d, "get", "result"] => Topic::GetResult(dev(d)?),
            ["dt", d, "error"] => Topic::Error(dev(d)?),
            ["dt", d, "status"] => Topic::Status(dev(d)?),
            ["dt", d, "telemetry"] => Topic::Telemetry(dev(d)?),
            ["dt", d, "history", "get"] => Topic::HistoryGet(dev(d)?),
            ["dt", d, "history", "result"] => Topic::HistoryResult(dev(d)?),
            ["mappers", p, "devices", d] => Topic::MapperDevice(proto(p)?, dev(d)?),
            ["mappers", p, "status"] => Topic::MapperStatus(proto(p)?),
            ["mappers", p, "metrics"] => Topic::MapperMetrics(proto(p)?),
            ["mappers", p, "discover"] => Topic::MapperDiscover(proto(p)?),
            ["mappers", p, "discover", "result"] => Topic::MapperDiscoverResult(proto(p)?),
            ["node", "containers", "cmd"] => Topic::ContainersCmd,
            ["node", "containers", "result"] => Topic::ContainersResult,
            ["node", "containers", "status"] => Topic::ContainersStatus,
            ["node", "health"] => Topic::NodeHealth,
            ["node", "devices", "apply"] => Topic::DevicesApply,
            ["node", "devices", "apply", "result"] => Topic::DevicesApplyResult,
            ["node", "devices", "list"] => Topic::DevicesList,
            ["node", "devices", "list", "result"] => Topic::DevicesListResult,
            _ => return None,
        })
    }

    /// The device a `dt/{device}/...` topic names, if any; used to answer errors on the right topic
    /// even when the rest of the topic is unknown.
    pub fn device_of(topic: &str) -> Option<DeviceId> {
        let mut parts = topic.split('/');
        match (parts.next(), parts.next()) {
            (Some("dt"), Some(d)) => DeviceId::new(d).ok(),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(s: &str) -> DeviceId {
        DeviceId::new(s).expect("valid id")
    }

    #[test]
    fn topic_round_trips_through_its_string() {
        let p = ProtocolName::new("modbus").expect("valid");
        for t in [
            Topic::Desired(d("m-1")),
            Topic::Reported(d("m-1")),
            Topic::Delta(d("m-1")),
            Topic::Twin(d("m-1")),
            Topic::Get(d("m-1")),
            Topic::GetResult(d("m-1")),
            Topic::Error(d("m-1")),
            Topic::Status(d("m-1")),
            Topic::Telemetry(d("m-1")),
            Topic::HistoryGet(d("m-1")),
            Topic::HistoryResult(d("m-1")),
            Topic::MapperDevice(p.clone(), d("m-1")),
            Topic::MapperStatus(p.clone()),
            Topic::MapperMetrics(p),
            Topic::ContainersCmd,
            Topic::ContainersResult,
            Topic::ContainersStatus,
            Topic::NodeHealth,
            Topic::DevicesApply,
            Topic::DevicesApplyResult,
            Topic::DevicesList,
            Topic::DevicesListResult,
        ] {
            assert_eq!(Topic::parse(&t.to_topic_string()), Some(t));
        }
    }

    #[test]
    fn topic_filter_matches_follows_mqtt_rules() {
        use super::filter::matches;
        assert!(matches("dt/#", "dt"));
        assert!(matches("dt/#", "dt/a/b"));
        assert!(matches("dt/+/delta", "dt/a/delta"));
        assert!(!matches("dt/+/delta", "dt/a/b/delta"));
        assert!(!matches("dt/+/twin", "dt/a/twin/x"));
        assert!(matches("+/+", "/x"), "an empty level is a level");
        assert!(!matches("#", "$SYS/x"));
        assert!(!matches("+/x", "$SYS/x"));
        assert!(matches("$SYS/#", "$SYS/x"));
        assert!(matches("a/b", "a/b"));
        assert!(!matches("a/b", "a/b/"));
    }

    proptest::proptest! {
        /// A filter without wildcards matches exactly its own topic; `#` matches everything that
        /// does not start with `$`; replacing any level by `+` keeps a match.
        #[test]
        fn topic_filter_matches_agrees_with_its_definition(
            levels in proptest::collection::vec("[a-z$]{0,3}", 1..5),
            other in "[a-z/]{0,8}",
            plus in 0usize..5,
        ) {
            use super::filter::matches;
            let topic = levels.join("/");
            proptest::prop_assert!(matches(&topic, &topic) || topic.contains(['+', '#']));
            proptest::prop_assert_eq!(matches(&topic, &other), topic == other);
            proptest::prop_assert_eq!(matches("#", &topic), !topic.starts_with('$'));
            let mut f = levels.clone();
            if let Some(l) = f.get_mut(plus) {
                *l = "+".into();
            }
            let first_wild = plus == 0 && !levels.is_empty();
            proptest::prop_assert_eq!(
                matches(&f.join("/"), &topic),
                !(first_wild && topic.starts_with('$'))
            );
        }
    }

    #[test]
    fn topic_parse_rejects_wildcards_and_unknown_shapes() {
        assert_eq!(Topic::parse("dt/+/desired"), None);
        assert_eq!(Topic::parse("dt/a/b/desired"), None);
        assert_eq!(Topic::parse("dt/a/whatever"), None);
        assert_eq!(Topic::parse("dt/$x/desired"), None);
    }
}
