//! Directory listings to the kernel: `readdir` (names and types) and `readdirplus` (with
//! attributes, each entry a lookup reference), from the listing taken at `opendir`.

use std::time::Duration;

use fuser::{FileType, Generation, INodeNo, ReplyDirectory, ReplyDirectoryPlus};

use super::reply::{errno, file_type, fuse_attr};
use crate::metrics::FuseOp;
use crate::store::ObjectStore;
use crate::vfs::Vfs;

/// Answers `readdir` of directory `ino` from handle `fh`'s listing, from `offset` on.
pub(super) fn readdir<S: ObjectStore>(
    op: &FuseOp,
    fs: &Vfs<S>,
    ino: u64,
    fh: u64,
    offset: u64,
    mut reply: ReplyDirectory,
) {
    let entries = match fs.listing(fh) {
        Ok(entries) => entries,
        Err(e) => return reply.error(errno(op, &e)),
    };
    // Offsets: 1 is ".", 2 is "..", 3.. are the listing; an entry's offset is the next one's.
    let parent = fs.namespace.parent_of(ino);
    let dots = [(ino, "."), (parent, "..")];
    for (i, (dot_ino, name)) in dots.iter().enumerate().skip(offset as usize) {
        if reply.add(INodeNo(*dot_ino), i as u64 + 1, FileType::Directory, name) {
            return reply.ok();
        }
    }
    let skip = (offset as usize).saturating_sub(2);
    for (i, entry) in entries.iter().enumerate().skip(skip) {
        let kind = file_type(entry.attr.kind);
        if reply.add(INodeNo(entry.attr.ino), i as u64 + 3, kind, &entry.name) {
            break;
        }
    }
    reply.ok();
}

/// Answers `readdirplus` of directory `ino` from handle `fh`'s listing, from `offset` on.
pub(super) fn readdirplus<S: ObjectStore>(
    op: &FuseOp,
    fs: &Vfs<S>,
    ino: u64,
    fh: u64,
    offset: u64,
    mut reply: ReplyDirectoryPlus,
) {
    let entries = match fs.listing(fh) {
        Ok(entries) => entries,
        Err(e) => return reply.error(errno(op, &e)),
    };
    let ttl = fs.ttl();
    let parent = fs.namespace.parent_of(ino);
    let defaults = fs.namespace.defaults();
    // "." and ".." carry no lookup reference (the kernel does not count them).
    let dots = [(ino, "."), (parent, "..")];
    for (i, (dot_ino, name)) in dots.iter().enumerate().skip(offset as usize) {
        let attr = fuse_attr(fs, &defaults.directory(*dot_ino));
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
        let attr = match fs.namespace.remember(ino, entry) {
            Ok(attr) => attr,
            Err(e) => return reply.error(errno(op, &e)),
        };
        let fattr = fuse_attr(fs, &attr);
        // The kernel looks up (HEADs) a listed object before trusting its type, mode,
        // owner and times: only a HEAD tells them.
        let entry_ttl = if entry.unverified() {
            Duration::ZERO
        } else {
            ttl
        };
        if reply.add(
            INodeNo(attr.ino),
            i as u64 + 3,
            &entry.name,
            &entry_ttl,
            &fattr,
            Generation(0),
        ) {
            // Not sent: the kernel holds no reference for it.
            fs.forget(attr.ino, 1);
            break;
        }
    }
    reply.ok();
}
