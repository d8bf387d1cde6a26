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
//!   integrity check) is renamed to `{file name}.corrupt-{unix ms}` beside it, logged, reported as
//!   [`QuarantineKind::File`], and the store starts empty in a new file. Any other open error
//!   (permissions, file locked by another process, I/O) is returned as a [`StoreError`] and
//!   nothing is touched.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use edgetwin_contract::{DeviceId, DeviceState, Source, TwinStatus};
use redb::{Database, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::core::{canonicalize, Entry, Twin};

const TWINS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("twins");
const QUARANTINE: TableDefinition<&[u8], &[u8]> = TableDefinition::new("quarantine");
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
    /// The whole file, renamed; the store started empty.
    File {
        /// The new name of the corrupt file.
        renamed_to: PathBuf,
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
#[derive(Debug)]
pub struct TwinStore {
    db: Database,
    path: PathBuf,
    write_txns: AtomicU64,
}

enum OpenFailure {
    Corrupt(String),
    Other(StoreError),
}

impl TwinStore {
    /// Opens (or creates) the store at `path` and loads every twin; see the module doc for what
    /// happens to damaged records and files.
    pub fn open(path: &Path) -> Result<(TwinStore, Vec<Twin>, Vec<Quarantined>), StoreError> {
        match Self::open_and_load(path) {
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
                tracing::error!(
                    path = %path.display(),
                    renamed_to = %renamed_to.display(),
                    %reason,
                    "twin store file is corrupt; moved aside, starting with an empty store"
                );
                let (store, twins, mut quarantined) = match Self::open_and_load(path) {
                    Ok(loaded) => loaded,
                    Err(OpenFailure::Other(e)) => return Err(e),
                    Err(OpenFailure::Corrupt(reason)) => {
                        return Err(StoreError::Storage {
                            path: path.to_path_buf(),
                            source: redb::StorageError::Corrupted(reason),
                        })
                    }
                };
                quarantined.insert(
                    0,
                    Quarantined {
                        key: path.display().to_string(),
                        error: reason,
                        kind: QuarantineKind::File { renamed_to },
                    },
                );
                Ok((store, twins, quarantined))
            }
        }
    }

    fn open_and_load(path: &Path) -> Result<(TwinStore, Vec<Twin>, Vec<Quarantined>), OpenFailure> {
        let db = match Database::builder()
            .set_check_integrity_on_open(true)
            .create(path)
        {
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
            db,
            path: path.to_path_buf(),
            write_txns: AtomicU64::new(0),
        };
        let storage = |source: redb::StorageError| match source {
            redb::StorageError::Corrupted(reason) => OpenFailure::Corrupt(reason),
            source => OpenFailure::Other(store.err_storage(source)),
        };
        let txn = store
            .db
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
            let mut bad: Vec<(Vec<u8>, Vec<u8>, String)> = Vec::new();
            for item in table.iter().map_err(storage)? {
                let (k, v) = item.map_err(storage)?;
                match decode(k.value(), v.value()) {
                    Ok(twin) => twins.push(twin),
                    Err(error) => bad.push((k.value().to_vec(), v.value().to_vec(), error)),
                }
            }
            let now = edgetwin_redbfile::unix_ms();
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
        Ok((store, twins, quarantined))
    }

    /// Writes `twins` in one durable write transaction (group commit); on error nothing of the
    /// batch is stored.
    pub fn commit(&self, twins: &[&Twin]) -> Result<CommitStats, StoreError> {
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
        let txn = self.db.begin_write().map_err(|e| self.err_txn(e))?;
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
        let txn = self.db.begin_write().map_err(|e| self.err_txn(e))?;
        {
            let mut table = txn.open_table(TWINS).map_err(|e| self.err_table(e))?;
            table
                .remove(device.as_str().as_bytes())
                .map_err(|e| self.err_storage(e))?;
        }
        txn.commit().map_err(|e| self.err_commit(e))?;
        self.write_txns.fetch_add(1, Ordering::Relaxed);
        Ok(())
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
}

#[derive(Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
enum StoredState {
    Unknown,
    Online,
    Offline,
    Error,
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
                state: match t.status.state {
                    DeviceState::Unknown => StoredState::Unknown,
                    DeviceState::Online => StoredState::Online,
                    DeviceState::Offline => StoredState::Offline,
                    DeviceState::Error => StoredState::Error,
                },
                ts: t.status.ts,
                last_seen: t.status.last_seen,
                message: t.status.message.clone(),
            },
        }
    }
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
            state: match s.status.state {
                StoredState::Unknown => DeviceState::Unknown,
                StoredState::Online => DeviceState::Online,
                StoredState::Offline => DeviceState::Offline,
                StoredState::Error => DeviceState::Error,
            },
            ts: s.status.ts,
            last_seen: s.status.last_seen,
            message: s.status.message,
        },
    })
}

#[cfg(test)]
mod tests;
