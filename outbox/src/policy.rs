//! The outbox's bound and drop policy: pure (no I/O, time is a parameter).
//!
//! An outbox is bounded by [`Limits`]: total stored bytes (`max_bytes`), record age (`max_age_ms`)
//! and optionally a record count (`max_records`). When an incoming record does not fit, the
//! [`OverflowPolicy`] decides who loses:
//!
//! - [`OverflowPolicy::DropOldest`] (the default): the oldest records are dropped until the new
//!   one fits. Right for telemetry, where the newest value is worth the most. A record that could
//!   never fit (larger than `max_bytes`, or `max_records == Some(0)`) is rejected without dropping
//!   anything else.
//! - [`OverflowPolicy::RejectNew`]: the new record is rejected and the queue is left as it is.
//!   Right when the oldest data matters most (an audit trail).
//!
//! Under both policies a record older than `max_age_ms` is dropped: the oldest record is dropped
//! when it has expired whenever a record is appended, any record is dropped when a peek meets it
//! expired, and an incoming record that is already expired is never stored.
//!
//! Age is `now_ms - ts_ms` where `ts_ms` is the record's own timestamp (the caller's clock); a
//! record whose age is exactly `max_age_ms` is still live.
//!
//! Every dropped record is counted under exactly one [`DropReason`]; nothing is dropped for any
//! other reason.
//!
//! The policy is one step at a time ([`Limits::next_step`]): given the queue's summary, its oldest
//! record and the incoming record, it says "evict the oldest (reason)", "accept" or "reject
//! (reason)". The caller applies the step and asks again. [`Limits::plan`] runs the steps over an
//! iterator of the queue's records for callers (and tests) that hold the queue in memory.

/// What to do when an incoming record does not fit within the limits.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub enum OverflowPolicy {
    /// Drop the oldest records until the new one fits (the default).
    #[default]
    DropOldest,
    /// Reject the new record and keep the queue as it is.
    RejectNew,
}

/// The bounds of one outbox and its overflow policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Limits {
    /// Maximum total stored size of all records, in bytes (see [`crate::NewRecord::stored_len`]).
    pub max_bytes: u64,
    /// Maximum age of a record in milliseconds (`now_ms - ts_ms`); older records are dropped.
    pub max_age_ms: u64,
    /// Maximum number of records, if any.
    pub max_records: Option<u64>,
    /// What happens when an incoming record does not fit.
    pub policy: OverflowPolicy,
}

impl Default for Limits {
    /// 256 MiB, 24 hours, no record limit, [`OverflowPolicy::DropOldest`].
    fn default() -> Limits {
        Limits {
            max_bytes: 256 * 1024 * 1024,
            max_age_ms: 24 * 60 * 60 * 1000,
            max_records: None,
            policy: OverflowPolicy::DropOldest,
        }
    }
}

/// Why a record was dropped (a bounded label set for metrics).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DropReason {
    /// An old record was dropped to make room (bytes), or a record larger than `max_bytes` was
    /// refused under [`OverflowPolicy::DropOldest`].
    BytesLimit,
    /// The record was older than `max_age_ms`.
    AgeLimit,
    /// An old record was dropped to make room (record count), or `max_records` is 0.
    RecordsLimit,
    /// The new record did not fit under [`OverflowPolicy::RejectNew`].
    RejectedNew,
}

impl DropReason {
    /// Every reason, in label order.
    pub const ALL: [DropReason; 4] = [
        DropReason::BytesLimit,
        DropReason::AgeLimit,
        DropReason::RecordsLimit,
        DropReason::RejectedNew,
    ];

    /// The metric label: `bytes_limit`, `age_limit`, `records_limit`, `rejected_new`.
    pub fn as_str(self) -> &'static str {
        match self {
            DropReason::BytesLimit => "bytes_limit",
            DropReason::AgeLimit => "age_limit",
            DropReason::RecordsLimit => "records_limit",
            DropReason::RejectedNew => "rejected_new",
        }
    }

    fn index(self) -> usize {
        match self {
            DropReason::BytesLimit => 0,
            DropReason::AgeLimit => 1,
            DropReason::RecordsLimit => 2,
            DropReason::RejectedNew => 3,
        }
    }
}

impl std::fmt::Display for DropReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Number and stored size of dropped records.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DropCount {
    /// Records dropped.
    pub records: u64,
    /// Their stored size in bytes.
    pub bytes: u64,
}

/// Dropped records by reason.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Drops {
    by_reason: [DropCount; 4],
}

impl Drops {
    /// Counts one dropped record of `bytes` under `reason`.
    pub fn add(&mut self, reason: DropReason, bytes: u64) {
        let c = &mut self.by_reason[reason.index()];
        c.records = c.records.saturating_add(1);
        c.bytes = c.bytes.saturating_add(bytes);
    }

    /// Adds every count of `other`.
    pub fn merge(&mut self, other: &Drops) {
        for (mine, theirs) in self.by_reason.iter_mut().zip(other.by_reason.iter()) {
            mine.records = mine.records.saturating_add(theirs.records);
            mine.bytes = mine.bytes.saturating_add(theirs.bytes);
        }
    }

    /// The records dropped for `reason`.
    pub fn get(&self, reason: DropReason) -> DropCount {
        self.by_reason[reason.index()]
    }

    /// All dropped records, whatever the reason.
    pub fn total(&self) -> DropCount {
        self.by_reason
            .iter()
            .fold(DropCount::default(), |acc, c| DropCount {
                records: acc.records.saturating_add(c.records),
                bytes: acc.bytes.saturating_add(c.bytes),
            })
    }

    /// `(reason, count)` for every reason, in label order.
    pub fn iter(&self) -> impl Iterator<Item = (DropReason, DropCount)> + '_ {
        DropReason::ALL.into_iter().map(|r| (r, self.get(r)))
    }
}

/// The size and timestamp of one record, as far as the policy is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Entry {
    /// Stored size in bytes.
    pub bytes: u64,
    /// The record's timestamp (unix ms, the caller's clock).
    pub ts_ms: i64,
}

/// The queue as the policy sees it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Summary {
    /// Records stored.
    pub records: u64,
    /// Their total stored size in bytes.
    pub bytes: u64,
    /// The oldest record (the next to be dropped by [`OverflowPolicy::DropOldest`]), if any.
    pub oldest: Option<Entry>,
}

/// One decision of the policy for an incoming record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Drop the oldest record for this reason, then ask again.
    Evict(DropReason),
    /// Store the incoming record.
    Accept,
    /// Do not store the incoming record (it is dropped for this reason).
    Reject(DropReason),
}

/// The outcome of [`Limits::plan`] for one incoming record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Plan {
    /// How many of the oldest records to drop (a prefix of the queue).
    pub evict: usize,
    /// The dropped records (the evicted prefix and, if rejected, the incoming record) by reason.
    pub drops: Drops,
    /// `None` if the incoming record is stored, else why it is dropped.
    pub rejected: Option<DropReason>,
}

impl Limits {
    /// Whether a record with timestamp `ts_ms` is older than `max_age_ms` at `now_ms`.
    pub fn is_expired(&self, ts_ms: i64, now_ms: i64) -> bool {
        i128::from(now_ms) - i128::from(ts_ms) > i128::from(self.max_age_ms)
    }

    /// The next step for `incoming` given the queue `summary` (see the module doc). The caller
    /// applies an [`Step::Evict`] by removing `summary.oldest`, updating the summary, and asking
    /// again; the sequence always ends in [`Step::Accept`] or [`Step::Reject`].
    pub fn next_step(&self, summary: &Summary, incoming: Entry, now_ms: i64) -> Step {
        if let Some(oldest) = summary.oldest {
            if self.is_expired(oldest.ts_ms, now_ms) {
                return Step::Evict(DropReason::AgeLimit);
            }
        }
        if self.is_expired(incoming.ts_ms, now_ms) {
            return Step::Reject(DropReason::AgeLimit);
        }
        let fits_bytes = summary.bytes.saturating_add(incoming.bytes) <= self.max_bytes;
        let fits_records = self
            .max_records
            .is_none_or(|max| summary.records.saturating_add(1) <= max);
        if fits_bytes && fits_records {
            return Step::Accept;
        }
        let reason = if fits_bytes {
            DropReason::RecordsLimit
        } else {
            DropReason::BytesLimit
        };
        match self.policy {
            OverflowPolicy::RejectNew => Step::Reject(DropReason::RejectedNew),
            OverflowPolicy::DropOldest => {
                if incoming.bytes > self.max_bytes {
                    Step::Reject(DropReason::BytesLimit)
                } else if self.max_records == Some(0) {
                    Step::Reject(DropReason::RecordsLimit)
                } else if summary.oldest.is_none() {
                    // Only reachable with an inconsistent summary; never loop.
                    Step::Reject(reason)
                } else {
                    Step::Evict(reason)
                }
            }
        }
    }

    /// Runs [`next_step`](Self::next_step) to the end for `incoming` over a queue given as its
    /// records oldest first (only the evicted prefix is consumed).
    pub fn plan(
        &self,
        queue: impl IntoIterator<Item = Entry>,
        records: u64,
        bytes: u64,
        incoming: Entry,
        now_ms: i64,
    ) -> Plan {
        let mut queue = queue.into_iter();
        let mut summary = Summary {
            records,
            bytes,
            oldest: queue.next(),
        };
        let mut plan = Plan {
            evict: 0,
            drops: Drops::default(),
            rejected: None,
        };
        loop {
            match self.next_step(&summary, incoming, now_ms) {
                Step::Evict(reason) => {
                    let Some(oldest) = summary.oldest else {
                        // next_step never evicts from an empty queue.
                        plan.rejected = Some(reason);
                        plan.drops.add(reason, incoming.bytes);
                        return plan;
                    };
                    plan.evict += 1;
                    plan.drops.add(reason, oldest.bytes);
                    summary.records = summary.records.saturating_sub(1);
                    summary.bytes = summary.bytes.saturating_sub(oldest.bytes);
                    summary.oldest = queue.next();
                }
                Step::Accept => return plan,
                Step::Reject(reason) => {
                    plan.rejected = Some(reason);
                    plan.drops.add(reason, incoming.bytes);
                    return plan;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests;
