//! Device twins for edgetwin: [`core`] is the pure twin state machine (merge patches, per-property
//! last-writer-wins, versions, delta, model checks; no I/O, time is a parameter) and [`store`] is
//! its durable redb store (group commit, crash-safe reopen, quarantine of undecodable records).
#![cfg_attr(test, allow(clippy::unwrap_used))]

pub mod core;
pub mod store;

pub use crate::core::{Applied, Entry, ModelSpec, Patch, PropertySpec, Rejection, Twin};
pub use crate::store::{CommitStats, Health, Quarantined, RestoreReport, StoreError, TwinStore};
