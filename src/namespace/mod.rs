//! Paths ↔ keys: lookups, listings, attributes and the inode table.
//!
//! Key `PREFIX/a/b.txt` is file `a/b.txt`; directories come from `/` in keys (ListObjectsV2 with
//! a delimiter) and from `dir/` marker objects. A name that is both a file and a directory shows
//! the directory. Keys that can't be file names are skipped and logged once.

mod attr;
mod complete;
mod inodes;
mod listing;
mod lookup;
mod names;
mod statahead;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::ffi::OsStr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub use attr::{
    ATTRIBUTE_METADATA, Attr, Defaults, MAX_SYMLINK_TARGET, NodeKind, stored_metadata,
    stored_metadata_of, with_times,
};
pub use inodes::ROOT_INO;
use inodes::{InodeTable, Seen, version};
use names::{InvalidName, check_component, check_listed, dir_key, is_reserved, join};
pub use names::{MAX_KEY_LEN, normalize_prefix};

use crate::cache::heads::HeadLog;
use crate::error::FsError;
use crate::store::{ObjectMeta, ObjectStore, StoreError};
use crate::write::{DirtyAttr, DirtyFiles};

/// How many skipped keys are remembered for "log once"; beyond it they are logged again.
const SKIPPED_LOG_CAPACITY: usize = 100_000;

/// One entry of a directory listing, before the kernel has been told about it.
#[derive(Debug, Clone)]
pub struct Listed {
    pub name: String,
    pub attr: Attr,
    etag: Option<String>,
    from_head: bool,
    from_server: bool,
    /// When the listing began (before its snapshot of dirty files and its first request).
    asked: Instant,
}

impl Listed {
    /// Whether this listed object's attributes are only the listing's (see
    /// [`attr::unverified`]); files written on this mount are known.
    pub fn unverified(&self) -> bool {
        self.from_server && attr::unverified(&self.attr, self.from_head)
    }
}

/// An object opened for reading, pinned to the version seen at open.
#[derive(Debug, Clone)]
pub struct OpenedObject {
    pub key: String,
    pub etag: String,
    pub size: u64,
    /// The kernel may keep its page cache: the version is the one the last open saw.
    pub keep_cache: bool,
}

pub struct Namespace<S> {
    store: Arc<S>,
    prefix: String,
    defaults: Defaults,
    ttl: Duration,
    table: Mutex<InodeTable>,
    skipped: Mutex<HashSet<String>>,
    /// Local copies newer than S3 (read-write mounts); they shadow the bucket.
    dirty: Option<Arc<DirtyFiles>>,
    /// Directories made on this mount. Their markers are in S3, but some servers never list
    /// markers, so the mount remembers them to show empty directories it created.
    /// Directories whose marker this mount wrote (mkdir, setattr), with their attributes.
    made_dirs: Mutex<HashMap<String, Attr>>,
    /// HEADs of listed objects sent ahead of the kernel's lookups (`ls -l`).
    statahead: statahead::Statahead,
    /// HEAD answers kept across restarts: a listed object of a version HEADed before needs
    /// no HEAD.
    heads: Option<Arc<HeadLog>>,
}

impl<S: ObjectStore> Namespace<S> {
    /// `prefix` is normalised (`""` or ending in `/`); `ttl` bounds how long attributes are
    /// trusted without asking the server again.
    pub fn new(store: Arc<S>, prefix: &str, defaults: Defaults, ttl: Duration) -> Self {
        let table = InodeTable::new(defaults.directory(ROOT_INO), ttl);
        Self {
            store,
            prefix: normalize_prefix(prefix),
            defaults,
            ttl,
            table: Mutex::new(table),
            skipped: Mutex::new(HashSet::new()),
            dirty: None,
            made_dirs: Mutex::new(HashMap::new()),
            statahead: statahead::Statahead::new(ttl),
            heads: None,
        }
    }

    /// Keeps HEAD answers in `heads` and answers listed objects from it.
    pub fn with_head_log(mut self, heads: Arc<HeadLog>) -> Self {
        self.heads = Some(heads);
        self
    }

    /// Makes dirty files part of the namespace (read-write mounts).
    pub fn with_dirty_files(mut self, dirty: Arc<DirtyFiles>) -> Self {
        self.dirty = Some(dirty);
        self
    }

    fn dirty_attr(&self, key: &str) -> Option<DirtyAttr> {
        self.dirty.as_ref().and_then(|d| d.attr(key))
    }

    /// Whether files written here (not yet in S3) lie below directory `path`.
    fn has_dirty_under(&self, path: &str) -> bool {
        let prefix = dir_key(&self.prefix, path);
        self.dirty.as_ref().is_some_and(|d| d.any_under(&prefix))
    }

    /// Removed here while its upload may still put it in S3 for a moment.
    fn is_gone(&self, key: &str) -> bool {
        self.dirty.as_ref().is_some_and(|d| d.is_gone(key))
    }

    fn seen_dirty(&self, attr: &DirtyAttr) -> Seen {
        Seen {
            attr: Attr {
                ino: 0,
                kind: NodeKind::File,
                size: attr.size,
                mtime: attr.mtime,
                atime: attr.atime,
                ctime: attr.ctime,
                perm: (attr.mode & 0o7777) as u16,
                uid: attr.uid,
                gid: attr.gid,
            },
            etag: None,
            from_head: true,
            from_server: false,
        }
    }

    /// Whether `ino` is a file with a local copy newer than S3.
    pub fn dirty_key(&self, ino: u64) -> Option<String> {
        if !self.table().is_linked(ino) {
            return None; // unlinked or replaced: the key's local copy is another file's
        }
        let (path, kind) = self.path_of(ino).ok()?;
        let key = self.object_key(&path);
        (kind == NodeKind::File && self.dirty_attr(&key).is_some()).then_some(key)
    }

    /// Records that an entry was added to or removed from directory `ino` now (see
    /// [`InodeTable::touch_dir`]).
    pub fn touch_dir(&self, ino: u64) {
        if let Ok((path, NodeKind::Directory)) = self.path_of(ino) {
            self.statahead.forget(&path);
            self.table().touch_dir(&path, std::time::SystemTime::now());
        }
    }

    /// Whether `ino` is still linked at its name (not unlinked, renamed over or replaced).
    pub fn is_linked(&self, ino: u64) -> bool {
        self.table().is_linked(ino)
    }

    /// Link count of `ino` (see [`InodeTable::nlink`]).
    pub fn nlink(&self, ino: u64) -> u32 {
        self.table().nlink(ino)
    }

    /// The path a new entry `name` in directory `parent` would have.
    fn new_child(&self, parent: u64, name: &OsStr) -> Result<String, FsError> {
        let (dir, kind) = self.path_of(parent)?;
        if kind != NodeKind::Directory {
            return Err(FsError::NotDirectory);
        }
        let name = name.to_str().ok_or(FsError::InvalidArgument)?;
        if is_reserved(&dir, name) {
            return Err(FsError::Reserved);
        }
        let path = match check_component(name) {
            Ok(()) => join(&dir, name),
            Err(InvalidName::TooLong) => return Err(FsError::NameTooLong),
            Err(_) => return Err(FsError::InvalidArgument),
        };
        if self.object_key(&path).len() > MAX_KEY_LEN {
            return Err(FsError::NameTooLong);
        }
        Ok(path)
    }

    fn made_dirs(&self) -> std::sync::MutexGuard<'_, HashMap<String, Attr>> {
        self.made_dirs.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The directories made here directly in `dir`: name and attributes.
    fn made_in(&self, dir: &str) -> Vec<(String, Attr)> {
        self.made_dirs()
            .iter()
            .filter_map(|(p, attr)| {
                let (parent, name) = p.rsplit_once('/').unwrap_or(("", p));
                (parent == dir).then(|| (name.to_owned(), attr.clone()))
            })
            .collect()
    }

    /// The marker key of a new directory `name` in `parent`, for `mkdir`.
    pub fn new_dir_marker(&self, parent: u64, name: &OsStr) -> Result<(String, String), FsError> {
        let path = self.new_child(parent, name)?;
        let marker = dir_key(&self.prefix, &path);
        if marker.len() > MAX_KEY_LEN {
            return Err(FsError::NameTooLong);
        }
        Ok((path, marker))
    }

    /// Records directory `path` whose marker this mount wrote with `attr` (mkdir: one kernel
    /// reference), or rewrote (setattr of `ino`).
    pub fn made_dir(&self, path: &str, attr: Attr) -> Attr {
        self.made_dirs().insert(path.to_owned(), attr.clone());
        let mut table = self.table();
        table.dir_made(path, true);
        table.remember(path, self.seen_marker(attr))
    }

    /// Records new attributes of directory `ino` (its marker was rewritten).
    pub fn dir_attr_changed(&self, ino: u64, attr: Attr) -> Result<Attr, FsError> {
        let (path, _) = self.path_of(ino)?;
        self.made_dirs().insert(path.clone(), attr.clone());
        let mut table = self.table();
        table.clear_dir_change(&path);
        let node = table.get_mut(ino).ok_or(FsError::StaleInode(ino))?;
        node.attr = Attr { ino, ..attr };
        node.from_head = true;
        Ok(node.attr.clone())
    }

    /// The marker key of directory `ino`.
    pub fn marker_of(&self, ino: u64) -> Result<String, FsError> {
        let (path, _) = self.path_of(ino)?;
        Ok(dir_key(&self.prefix, &path))
    }

    /// Forgets a removed directory `ino`; returns its marker key.
    pub fn removed_dir(&self, ino: u64) -> Result<String, FsError> {
        let (path, _) = self.path_of(ino)?;
        self.made_dirs().remove(&path);
        let mut table = self.table();
        table.dir_made(&path, false);
        table.unlink(ino);
        Ok(dir_key(&self.prefix, &path))
    }

    /// Registers a file just created (or made dirty) at `name` in `parent`, with one kernel
    /// reference; returns its key and attributes.
    pub fn create_file(
        &self,
        parent: u64,
        name: &OsStr,
        make: impl FnOnce(&str) -> std::io::Result<DirtyAttr>,
    ) -> Result<(String, Attr), FsError> {
        let path = self.new_child(parent, name)?;
        let key = self.object_key(&path);
        let attr = make(&key).map_err(|e| FsError::Local(e.to_string(), e.raw_os_error()))?;
        let seen = self.seen_dirty(&attr);
        Ok((key, self.table().remember(&path, seen)))
    }

    /// Registers object `meta` this mount just wrote straight to S3 as `name` in `parent`
    /// (symlink, mknod), with one kernel reference: what a HEAD would say, without one.
    pub fn object_written(
        &self,
        parent: u64,
        name: &OsStr,
        meta: &ObjectMeta,
    ) -> Result<Attr, FsError> {
        let path = self.new_child(parent, name)?;
        Ok(self.table().remember(&path, self.seen_object(meta, true)))
    }

    /// Updates the attributes of live node `ino` from its dirty copy.
    pub fn refresh_dirty(&self, ino: u64, attr: &DirtyAttr) -> Attr {
        let seen = self.seen_dirty(attr);
        let mut table = self.table();
        match table.get_mut(ino) {
            Some(node) => {
                node.attr = Attr { ino, ..seen.attr };
                node.validated = None;
                // Written here: the versions S3 gets are this inode's.
                node.written_here = true;
                node.attr.clone()
            }
            None => Attr { ino, ..seen.attr },
        }
    }

    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    fn table(&self) -> std::sync::MutexGuard<'_, InodeTable> {
        // A panic while holding the lock leaves a consistent table (every mutation is a few
        // plain assignments), so a poisoned lock is safe to keep using.
        self.table.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn path_of(&self, ino: u64) -> Result<(String, NodeKind), FsError> {
        self.table()
            .get(ino)
            .map(|n| (n.path.clone(), n.attr.kind))
            .ok_or(FsError::StaleInode(ino))
    }

    fn object_key(&self, path: &str) -> String {
        format!("{}{}", self.prefix, path)
    }

    /// Logs a key that can't be shown, once per key.
    fn skip_key(&self, key: &str, why: InvalidName) {
        let mut skipped = self.skipped.lock().unwrap_or_else(|e| e.into_inner());
        if skipped.len() >= SKIPPED_LOG_CAPACITY {
            skipped.clear();
        }
        if skipped.insert(key.to_owned()) {
            tracing::warn!(key, reason = %why, "skipping key that can't be a file name");
        }
    }

    fn seen_object(&self, meta: &ObjectMeta, from_head: bool) -> Seen {
        Seen {
            attr: self.defaults.object(0, meta),
            etag: Some(meta.etag.clone()),
            from_head,
            from_server: true,
        }
    }

    /// A directory known only from keys under it: mount defaults.
    fn seen_directory(&self) -> Seen {
        Seen {
            attr: self.defaults.directory(0),
            etag: None,
            from_head: false,
            from_server: true,
        }
    }

    /// A directory whose marker's metadata is known: listings keep these attributes.
    fn seen_marker(&self, attr: Attr) -> Seen {
        Seen {
            attr,
            etag: None,
            from_head: true,
            from_server: true,
        }
    }

    /// The path and key a renamed entry gets: `name` in directory `parent`.
    pub fn rename_target(&self, parent: u64, name: &OsStr) -> Result<(String, String), FsError> {
        let path = self.new_child(parent, name)?;
        let key = self.object_key(&path);
        Ok((path, key))
    }

    /// Makes the next `getattr` of `ino` ask the server.
    pub fn expire(&self, ino: u64) {
        if let Some(node) = self.table().get_mut(ino) {
            node.validated = None;
        }
    }

    /// Records that `ino` now lives at `path`.
    pub fn renamed(&self, ino: u64, path: &str) {
        if let Ok((old, _)) = self.path_of(ino) {
            self.forget_departure(&old);
        }
        self.forget_departure(path);
        self.table().rename(ino, path);
    }

    /// Directory `ino` and everything below it now live at `path`; returns the old path.
    pub fn renamed_dir(&self, ino: u64, path: &str) -> Result<String, FsError> {
        let (old, _) = self.path_of(ino)?;
        self.table().rename_subtree(&old, path);
        let below = format!("{old}/");
        let mut made = self.made_dirs();
        let moved: Vec<String> = made
            .keys()
            .filter(|p| **p == old || p.starts_with(&below))
            .cloned()
            .collect();
        for p in moved {
            if let Some(attr) = made.remove(&p) {
                made.insert(format!("{path}{}", &p[old.len()..]), attr);
            }
        }
        Ok(old)
    }

    /// Forgets the path of `ino` after an unlink, so the next lookup asks again.
    pub fn unlinked(&self, ino: u64) {
        if let Ok((path, _)) = self.path_of(ino) {
            self.forget_departure(&path);
        }
        self.table().unlink(ino);
    }

    /// Drops `n` kernel references to `ino`; true when the kernel holds none any more.
    pub fn forget(&self, ino: u64, n: u64) -> bool {
        self.table().forget(ino, n)
    }

    /// The object version live file `ino` shows, as confirmed by the server: (ETag, attributes).
    /// `None` for directories, files written here and versions known only from a listing
    /// without ETag.
    pub fn version_of(&self, ino: u64) -> Option<(String, Attr)> {
        let table = self.table();
        let node = table.get(ino)?;
        let etag = node.etag.clone().filter(|e| !e.is_empty())?;
        (node.attr.kind == NodeKind::File).then(|| (etag, node.attr.clone()))
    }

    /// Whether the kernel holds inode `ino`.
    pub fn is_known(&self, ino: u64) -> bool {
        self.table().get(ino).is_some()
    }

    /// The parent of directory `ino` (for `..`); the root is its own parent.
    pub fn parent_of(&self, ino: u64) -> u64 {
        let Ok((path, _)) = self.path_of(ino) else {
            return ROOT_INO;
        };
        match path.rsplit_once('/') {
            Some((parent, _)) => self.table().ino_for(parent, &self.seen_directory()),
            None => ROOT_INO,
        }
    }

    /// The object key behind `ino` (files and symlinks).
    pub fn key_of(&self, ino: u64) -> Result<String, FsError> {
        let (path, _) = self.path_of(ino)?;
        Ok(self.object_key(&path))
    }

    /// The defaults used for objects without metadata.
    pub fn defaults(&self) -> &Defaults {
        &self.defaults
    }
}

/// Whether an inode of version `known` (none: written here) may take version `now`.
fn same_version(known: &Option<String>, now: &str) -> bool {
    match known.as_deref() {
        Some(known) if !known.is_empty() && !now.is_empty() => known == now,
        _ => true,
    }
}

/// Logs, at most every 10 s, that S3 can't be reached and what the mount knows is used instead.
fn outage_warning(path: &str, error: &crate::store::StoreError) {
    use std::sync::atomic::{AtomicU64, Ordering};
    static LAST: AtomicU64 = AtomicU64::new(0);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let last = LAST.load(Ordering::Relaxed);
    if now >= last + 10
        && LAST
            .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
    {
        tracing::warn!(
            path,
            error = %error,
            "S3 unavailable: serving what the mount knows (cached attributes, entries and data; unknown names are absent)"
        );
    }
}
