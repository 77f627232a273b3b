//! The filesystem's operations, independent of FUSE: open files and their handles, reads,
//! writes and namespace changes. `fs` translates kernel requests into these calls and replies;
//! the S3 side of each operation lives here and below (namespace, prefetch, write, store).

use std::collections::HashMap;
use std::ffi::OsStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use fuser::{FopenFlags, OpenFlags};

use crate::config::Durability;
use crate::error::FsError;
use crate::namespace::{
    Attr, Listed, MAX_SYMLINK_TARGET, Namespace, NodeKind, stored_metadata, stored_metadata_of,
    with_times,
};
use crate::prefetch::{BlockFetcher, FileReader, ObjectVersion, PrefetchConfig};
use crate::store::{ObjectStore, Precondition};
use crate::write::local::fetch_missing;
use crate::write::{DirtyAttr, DirtyFiles, FileId, LocalData, Uploader};

pub(crate) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Handle tables are plain maps: a panic elsewhere cannot leave them half-updated.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Reply buffers for reads, reused: a fresh 1 MiB allocation per read costs page faults and
/// page zeroing in the kernel, which showed up as a tenth of the CPU of a sequential read.
#[derive(Default)]
pub(crate) struct BufferPool {
    free: Mutex<Vec<Vec<u8>>>,
}

impl BufferPool {
    const KEEP: usize = 64;

    pub(crate) fn take(&self) -> Vec<u8> {
        lock(&self.free).pop().unwrap_or_default()
    }

    pub(crate) fn give(&self, mut buf: Vec<u8>) {
        buf.clear();
        let mut free = lock(&self.free);
        if free.len() < Self::KEEP {
            free.push(buf);
        }
    }
}

/// What a file handle reads from.
pub(crate) enum Handle<S> {
    /// A clean object in S3, pinned to the version seen at open.
    Remote(Arc<RemoteFile<S>>),
    /// Dirty file `fid` (its data file held open, wherever its name goes); `writer` handles
    /// may change it.
    Local {
        ino: u64,
        fid: FileId,
        writer: bool,
        data: Arc<LocalData>,
    },
}

/// An object open for reading. When this mount deletes or replaces it while it is open, its
/// bytes are copied to the cache disk first and the handle reads them from there; when this
/// mount starts writing it, the handle reads the written file. Either way a descriptor keeps
/// reading the file it opened, as on a local disk.
pub(crate) struct RemoteFile<S> {
    pub(crate) reader: FileReader<S>,
    pub(crate) detached: std::sync::OnceLock<Detached>,
}

/// Where a [`RemoteFile`] reads from instead of S3.
#[derive(Clone)]
pub(crate) enum Detached {
    /// A complete copy of its version.
    Copy(Arc<LocalData>),
    /// The same inode, now written by this mount: dirty file `fid`.
    Written(FileId, Arc<LocalData>),
}

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
}

/// Largest object copied to the cache disk so that an inode the kernel still holds stays
/// openable after this mount renamed another file over it or unlinked it (see
/// [`Vfs::pin_replaced`]): small files (configuration replaced by rename) are the case that
/// matters; beyond this an open racing with the change gets ESTALE.
const PIN_COPY_LIMIT: u64 = 16 << 20;

/// Space kept free on the cache disk for journal records, so that acknowledging what was
/// written never fails for lack of room.
const DISK_RESERVE: u64 = 1 << 20;

/// How long a write waits for uploads to free cache space before failing with ENOSPC.
const CACHE_FULL_WAIT: Duration = Duration::from_secs(30);

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

pub(crate) struct Vfs<S> {
    pub(crate) namespace: Namespace<S>,
    pub(crate) fetcher: Arc<BlockFetcher<S>>,
    pub(crate) prefetch: PrefetchConfig,
    pub(crate) store: Arc<S>,
    /// `None` on read-only mounts.
    pub(crate) writes: Option<Writes<S>>,
    pub(crate) files: Mutex<HashMap<u64, Handle<S>>>,
    /// Dirty files unlinked or renamed over while the kernel still held their inode: kept
    /// (as an open handle would keep them) until the kernel forgets the inode, so an `open`
    /// that resolved the name just before the change still opens the file it found.
    pub(crate) pinned: Mutex<HashMap<u64, FileId>>,
    /// Held while a clean object becomes a written file (see [`Vfs::make_dirty`]).
    pub(crate) dirtying: tokio::sync::Mutex<()>,
    /// Bumped each time readers are detached (see [`Vfs::detach_readers`]): an open that
    /// raced with a removal detaches its own handle.
    pub(crate) removals: AtomicU64,
    pub(crate) dirs: Mutex<HashMap<u64, Arc<Vec<Listed>>>>,
    pub(crate) next_handle: AtomicU64,
    pub(crate) buffers: BufferPool,
}

impl<S: ObjectStore> Vfs<S> {
    pub(crate) fn ttl(&self) -> Duration {
        self.namespace.ttl()
    }

    pub(crate) fn new_handle(&self) -> u64 {
        self.next_handle.fetch_add(1, Ordering::Relaxed)
    }

    pub(crate) fn reader(&self, object: ObjectVersion) -> FileReader<S> {
        FileReader::new(Arc::clone(&self.fetcher), object, self.prefetch)
    }

    pub(crate) async fn open_reader(&self, ino: u64) -> Result<(FileReader<S>, bool), FsError> {
        let opened = self.namespace.open(ino).await?;
        let object = ObjectVersion {
            key: opened.key.into(),
            etag: opened.etag.into(),
            size: opened.size,
        };
        Ok((self.reader(object), opened.keep_cache))
    }

    pub(crate) async fn readlink(&self, ino: u64) -> Result<Vec<u8>, FsError> {
        let (reader, _) = self.open_reader(ino).await?;
        if reader.object().size > u64::from(MAX_SYMLINK_TARGET) {
            return Err(FsError::InvalidArgument);
        }
        reader.read(0, MAX_SYMLINK_TARGET).await
    }

    pub(crate) fn writes(&self) -> Result<&Writes<S>, FsError> {
        self.writes.as_ref().ok_or(FsError::ReadOnly)
    }

    /// Like [`Vfs::writes`], for operations that start a change: refused (`EROFS`) once
    /// keepfs is stopping. Handles already open keep writing and closing.
    pub(crate) fn new_writes(&self) -> Result<&Writes<S>, FsError> {
        let writes = self.writes()?;
        if writes.stopping.load(Ordering::Relaxed) {
            return Err(FsError::ReadOnly);
        }
        Ok(writes)
    }

    /// The dirty file behind handle `fh` and whether the handle may write.
    pub(crate) fn handle_file(&self, fh: u64) -> Option<(FileId, bool)> {
        match lock(&self.files).get(&fh)? {
            Handle::Local { fid, writer, .. } => Some((*fid, *writer)),
            Handle::Remote(_) => None,
        }
    }

    pub(crate) fn local_handle(&self, ino: u64, fid: FileId, writer: bool) -> Result<u64, FsError> {
        let data = self.writes()?.dirty.opened(fid, writer)?;
        Ok(self.insert_handle(Handle::Local {
            ino,
            fid,
            writer,
            data,
        }))
    }

    /// Drops `n` kernel references to `ino`; a file kept for the inode goes with the last.
    pub(crate) fn forget(&self, ino: u64, n: u64) {
        let mut pinned = lock(&self.pinned);
        if self.namespace.forget(ino, n)
            && let Some(fid) = pinned.remove(&ino)
            && let Some(writes) = &self.writes
        {
            writes.dirty.released(fid, false);
        }
    }

    /// Keeps the file at `key`, about to be unlinked or renamed over, for inode `ino` while the
    /// kernel holds it: a dirty file with a complete local copy, or (`copy_clean`: renames
    /// over it, the atomic-replace pattern whose readers race with it) an object of up to
    /// [`PIN_COPY_LIMIT`] bytes copied to the cache disk. Others (an edited file with bytes
    /// still in S3, a large or unlinked object) are not kept: an open of the inode gets ESTALE
    /// and the kernel looks the name up again.
    async fn pin_replaced(&self, ino: u64, key: &str, copy_clean: bool) {
        let Ok(writes) = self.writes() else { return };
        let Some(fid) = writes.dirty.id_of(key) else {
            if copy_clean {
                self.pin_copy(ino, key).await;
            }
            return;
        };
        let complete = writes
            .dirty
            .data(key)
            .is_ok_and(|d| d.coverage().complete());
        let mut pinned = lock(&self.pinned);
        if !complete || !self.namespace.is_known(ino) || writes.dirty.opened(fid, false).is_err() {
            return;
        }
        if let Some(old) = pinned.insert(ino, fid) {
            writes.dirty.released(old, false);
        }
    }

    /// [`Vfs::pin_replaced`] for a clean object.
    async fn pin_copy(&self, ino: u64, key: &str) {
        let Ok(writes) = self.writes() else { return };
        let Some((etag, attr)) = self.namespace.version_of(ino) else {
            return;
        };
        if attr.size > PIN_COPY_LIMIT || lock(&self.pinned).contains_key(&ino) {
            return;
        }
        let reader = self.reader(ObjectVersion {
            key: key.into(),
            etag: etag.into(),
            size: attr.size,
        });
        let data = match self.copy_out(&writes.dirty, &reader).await {
            Ok(data) => data,
            Err(e) => {
                tracing::debug!(key, error = %e, "could not keep a replaced object for its inode");
                return;
            }
        };
        let dirty_attr = DirtyAttr {
            size: attr.size,
            mode: libc::S_IFREG | u32::from(attr.perm),
            uid: attr.uid,
            gid: attr.gid,
            mtime: attr.mtime,
            atime: attr.atime,
            ctime: attr.ctime,
        };
        let fid = writes.dirty.unlinked_copy(data, dirty_attr);
        let mut pinned = lock(&self.pinned);
        if self.namespace.is_known(ino) && !pinned.contains_key(&ino) {
            pinned.insert(ino, fid);
        } else {
            writes.dirty.released(fid, false);
        }
    }

    /// The dirty file of inode `ino`: the one linked at its name, or, for an inode whose name
    /// went (unlinked, renamed over), the one kept for it or its open handles hold.
    fn dirty_file(&self, ino: u64) -> Option<FileId> {
        if let Some(key) = self.namespace.dirty_key(ino) {
            return self.writes.as_ref()?.dirty.id_of(&key);
        }
        if self.namespace.is_linked(ino) {
            return None;
        }
        if let Some(fid) = lock(&self.pinned).get(&ino) {
            return Some(*fid);
        }
        lock(&self.files).values().find_map(|h| match h {
            Handle::Local { ino: i, fid, .. } if *i == ino => Some(*fid),
            _ => None,
        })
    }

    /// Attributes of `ino`, of its dirty file when it has one (also after its name went).
    pub(crate) async fn getattr(&self, ino: u64, fh: Option<u64>) -> Result<Attr, FsError> {
        let fid = fh
            .and_then(|fh| self.handle_file(fh))
            .map(|(fid, _)| fid)
            .or_else(|| self.dirty_file(ino));
        if let Some(fid) = fid
            && let Some(attr) = self.writes()?.dirty.attr_of(fid)
        {
            return Ok(self.namespace.refresh_dirty(ino, &attr));
        }
        self.namespace.getattr(ino).await
    }

    /// Makes the readers of objects this mount is about to delete or replace (keys for which
    /// `doomed` holds) read from a local copy instead: each such version is copied to the
    /// cache disk once (through the block caches). Best effort: a reader whose copy fails keeps
    /// reading S3 and gets EIO once its version is gone.
    pub(crate) async fn detach_readers(&self, doomed: impl Fn(&str) -> bool) {
        let Ok(writes) = self.writes() else { return };
        self.removals.fetch_add(1, Ordering::SeqCst);
        let mut groups: HashMap<(String, String), Vec<Arc<RemoteFile<S>>>> = HashMap::new();
        for handle in lock(&self.files).values() {
            if let Handle::Remote(file) = handle
                && file.detached.get().is_none()
                && doomed(&file.reader.object().key)
            {
                let object = file.reader.object();
                groups
                    .entry((object.key.to_string(), object.etag.to_string()))
                    .or_default()
                    .push(file.clone());
            }
        }
        for ((key, _), files) in groups {
            match self.copy_out(&writes.dirty, &files[0].reader).await {
                Ok(data) => {
                    for file in files {
                        let _ = file.detached.set(Detached::Copy(data.clone()));
                    }
                }
                Err(e) => {
                    tracing::warn!(key, error = %e, "could not keep an open file's bytes before removing it; its readers will get EIO")
                }
            }
        }
    }

    /// Copies every byte of `reader`'s version to a scratch file.
    async fn copy_out(
        &self,
        dirty: &DirtyFiles,
        reader: &FileReader<S>,
    ) -> Result<Arc<LocalData>, FsError> {
        use std::os::unix::fs::FileExt;
        let file = dirty.scratch_file()?;
        let size = reader.object().size;
        let mut buf = Vec::new();
        let mut offset = 0;
        while offset < size {
            let len = (size - offset).min(u64::from(crate::fs::MAX_IO_SIZE)) as u32;
            buf.clear();
            reader.read_into(offset, len, &mut buf).await?;
            if buf.is_empty() {
                return Err(FsError::Local(
                    format!("{}: short read", reader.object().key),
                    None,
                ));
            }
            file.write_all_at(&buf, offset)?;
            offset += buf.len() as u64;
        }
        Ok(dirty.detached_data(file))
    }

    pub(crate) fn insert_handle(&self, handle: Handle<S>) -> u64 {
        let fh = self.new_handle();
        lock(&self.files).insert(fh, handle);
        fh
    }

    /// Opens `ino` for reading and possibly writing. A clean object opened for writing becomes
    /// a dirty file first (its content fetched unless truncated).
    pub(crate) async fn open_file(
        &self,
        ino: u64,
        flags: OpenFlags,
    ) -> Result<(u64, FopenFlags), FsError> {
        let write = flags.0 & libc::O_ACCMODE != libc::O_RDONLY;
        let truncate = flags.0 & libc::O_TRUNC != 0;
        if !write && !truncate {
            // The local copy may be dropped between these two steps (its upload finished);
            // then S3 has the content.
            if let Some(fid) = self.dirty_file(ino)
                && let Ok(fh) = self.local_handle(ino, fid, false)
            {
                return Ok((fh, FopenFlags::empty()));
            }
            let removals = self.removals.load(Ordering::SeqCst);
            let (reader, keep_cache) = self.open_reader(ino).await?;
            let key = reader.object().key.to_string();
            let file = RemoteFile {
                reader,
                detached: std::sync::OnceLock::new(),
            };
            let fh = self.insert_handle(Handle::Remote(Arc::new(file)));
            if self.removals.load(Ordering::SeqCst) != removals && !self.namespace.is_linked(ino) {
                // Unlinked or replaced while this open was under way: keep what it opened.
                self.detach_readers(|k| k == key).await;
            }
            let flags = if keep_cache {
                FopenFlags::FOPEN_KEEP_CACHE
            } else {
                FopenFlags::empty()
            };
            return Ok((fh, flags));
        }
        let dirty = &self.new_writes()?.dirty;
        // A written file with no handle may be dropped at any moment (its upload finished):
        // then it is an object again and is made a written file anew.
        let mut attempts = 0;
        loop {
            attempts += 1;
            let opened = match self.dirty_file(ino) {
                Some(fid) => self.local_handle(ino, fid, true).and_then(|fh| {
                    if truncate {
                        let attr = dirty.set_attr(fid, Some(0), None, None, None, None, None)?;
                        self.namespace.refresh_dirty(ino, &attr);
                    }
                    Ok(fh)
                }),
                None => {
                    let fid = self.make_dirty(ino, truncate).await?;
                    self.local_handle(ino, fid, true)
                }
            };
            match opened {
                Err(FsError::NotFound) if attempts < 3 => continue,
                opened => return opened.map(|fh| (fh, FopenFlags::empty())),
            }
        }
    }

    /// Turns clean object `ino` into a dirty file with its attributes, based on the version S3
    /// holds now. Nothing is downloaded: the content (unless `empty`) is fetched on first touch.
    pub(crate) async fn make_dirty(&self, ino: u64, empty: bool) -> Result<FileId, FsError> {
        // Processes opening one object for writing at once (database backends do) must get
        // one written file, not one each: the check and the creation happen under one lock.
        let _one_at_a_time = self.dirtying.lock().await;
        if let Some(fid) = self.dirty_file(ino) {
            if empty {
                let attr =
                    self.writes()?
                        .dirty
                        .set_attr(fid, Some(0), None, None, None, None, None)?;
                self.namespace.refresh_dirty(ino, &attr);
            }
            return Ok(fid);
        }
        let attr = self.namespace.getattr(ino).await?;
        let opened = self.namespace.open(ino).await?;
        let dirty = &self.writes()?.dirty;
        let dirty_attr = DirtyAttr {
            size: 0,
            mode: libc::S_IFREG | u32::from(attr.perm),
            uid: attr.uid,
            gid: attr.gid,
            mtime: if empty {
                std::time::SystemTime::now()
            } else {
                attr.mtime
            },
            atime: attr.atime,
            ctime: if empty {
                std::time::SystemTime::now()
            } else {
                attr.ctime
            },
        };
        let key = opened.key;
        let base_etag = opened.etag.clone();
        let created = if empty {
            dirty.create(&key, dirty_attr, Some(opened.etag), &[])?
        } else {
            dirty.edit(&key, dirty_attr, opened.etag, opened.size)?
        };
        self.namespace.refresh_dirty(ino, &created);
        let fid = dirty.id_of(&key).ok_or(FsError::NotFound)?;
        // Descriptors that opened this version for reading go on with the written file (the
        // same inode), not with the version in S3 it replaces.
        let data = dirty.data(&key)?;
        for handle in lock(&self.files).values() {
            if let Handle::Remote(file) = handle
                && *file.reader.object().key == *key
                && *file.reader.object().etag == *base_etag
                && dirty.opened(fid, false).is_ok()
                && file
                    .detached
                    .set(Detached::Written(fid, data.clone()))
                    .is_err()
            {
                dirty.released(fid, false);
            }
        }
        Ok(fid)
    }

    /// Reads dirty file `fid` through handle data `data`, fetching bytes that are still the
    /// base object's first.
    pub(crate) async fn read_local(
        &self,
        fid: FileId,
        data: &Arc<LocalData>,
        offset: u64,
        size: u32,
    ) -> Result<Vec<u8>, FsError> {
        let end = offset + u64::from(size);
        if !data.missing(offset..end).is_empty() {
            // Whole MiBs, so a sequential reader of an edited file makes few requests.
            const ROUND: u64 = 1 << 20;
            let wide = offset / ROUND * ROUND..end.div_ceil(ROUND) * ROUND;
            // Renames and unlinks of open files fetch the base first, so a file with bytes
            // still in S3 is linked at its base object's key.
            let key = self
                .writes()?
                .dirty
                .key_of(fid)
                .ok_or_else(|| FsError::Local(format!("file {fid}: base object gone"), None))?;
            self.fetch_base(&key, data, wide).await?;
        }
        Ok(data.read(offset, u64::from(size))?)
    }

    /// Fetches the bytes of `range` that local copy `data` of `key` still lacks from its base
    /// object. If S3 holds another version than the recorded base and that version is this
    /// file's own upload (a crash kept its completion out of the journal), its bytes are the
    /// same there: it becomes the base and the fetch is retried.
    async fn fetch_base(
        &self,
        key: &str,
        data: &LocalData,
        range: std::ops::Range<u64>,
    ) -> Result<(), FsError> {
        let Some(etag) = data.base_etag() else {
            return Ok(()); // a new file: nothing is in S3
        };
        match fetch_missing(&*self.store, key, &etag, data, range.clone()).await {
            Err(crate::store::StoreError::PreconditionFailed) => {
                let dirty = &self.writes()?.dirty;
                let current = dirty.data(key).ok();
                if !current.is_some_and(|d| std::ptr::eq(Arc::as_ptr(&d), data)) {
                    // Uploaded and dropped meanwhile (the upload replaced the base): S3 has
                    // the whole file now, nothing local is left to complete.
                    return Ok(());
                }
                let origin = dirty.origin_of(key);
                let own = match origin {
                    Some(origin) => {
                        crate::write::upload::own_version(&*self.store, key, origin).await
                    }
                    None => None,
                };
                let (Some(origin), Some(own)) = (origin, own) else {
                    let changed = crate::store::StoreError::PreconditionFailed;
                    return Err(FsError::store(key, changed));
                };
                dirty.adopt(key, origin, &own);
                fetch_missing(&*self.store, key, &own, data, range)
                    .await
                    .map_err(|e| FsError::store(key, e))
            }
            result => result.map_err(|e| FsError::store(key, e)),
        }
    }

    /// Fetches everything of `key`'s local copy that is still the base object's.
    async fn complete_local(&self, key: &str) -> Result<(), FsError> {
        let dirty = &self.writes()?.dirty;
        let Ok(data) = dirty.data(key) else {
            return Ok(());
        };
        self.fetch_base(key, &data, 0..u64::MAX).await
    }

    /// Makes file `fid` durable (close, fsync): on the cache disk, off the async workers, and
    /// with `--durability remote` in S3 too. An unlinked file has nothing to keep.
    pub(crate) async fn persist(self: Arc<Self>, fid: FileId) -> Result<(), FsError> {
        let local = {
            let vfs = Arc::clone(&self);
            tokio::task::spawn_blocking(move || {
                let writes = vfs.writes()?;
                writes.dirty.persist_id(fid).map_err(FsError::from)
            })
        };
        local
            .await
            .unwrap_or_else(|e| Err(FsError::Local(e.to_string(), None)))?;
        let writes = self.writes()?;
        let Some(key) = writes.dirty.key_of(fid) else {
            return Ok(());
        };
        if writes.durability == Durability::Remote {
            writes
                .uploader
                .upload_now(&key)
                .await
                .map_err(|source| FsError::Upload {
                    key: key.clone(),
                    source,
                })?;
        }
        Ok(())
    }

    /// Makes `key` durable locally and, when nobody writes it, queues its upload.
    pub(crate) fn persist_and_queue(&self, key: &str) -> Result<(), FsError> {
        let writes = self.writes()?;
        writes.dirty.persist(key)?;
        if writes.dirty.snapshot(key).is_some() {
            writes.uploader.enqueue(key);
        }
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    pub(crate) async fn setattr(
        &self,
        ino: u64,
        fh: Option<u64>,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        mtime: Option<std::time::SystemTime>,
        atime: Option<std::time::SystemTime>,
    ) -> Result<Attr, FsError> {
        let nothing_to_change = mode.is_none()
            && uid.is_none()
            && gid.is_none()
            && size.is_none()
            && mtime.is_none()
            && atime.is_none();
        if nothing_to_change {
            return self.getattr(ino, fh).await;
        }
        let dirty = self.writes()?.dirty.clone();
        // Through the handle when there is one (ftruncate, fchmod): it reaches the file even
        // after its name went.
        let by_handle = fh.and_then(|fh| self.handle_file(fh)).map(|(fid, _)| fid);
        let mut attempts = 0;
        let (fid, attr) = loop {
            attempts += 1;
            let fid = match by_handle.or_else(|| self.dirty_file(ino)) {
                Some(fid) => fid,
                None if size.is_some() => self.make_dirty(ino, size == Some(0)).await?,
                None => {
                    return self
                        .replace_metadata(ino, mode, uid, gid, mtime, atime)
                        .await;
                }
            };
            match dirty.set_attr(fid, size, mode, uid, gid, mtime, atime) {
                Ok(attr) => break (fid, attr),
                // Dropped after its upload meanwhile: an object again.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound && attempts < 3 => continue,
                Err(e) => return Err(e.into()),
            }
        };
        let attr = self.namespace.refresh_dirty(ino, &attr);
        if let Some(key) = dirty.key_of(fid) {
            self.persist_and_queue(&key)?;
        }
        Ok(attr)
    }

    /// chmod/chown/utimens of something in S3: a self-copy of an object with new
    /// `x-amz-meta-*`, or a directory's marker written anew (created if it had none).
    pub(crate) async fn replace_metadata(
        &self,
        ino: u64,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        mtime: Option<std::time::SystemTime>,
        atime: Option<std::time::SystemTime>,
    ) -> Result<Attr, FsError> {
        let attr = self.namespace.getattr(ino).await?;
        let changed = Attr {
            perm: mode.map(|m| (m & 0o7777) as u16).unwrap_or(attr.perm),
            uid: uid.unwrap_or(attr.uid),
            gid: gid.unwrap_or(attr.gid),
            mtime: mtime.unwrap_or(attr.mtime),
            atime: atime.unwrap_or(attr.atime),
            ctime: std::time::SystemTime::now(),
            ..attr.clone()
        };
        let metadata = with_times(
            stored_metadata_of(
                attr.kind,
                u32::from(changed.perm),
                changed.uid,
                changed.gid,
                changed.mtime,
            ),
            changed.atime,
            changed.ctime,
        );
        if attr.kind == NodeKind::Directory {
            if ino == crate::namespace::ROOT_INO {
                return Err(FsError::NotSupported(
                    "changing attributes of the mount root",
                ));
            }
            let marker = self.namespace.marker_of(ino)?;
            self.store
                .put_object(&marker, bytes::Bytes::new(), &metadata, &Precondition::None)
                .await
                .map_err(|e| FsError::store(&marker, e))?;
            return self.namespace.dir_attr_changed(ino, changed);
        }
        let key = self.namespace.key_of(ino)?;
        self.store
            .replace_metadata(&key, &metadata)
            .await
            .map_err(|e| FsError::store(&key, e))?;
        self.namespace.expire(ino);
        self.namespace.getattr(ino).await
    }

    /// Fails with `EEXIST` if `name` exists in `parent`.
    async fn check_absent(&self, parent: u64, name: &OsStr) -> Result<(), FsError> {
        match self.namespace.lookup(parent, name).await {
            Ok(existing) => {
                self.forget(existing.ino, 1);
                Err(FsError::Exists)
            }
            Err(FsError::NotFound) => Ok(()),
            Err(e) => Err(e),
        }
    }

    pub(crate) async fn mkdir(
        &self,
        req_uid: u32,
        req_gid: u32,
        parent: u64,
        name: &OsStr,
        mode: u32,
    ) -> Result<Attr, FsError> {
        self.new_writes()?;
        let (path, marker) = self.namespace.new_dir_marker(parent, name)?;
        self.check_absent(parent, name).await?;
        let now = std::time::SystemTime::now();
        let metadata = stored_metadata(libc::S_IFDIR | (mode & 0o7777), req_uid, req_gid, now);
        self.store
            .put_object(&marker, bytes::Bytes::new(), &metadata, &Precondition::None)
            .await
            .map_err(|e| FsError::store(&marker, e))?;
        let attr = Attr {
            ino: 0,
            kind: NodeKind::Directory,
            size: 0,
            mtime: now,
            atime: now,
            ctime: now,
            perm: (mode & 0o7777) as u16,
            uid: req_uid,
            gid: req_gid,
        };
        Ok(self.namespace.made_dir(&path, attr))
    }

    /// A symlink is an object holding its target, marked by its mode; written straight to S3
    /// (it is small and has no open handle to close).
    pub(crate) async fn symlink(
        &self,
        req_uid: u32,
        req_gid: u32,
        parent: u64,
        name: &OsStr,
        target: &std::path::Path,
    ) -> Result<Attr, FsError> {
        self.new_writes()?;
        let target = target.as_os_str().as_encoded_bytes();
        if target.is_empty() {
            return Err(FsError::NotFound);
        }
        if target.len() > MAX_SYMLINK_TARGET as usize {
            return Err(FsError::NameTooLong);
        }
        let (_, key) = self.namespace.rename_target(parent, name)?;
        self.check_absent(parent, name).await?;
        let metadata = stored_metadata(
            libc::S_IFLNK | 0o777,
            req_uid,
            req_gid,
            std::time::SystemTime::now(),
        );
        let body = bytes::Bytes::copy_from_slice(target);
        self.store
            .put_object(&key, body, &metadata, &Precondition::Absent)
            .await
            .map_err(|e| match e {
                crate::store::StoreError::PreconditionFailed => FsError::Exists,
                e => FsError::store(&key, e),
            })?;
        self.namespace.lookup(parent, name).await
    }

    /// mknod of a fifo, socket or device node: a zero-length object whose metadata holds the
    /// type and device number, written straight to S3 (nothing to upload later). Regular files
    /// are made by the caller as an empty written file.
    pub(crate) async fn mknod_special(
        &self,
        req_uid: u32,
        req_gid: u32,
        parent: u64,
        name: &OsStr,
        kind: NodeKind,
        perm: u32,
    ) -> Result<Attr, FsError> {
        self.new_writes()?;
        let (_, key) = self.namespace.rename_target(parent, name)?;
        self.check_absent(parent, name).await?;
        let metadata =
            stored_metadata_of(kind, perm, req_uid, req_gid, std::time::SystemTime::now());
        self.store
            .put_object(&key, bytes::Bytes::new(), &metadata, &Precondition::Absent)
            .await
            .map_err(|e| match e {
                crate::store::StoreError::PreconditionFailed => FsError::Exists,
                e => FsError::store(&key, e),
            })?;
        self.namespace.lookup(parent, name).await
    }

    /// fallocate: plain allocation may extend the file (zeros, which cost nothing in a sparse
    /// cache file); hole punching and the other modes are not supported.
    pub(crate) fn fallocate(
        &self,
        fid: FileId,
        ino: u64,
        offset: u64,
        length: u64,
        mode: i32,
    ) -> Result<(), FsError> {
        if mode & !libc::FALLOC_FL_KEEP_SIZE != 0 {
            return Err(FsError::NotSupported(
                "fallocate modes other than allocation",
            ));
        }
        let dirty = &self.writes()?.dirty;
        let end = offset.checked_add(length).ok_or(FsError::InvalidArgument)?;
        let size = dirty.attr_of(fid).ok_or(FsError::NotFound)?.size;
        if mode & libc::FALLOC_FL_KEEP_SIZE == 0 && end > size {
            let attr = dirty.set_attr(fid, Some(end), None, None, None, None, None)?;
            self.namespace.refresh_dirty(ino, &attr);
        }
        Ok(())
    }

    pub(crate) async fn rmdir(&self, parent: u64, name: &OsStr) -> Result<(), FsError> {
        self.new_writes()?;
        let attr = self.namespace.lookup(parent, name).await?;
        self.forget(attr.ino, 1);
        self.remove_empty_dir(&attr).await
    }

    /// Removes directory `attr` (its marker), which must be empty: `rmdir`, and the target
    /// a directory rename replaces.
    async fn remove_empty_dir(&self, attr: &Attr) -> Result<(), FsError> {
        if attr.kind != NodeKind::Directory {
            return Err(FsError::NotDirectory);
        }
        if !self.namespace.list(attr.ino).await?.is_empty() {
            return Err(FsError::NotEmpty);
        }
        let marker = self.namespace.removed_dir(attr.ino)?;
        self.store
            .delete(&marker)
            .await
            .map_err(|e| FsError::store(&marker, e))
    }

    /// Renames a file. A local (dirty) copy moves in the cache and is uploaded under the new
    /// key; an uploaded object is copied server-side and the old key deleted. Directories
    /// return `EXDEV`, which makes `mv` fall back to copying.
    pub(crate) async fn rename(
        &self,
        parent: u64,
        name: &OsStr,
        new_parent: u64,
        new_name: &OsStr,
        no_replace: bool,
    ) -> Result<(), FsError> {
        let writes = self.new_writes()?;
        let source = self.namespace.lookup(parent, name).await?;
        self.forget(source.ino, 1);
        if source.kind == NodeKind::Directory {
            return self
                .rename_dir(source.ino, new_parent, new_name, no_replace)
                .await;
        }
        let (new_path, new_key) = self.namespace.rename_target(new_parent, new_name)?;
        let old_key = self.namespace.key_of(source.ino)?;
        if old_key == new_key {
            return Ok(());
        }
        // The base object of an edited file is at the old key, which goes away.
        self.complete_local(&old_key).await?;
        match self.namespace.lookup(new_parent, new_name).await {
            Ok(target) => {
                self.forget(target.ino, 1);
                if no_replace {
                    return Err(FsError::Exists);
                }
                if target.kind == NodeKind::Directory {
                    return Err(FsError::IsDirectory);
                }
                // A replaced file open elsewhere lives on for its descriptors: whatever of it
                // is still only in S3 is fetched before S3 loses it.
                if writes.dirty.has_handles(&new_key) {
                    self.complete_local(&new_key).await?;
                }
                self.pin_replaced(target.ino, &new_key, true).await;
                self.namespace.unlinked(target.ino);
            }
            Err(FsError::NotFound) => {}
            Err(e) => return Err(e),
        }
        self.detach_readers(|k| k == old_key || k == new_key).await;
        // No upload of the target key may finish between reading its version and moving the
        // file there: the moved file's upload is conditional on that version, and an upload
        // landing in between would make this mount's own previous version look like another
        // client's (a false conflict that kept the older content).
        let upload = writes.uploader.lock_key(&new_key).await;
        // What the upload under the new name may replace: the object there now, if any.
        let target_etag = match self.store.head(&new_key).await {
            Ok(meta) => Some(meta.etag),
            Err(crate::store::StoreError::NotFound) => None,
            Err(e) => return Err(FsError::store(&new_key, e)),
        };
        let moved_local = writes.dirty.rename(&old_key, &new_key, target_etag)?;
        if moved_local {
            drop(upload);
            if writes.dirty.snapshot(&new_key).is_some() {
                writes.uploader.enqueue(&new_key);
            }
        } else {
            // A local copy at the target goes; no upload of it runs (the lock), so none can
            // land on top of the copy.
            writes.dirty.remove(&new_key);
            let copied = self.store.copy_object(&old_key, &new_key).await;
            writes.dirty.settled(&new_key);
            drop(upload);
            copied.map_err(|e| FsError::store(&old_key, e))?;
        }
        // The old key may exist in S3 (uploaded before); an upload of it still running deletes
        // it again when it finds the file gone, and its task runs after this delete.
        let deleted = self.store.delete(&old_key).await;
        if moved_local {
            writes.uploader.enqueue(&old_key);
        }
        deleted.map_err(|e| FsError::store(&old_key, e))?;
        self.namespace.renamed(source.ino, &new_path);
        Ok(())
    }

    /// Renames directory `ino` with everything below it. S3 has no rename: local copies move
    /// in the cache (journalled), objects are copied server-side and only then deleted, so an
    /// interruption leaves keys under both names, never under neither. Not atomic.
    async fn rename_dir(
        &self,
        ino: u64,
        new_parent: u64,
        new_name: &OsStr,
        no_replace: bool,
    ) -> Result<(), FsError> {
        let writes = self.writes()?;
        let old_prefix = self.namespace.marker_of(ino)?;
        let (new_path, new_prefix) = self.namespace.new_dir_marker(new_parent, new_name)?;
        if new_prefix == old_prefix {
            return Ok(());
        }
        if new_prefix.starts_with(&old_prefix) {
            return Err(FsError::InvalidArgument); // into itself
        }
        match self.namespace.lookup(new_parent, new_name).await {
            Ok(target) => {
                self.forget(target.ino, 1);
                if no_replace {
                    return Err(FsError::Exists);
                }
                self.remove_empty_dir(&target).await?;
            }
            Err(FsError::NotFound) => {}
            Err(e) => return Err(e),
        }
        let renamed = |key: &str| format!("{new_prefix}{}", &key[old_prefix.len()..]);
        // Files with local copies move in the journal; the objects in S3 are copied, then all
        // old keys deleted. The plan is recorded first, so a crash anywhere after it is
        // finished by the next start.
        //
        // The local files' uploads are held off (their key locks) for the whole rename: one
        // finishing in between would leave its file neither local (to move) nor copied.
        let mut candidates: Vec<String> = writes.dirty.under(&old_prefix).into_keys().collect();
        candidates.sort(); // one lock order for every rename
        let mut upload_locks = Vec::with_capacity(candidates.len());
        for key in &candidates {
            upload_locks.push(writes.uploader.lock_key(key).await);
        }
        // Uploads that finished before their lock was taken left objects in S3: copied below.
        let local: std::collections::HashSet<String> = writes
            .dirty
            .under(&old_prefix)
            .into_keys()
            .filter(|k| candidates.binary_search(k).is_ok())
            .collect();
        let keys = self.keys_under(&old_prefix).await?;
        self.detach_readers(|k| k.starts_with(&old_prefix)).await;
        let copies: Vec<(String, String)> = keys
            .iter()
            .filter(|k| !local.contains(*k))
            .map(|k| (k.clone(), renamed(k)))
            .collect();
        let plan = writes.renames.begin(copies.clone(), keys.clone())?;
        let copied = async {
            for key in &local {
                self.complete_local(key).await?;
                let new_key = renamed(key);
                if writes.dirty.rename(key, &new_key, None)?
                    && writes.dirty.snapshot(&new_key).is_some()
                {
                    writes.uploader.enqueue(&new_key);
                }
            }
            self.in_parallel(copies, |store, (from, to)| async move {
                store
                    .copy_object(&from, &to)
                    .await
                    .map(|_| ())
                    .map_err(|e| FsError::store(&from, e))
            })
            .await
        }
        .await;
        if let Err(e) = copied {
            // Reported to the caller: nothing to finish later (what was copied stays).
            writes.renames.done(plan);
            return Err(e);
        }
        // Every object has its new key: from here the rename is carried through, if not now
        // then by the next start (the plan stays when a delete fails).
        self.in_parallel(keys, |store, key| async move {
            store
                .delete(&key)
                .await
                .map_err(|e| FsError::store(&key, e))
        })
        .await?;
        writes.renames.done(plan);
        drop(upload_locks);
        // After the deletes, so that uploads in flight end with their keys deleted.
        for key in &local {
            writes.uploader.enqueue(key);
        }
        self.namespace.renamed_dir(ino, &new_path)?;
        Ok(())
    }

    /// Runs `op` on every item, 16 S3 requests in flight; the first error stops it.
    async fn in_parallel<T, F, Fut>(&self, items: Vec<T>, op: F) -> Result<(), FsError>
    where
        F: Fn(Arc<S>, T) -> Fut,
        Fut: std::future::Future<Output = Result<(), FsError>>,
    {
        use futures_util::stream::{self, StreamExt, TryStreamExt};
        stream::iter(items)
            .map(|item| op(Arc::clone(&self.store), item))
            .buffer_unordered(16)
            .try_collect::<Vec<_>>()
            .await
            .map(|_| ())
    }

    /// Every key at or below `prefix` (a directory's marker key), markers included.
    async fn keys_under(&self, prefix: &str) -> Result<Vec<String>, FsError> {
        let mut keys = Vec::new();
        let mut dirs = vec![prefix.to_owned()];
        while let Some(dir) = dirs.pop() {
            let mut token = None;
            let mut has_marker = false;
            loop {
                let page = self
                    .store
                    .list_page(&dir, token, None)
                    .await
                    .map_err(|e| FsError::store(&dir, e))?;
                for (key, _) in page.objects {
                    has_marker |= key == dir;
                    keys.push(key);
                }
                dirs.extend(page.prefixes);
                token = page.next_token;
                if token.is_none() {
                    break;
                }
            }
            // Some servers don't list markers; ask for this one directly.
            if !has_marker && self.store.head(&dir).await.is_ok() {
                keys.push(dir);
            }
        }
        Ok(keys)
    }

    pub(crate) async fn unlink(&self, parent: u64, name: &OsStr) -> Result<(), FsError> {
        let writes = self.new_writes()?;
        let attr = self.namespace.lookup(parent, name).await?;
        self.forget(attr.ino, 1);
        if attr.kind == NodeKind::Directory {
            return Err(FsError::IsDirectory);
        }
        let key = self.namespace.key_of(attr.ino)?;
        // Open descriptors keep the file: its bytes still only in S3 are fetched first.
        if writes.dirty.has_handles(&key) {
            self.complete_local(&key).await?;
        }
        self.detach_readers(|k| k == key).await;
        self.pin_replaced(attr.ino, &key, false).await;
        let had_local_copy = writes.dirty.remove(&key);
        let deleted = self.store.delete(&key).await;
        if had_local_copy {
            // After the delete: the key's uploader task then ends whatever an upload in
            // flight started (see `DirtyFiles::is_gone`).
            writes.uploader.enqueue(&key);
        }
        deleted.map_err(|e| FsError::store(&key, e))?;
        self.namespace.unlinked(attr.ino);
        Ok(())
    }

    /// The listing behind directory handle `fh`.
    pub(crate) fn listing(&self, fh: u64) -> Result<Arc<Vec<Listed>>, FsError> {
        lock(&self.dirs)
            .get(&fh)
            .cloned()
            .ok_or(FsError::BadHandle(fh))
    }
}
