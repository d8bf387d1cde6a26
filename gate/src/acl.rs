//! Who may publish, subscribe to and receive what. Pure: no I/O; the one outside fact it needs,
//! "which protocol serves device X", comes from a [`DeviceDirectory`] passed in.
//!
//! # Rules
//!
//! | role | may publish | may subscribe (filter must lie inside) |
//! |---|---|---|
//! | `admin` | everything | everything |
//! | `engineer` | `dt/{d}/desired`, `dt/{d}/get`, `node/devices/apply`, `node/devices/list` | `dt/#`, `mappers/+/status`, `node/#` |
//! | `app` | `dt/{d}/desired`, `dt/{d}/get` | `dt/#` |
//! | `mapper` of protocol P | `dt/{d}/reported\|status\|telemetry\|error` for devices d served by P; `mappers/P/status`, `mappers/P/metrics` | `mappers/P/devices/+` (or one device under it); `dt/+/delta`, or `dt/{d}/delta` for a d served by P |
//!
//! A subscription filter is allowed only when every topic it can match is readable (it lies inside
//! one of the role's read patterns); `$share/{group}/` is stripped first. A mapper's `dt/+/delta`
//! is allowed although it could match other protocols' devices: the gate narrows it on the way
//! back, because **every message the broker delivers to a client is checked again**
//! ([`may_receive`]) against the client's read rules and, for a mapper, against the directory at
//! delivery time. That narrowing also covers a device moved to another protocol after the
//! subscription was made, and a persistent session resumed by a client of another role under the
//! same client id.
//!
//! A v5 response topic is a request to have someone else (the twin service) publish there, so a
//! PUBLISH carrying one is allowed only when the sender may receive that topic.
//!
//! Apps get "read twins, write desired": they are the dashboards and automations of the site, which
//! set targets but never speak for the hardware (`reported`), manage profiles, or read mapper
//! assignments (which hold protocol configuration, possibly with device credentials).

use edgetwin_contract::ids::{DeviceId, ProtocolName};
use edgetwin_contract::topic::Topic;

/// Answers "which protocol serves device X"; the node's device registry implements it.
pub trait DeviceDirectory: Send + Sync {
    /// The protocol of the mapper that serves `device`, or `None` for an unknown device.
    fn protocol_of(&self, device: &DeviceId) -> Option<ProtocolName>;
}

/// What an authenticated client is allowed to be.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Role {
    /// Everything.
    Admin,
    /// A field engineer: writes desired, reads all twins, manages profiles.
    Engineer,
    /// The mapper of one protocol: speaks for that protocol's devices only.
    Mapper(ProtocolName),
    /// A local application: reads twins, writes desired.
    App,
}

impl Role {
    /// The metric label value (bounded: the protocol is not part of it).
    pub fn label(&self) -> &'static str {
        match self {
            Role::Admin => "admin",
            Role::Engineer => "engineer",
            Role::Mapper(_) => "mapper",
            Role::App => "app",
        }
    }
}

/// Whether what the broker keeps for a publish to `topic` (a topic entry in its routing tables,
/// and the retained message if any) is bounded by the registry already: the contract topics of a
/// registered device, and the node's own fixed topics. Every other topic name counts toward
/// the node's budget of distinct topics (`limits.max_distinct_topics`).
pub fn bounded_by_registry(topic: &str, dir: &dyn DeviceDirectory) -> bool {
    match Topic::parse(topic) {
        Some(Topic::MapperStatus(_) | Topic::MapperMetrics(_)) | None => false,
        Some(Topic::MapperDevice(_, d)) => dir.protocol_of(&d).is_some(),
        Some(
            Topic::ContainersCmd
            | Topic::ContainersResult
            | Topic::ContainersStatus
            | Topic::NodeHealth
            | Topic::DevicesApply
            | Topic::DevicesApplyResult
            | Topic::DevicesList
            | Topic::DevicesListResult,
        ) => true,
        Some(_) => Topic::device_of(topic).is_some_and(|d| dir.protocol_of(&d).is_some()),
    }
}

const ENGINEER_READ: &[&str] = &[
    "dt/#",
    "mappers/+/status",
    "mappers/+/discover/result",
    "node/#",
];
const APP_READ: &[&str] = &["dt/#"];

/// May a client of `role` publish to `topic` (a topic name, no wildcards)?
pub fn may_publish(role: &Role, topic: &str, dir: &dyn DeviceDirectory) -> bool {
    if !valid_topic_name(topic) {
        return false;
    }
    match role {
        Role::Admin => true,
        Role::Engineer => matches!(
            Topic::parse(topic),
            Some(
                Topic::Desired(_)
                    | Topic::Get(_)
                    | Topic::HistoryGet(_)
                    | Topic::DevicesApply
                    | Topic::DevicesList
                    | Topic::MapperDiscover(_)
            )
        ),
        Role::App => matches!(
            Topic::parse(topic),
            Some(Topic::Desired(_) | Topic::Get(_) | Topic::HistoryGet(_))
        ),
        Role::Mapper(p) => match Topic::parse(topic) {
            Some(Topic::Reported(d) | Topic::Status(d) | Topic::Telemetry(d) | Topic::Error(d)) => {
                serves(dir, p, &d)
            }
            Some(
                Topic::MapperStatus(q) | Topic::MapperMetrics(q) | Topic::MapperDiscoverResult(q),
            ) => &q == p,
            _ => false,
        },
    }
}

/// May a client of `role` subscribe to `filter` (wildcards allowed, `$share/{group}/` stripped)?
pub fn may_subscribe(role: &Role, filter: &str, dir: &dyn DeviceDirectory) -> bool {
    let Some(filter) = strip_share(filter) else {
        return false;
    };
    // The node serves no `$` topics ($SYS and the like), and rumqttd drops the connection of a
    // client subscribing to one: refused here, the client gets a SUBACK failure code instead.
    if !valid_filter(filter) || filter.starts_with('$') {
        return false;
    }
    match role {
        Role::Admin => true,
        Role::Engineer => ENGINEER_READ.iter().any(|p| filter_within(filter, p)),
        Role::App => APP_READ.iter().any(|p| filter_within(filter, p)),
        Role::Mapper(p) => {
            let levels: Vec<&str> = filter.split('/').collect();
            match levels.as_slice() {
                ["mappers", q, "devices", d] => {
                    *q == p.as_str() && (*d == "+" || DeviceId::new(*d).is_ok())
                }
                ["dt", "+", "delta"] => true,
                ["mappers", q, "discover"] => *q == p.as_str(),
                ["dt", d, "delta"] => DeviceId::new(*d).is_ok_and(|d| serves(dir, p, &d)),
                _ => false,
            }
        }
    }
}

/// May a message on `topic`, delivered by the broker, reach a client of `role`? Applied to every
/// PUBLISH on its way to the client.
pub fn may_receive(role: &Role, topic: &str, dir: &dyn DeviceDirectory) -> bool {
    match role {
        Role::Admin => true,
        Role::Engineer => ENGINEER_READ.iter().any(|p| topic_matches(p, topic)),
        Role::App => APP_READ.iter().any(|p| topic_matches(p, topic)),
        Role::Mapper(p) => match Topic::parse(topic) {
            Some(Topic::MapperDevice(q, _) | Topic::MapperDiscover(q)) => &q == p,
            Some(Topic::Delta(d)) => serves(dir, p, &d),
            _ => false,
        },
    }
}

fn serves(dir: &dyn DeviceDirectory, protocol: &ProtocolName, device: &DeviceId) -> bool {
    dir.protocol_of(device).as_ref() == Some(protocol)
}

/// The filter without a `$share/{group}/` prefix; `None` for a malformed shared subscription.
pub(crate) fn strip_share(filter: &str) -> Option<&str> {
    match filter.strip_prefix("$share/") {
        None => Some(filter),
        Some(rest) => {
            let (group, f) = rest.split_once('/')?;
            (!group.is_empty() && !group.contains(['+', '#']) && !f.is_empty()).then_some(f)
        }
    }
}

/// A topic name: not empty, no wildcard characters, no NUL.
pub fn valid_topic_name(topic: &str) -> bool {
    !topic.is_empty() && !topic.contains(['+', '#', '\0'])
}

/// A topic filter: not empty; `+` and `#` only as whole levels, `#` only last; no NUL.
pub fn valid_filter(filter: &str) -> bool {
    if filter.is_empty() || filter.contains('\0') {
        return false;
    }
    let mut levels = filter.split('/').peekable();
    while let Some(l) = levels.next() {
        if l.contains(['+', '#']) && l != "+" && l != "#" {
            return false;
        }
        if l == "#" && levels.peek().is_some() {
            return false;
        }
    }
    true
}

pub use edgetwin_contract::topic::filter::matches as topic_matches;

/// Is every topic that `filter` matches also matched by `pattern`?
pub fn filter_within(filter: &str, pattern: &str) -> bool {
    let mut f = filter.split('/');
    let mut p = pattern.split('/');
    loop {
        match (p.next(), f.next()) {
            (Some("#"), _) => return true,
            (Some(_), Some("#")) => return false,
            (Some("+"), Some(_)) => {}
            (Some(a), Some(b)) if a == b && b != "+" => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::HashMap;

    struct Dir(HashMap<String, String>);

    impl DeviceDirectory for Dir {
        fn protocol_of(&self, device: &DeviceId) -> Option<ProtocolName> {
            self.0
                .get(device.as_str())
                .map(|p| ProtocolName::new(p.as_str()).unwrap())
        }
    }

    fn dir() -> Dir {
        Dir(HashMap::from([
            ("m1".to_string(), "modbus".to_string()),
            ("m2".to_string(), "modbus".to_string()),
            ("o1".to_string(), "opcua".to_string()),
        ]))
    }

    fn mapper(p: &str) -> Role {
        Role::Mapper(ProtocolName::new(p).unwrap())
    }

    #[test]
    fn only_registered_devices_and_the_nodes_own_topics_are_outside_the_topic_budget() {
        let d = dir();
        for t in [
            "dt/m1/desired",
            "dt/o1/telemetry",
            "mappers/modbus/devices/m1",
            "node/devices/apply",
            "node/containers/cmd",
        ] {
            assert!(bounded_by_registry(t, &d), "{t}");
        }
        for t in [
            "dt/unknown/desired",
            // A registered device, but a topic name of its own making: as churnable as any.
            "dt/m1/anything/else",
            "dt/x-17/telemetry",
            "mappers/modbus/devices/nope",
            "mappers/churn-42/status",
            "mappers/modbus/metrics",
            "plant/line-2/sensor-7",
            "node/something-new",
            "",
        ] {
            assert!(!bounded_by_registry(t, &d), "{t}");
        }
    }

    #[test]
    fn acl_dollar_filters_are_refused_for_every_role_but_shared_subscriptions_are_not() {
        let d = dir();
        for role in [Role::Admin, Role::Engineer, Role::App, mapper("modbus")] {
            for f in [
                "$SYS/#",
                "$SYS/broker/uptime",
                "$share/g/$SYS/#",
                "$internal/x",
            ] {
                assert!(!may_subscribe(&role, f, &d), "{role:?} {f}");
            }
        }
        assert!(may_subscribe(&Role::Admin, "$share/g/dt/+/twin", &d));
        assert!(may_subscribe(&Role::Engineer, "$share/g/dt/+/twin", &d));
    }

    #[test]
    fn acl_mapper_publishes_reported_only_for_its_own_devices() {
        let d = dir();
        let m = mapper("modbus");
        for t in [
            "dt/m1/reported",
            "dt/m1/status",
            "dt/m1/telemetry",
            "dt/m1/error",
            "mappers/modbus/status",
            "mappers/modbus/metrics",
        ] {
            assert!(may_publish(&m, t, &d), "{t}");
        }
        for t in [
            "dt/o1/reported",
            "dt/unknown/reported",
            "dt/m1/desired",
            "dt/m1/get",
            "dt/m1/history/get",
            "mappers/opcua/status",
            "mappers/modbus/devices/m1",
            "node/devices/apply",
            "dt/+/reported",
        ] {
            assert!(!may_publish(&m, t, &d), "{t}");
        }
    }

    #[test]
    fn acl_engineer_writes_desired_but_never_reported() {
        let d = dir();
        for t in [
            "dt/m1/desired",
            "dt/o1/get",
            "dt/o1/history/get",
            "node/devices/apply",
            "node/devices/list",
        ] {
            assert!(may_publish(&Role::Engineer, t, &d), "{t}");
        }
        for t in [
            "dt/m1/reported",
            "dt/m1/twin",
            "mappers/modbus/devices/m1",
            "node/containers/cmd",
        ] {
            assert!(!may_publish(&Role::Engineer, t, &d), "{t}");
        }
    }

    #[test]
    fn acl_discovery_goes_from_engineers_to_the_protocols_mapper_and_back() {
        let d = dir();
        let (e, m, other) = (Role::Engineer, mapper("modbus"), mapper("opcua"));
        assert!(may_publish(&e, "mappers/modbus/discover", &d));
        assert!(may_subscribe(&e, "mappers/modbus/discover/result", &d));
        assert!(may_receive(&e, "mappers/modbus/discover/result", &d));
        assert!(!may_publish(&Role::App, "mappers/modbus/discover", &d));
        assert!(may_subscribe(&m, "mappers/modbus/discover", &d));
        assert!(may_receive(&m, "mappers/modbus/discover", &d));
        assert!(may_publish(&m, "mappers/modbus/discover/result", &d));
        assert!(!may_subscribe(&other, "mappers/modbus/discover", &d));
        assert!(!may_receive(&other, "mappers/modbus/discover", &d));
        assert!(!may_publish(&other, "mappers/modbus/discover/result", &d));
    }

    #[test]
    fn acl_app_writes_desired_and_reads_twins_only() {
        let d = dir();
        assert!(may_publish(&Role::App, "dt/m1/desired", &d));
        assert!(!may_publish(&Role::App, "node/devices/apply", &d));
        assert!(may_subscribe(&Role::App, "dt/+/twin", &d));
        assert!(!may_subscribe(&Role::App, "mappers/+/devices/+", &d));
        assert!(!may_subscribe(&Role::App, "#", &d));
    }

    #[test]
    fn acl_subscribe_allows_filters_inside_the_read_patterns_only() {
        let d = dir();
        let e = Role::Engineer;
        for f in [
            "dt/#",
            "dt/+/delta",
            "dt/m1/#",
            "mappers/+/status",
            "mappers/modbus/status",
            "node/#",
            "node/devices/apply/result",
            "$share/g/dt/+/twin",
        ] {
            assert!(may_subscribe(&e, f, &d), "{f}");
        }
        for f in [
            "#",
            "+/#",
            "mappers/#",
            "mappers/+/devices/+",
            "$SYS/#",
            "dt/a#",
            "dt/#/x",
            "",
            "$share/dt/#",
        ] {
            assert!(!may_subscribe(&e, f, &d), "{f}");
        }
    }

    #[test]
    fn acl_mapper_subscribes_to_its_assignments_and_deltas() {
        let d = dir();
        let m = mapper("modbus");
        for f in [
            "mappers/modbus/devices/+",
            "mappers/modbus/devices/m1",
            "dt/+/delta",
            "dt/m1/delta",
        ] {
            assert!(may_subscribe(&m, f, &d), "{f}");
        }
        for f in [
            "mappers/opcua/devices/+",
            "mappers/+/devices/+",
            "dt/o1/delta",
            "dt/#",
            "dt/+/desired",
            "mappers/modbus/devices/#",
        ] {
            assert!(!may_subscribe(&m, f, &d), "{f}");
        }
    }

    #[test]
    fn acl_mapper_receives_deltas_of_its_own_devices_only() {
        let d = dir();
        let m = mapper("modbus");
        assert!(may_receive(&m, "dt/m1/delta", &d));
        assert!(!may_receive(&m, "dt/o1/delta", &d));
        assert!(!may_receive(&m, "dt/unknown/delta", &d));
        assert!(may_receive(&m, "mappers/modbus/devices/o1", &d));
        assert!(!may_receive(&m, "mappers/opcua/devices/o1", &d));
        assert!(!may_receive(&m, "dt/m1/twin", &d));
        assert!(may_receive(&Role::Engineer, "node/devices/list/result", &d));
        assert!(!may_receive(&Role::App, "node/devices/list/result", &d));
    }

    fn level() -> impl Strategy<Value = String> {
        prop::sample::select(vec![
            "dt", "mappers", "node", "devices", "delta", "status", "modbus", "opcua", "m1", "o1",
            "x", "",
        ])
        .prop_map(str::to_string)
    }

    fn topic() -> impl Strategy<Value = String> {
        prop::collection::vec(level(), 1..5).prop_map(|l| l.join("/"))
    }

    fn filter() -> impl Strategy<Value = String> {
        prop::collection::vec(
            prop_oneof![
                4 => level(),
                1 => Just("+".to_string()),
                1 => Just("#".to_string()),
            ],
            1..5,
        )
        .prop_map(|l| l.join("/"))
    }

    fn role() -> impl Strategy<Value = Role> {
        prop_oneof![
            Just(Role::Admin),
            Just(Role::Engineer),
            Just(Role::App),
            Just(mapper("modbus")),
            Just(mapper("opcua")),
        ]
    }

    proptest! {
        #[test]
        fn acl_filter_within_a_pattern_matches_only_topics_of_that_pattern(
            f in filter(), p in filter(), t in topic()
        ) {
            if valid_filter(&f) && valid_filter(&p) && filter_within(&f, &p) && topic_matches(&f, &t) {
                prop_assert!(topic_matches(&p, &t), "{f} within {p} but {t} escapes");
            }
        }

        #[test]
        fn acl_a_non_mapper_subscription_never_matches_an_unreadable_topic(
            r in prop_oneof![Just(Role::Engineer), Just(Role::App)], f in filter(), t in topic()
        ) {
            let d = dir();
            if may_subscribe(&r, &f, &d) && topic_matches(&f, &t) {
                prop_assert!(may_receive(&r, &t, &d), "{f} allowed but {t} unreadable");
            }
        }

        #[test]
        fn acl_a_mapper_never_publishes_for_another_protocols_device(
            p in prop::sample::select(vec!["modbus", "opcua"]), t in topic()
        ) {
            let d = dir();
            if may_publish(&mapper(p), &t, &d) {
                if let Some(dev) = Topic::device_of(&t) {
                    prop_assert_eq!(d.protocol_of(&dev).map(|x| x.to_string()), Some(p.to_string()));
                }
            }
        }

        #[test]
        fn acl_never_panics_on_arbitrary_strings(r in role(), s in ".{0,64}") {
            let d = dir();
            let _ = may_publish(&r, &s, &d);
            let _ = may_subscribe(&r, &s, &d);
            let _ = may_receive(&r, &s, &d);
        }
    }
}
