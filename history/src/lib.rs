//! `edgetwin-history`: a short local history of every reported numeric value, for charts on
//! the node and for questions such as "what did this sensor read over the last hour" while the
//! cloud is away.
//!
//! One series per property of a device, cut into fixed buckets (`resolution`), each bucket one
//! point with min, max, average, last value and count: so a reading every 100 ms and one every
//! minute cost the same. Bounded three ways: points older than `retention` are removed, at most
//! `max_series` series are open at once, and memory holds only each active series' open bucket;
//! the points themselves live on disk. Writes are batched: the node flushes every changed
//! point at an interval, in one transaction, so flash is not written per reading. A crash loses
//! at most the readings since the last flush (history is a recent view, not a durable record:
//! the twin itself is durable).
//!
//! [`series`] is the I/O-free core; [`store`] the redb file.

pub mod series;
pub mod store;

pub use series::{Dirty, Point, Recorded, Recorder, SeriesKey, Settings};
pub use store::{HistoryError, HistoryStore};
