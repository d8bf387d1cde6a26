//! The front door's session table on disk (`{data_dir}/sessions.redb`), so clients' kept MQTT
//! sessions (3.1.1 `clean_session` 0, MQTT 5 Session Expiry) and their subscriptions outlive a
//! restart of the node, with the messages queued for them while their clients were away.
//!
//! One owner: a writer thread takes the gate's changes from a bounded channel and writes all
//! that wait in one transaction (group commit). Session changes are written behind (one made in
//! the last milliseconds before a crash can be lost; no acknowledged message depends on it);
//! a queued message is acknowledged to the broker only when its transaction is committed
//! ([`SessionStore::enqueue`] resolves then). Two tables: `sessions`, upstream client id → the
//! session as JSON; `queued`, (client id, place) → expiry (8 bytes, big endian, `u64::MAX` for
//! none) then the MQTT 5 PUBLISH. A file that does not open as a database is moved aside
//! (`sessions.redb.corrupt-{ms}`) and the sessions that still read are kept (their queues are
//! not: media damage).

use std::collections::HashMap;
use std::path::Path;
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};

use edgetwin_gate::{Queued, SessionStore, StoredSession, ToQueue, Written};
use redb::{ReadableDatabase, ReadableTable, TableDefinition};
use tokio::sync::oneshot;
use tracing::{error, warn};

const TABLE: TableDefinition<&str, &[u8]> = TableDefinition::new("sessions");
const QUEUED: TableDefinition<(&str, u64), &[u8]> = TableDefinition::new("queued");

/// Messages and bytes in each client's queue, as committed.
type Lengths = Arc<Mutex<HashMap<String, (usize, usize)>>>;

/// Changes waiting for the writer, at most (past it a change is dropped and logged: the session
/// still works until the next restart).
const QUEUE: usize = 4096;

enum Change {
    Put(String, Vec<u8>),
    /// The session and its queue.
    Remove(String),
    Enqueue(String, Vec<ToQueue>, oneshot::Sender<Result<(), String>>),
    Dequeue(String, u64),
    ClearQueue(String),
    /// Answered after every change before it is committed.
    Load(String, oneshot::Sender<Vec<Queued>>),
}

/// The durable session table.
pub struct DurableSessions {
    loaded: Mutex<Vec<(String, StoredSession)>>,
    lengths: Lengths,
    tx: Mutex<Option<SyncSender<Change>>>,
    writer: Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl DurableSessions {
    /// Opens (or creates) the table at `path` and starts its writer.
    pub fn open(path: &Path) -> anyhow::Result<DurableSessions> {
        let (db, salvaged) = edgetwin_redbfile::create_salvaging(path, TABLE, "session table")
            .map_err(|e| anyhow::anyhow!("session table {}: {e}", path.display()))?;
        let mut next_seq = 1u64;
        let lengths: Lengths = Arc::default();
        if !salvaged.is_empty() {
            write(
                &db,
                salvaged
                    .into_iter()
                    .map(|(k, v)| Change::Put(k, v))
                    .collect(),
                &mut next_seq,
                &lengths,
            )?;
        }
        next_seq = measure_queues(&db, &lengths)?;
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
        let l = lengths.clone();
        let writer = std::thread::Builder::new()
            .name("sessions-writer".into())
            .spawn(move || run(db, rx, &name, next_seq, &l))?;
        Ok(DurableSessions {
            loaded: Mutex::new(loaded),
            lengths,
            tx: Mutex::new(Some(tx)),
            writer: Mutex::new(Some(writer)),
        })
    }

    /// Hands `c` to the writer. `Err`: it is not taken (the writer is behind or gone); the
    /// change is dropped, so an answer it carries is never sent.
    fn send(&self, c: Change) -> Result<(), ()> {
        let tx = self
            .tx
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let Some(tx) = tx.as_ref() else {
            return Err(());
        };
        match tx.try_send(c) {
            Ok(()) => Ok(()),
            Err(TrySendError::Full(_)) => {
                warn!("session table writer behind; a session change is not stored");
                Err(())
            }
            Err(TrySendError::Disconnected(_)) => Err(()),
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
            Ok(v) => {
                let _ = self.send(Change::Put(client.to_string(), v));
            }
            Err(e) => error!(client = %client, error = %e, "session not encodable"),
        }
    }

    fn remove(&self, client: &str) {
        let _ = self.send(Change::Remove(client.to_string()));
    }

    fn keeps_queues(&self) -> bool {
        true
    }

    fn enqueue(&self, client: &str, messages: Vec<ToQueue>) -> Written {
        let (tx, rx) = oneshot::channel();
        // Not taken: the answer's sender is dropped with it, which the keeper reads as
        // "not written" (the broker keeps the messages and sends them again).
        let _ = self.send(Change::Enqueue(client.to_string(), messages, tx));
        rx
    }

    fn queued(&self, client: &str) -> oneshot::Receiver<Vec<Queued>> {
        let (tx, rx) = oneshot::channel();
        let _ = self.send(Change::Load(client.to_string(), tx));
        rx
    }

    fn queue_len(&self, client: &str) -> (usize, usize) {
        self.lengths
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(client)
            .copied()
            .unwrap_or((0, 0))
    }

    fn dequeue(&self, client: &str, seq: u64) {
        let _ = self.send(Change::Dequeue(client.to_string(), seq));
    }

    fn clear_queue(&self, client: &str) {
        let _ = self.send(Change::ClearQueue(client.to_string()));
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

fn run(db: redb::Database, rx: Receiver<Change>, name: &str, mut next_seq: u64, lengths: &Lengths) {
    while let Ok(first) = rx.recv() {
        let mut batch = vec![first];
        batch.extend(rx.try_iter().take(QUEUE));
        if let Err(e) = write(&db, batch, &mut next_seq, lengths) {
            error!(path = name, error = %e, "session table write failed; these session changes are not kept");
        }
    }
}

/// Encodes a queued message's value: its expiry, then the publish.
fn encode(m: &ToQueue) -> Vec<u8> {
    let mut v = Vec::with_capacity(8 + m.0.len());
    v.extend_from_slice(&m.1.unwrap_or(u64::MAX).to_be_bytes());
    v.extend_from_slice(&m.0);
    v
}

/// The other way; `None` for a value too short to be one.
fn decode(seq: u64, v: &[u8]) -> Option<Queued> {
    let (at, publish) = v.split_at_checked(8)?;
    let at = u64::from_be_bytes(at.try_into().ok()?);
    Some(Queued {
        seq,
        publish: publish.to_vec(),
        expires_at_ms: (at != u64::MAX).then_some(at),
    })
}

/// Reads every queue's length into `lengths`; returns the next free place.
fn measure_queues(db: &redb::Database, lengths: &Lengths) -> Result<u64, redb::Error> {
    let tx = db.begin_read()?;
    let table = match tx.open_table(QUEUED) {
        Ok(t) => t,
        Err(redb::TableError::TableDoesNotExist(_)) => return Ok(1),
        Err(e) => return Err(e.into()),
    };
    let mut next = 1u64;
    let mut l = lengths
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    for entry in table.iter()? {
        let (k, v) = entry?;
        let (client, seq) = k.value();
        let e = l.entry(client.to_string()).or_default();
        e.0 += 1;
        e.1 += v.value().len().saturating_sub(8);
        next = next.max(seq.saturating_add(1));
    }
    Ok(next)
}

/// Writes `batch` in one transaction; then answers its enqueues and loads.
fn write(
    db: &redb::Database,
    batch: Vec<Change>,
    next_seq: &mut u64,
    lengths: &Lengths,
) -> Result<(), redb::Error> {
    let mut written = Vec::new();
    let mut loads = Vec::new();
    // Length changes, applied once committed: client → (messages, bytes) added, or emptied.
    let mut delta: HashMap<String, (i64, i64, bool)> = HashMap::new();
    let tx = db.begin_write()?;
    {
        let mut table = tx.open_table(TABLE)?;
        let mut queued = tx.open_table(QUEUED)?;
        for c in batch {
            match c {
                Change::Put(k, v) => {
                    table.insert(k.as_str(), v.as_slice())?;
                }
                Change::Remove(k) => {
                    table.remove(k.as_str())?;
                    clear(&mut queued, &k)?;
                    delta.insert(k, (0, 0, true));
                }
                Change::ClearQueue(k) => {
                    clear(&mut queued, &k)?;
                    delta.insert(k, (0, 0, true));
                }
                Change::Enqueue(k, messages, answer) => {
                    let d = delta.entry(k.clone()).or_default();
                    for m in &messages {
                        queued.insert((k.as_str(), *next_seq), encode(m).as_slice())?;
                        *next_seq += 1;
                        d.0 += 1;
                        d.1 += i64::try_from(m.0.len()).unwrap_or(i64::MAX);
                    }
                    written.push(answer);
                }
                Change::Dequeue(k, seq) => {
                    let gone = queued
                        .remove((k.as_str(), seq))?
                        .map(|v| v.value().len().saturating_sub(8));
                    if let Some(bytes) = gone {
                        let d = delta.entry(k).or_default();
                        d.0 -= 1;
                        d.1 -= i64::try_from(bytes).unwrap_or(i64::MAX);
                    }
                }
                Change::Load(k, answer) => loads.push((k, answer)),
            }
        }
    }
    let committed = tx.commit();
    if let Err(e) = committed {
        for w in written {
            let _ = w.send(Err(e.to_string()));
        }
        return Err(e.into());
    }
    {
        let mut l = lengths
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        for (k, (n, bytes, emptied)) in delta {
            let e = l.entry(k.clone()).or_default();
            if emptied {
                *e = (0, 0);
            }
            e.0 = e.0.saturating_add_signed(n as isize);
            e.1 = e.1.saturating_add_signed(bytes as isize);
            if *e == (0, 0) {
                l.remove(&k);
            }
        }
    }
    for w in written {
        let _ = w.send(Ok(()));
    }
    if !loads.is_empty() {
        let tx = db.begin_read()?;
        let table = tx.open_table(QUEUED)?;
        for (k, answer) in loads {
            let mut out = Vec::new();
            for entry in table.range((k.as_str(), 0)..=(k.as_str(), u64::MAX))? {
                let (key, v) = entry?;
                match decode(key.value().1, v.value()) {
                    Some(q) => out.push(q),
                    None => warn!(client = %k, "a queued message does not read; skipped"),
                }
            }
            let _ = answer.send(out);
        }
    }
    Ok(())
}

/// Empties `client`'s queue.
fn clear(
    queued: &mut redb::Table<(&'static str, u64), &'static [u8]>,
    client: &str,
) -> Result<(), redb::Error> {
    queued.retain_in((client, 0)..=(client, u64::MAX), |_, _| false)?;
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

    fn load(s: &DurableSessions, client: &str) -> Vec<Queued> {
        s.queued(client).blocking_recv().unwrap()
    }

    #[test]
    fn queued_messages_are_kept_in_order_across_reopening_until_dequeued_or_cleared() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sessions.redb");
        let s = DurableSessions::open(&path).unwrap();
        assert!(s.keeps_queues());
        let w = s.enqueue(
            "a",
            vec![(b"one".to_vec(), None), (b"two".to_vec(), Some(77))],
        );
        assert_eq!(w.blocking_recv().unwrap(), Ok(()));
        s.enqueue("b", vec![(b"other".to_vec(), None)])
            .blocking_recv()
            .unwrap()
            .unwrap();
        assert_eq!(s.queue_len("a"), (2, 6));
        let q = load(&s, "a");
        assert_eq!(
            q.iter()
                .map(|m| (m.publish.clone(), m.expires_at_ms))
                .collect::<Vec<_>>(),
            vec![(b"one".to_vec(), None), (b"two".to_vec(), Some(77))]
        );
        assert!(q[0].seq < q[1].seq);
        s.dequeue("a", q[0].seq);
        drop(s);

        let s = DurableSessions::open(&path).unwrap();
        assert_eq!(s.queue_len("a"), (1, 3), "lengths are measured at open");
        let q = load(&s, "a");
        assert_eq!(q.len(), 1);
        assert_eq!(q[0].publish, b"two".to_vec());
        // Places keep rising after a reopen: a new message goes after the old ones.
        s.enqueue("a", vec![(b"three".to_vec(), None)])
            .blocking_recv()
            .unwrap()
            .unwrap();
        let q = load(&s, "a");
        assert_eq!(q.last().map(|m| m.publish.clone()), Some(b"three".to_vec()));
        assert!(q[0].seq < q[1].seq);
        s.clear_queue("a");
        assert!(load(&s, "a").is_empty());
        assert_eq!(s.queue_len("a"), (0, 0));
        // Forgetting a session forgets its queue.
        s.remove("b");
        assert!(load(&s, "b").is_empty());
        assert_eq!(load(&s, "b"), Vec::new());
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
