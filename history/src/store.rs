//! The history on disk: one redb file, one table `points`, written in batches.
//!
//! Key: `{device}\x1f{property}\x1f{t}` with `t` (the bucket start, ms) as 16 hex digits of the
//! sign-flipped value, so keys sort by series and then by time and a series' points since some
//! time are one range. `\x1f` cannot appear in a device id or property name. Value: 36 bytes,
//! little-endian: min, max, sum, last (f64) and count (u32).
//!
//! A file that does not open as a database is moved aside (`{name}.corrupt-{ms}`) and every
//! point that still reads in it is written into the fresh one.

use std::path::{Path, PathBuf};

use redb::{ReadableDatabase, ReadableTableMetadata, TableDefinition};

use crate::series::{Dirty, Point, SeriesKey};

const TABLE: TableDefinition<&str, &[u8]> = TableDefinition::new("points");
const SEP: char = '\x1f';
const VALUE_LEN: usize = 36;

/// Why the history file cannot be used.
#[derive(Debug, thiserror::Error)]
#[error("history store {path}: {message}")]
pub struct HistoryError {
    /// The file.
    pub path: String,
    /// What failed.
    pub message: String,
}

/// The history file.
pub struct HistoryStore {
    db: redb::Database,
    path: PathBuf,
}

fn prefix(key: &SeriesKey) -> String {
    format!("{}{SEP}{}{SEP}", key.device, key.property)
}

fn time_hex(t: i64) -> String {
    // Flipping the sign bit makes the unsigned order the signed one.
    format!("{:016x}", (t as u64) ^ (1 << 63))
}

fn time_of(key: &str) -> Option<i64> {
    let hex = key.rsplit(SEP).next()?;
    let u = u64::from_str_radix(hex, 16).ok()?;
    Some((u ^ (1 << 63)) as i64)
}

fn encode(p: &Point) -> [u8; VALUE_LEN] {
    let mut out = [0u8; VALUE_LEN];
    for (i, f) in [p.min, p.max, p.sum, p.last].iter().enumerate() {
        out[i * 8..i * 8 + 8].copy_from_slice(&f.to_le_bytes());
    }
    out[32..].copy_from_slice(&p.count.to_le_bytes());
    out
}

fn decode(t: i64, b: &[u8]) -> Option<Point> {
    if b.len() != VALUE_LEN {
        return None;
    }
    let f = |i: usize| {
        let mut a = [0u8; 8];
        a.copy_from_slice(&b[i * 8..i * 8 + 8]);
        f64::from_le_bytes(a)
    };
    let mut c = [0u8; 4];
    c.copy_from_slice(&b[32..]);
    Some(Point {
        t,
        min: f(0),
        max: f(1),
        sum: f(2),
        last: f(3),
        count: u32::from_le_bytes(c),
    })
}

impl HistoryStore {
    /// Opens (or creates) the file; a damaged one is moved aside and what still reads in it
    /// is kept. Returns the store and how many points were salvaged from a damaged file.
    pub fn open(path: &Path) -> Result<(HistoryStore, usize), HistoryError> {
        let err = |e: &dyn std::fmt::Display| HistoryError {
            path: path.display().to_string(),
            message: e.to_string(),
        };
        let (db, salvaged) = edgetwin_redbfile::create_salvaging(path, TABLE, "history store")
            .map_err(|e| err(&e))?;
        let store = HistoryStore {
            db,
            path: path.to_path_buf(),
        };
        let n = salvaged.len();
        if n > 0 {
            let tx = store.db.begin_write().map_err(|e| err(&e))?;
            {
                let mut table = tx.open_table(TABLE).map_err(|e| err(&e))?;
                for (k, v) in &salvaged {
                    table
                        .insert(k.as_str(), v.as_slice())
                        .map_err(|e| err(&e))?;
                }
            }
            tx.commit().map_err(|e| err(&e))?;
        }
        Ok((store, n))
    }

    fn err(&self, e: &dyn std::fmt::Display) -> HistoryError {
        HistoryError {
            path: self.path.display().to_string(),
            message: e.to_string(),
        }
    }

    /// The file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The stored point of `key`'s bucket starting at `t`.
    pub fn get(&self, key: &SeriesKey, t: i64) -> Result<Option<Point>, HistoryError> {
        let tx = self.db.begin_read().map_err(|e| self.err(&e))?;
        let table = match tx.open_table(TABLE) {
            Ok(t) => t,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(None),
            Err(e) => return Err(self.err(&e)),
        };
        let k = format!("{}{}", prefix(key), time_hex(t));
        let v = table.get(k.as_str()).map_err(|e| self.err(&e))?;
        Ok(v.and_then(|v| decode(t, v.value())))
    }

    /// `key`'s points with a bucket ending after `since`, oldest first, at most `limit`
    /// (the newest ones when there are more).
    pub fn range(
        &self,
        key: &SeriesKey,
        since: i64,
        resolution_ms: i64,
        limit: usize,
    ) -> Result<Vec<Point>, HistoryError> {
        let tx = self.db.begin_read().map_err(|e| self.err(&e))?;
        let table = match tx.open_table(TABLE) {
            Ok(t) => t,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(Vec::new()),
            Err(e) => return Err(self.err(&e)),
        };
        let p = prefix(key);
        let from = format!("{p}{}", time_hex(since.saturating_sub(resolution_ms - 1)));
        let to = format!("{p}{}", "f".repeat(16));
        let mut out = std::collections::VecDeque::new();
        for entry in table
            .range(from.as_str()..=to.as_str())
            .map_err(|e| self.err(&e))?
        {
            let (k, v) = entry.map_err(|e| self.err(&e))?;
            if let Some(point) = time_of(k.value()).and_then(|t| decode(t, v.value())) {
                if out.len() == limit {
                    out.pop_front();
                }
                out.push_back(point);
            }
        }
        Ok(out.into())
    }

    /// Writes `points` in one transaction, and removes each written series' points older than
    /// `retention_ms` before its newest written point. Durable when it returns `Ok`.
    pub fn write(&mut self, points: &[Dirty], retention_ms: i64) -> Result<(), HistoryError> {
        if points.is_empty() {
            return Ok(());
        }
        let tx = self.db.begin_write().map_err(|e| self.err(&e))?;
        {
            let mut table = tx.open_table(TABLE).map_err(|e| self.err(&e))?;
            let mut newest: std::collections::BTreeMap<&SeriesKey, i64> = Default::default();
            for d in points {
                let k = format!("{}{}", prefix(&d.key), time_hex(d.point.t));
                table
                    .insert(k.as_str(), encode(&d.point).as_slice())
                    .map_err(|e| self.err(&e))?;
                let n = newest.entry(&d.key).or_insert(d.point.t);
                *n = (*n).max(d.point.t);
            }
            for (key, t) in newest {
                let p = prefix(key);
                let from = format!("{p}{}", time_hex(i64::MIN));
                let to = format!("{p}{}", time_hex(t.saturating_sub(retention_ms)));
                table
                    .retain_in(from.as_str()..to.as_str(), |_, _| false)
                    .map_err(|e| self.err(&e))?;
            }
        }
        tx.commit().map_err(|e| self.err(&e))
    }

    /// Removes every point of a bucket that started before `cutoff` (series no longer written
    /// are pruned here); returns how many.
    pub fn prune_before(&mut self, cutoff: i64) -> Result<usize, HistoryError> {
        let tx = self.db.begin_write().map_err(|e| self.err(&e))?;
        let mut removed = 0;
        {
            let mut table = tx.open_table(TABLE).map_err(|e| self.err(&e))?;
            table
                .retain(|k, _| {
                    let old = time_of(k).is_none_or(|t| t < cutoff);
                    removed += usize::from(old);
                    !old
                })
                .map_err(|e| self.err(&e))?;
        }
        tx.commit().map_err(|e| self.err(&e))?;
        Ok(removed)
    }

    /// How many points are stored.
    pub fn len(&self) -> Result<u64, HistoryError> {
        let tx = self.db.begin_read().map_err(|e| self.err(&e))?;
        match tx.open_table(TABLE) {
            Ok(t) => t.len().map_err(|e| self.err(&e)),
            Err(redb::TableError::TableDoesNotExist(_)) => Ok(0),
            Err(e) => Err(self.err(&e)),
        }
    }

    /// Whether no point is stored.
    pub fn is_empty(&self) -> Result<bool, HistoryError> {
        Ok(self.len()? == 0)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn key(d: &str, p: &str) -> SeriesKey {
        SeriesKey {
            device: d.into(),
            property: p.into(),
        }
    }

    fn dirty(d: &str, p: &str, t: i64, v: f64) -> Dirty {
        Dirty {
            key: key(d, p),
            point: Point::first(t, v),
        }
    }

    #[test]
    fn keys_sort_by_time_across_the_sign() {
        let ts = [i64::MIN, -5, 0, 7, 1 << 40, i64::MAX];
        let hex: Vec<String> = ts.iter().map(|t| time_hex(*t)).collect();
        let mut sorted = hex.clone();
        sorted.sort();
        assert_eq!(hex, sorted);
        for t in ts {
            assert_eq!(time_of(&format!("d{SEP}p{SEP}{}", time_hex(t))), Some(t));
        }
    }

    #[test]
    fn points_survive_reopening_and_ranges_keep_to_their_series() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("history.redb");
        {
            let (mut s, _) = HistoryStore::open(&path).unwrap();
            let pts: Vec<Dirty> = (0..5)
                .map(|i| dirty("d", "p", i * 1000, i as f64))
                .chain([dirty("d", "q", 0, 9.0), dirty("d2", "p", 0, 9.0)])
                .collect();
            s.write(&pts, 1_000_000).unwrap();
        }
        let (s, salvaged) = HistoryStore::open(&path).unwrap();
        assert_eq!(salvaged, 0);
        let got: Vec<i64> = s
            .range(&key("d", "p"), 2_500, 1000, 100)
            .unwrap()
            .iter()
            .map(|p| p.t)
            .collect();
        assert_eq!(
            got,
            vec![2000, 3000, 4000],
            "the bucket holding `since` is included"
        );
        let newest: Vec<i64> = s
            .range(&key("d", "p"), 0, 1000, 2)
            .unwrap()
            .iter()
            .map(|p| p.t)
            .collect();
        assert_eq!(newest, vec![3000, 4000], "a limit keeps the newest points");
        assert_eq!(s.get(&key("d", "q"), 0).unwrap().map(|p| p.last), Some(9.0));
        assert_eq!(s.len().unwrap(), 7);
    }

    #[test]
    fn a_write_prunes_its_series_past_the_retention_and_prune_before_the_rest() {
        let dir = tempfile::tempdir().unwrap();
        let (mut s, _) = HistoryStore::open(&dir.path().join("h.redb")).unwrap();
        let pts: Vec<Dirty> = (0..10).map(|i| dirty("d", "p", i * 1000, 1.0)).collect();
        s.write(&pts, 1_000_000).unwrap();
        s.write(&[dirty("other", "p", 0, 1.0)], 1_000_000).unwrap();
        s.write(&[dirty("d", "p", 10_000, 1.0)], 3_000).unwrap();
        let left: Vec<i64> = s
            .range(&key("d", "p"), i64::MIN + 1000, 1000, 100)
            .unwrap()
            .iter()
            .map(|p| p.t)
            .collect();
        assert_eq!(left, vec![7000, 8000, 9000, 10_000]);
        assert_eq!(
            s.len().unwrap(),
            5,
            "another series is not pruned by this write"
        );
        assert_eq!(s.prune_before(8000).unwrap(), 2);
        assert_eq!(s.len().unwrap(), 3);
    }

    #[test]
    fn a_damaged_file_is_moved_aside_and_a_fresh_one_opens() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("h.redb");
        std::fs::write(&path, b"this is not a redb file, it is text").unwrap();
        let (s, _) = HistoryStore::open(&path).unwrap();
        assert_eq!(s.len().unwrap(), 0);
        let aside = std::fs::read_dir(dir.path())
            .unwrap()
            .filter_map(Result::ok)
            .any(|e| {
                e.file_name()
                    .to_string_lossy()
                    .starts_with("h.redb.corrupt-")
            });
        assert!(aside, "the damaged file is kept aside");
    }
}
