//! The outbox's redb file: append (group commit), peek, ack, crash-safe reopen.
//!
//! [`Outbox`] owns one redb file of its own (the daemon uses `{data_dir}/outbox.redb`), never the
//! twin store's: redb allows one writer per file, and the outbox's write pattern (append at the
//! tail, delete at the head) should not contend with twin commits.
//!
//! # On-disk format (format version 1)
//!
//! Three tables:
//!
//! - `records`: `u64 -> &[u8]`. Key = the record's sequence number (redb's `u64` key, ordered
//!   numerically, so a range scan is append order). Value = one record, little-endian:
//!
//!   | offset | size | field |
//!   |---|---|---|
//!   | 0  | 1 | record format, `1` |
//!   | 1  | 8 | `ts_ms`, `i64` |
//!   | 9  | 1 | `qos`, `0`, `1` or `2` |
//!   | 10 | 1 | flags: bit 0 = `retain`, other bits `0` |
//!   | 11 | 2 | `K` = ordering key length, `u16` |
//!   | 13 | 2 | `T` = topic length, `u16` |
//!   | 15 | K | ordering key, UTF-8 |
//!   | 15+K | T | topic, UTF-8 |
//!   | 15+K+T | rest | payload |
//!
//!   The value's length is the record's *stored size*, the unit of `max_bytes`, of
//!   [`Stats::bytes`] and of dropped bytes ([`NewRecord::stored_len`]: 15 + key + topic +
//!   payload). The file itself is larger (redb pages and B-tree nodes: 1.6-1.9x for 105-byte
//!   records).
//! - `meta`: `&str -> u64`. `"format"` = 1 (a reader refuses any other value and leaves the file
//!   alone); `"next_seq"` = the sequence number the next append will use. It is written in the
//!   same transaction as the records it follows, so a sequence number is never reused even when
//!   every record has been acked and the `records` table is empty.
//! - `quarantine`: `u64 -> &[u8]`. Records of `records` that did not decode when the file was
//!   opened, moved here (same key, exact bytes) in one transaction. Never read back by edgetwin;
//!   kept for an operator.
//!
//! # Durability and space
//!
//! Every write transaction (append, ack, expiry at peek) commits with redb's default
//! `Durability::Immediate` (fsync before returning). An append of a batch is one transaction
//! (group commit; one fsync per batch, not per record).
//!
//! Acks may be deferred ([`Outbox::ack_with`] with [`AckDurability::Deferred`]: redb's
//! `Durability::None`). A lost ack only means a duplicate after a crash, which at-least-once
//! allows. But deferring *every* ack would be wrong twice over: redb reuses the pages a
//! non-durable commit freed only after a later durable commit, so a long drain with no appends
//! (the typical reconnect after an outage) would reuse no space; and a crash after a long
//! deferred drain would replay the whole drained backlog upstream. So the caller bounds it: the
//! bridge defers acks for at most 250 ms, then commits one durably ([`Outbox::sync`] when no ack
//! is due). [`Outbox::ack`] takes a slice besides, so every PUBACK that arrived since the last
//! ack goes in one transaction.
//!
//! Space (measured, see the crate README): redb reuses the pages freed by acks, so with a steady
//! backlog the file stops growing (10,000 records of 105 bytes standing while 100,000 flow
//! through: 2.1 MiB throughout). It does not give space back to the file system on its own: after
//! a 100,000-record backlog drains, the file stays at its high-water mark (17 MiB).
//! [`Outbox::compact`] rewrites the file to its minimum (17 MiB -> 16 KiB in 8-100 ms). Compaction
//! rewrites the live records, which wears flash, so it is never done on every ack: an ack
//! compacts only when the file is at least [`AUTO_COMPACT_MIN_FILE_BYTES`] (8 MiB) and more than
//! [`AUTO_COMPACT_RATIO`] (8) times the live records' stored size, i.e. once at the end of a
//! drained large backlog, when there is little left to rewrite (a drained 100,000-record backlog
//! leaves a 2.6 MiB file instead of 17 MiB; the waste is bounded by 8 MiB or 8x the live
//! records, whichever is larger). A failed compaction is
//! logged and the ack still succeeds. [`Stats::compactions_total`] counts them.
//!
//! # Damage and failures (never silently delete anything)
//!
//! - A file that redb reports as corrupt or as not a redb database (the open runs redb's full
//!   integrity check) is renamed to `{file name}.corrupt-{unix ms}` beside it, logged, reported in
//!   [`OpenReport::quarantined_file`]; the new file gets every record of the damaged one that
//!   still reads and decodes (same sequence numbers), and the gaps between them are counted as
//!   lost.
//! - A record that fails to decode at open is moved to the `quarantine` table and reported in
//!   [`OpenReport::quarantined_records`]; the others load normally.
//! - Any other open error (permissions, file locked by another process, I/O, unknown format) is
//!   returned and nothing is touched.
//! - A failed write (e.g. disk full) returns the operation's error naming the file; nothing of
//!   that operation is stored and everything stored before stays. redb refuses every operation on
//!   a database after an I/O error, so the outbox closes it and reopens the file at the start of
//!   the next operation: once space is freed the outbox works again without a restart.

use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard, PoisonError};

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};

use crate::policy::{DropReason, Drops, Entry, Limits, Step, Summary};

const RECORDS: TableDefinition<u64, &[u8]> = TableDefinition::new("records");
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
const QUARANTINE: TableDefinition<u64, &[u8]> = TableDefinition::new("quarantine");
const META_FORMAT: &str = "format";
const META_NEXT_SEQ: &str = "next_seq";
/// Written only by [`Outbox::probe`] (after a failure), never read back.
const META_PROBE: &str = "probe";
const FORMAT: u64 = 1;
const RECORD_FORMAT: u8 = 1;
const HEADER_LEN: usize = 15;

/// [`Outbox::ack`] compacts the file only when it is at least this large (8 MiB) ...
pub const AUTO_COMPACT_MIN_FILE_BYTES: u64 = 8 * 1024 * 1024;
/// ... and more than this many times the stored size of the live records (so at most 1/8 of
/// the file is rewritten, once per drained backlog).
pub const AUTO_COMPACT_RATIO: u64 = 8;

/// One stored record, as [`Outbox::peek`] returns it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// Sequence number: strictly increasing in append order, never reused.
    pub seq: u64,
    /// Timestamp (unix ms, the appender's clock); age limits are measured from it.
    pub ts_ms: i64,
    /// MQTT topic to publish upstream.
    pub topic: String,
    /// MQTT payload.
    pub payload: Vec<u8>,
    /// MQTT QoS (0, 1 or 2).
    pub qos: u8,
    /// MQTT retain flag.
    pub retain: bool,
    /// Ordering key (e.g. the device id); records with the same key are delivered in append order.
    pub key: String,
}

/// A record to append; the outbox assigns its sequence number.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewRecord {
    /// Timestamp (unix ms, the appender's clock); age limits are measured from it.
    pub ts_ms: i64,
    /// MQTT topic to publish upstream (at most 65,535 bytes).
    pub topic: String,
    /// MQTT payload.
    pub payload: Vec<u8>,
    /// MQTT QoS (0, 1 or 2).
    pub qos: u8,
    /// MQTT retain flag.
    pub retain: bool,
    /// Ordering key, e.g. the device id (at most 65,535 bytes).
    pub key: String,
}

impl NewRecord {
    /// The stored size in bytes (the unit of `max_bytes`): 15 + key + topic + payload.
    pub fn stored_len(&self) -> u64 {
        (HEADER_LEN + self.key.len() + self.topic.len() + self.payload.len()) as u64
    }
}

/// A corrupt file that was moved aside at open.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QuarantinedFile {
    /// The new name of the corrupt file (`{name}.corrupt-{unix ms}`, same directory).
    pub renamed_to: PathBuf,
    /// Why redb rejected it.
    pub reason: String,
    /// Records read back from it into the new file (same sequence numbers, still to be sent).
    pub salvaged: u64,
    /// Records known lost: gaps between the salvaged sequence numbers (the live records of an
    /// outbox are contiguous). Records past the last salvaged one cannot be seen, so this is a
    /// lower bound.
    pub lost_at_least: u64,
}

/// What [`Outbox::open`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpenReport {
    /// Records waiting to be sent.
    pub records: u64,
    /// Their stored size in bytes.
    pub bytes: u64,
    /// The sequence number the next append will use.
    pub next_seq: u64,
    /// The corrupt file that was moved aside (the outbox started empty), if any.
    pub quarantined_file: Option<QuarantinedFile>,
    /// Sequence numbers of records that did not decode and were moved to the `quarantine` table.
    pub quarantined_records: Vec<u64>,
}

/// What one [`Outbox::append`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AppendReport {
    /// Per record of the batch, in order: its sequence number, or `None` if the policy rejected
    /// it. A record displaced by a later record of the same batch keeps its (never reused) number
    /// and is counted in `dropped`.
    pub seqs: Vec<Option<u64>>,
    /// Records dropped by this append (old records evicted and new ones rejected), by reason.
    pub dropped: Drops,
}

/// What one [`Outbox::ack`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AckReport {
    /// Records removed.
    pub removed: u64,
    /// Their stored size in bytes.
    pub bytes: u64,
    /// Sequence numbers that were not stored (already acked, dropped, or never assigned).
    pub unknown: u64,
}

/// What [`Outbox::compact`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CompactReport {
    /// File size before, in bytes.
    pub file_bytes_before: u64,
    /// File size after, in bytes.
    pub file_bytes_after: u64,
}

/// A snapshot of the outbox for metrics. Gauges come from the stored data; counters count since
/// open (a restart resets them, as Prometheus counters expect).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Stats {
    /// Records waiting (gauge).
    pub records: u64,
    /// Their stored size in bytes (gauge).
    pub bytes: u64,
    /// Timestamp of the oldest (lowest sequence number) record, if any (gauge source for the
    /// oldest-message-age metric).
    pub oldest_ts_ms: Option<i64>,
    /// The sequence number the next append will use.
    pub next_seq: u64,
    /// Size of the file in bytes after the last write (gauge; 0 if it could not be read).
    pub file_bytes: u64,
    /// Records stored by appends since open.
    pub appended_total: u64,
    /// Records removed by acks since open.
    pub acked_total: u64,
    /// Records dropped since open, by reason.
    pub dropped: Drops,
    /// File compactions since open (automatic and [`Outbox::compact`]).
    pub compactions_total: u64,
}

/// A redb failure inside one outbox operation (wrapped by each operation's error).
#[derive(Debug, thiserror::Error)]
pub enum DbError {
    /// The file could not be (re)opened.
    #[error("cannot open the database: {0}")]
    Open(#[from] redb::DatabaseError),
    /// A transaction could not be started.
    #[error("cannot begin a transaction: {0}")]
    Transaction(#[from] redb::TransactionError),
    /// A table could not be opened.
    #[error("cannot open a table: {0}")]
    Table(#[from] redb::TableError),
    /// Reading or writing failed.
    #[error("storage error: {0}")]
    Storage(#[from] redb::StorageError),
    /// The commit failed.
    #[error("commit failed: {0}")]
    Commit(#[from] redb::CommitError),
    /// Compaction failed.
    #[error("compaction failed: {0}")]
    Compaction(#[from] redb::CompactionError),
    /// A deferred commit was refused.
    #[error("cannot defer the commit: {0}")]
    Durability(#[from] redb::SetDurabilityError),
}

/// How [`Outbox::ack_with`] commits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AckDurability {
    /// fsynced before it returns.
    #[default]
    Immediate,
    /// Made durable by the next durable commit (an append, an immediate ack, [`Outbox::sync`]);
    /// a crash before that brings the records back, to be sent again (a duplicate, never a loss).
    Deferred,
}

impl DbError {
    /// Whether the file system reported that it is full (`ENOSPC`, `EDQUOT`).
    pub fn is_storage_full(&self) -> bool {
        let storage = match self {
            DbError::Open(redb::DatabaseError::Storage(s))
            | DbError::Transaction(redb::TransactionError::Storage(s))
            | DbError::Table(redb::TableError::Storage(s))
            | DbError::Storage(s)
            | DbError::Commit(redb::CommitError::Storage(s))
            | DbError::Compaction(redb::CompactionError::Storage(s)) => s,
            _ => return false,
        };
        matches!(storage, redb::StorageError::Io(io)
            if matches!(io.kind(), std::io::ErrorKind::StorageFull | std::io::ErrorKind::QuotaExceeded))
    }
}

/// [`Outbox::open`] failed; every message starts with `outbox {path}:`.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// redb could not open or initialise the file (nothing was touched).
    #[error("outbox {}: {source}", path.display())]
    Db {
        /// The outbox file.
        path: PathBuf,
        /// redb's reason.
        source: DbError,
    },
    /// The file is an outbox of another format version (nothing was touched).
    #[error("outbox {}: unsupported format {found} (this build reads {FORMAT})", path.display())]
    Format {
        /// The outbox file.
        path: PathBuf,
        /// The format version found in the file.
        found: u64,
    },
    /// The file is corrupt and could not be moved aside.
    #[error("outbox {}: file is corrupt ({reason}) and cannot be renamed to {}: {source}", path.display(), renamed_to.display())]
    Rename {
        /// The outbox file.
        path: PathBuf,
        /// Where it should have gone.
        renamed_to: PathBuf,
        /// Why it is considered corrupt.
        reason: String,
        /// The rename error.
        source: std::io::Error,
    },
}

/// [`Outbox::append`] failed; nothing of the batch is stored. Messages start with `outbox {path}:`.
#[derive(Debug, thiserror::Error)]
pub enum AppendError {
    /// A record of the batch cannot be stored (bad QoS, key or topic too long).
    #[error("outbox {}: record {index} of the batch is invalid ({reason}); nothing of the batch is stored", path.display())]
    Invalid {
        /// The outbox file.
        path: PathBuf,
        /// Index of the record in the batch.
        index: usize,
        /// What is wrong with it.
        reason: String,
    },
    /// The write failed (e.g. disk full); records stored before are kept.
    #[error("outbox {}: append failed, nothing of the batch is stored: {source}", path.display())]
    Db {
        /// The outbox file.
        path: PathBuf,
        /// redb's reason.
        source: DbError,
    },
}

impl AppendError {
    /// Whether the append failed because the file system is full.
    pub fn is_storage_full(&self) -> bool {
        matches!(self, AppendError::Db { source, .. } if source.is_storage_full())
    }
}

/// [`Outbox::peek`] failed. Messages start with `outbox {path}:`.
#[derive(Debug, thiserror::Error)]
pub enum PeekError {
    /// Reading, or removing expired records, failed.
    #[error("outbox {}: peek failed: {source}", path.display())]
    Db {
        /// The outbox file.
        path: PathBuf,
        /// redb's reason.
        source: DbError,
    },
    /// A stored record does not decode (it passed the check at open, so the file was damaged
    /// since).
    #[error("outbox {}: record {seq} does not decode: {reason}", path.display())]
    Decode {
        /// The outbox file.
        path: PathBuf,
        /// The record's sequence number.
        seq: u64,
        /// What is wrong with it.
        reason: String,
    },
}

/// [`Outbox::ack`] failed; nothing of it is stored (the records stay and will be peeked again).
/// Messages start with `outbox {path}:`.
#[derive(Debug, thiserror::Error)]
pub enum AckError {
    /// The write failed.
    #[error("outbox {}: ack failed, no record removed: {source}", path.display())]
    Db {
        /// The outbox file.
        path: PathBuf,
        /// redb's reason.
        source: DbError,
    },
}

/// [`Outbox::compact`] failed. Messages start with `outbox {path}:`.
#[derive(Debug, thiserror::Error)]
pub enum CompactError {
    /// redb could not compact the file (its content is unchanged).
    #[error("outbox {}: compaction failed: {source}", path.display())]
    Db {
        /// The outbox file.
        path: PathBuf,
        /// redb's reason.
        source: DbError,
    },
}

use edgetwin_redbfile::Opener;

/// The durable outbox over its own redb file. `Send + Sync`; share it with `Arc`. Operations are
/// serialized internally; [`stats`](Self::stats) never waits for a write.
pub struct Outbox {
    path: PathBuf,
    limits: Limits,
    opener: Opener,
    inner: Mutex<Inner>,
    stats: Mutex<Stats>,
}

impl std::fmt::Debug for Outbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Outbox")
            .field("path", &self.path)
            .field("limits", &self.limits)
            .finish_non_exhaustive()
    }
}

struct Inner {
    /// `None` after a failed write: reopened at the start of the next operation.
    db: Option<Database>,
    summary: Summary,
    next_seq: u64,
    appended_total: u64,
    acked_total: u64,
    dropped: Drops,
    file_bytes: u64,
    compactions_total: u64,
}

/// What a successful load found.
struct Loaded {
    db: Database,
    summary: Summary,
    next_seq: u64,
    quarantined_records: Vec<u64>,
}

enum LoadFailure {
    Corrupt(String),
    Other(OpenError),
}

impl Outbox {
    /// Opens (or creates) the outbox file at `path`; see the module doc for what happens to a
    /// damaged file.
    pub fn open(path: &Path, limits: Limits) -> Result<(Outbox, OpenReport), OpenError> {
        Self::open_with(path, limits, edgetwin_redbfile::file_opener(path))
    }

    /// [`open`](Self::open) with a custom way to open the database (tests inject failing backends,
    /// see `edgetwin_redbfile::faults`).
    pub fn open_with(
        path: &Path,
        limits: Limits,
        opener: Opener,
    ) -> Result<(Outbox, OpenReport), OpenError> {
        let (loaded, quarantined_file) = match load(path, &opener) {
            Ok(loaded) => (loaded, None),
            Err(LoadFailure::Other(e)) => return Err(e),
            Err(LoadFailure::Corrupt(reason)) => {
                let renamed_to =
                    edgetwin_redbfile::move_aside(path).map_err(|e| OpenError::Rename {
                        path: path.to_path_buf(),
                        renamed_to: e.to,
                        reason: reason.clone(),
                        source: e.source,
                    })?;
                let (salvaged, next_seq) = salvage(&renamed_to);
                // The live records are contiguous from the oldest unacked one up to next_seq:
                // every sequence number in that range that did not come back is lost.
                let lost_at_least = match salvaged.first() {
                    Some((lo, _)) => {
                        let hi = salvaged.last().map_or(*lo, |(s, _)| *s);
                        let end = next_seq.unwrap_or(hi + 1).max(hi + 1);
                        (end - lo).saturating_sub(salvaged.len() as u64)
                    }
                    None => 0,
                };
                tracing::error!(
                    path = %path.display(),
                    renamed_to = %renamed_to.display(),
                    %reason,
                    salvaged = salvaged.len(),
                    lost_at_least,
                    "outbox file is corrupt; moved aside, the records that still read are kept"
                );
                let reload = || match load(path, &opener) {
                    Ok(loaded) => Ok(loaded),
                    Err(LoadFailure::Other(e)) => Err(e),
                    Err(LoadFailure::Corrupt(reason)) => Err(OpenError::Db {
                        path: path.to_path_buf(),
                        source: DbError::Storage(redb::StorageError::Corrupted(reason)),
                    }),
                };
                let mut loaded = reload()?;
                if !salvaged.is_empty() {
                    restore_records(&loaded.db, &salvaged).map_err(|source| OpenError::Db {
                        path: path.to_path_buf(),
                        source,
                    })?;
                    drop(loaded);
                    loaded = reload()?;
                }
                let file = QuarantinedFile {
                    renamed_to,
                    reason,
                    salvaged: salvaged.len() as u64,
                    lost_at_least,
                };
                (loaded, Some(file))
            }
        };
        let report = OpenReport {
            records: loaded.summary.records,
            bytes: loaded.summary.bytes,
            next_seq: loaded.next_seq,
            quarantined_file,
            quarantined_records: loaded.quarantined_records,
        };
        let inner = Inner {
            db: Some(loaded.db),
            summary: loaded.summary,
            next_seq: loaded.next_seq,
            appended_total: 0,
            acked_total: 0,
            dropped: Drops::default(),
            file_bytes: file_len(path),
            compactions_total: 0,
        };
        let outbox = Outbox {
            path: path.to_path_buf(),
            limits,
            opener,
            stats: Mutex::new(snapshot(&inner)),
            inner: Mutex::new(inner),
        };
        Ok((outbox, report))
    }

    /// Appends `batch` in **one** durable write transaction (group commit), applying the
    /// [`Limits`] record by record at `now_ms`. On error nothing of the batch is stored.
    pub fn append(&self, batch: Vec<NewRecord>, now_ms: i64) -> Result<AppendReport, AppendError> {
        let mut encoded = Vec::with_capacity(batch.len());
        for (index, record) in batch.iter().enumerate() {
            encoded.push(encode(record).map_err(|reason| AppendError::Invalid {
                path: self.path.clone(),
                index,
                reason,
            })?);
        }
        if batch.is_empty() {
            return Ok(AppendReport::default());
        }
        let mut inner = self.lock();
        let result = self.append_locked(&mut inner, &batch, &encoded, now_ms);
        self.finish(&mut inner, result)
            .map_err(|source| AppendError::Db {
                path: self.path.clone(),
                source,
            })
    }

    fn append_locked(
        &self,
        inner: &mut Inner,
        batch: &[NewRecord],
        encoded: &[Vec<u8>],
        now_ms: i64,
    ) -> Result<AppendReport, DbError> {
        self.ensure_db(inner)?;
        let Some(db) = inner.db.as_ref() else {
            return Err(DbError::Storage(redb::StorageError::DatabaseClosed));
        };
        let mut summary = inner.summary;
        let mut next_seq = inner.next_seq;
        let mut report = AppendReport {
            seqs: Vec::with_capacity(batch.len()),
            dropped: Drops::default(),
        };
        let txn = db.begin_write()?;
        {
            let mut table = txn.open_table(RECORDS)?;
            for (record, bytes) in batch.iter().zip(encoded) {
                let incoming = Entry {
                    bytes: bytes.len() as u64,
                    ts_ms: record.ts_ms,
                };
                loop {
                    match self.limits.next_step(&summary, incoming, now_ms) {
                        Step::Evict(reason) => {
                            let len = match table.pop_first()? {
                                Some((_, v)) => v.value().len() as u64,
                                None => {
                                    // The summary said otherwise; trust the table.
                                    summary = Summary::default();
                                    continue;
                                }
                            };
                            report.dropped.add(reason, len);
                            summary.records = summary.records.saturating_sub(1);
                            summary.bytes = summary.bytes.saturating_sub(len);
                            summary.oldest = oldest(&table)?;
                        }
                        Step::Accept => {
                            table.insert(next_seq, bytes.as_slice())?;
                            report.seqs.push(Some(next_seq));
                            next_seq = next_seq.saturating_add(1);
                            summary.records += 1;
                            summary.bytes += incoming.bytes;
                            summary.oldest = summary.oldest.or(Some(incoming));
                            break;
                        }
                        Step::Reject(reason) => {
                            report.dropped.add(reason, incoming.bytes);
                            report.seqs.push(None);
                            break;
                        }
                    }
                }
            }
            let mut meta = txn.open_table(META)?;
            meta.insert(META_NEXT_SEQ, next_seq)?;
        }
        txn.commit()?;
        let stored = report.seqs.iter().filter(|s| s.is_some()).count() as u64;
        inner.summary = summary;
        inner.next_seq = next_seq;
        inner.appended_total = inner.appended_total.saturating_add(stored);
        inner.dropped.merge(&report.dropped);
        log_drops(&self.path, "append", &report.dropped);
        Ok(report)
    }

    /// Up to `max` records with a sequence number above `after_seq` (all if `None`), oldest
    /// first. Records met on the way that are older than `max_age_ms` at `now_ms` are removed
    /// (one durable transaction) and counted as dropped (`age_limit`) instead of returned.
    pub fn peek(
        &self,
        after_seq: Option<u64>,
        max: usize,
        now_ms: i64,
    ) -> Result<Vec<Record>, PeekError> {
        let start = match after_seq {
            None => 0,
            Some(u64::MAX) => return Ok(Vec::new()),
            Some(s) => s + 1,
        };
        if max == 0 {
            return Ok(Vec::new());
        }
        let mut inner = self.lock();
        let result = self.peek_locked(&mut inner, start, max, now_ms);
        let result = match result {
            Ok(Ok(records)) => Ok(records),
            Ok(Err((seq, reason))) => {
                return Err(PeekError::Decode {
                    path: self.path.clone(),
                    seq,
                    reason,
                })
            }
            Err(e) => Err(e),
        };
        self.finish(&mut inner, result)
            .map_err(|source| PeekError::Db {
                path: self.path.clone(),
                source,
            })
    }

    #[allow(clippy::type_complexity)]
    fn peek_locked(
        &self,
        inner: &mut Inner,
        start: u64,
        max: usize,
        now_ms: i64,
    ) -> Result<Result<Vec<Record>, (u64, String)>, DbError> {
        self.ensure_db(inner)?;
        let Some(db) = inner.db.as_ref() else {
            return Err(DbError::Storage(redb::StorageError::DatabaseClosed));
        };
        let mut records = Vec::new();
        let mut expired = Vec::new();
        {
            let txn = db.begin_read()?;
            let table = txn.open_table(RECORDS)?;
            for item in table.range(start..)? {
                let (k, v) = item?;
                let seq = k.value();
                let bytes = v.value();
                let ts_ms = match header_ts(bytes) {
                    Ok(ts) => ts,
                    Err(reason) => return Ok(Err((seq, reason))),
                };
                if self.limits.is_expired(ts_ms, now_ms) {
                    expired.push(seq);
                    continue;
                }
                match decode(seq, bytes) {
                    Ok(r) => records.push(r),
                    Err(reason) => return Ok(Err((seq, reason))),
                }
                if records.len() >= max {
                    break;
                }
            }
        }
        if !expired.is_empty() {
            let mut summary = inner.summary;
            let mut dropped = Drops::default();
            let txn = db.begin_write()?;
            {
                let mut table = txn.open_table(RECORDS)?;
                for seq in expired {
                    if let Some(v) = table.remove(seq)? {
                        let len = v.value().len() as u64;
                        dropped.add(DropReason::AgeLimit, len);
                        summary.records = summary.records.saturating_sub(1);
                        summary.bytes = summary.bytes.saturating_sub(len);
                    }
                }
                summary.oldest = oldest(&table)?;
            }
            txn.commit()?;
            inner.summary = summary;
            inner.dropped.merge(&dropped);
            log_drops(&self.path, "peek", &dropped);
        }
        Ok(Ok(records))
    }

    /// Removes the records with these sequence numbers in one durable transaction. Order does not
    /// matter; unknown numbers (already acked, dropped, never assigned) are ignored.
    pub fn ack(&self, seqs: &[u64]) -> Result<AckReport, AckError> {
        self.ack_with(seqs, AckDurability::Immediate)
    }

    /// [`Outbox::ack`], committed as `durability` says.
    pub fn ack_with(&self, seqs: &[u64], durability: AckDurability) -> Result<AckReport, AckError> {
        if seqs.is_empty() {
            return Ok(AckReport::default());
        }
        let mut inner = self.lock();
        let result = self.ack_locked(&mut inner, seqs, durability);
        let report = self
            .finish(&mut inner, result)
            .map_err(|source| AckError::Db {
                path: self.path.clone(),
                source,
            })?;
        if report.removed > 0
            && inner.file_bytes >= AUTO_COMPACT_MIN_FILE_BYTES
            && inner.file_bytes / AUTO_COMPACT_RATIO > inner.summary.bytes
        {
            let before = inner.file_bytes;
            let result = self.compact_locked(&mut inner);
            // The ack is committed whatever happens here; a failed compaction is only logged.
            match self.finish(&mut inner, result) {
                Ok(()) => tracing::info!(
                    path = %self.path.display(),
                    file_bytes_before = before,
                    file_bytes_after = inner.file_bytes,
                    live_bytes = inner.summary.bytes,
                    "outbox file compacted"
                ),
                Err(error) => tracing::warn!(
                    path = %self.path.display(),
                    %error,
                    "outbox compaction failed; the file keeps its size"
                ),
            }
        }
        Ok(report)
    }

    /// Makes every deferred ack durable (one fsynced, empty commit).
    pub fn sync(&self) -> Result<(), AckError> {
        let mut inner = self.lock();
        let result = (|| {
            self.ensure_db(&mut inner)?;
            let Some(db) = inner.db.as_ref() else {
                return Err(DbError::Storage(redb::StorageError::DatabaseClosed));
            };
            db.begin_write()?.commit()?;
            Ok(())
        })();
        self.finish(&mut inner, result)
            .map_err(|source| AckError::Db {
                path: self.path.clone(),
                source,
            })
    }

    fn ack_locked(
        &self,
        inner: &mut Inner,
        seqs: &[u64],
        durability: AckDurability,
    ) -> Result<AckReport, DbError> {
        self.ensure_db(inner)?;
        let Some(db) = inner.db.as_ref() else {
            return Err(DbError::Storage(redb::StorageError::DatabaseClosed));
        };
        let mut report = AckReport::default();
        let mut summary = inner.summary;
        let mut txn = db.begin_write()?;
        if durability == AckDurability::Deferred {
            txn.set_durability(redb::Durability::None)?;
        }
        {
            let mut table = txn.open_table(RECORDS)?;
            for &seq in seqs {
                match table.remove(seq)? {
                    Some(v) => {
                        let len = v.value().len() as u64;
                        report.removed += 1;
                        report.bytes += len;
                    }
                    None => report.unknown += 1,
                }
            }
            if report.removed > 0 {
                summary.records = summary.records.saturating_sub(report.removed);
                summary.bytes = summary.bytes.saturating_sub(report.bytes);
                summary.oldest = oldest(&table)?;
            }
        }
        if report.removed == 0 {
            txn.abort()?;
            return Ok(report);
        }
        txn.commit()?;
        inner.summary = summary;
        inner.acked_total = inner.acked_total.saturating_add(report.removed);
        Ok(report)
    }

    /// Rewrites the file to its minimum size (see the module doc for when to call it).
    pub fn compact(&self) -> Result<CompactReport, CompactError> {
        let mut inner = self.lock();
        let file_bytes_before = file_len(&self.path);
        let result = self.compact_locked(&mut inner);
        self.finish(&mut inner, result)
            .map_err(|source| CompactError::Db {
                path: self.path.clone(),
                source,
            })?;
        Ok(CompactReport {
            file_bytes_before,
            file_bytes_after: file_len(&self.path),
        })
    }

    fn compact_locked(&self, inner: &mut Inner) -> Result<(), DbError> {
        self.ensure_db(inner)?;
        if let Some(db) = inner.db.as_mut() {
            // Each call compacts one step; stop when redb says there is nothing left.
            for _ in 0..64 {
                if !db.compact()? {
                    break;
                }
            }
            inner.compactions_total = inner.compactions_total.saturating_add(1);
        }
        Ok(())
    }

    /// A snapshot of gauges and counters (never waits for a write in progress).
    pub fn stats(&self) -> Stats {
        self.stats
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Reopens the file if a failure closed it and writes one tiny record (`meta.probe`), to find
    /// out whether appends would succeed again (space freed). Call it only after a failure: it
    /// writes to flash.
    pub fn probe(&self, now_ms: i64) -> Result<(), AppendError> {
        let mut inner = self.lock();
        let result = (|| {
            self.ensure_db(&mut inner)?;
            let Some(db) = inner.db.as_ref() else {
                return Err(DbError::Storage(redb::StorageError::DatabaseClosed));
            };
            let txn = db.begin_write()?;
            {
                let mut meta = txn.open_table(META)?;
                meta.insert(META_PROBE, u64::try_from(now_ms).unwrap_or(0))?;
            }
            txn.commit()?;
            Ok(())
        })();
        self.finish(&mut inner, result)
            .map_err(|source| AppendError::Db {
                path: self.path.clone(),
                source,
            })
    }

    /// The outbox file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The limits this outbox applies.
    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Publishes the stats after an operation; after a failure closes the database so that the
    /// next operation reopens it (redb refuses everything after an I/O error).
    fn finish<T>(&self, inner: &mut Inner, result: Result<T, DbError>) -> Result<T, DbError> {
        if let Err(e) = &result {
            tracing::error!(path = %self.path.display(), error = %e, "outbox operation failed; the file will be reopened");
            inner.db = None;
        }
        inner.file_bytes = file_len(&self.path);
        *self.stats.lock().unwrap_or_else(PoisonError::into_inner) = snapshot(inner);
        result
    }

    /// Reopens the database after a failure; the gauges are reloaded from the file.
    fn ensure_db(&self, inner: &mut Inner) -> Result<(), DbError> {
        if inner.db.is_some() {
            return Ok(());
        }
        let loaded = match load(&self.path, &self.opener) {
            Ok(loaded) => loaded,
            Err(LoadFailure::Corrupt(reason)) => {
                return Err(DbError::Storage(redb::StorageError::Corrupted(reason)))
            }
            Err(LoadFailure::Other(OpenError::Db { source, .. })) => return Err(source),
            Err(LoadFailure::Other(e)) => {
                return Err(DbError::Storage(redb::StorageError::Corrupted(
                    e.to_string(),
                )))
            }
        };
        tracing::info!(path = %self.path.display(), records = loaded.summary.records, "outbox file reopened");
        inner.db = Some(loaded.db);
        inner.summary = loaded.summary;
        inner.next_seq = inner.next_seq.max(loaded.next_seq);
        Ok(())
    }
}

/// Every record of a damaged file that still reads and decodes, by sequence number, and its
/// `next_seq` if that still reads.
fn salvage(damaged: &Path) -> (Vec<(u64, Vec<u8>)>, Option<u64>) {
    enum Found {
        Record(u64, Vec<u8>),
        NextSeq(u64),
    }
    let found = edgetwin_redbfile::salvage(damaged, |db, out| {
        let Ok(txn) = db.begin_read() else { return };
        if let Ok(Some(n)) = txn
            .open_table(META)
            .and_then(|m| Ok(m.get(META_NEXT_SEQ)?.map(|v| v.value())))
        {
            out.push(Found::NextSeq(n));
        }
        let Ok(table) = txn.open_table(RECORDS) else {
            return;
        };
        let Ok(iter) = table.iter() else { return };
        for item in iter {
            let Ok((k, v)) = item else { break };
            if decode(k.value(), v.value()).is_ok() {
                out.push(Found::Record(k.value(), v.value().to_vec()));
            }
        }
    });
    let mut records = Vec::new();
    let mut next_seq = None;
    for f in found {
        match f {
            Found::Record(seq, bytes) => records.push((seq, bytes)),
            Found::NextSeq(n) => next_seq = Some(n),
        }
    }
    records.sort_by_key(|(seq, _)| *seq);
    (records, next_seq)
}

/// Writes salvaged records into a fresh file under their own sequence numbers, in one
/// transaction, and moves `next_seq` past them.
fn restore_records(db: &Database, records: &[(u64, Vec<u8>)]) -> Result<(), DbError> {
    let txn = db.begin_write()?;
    {
        let mut table = txn.open_table(RECORDS)?;
        for (seq, bytes) in records {
            table.insert(*seq, bytes.as_slice())?;
        }
        let mut meta = txn.open_table(META)?;
        if let Some((last, _)) = records.last() {
            meta.insert(META_NEXT_SEQ, last + 1)?;
        }
    }
    txn.commit()?;
    Ok(())
}

/// Opens the database (full integrity check), validates every record header, moves undecodable
/// records to `quarantine`, and makes sure the tables and the format marker exist.
fn load(path: &Path, opener: &Opener) -> Result<Loaded, LoadFailure> {
    let other = |source: DbError| {
        LoadFailure::Other(OpenError::Db {
            path: path.to_path_buf(),
            source,
        })
    };
    let storage = |source: redb::StorageError| match source {
        redb::StorageError::Corrupted(reason) => LoadFailure::Corrupt(reason),
        source => other(DbError::Storage(source)),
    };
    let mut builder = Database::builder();
    builder
        .set_check_integrity_on_open(true)
        .set_cache_size(edgetwin_redbfile::CACHE_BYTES);
    let db = match opener(&builder) {
        Ok(db) => db,
        Err(e) if edgetwin_redbfile::is_corruption(&e) => {
            return Err(LoadFailure::Corrupt(e.to_string()))
        }
        Err(e) => return Err(other(DbError::Open(e))),
    };
    let txn = db.begin_write().map_err(|e| other(e.into()))?;
    let mut summary = Summary::default();
    let mut quarantined_records = Vec::new();
    let mut changed = false;
    let next_seq;
    {
        let mut meta = txn.open_table(META).map_err(|e| other(e.into()))?;
        let mut records = txn.open_table(RECORDS).map_err(|e| other(e.into()))?;
        let mut quarantine = txn.open_table(QUARANTINE).map_err(|e| other(e.into()))?;
        let format = meta.get(META_FORMAT).map_err(storage)?.map(|v| v.value());
        match format {
            Some(FORMAT) => {}
            Some(found) => {
                return Err(LoadFailure::Other(OpenError::Format {
                    path: path.to_path_buf(),
                    found,
                }))
            }
            None => {
                meta.insert(META_FORMAT, FORMAT).map_err(storage)?;
                changed = true;
            }
        }
        let stored_next = meta
            .get(META_NEXT_SEQ)
            .map_err(storage)?
            .map_or(0, |v| v.value());
        let mut bad: Vec<(u64, Vec<u8>, String)> = Vec::new();
        let mut last_seq = None;
        for item in records.iter().map_err(storage)? {
            let (k, v) = item.map_err(storage)?;
            let (seq, bytes) = (k.value(), v.value());
            last_seq = Some(seq);
            match validate(bytes) {
                Ok(ts_ms) => {
                    let len = bytes.len() as u64;
                    summary.records += 1;
                    summary.bytes += len;
                    summary.oldest = summary.oldest.or(Some(Entry { bytes: len, ts_ms }));
                }
                Err(reason) => bad.push((seq, bytes.to_vec(), reason)),
            }
        }
        next_seq = stored_next.max(last_seq.map_or(0, |s| s.saturating_add(1)));
        for (seq, bytes, error) in bad {
            quarantine.insert(seq, bytes.as_slice()).map_err(storage)?;
            records.remove(seq).map_err(storage)?;
            tracing::error!(
                path = %path.display(),
                seq,
                %error,
                "outbox record does not decode; moved to the quarantine table"
            );
            quarantined_records.push(seq);
        }
        if !quarantined_records.is_empty() {
            // The oldest may have been quarantined.
            summary.oldest = oldest(&records).map_err(other)?;
        }
        if next_seq != stored_next {
            meta.insert(META_NEXT_SEQ, next_seq).map_err(storage)?;
        }
        changed |= next_seq != stored_next || !quarantined_records.is_empty();
    }
    // A clean reopen writes nothing (so it works on a full disk).
    if changed {
        txn.commit().map_err(|e| other(e.into()))?;
    } else {
        txn.abort().map_err(|e| other(DbError::Storage(e)))?;
    }
    Ok(Loaded {
        db,
        summary,
        next_seq,
        quarantined_records,
    })
}

/// The oldest record of the table as the policy sees it.
fn oldest(table: &impl ReadableTable<u64, &'static [u8]>) -> Result<Option<Entry>, DbError> {
    let Some((k, v)) = table.first()? else {
        return Ok(None);
    };
    let bytes = v.value();
    let ts_ms = header_ts(bytes).map_err(|reason| {
        DbError::Storage(redb::StorageError::Corrupted(format!(
            "record {}: {reason}",
            k.value()
        )))
    })?;
    Ok(Some(Entry {
        bytes: bytes.len() as u64,
        ts_ms,
    }))
}

fn snapshot(inner: &Inner) -> Stats {
    Stats {
        records: inner.summary.records,
        bytes: inner.summary.bytes,
        oldest_ts_ms: inner.summary.oldest.map(|e| e.ts_ms),
        next_seq: inner.next_seq,
        file_bytes: inner.file_bytes,
        appended_total: inner.appended_total,
        acked_total: inner.acked_total,
        dropped: inner.dropped,
        compactions_total: inner.compactions_total,
    }
}

fn log_drops(path: &Path, during: &str, dropped: &Drops) {
    for (reason, count) in dropped.iter() {
        if count.records > 0 {
            tracing::warn!(
                path = %path.display(),
                during,
                reason = reason.as_str(),
                records = count.records,
                bytes = count.bytes,
                "outbox dropped records"
            );
        }
    }
}

// ---- the record encoding (see the module doc) ----

fn encode(r: &NewRecord) -> Result<Vec<u8>, String> {
    if r.qos > 2 {
        return Err(format!("qos {} is not 0, 1 or 2", r.qos));
    }
    let key_len = u16::try_from(r.key.len())
        .map_err(|_| format!("ordering key is {} bytes (max 65535)", r.key.len()))?;
    let topic_len = u16::try_from(r.topic.len())
        .map_err(|_| format!("topic is {} bytes (max 65535)", r.topic.len()))?;
    let mut out = Vec::with_capacity(HEADER_LEN + r.key.len() + r.topic.len() + r.payload.len());
    out.push(RECORD_FORMAT);
    out.extend_from_slice(&r.ts_ms.to_le_bytes());
    out.push(r.qos);
    out.push(u8::from(r.retain));
    out.extend_from_slice(&key_len.to_le_bytes());
    out.extend_from_slice(&topic_len.to_le_bytes());
    out.extend_from_slice(r.key.as_bytes());
    out.extend_from_slice(r.topic.as_bytes());
    out.extend_from_slice(&r.payload);
    Ok(out)
}

struct Header {
    ts_ms: i64,
    qos: u8,
    retain: bool,
    key_len: usize,
    topic_len: usize,
}

fn header(bytes: &[u8]) -> Result<Header, String> {
    let Some(h) = bytes.get(..HEADER_LEN) else {
        return Err(format!(
            "{} bytes, shorter than the {HEADER_LEN}-byte header",
            bytes.len()
        ));
    };
    if h[0] != RECORD_FORMAT {
        return Err(format!(
            "unsupported record format {} (this build reads {RECORD_FORMAT})",
            h[0]
        ));
    }
    let mut ts = [0u8; 8];
    ts.copy_from_slice(&h[1..9]);
    let qos = h[9];
    if qos > 2 {
        return Err(format!("qos {qos} is not 0, 1 or 2"));
    }
    let flags = h[10];
    if flags & !1 != 0 {
        return Err(format!("unknown flags {flags:#04x}"));
    }
    let key_len = usize::from(u16::from_le_bytes([h[11], h[12]]));
    let topic_len = usize::from(u16::from_le_bytes([h[13], h[14]]));
    if HEADER_LEN + key_len + topic_len > bytes.len() {
        return Err(format!(
            "key ({key_len}) and topic ({topic_len}) lengths overrun the {}-byte record",
            bytes.len()
        ));
    }
    Ok(Header {
        ts_ms: i64::from_le_bytes(ts),
        qos,
        retain: flags & 1 == 1,
        key_len,
        topic_len,
    })
}

fn header_ts(bytes: &[u8]) -> Result<i64, String> {
    header(bytes).map(|h| h.ts_ms)
}

/// Checks a whole record without copying it; returns its timestamp.
fn validate(bytes: &[u8]) -> Result<i64, String> {
    let h = header(bytes)?;
    let key = &bytes[HEADER_LEN..HEADER_LEN + h.key_len];
    let topic = &bytes[HEADER_LEN + h.key_len..HEADER_LEN + h.key_len + h.topic_len];
    std::str::from_utf8(key).map_err(|e| format!("ordering key is not UTF-8: {e}"))?;
    std::str::from_utf8(topic).map_err(|e| format!("topic is not UTF-8: {e}"))?;
    Ok(h.ts_ms)
}

fn decode(seq: u64, bytes: &[u8]) -> Result<Record, String> {
    let h = header(bytes)?;
    let key_end = HEADER_LEN + h.key_len;
    let topic_end = key_end + h.topic_len;
    let key = std::str::from_utf8(&bytes[HEADER_LEN..key_end])
        .map_err(|e| format!("ordering key is not UTF-8: {e}"))?;
    let topic = std::str::from_utf8(&bytes[key_end..topic_end])
        .map_err(|e| format!("topic is not UTF-8: {e}"))?;
    Ok(Record {
        seq,
        ts_ms: h.ts_ms,
        topic: topic.to_owned(),
        payload: bytes[topic_end..].to_vec(),
        qos: h.qos,
        retain: h.retain,
        key: key.to_owned(),
    })
}

fn file_len(path: &Path) -> u64 {
    std::fs::metadata(path).map_or(0, |m| m.len())
}

#[cfg(test)]
mod tests;
