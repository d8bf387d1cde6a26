//! A failing storage backend for tests of what a store does when the disk fills up: a file
//! backend that refuses writes once a shared byte budget is spent (`ErrorKind::StorageFull`, as
//! the kernel's ENOSPC). The budget can be refilled, which is "an operator freed space".
//!
//! It lives here, not in one store's tests, because the twin store, the outbox and the node's
//! readiness tests all need the same disk.

use std::ops::Bound;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use crate::Opener;

/// How many bytes may still be written through every backend sharing it.
#[derive(Debug, Clone)]
pub struct DiskBudget(Arc<AtomicU64>);

impl Default for DiskBudget {
    fn default() -> Self {
        DiskBudget::unlimited()
    }
}

impl DiskBudget {
    /// A disk that never fills up.
    pub fn unlimited() -> DiskBudget {
        DiskBudget(Arc::new(AtomicU64::new(u64::MAX)))
    }

    /// Allows `bytes` more bytes to be written, then every write fails.
    pub fn set(&self, bytes: u64) {
        self.0.store(bytes, Ordering::SeqCst);
    }

    /// The disk is full from now on.
    pub fn fill(&self) {
        self.set(0);
    }

    /// Space was freed: writes succeed again.
    pub fn free(&self) {
        self.set(u64::MAX);
    }

    fn spend(&self, n: u64) -> std::io::Result<()> {
        self.0
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |left| {
                left.checked_sub(n)
            })
            .map(|_| ())
            .map_err(|_| std::io::Error::from(std::io::ErrorKind::StorageFull))
    }
}

/// The opener of the file at `path` through a backend that spends `budget` on every write.
pub fn budget_opener(path: &Path, budget: DiskBudget) -> Opener {
    let file = path.to_path_buf();
    Arc::new(move |b: &redb::Builder| {
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&file)?;
        b.create_with_backend(Budgeted {
            inner: redb::backends::FileBackend::new(f)?,
            budget: budget.clone(),
        })
    })
}

/// A file backend whose writes spend a [`DiskBudget`].
#[derive(Debug)]
struct Budgeted {
    inner: redb::backends::FileBackend,
    budget: DiskBudget,
}

impl redb::StorageBackend for Budgeted {
    fn len(&self) -> Result<u64, std::io::Error> {
        self.inner.len()
    }
    fn read(&self, offset: u64, out: &mut [u8]) -> Result<(), std::io::Error> {
        self.inner.read(offset, out)
    }
    // Growing a file only reserves a sparse range, as on a real file system: the space is spent
    // when it is written.
    fn set_len(&self, len: u64) -> Result<(), std::io::Error> {
        self.inner.set_len(len)
    }
    fn sync_data(&self) -> Result<(), std::io::Error> {
        self.inner.sync_data()
    }
    fn write(&self, offset: u64, data: &[u8]) -> Result<(), std::io::Error> {
        self.budget.spend(data.len() as u64)?;
        self.inner.write(offset, data)
    }
    fn close(&self) -> Result<(), std::io::Error> {
        self.inner.close()
    }
    fn try_lock_range(
        &self,
        start: Bound<u64>,
        end: Bound<u64>,
    ) -> Result<bool, redb::BackendError> {
        self.inner.try_lock_range(start, end)
    }
    fn try_lock_shared_range(
        &self,
        start: Bound<u64>,
        end: Bound<u64>,
    ) -> Result<bool, redb::BackendError> {
        self.inner.try_lock_shared_range(start, end)
    }
    fn lock_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<(), redb::BackendError> {
        self.inner.lock_range(start, end)
    }
    fn lock_shared_range(
        &self,
        start: Bound<u64>,
        end: Bound<u64>,
    ) -> Result<(), redb::BackendError> {
        self.inner.lock_shared_range(start, end)
    }
    fn unlock_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<(), redb::BackendError> {
        self.inner.unlock_range(start, end)
    }
    fn query_lock_range(
        &self,
        start: Bound<u64>,
        end: Bound<u64>,
    ) -> Result<bool, redb::BackendError> {
        self.inner.query_lock_range(start, end)
    }
}
