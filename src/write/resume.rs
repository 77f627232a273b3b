//! Multipart uploads in progress, kept in the cache directory so that a restart continues an
//! interrupted upload from the parts S3 already has instead of sending the file again.
//!
//! One small JSON file per local file and target key being uploaded
//! (`uploads/<data id>-<key hash>.json`, never named by the key itself): the upload id, the
//! target key, a fingerprint of exactly what is being uploaded, and the parts finished so far.
//! (A renamed file keeps its data id while an upload under its old name may still run.) A part is recorded only after S3 acknowledged it, and the file
//! is replaced atomically, so after a crash it lists at most fewer parts than S3 has (those
//! are sent again). An upload whose fingerprint no longer matches the file is aborted.

use std::collections::BTreeMap;
use std::fs;
use std::path::PathBuf;
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

use crate::cache::CacheDir;
use crate::cache::journal::write_atomically;

/// Version of the encoding, stored in every file.
const VERSION: u32 = 1;
const SUFFIX: &str = ".json";

/// A multipart upload that was started and not yet completed or aborted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PendingUpload {
    pub version: u32,
    /// The key the upload goes to (the file's key, or a conflict copy's).
    pub key: String,
    pub upload_id: String,
    /// What is being uploaded (see [`fingerprint`]): a resumed upload must send the same bytes
    /// with the same metadata and part size.
    pub fingerprint: String,
    /// Finished parts: number → ETag.
    pub parts: BTreeMap<i32, String>,
}

/// Describes the exact content of an upload: the local data file, the size, the metadata that
/// CreateMultipartUpload fixed, the base version untouched parts come from, the part size and
/// the target key. Bytes of a journalled data file below its recorded size never change (a
/// change goes to a new data file), so equal fingerprints mean equal parts.
pub fn fingerprint(
    data_id: u64,
    size: u64,
    metadata: &std::collections::HashMap<String, String>,
    base_etag: Option<&str>,
    part_size: u64,
    key: &str,
) -> String {
    let metadata: BTreeMap<_, _> = metadata.iter().collect();
    serde_json::json!({
        "data": data_id,
        "size": size,
        "metadata": metadata,
        "base": base_etag,
        "part_size": part_size,
        "key": key,
    })
    .to_string()
}

/// The `uploads/` directory of a cache directory, mirrored in memory: the mount is its only
/// writer, so after one scan at start a lookup or listing reads no file (every upload looks
/// for outdated uploads of its key twice; with the files on disk that was a scan of the
/// directory and a read of every record, per upload).
pub struct PendingUploads {
    dir: PathBuf,
    /// File name → (data id, record), as on disk.
    known: Mutex<BTreeMap<PathBuf, (u64, PendingUpload)>>,
}

impl PendingUploads {
    /// Reads every recorded upload (unreadable files are skipped, and left in place).
    pub fn new(cache: &CacheDir) -> Self {
        let dir = cache.uploads_dir();
        let mut known = BTreeMap::new();
        for entry in fs::read_dir(&dir).into_iter().flatten().flatten() {
            let name = entry.file_name();
            let Some(id) = name
                .to_str()
                .and_then(|name| name.strip_suffix(SUFFIX))
                .and_then(|stem| stem.split('-').next())
                .and_then(|hex| u64::from_str_radix(hex, 16).ok())
            else {
                continue;
            };
            if let Some(upload) = read(&entry.path(), id) {
                known.insert(PathBuf::from(name), (id, upload));
            }
        }
        PendingUploads {
            dir,
            known: Mutex::new(known),
        }
    }

    fn known(&self) -> std::sync::MutexGuard<'_, BTreeMap<PathBuf, (u64, PendingUpload)>> {
        // Entries are inserted and removed whole; a poisoned map is still consistent.
        self.known.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The record's file name: the data id and a hash of the key, never the key itself.
    fn name(data_id: u64, key: &str) -> PathBuf {
        use sha2::Digest;
        let hash = sha2::Sha256::digest(key.as_bytes());
        let short = u64::from_le_bytes(hash[..8].try_into().expect("8 bytes"));
        PathBuf::from(format!("{data_id:016x}-{short:016x}{SUFFIX}"))
    }

    /// The upload of data file `data_id` to `key` in progress, if one is recorded and readable.
    pub fn get(&self, data_id: u64, key: &str) -> Option<PendingUpload> {
        self.known()
            .get(&Self::name(data_id, key))
            .filter(|(_, upload)| upload.key == key)
            .map(|(_, upload)| upload.clone())
    }

    /// Durably records `upload` as the one in progress for data file `data_id` (to its key).
    pub fn put(&self, data_id: u64, upload: &PendingUpload) -> std::io::Result<()> {
        let bytes = serde_json::to_vec(upload).map_err(std::io::Error::other)?;
        let name = Self::name(data_id, &upload.key);
        // Not under the map's lock: the write fsyncs twice, and every upload's parts are
        // recorded here. Writes of one record are ordered by their caller (one upload per key).
        write_atomically(&self.dir, &self.dir.join(&name), &bytes)?;
        self.known().insert(name, (data_id, upload.clone()));
        Ok(())
    }

    /// Forgets the upload of data file `data_id` to `key` (absent is fine).
    pub fn remove(&self, data_id: u64, key: &str) {
        let name = Self::name(data_id, key);
        match fs::remove_file(self.dir.join(&name)) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                tracing::warn!(data_id, error = %e, "could not remove upload state");
                return;
            }
        }
        self.known().remove(&name);
    }

    /// The recorded uploads `wanted` picks (by data file id and target key), by data file id.
    /// `wanted` runs under the map's lock: it must not take other locks.
    pub fn matching(&self, wanted: impl Fn(u64, &str) -> bool) -> Vec<(u64, PendingUpload)> {
        let mut found: Vec<_> = self
            .known()
            .values()
            .filter(|(id, upload)| wanted(*id, &upload.key))
            .cloned()
            .collect();
        found.sort_by_key(|(id, _)| *id);
        found
    }

    /// The data file ids with a recorded upload (each once, ascending).
    pub fn data_ids(&self) -> Vec<u64> {
        let mut ids: Vec<u64> = self.known().values().map(|(id, _)| *id).collect();
        ids.sort_unstable();
        ids.dedup();
        ids
    }

    /// Removes temporary files a crash left behind (at start, before any upload runs).
    pub fn remove_leftovers(&self) {
        for entry in fs::read_dir(&self.dir).into_iter().flatten().flatten() {
            if entry.file_name().to_string_lossy().starts_with('.') {
                let _ = fs::remove_file(entry.path());
            }
        }
    }

    /// A new record for an upload just created.
    pub fn started(key: &str, upload_id: &str, fingerprint: String) -> PendingUpload {
        PendingUpload {
            version: VERSION,
            key: key.to_owned(),
            upload_id: upload_id.to_owned(),
            fingerprint,
            parts: BTreeMap::new(),
        }
    }
}

/// Reads one record; `None` (with a warning) if unreadable or from a newer keepfs.
fn read(path: &std::path::Path, data_id: u64) -> Option<PendingUpload> {
    let bytes = fs::read(path).ok()?;
    match serde_json::from_slice::<PendingUpload>(&bytes) {
        Ok(p) if p.version <= VERSION => Some(p),
        Ok(p) => {
            tracing::warn!(
                data_id,
                version = p.version,
                "upload state from a newer keepfs ignored"
            );
            None
        }
        Err(e) => {
            tracing::warn!(data_id, error = %e, "unreadable upload state ignored");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    proptest::proptest! {
        /// Upload state cut short at any byte or replaced by any bytes is ignored (the upload
        /// starts afresh), never a panic, never a record of other parts.
        #[test]
        fn damaged_upload_state_is_ignored(
            cut in proptest::prelude::any::<proptest::sample::Index>(),
            garbage in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..200),
        ) {
            let tmp = tempfile::tempdir().unwrap();
            let path = tmp.path().join("r.json");
            let mut up = PendingUploads::started("a/b", "id-1", "fp".into());
            up.parts.insert(1, "\"e1\"".into());
            let whole = serde_json::to_vec(&up).unwrap();
            fs::write(&path, &whole[..cut.index(whole.len())]).unwrap();
            proptest::prop_assert!(read(&path, 1).is_none());
            fs::write(&path, &garbage).unwrap();
            let _ = read(&path, 1);
            fs::write(&path, &whole).unwrap();
            proptest::prop_assert_eq!(read(&path, 1), Some(up));
        }
    }

    #[test]
    fn records_round_trip_and_leftovers_go() {
        let tmp = tempfile::tempdir().unwrap();
        let cache = CacheDir::open(tmp.path()).unwrap();
        let uploads = PendingUploads::new(&cache);
        let mut up = PendingUploads::started("a/b", "id-1", "fp".into());
        uploads.put(7, &up).unwrap();
        up.parts.insert(2, "\"e2\"".into());
        uploads.put(7, &up).unwrap();
        let other = PendingUploads::started("a/c", "id-2", "fp".into());
        uploads.put(7, &other).unwrap();
        fs::write(cache.uploads_dir().join(".tmp-1-1"), b"{half").unwrap();
        fs::write(
            cache.uploads_dir().join("0000000000000009-00.json"),
            b"junk",
        )
        .unwrap();
        assert_eq!(uploads.get(7, "a/b"), Some(up.clone()));
        assert_eq!(
            uploads.get(7, "a/c"),
            Some(other.clone()),
            "one record per target key"
        );
        let mut all = uploads.matching(|_, _| true);
        all.sort_by(|a, b| a.1.key.cmp(&b.1.key));
        assert_eq!(all, vec![(7, up.clone()), (7, other.clone())]);
        // The next mount reads the same records back from disk, skipping the junk.
        let mut reread = PendingUploads::new(&cache).matching(|_, _| true);
        reread.sort_by(|a, b| a.1.key.cmp(&b.1.key));
        assert_eq!(reread, all);
        assert_eq!(
            uploads.matching(|id, key| id == 7 && key == "a/c"),
            vec![(7, other.clone())]
        );
        assert!(uploads.matching(|id, _| id == 8).is_empty());
        assert_eq!(uploads.data_ids(), vec![7], "each data file once");
        uploads.remove_leftovers();
        assert!(!cache.uploads_dir().join(".tmp-1-1").exists());
        uploads.remove(7, "a/b");
        uploads.remove(7, "a/b");
        assert_eq!(uploads.get(7, "a/b"), None);
    }

    #[test]
    fn fingerprints_differ_with_any_input() {
        let meta: std::collections::HashMap<String, String> =
            [("mode".to_owned(), "33188".to_owned())].into();
        let base = fingerprint(1, 10, &meta, Some("e"), 8, "k");
        assert_eq!(base, fingerprint(1, 10, &meta, Some("e"), 8, "k"));
        for other in [
            fingerprint(2, 10, &meta, Some("e"), 8, "k"),
            fingerprint(1, 11, &meta, Some("e"), 8, "k"),
            fingerprint(1, 10, &Default::default(), Some("e"), 8, "k"),
            fingerprint(1, 10, &meta, None, 8, "k"),
            fingerprint(1, 10, &meta, Some("e"), 9, "k"),
            fingerprint(1, 10, &meta, Some("e"), 8, "k2"),
        ] {
            assert_ne!(base, other);
        }
    }
}
