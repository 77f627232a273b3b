//! Paths ↔ keys: lookups, listings, attributes and the inode table.
//!
//! Key `PREFIX/a/b.txt` is file `a/b.txt`; directories come from `/` in keys (ListObjectsV2 with
//! a delimiter) and from `dir/` marker objects. A name that is both a file and a directory shows
//! the directory. Keys that can't be file names are skipped and logged once.

mod attr;
mod complete;
mod inodes;
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
pub use names::normalize_prefix;
use names::{InvalidName, check_component, dir_key, is_reserved, join};

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

    /// HEAD of `key`; the answer is kept in the HEAD log.
    async fn head(&self, key: &str) -> Result<ObjectMeta, StoreError> {
        let meta = self.store.head(key).await?;
        self.keep_head(key, &meta);
        Ok(meta)
    }

    fn keep_head(&self, key: &str, meta: &ObjectMeta) {
        if let Some(heads) = &self.heads {
            heads.record(key, meta);
        }
    }

    /// A listed object: what a HEAD of the same version said if the HEAD log holds it, else
    /// the listing's attributes (unverified: the kernel looks it up before using them).
    fn seen_listed(&self, key: &str, meta: &ObjectMeta) -> Seen {
        match self.heads.as_ref().and_then(|h| h.answer(key, meta)) {
            Some(headed) => self.seen_object(&headed, true),
            None => self.seen_object(meta, false),
        }
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
        match check_component(name) {
            Ok(()) => Ok(join(&dir, name)),
            Err(InvalidName::TooLong) => Err(FsError::NameTooLong),
            Err(_) => Err(FsError::InvalidArgument),
        }
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

    /// Resolves `name` in directory `parent`, adding one kernel reference on success.
    #[tracing::instrument(level = "debug", skip(self))]
    pub async fn lookup(&self, parent: u64, name: &OsStr) -> Result<Attr, FsError> {
        let (dir, kind) = self.path_of(parent)?;
        if kind != NodeKind::Directory {
            return Err(FsError::NotDirectory);
        }
        let name = name.to_str().ok_or(FsError::NotFound)?;
        match check_component(name) {
            Ok(()) if is_reserved(&dir, name) => return Err(FsError::NotFound),
            Ok(()) => {}
            Err(InvalidName::TooLong) => return Err(FsError::NameTooLong),
            Err(_) => return Err(FsError::NotFound),
        }
        let path = join(&dir, name);
        let made = self.made_dirs().get(&path).cloned();
        if let Some(attr) = made {
            return Ok(self.table().remember(&path, self.seen_marker(attr)));
        }
        if let Some(attr) = self.dirty_attr(&self.object_key(&path)) {
            let seen = self.seen_dirty(&attr);
            return Ok(self.table().remember(&path, seen));
        }
        if self.is_gone(&self.object_key(&path)) {
            return Err(FsError::NotFound);
        }
        {
            let mut table = self.table();
            // An object known only from a listing may be a symlink, and its mode, owner and
            // times are the listing's guesses: ask (HEAD).
            if let Some(node) = table.find(&path)
                && node.validated_within(self.ttl)
                && !attr::unverified(&node.attr, node.from_head)
            {
                let attr = node.attr.clone();
                table.add_lookup(attr.ino);
                return Ok(attr);
            }
        }
        if self.known_absent(parent, &dir, name, &path).await {
            return Err(FsError::NotFound);
        }
        if let Some((meta, sent)) = self.statahead.answer(&self.store, &dir, name).await {
            self.keep_head(&self.object_key(&path), &meta);
            return Ok(self.remember_current(&path, self.seen_object(&meta, true), sent));
        }
        let asked = Instant::now();
        let seen = match self.resolve(&path).await {
            Ok(seen) => seen,
            // Files written here, not yet in S3, make their directory exist (as in listings).
            Err(FsError::NotFound) if self.has_dirty_under(&path) => self.seen_directory(),
            Err(FsError::Store { source, .. })
                if source.is_unavailable() && self.has_dirty_under(&path) =>
            {
                self.seen_directory()
            }
            Err(FsError::Store { source, .. }) if source.is_unavailable() => {
                outage_warning(&path, &source);
                let mut table = self.table();
                if let Some(node) = table.find(&path) {
                    let attr = node.attr.clone();
                    table.add_lookup(attr.ino);
                    return Ok(attr);
                }
                // Unknown while S3 can't be asked: absent, so that new files can still be
                // created. Their upload is conditional on the key being absent, so an object
                // that exists after all is kept and the new file goes beside it (conflict copy).
                return Err(FsError::NotFound);
            }
            Err(e) => return Err(e),
        };
        Ok(self.remember_current(&path, seen, asked))
    }

    /// Registers what was seen of `path` from S3, unless it is a file written here now: then
    /// its attributes as they are at this moment. What S3 or a listing said was asked for
    /// before, and a write since (an append by a log writer) would otherwise shrink the file
    /// in the kernel's eyes, which reads no further than the size it was told.
    ///
    /// A file that stopped being dirty since `asked` (when the answer was asked for) is no
    /// different: S3's answer may predate the upload of its last version, and a listing's
    /// snapshot of dirty files predates its last writes; it is registered as it was when it
    /// stopped being dirty (its last version, until `getattr` asks S3).
    fn remember_current(&self, path: &str, seen: Seen, asked: Instant) -> Attr {
        if seen.attr.kind == NodeKind::File {
            let key = self.object_key(path);
            if let Some(attr) = self
                .dirty_attr(&key)
                .or_else(|| self.left_since(&key, asked))
            {
                return self.table().remember(path, self.seen_dirty(&attr));
            }
        }
        self.table().remember(path, seen)
    }

    /// See [`DirtyFiles::left_since`].
    fn left_since(&self, key: &str, asked: Instant) -> Option<DirtyAttr> {
        self.dirty.as_ref().and_then(|d| d.left_since(key, asked))
    }

    /// See [`DirtyFiles::forget_departure`]; `path` relative to the mount.
    fn forget_departure(&self, path: &str) {
        if let Some(dirty) = &self.dirty {
            dirty.forget_departure(&self.object_key(path));
        }
    }

    /// Whether `name` is known to be absent from directory `dir` (inode `parent`) without a
    /// request for it: the directory was known in full less than the TTL ago, or is listed
    /// again now that lookups of missing names have cost as much (see [`complete`]).
    async fn known_absent(&self, parent: u64, dir: &str, name: &str, path: &str) -> bool {
        if self.ttl.is_zero() {
            return false; // nothing is trusted: every lookup asks
        }
        let known = {
            let mut table = self.table();
            if table.find(path).is_some() {
                return false;
            }
            table.complete.known(dir, name)
        };
        match known {
            complete::Known::Absent => true,
            complete::Known::Unknown => false,
            complete::Known::Relist => {
                // A listing just made answers, even where it took longer than the TTL.
                match self.list_entries(parent, false).await {
                    Ok(entries) => {
                        !entries.iter().any(|e| e.name == name) && self.table().find(path).is_none()
                    }
                    Err(_) => false, // the lookup asks, and reports what it finds
                }
            }
        }
    }

    /// Asks the server what `path` is: HEAD of the key and a 1-key listing of `key/`, together.
    async fn resolve(&self, path: &str) -> Result<Seen, FsError> {
        let key = self.object_key(path);
        let as_dir = dir_key(&self.prefix, path);
        let (head, list) = tokio::join!(
            self.head(&key),
            self.store.list_page(&as_dir, None, Some(1))
        );
        let list = match (list, &head) {
            (Ok(list), _) => list,
            // The key exists as an object; only whether it is also a directory is unknown.
            (Err(e), Ok(meta)) if e.is_unavailable() => return Ok(self.seen_object(meta, true)),
            (Err(e), _) => return Err(FsError::store(&as_dir, e)),
        };
        if list.objects.first().is_some_and(|(k, _)| *k == as_dir) {
            // A marker: its metadata holds the directory's attributes.
            return match self.store.head(&as_dir).await {
                Ok(meta) => Ok(self.seen_marker(self.defaults.marker(0, &meta))),
                Err(_) => Ok(self.seen_directory()),
            };
        }
        if !list.objects.is_empty() || !list.prefixes.is_empty() {
            return Ok(self.seen_directory());
        }
        let meta = head.map_err(|e| FsError::store(&key, e))?;
        Ok(self.seen_object(&meta, true))
    }

    /// Current attributes of `ino`, re-validated with the server once the TTL has passed.
    pub async fn getattr(&self, ino: u64) -> Result<Attr, FsError> {
        if let Some(key) = self.dirty_key(ino)
            && let Some(attr) = self.dirty_attr(&key)
        {
            return Ok(self.refresh_dirty(ino, &attr));
        }
        let (path, attr, fresh) = {
            let table = self.table();
            let node = table.get(ino).ok_or(FsError::StaleInode(ino))?;
            // An unlinked or replaced inode keeps what it was: its key is someone else's now.
            // What a listing alone said is never fresh.
            let fresh = (node.validated_within(self.ttl)
                && !attr::unverified(&node.attr, node.from_head))
                || !table.is_linked(ino);
            (node.path.clone(), node.attr.clone(), fresh)
        };
        // Directories carry nothing to re-validate; the root always exists.
        if fresh || attr.kind == NodeKind::Directory {
            return Ok(attr);
        }
        let key = self.object_key(&path);
        let asked = Instant::now();
        let meta = match self.head(&key).await {
            Ok(meta) => meta,
            Err(e) if e.is_unavailable() => {
                outage_warning(&path, &e);
                return Ok(attr);
            }
            Err(e) => return Err(FsError::store(&key, e)),
        };
        Ok(self.update_from_head(ino, &meta, asked).unwrap_or(attr))
    }

    /// Refreshes a live node from a HEAD sent at `asked`, unless the object changed kind or
    /// version (another inode: the kernel finds it with its next lookup). A file written here
    /// that is dirty now, or stopped being dirty since `asked`, takes its local attributes
    /// instead: the HEAD may predate its last upload (see [`Namespace::remember_current`]).
    fn update_from_head(&self, ino: u64, meta: &ObjectMeta, asked: Instant) -> Option<Attr> {
        let seen = self.seen_object(meta, true);
        // Written here and dirty now, or since the HEAD was sent: what it is here wins.
        let local = self.path_of(ino).ok().and_then(|(path, _)| {
            let key = self.object_key(&path);
            self.dirty_attr(&key)
                .or_else(|| self.left_since(&key, asked))
        });
        let mut table = self.table();
        let linked = table.is_linked(ino);
        let node = table.get_mut(ino)?;
        if node.written_here
            && linked
            && let Some(attr) = local
        {
            node.attr = Attr {
                ino,
                ..self.seen_dirty(&attr).attr
            };
            return Some(node.attr.clone());
        }
        let same = node.written_here || same_version(&node.etag, &meta.etag);
        if node.attr.kind != seen.attr.kind || !same {
            // The name leads to another object now: the next lookup asks the server and
            // gets a new inode, this one keeps what it was for its descriptors.
            table.unlink(ino);
            return None;
        }
        node.attr = Attr { ino, ..seen.attr };
        node.etag = seen.etag;
        node.from_head = true;
        node.validated = Some(Instant::now());
        Some(node.attr.clone())
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

    /// A fresh, complete listing of directory `ino`, sorted by name, or an error. Nothing is
    /// registered. For decisions (is it empty?): never a partial answer.
    pub async fn list(&self, ino: u64) -> Result<Vec<Listed>, FsError> {
        self.list_entries(ino, false).await
    }

    /// [`Namespace::list`] for showing a directory: while S3 can't be reached, the entries the
    /// mount knows. Call [`Namespace::remember`] for each entry handed to the kernel.
    pub async fn list_for_readdir(&self, ino: u64) -> Result<Vec<Listed>, FsError> {
        self.list_entries(ino, true).await
    }

    async fn list_entries(
        &self,
        ino: u64,
        known_if_unavailable: bool,
    ) -> Result<Vec<Listed>, FsError> {
        let (dir, kind) = self.path_of(ino)?;
        if kind != NodeKind::Directory {
            return Err(FsError::NotDirectory);
        }
        let prefix = dir_key(&self.prefix, &dir);
        let asked = Instant::now();
        let mut entries: BTreeMap<String, Listed> = BTreeMap::new();
        // Dirty files first: one whose upload completes while S3 is being listed is then in
        // this snapshot or in the listing, never in neither.
        let dirty = self
            .dirty
            .as_ref()
            .map(|d| d.under(&prefix))
            .unwrap_or_default();
        // Taken before listing too: a key removed here stays hidden until its racing upload
        // has been deleted again, which happens after a listing that could have seen it.
        let gone = self
            .dirty
            .as_ref()
            .map(|d| d.gone_under(&prefix))
            .unwrap_or_default();
        let ticket = self.table().complete.begin(&dir);
        let mut token = None;
        let mut pages = 0u32;
        let mut from_known = false; // S3 unreachable: what the mount knows, not a count
        loop {
            pages += 1;
            let page = match self.store.list_page(&prefix, token, None).await {
                Ok(page) => page,
                Err(e) if known_if_unavailable && e.is_unavailable() => {
                    // What the mount knows of the directory: entries the kernel holds, if
                    // they are all its last complete listing had. Else an error: a partial
                    // listing would tell `rsync --delete` or a cleanup script that the
                    // missing files are gone.
                    let known = self.known_children(&dir);
                    // Files written and directories made here are added below anyway.
                    let mut local: HashSet<String> = dirty
                        .keys()
                        .filter_map(|key| key.strip_prefix(prefix.as_str()))
                        .map(|rest| rest.split('/').next().unwrap_or(rest).to_owned())
                        .collect();
                    local.extend(self.made_in(&dir).into_iter().map(|(name, _)| name));
                    let whole = self.table().complete.last_names(&dir).is_some_and(|names| {
                        names
                            .iter()
                            .all(|n| known.contains_key(n) || local.contains(n))
                    });
                    if !whole {
                        return Err(FsError::store(&prefix, e));
                    }
                    outage_warning(&dir, &e);
                    entries = known;
                    from_known = true;
                    break;
                }
                Err(e) => return Err(FsError::store(&prefix, e)),
            };
            for sub in &page.prefixes {
                // A server that answers with keys outside the prefix is ignored, not trusted.
                let Some(name) = sub.strip_prefix(prefix.as_str()) else {
                    continue;
                };
                let name = name.trim_end_matches('/');
                if let Err(why) = check_component(name) {
                    self.skip_key(sub, why);
                    continue;
                }
                if is_reserved(&dir, name) {
                    continue;
                }
                let seen = self.seen_directory();
                entries.insert(name.to_owned(), self.listed(&dir, name, seen));
            }
            for (key, meta) in &page.objects {
                let Some(name) = key.strip_prefix(prefix.as_str()) else {
                    continue;
                };
                if name.is_empty() {
                    continue; // this directory's own marker
                }
                if let Err(why) = check_component(name) {
                    self.skip_key(key, why);
                    continue;
                }
                if is_reserved(&dir, name) {
                    continue;
                }
                if entries.contains_key(name) || gone.contains(key) {
                    continue; // the directory of the same name wins; or removed here
                }
                let seen = self.seen_listed(key, meta);
                entries.insert(name.to_owned(), self.listed(&dir, name, seen));
            }
            token = page.next_token;
            if token.is_none() {
                break;
            }
        }
        for (name, attr) in self.made_in(&dir) {
            let listed = self.listed(&dir, &name, self.seen_marker(attr));
            entries.insert(name.clone(), listed);
        }
        {
            for (key, attr) in dirty {
                let Some(rest) = key.strip_prefix(prefix.as_str()) else {
                    continue;
                };
                match rest.split_once('/') {
                    // A dirty file deeper down makes its first directory visible.
                    Some((sub, _)) if check_component(sub).is_ok() => {
                        let seen = self.seen_directory();
                        entries
                            .entry(sub.to_owned())
                            .or_insert_with(|| self.listed(&dir, sub, seen));
                    }
                    Some(_) => {}
                    None => {
                        if entries
                            .get(rest)
                            .is_some_and(|e| e.attr.kind == NodeKind::Directory)
                        {
                            continue;
                        }
                        let seen = self.seen_dirty(&attr);
                        entries.insert(rest.to_owned(), self.listed(&dir, rest, seen));
                    }
                }
            }
        }
        if !from_known {
            let subdirs = entries
                .values()
                .filter(|e| e.attr.kind == NodeKind::Directory)
                .count();
            self.table()
                .listed_subdirs(&dir, u32::try_from(subdirs).unwrap_or(u32::MAX));
            let objects = entries
                .values()
                // Only these get lookups while the listing is fresh (see fs/listing.rs).
                .filter(|e| e.unverified())
                .map(|e| (e.name.clone(), self.object_key(&join(&dir, &e.name))))
                .collect();
            self.statahead.listed(&dir, objects);
            let names = entries.keys().cloned().collect();
            self.table().complete.listed(&dir, ticket, names, pages);
        }
        Ok(entries
            .into_values()
            .map(|entry| Listed { asked, ..entry })
            .collect())
    }

    /// The entries of directory `dir` the inode table holds, for a listing while S3 is down.
    fn known_children(&self, dir: &str) -> BTreeMap<String, Listed> {
        let table = self.table();
        table
            .children(dir)
            .into_iter()
            .map(|node| {
                let name = node
                    .path
                    .rsplit('/')
                    .next()
                    .unwrap_or(&node.path)
                    .to_owned();
                let listed = Listed {
                    name: name.clone(),
                    attr: node.attr.clone(),
                    etag: node.etag.clone(),
                    from_head: node.from_head,
                    from_server: false,
                    asked: Instant::now(),
                };
                (name, listed)
            })
            .collect()
    }

    /// A listing entry; a live node of the same version lends it HEAD-only details (kind, mode).
    fn listed(&self, dir: &str, name: &str, mut seen: Seen) -> Listed {
        let path = join(dir, name);
        let table = self.table();
        // Same version; or, from a server whose listings carry no ETag, HEADed within the TTL.
        if let Some(node) = table.find(&path)
            && node.from_head
            && (node.etag == seen.etag
                || version(&seen.etag).is_none() && node.validated_within(self.ttl))
            && (node.attr.kind == NodeKind::Directory) == (seen.attr.kind == NodeKind::Directory)
        {
            seen.attr = Attr {
                size: seen.attr.size,
                ..node.attr.clone()
            };
            seen.from_head = true;
        }
        seen.attr.ino = table.ino_for(&path, &seen);
        Listed {
            name: name.to_owned(),
            attr: seen.attr,
            etag: seen.etag,
            from_head: seen.from_head,
            from_server: seen.from_server,
            asked: Instant::now(),
        }
    }

    /// Registers a listing entry with the kernel (one reference); returns its attributes.
    pub fn remember(&self, dir_ino: u64, entry: &Listed) -> Result<Attr, FsError> {
        let (dir, _) = self.path_of(dir_ino)?;
        let seen = Seen {
            attr: entry.attr.clone(),
            etag: entry.etag.clone(),
            from_head: entry.from_head,
            from_server: entry.from_server,
        };
        Ok(self.remember_current(&join(&dir, &entry.name), seen, entry.asked))
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

    /// Opens file `ino` for reading: HEAD pins the current version (close-to-open consistency).
    pub async fn open(&self, ino: u64) -> Result<OpenedObject, FsError> {
        let (path, kind) = self.path_of(ino)?;
        if kind == NodeKind::Directory {
            return Err(FsError::IsDirectory);
        }
        if !self.table().is_linked(ino) {
            return Err(FsError::Stale);
        }
        let key = self.object_key(&path);
        let asked = Instant::now();
        let meta = match self.head(&key).await {
            Ok(meta) => meta,
            Err(e) if e.is_unavailable() => {
                // The version seen last is read from the caches (S3 can't serve it anyway).
                outage_warning(&path, &e);
                let table = self.table();
                let node = table.get(ino).ok_or(FsError::StaleInode(ino))?;
                // Only a version confirmed by HEAD: listings of some servers carry no ETag.
                let etag = node
                    .opened_etag
                    .clone()
                    .or_else(|| node.etag.clone().filter(|_| node.from_head))
                    .filter(|etag| !etag.is_empty());
                let etag = etag.ok_or_else(|| FsError::store(&key, e))?;
                return Ok(OpenedObject {
                    key,
                    etag,
                    size: node.attr.size,
                    keep_cache: true,
                });
            }
            Err(e) => return Err(FsError::store(&key, e)),
        };
        if self.update_from_head(ino, &meta, asked).is_none() {
            // Replaced since the kernel looked it up: ESTALE makes the kernel look the name up
            // again (LOOKUP_REVAL) and open the new version's inode, so no descriptor of this
            // inode ever sees another version's bytes (`update_from_head` unlinked it, so that
            // lookup asks the server).
            return Err(FsError::Stale);
        }
        let keep_cache = {
            let mut table = self.table();
            match table.get_mut(ino) {
                Some(node) => {
                    let same = node.opened_etag.as_deref() == Some(meta.etag.as_str());
                    node.opened_etag = Some(meta.etag.clone());
                    same
                }
                None => false,
            }
        };
        Ok(OpenedObject {
            key,
            etag: meta.etag,
            size: meta.size,
            keep_cache,
        })
    }

    /// The version of symlink `ino` a HEAD confirmed within the TTL (a lookup, or statahead
    /// for `ls -l`, just asked): its target can be read without asking again.
    pub fn fresh_symlink(&self, ino: u64) -> Option<OpenedObject> {
        let table = self.table();
        let node = table.get(ino)?;
        let fresh = node.attr.kind == NodeKind::Symlink
            && node.from_head
            && node.validated_within(self.ttl)
            && table.is_linked(ino);
        let etag = node.etag.clone().filter(|e| fresh && !e.is_empty())?;
        Some(OpenedObject {
            key: self.object_key(&node.path),
            etag,
            size: node.attr.size,
            keep_cache: false,
        })
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
