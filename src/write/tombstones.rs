//! Tombstones: keys this mount unlinked or renamed away while an upload of the file may still
//! have been in flight.
//!
//! S3 has no way to cancel a PUT the server has received: an upload that was running when
//! `unlink` or `rename` returned can still land afterwards and put the old name back. The
//! uploader deletes it again when it sees its upload finish for a file that is gone; a
//! tombstone, written durably before the unlink or rename returns, makes the next start do the
//! same if a crash came in between. It is `gone/<sha256 of the key>.json` (never a path made
//! from the key) holding the key and the file's lineage (`x-amz-meta-keepfs-origin`), so only
//! this mount's own upload of that file is ever deleted.

use std::collections::HashMap;
use std::fs;
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::cache::CacheDir;
use crate::cache::journal::{sync_dir, write_atomically};

#[derive(Debug, Serialize, Deserialize)]
struct Tombstone {
    key: String,
    /// Lineage of the file whose upload may land (see `FileRecord::origin`).
    origin: u64,
}

/// How long tombstones a previous run left wait before their key is checked: requests the
/// killed process sent may still be running on the server (a CompleteMultipartUpload can take
/// seconds), and one that lands after the check would put the name back.
pub const INHERITED_GRACE: Duration = Duration::from_secs(10);

/// The `gone/` directory of a cache directory, and its tombstones in memory.
pub struct Tombstones {
    dir: PathBuf,
    /// Key → lineage, for every tombstone on disk.
    keys: Mutex<HashMap<String, u64>>,
    /// When the tombstones a previous run left were read (this run's start).
    opened: Instant,
    /// Keys the previous run may still have requests for on the server.
    last_run: std::collections::HashSet<String>,
}

impl Tombstones {
    /// Reads the tombstones a previous run left; unreadable files are removed (a torn write
    /// never returned to anyone). `journalled`: the keys of the files that run left in the
    /// journal (it may have been uploading them, see [`Tombstones::wait`]).
    pub fn open(
        cache: &CacheDir,
        journalled: impl IntoIterator<Item = String>,
    ) -> std::io::Result<Self> {
        let dir = cache.gone_dir();
        let mut keys = HashMap::new();
        for entry in fs::read_dir(&dir)? {
            let path = entry?.path();
            let parsed = fs::read(&path)
                .ok()
                .and_then(|bytes| serde_json::from_slice::<Tombstone>(&bytes).ok());
            match parsed {
                Some(t) if path.file_name() == Some(file_name(&t.key).as_ref()) => {
                    keys.insert(t.key, t.origin);
                }
                _ => {
                    tracing::warn!(path = %path.display(), "removing an unreadable tombstone");
                    fs::remove_file(&path)?;
                }
            }
        }
        Ok(Tombstones {
            dir,
            last_run: keys.keys().cloned().chain(journalled).collect(),
            keys: Mutex::new(keys),
            opened: Instant::now(),
        })
    }

    fn keys(&self) -> std::sync::MutexGuard<'_, HashMap<String, u64>> {
        self.keys.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Durably records that `key` must not hold an upload of lineage `origin`.
    pub fn put(&self, key: &str, origin: u64) -> std::io::Result<()> {
        let bytes = serde_json::to_vec(&Tombstone {
            key: key.to_owned(),
            origin,
        })
        .map_err(std::io::Error::other)?;
        // In memory even if the disk fails: this run still deletes the leftover.
        self.keys().insert(key.to_owned(), origin);
        write_atomically(&self.dir, &self.dir.join(file_name(key)), &bytes)
    }

    /// The lineage a tombstone for `key` names, if there is one.
    pub fn get(&self, key: &str) -> Option<u64> {
        self.keys().get(key).copied()
    }

    /// How much longer the tombstone of `key` must wait before its key is checked: until
    /// [`INHERITED_GRACE`] after the start for a key the previous run may have been sending
    /// requests for (its tombstones and its journalled files); none for others, whose uploads
    /// are this run's own and over by the time the tombstone is handled.
    pub fn wait(&self, key: &str) -> Duration {
        if self.last_run.contains(key) {
            INHERITED_GRACE.saturating_sub(self.opened.elapsed())
        } else {
            Duration::ZERO
        }
    }

    /// How many tombstones there are.
    pub fn count(&self) -> usize {
        self.keys().len()
    }

    /// Every key with a tombstone.
    pub fn all(&self) -> Vec<String> {
        self.keys().keys().cloned().collect()
    }

    /// Durably removes the tombstone of `key` (none is fine): nothing of the old file can land
    /// there any more, or the journal holds a newer file under the key.
    pub fn remove(&self, key: &str) -> std::io::Result<()> {
        if self.get(key).is_none() {
            return Ok(());
        }
        // The file first: memory never forgets a tombstone the disk still has.
        match fs::remove_file(self.dir.join(file_name(key))) {
            Ok(()) => sync_dir(&self.dir)?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        self.keys().remove(key);
        Ok(())
    }
}

/// `<sha256 of key, hex>.json`.
fn file_name(key: &str) -> String {
    let digest = Sha256::digest(key.as_bytes());
    let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
    format!("{hex}.json")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tombstones_survive_a_restart_until_removed() {
        let tmp = tempfile::tempdir().unwrap();
        let cache = CacheDir::open(&tmp.path().join("c")).unwrap();
        let t = Tombstones::open(&cache, []).unwrap();
        t.put("a/../b\n", 7).unwrap();
        t.put("plain", 8).unwrap();
        t.remove("plain").unwrap();
        t.remove("never").unwrap();
        fs::write(cache.gone_dir().join("torn.json"), b"{\"key\":").unwrap();
        drop(t);
        let t = Tombstones::open(&cache, []).unwrap();
        assert_eq!(t.all(), vec!["a/../b\n".to_owned()]);
        assert_eq!(t.get("a/../b\n"), Some(7));
        assert!(!cache.gone_dir().join("torn.json").exists());
        let names: Vec<_> = fs::read_dir(cache.gone_dir()).unwrap().collect();
        assert_eq!(names.len(), 1, "one file, named by a hash of the key");
    }
}
