//! The filesystem's operations, independent of FUSE: open files and their handles, reads,
//! writes and namespace changes. `fs` translates kernel requests into these calls and replies;
//! the S3 side of each operation lives here and below (namespace, prefetch, write, store).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use fuser::{FopenFlags, OpenFlags};

use crate::error::FsError;
use crate::namespace::{
    Attr, Listed, MAX_SYMLINK_TARGET, Namespace, NodeKind, OpenedObject, stored_metadata_of,
    with_times,
};
use crate::prefetch::{BlockFetcher, FileReader, ObjectVersion, PrefetchConfig};
use crate::store::{ObjectStore, Precondition};
use crate::write::local::fetch_missing;
use crate::write::{DirtyAttr, FileId, LocalData};

mod kept;
mod names;
mod writes;

pub use writes::Writes;

pub(crate) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Handle tables are plain maps: a panic elsewhere cannot leave them half-updated.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Reply buffers for reads, reused: a fresh 1 MiB allocation per read costs page faults and
/// page zeroing in the kernel, which showed up as a tenth of the CPU of a sequential read.
/// At most as many are kept as reads may be in flight (see [`BufferPool::keep_at_most`]).
pub(crate) struct BufferPool {
    free: Mutex<Vec<Vec<u8>>>,
    /// How many free buffers are kept.
    keep: std::sync::atomic::AtomicUsize,
}

impl Default for BufferPool {
    fn default() -> Self {
        Self {
            free: Mutex::default(),
            keep: std::sync::atomic::AtomicUsize::new(Self::KEEP),
        }
    }
}

impl BufferPool {
    const KEEP: usize = 64;

    /// Keeps at most `n` free buffers (the kernel's background requests in flight).
    pub(crate) fn keep_at_most(&self, n: usize) {
        self.keep
            .store(n.max(1), std::sync::atomic::Ordering::Relaxed);
    }

    pub(crate) fn take(&self) -> Vec<u8> {
        lock(&self.free).pop().unwrap_or_default()
    }

    pub(crate) fn give(&self, mut buf: Vec<u8>) {
        buf.clear();
        let keep = self.keep.load(std::sync::atomic::Ordering::Relaxed);
        let mut free = lock(&self.free);
        if free.len() < keep {
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

impl<S> Vfs<S> {
    /// The write barrier changes enter (`None` on read-only mounts, which change nothing).
    pub(crate) fn barrier(&self) -> Option<crate::write::WriteBarrier> {
        self.writes.as_ref().map(|w| w.barrier.clone())
    }

    /// Enters the write barrier from a FUSE thread, for an operation that changes the
    /// filesystem and runs there; held until dropped.
    pub(crate) fn enter_blocking(&self) -> Option<tokio::sync::RwLockReadGuard<'_, ()>> {
        self.writes.as_ref().map(|w| w.barrier.enter_blocking())
    }
}

impl<S: ObjectStore> Vfs<S> {
    pub(crate) fn ttl(&self) -> Duration {
        self.namespace.ttl()
    }

    pub(crate) fn new_handle(&self) -> u64 {
        self.next_handle.fetch_add(1, Ordering::Relaxed)
    }

    pub(crate) fn reader(&self, object: ObjectVersion) -> FileReader<S> {
        FileReader::new(Arc::clone(&self.fetcher), object, self.prefetch.clone())
    }

    pub(crate) async fn open_reader(&self, ino: u64) -> Result<(FileReader<S>, bool), FsError> {
        let opened = self.namespace.open(ino).await?;
        let keep_cache = opened.keep_cache;
        Ok((self.opened_reader(opened), keep_cache))
    }

    fn opened_reader(&self, opened: OpenedObject) -> FileReader<S> {
        self.reader(ObjectVersion {
            key: opened.key.into(),
            etag: opened.etag.into(),
            size: opened.size,
        })
    }

    pub(crate) async fn readlink(&self, ino: u64) -> Result<Vec<u8>, FsError> {
        // Just HEADed (ls -l looks a link up, then reads it): read that version. Should it be
        // gone meanwhile, the GET (pinned to its ETag) fails and the link is opened anew.
        if let Some(opened) = self.namespace.fresh_symlink(ino)
            && let Ok(target) = read_target(&self.opened_reader(opened)).await
        {
            return Ok(target);
        }
        let (reader, _) = self.open_reader(ino).await?;
        read_target(&reader).await
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
        let fh = self
            .on_written_file(ino, None, Some(truncate), |fid| {
                let fh = self.local_handle(ino, fid, true)?;
                if truncate {
                    let attr = dirty.set_attr(fid, Some(0), None, None, None, None, None)?;
                    self.namespace.refresh_dirty(ino, &attr);
                }
                Ok(fh)
            })
            .await?
            .ok_or(FsError::NotFound)?;
        Ok((fh, FopenFlags::empty()))
    }

    /// Runs `op` on the written file of `ino` — `held`, the one a handle holds, if given —
    /// made from the object when there is none and `make` is `Some(empty)`; `Ok(None)` when
    /// there is none and `make` is `None`. A written file without handles may be dropped at any
    /// moment (its upload finished, it is an object again), so `op` failing with `NotFound`
    /// is tried again on a written file made anew, up to 3 times in all.
    async fn on_written_file<T>(
        &self,
        ino: u64,
        held: Option<FileId>,
        make: Option<bool>,
        op: impl Fn(FileId) -> Result<T, FsError>,
    ) -> Result<Option<T>, FsError> {
        let mut attempts = 0;
        loop {
            attempts += 1;
            let fid = match (held.or_else(|| self.dirty_file(ino)), make) {
                (Some(fid), _) => fid,
                (None, Some(empty)) => self.make_dirty(ino, empty).await?,
                (None, None) => return Ok(None),
            };
            match op(fid) {
                Err(FsError::NotFound) if attempts < 3 => continue,
                result => return result.map(Some),
            }
        }
    }

    /// Creates an empty regular file `name` in `parent` (not yet durable), owned by
    /// `uid`/`gid` with permission bits `perm`: `create` and `mknod`. Returns its key and
    /// attributes (one kernel reference).
    pub(crate) fn create_empty(
        &self,
        uid: u32,
        gid: u32,
        parent: u64,
        name: &std::ffi::OsStr,
        perm: u32,
    ) -> Result<(String, Attr), FsError> {
        let writes = self.new_writes()?;
        let attr = DirtyAttr::new(libc::S_IFREG | perm, uid, gid, std::time::SystemTime::now());
        let created = self.namespace.create_file(parent, name, |key| {
            writes.dirty.create(key, attr, None, &[])
        })?;
        self.namespace.touch_dir(parent);
        Ok(created)
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
        match writes.dirty.key_of(fid) {
            Some(key) => writes.upload_if_remote(&key).await,
            None => Ok(()),
        }
    }

    /// `fsync` of directory `ino`: the names created and renamed in it become durable. Names
    /// of files not closed or fsync'd yet are journalled now (with their current content);
    /// everything else a directory holds is durable when its call returns already (journal
    /// records, tombstones, directory markers in S3). With `--durability remote` it returns
    /// once those files are in S3, as a file's fsync does.
    pub(crate) async fn sync_dir(self: Arc<Self>, ino: u64) -> Result<(), FsError> {
        let Ok(writes) = self.writes() else {
            return Ok(()); // read-only: nothing local
        };
        let prefix = self.namespace.marker_of(ino)?;
        let vfs = Arc::clone(&self);
        // Blocking: finding the files waits on their record locks, which a persist holds
        // through its fsyncs.
        let persisted = tokio::task::spawn_blocking(move || {
            let writes = vfs.writes()?;
            let mut persisted = Vec::new();
            for key in writes.dirty.unjournalled_in(&prefix) {
                match writes.dirty.persist(&key) {
                    Ok(()) => persisted.push(key),
                    // Unlinked or renamed away meanwhile: its new directory's fsync covers it.
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => return Err(FsError::from(e)),
                }
            }
            Ok(persisted)
        })
        .await
        .unwrap_or_else(|e| Err(FsError::Local(e.to_string(), None)))?;
        for key in persisted {
            writes.upload_if_remote(&key).await?;
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
        // Only a change of size needs the content here; other changes of an object are a
        // metadata rewrite in S3.
        let make = size.map(|size| size == 0);
        let changed = self
            .on_written_file(ino, by_handle, make, |fid| {
                let attr = dirty.set_attr(fid, size, mode, uid, gid, mtime, atime)?;
                Ok((fid, attr))
            })
            .await?;
        let Some((fid, attr)) = changed else {
            return self
                .replace_metadata(ino, mode, uid, gid, mtime, atime)
                .await;
        };
        let attr = self.namespace.refresh_dirty(ino, &attr);
        // truncate(2) and chmod of a file nobody writes are durable when they return; an
        // ftruncate by a writer becomes durable with its next fsync or close, like its writes
        // (a snapshot or crash meanwhile keeps the version acknowledged before).
        if let Some(key) = dirty.key_of(fid)
            && !dirty.has_writers(fid)
        {
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

    /// The listing behind directory handle `fh`.
    pub(crate) fn listing(&self, fh: u64) -> Result<Arc<Vec<Listed>>, FsError> {
        lock(&self.dirs)
            .get(&fh)
            .cloned()
            .ok_or(FsError::BadHandle(fh))
    }
}

/// The target a symlink object holds (at most [`MAX_SYMLINK_TARGET`] bytes).
async fn read_target<S: ObjectStore>(reader: &FileReader<S>) -> Result<Vec<u8>, FsError> {
    if reader.object().size > u64::from(MAX_SYMLINK_TARGET) {
        return Err(FsError::InvalidArgument);
    }
    reader.read(0, MAX_SYMLINK_TARGET).await
}
