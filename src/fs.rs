//! The `fuser::Filesystem` adapter: turns kernel requests into namespace and reader calls.
//!
//! Every request that may touch S3 runs as a task on the tokio runtime and replies from there,
//! so FUSE threads never block on the network and many reads are in flight at once.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use fuser::{
    BsdFileFlags, Errno, FileAttr, FileHandle, FileType, FopenFlags, Generation, INodeNo,
    InitFlags, KernelConfig, LockOwner, OpenFlags, RenameFlags, ReplyAttr, ReplyCreate, ReplyData,
    ReplyDirectory, ReplyDirectoryPlus, ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs, ReplyWrite,
    ReplyXattr, Request, TimeOrNow, WriteFlags,
};
use tokio::runtime::Handle as RuntimeHandle;

use crate::error::FsError;
use crate::namespace::{Attr, Listed, Namespace, NodeKind};
use crate::prefetch::{BlockFetcher, FileReader, ObjectVersion, PrefetchConfig};
use crate::store::{ObjectStore, Precondition};
use crate::write::dirty::read_local;
use crate::write::{DirtyAttr, DirtyFiles, Uploader};

/// Largest read and write the kernel sends in one request.
pub const MAX_IO_SIZE: u32 = 1024 * 1024;
/// Symlink targets longer than this are refused (Linux PATH_MAX).
const MAX_SYMLINK_TARGET: u32 = 4096;

/// Reply buffers for reads, reused: a fresh 1 MiB allocation per read costs page faults and
/// page zeroing in the kernel, which showed up as a tenth of the CPU of a sequential read.
#[derive(Default)]
struct BufferPool {
    free: Mutex<Vec<Vec<u8>>>,
}

impl BufferPool {
    const KEEP: usize = 64;

    fn take(&self) -> Vec<u8> {
        lock(&self.free).pop().unwrap_or_default()
    }

    fn give(&self, mut buf: Vec<u8>) {
        buf.clear();
        let mut free = lock(&self.free);
        if free.len() < Self::KEEP {
            free.push(buf);
        }
    }
}

pub struct KeepFs<S> {
    inner: Arc<Inner<S>>,
    runtime: RuntimeHandle,
}

/// What a file handle reads from.
enum Handle<S> {
    /// A clean object in S3, pinned to the version seen at open.
    Remote(Arc<FileReader<S>>),
    /// The local copy of a dirty file (its data file held open); `writer` handles may change it.
    Local {
        key: String,
        writer: bool,
        data: Arc<std::fs::File>,
    },
}

/// The write side of a read-write mount.
pub struct Writes {
    pub dirty: Arc<DirtyFiles>,
    pub uploader: Uploader,
}

struct Inner<S> {
    namespace: Namespace<S>,
    fetcher: Arc<BlockFetcher<S>>,
    prefetch: PrefetchConfig,
    store: Arc<S>,
    /// `None` on read-only mounts.
    writes: Option<Writes>,
    files: Mutex<HashMap<u64, Handle<S>>>,
    dirs: Mutex<HashMap<u64, Arc<Vec<Listed>>>>,
    next_handle: AtomicU64,
    buffers: BufferPool,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Handle tables are plain maps: a panic elsewhere cannot leave them half-updated.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn file_attr(attr: &Attr) -> FileAttr {
    let kind = match attr.kind {
        NodeKind::Directory => FileType::Directory,
        NodeKind::File => FileType::RegularFile,
        NodeKind::Symlink => FileType::Symlink,
    };
    FileAttr {
        ino: INodeNo(attr.ino),
        size: attr.size,
        blocks: attr.size.div_ceil(512),
        atime: attr.mtime,
        mtime: attr.mtime,
        ctime: attr.mtime,
        crtime: attr.mtime,
        kind,
        perm: attr.perm,
        nlink: if kind == FileType::Directory { 2 } else { 1 },
        uid: attr.uid,
        gid: attr.gid,
        rdev: 0,
        blksize: MAX_IO_SIZE,
        flags: 0,
    }
}

fn errno(e: &FsError) -> Errno {
    match e {
        FsError::NotFound | FsError::NameTooLong => {
            tracing::debug!(error = %e, "request failed")
        }
        _ => tracing::warn!(error = %e, "request failed"),
    }
    Errno::from_i32(e.errno())
}

/// Replies to a request that returns nothing but success or an error.
fn reply_unit(reply: ReplyEmpty, result: Result<(), FsError>) {
    match result {
        Ok(()) => reply.ok(),
        Err(e) => reply.error(errno(&e)),
    }
}

impl<S: ObjectStore> KeepFs<S> {
    pub fn new(
        namespace: Namespace<S>,
        fetcher: Arc<BlockFetcher<S>>,
        prefetch: PrefetchConfig,
        store: Arc<S>,
        writes: Option<Writes>,
        runtime: RuntimeHandle,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                namespace,
                fetcher,
                prefetch,
                store,
                writes,
                files: Mutex::new(HashMap::new()),
                dirs: Mutex::new(HashMap::new()),
                next_handle: AtomicU64::new(1),
                buffers: BufferPool::default(),
            }),
            runtime,
        }
    }

    /// Runs `op` on the runtime; it replies when done.
    fn spawn<F, Fut>(&self, op: F)
    where
        F: FnOnce(Arc<Inner<S>>) -> Fut,
        Fut: Future<Output = ()> + Send + 'static,
    {
        self.runtime.spawn(op(Arc::clone(&self.inner)));
    }
}

impl<S: ObjectStore> Inner<S> {
    fn ttl(&self) -> Duration {
        self.namespace.ttl()
    }

    fn new_handle(&self) -> u64 {
        self.next_handle.fetch_add(1, Ordering::Relaxed)
    }

    fn reader(&self, object: ObjectVersion) -> FileReader<S> {
        FileReader::new(Arc::clone(&self.fetcher), object, self.prefetch)
    }

    async fn open_reader(&self, ino: u64) -> Result<(FileReader<S>, bool), FsError> {
        let opened = self.namespace.open(ino).await?;
        let object = ObjectVersion {
            key: opened.key.into(),
            etag: opened.etag.into(),
            size: opened.size,
        };
        Ok((self.reader(object), opened.keep_cache))
    }

    async fn readlink(&self, ino: u64) -> Result<Vec<u8>, FsError> {
        let (reader, _) = self.open_reader(ino).await?;
        if reader.object().size > u64::from(MAX_SYMLINK_TARGET) {
            return Err(FsError::InvalidArgument);
        }
        reader.read(0, MAX_SYMLINK_TARGET).await
    }

    fn writes(&self) -> Result<&Writes, FsError> {
        self.writes.as_ref().ok_or(FsError::ReadOnly)
    }

    fn handle_key(&self, fh: u64) -> Option<(String, bool)> {
        match lock(&self.files).get(&fh)? {
            Handle::Local { key, writer, .. } => Some((key.clone(), *writer)),
            Handle::Remote(_) => None,
        }
    }

    fn local_handle(&self, key: String, writer: bool) -> Result<u64, FsError> {
        let data = self.writes()?.dirty.data(&key)?;
        Ok(self.insert_handle(Handle::Local { key, writer, data }))
    }

    fn insert_handle(&self, handle: Handle<S>) -> u64 {
        let fh = self.new_handle();
        lock(&self.files).insert(fh, handle);
        fh
    }

    /// Opens `ino` for reading and possibly writing. A clean object opened for writing becomes
    /// a dirty file first (its content fetched unless truncated).
    async fn open_file(&self, ino: u64, flags: OpenFlags) -> Result<(u64, FopenFlags), FsError> {
        let write = flags.0 & libc::O_ACCMODE != libc::O_RDONLY;
        let truncate = flags.0 & libc::O_TRUNC != 0;
        if !write && !truncate {
            if let Some(key) = self.namespace.dirty_key(ino) {
                return Ok((self.local_handle(key, false)?, FopenFlags::empty()));
            }
            let (reader, keep_cache) = self.open_reader(ino).await?;
            let fh = self.insert_handle(Handle::Remote(Arc::new(reader)));
            let flags = if keep_cache {
                FopenFlags::FOPEN_KEEP_CACHE
            } else {
                FopenFlags::empty()
            };
            return Ok((fh, flags));
        }
        let dirty = &self.writes()?.dirty;
        let key = match self.namespace.dirty_key(ino) {
            Some(key) => {
                if truncate {
                    let attr = dirty.set_attr(&key, Some(0), None, None, None, None)?;
                    self.namespace.refresh_dirty(ino, &attr);
                }
                key
            }
            None => self.make_dirty(ino, truncate).await?,
        };
        dirty.add_writer(&key)?;
        let fh = self.local_handle(key.clone(), true);
        if fh.is_err() && dirty.remove_writer(&key) {
            self.writes()?.uploader.enqueue(&key);
        }
        Ok((fh?, FopenFlags::empty()))
    }

    /// Turns clean object `ino` into a dirty file: its current content (unless `empty`) and
    /// attributes, based on the version S3 holds now.
    async fn make_dirty(&self, ino: u64, empty: bool) -> Result<String, FsError> {
        let attr = self.namespace.getattr(ino).await?;
        let (reader, _) = self.open_reader(ino).await?;
        let object = reader.object().clone();
        let content = if empty || object.size == 0 {
            Vec::new()
        } else {
            let len = u32::try_from(object.size)
                .map_err(|_| FsError::NotSupported("editing objects over 4 GiB in place"))?;
            reader.read(0, len).await?
        };
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
        };
        let key = object.key.to_string();
        let created = self.writes()?.dirty.create(
            &key,
            dirty_attr,
            Some(object.etag.to_string()),
            &content,
        )?;
        self.namespace.refresh_dirty(ino, &created);
        Ok(key)
    }

    /// Makes `key` durable on the cache disk (close, fsync), off the async workers.
    async fn persist(self: Arc<Self>, key: String) -> Result<(), FsError> {
        tokio::task::spawn_blocking(move || {
            let writes = self.writes()?;
            writes.dirty.persist(&key).map_err(FsError::from)
        })
        .await
        .unwrap_or_else(|e| Err(FsError::Local(e.to_string(), None)))
    }

    /// Makes `key` durable locally and, when nobody writes it, queues its upload.
    fn persist_and_queue(&self, key: &str) -> Result<(), FsError> {
        let writes = self.writes()?;
        writes.dirty.persist(key)?;
        if writes.dirty.snapshot(key).is_some() {
            writes.uploader.enqueue(key);
        }
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    async fn setattr(
        &self,
        ino: u64,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        mtime: Option<std::time::SystemTime>,
    ) -> Result<Attr, FsError> {
        let nothing_to_change =
            mode.is_none() && uid.is_none() && gid.is_none() && size.is_none() && mtime.is_none();
        if nothing_to_change {
            return self.namespace.getattr(ino).await;
        }
        let dirty = self.writes()?.dirty.clone();
        let key = match self.namespace.dirty_key(ino) {
            Some(key) => key,
            None if size.is_some() => self.make_dirty(ino, size == Some(0)).await?,
            None => return self.replace_metadata(ino, mode, uid, gid, mtime).await,
        };
        let attr = dirty.set_attr(&key, size, mode, uid, gid, mtime)?;
        let attr = self.namespace.refresh_dirty(ino, &attr);
        self.persist_and_queue(&key)?;
        Ok(attr)
    }

    /// chmod/chown/utimens of an object in S3: a self-copy with new `x-amz-meta-*`.
    async fn replace_metadata(
        &self,
        ino: u64,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        mtime: Option<std::time::SystemTime>,
    ) -> Result<Attr, FsError> {
        let attr = self.namespace.getattr(ino).await?;
        let type_bits = match attr.kind {
            NodeKind::File => libc::S_IFREG,
            NodeKind::Symlink => libc::S_IFLNK,
            NodeKind::Directory => {
                return Err(FsError::NotSupported("changing attributes of directories"));
            }
        };
        let perm = mode.map(|m| m & 0o7777).unwrap_or(u32::from(attr.perm));
        let mtime = mtime.unwrap_or(attr.mtime);
        let secs = mtime
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let metadata = std::collections::HashMap::from([
            ("mode".to_owned(), (type_bits | perm).to_string()),
            ("uid".to_owned(), uid.unwrap_or(attr.uid).to_string()),
            ("gid".to_owned(), gid.unwrap_or(attr.gid).to_string()),
            ("mtime".to_owned(), secs.to_string()),
        ]);
        let key = self.namespace.key_of(ino)?;
        self.store
            .replace_metadata(&key, &metadata)
            .await
            .map_err(|e| FsError::store(&key, e))?;
        self.namespace.expire(ino);
        self.namespace.getattr(ino).await
    }

    async fn mkdir(
        &self,
        req_uid: u32,
        req_gid: u32,
        parent: u64,
        name: &OsStr,
        mode: u32,
    ) -> Result<Attr, FsError> {
        self.writes()?;
        let (path, marker) = self.namespace.new_dir_marker(parent, name)?;
        if let Ok(existing) = self.namespace.lookup(parent, name).await {
            self.namespace.forget(existing.ino, 1);
            return Err(FsError::Exists);
        }
        let metadata = std::collections::HashMap::from([
            (
                "mode".to_owned(),
                (libc::S_IFDIR | (mode & 0o7777)).to_string(),
            ),
            ("uid".to_owned(), req_uid.to_string()),
            ("gid".to_owned(), req_gid.to_string()),
        ]);
        self.store
            .put_object(&marker, bytes::Bytes::new(), &metadata, &Precondition::None)
            .await
            .map_err(|e| FsError::store(&marker, e))?;
        Ok(self.namespace.made_dir(&path))
    }

    async fn rmdir(&self, parent: u64, name: &OsStr) -> Result<(), FsError> {
        self.writes()?;
        let attr = self.namespace.lookup(parent, name).await?;
        self.namespace.forget(attr.ino, 1);
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
    async fn rename(
        &self,
        parent: u64,
        name: &OsStr,
        new_parent: u64,
        new_name: &OsStr,
        no_replace: bool,
    ) -> Result<(), FsError> {
        let writes = self.writes()?;
        let source = self.namespace.lookup(parent, name).await?;
        self.namespace.forget(source.ino, 1);
        if source.kind == NodeKind::Directory {
            return Err(FsError::CrossDevice);
        }
        let (new_path, new_key) = self.namespace.rename_target(new_parent, new_name)?;
        let old_key = self.namespace.key_of(source.ino)?;
        if old_key == new_key {
            return Ok(());
        }
        match self.namespace.lookup(new_parent, new_name).await {
            Ok(target) => {
                self.namespace.forget(target.ino, 1);
                if no_replace {
                    return Err(FsError::Exists);
                }
                if target.kind == NodeKind::Directory {
                    return Err(FsError::IsDirectory);
                }
                self.namespace.unlinked(target.ino);
            }
            Err(FsError::NotFound) => {}
            Err(e) => return Err(e),
        }
        // What the upload under the new name may replace: the object there now, if any.
        let target_etag = match self.store.head(&new_key).await {
            Ok(meta) => Some(meta.etag),
            Err(crate::store::StoreError::NotFound) => None,
            Err(e) => return Err(FsError::store(&new_key, e)),
        };
        if writes.dirty.rename(&old_key, &new_key, target_etag)? {
            if writes.dirty.snapshot(&new_key).is_some() {
                writes.uploader.enqueue(&new_key);
            }
        } else {
            writes.dirty.remove(&new_key);
            self.store
                .copy_object(&old_key, &new_key)
                .await
                .map_err(|e| FsError::store(&old_key, e))?;
        }
        // The old key may exist in S3 (uploaded before); an upload of it still running deletes
        // it again when it finds the file gone.
        self.store
            .delete(&old_key)
            .await
            .map_err(|e| FsError::store(&old_key, e))?;
        self.namespace.renamed(source.ino, &new_path);
        Ok(())
    }

    async fn unlink(&self, parent: u64, name: &OsStr) -> Result<(), FsError> {
        let writes = self.writes()?;
        let attr = self.namespace.lookup(parent, name).await?;
        self.namespace.forget(attr.ino, 1);
        if attr.kind == NodeKind::Directory {
            return Err(FsError::IsDirectory);
        }
        let key = self.namespace.key_of(attr.ino)?;
        writes.dirty.remove(&key);
        self.store
            .delete(&key)
            .await
            .map_err(|e| FsError::store(&key, e))?;
        self.namespace.unlinked(attr.ino);
        Ok(())
    }

    /// The listing behind directory handle `fh`.
    fn listing(&self, fh: u64) -> Result<Arc<Vec<Listed>>, FsError> {
        lock(&self.dirs)
            .get(&fh)
            .cloned()
            .ok_or(FsError::BadHandle(fh))
    }
}

impl<S: ObjectStore> fuser::Filesystem for KeepFs<S> {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        for flag in [
            InitFlags::FUSE_DO_READDIRPLUS,
            InitFlags::FUSE_PARALLEL_DIROPS,
            InitFlags::FUSE_CACHE_SYMLINKS,
        ] {
            if config.add_capabilities(flag).is_err() {
                tracing::debug!(?flag, "kernel lacks FUSE capability");
            }
        }
        // Larger requests and more of them in flight: sequential reads are then limited by S3,
        // not by the FUSE round trips. Older kernels may refuse a value; the default stays.
        let _ = config.set_max_readahead(MAX_IO_SIZE);
        let _ = config.set_max_write(MAX_IO_SIZE);
        let _ = config.set_max_background(64);
        let _ = config.set_congestion_threshold(48);
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let name = name.to_owned();
        self.spawn(move |fs| async move {
            match fs.namespace.lookup(parent.0, &name).await {
                Ok(attr) => reply.entry(&fs.ttl(), &file_attr(&attr), Generation(0)),
                Err(e) => reply.error(errno(&e)),
            }
        });
    }

    fn forget(&self, _req: &Request, ino: INodeNo, nlookup: u64) {
        self.inner.namespace.forget(ino.0, nlookup);
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        self.spawn(move |fs| async move {
            match fs.namespace.getattr(ino.0).await {
                Ok(attr) => reply.attr(&fs.ttl(), &file_attr(&attr)),
                Err(e) => reply.error(errno(&e)),
            }
        });
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        self.spawn(move |fs| async move {
            match fs.readlink(ino.0).await {
                Ok(target) => reply.data(&target),
                Err(e) => reply.error(errno(&e)),
            }
        });
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        self.spawn(move |fs| async move {
            match fs.open_file(ino.0, flags).await {
                Ok((fh, flags)) => reply.opened(FileHandle(fh), flags),
                Err(e) => reply.error(errno(&e)),
            }
        });
    }

    fn create(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        _flags: i32,
        reply: ReplyCreate,
    ) {
        let fs = &self.inner;
        let writes = match fs.writes() {
            Ok(w) => w,
            Err(e) => return reply.error(errno(&e)),
        };
        let attr = DirtyAttr {
            size: 0,
            mode: libc::S_IFREG | (mode & !umask & 0o7777),
            uid: req.uid(),
            gid: req.gid(),
            mtime: std::time::SystemTime::now(),
        };
        let created = fs.namespace.create_file(parent.0, name, |key| {
            let attr = writes.dirty.create(key, attr, None, &[])?;
            writes.dirty.add_writer(key)?;
            Ok(attr)
        });
        match created {
            Ok((key, attr)) => {
                let fh = match fs.local_handle(key, true) {
                    Ok(fh) => fh,
                    Err(e) => return reply.error(errno(&e)),
                };
                reply.created(
                    &fs.ttl(),
                    &file_attr(&attr),
                    Generation(0),
                    FileHandle(fh),
                    FopenFlags::empty(),
                );
            }
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn write(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        let fs = &self.inner;
        let handle = match lock(&fs.files).get(&fh.0) {
            Some(Handle::Local {
                key,
                writer: true,
                data: file,
            }) => Some((key.clone(), file.clone())),
            _ => None,
        };
        let result = match (handle, fs.writes()) {
            (Some((key, file)), Ok(w)) => w
                .dirty
                .write(&key, &file, offset, data)
                .map_err(FsError::from),
            (None, Ok(_)) => Err(FsError::BadHandle(fh.0)),
            (_, Err(e)) => Err(e),
        };
        match result {
            Ok(()) => reply.written(data.len() as u32),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn fsync(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        let Some((key, _)) = self.inner.handle_key(fh.0) else {
            return reply.ok(); // nothing local to sync
        };
        self.spawn(move |fs| async move { reply_unit(reply, fs.persist(key).await) });
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        _atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        _ctime: Option<std::time::SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<std::time::SystemTime>,
        _chgtime: Option<std::time::SystemTime>,
        _bkuptime: Option<std::time::SystemTime>,
        _flags: Option<BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let mtime = mtime.map(|t| match t {
            TimeOrNow::SpecificTime(t) => t,
            TimeOrNow::Now => std::time::SystemTime::now(),
        });
        self.spawn(move |fs| async move {
            match fs.setattr(ino.0, mode, uid, gid, size, mtime).await {
                Ok(attr) => reply.attr(&fs.ttl(), &file_attr(&attr)),
                Err(e) => reply.error(errno(&e)),
            }
        });
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let name = name.to_owned();
        self.spawn(move |fs| async move { reply_unit(reply, fs.unlink(parent.0, &name).await) });
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        if flags.contains(RenameFlags::RENAME_EXCHANGE) {
            return reply.error(Errno::EINVAL);
        }
        let no_replace = flags.contains(RenameFlags::RENAME_NOREPLACE);
        let (name, newname) = (name.to_owned(), newname.to_owned());
        self.spawn(move |fs| async move {
            let result = fs
                .rename(parent.0, &name, newparent.0, &newname, no_replace)
                .await;
            reply_unit(reply, result);
        });
    }

    fn mkdir(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        reply: ReplyEntry,
    ) {
        let (uid, gid, name) = (req.uid(), req.gid(), name.to_owned());
        self.spawn(move |fs| async move {
            match fs.mkdir(uid, gid, parent.0, &name, mode & !umask).await {
                Ok(attr) => reply.entry(&fs.ttl(), &file_attr(&attr), Generation(0)),
                Err(e) => reply.error(errno(&e)),
            }
        });
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let name = name.to_owned();
        self.spawn(move |fs| async move { reply_unit(reply, fs.rmdir(parent.0, &name).await) });
    }

    fn symlink(
        &self,
        _req: &Request,
        _parent: INodeNo,
        _link_name: &OsStr,
        _target: &std::path::Path,
        reply: ReplyEntry,
    ) {
        let errno = if self.inner.writes.is_some() {
            libc::EOPNOTSUPP
        } else {
            libc::EROFS
        };
        reply.error(Errno::from_i32(errno));
    }

    fn getxattr(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _name: &OsStr,
        _size: u32,
        reply: ReplyXattr,
    ) {
        reply.error(Errno::from_i32(libc::EOPNOTSUPP));
    }

    fn listxattr(&self, _req: &Request, _ino: INodeNo, _size: u32, reply: ReplyXattr) {
        reply.error(Errno::from_i32(libc::EOPNOTSUPP));
    }

    fn setxattr(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _name: &OsStr,
        _value: &[u8],
        _flags: i32,
        _position: u32,
        reply: ReplyEmpty,
    ) {
        reply.error(Errno::from_i32(libc::EOPNOTSUPP));
    }

    fn removexattr(&self, _req: &Request, _ino: INodeNo, _name: &OsStr, reply: ReplyEmpty) {
        reply.error(Errno::from_i32(libc::EOPNOTSUPP));
    }

    fn link(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _newparent: INodeNo,
        _newname: &OsStr,
        reply: ReplyEntry,
    ) {
        // S3 objects can't share content under two keys.
        reply.error(Errno::EPERM);
    }

    fn read(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        tracing::trace!(fh = fh.0, offset, size, "read");
        let reader = match lock(&self.inner.files).get(&fh.0) {
            Some(Handle::Remote(reader)) => reader.clone(),
            Some(Handle::Local { data, .. }) => {
                return match read_local(data, offset, size).map_err(FsError::from) {
                    Ok(data) => reply.data(&data),
                    Err(e) => reply.error(errno(&e)),
                };
            }
            None => return reply.error(Errno::EBADF),
        };
        self.spawn(move |fs| async move {
            let mut buf = fs.buffers.take();
            match reader.read_into(offset, size, &mut buf).await {
                Ok(()) => reply.data(&buf),
                Err(e) => reply.error(errno(&e)),
            }
            fs.buffers.give(buf);
        });
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        let handle = lock(&self.inner.files).remove(&fh.0);
        if let (
            Some(Handle::Local {
                key, writer: true, ..
            }),
            Some(writes),
        ) = (handle, self.inner.writes.as_ref())
            && writes.dirty.remove_writer(&key)
        {
            writes.uploader.enqueue(&key);
        }
        reply.ok();
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        self.spawn(move |fs| async move {
            match fs.namespace.list(ino.0).await {
                Ok(entries) => {
                    let fh = fs.new_handle();
                    lock(&fs.dirs).insert(fh, Arc::new(entries));
                    reply.opened(FileHandle(fh), FopenFlags::empty());
                }
                Err(e) => reply.error(errno(&e)),
            }
        });
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let fs = &self.inner;
        let entries = match fs.listing(fh.0) {
            Ok(entries) => entries,
            Err(e) => return reply.error(errno(&e)),
        };
        // Offsets: 1 is ".", 2 is "..", 3.. are the listing; an entry's offset is the next one's.
        let parent = fs.namespace.parent_of(ino.0);
        let dots = [(ino.0, "."), (parent, "..")];
        for (i, (dot_ino, name)) in dots.iter().enumerate().skip(offset as usize) {
            if reply.add(INodeNo(*dot_ino), i as u64 + 1, FileType::Directory, name) {
                return reply.ok();
            }
        }
        let skip = (offset as usize).saturating_sub(2);
        for (i, entry) in entries.iter().enumerate().skip(skip) {
            let kind = file_attr(&entry.attr).kind;
            if reply.add(INodeNo(entry.attr.ino), i as u64 + 3, kind, &entry.name) {
                break;
            }
        }
        reply.ok();
    }

    fn readdirplus(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectoryPlus,
    ) {
        let fs = &self.inner;
        let entries = match fs.listing(fh.0) {
            Ok(entries) => entries,
            Err(e) => return reply.error(errno(&e)),
        };
        let ttl = fs.ttl();
        let parent = fs.namespace.parent_of(ino.0);
        let defaults = fs.namespace.defaults();
        // "." and ".." carry no lookup reference (the kernel does not count them).
        let dots = [(ino.0, "."), (parent, "..")];
        for (i, (dot_ino, name)) in dots.iter().enumerate().skip(offset as usize) {
            let attr = file_attr(&defaults.directory(*dot_ino));
            if reply.add(
                INodeNo(*dot_ino),
                i as u64 + 1,
                name,
                &ttl,
                &attr,
                Generation(0),
            ) {
                return reply.ok();
            }
        }
        let skip = (offset as usize).saturating_sub(2);
        for (i, entry) in entries.iter().enumerate().skip(skip) {
            let attr = match fs.namespace.remember(ino.0, entry) {
                Ok(attr) => attr,
                Err(e) => return reply.error(errno(&e)),
            };
            let fattr = file_attr(&attr);
            if reply.add(
                INodeNo(attr.ino),
                i as u64 + 3,
                &entry.name,
                &ttl,
                &fattr,
                Generation(0),
            ) {
                // Not sent: the kernel holds no reference for it.
                fs.namespace.forget(attr.ino, 1);
                break;
            }
        }
        reply.ok();
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        // close(): a written file becomes durable on the cache disk before close returns.
        let Some((key, true)) = self.inner.handle_key(fh.0) else {
            return reply.ok();
        };
        self.spawn(move |fs| async move { reply_unit(reply, fs.persist(key).await) });
    }

    fn releasedir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        reply: ReplyEmpty,
    ) {
        lock(&self.inner.dirs).remove(&fh.0);
        reply.ok();
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        // S3 has no capacity limit; report a large, constant size so tools that check free
        // space proceed. Read-only for now: nothing is free to write.
        const BLOCK: u32 = 4096;
        const BLOCKS: u64 = (1u64 << 50) / BLOCK as u64; // 1 PiB
        reply.statfs(BLOCKS, 0, 0, u64::from(u32::MAX), 0, BLOCK, 255, BLOCK);
    }
}
