//! The durable twin store: one redb file holding every twin of the node.
//!
//! The API is synchronous (redb is); the daemon runs it on a blocking thread. [`TwinStore::commit`]
//! writes a whole batch of twins in **one** write transaction (group commit) with redb's default
//! `Durability::Immediate`: when it returns, the batch is on disk (fsynced) and survives `kill -9`
//! and power loss. A batch whose commit fails is not on disk at all.
//!
//! # On-disk format (private to this module)
//!
//! redb file (the daemon uses `{data_dir}/twins.redb`), two tables, both `&[u8] -> &[u8]`:
//!
//! - `twins`: key = device id (UTF-8), value = one UTF-8 JSON object, format version 1:
//!   ```json
//!   {"format":1,"device":"meter-7","model":"power-meter","version":3,"desiredVersion":2,
//!    "desired":{"setpoint":{"value":21.5,"version":2,"ts":1700000000000,"source":"local"},
//!               "mode":{"value":null,"version":1,"ts":1700000000001,"source":"cloud"}},
//!    "reported":{"voltage":{"value":230.1,"version":3,"ts":1700000000002,"source":"mapper:modbus"}},
//!    "status":{"state":"online","ts":1700000000003,"lastSeen":1700000000004,"message":null}}
//!   ```
//!   `"value":null` is a tombstone (a removed property, kept for last-writer-wins; a property
//!   value is never JSON null). `state` is one of `unknown|online|offline|error`; `source` is a
//!   source id (`local`, `cloud`, `mapper:{protocol}`). A reader rejects any other `format`.
//! - `quarantine`: key = `{device key}@{unix ms}` (UTF-8), value = the exact bytes of a `twins`
//!   record that failed to decode when the store was opened. Nothing in it is ever read back by
//!   edgetwin; it is kept for an operator to inspect (and can be cleared by deleting the file's
//!   table with any redb tool).
//!
//! # Damage handling (never silently delete anything)
//!
//! - A record that fails to decode is moved (in one transaction) from `twins` to `quarantine`,
//!   reported in the `Vec<Quarantined>` returned by [`TwinStore::open`] and logged; the other
//!   twins load normally.
//! - A file that redb reports as corrupt or as not a redb database (the open runs redb's full
//!   integrity check) is renamed to `{file name}.corrupt-{unix ms}` beside it, logged, and
//!   reported as [`QuarantineKind::File`]. The new file is filled from what can still be read:
//!   every twin record of the damaged file that decodes (salvage), and, for every other device,
//!   the last snapshot (below); per device the higher `version` wins. What the restore found is in
//!   [`RestoreReport`]. Any other open error (permissions, file locked by another process, I/O) is
//!   returned as a [`StoreError`] and nothing is touched.
//!
//! # Snapshots (`{file name}.snapshot`)
//!
//! [`TwinStore::snapshot`] writes every twin, as of one read transaction, to a text file beside
//! the store: line 1 is `{"format":1,"takenAt":ms,"twins":n}`, then one twin record (the JSON
//! above) per line; every line is prefixed by its CRC-32C in 8 hex digits and a space, so a
//! damaged line costs only its own twin. It is written to a temporary file, fsynced and renamed,
//! so a crash leaves the previous snapshot whole. The daemon takes one at open, periodically
//! while twins change, and at shutdown. The loss window of a damaged file is therefore: changes
//! committed after the last snapshot, to devices whose records cannot be salvaged.
//!
//! # After an I/O error (full disk)
//!
//! redb refuses every operation after an I/O error until the database is closed and opened
//! again. The store does that itself: a failed write closes the database, the next write (or
//! [`TwinStore::probe`]) reopens it. [`TwinStore::health`] says whether the last write
//! succeeded, so readiness can tell the truth while the disk is full; freeing space recovers
//! without a restart. The `health` table holds one key, `probe`, written only by a probe after a
//! failure (never periodically, to spare flash).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use edgetwin_contract::{
    DeviceId, DeviceState, ErrorCode, PropertyError, PropertyOp, Source, TwinStatus,
};
use edgetwin_redbfile::Opener;
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::core::{canonicalize, Entry, Twin};

mod snapshot;
pub use snapshot::{snapshot_path, SnapshotStats};

const TWINS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("twins");
const QUARANTINE: TableDefinition<&[u8], &[u8]> = TableDefinition::new("quarantine");
const HEALTH: TableDefinition<&str, i64> = TableDefinition::new("health");
const FORMAT: u32 = 1;

/// A store failure; every message starts with `twin store {path}:`.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The file could not be opened or created.
    #[error("twin store {}: cannot open: {source}", path.display())]
    Open {
        /// The store file.
        path: PathBuf,
        /// redb's reason.
        source: redb::DatabaseError,
    },
    /// A transaction could not be started.
    #[error("twin store {}: cannot begin a transaction: {source}", path.display())]
    Transaction {
        /// The store file.
        path: PathBuf,
        /// redb's reason.
        source: redb::TransactionError,
    },
    /// A table could not be opened.
    #[error("twin store {}: cannot open a table: {source}", path.display())]
    Table {
        /// The store file.
        path: PathBuf,
        /// redb's reason.
        source: redb::TableError,
    },
    /// Reading or writing a record failed.
    #[error("twin store {}: storage error: {source}", path.display())]
    Storage {
        /// The store file.
        path: PathBuf,
        /// redb's reason.
        source: redb::StorageError,
    },
    /// The commit failed; nothing of the batch is stored.
    #[error("twin store {}: commit failed: {source}", path.display())]
    Commit {
        /// The store file.
        path: PathBuf,
        /// redb's reason.
        source: redb::CommitError,
    },
    /// A twin could not be encoded.
    #[error("twin store {}: cannot encode twin {device}: {source}", path.display())]
    Encode {
        /// The store file.
        path: PathBuf,
        /// The twin's device.
        device: String,
        /// serde_json's reason.
        source: serde_json::Error,
    },
    /// The snapshot file could not be written.
    #[error("twin store {}: cannot write the snapshot {}: {source}", path.display(), snapshot.display())]
    Snapshot {
        /// The store file.
        path: PathBuf,
        /// The snapshot file.
        snapshot: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A corrupt file could not be moved aside.
    #[error("twin store {}: file is corrupt ({reason}) and cannot be renamed to {}: {source}", path.display(), renamed_to.display())]
    Rename {
        /// The store file.
        path: PathBuf,
        /// Where it should have gone.
        renamed_to: PathBuf,
        /// Why it is considered corrupt.
        reason: String,
        /// The rename error.
        source: std::io::Error,
    },
}

/// Where damaged data went.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum QuarantineKind {
    /// One record, moved to the `quarantine` table under this key.
    Record {
        /// Key in the `quarantine` table.
        quarantine_key: String,
    },
    /// The whole file, renamed; the new file holds what could be restored.
    File {
        /// The new name of the corrupt file.
        renamed_to: PathBuf,
        /// What the new file was filled from.
        restore: RestoreReport,
    },
}

/// What a damaged store file was restored from.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RestoreReport {
    /// Twins read back from the damaged file itself (newest state).
    pub salvaged: usize,
    /// Twins taken from the snapshot because the damaged file had no readable (or no newer)
    /// record of them; changes to these after the snapshot are lost.
    pub from_snapshot: usize,
    /// When the snapshot used was taken (`None`: there was no readable snapshot).
    pub snapshot_taken_at_ms: Option<i64>,
    /// Snapshot lines that failed their checksum or did not decode (each is one twin lost).
    pub snapshot_damaged_lines: usize,
}

/// Whether the store can write right now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Health {
    /// The last write succeeded (or none was tried since open).
    Ok,
    /// The last write failed; every write fails until the cause is gone (e.g. space freed) and a
    /// write or [`TwinStore::probe`] succeeds.
    Failing {
        /// The last error, with the file's path.
        error: String,
        /// When the store started failing (unix ms).
        since_ms: i64,
    },
}

/// Something that failed to load and was set aside, not deleted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Quarantined {
    /// The device key of the record (lossy UTF-8), or the file path for a whole file.
    pub key: String,
    /// Why it failed to load.
    pub error: String,
    /// Where it went.
    pub kind: QuarantineKind,
}

/// What one group commit wrote.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CommitStats {
    /// Twins written.
    pub twins: usize,
    /// Encoded bytes written (values only).
    pub bytes: usize,
}

/// The redb twin store. `Send + Sync`; share it with `Arc`.
pub struct TwinStore {
    /// `None` after a failed write: reopened by the next write or probe.
    db: Mutex<Option<Arc<Database>>>,
    opener: Opener,
    path: PathBuf,
    write_txns: AtomicU64,
    health: Mutex<Health>,
}

impl std::fmt::Debug for TwinStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TwinStore")
            .field("path", &self.path)
            .field("health", &self.health())
            .finish_non_exhaustive()
    }
}

enum OpenFailure {
    Corrupt(String),
    Other(StoreError),
}

impl TwinStore {
    /// Opens (or creates) the store at `path` and loads every twin; see the module doc for what
    /// happens to damaged records and files.
    pub fn open(path: &Path) -> Result<(TwinStore, Vec<Twin>, Vec<Quarantined>), StoreError> {
        Self::open_with(path, edgetwin_redbfile::file_opener(path))
    }

    /// [`open`](Self::open) through a custom opener (tests use a failing backend, see
    /// `edgetwin_redbfile::faults`).
    pub fn open_with(
        path: &Path,
        opener: Opener,
    ) -> Result<(TwinStore, Vec<Twin>, Vec<Quarantined>), StoreError> {
        match Self::open_and_load(path, &opener) {
            Ok(loaded) => Ok(loaded),
            Err(OpenFailure::Other(e)) => Err(e),
            Err(OpenFailure::Corrupt(reason)) => {
                let renamed_to =
                    edgetwin_redbfile::move_aside(path).map_err(|e| StoreError::Rename {
                        path: path.to_path_buf(),
                        renamed_to: e.to,
                        reason: reason.clone(),
                        source: e.source,
                    })?;
                let (restored, restore) = restore_from(&renamed_to, &snapshot_path(path));
                tracing::error!(
                    path = %path.display(),
                    renamed_to = %renamed_to.display(),
                    %reason,
                    salvaged = restore.salvaged,
                    from_snapshot = restore.from_snapshot,
                    snapshot_taken_at_ms = ?restore.snapshot_taken_at_ms,
                    snapshot_damaged_lines = restore.snapshot_damaged_lines,
                    "twin store file is corrupt; moved aside, restored what could be read"
                );
                let (store, _, mut quarantined) = match Self::open_and_load(path, &opener) {
                    Ok(loaded) => loaded,
                    Err(OpenFailure::Other(e)) => return Err(e),
                    Err(OpenFailure::Corrupt(reason)) => {
                        return Err(StoreError::Storage {
                            path: path.to_path_buf(),
                            source: redb::StorageError::Corrupted(reason),
                        })
                    }
                };
                let refs: Vec<&Twin> = restored.iter().collect();
                store.commit(&refs)?;
                // The restored state is the new restore point.
                if let Err(e) = store.snapshot() {
                    tracing::warn!(error = %e, "cannot snapshot the restored twin store");
                }
                quarantined.insert(
                    0,
                    Quarantined {
                        key: path.display().to_string(),
                        error: reason,
                        kind: QuarantineKind::File {
                            renamed_to,
                            restore,
                        },
                    },
                );
                Ok((store, restored, quarantined))
            }
        }
    }

    fn open_and_load(
        path: &Path,
        opener: &Opener,
    ) -> Result<(TwinStore, Vec<Twin>, Vec<Quarantined>), OpenFailure> {
        let db = match open_db(opener) {
            Ok(db) => db,
            Err(e) if edgetwin_redbfile::is_corruption(&e) => {
                return Err(OpenFailure::Corrupt(e.to_string()))
            }
            Err(source) => {
                return Err(OpenFailure::Other(StoreError::Open {
                    path: path.to_path_buf(),
                    source,
                }))
            }
        };
        let store = TwinStore {
            db: Mutex::new(Some(Arc::new(db))),
            opener: opener.clone(),
            path: path.to_path_buf(),
            write_txns: AtomicU64::new(0),
            health: Mutex::new(Health::Ok),
        };
        let Some(db) = store.current_db() else {
            return Err(OpenFailure::Other(
                store.err_storage(redb::StorageError::DatabaseClosed),
            ));
        };
        let storage = |source: redb::StorageError| match source {
            redb::StorageError::Corrupted(reason) => OpenFailure::Corrupt(reason),
            source => OpenFailure::Other(store.err_storage(source)),
        };
        let txn = db
            .begin_write()
            .map_err(|e| OpenFailure::Other(store.err_txn(e)))?;
        let mut twins = Vec::new();
        let mut quarantined = Vec::new();
        {
            let mut table = txn
                .open_table(TWINS)
                .map_err(|e| OpenFailure::Other(store.err_table(e)))?;
            let mut quarantine = txn
                .open_table(QUARANTINE)
                .map_err(|e| OpenFailure::Other(store.err_table(e)))?;
            txn.open_table(HEALTH)
                .map_err(|e| OpenFailure::Other(store.err_table(e)))?;
            let mut bad: Vec<(Vec<u8>, Vec<u8>, String)> = Vec::new();
            for item in table.iter().map_err(storage)? {
                let (k, v) = item.map_err(storage)?;
                match decode(k.value(), v.value()) {
                    Ok(twin) => twins.push(twin),
                    Err(error) => bad.push((k.value().to_vec(), v.value().to_vec(), error)),
                }
            }
            let now = edgetwin_contract::now_ms();
            for (key, bytes, error) in bad {
                let key_str = String::from_utf8_lossy(&key).into_owned();
                let quarantine_key = format!("{key_str}@{now}");
                quarantine
                    .insert(quarantine_key.as_bytes(), bytes.as_slice())
                    .map_err(storage)?;
                table.remove(key.as_slice()).map_err(storage)?;
                tracing::error!(
                    path = %path.display(),
                    device = %key_str,
                    %quarantine_key,
                    %error,
                    "twin record does not decode; moved to the quarantine table"
                );
                quarantined.push(Quarantined {
                    key: key_str,
                    error,
                    kind: QuarantineKind::Record { quarantine_key },
                });
            }
        }
        txn.commit()
            .map_err(|e| OpenFailure::Other(store.err_commit(e)))?;
        drop(db);
        Ok((store, twins, quarantined))
    }

    fn lock_db(&self) -> MutexGuard<'_, Option<Arc<Database>>> {
        self.db.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn current_db(&self) -> Option<Arc<Database>> {
        self.lock_db().clone()
    }

    /// The open database, reopened first if a failure closed it.
    fn db(&self) -> Result<Arc<Database>, StoreError> {
        let mut slot = self.lock_db();
        if let Some(db) = slot.as_ref() {
            return Ok(db.clone());
        }
        let db = open_db(&self.opener).map_err(|source| StoreError::Open {
            path: self.path.clone(),
            source,
        })?;
        tracing::info!(path = %self.path.display(), "twin store reopened");
        let db = Arc::new(db);
        *slot = Some(db.clone());
        Ok(db)
    }

    /// Records the outcome of a write: a failure closes the database (redb refuses everything
    /// after an I/O error) and turns [`health`](Self::health) to failing.
    fn finish<T>(&self, result: Result<T, StoreError>) -> Result<T, StoreError> {
        let mut health = self.health.lock().unwrap_or_else(PoisonError::into_inner);
        match &result {
            Ok(_) => {
                if let Health::Failing { .. } = &*health {
                    tracing::info!(path = %self.path.display(), "twin store writes succeed again");
                }
                *health = Health::Ok;
            }
            Err(e) => {
                if !matches!(e, StoreError::Encode { .. }) {
                    *self.lock_db() = None;
                }
                let since_ms = match &*health {
                    Health::Failing { since_ms, .. } => *since_ms,
                    Health::Ok => edgetwin_contract::now_ms(),
                };
                *health = Health::Failing {
                    error: e.to_string(),
                    since_ms,
                };
            }
        }
        result
    }

    /// Whether the last write succeeded.
    pub fn health(&self) -> Health {
        self.health
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// While failing: reopens the file and tries one tiny write, so that freeing space turns the
    /// store healthy again even when nothing else writes. Does nothing (writes nothing) while
    /// healthy.
    pub fn probe(&self) -> Health {
        if self.health() == Health::Ok {
            return Health::Ok;
        }
        let result = (|| {
            let db = self.db()?;
            let txn = db.begin_write().map_err(|e| self.err_txn(e))?;
            {
                let mut t = txn.open_table(HEALTH).map_err(|e| self.err_table(e))?;
                t.insert("probe", edgetwin_contract::now_ms())
                    .map_err(|e| self.err_storage(e))?;
            }
            txn.commit().map_err(|e| self.err_commit(e))
        })();
        let _ = self.finish(result);
        self.health()
    }

    /// Writes the snapshot file (see the module doc) from one read transaction.
    pub fn snapshot(&self) -> Result<SnapshotStats, StoreError> {
        let db = self.db()?;
        let txn = db.begin_read().map_err(|e| self.err_txn(e))?;
        let table = txn.open_table(TWINS).map_err(|e| self.err_table(e))?;
        let mut records = Vec::new();
        for item in table.iter().map_err(|e| self.err_storage(e))? {
            let (_, v) = item.map_err(|e| self.err_storage(e))?;
            records.push(v.value().to_vec());
        }
        let target = snapshot_path(&self.path);
        snapshot::write(&target, &records).map_err(|source| StoreError::Snapshot {
            path: self.path.clone(),
            snapshot: target,
            source,
        })
    }

    /// Writes `twins` in one durable write transaction (group commit); on error nothing of the
    /// batch is stored.
    pub fn commit(&self, twins: &[&Twin]) -> Result<CommitStats, StoreError> {
        let result = self.commit_inner(twins);
        self.finish(result)
    }

    fn commit_inner(&self, twins: &[&Twin]) -> Result<CommitStats, StoreError> {
        let mut encoded = Vec::with_capacity(twins.len());
        for twin in twins {
            let bytes = serde_json::to_vec(&StoredTwin::from_twin(twin)).map_err(|source| {
                StoreError::Encode {
                    path: self.path.clone(),
                    device: twin.device.to_string(),
                    source,
                }
            })?;
            encoded.push((twin.device.as_str().as_bytes(), bytes));
        }
        let txn = self.db()?.begin_write().map_err(|e| self.err_txn(e))?;
        let mut stats = CommitStats::default();
        {
            let mut table = txn.open_table(TWINS).map_err(|e| self.err_table(e))?;
            for (key, bytes) in &encoded {
                table
                    .insert(*key, bytes.as_slice())
                    .map_err(|e| self.err_storage(e))?;
                stats.twins += 1;
                stats.bytes += bytes.len();
            }
        }
        txn.commit().map_err(|e| self.err_commit(e))?;
        self.write_txns.fetch_add(1, Ordering::Relaxed);
        Ok(stats)
    }

    /// Removes a device's twin (durably); removing an absent twin is not an error.
    pub fn remove(&self, device: &DeviceId) -> Result<(), StoreError> {
        let result = (|| {
            let txn = self.db()?.begin_write().map_err(|e| self.err_txn(e))?;
            {
                let mut table = txn.open_table(TWINS).map_err(|e| self.err_table(e))?;
                table
                    .remove(device.as_str().as_bytes())
                    .map_err(|e| self.err_storage(e))?;
            }
            txn.commit().map_err(|e| self.err_commit(e))?;
            self.write_txns.fetch_add(1, Ordering::Relaxed);
            Ok(())
        })();
        self.finish(result)
    }

    /// Write transactions committed by [`commit`](Self::commit) and [`remove`](Self::remove)
    /// since open (for metrics and tests).
    pub fn write_transactions(&self) -> u64 {
        self.write_txns.load(Ordering::Relaxed)
    }

    /// The store file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn err_txn(&self, source: redb::TransactionError) -> StoreError {
        StoreError::Transaction {
            path: self.path.clone(),
            source,
        }
    }
    fn err_table(&self, source: redb::TableError) -> StoreError {
        StoreError::Table {
            path: self.path.clone(),
            source,
        }
    }
    fn err_storage(&self, source: redb::StorageError) -> StoreError {
        StoreError::Storage {
            path: self.path.clone(),
            source,
        }
    }
    fn err_commit(&self, source: redb::CommitError) -> StoreError {
        StoreError::Commit {
            path: self.path.clone(),
            source,
        }
    }
}

fn open_db(opener: &Opener) -> Result<Database, redb::DatabaseError> {
    let mut builder = Database::builder();
    builder
        .set_check_integrity_on_open(true)
        .set_cache_size(edgetwin_redbfile::CACHE_BYTES);
    opener(&builder)
}

/// The twins to fill a new file with after `damaged` was moved aside: every record of the damaged
/// file that still reads and decodes, and the snapshot's twin for every other device (or where the
/// snapshot is newer); per device the higher version wins.
fn restore_from(damaged: &Path, snapshot: &Path) -> (Vec<Twin>, RestoreReport) {
    let mut report = RestoreReport::default();
    let mut best: BTreeMap<DeviceId, (Twin, bool)> = BTreeMap::new();
    let snap = snapshot::read(snapshot);
    report.snapshot_taken_at_ms = snap.taken_at_ms;
    report.snapshot_damaged_lines = snap.damaged_lines;
    for t in snap.twins {
        best.insert(t.device.clone(), (t, false));
    }
    for t in salvage(damaged) {
        let newer = best
            .get(&t.device)
            .is_none_or(|(s, _)| t.version >= s.version);
        if newer {
            best.insert(t.device.clone(), (t, true));
        }
    }
    let mut twins = Vec::with_capacity(best.len());
    for (_, (t, salvaged)) in best {
        if salvaged {
            report.salvaged += 1;
        } else {
            report.from_snapshot += 1;
        }
        twins.push(t);
    }
    (twins, report)
}

/// Every twin record of a damaged file that can still be read and decoded.
fn salvage(damaged: &Path) -> Vec<Twin> {
    edgetwin_redbfile::salvage(damaged, |db, out| {
        let Ok(txn) = db.begin_read() else { return };
        let Ok(table) = txn.open_table(TWINS) else {
            return;
        };
        let Ok(iter) = table.iter() else { return };
        for item in iter {
            let Ok((k, v)) = item else { break };
            if let Ok(t) = decode(k.value(), v.value()) {
                out.push(t);
            }
        }
    })
}

// ---- the private on-disk types ----

#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct StoredTwin {
    format: u32,
    device: String,
    model: String,
    version: u64,
    desired_version: u64,
    desired: BTreeMap<String, StoredEntry>,
    reported: BTreeMap<String, StoredEntry>,
    status: StoredStatus,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct StoredEntry {
    /// `null` = tombstone. Required (no default) so a missing field is an error.
    value: Option<Value>,
    version: u64,
    ts: i64,
    source: String,
}

#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct StoredStatus {
    state: StoredState,
    ts: Option<i64>,
    last_seen: Option<i64>,
    message: Option<String>,
    /// Absent when empty, so records without errors read the same in builds before them.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    errors: BTreeMap<String, StoredError>,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct StoredError {
    code: ErrorCode,
    message: String,
    op: PropertyOp,
    value: Option<Value>,
    since: i64,
}

#[derive(Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
enum StoredState {
    Unknown,
    Online,
    Offline,
    Error,
    Stale,
}

impl StoredState {
    fn of(s: DeviceState) -> StoredState {
        match s {
            DeviceState::Unknown => StoredState::Unknown,
            DeviceState::Online => StoredState::Online,
            DeviceState::Offline => StoredState::Offline,
            DeviceState::Error => StoredState::Error,
            DeviceState::Stale => StoredState::Stale,
        }
    }

    fn state(self) -> DeviceState {
        match self {
            StoredState::Unknown => DeviceState::Unknown,
            StoredState::Online => DeviceState::Online,
            StoredState::Offline => DeviceState::Offline,
            StoredState::Error => DeviceState::Error,
            StoredState::Stale => DeviceState::Stale,
        }
    }
}

impl StoredTwin {
    fn from_twin(t: &Twin) -> StoredTwin {
        let side = |es: &BTreeMap<String, Entry>| {
            es.iter()
                .map(|(k, e)| {
                    (
                        k.clone(),
                        StoredEntry {
                            value: e.value.clone(),
                            version: e.version,
                            ts: e.ts,
                            source: e.source.id(),
                        },
                    )
                })
                .collect()
        };
        StoredTwin {
            format: FORMAT,
            device: t.device.to_string(),
            model: t.model.clone(),
            version: t.version,
            desired_version: t.desired_version,
            desired: side(&t.desired),
            reported: side(&t.reported),
            status: StoredStatus {
                state: StoredState::of(t.status.state),
                ts: t.status.ts,
                last_seen: t.status.last_seen,
                message: t.status.message.clone(),
                errors: t
                    .status
                    .errors
                    .iter()
                    .map(|(k, e)| {
                        (
                            k.clone(),
                            StoredError {
                                code: e.code,
                                message: e.message.clone(),
                                op: e.op,
                                value: e.value.clone(),
                                since: e.since,
                            },
                        )
                    })
                    .collect(),
            },
        }
    }
}

/// Decodes a record that carries its own key (a snapshot line).
fn decode_record(bytes: &[u8]) -> Result<Twin, String> {
    #[derive(Deserialize)]
    struct Key {
        device: String,
    }
    let key: Key =
        serde_json::from_slice(bytes).map_err(|e| format!("record does not decode: {e}"))?;
    decode(key.device.as_bytes(), bytes)
}

fn decode(key: &[u8], bytes: &[u8]) -> Result<Twin, String> {
    let key = std::str::from_utf8(key).map_err(|e| format!("key is not UTF-8: {e}"))?;
    let device = DeviceId::new(key).map_err(|e| format!("key: {e}"))?;
    let s: StoredTwin =
        serde_json::from_slice(bytes).map_err(|e| format!("record does not decode: {e}"))?;
    if s.format != FORMAT {
        return Err(format!(
            "unsupported record format {} (this build reads {FORMAT})",
            s.format
        ));
    }
    if s.device != key {
        return Err(format!(
            "record names device {:?} but is stored under {key:?}",
            s.device
        ));
    }
    let side = |which: &str,
                es: BTreeMap<String, StoredEntry>|
     -> Result<BTreeMap<String, Entry>, String> {
        es.into_iter()
            .map(|(k, e)| {
                let source = Source::parse(&e.source).ok_or_else(|| {
                    format!("{which} property {k:?}: unknown source {:?}", e.source)
                })?;
                Ok((
                    k,
                    Entry {
                        value: e.value.map(canonicalize),
                        version: e.version,
                        ts: e.ts,
                        source,
                    },
                ))
            })
            .collect()
    };
    Ok(Twin {
        device,
        model: s.model,
        version: s.version,
        desired_version: s.desired_version,
        desired: side("desired", s.desired)?,
        reported: side("reported", s.reported)?,
        status: TwinStatus {
            state: s.status.state.state(),
            ts: s.status.ts,
            last_seen: s.status.last_seen,
            message: s.status.message,
            errors: s
                .status
                .errors
                .into_iter()
                .map(|(k, e)| {
                    (
                        k,
                        PropertyError {
                            code: e.code,
                            message: e.message,
                            op: e.op,
                            value: e.value.map(canonicalize),
                            since: e.since,
                        },
                    )
                })
                .collect(),
        },
    })
}

#[cfg(test)]
mod tests;
