//! What every redb file of the node (twin store, outbox, container command ids) does the same
//! way when the file is damaged: tell corruption apart from other open errors, and move the
//! corrupt file aside as `<name>.corrupt-<unix ms>` (never delete it) so the node starts with a
//! fresh file and the damaged one can be inspected. Also the one atomic write of the files the
//! node keeps beside its databases.

use std::path::{Path, PathBuf};
use std::sync::Arc;

pub mod faults;

/// How a store (re)opens its database: the real file, or a test backend over it. A store keeps
/// its opener so that it can reopen the file after an I/O error (redb refuses every operation
/// after one until the database is closed and opened again).
pub type Opener =
    Arc<dyn Fn(&redb::Builder) -> Result<redb::Database, redb::DatabaseError> + Send + Sync>;

/// The page cache of each of the node's redb files. redb's default is 1 GiB per database, which
/// an edge box with 0.5 GB cannot give; the node's files are small and read mostly at open
/// (the twin store keeps every twin in memory, the outbox reads its head), so a few MiB keep
/// the hot pages without making memory grow with the file.
pub const CACHE_BYTES: usize = 4 * 1024 * 1024;

/// The opener of the file at `path` (created when missing).
pub fn file_opener(path: &Path) -> Opener {
    let file = path.to_path_buf();
    Arc::new(move |b: &redb::Builder| b.create(&file))
}

/// Whether an error means the database must be closed and opened again before it can be used
/// (redb's "previous I/O error" state, or any I/O failure of the backend).
pub fn needs_reopen(e: &redb::StorageError) -> bool {
    matches!(
        e,
        redb::StorageError::Io(_) | redb::StorageError::PreviousIo
    )
}

/// Whether opening failed because the file is damaged or not a redb database (as opposed to,
/// say, permissions or a full disk, which must not cost the data).
pub fn is_corruption(e: &redb::DatabaseError) -> bool {
    match e {
        redb::DatabaseError::Storage(s) => is_corrupt_storage(s),
        _ => false,
    }
}

/// Whether a storage error means the file's contents are damaged.
pub fn is_corrupt_storage(e: &redb::StorageError) -> bool {
    match e {
        redb::StorageError::Corrupted(_) => true,
        redb::StorageError::Io(io) => io.kind() == std::io::ErrorKind::InvalidData,
        _ => false,
    }
}

/// The name a corrupt file is moved to: `<name>.corrupt-<now_ms>` beside it.
pub fn corrupt_name(path: &Path, now_ms: i64) -> PathBuf {
    let mut name = path
        .file_name()
        .map(|n| n.to_os_string())
        .unwrap_or_default();
    name.push(format!(".corrupt-{now_ms}"));
    path.with_file_name(name)
}

/// A corrupt file that could not be renamed aside.
#[derive(Debug)]
pub struct MoveAsideError {
    /// Where it was to go.
    pub to: PathBuf,
    /// Why the rename failed.
    pub source: std::io::Error,
}

impl std::fmt::Display for MoveAsideError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "cannot rename to {}: {}", self.to.display(), self.source)
    }
}

impl std::error::Error for MoveAsideError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.source)
    }
}

/// Reads what still can be read from a damaged file that was moved aside: `read` gets the
/// database opened without the integrity check and pushes every item it can decode. It runs on
/// a scratch copy (the damaged file stays as it was, for inspection) and behind `catch_unwind`,
/// because redb's debug builds panic on some damage; whatever was pushed before a failure is kept.
pub fn salvage<T>(damaged: &Path, read: impl FnOnce(&redb::Database, &mut Vec<T>)) -> Vec<T> {
    let mut scratch = damaged.as_os_str().to_owned();
    scratch.push(".salvage");
    let scratch = PathBuf::from(scratch);
    if std::fs::copy(damaged, &scratch).is_err() {
        return Vec::new();
    }
    tracing::warn!(
        file = %damaged.display(),
        "reading back what can still be read from the damaged file (redb may print internal errors while it walks damaged pages)"
    );
    let out = std::sync::Mutex::new(Vec::new());
    let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let mut builder = redb::Database::builder();
        builder.set_cache_size(CACHE_BYTES);
        if let Ok(db) = builder.create(&scratch) {
            let mut items = out
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            read(&db, &mut items);
        }
    }));
    let _ = std::fs::remove_file(&scratch);
    out.into_inner()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Every entry of a `&str -> &[u8]` table, the shape of the node's small key-value files
/// (clients' retained messages, kept sessions); none when the table does not exist yet.
pub fn read_str_bytes(
    db: &redb::Database,
    table: redb::TableDefinition<&str, &[u8]>,
    out: &mut Entries,
) -> Result<(), redb::Error> {
    use redb::{ReadableDatabase, ReadableTable};
    let tx = db.begin_read()?;
    let t = match tx.open_table(table) {
        Ok(t) => t,
        Err(redb::TableError::TableDoesNotExist(_)) => return Ok(()),
        Err(e) => return Err(e.into()),
    };
    for entry in t.iter()? {
        let (k, v) = entry?;
        out.push((k.value().to_string(), v.value().to_vec()));
    }
    Ok(())
}

/// The entries of a `&str -> &[u8]` table, key and value.
pub type Entries = Vec<(String, Vec<u8>)>;

/// Why [`create_salvaging`] could not open a file.
#[derive(Debug)]
pub enum SalvagingError {
    /// redb cannot create or open it.
    Open(redb::DatabaseError),
    /// It was damaged and could not be moved aside.
    MoveAside(MoveAsideError),
}

impl std::fmt::Display for SalvagingError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SalvagingError::Open(e) => e.fmt(f),
            SalvagingError::MoveAside(e) => e.fmt(f),
        }
    }
}

impl std::error::Error for SalvagingError {}

/// Opens (or creates) a small key-value file at `path`. One that does not open as a database is
/// moved aside (logged as `what`) and the entries of `table` that still read in it come back
/// with the fresh database, for the caller to write into it.
pub fn create_salvaging(
    path: &Path,
    table: redb::TableDefinition<&str, &[u8]>,
    what: &str,
) -> Result<(redb::Database, Entries), SalvagingError> {
    let mut builder = redb::Database::builder();
    builder.set_cache_size(CACHE_BYTES);
    match builder.create(path) {
        Ok(db) => Ok((db, Vec::new())),
        Err(e) if is_corruption(&e) => {
            let aside = move_aside(path).map_err(SalvagingError::MoveAside)?;
            tracing::warn!(path = %path.display(), moved_to = %aside.display(), error = %e, "damaged {what} moved aside");
            let salvaged = salvage(&aside, |db, out| {
                let _ = read_str_bytes(db, table, out);
            });
            let db = builder.create(path).map_err(SalvagingError::Open)?;
            Ok((db, salvaged))
        }
        Err(e) => Err(SalvagingError::Open(e)),
    }
}

/// Renames a corrupt file aside (see [`corrupt_name`]) and returns where it went.
pub fn move_aside(path: &Path) -> Result<PathBuf, MoveAsideError> {
    let to = corrupt_name(path, edgetwin_contract::now_ms());
    match std::fs::rename(path, &to) {
        Ok(()) => Ok(to),
        Err(source) => Err(MoveAsideError { to, source }),
    }
}

/// Writes `bytes` to `path` through `<path>.tmp` and a rename, both synced, so a crash leaves
/// either the old file or the new one whole: for the files the node keeps beside its databases
/// (the twin store's snapshot, the profile cache, applied profiles). The folder must exist.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)?;
    // The rename is durable once the folder is synced; a folder that cannot be opened for that
    // (some file systems) leaves the file written all the same.
    if let Some(dir) = path.parent() {
        if let Ok(d) = std::fs::File::open(dir) {
            let _ = d.sync_all();
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redbfile_atomic_write_replaces_the_file_whole_and_leaves_no_temporary() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("f.json");
        write_atomically(&path, b"old").expect("first write");
        write_atomically(&path, b"new").expect("second write");
        assert_eq!(std::fs::read(&path).expect("read"), b"new");
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .expect("list")
            .map(|e| e.expect("entry").file_name())
            .collect();
        assert_eq!(names, ["f.json"]);
    }

    #[test]
    fn redbfile_garbage_file_is_corruption_and_is_moved_aside() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("x.redb");
        std::fs::write(&path, vec![0x5a; 8192]).expect("write garbage");
        let err = redb::Database::create(&path).expect_err("garbage is not a database");
        assert!(is_corruption(&err), "{err}");
        let to = move_aside(&path).expect("rename");
        assert!(!path.exists() && to.exists());
        assert!(to
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with("x.redb.corrupt-")));
    }

    #[test]
    fn redbfile_corrupt_name_keeps_the_folder() {
        let p = corrupt_name(Path::new("/data/twins.redb"), 42);
        assert_eq!(p, PathBuf::from("/data/twins.redb.corrupt-42"));
    }
}
