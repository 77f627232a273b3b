//! Files kept for their descriptors: objects this mount deletes or replaces while they are
//! open are copied to the cache disk first, and files unlinked or renamed over while the kernel
//! still holds their inode stay openable until it forgets them.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use super::{Detached, Handle, RemoteFile, Vfs, lock};
use crate::error::FsError;
use crate::prefetch::{FileReader, ObjectVersion};
use crate::store::ObjectStore;
use crate::write::{DirtyAttr, DirtyFiles, LocalData};

/// Largest object copied to the cache disk so that an inode the kernel still holds stays
/// openable after this mount renamed another file over it or unlinked it (see
/// [`Vfs::pin_replaced`]): small files (configuration replaced by rename) are the case that
/// matters; beyond this an open racing with the change gets ESTALE.
const PIN_COPY_LIMIT: u64 = 16 << 20;

impl<S: ObjectStore> Vfs<S> {
    /// Keeps the file at `key`, about to be unlinked or renamed over, for inode `ino` while the
    /// kernel holds it: a dirty file with a complete local copy, or (`copy_clean`: renames
    /// over it, the atomic-replace pattern whose readers race with it) an object of up to
    /// [`PIN_COPY_LIMIT`] bytes copied to the cache disk. Others (an edited file with bytes
    /// still in S3, a large or unlinked object) are not kept: an open of the inode gets ESTALE
    /// and the kernel looks the name up again.
    pub(super) async fn pin_replaced(&self, ino: u64, key: &str, copy_clean: bool) {
        let Ok(writes) = self.writes() else { return };
        let Some(fid) = writes.dirty.id_of(key) else {
            if copy_clean {
                self.pin_copy(ino, key).await;
            }
            return;
        };
        let complete = writes
            .dirty
            .data(key)
            .is_ok_and(|d| d.coverage().complete());
        let mut pinned = lock(&self.pinned);
        if !complete || !self.namespace.is_known(ino) || writes.dirty.opened(fid, false).is_err() {
            return;
        }
        if let Some(old) = pinned.insert(ino, fid) {
            writes.dirty.released(old, false);
        }
    }

    /// [`Vfs::pin_replaced`] for a clean object.
    async fn pin_copy(&self, ino: u64, key: &str) {
        let Ok(writes) = self.writes() else { return };
        let Some((etag, attr)) = self.namespace.version_of(ino) else {
            return;
        };
        if attr.size > PIN_COPY_LIMIT || lock(&self.pinned).contains_key(&ino) {
            return;
        }
        let reader = self.reader(ObjectVersion {
            key: key.into(),
            etag: etag.into(),
            size: attr.size,
        });
        let data = match self.copy_out(&writes.dirty, &reader).await {
            Ok(data) => data,
            Err(e) => {
                tracing::debug!(key, error = %e, "could not keep a replaced object for its inode");
                return;
            }
        };
        let dirty_attr = DirtyAttr {
            size: attr.size,
            mode: libc::S_IFREG | u32::from(attr.perm),
            uid: attr.uid,
            gid: attr.gid,
            mtime: attr.mtime,
            atime: attr.atime,
            ctime: attr.ctime,
        };
        let fid = writes.dirty.unlinked_copy(data, dirty_attr);
        let mut pinned = lock(&self.pinned);
        if self.namespace.is_known(ino) && !pinned.contains_key(&ino) {
            pinned.insert(ino, fid);
        } else {
            writes.dirty.released(fid, false);
        }
    }

    /// Makes the readers of objects this mount is about to delete or replace (keys for which
    /// `doomed` holds) read from a local copy instead: each such version is copied to the
    /// cache disk once (through the block caches). Best effort: a reader whose copy fails keeps
    /// reading S3 and gets EIO once its version is gone.
    pub(crate) async fn detach_readers(&self, doomed: impl Fn(&str) -> bool) {
        let Ok(writes) = self.writes() else { return };
        self.removals.fetch_add(1, Ordering::SeqCst);
        let mut groups: HashMap<(String, String), Vec<Arc<RemoteFile<S>>>> = HashMap::new();
        for handle in lock(&self.files).values() {
            if let Handle::Remote(file) = handle
                && file.detached.get().is_none()
                && doomed(&file.reader.object().key)
            {
                let object = file.reader.object();
                groups
                    .entry((object.key.to_string(), object.etag.to_string()))
                    .or_default()
                    .push(file.clone());
            }
        }
        for ((key, _), files) in groups {
            match self.copy_out(&writes.dirty, &files[0].reader).await {
                Ok(data) => {
                    for file in files {
                        let _ = file.detached.set(Detached::Copy(data.clone()));
                    }
                }
                Err(e) => {
                    tracing::warn!(key, error = %e, "could not keep an open file's bytes before removing it; its readers will get EIO")
                }
            }
        }
    }

    /// Copies every byte of `reader`'s version to a scratch file.
    async fn copy_out(
        &self,
        dirty: &DirtyFiles,
        reader: &FileReader<S>,
    ) -> Result<Arc<LocalData>, FsError> {
        use std::os::unix::fs::FileExt;
        let file = dirty.scratch_file()?;
        let size = reader.object().size;
        let mut buf = Vec::new();
        let mut offset = 0;
        while offset < size {
            let len = (size - offset).min(u64::from(crate::fs::MAX_IO_SIZE)) as u32;
            buf.clear();
            reader.read_into(offset, len, &mut buf).await?;
            if buf.is_empty() {
                return Err(FsError::Local(
                    format!("{}: short read", reader.object().key),
                    None,
                ));
            }
            file.write_all_at(&buf, offset)?;
            offset += buf.len() as u64;
        }
        Ok(dirty.detached_data(file))
    }
}
