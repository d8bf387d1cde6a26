//! The front door's session table on disk (`{data_dir}/sessions.redb`), so clients' kept MQTT
//! sessions (3.1.1 `clean_session` 0, MQTT 5 Session Expiry) and their subscriptions outlive a
//! restart of the node.
//!
//! One owner: a writer thread takes the gate's changes from a bounded channel and writes all
//! that wait in one transaction. The gate does not wait for the disk (a session change in the
//! last milliseconds before a crash can be lost; no acknowledged message depends on it). One
//! table `sessions`: upstream client id → the session as JSON. A file that does not open as a
//! database is moved aside (`sessions.redb.corrupt-{ms}`) and what still reads is kept.

use std::path::Path;
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
use std::sync::Mutex;

use edgetwin_gate::{SessionStore, StoredSession};
use redb::TableDefinition;
use tracing::{error, warn};

const TABLE: TableDefinition<&str, &[u8]> = TableDefinition::new("sessions");

/// Changes waiting for the writer, at most (past it a change is dropped and logged: the session
/// still works until the next restart).
const QUEUE: usize = 4096;

enum Change {
    Put(String, Vec<u8>),
    Remove(String),
}

/// The durable session table.
pub struct DurableSessions {
    loaded: Mutex<Vec<(String, StoredSession)>>,
    tx: Mutex<Option<SyncSender<Change>>>,
    writer: Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl DurableSessions {
    /// Opens (or creates) the table at `path` and starts its writer.
    pub fn open(path: &Path) -> anyhow::Result<DurableSessions> {
        let (db, salvaged) = edgetwin_redbfile::create_salvaging(path, TABLE, "session table")
            .map_err(|e| anyhow::anyhow!("session table {}: {e}", path.display()))?;
        if !salvaged.is_empty() {
            write(
                &db,
                salvaged
                    .into_iter()
                    .map(|(k, v)| Change::Put(k, v))
                    .collect(),
            )?;
        }
        let mut raw = Vec::new();
        edgetwin_redbfile::read_str_bytes(&db, TABLE, &mut raw)?;
        let mut loaded = Vec::with_capacity(raw.len());
        for (client, bytes) in raw {
            match serde_json::from_slice::<StoredSession>(&bytes) {
                Ok(s) => loaded.push((client, s)),
                // From another build or damaged: that session is not restored, the rest are.
                Err(e) => {
                    warn!(client = %client, error = %e, "stored session not readable; not restored")
                }
            }
        }
        let (tx, rx) = sync_channel(QUEUE);
        let name = path.display().to_string();
        let writer = std::thread::Builder::new()
            .name("sessions-writer".into())
            .spawn(move || run(db, rx, &name))?;
        Ok(DurableSessions {
            loaded: Mutex::new(loaded),
            tx: Mutex::new(Some(tx)),
            writer: Mutex::new(Some(writer)),
        })
    }

    fn send(&self, c: Change) {
        let tx = self
            .tx
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(tx) = tx.as_ref() {
            match tx.try_send(c) {
                Ok(()) => {}
                Err(TrySendError::Full(_)) => {
                    warn!("session table writer behind; a session change is not stored")
                }
                Err(TrySendError::Disconnected(_)) => {}
            }
        }
    }
}

impl SessionStore for DurableSessions {
    fn load(&self) -> Vec<(String, StoredSession)> {
        std::mem::take(
            &mut *self
                .loaded
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        )
    }

    fn put(&self, client: &str, session: &StoredSession) {
        match serde_json::to_vec(session) {
            Ok(v) => self.send(Change::Put(client.to_string(), v)),
            Err(e) => error!(client = %client, error = %e, "session not encodable"),
        }
    }

    fn remove(&self, client: &str) {
        self.send(Change::Remove(client.to_string()));
    }
}

impl Drop for DurableSessions {
    /// Writes what waits, then stops the writer.
    fn drop(&mut self) {
        self.tx
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take();
        if let Some(w) = self
            .writer
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take()
        {
            let _ = w.join();
        }
    }
}

fn run(db: redb::Database, rx: Receiver<Change>, name: &str) {
    while let Ok(first) = rx.recv() {
        let mut batch = vec![first];
        batch.extend(rx.try_iter().take(QUEUE));
        if let Err(e) = write(&db, batch) {
            error!(path = name, error = %e, "session table write failed; these session changes are not kept");
        }
    }
}

fn write(db: &redb::Database, batch: Vec<Change>) -> Result<(), redb::Error> {
    let tx = db.begin_write()?;
    {
        let mut table = tx.open_table(TABLE)?;
        for c in batch {
            match c {
                Change::Put(k, v) => {
                    table.insert(k.as_str(), v.as_slice())?;
                }
                Change::Remove(k) => {
                    table.remove(k.as_str())?;
                }
            }
        }
    }
    tx.commit()?;
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn sessions_written_are_there_after_reopening_and_removed_ones_are_not() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sessions.redb");
        let s = DurableSessions::open(&path).unwrap();
        assert!(s.load().is_empty());
        let kept = StoredSession {
            expiry_s: 60,
            ends_at_ms: Some(123),
            subs: Vec::new(),
            client_id: "plant/a".into(),
            identity: "app".into(),
        };
        s.put("a", &kept);
        s.put("b", &kept);
        s.remove("b");
        drop(s);
        let s = DurableSessions::open(&path).unwrap();
        assert_eq!(s.load(), vec![("a".to_string(), kept)]);
    }

    #[test]
    fn a_damaged_session_table_is_moved_aside_and_the_node_starts() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sessions.redb");
        std::fs::write(&path, b"not a database").unwrap();
        let s = DurableSessions::open(&path).unwrap();
        assert!(s.load().is_empty());
    }
}
