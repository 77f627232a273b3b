//! What happens to the names of dirty files: rename and unlink of their local copies, and the
//! tombstones of names that went while an upload of them may still land in S3.

use super::*;

impl DirtyFiles {
    /// Moves the local copy of `from` to `to` (rename), replacing any local copy of `to`, and
    /// makes the move durable. `base_etag` is the version of `to` in S3 the upload may replace
    /// (`None`: there is none). Returns false when `from` has no local copy.
    pub fn rename(&self, from: &str, to: &str, base_etag: Option<String>) -> io::Result<bool> {
        let replaced = {
            let mut files = self.files();
            let Some(mut file) = files.remove(from) else {
                return Ok(false);
            };
            // The base object stays at the old key (and is deleted): nothing may still be
            // needed from it.
            if !file.data.coverage().complete() {
                files.insert(from.to_owned(), file);
                return Err(io::Error::other(
                    "local copy is not complete; fetch it before renaming",
                ));
            }
            file.data.detach_from_base();
            file.changed();
            self.gone().insert(from.to_owned());
            if file.upload_started {
                self.bury(from, file.origin);
            }
            file.data.set_base_etag(base_etag);
            let replaced = files.insert(to.to_owned(), file);
            replaced.map(|old| files.unlink(old))
        };
        // The moved file's record first (it is the newer record for `to`: see
        // [`FileRecord::seq`]), then the replaced file's goes: a crash in between shows the
        // rename done, never the target without either version.
        let persisted = self.persist(to);
        if let Some(discard) = replaced {
            self.discard(discard);
        }
        persisted?;
        Ok(true)
    }

    /// Forgets the local copy of `key` (unlink); returns whether there was one.
    pub fn remove(&self, key: &str) -> bool {
        let discard = {
            let mut files = self.files();
            let old = files.remove(key);
            if let Some(f) = old.as_ref().filter(|f| f.upload_started) {
                self.bury(key, f.origin);
            }
            old.map(|f| files.unlink(f))
        };
        match discard {
            Some(discard) => {
                self.gone().insert(key.to_owned());
                self.discard(discard);
                true
            }
            None => false,
        }
    }

    pub(super) fn gone(&self) -> std::sync::MutexGuard<'_, std::collections::HashSet<String>> {
        self.gone.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether `key` lost its local copy (unlink, rename) while an upload of it may still be
    /// running: S3 may show the object for a moment, but it is gone.
    pub fn is_gone(&self, key: &str) -> bool {
        self.gone().contains(key)
    }

    /// The keys under `prefix` that [`DirtyFiles::is_gone`].
    pub fn gone_under(&self, prefix: &str) -> std::collections::HashSet<String> {
        self.gone()
            .iter()
            .filter(|k| k.starts_with(prefix))
            .cloned()
            .collect()
    }

    /// Called by the uploader once no upload of `key` can still be running.
    pub fn settled(&self, key: &str) {
        self.gone().remove(key);
        if let Err(e) = self.tombstones.remove(key) {
            tracing::warn!(key, error = %e, "could not remove a tombstone");
        }
    }

    /// Durably marks `key` as gone for file lineage `origin`, whose upload may still land there.
    pub(super) fn bury(&self, key: &str, origin: u64) {
        if let Err(e) = self.tombstones.put(key, origin) {
            // The name goes anyway; only a crash before the racing upload is deleted again
            // would bring it back.
            tracing::warn!(key, error = %e, "could not record a tombstone");
        }
    }

    /// The lineage of the file a tombstone of `key` was left for: an object of that lineage
    /// under `key` is an upload that landed after the file's name went, to be deleted.
    pub fn tombstone(&self, key: &str) -> Option<u64> {
        self.tombstones.get(key)
    }

    /// How long the tombstone of `key` waits before its key is checked
    /// ([`Tombstones::wait`]).
    pub fn tombstone_wait(&self, key: &str) -> Duration {
        self.tombstones.wait(key)
    }
}
