//! The write side of a read-write mount: written files, uploads, and room in the cache.

use std::sync::Arc;
use std::time::Duration;

use crate::config::Durability;
use crate::error::FsError;
use crate::write::{DirtyFiles, FileId, Uploader};

/// The write side of a read-write mount.
pub struct Writes<S> {
    pub dirty: Arc<DirtyFiles>,
    pub uploader: Uploader<S>,
    pub durability: Durability,
    pub max_cache_size: Option<u64>,
    /// Set when a stop signal arrived: no new writes, uploads drain before unmounting.
    pub stopping: Arc<std::sync::atomic::AtomicBool>,
    /// Clean blocks on the cache disk, which give way to written data.
    pub disk_cache: Option<Arc<crate::cache::DiskCache>>,
    /// Directory renames in progress, finished by the next start after a crash.
    pub renames: crate::write::renames::DirRenames,
    /// What every change enters; a snapshot closes it (see [`crate::write::barrier`]).
    pub barrier: crate::write::WriteBarrier,
}

/// Space kept free on the cache disk for journal records, so that acknowledging what was
/// written never fails for lack of room.
const DISK_RESERVE: u64 = 1 << 20;

/// How long a write waits for uploads to free cache space before failing with ENOSPC.
const CACHE_FULL_WAIT: Duration = Duration::from_secs(30);

impl<S: crate::store::ObjectStore> Writes<S> {
    /// With `--durability remote`, uploads `key` now and returns the upload's error: what a
    /// file's or a directory's fsync waits for after making the file durable locally.
    pub(crate) async fn upload_if_remote(&self, key: &str) -> Result<(), FsError> {
        if self.durability != Durability::Remote {
            return Ok(());
        }
        self.uploader
            .upload_now(key)
            .await
            .map_err(|source| FsError::Upload {
                key: key.to_owned(),
                source,
            })
    }
}

impl<S> Writes<S> {
    /// Writes through an open handle of file `fid`.
    pub(crate) fn write(&self, fid: FileId, offset: u64, bytes: &[u8]) -> Result<(), FsError> {
        Ok(self.dirty.write(fid, offset, bytes)?)
    }

    /// Whether `len` more bytes fit under `--max-cache-size` and on the cache disk, keeping
    /// [`DISK_RESERVE`] free there for the journal records that acknowledge them.
    pub(crate) fn has_room(&self, len: u64) -> bool {
        if let Some(disk) = &self.disk_cache {
            let clean = disk.usage().0;
            if clean > 0 && !self.room_for(len, clean) {
                // Clean cached blocks go first (least recently used), then writers wait.
                let over_limit = self.max_cache_size.map_or(0, |limit| {
                    (self.dirty.cache_bytes() + clean + len).saturating_sub(limit)
                });
                let short_on_disk = self.dirty.disk_space().map_or(0, |(_, available)| {
                    (len + DISK_RESERVE).saturating_sub(available)
                });
                disk.evict(over_limit.max(short_on_disk).max(len));
            }
            return self.room_for(len, disk.usage().0);
        }
        self.room_for(len, 0)
    }

    /// Whether `len` more bytes fit beside `clean` bytes of cached blocks.
    fn room_for(&self, len: u64, clean: u64) -> bool {
        let under_limit = self
            .max_cache_size
            .is_none_or(|limit| self.dirty.cache_bytes() + clean + len <= limit);
        // If the disk can't be asked, the write itself will tell.
        let on_disk = match self.dirty.disk_space() {
            Ok((_, available)) => available >= len + DISK_RESERVE,
            Err(_) => true,
        };
        under_limit && on_disk
    }

    /// Waits (bounded) until `len` more bytes fit; `ENOSPC` if they don't.
    pub(crate) async fn wait_for_room(&self, len: u64) -> Result<(), FsError> {
        let deadline = tokio::time::Instant::now() + CACHE_FULL_WAIT;
        while !self.has_room(len) {
            if tokio::time::Instant::now() >= deadline {
                let available = self.dirty.disk_space().map_or(0, |(_, a)| a);
                return Err(FsError::Local(
                    format!(
                        "no room in the cache: {} bytes of written data held, {available} bytes free on the cache disk (limit --max-cache-size {:?}); uploads did not free space in time",
                        self.dirty.cache_bytes(),
                        self.max_cache_size
                    ),
                    Some(libc::ENOSPC),
                ));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(())
    }

    /// (total, available) bytes for `statfs`: the cache disk, within `--max-cache-size`.
    pub(crate) fn space(&self) -> std::io::Result<(u64, u64)> {
        let (total, available) = self.dirty.disk_space()?;
        Ok(match self.max_cache_size {
            None => (total, available),
            Some(limit) => (
                total.min(limit),
                available.min(limit.saturating_sub(self.dirty.cache_bytes())),
            ),
        })
    }
}
