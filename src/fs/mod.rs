//! The `fuser::Filesystem` adapter: turns kernel requests into namespace and reader calls.
//!
//! Every request that may touch S3 runs as a task on the tokio runtime and replies from there,
//! so FUSE threads never block on the network and many reads are in flight at once.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::future::Future;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};

use fuser::{
    BsdFileFlags, FileHandle, FopenFlags, Generation, INodeNo, InitFlags, KernelConfig, LockOwner,
    OpenFlags, RenameFlags, ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory, ReplyDirectoryPlus,
    ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs, ReplyWrite, ReplyXattr, Request, TimeOrNow,
    WriteFlags,
};
use tokio::runtime::Handle as RuntimeHandle;

mod listing;
mod reply;

use crate::error::FsError;
use crate::metrics::FuseOp;
use crate::namespace::{Namespace, NodeKind, ROOT_INO};
use crate::prefetch::{BlockFetcher, PrefetchConfig};
use crate::store::ObjectStore;
use crate::vfs::{BufferPool, Detached, Handle, Vfs, Writes, lock};
use reply::{errno, fuse_attr, reply_attr, reply_data, reply_entry, reply_unit, reply_written};

/// Largest read and write the kernel sends in one request.
pub const MAX_IO_SIZE: u32 = 1024 * 1024;
/// Background requests in flight without a tighter memory limit (the kernel's default is 12).
pub const MAX_BACKGROUND: u16 = 64;

pub struct KeepFs<S> {
    inner: Arc<Vfs<S>>,
    runtime: RuntimeHandle,
    /// Told through the root's `user.keepfs.cache_dir` attribute (`keepfs flush MOUNTPOINT`).
    cache_dir: Option<std::path::PathBuf>,
    /// Background requests (readahead, writeback) the kernel may have in flight; each carries
    /// up to [`MAX_IO_SIZE`] bytes that keepfs holds while serving it.
    max_background: u16,
}

impl<S: ObjectStore> KeepFs<S> {
    pub fn new(
        namespace: Namespace<S>,
        fetcher: Arc<BlockFetcher<S>>,
        prefetch: PrefetchConfig,
        store: Arc<S>,
        writes: Option<Writes<S>>,
        runtime: RuntimeHandle,
    ) -> Self {
        Self {
            inner: Arc::new(Vfs {
                namespace,
                fetcher,
                prefetch,
                store,
                writes,
                files: Mutex::new(HashMap::new()),
                pinned: Mutex::new(HashMap::new()),
                removals: AtomicU64::new(0),
                dirtying: tokio::sync::Mutex::new(()),
                dirs: Mutex::new(HashMap::new()),
                next_handle: AtomicU64::new(1),
                buffers: BufferPool::default(),
            }),
            runtime,
            cache_dir: None,
            max_background: MAX_BACKGROUND,
        }
    }

    /// Bounds the kernel's background requests in flight (at most [`MAX_BACKGROUND`]): a
    /// memory limit counts their buffers.
    pub fn with_max_background(mut self, requests: u16) -> Self {
        self.max_background = requests.clamp(1, MAX_BACKGROUND);
        self.inner
            .buffers
            .keep_at_most(usize::from(self.max_background));
        self
    }

    /// Lets `keepfs flush MOUNTPOINT` find the cache directory.
    pub fn with_cache_dir(mut self, dir: std::path::PathBuf) -> Self {
        self.cache_dir = Some(dir);
        self
    }

    /// Runs `op` on the runtime; it replies when done.
    fn spawn<F, Fut>(&self, op: F)
    where
        F: FnOnce(Arc<Vfs<S>>) -> Fut,
        Fut: Future<Output = ()> + Send + 'static,
    {
        self.runtime.spawn(op(Arc::clone(&self.inner)));
    }

    /// Runs `op` like [`KeepFs::spawn`], once it has entered the write barrier: an operation
    /// that changes the filesystem (see [`crate::write::barrier`]).
    fn spawn_change<F, Fut>(&self, op: F)
    where
        F: FnOnce(Arc<Vfs<S>>) -> Fut,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let barrier = self.inner.barrier();
        // Futures do nothing until polled: the operation starts inside the barrier.
        let task = op(Arc::clone(&self.inner));
        self.runtime.spawn(async move {
            let _held = match &barrier {
                Some(barrier) => Some(barrier.enter().await),
                None => None,
            };
            task.await;
        });
    }
}

impl<S: ObjectStore> fuser::Filesystem for KeepFs<S> {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        for flag in [
            InitFlags::FUSE_DO_READDIRPLUS,
            InitFlags::FUSE_PARALLEL_DIROPS,
            InitFlags::FUSE_CACHE_SYMLINKS,
            // open(O_TRUNC) arrives as one open, not a truncate and then an open: the empty
            // file is then part of the writer's next version, never acknowledged on its own.
            InitFlags::FUSE_ATOMIC_O_TRUNC,
        ] {
            if config.add_capabilities(flag).is_err() {
                tracing::debug!(?flag, "kernel lacks FUSE capability");
            }
        }
        // Larger requests and more of them in flight: sequential reads are then limited by S3,
        // not by the FUSE round trips. Older kernels may refuse a value; the default stays.
        let _ = config.set_max_readahead(MAX_IO_SIZE);
        let _ = config.set_max_write(MAX_IO_SIZE);
        let _ = config.set_max_background(self.max_background);
        let _ = config.set_congestion_threshold(self.max_background / 4 * 3);
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let op = FuseOp::start("lookup");
        let name = name.to_owned();
        self.spawn(move |fs| async move {
            let result = fs.namespace.lookup(parent.0, &name).await;
            reply_entry(&op, reply, &fs, result);
        });
    }

    fn forget(&self, _req: &Request, ino: INodeNo, nlookup: u64) {
        let _op = FuseOp::start("forget");
        self.inner.forget(ino.0, nlookup);
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, fh: Option<FileHandle>, reply: ReplyAttr) {
        let op = FuseOp::start("getattr");
        self.spawn(move |fs| async move {
            let result = fs.getattr(ino.0, fh.map(|fh| fh.0)).await;
            match result {
                Ok(attr) => reply.attr(&fs.ttl(), &fuse_attr(&fs, &attr)),
                Err(e) => reply.error(errno(&op, &e)),
            }
        });
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        let op = FuseOp::start("readlink");
        self.spawn(move |fs| async move {
            match fs.readlink(ino.0).await {
                Ok(target) => reply.data(&target),
                Err(e) => reply.error(errno(&op, &e)),
            }
        });
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let op = FuseOp::start("open");
        // Opening for writing or truncating may change the file.
        let changes = flags.0 & libc::O_ACCMODE != libc::O_RDONLY || flags.0 & libc::O_TRUNC != 0;
        let run = |fs: Arc<Vfs<S>>| async move {
            match fs.open_file(ino.0, flags).await {
                Ok((fh, flags)) => reply.opened(FileHandle(fh), flags),
                Err(e) => reply.error(errno(&op, &e)),
            }
        };
        if changes {
            self.spawn_change(run);
        } else {
            self.spawn(run);
        }
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
        let op = FuseOp::start("create");
        let fs = &self.inner;
        let _held = fs.enter_blocking();
        let perm = mode & !umask & 0o7777;
        match fs.create_empty(req.uid(), req.gid(), parent.0, name, perm) {
            Ok((key, attr)) => {
                let opened = fs
                    .writes()
                    .and_then(|w| w.dirty.id_of(&key).ok_or(FsError::NotFound));
                let fh = match opened.and_then(|fid| fs.local_handle(attr.ino, fid, true)) {
                    Ok(fh) => fh,
                    Err(e) => return reply.error(errno(&op, &e)),
                };
                reply.created(
                    &fs.ttl(),
                    &fuse_attr(fs, &attr),
                    Generation(0),
                    FileHandle(fh),
                    FopenFlags::empty(),
                );
            }
            Err(e) => reply.error(errno(&op, &e)),
        }
    }

    fn mknod(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        rdev: u32,
        reply: ReplyEntry,
    ) {
        let op = FuseOp::start("mknod");
        let (uid, gid, name) = (req.uid(), req.gid(), name.to_owned());
        let perm = mode & !umask & 0o7777;
        if let Some(kind) = NodeKind::special(mode, rdev) {
            return self.spawn_change(move |fs| async move {
                let result = fs
                    .mknod_special(uid, gid, parent.0, &name, kind, perm)
                    .await;
                reply_entry(&op, reply, &fs, result);
            });
        }
        if mode & libc::S_IFMT != libc::S_IFREG && mode & libc::S_IFMT != 0 {
            return reply.error(op.fail(libc::EINVAL));
        }
        // A regular file: an empty written file, durable (journalled) when mknod returns.
        let fs = &self.inner;
        let _held = fs.enter_blocking();
        let result = fs
            .create_empty(uid, gid, parent.0, &name, perm)
            .and_then(|(key, attr)| {
                fs.persist_and_queue(&key)?;
                Ok(attr)
            });
        reply_entry(&op, reply, fs, result);
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
        let op = FuseOp::start("write");
        tracing::trace!(fh = fh.0, offset, len = data.len(), "write");
        let fs = &self.inner;
        let held = fs.enter_blocking();
        let handle = match fs.handle_file(fh.0) {
            Some((fid, true)) => Some(fid),
            _ => None,
        };
        let result = match (handle, fs.writes()) {
            (Some(fid), Ok(w)) if !w.has_room(data.len() as u64) => {
                // Over --max-cache-size: wait for uploads off the FUSE thread.
                let data = data.to_vec();
                drop(held); // entered again by the task
                return self.spawn_change(move |fs| async move {
                    let result = match fs.writes() {
                        Ok(w) => match w.wait_for_room(data.len() as u64).await {
                            Ok(()) => w.write(fid, offset, &data),
                            Err(e) => Err(e),
                        },
                        Err(e) => Err(e),
                    };
                    match result {
                        Ok(()) => reply_written(reply, data.len()),
                        Err(e) => reply.error(errno(&op, &e)),
                    }
                });
            }
            (Some(fid), Ok(w)) => w.write(fid, offset, data),
            (None, Ok(_)) => Err(FsError::BadHandle(fh.0)),
            (_, Err(e)) => Err(e),
        };
        match result {
            Ok(()) => reply_written(reply, data.len()),
            Err(e) => reply.error(errno(&op, &e)),
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
        let op = FuseOp::start("fsync");
        tracing::trace!(fh = fh.0, "fsync");
        let Some((fid, _)) = self.inner.handle_file(fh.0) else {
            return reply.ok(); // nothing local to sync
        };
        self.spawn_change(move |fs| async move { reply_unit(&op, reply, fs.persist(fid).await) });
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        _ctime: Option<std::time::SystemTime>,
        fh: Option<FileHandle>,
        _crtime: Option<std::time::SystemTime>,
        _chgtime: Option<std::time::SystemTime>,
        _bkuptime: Option<std::time::SystemTime>,
        _flags: Option<BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let op = FuseOp::start("setattr");
        let time = |t: TimeOrNow| match t {
            TimeOrNow::SpecificTime(t) => t,
            TimeOrNow::Now => std::time::SystemTime::now(),
        };
        let (mtime, atime) = (mtime.map(time), atime.map(time));
        self.spawn_change(move |fs| async move {
            let fh = fh.map(|fh| fh.0);
            let result = fs
                .setattr(ino.0, fh, mode, uid, gid, size, mtime, atime)
                .await;
            reply_attr(&op, reply, &fs, result);
        });
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let op = FuseOp::start("unlink");
        let name = name.to_owned();
        self.spawn_change(move |fs| async move {
            let result = fs.unlink(parent.0, &name).await;
            reply_unit(&op, reply, result);
        });
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
        let op = FuseOp::start("rename");
        if flags.contains(RenameFlags::RENAME_EXCHANGE) {
            return reply.error(op.fail(libc::EINVAL));
        }
        let no_replace = flags.contains(RenameFlags::RENAME_NOREPLACE);
        let (name, newname) = (name.to_owned(), newname.to_owned());
        self.spawn_change(move |fs| async move {
            let result = fs
                .rename(parent.0, &name, newparent.0, &newname, no_replace)
                .await;
            reply_unit(&op, reply, result);
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
        let op = FuseOp::start("mkdir");
        let (uid, gid, name) = (req.uid(), req.gid(), name.to_owned());
        self.spawn_change(move |fs| async move {
            let result = fs.mkdir(uid, gid, parent.0, &name, mode & !umask).await;
            reply_entry(&op, reply, &fs, result);
        });
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let op = FuseOp::start("rmdir");
        let name = name.to_owned();
        self.spawn_change(move |fs| async move {
            let result = fs.rmdir(parent.0, &name).await;
            reply_unit(&op, reply, result);
        });
    }

    fn symlink(
        &self,
        req: &Request,
        parent: INodeNo,
        link_name: &OsStr,
        target: &std::path::Path,
        reply: ReplyEntry,
    ) {
        let op = FuseOp::start("symlink");
        let (uid, gid) = (req.uid(), req.gid());
        let (name, target) = (link_name.to_owned(), target.to_owned());
        self.spawn_change(move |fs| async move {
            let result = fs.symlink(uid, gid, parent.0, &name, &target).await;
            reply_entry(&op, reply, &fs, result);
        });
    }

    fn fallocate(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        let op = FuseOp::start("fallocate");
        let _held = self.inner.enter_blocking();
        let result = match self.inner.handle_file(fh.0) {
            Some((fid, true)) => self.inner.fallocate(fid, ino.0, offset, length, mode),
            Some((_, false)) | None => Err(FsError::BadHandle(fh.0)),
        };
        reply_unit(&op, reply, result);
    }

    fn getxattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        let op = FuseOp::start("getxattr");
        // The one attribute keepfs has: the root names the cache directory (not listed, so
        // tools that copy attributes don't copy it).
        let cache_dir = self
            .cache_dir
            .as_ref()
            .filter(|_| ino.0 == ROOT_INO && name == crate::flush::CACHE_DIR_XATTR);
        let Some(dir) = cache_dir else {
            reply.error(op.fail(libc::EOPNOTSUPP));
            return;
        };
        let value = dir.as_os_str().as_encoded_bytes();
        if size == 0 {
            reply.size(value.len() as u32);
        } else if (size as usize) < value.len() {
            reply.error(op.fail(libc::ERANGE));
        } else {
            reply.data(value);
        }
    }

    fn listxattr(&self, _req: &Request, _ino: INodeNo, _size: u32, reply: ReplyXattr) {
        let op = FuseOp::start("listxattr");
        reply.error(op.fail(libc::EOPNOTSUPP));
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
        let op = FuseOp::start("setxattr");
        reply.error(op.fail(libc::EOPNOTSUPP));
    }

    fn removexattr(&self, _req: &Request, _ino: INodeNo, _name: &OsStr, reply: ReplyEmpty) {
        let op = FuseOp::start("removexattr");
        reply.error(op.fail(libc::EOPNOTSUPP));
    }

    fn link(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _newparent: INodeNo,
        _newname: &OsStr,
        reply: ReplyEntry,
    ) {
        let op = FuseOp::start("link");
        // S3 objects can't share content under two keys.
        reply.error(op.fail(libc::EPERM));
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
        let op = FuseOp::start("read");
        tracing::trace!(fh = fh.0, offset, size, "read");
        let local = match lock(&self.inner.files).get(&fh.0) {
            Some(Handle::Remote(file)) => match file.detached.get() {
                Some(Detached::Copy(local)) => {
                    return match local.read(offset, u64::from(size)) {
                        Ok(data) => reply_data(reply, &data),
                        Err(e) => reply.error(errno(&op, &FsError::from(e))),
                    };
                }
                Some(Detached::Written(fid, data)) => (*fid, data.clone()),
                None => {
                    let file = file.clone();
                    return self.spawn(move |fs| async move {
                        let mut buf = fs.buffers.take();
                        match file.reader.read_into(offset, size, &mut buf).await {
                            Ok(()) => reply_data(reply, &buf),
                            Err(e) => reply.error(errno(&op, &e)),
                        }
                        fs.buffers.give(buf);
                    });
                }
            },
            Some(Handle::Local { fid, data, .. }) => (*fid, data.clone()),
            None => return reply.error(op.fail(libc::EBADF)),
        };
        let (fid, data) = local;
        let end = offset + u64::from(size);
        if data.missing(offset..end).is_empty() {
            return match data.read(offset, u64::from(size)) {
                Ok(data) => reply_data(reply, &data),
                Err(e) => reply.error(errno(&op, &FsError::from(e))),
            };
        }
        self.spawn(move |fs| async move {
            match fs.read_local(fid, &data, offset, size).await {
                Ok(bytes) => reply_data(reply, &bytes),
                Err(e) => reply.error(errno(&op, &e)),
            }
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
        let _op = FuseOp::start("release");
        // A writer's last release lets its upload start: not while a snapshot's barrier holds
        // the open files' acknowledged versions still.
        let _held = self.inner.enter_blocking();
        let handle = lock(&self.inner.files).remove(&fh.0);
        let local = match handle {
            Some(Handle::Local { fid, writer, .. }) => Some((fid, writer)),
            Some(Handle::Remote(file)) => match file.detached.get() {
                Some(Detached::Written(fid, _)) => Some((*fid, false)),
                _ => None,
            },
            None => None,
        };
        if let (Some((fid, writer)), Some(writes)) = (local, self.inner.writes.as_ref())
            && let Some(key) = writes.dirty.released(fid, writer)
        {
            writes.uploader.enqueue(&key);
        }
        reply.ok();
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        let op = FuseOp::start("opendir");
        self.spawn(move |fs| async move {
            match fs.namespace.list_for_readdir(ino.0).await {
                Ok(entries) => {
                    let fh = fs.new_handle();
                    lock(&fs.dirs).insert(fh, Arc::new(entries));
                    reply.opened(FileHandle(fh), FopenFlags::empty());
                }
                Err(e) => reply.error(errno(&op, &e)),
            }
        });
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        reply: ReplyDirectory,
    ) {
        let op = FuseOp::start("readdir");
        listing::readdir(&op, &self.inner, ino.0, fh.0, offset, reply);
    }

    fn readdirplus(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        reply: ReplyDirectoryPlus,
    ) {
        let op = FuseOp::start("readdirplus");
        listing::readdirplus(&op, &self.inner, ino.0, fh.0, offset, reply);
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        let op = FuseOp::start("flush");
        tracing::trace!(fh = fh.0, "flush");
        // close(): a written file becomes durable on the cache disk before close returns.
        let Some((fid, true)) = self.inner.handle_file(fh.0) else {
            return reply.ok();
        };
        self.spawn_change(move |fs| async move { reply_unit(&op, reply, fs.persist(fid).await) });
    }

    fn fsyncdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        let op = FuseOp::start("fsyncdir");
        self.spawn_change(
            move |fs| async move { reply_unit(&op, reply, fs.sync_dir(ino.0).await) },
        );
    }

    fn releasedir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        reply: ReplyEmpty,
    ) {
        let _op = FuseOp::start("releasedir");
        lock(&self.inner.dirs).remove(&fh.0);
        reply.ok();
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let op = FuseOp::start("statfs");
        const BLOCK: u32 = 4096;
        let space = self.inner.writes.as_ref().map(|w| w.space());
        match space {
            // Writes land in the cache directory first: its disk is what can be written
            // before uploads must drain it.
            Some(Ok((total, available))) => {
                let (total, available) = (total / u64::from(BLOCK), available / u64::from(BLOCK));
                reply.statfs(
                    total,
                    available,
                    available,
                    u64::from(u32::MAX),
                    u64::from(u32::MAX),
                    BLOCK,
                    255,
                    BLOCK,
                );
            }
            Some(Err(e)) => reply.error(errno(&op, &FsError::from(e))),
            // Read-only: S3 has no capacity limit, so a large constant size, nothing free.
            None => {
                const BLOCKS: u64 = (1u64 << 50) / BLOCK as u64; // 1 PiB
                reply.statfs(BLOCKS, 0, 0, u64::from(u32::MAX), 0, BLOCK, 255, BLOCK);
            }
        }
    }
}
