//! The write barrier: how a snapshot holds the mount's changes still for a moment.
//!
//! Every FUSE operation that changes the filesystem (write, create, fsync, close, rename,
//! unlink, setattr, ...) enters the barrier, shared, before it takes any other lock; a snapshot
//! closes it (exclusively), which waits for the operations inside to finish and holds new ones
//! until it reopens. What was acknowledged before the close is then exactly what the journal
//! holds. Reads never wait.

use std::sync::Arc;

use tokio::sync::{OwnedRwLockWriteGuard, RwLock, RwLockReadGuard};

/// See the module documentation. Clones share one barrier.
#[derive(Debug, Clone, Default)]
pub struct WriteBarrier(Arc<RwLock<()>>);

/// Holds the barrier closed until dropped.
pub type Closed = OwnedRwLockWriteGuard<()>;

impl WriteBarrier {
    /// Enters from a thread outside the runtime (a FUSE thread); waits while it is closed.
    pub fn enter_blocking(&self) -> RwLockReadGuard<'_, ()> {
        self.0.blocking_read()
    }

    /// Enters from a task; waits while it is closed.
    pub async fn enter(&self) -> RwLockReadGuard<'_, ()> {
        self.0.read().await
    }

    /// Closes the barrier once every operation inside has left (tokio's lock is fair: those
    /// arriving meanwhile wait behind this).
    pub async fn close(&self) -> Closed {
        Arc::clone(&self.0).write_owned().await
    }
}
