//! What a delivery needs from its publish, carried through the broker, and what the gate decides
//! from it.
//!
//! rumqttd delivers at the subscription's QoS, clears the retain flag of every live delivery and
//! does not say who published; MQTT wants the delivery at min(publish QoS, subscription QoS)
//! (§3.8.4), "Retain As Published" and "No Local" per subscription (§3.8.3.1). The gate speaks
//! MQTT 5 to the broker for every client, so each client publish (and will) goes in with one
//! internal user property, [`KEY`], holding its QoS, retain flag and the connection it came
//! from; rumqttd passes user properties on, and the gate takes the property off every delivery
//! before the client sees it. A client's own user property of that name is dropped on the way
//! in, so a client cannot pose as another one. Deliveries without it are the node's own
//! publications (twin documents, statuses): they go at the subscription's QoS, as stored data.
//!
//! Pure: the relay asks [`Subscriptions::verdict`] for every delivery.

use std::collections::HashMap;

/// The internal user property's name. The `$` keeps it apart from application names by
/// convention; the gate removes any a client sends.
pub const KEY: &str = "$edgetwin";

/// Who published a message, how.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Origin {
    /// The publish's QoS.
    pub qos: u8,
    /// The publish's retain flag.
    pub retain: bool,
    /// The gate connection it came from (a number unique within this process).
    pub conn: u64,
    /// When its MQTT 5 Message Expiry Interval runs out, in milliseconds since the Unix epoch
    /// (rumqttd keeps the interval as sent, so a message queued for an offline session would
    /// reach it with its whole interval still on it).
    pub expires_at_ms: Option<u64>,
}

impl Origin {
    /// Replaces any [`KEY`] entries in `props` with this origin.
    pub fn attach(self, props: &mut Vec<(String, String)>) {
        props.retain(|(k, _)| k != KEY);
        let mut v = format!("{}{}{}", self.qos.min(2), u8::from(self.retain), self.conn);
        if let Some(at) = self.expires_at_ms {
            v.push_str(&format!(":{at}"));
        }
        props.push((KEY.to_string(), v));
    }

    /// Takes the origin out of a delivery's user properties (all [`KEY`] entries go; the last
    /// one is the gate's).
    pub fn take(props: &mut Vec<(String, String)>) -> Option<Origin> {
        let mut found = None;
        props.retain(|(k, v)| {
            if k == KEY {
                found = Origin::parse(v).or(found);
                false
            } else {
                true
            }
        });
        found
    }

    fn parse(v: &str) -> Option<Origin> {
        let b = v.as_bytes();
        let qos = match b.first()? {
            b'0' => 0,
            b'1' => 1,
            b'2' => 2,
            _ => return None,
        };
        let retain = match b.get(1)? {
            b'0' => false,
            b'1' => true,
            _ => return None,
        };
        let rest = v.get(2..)?;
        let (conn, expires_at_ms) = match rest.split_once(':') {
            Some((c, at)) => (c.parse().ok()?, Some(at.parse().ok()?)),
            None => (rest.parse().ok()?, None),
        };
        Some(Origin {
            qos,
            retain,
            conn,
            expires_at_ms,
        })
    }
}

/// A subscription's options, as the client gave them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Options {
    /// Maximum QoS.
    pub qos: u8,
    /// No Local: not sent the connection's own publishes.
    pub no_local: bool,
    /// Retain As Published: live deliveries keep the publish's retain flag.
    pub retain_as_published: bool,
    /// Retained messages of this SUBSCRIBE are not to be sent (Retain Handling 2, or 1 on a
    /// subscription that existed already).
    pub no_retained: bool,
}

/// What the gate does with one delivery.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Not for this client (its own publish under No Local, or a retained message its
    /// subscription asked not to get): acknowledged to the broker, not sent.
    Withhold,
    /// Its Message Expiry Interval ran out while it waited: dropped, acknowledged to the broker.
    Expired,
    /// Sent at `qos` with `retain`.
    Deliver {
        /// min(delivered QoS, publish QoS).
        qos: u8,
        /// The retain flag the client sees.
        retain: bool,
        /// What is left of its Message Expiry Interval, in whole seconds (rounded up), when it
        /// has one.
        expiry_left_s: Option<u32>,
    },
}

/// One connection's subscriptions, as the gate knows them (the broker has its own copy).
#[derive(Debug, Default, Clone)]
pub struct Subscriptions {
    by_filter: HashMap<String, Options>,
}

impl Subscriptions {
    /// Records a SUBSCRIBE of `filter` with `opts`; `retain_handling` is the client's 0, 1 or 2.
    pub fn subscribe(&mut self, filter: &str, mut opts: Options, retain_handling: u8) {
        let existed = self.by_filter.contains_key(filter);
        opts.no_retained = retain_handling == 2 || (retain_handling == 1 && existed);
        self.by_filter.insert(filter.to_string(), opts);
    }

    /// The gate sends `filter`'s retained messages itself: the broker's are withheld.
    pub fn retained_from_gate(&mut self, filter: &str) {
        if let Some(o) = self.by_filter.get_mut(filter) {
            o.no_retained = true;
        }
    }

    /// Forgets `filter`.
    pub fn unsubscribe(&mut self, filter: &str) {
        self.by_filter.remove(filter);
    }

    /// How many filters.
    pub fn len(&self) -> usize {
        self.by_filter.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.by_filter.is_empty()
    }

    /// Whether `filter` is subscribed.
    pub fn contains(&self, filter: &str) -> bool {
        self.by_filter.contains_key(filter)
    }

    /// Every filter with its options.
    pub fn iter(&self) -> impl Iterator<Item = (&String, &Options)> {
        self.by_filter.iter()
    }

    /// What connection `me` does with a delivery on `topic` the broker sent at `qos`:
    /// `from_store` when the broker marked it retained (it does so only for the retained
    /// messages it sends on a new subscription; live deliveries come with the flag cleared).
    ///
    /// rumqttd delivers a message once per matching filter, and its delivery does not say
    /// which; a delivery is withheld only when every matching subscription excludes it.
    pub fn verdict(
        &self,
        me: u64,
        topic: &str,
        qos: u8,
        from_store: bool,
        origin: Option<Origin>,
        now_ms: u64,
    ) -> Verdict {
        let matching: Vec<&Options> = self
            .by_filter
            .iter()
            .filter(|(f, _)| {
                let f = crate::acl::strip_share(f).unwrap_or(f);
                edgetwin_contract::topic::filter::matches(f, topic)
            })
            .map(|(_, o)| o)
            .collect();
        let any = !matching.is_empty();
        if any && from_store && matching.iter().all(|o| o.no_retained) {
            return Verdict::Withhold;
        }
        if let Some(o) = origin {
            if any && !from_store && o.conn == me && matching.iter().all(|s| s.no_local) {
                return Verdict::Withhold;
            }
        }
        let expiry_left_s = match origin.and_then(|o| o.expires_at_ms) {
            Some(at) if at <= now_ms => return Verdict::Expired,
            Some(at) => Some(u32::try_from((at - now_ms).div_ceil(1000)).unwrap_or(u32::MAX)),
            None => None,
        };
        let qos = origin.map_or(qos, |o| qos.min(o.qos));
        let retain = from_store
            || origin.is_some_and(|o| o.retain && matching.iter().any(|s| s.retain_as_published));
        Verdict::Deliver {
            qos,
            retain,
            expiry_left_s,
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn opts(qos: u8) -> Options {
        Options {
            qos,
            no_local: false,
            retain_as_published: false,
            no_retained: false,
        }
    }

    #[test]
    fn origin_rides_in_one_user_property_and_a_clients_forgery_is_replaced() {
        let mut props = vec![
            ("a".to_string(), "1".to_string()),
            (KEY.to_string(), "2199".to_string()),
        ];
        Origin {
            qos: 1,
            retain: false,
            conn: 42,
            expires_at_ms: Some(1_700_000_000_123),
        }
        .attach(&mut props);
        assert_eq!(props.iter().filter(|(k, _)| k == KEY).count(), 1);
        let got = Origin::take(&mut props).unwrap();
        assert_eq!(
            got,
            Origin {
                qos: 1,
                retain: false,
                conn: 42,
                expires_at_ms: Some(1_700_000_000_123),
            }
        );
        assert_eq!(props, vec![("a".to_string(), "1".to_string())]);
    }

    #[test]
    fn a_delivery_goes_at_the_lower_of_publish_and_subscription_qos() {
        let mut s = Subscriptions::default();
        s.subscribe("t/#", opts(2), 0);
        for pub_qos in 0..=2u8 {
            let o = Origin {
                qos: pub_qos,
                retain: false,
                conn: 1,
                expires_at_ms: None,
            };
            assert_eq!(
                s.verdict(2, "t/x", 2, false, Some(o), 0),
                Verdict::Deliver {
                    qos: pub_qos,
                    retain: false,
                    expiry_left_s: None,
                }
            );
        }
        // The node's own publications carry no origin: the subscription's QoS.
        assert_eq!(
            s.verdict(2, "t/x", 2, false, None, 0),
            Verdict::Deliver {
                qos: 2,
                retain: false,
                expiry_left_s: None,
            }
        );
    }

    #[test]
    fn no_local_withholds_only_the_connections_own_publishes() {
        let mut s = Subscriptions::default();
        s.subscribe(
            "t",
            Options {
                no_local: true,
                ..opts(1)
            },
            0,
        );
        let mine = Origin {
            qos: 1,
            retain: false,
            conn: 7,
            expires_at_ms: None,
        };
        assert_eq!(
            s.verdict(7, "t", 1, false, Some(mine), 0),
            Verdict::Withhold
        );
        assert!(matches!(
            s.verdict(8, "t", 1, false, Some(mine), 0),
            Verdict::Deliver { .. }
        ));
        // Another matching subscription without No Local still gets it.
        s.subscribe("#", opts(1), 0);
        assert!(matches!(
            s.verdict(7, "t", 1, false, Some(mine), 0),
            Verdict::Deliver { .. }
        ));
    }

    #[test]
    fn retain_as_published_keeps_the_flag_and_retain_handling_withholds_stored_messages() {
        let mut s = Subscriptions::default();
        s.subscribe(
            "t",
            Options {
                retain_as_published: true,
                ..opts(1)
            },
            0,
        );
        let retained = Origin {
            qos: 1,
            retain: true,
            conn: 3,
            expires_at_ms: None,
        };
        assert_eq!(
            s.verdict(4, "t", 1, false, Some(retained), 0),
            Verdict::Deliver {
                qos: 1,
                retain: true,
                expiry_left_s: None,
            }
        );
        s.subscribe("u/+", opts(1), 2);
        assert_eq!(
            s.verdict(4, "u/a", 1, true, Some(retained), 0),
            Verdict::Withhold
        );
        // Retain Handling 1: only a new subscription gets the stored messages.
        s.subscribe("v", opts(1), 1);
        assert!(matches!(
            s.verdict(4, "v", 1, true, None, 0),
            Verdict::Deliver { retain: true, .. }
        ));
        s.subscribe("v", opts(1), 1);
        assert_eq!(s.verdict(4, "v", 1, true, None, 0), Verdict::Withhold);
    }

    #[test]
    fn message_expiry_counts_down_and_an_expired_message_is_dropped() {
        let mut s = Subscriptions::default();
        s.subscribe("t", opts(1), 0);
        let o = Origin {
            qos: 1,
            retain: false,
            conn: 1,
            expires_at_ms: Some(10_000),
        };
        assert_eq!(
            s.verdict(2, "t", 1, false, Some(o), 4_500),
            Verdict::Deliver {
                qos: 1,
                retain: false,
                expiry_left_s: Some(6),
            }
        );
        assert_eq!(
            s.verdict(2, "t", 1, false, Some(o), 10_000),
            Verdict::Expired
        );
    }

    proptest! {
        #[test]
        fn any_user_property_value_parses_without_panic(v in ".{0,24}") {
            let mut props = vec![(KEY.to_string(), v)];
            let _ = Origin::take(&mut props);
            prop_assert!(props.is_empty());
        }

        #[test]
        fn an_attached_origin_always_comes_back(qos in 0u8..3, retain: bool, conn: u64, at: Option<u64>) {
            let mut props = Vec::new();
            let o = Origin { qos, retain, conn, expires_at_ms: at };
            o.attach(&mut props);
            prop_assert_eq!(Origin::take(&mut props), Some(o));
        }
    }
}
