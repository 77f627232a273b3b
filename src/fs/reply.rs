//! Replies to the kernel: attributes in the kernel's shape, errors as errnos (counted by
//! [`FuseOp`]), and the bytes a read returns or a write took (counted for the metrics).

use fuser::{
    Errno, FileAttr, FileType, Generation, INodeNo, ReplyAttr, ReplyData, ReplyEmpty, ReplyEntry,
    ReplyWrite,
};

use super::MAX_IO_SIZE;
use crate::error::FsError;
use crate::metrics::{self, FuseOp};
use crate::namespace::{Attr, NodeKind};
use crate::store::ObjectStore;
use crate::vfs::Vfs;

/// The kernel's view of `attr`, with its link count from the inode table.
pub(super) fn fuse_attr<S: ObjectStore>(fs: &Vfs<S>, attr: &Attr) -> FileAttr {
    file_attr(attr, fs.namespace.nlink(attr.ino))
}

/// The kernel's file type of `kind`.
pub(super) fn file_type(kind: NodeKind) -> FileType {
    match kind {
        NodeKind::Directory => FileType::Directory,
        NodeKind::File => FileType::RegularFile,
        NodeKind::Symlink => FileType::Symlink,
        NodeKind::Special { file_type, .. } => match file_type {
            libc::S_IFIFO => FileType::NamedPipe,
            libc::S_IFSOCK => FileType::Socket,
            libc::S_IFCHR => FileType::CharDevice,
            _ => FileType::BlockDevice,
        },
    }
}

pub(super) fn file_attr(attr: &Attr, nlink: u32) -> FileAttr {
    let kind = file_type(attr.kind);
    let rdev = match attr.kind {
        NodeKind::Special { rdev, .. } => rdev,
        _ => 0,
    };
    FileAttr {
        ino: INodeNo(attr.ino),
        size: attr.size,
        blocks: attr.size.div_ceil(512),
        atime: attr.atime,
        mtime: attr.mtime,
        ctime: attr.ctime,
        crtime: attr.mtime,
        kind,
        perm: attr.perm,
        nlink,
        uid: attr.uid,
        gid: attr.gid,
        rdev,
        blksize: MAX_IO_SIZE,
        flags: 0,
    }
}

/// Logs a failed request (expected misses at debug level) and records its errno on `op`.
pub(super) fn errno(op: &FuseOp, e: &FsError) -> Errno {
    match e {
        FsError::NotFound | FsError::NameTooLong => {
            tracing::debug!(error = %e, "request failed")
        }
        _ => tracing::warn!(error = %e, "request failed"),
    }
    op.fail(e.errno())
}

/// Replies with a new directory entry (lookup, mkdir) or the error.
pub(super) fn reply_entry<S: ObjectStore>(
    op: &FuseOp,
    reply: ReplyEntry,
    fs: &Vfs<S>,
    result: Result<Attr, FsError>,
) {
    match result {
        Ok(attr) => reply.entry(&fs.ttl(), &fuse_attr(fs, &attr), Generation(0)),
        Err(e) => reply.error(errno(op, &e)),
    }
}

/// Replies with attributes (getattr, setattr) or the error.
pub(super) fn reply_attr<S: ObjectStore>(
    op: &FuseOp,
    reply: ReplyAttr,
    fs: &Vfs<S>,
    result: Result<Attr, FsError>,
) {
    match result {
        Ok(attr) => reply.attr(&fs.ttl(), &fuse_attr(fs, &attr)),
        Err(e) => reply.error(errno(op, &e)),
    }
}

/// Replies to a request that returns nothing but success or an error.
pub(super) fn reply_unit(op: &FuseOp, reply: ReplyEmpty, result: Result<(), FsError>) {
    match result {
        Ok(()) => reply.ok(),
        Err(e) => reply.error(errno(op, &e)),
    }
}

/// Replies to a read with `data`.
pub(super) fn reply_data(reply: ReplyData, data: &[u8]) {
    metrics::get().read_bytes.inc_by(data.len() as u64);
    reply.data(data);
}

/// Replies to a write that took `len` bytes.
pub(super) fn reply_written(reply: ReplyWrite, len: usize) {
    metrics::get().written_bytes.inc_by(len as u64);
    reply.written(len as u32);
}
