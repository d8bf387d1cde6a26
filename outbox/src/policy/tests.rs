//! Policy behaviour: every drop reason, both overflow policies, and a proptest of the invariants.

use super::*;
use proptest::prelude::*;

fn limits(max_bytes: u64, max_age_ms: u64, max_records: Option<u64>) -> Limits {
    Limits {
        max_bytes,
        max_age_ms,
        max_records,
        policy: OverflowPolicy::DropOldest,
    }
}

fn e(bytes: u64, ts_ms: i64) -> Entry {
    Entry { bytes, ts_ms }
}

fn total(queue: &[Entry]) -> (u64, u64) {
    (queue.len() as u64, queue.iter().map(|e| e.bytes).sum())
}

fn plan(l: &Limits, queue: &[Entry], incoming: Entry, now: i64) -> Plan {
    let (records, bytes) = total(queue);
    l.plan(queue.iter().copied(), records, bytes, incoming, now)
}

#[test]
fn policy_accepts_a_record_that_fits() {
    let l = limits(100, 1000, None);
    let p = plan(&l, &[e(40, 0), e(40, 1)], e(20, 2), 10);
    assert_eq!(p.evict, 0);
    assert_eq!(p.rejected, None);
    assert_eq!(p.drops, Drops::default());
}

#[test]
fn policy_drop_oldest_evicts_just_enough_bytes() {
    let l = limits(100, 1000, None);
    let p = plan(&l, &[e(30, 0), e(30, 1), e(30, 2)], e(50, 3), 10);
    assert_eq!(p.evict, 2);
    assert_eq!(p.rejected, None);
    assert_eq!(
        p.drops.get(DropReason::BytesLimit),
        DropCount {
            records: 2,
            bytes: 60
        }
    );
    assert_eq!(p.drops.total().records, 2);
}

#[test]
fn policy_drop_oldest_evicts_for_the_record_limit() {
    let l = limits(1000, 1000, Some(2));
    let p = plan(&l, &[e(1, 0), e(2, 1)], e(1, 2), 10);
    assert_eq!(p.evict, 1);
    assert_eq!(p.rejected, None);
    assert_eq!(
        p.drops.get(DropReason::RecordsLimit),
        DropCount {
            records: 1,
            bytes: 1
        }
    );
}

#[test]
fn policy_drop_oldest_rejects_a_record_larger_than_max_bytes_without_evicting() {
    let l = limits(100, 1000, None);
    let p = plan(&l, &[e(30, 0)], e(101, 1), 10);
    assert_eq!(p.evict, 0);
    assert_eq!(p.rejected, Some(DropReason::BytesLimit));
    assert_eq!(
        p.drops.get(DropReason::BytesLimit),
        DropCount {
            records: 1,
            bytes: 101
        }
    );
}

#[test]
fn policy_drop_oldest_rejects_everything_when_max_records_is_zero() {
    let l = limits(100, 1000, Some(0));
    let p = plan(&l, &[], e(1, 1), 10);
    assert_eq!(p.rejected, Some(DropReason::RecordsLimit));
}

#[test]
fn policy_reject_new_keeps_the_queue_and_refuses_the_record() {
    let l = Limits {
        policy: OverflowPolicy::RejectNew,
        ..limits(100, 1000, Some(5))
    };
    let p = plan(&l, &[e(60, 0), e(30, 1)], e(20, 2), 10);
    assert_eq!(p.evict, 0);
    assert_eq!(p.rejected, Some(DropReason::RejectedNew));
    assert_eq!(
        p.drops.get(DropReason::RejectedNew),
        DropCount {
            records: 1,
            bytes: 20
        }
    );
}

#[test]
fn policy_reject_new_still_drops_expired_records_first() {
    let l = Limits {
        policy: OverflowPolicy::RejectNew,
        ..limits(100, 50, None)
    };
    // The first record is 100 ms old at now = 100: expired; dropping it makes room.
    let p = plan(&l, &[e(60, 0), e(30, 90)], e(20, 95), 100);
    assert_eq!(p.evict, 1);
    assert_eq!(p.rejected, None);
    assert_eq!(p.drops.get(DropReason::AgeLimit).records, 1);
    assert_eq!(p.drops.get(DropReason::RejectedNew).records, 0);
}

#[test]
fn policy_expired_head_is_dropped_even_when_the_record_fits() {
    let l = limits(1000, 50, None);
    let p = plan(&l, &[e(1, 0), e(1, 10), e(1, 80)], e(1, 100), 100);
    assert_eq!(p.evict, 2);
    assert_eq!(
        p.drops.get(DropReason::AgeLimit),
        DropCount {
            records: 2,
            bytes: 2
        }
    );
}

#[test]
fn policy_age_exactly_max_age_is_still_live() {
    let l = limits(1000, 50, None);
    assert!(!l.is_expired(50, 100));
    assert!(l.is_expired(49, 100));
    // Extreme clocks do not overflow.
    assert!(l.is_expired(i64::MIN, i64::MAX));
    assert!(!l.is_expired(i64::MAX, i64::MIN));
}

#[test]
fn policy_rejects_an_incoming_record_that_is_already_expired() {
    let l = limits(1000, 50, None);
    let p = plan(&l, &[], e(5, 10), 100);
    assert_eq!(p.rejected, Some(DropReason::AgeLimit));
    assert_eq!(
        p.drops.get(DropReason::AgeLimit),
        DropCount {
            records: 1,
            bytes: 5
        }
    );
}

#[test]
fn policy_reason_labels_are_the_metric_labels() {
    let labels: Vec<&str> = DropReason::ALL.iter().map(|r| r.as_str()).collect();
    assert_eq!(
        labels,
        ["bytes_limit", "age_limit", "records_limit", "rejected_new"]
    );
}

fn arb_limits() -> impl Strategy<Value = Limits> {
    (
        0u64..400,
        0u64..100,
        proptest::option::of(0u64..8),
        prop_oneof![
            Just(OverflowPolicy::DropOldest),
            Just(OverflowPolicy::RejectNew)
        ],
    )
        .prop_map(|(max_bytes, max_age_ms, max_records, policy)| Limits {
            max_bytes,
            max_age_ms,
            max_records,
            policy,
        })
}

fn arb_entry() -> impl Strategy<Value = Entry> {
    (0u64..150, 0i64..200).prop_map(|(bytes, ts_ms)| Entry { bytes, ts_ms })
}

proptest! {
    /// For any limits, queue and incoming record: only a prefix is evicted, the drop counts add up
    /// to exactly what is evicted or rejected, an accepted record leaves the queue within every
    /// limit, `RejectNew` only ever evicts expired records, and `DropOldest` evicts no more than
    /// needed.
    #[test]
    fn policy_plan_invariants(
        l in arb_limits(),
        queue in proptest::collection::vec(arb_entry(), 0..12),
        incoming in arb_entry(),
        now in 0i64..300,
    ) {
        let p = plan(&l, &queue, incoming, now);
        prop_assert!(p.evict <= queue.len());
        let evicted = &queue[..p.evict];
        let rest = &queue[p.evict..];
        let incoming_dropped = u64::from(p.rejected.is_some());
        prop_assert_eq!(p.drops.total().records, evicted.len() as u64 + incoming_dropped);
        prop_assert_eq!(
            p.drops.total().bytes,
            evicted.iter().map(|e| e.bytes).sum::<u64>() + incoming_dropped * incoming.bytes
        );
        if l.policy == OverflowPolicy::RejectNew {
            for ev in evicted {
                prop_assert!(l.is_expired(ev.ts_ms, now));
            }
            prop_assert_eq!(p.drops.get(DropReason::BytesLimit).records, 0);
            prop_assert_eq!(p.drops.get(DropReason::RecordsLimit).records, 0);
        } else {
            prop_assert_eq!(p.drops.get(DropReason::RejectedNew).records, 0);
        }
        match p.rejected {
            None => {
                let (records, bytes) = total(rest);
                prop_assert!(bytes + incoming.bytes <= l.max_bytes);
                prop_assert!(l.max_records.is_none_or(|m| records < m));
                prop_assert!(!l.is_expired(incoming.ts_ms, now));
                // Minimal: keeping the last evicted record would not fit, unless it was expired.
                if let Some(last) = evicted.last() {
                    let fits_with_last = bytes + last.bytes + incoming.bytes <= l.max_bytes
                        && l.max_records.is_none_or(|m| records + 1 < m);
                    prop_assert!(!fits_with_last || l.is_expired(last.ts_ms, now));
                }
            }
            Some(DropReason::AgeLimit) => prop_assert!(l.is_expired(incoming.ts_ms, now)),
            Some(DropReason::BytesLimit) => prop_assert!(incoming.bytes > l.max_bytes),
            Some(DropReason::RecordsLimit) => prop_assert_eq!(l.max_records, Some(0)),
            Some(DropReason::RejectedNew) => prop_assert_eq!(l.policy, OverflowPolicy::RejectNew),
        }
        // Evictions only stop at a live record: expired records at the head are always dropped.
        if let Some(first_kept) = rest.first() {
            prop_assert!(!l.is_expired(first_kept.ts_ms, now));
        }
    }
}
