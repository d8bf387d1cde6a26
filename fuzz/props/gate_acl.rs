//! Arbitrary topics and filters through the pure ACL: never panics, and a filter allowed to a
//! non-mapper role never matches a topic that role may not receive.
//!
//! Shared by the cargo-fuzz target of the same name and the stable replay of the committed
//! corpus (`fuzz/corpus/gate_acl/`) in the test command.

use edgetwin_contract::ids::{DeviceId, ProtocolName};
use edgetwin_gate::acl::{
    may_publish, may_receive, may_subscribe, topic_matches, DeviceDirectory, Role,
};

struct Dir;

impl DeviceDirectory for Dir {
    fn protocol_of(&self, device: &DeviceId) -> Option<ProtocolName> {
        let p = if device.as_str().starts_with('m') {
            "modbus"
        } else {
            "opcua"
        };
        ProtocolName::new(p).ok()
    }
}

/// The property, for one input: panics (an assertion) when it does not hold.
pub fn check(data: &[u8]) {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    let (filter, topic) = s.split_once('\u{1}').unwrap_or((s, s));
    let mapper = ProtocolName::new("modbus").map(Role::Mapper).ok();
    for role in [
        Some(Role::Admin),
        Some(Role::Engineer),
        Some(Role::App),
        mapper,
    ]
    .into_iter()
    .flatten()
    {
        let _ = may_publish(&role, topic, &Dir);
        let allowed = may_subscribe(&role, filter, &Dir);
        let readable = may_receive(&role, topic, &Dir);
        if allowed
            && matches!(role, Role::Engineer | Role::App)
            && !topic.contains(['+', '#'])
            && !filter.starts_with("$share/")
            && topic_matches(filter, topic)
        {
            assert!(
                readable,
                "{filter} allowed for {role:?} but {topic} is not readable"
            );
        }
    }
}
