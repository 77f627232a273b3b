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
    Errno, FileAttr, FileHandle, FileType, FopenFlags, Generation, INodeNo, InitFlags,
    KernelConfig, LockOwner, OpenFlags, ReplyAttr, ReplyData, ReplyDirectory, ReplyDirectoryPlus,
    ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs, Request,
};
use tokio::runtime::Handle;

use crate::error::FsError;
use crate::namespace::{Attr, Listed, Namespace, NodeKind};
use crate::prefetch::{BlockFetcher, FileReader, ObjectVersion, PrefetchConfig};
use crate::store::ObjectStore;

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
    runtime: Handle,
}

struct Inner<S> {
    namespace: Namespace<S>,
    fetcher: Arc<BlockFetcher<S>>,
    prefetch: PrefetchConfig,
    files: Mutex<HashMap<u64, Arc<FileReader<S>>>>,
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

impl<S: ObjectStore> KeepFs<S> {
    pub fn new(
        namespace: Namespace<S>,
        fetcher: Arc<BlockFetcher<S>>,
        prefetch: PrefetchConfig,
        runtime: Handle,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                namespace,
                fetcher,
                prefetch,
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
        if flags.0 & libc::O_ACCMODE != libc::O_RDONLY {
            reply.error(Errno::EROFS);
            return;
        }
        self.spawn(move |fs| async move {
            match fs.open_reader(ino.0).await {
                Ok((reader, keep_cache)) => {
                    let fh = fs.new_handle();
                    lock(&fs.files).insert(fh, Arc::new(reader));
                    let flags = if keep_cache {
                        FopenFlags::FOPEN_KEEP_CACHE
                    } else {
                        FopenFlags::empty()
                    };
                    reply.opened(FileHandle(fh), flags);
                }
                Err(e) => reply.error(errno(&e)),
            }
        });
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
        let Some(reader) = lock(&self.inner.files).get(&fh.0).cloned() else {
            reply.error(Errno::EBADF);
            return;
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
        lock(&self.inner.files).remove(&fh.0);
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
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        // Nothing is buffered for writing yet: every close succeeds.
        reply.ok();
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
