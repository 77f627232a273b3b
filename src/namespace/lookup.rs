//! What the server says of one name: lookups (HEAD and a 1-key listing, or statahead's
//! answer), `getattr` re-validation and `open`'s HEAD, each kept in the HEAD log.

use super::*;

impl<S: ObjectStore> Namespace<S> {
    /// HEAD of `key`; the answer is kept in the HEAD log.
    pub(super) async fn head(&self, key: &str) -> Result<ObjectMeta, StoreError> {
        let meta = self.store.head(key).await?;
        self.keep_head(key, &meta);
        Ok(meta)
    }

    pub(super) fn keep_head(&self, key: &str, meta: &ObjectMeta) {
        if let Some(heads) = &self.heads {
            heads.record(key, meta);
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
        let key = self.object_key(&path);
        if let Some(attr) = self.dirty_attr(&key) {
            let seen = self.seen_dirty(&attr);
            return Ok(self.table().remember(&path, seen));
        }
        if self.is_gone(&key) {
            return Err(FsError::NotFound);
        }
        // Not asked: no key can name it. (A file an earlier version took under such a name is
        // found above, so that it can still be renamed to a shorter one.)
        if key.len() > MAX_KEY_LEN {
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
            self.keep_head(&key, &meta);
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
    pub(super) fn remember_current(&self, path: &str, seen: Seen, asked: Instant) -> Attr {
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
    pub(super) fn left_since(&self, key: &str, asked: Instant) -> Option<DirtyAttr> {
        self.dirty.as_ref().and_then(|d| d.left_since(key, asked))
    }

    /// See [`DirtyFiles::forget_departure`]; `path` relative to the mount.
    pub(super) fn forget_departure(&self, path: &str) {
        if let Some(dirty) = &self.dirty {
            dirty.forget_departure(&self.object_key(path));
        }
    }

    /// Whether `name` is known to be absent from directory `dir` (inode `parent`) without a
    /// request for it: the directory was known in full less than the TTL ago, or is listed
    /// again now that lookups of missing names have cost as much (see [`complete`]).
    pub(super) async fn known_absent(
        &self,
        parent: u64,
        dir: &str,
        name: &str,
        path: &str,
    ) -> bool {
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
                    Ok((entries, _)) => {
                        !entries.iter().any(|e| e.name == name) && self.table().find(path).is_none()
                    }
                    Err(_) => false, // the lookup asks, and reports what it finds
                }
            }
        }
    }

    /// Asks the server what `path` is: HEAD of the key and a 1-key listing of `key/`, together.
    pub(super) async fn resolve(&self, path: &str) -> Result<Seen, FsError> {
        let key = self.object_key(path);
        let as_dir = dir_key(&self.prefix, path);
        // A prefix longer than any key holds nothing (some servers refuse to list it).
        let listing = async {
            if as_dir.len() > MAX_KEY_LEN {
                Ok(crate::store::ListPage::default())
            } else {
                self.store.list_page(&as_dir, None, Some(1)).await
            }
        };
        let (head, list) = tokio::join!(self.head(&key), listing);
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
    pub(super) fn update_from_head(
        &self,
        ino: u64,
        meta: &ObjectMeta,
        asked: Instant,
    ) -> Option<Attr> {
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
}
