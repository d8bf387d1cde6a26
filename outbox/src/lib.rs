//! The bridge's durable outbox: topic-addressed messages waiting for the cloud broker.
//!
//! The bridge knows nothing about twins; whatever must go upstream is [`Outbox::append`]ed
//! first, sent from [`Outbox::peek`], and removed by [`Outbox::ack`] once the cloud broker has
//! acknowledged it (QoS 1 PUBACK). [`policy`] is the pure bound and drop policy; [`store`] is the
//! redb file (its module doc states the on-disk format).
//!
//! # Delivery contract
//!
//! - **At least once.** A record stays stored until it is acked (or dropped by the policy, which is
//!   counted by reason in [`Stats::dropped`]). After a crash, everything appended and not acked
//!   is peeked again, so the cloud may see a record twice (e.g. it was delivered but the ack was
//!   not yet committed); consumers must tolerate duplicates (the record's `seq` can serve as an
//!   idempotency key).
//! - **Durable on return.** [`Outbox::append`] returns only after its batch is committed with
//!   redb's `Durability::Immediate` (fsynced): it survives `kill -9` and power loss. A failed
//!   append stores nothing of its batch and keeps everything stored before.
//! - **Order.** Sequence numbers strictly increase in append order and are never reused, also
//!   across restarts; [`Outbox::peek`] returns records in sequence order, so the order per
//!   ordering key (e.g. per device) is the append order. Acks may come in any order.
//! - **Bounded.** Bytes, age and optionally record count are bounded by [`Limits`]; the overflow
//!   policy (drop oldest by default, or reject new) is documented in [`policy`].
//!
//! The API is synchronous (redb is); call it from a blocking thread, never from async workers.
//! One [`Outbox`] owns its file (redb allows a single writer per file), separate from the twin
//! store.
#![cfg_attr(test, allow(clippy::unwrap_used))]

pub mod policy;
pub mod store;

pub use crate::policy::{DropCount, DropReason, Drops, Limits, OverflowPolicy};
pub use crate::store::{
    AckDurability, AckError, AckReport, AppendError, AppendReport, CompactError, CompactReport,
    DbError, NewRecord, OpenError, OpenReport, Outbox, PeekError, QuarantinedFile, Record, Stats,
    AUTO_COMPACT_MIN_FILE_BYTES, AUTO_COMPACT_RATIO,
};
