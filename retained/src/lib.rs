//! `edgetwin-retained`: clients' retained messages, kept on disk so they survive a restart of
//! the node (rumqttd keeps retained messages in memory only).
//!
//! The node's front door hands every retained publish on a topic outside the node's own topic
//! API here before it is acknowledged; at start the node republishes what is stored into the
//! broker before any client connects. An empty retained payload clears the topic, as in MQTT.
//!
//! Bounded: at most [`Limits::max_topics`] topics and [`Limits::max_bytes`] of topic and payload
//! bytes. A new topic past either limit is refused (counted by the caller from
//! [`Applied::refused`]); replacing or clearing a stored topic is always taken.
//!
//! One redb file, one table `retained`: topic (UTF-8) → payload. A file that does not open as a
//! database is moved aside (`{name}.corrupt-{ms}`) and what still reads is kept.

use std::path::Path;

use redb::{ReadableTable, TableDefinition};

const TABLE: TableDefinition<&str, &[u8]> = TableDefinition::new("retained");

/// Why the store cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum RetainedError {
    /// redb failed.
    #[error("retained store {path}: {message}")]
    Store {
        /// The file.
        path: String,
        /// What redb said.
        message: String,
    },
}

/// How much the store keeps.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Most topics. Default 10,000.
    pub max_topics: usize,
    /// Most bytes of topics and payloads together. Default 64 MiB.
    pub max_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_topics: 10_000,
            max_bytes: 64 * 1024 * 1024,
        }
    }
}

/// What one [`RetainedStore::apply`] did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Applied {
    /// New topics not stored because a limit was reached.
    pub refused: usize,
}

/// The durable retained messages.
pub struct RetainedStore {
    db: redb::Database,
    path: String,
    limits: Limits,
    /// Stored topics and bytes, kept in step with the file.
    topics: usize,
    bytes: usize,
}

/// What the store held at open.
pub type Loaded = Vec<(String, Vec<u8>)>;

impl RetainedStore {
    /// Opens (or creates) the store at `path`; returns it with everything it holds. A damaged
    /// file is moved aside and what still reads is carried into a fresh one.
    pub fn open(path: &Path, limits: Limits) -> Result<(RetainedStore, Loaded), RetainedError> {
        let err = |e: &dyn std::fmt::Display| RetainedError::Store {
            path: path.display().to_string(),
            message: e.to_string(),
        };
        let (db, salvaged) = edgetwin_redbfile::create_salvaging(path, TABLE, "retained store")
            .map_err(|e| err(&e))?;
        let mut store = RetainedStore {
            db,
            path: path.display().to_string(),
            limits,
            topics: 0,
            bytes: 0,
        };
        if !salvaged.is_empty() {
            let batch: Vec<(String, Vec<u8>)> = salvaged;
            store.apply(batch.iter().map(|(t, p)| (t.as_str(), p.as_slice())))?;
        }
        let mut all = Vec::new();
        edgetwin_redbfile::read_str_bytes(&store.db, TABLE, &mut all).map_err(|e| err(&e))?;
        store.topics = all.len();
        store.bytes = all.iter().map(|(t, p)| t.len() + p.len()).sum();
        Ok((store, all))
    }

    /// Stores a batch of retained publishes in one transaction (an empty payload clears the
    /// topic), in order. Durable when it returns `Ok`.
    pub fn apply<'a>(
        &mut self,
        batch: impl IntoIterator<Item = (&'a str, &'a [u8])>,
    ) -> Result<Applied, RetainedError> {
        let err = |e: &dyn std::fmt::Display| RetainedError::Store {
            path: self.path.clone(),
            message: e.to_string(),
        };
        let (mut topics, mut bytes) = (self.topics, self.bytes);
        let mut applied = Applied::default();
        let tx = self.db.begin_write().map_err(|e| err(&e))?;
        {
            let mut table = tx.open_table(TABLE).map_err(|e| err(&e))?;
            for (topic, payload) in batch {
                let old = table
                    .get(topic)
                    .map_err(|e| err(&e))?
                    .map(|v| v.value().len());
                if payload.is_empty() {
                    if let Some(len) = old {
                        table.remove(topic).map_err(|e| err(&e))?;
                        topics -= 1;
                        bytes -= topic.len() + len;
                    }
                    continue;
                }
                let grown =
                    bytes - old.map_or(0, |len| topic.len() + len) + topic.len() + payload.len();
                let new_topic = old.is_none();
                if (new_topic && topics >= self.limits.max_topics) || grown > self.limits.max_bytes
                {
                    applied.refused += 1;
                    continue;
                }
                table.insert(topic, payload).map_err(|e| err(&e))?;
                topics += usize::from(new_topic);
                bytes = grown;
            }
        }
        tx.commit().map_err(|e| err(&e))?;
        self.topics = topics;
        self.bytes = bytes;
        Ok(applied)
    }

    /// Stored topics now.
    pub fn len(&self) -> usize {
        self.topics
    }

    /// Whether nothing is stored.
    pub fn is_empty(&self) -> bool {
        self.topics == 0
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn retained_survive_reopen_and_an_empty_payload_clears() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("retained.redb");
        let (mut s, loaded) = RetainedStore::open(&path, Limits::default()).unwrap();
        assert!(loaded.is_empty());
        s.apply([
            ("plant/line-1/info", &b"one"[..]),
            ("plant/line-2/info", b"two"),
            ("plant/line-1/info", b"one again"),
        ])
        .unwrap();
        s.apply([("plant/line-2/info", &b""[..])]).unwrap();
        drop(s);
        let (s, mut loaded) = RetainedStore::open(&path, Limits::default()).unwrap();
        loaded.sort();
        assert_eq!(
            loaded,
            vec![("plant/line-1/info".to_string(), b"one again".to_vec())]
        );
        assert_eq!(s.len(), 1);
    }

    #[test]
    fn retained_limits_refuse_new_topics_but_take_replacements_and_clears() {
        let dir = tempfile::tempdir().unwrap();
        let limits = Limits {
            max_topics: 2,
            max_bytes: 40,
        };
        let (mut s, _) = RetainedStore::open(&dir.path().join("r.redb"), limits).unwrap();
        let a = s
            .apply([("a", &b"1"[..]), ("b", b"2"), ("c", b"3")])
            .unwrap();
        assert_eq!(a.refused, 1, "a third topic");
        let a = s.apply([("a", &[b'x'; 100][..])]).unwrap();
        assert_eq!(a.refused, 1, "past max_bytes");
        let a = s
            .apply([("a", &b"new"[..]), ("b", b""), ("c", b"3")])
            .unwrap();
        assert_eq!(a.refused, 0, "replaced, cleared, then room for c");
        assert_eq!(s.len(), 2);
    }

    #[test]
    fn retained_a_damaged_file_is_moved_aside_and_the_store_starts() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("retained.redb");
        std::fs::write(&path, b"not a database at all, just bytes").unwrap();
        let (mut s, loaded) = RetainedStore::open(&path, Limits::default()).unwrap();
        assert!(loaded.is_empty());
        s.apply([("t", &b"v"[..])]).unwrap();
        let aside = std::fs::read_dir(dir.path())
            .unwrap()
            .filter_map(|e| e.ok())
            .any(|e| e.file_name().to_string_lossy().contains(".corrupt-"));
        assert!(aside, "the damaged file is kept for inspection");
    }

    proptest::proptest! {
        /// The counts the limits are checked against stay equal to what the file holds.
        #[test]
        fn retained_counts_match_the_file(ops in proptest::collection::vec((0u8..6, 0usize..30), 1..60)) {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("r.redb");
            let limits = Limits { max_topics: 4, max_bytes: 80 };
            let (mut s, _) = RetainedStore::open(&path, limits).unwrap();
            for chunk in ops.chunks(5) {
                let owned: Vec<(String, Vec<u8>)> = chunk
                    .iter()
                    .map(|(t, n)| (format!("t{t}"), vec![b'x'; *n]))
                    .collect();
                s.apply(owned.iter().map(|(t, p)| (t.as_str(), p.as_slice()))).unwrap();
            }
            let (topics, bytes) = (s.topics, s.bytes);
            drop(s);
            let (_, all) = RetainedStore::open(&path, limits).unwrap();
            proptest::prop_assert_eq!(topics, all.len());
            proptest::prop_assert_eq!(bytes, all.iter().map(|(t, p)| t.len() + p.len()).sum::<usize>());
            proptest::prop_assert!(topics <= 4 && bytes <= 80);
        }
    }
}
