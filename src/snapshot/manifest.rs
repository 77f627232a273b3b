//! The manifest: what a snapshot holds, stored as JSON at
//! `PREFIX/.keepfs/snapshots/NAME/manifest.json`. Its format is documented in docs/BACKUP.md.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use super::{SnapshotError, data_key, manifest_key};
use crate::store::{CopyFrom, S3Store, StoreError};

/// The manifest format this version writes and reads.
pub const FORMAT: u32 = 1;

/// Largest manifest read back (bytes): about 3 million entries.
const MANIFEST_LIMIT: u64 = 1 << 30;

/// One snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    /// [`FORMAT`].
    pub format: u32,
    pub name: String,
    /// What was snapshotted: `s3://BUCKET/PREFIX`.
    pub source: String,
    /// When the barrier closed (milliseconds since the Unix epoch).
    pub taken_unix_ms: u64,
    /// The bucket kept versions: entries name versions, no copies were made.
    pub versioned: bool,
    /// How long the mount's changes were held at the barrier (milliseconds; 0 when no mount
    /// was involved).
    pub barrier_ms: u64,
    /// Sum of the entries' sizes (bytes).
    pub bytes: u64,
    /// Every object under the prefix (keepfs's own excepted), in key order.
    pub entries: Vec<Entry>,
}

/// One object of a snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    /// Key relative to the mount prefix (a directory marker ends with `/`).
    pub key: String,
    /// Bytes.
    pub size: u64,
    /// ETag of the object when it was recorded (quotes included).
    pub etag: String,
    /// Its Last-Modified (milliseconds since the Unix epoch).
    pub modified_unix_ms: u64,
    /// The version recorded (versioned buckets).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version_id: Option<String>,
    /// ETag of the copy under `data/` (unversioned buckets).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub copy_etag: Option<String>,
}

impl Entry {
    /// Where the entry's bytes are, for snapshot `name` of `prefix` in `bucket`: the version,
    /// or the copy.
    pub fn source<'a>(
        &'a self,
        bucket: &'a str,
        full_key: &'a str,
        copy_key: &'a str,
    ) -> CopyFrom<'a> {
        match (&self.version_id, &self.copy_etag) {
            (Some(version), _) => CopyFrom {
                bucket,
                key: full_key,
                version: Some(version),
                etag: &self.etag,
                size: self.size,
            },
            (None, copy_etag) => CopyFrom {
                bucket,
                key: copy_key,
                version: None,
                etag: copy_etag.as_deref().unwrap_or(&self.etag),
                size: self.size,
            },
        }
    }
}

/// Milliseconds since the Unix epoch.
pub fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis().try_into().unwrap_or(u64::MAX))
}

/// The time `ms` milliseconds after the Unix epoch.
pub fn from_unix_ms(ms: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(ms)
}

impl Manifest {
    /// Stores it (the last step of taking a snapshot).
    pub async fn save(&self, store: &S3Store, prefix: &str) -> Result<(), SnapshotError> {
        let key = manifest_key(prefix, &self.name);
        let body = serde_json::to_vec(self).map_err(|e| SnapshotError::Manifest {
            key: key.clone(),
            reason: e.to_string(),
        })?;
        store
            .put_whole(&key, Bytes::from(body))
            .await
            .map_err(|e| SnapshotError::store(format!("writing {key}"), e))
    }

    /// Reads snapshot `name` of `prefix`.
    pub async fn load(store: &S3Store, prefix: &str, name: &str) -> Result<Self, SnapshotError> {
        let key = manifest_key(prefix, name);
        let body = match store.get_whole(&key, MANIFEST_LIMIT).await {
            Ok(body) => body,
            Err(StoreError::NotFound) => return Err(SnapshotError::NotFound(name.to_owned(), key)),
            Err(e) => return Err(SnapshotError::store(format!("reading {key}"), e)),
        };
        let manifest: Manifest =
            serde_json::from_slice(&body).map_err(|e| SnapshotError::Manifest {
                key: key.clone(),
                reason: e.to_string(),
            })?;
        if manifest.format != FORMAT {
            return Err(SnapshotError::Manifest {
                key,
                reason: format!(
                    "format {} (this keepfs reads format {FORMAT})",
                    manifest.format
                ),
            });
        }
        Ok(manifest)
    }

    /// The key of entry `e`'s copy in this snapshot of `prefix`.
    pub fn copy_key(&self, prefix: &str, e: &Entry) -> String {
        data_key(prefix, &self.name, &e.key)
    }
}
