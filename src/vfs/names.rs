//! Changes of names: mkdir, symlink, mknod, rmdir, rename (files and directories), unlink.

use std::ffi::OsStr;
use std::sync::Arc;

use super::Vfs;
use crate::error::FsError;
use crate::namespace::{
    Attr, MAX_KEY_LEN, MAX_SYMLINK_TARGET, NodeKind, stored_metadata, stored_metadata_of,
};
use crate::store::{ObjectStore, Precondition};

impl<S: ObjectStore> Vfs<S> {
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
        let attr = self.namespace.made_dir(&path, attr);
        self.namespace.touch_dir(parent);
        Ok(attr)
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
        self.put_new(parent, name, &key, body, &metadata).await
    }

    /// Writes small object `key` (`name` in `parent`) only if the key is absent (`EEXIST`
    /// otherwise) and registers it with the kernel (one reference) as written: no lookup.
    async fn put_new(
        &self,
        parent: u64,
        name: &OsStr,
        key: &str,
        body: bytes::Bytes,
        metadata: &std::collections::HashMap<String, String>,
    ) -> Result<Attr, FsError> {
        let size = body.len() as u64;
        let etag = self
            .store
            .put_object(key, body, metadata, &Precondition::Absent)
            .await
            .map_err(|e| match e {
                crate::store::StoreError::PreconditionFailed => FsError::Exists,
                e => FsError::store(key, e),
            })?;
        self.namespace.touch_dir(parent);
        let meta = crate::store::ObjectMeta {
            size,
            etag,
            last_modified: std::time::SystemTime::now(),
            user_metadata: metadata.clone(),
        };
        self.namespace.object_written(parent, name, &meta)
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
        self.put_new(parent, name, &key, bytes::Bytes::new(), &metadata)
            .await
    }

    pub(crate) async fn rmdir(&self, parent: u64, name: &OsStr) -> Result<(), FsError> {
        self.new_writes()?;
        let attr = self.namespace.lookup(parent, name).await?;
        self.forget(attr.ino, 1);
        self.remove_empty_dir(&attr).await?;
        self.namespace.touch_dir(parent);
        Ok(())
    }

    /// Removes directory `attr` (its marker), which must be empty: `rmdir`, and the target
    /// a directory rename replaces.
    async fn remove_empty_dir(&self, attr: &Attr) -> Result<(), FsError> {
        if attr.kind != NodeKind::Directory {
            return Err(FsError::NotDirectory);
        }
        if !self.namespace.is_empty(attr.ino).await? {
            return Err(FsError::NotEmpty);
        }
        let marker = self.namespace.removed_dir(attr.ino)?;
        self.store
            .delete(&marker)
            .await
            .map_err(|e| FsError::store(&marker, e))
    }

    /// rename(2): moves the entry, then marks both directories changed.
    pub(crate) async fn rename(
        &self,
        parent: u64,
        name: &OsStr,
        new_parent: u64,
        new_name: &OsStr,
        no_replace: bool,
    ) -> Result<(), FsError> {
        self.move_entry(parent, name, new_parent, new_name, no_replace)
            .await?;
        self.namespace.touch_dir(parent);
        self.namespace.touch_dir(new_parent);
        Ok(())
    }

    /// Moves a file: a local (dirty) copy moves in the cache and is uploaded under the new
    /// key; an uploaded object is copied server-side and the old key deleted. A directory
    /// moves with everything under it ([`Vfs::rename_dir`]).
    async fn move_entry(
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
            // The copy first, then the local copy at the target goes: a crash in between keeps
            // the target's acknowledged version (its upload replaces the copy), never neither.
            // No upload of the target runs meanwhile (the lock), so none lands on the copy.
            let copied = self.store.copy_object(&old_key, &new_key).await;
            if copied.is_ok() {
                writes.dirty.remove(&new_key);
                writes.dirty.settled(&new_key);
            }
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
        if new_prefix.len() > old_prefix.len() {
            // Refused before anything moves or is replaced: a key past S3's limit could never
            // be written.
            let keys = self.keys_under(&old_prefix).await?;
            let local = writes.dirty.under(&old_prefix).into_keys();
            let longest = keys.into_iter().chain(local).map(|k| k.len()).max();
            if longest.unwrap_or(0) + new_prefix.len() > MAX_KEY_LEN + old_prefix.len() {
                return Err(FsError::NameTooLong);
            }
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
        self.namespace.touch_dir(parent);
        Ok(())
    }
}
